//! Model families: each a declarative table of HF ⇄ Megatron-Core tensor names and mapping
//! kinds, with the Megatron model fields its config maps to, and what tells its architectures
//! apart (their `model_type`, their own Megatron fields, how a model section names them). A
//! family is a Rust file here or a TOML file read at run time (the same [`Family`] structure;
//! the Gemma tables are), so a new architecture may need no compilation.

pub use crate::quirks::Quirk;
use bridgeflow_megatron::mapping::Entry;
use bridgeflow_sdk::{PluginError, Result};
use serde_json::{Map, Value};
use std::path::Path;

mod deepseek;
mod gpt_oss;
mod llama;
mod nemotron_h;
mod qwen2_vl;
mod qwen3_moe;

/// One model family.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    /// Short name (messages).
    pub name: String,
    /// The HF `architectures[0]` values it handles.
    pub architectures: Vec<String>,
    /// The HF `model_type` its architectures write in config.json (a variant may say its own).
    /// Export needs one to rebuild config.json from a model section.
    #[serde(default)]
    pub model_type: Option<String>,
    /// What sets an architecture apart from the family's others (see [`Variant`]).
    #[serde(default, rename = "variant")]
    pub variants: Vec<Variant>,
    /// Megatron-Bridge's model provider class, the `_target_` of `run_config.yaml`'s model.
    pub provider: String,
    /// The tensor table.
    #[serde(rename = "tensor")]
    pub tensors: Vec<Entry>,
    /// HF config key → Megatron model field, both ways, besides the common ones
    /// ([`crate::megatron_config`]).
    #[serde(default)]
    pub config: Vec<(String, String)>,
    /// Megatron model fields fixed for the family (normalization, activation, ...).
    #[serde(default)]
    pub megatron: Map<String, Value>,
    /// HF config values Megatron keeps in another form, converted both ways (see [`Quirk`]).
    #[serde(default)]
    pub quirks: Vec<Quirk>,
    /// Suffixes of HF tensors that carry no weights (recomputed buffers).
    #[serde(default)]
    pub ignore: Vec<String>,
    /// How the provider takes HF's `sliding_window` W: `pair` — Megatron's window_size
    /// [W-1, 0] (Mistral, Gemma 2) — or `plain`: W itself (Gemma 3's provider).
    #[serde(default)]
    pub sliding_window: WindowStyle,
    /// Name prefixes of tensors carried as they are, the same name on both sides (a VLM's
    /// vision tower that Megatron-Bridge keeps as the HF module: its `visual.**`).
    #[serde(default)]
    pub verbatim: Vec<String>,
    /// HF config objects the provider takes as objects: (HF key, Python class), written into
    /// the model section with that `_target_` (a VLM's `vision_config`).
    #[serde(default)]
    pub objects: Vec<(String, String)>,
    /// HF tensors that multi-token-prediction layers repeat from the main model: (main name,
    /// MTP-layer pattern with `{l}`). Skipped on import (Megatron shares them), written again
    /// for each MTP layer on export (DeepSeek-V3's `embed_tokens`, `shared_head.head`).
    #[serde(default)]
    pub mtp_shared: Vec<(String, String)>,
}

/// One HF architecture of a family, where it differs from the others.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Its `architectures[0]` (one of the family's `architectures`).
    pub architecture: String,
    /// Its config.json `model_type`, over the family's.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Megatron model fields it sets over the family's (Qwen2's `add_qkv_bias`).
    #[serde(default)]
    pub megatron: Map<String, Value>,
    /// How a model section that does not name its HF architecture is taken for this one.
    #[serde(default)]
    pub guess: Option<Guess>,
}

/// An architecture guessed from a Megatron model section that names none (Megatron-Bridge's
/// sections do not) and whose provider class several families share: it holds when every field
/// of `when` is set (`true`, or a number); of those that hold, the highest `rank` wins.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guess {
    pub rank: u32,
    #[serde(default)]
    pub when: Vec<String>,
}

impl Variant {
    /// A variant with its `model_type`.
    pub fn new(architecture: &str, model_type: &str) -> Variant {
        Variant {
            architecture: architecture.into(),
            model_type: Some(model_type.into()),
            ..Default::default()
        }
    }
    /// With Megatron fields of its own.
    pub fn megatron(mut self, fields: Value) -> Variant {
        self.megatron = megatron(fields);
        self
    }
    /// Guessed from a model section whose `when` fields are all set, at `rank`.
    pub fn guess(mut self, rank: u32, when: &[&str]) -> Variant {
        self.guess = Some(Guess {
            rank,
            when: when.iter().map(|w| w.to_string()).collect(),
        });
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowStyle {
    #[default]
    Pair,
    Plain,
}

impl Family {
    /// Reads a family from TOML text (`path` names it in messages).
    pub fn from_toml(text: &str, path: &Path) -> Result<Family> {
        toml::from_str(text)
            .map_err(|e| PluginError::config(format!("{}: not a model table: {e}", path.display())))
    }

    pub fn ignorable(&self, name: &str) -> bool {
        self.ignore.iter().any(|s| name.ends_with(s.as_str()))
    }

    /// What the family says of one of its architectures, if anything.
    pub fn variant(&self, architecture: &str) -> Option<&Variant> {
        self.variants
            .iter()
            .find(|v| v.architecture == architecture)
    }

    /// The config.json `model_type` of one of its architectures.
    pub fn model_type(&self, architecture: &str) -> Option<&str> {
        self.variant(architecture)
            .and_then(|v| v.model_type.as_deref())
            .or(self.model_type.as_deref())
    }

    /// The Megatron fields fixed for one of its architectures: the family's, then its own.
    pub fn megatron_for(&self, architecture: &str) -> Vec<(&String, &Value)> {
        let own = self.variant(architecture).map(|v| &v.megatron);
        self.megatron
            .iter()
            .chain(own.into_iter().flatten())
            .collect()
    }

    /// Adds an identity row for each of `names` under a verbatim prefix (once each).
    pub fn add_verbatim<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let mut seen: std::collections::HashSet<String> =
            self.tensors.iter().map(|e| e.megatron.clone()).collect();
        for n in names {
            if self.verbatim.iter().any(|p| n.starts_with(p.as_str())) && seen.insert(n.into()) {
                self.tensors.push(Entry::direct(n, n));
            }
        }
    }
}

/// The tables shipped as TOML (read like a user's, at run time).
const TOML_TABLES: &[(&str, &str)] = &[
    ("families/gemma.toml", include_str!("gemma.toml")),
    ("families/gemma2.toml", include_str!("gemma2.toml")),
    ("families/gemma3.toml", include_str!("gemma3.toml")),
];

/// The families built in.
pub fn builtin() -> Vec<Family> {
    let mut all = vec![
        llama::family(),
        qwen3_moe::family(),
        qwen3_moe::mixtral(),
        deepseek::family(),
        gpt_oss::family(),
        qwen2_vl::family(),
        nemotron_h::family(),
    ];
    for (path, text) in TOML_TABLES {
        all.push(Family::from_toml(text, Path::new(path)).expect("a bundled table parses"));
    }
    all
}

/// The family for an HF architecture, among the built-in ones and `extra` (TOML tables).
pub fn find(architecture: &str, extra: &[Family]) -> Result<Family> {
    let all: Vec<Family> = extra.iter().cloned().chain(builtin()).collect();
    all.iter()
        .find(|f| f.architectures.iter().any(|a| a == architecture))
        .cloned()
        .ok_or_else(|| {
            let known: Vec<&str> = all
                .iter()
                .flat_map(|f| f.architectures.iter().map(String::as_str))
                .collect();
            PluginError::unsupported(format!(
                "architecture '{architecture}' has no model table (known: {}; a TOML table may add one, see plugins/models/README.md)",
                known.join(", ")
            ))
        })
}

/// The HF architecture a Megatron model section stands for when it does not say: that of the
/// one family whose provider class it instantiates (among `extra`, the tables given, if any of
/// them has it; else among the built-in ones), else the highest-ranked [`Guess`] that holds
/// (the first of equal rank; the tables given first).
pub fn architecture_of(model: &Value, extra: &[Family]) -> Option<String> {
    let target = model["_target_"].as_str().unwrap_or("");
    let builtin = builtin();
    let by_provider = |set: &[Family]| -> Vec<Option<String>> {
        set.iter()
            .filter(|f| f.provider == target)
            .map(|f| f.architectures.first().cloned())
            .collect()
    };
    let mut found = by_provider(extra);
    if found.is_empty() {
        found = by_provider(&builtin);
    }
    if let [Some(a)] = found.as_slice() {
        return Some(a.clone());
    }
    let set = |k: &String| model[k.as_str()].as_bool() == Some(true) || model[k.as_str()].is_u64();
    let mut best: Option<(u32, &str)> = None;
    for v in extra.iter().chain(&builtin).flat_map(|f| &f.variants) {
        let Some(g) = v.guess.as_ref().filter(|g| g.when.iter().all(set)) else {
            continue;
        };
        if best.is_none_or(|(rank, _)| g.rank > rank) {
            best = Some((g.rank, &v.architecture));
        }
    }
    best.map(|(_, a)| a.to_string())
}

/// Helpers the Rust families share.
pub(crate) fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

pub(crate) fn megatron(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tables_are_well_formed() {
        for f in builtin() {
            for e in &f.tensors {
                let want = crate::layout::of(e.kind).parts();
                assert_eq!(e.hf.len(), want, "{}: {}", f.name, e.megatron);
            }
            // Every architecture has its model_type; every variant is one of them.
            for a in &f.architectures {
                assert!(
                    f.model_type(a).is_some(),
                    "{}: {a} has no model_type",
                    f.name
                );
            }
            for v in &f.variants {
                assert!(
                    f.architectures.contains(&v.architecture),
                    "{}: {}",
                    f.name,
                    v.architecture
                );
            }
        }
        let e = find("NoSuchForCausalLM", &[]).unwrap_err();
        assert!(e.message.contains("NoSuchForCausalLM") && e.message.contains("Gemma2ForCausalLM"));
    }

    #[test]
    fn model_sections_name_their_architecture() {
        let gpt = "megatron.bridge.models.gpt_provider.GPTModelProvider";
        let arch = |fields: Value, extra: &[Family]| {
            let mut m = serde_json::json!({"_target_": gpt});
            for (k, v) in fields.as_object().unwrap() {
                m[k] = v.clone();
            }
            architecture_of(&m, extra).unwrap()
        };
        use serde_json::json as j;
        // A provider several families share: the guesses, highest rank first.
        assert_eq!(arch(j!({}), &[]), "LlamaForCausalLM");
        assert_eq!(arch(j!({"add_qkv_bias": true}), &[]), "Qwen2ForCausalLM");
        let both = j!({"add_qkv_bias": true, "qk_layernorm": true});
        assert_eq!(arch(both, &[]), "Qwen3ForCausalLM");
        assert_eq!(arch(j!({"num_moe_experts": 4}), &[]), "MixtralForCausalLM");
        let qwen3_moe = j!({"num_moe_experts": 4, "qk_layernorm": true});
        assert_eq!(arch(qwen3_moe, &[]), "Qwen3MoeForCausalLM");
        let mla = j!({"num_moe_experts": 4, "qk_layernorm": true, "multi_latent_attention": true});
        assert_eq!(arch(mla, &[]), "DeepseekV3ForCausalLM");
        assert_eq!(arch(j!({"qk_layernorm": false}), &[]), "LlamaForCausalLM");
        // A provider of one family names it; a table given with the provider comes first.
        let gemma2 =
            j!({"_target_": "megatron.bridge.models.gemma.gemma2_provider.Gemma2ModelProvider"});
        assert_eq!(architecture_of(&gemma2, &[]).unwrap(), "Gemma2ForCausalLM");
        let mine = Family {
            architectures: vec!["MineForCausalLM".into()],
            provider: gpt.into(),
            ..Default::default()
        };
        assert_eq!(arch(j!({"num_moe_experts": 4}), &[mine]), "MineForCausalLM");
    }

    #[test]
    fn variants_say_model_type_and_fields() {
        let llama = find("Qwen2ForCausalLM", &[]).unwrap();
        assert_eq!(llama.model_type("LlamaForCausalLM"), Some("llama"));
        assert_eq!(llama.model_type("Qwen2ForCausalLM"), Some("qwen2"));
        let own: Vec<_> = llama.megatron_for("Qwen2ForCausalLM");
        assert!(own
            .iter()
            .any(|(k, v)| *k == "add_qkv_bias" && **v == Value::Bool(true)));
        assert!(!llama
            .megatron_for("LlamaForCausalLM")
            .iter()
            .any(|(k, _)| *k == "add_qkv_bias"));
        let gemma3 = find("Gemma3ForCausalLM", &[]).unwrap();
        assert_eq!(gemma3.model_type("Gemma3ForCausalLM"), Some("gemma3_text"));
        assert_eq!(gemma3.quirks, vec![Quirk::SoftmaxScale]);
        // A TOML table may say both, per architecture too.
        let t = Family::from_toml(
            "name = \"x\"\narchitectures = [\"A\", \"B\"]\nprovider = \"p\"\nmodel_type = \"a\"\ntensor = []\n\n[[variant]]\narchitecture = \"B\"\nmodel_type = \"b\"\nguess = { rank = 1, when = [\"f\"] }\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(
            (t.model_type("A"), t.model_type("B")),
            (Some("a"), Some("b"))
        );
    }
}

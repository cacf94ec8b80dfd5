//! Model families: each a declarative table of HF ⇄ Megatron-Core tensor names and mapping
//! kinds, with the Megatron model fields its config maps to. A family is a Rust file here or a
//! TOML file read at run time (the same [`Family`] structure; the Gemma tables are), so a new
//! architecture may need no compilation.

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
                let want = match e.kind {
                    bridgeflow_megatron::mapping::Kind::Qkv => 3,
                    bridgeflow_megatron::mapping::Kind::GatedMlp => 2,
                    _ => 1,
                };
                assert_eq!(e.hf.len(), want, "{}: {}", f.name, e.megatron);
            }
        }
        let e = find("NoSuchForCausalLM", &[]).unwrap_err();
        assert!(e.message.contains("NoSuchForCausalLM") && e.message.contains("Gemma2ForCausalLM"));
    }
}

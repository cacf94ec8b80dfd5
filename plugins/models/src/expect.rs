//! What a model must contain. From the family table and the config, every HF tensor the model
//! must have — per layer and layer kind, per expert, tied or not — is checked against the HF
//! tensors a conversion sees (on import its input, on export its planned output), like
//! transformers' missing / unexpected keys but fatal: a missing, extra, misshapen or
//! non-floating-point tensor is named before anything is written. `allow_missing` /
//! `allow_unexpected` patterns let a user who means it through.
//!
//! The rules, one small function each:
//! - a required row (not [`Entry::optional`]) is in every layer its kind applies to;
//! - an optional row that a layer kind has somewhere, it has in every layer of that kind;
//! - rows sharing a Megatron name are alternatives (either HF spelling will do);
//! - a tensor in a layer the config does not have, or that no row maps, is unexpected, and so
//!   is `lm_head` beside `tie_word_embeddings: true` on import (one of the two would be lost);
//! - every layer's tensor of a row has one shape, the shape its [`Entry::dims`] declare, and a
//!   vocabulary row has `vocab_size` rows of `hidden_size`.

use crate::families::Family;
use crate::mapper::ModelConfig;
use bridgeflow_megatron::mapping::{fill, match_name, Entry, Index, Kind, Layers};
use bridgeflow_megatron::names;
use bridgeflow_sdk::{DType, PluginError, Result, TensorInfo};
use std::collections::{BTreeMap, HashMap, HashSet};

/// How many names of each kind of problem a message lists before "and N more".
const LISTED: usize = 8;

/// Name patterns (`*` and `?` wildcards) a user lets through.
#[derive(Debug, Default, Clone)]
pub struct Allow {
    missing: Vec<glob::Pattern>,
    unexpected: Vec<glob::Pattern>,
}

impl Allow {
    pub fn new(missing: &[String], unexpected: &[String]) -> Result<Allow> {
        let compile = |key: &str, list: &[String]| {
            list.iter()
                .map(|p| {
                    glob::Pattern::new(p)
                        .map_err(|e| PluginError::config(format!("{key}: pattern '{p}': {e}")))
                })
                .collect::<Result<Vec<_>>>()
        };
        Ok(Allow {
            missing: compile("allow_missing", missing)?,
            unexpected: compile("allow_unexpected", unexpected)?,
        })
    }
    fn missing_ok(&self, name: &str) -> bool {
        self.missing.iter().any(|p| p.matches(name))
    }
    pub fn unexpected_ok(&self, name: &str) -> bool {
        self.unexpected.iter().any(|p| p.matches(name))
    }
}

/// A layer's class: whether it is a multi-token-prediction layer, and its kind.
type Class = (bool, Layers);

/// Which row, part and index an HF name is, in its layer's kind.
pub fn find_hf(family: &Family, model: &ModelConfig, name: &str) -> Option<(usize, usize, Index)> {
    family.tensors.iter().enumerate().find_map(|(i, e)| {
        e.hf.iter().enumerate().find_map(|(p, pat)| {
            let idx = match_name(pat, name)?;
            (e.layers == Layers::All || e.layers == model.layer_kind(idx.layer))
                .then_some((i, p, idx))
        })
    })
}

/// The layer index in an HF name (`….layers.{l}.…`).
fn layer_of(name: &str) -> Option<u64> {
    name.split_once(".layers.")
        .and_then(|(_, rest)| rest.split('.').next())
        .and_then(|l| l.parse().ok())
}

/// Why an HF tensor has no row: a layer the config does not have, or a name the table does not
/// know.
pub fn unmapped(family: &Family, model: &ModelConfig, name: &str) -> PluginError {
    match layer_of(name).filter(|&l| l >= model.layers + model.mtp) {
        Some(l) => PluginError::shape(format!(
            "tensor '{name}' is in layer {l}, but the config describes {} layers{}",
            model.layers,
            if model.mtp > 0 {
                format!(" and {} MTP layers", model.mtp)
            } else {
                String::new()
            }
        )),
        None => PluginError::unsupported(format!(
            "tensor '{name}' has no mapping in the {} table",
            family.name
        )),
    }
}

fn is_mtp_row(e: &Entry) -> bool {
    e.megatron.contains(names::MTP_LAYERS)
}

/// Whether a row applies to layer `l` (`None`: a row outside the layers).
fn applies(e: &Entry, model: &ModelConfig, l: Option<u64>) -> bool {
    let Some(l) = l else { return true };
    let kind_fits = e.layers == Layers::All || e.layers == model.layer_kind(Some(l));
    // MTP rows only in MTP layers; decoder rows in both (an MTP layer holds a decoder layer).
    kind_fits && (!is_mtp_row(e) || l >= model.layers)
}

fn class(model: &ModelConfig, l: Option<u64>) -> Option<Class> {
    l.map(|l| (l >= model.layers, model.layer_kind(Some(l))))
}

/// The output layer's row: not expected beside tied embeddings.
fn is_output_row(e: &Entry) -> bool {
    e.kind == Kind::Vocab && e.megatron.ends_with(names::OUTPUT_LAYER)
}

/// The value of a dimension name of [`Entry::dims`], where the config gives it.
fn dim_value(model: &ModelConfig, dim: &str) -> Option<u64> {
    let h = model.heads;
    match dim {
        "hidden" => Some(model.hidden),
        "q" => h.heads.checked_mul(h.head_dim),
        "kv" => h.groups.checked_mul(h.head_dim),
        "head_dim" => Some(h.head_dim),
        "ffn" => model.ffn,
        "moe_ffn" => model.moe_ffn.or(model.ffn),
        "vocab" => Some(model.vocab),
        "experts" => model.experts,
        _ => None,
    }
}

/// One HF tensor the check placed.
struct Placed<'a> {
    name: &'a str,
    shape: &'a [u64],
}

/// What is wrong, by kind; empty when the tensors fit.
#[derive(Default)]
struct Findings {
    missing: Vec<String>,
    unexpected: Vec<String>,
    misshapen: Vec<String>,
}

impl Findings {
    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.misshapen.is_empty()
    }
    fn into_error(self, what: &str) -> PluginError {
        let list = |label: &str, v: &[String]| {
            if v.is_empty() {
                return None;
            }
            let shown: Vec<&str> = v.iter().take(LISTED).map(String::as_str).collect();
            let more = v.len().saturating_sub(LISTED);
            Some(format!(
                "{} {label}: {}{}",
                v.len(),
                shown.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            ))
        };
        let parts: Vec<String> = [
            list(
                "missing (allow_missing = [patterns] to accept)",
                &self.missing,
            ),
            list(
                "unexpected (allow_unexpected = [patterns] to drop)",
                &self.unexpected,
            ),
            list("misshapen", &self.misshapen),
        ]
        .into_iter()
        .flatten()
        .collect();
        PluginError::shape(format!("{what}: {}", parts.join(" | ")))
    }
}

/// The check itself. `tensors` are whole HF tensors (name, dtype, global shape), `skip` the
/// names the mapper leaves out on purpose (ignorable buffers, MTP copies), `import` whether
/// they are an input (an lm_head beside tied embeddings is then unexpected). `what` opens the
/// error message (the model and config it is checked against). Returns the names
/// `allow_unexpected` drops.
pub fn check(
    family: &Family,
    model: &ModelConfig,
    tensors: &[TensorInfo],
    skip: impl Fn(&str) -> bool,
    import: bool,
    allow: &Allow,
    what: &str,
) -> Result<HashSet<String>> {
    let mut found = Findings::default();
    let mut dropped = HashSet::new();
    let mut placed: HashMap<(usize, usize, Index), Placed> = HashMap::new();
    for t in tensors {
        let name = t.name();
        if skip(name) {
            continue;
        }
        if allow.unexpected_ok(name) {
            dropped.insert(name.to_string());
            continue;
        }
        match place(family, model, t, import) {
            Ok((i, p, idx)) => {
                check_dtype(t, &mut found);
                placed.insert(
                    (i, p, idx),
                    Placed {
                        name,
                        shape: &t.shape,
                    },
                );
            }
            Err(why) => found.unexpected.push(why),
        }
    }
    // A config calling for far more tensors than arrived (hostile layer or expert counts)
    // is named at once, not enumerated name by name.
    let called_for = expected_upper_bound(family, model);
    if called_for > 16 * (tensors.len() as u64) + 4096 {
        return Err(PluginError::shape(format!(
            "{what}: the config calls for up to {called_for} tensors ({} layers, {} experts), the input has {}",
            model.layers + model.mtp,
            model.experts.unwrap_or(0),
            tensors.len()
        )));
    }
    missing(family, model, &placed, allow, &mut found);
    shapes(family, model, &placed, &mut found);
    if found.is_empty() {
        Ok(dropped)
    } else {
        Err(found.into_error(what))
    }
}

/// How many HF tensors the table and config could call for at most (every row in every
/// layer, every expert).
fn expected_upper_bound(family: &Family, model: &ModelConfig) -> u64 {
    family
        .tensors
        .iter()
        .map(|e| {
            let layers = if e.megatron.contains("{l}") || e.hf.iter().any(|h| h.contains("{l}")) {
                model.layers + model.mtp
            } else {
                1
            };
            let experts = if e.hf.iter().any(|h| h.contains("{e}")) {
                model.experts.unwrap_or(1)
            } else {
                1
            };
            layers
                .saturating_mul(experts)
                .saturating_mul(e.hf.len() as u64)
        })
        .fold(0u64, u64::saturating_add)
}

/// The row an HF tensor belongs to, or why it is unexpected.
fn place(
    family: &Family,
    model: &ModelConfig,
    t: &TensorInfo,
    import: bool,
) -> std::result::Result<(usize, usize, Index), String> {
    let name = t.name();
    let Some((i, p, idx)) = find_hf(family, model, name) else {
        return Err(unmapped(family, model, name).message.to_string());
    };
    if idx.layer.is_some_and(|l| l >= model.layers + model.mtp) {
        return Err(unmapped(family, model, name).message.to_string());
    }
    if import && model.tied && is_output_row(&family.tensors[i]) {
        return Err(format!(
            "'{name}' beside tie_word_embeddings: true (the output layer is the embedding; one of the two would be lost)"
        ));
    }
    if let (Some(x), Some(n)) = (idx.expert, model.experts) {
        if x >= n {
            return Err(format!(
                "'{name}' is expert {x}, but the config gives {n} experts"
            ));
        }
    }
    Ok((i, p, idx))
}

fn check_dtype(t: &TensorInfo, found: &mut Findings) {
    if !t.dtype.is_float() || matches!(t.dtype, DType::BOOL) {
        found.misshapen.push(format!(
            "'{}' is {:?}; weights are floating point",
            t.name(),
            t.dtype
        ));
    }
}

/// The layers a row may be in: every layer (`Some`), or the row outside layers (`None`).
fn instances(e: &Entry, model: &ModelConfig) -> Vec<Option<u64>> {
    if e.megatron.contains("{l}") || e.hf.iter().any(|h| h.contains("{l}")) {
        (0..model.layers + model.mtp).map(Some).collect()
    } else {
        vec![None]
    }
}

/// The experts a row has at a layer: each of them for a per-expert row, else one.
fn experts(e: &Entry, model: &ModelConfig) -> Vec<Option<u64>> {
    match (e.hf.iter().any(|h| h.contains("{e}")), model.experts) {
        (true, Some(n)) => (0..n).map(Some).collect(),
        _ => vec![None],
    }
}

/// A row's HF names at a layer, each with whether it arrived.
fn row_names(
    e: &Entry,
    i: usize,
    model: &ModelConfig,
    l: Option<u64>,
    placed: &HashMap<(usize, usize, Index), Placed>,
) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for x in experts(e, model) {
        for (p, pat) in e.hf.iter().enumerate() {
            let idx = Index {
                layer: l,
                expert: x,
            };
            out.push((fill(pat, idx), placed.contains_key(&(i, p, idx))));
        }
    }
    out
}

/// Every tensor the rows demand that did not arrive.
fn missing(
    family: &Family,
    model: &ModelConfig,
    placed: &HashMap<(usize, usize, Index), Placed>,
    allow: &Allow,
    found: &mut Findings,
) {
    // Rows sharing a Megatron name are alternatives, in table order.
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in family.tensors.iter().enumerate() {
        groups.entry(e.megatron.as_str()).or_default().push(i);
    }
    // The layer classes where each row has arrived at least in part.
    let mut has: HashSet<(usize, Option<Class>)> = HashSet::new();
    for (i, _, idx) in placed.keys() {
        has.insert((*i, class(model, idx.layer)));
    }
    for rows in groups.values() {
        let first = &family.tensors[rows[0]];
        let required = rows.iter().any(|&i| !family.tensors[i].optional)
            && !(model.tied && is_output_row(first));
        for l in instances(first, model) {
            let c = class(model, l);
            let candidates: Vec<(usize, Vec<(String, bool)>)> = rows
                .iter()
                .filter(|&&i| applies(&family.tensors[i], model, l))
                .map(|&i| (i, row_names(&family.tensors[i], i, model, l, placed)))
                .collect();
            if candidates
                .iter()
                .any(|(_, names)| names.iter().all(|(_, ok)| *ok))
            {
                continue;
            }
            // The alternative this model uses (it has some of it here, or in a layer of the
            // same kind), else the first, if the row is required.
            let chosen = candidates
                .iter()
                .find(|(_, names)| names.iter().any(|(_, ok)| *ok))
                .or_else(|| candidates.iter().find(|(i, _)| has.contains(&(*i, c))))
                .or_else(|| candidates.first().filter(|_| required));
            if let Some((_, names)) = chosen {
                found.missing.extend(
                    names
                        .iter()
                        .filter(|(n, ok)| !ok && !allow.missing_ok(n))
                        .map(|(n, _)| format!("'{n}'")),
                );
            }
        }
    }
}

/// Shapes: one per row, part and layer class; the declared dims; vocabulary rows.
fn shapes(
    family: &Family,
    model: &ModelConfig,
    placed: &HashMap<(usize, usize, Index), Placed>,
    found: &mut Findings,
) {
    let mut keys: Vec<&(usize, usize, Index)> = placed.keys().collect();
    keys.sort();
    let mut first: HashMap<(usize, usize, Option<Class>), &Placed> = HashMap::new();
    for key in keys {
        let (i, p, idx) = *key;
        let t = &placed[key];
        let e = &family.tensors[i];
        if let Some(why) = declared(e, p, t, model) {
            found.misshapen.push(why);
            continue;
        }
        let seen = first.entry((i, p, class(model, idx.layer))).or_insert(t);
        if seen.shape != t.shape {
            found.misshapen.push(format!(
                "'{}' is {:?}, but '{}' is {:?}",
                t.name, t.shape, seen.name, seen.shape
            ));
        }
    }
}

/// Why a tensor's shape is not the one its row declares (or a vocabulary row's), if it is not.
fn declared(e: &Entry, part: usize, t: &Placed, model: &ModelConfig) -> Option<String> {
    let mut want: Vec<Option<u64>> = match e.dims.get(part) {
        Some(d) => d.iter().map(|d| dim_value(model, d)).collect(),
        None => Vec::new(),
    };
    if e.kind == Kind::Vocab && want.is_empty() {
        want = vec![Some(model.vocab), Some(model.hidden)];
    }
    if want.is_empty() {
        return None;
    }
    let fits = want.len() == t.shape.len()
        && want
            .iter()
            .zip(t.shape)
            .all(|(w, s)| w.is_none_or(|w| w == *s));
    (!fits).then(|| {
        let names = match e.dims.get(part) {
            Some(d) => d.join(", "),
            None => "vocab, hidden".into(),
        };
        let shown: Vec<String> = want
            .iter()
            .map(|w| w.map_or("?".into(), |w| w.to_string()))
            .collect();
        format!(
            "'{}' is {:?}; the config gives [{names}] = [{}]",
            t.name,
            t.shape,
            shown.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::find;
    use crate::mapper::model_config_from;
    use serde_json::json;
    use std::path::Path;

    fn llama(extra: serde_json::Value) -> ModelConfig {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 16,
            "intermediate_size": 12,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        model_config_from(&c, Path::new("config.json")).unwrap()
    }

    fn llama_tensors(layers: u64) -> Vec<TensorInfo> {
        let mut v = vec![
            TensorInfo::new("model.embed_tokens.weight", DType::F32, &[16, 8]),
            TensorInfo::new("lm_head.weight", DType::F32, &[16, 8]),
            TensorInfo::new("model.norm.weight", DType::F32, &[8]),
        ];
        for l in 0..layers {
            let n = |s: &str| format!("model.layers.{l}.{s}");
            for (s, shape) in [
                ("input_layernorm.weight", vec![8]),
                ("post_attention_layernorm.weight", vec![8]),
                ("self_attn.q_proj.weight", vec![8, 8]),
                ("self_attn.k_proj.weight", vec![4, 8]),
                ("self_attn.v_proj.weight", vec![4, 8]),
                ("self_attn.o_proj.weight", vec![8, 8]),
                ("mlp.gate_proj.weight", vec![12, 8]),
                ("mlp.up_proj.weight", vec![12, 8]),
                ("mlp.down_proj.weight", vec![8, 12]),
            ] {
                v.push(TensorInfo::new(n(s), DType::F32, &shape));
            }
        }
        v
    }

    fn run(model: &ModelConfig, tensors: &[TensorInfo]) -> Result<HashSet<String>> {
        let f = find("LlamaForCausalLM", &[]).unwrap();
        check(&f, model, tensors, |_| false, true, &Allow::default(), "m")
    }

    fn without(mut v: Vec<TensorInfo>, name: &str) -> Vec<TensorInfo> {
        v.retain(|t| t.name() != name);
        v
    }

    fn err(model: &ModelConfig, tensors: &[TensorInfo]) -> String {
        run(model, tensors).unwrap_err().message.to_string()
    }

    #[test]
    fn a_complete_model_passes() {
        run(&llama(json!({})), &llama_tensors(2)).unwrap();
    }

    #[test]
    fn missing_tensors_are_named() {
        let m = llama(json!({}));
        for name in [
            "model.norm.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "lm_head.weight",
        ] {
            let e = err(&m, &without(llama_tensors(2), name));
            assert!(
                e.contains(&format!("'{name}'")) && e.contains("missing"),
                "{e}"
            );
        }
        // Every layer's o_proj gone: still named, each.
        let mut v = llama_tensors(2);
        v.retain(|t| !t.name().ends_with("o_proj.weight"));
        let e = err(&m, &v);
        assert!(
            e.contains("2 missing") && e.contains("layers.1.self_attn.o_proj"),
            "{e}"
        );
    }

    #[test]
    fn allow_missing_lets_a_pattern_through() {
        let f = find("LlamaForCausalLM", &[]).unwrap();
        let v = without(llama_tensors(2), "model.norm.weight");
        let allow = Allow::new(&["model.norm.*".into()], &[]).unwrap();
        check(&f, &llama(json!({})), &v, |_| false, true, &allow, "m").unwrap();
    }

    #[test]
    fn optional_rows_are_all_or_nothing_per_layer_kind() {
        let m = llama(json!({}));
        let mut v = llama_tensors(2);
        run(&m, &v).unwrap();
        v.push(TensorInfo::new(
            "model.layers.0.self_attn.q_norm.weight",
            DType::F32,
            &[4],
        ));
        let e = err(&m, &v);
        assert!(
            e.contains("'model.layers.1.self_attn.q_norm.weight'"),
            "{e}"
        );
    }

    #[test]
    fn layers_beyond_the_config_and_fewer_layers_are_named() {
        let e = err(&llama(json!({"num_hidden_layers": 1})), &llama_tensors(2));
        assert!(
            e.contains("in layer 1") && e.contains("describes 1 layers"),
            "{e}"
        );
        let e = err(&llama(json!({"num_hidden_layers": 3})), &llama_tensors(2));
        assert!(e.contains("'model.layers.2.mlp.down_proj.weight'"), "{e}");
    }

    #[test]
    fn tied_embeddings_beside_an_lm_head_are_unexpected() {
        let m = llama(json!({"tie_word_embeddings": true}));
        let e = err(&m, &llama_tensors(2));
        assert!(
            e.contains("'lm_head.weight' beside tie_word_embeddings"),
            "{e}"
        );
        run(&m, &without(llama_tensors(2), "lm_head.weight")).unwrap();
        // Unless the user drops it.
        let f = find("LlamaForCausalLM", &[]).unwrap();
        let allow = Allow::new(&[], &["lm_head.weight".into()]).unwrap();
        let dropped = check(&f, &m, &llama_tensors(2), |_| false, true, &allow, "m").unwrap();
        assert!(dropped.contains("lm_head.weight"));
    }

    #[test]
    fn shapes_and_dtypes_against_the_config() {
        let m = llama(json!({}));
        let set = |name: &str, dtype: DType, shape: &[u64]| {
            let mut v = llama_tensors(2);
            for t in v.iter_mut().filter(|t| t.name() == name) {
                *t = TensorInfo::new(name, dtype, shape);
            }
            v
        };
        let cases = [
            (
                "model.layers.1.self_attn.o_proj.weight",
                DType::F32,
                vec![4, 16],
                "o_proj",
            ),
            (
                "model.layers.0.mlp.down_proj.weight",
                DType::F32,
                vec![12, 8],
                "down_proj",
            ),
            ("model.norm.weight", DType::U32, vec![8], "U32"),
            (
                "model.embed_tokens.weight",
                DType::F32,
                vec![15, 8],
                "vocab",
            ),
        ];
        for (name, dtype, shape, want) in cases {
            let e = err(&m, &set(name, dtype, &shape));
            assert!(e.contains(name) && e.contains(want), "{e}");
        }
        // hidden_size that the weights do not have.
        let e = err(
            &llama(json!({"hidden_size": 1024, "head_dim": 4})),
            &llama_tensors(2),
        );
        assert!(
            e.contains("model.embed_tokens.weight") && e.contains("1024"),
            "{e}"
        );
    }

    #[test]
    fn one_layer_unlike_the_others_is_named_even_without_declared_dims() {
        let mut f = find("LlamaForCausalLM", &[]).unwrap();
        for e in &mut f.tensors {
            e.dims.clear();
        }
        let mut v = llama_tensors(2);
        for t in v
            .iter_mut()
            .filter(|t| t.name() == "model.layers.1.mlp.down_proj.weight")
        {
            *t = TensorInfo::new(t.name(), DType::F32, &[12, 8]);
        }
        let e = check(
            &f,
            &llama(json!({})),
            &v,
            |_| false,
            true,
            &Allow::default(),
            "m",
        )
        .unwrap_err()
        .message
        .to_string();
        assert!(
            e.contains("layers.1.mlp.down_proj") && e.contains("layers.0.mlp.down_proj"),
            "{e}"
        );
    }

    #[test]
    fn a_config_calling_for_far_more_tensors_is_named_at_once() {
        let m = llama(json!({"num_hidden_layers": 60000}));
        let t0 = std::time::Instant::now();
        let e = err(&m, &llama_tensors(2));
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            e.contains("calls for up to") && e.contains("60000 layers"),
            "{e}"
        );
    }

    #[test]
    fn a_long_list_is_cut() {
        let m = llama(json!({"num_hidden_layers": 200}));
        let e = err(&m, &llama_tensors(2));
        assert!(
            e.contains("and ") && e.contains("more") && e.len() < 4000,
            "{}",
            e.len()
        );
    }
}

//! The model's configuration both ways. Import writes the checkpoint's `run_config.yaml` as
//! Megatron-Bridge writes it — a `ConfigContainer` whose `model:` section instantiates the
//! family's Bridge provider (so Bridge's `load_megatron_model` and `export_ckpt` build the model
//! from it), with `checkpoint:` and `tokenizer:` sections — plus a `bridgeflow:` section keeping
//! the original HF `config.json`. Export rebuilds `config.json` from that, or from the model
//! section of a checkpoint Megatron-Bridge wrote, so a checkpoint exports with nothing but itself.

use crate::families::{Family, WindowStyle};
use bridgeflow_sdk::{PluginError, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use yaml_rust2::{Yaml, YamlLoader};

/// HF `config.json` key ⇄ Megatron model field, used both ways (Megatron-Bridge's names).
const FIELDS: &[(&str, &str)] = &[
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "kv_channels"),
    ("vocab_size", "vocab_size"),
    ("max_position_embeddings", "seq_length"),
    ("rms_norm_eps", "layernorm_epsilon"),
    ("initializer_range", "init_method_std"),
    ("attention_dropout", "attention_dropout"),
    ("tie_word_embeddings", "share_embeddings_and_output_weights"),
    ("attention_bias", "add_qkv_bias"),
    ("mlp_bias", "add_bias_linear"),
];

/// The common pairs and the family's own.
fn field_pairs(family: &Family) -> Vec<(String, String)> {
    FIELDS
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .chain(family.config.iter().cloned())
        .collect()
}

/// The config a language model's fields are read from: the config itself, or for a VLM its
/// `text_config` with the top-level keys over it (`architectures`, `tie_word_embeddings`, the
/// token ids, `vision_config`); a hybrid model's layer count from its layer kinds (transformers
/// 5 saves Nemotron-H's `layers_block_type`, not `num_hidden_layers`).
pub fn text_view(hf: &Value) -> Value {
    let mut v = match (hf.get("text_config"), hf.as_object()) {
        (Some(Value::Object(text)), Some(top)) => {
            let mut v = text.clone();
            for (k, x) in top.iter().filter(|(k, _)| *k != "text_config") {
                v.insert(k.clone(), x.clone());
            }
            Value::Object(v)
        }
        _ => hf.clone(),
    };
    if let (Some(kinds), Some(o)) = (hf["layers_block_type"].as_array(), v.as_object_mut()) {
        o.entry("num_hidden_layers").or_insert(kinds.len().into());
    }
    v
}

/// `hf` at a dotted path (`rope_parameters.mrope_section`).
fn lookup<'a>(hf: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(hf, |v, k| v.get(k))
}

/// A reference to a Python object, as Bridge's `instantiate` reads it (not called).
fn callable(target: &str) -> Value {
    json!({"_call_": false, "_target_": target})
}

/// Megatron's `rotary_base`: one base, or (local, global) for models whose sliding and full
/// attention layers rotate differently (Gemma 3: transformers 5 nests `rope_parameters` by
/// layer type; 4 has `rope_local_base_freq`).
fn rotary_base(hf: &Value) -> Value {
    let p = &hf["rope_parameters"];
    let full = p["full_attention"]["rope_theta"]
        .as_f64()
        .or_else(|| p["rope_theta"].as_f64())
        .or_else(|| hf["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let local = p["sliding_attention"]["rope_theta"]
        .as_f64()
        .or_else(|| hf["rope_local_base_freq"].as_f64());
    match local {
        Some(l) => json!([l, full]),
        None => json!(full),
    }
}

/// YaRN parameters: HF key, Megatron field (MLA models use the bare names, GPT ones `yarn_`).
const YARN: &[(&str, &str)] = &[
    ("factor", "rotary_scaling_factor"),
    (
        "original_max_position_embeddings",
        "original_max_position_embeddings",
    ),
    ("beta_fast", "beta_fast"),
    ("beta_slow", "beta_slow"),
    ("mscale", "mscale"),
    ("mscale_all_dim", "mscale_all_dim"),
];

/// RoPE scaling (`rope_scaling` in transformers 4, `rope_parameters` in 5) as Bridge maps it:
/// llama3 → `rope_scaling` + factor, linear → `seq_len_interpolation_factor`, yarn → the YaRN
/// fields (bare for MLA, `yarn_`-prefixed with `position_embedding_type: yarn` otherwise).
fn rope_fields(hf: &Value, mla: bool) -> Result<Map<String, Value>> {
    let r = if hf["rope_scaling"].is_object() {
        &hf["rope_scaling"]
    } else {
        &hf["rope_parameters"]
    };
    let kind = r["rope_type"].as_str().or_else(|| r["type"].as_str());
    let mut m = Map::new();
    match (kind, r["factor"].as_f64()) {
        (None | Some("default"), _) if mla => {
            // Megatron's MLA defaults are DeepSeek-V3's YaRN; no scaling is 1.0 (as Bridge).
            m.insert("rotary_scaling_factor".into(), 1.0.into());
            m.insert("mscale_all_dim".into(), 1.0.into());
        }
        (None | Some("default"), _) => {}
        (Some("llama3"), f) => {
            m.insert("rope_scaling".into(), true.into());
            m.insert("rope_scaling_factor".into(), f.unwrap_or(8.0).into());
        }
        (Some("linear"), Some(f)) => {
            m.insert("seq_len_interpolation_factor".into(), f.into());
        }
        (Some("yarn"), _) => {
            if !mla {
                m.insert("position_embedding_type".into(), "yarn".into());
            }
            for (h, meg) in YARN {
                if let Some(v) = r.get(*h).filter(|v| !v.is_null()) {
                    let name = if mla {
                        meg.to_string()
                    } else {
                        format!("yarn_{meg}")
                    };
                    m.insert(name, v.clone());
                }
            }
        }
        (Some(k), _) => {
            return Err(PluginError::unsupported(format!(
                "RoPE scaling '{k}' has no Megatron equivalent (llama3, linear and yarn do)"
            )))
        }
    }
    Ok(m)
}

/// The Megatron model section for an HF config: the family's Bridge provider and fields.
/// `source` is the HF folder (Bridge's `hf_model_id`).
pub fn model_section(
    family: &Family,
    hf: &Value,
    source: Option<&str>,
    vocab_divisible_by: u64,
    tp: u64,
) -> Result<Map<String, Value>> {
    let arch = hf["architectures"][0]
        .as_str()
        .unwrap_or("LlamaForCausalLM");
    let mut m = Map::new();
    m.insert("_target_".into(), family.provider.clone().into());
    mapped_fields(family, hf, &mut m);
    attention_fields(family, hf, &mut m);
    let mla = family.megatron.get("multi_latent_attention") == Some(&Value::Bool(true));
    let rope = rope_fields(hf, mla)?;
    // Off unless the family (or its architecture: Qwen3) normalises q and k.
    m.insert("qk_layernorm".into(), false.into());
    for q in &family.quirks {
        q.to_megatron(hf, family, &mut m);
    }
    for (k, v) in family.megatron_for(arch).into_iter().chain(&rope) {
        m.insert(k.clone(), v.clone());
    }
    if let Some(p) = hybrid_pattern(hf) {
        m.insert("hybrid_layer_pattern".into(), p.into());
    }
    run_fields(hf, source, vocab_divisible_by, tp, &mut m);
    Ok(m)
}

/// The HF keys the family maps (the common pairs and its own), and the HF config objects the
/// provider takes as objects.
fn mapped_fields(family: &Family, hf: &Value, m: &mut Map<String, Value>) {
    for (h, meg) in field_pairs(family) {
        if let Some(v) = lookup(hf, &h).filter(|v| !v.is_null()) {
            m.insert(meg, v.clone());
        }
    }
    for (h, class) in &family.objects {
        if let Some(Value::Object(o)) = hf.get(h) {
            let mut o = o.clone();
            o.insert("_target_".into(), class.clone().into());
            m.insert(h.clone(), Value::Object(o));
        }
    }
}

/// Biases, the sliding window, query groups, kv channels and the rotary base.
fn attention_fields(family: &Family, hf: &Value, m: &mut Map<String, Value>) {
    let heads = hf["num_attention_heads"].as_u64().unwrap_or(1);
    let hidden = hf["hidden_size"].as_u64().unwrap_or(0);
    // GPTModelProvider defaults to biased linears; this family has none unless it says so.
    m.entry("add_bias_linear").or_insert(false.into());
    m.entry("add_qkv_bias").or_insert(false.into());
    if let Some(w) = hf["sliding_window"].as_u64() {
        // Megatron counts the tokens before the current one; Gemma 3's provider takes W.
        let v = match family.sliding_window {
            WindowStyle::Pair => json!([w.saturating_sub(1), 0]),
            WindowStyle::Plain => json!(w),
        };
        m.insert("window_size".into(), v);
    }
    m.entry("num_query_groups").or_insert(heads.into());
    m.entry("kv_channels").or_insert((hidden / heads).into());
    m.insert("rotary_base".into(), rotary_base(hf));
}

/// A hybrid model's layer pattern (M Mamba, * attention, - MLP, E MoE).
fn hybrid_pattern(hf: &Value) -> Option<String> {
    if let Some(kinds) = hf["layers_block_type"].as_array() {
        let pattern: String = kinds
            .iter()
            .map(|k| match k.as_str() {
                Some("mamba") => 'M',
                Some("attention") => '*',
                Some("mlp") => '-',
                Some("moe") => 'E',
                _ => '?',
            })
            .collect();
        return Some(pattern);
    }
    hf["hybrid_override_pattern"].as_str().map(String::from)
}

/// Precision, vocabulary padding, parallel sizes and the HF source.
fn run_fields(
    hf: &Value,
    source: Option<&str>,
    vocab_divisible_by: u64,
    tp: u64,
    m: &mut Map<String, Value>,
) {
    // Always explicit: some providers (Gemma's) default to bf16.
    let dtype = hf.get("dtype").or_else(|| hf.get("torch_dtype"));
    let d = dtype
        .and_then(Value::as_str)
        .filter(|d| matches!(*d, "bfloat16" | "float16"))
        .unwrap_or("float32");
    m.insert("bf16".into(), (d == "bfloat16").into());
    m.insert("fp16".into(), (d == "float16").into());
    for f in ["params_dtype", "pipeline_dtype"] {
        m.insert(f.into(), callable(&format!("torch.{d}")));
    }
    m.insert(
        "make_vocab_size_divisible_by".into(),
        vocab_divisible_by.into(),
    );
    m.insert("tensor_model_parallel_size".into(), tp.into());
    m.insert("pipeline_model_parallel_size".into(), 1.into());
    if let Some(s) = source {
        m.insert("hf_model_id".into(), s.into());
    }
}

/// The whole `run_config.yaml` for an import.
pub fn run_config(hf: &Value, model: Map<String, Value>, source: Option<&str>) -> Value {
    let mut tokenizer = json!({
        "_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
        "tokenizer_type": "HuggingFaceTokenizer",
    });
    if let Some(s) = source {
        tokenizer["tokenizer_model"] = s.into();
    }
    json!({
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "checkpoint": {
            "_target_": "megatron.bridge.training.config.CheckpointConfig",
            "ckpt_format": "torch_dist",
            "fully_parallel_save": true,
            "save_optim": false,
            "save_rng": false,
            "save_tokenizer_assets": true,
        },
        "model": model,
        "tokenizer": tokenizer,
        "bridgeflow": {"hf_config": hf},
    })
}

/// YAML text of a JSON value, readable by PyYAML (YAML 1.1) and yaml-rust2 (1.2) alike.
pub fn to_yaml(v: &Value, header: &str) -> String {
    let mut s = header.to_string();
    emit(&mut s, v, 0);
    s
}

fn emit(s: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                s.push_str(&format!("{pad}{}:", scalar_text(&Value::String(k.clone()))));
                block(s, x, indent);
            }
        }
        Value::Array(a) => {
            for x in a {
                s.push_str(&format!("{pad}-"));
                block(s, x, indent);
            }
        }
        x => s.push_str(&format!("{pad}{}\n", scalar_text(x))),
    }
}

/// The value after `key:` or `-`: inline when scalar or empty, else an indented block.
fn block(s: &mut String, x: &Value, indent: usize) {
    match x {
        Value::Object(m) if !m.is_empty() => {
            s.push('\n');
            emit(s, x, indent + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            s.push('\n');
            emit(s, x, indent + 2);
        }
        Value::Object(_) => s.push_str(" {}\n"),
        Value::Array(_) => s.push_str(" []\n"),
        _ => s.push_str(&format!(" {}\n", scalar_text(x))),
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => float_text(f),
            _ => n.to_string(),
        },
        Value::String(x) => {
            // Plain only when no YAML reader could take it for anything but this string.
            let plain = !x.is_empty()
                && x.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
                && !matches!(
                    x.to_ascii_lowercase().as_str(),
                    "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
                );
            if plain {
                x.clone()
            } else {
                // A JSON string is a valid YAML double-quoted scalar.
                Value::String(x.clone()).to_string()
            }
        }
        other => other.to_string(),
    }
}

fn float_text(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            ".nan".into()
        } else if f > 0.0 {
            ".inf".into()
        } else {
            "-.inf".into()
        };
    }
    if f.fract() == 0.0 && f.abs() < 1e15 {
        return format!("{f:.1}");
    }
    if (1e-4..1e15).contains(&f.abs()) {
        return format!("{f}");
    }
    // YAML 1.1 readers (PyYAML) need a dot and a signed exponent: 1.0e-06.
    let e = format!("{f:e}");
    let (m, x) = e.split_once('e').unwrap_or((&e, "0"));
    let m = if m.contains('.') {
        m.to_string()
    } else {
        format!("{m}.0")
    };
    let x = if x.starts_with('-') {
        x.to_string()
    } else {
        format!("+{x}")
    };
    format!("{m}e{x}")
}

/// A YAML node as JSON (what the config code works on).
fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => match r.trim_start_matches('+').to_ascii_lowercase().as_str() {
            ".nan" => json!(f64::NAN),
            ".inf" => json!(f64::INFINITY),
            "-.inf" => json!(f64::NEG_INFINITY),
            t => t.parse::<f64>().map(|f| json!(f)).unwrap_or(Value::Null),
        },
        Yaml::Boolean(b) => json!(b),
        Yaml::String(s) => json!(s),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .filter_map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        _ => return None,
                    };
                    Some((key, to_json(v)))
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// The largest YAML file read (Megatron-Bridge's `run_config.yaml` is tens of KiB).
pub const MAX_YAML_BYTES: u64 = 16 << 20;
/// The most nodes a YAML document may have with every alias expanded: an alias repeats its
/// anchor's whole node, so ~400 bytes of nested aliases ("billion laughs") would otherwise
/// expand to gigabytes as the loader copies them.
pub const MAX_YAML_NODES: u64 = 1_000_000;
/// The deepest nesting accepted (the loader and the conversion to JSON recurse).
pub const MAX_YAML_DEPTH: usize = 128;

/// Walks the parser's events of `text` without building anything, counting the nodes the
/// documents would have with every alias expanded (each anchor's size is known when its node
/// ends), and their depth: refuses text beyond [`MAX_YAML_NODES`] or [`MAX_YAML_DEPTH`] before
/// the loader expands a single alias.
fn check_yaml_bounds(text: &str, path: &Path) -> Result<()> {
    use yaml_rust2::parser::{Event, Parser};
    let bad = |what: String| PluginError::format(format!("{}: {what}", path.display()));
    let mut parser = Parser::new_from_str(text);
    // Each anchor's node count and height, with the aliases inside it expanded.
    let mut sizes: std::collections::HashMap<usize, (u64, u64)> = Default::default();
    // Open sequences and mappings: (anchor id, nodes so far themselves included, tallest child).
    let mut open: Vec<(usize, u64, u64)> = Vec::new();
    let mut total = 0u64;
    loop {
        let (ev, _) = parser
            .next_token()
            .map_err(|e| bad(format!("invalid YAML: {e}")))?;
        // A node just completed: its node count and height.
        let done = match ev {
            Event::StreamEnd => break,
            Event::Scalar(_, _, anchor, _) => {
                if anchor > 0 {
                    sizes.insert(anchor, (1, 1));
                }
                Some((1, 1))
            }
            Event::Alias(id) => Some(sizes.get(&id).copied().unwrap_or((1, 1))),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                open.push((anchor, 1, 0));
                if open.len() > MAX_YAML_DEPTH {
                    return Err(bad(format!(
                        "YAML nested deeper than {MAX_YAML_DEPTH} levels; refused"
                    )));
                }
                None
            }
            Event::SequenceEnd | Event::MappingEnd => open.pop().map(|(anchor, n, tallest)| {
                let node = (n, tallest + 1);
                if anchor > 0 {
                    sizes.insert(anchor, node);
                }
                node
            }),
            _ => None,
        };
        let Some((n, height)) = done else { continue };
        // Where it lands, with aliases expanded: as deep as its parents plus its own height
        // (loading and converting a document recurse that deep).
        if open.len() as u64 + height > MAX_YAML_DEPTH as u64 {
            return Err(bad(format!(
                "YAML nested deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded; refused"
            )));
        }
        let count = match open.last_mut() {
            Some((_, c, tallest)) => {
                *tallest = (*tallest).max(height);
                c
            }
            None => &mut total,
        };
        *count = count.saturating_add(n);
        if *count > MAX_YAML_NODES {
            return Err(bad(format!(
                "YAML expands to more than {MAX_YAML_NODES} nodes (aliases repeating \
                 anchors that repeat others: an alias bomb?); refused"
            )));
        }
    }
    Ok(())
}

/// Parses YAML text (the first document) as JSON, within [`MAX_YAML_NODES`] and
/// [`MAX_YAML_DEPTH`].
pub fn parse_yaml(text: &str, path: &Path) -> Result<Value> {
    check_yaml_bounds(text, path)?;
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| PluginError::format(format!("{}: invalid YAML: {e}", path.display())))?;
    Ok(docs.first().map(to_json).unwrap_or(Value::Null))
}

/// Reads and parses a YAML file of at most [`MAX_YAML_BYTES`] (see [`parse_yaml`]).
pub fn read_yaml(path: &Path) -> Result<Value> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
    let mut bytes = Vec::new();
    f.take(MAX_YAML_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| PluginError::io(path, "cannot read", e))?;
    if bytes.len() as u64 > MAX_YAML_BYTES {
        return Err(PluginError::format(format!(
            "{}: larger than {} MiB, more than any run config; refused",
            path.display(),
            MAX_YAML_BYTES >> 20
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| PluginError::format(format!("{}: not UTF-8: {e}", path.display())))?;
    parse_yaml(&text, path)
}

/// An HF config from a checkpoint's `run_config.yaml`: the original one bridgeflow kept, else
/// rebuilt from the model section (Megatron-Bridge's, or an older bridgeflow's flat one).
pub fn hf_config_from_run_config(path: &Path) -> Result<Value> {
    hf_config_from_run_config_with(path, &[])
}

/// [`hf_config_from_run_config`] with model tables besides the built-in families (the
/// mapper's `model_tables`, consulted first).
pub fn hf_config_from_run_config_with(path: &Path, tables: &[Family]) -> Result<Value> {
    let rc = read_yaml(path)?;
    if rc["bridgeflow"]["hf_config"].is_object() {
        return Ok(rc["bridgeflow"]["hf_config"].clone());
    }
    let model = rc
        .get("model")
        .filter(|m| m.is_object())
        .ok_or_else(|| PluginError::format(format!("{}: no model section", path.display())))?;
    hf_config_from_model(model, path, tables)
}

/// The HF config a Megatron model section describes: its architecture (named, or as its
/// family's table tells it: [`crate::families::architecture_of`]) and `model_type`, the
/// family's fields back under their HF keys, RoPE, the window, the family's quirks.
fn hf_config_from_model(model: &Value, path: &Path, tables: &[Family]) -> Result<Value> {
    let need = |k: &str| {
        model
            .get(k)
            .filter(|v| !v.is_null())
            .cloned()
            .ok_or_else(|| PluginError::format(format!("{}: model.{k} is missing", path.display())))
    };
    let arch = match model["hf_architecture"].as_str() {
        Some(a) => a.to_string(),
        None => crate::families::architecture_of(model, tables).ok_or_else(|| {
            PluginError::format(format!(
                "{}: the model section names no hf_architecture and no model table recognises it",
                path.display()
            ))
        })?,
    };
    let family = crate::families::find(&arch, tables)?;
    // A TOML table must say it: no family's model_type is another's.
    let model_type = family.model_type(&arch).ok_or_else(|| {
        PluginError::config(format!(
            "{}: the {} model table gives no model_type for {arch}, which config.json needs (add model_type = \"...\" to the table)",
            path.display(),
            family.name
        ))
    })?;
    let mut hf = Map::new();
    hf.insert("architectures".into(), json!([arch]));
    hf.insert("model_type".into(), model_type.into());
    let mut written = std::collections::HashSet::new();
    for (h, meg) in field_pairs(&family) {
        // Several HF keys may name one field (num_local_experts, num_experts): the family's
        // first wins, as the HF side of that family spells it.
        // (A nested HF key such as a VLM's mrope section is not rebuilt here.)
        if let Some(v) = model.get(&meg).filter(|v| !v.is_null() && !h.contains('.')) {
            if written.insert(meg.clone()) {
                hf.entry(h).or_insert(v.clone());
            }
        }
    }
    for k in [
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "layernorm_epsilon",
        "vocab_size",
    ] {
        need(k)?;
    }
    let theta = need("rotary_base")?;
    let mut rope = rope_from_model(model, &theta);
    if let Some(w) = window_from_model(model) {
        hf.insert("sliding_window".into(), w);
    }
    for q in &family.quirks {
        q.to_hf(model, &mut hf);
    }
    if let Some([local, full]) = theta.as_array().map(Vec::as_slice) {
        // (local, global) bases: per layer type, as transformers 5 writes them.
        let per = |t: &Value| json!({"rope_theta": t, "rope_type": "default"});
        rope = json!({"full_attention": per(full), "sliding_attention": per(local)});
    } else {
        hf.insert("rope_theta".into(), theta);
    }
    hf.insert("rope_parameters".into(), rope);
    let act = model["activation_func"]["_target_"].as_str().unwrap_or("");
    let act = if act.contains("gelu") {
        "gelu_pytorch_tanh"
    } else {
        "silu"
    };
    hf.insert("hidden_act".into(), act.into());
    hf.insert("dtype".into(), dtype_from_model(model).into());
    hf.entry("tie_word_embeddings").or_insert(false.into());
    hf.entry("attention_bias").or_insert(false.into());
    Ok(Value::Object(hf))
}

/// The HF dtype of a model section: `hf_dtype`, else from its precision flags.
fn dtype_from_model(model: &Value) -> String {
    if let Some(d) = model["hf_dtype"].as_str() {
        return d.to_string();
    }
    let flag = |k: &str| model[k].as_bool().unwrap_or(false);
    let params = model["params_dtype"]["_target_"].as_str().unwrap_or("");
    if flag("bf16") || params == "torch.bfloat16" {
        "bfloat16".into()
    } else if flag("fp16") || params == "torch.float16" {
        "float16".into()
    } else {
        "float32".into()
    }
}

/// HF `rope_parameters` for a model section's RoPE fields (the base `theta`; Megatron-Core's
/// fixed llama3 parameters, linear interpolation, YaRN).
fn rope_from_model(model: &Value, theta: &Value) -> Value {
    let flag = |k: &str| model[k].as_bool().unwrap_or(false);
    if flag("rope_scaling") {
        // Megatron-Core's fixed llama3 parameters, as Bridge exports them.
        return json!({
            "rope_theta": theta, "rope_type": "llama3",
            "factor": model["rope_scaling_factor"].as_f64().unwrap_or(8.0),
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        });
    }
    if let Some(f) = model["seq_len_interpolation_factor"].as_f64() {
        return json!({"rope_theta": theta, "rope_type": "linear", "factor": f});
    }
    // YaRN: GPT providers prefix the fields; MLA ones scale only when the factor is not 1.
    let yarn = model["position_embedding_type"] == "yarn";
    let mla = flag("multi_latent_attention")
        && model["rotary_scaling_factor"]
            .as_f64()
            .is_some_and(|f| f != 1.0);
    let mut rope = json!({"rope_theta": theta, "rope_type": "default"});
    if yarn || mla {
        rope = json!({"rope_theta": theta, "rope_type": "yarn"});
        for (h, meg) in YARN {
            let field = if yarn {
                format!("yarn_{meg}")
            } else {
                meg.to_string()
            };
            if let Some(v) = model.get(&field).filter(|v| !v.is_null()) {
                rope[*h] = v.clone();
            }
        }
    }
    rope
}

/// HF `sliding_window` for a model section's `window_size`: [W-1, 0], or W itself.
fn window_from_model(model: &Value) -> Option<Value> {
    match &model["window_size"] {
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|w| (w + 1).into()),
        Value::Number(w) => Some(w.clone().into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> Family {
        crate::families::find("LlamaForCausalLM", &[]).unwrap()
    }

    fn fixture_config(name: &str) -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/shared/hf")
            .join(name)
            .join("config.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn nesting_is_bounded_with_aliases_expanded() {
        // Each anchor nests 100 deep around an alias of the one before: the text stays under
        // the depth limit, the expanded document does not.
        let mut text = String::from("a0: &a0 1\n");
        for i in 1..4 {
            let open = "[".repeat(100);
            let close = "]".repeat(100);
            text.push_str(&format!("a{i}: &a{i} {open}*a{}{close}\n", i - 1));
        }
        let e = parse_yaml(&text, Path::new("deep.yaml")).unwrap_err();
        assert!(
            e.message.contains("deep.yaml") && e.message.contains("aliases are expanded"),
            "{}",
            e.message
        );
        // One such level is fine.
        parse_yaml("a0: &a0 1\na1: [[[[*a0]]]]\n", Path::new("ok.yaml")).unwrap();
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_expands() {
        // Nine levels of ten aliases each: 10^9 nodes from ~400 bytes.
        let mut text = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let refs = vec![format!("*{prev}"); 10].join(",");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        text.push_str("model: *i\n");
        assert!(text.len() < 600, "{}", text.len());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run_config.yaml");
        std::fs::write(&p, &text).unwrap();
        let t0 = std::time::Instant::now();
        let e = hf_config_from_run_config(&p).unwrap_err();
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        assert!(e.message.contains("alias bomb"), "{}", e.message);
        assert!(
            e.message.contains(&p.display().to_string()),
            "{}",
            e.message
        );
        // A few aliases well within bounds still load, expanded.
        let ok = "base: &b {x: 1, y: [1, 2]}\nmodel: {one: *b, two: *b}\n";
        let v = parse_yaml(ok, Path::new("ok.yaml")).unwrap();
        assert_eq!(v["model"]["two"]["y"], json!([1, 2]));
    }

    #[test]
    fn oversized_and_deep_yaml_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run_config.yaml");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(MAX_YAML_BYTES + 1).unwrap();
        let e = hf_config_from_run_config(&p).unwrap_err();
        assert!(e.message.contains("larger than 16 MiB"), "{}", e.message);
        // Block nesting (flow nesting stops at the scanner's own limit of 255).
        let deep: String = (0..2000)
            .map(|i| format!("{}a:\n", " ".repeat(i)))
            .collect();
        let e = parse_yaml(&deep, Path::new("deep.yaml")).unwrap_err();
        assert!(
            e.message.contains("deep.yaml: YAML nested deeper"),
            "{}",
            e.message
        );
        let flow = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        let e = parse_yaml(&flow, Path::new("flow.yaml")).unwrap_err();
        assert!(e.message.starts_with("flow.yaml: "), "{}", e.message);
    }

    #[test]
    fn yaml_round_trips_hf_configs_exactly() {
        let mut cfg = fixture_config("llama");
        cfg["odd"] = json!({"s": "true", "t": "1e-05", "path": "/a b:c", "nested": [1, {"x": []}],
                            "tiny": 1e-300, "big": 3e20, "neg": -2.5e-7, "empty": {}});
        let text = to_yaml(&json!({ "c": cfg }), "# test\n");
        let back = parse_yaml(&text, Path::new("t.yaml")).unwrap();
        assert_eq!(back["c"], cfg, "{text}");
    }

    #[test]
    fn bridge_model_section_rebuilds_the_hf_config() {
        // Without the kept original, the model section alone gives back every field that
        // matters to the mapper and to transformers.
        for name in ["llama", "llama_bf16"] {
            let hf = fixture_config(name);
            let model = model_section(&llama(), &hf, Some("/src"), 128, 1).unwrap();
            assert_eq!(
                model["_target_"],
                "megatron.bridge.models.gpt_provider.GPTModelProvider"
            );
            let rc = json!({ "model": model });
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("run_config.yaml");
            std::fs::write(&p, to_yaml(&rc, "")).unwrap();
            let back = hf_config_from_run_config(&p).unwrap();
            let keys = FIELDS.iter().map(|(h, _)| *h);
            for k in keys.chain(["architectures", "dtype"]) {
                assert_eq!(back[k], hf[k], "{name}: {k}");
            }
            assert_eq!(back["rope_parameters"], hf["rope_parameters"], "{name}");
        }
    }

    #[test]
    fn a_toml_tables_model_type_is_written_on_export_or_its_lack_named() {
        // Gemma 2's table as a user's, under its own architecture and provider.
        let text = include_str!("families/gemma2.toml")
            .replace(r#"["Gemma2ForCausalLM"]"#, r#"["MyGemmaForCausalLM"]"#)
            .replace("gemma2_provider.Gemma2ModelProvider", "my.MyGemmaProvider")
            .replace(r#"model_type = "gemma2""#, r#"model_type = "my_gemma""#);
        let table = Family::from_toml(&text, Path::new("my.toml")).unwrap();
        let mut hf = fixture_config("gemma2");
        hf["architectures"] = json!(["MyGemmaForCausalLM"]);
        let model = model_section(&table, &hf, None, 128, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run_config.yaml");
        std::fs::write(&p, to_yaml(&json!({ "model": model }), "")).unwrap();
        let back = hf_config_from_run_config_with(&p, std::slice::from_ref(&table)).unwrap();
        assert_eq!(back["architectures"], json!(["MyGemmaForCausalLM"]));
        assert_eq!(back["model_type"], "my_gemma");
        assert_eq!(back["query_pre_attn_scalar"], hf["query_pre_attn_scalar"]);
        // Without the table its provider is none of the built-in ones': the guesses take it
        // for Llama. A table without model_type is named.
        let guessed = hf_config_from_run_config(&p).unwrap();
        assert_eq!(guessed["model_type"], "llama");
        let bare = Family {
            model_type: None,
            ..table
        };
        let e = hf_config_from_run_config_with(&p, &[bare]).unwrap_err();
        assert!(
            e.message
                .contains("gemma2 model table gives no model_type for MyGemmaForCausalLM"),
            "{}",
            e.message
        );
    }

    #[test]
    fn rope_scaling_both_ways_and_unknown_kinds_refused() {
        let mut hf = fixture_config("llama");
        hf["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let m = model_section(&llama(), &hf, None, 128, 1).unwrap();
        assert_eq!(
            (m["rope_scaling"].clone(), m["rope_scaling_factor"].clone()),
            (json!(true), json!(32.0))
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run_config.yaml");
        std::fs::write(&p, to_yaml(&json!({ "model": m }), "")).unwrap();
        assert_eq!(
            hf_config_from_run_config(&p).unwrap()["rope_parameters"],
            hf["rope_parameters"]
        );
        // YaRN: GPT providers take yarn_-prefixed fields; back again.
        hf["rope_parameters"] = json!({"rope_theta": 150000.0, "rope_type": "yarn", "factor": 32.0,
            "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0});
        let m = model_section(&llama(), &hf, None, 128, 1).unwrap();
        assert_eq!(m["position_embedding_type"], "yarn");
        assert_eq!(m["yarn_rotary_scaling_factor"], 32.0);
        std::fs::write(&p, to_yaml(&json!({ "model": m }), "")).unwrap();
        assert_eq!(
            hf_config_from_run_config(&p).unwrap()["rope_parameters"],
            hf["rope_parameters"]
        );
        hf["rope_parameters"]["rope_type"] = "dynamic".into();
        let e = model_section(&llama(), &hf, None, 128, 1).unwrap_err();
        assert!(e.message.contains("dynamic"), "{}", e.message);
    }
}

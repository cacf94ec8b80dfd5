//! The model's configuration both ways: HF `config.json` → the Megatron model fields a
//! checkpoint carries (written into its `run_config.yaml` `model:` section, with
//! Megatron-Bridge's field names), and those fields → an HF `config.json`, so that a checkpoint
//! exports with nothing but itself (ours, or one Megatron-Bridge wrote).

use bridgeflow_sdk::{PluginError, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use yaml_rust2::{Yaml, YamlLoader};

/// Megatron model fields from an HF config (Llama family).
pub fn megatron_fields(hf: &Value) -> Map<String, Value> {
    let heads = hf["num_attention_heads"].as_u64().unwrap_or(1);
    let hidden = hf["hidden_size"].as_u64().unwrap_or(0);
    let theta = hf["rope_parameters"]["rope_theta"]
        .as_f64()
        .or_else(|| hf["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let arch = hf["architectures"][0]
        .as_str()
        .unwrap_or("LlamaForCausalLM");
    let mut m = Map::new();
    m.insert("num_layers".into(), hf["num_hidden_layers"].clone());
    m.insert("hidden_size".into(), hidden.into());
    m.insert("ffn_hidden_size".into(), hf["intermediate_size"].clone());
    m.insert("num_attention_heads".into(), heads.into());
    m.insert(
        "num_query_groups".into(),
        hf.get("num_key_value_heads")
            .cloned()
            .unwrap_or(heads.into()),
    );
    m.insert(
        "kv_channels".into(),
        hf.get("head_dim")
            .cloned()
            .unwrap_or((hidden / heads).into()),
    );
    m.insert("layernorm_epsilon".into(), hf["rms_norm_eps"].clone());
    m.insert("rotary_base".into(), theta.into());
    m.insert("vocab_size".into(), hf["vocab_size"].clone());
    m.insert("seq_length".into(), hf["max_position_embeddings"].clone());
    m.insert(
        "share_embeddings_and_output_weights".into(),
        hf["tie_word_embeddings"].as_bool().unwrap_or(false).into(),
    );
    m.insert(
        "add_qkv_bias".into(),
        (hf["attention_bias"].as_bool().unwrap_or(false) || arch == "Qwen2ForCausalLM").into(),
    );
    m.insert("qk_layernorm".into(), (arch == "Qwen3ForCausalLM").into());
    m.insert("normalization".into(), "RMSNorm".into());
    m.insert("gated_linear_unit".into(), true.into());
    m.insert("position_embedding_type".into(), "rope".into());
    m.insert("hf_architecture".into(), arch.into());
    if let Some(d) = hf.get("dtype").or_else(|| hf.get("torch_dtype")) {
        m.insert("hf_dtype".into(), d.clone());
    }
    m
}

/// The `run_config.yaml` bridgeflow writes: the model section only.
pub fn run_config_yaml(fields: &Map<String, Value>) -> String {
    let mut s = String::from(
        "# Written by bridgeflow: the model section of a Megatron-Bridge run config, with its field\n# names; bridgeflow reads it back to export without the original HF config.\nmodel:\n",
    );
    for (k, v) in fields {
        let val = match v {
            Value::String(x) => x.clone(),
            Value::Null => "null".into(),
            Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap();
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    format!("{f:.1}")
                } else if (1e-4..1e15).contains(&f.abs()) {
                    format!("{f}")
                } else {
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
            }
            other => other.to_string(),
        };
        s.push_str(&format!("  {k}: {val}\n"));
    }
    s
}

fn scalar(y: &Yaml) -> Value {
    match y {
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => r.parse::<f64>().map(|f| json!(f)).unwrap_or(Value::Null),
        Yaml::Boolean(b) => json!(b),
        Yaml::String(s) => json!(s),
        _ => Value::Null,
    }
}

/// An HF config from a checkpoint's `run_config.yaml` (ours or Megatron-Bridge's).
pub fn hf_config_from_run_config(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
    let docs = YamlLoader::load_from_str(&text)
        .map_err(|e| PluginError::format(format!("{}: invalid YAML: {e}", path.display())))?;
    let model = docs
        .first()
        .map(|d| &d["model"])
        .filter(|m| !m.is_badvalue())
        .ok_or_else(|| PluginError::format(format!("{}: no model section", path.display())))?;
    let f = |k: &str| scalar(&model[k]);
    let need = |k: &str| {
        let v = f(k);
        if v.is_null() {
            Err(PluginError::format(format!(
                "{}: model.{k} is missing",
                path.display()
            )))
        } else {
            Ok(v)
        }
    };
    let qk_norm = f("qk_layernorm").as_bool().unwrap_or(false);
    let qkv_bias = f("add_qkv_bias").as_bool().unwrap_or(false);
    let arch = match f("hf_architecture").as_str() {
        Some(a) => a.to_string(),
        None if qk_norm => "Qwen3ForCausalLM".into(),
        None if qkv_bias => "Qwen2ForCausalLM".into(),
        None => "LlamaForCausalLM".into(),
    };
    let model_type = match arch.as_str() {
        "Qwen3ForCausalLM" => "qwen3",
        "Qwen2ForCausalLM" => "qwen2",
        "MistralForCausalLM" => "mistral",
        _ => "llama",
    };
    let dtype = f("hf_dtype")
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if model["bf16"].as_bool() == Some(true) {
                "bfloat16".into()
            } else if model["fp16"].as_bool() == Some(true) {
                "float16".into()
            } else {
                "float32".into()
            }
        });
    let theta = need("rotary_base")?;
    Ok(json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": need("hidden_size")?,
        "intermediate_size": need("ffn_hidden_size")?,
        "num_hidden_layers": need("num_layers")?,
        "num_attention_heads": need("num_attention_heads")?,
        "num_key_value_heads": need("num_query_groups")?,
        "head_dim": need("kv_channels")?,
        "rms_norm_eps": need("layernorm_epsilon")?,
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "vocab_size": need("vocab_size")?,
        "max_position_embeddings": f("seq_length"),
        "tie_word_embeddings": f("share_embeddings_and_output_weights").as_bool().unwrap_or(false),
        "attention_bias": qkv_bias,
        "hidden_act": "silu",
        "dtype": dtype,
    }))
}

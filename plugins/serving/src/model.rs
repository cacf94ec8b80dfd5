//! The HF model an exporter serves: the fields of `config.json` the tables need, typed, each
//! checked (a config that does not fit the weights is refused by [`crate::place`] later).

use bridgeflow_sdk::{attrs, DType, PluginError, Result, StreamPlan};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct HfModel {
    /// `architectures[0]`.
    pub architecture: String,
    pub model_type: String,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    pub intermediate: u64,
    /// Routed experts (0: dense).
    pub experts: u64,
    pub top_k: u64,
    pub moe_intermediate: u64,
    pub shared_expert_intermediate: u64,
    pub tied: bool,
    /// The weights' dtype (`torch_dtype` / `dtype`), if the config says.
    pub dtype: Option<DType>,
    /// The whole config, for keys a table copies verbatim.
    pub raw: Map<String, Value>,
}

/// Where the config comes from: the plan's (rebuilt from a Megatron checkpoint), a file given
/// by the user, or the input folder's `config.json`.
pub fn load_config(
    plan: &StreamPlan,
    given: Option<&Path>,
) -> Result<(Map<String, Value>, Option<PathBuf>)> {
    if let Some(path) = given {
        return Ok((read(path)?, Some(path.to_path_buf())));
    }
    if let Some(cfg) = plan.try_get(attrs::HF_CONFIG)? {
        return Ok((cfg, None));
    }
    let dir = plan.try_get(attrs::SOURCE_DIR)?.ok_or_else(|| {
        PluginError::config("the input names no HF config.json (set hf_config = \"…/config.json\")")
    })?;
    let path = dir.join("config.json");
    Ok((read(&path)?, Some(path)))
}

fn read(path: &Path) -> Result<Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
    serde_json::from_str(&text)
        .map_err(|e| PluginError::config(format!("{}: not a JSON object: {e}", path.display())))
}

fn count(cfg: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            // Sizes beyond 2^40 are no model's; refusing them keeps every product in range.
            Some(n) if n <= 1 << 40 => Ok(Some(n)),
            _ => Err(PluginError::config(format!(
                "config.json: {key} = {v} is not a size"
            ))),
        },
    }
}

fn need(cfg: &Map<String, Value>, key: &str) -> Result<u64> {
    match count(cfg, key)? {
        Some(n) if n > 0 => Ok(n),
        Some(_) => Err(PluginError::config(format!("config.json: {key} is 0"))),
        None => Err(PluginError::config(format!("config.json has no {key}"))),
    }
}

impl HfModel {
    pub fn from_config(raw: Map<String, Value>) -> Result<HfModel> {
        let architecture = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| PluginError::config("config.json has no architectures"))?
            .to_string();
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let hidden = need(&raw, "hidden_size")?;
        let heads = need(&raw, "num_attention_heads")?;
        let kv_heads = count(&raw, "num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match count(&raw, "head_dim")? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(PluginError::config(format!(
                    "config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and there is no head_dim"
                )))
            }
        };
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(PluginError::config(format!(
                "config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let experts = count(&raw, "num_local_experts")?
            .or(count(&raw, "num_experts")?)
            .or(count(&raw, "n_routed_experts")?)
            .unwrap_or(0);
        let dtype = ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| raw.get(*k).and_then(Value::as_str))
            .and_then(DType::parse);
        Ok(HfModel {
            architecture,
            model_type,
            hidden,
            layers: need(&raw, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: need(&raw, "vocab_size")?,
            intermediate: count(&raw, "intermediate_size")?.unwrap_or(0),
            experts,
            top_k: count(&raw, "num_experts_per_tok")?.unwrap_or(0),
            moe_intermediate: count(&raw, "moe_intermediate_size")?.unwrap_or(0),
            shared_expert_intermediate: count(&raw, "shared_expert_intermediate_size")?
                .unwrap_or(0),
            tied: raw
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            dtype,
            raw,
        })
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.raw.get(key).and_then(Value::as_f64)
    }
}

/// A parallel degree: at least 1, at most 65536.
pub fn degree(v: u64, what: &str) -> Result<u64> {
    match v {
        1..=65536 => Ok(v),
        _ => Err(PluginError::config(format!(
            "{what} = {v}: expected 1 to 65536"
        ))),
    }
}

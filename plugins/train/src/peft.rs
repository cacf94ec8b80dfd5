//! `peft-export`: LoRA adapters (Megatron-Bridge's names, the trainer's `adapters` port) as a
//! Hugging Face PEFT adapter — `adapter_model.safetensors` tensors and `adapter_config.json` —
//! as Megatron-Bridge's `export_adapter_ckpt` writes it: `adapter.linear_in` → `lora_A`,
//! `linear_out` → `lora_B`, under `base_model.model.`; a fused layer's A copied to each of its
//! projections (q, k, v; gate, up) and its B split like the base weight (per query group q/k/v
//! rows; `[gate; up]`). PEFT then computes `W_q x + (alpha/r) · B_q · A · x`, the fused
//! adapter's output exactly. DoRA's magnitude goes out as `lora_magnitude_vector`, split like
//! B's rows (its norm is per row, so the split is exact) — the tensor Bridge 0.6.2 leaves out,
//! which makes PEFT re-initialise it.

use crate::lora::LORA;
use crate::model::GptConfig;
use bridgeflow_sdk::{
    attrs, schemars, serde, Buffer, Emitter, Item, PluginError, Result, StreamPlan, Tensor,
    TensorInfo, Transform,
};
use serde_json::{json, Map, Value};

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct PeftConfig {
    /// `base_model_name_or_path` in `adapter_config.json` (default: the base model's folder).
    #[serde(default)]
    pub base_model: Option<String>,
}

pub struct PeftExport {
    cfg: PeftConfig,
    model: Option<GptConfig>,
}

/// A Megatron adapter tensor's name, taken apart.
#[derive(Debug, PartialEq)]
struct AdapterName<'a> {
    layer: u64,
    /// `self_attention.linear_qkv`, …
    module: &'a str,
    /// Canonical LoRA's per-projection adapter (`adapter_q`, …, `adapter_up`).
    key: Option<&'a str>,
    /// `in` = A, `out` = B, `magnitude` = DoRA's m.
    part: &'a str,
}

fn parse(name: &str) -> Option<AdapterName<'_>> {
    let rest = name.strip_prefix("decoder.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let (module, tail) = rest.split_once(".adapter.")?;
    let (key, tail) = match tail.strip_prefix("adapter_") {
        Some(_) => {
            let (k, t) = tail.split_once('.')?;
            (Some(k), t)
        }
        None => (None, tail),
    };
    let part = match tail {
        "weight_magnitude" => "magnitude",
        t => t.strip_prefix("linear_")?.strip_suffix(".weight")?,
    };
    Some(AdapterName {
        layer: l.parse().ok()?,
        module,
        key,
        part,
    })
}

/// The HF projections an adapter becomes: the fused layer's, or canonical LoRA's one.
fn projections(module: &str, key: Option<&str>) -> Option<&'static [&'static str]> {
    Some(match (module, key) {
        ("self_attention.linear_qkv", None) => {
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        }
        ("self_attention.linear_qkv", Some("adapter_q")) => &["self_attn.q_proj"],
        ("self_attention.linear_qkv", Some("adapter_k")) => &["self_attn.k_proj"],
        ("self_attention.linear_qkv", Some("adapter_v")) => &["self_attn.v_proj"],
        ("self_attention.linear_proj", None) => &["self_attn.o_proj"],
        ("mlp.linear_fc1", None) => &["mlp.gate_proj", "mlp.up_proj"],
        ("mlp.linear_fc1", Some("adapter_gate")) => &["mlp.gate_proj"],
        ("mlp.linear_fc1", Some("adapter_up")) => &["mlp.up_proj"],
        ("mlp.linear_fc2", None) => &["mlp.down_proj"],
        _ => return None,
    })
}

fn peft_name(l: u64, proj: &str, ab: &str) -> String {
    match ab {
        "in" => format!("base_model.model.model.layers.{l}.{proj}.lora_A.weight"),
        "out" => format!("base_model.model.model.layers.{l}.{proj}.lora_B.weight"),
        _ => format!("base_model.model.model.layers.{l}.{proj}.lora_magnitude_vector"),
    }
}

impl PeftExport {
    fn model(&self) -> Result<&GptConfig> {
        self.model
            .as_ref()
            .ok_or_else(|| PluginError::internal("process before plan"))
    }

    /// Each projection's rows of an adapter tensor: A (`in`) whole to every projection; B
    /// (`out`) and DoRA's magnitude (one per B row) split like the base weight's rows — unless
    /// the adapter is canonical LoRA's, one projection's already.
    fn parts(&self, n: &AdapterName, shape: &[u64]) -> Result<Vec<Vec<std::ops::Range<u64>>>> {
        let (module, ab) = (n.module, n.part);
        let projs = projections(module, n.key).map_or(1, |p| p.len());
        let want = if ab == "magnitude" { 1 } else { 2 };
        if shape.len() != want {
            return Err(PluginError::shape(format!(
                "{module} adapter part '{ab}' has shape {shape:?}; {want} dimensions expected"
            )));
        }
        Ok(match (ab, n.key) {
            ("in", _) | (_, Some(_)) => vec![vec![0..shape[0]]; projs],
            _ => self.b_rows(module, shape[0])?,
        })
    }

    /// Each projection's B rows of a fused B `[rows, r]`: q/k/v per query group, or
    /// `[gate; up]` halves, as row lists.
    fn b_rows(&self, module: &str, rows: u64) -> Result<Vec<Vec<std::ops::Range<u64>>>> {
        let m = self.model()?;
        Ok(match module {
            "self_attention.linear_qkv" => {
                let (g, d) = (m.num_query_groups as u64, m.kv_channels as u64);
                let hpg = (m.num_attention_heads / m.num_query_groups) as u64;
                let per = (hpg + 2) * d;
                if rows != g * per {
                    return Err(PluginError::shape(format!(
                        "linear_qkv's B has {rows} rows; {} expected",
                        g * per
                    )));
                }
                let part =
                    |off: u64, n: u64| (0..g).map(|i| i * per + off..i * per + off + n).collect();
                vec![part(0, hpg * d), part(hpg * d, d), part((hpg + 1) * d, d)]
            }
            "mlp.linear_fc1" => vec![vec![0..rows / 2], vec![rows / 2..rows]],
            _ => vec![vec![0..rows]],
        })
    }
}

impl Transform for PeftExport {
    type Config = PeftConfig;
    const DESCRIPTION: &'static str =
        "LoRA adapters (Megatron-Bridge names) -> a Hugging Face PEFT adapter (lora_A/lora_B per projection, adapter_config.json)";

    fn new(cfg: PeftConfig) -> Result<Self> {
        Ok(PeftExport { cfg, model: None })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let input = &inputs[0];
        let megatron = input.try_get(attrs::MEGATRON_MODEL)?.ok_or_else(|| {
            PluginError::config(
                "the adapters carry no model config (feed them from the trainer's adapters port)",
            )
        })?;
        let lora = input.try_get(LORA)?.ok_or_else(|| {
            PluginError::config(
                "the stream carries no LoRA settings (the trainer's adapters port sets them)",
            )
        })?;
        self.model = Some(GptConfig::from_megatron(&megatron)?);
        let mut out = Vec::new();
        let mut targets = std::collections::BTreeSet::new();
        for t in input.whole_tensors() {
            let bad = || {
                PluginError::shape(format!(
                    "'{}' is not a LoRA adapter this export knows",
                    t.name()
                ))
            };
            let n = parse(t.name()).ok_or_else(bad)?;
            let projs = projections(n.module, n.key).ok_or_else(bad)?;
            for (proj, part) in projs.iter().zip(self.parts(&n, &t.shape)?) {
                let rows: u64 = part.iter().map(|p| p.end - p.start).sum();
                let shape: Vec<u64> = std::iter::once(rows)
                    .chain(t.shape[1..].iter().copied())
                    .collect();
                out.push(TensorInfo::new(
                    peft_name(n.layer, proj, n.part),
                    t.dtype,
                    &shape,
                ));
                targets.insert(proj.rsplit('.').next().unwrap_or(proj).to_string());
            }
        }
        let base = self.cfg.base_model.clone().or_else(|| {
            input
                .get(attrs::SOURCE_DIR)
                .map(|d| d.display().to_string())
        });
        let config = json!({
            "peft_type": "LORA", "auto_mapping": null, "base_model_name_or_path": base,
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
            "init_lora_weights": true, "lora_alpha": lora.get("alpha"), "lora_dropout": 0.0,
            "modules_to_save": null, "r": lora.get("dim"), "rank_pattern": {}, "alpha_pattern": {},
            "target_modules": targets, "task_type": "CAUSAL_LM",
            "use_dora": lora.get("dora").and_then(Value::as_bool).unwrap_or(false), "use_rslora": false,
        });
        let mut plan = StreamPlan::new(out);
        plan.set(
            attrs::EXTRA_FILES,
            Map::from_iter([("adapter_config.json".to_string(), config)]),
        );
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        let n = parse(t.name())
            .ok_or_else(|| PluginError::shape(format!("'{}': not an adapter", t.name())))?;
        let projs = projections(n.module, n.key)
            .ok_or_else(|| PluginError::shape(format!("'{}': not an adapter", t.name())))?;
        let inner = &t.info.shape[1..];
        let row = (inner.iter().product::<u64>() * t.info.dtype.size() as u64) as usize;
        for (proj, part) in projs.iter().zip(self.parts(&n, &t.info.shape)?) {
            let mut bytes = Vec::new();
            for p in &part {
                bytes.extend_from_slice(&t.bytes()[p.start as usize * row..p.end as usize * row]);
            }
            let rows = (bytes.len() / row) as u64;
            let shape: Vec<u64> = std::iter::once(rows).chain(inner.iter().copied()).collect();
            let info = TensorInfo::new(peft_name(n.layer, proj, n.part), t.info.dtype, &shape);
            out.tensor(Tensor::new(info, Buffer::from_vec(bytes))?)?;
        }
        Ok(())
    }
}

/// What `target_modules` an adapter_config lists, for tests.
pub fn target_modules(config: &Value) -> Vec<String> {
    config["target_modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_like_bridge() {
        assert_eq!(
            parse("decoder.layers.3.self_attention.linear_qkv.adapter.linear_out.weight"),
            Some(AdapterName {
                layer: 3,
                module: "self_attention.linear_qkv",
                key: None,
                part: "out"
            })
        );
        assert_eq!(
            parse("decoder.layers.0.mlp.linear_fc1.adapter.adapter_up.linear_in.weight"),
            Some(AdapterName {
                layer: 0,
                module: "mlp.linear_fc1",
                key: Some("adapter_up"),
                part: "in"
            })
        );
        assert_eq!(
            parse("decoder.layers.1.mlp.linear_fc2.adapter.weight_magnitude").map(|n| n.part),
            Some("magnitude")
        );
        assert_eq!(
            peft_name(3, "self_attn.k_proj", "in"),
            "base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight"
        );
        let e = PeftExport {
            cfg: PeftConfig { base_model: None },
            model: Some(GptConfig {
                num_layers: 1,
                hidden_size: 8,
                ffn_hidden_size: 4,
                num_attention_heads: 4,
                num_query_groups: 2,
                kv_channels: 1,
                layernorm_epsilon: 1e-6,
                rotary_base: 1e4,
                vocab_size: 8,
                tied: false,
                qkv_bias: false,
                qk_layernorm: false,
            }),
        };
        // 2 groups of [2 q heads, k, v] (head_dim 1): q rows 0,1,4,5; k 2,6; v 3,7.
        let parts = e.b_rows("self_attention.linear_qkv", 8).unwrap();
        assert_eq!(parts[0], [0..2, 4..6]);
        assert_eq!(parts[1], [2..3, 6..7]);
        assert_eq!(parts[2], [3..4, 7..8]);
        assert!(e.b_rows("self_attention.linear_qkv", 9).is_err());
    }
}

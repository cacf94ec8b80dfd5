//! `peft-export`: LoRA adapters (Megatron-Bridge's names, the trainer's `adapters` port) as a
//! Hugging Face PEFT adapter — `adapter_model.safetensors` tensors and `adapter_config.json` —
//! as Megatron-Bridge's `export_adapter_ckpt` writes it: `adapter.linear_in` → `lora_A`,
//! `linear_out` → `lora_B`, under `base_model.model.`; a fused layer's A copied to each of its
//! projections (q, k, v; gate, up) and its B split like the base weight (per query group q/k/v
//! rows; `[gate; up]`). PEFT then computes `W_q x + (alpha/r) · B_q · A · x`, the fused
//! adapter's output exactly. DoRA's magnitude goes out as `lora_magnitude_vector`, split like
//! B's rows (its norm is per row, so the split is exact) — the tensor Bridge 0.6.2 leaves out,
//! which makes PEFT re-initialise it.

use crate::config::LoraConfig;
use crate::lora::{Part, LORA};
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

/// The HF projections an adapter becomes, and the rows of the adapter's B each takes: the
/// fused layer's (q, k, v per query group; `[gate; up]`), or canonical LoRA's one, whole.
fn projections(module: &str, key: Option<&str>) -> Option<&'static [(&'static str, Part)]> {
    use Part::*;
    Some(match (module, key) {
        ("self_attention.linear_qkv", None) => &[
            ("self_attn.q_proj", Q),
            ("self_attn.k_proj", K),
            ("self_attn.v_proj", V),
        ],
        ("self_attention.linear_qkv", Some("adapter_q")) => &[("self_attn.q_proj", All)],
        ("self_attention.linear_qkv", Some("adapter_k")) => &[("self_attn.k_proj", All)],
        ("self_attention.linear_qkv", Some("adapter_v")) => &[("self_attn.v_proj", All)],
        ("self_attention.linear_proj", None) => &[("self_attn.o_proj", All)],
        ("mlp.linear_fc1", None) => &[("mlp.gate_proj", Gate), ("mlp.up_proj", Up)],
        ("mlp.linear_fc1", Some("adapter_gate")) => &[("mlp.gate_proj", All)],
        ("mlp.linear_fc1", Some("adapter_up")) => &[("mlp.up_proj", All)],
        ("mlp.linear_fc2", None) => &[("mlp.down_proj", All)],
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
    /// (`out`) and DoRA's magnitude (one per B row) split like the base weight's rows.
    fn parts(&self, n: &AdapterName, shape: &[u64]) -> Result<Vec<Vec<std::ops::Range<u64>>>> {
        let (module, ab) = (n.module, n.part);
        let projs = projections(module, n.key).unwrap_or(&[]);
        let want = if ab == "magnitude" { 1 } else { 2 };
        if shape.len() != want {
            return Err(PluginError::shape(format!(
                "{module} adapter part '{ab}' has shape {shape:?}; {want} dimensions expected"
            )));
        }
        if ab == "in" {
            return Ok(vec![vec![0..shape[0]]; projs.len()]);
        }
        let rows = shape[0] as usize;
        let parts: Vec<Vec<std::ops::Range<u64>>> = projs
            .iter()
            .map(|(_, part)| {
                part.rows(self.model()?, rows)
                    .into_iter()
                    .map(|r| r.start as u64..r.end as u64)
                    .map(Ok)
                    .collect()
            })
            .collect::<Result<_>>()?;
        let covered: u64 = parts.iter().flatten().map(|r| r.end - r.start).sum();
        if parts.iter().flatten().any(|r| r.end > shape[0]) || covered != shape[0] {
            return Err(PluginError::shape(format!(
                "{module}'s adapter has {rows} rows; the model's {} projections need {covered}",
                projs.len()
            )));
        }
        Ok(parts)
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
            for ((proj, _), part) in projs.iter().zip(self.parts(&n, &t.shape)?) {
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
            "init_lora_weights": true, "lora_alpha": lora.get("alpha"),
            "lora_dropout": lora.get("dropout").and_then(Value::as_f64).unwrap_or(0.0),
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
        for ((proj, _), part) in projs.iter().zip(self.parts(&n, &t.info.shape)?) {
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

/// Tensors by name: (shape, f32 values).
pub type Loaded = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// A Hugging Face PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, as
/// peft's `save_pretrained` or our export writes it) as the Megatron adapter tensors `cfg`
/// trains on `model` — `lora.init_from` for continued training. Canonical LoRA takes each
/// projection's A and B as they are; fused LoRA needs one A shared by q, k, v (and by gate, up)
/// — what a fused adapter exports to — and stacks the Bs (and DoRA's magnitudes) at their rows.
/// Every rule is checked: the config's r, alpha and use_dora against `cfg`, each adapter
/// present (a DoRA adapter without its magnitudes is refused: peft would silently re-initialise
/// them), nothing left over.
pub fn import(dir: &std::path::Path, cfg: &LoraConfig, model: &GptConfig) -> Result<Loaded> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| PluginError::io(&config_path, "cannot read", e))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| PluginError::format(format!("{}: {e}", config_path.display())))?;
    check_config(&config, cfg)
        .map_err(|m| PluginError::config(format!("{}: {m}", config_path.display())))?;
    let file = dir.join("adapter_model.safetensors");
    let mut given = read_f32(&file)?;
    let mut out = Loaded::new();
    for slot in crate::lora::slots(cfg, model.num_layers) {
        let (layer_rows, _) = crate::lora::layer_shape(model, &slot.module);
        let (l, module) = layer_and_module(&slot.module);
        let projs = projections(module, slot.key).unwrap_or(&[]);
        let mut take = |proj: &str, part: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let name = peft_name(l, proj, part);
            given.remove(&name).ok_or_else(|| {
                PluginError::shape(format!(
                    "{}: no '{name}'{}",
                    file.display(),
                    if part == "magnitude" {
                        " (a DoRA adapter needs its magnitudes; peft would re-initialise them)"
                    } else {
                        ""
                    }
                ))
            })
        };
        // A: the same for every projection of a fused layer.
        let mut a: Option<(Vec<usize>, Vec<f32>)> = None;
        let mut pieces = Vec::new();
        for (proj, part) in projs {
            let this_a = take(proj, "in")?;
            match &a {
                Some(first) if first != &this_a => {
                    return Err(PluginError::shape(format!(
                        "{}: layer {l}'s {} carry different lora_A; a fused adapter has one (import with lora.canonical = true)",
                        file.display(),
                        projs.iter().map(|p| p.0.rsplit('.').next().unwrap_or(p.0)).collect::<Vec<_>>().join(", ")
                    )))
                }
                Some(_) => {}
                None => a = Some(this_a),
            }
            // A fused layer's projections go to their rows of it; a canonical adapter's rows
            // are its own.
            let rows = match slot.key {
                Some(_) => {
                    let n = slot
                        .part
                        .rows(model, layer_rows)
                        .iter()
                        .map(|r| r.len())
                        .sum();
                    std::iter::once(0..n).collect()
                }
                None => part.rows(model, layer_rows),
            };
            pieces.push(Piece {
                name: peft_name(l, proj, "out"),
                rows,
                b: take(proj, "out")?.1,
                magnitude: if cfg.dora {
                    Some(take(proj, "magnitude")?.1)
                } else {
                    None
                },
            });
        }
        let Some(a) = a else { continue };
        let (b, m) = stack(&pieces, cfg.dim)
            .map_err(|e| PluginError::shape(format!("{}: {e}", file.display())))?;
        let total = b.len() / cfg.dim;
        out.insert(slot.a(), a);
        out.insert(slot.b(), (vec![total, cfg.dim], b));
        if let Some(m) = m {
            out.insert(slot.magnitude(), (vec![total], m));
        }
    }
    if let Some(extra) = given.keys().next() {
        return Err(PluginError::shape(format!(
            "{}: '{extra}' is no adapter lora.target_modules {:?} trains ({} such tensors)",
            file.display(),
            cfg.targets(),
            given.len()
        )));
    }
    Ok(out)
}

/// One projection's B (and DoRA magnitude) of an imported adapter, and the rows of the
/// adapter it becomes.
struct Piece {
    name: String,
    rows: Vec<std::ops::Range<usize>>,
    b: Vec<f32>,
    magnitude: Option<Vec<f32>>,
}

/// The pieces' Bs (`[n, r]` each) stacked at their rows, and their magnitudes likewise.
fn stack(pieces: &[Piece], r: usize) -> std::result::Result<(Vec<f32>, Option<Vec<f32>>), String> {
    if r == 0 || pieces.is_empty() {
        return Err(format!("no adapter rows at rank {r}"));
    }
    let total = pieces
        .iter()
        .flat_map(|p| &p.rows)
        .map(|x| x.end)
        .max()
        .unwrap_or(0);
    let mut b = vec![0f32; total * r];
    let mut m = pieces[0].magnitude.as_ref().map(|_| vec![0f32; total]);
    for p in pieces {
        let n: usize = p.rows.iter().map(|x| x.len()).sum();
        if p.b.len() != n * r {
            return Err(format!(
                "'{}' has {} values; [{n}, {r}] expected",
                p.name,
                p.b.len()
            ));
        }
        if let (Some(pm), Some(m)) = (&p.magnitude, m.as_mut()) {
            if pm.len() != n {
                return Err(format!(
                    "{}'s magnitude has {} values; {n} expected",
                    p.name,
                    pm.len()
                ));
            }
            for (dst, v) in p.rows.iter().flat_map(|x| x.clone()).zip(pm) {
                m[dst] = *v;
            }
        }
        for (dst, src) in p
            .rows
            .iter()
            .flat_map(|x| x.clone())
            .zip(p.b.chunks_exact(r))
        {
            b[dst * r..(dst + 1) * r].copy_from_slice(src);
        }
    }
    Ok((b, m))
}

/// `decoder.layers.N.self_attention.linear_qkv` → (N, `self_attention.linear_qkv`).
fn layer_and_module(module: &str) -> (u64, &str) {
    module
        .strip_prefix("decoder.layers.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(n, m)| Some((n.parse().ok()?, m)))
        .unwrap_or((0, module))
}

/// The adapter's settings against the trainer's LoRA config, one rule each.
fn check_config(c: &Value, cfg: &LoraConfig) -> std::result::Result<(), String> {
    if c["peft_type"].as_str() != Some("LORA") {
        return Err(format!(
            "peft_type {}: only LORA adapters import",
            c["peft_type"]
        ));
    }
    if c["r"].as_u64() != Some(cfg.dim as u64) {
        return Err(format!("r is {}; lora.dim is {}", c["r"], cfg.dim));
    }
    if c["lora_alpha"].as_f64() != Some(cfg.alpha) {
        return Err(format!(
            "lora_alpha is {}; lora.alpha is {}",
            c["lora_alpha"], cfg.alpha
        ));
    }
    let dora = c["use_dora"].as_bool().unwrap_or(false);
    if dora != cfg.dora {
        return Err(format!("use_dora is {dora}; lora.dora is {}", cfg.dora));
    }
    for flag in ["use_rslora", "fan_in_fan_out"] {
        if c[flag].as_bool().unwrap_or(false) {
            return Err(format!(
                "{flag} adapters do not import (Megatron-Bridge's LoRA has neither)"
            ));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if c[pattern].as_object().is_some_and(|m| !m.is_empty()) {
            return Err(format!(
                "{pattern} is set: one rank and alpha for every layer import"
            ));
        }
    }
    Ok(())
}

/// A safetensors file's tensors as f32 (F32, BF16 or F16 stored).
pub fn read_f32(path: &std::path::Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| PluginError::format(format!("{}: {e}", path.display())))?;
    let mut out = Loaded::new();
    for (name, t) in st.tensors() {
        let dtype = match t.dtype() {
            safetensors::Dtype::F32 => candle_core::DType::F32,
            safetensors::Dtype::BF16 => candle_core::DType::BF16,
            safetensors::Dtype::F16 => candle_core::DType::F16,
            other => {
                return Err(PluginError::format(format!(
                    "{}: '{name}' is {other:?}; adapters import from F32, BF16 or F16",
                    path.display()
                )))
            }
        };
        let values = candle_core::Tensor::from_raw_buffer(
            t.data(),
            dtype,
            t.shape(),
            &candle_core::Device::Cpu,
        )
        .and_then(|x| {
            x.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()
        })
        .map_err(crate::model::ce)?;
        out.insert(name, (t.shape().to_vec(), values));
    }
    Ok(out)
}

/// Canonical LoRA's target for a PEFT target module (`q_proj` → `linear_q`, …).
pub fn canonical_target(hf: &str) -> Option<&'static str> {
    Some(match hf {
        "q_proj" => "linear_q",
        "k_proj" => "linear_k",
        "v_proj" => "linear_v",
        "o_proj" => "linear_proj",
        "gate_proj" => "linear_fc1_gate",
        "up_proj" => "linear_fc1_up",
        "down_proj" => "linear_fc2",
        _ => return None,
    })
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
                moe: None,
            }),
        };
        // 2 groups of [2 q heads, k, v] (head_dim 1): q rows 0,1,4,5; k 2,6; v 3,7.
        let b =
            parse("decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight").unwrap();
        let parts = e.parts(&b, &[8, 2]).unwrap();
        assert_eq!(parts[0], [0..2, 4..6]);
        assert_eq!(parts[1], [2..3, 6..7]);
        assert_eq!(parts[2], [3..4, 7..8]);
        assert!(e.parts(&b, &[9, 2]).is_err());
    }
}

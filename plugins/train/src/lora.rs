//! LoRA as Megatron-Bridge trains it: the model frozen, one adapter per targeted linear layer —
//! `adapter.linear_in` (A, `[r, in]`) and `adapter.linear_out` (B, `[out, r]`) — its output
//! `(alpha / r) · B · A · x` added to the layer's; on the fused `linear_qkv` and `linear_fc1` one
//! adapter each, B's rows in the layer's own order (per query group q, k, v; `[gate; up]`).
//! Training updates only the adapters; the merged weights `W0 + (alpha / r) · B · A` go out.

use crate::config::LoraConfig;
use crate::init::Normals;
use crate::model::{ce, GptConfig};
use crate::params::Params;
use bridgeflow_megatron::names;
use bridgeflow_sdk::{DType, PluginError, Result};
use candle_core::Device;
use std::collections::HashMap;

/// The adapters' hyperparameters on the `adapters` port's plan (`dim`, `alpha`,
/// `target_modules`), for the PEFT export's `adapter_config.json`.
pub const LORA: bridgeflow_sdk::Attr<serde_json::Map<String, serde_json::Value>> =
    bridgeflow_sdk::Attr::new("trainer.lora");

pub fn describe(cfg: &LoraConfig) -> serde_json::Map<String, serde_json::Value> {
    let v = serde_json::json!({"dim": cfg.dim, "alpha": cfg.alpha, "target_modules": cfg.target_modules, "dora": cfg.dora});
    v.as_object().cloned().unwrap_or_default()
}

/// The linear layers LoRA can target, by Megatron-Bridge's names.
const MODULES: [&str; 4] = [
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
];

/// `*` matches any run of characters (Megatron-Bridge's wildcard targets).
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len()).any(|i| {
                    text.is_char_boundary(head.len() + i) && glob(rest, &text[head.len() + i..])
                })
        }
    }
}

/// Whether `module` (`decoder.layers.3.self_attention.linear_qkv`) is targeted: by its last
/// name, or by a pattern over the whole.
fn targeted(cfg: &LoraConfig, module: &str) -> bool {
    let leaf = module.rsplit('.').next().unwrap_or(module);
    cfg.target_modules
        .iter()
        .any(|t| t == leaf || (t.contains('*') && glob(t, module)))
}

fn adapter_names(module: &str) -> (String, String) {
    (
        format!("{module}.adapter.linear_in.weight"),
        format!("{module}.adapter.linear_out.weight"),
    )
}

/// DoRA's magnitude of a module (`[out]`).
pub fn magnitude_name(module: &str) -> String {
    format!("{module}.adapter.weight_magnitude")
}

/// The adapter tensors `cfg` puts on `model` (name, shape), in order — what the trainer's
/// `adapters` port carries.
pub fn planned(cfg: &LoraConfig, model: &GptConfig) -> Vec<(String, Vec<u64>)> {
    let (h, f, d) = (
        model.hidden_size as u64,
        model.ffn_hidden_size as u64,
        model.kv_channels as u64,
    );
    let qkv = (model.num_attention_heads + 2 * model.num_query_groups) as u64 * d;
    let heads = model.num_attention_heads as u64 * d;
    let mut out = Vec::new();
    for l in 0..model.num_layers {
        for (m, (rows, cols)) in MODULES
            .into_iter()
            .zip([(qkv, h), (h, heads), (2 * f, h), (h, f)])
        {
            let module = names::layer_key(l as u64, m);
            if targeted(cfg, &module) {
                let (a, b) = adapter_names(&module);
                out.push((a, vec![cfg.dim as u64, cols]));
                out.push((b, vec![rows, cfg.dim as u64]));
                if cfg.dora {
                    out.push((magnitude_name(&module), vec![rows]));
                }
            }
        }
    }
    out
}

/// Freezes every parameter and adds the adapters (from `init_from`, or A drawn as `lora_a_init`
/// says and B zero); sets the scale the forward pass uses.
pub fn attach(
    cfg: &LoraConfig,
    model: &GptConfig,
    params: &mut Params,
    dev: &Device,
) -> Result<usize> {
    if cfg.dim == 0 {
        return Err(PluginError::config("lora.dim must be at least 1"));
    }
    let given = match &cfg.init_from {
        Some(p) => read_adapters(p)?,
        None => HashMap::new(),
    };
    for p in params.by_name.values_mut() {
        p.trainable = false;
    }
    let mut normals = Normals::seeded(cfg.seed);
    let mut added = 0;
    for l in 0..model.num_layers {
        for m in MODULES {
            let module = names::layer_key(l as u64, m);
            if !targeted(cfg, &module) {
                continue;
            }
            let w = params
                .by_name
                .get(&format!("{module}.weight"))
                .ok_or_else(|| {
                    PluginError::internal(format!("no '{module}.weight' to put an adapter on"))
                })?;
            let (out, inp) = (w.shape[0], w.shape[1]);
            let (a_name, b_name) = adapter_names(&module);
            let a_shape = vec![cfg.dim, inp];
            let b_shape = vec![out, cfg.dim];
            let a = match given.get(&a_name) {
                Some((shape, v)) => check(&a_name, shape, &a_shape, v)?,
                None => init_a(cfg, inp, &mut normals)?,
            };
            let b = match given.get(&b_name) {
                Some((shape, v)) => check(&b_name, shape, &b_shape, v)?,
                None => vec![0.0; out * cfg.dim],
            };
            if cfg.dora {
                let m_name = magnitude_name(&module);
                let m = match given.get(&m_name) {
                    Some((shape, v)) => check(&m_name, shape, &[out], v)?,
                    None => row_norms(
                        &w.master,
                        &a,
                        &b,
                        out,
                        inp,
                        cfg.dim,
                        cfg.alpha / cfg.dim as f64,
                    ),
                };
                params.insert(&m_name, vec![out], DType::F32, m, dev)?;
            }
            params.insert(&a_name, a_shape, DType::F32, a, dev)?;
            params.insert(&b_name, b_shape, DType::F32, b, dev)?;
            added += 1;
        }
    }
    if added == 0 {
        return Err(PluginError::config(format!(
            "lora.target_modules {:?} match no linear layer",
            cfg.target_modules
        )));
    }
    params.lora_scale = Some(cfg.alpha / cfg.dim as f64);
    Ok(added)
}

/// `‖W0 + s·B·A‖` of each row (DoRA's starting magnitude), in f64 then f32.
fn row_norms(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    s: f64,
) -> Vec<f32> {
    (0..out)
        .map(|i| {
            (0..inp)
                .map(|j| {
                    let ba: f64 = (0..r)
                        .map(|k| b[i * r + k] as f64 * a[k * inp + j] as f64)
                        .sum();
                    let v = w[i * inp + j] as f64 + s * ba;
                    v * v
                })
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect()
}

fn init_a(cfg: &LoraConfig, inp: usize, normals: &mut Normals) -> Result<Vec<f32>> {
    let std = match cfg.lora_a_init.as_str() {
        "xavier" => (2.0 / (inp + cfg.dim) as f64).sqrt(),
        "normal" => 0.2,
        other => {
            return Err(PluginError::config(format!(
                "lora.lora_a_init = {other:?}: expected xavier or normal"
            )))
        }
    };
    Ok((0..cfg.dim * inp)
        .map(|_| (normals.next() * std) as f32)
        .collect())
}

fn check(name: &str, got: &[usize], want: &[usize], v: &[f32]) -> Result<Vec<f32>> {
    if got != want {
        return Err(PluginError::shape(format!(
            "lora.init_from: '{name}' is {got:?}; the model needs {want:?}"
        )));
    }
    Ok(v.to_vec())
}

/// Tensors by name: (shape, f32 values).
type Loaded = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Adapter tensors by name (f32) from a safetensors file.
fn read_adapters(path: &std::path::Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| PluginError::format(format!("{}: {e}", path.display())))?;
    let mut out = HashMap::new();
    for (name, t) in st.tensors() {
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(PluginError::format(format!(
                "{}: '{name}' is not F32",
                path.display()
            )));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(name, (t.shape().to_vec(), v));
    }
    Ok(out)
}

/// The merged weight of a targeted layer, `W0 + scale · B · A`, or None for a layer without an
/// adapter.
pub fn merged(params: &Params, weight: &str) -> Result<Option<Vec<f32>>> {
    let (Some(scale), Some(module)) = (params.lora_scale, weight.strip_suffix(".weight")) else {
        return Ok(None);
    };
    let (a_name, b_name) = adapter_names(module);
    let (Some(a), Some(b), Some(w)) = (
        params.by_name.get(&a_name),
        params.by_name.get(&b_name),
        params.by_name.get(weight),
    ) else {
        return Ok(None);
    };
    let dev = Device::Cpu;
    let t = |p: &crate::params::Param| {
        candle_core::Tensor::from_slice(&p.master, p.shape.as_slice(), &dev)
    };
    let ba = t(b).and_then(|b| b.matmul(&t(a)?)).map_err(ce)?;
    let sum = (t(w).map_err(ce)? + (ba * scale).map_err(ce)?).map_err(ce)?;
    let mut merged: Vec<f32> = sum.flatten_all().and_then(|x| x.to_vec1()).map_err(ce)?;
    if let Some(m) = params.by_name.get(&magnitude_name(module)) {
        rescale_rows(&mut merged, &m.master);
    }
    Ok(Some(merged))
}

/// DoRA's merge: each row of `W0 + s·B·A` rescaled to its magnitude, `(m / ‖row‖)·row`.
fn rescale_rows(w: &mut [f32], m: &[f32]) {
    let cols = w.len() / m.len().max(1);
    for (row, &m) in w.chunks_mut(cols).zip(m) {
        let norm = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let k = (m as f64 / norm) as f32;
        row.iter_mut().for_each(|v| *v *= k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_by_name_or_pattern() {
        let cfg = LoraConfig {
            target_modules: vec!["linear_qkv".into(), "*.layers.1.*.linear_fc2".into()],
            dim: 4,
            alpha: 8.0,
            lora_a_init: "xavier".into(),
            init_from: None,
            seed: 1,
            dora: false,
        };
        assert!(targeted(&cfg, "decoder.layers.0.self_attention.linear_qkv"));
        assert!(targeted(&cfg, "decoder.layers.1.mlp.linear_fc2"));
        assert!(!targeted(&cfg, "decoder.layers.0.mlp.linear_fc2"));
        assert!(!targeted(
            &cfg,
            "decoder.layers.1.self_attention.linear_proj"
        ));
        assert!(glob("a*c*e", "abcde") && !glob("a*c*f", "abcde"));
    }
}

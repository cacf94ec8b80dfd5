//! LoRA as Megatron-Bridge trains it: the model frozen, adapters — `linear_in` (A, `[r, in]`)
//! and `linear_out` (B, `[rows, r]`) — whose output `(alpha / r) · B · A · x` is added to their
//! layer's. Bridge's `LoRA` puts one adapter on each targeted layer, on the fused `linear_qkv`
//! and `linear_fc1` too (B's rows in the layer's own order: per query group q, k, v;
//! `[gate; up]`); its `CanonicalLoRA` puts one per projection there (`adapter.adapter_q`, …,
//! `adapter.adapter_gate`, `adapter.adapter_up`), their outputs placed at their projection's
//! rows — PEFT's layout. Training updates only the adapters; the merged weights
//! `W0 + (alpha / r) · B · A` go out.

use crate::config::LoraConfig;
use crate::init::Normals;
use crate::model::{ce, GptConfig};
use crate::params::{Adapter, Params};
use bridgeflow_megatron::names;
use bridgeflow_sdk::{DType, PluginError, Result};
use candle_core::Device;
use std::collections::HashMap;
use std::ops::Range;

/// The adapters' hyperparameters on the `adapters` port's plan (`dim`, `alpha`,
/// `target_modules`, `dora`, `canonical`), for the PEFT export's `adapter_config.json`.
pub const LORA: bridgeflow_sdk::Attr<serde_json::Map<String, serde_json::Value>> =
    bridgeflow_sdk::Attr::new("trainer.lora");

pub fn describe(cfg: &LoraConfig) -> serde_json::Map<String, serde_json::Value> {
    let v = serde_json::json!({"dim": cfg.dim, "alpha": cfg.alpha, "target_modules": cfg.targets(),
        "dora": cfg.dora, "canonical": cfg.canonical, "dropout": cfg.dropout});
    v.as_object().cloned().unwrap_or_default()
}

/// The linear layers LoRA can target, by Megatron-Bridge's names.
const MODULES: [&str; 4] = [
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
];

/// Which rows of a fused layer's output an adapter feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    All,
    Q,
    K,
    V,
    Gate,
    Up,
}

impl Part {
    /// The rows this part covers in a layer of `rows` output rows, in order (a list of row
    /// ranges: one range for most parts, one per query group for q, k and v).
    #[allow(clippy::single_range_in_vec_init)]
    pub fn rows(self, m: &GptConfig, rows: usize) -> Vec<Range<usize>> {
        let (g, d) = (m.num_query_groups, m.kv_channels);
        let hpg = m.num_attention_heads / g;
        let per = (hpg + 2) * d;
        let groups =
            |off: usize, n: usize| (0..g).map(|i| i * per + off..i * per + off + n).collect();
        match self {
            Part::All => vec![0..rows],
            Part::Q => groups(0, hpg * d),
            Part::K => groups(hpg * d, d),
            Part::V => groups((hpg + 1) * d, d),
            Part::Gate => vec![0..rows / 2],
            Part::Up => vec![rows / 2..rows],
        }
    }
}

/// Canonical LoRA's adapters on the fused layers: (module, adapter key, target name, part).
pub const CANONICAL: [(&str, &str, &str, Part); 5] = [
    (
        "self_attention.linear_qkv",
        "adapter_q",
        "linear_q",
        Part::Q,
    ),
    (
        "self_attention.linear_qkv",
        "adapter_k",
        "linear_k",
        Part::K,
    ),
    (
        "self_attention.linear_qkv",
        "adapter_v",
        "linear_v",
        Part::V,
    ),
    (
        "mlp.linear_fc1",
        "adapter_gate",
        "linear_fc1_gate",
        Part::Gate,
    ),
    ("mlp.linear_fc1", "adapter_up", "linear_fc1_up", Part::Up),
];

/// One adapter: on `module` (`decoder.layers.0.self_attention.linear_qkv`), the layer's own
/// (`key` None) or one of canonical LoRA's (`adapter_q`, …), feeding `part`'s rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub module: String,
    pub key: Option<&'static str>,
    pub part: Part,
}

impl Slot {
    fn prefix(&self) -> String {
        match self.key {
            Some(k) => format!("{}.adapter.{k}", self.module),
            None => format!("{}.adapter", self.module),
        }
    }
    pub fn a(&self) -> String {
        format!("{}.linear_in.weight", self.prefix())
    }
    pub fn b(&self) -> String {
        format!("{}.linear_out.weight", self.prefix())
    }
    /// DoRA's magnitude (`[rows]`).
    pub fn magnitude(&self) -> String {
        format!("{}.weight_magnitude", self.prefix())
    }
}

/// LoRA dropout (`nn.Dropout` in Megatron-Bridge's adapter, training only) for one
/// micro-batch of one iteration: each element kept with probability 1 − p and scaled by
/// 1/(1 − p). Masks are drawn from (seed, iteration, micro-batch, layer, module, adapter, site)
/// alone — a counter-based stream, not a generator's running state — so a resumed run draws
/// exactly the masks the uninterrupted one did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f64,
    /// After B (`dropout_position = "post"`) rather than before A.
    pub post: bool,
    pub seed: u64,
    /// The iteration and micro-batch, mixed.
    pub step: u64,
}

/// SplitMix64's finalizer: a well-mixed 64-bit function of its input.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Dropout {
    pub fn new(cfg: &LoraConfig, iteration: u64, micro_batch: u64) -> Option<Dropout> {
        (cfg.dropout > 0.0).then(|| Dropout {
            p: cfg.dropout,
            post: cfg.dropout_position == "post",
            seed: cfg.seed as u64,
            step: mix(iteration.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ mix(micro_batch + 1)),
        })
    }

    /// Where a mask is drawn: layer `l`'s `module`, its `adapter`-th adapter, `at` (0 before A,
    /// 1 after B, 2 DoRA's correction).
    pub fn site(l: usize, module: &str, adapter: usize, at: u64) -> u64 {
        let m = MODULES
            .iter()
            .position(|x| *x == module)
            .unwrap_or(MODULES.len()) as u64;
        (((l as u64) << 16 | m << 8 | adapter as u64) << 2) | at
    }

    /// The keep mask at `site` for `n` elements: 0 or 1/(1 − p).
    pub fn mask(&self, site: u64, n: usize) -> Vec<f32> {
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let threshold = (self.p * u64::MAX as f64) as u64;
        let base = mix(mix(self.seed) ^ self.step ^ mix(site ^ 0xd1b5_4a32_d192_ed03));
        (0..n as u64)
            .map(|i| {
                if mix(base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))) < threshold {
                    0.0
                } else {
                    keep
                }
            })
            .collect()
    }

    /// `x` with the mask at `site` applied.
    pub fn apply(
        &self,
        x: &candle_core::Tensor,
        site: u64,
    ) -> candle_core::Result<candle_core::Tensor> {
        let m =
            candle_core::Tensor::from_vec(self.mask(site, x.elem_count()), x.shape(), x.device())?;
        x * m.to_dtype(x.dtype())?
    }
}

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

/// Whether `target` (`decoder.layers.3.self_attention.linear_qkv`, or canonical LoRA's
/// `….linear_q`) is targeted: by its last name, or by a pattern over the whole.
fn targeted(cfg: &LoraConfig, target: &str) -> bool {
    let leaf = target.rsplit('.').next().unwrap_or(target);
    cfg.targets()
        .iter()
        .any(|t| t == leaf || (t.contains('*') && glob(t, target)))
}

/// Every adapter `cfg` puts on a model of `layers` layers, in order.
pub fn slots(cfg: &LoraConfig, layers: usize) -> Vec<Slot> {
    let mut out = Vec::new();
    for l in 0..layers {
        for m in MODULES {
            let module = names::layer_key(l as u64, m);
            let split: Vec<_> = CANONICAL.iter().filter(|c| c.0 == m).collect();
            if !cfg.canonical || split.is_empty() {
                if targeted(cfg, &module) {
                    out.push(Slot {
                        module,
                        key: None,
                        part: Part::All,
                    });
                }
                continue;
            }
            let parent = module.rsplit_once('.').map_or("", |p| p.0).to_string();
            for (_, key, target, part) in split {
                if targeted(cfg, &format!("{parent}.{target}")) {
                    out.push(Slot {
                        module: module.clone(),
                        key: Some(key),
                        part: *part,
                    });
                }
            }
        }
    }
    out
}

/// A fused layer's weight shape `[rows, in]`.
pub(crate) fn layer_shape(model: &GptConfig, module: &str) -> (usize, usize) {
    let (h, f, d) = (model.hidden_size, model.ffn_hidden_size, model.kv_channels);
    match module.rsplit('.').next().unwrap_or(module) {
        "linear_qkv" => (
            (model.num_attention_heads + 2 * model.num_query_groups) * d,
            h,
        ),
        "linear_proj" => (h, model.num_attention_heads * d),
        "linear_fc1" => (2 * f, h),
        _ => (h, f),
    }
}

fn count(rows: &[Range<usize>]) -> usize {
    rows.iter().map(|r| r.len()).sum()
}

/// On a MoE model the MLP is routed experts, which have no `linear_fc1`/`linear_fc2` of their
/// own to adapt (Megatron-Bridge adapts each expert's; not done here): refused by name.
pub fn check_moe_targets(cfg: &LoraConfig, model: &GptConfig) -> Result<()> {
    if model.moe.is_none() {
        return Ok(());
    }
    match slots(cfg, model.num_layers)
        .iter()
        .find(|s| s.module.contains(".mlp."))
    {
        Some(s) => Err(PluginError::unsupported(format!(
            "LoRA on '{}': this model's MLPs are routed experts, and adapters on experts are not supported; set lora.target_modules to attention modules (linear_qkv, linear_proj)",
            s.module
        ))),
        None => Ok(()),
    }
}

/// The adapter tensors `cfg` puts on `model` (name, shape), in order — what the trainer's
/// `adapters` port carries.
pub fn planned(cfg: &LoraConfig, model: &GptConfig) -> Vec<(String, Vec<u64>)> {
    let mut out = Vec::new();
    for slot in slots(cfg, model.num_layers) {
        let (rows, cols) = layer_shape(model, &slot.module);
        let n = count(&slot.part.rows(model, rows)) as u64;
        out.push((slot.a(), vec![cfg.dim as u64, cols as u64]));
        out.push((slot.b(), vec![n, cfg.dim as u64]));
        if cfg.dora {
            out.push((slot.magnitude(), vec![n]));
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
    let given = match &cfg.init_from {
        Some(p) if p.join("adapter_config.json").is_file() => crate::peft::import(p, cfg, model)?,
        Some(p) => crate::peft::read_f32(p)?,
        None => HashMap::new(),
    };
    for p in params.by_name.values_mut() {
        p.trainable = false;
    }
    let mut normals = Normals::seeded(cfg.seed);
    let adapter_dtype = cfg.dtype()?;
    let slots = slots(cfg, model.num_layers);
    if slots.is_empty() {
        return Err(PluginError::config(format!(
            "lora.target_modules {:?} match no linear layer",
            cfg.targets()
        )));
    }
    for slot in &slots {
        let w = params
            .by_name
            .get(&format!("{}.weight", slot.module))
            .ok_or_else(|| {
                PluginError::internal(format!("no '{}.weight' to put an adapter on", slot.module))
            })?;
        let (out, inp) = (w.shape[0], w.shape[1]);
        let rows = slot.part.rows(model, out);
        let n = count(&rows);
        let (a_shape, b_shape) = (vec![cfg.dim, inp], vec![n, cfg.dim]);
        let a = match given.get(&slot.a()) {
            Some((shape, v)) => check(&slot.a(), shape, &a_shape, v)?,
            None => init_a(cfg, inp, &mut normals)?,
        };
        let b = match given.get(&slot.b()) {
            Some((shape, v)) => check(&slot.b(), shape, &b_shape, v)?,
            None => vec![0.0; n * cfg.dim],
        };
        let magnitude = if cfg.dora {
            let name = slot.magnitude();
            let m = match given.get(&name) {
                Some((shape, v)) => check(&name, shape, &[n], v)?,
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
            params.insert(&name, vec![n], DType::F32, m, dev)?;
            Some(name)
        } else {
            None
        };
        params.insert(&slot.a(), a_shape, DType::F32, a, dev)?;
        params.insert(&slot.b(), b_shape, DType::F32, b, dev)?;
        if let Some(dtype) = adapter_dtype {
            params.compute_in(&slot.a(), dtype)?;
            params.compute_in(&slot.b(), dtype)?;
        }
        params
            .adapters
            .entry(slot.module.clone())
            .or_default()
            .push(Adapter {
                a: slot.a(),
                b: slot.b(),
                rows,
                magnitude,
            });
    }
    params.lora_scale = Some(cfg.alpha / cfg.dim as f64);
    Ok(slots.len())
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

/// The merged weight of a targeted layer, `W0 + scale · B · A` (each adapter's rows in place;
/// DoRA's rows then rescaled), or None for a layer without an adapter.
pub fn merged(params: &Params, weight: &str) -> Result<Option<Vec<f32>>> {
    let (Some(scale), Some(module)) = (params.lora_scale, weight.strip_suffix(".weight")) else {
        return Ok(None);
    };
    let (Some(adapters), Some(w)) = (params.adapters.get(module), params.by_name.get(weight))
    else {
        return Ok(None);
    };
    let dev = Device::Cpu;
    let t = |p: &crate::params::Param| {
        candle_core::Tensor::from_slice(&p.master, p.shape.as_slice(), &dev)
    };
    let cols = w.shape[1];
    let mut merged = w.master.clone();
    for ad in adapters {
        let (a, b) = (&params.by_name[&ad.a], &params.by_name[&ad.b]);
        let ba: Vec<f32> = t(b)
            .and_then(|b| b.matmul(&t(a)?))
            .and_then(|ba| (ba * scale)?.flatten_all()?.to_vec1())
            .map_err(ce)?;
        let rows = ad.rows.iter().flat_map(|r| r.clone());
        for (row, delta) in rows.zip(ba.chunks_exact(cols)) {
            let dst = &mut merged[row * cols..(row + 1) * cols];
            dst.iter_mut().zip(delta).for_each(|(w, d)| *w += d);
        }
        if let Some(m) = &ad.magnitude {
            rescale_rows(&mut merged, cols, &ad.rows, &params.by_name[m].master);
        }
    }
    Ok(Some(merged))
}

/// DoRA's merge: each of the adapter's rows of `W0 + s·B·A` rescaled to its magnitude,
/// `(m / ‖row‖)·row`.
fn rescale_rows(w: &mut [f32], cols: usize, rows: &[Range<usize>], m: &[f32]) {
    for (r, &m) in rows.iter().flat_map(|r| r.clone()).zip(m) {
        let row = &mut w[r * cols..(r + 1) * cols];
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
            target_modules: Some(vec!["linear_qkv".into(), "*.layers.1.*.linear_fc2".into()]),
            dim: 4,
            alpha: 8.0,
            lora_a_init: "xavier".into(),
            init_from: None,
            seed: 1,
            dora: false,
            canonical: false,
            dropout: 0.0,
            dropout_position: "pre".into(),
            lora_dtype: None,
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

    fn config(canonical: bool, dora: bool, targets: Option<&[&str]>) -> LoraConfig {
        LoraConfig {
            target_modules: targets.map(|t| t.iter().map(|s| s.to_string()).collect()),
            dim: 4,
            alpha: 8.0,
            lora_a_init: "xavier".into(),
            init_from: None,
            seed: 1,
            dora,
            canonical,
            dropout: 0.0,
            dropout_position: "pre".into(),
            lora_dtype: None,
        }
    }

    #[test]
    fn lora_dtype_is_checked() {
        let with = |dora: bool, dtype: &str| LoraConfig {
            lora_dtype: Some(dtype.into()),
            ..config(false, dora, None)
        };
        assert_eq!(
            with(false, "bfloat16").dtype().unwrap(),
            Some(candle_core::DType::BF16)
        );
        let e = with(false, "int8").check().unwrap_err().to_string();
        assert!(
            e.contains("lora_dtype \"int8\": expected f32, bf16 or f16"),
            "{e}"
        );
        let e = with(true, "f32").check().unwrap_err().to_string();
        assert!(e.contains("lora_dtype with DoRA"), "{e}");
    }

    #[test]
    fn each_variant_takes_its_own_targets() {
        assert!(config(true, false, None).check().is_ok());
        let e = config(true, false, Some(&["linear_qkv"]))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("canonical = false"), "{e}");
        let e = config(false, false, Some(&["linear_q"]))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("canonical = true"), "{e}");
        assert!(
            config(true, true, None).check().is_err(),
            "no canonical DoRA"
        );
        // Canonical slots: q, k, v, proj, gate, up, fc2 per layer, in that order.
        let keys: Vec<_> = slots(&config(true, false, None), 1)
            .iter()
            .map(|s| s.key)
            .collect();
        assert_eq!(
            keys,
            [
                Some("adapter_q"),
                Some("adapter_k"),
                Some("adapter_v"),
                None,
                Some("adapter_gate"),
                Some("adapter_up"),
                None
            ]
        );
        let only_v = slots(&config(true, false, Some(&["linear_v"])), 2);
        assert_eq!(only_v.len(), 2);
        assert_eq!(
            only_v[1].a(),
            "decoder.layers.1.self_attention.linear_qkv.adapter.adapter_v.linear_in.weight"
        );
    }
}

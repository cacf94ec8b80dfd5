//! `calibrate`: static FP8 activation scales from a calibration pass, as NVIDIA ModelOpt's
//! `mtq.quantize(FP8_DEFAULT_CFG)` takes them — the largest |input| of every linear layer over
//! the calibration sequences, `input_scale = amax / 448` — and the KV-cache scales
//! (`max(amax / 448, 1.0)` of the keys after RoPE and of the values). It keeps the
//! Megatron-layout weights it is given (Llama family), runs the fp32 forward pass of
//! [`crate::forward`] on each sequence at the end, and emits the scales under HF names, 0-dim
//! f32 tensors (`model.layers.L.self_attn.q_proj.input_scale`, `…k_proj.k_scale`, …), for the
//! `fp8-static` quantizer.
//!
//! ModelOpt calibrates the model in its own dtype (bf16 for bf16 models); this pass is fp32, so
//! its amax differ from a bf16 pass by bf16's rounding of the activations (0.3 % on the fixture).

use crate::forward::{logits_observed, Site, Weights};
use crate::mapper::model_config;
use bridgeflow_sdk::{
    schemars, serde, Buffer, DType, Emitter, Item, PluginError, Result, StreamPlan, Tensor,
    TensorInfo, Transform,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct CalibrateConfig {
    /// The model's HF `config.json`.
    pub hf_config: PathBuf,
    /// The calibration sequences (token ids).
    pub input_ids: Vec<Vec<u64>>,
}

pub struct Calibrate {
    cfg: CalibrateConfig,
    weights: Weights,
    layers: u64,
    scales: usize,
}

/// E4M3's largest finite value.
const E4M3_MAX: f32 = 448.0;

/// The HF tensors a site's amax scales, and what they are called.
fn outputs(site: Site, l: u64) -> Vec<String> {
    let a = |p: &str, s: &str| format!("model.layers.{l}.{p}.{s}");
    match site {
        Site::Qkv => ["q_proj", "k_proj", "v_proj"]
            .iter()
            .map(|p| a(&format!("self_attn.{p}"), "input_scale"))
            .collect(),
        Site::Proj => vec![a("self_attn.o_proj", "input_scale")],
        Site::Fc1 => vec![
            a("mlp.gate_proj", "input_scale"),
            a("mlp.up_proj", "input_scale"),
        ],
        Site::Fc2 => vec![a("mlp.down_proj", "input_scale")],
        Site::K => vec![a("self_attn.k_proj", "k_scale")],
        Site::V => vec![a("self_attn.v_proj", "v_scale")],
    }
}

const SITES: [Site; 6] = [
    Site::Qkv,
    Site::Proj,
    Site::Fc1,
    Site::Fc2,
    Site::K,
    Site::V,
];

/// A site's scale from its amax: linear inputs amax / 448; KV caches at least 1.
fn scale(site: Site, amax: f32) -> f32 {
    match site {
        Site::K | Site::V => (amax / E4M3_MAX).max(1.0),
        _ => amax / E4M3_MAX,
    }
}

impl Transform for Calibrate {
    type Config = CalibrateConfig;
    const DESCRIPTION: &'static str =
        "FP8 activation and KV-cache scales (amax / 448) from an fp32 calibration pass over Megatron-layout Llama weights";
    const RETAINS_INPUTS: bool = false;

    fn new(cfg: CalibrateConfig) -> Result<Self> {
        if cfg.input_ids.is_empty() || cfg.input_ids.iter().any(|s| s.is_empty()) {
            return Err(PluginError::config(
                "input_ids: give at least one non-empty sequence",
            ));
        }
        Ok(Calibrate {
            cfg,
            weights: Weights::new(),
            layers: 0,
            scales: 0,
        })
    }

    fn plan(&mut self, _inputs: &[StreamPlan]) -> Result<StreamPlan> {
        self.layers = model_config(&self.cfg.hf_config)?.layers;
        let tensors: Vec<TensorInfo> = (0..self.layers)
            .flat_map(|l| SITES.iter().flat_map(move |&s| outputs(s, l)))
            .map(|n| TensorInfo::new(n, DType::F32, &[]))
            .collect();
        self.scales = tensors.len();
        Ok(StreamPlan::new(tensors))
    }

    fn process(&mut self, _port: usize, item: Item, _out: &mut Emitter) -> Result<()> {
        self.weights.add(&item.into_tensor()?);
        Ok(())
    }

    fn finish(&mut self, out: &mut Emitter) -> Result<()> {
        let c = model_config(&self.cfg.hf_config)?;
        let text = std::fs::read_to_string(&self.cfg.hf_config)
            .map_err(|e| PluginError::io(&self.cfg.hf_config, "cannot read", e))?;
        let j: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let eps = j["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32;
        let theta = j["rope_parameters"]["rope_theta"]
            .as_f64()
            .or_else(|| j["rope_theta"].as_f64())
            .unwrap_or(10000.0) as f32;
        let mut amax: BTreeMap<(u64, Site), f32> = BTreeMap::new();
        for ids in &self.cfg.input_ids {
            if let Some(&bad) = ids.iter().find(|&&i| i >= c.vocab) {
                return Err(PluginError::config(format!(
                    "input_ids: token {bad} is outside the vocabulary of {}",
                    c.vocab
                )));
            }
            let mut see = |site: Site, l: u64, x: &[f32]| {
                let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e = amax.entry((l, site)).or_insert(0.0);
                *e = e.max(m);
            };
            logits_observed(&self.weights, &c, ids, (eps, theta), &mut see)?;
        }
        for l in 0..self.layers {
            for site in SITES {
                let a = amax.get(&(l, site)).copied().ok_or_else(|| {
                    PluginError::internal(format!("layer {l}: no activations seen"))
                })?;
                for name in outputs(site, l) {
                    let v = scale(site, a).to_le_bytes().to_vec();
                    out.tensor(Tensor::new(
                        TensorInfo::new(name, DType::F32, &[]),
                        Buffer::from_vec(v),
                    )?)?;
                }
            }
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        format!(
            "{} scales from {} calibration sequences",
            self.scales,
            self.cfg.input_ids.len()
        )
    }
}

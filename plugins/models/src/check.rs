//! `llama-logits`: a pass-through stage that keeps the Megatron-layout weights it sees and, at
//! the end, runs the fp32 forward pass on a reference input and compares the logits with the
//! reference (`reference/logits.safetensors` of an HF model: `input_ids`, `logits`). A VLM's
//! language model (`language_model.*`) is checked on text: its multimodal RoPE gives every
//! text token the same position on all three axes, which is plain RoPE.

use crate::forward::{logits, Weights};
use crate::mapper::model_config;
use bridgeflow_sdk::{schemars, serde, Emitter, Item, PluginError, Result, StreamPlan, Transform};
use std::path::PathBuf;

fn default_tol() -> f64 {
    1e-4
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct CheckConfig {
    /// The model's HF `config.json`.
    pub hf_config: PathBuf,
    /// Reference logits (safetensors with `input_ids` int64 [1, S] and `logits` f32 [1, S, V]).
    pub reference: PathBuf,
    /// Largest accepted |logit - reference| (default 1e-4).
    #[serde(default = "default_tol")]
    pub tolerance: f64,
}

pub struct LogitsCheck {
    cfg: CheckConfig,
    weights: Weights,
    result: String,
}

fn read_reference(p: &std::path::Path) -> Result<(Vec<u64>, Vec<f32>, usize)> {
    let bytes = std::fs::read(p).map_err(|e| PluginError::io(p, "cannot read", e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| PluginError::format(format!("{}: {e}", p.display())))?;
    let ids = st
        .tensor("input_ids")
        .map_err(|e| PluginError::format(format!("{}: {e}", p.display())))?;
    let ids: Vec<u64> = ids
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u64)
        .collect();
    let lg = st
        .tensor("logits")
        .map_err(|e| PluginError::format(format!("{}: {e}", p.display())))?;
    let vocab = *lg.shape().last().unwrap_or(&0);
    let lg: Vec<f32> = lg
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok((ids, lg, vocab))
}

impl Transform for LogitsCheck {
    type Config = CheckConfig;
    const DESCRIPTION: &'static str =
        "Passes Megatron-layout Llama weights through; at the end compares an fp32 forward pass with reference logits";

    fn new(cfg: CheckConfig) -> Result<Self> {
        Ok(LogitsCheck {
            cfg,
            weights: Weights::new(),
            result: String::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        Ok(inputs[0].clone())
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        self.weights.add(&t);
        out.tensor(t)
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        let c = model_config(&self.cfg.hf_config)?;
        let text = std::fs::read_to_string(&self.cfg.hf_config).unwrap_or_default();
        let j: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let j = crate::megatron_config::text_view(&j);
        let eps = j["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32;
        let theta = j["rope_parameters"]["rope_theta"]
            .as_f64()
            .or_else(|| j["rope_theta"].as_f64())
            .unwrap_or(10000.0) as f32;
        let (ids, reference, vocab) = read_reference(&self.cfg.reference)?;
        let got = logits(&self.weights, &c, &ids, eps, theta)?;
        let ours_vocab = got.len() / ids.len();
        let (mut worst, mut agree) = (0f64, 0usize);
        for s in 0..ids.len() {
            let a = &got[s * ours_vocab..s * ours_vocab + vocab];
            let b = &reference[s * vocab..(s + 1) * vocab];
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs() as f64);
            }
            let arg = |v: &[f32]| {
                v.iter()
                    .enumerate()
                    .fold(0, |m, (i, x)| if *x > v[m] { i } else { m })
            };
            agree += (arg(a) == arg(b)) as usize;
        }
        self.result = format!(
            "logits max abs diff {worst:.3e} (tolerance {:.0e}), top-1 agreement {}/{}",
            self.cfg.tolerance,
            agree,
            ids.len()
        );
        if worst > self.cfg.tolerance {
            return Err(PluginError::mismatch(self.result.clone()));
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        self.result.clone()
    }
}

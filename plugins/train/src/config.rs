//! The trainer stage's config: Megatron-Core's names for the same knobs, so a recipe reads like
//! a Megatron-Bridge one.

use bridgeflow_sdk::{schemars, serde, PluginError, Result};

#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct TrainConfig {
    /// Tokens per sample fed to the model; each sample carries `seq_length + 1` tokens.
    pub seq_length: usize,
    /// Samples per iteration (optimizer step).
    pub global_batch_size: usize,
    /// Samples per forward/backward pass; `global_batch_size / micro_batch_size` micro-batches
    /// accumulate into one step.
    pub micro_batch_size: usize,
    /// Iterations to run.
    pub train_iters: u64,
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    /// The learning rate warmup starts from (megatron-core's `lr_warmup_init`).
    #[serde(default)]
    pub lr_warmup_init: f64,
    #[serde(default)]
    pub lr_warmup_iters: u64,
    /// Iterations the decay spans (default: `train_iters`).
    #[serde(default)]
    pub lr_decay_iters: Option<u64>,
    /// cosine, linear, constant, inverse-square-root or WSD.
    #[serde(default = "cosine")]
    pub lr_decay_style: String,
    /// WSD: iterations of the final decay.
    #[serde(default)]
    pub lr_wsd_decay_iters: Option<u64>,
    /// WSD: shape of the final decay (linear, cosine, exponential, minus_sqrt).
    #[serde(default = "linear")]
    pub lr_wsd_decay_style: String,
    /// The weight decay applied (megatron's scheduler sets `start_weight_decay =
    /// end_weight_decay`; Bridge's recipes use 0.033). Never on 1-D parameters or biases.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "beta1")]
    pub adam_beta1: f64,
    #[serde(default = "beta2")]
    pub adam_beta2: f64,
    #[serde(default = "eps")]
    pub adam_eps: f64,
    /// Global gradient-norm clipping threshold (0: off).
    #[serde(default = "one")]
    pub clip_grad: f64,
    /// Mixed precision as megatron-core's `--bf16`: the forward and backward pass in bf16
    /// (norms and softmax computed in fp32, logits upcast for the loss), fp32 master weights,
    /// gradients accumulated and the optimizer run in fp32.
    #[serde(default)]
    pub bf16: bool,
    /// Mixed precision as megatron-core's `--fp16`: as `bf16` in fp16, with dynamic loss
    /// scaling (a step with inf/NaN gradients is skipped; see the loss-scale options).
    #[serde(default)]
    pub fp16: bool,
    /// fp16: the starting loss scale (`--initial-loss-scale`, default 2^32).
    #[serde(default = "initial_scale")]
    pub initial_loss_scale: f64,
    /// fp16: the smallest loss scale (`--min-loss-scale`).
    #[serde(default = "one")]
    pub min_loss_scale: f64,
    /// fp16: good steps in a row before the scale doubles (`--loss-scale-window`).
    #[serde(default = "thousand")]
    pub loss_scale_window: u64,
    /// fp16: skipped steps in a row before the scale halves (`--hysteresis`).
    #[serde(default = "two")]
    pub hysteresis: u64,
    /// Loss averaged over all tokens of the step instead of per micro-batch, then over
    /// micro-batches (megatron-core's `calculate_per_token_loss`).
    #[serde(default)]
    pub calculate_per_token_loss: bool,
    /// MoE models: the load-balancing loss's coefficient in place of the model config's
    /// (`moe_aux_loss_coeff`, from the HF `router_aux_loss_coef`), as a Megatron-Bridge recipe
    /// sets `model.moe_aux_loss_coeff`; 0 turns the loss off.
    #[serde(default)]
    pub moe_aux_loss_coeff: Option<f64>,
    /// The tokenizer's EOS id: packed rows are padded with it and it never counts in the loss.
    #[serde(default)]
    pub eos_id: Option<u32>,
    /// Packed rows: the loss mask stored with them (answer tokens only, Bridge's default);
    /// false: every token but EOS.
    #[serde(default = "yes")]
    pub answer_only_loss: bool,
    /// Resume checkpoints go here (`iter_{N:07}/` and `latest_checkpointed_iteration.txt`):
    /// weights, optimizer state and data position, every `save_interval` iterations, at the
    /// end, and when the run is interrupted (SIGTERM, SIGINT).
    #[serde(default)]
    pub save: Option<std::path::PathBuf>,
    #[serde(default)]
    pub save_interval: u64,
    /// Resume from the latest checkpoint here, if there is one (the samples it consumed are
    /// skipped; the result is bit-identical to an uninterrupted run).
    #[serde(default)]
    pub load: Option<std::path::PathBuf>,
    /// One JSON line per iteration (step, loss, lr, grad_norm, num_tokens, tokens,
    /// tokens_per_s, skipped) appended to this file.
    #[serde(default)]
    pub metrics_file: Option<std::path::PathBuf>,
    /// TensorBoard event files in this folder (Megatron's tags: `lm loss`, `learning-rate`,
    /// `grad-norm`, `batch-size`, plus `tokens-per-second`), one event per iteration.
    #[serde(default)]
    pub tensorboard_dir: Option<std::path::PathBuf>,
    /// Print (stderr) and log every N iterations.
    #[serde(default = "one_u64")]
    pub log_interval: u64,
    /// Write checkpoints in the background while training goes on (megatron-core's
    /// `--async-save`): the state is copied at the iteration, written by a thread, and the next
    /// save (or the end of the run) waits for it.
    #[serde(default)]
    pub async_save: bool,
    /// Evaluate on the held-out samples (the trainer's third input) every N iterations
    /// (megatron-core's `--eval-interval`; 0: never).
    #[serde(default)]
    pub eval_interval: u64,
    /// Global batches per evaluation (`--eval-iters`); the held-out stream is read on, as
    /// megatron-core's validation iterator is.
    #[serde(default = "one_u64")]
    pub eval_iters: u64,
    /// Train LoRA adapters on the frozen model (Megatron-Bridge's `LoRA`); the weights port
    /// then carries the merged weights, `W0 + (alpha/dim) · B · A`.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Knowledge distillation from the teacher on the trainer's fourth input (Megatron-Bridge
    /// with ModelOpt's `DistillationConfig`); the loss trained on is then the balanced KD loss.
    #[serde(default)]
    pub distill: Option<crate::distill::DistillConfig>,
    /// Where to compute: `cpu`, or `cuda` / `cuda:N` (a build with the `cuda` feature).
    #[serde(default = "cpu")]
    pub device: String,
}

/// Megatron-Bridge's LoRA (`megatron/bridge/peft/lora.py`): one adapter per targeted linear
/// layer, on the fused `linear_qkv` and `linear_fc1` too (B's rows in the layer's own order).
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct LoraConfig {
    /// Module names (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`) or `*` patterns
    /// over their full names (`*.layers.0.*.linear_qkv`).
    /// (Default: linear_qkv, linear_proj, linear_fc1, linear_fc2; canonical LoRA's:
    /// linear_q, linear_k, linear_v, linear_proj, linear_fc1_gate, linear_fc1_up, linear_fc2.)
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// The rank r.
    #[serde(default = "thirty_two")]
    pub dim: usize,
    /// The scale is alpha / dim.
    #[serde(default = "thirty_two_f")]
    pub alpha: f64,
    /// A's initialization: xavier (normal, std sqrt(2 / (in + r))) or normal (std 0.2); B
    /// starts at zero.
    #[serde(default = "xavier")]
    pub lora_a_init: String,
    /// Start from these adapter weights instead (safetensors, Megatron names
    /// `….adapter.linear_in.weight` / `linear_out.weight`).
    #[serde(default)]
    pub init_from: Option<std::path::PathBuf>,
    #[serde(default = "lora_seed")]
    pub seed: u32,
    /// DoRA (Megatron-Bridge's `DoRA`, PEFT's `use_dora`): a trainable magnitude per output
    /// row, `m = ‖W0 + s·B0·A0‖_row` at the start, the output scaled by `m / ‖W0 + s·B·A‖_row`
    /// (that norm detached). Bridge's DoRA default alpha is 64.
    #[serde(default)]
    pub dora: bool,
    /// Canonical LoRA (Megatron-Bridge's `CanonicalLoRA`): separate q, k, v and gate, up
    /// adapters on the fused layers — PEFT's layout, one to one.
    #[serde(default)]
    pub canonical: bool,
    /// Dropout in the adapter while training (`nn.Dropout`: kept elements scaled by 1/(1 − p)).
    #[serde(default)]
    pub dropout: f64,
    /// `pre` (on the adapter's input, before A) or `post` (on B's output, before the scale).
    #[serde(default = "pre")]
    pub dropout_position: String,
    /// The dtype the adapters compute in (`f32`, `bf16`, `f16`; Bridge's `lora_dtype`); none:
    /// the model's (bf16 under `bf16 = true`, as Bridge casts its adapters). Another dtype than
    /// the model's goes as PEFT's does: the adapter's input cast to it, its scaled output added
    /// to the layer's in the wider of the two, the sum cast back to the layer's dtype (PEFT keeps
    /// fp32 adapters on a bf16 model this way). The master weights stay fp32 either way.
    #[serde(default)]
    pub lora_dtype: Option<String>,
}

fn pre() -> String {
    "pre".into()
}

const FUSED_TARGETS: [&str; 4] = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"];
const CANONICAL_TARGETS: [&str; 7] = [
    "linear_q",
    "linear_k",
    "linear_v",
    "linear_proj",
    "linear_fc1_gate",
    "linear_fc1_up",
    "linear_fc2",
];

impl LoraConfig {
    /// The targets, or the variant's defaults.
    pub fn targets(&self) -> Vec<String> {
        match (&self.target_modules, self.canonical) {
            (Some(t), _) => t.clone(),
            (None, false) => FUSED_TARGETS.map(String::from).to_vec(),
            (None, true) => CANONICAL_TARGETS.map(String::from).to_vec(),
        }
    }

    /// `lora_dtype` as a candle dtype (none: the model's).
    pub fn dtype(&self) -> Result<Option<candle_core::DType>> {
        use candle_core::DType;
        Ok(match self.lora_dtype.as_deref() {
            None => None,
            Some("f32" | "float32" | "fp32") => Some(DType::F32),
            Some("bf16" | "bfloat16") => Some(DType::BF16),
            Some("f16" | "float16" | "fp16") => Some(DType::F16),
            Some(other) => {
                return Err(PluginError::config(format!(
                    "lora: lora_dtype {other:?}: expected f32, bf16 or f16"
                )))
            }
        })
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("lora: {m}")));
        self.dtype()?;
        if self.dora && self.lora_dtype.is_some() {
            return bad(
                "lora_dtype with DoRA: the magnitude's norm over W0 + s·B·A would mix dtypes; DoRA adapters compute in the model's dtype".into(),
            );
        }
        if self.dim == 0 {
            return bad("dim must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha is {}; it must be > 0", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout is {}; allowed: 0 ≤ p < 1", self.dropout));
        }
        if !["pre", "post"].contains(&self.dropout_position.as_str()) {
            return bad(format!(
                "dropout_position {:?}: expected pre or post",
                self.dropout_position
            ));
        }
        if self.dora && self.dropout > 0.0 && self.dropout_position == "post" {
            return bad("DoRA's dropout is pre only (as Megatron-Bridge's)".into());
        }
        if self.canonical && self.dora {
            return bad(
                "DoRA is on the fused layers (Megatron-Bridge has no canonical DoRA)".into(),
            );
        }
        let (own, other, fix) = match self.canonical {
            true => (
                &CANONICAL_TARGETS[..],
                &FUSED_TARGETS[..],
                "the fused layers' adapters: canonical = false",
            ),
            false => (
                &FUSED_TARGETS[..],
                &CANONICAL_TARGETS[..],
                "canonical LoRA's: canonical = true",
            ),
        };
        for t in self.targets() {
            if !t.contains('*') && !own.contains(&t.as_str()) {
                let hint = if other.contains(&t.as_str()) {
                    format!(" ({t} is {fix})")
                } else {
                    String::new()
                };
                return bad(format!("target '{t}' is not one of {own:?}{hint}"));
            }
        }
        Ok(())
    }
}
fn thirty_two() -> usize {
    32
}
fn thirty_two_f() -> f64 {
    32.0
}
fn xavier() -> String {
    "xavier".into()
}
fn lora_seed() -> u32 {
    1234
}

fn initial_scale() -> f64 {
    4294967296.0
}
fn thousand() -> u64 {
    1000
}
fn two() -> u64 {
    2
}

fn cpu() -> String {
    "cpu".into()
}

impl TrainConfig {
    /// The compute device `device` names.
    pub fn device(&self) -> Result<candle_core::Device> {
        let d = self.device.trim();
        if d == "cpu" {
            return Ok(candle_core::Device::Cpu);
        }
        let ordinal = match d.strip_prefix("cuda") {
            Some("") => 0,
            Some(n) => n
                .strip_prefix(':')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    PluginError::config(format!("device = {d:?}: expected cpu, cuda or cuda:N"))
                })?,
            None => {
                return Err(PluginError::config(format!(
                    "device = {d:?}: expected cpu, cuda or cuda:N"
                )))
            }
        };
        if !cfg!(feature = "cuda") {
            return Err(PluginError::unsupported(format!(
                "device = {d:?}: this trainer was built without CUDA (cargo build --release --features bridgeflow-plugin-train/cuda)"
            )));
        }
        candle_core::Device::new_cuda(ordinal)
            .map_err(|e| PluginError::config(format!("device = {d:?}: {e}")))
    }
}

fn cosine() -> String {
    "cosine".into()
}
fn linear() -> String {
    "linear".into()
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}
fn one() -> f64 {
    1.0
}
fn one_u64() -> u64 {
    1
}
fn yes() -> bool {
    true
}

impl TrainConfig {
    /// Micro-batches per step.
    pub fn num_microbatches(&self) -> usize {
        self.global_batch_size / self.micro_batch_size
    }

    /// Each rule against the config alone, before any data flows.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        if self.bf16 && self.fp16 {
            return bad("bf16 and fp16 are exclusive".into());
        }
        if self.fp16
            && !(self.initial_loss_scale >= self.min_loss_scale && self.min_loss_scale > 0.0)
        {
            return bad(
                "fp16: initial_loss_scale must be at least min_loss_scale, which must be positive"
                    .into(),
            );
        }
        if self.seq_length == 0 || self.seq_length > 1 << 20 {
            return bad(format!(
                "seq_length is {}; allowed: 1 to 1048576",
                self.seq_length
            ));
        }
        if self.micro_batch_size == 0 || self.global_batch_size == 0 {
            return bad("global_batch_size and micro_batch_size must be at least 1".into());
        }
        if !self.global_batch_size.is_multiple_of(self.micro_batch_size) {
            return bad(format!(
                "global_batch_size {} is not a multiple of micro_batch_size {}",
                self.global_batch_size, self.micro_batch_size
            ));
        }
        if self.train_iters == 0 {
            return bad("train_iters must be at least 1".into());
        }
        for (name, v) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("lr_warmup_init", self.lr_warmup_init),
            ("weight_decay", self.weight_decay),
            ("adam_eps", self.adam_eps),
            ("clip_grad", self.clip_grad),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} is {v}; it must be a finite number ≥ 0"));
            }
        }
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} is {v}; allowed: 0 ≤ β < 1"));
            }
        }
        if let Some(d) = &self.distill {
            d.check()?;
        }
        if let Some(l) = &self.lora {
            l.check()?;
        }
        crate::schedule::Schedule::from_config(self).map(|_| ())
    }
}

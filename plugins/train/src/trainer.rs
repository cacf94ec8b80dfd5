//! One iteration as megatron-core runs it: the global batch split into micro-batches whose
//! gradients accumulate, the loss averaged per micro-batch (or over all tokens with
//! `calculate_per_token_loss`), the global-norm clip, then AdamW at the schedule's learning
//! rate for the samples consumed so far.

use crate::config::TrainConfig;
use crate::data::Sample;
use crate::distill::Teacher;
use crate::model::{ce, masked_ce_sum, Batch, Gpt, GptConfig, Positions, Tap};
use crate::optim::{clip_grad_norm, AdamW};
use crate::params::Params;
use crate::scaler::LossScaler;
use crate::schedule::Schedule;
use bridgeflow_sdk::{PluginError, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// Samples of `seq` tokens as one batch; packed samples attend within their sub-sequences.
pub fn batch(samples: &[Sample], seq: usize, positions: &Positions, dev: &Device) -> Result<Batch> {
    let b = samples.len();
    let cat = |f: fn(&Sample) -> &[u32]| -> Vec<u32> {
        samples.iter().flat_map(|s| f(s).iter().copied()).collect()
    };
    let mask: Vec<f32> = samples
        .iter()
        .flat_map(|s| s.loss_mask.iter().copied())
        .collect();
    let attn = if samples.iter().all(|s| s.packed.is_none()) {
        positions.causal()
    } else {
        let causal: (Vec<u32>, Vec<usize>) = ((0..seq as u32).collect(), vec![0, seq]);
        let rows: Vec<(&[u32], &[usize])> = samples
            .iter()
            .map(|s| {
                let (p, cu) = s.packed.as_ref().unwrap_or(&causal);
                (p.as_slice(), cu.as_slice())
            })
            .collect();
        positions.packed(&rows)?
    };
    Ok(Batch {
        tokens: Tensor::from_vec(cat(|s| &s.tokens), (b, seq), dev).map_err(ce)?,
        labels: Tensor::from_vec(cat(|s| &s.labels), (b, seq), dev).map_err(ce)?,
        loss_mask: Tensor::from_vec(mask, (b, seq), dev).map_err(ce)?,
        attn,
    })
}

/// A scalar tensor's value.
fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle_core::DType::F64)
        .and_then(|t| t.to_scalar())
        .map_err(ce)
}

/// What one iteration reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub iteration: u64,
    pub loss: f64,
    pub lr: f64,
    /// Before clipping.
    pub grad_norm: f64,
    /// Tokens in the loss.
    pub num_tokens: f64,
    /// fp16: the gradients overflowed at this loss scale and the update was skipped.
    pub skipped: bool,
    /// fp16: the loss scale the step ran at.
    pub loss_scale: Option<f64>,
    /// Distillation's losses, when a teacher trains the student.
    pub kd: Option<KdValues>,
    /// MoE: the load-balancing loss as megatron-core logs it (without its coefficient, the
    /// mean over MoE layers and micro-batches).
    pub load_balancing_loss: Option<f64>,
}

/// What distillation reports per iteration (Megatron-Bridge's "total loss", "logits
/// distillation loss", "intermediate distillation loss"): each micro-batch's masked sum, summed
/// over the global batch and divided by its tokens, as the LM loss.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct KdValues {
    pub kd_loss: f64,
    pub logits_loss: f64,
    pub intermediate_loss: f64,
}

/// One global batch's forward and backward.
pub struct Gradients {
    pub grads: BTreeMap<String, Vec<f32>>,
    /// The LM loss Megatron-Bridge logs (masked CE over the global batch's tokens).
    pub loss: f64,
    pub tokens: f64,
    pub kd: Option<KdValues>,
    pub load_balancing_loss: Option<f64>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: GptConfig,
    pub params: Params,
    pub adam: AdamW,
    pub schedule: Schedule,
    pub positions: Positions,
    pub device: Device,
    pub iteration: u64,
    pub consumed_samples: u64,
    /// Samples of the iterations that updated the weights: what the learning-rate schedule
    /// counts (megatron-core steps its scheduler only after a successful update).
    pub scheduled_samples: u64,
    /// fp16's dynamic loss scaling.
    pub scaler: Option<LossScaler>,
    /// Distillation's frozen teacher.
    pub teacher: Option<Teacher>,
}

impl Trainer {
    pub fn new(
        cfg: TrainConfig,
        model: GptConfig,
        params: Params,
        device: Device,
    ) -> Result<Trainer> {
        let schedule = Schedule::from_config(&cfg)?;
        let positions = Positions::new(&model, cfg.seq_length, &device)?;
        let adam = AdamW::new(cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps);
        let scaler = cfg.fp16.then(|| {
            LossScaler::new(
                cfg.initial_loss_scale,
                cfg.min_loss_scale,
                cfg.loss_scale_window,
                cfg.hysteresis,
            )
        });
        Ok(Trainer {
            cfg,
            model,
            params,
            adam,
            schedule,
            positions,
            device,
            iteration: 0,
            consumed_samples: 0,
            scheduled_samples: 0,
            scaler,
            teacher: None,
        })
    }

    fn batch(&self, samples: &[Sample]) -> Result<Batch> {
        batch(samples, self.cfg.seq_length, &self.positions, &self.device)
    }

    /// Adds the gradients of `loss` (a scalar) into `acc`.
    fn backward_into(&self, loss: &Tensor, acc: &mut BTreeMap<String, Vec<f32>>) -> Result<()> {
        let grads = loss.backward().map_err(ce)?;
        for (name, p) in &self.params.by_name {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Accumulated in fp32 whatever the compute dtype (megatron-core's main_grad).
            let g: Vec<f32> = g
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(ce)?;
            match acc.get_mut(name) {
                Some(a) => a.iter_mut().zip(&g).for_each(|(a, g)| *a += g),
                None => {
                    acc.insert(name.clone(), g);
                }
            }
        }
        Ok(())
    }

    /// Forward and backward over the global batch; the gradients accumulated as megatron-core
    /// averages them, and the loss Megatron-Bridge logs (masked CE over every token in the loss
    /// of the global batch, whichever way the gradients are averaged), with that token count.
    /// With a teacher, each micro-batch's objective is distillation's balanced loss.
    pub fn gradients(&self, samples: &[Sample]) -> Result<Gradients> {
        let mut gpt = Gpt::new(&self.model, &self.params);
        let distill = match (&self.teacher, &self.cfg.distill) {
            (Some(t), Some(d)) => Some((t, d, d.pairs()?)),
            _ => None,
        };
        let student_taps: Vec<Tap> = distill
            .iter()
            .flat_map(|(_, _, pairs)| pairs.iter().map(|p| p.student))
            .collect();
        let micro = self.cfg.num_microbatches();
        let mut acc = BTreeMap::new();
        let (mut loss_sum, mut tokens) = (0.0, 0.0);
        let mut kd = KdValues::default();
        let mut balance = 0.0;
        for (j, mb) in samples.chunks(self.cfg.micro_batch_size).enumerate() {
            let iteration = self.iteration + 1;
            gpt.dropout = self
                .cfg
                .lora
                .as_ref()
                .and_then(|l| crate::lora::Dropout::new(l, iteration, j as u64));
            let batch = self.batch(mb)?;
            let out = gpt
                .forward(&batch.tokens, &batch.attn, &student_taps)
                .map_err(ce)?;
            let (logits, hidden) = (out.logits, out.taps);
            let (sum, n) = masked_ce_sum(&logits, &batch).map_err(ce)?;
            loss_sum += scalar(&sum)?;
            tokens += n;
            let objective = match &distill {
                Some((teacher, d, pairs)) => {
                    let taps: Vec<Tap> = pairs.iter().map(|p| p.teacher).collect();
                    let tb =
                        self::batch(mb, self.cfg.seq_length, &teacher.positions, &self.device)?;
                    let (t_logits, t_hidden) =
                        teacher.forward(&tb.tokens, &tb.attn, &taps).map_err(ce)?;
                    let o = d
                        .objective(
                            &self.params,
                            pairs,
                            &sum,
                            &logits,
                            &t_logits,
                            &hidden,
                            &t_hidden,
                            &batch.loss_mask,
                        )
                        .map_err(ce)?;
                    kd.kd_loss += o.total_value;
                    kd.logits_loss += o.logits_value;
                    kd.intermediate_loss += o.intermediate_value;
                    o.total
                }
                None => sum,
            };
            let scaled = if self.cfg.calculate_per_token_loss {
                objective
            } else {
                ((objective / n.max(1.0)).and_then(|t| t / micro as f64)).map_err(ce)?
            };
            let scaled = match &out.aux_loss {
                Some(aux) => {
                    balance += scalar(aux)?;
                    (scaled + self.aux_loss_weight(aux, &batch)?).map_err(ce)?
                }
                None => scaled,
            };
            let scaled = match &self.scaler {
                Some(s) => (scaled * s.scale).map_err(ce)?,
                None => scaled,
            };
            self.backward_into(&scaled, &mut acc)?;
        }
        if let Some(s) = &self.scaler {
            // Unscaled by the reciprocal in fp32, as megatron-core's optimizer does.
            let inv = (1.0 / s.scale) as f32;
            acc.values_mut().flatten().for_each(|g| *g *= inv);
        }
        if self.cfg.calculate_per_token_loss {
            let inv = (1.0 / tokens.max(1.0)) as f32;
            acc.values_mut().flatten().for_each(|g| *g *= inv);
        }
        let per_token = |v: f64| v / tokens.max(1.0);
        let load_balancing_loss = self.model.moe.as_ref().and_then(|m| {
            (m.aux_loss_coeff > 0.0)
                .then(|| balance / m.aux_loss_coeff / (micro * self.model.num_layers) as f64)
        });
        Ok(Gradients {
            grads: acc,
            loss: per_token(loss_sum),
            tokens,
            load_balancing_loss,
            kd: distill.map(|_| KdValues {
                kd_loss: per_token(kd.kd_loss),
                logits_loss: per_token(kd.logits_loss),
                intermediate_loss: per_token(kd.intermediate_loss),
            }),
        })
    }

    /// A micro-batch's load-balancing loss as megatron-core weighs its gradient: over the
    /// micro-batches like the main loss (`MoEAuxLossAutoScaler`'s scale 1/num_microbatches),
    /// or with `calculate_per_token_loss` times the micro-batch's routed tokens, which the
    /// division of every gradient by the global batch's loss tokens then cancels as megatron-core
    /// intends.
    fn aux_loss_weight(&self, aux: &Tensor, batch: &Batch) -> Result<Tensor> {
        let weight = if self.cfg.calculate_per_token_loss {
            batch.tokens.elem_count() as f64
        } else {
            1.0 / self.cfg.num_microbatches() as f64
        };
        (aux * weight).map_err(ce)
    }

    /// The loss on held-out `samples` with the current weights, no gradients: the masked
    /// cross-entropy summed over every micro-batch over the tokens in the loss (megatron-core's
    /// evaluation), and that token count.
    pub fn evaluate(&self, samples: &[Sample]) -> Result<(f64, f64)> {
        let gpt = Gpt::new(&self.model, &self.params);
        let (mut sum, mut tokens) = (0.0, 0.0);
        for mb in samples.chunks(self.cfg.micro_batch_size) {
            let (s, n) = gpt.loss_sum(&self.batch(mb)?).map_err(ce)?;
            sum += scalar(&s)?;
            tokens += n;
        }
        Ok((sum / tokens.max(1.0), tokens))
    }

    /// One iteration on `samples` (exactly one global batch).
    pub fn step(&mut self, samples: &[Sample]) -> Result<Step> {
        if samples.len() != self.cfg.global_batch_size {
            return Err(PluginError::internal(format!(
                "a step takes {} samples, got {}",
                self.cfg.global_batch_size,
                samples.len()
            )));
        }
        let lr = self.schedule.lr(self.scheduled_samples);
        let Gradients {
            mut grads,
            loss,
            tokens: num_tokens,
            kd,
            load_balancing_loss,
        } = self.gradients(samples)?;
        let loss_scale = self.scaler.as_ref().map(|s| s.scale);
        if let Some(scaler) = self.scaler.as_mut() {
            let found_inf = grads.values().flatten().any(|g| !g.is_finite());
            scaler.update(found_inf);
            if found_inf {
                // Skipped: weights, moments and schedule stay; the data moves on.
                self.iteration += 1;
                self.consumed_samples += samples.len() as u64;
                return Ok(Step {
                    iteration: self.iteration,
                    loss,
                    lr,
                    grad_norm: f64::NAN,
                    num_tokens,
                    skipped: true,
                    loss_scale,
                    kd,
                    load_balancing_loss,
                });
            }
        }
        if !loss.is_finite() {
            return Err(PluginError::mismatch(format!(
                "iteration {}: the loss is {loss}; stopping (the weights are those of iteration {})",
                self.iteration + 1,
                self.iteration
            )));
        }
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.clip_grad);
        self.adam
            .update(&mut self.params, &grads, lr, self.cfg.weight_decay);
        self.params.publish()?;
        self.iteration += 1;
        self.consumed_samples += samples.len() as u64;
        self.scheduled_samples += samples.len() as u64;
        Ok(Step {
            iteration: self.iteration,
            loss,
            lr,
            grad_norm,
            num_tokens,
            skipped: false,
            loss_scale,
            kd,
            load_balancing_loss,
        })
    }
}

//! megatron-core's learning-rate schedule (`OptimizerParamScheduler.get_lr`), counted in
//! samples: iteration k (1-based) runs at `lr(n = (k − 1) · global_batch_size)`, so the first
//! runs at `lr_warmup_init` — the scheduler steps after the optimizer.

use crate::config::TrainConfig;
use bridgeflow_sdk::{PluginError, Result};
use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
    InverseSquareRoot,
    /// Warmup, stable, then a final decay of `decay_steps` samples.
    Wsd {
        decay_steps: u64,
        shape: WsdShape,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WsdShape {
    Linear,
    Cosine,
    Exponential,
    MinusSqrt,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub init_lr: f64,
    /// In samples.
    pub warmup_steps: u64,
    /// In samples.
    pub decay_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    pub fn from_config(c: &TrainConfig) -> Result<Schedule> {
        let gbs = c.global_batch_size as u64;
        let samples = |iters: u64| {
            iters.checked_mul(gbs).ok_or_else(|| {
                PluginError::config(format!("{iters} iterations × {gbs} samples overflows"))
            })
        };
        let decay = match c.lr_decay_style.as_str() {
            "constant" => Decay::Constant,
            "linear" => Decay::Linear,
            "cosine" => Decay::Cosine,
            "inverse-square-root" => Decay::InverseSquareRoot,
            "WSD" | "wsd" => Decay::Wsd {
                decay_steps: samples(c.lr_wsd_decay_iters.unwrap_or(0))?,
                shape: match c.lr_wsd_decay_style.as_str() {
                    "linear" => WsdShape::Linear,
                    "cosine" => WsdShape::Cosine,
                    "exponential" => WsdShape::Exponential,
                    "minus_sqrt" => WsdShape::MinusSqrt,
                    other => {
                        return Err(PluginError::config(format!(
                        "lr_wsd_decay_style '{other}': expected linear, cosine, exponential or minus_sqrt"
                    )))
                    }
                },
            },
            other => {
                return Err(PluginError::config(format!(
                "lr_decay_style '{other}': expected constant, linear, cosine, inverse-square-root or WSD"
            )))
            }
        };
        let s = Schedule {
            max_lr: c.lr,
            min_lr: c.min_lr,
            init_lr: c.lr_warmup_init,
            warmup_steps: samples(c.lr_warmup_iters)?,
            decay_steps: samples(c.lr_decay_iters.unwrap_or(c.train_iters))?,
            decay,
        };
        if s.min_lr > s.max_lr {
            return Err(PluginError::config(format!(
                "min_lr {} is above lr {}",
                s.min_lr, s.max_lr
            )));
        }
        if s.decay != Decay::Constant && s.warmup_steps >= s.decay_steps && s.decay_steps > 0 {
            return Err(PluginError::config(
                "lr_warmup_iters must be below lr_decay_iters".to_string(),
            ));
        }
        Ok(s)
    }

    /// The learning rate after `n` samples.
    pub fn lr(&self, n: u64) -> f64 {
        if self.warmup_steps > 0 && n <= self.warmup_steps {
            return self.init_lr
                + (self.max_lr - self.init_lr) * n as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => self.max_lr,
            _ if n > self.decay_steps => self.min_lr,
            Decay::InverseSquareRoot => {
                let warmup = self.warmup_steps.max(1) as f64;
                (self.max_lr * warmup.sqrt() / (n.max(1) as f64).sqrt()).max(self.min_lr)
            }
            Decay::Linear | Decay::Cosine => {
                let span = (self.decay_steps - self.warmup_steps) as f64;
                let ratio = (n - self.warmup_steps) as f64 / span;
                let coeff = match self.decay {
                    Decay::Linear => 1.0 - ratio,
                    _ => 0.5 * ((PI * ratio).cos() + 1.0),
                };
                self.min_lr + coeff * (self.max_lr - self.min_lr)
            }
            Decay::Wsd { decay_steps, shape } => self.wsd(n, decay_steps, shape),
        }
    }

    fn wsd(&self, n: u64, decay_steps: u64, shape: WsdShape) -> f64 {
        let anneal_start = self.decay_steps.saturating_sub(decay_steps);
        if n <= anneal_start {
            return self.max_lr;
        }
        let ratio = (n - anneal_start) as f64 / decay_steps.max(1) as f64;
        let coeff = match shape {
            WsdShape::Linear => 1.0 - ratio,
            WsdShape::Cosine => 0.5 * ((PI * ratio).cos() + 1.0),
            WsdShape::Exponential => 2.0 * 0.5f64.powf(ratio) - 1.0,
            WsdShape::MinusSqrt => 1.0 - ratio.sqrt(),
        };
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(style: &str) -> Schedule {
        Schedule {
            max_lr: 1e-4,
            min_lr: 1e-5,
            init_lr: 0.0,
            warmup_steps: 2 * 4,
            decay_steps: 6 * 4,
            decay: match style {
                "linear" => Decay::Linear,
                _ => Decay::Cosine,
            },
        }
    }

    /// megatron-core 0.19.2's OptimizerParamScheduler: GBS 4, warmup 2 iterations, decay 6,
    /// cosine from 1e-4 to 1e-5; iteration k runs at lr((k − 1) · 4).
    #[test]
    fn cosine_in_samples_as_megatron() {
        let s = schedule("cosine");
        let want = [0.0, 5e-5, 1e-4, 8.682e-5, 5.5e-5, 2.318e-5, 1e-5, 1e-5];
        for (k, w) in want.iter().enumerate() {
            let got = s.lr(k as u64 * 4);
            assert!((got - w).abs() < 1e-8, "iteration {}: {got} vs {w}", k + 1);
        }
    }

    #[test]
    fn linear_reaches_min_at_the_end() {
        let s = schedule("linear");
        assert!((s.lr(16) - (1e-5 + 0.5 * 9e-5)).abs() < 1e-12);
        assert_eq!(s.lr(24), 1e-5);
        assert_eq!(s.lr(1000), 1e-5);
    }
}

//! Knowledge distillation as Megatron-Bridge trains it with ModelOpt
//! (`megatron/bridge/training/post_training/distillation.py`,
//! `modelopt/torch/distill/plugins/megatron.py`): a frozen teacher run forward on the student's
//! micro-batch, and per token
//!
//! - `LogitsKLLoss`: the forward KL(teacher ‖ student) of `log_softmax(logits / T)` in fp32,
//!   `Σ_v exp(q)·(q − p)`, no T² factor; `TopKLogitsKLLoss` the same over the teacher's top k;
//! - `HiddenStateCosineLoss` (`1 − cos`, torch's `cosine_embedding_loss`) or `MSELoss` (mean
//!   over hidden) between paired hidden states;
//!
//! each reduced to a masked sum over the micro-batch's tokens, then the
//! `LogitsAndIntermediatesLossBalancer`: intermediates averaged and rescaled to the logits
//! loss's value; with `skip_lm_loss` the total is logits + intermediates, otherwise that KD
//! loss is rescaled to the LM loss's value and `total = lm + kd_loss_scale · kd`. The total then
//! goes where the LM loss's masked sum would (divided by the micro-batch's tokens, and so on).

use crate::model::{log_sum_exp, Attn, Gpt, GptConfig, Positions, Tap};
use crate::params::Params;
use bridgeflow_sdk::{schemars, serde, PluginError, Result};
use candle_core::{DType, Tensor, D};

type T = candle_core::Result<Tensor>;

/// ModelOpt's `DistillationConfig` (Bridge's `ModelOptDistillConfig`), its defaults.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct DistillConfig {
    /// Logits are divided by this before the softmaxes (`logit_kl_temperature`).
    #[serde(default = "one", alias = "logit_kl_temperature")]
    pub temperature: f64,
    /// The KL over the teacher's top k logits only (`logit_kl_topk`; none: the whole vocabulary).
    #[serde(default, alias = "logit_kl_topk")]
    pub topk: Option<usize>,
    /// Train on the distillation losses alone (true), or on `lm + kd_loss_scale · kd` with kd
    /// rescaled to the LM loss's value.
    #[serde(default = "yes")]
    pub skip_lm_loss: bool,
    #[serde(default = "one")]
    pub kd_loss_scale: f64,
    /// `[student layer, teacher layer]` or `[student, teacher, "cosine" | "mse"]`, layers named
    /// `decoder.layers.N` (that layer's output) or `decoder.final_layernorm`.
    #[serde(default)]
    pub intermediate_layer_pairs: Vec<Vec<String>>,
    /// The std of the projection's initial weight when the pairs join different hidden sizes
    /// (megatron-core's `init_method_std`, which ModelOpt's `ProjectionLayer` draws with).
    #[serde(default = "std_default")]
    pub init_method_std: f64,
    /// Seeds the projection's initial weight.
    #[serde(default = "seed_default")]
    pub seed: u32,
    /// Start the projection from these values instead (safetensors with
    /// `distill.projection.weight` and `distill.projection.bias`: a previous run's, or the
    /// reference's in a comparison).
    #[serde(default)]
    pub projection_from: Option<std::path::PathBuf>,
}

fn std_default() -> f64 {
    0.02
}
fn seed_default() -> u32 {
    1234
}

/// ModelOpt's `ProjectionLayer` (`nn.Linear(student hidden, teacher hidden)`, one shared by
/// every intermediate pair): trained with the student, kept in its checkpoints, not in the
/// weights it hands out.
pub const PROJECTION_WEIGHT: &str = "distill.projection.weight";
pub const PROJECTION_BIAS: &str = "distill.projection.bias";

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// How a pair of hidden states is compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Intermediate {
    Cosine,
    Mse,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub student: Tap,
    pub teacher: Tap,
    pub loss: Intermediate,
}

impl DistillConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("distill: {m}")));
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature is {}; it must be > 0",
                self.temperature
            ));
        }
        if !(self.kd_loss_scale.is_finite() && self.kd_loss_scale > 0.0) {
            return bad(format!(
                "kd_loss_scale is {}; it must be > 0",
                self.kd_loss_scale
            ));
        }
        if self.topk == Some(0) {
            return bad("topk must be at least 1".into());
        }
        self.pairs().map(|_| ())
    }

    /// The intermediate pairs, parsed.
    pub fn pairs(&self) -> Result<Vec<Pair>> {
        self.intermediate_layer_pairs
            .iter()
            .map(|p| pair(p))
            .collect()
    }

    /// Every rule that needs both models: the same vocabulary, taps inside each model, paired
    /// hidden states of one size (ModelOpt's projection layer is not built).
    pub fn check_models(&self, student: &GptConfig, teacher: &GptConfig) -> Result<()> {
        if student.vocab_size != teacher.vocab_size {
            return Err(PluginError::config(format!(
                "distill: the teacher's vocabulary has {} entries, the student's {}; the logits must align",
                teacher.vocab_size, student.vocab_size
            )));
        }
        if let Some(k) = self.topk.filter(|&k| k > student.vocab_size) {
            return Err(PluginError::config(format!(
                "distill: topk {k} is larger than the vocabulary ({})",
                student.vocab_size
            )));
        }
        for p in self.pairs()? {
            for (tap, m, who) in [
                (p.student, student, "student"),
                (p.teacher, teacher, "teacher"),
            ] {
                if let Tap::Layer(l) = tap {
                    if l >= m.num_layers {
                        return Err(PluginError::config(format!(
                            "distill: decoder.layers.{l} is not in the {who} ({} layers)",
                            m.num_layers
                        )));
                    }
                }
            }
        }
        if self.projection_from.is_some() && !self.projects(student, teacher) {
            return Err(PluginError::config(format!(
                "distill: projection_from is set, but nothing is projected (the pairs join hidden sizes {} and {}; a projection needs intermediate pairs between different sizes)",
                student.hidden_size, teacher.hidden_size
            )));
        }
        if !(self.init_method_std.is_finite() && self.init_method_std > 0.0) {
            return Err(PluginError::config(format!(
                "distill: init_method_std is {}; it must be > 0",
                self.init_method_std
            )));
        }
        Ok(())
    }

    /// Whether the student's hidden states are projected to the teacher's size: intermediate
    /// pairs between models of different hidden sizes (ModelOpt's `ProjectionLayer` is an
    /// identity otherwise).
    pub fn projects(&self, student: &GptConfig, teacher: &GptConfig) -> bool {
        !self.intermediate_layer_pairs.is_empty() && student.hidden_size != teacher.hidden_size
    }

    /// The projection's parameters, trainable, among the student's: the weight
    /// `[teacher hidden, student hidden]` drawn from normal(0, init_method_std) and the bias
    /// zero, as `ProjectionLayer._init_weights` does. Weight decay as any matrix and bias.
    pub fn attach_projection(
        &self,
        student: &GptConfig,
        teacher: &GptConfig,
        params: &mut Params,
        dev: &candle_core::Device,
    ) -> Result<()> {
        let (from, to) = (student.hidden_size, teacher.hidden_size);
        let (weight, bias) = match &self.projection_from {
            Some(path) => self.given_projection(path, from, to)?,
            None => {
                let mut normals = crate::init::Normals::seeded(self.seed);
                let weight = (0..to * from)
                    .map(|_| (normals.next() * self.init_method_std) as f32)
                    .collect();
                (weight, vec![0.0; to])
            }
        };
        let f32_ = bridgeflow_sdk::DType::F32;
        params.insert(PROJECTION_WEIGHT, vec![to, from], f32_, weight, dev)?;
        params.insert(PROJECTION_BIAS, vec![to], f32_, bias, dev)
    }

    /// `projection_from`'s weight and bias, their shapes checked against the two models.
    fn given_projection(
        &self,
        path: &std::path::Path,
        from: usize,
        to: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut given = crate::peft::read_f32(path)?;
        let mut take = |name: &str, want: Vec<usize>| {
            match given.remove(name) {
                Some((shape, v)) if shape == want => Ok(v),
                Some((shape, _)) => Err(PluginError::shape(format!(
                    "{}: '{name}' is {shape:?}; the student's hidden size {from} to the teacher's {to} needs {want:?}",
                    path.display()
                ))),
                None => Err(PluginError::shape(format!(
                    "{}: no '{name}'",
                    path.display()
                ))),
            }
        };
        Ok((
            take(PROJECTION_WEIGHT, vec![to, from])?,
            take(PROJECTION_BIAS, vec![to])?,
        ))
    }
}

/// `h·Wᵀ + b` over the last axis, when the student's parameters hold a projection.
fn project(h: &Tensor, params: &Params) -> T {
    match (
        params.tensor(PROJECTION_WEIGHT),
        params.tensor(PROJECTION_BIAS),
    ) {
        (Some(w), Some(b)) => crate::model::linear(h, w)?.broadcast_add(b),
        _ => Ok(h.clone()),
    }
}

fn pair(p: &[String]) -> Result<Pair> {
    let bad = || {
        PluginError::config(format!(
            "distill: intermediate pair {p:?}: expected [student layer, teacher layer(, cosine|mse)] with layers decoder.layers.N or decoder.final_layernorm"
        ))
    };
    let (s, t, f) = match p {
        [s, t] => (s, t, "cosine"),
        [s, t, f] => (s, t, f.as_str()),
        _ => return Err(bad()),
    };
    Ok(Pair {
        student: Tap::parse(s).ok_or_else(bad)?,
        teacher: Tap::parse(t).ok_or_else(bad)?,
        loss: match f {
            "cosine" => Intermediate::Cosine,
            "mse" => Intermediate::Mse,
            _ => return Err(bad()),
        },
    })
}

/// The frozen teacher: its own config, parameters (none trainable) and RoPE tables.
pub struct Teacher {
    pub cfg: GptConfig,
    pub params: Params,
    pub positions: Positions,
}

impl Teacher {
    /// Logits and the hidden states at `taps`, detached (forward only).
    pub fn forward(
        &self,
        tokens: &Tensor,
        attn: &Attn,
        taps: &[Tap],
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let gpt = Gpt::new(&self.cfg, &self.params);
        let f = gpt.forward(tokens, attn, taps)?;
        Ok((
            f.logits.detach(),
            f.taps.into_iter().map(|h| h.detach()).collect(),
        ))
    }
}

/// `log_softmax` over the last axis of `[n, v]`.
fn log_softmax(x: &Tensor) -> T {
    x.broadcast_sub(&log_sum_exp(x)?)
}

/// Per token `[n]`: KL(teacher ‖ student) of the softmaxes at temperature `t`, over the
/// teacher's top `topk` logits when set (`student`, `teacher`: `[n, v]`).
pub fn logits_kl(student: &Tensor, teacher: &Tensor, t: f64, topk: Option<usize>) -> T {
    let (student, teacher) = match topk {
        Some(k) if k < teacher.dim(D::Minus1)? => {
            let idx = teacher
                .arg_sort_last_dim(false)?
                .narrow(D::Minus1, 0, k)?
                .contiguous()?;
            (
                student.gather(&idx, D::Minus1)?,
                teacher.gather(&idx, D::Minus1)?,
            )
        }
        _ => (student.clone(), teacher.clone()),
    };
    let p = log_softmax(&(student.to_dtype(DType::F32)? / t)?)?;
    let q = log_softmax(&(teacher.to_dtype(DType::F32)? / t)?)?;
    (q.exp()? * (q - p)?)?.sum(D::Minus1)
}

/// Per token: `1 − cos(s, t)` as torch's `cosine_embedding_loss` with target 1 (ε = 1e-12 added
/// to each squared norm).
pub fn cosine(s: &Tensor, t: &Tensor) -> T {
    let dot = (s * t)?.sum(D::Minus1)?;
    let ss = (s.sqr()?.sum(D::Minus1)? + 1e-12)?;
    let tt = (t.sqr()?.sum(D::Minus1)? + 1e-12)?;
    let cos = (dot / (ss * tt)?.sqrt()?)?;
    cos.affine(-1.0, 1.0)
}

/// Per token: the squared error's mean over the hidden axis.
pub fn mse(s: &Tensor, t: &Tensor) -> T {
    (s - t)?.sqr()?.mean(D::Minus1)
}

/// One micro-batch's distillation: the total to train on (a masked sum) and the values reported.
pub struct Objective {
    pub total: Tensor,
    pub total_value: f64,
    pub logits_value: f64,
    pub intermediate_value: f64,
}

fn value(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

impl DistillConfig {
    /// The balanced objective of one micro-batch. `lm`: the student's masked CE sum; logits
    /// `[b, s, v]`; hidden states paired as `pairs` (the student's projected to the teacher's
    /// size when `student` holds the projection); `mask` `[b, s]`.
    #[allow(clippy::too_many_arguments)]
    pub fn objective(
        &self,
        student: &Params,
        pairs: &[Pair],
        lm: &Tensor,
        student_logits: &Tensor,
        teacher_logits: &Tensor,
        student_hidden: &[Tensor],
        teacher_hidden: &[Tensor],
        mask: &Tensor,
    ) -> candle_core::Result<Objective> {
        let v = student_logits.dim(D::Minus1)?;
        let mask = mask.flatten_all()?;
        let masked_sum = |per_token: Tensor| (per_token.flatten_all()? * &mask)?.sum_all();
        let logits = masked_sum(logits_kl(
            &student_logits.reshape(((), v))?,
            &teacher_logits.reshape(((), v))?,
            self.temperature,
            self.topk,
        )?)?;
        let mut inter = Vec::with_capacity(pairs.len());
        for (p, (s, t)) in pairs.iter().zip(student_hidden.iter().zip(teacher_hidden)) {
            let s = project(s, student)?;
            let (s, t) = (s.to_dtype(DType::F32)?, t.to_dtype(DType::F32)?);
            inter.push(masked_sum(match p.loss {
                Intermediate::Cosine => cosine(&s, &t)?,
                Intermediate::Mse => mse(&s, &t)?,
            })?);
        }
        self.balance(lm, logits, &inter)
    }

    /// `LogitsAndIntermediatesLossBalancer.forward`, on the masked sums.
    pub fn balance(
        &self,
        lm: &Tensor,
        logits: Tensor,
        inter: &[Tensor],
    ) -> candle_core::Result<Objective> {
        let logits_value = value(&logits)?;
        let (mut intermediate, mut intermediate_value) = (None, 0.0);
        if !inter.is_empty() {
            let mean = (Tensor::stack(inter, 0)?.sum_all()? / inter.len() as f64)?;
            intermediate_value = value(&mean)?;
            if intermediate_value > 0.0 {
                // Rescaled to the logits loss's value (the ratio a constant).
                intermediate = Some((mean * (logits_value / intermediate_value))?);
            }
        }
        let kd = match intermediate {
            Some(i) => (logits + i)?,
            None => logits,
        };
        let total = if self.skip_lm_loss {
            kd
        } else {
            let (kd_value, lm_value) = (value(&kd)?, value(lm)?);
            let kd = if kd_value > 0.0 && lm_value > 0.0 {
                (kd * (lm_value / kd_value))?
            } else {
                kd
            };
            (lm + (kd * self.kd_loss_scale)?)?
        };
        Ok(Objective {
            total_value: value(&total)?,
            total,
            logits_value,
            intermediate_value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    /// The KL by hand in f64 for two tokens over a vocabulary of 3.
    #[test]
    fn kl_is_teacher_to_student_without_t_squared() {
        let (s, te) = (
            [0.5f32, -1.0, 2.0, 0.0, 0.3, -0.2],
            [1.0f32, 0.0, 1.5, -0.5, 0.2, 0.9],
        );
        for temp in [1.0, 2.0] {
            let got: Vec<f32> = logits_kl(&t(&s, (2, 3)), &t(&te, (2, 3)), temp, None)
                .unwrap()
                .to_vec1()
                .unwrap();
            for row in 0..2 {
                let ls = |x: &[f32]| {
                    let z: Vec<f64> = x.iter().map(|v| *v as f64 / temp).collect();
                    let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
                    z.iter().map(|v| v - lse).collect::<Vec<f64>>()
                };
                let (p, q) = (ls(&s[row * 3..row * 3 + 3]), ls(&te[row * 3..row * 3 + 3]));
                let want: f64 = (0..3).map(|i| q[i].exp() * (q[i] - p[i])).sum();
                assert!(
                    (got[row] as f64 - want).abs() < 1e-6,
                    "T={temp}: {} vs {want}",
                    got[row]
                );
            }
        }
        // Top-1: a single entry, whose softmax is 1 on both sides: no loss.
        let top1: Vec<f32> = logits_kl(&t(&s, (2, 3)), &t(&te, (2, 3)), 1.0, Some(1))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(top1, [0.0, 0.0]);
    }

    #[test]
    fn balancer_matches_modelopt() {
        let dev = Device::Cpu;
        let s = |v: f32| Tensor::new(v, &dev).unwrap();
        let cfg = |skip: bool| DistillConfig {
            temperature: 1.0,
            topk: None,
            skip_lm_loss: skip,
            kd_loss_scale: 0.5,
            intermediate_layer_pairs: vec![],
            init_method_std: 0.02,
            seed: 1,
            projection_from: None,
        };
        // skip_lm_loss: logits + intermediates rescaled to the logits' value.
        let o = cfg(true)
            .balance(&s(9.0), s(2.0), &[s(1.0), s(3.0)])
            .unwrap();
        assert!((o.total_value - 4.0).abs() < 1e-6 && (o.intermediate_value - 2.0).abs() < 1e-6);
        // Otherwise: kd rescaled to lm's value, lm + 0.5·kd.
        let o = cfg(false).balance(&s(9.0), s(2.0), &[]).unwrap();
        assert!((o.total_value - 13.5).abs() < 1e-5, "{}", o.total_value);
    }

    #[test]
    fn pairs_are_parsed_strictly() {
        let cfg = |p: Vec<&str>| DistillConfig {
            temperature: 1.0,
            topk: None,
            skip_lm_loss: true,
            kd_loss_scale: 1.0,
            intermediate_layer_pairs: vec![p.into_iter().map(String::from).collect()],
            init_method_std: 0.02,
            seed: 1,
            projection_from: None,
        };
        let p = cfg(vec!["decoder.layers.0", "decoder.final_layernorm", "mse"])
            .pairs()
            .unwrap();
        assert_eq!(
            p[0],
            Pair {
                student: Tap::Layer(0),
                teacher: Tap::FinalNorm,
                loss: Intermediate::Mse
            }
        );
        assert!(cfg(vec!["decoder.layers.x", "decoder.final_layernorm"])
            .check()
            .is_err());
        assert!(cfg(vec!["decoder.layers.0", "decoder.layers.1", "l1"])
            .check()
            .is_err());
        assert!(cfg(vec!["decoder.layers.0"]).check().is_err());
    }
}

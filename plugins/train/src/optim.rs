//! AdamW as megatron-core runs it on CPU (`torch.optim.AdamW`, decoupled weight decay, bias
//! correction), over fp32 master values, and the global gradient-norm clip. Written over plain
//! slices so the order of floating-point operations is torch's, step for step.

use crate::params::Params;
use std::collections::BTreeMap;

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken (the bias corrections' exponent).
    pub step: u64,
    /// Per parameter: first and second moments.
    pub moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64) -> AdamW {
        AdamW {
            beta1,
            beta2,
            eps,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// One update of every parameter from `grads` at learning rate `lr`; weight decay `wd` on
    /// the parameters that decay.
    pub fn update(
        &mut self,
        params: &mut Params,
        grads: &BTreeMap<String, Vec<f32>>,
        lr: f64,
        wd: f64,
    ) {
        self.step += 1;
        let t = self.step as f64;
        let bias1 = 1.0 - self.beta1.powf(t);
        let bias2_sqrt = (1.0 - self.beta2.powf(t)).sqrt();
        let step_size = (lr / bias1) as f32;
        let (b1, b2) = (self.beta1, self.beta2);
        for (name, p) in params.by_name.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let n = p.master.len();
            let (m, v) = self
                .moments
                .entry(name.clone())
                .or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
            let decay = if p.decay { (1.0 - lr * wd) as f32 } else { 1.0 };
            adamw_kernel(
                &mut p.master,
                g,
                m,
                v,
                Coeffs {
                    decay,
                    one_minus_b1: (1.0 - b1) as f32,
                    b2: b2 as f32,
                    one_minus_b2: (1.0 - b2) as f32,
                    bias2_sqrt: bias2_sqrt as f32,
                    eps: self.eps as f32,
                    step_size,
                },
            );
        }
    }
}

struct Coeffs {
    decay: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    bias2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// torch's `_single_tensor_adamw`, element by element: `p *= 1 − lr·wd`; `m.lerp_(g, 1 − β1)`;
/// `v = v·β2 + (1 − β2)·g²`; `p −= step_size · m / (√v / √(1 − β2ᵗ) + eps)`.
fn adamw_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coeffs) {
    for i in 0..p.len() {
        if c.decay != 1.0 {
            p[i] *= c.decay;
        }
        m[i] = lerp(m[i], g[i], c.one_minus_b1);
        v[i] = v[i] * c.b2 + c.one_minus_b2 * g[i] * g[i];
        let denom = v[i].sqrt() / c.bias2_sqrt + c.eps;
        p[i] += -c.step_size * (m[i] / denom);
    }
}

/// torch's `lerp`: exact at both ends.
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// The global L2 norm of every gradient (each tensor's norm, then the norm of those, as
/// `torch.nn.utils.clip_grad_norm_`), and, when `max_norm > 0`, the gradients scaled by
/// `max_norm / (norm + 1e-6)` if that is below 1. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Vec<f32>>, max_norm: f64) -> f64 {
    let norms: Vec<f64> = grads
        .values()
        .map(|g| {
            g.iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt() as f32 as f64
        })
        .collect();
    let total = norms.iter().map(|n| n * n).sum::<f64>().sqrt() as f32;
    if max_norm > 0.0 {
        let coeff = max_norm as f32 / (total + 1e-6);
        if coeff < 1.0 {
            for g in grads.values_mut() {
                for x in g.iter_mut() {
                    *x *= coeff;
                }
            }
        }
    }
    total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_scales_only_above_the_threshold() {
        let mut g: BTreeMap<String, Vec<f32>> = [("a".to_string(), vec![3.0, 4.0])].into();
        assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
        assert_eq!(g["a"], vec![3.0, 4.0]);
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        let n = (g["a"][0] * g["a"][0] + g["a"][1] * g["a"][1]).sqrt();
        assert!((n - 1.0).abs() < 1e-6, "{n}");
    }

    /// One AdamW step by hand: with bias correction the first step moves each weight by
    /// lr · sign(g) (plus decay).
    #[test]
    fn first_step_moves_by_lr() {
        let (mut p, g) = (vec![1.0f32, -1.0], vec![0.5f32, -2.0]);
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        let c = Coeffs {
            decay: 1.0 - 0.1 * 0.01,
            one_minus_b1: 0.1,
            b2: 0.999,
            one_minus_b2: 0.001,
            bias2_sqrt: (0.001f64).sqrt() as f32,
            eps: 1e-8,
            step_size: (0.1 / 0.1) as f32,
        };
        adamw_kernel(&mut p, &g, &mut m, &mut v, c);
        assert!((p[0] - (0.999 - 0.1)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-0.999 + 0.1)).abs() < 1e-6, "{p:?}");
    }
}

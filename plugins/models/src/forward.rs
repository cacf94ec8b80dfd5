//! A small fp32 forward pass of the Llama family straight from Megatron-layout tensors, for the
//! logits check of a conversion: embeddings, RMSNorm, fused QKV (split per query group), RoPE
//! (rotate-half, as HF and megatron-core's default), grouped-query causal attention, SwiGLU,
//! final norm, output layer (or the tied embedding). Plain loops: it is meant for the small
//! verification models the checks run on, not for serving.

use crate::mapper::ModelConfig;
use bridgeflow_megatron::mapping::split_qkv;
use bridgeflow_megatron::names;
use bridgeflow_sdk::numeric::decode_f64;
use bridgeflow_sdk::{PluginError, Result, Tensor};
use std::collections::HashMap;

pub struct Weights {
    pub tensors: HashMap<String, (Vec<u64>, Vec<f32>)>,
}

impl Weights {
    pub fn new() -> Weights {
        Weights {
            tensors: HashMap::new(),
        }
    }
    /// Keeps a decoder tensor (a VLM's language model without its `language_model.` prefix;
    /// its vision tower is not needed for text).
    pub fn add(&mut self, t: &Tensor) {
        if t.name().starts_with(names::VISION) {
            return;
        }
        let name = names::without_language_model(t.name());
        let mut v = Vec::new();
        decode_f64(t.info.dtype, t.bytes(), &mut v);
        self.tensors.insert(
            name.to_string(),
            (
                t.info.shape.to_vec(),
                v.into_iter().map(|x| x as f32).collect(),
            ),
        );
    }
    fn get(&self, name: &str) -> Result<&(Vec<u64>, Vec<f32>)> {
        self.tensors.get(name).ok_or_else(|| {
            PluginError::shape(format!(
                "the logits check needs '{name}', which the stream lacks"
            ))
        })
    }
}

impl Default for Weights {
    fn default() -> Self {
        Weights::new()
    }
}

/// Where a calibration observes activations: the inputs of each linear layer (`Qkv`: q, k and v
/// share theirs; `Proj`: the attention output projection's; `Fc1`: gate and up's; `Fc2`: down's)
/// and the keys and values attention reads (after RoPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    Qkv,
    Proj,
    Fc1,
    Fc2,
    K,
    V,
}

/// Sees layer `l`'s activations at a site.
pub type Observer<'a> = &'a mut dyn FnMut(Site, u64, &[f32]);

/// y[s, o] = Σ_i x[s, i] · w[o, i]
fn linear(x: &[f32], rows: usize, w: &[f32], out: usize) -> Vec<f32> {
    let inp = x.len() / rows;
    let mut y = vec![0f32; rows * out];
    for s in 0..rows {
        let xs = &x[s * inp..(s + 1) * inp];
        for o in 0..out {
            let wo = &w[o * inp..(o + 1) * inp];
            y[s * out + o] = xs.iter().zip(wo).map(|(a, b)| a * b).sum();
        }
    }
    y
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    for (xs, ys) in x.chunks(h).zip(y.chunks_mut(h)) {
        let var = xs.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let r = 1.0 / (var + eps).sqrt();
        for ((a, b), c) in xs.iter().zip(ys.iter_mut()).zip(w) {
            *b = c * (a * r);
        }
    }
    y
}

fn rope(x: &mut [f32], seq: usize, heads: usize, hd: usize, theta: f32) {
    let half = hd / 2;
    for s in 0..seq {
        for h in 0..heads {
            let v = &mut x[(s * heads + h) * hd..(s * heads + h + 1) * hd];
            let orig = v.to_vec();
            for i in 0..hd {
                let f = i % half;
                let inv = 1.0 / theta.powf((2 * f) as f32 / hd as f32);
                let ang = s as f32 * inv;
                let rot = if i < half {
                    -orig[i + half]
                } else {
                    orig[i - half]
                };
                v[i] = orig[i] * ang.cos() + rot * ang.sin();
            }
        }
    }
}

/// Layer `l`'s self-attention on its normed input `h` [seq, hidden]: q, k, v (biases, q/k
/// norms, RoPE), causal softmax attention, the output projection.
fn attention(
    w: &Weights,
    c: &ModelConfig,
    l: u64,
    h: &[f32],
    (seq, hidden): (usize, usize),
    (eps, theta): (f32, f32),
    obs: &mut dyn FnMut(Site, u64, &[f32]),
) -> Result<Vec<f32>> {
    let p = |n: &str| names::layer_key(l, n);
    let (nh, ng, hd) = (
        c.heads.heads as usize,
        c.heads.groups as usize,
        c.heads.head_dim as usize,
    );
    let (_, qkv) = w.get(&p("self_attention.linear_qkv.weight"))?;
    let bytes: Vec<u8> = qkv.iter().flat_map(|f| f.to_le_bytes()).collect();
    let (qw, kw, vw) = split_qkv(&bytes, c.heads, hidden * 4)?;
    let f = |b: Vec<u8>| -> Vec<f32> {
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (qw, kw, vw) = (f(qw), f(kw), f(vw));
    let mut q = linear(h, seq, &qw, nh * hd);
    let mut k = linear(h, seq, &kw, ng * hd);
    let mut v = linear(h, seq, &vw, ng * hd);
    if let Ok((_, qb)) = w.get(&p("self_attention.linear_qkv.bias")) {
        let bb: Vec<u8> = qb.iter().flat_map(|f| f.to_le_bytes()).collect();
        let (bq, bk, bv) = split_qkv(&bb, c.heads, 4)?;
        let add = |x: &mut [f32], b: &[f32]| {
            for row in x.chunks_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(a, c)| *a += c);
            }
        };
        add(&mut q, &f(bq));
        add(&mut k, &f(bk));
        add(&mut v, &f(bv));
    }
    if let Ok((_, qn)) = w.get(&p("self_attention.q_layernorm.weight")) {
        // Per-head norms (Qwen3): over each head's head_dim values.
        q = rms_norm(&q, qn, eps);
        k = rms_norm(&k, &w.get(&p("self_attention.k_layernorm.weight"))?.1, eps);
    }
    rope(&mut q, seq, nh, hd, theta);
    rope(&mut k, seq, ng, hd, theta);
    obs(Site::K, l, &k);
    obs(Site::V, l, &v);
    let att = causal_attention(&q, &k, &v, seq, (nh, ng, hd));
    obs(Site::Proj, l, &att);
    Ok(linear(
        &att,
        seq,
        &w.get(&p("self_attention.linear_proj.weight"))?.1,
        hidden,
    ))
}

/// Softmax attention of each position over those up to it, head by head, each head over its
/// query group's k and v ([seq, heads · head_dim] out).
fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seq: usize,
    (nh, ng, hd): (usize, usize, usize),
) -> Vec<f32> {
    let per = nh / ng;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut att = vec![0f32; seq * nh * hd];
    for head in 0..nh {
        let g = head / per;
        for i in 0..seq {
            let qi = &q[(i * nh + head) * hd..(i * nh + head + 1) * hd];
            let mut scores: Vec<f32> = (0..=i)
                .map(|j| {
                    let kj = &k[(j * ng + g) * hd..(j * ng + g + 1) * hd];
                    qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = scores
                .iter_mut()
                .map(|s| {
                    *s = (*s - m).exp();
                    *s
                })
                .sum();
            let out = &mut att[(i * nh + head) * hd..(i * nh + head + 1) * hd];
            for (j, s) in scores.iter().enumerate() {
                let vj = &v[(j * ng + g) * hd..(j * ng + g + 1) * hd];
                for (o, val) in out.iter_mut().zip(vj) {
                    *o += s / z * val;
                }
            }
        }
    }
    att
}

/// Layer `l`'s SwiGLU MLP on its normed input `h` [seq, hidden].
fn swiglu(
    w: &Weights,
    l: u64,
    h: &[f32],
    (seq, hidden): (usize, usize),
    obs: &mut dyn FnMut(Site, u64, &[f32]),
) -> Result<Vec<f32>> {
    let p = |n: &str| names::layer_key(l, n);
    let (fc1_shape, fc1) = w.get(&p("mlp.linear_fc1.weight"))?;
    let ffn = fc1_shape[0] as usize / 2;
    let gu = linear(h, seq, fc1, 2 * ffn);
    let mut act = vec![0f32; seq * ffn];
    for s in 0..seq {
        for i in 0..ffn {
            let g = gu[s * 2 * ffn + i];
            let u = gu[s * 2 * ffn + ffn + i];
            act[s * ffn + i] = g / (1.0 + (-g).exp()) * u;
        }
    }
    obs(Site::Fc2, l, &act);
    Ok(linear(
        &act,
        seq,
        &w.get(&p("mlp.linear_fc2.weight"))?.1,
        hidden,
    ))
}

/// Logits [seq, vocab] for `ids`.
pub fn logits(w: &Weights, c: &ModelConfig, ids: &[u64], eps: f32, theta: f32) -> Result<Vec<f32>> {
    logits_observed(w, c, ids, (eps, theta), &mut |_, _, _| {})
}

/// [`logits`], showing `obs` every layer's activations (a calibration pass).
pub fn logits_observed(
    w: &Weights,
    c: &ModelConfig,
    ids: &[u64],
    (eps, theta): (f32, f32),
    obs: Observer<'_>,
) -> Result<Vec<f32>> {
    let (emb_shape, emb) = w.get(names::WORD_EMBEDDINGS)?;
    let hidden = emb_shape[1] as usize;
    let seq = ids.len();
    let mut x = Vec::with_capacity(seq * hidden);
    for &id in ids {
        let r = id as usize;
        x.extend_from_slice(&emb[r * hidden..(r + 1) * hidden]);
    }
    for l in 0..c.layers {
        let p = |n: &str| names::layer_key(l, n);
        let h = rms_norm(
            &x,
            &w.get(&p("self_attention.linear_qkv.layer_norm_weight"))?.1,
            eps,
        );
        obs(Site::Qkv, l, &h);
        let o = attention(w, c, l, &h, (seq, hidden), (eps, theta), obs)?;
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h = rms_norm(&x, &w.get(&p("mlp.linear_fc1.layer_norm_weight"))?.1, eps);
        obs(Site::Fc1, l, &h);
        let d = swiglu(w, l, &h, (seq, hidden), obs)?;
        x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }
    let x = rms_norm(&x, &w.get(names::FINAL_LAYERNORM)?.1, eps);
    let out = match w.get(names::OUTPUT_LAYER) {
        Ok((_, o)) => o,
        Err(_) => emb,
    };
    let vocab = out.len() / hidden;
    Ok(linear(&x, seq, out, vocab))
}

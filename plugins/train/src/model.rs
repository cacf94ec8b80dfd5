//! The Llama-family decoder (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms,
//! tied or untied) on Megatron-Core's fused layout, differentiable on candle.
//!
//! Megatron's layout: `linear_qkv` holds, per query group, that group's query heads, then its
//! key head, then its value head; `linear_fc1` is `[gate; up]`; the pre-norms are the fused
//! `layer_norm_weight`s. Norm, RoPE and softmax are composed from candle's differentiable ops
//! (candle-nn's fused ones have no backward).

use crate::kernels;
use crate::moe::{self, MoeConfig};
use crate::params::Params;
use bridgeflow_megatron::names;
use bridgeflow_sdk::serde_json::{Map, Value};
use bridgeflow_sdk::{PluginError, Result};
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

/// What the forward pass needs from the model's Megatron config.
#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub ffn_hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_query_groups: usize,
    pub kv_channels: usize,
    pub layernorm_epsilon: f64,
    pub rotary_base: f64,
    pub vocab_size: usize,
    pub tied: bool,
    pub qkv_bias: bool,
    pub qk_layernorm: bool,
    /// Routed experts in every layer's MLP (Qwen3-MoE, Mixtral); None: dense.
    pub moe: Option<MoeConfig>,
}

fn field<'a>(m: &'a Map<String, Value>, key: &str) -> Result<&'a Value> {
    m.get(key).ok_or_else(|| {
        PluginError::config(format!(
            "the model config (megatron_model) has no '{key}', which the trainer needs"
        ))
    })
}

fn count(m: &Map<String, Value>, key: &str) -> Result<usize> {
    let v = field(m, key)?;
    v.as_u64()
        .filter(|&n| n > 0 && n <= 1 << 24)
        .map(|n| n as usize)
        .ok_or_else(|| {
            PluginError::config(format!("megatron_model.{key} is {v}; expected 1 to 2^24"))
        })
}

fn flag(m: &Map<String, Value>, key: &str) -> bool {
    m.get(key).and_then(Value::as_bool).unwrap_or(false)
}

impl GptConfig {
    /// From the mapper's `megatron_model` attribute (TransformerConfig names).
    pub fn from_megatron(m: &Map<String, Value>) -> Result<GptConfig> {
        let heads = count(m, "num_attention_heads")?;
        let hidden = count(m, "hidden_size")?;
        let groups = match m.get("num_query_groups") {
            Some(Value::Null) | None => heads,
            Some(_) => count(m, "num_query_groups")?,
        };
        let kv_channels = match m.get("kv_channels") {
            Some(Value::Null) | None => hidden / heads,
            Some(_) => count(m, "kv_channels")?,
        };
        if heads % groups != 0 {
            return Err(PluginError::config(format!(
                "{heads} attention heads do not divide into {groups} query groups"
            )));
        }
        let positions = m.get("position_embedding_type").and_then(Value::as_str);
        if positions.is_some_and(|p| p != "rope") {
            return Err(PluginError::unsupported(format!(
                "position_embedding_type {positions:?}: the trainer's models use RoPE"
            )));
        }
        let ffn_hidden_size = count(m, "ffn_hidden_size")?;
        Ok(GptConfig {
            num_layers: count(m, "num_layers")?,
            hidden_size: hidden,
            ffn_hidden_size,
            num_attention_heads: heads,
            num_query_groups: groups,
            kv_channels,
            layernorm_epsilon: field(m, "layernorm_epsilon")?.as_f64().unwrap_or(1e-5),
            rotary_base: m
                .get("rotary_base")
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
            vocab_size: count(m, "vocab_size")?,
            tied: flag(m, "share_embeddings_and_output_weights"),
            qkv_bias: flag(m, "add_qkv_bias"),
            qk_layernorm: flag(m, "qk_layernorm"),
            moe: MoeConfig::from_megatron(m, ffn_hidden_size)?,
        })
    }

    fn heads_per_group(&self) -> usize {
        self.num_attention_heads / self.num_query_groups
    }

    /// Every parameter's Megatron name and shape, in a stable order.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, d) = (self.hidden_size, self.ffn_hidden_size, self.kv_channels);
        let qkv_rows = (self.heads_per_group() + 2) * self.num_query_groups * d;
        let mut all = vec![(names::WORD_EMBEDDINGS.to_string(), vec![self.vocab_size, h])];
        for l in 0..self.num_layers {
            let key = |rest: &str| names::layer_key(l as u64, rest);
            all.push((key("self_attention.linear_qkv.layer_norm_weight"), vec![h]));
            all.push((key("self_attention.linear_qkv.weight"), vec![qkv_rows, h]));
            if self.qkv_bias {
                all.push((key("self_attention.linear_qkv.bias"), vec![qkv_rows]));
            }
            if self.qk_layernorm {
                all.push((key("self_attention.q_layernorm.weight"), vec![d]));
                all.push((key("self_attention.k_layernorm.weight"), vec![d]));
            }
            all.push((
                key("self_attention.linear_proj.weight"),
                vec![h, self.num_attention_heads * d],
            ));
            match &self.moe {
                None => {
                    all.push((key("mlp.linear_fc1.layer_norm_weight"), vec![h]));
                    all.push((key("mlp.linear_fc1.weight"), vec![2 * f, h]));
                    all.push((key("mlp.linear_fc2.weight"), vec![h, f]));
                }
                Some(m) => {
                    let (e, f) = (m.num_experts, m.ffn_hidden_size);
                    all.push((key(PRE_MLP_NORM), vec![h]));
                    all.push((key(ROUTER), vec![e, h]));
                    all.push((key(EXPERTS_FC1), vec![e, 2 * f, h]));
                    all.push((key(EXPERTS_FC2), vec![e, h, f]));
                }
            }
        }
        all.push((names::FINAL_LAYERNORM.to_string(), vec![h]));
        if !self.tied {
            all.push((names::OUTPUT_LAYER.to_string(), vec![self.vocab_size, h]));
        }
        all
    }
}

/// A MoE layer's parameters (under `decoder.layers.N.`): its pre-norm (not fused into
/// `linear_fc1` as a dense layer's is), the router and the stacked experts.
const PRE_MLP_NORM: &str = "pre_mlp_layernorm.weight";
const ROUTER: &str = "mlp.router.weight";
const EXPERTS_FC1: &str = "mlp.experts.experts.linear_fc1.weight";
const EXPERTS_FC2: &str = "mlp.experts.experts.linear_fc2.weight";

/// A micro-batch as the model sees it.
pub struct Batch {
    /// `[b, s]` u32 token ids.
    pub tokens: Tensor,
    /// `[b, s]` u32 target ids (the tokens shifted by one).
    pub labels: Tensor,
    /// `[b, s]` f32 loss mask aligned with the labels.
    pub loss_mask: Tensor,
    /// Where each token attends and what position it has.
    pub attn: Attn,
}

/// RoPE's cos/sin (`[s, d]`, or `[b, 1, s, d]` for packed rows) and the additive attention
/// mask (`[s, s]` causal, or `[b, 1, s, s]` causal within each packed sub-sequence).
pub struct Attn {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
    /// `[b · s]`: where each token's packed sub-sequence starts (None: causal from 0), as the
    /// fused attention kernel takes the mask.
    pub starts: Option<Arc<Vec<u32>>>,
}

/// Precomputed per sequence length: RoPE's cos/sin tables and the causal mask.
pub struct Positions {
    cos: Tensor,
    sin: Tensor,
    /// `[s, s]`: 0 where attention is allowed, -inf elsewhere.
    mask: Tensor,
    seq: usize,
}

impl Positions {
    pub fn new(cfg: &GptConfig, seq: usize, dev: &Device) -> Result<Positions> {
        let d = cfg.kv_channels;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / cfg.rotary_base.powf(2.0 * i as f64 / d as f64) as f32)
            .collect();
        // As HF and megatron-core: angles in fp32, emb = cat(freqs, freqs).
        let mut cos = Vec::with_capacity(seq * d);
        let mut sin = Vec::with_capacity(seq * d);
        for p in 0..seq {
            for half in 0..2 {
                let _ = half;
                for &f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mask: Vec<f32> = (0..seq * seq)
            .map(|i| {
                if i % seq <= i / seq {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Ok(Positions {
            cos: Tensor::from_vec(cos, (seq, d), dev).map_err(ce)?,
            sin: Tensor::from_vec(sin, (seq, d), dev).map_err(ce)?,
            mask: Tensor::from_vec(mask, (seq, seq), dev).map_err(ce)?,
            seq,
        })
    }

    /// One causal sequence per sample: the shared tables.
    pub fn causal(&self) -> Attn {
        Attn {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            mask: self.mask.clone(),
            starts: None,
        }
    }

    /// Packed samples: per sample, its tokens' positions and its sub-sequences' boundaries.
    pub fn packed(&self, rows: &[(&[u32], &[usize])]) -> Result<Attn> {
        let s = self.seq;
        let b = rows.len();
        let dev = self.cos.device();
        let pos: Vec<u32> = rows.iter().flat_map(|(p, _)| p.iter().copied()).collect();
        let pos = Tensor::from_vec(pos, b * s, dev).map_err(ce)?;
        let d = self.cos.dim(1).map_err(ce)?;
        let gather = |t: &Tensor| -> Result<Tensor> {
            t.index_select(&pos, 0)
                .and_then(|x| x.reshape((b, 1, s, d)))
                .map_err(ce)
        };
        let mut mask = vec![f32::NEG_INFINITY; b * s * s];
        let mut starts = vec![0u32; b * s];
        for (r, (_, cu)) in rows.iter().enumerate() {
            for w in cu.windows(2) {
                for i in w[0]..w[1] {
                    starts[r * s + i] = w[0] as u32;
                    for j in w[0]..=i {
                        mask[(r * s + i) * s + j] = 0.0;
                    }
                }
            }
        }
        Ok(Attn {
            cos: gather(&self.cos)?,
            sin: gather(&self.sin)?,
            mask: Tensor::from_vec(mask, (b, 1, s, s), dev).map_err(ce)?,
            starts: Some(Arc::new(starts)),
        })
    }
}

/// candle's errors as the plugin's.
pub fn ce(e: candle_core::Error) -> PluginError {
    PluginError::internal(format!("candle: {e}"))
}

type T = candle_core::Result<Tensor>;

/// RMSNorm as HF's LlamaRMSNorm: normalized in fp32, back in the input's dtype, then scaled by
/// the weight (in fp32 throughout for fp32 inputs: the fused kernel on the CPU).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> T {
    if kernels::applies(x) && kernels::applies(w) {
        return kernels::rms_norm(x, w, eps);
    }
    let dt = x.dtype();
    let xf = in_dtype(x, DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    in_dtype(&xf.broadcast_mul(&inv)?, dt)?.broadcast_mul(w)
}

/// `t` in `dt` (itself when it already is).
fn in_dtype(t: &Tensor, dt: DType) -> T {
    if t.dtype() == dt {
        Ok(t.clone())
    } else {
        t.to_dtype(dt)
    }
}

/// `x · wᵀ` over the last dimension, as one 2-D product over all leading positions (a batched
/// product against a broadcast `w` would compute `w`'s gradient once per sample and sum).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> T {
    let mut dims = x.dims().to_vec();
    let inner = dims
        .pop()
        .ok_or_else(|| candle_core::Error::Msg("linear: a scalar".into()))?;
    let y = x.reshape(((), inner))?.matmul(&w.t()?)?;
    dims.push(y.dim(1)?);
    y.reshape(dims)
}

/// `y + delta` in the wider of their dtypes (torch's promotion: f32 over bf16 or f16, f32 for
/// bf16 with f16), cast back to `y`'s: how PEFT adds an adapter of another dtype.
fn add_in_wider(y: &Tensor, delta: &Tensor) -> T {
    if y.dtype() == delta.dtype() {
        return y + delta;
    }
    let f32_ = DType::F32;
    (y.to_dtype(f32_)? + delta.to_dtype(f32_)?)?.to_dtype(y.dtype())
}

fn rotate_half(x: &Tensor) -> T {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x`: `[b, heads, s, d]`; the tables in `x`'s dtype (as HF casts cos and sin).
fn rope(x: &Tensor, a: &Attn) -> T {
    let (cos, sin) = (in_dtype(&a.cos, x.dtype())?, in_dtype(&a.sin, x.dtype())?);
    x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
}

/// Softmax over the last axis, computed in fp32 and returned in the input's dtype.
fn softmax_last(x: &Tensor) -> T {
    let xf = in_dtype(x, DType::F32)?;
    let max = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&max)?.exp()?;
    in_dtype(&e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?, x.dtype())
}

pub struct Gpt<'p> {
    pub cfg: &'p GptConfig,
    pub params: &'p Params,
    /// LoRA dropout, training only (None: evaluation, a teacher, the logits check).
    pub dropout: Option<crate::lora::Dropout>,
}

impl<'p> Gpt<'p> {
    pub fn new(cfg: &'p GptConfig, params: &'p Params) -> Gpt<'p> {
        Gpt {
            cfg,
            params,
            dropout: None,
        }
    }
}

impl Gpt<'_> {
    /// A parameter as the forward pass reads it: frozen ones (the base under LoRA) detached, so
    /// that no gradient is computed for them.
    fn p(&self, name: &str) -> candle_core::Result<Tensor> {
        let p = self
            .params
            .by_name
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter '{name}'")))?;
        Ok(match p.trainable {
            true => p.var.as_tensor().clone(),
            false => p.var.as_tensor().detach(),
        })
    }

    /// `x · Wᵀ` with the parameter `name` as W; a frozen one's gradient never computed.
    fn linear_by(&self, x: &Tensor, name: &str) -> T {
        let w = self.p(name)?;
        let frozen = self.params.by_name.get(name).is_some_and(|p| !p.trainable);
        if frozen && x.device().is_cpu() && x.dtype() == w.dtype() {
            kernels::frozen_linear(x, &w)
        } else {
            linear(x, &w)
        }
    }

    fn layer_p(&self, l: usize, rest: &str) -> candle_core::Result<Tensor> {
        self.p(&names::layer_key(l as u64, rest))
    }

    /// `x · Wᵀ` of layer `l`'s linear `module`, plus its LoRA adapters'
    /// `(alpha/dim) · (x · Aᵀ) · Bᵀ` when it has them (Megatron-Bridge's `LoRALinear`: A is
    /// `adapter.linear_in`, B `adapter.linear_out`; the input is the layer's normed input), each
    /// at its rows of the output (canonical LoRA's q, k, v or gate, up).
    fn proj(&self, l: usize, module: &str, x: &Tensor) -> T {
        let weight = names::layer_key(l as u64, &format!("{module}.weight"));
        let w = self.p(&weight)?;
        let key = names::layer_key(l as u64, module);
        let (Some(adapters), Some(scale)) =
            (self.params.adapters.get(&key), self.params.lora_scale)
        else {
            return self.linear_by(x, &weight);
        };
        let frozen = self
            .params
            .by_name
            .get(&weight)
            .is_some_and(|p| !p.trainable);
        let plain = self.dropout.is_none() && adapters.iter().all(|a| a.magnitude.is_none());
        let adapter_dtype = self.p(&adapters[0].a)?.dtype();
        if frozen
            && plain
            && kernels::applies(x)
            && kernels::applies(&w)
            && adapter_dtype == x.dtype()
        {
            let (a, b) = self.stacked(adapters, w.dim(0)?)?;
            let mut dims = x.dims().to_vec();
            let x2 = x.reshape(((), w.dim(1)?))?;
            let y = kernels::lora_linear(&x2, &w, &a, &b, scale)?;
            *dims.last_mut().expect("x has a last axis") = w.dim(0)?;
            return y.reshape(dims);
        }
        let y = self.linear_by(x, &weight)?;
        let site = |adapter: usize, at: u64| crate::lora::Dropout::site(l, module, adapter, at);
        // Megatron-Bridge's adapter: x → [dropout if pre] → A → B → [dropout if post].
        // An adapter in another dtype than the layer's (`lora_dtype`) reads its input cast to
        // its own, as PEFT's `_cast_input_dtype`.
        let low = |i: usize, ad: &crate::params::Adapter| -> T {
            let x = in_dtype(x, adapter_dtype)?;
            let x = match self.dropout {
                Some(d) if !d.post => d.apply(&x, site(i, 0))?,
                _ => x,
            };
            let y = linear(&linear(&x, &self.p(&ad.a)?)?, &self.p(&ad.b)?)?;
            match self.dropout {
                Some(d) if d.post => d.apply(&y, site(i, 1)),
                _ => Ok(y),
            }
        };
        let delta = match adapters.as_slice() {
            [one] if one.rows.len() == 1 && one.rows[0] == (0..w.dim(0)?) => low(0, one)?,
            _ => self.placed(adapters, w.dim(0)?, x, &low)?,
        };
        let y = add_in_wider(&y, &(delta * scale)?)?;
        let Some(m) = adapters.first().and_then(|a| a.magnitude.as_ref()) else {
            return Ok(y);
        };
        // DoRA (one adapter on the whole layer): rows rescaled by m / ‖W0 + s·B·A‖_row, the
        // norm detached.
        let (a, b) = (self.p(&adapters[0].a)?, self.p(&adapters[0].b)?);
        let merged = (w + (b.detach().matmul(&a.detach())? * scale)?)?;
        let n = merged.sqr()?.sum_keepdim(1)?.sqrt()?.squeeze(1)?.detach();
        let mag = (self.p(m)? / n)?;
        let y = y.broadcast_mul(&mag)?;
        let Some(d) = self.dropout else {
            return Ok(y);
        };
        // Bridge's dropout correction, (m/n − 1)·W0·(dropout(x) − x), its mask drawn anew as
        // Bridge draws it (PEFT's formula reuses the adapter's).
        let dx = (d.apply(x, site(0, 2))? - x)?;
        y + self.linear_by(&dx, &weight)?.broadcast_mul(&(mag - 1.0)?)?
    }

    /// The adapters as one: their A's stacked `[ΣR, h]` and their B's side by side `[rows, ΣR]`,
    /// each at its rows (zero elsewhere), so that `B·A` places every adapter's output as
    /// `placed` does. One adapter over every row is itself.
    fn stacked(
        &self,
        adapters: &[crate::params::Adapter],
        rows: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if let [one] = adapters {
            if one.rows.len() == 1 && one.rows[0] == (0..rows) {
                return Ok((self.p(&one.a)?, self.p(&one.b)?));
            }
        }
        let a = adapters
            .iter()
            .map(|ad| self.p(&ad.a))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let blocks = adapters
            .iter()
            .map(|ad| {
                let b = self.p(&ad.b)?;
                let r = b.dim(1)?;
                let pieces = slices(ad)
                    .map(|(start, offset, len)| Ok((start, b.narrow(0, offset, len)?)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                lay_out_rows(pieces, rows, 0, |n| {
                    Tensor::zeros((n, r), b.dtype(), b.device())
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((Tensor::cat(&a, 0)?, Tensor::cat(&blocks, 1)?))
    }

    /// The adapters' outputs at their rows of a `rows`-wide output (zero where none feeds).
    fn placed(
        &self,
        adapters: &[crate::params::Adapter],
        rows: usize,
        x: &Tensor,
        low: &dyn Fn(usize, &crate::params::Adapter) -> T,
    ) -> T {
        let outs = adapters
            .iter()
            .enumerate()
            .map(|(i, ad)| low(i, ad))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut pieces = Vec::new();
        for (ad, out) in adapters.iter().zip(&outs) {
            for (start, offset, len) in slices(ad) {
                pieces.push((start, out.narrow(D::Minus1, offset, len)?));
            }
        }
        let last = x.rank() - 1;
        lay_out_rows(pieces, rows, last, |n| {
            let mut dims = x.dims().to_vec();
            dims[last] = n;
            Tensor::zeros(dims, outs[0].dtype(), x.device())
        })
    }

    /// Logits `[b, s, vocab]` in the compute dtype.
    pub fn logits(&self, tokens: &Tensor, pos: &Attn) -> T {
        Ok(self.forward(tokens, pos, &[])?.logits)
    }

    /// Logits, for each of `taps` the hidden state there (`[b, s, hidden]`), and the MoE
    /// layers' load-balancing losses summed.
    pub fn forward(
        &self,
        tokens: &Tensor,
        pos: &Attn,
        taps: &[Tap],
    ) -> candle_core::Result<Forward> {
        let (b, s) = tokens.dims2()?;
        let emb = self.p(names::WORD_EMBEDDINGS)?;
        let mut x =
            emb.index_select(&tokens.flatten_all()?, 0)?
                .reshape((b, s, self.cfg.hidden_size))?;
        let mut tapped: Vec<Option<Tensor>> = vec![None; taps.len()];
        let mut keep = |at: Tap, x: &Tensor| {
            for (slot, _) in tapped.iter_mut().zip(taps).filter(|(_, t)| **t == at) {
                *slot = Some(x.clone());
            }
        };
        let mut aux_loss: Option<Tensor> = None;
        for l in 0..self.cfg.num_layers {
            x = (&x + self.attention(l, &x, pos)?)?;
            let (y, aux) = self.mlp(l, &x)?;
            x = (&x + y)?;
            aux_loss = match (aux_loss, aux) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
            keep(Tap::Layer(l), &x);
        }
        let x = rms_norm(
            &x,
            &self.p(names::FINAL_LAYERNORM)?,
            self.cfg.layernorm_epsilon,
        )?;
        keep(Tap::FinalNorm, &x);
        let out = if self.cfg.tied {
            names::WORD_EMBEDDINGS
        } else {
            names::OUTPUT_LAYER
        };
        let tapped = tapped
            .into_iter()
            .zip(taps)
            .map(|(t, at)| {
                t.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{at:?} is not in this {}-layer model",
                        self.cfg.num_layers
                    ))
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Forward {
            logits: self.linear_by(&x, out)?,
            taps: tapped,
            aux_loss,
        })
    }

    fn attention(&self, l: usize, x: &Tensor, pos: &Attn) -> T {
        let c = self.cfg;
        let (b, s, _) = x.dims3()?;
        let (g, hpg, d) = (c.num_query_groups, c.heads_per_group(), c.kv_channels);
        let xn = rms_norm(
            x,
            &self.layer_p(l, "self_attention.linear_qkv.layer_norm_weight")?,
            c.layernorm_epsilon,
        )?;
        let mut qkv = self.proj(l, "self_attention.linear_qkv", &xn)?;
        if c.qkv_bias {
            qkv = qkv.broadcast_add(&self.layer_p(l, "self_attention.linear_qkv.bias")?)?;
        }
        if kernels::applies(&qkv) && !c.qk_layernorm {
            let heads = kernels::Heads {
                groups: g,
                per_group: hpg,
                d,
            };
            let scale = 1.0 / (d as f64).sqrt();
            let tables = (&pos.cos, &pos.sin);
            let ctx = kernels::qkv_attention(&qkv, heads, tables, scale, pos.starts.clone())?;
            return self.proj(l, "self_attention.linear_proj", &ctx);
        }
        let qkv = qkv.reshape((b, s, g, hpg + 2, d))?;
        // [b, s, g, hpg, d] → [b, heads, s, d]; k, v: [b, g, s, d].
        let q = qkv
            .narrow(3, 0, hpg)?
            .reshape((b, s, g * hpg, d))?
            .transpose(1, 2)?;
        let k = qkv.narrow(3, hpg, 1)?.squeeze(3)?.transpose(1, 2)?;
        let v = qkv.narrow(3, hpg + 1, 1)?.squeeze(3)?.transpose(1, 2)?;
        let (q, k) = if c.qk_layernorm {
            (
                rms_norm(
                    &q,
                    &self.layer_p(l, "self_attention.q_layernorm.weight")?,
                    c.layernorm_epsilon,
                )?,
                rms_norm(
                    &k,
                    &self.layer_p(l, "self_attention.k_layernorm.weight")?,
                    c.layernorm_epsilon,
                )?,
            )
        } else {
            (q, k)
        };
        let q = rope(&q.contiguous()?, pos)?;
        let k = rope(&k.contiguous()?, pos)?;
        // Each key/value head serves its group's query heads.
        let expand = |t: Tensor| -> T {
            t.unsqueeze(2)?
                .broadcast_as((b, g, hpg, s, d))?
                .reshape((b, g * hpg, s, d))
        };
        let ctx = if kernels::applies(&q) {
            kernels::attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), pos.starts.clone())?
        } else {
            let (k, v) = (expand(k)?, expand(v.contiguous()?)?);
            let mask = in_dtype(&pos.mask, q.dtype())?;
            let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
            softmax_last(&scores)?.matmul(&v)?
        };
        let ctx = ctx.transpose(1, 2)?.reshape((b, s, g * hpg * d))?;
        self.proj(l, "self_attention.linear_proj", &ctx)
    }

    /// Layer `l`'s MLP output and, for a MoE layer, its load-balancing loss.
    fn mlp(&self, l: usize, x: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let c = self.cfg;
        if let Some(m) = &c.moe {
            let xn = rms_norm(x, &self.layer_p(l, PRE_MLP_NORM)?, c.layernorm_epsilon)?;
            let (router, fc1, fc2) = (
                self.layer_p(l, ROUTER)?,
                self.layer_p(l, EXPERTS_FC1)?,
                self.layer_p(l, EXPERTS_FC2)?,
            );
            let w = moe::Experts {
                router: &router,
                fc1: &fc1,
                fc2: &fc2,
            };
            let out = moe::forward(m, &xn, &w)?;
            return Ok((out.out, out.aux_loss));
        }
        let xn = rms_norm(
            x,
            &self.layer_p(l, "mlp.linear_fc1.layer_norm_weight")?,
            c.layernorm_epsilon,
        )?;
        let h = self.proj(l, "mlp.linear_fc1", &xn)?;
        Ok((self.proj(l, "mlp.linear_fc2", &swiglu(&h)?)?, None))
    }

    /// The masked cross-entropy sum over the batch and the number of tokens in the loss, as
    /// megatron-bridge's `masked_next_token_loss` (logits in fp32).
    pub fn loss_sum(&self, batch: &Batch) -> candle_core::Result<(Tensor, f64)> {
        masked_ce_sum(&self.logits(&batch.tokens, &batch.attn)?, batch)
    }
}

/// What the forward pass gives.
pub struct Forward {
    /// `[b, s, vocab]` in the compute dtype.
    pub logits: Tensor,
    /// The hidden state at each tap asked for.
    pub taps: Vec<Tensor>,
    /// The MoE layers' load-balancing losses summed (fp32, their coefficient in them); None
    /// for a dense model.
    pub aux_loss: Option<Tensor>,
}

/// `silu(gate) · up` of `[…, 2·F]` (`[gate; up]` on the last axis).
pub(crate) fn swiglu(h: &Tensor) -> T {
    if kernels::applies(h) {
        return kernels::swiglu(h);
    }
    let f = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, f)?.silu()? * h.narrow(D::Minus1, f, f)?
}

/// An adapter's output rows as (first row of the layer's output, offset in the adapter's
/// output, length), one per range of its rows.
fn slices(ad: &crate::params::Adapter) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    ad.rows.iter().scan(0, |offset, r| {
        let at = *offset;
        *offset += r.len();
        Some((r.start, at, r.len()))
    })
}

/// `pieces` (each at its first row) laid out in row order along `dim` over `total` rows, with
/// `zeros(n)` filling the rows none covers.
fn lay_out_rows(
    mut pieces: Vec<(usize, Tensor)>,
    total: usize,
    dim: usize,
    zeros: impl Fn(usize) -> T,
) -> T {
    pieces.sort_by_key(|(start, _)| *start);
    let (mut parts, mut at) = (Vec::new(), 0);
    for (start, piece) in pieces {
        if start > at {
            parts.push(zeros(start - at)?);
        }
        at = start + piece.dim(dim)?;
        parts.push(piece);
    }
    if at < total {
        parts.push(zeros(total - at)?);
    }
    Tensor::cat(&parts, dim)
}

/// Where a hidden state is taken (ModelOpt's intermediate layer names): the output of
/// `decoder.layers.N`, or of `decoder.final_layernorm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    Layer(usize),
    FinalNorm,
}

impl Tap {
    pub fn parse(name: &str) -> Option<Tap> {
        if name == "decoder.final_layernorm" {
            return Some(Tap::FinalNorm);
        }
        name.strip_prefix("decoder.layers.")?
            .parse()
            .ok()
            .map(Tap::Layer)
    }
}

/// The masked cross-entropy sum of `logits` (`[b, s, v]`, taken in fp32) against the batch's
/// labels, and the number of tokens in the loss.
pub fn masked_ce_sum(logits: &Tensor, batch: &Batch) -> candle_core::Result<(Tensor, f64)> {
    let logits = in_dtype(logits, DType::F32)?;
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let per_token = if kernels::applies(&logits) {
        kernels::cross_entropy(&logits, batch.labels.flatten_all()?.to_vec1()?)?
    } else {
        let lse = log_sum_exp(&logits)?;
        let labels = batch.labels.flatten_all()?.unsqueeze(1)?;
        (lse - logits.gather(&labels, 1)?)?.squeeze(1)?
    };
    let mask = batch.loss_mask.flatten_all()?;
    let tokens = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(((per_token * mask)?.sum_all()?, tokens))
}

/// `log Σ exp(x)` over the last axis of `[n, v]`, kept as `[n, 1]` (the max subtracted first).
pub fn log_sum_exp(x: &Tensor) -> T {
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::Dropout;
    use crate::params::Adapter;

    const FC2: &str = "decoder.layers.0.mlp.linear_fc2";

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) % 1000)
            .map(|v| v as f32 / 500.0 - 1.0)
            .collect()
    }

    /// One frozen `[4, 6]` layer with a rank-2 adapter (and DoRA's magnitude).
    fn layer(dora: bool) -> Params {
        let dev = Device::Cpu;
        let mut p = Params {
            lora_scale: Some(0.5),
            ..Params::default()
        };
        let f32s = bridgeflow_sdk::DType::F32;
        p.insert(
            &format!("{FC2}.weight"),
            vec![4, 6],
            f32s,
            values(24, 1),
            &dev,
        )
        .unwrap();
        p.by_name
            .get_mut(&format!("{FC2}.weight"))
            .unwrap()
            .trainable = false;
        p.insert(
            &format!("{FC2}.adapter.linear_in.weight"),
            vec![2, 6],
            f32s,
            values(12, 2),
            &dev,
        )
        .unwrap();
        p.insert(
            &format!("{FC2}.adapter.linear_out.weight"),
            vec![4, 2],
            f32s,
            values(8, 3),
            &dev,
        )
        .unwrap();
        let magnitude = dora.then(|| {
            let name = format!("{FC2}.adapter.weight_magnitude");
            p.insert(&name, vec![4], f32s, vec![1.5, 0.7, 2.0, 1.1], &dev)
                .unwrap();
            name
        });
        p.adapters.insert(
            FC2.into(),
            vec![Adapter {
                a: format!("{FC2}.adapter.linear_in.weight"),
                b: format!("{FC2}.adapter.linear_out.weight"),
                rows: std::iter::once(0..4).collect(),
                magnitude,
            }],
        );
        p
    }

    /// The test layer's W0, A and B.
    fn fc2(p: &Params) -> (&Tensor, &Tensor, &Tensor) {
        let get = |rest: &str| p.tensor(&format!("{FC2}{rest}")).unwrap();
        (
            get(".weight"),
            get(".adapter.linear_in.weight"),
            get(".adapter.linear_out.weight"),
        )
    }

    fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    /// The one-layer model (hidden 4, ffn 6) `layer`'s fc2 belongs to.
    fn one_layer() -> GptConfig {
        GptConfig {
            num_layers: 1,
            hidden_size: 4,
            ffn_hidden_size: 6,
            num_attention_heads: 1,
            num_query_groups: 1,
            kv_channels: 4,
            layernorm_epsilon: 1e-6,
            rotary_base: 1e4,
            vocab_size: 8,
            tied: false,
            qkv_bias: false,
            qk_layernorm: false,
            moe: None,
        }
    }

    /// `lora_dtype` f32 on a bf16 layer: the adapter reads its input cast to f32 and its scaled
    /// output is added in f32, the sum rounded to bf16 once — PEFT's order, bit for bit — which
    /// is not what bf16 adapters give.
    #[test]
    fn fp32_adapters_on_a_bf16_layer_add_as_peft_does() {
        let cfg = one_layer();
        let bf16 = DType::BF16;
        let x = t(values(18, 9), &[1, 3, 6]).to_dtype(bf16).unwrap();
        let run = |fp32_adapters: bool| {
            let f32_layer = layer(false);
            let mut params = Params {
                compute: Some(bf16),
                lora_scale: f32_layer.lora_scale,
                adapters: f32_layer.adapters.clone(),
                ..Params::default()
            };
            for (name, p) in &f32_layer.by_name {
                let (shape, v) = (p.shape.clone(), p.master.clone());
                params
                    .insert(name, shape, p.dtype, v, &Device::Cpu)
                    .unwrap();
                params.by_name.get_mut(name).unwrap().trainable = p.trainable;
            }
            if fp32_adapters {
                for n in ["linear_in", "linear_out"] {
                    let name = format!("{FC2}.adapter.{n}.weight");
                    params.compute_in(&name, DType::F32).unwrap();
                }
            }
            let got = Gpt::new(&cfg, &params)
                .proj(0, "mlp.linear_fc2", &x)
                .unwrap();
            (params, got)
        };
        let (params, got) = run(true);
        let (w, a, b) = fc2(&params);
        assert_eq!(
            (w.dtype(), a.dtype(), b.dtype()),
            (bf16, DType::F32, DType::F32)
        );
        let low = linear(&linear(&x.to_dtype(DType::F32).unwrap(), a).unwrap(), b).unwrap();
        let base = linear(&x, w).unwrap().to_dtype(DType::F32).unwrap();
        let want = (base + (low * 0.5).unwrap())
            .unwrap()
            .to_dtype(bf16)
            .unwrap();
        assert_eq!(got.dtype(), bf16);
        let bits = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(bits(&got), bits(&want));
        assert_ne!(
            bits(&run(false).1),
            bits(&want),
            "bf16 adapters round differently"
        );
    }

    /// LoRA dropout exactly where Megatron-Bridge puts it: on the adapter's input (pre) or on
    /// B's output (post), with DoRA's correction `(m/n − 1)·W0·(dropout(x) − x)` drawn anew.
    #[test]
    fn lora_dropout_sits_where_bridge_puts_it() {
        let cfg = one_layer();
        let x = t(values(18, 9), &[1, 3, 6]);
        let dropout = |post| Dropout {
            p: 0.4,
            post,
            seed: 7,
            step: 11,
        };
        let site = |at| Dropout::site(0, "mlp.linear_fc2", 0, at);
        for post in [false, true] {
            let params = layer(false);
            let mut gpt = Gpt::new(&cfg, &params);
            gpt.dropout = Some(dropout(post));
            let got = gpt.proj(0, "mlp.linear_fc2", &x).unwrap();
            let (w, a, b) = fc2(&params);
            let low = if post {
                let y = linear(&linear(&x, a).unwrap(), b).unwrap();
                (y * t(dropout(true).mask(site(1), 12), &[1, 3, 4])).unwrap()
            } else {
                let xd = (&x * t(dropout(false).mask(site(0), 18), &[1, 3, 6])).unwrap();
                linear(&linear(&xd, a).unwrap(), b).unwrap()
            };
            let want = (linear(&x, w).unwrap() + (low * 0.5).unwrap()).unwrap();
            close(&got, &want);
            assert!(
                (&got - &gpt_without(&cfg, &params, &x))
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 1e-3,
                "the mask changed the output"
            );
        }
        // DoRA: (m/n)·(W0·x + s·B·A·d(x)) + (m/n − 1)·W0·(d'(x) − x).
        let params = layer(true);
        let mut gpt = Gpt::new(&cfg, &params);
        gpt.dropout = Some(dropout(false));
        let got = gpt.proj(0, "mlp.linear_fc2", &x).unwrap();
        let (w, a, b) = fc2(&params);
        let m = params
            .tensor(&format!("{FC2}.adapter.weight_magnitude"))
            .unwrap();
        let n = (w + (b.matmul(a).unwrap() * 0.5).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap();
        let mag = (m / n).unwrap();
        let xd = (&x * t(dropout(false).mask(site(0), 18), &[1, 3, 6])).unwrap();
        let xd2 = (&x * t(dropout(false).mask(site(2), 18), &[1, 3, 6])).unwrap();
        let inner = (linear(&x, w).unwrap()
            + (linear(&linear(&xd, a).unwrap(), b).unwrap() * 0.5).unwrap())
        .unwrap();
        let correction = linear(&(xd2 - &x).unwrap(), w)
            .unwrap()
            .broadcast_mul(&(&mag - 1.0).unwrap())
            .unwrap();
        let want = (inner.broadcast_mul(&mag).unwrap() + correction).unwrap();
        close(&got, &want);
    }

    /// Canonical adapters at interleaved rows: stacking them into one A and a row-placed B
    /// (the fused kernel's input) gives what placing each adapter's output does.
    #[test]
    fn stacked_adapters_place_outputs_as_placed_does() {
        let dev = Device::Cpu;
        let f32s = bridgeflow_sdk::DType::F32;
        let mut p = Params::default();
        let mut adapters = Vec::new();
        // Adapter 0 feeds rows 0..2 and 5..6, adapter 1 rows 3..5; row 2 and 6 get none.
        for (i, rows) in [vec![0..2, 5..6], std::iter::once(3..5).collect()]
            .into_iter()
            .enumerate()
        {
            let n: usize = rows.iter().map(|r| r.len()).sum();
            let (a, b) = (format!("a{i}"), format!("b{i}"));
            p.insert(&a, vec![2, 4], f32s, values(8, 20 + i as u32), &dev)
                .unwrap();
            p.insert(&b, vec![n, 2], f32s, values(2 * n, 30 + i as u32), &dev)
                .unwrap();
            adapters.push(Adapter {
                a,
                b,
                rows: rows.into_iter().collect(),
                magnitude: None,
            });
        }
        let cfg = GptConfig::from_megatron(&serde_json::from_str::<Map<String, Value>>(
            r#"{"num_layers": 1, "hidden_size": 4, "ffn_hidden_size": 4, "num_attention_heads": 1,
                "layernorm_epsilon": 1e-6, "vocab_size": 8}"#,
        ).unwrap())
        .unwrap();
        let gpt = Gpt::new(&cfg, &p);
        let x = t(values(12, 40), &[1, 3, 4]);
        let low = |_: usize, ad: &Adapter| -> T {
            linear(
                &linear(&x, p.tensor(&ad.a).unwrap())?,
                p.tensor(&ad.b).unwrap(),
            )
        };
        let want = gpt.placed(&adapters, 7, &x, &low).unwrap();
        let (a, b) = gpt.stacked(&adapters, 7).unwrap();
        let got = linear(&linear(&x, &a).unwrap(), &b).unwrap();
        assert_eq!(got.dims(), &[1, 3, 7]);
        close(&got, &want);
        let col = |t: &Tensor, c: usize| -> Vec<f32> {
            t.narrow(2, c, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(col(&got, 2), vec![0.0; 3], "no adapter feeds row 2");
        assert_ne!(
            col(&got, 5),
            vec![0.0; 3],
            "adapter 0's third row lands at row 5"
        );
    }

    fn gpt_without(cfg: &GptConfig, params: &Params, x: &Tensor) -> Tensor {
        Gpt::new(cfg, params).proj(0, "mlp.linear_fc2", x).unwrap()
    }

    #[test]
    fn dropout_masks_are_bernoulli_and_keyed() {
        let d = Dropout {
            p: 0.25,
            post: false,
            seed: 3,
            step: 5,
        };
        let m = d.mask(Dropout::site(1, "mlp.linear_fc1", 0, 0), 100_000);
        let dropped = m.iter().filter(|v| **v == 0.0).count() as f64 / 1e5;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(m
            .iter()
            .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(
            m,
            d.mask(Dropout::site(1, "mlp.linear_fc1", 0, 0), 100_000),
            "keyed: the same again"
        );
        assert_ne!(
            m,
            d.mask(Dropout::site(1, "mlp.linear_fc1", 1, 0), 100_000),
            "another adapter, another mask"
        );
        let next = Dropout { step: 6, ..d };
        assert_ne!(
            m,
            next.mask(Dropout::site(1, "mlp.linear_fc1", 0, 0), 100_000),
            "another step, another mask"
        );
    }
}

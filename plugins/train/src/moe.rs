//! Routed experts as megatron-core's MoE layer computes them (Qwen3-MoE, Mixtral), on one rank:
//!
//! - the router's logits `x · Wᵣᵀ`, in the input's dtype (or fp32 with `moe_router_dtype`);
//! - top-k: the softmax over the k chosen logits, or with `moe_router_pre_softmax` the softmax
//!   over every expert taken at the k chosen (`topk_routing_with_score_function`), in fp32 and
//!   cast back;
//! - tokens sorted by expert, in token order within each (the alltoall dispatcher's permutation);
//!   each expert's SwiGLU with the token's probability applied after the activation, before
//!   `linear_fc2` (`TEGroupedMLP`); the outputs summed back per token;
//! - the Switch load-balancing loss megatron-core attaches to the router
//!   (`switch_load_balancing_loss_func`):
//!   `E·coeff / (k·T²) · Σₑ (Σₜ softmax(logits)ₜₑ) · tokensₑ` over the micro-batch's T tokens.
//!
//! The loop gives that loss's gradient the scale megatron-core's `MoEAuxLossAutoScaler` gives
//! it (see `trainer.rs`).

use crate::model::swiglu;
use bridgeflow_sdk::serde_json::{Map, Value};
use bridgeflow_sdk::{PluginError, Result};
use candle_core::{DType, Tensor, D};

type T = candle_core::Result<Tensor>;

/// The routed-expert fields of the model's Megatron config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub topk: usize,
    /// Each expert's FFN width (`moe_ffn_hidden_size`, else `ffn_hidden_size`).
    pub ffn_hidden_size: usize,
    /// The load-balancing loss's coefficient; 0: none (`moe_router_load_balancing_type = "none"`).
    pub aux_loss_coeff: f64,
    /// `moe_router_pre_softmax`: the softmax over every expert, before the top-k (Qwen3-MoE
    /// without `norm_topk_prob`).
    pub pre_softmax: bool,
    /// `moe_router_dtype = "fp32"`: the router's product in fp32 whatever the compute dtype.
    pub router_fp32: bool,
}

fn unsupported(what: String) -> PluginError {
    PluginError::unsupported(format!("{what}: the trainer's MoE layer does not do that"))
}

/// `m[key]` when set (null counts as unset).
fn set<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

fn size(m: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    let Some(v) = set(m, key) else {
        return Ok(None);
    };
    v.as_u64()
        .filter(|&n| n > 0 && n <= 1 << 24)
        .map(|n| Some(n as usize))
        .ok_or_else(|| {
            PluginError::config(format!("megatron_model.{key} is {v}; expected 1 to 2^24"))
        })
}

/// Megatron-core's knobs this layer does not implement, refused by name rather than ignored.
fn refuse_unsupported(m: &Map<String, Value>) -> Result<()> {
    let present =
        |k: &str| set(m, k).is_some_and(|v| v != &Value::Bool(false) && v.as_f64() != Some(0.0));
    for key in [
        "moe_shared_expert_intermediate_size",
        "moe_router_enable_expert_bias",
        "moe_z_loss_coeff",
        "moe_expert_capacity_factor",
        "moe_router_topk_scaling_factor",
        "moe_router_num_groups",
        "moe_router_group_topk",
        "moe_input_jitter_eps",
        "moe_apply_probs_on_input",
        "multi_latent_attention",
    ] {
        if present(key) {
            return Err(unsupported(format!("megatron_model.{key} = {}", m[key])));
        }
    }
    Ok(())
}

/// Every layer routed: `moe_layer_freq` unset, 1, or a list of ones.
fn every_layer_moe(m: &Map<String, Value>) -> Result<()> {
    let all_ones = match set(m, "moe_layer_freq") {
        None => true,
        Some(Value::Array(a)) => a.iter().all(|v| v.as_u64() == Some(1)),
        Some(v) => v.as_u64() == Some(1),
    };
    if all_ones {
        return Ok(());
    }
    Err(unsupported(format!(
        "megatron_model.moe_layer_freq = {} (dense layers between MoE ones)",
        m["moe_layer_freq"]
    )))
}

fn score_function(m: &Map<String, Value>) -> Result<()> {
    match set(m, "moe_router_score_function").map(|v| v.as_str()) {
        None | Some(Some("softmax")) => Ok(()),
        Some(_) => Err(unsupported(format!(
            "megatron_model.moe_router_score_function = {}",
            m["moe_router_score_function"]
        ))),
    }
}

/// The coefficient of the load-balancing loss: `aux_loss` with `moe_aux_loss_coeff`, or
/// `none`.
fn aux_loss_coeff(m: &Map<String, Value>) -> Result<f64> {
    let kind = match set(m, "moe_router_load_balancing_type") {
        None => "aux_loss",
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or(""),
        Some(v) => return Err(unsupported(format!("moe_router_load_balancing_type {v}"))),
    };
    match kind {
        "none" => Ok(0.0),
        "aux_loss" => {
            let coeff = match set(m, "moe_aux_loss_coeff") {
                None => 0.0,
                Some(Value::Array(a)) if a.len() == 1 => a[0].as_f64().unwrap_or(f64::NAN),
                Some(v) => v.as_f64().unwrap_or(f64::NAN),
            };
            if coeff.is_finite() && coeff >= 0.0 {
                Ok(coeff)
            } else {
                Err(PluginError::config(format!(
                    "megatron_model.moe_aux_loss_coeff is {}; expected a number ≥ 0",
                    m["moe_aux_loss_coeff"]
                )))
            }
        }
        other => Err(unsupported(format!(
            "moe_router_load_balancing_type \"{other}\""
        ))),
    }
}

fn router_fp32(m: &Map<String, Value>) -> Result<bool> {
    match set(m, "moe_router_dtype").map(|v| v.as_str()) {
        None => Ok(false),
        Some(Some("fp32")) => Ok(true),
        Some(_) => Err(unsupported(format!(
            "megatron_model.moe_router_dtype = {}",
            m["moe_router_dtype"]
        ))),
    }
}

impl MoeConfig {
    /// From the Megatron model config; None for a dense model (no `num_moe_experts`).
    pub fn from_megatron(m: &Map<String, Value>, ffn_hidden_size: usize) -> Result<Option<Self>> {
        let Some(num_experts) = size(m, "num_moe_experts")? else {
            return Ok(None);
        };
        refuse_unsupported(m)?;
        every_layer_moe(m)?;
        score_function(m)?;
        let topk = size(m, "moe_router_topk")?.unwrap_or(2);
        if topk > num_experts {
            return Err(PluginError::config(format!(
                "megatron_model.moe_router_topk is {topk}, more than its {num_experts} experts"
            )));
        }
        Ok(Some(MoeConfig {
            num_experts,
            topk,
            ffn_hidden_size: size(m, "moe_ffn_hidden_size")?.unwrap_or(ffn_hidden_size),
            aux_loss_coeff: aux_loss_coeff(m)?,
            pre_softmax: set(m, "moe_router_pre_softmax").and_then(Value::as_bool) == Some(true),
            router_fp32: router_fp32(m)?,
        }))
    }
}

/// The trainer's `moe_aux_loss_coeff`, when set, over the model config's; refused for a dense
/// model or a value that is not a number ≥ 0.
pub fn override_aux_loss_coeff(
    model: &mut crate::model::GptConfig,
    coeff: Option<f64>,
) -> Result<()> {
    let Some(c) = coeff else {
        return Ok(());
    };
    let Some(moe) = model.moe.as_mut() else {
        return Err(PluginError::config(
            "moe_aux_loss_coeff is set, but the model has no routed experts",
        ));
    };
    if !(c.is_finite() && c >= 0.0) {
        return Err(PluginError::config(format!(
            "moe_aux_loss_coeff is {c}; expected a number ≥ 0"
        )));
    }
    moe.aux_loss_coeff = c;
    Ok(())
}

/// Where each token's choices go: tokens sorted by expert (token order within each expert),
/// as the dispatcher permutes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Per slot of the permuted order: the (token, choice) it holds, as `t·k + j` (where its probability is).
    pub choice: Vec<u32>,
    /// Per `t·k + j`: the slot holding token t's j-th choice.
    pub slot: Vec<u32>,
    /// Tokens routed to each expert (its run of slots, in expert order).
    pub counts: Vec<usize>,
}

/// The k largest entries of each row of `scores` (`[tokens, experts]` row-major), largest first;
/// ties to the lower index.
pub fn top_k(scores: &[f32], experts: usize, k: usize) -> Vec<u32> {
    let mut chosen = Vec::with_capacity(scores.len() / experts.max(1) * k);
    let mut order: Vec<u32> = Vec::with_capacity(experts);
    for row in scores.chunks(experts) {
        order.clear();
        order.extend(0..experts as u32);
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        chosen.extend_from_slice(&order[..k]);
    }
    chosen
}

/// The permutation for `chosen` (`[tokens, k]` expert ids).
pub fn route(chosen: &[u32], experts: usize) -> Routing {
    let mut counts = vec![0usize; experts];
    for &e in chosen {
        counts[e as usize] += 1;
    }
    let mut next: Vec<usize> = counts
        .iter()
        .scan(0, |at, &n| {
            let start = *at;
            *at += n;
            Some(start)
        })
        .collect();
    let n = chosen.len();
    let (mut choice, mut slot) = (vec![0u32; n], vec![0u32; n]);
    // Token order within an expert: `chosen` is in token order.
    for (tj, &e) in chosen.iter().enumerate() {
        let s = next[e as usize];
        next[e as usize] += 1;
        choice[s] = tj as u32;
        slot[tj] = s as u32;
    }
    Routing {
        choice,
        slot,
        counts,
    }
}

/// `softmax` over the last axis in fp32.
fn softmax_f32(x: &Tensor) -> T {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// One MoE layer's weights: the router `[E, h]`, the stacked experts' `linear_fc1`
/// `[E, 2·F, h]` (`[gate; up]`) and `linear_fc2` `[E, h, F]`.
pub struct Experts<'a> {
    pub router: &'a Tensor,
    pub fc1: &'a Tensor,
    pub fc2: &'a Tensor,
}

/// What a MoE layer gives: its output and, when it has one, its load-balancing loss (fp32,
/// the coefficient in it).
pub struct MoeOut {
    pub out: Tensor,
    pub aux_loss: Option<Tensor>,
}

/// What the router decides for the tokens.
struct Router {
    /// `[T, E]` in fp32 (the load-balancing loss's input).
    logits: Tensor,
    /// `[T, k]`: each token's chosen experts' probabilities, in `x`'s dtype.
    probs: Tensor,
    routing: Routing,
}

/// The router on `x` (`[T, h]`): logits, top-k, and the probabilities of the chosen experts.
fn router(cfg: &MoeConfig, x: &Tensor, weight: &Tensor) -> candle_core::Result<Router> {
    let logits = if cfg.router_fp32 {
        crate::model::linear(&x.to_dtype(DType::F32)?, &weight.to_dtype(DType::F32)?)?
    } else {
        crate::model::linear(x, weight)?
    };
    let lf = logits.to_dtype(DType::F32)?;
    // Softmax is monotonic: the top-k of the logits is that of the scores (the aux loss's).
    let chosen = top_k(
        &lf.flatten_all()?.to_vec1::<f32>()?,
        cfg.num_experts,
        cfg.topk,
    );
    let routing = route(&chosen, cfg.num_experts);
    let index = Tensor::from_vec(chosen, (x.dim(0)?, cfg.topk), x.device())?;
    let probs = if cfg.pre_softmax {
        softmax_f32(&lf)?.gather(&index, 1)?
    } else {
        softmax_f32(&lf.gather(&index, 1)?)?
    };
    // In the dtype of the activations they scale: megatron-core's `probs.type_as(logits)` is
    // that dtype unless the router runs in fp32, and its product is cast back to it.
    let probs = probs.to_dtype(x.dtype())?;
    Ok(Router {
        logits: lf,
        probs,
        routing,
    })
}

/// The layer on the normed input `xn` (`[b, s, h]`).
pub fn forward(cfg: &MoeConfig, xn: &Tensor, w: &Experts) -> candle_core::Result<MoeOut> {
    let dims = xn.dims().to_vec();
    let h = *dims.last().expect("xn is [b, s, h]");
    let x = xn.reshape(((), h))?;
    let (tokens, k) = (x.dim(0)?, cfg.topk);
    let Router {
        logits: lf,
        probs,
        routing,
    } = router(cfg, &x, w.router)?;
    let dev = x.device();
    let ids = |v: &[u32]| Tensor::from_slice(v, v.len(), dev);
    let token: Vec<u32> = routing.choice.iter().map(|&c| c / k as u32).collect();
    let xp = x.index_select(&ids(&token)?, 0)?;
    let pp = probs
        .flatten_all()?
        .index_select(&ids(&routing.choice)?, 0)?
        .unsqueeze(1)?;
    let y = if [&xp, w.fc1, w.fc2].into_iter().all(crate::kernels::applies) {
        grouped(&xp, &pp, w, &routing.counts)?
    } else {
        looped(&xp, &pp, w, &routing.counts)?
    };
    let out = y
        .index_select(&ids(&routing.slot)?, 0)?
        .reshape((tokens, k, h))?
        .sum(1)?
        .reshape(dims)?;
    let aux_loss = (cfg.aux_loss_coeff > 0.0)
        .then(|| load_balancing_loss(cfg, &lf, &routing.counts))
        .transpose()?;
    Ok(MoeOut { out, aux_loss })
}

/// The experts on the permuted tokens `xp` (`[N, h]`, `counts[e]` rows each) with their
/// probabilities `pp` (`[N, 1]`), through the grouped-GEMM op (fp32 on the CPU).
fn grouped(xp: &Tensor, pp: &Tensor, w: &Experts, counts: &[usize]) -> T {
    let counts = std::sync::Arc::new(counts.to_vec());
    let act = swiglu(&crate::kernels::grouped_linear(xp, w.fc1, counts.clone())?)?;
    crate::kernels::grouped_linear(&act.broadcast_mul(pp)?, w.fc2, counts)
}

/// The same, one expert at a time on slices of the stacked weights (other dtypes, CUDA).
fn looped(xp: &Tensor, pp: &Tensor, w: &Experts, counts: &[usize]) -> T {
    let mut outs = Vec::with_capacity(counts.len());
    let mut at = 0;
    for (expert, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let xe = xp.narrow(0, at, n)?;
        let act = swiglu(&crate::model::linear(&xe, &w.fc1.get(expert)?)?)?;
        let act = act.broadcast_mul(&pp.narrow(0, at, n)?)?;
        outs.push(crate::model::linear(&act, &w.fc2.get(expert)?)?);
        at += n;
    }
    Tensor::cat(&outs, 0)
}

/// megatron-core's `switch_load_balancing_loss_func` on fp32 `logits` (`[T, E]`) with the
/// tokens routed to each expert.
fn load_balancing_loss(cfg: &MoeConfig, logits: &Tensor, counts: &[usize]) -> T {
    let tokens = logits.dim(0)? as f64;
    let per_expert: Vec<f32> = counts.iter().map(|&n| n as f32).collect();
    let per_expert = Tensor::from_vec(per_expert, counts.len(), logits.device())?;
    let scale = cfg.num_experts as f64 * cfg.aux_loss_coeff / (cfg.topk as f64 * tokens * tokens);
    (softmax_f32(logits)?.sum(0)? * per_expert)?.sum_all()? * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridgeflow_sdk::serde_json::json;
    use candle_core::Device;

    fn config(v: Value) -> Result<Option<MoeConfig>> {
        MoeConfig::from_megatron(v.as_object().unwrap(), 128)
    }

    #[test]
    fn config_reads_bridges_fields_and_refuses_the_rest() {
        assert_eq!(config(json!({"num_layers": 2})).unwrap(), None);
        let c = config(json!({"num_moe_experts": 4, "moe_router_topk": 2,
            "moe_ffn_hidden_size": 32, "moe_aux_loss_coeff": 0.001,
            "moe_router_load_balancing_type": "aux_loss", "moe_router_pre_softmax": false}))
        .unwrap()
        .unwrap();
        assert_eq!((c.num_experts, c.topk, c.ffn_hidden_size), (4, 2, 32));
        assert_eq!((c.aux_loss_coeff, c.pre_softmax), (0.001, false));
        let none = json!({"num_moe_experts": 4, "moe_aux_loss_coeff": 0.01,
            "moe_router_load_balancing_type": "none"});
        assert_eq!(config(none).unwrap().unwrap().aux_loss_coeff, 0.0);
        for (key, v) in [
            ("moe_shared_expert_intermediate_size", json!(64)),
            ("moe_router_score_function", json!("sigmoid")),
            ("moe_router_load_balancing_type", json!("seq_aux_loss")),
            ("moe_layer_freq", json!([0, 1])),
            ("moe_z_loss_coeff", json!(0.001)),
            ("moe_router_enable_expert_bias", json!(true)),
            ("moe_router_topk", json!(5)),
            ("moe_aux_loss_coeff", json!(-1.0)),
        ] {
            let mut m = json!({"num_moe_experts": 4});
            m[key] = v;
            let e = config(m).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn routing_sorts_tokens_by_expert_and_finds_each_choice() {
        // 3 tokens, k 2, 3 experts.
        let scores = [0.1, 0.9, 0.5, 0.7, 0.2, 0.7, 0.0, 0.3, 0.2];
        let chosen = top_k(&scores, 3, 2);
        assert_eq!(chosen, [1, 2, 0, 2, 1, 2]);
        let r = route(&chosen, 3);
        assert_eq!(r.counts, [1, 2, 3]);
        let tokens: Vec<u32> = r.choice.iter().map(|&c| c / 2).collect();
        assert_eq!(tokens, [1, 0, 2, 0, 1, 2]);
        assert_eq!(r.choice, [2, 0, 4, 1, 3, 5]);
        for (tj, &s) in r.slot.iter().enumerate() {
            assert_eq!(r.choice[s as usize] as usize, tj);
        }
    }

    /// The grouped-GEMM op against per-expert slices of the stacked weights: outputs and the
    /// gradients of the tokens, the weights and the probabilities, an expert with no tokens
    /// included.
    #[test]
    fn grouped_experts_equal_the_looped_ones() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let (h, f, counts) = (4, 3, vec![2usize, 0, 3, 1]);
        let (n, e) = (counts.iter().sum::<usize>(), counts.len());
        let vals = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 997) as f32 / 498.0 - 1.0)
                .collect()
        };
        let var = |len, seed, shape: &[usize]| {
            Var::from_tensor(&Tensor::from_vec(vals(len, seed), shape, &dev).unwrap()).unwrap()
        };
        let (x, p) = (var(n * h, 1, &[n, h]), var(n, 2, &[n, 1]));
        let (fc1, fc2) = (
            var(e * 2 * f * h, 3, &[e, 2 * f, h]),
            var(e * h * f, 4, &[e, h, f]),
        );
        let router = Tensor::zeros((e, h), DType::F32, &dev).unwrap();
        let w = Experts {
            router: &router,
            fc1: fc1.as_tensor(),
            fc2: fc2.as_tensor(),
        };
        let run = |path: fn(&Tensor, &Tensor, &Experts, &[usize]) -> T| {
            let y = path(x.as_tensor(), p.as_tensor(), &w, &counts).unwrap();
            let g = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut all = vec![flat(&y)];
            for v in [&x, &p, &fc1, &fc2] {
                all.push(flat(g.get(v.as_tensor()).unwrap()));
            }
            all
        };
        for (a, b) in run(grouped).iter().zip(run(looped)) {
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() <= 1e-5 * v.abs().max(1.0), "{u} vs {v}");
            }
        }
    }

    /// The layer against the same computation written token by token.
    #[test]
    fn layer_equals_the_per_token_sum_of_its_experts() {
        let dev = Device::Cpu;
        let (tokens, h, f, e) = (5, 4, 3, 3);
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let x = Tensor::from_vec(vals(tokens * h, 7), (1, tokens, h), &dev).unwrap();
        let router = Tensor::from_vec(vals(e * h, 11), (e, h), &dev).unwrap();
        let fc1 = Tensor::from_vec(vals(e * 2 * f * h, 13), (e, 2 * f, h), &dev).unwrap();
        let fc2 = Tensor::from_vec(vals(e * h * f, 17), (e, h, f), &dev).unwrap();
        let swiglu =
            |t: &Tensor| -> T { t.narrow(D::Minus1, 0, f)?.silu()? * t.narrow(D::Minus1, f, f)? };
        for pre_softmax in [false, true] {
            let cfg = MoeConfig {
                num_experts: e,
                topk: 2,
                ffn_hidden_size: f,
                aux_loss_coeff: 0.01,
                pre_softmax,
                router_fp32: false,
            };
            let w = Experts {
                router: &router,
                fc1: &fc1,
                fc2: &fc2,
            };
            let got = forward(&cfg, &x, &w).unwrap();
            let xs = x.squeeze(0).unwrap();
            let logits: Vec<Vec<f32>> = xs.matmul(&router.t().unwrap()).unwrap().to_vec2().unwrap();
            let mut counts = vec![0f64; e];
            let mut prob_sums = vec![0f64; e];
            for (t, row) in logits.iter().enumerate() {
                let chosen = top_k(row, e, 2);
                let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
                let zk: f64 = chosen.iter().map(|&c| (row[c as usize] as f64).exp()).sum();
                let xt = xs.get(t).unwrap().unsqueeze(0).unwrap();
                let mut want = vec![0f64; h];
                for &c in &chosen {
                    let c = c as usize;
                    let p = (row[c] as f64).exp() / if pre_softmax { z } else { zk };
                    let a = swiglu(&xt.matmul(&fc1.get(c).unwrap().t().unwrap()).unwrap()).unwrap();
                    let y: Vec<f32> = a
                        .matmul(&fc2.get(c).unwrap().t().unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    want.iter_mut()
                        .zip(&y)
                        .for_each(|(w, &y)| *w += p * y as f64);
                    counts[c] += 1.0;
                }
                for (s, &v) in prob_sums.iter_mut().zip(row) {
                    *s += (v as f64).exp() / z;
                }
                let row_got: Vec<f32> = got.out.get(0).unwrap().get(t).unwrap().to_vec1().unwrap();
                for (g, w) in row_got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "token {t}: {g} vs {w}");
                }
            }
            let aux: f32 = got.aux_loss.unwrap().to_scalar().unwrap();
            let want: f64 = prob_sums
                .iter()
                .zip(&counts)
                .map(|(p, n)| p * n)
                .sum::<f64>()
                * e as f64
                * 0.01
                / (2.0 * (tokens * tokens) as f64);
            assert!(
                (aux as f64 - want).abs() < 1e-7 * want.max(1.0),
                "{aux} vs {want}"
            );
        }
    }
}

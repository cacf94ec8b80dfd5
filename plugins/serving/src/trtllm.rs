//! TensorRT-LLM's unified checkpoint (`config.json` + `rank{N}.safetensors`, what
//! `trtllm-build --checkpoint_dir` reads in TensorRT-LLM 0.8 – 1.2) for Llama, Mistral, Qwen2,
//! Mixtral and Qwen2-MoE, as TensorRT-LLM 0.17's own `convert_checkpoint.py` lays it out:
//!
//! | TensorRT-LLM | from HF | per rank |
//! |---|---|---|
//! | `transformer.vocab_embedding` | `embed_tokens` | whole; or padded and split by rows (`parallel_embedding` 0) or columns (1) |
//! | `attention.qkv` | q, k, v (weights, biases) | `cat(q_r, k_r, v_r)`, KV heads repeated when fewer than tp |
//! | `attention.dense` | `o_proj` | columns |
//! | `mlp.fc` / `mlp.gate` / `mlp.proj` | **gate** / **up** / down | rows / rows / columns |
//! | `mlp.router` | the router | whole, **f32** |
//! | `mlp.fc` (experts) | `[up; gate]` per local expert | rows over moe_tp, experts over ep |
//! | `mlp.proj` (experts) | down per local expert | columns over moe_tp |
//! | `mlp.shared_expert.fc` / `.proj` | `[up_r; gate_r]` / down | rows / columns |
//! | `lm_head` | `lm_head` (or `embed_tokens` when tied) | padded to a multiple of tp, rows |
//!
//! Pipeline stages get `layers / pp` consecutive layers each, renumbered from 0; the first holds
//! the embedding, the last `ln_f` and `lm_head`. The three RoPE tables TensorRT-LLM's converter
//! also writes are left out: the loader recomputes them (they are not required; checked against
//! TensorRT-LLM's loader in `shared/specs/trtllm.md` §3).

use crate::model::HfModel;
use crate::place::{chunk, col_chunk, head_rows, matrix, row_chunk, vocab_segs, Out, Seg};
use bridgeflow_sdk::{DType, PluginError, Result, TensorInfo};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The run's parallel layout and output dtype.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub tp: u64,
    pub pp: u64,
    pub ep: u64,
    pub dtype: DType,
    /// `--use_parallel_embedding --embedding_sharding_dim D`.
    pub parallel_embedding: Option<u64>,
    /// The input is ModelOpt-style FP8 (`fp8-static layout = "trtllm"`): e4m3 projections with
    /// their scaling factors, placed as ModelOpt's `export_tensorrt_llm_checkpoint` does.
    pub fp8: bool,
}

/// The families TensorRT-LLM's converter takes, and the MoE naming of each.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    Llama,
    Qwen,
}

fn family(m: &HfModel) -> Result<Family> {
    match m.architecture.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" | "MixtralForCausalLM" => Ok(Family::Llama),
        "Qwen2ForCausalLM" | "Qwen2MoeForCausalLM" => Ok(Family::Qwen),
        other => Err(PluginError::config(format!(
            "TensorRT-LLM checkpoints: {other} is not supported (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE are); TensorRT-LLM 1.x loads HF folders directly (--to hf:)"
        ))),
    }
}

/// The tensors of the input by name, for shapes.
struct Inputs<'a>(HashMap<&'a str, &'a TensorInfo>);

impl<'a> Inputs<'a> {
    fn shape(&self, name: &str) -> Result<&'a [u64]> {
        self.0.get(name).map(|t| t.shape.as_slice()).ok_or_else(|| {
            PluginError::shape(format!(
                "the input has no '{name}', which TensorRT-LLM's checkpoint needs"
            ))
        })
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn is_fp8(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|t| t.dtype == DType::F8_E4M3)
    }
}

/// The FP8 scaling factors (`[1]` f32) of a quantized linear layer, by TensorRT-LLM's name.
const FACTORS: [&str; 2] = ["weights_scaling_factor", "activation_scaling_factor"];
/// The KV-cache scaling factors of an attention layer.
const KV_FACTORS: [&str; 3] = [
    "kv_cache_scaling_factor",
    "k_cache_scaling_factor",
    "v_cache_scaling_factor",
];

/// The inputs an FP8 checkpoint carries that TensorRT-LLM does not keep: k's and v's factors
/// (q's stand for the fused qkv, whose members share them).
pub fn unused(m: &HfModel, lay: &Layout) -> Vec<String> {
    if !lay.fp8 {
        return Vec::new();
    }
    (0..m.layers)
        .flat_map(|l| {
            ["k_proj", "v_proj"]
                .into_iter()
                .flat_map(move |p| FACTORS.map(|f| format!("model.layers.{l}.self_attn.{p}.{f}")))
        })
        .collect()
}

/// Every output tensor of every rank, with its segments.
pub fn place(m: &HfModel, lay: &Layout, inputs: &[TensorInfo]) -> Result<Vec<Out>> {
    family(m)?;
    let inp = Inputs(inputs.iter().map(|t| (t.name(), t)).collect());
    let (tp, pp) = (lay.tp, lay.pp);
    if !m.layers.is_multiple_of(pp) {
        return Err(PluginError::config(format!(
            "--pp {pp}: {} layers do not split into {pp} equal stages (TensorRT-LLM 0.17 needs equal stages)",
            m.layers
        )));
    }
    if tp % lay.ep != 0 {
        return Err(PluginError::config(format!(
            "--ep {} does not divide --tp {tp}",
            lay.ep
        )));
    }
    let per_stage = m.layers / pp;
    let mut outs = Vec::new();
    for p in 0..pp {
        for r in 0..tp {
            let mut rank = Rank {
                m,
                lay,
                inp: &inp,
                r,
                file: format!("rank{}.safetensors", p * tp + r),
                outs: &mut outs,
            };
            if p == 0 {
                rank.embedding()?;
            }
            for local in 0..per_stage {
                rank.layer(p * per_stage + local, local)?;
            }
            if p == pp - 1 {
                rank.head()?;
            }
        }
    }
    Ok(outs)
}

/// One rank's tensors as they are placed.
struct Rank<'a> {
    m: &'a HfModel,
    lay: &'a Layout,
    inp: &'a Inputs<'a>,
    r: u64,
    file: String,
    outs: &'a mut Vec<Out>,
}

impl Rank<'_> {
    fn push(&mut self, name: &str, dtype: DType, shape: Vec<u64>, segs: Vec<Seg>) {
        // e4m3 weights stay e4m3 (their scales say what they mean).
        let fp8 = segs
            .iter()
            .all(|s| s.src.as_deref().is_some_and(|n| self.inp.is_fp8(n)));
        let dtype = if fp8 { DType::F8_E4M3 } else { dtype };
        self.outs.push(Out {
            name: format!("{}/{name}", self.file),
            dtype,
            shape,
            segs,
        });
    }

    /// Stacked segments as an output: rows = their rows, width = theirs.
    fn stacked(&mut self, name: &str, dtype: DType, segs: Vec<Seg>) {
        let rows: u64 = segs.iter().map(|s| s.rows.end - s.rows.start).sum();
        let width = segs.first().map_or(0, |s| s.cols.end - s.cols.start);
        let shape = if width == 1 && self.is_vector(&segs) {
            vec![rows]
        } else {
            vec![rows, width]
        };
        self.push(name, dtype, shape, segs);
    }

    fn is_vector(&self, segs: &[Seg]) -> bool {
        segs.iter().all(|s| {
            s.src
                .as_ref()
                .is_none_or(|n| self.inp.shape(n).is_ok_and(|sh| sh.len() == 1))
        })
    }

    fn whole(&mut self, name: &str, src: &str, dtype: DType) -> Result<()> {
        let shape = self.inp.shape(src)?.to_vec();
        self.push(name, dtype, shape.clone(), vec![Seg::whole(src, &shape)]);
        Ok(())
    }

    fn embedding(&mut self) -> Result<()> {
        let src = "model.embed_tokens.weight";
        let shape = self.inp.shape(src)?;
        let (v, h) = matrix(shape);
        let (tp, r, dt) = (self.lay.tp, self.r, self.lay.dtype);
        let name = "transformer.vocab_embedding.weight";
        match self.lay.parallel_embedding {
            None => self.whole(name, src, dt),
            Some(0) => {
                let padded = v.div_ceil(tp) * tp;
                let segs = vocab_segs(src, v, h, padded, tp, r)?;
                self.push(name, dt, vec![padded / tp, h], segs);
                Ok(())
            }
            Some(_) => {
                let seg = col_chunk(src, shape, tp, r)?;
                self.push(name, dt, vec![v, h / tp], vec![seg]);
                Ok(())
            }
        }
    }

    fn head(&mut self) -> Result<()> {
        let dt = self.lay.dtype;
        self.whole("transformer.ln_f.weight", "model.norm.weight", dt)?;
        let src = if self.inp.has("lm_head.weight") || !self.m.tied {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let (v, h) = matrix(self.inp.shape(src)?);
        let tp = self.lay.tp;
        let padded = v.div_ceil(tp) * tp;
        let segs = vocab_segs(src, v, h, padded, tp, self.r)?;
        self.push("lm_head.weight", dt, vec![padded / tp, h], segs);
        Ok(())
    }

    fn layer(&mut self, l: u64, local: u64) -> Result<()> {
        let (hf, trt) = (
            format!("model.layers.{l}"),
            format!("transformer.layers.{local}"),
        );
        let dt = self.lay.dtype;
        self.whole(
            &format!("{trt}.input_layernorm.weight"),
            &format!("{hf}.input_layernorm.weight"),
            dt,
        )?;
        self.whole(
            &format!("{trt}.post_layernorm.weight"),
            &format!("{hf}.post_attention_layernorm.weight"),
            dt,
        )?;
        self.attention(&hf, &trt)?;
        if self.inp.has(&format!("{hf}.block_sparse_moe.gate.weight")) {
            let moe = format!("{hf}.block_sparse_moe");
            self.experts(
                &moe,
                &trt,
                &format!("{moe}.gate.weight"),
                ["w1", "w3", "w2"],
            )
        } else if self.m.experts > 0 {
            let mlp = format!("{hf}.mlp");
            self.experts(
                &mlp,
                &trt,
                &format!("{mlp}.gate.weight"),
                ["gate_proj", "up_proj", "down_proj"],
            )?;
            self.shared_expert(&mlp, &trt)
        } else {
            self.dense_mlp(&hf, &trt)
        }
    }

    /// `cat(q_r, k_r, v_r)` for the weight and, when present, the bias.
    fn attention(&mut self, hf: &str, trt: &str) -> Result<()> {
        let (m, tp, r, dt) = (self.m, self.lay.tp, self.r, self.lay.dtype);
        let a = format!("{hf}.self_attn");
        for kind in ["weight", "bias"] {
            let q = format!("{a}.q_proj.{kind}");
            if kind == "bias" && !self.inp.has(&q) {
                continue;
            }
            let mut segs = Vec::new();
            for (p, heads) in [("q", m.heads), ("k", m.kv_heads), ("v", m.kv_heads)] {
                let src = format!("{a}.{p}_proj.{kind}");
                let (_, width) = matrix(self.inp.shape(&src)?);
                let rows = head_rows(heads, m.head_dim, tp, r, &src)?;
                segs.push(Seg::rows(&src, rows, width));
            }
            self.stacked(&format!("{trt}.attention.qkv.{kind}"), dt, segs);
        }
        let o = format!("{a}.o_proj.weight");
        let seg = col_chunk(&o, self.inp.shape(&o)?, tp, r)?;
        self.stacked(&format!("{trt}.attention.dense.weight"), dt, vec![seg]);
        if self.lay.fp8 {
            self.factors(
                &format!("{trt}.attention"),
                &a,
                &[("qkv", "q_proj"), ("dense", "o_proj")],
            )?;
            for f in KV_FACTORS {
                self.whole(
                    &format!("{trt}.attention.{f}"),
                    &format!("{a}.{f}"),
                    DType::F32,
                )?;
            }
        }
        Ok(())
    }

    /// FP8: each layer's scaling factors, from the HF projection standing for it.
    fn factors(&mut self, trt: &str, hf: &str, pairs: &[(&str, &str)]) -> Result<()> {
        for (ours, theirs) in pairs {
            for f in FACTORS {
                self.whole(
                    &format!("{trt}.{ours}.{f}"),
                    &format!("{hf}.{theirs}.{f}"),
                    DType::F32,
                )?;
            }
        }
        Ok(())
    }

    /// fc ← gate, gate ← up (TensorRT-LLM's names), proj ← down.
    fn dense_mlp(&mut self, hf: &str, trt: &str) -> Result<()> {
        let (tp, r, dt) = (self.lay.tp, self.r, self.lay.dtype);
        for (ours, theirs, by_cols) in [
            ("fc", "gate_proj", false),
            ("gate", "up_proj", false),
            ("proj", "down_proj", true),
        ] {
            let src = format!("{hf}.mlp.{theirs}.weight");
            let shape = self.inp.shape(&src)?;
            let seg = if by_cols {
                col_chunk(&src, shape, tp, r)?
            } else {
                row_chunk(&src, shape, tp, r)?
            };
            self.stacked(&format!("{trt}.mlp.{ours}.weight"), dt, vec![seg]);
        }
        if self.lay.fp8 {
            let pairs = [
                ("fc", "gate_proj"),
                ("gate", "up_proj"),
                ("proj", "down_proj"),
            ];
            self.factors(&format!("{trt}.mlp"), &format!("{hf}.mlp"), &pairs)?;
        }
        Ok(())
    }

    /// The router (f32) and this rank's experts: `fc` = `[up; gate]` rows of its moe_tp
    /// share, `proj` = down's columns, stacked over its ep share of the experts.
    /// `names` = HF (gate, up, down) under `{prefix}.experts.{e}.`.
    fn experts(&mut self, prefix: &str, trt: &str, router: &str, names: [&str; 3]) -> Result<()> {
        let (m, tp, ep, dt) = (self.m, self.lay.tp, self.lay.ep, self.lay.dtype);
        self.whole(&format!("{trt}.mlp.router.weight"), router, DType::F32)?;
        let (moe_tp, mr, er) = (tp / ep, self.r / ep, self.r % ep);
        let local = chunk(m.experts, ep, er, "experts over --ep")?;
        let (mut fc, mut proj) = (Vec::new(), Vec::new());
        let mut inter = 0;
        let mut hidden = 0;
        for e in local.clone() {
            let src = |n: &str| format!("{prefix}.experts.{e}.{n}.weight");
            let (gate, up, down) = (src(names[0]), src(names[1]), src(names[2]));
            for s in [&up, &gate] {
                fc.push(row_chunk(s, self.inp.shape(s)?, moe_tp, mr)?);
            }
            let dshape = self.inp.shape(&down)?;
            (hidden, inter) = matrix(dshape);
            proj.push(col_chunk(&down, dshape, moe_tp, mr)?);
        }
        let n = local.end - local.start;
        let rows_per = fc
            .iter()
            .take(2)
            .map(|s| s.rows.end - s.rows.start)
            .sum::<u64>();
        let width = fc.first().map_or(0, |s| s.cols.end - s.cols.start);
        self.push(
            &format!("{trt}.mlp.fc.weight"),
            dt,
            vec![n, rows_per, width],
            fc,
        );
        self.push(
            &format!("{trt}.mlp.proj.weight"),
            dt,
            vec![n, hidden, inter / moe_tp],
            proj,
        );
        Ok(())
    }

    /// Qwen2-MoE's shared expert: fc = `[up_r; gate_r]`, proj = down's columns, its gate whole.
    fn shared_expert(&mut self, mlp: &str, trt: &str) -> Result<()> {
        let (tp, r, dt) = (self.lay.tp, self.r, self.lay.dtype);
        let s = |n: &str| format!("{mlp}.shared_expert.{n}.weight");
        let mut fc = Vec::new();
        for src in [s("up_proj"), s("gate_proj")] {
            fc.push(row_chunk(&src, self.inp.shape(&src)?, tp, r)?);
        }
        self.stacked(&format!("{trt}.mlp.shared_expert.fc.weight"), dt, fc);
        let down = s("down_proj");
        let seg = col_chunk(&down, self.inp.shape(&down)?, tp, r)?;
        self.stacked(
            &format!("{trt}.mlp.shared_expert.proj.weight"),
            dt,
            vec![seg],
        );
        self.whole(
            &format!("{trt}.mlp.shared_expert_gate.weight"),
            &format!("{mlp}.shared_expert_gate.weight"),
            dt,
        )
    }
}

fn rope_theta(m: &HfModel, default: f64) -> f64 {
    m.f64("rope_theta")
        .or_else(|| m.raw.get("rope_parameters")?.get("rope_theta")?.as_f64())
        .unwrap_or(default)
}

/// `rope_scaling` as TensorRT-LLM copies it (transformers 5 keeps it in `rope_parameters`; the
/// default rope is none).
fn rope_scaling(m: &HfModel) -> Value {
    if let Some(s) = m.raw.get("rope_scaling").filter(|v| !v.is_null()) {
        return s.clone();
    }
    match m.raw.get("rope_parameters") {
        Some(p)
            if p.get("rope_type")
                .and_then(Value::as_str)
                .is_some_and(|t| t != "default") =>
        {
            let mut p = p.clone();
            if let Some(o) = p.as_object_mut() {
                o.remove("rope_theta");
            }
            p
        }
        _ => Value::Null,
    }
}

/// The `config.json` ModelOpt 0.37's `export_tensorrt_llm_checkpoint` writes for an FP8 Llama
/// (its own key set, not the converter's; `rank` is the last rank it wrote, a quirk kept).
pub fn modelopt_config(m: &HfModel, lay: &Layout) -> Result<Map<String, Value>> {
    if family(m)? != Family::Llama || m.experts > 0 {
        return Err(PluginError::unsupported(format!(
            "TensorRT-LLM FP8 checkpoints: {} (dense Llama and Mistral are written)",
            m.architecture
        )));
    }
    let v = json!({
        "producer": {"name": "modelopt", "version": "0.37.0"},
        "architecture": m.architecture,
        "dtype": lay.dtype.torch_name(),
        "logits_dtype": "float16",
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_size": m.hidden,
        "norm_epsilon": m.f64("rms_norm_eps").unwrap_or(1e-6),
        "vocab_size": m.vocab,
        "max_position_embeddings": m.raw.get("max_position_embeddings").cloned().unwrap_or(Value::Null),
        "hidden_act": "silu",
        "use_parallel_embedding": lay.parallel_embedding.is_some(),
        "embedding_sharding_dim": lay.parallel_embedding.unwrap_or(0),
        "head_size": m.head_dim,
        "intermediate_size": m.intermediate,
        "position_embedding_type": "rope_gpt_neox",
        "share_embedding_table": false,
        "residual_mlp": false,
        "bias": false,
        "rotary_pct": 1.0,
        "rank": lay.tp * lay.pp - 1,
        "decoder": "llama",
        "rmsnorm": true,
        "lm_head_bias": false,
        "rotary_base": rope_theta(m, 10000.0),
        "mapping": {"world_size": lay.tp * lay.pp, "tp_size": lay.tp, "pp_size": lay.pp},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]},
    });
    Ok(v.as_object().cloned().unwrap_or_default())
}

/// TensorRT-LLM's `config.json` for the model and layout, key for key as 0.17 writes it
/// (`LLaMAConfig` / `QWenConfig.to_dict()`), with `mapping` limited to the keys 0.17 and 1.x
/// both read.
pub fn config(m: &HfModel, lay: &Layout) -> Result<Map<String, Value>> {
    let fam = family(m)?;
    let moe = m.experts > 0;
    let b = |k: &str| m.raw.get(k).and_then(Value::as_bool).unwrap_or(false);
    let normalization = match (fam, moe) {
        (Family::Qwen, _) => json!(0),
        (Family::Llama, true) => json!(1),
        (Family::Llama, false) => Value::Null,
    };
    let moe_block = json!({
        "num_experts": m.experts,
        "shared_expert_intermediate_size": m.shared_expert_intermediate,
        "top_k": m.top_k,
        "normalization_mode": normalization,
        "sparse_mixer_epsilon": 0.01,
        "tp_mode": 0,
        "device_limited_n_group": 0,
        "device_limited_topk_group": 0,
        "device_limited_routed_scaling_factor": 1.0,
    });
    let mut c = Map::new();
    c.insert("mlp_bias".into(), b("mlp_bias").into());
    let attn_bias = fam == Family::Qwen || b("attention_bias");
    c.insert("attn_bias".into(), attn_bias.into());
    let theta_default = if fam == Family::Qwen {
        100000.0
    } else {
        10000.0
    };
    c.insert("rotary_base".into(), rope_theta(m, theta_default).into());
    c.insert("rotary_scaling".into(), rope_scaling(m));
    if fam == Family::Llama {
        c.insert("residual_mlp".into(), false.into());
    }
    c.insert("disable_weight_only_quant_plugin".into(), false.into());
    if fam == Family::Qwen {
        c.insert("num_labels".into(), 1.into());
        c.insert("use_logn_attn".into(), false.into());
    }
    c.insert("moe".into(), moe_block);
    if fam == Family::Llama {
        for (k, v) in [
            ("remove_duplicated_kv_heads", json!(false)),
            ("fc_after_embed", json!(false)),
            ("use_input_layernorm_in_first_layer", json!(true)),
            ("use_last_layernorm", json!(true)),
            ("layer_idx_offset", json!(0)),
        ] {
            c.insert(k.into(), v);
        }
    }
    let eps = m.f64("rms_norm_eps").unwrap_or(1e-6);
    for (k, v) in [
        ("architecture", json!(m.architecture)),
        ("dtype", json!(lay.dtype.torch_name())),
        ("vocab_size", json!(m.vocab)),
        ("hidden_size", json!(m.hidden)),
        ("num_hidden_layers", json!(m.layers)),
        ("num_attention_heads", json!(m.heads)),
        ("hidden_act", json!(if moe { "swiglu" } else { "silu" })),
        ("logits_dtype", json!("float32")),
        ("norm_epsilon", json!(eps)),
        ("runtime_defaults", Value::Null),
        ("position_embedding_type", json!("rope_gpt_neox")),
        ("num_key_value_heads", json!(m.kv_heads)),
        ("intermediate_size", json!(m.intermediate)),
        (
            "max_position_embeddings",
            m.raw
                .get("max_position_embeddings")
                .cloned()
                .unwrap_or(Value::Null),
        ),
        (
            "mapping",
            json!({
                "world_size": lay.tp * lay.pp,
                "gpus_per_node": 8,
                "cp_size": 1,
                "tp_size": lay.tp,
                "pp_size": lay.pp,
                "moe_tp_size": lay.tp / lay.ep,
                "moe_ep_size": lay.ep,
            }),
        ),
        (
            "quantization",
            json!({
                "quant_algo": null, "kv_cache_quant_algo": null, "group_size": 128,
                "smoothquant_val": 0.5, "clamp_val": null, "use_meta_recipe": false,
                "has_zero_point": false, "pre_quant_scale": false, "exclude_modules": null,
            }),
        ),
        (
            "use_parallel_embedding",
            json!(lay.parallel_embedding.is_some()),
        ),
        (
            "embedding_sharding_dim",
            json!(lay.parallel_embedding.unwrap_or(0)),
        ),
        ("head_size", json!(m.head_dim)),
        ("qk_layernorm", json!(false)),
        ("rotary_embedding_dim", json!(m.head_dim)),
    ] {
        c.insert(k.into(), v);
    }
    if fam == Family::Qwen {
        c.insert(
            "seq_length".into(),
            m.raw.get("seq_length").cloned().unwrap_or(json!(8192)),
        );
        c.insert("qwen_type".into(), json!(m.model_type));
        c.insert("moe_intermediate_size".into(), json!(m.moe_intermediate));
        c.insert(
            "moe_shared_expert_intermediate_size".into(),
            json!(m.shared_expert_intermediate),
        );
    }
    c.insert("tie_word_embeddings".into(), json!(m.tied));
    Ok(c)
}

//! vLLM 0.32's `sharded_state` files (`model-rank-{r}-part-{p}.safetensors`, loaded with
//! `load_format="sharded_state"` at the same TP size) for Llama, Mistral, Qwen2, Qwen3,
//! Qwen3-MoE, Gemma 2 and DeepSeek-V3: each rank's tensors under vLLM's own parameter names, as its loader
//! fills them before post-processing (`shared/specs/vllm.md` §5):
//!
//! | vLLM | from HF | per rank |
//! |---|---|---|
//! | `embed_tokens`, `lm_head` | the same | vocabulary padded to a multiple of 64, rows; tied: only `lm_head` (Gemma 2: only `embed_tokens`) |
//! | `self_attn.qkv_proj` | q, k, v (weights, biases) | `cat(q_r, k_r, v_r)`, KV heads repeated when fewer than tp |
//! | `self_attn.o_proj`, `mlp.down_proj` | the same | columns |
//! | `mlp.gate_up_proj` | gate, up | `cat(gate_r, up_r)` |
//! | `mlp.experts.gate` | `mlp.gate` (the router) | whole |
//! | `mlp.experts.routed_experts.w13_weight` / `w2_weight` | experts' gate, up / down | `[E, 2I/tp, H]` of `cat(gate_r, up_r)` / `[E, H, I/tp]` columns |
//! | `self_attn.attn._{k,v,q,prob}_scale` | — | f32 scalars 1.0, which the loader requires |
//! | norms (Qwen3 q/k norms, Gemma 2's four) | the same | whole |
//! | DeepSeek `self_attn.fused_qkv_a_proj` | `cat(q_a_proj, kv_a_proj_with_mqa)` | whole |
//! | DeepSeek `kv_b_proj`, `mla_attn.q_b_proj` / `mla_attn.o_proj` | the same | rows (by head) / columns |
//! | DeepSeek `mlp.experts._shared_experts._layer.*` | `mlp.shared_experts.*` | as a dense MLP |
//!
//! The names are vLLM-version specific (older vLLM stacked experts as `mlp.experts.w13_weight`):
//! these are 0.32's, checked against files vLLM 0.32 wrote.

use crate::model::HfModel;
use crate::place::{col_chunk, head_rows, matrix, row_chunk, vocab_segs, Out, Seg};
use bridgeflow_sdk::{DType, PluginError, Result, TensorInfo};
use std::collections::HashMap;

/// vLLM pads the vocabulary to a multiple of this before splitting it over ranks.
const VOCAB_PADDING: u64 = 64;

/// The attention scalars every attention layer registers.
const SCALES: [&str; 4] = ["_k_scale", "_v_scale", "_q_scale", "_prob_scale"];

#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub tp: u64,
    pub dtype: DType,
    /// Bytes per part file at most (a larger tensor gets a part of its own).
    pub max_part: u64,
}

/// What differs between the families vLLM's model classes implement.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    /// Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE.
    Llama,
    /// Four norms per layer, embeddings always stored as `embed_tokens`.
    Gemma2,
    /// MLA attention, dense first layers, then routed and shared experts.
    DeepseekV3,
}

fn family(m: &HfModel) -> Result<Family> {
    match m.architecture.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM"
        | "Qwen3MoeForCausalLM" => Ok(Family::Llama),
        "Gemma2ForCausalLM" => Ok(Family::Gemma2),
        "DeepseekV3ForCausalLM" => Ok(Family::DeepseekV3),
        other => Err(PluginError::config(format!(
            "vLLM sharded_state: {other} is not supported (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, DeepSeek-V3 are); vLLM loads the HF export (--to hf:) of any model it serves"
        ))),
    }
}

/// Keys vLLM needs in a DeepSeek-V3 config.json that transformers does not write (without them
/// vLLM builds a softmax router and fails on `e_score_correction_bias`): DeepSeek-V3's own.
pub fn config_additions(m: &HfModel) -> Vec<(&'static str, serde_json::Value)> {
    if m.architecture != "DeepseekV3ForCausalLM" {
        return Vec::new();
    }
    [("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")]
        .into_iter()
        .filter(|(k, _)| !m.raw.contains_key(*k))
        .map(|(k, v)| (k, serde_json::Value::from(v)))
        .collect()
}

/// The tensors of one rank (names without the file), in the order they are placed.
struct Rank<'a> {
    m: &'a HfModel,
    lay: &'a Layout,
    inp: &'a HashMap<&'a str, &'a TensorInfo>,
    r: u64,
    outs: Vec<Out>,
}

impl Rank<'_> {
    fn shape(&self, name: &str) -> Result<Vec<u64>> {
        self.inp.get(name).map(|t| t.shape.to_vec()).ok_or_else(|| {
            PluginError::shape(format!(
                "the input has no '{name}', which vLLM's model needs"
            ))
        })
    }
    fn has(&self, name: &str) -> bool {
        self.inp.contains_key(name)
    }
    fn push(&mut self, name: String, dtype: DType, shape: Vec<u64>, segs: Vec<Seg>) {
        self.outs.push(Out {
            name,
            dtype,
            shape,
            segs,
        });
    }
    /// Segments stacked into a tensor of the inputs' rank (1-D stays 1-D).
    fn stacked(&mut self, name: String, vector: bool, segs: Vec<Seg>) {
        let rows: u64 = segs.iter().map(|s| s.rows.end - s.rows.start).sum();
        let width = segs.first().map_or(0, |s| s.cols.end - s.cols.start);
        let shape = if vector {
            vec![rows]
        } else {
            vec![rows, width]
        };
        self.push(name, self.lay.dtype, shape, segs);
    }
    fn whole(&mut self, name: &str) -> Result<()> {
        let shape = self.shape(name)?;
        self.push(
            name.to_string(),
            self.lay.dtype,
            shape.clone(),
            vec![Seg::whole(name, &shape)],
        );
        Ok(())
    }

    fn vocab(&mut self, name: &str, src: &str) -> Result<()> {
        let (v, h) = matrix(&self.shape(src)?);
        let tp = self.lay.tp;
        let padded = v.next_multiple_of(VOCAB_PADDING);
        let segs = vocab_segs(src, v, h, padded, tp, self.r)?;
        self.push(name.to_string(), self.lay.dtype, vec![padded / tp, h], segs);
        Ok(())
    }

    fn layer(&mut self, l: u64, fam: Family) -> Result<()> {
        let p = format!("model.layers.{l}");
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if fam == Family::Gemma2 {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for n in norms {
            self.whole(&format!("{p}.{n}.weight"))?;
        }
        match fam {
            Family::DeepseekV3 => self.mla(&p)?,
            _ => self.attention(&p)?,
        }
        if !self.has(&format!("{p}.mlp.gate.weight")) {
            return self.dense_mlp(&format!("{p}.mlp"), &format!("{p}.mlp"));
        }
        self.experts(&p)?;
        if fam == Family::DeepseekV3 {
            let shared = format!("{p}.mlp.experts._shared_experts._layer");
            self.dense_mlp(&format!("{p}.mlp.shared_experts"), &shared)?;
        }
        Ok(())
    }

    /// DeepSeek's multi-head latent attention: the two down-projections fused and whole, the
    /// up-projections split by head, under vLLM's `mla_attn` aliases.
    fn mla(&mut self, p: &str) -> Result<()> {
        let (tp, r) = (self.lay.tp, self.r);
        let a = format!("{p}.self_attn");
        let (qa, kva) = (
            format!("{a}.q_a_proj.weight"),
            format!("{a}.kv_a_proj_with_mqa.weight"),
        );
        let segs = vec![
            Seg::whole(&qa, &self.shape(&qa)?),
            Seg::whole(&kva, &self.shape(&kva)?),
        ];
        self.stacked(format!("{a}.fused_qkv_a_proj.weight"), false, segs);
        self.whole(&format!("{a}.kv_a_layernorm.weight"))?;
        let kvb = format!("{a}.kv_b_proj.weight");
        let seg = row_chunk(&kvb, &self.shape(&kvb)?, tp, r)?;
        self.stacked(kvb, false, vec![seg]);
        let alias = |n: &str| format!("{a}.mla_attn.{n}.weight");
        let qa_norm = format!("{a}.q_a_layernorm.weight");
        let shape = self.shape(&qa_norm)?;
        self.push(
            alias("q_a_layernorm"),
            self.lay.dtype,
            shape.clone(),
            vec![Seg::whole(&qa_norm, &shape)],
        );
        let qb = format!("{a}.q_b_proj.weight");
        let seg = row_chunk(&qb, &self.shape(&qb)?, tp, r)?;
        self.stacked(alias("q_b_proj"), false, vec![seg]);
        let o = format!("{a}.o_proj.weight");
        let seg = col_chunk(&o, &self.shape(&o)?, tp, r)?;
        self.stacked(alias("o_proj"), false, vec![seg]);
        self.scales(&format!("{a}.mla_attn.mla_attn"));
        Ok(())
    }

    /// The attention scalars under `prefix`.
    fn scales(&mut self, prefix: &str) {
        for s in SCALES {
            self.push(
                format!("{prefix}.{s}"),
                DType::F32,
                vec![],
                vec![Seg::fill(1, 1, 1.0)],
            );
        }
    }

    fn attention(&mut self, p: &str) -> Result<()> {
        let (m, tp, r) = (self.m, self.lay.tp, self.r);
        let a = format!("{p}.self_attn");
        for kind in ["weight", "bias"] {
            if kind == "bias" && !self.has(&format!("{a}.q_proj.bias")) {
                continue;
            }
            let mut segs = Vec::new();
            for (x, heads) in [("q", m.heads), ("k", m.kv_heads), ("v", m.kv_heads)] {
                let src = format!("{a}.{x}_proj.{kind}");
                let (_, width) = matrix(&self.shape(&src)?);
                segs.push(Seg::rows(
                    &src,
                    head_rows(heads, m.head_dim, tp, r, &src)?,
                    width,
                ));
            }
            self.stacked(format!("{a}.qkv_proj.{kind}"), kind == "bias", segs);
        }
        let o = format!("{a}.o_proj.weight");
        let seg = col_chunk(&o, &self.shape(&o)?, tp, r)?;
        self.stacked(o, false, vec![seg]);
        for n in ["q_norm", "k_norm"] {
            let name = format!("{a}.{n}.weight");
            if self.has(&name) {
                self.whole(&name)?;
            }
        }
        for s in SCALES {
            self.push(
                format!("{a}.attn.{s}"),
                DType::F32,
                vec![],
                vec![Seg::fill(1, 1, 1.0)],
            );
        }
        Ok(())
    }

    fn gate_up(&self, gate: &str, up: &str) -> Result<Vec<Seg>> {
        let (tp, r) = (self.lay.tp, self.r);
        Ok(vec![
            row_chunk(gate, &self.shape(gate)?, tp, r)?,
            row_chunk(up, &self.shape(up)?, tp, r)?,
        ])
    }

    /// An MLP read from `{hf}.{gate,up,down}_proj` and stored as `{ours}.gate_up_proj` and
    /// `{ours}.down_proj`.
    fn dense_mlp(&mut self, hf: &str, ours: &str) -> Result<()> {
        let w = |n: &str| format!("{hf}.{n}.weight");
        let segs = self.gate_up(&w("gate_proj"), &w("up_proj"))?;
        self.stacked(format!("{ours}.gate_up_proj.weight"), false, segs);
        let down = w("down_proj");
        let seg = col_chunk(&down, &self.shape(&down)?, self.lay.tp, self.r)?;
        self.stacked(format!("{ours}.down_proj.weight"), false, vec![seg]);
        Ok(())
    }

    fn experts(&mut self, p: &str) -> Result<()> {
        let (m, tp, r) = (self.m, self.lay.tp, self.r);
        let router = format!("{p}.mlp.gate.weight");
        let shape = self.shape(&router)?;
        self.push(
            format!("{p}.mlp.experts.gate.weight"),
            self.lay.dtype,
            shape.clone(),
            vec![Seg::whole(&router, &shape)],
        );
        // DeepSeek's routing bias, kept in f32 by vLLM.
        let bias = format!("{p}.mlp.gate.e_score_correction_bias");
        if self.has(&bias) {
            let shape = self.shape(&bias)?;
            let seg = Seg::whole(&bias, &shape);
            self.push(
                format!("{p}.mlp.experts.gate.e_score_correction_bias"),
                DType::F32,
                shape,
                vec![seg],
            );
        }
        let (mut w13, mut w2) = (Vec::new(), Vec::new());
        let (mut hidden, mut inter) = (0, 0);
        for e in 0..m.experts {
            let w = |n: &str| format!("{p}.mlp.experts.{e}.{n}.weight");
            w13.extend(self.gate_up(&w("gate_proj"), &w("up_proj"))?);
            let down = self.shape(&w("down_proj"))?;
            (hidden, inter) = matrix(&down);
            w2.push(col_chunk(&w("down_proj"), &down, tp, r)?);
        }
        let rows: u64 = w13.iter().take(2).map(|s| s.rows.end - s.rows.start).sum();
        let dt = self.lay.dtype;
        let x = format!("{p}.mlp.experts.routed_experts");
        self.push(
            format!("{x}.w13_weight"),
            dt,
            vec![m.experts, rows, m.hidden],
            w13,
        );
        self.push(
            format!("{x}.w2_weight"),
            dt,
            vec![m.experts, hidden, inter / tp],
            w2,
        );
        Ok(())
    }
}

/// Every rank's tensors, each rank's split into parts of at most `max_part` bytes, and the
/// input tensors vLLM does not keep (a tied model's second copy of its embedding).
pub fn place(m: &HfModel, lay: &Layout, inputs: &[TensorInfo]) -> Result<(Vec<Out>, Vec<String>)> {
    let fam = family(m)?;
    let gemma = fam == Family::Gemma2;
    let inp: HashMap<&str, &TensorInfo> = inputs.iter().map(|t| (t.name(), t)).collect();
    let mut all = Vec::new();
    for r in 0..lay.tp {
        let mut rank = Rank {
            m,
            lay,
            inp: &inp,
            r,
            outs: Vec::new(),
        };
        let embed = "model.embed_tokens.weight";
        let has_head = rank.has("lm_head.weight");
        // Tied: one tensor holds both; vLLM keeps it as lm_head (Gemma 2: as embed_tokens).
        if gemma || !m.tied {
            rank.vocab(embed, embed)?;
        }
        if !gemma {
            let head_src = if has_head { "lm_head.weight" } else { embed };
            rank.vocab("lm_head.weight", head_src)?;
        }
        for l in 0..m.layers {
            rank.layer(l, fam)?;
        }
        rank.whole("model.norm.weight")?;
        all.extend(parts(r, rank.outs, lay.max_part));
    }
    let embed = "model.embed_tokens.weight".to_string();
    let mut unused = match (m.tied, gemma) {
        (true, false) if inp.contains_key("lm_head.weight") => vec![embed],
        (true, true) => vec!["lm_head.weight".to_string()],
        _ => vec![],
    };
    // DeepSeek's multi-token-prediction layers (past num_hidden_layers): vLLM's main model
    // does not load them.
    let past = |n: &str| {
        n.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next()?.parse::<u64>().ok())
            .is_some_and(|l| l >= m.layers)
    };
    if fam == Family::DeepseekV3 {
        unused.extend(
            inputs
                .iter()
                .map(|t| t.name())
                .filter(|n| past(n))
                .map(str::to_string),
        );
    }
    Ok((all, unused))
}

/// A rank's tensors named into part files as vLLM's writer splits them: a new part when the
/// next tensor would overflow this one.
fn parts(rank: u64, outs: Vec<Out>, max: u64) -> Vec<Out> {
    let (mut part, mut size) = (0u64, 0u64);
    outs.into_iter()
        .map(|mut o| {
            let n = o.shape.iter().product::<u64>() * o.dtype.size() as u64;
            if size > 0 && size + n > max {
                part += 1;
                size = 0;
            }
            size += n;
            o.name = format!("model-rank-{rank}-part-{part}.safetensors/{}", o.name);
            o
        })
        .collect()
}

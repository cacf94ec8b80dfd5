//! vLLM 0.32's `sharded_state` files (`model-rank-{r}-part-{p}.safetensors`, loaded with
//! `load_format="sharded_state"` at the same TP size) for Llama, Mistral, Qwen2, Qwen3,
//! Qwen3-MoE and Gemma 2: each rank's tensors under vLLM's own parameter names, as its loader
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

fn supported(m: &HfModel) -> Result<bool> {
    match m.architecture.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM"
        | "Qwen3MoeForCausalLM" => Ok(false),
        "Gemma2ForCausalLM" => Ok(true),
        other => Err(PluginError::config(format!(
            "vLLM sharded_state: {other} is not supported (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2 are); vLLM loads the HF export (--to hf:) of any model it serves"
        ))),
    }
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

    fn layer(&mut self, l: u64, gemma: bool) -> Result<()> {
        let p = format!("model.layers.{l}");
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if gemma {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for n in norms {
            self.whole(&format!("{p}.{n}.weight"))?;
        }
        self.attention(&p)?;
        if self.has(&format!("{p}.mlp.gate.weight")) {
            self.experts(&p)
        } else {
            self.dense_mlp(&p)
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

    fn dense_mlp(&mut self, p: &str) -> Result<()> {
        let w = |n: &str| format!("{p}.mlp.{n}.weight");
        let segs = self.gate_up(&w("gate_proj"), &w("up_proj"))?;
        self.stacked(w("gate_up_proj"), false, segs);
        let down = w("down_proj");
        let seg = col_chunk(&down, &self.shape(&down)?, self.lay.tp, self.r)?;
        self.stacked(down, false, vec![seg]);
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
    let gemma = supported(m)?;
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
            rank.layer(l, gemma)?;
        }
        rank.whole("model.norm.weight")?;
        all.extend(parts(r, rank.outs, lay.max_part));
    }
    let embed = "model.embed_tokens.weight".to_string();
    let unused = match (m.tied, gemma) {
        (true, false) if inp.contains_key("lm_head.weight") => vec![embed],
        (true, true) => vec!["lm_head.weight".to_string()],
        _ => vec![],
    };
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

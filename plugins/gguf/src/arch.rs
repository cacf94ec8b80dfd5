//! HF model → llama.cpp architecture: one short table per family (names, whether q/k rows are
//! permuted to llama.cpp's interleaved rope, the hyperparameters), as llama.cpp's
//! `convert_hf_to_gguf.py` writes them.
//!
//! | HF | GGUF |
//! |---|---|
//! | `model.embed_tokens` / `model.norm` / `lm_head` | `token_embd` / `output_norm` / `output` (none when tied) |
//! | `layers.N.input_layernorm` / `post_attention_layernorm` | `blk.N.attn_norm` / `ffn_norm` |
//! | `self_attn.{q,k,v,o}_proj` | `attn_q`, `attn_k`, `attn_v`, `attn_output` (Llama: q, k rows permuted) |
//! | `self_attn.{q,k}_norm` (Qwen3) | `attn_q_norm`, `attn_k_norm` |
//! | `mlp.{gate,up,down}_proj` | `ffn_gate`, `ffn_up`, `ffn_down` |

use crate::format::Value;
use bridgeflow_sdk::{PluginError, Result};
use serde_json::{Map, Value as Json};

#[derive(Debug, Clone, Copy)]
pub struct Arch {
    /// `general.architecture`.
    pub name: &'static str,
    /// llama.cpp rotates adjacent pairs (`LLAMA_ROPE_TYPE_NORM`) where HF rotates halves: the
    /// converter reorders q and k rows head by head.
    pub permute_qk: bool,
    /// `{arch}.attention.key_length` / `value_length` are written.
    pub head_lengths: bool,
    /// `{arch}.vocab_size` and `{arch}.rope.dimension_count` are written (LlamaModel's own).
    pub vocab_and_rope_keys: bool,
}

/// The architecture of an HF `architectures[0]`.
pub fn of(hf_architecture: &str) -> Result<Arch> {
    let a = |name, permute_qk, head_lengths, vocab_and_rope_keys| Arch {
        name,
        permute_qk,
        head_lengths,
        vocab_and_rope_keys,
    };
    Ok(match hf_architecture {
        "LlamaForCausalLM" | "MistralForCausalLM" => a("llama", true, false, true),
        "Qwen2ForCausalLM" => a("qwen2", false, false, false),
        "Qwen3ForCausalLM" => a("qwen3", false, true, false),
        other => {
            return Err(PluginError::config(format!(
                "GGUF: {other} is not supported (Llama, Mistral, Qwen2 and Qwen3 are)"
            )))
        }
    })
}

/// The GGUF name of an HF tensor, or None for one llama.cpp does not keep.
pub fn tensor_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<u64>().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let ours = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{ours}.{kind}"))
}

/// The hyperparameters: (heads, kv heads, head_dim) and the `{arch}.*` keys.
pub struct Hparams {
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    /// The `{arch}.*` keys written before `general.file_type`, and those after it.
    pub meta: Vec<(String, Value)>,
    pub tail: Vec<(String, Value)>,
}

fn u(cfg: &Map<String, Json>, key: &str) -> Result<u64> {
    cfg.get(key)
        .and_then(Json::as_u64)
        .filter(|&n| n > 0 && n <= u32::MAX as u64)
        .ok_or_else(|| {
            PluginError::config(format!(
                "config.json: {key} is missing or not a positive 32-bit size"
            ))
        })
}

pub fn hparams(arch: &Arch, cfg: &Map<String, Json>) -> Result<Hparams> {
    let hidden = u(cfg, "hidden_size")?;
    let heads = u(cfg, "num_attention_heads")?;
    let kv_heads = cfg
        .get("num_key_value_heads")
        .map_or(Ok(heads), |_| u(cfg, "num_key_value_heads"))?;
    let head_dim = cfg
        .get("head_dim")
        .map_or(Ok(hidden / heads), |_| u(cfg, "head_dim"))?;
    if head_dim == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
        return Err(PluginError::config(format!(
            "config.json: {heads} heads, {kv_heads} KV heads, head_dim {head_dim} do not make an attention layer"
        )));
    }
    let theta = cfg
        .get("rope_theta")
        .or_else(|| cfg.get("rope_parameters")?.get("rope_theta"))
        .and_then(Json::as_f64)
        .unwrap_or(10000.0);
    let eps = cfg
        .get("rms_norm_eps")
        .and_then(Json::as_f64)
        .unwrap_or(1e-6);
    let vocab = u(cfg, "vocab_size")?;
    let n = arch.name;
    let k = |s: &str| format!("{n}.{s}");
    // In the converter's order: these, then general.file_type, then `tail`.
    let mut meta = vec![
        (
            k("block_count"),
            Value::U32(u(cfg, "num_hidden_layers")? as u32),
        ),
        (
            k("context_length"),
            Value::U32(u(cfg, "max_position_embeddings")? as u32),
        ),
        (k("embedding_length"), Value::U32(hidden as u32)),
        (
            k("feed_forward_length"),
            Value::U32(u(cfg, "intermediate_size")? as u32),
        ),
        (k("attention.head_count"), Value::U32(heads as u32)),
        (k("attention.head_count_kv"), Value::U32(kv_heads as u32)),
        (k("rope.freq_base"), Value::F32(theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(eps as f32),
        ),
    ];
    // Written whenever the config names head_dim, as the converter does.
    if arch.head_lengths || cfg.contains_key("head_dim") {
        meta.push((k("attention.key_length"), Value::U32(head_dim as u32)));
        meta.push((k("attention.value_length"), Value::U32(head_dim as u32)));
    }
    let tail = match arch.vocab_and_rope_keys {
        true => vec![
            (k("vocab_size"), Value::U32(vocab as u32)),
            (k("rope.dimension_count"), Value::U32(head_dim as u32)),
        ],
        false => vec![],
    };
    Ok(Hparams {
        heads,
        kv_heads,
        head_dim,
        vocab,
        meta,
        tail,
    })
}

/// The input row that output row `r` of a permuted q or k weight (or bias) comes from: within
/// each head, rows `[0, d/2)` and `[d/2, d)` interleave (`LlamaModel.permute`: reshape to
/// `(heads, 2, d/2, …)`, swap the two middle axes).
pub fn permuted_source(r: u64, head_dim: u64) -> u64 {
    let (head, i) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    head * head_dim + (i % 2) * half + i / 2
}

/// `general.size_label` as gguf-py's `size_label` writes it for a dense model: the parameter
/// count in K/M/B/T with at least two significant digits (`107K`, `8.0B`).
pub fn size_label(params: u64) -> String {
    let p = params as f64;
    let (scaled, suffix) = match p {
        _ if p > 1e12 => (p * 1e-12, "T"),
        _ if p > 1e9 => (p * 1e-9, "B"),
        _ if p > 1e6 => (p * 1e-6, "M"),
        _ => (p * 1e-3, "K"),
    };
    let digits = format!("{}", scaled.round() as u64)
        .trim_start_matches('0')
        .len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// `general.name` as gguf-py derives it from the model folder's name (`Metadata.id_to_title`):
/// words split at `-`, lower-case ones title-cased unless they are versions or start with a
/// digit.
pub fn title(folder: &str) -> String {
    folder
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            let versionish = w.starts_with(|c: char| c.is_ascii_digit())
                || (w.starts_with('v')
                    && w[1..].chars().all(|c| c.is_ascii_digit() || c == '.')
                    && w.len() > 1);
            if w.chars().any(|c| c.is_lowercase())
                && !w.chars().any(|c| c.is_uppercase())
                && !versionish
            {
                let mut c = w.chars();
                c.next().map_or(String::new(), |f| {
                    f.to_uppercase().collect::<String>() + &c.as_str().to_lowercase()
                })
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            tensor_name("model.layers.3.self_attn.q_proj.weight").unwrap(),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            tensor_name("model.layers.0.self_attn.k_proj.bias").unwrap(),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            tensor_name("model.layers.1.post_attention_layernorm.weight").unwrap(),
            "blk.1.ffn_norm.weight"
        );
        assert_eq!(tensor_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(tensor_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(tensor_name("model.rotary_emb.inv_freq"), None);
    }

    #[test]
    fn labels_as_gguf_py() {
        assert_eq!(size_label(106_816), "107K");
        assert_eq!(size_label(8_030_261_248), "8.0B");
        assert_eq!(size_label(31_990_272), "32M");
        assert_eq!(title("llama"), "Llama");
        assert_eq!(title("qwen3-moe-v2"), "Qwen3 Moe v2");
    }

    #[test]
    fn permutation_interleaves_halves() {
        // head_dim 4: output rows 0,1,2,3 of each head come from 0,2,1,3.
        let rows: Vec<u64> = (0..8).map(|r| permuted_source(r, 4)).collect();
        assert_eq!(rows, [0, 2, 1, 3, 4, 6, 5, 7]);
    }
}

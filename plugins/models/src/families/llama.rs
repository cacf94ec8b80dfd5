//! The Llama family: Llama, Mistral, Qwen2 (QKV biases), Qwen3 (q/k norms) ⇄ Megatron-Core GPT
//! names (TE key names, as megatron-core writes them even for the local spec). Rows whose HF
//! tensors a model lacks are simply absent.

use super::{fields, megatron, Family, Variant};
use bridgeflow_megatron::mapping::Entry;
use bridgeflow_megatron::names::{self, layer_pattern};
use serde_json::json;

/// Embedding, output layer and final norm, as every HF decoder here names them.
pub fn embeddings() -> Vec<Entry> {
    vec![
        Entry::vocab(names::WORD_EMBEDDINGS, "model.embed_tokens.weight")
            .dims(&[&["vocab", "hidden"]]),
        Entry::vocab(names::OUTPUT_LAYER, "lm_head.weight").dims(&[&["vocab", "hidden"]]),
        Entry::direct(names::FINAL_LAYERNORM, "model.norm.weight").dims(&[&["hidden"]]),
    ]
}

/// Attention and dense MLP rows shared with the other GPT-style families.
pub fn attention_and_norms() -> Vec<Entry> {
    let mut rows = embeddings();
    rows.extend([
        Entry::direct(
            &layer_pattern("self_attention.linear_qkv.layer_norm_weight"),
            "model.layers.{l}.input_layernorm.weight",
        )
        .dims(&[&["hidden"]]),
        Entry::qkv(
            &layer_pattern("self_attention.linear_qkv.weight"),
            "model.layers.{l}.self_attn.q_proj.weight",
            "model.layers.{l}.self_attn.k_proj.weight",
            "model.layers.{l}.self_attn.v_proj.weight",
        )
        .dims(&[&["q", "hidden"], &["kv", "hidden"], &["kv", "hidden"]]),
        Entry::qkv(
            &layer_pattern("self_attention.linear_qkv.bias"),
            "model.layers.{l}.self_attn.q_proj.bias",
            "model.layers.{l}.self_attn.k_proj.bias",
            "model.layers.{l}.self_attn.v_proj.bias",
        )
        .optional()
        .dims(&[&["q"], &["kv"], &["kv"]]),
        Entry::direct(
            &layer_pattern("self_attention.q_layernorm.weight"),
            "model.layers.{l}.self_attn.q_norm.weight",
        )
        .optional()
        .dims(&[&["head_dim"]]),
        Entry::direct(
            &layer_pattern("self_attention.k_layernorm.weight"),
            "model.layers.{l}.self_attn.k_norm.weight",
        )
        .optional()
        .dims(&[&["head_dim"]]),
        Entry::direct(
            &layer_pattern("self_attention.linear_proj.weight"),
            "model.layers.{l}.self_attn.o_proj.weight",
        )
        .dims(&[&["hidden", "q"]]),
    ]);
    rows
}

/// The dense SwiGLU MLP with its pre-norm fused into `linear_fc1`.
pub fn dense_mlp() -> Vec<Entry> {
    vec![
        Entry::direct(
            &layer_pattern("mlp.linear_fc1.layer_norm_weight"),
            "model.layers.{l}.post_attention_layernorm.weight",
        )
        .dims(&[&["hidden"]]),
        Entry::gated(
            &layer_pattern("mlp.linear_fc1.weight"),
            "model.layers.{l}.mlp.gate_proj.weight",
            "model.layers.{l}.mlp.up_proj.weight",
        )
        .dims(&[&["ffn", "hidden"], &["ffn", "hidden"]]),
        Entry::direct(
            &layer_pattern("mlp.linear_fc2.weight"),
            "model.layers.{l}.mlp.down_proj.weight",
        )
        .dims(&[&["hidden", "ffn"]]),
    ]
}

/// Megatron fields every SwiGLU/RMSNorm/RoPE decoder of these families has.
pub fn gpt_fields() -> serde_json::Value {
    json!({
        "normalization": "RMSNorm",
        "gated_linear_unit": true,
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "hidden_dropout": 0.0,
        "activation_func": {"_call_": false, "_target_": "torch.nn.functional.silu"},
    })
}

pub fn family() -> Family {
    Family {
        name: "llama".into(),
        architectures: [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
        ]
        .map(String::from)
        .to_vec(),
        // A model section without hf_architecture (Bridge's) is Qwen3 with q/k norms, Qwen2
        // with q/k/v biases (which it always has: its config has no attention_bias key), else
        // Llama.
        variants: vec![
            Variant::new("LlamaForCausalLM", "llama").guess(0, &[]),
            Variant::new("MistralForCausalLM", "mistral"),
            Variant::new("Qwen2ForCausalLM", "qwen2")
                .megatron(json!({"add_qkv_bias": true}))
                .guess(10, &["add_qkv_bias"]),
            Variant::new("Qwen3ForCausalLM", "qwen3")
                .megatron(json!({"qk_layernorm": true}))
                .guess(20, &["qk_layernorm"]),
        ],
        provider: "megatron.bridge.models.gpt_provider.GPTModelProvider".into(),
        tensors: [attention_and_norms(), dense_mlp()].concat(),
        config: fields(&[]),
        megatron: megatron(gpt_fields()),
        ignore: vec!["rotary_emb.inv_freq".into()],
        ..Default::default()
    }
}

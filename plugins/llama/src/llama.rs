//! The Llama family as a table: HF ⇄ Megatron-Core names (TE key names, as megatron-core writes
//! them even for the local spec) and how each tensor maps. Mistral, Qwen2 (QKV biases) and Qwen3
//! (q/k norms) share it; rows whose HF tensors a model lacks are simply absent.

use bridgeflow_sdk::mapping::Entry;

pub const ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

pub const TABLE: &[Entry] = &[
    Entry::vocab(
        "embedding.word_embeddings.weight",
        &["model.embed_tokens.weight"],
    ),
    Entry::vocab("output_layer.weight", &["lm_head.weight"]),
    Entry::direct("decoder.final_layernorm.weight", &["model.norm.weight"]),
    Entry::direct(
        "decoder.layers.{l}.self_attention.linear_qkv.layer_norm_weight",
        &["model.layers.{l}.input_layernorm.weight"],
    ),
    Entry::qkv(
        "decoder.layers.{l}.self_attention.linear_qkv.weight",
        &[
            "model.layers.{l}.self_attn.q_proj.weight",
            "model.layers.{l}.self_attn.k_proj.weight",
            "model.layers.{l}.self_attn.v_proj.weight",
        ],
    ),
    Entry::qkv(
        "decoder.layers.{l}.self_attention.linear_qkv.bias",
        &[
            "model.layers.{l}.self_attn.q_proj.bias",
            "model.layers.{l}.self_attn.k_proj.bias",
            "model.layers.{l}.self_attn.v_proj.bias",
        ],
    ),
    Entry::direct(
        "decoder.layers.{l}.self_attention.q_layernorm.weight",
        &["model.layers.{l}.self_attn.q_norm.weight"],
    ),
    Entry::direct(
        "decoder.layers.{l}.self_attention.k_layernorm.weight",
        &["model.layers.{l}.self_attn.k_norm.weight"],
    ),
    Entry::direct(
        "decoder.layers.{l}.self_attention.linear_proj.weight",
        &["model.layers.{l}.self_attn.o_proj.weight"],
    ),
    Entry::direct(
        "decoder.layers.{l}.mlp.linear_fc1.layer_norm_weight",
        &["model.layers.{l}.post_attention_layernorm.weight"],
    ),
    Entry::gated(
        "decoder.layers.{l}.mlp.linear_fc1.weight",
        &[
            "model.layers.{l}.mlp.gate_proj.weight",
            "model.layers.{l}.mlp.up_proj.weight",
        ],
    ),
    Entry::direct(
        "decoder.layers.{l}.mlp.linear_fc2.weight",
        &["model.layers.{l}.mlp.down_proj.weight"],
    ),
];

/// Modules whose `_extra_state` megatron-core expects in a checkpoint, per layer.
pub const EXTRA_STATE: &[&str] = &[
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
];

/// HF tensors that carry no weights (recomputed buffers).
pub fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

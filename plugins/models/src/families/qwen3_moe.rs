//! Qwen3-MoE and Mixtral: Llama-style attention (Qwen3's q/k norms), every layer a routed MoE.
//! torch_dist stacks each layer's experts on a leading axis:
//! `decoder.layers.mlp.experts.experts.linear_fc1.weight` [layers, experts, 2·ffn, hidden].

use super::llama::{attention_and_norms, gpt_fields};
use super::{fields, megatron, Family, Variant};
use bridgeflow_megatron::mapping::{Entry, Layers};
use bridgeflow_megatron::names::{experts_param, layer_pattern};
use serde_json::json;

/// A routed-expert MoE block (router, per-expert SwiGLU) with its pre-norm, given the HF names
/// of the router and of expert `{e}`'s three projections.
pub fn routed_moe(router: &str, gate: &str, up: &str, down: &str) -> Vec<Entry> {
    vec![
        Entry::direct(
            &layer_pattern("pre_mlp_layernorm.weight"),
            "model.layers.{l}.post_attention_layernorm.weight",
        )
        .only(Layers::Moe)
        .dims(&[&["hidden"]]),
        Entry::direct(&layer_pattern("mlp.router.weight"), router)
            .only(Layers::Moe)
            .dims(&[&["experts", "hidden"]]),
        Entry::gated(
            &layer_pattern(&experts_param("linear_fc1.weight")),
            gate,
            up,
        )
        .only(Layers::Moe)
        .dims(&[&["moe_ffn", "hidden"], &["moe_ffn", "hidden"]]),
        Entry::direct(&layer_pattern(&experts_param("linear_fc2.weight")), down)
            .only(Layers::Moe)
            .dims(&[&["hidden", "moe_ffn"]]),
    ]
}

/// HF MoE config keys ⇄ Megatron fields (Megatron-Bridge's names), given the family's HF key
/// for the expert count (`num_experts`, `num_local_experts`, `n_routed_experts`).
pub fn moe_fields_named(experts: &str) -> Vec<(String, String)> {
    fields(&[
        (experts, "num_moe_experts"),
        ("num_experts_per_tok", "moe_router_topk"),
        ("moe_intermediate_size", "moe_ffn_hidden_size"),
        ("router_aux_loss_coef", "moe_aux_loss_coeff"),
    ])
}

fn moe_fields() -> serde_json::Map<String, serde_json::Value> {
    let mut m = megatron(gpt_fields());
    m.insert("moe_router_load_balancing_type".into(), "aux_loss".into());
    m.insert("moe_grouped_gemm".into(), true.into());
    m.insert("moe_token_dispatcher_type".into(), "alltoall".into());
    m
}

pub fn family() -> Family {
    Family {
        name: "qwen3-moe".into(),
        architectures: vec!["Qwen3MoeForCausalLM".into()],
        // A model section without hf_architecture: MoE with q/k norms.
        variants: vec![Variant::new("Qwen3MoeForCausalLM", "qwen3_moe")
            .megatron(json!({"qk_layernorm": true}))
            .guess(40, &["num_moe_experts", "qk_layernorm"])],
        provider: "megatron.bridge.models.gpt_provider.GPTModelProvider".into(),
        tensors: [
            attention_and_norms(),
            routed_moe(
                "model.layers.{l}.mlp.gate.weight",
                "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
                "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
                "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
            ),
        ]
        .concat(),
        // transformers 5 writes `num_local_experts` (its `num_experts` an alias, which the
        // Hub's Qwen3-MoE configs and transformers 4 write): either is read, the first written.
        config: [
            moe_fields_named("num_local_experts"),
            fields(&[("num_experts", "num_moe_experts")]),
        ]
        .concat(),
        megatron: moe_fields(),
        quirks: vec![super::Quirk::TopkNormalized],
        ignore: vec!["rotary_emb.inv_freq".into()],
        ..Default::default()
    }
}

/// Mixtral: the same block under its own HF names.
pub fn mixtral() -> Family {
    Family {
        name: "mixtral".into(),
        architectures: vec!["MixtralForCausalLM".into()],
        // A model section without hf_architecture: MoE (without q/k norms: Qwen3-MoE ranks higher).
        variants: vec![
            Variant::new("MixtralForCausalLM", "mixtral").guess(30, &["num_moe_experts"])
        ],
        tensors: [
            attention_and_norms(),
            routed_moe(
                "model.layers.{l}.block_sparse_moe.gate.weight",
                "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
                "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
                "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
            ),
        ]
        .concat(),
        config: moe_fields_named("num_local_experts"),
        // Mixtral always renormalizes its top-k (megatron-core's default, no pre-softmax).
        quirks: vec![],
        ..family()
    }
}

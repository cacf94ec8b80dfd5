//! Nemotron-H: a hybrid of Mamba-2 (`M`), attention (`*`) and squared-ReLU MLP (`-`) layers, in
//! the order the config's `layers_block_type` (or `hybrid_override_pattern`) gives. HF names
//! every layer's block `mixer` and its pre-norm `norm`; Megatron fuses that norm into the
//! block's first linear, so one HF name maps by layer kind. megatron-core keeps the layers apart
//! (no stacking: they differ) and stores a mixer's `in_proj` as five keys (z, x, B, C, dt) and
//! `conv1d` as three (x, B, C). MoE layers (`E`, Nemotron-3): squared-ReLU experts stacked on
//! an expert axis, a shared expert, a sigmoid router with expert bias.

use super::{fields, megatron, Family};
use bridgeflow_megatron::mapping::{Entry, Kind, Layers};
use bridgeflow_megatron::names::{self, experts_param, layer_pattern};
use serde_json::{json, Map, Value};

/// The Megatron name of a layer's `s`.
fn l(s: &str) -> String {
    layer_pattern(s)
}

/// The HF name of a layer's `s`.
fn h(s: &str) -> String {
    format!("backbone.layers.{{l}}.{s}")
}

/// The one HF `norm` of a layer, as the fused norm of its block.
fn norm(megatron: &str, kind: Layers) -> Entry {
    Entry::direct(&l(megatron), &h("norm.weight")).only(kind)
}

/// Embeddings and the Mamba-2, attention and MLP blocks.
fn block_rows() -> Vec<Entry> {
    vec![
        // NVIDIA's releases (and export) say `embeddings`; transformers 5 saves `embedding`.
        Entry::vocab(names::WORD_EMBEDDINGS, "backbone.embeddings.weight"),
        Entry::vocab(names::WORD_EMBEDDINGS, "backbone.embedding.weight"),
        Entry::vocab(names::OUTPUT_LAYER, "lm_head.weight"),
        Entry::direct(names::FINAL_NORM, "backbone.norm_f.weight"),
        // Mamba-2 mixer.
        norm("mixer.in_proj.layer_norm_weight", Layers::Mamba),
        Entry::new(
            Kind::MambaInProj,
            &l("mixer.in_proj.weight"),
            &[&h("mixer.in_proj.weight")],
        )
        .only(Layers::Mamba),
        Entry::new(
            Kind::MambaConv,
            &l("mixer.conv1d.weight"),
            &[&h("mixer.conv1d.weight")],
        )
        .only(Layers::Mamba),
        Entry::new(
            Kind::MambaConv,
            &l("mixer.conv1d.bias"),
            &[&h("mixer.conv1d.bias")],
        )
        .only(Layers::Mamba)
        .optional(),
        // Attention.
        norm(
            "self_attention.linear_qkv.layer_norm_weight",
            Layers::Attention,
        ),
        Entry::qkv(
            &l("self_attention.linear_qkv.weight"),
            &h("mixer.q_proj.weight"),
            &h("mixer.k_proj.weight"),
            &h("mixer.v_proj.weight"),
        )
        .only(Layers::Attention),
        Entry::direct(
            &l("self_attention.linear_proj.weight"),
            &h("mixer.o_proj.weight"),
        )
        .only(Layers::Attention),
        // MLP (not gated: squared ReLU).
        norm("mlp.linear_fc1.layer_norm_weight", Layers::Mlp),
        Entry::direct(&l("mlp.linear_fc1.weight"), &h("mixer.up_proj.weight")).only(Layers::Mlp),
        Entry::direct(&l("mlp.linear_fc2.weight"), &h("mixer.down_proj.weight")).only(Layers::Mlp),
    ]
}

/// The MoE block (Nemotron-3): its rows exist only in MoE layers.
fn moe_rows() -> Vec<Entry> {
    let mut rows = vec![
        norm("pre_mlp_layernorm.weight", Layers::Moe),
        Entry::direct(&l("mlp.router.weight"), &h("mixer.gate.weight")),
        Entry::direct(
            &l("mlp.router.expert_bias"),
            &h("mixer.gate.e_score_correction_bias"),
        )
        .optional(),
        Entry::direct(
            &l(&experts_param("linear_fc1.weight")),
            &h("mixer.experts.{e}.up_proj.weight"),
        ),
        Entry::direct(
            &l(&experts_param("linear_fc2.weight")),
            &h("mixer.experts.{e}.down_proj.weight"),
        ),
        Entry::direct(
            &l("mlp.shared_experts.linear_fc1.weight"),
            &h("mixer.shared_experts.up_proj.weight"),
        )
        .optional(),
        Entry::direct(
            &l("mlp.shared_experts.linear_fc2.weight"),
            &h("mixer.shared_experts.down_proj.weight"),
        )
        .optional(),
    ];
    for e in &mut rows {
        e.layers = Layers::Moe;
    }
    rows
}

/// As Megatron-Bridge's Nemotron-H bridge maps them.
fn config_fields() -> Vec<(String, String)> {
    fields(&[
        ("layer_norm_epsilon", "layernorm_epsilon"),
        ("mamba_num_heads", "mamba_num_heads"),
        ("mamba_head_dim", "mamba_head_dim"),
        ("n_groups", "mamba_num_groups"),
        ("ssm_state_size", "mamba_state_dim"),
        ("chunk_size", "mamba_chunk_size"),
        ("use_bias", "add_bias_linear"),
        ("n_routed_experts", "num_moe_experts"),
        ("num_experts_per_tok", "moe_router_topk"),
        ("moe_intermediate_size", "moe_ffn_hidden_size"),
        (
            "moe_shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size",
        ),
        ("routed_scaling_factor", "moe_router_topk_scaling_factor"),
    ])
}

fn megatron_fields() -> Map<String, Value> {
    megatron(json!({
        "normalization": "RMSNorm",
        "gated_linear_unit": false,
        "position_embedding_type": "none",
        "activation_func": {"_call_": false, "_target_": "megatron.core.activations.squared_relu"},
        "is_hybrid_model": true,
        "first_last_layers_bf16": true,
        "hidden_dropout": 0.0,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": true,
        "moe_router_dtype": "fp32",
        "moe_grouped_gemm": true,
        "moe_token_dispatcher_type": "alltoall",
    }))
}

pub fn family() -> Family {
    let mut tensors = block_rows();
    tensors.extend(moe_rows());
    for p in ["A_log", "D", "dt_bias", "norm.weight", "out_proj.weight"] {
        tensors.push(
            Entry::direct(&l(&format!("mixer.{p}")), &h(&format!("mixer.{p}"))).only(Layers::Mamba),
        );
    }
    Family {
        name: "nemotron-h".into(),
        architectures: vec!["NemotronHForCausalLM".into()],
        model_type: Some("nemotron_h".into()),
        provider: "megatron.bridge.models.hybrid.hybrid_provider.HybridModelProvider".into(),
        tensors,
        config: config_fields(),
        megatron: megatron_fields(),
        ..Default::default()
    }
}

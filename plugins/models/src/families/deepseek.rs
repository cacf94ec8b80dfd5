//! DeepSeek-V2/V3: multi-latent attention (q and kv low-rank projections, their norms fused into
//! the up-projections), the first `first_k_dense_replace` layers dense, the rest routed MoE
//! with a shared expert and the router's `expert_bias` (V3's `e_score_correction_bias`). The
//! layers differ, so megatron-core keeps per-layer keys (`decoder.layers.0.…`), not stacked ones.
//! Multi-token-prediction layers (`num_nextn_predict_layers`, HF's layers after the last) are
//! `mtp.layers.{m}.…` as megatron-core 0.19 names them.

use super::llama::{dense_mlp, embeddings, gpt_fields};
use super::qwen3_moe::{moe_fields_named, routed_moe};
use super::{fields, megatron, Family, Quirk, Variant};
use bridgeflow_megatron::mapping::{Entry, Layers};
use bridgeflow_megatron::names::{layer_pattern, mtp_pattern};
use serde_json::{json, Map, Value};

/// Multi-latent attention, the router's expert bias and the shared experts.
fn attention_and_shared_experts() -> Vec<Entry> {
    let a = |m: &str, h: &str| {
        Entry::direct(
            &layer_pattern(&format!("self_attention.{m}")),
            &format!("model.layers.{{l}}.self_attn.{h}"),
        )
    };
    let mlp = |m: &str, h: &str| {
        Entry::direct(
            &layer_pattern(&format!("mlp.{m}")),
            &format!("model.layers.{{l}}.mlp.{h}"),
        )
    };
    vec![
        Entry::direct(
            &layer_pattern("input_layernorm.weight"),
            "model.layers.{l}.input_layernorm.weight",
        ),
        // V2-Lite: no q compression (q_proj); the others: q_a_proj, its norm, q_b_proj.
        a("linear_q_proj.weight", "q_proj.weight").optional(),
        a("linear_q_down_proj.weight", "q_a_proj.weight").optional(),
        a("linear_q_up_proj.layer_norm_weight", "q_a_layernorm.weight").optional(),
        a("linear_q_up_proj.weight", "q_b_proj.weight").optional(),
        a("linear_kv_down_proj.weight", "kv_a_proj_with_mqa.weight"),
        a(
            "linear_kv_up_proj.layer_norm_weight",
            "kv_a_layernorm.weight",
        ),
        a("linear_kv_up_proj.weight", "kv_b_proj.weight"),
        a("linear_proj.weight", "o_proj.weight"),
        // V3's router bias; V2 has none.
        mlp("router.expert_bias", "gate.e_score_correction_bias")
            .only(Layers::Moe)
            .optional(),
        Entry::gated(
            &layer_pattern("mlp.shared_experts.linear_fc1.weight"),
            "model.layers.{l}.mlp.shared_experts.gate_proj.weight",
            "model.layers.{l}.mlp.shared_experts.up_proj.weight",
        )
        .only(Layers::Moe)
        .optional(),
        mlp(
            "shared_experts.linear_fc2.weight",
            "shared_experts.down_proj.weight",
        )
        .only(Layers::Moe)
        .optional(),
    ]
}

/// Multi-token prediction's own rows.
fn mtp_rows() -> Vec<Entry> {
    let mut rows = Vec::new();
    // Multi-token prediction (HF layers from num_hidden_layers on): its own norms and
    // projection; its transformer layer is a decoder layer's rows (Megatron
    // `mtp.layers.{m}.transformer_layer.…`, renamed by the mapper).
    for (m, h) in [
        ("enorm", "enorm"),
        ("hnorm", "hnorm"),
        ("eh_proj", "eh_proj"),
        ("final_layernorm", "shared_head.norm"),
    ] {
        rows.push(Entry::direct(
            &mtp_pattern(&format!("{m}.weight")),
            &format!("model.layers.{{l}}.{h}.weight"),
        ));
    }
    rows
}

/// The Megatron fields fixed for the family.
fn megatron_fields() -> Map<String, Value> {
    // As Megatron-Bridge's DeepSeek-V3 bridge sets them; the layer spec is megatron-core's
    // per-layer decoder block (dense and MoE layers differ).
    let mut m = megatron(gpt_fields());
    m.extend(megatron(json!({
        "multi_latent_attention": true,
        "qk_layernorm": true,
        "add_bias_linear": false,
        "moe_grouped_gemm": true,
        "moe_router_pre_softmax": true,
        "moe_token_dispatcher_type": "alltoall",
        "moe_router_load_balancing_type": "seq_aux_loss",
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": true,
        "moe_router_dtype": "fp32",
        "apply_rope_fusion": false,
        "transformer_layer_spec": {
            "_partial_": true,
            "_target_": "megatron.core.models.gpt.gpt_layer_specs.get_gpt_decoder_block_spec",
            "use_transformer_engine": true,
        },
    })));
    m
}

/// HF config keys ⇄ Megatron fields besides the common ones.
fn config_fields() -> Vec<(String, String)> {
    let mut config = moe_fields_named("n_routed_experts");
    config.extend(fields(&[
        ("q_lora_rank", "q_lora_rank"),
        ("kv_lora_rank", "kv_lora_rank"),
        ("qk_nope_head_dim", "qk_head_dim"),
        ("qk_rope_head_dim", "qk_pos_emb_head_dim"),
        ("v_head_dim", "v_head_dim"),
        ("n_group", "moe_router_num_groups"),
        ("topk_group", "moe_router_group_topk"),
        ("routed_scaling_factor", "moe_router_topk_scaling_factor"),
        ("num_nextn_predict_layers", "mtp_num_layers"),
    ]));
    config
}

pub fn family() -> Family {
    let mut tensors = embeddings();
    tensors.extend(attention_and_shared_experts());
    tensors.extend(mtp_rows());
    tensors.extend(dense_mlp().into_iter().map(|e| e.only(Layers::Dense)));
    tensors.extend(routed_moe(
        "model.layers.{l}.mlp.gate.weight",
        "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
        "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
        "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
    ));
    Family {
        name: "deepseek".into(),
        architectures: vec![
            "DeepseekV3ForCausalLM".into(),
            "DeepseekV2ForCausalLM".into(),
        ],
        // Multi-latent attention under another provider class is taken for V3.
        variants: vec![
            Variant::new("DeepseekV3ForCausalLM", "deepseek_v3")
                .guess(50, &["multi_latent_attention"]),
            Variant::new("DeepseekV2ForCausalLM", "deepseek_v2"),
        ],
        // The dense first layers are Megatron's moe_layer_freq; the shared experts' width a
        // count of routed widths.
        quirks: vec![Quirk::DenseFirstLayers, Quirk::SharedExpertCount],
        provider: "megatron.bridge.models.mla_provider.MLAModelProvider".into(),
        tensors,
        config: config_fields(),
        megatron: megatron_fields(),
        ignore: vec!["rotary_emb.inv_freq".into()],
        mtp_shared: vec![
            (
                "model.embed_tokens.weight".into(),
                "model.layers.{l}.embed_tokens.weight".into(),
            ),
            (
                "lm_head.weight".into(),
                "model.layers.{l}.shared_head.head.weight".into(),
            ),
        ],
        ..Default::default()
    }
}

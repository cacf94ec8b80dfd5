//! GPT-OSS: Llama-style attention with q/k/v and output biases and learned attention sinks
//! (Megatron's `softmax_offset`), every layer a routed MoE with biased experts. HF keeps each
//! layer's experts fused in one tensor — `gate_up_proj` [E, hidden, 2·ffn] with gate and up
//! interleaved by column, `down_proj` [E, ffn, hidden] — which Megatron stores per expert as
//! [gate; up] rows and transposed: reshuffled expert by expert (a copy of one expert at a time).
//! MXFP4 releases (`*_blocks`, `*_scales`) go through the `mxfp4-dequant` stage first, which
//! hands this table bf16 tensors in the layout above, in blocks of whole experts.

use super::llama::{attention_and_norms, gpt_fields};
use super::qwen3_moe::moe_fields_named;
use super::{megatron, Family};
use bridgeflow_megatron::mapping::{Entry, Kind, Layers};
use bridgeflow_megatron::names::{experts_param, layer_pattern};
use serde_json::json;

pub fn family() -> Family {
    let l = layer_pattern;
    let experts = |s: &str| l(&experts_param(s));
    let h = |s: &str| format!("model.layers.{{l}}.{s}");
    let mut tensors = attention_and_norms();
    tensors.extend([
        Entry::direct(
            &l("self_attention.linear_proj.bias"),
            &h("self_attn.o_proj.bias"),
        ),
        Entry::direct(
            &l("self_attention.core_attention.softmax_offset"),
            &h("self_attn.sinks"),
        ),
        Entry::direct(
            &l("pre_mlp_layernorm.weight"),
            &h("post_attention_layernorm.weight"),
        )
        .only(Layers::Moe),
        Entry::direct(&l("mlp.router.weight"), &h("mlp.router.weight")),
        Entry::direct(&l("mlp.router.bias"), &h("mlp.router.bias")),
        Entry::new(
            Kind::ExpertsGateUpInterleavedT,
            &experts("linear_fc1.weight"),
            &[&h("mlp.experts.gate_up_proj")],
        ),
        Entry::new(
            Kind::ExpertsGateUpInterleaved,
            &experts("linear_fc1.bias"),
            &[&h("mlp.experts.gate_up_proj_bias")],
        ),
        Entry::new(
            Kind::ExpertsTransposed,
            &experts("linear_fc2.weight"),
            &[&h("mlp.experts.down_proj")],
        ),
        Entry::direct(
            &experts("linear_fc2.bias"),
            &h("mlp.experts.down_proj_bias"),
        ),
    ]);
    // As Megatron-Bridge's GPT-OSS bridge sets them.
    let mut m = megatron(gpt_fields());
    m.extend(megatron(json!({
        "add_bias_linear": true,
        "softmax_type": "learnable",
        "window_attn_skip_freq": 2,
        "activation_func_clamp_value": 7.0,
        "glu_linear_offset": 1.0,
        "moe_router_load_balancing_type": "none",
        "moe_grouped_gemm": true,
        "moe_token_dispatcher_type": "alltoall",
        "moe_router_pre_softmax": false,
    })));
    let mut config = moe_fields_named("num_local_experts");
    config.retain(|(h, _)| h != "moe_intermediate_size");
    config.push(("intermediate_size".into(), "moe_ffn_hidden_size".into()));
    Family {
        name: "gpt-oss".into(),
        architectures: vec!["GptOssForCausalLM".into()],
        model_type: Some("gpt_oss".into()),
        provider: "megatron.bridge.models.gpt_provider.GPTModelProvider".into(),
        tensors,
        config,
        megatron: m,
        ignore: vec!["rotary_emb.inv_freq".into()],
        ..Default::default()
    }
}

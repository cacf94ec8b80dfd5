//! Qwen2.5-VL: a Qwen2 language model (q/k/v biases, multimodal RoPE) that Megatron-Bridge holds
//! as `language_model.*` — the GPT rows under that prefix — beside the vision tower and its
//! patch merger, which it keeps as the HF modules: `visual.*` carried as they are, unstacked.
//! The text geometry sits in the config's `text_config`; `vision_config` goes to the provider
//! as an object.

use super::llama::{attention_and_norms, dense_mlp, gpt_fields};
use super::{fields, megatron, Family};
use bridgeflow_megatron::mapping::Entry;
use bridgeflow_megatron::names;
use serde_json::json;

/// The GPT rows with the language model's Megatron prefix.
fn language_model(rows: Vec<Entry>) -> Vec<Entry> {
    rows.into_iter()
        .map(|mut e| {
            e.megatron = names::in_language_model(&e.megatron);
            e
        })
        .collect()
}

pub fn family() -> Family {
    let mut m = megatron(gpt_fields());
    m.extend(megatron(json!({
        "position_embedding_type": "mrope",
        "add_qkv_bias": true,
    })));
    Family {
        name: "qwen2.5-vl".into(),
        architectures: vec!["Qwen2_5_VLForConditionalGeneration".into()],
        model_type: Some("qwen2_5_vl".into()),
        provider: "megatron.bridge.models.qwen_vl.qwen25_vl_provider.Qwen25VLModelProvider".into(),
        tensors: language_model([attention_and_norms(), dense_mlp()].concat()),
        // As Bridge's Qwen2.5-VL bridge sets them.
        config: fields(&[
            ("rope_parameters.mrope_section", "mrope_section"),
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("image_token_id", "image_token_id"),
            ("video_token_id", "video_token_id"),
            ("vision_start_token_id", "vision_start_token_id"),
            ("vision_end_token_id", "vision_end_token_id"),
        ]),
        megatron: m,
        ignore: vec!["rotary_emb.inv_freq".into()],
        verbatim: vec![names::VISION.into()],
        objects: vec![(
            "vision_config".into(),
            "transformers.models.qwen2_5_vl.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig".into(),
        )],
        ..Default::default()
    }
}

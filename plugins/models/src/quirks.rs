//! Config translations a family opts into (its table's `quirks`): HF config values Megatron
//! keeps in another form, each converted both ways — into the `run_config.yaml` model section
//! on import ([`Quirk::to_megatron`]), back into `config.json` from a model section on export
//! ([`Quirk::to_hf`]). The one-to-one renames are the table's `config` pairs instead.

use crate::families::Family;
use serde_json::{json, Map, Value};

/// One translation; see each variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quirk {
    /// HF `query_pre_attn_scalar` q ⇄ Megatron `softmax_scale` 1/√q (Gemma 3, as
    /// Megatron-Bridge keeps its attention scale), unless the table maps the key itself
    /// (Gemma 2's provider takes `query_pre_attn_scalar` as it is).
    SoftmaxScale,
    /// HF `first_k_dense_replace` n ⇄ Megatron `moe_layer_freq`, one entry per layer: 0 for
    /// the first n (dense), 1 after (MoE) (DeepSeek).
    DenseFirstLayers,
    /// HF `n_shared_experts`, a count of routed-expert widths ⇄ Megatron
    /// `moe_shared_expert_intermediate_size` = n × `moe_intermediate_size` (DeepSeek), unless
    /// the table maps the width itself.
    SharedExpertCount,
    /// HF `norm_topk_prob` (the k chosen probabilities renormalized; transformers' default
    /// false) ⇄ Megatron `moe_router_pre_softmax`, its negation: the softmax over every expert
    /// before the choice, not renormalized (Qwen3-MoE, as Megatron-Bridge sets it).
    TopkNormalized,
}

impl Quirk {
    /// Import: the Megatron fields for the HF config `hf` (the text view of it).
    pub fn to_megatron(self, hf: &Value, family: &Family, m: &mut Map<String, Value>) {
        let mapped = |k: &str| family.config.iter().any(|(h, _)| h == k);
        match self {
            Quirk::SoftmaxScale => {
                if let Some(q) = hf["query_pre_attn_scalar"]
                    .as_f64()
                    .filter(|_| !mapped("query_pre_attn_scalar"))
                {
                    m.insert("softmax_scale".into(), (1.0 / q.sqrt()).into());
                }
            }
            Quirk::DenseFirstLayers => {
                if let Some(n) = hf["first_k_dense_replace"].as_u64() {
                    let layers = hf["num_hidden_layers"].as_u64().unwrap_or(0);
                    let freq: Vec<u64> = (0..layers).map(|l| (l >= n) as u64).collect();
                    m.insert("moe_layer_freq".into(), json!(freq));
                }
            }
            Quirk::SharedExpertCount => {
                if let Some(n) = hf["n_shared_experts"]
                    .as_u64()
                    .filter(|_| !mapped("moe_shared_expert_intermediate_size"))
                {
                    let ffn = hf["moe_intermediate_size"].as_u64().unwrap_or(0);
                    m.insert(
                        "moe_shared_expert_intermediate_size".into(),
                        (n * ffn).into(),
                    );
                }
            }
            Quirk::TopkNormalized => {
                let normalized = hf["norm_topk_prob"].as_bool().unwrap_or(false);
                m.insert("moe_router_pre_softmax".into(), (!normalized).into());
            }
        }
    }

    /// Export: the HF keys for a Megatron model section.
    pub fn to_hf(self, model: &Value, hf: &mut Map<String, Value>) {
        match self {
            Quirk::SoftmaxScale => {
                if let Some(scale) = model["softmax_scale"].as_f64().filter(|&x| x > 0.0) {
                    let q = 1.0 / (scale * scale);
                    let q = if (q - q.round()).abs() < 1e-9 {
                        json!(q.round() as u64)
                    } else {
                        json!(q)
                    };
                    hf.entry("query_pre_attn_scalar").or_insert(q);
                }
            }
            Quirk::DenseFirstLayers => {
                if let Some(freq) = model["moe_layer_freq"].as_array() {
                    let dense = freq.iter().take_while(|v| v.as_u64() == Some(0)).count();
                    hf.insert("first_k_dense_replace".into(), dense.into());
                }
            }
            Quirk::SharedExpertCount => {
                if let (Some(s), Some(f)) = (
                    model["moe_shared_expert_intermediate_size"].as_u64(),
                    model["moe_ffn_hidden_size"].as_u64().filter(|&f| f > 0),
                ) {
                    hf.insert("n_shared_experts".into(), (s / f).into());
                }
            }
            Quirk::TopkNormalized => {
                if let Some(pre) = model["moe_router_pre_softmax"].as_bool() {
                    hf.insert("norm_topk_prob".into(), (!pre).into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Import, then export of that model section: the HF keys come back.
    fn round_trip(
        q: Quirk,
        family: &Family,
        hf: Value,
    ) -> (Map<String, Value>, Map<String, Value>) {
        let mut m = Map::new();
        q.to_megatron(&hf, family, &mut m);
        let mut back = Map::new();
        q.to_hf(&Value::Object(m.clone()), &mut back);
        (m, back)
    }

    #[test]
    fn each_quirk_both_ways() {
        let plain = Family::default();
        let (m, back) = round_trip(
            Quirk::SoftmaxScale,
            &plain,
            json!({"query_pre_attn_scalar": 16}),
        );
        assert_eq!(m["softmax_scale"], json!(0.25));
        assert_eq!(back["query_pre_attn_scalar"], json!(16));
        let (m, back) = round_trip(
            Quirk::DenseFirstLayers,
            &plain,
            json!({"first_k_dense_replace": 1, "num_hidden_layers": 3}),
        );
        assert_eq!(m["moe_layer_freq"], json!([0, 1, 1]));
        assert_eq!(back["first_k_dense_replace"], json!(1));
        for normalized in [true, false] {
            let hf = json!({ "norm_topk_prob": normalized });
            let (m, back) = round_trip(Quirk::TopkNormalized, &plain, hf);
            assert_eq!(m["moe_router_pre_softmax"], json!(!normalized));
            assert_eq!(back["norm_topk_prob"], json!(normalized));
        }
        let (m, _) = round_trip(Quirk::TopkNormalized, &plain, json!({}));
        assert_eq!(
            m["moe_router_pre_softmax"],
            json!(true),
            "transformers' default"
        );
        let hf = json!({"n_shared_experts": 2, "moe_intermediate_size": 16});
        let (m, _) = round_trip(Quirk::SharedExpertCount, &plain, hf.clone());
        assert_eq!(m["moe_shared_expert_intermediate_size"], json!(32));
        let mut back = Map::new();
        let mut section = m.clone();
        section.insert("moe_ffn_hidden_size".into(), 16.into());
        Quirk::SharedExpertCount.to_hf(&Value::Object(section), &mut back);
        assert_eq!(back["n_shared_experts"], json!(2));
        // A table that maps the key itself keeps it as it is.
        let maps = Family {
            config: vec![(
                "query_pre_attn_scalar".into(),
                "query_pre_attn_scalar".into(),
            )],
            ..Family::default()
        };
        let (m, _) = round_trip(
            Quirk::SoftmaxScale,
            &maps,
            json!({"query_pre_attn_scalar": 16}),
        );
        assert!(m.is_empty());
    }

    #[test]
    fn quirks_parse_by_name() {
        let q: Vec<Quirk> = serde_json::from_value(json!([
            "softmax-scale",
            "dense-first-layers",
            "shared-expert-count"
        ]))
        .unwrap();
        assert_eq!(q.len(), 3);
        assert!(serde_json::from_value::<Quirk>(json!("sideways")).is_err());
    }
}

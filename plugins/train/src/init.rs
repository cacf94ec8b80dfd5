//! The `init` reader: a Llama-family model's weights initialized as megatron-core initializes
//! them for pretraining from scratch — every matrix drawn from normal(0, `init_method_std`),
//! the output projections of each layer (`o_proj`, `down_proj`: megatron-core's `linear_proj`
//! and `linear_fc2`) from normal(0, std / sqrt(2 · layers)) (`scaled_init_method_normal`),
//! norms at one, biases at zero — under HF names, so the models mapper takes them to the
//! trainer as it takes a checkpoint.
//!
//! The draws are reproducible from `seed` (one MT19937 stream, tensors in order, Box–Muller
//! pairs), not torch's own generator: megatron-core's values depend on its RNG tracker and
//! parallel layout, which a from-scratch run does not need to reproduce.

use bridgeflow_sdk::{
    attrs, schemars, serde, Buffer, DType, Emitter, PluginError, Result, Source, StreamPlan,
    Tensor, TensorInfo,
};
use serde_json::{Map, Value};
use std::path::PathBuf;

fn std_default() -> f64 {
    0.02
}
fn seed_default() -> u32 {
    1234
}
fn f32_name() -> String {
    "f32".into()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct InitConfig {
    /// The HF config.json of the model to create (its folder also gives the tokenizer files
    /// that go along on export).
    pub config: PathBuf,
    /// megatron-core's `init_method_std`.
    #[serde(default = "std_default")]
    pub init_method_std: f64,
    #[serde(default = "seed_default")]
    pub seed: u32,
    /// dtype of the weights handed out (the trainer keeps fp32 masters either way).
    #[serde(default = "f32_name")]
    pub dtype: String,
}

/// How one tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    Normal(f64),
    Ones,
    Zeros,
}

/// Every tensor of the model the config describes, with how it starts.
pub fn tensors(cfg: &Map<String, Value>, std: f64) -> Result<Vec<(String, Vec<u64>, Fill)>> {
    let n = |k: &str| -> Result<u64> {
        cfg.get(k)
            .and_then(Value::as_u64)
            .filter(|&v| v > 0 && v <= 1 << 24)
            .ok_or_else(|| {
                PluginError::config(format!("config.json: {k} is missing or not a size"))
            })
    };
    let arch = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("");
    let qwen2 = arch == "Qwen2ForCausalLM";
    let qk_norm = arch == "Qwen3ForCausalLM";
    if !matches!(
        arch,
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM"
    ) {
        return Err(PluginError::unsupported(format!(
            "init: {arch:?} (Llama, Mistral, Qwen2 and Qwen3 are created from scratch)"
        )));
    }
    let (h, layers, heads, vocab, ffn) = (
        n("hidden_size")?,
        n("num_hidden_layers")?,
        n("num_attention_heads")?,
        n("vocab_size")?,
        n("intermediate_size")?,
    );
    let kv = cfg
        .get("num_key_value_heads")
        .map_or(Ok(heads), |_| n("num_key_value_heads"))?;
    let d = cfg
        .get("head_dim")
        .map_or(Ok(h / heads), |_| n("head_dim"))?;
    let bias = qwen2
        || cfg
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let tied = cfg
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let scaled = Fill::Normal(std / (2.0 * layers as f64).sqrt());
    let normal = Fill::Normal(std);
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![vocab, h],
        normal,
    )];
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![h], Fill::Ones));
        for (x, rows) in [("q", heads * d), ("k", kv * d), ("v", kv * d)] {
            t.push((
                p(&format!("self_attn.{x}_proj.weight")),
                vec![rows, h],
                normal,
            ));
            if bias {
                t.push((
                    p(&format!("self_attn.{x}_proj.bias")),
                    vec![rows],
                    Fill::Zeros,
                ));
            }
        }
        if qk_norm {
            t.push((p("self_attn.q_norm.weight"), vec![d], Fill::Ones));
            t.push((p("self_attn.k_norm.weight"), vec![d], Fill::Ones));
        }
        t.push((p("self_attn.o_proj.weight"), vec![h, heads * d], scaled));
        t.push((p("post_attention_layernorm.weight"), vec![h], Fill::Ones));
        t.push((p("mlp.gate_proj.weight"), vec![ffn, h], normal));
        t.push((p("mlp.up_proj.weight"), vec![ffn, h], normal));
        t.push((p("mlp.down_proj.weight"), vec![h, ffn], scaled));
    }
    t.push(("model.norm.weight".to_string(), vec![h], Fill::Ones));
    if !tied {
        t.push(("lm_head.weight".to_string(), vec![vocab, h], normal));
    }
    Ok(t)
}

/// Normal draws from one MT19937 stream: uniforms of 24 bits, Box–Muller in pairs.
pub(crate) struct Normals {
    mt: rand_mt::Mt,
    spare: Option<f64>,
}

impl Normals {
    pub(crate) fn seeded(seed: u32) -> Normals {
        Normals {
            mt: rand_mt::Mt::new(seed),
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        (self.mt.next_u32() >> 8) as f64 / (1u32 << 24) as f64
    }
    pub(crate) fn next(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (u1, u2) = (1.0 - self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

pub struct InitReader {
    cfg: InitConfig,
    dtype: DType,
    tensors: Vec<(String, Vec<u64>, Fill)>,
}

impl Source for InitReader {
    type Config = InitConfig;
    const DESCRIPTION: &'static str =
        "Initialized weights for pretraining from scratch (megatron-core's normal and scaled-normal init), under HF names";

    fn new(cfg: InitConfig) -> Result<Self> {
        let dtype = DType::parse(&cfg.dtype)
            .filter(|d| matches!(d, DType::F32 | DType::BF16 | DType::F16))
            .ok_or_else(|| {
                PluginError::config(format!(
                    "dtype = {:?}: expected f32, bf16 or f16",
                    cfg.dtype
                ))
            })?;
        if !(cfg.init_method_std > 0.0 && cfg.init_method_std.is_finite()) {
            return Err(PluginError::config("init_method_std must be positive"));
        }
        Ok(InitReader {
            cfg,
            dtype,
            tensors: Vec::new(),
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        let p = &self.cfg.config;
        let text = std::fs::read_to_string(p).map_err(|e| PluginError::io(p, "cannot read", e))?;
        let cfg: Map<String, Value> = serde_json::from_str(&text)
            .map_err(|e| PluginError::config(format!("{}: {e}", p.display())))?;
        self.tensors = tensors(&cfg, self.cfg.init_method_std)?;
        let infos = self
            .tensors
            .iter()
            .map(|(n, s, _)| TensorInfo::new(n.clone(), self.dtype, s))
            .collect();
        let mut plan = StreamPlan::new(infos);
        plan.set(attrs::FORMAT, "init");
        if let Some(dir) = p.parent() {
            plan.set(attrs::SOURCE_DIR, dir.to_path_buf());
        }
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let mut rng = Normals {
            mt: rand_mt::Mt::new(self.cfg.seed),
            spare: None,
        };
        for (name, shape, fill) in std::mem::take(&mut self.tensors) {
            let n = shape.iter().product::<u64>() as usize;
            let values: Vec<f32> = match fill {
                Fill::Normal(std) => (0..n).map(|_| (rng.next() * std) as f32).collect(),
                Fill::Ones => vec![1.0; n],
                Fill::Zeros => vec![0.0; n],
            };
            let mut bytes = vec![0u8; n * self.dtype.size()];
            let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            bridgeflow_sdk::numeric::cast(DType::F32, &f32s, self.dtype, &mut bytes);
            out.tensor(Tensor::new(
                TensorInfo::new(name, self.dtype, &shape),
                Buffer::from_vec(bytes),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_have_the_asked_spread() {
        let mut r = Normals {
            mt: rand_mt::Mt::new(7),
            spare: None,
        };
        let x: Vec<f64> = (0..200_000).map(|_| r.next()).collect();
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var.sqrt() - 1.0).abs() < 0.01,
            "{mean} {var}"
        );
    }

    #[test]
    fn output_projections_get_the_scaled_init() {
        let cfg: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "intermediate_size": 128,
        }))
        .unwrap();
        let t = tensors(&cfg, 0.02).unwrap();
        let fill = |n: &str| t.iter().find(|(m, _, _)| m == n).unwrap().2;
        assert_eq!(
            fill("model.layers.3.self_attn.q_proj.weight"),
            Fill::Normal(0.02)
        );
        assert_eq!(
            fill("model.layers.3.self_attn.o_proj.weight"),
            Fill::Normal(0.02 / 4.0)
        );
        assert_eq!(
            fill("model.layers.3.mlp.down_proj.weight"),
            Fill::Normal(0.02 / 4.0)
        );
        assert_eq!(fill("model.layers.0.input_layernorm.weight"), Fill::Ones);
        assert_eq!(t.len(), 1 + 8 * 9 + 2);
    }
}

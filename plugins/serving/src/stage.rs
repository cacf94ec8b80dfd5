//! The exporter stage, generic over its engine ([`Target`]: TensorRT-LLM, vLLM): config, plan (the
//! table's placement, checked against the input before anything is written) and the pieces.

use crate::export::Pieces;
use crate::model::{degree, load_config, HfModel};
use crate::place::{Out, Placement};
use crate::{trtllm, vllm};
use bridgeflow_sdk::units::{human, ByteSize};
use bridgeflow_sdk::{
    attrs, schemars, serde, DType, Emitter, Endpoint, Item, PluginError, Result, StreamPlan,
    TensorInfo, Transform,
};
use std::path::PathBuf;

fn one() -> u64 {
    1
}

/// The output dtype: `auto` (or none) = the config's, else the weights' own.
fn out_dtype(given: Option<&str>, m: &HfModel, inputs: &[TensorInfo]) -> Result<DType> {
    let d = match given {
        None | Some("auto") => m
            .dtype
            .or_else(|| inputs.iter().map(|t| t.dtype).find(|d| d.is_float())),
        Some(s) => DType::parse(s),
    };
    match d {
        Some(d @ (DType::F32 | DType::BF16 | DType::F16)) => Ok(d),
        _ => Err(PluginError::config(format!(
            "dtype = {:?}: expected auto, fp32, bf16 or fp16",
            given.unwrap_or("auto")
        ))),
    }
}

/// The plan of what the exporter emits: every output tensor, one file per prefix.
fn out_plan(outs: &[Out], mut plan: StreamPlan) -> StreamPlan {
    plan.tensors = outs
        .iter()
        .map(|o| TensorInfo::new(o.name.clone(), o.dtype, &o.shape))
        .collect::<Vec<_>>()
        .into();
    plan.set(attrs::FILES_BY_PREFIX, true);
    plan
}

/// What one engine's exporter decides: its config, and the outputs placed for an input.
pub trait Target: Send + Sized + 'static {
    type Config: serde::de::DeserializeOwned + schemars::JsonSchema;
    const DESCRIPTION: &'static str;
    const ENDPOINTS: &'static [Endpoint];
    /// What the summary calls the output.
    const WHAT: &'static str;
    fn new(cfg: Self::Config) -> Result<Self>;
    /// The outputs for the input (`tensors`: its whole tensors), the inputs the engine does not
    /// keep, and the plan handed to the writer (its tensors are filled in from the outputs).
    fn place(
        &self,
        input: &StreamPlan,
        tensors: &[TensorInfo],
    ) -> Result<(Vec<Out>, Vec<String>, StreamPlan)>;
}

/// An exporter stage: a [`Target`]'s placement, streamed as pieces.
pub struct Exporter<T> {
    target: T,
    pieces: Option<Pieces>,
}

impl<T: Target> Transform for Exporter<T> {
    type Config = T::Config;
    const DESCRIPTION: &'static str = T::DESCRIPTION;
    const ENDPOINTS: &'static [Endpoint] = T::ENDPOINTS;

    fn new(cfg: T::Config) -> Result<Self> {
        Ok(Exporter {
            target: T::new(cfg)?,
            pieces: None,
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let tensors = inputs[0].whole_tensors();
        let (outs, unused, plan) = self.target.place(&inputs[0], &tensors)?;
        let plan = out_plan(&outs, plan);
        self.pieces = Some(Pieces::new(
            Placement::new(outs, &tensors, &unused)?,
            &tensors,
        )?);
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let p = self
            .pieces
            .as_mut()
            .ok_or_else(|| PluginError::internal("process before plan"))?;
        p.take(item.into_tensor()?, out)
    }

    fn finish(&mut self, out: &mut Emitter) -> Result<()> {
        self.pieces.as_mut().map_or(Ok(()), |p| p.finish(out))
    }

    fn summary(&mut self) -> String {
        let Some(p) = &self.pieces else {
            return String::new();
        };
        let files = p.placement().file_bytes();
        let bytes: u64 = files.values().sum();
        format!(
            "{}: {} tensors in {} files ({}), {} pieces",
            T::WHAT,
            p.placement().outs.len(),
            files.len(),
            human(bytes),
            p.pieces
        )
    }

    fn metrics(&mut self) -> serde_json::Value {
        match &self.pieces {
            None => serde_json::Value::Null,
            Some(p) => serde_json::json!({
                "tensors": p.placement().outs.len(),
                "pieces": p.pieces,
                "file_bytes": p.placement().file_bytes(),
            }),
        }
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct TrtllmConfig {
    /// Tensor-parallel ranks (`--tp_size`).
    #[serde(default = "one")]
    pub tp: u64,
    /// Pipeline stages (`--pp_size`; the layers must divide).
    #[serde(default = "one")]
    pub pp: u64,
    /// Expert-parallel ranks among the tp ranks (`--moe_ep_size`; MoE-TP is tp / ep).
    #[serde(default = "one")]
    pub ep: u64,
    /// Weights' dtype: auto (the config's), fp32, bf16 or fp16 (`--dtype`).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Split the embedding too (`--use_parallel_embedding`), by rows (0) or columns (1)
    /// (`--embedding_sharding_dim`).
    #[serde(default)]
    pub parallel_embedding: Option<u64>,
    /// The HF config.json (default: the input's).
    #[serde(default)]
    pub hf_config: Option<PathBuf>,
}

pub struct Trtllm {
    cfg: TrtllmConfig,
}

impl Target for Trtllm {
    type Config = TrtllmConfig;
    const DESCRIPTION: &'static str =
        "HF-named weights to TensorRT-LLM's per-rank tensors and config.json (for the safetensors writer)";
    const ENDPOINTS: &'static [Endpoint] = &[Endpoint {
        options: &["tp", "pp", "ep", "dtype", "parallel_embedding", "hf_config"],
        through: "hf",
        ..Endpoint::new(
            "trtllm",
            "hf-model",
            "a TensorRT-LLM unified checkpoint (config.json + rank{N}.safetensors, for trtllm-build)",
        )
    }];
    const WHAT: &'static str = "TensorRT-LLM checkpoint";

    fn new(cfg: TrtllmConfig) -> Result<Self> {
        degree(cfg.tp, "tp")?;
        degree(cfg.pp, "pp")?;
        degree(cfg.ep, "ep")?;
        if cfg.parallel_embedding.is_some_and(|d| d > 1) {
            return Err(PluginError::config(
                "parallel_embedding: expected 0 (rows) or 1 (columns)",
            ));
        }
        Ok(Trtllm { cfg })
    }

    /// A fresh plan: the engine wants only its config.json beside the rank files.
    fn place(
        &self,
        input: &StreamPlan,
        tensors: &[TensorInfo],
    ) -> Result<(Vec<Out>, Vec<String>, StreamPlan)> {
        let (raw, _) = load_config(input, self.cfg.hf_config.as_deref())?;
        let m = HfModel::from_config(raw)?;
        // FP8 weights (from fp8-static's TensorRT-LLM layout): ModelOpt's export, which splits
        // the embedding by rows unless told otherwise.
        let fp8 = tensors.iter().any(|t| t.dtype == DType::F8_E4M3);
        let dtype = match (fp8, self.cfg.dtype.as_deref()) {
            // The dtype the quantizer left the other tensors in.
            (true, None | Some("auto")) => tensors
                .iter()
                .map(|t| t.dtype)
                .find(|d| matches!(d, DType::BF16 | DType::F16 | DType::F32))
                .unwrap_or(DType::BF16),
            (_, given) => out_dtype(given, &m, tensors)?,
        };
        let lay = trtllm::Layout {
            tp: self.cfg.tp,
            pp: self.cfg.pp,
            ep: self.cfg.ep,
            dtype,
            parallel_embedding: match fp8 {
                true => self.cfg.parallel_embedding.or(Some(0)),
                false => self.cfg.parallel_embedding,
            },
            fp8,
        };
        let outs = trtllm::place(&m, &lay, tensors)?;
        let mut plan = StreamPlan::default();
        let config = match fp8 {
            true => trtllm::modelopt_config(&m, &lay)?,
            false => trtllm::config(&m, &lay)?,
        };
        plan.set(attrs::HF_CONFIG, config);
        Ok((outs, trtllm::unused(&m, &lay), plan))
    }
}

fn five_gib() -> ByteSize {
    ByteSize(5 << 30)
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct VllmConfig {
    /// Tensor-parallel ranks vLLM will load the files with (`tensor_parallel_size`).
    #[serde(default = "one")]
    pub tp: u64,
    /// Weights' dtype: auto (the config's), fp32, bf16 or fp16.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Largest part file (default 5 GiB, as vLLM's own writer); a larger tensor gets its own.
    #[serde(default = "five_gib")]
    pub max_part_size: ByteSize,
    /// The HF config.json (default: the input's).
    #[serde(default)]
    pub hf_config: Option<PathBuf>,
}

pub struct Vllm {
    cfg: VllmConfig,
}

impl Target for Vllm {
    type Config = VllmConfig;
    const DESCRIPTION: &'static str =
        "HF-named weights to vLLM 0.32's sharded_state tensors per TP rank (for the safetensors writer)";
    const ENDPOINTS: &'static [Endpoint] = &[Endpoint {
        options: &["tp", "dtype", "hf_config"],
        through: "hf",
        ..Endpoint::new(
            "vllm",
            "hf-model",
            "vLLM sharded_state files (model-rank-{r}-part-{p}.safetensors + config and tokenizer; load_format=\"sharded_state\")",
        )
    }];
    const WHAT: &'static str = "vLLM sharded_state";

    fn new(cfg: VllmConfig) -> Result<Self> {
        degree(cfg.tp, "tp")?;
        Ok(Vllm { cfg })
    }

    /// The input's attributes carried on: the writer copies the config and tokenizer files from
    /// its folder; a config given, rebuilt or completed is written as it is.
    fn place(
        &self,
        input: &StreamPlan,
        tensors: &[TensorInfo],
    ) -> Result<(Vec<Out>, Vec<String>, StreamPlan)> {
        let (raw, path) = load_config(input, self.cfg.hf_config.as_deref())?;
        let m = HfModel::from_config(raw.clone())?;
        let lay = vllm::Layout {
            tp: self.cfg.tp,
            dtype: out_dtype(self.cfg.dtype.as_deref(), &m, tensors)?,
            max_part: self.cfg.max_part_size.0.max(1),
        };
        let (outs, unused) = vllm::place(&m, &lay, tensors)?;
        let mut plan = input.clone();
        let additions = vllm::config_additions(&m);
        if path.is_none() || self.cfg.hf_config.is_some() || !additions.is_empty() {
            let mut cfg = raw;
            cfg.extend(additions.into_iter().map(|(k, v)| (k.to_string(), v)));
            plan.set(attrs::HF_CONFIG, cfg);
        }
        Ok((outs, unused, plan))
    }
}

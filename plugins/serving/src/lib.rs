//! bridgeflow plugin library with the exporters for serving engines: `trtllm` (TensorRT-LLM's
//! unified checkpoint) and `vllm-sharded` (vLLM's `sharded_state` files). Each is a stage that
//! turns an HF-named tensor stream into the engine's per-rank tensors — pieces placed by a
//! table, see [`place`] — which the safetensors writer stores one file per rank; on the command
//! line they are `convert --to trtllm:DIR` and `--to vllm:DIR`, from HF or (through the models
//! mapper) from Megatron checkpoints.

pub mod export;
pub mod model;
pub mod place;
pub mod stage;
pub mod trtllm;
pub mod vllm;

bridgeflow_sdk::export_plugins! {
    "trtllm" {
        version: env!("CARGO_PKG_VERSION"),
        description: "TensorRT-LLM unified checkpoints (config.json + rank{N}.safetensors, TP x PP, MoE-TP x EP) as TensorRT-LLM's converter lays them out",
        exporter: Transform(stage::Exporter<stage::Trtllm>),
    }
    "vllm-sharded" {
        version: env!("CARGO_PKG_VERSION"),
        description: "vLLM sharded_state checkpoints (model-rank-{r}-part-{p}.safetensors with vLLM 0.32's own parameter names)",
        exporter: Transform(stage::Exporter<stage::Vllm>),
    }
}

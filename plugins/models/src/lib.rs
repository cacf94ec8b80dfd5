//! bridgeflow plugin `models`: model families between Hugging Face and Megatron-Core, each a
//! declarative table (`families/`, in Rust or TOML) driven by one generic mapper; and the Rust
//! logits check of Llama-family weights in Megatron layout.

pub mod calibrate;
pub mod check;
pub mod expect;
pub mod families;
pub mod forward;
pub mod layout;
pub mod mapper;
pub mod megatron_config;
pub mod quirks;

bridgeflow_sdk::export_plugins! {
    "models" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Model mapper: HF <-> Megatron-Core names and layouts from a family table",
        mapper: Transform(mapper::Mapper),
    }
    "llama" {
        version: env!("CARGO_PKG_VERSION"),
        description: "The models mapper under its first name (pipelines written for the Llama family)",
        mapper: Transform(mapper::Mapper),
    }
    "llama-logits" {
        version: env!("CARGO_PKG_VERSION"),
        description: "fp32 forward pass of Megatron-layout Llama weights, compared with reference logits",
        transform: Transform(check::LogitsCheck),
    }
    "calibrate" {
        version: env!("CARGO_PKG_VERSION"),
        description: "FP8 activation and KV-cache scales from a calibration pass (ModelOpt's amax / 448), under HF names",
        transform: Transform(calibrate::Calibrate),
    }
}

//! bridgeflow plugin `llama`: the Llama family (Llama, Mistral, Qwen2, Qwen3) between Hugging
//! Face and Megatron-Core, as one declarative table (`llama.rs`) driven by a generic mapper.

pub mod check;
pub mod forward;
pub mod llama;
pub mod mapper;
pub mod megatron_config;

bridgeflow_sdk::export_plugins! {
    "llama" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Llama-family mapper: HF <-> Megatron-Core names and layouts",
        mapper: Transform(mapper::Mapper),
    }
    "llama-logits" {
        version: env!("CARGO_PKG_VERSION"),
        description: "fp32 forward pass of Megatron-layout Llama weights, compared with reference logits",
        transform: Transform(check::LogitsCheck),
    }
}

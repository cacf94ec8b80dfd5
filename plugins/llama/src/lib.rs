//! bridgeflow plugin `llama`: the Llama family (Llama, Mistral, Qwen2, Qwen3) between Hugging
//! Face and Megatron-Core, as one declarative table (`llama.rs`) driven by a generic mapper.

pub mod llama;
pub mod mapper;

bridgeflow_sdk::export_plugins! {
    "llama" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Llama-family mapper: HF <-> Megatron-Core names and layouts",
        mapper: Transform(mapper::Mapper),
    }
}

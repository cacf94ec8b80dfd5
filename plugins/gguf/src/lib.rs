//! bridgeflow plugin library with the GGUF writer (llama.cpp, ollama): `convert --to
//! gguf:FILE.gguf` from HF or, through the models mapper, from Megatron checkpoints.

pub mod arch;
pub mod format;
pub mod quant;
pub mod reader;
pub mod vocab;
pub mod writer;

bridgeflow_sdk::export_plugins! {
    "gguf" {
        version: env!("CARGO_PKG_VERSION"),
        description: "GGUF files for llama.cpp and ollama (Llama, Mistral, Qwen2, Qwen3; F32, F16, BF16, Q8_0)",
        writer: Sink(writer::GgufWriter),
        reader: Source(reader::GgufReader),
    }
}

//! bridgeflow plugin `safetensors`: reads one file or an HF directory (with or without
//! `model.safetensors.index.json`) from memory maps, without copying, and writes the HF sharded
//! layout atomically.

pub mod dtype;
pub mod files;
pub mod header;
pub mod reader;
pub mod writer;

pub use reader::SafetensorsReader;
pub use writer::SafetensorsWriter;

bridgeflow_sdk::export_plugins! {
    "safetensors" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Hugging Face safetensors: memory-mapped zero-copy reader, sharded atomic writer",
        reader: Source(SafetensorsReader),
        writer: Sink(SafetensorsWriter),
    }
}

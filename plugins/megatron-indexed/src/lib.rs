//! bridgeflow plugin `megatron-indexed`: Megatron-Core's indexed dataset format
//! (`megatron.core.datasets.indexed_dataset`), written byte for byte as `preprocess_data.py`
//! writes it and read back (also for merging several datasets, as `tools/merge_datasets.py`).
//!
//! `.idx`: `MMIDIDX\0\0`, u64 version 1, u8 dtype code, u64 sequence count, u64 document count
//! (documents + 1), then i32 sequence lengths, i64 byte pointers (exclusive cumulative sum of
//! length × item size) and i64 document indices (first 0, one entry per document: the sequence
//! count after it). `.bin`: the tokens, back to back, little-endian.

pub mod format;
pub mod gpt_dataset;
pub mod reader;
pub mod writer;

bridgeflow_sdk::export_plugins! {
    "megatron-indexed" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Megatron indexed datasets (.bin/.idx): byte-identical writer, reader, merge",
        reader: Source(reader::IndexedReader),
        writer: Sink(writer::IndexedWriter),
    }
    "gpt-dataset" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Training samples in megatron-core GPTDataset's order from an indexed dataset",
        reader: Source(gpt_dataset::GptDatasetReader),
    }
}

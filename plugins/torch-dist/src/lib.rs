//! bridgeflow plugin `torch-dist`: Megatron-Core's distributed checkpoints (PyTorch DCP as
//! megatron-core's `dist_checkpointing` writes it; see `../shared/specs/torch_dist.md`).
//!
//! `.metadata` is a pickle, read with a restricted unpickler; every item of a `.distcp` file is
//! a whole `torch.save` zip archive, read in place from a memory map.

pub use bridgeflow_megatron::{checkpoint, dtypes, emit, pickle, zip};
pub mod legacy;
pub mod reader;
pub mod writer;

bridgeflow_sdk::export_plugins! {
    "torch-dist" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Megatron-Core torch_dist checkpoints: reader (any chunking, zero-copy where possible) and writer",
        reader: Source(reader::TorchDistReader),
        writer: Sink(writer::TorchDistWriter),
    }
    "megatron-lm" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Megatron-LM's own checkpoints (mp_rank_XX[_YYY]/model_optim_rng.pt): reader and writer over TP ranks and PP stages",
        reader: Source(legacy::LegacyReader),
        writer: Sink(legacy::LegacyWriter),
    }
}

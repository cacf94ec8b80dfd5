//! # bridgeflow-megatron
//!
//! The one home of Megatron-Core's and Megatron-LM's naming and parallel layout, shared by
//! bridgeflow's Megatron plugins (`torch-dist`, `megatron-lm`, `models`). It is **not** part of
//! the plugin ABI: nothing here crosses the host/plugin boundary, and a plugin that reads no
//! Megatron checkpoint never links it (the ABI crate is `bridgeflow-sdk`).
//!
//! - [`names`]: the keys — decoder layers (`decoder.layers.<l>.…`), experts (stacked
//!   `experts.experts`, Megatron-LM's grouped-GEMM and `local_experts.<i>` keys), the
//!   Transformer Engine and local-spec names, `_extra_state` entries, multi-token-prediction
//!   layers, the embedding / output layer / final norm, Megatron-LM's rank folders;
//! - [`vocab`]: vocabulary padding (`make_vocab_size_divisible_by` × TP);
//! - [`tp`]: how each tensor splits over tensor-parallel ranks (by name), each rank's share as
//!   byte runs or boxes, and the inverse (a global shape from a rank's);
//! - [`blocks`]: boxes and byte runs inside row-major tensors;
//! - [`degree`]: the bounds every parallel degree is checked against;
//! - [`placement`]: pure functions that say where things go — which pipeline stage and virtual
//!   chunk a layer is on, which expert-parallel rank and local index an expert has, which slice
//!   of which tensor goes to which TP rank and file (Megatron-LM rank files, torch_dist chunks);
//! - [`mapping`]: HF ⇄ Megatron mapping tables and Megatron's fused layouts (QKV per query
//!   group, SwiGLU `[gate; up]`, Mamba's split `in_proj`, per-expert reshuffles);
//! - reading torch_dist: [`checkpoint`] (`.metadata`, items, regions assembled from any
//!   chunking; [`tiling`]: no element in two chunks) over [`pickle`] (a restricted
//!   unpickler), [`zip`] (torch.save archives, CRC checked) and [`dtypes`]; writing it:
//!   [`emit`] (torch.save, pickles) and [`dcp`] (the index). The `torch-dist` plugin and the
//!   trainer's checkpoints share them.

pub mod blocks;
pub mod checkpoint;
pub mod dcp;
pub mod degree;
pub mod dtypes;
pub mod emit;
#[cfg(test)]
mod emit_tests;
pub mod mapping;
pub mod names;
pub mod pickle;
pub mod placement;
pub mod run_config;
pub mod tiling;
pub mod tp;
pub mod vocab;
pub mod zip;

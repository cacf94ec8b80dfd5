//! bridgeflow plugin `torch-dist`: Megatron-Core's distributed checkpoints (PyTorch DCP as
//! megatron-core's `dist_checkpointing` writes it; see `../shared/specs/torch_dist.md`).
//!
//! `.metadata` is a pickle, read with a restricted unpickler; every item of a `.distcp` file is
//! a whole `torch.save` zip archive, read in place from a memory map.

pub mod checkpoint;
pub mod dtypes;
pub mod emit;
pub mod legacy;
pub mod pickle;
pub mod reader;
pub mod writer;
pub mod zip;

/// `(stack, rest)` of a key under a decoder's layers — `decoder.layers.` itself, or nested in a
/// submodule as VLMs hold their language model (`language_model.decoder.layers.`) — and what
/// follows it.
pub(crate) fn decoder_layers(key: &str) -> Option<(&str, &str)> {
    const LAYERS: &str = "decoder.layers.";
    let at = key.find(LAYERS)?;
    if at > 0 && !key[..at].ends_with('.') {
        return None;
    }
    Some(key.split_at(at + LAYERS.len()))
}

#[cfg(test)]
mod layer_key_tests {
    #[test]
    fn decoder_layers_may_sit_in_a_submodule() {
        use super::decoder_layers as d;
        assert_eq!(
            d("decoder.layers.3.mlp.w"),
            Some(("decoder.layers.", "3.mlp.w"))
        );
        assert_eq!(
            d("language_model.decoder.layers.mlp.w"),
            Some(("language_model.decoder.layers.", "mlp.w"))
        );
        assert_eq!(d("xdecoder.layers.1.w"), None);
        assert_eq!(d("visual.blocks.0.attn.qkv.weight"), None);
    }
}

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

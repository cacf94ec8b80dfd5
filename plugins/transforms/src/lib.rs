//! bridgeflow plugin library with the everyday tensor stages: `cast`, `rename`, `filter`,
//! `checksum`, `verify`, `verify-manifest`, `fp8-dequant`, `fp8-quant`, `fp8-static` and
//! `mxfp4-dequant`.

pub mod cast;
pub mod checksum;
pub mod fp8;
pub mod fp8_static;
pub mod mxfp4;
mod pairs;
pub mod select;
pub mod verify;

bridgeflow_sdk::export_plugins! {
    "cast" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Casts float tensors between f32, f16, bf16 and f64 (round to nearest even)",
        transform: Transform(cast::Cast),
    }
    "rename" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Renames tensors with regular expressions",
        transform: Transform(select::Rename),
    }
    "filter" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Keeps or drops tensors by name pattern",
        transform: Transform(select::Filter),
    }
    "checksum" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Passes tensors through and writes a blake3 manifest",
        transform: Transform(checksum::Checksum),
    }
    "verify" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Compares two tensor streams: exact, or max abs diff within a tolerance",
        transform: Transform(verify::Verify),
    }
    "fp8-dequant" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Dequantizes block-scaled FP8 weights to bf16, bit-identical to Megatron-Bridge",
        transform: Transform(fp8::Fp8Dequant),
    }
    "fp8-quant" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Quantizes float weights to block-scaled FP8 as DeepSeek-V3 stores them (re-quantization on export)",
        transform: Transform(fp8::Fp8Quant),
    }
    "fp8-static" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Quantizes to ModelOpt's unified HF FP8 checkpoint (per-projection e4m3 weights, weight/input/KV scales from a calibration)",
        transform: Transform(fp8_static::Fp8Static),
    }
    "mxfp4-dequant" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Dequantizes MXFP4 expert weights (GPT-OSS X_blocks + X_scales) to bf16 as transformers does",
        transform: Transform(mxfp4::Mxfp4Dequant),
    }
    "verify-manifest" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Checks a tensor stream against a blake3 manifest",
        transform: Transform(verify::VerifyManifest),
    }
}

//! `mxfp4-dequant`: MXFP4 expert weights as OpenAI's GPT-OSS releases store them — `X_blocks`
//! (uint8 [E, out, G, B], two FP4 E2M1 codes per byte, low nibble first) with `X_scales` (uint8
//! [E, out, G], one E8M0 exponent biased by 127 per 2·B values) — to `X` in bf16 as transformers
//! dequantizes them (`convert_moe_packed_tensors`): `code value · 2^(scale − 127)` computed in f32
//! and rounded once, laid out [E, G·2B, out] like the bf16 checkpoints, so the models mapper and
//! the safetensors writer see a bf16 GPT-OSS. Megatron-Bridge's `dequantize_mxfp4` gives the same
//! values in the [E, out, in] orientation; the test checks our import against its own.
//!
//! Dequantized experts are emitted in blocks of whole experts (pieces `X#<first expert>`, each at
//! most `piece_bytes` unless one expert is larger), so a 4 GB fused tensor is never resident.

use crate::fp8::{bf16_name, d16m, float_target, no_longer_quantized, store};
use crate::pairs::Pairs;
use bridgeflow_sdk::{
    schemars, serde, BufferPool, DType, Emitter, Item, PluginError, Result, StreamPlan, Tensor,
    TensorInfo, Transform,
};
use rayon::prelude::*;
use std::collections::HashSet;

/// The 16 FP4 E2M1 codes (sign in bit 3).
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

fn blocks_suffix() -> String {
    "_blocks".into()
}
fn scales_suffix() -> String {
    "_scales".into()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct Mxfp4Config {
    /// Target dtype: bf16 (default, as transformers), f16 or f32 (exact).
    #[serde(default = "bf16_name")]
    pub to: String,
    /// The packed codes of `X` are `X` + this suffix.
    #[serde(default = "blocks_suffix")]
    pub blocks_suffix: String,
    /// Its exponents are `X` + this suffix.
    #[serde(default = "scales_suffix")]
    pub scales_suffix: String,
    /// Emit a dequantized tensor larger than this in blocks of whole experts of at most this
    /// size (at least one expert each); 0: whole tensors.
    #[serde(default = "d16m")]
    pub piece_bytes: u64,
}

pub struct Mxfp4Dequant {
    cfg: Mxfp4Config,
    to: DType,
    /// Names `X` whose blocks and scales are both in the stream.
    quantized: HashSet<String>,
    waiting: Pairs,
    pool: BufferPool,
}

/// 2^e in f32 for an E8M0 exponent minus its bias (−127..=128), as torch's `ldexp` computes it
/// (2^-127 subnormal, 2^128 infinite).
fn pow2(e: i32) -> f32 {
    match e {
        128.. => f32::INFINITY,
        -126.. => f32::from_bits(((e + 127) as u32) << 23),
        _ => f32::from_bits(1 << (e + 149).max(0)),
    }
}

/// Shapes of a blocks/scales pair: (experts, out, groups, bytes per group).
fn geometry(blocks: &TensorInfo, scales: &TensorInfo) -> Result<(u64, u64, u64, u64)> {
    match (blocks.shape.as_slice(), scales.shape.as_slice()) {
        (&[e, o, g, b], s)
            if blocks.dtype == DType::U8 && scales.dtype == DType::U8 && s == [e, o, g] =>
        {
            Ok((e, o, g, b))
        }
        _ => Err(PluginError::shape(format!(
            "'{}' ({} {}) and '{}' ({} {}): MXFP4 needs U8 blocks [experts, out, groups, bytes] and U8 scales [experts, out, groups]",
            blocks.name(),
            blocks.dtype,
            blocks.shape_string(),
            scales.name(),
            scales.dtype,
            scales.shape_string()
        ))),
    }
}

enum Tables {
    Two(Vec<[[u8; 2]; 16]>),
    Four(Vec<[[u8; 4]; 16]>),
}

/// Every code's value under every exponent, encoded as `to`: 256 × 16 entries made once per
/// tensor, so that each output value is one lookup.
fn encoded<const N: usize>(to: DType) -> Vec<[[u8; N]; 16]> {
    (0..256)
        .map(|s| {
            let mul = pow2(s - 127);
            let mut enc = [[0u8; N]; 16];
            for (e, v) in enc.iter_mut().zip(FP4) {
                store(to, e, v * mul);
            }
            enc
        })
        .collect()
}

/// Group `gi` of expert `x`: each of the 2·b values of each of the `o` source rows, written
/// transposed (value q of row r lands at output row q, column r).
fn fill_group<const N: usize>(
    table: &[[[u8; N]; 16]],
    dst: &mut [u8],
    blocks: &[u8],
    scales: &[u8],
    (x, gi): (usize, usize),
    (o, g, b): (usize, usize, usize),
) {
    let dst: &mut [[u8; N]] = dst.as_chunks_mut::<N>().0;
    for r in 0..o {
        let row = (x * o + r) * g + gi;
        let enc = &table[scales[row] as usize];
        for (q, &byte) in blocks[row * b..(row + 1) * b].iter().enumerate() {
            dst[2 * q * o + r] = enc[(byte & 0x0f) as usize];
            dst[(2 * q + 1) * o + r] = enc[(byte >> 4) as usize];
        }
    }
}

impl Mxfp4Dequant {
    fn key<'a>(&self, name: &'a str) -> Option<(&'a str, bool)> {
        let k = |suffix: &str| {
            name.strip_suffix(suffix)
                .filter(|k| self.quantized.contains(*k))
        };
        k(&self.cfg.blocks_suffix)
            .map(|k| (k, true))
            .or_else(|| k(&self.cfg.scales_suffix).map(|k| (k, false)))
    }

    /// Experts per emitted block of a tensor with `per_expert` output bytes and `experts` experts.
    fn experts_per_piece(&self, per_expert: u64, experts: u64) -> u64 {
        if self.cfg.piece_bytes == 0 || per_expert * experts <= self.cfg.piece_bytes {
            return experts.max(1);
        }
        (self.cfg.piece_bytes / per_expert.max(1)).max(1)
    }

    /// The dequantized tensor (or its blocks of experts) for `key`.
    fn outputs(&self, key: &str, dims: (u64, u64, u64, u64)) -> Vec<TensorInfo> {
        let (e, o, g, b) = dims;
        let global = [e, g * 2 * b, o];
        let per = self.experts_per_piece(global[1] * o * self.to.size() as u64, e);
        if per >= e {
            return vec![TensorInfo::new(key.to_string(), self.to, &global)];
        }
        (0..e)
            .step_by(per as usize)
            .map(|x| {
                let shape = [per.min(e - x), global[1], o];
                TensorInfo::new(format!("{key}#{x}"), self.to, &shape)
                    .with_shard(&global, &[x, 0, 0])
            })
            .collect()
    }

    fn dequantize(
        &self,
        key: &str,
        blocks: &Tensor,
        scales: &Tensor,
        out: &mut Emitter,
    ) -> Result<()> {
        let dims = geometry(&blocks.info, &scales.info)?;
        let (_, o, g, b) = (
            dims.0 as usize,
            dims.1 as usize,
            dims.2 as usize,
            dims.3 as usize,
        );
        let size = self.to.size();
        let k = 2 * b; // values per scale: the output rows one group fills
        let tables = match size {
            2 => Tables::Two(encoded::<2>(self.to)),
            _ => Tables::Four(encoded::<4>(self.to)),
        };
        for info in self.outputs(key, dims) {
            let x0 = info.shard().map_or(0, |s| s.offsets[0]) as usize;
            let n = info.shape[0] as usize;
            let mut buf = self.pool.take(n * g * k * o * size);
            // One chunk per (expert, group): k output rows of `o` values, filled from the b
            // bytes and the one scale of each of the `o` source rows.
            let fill = |j: usize, dst: &mut [u8]| {
                let (x, gi) = (x0 + j / g, j % g);
                let (bl, sc) = (blocks.bytes(), scales.bytes());
                match &tables {
                    Tables::Two(t) => fill_group(t, dst, bl, sc, (x, gi), (o, g, b)),
                    Tables::Four(t) => fill_group(t, dst, bl, sc, (x, gi), (o, g, b)),
                }
            };
            buf.as_mut_slice()
                .par_chunks_mut(k * o * size)
                .enumerate()
                .for_each(|(j, dst)| fill(j, dst));
            // These experts' codes and exponents are read: their pages may go.
            let rows = (x0 * o * g)..((x0 + n) * o * g);
            blocks.data.discard(rows.start * b..rows.end * b);
            scales.data.discard(rows);
            out.tensor(Tensor::new(info, buf.freeze())?)?;
        }
        Ok(())
    }
}

impl Transform for Mxfp4Dequant {
    type Config = Mxfp4Config;
    const DESCRIPTION: &'static str =
        "Dequantizes MXFP4 expert weights (X_blocks + X_scales, GPT-OSS) to bf16 as transformers does";
    const QUANT_METHODS: &'static [&'static str] = &["mxfp4"];

    fn new(cfg: Mxfp4Config) -> Result<Self> {
        Ok(Mxfp4Dequant {
            to: float_target(&cfg.to)?,
            cfg,
            quantized: HashSet::new(),
            waiting: Pairs::default(),
            pool: BufferPool::new(16 << 20),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let input = &inputs[0];
        let by_name: std::collections::HashMap<&str, &TensorInfo> =
            input.tensors.iter().map(|t| (t.name(), t)).collect();
        let (bs, ss) = (&self.cfg.blocks_suffix, &self.cfg.scales_suffix);
        let mut kept = Vec::new();
        for t in input.tensors.iter() {
            if let Some(key) = t.name().strip_suffix(bs.as_str()) {
                let scales = by_name.get(format!("{key}{ss}").as_str()).ok_or_else(|| {
                    PluginError::shape(format!("'{}' has no '{key}{ss}' beside it", t.name()))
                })?;
                self.quantized.insert(key.to_string());
                kept.extend(self.outputs(key, geometry(t, scales)?));
            } else if let Some(key) = t.name().strip_suffix(ss.as_str()) {
                if !by_name.contains_key(format!("{key}{bs}").as_str()) {
                    return Err(PluginError::shape(format!(
                        "'{}' has no '{key}{bs}' beside it",
                        t.name()
                    )));
                }
            } else {
                kept.push(t.clone());
            }
        }
        let mut plan = input.clone();
        plan.tensors = kept.into();
        no_longer_quantized(&mut plan);
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        let Some((key, first)) = self.key(t.name()).map(|(k, f)| (k.to_string(), f)) else {
            return out.tensor(t);
        };
        if let Some((blocks, scales)) = self.waiting.offer(&key, t, first) {
            self.dequantize(&key, &blocks, &scales, out)?;
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        self.waiting.finish("blocks (or scales)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_of_two_cover_the_e8m0_range_as_torch_does() {
        assert_eq!(pow2(0), 1.0);
        assert_eq!(pow2(-1), 0.5);
        assert_eq!(pow2(127), 2f32.powi(127));
        assert_eq!(pow2(-126), f32::MIN_POSITIVE);
        assert_eq!(pow2(-127), f32::MIN_POSITIVE / 2.0);
        assert_eq!(pow2(128), f32::INFINITY);
    }

    #[test]
    fn codes_decode_low_nibble_first_and_transposed() {
        // One expert, 2 source rows, one group of 2 bytes (4 values per row).
        let blocks = Tensor::new(
            TensorInfo::new("w_blocks", DType::U8, &[1, 2, 1, 2]),
            bridgeflow_sdk::Buffer::from_vec(vec![0x21, 0x9f, 0x07, 0x00]),
        )
        .unwrap();
        let scales = Tensor::new(
            TensorInfo::new("w_scales", DType::U8, &[1, 2, 1]),
            bridgeflow_sdk::Buffer::from_vec(vec![128, 126]),
        )
        .unwrap();
        let cfg = Mxfp4Config {
            to: "f32".into(),
            blocks_suffix: blocks_suffix(),
            scales_suffix: scales_suffix(),
            piece_bytes: 0,
        };
        let stage = Mxfp4Dequant::new(cfg).unwrap();
        let mut got = Vec::new();
        let mut keep = |item: Item| {
            got.push(item.into_tensor()?);
            Ok(())
        };
        Emitter::scoped(&mut keep, None, |em| {
            stage.dequantize("w", &blocks, &scales, em)
        })
        .unwrap();
        let t = got.remove(0);
        assert_eq!(t.info.shape.as_slice(), [1, 4, 2]);
        let v: Vec<f32> = t
            .bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // Row 0 (scale 2): codes 1, 2, 15, 9 -> 1, 2, -12, -1; row 1 (scale 1/2): 7, 0, 0, 0.
        assert_eq!(v, [1.0, 3.0, 2.0, 0.0, -12.0, 0.0, -1.0, 0.0]);
    }
}

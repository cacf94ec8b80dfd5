//! `cast`: float conversions with round-to-nearest-even, in parallel over chunks, into pooled
//! output buffers. Integer, bool and FP8 tensors pass through (FP8 needs its scales to mean
//! anything; that belongs to a quantisation stage).

use bridgeflow_sdk::{
    schemars, serde, BufferPool, DType, Emitter, Item, PluginError, Result, StreamPlan, Tensor,
    TensorInfo, Transform,
};
use rayon::prelude::*;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct CastConfig {
    /// Target dtype: f32, f16, bf16 or f64 (also float32, bfloat16, ...).
    pub to: String,
    /// Only tensors whose name matches this regular expression (default: all).
    #[serde(default)]
    pub include: Option<String>,
    /// Never tensors whose name matches this regular expression.
    #[serde(default)]
    pub exclude: Option<String>,
}

pub struct Cast {
    to: DType,
    include: Option<regex::Regex>,
    exclude: Option<regex::Regex>,
    pool: BufferPool,
}

const CASTABLE: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

fn regex(field: &str, p: &Option<String>) -> Result<Option<regex::Regex>> {
    p.as_deref()
        .map(|s| regex::Regex::new(s).map_err(|e| PluginError::config(format!("{field}: {e}"))))
        .transpose()
}

impl Cast {
    fn applies(&self, t: &TensorInfo) -> bool {
        CASTABLE.contains(&t.dtype)
            && t.dtype != self.to
            && self.include.as_ref().is_none_or(|r| r.is_match(t.name()))
            && !self.exclude.as_ref().is_some_and(|r| r.is_match(t.name()))
    }
}

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to spread a
/// single big tensor over every core.
const CHUNK: usize = 1 << 16;

/// Converts `src` (elements of `from`) into `dst` (elements of `to`).
pub fn convert(from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
    let (si, so) = (from.size(), to.size());
    dst.par_chunks_mut(CHUNK * so)
        .zip(src.par_chunks(CHUNK * si))
        .for_each(|(d, s)| bridgeflow_sdk::numeric::cast(from, s, to, d));
}

impl Transform for Cast {
    type Config = CastConfig;
    const DESCRIPTION: &'static str =
        "Casts f32/f16/bf16/f64 tensors to another float dtype (round to nearest even)";

    fn new(c: CastConfig) -> Result<Self> {
        let to = DType::parse(&c.to)
            .filter(|d| CASTABLE.contains(d))
            .ok_or_else(|| {
                PluginError::config(format!(
                    "to = \"{}\": expected one of f32, f16, bf16, f64",
                    c.to
                ))
            })?;
        Ok(Cast {
            to,
            include: regex("include", &c.include)?,
            exclude: regex("exclude", &c.exclude)?,
            pool: BufferPool::new(64 << 20),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let mut plan = inputs[0].clone();
        for t in plan.tensors.iter_mut() {
            if self.applies(t) {
                t.dtype = self.to;
            }
        }
        plan.set(bridgeflow_sdk::attrs::DTYPE, self.to.torch_name());
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        if !self.applies(&t.info) {
            return out.tensor(t);
        }
        let numel = t.info.numel().unwrap_or(0) as usize;
        let mut buf = self.pool.take(numel * self.to.size());
        convert(t.info.dtype, t.bytes(), self.to, buf.as_mut_slice());
        let mut info = t.info.clone();
        info.dtype = self.to;
        drop(t);
        out.tensor(Tensor::new(info, buf.freeze())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_to_bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
        let halfway = f32::from_bits(0x3f80_8000);
        let above = f32::from_bits(0x3f80_8001);
        let odd_halfway = f32::from_bits(0x3f81_8000); // ties to 0x3f82
        let src: Vec<u8> = [halfway, above, odd_halfway]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut dst = vec![0u8; 6];
        convert(DType::F32, &src, DType::BF16, &mut dst);
        let got: Vec<u16> = dst
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got, vec![0x3f80, 0x3f81, 0x3f82]);
    }

    #[test]
    fn widening_is_exact() {
        let src: Vec<u8> = [0x3f80u16, 0xc049, 0x7f80]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut dst = vec![0u8; 12];
        convert(DType::BF16, &src, DType::F32, &mut dst);
        let got: Vec<u32> = dst
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![0x3f80_0000, 0xc049_0000, 0x7f80_0000]);
    }

    #[test]
    fn bad_target_is_a_config_error() {
        let e = Cast::new(CastConfig {
            to: "int8".into(),
            include: None,
            exclude: None,
        })
        .err()
        .unwrap();
        assert!(e.message.contains("expected one of"), "{e}");
    }
}

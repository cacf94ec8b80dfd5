//! Rows of weights into GGUF's tensor types, with the arithmetic of llama.cpp's `gguf-py`
//! (`quants.py`), so our files hold what its converter would write.

use crate::format::GgmlType;
use bridgeflow_sdk::{numeric, DType};
use half::f16;

/// Converts one row (`src` in `from`) into `ty`, appending to `out`.
pub fn encode_row(from: DType, src: &[u8], ty: GgmlType, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + ty.bytes((src.len() / from.size()) as u64) as usize, 0);
    encode_row_into(from, src, ty, &mut out[at..]);
}

/// Converts one row into `dst`, exactly `ty`'s bytes of it long.
pub fn encode_row_into(from: DType, src: &[u8], ty: GgmlType, dst: &mut [u8]) {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => {
            let to = match ty {
                GgmlType::F32 => DType::F32,
                GgmlType::F16 => DType::F16,
                _ => DType::BF16,
            };
            numeric::cast(from, src, to, dst);
        }
        GgmlType::Q8_0 => {
            let mut x = vec![0u8; src.len() / from.size() * 4];
            numeric::cast(from, src, DType::F32, &mut x);
            let x: Vec<f32> = x
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            for (block, out) in x.chunks_exact(32).zip(dst.chunks_exact_mut(34)) {
                q8_0_block(block, out);
            }
        }
    }
}

/// One block of 32: `d = max|x| / 127` (f32), each `x · (1/d)` rounded half away from zero to
/// an i8, `d` stored as f16 before the 32 values (`Q8_0.quantize_blocks`).
fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        *o = round_half_away(v * id) as i8 as u8;
    }
}

/// numpy's `np_roundf` of gguf-py: halves away from zero.
fn round_half_away(v: f32) -> f32 {
    v.signum() * (v.abs() + 0.5).trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_scale_by_the_largest_magnitude() {
        let mut x = [0f32; 32];
        x[0] = -2.54;
        x[1] = 1.27;
        x[2] = 0.01; // 0.5 exactly: away from zero
        let src: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        encode_row(DType::F32, &src, GgmlType::Q8_0, &mut out);
        assert_eq!(out.len(), 34);
        let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
        assert!((d - 0.02).abs() < 1e-5, "{d}");
        assert_eq!(out[2] as i8, -127);
        assert_eq!(out[3] as i8, 64);
        assert_eq!(out[4] as i8, 1);
        // All zeros: a zero scale and zero values, no NaN.
        let mut z = Vec::new();
        encode_row(DType::F32, &[0u8; 128], GgmlType::Q8_0, &mut z);
        assert!(z.iter().all(|&b| b == 0));
    }
}

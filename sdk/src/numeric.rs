//! Element decoding for checks and casts: any float or integer dtype to f64, chunk by chunk.

use crate::DType;
use half::{bf16, f16};

/// Decodes little-endian elements of `dtype` from `bytes` and appends them to `out`.
/// `bytes` must hold whole elements.
pub fn decode_f64(dtype: DType, bytes: &[u8], out: &mut Vec<f64>) {
    let n = bytes.len() / dtype.size();
    out.reserve(n);
    macro_rules! each {
        ($w:literal, $f:expr) => {
            for c in bytes.chunks_exact($w) {
                let a: [u8; $w] = c.try_into().unwrap();
                out.push($f(a));
            }
        };
    }
    match dtype {
        DType::BOOL | DType::U8 => out.extend(bytes.iter().map(|&b| b as f64)),
        DType::I8 => out.extend(bytes.iter().map(|&b| b as i8 as f64)),
        DType::F8_E4M3 => out.extend(bytes.iter().map(|&b| f8_e4m3_to_f64(b))),
        DType::F8_E5M2 => out.extend(bytes.iter().map(|&b| f8_e5m2_to_f64(b))),
        DType::U16 => each!(2, |a| u16::from_le_bytes(a) as f64),
        DType::I16 => each!(2, |a| i16::from_le_bytes(a) as f64),
        DType::F16 => each!(2, |a| f16::from_le_bytes(a).to_f64()),
        DType::BF16 => each!(2, |a| bf16::from_le_bytes(a).to_f64()),
        DType::U32 => each!(4, |a| u32::from_le_bytes(a) as f64),
        DType::I32 => each!(4, |a| i32::from_le_bytes(a) as f64),
        DType::F32 => each!(4, |a| f32::from_le_bytes(a) as f64),
        DType::U64 => each!(8, |a| u64::from_le_bytes(a) as f64),
        DType::I64 => each!(8, |a| i64::from_le_bytes(a) as f64),
        DType::F64 => each!(8, f64::from_le_bytes),
    }
}

/// OCP FP8 E4M3 ("fn": no infinities, 0x7f/0xff are NaN).
pub fn f8_e4m3_to_f64(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 0x7) as f64;
    if e == 0xf && (b & 0x7) == 0x7 {
        return f64::NAN;
    }
    let v = if e == 0 {
        m / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    };
    sign * v
}

/// OCP FP8 E5M2 (IEEE-like, with infinities).
pub fn f8_e5m2_to_f64(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 2) & 0x1f) as i32;
    let m = (b & 0x3) as f64;
    let v = match e {
        0 => m / 4.0 * 2f64.powi(-14),
        0x1f if m == 0.0 => f64::INFINITY,
        0x1f => return f64::NAN,
        _ => (1.0 + m / 4.0) * 2f64.powi(e - 15),
    };
    sign * v
}

/// Largest |a - b| over two equally long tensors, streaming in chunks (no full decode).
/// NaN in the same position on both sides counts as equal; NaN on one side gives infinity.
pub fn max_abs_diff(da: DType, a: &[u8], db: DType, b: &[u8]) -> f64 {
    const CHUNK: usize = 1 << 16;
    let (sa, sb) = (da.size(), db.size());
    let n = (a.len() / sa).min(b.len() / sb);
    let (mut va, mut vb) = (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
    let mut worst = 0f64;
    let mut i = 0;
    while i < n {
        let k = CHUNK.min(n - i);
        va.clear();
        vb.clear();
        decode_f64(da, &a[i * sa..(i + k) * sa], &mut va);
        decode_f64(db, &b[i * sb..(i + k) * sb], &mut vb);
        for (x, y) in va.iter().zip(&vb) {
            let d = if x.is_nan() || y.is_nan() {
                if x.is_nan() && y.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else if x == y {
                0.0 // equal infinities
            } else {
                (x - y).abs()
            };
            if d > worst || d.is_nan() {
                worst = d;
            }
        }
        i += k;
    }
    worst
}

/// Converts `src` (elements of `from`) into `dst` (elements of `to`), both float dtypes among
/// f32, f16, bf16 and f64, rounding to nearest even; f16/bf16/f32 widen to f32 exactly and f64
/// is narrowed in one rounding step. Equal dtypes copy. Panics on other dtypes or on lengths
/// that disagree (callers check both).
pub fn cast(from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
    assert_eq!(
        src.len() / from.size(),
        dst.len() / to.size(),
        "cast: lengths"
    );
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    if from == DType::F64 {
        let vals = src
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()));
        match to {
            DType::F32 => write(dst, vals.map(|v| (v as f32).to_le_bytes())),
            DType::F16 => write(dst, vals.map(|v| f16::from_f64(v).to_le_bytes())),
            DType::BF16 => write(dst, vals.map(|v| bf16::from_f64(v).to_le_bytes())),
            _ => unreachable!("cast from {from}"),
        }
        return;
    }
    let widen: fn(&[u8]) -> f32 = match from {
        DType::F32 => |c| f32::from_le_bytes(c.try_into().unwrap()),
        DType::F16 => |c| f16::from_le_bytes(c.try_into().unwrap()).to_f32(),
        DType::BF16 => |c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32(),
        _ => unreachable!("cast from {from}"),
    };
    let vals = src.chunks_exact(from.size()).map(widen);
    match to {
        DType::F32 => write(dst, vals.map(f32::to_le_bytes)),
        DType::F16 => write(dst, vals.map(|v| f16::from_f32(v).to_le_bytes())),
        DType::BF16 => write(dst, vals.map(|v| bf16::from_f32(v).to_le_bytes())),
        DType::F64 => write(dst, vals.map(|v| (v as f64).to_le_bytes())),
        _ => unreachable!("cast to {to}"),
    }
}

fn write<const N: usize>(dst: &mut [u8], vals: impl Iterator<Item = [u8; N]>) {
    for (d, v) in dst.chunks_exact_mut(N).zip(vals) {
        d.copy_from_slice(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_reference_values() {
        assert_eq!(f8_e4m3_to_f64(0x38), 1.0); // e=7, m=0
        assert_eq!(f8_e4m3_to_f64(0x7e), 448.0); // largest finite
        assert!(f8_e4m3_to_f64(0x7f).is_nan());
        assert_eq!(f8_e4m3_to_f64(0x01), 2f64.powi(-9)); // smallest subnormal
        assert_eq!(f8_e5m2_to_f64(0x3c), 1.0);
        assert_eq!(f8_e5m2_to_f64(0x7b), 57344.0);
        assert_eq!(f8_e5m2_to_f64(0x7c), f64::INFINITY);
        assert_eq!(f8_e5m2_to_f64(0xbc), -1.0);
    }

    #[test]
    fn diff_across_dtypes() {
        let a: Vec<u8> = [1.0f32, 2.5, -3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [1.0f32, 2.5, -3.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(max_abs_diff(DType::F32, &a, DType::BF16, &b), 0.0);
        let c: Vec<u8> = [1.0f32, 2.0, -3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(max_abs_diff(DType::F32, &a, DType::F32, &c), 0.5);
    }
}

//! The GGUF container (version 3, as llama.cpp's `gguf` reads it): a header of typed key/value
//! metadata and tensor descriptors, then the tensors' data, each at an offset aligned to
//! `general.alignment` (32). Little-endian throughout; strings are a u64 length and UTF-8 bytes;
//! a tensor's dimensions are listed innermost first (`ne[0]` is the row length).
//!
//! Written by hand: no maintained Rust crate writes GGUF (the ones on crates.io read it, or
//! drag in all of a runtime), and the format is a page of rules.

/// GGUF's value types, by their codes.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// An array of strings.
    Strs(Vec<String>),
    /// An array of i32.
    I32s(Vec<i32>),
    /// An array of f32.
    F32s(Vec<f32>),
}

const U32: u32 = 4;
const I32: u32 = 5;
const F32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// The tensor types bridgeflow writes, by their `ggml_type` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Bf16 = 30,
}

impl GgmlType {
    /// Bytes of `n` elements (Q8_0: blocks of 32, each an f16 scale and 32 i8; `n` a multiple
    /// of 32).
    pub fn bytes(self, n: u64) -> u64 {
        match self {
            GgmlType::F32 => n * 4,
            GgmlType::F16 | GgmlType::Bf16 => n * 2,
            GgmlType::Q8_0 => n / 32 * 34,
        }
    }
}

pub const ALIGNMENT: u64 = 32;
const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;

/// A tensor's descriptor: name, shape as PyTorch writes it (outermost first), type, and its
/// offset in the data section.
#[derive(Debug, Clone)]
pub struct TensorDesc {
    pub name: String,
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
}

impl TensorDesc {
    pub fn bytes(&self) -> u64 {
        self.ty.bytes(self.shape.iter().product())
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn value(out: &mut Vec<u8>, v: &Value) {
    let array = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend(ARRAY.to_le_bytes());
        out.extend(ty.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
    };
    match v {
        Value::U32(x) => {
            out.extend(U32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Value::I32(x) => {
            out.extend(I32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Value::F32(x) => {
            out.extend(F32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Value::Bool(x) => {
            out.extend(BOOL.to_le_bytes());
            out.push(*x as u8);
        }
        Value::Str(s) => {
            out.extend(STRING.to_le_bytes());
            string(out, s);
        }
        Value::Strs(v) => {
            array(out, STRING, v.len());
            v.iter().for_each(|s| string(out, s));
        }
        Value::I32s(v) => {
            array(out, I32, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Value::F32s(v) => {
            array(out, F32, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
    }
}

/// Lays the tensors out one after another, each aligned; returns the data section's size.
pub fn lay_out(tensors: &mut [TensorDesc]) -> u64 {
    let mut at = 0;
    for t in tensors.iter_mut() {
        t.offset = at;
        at = (at + t.bytes()).next_multiple_of(ALIGNMENT);
    }
    at
}

/// The header: magic, version, counts, metadata, tensor descriptors, padded to the alignment
/// (the data section starts right after).
pub fn header(meta: &[(String, Value)], tensors: &[TensorDesc]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(VERSION.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(&mut out, k);
        value(&mut out, v);
    }
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend(d.to_le_bytes());
        }
        out.extend((t.ty as u32).to_le_bytes());
        out.extend(t.offset.to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT as usize), 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_follow_the_spec() {
        let mut t = vec![
            TensorDesc {
                name: "a".into(),
                shape: vec![2, 32],
                ty: GgmlType::Q8_0,
                offset: 0,
            },
            TensorDesc {
                name: "b".into(),
                shape: vec![3],
                ty: GgmlType::F32,
                offset: 0,
            },
        ];
        // 2 rows of one Q8_0 block each = 68 bytes, so b starts at 96.
        assert_eq!(lay_out(&mut t), 96 + 32);
        assert_eq!(t[1].offset, 96);
        let h = header(&[("k".into(), Value::U32(7))], &t);
        assert_eq!(&h[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), 1);
        // key "k": length 1, 'k', type u32 (4), value 7.
        assert_eq!(&h[24..33], &[1, 0, 0, 0, 0, 0, 0, 0, b'k']);
        assert_eq!(&h[33..41], &[4, 0, 0, 0, 7, 0, 0, 0]);
        // tensor "a": dims innermost first (32, then 2), type 8, offset 0.
        let a = 41 + 9;
        assert_eq!(u32::from_le_bytes(h[a..a + 4].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(h[a + 4..a + 12].try_into().unwrap()), 32);
        assert_eq!(u64::from_le_bytes(h[a + 12..a + 20].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(h[a + 20..a + 24].try_into().unwrap()), 8);
        assert_eq!(h.len() % 32, 0);
    }
}

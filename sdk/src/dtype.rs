//! Element types: the safetensors set, with its names.

use abi_stable::StableAbi;
use std::fmt;

/// Element type of a tensor. Names and sizes follow safetensors.
#[allow(non_camel_case_types)] // the safetensors spelling
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    BOOL,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8_E4M3,
    F8_E5M2,
}

impl DType {
    pub const ALL: [DType; 15] = [
        DType::BOOL,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::U32,
        DType::I32,
        DType::U64,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::F8_E4M3,
        DType::F8_E5M2,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::BOOL | DType::U8 | DType::I8 | DType::F8_E4M3 | DType::F8_E5M2 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The safetensors name (`"BF16"`, `"F8_E4M3"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::BOOL => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::U16 => "U16",
            DType::I16 => "I16",
            DType::U32 => "U32",
            DType::I32 => "I32",
            DType::U64 => "U64",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E5M2 => "F8_E5M2",
        }
    }

    /// Parses a safetensors name or a common alias (`bf16`, `bfloat16`, `float32`, `fp16`...).
    pub fn parse(s: &str) -> Option<DType> {
        let lower = s.trim().to_ascii_lowercase();
        let alias = match lower.as_str() {
            "bool" => DType::BOOL,
            "u8" | "uint8" => DType::U8,
            "i8" | "int8" => DType::I8,
            "u16" | "uint16" => DType::U16,
            "i16" | "int16" => DType::I16,
            "u32" | "uint32" => DType::U32,
            "i32" | "int32" => DType::I32,
            "u64" | "uint64" => DType::U64,
            "i64" | "int64" => DType::I64,
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "f32" | "fp32" | "float32" | "float" => DType::F32,
            "f64" | "fp64" | "float64" | "double" => DType::F64,
            "f8_e4m3" | "float8_e4m3fn" | "fp8_e4m3" => DType::F8_E4M3,
            "f8_e5m2" | "float8_e5m2" | "fp8_e5m2" => DType::F8_E5M2,
            _ => return None,
        };
        Some(alias)
    }

    /// The name `torch_dtype` / `dtype` uses in an HF `config.json`.
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::BOOL => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::U32 => "uint32",
            DType::I32 => "int32",
            DType::U64 => "uint64",
            DType::I64 => "int64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F8_E4M3 => "float8_e4m3fn",
            DType::F8_E5M2 => "float8_e5m2",
        }
    }

    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8_E4M3 | DType::F8_E5M2
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.name()), Some(d));
            assert_eq!(DType::parse(d.torch_name()), Some(d));
        }
        assert_eq!(DType::parse("complex64"), None);
    }
}

//! safetensors' dtype ⇄ the SDK's.

use bridgeflow_sdk::DType;
use safetensors::Dtype;

pub fn from_st(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::BOOL => DType::BOOL,
        Dtype::U8 => DType::U8,
        Dtype::I8 => DType::I8,
        Dtype::U16 => DType::U16,
        Dtype::I16 => DType::I16,
        Dtype::U32 => DType::U32,
        Dtype::I32 => DType::I32,
        Dtype::U64 => DType::U64,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E4M3 => DType::F8_E4M3,
        Dtype::F8_E5M2 => DType::F8_E5M2,
        _ => return None,
    })
}

pub fn to_st(d: DType) -> Dtype {
    match d {
        DType::BOOL => Dtype::BOOL,
        DType::U8 => Dtype::U8,
        DType::I8 => Dtype::I8,
        DType::U16 => Dtype::U16,
        DType::I16 => Dtype::I16,
        DType::U32 => Dtype::U32,
        DType::I32 => Dtype::I32,
        DType::U64 => Dtype::U64,
        DType::I64 => Dtype::I64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F8_E4M3 => Dtype::F8_E4M3,
        DType::F8_E5M2 => Dtype::F8_E5M2,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        for d in bridgeflow_sdk::DType::ALL {
            assert_eq!(super::from_st(super::to_st(d)), Some(d));
        }
    }
}

//! torch's dtype and storage-class names.

use bridgeflow_sdk::DType;

/// `torch.<name>` dtype objects (as in `.metadata`'s TensorProperties).
pub fn from_torch(name: &str) -> Option<DType> {
    Some(match name {
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" | "double" => DType::F64,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::BOOL,
        "float8_e4m3fn" => DType::F8_E4M3,
        "float8_e5m2" => DType::F8_E5M2,
        _ => return None,
    })
}

/// `torch.<X>Storage` classes (as in each item's `data.pkl`).
pub fn from_storage(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::BOOL,
        "Float8_e4m3fnStorage" => DType::F8_E4M3,
        "Float8_e5m2Storage" => DType::F8_E5M2,
        _ => return None,
    })
}

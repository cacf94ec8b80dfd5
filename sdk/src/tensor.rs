//! Tensors: metadata plus a zero-copy [`Buffer`].

use crate::{Buffer, DType, PluginError, Result};
use abi_stable::{
    std_types::{ROption, RString, RVec},
    StableAbi,
};

/// Where a piece sits inside its global tensor (tensor/pipeline/expert parallel shards).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    pub global_shape: RVec<u64>,
    /// Offset of this piece along each axis of the global tensor.
    pub offsets: RVec<u64>,
}

/// Everything about a tensor but its bytes.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: RString,
    pub dtype: DType,
    pub shape: RVec<u64>,
    pub shard: ROption<ShardInfo>,
}

impl TensorInfo {
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[u64]) -> Self {
        TensorInfo {
            name: RString::from(name.into()),
            dtype,
            shape: shape.iter().copied().collect(),
            shard: ROption::RNone,
        }
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Number of elements, or None on overflow (an untrusted header can claim anything).
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    /// Bytes of data, or None on overflow.
    pub fn nbytes(&self) -> Option<u64> {
        self.numel()?.checked_mul(self.dtype.size() as u64)
    }

    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = RString::from(name.into());
        self
    }

    /// Marks this tensor as the piece of `global_shape` at `offsets` (its own shape is the
    /// piece's).
    pub fn with_shard(mut self, global_shape: &[u64], offsets: &[u64]) -> Self {
        self.shard = ROption::RSome(ShardInfo {
            global_shape: global_shape.iter().copied().collect(),
            offsets: offsets.iter().copied().collect(),
        });
        self
    }

    /// The element offset of this piece in its whole tensor when its elements are contiguous
    /// there (0 for a whole tensor); None for a piece that is not one run of elements.
    pub fn piece_offset(&self) -> Option<u64> {
        match self.shard() {
            None => Some(0),
            Some(s)
                if s.global_shape.len() == self.shape.len()
                    && s.offsets.len() == self.shape.len() =>
            {
                contiguous_offset(&s.global_shape, &s.offsets, &self.shape)
            }
            Some(_) => None,
        }
    }

    /// The shard descriptor, if this is a piece of a larger tensor.
    pub fn shard(&self) -> Option<&ShardInfo> {
        self.shard.as_ref().into_option()
    }

    /// The name without a piece suffix (`name#id` names a piece of `name`).
    pub fn base_name(&self) -> &str {
        self.name().split('#').next().unwrap_or_default()
    }

    pub fn shape_string(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// A tensor whose bytes live in a shared buffer (little-endian, row-major).
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct Tensor {
    pub info: TensorInfo,
    pub data: Buffer,
}

impl Tensor {
    /// Checks that the buffer holds exactly `dtype × shape` bytes.
    pub fn new(info: TensorInfo, data: Buffer) -> Result<Self> {
        match info.nbytes() {
            Some(n) if n == data.len() as u64 => Ok(Tensor { info, data }),
            Some(n) => Err(PluginError::shape(format!(
                "tensor '{}': {} {} needs {} bytes, buffer has {}",
                info.name,
                info.dtype,
                info.shape_string(),
                n,
                data.len()
            ))),
            None => Err(PluginError::shape(format!(
                "tensor '{}': shape {} overflows",
                info.name,
                info.shape_string()
            ))),
        }
    }

    pub fn name(&self) -> &str {
        self.info.name.as_str()
    }
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }
}

/// The element offset of a block (`offsets`, `shape`) in a row-major tensor of `global` shape,
/// if the block's elements are contiguous there: size 1 on the axes before its first longer
/// one, whole on every axis after it.
pub fn contiguous_offset(global: &[u64], offsets: &[u64], shape: &[u64]) -> Option<u64> {
    let n = global.len();
    let k = (0..n).find(|&d| shape[d] != 1).unwrap_or(n);
    if !(k + 1..n).all(|d| shape[d] == global[d] && offsets[d] == 0) {
        return None;
    }
    let (mut off, mut stride) = (0u64, 1u64);
    for d in (0..n).rev() {
        off += offsets[d] * stride;
        stride *= global[d];
    }
    Some(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_checked() {
        let info = TensorInfo::new("w", DType::BF16, &[2, 3]);
        assert!(Tensor::new(info.clone(), Buffer::from_vec(vec![0; 12])).is_ok());
        let e = Tensor::new(info, Buffer::from_vec(vec![0; 11])).unwrap_err();
        assert!(
            e.message.contains("'w'") && e.message.contains("12 bytes"),
            "{e}"
        );
        let huge = TensorInfo::new("h", DType::F64, &[u64::MAX, 2]);
        assert_eq!(huge.nbytes(), None);
    }
}

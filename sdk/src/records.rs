//! Record batches cross the plugin boundary through the Arrow C Data Interface.

use crate::{PluginError, Result};
use abi_stable::StableAbi;
use arrow_array::ffi::{from_ffi, to_ffi, FFI_ArrowArray, FFI_ArrowSchema};
use arrow_array::{Array, RecordBatch, StructArray};

/// An Arrow record batch in C Data Interface form. Its buffers are released by the library
/// that produced them (through the interface's own release callbacks), whoever drops it.
#[repr(C)]
#[derive(StableAbi)]
pub struct RecordBatchFfi {
    #[sabi(unsafe_opaque_field)]
    array: FFI_ArrowArray,
    #[sabi(unsafe_opaque_field)]
    schema: FFI_ArrowSchema,
    rows: u64,
    bytes: u64,
}

// SAFETY: the C Data Interface structs own immutable Arrow buffers, which are thread-safe.
unsafe impl Send for RecordBatchFfi {}
unsafe impl Sync for RecordBatchFfi {}

impl RecordBatchFfi {
    pub fn from_batch(batch: &RecordBatch) -> Result<Self> {
        let rows = batch.num_rows() as u64;
        let bytes = batch.get_array_memory_size() as u64;
        let data = StructArray::from(batch.clone()).into_data();
        let (array, schema) = to_ffi(&data)
            .map_err(|e| PluginError::internal(format!("exporting a record batch: {e}")))?;
        Ok(RecordBatchFfi {
            array,
            schema,
            rows,
            bytes,
        })
    }

    pub fn into_batch(self) -> Result<RecordBatch> {
        // SAFETY: `array` and `schema` were produced by `to_ffi` and are consumed once.
        let data = unsafe { from_ffi(self.array, &self.schema) }
            .map_err(|e| PluginError::format(format!("importing a record batch: {e}")))?;
        let array = StructArray::from(data);
        if array.null_count() > 0 {
            return Err(PluginError::format("record batch with top-level nulls"));
        }
        Ok(RecordBatch::from(array))
    }

    pub fn num_rows(&self) -> u64 {
        self.rows
    }
    /// Memory held by the batch's buffers.
    pub fn memory_bytes(&self) -> u64 {
        self.bytes
    }
}

impl std::fmt::Debug for RecordBatchFfi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordBatchFfi({} rows)", self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int32Array, StringArray};
    use std::sync::Arc;

    #[test]
    fn batch_round_trips_through_c_interface() {
        let batch = RecordBatch::try_from_iter(vec![
            (
                "id",
                Arc::new(Int32Array::from(vec![1, 2, 3])) as arrow_array::ArrayRef,
            ),
            ("text", Arc::new(StringArray::from(vec!["a", "bc", "def"]))),
        ])
        .unwrap();
        let ffi = RecordBatchFfi::from_batch(&batch).unwrap();
        assert_eq!(ffi.num_rows(), 3);
        let back = ffi.into_batch().unwrap();
        assert_eq!(back, batch);
    }
}

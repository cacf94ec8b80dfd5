//! Training samples from record batches: a `tokens` list column (`seq_length + 1` ids per row,
//! as Megatron's GPTDataset yields them) and an optional `loss_mask` list column (`seq_length`
//! values aligned with the labels; default all 1).

use bridgeflow_sdk::arrow_array::{cast::AsArray, types, Array, ArrayRef, RecordBatch};
use bridgeflow_sdk::arrow_schema::DataType;
use bridgeflow_sdk::{PluginError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<f32>,
}

/// Reads every row of `batch`; `first_row` numbers rows across batches for messages.
pub fn samples(
    batch: &RecordBatch,
    seq: usize,
    vocab: usize,
    first_row: u64,
) -> Result<Vec<Sample>> {
    let tokens = batch.column_by_name("tokens").ok_or_else(|| {
        PluginError::shape(
            "the trainer's data has no 'tokens' column (a list of token ids per sample)",
        )
    })?;
    let mask = batch.column_by_name("loss_mask");
    let mut out = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let row = first_row + r as u64;
        let ids = list_row(tokens, r)?;
        let ids = token_ids(&ids, row, vocab)?;
        if ids.len() != seq + 1 {
            return Err(PluginError::shape(format!(
                "sample {row}: {} tokens; seq_length {seq} needs {}",
                ids.len(),
                seq + 1
            )));
        }
        let loss_mask = match mask {
            Some(m) => mask_values(&list_row(m, r)?, row, seq)?,
            None => vec![1.0; seq],
        };
        out.push(Sample {
            tokens: ids,
            loss_mask,
        });
    }
    Ok(out)
}

fn list_row(col: &ArrayRef, r: usize) -> Result<ArrayRef> {
    if col.is_null(r) {
        return Err(PluginError::shape(format!("row {r}: a null list")));
    }
    match col.data_type() {
        DataType::List(_) => Ok(col.as_list::<i32>().value(r)),
        DataType::LargeList(_) => Ok(col.as_list::<i64>().value(r)),
        DataType::FixedSizeList(_, _) => Ok(col.as_fixed_size_list().value(r)),
        other => Err(PluginError::shape(format!(
            "column of type {other}; expected a list per sample"
        ))),
    }
}

fn token_ids(a: &ArrayRef, row: u64, vocab: usize) -> Result<Vec<u32>> {
    let wide: Vec<i64> = match a.data_type() {
        DataType::Int64 => a.as_primitive::<types::Int64Type>().values().to_vec(),
        DataType::Int32 => a
            .as_primitive::<types::Int32Type>()
            .values()
            .iter()
            .map(|&x| x as i64)
            .collect(),
        DataType::UInt32 => a
            .as_primitive::<types::UInt32Type>()
            .values()
            .iter()
            .map(|&x| x as i64)
            .collect(),
        DataType::UInt16 => a
            .as_primitive::<types::UInt16Type>()
            .values()
            .iter()
            .map(|&x| x as i64)
            .collect(),
        other => {
            return Err(PluginError::shape(format!(
                "sample {row}: tokens of type {other}; expected integers"
            )))
        }
    };
    wide.iter()
        .enumerate()
        .map(|(i, &t)| {
            if t < 0 || t as u64 >= vocab as u64 {
                Err(PluginError::shape(format!(
                    "sample {row}, position {i}: token id {t} is outside the model's vocabulary of {vocab}"
                )))
            } else {
                Ok(t as u32)
            }
        })
        .collect()
}

fn mask_values(a: &ArrayRef, row: u64, seq: usize) -> Result<Vec<f32>> {
    let v: Vec<f32> = match a.data_type() {
        DataType::Float32 => a.as_primitive::<types::Float32Type>().values().to_vec(),
        DataType::Float64 => a
            .as_primitive::<types::Float64Type>()
            .values()
            .iter()
            .map(|&x| x as f32)
            .collect(),
        DataType::Int8 => a
            .as_primitive::<types::Int8Type>()
            .values()
            .iter()
            .map(|&x| x as f32)
            .collect(),
        DataType::UInt8 => a
            .as_primitive::<types::UInt8Type>()
            .values()
            .iter()
            .map(|&x| x as f32)
            .collect(),
        DataType::Int64 => a
            .as_primitive::<types::Int64Type>()
            .values()
            .iter()
            .map(|&x| x as f32)
            .collect(),
        DataType::Boolean => {
            let b = a.as_boolean();
            (0..b.len()).map(|i| b.value(i) as u8 as f32).collect()
        }
        other => {
            return Err(PluginError::shape(format!(
                "sample {row}: loss_mask of type {other}; expected numbers or booleans"
            )))
        }
    };
    if v.len() != seq {
        return Err(PluginError::shape(format!(
            "sample {row}: loss_mask has {} values; seq_length is {seq}",
            v.len()
        )));
    }
    if let Some(bad) = v.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return Err(PluginError::shape(format!(
            "sample {row}: loss_mask value {bad}"
        )));
    }
    Ok(v)
}

//! Training samples from record batches, in either of two forms:
//!
//! - GPT samples: a `tokens` list column (`seq_length + 1` ids per row, as Megatron's
//!   GPTDataset yields them) and an optional `loss_mask` list column (`seq_length` values
//!   aligned with the labels; default all 1);
//! - packed SFT rows, as the `sft` writer and Megatron-Bridge's packer store them: `input_ids`,
//!   `loss_mask` and `seq_start_id`. Each row becomes what Bridge's `GPTSFTPackedDataset`
//!   collates: per sub-sequence `[b, e)` the inputs `ids[b..e-1]` and labels `ids[b+1..e]` (the
//!   shift stays inside it), positions restarting at 0, attention confined to it; padded with
//!   EOS to `seq_length` (the padding its own sequence, out of the loss); the loss mask is the
//!   stored one (answer-only) or 1 but at EOS inputs, and 0 wherever the input is EOS.

use bridgeflow_sdk::arrow_array::{cast::AsArray, types, Array, ArrayRef, RecordBatch};
use bridgeflow_sdk::arrow_schema::DataType;
use bridgeflow_sdk::{PluginError, Result};

/// One sample as the model takes it: `seq_length` inputs, labels and loss-mask values.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub labels: Vec<u32>,
    pub loss_mask: Vec<f32>,
    /// Packed rows: each token's position in its sub-sequence, and the sub-sequences'
    /// boundaries (`cu_seqlens`: 0, …, `seq_length`). None: one causal sequence.
    pub packed: Option<(Vec<u32>, Vec<usize>)>,
}

impl Sample {
    /// A GPT sample from `seq_length + 1` token ids.
    pub fn gpt(ids: &[u32], loss_mask: Vec<f32>) -> Sample {
        Sample {
            tokens: ids[..ids.len() - 1].to_vec(),
            labels: ids[1..].to_vec(),
            loss_mask,
            packed: None,
        }
    }
}

/// How packed rows are read (Bridge's `answer_only_loss`, the tokenizer's EOS).
#[derive(Debug, Clone, Copy)]
pub struct Packing {
    pub eos: Option<u32>,
    pub answer_only_loss: bool,
}

/// Reads every row of `batch`; `first_row` numbers rows across batches for messages.
pub fn samples(
    batch: &RecordBatch,
    seq: usize,
    vocab: usize,
    first_row: u64,
    packing: Packing,
) -> Result<Vec<Sample>> {
    if batch.column_by_name("seq_start_id").is_some() {
        return packed_samples(batch, seq, vocab, first_row, packing);
    }
    let tokens = batch.column_by_name("tokens").ok_or_else(|| {
        PluginError::shape(
            "the trainer's data has no 'tokens' column (a list of token ids per sample) and is not packed rows (input_ids, loss_mask, seq_start_id)",
        )
    })?;
    let mask = batch.column_by_name("loss_mask");
    let mut out = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let row = first_row + r as u64;
        let ids = token_ids(&list_row(tokens, r)?, row, vocab)?;
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
        out.push(Sample::gpt(&ids, loss_mask));
    }
    Ok(out)
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| {
        PluginError::shape(format!(
            "packed rows need input_ids, loss_mask and seq_start_id; '{name}' is missing"
        ))
    })
}

fn packed_samples(
    batch: &RecordBatch,
    seq: usize,
    vocab: usize,
    first_row: u64,
    packing: Packing,
) -> Result<Vec<Sample>> {
    let eos = packing.eos.ok_or_else(|| {
        PluginError::config("packed rows pad with EOS and drop it from the loss: set eos_id")
    })?;
    let ids_col = column(batch, "input_ids")?;
    let mask_col = column(batch, "loss_mask")?;
    let starts_col = column(batch, "seq_start_id")?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let row = first_row + r as u64;
        let ids = token_ids(&list_row(ids_col, r)?, row, vocab)?;
        let mask = mask_values(&list_row(mask_col, r)?, row, ids.len())?;
        let starts: Vec<usize> = token_ids(&list_row(starts_col, r)?, row, u32::MAX as usize)?
            .into_iter()
            .map(|s| s as usize)
            .collect();
        out.push(unpack(
            &ids,
            &mask,
            &starts,
            seq,
            eos,
            packing.answer_only_loss,
            row,
        )?);
    }
    Ok(out)
}

/// One packed row as Bridge's `GPTSFTPackedDataset.collate_fn` builds it (see the module docs).
pub fn unpack(
    ids: &[u32],
    mask: &[f32],
    starts: &[usize],
    seq: usize,
    eos: u32,
    answer_only_loss: bool,
    row: u64,
) -> Result<Sample> {
    let mut bounds = starts.to_vec();
    bounds.push(ids.len());
    if bounds.first() != Some(&0) || bounds.windows(2).any(|w| w[1] <= w[0] + 1) {
        return Err(PluginError::shape(format!(
            "packed row {row}: seq_start_id {starts:?} does not split its {} tokens into sequences of 2 or more",
            ids.len()
        )));
    }
    let (mut tokens, mut labels, mut loss, mut positions) = (vec![], vec![], vec![], vec![]);
    let mut cu = vec![0usize];
    for w in bounds.windows(2) {
        let (b, e) = (w[0], w[1]);
        tokens.extend_from_slice(&ids[b..e - 1]);
        labels.extend_from_slice(&ids[b + 1..e]);
        if answer_only_loss {
            loss.extend_from_slice(&mask[b..e - 1]);
        } else {
            loss.extend(
                ids[b..e - 1]
                    .iter()
                    .map(|&t| if t == eos { 0.0 } else { 1.0 }),
            );
        }
        positions.extend(0..(e - 1 - b) as u32);
        cu.push(tokens.len());
    }
    if tokens.len() > seq {
        return Err(PluginError::shape(format!(
            "packed row {row}: {} tokens after the shift; seq_length is {seq}",
            tokens.len()
        )));
    }
    if tokens.len() < seq {
        cu.push(seq);
    }
    tokens.resize(seq, eos);
    labels.resize(seq, eos);
    loss.resize(seq, 0.0);
    positions.resize(seq, 0);
    for (m, &t) in loss.iter_mut().zip(&tokens) {
        if t == eos {
            *m = 0.0;
        }
    }
    Ok(Sample {
        tokens,
        labels,
        loss_mask: loss,
        packed: Some((positions, cu)),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sub-sequences of 4 and 3 tokens in a row padded to 8: the shift inside each,
    /// positions restarting, the padding its own sequence, EOS out of the loss.
    #[test]
    fn packed_rows_unpack_as_bridge_collates() {
        let eos = 2;
        let ids = [10, 11, 12, 2, 20, 21, 22];
        let mask = [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        let s = unpack(&ids, &mask, &[0, 4], 8, eos, true, 0).unwrap();
        assert_eq!(s.tokens, [10, 11, 12, 20, 21, 2, 2, 2]);
        assert_eq!(s.labels, [11, 12, 2, 21, 22, 2, 2, 2]);
        assert_eq!(s.loss_mask, [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        let (pos, cu) = s.packed.unwrap();
        assert_eq!(pos, [0, 1, 2, 0, 1, 0, 0, 0]);
        assert_eq!(cu, [0, 3, 5, 8]);
        // Not answer-only: 1 except where the input is EOS.
        let s = unpack(&ids, &mask, &[0, 4], 8, eos, false, 0).unwrap();
        assert_eq!(s.loss_mask, [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        assert!(unpack(&ids, &mask, &[0, 4], 4, eos, true, 7).is_err());
        assert!(unpack(&ids, &mask, &[1, 4], 8, eos, true, 7).is_err());
    }
}

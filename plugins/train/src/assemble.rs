//! The initial weights as they stream in: whole tensors or pieces (`name#id` with a shard
//! descriptor: a box of the global tensor), decoded to fp32 and placed, until every parameter
//! the model needs is complete.

use bridgeflow_sdk::numeric::decode_f64;
use bridgeflow_sdk::{DType, PluginError, Result, Tensor};
use std::collections::BTreeMap;

pub struct Pending {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub values: Vec<f32>,
    filled: usize,
}

#[derive(Default)]
pub struct Assembler {
    pub pending: BTreeMap<String, Pending>,
    complete: usize,
}

impl Assembler {
    /// Expects each `(name, shape)`.
    pub fn new(expected: &[(String, Vec<usize>)]) -> Assembler {
        let pending = expected
            .iter()
            .map(|(n, s)| {
                let len = s.iter().product();
                (
                    n.clone(),
                    Pending {
                        shape: s.clone(),
                        dtype: DType::F32,
                        values: vec![0.0; len],
                        filled: 0,
                    },
                )
            })
            .collect();
        Assembler {
            pending,
            complete: 0,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.complete == self.pending.len()
    }

    /// Places `t` (whole or a piece) into its parameter.
    pub fn add(&mut self, t: &Tensor) -> Result<()> {
        let name = t.info.base_name().to_string();
        let p = self.pending.get_mut(&name).ok_or_else(|| {
            PluginError::shape(format!(
                "'{name}' is not a parameter of the model being trained"
            ))
        })?;
        let local: Vec<usize> = t.info.shape.iter().map(|&d| d as usize).collect();
        let offsets: Vec<usize> = match t.info.shard() {
            Some(s) => {
                let global: Vec<usize> = s.global_shape.iter().map(|&d| d as usize).collect();
                if global != p.shape {
                    return Err(PluginError::shape(format!(
                        "'{name}' is {global:?}; the model config says {:?}",
                        p.shape
                    )));
                }
                s.offsets.iter().map(|&o| o as usize).collect()
            }
            None if local == p.shape => vec![0; local.len()],
            None => {
                return Err(PluginError::shape(format!(
                    "'{name}' is {local:?}; the model config says {:?}",
                    p.shape
                )))
            }
        };
        if !in_bounds(&local, &offsets, &p.shape) {
            return Err(PluginError::shape(format!(
                "'{}': a piece {local:?} at {offsets:?} outside {:?}",
                t.name(),
                p.shape
            )));
        }
        let mut wide = Vec::new();
        decode_f64(t.info.dtype, t.bytes(), &mut wide);
        place(&mut p.values, &p.shape, &local, &offsets, &wide);
        p.dtype = t.info.dtype;
        let before = p.filled == p.values.len();
        p.filled += wide.len();
        if p.filled > p.values.len() {
            return Err(PluginError::shape(format!(
                "'{name}': more data than its shape holds"
            )));
        }
        if !before && p.filled == p.values.len() {
            self.complete += 1;
        }
        Ok(())
    }

    /// The parameters not (fully) received.
    pub fn missing(&self) -> Vec<&str> {
        self.pending
            .iter()
            .filter(|(_, p)| p.filled < p.values.len())
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

fn in_bounds(local: &[usize], offsets: &[usize], global: &[usize]) -> bool {
    local.len() == global.len()
        && offsets.len() == global.len()
        && (0..global.len()).all(|i| {
            offsets[i]
                .checked_add(local[i])
                .is_some_and(|e| e <= global[i])
        })
}

/// Copies a row-major box `src` of shape `local` to `offsets` in the row-major `dst` of shape
/// `global`, a contiguous run of its last axis at a time.
fn place(dst: &mut [f32], global: &[usize], local: &[usize], offsets: &[usize], src: &[f64]) {
    let n = global.len();
    if n == 0 {
        if let (Some(d), Some(s)) = (dst.first_mut(), src.first()) {
            *d = *s as f32;
        }
        return;
    }
    let run = local[n - 1];
    let runs = src.len().checked_div(run).unwrap_or(0);
    let mut idx = vec![0usize; n - 1];
    for r in 0..runs {
        let mut at = 0;
        for a in 0..n - 1 {
            at = at * global[a] + offsets[a] + idx[a];
        }
        at = at * global[n - 1] + offsets[n - 1];
        for (d, s) in dst[at..at + run]
            .iter_mut()
            .zip(&src[r * run..(r + 1) * run])
        {
            *d = *s as f32;
        }
        for a in (0..n - 1).rev() {
            idx[a] += 1;
            if idx[a] < local[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// A whole tensor's values as f32.
pub fn decode(t: &Tensor) -> Result<Vec<f32>> {
    if t.info.shard().is_some() {
        return Err(PluginError::shape(format!(
            "'{}': a piece where a whole tensor is expected",
            t.name()
        )));
    }
    let mut wide = Vec::new();
    decode_f64(t.info.dtype, t.bytes(), &mut wide);
    Ok(wide.into_iter().map(|v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_land_in_their_box() {
        let mut dst = vec![0.0f32; 12];
        // Rows 1..3 of a [3, 4] tensor, then the top-left [1, 2] box.
        place(
            &mut dst,
            &[3, 4],
            &[2, 4],
            &[1, 0],
            &(1..=8).map(f64::from).collect::<Vec<_>>(),
        );
        place(&mut dst, &[3, 4], &[1, 2], &[0, 1], &[9.0, 10.0]);
        assert_eq!(
            dst,
            [0.0, 9.0, 10.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        );
        assert!(!in_bounds(&[2, 4], &[2, 0], &[3, 4]));
    }
}

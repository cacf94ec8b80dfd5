//! How Megatron-Core splits a GPT model's tensors over tensor-parallel ranks, by name (TE or
//! local spec, per layer or stacked): column-parallel (axis 0), row-parallel (axis 1), SwiGLU's
//! [gate; up] halves, or replicated; each rank's share as byte runs or boxes, and the inverse —
//! the global shape a rank's local tensor is a share of.

use bridgeflow_sdk::{PluginError, Result};

/// How one tensor is divided among tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpSplit {
    /// Every rank holds all of it (norms, routers, row-parallel biases).
    Replicated,
    /// Split in equal contiguous parts along this axis (column-parallel: 0; row-parallel: 1;
    /// vocabulary-parallel embeddings: 0).
    Axis(usize),
    /// SwiGLU `linear_fc1` ([gate; up] by rows): each rank holds its part of gate, then its
    /// part of up.
    GatedRows,
}

impl TpSplit {
    /// The axis the ranks divide, if any.
    pub fn axis(self) -> Option<usize> {
        match self {
            TpSplit::Replicated => None,
            TpSplit::Axis(a) => Some(a),
            TpSplit::GatedRows => Some(0),
        }
    }
}

/// Refuses a TP degree the attention cannot be split by: megatron-core gives each rank whole
/// query groups (`model`: the Megatron model fields, when known).
pub fn check_tp(model: Option<&serde_json::Value>, tp: u64) -> Result<()> {
    let groups = model
        .and_then(|m| {
            m.get("num_query_groups")
                .or_else(|| m.get("num_attention_heads"))
        })
        .and_then(|v| v.as_u64());
    match groups {
        Some(g) if tp > 1 && g % tp != 0 => Err(PluginError::config(format!(
            "{g} query groups do not divide over {tp} tensor-parallel ranks"
        ))),
        _ => Ok(()),
    }
}

/// The tensor-parallel split of a Megatron GPT tensor; `gated`: SwiGLU MLPs (`linear_fc1` is
/// [gate; up]).
pub fn tp_split(name: &str, gated: bool) -> TpSplit {
    let column = [
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "self_attention.linear_q_proj.weight",
        "self_attention.linear_q_up_proj.weight",
        "self_attention.linear_kv_up_proj.weight",
    ];
    let row = [
        "self_attention.linear_proj.weight",
        "mlp.linear_fc2.weight",
        "shared_experts.linear_fc2.weight",
        "experts.linear_fc2.weight",
    ];
    if column.iter().any(|c| name.ends_with(c)) {
        return TpSplit::Axis(0);
    }
    if row.iter().any(|c| name.ends_with(c)) {
        return TpSplit::Axis(1);
    }
    if name.ends_with("linear_fc1.weight") || name.ends_with("linear_fc1.bias") {
        return if gated {
            TpSplit::GatedRows
        } else {
            TpSplit::Axis(0)
        };
    }
    TpSplit::Replicated
}

/// Rank `r`'s share of a tensor of `shape` under `split` with `tp` ranks: runs of (global
/// byte offset, length), in the order the rank stores them. `es`: bytes per element.
pub fn tp_runs(shape: &[u64], es: u64, split: TpSplit, tp: u64, r: u64) -> Result<Vec<(u64, u64)>> {
    let check = |axis: usize, n: u64| -> Result<u64> {
        if !n.is_multiple_of(tp) {
            return Err(PluginError::shape(format!(
                "axis {axis} of {shape:?} ({n}) does not divide over {tp} tensor-parallel ranks"
            )));
        }
        Ok(n / tp)
    };
    let numel: u64 = shape.iter().product();
    Ok(match split {
        TpSplit::Replicated => vec![(0, numel * es)],
        TpSplit::Axis(axis) => {
            let part = check(axis, shape[axis])?;
            // Blocks: everything before `axis` repeats; within each, rank r's part of the axis.
            let inner: u64 = shape[axis + 1..].iter().product::<u64>() * es;
            let outer: u64 = shape[..axis].iter().product();
            (0..outer)
                .map(|o| (o * shape[axis] * inner + r * part * inner, part * inner))
                .collect()
        }
        TpSplit::GatedRows => {
            let half = shape[0] / 2;
            let part = check(0, half)?;
            let row: u64 = shape[1..].iter().product::<u64>() * es;
            vec![
                (r * part * row, part * row),
                ((half + r * part) * row, part * row),
            ]
        }
    })
}

/// The global shape of a rank-local one under `split` (the inverse of [`tp_local_shape`]):
/// None when the shape has no such axis or the global size overflows.
pub fn tp_global_shape(local: &[u64], split: TpSplit, tp: u64) -> Option<Vec<u64>> {
    let mut s = local.to_vec();
    if let Some(a) = split.axis() {
        let d = s.get_mut(a)?;
        *d = d.checked_mul(tp)?;
    }
    Some(s)
}

/// The shape rank-local under `split`.
pub fn tp_local_shape(shape: &[u64], split: TpSplit, tp: u64) -> Vec<u64> {
    let mut s = shape.to_vec();
    match split {
        TpSplit::Replicated => {}
        TpSplit::Axis(a) => s[a] /= tp,
        TpSplit::GatedRows => s[0] /= tp,
    }
    s
}

/// Rank `r`'s part of a tensor of `shape` under `split` with `tp` ranks, as boxes (offsets,
/// shape): one for an axis split, two for SwiGLU (its gate rows, its up rows), the whole for
/// rank 0 of a replicated tensor (none for the other ranks: the main replica is written once).
pub fn tp_boxes(shape: &[u64], split: TpSplit, tp: u64, r: u64) -> Vec<(Vec<u64>, Vec<u64>)> {
    let zero = vec![0u64; shape.len()];
    match split {
        TpSplit::Replicated => {
            if r == 0 {
                vec![(zero, shape.to_vec())]
            } else {
                Vec::new()
            }
        }
        TpSplit::Axis(a) => {
            let part = shape[a] / tp;
            let (mut o, mut s) = (zero, shape.to_vec());
            o[a] = r * part;
            s[a] = part;
            vec![(o, s)]
        }
        TpSplit::GatedRows => {
            let half = shape[0] / 2;
            let part = half / tp;
            [r * part, half + r * part]
                .into_iter()
                .map(|start| {
                    let (mut o, mut s) = (zero.clone(), shape.to_vec());
                    o[0] = start;
                    s[0] = part;
                    (o, s)
                })
                .collect()
        }
    }
}

/// Why a rank-local shape has no global one under a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsplittable {
    /// The split's axis is not among the shape's.
    NoAxis(usize),
    /// The global size overflows.
    Overflow,
}

/// The global shape a rank-local one of `local` is a share of under `split` with `degree`
/// ranks ([`tp_global_shape`], saying why not).
pub fn global_shape_of(
    local: &[u64],
    split: TpSplit,
    degree: u64,
) -> std::result::Result<Vec<u64>, Unsplittable> {
    if let Some(a) = split.axis().filter(|&a| a >= local.len()) {
        return Err(Unsplittable::NoAxis(a));
    }
    tp_global_shape(local, split, degree).ok_or(Unsplittable::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_shapes_invert_local_ones() {
        for (shape, split) in [
            (vec![8, 6], TpSplit::Axis(0)),
            (vec![8, 6], TpSplit::Axis(1)),
            (vec![8, 6], TpSplit::GatedRows),
            (vec![8], TpSplit::Replicated),
        ] {
            let local = tp_local_shape(&shape, split, 2);
            assert_eq!(tp_global_shape(&local, split, 2), Some(shape.clone()));
            assert_eq!(global_shape_of(&local, split, 2), Ok(shape));
        }
        assert_eq!(tp_global_shape(&[4], TpSplit::Axis(1), 2), None);
        assert_eq!(tp_global_shape(&[u64::MAX], TpSplit::Axis(0), 2), None);
        assert_eq!(
            global_shape_of(&[4], TpSplit::Axis(1), 2),
            Err(Unsplittable::NoAxis(1))
        );
        assert_eq!(
            global_shape_of(&[u64::MAX], TpSplit::Axis(0), 2),
            Err(Unsplittable::Overflow)
        );
    }

    #[test]
    fn tp_runs_cover_each_tensor_once() {
        // A [4, 6] tensor of bytes 0..24: column split, row split, gated rows.
        let t: Vec<u8> = (0..24).collect();
        let gather = |split, r| -> Vec<u8> {
            tp_runs(&[4, 6], 1, split, 2, r)
                .unwrap()
                .into_iter()
                .flat_map(|(o, n)| t[o as usize..(o + n) as usize].to_vec())
                .collect()
        };
        assert_eq!(gather(TpSplit::Axis(0), 1), (12..24).collect::<Vec<u8>>());
        assert_eq!(
            gather(TpSplit::Axis(1), 0),
            vec![0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20]
        );
        // gate rows 0-1, up rows 2-3: rank 1 holds gate row 1 and up row 3.
        assert_eq!(
            gather(TpSplit::GatedRows, 1),
            (6..12).chain(18..24).collect::<Vec<u8>>()
        );
        assert!(tp_runs(&[5, 6], 1, TpSplit::Axis(0), 2, 0).is_err());
        assert_eq!(
            tp_split("decoder.layers.3.mlp.linear_fc1.weight", true),
            TpSplit::GatedRows
        );
        assert_eq!(
            tp_split("decoder.layers.3.mlp.linear_fc1.weight", false),
            TpSplit::Axis(0)
        );
        assert_eq!(
            tp_split("decoder.layers.3.self_attention.linear_proj.weight", true),
            TpSplit::Axis(1)
        );
        assert_eq!(
            tp_split("decoder.layers.3.input_layernorm.weight", true),
            TpSplit::Replicated
        );
        assert_eq!(
            tp_split(crate::names::WORD_EMBEDDINGS, true),
            TpSplit::Axis(0)
        );
    }

    #[test]
    fn boxes() {
        // SwiGLU [8, 3] over 2 ranks: rank 1 holds gate rows 2-3 and up rows 6-7.
        assert_eq!(
            tp_boxes(&[8, 3], TpSplit::GatedRows, 2, 1),
            vec![(vec![2, 0], vec![2, 3]), (vec![6, 0], vec![2, 3])]
        );
        assert!(tp_boxes(&[8, 3], TpSplit::Replicated, 2, 1).is_empty());
        assert_eq!(
            tp_boxes(&[8, 3], TpSplit::Axis(1), 3, 2),
            vec![(vec![0, 2], vec![8, 1])]
        );
    }

    #[test]
    fn query_groups_bound_tp() {
        let m = serde_json::json!({"num_attention_heads": 8, "num_query_groups": 2});
        check_tp(Some(&m), 2).unwrap();
        check_tp(None, 3).unwrap();
        let e = check_tp(Some(&m), 4).unwrap_err();
        assert!(
            e.message.contains("2 query groups do not divide over 4"),
            "{e}"
        );
    }
}

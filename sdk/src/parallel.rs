//! How Megatron-Core splits a GPT model's tensors over tensor-parallel ranks and its layers over
//! pipeline stages — the facts a sharder or a per-rank checkpoint format needs. Names are
//! Megatron-Core's (TE or local spec), per layer (`decoder.layers.<l>.…`).

use crate::{PluginError, Result};

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

/// The largest parallel degree (TP, PP, EP, virtual pipeline chunks) and the most ranks
/// accepted: beyond any cluster, and small enough that nothing sized from it can exhaust memory.
pub const MAX_DEGREE: u64 = 1 << 16;

/// Refuses a parallel degree outside 1..=[`MAX_DEGREE`], naming the option (`tp`, `--pp`, ...).
pub fn check_degree(option: &str, value: u64) -> Result<()> {
    if !(1..=MAX_DEGREE).contains(&value) {
        return Err(PluginError::config(format!(
            "{option} = {value}: a parallel degree is from 1 to {MAX_DEGREE}"
        )));
    }
    Ok(())
}

/// Refuses degrees whose product (ranks, or stages × virtual chunks) exceeds [`MAX_DEGREE`];
/// `what` names them (`tp × pp`).
pub fn check_product(what: &str, degrees: &[u64]) -> Result<u64> {
    let n = degrees
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_DEGREE)
        .ok_or_else(|| {
            PluginError::config(format!(
                "{what} = {}: more than {MAX_DEGREE} ranks",
                degrees
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" × ")
            ))
        })?;
    Ok(n)
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

/// The first layer of each pipeline stage and the layer count of each: an even split, or
/// `first`/`last` layers on the first/last stage and the rest even (Megatron's
/// `num_layers_in_first_pipeline_stage` / `_last_`).
pub fn pp_layers(
    layers: u64,
    pp: u64,
    first: Option<u64>,
    last: Option<u64>,
) -> Result<Vec<(u64, u64)>> {
    let pp = pp.max(1);
    if pp > MAX_DEGREE {
        return Err(PluginError::config(format!(
            "{pp} pipeline stages: at most {MAX_DEGREE}"
        )));
    }
    let mut counts = vec![0u64; pp as usize];
    let (mut rest, mut lo, mut hi) = (layers, 0usize, pp as usize);
    if let Some(f) = first.filter(|_| pp > 1) {
        counts[0] = f;
        rest = rest
            .checked_sub(f)
            .ok_or_else(|| PluginError::config("first stage has more layers than the model"))?;
        lo = 1;
    }
    if let Some(l) = last.filter(|_| pp > 1) {
        counts[pp as usize - 1] = l;
        rest = rest
            .checked_sub(l)
            .ok_or_else(|| PluginError::config("last stage has more layers than the model"))?;
        hi -= 1;
    }
    let middle = (hi - lo) as u64;
    if middle == 0 && rest != 0 || middle > 0 && rest % middle != 0 {
        return Err(PluginError::config(format!(
            "{layers} layers do not divide evenly over {pp} pipeline stages"
        )));
    }
    if layers > 0 && middle > 0 && rest < middle {
        return Err(PluginError::config(format!(
            "{pp} pipeline stages for {layers} layers: {} of them would hold no layer",
            middle - rest
        )));
    }
    for c in &mut counts[lo..hi] {
        *c = rest / middle.max(1);
    }
    let mut start = 0;
    Ok(counts
        .into_iter()
        .map(|c| {
            let s = start;
            start += c;
            (s, c)
        })
        .collect())
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

/// The intersection of two boxes (offsets, shape), if not empty.
pub fn box_intersection(a: (&[u64], &[u64]), b: (&[u64], &[u64])) -> Option<(Vec<u64>, Vec<u64>)> {
    let n = a.0.len();
    let lo: Vec<u64> = (0..n).map(|d| a.0[d].max(b.0[d])).collect();
    let hi: Vec<u64> = (0..n)
        .map(|d| (a.0[d] + a.1[d]).min(b.0[d] + b.1[d]))
        .collect();
    (0..n)
        .all(|d| lo[d] < hi[d])
        .then(|| (lo.clone(), (0..n).map(|d| hi[d] - lo[d]).collect()))
}

/// The byte runs, in row-major order, of the box (`offsets`, `shape`) inside a row-major
/// tensor of `outer` shape with `es`-byte elements (adjacent runs merged).
pub fn box_runs(outer: &[u64], es: u64, offsets: &[u64], shape: &[u64]) -> Vec<(u64, u64)> {
    let n = outer.len();
    if n == 0 {
        return vec![(0, es)];
    }
    let mut stride = vec![es; n];
    for d in (0..n - 1).rev() {
        stride[d] = stride[d + 1] * outer[d + 1];
    }
    let row = shape[n - 1] * es;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut idx = vec![0u64; n - 1];
    loop {
        let at: u64 = (0..n)
            .map(|d| (offsets[d] + if d < n - 1 { idx[d] } else { 0 }) * stride[d])
            .sum();
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == at => last.1 += row,
            _ => runs.push((at, row)),
        }
        // Odometer over every axis but the last.
        let mut d = n - 1;
        loop {
            if d == 0 {
                return runs;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
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
            assert_eq!(tp_global_shape(&local, split, 2), Some(shape));
        }
        assert_eq!(tp_global_shape(&[4], TpSplit::Axis(1), 2), None);
        assert_eq!(tp_global_shape(&[u64::MAX], TpSplit::Axis(0), 2), None);
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
            tp_split("decoder.layers.3.self_attention.linear_proj.weight", true),
            TpSplit::Axis(1)
        );
        assert_eq!(
            tp_split("decoder.layers.3.input_layernorm.weight", true),
            TpSplit::Replicated
        );
    }

    #[test]
    fn boxes_and_runs() {
        // SwiGLU [8, 3] over 2 ranks: rank 1 holds gate rows 2-3 and up rows 6-7.
        assert_eq!(
            tp_boxes(&[8, 3], TpSplit::GatedRows, 2, 1),
            vec![(vec![2, 0], vec![2, 3]), (vec![6, 0], vec![2, 3])]
        );
        assert!(tp_boxes(&[8, 3], TpSplit::Replicated, 2, 1).is_empty());
        assert_eq!(
            box_intersection((&[0, 0], &[4, 3]), (&[2, 0], &[4, 3])),
            Some((vec![2, 0], vec![2, 3]))
        );
        assert_eq!(
            box_intersection((&[0, 0], &[2, 3]), (&[2, 0], &[2, 3])),
            None
        );
        // Rows 1-2 of a [4, 3] tensor of bytes: one merged run; columns 1-2: a run per row.
        assert_eq!(box_runs(&[4, 3], 1, &[1, 0], &[2, 3]), vec![(3, 6)]);
        assert_eq!(box_runs(&[2, 3], 1, &[0, 1], &[2, 2]), vec![(1, 2), (4, 2)]);
    }

    #[test]
    fn pipeline_stages() {
        assert_eq!(pp_layers(8, 2, None, None).unwrap(), vec![(0, 4), (4, 4)]);
        assert_eq!(
            pp_layers(7, 3, Some(1), None).unwrap(),
            vec![(0, 1), (1, 3), (4, 3)]
        );
        assert!(pp_layers(7, 2, None, None).is_err());
        assert_eq!(pp_layers(5, 1, None, None).unwrap(), vec![(0, 5)]);
        // Nothing is sized from an unchecked count.
        let e = pp_layers(8, 1 << 32, None, None).unwrap_err();
        assert!(e.message.contains("at most 65536"), "{e}");
        let e = pp_layers(4, 1000, Some(2), Some(2)).unwrap_err();
        assert!(e.message.contains("would hold no layer"), "{e}");
        assert_eq!(pp_layers(0, 2, None, None).unwrap(), vec![(0, 0), (0, 0)]);
    }

    #[test]
    fn degrees_are_bounded_and_named() {
        check_degree("tp", 1).unwrap();
        check_degree("tp", MAX_DEGREE).unwrap();
        let e = check_degree("tp", 0).unwrap_err();
        assert!(e.message.starts_with("tp = 0: "), "{e}");
        let e = check_degree("vpp", 1 << 32).unwrap_err();
        assert!(e.message.starts_with("vpp = 4294967296: "), "{e}");
        assert_eq!(check_product("tp × pp", &[8, 16]).unwrap(), 128);
        let e = check_product("tp × pp", &[65536, 2]).unwrap_err();
        assert!(e.message.contains("65536 × 2"), "{e}");
        assert!(check_product("x", &[u64::MAX, 2]).is_err());
    }
}

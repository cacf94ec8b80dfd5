//! The machinery the row layouts share ([`Direct`](super::Direct), [`Vocab`](super::Vocab),
//! [`FusedQkv`](super::FusedQkv), [`GatedMlp`](super::GatedMlp)): each says only which rows of
//! the fused Megatron tensor come from which rows of which HF part ([`Rows::segments`]), so both
//! directions move blocks of rows as views of their input. HF → Megatron emits each HF tensor's
//! runs of rows as pieces of the (per-layer) Megatron tensor; Megatron → HF emits each run of a
//! Megatron tensor, or of a stored block of it, as rows of an HF tensor. A row with `{e}` in its
//! HF names has a leading expert axis on the Megatron side, one expert per HF tensor.

use super::{global_shape, hf_name, row_bytes, with_first, Geometry, Group, Parts, Piece, Routes};
use bridgeflow_megatron::mapping::{Entry, Index, RowSegment};
use bridgeflow_sdk::{Buffer, Emitter, PluginError, Result, Tensor, TensorInfo};

/// A layout of rows: the fused tensor's row count and its segments over the HF parts.
pub trait Rows {
    /// Rows of the fused Megatron tensor made of parts with these row counts.
    fn fused_rows(&self, part_rows: &[u64], _cx: &Geometry) -> u64 {
        part_rows.iter().sum()
    }
    /// Each part's row count and the segments in fused order, for a fused tensor of `fused`
    /// rows. Rows of no part (vocabulary padding) belong to no segment.
    fn segments(&self, fused: u64, cx: &Geometry) -> Result<(Vec<u64>, Vec<RowSegment>)>;
}

/// [`Rows::segments`] with the tensor named in an error.
fn segments(
    l: &dyn Rows,
    fused: u64,
    cx: &Geometry,
    name: &str,
) -> Result<(Vec<u64>, Vec<RowSegment>)> {
    l.segments(fused, cx).map_err(|e| e.context(name))
}

fn pieces_need_zero_copy(name: &str) -> PluginError {
    PluginError::config(format!(
        "'{name}' is made of HF tensors that arrive in pieces; whole tensors need them whole (zero_copy = true takes pieces)"
    ))
}

/// HF → Megatron plan: the tensor whole (assembled once its parts are in, or one part as it
/// is), or — zero_copy — every run of every part's rows as a piece, and padding rows as zeros.
pub fn plan_to_megatron(
    l: &dyn Rows,
    g: &Group,
    cx: &Geometry,
    routes: &mut Routes,
) -> Result<Vec<TensorInfo>> {
    let (first, name) = (g.first(), &g.name);
    let part_rows: Vec<u64> = (0..g.entry.hf.len())
        .map(|p| g.parts[&(0, p)].shape.first().copied().unwrap_or(1))
        .collect();
    let inner: Vec<u64> = first.shape.iter().skip(1).copied().collect();
    let fused = l.fused_rows(&part_rows, cx);
    let mut global: Vec<u64> = g.experts.into_iter().collect();
    if !first.shape.is_empty() {
        global.push(fused);
    }
    global.extend(&inner);
    let (_, segs) = segments(l, fused, cx, name)?;
    let whole = g.experts.is_none() && segs.len() == 1 && segs[0].rows == fused;
    let in_pieces = g.parts.values().any(|t| g.blocks_of(t).len() > 1);
    if in_pieces && !cx.zero_copy {
        return Err(pieces_need_zero_copy(name));
    }
    if !in_pieces && (!cx.zero_copy || whole || first.shape.is_empty()) {
        let info = TensorInfo::new(name.clone(), first.dtype, &global);
        routes.whole.insert((g.row, g.layer), info.clone());
        return Ok(vec![info]);
    }
    let mut out = Vec::new();
    // Pieces: every run of every part's rows (cut again where the part itself arrives in
    // blocks), and the padding rows as zeros.
    for ((x, p), t) in g.parts {
        for seg in segs.iter().filter(|s| s.part == *p) {
            for (block, rows) in g.blocks_of(t) {
                let lo = seg.at.max(rows.start);
                let hi = (seg.at + seg.rows).min(rows.end);
                if lo >= hi {
                    continue;
                }
                let fused_at = seg.fused + (lo - seg.at);
                let mut offsets: Vec<u64> = g.experts.map(|_| *x).into_iter().collect();
                offsets.push(fused_at);
                offsets.extend(std::iter::repeat_n(0, inner.len()));
                let mut shape: Vec<u64> = g.experts.map(|_| 1).into_iter().collect();
                shape.push(hi - lo);
                shape.extend(&inner);
                let id = g
                    .experts
                    .map_or(format!("{fused_at}"), |_| format!("{x}.{fused_at}"));
                let info = TensorInfo::new(format!("{name}#{id}"), t.dtype, &shape)
                    .with_shard(&global, &offsets);
                out.push(info.clone());
                routes.pieces.entry(block.clone()).or_default().push(Piece {
                    info,
                    rows: Some(lo - rows.start..hi - rows.start),
                });
            }
        }
    }
    let covered: u64 = segs.iter().map(|s| s.rows).sum();
    if covered < fused {
        let mut offsets = vec![covered];
        offsets.extend(std::iter::repeat_n(0, inner.len()));
        let info = TensorInfo::new(
            format!("{name}#pad"),
            first.dtype,
            &with_first(fused - covered, &inner),
        )
        .with_shard(&global, &offsets);
        out.push(info.clone());
        let block = g.blocks_of(first)[0].0.clone();
        routes
            .pieces
            .entry(block)
            .or_default()
            .push(Piece { info, rows: None });
    }
    Ok(out)
}

/// HF → Megatron without zero_copy: the whole tensor once all its parts are in.
pub fn assemble(
    l: &dyn Rows,
    cx: &Geometry,
    info: &TensorInfo,
    per_expert: bool,
    parts: Parts,
    out: &mut Emitter,
) -> Result<()> {
    let info = info.clone();
    let experts = if per_expert { info.shape[0] } else { 1 };
    let shape = &info.shape[per_expert as usize..];
    // One part that is the whole tensor (a direct row, an unpadded vocabulary): as it is.
    if experts == 1 && parts.len() == 1 {
        let t = parts.values().next().expect("one part");
        if Some(t.bytes().len() as u64) == info.nbytes() {
            let t = parts.into_values().next().expect("one part");
            return out.tensor(Tensor::new(info, t.data)?);
        }
    }
    let row = row_bytes(shape, info.dtype);
    let per_expert_bytes = shape[0] * row;
    let mut data = vec![0u8; (experts * per_expert_bytes) as usize];
    let (_, segs) = segments(l, shape[0], cx, info.name())?;
    for ((x, p), t) in &parts {
        for s in segs.iter().filter(|s| s.part == *p) {
            let to = (x * per_expert_bytes + s.fused * row) as usize;
            let from = (s.at * row) as usize;
            let n = (s.rows * row) as usize;
            data[to..to + n].copy_from_slice(&t.bytes()[from..from + n]);
        }
    }
    out.tensor(Tensor::new(info, Buffer::from_vec(data))?)
}

/// Megatron → HF plan: each part (of each expert) with its rows.
pub fn plan_to_hf(
    l: &dyn Rows,
    e: &Entry,
    idx: Index,
    t: &TensorInfo,
    cx: &Geometry,
) -> Result<Vec<TensorInfo>> {
    let global = global_shape(t);
    let (experts, shape) = if e.per_expert() {
        (Some(global[0]), global[1..].to_vec())
    } else {
        (None, global)
    };
    let part_rows = match shape.first() {
        Some(&r) => segments(l, r, cx, t.base_name())?.0,
        None => vec![0],
    };
    let mut out = Vec::new();
    for x in 0..experts.unwrap_or(1) {
        for (p, &rows) in part_rows.iter().enumerate().take(e.hf.len()) {
            let name = hf_name(e, p, idx.layer, experts.map(|_| x));
            let s = if shape.is_empty() {
                shape.clone()
            } else {
                with_first(rows, &shape[1..])
            };
            out.push(TensorInfo::new(name, t.dtype, &s));
        }
    }
    Ok(out)
}

/// Megatron → HF: every run of rows of this tensor (or stored block) to its place, as a view
/// of the input — a whole HF tensor when the run covers one, else a row piece the writer
/// places.
pub fn to_hf(
    l: &dyn Rows,
    e: &Entry,
    idx: Index,
    t: Tensor,
    cx: &Geometry,
    out: &mut Emitter,
) -> Result<()> {
    // The block this tensor is of its (per-layer) Megatron tensor: experts and rows.
    let lead = e.per_expert() as usize;
    let (global, offsets) = match t.info.shard() {
        Some(s) => (s.global_shape.to_vec(), s.offsets.to_vec()),
        None => (t.info.shape.to_vec(), vec![0; t.info.shape.len()]),
    };
    let inner = &t.info.shape[lead + 1..];
    let (part_rows, segments) = segments(l, global[lead], cx, t.name())?;
    let row = row_bytes(&t.info.shape[lead..], t.info.dtype);
    let (first, n) = (offsets[lead], t.info.shape[lead]);
    let experts = if lead == 1 {
        offsets[0]..offsets[0] + t.info.shape[0]
    } else {
        0..1
    };
    for x in experts.clone() {
        let base = (x - experts.start) * n * row;
        let xi = (lead == 1).then_some(x);
        for s in segments.iter().filter_map(|s| s.clip(first..first + n)) {
            let shape = with_first(s.rows, inner);
            let from = base + (s.fused - first) * row;
            let data = t.data.slice(from as usize..(from + s.rows * row) as usize);
            let name = hf_name(e, s.part, idx.layer, xi);
            let info = if s.at == 0 && s.rows == part_rows[s.part] {
                TensorInfo::new(name, t.info.dtype, &shape)
            } else {
                let mut at = vec![s.at];
                at.extend(std::iter::repeat_n(0, inner.len()));
                TensorInfo::new(format!("{name}#{}", s.fused), t.info.dtype, &shape)
                    .with_shard(&with_first(part_rows[s.part], inner), &at)
            };
            out.tensor(Tensor::new(info, data)?)?;
        }
    }
    Ok(())
}

//! The moving part shared by the exporters: given a [`Placement`], each input tensor (whole, or
//! a block of its rows as readers stream large ones) leaves as pieces of the outputs it feeds —
//! views of its bytes where a run goes unchanged, gathered and cast window by window where it
//! does not — so nothing is held beyond a window, and the safetensors writer puts every piece
//! at its place in its rank's file.

use crate::place::{matrix, Placement, Route};
use bridgeflow_megatron::blocks::block_of;
use bridgeflow_sdk::{Buffer, DType, Emitter, PluginError, Result, Tensor, TensorInfo};
use std::collections::HashMap;
use std::ops::Range;

/// Bytes of output per emitted piece at most (larger runs go in several).
const WINDOW: u64 = 8 << 20;

pub struct Pieces {
    placement: Placement,
    /// Input tensors by name: (dtype, shape, bytes still to come).
    inputs: HashMap<String, (DType, Vec<u64>, u64)>,
    /// The next piece number of each output.
    next: Vec<u64>,
    pub pieces: u64,
}

impl Pieces {
    pub fn new(placement: Placement, inputs: &[TensorInfo]) -> Result<Pieces> {
        for t in inputs {
            if !t.dtype.is_float() {
                return Err(PluginError::shape(format!(
                    "tensor '{}' is {}: the engines take float weights (dequantize first)",
                    t.name(),
                    t.dtype
                )));
            }
        }
        let inputs = inputs
            .iter()
            .map(|t| {
                let n = t.nbytes().unwrap_or(u64::MAX);
                (t.name().to_string(), (t.dtype, t.shape.to_vec(), n))
            })
            .collect();
        let next = vec![0; placement.outs.len()];
        Ok(Pieces {
            placement,
            inputs,
            next,
            pieces: 0,
        })
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Sends the pieces `t` feeds.
    pub fn take(&mut self, t: Tensor, out: &mut Emitter) -> Result<()> {
        let base = t.info.base_name().to_string();
        let Some((dtype, shape, left)) = self.inputs.get_mut(&base) else {
            return Err(PluginError::shape(format!(
                "tensor '{base}' was not announced in the stream plan"
            )));
        };
        let (in_rows, width) = matrix(shape);
        let elems = t.bytes().len() as u64 / dtype.size() as u64;
        let first = t
            .info
            .piece_offset()
            .filter(|e| e % width == 0 && elems.is_multiple_of(width));
        let (Some(first), true) = (first, t.info.dtype == *dtype) else {
            return Err(PluginError::shape(format!(
                "piece '{}' is not a block of whole rows of '{base}'",
                t.name()
            )));
        };
        *left = left.checked_sub(t.bytes().len() as u64).ok_or_else(|| {
            PluginError::shape(format!("tensor '{base}' got more bytes than it has"))
        })?;
        let (p0, p1) = (first / width, first / width + elems / width);
        debug_assert!(p1 <= in_rows);
        let src = Source {
            t: &t,
            dtype: *dtype,
            width,
            first_row: p0,
        };
        for route in self
            .placement
            .routes
            .get(&base)
            .cloned()
            .unwrap_or_default()
        {
            let (a, b) = (route.rows.start.max(p0), route.rows.end.min(p1));
            if a < b {
                self.send(&src, &route, a..b, out)?;
            }
        }
        Ok(())
    }

    /// Rows `rows` of a route, window by window.
    fn send(
        &mut self,
        src: &Source,
        route: &Route,
        rows: Range<u64>,
        out: &mut Emitter,
    ) -> Result<()> {
        let o = &self.placement.outs[route.out];
        let (odt, w) = (o.dtype, route.cols.end - route.cols.start);
        let per = (WINDOW / (w * odt.size() as u64)).max(1);
        let mut a = rows.start;
        while a < rows.end {
            let b = rows.end.min(a + per);
            let data = src.rows(a..b, &route.cols, odt);
            let at = route.at + (a - route.rows.start);
            self.emit(route.out, at, b - a, data, out)?;
            a = b;
        }
        Ok(())
    }

    /// Rows of one value (vocabulary padding, vLLM's scale scalars), once every input is in.
    pub fn finish(&mut self, out: &mut Emitter) -> Result<()> {
        if let Some((name, _)) = self.inputs.iter().find(|(_, v)| v.2 > 0) {
            return Err(PluginError::shape(format!(
                "tensor '{name}' was announced but did not arrive whole; nothing written"
            )));
        }
        for (i, rows, value) in self.placement.fills.clone() {
            let o = &self.placement.outs[i];
            let n = (rows.end - rows.start) * matrix(&o.shape).1;
            let data = filled(value, n as usize, o.dtype);
            self.emit(i, rows.start, rows.end - rows.start, data, out)?;
        }
        Ok(())
    }

    /// Rows `at..at + n` of output `i` as a piece (as the tensor itself when they are all of it).
    fn emit(&mut self, i: usize, at: u64, n: u64, data: Buffer, out: &mut Emitter) -> Result<()> {
        let o = &self.placement.outs[i];
        let (rows, w) = matrix(&o.shape);
        self.pieces += 1;
        if at == 0 && n == rows {
            let info = TensorInfo::new(o.name.clone(), o.dtype, &o.shape);
            return out.tensor(Tensor::new(info, data)?);
        }
        let (offsets, shape) = block_of(&o.shape, at * w, n * w).ok_or_else(|| {
            PluginError::internal(format!(
                "rows {at}..{} of '{}' are not one block",
                at + n,
                o.name
            ))
        })?;
        let k = self.next[i];
        self.next[i] += 1;
        let info = TensorInfo::new(format!("{}#{k}", o.name), o.dtype, &shape)
            .with_shard(&o.shape, &offsets);
        out.tensor(Tensor::new(info, data)?)
    }
}

/// An arriving input tensor (or block of its rows) as a matrix.
struct Source<'a> {
    t: &'a Tensor,
    dtype: DType,
    width: u64,
    /// The input row this block starts at.
    first_row: u64,
}

impl Source<'_> {
    /// Rows `rows` (of the whole input), columns `cols`, as `to`: a view when they are whole
    /// rows in the same dtype, else gathered and cast.
    fn rows(&self, rows: Range<u64>, cols: &Range<u64>, to: DType) -> Buffer {
        let es = self.dtype.size() as u64;
        let row = self.width * es;
        let start = (rows.start - self.first_row) * row;
        if cols.start == 0 && cols.end == self.width && to == self.dtype {
            return self
                .t
                .data
                .slice(start as usize..(start + (rows.end - rows.start) * row) as usize);
        }
        let w = cols.end - cols.start;
        let bytes = self.t.bytes();
        let mut buf = vec![0u8; ((rows.end - rows.start) * w * to.size() as u64) as usize];
        let out_row = (w * to.size() as u64) as usize;
        for (k, dst) in buf.chunks_exact_mut(out_row).enumerate() {
            let at = (start + k as u64 * row + cols.start * es) as usize;
            bridgeflow_sdk::numeric::cast(self.dtype, &bytes[at..at + (w * es) as usize], to, dst);
        }
        Buffer::from_vec(buf)
    }
}

/// `n` elements of `value` in `dtype`.
fn filled(value: f64, n: usize, dtype: DType) -> Buffer {
    let mut one = vec![0u8; dtype.size()];
    bridgeflow_sdk::numeric::cast(DType::F64, &value.to_le_bytes(), dtype, &mut one);
    Buffer::from_vec(one.repeat(n))
}

//! Fused CPU kernels for the training step, each a candle custom op with its own backward pass:
//! attention (causal, or confined to packed sub-sequences), RMSNorm, SwiGLU and the
//! cross-entropy of the logits.
//!
//! Why by hand: candle composes these from elementwise ops, each one a full pass over memory
//! and a fresh buffer, and its autograd adds as many again going back — the composed softmax is
//! eight ops each way over `[b, heads, s, s]`, the loss six over `[tokens, vocab]`, a `narrow`'s
//! backward a zero-padded copy. Fused, each is one pass forward and one back, with rows spread
//! over rayon's threads and the products in the `gemm` crate (candle's own matmul kernels).
//! CPU f32 only: `applies` says when; other dtypes and devices keep the composed ops.

use crate::vexp::exp_in_place;
use candle_core::{CpuStorage, Device, Error, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Whether the fused kernels run for `t`: f32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

fn fail(op: &str, what: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{op}: {what}"))
}

/// The elements of a contiguous f32 CPU storage under `layout`.
fn f32s<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| fail(op, "a contiguous input"))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => Err(fail(op, "an f32 input")),
    }
}

/// The elements of a CPU storage under `layout` (contiguous f32).
fn cpu_f32s<'a>(op: &str, s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32s(op, c, l),
        _ => Err(fail(op, "a CPU tensor")),
    }
}

/// `views!(op; a = tensor_a, …)` binds each name to its tensor's f32 elements, borrowed, not
/// copied (the tensor made contiguous first; f32 on the CPU). The names shadow, so that the
/// tensors and their storage guards live to the end of the scope.
macro_rules! views {
    ($op:expr; $($name:ident = $t:expr),+ $(,)?) => {
        $( let $name = $t.contiguous()?; )+
        $( let $name = $name.storage_and_layout(); )+
        $( let $name = cpu_f32s($op, &$name.0, $name.1)?; )+
    };
}

fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// A row-major matrix operand: its elements, whether it is read transposed, and the distance
/// between its stored rows (`ld`; 0: packed, as wide as a stored row).
#[derive(Clone, Copy)]
struct M<'a> {
    v: &'a [f32],
    t: bool,
    ld: usize,
}

fn m(v: &[f32]) -> M<'_> {
    M { v, t: false, ld: 0 }
}

fn mt(v: &[f32]) -> M<'_> {
    M { v, t: true, ld: 0 }
}

impl M<'_> {
    /// The same operand with its stored rows `ld` apart: a block of a wider matrix.
    fn ld(self, ld: usize) -> Self {
        M { ld, ..self }
    }

    /// (row stride, column stride) of the operand read as `rows × cols`.
    fn strides(&self, rows: usize, cols: usize) -> (usize, usize) {
        let packed = if self.t { rows } else { cols };
        let ld = if self.ld == 0 { packed } else { self.ld };
        if self.t {
            (1, ld)
        } else {
            (ld, 1)
        }
    }

    /// Every element of the operand read as `rows × cols` lies inside `v`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        let (rs, cs) = self.strides(rows, cols);
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < self.v.len()
    }
}

/// `c = scale · a · b` (`a`: m×k, `b`: k×n, both row-major as stored unless transposed; `c`:
/// m×n), single-threaded (callers spread whole products over threads).
fn matmul(mm: usize, n: usize, k: usize, a: M, b: M, c: &mut [f32], scale: f32) {
    product(
        mm,
        n,
        k,
        a,
        b,
        c,
        scale,
        Dst::Overwrite,
        gemm::Parallelism::None,
    )
}

/// Whether a product overwrites its output or adds to it.
#[derive(Clone, Copy, PartialEq)]
enum Dst {
    Overwrite,
    Add,
}

/// `c (+)= scale · a · b` on `par`'s threads.
#[allow(clippy::too_many_arguments)]
fn product(
    mm: usize,
    n: usize,
    k: usize,
    a: M,
    b: M,
    c: &mut [f32],
    scale: f32,
    into: Dst,
    par: gemm::Parallelism,
) {
    block_product((mm, n, k), a, b, (c, n), scale, into, par)
}

/// `c (+)= scale · a · b` for `c` an m×n block whose rows lie `ldc` apart (a block of a wider
/// matrix), single-threaded.
fn block_matmul(
    (mm, n, k): (usize, usize, usize),
    a: M,
    b: M,
    c: (&mut [f32], usize),
    into: Dst,
    scale: f32,
) {
    block_product((mm, n, k), a, b, c, scale, into, gemm::Parallelism::None)
}

fn block_product(
    (mm, n, k): (usize, usize, usize),
    a: M,
    b: M,
    (c, ldc): (&mut [f32], usize),
    scale: f32,
    into: Dst,
    par: gemm::Parallelism,
) {
    let c_fits = mm == 0 || n == 0 || (ldc >= n && (mm - 1) * ldc + n <= c.len());
    assert!(a.fits(mm, k) && b.fits(k, n) && c_fits);
    let (a_rs, a_cs) = a.strides(mm, k);
    let (b_rs, b_cs) = b.strides(k, n);
    // SAFETY: the assert above keeps every index gemm derives from (m, n, k) and these
    // strides inside the three slices; `c` is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            mm,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            into == Dst::Add,
            a.v.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.v.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// All of rayon's threads for one large product.
fn all_threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

/// `x · Wᵀ` for `x` `[n, h]` and a weight tensor `W` `[out, h]`, on all threads.
fn times_transposed(
    op: &str,
    x: &[f32],
    w: &Tensor,
    (n, h, out): (usize, usize, usize),
) -> Result<Vec<f32>> {
    views!(op; w = w);
    let mut y = vec![0f32; n * out];
    product(
        n,
        out,
        h,
        m(x),
        mt(w),
        &mut y,
        1.0,
        Dst::Overwrite,
        all_threads(),
    );
    Ok(y)
}

/// `x · Wᵀ` over the last axis for a frozen W (LoRA's base, a teacher): candle's matmul
/// backward computes the right operand's gradient whether or not anything wants it — a third
/// of a frozen layer's backward FLOPs and a weight-sized buffer per layer. Its backward is
/// `g · W` only.
pub struct FrozenLinear(Tensor);

/// CPU tensors of any float dtype (f32 through the gemm crate directly, others through
/// candle's matmul).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear(w.contiguous()?))
}

/// `(rows, in, out)` of `x · Wᵀ`, the shapes checked.
fn linear_dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
    let (out, h) = w.dims2()?;
    if x.dims().last() != Some(&h) {
        return Err(fail("frozen-linear", format!("x {x:?} against W {w:?}")));
    }
    Ok((x.elem_count() / h, h, out))
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, out) = linear_dims(l.shape(), self.0.shape())?;
        if !matches!(s, CpuStorage::F32(_)) {
            return self.candle_fwd(s, l);
        }
        let x = f32s(self.name(), s, l)?;
        let y = times_transposed(self.name(), x, &self.0, (n, h, out))?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("checked") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, h, out) = linear_dims(x.shape(), self.0.shape())?;
        if !applies(x) {
            let dx = grad.reshape((n, out))?.matmul(&self.0)?;
            return Ok(Some(dx.reshape(x.shape())?));
        }
        views!(self.name(); g = grad, w = &self.0);
        let mut dx = vec![0f32; n * h];
        product(
            n,
            h,
            out,
            m(g),
            m(w),
            &mut dx,
            1.0,
            Dst::Overwrite,
            all_threads(),
        );
        Ok(Some(tensor(dx, x.shape())?))
    }
}

impl FrozenLinear {
    /// Other dtypes (bf16 compute): candle's own matmul on a tensor over a copy of the input.
    fn candle_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| fail("frozen-linear", "a contiguous input"))?;
        let len = match s {
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            _ => return Err(fail("frozen-linear", "a float input")),
        };
        let all = Tensor::from_storage(
            Storage::Cpu(s.clone()),
            len,
            candle_core::op::BackpropOp::none(),
            false,
        );
        let x = all.narrow(0, start, end - start)?.reshape(l.shape())?;
        let (out, h) = self.0.dims2()?;
        let y = x.reshape(((), h))?.matmul(&self.0.t()?)?.contiguous()?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("checked") = out;
        let (storage, layout) = y.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(c), Some((0, _))) => Ok((c.clone(), Shape::from(dims))),
            _ => Err(fail("frozen-linear", "a CPU result")),
        }
    }
}

/// A LoRA layer on a frozen base, `y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` (`x`: `[n, h]`, `A`: `[R, h]`,
/// `B`: `[out, R]`), as one op: the composed form keeps four `[n, out]` buffers per layer
/// alive to the backward pass (the base product, B's output, its scaled copy and the sum), this
/// one none; no gradient is computed for W0. Its backward: `gB = g·B`, `dx = g·W0 + s·gB·A`,
/// `dA = s·gBᵀ·x`, `dB = s·gᵀ·(x·Aᵀ)`, with `x·Aᵀ` kept from the forward pass.
pub struct LoraLinear {
    base: Tensor,
    scale: f32,
    low: Mutex<Vec<f32>>,
}

pub fn lora_linear(
    x: &Tensor,
    base: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinear {
        base: base.contiguous()?,
        scale: scale as f32,
        low: Mutex::new(Vec::new()),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// `(n, h, R, out)` of a LoRA layer, its shapes checked.
fn lora_dims(
    x: &Shape,
    base: &Shape,
    a: &Shape,
    b: &Shape,
) -> Result<(usize, usize, usize, usize)> {
    let ((n, h), (out, bh), (r, ah), (bo, br)) =
        (x.dims2()?, base.dims2()?, a.dims2()?, b.dims2()?);
    if (bh, ah, bo, br) != (h, h, out, r) {
        return Err(fail(
            "fused-lora",
            format!("x {x:?}, W0 {base:?}, A {a:?}, B {b:?} do not fit"),
        ));
    }
    Ok((n, h, r, out))
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, r, out) = lora_dims(xl.shape(), self.base.shape(), al.shape(), bl.shape())?;
        let (x, a, b) = (
            f32s(self.name(), xs, xl)?,
            f32s(self.name(), as_, al)?,
            f32s(self.name(), bs, bl)?,
        );
        let mut y = times_transposed(self.name(), x, &self.base, (n, h, out))?;
        let mut low = vec![0f32; n * r];
        product(
            n,
            r,
            h,
            m(x),
            mt(a),
            &mut low,
            1.0,
            Dst::Overwrite,
            all_threads(),
        );
        product(
            n,
            out,
            r,
            m(&low),
            mt(b),
            &mut y,
            self.scale,
            Dst::Add,
            all_threads(),
        );
        *self.low.lock().map_err(|_| fail(self.name(), "poisoned"))? = low;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, h, r, out) = lora_dims(x.shape(), self.base.shape(), a.shape(), b.shape())?;
        let low = self.low.lock().map_err(|_| fail(self.name(), "poisoned"))?;
        if low.len() != n * r {
            return Err(fail(self.name(), "backward without its forward pass"));
        }
        let name = self.name();
        let s = self.scale;
        let par = all_threads();
        views!(name; g = grad, w = &self.base, av = a, bv = b, xv = x);
        let (mut dx, mut da, mut db) = (vec![0f32; n * h], vec![0f32; r * h], vec![0f32; out * r]);
        let mut gb = vec![0f32; n * r];
        product(n, r, out, m(g), m(bv), &mut gb, 1.0, Dst::Overwrite, par);
        product(n, h, out, m(g), m(w), &mut dx, 1.0, Dst::Overwrite, par);
        product(n, h, r, m(&gb), m(av), &mut dx, s, Dst::Add, par);
        product(r, h, n, mt(&gb), m(xv), &mut da, s, Dst::Overwrite, par);
        product(out, r, n, mt(g), m(&low), &mut db, s, Dst::Overwrite, par);
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(da, a.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

/// Per-row cross-entropy of `[n, vocab]` f32 logits against `labels` (`lse − logit[label]`),
/// its backward `g · (softmax − onehot)` with the softmax recomputed from the kept `lse`
/// (not a second `[n, vocab]` buffer held to the backward pass).
pub struct CrossEntropy {
    labels: Arc<Vec<u32>>,
    lse: Mutex<Vec<f32>>,
}

pub fn cross_entropy(logits: &Tensor, labels: Vec<u32>) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy {
        labels: Arc::new(labels),
        lse: Mutex::new(Vec::new()),
    })
}

/// `log Σ exp(row)` with the max subtracted first, summed in f64.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut e: Vec<f32> = row.iter().map(|&x| x - max).collect();
    exp_in_place(&mut e);
    let sum: f64 = e.iter().map(|&x| x as f64).sum();
    max + (sum.ln() as f32)
}

impl candle_core::CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(self.name(), s, l)?;
        let (n, v) = l.shape().dims2()?;
        if self.labels.len() != n {
            return Err(fail(
                self.name(),
                format!("{} labels for {n} rows", self.labels.len()),
            ));
        }
        if let Some(bad) = self.labels.iter().find(|&&t| t as usize >= v) {
            return Err(fail(
                self.name(),
                format!("label {bad} ≥ the vocabulary's {v}"),
            ));
        }
        let lse: Vec<f32> = x.par_chunks(v).map(log_sum_exp).collect();
        let loss = lse
            .iter()
            .zip(x.chunks(v))
            .zip(self.labels.iter())
            .map(|((&l, row), &t)| l - row[t as usize])
            .collect();
        *self.lse.lock().map_err(|_| fail(self.name(), "poisoned"))? = lse;
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g: Vec<f32> = grad.to_vec1()?;
        let lse = self.lse.lock().map_err(|_| fail(self.name(), "poisoned"))?;
        let v = x.dim(1)?;
        views!(self.name(); xv = x);
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(v)
            .zip(xv.par_chunks(v))
            .enumerate()
            .for_each(|(i, (d, row))| {
                for (d, &x) in d.iter_mut().zip(row) {
                    *d = x - lse[i];
                }
                exp_in_place(d);
                d.iter_mut().for_each(|d| *d *= g[i]);
                d[self.labels[i] as usize] -= g[i];
            });
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// Every expert's `x_e · W_eᵀ` at once: `x` `[N, in]` holds the tokens sorted by expert
/// (`counts[e]` rows for expert e, in order), `W` `[E, out, in]` the stacked experts. One op
/// with its own backward, as megatron-core's grouped GEMM: slicing the stacked weight per expert
/// instead would give each expert a zero-filled gradient of the whole stack to add (E² weight
/// sizes of traffic per layer).
pub struct GroupedLinear(pub std::sync::Arc<Vec<usize>>);

pub fn grouped_linear(
    x: &Tensor,
    w: &Tensor,
    counts: std::sync::Arc<Vec<usize>>,
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, GroupedLinear(counts))
}

impl GroupedLinear {
    /// `(in, out)`, the shapes checked against the counts.
    fn dims(&self, x: &Shape, w: &Shape) -> Result<(usize, usize)> {
        let (n, h) = x.dims2()?;
        let (e, out, wh) = w.dims3()?;
        if wh != h || e != self.0.len() || self.0.iter().sum::<usize>() != n {
            return Err(fail(
                "grouped-linear",
                format!("x {x:?}, W {w:?}, tokens per expert {:?}", self.0),
            ));
        }
        Ok((h, out))
    }

    /// `v` (`[N, width]`) cut into each expert's rows, in expert order.
    fn split_rows<'v>(&self, v: &'v mut [f32], width: usize) -> Vec<&'v mut [f32]> {
        let mut rest = v;
        self.0
            .iter()
            .map(|&n| {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n * width);
                rest = tail;
                mine
            })
            .collect()
    }

    /// `f(expert, first row, rows, its part)` for each expert with tokens (`parts`: one per
    /// expert), one expert per thread, largest first: a layer's experts are several products
    /// of a few hundred rows each, which keep the threads busier one each than split between
    /// them (14 % faster at 8 experts of 512 × 512 × 1408 on 2 threads).
    fn each_expert<P: Send>(&self, parts: Vec<P>, f: impl Fn(usize, usize, usize, P) + Sync) {
        // (expert, first row, rows, its part)
        let mut work: Vec<(usize, usize, usize, P)> = self
            .segments()
            .zip(parts)
            .filter(|((_, (_, n)), _)| *n > 0)
            .map(|((e, (start, n)), p)| (e, start, n, p))
            .collect();
        work.sort_by_key(|w| std::cmp::Reverse(w.2));
        work.into_par_iter()
            .with_max_len(1)
            .for_each(|(e, start, n, p)| f(e, start, n, p));
    }

    /// Each expert's (first row, rows).
    fn segments(&self) -> impl Iterator<Item = (usize, (usize, usize))> + '_ {
        self.0.iter().enumerate().scan(0, |at, (e, &n)| {
            let start = *at;
            *at += n;
            Some((e, (start, n)))
        })
    }
}

impl candle_core::CustomOp2 for GroupedLinear {
    fn name(&self) -> &'static str {
        "grouped-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, out) = self.dims(xl.shape(), wl.shape())?;
        let (x, w) = (f32s(self.name(), xs, xl)?, f32s(self.name(), ws, wl)?);
        let mut y = vec![0f32; x.len() / h * out];
        let ys = self.split_rows(&mut y, out);
        self.each_expert(ys, |e, start, n, y| {
            matmul(
                n,
                out,
                h,
                m(&x[start * h..(start + n) * h]),
                mt(&w[e * out * h..(e + 1) * out * h]),
                y,
                1.0,
            )
        });
        let rows = x.len() / h;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (h, out) = self.dims(x.shape(), w.shape())?;
        views!(self.name(); xv = x, wv = w, g = grad);
        let (mut dx, mut dw) = (vec![0f32; xv.len()], vec![0f32; wv.len()]);
        // An expert with no tokens keeps its zero gradient.
        let both: Vec<(&mut [f32], &mut [f32])> = self
            .split_rows(&mut dx, h)
            .into_iter()
            .zip(dw.chunks_mut(out * h))
            .collect();
        self.each_expert(both, |e, start, n, (dx, dw)| {
            let gs = &g[start * out..(start + n) * out];
            let xs = &xv[start * h..(start + n) * h];
            let we = &wv[e * out * h..(e + 1) * out * h];
            matmul(n, h, out, m(gs), m(we), dx, 1.0);
            matmul(out, h, n, mt(gs), m(xs), dw, 1.0);
        });
        Ok((Some(tensor(dx, x.shape())?), Some(tensor(dw, w.shape())?)))
    }
}

/// `silu(gate) · up` of `[…, 2f]` (`[gate; up]`, Megatron's `linear_fc1` output) → `[…, f]`.
pub struct SwiGlu;

pub fn swiglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1(SwiGlu)
}

/// `σ(x)` of every element of `x`, into `out`.
fn sigmoids(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = -x;
    }
    exp_in_place(out);
    out.iter_mut().for_each(|o| *o = 1.0 / (1.0 + *o));
}

impl candle_core::CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(self.name(), s, l)?;
        let mut dims = l.shape().dims().to_vec();
        let two_f = *dims.last().ok_or_else(|| fail(self.name(), "a scalar"))?;
        if two_f % 2 != 0 {
            return Err(fail(self.name(), format!("an odd last axis ({two_f})")));
        }
        let f = two_f / 2;
        let mut y = vec![0f32; x.len() / 2];
        y.par_chunks_mut(f)
            .zip(x.par_chunks(two_f))
            .for_each(|(y, row)| {
                let (gate, up) = row.split_at(f);
                sigmoids(gate, y);
                for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    *y = g * *y * u;
                }
            });
        *dims.last_mut().expect("checked") = f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let two_f = h.dim(candle_core::D::Minus1)?;
        let f = two_f / 2;
        views!(self.name(); x = h, g = grad);
        let mut dh = vec![0f32; x.len()];
        dh.par_chunks_mut(two_f)
            .zip(x.par_chunks(two_f))
            .zip(g.par_chunks(f))
            .for_each(|((d, row), g)| {
                let (gate, up) = row.split_at(f);
                let (dg, du) = d.split_at_mut(f);
                // σ(gate) in dU first, overwritten as it is used.
                sigmoids(gate, du);
                for i in 0..f {
                    let s = du[i];
                    du[i] = g[i] * gate[i] * s;
                    dg[i] = g[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
                }
            });
        Ok(Some(tensor(dh, h.shape())?))
    }
}

/// RMSNorm over the last axis, `x · (mean(x²) + eps)^-½ · w` (HF's LlamaRMSNorm in f32),
/// keeping each row's inverse root for the backward pass.
pub struct RmsNorm {
    eps: f64,
    inv: Mutex<Vec<f32>>,
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        RmsNorm {
            eps,
            inv: Mutex::new(Vec::new()),
        },
    )
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(self.name(), s, l)?, f32s(self.name(), ws, wl)?);
        let h = w.len();
        if l.shape().dims().last() != Some(&h) {
            return Err(fail(
                self.name(),
                format!("{:?} normed by {h} weights", l.shape()),
            ));
        }
        let mut y = vec![0f32; x.len()];
        let mut inv = vec![0f32; x.len() / h];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .zip(inv.par_iter_mut())
            .for_each(|((y, row), inv)| {
                let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
                *inv = (1.0 / (ms + self.eps).sqrt()) as f32;
                for ((y, &v), &w) in y.iter_mut().zip(row).zip(w) {
                    *y = v * *inv * w;
                }
            });
        *self.inv.lock().map_err(|_| fail(self.name(), "poisoned"))? = inv;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let inv = self.inv.lock().map_err(|_| fail(self.name(), "poisoned"))?;
        let h = w.elem_count();
        views!(self.name(); xv = x, g = grad, wv = w);
        let (dx, dw) = rms_norm_bwd(xv, wv, g, &inv, h);
        Ok((Some(tensor(dx, x.shape())?), Some(tensor(dw, w.shape())?)))
    }
}

/// dx = r·(g∘w) − x·r³·Σ(g∘w∘x)/h and dw = Σ_rows g∘x·r, for rows of `h` with inverse roots `r`.
fn rms_norm_bwd(x: &[f32], w: &[f32], g: &[f32], inv: &[f32], h: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let rows = x.len() / h;
    // Rows in blocks, each block's share of dw summed apart, then the blocks' shares added.
    let block = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    let dw = dx
        .par_chunks_mut(block * h)
        .enumerate()
        .map(|(bi, dx)| {
            let mut dw = vec![0f32; h];
            for (ri, dx) in dx.chunks_mut(h).enumerate() {
                let r = bi * block + ri;
                let (xr, gr, ir) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h], inv[r]);
                let dot: f64 = (0..h).map(|k| (gr[k] * w[k] * xr[k]) as f64).sum();
                let c = (dot / h as f64) as f32 * ir * ir * ir;
                for k in 0..h {
                    dx[k] = ir * gr[k] * w[k] - xr[k] * c;
                    dw[k] += gr[k] * xr[k] * ir;
                }
            }
            dw
        })
        .reduce(
            || vec![0f32; h],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (dx, dw)
}

/// Query positions per block of attention's products ([`Attention::blocks`]): smaller blocks
/// skip more of the masked triangle but leave gemm less to work with in each product. The unit
/// tests' short sequences take several blocks.
const QUERY_BLOCK: usize = if cfg!(test) { 3 } else { 128 };

/// Scaled dot-product attention of `q` `[b, heads, s, d]` over `k`, `v` `[b, groups, s, d]`
/// (each key/value head serving its group's `heads/groups` query heads, never copied out), each
/// query at position `i` seeing keys `start(i) ..= i`: causal (`starts` None: 0) or confined to
/// its packed sub-sequence. The probabilities are kept for the backward pass.
pub struct Attention {
    scale: f32,
    /// `[b · s]`: where each query's sub-sequence starts.
    starts: Option<Arc<Vec<u32>>>,
    probs: Mutex<Vec<f32>>,
}

pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    starts: Option<Arc<Vec<u32>>>,
) -> Result<Tensor> {
    let op = Attention {
        scale: scale as f32,
        starts,
        probs: Mutex::new(Vec::new()),
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if q.track_op() || k.track_op() || v.track_op() {
        q.apply_op3(&k, &v, op)
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)
    }
}

/// The sizes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    groups: usize,
    s: usize,
    d: usize,
}

impl Dims {
    fn of(q: &Shape, k: &Shape, v: &Shape) -> Result<Dims> {
        let (b, heads, s, d) = q.dims4()?;
        let (kb, groups, ks, kd) = k.dims4()?;
        if (kb, ks, kd) != (b, s, d) || k != v || groups == 0 || heads % groups != 0 {
            return Err(fail(
                "fused-attention",
                format!("q {q:?}, k {k:?}, v {v:?} do not fit"),
            ));
        }
        Ok(Dims {
            b,
            heads,
            groups,
            s,
            d,
        })
    }

    /// Query rows per (sample, group): the group's heads × positions.
    fn rows(&self) -> usize {
        self.heads / self.groups * self.s
    }
}

impl Attention {
    fn check_starts(&self, dm: Dims) -> Result<()> {
        if self
            .starts
            .as_ref()
            .is_some_and(|st| st.len() != dm.b * dm.s)
        {
            return Err(fail(
                "fused-attention",
                "sub-sequence starts for another batch",
            ));
        }
        // Each query sees at least itself.
        if let Some(st) = &self.starts {
            if st.iter().enumerate().any(|(j, &lo)| lo as usize > j % dm.s) {
                return Err(fail(
                    "fused-attention",
                    "a sub-sequence starts after a query in it",
                ));
            }
        }
        Ok(())
    }

    fn start(&self, b: usize, s: usize, i: usize) -> usize {
        self.starts.as_ref().map_or(0, |st| st[b * s + i] as usize)
    }

    /// Softmax of each scaled score row over its keys `start ..= i`, zero elsewhere.
    fn softmax_rows(&self, p: &mut [f32], bi: usize, dm: Dims) {
        for (r, row) in p.chunks_mut(dm.s).enumerate() {
            let i = r % dm.s;
            let lo = self.start(bi, dm.s, i);
            let seen = &mut row[lo..=i];
            let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            seen.iter_mut().for_each(|x| *x -= max);
            exp_in_place(seen);
            let sum = seen.iter().map(|&x| x as f64).sum::<f64>() as f32;
            seen.iter_mut().for_each(|x| *x /= sum);
            row[..lo].iter_mut().for_each(|x| *x = 0.0);
            row[i + 1..].iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = Dims::of(ql.shape(), kl.shape(), vl.shape())?;
        let (q, k, v) = (
            f32s(self.name(), qs, ql)?,
            f32s(self.name(), ks, kl)?,
            f32s(self.name(), vs, vl)?,
        );
        self.check_starts(dm)?;
        let (rows, s, d) = (dm.rows(), dm.s, dm.d);
        let mut out = vec![0f32; q.len()];
        let mut probs = vec![0f32; dm.b * dm.heads * s * s];
        out.par_chunks_mut(rows * d)
            .zip(probs.par_chunks_mut(rows * s))
            .enumerate()
            .for_each(|(task, (o, p))| {
                let qg = &q[task * rows * d..(task + 1) * rows * d];
                let kg = &k[task * s * d..(task + 1) * s * d];
                let vg = &v[task * s * d..(task + 1) * s * d];
                self.forward_task(
                    dm,
                    task / dm.groups,
                    Group {
                        q: qg,
                        k: kg,
                        v: vg,
                    },
                    p,
                    o,
                );
            });
        *self
            .probs
            .lock()
            .map_err(|_| fail(self.name(), "poisoned"))? = probs;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Dims::of(q.shape(), k.shape(), v.shape())?;
        let probs = self
            .probs
            .lock()
            .map_err(|_| fail(self.name(), "poisoned"))?;
        if probs.len() != dm.b * dm.heads * dm.s * dm.s {
            return Err(fail(self.name(), "backward without its forward pass"));
        }
        views!(self.name(); qv = q, kv = k, vv = v, g = grad);
        let saved = AttnSaved {
            q: qv,
            k: kv,
            v: vv,
            g,
            p: &probs,
        };
        let (dq, dk, dv) = self.backward(dm, saved);
        Ok((
            Some(tensor(dq, q.shape())?),
            Some(tensor(dk, k.shape())?),
            Some(tensor(dv, v.shape())?),
        ))
    }
}

/// What attention's backward pass reads.
struct AttnSaved<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    p: &'a [f32],
}

impl Attention {
    /// Per (sample, group): dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − rowsum(P∘dP))·scale,
    /// dQ = dS·K, dK = dSᵀ·Q.
    fn backward(&self, dm: Dims, t: AttnSaved) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (rows, s, d) = (dm.rows(), dm.s, dm.d);
        let mut dq = vec![0f32; t.q.len()];
        let mut dk = vec![0f32; t.k.len()];
        let mut dv = vec![0f32; t.v.len()];
        dq.par_chunks_mut(rows * d)
            .zip(dk.par_chunks_mut(s * d))
            .zip(dv.par_chunks_mut(s * d))
            .enumerate()
            .for_each(|(task, ((dq, dk), dv))| {
                let qr = task * rows * d..(task + 1) * rows * d;
                let kv = task * s * d..(task + 1) * s * d;
                let (qg, gg) = (&t.q[qr.clone()], &t.g[qr]);
                let (kg, vg) = (&t.k[kv.clone()], &t.v[kv]);
                let p = &t.p[task * rows * s..(task + 1) * rows * s];
                let group = Group {
                    q: qg,
                    k: kg,
                    v: vg,
                };
                self.backward_task((dm, task / dm.groups), group, gg, p, (dq, dk, dv));
            });
        (dq, dk, dv)
    }

    /// One (sample, group): `p` = softmax(scale · Q·Kᵀ) over each query's keys, `o` = P·V,
    /// block by block ([`Attention::blocks`]): the products skip keys no query of a block sees.
    fn forward_task(&self, dm: Dims, sample: usize, g: Group, p: &mut [f32], o: &mut [f32]) {
        let (s, d) = (dm.s, dm.d);
        let blocks = self.blocks(sample, dm);
        for &(r0, ref qs, ref ks) in &blocks {
            let (q, k) = (&g.q[r0 * d..], &g.k[ks.start * d..]);
            let scores = (&mut p[r0 * s + ks.start..], s);
            block_matmul(
                (qs.len(), ks.len(), d),
                m(q),
                mt(k),
                scores,
                Dst::Overwrite,
                self.scale,
            );
        }
        self.softmax_rows(p, sample, dm);
        for &(r0, ref qs, ref ks) in &blocks {
            let probs = m(&p[r0 * s + ks.start..]).ld(s);
            let out = (&mut o[r0 * d..], d);
            let v = m(&g.v[ks.start * d..]);
            block_matmul((qs.len(), d, ks.len()), probs, v, out, Dst::Overwrite, 1.0);
        }
    }

    /// The blocks of one group's query rows (head-major: `head · s + position`) as (first
    /// row, positions, keys): [`QUERY_BLOCK`] positions of one head and the keys any of them
    /// sees, from the earliest sub-sequence start among them to the last position. Causal
    /// attention over 512 positions then computes 5/8 of the full score matrix.
    fn blocks(&self, sample: usize, dm: Dims) -> Vec<(usize, Range<usize>, Range<usize>)> {
        let s = dm.s;
        let per_head: Vec<(Range<usize>, Range<usize>)> = (0..s)
            .step_by(QUERY_BLOCK)
            .map(|a| {
                let e = (a + QUERY_BLOCK).min(s);
                let lo = (a..e).map(|i| self.start(sample, s, i)).min().unwrap_or(0);
                (a..e, lo..e)
            })
            .collect();
        (0..dm.heads / dm.groups)
            .flat_map(|h| {
                per_head
                    .iter()
                    .map(move |(qs, ks)| (h * s + qs.start, qs.clone(), ks.clone()))
            })
            .collect()
    }

    /// One (sample, group) of the backward pass from its output gradient `gg` and kept `p`,
    /// over the forward pass's blocks (dK and dV summed over the blocks of queries).
    fn backward_task(
        &self,
        (dm, sample): (Dims, usize),
        g: Group,
        gg: &[f32],
        p: &[f32],
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let (rows, s, d) = (dm.rows(), dm.s, dm.d);
        let blocks = self.blocks(sample, dm);
        let mut ds = vec![0f32; rows * s];
        for &(r0, ref qs, ref ks) in &blocks {
            let (bm, bn) = (qs.len(), ks.len());
            let probs = &p[r0 * s + ks.start..];
            let grad = m(&gg[r0 * d..]);
            let dv_rows = (&mut dv[ks.start * d..], d);
            block_matmul((bn, d, bm), mt(probs).ld(s), grad, dv_rows, Dst::Add, 1.0);
            let dp = (&mut ds[r0 * s + ks.start..], s);
            let v = mt(&g.v[ks.start * d..]);
            block_matmul((bm, bn, d), grad, v, dp, Dst::Overwrite, 1.0);
            for r in r0..r0 + bm {
                let at = r * s + ks.start..r * s + ks.end;
                let (pr, dr) = (&p[at.clone()], &mut ds[at]);
                // Σ P∘dP, as softmax's backward sums it (equal to Σ dO∘O, but rounded like
                // the reference's; P is 0 outside the block's keys).
                let delta: f32 = pr.iter().zip(dr.iter()).map(|(p, g)| p * g).sum();
                for (x, &pv) in dr.iter_mut().zip(pr) {
                    *x = pv * (*x - delta) * self.scale;
                }
            }
            let dsb = m(&ds[r0 * s + ks.start..]).ld(s);
            let dq_rows = (&mut dq[r0 * d..], d);
            block_matmul(
                (bm, d, bn),
                dsb,
                m(&g.k[ks.start * d..]),
                dq_rows,
                Dst::Overwrite,
                1.0,
            );
            let dk_rows = (&mut dk[ks.start * d..], d);
            let dst = mt(&ds[r0 * s + ks.start..]).ld(s);
            block_matmul((bn, d, bm), dst, m(&g.q[r0 * d..]), dk_rows, Dst::Add, 1.0);
        }
    }
}

/// One (sample, group)'s queries `[heads/groups · s, d]`, keys and values `[s, d]`.
#[derive(Clone, Copy)]
struct Group<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

/// How `linear_qkv`'s output rows are laid out: per query group, its `per_group` query heads,
/// then one key and one value head, each `d` wide (megatron-core's interleaved QKV).
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub groups: usize,
    pub per_group: usize,
    pub d: usize,
}

impl Heads {
    fn width(&self) -> usize {
        self.groups * (self.per_group + 2) * self.d
    }
    fn query_width(&self) -> usize {
        self.groups * self.per_group * self.d
    }
}

/// Attention straight from `linear_qkv`'s output `[b, s, groups·(per_group + 2)·d]` to
/// `linear_proj`'s input `[b, s, heads·d]`, RoPE applied to queries and keys inside (HF's
/// `x·cos + rotate_half(x)·sin`, rounded as that composition rounds). Composed, the split into
/// heads, the two rotations and the transposes back are some thirty candle ops a layer, each a
/// fresh buffer forward and a zero-filled gradient buffer back; fused, one buffer each way.
/// Models with q/k norms (between the split and RoPE) keep the split path.
pub struct QkvAttention {
    attn: Attention,
    heads: Heads,
    /// RoPE tables, `[s, d]` (every sample) or `[b, 1, s, d]` (per sample, packed rows).
    cos: Tensor,
    sin: Tensor,
}

pub fn qkv_attention(
    qkv: &Tensor,
    heads: Heads,
    (cos, sin): (&Tensor, &Tensor),
    scale: f64,
    starts: Option<Arc<Vec<u32>>>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(QkvAttention {
        attn: Attention {
            scale: scale as f32,
            starts,
            probs: Mutex::new(Vec::new()),
        },
        heads,
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
    })
}

/// `x·cos + rotate_half(x)·sin` of one head row (`rotate_half(x)` = `[−x₂, x₁]`).
fn rope_row(dst: &mut [f32], x: &[f32], c: &[f32], sn: &[f32]) {
    let half = x.len() / 2;
    for j in 0..x.len() {
        let rotated = if j < half { -x[j + half] } else { x[j - half] };
        dst[j] = x[j] * c[j] + rotated * sn[j];
    }
}

/// RoPE's backward for one row: `g·cos + rotate_halfᵀ(g·sin)` (`rotate_halfᵀ(u)` = `[u₂, −u₁]`).
fn unrope_row(dst: &mut [f32], g: &[f32], c: &[f32], sn: &[f32]) {
    let half = g.len() / 2;
    for j in 0..g.len() {
        let rotated = if j < half {
            g[j + half] * sn[j + half]
        } else {
            -(g[j - half] * sn[j - half])
        };
        dst[j] = g[j] * c[j] + rotated;
    }
}

/// One (sample, group)'s roped queries and keys and its values, gathered from `linear_qkv`'s
/// output.
struct Gathered {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl QkvAttention {
    fn dims(&self, x: &Shape) -> Result<Dims> {
        let (b, s, width) = x.dims3()?;
        let h = self.heads;
        let table = self.cos.elem_count();
        let tables_fit =
            self.cos.shape() == self.sin.shape() && (table == s * h.d || table == b * s * h.d);
        if width != h.width() || !h.d.is_multiple_of(2) || h.groups == 0 || !tables_fit {
            return Err(fail(
                "fused-qkv-attention",
                format!(
                    "qkv {x:?} against {h:?} and RoPE tables {:?}",
                    self.cos.shape()
                ),
            ));
        }
        Ok(Dims {
            b,
            heads: h.groups * h.per_group,
            groups: h.groups,
            s,
            d: h.d,
        })
    }

    /// The RoPE table row of position `i` of sample `bi`.
    fn table<'t>(&self, t: &'t [f32], dm: Dims, bi: usize, i: usize) -> &'t [f32] {
        let row = if t.len() == dm.s * dm.d {
            i
        } else {
            bi * dm.s + i
        };
        &t[row * dm.d..(row + 1) * dm.d]
    }

    /// Offset in `qkv` of head `head` (0.. per_group: queries, then key, value) of group `gi`
    /// at token `bi · s + i`.
    fn at(&self, dm: Dims, bi: usize, i: usize, gi: usize, head: usize) -> usize {
        let h = self.heads;
        (bi * dm.s + i) * h.width() + (gi * (h.per_group + 2) + head) * h.d
    }

    fn gather(&self, qkv: &[f32], (c, sn): (&[f32], &[f32]), dm: Dims, task: usize) -> Gathered {
        let (bi, gi, s, d, hpg) = (
            task / dm.groups,
            task % dm.groups,
            dm.s,
            dm.d,
            self.heads.per_group,
        );
        let mut g = Gathered {
            q: vec![0f32; hpg * s * d],
            k: vec![0f32; s * d],
            v: vec![0f32; s * d],
        };
        for i in 0..s {
            let (ci, si) = (self.table(c, dm, bi, i), self.table(sn, dm, bi, i));
            for h in 0..hpg {
                let x = &qkv[self.at(dm, bi, i, gi, h)..][..d];
                rope_row(&mut g.q[(h * s + i) * d..][..d], x, ci, si);
            }
            let k = &qkv[self.at(dm, bi, i, gi, hpg)..][..d];
            rope_row(&mut g.k[i * d..][..d], k, ci, si);
            let v = &qkv[self.at(dm, bi, i, gi, hpg + 1)..][..d];
            g.v[i * d..][..d].copy_from_slice(v);
        }
        g
    }
}

impl candle_core::CustomOp1 for QkvAttention {
    fn name(&self) -> &'static str {
        "fused-qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims(l.shape())?;
        let qkv = f32s(self.name(), s, l)?;
        self.attn.check_starts(dm)?;
        views!(self.name(); c = &self.cos, sn = &self.sin);
        let (rows, sq, d, hpg) = (dm.rows(), dm.s, dm.d, self.heads.per_group);
        let mut probs = vec![0f32; dm.b * dm.heads * sq * sq];
        let outs: Vec<Vec<f32>> = probs
            .par_chunks_mut(rows * sq)
            .enumerate()
            .map(|(task, p)| {
                let g = self.gather(qkv, (c, sn), dm, task);
                let mut o = vec![0f32; rows * d];
                let group = Group {
                    q: &g.q,
                    k: &g.k,
                    v: &g.v,
                };
                self.attn
                    .forward_task(dm, task / dm.groups, group, p, &mut o);
                o
            })
            .collect();
        // [b, s, heads·d]: head gi·per_group + h of token (bi, i) from its task's row h·s + i.
        let width = self.heads.query_width();
        let mut out = vec![0f32; dm.b * sq * width];
        out.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
            let (bi, i) = (t / sq, t % sq);
            for gi in 0..dm.groups {
                let o = &outs[bi * dm.groups + gi];
                for h in 0..hpg {
                    row[(gi * hpg + h) * d..][..d].copy_from_slice(&o[(h * sq + i) * d..][..d]);
                }
            }
        });
        *self
            .attn
            .probs
            .lock()
            .map_err(|_| fail(self.name(), "poisoned"))? = probs;
        Ok((CpuStorage::F32(out), Shape::from((dm.b, sq, width))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dm = self.dims(x.shape())?;
        let probs = self
            .attn
            .probs
            .lock()
            .map_err(|_| fail(self.name(), "poisoned"))?;
        if probs.len() != dm.b * dm.heads * dm.s * dm.s {
            return Err(fail(self.name(), "backward without its forward pass"));
        }
        views!(self.name(); qkv = x, gv = grad, c = &self.cos, sn = &self.sin);
        let (rows, sq, d, hpg) = (dm.rows(), dm.s, dm.d, self.heads.per_group);
        let width = self.heads.query_width();
        // Per task: (dQ, dK) with RoPE undone, and dV.
        let grads: Vec<Gathered> = (0..dm.b * dm.groups)
            .into_par_iter()
            .map(|task| {
                let (bi, gi) = (task / dm.groups, task % dm.groups);
                let g = self.gather(qkv, (c, sn), dm, task);
                let mut gg = vec![0f32; rows * d];
                for h in 0..hpg {
                    for i in 0..sq {
                        let from = (bi * sq + i) * width + (gi * hpg + h) * d;
                        gg[(h * sq + i) * d..][..d].copy_from_slice(&gv[from..from + d]);
                    }
                }
                let mut dg = Gathered {
                    q: vec![0f32; rows * d],
                    k: vec![0f32; sq * d],
                    v: vec![0f32; sq * d],
                };
                let p = &probs[task * rows * sq..(task + 1) * rows * sq];
                let group = Group {
                    q: &g.q,
                    k: &g.k,
                    v: &g.v,
                };
                let grads = (&mut dg.q[..], &mut dg.k[..], &mut dg.v[..]);
                self.attn.backward_task((dm, bi), group, &gg, p, grads);
                dg
            })
            .collect();
        let mut dqkv = vec![0f32; qkv.len()];
        dqkv.par_chunks_mut(self.heads.width())
            .enumerate()
            .for_each(|(t, row)| {
                let (bi, i) = (t / sq, t % sq);
                let (ci, si) = (self.table(c, dm, bi, i), self.table(sn, dm, bi, i));
                for gi in 0..dm.groups {
                    let g = &grads[bi * dm.groups + gi];
                    let base = gi * (hpg + 2) * d;
                    for h in 0..hpg {
                        let from = &g.q[(h * sq + i) * d..][..d];
                        unrope_row(&mut row[base + h * d..][..d], from, ci, si);
                    }
                    unrope_row(&mut row[base + hpg * d..][..d], &g.k[i * d..][..d], ci, si);
                    row[base + (hpg + 1) * d..][..d].copy_from_slice(&g.v[i * d..][..d]);
                }
            });
        Ok(Some(tensor(dqkv, x.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var, D};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(97)) % 2000)
            .map(|v| v as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn var(shape: &[usize], seed: u32) -> Var {
        let n = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// The fused op and the composed reference agree forward and in every input's gradient.
    fn agree(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert!(max_rel(&a, &b) < 1e-5, "forward: {}", max_rel(&a, &b));
        // A loss that weighs every output differently.
        let w = Tensor::from_vec(values(a.elem_count(), 77), a.shape(), &Device::Cpu).unwrap();
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(
                max_rel(x, y) < 1e-5,
                "gradient of input {i}: {}",
                max_rel(x, y)
            );
        }
    }

    fn composed_softmax(x: &Tensor) -> Tensor {
        let max = x.max_keepdim(D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    /// The additive mask of queries seeing keys `start(i) ..= i`, `[b, 1, s, s]`.
    fn mask(b: usize, s: usize, starts: &[u32]) -> Tensor {
        let v: Vec<f32> = (0..b * s * s)
            .map(|at| {
                let (r, i, j) = (at / (s * s), at / s % s, at % s);
                let lo = starts.get(r * s + i).map_or(0, |&x| x as usize);
                if j >= lo && j <= i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Tensor::from_vec(v, (b, 1, s, s), &Device::Cpu).unwrap()
    }

    fn reference_attention(t: &[Tensor], hpg: usize, starts: &[u32]) -> Tensor {
        let (b, g, s, d) = t[1].dims4().unwrap();
        let expand = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, g, hpg, s, d))
                .unwrap()
                .reshape((b, g * hpg, s, d))
                .unwrap()
        };
        let (k, v) = (expand(&t[1]), expand(&t[2]));
        let scores = (t[0].matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let scores = scores.broadcast_add(&mask(b, s, starts)).unwrap();
        composed_softmax(&scores).matmul(&v).unwrap()
    }

    #[test]
    fn attention_equals_the_composed_ops_causal_grouped_and_packed() {
        let (b, heads, groups, s, d) = (2, 4, 2, 7, 8);
        // Sample 0 causal; sample 1 packed as [0, 4) [4, 7): the second block (positions 3..6)
        // straddles the boundary.
        let packed: Vec<u32> = (0..s as u32).chain([0, 0, 0, 0, 4, 4, 4]).collect();
        for starts in [vec![], packed] {
            let inputs = [
                var(&[b, heads, s, d], 1),
                var(&[b, groups, s, d], 2),
                var(&[b, groups, s, d], 3),
            ];
            let st = (!starts.is_empty()).then(|| Arc::new(starts.clone()));
            let st0 = st.as_ref().map(|st| {
                // Sample 0 stays causal: start 0 everywhere.
                let mut v = st.to_vec();
                v[..s].iter_mut().for_each(|x| *x = 0);
                Arc::new(v)
            });
            let want_starts = st0.as_ref().map(|v| v.to_vec()).unwrap_or_default();
            agree(
                &inputs,
                |t| attention(&t[0], &t[1], &t[2], 1.0 / (d as f64).sqrt(), st0.clone()).unwrap(),
                |t| reference_attention(t, heads / groups, &want_starts),
            );
        }
    }

    /// RoPE tables of `rows` positions (`[rows, d]`), as `Positions` builds them.
    fn tables(positions: &[u32], d: usize) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for &p in positions {
            for j in 0..d {
                let a = p as f32 / 10000f32.powf(2.0 * (j % (d / 2)) as f32 / d as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    /// Split into heads, RoPE on queries and keys, attention, heads back together: the ops
    /// `Gpt::attention` composes when the fused op does not apply.
    fn composed_qkv_attention(
        qkv: &Tensor,
        (g, hpg, d): (usize, usize, usize),
        (cos, sin): (&Tensor, &Tensor),
        starts: &[u32],
    ) -> Tensor {
        let (b, s, _) = qkv.dims3().unwrap();
        let x = qkv.reshape((b, s, g, hpg + 2, d)).unwrap();
        let rope = |t: Tensor| {
            let t = t.contiguous().unwrap();
            let x1 = t.narrow(D::Minus1, 0, d / 2).unwrap();
            let x2 = t.narrow(D::Minus1, d / 2, d / 2).unwrap();
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (t.broadcast_mul(cos).unwrap() + rot.broadcast_mul(sin).unwrap()).unwrap()
        };
        let q = x
            .narrow(3, 0, hpg)
            .unwrap()
            .reshape((b, s, g * hpg, d))
            .unwrap();
        let q = rope(q.transpose(1, 2).unwrap());
        let k = rope(
            x.narrow(3, hpg, 1)
                .unwrap()
                .squeeze(3)
                .unwrap()
                .transpose(1, 2)
                .unwrap(),
        );
        let v = x
            .narrow(3, hpg + 1, 1)
            .unwrap()
            .squeeze(3)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let ctx = reference_attention(&[q, k, v.contiguous().unwrap()], hpg, starts);
        ctx.transpose(1, 2)
            .unwrap()
            .reshape((b, s, g * hpg * d))
            .unwrap()
    }

    #[test]
    fn qkv_attention_equals_split_rope_and_attention() {
        let (b, g, hpg, s, d) = (2, 2, 3, 7, 8);
        let dev = Device::Cpu;
        // Causal with one table for every sample, and packed ([0, 3) [3, 7) in sample 1) with
        // positions restarting per sub-sequence.
        let shared = tables(&(0..s as u32).collect::<Vec<_>>(), d);
        let per_sample: Vec<u32> = (0..s as u32).chain([0, 1, 2, 0, 1, 2, 3]).collect();
        let packed = tables(&per_sample, d);
        let starts: Vec<u32> = [0u32; 7].into_iter().chain([0, 0, 0, 3, 3, 3, 3]).collect();
        let cases = [
            (shared, vec![s, d], vec![]),
            (packed, vec![b, 1, s, d], starts),
        ];
        for ((cos, sin), shape, starts) in cases {
            let cos = Tensor::from_vec(cos, shape.as_slice(), &dev).unwrap();
            let sin = Tensor::from_vec(sin, shape.as_slice(), &dev).unwrap();
            let st = (!starts.is_empty()).then(|| Arc::new(starts.clone()));
            let heads = Heads {
                groups: g,
                per_group: hpg,
                d,
            };
            agree(
                &[var(&[b, s, g * (hpg + 2) * d], 9)],
                |t| {
                    let scale = 1.0 / (d as f64).sqrt();
                    qkv_attention(&t[0], heads, (&cos, &sin), scale, st.clone()).unwrap()
                },
                |t| composed_qkv_attention(&t[0], (g, hpg, d), (&cos, &sin), &starts),
            );
        }
    }

    #[test]
    fn rms_norm_equals_the_composed_ops() {
        let inputs = [var(&[3, 5, 16], 4), var(&[16], 5)];
        agree(
            &inputs,
            |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            |t| {
                let var = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let inv = (var + 1e-6).unwrap().sqrt().unwrap().recip().unwrap();
                t[0].broadcast_mul(&inv)
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
            },
        );
    }

    #[test]
    fn swiglu_equals_the_composed_ops() {
        let inputs = [var(&[2, 3, 12], 6)];
        agree(
            &inputs,
            |t| swiglu(&t[0]).unwrap(),
            |t| {
                let gate = t[0].narrow(D::Minus1, 0, 6).unwrap();
                let up = t[0].narrow(D::Minus1, 6, 6).unwrap();
                (gate.silu().unwrap() * up).unwrap()
            },
        );
    }

    #[test]
    fn cross_entropy_equals_the_composed_ops() {
        let (n, v) = (6, 50);
        let inputs = [var(&[n, v], 7)];
        let labels: Vec<u32> = (0..n as u32).map(|i| i * 7 % v as u32).collect();
        let l2 = labels.clone();
        agree(
            &inputs,
            |t| cross_entropy(&(&t[0] * 8.0).unwrap(), labels.clone()).unwrap(),
            |t| {
                let x = (&t[0] * 8.0).unwrap();
                let max = x.max_keepdim(D::Minus1).unwrap().detach();
                let lse = x
                    .broadcast_sub(&max)
                    .unwrap()
                    .exp()
                    .unwrap()
                    .sum_keepdim(D::Minus1)
                    .unwrap()
                    .log()
                    .unwrap()
                    .broadcast_add(&max)
                    .unwrap();
                let idx = Tensor::from_vec(l2.clone(), (n, 1), &Device::Cpu).unwrap();
                (lse - x.gather(&idx, 1).unwrap())
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
            },
        );
    }

    #[test]
    fn frozen_linear_equals_the_composed_ops() {
        let w = Tensor::from_vec(values(7 * 6, 12), (7, 6), &Device::Cpu).unwrap();
        let inputs = [var(&[2, 5, 6], 13)];
        agree(
            &inputs,
            |t| frozen_linear(&t[0], &w).unwrap(),
            |t| t[0].broadcast_matmul(&w.t().unwrap()).unwrap(),
        );
    }

    /// bf16 (not the gemm path): the same product as candle's matmul, and `g · W` back.
    #[test]
    fn frozen_linear_in_bf16_is_candles_matmul() {
        let w = Tensor::from_vec(values(7 * 6, 14), (7, 6), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = var(&[2, 5, 6], 15);
        let xb = x.as_tensor().to_dtype(DType::BF16).unwrap();
        let got = frozen_linear(&xb, &w).unwrap();
        let want = xb.broadcast_matmul(&w.t().unwrap()).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(max_rel(&f(&got), &f(&want)), 0.0);
        let grads = got
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = f(grads.get(x.as_tensor()).unwrap());
        let ones = Tensor::ones((2, 5, 7), DType::BF16, &Device::Cpu).unwrap();
        let want_dx = f(&ones.broadcast_matmul(&w).unwrap());
        assert!(max_rel(&dx, &want_dx) < 1e-2, "{}", max_rel(&dx, &want_dx));
    }

    #[test]
    fn lora_linear_equals_the_composed_ops() {
        let base = Tensor::from_vec(values(10 * 6, 8), (10, 6), &Device::Cpu).unwrap();
        let inputs = [var(&[5, 6], 9), var(&[3, 6], 10), var(&[10, 3], 11)];
        agree(
            &inputs,
            |t| lora_linear(&t[0], &base, &t[1], &t[2], 0.5).unwrap(),
            |t| {
                let y = t[0].matmul(&base.t().unwrap()).unwrap();
                let low = t[0]
                    .matmul(&t[1].t().unwrap())
                    .unwrap()
                    .matmul(&t[2].t().unwrap())
                    .unwrap();
                (y + (low * 0.5).unwrap()).unwrap()
            },
        );
    }

    #[test]
    fn refusals_are_named() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let e = cross_entropy(&x, vec![1, 4]).unwrap_err().to_string();
        assert!(e.contains("label 4"), "{e}");
        let e = cross_entropy(&x, vec![1]).unwrap_err().to_string();
        assert!(e.contains("1 labels for 2 rows"), "{e}");
        let e = swiglu(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("odd"), "{e}");
        let q = Tensor::zeros((1, 3, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 2, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let e = attention(&q, &k, &k, 1.0, None).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let e = lora_linear(&x, &x, &x, &x, 1.0).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}

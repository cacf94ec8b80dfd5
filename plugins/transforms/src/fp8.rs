//! `fp8-dequant`: block-scaled FP8 weights (DeepSeek-V3, MiniMax-M2: `X.weight` in F8_E4M3
//! with `X.weight_scale_inv` in F32, one scale per 128×128 block) to bf16 (or another float),
//! computed as Megatron-Bridge does — `weight.float() * scale_inv[block]` in f32, then one
//! rounding to the target — so the result is bit-identical to its import. The scale tensors are
//! consumed. A weight waits for its scale (or the scale for its weight) only until the other
//! arrives; in HF checkpoints they sit side by side in the same shard.

use crate::pairs::Pairs;
use bridgeflow_sdk::numeric::{f8_e4m3_to_f64, f8_e5m2_to_f64};
use bridgeflow_sdk::{
    schemars, serde, BufferPool, DType, Emitter, Item, PluginError, Result, StreamPlan, Tensor,
    TensorInfo, Transform,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::HashSet;

pub(crate) fn bf16_name() -> String {
    "bf16".into()
}
fn d128() -> u64 {
    128
}
fn scale_inv() -> String {
    "_scale_inv".into()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct Fp8Config {
    /// Target dtype: bf16 (default), f16 or f32.
    #[serde(default = "bf16_name")]
    pub to: String,
    /// Rows and columns covered by one scale.
    #[serde(default = "d128")]
    pub block_size: u64,
    /// The scale of `X` is `X` + this suffix.
    #[serde(default = "scale_inv")]
    pub scale_suffix: String,
    /// Emit a dequantized tensor larger than this as blocks of rows of at most this size
    /// (pieces `X#<row>` with shard descriptors), each counted against the memory budget as
    /// soon as it is made; 0: whole tensors. Consumers must take pieces (the models mapper and
    /// the writers do).
    #[serde(default = "d16m")]
    pub piece_bytes: u64,
}

pub(crate) fn d16m() -> u64 {
    16 << 20
}

pub struct Fp8Dequant {
    cfg: Fp8Config,
    to: DType,
    /// Weights with a scale, by weight name.
    scaled: HashSet<String>,
    /// Weights and scales waiting for each other, by weight name.
    waiting: Pairs,
    pool: BufferPool,
}

/// The weights are no longer quantized: the HF config written beside them must not say so.
pub(crate) fn no_longer_quantized(plan: &mut StreamPlan) {
    plan.set(
        bridgeflow_sdk::attrs::DROP_CONFIG_KEYS,
        vec!["quantization_config".to_string()],
    );
}

/// The float dtype a dequantizing stage writes: bf16, f16 or f32.
pub(crate) fn float_target(to: &str) -> Result<DType> {
    DType::parse(to)
        .filter(|d| matches!(d, DType::BF16 | DType::F16 | DType::F32))
        .ok_or_else(|| PluginError::config(format!("to = \"{to}\": expected bf16, f16 or f32")))
}

/// `v` rounded (to nearest even) into `dst` as `to` (bf16, f16 or f32).
pub(crate) fn store(to: DType, dst: &mut [u8], v: f32) {
    match to {
        DType::BF16 => dst.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        DType::F16 => dst.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        _ => dst.copy_from_slice(&v.to_le_bytes()),
    }
}

fn is_fp8(d: DType) -> bool {
    matches!(d, DType::F8_E4M3 | DType::F8_E5M2)
}

/// The 256 values of an FP8 format, exactly, as f32.
fn table(d: DType) -> [f32; 256] {
    let decode = if d == DType::F8_E4M3 {
        f8_e4m3_to_f64
    } else {
        f8_e5m2_to_f64
    };
    std::array::from_fn(|b| decode(b as u8) as f32)
}

impl Fp8Dequant {
    /// Row blocks (start, rows) a dequantized tensor of `shape` is emitted in; empty: whole.
    fn blocks(&self, shape: &[u64]) -> Vec<(u64, u64)> {
        let row = shape.iter().skip(1).product::<u64>() * self.to.size() as u64;
        let rows = shape.first().copied().unwrap_or(1);
        if self.cfg.piece_bytes == 0 || shape.len() < 2 || row * rows <= self.cfg.piece_bytes {
            return Vec::new();
        }
        let per = (self.cfg.piece_bytes / row.max(1)).max(1);
        (0..rows.div_ceil(per))
            .map(|i| (i * per, per.min(rows - i * per)))
            .collect()
    }

    fn scale_of(&self, name: &str) -> Option<String> {
        name.strip_suffix(self.cfg.scale_suffix.as_str())
            .map(str::to_string)
    }

    fn dequantize(&self, w: &Tensor, scale: Option<&Tensor>, out: &mut Emitter) -> Result<()> {
        let shape = w.info.shape.to_vec();
        let blocks = self.blocks(&shape);
        if blocks.is_empty() {
            let rows = shape.first().copied().unwrap_or(1);
            let buf = self.dequantize_rows(w, scale, 0..rows.max(1))?;
            let mut info = w.info.clone();
            info.dtype = self.to;
            return out.tensor(Tensor::new(info, buf)?);
        }
        // Block by block, each emitted (and counted) before the next is made.
        for (start, rows) in blocks {
            let buf = self.dequantize_rows(w, scale, start..start + rows)?;
            let mut s = shape.clone();
            s[0] = rows;
            let mut at = vec![0; s.len()];
            at[0] = start;
            let info = TensorInfo::new(format!("{}#{start}", w.name()), self.to, &s)
                .with_shard(&shape, &at);
            out.tensor(Tensor::new(info, buf)?)?;
        }
        Ok(())
    }

    /// Rows `rows` of `w` dequantized (all of it for a scalar or 1-D tensor).
    fn dequantize_rows(
        &self,
        w: &Tensor,
        scale: Option<&Tensor>,
        rows: std::ops::Range<u64>,
    ) -> Result<bridgeflow_sdk::Buffer> {
        let lut = table(w.info.dtype);
        let shape = w.info.shape.to_vec();
        let size = self.to.size();
        let row_elems = shape.iter().skip(1).product::<u64>().max(1) as usize;
        let numel = if shape.len() < 2 {
            w.info.numel().unwrap_or(0) as usize
        } else {
            (rows.end - rows.start) as usize * row_elems
        };
        let mut buf = self.pool.take(numel * size);
        let put = |dst: &mut [u8], v: f32| store(self.to, dst, v);
        let first = rows.start as usize * row_elems;
        let src = &w.bytes()[first..first + numel];
        match scale {
            Some(s) => {
                let (all_rows, cols) = match shape[..] {
                    [r, c] => (r as usize, c as usize),
                    _ => {
                        return Err(PluginError::shape(format!(
                            "'{}': block scales need a 2-D weight, not {}",
                            w.name(),
                            w.info.shape_string()
                        )))
                    }
                };
                let b = self.cfg.block_size as usize;
                let (sr, sc) = (all_rows.div_ceil(b), cols.div_ceil(b));
                if s.info.dtype != DType::F32 || s.info.shape.as_slice() != [sr as u64, sc as u64] {
                    return Err(PluginError::shape(format!(
                        "'{}': a {all_rows}x{cols} weight in {b}x{b} blocks needs F32 [{sr}, {sc}] scales, not {} {}",
                        s.name(),
                        s.info.dtype,
                        s.info.shape_string()
                    )));
                }
                let scales: Vec<f32> = s
                    .bytes()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let r0 = rows.start as usize;
                buf.as_mut_slice()
                    .par_chunks_mut(cols * size)
                    .enumerate()
                    .for_each(|(i, dst)| {
                        let r = r0 + i;
                        let row = &src[i * cols..(i + 1) * cols];
                        let srow = &scales[(r / b) * sc..(r / b + 1) * sc];
                        for (c, (d, &q)) in dst.chunks_exact_mut(size).zip(row).enumerate() {
                            put(d, lut[q as usize] * srow[c / b]);
                        }
                    });
            }
            // No scale: a plain cast, as Bridge falls back to.
            None => buf
                .as_mut_slice()
                .par_chunks_mut(size << 16)
                .zip(src.par_chunks(1 << 16))
                .for_each(|(dst, src)| {
                    for (d, &q) in dst.chunks_exact_mut(size).zip(src) {
                        put(d, lut[q as usize]);
                    }
                }),
        }
        Ok(buf.freeze())
    }
}

impl Transform for Fp8Dequant {
    type Config = Fp8Config;
    const DESCRIPTION: &'static str =
        "Dequantizes block-scaled FP8 weights (X.weight + X.weight_scale_inv) to bf16, as Megatron-Bridge does";
    const QUANT_METHODS: &'static [&'static str] = &["fp8"];

    fn new(cfg: Fp8Config) -> Result<Self> {
        let to = float_target(&cfg.to)?;
        if cfg.block_size == 0 {
            return Err(PluginError::config("block_size must be positive"));
        }
        Ok(Fp8Dequant {
            cfg,
            to,
            scaled: HashSet::new(),
            waiting: Pairs::default(),
            pool: BufferPool::new(16 << 20),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let input = &inputs[0];
        let names: HashSet<&str> = input.tensors.iter().map(|t| t.name()).collect();
        let mut plan = input.clone();
        let mut kept: Vec<TensorInfo> = Vec::new();
        for t in input.tensors.iter() {
            if let Some(w) = self
                .scale_of(t.name())
                .filter(|w| names.contains(w.as_str()))
            {
                self.scaled.insert(w);
                continue;
            }
            let mut t = t.clone();
            if is_fp8(t.dtype) {
                t.dtype = self.to;
                for (start, rows) in self.blocks(&t.shape) {
                    let mut shape = t.shape.to_vec();
                    shape[0] = rows;
                    let mut at = vec![0; shape.len()];
                    at[0] = start;
                    let name = format!("{}#{start}", t.name());
                    kept.push(TensorInfo::new(name, t.dtype, &shape).with_shard(&t.shape, &at));
                }
                if !self.blocks(&t.shape).is_empty() {
                    continue;
                }
            }
            kept.push(t);
        }
        plan.tensors = kept.into();
        plan.set(bridgeflow_sdk::attrs::DTYPE, self.to.torch_name());
        no_longer_quantized(&mut plan);
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        let pair = if let Some(w) = self.scale_of(t.name()).filter(|w| self.scaled.contains(w)) {
            self.waiting.offer(&w, t, false)
        } else if self.scaled.contains(t.name()) {
            let w = t.name().to_string();
            self.waiting.offer(&w, t, true)
        } else if is_fp8(t.info.dtype) {
            return self.dequantize(&t, None, out);
        } else {
            return out.tensor(t);
        };
        let Some((weight, scale)) = pair else {
            return Ok(());
        };
        if !is_fp8(weight.info.dtype) {
            return Err(PluginError::shape(format!(
                "'{}' has a scale but is {}, not FP8",
                weight.name(),
                weight.info.dtype
            )));
        }
        self.dequantize(&weight, Some(&scale), out)
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        self.waiting.finish("scale (or weight)")
    }
}

// ---------------------------------------------------------------------------------- quant

fn projections() -> String {
    r"(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
        .into()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct Fp8QuantConfig {
    /// 2-D float weights to quantize (default: DeepSeek-V3's linear projections; its router,
    /// norms, embeddings and output layer stay as they are).
    #[serde(default = "projections")]
    pub include: String,
    /// Rows and columns covered by one scale (scheme "block").
    #[serde(default = "d128")]
    pub block_size: u64,
    /// "block": DeepSeek-V3's block-scaled FP8 (`weight_scale_inv` per block, `quant_method:
    /// fp8`); "channel": compressed-tensors FP8_DYNAMIC as llm-compressor writes it and vLLM
    /// runs it, also on CPU (`weight_scale` per output row, activations quantized per token at
    /// run time, `quant_method: compressed-tensors`).
    #[serde(default = "block")]
    pub scheme: String,
}

fn block() -> String {
    "block".into()
}

/// How one scale's weights are grouped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scheme {
    /// Square blocks of this size; the scale's reciprocal is stored.
    Block(usize),
    /// One scale per output row.
    Channel,
}

impl Scheme {
    /// (rows, columns) one scale covers in a `[rows, cols]` weight.
    fn group(self, cols: usize) -> (usize, usize) {
        match self {
            Scheme::Block(b) => (b, b),
            Scheme::Channel => (1, cols.max(1)),
        }
    }
    fn scale_name(self, weight: &str) -> String {
        match self {
            Scheme::Block(_) => format!("{weight}_scale_inv"),
            Scheme::Channel => format!("{weight}_scale"),
        }
    }
    fn quantization_config(self) -> serde_json::Value {
        match self {
            Scheme::Block(b) => serde_json::json!({
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [b, b]}),
            Scheme::Channel => {
                let args = |strategy: &str, dynamic: bool, observer: serde_json::Value| {
                    serde_json::json!({
                    "actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": null,
                    "num_bits": 8, "observer": observer, "observer_kwargs": {}, "strategy": strategy,
                    "symmetric": true, "type": "float"})
                };
                serde_json::json!({
                    "config_groups": {"group_0": {
                        "input_activations": args("token", true, serde_json::Value::Null),
                        "output_activations": null,
                        "targets": ["Linear"],
                        "weights": args("channel", false, "minmax".into()),
                    }},
                    "format": "float-quantized",
                    "global_compression_ratio": null,
                    "ignore": ["lm_head"],
                    "kv_cache_scheme": null,
                    "quant_method": "compressed-tensors",
                    "quantization_status": "compressed",
                })
            }
        }
    }
}

/// `fp8-quant`: float weights to block-scaled F8_E4M3 as DeepSeek-V3 stores them — per
/// 128×128 block, scale = amax / 448 and each element cast from x / scale with round to
/// nearest even (torch's `float8_e4m3fn` cast, NaN from 480 up) — with `X.weight_scale_inv`
/// emitted right after `X.weight`; the HF config written beside them gets the
/// `quantization_config` back.
pub struct Fp8Quant {
    include: regex::Regex,
    scheme: Scheme,
    /// The 127 finite positive E4M3 values, by code.
    table: Vec<f32>,
}

impl Fp8Quant {
    fn applies(&self, t: &TensorInfo) -> bool {
        matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16)
            && t.shape.len() == 2
            && self.include.is_match(t.name())
    }

    fn e4m3(&self, x: f32) -> u8 {
        e4m3(&self.table, x)
    }
}

/// The 127 finite positive E4M3 values, by code.
pub(crate) fn e4m3_table() -> Vec<f32> {
    (0u8..0x7f).map(|c| f8_e4m3_to_f64(c) as f32).collect()
}

/// torch's float → float8_e4m3fn: round to nearest, ties to even; NaN from 480 up (`table`:
/// [`e4m3_table`]).
pub(crate) fn e4m3(table: &[f32], x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() || a >= 480.0 {
        return sign | 0x7f;
    }
    let i = table.partition_point(|&v| v < a);
    let code = if i >= table.len() {
        table.len() - 1
    } else if i == 0 || table[i] == a {
        i
    } else {
        let (lo, hi) = (a - table[i - 1], table[i] - a);
        if lo < hi || (lo == hi && (i - 1) % 2 == 0) {
            i - 1
        } else {
            i
        }
    };
    sign | code as u8
}

impl Transform for Fp8Quant {
    type Config = Fp8QuantConfig;
    const DESCRIPTION: &'static str =
        "Quantizes float weights to block-scaled FP8 (F8_E4M3 + weight_scale_inv), as DeepSeek-V3 stores them";

    fn new(cfg: Fp8QuantConfig) -> Result<Self> {
        let include = regex::Regex::new(&cfg.include)
            .map_err(|e| PluginError::config(format!("include: {e}")))?;
        if cfg.block_size == 0 {
            return Err(PluginError::config("block_size must be positive"));
        }
        let scheme = match cfg.scheme.as_str() {
            "block" => Scheme::Block(cfg.block_size as usize),
            "channel" => Scheme::Channel,
            other => {
                return Err(PluginError::config(format!(
                    "scheme = {other:?}: expected \"block\" or \"channel\""
                )))
            }
        };
        Ok(Fp8Quant {
            include,
            scheme,
            table: e4m3_table(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let mut plan = inputs[0].clone();
        let mut out = Vec::new();
        for t in inputs[0].tensors.iter() {
            if t.shard().is_some() && self.include.is_match(t.base_name()) {
                return Err(PluginError::config(format!(
                    "'{}' arrives in pieces; block scales need the whole weight (read without row_pieces)",
                    t.name()
                )));
            }
            if !self.applies(t) {
                out.push(t.clone());
                continue;
            }
            let (br, bc) = self.scheme.group(t.shape[1] as usize);
            let mut q = t.clone();
            q.dtype = DType::F8_E4M3;
            out.push(q);
            let scales = [
                t.shape[0].div_ceil(br as u64),
                t.shape[1].div_ceil(bc as u64),
            ];
            out.push(TensorInfo::new(
                self.scheme.scale_name(t.name()),
                DType::F32,
                &scales,
            ));
        }
        plan.tensors = out.into();
        plan.set(
            bridgeflow_sdk::attrs::CONFIG_UPDATES,
            serde_json::Map::from_iter([(
                "quantization_config".to_string(),
                self.scheme.quantization_config(),
            )]),
        );
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        if !self.applies(&t.info) {
            return out.tensor(t);
        }
        let (rows, cols) = (t.info.shape[0] as usize, t.info.shape[1] as usize);
        let mut values = Vec::new();
        bridgeflow_sdk::numeric::decode_f64(t.info.dtype, t.bytes(), &mut values);
        let x: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
        let (br, bc) = self.scheme.group(cols);
        let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let mut scales = vec![0f32; sr * sc];
        let mut q = vec![0u8; rows * cols];
        for bi in 0..sr {
            for bj in 0..sc {
                let (r0, r1, c0, c1) = (
                    bi * br,
                    ((bi + 1) * br).min(rows),
                    bj * bc,
                    ((bj + 1) * bc).min(cols),
                );
                let amax = (r0..r1)
                    .flat_map(|r| x[r * cols + c0..r * cols + c1].iter())
                    .fold(0f32, |m, v| m.max(v.abs()));
                let s = amax.max(1e-12) / 448.0;
                scales[bi * sc + bj] = s;
                for r in r0..r1 {
                    for c in c0..c1 {
                        q[r * cols + c] = self.e4m3(x[r * cols + c] / s);
                    }
                }
            }
        }
        let mut info = t.info.clone();
        info.dtype = DType::F8_E4M3;
        let scale_info = TensorInfo::new(
            self.scheme.scale_name(t.name()),
            DType::F32,
            &[sr as u64, sc as u64],
        );
        drop(t);
        out.tensor(Tensor::new(info, bridgeflow_sdk::Buffer::from_vec(q))?)?;
        let sb: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        out.tensor(Tensor::new(
            scale_info,
            bridgeflow_sdk::Buffer::from_vec(sb),
        )?)
    }
}

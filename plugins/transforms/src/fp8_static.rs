//! `fp8-static`: NVIDIA ModelOpt's unified HF FP8 checkpoint (`quant_method: modelopt`, what
//! TensorRT-LLM's PyTorch backend and vLLM load), from HF weights (input 0) and the activation
//! and KV-cache scales of a calibration pass (input 1: `X.input_scale`, `k_proj.k_scale`,
//! `v_proj.v_scale`, 0-dim f32, as the `calibrate` stage emits them).
//!
//! Per projection, as ModelOpt 0.37's `export_hf_checkpoint` computes it on a model in `dtype`:
//! the weight rounded to `dtype`, `weight_scale = amax / 448` (0-dim f32), and each element
//! `e4m3(dtype(w / weight_scale))` — the division kept in `dtype` because the 0-dim scale does
//! not promote, so bf16 values are rounded twice; every other float tensor in `dtype`. The config
//! gets ModelOpt's `quantization_config`, and `hf_quant_config.json` goes beside it.
//!
//! The stage holds every weight until the scales are in (they come after a pass over the whole
//! model), so it needs the model in memory once, as the calibration itself does.

use crate::fp8::{e4m3, e4m3_table};
use bridgeflow_sdk::{
    attrs, schemars, serde, Buffer, DType, Emitter, Item, PluginError, PortType, Result,
    StreamPlan, Tensor, TensorInfo, Transform,
};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

fn projections() -> String {
    r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$".into()
}
fn bf16_name() -> String {
    "bf16".into()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct Fp8StaticConfig {
    /// The weights to quantize (default: the decoder's linear projections; embeddings, norms
    /// and lm_head stay in `dtype`).
    #[serde(default = "projections")]
    pub include: String,
    /// The model's dtype during quantization and of the tensors left unquantized (ModelOpt's
    /// `dtype`): bf16, f16 or f32.
    #[serde(default = "bf16_name")]
    pub dtype: String,
    /// "modelopt-hf": ModelOpt's unified HF checkpoint (per-projection scales, 0-dim);
    /// "trtllm": the scales ModelOpt's TensorRT-LLM export uses, for the `trtllm` exporter —
    /// one weight scale per fused group (q, k, v; gate, up: the largest amax), weights divided
    /// in fp32 and clamped, `[1]` factors under TensorRT-LLM's names (`weights_scaling_factor`,
    /// `activation_scaling_factor`, the KV-cache ones).
    #[serde(default = "modelopt_hf")]
    pub layout: String,
}

fn modelopt_hf() -> String {
    "modelopt-hf".into()
}

/// Which checkpoint the scales are laid out for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    ModeloptHf,
    Trtllm,
}

pub struct Fp8Static {
    include: regex::Regex,
    dtype: DType,
    layout: Layout,
    table: Vec<f32>,
    weights: Vec<Tensor>,
    scales: HashMap<String, Tensor>,
    plan: Vec<TensorInfo>,
}

fn scalar_f32(t: &Tensor) -> Result<f32> {
    match (t.info.dtype, t.bytes().len()) {
        (DType::F32, 4) => Ok(f32::from_le_bytes(t.bytes().try_into().unwrap())),
        _ => Err(PluginError::shape(format!(
            "scale '{}' is not a 0-dim f32",
            t.name()
        ))),
    }
}

/// ModelOpt's `quantization_config` for config.json, and its `hf_quant_config.json`.
fn configs() -> (Value, Value) {
    let fp8 = json!({"dynamic": false, "num_bits": 8, "type": "float"});
    let producer = json!({"name": "modelopt", "version": "0.37.0"});
    let qc = json!({
        "config_groups": {"group_0": {"input_activations": fp8, "weights": fp8, "targets": ["Linear"]}},
        "ignore": ["lm_head"],
        "quant_algo": "FP8",
        "kv_cache_scheme": fp8,
        "producer": producer,
        "quant_method": "modelopt",
    });
    let hf_quant = json!({
        "producer": producer,
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]},
    });
    (qc, hf_quant)
}

impl Fp8Static {
    fn quantized(&self, t: &TensorInfo) -> bool {
        t.dtype.is_float() && t.shape.len() == 2 && self.include.is_match(t.name())
    }

    /// The scale tensors a quantized weight carries, in order: (name, shape, where its value
    /// comes from).
    fn scale_names(&self, weight: &str) -> Vec<(String, Vec<u64>, Source)> {
        let stem = weight.strip_suffix(".weight").unwrap_or(weight);
        let calibrated = |n: &str| Source::Calibrated(format!("{stem}.{n}"));
        match self.layout {
            Layout::ModeloptHf => {
                let mut v = vec![
                    (format!("{stem}.weight_scale"), vec![], Source::Weight),
                    (
                        format!("{stem}.input_scale"),
                        vec![],
                        calibrated("input_scale"),
                    ),
                ];
                if stem.ends_with("k_proj") {
                    v.push((format!("{stem}.k_scale"), vec![], calibrated("k_scale")));
                }
                if stem.ends_with("v_proj") {
                    v.push((format!("{stem}.v_scale"), vec![], calibrated("v_scale")));
                }
                v
            }
            Layout::Trtllm => {
                let mut v = vec![
                    (
                        format!("{stem}.weights_scaling_factor"),
                        vec![1],
                        Source::Weight,
                    ),
                    (
                        format!("{stem}.activation_scaling_factor"),
                        vec![1],
                        calibrated("input_scale"),
                    ),
                ];
                // The layer's KV-cache factors, once, beside v.
                if let Some(attn) = stem.strip_suffix(".v_proj") {
                    let (k, v_) = (
                        format!("{attn}.k_proj.k_scale"),
                        format!("{attn}.v_proj.v_scale"),
                    );
                    v.push((
                        format!("{attn}.kv_cache_scaling_factor"),
                        vec![1],
                        Source::Max(k.clone(), v_.clone()),
                    ));
                    v.push((
                        format!("{attn}.k_cache_scaling_factor"),
                        vec![1],
                        Source::Calibrated(k),
                    ));
                    v.push((
                        format!("{attn}.v_cache_scaling_factor"),
                        vec![1],
                        Source::Calibrated(v_),
                    ));
                }
                v
            }
        }
    }

    /// The weights that share one scale with `weight` in this layout (TensorRT-LLM fuses q,
    /// k, v and gate, up): a key naming the group.
    fn group(&self, weight: &str) -> String {
        let stem = weight.strip_suffix(".weight").unwrap_or(weight);
        if self.layout == Layout::Trtllm {
            for (members, key) in [
                (&["q_proj", "k_proj", "v_proj"][..], "qkv"),
                (&["gate_proj", "up_proj"][..], "gate_up"),
            ] {
                for m in members {
                    if let Some(prefix) = stem.strip_suffix(m) {
                        return format!("{prefix}{key}");
                    }
                }
            }
        }
        stem.to_string()
    }

    /// `x` (f32) rounded to the model's dtype, as f32.
    fn round(&self, x: f32) -> f32 {
        use bridgeflow_sdk::half::{bf16, f16};
        match self.dtype {
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::F16 => f16::from_f32(x).to_f32(),
            _ => x,
        }
    }

    /// The weight's values in the model's dtype and their amax.
    fn values(&self, t: &Tensor) -> (Vec<f32>, f32) {
        let mut v = Vec::new();
        bridgeflow_sdk::numeric::decode_f64(t.info.dtype, t.bytes(), &mut v);
        let w: Vec<f32> = v.iter().map(|&x| self.round(x as f32)).collect();
        let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        (w, amax)
    }

    /// The e4m3 weight for scale `s`: ModelOpt's HF export keeps the quotient in the model's
    /// dtype (0-dim scales do not promote), its TensorRT-LLM export in fp32, clamped.
    fn quantize(&self, t: &Tensor, w: &[f32], s: f32) -> Result<Tensor> {
        let q: Vec<u8> = match self.layout {
            Layout::ModeloptHf => w
                .iter()
                .map(|&x| e4m3(&self.table, self.round(x / s)))
                .collect(),
            Layout::Trtllm => w
                .iter()
                .map(|&x| e4m3(&self.table, (x / s).clamp(-448.0, 448.0)))
                .collect(),
        };
        let mut info = t.info.clone();
        info.dtype = DType::F8_E4M3;
        Tensor::new(info, Buffer::from_vec(q))
    }

    fn in_dtype(&self, t: Tensor) -> Result<Tensor> {
        if !t.info.dtype.is_float() || t.info.dtype == self.dtype {
            return Ok(t);
        }
        let mut out = vec![0u8; t.bytes().len() / t.info.dtype.size() * self.dtype.size()];
        bridgeflow_sdk::numeric::cast(t.info.dtype, t.bytes(), self.dtype, &mut out);
        let mut info = t.info.clone();
        info.dtype = self.dtype;
        Tensor::new(info, Buffer::from_vec(out))
    }
}

impl Transform for Fp8Static {
    type Config = Fp8StaticConfig;
    const DESCRIPTION: &'static str =
        "HF weights + calibrated scales -> ModelOpt's unified HF FP8 checkpoint (per-projection e4m3 weights, weight/input/KV scales)";
    const INPUTS: &'static [PortType] = &[PortType::Tensors, PortType::Tensors];
    const RETAINS_INPUTS: bool = true;

    fn new(cfg: Fp8StaticConfig) -> Result<Self> {
        let include = regex::Regex::new(&cfg.include)
            .map_err(|e| PluginError::config(format!("include: {e}")))?;
        let dtype = DType::parse(&cfg.dtype)
            .filter(|d| matches!(d, DType::BF16 | DType::F16 | DType::F32))
            .ok_or_else(|| {
                PluginError::config(format!(
                    "dtype = {:?}: expected bf16, f16 or f32",
                    cfg.dtype
                ))
            })?;
        let layout = match cfg.layout.as_str() {
            "modelopt-hf" => Layout::ModeloptHf,
            "trtllm" => Layout::Trtllm,
            other => {
                return Err(PluginError::config(format!(
                    "layout = {other:?}: expected modelopt-hf or trtllm"
                )))
            }
        };
        Ok(Fp8Static {
            include,
            dtype,
            layout,
            table: e4m3_table(),
            weights: Vec::new(),
            scales: HashMap::new(),
            plan: Vec::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let scales: std::collections::HashSet<&str> =
            inputs[1].tensors.iter().map(|t| t.name()).collect();
        let mut out = Vec::new();
        for t in inputs[0].whole_tensors() {
            if !self.quantized(&t) {
                let dtype = if t.dtype.is_float() {
                    self.dtype
                } else {
                    t.dtype
                };
                out.push(TensorInfo::new(t.name(), dtype, &t.shape));
                continue;
            }
            out.push(TensorInfo::new(t.name(), DType::F8_E4M3, &t.shape));
            for (name, shape, source) in self.scale_names(t.name()) {
                for needed in source.calibrated() {
                    if !scales.contains(needed) {
                        return Err(PluginError::shape(format!(
                            "'{}' needs the calibrated '{needed}', which the scales input lacks",
                            t.name()
                        )));
                    }
                }
                out.push(TensorInfo::new(name, DType::F32, &shape));
            }
        }
        self.plan = out.clone();
        let mut plan = inputs[0].clone();
        plan.tensors = out.into();
        let (qc, hf_quant) = configs();
        let mut updates = Map::new();
        updates.insert("quantization_config".into(), qc);
        updates.insert("dtype".into(), self.dtype.torch_name().into());
        plan.set(attrs::CONFIG_UPDATES, updates);
        plan.set(
            attrs::EXTRA_FILES,
            Map::from_iter([("hf_quant_config.json".to_string(), hf_quant)]),
        );
        Ok(plan)
    }

    fn process(&mut self, port: usize, item: Item, _out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        if t.info.shard().is_some() {
            return Err(PluginError::config(format!(
                "'{}' arrives in pieces; per-tensor scales need whole weights (read without row_pieces)",
                t.name()
            )));
        }
        match port {
            0 => self.weights.push(t),
            _ => {
                self.scales.insert(t.name().to_string(), t);
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Emitter) -> Result<()> {
        // Each group's scale: the largest amax of its members (a group of one: its own).
        let mut amax: HashMap<String, f32> = HashMap::new();
        for t in self.weights.iter().filter(|t| self.quantized(&t.info)) {
            let a = self.values(t).1;
            let e = amax.entry(self.group(t.name())).or_insert(0.0);
            *e = e.max(a);
        }
        for t in std::mem::take(&mut self.weights) {
            if !self.quantized(&t.info) {
                out.tensor(self.in_dtype(t)?)?;
                continue;
            }
            let s = amax[&self.group(t.name())] / 448.0;
            let names = self.scale_names(t.name());
            let (w, _) = self.values(&t);
            let q = self.quantize(&t, &w, s)?;
            drop((t, w));
            out.tensor(q)?;
            for (name, shape, source) in names {
                let value = match &source {
                    Source::Weight => s,
                    Source::Calibrated(n) => self.calibrated(n)?,
                    Source::Max(a, b) => self.calibrated(a)?.max(self.calibrated(b)?),
                };
                let info = TensorInfo::new(name, DType::F32, &shape);
                out.tensor(Tensor::new(
                    info,
                    Buffer::from_vec(value.to_le_bytes().to_vec()),
                )?)?;
            }
        }
        Ok(())
    }
}

/// Where a scale's value comes from.
enum Source {
    /// The weight's own (its group's) scale.
    Weight,
    /// A calibrated scale, by name.
    Calibrated(String),
    /// The larger of two calibrated scales.
    Max(String, String),
}

impl Source {
    fn calibrated(&self) -> Vec<&str> {
        match self {
            Source::Weight => vec![],
            Source::Calibrated(n) => vec![n],
            Source::Max(a, b) => vec![a, b],
        }
    }
}

impl Fp8Static {
    fn calibrated(&self, name: &str) -> Result<f32> {
        let t = self
            .scales
            .get(name)
            .ok_or_else(|| PluginError::shape(format!("the calibrated '{name}' never arrived")))?;
        scalar_f32(t)
    }
}

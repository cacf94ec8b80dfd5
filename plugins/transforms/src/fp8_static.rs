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
}

pub struct Fp8Static {
    include: regex::Regex,
    dtype: DType,
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

    /// The scale tensors a quantized weight carries: its own weight_scale, then the calibrated
    /// ones of its projection.
    fn scale_names(&self, weight: &str) -> Vec<String> {
        let stem = weight.strip_suffix(".weight").unwrap_or(weight);
        let mut v = vec![
            format!("{stem}.weight_scale"),
            format!("{stem}.input_scale"),
        ];
        if stem.ends_with("k_proj") {
            v.push(format!("{stem}.k_scale"));
        }
        if stem.ends_with("v_proj") {
            v.push(format!("{stem}.v_scale"));
        }
        v
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

    /// The F8 weight and its weight_scale.
    fn quantize(&self, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut v = Vec::new();
        bridgeflow_sdk::numeric::decode_f64(t.info.dtype, t.bytes(), &mut v);
        let w: Vec<f32> = v.iter().map(|&x| self.round(x as f32)).collect();
        let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let s = amax / 448.0;
        let q: Vec<u8> = w
            .iter()
            .map(|&x| e4m3(&self.table, self.round(x / s)))
            .collect();
        let mut info = t.info.clone();
        info.dtype = DType::F8_E4M3;
        let stem = t.name().strip_suffix(".weight").unwrap_or(t.name());
        let scale = Tensor::new(
            TensorInfo::new(format!("{stem}.weight_scale"), DType::F32, &[]),
            Buffer::from_vec(s.to_le_bytes().to_vec()),
        )?;
        Ok((Tensor::new(info, Buffer::from_vec(q))?, scale))
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
        Ok(Fp8Static {
            include,
            dtype,
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
            for (i, s) in self.scale_names(t.name()).into_iter().enumerate() {
                if i > 0 && !scales.contains(s.as_str()) {
                    return Err(PluginError::shape(format!(
                        "'{}' needs the calibrated '{s}', which the scales input lacks",
                        t.name()
                    )));
                }
                out.push(TensorInfo::new(s, DType::F32, &[]));
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
        for t in std::mem::take(&mut self.weights) {
            if !self.quantized(&t.info) {
                out.tensor(self.in_dtype(t)?)?;
                continue;
            }
            let names = self.scale_names(t.name());
            let (q, weight_scale) = self.quantize(&t)?;
            drop(t);
            out.tensor(q)?;
            out.tensor(weight_scale)?;
            for name in &names[1..] {
                let s = self.scales.remove(name).ok_or_else(|| {
                    PluginError::shape(format!("the calibrated '{name}' never arrived"))
                })?;
                scalar_f32(&s)?;
                out.tensor(s)?;
            }
        }
        Ok(())
    }
}

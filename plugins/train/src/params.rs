//! The trained parameters: fp32 master values (what the optimizer updates) and the candle
//! variables the forward pass reads, by Megatron name.

use crate::model::ce;
use bridgeflow_sdk::{
    Buffer, DType as SdkDType, PluginError, Result, Tensor as SdkTensor, TensorInfo,
};
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;

pub struct Param {
    pub shape: Vec<usize>,
    /// The dtype the weights came in, and go out, as.
    pub dtype: SdkDType,
    pub master: Vec<f32>,
    pub var: Var,
    /// megatron-core's `wd_mult`: 0 for 1-D parameters (norms) and biases.
    pub decay: bool,
    /// Updated by training (false: the frozen base of a LoRA run).
    pub trainable: bool,
    /// The dtype the forward pass reads it in when not the model's (LoRA's `lora_dtype`).
    pub compute: Option<candle_core::DType>,
}

#[derive(Default)]
pub struct Params {
    pub by_name: BTreeMap<String, Param>,
    /// The dtype the forward pass computes in (bf16 for mixed precision; fp32 by default).
    pub compute: Option<candle_core::DType>,
    /// LoRA's `alpha / dim` when adapters are trained (their parameters are the
    /// `….adapter.linear_in/out.weight` ones).
    pub lora_scale: Option<f64>,
    /// The adapters on each targeted layer (by module: `decoder.layers.0.mlp.linear_fc1`).
    pub adapters: BTreeMap<String, Vec<Adapter>>,
}

/// One LoRA adapter of a layer: its A and B, the rows of the layer's output it feeds (all of
/// them, or one projection's under canonical LoRA), and DoRA's magnitude.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: String,
    pub b: String,
    pub rows: Vec<std::ops::Range<usize>>,
    pub magnitude: Option<String>,
}

/// Weight decay applies to matrices, never to norms or biases (megatron-core's default
/// no-weight-decay condition).
pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() > 1 && !name.ends_with(".bias")
}

impl Params {
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name).map(|p| p.var.as_tensor())
    }

    /// Adds a parameter from its fp32 values (`dtype`: what it came in as, and goes out as).
    pub fn insert(
        &mut self,
        name: &str,
        shape: Vec<usize>,
        dtype: SdkDType,
        master: Vec<f32>,
        dev: &Device,
    ) -> Result<()> {
        let var = Var::from_tensor(&values_in(&master, &shape, dev, self.compute)?).map_err(ce)?;
        self.by_name.insert(
            name.to_string(),
            Param {
                decay: decays(name, &shape),
                shape,
                dtype,
                master,
                var,
                trainable: true,
                compute: None,
            },
        );
        Ok(())
    }

    /// Has the forward pass read `name` in `dtype` (LoRA's `lora_dtype`).
    pub fn compute_in(&mut self, name: &str, dtype: candle_core::DType) -> Result<()> {
        let p = self
            .by_name
            .get_mut(name)
            .ok_or_else(|| PluginError::internal(format!("no parameter '{name}'")))?;
        p.compute = Some(dtype);
        let values = values_in(&p.master, &p.shape, p.var.device(), p.compute)?;
        p.var = Var::from_tensor(&values).map_err(ce)?;
        Ok(())
    }

    /// Copies the master values into the variables the forward pass reads (rounded to the
    /// compute dtype).
    pub fn publish(&self) -> Result<()> {
        for p in self.by_name.values() {
            let dtype = p.compute.or(self.compute);
            let values = values_in(&p.master, &p.shape, p.var.device(), dtype)?;
            p.var.set(&values).map_err(ce)?;
        }
        Ok(())
    }

    /// A parameter as an output tensor, in the dtype it came in as (merged with its LoRA
    /// adapter when it has one).
    pub fn export(&self, name: &str) -> Result<SdkTensor> {
        let p = &self.by_name[name];
        // A LoRA-trained layer goes out merged.
        let bytes = match crate::lora::merged(self, name)? {
            Some(merged) => encode(p.dtype, &merged)?,
            None => encode(p.dtype, &p.master)?,
        };
        let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
        SdkTensor::new(
            TensorInfo::new(name, p.dtype, &shape),
            Buffer::from_vec(bytes),
        )
    }
}

/// fp32 master values as a tensor on `dev`, in `dtype` (none: fp32), what a variable holds.
fn values_in(
    master: &[f32],
    shape: &[usize],
    dev: &Device,
    dtype: Option<candle_core::DType>,
) -> Result<Tensor> {
    let t = Tensor::from_slice(master, shape, dev).map_err(ce)?;
    match dtype {
        Some(d) if d != t.dtype() => t.to_dtype(d).map_err(ce),
        _ => Ok(t),
    }
}

/// fp32 values as `dtype` bytes (round to nearest even).
pub fn encode(dtype: SdkDType, v: &[f32]) -> Result<Vec<u8>> {
    use bridgeflow_sdk::half::{bf16, f16};
    Ok(match dtype {
        SdkDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        SdkDType::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
        SdkDType::BF16 => v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        SdkDType::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        other => {
            return Err(PluginError::unsupported(format!(
                "cannot write trained weights as {}",
                other.name()
            )))
        }
    })
}

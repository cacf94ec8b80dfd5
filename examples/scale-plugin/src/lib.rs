//! An example bridgeflow plugin, written as a third party would: one ordinary trait impl and
//! one export line. It multiplies float tensors by a constant and can rename them by prefix.
//!
//! Build: `cargo build -p bridgeflow-example-scale`; then `bridgeflow plugins` lists `scale`,
//! and `examples/scale-plugin/scale.toml` uses it.

use bridgeflow_sdk::half::{bf16, f16};
use bridgeflow_sdk::{
    schemars, serde, Buffer, DType, Emitter, Item, PluginError, Result, StreamPlan, Tensor,
    Transform,
};

/// The stage's config table in a pipeline file.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct ScaleConfig {
    /// Multiply every selected element by this.
    pub factor: f64,
    /// Only tensors whose name contains one of these strings (default: every float tensor).
    #[serde(default)]
    pub only: Vec<String>,
    /// Rename: replace this name prefix...
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// ...with this one.
    #[serde(default)]
    pub add_prefix: Option<String>,
}

pub struct Scale {
    cfg: ScaleConfig,
}

impl Scale {
    fn selected(&self, name: &str, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
            && (self.cfg.only.is_empty() || self.cfg.only.iter().any(|s| name.contains(s)))
    }

    fn rename(&self, name: &str) -> String {
        let rest = match &self.cfg.strip_prefix {
            Some(p) => name.strip_prefix(p.as_str()).unwrap_or(name),
            None => name,
        };
        format!("{}{rest}", self.cfg.add_prefix.as_deref().unwrap_or(""))
    }
}

impl Transform for Scale {
    type Config = ScaleConfig;
    const DESCRIPTION: &'static str = "Multiplies float tensors by a constant; renames by prefix";

    fn new(cfg: ScaleConfig) -> Result<Self> {
        if !cfg.factor.is_finite() {
            return Err(PluginError::config("factor must be a finite number"));
        }
        Ok(Scale { cfg })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let mut plan = inputs[0].clone();
        for t in plan.tensors.iter_mut() {
            *t = t.clone().with_name(self.rename(t.name()));
        }
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        let info = t.info.clone().with_name(self.rename(t.name()));
        if !self.selected(t.name(), t.info.dtype) {
            // Not scaled: forward the same bytes, no copy.
            return out.tensor(Tensor::new(info, t.data)?);
        }
        let f = self.cfg.factor;
        let src = t.bytes();
        let mut dst = vec![0u8; src.len()];
        match t.info.dtype {
            DType::F32 => {
                for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
                    let v = f32::from_le_bytes(s.try_into().unwrap()) as f64 * f;
                    d.copy_from_slice(&(v as f32).to_le_bytes());
                }
            }
            DType::F16 => {
                for (d, s) in dst.chunks_exact_mut(2).zip(src.chunks_exact(2)) {
                    let v = f16::from_le_bytes(s.try_into().unwrap()).to_f64() * f;
                    d.copy_from_slice(&f16::from_f64(v).to_le_bytes());
                }
            }
            _ => {
                for (d, s) in dst.chunks_exact_mut(2).zip(src.chunks_exact(2)) {
                    let v = bf16::from_le_bytes(s.try_into().unwrap()).to_f64() * f;
                    d.copy_from_slice(&bf16::from_f64(v).to_le_bytes());
                }
            }
        }
        out.tensor(Tensor::new(info, Buffer::from_vec(dst))?)
    }
}

bridgeflow_sdk::export_plugins! {
    "scale" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Example third-party plugin: scales float tensors, renames by prefix",
        transform: Transform(Scale),
    }
}

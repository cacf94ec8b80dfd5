//! `lora-merge`: base weights (input 0, Megatron names: the models mapper or a torch_dist
//! reader) and LoRA adapters — the trainer's `adapters` port on input 1, or a Hugging Face PEFT
//! adapter folder named by `peft` — in; the merged weights out, `W0 + (alpha/r)·B·A` per
//! adapter at its rows (DoRA's rows then rescaled to `m / ‖row‖`), with the base's names, shapes
//! and dtypes: PEFT's `merge_and_unload`, and Megatron-Bridge's `merge_lora`, as a stage.
//!
//! Weights without an adapter pass through as they come; a targeted one waits (whole, its
//! pieces assembled) for its adapters. Adapters are small (MBs), so they are kept.

use crate::assemble::Assembler;
use crate::config::LoraConfig;
use crate::lora::{Part, CANONICAL, LORA};
use crate::model::GptConfig;
use crate::params::{Adapter, Params};
use bridgeflow_sdk::{
    attrs, schemars, serde, Emitter, Item, PluginError, PortType, Result, StreamPlan, TensorInfo,
    Transform,
};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct MergeConfig {
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to merge,
    /// instead of adapters on input 1.
    #[serde(default)]
    pub peft: Option<PathBuf>,
}

/// One targeted layer: its adapters' tensor names, and the base weight once it is whole.
struct Target {
    slots: Vec<(Option<&'static str>, String, String, Option<String>)>,
    weight: Option<Assembler>,
}

pub struct LoraMerge {
    cfg: MergeConfig,
    model: Option<GptConfig>,
    scale: f64,
    /// By weight name (`decoder.layers.0.self_attention.linear_qkv.weight`).
    targets: BTreeMap<String, Target>,
    /// Adapter tensors by name (shape, f32 values).
    adapters: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Transform for LoraMerge {
    type Config = MergeConfig;
    const DESCRIPTION: &'static str =
        "Base weights + LoRA/DoRA adapters (the trainer's adapters port, or a PEFT adapter folder) -> merged weights, W0 + (alpha/r)·B·A";
    /// Base weights, and the adapters (optional with `peft`).
    const INPUTS: &'static [PortType] = &[PortType::Tensors, PortType::Tensors];
    const OPTIONAL_INPUTS: usize = 1;
    const RETAINS_INPUTS: bool = true;

    fn new(cfg: MergeConfig) -> Result<Self> {
        Ok(LoraMerge {
            cfg,
            model: None,
            scale: 0.0,
            targets: BTreeMap::new(),
            adapters: HashMap::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let base = &inputs[0];
        let megatron = base.try_get(attrs::MEGATRON_MODEL)?.ok_or_else(|| {
            PluginError::config(
                "the base weights carry no model config (megatron_model): feed them from the models mapper or a torch_dist reader",
            )
        })?;
        let model = GptConfig::from_megatron(&megatron)?;
        let (lora, names) = match (&self.cfg.peft, inputs.get(1)) {
            (Some(dir), None) => {
                let lora = peft_settings(dir)?;
                check_rank(&lora)?;
                self.adapters = crate::peft::import(dir, &lora, &model)?;
                let names = self.adapters.keys().cloned().collect();
                (lora, names)
            }
            (None, Some(adapters)) => {
                let l = adapters.try_get(LORA)?.ok_or_else(|| {
                    PluginError::config(
                        "the adapters carry no LoRA settings (feed them from the trainer's adapters port)",
                    )
                })?;
                let lora: LoraConfig = serde_json::from_value(serde_json::json!({
                    "dim": l.get("dim"), "alpha": l.get("alpha"),
                    "dora": l.get("dora"), "canonical": l.get("canonical"),
                }))
                .map_err(|e| PluginError::config(format!("the adapters' LoRA settings: {e}")))?;
                check_rank(&lora)?;
                let names: Vec<String> =
                    adapters.whole_tensors().iter().map(|t| t.name().to_string()).collect();
                (lora, names)
            }
            (Some(_), Some(_)) => {
                return Err(PluginError::config(
                    "lora-merge: adapters on input 1 and a peft folder; give one",
                ))
            }
            (None, None) => {
                return Err(PluginError::config(
                    "lora-merge needs adapters: wire the trainer's adapters port as input 1, or set peft = ADAPTER_DIR",
                ))
            }
        };
        self.scale = lora.alpha / lora.dim as f64;
        self.targets = targets(&names, &base.whole_tensors())?;
        self.model = Some(model);
        // Targeted weights go out whole; the rest as they come.
        let mut out = Vec::new();
        for t in base.tensors.iter() {
            match self.targets.contains_key(t.base_name()) {
                false => out.push(t.clone()),
                true if !out.iter().any(|o: &TensorInfo| o.name() == t.base_name()) => {
                    let whole = base
                        .whole_tensors()
                        .into_iter()
                        .find(|w| w.name() == t.base_name());
                    out.extend(whole);
                }
                true => {}
            }
        }
        let mut plan = StreamPlan::new(out);
        plan.attrs = base.attrs.clone();
        Ok(plan)
    }

    fn process(&mut self, port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        if port == 1 {
            let values = crate::assemble::decode(&t)?;
            let shape = t.info.shape.iter().map(|&d| d as usize).collect();
            self.adapters.insert(t.name().to_string(), (shape, values));
        } else if let Some(target) = self.targets.get_mut(t.info.base_name()) {
            let shape: Vec<usize> = match t.info.shard() {
                Some(s) => s.global_shape.iter().map(|&d| d as usize).collect(),
                None => t.info.shape.iter().map(|&d| d as usize).collect(),
            };
            target
                .weight
                .get_or_insert_with(|| Assembler::new(&[(t.info.base_name().to_string(), shape)]))
                .add(&t)?;
        } else {
            return out.tensor(t);
        }
        self.emit_ready(out)
    }

    fn finish(&mut self, out: &mut Emitter) -> Result<()> {
        self.emit_ready(out)?;
        if let Some((name, t)) = self.targets.iter().next() {
            let missing: Vec<&str> = t
                .slots
                .iter()
                .flat_map(|(_, a, b, m)| [Some(a), Some(b), m.as_ref()])
                .flatten()
                .filter(|n| !self.adapters.contains_key(*n))
                .map(String::as_str)
                .collect();
            return Err(PluginError::shape(match missing.is_empty() {
                true => format!("the base weights ended without '{name}'"),
                false => format!(
                    "'{name}': the adapters ended without {}",
                    missing.join(", ")
                ),
            }));
        }
        Ok(())
    }
}

/// r ≥ 1 and a positive alpha, before anything divides by r.
fn check_rank(lora: &LoraConfig) -> Result<()> {
    if lora.dim == 0 || !(lora.alpha.is_finite() && lora.alpha > 0.0) {
        return Err(PluginError::config(format!(
            "lora-merge: r {} and alpha {}: r must be at least 1 and alpha a positive number",
            lora.dim, lora.alpha
        )));
    }
    Ok(())
}

/// The LoRA settings of a PEFT adapter folder, for its import: canonical (each projection's
/// adapter as it is), DoRA when it says so.
fn peft_settings(dir: &std::path::Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| PluginError::io(&path, "cannot read", e))?;
    let c: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PluginError::format(format!("{}: {e}", path.display())))?;
    let targets: Vec<String> = crate::peft::target_modules(&c)
        .iter()
        .filter_map(|t| crate::peft::canonical_target(t))
        .map(String::from)
        .collect();
    serde_json::from_value(serde_json::json!({
        "dim": c["r"], "alpha": c["lora_alpha"], "dora": c["use_dora"].as_bool().unwrap_or(false),
        "canonical": true, "target_modules": targets,
    }))
    .map_err(|e| PluginError::config(format!("{}: {e}", path.display())))
}

/// The targeted weights and their adapters' names, grouped from the adapter tensors' names;
/// each against the base's weights.
fn targets(names: &[String], base: &[TensorInfo]) -> Result<BTreeMap<String, Target>> {
    let mut out: BTreeMap<String, Target> = BTreeMap::new();
    for name in names {
        let (module, key) = module_and_key(name)
            .ok_or_else(|| PluginError::shape(format!("'{name}' is not a LoRA adapter tensor")))?;
        let weight = format!("{module}.weight");
        if !base.iter().any(|t| t.name() == weight) {
            return Err(PluginError::shape(format!(
                "adapter '{name}': the base weights have no '{weight}'"
            )));
        }
        let prefix = match key {
            Some(k) => format!("{module}.adapter.{k}"),
            None => format!("{module}.adapter"),
        };
        let t = out.entry(weight).or_insert_with(|| Target {
            slots: Vec::new(),
            weight: None,
        });
        if !t.slots.iter().any(|s| s.0 == key) {
            let magnitude = names
                .contains(&format!("{prefix}.weight_magnitude"))
                .then(|| format!("{prefix}.weight_magnitude"));
            t.slots.push((
                key,
                format!("{prefix}.linear_in.weight"),
                format!("{prefix}.linear_out.weight"),
                magnitude,
            ));
        }
    }
    Ok(out)
}

/// `decoder.layers.0.mlp.linear_fc1.adapter.adapter_up.linear_in.weight` →
/// (`decoder.layers.0.mlp.linear_fc1`, Some(`adapter_up`)).
fn module_and_key(name: &str) -> Option<(&str, Option<&'static str>)> {
    let (module, tail) = name.split_once(".adapter.")?;
    let key = CANONICAL
        .iter()
        .map(|c| c.1)
        .find(|k| tail.starts_with(&format!("{k}.")));
    Some((module, key))
}

impl LoraMerge {
    /// Emits every targeted weight whose base and adapters are all in.
    fn emit_ready(&mut self, out: &mut Emitter) -> Result<()> {
        let ready: Vec<String> = self
            .targets
            .iter()
            .filter(|(_, t)| {
                t.weight.as_ref().is_some_and(Assembler::is_complete)
                    && t.slots.iter().all(|(_, a, b, m)| {
                        [Some(a), Some(b), m.as_ref()]
                            .into_iter()
                            .flatten()
                            .all(|n| self.adapters.contains_key(n))
                    })
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in ready {
            let target = self.targets.remove(&name).expect("listed");
            out.tensor(self.merge(&name, target)?)?;
        }
        Ok(())
    }

    /// One weight merged with its adapters, through the trainer's own merge.
    fn merge(&self, name: &str, target: Target) -> Result<bridgeflow_sdk::Tensor> {
        let model = self.model.as_ref().expect("planned");
        let dev = candle_core::Device::Cpu;
        let w = target
            .weight
            .expect("complete")
            .pending
            .into_iter()
            .next()
            .expect("one weight")
            .1;
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let mut params = Params {
            lora_scale: Some(self.scale),
            ..Params::default()
        };
        let rows = w.shape[0];
        params.insert(name, w.shape, w.dtype, w.values, &dev)?;
        for (key, a, b, m) in target.slots {
            let part = match key {
                Some(k) => CANONICAL
                    .iter()
                    .find(|c| c.1 == k)
                    .map_or(Part::All, |c| c.3),
                None => Part::All,
            };
            for n in [Some(&a), Some(&b), m.as_ref()].into_iter().flatten() {
                let (shape, values) = self.adapters[n].clone();
                params.insert(n, shape, bridgeflow_sdk::DType::F32, values, &dev)?;
            }
            params
                .adapters
                .entry(module.to_string())
                .or_default()
                .push(Adapter {
                    a,
                    b,
                    rows: part.rows(model, rows),
                    magnitude: m,
                });
        }
        params.export(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_group_by_layer() {
        let names: Vec<String> = [
            "decoder.layers.0.self_attention.linear_qkv.adapter.adapter_q.linear_in.weight",
            "decoder.layers.0.self_attention.linear_qkv.adapter.adapter_q.linear_out.weight",
            "decoder.layers.0.self_attention.linear_qkv.adapter.adapter_v.linear_in.weight",
            "decoder.layers.0.self_attention.linear_qkv.adapter.adapter_v.linear_out.weight",
            "decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight",
            "decoder.layers.0.mlp.linear_fc2.adapter.linear_out.weight",
            "decoder.layers.0.mlp.linear_fc2.adapter.weight_magnitude",
        ]
        .map(String::from)
        .to_vec();
        let base = [
            TensorInfo::new(
                "decoder.layers.0.self_attention.linear_qkv.weight",
                bridgeflow_sdk::DType::F32,
                &[8, 4],
            ),
            TensorInfo::new(
                "decoder.layers.0.mlp.linear_fc2.weight",
                bridgeflow_sdk::DType::F32,
                &[4, 4],
            ),
        ];
        let t = targets(&names, &base).unwrap();
        let qkv = &t["decoder.layers.0.self_attention.linear_qkv.weight"];
        assert_eq!(
            qkv.slots.iter().map(|s| s.0).collect::<Vec<_>>(),
            [Some("adapter_q"), Some("adapter_v")]
        );
        let fc2 = &t["decoder.layers.0.mlp.linear_fc2.weight"];
        assert_eq!(
            fc2.slots[0].3.as_deref(),
            Some("decoder.layers.0.mlp.linear_fc2.adapter.weight_magnitude")
        );
        assert!(
            targets(&names, &base[..1]).is_err(),
            "an adapter on a weight the base lacks"
        );
    }
}

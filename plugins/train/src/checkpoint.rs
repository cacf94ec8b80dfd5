//! The trainer's own resume checkpoints: everything a bit-identical continuation needs — fp32
//! master weights, AdamW's moments and step, the iteration and the samples consumed (the data
//! position, as Megatron's `consumed_train_samples`) — under `SAVE/iter_{N:07}/`, with Megatron's
//! tracker `latest_checkpointed_iteration.txt` beside them.
//!
//! A run with a frozen base (LoRA, DoRA) keeps only what trains — the adapters and their
//! moments — as Megatron-Bridge's PEFT checkpoints do; the base is referenced (its parameters'
//! names and a fingerprint) and must be fed again, unchanged, to resume.
//!
//! Atomic: an iteration's folder is written under a hidden name, its files synced, then
//! renamed; the tracker is replaced (write, sync, rename) only after that, so a kill at any
//! moment leaves the previous checkpoint as the one a resume finds.

use crate::optim::AdamW;
use crate::params::Params;
use bridgeflow_sdk::serde_json::{self, json};
use bridgeflow_sdk::{PluginError, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const TRACKER: &str = "latest_checkpointed_iteration.txt";
const TENSORS: &str = "trainer_state.safetensors";
const STATE: &str = "train_state.json";

/// Where training stands, as saved.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub iteration: u64,
    pub consumed_samples: u64,
    /// Samples of the iterations that updated the weights (the schedule's count; fp16 skips).
    pub scheduled_samples: u64,
    /// fp16's loss scaler: (scale, growth tracker, hysteresis tracker).
    pub loss_scale: Option<(f64, u64, u64)>,
}

fn iter_dir(root: &Path, iteration: u64) -> PathBuf {
    root.join(format!("iter_{iteration:07}"))
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl Fn(std::io::Error) -> PluginError + 'a {
    move |e| PluginError::io(path, what, e)
}

/// `bytes` to `path`, its blocks reserved first (a full disk fails before anything is
/// written), then synced.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io(path, "cannot create"))?;
    bridgeflow_sdk::fsutil::reserve(&f, path, bytes.len() as u64)?;
    f.write_all(bytes).map_err(io(path, "cannot write"))?;
    f.sync_all().map_err(io(path, "cannot sync"))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// What a checkpoint holds, copied out of the trainer (so that it can be written while
/// training goes on): every tensor's name, shape and fp32 bytes, and the JSON state.
pub struct Snapshot {
    blobs: Vec<(String, Vec<usize>, Vec<u8>)>,
    state: serde_json::Value,
    iteration: u64,
}

impl Snapshot {
    /// The state after `pos.iteration` iterations.
    pub fn take(params: &Params, adam: &AdamW, pos: &Position) -> Snapshot {
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, p) in params.by_name.iter().filter(|(_, p)| p.trainable) {
            blobs.push((
                format!("param.{name}"),
                p.shape.clone(),
                f32_bytes(&p.master),
            ));
            if let Some((m, v)) = adam.moments.get(name) {
                blobs.push((format!("exp_avg.{name}"), p.shape.clone(), f32_bytes(m)));
                blobs.push((format!("exp_avg_sq.{name}"), p.shape.clone(), f32_bytes(v)));
            }
        }
        let state = json!({
            "iteration": pos.iteration,
            "consumed_train_samples": pos.consumed_samples,
            "scheduled_train_samples": pos.scheduled_samples,
            "loss_scale": pos.loss_scale.map(|(s, g, h)| json!({"scale": s, "growth_tracker": g, "hysteresis_tracker": h})),
            "adam_step": adam.step,
            "adam_beta1": adam.beta1,
            "adam_beta2": adam.beta2,
            "adam_eps": adam.eps,
            "frozen_base": frozen_base(params),
        });
        Snapshot {
            blobs,
            state,
            iteration: pos.iteration,
        }
    }

    /// Writes it under `root` atomically, the tracker last.
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(root).map_err(io(root, "cannot create"))?;
        let target = iter_dir(root, self.iteration);
        let staging = root.join(format!(
            ".iter_{:07}.partial-{}",
            self.iteration,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(&staging, "cannot create"))?;
        // A failure (a full disk) leaves no half-written folder behind, only the previous
        // checkpoint and its tracker.
        if let Err(e) = self.stage(&staging) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target, "cannot replace"))?;
        }
        std::fs::rename(&staging, &target).map_err(io(&target, "cannot commit"))?;
        let tracker_tmp = root.join(format!(".{TRACKER}.partial-{}", std::process::id()));
        if let Err(e) = write_synced(&tracker_tmp, self.iteration.to_string().as_bytes()) {
            let _ = std::fs::remove_file(&tracker_tmp);
            return Err(e);
        }
        std::fs::rename(&tracker_tmp, root.join(TRACKER))
            .map_err(io(root, "cannot update the tracker in"))?;
        if let Ok(d) = std::fs::File::open(root) {
            let _ = d.sync_all();
        }
        Ok(target)
    }

    /// The checkpoint's files, written and synced in `staging`.
    fn stage(&self, staging: &Path) -> Result<()> {
        let views: Vec<(String, TensorView<'_>)> = self
            .blobs
            .iter()
            .map(|(n, s, b)| {
                Ok((
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).map_err(st)?,
                ))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, None).map_err(st)?;
        write_synced(&staging.join(TENSORS), &bytes)?;
        write_synced(&staging.join(STATE), self.state.to_string().as_bytes())
    }
}

/// The frozen parameters a checkpoint leaves out: their count and a fingerprint (CRC-32C
/// over each one's name, shape and first and last 4 KiB of values — enough to tell another base
/// from this one without reading all of it again); null when every parameter trains.
fn frozen_base(params: &Params) -> serde_json::Value {
    let frozen: Vec<_> = params
        .by_name
        .iter()
        .filter(|(_, p)| !p.trainable)
        .collect();
    if frozen.is_empty() {
        return serde_json::Value::Null;
    }
    let mut crc = 0u32;
    for (name, p) in &frozen {
        crc = crc32c::crc32c_append(crc, name.as_bytes());
        crc = crc32c::crc32c_append(crc, format!("{:?}", p.shape).as_bytes());
        let edge = p.master.len().min(1024);
        for v in p.master[..edge]
            .iter()
            .chain(&p.master[p.master.len() - edge..])
        {
            crc = crc32c::crc32c_append(crc, &v.to_le_bytes());
        }
    }
    json!({"parameters": frozen.len(), "fingerprint": format!("{crc:08x}")})
}

/// Saves the state after `pos.iteration` iterations.
pub fn save(root: &Path, params: &Params, adam: &AdamW, pos: &Position) -> Result<PathBuf> {
    Snapshot::take(params, adam, pos).write(root)
}

fn st(e: safetensors::SafeTensorError) -> PluginError {
    PluginError::format(format!("trainer checkpoint: {e}"))
}

/// The iteration the tracker under `root` names, if there is one.
pub fn latest(root: &Path) -> Result<Option<u64>> {
    let path = root.join(TRACKER);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    text.trim().parse::<u64>().map(Some).map_err(|_| {
        PluginError::format(format!(
            "{}: '{}' is not an iteration",
            path.display(),
            text.trim()
        ))
    })
}

/// Restores the state saved at `iteration` into `params` and `adam`: every parameter present,
/// of the same shape.
pub fn load(
    root: &Path,
    iteration: u64,
    params: &mut Params,
    adam: &mut AdamW,
) -> Result<Position> {
    let dir = iter_dir(root, iteration);
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path, "cannot read"))?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PluginError::format(format!("{}: {e}", state_path.display())))?;
    let num = |k: &str| {
        state[k].as_u64().ok_or_else(|| {
            PluginError::format(format!("{}: no integer '{k}'", state_path.display()))
        })
    };
    let consumed = num("consumed_train_samples")?;
    let scaler = &state["loss_scale"];
    let loss_scale = match scaler.is_null() {
        true => None,
        false => Some((
            scaler["scale"].as_f64().unwrap_or(1.0),
            scaler["growth_tracker"].as_u64().unwrap_or(0),
            scaler["hysteresis_tracker"].as_u64().unwrap_or(0),
        )),
    };
    let pos = Position {
        iteration: num("iteration")?,
        consumed_samples: consumed,
        scheduled_samples: state["scheduled_train_samples"]
            .as_u64()
            .unwrap_or(consumed),
        loss_scale,
    };
    let path = dir.join(TENSORS);
    let bytes = std::fs::read(&path).map_err(io(&path, "cannot read"))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(st)?;
    let values = |key: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = tensors.tensor(key).map_err(|_| {
            PluginError::shape(format!("{}: no '{key}' (another model?)", path.display()))
        })?;
        if t.shape() != shape || t.dtype() != Dtype::F32 {
            return Err(PluginError::shape(format!(
                "{}: '{key}' is {:?} {:?}; the model has {shape:?} F32",
                path.display(),
                t.dtype(),
                t.shape()
            )));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    };
    let base = &state["frozen_base"];
    if !base.is_null() && *base != frozen_base(params) {
        return Err(PluginError::mismatch(format!(
            "{}: the checkpoint was trained on another frozen base ({base}; the weights fed now give {})",
            state_path.display(),
            frozen_base(params)
        )));
    }
    adam.moments.clear();
    for (name, p) in params.by_name.iter_mut() {
        if !p.trainable && !base.is_null() {
            continue; // the base, fed again
        }
        p.master = values(&format!("param.{name}"), &p.shape)?;
        if tensors.tensor(&format!("exp_avg.{name}")).is_ok() {
            let m = values(&format!("exp_avg.{name}"), &p.shape)?;
            let v = values(&format!("exp_avg_sq.{name}"), &p.shape)?;
            adam.moments.insert(name.clone(), (m, v));
        }
    }
    adam.step = num("adam_step")?;
    params.publish()?;
    Ok(pos)
}

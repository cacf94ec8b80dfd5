//! The trainer's checkpoints, as Megatron-Bridge saves them: a torch_dist checkpoint under
//! `SAVE/iter_{N:07}/` that megatron-core loads and Megatron-Bridge resumes from — the model's
//! weights under their megatron-core keys, the distributed optimizer's state in its
//! `fully_reshardable` form (`optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`, each with its
//! model key's shape and chunks: the fp32 master weights and AdamW's moments), the common state
//! (parameter groups with Adam's step, the scheduler's state; see [`crate::bridge_state`]),
//! `train_state.pt` (iteration, samples consumed: the data position, as Megatron's
//! `consumed_train_samples`) and `run_config.yaml` — with Megatron's tracker
//! `latest_checkpointed_iteration.txt` and `latest_train_state.pt` beside them.
//!
//! No RNG state is saved (`save_rng: false` in the run config, which Bridge reads on resume):
//! bridgeflow's loop keeps no generator state — initialisation is seeded once, and LoRA
//! dropout's masks are a function of (seed, iteration, micro-batch, site) — so a continuation
//! needs none.
//!
//! bridgeflow resumes from these files alone, bit for bit — its own checkpoints and Bridge's
//! alike (the optimizer's tensors assembled from whatever chunks hold them, every item's
//! CRC-32 checked). It adds one file of its own, `bridgeflow_resume.json`: the fingerprint of
//! a LoRA/DoRA run's frozen base.
//!
//! A run with a frozen base (LoRA, DoRA) keeps only what trains — the adapters and their
//! moments — as Megatron-Bridge's PEFT checkpoints do; the base is referenced (its parameters'
//! names and a fingerprint) and must be fed again, unchanged, to resume.
//!
//! Atomic: an iteration's folder is written under a hidden name, its files synced, then
//! renamed; the tracker is replaced (write, sync, rename) only after that, so a kill at any
//! moment leaves the previous checkpoint as the one a resume finds.

use crate::bridge_state::{self, Group, Progress, RunSettings, OPTIMIZER_STATES};
use crate::optim::AdamW;
use crate::params::Params;
use bridgeflow_megatron::checkpoint::{self, CheckpointMeta, ItemReader, TorchSave};
use bridgeflow_megatron::emit::{none_list_pickle, tensor_pickle, torch_save, Archive};
use bridgeflow_megatron::placement::{dist_place, DistPlace};
use bridgeflow_megatron::{dcp, names, run_config};
use bridgeflow_sdk::serde_json::{self, json};
use bridgeflow_sdk::{DType, PluginError, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const TRACKER: &str = names::LATEST_ITERATION;
const LATEST_TRAIN_STATE: &str = "latest_train_state.pt";
const DATA_FILE: &str = "__0_0.distcp";
const RESUME_INDEX: &str = "bridgeflow_resume.json";

/// What the checkpoint repeats of the run besides the state: its settings, the model's layer
/// count (megatron-core stacks the layers' tensors) and the run config to save beside it.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub settings: RunSettings,
    pub num_layers: u64,
    pub run_config: Option<String>,
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

/// `bytes` to `dir/name` by a synced temporary file renamed over it.
fn replace_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    if let Err(e) = write_synced(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join(name)).map_err(io(dir, "cannot update a file in"))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A trainable parameter as saved: the model's tensor (in the model's dtype; none when that is
/// fp32, whose bytes are the master's) and the optimizer's three fp32 tensors, in
/// [`OPTIMIZER_STATES`]' order.
struct Saved {
    name: String,
    shape: Vec<u64>,
    dtype: DType,
    model: Option<Vec<u8>>,
    states: [Vec<u8>; 3],
}

/// One tensor item of the data file: a chunk (its DCP key, global shape, offsets), its payload
/// and the archive around it.
struct Item<'a> {
    key: String,
    dtype: DType,
    global: Vec<u64>,
    offsets: Vec<u64>,
    local: Vec<u64>,
    payload: &'a [u8],
    archive: Archive,
}

/// What a checkpoint holds, copied out of the trainer (so that it can be written while
/// training goes on).
pub struct Snapshot {
    tensors: Vec<Saved>,
    groups: Vec<Group>,
    progress: Progress,
    adam_step: u64,
    info: RunInfo,
    frozen_base: serde_json::Value,
}

impl Snapshot {
    /// The state after `pos.iteration` iterations.
    pub fn take(params: &Params, adam: &AdamW, pos: &Progress, info: &RunInfo) -> Result<Snapshot> {
        let mut tensors = Vec::new();
        let mut groups = Vec::new();
        for (name, p) in params.by_name.iter().filter(|(_, p)| p.trainable) {
            let zeros;
            let (m, v) = match adam.moments.get(name) {
                Some((m, v)) => (m, v),
                // No update yet (fp16's first steps skipped): Adam's moments are zeros.
                None => {
                    zeros = vec![0.0f32; p.master.len()];
                    (&zeros, &zeros)
                }
            };
            let dtype = model_dtype(p.compute.or(params.compute), p.dtype);
            tensors.push(Saved {
                name: name.clone(),
                shape: p.shape.iter().map(|&d| d as u64).collect(),
                dtype,
                model: match dtype {
                    DType::F32 => None,
                    _ => Some(crate::params::encode(dtype, &p.master)?),
                },
                states: [f32_bytes(&p.master), f32_bytes(m), f32_bytes(v)],
            });
            groups.push(Group::of(name, p.decay));
        }
        Ok(Snapshot {
            tensors,
            groups,
            progress: pos.clone(),
            adam_step: adam.step,
            info: info.clone(),
            frozen_base: frozen_base(params),
        })
    }

    /// Writes it under `root` atomically, the tracker last.
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        let iteration = self.progress.iteration;
        std::fs::create_dir_all(root).map_err(io(root, "cannot create"))?;
        let target = iter_dir(root, iteration);
        let staging = root.join(format!(
            ".iter_{iteration:07}.partial-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(&staging, "cannot create"))?;
        // A failure (a full disk) leaves no half-written folder behind, only the previous
        // checkpoint and its tracker.
        let train_state = torch_save(
            "train_state",
            &bridge_state::train_state(&self.info.settings, &self.progress),
            "train_state",
        );
        if let Err(e) = self.stage(&staging, &train_state) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target, "cannot replace"))?;
        }
        std::fs::rename(&staging, &target).map_err(io(&target, "cannot commit"))?;
        replace_synced(root, LATEST_TRAIN_STATE, &train_state)?;
        replace_synced(root, TRACKER, iteration.to_string().as_bytes())?;
        if let Ok(d) = std::fs::File::open(root) {
            let _ = d.sync_all();
        }
        Ok(target)
    }

    /// The data file's items in order: the `_extra_state` byte objects megatron-core's
    /// layers have, then each parameter's model tensor and its optimizer state, placed as
    /// megatron-core keys them (the layers' tensors stacked, one chunk per layer).
    fn items(&self) -> (Vec<(String, Archive)>, Vec<Item<'_>>) {
        let mut items = Vec::new();
        let mut extra = BTreeMap::new();
        for t in &self.tensors {
            let zeros = vec![0; t.shape.len()];
            let place = dist_place(
                &t.name,
                t.shape.clone(),
                zeros,
                t.shape.clone(),
                Some(self.info.num_layers),
            );
            for k in names::te_extra_state(&place.key, &place.global, true, false) {
                extra.entry(k).or_insert(());
            }
            let weights = t.model.as_deref().unwrap_or(&t.states[0]);
            let model = (place.key.clone(), t.dtype, weights);
            let states = OPTIMIZER_STATES.iter().zip(&t.states).map(|(&s, b)| {
                let key = bridge_state::optimizer_key(s, &place.key);
                (key, DType::F32, &b[..])
            });
            for (key, dtype, payload) in std::iter::once(model).chain(states) {
                let archive = Archive::new(
                    "archive",
                    tensor_pickle(dtype, &place.local),
                    Some(payload.len() as u64),
                    &dcp::archive_seed(&key, &place.offsets),
                );
                items.push(Item {
                    key,
                    dtype,
                    global: place.global.clone(),
                    offsets: place.offsets.clone(),
                    local: place.local.clone(),
                    payload,
                    archive,
                });
            }
        }
        let bytes = extra
            .into_keys()
            .map(|k| {
                let a = Archive::new("archive", none_list_pickle(), None, &k);
                (k, a)
            })
            .collect();
        (bytes, items)
    }

    /// The checkpoint's files, written and synced in `staging`.
    fn stage(&self, staging: &Path, train_state: &[u8]) -> Result<()> {
        let (bytes, mut items) = self.items();
        // Lay out: byte objects first, then the tensors, each archive whole.
        let mut cursor = 0u64;
        let mut place = |len: u64| {
            let stored = dcp::Stored {
                file: DATA_FILE.into(),
                offset: cursor,
                len,
            };
            cursor += len;
            stored
        };
        let byte_items: Vec<(String, dcp::Stored, Vec<u8>)> = bytes
            .into_iter()
            .map(|(key, a)| {
                let b = a.bytes();
                (key, place(b.len() as u64), b)
            })
            .collect();
        let stored: Vec<dcp::Stored> = items.iter().map(|it| place(it.archive.total)).collect();
        let path = staging.join(DATA_FILE);
        let f = std::fs::File::create(&path).map_err(io(&path, "cannot create"))?;
        bridgeflow_sdk::fsutil::reserve(&f, &path, cursor)?;
        let at = |b: &[u8], off: u64| f.write_all_at(b, off).map_err(io(&path, "cannot write"));
        for (_, s, b) in &byte_items {
            at(b, s.offset)?;
        }
        for (it, s) in items.iter_mut().zip(&stored) {
            let crc = crc32fast::hash(it.payload);
            let payload_at = s.offset + it.archive.payload_offset().expect("a payload");
            at(it.payload, payload_at)?;
            for (off, b) in it.archive.frame(crc) {
                at(&b, s.offset + off)?;
            }
        }
        f.sync_all().map_err(io(&path, "cannot sync"))?;
        let chunks: Vec<dcp::Chunk> = items
            .iter()
            .zip(stored)
            .map(|(it, stored)| dcp::Chunk {
                key: &it.key,
                dtype: it.dtype,
                global: &it.global,
                offsets: &it.offsets,
                local: &it.local,
                stored,
            })
            .collect();
        let byte_index: Vec<(&str, dcp::Stored)> = byte_items
            .iter()
            .map(|(k, s, _)| (k.as_str(), s.clone()))
            .collect();
        let common = bridge_state::common_state(
            &self.groups,
            &self.info.settings,
            &self.progress,
            self.adam_step,
        );
        write_synced(
            &staging.join("common.pt"),
            &torch_save("common", &common, "common"),
        )?;
        write_synced(&staging.join("metadata.json"), dcp::METADATA_JSON)?;
        write_synced(&staging.join("train_state.pt"), train_state)?;
        if let Some(rc) = &self.info.run_config {
            let rc = run_config::with_values(rc, &[("save_optim", "true"), ("save_rng", "false")]);
            write_synced(&staging.join("run_config.yaml"), rc.as_bytes())?;
        }
        write_synced(
            &staging.join(RESUME_INDEX),
            self.resume_index().to_string().as_bytes(),
        )?;
        // .metadata last: without it the folder is not a checkpoint.
        write_synced(
            &staging.join(".metadata"),
            &dcp::metadata_pickle(&chunks, &byte_index),
        )
    }

    /// What bridgeflow records beside Bridge's files: the frozen base a LoRA/DoRA run trained
    /// on (its fingerprint), which a resume must be fed again.
    fn resume_index(&self) -> serde_json::Value {
        json!({ "frozen_base": self.frozen_base })
    }
}

/// The dtype of a saved model tensor: the one it computes in under mixed precision (as
/// Megatron-Bridge's `bf16_mixed` / `fp16_mixed` model parameters are), else the one it came in.
fn model_dtype(compute: Option<candle_core::DType>, input: DType) -> DType {
    match compute {
        Some(candle_core::DType::BF16) => DType::BF16,
        Some(candle_core::DType::F16) => DType::F16,
        _ => input,
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

/// The fp32 values of a parameter's optimizer tensor `key` (placed as `place` says) from the
/// checkpoint in `dir`.
fn read_state(
    items: &mut ItemReader,
    meta: &CheckpointMeta,
    dir: &Path,
    (name, key): (&str, &str),
    place: &DistPlace,
) -> Result<Vec<f32>> {
    let Some(t) = meta.tensors.get(key) else {
        return Err(PluginError::shape(format!(
            "{}: no '{key}' for the parameter '{name}' (another model, or saved without the optimizer's state?)",
            dir.display()
        )));
    };
    if t.dtype != DType::F32 || t.size != place.global {
        return Err(PluginError::shape(format!(
            "{}: '{key}' is {} {:?}; the parameter '{name}' needs F32 {:?} (another model?)",
            dir.display(),
            t.dtype,
            t.size,
            place.global
        )));
    }
    let bytes = items
        .region(key, t, &place.offsets, &place.local)
        .map_err(|e| e.context(format!("restoring '{name}'")))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// The optimizer's saved master weights no parameter of this model took: state of another
/// model's tensors (more layers, other experts).
fn unclaimed(meta: &CheckpointMeta, claimed: &std::collections::HashSet<String>) -> Option<String> {
    let masters = bridge_state::optimizer_key(OPTIMIZER_STATES[0], "");
    meta.tensors
        .keys()
        .find(|k| k.starts_with(&masters) && !claimed.contains(*k))
        .cloned()
}

/// The frozen base the checkpoint was trained on, where bridgeflow recorded it, against the
/// one fed now.
fn check_frozen_base(dir: &Path, params: &Params) -> Result<()> {
    let path = dir.join(RESUME_INDEX);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(()); // not written by bridgeflow: nothing recorded
    };
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PluginError::format(format!("{}: {e}", path.display())))?;
    let base = &index["frozen_base"];
    if !base.is_null() && *base != frozen_base(params) {
        return Err(PluginError::mismatch(format!(
            "{}: the checkpoint was trained on another frozen base ({base}; the weights fed now give {})",
            path.display(),
            frozen_base(params)
        )));
    }
    Ok(())
}

/// Restores the state saved at `iteration` under `root` into `params` and `adam`, from the
/// torch_dist checkpoint as Megatron-Bridge keeps it, whoever wrote it (bridgeflow or Bridge,
/// chunked however): each trainable parameter's fp32 master and Adam's moments (every item's
/// CRC-32 checked), Adam's step, the data position and the scheduler's, which must be this
/// run's (`run`). Every trainable parameter must be there with its shape, and the checkpoint
/// must hold no optimizer state of parameters this model lacks.
pub fn load(
    root: &Path,
    iteration: u64,
    params: &mut Params,
    adam: &mut AdamW,
    (run, num_layers): (&RunSettings, u64),
) -> Result<Progress> {
    let dir = iter_dir(root, iteration);
    let meta = checkpoint::read_metadata(&dir)?;
    let (common_file, common) = checkpoint::read_common_state(&dir, &meta)?;
    let train_state = TorchSave::read(&dir.join("train_state.pt"))?;
    let (pos, adam_step) = bridge_state::restore(&common, &common_file, &train_state, run)?;
    check_frozen_base(&dir, params)?;
    let mut items = ItemReader::new(&dir);
    let mut claimed = std::collections::HashSet::new();
    adam.moments.clear();
    for (name, p) in params.by_name.iter_mut().filter(|(_, p)| p.trainable) {
        let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
        let place = dist_place(
            name,
            shape.clone(),
            vec![0; shape.len()],
            shape,
            Some(num_layers),
        );
        let [master, m, v] = OPTIMIZER_STATES.map(|s| bridge_state::optimizer_key(s, &place.key));
        let mut read = |key: &str| read_state(&mut items, &meta, &dir, (name, key), &place);
        let (master_v, m_v, v_v) = (read(&master)?, read(&m)?, read(&v)?);
        p.master = master_v;
        adam.moments.insert(name.clone(), (m_v, v_v));
        claimed.insert(master);
    }
    if let Some(key) = unclaimed(&meta, &claimed) {
        return Err(PluginError::shape(format!(
            "{}: the checkpoint holds '{key}', which this model has no trainable parameter for (another model?)",
            dir.display()
        )));
    }
    adam.step = adam_step;
    params.publish()?;
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::model_dtype;
    use bridgeflow_sdk::DType;

    /// Under mixed precision the saved weights are Bridge's model parameters (bf16, fp16) and
    /// the fp32 masters go in the optimizer's state; otherwise the weights keep their dtype.
    #[test]
    fn saved_weights_take_the_compute_dtype_under_mixed_precision() {
        use candle_core::DType as C;
        assert_eq!(model_dtype(Some(C::BF16), DType::F32), DType::BF16);
        assert_eq!(model_dtype(Some(C::F16), DType::BF16), DType::F16);
        assert_eq!(model_dtype(None, DType::BF16), DType::BF16);
        assert_eq!(model_dtype(Some(C::F32), DType::F32), DType::F32);
    }
}

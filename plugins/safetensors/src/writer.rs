//! The writer: HF sharded safetensors (`model-0000k-of-0000n.safetensors` + index, or one
//! `model.safetensors`), laid out from the stream plan before any data arrives, so every tensor
//! is written at its final offset the moment it comes, in any order, and nothing is buffered.
//!
//! Output is built in a hidden staging folder beside the target and renamed into place at
//! commit; an interrupted or failed run removes the staging folder and never leaves a
//! complete-looking checkpoint.

use crate::dtype::to_st;
use crate::files::{INDEX_NAME, SIDE_FILES, SINGLE_NAME};
use bridgeflow_sdk::inputs::Origins;
use bridgeflow_sdk::manifest::{Hasher, Manifest, MANIFEST_FILE};
use bridgeflow_sdk::outfile::{OutputFile, WriteStats, BESIDE};
use bridgeflow_sdk::units::{human, ByteSize};
use bridgeflow_sdk::{
    schemars, serde, DType, Item, PluginError, Result, Sink, StreamPlan, TensorInfo,
};
use safetensors::tensor::{Metadata, TensorInfo as StInfo};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes per write call; also the granularity of residency release on the input.
const WRITE_CHUNK: usize = 8 << 20;

fn default_shard() -> ByteSize {
    ByteSize(5_000_000_000)
}
fn yes() -> bool {
    true
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct WriterConfig {
    /// Output folder (HF layout), or a path ending in `.safetensors` for one file.
    pub path: PathBuf,
    /// Largest shard, as transformers' `max_shard_size` (default "5GB"); a larger tensor gets a
    /// shard of its own.
    #[serde(default = "default_shard")]
    pub max_shard_size: ByteSize,
    /// Folder to copy `config.json`, `generation_config.json` and tokenizer files from;
    /// defaults to the input's `source_dir`.
    #[serde(default)]
    pub copy_from: Option<PathBuf>,
    /// Copy config and tokenizer files (default true).
    #[serde(default = "yes")]
    pub copy_side_files: bool,
    /// Replace an existing, non-empty output (default false: refuse).
    #[serde(default)]
    pub overwrite: bool,
    /// Make the output durable before it is visible (default true): the shards written back
    /// as they are written and fsynced, the small files and folders too, then the commit
    /// rename.
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Write `bridgeflow-manifest.json` (name, dtype, shape, blake3 of every tensor) inside the
    /// output folder (default true; folder outputs only).
    #[serde(default = "yes")]
    pub manifest: bool,
    /// The file name when the output is one file in a folder (default `model.safetensors`;
    /// a PEFT adapter is `adapter_model.safetensors`).
    #[serde(default)]
    pub file_name: Option<String>,
    /// Copy tensor bytes that are a view of an input file in the kernel, from that file
    /// (`copy_file_range`, as `cp` does), instead of writing them out of its memory map
    /// (default true; the same bytes either way).
    #[serde(default = "yes")]
    pub kernel_copy: bool,
}

struct Shard {
    name: String,
    path: PathBuf,
    out: OutputFile,
    size: u64,
}

struct Slot {
    info: TensorInfo,
    shard: usize,
    offset: u64,
    written: bool,
    /// Pieces: bytes written so far, the running hash while they come in order, and where the
    /// next in-order piece starts.
    filled: u64,
    hasher: Option<Hasher>,
    next: u64,
}

pub struct SafetensorsWriter {
    cfg: WriterConfig,
    single_file: bool,
    staging: Option<PathBuf>,
    shards: Vec<Shard>,
    slots: HashMap<String, Slot>,
    plan: StreamPlan,
    written: usize,
    committed: bool,
    manifest: Manifest,
    /// The output's lock, from `open` until the commit is done.
    claim: Option<OutputClaim>,
    /// One file per name prefix ([`bridgeflow_sdk::attrs::FILES_BY_PREFIX`]).
    by_prefix: bool,
}

/// Assigns tensors to shards in stream order, as huggingface_hub's
/// `split_torch_state_dict_into_shards` does: a tensor that would overflow the current shard
/// starts a new one; a tensor larger than the limit sits alone.
fn split_shards(tensors: &[TensorInfo], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.nbytes().unwrap_or(u64::MAX);
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

/// One file per name prefix (`rank0.safetensors/transformer.ln_f.weight`), in order of first
/// appearance: what [`bridgeflow_sdk::attrs::FILES_BY_PREFIX`] asks for.
fn files_by_prefix(tensors: &[TensorInfo]) -> Result<Vec<(String, Vec<usize>)>> {
    let mut files: Vec<(String, Vec<usize>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tensors.iter().enumerate() {
        let Some((file, rest)) = t.name().split_once('/') else {
            return Err(PluginError::shape(format!(
                "tensor '{}' names no file (expected FILE/NAME)",
                t.name()
            )));
        };
        let sane = file.ends_with(".safetensors")
            && !rest.is_empty()
            && !file.starts_with('.')
            && !file.contains(['\\', '\0']);
        if !sane {
            return Err(PluginError::shape(format!(
                "tensor '{}': '{file}' is not a safetensors file name",
                t.name()
            )));
        }
        let k = *at.entry(file).or_insert_with(|| {
            files.push((file.to_string(), Vec::new()));
            files.len() - 1
        });
        files[k].1.push(i);
    }
    Ok(files)
}

/// A stream name as the file stores it: without its file prefix in a by-prefix stream.
fn stored_name(name: &str, by_prefix: bool) -> &str {
    match by_prefix {
        true => name.split_once('/').map_or(name, |(_, rest)| rest),
        false => name,
    }
}

/// The header exactly as `safetensors.serialize` writes it: tensors sorted by dtype (widest
/// first) then name, `__metadata__` first, padded with spaces to 8 bytes.
/// (name, offset within the data section) per tensor.
type Offsets = Vec<(String, u64)>;

fn shard_header(tensors: &[&TensorInfo]) -> Result<(Vec<u8>, Offsets)> {
    let mut order: Vec<&TensorInfo> = tensors.to_vec();
    order.sort_by(|a, b| {
        to_st(b.dtype)
            .cmp(&to_st(a.dtype))
            .then(a.name().cmp(b.name()))
    });
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(order.len());
    let mut offsets = Vec::with_capacity(order.len());
    for t in order {
        let n = t
            .nbytes()
            .ok_or_else(|| PluginError::shape(format!("tensor '{}': size overflows", t.name())))?
            as usize;
        infos.push((
            t.name().to_string(),
            StInfo {
                dtype: to_st(t.dtype),
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                data_offsets: (offset, offset + n),
            },
        ));
        offsets.push((t.name().to_string(), offset as u64));
        offset += n;
    }
    let meta_map: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let meta = Metadata::new(Some(meta_map), infos)
        .map_err(|e| PluginError::internal(format!("building a safetensors header: {e}")))?;
    let mut header = serde_json::to_string(&meta)
        .map_err(|e| PluginError::internal(format!("serialising a header: {e}")))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok((header, offsets))
}

use bridgeflow_sdk::fsutil::{reserve, OutputClaim};

fn is_nonempty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

impl SafetensorsWriter {
    fn layout(&mut self) -> Result<()> {
        let target = &self.cfg.path;
        // One writer per output (a second run fails here, naming this one's pid); the existence
        // check below is made under the lock.
        let claim = self.claim.insert(OutputClaim::claim(target)?);
        if target.exists() && !self.cfg.overwrite {
            let blocking = if self.single_file {
                true
            } else {
                !target.is_dir() || is_nonempty_dir(target)
            };
            if blocking {
                return Err(PluginError::config(format!(
                    "output {} already exists; set overwrite = true (--set STAGE.overwrite=true) or choose another path",
                    target.display()
                )));
            }
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| PluginError::io(parent, "cannot create", e))?;
        }
        let staging = claim.staging("partial");
        if !self.single_file {
            std::fs::create_dir(&staging)
                .map_err(|e| PluginError::io(&staging, "cannot create", e))?;
        }
        self.staging = Some(staging.clone());

        // A planned piece (`name#id` with a shard descriptor) stands for its whole tensor.
        let tensors = self.plan.whole_tensors();
        let by_prefix = self.plan.get(bridgeflow_sdk::attrs::FILES_BY_PREFIX) == Some(true);
        let files = if by_prefix {
            if self.single_file {
                return Err(PluginError::config(format!(
                    "{}: this stream is laid out in several files (one per rank); give a folder",
                    target.display()
                )));
            }
            files_by_prefix(&tensors)?
        } else {
            let max = if self.single_file {
                u64::MAX
            } else {
                self.cfg.max_shard_size.0.max(1)
            };
            let groups = split_shards(&tensors, max);
            let n = groups.len();
            groups
                .into_iter()
                .enumerate()
                .map(|(k, g)| {
                    let name = if n == 1 {
                        self.cfg
                            .file_name
                            .clone()
                            .unwrap_or_else(|| SINGLE_NAME.to_string())
                    } else {
                        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
                    };
                    (name, g)
                })
                .collect()
        };
        self.by_prefix = by_prefix;
        // The input files' maps, of whichever plugin made them (one lookup per tensor).
        let origins = self.cfg.kernel_copy.then(|| Arc::new(Origins::new()));
        for (k, (name, group)) in files.into_iter().enumerate() {
            let path = if self.single_file {
                staging.clone()
            } else {
                staging.join(&name)
            };
            let infos: Vec<&TensorInfo> = group.iter().map(|&i| &tensors[i]).collect();
            // In the file, a tensor goes by its name without the file prefix.
            let stored: Vec<TensorInfo> = infos
                .iter()
                .map(|t| (*t).clone().with_name(stored_name(t.name(), by_prefix)))
                .collect();
            let (header, offsets) = shard_header(&stored.iter().collect::<Vec<_>>())?;
            let data_start = 8 + header.len() as u64;
            let data_len: u64 = infos.iter().map(|t| t.nbytes().unwrap_or(0)).sum();
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| PluginError::io(&path, "cannot create", e))?;
            reserve(&file, &path, data_start + data_len)?;
            let mut head = (header.len() as u64).to_le_bytes().to_vec();
            head.extend_from_slice(&header);
            file.write_all_at(&head, 0)
                .map_err(|e| PluginError::io(&path, "cannot write", e))?;
            // By name: a shard may hold hundreds of thousands of tensors.
            let by_name: HashMap<&str, &TensorInfo> = infos
                .iter()
                .map(|t| (stored_name(t.name(), by_prefix), *t))
                .collect();
            for (stored, off) in offsets {
                let info = (*by_name.get(stored.as_str()).expect("from this group")).clone();
                let tname = info.name().to_string();
                if self
                    .slots
                    .insert(
                        tname.clone(),
                        Slot {
                            info,
                            shard: k,
                            offset: data_start + off,
                            written: false,
                            filled: 0,
                            hasher: None,
                            next: 0,
                        },
                    )
                    .is_some()
                {
                    return Err(PluginError::shape(format!(
                        "tensor '{tname}' is announced twice in the stream"
                    )));
                }
            }
            self.shards.push(Shard {
                name,
                out: OutputFile::new(file, &path)
                    .kernel_copy(origins.clone())
                    .durable(self.cfg.fsync),
                path,
                size: data_start + data_len,
            });
        }
        Ok(())
    }

    fn write_index(&self, dir: &Path) -> Result<()> {
        let mut weight_map = BTreeMap::new();
        for (name, slot) in &self.slots {
            weight_map.insert(name.clone(), self.shards[slot.shard].name.clone());
        }
        let total_size: u64 = self.plan.total_bytes();
        let total_parameters: u64 = self
            .plan
            .tensors
            .iter()
            .map(|t| t.numel().unwrap_or(0))
            .sum();
        let index = serde_json::json!({
            "metadata": { "total_parameters": total_parameters, "total_size": total_size },
            "weight_map": weight_map,
        });
        let path = dir.join(INDEX_NAME);
        let text = serde_json::to_string_pretty(&index).expect("json") + "\n";
        std::fs::write(&path, text).map_err(|e| PluginError::io(&path, "cannot write", e))
    }

    /// The single floating dtype of the stream, if there is one (to keep config.json honest
    /// after a cast).
    fn uniform_float_dtype(&self) -> Option<DType> {
        let mut it = self
            .plan
            .tensors
            .iter()
            .map(|t| t.dtype)
            .filter(|d| d.is_float());
        let first = it.next()?;
        it.all(|d| d == first).then_some(first)
    }

    /// What stages said about the config written beside the weights: keys that no longer hold
    /// (`drop_config_keys`: the `quantization_config` of dequantized weights) and keys to set
    /// (`config_updates`: the `quantization_config` of re-quantized ones). Untouched otherwise,
    /// byte for byte.
    fn update_config(&self, text: String) -> String {
        let drop = self.plan.get(bridgeflow_sdk::attrs::DROP_CONFIG_KEYS);
        let set = self.plan.get(bridgeflow_sdk::attrs::CONFIG_UPDATES);
        if drop.is_none() && set.is_none() {
            return text;
        }
        let Ok(mut cfg) = serde_json::from_str::<serde_json::Value>(&text) else {
            return text;
        };
        let Some(obj) = cfg.as_object_mut() else {
            return text;
        };
        for k in drop.iter().flatten() {
            obj.remove(k);
        }
        for (k, v) in set.into_iter().flatten() {
            obj.insert(k, v);
        }
        serde_json::to_string_pretty(&cfg).expect("json") + "\n"
    }

    /// The files stages asked for beside the weights ([`bridgeflow_sdk::attrs::EXTRA_FILES`]:
    /// a PEFT `adapter_config.json`, ModelOpt's `hf_quant_config.json`), always written.
    fn write_extra_files(&self, dir: &Path) -> Result<usize> {
        let mut copied = 0;
        for (name, value) in self
            .plan
            .get(bridgeflow_sdk::attrs::EXTRA_FILES)
            .into_iter()
            .flatten()
        {
            let safe = !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.');
            if !safe {
                return Err(PluginError::config(format!(
                    "extra file name '{name}' is not a plain file name"
                )));
            }
            let dst = dir.join(&name);
            let text = serde_json::to_string_pretty(&value).expect("json") + "\n";
            std::fs::write(&dst, text).map_err(|e| PluginError::io(&dst, "cannot write", e))?;
            copied += 1;
        }
        Ok(copied)
    }

    fn copy_side_files(&self, dir: &Path) -> Result<usize> {
        let from = match &self.cfg.copy_from {
            Some(p) => Some(p.clone()),
            None => self.plan.get(bridgeflow_sdk::attrs::SOURCE_DIR),
        };
        let mut copied = 0;
        // A config handed over in the stream (rebuilt from a Megatron checkpoint) wins.
        if let Some(cfg) = self.plan.get(bridgeflow_sdk::attrs::HF_CONFIG) {
            let dst = dir.join("config.json");
            let text = self.update_config(serde_json::to_string_pretty(&cfg).expect("json") + "\n");
            std::fs::write(&dst, text).map_err(|e| PluginError::io(&dst, "cannot write", e))?;
            copied += 1;
        }
        let Some(from) = from else { return Ok(copied) };
        for name in SIDE_FILES {
            let src = from.join(name);
            if !src.is_file() {
                continue;
            }
            let dst = dir.join(name);
            if dst.exists() {
                continue;
            }
            if *name == "config.json" {
                let text = std::fs::read_to_string(&src)
                    .map_err(|e| PluginError::io(&src, "cannot read", e))?;
                let text = match self.uniform_float_dtype() {
                    Some(d) => set_config_dtype(&text, d),
                    None => text,
                };
                let text = self.update_config(text);
                std::fs::write(&dst, text).map_err(|e| PluginError::io(&dst, "cannot write", e))?;
            } else {
                std::fs::copy(&src, &dst).map_err(|e| PluginError::io(&src, "cannot copy", e))?;
                // The source may be read-only; the output should be the user's to edit.
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644));
            }
            copied += 1;
        }
        Ok(copied)
    }

    fn remove_staging(&mut self) {
        self.shards.clear();
        if let Some(s) = self.staging.take() {
            let _ = if s.is_dir() {
                std::fs::remove_dir_all(&s)
            } else {
                std::fs::remove_file(&s)
            };
        }
    }
}

/// Rewrites the `torch_dtype`/`dtype` value of a config.json in place, keeping the rest of the
/// file byte for byte.
fn set_config_dtype(text: &str, d: DType) -> String {
    let re = regex::Regex::new(r#""(torch_dtype|dtype)"(\s*):(\s*)"[^"]*""#).expect("valid regex");
    re.replace_all(text, |c: &regex::Captures| {
        format!("\"{}\"{}:{}\"{}\"", &c[1], &c[2], &c[3], d.torch_name())
    })
    .into_owned()
}

impl Sink for SafetensorsWriter {
    type Config = WriterConfig;
    const DESCRIPTION: &'static str =
        "Writes HF sharded safetensors with index and side files, atomically";
    const ENDPOINTS: &'static [bridgeflow_sdk::Endpoint] = &[bridgeflow_sdk::Endpoint {
        options: &["overwrite"],
        ..bridgeflow_sdk::Endpoint::new(
            "hf",
            "hf",
            "a Hugging Face model folder (config.json + safetensors)",
        )
    }];

    fn new(cfg: WriterConfig) -> Result<Self> {
        if cfg.path.as_os_str().is_empty() {
            return Err(PluginError::config("path is empty"));
        }
        let single_file = cfg.path.extension().is_some_and(|x| x == "safetensors");
        if let Some(f) = &cfg.file_name {
            if !f.ends_with(".safetensors") || f.contains(['/', '\\']) || f.starts_with('.') {
                return Err(PluginError::config(format!(
                    "file_name = {f:?}: expected a plain NAME.safetensors"
                )));
            }
        }
        Ok(SafetensorsWriter {
            cfg,
            single_file,
            staging: None,
            shards: Vec::new(),
            slots: HashMap::new(),
            plan: StreamPlan::default(),
            written: 0,
            committed: false,
            manifest: Manifest::new(),
            claim: None,
            by_prefix: false,
        })
    }

    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
        self.plan = inputs.first().cloned().unwrap_or_default();
        let r = self.layout();
        if r.is_err() {
            self.remove_staging();
        }
        r
    }

    fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
        let t = item.into_tensor()?;
        // A piece (rows of a planned tensor, named `tensor#id` with a shard descriptor) goes to
        // its rows; a whole tensor to its slot.
        let piece = match &t.info.shard {
            bridgeflow_sdk::abi_option::RSome(s) => Some(s.clone()),
            _ => None,
        };
        let base = t.name().split('#').next().unwrap_or_default().to_string();
        let name = if piece.is_some() {
            base.as_str()
        } else {
            t.name()
        };
        let slot = self.slots.get_mut(name).ok_or_else(|| {
            PluginError::shape(format!(
                "tensor '{name}' was not announced in the stream plan"
            ))
        })?;
        let nbytes = slot.info.nbytes().unwrap_or(0);
        let within = match &piece {
            None => {
                if slot.written || slot.filled > 0 {
                    return Err(PluginError::shape(format!("tensor '{name}' arrived twice")));
                }
                if slot.info.dtype != t.info.dtype || slot.info.shape != t.info.shape {
                    return Err(PluginError::shape(format!(
                        "tensor '{name}': announced as {} {}, arrived as {} {}",
                        slot.info.dtype,
                        slot.info.shape_string(),
                        t.info.dtype,
                        t.info.shape_string()
                    )));
                }
                0
            }
            Some(s) => {
                // Any block whose elements are one run of the tensor's.
                let at = t
                    .info
                    .piece_offset()
                    .map(|e| e * t.info.dtype.size() as u64);
                match at {
                    Some(at)
                        if s.global_shape == slot.info.shape
                            && t.info.dtype == slot.info.dtype
                            && at + t.bytes().len() as u64 <= nbytes =>
                    {
                        at
                    }
                    _ => {
                        return Err(PluginError::shape(format!(
                            "piece '{}' does not fit tensor '{name}' as one run of its elements",
                            t.name()
                        )))
                    }
                }
            }
        };
        if slot.filled == 0 && self.cfg.manifest && !self.single_file {
            slot.hasher = Some(Hasher::new());
        }
        let shard = &mut self.shards[slot.shard];
        // In windows (copied in the kernel from the input file when they are a view of one, by
        // another thread while this one hashes them), telling the buffer's owner after each that
        // we are done with it: a tensor larger than the memory budget then never becomes
        // resident as a whole.
        let bytes = t.bytes();
        let in_order = slot.next == within;
        if !in_order {
            // Out-of-order pieces: the manifest hash is computed from the file at commit.
            slot.hasher = None;
        }
        let hasher = &mut slot.hasher;
        // A tensor copied beside this thread: hashed on this thread alone (the copy takes the
        // other core); a small one on all.
        let serial = bytes.len() >= BESIDE;
        shard.out.write_windows(
            bytes,
            slot.offset + within,
            &format!("writing tensor '{name}' to"),
            |range, window| {
                if let Some(h) = hasher.as_mut() {
                    if serial {
                        h.update_serial(window);
                    } else {
                        h.update(window);
                    }
                }
                t.data.discard(range);
            },
        )?;
        slot.filled += bytes.len() as u64;
        slot.next = within + bytes.len() as u64;
        if slot.filled > nbytes {
            return Err(PluginError::shape(format!(
                "tensor '{name}': pieces overlap"
            )));
        }
        if slot.filled == nbytes {
            slot.written = true;
            self.written += 1;
            if self.cfg.manifest && !self.single_file {
                let hex = match slot.hasher.take() {
                    Some(h) => h.finish(),
                    None => {
                        // Re-read what was written (page cache) to hash it in order.
                        let mut h = Hasher::new();
                        let mut buf = vec![0u8; WRITE_CHUNK.min(nbytes as usize).max(1)];
                        let mut off = 0u64;
                        while off < nbytes {
                            let n = (nbytes - off).min(buf.len() as u64) as usize;
                            shard
                                .out
                                .file()
                                .read_exact_at(&mut buf[..n], slot.offset + off)
                                .map_err(|e| PluginError::io(&shard.path, "cannot read back", e))?;
                            h.update(&buf[..n]);
                            off += n as u64;
                        }
                        h.finish()
                    }
                };
                let info = slot.info.clone();
                self.manifest.add_hashed(&info, nbytes, hex);
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<String> {
        if let Some((name, _)) = self.slots.iter().find(|(_, s)| !s.written) {
            return Err(PluginError::shape(format!(
                "tensor '{name}' was announced but never arrived; output not committed"
            )));
        }
        if self.cfg.fsync {
            for s in &mut self.shards {
                s.out.sync()?;
            }
        }
        let staging = self.staging.clone().expect("opened");
        let target = self.cfg.path.clone();
        let mut side = 0;
        if !self.single_file {
            if self.shards.len() > 1 && !self.by_prefix {
                self.write_index(&staging)?;
            }
            side = self.write_extra_files(&staging)?;
            if self.cfg.copy_side_files {
                side += self.copy_side_files(&staging)?;
            }
            if self.cfg.manifest {
                self.manifest.save(&staging.join(MANIFEST_FILE))?;
            }
        }
        // Make the output visible in one rename where possible.
        let claim = self.claim.as_mut().expect("claimed in open");
        // With fsync, the small files and folders too, and the rename.
        claim.durable(self.cfg.fsync);
        claim.commit(&staging, self.cfg.overwrite)?;
        self.staging = None;
        self.committed = true;
        self.claim = None;
        let bytes: u64 = self.shards.iter().map(|s| s.size).sum();
        Ok(format!(
            "wrote {} tensors, {} in {} file{}{} to {}",
            self.written,
            human(bytes),
            self.shards.len(),
            if self.shards.len() == 1 { "" } else { "s" },
            if side > 0 {
                format!(" (+{side} config/tokenizer files)")
            } else {
                String::new()
            },
            target.display()
        ))
    }

    fn metrics(&mut self) -> serde_json::Value {
        let mut all = WriteStats::default();
        for s in &self.shards {
            all.copied += s.out.stats().copied;
            all.written += s.out.stats().written;
        }
        let files: serde_json::Map<String, serde_json::Value> = self
            .shards
            .iter()
            .map(|s| (s.name.clone(), s.size.into()))
            .collect();
        serde_json::json!({
            "bytes_copied_in_kernel": all.copied,
            "bytes_written": all.written,
            "file_bytes": files,
        })
    }

    fn abort(&mut self) {
        if !self.committed {
            self.remove_staging();
        }
        self.claim = None;
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, dtype: DType, shape: &[u64]) -> TensorInfo {
        TensorInfo::new(name, dtype, shape)
    }

    #[test]
    fn sharding_follows_huggingface_hub() {
        // huggingface_hub's documented behaviour: greedy in stream order, an oversized tensor
        // is emitted as its own shard at once (before the shard being filled).
        let sizes = [6u64, 10, 30, 2, 2];
        let t: Vec<TensorInfo> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| info(&format!("layer_{}", i + 1), DType::U8, &[n]))
            .collect();
        assert_eq!(
            split_shards(&t, 10),
            vec![vec![0], vec![2], vec![1], vec![3, 4]]
        );
        assert_eq!(split_shards(&t, 1000), vec![vec![0, 1, 2, 3, 4]]);
    }

    #[test]
    fn config_dtype_is_rewritten_in_place() {
        let src = "{\n  \"dtype\": \"float32\",\n  \"hidden_size\": 64\n}\n";
        assert_eq!(
            set_config_dtype(src, DType::BF16),
            "{\n  \"dtype\": \"bfloat16\",\n  \"hidden_size\": 64\n}\n"
        );
    }
}

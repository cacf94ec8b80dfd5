//! The writer: a torch_dist checkpoint as megatron-core writes it, laid out from the stream plan
//! so that every item's place is known before data arrives: each tensor piece becomes one
//! `torch.save` archive at a fixed offset of one of the data files `__0_{i}.distcp`, its payload
//! written as it comes and its frame (CRC-32s, central directory) completed right after. Each
//! data file has its own thread, so the files fill in parallel (megatron-core also writes two
//! files per rank). `.metadata` and the rest are written at commit, and the checkpoint root
//! appears under its name only then.
//!
//! Layout: `ROOT/latest_checkpointed_iteration.txt`, `ROOT/iter_XXXXXXX/{.metadata,
//! __0_0.distcp, __0_1.distcp, common.pt, metadata.json}` — the layout both megatron-core 0.16
//! and 0.19 load (the common state in `common.pt`, the four-key `metadata.json`).

use crate::emit::{none_list_pickle, tensor_pickle, torch_save, Archive, PyValue};
use bridgeflow_megatron::degree::{check_degree, check_product};
use bridgeflow_megatron::names;
use bridgeflow_megatron::placement::{
    dist_chunks, dist_file, dist_place, dist_rank, pipeline_stage, pp_layers, DistPlace,
};
use bridgeflow_megatron::tp::{check_tp, tp_split, TpSplit};
use bridgeflow_megatron::{dcp, run_config};
use bridgeflow_sdk::inputs::Origins;
use bridgeflow_sdk::manifest::{Hasher, Manifest, MANIFEST_FILE};
use bridgeflow_sdk::outfile::{OutputFile, WriteStats};
use bridgeflow_sdk::TensorInfo;
use bridgeflow_sdk::{
    schemars, serde, Buffer, DType, Item, PluginError, Result, Sink, StreamPlan, Tensor,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

fn auto() -> String {
    "auto".into()
}
fn yes() -> bool {
    true
}
fn two() -> usize {
    2
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct WriterConfig {
    /// The checkpoint root to create.
    pub path: PathBuf,
    /// Iteration number of the folder (`iter_0000000` by default).
    #[serde(default)]
    pub iteration: u64,
    /// `auto`: per-layer tensors `[<module>.]decoder.layers.<l>.<param>` become stacked keys
    /// `decoder.layers.<param>` (one chunk per layer) when every layer has the same parameters,
    /// as megatron-core stores homogeneous decoders; `never`: keep keys as they come.
    #[serde(default = "auto")]
    pub stack_layers: String,
    /// Byte-object keys to write as `torch.save([None])` (the local spec's `_extra_state`);
    /// default: the input's `byte_objects`, without `common_state`.
    #[serde(default)]
    pub extra_state: Option<Vec<String>>,
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Write `bridgeflow-manifest.json` (blake3 of every chunk) beside `.metadata` (default
    /// true); the reader checks it with `verify = true`.
    #[serde(default = "yes")]
    pub manifest: bool,
    /// Copy tensor bytes that are a view of an input file (a safetensors file's, a data
    /// file's) in the kernel, from that file (`copy_file_range`, as `cp` does), instead of
    /// writing them out of its memory map (default true; the same bytes either way).
    #[serde(default = "yes")]
    pub kernel_copy: bool,
    /// Data files per rank, `__{rank}_{i}.distcp`, each written by its own thread (default 2, as
    /// megatron-core writes); items are spread over them by size.
    #[serde(default = "two")]
    pub files: usize,
    /// Write as this many tensor-parallel ranks would: each tensor cut into megatron-core's TP
    /// chunks (column/row splits, SwiGLU halves; replicated tensors once, by rank 0), each
    /// rank's chunks in its own files.
    #[serde(default = "one")]
    pub tp: u64,
    /// And over this many pipeline stages: each stage's decoder layers (an even split, or as
    /// the two options below say), the embedding on the first, the output layer, final norm
    /// and multi-token-prediction layers on the last; rank = tp_rank + tp · stage, as
    /// megatron-core numbers ranks without data parallelism.
    #[serde(default = "one")]
    pub pp: u64,
    #[serde(default)]
    pub num_layers_in_first_pipeline_stage: Option<u64>,
    #[serde(default)]
    pub num_layers_in_last_pipeline_stage: Option<u64>,
}

fn one() -> u64 {
    1
}

/// The most data files per rank (`files`).
const MAX_FILES_PER_RANK: usize = 256;

struct Piece {
    key: String,
    dtype: DType,
    global: Vec<u64>,
    offsets: Vec<u64>,
    local: Vec<u64>,
    /// Which data file, and where in it.
    file: usize,
    item_offset: u64,
    item_len: u64,
    /// Until the tensor arrives: its archive, to be completed by the file's thread.
    archive: Option<Archive>,
}

/// A chunk an input becomes: the piece's index and the byte runs of the input that make it.
type ChunkOf = (usize, Vec<(u64, u64)>);

/// One tensor for a data file's thread: its payload goes at `payload_at`, then the archive's
/// frame at `item_offset`.
struct Job {
    piece: usize,
    tensor: Tensor,
    item_offset: u64,
    payload_at: u64,
    archive: Archive,
}

/// What a data file's thread reports for each item: the piece and its payload's blake3.
type Written = (usize, Option<String>);

/// What a data file's thread reports at the end: its items, and how their bytes were written.
type Filled = (Vec<Written>, WriteStats);

/// A data file and the thread that fills it.
struct DataFile {
    name: String,
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<Result<Filled>>>,
}

/// The body of a data file's thread: writes each item as it comes, payload in windows (copied
/// in the kernel from its input file when it is a view of one; each window's CRC-32 and blake3
/// taken while it is in cache, and the buffer's owner told after each, so a large tensor never
/// becomes resident whole), then its frame with the CRC-32; with `fsync`, write-back runs
/// behind the writes and the file is synced at the end.
/// `serial`: blake3 on this thread only (when the other files' threads keep the cores busy).
fn fill_data_file(
    mut out: OutputFile,
    jobs: Receiver<Job>,
    (hash, serial): (bool, bool),
    fsync: bool,
) -> Result<Filled> {
    let mut written = Vec::new();
    for job in jobs {
        let bytes = job.tensor.bytes();
        let mut crc = crc32fast::Hasher::new();
        let mut hasher = hash.then(Hasher::new);
        out.write_windows(bytes, job.payload_at, "cannot write", |range, window| {
            crc.update(window);
            if let Some(h) = hasher.as_mut() {
                if serial {
                    h.update_serial(window);
                } else {
                    h.update(window);
                }
            }
            job.tensor.data.discard(range);
        })?;
        let mut archive = job.archive;
        for (off, b) in archive.frame(crc.finalize()) {
            out.write_at(&b, job.item_offset + off)?;
        }
        written.push((job.piece, hasher.map(|h| h.finish())));
    }
    if fsync {
        out.sync()?;
    }
    Ok((written, out.stats()))
}

pub struct TorchDistWriter {
    cfg: WriterConfig,
    staging: Option<PathBuf>,
    /// The output's lock, from `open` until the commit is done.
    claim: Option<bridgeflow_sdk::fsutil::OutputClaim>,
    iter_dir: PathBuf,
    files: Vec<DataFile>,
    pieces: Vec<Piece>,
    /// Each input's chunks: (piece index, byte runs of the input that make it).
    by_name: HashMap<String, Vec<ChunkOf>>,
    /// Byte objects: key, offset and length in data file 0.
    bytes_items: Vec<(String, u64, u64)>,
    source_dir: Option<PathBuf>,
    run_config: Option<String>,
    committed: bool,
    manifest: Manifest,
    /// How the data files' bytes were written (at commit).
    stats: WriteStats,
}

/// The manifest entry name of a chunk: its key and offsets.
pub fn chunk_name(key: &str, offsets: &[u64]) -> String {
    let o: Vec<String> = offsets.iter().map(|x| x.to_string()).collect();
    format!("{key}@{}", o.join(","))
}

fn data_file_name(rank: usize, i: usize) -> String {
    format!("__{rank}_{i}.distcp")
}

/// The decoder's layer count (the per-layer indices named), and whether it is homogeneous —
/// its layers numbered from 0 and each with the same parameters, dtypes and shapes — so that
/// per-layer tensors (and pieces of them) stack.
fn layer_count(tensors: &[TensorInfo]) -> (u64, bool) {
    let mut layers: BTreeMap<u64, BTreeSet<(String, DType, Vec<u64>)>> = BTreeMap::new();
    for t in tensors {
        if let Some((stack, l, param)) = names::layer_split(t.base_name()) {
            let shape = t
                .shard()
                .map_or(t.shape.to_vec(), |s| s.global_shape.to_vec());
            layers
                .entry(l)
                .or_default()
                .insert((names::stacked_key(stack, param), t.dtype, shape));
        }
    }
    let n = layers.len() as u64;
    let uniform = n > 0
        && layers.keys().copied().eq(0..n)
        && layers
            .values()
            .collect::<Vec<_>>()
            .windows(2)
            .all(|w| w[0] == w[1]);
    (n, uniform)
}

impl TorchDistWriter {
    fn staging_root(&mut self) -> PathBuf {
        match self.claim.as_mut() {
            Some(c) => c.staging("partial"),
            None => bridgeflow_sdk::fsutil::hidden_sibling(&self.cfg.path, "partial"),
        }
    }

    /// Closes the data files' queues and waits for their threads: what they wrote, or the
    /// first error.
    fn finish_files(&mut self) -> Result<Vec<Written>> {
        let mut all = Vec::new();
        let mut first_err = None;
        for f in &mut self.files {
            f.jobs = None;
            if let Some(t) = f.thread.take() {
                match t.join() {
                    Ok(Ok((w, stats))) => {
                        all.extend(w);
                        self.stats.copied += stats.copied;
                        self.stats.written += stats.written;
                    }
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(PluginError::internal(format!(
                            "the thread writing {} panicked",
                            f.name
                        )));
                    }
                }
            }
        }
        first_err.map_or(Ok(all), Err)
    }

    fn metadata_pickle(&self) -> Vec<u8> {
        let stored = |file: usize, offset: u64, len: u64| dcp::Stored {
            file: self.files[file].name.clone(),
            offset,
            len,
        };
        let chunks: Vec<dcp::Chunk> = self
            .pieces
            .iter()
            .map(|p| dcp::Chunk {
                key: &p.key,
                dtype: p.dtype,
                global: &p.global,
                offsets: &p.offsets,
                local: &p.local,
                stored: stored(p.file, p.item_offset, p.item_len),
            })
            .collect();
        let bytes: Vec<(&str, dcp::Stored)> = self
            .bytes_items
            .iter()
            .map(|(k, off, len)| (k.as_str(), stored(0, *off, *len)))
            .collect();
        dcp::metadata_pickle(&chunks, &bytes)
    }

    /// `torch.save({'checkpoint_version': 3.0, 'iteration': N})` under the `common/` prefix.
    fn common_pt(&self) -> Vec<u8> {
        let state = PyValue::dict([
            ("checkpoint_version", PyValue::Float(3.0)),
            ("iteration", PyValue::Int(self.cfg.iteration as i64)),
        ]);
        torch_save("common", &state, "common")
    }

    fn remove_staging(&mut self) {
        let _ = self.finish_files();
        self.files.clear();
        if let Some(s) = self.staging.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }

    /// The byte objects to write, in file 0 first as megatron-core orders them: given, passed
    /// on by the input (a checkpoint read back), or those of the keys' Transformer Engine
    /// modules.
    fn byte_object_keys(
        &self,
        plan: &StreamPlan,
        places: &[DistPlace],
        stacked: bool,
        hybrid: bool,
    ) -> Vec<String> {
        let given = plan.get(bridgeflow_sdk::attrs::BYTE_OBJECTS);
        match (&self.cfg.extra_state, given) {
            (Some(k), _) => k.clone(),
            (None, Some(k)) => k
                .into_iter()
                .filter(|k| !k.starts_with("common_state"))
                .collect(),
            (None, None) => {
                let globals: BTreeMap<&str, &Vec<u64>> =
                    places.iter().map(|p| (p.key.as_str(), &p.global)).collect();
                let mut seen = std::collections::HashSet::new();
                globals
                    .into_iter()
                    .flat_map(|(k, g)| names::te_extra_state(k, g, stacked, hybrid))
                    .filter(|k| seen.insert(k.clone()))
                    .collect()
            }
        }
    }

    /// An input's pieces, one per chunk it is cut into, each given its data file (the
    /// emptiest of its rank's) and place there (`cursor`: the bytes laid out so far in each).
    fn lay_out_tensor(
        &mut self,
        t: &TensorInfo,
        place: DistPlace,
        (split, stage): (TpSplit, u64),
        cursor: &mut [u64],
    ) -> Result<()> {
        t.nbytes()
            .ok_or_else(|| PluginError::shape(format!("tensor '{}': size overflows", t.name())))?;
        let es = t.dtype.size() as u64;
        let tp = self.cfg.tp.max(1);
        let experts = names::has_stacked_experts(t.base_name());
        let mut mine = Vec::new();
        for c in dist_chunks(&place, es, experts, split, tp) {
            let rank = dist_rank(c.tp_rank, stage, tp);
            let nbytes = c.shape.iter().product::<u64>() * es;
            let archive = Archive::new(
                "archive",
                tensor_pickle(t.dtype, &c.shape),
                Some(nbytes),
                &dcp::archive_seed(&place.key, &c.offsets),
            );
            let total = archive.total;
            let file = dist_file(cursor, rank, self.cfg.files.max(1));
            mine.push((self.pieces.len(), c.runs));
            self.pieces.push(Piece {
                key: place.key.clone(),
                dtype: t.dtype,
                global: place.global.clone(),
                offsets: c.offsets,
                local: c.shape,
                file,
                item_offset: cursor[file],
                item_len: total,
                archive: Some(archive),
            });
            cursor[file] += total;
        }
        self.by_name.insert(t.name().to_string(), mine);
        Ok(())
    }

    /// Each key's pieces must tile its global tensor, in one dtype.
    fn check_pieces(&self) -> Result<()> {
        let mut per_key: BTreeMap<&str, (DType, &Vec<u64>, u64)> = BTreeMap::new();
        for p in &self.pieces {
            let e = per_key.entry(&p.key).or_insert((p.dtype, &p.global, 0));
            if e.0 != p.dtype || e.1 != &p.global {
                return Err(PluginError::shape(format!(
                    "'{}': pieces disagree on dtype or global shape",
                    p.key
                )));
            }
            e.2 += p.local.iter().product::<u64>();
        }
        for (k, (_, g, n)) in &per_key {
            if *n != g.iter().product::<u64>() {
                return Err(PluginError::shape(format!(
                    "'{k}': the pieces cover {n} of {} elements",
                    g.iter().product::<u64>()
                )));
            }
        }
        Ok(())
    }

    /// Creates the data files of `sizes` bytes each (blocks reserved), the byte objects'
    /// archives at the start of file 0, and a thread for each to fill it.
    fn open_files(&mut self, sizes: &[u64], byte_archives: &[Vec<u8>]) -> Result<()> {
        let staging = self.staging_root();
        self.iter_dir = staging.join(names::iteration_dir(self.cfg.iteration));
        std::fs::create_dir_all(&self.iter_dir)
            .map_err(|e| PluginError::io(&self.iter_dir, "cannot create", e))?;
        self.staging = Some(staging);
        let n_files = self.cfg.files.max(1);
        // The input files' maps, of whichever plugin made them (one lookup per item).
        let origins = self.cfg.kernel_copy.then(|| Arc::new(Origins::new()));
        let serial = sizes.len() > 1;
        for (i, &size) in sizes.iter().enumerate() {
            let name = data_file_name(i / n_files, i % n_files);
            let path = self.iter_dir.join(&name);
            let f = File::create(&path).map_err(|e| PluginError::io(&path, "cannot create", e))?;
            // Blocks reserved up front: a full disk fails here, before any data is written.
            bridgeflow_sdk::fsutil::reserve(&f, &path, size)?;
            if i == 0 {
                let mut off = 0;
                for a in byte_archives {
                    f.write_all_at(a, off)
                        .map_err(|e| PluginError::io(&path, "cannot write", e))?;
                    off += a.len() as u64;
                }
            }
            // A short queue: the budget counts what waits in it.
            let (tx, rx) = sync_channel(2);
            let (hash, fsync) = (self.cfg.manifest, self.cfg.fsync);
            let out = OutputFile::new(f, path)
                .kernel_copy(origins.clone())
                .durable(fsync);
            let thread = std::thread::Builder::new()
                .name(format!("torch-dist {name}"))
                .spawn(move || fill_data_file(out, rx, (hash, serial), fsync))
                .map_err(|e| PluginError::internal(format!("cannot start a writer thread: {e}")))?;
            self.files.push(DataFile {
                name,
                jobs: Some(tx),
                thread: Some(thread),
            });
        }
        Ok(())
    }

    fn lay_out(&mut self, plan: &StreamPlan) -> Result<()> {
        let tensors: Vec<_> = plan.tensors.iter().cloned().collect();
        let (n_layers, uniform) = layer_count(&tensors);
        let homogeneous = self.cfg.stack_layers == "auto" && uniform;
        let places: Vec<DistPlace> = tensors
            .iter()
            .map(|t| {
                let shape = t.shape.to_vec();
                let (global, offsets) = match t.shard() {
                    Some(s) => (s.global_shape.to_vec(), s.offsets.to_vec()),
                    None => (shape.clone(), vec![0; shape.len()]),
                };
                let stack = homogeneous.then_some(n_layers);
                dist_place(t.base_name(), global, offsets, shape, stack)
            })
            .collect();
        // Bytes laid out so far in each data file: rank r's files are r·files .. (r+1)·files.
        let n_files = self.cfg.files.max(1);
        let tp = self.cfg.tp.max(1);
        let megatron_model = plan
            .get(bridgeflow_sdk::attrs::MEGATRON_MODEL)
            .map(serde_json::Value::Object);
        check_tp(megatron_model.as_ref(), tp)?;
        let pp = self.cfg.pp.max(1);
        let stages = pp_layers(
            n_layers,
            pp,
            self.cfg.num_layers_in_first_pipeline_stage,
            self.cfg.num_layers_in_last_pipeline_stage,
        )?;
        let mut cursor = vec![0u64; n_files * (tp * pp) as usize];
        let model_flag = |k: &str| megatron_model.as_ref()?.get(k)?.as_bool();
        let gated = model_flag("gated_linear_unit").unwrap_or(true);
        let hybrid = model_flag("is_hybrid_model").unwrap_or(false);
        let mut byte_archives = Vec::new();
        for k in self.byte_object_keys(plan, &places, homogeneous, hybrid) {
            let a = Archive::new("archive", none_list_pickle(), None, &k).bytes();
            self.bytes_items.push((k, cursor[0], a.len() as u64));
            cursor[0] += a.len() as u64;
            byte_archives.push(a);
        }
        for (t, place) in tensors.iter().zip(places) {
            let split = tp_split(t.base_name(), gated);
            let stage = pipeline_stage(t.base_name(), &stages);
            self.lay_out_tensor(t, place, (split, stage), &mut cursor)?;
        }
        self.check_pieces()?;
        self.open_files(&cursor, &byte_archives)
    }
}
impl Sink for TorchDistWriter {
    type Config = WriterConfig;
    const DESCRIPTION: &'static str =
        "Writes Megatron-Core torch_dist checkpoints (loads in megatron-core 0.16 and 0.19), atomically";
    const ENDPOINTS: &'static [bridgeflow_sdk::Endpoint] = &[bridgeflow_sdk::Endpoint {
        aliases: &["mcore"],
        options: &["tp", "pp", "overwrite"],
        ..bridgeflow_sdk::Endpoint::new(
            "megatron",
            "megatron",
            "a Megatron-Core torch_dist checkpoint",
        )
    }];

    fn new(cfg: WriterConfig) -> Result<Self> {
        if cfg.stack_layers != "auto" && cfg.stack_layers != "never" {
            return Err(PluginError::config(format!(
                "stack_layers '{}': expected auto or never",
                cfg.stack_layers
            )));
        }
        // Each degree in range, and the data files (a thread each) bounded, before anything
        // is sized from them.
        check_degree("tp", cfg.tp)?;
        check_degree("pp", cfg.pp)?;
        check_product("tp × pp", &[cfg.tp, cfg.pp])?;
        if cfg.files > MAX_FILES_PER_RANK {
            return Err(PluginError::config(format!(
                "files = {}: at most {MAX_FILES_PER_RANK} data files per rank",
                cfg.files
            )));
        }
        check_product(
            "files × tp × pp",
            &[cfg.files.max(1) as u64, cfg.tp, cfg.pp],
        )?;
        Ok(TorchDistWriter {
            cfg,
            staging: None,
            claim: None,
            iter_dir: PathBuf::new(),
            files: Vec::new(),
            pieces: Vec::new(),
            by_name: HashMap::new(),
            bytes_items: Vec::new(),
            source_dir: None,
            run_config: None,
            committed: false,
            manifest: Manifest::new(),
            stats: WriteStats::default(),
        })
    }

    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
        // One writer per output; the existence check is made under its lock.
        self.claim = Some(bridgeflow_sdk::fsutil::OutputClaim::claim(&self.cfg.path)?);
        bridgeflow_sdk::fsutil::refuse_existing(&self.cfg.path, self.cfg.overwrite)?;
        let plan = inputs.first().cloned().unwrap_or_default();
        self.source_dir = plan.get(bridgeflow_sdk::attrs::SOURCE_DIR);
        // The run config: the import's (from the mapper), else the input checkpoint's own
        // (re-sharding torch_dist), with the parallel sizes of this layout.
        self.run_config = run_config::of_plan(&plan)?.map(|rc| {
            let (tp, pp) = (self.cfg.tp.to_string(), self.cfg.pp.to_string());
            run_config::with_values(
                &rc,
                &[
                    ("tensor_model_parallel_size", &tp),
                    ("pipeline_model_parallel_size", &pp),
                ],
            )
        });
        let r = self.lay_out(&plan);
        if r.is_err() {
            self.remove_staging();
        }
        r
    }

    fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
        let t = item.into_tensor()?;
        let chunks = self.by_name.get(t.name()).cloned().ok_or_else(|| {
            PluginError::shape(format!(
                "tensor '{}' was not announced in the stream plan",
                t.name()
            ))
        })?;
        let expected: u64 = t.info.nbytes().unwrap_or(0);
        let planned: u64 = chunks.iter().flat_map(|(_, r)| r).map(|r| r.1).sum();
        if chunks
            .iter()
            .any(|(i, _)| self.pieces[*i].archive.is_none())
            || chunks
                .iter()
                .any(|(i, _)| t.info.dtype != self.pieces[*i].dtype)
            || t.bytes().len() as u64 != expected
            || (self.cfg.tp.max(1) == 1 && planned != expected)
        {
            return Err(PluginError::shape(format!(
                "tensor '{}' arrived twice or with another dtype or size than announced",
                t.name()
            )));
        }
        for (i, runs) in chunks {
            // The chunk's bytes: a view of the input when they are one run, else gathered
            // (a row-parallel weight's columns).
            let data = match runs[..] {
                [(off, len)] => t.data.slice(off as usize..(off + len) as usize),
                _ => {
                    let mut v = Vec::with_capacity(runs.iter().map(|r| r.1 as usize).sum());
                    for (off, len) in runs {
                        v.extend_from_slice(&t.bytes()[off as usize..(off + len) as usize]);
                    }
                    Buffer::from_vec(v)
                }
            };
            let piece = &mut self.pieces[i];
            let info = TensorInfo::new(t.name(), piece.dtype, &piece.local);
            let archive = piece.archive.take().expect("checked");
            let job = Job {
                piece: i,
                item_offset: piece.item_offset,
                payload_at: piece.item_offset + archive.payload_offset().expect("tensor item"),
                archive,
                tensor: Tensor::new(info, data)?,
            };
            let file = piece.file;
            let sent = self.files[file].jobs.as_ref().map(|q| q.send(job).is_ok());
            if sent != Some(true) {
                // The file's thread stopped: its error says why.
                self.finish_files()?;
                return Err(PluginError::internal(format!(
                    "the thread writing {} stopped",
                    self.files[file].name
                )));
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<String> {
        if let Some(p) = self.pieces.iter().find(|p| p.archive.is_some()) {
            return Err(PluginError::shape(format!(
                "tensor for '{}' at {:?} never arrived; nothing committed",
                p.key, p.offsets
            )));
        }
        // Every item written (and fsynced when asked) before anything names them.
        for (i, hash) in self.finish_files()? {
            if let Some(h) = hash {
                let p = &self.pieces[i];
                let info = TensorInfo::new(chunk_name(&p.key, &p.offsets), p.dtype, &p.local);
                let len = info.nbytes().unwrap_or(0);
                self.manifest.add_hashed(&info, len, h);
            }
        }
        let write = |p: PathBuf, b: &[u8]| {
            std::fs::write(&p, b).map_err(|e| PluginError::io(&p, "cannot write", e))
        };
        write(self.iter_dir.join("common.pt"), &self.common_pt())?;
        write(self.iter_dir.join("metadata.json"), dcp::METADATA_JSON)?;
        if let Some(src) = &self.source_dir {
            let tok = self.iter_dir.join("tokenizer");
            for name in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "tokenizer.model",
                "vocab.json",
                "merges.txt",
                "chat_template.jinja",
            ] {
                let s = src.join(name);
                if s.is_file() {
                    std::fs::create_dir_all(&tok)
                        .map_err(|e| PluginError::io(&tok, "cannot create", e))?;
                    std::fs::copy(&s, tok.join(name))
                        .map_err(|e| PluginError::io(&s, "cannot copy", e))?;
                }
            }
        }
        if let Some(rc) = &self.run_config {
            write(self.iter_dir.join("run_config.yaml"), rc.as_bytes())?;
        }
        if self.cfg.manifest {
            self.manifest.save(&self.iter_dir.join(MANIFEST_FILE))?;
        }
        // .metadata last inside the folder: without it the checkpoint is not a checkpoint.
        write(self.iter_dir.join(".metadata"), &self.metadata_pickle())?;
        let staging = self.staging.clone().expect("opened");
        write(
            staging.join(names::LATEST_ITERATION),
            self.cfg.iteration.to_string().as_bytes(),
        )?;
        self.files.clear();
        let target = self.cfg.path.clone();
        let claim = self.claim.as_mut().expect("claimed in open");
        // With fsync, the small files and folders too, and the rename.
        claim.durable(self.cfg.fsync);
        claim.commit(&staging, self.cfg.overwrite)?;
        self.staging = None;
        self.committed = true;
        self.claim = None;
        let keys: std::collections::BTreeSet<&str> =
            self.pieces.iter().map(|p| p.key.as_str()).collect();
        Ok(format!(
            "wrote {} tensor keys in {} items (+{} byte objects) in {} data files to {}",
            keys.len(),
            self.pieces.len(),
            self.bytes_items.len(),
            self.cfg.files.max(1) * (self.cfg.tp.max(1) * self.cfg.pp.max(1)) as usize,
            Path::new(&target).display()
        ))
    }

    fn metrics(&mut self) -> serde_json::Value {
        serde_json::json!({
            "bytes_copied_in_kernel": self.stats.copied,
            "bytes_written": self.stats.written,
        })
    }

    fn abort(&mut self) {
        if !self.committed {
            self.remove_staging();
        }
        self.claim = None;
    }
}

impl Drop for TorchDistWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

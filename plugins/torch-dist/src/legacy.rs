//! Megatron-LM's own checkpoints (`--ckpt-format torch`): one `torch.save` archive per
//! model-parallel rank, `ROOT/iter_XXXXXXX/mp_rank_{tp:02}[_{pp:03}]/model_optim_rng.pt`,
//! holding `{'args': Namespace, 'checkpoint_version': 3.0, 'iteration': N, 'model': state dict}`
//! with each rank's local tensors (TP shards; the stage's layers numbered from 0).
//!
//! Writer: every rank's archive is laid out from the stream plan (each local tensor a storage
//! `data/{i}` at a known offset), filled as global tensors arrive — each rank's share cut by
//! megatron-core's tensor-parallel rules (`bridgeflow_megatron::placement`) — and framed with its
//! CRC-32s at commit; the root appears under its name only then. Reader: the ranks' archives
//! read in place, every global tensor reassembled from its shards (TP), its stage (PP) placing
//! its layers.

use crate::checkpoint::is_tensor;
use crate::dtypes;
use crate::emit::{tensor_value, Archive, Pickler};
use crate::pickle::{self, Value};
use bridgeflow_megatron::blocks::{block_of, contiguous_offset};
use bridgeflow_megatron::degree::{check_degree, check_product, MAX_DEGREE};
use bridgeflow_megatron::names;
use bridgeflow_megatron::placement::{
    chunk_index, chunk_layers, expert_runs, global_expert, legacy_expert_name, legacy_global_name,
    misplaced, pp_layers, GlobalTensor, LegacyLayout, LocalTensor,
};
use bridgeflow_megatron::tp::{
    check_tp, global_shape_of, tp_runs, tp_split, TpSplit, Unsplittable,
};
use bridgeflow_sdk::inputs::Origins;
use bridgeflow_sdk::outfile::{OutputFile, WriteStats};
use bridgeflow_sdk::{
    schemars, serde, Buffer, BufferPool, DType, Emitter, Item, MapView, PluginError, Result, Sink,
    Source, StreamPlan, Tensor, TensorInfo,
};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FILE: &str = names::LEGACY_FILE;

fn one() -> u64 {
    1
}
fn te() -> String {
    "te".into()
}
fn yes() -> bool {
    true
}

// ------------------------------------------------------------------------------------ writer

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct LegacyWriterConfig {
    /// The checkpoint root to create.
    pub path: PathBuf,
    /// Tensor-parallel ranks.
    #[serde(default = "one")]
    pub tp: u64,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: u64,
    /// Expert-parallel ranks: rank k holds experts [k·E/ep, (k+1)·E/ep), as local experts
    /// `experts.linear_fcN.weight{i}` (TE grouped GEMM), in `mp_rank_…_{k:03}`.
    #[serde(default = "one")]
    pub ep: u64,
    /// Expert tensor parallelism: 1 (experts whole on every TP rank) or tp (split like dense
    /// weights; Megatron's default).
    #[serde(default)]
    pub etp: Option<u64>,
    /// Virtual pipeline chunks per stage (interleaved schedule): a rank holds `model0`,
    /// `model1`, ...; chunk v of stage p is the model's (v·pp + p)-th block of layers.
    #[serde(default = "one")]
    pub vpp: u64,
    /// Layers on the first / last pipeline stage (the rest split evenly).
    #[serde(default)]
    pub num_layers_in_first_pipeline_stage: Option<u64>,
    #[serde(default)]
    pub num_layers_in_last_pipeline_stage: Option<u64>,
    #[serde(default)]
    pub iteration: u64,
    /// `te` (Transformer Engine names, with `_extra_state` entries) or `local` (the local
    /// spec's separate `input_layernorm` / `pre_mlp_layernorm`).
    #[serde(default = "te")]
    pub spec: String,
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Copy tensor bytes that are a view of an input file in the kernel, from that file
    /// (`copy_file_range`, as `cp` does), instead of writing them out of its memory map
    /// (default true; the same bytes either way).
    #[serde(default = "yes")]
    pub kernel_copy: bool,
}

/// One local tensor of a rank: its key, where its bytes come from and go.
struct Local {
    key: String,
    /// The byte runs of its global tensor it is cut from, in order.
    runs: Vec<(u64, u64)>,
    at: u64,
    len: u64,
    crc: Option<u32>,
    /// Written from blocks: each stretch's place in the local and its CRC-32, combined in
    /// order at commit (None: too many stretches; the CRC is read back from the file then).
    parts: Option<Vec<(u64, crc32fast::Hasher)>>,
}

/// The most stretches a local's CRC-32 is combined from (beyond, it is read back).
const MAX_PARTS: usize = 4096;

impl Local {
    /// The CRC-32 of a local written from blocks, from its stretches when they tile it.
    fn combined_crc(&mut self) -> Option<u32> {
        let mut parts = self.parts.take()?;
        parts.sort_by_key(|p| p.0);
        let mut crc = crc32fast::Hasher::new();
        let mut next = 0;
        for (at, h) in &parts {
            if *at != next {
                return None;
            }
            next += h.total_len();
            crc.combine(h);
        }
        (next == self.len).then(|| crc.finalize())
    }
}

/// A block of a tensor (bytes `start..` of it) to each of the local's runs it overlaps, at its
/// place (copied in the kernel from the input file when the bytes are a view of one), each
/// stretch's CRC-32 taken as it is written, to be combined with the others' at commit.
fn write_block(
    out: &mut OutputFile,
    local: &mut Local,
    bytes: &[u8],
    start: u64,
    what: &str,
) -> Result<()> {
    let end = start + bytes.len() as u64;
    let mut pos = 0;
    for &(off, len) in &local.runs {
        let (lo, hi) = (off.max(start), (off + len).min(end));
        if lo < hi {
            let mut crc = crc32fast::Hasher::new();
            out.write_windows(
                &bytes[(lo - start) as usize..(hi - start) as usize],
                local.at + pos + lo - off,
                what,
                |_, w| crc.update(w),
            )?;
            if let Some(parts) = local.parts.as_mut() {
                parts.push((pos + lo - off, crc));
                if parts.len() > MAX_PARTS {
                    local.parts = None;
                }
            }
        }
        pos += len;
    }
    Ok(())
}

struct RankFile {
    path: PathBuf,
    out: OutputFile,
    archive: Archive,
    locals: Vec<Local>,
}

pub struct LegacyWriter {
    cfg: LegacyWriterConfig,
    staging: Option<PathBuf>,
    /// The output's lock, from `open` until the commit is done.
    claim: Option<bridgeflow_sdk::fsutil::OutputClaim>,
    ranks: Vec<RankFile>,
    /// Global tensor name → (rank, local index) it feeds.
    uses: HashMap<String, Vec<(usize, usize)>>,
    /// Bytes of each global tensor not arrived yet.
    remaining: HashMap<String, u64>,
    committed: bool,
    /// The input files' maps, of whichever plugin made them (with `kernel_copy`).
    origins: Option<Arc<Origins>>,
    /// How the rank files' bytes were written (at commit).
    stats: WriteStats,
    /// Reused to gather row-parallel columns.
    gather: Vec<u8>,
}

/// Megatron-LM argument names for the model fields the mapper hands over (`megatron_model`).
const ARGS: &[(&str, &str)] = &[
    ("num_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_query_groups"),
    ("kv_channels", "kv_channels"),
    ("seq_length", "seq_length"),
    ("seq_length", "max_position_embeddings"),
    ("rotary_base", "rotary_base"),
    ("layernorm_epsilon", "norm_epsilon"),
    ("normalization", "normalization"),
    ("position_embedding_type", "position_embedding_type"),
    ("gated_linear_unit", "swiglu"),
    ("add_bias_linear", "add_bias_linear"),
    ("add_qkv_bias", "add_qkv_bias"),
    ("qk_layernorm", "qk_layernorm"),
    (
        "make_vocab_size_divisible_by",
        "make_vocab_size_divisible_by",
    ),
    ("num_moe_experts", "num_experts"),
    ("moe_router_topk", "moe_router_topk"),
    ("moe_ffn_hidden_size", "moe_ffn_hidden_size"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
];

impl LegacyWriter {
    fn args_pickle(
        &self,
        p: &mut Pickler,
        plan: &StreamPlan,
        layers: u64,
        vocab: u64,
        gated: bool,
    ) {
        let model = plan
            .get(bridgeflow_sdk::attrs::MEGATRON_MODEL)
            .unwrap_or_default();
        let mut fields: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (meg, arg) in ARGS {
            if let Some(v) = model.get(*meg).filter(|v| !v.is_null()) {
                fields.insert(arg.to_string(), v.clone());
            }
        }
        if let Some(t) = model
            .get("share_embeddings_and_output_weights")
            .and_then(|v| v.as_bool())
        {
            fields.insert("untie_embeddings_and_output_weights".into(), (!t).into());
        }
        if let Some(g) = model.get("num_query_groups") {
            let heads = model.get("num_attention_heads");
            fields.insert("group_query_attention".into(), (Some(g) != heads).into());
        }
        fields.insert("num_layers".into(), layers.into());
        // What the split assumed (the reader needs it to put SwiGLU halves back).
        fields.insert("swiglu".into(), gated.into());
        fields.insert("padded_vocab_size".into(), vocab.into());
        fields.insert("tensor_model_parallel_size".into(), self.cfg.tp.into());
        fields.insert("pipeline_model_parallel_size".into(), self.cfg.pp.into());
        for (k, v) in [
            (
                "num_layers_in_first_pipeline_stage",
                self.cfg.num_layers_in_first_pipeline_stage,
            ),
            (
                "num_layers_in_last_pipeline_stage",
                self.cfg.num_layers_in_last_pipeline_stage,
            ),
        ] {
            fields.insert(k.into(), v.map_or(serde_json::Value::Null, Into::into));
        }
        fields.insert("ckpt_format".into(), "torch".into());
        // The expert count from the whole tensor (a plan in pieces has one expert per piece).
        let whole = plan.whole_tensors();
        let experts = whole.iter().find(|t| names::has_stacked_experts(t.name()));
        if let Some(t) = experts {
            fields.insert("num_experts".into(), t.shape[0].into());
            fields.insert("moe_grouped_gemm".into(), true.into());
        }
        fields.insert(
            "expert_model_parallel_size".into(),
            self.cfg.ep.max(1).into(),
        );
        let etp = self.cfg.etp.unwrap_or(self.cfg.tp).max(1);
        fields.insert("expert_tensor_parallel_size".into(), etp.into());
        let vpp = self.cfg.vpp.max(1);
        fields.insert(
            "virtual_pipeline_model_parallel_size".into(),
            if vpp > 1 {
                vpp.into()
            } else {
                serde_json::Value::Null
            },
        );
        let impl_ = if self.cfg.spec == "local" {
            "local"
        } else {
            "transformer_engine"
        };
        fields.insert("transformer_impl".into(), impl_.into());
        fields.insert("iteration".into(), self.cfg.iteration.into());
        p.newobj("argparse", "Namespace");
        p.dict_begin();
        for (k, v) in &fields {
            p.str(k);
            match v {
                serde_json::Value::Bool(b) => p.bool(*b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => p.int(i),
                    None => p.float(n.as_f64().unwrap_or(0.0)),
                },
                serde_json::Value::String(s) => p.str(s),
                _ => p.none(),
            }
        }
        p.dict_end();
        p.build();
    }

    /// Refuses what this writer cannot place: tensors stacked over layers, and any that is not
    /// a GPT decoder's.
    fn check_tensors(tensors: &[TensorInfo]) -> Result<()> {
        if let Some(t) = tensors
            .iter()
            .find(|t| names::is_layer_key(t.name()) && names::split_layer(t.name()).is_none())
        {
            return Err(PluginError::config(format!(
                "'{}' is stacked over layers; read with split_layers = true",
                t.name()
            )));
        }
        // What this writer knows how to place and cut: GPT decoders (dense, MoE, MLA) with their
        // embedding, output layer and final norm. A VLM's submodules, multi-token-prediction
        // layers and Mamba mixers have their own Megatron-LM layouts (not written here): refused
        // by name rather than written to the wrong ranks.
        if let Some(t) = tensors.iter().find(|t| !names::is_gpt_key(t.name())) {
            return Err(PluginError::unsupported(format!(
                "'{}': the Megatron-LM writer places GPT decoders (dense, MoE, MLA) only; write this model as torch_dist",
                t.name()
            )));
        }
        Ok(())
    }

    /// The rank files' layout: the degrees (checked against the model), each chunk's layers
    /// and the model's choices; and the layer count.
    fn layout(&self, plan: &StreamPlan, tensors: &[TensorInfo]) -> Result<(LegacyLayout, u64)> {
        let megatron_model = plan
            .get(bridgeflow_sdk::attrs::MEGATRON_MODEL)
            .map(serde_json::Value::Object);
        check_tp(megatron_model.as_ref(), self.cfg.tp.max(1))?;
        let (ep, etp) = (
            self.cfg.ep.max(1),
            self.cfg.etp.unwrap_or(self.cfg.tp).max(1),
        );
        if etp != 1 && etp != self.cfg.tp.max(1) {
            return Err(PluginError::config(format!(
                "etp = {etp}: expert tensor parallelism of 1 or tp ({}) is written",
                self.cfg.tp
            )));
        }
        if let Some(t) = tensors
            .iter()
            .find(|t| names::has_stacked_experts(t.name()) && t.shape[0] % ep != 0)
        {
            return Err(PluginError::config(format!(
                "'{}': {} experts do not divide over {ep} expert-parallel ranks",
                t.name(),
                t.shape[0]
            )));
        }
        let layers = tensors
            .iter()
            .filter_map(|t| names::split_layer(t.name()))
            .map(|(l, _)| l + 1)
            .max()
            .unwrap_or(0);
        let (pp, vpp) = (self.cfg.pp.max(1), self.cfg.vpp.max(1));
        // One block of layers per (virtual) chunk, in model order.
        let chunks = chunk_layers(
            layers,
            pp,
            vpp,
            self.cfg.num_layers_in_first_pipeline_stage,
            self.cfg.num_layers_in_last_pipeline_stage,
        )?;
        let gated = megatron_model
            .as_ref()
            .and_then(|m| m.get("gated_linear_unit")?.as_bool())
            .unwrap_or(true);
        let layout = LegacyLayout {
            tp: self.cfg.tp.max(1),
            pp,
            vpp,
            ep,
            etp,
            chunks,
            gated,
            local_spec: self.cfg.spec == "local",
            tied: !tensors.iter().any(|t| t.name() == names::OUTPUT_LAYER),
        };
        Ok((layout, layers))
    }

    fn lay_out(&mut self, plan: &StreamPlan) -> Result<()> {
        // Pieces (blocks of a tensor, e.g. one expert's gate rows) stand for their tensor; each
        // rank's share is cut from whatever blocks arrive.
        let tensors = plan.whole_tensors();
        for t in &tensors {
            let bytes = t
                .nbytes()
                .ok_or_else(|| PluginError::shape(format!("'{}': size overflows", t.name())))?;
            self.remaining.insert(t.name().to_string(), bytes);
        }
        Self::check_tensors(&tensors)?;
        self.origins = self.cfg.kernel_copy.then(|| Arc::new(Origins::new()));
        let (layout, layers) = self.layout(plan, &tensors)?;
        let vocab = tensors
            .iter()
            .find(|t| t.name() == names::WORD_EMBEDDINGS)
            .map_or(0, |t| t.shape[0]);
        let staging = match self.claim.as_mut() {
            Some(c) => c.staging("partial"),
            None => bridgeflow_sdk::fsutil::hidden_sibling(&self.cfg.path, "partial"),
        };
        let iter_dir = staging.join(names::iteration_dir(self.cfg.iteration));
        self.staging = Some(staging.clone());
        let globals: Vec<GlobalTensor> = tensors
            .iter()
            .map(|t| GlobalTensor {
                name: t.name(),
                shape: &t.shape,
                es: t.dtype.size() as u64,
            })
            .collect();
        for (r, s, k) in layout.ranks() {
            let locals = layout.rank_tensors(&globals, r, s, k)?;
            let folder = names::legacy_rank_dir(r, s, self.cfg.pp, k, layout.ep);
            let pkl = self.rank_pickle(plan, &layout, &tensors, &locals, (layers, vocab));
            self.create_rank_file(&iter_dir, &folder, pkl, &tensors, locals)?;
        }
        Ok(())
    }

    /// A rank file's pickle: its `args`, version and iteration, and each model chunk's state
    /// dict — every local tensor a storage of its own, in order; with TE, an `_extra_state`
    /// (None) after each linear's weight.
    fn rank_pickle(
        &self,
        plan: &StreamPlan,
        layout: &LegacyLayout,
        tensors: &[TensorInfo],
        locals: &[LocalTensor],
        (layers, vocab): (u64, u64),
    ) -> Vec<u8> {
        let mut p = Pickler::new();
        p.dict_begin();
        p.str("args");
        self.args_pickle(&mut p, plan, layers, vocab, layout.gated);
        p.str("checkpoint_version");
        p.float(3.0);
        p.str("iteration");
        p.int(self.cfg.iteration as i64);
        let vpp = layout.vpp as usize;
        for v in 0..vpp {
            p.str(&names::model_chunk_key(v, vpp));
            p.global("collections", "OrderedDict");
            p.tuple(0);
            p.op(b'R');
            p.memo_after();
            p.mark();
            for (i, l) in locals.iter().enumerate().filter(|(_, l)| l.chunk == v) {
                p.str(&l.key);
                tensor_value(&mut p, tensors[l.global].dtype, &l.shape, i);
                match names::legacy_extra_state(&l.key) {
                    Some(extra) if !layout.local_spec => {
                        p.str(&extra);
                        p.none();
                    }
                    _ => {}
                }
            }
            p.op(b'u');
        }
        p.dict_end();
        p.finish()
    }

    /// Creates rank file `folder/model_optim_rng.pt` under `iter_dir`, its blocks reserved,
    /// with the archive of pickle `pkl` and storages for `locals`, and records where each
    /// global tensor's bytes go.
    fn create_rank_file(
        &mut self,
        iter_dir: &Path,
        folder: &str,
        pkl: Vec<u8>,
        tensors: &[TensorInfo],
        locals: Vec<LocalTensor>,
    ) -> Result<()> {
        let dir = iter_dir.join(folder);
        std::fs::create_dir_all(&dir).map_err(|e| PluginError::io(&dir, "cannot create", e))?;
        let path = dir.join(FILE);
        let lens: Vec<u64> = locals
            .iter()
            .map(|l| l.shape.iter().product::<u64>() * tensors[l.global].dtype.size() as u64)
            .collect();
        let archive = Archive::with_payloads(
            "model_optim_rng",
            pkl,
            &lens,
            &format!("{folder}/{}", self.cfg.iteration),
        );
        // Read as well: blocks that arrive piecewise get their CRC from the file.
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| PluginError::io(&path, "cannot create", e))?;
        bridgeflow_sdk::fsutil::reserve(&f, &path, archive.total)?;
        let offsets = archive.payload_offsets();
        let rank = self.ranks.len();
        let mut ls = Vec::new();
        for (i, (l, (&at, &len))) in locals
            .into_iter()
            .zip(offsets.iter().zip(&lens))
            .enumerate()
        {
            self.uses
                .entry(tensors[l.global].name().to_string())
                .or_default()
                .push((rank, i));
            ls.push(Local {
                key: l.key,
                runs: l.runs,
                at,
                len,
                crc: None,
                parts: Some(Vec::new()),
            });
        }
        let out = OutputFile::new(f, &path)
            .kernel_copy(self.origins.clone())
            .durable(self.cfg.fsync);
        self.ranks.push(RankFile {
            path,
            out,
            archive,
            locals: ls,
        });
        Ok(())
    }
}

/// Where a tensor's bytes lie in the tensor it is part of, in bytes: 0 for a whole tensor, the
/// offset of a piece that is a contiguous block of it.
fn block_start(t: &Tensor, base: &str) -> Result<u64> {
    let Some(s) = t.info.shard() else {
        return Ok(0);
    };
    let elements =
        contiguous_offset(&s.global_shape, &s.offsets, &t.info.shape).ok_or_else(|| {
            PluginError::shape(format!(
                "piece '{}' is not a contiguous block of '{base}'",
                t.name()
            ))
        })?;
    Ok(elements * t.info.dtype.size() as u64)
}

impl Sink for LegacyWriter {
    type Config = LegacyWriterConfig;
    const DESCRIPTION: &'static str =
        "Writes Megatron-LM checkpoints (mp_rank_XX[_YYY]/model_optim_rng.pt) split over TP ranks and PP stages, atomically";
    const ENDPOINTS: &'static [bridgeflow_sdk::Endpoint] = &[bridgeflow_sdk::Endpoint {
        aliases: &["mlm"],
        options: &["tp", "pp", "vpp", "ep", "overwrite"],
        ..bridgeflow_sdk::Endpoint::new(
            "megatron-lm",
            "megatron",
            "Megatron-LM's own checkpoint (mp_rank_*/model_optim_rng.pt)",
        )
    }];

    fn new(cfg: LegacyWriterConfig) -> Result<Self> {
        if cfg.spec != "te" && cfg.spec != "local" {
            return Err(PluginError::config(format!(
                "spec '{}': expected te or local",
                cfg.spec
            )));
        }
        // Each degree in range before anything is sized or looped over from it.
        for (option, v) in [
            ("tp", cfg.tp),
            ("pp", cfg.pp),
            ("ep", cfg.ep),
            ("vpp", cfg.vpp),
        ] {
            check_degree(option, v)?;
        }
        if let Some(etp) = cfg.etp {
            check_degree("etp", etp)?;
        }
        check_product("tp × pp × ep", &[cfg.tp, cfg.pp, cfg.ep])?;
        check_product("pp × vpp", &[cfg.pp, cfg.vpp])?;
        Ok(LegacyWriter {
            cfg,
            staging: None,
            claim: None,
            ranks: Vec::new(),
            uses: HashMap::new(),
            remaining: HashMap::new(),
            committed: false,
            origins: None,
            stats: WriteStats::default(),
            gather: Vec::new(),
        })
    }

    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
        // One writer per output; the existence check is made under its lock.
        self.claim = Some(bridgeflow_sdk::fsutil::OutputClaim::claim(&self.cfg.path)?);
        bridgeflow_sdk::fsutil::refuse_existing(&self.cfg.path, self.cfg.overwrite)?;
        let plan = inputs.first().cloned().unwrap_or_default();
        let r = self.lay_out(&plan);
        if r.is_err() {
            self.abort();
        }
        r
    }

    fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
        let t = item.into_tensor()?;
        let base = t.info.base_name().to_string();
        let (Some(uses), Some(left)) =
            (self.uses.get(&base).cloned(), self.remaining.get_mut(&base))
        else {
            return Err(PluginError::shape(format!(
                "tensor '{}' was not announced, or arrived twice",
                t.name()
            )));
        };
        let bytes = t.bytes();
        let start = block_start(&t, &base)?;
        *left = left
            .checked_sub(bytes.len() as u64)
            .ok_or_else(|| PluginError::shape(format!("'{base}' got more bytes than it has")))?;
        let whole = t.info.shard().is_none();
        // The gathering buffer, kept from call to call (fresh pages cost a fault each).
        let mut buf = std::mem::take(&mut self.gather);
        for (rank, i) in uses {
            let RankFile { out, locals, .. } = &mut self.ranks[rank];
            let local = &mut locals[i];
            let what = format!("writing '{}' to", local.key);
            // The whole tensor as one run (most): the rank's share in windows, its CRC as it
            // goes, each window's pages let go once written (a 2 GB embedding is never
            // resident whole).
            if let (true, [(off, len)]) = (whole, &local.runs[..]) {
                let (a, b) = (*off as usize, (*off + *len) as usize);
                let mut crc = crc32fast::Hasher::new();
                out.write_windows(&bytes[a..b], local.at, &what, |r, w| {
                    crc.update(w);
                    t.data.discard(a + r.start..a + r.end);
                })?;
                local.crc = Some(crc.finalize());
                continue;
            }
            if !whole {
                write_block(out, local, bytes, start, &what)?;
                continue;
            }
            let mut write = |b: &[u8], at: u64| out.write_windows(b, at, &what, |_, _| {});
            // A row-parallel weight's columns: a run per row, gathered before writing, the CRC
            // as it goes, pages let go window by window.
            const WINDOW: u64 = 8 << 20;
            let mut crc = crc32fast::Hasher::new();
            let mut at = local.at;
            buf.clear();
            for &(off, len) in &local.runs {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(WINDOW);
                    let a = (off + done) as usize;
                    let run = &bytes[a..a + n as usize];
                    crc.update(run);
                    buf.extend_from_slice(run);
                    if buf.len() as u64 >= WINDOW {
                        write(&buf, at)?;
                        at += buf.len() as u64;
                        buf.clear();
                    }
                    if n == WINDOW {
                        t.data.discard(a..a + n as usize);
                    }
                    done += n;
                }
            }
            if !buf.is_empty() {
                write(&buf, at)?;
                at += buf.len() as u64;
            }
            debug_assert_eq!(at - local.at, local.len);
            local.crc = Some(crc.finalize());
        }
        self.gather = buf;
        t.data.discard(0..bytes.len());
        if self.remaining[&base] == 0 {
            self.uses.remove(&base);
            self.remaining.remove(&base);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<String> {
        if let Some(name) = self.uses.keys().next() {
            return Err(PluginError::shape(format!(
                "tensor '{name}' never arrived; nothing committed"
            )));
        }
        for rf in &mut self.ranks {
            // Tensors that came in blocks: their CRC combined from their stretches', else from
            // what is on disk.
            for l in rf.locals.iter_mut().filter(|l| l.crc.is_none()) {
                if let Some(crc) = l.combined_crc() {
                    l.crc = Some(crc);
                    continue;
                }
                let mut crc = crc32fast::Hasher::new();
                let mut buf = vec![0u8; (8 << 20).min(l.len as usize)];
                let mut done = 0;
                while done < l.len {
                    let n = (l.len - done).min(buf.len() as u64) as usize;
                    rf.out
                        .file()
                        .read_exact_at(&mut buf[..n], l.at + done)
                        .map_err(|e| PluginError::io(&rf.path, "cannot read back", e))?;
                    crc.update(&buf[..n]);
                    done += n as u64;
                }
                l.crc = Some(crc.finalize());
            }
            let crcs: Vec<u32> = rf.locals.iter().map(|l| l.crc.unwrap_or(0)).collect();
            for (off, b) in rf.archive.frame_all(&crcs) {
                rf.out.write_at(&b, off)?;
            }
            if self.cfg.fsync {
                rf.out.sync()?;
            }
            self.stats.copied += rf.out.stats().copied;
            self.stats.written += rf.out.stats().written;
        }
        let staging = self.staging.clone().expect("opened");
        let latest = staging.join(names::LATEST_ITERATION);
        std::fs::write(&latest, self.cfg.iteration.to_string())
            .map_err(|e| PluginError::io(&latest, "cannot write", e))?;
        let n = self.ranks.len();
        let tensors: usize = self.ranks.iter().map(|r| r.locals.len()).sum();
        self.ranks.clear();
        let claim = self.claim.as_mut().expect("claimed in open");
        // With fsync, the small files and folders too, and the rename.
        claim.durable(self.cfg.fsync);
        claim.commit(&staging, self.cfg.overwrite)?;
        self.staging = None;
        self.committed = true;
        self.claim = None;
        Ok(format!(
            "wrote {n} rank files (TP {} x PP {}), {tensors} local tensors, to {}",
            self.cfg.tp,
            self.cfg.pp,
            self.cfg.path.display()
        ))
    }

    fn metrics(&mut self) -> serde_json::Value {
        serde_json::json!({
            "bytes_copied_in_kernel": self.stats.copied,
            "bytes_written": self.stats.written,
        })
    }

    fn abort(&mut self) {
        self.ranks.clear();
        if !self.committed {
            if let Some(s) = self.staging.take() {
                let _ = std::fs::remove_dir_all(s);
            }
        }
        self.claim = None;
    }
}

impl Drop for LegacyWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

// ------------------------------------------------------------------------------------ reader

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct LegacyReaderConfig {
    /// A checkpoint root (with `latest_checkpointed_iteration.txt`) or an `iter_*` / `release`
    /// folder holding `mp_rank_*` folders.
    pub path: PathBuf,
    /// Read one rank's file only (e.g. `mp_rank_01_000`), its local tensors under their own
    /// keys, as stored: for inspection and for checking a split.
    #[serde(default)]
    pub rank: Option<String>,
    /// Hand each stored block that is contiguous in its global tensor (a TP shard of a
    /// column-parallel weight, a local expert) out as a view of the map with a shard
    /// descriptor, instead of assembling the tensor: no copy, and an MoE layer's experts are
    /// never in memory at once. Consumers must take pieces (the models mapper and the writers
    /// do). Tensors split by columns are still assembled.
    #[serde(default)]
    pub pieces: bool,
}

/// One rank's archive, mapped, with its state dicts' tensors by (model chunk, local key).
struct RankData {
    path: PathBuf,
    map: Arc<bridgeflow_sdk::InputMap>,
    chunks: usize,
    tensors: BTreeMap<(usize, String), crate::checkpoint::ItemTensor>,
    /// The run's arguments and the top-level `iteration`, compared across the rank files.
    args: BTreeMap<String, serde_json::Value>,
    iteration: serde_json::Value,
}

// Numbers a rank file states are untrusted: each is bounded before anything is sized or looped
// over from it (a parallel degree of 2^32 once asked for 32 GiB; at most
// bridgeflow_megatron::degree::MAX_DEGREE).
/// The most layers / experts a model may state.
const MAX_LAYERS: u64 = 1 << 20;
const MAX_EXPERTS: u64 = 1 << 20;
/// The most dimensions a tensor may have.
const MAX_DIMS: usize = 64;

/// The arguments that shape the model or its split, the same in every rank file of one
/// checkpoint (a rank file from another run or another layout is named, not mixed in).
const CHECKED_ARGS: &[&str] = &[
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "num_layers",
    "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "group_query_attention",
    "kv_channels",
    "padded_vocab_size",
    "max_position_embeddings",
    "swiglu",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "moe_grouped_gemm",
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "untie_embeddings_and_output_weights",
    "transformer_impl",
    "normalization",
    "position_embedding_type",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "bf16",
    "fp16",
];

/// The non-negative integers of a pickled tuple (a size or stride), at most [`MAX_DIMS`].
fn dims(v: &Value, what: &str) -> std::result::Result<Vec<u64>, String> {
    let n = match v {
        Value::Tuple(t) => t.len(),
        Value::List(l) => l.borrow().len(),
        _ => return Err(format!("its {what} is not a tuple")),
    };
    if n > MAX_DIMS {
        return Err(format!("its {what} has {n} dimensions"));
    }
    v.items()
        .unwrap_or_default()
        .iter()
        .map(|d| match d.as_int() {
            Some(x) if x >= 0 => Ok(x as u64),
            Some(x) => Err(format!("its {what} holds {x}, a negative number")),
            None => Err(format!("its {what} holds a value that is not an integer")),
        })
        .collect()
}

/// Where the elements of the tensor `v` (`_rebuild_tensor_v2(storage, offset, size, stride,
/// ...)`, maybe in `_rebuild_parameter`) lie in the archive `item`, every number of its view
/// checked: offset, sizes and strides non-negative, the layout contiguous row-major, not empty,
/// and its elements [offset, offset + numel) inside its storage record, whose length must be
/// the storage's element count times the dtype size (all in checked arithmetic). Each storage
/// record is CRC-checked once (`verified`), however many tensors view it.
fn tensor_view(
    item: &[u8],
    entries: &[crate::zip::Entry],
    v: &Value,
    verified: &mut HashMap<String, std::ops::Range<usize>>,
) -> std::result::Result<crate::checkpoint::ItemTensor, String> {
    let View {
        dtype,
        key,
        numel,
        offset,
        size,
        stride,
    } = rebuild_args(v)?;
    let key = key.as_str();
    let n = size
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("size {size:?} overflows"))?;
    if n == 0 {
        return Err(format!(
            "empty (size {size:?}): no weights where the model needs them"
        ));
    }
    // Contiguous row-major only (Megatron-LM saves parameters as they are: contiguous).
    let mut want = 1u64;
    for (d, s) in size.iter().zip(&stride).rev() {
        if *d > 1 && *s != want {
            return Err(format!(
                "non-contiguous (size {size:?}, stride {stride:?}): not read"
            ));
        }
        want *= d; // ≤ n: no overflow
    }
    if !matches!(offset.checked_add(n), Some(end) if end <= numel) {
        return Err(format!(
            "its elements [{offset}, {offset} + {n}) lie outside its storage of {numel} elements"
        ));
    }
    let es = dtype.size() as u64;
    let record = match verified.get(key) {
        Some(r) => r.clone(),
        None => {
            let data = crate::zip::find(item, entries, &format!("data/{key}"))?;
            let start = data.as_ptr() as usize - item.as_ptr() as usize;
            let r = start..start + data.len();
            verified.insert(key.to_string(), r.clone());
            r
        }
    };
    if numel.checked_mul(es) != Some(record.len() as u64) {
        return Err(format!(
            "storage record data/{key} has {} bytes, {numel} elements × {es} expected",
            record.len()
        ));
    }
    // In bounds of the record by the checks above (offset + n ≤ numel, numel·es = its length).
    let start = record.start + (offset * es) as usize;
    let end = start + (n * es) as usize;
    if end > record.end {
        return Err(format!("its bytes run past storage record data/{key}"));
    }
    Ok(crate::checkpoint::ItemTensor {
        data: start..end,
        dtype,
        size,
    })
}

/// The arguments of a `_rebuild_tensor_v2(storage, offset, size, stride, ...)` call.
struct View {
    /// The storage's dtype, key (its record is `data/{key}`) and element count.
    dtype: DType,
    key: String,
    numel: u64,
    /// The view: first element, size and stride.
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

/// The [`View`] the tensor `v` (maybe in `_rebuild_parameter`) states, each number a
/// non-negative integer, its size and stride as long.
fn rebuild_args(v: &Value) -> std::result::Result<View, String> {
    let mut t = v.clone();
    if let Value::Object(o) = v {
        let o = o.borrow();
        if o.name == "_rebuild_parameter" {
            t = o
                .args
                .first()
                .cloned()
                .ok_or("a parameter without its tensor")?;
        }
    }
    let Value::Object(o) = &t else {
        return Err("not a tensor".into());
    };
    let o = o.borrow();
    if o.name != "_rebuild_tensor_v2" || o.args.len() < 4 {
        return Err(format!("{}.{}, not a tensor", o.module, o.name));
    }
    let Value::Persistent(pid) = &o.args[0] else {
        return Err("a tensor without storage".into());
    };
    let Value::Tuple(pid) = &**pid else {
        return Err("a storage id that is not a tuple".into());
    };
    let [_, Value::Global(_, cls), key, _, numel] = &pid[..] else {
        return Err("an unexpected storage id".into());
    };
    let dtype = dtypes::from_storage(cls).ok_or_else(|| format!("unknown storage {cls}"))?;
    let key = key.as_str().ok_or("its storage key is not a string")?;
    let numel = match numel.as_int() {
        Some(n) if n >= 0 => n as u64,
        _ => return Err("its storage size is not a non-negative integer".into()),
    };
    let offset = match o.args[1].as_int() {
        Some(n) if n >= 0 => n as u64,
        Some(n) => return Err(format!("storage offset {n} is negative")),
        None => return Err("its storage offset is not an integer".into()),
    };
    let size = dims(&o.args[2], "size")?;
    let stride = dims(&o.args[3], "stride")?;
    if stride.len() != size.len() {
        return Err(format!("size {size:?} with stride {stride:?}"));
    }
    Ok(View {
        dtype,
        key: key.to_string(),
        numel,
        offset,
        size,
        stride,
    })
}

/// A global tensor and the local tensors it is made of: each (rank data index, (model chunk,
/// local key)) with the byte runs of the global tensor its bytes fill, in order.
struct Global {
    dtype: DType,
    shape: Vec<u64>,
    shards: Vec<Shard>,
}

type Shard = (usize, (usize, String), Vec<(u64, u64)>);

pub struct LegacyReader {
    cfg: LegacyReaderConfig,
    ranks: Vec<RankData>,
    globals: BTreeMap<String, Global>,
    tp: u64,
    pool: BufferPool,
    args: BTreeMap<String, serde_json::Value>,
}

fn iter_dir(path: &Path) -> Result<PathBuf> {
    Ok(crate::checkpoint::latest_iteration(path)?.map_or_else(|| path.to_path_buf(), |(d, _)| d))
}

/// The plain value of a pickled scalar (arguments).
fn scalar(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::Float(f) => (*f).into(),
        Value::Str(s) => s.clone().into(),
        _ => serde_json::Value::Null,
    }
}

impl LegacyReader {
    fn arg_u64(&self, k: &str) -> Option<u64> {
        self.args.get(k).and_then(|v| v.as_u64())
    }

    fn read_rank(&mut self, path: PathBuf) -> Result<BTreeMap<String, serde_json::Value>> {
        // Guarded: truncated or changed underneath, it is named (bridgeflow_sdk::inputs).
        let map = Arc::new(bridgeflow_sdk::InputMap::open(&path)?);
        let bad = |e: String| PluginError::format(format!("{}: {e}", path.display()));
        let entries = crate::zip::entries(&map).map_err(bad)?;
        let pkl = crate::zip::find(&map, &entries, "data.pkl").map_err(bad)?;
        let root = pickle::load(pkl, &path.display().to_string()).map_err(bad)?;
        let top = root
            .dict_entries()
            .ok_or_else(|| bad("the pickle is not a dict".into()))?;
        // By key (a dict's keys are unique; the first kept): one look-up per `model<v>`.
        let mut by_key: HashMap<&str, &Value> = HashMap::new();
        for (k, v) in &top {
            if let Some(k) = k.as_str() {
                by_key.entry(k).or_insert(v);
            }
        }
        let get = |k: &str| by_key.get(k).map(|v| (*v).clone());
        match get("checkpoint_version") {
            Some(Value::Float(3.0)) => {}
            Some(v) => {
                return Err(bad(format!(
                    "unsupported checkpoint_version {} (bridgeflow reads Megatron-LM's 3.0)",
                    scalar(&v)
                )))
            }
            None => {
                return Err(bad(
                    "no checkpoint_version: not a Megatron-LM checkpoint".into()
                ))
            }
        }
        // A state dict is an OrderedDict: an object whose state holds the pairs.
        let pairs = |v: Value| match v {
            Value::Object(o) => o.borrow().state.as_ref().and_then(|s| s.dict_entries()),
            v => v.dict_entries(),
        };
        // `model`, or one `model<v>` per virtual pipeline chunk.
        let models: Vec<Vec<(Value, Value)>> = match get(names::MODEL) {
            Some(m) => vec![pairs(m).ok_or_else(|| bad("'model' is not a state dict".into()))?],
            None => (0..MAX_DEGREE + 1)
                .map_while(|v| get(&names::virtual_chunk_key(v as usize)))
                .map(|m| pairs(m).ok_or_else(|| bad("a model chunk is not a state dict".into())))
                .collect::<Result<_>>()?,
        };
        if models.len() as u64 > MAX_DEGREE {
            return Err(bad(format!(
                "more than {MAX_DEGREE} model chunks (model0, model1, ...)"
            )));
        }
        if models.is_empty() {
            return Err(bad("no 'model' state dict".into()));
        }
        let mut args = BTreeMap::new();
        if let Some(Value::Object(o)) = get("args") {
            if let Some(Value::Dict(d)) = &o.borrow().state {
                for (k, v) in d.borrow().iter() {
                    if let Some(k) = k.as_str() {
                        args.insert(k.to_string(), scalar(v));
                    }
                }
            }
        }
        let mut tensors = BTreeMap::new();
        let chunks = models.len();
        let mut verified = HashMap::new();
        for (c, model) in models.into_iter().enumerate() {
            for (k, v) in model {
                let Some(key) = k.as_str() else { continue };
                if names::is_extra_state(key) || !is_tensor(&v) {
                    continue;
                }
                let t = tensor_view(&map, &entries, &v, &mut verified)
                    .map_err(|e| bad(format!("tensor '{key}': {e}")))?;
                // Its CRC check read every page of its record: back to the page cache, so
                // that reading a rank file never holds more than one record.
                map.release_pages(t.data.clone(), true);
                if tensors.insert((c, key.to_string()), t).is_some() {
                    return Err(bad(format!(
                        "tensor '{key}' appears twice in one state dict"
                    )));
                }
            }
        }
        let iteration = get("iteration").map_or(serde_json::Value::Null, |v| scalar(&v));
        self.ranks.push(RankData {
            path,
            map,
            chunks,
            tensors,
            args: args.clone(),
            iteration,
        });
        Ok(args)
    }
}

/// A stored block of a global tensor: its first element, offsets and shape.
type Block = (u64, Vec<u64>, Vec<u64>);

/// Rank files by grid place (TP rank, stage, EP rank) → index in `ranks`.
type Grid = BTreeMap<(u64, u64, u64), usize>;
/// A local tensor of a rank file: (model chunk, local key).
type LocalKey = (usize, String);
/// Per (stage, EP rank), per TP rank: the rank file's TP-split tensors.
type Sharded = BTreeMap<(u64, u64), BTreeMap<u64, Vec<LocalKey>>>;

impl LegacyReader {
    /// Whether rank files `a` and `b` hold `keys` (of `a`) byte for byte alike.
    fn identical(&self, a: usize, b: usize, keys: &[(usize, String)]) -> bool {
        let (ra, rb) = (&self.ranks[a], &self.ranks[b]);
        !keys.is_empty()
            && keys
                .iter()
                .all(|k| match (ra.tensors.get(k), rb.tensors.get(k)) {
                    (Some(x), Some(y)) => {
                        let same = x.dtype == y.dtype
                            && x.size == y.size
                            && ra.map[x.data.clone()] == rb.map[y.data.clone()];
                        // Compared: their pages back to the page cache (bounded memory).
                        ra.map.release_pages(x.data.clone(), true);
                        rb.map.release_pages(y.data.clone(), true);
                        same
                    }
                    _ => false,
                })
    }

    /// A cheap digest of `keys` in rank file `i` (their names and first bytes): rank files
    /// that are copies of each other digest alike; others almost never do, so only those
    /// alike are compared byte for byte.
    fn digest(&self, i: usize, keys: &[(usize, String)]) -> u32 {
        let r = &self.ranks[i];
        let mut h = crc32fast::Hasher::new();
        for k in keys {
            h.update(k.1.as_bytes());
            if let Some(t) = r.tensors.get(k) {
                let d = &r.map[t.data.clone()];
                h.update(&d[..d.len().min(64)]);
            }
        }
        h.finalize()
    }

    /// The first pair of rank files among `files` (grid coordinate, index) with the same
    /// `keys_of` that hold them identically.
    fn duplicates<'a>(
        &self,
        files: &[(u64, usize)],
        keys_of: &dyn Fn(u64) -> &'a [(usize, String)],
        pair_ok: &dyn Fn(u64, u64) -> bool,
    ) -> Option<(usize, usize, &'a [LocalKey])> {
        let mut by_digest: HashMap<u32, Vec<(u64, usize)>> = HashMap::new();
        for &(c, i) in files {
            by_digest
                .entry(self.digest(i, keys_of(c)))
                .or_default()
                .push((c, i));
        }
        for group in by_digest.values().filter(|g| g.len() > 1) {
            for (x, &(c1, i1)) in group.iter().enumerate() {
                for &(c2, i2) in &group[x + 1..] {
                    let keys = keys_of(c1);
                    if pair_ok(c1, c2) && keys == keys_of(c2) && self.identical(i1, i2, keys) {
                        return Some((i1, i2, keys));
                    }
                }
            }
        }
        None
    }

    /// What the rank files must agree on, beyond their shapes:
    /// - every model chunk holds each of its layers (none missing, none of another stage);
    /// - the arguments that shape the model and its split, and the iteration, are the same in
    ///   every file (the reader sizes everything from rank 0's);
    /// - no two TP ranks hold byte-identical shards of every TP-split tensor, and the first or
    ///   last stage is no byte copy of another stage.
    ///
    /// The last is how a rank file copied over another is caught: Megatron-LM's `args` carry
    /// no TP or PP rank (and its global `rank` is the saver's: a converter saves every file
    /// from one process), so the file cannot say where it belongs. Its shards can: distinct TP
    /// ranks hold distinct slices of each split weight, and identical slices of *every* split
    /// weight (embedding, QKV, projections, MLP) do not occur in a real model. The first and
    /// last stages hold the embedding and the final norm / output layer, which no other stage
    /// does. Middle stages and expert-parallel ranks are not compared: a depth-upscaled model
    /// repeats layers and a sparse-upcycled MoE starts with identical experts, legitimately.
    fn check_ranks(
        &self,
        index: &Grid,
        chunks: &[(u64, u64)],
        seen_layers: &BTreeMap<(usize, usize), std::collections::BTreeSet<u64>>,
        sharded: &Sharded,
        pp: u64,
        vpp: u64,
    ) -> Result<()> {
        for (&(_, s, _), &i) in index {
            for v in 0..vpp as usize {
                let count = chunks[v * pp as usize + s as usize].1;
                let seen = seen_layers.get(&(i, v));
                if seen.map_or(0, |x| x.len() as u64) != count {
                    let missing = (0..count)
                        .find(|l| !seen.is_some_and(|x| x.contains(l)))
                        .unwrap_or(0);
                    return Err(PluginError::format(format!(
                        "{}: model chunk {v} holds no tensor of its layer {missing} (it has {count} layers)",
                        self.ranks[i].path.display()
                    )));
                }
            }
        }
        let first = &self.ranks[index[&(0, 0, 0)]];
        for &i in index.values() {
            let r = &self.ranks[i];
            let null = serde_json::Value::Null;
            for k in CHECKED_ARGS {
                let (a, b) = (
                    first.args.get(*k).unwrap_or(&null),
                    r.args.get(*k).unwrap_or(&null),
                );
                if a != b {
                    return Err(PluginError::format(format!(
                        "{}: args.{k} = {b}, but {} has {a}: rank files of different runs or layouts",
                        r.path.display(),
                        first.path.display()
                    )));
                }
            }
            if r.iteration != first.iteration {
                return Err(PluginError::format(format!(
                    "{}: iteration {}, but {} is iteration {}: rank files of different checkpoints",
                    r.path.display(),
                    r.iteration,
                    first.path.display(),
                    first.iteration
                )));
            }
        }
        for (&(s, k), by_rank) in sharded {
            let files: Vec<(u64, usize)> =
                by_rank.keys().map(|&r| (r, index[&(r, s, k)])).collect();
            let keys_of = |r: u64| by_rank[&r].as_slice();
            if let Some((a, b, keys)) = self.duplicates(&files, &keys_of, &|_, _| true) {
                return Err(PluginError::format(format!(
                    "rank files {} and {} hold identical shards of all {} tensor-parallel tensors (e.g. '{}'): one is a copy of the other, not a different TP rank's",
                    self.ranks[a].path.display(),
                    self.ranks[b].path.display(),
                    keys.len(),
                    keys[0].1
                )));
            }
        }
        if pp > 1 {
            let all: BTreeMap<usize, Vec<(usize, String)>> = index
                .values()
                .map(|&i| (i, self.ranks[i].tensors.keys().cloned().collect()))
                .collect();
            let mut groups: BTreeMap<(u64, u64), Vec<(u64, usize)>> = BTreeMap::new();
            for (&(r, s, k), &i) in index {
                groups.entry((r, k)).or_default().push((s, i));
            }
            for ((r, k), files) in groups {
                let keys_of = |s: u64| all[&index[&(r, s, k)]].as_slice();
                let ends = |a: u64, b: u64| a == 0 || b == 0 || a == pp - 1 || b == pp - 1;
                if let Some((a, b, keys)) = self.duplicates(&files, &keys_of, &ends) {
                    return Err(PluginError::format(format!(
                        "rank files {} and {} hold the same {} tensors byte for byte (e.g. '{}'), one of them the first or last pipeline stage: one is a copy of the other",
                        self.ranks[a].path.display(),
                        self.ranks[b].path.display(),
                        keys.len(),
                        keys[0].1
                    )));
                }
            }
        }
        Ok(())
    }

    /// The shards of `g` tile it exactly: each shard's runs as long as its bytes, and all runs
    /// together covering [0, total) with no gap and no overlap.
    fn check_tiling(&self, name: &str, g: &Global) -> Result<()> {
        let total = g
            .shape
            .iter()
            .try_fold(g.dtype.size() as u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| PluginError::shape(format!("'{name}' {:?}: size overflows", g.shape)))?;
        let mut runs: Vec<(u64, u64, usize)> = Vec::new();
        for (n, (i, key, rs)) in g.shards.iter().enumerate() {
            let r = &self.ranks[*i];
            let held = r.tensors[key].data.len() as u64;
            let want = rs.iter().try_fold(0u64, |a, x| a.checked_add(x.1));
            if want != Some(held) {
                return Err(PluginError::shape(format!(
                    "{}: '{}' holds {held} bytes, its place in '{name}' {want:?}",
                    r.path.display(),
                    key.1
                )));
            }
            runs.extend(rs.iter().filter(|x| x.1 > 0).map(|&(o, l)| (o, l, n)));
        }
        runs.sort_unstable();
        let shard = |n: usize| {
            let (i, key, _) = &g.shards[n];
            format!("{} ('{}')", self.ranks[*i].path.display(), key.1)
        };
        let (mut pos, mut prev) = (0u64, None);
        for (off, len, n) in runs {
            if off < pos {
                return Err(PluginError::shape(format!(
                    "'{name}': bytes [{off}, {pos}) are held by both {} and {}: overlapping shards",
                    prev.map_or_else(String::new, shard),
                    shard(n)
                )));
            }
            if off > pos {
                return Err(PluginError::shape(format!(
                    "'{name}': bytes [{pos}, {off}) of its {total} are held by no rank file (before {})",
                    shard(n)
                )));
            }
            pos = off.checked_add(len).ok_or_else(|| {
                PluginError::shape(format!("'{name}': a shard's place overflows"))
            })?;
            prev = Some(n);
        }
        if pos != total {
            return Err(PluginError::shape(format!(
                "'{name}': the ranks hold {pos} of its {total} bytes"
            )));
        }
        Ok(())
    }
}

impl LegacyReader {
    /// Each shard of `g` as a block of it (element start, offsets, shape), if every shard is
    /// one contiguous run.
    fn blocks(&self, g: &Global) -> Option<Vec<Block>> {
        let es = g.dtype.size() as u64;
        g.shards
            .iter()
            .map(|(_, _, runs)| match runs[..] {
                [(off, len)] => {
                    block_of(&g.shape, off / es, len / es).map(|(o, s)| (off / es, o, s))
                }
                _ => None,
            })
            .collect()
    }
}

/// The layout a checkpoint's first rank file states, every number bounded.
struct Stated {
    tp: u64,
    pp: u64,
    ep: u64,
    etp: u64,
    vpp: u64,
    layers: u64,
    gated: bool,
    experts: Option<u64>,
}

/// The rank files' local tensors gathered into global ones, and what the checks need.
#[derive(Default)]
struct Gathered {
    /// Per rank file: the local layers each chunk holds (all of 0..count must be there).
    seen_layers: BTreeMap<(usize, usize), std::collections::BTreeSet<u64>>,
    /// Per (stage, EP rank), per TP rank: its TP-split tensors, for the duplicate check.
    sharded: Sharded,
    /// Global names: stage layers renumbered, local-spec norms renamed to the TE names,
    /// local experts numbered globally; each global tensor from its shards' byte runs.
    globals: BTreeMap<String, Global>,
}

impl Gathered {
    /// Notes a TP-split tensor of rank file (TP rank `r`, stage `s`, EP rank `k`).
    fn split_shard(&mut self, (r, s, k): (u64, u64, u64), key: LocalKey) {
        self.sharded
            .entry((s, k))
            .or_default()
            .entry(r)
            .or_default()
            .push(key);
    }
}

/// One rank file being gathered: its index and place in the grid, TP rank 0's file of its
/// stage and EP rank (where a replicated tensor of another TP rank must match), its keys.
struct RankCtx<'a> {
    i: usize,
    i0: usize,
    place: (u64, u64, u64),
    path: String,
    keyset: std::collections::HashSet<&'a LocalKey>,
}

impl RankCtx<'_> {
    fn bad(&self, what: String) -> PluginError {
        PluginError::format(format!("{}: {what}", self.path))
    }
    fn too_big(&self, key: &str) -> PluginError {
        self.bad(format!("'{key}': its global size overflows"))
    }
    /// The error for a layer `l` beyond the `count` of model chunk `v`.
    fn beyond(&self, key: &str, l: u64, v: usize, count: u64) -> PluginError {
        let s = self.place.1;
        self.bad(format!(
            "'{key}': layer {l}, but model chunk {v} of stage {s} holds {count} layers"
        ))
    }
}

/// A local tensor's place in its global tensor: the global name and shape, and the byte runs
/// its bytes fill.
type Placed = (String, Vec<u64>, Vec<(u64, u64)>);

impl LegacyReader {
    /// One rank file's local tensors under their own keys (`rank`), as stored.
    fn plan_rank(&mut self, dir: &Path, rank: &str) -> Result<StreamPlan> {
        self.args = self.read_rank(dir.join(rank).join(FILE))?;
        let r = &self.ranks[0];
        for ((c, key), t) in &r.tensors {
            // With virtual pipeline chunks, each chunk's keys under `model<v>.`.
            let name = if r.chunks > 1 {
                format!("{}.{key}", names::model_chunk_key(*c, r.chunks))
            } else {
                key.clone()
            };
            let bytes = t.size.iter().product::<u64>() * t.dtype.size() as u64;
            let g = Global {
                dtype: t.dtype,
                shape: t.size.clone(),
                shards: vec![(0, (*c, key.clone()), vec![(0, bytes)])],
            };
            self.globals.insert(name, g);
        }
        let infos = self
            .globals
            .iter()
            .map(|(n, g)| TensorInfo::new(n.clone(), g.dtype, &g.shape))
            .collect();
        let mut plan = StreamPlan::new(infos);
        plan.set(bridgeflow_sdk::attrs::MEGATRON_ARGS, self.args.clone());
        Ok(plan)
    }

    /// Rank 0's file (`mp_rank_00[_000]/model_optim_rng.pt`).
    fn first_rank(dir: &Path) -> Result<PathBuf> {
        names::LEGACY_FIRST_RANKS
            .iter()
            .map(|d| dir.join(d).join(FILE))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                PluginError::format(format!(
                    "{}: no mp_rank_00[_000]/{FILE}: not a Megatron-LM checkpoint",
                    dir.display()
                ))
            })
    }

    /// The layout rank 0's `args` state (read from `first`, which holds `vpp` model chunks),
    /// every number that sizes or loops bounded first (named with the file it is from).
    fn stated(&self, dir: &Path, first: &Path, vpp: u64) -> Result<Stated> {
        let first_shown = first.display().to_string();
        let arg_err =
            |k: &str, what: String| PluginError::format(format!("{first_shown}: args.{k} {what}"));
        let degree = |k: &str, default: u64| -> Result<u64> {
            match self.args.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|d| (1..=MAX_DEGREE).contains(d))
                    .ok_or_else(|| {
                        arg_err(
                            k,
                            format!("= {v}: not a parallel degree in 1..={MAX_DEGREE}"),
                        )
                    }),
            }
        };
        let tp = degree("tensor_model_parallel_size", 1)?;
        let pp = degree("pipeline_model_parallel_size", 1)?;
        let ep = degree("expert_model_parallel_size", 1)?;
        let etp = degree("expert_tensor_parallel_size", tp)?;
        // The model chunks a rank holds are what the interleaved schedule saved.
        let stated_vpp = degree("virtual_pipeline_model_parallel_size", 1)?;
        if stated_vpp != vpp {
            return Err(arg_err(
                "virtual_pipeline_model_parallel_size",
                format!("= {stated_vpp}, but the file holds {vpp} model chunks"),
            ));
        }
        let layers = self.arg_u64("num_layers").ok_or_else(|| {
            PluginError::format(format!("{}: args has no num_layers", dir.display()))
        })?;
        if !(1..=MAX_LAYERS).contains(&layers) {
            return Err(arg_err(
                "num_layers",
                format!("= {layers}: not 1..={MAX_LAYERS}"),
            ));
        }
        let gated = self
            .args
            .get("swiglu")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let experts = match self.args.get("num_experts") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|e| (1..=MAX_EXPERTS).contains(e) && e % ep == 0)
                    .ok_or_else(|| {
                        arg_err(
                            "num_experts",
                            format!("= {v}: not 1..={MAX_EXPERTS} experts over {ep} expert-parallel ranks"),
                        )
                    })?,
            ),
        };
        // Experts are split over 1 or all TP ranks (a dense model's etp is unused).
        if experts.is_some() && etp != 1 && etp != tp {
            return Err(arg_err(
                "expert_tensor_parallel_size",
                format!("= {etp}: 1 or the TP size ({tp}) is read"),
            ));
        }
        let st = Stated {
            tp,
            pp,
            ep,
            etp,
            vpp,
            layers,
            gated,
            experts,
        };
        Self::check_folders(dir, &first_shown, &st)?;
        Ok(st)
    }

    /// The grid against the folders there: every rank of it must be present (named when one
    /// is missing, see [`Self::read_grid`]), and none beyond it (a rank 0 whose args were
    /// altered, or files of another layout mixed in).
    fn check_folders(dir: &Path, first_shown: &str, st: &Stated) -> Result<()> {
        let (tp, pp, ep) = (st.tp, st.pp, st.ep);
        let grid = tp
            .checked_mul(pp)
            .and_then(|n| n.checked_mul(ep))
            .ok_or_else(|| {
                PluginError::format(format!(
                    "{first_shown}: args.tensor_model_parallel_size x PP x EP overflows"
                ))
            })?;
        let present = std::fs::read_dir(dir)
            .map_err(|e| PluginError::io(dir, "cannot list", e))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                names::is_legacy_rank_dir(&e.file_name().to_string_lossy())
                    && e.path().join(FILE).is_file()
            })
            .count() as u64;
        if present > grid {
            return Err(PluginError::format(format!(
                "{}: {present} rank folders, but {first_shown} says TP {tp} x PP {pp} x EP {ep} = {grid}",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Every rank file of the grid, each read once; a missing one is named (the loop ends at
    /// the first missing file, so it never runs past the files there).
    fn read_grid(&mut self, dir: &Path, st: &Stated) -> Result<Grid> {
        let (tp, pp, ep, vpp) = (st.tp, st.pp, st.ep, st.vpp);
        let mut index = BTreeMap::new();
        for s in 0..pp {
            for k in 0..ep {
                for r in 0..tp {
                    let p = dir.join(names::legacy_rank_dir(r, s, pp, k, ep)).join(FILE);
                    if !p.is_file() {
                        return Err(PluginError::format(format!(
                            "{}: missing (the checkpoint says TP {tp} x PP {pp} x EP {ep})",
                            p.display()
                        )));
                    }
                    self.read_rank(p)?;
                    let got = self.ranks.last().map_or(0, |r| r.chunks) as u64;
                    if got != vpp {
                        return Err(PluginError::format(format!(
                            "{}: {got} model chunks; rank 0 has {vpp}",
                            self.ranks.last().expect("read").path.display()
                        )));
                    }
                    index.insert((r, s, k), self.ranks.len() - 1);
                }
            }
        }
        Ok(index)
    }

    /// Every rank file's local tensors gathered into global tensors (`chunks`: one block of
    /// layers per model chunk, in model order).
    fn gather(&self, index: &Grid, chunks: &[(u64, u64)], st: &Stated) -> Result<Gathered> {
        let mut g = Gathered::default();
        for (&(r, s, k), &i) in index {
            let keys: Vec<LocalKey> = self.ranks[i].tensors.keys().cloned().collect();
            let ctx = RankCtx {
                i,
                i0: index[&(0, s, k)],
                place: (r, s, k),
                path: self.ranks[i].path.display().to_string(),
                keyset: keys.iter().collect(),
            };
            for (v, key) in keys.clone() {
                if let Some(placed) = self.place_local(&mut g, &ctx, v, &key, chunks, st)? {
                    self.add_shard(&mut g, &ctx, (v, key), placed)?;
                }
            }
        }
        Ok(g)
    }

    /// Where local tensor `key` of model chunk `v` lies in its global tensor, checked against
    /// the chunk's layers and ends; None for a copy that adds nothing (a replicated tensor of
    /// TP rank > 0, a dense tensor of EP rank > 0).
    fn place_local(
        &self,
        g: &mut Gathered,
        ctx: &RankCtx,
        v: usize,
        key: &str,
        chunks: &[(u64, u64)],
        st: &Stated,
    ) -> Result<Option<Placed>> {
        let s = ctx.place.1;
        let c = chunk_index(s, v as u64, st.pp);
        let count = chunks[c].1;
        // A layer this chunk does not have would land on another stage's layer.
        if let Some((l, _)) = names::split_layer(key) {
            if l >= count {
                return Err(ctx.beyond(key, l, v, count));
            }
            g.seen_layers.entry((ctx.i, v)).or_default().insert(l);
        } else if st.pp * st.vpp > 1 {
            // The embedding lives on the first chunk (a tied copy on the last), the final norm
            // and output layer on the last: elsewhere a stage is misplaced.
            if let Some(end) = misplaced(key, c, chunks.len() - 1) {
                return Err(ctx.bad(format!(
                    "'{key}' in model chunk {v} of stage {s}, which is not the model's {end} chunk: a rank file of another stage"
                )));
            }
        }
        // A local expert: `…mlp.experts.linear_fcN.weight{i}` (TE grouped GEMM) or
        // `…mlp.experts.local_experts.{i}.linear_fcN.weight` (local spec).
        match names::legacy_local_expert(key) {
            Some((module, local)) => {
                self.place_expert(g, ctx, (v, key), (&module, local), chunks[c], st)
            }
            None => self.place_dense(g, ctx, (v, key), chunks[c].0, st),
        }
    }

    /// The global shape the local tensor `key` is a share of, `degree` ranks dividing it.
    fn global_shape(
        &self,
        ctx: &RankCtx,
        (v, key): (usize, &str),
        split: TpSplit,
        degree: u64,
    ) -> Result<Vec<u64>> {
        let t = self.local(ctx, v, key);
        global_shape_of(&t.size, split, degree).map_err(|e| match e {
            Unsplittable::NoAxis(a) => {
                ctx.bad(format!("'{key}' is {:?}: no axis {a} to split", t.size))
            }
            Unsplittable::Overflow => ctx.too_big(key),
        })
    }

    /// A local expert's place in its layer's stacked experts (`module`: as the grouped key
    /// names it; `local`: its index on the EP rank; `(first_layer, count)`: the chunk's).
    fn place_expert(
        &self,
        g: &mut Gathered,
        ctx: &RankCtx,
        (v, key): (usize, &str),
        (module, local): (&str, u64),
        (first_layer, count): (u64, u64),
        st: &Stated,
    ) -> Result<Option<Placed>> {
        let (r, _, k) = ctx.place;
        let (l, param) = names::split_layer(module).ok_or_else(|| {
            PluginError::format(format!("'{key}': an expert outside the decoder"))
        })?;
        if l >= count {
            return Err(ctx.beyond(key, l, v, count));
        }
        g.seen_layers.entry((ctx.i, v)).or_default().insert(l);
        let name = legacy_expert_name(l, param, first_layer);
        let split = tp_split(&name, st.gated);
        if st.etp == 1 && r > 0 {
            self.same_as_rank0(ctx, v, key)?;
            return Ok(None); // the same experts on every TP rank
        }
        let e = st.experts.ok_or_else(|| {
            PluginError::format(format!("'{key}': experts, but args has no num_experts"))
        })?;
        let (ep, etp) = (st.ep, st.etp);
        let per = e / ep;
        if local >= per {
            return Err(ctx.bad(format!(
                "'{key}': local expert {local}, but each of {ep} expert-parallel ranks holds {per} of {e}"
            )));
        }
        if split != TpSplit::Replicated && etp > 1 {
            g.split_shard(ctx.place, (v, key.to_string()));
        }
        let one = self.global_shape(ctx, (v, key), split, etp)?;
        let es = self.local(ctx, v, key).dtype.size() as u64;
        let global = global_expert(k, local, per);
        let etp_rank = if etp == 1 { 0 } else { r };
        let runs =
            expert_runs(&one, es, split, etp, etp_rank, global)?.ok_or_else(|| ctx.too_big(key))?;
        let shape: Vec<u64> = std::iter::once(e).chain(one).collect();
        Ok(Some((name, shape, runs)))
    }

    /// A dense local tensor's place in its global tensor (`first_layer`: the chunk's).
    fn place_dense(
        &self,
        g: &mut Gathered,
        ctx: &RankCtx,
        (v, key): (usize, &str),
        first_layer: u64,
        st: &Stated,
    ) -> Result<Option<Placed>> {
        let (r, _, k) = ctx.place;
        if k > 0 {
            return Ok(None); // dense tensors repeat on every expert-parallel rank
        }
        let has = |l: u64, p: &str| ctx.keyset.contains(&(v, names::layer_key(l, p)));
        let name = legacy_global_name(key, first_layer, has);
        let split = tp_split(&name, st.gated);
        if split == TpSplit::Replicated && r > 0 {
            self.same_as_rank0(ctx, v, key)?;
            return Ok(None);
        }
        if split != TpSplit::Replicated && st.tp > 1 {
            g.split_shard(ctx.place, (v, key.to_string()));
        }
        let shape = self.global_shape(ctx, (v, key), split, st.tp)?;
        let es = self.local(ctx, v, key).dtype.size() as u64;
        let runs = tp_runs(&shape, es, split, st.tp, r)?;
        Ok(Some((name, shape, runs)))
    }

    /// Local tensor `key` of model chunk `v` of rank file `ctx`.
    fn local(&self, ctx: &RankCtx, v: usize, key: &str) -> &crate::checkpoint::ItemTensor {
        &self.ranks[ctx.i].tensors[&(v, key.to_string())]
    }

    /// A tensor of a TP rank > 0 that every rank holds whole: as TP rank 0 holds it.
    fn same_as_rank0(&self, ctx: &RankCtx, v: usize, key: &str) -> Result<()> {
        let t = self.local(ctx, v, key);
        let rank0 = &self.ranks[ctx.i0];
        match rank0.tensors.get(&(v, key.to_string())) {
            Some(t0) if t0.dtype == t.dtype && t0.size == t.size => Ok(()),
            Some(t0) => Err(PluginError::shape(format!(
                "{}: '{key}' is {} {:?}; TP rank 0 ({}) holds it as {} {:?}: inconsistent shapes across ranks",
                ctx.path,
                t.dtype,
                t.size,
                rank0.path.display(),
                t0.dtype,
                t0.size
            ))),
            None => Err(ctx.bad(format!(
                "'{key}', which TP rank 0 ({}) does not hold",
                rank0.path.display()
            ))),
        }
    }

    /// Adds local tensor `local` of rank file `ctx` as a shard of its global tensor, which
    /// every shard must make of one dtype and shape.
    fn add_shard(
        &self,
        g: &mut Gathered,
        ctx: &RankCtx,
        local: LocalKey,
        (name, shape, runs): Placed,
    ) -> Result<()> {
        // An embedding kept on two stages (tied): the first copy.
        if names::split_layer(&name).is_none()
            && g.globals
                .get(&name)
                .is_some_and(|g| g.shards.iter().any(|sh| sh.2 == runs))
        {
            return Ok(());
        }
        let t = &self.ranks[ctx.i].tensors[&local];
        let global = g.globals.entry(name.clone()).or_insert_with(|| Global {
            dtype: t.dtype,
            shape: shape.clone(),
            shards: Vec::new(),
        });
        if global.shape != shape || global.dtype != t.dtype {
            return Err(PluginError::shape(format!(
                "{}: '{}' is {} {:?}, making '{name}' {:?}; another rank makes it {} {:?}: inconsistent shapes across ranks",
                self.ranks[ctx.i].path.display(),
                local.1,
                t.dtype,
                t.size,
                shape,
                global.dtype,
                global.shape
            )));
        }
        global.shards.push((ctx.i, local, runs));
        Ok(())
    }

    /// The plan's tensors: each global tensor, or with `pieces` each of its stored blocks.
    fn infos(&self, globals: &BTreeMap<String, Global>) -> Vec<TensorInfo> {
        let mut infos = Vec::new();
        for (n, g) in globals {
            match self.blocks(g) {
                Some(blocks) if self.cfg.pieces && blocks.len() > 1 => {
                    for (start, offsets, shape) in blocks {
                        infos.push(
                            TensorInfo::new(format!("{n}#{start}"), g.dtype, &shape)
                                .with_shard(&g.shape, &offsets),
                        );
                    }
                }
                _ => infos.push(TensorInfo::new(n.clone(), g.dtype, &g.shape)),
            }
        }
        infos
    }
}

impl Source for LegacyReader {
    type Config = LegacyReaderConfig;
    const DESCRIPTION: &'static str =
        "Reads Megatron-LM checkpoints (mp_rank_XX[_YYY]/model_optim_rng.pt): global tensors from every TP rank and PP stage";
    // Rank shards as pieces: nothing assembled that need not be.
    const ENDPOINTS: &'static [bridgeflow_sdk::Endpoint] = &[bridgeflow_sdk::Endpoint {
        aliases: &["mlm"],
        config: r#"{"pieces": true}"#,
        ..bridgeflow_sdk::Endpoint::new(
            "megatron-lm",
            "megatron",
            "Megatron-LM's own checkpoint (mp_rank_*/model_optim_rng.pt)",
        )
    }];

    fn new(cfg: LegacyReaderConfig) -> Result<Self> {
        Ok(LegacyReader {
            cfg,
            ranks: Vec::new(),
            globals: BTreeMap::new(),
            tp: 1,
            pool: BufferPool::new(16 << 20),
            args: BTreeMap::new(),
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        let dir = iter_dir(&self.cfg.path)?;
        if let Some(rank) = self.cfg.rank.clone() {
            return self.plan_rank(&dir, &rank);
        }
        let first = Self::first_rank(&dir)?;
        self.args = self.read_rank(first.clone())?;
        let vpp = self.ranks.first().map_or(1, |r| r.chunks) as u64;
        self.ranks.clear();
        let st = self.stated(&dir, &first, vpp)?;
        self.tp = st.tp;
        let index = self.read_grid(&dir, &st)?;
        // One block of layers per (virtual) chunk, in model order: chunk v of stage p is the
        // (v·pp + p)-th (pp · vpp ≤ the files read × the chunks in one: no large allocation).
        let chunks = pp_layers(
            st.layers,
            st.pp * vpp,
            self.arg_u64("num_layers_in_first_pipeline_stage"),
            self.arg_u64("num_layers_in_last_pipeline_stage"),
        )?;
        let g = self.gather(&index, &chunks, &st)?;
        self.check_ranks(&index, &chunks, &g.seen_layers, &g.sharded, st.pp, vpp)?;
        for (name, global) in &g.globals {
            self.check_tiling(name, global)?;
        }
        // The checks compared bytes across rank files: their pages go back too.
        for r in &self.ranks {
            r.map.release_pages(0..r.map.len(), true);
        }
        let infos = self.infos(&g.globals);
        self.globals = g.globals;
        let mut plan = StreamPlan::new(infos);
        plan.set(bridgeflow_sdk::attrs::FORMAT, "megatron-lm");
        plan.set(bridgeflow_sdk::attrs::MEGATRON_ARGS, self.args.clone());
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let globals = std::mem::take(&mut self.globals);
        for (name, g) in globals {
            if let Some(blocks) = self.blocks(&g).filter(|b| self.cfg.pieces && b.len() > 1) {
                // Each stored block as it lies in the map.
                for ((start, offsets, shape), (i, key, _)) in blocks.into_iter().zip(&g.shards) {
                    let r = &self.ranks[*i];
                    r.map.check()?;
                    let info = TensorInfo::new(format!("{name}#{start}"), g.dtype, &shape)
                        .with_shard(&g.shape, &offsets);
                    let data = Buffer::from_owner(MapView {
                        map: r.map.clone(),
                        range: r.tensors[key].data.clone(),
                    });
                    out.tensor(Tensor::new(info, data)?)?;
                }
                continue;
            }
            let info = TensorInfo::new(name.clone(), g.dtype, &g.shape);
            let total = g.shape.iter().product::<u64>() * g.dtype.size() as u64;
            let buffer = match &g.shards[..] {
                // Stored whole in one place: a view of the map.
                [(i, key, runs)] if runs.len() == 1 && runs[0] == (0, total) => {
                    let r = &self.ranks[*i];
                    r.map.check()?;
                    Buffer::from_owner(MapView {
                        map: r.map.clone(),
                        range: r.tensors[key].data.clone(),
                    })
                }
                shards => {
                    let mut buf = self.pool.take(total as usize);
                    for (i, key, runs) in shards {
                        let r = &self.ranks[*i];
                        r.map.check()?;
                        let src = &r.map[r.tensors[key].data.clone()];
                        let mut from = 0usize;
                        for &(off, len) in runs {
                            let (off, len) = (off as usize, len as usize);
                            buf.as_mut_slice()[off..off + len]
                                .copy_from_slice(&src[from..from + len]);
                            from += len;
                        }
                        // Copied out: the rank file's pages go back to the page cache, so
                        // resident memory follows the budget, not the checkpoint's size.
                        bridgeflow_sdk::buffer::MappedBytes::release(
                            &*r.map,
                            r.tensors[key].data.clone(),
                            false,
                        );
                    }
                    buf.freeze()
                }
            };
            out.tensor(Tensor::new(info, buffer)?)?;
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        format!(
            "{} rank files (TP {}) from {}",
            self.ranks.len(),
            self.tp,
            self.cfg.path.display()
        )
    }

    fn probe(path: &Path) -> u32 {
        let dir = iter_dir(path).unwrap_or_else(|_| path.to_path_buf());
        Self::first_rank(&dir).is_ok() as u32 * 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_rebuild_tensor_v2(storage data/{key} of `numel` f32, offset, size, stride, ...)`.
    fn rebuild(p: &mut Pickler, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) {
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.mark();
        p.mark();
        p.str("storage");
        p.global("torch", "FloatStorage");
        p.str(key);
        p.str("cpu");
        p.int(numel);
        p.tuple(5);
        p.op(b'Q');
        p.int(offset);
        for t in [size, stride] {
            p.mark();
            for &d in t {
                p.int(d);
            }
            p.op(b't');
        }
        p.bool(false);
        p.global("collections", "OrderedDict");
        p.tuple(0);
        p.op(b'R');
        p.tuple(6);
        p.op(b'R');
    }

    /// A torch.save archive of `pkl` with storage records `payloads` (`data/0`, ...), CRCs set.
    fn archive(pkl: Vec<u8>, payloads: &[Vec<u8>]) -> Vec<u8> {
        let lens: Vec<u64> = payloads.iter().map(|p| p.len() as u64).collect();
        let mut a = Archive::with_payloads("archive", pkl, &lens, "t");
        let mut out = vec![0u8; a.total as usize];
        for (&o, d) in a.payload_offsets().iter().zip(payloads) {
            out[o as usize..o as usize + d.len()].copy_from_slice(d);
        }
        let crcs: Vec<u32> = payloads.iter().map(|d| crc32fast::hash(d)).collect();
        for (o, b) in a.frame_all(&crcs) {
            out[o as usize..o as usize + b.len()].copy_from_slice(&b);
        }
        out
    }

    /// The view of one tensor over storage `data/0` of `record` bytes, or its error.
    fn view(
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
        record: usize,
    ) -> std::result::Result<crate::checkpoint::ItemTensor, String> {
        let mut p = Pickler::new();
        rebuild(&mut p, "0", numel, offset, size, stride);
        let b = archive(p.finish(), &[(0..record).map(|i| i as u8).collect()]);
        let entries = crate::zip::entries(&b)?;
        let v = pickle::load(crate::zip::find(&b, &entries, "data.pkl")?, "t")?;
        let t = tensor_view(&b, &entries, &v, &mut HashMap::new())?;
        // The view lies inside its record.
        let rec = &entries
            .iter()
            .find(|e| e.name.ends_with("data/0"))
            .unwrap()
            .data;
        assert!(rec.start <= t.data.start && t.data.end <= rec.end);
        Ok(t)
    }

    #[test]
    fn a_local_written_in_stretches_gets_the_crc_of_its_bytes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let local = |cuts: &[(u64, u64)]| {
            let parts = cuts
                .iter()
                .map(|&(a, b)| {
                    let mut h = crc32fast::Hasher::new();
                    h.update(&data[a as usize..b as usize]);
                    (a, h)
                })
                .collect();
            Local {
                key: "w".into(),
                runs: vec![(0, data.len() as u64)],
                at: 0,
                len: data.len() as u64,
                crc: None,
                parts: Some(parts),
            }
        };
        // In any order, as blocks come.
        let mut l = local(&[(7000, 10_000), (0, 3), (3, 7000)]);
        assert_eq!(l.combined_crc(), Some(crc32fast::hash(&data)));
        // A gap, or too many stretches: read back from the file instead.
        assert_eq!(local(&[(0, 3), (4, 10_000)]).combined_crc(), None);
        let mut l2 = local(&[(0, 10_000)]);
        l2.parts = None;
        assert_eq!(l2.combined_crc(), None);
    }

    /// Every number of a tensor view is checked against its storage record: a view outside
    /// it, negative numbers, an empty or non-contiguous tensor, sizes whose products overflow,
    /// a record of the wrong length.
    #[test]
    fn tensor_views_must_lie_in_their_storage() {
        let t = view(12, 4, &[2, 4], &[4, 1], 48).unwrap();
        assert_eq!((t.data.len(), t.size.clone()), (32, vec![2, 4]));
        // Size-1 axes may have any stride; a scalar is one element.
        assert!(view(12, 0, &[1, 12], &[99, 1], 48).is_ok());
        assert_eq!(view(12, 11, &[], &[], 48).unwrap().data.len(), 4);
        let err = |numel, offset, size: &[i64], stride: &[i64], record| match view(
            numel, offset, size, stride, record,
        ) {
            Ok(_) => panic!("{size:?} at {offset} read"),
            Err(e) => e,
        };
        let m = i64::MAX;
        for (e, want) in [
            (
                err(12, -1, &[2, 4], &[4, 1], 48),
                "storage offset -1 is negative",
            ),
            (
                err(12, 5, &[2, 4], &[4, 1], 48),
                "lie outside its storage of 12",
            ),
            (err(12, m, &[2, 4], &[4, 1], 48), "lie outside"),
            (err(12, 0, &[0], &[1], 48), "empty (size [0])"),
            (err(12, 0, &[4, 0, 3], &[0, 3, 1], 48), "empty"),
            (err(12, 0, &[-1, 4], &[4, 1], 48), "negative"),
            (err(12, 0, &[2, 4], &[4, -1], 48), "negative"),
            (err(12, 0, &[2, 4], &[1, 2], 48), "non-contiguous"),
            (err(12, 0, &[2, 4], &[4], 48), "stride"),
            (
                err(12, 0, &[1 << 40, 1 << 40], &[1 << 40, 1], 48),
                "overflows",
            ),
            (err(m, 0, &[2, 4], &[4, 1], 48), "expected"),
            (err(-3, 0, &[2, 4], &[4, 1], 48), "storage size"),
            (
                err(12, 0, &[2, 4], &[4, 1], 44),
                "has 44 bytes, 12 elements × 4 expected",
            ),
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    /// Rank file `dir/name` holding `tensors` (key, f32 values), one storage each.
    fn rank_file(dir: &Path, name: &str, tensors: &[(&str, Vec<f32>)]) -> PathBuf {
        let mut p = Pickler::new();
        p.dict_begin();
        p.str("checkpoint_version");
        p.float(3.0);
        p.str("model");
        p.dict_begin();
        for (i, (k, v)) in tensors.iter().enumerate() {
            p.str(k);
            rebuild(
                &mut p,
                &i.to_string(),
                v.len() as i64,
                0,
                &[v.len() as i64],
                &[1],
            );
        }
        p.dict_end();
        p.dict_end();
        let payloads: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, archive(p.finish(), &payloads)).unwrap();
        path
    }

    fn reader(dir: &Path) -> LegacyReader {
        LegacyReader::new(LegacyReaderConfig {
            path: dir.into(),
            rank: None,
            pieces: false,
        })
        .unwrap()
    }

    /// Shards must tile their global tensor: a gap, an overlap or a shard whose place is not
    /// as long as its bytes is named with the files.
    #[test]
    fn shards_must_tile_their_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reader(dir.path());
        for n in ["a.pt", "b.pt"] {
            r.read_rank(rank_file(dir.path(), n, &[("w", vec![1.0; 4])]))
                .unwrap();
        }
        let g = |runs: [Vec<(u64, u64)>; 2]| Global {
            dtype: DType::F32,
            shape: vec![8],
            shards: runs
                .into_iter()
                .enumerate()
                .map(|(i, rs)| (i, (0, "w".to_string()), rs))
                .collect(),
        };
        assert!(r
            .check_tiling("w", &g([vec![(0, 16)], vec![(16, 16)]]))
            .is_ok());
        let e = r
            .check_tiling("w", &g([vec![(0, 16)], vec![(8, 16)]]))
            .unwrap_err();
        assert!(
            e.message.contains("bytes [8, 16) are held by both")
                && e.message.contains("a.pt")
                && e.message.contains("b.pt"),
            "{e}"
        );
        let e = r
            .check_tiling("w", &g([vec![(0, 16)], vec![(20, 12)]]))
            .unwrap_err();
        assert!(e.message.contains("holds 16 bytes"), "{e}");
        let e = r
            .check_tiling("w", &g([vec![(0, 8), (8, 8)], vec![(20, 8), (28, 8)]]))
            .unwrap_err();
        assert!(
            e.message
                .contains("bytes [16, 20) of its 32 are held by no rank file"),
            "{e}"
        );
        let e = r
            .check_tiling("w", &g([vec![(0, 16)], vec![(24, 16)]]))
            .unwrap_err();
        assert!(e.message.contains("held by no rank file"), "{e}");
    }

    /// A state dict holding one key twice (an OrderedDict's pairs as pickled): refused.
    #[test]
    fn a_key_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = rank_file(
            dir.path(),
            "x.pt",
            &[("w", vec![1.0; 4]), ("w", vec![2.0; 4])],
        );
        // A plain dict keeps the last value, as Python does.
        let mut r = reader(dir.path());
        r.read_rank(path.clone()).unwrap();
        assert_eq!(r.ranks[0].tensors.len(), 1);
        // The OrderedDict Megatron-LM saves keeps both pairs: named.
        let mut p = Pickler::new();
        p.dict_begin();
        p.str("checkpoint_version");
        p.float(3.0);
        p.str("model");
        p.global("collections", "OrderedDict");
        p.tuple(0);
        p.op(b'R');
        p.mark();
        for _ in 0..2 {
            p.str("w");
            rebuild(&mut p, "0", 4, 0, &[4], &[1]);
        }
        p.op(b'u');
        p.dict_end();
        std::fs::write(&path, archive(p.finish(), &[vec![0; 16]])).unwrap();
        let e = reader(dir.path()).read_rank(path).unwrap_err();
        assert!(e.message.contains("x.pt: tensor 'w' appears twice"), "{e}");
    }

    /// A rank file whose `checkpoint_version` is not Megatron-LM's 3.0 is refused by name.
    #[test]
    fn other_checkpoint_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut p = Pickler::new();
        p.dict_begin();
        p.str("checkpoint_version");
        p.float(2.0);
        p.str("model");
        p.empty_dict();
        p.dict_end();
        let bytes = Archive::with_payloads("model_optim_rng", p.finish(), &[], "t").bytes();
        std::fs::write(&path, bytes).unwrap();
        let mut r = LegacyReader::new(LegacyReaderConfig {
            path: dir.path().into(),
            rank: None,
            pieces: false,
        })
        .unwrap();
        let e = r.read_rank(path).unwrap_err();
        assert!(
            e.message.contains("unsupported checkpoint_version 2.0"),
            "{}",
            e.message
        );
    }
}

//! Megatron-LM's own checkpoints (`--ckpt-format torch`): one `torch.save` archive per
//! model-parallel rank, `ROOT/iter_XXXXXXX/mp_rank_{tp:02}[_{pp:03}]/model_optim_rng.pt`,
//! holding `{'args': Namespace, 'checkpoint_version': 3.0, 'iteration': N, 'model': state dict}`
//! with each rank's local tensors (TP shards; the stage's layers numbered from 0).
//!
//! Writer: every rank's archive is laid out from the stream plan (each local tensor a storage
//! `data/{i}` at a known offset), filled as global tensors arrive — each rank's share cut by
//! megatron-core's tensor-parallel rules (`bridgeflow_sdk::parallel`) — and framed with its
//! CRC-32s at commit; the root appears under its name only then. Reader: the ranks' archives
//! read in place, every global tensor reassembled from its shards (TP), its stage (PP) placing
//! its layers.

use crate::checkpoint::{is_tensor, tensor_in};
use crate::emit::{tensor_value, Archive, Pickler};
use crate::pickle::{self, Value};
use bridgeflow_sdk::parallel::{pp_layers, tp_local_shape, tp_runs, tp_split, TpSplit};
use bridgeflow_sdk::{
    schemars, serde, Buffer, BufferPool, DType, Emitter, Item, MapView, PluginError, Result, Sink,
    Source, StreamPlan, Tensor, TensorInfo,
};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FILE: &str = "model_optim_rng.pt";

fn one() -> u64 {
    1
}
fn te() -> String {
    "te".into()
}
fn yes() -> bool {
    true
}

/// `mp_rank_{tp:02}`, with pipeline stages `mp_rank_{tp:02}_{pp:03}`, and with expert
/// parallelism `_{ep:03}` after that (Megatron-LM's `get_checkpoint_name`).
fn rank_dir(tp: u64, pp: u64, stages: u64, ep: u64, eps: u64) -> String {
    let mut d = format!("mp_rank_{tp:02}");
    if stages > 1 {
        d.push_str(&format!("_{pp:03}"));
    }
    if eps > 1 {
        d.push_str(&format!("_{ep:03}"));
    }
    d
}

/// Megatron's per-layer expert key (`experts.experts.linear_fcN.weight`, a leading expert axis)
/// and Megatron-LM's keys for local expert `i`: TE's grouped GEMM (`experts.linear_fcN.weight{i}`)
/// or the local spec's SequentialMLP (`experts.local_experts.{i}.linear_fcN.weight`).
const STACKED_EXPERTS: &str = ".mlp.experts.experts.";
const GROUPED_EXPERTS: &str = ".mlp.experts.";
const SEQUENTIAL_EXPERTS: &str = ".mlp.experts.local_experts.";

fn expert_key(stacked_param: &str, i: u64, local_spec: bool) -> String {
    if local_spec {
        let to = format!("mlp.experts.local_experts.{i}.");
        return stacked_param.replacen("mlp.experts.experts.", &to, 1);
    }
    format!(
        "{}{i}",
        stacked_param.replacen("mlp.experts.experts.", "mlp.experts.", 1)
    )
}

/// (module as the grouped key names it, local expert) of a local expert's key in either spec.
fn local_expert(key: &str) -> Option<(String, u64)> {
    if let Some((before, rest)) = key.split_once(SEQUENTIAL_EXPERTS) {
        let (i, linear) = rest.split_once('.')?;
        let linear = linear.strip_suffix(".weight")?;
        return Some((
            format!("{before}{GROUPED_EXPERTS}{linear}"),
            i.parse().ok()?,
        ));
    }
    key.rsplit_once(".weight").and_then(|(m, n)| {
        (m.contains(GROUPED_EXPERTS) && !n.is_empty())
            .then(|| n.parse::<u64>().ok())
            .flatten()
            .map(|n| (m.to_string(), n))
    })
}

/// Local-spec (`--transformer-impl local`) names of the norms TE fuses into its linears.
const LOCAL_NAMES: &[(&str, &str)] = &[
    (
        "self_attention.linear_qkv.layer_norm_weight",
        "input_layernorm.weight",
    ),
    (
        "mlp.linear_fc1.layer_norm_weight",
        "pre_mlp_layernorm.weight",
    ),
    // MLA's norms of the compressed q and kv.
    (
        "self_attention.linear_q_up_proj.layer_norm_weight",
        "self_attention.q_layernorm.weight",
    ),
    (
        "self_attention.linear_kv_up_proj.layer_norm_weight",
        "self_attention.kv_layernorm.weight",
    ),
];

/// The element offset of a block (`offsets`, `shape`) in a row-major tensor of `global` shape,
/// if the block's elements are contiguous there: size 1 on the axes before its first longer
/// one, whole on every axis after it.
fn contiguous_offset(global: &[u64], offsets: &[u64], shape: &[u64]) -> Option<u64> {
    let n = global.len();
    let k = (0..n).find(|&d| shape[d] != 1).unwrap_or(n);
    if !(k + 1..n).all(|d| shape[d] == global[d] && offsets[d] == 0) {
        return None;
    }
    let (mut off, mut stride) = (0u64, 1u64);
    for d in (0..n).rev() {
        off += offsets[d] * stride;
        stride *= global[d];
    }
    Some(off)
}

fn split_layer(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix("decoder.layers.")?;
    let (l, param) = rest.split_once('.')?;
    Some((l.parse().ok()?, param))
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
}

/// A rank's tensor while laying out: local key, global source, local shape, byte runs.
type RankTensor<'a> = (usize, String, &'a TensorInfo, Vec<u64>, Vec<(u64, u64)>);

/// One local tensor of a rank: its key, where its bytes come from and go.
struct Local {
    key: String,
    /// The byte runs of its global tensor it is cut from, in order.
    runs: Vec<(u64, u64)>,
    at: u64,
    len: u64,
    crc: Option<u32>,
}

struct RankFile {
    path: PathBuf,
    file: File,
    archive: Archive,
    locals: Vec<Local>,
}

pub struct LegacyWriter {
    cfg: LegacyWriterConfig,
    staging: Option<PathBuf>,
    ranks: Vec<RankFile>,
    /// Global tensor name → (rank, local index) it feeds.
    uses: HashMap<String, Vec<(usize, usize)>>,
    /// Bytes of each global tensor not arrived yet.
    remaining: HashMap<String, u64>,
    committed: bool,
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
            .attrs()
            .get("megatron_model")
            .cloned()
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
        let experts = whole.iter().find(|t| t.name().contains(STACKED_EXPERTS));
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
        if let Some(t) = tensors
            .iter()
            .find(|t| t.name().starts_with("decoder.layers.") && split_layer(t.name()).is_none())
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
        if let Some(t) = tensors.iter().find(|t| {
            let n = t.name();
            let known = n.starts_with("decoder.layers.")
                || n.starts_with("embedding.")
                || n.starts_with("output_layer.")
                || n.starts_with("decoder.final_layernorm.");
            !known || n.contains(".mixer.")
        }) {
            return Err(PluginError::unsupported(format!(
                "'{}': the Megatron-LM writer places GPT decoders (dense, MoE, MLA) only; write this model as torch_dist",
                t.name()
            )));
        }
        bridgeflow_sdk::parallel::check_tp(plan.attrs().get("megatron_model"), self.cfg.tp.max(1))?;
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
            .find(|t| t.name().contains(STACKED_EXPERTS) && t.shape[0] % ep != 0)
        {
            return Err(PluginError::config(format!(
                "'{}': {} experts do not divide over {ep} expert-parallel ranks",
                t.name(),
                t.shape[0]
            )));
        }
        let layers = tensors
            .iter()
            .filter_map(|t| split_layer(t.name()))
            .map(|(l, _)| l + 1)
            .max()
            .unwrap_or(0);
        let (pp, vpp) = (self.cfg.pp.max(1), self.cfg.vpp.max(1));
        if vpp > 1
            && (self.cfg.num_layers_in_first_pipeline_stage.is_some()
                || self.cfg.num_layers_in_last_pipeline_stage.is_some())
        {
            return Err(PluginError::config(
                "uneven first/last stages with virtual pipeline chunks are not supported",
            ));
        }
        // One block of layers per (virtual) chunk, in model order.
        let chunks = pp_layers(
            layers,
            pp * vpp,
            self.cfg.num_layers_in_first_pipeline_stage,
            self.cfg.num_layers_in_last_pipeline_stage,
        )?;
        let gated = plan
            .attrs()
            .get("megatron_model")
            .and_then(|m| m.get("gated_linear_unit"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let vocab = tensors
            .iter()
            .find(|t| t.name() == "embedding.word_embeddings.weight")
            .map_or(0, |t| t.shape[0]);
        let tied = !tensors.iter().any(|t| t.name() == "output_layer.weight");
        let last = (pp * vpp - 1) as usize;
        let staging = bridgeflow_sdk::fsutil::hidden_sibling(&self.cfg.path, "partial");
        let iter_dir = staging.join(format!("iter_{:07}", self.cfg.iteration));
        self.staging = Some(staging.clone());
        for s in 0..pp {
            for k in 0..ep {
                for r in 0..self.cfg.tp.max(1) {
                    // This rank's tensors: (model chunk, local key, global source, local shape, runs).
                    let mut locals: Vec<RankTensor> = Vec::new();
                    for v in 0..vpp as usize {
                        let c = v * pp as usize + s as usize;
                        let (first_layer, count) = chunks[c];
                        for t in &tensors {
                            let key = match split_layer(t.name()) {
                                Some((l, param)) if l >= first_layer && l < first_layer + count => {
                                    let param = match self.cfg.spec.as_str() {
                                        "local" => LOCAL_NAMES
                                            .iter()
                                            .find(|(te, _)| *te == param)
                                            .map_or(param, |(_, local)| local),
                                        _ => param,
                                    };
                                    format!("decoder.layers.{}.{param}", l - first_layer)
                                }
                                Some(_) => continue,
                                None => {
                                    let name = t.name();
                                    let here = match name {
                                        "embedding.word_embeddings.weight" => {
                                            c == 0 || (tied && c == last)
                                        }
                                        _ if name.starts_with("embedding.") => c == 0,
                                        _ => c == last,
                                    };
                                    if !here {
                                        continue;
                                    }
                                    name.to_string()
                                }
                            };
                            let split = tp_split(t.name(), gated);
                            let es = t.dtype.size() as u64;
                            if t.name().contains(STACKED_EXPERTS) {
                                // This EP rank's experts, each cut for its expert-TP rank.
                                let per = t.shape[0] / ep;
                                let one = &t.shape[1..];
                                let bytes = one.iter().product::<u64>() * es;
                                let etp_rank = if etp == 1 { 0 } else { r };
                                for i in 0..per {
                                    let g = k * per + i;
                                    let runs = tp_runs(one, es, split, etp, etp_rank)
                                        .map_err(|e| e.context(t.name()))?
                                        .into_iter()
                                        .map(|(o, n)| (g * bytes + o, n))
                                        .collect();
                                    let shape = tp_local_shape(one, split, etp);
                                    let key = expert_key(&key, i, self.cfg.spec == "local");
                                    locals.push((v, key, t, shape, runs));
                                }
                                continue;
                            }
                            let runs = tp_runs(&t.shape, es, split, self.cfg.tp.max(1), r)
                                .map_err(|e| e.context(t.name()))?;
                            let shape = tp_local_shape(&t.shape, split, self.cfg.tp.max(1));
                            locals.push((v, key, t, shape, runs));
                        }
                    }
                    let dir = iter_dir.join(rank_dir(r, s, self.cfg.pp, k, ep));
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| PluginError::io(&dir, "cannot create", e))?;
                    let path = dir.join(FILE);
                    // The state dict: every local tensor a storage of its own, in order; with TE,
                    // an `_extra_state` (None) after each linear's weight.
                    let mut p = Pickler::new();
                    p.dict_begin();
                    p.str("args");
                    self.args_pickle(&mut p, plan, layers, vocab, gated);
                    p.str("checkpoint_version");
                    p.float(3.0);
                    p.str("iteration");
                    p.int(self.cfg.iteration as i64);
                    for v in 0..vpp as usize {
                        p.str(&if vpp > 1 {
                            format!("model{v}")
                        } else {
                            "model".into()
                        });
                        p.global("collections", "OrderedDict");
                        p.tuple(0);
                        p.op(b'R');
                        p.memo_after();
                        p.mark();
                        for (i, (_, key, t, shape, _)) in
                            locals.iter().enumerate().filter(|(_, l)| l.0 == v)
                        {
                            p.str(key);
                            tensor_value(&mut p, t.dtype, shape, i);
                            // A grouped-GEMM expert weight (`…weight{i}`) shares one module: its
                            // extra state goes with local expert 0.
                            let module = key.strip_suffix(".weight").or_else(|| {
                                key.strip_suffix(".weight0")
                                    .filter(|_| key.contains(GROUPED_EXPERTS))
                            });
                            let linear = module.filter(|m| {
                                m.starts_with("decoder.layers.")
                                    && m.rsplit('.')
                                        .next()
                                        .is_some_and(|x| x.starts_with("linear_"))
                            });
                            if let (Some(m), "te") = (linear, self.cfg.spec.as_str()) {
                                p.str(&format!("{m}._extra_state"));
                                p.none();
                            }
                        }
                        p.op(b'u');
                    }
                    p.dict_end();
                    let lens: Vec<u64> = locals
                        .iter()
                        .map(|(_, _, t, shape, _)| {
                            shape.iter().product::<u64>() * t.dtype.size() as u64
                        })
                        .collect();
                    let archive = Archive::with_payloads(
                        "model_optim_rng",
                        p.finish(),
                        &lens,
                        &format!(
                            "{}/{}",
                            rank_dir(r, s, self.cfg.pp, k, ep),
                            self.cfg.iteration
                        ),
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
                    for (i, ((_, key, t, _, runs), (&at, &len))) in locals
                        .into_iter()
                        .zip(offsets.iter().zip(&lens))
                        .enumerate()
                    {
                        self.uses
                            .entry(t.name().to_string())
                            .or_default()
                            .push((rank, i));
                        ls.push(Local {
                            key,
                            runs,
                            at,
                            len,
                            crc: None,
                        });
                    }
                    self.ranks.push(RankFile {
                        path,
                        file: f,
                        archive,
                        locals: ls,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Sink for LegacyWriter {
    type Config = LegacyWriterConfig;
    const DESCRIPTION: &'static str =
        "Writes Megatron-LM checkpoints (mp_rank_XX[_YYY]/model_optim_rng.pt) split over TP ranks and PP stages, atomically";

    fn new(cfg: LegacyWriterConfig) -> Result<Self> {
        if cfg.spec != "te" && cfg.spec != "local" {
            return Err(PluginError::config(format!(
                "spec '{}': expected te or local",
                cfg.spec
            )));
        }
        Ok(LegacyWriter {
            cfg,
            staging: None,
            ranks: Vec::new(),
            uses: HashMap::new(),
            remaining: HashMap::new(),
            committed: false,
        })
    }

    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
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
        // Where this block lies in its tensor: the whole, or a contiguous block of it.
        let start = match t.info.shard() {
            None => 0,
            Some(s) => {
                contiguous_offset(&s.global_shape, &s.offsets, &t.info.shape).ok_or_else(|| {
                    PluginError::shape(format!(
                        "piece '{}' is not a contiguous block of '{base}'",
                        t.name()
                    ))
                })? * t.info.dtype.size() as u64
            }
        };
        let end = start + bytes.len() as u64;
        *left = left
            .checked_sub(bytes.len() as u64)
            .ok_or_else(|| PluginError::shape(format!("'{base}' got more bytes than it has")))?;
        let whole = t.info.shard().is_none();
        for (rank, i) in uses {
            let RankFile {
                file, path, locals, ..
            } = &mut self.ranks[rank];
            let local = &mut locals[i];
            let write = |b: &[u8], at: u64| {
                file.write_all_at(b, at)
                    .map_err(|e| PluginError::io(&*path, &format!("writing '{}' to", local.key), e))
            };
            if !whole {
                // Each of the rank's runs that this block overlaps, to its place; the CRC is
                // taken from the file at commit.
                let mut pos = local.at;
                for &(off, len) in &local.runs {
                    let (lo, hi) = (off.max(start), (off + len).min(end));
                    if lo < hi {
                        write(
                            &bytes[(lo - start) as usize..(hi - start) as usize],
                            pos + lo - off,
                        )?;
                    }
                    pos += len;
                }
                continue;
            }
            // The whole tensor: the rank's share in order, CRC as it goes, in windows whose
            // pages are let go once written (a 2 GB embedding is never resident whole); a
            // row-parallel weight's columns are a run per row, gathered before writing.
            const WINDOW: u64 = 8 << 20;
            let mut crc = crc32fast::Hasher::new();
            let mut at = local.at;
            let mut buf = Vec::new();
            for &(off, len) in &local.runs {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(WINDOW);
                    let a = (off + done) as usize;
                    let run = &bytes[a..a + n as usize];
                    crc.update(run);
                    if local.runs.len() == 1 {
                        write(run, at)?;
                        at += n;
                    } else {
                        buf.extend_from_slice(run);
                        if buf.len() as u64 >= WINDOW {
                            write(&buf, at)?;
                            at += buf.len() as u64;
                            buf.clear();
                        }
                    }
                    if n == WINDOW || local.runs.len() == 1 {
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
            // Tensors that came in blocks: their CRC from what is on disk.
            for l in rf.locals.iter_mut().filter(|l| l.crc.is_none()) {
                let mut crc = crc32fast::Hasher::new();
                let mut buf = vec![0u8; (8 << 20).min(l.len as usize)];
                let mut done = 0;
                while done < l.len {
                    let n = (l.len - done).min(buf.len() as u64) as usize;
                    rf.file
                        .read_exact_at(&mut buf[..n], l.at + done)
                        .map_err(|e| PluginError::io(&rf.path, "cannot read back", e))?;
                    crc.update(&buf[..n]);
                    done += n as u64;
                }
                l.crc = Some(crc.finalize());
            }
            let crcs: Vec<u32> = rf.locals.iter().map(|l| l.crc.unwrap_or(0)).collect();
            for (off, b) in rf.archive.frame_all(&crcs) {
                rf.file
                    .write_all_at(&b, off)
                    .map_err(|e| PluginError::io(&rf.path, "cannot write", e))?;
            }
            if self.cfg.fsync {
                rf.file
                    .sync_all()
                    .map_err(|e| PluginError::io(&rf.path, "cannot sync", e))?;
            }
        }
        let staging = self.staging.clone().expect("opened");
        let latest = staging.join("latest_checkpointed_iteration.txt");
        std::fs::write(&latest, self.cfg.iteration.to_string())
            .map_err(|e| PluginError::io(&latest, "cannot write", e))?;
        let n = self.ranks.len();
        let tensors: usize = self.ranks.iter().map(|r| r.locals.len()).sum();
        self.ranks.clear();
        bridgeflow_sdk::fsutil::commit(&staging, &self.cfg.path)?;
        self.staging = None;
        self.committed = true;
        Ok(format!(
            "wrote {n} rank files (TP {} x PP {}), {tensors} local tensors, to {}",
            self.cfg.tp,
            self.cfg.pp,
            self.cfg.path.display()
        ))
    }

    fn abort(&mut self) {
        self.ranks.clear();
        if !self.committed {
            if let Some(s) = self.staging.take() {
                let _ = std::fs::remove_dir_all(s);
            }
        }
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

/// The block (offsets, shape) of a row-major tensor of `shape` that elements
/// [`start`, `start` + `len`) are, if they form one: whole trailing axes, a run on one axis,
/// single indices before it.
fn block_of(shape: &[u64], start: u64, len: u64) -> Option<(Vec<u64>, Vec<u64>)> {
    let n = shape.len();
    let (mut k, mut inner) = (n, 1u64);
    while k > 0
        && len.is_multiple_of(inner * shape[k - 1])
        && start.is_multiple_of(inner * shape[k - 1])
    {
        inner *= shape[k - 1];
        k -= 1;
    }
    if k == 0 {
        return (start == 0).then(|| (vec![0; n], shape.to_vec()));
    }
    if !len.is_multiple_of(inner) || !start.is_multiple_of(inner) {
        return None;
    }
    let (count, mut idx) = (len / inner, start / inner);
    let mut offsets = vec![0u64; n];
    for d in (0..k).rev() {
        offsets[d] = idx % shape[d];
        idx /= shape[d];
    }
    if offsets[k - 1] + count > shape[k - 1] {
        return None;
    }
    let mut block = vec![1u64; n];
    block[k - 1] = count;
    block[k..].copy_from_slice(&shape[k..]);
    Some((offsets, block))
}

/// One rank's archive, mapped, with its state dicts' tensors by (model chunk, local key).
struct RankData {
    path: PathBuf,
    map: Arc<Mmap>,
    chunks: usize,
    tensors: BTreeMap<(usize, String), crate::checkpoint::ItemTensor>,
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
        let f = File::open(&path).map_err(|e| PluginError::io(&path, "cannot open", e))?;
        // SAFETY: read-only map of a checkpoint file.
        let map = Arc::new(
            unsafe { Mmap::map(&f) }.map_err(|e| PluginError::io(&path, "cannot map", e))?,
        );
        let bad = |e: String| PluginError::format(format!("{}: {e}", path.display()));
        let entries = crate::zip::entries(&map).map_err(bad)?;
        let pkl = crate::zip::find(&map, &entries, "data.pkl").map_err(bad)?;
        let root = pickle::load(pkl, &path.display().to_string()).map_err(bad)?;
        let top = root
            .dict_entries()
            .ok_or_else(|| bad("the pickle is not a dict".into()))?;
        let get = |k: &str| {
            top.iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v.clone())
        };
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
        let models: Vec<Vec<(Value, Value)>> = match get("model") {
            Some(m) => vec![pairs(m).ok_or_else(|| bad("'model' is not a state dict".into()))?],
            None => (0..)
                .map_while(|v| get(&format!("model{v}")))
                .map(|m| pairs(m).ok_or_else(|| bad("a model chunk is not a state dict".into())))
                .collect::<Result<_>>()?,
        };
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
        for (c, model) in models.into_iter().enumerate() {
            for (k, v) in model {
                let Some(key) = k.as_str() else { continue };
                if key.contains("_extra_state") || !is_tensor(&v) {
                    continue;
                }
                let t = tensor_in(&map, &entries, &v, &mut |_| {})
                    .map_err(|e| bad(format!("tensor '{key}': {e}")))?;
                tensors.insert((c, key.to_string()), t);
            }
        }
        self.ranks.push(RankData {
            path,
            map,
            chunks,
            tensors,
        });
        Ok(args)
    }
}

/// A stored block of a global tensor: its first element, offsets and shape.
type Block = (u64, Vec<u64>, Vec<u64>);

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

impl Source for LegacyReader {
    type Config = LegacyReaderConfig;
    const DESCRIPTION: &'static str =
        "Reads Megatron-LM checkpoints (mp_rank_XX[_YYY]/model_optim_rng.pt): global tensors from every TP rank and PP stage";

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
            self.args = self.read_rank(dir.join(&rank).join(FILE))?;
            let r = &self.ranks[0];
            for ((c, key), t) in &r.tensors {
                // With virtual pipeline chunks, each chunk's keys under `model<v>.`.
                let name = if r.chunks > 1 {
                    format!("model{c}.{key}")
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
            plan.set_attr("megatron_args", serde_json::json!(self.args));
            return Ok(plan);
        }
        let first = ["mp_rank_00", "mp_rank_00_000"]
            .iter()
            .map(|d| dir.join(d).join(FILE))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                PluginError::format(format!(
                    "{}: no mp_rank_00[_000]/{FILE}: not a Megatron-LM checkpoint",
                    dir.display()
                ))
            })?;
        self.args = self.read_rank(first)?;
        let vpp = self.ranks.first().map_or(1, |r| r.chunks) as u64;
        self.ranks.clear();
        let tp = self
            .arg_u64("tensor_model_parallel_size")
            .unwrap_or(1)
            .max(1);
        let pp = self
            .arg_u64("pipeline_model_parallel_size")
            .unwrap_or(1)
            .max(1);
        let layers = self.arg_u64("num_layers").ok_or_else(|| {
            PluginError::format(format!("{}: args has no num_layers", dir.display()))
        })?;
        let gated = self
            .args
            .get("swiglu")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        // One block of layers per (virtual) chunk, in model order: chunk v of stage p is the
        // (v·pp + p)-th.
        let chunks = pp_layers(
            layers,
            pp * vpp,
            self.arg_u64("num_layers_in_first_pipeline_stage"),
            self.arg_u64("num_layers_in_last_pipeline_stage"),
        )?;
        self.ranks.clear();
        self.tp = tp;
        let ep = self
            .arg_u64("expert_model_parallel_size")
            .unwrap_or(1)
            .max(1);
        let etp = self
            .arg_u64("expert_tensor_parallel_size")
            .unwrap_or(tp)
            .max(1);
        let experts = self.arg_u64("num_experts");
        // Every rank of the grid, each read once; a missing one is named.
        let mut index = BTreeMap::new();
        for s in 0..pp {
            for k in 0..ep {
                for r in 0..tp {
                    let p = dir.join(rank_dir(r, s, pp, k, ep)).join(FILE);
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
        // Global names: stage layers renumbered, local-spec norms renamed to the TE names,
        // local experts numbered globally; each global tensor from its shards' byte runs.
        let mut globals: BTreeMap<String, Global> = BTreeMap::new();
        for ((r, s, k), &i) in &index {
            let (r, s, k) = (*r, *s, *k);
            let keys: Vec<(usize, String)> = self.ranks[i].tensors.keys().cloned().collect();
            let has = |v: usize, l: u64, p: &str| {
                keys.iter()
                    .any(|(c, key)| *c == v && key == &format!("decoder.layers.{l}.{p}"))
            };
            for (v, key) in keys.clone() {
                let first_layer = chunks[v * pp as usize + s as usize].0;
                let t = &self.ranks[i].tensors[&(v, key.clone())];
                let es = t.dtype.size() as u64;
                // A local expert: `…mlp.experts.linear_fcN.weight{i}` (TE grouped GEMM) or
                // `…mlp.experts.local_experts.{i}.linear_fcN.weight` (local spec).
                let expert = local_expert(&key);
                let (name, shape, runs) = if let Some((module, local)) = expert {
                    let (l, param) = split_layer(&module).ok_or_else(|| {
                        PluginError::format(format!("'{key}': an expert outside the decoder"))
                    })?;
                    let param = param.replacen("mlp.experts.", "mlp.experts.experts.", 1);
                    let name = format!("decoder.layers.{}.{param}.weight", l + first_layer);
                    if etp == 1 && r > 0 {
                        continue; // the same experts on every TP rank
                    }
                    let e = experts.ok_or_else(|| {
                        PluginError::format(format!(
                            "'{key}': experts, but args has no num_experts"
                        ))
                    })?;
                    let per = e / ep;
                    let split = tp_split(&name, gated);
                    let mut one = t.size.clone();
                    match split {
                        TpSplit::Axis(a) => one[a] *= etp,
                        TpSplit::GatedRows => one[0] *= etp,
                        TpSplit::Replicated => {}
                    }
                    let bytes = one.iter().product::<u64>() * es;
                    let g = k * per + local;
                    let runs: Vec<(u64, u64)> =
                        tp_runs(&one, es, split, etp, if etp == 1 { 0 } else { r })?
                            .into_iter()
                            .map(|(o, n)| (g * bytes + o, n))
                            .collect();
                    let shape: Vec<u64> = std::iter::once(e).chain(one).collect();
                    (name, shape, runs)
                } else {
                    if k > 0 {
                        continue; // dense tensors repeat on every expert-parallel rank
                    }
                    let name = match split_layer(&key) {
                        Some((l, param)) => {
                            let te = LOCAL_NAMES.iter().find(|(te, local)| {
                                *local == param
                                    && has(v, l, &te.replace("layer_norm_weight", "weight"))
                            });
                            let param = te.map_or(param, |(te, _)| te);
                            format!("decoder.layers.{}.{param}", l + first_layer)
                        }
                        None => key.clone(),
                    };
                    let split = tp_split(&name, gated);
                    if split == TpSplit::Replicated && r > 0 {
                        continue;
                    }
                    let mut shape = t.size.clone();
                    match split {
                        TpSplit::Replicated => {}
                        TpSplit::Axis(a) => shape[a] *= tp,
                        TpSplit::GatedRows => shape[0] *= tp,
                    }
                    let runs = tp_runs(&shape, es, split, tp, r)?;
                    (name, shape, runs)
                };
                // An embedding kept on two stages (tied): the first copy.
                if split_layer(&name).is_none()
                    && globals
                        .get(&name)
                        .is_some_and(|g| g.shards.iter().any(|sh| sh.2 == runs))
                {
                    continue;
                }
                let g = globals.entry(name.clone()).or_insert_with(|| Global {
                    dtype: t.dtype,
                    shape: shape.clone(),
                    shards: Vec::new(),
                });
                if g.shape != shape || g.dtype != t.dtype {
                    return Err(PluginError::shape(format!(
                        "{}: '{key}' is {} {:?}, making '{name}' {:?}; another rank makes it {} {:?}: inconsistent shapes across ranks",
                        self.ranks[i].path.display(),
                        t.dtype,
                        t.size,
                        shape,
                        g.dtype,
                        g.shape
                    )));
                }
                g.shards.push((i, (v, key), runs));
            }
        }
        for (name, g) in &globals {
            let covered: u64 = g.shards.iter().flat_map(|s| &s.2).map(|r| r.1).sum();
            let total = g.shape.iter().product::<u64>() * g.dtype.size() as u64;
            if covered != total {
                return Err(PluginError::format(format!(
                    "'{name}': the ranks hold {covered} of its {total} bytes"
                )));
            }
        }
        let mut infos = Vec::new();
        for (n, g) in &globals {
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
        self.globals = globals;
        let mut plan = StreamPlan::new(infos);
        plan.set_attr("format", "megatron-lm".into());
        plan.set_attr("megatron_args", serde_json::json!(self.args));
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let globals = std::mem::take(&mut self.globals);
        for (name, g) in globals {
            if let Some(blocks) = self.blocks(&g).filter(|b| self.cfg.pieces && b.len() > 1) {
                // Each stored block as it lies in the map.
                for ((start, offsets, shape), (i, key, _)) in blocks.into_iter().zip(&g.shards) {
                    let r = &self.ranks[*i];
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
                    Buffer::from_owner(MapView {
                        map: r.map.clone(),
                        range: r.tensors[key].data.clone(),
                    })
                }
                shards => {
                    let mut buf = self.pool.take(total as usize);
                    for (i, key, runs) in shards {
                        let r = &self.ranks[*i];
                        let src = &r.map[r.tensors[key].data.clone()];
                        let mut from = 0usize;
                        for &(off, len) in runs {
                            let (off, len) = (off as usize, len as usize);
                            buf.as_mut_slice()[off..off + len]
                                .copy_from_slice(&src[from..from + len]);
                            from += len;
                        }
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
        (dir.join("mp_rank_00").join(FILE).is_file()
            || dir.join("mp_rank_00_000").join(FILE).is_file()) as u32
            * 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_runs() {
        // Expert 2's rows 4..8 of [4, 8, 3]; the whole; a part that is no block.
        assert_eq!(
            block_of(&[4, 8, 3], 2 * 24 + 12, 12),
            Some((vec![2, 4, 0], vec![1, 4, 3]))
        );
        assert_eq!(
            block_of(&[4, 8, 3], 24, 48),
            Some((vec![1, 0, 0], vec![2, 8, 3]))
        );
        assert_eq!(
            block_of(&[4, 8, 3], 0, 96),
            Some((vec![0, 0, 0], vec![4, 8, 3]))
        );
        assert_eq!(block_of(&[4, 8, 3], 1, 3), None);
        assert_eq!(block_of(&[4, 8, 3], 21, 6), None);
    }

    #[test]
    fn contiguous_blocks() {
        // One expert's gate rows in [experts, 2·ffn, hidden]: contiguous.
        assert_eq!(
            contiguous_offset(&[4, 8, 3], &[2, 4, 0], &[1, 4, 3]),
            Some(2 * 24 + 4 * 3)
        );
        // Two experts, half their rows each: not.
        assert_eq!(contiguous_offset(&[4, 8, 3], &[0, 0, 0], &[2, 4, 3]), None);
        // Columns of a matrix: not.
        assert_eq!(contiguous_offset(&[8, 6], &[0, 3], &[8, 3]), None);
        assert_eq!(contiguous_offset(&[8, 6], &[2, 0], &[3, 6]), Some(12));
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

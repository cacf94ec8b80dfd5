//! A table-driven mapper: any family's table of [`Entry`] rows converts in both directions.
//!
//! Every fused kind is described by [`row_segments`] — which rows of the Megatron tensor come
//! from which rows of which HF part — so both directions move blocks of rows as views of their
//! input: HF → Megatron emits each HF tensor's runs of rows as pieces of the per-layer Megatron
//! tensor (the torch_dist writer stacks layers and places pieces as chunks); Megatron → HF
//! emits each run of a Megatron tensor, or of a stored block of it, as rows of an HF tensor
//! (the safetensors writer places them). With `zero_copy = false` whole tensors are assembled
//! instead, for consumers that need them (verify, the logits check).

use crate::expect;
use crate::families::{self, Family};
use bridgeflow_megatron::mapping::{
    expert_block, expert_block_dims, fill, fused_rows, match_name, row_segments, split_qkv, Entry,
    Heads, Index, Kind, Layers, MambaDims, RowSegment,
};
use bridgeflow_sdk::{
    schemars, serde, Buffer, Emitter, Item, PluginError, Result, StreamPlan, Tensor, TensorInfo,
    Transform,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

fn d128() -> u64 {
    bridgeflow_megatron::vocab::DEFAULT_DIVISIBLE_BY
}
fn one() -> u64 {
    1
}
fn yes() -> bool {
    true
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct MapperConfig {
    /// `to-megatron` (HF names and layouts in, Megatron out) or `to-hf`.
    pub direction: String,
    /// The HF `config.json` (default: `config.json` in the input's `source_dir`; on export,
    /// rebuilt from the checkpoint's `run_config.yaml`).
    #[serde(default)]
    pub hf_config: Option<PathBuf>,
    /// Vocabulary padding on import: rows rounded up to a multiple of this × tensor_parallel.
    #[serde(default = "d128")]
    pub make_vocab_size_divisible_by: u64,
    #[serde(default = "one")]
    pub tensor_parallel: u64,
    /// Move rows as views, each piece with its place in the target tensor (default true);
    /// off: whole tensors, for consumers that need them (verify, the logits check).
    #[serde(default = "yes")]
    pub zero_copy: bool,
    /// Model tables in TOML (see plugins/models/README.md), consulted before the built-in
    /// families: a new architecture without compiling anything.
    #[serde(default)]
    pub model_tables: Vec<PathBuf>,
    /// HF tensor names (`*`, `?` wildcards) the model may lack although its table and config
    /// call for them; without, a missing tensor fails the run before anything is written.
    #[serde(default)]
    pub allow_missing: Vec<String>,
    /// HF tensor names to drop although no row places them (or, beside tied embeddings, an
    /// `lm_head`); without, an unexpected tensor fails the run.
    #[serde(default)]
    pub allow_unexpected: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub hidden: u64,
    /// The dense MLP's width (`intermediate_size`) and an expert's (`moe_intermediate_size`).
    pub ffn: Option<u64>,
    pub moe_ffn: Option<u64>,
    pub layers: u64,
    pub heads: Heads,
    pub vocab: u64,
    pub tied: bool,
    /// Routed experts per MoE layer.
    pub experts: Option<u64>,
    /// Which layers are MoE.
    pub moe: Vec<bool>,
    /// A hybrid model's kind of each layer (Mamba, attention, MLP, MoE).
    pub hybrid: Option<Vec<Layers>>,
    /// A hybrid model's Mamba-2 mixer widths.
    pub mamba: Option<MambaDims>,
    /// Multi-token-prediction layers (HF's layers `layers..layers + mtp`).
    pub mtp: u64,
}

/// Sane maxima for config numbers (the largest released models are far below each): a hostile
/// config must fail with its key named, not size an allocation.
const MAX_LAYERS: u64 = 1 << 16;
const MAX_WIDTH: u64 = 1 << 24;
const MAX_HEADS: u64 = 1 << 16;
const MAX_EXPERTS: u64 = 1 << 16;
const MAX_VOCAB: u64 = 1 << 32;

/// The layer kinds of a hybrid config: `layers_block_type` (transformers 5) or
/// `hybrid_override_pattern` (`M` Mamba, `*` attention, `-` MLP, `E` MoE).
fn hybrid_layers(c: &serde_json::Value, path: &Path) -> Result<Option<Vec<Layers>>> {
    let kind = |k: &str| match k {
        "mamba" | "M" => Ok(Layers::Mamba),
        "attention" | "*" => Ok(Layers::Attention),
        "mlp" | "-" => Ok(Layers::Mlp),
        "moe" | "E" => Ok(Layers::Moe),
        other => Err(PluginError::format(format!(
            "{}: layer kind '{other}' is none of mamba (M), attention (*), mlp (-), moe (E)",
            path.display()
        ))),
    };
    if let Some(list) = c["layers_block_type"].as_array() {
        return list
            .iter()
            .map(|v| kind(v.as_str().unwrap_or("?")))
            .collect::<Result<Vec<_>>>()
            .map(Some);
    }
    match c["hybrid_override_pattern"].as_str() {
        Some(p) => p
            .chars()
            .map(|ch| kind(&ch.to_string()))
            .collect::<Result<Vec<_>>>()
            .map(Some),
        None => Ok(None),
    }
}

impl ModelConfig {
    pub fn layer_kind(&self, layer: Option<u64>) -> Layers {
        if let (Some(kinds), Some(l)) = (&self.hybrid, layer) {
            return kinds.get(l as usize).copied().unwrap_or(Layers::All);
        }
        match layer {
            Some(l) if self.moe.get(l as usize).copied().unwrap_or(false) => Layers::Moe,
            Some(_) => Layers::Dense,
            None => Layers::All,
        }
    }
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
    serde_json::from_str(&text)
        .map_err(|e| PluginError::format(format!("{}: invalid JSON: {e}", path.display())))
}

pub fn model_config(path: &Path) -> Result<ModelConfig> {
    model_config_from(&crate::megatron_config::text_view(&read_json(path)?), path)
}

/// The geometry of an HF config (`path` only names it in messages).
pub fn model_config_from(c: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
    let arch = c["architectures"][0].as_str().unwrap_or("").to_string();
    // Every number is checked against its range before anything is sized by it.
    let get = |k: &str| c[k].as_u64();
    let need = |k: &str| {
        get(k).ok_or_else(|| PluginError::format(format!("{}: no '{k}'", path.display())))
    };
    let within = |k: &str, v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(PluginError::config(format!(
                "{}: '{k}' is {v}; expected {lo} to {hi}",
                path.display()
            )))
        }
    };
    let bounded = |k: &str, lo: u64, hi: u64| need(k).and_then(|v| within(k, v, lo, hi));
    let maybe = |k: &str, lo: u64, hi: u64| get(k).map(|v| within(k, v, lo, hi)).transpose();
    let hidden = bounded("hidden_size", 1, MAX_WIDTH)?;
    let heads = bounded("num_attention_heads", 1, MAX_HEADS)?;
    let layers = bounded("num_hidden_layers", 1, MAX_LAYERS)?;
    let experts = match get("num_local_experts")
        .map(|v| ("num_local_experts", v))
        .or_else(|| get("num_experts").map(|v| ("num_experts", v)))
        .or_else(|| get("n_routed_experts").map(|v| ("n_routed_experts", v)))
    {
        Some((k, v)) => Some(within(k, v, 0, MAX_EXPERTS)?).filter(|&e| e > 0),
        None => None,
    };
    let groups = maybe("num_key_value_heads", 1, heads)?.unwrap_or(heads);
    if heads % groups != 0 {
        return Err(PluginError::config(format!(
            "{}: {heads} attention heads do not divide into {groups} key/value heads",
            path.display()
        )));
    }
    let head_dim = match maybe("head_dim", 1, MAX_WIDTH)? {
        Some(d) => d,
        None => within(
            "hidden_size / num_attention_heads",
            hidden / heads,
            1,
            MAX_WIDTH,
        )?,
    };
    // MoE layers: all but the first `first_k_dense_replace`, every `decoder_sparse_step`-th,
    // none of `mlp_only_layers`.
    let dense_first = get("first_k_dense_replace").unwrap_or(0);
    let step = get("decoder_sparse_step").unwrap_or(1).max(1);
    let mlp_only: Vec<u64> = c["mlp_only_layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    let mtp = maybe("num_nextn_predict_layers", 0, MAX_LAYERS)?.unwrap_or(0);
    let moe = (0..layers + mtp)
        .map(|l| {
            experts.is_some() && l >= dense_first && (l + 1) % step == 0 && !mlp_only.contains(&l)
        })
        .collect();
    let hybrid = hybrid_layers(c, path)?;
    if let Some(h) = hybrid.as_ref().filter(|h| h.len() as u64 != layers) {
        return Err(PluginError::format(format!(
            "{}: {} layer kinds for {layers} layers",
            path.display(),
            h.len()
        )));
    }
    let moe = match &hybrid {
        Some(h) => h.iter().map(|k| *k == Layers::Moe).collect(),
        None => moe,
    };
    let mamba = match (
        maybe("mamba_num_heads", 1, MAX_HEADS)?,
        maybe("mamba_head_dim", 1, MAX_WIDTH)?,
    ) {
        (Some(h), Some(d)) => Some(MambaDims {
            inner: within("mamba_num_heads * mamba_head_dim", h * d, 1, MAX_WIDTH)?,
            bc: within(
                "n_groups * ssm_state_size",
                maybe("n_groups", 1, MAX_HEADS)?.unwrap_or(1)
                    * bounded("ssm_state_size", 1, MAX_WIDTH)?,
                1,
                MAX_WIDTH,
            )?,
            heads: h,
        }),
        _ => None,
    };
    Ok(ModelConfig {
        architecture: arch,
        hidden,
        ffn: maybe("intermediate_size", 1, MAX_WIDTH)?,
        moe_ffn: maybe("moe_intermediate_size", 1, MAX_WIDTH)?,
        layers,
        hybrid,
        mamba,
        mtp,
        heads: Heads {
            heads,
            groups,
            head_dim,
        },
        vocab: bounded("vocab_size", 1, MAX_VOCAB)?,
        tied: c["tie_word_embeddings"].as_bool().unwrap_or(false),
        experts,
        moe,
    })
}

/// Where one run of an input tensor's rows goes.
#[derive(Debug, Clone)]
struct Piece {
    info: TensorInfo,
    /// Rows of the input it takes, or None for rows of zeros (vocabulary padding).
    rows: Option<std::ops::Range<u64>>,
}

pub struct Mapper {
    cfg: MapperConfig,
    to_megatron: bool,
    family: Option<Family>,
    model: Option<ModelConfig>,
    /// zero_copy import: the pieces each HF tensor becomes.
    pieces: HashMap<String, Vec<Piece>>,
    /// Whole-tensor import: each Megatron tensor's info and its parts so far.
    outputs: HashMap<(usize, Option<u64>), TensorInfo>,
    pending: BTreeMap<(usize, Option<u64>), Parts>,
    /// HF tensors (or blocks of whole experts of one) whose experts are reshuffled (GPT-OSS):
    /// kind, Megatron name, global shape.
    reshuffle: HashMap<String, (Kind, String, Vec<u64>)>,
    /// HF tensors `allow_unexpected` drops.
    dropped: HashSet<String>,
}

/// The HF parts of one Megatron tensor received so far, by (expert, part).
type Parts = HashMap<(u64, usize), Tensor>;

fn row_bytes(shape: &[u64], dtype: bridgeflow_sdk::DType) -> u64 {
    shape.iter().skip(1).product::<u64>() * dtype.size() as u64
}

fn with_first(first: u64, rest: &[u64]) -> Vec<u64> {
    std::iter::once(first).chain(rest.iter().copied()).collect()
}

impl Mapper {
    fn family(&self) -> &Family {
        self.family.as_ref().expect("planned")
    }
    fn model(&self) -> &ModelConfig {
        self.model.as_ref().expect("planned")
    }
    fn entry(&self, i: usize) -> &Entry {
        &self.family().tensors[i]
    }
    fn padded_vocab(&self) -> u64 {
        bridgeflow_megatron::vocab::padded(
            self.model().vocab,
            self.cfg.make_vocab_size_divisible_by,
            self.cfg.tensor_parallel,
        )
    }

    /// Which table row, part and index an HF name belongs to (in its layer's kind).
    fn find_hf(&self, name: &str) -> Option<(usize, usize, Index)> {
        expect::find_hf(self.family(), self.model(), name)
    }
    fn find_megatron(&self, name: &str) -> Option<(usize, Index)> {
        let name = self.table_name(name);
        self.family()
            .tensors
            .iter()
            .enumerate()
            .find_map(|(i, e)| match_name(&e.megatron, &name).map(|idx| (i, idx)))
    }

    /// Megatron names of multi-token-prediction layers, which the table writes with HF's
    /// layer index (see [`bridgeflow_megatron::names::mtp_from_table`]).
    fn to_mtp(&self, name: String) -> String {
        bridgeflow_megatron::names::mtp_from_table(name, self.model().layers)
    }

    /// The inverse of [`Self::to_mtp`]: a Megatron name as the table writes it (MTP layers by HF index).
    fn table_name(&self, name: &str) -> String {
        bridgeflow_megatron::names::mtp_to_table(name, self.model().layers)
    }

    /// Whether `name` is an MTP layer's copy of a main-model tensor (not imported).
    fn mtp_copy(&self, name: &str) -> bool {
        self.family().mtp_shared.iter().any(|(_, pat)| {
            match_name(pat, name)
                .and_then(|i| i.layer)
                .is_some_and(|l| l >= self.model().layers)
        })
    }

    /// The MTP layers' names for a main-model tensor they repeat.
    fn mtp_copies(&self, name: &str) -> Vec<String> {
        let m = self.model();
        self.family()
            .mtp_shared
            .iter()
            .filter(|(main, _)| main == name)
            .flat_map(|(_, pat)| {
                (m.layers..m.layers + m.mtp).map(move |l| {
                    fill(
                        pat,
                        Index {
                            layer: Some(l),
                            expert: None,
                        },
                    )
                })
            })
            .collect()
    }

    /// Rows of each HF part and where they lie in a fused tensor of `fused` rows.
    fn segments(&self, kind: Kind, fused: u64, name: &str) -> Result<(Vec<u64>, Vec<RowSegment>)> {
        let m = self.model();
        row_segments(kind, fused, m.heads, m.vocab).map_err(|e| e.context(name))
    }

    /// The named row blocks a split kind stores as separate keys (Mamba's in_proj, conv1d).
    fn split_rows(&self, kind: Kind, name: &str) -> Result<Option<Vec<(&'static str, u64)>>> {
        if !kind.is_split() {
            return Ok(None);
        }
        let m = self.model().mamba.ok_or_else(|| {
            PluginError::format(format!(
                "'{name}' is a Mamba mixer's, but the config gives no mamba_num_heads / mamba_head_dim"
            ))
        })?;
        Ok(kind.split_rows(m))
    }

    /// A split kind's Megatron key `<name>.<part>`: the table row, its index, and the part's
    /// first row and the fused row count.
    fn find_split_part(&self, key: &str) -> Option<(usize, Index, u64, u64)> {
        let (base, part) = key.rsplit_once('.')?;
        let (i, idx) = self.find_megatron(base)?;
        let rows = self.split_rows(self.entry(i).kind, base).ok()??;
        let at = rows.iter().position(|(p, _)| *p == part)?;
        let first = rows[..at].iter().map(|(_, r)| r).sum();
        Some((i, idx, first, rows.iter().map(|(_, r)| r).sum()))
    }

    /// Why an HF tensor has no row: a layer the config does not have, or a name the table
    /// does not know.
    fn unmapped(&self, name: &str) -> PluginError {
        expect::unmapped(self.family(), self.model(), name)
    }

    /// HF tensors left out on purpose: recomputed buffers and the MTP layers' copies.
    fn leave_out(&self, name: &str) -> bool {
        self.family().ignorable(name) || self.mtp_copy(name)
    }

    fn skip_hf(&self, name: &str) -> bool {
        self.leave_out(name)
            || self.dropped.contains(name)
            || (name == "lm_head.weight" && self.model().tied)
    }

    /// The HF side checked against the table and config (see [`expect`]): the input on
    /// import, the planned output on export.
    fn check_complete(&mut self, hf: &[TensorInfo], import: bool, what: String) -> Result<()> {
        let allow = expect::Allow::new(&self.cfg.allow_missing, &self.cfg.allow_unexpected)?;
        let leave_out = |n: &str| self.leave_out(n);
        let dropped = expect::check(
            self.family(),
            self.model(),
            hf,
            leave_out,
            import,
            &allow,
            &what,
        )?;
        self.dropped = dropped;
        Ok(())
    }

    fn plan_to_megatron(&mut self, input: &StreamPlan, what: String) -> Result<StreamPlan> {
        self.check_complete(&input.whole_tensors(), true, what)?;
        // Each Megatron tensor (row, layer) and its parts: (expert, part) -> info.
        type Parts = BTreeMap<(u64, usize), TensorInfo>;
        let mut groups: BTreeMap<(usize, Option<u64>), Parts> = BTreeMap::new();
        // An HF tensor may arrive as blocks of rows (a dequantizing stage's pieces): each
        // block's name and rows, by tensor; a whole tensor is its own single block.
        let mut blocks: HashMap<String, Vec<(String, std::ops::Range<u64>)>> = HashMap::new();
        for t in input.tensors.iter() {
            let base = t.base_name().to_string();
            let whole = match t.shard() {
                Some(s) => TensorInfo::new(base.clone(), t.dtype, &s.global_shape),
                None => t.clone(),
            };
            let rows = match t.shard() {
                Some(s) => {
                    let a = s.offsets.first().copied().unwrap_or(0);
                    a..a + t.shape.first().copied().unwrap_or(1)
                }
                None => 0..t.shape.first().copied().unwrap_or(1),
            };
            if self.skip_hf(&base) {
                continue;
            }
            let seen = blocks.contains_key(&base);
            blocks
                .entry(base.clone())
                .or_default()
                .push((t.name().to_string(), rows));
            if seen {
                continue;
            }
            let t = &whole;
            let (i, p, idx) = self
                .find_hf(t.name())
                .ok_or_else(|| self.unmapped(t.name()))?;
            groups
                .entry((i, idx.layer))
                .or_default()
                .insert((idx.expert.unwrap_or(0), p), t.clone());
        }
        let mut out = Vec::new();
        for ((i, layer), parts) in &groups {
            let e = self.entry(*i).clone();
            let name = self.to_mtp(fill(
                &e.megatron,
                Index {
                    layer: *layer,
                    expert: None,
                },
            ));
            let experts = if e.per_expert() {
                Some(self.model().experts.ok_or_else(|| {
                    PluginError::format(format!(
                        "'{name}' has experts but the config gives no expert count"
                    ))
                })?)
            } else {
                None
            };
            for x in 0..experts.unwrap_or(1) {
                for (p, pat) in e.hf.iter().enumerate() {
                    if !parts.contains_key(&(x, p)) {
                        return Err(PluginError::shape(format!(
                            "'{name}' needs '{}', which the input lacks",
                            fill(
                                pat,
                                Index {
                                    layer: *layer,
                                    expert: experts.map(|_| x)
                                }
                            )
                        )));
                    }
                }
            }
            let first = &parts[&(0, 0)];
            if let Some(rows) = self.split_rows(e.kind, &name)? {
                // Stored as one key per row block: each a view of the HF tensor's rows.
                let total: u64 = rows.iter().map(|(_, r)| r).sum();
                if first.shape.first() != Some(&total) || blocks[first.name()].len() > 1 {
                    return Err(PluginError::shape(format!(
                        "'{}' {}: expected one whole tensor of {total} rows ({})",
                        first.name(),
                        first.shape_string(),
                        rows.iter()
                            .map(|(p, r)| format!("{p} {r}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                let mut at = 0;
                for (part, n) in rows {
                    let info = TensorInfo::new(
                        format!("{name}.{part}"),
                        first.dtype,
                        &with_first(n, &first.shape[1..]),
                    );
                    out.push(info.clone());
                    self.pieces
                        .entry(first.name().to_string())
                        .or_default()
                        .push(Piece {
                            info,
                            rows: Some(at..at + n),
                        });
                    at += n;
                }
                continue;
            }
            if !e.kind.by_rows() {
                // All experts in one tensor, reshuffled expert by expert: one piece each (a
                // copy the size of one expert), or the whole tensor without zero_copy. The
                // tensor may arrive in blocks of whole experts (a dequantizing stage's pieces).
                if first.shape.len() < 2 {
                    return Err(PluginError::shape(format!(
                        "'{}': expected a tensor with a leading expert axis",
                        first.name()
                    )));
                }
                if blocks[first.name()].len() > 1 && !self.cfg.zero_copy {
                    return Err(PluginError::config(format!(
                        "'{name}' is made of HF tensors that arrive in pieces; whole tensors need them whole (zero_copy = true takes pieces)"
                    )));
                }
                let n = first.shape[0];
                let global: Vec<u64> = std::iter::once(n)
                    .chain(expert_block_dims(e.kind, &first.shape[1..]))
                    .collect();
                if self.cfg.zero_copy {
                    for x in 0..n {
                        let mut at = vec![0; global.len()];
                        at[0] = x;
                        let mut shape = global.clone();
                        shape[0] = 1;
                        out.push(
                            TensorInfo::new(format!("{name}#{x}"), first.dtype, &shape)
                                .with_shard(&global, &at),
                        );
                    }
                } else {
                    out.push(TensorInfo::new(name.clone(), first.dtype, &global));
                }
                for (block, _) in &blocks[first.name()] {
                    self.reshuffle
                        .insert(block.clone(), (e.kind, name.clone(), global.clone()));
                }
                continue;
            }
            let part_rows: Vec<u64> = (0..e.hf.len())
                .map(|p| parts[&(0, p)].shape.first().copied().unwrap_or(1))
                .collect();
            let inner: Vec<u64> = first.shape.iter().skip(1).copied().collect();
            let fused = fused_rows(e.kind, &part_rows, self.padded_vocab());
            let lead: Vec<u64> = experts.into_iter().collect();
            let mut global = lead.clone();
            if !first.shape.is_empty() {
                global.push(fused);
            }
            global.extend(&inner);
            let (_, segs) = self.segments(e.kind, fused, &name)?;
            let whole = experts.is_none()
                && segs.len() == 1
                && segs[0].rows == fused
                && e.kind != Kind::Qkv;
            let in_pieces = parts.values().any(|t| blocks[t.name()].len() > 1);
            if in_pieces && !self.cfg.zero_copy {
                return Err(PluginError::config(format!(
                    "'{name}' is made of HF tensors that arrive in pieces; whole tensors need them whole (zero_copy = true takes pieces)"
                )));
            }
            if !in_pieces && (!self.cfg.zero_copy || whole || first.shape.is_empty()) {
                let info = TensorInfo::new(name, first.dtype, &global);
                self.outputs.insert((*i, *layer), info.clone());
                out.push(info);
                continue;
            }
            // Pieces: every run of every part's rows (cut again where the part itself arrives
            // in blocks), and the padding rows as zeros.
            for ((x, p), t) in parts {
                for seg in segs.iter().filter(|s| s.part == *p) {
                    for (block, rows) in &blocks[t.name()] {
                        let lo = seg.at.max(rows.start);
                        let hi = (seg.at + seg.rows).min(rows.end);
                        if lo >= hi {
                            continue;
                        }
                        let fused_at = seg.fused + (lo - seg.at);
                        let mut offsets: Vec<u64> = experts.map(|_| *x).into_iter().collect();
                        offsets.push(fused_at);
                        offsets.extend(std::iter::repeat_n(0, inner.len()));
                        let mut shape: Vec<u64> = experts.map(|_| 1).into_iter().collect();
                        shape.push(hi - lo);
                        shape.extend(&inner);
                        let id =
                            experts.map_or(format!("{fused_at}"), |_| format!("{x}.{fused_at}"));
                        let info = TensorInfo::new(format!("{name}#{id}"), t.dtype, &shape)
                            .with_shard(&global, &offsets);
                        out.push(info.clone());
                        self.pieces.entry(block.clone()).or_default().push(Piece {
                            info,
                            rows: Some(lo - rows.start..hi - rows.start),
                        });
                    }
                }
            }
            let covered: u64 = segs.iter().map(|s| s.rows).sum();
            if e.kind == Kind::Vocab && covered < fused {
                let mut offsets = vec![covered];
                offsets.extend(std::iter::repeat_n(0, inner.len()));
                let info = TensorInfo::new(
                    format!("{name}#pad"),
                    first.dtype,
                    &with_first(fused - covered, &inner),
                )
                .with_shard(&global, &offsets);
                out.push(info.clone());
                let block = blocks[first.name()][0].0.clone();
                self.pieces
                    .entry(block)
                    .or_default()
                    .push(Piece { info, rows: None });
            }
        }
        let mut plan = StreamPlan::new(out);
        plan.attrs = input.attrs.clone();
        plan.set(
            bridgeflow_sdk::attrs::ARCHITECTURE,
            self.model().architecture.clone(),
        );
        Ok(plan)
    }

    fn plan_to_hf(&mut self, input: &StreamPlan, what: String) -> Result<StreamPlan> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for t in input.tensors.iter() {
            // A piece (a stored block of rows) stands for its whole tensor, announced once.
            if !seen.insert(t.base_name().to_string()) {
                continue;
            }
            if let Some((i, idx, _, total)) = self.find_split_part(t.base_name()) {
                // One of the row blocks a split kind stores apart: the fused HF tensor, once.
                let name = fill(&self.entry(i).hf[0], idx);
                if seen.insert(name.clone()) {
                    let global = t.shard().map_or(&t.shape, |s| &s.global_shape);
                    out.push(TensorInfo::new(
                        name,
                        t.dtype,
                        &with_first(total, &global[1..]),
                    ));
                }
                continue;
            }
            let (i, idx) = self.find_megatron(t.base_name()).ok_or_else(|| {
                PluginError::unsupported(format!(
                    "Megatron tensor '{}' has no mapping in the {} table",
                    t.base_name(),
                    self.family().name
                ))
            })?;
            let e = self.entry(i).clone();
            let global = t
                .shard()
                .map_or(t.shape.to_vec(), |s| s.global_shape.to_vec());
            let (experts, shape) = if e.per_expert() {
                (Some(global[0]), global[1..].to_vec())
            } else {
                (None, global)
            };
            if !e.kind.by_rows() {
                let hf: Vec<u64> = std::iter::once(shape[0])
                    .chain(expert_block_dims(e.kind, &shape[1..]))
                    .collect();
                let name = fill(
                    &e.hf[0],
                    Index {
                        layer: idx.layer,
                        expert: None,
                    },
                );
                out.push(TensorInfo::new(name, t.dtype, &hf));
                continue;
            }
            let part_rows = match shape.first() {
                Some(&r) => self.segments(e.kind, r, t.base_name())?.0,
                None => vec![0],
            };
            for x in 0..experts.unwrap_or(1) {
                for (pat, &rows) in e.hf.iter().zip(&part_rows) {
                    let name = fill(
                        pat,
                        Index {
                            layer: idx.layer,
                            expert: experts.map(|_| x),
                        },
                    );
                    let s = if shape.is_empty() {
                        shape.clone()
                    } else {
                        with_first(rows, &shape[1..])
                    };
                    out.push(TensorInfo::new(name, t.dtype, &s));
                }
            }
        }
        self.check_complete(&out, false, what)?;
        // The MTP layers' copies of main-model tensors (DeepSeek-V3's release has them).
        let copies: Vec<TensorInfo> = out
            .iter()
            .flat_map(|t| {
                self.mtp_copies(t.name())
                    .into_iter()
                    .map(|c| t.clone().with_name(c))
            })
            .collect();
        out.extend(copies);
        let mut plan = StreamPlan::new(out);
        plan.attrs = input.attrs.clone();
        if let Some(dir) = self.cfg.hf_config.as_ref().and_then(|c| c.parent()) {
            plan.set(bridgeflow_sdk::attrs::SOURCE_DIR, dir);
        }
        Ok(plan)
    }

    /// Import without zero_copy: the whole Megatron tensor once all its parts are in.
    fn assemble(&mut self, key: (usize, Option<u64>), out: &mut Emitter) -> Result<()> {
        let e = self.entry(key.0).clone();
        let info = self.outputs[&key].clone();
        let parts = self.pending.remove(&key).unwrap_or_default();
        let experts = if e.per_expert() { info.shape[0] } else { 1 };
        let shape = &info.shape[e.per_expert() as usize..];
        // One part that is the whole tensor (a direct row, an unpadded vocabulary): as it is.
        if experts == 1 && parts.len() == 1 {
            let t = parts.values().next().expect("one part");
            if Some(t.bytes().len() as u64) == info.nbytes() {
                let t = parts.into_values().next().expect("one part");
                return out.tensor(Tensor::new(info, t.data)?);
            }
        }
        let row = row_bytes(shape, info.dtype);
        let per_expert = shape[0] * row;
        let mut data = vec![0u8; (experts * per_expert) as usize];
        let (_, segs) = self.segments(e.kind, shape[0], info.name())?;
        for ((x, p), t) in &parts {
            for s in segs.iter().filter(|s| s.part == *p) {
                let to = (x * per_expert + s.fused * row) as usize;
                let from = (s.at * row) as usize;
                let n = (s.rows * row) as usize;
                data[to..to + n].copy_from_slice(&t.bytes()[from..from + n]);
            }
        }
        out.tensor(Tensor::new(info, Buffer::from_vec(data))?)
    }

    fn process_to_megatron(&mut self, t: Tensor, out: &mut Emitter) -> Result<()> {
        if self.skip_hf(t.info.base_name()) {
            return Ok(());
        }
        if let Some((kind, name, global)) = self.reshuffle.get(t.name()).cloned() {
            let es = t.info.dtype.size();
            let n = t.info.shape[0] as usize;
            let first = t.info.shard().map_or(0, |s| s.offsets[0]);
            let per = t.bytes().len() / n.max(1);
            let src_dims = &t.info.shape[1..];
            let mut whole = Vec::new();
            for x in 0..n {
                let block = &t.bytes()[x * per..(x + 1) * per];
                let b = expert_block(kind, block, src_dims, es, true);
                t.data.discard(x * per..(x + 1) * per);
                if !self.cfg.zero_copy {
                    whole.extend_from_slice(&b);
                    continue;
                }
                let x = first + x as u64;
                let mut at = vec![0; global.len()];
                at[0] = x;
                let mut shape = global.clone();
                shape[0] = 1;
                let info = TensorInfo::new(format!("{name}#{x}"), t.info.dtype, &shape)
                    .with_shard(&global, &at);
                out.tensor(Tensor::new(info, Buffer::from_vec(b))?)?;
            }
            if !self.cfg.zero_copy {
                let info = TensorInfo::new(name, t.info.dtype, &global);
                out.tensor(Tensor::new(info, Buffer::from_vec(whole))?)?;
            }
            return Ok(());
        }
        if let Some(pieces) = self.pieces.get(t.name()) {
            let row = row_bytes(&t.info.shape, t.info.dtype);
            for pc in pieces {
                let data = match &pc.rows {
                    Some(r) => t
                        .data
                        .slice((r.start * row) as usize..(r.end * row) as usize),
                    None => Buffer::from_vec(vec![0; pc.info.nbytes().unwrap_or(0) as usize]),
                };
                out.tensor(Tensor::new(pc.info.clone(), data)?)?;
            }
            return Ok(());
        }
        let (i, p, idx) = self.find_hf(t.name()).ok_or_else(|| {
            PluginError::unsupported(format!("tensor '{}' has no mapping", t.name()))
        })?;
        let key = (i, idx.layer);
        let e = self.entry(i);
        let need = e.hf.len() as u64
            * if e.per_expert() {
                self.model().experts.unwrap_or(1)
            } else {
                1
            };
        let slot = self.pending.entry(key).or_default();
        slot.insert((idx.expert.unwrap_or(0), p), t);
        if slot.len() as u64 == need {
            self.assemble(key, out)?;
        }
        Ok(())
    }

    fn process_to_hf(&mut self, t: Tensor, out: &mut Emitter) -> Result<()> {
        if let Some((i, idx, first, total)) = self.find_split_part(t.info.base_name()) {
            // A row block stored apart (or a piece of one): its rows of the fused HF tensor.
            let name = fill(&self.entry(i).hf[0], idx);
            let row = first + t.info.shard().map_or(0, |s| s.offsets[0]);
            let global = with_first(total, &t.info.shape[1..]);
            let mut at = vec![0; global.len()];
            at[0] = row;
            let info = t
                .info
                .clone()
                .with_name(format!("{name}#{row}"))
                .with_shard(&global, &at);
            return out.tensor(Tensor::new(info, t.data)?);
        }
        let (i, idx) = self.find_megatron(t.info.base_name()).ok_or_else(|| {
            PluginError::unsupported(format!("Megatron tensor '{}' has no mapping", t.name()))
        })?;
        let e = self.entry(i).clone();
        let name = |p: usize, x: Option<u64>| {
            fill(
                &e.hf[p],
                Index {
                    layer: idx.layer,
                    expert: x,
                },
            )
        };
        if !e.kind.by_rows() {
            // Expert by expert back to the HF layout: a whole tensor, or (from stored blocks)
            // the experts this block holds, each a piece of the HF tensor.
            let global = t
                .info
                .shard()
                .map_or(t.info.shape.to_vec(), |s| s.global_shape.to_vec());
            if t.info.shape[1..] != global[1..] {
                return Err(PluginError::shape(format!(
                    "'{}' holds part of an expert; its experts are reshuffled whole",
                    t.name()
                )));
            }
            let first = t.info.shard().map_or(0, |s| s.offsets[0]);
            let n = t.info.shape[0] as usize;
            let es = t.info.dtype.size();
            let per = t.bytes().len() / n.max(1);
            let dims = &global[1..];
            let hf: Vec<u64> = std::iter::once(global[0])
                .chain(expert_block_dims(e.kind, dims))
                .collect();
            let hf_name = name(0, None);
            let blocks: Vec<Vec<u8>> = (0..n)
                .map(|x| expert_block(e.kind, &t.bytes()[x * per..(x + 1) * per], dims, es, false))
                .collect();
            if t.info.shard().is_none() {
                let info = TensorInfo::new(hf_name, t.info.dtype, &hf);
                return out.tensor(Tensor::new(info, Buffer::from_vec(blocks.concat()))?);
            }
            for (x, b) in blocks.into_iter().enumerate() {
                let mut at = vec![0; hf.len()];
                at[0] = first + x as u64;
                let mut shape = hf.clone();
                shape[0] = 1;
                let info = TensorInfo::new(format!("{hf_name}#{}", at[0]), t.info.dtype, &shape)
                    .with_shard(&hf, &at);
                out.tensor(Tensor::new(info, Buffer::from_vec(b))?)?;
            }
            return Ok(());
        }
        if e.kind == Kind::Direct && !e.per_expert() {
            // Renamed; a piece stays a piece of the renamed tensor.
            let n = match t.name().split_once('#') {
                Some((_, id)) => format!("{}#{id}", name(0, None)),
                None => name(0, None),
            };
            return out.tensor(Tensor::new(t.info.clone().with_name(n), t.data)?);
        }
        if e.kind == Kind::Qkv && !self.cfg.zero_copy {
            if t.info.shard().is_some() {
                return Err(PluginError::config(format!(
                    "'{}' arrives in pieces; whole q/k/v tensors need zero_copy = true or a reader without row_pieces",
                    t.name()
                )));
            }
            let row = row_bytes(&t.info.shape, t.info.dtype) as usize;
            let (q, k, v) = split_qkv(t.bytes(), self.model().heads, row)
                .map_err(|err| err.context(t.name()))?;
            for (p, data) in [q, k, v].into_iter().enumerate() {
                let shape = with_first((data.len() / row) as u64, &t.info.shape[1..]);
                let info = TensorInfo::new(name(p, None), t.info.dtype, &shape);
                out.tensor(Tensor::new(info, Buffer::from_vec(data))?)?;
            }
            return Ok(());
        }
        // The block this tensor is of its (per-layer) Megatron tensor: experts and rows.
        let lead = e.per_expert() as usize;
        let (global, offsets) = match t.info.shard() {
            Some(s) => (s.global_shape.to_vec(), s.offsets.to_vec()),
            None => (t.info.shape.to_vec(), vec![0; t.info.shape.len()]),
        };
        let inner = &t.info.shape[lead + 1..];
        let (part_rows, segments) = self.segments(e.kind, global[lead], t.name())?;
        let row = row_bytes(&t.info.shape[lead..], t.info.dtype);
        let (first, n) = (offsets[lead], t.info.shape[lead]);
        let experts = if lead == 1 {
            offsets[0]..offsets[0] + t.info.shape[0]
        } else {
            0..1
        };
        for x in experts.clone() {
            let base = (x - experts.start) * n * row;
            let xi = (lead == 1).then_some(x);
            // Every run of rows goes to its place as a view of the input: a whole HF tensor
            // when the run covers one, else a row piece the writer places.
            for s in segments.iter().filter_map(|s| s.clip(first..first + n)) {
                let shape = with_first(s.rows, inner);
                let from = base + (s.fused - first) * row;
                let data = t.data.slice(from as usize..(from + s.rows * row) as usize);
                let info = if s.at == 0 && s.rows == part_rows[s.part] {
                    TensorInfo::new(name(s.part, xi), t.info.dtype, &shape)
                } else {
                    let mut at = vec![s.at];
                    at.extend(std::iter::repeat_n(0, inner.len()));
                    TensorInfo::new(
                        format!("{}#{}", name(s.part, xi), s.fused),
                        t.info.dtype,
                        &shape,
                    )
                    .with_shard(&with_first(part_rows[s.part], inner), &at)
                };
                out.tensor(Tensor::new(info, data)?)?;
            }
        }
        Ok(())
    }
}

impl Transform for Mapper {
    type Config = MapperConfig;
    const DESCRIPTION: &'static str =
        "HF <-> Megatron-Core names and layouts from a model table (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 2, DeepSeek-V2/V3, or a TOML table)";
    // The vocabulary is padded for the TP degree (make_vocab_size_divisible_by × tp).
    const TRANSLATES: &'static [bridgeflow_sdk::Translation] = &[
        bridgeflow_sdk::Translation {
            from: "hf",
            to: "megatron",
            config: r#"{"direction": "to-megatron"}"#,
            options: &["tp=tensor_parallel"],
        },
        bridgeflow_sdk::Translation {
            from: "megatron",
            to: "hf",
            config: r#"{"direction": "to-hf"}"#,
            options: &["hf_config"],
        },
    ];

    fn new(cfg: MapperConfig) -> Result<Self> {
        bridgeflow_megatron::degree::check_degree("tensor_parallel", cfg.tensor_parallel)?;
        bridgeflow_megatron::vocab::check_divisible_by(cfg.make_vocab_size_divisible_by)?;
        let to_megatron = match cfg.direction.as_str() {
            "to-megatron" => true,
            "to-hf" => false,
            d => {
                return Err(PluginError::config(format!(
                    "direction '{d}': expected to-megatron or to-hf"
                )))
            }
        };
        Ok(Mapper {
            cfg,
            to_megatron,
            family: None,
            model: None,
            pieces: HashMap::new(),
            outputs: HashMap::new(),
            pending: BTreeMap::new(),
            reshuffle: HashMap::new(),
            dropped: HashSet::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let input = &inputs[0];
        // The HF config: given, beside the input, or (export) rebuilt from the checkpoint's
        // run_config.yaml, as Megatron-Bridge or bridgeflow wrote it.
        let given = match &self.cfg.hf_config {
            Some(p) => Some(p.clone()),
            None => input
                .get(bridgeflow_sdk::attrs::SOURCE_DIR)
                .map(|d| d.join("config.json"))
                .filter(|p| p.is_file()),
        };
        let (hf, path, derived) = match given {
            Some(p) => (read_json(&p)?, p, false),
            None => {
                let run_config = input
                    .get(bridgeflow_sdk::attrs::CHECKPOINT_DIR)
                    .map(|d| d.join("run_config.yaml"))
                    .filter(|p| p.is_file())
                    .ok_or_else(|| {
                        PluginError::config(
                            "no HF config: set hf_config (the input has no config.json beside it and no run_config.yaml)",
                        )
                    })?;
                let hf = crate::megatron_config::hf_config_from_run_config(&run_config)?;
                (hf, run_config, true)
            }
        };
        let tables = self
            .cfg
            .model_tables
            .iter()
            .map(|p| {
                let text =
                    std::fs::read_to_string(p).map_err(|e| PluginError::io(p, "cannot read", e))?;
                Family::from_toml(&text, p)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut hf = hf;
        if self.to_megatron {
            // The config kept with the checkpoint describes the weights as they arrive here
            // (after a cast or a dequantization upstream).
            if let Some(d) = input.get(bridgeflow_sdk::attrs::DTYPE) {
                hf["dtype"] = d.trim_start_matches("torch.").into();
                if let Some(o) = hf.as_object_mut() {
                    o.remove("torch_dtype");
                }
            }
            if let (Some(keys), Some(o)) = (
                input.get(bridgeflow_sdk::attrs::DROP_CONFIG_KEYS),
                hf.as_object_mut(),
            ) {
                for k in &keys {
                    o.remove(k);
                }
            }
        }
        let text = crate::megatron_config::text_view(&hf);
        let model = model_config_from(&text, &path)?;
        let mut family = families::find(&model.architecture, &tables)
            .map_err(|e| PluginError::unsupported(format!("{}: {}", path.display(), e.message)))?;
        family.add_verbatim(input.tensors.iter().map(|t| t.base_name()));
        self.model = Some(model);
        self.family = Some(family);
        let mut plan = if self.to_megatron {
            use crate::megatron_config::{model_section, run_config, to_yaml};
            let what = format!(
                "HF model {} does not fit {}",
                input
                    .get(bridgeflow_sdk::attrs::SOURCE_DIR)
                    .map_or_else(|| "(input)".into(), |d| d.display().to_string()),
                path.display()
            );
            let mut p = self.plan_to_megatron(input, what)?;
            // Bridge's hf_model_id and tokenizer_model: the HF folder we read.
            let source = input
                .get(bridgeflow_sdk::attrs::SOURCE_DIR)
                .map(|d| std::fs::canonicalize(&d).unwrap_or(d).display().to_string());
            let model = model_section(
                self.family(),
                &text,
                source.as_deref(),
                self.cfg.make_vocab_size_divisible_by,
                self.cfg.tensor_parallel.max(1),
            )?;
            // The model fields also travel as they are, for writers of other formats (the
            // Megatron-LM writer's args).
            p.set(bridgeflow_sdk::attrs::MEGATRON_MODEL, model.clone());
            let yaml = to_yaml(
                &run_config(&hf, model, source.as_deref()),
                "# Written by bridgeflow as Megatron-Bridge writes it: `model` instantiates the\n# family's Megatron-Bridge provider (load_megatron_model, export_ckpt); `bridgeflow.hf_config`\n# is the original config.json, from which export rebuilds it exactly.\n",
            );
            p.set(bridgeflow_sdk::attrs::RUN_CONFIG_YAML, yaml);
            p
        } else {
            let what = format!(
                "Megatron checkpoint {} does not fit {}",
                input
                    .get(bridgeflow_sdk::attrs::CHECKPOINT_DIR)
                    .map_or_else(|| "(input)".into(), |d| d.display().to_string()),
                path.display()
            );
            self.plan_to_hf(input, what)?
        };
        if !self.to_megatron && derived {
            // Rebuilt from a run config: always an object.
            if let serde_json::Value::Object(hf) = hf {
                plan.set(bridgeflow_sdk::attrs::HF_CONFIG, hf);
            }
        }
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        if self.to_megatron {
            return self.process_to_megatron(t, out);
        }
        if self.model().mtp == 0 || self.family().mtp_shared.is_empty() {
            return self.process_to_hf(t, out);
        }
        // Each tensor the MTP layers repeat goes out again under their names (the same bytes).
        let copies: Vec<(String, Vec<String>)> = self
            .family()
            .mtp_shared
            .iter()
            .map(|(main, _)| (main.clone(), self.mtp_copies(main)))
            .collect();
        let mut both = |item: Item| -> Result<()> {
            let t = item.into_tensor()?;
            let base = t.info.base_name().to_string();
            for (_, names) in copies.iter().filter(|(main, _)| *main == base) {
                for c in names {
                    let name = match t.name().split_once('#') {
                        Some((_, id)) => format!("{c}#{id}"),
                        None => c.clone(),
                    };
                    out.tensor(Tensor::new(t.info.clone().with_name(name), t.data.clone())?)?;
                }
            }
            out.tensor(t)
        };
        Emitter::scoped(&mut both, None, |em| self.process_to_hf(t, em))
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        if let Some(((i, l), _)) = self.pending.iter().next() {
            return Err(PluginError::shape(format!(
                "'{}' never got all its parts from the input",
                fill(
                    &self.entry(*i).megatron,
                    Index {
                        layer: *l,
                        expert: None
                    }
                )
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hybrid_layer_kinds_from_either_config_form() {
        let p = Path::new("config.json");
        let list = json!({"layers_block_type": ["mamba", "attention", "mlp", "moe"]});
        let pattern = json!({"hybrid_override_pattern": "M*-E"});
        let want = vec![Layers::Mamba, Layers::Attention, Layers::Mlp, Layers::Moe];
        assert_eq!(hybrid_layers(&list, p).unwrap(), Some(want.clone()));
        assert_eq!(hybrid_layers(&pattern, p).unwrap(), Some(want));
        assert_eq!(hybrid_layers(&json!({}), p).unwrap(), None);
        let e = hybrid_layers(&json!({"hybrid_override_pattern": "M*X"}), p).unwrap_err();
        assert!(
            e.message.contains("config.json") && e.message.contains("'X'"),
            "{}",
            e.message
        );
    }
}

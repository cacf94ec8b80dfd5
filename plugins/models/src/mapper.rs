//! A table-driven mapper: any family's table of [`Entry`] rows converts in both directions.
//!
//! The mapper finds each tensor's row (and layer, expert) in the family's table and hands the
//! work to the row's mapping layout ([`crate::layout`]: one type per kind, both directions).
//! The row layouts move blocks of rows as views of their input: HF → Megatron emits each HF
//! tensor's runs of rows as pieces of the per-layer Megatron tensor (the torch_dist writer
//! stacks layers and places pieces as chunks); Megatron → HF emits each run of a Megatron
//! tensor, or of a stored block of it, as rows of an HF tensor (the safetensors writer places
//! them). With `zero_copy = false` whole tensors are assembled instead, for consumers that need
//! them (verify, the logits check).

use crate::expect;
use crate::families::{self, Family};
use crate::layout::{self, row_bytes, Geometry, Group, Layout, PartialExperts, Parts, Routes};
use bridgeflow_megatron::mapping::{fill, match_name, Entry, Heads, Index, Layers, MambaDims};
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
    /// `to-megatron` (HF names and layouts in, Megatron out), `to-hf`, or `check-hf` (HF in,
    /// the same HF tensors out once checked against the table and config as on import: what an
    /// exporter fed straight from HF files gets).
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

/// Numbers of an HF config, each checked against its range before anything is sized by it.
struct Numbers<'a> {
    c: &'a serde_json::Value,
    path: &'a Path,
}

impl Numbers<'_> {
    fn get(&self, k: &str) -> Option<u64> {
        self.c[k].as_u64()
    }
    fn within(&self, k: &str, v: u64, lo: u64, hi: u64) -> Result<u64> {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(PluginError::config(format!(
                "{}: '{k}' is {v}; expected {lo} to {hi}",
                self.path.display()
            )))
        }
    }
    /// A key the config must have.
    fn bounded(&self, k: &str, lo: u64, hi: u64) -> Result<u64> {
        let v = self
            .get(k)
            .ok_or_else(|| PluginError::format(format!("{}: no '{k}'", self.path.display())))?;
        self.within(k, v, lo, hi)
    }
    fn maybe(&self, k: &str, lo: u64, hi: u64) -> Result<Option<u64>> {
        self.get(k).map(|v| self.within(k, v, lo, hi)).transpose()
    }

    /// Routed experts per MoE layer, under any of the families' keys (none for 0).
    fn experts(&self) -> Result<Option<u64>> {
        let key = ["num_local_experts", "num_experts", "n_routed_experts"]
            .into_iter()
            .find_map(|k| self.get(k).map(|v| (k, v)));
        match key {
            Some((k, v)) => Ok(Some(self.within(k, v, 0, MAX_EXPERTS)?).filter(|&e| e > 0)),
            None => Ok(None),
        }
    }

    /// The attention geometry of `heads` attention heads: query groups and head size.
    fn heads(&self, hidden: u64, heads: u64) -> Result<Heads> {
        let groups = self
            .maybe("num_key_value_heads", 1, heads)?
            .unwrap_or(heads);
        if !heads.is_multiple_of(groups) {
            return Err(PluginError::config(format!(
                "{}: {heads} attention heads do not divide into {groups} key/value heads",
                self.path.display()
            )));
        }
        let head_dim = match self.maybe("head_dim", 1, MAX_WIDTH)? {
            Some(d) => d,
            None => self.within(
                "hidden_size / num_attention_heads",
                hidden / heads,
                1,
                MAX_WIDTH,
            )?,
        };
        Ok(Heads {
            heads,
            groups,
            head_dim,
        })
    }

    /// Which of the layers (and MTP layers) are MoE: all but the first
    /// `first_k_dense_replace`, every `decoder_sparse_step`-th, none of `mlp_only_layers`.
    fn moe_layers(&self, layers: u64, experts: Option<u64>) -> Vec<bool> {
        let dense_first = self.get("first_k_dense_replace").unwrap_or(0);
        let step = self.get("decoder_sparse_step").unwrap_or(1).max(1);
        let mlp_only: Vec<u64> = self.c["mlp_only_layers"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        (0..layers)
            .map(|l| {
                experts.is_some()
                    && l >= dense_first
                    && (l + 1) % step == 0
                    && !mlp_only.contains(&l)
            })
            .collect()
    }

    /// A Mamba-2 mixer's widths, when the config has Mamba heads.
    fn mamba(&self) -> Result<Option<MambaDims>> {
        let (Some(h), Some(d)) = (
            self.maybe("mamba_num_heads", 1, MAX_HEADS)?,
            self.maybe("mamba_head_dim", 1, MAX_WIDTH)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(MambaDims {
            inner: self.within("mamba_num_heads * mamba_head_dim", h * d, 1, MAX_WIDTH)?,
            bc: self.within(
                "n_groups * ssm_state_size",
                self.maybe("n_groups", 1, MAX_HEADS)?.unwrap_or(1)
                    * self.bounded("ssm_state_size", 1, MAX_WIDTH)?,
                1,
                MAX_WIDTH,
            )?,
            heads: h,
        }))
    }
}

/// The geometry of an HF config (`path` only names it in messages).
pub fn model_config_from(c: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
    let arch = c["architectures"][0].as_str().unwrap_or("").to_string();
    let n = Numbers { c, path };
    let hidden = n.bounded("hidden_size", 1, MAX_WIDTH)?;
    let heads = n.bounded("num_attention_heads", 1, MAX_HEADS)?;
    let layers = n.bounded("num_hidden_layers", 1, MAX_LAYERS)?;
    let experts = n.experts()?;
    let heads = n.heads(hidden, heads)?;
    let mtp = n
        .maybe("num_nextn_predict_layers", 0, MAX_LAYERS)?
        .unwrap_or(0);
    let moe = n.moe_layers(layers + mtp, experts);
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
    let mamba = n.mamba()?;
    Ok(ModelConfig {
        architecture: arch,
        hidden,
        ffn: n.maybe("intermediate_size", 1, MAX_WIDTH)?,
        moe_ffn: n.maybe("moe_intermediate_size", 1, MAX_WIDTH)?,
        layers,
        hybrid,
        mamba,
        mtp,
        heads,
        vocab: n.bounded("vocab_size", 1, MAX_VOCAB)?,
        tied: c["tie_word_embeddings"].as_bool().unwrap_or(false),
        experts,
        moe,
    })
}

/// On import, the config kept with the checkpoint describes the weights as they arrive here
/// (after a cast or a dequantization upstream): their dtype, without the keys a stage dropped.
fn as_arriving(input: &StreamPlan, hf: &mut serde_json::Value) {
    without_absent_mtp(input, hf);
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

/// A config that names multi-token-prediction layers whose weights the checkpoint does not have
/// (transformers saves DeepSeek-V3 without them, and loads it so): imported as the model without
/// them, said on stderr, so that the Megatron config and the weights agree.
fn without_absent_mtp(input: &StreamPlan, hf: &mut serde_json::Value) {
    let (Some(layers), Some(mtp)) = (
        hf["num_hidden_layers"].as_u64(),
        hf["num_nextn_predict_layers"].as_u64().filter(|&m| m > 0),
    ) else {
        return;
    };
    let layer = |name: &str| -> Option<u64> {
        name.strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    // HF names them as the layers after the last; Megatron as `mtp.layers.{m}`.
    let present = input.tensors.iter().any(|t| {
        let n = t.base_name();
        n.starts_with("mtp.") || layer(n).is_some_and(|l| l >= layers)
    });
    if !present {
        eprintln!(
            "note: the config names {mtp} multi-token-prediction layer(s) but the checkpoint has none; converting the model without them"
        );
        hf["num_nextn_predict_layers"] = 0.into();
    }
}

/// Which way a mapper stage works.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    ToMegatron,
    ToHf,
    CheckHf,
}

pub struct Mapper {
    cfg: MapperConfig,
    direction: Direction,
    family: Option<Family>,
    model: Option<ModelConfig>,
    /// Import: how each HF tensor becomes Megatron tensors as it arrives (the layouts' plan).
    routes: Routes,
    /// Whole-tensor import: each Megatron tensor's parts so far.
    pending: BTreeMap<(usize, Option<u64>), Parts>,
    /// HF tensors `allow_unexpected` drops.
    dropped: HashSet<String>,
    /// Export: experts that arrive in pieces, for layouts that need them whole.
    partial_experts: PartialExperts,
}

/// How each HF tensor arrives: the name and rows of each of its blocks, by tensor.
type Blocks = HashMap<String, Vec<(String, std::ops::Range<u64>)>>;
/// The HF tensors of each Megatron tensor to plan, by (table row, layer): (expert, part) → info.
type Groups = BTreeMap<(usize, Option<u64>), BTreeMap<(u64, usize), TensorInfo>>;

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
    /// The mapping layout of table row `i`.
    fn layout(&self, i: usize) -> &'static dyn Layout {
        layout::of(self.entry(i).kind)
    }
    /// What the layouts need of the model and the run.
    fn geometry(&self) -> Geometry {
        let m = self.model();
        Geometry {
            heads: m.heads,
            vocab: m.vocab,
            padded_vocab: self.padded_vocab(),
            mamba: m.mamba,
            zero_copy: self.cfg.zero_copy,
        }
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

    /// A Megatron key `<name>.<block>` of a layout that stores its rows as one key per named
    /// block (a Mamba mixer's in_proj, conv1d): the table row and its index.
    fn find_split_part(&self, key: &str) -> Option<(usize, Index)> {
        let (base, part) = key.rsplit_once('.')?;
        let (i, idx) = self.find_megatron(base)?;
        let rows = self.layout(i).split_blocks(&self.geometry(), base).ok()??;
        rows.iter().any(|(p, _)| *p == part).then_some((i, idx))
    }

    /// A Megatron tensor's table row and index: a key of a split layout's block, or a name.
    fn find_megatron_key(&self, name: &str) -> Option<(usize, Index)> {
        self.find_split_part(name)
            .or_else(|| self.find_megatron(name))
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

    /// The HF input by Megatron tensor: each one's parts, and how each HF tensor arrives.
    fn import_groups(&self, input: &StreamPlan) -> Result<(Groups, Blocks)> {
        let mut groups = Groups::new();
        // An HF tensor may arrive as blocks of rows (a dequantizing stage's pieces): each
        // block's name and rows, by tensor; a whole tensor is its own single block.
        let mut blocks = Blocks::new();
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
        Ok((groups, blocks))
    }

    /// One Megatron tensor's import plan, by its row's layout, once its parts are all there.
    fn plan_group(
        &mut self,
        (i, layer): (usize, Option<u64>),
        parts: &BTreeMap<(u64, usize), TensorInfo>,
        blocks: &Blocks,
    ) -> Result<Vec<TensorInfo>> {
        let e = self.entry(i).clone();
        let name = self.to_mtp(fill(
            &e.megatron,
            Index {
                layer,
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
                                layer,
                                expert: experts.map(|_| x)
                            }
                        )
                    )));
                }
            }
        }
        let g = Group {
            row: i,
            layer,
            entry: &e,
            name,
            experts,
            parts,
            blocks,
        };
        let cx = self.geometry();
        layout::of(e.kind).plan_to_megatron(&g, &cx, &mut self.routes)
    }

    fn plan_to_megatron(&mut self, input: &StreamPlan, what: String) -> Result<StreamPlan> {
        self.check_complete(&input.whole_tensors(), true, what)?;
        let (groups, blocks) = self.import_groups(input)?;
        let mut out = Vec::new();
        for (key, parts) in &groups {
            out.extend(self.plan_group(*key, parts, &blocks)?);
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
        let (mut seen, mut named) = (HashSet::new(), HashSet::new());
        let cx = self.geometry();
        for t in input.tensors.iter() {
            // A piece (a stored block of rows) stands for its whole tensor, announced once.
            if !seen.insert(t.base_name().to_string()) {
                continue;
            }
            let (i, idx) = self.find_megatron_key(t.base_name()).ok_or_else(|| {
                PluginError::unsupported(format!(
                    "Megatron tensor '{}' has no mapping in the {} table",
                    t.base_name(),
                    self.family().name
                ))
            })?;
            // Each HF tensor once (a split layout's row blocks are of one fused HF tensor).
            for info in self.layout(i).plan_to_hf(self.entry(i), idx, t, &cx)? {
                if named.insert(info.name().to_string()) {
                    out.push(info);
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
        let info = self.routes.whole[&key].clone();
        let parts = self.pending.remove(&key).unwrap_or_default();
        let cx = self.geometry();
        self.layout(key.0)
            .to_megatron(self.entry(key.0), &cx, &info, parts, out)
    }

    fn process_to_megatron(&mut self, t: Tensor, out: &mut Emitter) -> Result<()> {
        if self.skip_hf(t.info.base_name()) {
            return Ok(());
        }
        if let Some((i, target)) = self.routes.own.get(t.name()).cloned() {
            // A tensor its layout turns into its Megatron tensor by itself (reshuffled experts).
            let cx = self.geometry();
            let parts = Parts::from([((0, 0), t)]);
            return self
                .layout(i)
                .to_megatron(self.entry(i), &cx, &target, parts, out);
        }
        if let Some(pieces) = self.routes.pieces.get(t.name()) {
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
        let (i, idx) = self.find_megatron_key(t.info.base_name()).ok_or_else(|| {
            PluginError::unsupported(format!("Megatron tensor '{}' has no mapping", t.name()))
        })?;
        let cx = self.geometry();
        let layout = self.layout(i);
        let t = if layout.needs_whole_experts() {
            match self.partial_experts.whole(t)? {
                Some(t) => t,
                None => return Ok(()),
            }
        } else {
            t
        };
        layout.to_hf(self.entry(i), idx, t, &cx, out)
    }

    /// The model tables given (`model_tables`), read.
    fn load_tables(&self) -> Result<Vec<Family>> {
        self.cfg
            .model_tables
            .iter()
            .map(|p| {
                let text =
                    std::fs::read_to_string(p).map_err(|e| PluginError::io(p, "cannot read", e))?;
                Family::from_toml(&text, p)
            })
            .collect()
    }

    /// The HF config — given, beside the input, or (export) rebuilt from the checkpoint's
    /// run_config.yaml, as Megatron-Bridge or bridgeflow wrote it, by the family tables — the
    /// file it comes from, whether it was rebuilt, and the model tables given.
    fn hf_config(
        &self,
        input: &StreamPlan,
    ) -> Result<(serde_json::Value, PathBuf, bool, Vec<Family>)> {
        let given = match &self.cfg.hf_config {
            Some(p) => Some(p.clone()),
            None => input
                .get(bridgeflow_sdk::attrs::SOURCE_DIR)
                .map(|d| d.join("config.json"))
                .filter(|p| p.is_file()),
        };
        if let Some(p) = given {
            let hf = read_json(&p)?;
            return Ok((hf, p, false, self.load_tables()?));
        }
        let run_config = input
            .get(bridgeflow_sdk::attrs::CHECKPOINT_DIR)
            .map(|d| d.join("run_config.yaml"))
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                PluginError::config(
                    "no HF config: set hf_config (the input has no config.json beside it and no run_config.yaml)",
                )
            })?;
        let tables = self.load_tables()?;
        let hf = crate::megatron_config::hf_config_from_run_config_with(&run_config, &tables)?;
        Ok((hf, run_config, true, tables))
    }

    /// The import plan, with the model section and the run_config.yaml it writes (`hf` the
    /// config as it is kept, `text` its language-model view, from `path`).
    fn plan_import(
        &mut self,
        input: &StreamPlan,
        hf: &serde_json::Value,
        text: &serde_json::Value,
        path: &Path,
    ) -> Result<StreamPlan> {
        use crate::megatron_config::{model_section, run_config, to_yaml};
        let mut p = self.plan_to_megatron(input, import_misfit(input, path))?;
        // Bridge's hf_model_id and tokenizer_model: the HF folder we read.
        let source = input
            .get(bridgeflow_sdk::attrs::SOURCE_DIR)
            .map(|d| std::fs::canonicalize(&d).unwrap_or(d).display().to_string());
        let model = model_section(
            self.family(),
            text,
            source.as_deref(),
            self.cfg.make_vocab_size_divisible_by,
            self.cfg.tensor_parallel.max(1),
        )?;
        // The model fields also travel as they are, for writers of other formats (the
        // Megatron-LM writer's args).
        p.set(bridgeflow_sdk::attrs::MEGATRON_MODEL, model.clone());
        let yaml = to_yaml(
            &run_config(hf, model, source.as_deref()),
            "# Written by bridgeflow as Megatron-Bridge writes it: `model` instantiates the\n# family's Megatron-Bridge provider (load_megatron_model, export_ckpt); `bridgeflow.hf_config`\n# is the original config.json, from which export rebuilds it exactly.\n",
        );
        p.set(bridgeflow_sdk::attrs::RUN_CONFIG_YAML, yaml);
        Ok(p)
    }
}

impl Mapper {
    /// The HF input checked as on import and passed on as it arrives, less what
    /// `allow_unexpected` drops.
    fn plan_check(&mut self, input: &StreamPlan, path: &Path) -> Result<StreamPlan> {
        self.check_complete(&input.whole_tensors(), true, import_misfit(input, path))?;
        let mut plan = input.clone();
        plan.tensors
            .retain(|t| !self.dropped.contains(t.base_name()));
        Ok(plan)
    }
}

/// How an HF input that does not fit its config is named: the folder and the config.
fn import_misfit(input: &StreamPlan, path: &Path) -> String {
    format!(
        "HF model {} does not fit {}",
        input
            .get(bridgeflow_sdk::attrs::SOURCE_DIR)
            .map_or_else(|| "(input)".into(), |d| d.display().to_string()),
        path.display()
    )
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
        // Into a checked model (what the exporters take): HF files are checked as on import;
        // Megatron's export output is checked already.
        bridgeflow_sdk::Translation {
            from: "hf",
            to: "hf-model",
            config: r#"{"direction": "check-hf"}"#,
            options: &[],
        },
        bridgeflow_sdk::Translation {
            from: "megatron",
            to: "hf-model",
            config: r#"{"direction": "to-hf"}"#,
            options: &["hf_config"],
        },
    ];

    fn new(cfg: MapperConfig) -> Result<Self> {
        bridgeflow_megatron::degree::check_degree("tensor_parallel", cfg.tensor_parallel)?;
        bridgeflow_megatron::vocab::check_divisible_by(cfg.make_vocab_size_divisible_by)?;
        let direction = match cfg.direction.as_str() {
            "to-megatron" => Direction::ToMegatron,
            "to-hf" => Direction::ToHf,
            "check-hf" => Direction::CheckHf,
            d => {
                return Err(PluginError::config(format!(
                    "direction '{d}': expected to-megatron, to-hf or check-hf"
                )))
            }
        };
        Ok(Mapper {
            cfg,
            direction,
            family: None,
            model: None,
            routes: Routes::default(),
            pending: BTreeMap::new(),
            partial_experts: PartialExperts::default(),
            dropped: HashSet::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let input = &inputs[0];
        let (mut hf, path, derived, tables) = self.hf_config(input)?;
        if self.direction != Direction::ToHf {
            as_arriving(input, &mut hf);
        } else {
            without_absent_mtp(input, &mut hf);
        }
        let text = crate::megatron_config::text_view(&hf);
        let model = model_config_from(&text, &path)?;
        let mut family = match families::find(&model.architecture, &tables) {
            Ok(f) => f,
            // An exporter that knows the architecture when no table does (TensorRT-LLM's
            // Qwen2-MoE): its own names are checked, these are not — said, not silent.
            Err(e) if self.direction == Direction::CheckHf => {
                eprintln!(
                    "note: {}: {}; the HF tensors go to the exporter unchecked against the config",
                    path.display(),
                    e.message
                );
                return Ok(input.clone());
            }
            Err(e) => {
                return Err(PluginError::unsupported(format!(
                    "{}: {}",
                    path.display(),
                    e.message
                )))
            }
        };
        family.add_verbatim(input.tensors.iter().map(|t| t.base_name()));
        self.model = Some(model);
        self.family = Some(family);
        match self.direction {
            Direction::ToMegatron => return self.plan_import(input, &hf, &text, &path),
            Direction::CheckHf => return self.plan_check(input, &path),
            Direction::ToHf => {}
        }
        let what = format!(
            "Megatron checkpoint {} does not fit {}",
            input
                .get(bridgeflow_sdk::attrs::CHECKPOINT_DIR)
                .map_or_else(|| "(input)".into(), |d| d.display().to_string()),
            path.display()
        );
        let mut plan = self.plan_to_hf(input, what)?;
        if derived {
            // Rebuilt from a run config: always an object.
            if let serde_json::Value::Object(hf) = hf {
                plan.set(bridgeflow_sdk::attrs::HF_CONFIG, hf);
            }
        }
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        match self.direction {
            Direction::ToMegatron => return self.process_to_megatron(t, out),
            Direction::CheckHf if self.dropped.contains(t.info.base_name()) => return Ok(()),
            Direction::CheckHf => return out.tensor(t),
            Direction::ToHf => {}
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
        self.partial_experts.check_complete()?;
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

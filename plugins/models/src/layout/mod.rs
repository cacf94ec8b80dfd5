//! Mapping layouts, one type each, in the manner of Megatron-Bridge's param mappings
//! (`AutoMapping`, `QKVMapping`, `GatedMLPMapping`, ...): a layout owns how one Megatron tensor
//! is made of its HF tensors, in both directions — the plan (which tensors, or pieces of them,
//! each side gets) and the bytes. The mapper finds a tensor's table row and hands the work to
//! the row's layout ([`of`]); the layouts share the row machinery of [`rows`].
//!
//! | kind | layout |
//! |---|---|
//! | `direct` | [`Direct`]: one tensor, renamed |
//! | `vocab` | [`Vocab`]: the vocabulary rows, padded on import and truncated on export |
//! | `qkv` | [`FusedQkv`]: q, k, v fused per query group |
//! | `gated-mlp` | [`GatedMlp`]: gate and up concatenated by rows |
//! | `experts-*` | [`ExpertBlocks`]: all experts in one HF tensor, reshuffled expert by expert |
//! | `mamba-in-proj`, `mamba-conv` | [`SplitRows`]: rows stored as one key per named block |

use bridgeflow_megatron::mapping::{Entry, Heads, Index, Kind, MambaDims};
use bridgeflow_sdk::{Emitter, Result, Tensor, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

mod direct;
mod experts;
mod gated;
mod qkv;
pub mod rows;
mod split;
mod vocab;

pub use direct::Direct;
pub use experts::{ExpertBlocks, PartialExperts};
pub use gated::GatedMlp;
pub use qkv::FusedQkv;
pub use split::SplitRows;
pub use vocab::Vocab;

/// What a layout needs of the model and of the run.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub heads: Heads,
    pub vocab: u64,
    /// The vocabulary padded for the run's TP degree (import).
    pub padded_vocab: u64,
    pub mamba: Option<MambaDims>,
    /// Rows moved as views, each piece with its place (see the mapper's `zero_copy`).
    pub zero_copy: bool,
}

/// One Megatron tensor to plan on import: its table row and the HF tensors it is made of.
pub struct Group<'a> {
    /// The table row and layer: the key of a tensor assembled whole.
    pub row: usize,
    pub layer: Option<u64>,
    pub entry: &'a Entry,
    /// The Megatron name.
    pub name: String,
    /// The expert count, when the tensor has a leading expert axis.
    pub experts: Option<u64>,
    /// The HF tensors by (expert, part), whole (all present).
    pub parts: &'a BTreeMap<(u64, usize), TensorInfo>,
    /// How each HF tensor arrives: the name and rows of each of its blocks (a whole tensor is
    /// its own single block).
    pub blocks: &'a HashMap<String, Vec<(String, Range<u64>)>>,
}

impl Group<'_> {
    /// The first part (expert 0, part 0).
    pub fn first(&self) -> &TensorInfo {
        &self.parts[&(0, 0)]
    }
    /// The blocks an HF tensor arrives in.
    pub fn blocks_of(&self, t: &TensorInfo) -> &[(String, Range<u64>)] {
        &self.blocks[t.name()]
    }
}

/// Where one run of an input tensor's rows goes.
#[derive(Debug, Clone)]
pub struct Piece {
    pub info: TensorInfo,
    /// Rows of the input it takes, or None for rows of zeros (vocabulary padding).
    pub rows: Option<Range<u64>>,
}

/// How the HF tensors become Megatron tensors as they arrive, as the import plan decided.
#[derive(Debug, Default)]
pub struct Routes {
    /// Each HF tensor (or block of one) as views of its rows: pieces of Megatron tensors.
    pub pieces: HashMap<String, Vec<Piece>>,
    /// Megatron tensors assembled whole once all their parts are in, by (table row, layer).
    pub whole: HashMap<(usize, Option<u64>), TensorInfo>,
    /// HF tensors (or blocks of whole experts of one) their layout turns into its Megatron
    /// tensor by itself, one at a time: the table row and the Megatron tensor.
    pub own: HashMap<String, (usize, TensorInfo)>,
}

/// The HF tensors of one Megatron tensor received so far, by (expert, part).
pub type Parts = HashMap<(u64, usize), Tensor>;

/// One mapping layout, both directions.
pub trait Layout: Sync {
    /// How many HF tensors a row of this layout names.
    fn parts(&self) -> usize {
        1
    }

    /// Whether Megatron → HF needs each expert whole (a reshuffle within the expert): blocks
    /// smaller than an expert are gathered first ([`PartialExperts`]).
    fn needs_whole_experts(&self) -> bool {
        false
    }

    /// The named row blocks stored as separate keys (`<name>.<block>`), in row order, if the
    /// layout stores its rows so (`name` names the tensor in messages).
    fn split_blocks(
        &self,
        _cx: &Geometry,
        _name: &str,
    ) -> Result<Option<Vec<(&'static str, u64)>>> {
        Ok(None)
    }

    /// HF → Megatron plan of one Megatron tensor: what it is written as (whole, or pieces with
    /// their places); `routes` learns how each HF tensor becomes that as it arrives.
    fn plan_to_megatron(
        &self,
        g: &Group,
        cx: &Geometry,
        routes: &mut Routes,
    ) -> Result<Vec<TensorInfo>>;

    /// HF → Megatron bytes of `target`, a tensor this layout planned: from all its parts (one
    /// assembled whole, [`Routes::whole`]) or from the one HF tensor routed to it
    /// ([`Routes::own`], part (0, 0)).
    fn to_megatron(
        &self,
        e: &Entry,
        cx: &Geometry,
        target: &TensorInfo,
        parts: Parts,
        out: &mut Emitter,
    ) -> Result<()>;

    /// Megatron → HF plan: the HF tensors a Megatron tensor (`t`, or a stored block of it, by
    /// its global shape) at table index `idx` becomes.
    fn plan_to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: &TensorInfo,
        cx: &Geometry,
    ) -> Result<Vec<TensorInfo>>;

    /// Megatron → HF: a Megatron tensor, or a stored block of it, as HF tensors or pieces.
    fn to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: Tensor,
        cx: &Geometry,
        out: &mut Emitter,
    ) -> Result<()>;
}

/// The layout of a table row's kind.
pub fn of(kind: Kind) -> &'static dyn Layout {
    match kind {
        Kind::Direct => &Direct,
        Kind::Vocab => &Vocab,
        Kind::Qkv => &FusedQkv,
        Kind::GatedMlp => &GatedMlp,
        Kind::ExpertsGateUpInterleavedT => &ExpertBlocks(Kind::ExpertsGateUpInterleavedT),
        Kind::ExpertsGateUpInterleaved => &ExpertBlocks(Kind::ExpertsGateUpInterleaved),
        Kind::ExpertsTransposed => &ExpertBlocks(Kind::ExpertsTransposed),
        Kind::MambaInProj => &SplitRows(Kind::MambaInProj),
        Kind::MambaConv => &SplitRows(Kind::MambaConv),
    }
}

/// `first` followed by `rest`.
pub fn with_first(first: u64, rest: &[u64]) -> Vec<u64> {
    std::iter::once(first).chain(rest.iter().copied()).collect()
}

/// Bytes of one row (the first axis) of a tensor of `shape`.
pub fn row_bytes(shape: &[u64], dtype: bridgeflow_sdk::DType) -> u64 {
    shape.iter().skip(1).product::<u64>() * dtype.size() as u64
}

/// A table row's HF name at a layer and (for per-expert rows) an expert.
pub fn hf_name(e: &Entry, part: usize, layer: Option<u64>, expert: Option<u64>) -> String {
    bridgeflow_megatron::mapping::fill(&e.hf[part], Index { layer, expert })
}

/// The global shape of a tensor or of the tensor a piece is of.
pub fn global_shape(t: &TensorInfo) -> Vec<u64> {
    t.shard()
        .map_or(t.shape.to_vec(), |s| s.global_shape.to_vec())
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the layouts' tests share: a geometry, tensors of counting bytes, and a collector.
    use super::*;
    use bridgeflow_sdk::{Buffer, DType, Item};

    pub fn geometry() -> Geometry {
        Geometry {
            heads: Heads {
                heads: 4,
                groups: 2,
                head_dim: 1,
            },
            vocab: 5,
            padded_vocab: 8,
            mamba: Some(MambaDims {
                inner: 2,
                bc: 1,
                heads: 1,
            }),
            zero_copy: true,
        }
    }

    /// A U8 tensor whose bytes are `start`, `start + 1`, ...
    pub fn tensor(name: &str, shape: &[u64], start: u8) -> Tensor {
        let info = TensorInfo::new(name, DType::U8, shape);
        let n = info.nbytes().unwrap() as usize;
        let bytes = (0..n).map(|i| start.wrapping_add(i as u8)).collect();
        Tensor::new(info, Buffer::from_vec(bytes)).unwrap()
    }

    /// What a layout emits, or its error.
    pub fn try_collect(body: impl FnOnce(&mut Emitter) -> Result<()>) -> Result<Vec<Tensor>> {
        let mut got = Vec::new();
        let mut f = |item: Item| -> Result<()> {
            got.push(item.into_tensor()?);
            Ok(())
        };
        Emitter::scoped(&mut f, None, body)?;
        Ok(got)
    }

    /// What a layout emits.
    pub fn collect(body: impl FnOnce(&mut Emitter) -> Result<()>) -> Vec<Tensor> {
        try_collect(body).unwrap()
    }

    /// The bytes of (possibly pieced) tensors placed into whole ones, by base name.
    pub fn placed(got: &[Tensor]) -> BTreeMap<String, Vec<u8>> {
        let mut whole: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for t in got {
            let global = global_shape(&t.info);
            let total: u64 = global.iter().product();
            let buf = whole
                .entry(t.info.base_name().to_string())
                .or_insert_with(|| vec![0xee; total as usize]);
            let at = t
                .info
                .shard()
                .map_or(vec![0; global.len()], |s| s.offsets.to_vec());
            // Row-major placement of a block at `at` (U8 elements).
            let shape = &t.info.shape;
            let n: u64 = shape.iter().product();
            for i in 0..n {
                let (mut rem, mut flat, mut stride) = (i, 0u64, 1u64);
                let mut idx = vec![0u64; shape.len()];
                for d in (0..shape.len()).rev() {
                    idx[d] = rem % shape[d];
                    rem /= shape[d];
                }
                for d in (0..shape.len()).rev() {
                    flat += (idx[d] + at[d]) * stride;
                    stride *= global[d];
                }
                buf[flat as usize] = t.bytes()[i as usize];
            }
        }
        whole
    }

    /// A one-group import plan of `entry` from whole HF tensors `parts`.
    pub fn plan_import(
        layout: &dyn Layout,
        entry: &Entry,
        parts: &[TensorInfo],
        experts: Option<u64>,
        cx: &Geometry,
    ) -> Result<(Vec<TensorInfo>, Routes)> {
        let p = entry.hf.len();
        let map: BTreeMap<(u64, usize), TensorInfo> = parts
            .iter()
            .enumerate()
            .map(|(i, t)| (((i / p) as u64, i % p), t.clone()))
            .collect();
        let blocks = parts
            .iter()
            .map(|t| {
                let rows = 0..t.shape.first().copied().unwrap_or(1);
                (t.name().to_string(), vec![(t.name().to_string(), rows)])
            })
            .collect();
        let g = Group {
            row: 0,
            layer: Some(0),
            entry,
            name: bridgeflow_megatron::mapping::fill(
                &entry.megatron,
                Index {
                    layer: Some(0),
                    expert: None,
                },
            ),
            experts,
            parts: &map,
            blocks: &blocks,
        };
        let mut routes = Routes::default();
        let out = layout.plan_to_megatron(&g, cx, &mut routes)?;
        Ok((out, routes))
    }

    /// Runs an import plan on whole HF tensors: what the mapper does with its routes.
    pub fn run_import(
        layout: &dyn Layout,
        entry: &Entry,
        routes: &Routes,
        inputs: Vec<((u64, usize), Tensor)>,
        cx: &Geometry,
    ) -> Vec<Tensor> {
        collect(|out| {
            let mut whole = Parts::new();
            for (key, t) in inputs {
                if let Some((_, target)) = routes.own.get(t.name()) {
                    layout.to_megatron(entry, cx, target, Parts::from([((0, 0), t)]), out)?;
                } else if let Some(pieces) = routes.pieces.get(t.name()) {
                    let row = row_bytes(&t.info.shape, t.info.dtype);
                    for pc in pieces {
                        let data = match &pc.rows {
                            Some(r) => t
                                .data
                                .slice((r.start * row) as usize..(r.end * row) as usize),
                            None => Buffer::from_vec(vec![0; pc.info.nbytes().unwrap() as usize]),
                        };
                        out.tensor(Tensor::new(pc.info.clone(), data)?)?;
                    }
                } else {
                    whole.insert(key, t);
                }
            }
            if let Some(target) = routes.whole.values().next() {
                layout.to_megatron(entry, cx, target, whole, out)?;
            }
            Ok(())
        })
    }
}

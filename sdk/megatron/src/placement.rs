//! Where things go, as pure functions of the layout: which pipeline stage and virtual chunk a
//! layer is on, which expert-parallel rank and local index an expert has, and which slice of
//! which tensor goes to which tensor-parallel rank and file — for Megatron-LM's rank files
//! ([`LegacyLayout`]) and for torch_dist's chunks ([`dist_chunks`]). The writers only write
//! what these say; the Megatron-LM reader reads rank files back with their inverses.

use crate::blocks::{box_intersection, box_runs};
use crate::degree::MAX_DEGREE;
use crate::names;
use crate::tp::{tp_boxes, tp_local_shape, tp_runs, tp_split, TpSplit};
use bridgeflow_sdk::{PluginError, Result};

/// Byte runs (offset, length) of a tensor, in the order a share of it is stored.
pub type Runs = Vec<(u64, u64)>;

// ----------------------------------------------------------------------------------- pipeline

/// The first layer of each pipeline stage and the layer count of each: an even split, or
/// `first`/`last` layers on the first/last stage and the rest even (Megatron's
/// `num_layers_in_first_pipeline_stage` / `_last_`).
pub fn pp_layers(
    layers: u64,
    pp: u64,
    first: Option<u64>,
    last: Option<u64>,
) -> Result<Vec<(u64, u64)>> {
    let pp = pp.max(1);
    if pp > MAX_DEGREE {
        return Err(PluginError::config(format!(
            "{pp} pipeline stages: at most {MAX_DEGREE}"
        )));
    }
    let mut counts = vec![0u64; pp as usize];
    let (mut rest, mut lo, mut hi) = (layers, 0usize, pp as usize);
    if let Some(f) = first.filter(|_| pp > 1) {
        counts[0] = f;
        rest = rest
            .checked_sub(f)
            .ok_or_else(|| PluginError::config("first stage has more layers than the model"))?;
        lo = 1;
    }
    if let Some(l) = last.filter(|_| pp > 1) {
        counts[pp as usize - 1] = l;
        rest = rest
            .checked_sub(l)
            .ok_or_else(|| PluginError::config("last stage has more layers than the model"))?;
        hi -= 1;
    }
    let middle = (hi - lo) as u64;
    if middle == 0 && rest != 0 || middle > 0 && rest % middle != 0 {
        return Err(PluginError::config(format!(
            "{layers} layers do not divide evenly over {pp} pipeline stages"
        )));
    }
    if layers > 0 && middle > 0 && rest < middle {
        return Err(PluginError::config(format!(
            "{pp} pipeline stages for {layers} layers: {} of them would hold no layer",
            middle - rest
        )));
    }
    for c in &mut counts[lo..hi] {
        *c = rest / middle.max(1);
    }
    let mut start = 0;
    Ok(counts
        .into_iter()
        .map(|c| {
            let s = start;
            start += c;
            (s, c)
        })
        .collect())
}

/// One block of layers (first, count) per pipeline chunk, in model order, for `pp` stages of
/// `vpp` virtual chunks each (chunk v of stage s is the model's (v·pp + s)-th block; see
/// [`chunk_index`]). Refuses more chunks than layers, and uneven first/last stages with
/// virtual chunks.
pub fn chunk_layers(
    layers: u64,
    pp: u64,
    vpp: u64,
    first: Option<u64>,
    last: Option<u64>,
) -> Result<Vec<(u64, u64)>> {
    if layers > 0 && pp * vpp > layers {
        return Err(PluginError::config(format!(
            "pp = {pp}, vpp = {vpp}: {} pipeline chunks for {layers} layers",
            pp * vpp
        )));
    }
    if vpp > 1 && (first.is_some() || last.is_some()) {
        return Err(PluginError::config(
            "uneven first/last stages with virtual pipeline chunks are not supported",
        ));
    }
    pp_layers(layers, pp * vpp, first, last)
}

/// The model-order index of virtual chunk `v` of stage `stage` among `pp` stages.
pub fn chunk_index(stage: u64, v: u64, pp: u64) -> usize {
    (v * pp + stage) as usize
}

/// The chunk (index into `chunks`, as [`chunk_layers`] gives them) that holds layer `l`, and
/// the layer's index in it.
pub fn chunk_of_layer(chunks: &[(u64, u64)], l: u64) -> Option<(usize, u64)> {
    chunks
        .iter()
        .position(|&(first, n)| l >= first && l < first + n)
        .map(|c| (c, l - chunks[c].0))
}

/// The pipeline stage that holds a torch_dist tensor: its layer's stage (a layer beyond every
/// stage: the last), else the first stage for the embedding (and a VLM's vision tower), the
/// last for the rest (output layer, final norm, multi-token-prediction layers).
pub fn pipeline_stage(name: &str, stages: &[(u64, u64)]) -> u64 {
    let last = stages.len().saturating_sub(1) as u64;
    if let Some((_, l, _)) = names::layer_split(name) {
        return chunk_of_layer(stages, l).map_or(last, |(s, _)| s as u64);
    }
    let module = names::without_language_model(name);
    if names::is_embedding(module) || name.starts_with(names::VISION) {
        0
    } else {
        last
    }
}

/// Whether Megatron-LM's model chunk `c` (of which `last` is the last) holds the non-layer
/// tensor `name`: the word embedding the first (and with `tied` output weights the last as
/// well), the rest of the embedding the first, the output layer and final norm the last.
pub fn holds_global(name: &str, c: usize, last: usize, tied: bool) -> bool {
    match name {
        names::WORD_EMBEDDINGS => c == 0 || (tied && c == last),
        _ if names::is_embedding(name) => c == 0,
        _ => c == last,
    }
}

/// Which end of the pipeline a Megatron-LM non-layer key found in chunk `c` (of which `last`
/// is the last) belongs to, if that is not where it is: `first` for the embedding (allowed on
/// the last chunk too, a tied copy), `last` for the output layer and final norm.
pub fn misplaced(key: &str, c: usize, last: usize) -> Option<&'static str> {
    let pre = names::is_embedding(key);
    let post = names::is_output(key);
    if pre && c != 0 && c != last {
        return Some("first");
    }
    (post && c != last).then_some("last")
}

// ------------------------------------------------------------------------------------ experts

/// Experts per expert-parallel rank (`experts` split evenly over `ep`), if they divide.
pub fn experts_per_rank(experts: u64, ep: u64) -> Option<u64> {
    (ep > 0 && experts.is_multiple_of(ep)).then(|| experts / ep)
}

/// The global index of local expert `i` on expert-parallel rank `k` (`per` experts a rank):
/// rank k holds experts [k·per, (k+1)·per).
pub fn global_expert(k: u64, i: u64, per: u64) -> u64 {
    k * per + i
}

/// (expert-parallel rank, local index) of global expert `g`.
pub fn expert_place(g: u64, per: u64) -> (u64, u64) {
    (g / per, g % per)
}

/// The byte runs of global expert `g`'s share, for expert-TP rank `etp_rank` of `etp`, in a
/// tensor of experts stacked on a leading axis, each of shape `one` (`es` bytes an element).
/// None when the place overflows.
pub fn expert_runs(
    one: &[u64],
    es: u64,
    split: TpSplit,
    etp: u64,
    etp_rank: u64,
    g: u64,
) -> Result<Option<Runs>> {
    let Some(base) = one
        .iter()
        .try_fold(es, |a, &d| a.checked_mul(d))
        .and_then(|bytes| g.checked_mul(bytes))
    else {
        return Ok(None);
    };
    Ok(Some(
        tp_runs(one, es, split, etp, etp_rank)?
            .into_iter()
            .map(|(o, n)| (base + o, n))
            .collect(),
    ))
}

// -------------------------------------------------------------------------------- Megatron-LM

/// A Megatron-LM layout: the degrees and the choices that decide each rank file's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyLayout {
    pub tp: u64,
    pub pp: u64,
    pub vpp: u64,
    pub ep: u64,
    /// Expert tensor parallelism: 1 (experts whole on every TP rank) or `tp`.
    pub etp: u64,
    /// One block of layers per chunk ([`chunk_layers`]).
    pub chunks: Vec<(u64, u64)>,
    /// SwiGLU MLPs (`linear_fc1` is [gate; up]).
    pub gated: bool,
    /// The local spec's names (else TE's).
    pub local_spec: bool,
    /// The output layer is the embedding (kept on the last chunk as well).
    pub tied: bool,
}

/// A global tensor to place: name, shape and bytes per element.
#[derive(Debug, Clone, Copy)]
pub struct GlobalTensor<'a> {
    pub name: &'a str,
    pub shape: &'a [u64],
    pub es: u64,
}

/// One local tensor of a rank file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTensor {
    /// Its model chunk (virtual pipeline chunk) in the rank file.
    pub chunk: usize,
    /// Its key in that chunk's state dict.
    pub key: String,
    /// Which global tensor it is cut from (an index into the tensors placed).
    pub global: usize,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The byte runs of the global tensor it is made of, in order.
    pub runs: Runs,
}

impl LegacyLayout {
    /// The index of the model's last chunk.
    pub fn last_chunk(&self) -> usize {
        (self.pp * self.vpp - 1) as usize
    }

    /// Every rank file's place (TP rank, stage, EP rank), stage by stage, then EP rank, then
    /// TP rank (the order the rank files are written and read in).
    pub fn ranks(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        (0..self.pp)
            .flat_map(move |s| (0..self.ep).flat_map(move |k| (0..self.tp).map(move |r| (r, s, k))))
    }

    /// The key of global tensor `name` in chunk `c`, if that chunk holds it: its layer
    /// renumbered from the chunk's first (and named as the spec names it), or itself.
    pub fn local_key(&self, name: &str, c: usize) -> Option<String> {
        match names::split_layer(name) {
            Some((l, param)) => {
                let (first, count) = self.chunks[c];
                if l < first || l >= first + count {
                    return None;
                }
                let param = if self.local_spec {
                    names::local_spec_name(param)
                } else {
                    param
                };
                Some(names::layer_key(l - first, param))
            }
            None => holds_global(name, c, self.last_chunk(), self.tied).then(|| name.to_string()),
        }
    }

    /// The local tensors of rank file (TP rank `r`, stage `s`, EP rank `k`), chunk by chunk, in
    /// the order of `tensors`: each tensor of the chunk's layers, or of the chunk's end of the
    /// pipeline, cut by its TP split; stacked experts as this EP rank's local experts, each
    /// cut for its expert-TP rank. Dense tensors repeat on every EP rank.
    pub fn rank_tensors(
        &self,
        tensors: &[GlobalTensor],
        r: u64,
        s: u64,
        k: u64,
    ) -> Result<Vec<LocalTensor>> {
        let mut locals = Vec::new();
        for v in 0..self.vpp as usize {
            let c = chunk_index(s, v as u64, self.pp);
            for (global, t) in tensors.iter().enumerate() {
                let Some(key) = self.local_key(t.name, c) else {
                    continue;
                };
                let split = tp_split(t.name, self.gated);
                if names::has_stacked_experts(t.name) {
                    self.push_experts(&mut locals, (v, key, global), t, split, r, k)?;
                    continue;
                }
                let runs =
                    tp_runs(t.shape, t.es, split, self.tp, r).map_err(|e| e.context(t.name))?;
                let shape = tp_local_shape(t.shape, split, self.tp);
                locals.push(LocalTensor {
                    chunk: v,
                    key,
                    global,
                    shape,
                    runs,
                });
            }
        }
        Ok(locals)
    }

    /// EP rank `k`'s experts of a stacked-experts tensor, each cut for TP rank `r`'s
    /// expert-TP rank, as local experts under Megatron-LM's keys.
    fn push_experts(
        &self,
        locals: &mut Vec<LocalTensor>,
        (chunk, key, global): (usize, String, usize),
        t: &GlobalTensor,
        split: TpSplit,
        r: u64,
        k: u64,
    ) -> Result<()> {
        let per = t.shape[0] / self.ep;
        let one = &t.shape[1..];
        let etp_rank = if self.etp == 1 { 0 } else { r };
        for i in 0..per {
            let g = global_expert(k, i, per);
            let runs = expert_runs(one, t.es, split, self.etp, etp_rank, g)
                .map_err(|e| e.context(t.name))?
                .ok_or_else(|| PluginError::shape(format!("'{}': size overflows", t.name)))?;
            locals.push(LocalTensor {
                chunk,
                key: names::legacy_expert_key(&key, i, self.local_spec),
                global,
                shape: tp_local_shape(one, split, self.etp),
                runs,
            });
        }
        Ok(())
    }
}

/// The global name of a Megatron-LM rank file's (non-expert) key in a chunk whose first layer
/// is `first_layer`: its layer renumbered, a local-spec norm renamed to TE's where the layer
/// holds the linear TE fuses it into (`has(l, param)`: whether local layer `l` holds `param`).
pub fn legacy_global_name(key: &str, first_layer: u64, has: impl Fn(u64, &str) -> bool) -> String {
    match names::split_layer(key) {
        Some((l, param)) => names::layer_key(l + first_layer, names::te_name(param, |p| has(l, p))),
        None => key.to_string(),
    }
}

/// The global stacked-experts tensor a Megatron-LM local expert of local layer `l` belongs to
/// (`grouped_param`: its module's layer parameter, `mlp.experts.linear_fcN`).
pub fn legacy_expert_name(l: u64, grouped_param: &str, first_layer: u64) -> String {
    names::layer_key(
        l + first_layer,
        &names::stacked_expert_weight(grouped_param),
    )
}

// ---------------------------------------------------------------------------------- torch_dist

/// The key and place of a torch_dist input: a per-layer tensor `<stack><l>.<param>` (or a
/// piece of one) stacked as `<stack><param>` with a leading layer axis of `stack_layers`
/// layers, when given; else itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistPlace {
    pub key: String,
    /// The key's global shape, offsets of the input in it, and the input's shape.
    pub global: Vec<u64>,
    pub offsets: Vec<u64>,
    pub local: Vec<u64>,
    /// Whether the key has the leading layer axis.
    pub stacked: bool,
}

/// Where an input (`name`, `shape`, and its place `offsets` in a tensor of `global` shape)
/// goes in a torch_dist checkpoint (see [`DistPlace`]).
pub fn dist_place(
    name: &str,
    global: Vec<u64>,
    offsets: Vec<u64>,
    shape: Vec<u64>,
    stack_layers: Option<u64>,
) -> DistPlace {
    match (names::layer_split(name), stack_layers) {
        (Some((stack, l, param)), Some(n)) => {
            let prepend = |first: u64, v: &[u64]| {
                std::iter::once(first)
                    .chain(v.iter().copied())
                    .collect::<Vec<_>>()
            };
            DistPlace {
                key: names::stacked_key(stack, param),
                global: prepend(n, &global),
                offsets: prepend(l, &offsets),
                local: prepend(1, &shape),
                stacked: true,
            }
        }
        _ => DistPlace {
            key: name.to_string(),
            global,
            offsets,
            local: shape,
            stacked: false,
        },
    }
}

/// One torch_dist chunk an input becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistChunk {
    /// The TP rank that holds it.
    pub tp_rank: u64,
    /// Its offsets and shape in the key's global tensor.
    pub offsets: Vec<u64>,
    pub shape: Vec<u64>,
    /// The byte runs of the input that make it.
    pub runs: Runs,
}

/// The chunks an input placed at `p` is cut into for `tp` ranks under `split` (`es` bytes an
/// element): megatron-core's TP chunks, in per-layer coordinates (without a stacked layer
/// axis), stacked experts split inside each expert (expert-TP = TP); replicated tensors once,
/// by rank 0. One chunk, the input itself, with one rank.
pub fn dist_chunks(
    p: &DistPlace,
    es: u64,
    experts: bool,
    split: TpSplit,
    tp: u64,
) -> Vec<DistChunk> {
    if tp == 1 {
        let n = p.local.iter().product::<u64>() * es;
        return vec![DistChunk {
            tp_rank: 0,
            offsets: p.offsets.clone(),
            shape: p.local.clone(),
            runs: vec![(0, n)],
        }];
    }
    let lead = p.stacked as usize;
    let (g, o, l) = (&p.global[lead..], &p.offsets[lead..], &p.local[lead..]);
    let expert = experts as usize;
    let mut out = Vec::new();
    for r in 0..tp {
        for (bo, bs) in tp_boxes(&g[expert..], split, tp, r) {
            let bo: Vec<u64> = o[..expert].iter().map(|_| 0).chain(bo).collect();
            let bs: Vec<u64> = g[..expert].iter().copied().chain(bs).collect();
            let Some((io, is)) = box_intersection((o, l), (&bo, &bs)) else {
                continue;
            };
            let rel: Vec<u64> = io.iter().zip(o).map(|(a, b)| a - b).collect();
            let runs = box_runs(l, es, &rel, &is);
            out.push(DistChunk {
                tp_rank: r,
                offsets: p.offsets[..lead].iter().copied().chain(io).collect(),
                shape: p.local[..lead].iter().copied().chain(is).collect(),
                runs,
            });
        }
    }
    out
}

/// The global rank of TP rank `tp_rank` on pipeline stage `stage` (megatron-core's numbering
/// without data parallelism: tp_rank + tp · stage).
pub fn dist_rank(tp_rank: u64, stage: u64, tp: u64) -> u64 {
    tp_rank + tp * stage
}

/// The data file (an index into `filled`, the bytes laid out in each) that takes rank
/// `rank`'s next item: the emptiest of its `per_rank` files (rank r's are r·per_rank ..
/// (r+1)·per_rank), so that they fill evenly.
pub fn dist_file(filled: &[u64], rank: u64, per_rank: usize) -> usize {
    let base = rank as usize * per_rank;
    (base..base + per_rank)
        .min_by_key(|&i| filled[i])
        .unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tp::global_shape_of;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn pipeline_stages() {
        assert_eq!(pp_layers(8, 2, None, None).unwrap(), vec![(0, 4), (4, 4)]);
        assert_eq!(
            pp_layers(7, 3, Some(1), None).unwrap(),
            vec![(0, 1), (1, 3), (4, 3)]
        );
        assert!(pp_layers(7, 2, None, None).is_err());
        assert_eq!(pp_layers(5, 1, None, None).unwrap(), vec![(0, 5)]);
        // Nothing is sized from an unchecked count.
        let e = pp_layers(8, 1 << 32, None, None).unwrap_err();
        assert!(e.message.contains("at most 65536"), "{e}");
        let e = pp_layers(4, 1000, Some(2), Some(2)).unwrap_err();
        assert!(e.message.contains("would hold no layer"), "{e}");
        assert_eq!(pp_layers(0, 2, None, None).unwrap(), vec![(0, 0), (0, 0)]);
        // Virtual chunks: chunk v of stage s is the (v·pp + s)-th block.
        let chunks = chunk_layers(8, 2, 2, None, None).unwrap();
        assert_eq!(chunks, vec![(0, 2), (2, 2), (4, 2), (6, 2)]);
        assert_eq!(chunk_index(1, 1, 2), 3);
        assert_eq!(chunk_of_layer(&chunks, 5), Some((2, 1)));
        assert_eq!(chunk_of_layer(&chunks, 8), None);
        let e = chunk_layers(3, 2, 2, None, None).unwrap_err();
        assert_eq!(
            e.message.as_str(),
            "pp = 2, vpp = 2: 4 pipeline chunks for 3 layers"
        );
        let e = chunk_layers(8, 2, 2, Some(2), None).unwrap_err();
        assert!(e.message.contains("uneven first/last stages"), "{e}");
        // torch_dist stages by name.
        let stages = [(0, 2), (2, 2)];
        assert_eq!(pipeline_stage("decoder.layers.3.mlp.w", &stages), 1);
        assert_eq!(pipeline_stage("decoder.layers.9.mlp.w", &stages), 1);
        assert_eq!(pipeline_stage(names::WORD_EMBEDDINGS, &stages), 0);
        assert_eq!(
            pipeline_stage(&names::in_language_model(names::WORD_EMBEDDINGS), &stages),
            0
        );
        assert_eq!(pipeline_stage("visual.blocks.0.w", &stages), 0);
        assert_eq!(pipeline_stage(names::OUTPUT_LAYER, &stages), 1);
        assert_eq!(pipeline_stage("mtp.layers.0.enorm.weight", &stages), 1);
        // Megatron-LM chunk ends.
        assert!(holds_global(names::WORD_EMBEDDINGS, 3, 3, true));
        assert!(!holds_global(names::WORD_EMBEDDINGS, 3, 3, false));
        assert!(!holds_global(
            "embedding.position_embeddings.weight",
            3,
            3,
            true
        ));
        assert!(holds_global(names::FINAL_LAYERNORM, 3, 3, false));
        assert_eq!(misplaced(names::WORD_EMBEDDINGS, 1, 3), Some("first"));
        assert_eq!(misplaced(names::WORD_EMBEDDINGS, 3, 3), None);
        assert_eq!(misplaced(names::OUTPUT_LAYER, 0, 3), Some("last"));
        assert_eq!(misplaced(names::OUTPUT_LAYER, 3, 3), None);
    }

    #[test]
    fn experts_over_ranks() {
        assert_eq!(experts_per_rank(8, 2), Some(4));
        assert_eq!(experts_per_rank(6, 4), None);
        assert_eq!(experts_per_rank(6, 0), None);
        for g in 0..8 {
            let (k, i) = expert_place(g, 4);
            assert_eq!(global_expert(k, i, 4), g);
        }
        // Expert 1 of [2, 4, 3] bytes, the second half of its rows (row-parallel: columns).
        assert_eq!(
            expert_runs(&[4, 3], 1, TpSplit::Axis(0), 2, 1, 1).unwrap(),
            Some(vec![(12 + 6, 6)])
        );
        assert_eq!(
            expert_runs(&[u64::MAX, 3], 1, TpSplit::Replicated, 1, 0, 1).unwrap(),
            None
        );
    }

    /// A small GPT of 4 layers, the first `dense` dense and the rest MoE (4 experts), as global
    /// tensors.
    fn model(tied: bool, dense: u64) -> Vec<(String, Vec<u64>)> {
        let mut t = vec![
            (names::WORD_EMBEDDINGS.to_string(), vec![16, 8]),
            (names::FINAL_LAYERNORM.to_string(), vec![8]),
        ];
        if !tied {
            t.push((names::OUTPUT_LAYER.to_string(), vec![16, 8]));
        }
        for l in 0..4 {
            let mut rows = vec![
                (
                    "self_attention.linear_qkv.layer_norm_weight".to_string(),
                    vec![8],
                ),
                ("self_attention.linear_qkv.weight".to_string(), vec![24, 8]),
                ("self_attention.linear_proj.weight".to_string(), vec![8, 8]),
            ];
            if l < dense {
                rows.extend([
                    ("mlp.linear_fc1.layer_norm_weight".to_string(), vec![8]),
                    ("mlp.linear_fc1.weight".to_string(), vec![16, 8]),
                    ("mlp.linear_fc2.weight".to_string(), vec![8, 8]),
                ]);
            } else {
                rows.extend([
                    ("pre_mlp_layernorm.weight".to_string(), vec![8]),
                    ("mlp.router.weight".to_string(), vec![4, 8]),
                    (names::experts_param("linear_fc1.weight"), vec![4, 16, 8]),
                    (names::experts_param("linear_fc2.weight"), vec![4, 8, 8]),
                ]);
            }
            t.extend(rows.into_iter().map(|(p, s)| (names::layer_key(l, &p), s)));
        }
        t
    }

    /// Runs that tile [0, total) exactly: no gap, no overlap.
    fn assert_tiles(name: &str, mut runs: Vec<(u64, u64)>, total: u64, what: &str) {
        runs.sort_unstable();
        let mut pos = 0;
        for (o, n) in runs {
            assert_eq!(o, pos, "{name} ({what}): a gap or an overlap at {o}");
            pos += n;
        }
        assert_eq!(pos, total, "{name} ({what}): covers {pos} of {total} bytes");
    }

    /// Every rank file of every layout: each layer in exactly one chunk, each expert on one
    /// EP rank, the shares of each tensor tiling it, and every local tensor read back (its
    /// global name, shape and runs from its key and local shape alone).
    #[test]
    fn legacy_layouts_place_everything_once() {
        let es = 2;
        for (tp, pp, vpp, ep, local_spec, tied) in (0..64).map(|i| {
            (
                [1, 2, 4][i % 3],
                [1, 2][i / 3 % 2],
                [1, 2][i / 6 % 2],
                [1, 2][i / 12 % 2],
                i / 24 % 2 == 1,
                i / 48 % 2 == 1,
            )
        }) {
            for etp in BTreeSet::from([1, tp]) {
                let what = format!(
                    "tp {tp} pp {pp} vpp {vpp} ep {ep} etp {etp} local {local_spec} tied {tied}"
                );
                let tensors = model(tied, 2);
                let globals: Vec<GlobalTensor> = tensors
                    .iter()
                    .map(|(n, s)| GlobalTensor {
                        name: n,
                        shape: s,
                        es,
                    })
                    .collect();
                let layout = LegacyLayout {
                    tp,
                    pp,
                    vpp,
                    ep,
                    etp,
                    chunks: chunk_layers(4, pp, vpp, None, None).unwrap(),
                    gated: true,
                    local_spec,
                    tied,
                };
                check_legacy_layout(&layout, &globals, &what);
            }
        }
    }

    fn check_legacy_layout(layout: &LegacyLayout, globals: &[GlobalTensor], what: &str) {
        let mut shards: BTreeMap<usize, Vec<Runs>> = BTreeMap::new();
        let mut layer_chunks: BTreeMap<u64, BTreeSet<(u64, usize)>> = BTreeMap::new();
        assert_eq!(
            layout.ranks().count() as u64,
            layout.tp * layout.pp * layout.ep
        );
        for (r, s, k) in layout.ranks() {
            let locals = layout.rank_tensors(globals, r, s, k).unwrap();
            let keys: BTreeSet<(usize, &str)> =
                locals.iter().map(|l| (l.chunk, l.key.as_str())).collect();
            assert_eq!(keys.len(), locals.len(), "{what}: a key twice");
            for l in &locals {
                let t = &globals[l.global];
                let c = chunk_index(s, l.chunk as u64, layout.pp);
                let first = layout.chunks[c].0;
                let bytes: u64 = l.runs.iter().map(|x| x.1).sum();
                assert_eq!(
                    bytes,
                    l.shape.iter().product::<u64>() * t.es,
                    "{what}: {}",
                    l.key
                );
                if let Some((layer, _)) = names::split_layer(t.name) {
                    layer_chunks.entry(layer).or_default().insert((s, l.chunk));
                }
                let split = tp_split(t.name, layout.gated);
                // Read back from the key and the local shape.
                let (name, runs, keep) = match names::legacy_local_expert(&l.key) {
                    Some((module, i)) => {
                        let (ll, param) = names::split_layer(&module).unwrap();
                        let name = legacy_expert_name(ll, param, first);
                        let one = global_shape_of(&l.shape, split, layout.etp).unwrap();
                        assert_eq!(one, &t.shape[1..], "{what}: {}", l.key);
                        let per = experts_per_rank(t.shape[0], layout.ep).unwrap();
                        let g = global_expert(k, i, per);
                        let etp_rank = if layout.etp == 1 { 0 } else { r };
                        let runs = expert_runs(&one, t.es, split, layout.etp, etp_rank, g)
                            .unwrap()
                            .unwrap();
                        (name, runs, layout.etp > 1 || r == 0)
                    }
                    None => {
                        let has = |ll: u64, p: &str| {
                            keys.contains(&(l.chunk, names::layer_key(ll, p).as_str()))
                        };
                        let name = legacy_global_name(&l.key, first, has);
                        let shape = global_shape_of(&l.shape, split, layout.tp).unwrap();
                        assert_eq!(shape, t.shape, "{what}: {}", l.key);
                        let runs = tp_runs(&shape, t.es, split, layout.tp, r).unwrap();
                        (
                            name,
                            runs,
                            k == 0 && (split != TpSplit::Replicated || r == 0),
                        )
                    }
                };
                assert_eq!(name, t.name, "{what}: {} read back", l.key);
                assert_eq!(runs, l.runs, "{what}: {} read back", l.key);
                // Kept as the reader keeps them: a tied embedding's copy on the last chunk
                // (the same runs) once.
                let held = shards.entry(l.global).or_default();
                if keep && !(names::split_layer(t.name).is_none() && held.contains(&runs)) {
                    held.push(runs);
                }
            }
        }
        for (l, chunks) in &layer_chunks {
            assert_eq!(chunks.len(), 1, "{what}: layer {l} in chunks {chunks:?}");
        }
        assert_eq!(layer_chunks.len(), 4, "{what}: layers placed");
        for (i, t) in globals.iter().enumerate() {
            let runs = shards.remove(&i).unwrap_or_default().concat();
            let total = t.shape.iter().product::<u64>() * t.es;
            assert_tiles(t.name, runs, total, what);
        }
    }

    /// torch_dist chunks for every TP × PP layout, inputs whole or in pieces (SwiGLU halves,
    /// single experts): each key's chunks tile its global tensor, every element of a chunk is
    /// the global element at its place, and each chunk lies in its TP rank's share.
    #[test]
    fn dist_chunks_tile_every_key() {
        for (tp, pp, pieces, stack) in (0..24).map(|i| {
            (
                [1, 2, 4][i % 3],
                [1, 2][i / 3 % 2],
                i / 6 % 2 == 1,
                i / 12 == 1,
            )
        }) {
            let what = format!("tp {tp} pp {pp} pieces {pieces} stacked {stack}");
            // Stacked: a homogeneous decoder (every layer MoE); else dense and MoE layers.
            let (dense, stack_layers) = if stack { (0, Some(4)) } else { (2, None) };
            let stages = pp_layers(4, pp, None, None).unwrap();
            // Element values: the flat index in the key's global tensor (4-byte elements).
            let mut covered: BTreeMap<String, (Vec<u64>, Vec<u32>)> = BTreeMap::new();
            let mut layer_stages: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
            for (name, shape) in model(false, dense) {
                for (offsets, local) in inputs(&name, &shape, pieces) {
                    let p = dist_place(&name, shape.clone(), offsets, local, stack_layers);
                    let split = tp_split(&name, true);
                    let experts = names::has_stacked_experts(&name);
                    let stage = pipeline_stage(&name, &stages);
                    if let Some((_, l, _)) = names::layer_split(&name) {
                        layer_stages.entry(l).or_default().insert(stage);
                    }
                    let input = values(&p.global, &p.offsets, &p.local);
                    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let entry = covered.entry(p.key.clone()).or_insert_with(|| {
                        let n = p.global.iter().product::<u64>() as usize;
                        (p.global.clone(), vec![0; n])
                    });
                    for c in dist_chunks(&p, 4, experts, split, tp) {
                        assert!(c.tp_rank < tp && dist_rank(c.tp_rank, stage, tp) < tp * pp);
                        let got: Vec<u32> = c
                            .runs
                            .iter()
                            .flat_map(|&(o, n)| bytes[o as usize..(o + n) as usize].to_vec())
                            .collect::<Vec<u8>>()
                            .chunks(4)
                            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                            .collect();
                        assert_eq!(
                            got,
                            values(&p.global, &c.offsets, &c.shape),
                            "{what}: {}",
                            p.key
                        );
                        if tp > 1 {
                            in_rank_share(&p, &c, split, experts, tp, &what);
                        }
                        for v in got {
                            entry.1[v as usize] += 1;
                        }
                    }
                }
            }
            for (key, (_, counts)) in &covered {
                assert!(
                    counts.iter().all(|&n| n == 1),
                    "{what}: {key} not covered once"
                );
            }
            assert!(
                layer_stages.values().all(|s| s.len() == 1),
                "{what}: {layer_stages:?}"
            );
        }
    }

    /// The inputs a tensor arrives as: whole, or (`pieces`) SwiGLU halves and single experts.
    fn inputs(name: &str, shape: &[u64], pieces: bool) -> Vec<(Vec<u64>, Vec<u64>)> {
        let zero = vec![0; shape.len()];
        if !pieces {
            return vec![(zero, shape.to_vec())];
        }
        if names::has_stacked_experts(name) {
            return (0..shape[0])
                .map(|e| {
                    let mut o = zero.clone();
                    o[0] = e;
                    let mut s = shape.to_vec();
                    s[0] = 1;
                    (o, s)
                })
                .collect();
        }
        if name.ends_with("linear_fc1.weight") {
            let half = shape[0] / 2;
            return [0, half]
                .into_iter()
                .map(|at| (vec![at, 0], vec![half, shape[1]]))
                .collect();
        }
        vec![(zero, shape.to_vec())]
    }

    /// The flat indices in a row-major tensor of `global` shape of the box (`offsets`, `shape`).
    fn values(global: &[u64], offsets: &[u64], shape: &[u64]) -> Vec<u32> {
        let n = shape.iter().product::<u64>();
        (0..n)
            .map(|mut i| {
                let mut flat = 0u64;
                let mut stride = 1u64;
                for d in (0..global.len()).rev() {
                    let x = offsets[d] + i % shape[d];
                    i /= shape[d];
                    flat += x * stride;
                    stride *= global[d];
                }
                flat as u32
            })
            .collect()
    }

    /// The chunk lies inside its TP rank's share of the (per-layer, per-expert) tensor.
    fn in_rank_share(
        p: &DistPlace,
        c: &DistChunk,
        split: TpSplit,
        experts: bool,
        tp: u64,
        what: &str,
    ) {
        let lead = p.stacked as usize + experts as usize;
        let (g, o, s) = (&p.global[lead..], &c.offsets[lead..], &c.shape[lead..]);
        let boxes = tp_boxes(g, split, tp, c.tp_rank);
        let inside = boxes
            .iter()
            .any(|(bo, bs)| (0..g.len()).all(|d| o[d] >= bo[d] && o[d] + s[d] <= bo[d] + bs[d]));
        assert!(
            inside,
            "{what}: {} chunk {:?} not rank {}'s",
            p.key, c.offsets, c.tp_rank
        );
    }

    #[test]
    fn stacked_places_and_files() {
        let p = dist_place(
            "decoder.layers.2.mlp.w",
            vec![4, 3],
            vec![2, 0],
            vec![2, 3],
            Some(5),
        );
        assert_eq!(p.key, "decoder.layers.mlp.w");
        assert_eq!(
            (p.global, p.offsets, p.local),
            (vec![5, 4, 3], vec![2, 2, 0], vec![1, 2, 3])
        );
        assert!(p.stacked);
        let p = dist_place("decoder.layers.2.mlp.w", vec![4], vec![0], vec![4], None);
        assert_eq!(
            (p.key.as_str(), p.stacked),
            ("decoder.layers.2.mlp.w", false)
        );
        assert_eq!(dist_file(&[5, 1, 9, 3], 1, 2), 3);
        assert_eq!(dist_file(&[5, 1, 9, 3], 0, 2), 1);
        assert_eq!(dist_rank(1, 2, 4), 9);
    }
}

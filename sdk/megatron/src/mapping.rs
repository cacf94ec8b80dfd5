//! Mapping primitives shared by model mappers (HF ⇄ Megatron), in the manner of
//! Megatron-Bridge's param mappings: a model is a table of name patterns and mapping kinds;
//! these functions do the tensor work. All work on row-major bytes, any dtype.
//!
//! The fused layouts are Megatron's: `linear_qkv` per query group, SwiGLU `linear_fc1` as
//! [gate; up], the vocabulary padded, a Mamba-2 mixer's `in_proj` / `conv1d` stored as named
//! row blocks (megatron-core's split-tensor factory).

use bridgeflow_sdk::{PluginError, Result};

/// How one Megatron tensor relates to HF tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// One tensor, renamed.
    Direct,
    /// One tensor whose first axis is the vocabulary (padded on import, truncated on export).
    Vocab,
    /// q, k, v fused per query group: for each group, its q heads, then k, then v (weights or
    /// biases).
    Qkv,
    /// gate and up concatenated along rows (SwiGLU `linear_fc1`).
    GatedMlp,
    /// All experts fused in one HF tensor [E, in, 2·ffn] with gate and up interleaved by
    /// column (GPT-OSS `gate_up_proj`) ⇄ Megatron [E, 2·ffn, in] as [gate; up] rows.
    ExpertsGateUpInterleavedT,
    /// The same for the bias: [E, 2·ffn] interleaved ⇄ [E, 2·ffn] as [gate; up].
    ExpertsGateUpInterleaved,
    /// All experts fused [E, a, b] ⇄ Megatron [E, b, a] (GPT-OSS `down_proj`).
    ExpertsTransposed,
    /// A Mamba-2 mixer's `in_proj` rows [z; x; B; C; dt], which megatron-core's torch_dist
    /// stores as five keys `<name>.z`, `.x`, `.B`, `.C`, `.dt` (its split-tensor factory).
    MambaInProj,
    /// A Mamba-2 mixer's `conv1d` weight or bias rows [x; B; C], stored as `<name>.x`, `.B`, `.C`.
    MambaConv,
}

/// The widths of a Mamba-2 mixer: inner channels (heads × head size), B/C channels (groups ×
/// state size) and heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MambaDims {
    pub inner: u64,
    pub bc: u64,
    pub heads: u64,
}

impl Kind {
    /// Whether the kind's rows are stored as separate named keys (see [`Kind::split_rows`]).
    pub fn is_split(self) -> bool {
        matches!(self, Kind::MambaInProj | Kind::MambaConv)
    }

    /// The named row blocks of a kind stored as separate keys, in row order.
    pub fn split_rows(self, m: MambaDims) -> Option<Vec<(&'static str, u64)>> {
        match self {
            Kind::MambaInProj => Some(vec![
                ("z", m.inner),
                ("x", m.inner),
                ("B", m.bc),
                ("C", m.bc),
                ("dt", m.heads),
            ]),
            Kind::MambaConv => Some(vec![("x", m.inner), ("B", m.bc), ("C", m.bc)]),
            _ => None,
        }
    }
}

impl Kind {
    /// Whether the kind moves rows (views) rather than reshuffling elements within each expert.
    pub fn by_rows(self) -> bool {
        matches!(
            self,
            Kind::Direct | Kind::Vocab | Kind::Qkv | Kind::GatedMlp
        )
    }
}

/// One expert's block under a reshuffling kind, HF → Megatron (`to_megatron`) or back:
/// `src` is the expert's bytes in the source layout, `dims` the source block's shape without
/// the expert axis, `es` bytes per element. Returns the target block.
pub fn expert_block(kind: Kind, src: &[u8], dims: &[u64], es: usize, to_megatron: bool) -> Vec<u8> {
    let d = |i: usize| dims.get(i).copied().unwrap_or(1) as usize;
    // Every kind is a gather: target element (row r, column c) of a rows × cols block is source
    // element idx(r, c).
    match (kind, to_megatron) {
        (Kind::ExpertsTransposed, _) => {
            // [a, b] -> [b, a] (either direction: a transpose of the source block).
            let (a, b) = (d(0), d(1));
            gather(src, es, b, a, |r, c| c * b + r)
        }
        (Kind::ExpertsGateUpInterleavedT, true) => {
            // HF [in, 2f] interleaved -> Megatron [2f, in]: row g < f is gate column 2g, row
            // f + g is up column 2g + 1.
            let (n, two_f) = (d(0), d(1));
            let f = two_f / 2;
            gather(src, es, two_f, n, |r, c| {
                c * two_f + if r < f { 2 * r } else { 2 * (r - f) + 1 }
            })
        }
        (Kind::ExpertsGateUpInterleavedT, false) => {
            let (two_f, n) = (d(0), d(1));
            let f = two_f / 2;
            gather(src, es, n, two_f, |r, c| (c / 2 + (c % 2) * f) * n + r)
        }
        (Kind::ExpertsGateUpInterleaved, true) => {
            let f = d(0) / 2;
            gather(src, es, 1, 2 * f, |_, c| {
                if c < f {
                    2 * c
                } else {
                    2 * (c - f) + 1
                }
            })
        }
        (Kind::ExpertsGateUpInterleaved, false) => {
            let f = d(0) / 2;
            gather(src, es, 1, 2 * f, |_, c| c / 2 + (c % 2) * f)
        }
        _ => src.to_vec(),
    }
}

/// A rows × cols block whose element (r, c) is `src` element `idx(r, c)`, elements `es` bytes.
/// Filled in bands of 32 rows, column by column, so that a transpose reads its source in runs.
/// Typed copies for the usual element sizes: a byte-length copy per element would be a call.
fn gather(
    src: &[u8],
    es: usize,
    rows: usize,
    cols: usize,
    idx: impl Fn(usize, usize) -> usize,
) -> Vec<u8> {
    fn typed<const N: usize>(
        src: &[u8],
        out: &mut [u8],
        rows: usize,
        cols: usize,
        idx: impl Fn(usize, usize) -> usize,
    ) {
        let src: &[[u8; N]] = src.as_chunks::<N>().0;
        let out: &mut [[u8; N]] = out.as_chunks_mut::<N>().0;
        for r0 in (0..rows).step_by(32) {
            for c in 0..cols {
                for r in r0..(r0 + 32).min(rows) {
                    out[r * cols + c] = src[idx(r, c)];
                }
            }
        }
    }
    let mut out = vec![0u8; rows * cols * es];
    match es {
        1 => typed::<1>(src, &mut out, rows, cols, idx),
        2 => typed::<2>(src, &mut out, rows, cols, idx),
        4 => typed::<4>(src, &mut out, rows, cols, idx),
        8 => typed::<8>(src, &mut out, rows, cols, idx),
        _ => {
            for r in 0..rows {
                for c in 0..cols {
                    let (to, from) = ((r * cols + c) * es, idx(r, c) * es);
                    out[to..to + es].copy_from_slice(&src[from..from + es]);
                }
            }
        }
    }
    out
}

/// The target block shape of one expert under a reshuffling kind (`dims`: the source block's).
pub fn expert_block_dims(kind: Kind, dims: &[u64]) -> Vec<u64> {
    match kind {
        Kind::ExpertsTransposed | Kind::ExpertsGateUpInterleavedT => vec![dims[1], dims[0]],
        _ => dims.to_vec(),
    }
}

/// Which decoder layers a row applies to (an HF name may map differently in dense and MoE
/// layers, e.g. DeepSeek's `post_attention_layernorm`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Layers {
    #[default]
    All,
    Dense,
    Moe,
    /// A hybrid model's Mamba-2 layers (Nemotron-H `M`).
    Mamba,
    /// A hybrid model's attention-only layers (`*`).
    Attention,
    /// A hybrid model's MLP-only layers (`-`).
    Mlp,
}

/// One row of a model table. In names, `{l}` stands for the layer index and `{e}` for the
/// expert index: an HF pattern with `{e}` maps each expert's tensor to its slice of a Megatron
/// tensor stacked on a leading expert axis (`experts.experts.linear_fc1.weight` [E, rows, ...]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub kind: Kind,
    pub megatron: String,
    pub hf: Vec<String>,
    #[serde(default)]
    pub layers: Layers,
    /// A row some models of the family lack altogether (biases, q/k norms, one of two
    /// attention variants). A model that has it has it in every layer of a kind.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// Each HF part's shape in config terms (`hidden`, `q` = heads × head_dim, `kv` = query
    /// groups × head_dim, `head_dim`, `ffn`, `moe_ffn`, `vocab`, `experts`); empty: unchecked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dims: Vec<Vec<String>>,
}

impl Entry {
    /// A row of any kind.
    pub fn new(kind: Kind, megatron: &str, hf: &[&str]) -> Entry {
        Entry {
            kind,
            megatron: megatron.to_string(),
            hf: hf.iter().map(|s| s.to_string()).collect(),
            layers: Layers::All,
            optional: false,
            dims: Vec::new(),
        }
    }
    pub fn direct(megatron: &str, hf: &str) -> Entry {
        Entry::new(Kind::Direct, megatron, &[hf])
    }
    pub fn vocab(megatron: &str, hf: &str) -> Entry {
        Entry::new(Kind::Vocab, megatron, &[hf])
    }
    pub fn qkv(megatron: &str, q: &str, k: &str, v: &str) -> Entry {
        Entry::new(Kind::Qkv, megatron, &[q, k, v])
    }
    pub fn gated(megatron: &str, gate: &str, up: &str) -> Entry {
        Entry::new(Kind::GatedMlp, megatron, &[gate, up])
    }
    /// This row only in dense (or only in MoE) layers.
    pub fn only(mut self, layers: Layers) -> Entry {
        self.layers = layers;
        self
    }
    /// A row some models lack (see [`Entry::optional`]).
    pub fn optional(mut self) -> Entry {
        self.optional = true;
        self
    }
    /// The HF parts' shapes in config terms (see [`Entry::dims`]), one list per part.
    pub fn dims(mut self, parts: &[&[&str]]) -> Entry {
        self.dims = parts
            .iter()
            .map(|p| p.iter().map(|d| d.to_string()).collect())
            .collect();
        self
    }
    /// Whether the Megatron tensor has a leading expert axis.
    pub fn per_expert(&self) -> bool {
        self.hf.iter().any(|p| p.contains("{e}"))
    }
}

/// The indices a name matched at `{l}` and `{e}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct Index {
    pub layer: Option<u64>,
    pub expert: Option<u64>,
}

/// Matches `name` against a pattern with `{l}` and `{e}` placeholders (decimal indices).
pub fn match_name(pattern: &str, name: &str) -> Option<Index> {
    let mut idx = Index::default();
    let mut rest = name;
    let mut pat = pattern;
    loop {
        let next = [("{l}", true), ("{e}", false)]
            .iter()
            .filter_map(|(ph, is_layer)| pat.find(ph).map(|at| (at, *is_layer)))
            .min();
        let Some((at, is_layer)) = next else {
            return (pat == rest).then_some(idx);
        };
        rest = rest.strip_prefix(&pat[..at])?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n = rest[..digits].parse().ok()?;
        if is_layer {
            idx.layer = Some(n);
        } else {
            idx.expert = Some(n);
        }
        rest = &rest[digits..];
        pat = &pat[at + 3..];
    }
}

/// The name for `pattern` at an index.
pub fn fill(pattern: &str, idx: Index) -> String {
    let mut s = pattern.to_string();
    if let Some(l) = idx.layer {
        s = s.replace("{l}", &l.to_string());
    }
    if let Some(e) = idx.expert {
        s = s.replace("{e}", &e.to_string());
    }
    s
}

/// Attention geometry for QKV fusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub heads: u64,
    pub groups: u64,
    pub head_dim: u64,
}

impl Heads {
    pub fn check(&self) -> Result<()> {
        if self.groups == 0 || !self.heads.is_multiple_of(self.groups) {
            return Err(PluginError::config(format!(
                "{} attention heads do not divide into {} query groups",
                self.heads, self.groups
            )));
        }
        Ok(())
    }
}

/// Megatron's `linear_qkv` (per group g: its heads/groups q heads, then k_g, then v_g) split
/// into q [heads·hd, …], k and v [groups·hd, …]. `row` is the bytes of one row (in_features ×
/// element size for weights, element size for biases). The other direction, and any block of
/// rows in either, is [`row_segments`].
pub fn split_qkv(qkv: &[u8], h: Heads, row: usize) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    h.check()?;
    let per = (h.heads / h.groups) as usize;
    let hd = h.head_dim as usize;
    let (qb, kb) = (per * hd * row, hd * row);
    let group = qb + 2 * kb;
    if qkv.len() != h.groups as usize * group {
        return Err(PluginError::shape(format!(
            "linear_qkv has {} bytes; {} groups of {} expected",
            qkv.len(),
            h.groups,
            group
        )));
    }
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in qkv.chunks(group) {
        q.extend_from_slice(&g[..qb]);
        k.extend_from_slice(&g[qb..qb + kb]);
        v.extend_from_slice(&g[qb + kb..]);
    }
    Ok((q, k, v))
}

/// A run of rows shared by a fused Megatron tensor and one of its HF parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSegment {
    /// First row in the fused tensor.
    pub fused: u64,
    /// Which HF part (index into the entry's `hf` names).
    pub part: usize,
    /// First row in that part.
    pub at: u64,
    pub rows: u64,
}

impl RowSegment {
    /// The part of this segment inside fused rows `range`, if any.
    pub fn clip(&self, range: std::ops::Range<u64>) -> Option<RowSegment> {
        let lo = self.fused.max(range.start);
        let hi = (self.fused + self.rows).min(range.end);
        (lo < hi).then(|| RowSegment {
            fused: lo,
            part: self.part,
            at: self.at + (lo - self.fused),
            rows: hi - lo,
        })
    }
}

/// How the rows of a fused Megatron tensor of `fused_rows` rows lie over its HF parts: each
/// part's row count, and the segments in fused order. Rows of no part (vocabulary padding)
/// belong to no segment. With this a mapper moves any block of rows — a whole tensor or a
/// stored chunk — to its places in the HF tensors without assembling anything.
pub fn row_segments(
    kind: Kind,
    fused_rows: u64,
    heads: Heads,
    vocab: u64,
) -> Result<(Vec<u64>, Vec<RowSegment>)> {
    let seg = |fused, part, at, rows| RowSegment {
        fused,
        part,
        at,
        rows,
    };
    Ok(match kind {
        Kind::Direct => (vec![fused_rows], vec![seg(0, 0, 0, fused_rows)]),
        Kind::ExpertsGateUpInterleavedT
        | Kind::ExpertsGateUpInterleaved
        | Kind::ExpertsTransposed => {
            return Err(PluginError::internal(format!(
                "{kind:?} reshuffles elements within each expert; it has no row segments"
            )))
        }
        Kind::MambaInProj | Kind::MambaConv => {
            return Err(PluginError::internal(format!(
                "{kind:?} is stored as separate keys (Kind::split_rows), not fused rows"
            )))
        }
        Kind::Vocab => {
            if fused_rows < vocab {
                return Err(PluginError::shape(format!(
                    "{fused_rows} rows, fewer than the vocabulary of {vocab}"
                )));
            }
            (vec![vocab], vec![seg(0, 0, 0, vocab)])
        }
        Kind::GatedMlp => {
            if !fused_rows.is_multiple_of(2) {
                return Err(PluginError::shape(format!(
                    "{fused_rows} rows do not split into gate and up halves"
                )));
            }
            let half = fused_rows / 2;
            (
                vec![half, half],
                vec![seg(0, 0, 0, half), seg(half, 1, 0, half)],
            )
        }
        Kind::Qkv => {
            heads.check()?;
            let (qr, kr) = (
                (heads.heads / heads.groups) * heads.head_dim,
                heads.head_dim,
            );
            let group = qr + 2 * kr;
            if fused_rows != heads.groups * group {
                return Err(PluginError::shape(format!(
                    "{fused_rows} rows; {} query groups of {group} expected",
                    heads.groups
                )));
            }
            let mut segs = Vec::new();
            for g in 0..heads.groups {
                segs.push(seg(g * group, 0, g * qr, qr));
                segs.push(seg(g * group + qr, 1, g * kr, kr));
                segs.push(seg(g * group + qr + kr, 2, g * kr, kr));
            }
            (
                vec![heads.groups * qr, heads.groups * kr, heads.groups * kr],
                segs,
            )
        }
    })
}

/// Rows of the fused Megatron tensor made of parts with these row counts (`padded_vocab`: the
/// padded vocabulary, for [`Kind::Vocab`]).
pub fn fused_rows(kind: Kind, part_rows: &[u64], padded_vocab: u64) -> u64 {
    match kind {
        Kind::Vocab => padded_vocab.max(part_rows[0]),
        _ => part_rows.iter().sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qkv_round_trip_and_layout() {
        // 4 heads, 2 groups, head_dim 1, one byte per row: q = 0..4, k = 10..12, v = 20..22.
        let h = Heads {
            heads: 4,
            groups: 2,
            head_dim: 1,
        };
        let fused = vec![0, 1, 10, 20, 2, 3, 11, 21];
        let (q, k, v) = split_qkv(&fused, h, 1).unwrap();
        assert_eq!((q, k, v), (vec![0, 1, 2, 3], vec![10, 11], vec![20, 21]));
        assert!(split_qkv(&fused[..7], h, 1).is_err());
    }

    #[test]
    fn row_segments_match_split_qkv() {
        // The segments place every row where split_qkv puts it, for a whole tensor and for
        // any block of rows.
        let h = Heads {
            heads: 4,
            groups: 2,
            head_dim: 2,
        };
        let fused: Vec<u8> = (0..16).collect();
        let (q, k, v) = split_qkv(&fused, h, 1).unwrap();
        let (rows, segs) = row_segments(Kind::Qkv, 16, h, 0).unwrap();
        assert_eq!(rows, vec![8, 4, 4]);
        for block in [0..16, 3..9, 15..16] {
            let mut parts = [vec![0xff; 8], vec![0xff; 4], vec![0xff; 4]];
            for s in segs.iter().filter_map(|s| s.clip(block.clone())) {
                for r in 0..s.rows {
                    parts[s.part][(s.at + r) as usize] = fused[(s.fused + r) as usize];
                }
            }
            for (got, want) in parts.iter().zip([&q, &k, &v]) {
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!(*g == 0xff || g == w);
                }
            }
            let placed = parts.iter().flatten().filter(|&&b| b != 0xff).count();
            assert_eq!(placed, block.end as usize - block.start as usize);
        }
        let (rows, segs) = row_segments(Kind::Vocab, 10, h, 7).unwrap();
        assert_eq!((rows, segs[0].rows), (vec![7], 7));
        assert!(row_segments(Kind::Vocab, 6, h, 7).is_err());
        assert!(row_segments(Kind::Qkv, 15, h, 0).is_err());
        assert!(row_segments(Kind::GatedMlp, 5, h, 0).is_err());
    }

    #[test]
    fn expert_blocks_round_trip() {
        // One expert, in = 2, 2f = 4: HF [[g0 u0 g1 u1], [g0' u0' g1' u1']] by bytes.
        let hf: Vec<u8> = vec![10, 20, 11, 21, 12, 22, 13, 23];
        let meg = expert_block(Kind::ExpertsGateUpInterleavedT, &hf, &[2, 4], 1, true);
        // Rows: gate0 [10, 12], gate1 [11, 13], up0 [20, 22], up1 [21, 23].
        assert_eq!(meg, vec![10, 12, 11, 13, 20, 22, 21, 23]);
        assert_eq!(
            expert_block(Kind::ExpertsGateUpInterleavedT, &meg, &[4, 2], 1, false),
            hf
        );
        let b = expert_block(Kind::ExpertsGateUpInterleaved, &[1, 2, 3, 4], &[4], 1, true);
        assert_eq!(b, vec![1, 3, 2, 4]);
        assert_eq!(
            expert_block(Kind::ExpertsGateUpInterleaved, &b, &[4], 1, false),
            vec![1, 2, 3, 4]
        );
        let t = expert_block(
            Kind::ExpertsTransposed,
            &[1, 2, 3, 4, 5, 6],
            &[2, 3],
            1,
            true,
        );
        assert_eq!(t, vec![1, 4, 2, 5, 3, 6]);
        assert_eq!(
            expert_block_dims(Kind::ExpertsTransposed, &[2, 3]),
            vec![3, 2]
        );
        // Two-byte elements, more rows than one band, any odd sizes: each kind and its inverse.
        let (n, two_f) = (37usize, 70usize);
        let hf: Vec<u8> = (0..n * two_f * 2).map(|i| (i * 7 % 251) as u8).collect();
        let el = |v: &[u8], i: usize| [v[2 * i], v[2 * i + 1]];
        let meg = expert_block(Kind::ExpertsGateUpInterleavedT, &hf, &[37, 70], 2, true);
        assert_eq!(el(&meg, 0), el(&hf, 0)); // gate 0, in 0
        assert_eq!(el(&meg, 35 * n + 2), el(&hf, 2 * two_f + 1)); // up 0, in 2
        let back = expert_block(Kind::ExpertsGateUpInterleavedT, &meg, &[70, 37], 2, false);
        assert_eq!(back, hf);
        let t = expert_block(Kind::ExpertsTransposed, &hf, &[37, 70], 2, true);
        assert_eq!(el(&t, 5 * n + 3), el(&hf, 3 * two_f + 5));
        assert_eq!(
            expert_block(Kind::ExpertsTransposed, &t, &[70, 37], 2, true),
            hf
        );
    }

    #[test]
    fn patterns() {
        let p = "model.layers.{l}.mlp.experts.{e}.up_proj.weight";
        let i = match_name(p, "model.layers.12.mlp.experts.3.up_proj.weight").unwrap();
        assert_eq!((i.layer, i.expert), (Some(12), Some(3)));
        assert_eq!(fill(p, i), "model.layers.12.mlp.experts.3.up_proj.weight");
        assert_eq!(
            match_name(p, "model.layers.x.mlp.experts.3.up_proj.weight"),
            None
        );
        assert_eq!(
            match_name(p, "model.layers.1.mlp.experts.3.up_proj.weightX"),
            None
        );
        assert_eq!(
            match_name("model.norm.weight", "model.norm.weight"),
            Some(Index::default())
        );
    }
}

//! Mapping primitives shared by model mappers (HF ⇄ Megatron), in the manner of
//! Megatron-Bridge's param mappings: a model is a table of name patterns and mapping kinds;
//! these functions do the tensor work. All work on row-major bytes, any dtype.

use crate::{PluginError, Result};

/// How one Megatron tensor relates to HF tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// One row of a model table. `{l}` in a name stands for the layer index.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub kind: Kind,
    pub megatron: &'static str,
    pub hf: &'static [&'static str],
}

impl Entry {
    pub const fn direct(megatron: &'static str, hf: &'static [&'static str]) -> Entry {
        Entry {
            kind: Kind::Direct,
            megatron,
            hf,
        }
    }
    pub const fn vocab(megatron: &'static str, hf: &'static [&'static str]) -> Entry {
        Entry {
            kind: Kind::Vocab,
            megatron,
            hf,
        }
    }
    pub const fn qkv(megatron: &'static str, hf: &'static [&'static str]) -> Entry {
        Entry {
            kind: Kind::Qkv,
            megatron,
            hf,
        }
    }
    pub const fn gated(megatron: &'static str, hf: &'static [&'static str]) -> Entry {
        Entry {
            kind: Kind::GatedMlp,
            megatron,
            hf,
        }
    }
}

/// Matches `name` against a pattern with `{l}`; returns the layer (or `u64::MAX` for patterns
/// without one).
pub fn match_pattern(pattern: &str, name: &str) -> Option<u64> {
    match pattern.split_once("{l}") {
        None => (pattern == name).then_some(u64::MAX),
        Some((pre, post)) => {
            let mid = name.strip_prefix(pre)?.strip_suffix(post)?;
            if mid.is_empty() || !mid.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            mid.parse().ok()
        }
    }
}

pub fn fill(pattern: &str, layer: u64) -> String {
    pattern.replace("{l}", &layer.to_string())
}

/// Attention geometry for QKV fusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub heads: u64,
    pub groups: u64,
    pub head_dim: u64,
}

impl Heads {
    fn check(&self) -> Result<()> {
        if self.groups == 0 || !self.heads.is_multiple_of(self.groups) {
            return Err(PluginError::config(format!(
                "{} attention heads do not divide into {} query groups",
                self.heads, self.groups
            )));
        }
        Ok(())
    }
}

/// Fuses q [heads·hd, …], k [groups·hd, …], v [groups·hd, …] into Megatron's `linear_qkv`
/// layout: per group g, its heads/groups q heads, then k_g, then v_g. `row` is the bytes of one
/// row (in_features × element size for weights, element size for biases).
pub fn fuse_qkv(q: &[u8], k: &[u8], v: &[u8], h: Heads, row: usize) -> Result<Vec<u8>> {
    h.check()?;
    let per = (h.heads / h.groups) as usize;
    let hd = h.head_dim as usize;
    let (qb, kb) = (per * hd * row, hd * row);
    if q.len() != h.groups as usize * qb || k.len() != h.groups as usize * kb || v.len() != k.len()
    {
        return Err(PluginError::shape(format!(
            "q/k/v sizes {}/{}/{} bytes do not fit {} heads, {} groups of dim {}",
            q.len(),
            k.len(),
            v.len(),
            h.heads,
            h.groups,
            h.head_dim
        )));
    }
    let mut out = Vec::with_capacity(q.len() + k.len() + v.len());
    for g in 0..h.groups as usize {
        out.extend_from_slice(&q[g * qb..(g + 1) * qb]);
        out.extend_from_slice(&k[g * kb..(g + 1) * kb]);
        out.extend_from_slice(&v[g * kb..(g + 1) * kb]);
    }
    Ok(out)
}

/// The inverse of [`fuse_qkv`].
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

/// Rows padded with zeros up to `rows` (vocabulary padding).
pub fn pad_rows(t: &[u8], row: usize, rows: usize) -> Vec<u8> {
    let mut out = t.to_vec();
    out.resize(rows * row, 0);
    out
}

/// `n` rounded up to a multiple of `m`.
pub fn round_up(n: u64, m: u64) -> u64 {
    if m == 0 {
        n
    } else {
        n.div_ceil(m) * m
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
        let fused = fuse_qkv(&[0, 1, 2, 3], &[10, 11], &[20, 21], h, 1).unwrap();
        assert_eq!(fused, vec![0, 1, 10, 20, 2, 3, 11, 21]);
        let (q, k, v) = split_qkv(&fused, h, 1).unwrap();
        assert_eq!((q, k, v), (vec![0, 1, 2, 3], vec![10, 11], vec![20, 21]));
        assert!(fuse_qkv(&[0; 3], &[0; 2], &[0; 2], h, 1).is_err());
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
    fn patterns() {
        assert_eq!(
            match_pattern(
                "model.layers.{l}.mlp.up_proj.weight",
                "model.layers.12.mlp.up_proj.weight"
            ),
            Some(12)
        );
        assert_eq!(
            match_pattern(
                "model.layers.{l}.mlp.up_proj.weight",
                "model.layers.x.mlp.up_proj.weight"
            ),
            None
        );
        assert_eq!(
            match_pattern("model.norm.weight", "model.norm.weight"),
            Some(u64::MAX)
        );
        assert_eq!(fill("a.{l}.b", 3), "a.3.b");
        assert_eq!(round_up(32000, 128), 32000);
        assert_eq!(round_up(32001, 128), 32128);
    }
}

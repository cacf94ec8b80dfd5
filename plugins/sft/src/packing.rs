//! Megatron-Bridge's offline packing: a histogram of `len(input_ids) - 1`, first-fit (with a
//! segment tree over remaining capacities, O(N log N)) on lengths sorted decreasing or shuffled,
//! then each length's sequences permuted and popped from the end into their bins. The random
//! draws happen in Bridge's order: the shuffle (first_fit_shuffle only), then one permutation per
//! non-empty length bucket, from length 0 up.

use crate::mt19937::LegacyRandom;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    FirstFitDecreasing,
    FirstFitShuffle,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "first_fit_decreasing" => Some(Algorithm::FirstFitDecreasing),
            "first_fit_shuffle" => Some(Algorithm::FirstFitShuffle),
            _ => None,
        }
    }
}

/// Max-segment tree over bin capacities; finds the lowest-index bin with room in O(log N).
struct SegmentTree {
    n: usize,
    tree: Vec<i64>,
}

impl SegmentTree {
    fn new(n: usize) -> Self {
        SegmentTree {
            n: n.max(1),
            tree: vec![0; 4 * n.max(1)],
        }
    }
    fn update(&mut self, idx: usize, val: i64) {
        let (mut node, mut lo, mut hi) = (1, 0, self.n - 1);
        let mut path = Vec::with_capacity(64);
        while lo != hi {
            path.push(node);
            let mid = (lo + hi) / 2;
            if idx <= mid {
                node *= 2;
                hi = mid;
            } else {
                node = node * 2 + 1;
                lo = mid + 1;
            }
        }
        self.tree[node] = val;
        for &p in path.iter().rev() {
            self.tree[p] = self.tree[2 * p].max(self.tree[2 * p + 1]);
        }
    }
    fn first_fit(&self, need: i64) -> Option<usize> {
        if self.tree[1] < need {
            return None;
        }
        let (mut node, mut lo, mut hi) = (1, 0, self.n - 1);
        while lo != hi {
            let mid = (lo + hi) / 2;
            if self.tree[2 * node] >= need {
                node *= 2;
                hi = mid;
            } else {
                node = node * 2 + 1;
                lo = mid + 1;
            }
        }
        Some(lo)
    }
}

/// First fit: each length goes to the lowest-index bin with room, else a new bin.
pub fn first_fit(lengths: &[usize], pack_size: usize) -> Vec<Vec<usize>> {
    let mut tree = SegmentTree::new(lengths.len());
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut remaining: Vec<i64> = Vec::new();
    for &len in lengths {
        match tree.first_fit(len as i64).filter(|&b| b < bins.len()) {
            Some(b) => {
                bins[b].push(len);
                remaining[b] -= len as i64;
                tree.update(b, remaining[b]);
            }
            None => {
                let b = bins.len();
                bins.push(vec![len]);
                remaining.push(pack_size as i64 - len as i64);
                tree.update(b, remaining[b]);
            }
        }
    }
    bins
}

/// Bins of lengths, drawing from `rng` as Bridge does.
pub fn assign(
    histogram: &[usize],
    pack_size: usize,
    algo: Algorithm,
    rng: &mut LegacyRandom,
) -> Vec<Vec<usize>> {
    let mut all: Vec<usize> = histogram
        .iter()
        .enumerate()
        .flat_map(|(len, &n)| std::iter::repeat_n(len, n))
        .collect();
    match algo {
        Algorithm::FirstFitDecreasing => all.sort_by(|a, b| b.cmp(a)),
        Algorithm::FirstFitShuffle => rng.shuffle(&mut all),
    }
    first_fit(&all, pack_size)
}

/// Bridge's packing metadata for one split.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PackMetadata {
    pub dataset_max_seqlen: usize,
    pub max_samples_per_bin: usize,
    pub packing_factor: f64,
    pub packing_efficiency: f64,
    pub pack_size: usize,
    pub min_packed_seqlen: usize,
}

/// Python's `round(x, 2)` for the values involved (round half to even on the decimal).
fn round2(x: f64) -> f64 {
    let scaled = x * 100.0;
    let r = scaled.round();
    let r = if (scaled - scaled.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        r - scaled.signum()
    } else {
        r
    };
    r / 100.0
}

pub fn metadata(bins: &[Vec<usize>], pack_size: usize) -> PackMetadata {
    let sequences: usize = bins.iter().map(Vec::len).sum();
    let packed: Vec<usize> = bins.iter().map(|b| b.iter().sum()).collect();
    let total: usize = packed.iter().sum();
    PackMetadata {
        dataset_max_seqlen: bins.iter().flatten().copied().max().unwrap_or(0),
        max_samples_per_bin: bins.iter().map(Vec::len).max().unwrap_or(0),
        packing_factor: round2(sequences as f64 / bins.len().max(1) as f64),
        packing_efficiency: round2(
            total as f64 / bins.len().max(1) as f64 / pack_size as f64 * 100.0,
        ),
        pack_size,
        min_packed_seqlen: packed.iter().copied().min().unwrap_or(0),
    }
}

/// `cu_seqlens` for one packed row in Megatron's THD convention: each sequence contributes its
/// length minus one (inputs and labels are shifted by one), starting at 0, int32, cumulative;
/// when the row is shorter than `pad_to`, a last boundary at `pad_to` closes the padding.
pub fn cu_seqlens(seq_start_id: &[usize], row_len: usize, pad_to: Option<usize>) -> Vec<i32> {
    let mut cu = vec![0i32];
    for (i, &start) in seq_start_id.iter().enumerate() {
        let end = seq_start_id.get(i + 1).copied().unwrap_or(row_len);
        let len = end.saturating_sub(start).saturating_sub(1);
        cu.push(cu.last().unwrap() + len as i32);
    }
    if let Some(p) = pad_to {
        if (*cu.last().unwrap() as usize) < p {
            cu.push(p as i32);
        }
    }
    cu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_takes_the_lowest_bin_with_room() {
        assert_eq!(
            first_fit(&[5, 4, 3, 2, 1], 6),
            vec![vec![5, 1], vec![4, 2], vec![3]]
        );
        assert_eq!(first_fit(&[0, 0, 6, 0], 6), vec![vec![0, 0, 6, 0]]);
        assert_eq!(first_fit(&[4, 4, 0], 4), vec![vec![4, 0], vec![4]]);
        assert!(first_fit(&[], 6).is_empty());
    }

    #[test]
    fn metadata_rounds_like_python() {
        let m = metadata(&[vec![3, 2], vec![4]], 8);
        assert_eq!(m.packing_factor, 1.5);
        assert_eq!(m.packing_efficiency, 56.25);
        assert_eq!(m.min_packed_seqlen, 4);
        assert_eq!(m.max_samples_per_bin, 2);
    }

    #[test]
    fn cu_seqlens_thd() {
        // Rows 0 and 1 of the first_fit_decreasing fixture, read back through Bridge's collate.
        assert_eq!(
            cu_seqlens(&[0, 353], 512, Some(512)),
            vec![0, 352, 510, 512]
        );
        assert_eq!(
            cu_seqlens(&[0, 339], 507, Some(512)),
            vec![0, 338, 505, 512]
        );
        assert_eq!(cu_seqlens(&[0, 4], 9, None), vec![0, 3, 7]);
    }
}

//! Whether a tensor's chunks share elements. The metadata reader already checks that every
//! chunk lies inside the tensor and that their element counts add up to the tensor's; with
//! those two, pairwise disjoint is the same as tiling the tensor exactly (an overlap and a gap
//! of the same size would otherwise pass the count).

/// One chunk as a box: its first index and its extent on each axis.
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    pub offsets: &'a [u64],
    pub sizes: &'a [u64],
}

impl Region<'_> {
    fn is_empty(&self) -> bool {
        self.sizes.contains(&0)
    }

    fn end(&self, axis: usize) -> u64 {
        self.offsets[axis].saturating_add(self.sizes[axis])
    }

    /// Shares at least one element with `other` (same rank): the extents meet on every axis.
    fn meets(&self, other: &Region) -> bool {
        !self.is_empty()
            && !other.is_empty()
            && (0..self.offsets.len())
                .all(|a| self.offsets[a] < other.end(a) && other.offsets[a] < self.end(a))
    }
}

/// Two regions (indices into `regions`, the smaller first) that share an element, if any.
///
/// A sweep along the axis with the most distinct starts, comparing each region only with the
/// ones still open on that axis: a checkpoint's chunks are a grid cut along one or two axes, so
/// this stays near linear where a plain pairwise check would be quadratic in the number of
/// ranks. All regions have the same rank.
pub fn overlapping_pair(regions: &[Region]) -> Option<(usize, usize)> {
    let rank = regions.first()?.offsets.len();
    let axis = (0..rank)
        .max_by_key(|&a| distinct_starts(regions, a))
        .unwrap_or(0);
    let start = |i: usize| regions[i].offsets.get(axis).copied().unwrap_or(0);
    let end = |i: usize| {
        if rank == 0 {
            1
        } else {
            regions[i].end(axis)
        }
    };
    let mut order: Vec<usize> = (0..regions.len())
        .filter(|&i| !regions[i].is_empty())
        .collect();
    order.sort_by_key(|&i| (start(i), i));
    let mut open: Vec<usize> = Vec::new();
    for i in order {
        open.retain(|&j| end(j) > start(i));
        if let Some(&j) = open.iter().find(|&&j| regions[i].meets(&regions[j])) {
            return Some((i.min(j), i.max(j)));
        }
        open.push(i);
    }
    None
}

fn distinct_starts(regions: &[Region], axis: usize) -> usize {
    let mut starts: Vec<u64> = regions.iter().map(|r| r.offsets[axis]).collect();
    starts.sort_unstable();
    starts.dedup();
    starts.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions(v: &[(Vec<u64>, Vec<u64>)]) -> Vec<Region<'_>> {
        v.iter()
            .map(|(o, s)| Region {
                offsets: o,
                sizes: s,
            })
            .collect()
    }

    fn brute_force(r: &[Region]) -> bool {
        (0..r.len()).any(|i| (i + 1..r.len()).any(|j| r[i].meets(&r[j])))
    }

    #[test]
    fn a_grid_is_disjoint_and_a_shifted_piece_is_not() {
        let grid = vec![
            (vec![0, 0], vec![2, 3]),
            (vec![0, 3], vec![2, 3]),
            (vec![2, 0], vec![2, 3]),
            (vec![2, 3], vec![2, 3]),
        ];
        assert_eq!(overlapping_pair(&regions(&grid)), None);
        // The count still adds up: [2,3]+[1,3] overlaps row 2 and leaves row 3 of the right half.
        let mut shifted = grid.clone();
        shifted[3].0 = vec![1, 3];
        assert_eq!(overlapping_pair(&regions(&shifted)), Some((1, 3)));
    }

    #[test]
    fn empty_pieces_and_scalars() {
        let v = vec![(vec![0, 0], vec![0, 5]), (vec![0, 0], vec![4, 5])];
        assert_eq!(overlapping_pair(&regions(&v)), None);
        let scalar = vec![(vec![], vec![]), (vec![], vec![])];
        assert_eq!(overlapping_pair(&regions(&scalar)), Some((0, 1)));
        assert_eq!(overlapping_pair(&regions(&scalar[..1])), None);
        assert_eq!(overlapping_pair(&[]), None);
    }

    /// Random boxes in a 3-D tensor, against the pairwise check (xorshift: no test-only crate).
    #[test]
    fn agrees_with_the_pairwise_check() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        for _ in 0..3000 {
            let n = 1 + next(7) as usize;
            let v: Vec<(Vec<u64>, Vec<u64>)> = (0..n)
                .map(|_| {
                    let o: Vec<u64> = (0..3).map(|_| next(6)).collect();
                    let z: Vec<u64> = (0..3).map(|_| next(4)).collect();
                    (o, z)
                })
                .collect();
            let r = regions(&v);
            let found = overlapping_pair(&r);
            assert_eq!(found.is_some(), brute_force(&r), "{v:?}");
            if let Some((i, j)) = found {
                assert!(i < j && r[i].meets(&r[j]), "{v:?}");
            }
        }
    }
}

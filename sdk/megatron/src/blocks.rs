//! Boxes (offsets, shape) and byte runs inside row-major tensors: how a block of a tensor lies
//! in its bytes, and which block a run of bytes is.

/// The intersection of two boxes (offsets, shape), if not empty.
pub fn box_intersection(a: (&[u64], &[u64]), b: (&[u64], &[u64])) -> Option<(Vec<u64>, Vec<u64>)> {
    let n = a.0.len();
    let lo: Vec<u64> = (0..n).map(|d| a.0[d].max(b.0[d])).collect();
    let hi: Vec<u64> = (0..n)
        .map(|d| (a.0[d] + a.1[d]).min(b.0[d] + b.1[d]))
        .collect();
    (0..n)
        .all(|d| lo[d] < hi[d])
        .then(|| (lo.clone(), (0..n).map(|d| hi[d] - lo[d]).collect()))
}

/// The byte runs, in row-major order, of the box (`offsets`, `shape`) inside a row-major
/// tensor of `outer` shape with `es`-byte elements (adjacent runs merged).
pub fn box_runs(outer: &[u64], es: u64, offsets: &[u64], shape: &[u64]) -> Vec<(u64, u64)> {
    let n = outer.len();
    if n == 0 {
        return vec![(0, es)];
    }
    let mut stride = vec![es; n];
    for d in (0..n - 1).rev() {
        stride[d] = stride[d + 1] * outer[d + 1];
    }
    let row = shape[n - 1] * es;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut idx = vec![0u64; n - 1];
    loop {
        let at: u64 = (0..n)
            .map(|d| (offsets[d] + if d < n - 1 { idx[d] } else { 0 }) * stride[d])
            .sum();
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == at => last.1 += row,
            _ => runs.push((at, row)),
        }
        // Odometer over every axis but the last.
        let mut d = n - 1;
        loop {
            if d == 0 {
                return runs;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

pub use bridgeflow_sdk::tensor::contiguous_offset;

/// The block (offsets, shape) of a row-major tensor of `shape` that elements
/// [`start`, `start` + `len`) are, if they form one: whole trailing axes, a run on one axis,
/// single indices before it.
pub fn block_of(shape: &[u64], start: u64, len: u64) -> Option<(Vec<u64>, Vec<u64>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_and_runs() {
        assert_eq!(
            box_intersection((&[0, 0], &[4, 3]), (&[2, 0], &[4, 3])),
            Some((vec![2, 0], vec![2, 3]))
        );
        assert_eq!(
            box_intersection((&[0, 0], &[2, 3]), (&[2, 0], &[2, 3])),
            None
        );
        // Rows 1-2 of a [4, 3] tensor of bytes: one merged run; columns 1-2: a run per row.
        assert_eq!(box_runs(&[4, 3], 1, &[1, 0], &[2, 3]), vec![(3, 6)]);
        assert_eq!(box_runs(&[2, 3], 1, &[0, 1], &[2, 2]), vec![(1, 2), (4, 2)]);
        assert_eq!(box_runs(&[], 4, &[], &[]), vec![(0, 4)]);
    }

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
}

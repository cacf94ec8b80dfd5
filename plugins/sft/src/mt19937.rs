//! numpy's legacy `RandomState` (MT19937), as far as packing uses it: `seed(int)`, `shuffle`
//! and `permutation`. Bridge seeds it with `np.random.seed(seed)` before packing, so a byte-exact
//! port needs the same generator and the same way of drawing bounded integers. Written here
//! because no Rust crate reproduces numpy's `random_interval` rejection sampling.

const N: usize = 624;
const M: usize = 397;

pub struct LegacyRandom {
    mt: [u32; N],
    idx: usize,
}

impl LegacyRandom {
    /// `np.random.seed(seed)` for an integer seed (MT19937's `init_genrand`).
    pub fn seed(seed: u32) -> LegacyRandom {
        let mut mt = [0u32; N];
        mt[0] = seed;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        LegacyRandom { mt, idx: N }
    }

    fn generate(&mut self) {
        for i in 0..N {
            let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % N] & 0x7fff_ffff);
            let mut v = self.mt[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.mt[i] = v;
        }
        self.idx = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.idx >= N {
            self.generate();
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// A uniform integer in `0..=max` by masked rejection, as numpy's `random_interval`.
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> s;
        }
        loop {
            let v = if max <= 0xffff_ffff {
                (self.next_u32() as u64) & mask
            } else {
                self.next_u64() & mask
            };
            if v <= max {
                return v;
            }
        }
    }

    /// `np.random.shuffle` of a sequence, in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.interval(i as u64) as usize;
            v.swap(i, j);
        }
    }

    /// `np.random.permutation(n)`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        self.shuffle(&mut p);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_mt19937_stream() {
        // The reference implementation's first outputs for init_genrand(5489), and numpy's
        // np.random.seed(1234) stream (np.random.randint(2**32) draws a raw 32-bit word).
        let mut r = LegacyRandom::seed(5489);
        assert_eq!(r.next_u32(), 3_499_211_612);
        assert_eq!(r.next_u32(), 581_869_302);
        let mut r = LegacyRandom::seed(1234);
        assert_eq!(r.next_u32(), 822_569_775);
    }

    #[test]
    fn shuffle_and_permutation_match_numpy() {
        // np.random.seed(1234); l = list(range(10)); np.random.shuffle(l); np.random.permutation(7)
        let mut r = LegacyRandom::seed(1234);
        let mut l: Vec<u32> = (0..10).collect();
        r.shuffle(&mut l);
        assert_eq!(l, vec![7, 2, 9, 1, 0, 8, 4, 5, 6, 3]);
        assert_eq!(r.permutation(7), vec![6, 4, 0, 5, 3, 2, 1]);
        // np.random.seed(99); np.random.permutation(300)[:8]
        let p = LegacyRandom::seed(99).permutation(300);
        assert_eq!(&p[..8], &[43, 15, 271, 137, 214, 284, 10, 49]);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut r = LegacyRandom::seed(7);
        let mut p = r.permutation(100);
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
        assert_eq!(LegacyRandom::seed(1).permutation(1), vec![0]);
    }
}

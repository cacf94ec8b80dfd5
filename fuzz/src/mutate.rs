//! A small deterministic mutation engine: a splitmix64 PRNG seeded by a `u64`, byte-level
//! mutations (bit flips, interesting bytes and integers, runs inserted / deleted / duplicated,
//! truncation, splicing two seeds) and text-aware ones for JSON / YAML / TOML (numbers replaced by
//! huge, negative, fractional or out-of-range values, nesting deepened, keys duplicated).

/// splitmix64: tiny, fast, and every seed gives a distinct stream.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const BYTES: &[u8] = &[
    0, 0xff, 0x7f, 0x80, 1, b'0', b'9', b'"', b'\\', b'\n', b'{', b'[',
];

/// Integers that break length and offset checks, before the ones derived from the input size.
fn interesting(len: usize) -> Vec<u64> {
    let n = len as u64;
    vec![
        0,
        1,
        u64::MAX, // -1
        i32::MAX as u64,
        u32::MAX as u64,
        i64::MIN as u64,
        i64::MAX as u64,
        1 << 31,
        1 << 32,
        1 << 40,
        1 << 16,
        0x7fff,
        n,
        n.wrapping_sub(1),
        n + 1,
        n.wrapping_sub(8),
        n / 2,
        n * 2,
    ]
}

/// Which mutations to draw from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Binary formats: byte-level only.
    Binary,
    /// JSON, YAML, TOML, JSONL: text-aware mutations as well (half of the draws).
    Text,
    /// Pickles: integer opcodes rewritten with interesting values as well (half of the draws).
    Pickle,
}

/// One mutated input from `seeds[..]` (each a whole file), deterministic in `rng`'s state.
/// Applies 1 to 4 stacked mutations; the result is capped at `max_len` bytes.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], kind: Kind, max_len: usize) -> Vec<u8> {
    let mut data = rng.pick(seeds).clone();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if kind == Kind::Text && rng.chance(2) {
            text_mutation(rng, &mut data);
        } else if kind == Kind::Pickle && rng.chance(2) {
            pickle_mutation(rng, &mut data);
        } else {
            byte_mutation(rng, &mut data, seeds);
        }
    }
    data.truncate(max_len);
    data
}

/// One byte-level mutation in place.
pub fn byte_mutation(rng: &mut Rng, d: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    if d.is_empty() {
        d.push(*rng.pick(BYTES));
        return;
    }
    let len = d.len();
    match rng.below(11) {
        // Bit flip.
        0 | 1 => {
            let i = rng.below(len);
            d[i] ^= 1 << rng.below(8);
        }
        // A byte set to an interesting value.
        2 => {
            let i = rng.below(len);
            d[i] = *rng.pick(BYTES);
        }
        // 1/2/4/8 bytes overwritten with an interesting integer (LE, sometimes BE).
        3..=5 => {
            let w = *rng.pick(&[1usize, 2, 4, 8]);
            let v = *rng.pick(&interesting(len));
            let v = if rng.chance(8) {
                v.wrapping_add(rng.below(17) as u64).wrapping_sub(8)
            } else {
                v
            };
            let bytes = if rng.chance(4) {
                v.to_be_bytes()[8 - w..].to_vec()
            } else {
                v.to_le_bytes()[..w].to_vec()
            };
            let i = rng.below(len);
            for (k, b) in bytes.into_iter().enumerate() {
                if i + k < len {
                    d[i + k] = b;
                }
            }
        }
        // Insert a run of random or repeated bytes.
        6 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(64);
            let run: Vec<u8> = if rng.chance(2) {
                vec![*rng.pick(BYTES); n]
            } else {
                (0..n).map(|_| rng.next_u64() as u8).collect()
            };
            d.splice(i..i, run);
        }
        // Delete a run.
        7 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            d.drain(i..i + n);
        }
        // Duplicate a run (at another place).
        8 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let run = d[i..i + n].to_vec();
            let at = rng.below(len + 1);
            d.splice(at..at, run);
        }
        // Truncate.
        9 => {
            let at = rng.below(len);
            d.truncate(at);
        }
        // Splice: a prefix of this input and a suffix of another seed.
        _ => {
            let other = rng.pick(seeds);
            if other.is_empty() {
                return;
            }
            let a = rng.below(len + 1);
            let b = rng.below(other.len());
            d.truncate(a);
            d.extend_from_slice(&other[b..]);
        }
    }
}

/// Rewrites one integer opcode of a pickle (BININT1 `K`, BININT2 `M`, BININT `J`, LONG1) as
/// BININT or LONG1 of an interesting value: sizes, offsets, counts and parallel degrees become
/// huge, negative or just past a bound. (Opcodes are found by their byte, so a hit inside a
/// string is a plain byte mutation.)
pub fn pickle_mutation(rng: &mut Rng, d: &mut Vec<u8>) {
    let ops: Vec<usize> = d
        .iter()
        .enumerate()
        .filter(|(_, &b)| matches!(b, b'K' | b'M' | b'J' | 0x8a))
        .map(|(i, _)| i)
        .collect();
    if ops.is_empty() {
        return;
    }
    let i = *rng.pick(&ops);
    let arg = match d[i] {
        b'K' => 1,
        b'M' => 2,
        b'J' => 4,
        _ => 1 + d.get(i + 1).copied().unwrap_or(0) as usize,
    };
    let end = (i + 1 + arg).min(d.len());
    let mut vals = interesting(d.len());
    vals.extend([
        2,
        3,
        64,
        65,
        1 << 16,
        (1 << 16) + 1,
        1 << 20,
        (1 << 20) + 1,
        1 << 62,
    ]);
    let v = *rng.pick(&vals) as i64;
    let v = if rng.chance(4) { v.wrapping_neg() } else { v };
    let op: Vec<u8> = match i32::try_from(v) {
        Ok(x) if rng.chance(2) => [&[b'J'][..], &x.to_le_bytes()].concat(),
        _ => [&[0x8a, 8][..], &v.to_le_bytes()].concat(),
    };
    d.splice(i..end, op);
}

/// Numbers that break numeric parsing and what is sized from it.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "-9223372036854775808",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "2147483648",
    "1099511627776",
    "1e400",
    "-1e400",
    "1.7976931348623158e308",
    "1e-400",
    "0.5",
    "-0.0",
    "NaN",
    "Infinity",
    "-Infinity",
    ".inf",
    ".nan",
    "0x7fffffff",
    "1_000_000",
    "123456789012345678901234567890123456789012345678901234567890",
];

/// Byte ranges of the number tokens of `d` (a digit run, with a sign, fraction and exponent).
fn number_tokens(d: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < d.len() {
        if d[i].is_ascii_digit() {
            let mut s = i;
            if s > 0 && d[s - 1] == b'-' {
                s -= 1;
            }
            let mut e = i;
            while e < d.len() && (d[e].is_ascii_digit() || b".eE+-_".contains(&d[e])) {
                e += 1;
            }
            out.push((s, e));
            i = e;
        } else {
            i += 1;
        }
    }
    out
}

/// The first `"key"` / `key:` / `key =` at or after a random place: (start, end of its line).
fn key_line(rng: &mut Rng, d: &[u8]) -> Option<(usize, usize)> {
    let from = rng.below(d.len());
    let start = d[..from]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let end = d[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(d.len(), |p| from + p + 1);
    let line = &d[start..end];
    (line.contains(&b':') || line.contains(&b'=')).then_some((start, end))
}

/// One text-aware mutation in place.
pub fn text_mutation(rng: &mut Rng, d: &mut Vec<u8>) {
    if d.is_empty() {
        d.extend_from_slice(rng.pick(NUMBERS).as_bytes());
        return;
    }
    match rng.below(6) {
        // A number token replaced.
        0..=2 => {
            let toks = number_tokens(d);
            if toks.is_empty() {
                return;
            }
            let (s, e) = *rng.pick(&toks);
            d.splice(s..e, rng.pick(NUMBERS).bytes());
        }
        // Nesting deepened around a value: [[[ ... ]]] or {"k":{"k": ... }}, or YAML indents.
        3 => {
            let depth = *rng.pick(&[2usize, 64, 200, 1000, 5000]);
            let i = rng.below(d.len() + 1);
            let j = i + rng.below((d.len() - i).min(64) + 1);
            let (open, close): (&[u8], &[u8]) = match rng.below(3) {
                0 => (b"[", b"]"),
                1 => (b"{\"k\":", b"}"),
                _ => (b"- ", b""),
            };
            let mut out = Vec::with_capacity(d.len() + depth * (open.len() + close.len()));
            out.extend_from_slice(&d[..i]);
            for _ in 0..depth {
                out.extend_from_slice(open);
            }
            out.extend_from_slice(&d[i..j]);
            for _ in 0..depth {
                out.extend_from_slice(close);
            }
            out.extend_from_slice(&d[j..]);
            *d = out;
        }
        // A key's line duplicated (a duplicate key in YAML / TOML / JSON objects).
        4 => {
            if let Some((s, e)) = key_line(rng, d) {
                let line = d[s..e].to_vec();
                d.splice(e..e, line);
            }
        }
        // A structural character inserted or removed.
        _ => {
            let i = rng.below(d.len());
            let c = *rng.pick(b"{}[],:\"'&*!#|>-= \t\n\\");
            if rng.chance(2) {
                d.insert(i, c);
            } else {
                d.remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_in_the_seed() {
        let seeds = vec![b"{\"a\": 12, \"b\": [1.5, -3]}".to_vec(), vec![0u8; 40]];
        let run = |s| {
            let mut r = Rng::new(s);
            (0..200)
                .map(|_| mutate(&mut r, &seeds, Kind::Text, 1 << 20))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn number_tokens_are_found() {
        assert_eq!(number_tokens(b"a: -12, b: 1.5e3"), vec![(3, 6), (11, 16)]);
    }
}

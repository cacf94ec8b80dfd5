//! A fast path for byte-level BPE tokenizers (GPT-2 style `tokenizer.json`: no normalizer,
//! `ByteLevel` pre-tokenizer with its regex, a plain BPE model, special tokens split out first).
//!
//! The `tokenizers` crate spends most of its time on bookkeeping this job never reads (offsets,
//! alignment maps, token strings, attention masks for every token). This encoder produces only
//! ids, with the same steps in the same order: added tokens are matched leftmost-longest in the
//! raw text; the rest is split with the very same Oniguruma pattern; each piece is mapped to
//! byte-level symbols and merged by rank, lowest first and leftmost among equals; results are
//! cached per word. Anything it does not reproduce exactly (normalizers, other pre-tokenizers,
//! dropout, byte fallback, prefix spaces, stripped added tokens) makes `from_file` return None,
//! and the caller uses the `tokenizers` crate instead. Equality with the `tokenizers` crate is
//! tested on the whole fixture corpus.

use aho_corasick::{AhoCorasick, MatchKind};
use rustc_hash::FxHashMap as HashMap;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::BinaryHeap;
use std::path::Path;

/// GPT-2's pre-tokenizer pattern, as the `ByteLevel` pre-tokenizer uses it.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

pub struct FastBpe {
    id: u64,
    split: onig::Regex,
    added: Option<(AhoCorasick, Vec<u32>)>,
    byte_ids: [u32; 256],
    /// (left, right) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Whole-word lookups when the model ignores merges for words in the vocabulary.
    words: Option<HashMap<Vec<u8>, u32>>,
    /// Ids the post-processor puts around a sequence when special tokens are added.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

/// GPT-2's reversible byte → printable character map.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    map
}

fn flag(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

thread_local! {
    /// Word → ids, for the encoder whose `id` is in the first field (one encoder per thread is
    /// the common case; another one clears it).
    static CACHE: RefCell<(u64, WordCache)> = RefCell::new((0, HashMap::default()));
}
type WordCache = HashMap<Vec<u8>, Vec<u32>>;
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
const CACHE_LIMIT: usize = 200_000;

impl FastBpe {
    /// Loads `tokenizer.json` if this fast path reproduces it exactly; None otherwise.
    pub fn from_file(path: &Path) -> Option<FastBpe> {
        let t: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        if !t.get("normalizer").is_none_or(Value::is_null) {
            return None;
        }
        let pre = t.get("pre_tokenizer")?;
        if pre.get("type")?.as_str()? != "ByteLevel"
            || flag(pre, "add_prefix_space")
            || !flag(pre, "use_regex")
        {
            return None;
        }
        let model = t.get("model")?;
        if model.get("type")?.as_str()? != "BPE"
            || !model.get("dropout").is_none_or(Value::is_null)
            || flag(model, "byte_fallback")
            || !model
                .get("continuing_subword_prefix")
                .is_none_or(|v| v.is_null() || v == "")
            || !model
                .get("end_of_word_suffix")
                .is_none_or(|v| v.is_null() || v == "")
        {
            return None;
        }
        let b2c = byte_to_char();
        let mut c2b: HashMap<char, u8> = HashMap::default();
        for (b, c) in b2c.iter().enumerate() {
            c2b.insert(*c, b as u8);
        }
        let to_bytes =
            |s: &str| -> Option<Vec<u8>> { s.chars().map(|c| c2b.get(&c).copied()).collect() };
        let vocab: HashMap<String, u32> = model
            .get("vocab")?
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_u64()? as u32)))
            .collect::<Option<_>>()?;
        let mut byte_ids = [0u32; 256];
        for b in 0..256 {
            byte_ids[b] = *vocab.get(&b2c[b].to_string())?;
        }
        let mut merges = HashMap::default();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => {
                    let (a, b) = s.split_once(' ')?;
                    (a.to_string(), b.to_string())
                }
                Value::Array(p) if p.len() == 2 => {
                    (p[0].as_str()?.to_string(), p[1].as_str()?.to_string())
                }
                _ => return None,
            };
            let merged = vocab.get(&format!("{a}{b}"))?;
            merges
                .entry((*vocab.get(&a)?, *vocab.get(&b)?))
                .or_insert((rank as u32, *merged));
        }
        let words = if flag(model, "ignore_merges") {
            Some(
                vocab
                    .iter()
                    .filter_map(|(k, &v)| Some((to_bytes(k)?, v)))
                    .collect(),
            )
        } else {
            None
        };
        // Added tokens are split out of the raw text first.
        let mut patterns = Vec::new();
        let mut ids = Vec::new();
        for a in t.get("added_tokens")?.as_array()? {
            if flag(a, "lstrip") || flag(a, "rstrip") || flag(a, "single_word") {
                return None;
            }
            if !flag(a, "special") && flag(a, "normalized") {
                // Matched on normalized text; with no normalizer that is the raw text, except
                // that non-special tokens are also pre-tokenized with the rest: not reproduced.
                return None;
            }
            patterns.push(a.get("content")?.as_str()?.to_string());
            ids.push(a.get("id")?.as_u64()? as u32);
        }
        let added = if patterns.is_empty() {
            None
        } else {
            Some((
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&patterns)
                    .ok()?,
                ids,
            ))
        };
        let (prefix, suffix) = match t.get("post_processor") {
            None | Some(Value::Null) => (vec![], vec![]),
            Some(pp) => post_processor(pp)?,
        };
        Some(FastBpe {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            split: onig::Regex::new(GPT2_PATTERN).ok()?,
            added,
            byte_ids,
            merges,
            words,
            prefix,
            suffix,
        })
    }

    /// Token ids of `text`, as `Tokenizer::encode(text, add_special_tokens).get_ids()`.
    pub fn encode(&self, text: &str, add_special_tokens: bool, out: &mut Vec<u32>) {
        if add_special_tokens {
            out.extend_from_slice(&self.prefix);
        }
        match &self.added {
            None => self.encode_plain(text, out),
            Some((ac, ids)) => {
                let mut last = 0;
                for m in ac.find_iter(text) {
                    self.encode_plain(&text[last..m.start()], out);
                    out.push(ids[m.pattern().as_usize()]);
                    last = m.end();
                }
                self.encode_plain(&text[last..], out);
            }
        }
        if add_special_tokens {
            out.extend_from_slice(&self.suffix);
        }
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        CACHE.with(|cache| {
            let mut guard = cache.borrow_mut();
            if guard.0 != self.id {
                *guard = (self.id, HashMap::default());
            }
            let cache = &mut guard.1;
            // ASCII text is split by hand (its character classes are unambiguous and this is
            // several times faster); anything else goes through the same Oniguruma pattern.
            let pieces: Box<dyn Iterator<Item = (usize, usize)>> = if text.is_ascii() {
                Box::new(AsciiPieces {
                    s: text.as_bytes(),
                    i: 0,
                })
            } else {
                Box::new(self.split.find_iter(text))
            };
            for (s, e) in pieces {
                let word = &text.as_bytes()[s..e];
                if let Some(ids) = cache.get(word) {
                    out.extend_from_slice(ids);
                    continue;
                }
                let start = out.len();
                self.bpe(word, out);
                if word.len() <= 64 {
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(word.to_vec(), out[start..].to_vec());
                }
            }
        });
    }

    /// Merges one word's byte symbols by rank (lowest first, leftmost among equal ranks).
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        if let Some(w) = &self.words {
            if let Some(&id) = w.get(word) {
                out.push(id);
                return;
            }
        }
        let n = word.len();
        let mut sym: Vec<u32> = word.iter().map(|&b| self.byte_ids[b as usize]).collect();
        if n == 1 {
            out.push(sym[0]);
            return;
        }
        // Doubly linked symbols; a heap of candidate merges keyed by (rank, position).
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize, u32, u32)>>,
                    i: usize,
                    a: u32,
                    b: u32| {
            if let Some(&(rank, _)) = self.merges.get(&(a, b)) {
                heap.push(std::cmp::Reverse((rank, i, a, b)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, i, sym[i], sym[i + 1]);
        }
        while let Some(std::cmp::Reverse((rank, i, a, b))) = heap.pop() {
            let j = next[i];
            // Stale entry: a symbol changed since it was queued.
            if !alive[i] || j >= n || !alive[j] || sym[i] != a || sym[j] != b {
                continue;
            }
            let (_, merged) = self.merges[&(a, b)];
            let _ = rank;
            sym[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i;
            }
            if prev[i] < n {
                push(&mut heap, prev[i], sym[prev[i]], sym[i]);
            }
            if next[i] < n {
                push(&mut heap, i, sym[i], sym[next[i]]);
            }
        }
        let mut i = 0;
        while i < n {
            out.push(sym[i]);
            i = next[i];
        }
    }
}

/// GPT-2's pattern on ASCII text: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
/// ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, alternatives tried in order at each position, where in
/// ASCII `\p{L}` is `[A-Za-z]`, `\p{N}` is `[0-9]` and `\s` is `[\t\n\x0b\x0c\r ]`.
struct AsciiPieces<'a> {
    s: &'a [u8],
    i: usize,
}

#[derive(PartialEq, Clone, Copy)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' => Class::Space,
        _ => Class::Other,
    }
}

impl Iterator for AsciiPieces<'_> {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        let (s, i) = (self.s, self.i);
        if i >= s.len() {
            return None;
        }
        let run = |from: usize, c: Class| {
            let mut j = from;
            while j < s.len() && class(s[j]) == c {
                j += 1;
            }
            j
        };
        let end = 'm: {
            if s[i] == b'\'' {
                for c in [&b"'s"[..], b"'t", b"'re", b"'ve", b"'m", b"'ll", b"'d"] {
                    if s[i..].starts_with(c) {
                        break 'm i + c.len();
                    }
                }
            }
            let (skip, first) = if s[i] == b' ' {
                (1, s.get(i + 1).copied())
            } else {
                (0, Some(s[i]))
            };
            if let Some(f) = first {
                let c = class(f);
                if c != Class::Space {
                    break 'm run(i + skip, c);
                }
            }
            // Whitespace: the run, minus its last character when a non-space follows it (that
            // one joins the next piece), unless the run is a single character.
            let j = run(i, Class::Space);
            if j < s.len() && j - i > 1 {
                j - 1
            } else {
                j
            }
        };
        self.i = end;
        Some((i, end))
    }
}

/// Special-token ids before and after a single sequence, from a post-processor.
fn post_processor(pp: &Value) -> Option<(Vec<u32>, Vec<u32>)> {
    match pp.get("type")?.as_str()? {
        "ByteLevel" => Some((vec![], vec![])),
        "TemplateProcessing" => {
            let specials = pp.get("special_tokens")?.as_object()?;
            let (mut pre, mut post, mut seen_a) = (vec![], vec![], false);
            for item in pp.get("single")?.as_array()? {
                if let Some(st) = item.get("SpecialToken") {
                    let id = st.get("id")?.as_str()?;
                    let ids: Vec<u32> = specials
                        .get(id)?
                        .get("ids")?
                        .as_array()?
                        .iter()
                        .map(|v| v.as_u64().map(|x| x as u32))
                        .collect::<Option<_>>()?;
                    if seen_a {
                        post.extend(ids);
                    } else {
                        pre.extend(ids);
                    }
                } else if item.get("Sequence").is_some() {
                    seen_a = true;
                } else {
                    return None;
                }
            }
            Some((pre, post))
        }
        "Sequence" => {
            let (mut pre, mut post) = (vec![], vec![]);
            for p in pp.get("processors")?.as_array()? {
                let (a, b) = post_processor(p)?;
                pre.extend(a);
                post.extend(b);
            }
            Some((pre, post))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/shared/data")
    }

    /// Every corpus document (and some hand-made strings), both tokenizers, with and without
    /// special tokens: the same ids as the `tokenizers` crate.
    #[test]
    fn same_ids_as_the_tokenizers_crate_on_the_corpus() {
        let corpus = std::fs::read_to_string(fixtures().join("corpus/corpus.jsonl")).unwrap();
        let mut texts: Vec<String> = corpus
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        texts.extend(
            [
                "",
                " ",
                "  a",
                "a  b",
                "\n\n x",
                "it's 'em we'll",
                "   ",
                "x   ",
                "aaaaaaaaaaaaaaaa",
                "<|endoftext|><|endoftext|>",
                "a<|im_start|>b<|im_end|>",
                "数字１２３ and ٣٤",
                "tabs\t\tand\u{2028}seps\u{85}",
                "a\x0b\x0cb",
                "x ' y",
                " 'll",
                "''s",
                "'sam",
                "\r\n\r\n  x",
                "1 2  3",
                "$ $$ ",
                "\x00\x1f\x7f!",
                "end  ",
                " ",
                "a1b2",
                "don't 's 'S",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        for tok_name in ["bpe8k", "bpe65500_bos"] {
            let file = fixtures().join(format!("tokenizer/{tok_name}/tokenizer.json"));
            let fast = FastBpe::from_file(&file).expect("a plain byte-level BPE");
            let slow = tokenizers::Tokenizer::from_file(&file).unwrap();
            for special in [true, false] {
                for (i, t) in texts.iter().enumerate() {
                    let mut got = Vec::new();
                    fast.encode(t, special, &mut got);
                    let want = slow.encode(t.as_str(), special).unwrap();
                    assert_eq!(got, want.get_ids(), "{tok_name} doc {i} special={special}");
                }
            }
        }
    }

    #[test]
    fn unsupported_tokenizers_are_left_to_the_tokenizers_crate() {
        let dir = std::env::temp_dir().join(format!("bf-fastbpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src =
            std::fs::read_to_string(fixtures().join("tokenizer/bpe8k/tokenizer.json")).unwrap();
        let mut v: Value = serde_json::from_str(&src).unwrap();
        v["normalizer"] = serde_json::json!({"type": "NFC"});
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(FastBpe::from_file(&p).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

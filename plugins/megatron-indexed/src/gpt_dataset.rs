//! Training samples from an indexed dataset exactly as megatron-core's `GPTDataset` draws them:
//! the split's documents (`split = "969,30,1"`, book-ends rounded half to even), the document
//! index (every epoch's documents, shuffled by NumPy's `RandomState(seed)`; the final epoch
//! shuffled apart when it is less than 80 % used), the sample index (`helpers.build_sample_idx`:
//! where each `seq_length + 1`-token sample starts, samples overlapping by one token), and the
//! shuffle index (a permutation of the samples, again the final epoch apart). Sample `i` is then
//! `shuffle_index[i]`'s tokens.
//!
//! NumPy's legacy generator is MT19937 seeded with `init_genrand`; `shuffle` is Fisher–Yates
//! drawing each index by rejection from a bit mask (`random_interval`). MT19937 itself comes
//! from the `rand_mt` crate; the two NumPy rules on top of it are restated here.

use crate::format::{paths, Index};
use bridgeflow_sdk::arrow_array::{
    builder::Int64Builder, builder::ListBuilder, ArrayRef, RecordBatch,
};
use bridgeflow_sdk::{
    schemars, serde, Emitter, InputMap, PluginError, PortType, Result, Source, StreamPlan,
};
use std::sync::Arc;

/// NumPy's `RandomState(seed)` as far as `shuffle` uses it.
pub struct NumpyRandomState {
    mt: rand_mt::Mt,
}

impl NumpyRandomState {
    pub fn new(seed: u32) -> Self {
        NumpyRandomState {
            mt: rand_mt::Mt::new(seed),
        }
    }

    fn next_u64(&mut self) -> u64 {
        let hi = self.mt.next_u32() as u64;
        (hi << 32) | self.mt.next_u32() as u64
    }

    /// A uniform integer in `0..=max` (NumPy's `random_interval`).
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> s;
        }
        loop {
            let v = if max <= u32::MAX as u64 {
                (self.mt.next_u32() as u64) & mask
            } else {
                self.next_u64() & mask
            };
            if v <= max {
                return v;
            }
        }
    }

    /// `RandomState.shuffle` of a 1-D array.
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.interval(i as u64) as usize;
            x.swap(i, j);
        }
    }
}

/// `parse_and_normalize_split` then the book-ends: each split's `[begin, end)` documents, or
/// None for a split of weight 0.
pub fn split_ranges(split: &str, documents: usize) -> Result<[Option<(usize, usize)>; 3]> {
    let mut w: Vec<f64> = split
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<f64>()
                .map_err(|_| PluginError::config(format!("split '{split}': '{s}' is not a number")))
        })
        .collect::<Result<_>>()?;
    if w.len() > 3 {
        return Err(PluginError::config(format!(
            "split '{split}': at most three weights (train, valid, test)"
        )));
    }
    w.resize(3, 0.0);
    let total: f64 = w.iter().sum();
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        || w.iter().any(|x| !x.is_finite())
    {
        return Err(PluginError::config(format!(
            "split '{split}': the weights must be finite and not all 0"
        )));
    }
    let w: Vec<f64> = w.iter().map(|x| x / total).collect();
    let mut ends = vec![0.0f64];
    for x in &w {
        let last = *ends.last().unwrap();
        ends.push(last + x);
    }
    let n = documents as f64;
    let mut out = [None; 3];
    for i in 0..3 {
        if w[i] == 0.0 {
            continue;
        }
        let beg = (ends[i] * n).round_ties_even() as usize;
        let end = (ends[i + 1] * n).round_ties_even() as usize;
        out[i] = Some((beg, end));
    }
    Ok(out)
}

/// The three indices of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct Indices {
    pub num_epochs: u64,
    pub separate_final_epoch: bool,
    pub document_index: Vec<i32>,
    /// `[samples + 1]` (position in `document_index`, offset in that document).
    pub sample_index: Vec<(i64, i64)>,
    pub shuffle_index: Vec<u64>,
}

/// `_get_num_epochs`: epochs until the tokens cover `num_samples · seq + 1`.
fn num_epochs(tokens_per_epoch: u64, num_samples: u64, seq: u64) -> u64 {
    let wanted = num_samples * seq + 1;
    let (mut epochs, mut tokens) = (1, tokens_per_epoch);
    while tokens < wanted {
        epochs += 1;
        tokens += tokens_per_epoch;
    }
    epochs
}

fn document_index(
    docs: &[i32],
    epochs: u64,
    rng: &mut NumpyRandomState,
    separate: bool,
) -> Vec<i32> {
    if !separate || epochs == 1 {
        let mut all: Vec<i32> = (0..epochs).flat_map(|_| docs.iter().copied()).collect();
        rng.shuffle(&mut all);
        return all;
    }
    let mut first = document_index(docs, epochs - 1, rng, false);
    first.extend(document_index(docs, 1, rng, false));
    first
}

/// `helpers.build_sample_idx` (drop_last_partial_sequence, one extra token per sample).
fn sample_index(
    sizes: &[i32],
    doc_idx: &[i32],
    seq: i64,
    epochs: u64,
    tokens_per_epoch: u64,
) -> Vec<(i64, i64)> {
    let num_samples = ((epochs * tokens_per_epoch) as i64 - 1) / seq;
    let mut out = Vec::with_capacity(num_samples as usize + 1);
    let (mut d, mut offset) = (0usize, 0i64);
    out.push((0, 0));
    while (out.len() as i64) <= num_samples {
        let mut remaining = seq + 1;
        while remaining != 0 {
            let length = sizes[doc_idx[d] as usize] as i64 - offset;
            remaining -= length;
            if remaining <= 0 {
                offset += remaining + length - 1;
                remaining = 0;
            } else {
                if d == doc_idx.len() - 1 {
                    offset = sizes[doc_idx[d] as usize] as i64 - 1;
                    break;
                }
                d += 1;
                offset = 0;
            }
        }
        out.push((d as i64, offset));
    }
    out
}

fn shuffle_index(first: u64, total: u64, rng: &mut NumpyRandomState) -> Vec<u64> {
    let mut a: Vec<u64> = (0..first).collect();
    rng.shuffle(&mut a);
    if first == total {
        return a;
    }
    let mut b: Vec<u64> = (first..total).collect();
    rng.shuffle(&mut b);
    a.extend(b);
    a
}

/// GPTDataset's indices for `num_samples` samples of `seq` tokens from documents `docs` whose
/// token counts are `sizes` (all sequences of the dataset).
pub fn build(
    sizes: &[i32],
    docs: &[i32],
    seq: u64,
    num_samples: u64,
    seed: u32,
) -> Result<Indices> {
    let tokens_per_epoch: u64 = docs.iter().map(|&d| sizes[d as usize].max(0) as u64).sum();
    if tokens_per_epoch < 2 || seq < 2 {
        return Err(PluginError::shape(format!(
            "{} tokens in the split's {} documents: too few for samples of {seq}",
            tokens_per_epoch,
            docs.len()
        )));
    }
    let epochs = num_epochs(tokens_per_epoch, num_samples, seq);
    let (separate, sans_final) = if epochs == 1 {
        (false, 0)
    } else {
        let sans_final = ((epochs - 1) * tokens_per_epoch - 1) / seq;
        let from_final = num_samples - sans_final;
        let per_epoch = (tokens_per_epoch - 1) / seq;
        (from_final < (0.8 * per_epoch as f64) as u64, sans_final)
    };
    let mut rng = NumpyRandomState::new(seed);
    let doc_idx = document_index(docs, epochs, &mut rng, separate);
    let sample_idx = sample_index(sizes, &doc_idx, seq as i64, epochs, tokens_per_epoch);
    let total = sample_idx.len() as u64 - 1;
    let shuffle = shuffle_index(if separate { sans_final } else { total }, total, &mut rng);
    Ok(Indices {
        num_epochs: epochs,
        separate_final_epoch: separate,
        document_index: doc_idx,
        sample_index: sample_idx,
        shuffle_index: shuffle,
    })
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct GptDatasetConfig {
    /// The dataset prefix (`…_text_document`, or its .bin/.idx).
    pub path: String,
    pub seq_length: u64,
    /// Samples to draw (a trainer's `train_iters · global_batch_size`).
    pub num_samples: u64,
    #[serde(default = "seed")]
    pub seed: u32,
    /// Train, valid, test weights (Megatron's `--split`).
    #[serde(default = "split")]
    pub split: String,
    /// Which split to draw: train, valid or test.
    #[serde(default = "train")]
    pub split_name: String,
    /// Samples per record batch.
    #[serde(default = "batch_rows")]
    pub batch_rows: usize,
}

fn seed() -> u32 {
    1234
}
fn split() -> String {
    "969,30,1".into()
}
fn train() -> String {
    "train".into()
}
fn batch_rows() -> usize {
    1024
}

/// Sample `i`'s `seq + 1` tokens (megatron-core's `_query_document_sample_shuffle_indices`).
pub fn sample_tokens(
    ind: &Indices,
    idx: &Index<'_>,
    bin: &[u8],
    i: usize,
    out: &mut Vec<i64>,
) -> Result<()> {
    let s = ind.shuffle_index[i] as usize;
    let (d0, o0) = ind.sample_index[s];
    let (d1, o1) = ind.sample_index[s + 1];
    let size = idx.dtype.size();
    for d in d0..=d1 {
        let doc = ind.document_index[d as usize] as usize;
        let start = if d == d0 { o0 } else { 0 } as usize;
        let end = if d == d1 {
            o1 as usize + 1
        } else {
            idx.length(doc) as usize
        };
        let base = idx.pointer(doc) as usize;
        let bytes = bin
            .get(base + start * size..base + end * size)
            .ok_or_else(|| {
                PluginError::format(format!("sample {i}: document {doc} lies outside the .bin"))
            })?;
        out.extend(bytes.chunks_exact(size).map(|b| idx.dtype.get(b) as i64));
    }
    Ok(())
}

/// The `gpt-dataset` reader: samples as records, a `tokens` list of `seq_length + 1` ids each.
pub struct GptDatasetReader {
    cfg: GptDatasetConfig,
    maps: Option<(InputMap, InputMap)>,
    indices: Option<Indices>,
    emitted: u64,
}

impl GptDatasetReader {
    fn split_position(&self) -> Result<usize> {
        match self.cfg.split_name.as_str() {
            "train" => Ok(0),
            "valid" | "validation" => Ok(1),
            "test" => Ok(2),
            other => Err(PluginError::config(format!(
                "split_name '{other}': expected train, valid or test"
            ))),
        }
    }
}

impl Source for GptDatasetReader {
    type Config = GptDatasetConfig;
    const DESCRIPTION: &'static str =
        "Training samples from a Megatron indexed dataset in megatron-core GPTDataset's order (split, document/sample/shuffle indices, seed)";
    const OUTPUT: PortType = PortType::Records;

    fn new(cfg: GptDatasetConfig) -> Result<Self> {
        if cfg.seq_length < 2 || cfg.num_samples == 0 {
            return Err(PluginError::config(
                "seq_length must be at least 2 and num_samples at least 1",
            ));
        }
        Ok(GptDatasetReader {
            cfg,
            maps: None,
            indices: None,
            emitted: 0,
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        let (bin, idx_path) = paths(&self.cfg.path);
        let idx_map = InputMap::open(&idx_path)?;
        let bin_map = InputMap::open(&bin)?;
        let idx = Index::parse(&idx_path, &idx_map)?;
        if idx.data_bytes() != bin_map.len() as u64 {
            return Err(PluginError::format(format!(
                "{}: {} bytes, but its index describes {}",
                bin.display(),
                bin_map.len(),
                idx.data_bytes()
            )));
        }
        let sizes: Vec<i32> = (0..idx.sequences).map(|i| idx.length(i)).collect();
        let ranges = split_ranges(&self.cfg.split, idx.sequences)?;
        let pos = self.split_position()?;
        let (beg, end) = ranges[pos].ok_or_else(|| {
            PluginError::config(format!(
                "split '{}' gives the {} split no documents",
                self.cfg.split, self.cfg.split_name
            ))
        })?;
        let docs: Vec<i32> = (beg as i32..end as i32).collect();
        let ind = build(
            &sizes,
            &docs,
            self.cfg.seq_length,
            self.cfg.num_samples,
            self.cfg.seed,
        )?;
        if (ind.shuffle_index.len() as u64) < self.cfg.num_samples {
            return Err(PluginError::shape(format!(
                "the {} split holds {} samples of {}; {} asked",
                self.cfg.split_name,
                ind.shuffle_index.len(),
                self.cfg.seq_length,
                self.cfg.num_samples
            )));
        }

        self.indices = Some(ind);
        self.maps = Some((idx_map, bin_map));
        Ok(StreamPlan::default())
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let (idx_map, bin_map) = self.maps.as_ref().expect("planned");
        let (_, idx_path) = paths(&self.cfg.path);
        let idx = Index::parse(&idx_path, idx_map)?;
        let n = self.cfg.num_samples as usize;
        let per = self.cfg.batch_rows.max(1);
        let mut tokens = Vec::with_capacity(self.cfg.seq_length as usize + 1);
        for start in (0..n).step_by(per) {
            let mut list = ListBuilder::new(Int64Builder::new());
            for i in start..(start + per).min(n) {
                tokens.clear();
                sample_tokens(
                    self.indices.as_ref().expect("planned"),
                    &idx,
                    bin_map,
                    i,
                    &mut tokens,
                )?;
                list.values().append_slice(&tokens);
                list.append(true);
            }
            let batch =
                RecordBatch::try_from_iter(vec![("tokens", Arc::new(list.finish()) as ArrayRef)])
                    .map_err(|e| PluginError::internal(e.to_string()))?;
            out.records(&batch)?;
            self.emitted += batch.num_rows() as u64;
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        let ind = self.indices.as_ref();
        format!(
            "{} samples of {} tokens ({} epoch(s){})",
            self.emitted,
            self.cfg.seq_length,
            ind.map_or(0, |i| i.num_epochs),
            if ind.is_some_and(|i| i.separate_final_epoch) {
                ", final epoch shuffled apart"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy 2.5's `RandomState(seed).shuffle(np.arange(n))`.
    #[test]
    fn shuffles_as_numpy() {
        let mut a: Vec<u32> = (0..10).collect();
        NumpyRandomState::new(1234).shuffle(&mut a);
        assert_eq!(a, [7, 2, 9, 1, 0, 8, 4, 5, 6, 3]);
        let mut b: Vec<i32> = (0..100_000).collect();
        NumpyRandomState::new(7).shuffle(&mut b);
        assert_eq!(b[..5], [33909, 92307, 89107, 9538, 31008]);
        assert_eq!(b[99_997..], [49689, 58564, 61615]);
    }

    #[test]
    fn split_bookends_round_half_to_even() {
        // The bpe8k corpus fixture's 3,059 sequences, as megatron-core splits them.
        let r = split_ranges("969,30,1", 3059).unwrap();
        assert_eq!(r, [Some((0, 2964)), Some((2964, 3056)), Some((3056, 3059))]);
        assert_eq!(
            split_ranges("1,0,0", 10).unwrap(),
            [Some((0, 10)), None, None]
        );
        assert!(split_ranges("0,0,0", 10).is_err());
    }

    /// Documents of 5, 3 and 4 tokens, samples of 4 (+1): each sample starts where the last
    /// ended, overlapping by one token.
    #[test]
    fn sample_index_as_megatron_helpers() {
        let s = sample_index(&[5, 3, 4], &[0, 1, 2], 4, 1, 12);
        assert_eq!(s, [(0, 0), (0, 4), (2, 0)]);
    }
}

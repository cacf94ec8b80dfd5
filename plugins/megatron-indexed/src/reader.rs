//! The reader: one dataset, or several read one after another (which, written back, is
//! `tools/merge_datasets.py`). Emits a batch per 1,024 documents: `{key}_ids` (list<uint32>)
//! and `{key}_lens` (list<int32>), empty documents included.

use crate::format::{paths, Index, TokenType};
use bridgeflow_sdk::arrow_array::builder::{Int32Builder, ListBuilder, UInt32Builder};
use bridgeflow_sdk::arrow_array::{ArrayRef, RecordBatch};
use bridgeflow_sdk::InputMap;
use bridgeflow_sdk::{schemars, serde, Emitter, PluginError, PortType, Result, Source, StreamPlan};
use std::path::Path;
use std::sync::Arc;

#[derive(serde::Deserialize, schemars::JsonSchema, Clone)]
#[serde(crate = "bridgeflow_sdk::serde", untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn default_key() -> String {
    "text".into()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct IndexedReaderConfig {
    /// A dataset prefix (`dir/name_text_document`, or its `.bin`/`.idx` path), or a list of them
    /// to read in order (a merge).
    pub path: OneOrMany,
    /// Column name stem for the output (`{key}_ids`, `{key}_lens`); default `text`.
    #[serde(default = "default_key")]
    pub key: String,
}

struct Dataset {
    idx_map: InputMap,
    bin_map: InputMap,
    name: String,
}

pub struct IndexedReader {
    cfg: IndexedReaderConfig,
    sets: Vec<Dataset>,
    dtype: Option<TokenType>,
}

/// Guarded: a dataset truncated or changed while read is named, never a SIGBUS
/// (bridgeflow_sdk::inputs).
fn map(p: &Path) -> Result<InputMap> {
    InputMap::open(p)
}

impl Source for IndexedReader {
    type Config = IndexedReaderConfig;
    const DESCRIPTION: &'static str =
        "Reads Megatron indexed datasets (.bin/.idx); several in order = merge";
    const OUTPUT: PortType = PortType::Records;

    fn new(cfg: IndexedReaderConfig) -> Result<Self> {
        Ok(IndexedReader {
            cfg,
            sets: Vec::new(),
            dtype: None,
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        let prefixes = match &self.cfg.path {
            OneOrMany::One(p) => vec![p.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        if prefixes.is_empty() {
            return Err(PluginError::config("path is an empty list"));
        }
        self.sets.clear();
        let (mut docs, mut seqs, mut tokens) = (0u64, 0u64, 0u64);
        let mut hist = [0u64; 8];
        let mut longest = 0i64;
        for prefix in &prefixes {
            let (bin, idx) = paths(prefix);
            let idx_map = map(&idx)?;
            let bin_map = map(&bin)?;
            let index = Index::parse(&idx, &idx_map)?;
            if index.data_bytes() != bin_map.len() as u64 {
                return Err(PluginError::format(format!(
                    "{}: {} bytes, but its index describes {}",
                    bin.display(),
                    bin_map.len(),
                    index.data_bytes()
                )));
            }
            match self.dtype {
                None => self.dtype = Some(index.dtype),
                Some(d) if d != index.dtype => {
                    return Err(PluginError::shape(format!(
                        "{}: tokens are {}, the datasets before it {}; cannot merge",
                        idx.display(),
                        index.dtype.name(),
                        d.name()
                    )))
                }
                _ => {}
            }
            docs += index.doc_entries as u64 - 1;
            seqs += index.sequences as u64;
            tokens += index.data_bytes() / index.dtype.size() as u64;
            for d in 0..index.doc_entries - 1 {
                let (a, b) = (index.doc_index(d) as usize, index.doc_index(d + 1) as usize);
                // i64: a document's sequences may add up past i32 (each length is checked >= 0).
                let len: i64 = (a..b).map(|s| index.length(s) as i64).sum();
                longest = longest.max(len);
                let bucket = match len {
                    0 => 0,
                    1..=63 => 1,
                    64..=255 => 2,
                    256..=1023 => 3,
                    1024..=4095 => 4,
                    4096..=16383 => 5,
                    16384..=65535 => 6,
                    _ => 7,
                };
                hist[bucket] += 1;
            }
            self.sets.push(Dataset {
                idx_map,
                bin_map,
                name: prefix.clone(),
            });
        }
        let dtype = self.dtype.expect("at least one dataset");
        let labels = [
            "0", "1-63", "64-255", "256-1023", "1k-4k", "4k-16k", "16k-64k", ">=64k",
        ];
        let histogram: std::collections::BTreeMap<String, u64> = labels
            .iter()
            .zip(hist)
            .map(|(l, n)| (l.to_string(), n))
            .collect();
        use bridgeflow_sdk::attrs;
        let mut plan = StreamPlan::default();
        plan.set(attrs::FORMAT, "megatron-indexed");
        plan.set(attrs::TOKEN_DTYPE, dtype.name());
        plan.set(attrs::JSON_KEYS, vec![self.cfg.key.clone()]);
        plan.set(attrs::DOCUMENTS, docs);
        plan.set(attrs::SEQUENCES, seqs);
        plan.set(attrs::TOKENS, tokens);
        // Never negative: the longest of lengths, from 0.
        plan.set(attrs::LONGEST_DOCUMENT_TOKENS, longest.max(0) as u64);
        plan.set(attrs::DOCUMENT_LENGTH_HISTOGRAM, histogram);
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let key = self.cfg.key.clone();
        for set in &self.sets {
            let (bin_path, idx_path) = paths(&set.name);
            let index = Index::parse(&idx_path, &set.idx_map)?;
            let dtype = index.dtype;
            let size = dtype.size();
            let mut ids_b = ListBuilder::new(UInt32Builder::new());
            let mut lens_b = ListBuilder::new(Int32Builder::new());
            let mut rows = 0;
            for d in 0..index.doc_entries - 1 {
                let (a, b) = (index.doc_index(d) as usize, index.doc_index(d + 1) as usize);
                for s in a..b {
                    let len = index.length(s) as usize;
                    let start = index.pointer(s) as usize;
                    let bytes = &set.bin_map[start..start + len * size];
                    for (k, t) in bytes.chunks_exact(size).enumerate() {
                        let id = dtype.get_checked(t).map_err(|v| {
                            PluginError::format(format!(
                                "{}: sequence {s}, token {k}: {v} is not a token id (0 to {})",
                                bin_path.display(),
                                u32::MAX
                            ))
                        })?;
                        ids_b.values().append_value(id);
                    }
                    lens_b.values().append_value(len as i32);
                }
                ids_b.append(true);
                lens_b.append(true);
                rows += 1;
                if rows == 1024 {
                    emit(out, &key, &mut ids_b, &mut lens_b)?;
                    rows = 0;
                }
            }
            if rows > 0 {
                emit(out, &key, &mut ids_b, &mut lens_b)?;
            }
        }
        Ok(())
    }

    fn probe(path: &Path) -> u32 {
        let s = path.to_string_lossy();
        let (bin, idx) = paths(&s);
        if bin.is_file() && idx.is_file() {
            100
        } else {
            0
        }
    }
}

fn emit(
    out: &mut Emitter,
    key: &str,
    ids: &mut ListBuilder<UInt32Builder>,
    lens: &mut ListBuilder<Int32Builder>,
) -> Result<()> {
    let batch = RecordBatch::try_from_iter(vec![
        (format!("{key}_ids"), Arc::new(ids.finish()) as ArrayRef),
        (format!("{key}_lens"), Arc::new(lens.finish()) as ArrayRef),
    ])
    .map_err(|e| PluginError::internal(format!("building a record batch: {e}")))?;
    out.records(&batch)
}

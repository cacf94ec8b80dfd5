//! The `tokenize` transform.

use crate::fastbpe::FastBpe;
use bridgeflow_sdk::arrow_array::builder::{Int32Builder, ListBuilder, UInt32Builder};
use bridgeflow_sdk::arrow_array::{
    Array, ArrayRef, LargeStringArray, ListArray, RecordBatch, StringArray,
};
use bridgeflow_sdk::{
    schemars, serde, Emitter, Item, PluginError, PortType, Result, StreamPlan, Transform,
};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

fn default_keys() -> Vec<String> {
    vec!["text".into()]
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct TokenizeConfig {
    /// A folder holding `tokenizer.json` (and `tokenizer_config.json` naming the eos token), or
    /// the path of a `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Text columns to tokenize (default `["text"]`).
    #[serde(default = "default_keys")]
    pub json_keys: Vec<String>,
    /// Append the end-of-document token to every non-empty document.
    #[serde(default)]
    pub append_eod: bool,
    /// The EOD id; default: the id of the tokenizer's eos token.
    #[serde(default)]
    pub eod_id: Option<u32>,
    /// Threads for encoding (default: all cores).
    #[serde(default)]
    pub workers: usize,
    /// Use the built-in byte-level BPE encoder when the tokenizer allows it (default true; it
    /// gives the same ids as the `tokenizers` crate, several times faster).
    #[serde(default = "yes")]
    pub fast: bool,
}

fn yes() -> bool {
    true
}

/// The most encoding threads: one OS thread each, so a mistyped count (100000) would stall for
/// minutes starting them. 1,024 is more cores than any one host has.
pub const MAX_WORKERS: usize = 1024;

/// One document's (ids, sentence lengths), or why the tokenizer refused it.
type Encoded = std::result::Result<(Vec<u32>, Vec<i32>), String>;

pub struct Tokenize {
    cfg: TokenizeConfig,
    tokenizer: Option<Arc<Tokenizer>>,
    fast: Option<Arc<FastBpe>>,
    eod: Option<u32>,
    pool: Option<rayon::ThreadPool>,
    docs: u64,
    tokens: u64,
}

/// The eos token named by `tokenizer_config.json` or `special_tokens_map.json`.
fn eos_token(dir: &Path) -> Option<String> {
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match v.get("eos_token") {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(o) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Some(s.to_string());
                }
            }
            None => {}
        }
    }
    None
}

impl Tokenize {
    fn load(&mut self) -> Result<()> {
        let (file, dir) = if self.cfg.tokenizer.is_dir() {
            (
                self.cfg.tokenizer.join("tokenizer.json"),
                self.cfg.tokenizer.clone(),
            )
        } else {
            (
                self.cfg.tokenizer.clone(),
                self.cfg
                    .tokenizer
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            )
        };
        let tok = Tokenizer::from_file(&file).map_err(|e| {
            PluginError::config(format!("cannot load tokenizer {}: {e}", file.display()))
        })?;
        self.eod = match self.cfg.eod_id {
            Some(id) => Some(id),
            None => eos_token(&dir).and_then(|t| tok.token_to_id(&t)),
        };
        if self.cfg.append_eod && self.eod.is_none() {
            return Err(PluginError::config(format!(
                "append_eod is set but {} names no eos token; set eod_id",
                dir.display()
            )));
        }
        self.tokenizer = Some(Arc::new(tok));
        if self.cfg.fast {
            self.fast = FastBpe::from_file(&file).map(Arc::new);
        }
        let threads = if self.cfg.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.cfg.workers
        };
        self.pool = Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("tokenize-{i}"))
                .build()
                .map_err(|e| PluginError::internal(format!("thread pool: {e}")))?,
        );
        Ok(())
    }

    /// One document: (ids, sentence lengths), as preprocess_data.py's Encoder.encode builds them.
    fn encode_doc(
        tok: &Tokenizer,
        fast: Option<&FastBpe>,
        eod: Option<u32>,
        sentences: &[&str],
    ) -> std::result::Result<(Vec<u32>, Vec<i32>), String> {
        let mut ids = Vec::new();
        let mut lens = Vec::new();
        for s in sentences {
            let before = ids.len();
            match fast {
                Some(f) => f.encode(s, true, &mut ids),
                None => {
                    let enc = tok.encode_fast(*s, true).map_err(|e| e.to_string())?;
                    ids.extend_from_slice(enc.get_ids());
                }
            }
            if ids.len() > before {
                lens.push((ids.len() - before) as i32);
            }
        }
        if let (Some(e), false) = (eod, ids.is_empty()) {
            ids.push(e);
            *lens.last_mut().expect("non-empty") += 1;
        }
        Ok((ids, lens))
    }
}

impl Transform for Tokenize {
    type Config = TokenizeConfig;
    const DESCRIPTION: &'static str =
        "Tokenizes list<utf8> text columns with a tokenizer.json; adds <key>_ids and <key>_lens";
    const INPUTS: &'static [PortType] = &[PortType::Records];
    const OUTPUT: PortType = PortType::Records;

    fn new(cfg: TokenizeConfig) -> Result<Self> {
        if cfg.json_keys.is_empty() {
            return Err(PluginError::config("json_keys is empty"));
        }
        if cfg.workers > MAX_WORKERS {
            return Err(PluginError::config(format!(
                "workers (--workers) is {}; allowed: 0 (all cores) to {MAX_WORKERS}",
                cfg.workers
            )));
        }
        Ok(Tokenize {
            cfg,
            tokenizer: None,
            fast: None,
            eod: None,
            pool: None,
            docs: 0,
            tokens: 0,
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        self.load()?;
        let tok = self.tokenizer.as_ref().expect("loaded");
        let mut plan = inputs[0].clone();
        // Megatron sizes the token dtype by len(tokenizer): the vocabulary with added tokens.
        use bridgeflow_sdk::attrs;
        plan.set(attrs::VOCAB_SIZE, tok.get_vocab_size(true) as u64);
        if let Some(e) = self.eod {
            plan.set(attrs::EOD_ID, e);
        }
        plan.set(attrs::JSON_KEYS, self.cfg.json_keys.clone());
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let batch = item.into_records()?;
        let tok = self.tokenizer.clone().expect("planned");
        let fast = self.fast.clone();
        let eod = if self.cfg.append_eod { self.eod } else { None };
        let mut columns: Vec<(String, ArrayRef)> = Vec::new();
        for keep in ["_line", "_file"] {
            if let Some(c) = batch.column_by_name(keep) {
                columns.push((keep.to_string(), c.clone()));
            }
        }
        let lines = batch
            .column_by_name("_line")
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<bridgeflow_sdk::arrow_array::UInt64Array>()
            })
            .cloned();
        for key in &self.cfg.json_keys {
            let col = batch
                .column_by_name(key)
                .ok_or_else(|| PluginError::shape(format!("input has no column '{key}'")))?;
            // list<utf8>: one document of several sentences; utf8: one sentence per document.
            let docs: Vec<Vec<&str>> = if let Some(list) = col.as_any().downcast_ref::<ListArray>()
            {
                let values = list
                    .values()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| {
                        PluginError::shape(format!("column '{key}' is not list<utf8>"))
                    })?;
                let offsets = list.value_offsets();
                (0..list.len())
                    .map(|i| {
                        (offsets[i] as usize..offsets[i + 1] as usize)
                            .map(|j| values.value(j))
                            .collect()
                    })
                    .collect()
            } else if let Some(strings) = col.as_any().downcast_ref::<StringArray>() {
                if strings.null_count() > 0 {
                    return Err(PluginError::shape(format!(
                        "column '{key}' has null values"
                    )));
                }
                (0..strings.len()).map(|i| vec![strings.value(i)]).collect()
            } else if let Some(strings) = col.as_any().downcast_ref::<LargeStringArray>() {
                if strings.null_count() > 0 {
                    return Err(PluginError::shape(format!(
                        "column '{key}' has null values"
                    )));
                }
                (0..strings.len()).map(|i| vec![strings.value(i)]).collect()
            } else {
                return Err(PluginError::shape(format!(
                    "column '{key}' is {}, expected utf8 or list<utf8>",
                    col.data_type()
                )));
            };
            let encoded: Vec<Encoded> = self.pool.as_ref().expect("planned").install(|| {
                docs.par_iter()
                    .map(|d| Self::encode_doc(&tok, fast.as_deref(), eod, d))
                    .collect()
            });
            let mut ids_b = ListBuilder::new(UInt32Builder::new());
            let mut lens_b = ListBuilder::new(Int32Builder::new());
            for (i, r) in encoded.into_iter().enumerate() {
                let (ids, lens) = r.map_err(|e| {
                    let line = lines.as_ref().map(|l| l.value(i)).unwrap_or(0);
                    PluginError::format(format!("line {line}: key '{key}': tokenizer failed: {e}"))
                })?;
                self.tokens += ids.len() as u64;
                ids_b.values().append_slice(&ids);
                ids_b.append(true);
                lens_b.values().append_slice(&lens);
                lens_b.append(true);
            }
            columns.push((format!("{key}_ids"), Arc::new(ids_b.finish())));
            columns.push((format!("{key}_lens"), Arc::new(lens_b.finish())));
        }
        self.docs += batch.num_rows() as u64;
        let out_batch = RecordBatch::try_from_iter(columns)
            .map_err(|e| PluginError::internal(format!("building a record batch: {e}")))?;
        out.records(&out_batch)
    }
}

//! The `jsonl` reader stage.

use crate::lines::UniversalLines;
use crate::pyjson::{document_sentences, parse_document};
use bridgeflow_sdk::arrow_array::builder::{
    ListBuilder, StringBuilder, UInt32Builder, UInt64Builder,
};
use bridgeflow_sdk::arrow_array::{ArrayRef, RecordBatch};
use bridgeflow_sdk::{schemars, serde, Emitter, PluginError, PortType, Result, Source, StreamPlan};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn default_keys() -> Vec<String> {
    vec!["text".into()]
}
fn default_batch_rows() -> usize {
    1024
}

#[derive(serde::Deserialize, schemars::JsonSchema, Clone, Copy)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct Partition {
    pub index: u64,
    pub count: u64,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct JsonlConfig {
    /// A file, a folder (its `*.jsonl`, `*.json`, `*.jsonl.gz`, `*.jsonl.zst`), or a glob such as
    /// `data/*.jsonl.zst`. Several files are read in sorted order.
    pub path: String,
    /// Keys to read; each becomes a `list<utf8>` column (default `["text"]`).
    #[serde(default = "default_keys")]
    pub json_keys: Vec<String>,
    /// Also emit each whole document as a JSON string column `_json` (for stages that need
    /// structured fields, such as chat `messages`); `json_keys` may then be empty.
    #[serde(default)]
    pub raw_json: bool,
    /// Skip lines that are not valid documents (counted and reported) instead of failing.
    #[serde(default)]
    pub skip_bad_lines: bool,
    /// Documents per record batch (default 1024; batches also close at 8 MiB of text).
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Read only lines `i` with `i % count == index` (0-based, over all files in order): the
    /// round-robin split of `preprocess_data.py --partitions`.
    #[serde(default)]
    pub partition: Option<Partition>,
}

pub struct JsonlReader {
    cfg: JsonlConfig,
    files: Vec<PathBuf>,
    /// Bytes of the input files, as planned.
    input_bytes: u64,
    docs: u64,
    skipped: u64,
    first_skips: Vec<String>,
}

const BATCH_BYTES: usize = 8 << 20;

/// The most partitions: each one is a full pass over the input (lines are dealt round-robin),
/// so more than this is minutes of re-reading for nothing; Megatron's `--partitions` is bounded
/// by its `--workers` (it asserts `workers % partitions == 0`), and tokenize's workers by 1,024.
pub const MAX_PARTITIONS: u64 = 1024;
/// The most documents per batch (batches also close at 8 MiB of text).
pub const MAX_BATCH_ROWS: usize = 1 << 20;

fn is_jsonl(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    [
        ".jsonl",
        ".json",
        ".jsonl.gz",
        ".json.gz",
        ".jsonl.zst",
        ".json.zst",
    ]
    .iter()
    .any(|s| n.ends_with(s))
}

/// The files a `path` config names, in order.
pub fn resolve(path: &str) -> Result<Vec<PathBuf>> {
    bridgeflow_sdk::fsutil::resolve_inputs(path, is_jsonl)
}

fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).map_err(|e| PluginError::io(path, "cannot open", e))?;
    let name = path.to_string_lossy();
    let r: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            f,
        )))
    } else if name.ends_with(".zst") {
        let d = ruzstd::decoding::StreamingDecoder::new(BufReader::with_capacity(1 << 20, f))
            .map_err(|e| {
                PluginError::format(format!("{}: not a zstd stream: {e}", path.display()))
            })?;
        Box::new(d)
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

struct Batch {
    lines: UInt64Builder,
    file: UInt32Builder,
    raw: Option<StringBuilder>,
    cols: Vec<ListBuilder<StringBuilder>>,
    rows: usize,
    bytes: usize,
}

impl Batch {
    fn new(keys: usize, raw: bool) -> Batch {
        Batch {
            lines: UInt64Builder::new(),
            file: UInt32Builder::new(),
            raw: raw.then(StringBuilder::new),
            cols: (0..keys)
                .map(|_| ListBuilder::new(StringBuilder::new()))
                .collect(),
            rows: 0,
            bytes: 0,
        }
    }

    fn finish(&mut self, keys: &[String]) -> Result<RecordBatch> {
        let mut columns: Vec<(String, ArrayRef)> = vec![
            ("_line".into(), Arc::new(self.lines.finish()) as ArrayRef),
            ("_file".into(), Arc::new(self.file.finish()) as ArrayRef),
        ];
        if let Some(r) = self.raw.as_mut() {
            columns.push(("_json".into(), Arc::new(r.finish()) as ArrayRef));
        }
        for (k, c) in keys.iter().zip(self.cols.iter_mut()) {
            columns.push((k.clone(), Arc::new(c.finish()) as ArrayRef));
        }
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_from_iter(columns)
            .map_err(|e| PluginError::internal(format!("building a record batch: {e}")))
    }
}

impl JsonlReader {
    fn bad_line(&mut self, file: &Path, line: u64, reason: &str) -> Result<()> {
        let msg = format!("{}:{line}: {reason}", file.display());
        if !self.cfg.skip_bad_lines {
            return Err(PluginError::format(format!(
                "{msg} (use skip_bad_lines / --skip-bad-lines to skip such lines)"
            )));
        }
        self.skipped += 1;
        if self.first_skips.len() < 5 {
            self.first_skips.push(msg);
        }
        Ok(())
    }
}

impl Source for JsonlReader {
    type Config = JsonlConfig;
    const DESCRIPTION: &'static str =
        "Reads JSON Lines (plain/.gz/.zst, globs) into batches: one list<utf8> column per key";
    const OUTPUT: PortType = PortType::Records;

    fn new(cfg: JsonlConfig) -> Result<Self> {
        if cfg.json_keys.is_empty() && !cfg.raw_json {
            return Err(PluginError::config(
                "json_keys is empty (and raw_json is off)",
            ));
        }
        if let Some(p) = cfg.partition {
            if p.count == 0 || p.count > MAX_PARTITIONS {
                return Err(PluginError::config(format!(
                    "partition.count (--partitions) is {}; allowed: 1 to {MAX_PARTITIONS}",
                    p.count
                )));
            }
            if p.index >= p.count {
                return Err(PluginError::config(format!(
                    "partition index {} of {} is out of range",
                    p.index, p.count
                )));
            }
        }
        if cfg.batch_rows > MAX_BATCH_ROWS {
            return Err(PluginError::config(format!(
                "batch_rows is {}; allowed: 0 to {MAX_BATCH_ROWS}",
                cfg.batch_rows
            )));
        }
        Ok(JsonlReader {
            cfg,
            files: Vec::new(),
            input_bytes: 0,
            docs: 0,
            skipped: 0,
            first_skips: Vec::new(),
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        self.files = resolve(&self.cfg.path)?;
        let bytes: u64 = self
            .files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        let mut plan = StreamPlan::default();
        plan.set(bridgeflow_sdk::attrs::JSON_KEYS, self.cfg.json_keys.clone());
        plan.set(bridgeflow_sdk::attrs::INPUT_FILES, self.files.clone());
        plan.set(bridgeflow_sdk::attrs::INPUT_BYTES, bytes);
        self.input_bytes = bytes;
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let keys = self.cfg.json_keys.clone();
        let mut batch = Batch::new(keys.len(), self.cfg.raw_json);
        let mut global_line: u64 = 0;
        let files = self.files.clone();
        for (fi, file) in files.iter().enumerate() {
            let mut line_no: u64 = 0;
            for line in UniversalLines::new(open(file)?) {
                let line = line.map_err(|e| PluginError::io(file, "cannot read", e))?;
                line_no += 1;
                let index = global_line;
                global_line += 1;
                if let Some(p) = self.cfg.partition {
                    if index % p.count != p.index {
                        continue;
                    }
                }
                let text = match std::str::from_utf8(&line) {
                    Ok(t) => t,
                    Err(e) => {
                        self.bad_line(
                            file,
                            line_no,
                            &format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
                        )?;
                        continue;
                    }
                };
                let doc = match parse_document(text) {
                    Ok(d) => d,
                    Err(reason) => {
                        self.bad_line(file, line_no, &reason)?;
                        continue;
                    }
                };
                let mut values = Vec::with_capacity(keys.len());
                let mut bad = None;
                for k in &keys {
                    match document_sentences(&doc, k) {
                        Ok(v) => values.push(v),
                        Err(reason) => {
                            bad = Some(reason);
                            break;
                        }
                    }
                }
                if let Some(reason) = bad {
                    self.bad_line(file, line_no, &reason)?;
                    continue;
                }
                if let Some(r) = batch.raw.as_mut() {
                    let doc = &doc.value;
                    if !doc.is_object() {
                        self.bad_line(file, line_no, "the line is not a JSON object")?;
                        continue;
                    }
                    batch.bytes += text.len();
                    r.append_value(doc.to_string());
                }
                batch.lines.append_value(line_no);
                batch.file.append_value(fi as u32);
                for (col, v) in batch.cols.iter_mut().zip(values) {
                    for s in &v {
                        batch.bytes += s.len();
                        col.values().append_value(s);
                    }
                    col.append(true);
                }
                batch.rows += 1;
                self.docs += 1;
                if batch.rows >= self.cfg.batch_rows.max(1) || batch.bytes >= BATCH_BYTES {
                    out.records(&batch.finish(&keys)?)?;
                }
            }
        }
        if batch.rows > 0 {
            out.records(&batch.finish(&keys)?)?;
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        let mut s = format!(
            "read {} documents from {} file{}",
            self.docs,
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" }
        );
        if self.skipped > 0 {
            s.push_str(&format!(
                "; skipped {} bad line{} (first: {})",
                self.skipped,
                if self.skipped == 1 { "" } else { "s" },
                self.first_skips.join("; ")
            ));
        }
        s
    }

    fn metrics(&mut self) -> serde_json::Value {
        serde_json::json!({
            "documents": self.docs,
            "files": self.files.len(),
            "input_bytes": self.input_bytes,
            "skipped_lines": self.skipped,
        })
    }

    fn probe(path: &Path) -> u32 {
        if path.is_file() && is_jsonl(path) {
            60
        } else {
            0
        }
    }
}

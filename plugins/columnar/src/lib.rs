//! bridgeflow plugins `parquet` and `arrow-ipc`: read columnar files (one, a folder, or a glob
//! of many) as record batches, keeping only the selected columns and adding `_line` (the 1-based
//! row number within its file) and `_file` (the file's index), like the `jsonl` reader.

use bridgeflow_sdk::arrow_array::{ArrayRef, RecordBatch, UInt32Array, UInt64Array};
use bridgeflow_sdk::{schemars, serde, Emitter, PluginError, PortType, Result, Source, StreamPlan};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn default_columns() -> Vec<String> {
    vec!["text".into()]
}
fn default_batch_rows() -> usize {
    1024
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct ColumnarConfig {
    /// A file, a folder, or a glob (`data/*.parquet`); files are read in sorted order.
    pub path: String,
    /// Columns to keep (default `["text"]`); for the tokenizer these are its `json_keys`.
    #[serde(default = "default_columns", alias = "json_keys")]
    pub columns: Vec<String>,
    /// Rows per batch (default 1024).
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
}

/// The most rows per batch: a batch is sized from this (Parquet's reader allocates for it, up
/// to the file's own row count), so it is bounded like the `jsonl` reader's.
pub const MAX_BATCH_ROWS: usize = 1 << 20;

fn check(cfg: &ColumnarConfig) -> Result<()> {
    if cfg.batch_rows > MAX_BATCH_ROWS {
        return Err(PluginError::config(format!(
            "batch_rows is {}; allowed: 0 to {MAX_BATCH_ROWS}",
            cfg.batch_rows
        )));
    }
    Ok(())
}

fn resolve(path: &str, exts: &[&str]) -> Result<Vec<PathBuf>> {
    bridgeflow_sdk::fsutil::resolve_inputs(path, |f| {
        f.extension().is_some_and(|x| exts.iter().any(|e| x == *e))
    })
}

/// Keeps the selected columns and adds `_line`/`_file`.
fn select(
    file: &Path,
    fi: usize,
    first_row: u64,
    batch: &RecordBatch,
    cols: &[String],
) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let mut out: Vec<(String, ArrayRef)> = vec![
        (
            "_line".into(),
            Arc::new(UInt64Array::from_iter_values(
                (0..n as u64).map(|i| first_row + i + 1),
            )),
        ),
        (
            "_file".into(),
            Arc::new(UInt32Array::from(vec![fi as u32; n])),
        ),
    ];
    for c in cols {
        let col = batch
            .column_by_name(c)
            .ok_or_else(|| PluginError::shape(format!("{}: no column '{c}'", file.display())))?;
        out.push((c.clone(), col.clone()));
    }
    RecordBatch::try_from_iter(out).map_err(|e| PluginError::internal(e.to_string()))
}

fn plan_for(files: &[PathBuf], cols: &[String]) -> StreamPlan {
    let mut plan = StreamPlan::default();
    plan.set(bridgeflow_sdk::attrs::JSON_KEYS, cols.to_vec());
    plan.set(bridgeflow_sdk::attrs::INPUT_FILES, files.to_vec());
    plan
}

pub struct ParquetReader {
    cfg: ColumnarConfig,
    files: Vec<PathBuf>,
    rows: u64,
}

impl Source for ParquetReader {
    type Config = ColumnarConfig;
    const DESCRIPTION: &'static str =
        "Reads Parquet files (globs) as record batches of selected columns";
    const OUTPUT: PortType = PortType::Records;

    fn new(cfg: ColumnarConfig) -> Result<Self> {
        check(&cfg)?;
        Ok(ParquetReader {
            cfg,
            files: Vec::new(),
            rows: 0,
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        self.files = resolve(&self.cfg.path, &["parquet", "pq"])?;
        Ok(plan_for(&self.files, &self.cfg.columns))
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::arrow::ProjectionMask;
        for (fi, file) in self.files.clone().iter().enumerate() {
            let f =
                std::fs::File::open(file).map_err(|e| PluginError::io(file, "cannot open", e))?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| {
                PluginError::format(format!("{}: not Parquet: {e}", file.display()))
            })?;
            let schema = builder.parquet_schema();
            let indices: Vec<usize> = self
                .cfg
                .columns
                .iter()
                .map(|c| {
                    (0..schema.num_columns())
                        .find(|&i| schema.column(i).path().parts().first() == Some(c))
                        .ok_or_else(|| {
                            PluginError::shape(format!("{}: no column '{c}'", file.display()))
                        })
                })
                .collect::<Result<_>>()?;
            let mask = ProjectionMask::leaves(schema, indices);
            let reader = builder
                .with_projection(mask)
                .with_batch_size(self.cfg.batch_rows.max(1))
                .build()
                .map_err(|e| PluginError::format(format!("{}: {e}", file.display())))?;
            let mut row = 0u64;
            for b in reader {
                let b = b.map_err(|e| PluginError::format(format!("{}: {e}", file.display())))?;
                out.records(&select(file, fi, row, &b, &self.cfg.columns)?)?;
                row += b.num_rows() as u64;
            }
            self.rows += row;
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        format!(
            "read {} rows from {} Parquet file(s)",
            self.rows,
            self.files.len()
        )
    }

    fn probe(path: &Path) -> u32 {
        (path.is_file()
            && path
                .extension()
                .is_some_and(|x| x == "parquet" || x == "pq")) as u32
            * 60
    }
}

pub struct IpcReader {
    cfg: ColumnarConfig,
    files: Vec<PathBuf>,
    rows: u64,
}

impl Source for IpcReader {
    type Config = ColumnarConfig;
    const DESCRIPTION: &'static str =
        "Reads Arrow IPC files or streams (globs) as record batches of selected columns";
    const OUTPUT: PortType = PortType::Records;

    fn new(cfg: ColumnarConfig) -> Result<Self> {
        check(&cfg)?;
        Ok(IpcReader {
            cfg,
            files: Vec::new(),
            rows: 0,
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        self.files = resolve(&self.cfg.path, &["arrow", "feather", "ipc", "arrows"])?;
        Ok(plan_for(&self.files, &self.cfg.columns))
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        for (fi, file) in self.files.clone().iter().enumerate() {
            let open =
                || std::fs::File::open(file).map_err(|e| PluginError::io(file, "cannot open", e));
            // The file format (with footer) first, then the streaming format.
            let batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, _>>> =
                match arrow_ipc::reader::FileReader::try_new(open()?, None) {
                    Ok(r) => Box::new(r),
                    Err(_) => Box::new(
                        arrow_ipc::reader::StreamReader::try_new(
                            std::io::BufReader::new(open()?),
                            None,
                        )
                        .map_err(|e| {
                            PluginError::format(format!("{}: not Arrow IPC: {e}", file.display()))
                        })?,
                    ),
                };
            let mut row = 0u64;
            for b in batches {
                let b = b.map_err(|e| PluginError::format(format!("{}: {e}", file.display())))?;
                let mut start = 0;
                while start < b.num_rows() {
                    let n = self.cfg.batch_rows.max(1).min(b.num_rows() - start);
                    out.records(&select(
                        file,
                        fi,
                        row,
                        &b.slice(start, n),
                        &self.cfg.columns,
                    )?)?;
                    start += n;
                    row += n as u64;
                }
            }
            self.rows += row;
        }
        Ok(())
    }

    fn summary(&mut self) -> String {
        format!(
            "read {} rows from {} Arrow IPC file(s)",
            self.rows,
            self.files.len()
        )
    }
}

bridgeflow_sdk::export_plugins! {
    "parquet" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Parquet reader (globs, column selection) as record batches",
        reader: Source(ParquetReader),
    }
    "arrow-ipc" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Arrow IPC file/stream reader (globs, column selection) as record batches",
        reader: Source(IpcReader),
    }
}

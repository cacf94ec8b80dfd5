//! The `sft` writer: offline packing into Megatron-Bridge's packed Parquet.
//!
//! Packing needs every length before the first bin is filled, so tokenized sequences are spilled
//! to a temporary file as they arrive and only (offset, length) stays in memory; rows are then
//! assembled from a memory map of that file, one at a time. Output is written under a temporary
//! name and renamed at commit; the metadata list is updated the same way.

use crate::mt19937::LegacyRandom;
use crate::packing::{assign, metadata, Algorithm, PackMetadata};
use bridgeflow_sdk::arrow_array::builder::{Int64Builder, Int8Builder, ListBuilder};
use bridgeflow_sdk::arrow_array::{
    Array, ArrayRef, Int8Array, ListArray, RecordBatch, UInt32Array,
};
use bridgeflow_sdk::{schemars, serde, Item, PluginError, PortType, Result, Sink, StreamPlan};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

fn default_algorithm() -> String {
    "first_fit_shuffle".into()
}
fn one() -> usize {
    1
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct PackConfig {
    /// The packed Parquet file, e.g. `packed/training_4096.idx.parquet`.
    pub output: PathBuf,
    /// Tokens per packed row (`packed_sequence_size`).
    pub pack_size: usize,
    /// Longest sequence kept, as `len(input_ids) - 1` (default: `pack_size`).
    #[serde(default)]
    pub max_seq_length: Option<usize>,
    /// `first_fit_shuffle` (Bridge's default) or `first_fit_decreasing`.
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Seed of numpy's legacy generator, as Bridge's `seed` (default 0).
    #[serde(default)]
    pub seed: u32,
    /// Pad each sequence so that `len - 1` is a multiple of this (THD context parallelism).
    #[serde(default = "one")]
    pub pad_seq_to_mult: usize,
    /// Padding token (default: the tokenizer's EOD, as Bridge).
    #[serde(default)]
    pub pad_id: Option<u32>,
    /// Metadata list to append to (default: `{pack_size}_metadata.jsonl` beside the output).
    #[serde(default)]
    pub metadata: Option<PathBuf>,
    /// Replace an existing output file.
    #[serde(default)]
    pub overwrite: bool,
}

/// The largest `pack_size` (and `max_seq_length`): 2^24 = 16,777,216 tokens per packed row.
/// Above every context length models train with (1M-10M tokens), and it keeps the bounds of
/// what one row costs: 9 bytes a token in the row being built (i64 id + i8 mask), 150 MiB at
/// most, and `cu_seqlens`/`seq_start_id` far inside i32. Nothing is allocated from these
/// numbers themselves: the length buckets are sized by the longest sequence actually seen.
pub const MAX_PACK_SIZE: usize = 1 << 24;

pub struct PackWriter {
    cfg: PackConfig,
    algo: Algorithm,
    pad_id: u32,
    spill_path: PathBuf,
    spill: Option<BufWriter<File>>,
    spill_len: u64,
    /// (byte offset in the spill file, token count) per sequence, in input order.
    seqs: Vec<(u64, u32)>,
    committed: bool,
    /// The output's lock, from `open` until the commit is done.
    claim: Option<bridgeflow_sdk::fsutil::OutputClaim>,
}

fn tmp(p: &std::path::Path, what: &str) -> PathBuf {
    bridgeflow_sdk::fsutil::hidden_sibling(p, &format!("{what}_partial"))
}

impl PackWriter {
    fn max_len(&self) -> usize {
        self.cfg.max_seq_length.unwrap_or(self.cfg.pack_size)
    }

    /// Bridge's pre-padding for `pad_seq_to_mult > 1` (`_pre_pad_data_point`).
    fn pad(&self, ids: &mut Vec<u32>, mask: &mut Vec<i8>) {
        let m = self.cfg.pad_seq_to_mult;
        if m <= 1 {
            return;
        }
        let cap = self.max_len() / m * m;
        let runtime = ids.len().saturating_sub(1);
        let target = cap.min(runtime.div_ceil(m) * m) + 1;
        ids.resize(target, self.pad_id);
        mask.resize(target, 0);
    }

    fn write_parquet(
        &self,
        rows: impl Iterator<Item = Result<(Vec<i64>, Vec<i8>, Vec<i64>)>>,
        to: &std::path::Path,
    ) -> Result<usize> {
        let file = File::create(to).map_err(|e| PluginError::io(to, "cannot create", e))?;
        let props = WriterProperties::builder()
            .set_max_row_group_size(500)
            .build();
        let mut writer: Option<ArrowWriter<File>> = None;
        let mut file = Some(file);
        let (mut ids_b, mut mask_b, mut start_b) = (
            ListBuilder::new(Int64Builder::new()),
            ListBuilder::new(Int8Builder::new()),
            ListBuilder::new(Int64Builder::new()),
        );
        let mut n = 0usize;
        let mut pending = 0usize;
        let flush = |ids_b: &mut ListBuilder<Int64Builder>,
                     mask_b: &mut ListBuilder<Int8Builder>,
                     start_b: &mut ListBuilder<Int64Builder>,
                     writer: &mut Option<ArrowWriter<File>>,
                     file: &mut Option<File>|
         -> Result<()> {
            let batch = RecordBatch::try_from_iter(vec![
                ("input_ids", Arc::new(ids_b.finish()) as ArrayRef),
                ("loss_mask", Arc::new(mask_b.finish()) as ArrayRef),
                ("seq_start_id", Arc::new(start_b.finish()) as ArrayRef),
            ])
            .map_err(|e| PluginError::internal(e.to_string()))?;
            if writer.is_none() {
                *writer = Some(
                    ArrowWriter::try_new(
                        file.take().expect("once"),
                        batch.schema(),
                        Some(props.clone()),
                    )
                    .map_err(|e| PluginError::internal(format!("parquet: {e}")))?,
                );
            }
            writer.as_mut().unwrap().write(&batch).map_err(|e| {
                PluginError::io(to, "cannot write", std::io::Error::other(e.to_string()))
            })
        };
        for row in rows {
            let (ids, mask, starts) = row?;
            ids_b.values().append_slice(&ids);
            ids_b.append(true);
            mask_b.values().append_slice(&mask);
            mask_b.append(true);
            start_b.values().append_slice(&starts);
            start_b.append(true);
            n += 1;
            pending += 1;
            if pending == 500 {
                flush(
                    &mut ids_b,
                    &mut mask_b,
                    &mut start_b,
                    &mut writer,
                    &mut file,
                )?;
                pending = 0;
            }
        }
        if pending > 0 || writer.is_none() {
            flush(
                &mut ids_b,
                &mut mask_b,
                &mut start_b,
                &mut writer,
                &mut file,
            )?;
        }
        let f = writer.unwrap().into_inner().map_err(|e| {
            PluginError::io(to, "cannot finish", std::io::Error::other(e.to_string()))
        })?;
        f.sync_all()
            .map_err(|e| PluginError::io(to, "cannot sync", e))?;
        Ok(n)
    }

    fn append_metadata(&self, m: &PackMetadata) -> Result<PathBuf> {
        let path = self.cfg.metadata.clone().unwrap_or_else(|| {
            self.cfg
                .output
                .with_file_name(format!("{}_metadata.jsonl", self.cfg.pack_size))
        });
        let mut list: Vec<serde_json::Value> = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                PluginError::format(format!("{}: not a metadata list: {e}", path.display()))
            })?,
            Err(_) => Vec::new(),
        };
        list.push(serde_json::to_value(m).expect("json"));
        // Written as Python's json.dump writes Bridge's list: its key order, ", " and ": ".
        let text = format!(
            "[{}]",
            list.iter().map(python_json).collect::<Vec<_>>().join(", ")
        );
        let t = tmp(&path, "tmp");
        std::fs::write(&t, text).map_err(|e| PluginError::io(&t, "cannot write", e))?;
        std::fs::rename(&t, &path).map_err(|e| PluginError::io(&path, "cannot write", e))?;
        Ok(path)
    }
}

const KEY_ORDER: [&str; 6] = [
    "dataset_max_seqlen",
    "max_samples_per_bin",
    "packing_factor",
    "packing_efficiency",
    "pack_size",
    "min_packed_seqlen",
];

/// One metadata dict as Python's `json.dumps` prints it (Bridge's key order first).
fn python_json(v: &serde_json::Value) -> String {
    let num = |n: &serde_json::Number| match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 => format!("{f:.1}"),
        _ => n.to_string(),
    };
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = KEY_ORDER
                .iter()
                .filter_map(|k| map.get_key_value(*k).map(|(k, _)| k))
                .collect();
            keys.extend(map.keys().filter(|k| !KEY_ORDER.contains(&k.as_str())));
            let items: Vec<String> = keys
                .iter()
                .map(|k| {
                    format!(
                        "{}: {}",
                        serde_json::Value::String(k.to_string()),
                        python_json(&map[*k])
                    )
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        serde_json::Value::Number(n) => num(n),
        other => other.to_string(),
    }
}

impl Sink for PackWriter {
    type Config = PackConfig;
    const DESCRIPTION: &'static str =
        "Packs tokenized SFT sequences (first_fit_shuffle/decreasing) into Bridge's packed Parquet";
    const INPUTS: &'static [PortType] = &[PortType::Records];

    fn new(cfg: PackConfig) -> Result<Self> {
        let algo = Algorithm::parse(&cfg.algorithm).ok_or_else(|| {
            PluginError::config(format!(
                "algorithm '{}': expected first_fit_shuffle or first_fit_decreasing",
                cfg.algorithm
            ))
        })?;
        if cfg.pack_size == 0 || cfg.pack_size > MAX_PACK_SIZE {
            return Err(PluginError::config(format!(
                "pack_size is {}; allowed: 1 to {MAX_PACK_SIZE} tokens",
                cfg.pack_size
            )));
        }
        if let Some(m) = cfg.max_seq_length.filter(|&m| m > MAX_PACK_SIZE) {
            return Err(PluginError::config(format!(
                "max_seq_length is {m}; allowed: 0 to {MAX_PACK_SIZE} tokens"
            )));
        }
        let max_len = cfg.max_seq_length.unwrap_or(cfg.pack_size);
        // Padding to a multiple larger than the longest sequence kept would cut every sequence
        // to one token.
        if cfg.pad_seq_to_mult == 0 || (cfg.pad_seq_to_mult > 1 && cfg.pad_seq_to_mult > max_len) {
            return Err(PluginError::config(format!(
                "pad_seq_to_mult is {}; allowed: 1 to max_seq_length ({max_len})",
                cfg.pad_seq_to_mult
            )));
        }
        let spill_path = tmp(&cfg.output, "sequences");
        Ok(PackWriter {
            cfg,
            algo,
            pad_id: 0,
            spill_path,
            spill: None,
            spill_len: 0,
            seqs: Vec::new(),
            committed: false,
            claim: None,
        })
    }

    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
        // One writer per output; the existence check is made under its lock.
        self.claim = Some(bridgeflow_sdk::fsutil::OutputClaim::claim(
            &self.cfg.output,
        )?);
        bridgeflow_sdk::fsutil::refuse_existing(&self.cfg.output, self.cfg.overwrite)?;
        self.pad_id = match self.cfg.pad_id {
            Some(p) => p,
            None => inputs
                .first()
                .and_then(|p| p.get(bridgeflow_sdk::attrs::EOD_ID))
                .unwrap_or(0),
        };
        if let Some(dir) = self
            .cfg
            .output
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| PluginError::io(dir, "cannot create", e))?;
        }
        let f = File::create(&self.spill_path)
            .map_err(|e| PluginError::io(&self.spill_path, "cannot create", e))?;
        self.spill = Some(BufWriter::with_capacity(1 << 20, f));
        Ok(())
    }

    fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
        let batch = item.into_records()?;
        let list = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<ListArray>())
                .cloned()
                .ok_or_else(|| PluginError::shape(format!("input has no list column '{name}'")))
        };
        let (ids, mask) = (list("input_ids")?, list("loss_mask")?);
        let id_vals = ids
            .values()
            .as_any()
            .downcast_ref::<UInt32Array>()
            .cloned()
            .ok_or_else(|| PluginError::shape("input_ids is not list<uint32>"))?;
        let mask_vals = mask
            .values()
            .as_any()
            .downcast_ref::<Int8Array>()
            .cloned()
            .ok_or_else(|| PluginError::shape("loss_mask is not list<int8>"))?;
        let (io, mo) = (ids.value_offsets(), mask.value_offsets());
        for r in 0..ids.len() {
            let mut seq_ids = id_vals.values()[io[r] as usize..io[r + 1] as usize].to_vec();
            let mut seq_mask = mask_vals.values()[mo[r] as usize..mo[r + 1] as usize].to_vec();
            if seq_ids.len() != seq_mask.len() {
                return Err(PluginError::shape(format!(
                    "a sequence has {} ids but {} loss-mask values",
                    seq_ids.len(),
                    seq_mask.len()
                )));
            }
            self.pad(&mut seq_ids, &mut seq_mask);
            let w = self.spill.as_mut().expect("opened");
            let io_err = |e| PluginError::io(&self.spill_path, "cannot write", e);
            for id in &seq_ids {
                w.write_all(&id.to_le_bytes()).map_err(io_err)?;
            }
            let m: Vec<u8> = seq_mask.iter().map(|&m| m as u8).collect();
            w.write_all(&m).map_err(io_err)?;
            self.seqs.push((self.spill_len, seq_ids.len() as u32));
            self.spill_len += seq_ids.len() as u64 * 5;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<String> {
        let mut w = self.spill.take().expect("opened");
        w.flush()
            .map_err(|e| PluginError::io(&self.spill_path, "cannot write", e))?;
        drop(w);
        let f = File::open(&self.spill_path)
            .map_err(|e| PluginError::io(&self.spill_path, "cannot open", e))?;
        // SAFETY: our own temporary file, no longer written.
        let map = if self.spill_len > 0 {
            Some(
                unsafe { memmap2::Mmap::map(&f) }
                    .map_err(|e| PluginError::io(&self.spill_path, "cannot map", e))?,
            )
        } else {
            None
        };
        let pack = self.cfg.pack_size;
        let max_len = self.max_len();
        // One bucket per length up to the longest kept: sized by the data, not by max_len (a
        // config number). Lengths are 0..=max_len either way, so the packing is the same.
        let longest_kept = self
            .seqs
            .iter()
            .map(|&(_, n)| (n as usize).saturating_sub(1))
            .filter(|&l| l <= max_len)
            .max()
            .unwrap_or(0);
        let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); longest_kept + 1];
        let mut skipped = 0usize;
        for (i, &(_, n)) in self.seqs.iter().enumerate() {
            let seq_len = (n as usize).saturating_sub(1);
            if seq_len > max_len {
                skipped += 1;
                continue;
            }
            buckets[seq_len].push(i);
        }
        let histogram: Vec<usize> = buckets.iter().map(Vec::len).collect();
        if histogram.iter().all(|&n| n == 0) {
            return Err(PluginError::shape(format!(
                "no sequence fits max_seq_length {max_len} ({skipped} skipped)"
            )));
        }
        let mut rng = LegacyRandom::seed(self.cfg.seed);
        let bins = assign(&histogram, pack, self.algo, &mut rng);
        let meta = metadata(&bins, pack);
        let mut queues: Vec<Vec<usize>> = vec![Vec::new(); buckets.len()];
        for (len, bucket) in buckets.iter().enumerate() {
            if !bucket.is_empty() {
                queues[len] = rng
                    .permutation(bucket.len())
                    .into_iter()
                    .map(|p| bucket[p])
                    .collect();
            }
        }
        let seqs = &self.seqs;
        let map_ref = map.as_deref().unwrap_or(&[]);
        let rows = bins.iter().map(|bin| {
            let (mut ids, mut mask, mut starts) = (Vec::new(), Vec::new(), Vec::new());
            for &len in bin {
                let s = queues[len]
                    .pop()
                    .ok_or_else(|| PluginError::internal("packing ran out of sequences"))?;
                let (off, n) = (seqs[s].0 as usize, seqs[s].1 as usize);
                starts.push(ids.len() as i64);
                let id_bytes = &map_ref[off..off + 4 * n];
                ids.extend(
                    id_bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64),
                );
                let m = &map_ref[off + 4 * n..off + 5 * n];
                // The mask is shifted left by one to line up with the labels.
                mask.extend(m.iter().skip(1).map(|&b| b as i8));
                mask.push(0);
            }
            Ok((ids, mask, starts))
        });
        let out_tmp = tmp(&self.cfg.output, "parquet");
        let n_rows = self.write_parquet(rows, &out_tmp).inspect_err(|_| {
            let _ = std::fs::remove_file(&out_tmp);
        })?;
        let claim = self.claim.as_mut().expect("claimed in open");
        claim.commit(&out_tmp, self.cfg.overwrite)?;
        let meta_path = self.append_metadata(&meta)?;
        self.committed = true;
        let _ = std::fs::remove_file(&self.spill_path);
        Ok(format!(
            "{} sequences in {n_rows} rows of {pack} ({} skipped as longer than {max_len}), packing factor {}, efficiency {}% -> {} (+ {})",
            bins.iter().map(Vec::len).sum::<usize>(),
            skipped,
            meta.packing_factor,
            meta.packing_efficiency,
            self.cfg.output.display(),
            meta_path.display()
        ))
    }

    fn abort(&mut self) {
        if !self.committed {
            self.spill = None;
            let _ = std::fs::remove_file(&self.spill_path);
            let _ = std::fs::remove_file(tmp(&self.cfg.output, "parquet"));
        }
        self.claim = None;
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

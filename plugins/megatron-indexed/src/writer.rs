//! The writer: one `.bin`/`.idx` pair per key, streamed. Sequence lengths and document indices
//! go to temporary files as they come (12 bytes per sequence would otherwise pile up in memory
//! on a multi-terabyte corpus); the `.idx` is assembled at commit, and both files appear under
//! their final names only then, `.bin` first and `.idx` last.

use crate::format::{header, TokenType};
use bridgeflow_sdk::arrow_array::{Array, Int32Array, ListArray, UInt32Array};
use bridgeflow_sdk::{schemars, serde, Item, PluginError, PortType, Result, Sink, StreamPlan};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct IndexedWriterConfig {
    /// Output prefix: `{prefix}_{key}_document.bin` / `.idx` per key, as preprocess_data.py
    /// names them.
    pub output_prefix: String,
    /// Keys to write (default: the input's `json_keys`).
    #[serde(default)]
    pub json_keys: Option<Vec<String>>,
    /// Token dtype (`uint16`, `int32`, ...). Default: the input's `token_dtype`, else chosen
    /// from the vocabulary size as Megatron does (uint16 below 65,500, else int32).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Name the files `{output_prefix}.bin` / `.idx` exactly (one key only).
    #[serde(default)]
    pub exact_prefix: bool,
    /// Replace existing files (default false: refuse).
    #[serde(default)]
    pub overwrite: bool,
}

struct KeyOut {
    key: String,
    idx: PathBuf,
    bin_tmp: PathBuf,
    lens_tmp: PathBuf,
    docs_tmp: PathBuf,
    bin_w: BufWriter<File>,
    lens_w: BufWriter<File>,
    docs_w: BufWriter<File>,
    sequences: u64,
    doc_entries: u64,
    tokens: u64,
    /// The locks of `bin` and `idx`, from `open` on.
    bin_claim: OutputClaim,
    idx_claim: OutputClaim,
}

pub struct IndexedWriter {
    cfg: IndexedWriterConfig,
    dtype: TokenType,
    keys: Vec<KeyOut>,
    scratch: Vec<u8>,
    committed: bool,
}

fn tmp_name(p: &Path, what: &str) -> PathBuf {
    bridgeflow_sdk::fsutil::hidden_sibling(p, &format!("{what}_partial"))
}

use bridgeflow_sdk::fsutil::OutputClaim;

fn create(p: &Path) -> Result<BufWriter<File>> {
    File::create(p)
        .map(|f| BufWriter::with_capacity(1 << 20, f))
        .map_err(|e| PluginError::io(p, "cannot create", e))
}

impl IndexedWriter {
    fn open_key(&self, key: &str) -> Result<KeyOut> {
        let base = if self.cfg.exact_prefix {
            self.cfg.output_prefix.clone()
        } else {
            format!("{}_{key}_document", self.cfg.output_prefix)
        };
        let (bin, idx) = crate::format::paths(&base);
        // One writer per output (a second run fails here, naming this one's pid); the existence
        // check below is made under the locks.
        let bin_claim = OutputClaim::claim(&bin)?;
        let idx_claim = OutputClaim::claim(&idx)?;
        for p in [&bin, &idx] {
            if p.exists() && !self.cfg.overwrite {
                return Err(PluginError::config(format!(
                    "{} already exists; set overwrite = true or choose another output prefix",
                    p.display()
                )));
            }
        }
        if let Some(dir) = bin.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| PluginError::io(dir, "cannot create", e))?;
        }
        let (bin_tmp, lens_tmp, docs_tmp) = (
            tmp_name(&bin, "bin"),
            tmp_name(&idx, "lengths"),
            tmp_name(&idx, "documents"),
        );
        let mut docs_w = create(&docs_tmp)?;
        docs_w
            .write_all(&0u64.to_le_bytes())
            .map_err(|e| PluginError::io(&docs_tmp, "cannot write", e))?;
        Ok(KeyOut {
            key: key.to_string(),
            bin_w: create(&bin_tmp)?,
            lens_w: create(&lens_tmp)?,
            docs_w,
            idx,
            bin_tmp,
            lens_tmp,
            docs_tmp,
            sequences: 0,
            doc_entries: 1,
            tokens: 0,
            bin_claim,
            idx_claim,
        })
    }

    fn remove_temps(&mut self) {
        for k in &self.keys {
            for p in [&k.bin_tmp, &k.lens_tmp, &k.docs_tmp] {
                let _ = std::fs::remove_file(p);
            }
            let _ = std::fs::remove_file(tmp_name(&k.idx, "idx"));
        }
    }
}

/// Assembles the `.idx` from the header and the two temporary arrays.
fn assemble_idx(k: &KeyOut, dtype: TokenType, out: &Path) -> Result<()> {
    let mut w = create(out)?;
    let io = |e| PluginError::io(out, "cannot write", e);
    w.write_all(&header(dtype, k.sequences, k.doc_entries))
        .map_err(io)?;
    let copy = |from: &Path, w: &mut BufWriter<File>| -> Result<()> {
        let mut r = File::open(from).map_err(|e| PluginError::io(from, "cannot open", e))?;
        std::io::copy(&mut r, w).map_err(|e| PluginError::io(out, "cannot write", e))?;
        Ok(())
    };
    copy(&k.lens_tmp, &mut w)?;
    // Pointers: exclusive cumulative sum of length × item size, streamed from the lengths.
    let mut r = BufReader::with_capacity(
        1 << 20,
        File::open(&k.lens_tmp).map_err(|e| PluginError::io(&k.lens_tmp, "cannot open", e))?,
    );
    let mut ptr = 0i64;
    let mut b = [0u8; 4];
    for _ in 0..k.sequences {
        r.read_exact(&mut b)
            .map_err(|e| PluginError::io(&k.lens_tmp, "cannot read", e))?;
        w.write_all(&ptr.to_le_bytes()).map_err(io)?;
        ptr += i32::from_le_bytes(b) as i64 * dtype.size() as i64;
    }
    copy(&k.docs_tmp, &mut w)?;
    let f = w
        .into_inner()
        .map_err(|e| PluginError::io(out, "cannot write", e.into_error()))?;
    f.sync_all()
        .map_err(|e| PluginError::io(out, "cannot sync", e))
}

impl Sink for IndexedWriter {
    type Config = IndexedWriterConfig;
    const DESCRIPTION: &'static str =
        "Writes Megatron indexed datasets ({prefix}_{key}_document.bin/.idx), atomically";
    const INPUTS: &'static [PortType] = &[PortType::Records];

    fn new(cfg: IndexedWriterConfig) -> Result<Self> {
        if let Some(d) = &cfg.dtype {
            let t = TokenType::parse(d).filter(|t| t.is_integer());
            t.ok_or_else(|| {
                PluginError::config(format!(
                    "dtype '{d}': token data must be an integer type ({})",
                    TokenType::INTEGER_NAMES
                ))
            })?;
        }
        Ok(IndexedWriter {
            cfg,
            dtype: TokenType::U16,
            keys: Vec::new(),
            scratch: Vec::new(),
            committed: false,
        })
    }

    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
        let plan = inputs.first().cloned().unwrap_or_default();
        use bridgeflow_sdk::attrs;
        self.dtype = match &self.cfg.dtype {
            Some(d) => TokenType::parse(d).expect("checked in new"),
            // The token dtype decides the file format: an ill-typed one is an error, not absent.
            None => match plan.try_get(attrs::TOKEN_DTYPE)? {
                Some(d) => TokenType::parse(&d)
                    .filter(|t| t.is_integer())
                    .ok_or_else(|| {
                        PluginError::format(format!(
                            "input token_dtype '{d}' is not an integer token type ({})",
                            TokenType::INTEGER_NAMES
                        ))
                    })?,
                None => {
                    let vocab = plan.try_get(attrs::VOCAB_SIZE)?.ok_or_else(|| {
                        PluginError::config("the input does not say its vocabulary size; set dtype")
                    })?;
                    TokenType::optimal(vocab)
                }
            },
        };
        let keys: Vec<String> = match &self.cfg.json_keys {
            Some(k) => k.clone(),
            None => plan
                .get(attrs::JSON_KEYS)
                .unwrap_or_else(|| vec!["text".to_string()]),
        };
        if self.cfg.exact_prefix && keys.len() != 1 {
            return Err(PluginError::config(format!(
                "exact_prefix needs exactly one key, got {keys:?}"
            )));
        }
        for k in &keys {
            let out = self.open_key(k);
            match out {
                Ok(o) => self.keys.push(o),
                Err(e) => {
                    self.remove_temps();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
        let batch = item.into_records()?;
        let dtype = self.dtype;
        for k in self.keys.iter_mut() {
            let col = |name: String| {
                batch
                    .column_by_name(&name)
                    .and_then(|c| c.as_any().downcast_ref::<ListArray>())
                    .cloned()
                    .ok_or_else(|| PluginError::shape(format!("input has no list column '{name}'")))
            };
            let ids = col(format!("{}_ids", k.key))?;
            let lens = col(format!("{}_lens", k.key))?;
            let id_vals = ids
                .values()
                .as_any()
                .downcast_ref::<UInt32Array>()
                .ok_or_else(|| PluginError::shape(format!("{}_ids is not list<uint32>", k.key)))?;
            let len_vals = lens
                .values()
                .as_any()
                .downcast_ref::<Int32Array>()
                .ok_or_else(|| PluginError::shape(format!("{}_lens is not list<int32>", k.key)))?;
            let (io, lo) = (ids.value_offsets(), lens.value_offsets());
            for row in 0..ids.len() {
                let doc_ids = &id_vals.values()[io[row] as usize..io[row + 1] as usize];
                let doc_lens = &len_vals.values()[lo[row] as usize..lo[row + 1] as usize];
                let total: i64 = doc_lens.iter().map(|&l| l as i64).sum();
                if total != doc_ids.len() as i64 {
                    return Err(PluginError::shape(format!(
                        "key '{}': a document's sequence lengths sum to {total} but it has {} tokens",
                        k.key,
                        doc_ids.len()
                    )));
                }
                self.scratch.clear();
                for &id in doc_ids {
                    dtype.put(id, &mut self.scratch).map_err(|id| {
                        PluginError::shape(format!(
                            "key '{}': token id {id} does not fit {}",
                            k.key,
                            dtype.name()
                        ))
                    })?;
                }
                k.bin_w
                    .write_all(&self.scratch)
                    .map_err(|e| PluginError::io(&k.bin_tmp, "cannot write", e))?;
                for &l in doc_lens {
                    k.lens_w
                        .write_all(&l.to_le_bytes())
                        .map_err(|e| PluginError::io(&k.lens_tmp, "cannot write", e))?;
                }
                k.sequences += doc_lens.len() as u64;
                k.tokens += doc_ids.len() as u64;
                k.docs_w
                    .write_all(&k.sequences.to_le_bytes())
                    .map_err(|e| PluginError::io(&k.docs_tmp, "cannot write", e))?;
                k.doc_entries += 1;
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<String> {
        for k in self.keys.iter_mut() {
            for (w, p) in [
                (&mut k.bin_w, &k.bin_tmp),
                (&mut k.lens_w, &k.lens_tmp),
                (&mut k.docs_w, &k.docs_tmp),
            ] {
                w.flush()
                    .map_err(|e| PluginError::io(p, "cannot write", e))?;
            }
            k.bin_w
                .get_ref()
                .sync_all()
                .map_err(|e| PluginError::io(&k.bin_tmp, "cannot sync", e))?;
        }
        let mut idx_tmps = Vec::new();
        for k in &self.keys {
            let t = tmp_name(&k.idx, "idx");
            assemble_idx(k, self.dtype, &t)?;
            idx_tmps.push(t);
        }
        // Data files first, indexes last: a reader never finds an index without its data.
        // The first commit passes the run's commit point (or finds the run cancelled).
        let overwrite = self.cfg.overwrite;
        for k in self.keys.iter_mut() {
            k.bin_claim.commit(&k.bin_tmp, overwrite)?;
        }
        for (k, t) in self.keys.iter_mut().zip(&idx_tmps) {
            k.idx_claim.commit(t, overwrite)?;
        }
        self.committed = true;
        for k in &self.keys {
            let _ = std::fs::remove_file(&k.lens_tmp);
            let _ = std::fs::remove_file(&k.docs_tmp);
        }
        let parts: Vec<String> = self
            .keys
            .iter()
            .map(|k| {
                format!(
                    "{}: {} documents, {} sequences, {} tokens ({})",
                    k.idx.with_extension("").display(),
                    k.doc_entries - 1,
                    k.sequences,
                    k.tokens,
                    self.dtype.name()
                )
            })
            .collect();
        Ok(parts.join("; "))
    }

    fn metrics(&mut self) -> serde_json::Value {
        let outputs: Vec<serde_json::Value> = self
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "prefix": k.idx.with_extension("").to_string_lossy(),
                    "documents": k.doc_entries.saturating_sub(1),
                    "sequences": k.sequences,
                    "tokens": k.tokens,
                })
            })
            .collect();
        serde_json::json!({ "dtype": self.dtype.name(), "outputs": outputs })
    }

    fn abort(&mut self) {
        if !self.committed {
            self.remove_temps();
        }
    }
}

impl Drop for IndexedWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

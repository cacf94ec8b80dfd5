//! The GGUF writer: one `.gguf` file for llama.cpp / ollama from an HF-named stream (HF, or a
//! Megatron checkpoint through the models mapper). The header — metadata, tokenizer, every
//! tensor's descriptor — is laid out from the plan before any data arrives; each tensor (or
//! block of its rows) is converted row by row and written at its place, so memory holds one
//! block. The file is built under a hidden name beside the target and renamed at commit.

use crate::arch::{self, Arch, Hparams};
use crate::format::{self, GgmlType, TensorDesc, Value};
use crate::quant::{encode_row, encode_row_into};
use crate::vocab;
use bridgeflow_sdk::fsutil::{reserve, OutputClaim};
use bridgeflow_sdk::outfile::{OutputFile, WINDOW};
use bridgeflow_sdk::units::human;
use bridgeflow_sdk::{
    attrs, schemars, serde, DType, Endpoint, Item, PluginError, Result, Sink, StreamPlan,
};
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

fn auto() -> String {
    "auto".into()
}
fn yes() -> bool {
    true
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct GgufConfig {
    /// The `.gguf` file to write.
    pub path: PathBuf,
    /// Type of the matrices: auto (bf16 for bf16 weights, else f16, as llama.cpp's converter),
    /// f32, f16, bf16 or q8_0. Vectors (norms, biases) stay f32.
    #[serde(default = "auto")]
    pub dtype: String,
    /// The HF config.json (default: the input's).
    #[serde(default)]
    pub hf_config: Option<PathBuf>,
    /// Folder holding tokenizer.json (default: the input's, or the config's folder).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Replace an existing file (default false: refuse).
    #[serde(default)]
    pub overwrite: bool,
    /// Make the file durable before it is visible (default true).
    #[serde(default = "yes")]
    pub fsync: bool,
}

/// One tensor's place: its descriptor, the input it comes from, rows done.
struct Slot {
    desc: TensorDesc,
    /// Input elements per row (a vector: all of it, or one per row when permuted).
    width: u64,
    /// Output row bytes.
    row: u64,
    /// Permuted q/k: the head size whose halves interleave.
    permute: Option<u64>,
    rows_left: u64,
}

pub struct GgufWriter {
    cfg: GgufConfig,
    claim: Option<OutputClaim>,
    staging: Option<PathBuf>,
    out: Option<OutputFile>,
    data_start: u64,
    size: u64,
    slots: HashMap<String, Slot>,
    committed: bool,
}

fn matrix_type(name: &str, plan: &StreamPlan) -> Result<GgmlType> {
    let first_float = plan.tensors.iter().map(|t| t.dtype).find(|d| d.is_float());
    Ok(match name {
        "auto" if first_float == Some(DType::BF16) => GgmlType::Bf16,
        "auto" | "f16" | "fp16" => GgmlType::F16,
        "f32" | "fp32" => GgmlType::F32,
        "bf16" => GgmlType::Bf16,
        "q8_0" => GgmlType::Q8_0,
        other => {
            return Err(PluginError::config(format!(
                "dtype = {other:?}: expected auto, f32, f16, bf16 or q8_0"
            )))
        }
    })
}

/// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 7,
        GgmlType::Bf16 => 32,
    }
}

/// The input dtype whose bytes a GGUF type stores unchanged.
fn stored_as(t: GgmlType) -> Option<DType> {
    match t {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::Bf16 => Some(DType::BF16),
        GgmlType::Q8_0 => None,
    }
}

/// Where input row `s` of a permuted q/k weight goes (heads of `d` rows): the inverse of
/// [`arch::permuted_source`].
fn permuted_row(s: u64, d: u64) -> u64 {
    let (head, j) = (s / d, s % d);
    head * d
        + if j < d / 2 {
            2 * j
        } else {
            2 * (j - d / 2) + 1
        }
}

fn read_json(p: &Path) -> Result<Map<String, Json>> {
    let text = std::fs::read_to_string(p).map_err(|e| PluginError::io(p, "cannot read", e))?;
    serde_json::from_str(&text).map_err(|e| PluginError::config(format!("{}: {e}", p.display())))
}

impl GgufWriter {
    /// The config, and the folder its side files (tokenizer) are in.
    fn config(&self, plan: &StreamPlan) -> Result<(Map<String, Json>, Option<PathBuf>)> {
        if let Some(p) = &self.cfg.hf_config {
            return Ok((read_json(p)?, p.parent().map(Path::to_path_buf)));
        }
        let dir = plan.try_get(attrs::SOURCE_DIR)?;
        if let Some(c) = plan.try_get(attrs::HF_CONFIG)? {
            return Ok((c, dir));
        }
        let dir = dir
            .ok_or_else(|| PluginError::config("the input names no config.json (set hf_config)"))?;
        Ok((read_json(&dir.join("config.json"))?, Some(dir)))
    }

    /// Every tensor's descriptor and slot, in stream order.
    fn slots(
        &mut self,
        plan: &StreamPlan,
        arch: &Arch,
        hp: &Hparams,
        matrices: GgmlType,
    ) -> Result<Vec<TensorDesc>> {
        let mut descs = Vec::new();
        for t in plan.whole_tensors() {
            let name = arch::tensor_name(t.name()).ok_or_else(|| {
                PluginError::shape(format!(
                    "tensor '{}' has no place in a GGUF {} model",
                    t.name(),
                    arch.name
                ))
            })?;
            let ty = match t.shape.len() {
                1 => GgmlType::F32,
                // Rows that do not split into Q8_0's blocks of 32 stay F16, as the converter
                // keeps them.
                2 if matrices == GgmlType::Q8_0 && t.shape[1] % 32 != 0 => GgmlType::F16,
                2 => matrices,
                _ => {
                    return Err(PluginError::shape(format!(
                        "'{}' {}: not a vector or matrix",
                        t.name(),
                        t.shape_string()
                    )))
                }
            };
            if !t.dtype.is_float() {
                return Err(PluginError::shape(format!(
                    "'{}' is {}, not float weights",
                    t.name(),
                    t.dtype
                )));
            }
            let rows = t.shape[0];
            let heads = match name.rsplit('.').nth(1) {
                Some("attn_q") if arch.permute_qk => Some(hp.heads),
                Some("attn_k") if arch.permute_qk => Some(hp.kv_heads),
                _ => None,
            };
            let permute = heads.map(|h| rows / h);
            if heads.is_some_and(|h| rows % h != 0 || (rows / h) % 2 != 0) {
                return Err(PluginError::shape(format!(
                    "'{}': {rows} rows do not split into {heads:?} heads",
                    t.name()
                )));
            }
            let desc = TensorDesc {
                name,
                shape: t.shape.to_vec(),
                ty,
                offset: 0,
            };
            let width = match (t.shape.len(), permute) {
                (1, None) => rows,
                (1, Some(_)) => 1,
                _ => t.shape[1],
            };
            let (row, rows_left) = (
                ty.bytes(width),
                rows * t.shape.get(1).copied().unwrap_or(1) / width,
            );
            descs.push(desc.clone());
            self.slots.insert(
                t.name().to_string(),
                Slot {
                    desc,
                    width,
                    row,
                    permute,
                    rows_left,
                },
            );
        }
        Ok(descs)
    }

    fn layout(&mut self, plan: &StreamPlan) -> Result<()> {
        let (cfg, dir) = self.config(plan)?;
        let hf_arch = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Json::as_str)
            .unwrap_or("");
        let arch = arch::of(hf_arch)?;
        let hp = arch::hparams(&arch, &cfg)?;
        let matrices = matrix_type(&self.cfg.dtype, plan)?;
        let mut descs = self.slots(plan, &arch, &hp, matrices)?;
        // In HF name order, as the converter meets them in a checkpoint's file: the same file
        // whatever order the source streams in.
        let mut order: Vec<(&String, &Slot)> = self.slots.iter().collect();
        order.sort_by(|a, b| a.0.cmp(b.0));
        let rank: HashMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, (_, s))| (s.desc.name.as_str(), i))
            .collect();
        descs.sort_by_key(|d| rank[d.name.as_str()]);
        let data = format::lay_out(&mut descs);
        for s in self.slots.values_mut() {
            s.desc.offset = descs
                .iter()
                .find(|d| d.name == s.desc.name)
                .map_or(0, |d| d.offset);
        }
        let tok_dir = self.cfg.tokenizer.clone().or(dir).ok_or_else(|| {
            PluginError::config("no folder with tokenizer.json (set tokenizer = \"DIR\")")
        })?;
        let id = |k: &str| cfg.get(k).and_then(Json::as_u64);
        let name = tok_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let params: u64 = descs.iter().map(|d| d.shape.iter().product::<u64>()).sum();
        // The keys in the order llama.cpp's converter writes them.
        let mut meta = vec![
            (
                "general.architecture".to_string(),
                Value::Str(arch.name.into()),
            ),
            ("general.type".to_string(), Value::Str("model".into())),
            ("general.name".to_string(), Value::Str(arch::title(&name))),
            (
                "general.size_label".to_string(),
                Value::Str(arch::size_label(params)),
            ),
        ];
        meta.extend(hp.meta);
        meta.push((
            "general.file_type".to_string(),
            Value::U32(file_type(matrices)),
        ));
        meta.extend(hp.tail);
        meta.push(("general.quantization_version".to_string(), Value::U32(2)));
        meta.extend(vocab::metadata(
            &tok_dir,
            hp.vocab,
            [id("bos_token_id"), id("eos_token_id"), id("pad_token_id")],
        )?);
        let header = format::header(&meta, &descs);
        self.data_start = header.len() as u64;
        self.size = self.data_start + data;
        self.create(&header)
    }

    fn create(&mut self, header: &[u8]) -> Result<()> {
        let target = self.cfg.path.clone();
        let claim = self.claim.insert(OutputClaim::claim(&target)?);
        if target.exists() && !self.cfg.overwrite {
            return Err(PluginError::config(format!(
                "output {} already exists; set overwrite = true or choose another path",
                target.display()
            )));
        }
        let path = claim.staging("partial");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| PluginError::io(&path, "cannot create", e))?;
        self.staging = Some(path.clone());
        reserve(&file, &path, self.size)?;
        // Unchanged tensors are copied in the kernel from the input file they are a view of.
        let origins = std::sync::Arc::new(bridgeflow_sdk::inputs::Origins::new());
        let mut out = OutputFile::new(file, &path)
            .kernel_copy(Some(origins))
            .durable(self.cfg.fsync);
        out.write_at(header, 0)?;
        self.out = Some(out);
        Ok(())
    }
}

impl Sink for GgufWriter {
    type Config = GgufConfig;
    const DESCRIPTION: &'static str =
        "Writes one GGUF file (llama.cpp, ollama): F32/F16/BF16/Q8_0, tokenizer, atomically";
    const ENDPOINTS: &'static [Endpoint] = &[Endpoint {
        options: &["dtype", "hf_config", "overwrite"],
        ..Endpoint::new("gguf", "hf-model", "a GGUF file for llama.cpp and ollama")
    }];

    fn new(cfg: GgufConfig) -> Result<Self> {
        if cfg.path.extension().is_none_or(|x| x != "gguf") {
            return Err(PluginError::config(format!(
                "path {}: expected a .gguf file",
                cfg.path.display()
            )));
        }
        Ok(GgufWriter {
            cfg,
            claim: None,
            staging: None,
            out: None,
            data_start: 0,
            size: 0,
            slots: HashMap::new(),
            committed: false,
        })
    }

    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
        let plan = inputs.first().cloned().unwrap_or_default();
        let r = self.layout(&plan);
        if r.is_err() {
            self.abort();
        }
        r
    }

    fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
        let t = item.into_tensor()?;
        let base = t.info.base_name().to_string();
        let slot = self.slots.get_mut(&base).ok_or_else(|| {
            PluginError::shape(format!(
                "tensor '{base}' was not announced in the stream plan"
            ))
        })?;
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| PluginError::internal("consume before open"))?;
        let in_row = slot.width * t.info.dtype.size() as u64;
        let first = t
            .info
            .piece_offset()
            .map(|e| e * t.info.dtype.size() as u64);
        let (Some(first), true) = (
            first,
            first.is_some_and(|f| f % in_row == 0)
                && (t.bytes().len() as u64).is_multiple_of(in_row),
        ) else {
            return Err(PluginError::shape(format!(
                "piece '{}' is not a block of whole rows of '{base}'",
                t.name()
            )));
        };
        let (r0, n) = (first / in_row, t.bytes().len() as u64 / in_row);
        slot.rows_left = slot.rows_left.checked_sub(n).ok_or_else(|| {
            PluginError::shape(format!("tensor '{base}' got more rows than it has"))
        })?;
        let at = self.data_start + slot.desc.offset;
        let what = format!("writing tensor '{base}' to");
        let same = slot.permute.is_none() && stored_as(slot.desc.ty) == Some(t.info.dtype);
        if same {
            // Unchanged bytes: written (or copied in the kernel from the input file) window by
            // window, the input's pages let go after each.
            out.write_windows(t.bytes(), at + r0 * slot.row, &what, |range, _| {
                t.data.discard(range)
            })?;
            return Ok(());
        }
        // Converted rows, a window of them at a time (memory: one window).
        let rows_per = (WINDOW as u64 / slot.row.max(1)).max(1) as usize;
        let mut buf = Vec::new();
        for (w, block) in t.bytes().chunks(rows_per * in_row as usize).enumerate() {
            let first_row = r0 + (w * rows_per) as u64;
            match slot.permute {
                // Each row to its place within its head.
                Some(d) => {
                    for (k, row) in block.chunks_exact(in_row as usize).enumerate() {
                        buf.clear();
                        encode_row(t.info.dtype, row, slot.desc.ty, &mut buf);
                        let r = permuted_row(first_row + k as u64, d);
                        out.write_windows(&buf, at + r * slot.row, &what, |_, _| {})?;
                    }
                }
                None => {
                    // Rows converted on every core (Q8_0's blocks are the costly part).
                    use rayon::prelude::*;
                    let (from, ty) = (t.info.dtype, slot.desc.ty);
                    buf.resize(block.len() / in_row as usize * slot.row as usize, 0);
                    buf.par_chunks_mut(slot.row as usize)
                        .zip(block.par_chunks(in_row as usize))
                        .for_each(|(dst, src)| encode_row_into(from, src, ty, dst));
                    out.write_windows(&buf, at + first_row * slot.row, &what, |_, _| {})?;
                }
            }
            let done = w * rows_per * in_row as usize;
            t.data.discard(done..done + block.len());
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<String> {
        if let Some((name, _)) = self.slots.iter().find(|(_, s)| s.rows_left > 0) {
            return Err(PluginError::shape(format!(
                "tensor '{name}' was announced but never arrived whole; output not committed"
            )));
        }
        let mut out = self
            .out
            .take()
            .ok_or_else(|| PluginError::internal("commit before open"))?;
        if self.cfg.fsync {
            out.sync()?;
        }
        drop(out);
        let staging = self.staging.clone().expect("opened");
        let claim = self.claim.as_mut().expect("claimed in open");
        claim.durable(self.cfg.fsync);
        claim.commit(&staging, self.cfg.overwrite)?;
        self.staging = None;
        self.committed = true;
        self.claim = None;
        Ok(format!(
            "wrote {} tensors, {} to {}",
            self.slots.len(),
            human(self.size),
            self.cfg.path.display()
        ))
    }

    fn metrics(&mut self) -> serde_json::Value {
        serde_json::json!({ "tensors": self.slots.len(), "bytes": self.size })
    }

    fn abort(&mut self) {
        if !self.committed {
            self.out = None;
            if let Some(s) = self.staging.take() {
                let _ = std::fs::remove_file(s);
            }
        }
        self.claim = None;
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_where_the_permutation_takes_them_from() {
        for d in [2, 4, 16] {
            for s in 0..3 * d {
                assert_eq!(
                    arch::permuted_source(permuted_row(s, d), d),
                    s,
                    "d {d} row {s}"
                );
            }
        }
    }
}

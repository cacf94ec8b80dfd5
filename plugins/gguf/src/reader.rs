//! The GGUF reader: a `.gguf` file's tensors under their GGUF names (F32, F16 and BF16 as views
//! of the file, Q8_0 dequantized to F32), its metadata as plan attributes — what `bridgeflow
//! inspect` shows and what a check reads back. Every number of the header is untrusted: counts,
//! lengths, dimensions and offsets are checked against the file before anything is sized.

use crate::format::{GgmlType, ALIGNMENT};
use bridgeflow_sdk::{
    schemars, serde, Buffer, DType, Emitter, InputMap, MapView, PluginError, Result, Source,
    StreamPlan, Tensor, TensorInfo,
};
use half::f16;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct GgufReaderConfig {
    /// The `.gguf` file.
    pub path: PathBuf,
}

/// A parsed tensor: name, shape (outermost first), type, byte range in the file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    pub range: std::ops::Range<u64>,
}

/// The header: metadata (key, value as JSON) and tensors.
#[derive(Debug, Default)]
pub struct Parsed {
    pub meta: Vec<(String, serde_json::Value)>,
    pub tensors: Vec<Entry>,
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

fn bad(msg: impl Into<String>) -> PluginError {
    PluginError::format(msg.into())
}

impl Cursor<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| {
            bad(format!(
                "the header runs past the end of the file (at byte {})",
                self.at
            ))
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| bad(format!("a string at byte {} is not UTF-8", self.at)))
    }
    /// A value of GGUF type `ty` as JSON (arrays of up to 16 elements kept whole, longer ones
    /// as their length and first elements, but all of them read).
    fn value(&mut self, ty: u32, depth: u32) -> Result<serde_json::Value> {
        use serde_json::json;
        Ok(match ty {
            0 => json!(self.take(1)?[0]),
            1 => json!(self.take(1)?[0] as i8),
            2 => json!(u16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            3 => json!(i16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            4 => json!(self.u32()?),
            5 => json!(self.u32()? as i32),
            6 => json!(f32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            7 => json!(self.take(1)?[0] != 0),
            8 => json!(self.string()?),
            9 if depth == 0 => {
                let (ety, n) = (self.u32()?, self.u64()?);
                // Each element takes at least a byte: a count beyond the file is a lie.
                if n > (self.b.len() - self.at) as u64 {
                    return Err(bad(format!(
                        "an array claims {n} elements, more than the file holds"
                    )));
                }
                let mut first = Vec::new();
                for i in 0..n {
                    let v = self.value(ety, depth + 1)?;
                    if i < 16 {
                        first.push(v);
                    }
                }
                if n <= 16 {
                    json!(first)
                } else {
                    json!({"length": n, "first": first})
                }
            }
            10 => json!(self.u64()?),
            11 => json!(self.u64()? as i64),
            12 => json!(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => return Err(bad(format!("unknown GGUF value type {other}"))),
        })
    }
}

fn ggml_type(code: u32) -> Result<GgmlType> {
    Ok(match code {
        0 => GgmlType::F32,
        1 => GgmlType::F16,
        8 => GgmlType::Q8_0,
        30 => GgmlType::Bf16,
        other => {
            return Err(bad(format!(
                "ggml type {other} is not one bridgeflow reads (F32, F16, BF16, Q8_0)"
            )))
        }
    })
}

/// Parses and checks a whole GGUF file's header against its length.
pub fn parse(b: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { b, at: 0 };
    if c.take(4)? != b"GGUF" {
        return Err(bad("not a GGUF file (no GGUF magic)"));
    }
    let version = c.u32()?;
    if version != 3 && version != 2 {
        return Err(bad(format!("GGUF version {version} (2 and 3 are read)")));
    }
    let (n_tensors, n_meta) = (c.u64()?, c.u64()?);
    let most = b.len() as u64 / 8;
    if n_tensors > most || n_meta > most {
        return Err(bad(format!(
            "{n_tensors} tensors and {n_meta} keys cannot fit in {} bytes",
            b.len()
        )));
    }
    let mut p = Parsed::default();
    let mut alignment = ALIGNMENT;
    for _ in 0..n_meta {
        let key = c.string()?;
        let ty = c.u32()?;
        let v = c.value(ty, 0)?;
        if key == "general.alignment" {
            alignment = v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| bad("general.alignment is not a power of two"))?;
        }
        p.meta.push((key, v));
    }
    let mut raw = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let dims = c.u32()?;
        if dims == 0 || dims > 4 {
            return Err(bad(format!("tensor '{name}': {dims} dimensions")));
        }
        let mut shape: Vec<u64> = (0..dims).map(|_| c.u64()).collect::<Result<_>>()?;
        shape.reverse();
        let ty = ggml_type(c.u32()?).map_err(|e| bad(format!("tensor '{name}': {}", e.message)))?;
        let offset = c.u64()?;
        raw.push((name, shape, ty, offset));
    }
    let data = (c.at as u64).next_multiple_of(alignment);
    for (name, shape, ty, offset) in raw {
        let n = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0);
        let n = n.ok_or_else(|| {
            bad(format!(
                "tensor '{name}': shape {shape:?} is empty or overflows"
            ))
        })?;
        if ty == GgmlType::Q8_0 && shape.last().is_some_and(|w| w % 32 != 0) {
            return Err(bad(format!(
                "tensor '{name}': Q8_0 rows of {} elements",
                shape.last().unwrap()
            )));
        }
        let start = data.checked_add(offset).filter(|_| offset % alignment == 0);
        let end = start
            .and_then(|s| s.checked_add(ty.bytes(n)))
            .filter(|&e| e <= b.len() as u64);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(bad(format!("tensor '{name}': offset {offset} is misaligned or its bytes run past the end of the file")));
        };
        p.tensors.push(Entry {
            name,
            shape,
            ty,
            range: start..end,
        });
    }
    Ok(p)
}

fn dtype(ty: GgmlType) -> DType {
    match ty {
        GgmlType::F32 | GgmlType::Q8_0 => DType::F32,
        GgmlType::F16 => DType::F16,
        GgmlType::Bf16 => DType::BF16,
    }
}

/// Q8_0 blocks as f32 values (`d · q`).
fn dequantize_q8_0(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() / 34 * 32 * 4);
    for block in b.chunks_exact(34) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for &q in &block[2..] {
            out.extend((d * q as i8 as f32).to_le_bytes());
        }
    }
    out
}

pub struct GgufReader {
    path: PathBuf,
    map: Option<Arc<InputMap>>,
    parsed: Parsed,
}

impl Source for GgufReader {
    type Config = GgufReaderConfig;
    const DESCRIPTION: &'static str =
        "Reads a GGUF file: tensors under their GGUF names (Q8_0 as f32), metadata as attributes";
    const ENDPOINTS: &'static [bridgeflow_sdk::Endpoint] = &[bridgeflow_sdk::Endpoint::new(
        "gguf",
        "gguf",
        "a GGUF file (llama.cpp, ollama)",
    )];

    fn new(cfg: GgufReaderConfig) -> Result<Self> {
        Ok(GgufReader {
            path: cfg.path,
            map: None,
            parsed: Parsed::default(),
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        let map = InputMap::open(&self.path)?;
        self.parsed = parse(&map[..]).map_err(|e| {
            map.explain(PluginError::format(format!(
                "{}: {}",
                self.path.display(),
                e.message
            )))
        })?;
        self.map = Some(Arc::new(map));
        let infos = self
            .parsed
            .tensors
            .iter()
            .map(|e| TensorInfo::new(e.name.clone(), dtype(e.ty), &e.shape))
            .collect();
        let mut plan = StreamPlan::new(infos);
        plan.set(bridgeflow_sdk::attrs::FORMAT, "gguf");
        for (k, v) in &self.parsed.meta {
            if !k.starts_with("tokenizer.ggml.") || !v.is_object() {
                plan.set_attr(k, v.clone());
            }
        }
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let map = self
            .map
            .clone()
            .ok_or_else(|| PluginError::internal("run before plan"))?;
        for e in std::mem::take(&mut self.parsed.tensors) {
            map.check()?;
            let range = e.range.start as usize..e.range.end as usize;
            let info = TensorInfo::new(e.name, dtype(e.ty), &e.shape);
            let data = match e.ty {
                GgmlType::Q8_0 => Buffer::from_vec(dequantize_q8_0(&map[range])),
                _ => Buffer::from_owner(MapView {
                    map: map.clone(),
                    range,
                }),
            };
            out.tensor(Tensor::new(info, data)?)?;
        }
        Ok(())
    }

    fn probe(path: &Path) -> u32 {
        let magic = std::fs::File::open(path).ok().and_then(|mut f| {
            let mut m = [0u8; 4];
            std::io::Read::read_exact(&mut f, &mut m).ok().map(|_| m)
        });
        if magic == Some(*b"GGUF") {
            100
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{header, lay_out, TensorDesc, Value};

    fn file() -> Vec<u8> {
        let mut t = vec![TensorDesc {
            name: "w".into(),
            shape: vec![2, 32],
            ty: GgmlType::Q8_0,
            offset: 0,
        }];
        let data = lay_out(&mut t);
        let mut b = header(
            &[("general.architecture".into(), Value::Str("llama".into()))],
            &t,
        );
        b.resize(b.len() + data as usize, 0);
        b
    }

    #[test]
    fn reads_what_the_writer_lays_out() {
        let p = parse(&file()).unwrap();
        assert_eq!(p.meta[0].0, "general.architecture");
        assert_eq!(p.tensors[0].shape, [2, 32]);
        assert_eq!(p.tensors[0].range.end - p.tensors[0].range.start, 68);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let good = file();
        assert_eq!(
            &good[offset_field()..offset_field() + 8],
            &0u64.to_le_bytes()
        );
        // Truncated anywhere in the header or data: an error, never a panic.
        for cut in [3, 10, 30, 60, good.len() - 96 + 67] {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A tensor count of 2^60.
        let mut b = good.clone();
        b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(&b).unwrap_err().message.contains("cannot fit"));
        // A string length of 2^63 (the key's).
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(parse(&b).is_err());
        // A tensor offset that wraps around, and one just past the end.
        for offset in [u64::MAX - 31, 64] {
            let mut b = good.clone();
            let at = offset_field();
            b[at..at + 8].copy_from_slice(&offset.to_le_bytes());
            assert!(
                parse(&b).unwrap_err().message.contains("past the end"),
                "{offset}"
            );
        }
    }

    /// Where the single tensor's offset field is: after magic, version and counts (24), the
    /// key/value, the name, its dimension count, two extents and the type.
    fn offset_field() -> usize {
        let key = 8 + "general.architecture".len();
        let val = 4 + 8 + "llama".len();
        24 + key + val + (8 + 1) + 4 + 16 + 4
    }
}

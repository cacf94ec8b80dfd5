//! Reading untrusted safetensors headers: the safetensors crate validates (header ≤ 100 MB,
//! offsets in bounds, contiguous with no overlap or hole, byte size = dtype × shape, data covers
//! the file exactly); this module turns its terse errors into messages that name the file and
//! the tensor.

use crate::dtype::from_st;
use bridgeflow_sdk::{DType, PluginError, Result, TensorInfo};
use safetensors::{SafeTensorError, SafeTensors};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// One tensor of a file: its info and where its bytes are in the file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub info: TensorInfo,
    pub range: Range<usize>,
}

/// The tensors of one file, in file order, and its `__metadata__`.
pub struct Header {
    pub entries: Vec<Entry>,
    pub metadata: HashMap<String, String>,
}

/// Most tensors one file may declare. Parsing costs about a kilobyte and a few microseconds a
/// tensor, so a header is bounded by its count as well as its 100 MB: a 1M-tensor header would
/// take a gigabyte. The largest releases hold a few tens of thousands per file.
pub const MAX_TENSORS: usize = 1 << 18;

/// How many tensors a header declares, counted without parsing it (its `data_offsets` keys;
/// a count that is too high only over-estimates when a name contains the key's text).
fn declared_tensors(bytes: &[u8]) -> usize {
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    else {
        return 0;
    };
    let end = 8usize
        .saturating_add(n.min(bytes.len() as u64) as usize)
        .min(bytes.len());
    let key = b"\"data_offsets\"";
    bytes[8.min(end)..end]
        .windows(key.len())
        .filter(|w| *w == key)
        .count()
}

pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let file = path.display();
    let count = declared_tensors(bytes);
    if count > MAX_TENSORS {
        return Err(PluginError::format(format!(
            "{file}: the header declares {count} tensors, more than the {MAX_TENSORS} one file may hold (corrupt or hostile)"
        )));
    }
    let (n, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| PluginError::format(format!("{file}: {}", explain(&e, bytes))))?;
    let data_start = 8 + n;
    let mut entries = Vec::new();
    for name in meta.offset_keys() {
        let info = meta.info(&name).expect("listed by offset_keys");
        let dtype = from_st(info.dtype).ok_or_else(|| {
            PluginError::unsupported(format!(
                "{file}: tensor '{name}' has dtype {:?}, which bridgeflow does not handle",
                info.dtype
            ))
        })?;
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        let (s, e) = info.data_offsets;
        entries.push(Entry {
            info: TensorInfo::new(name, dtype, &shape),
            range: data_start + s..data_start + e,
        });
    }
    Ok(Header {
        entries,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// A message for each way a header can be wrong, naming the tensor where one is to blame.
fn explain(e: &SafeTensorError, bytes: &[u8]) -> String {
    let declared = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    match e {
        SafeTensorError::HeaderTooSmall => format!(
            "truncated: {} bytes, shorter than the 8-byte header length",
            bytes.len()
        ),
        SafeTensorError::HeaderTooLarge => format!(
            "header length {} exceeds the 100 MB limit (corrupt, or not a safetensors file)",
            declared.unwrap_or(0)
        ),
        SafeTensorError::InvalidHeaderLength => format!(
            "header length {} points past the end of the file ({} bytes): truncated or corrupt",
            declared.unwrap_or(0),
            bytes.len()
        ),
        SafeTensorError::InvalidHeader(err) => format!("header is not UTF-8: {err}"),
        SafeTensorError::InvalidHeaderDeserialization(err) => {
            format!("header is not a valid safetensors JSON header: {err}")
        }
        SafeTensorError::InvalidOffset(name) => format!(
            "tensor '{name}': data offsets overlap another tensor or leave a hole{}",
            diagnose(bytes)
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ),
        SafeTensorError::TensorInvalidInfo | SafeTensorError::ValidationOverflow => diagnose(bytes)
            .unwrap_or_else(|| "a tensor's size does not match its dtype and shape".into()),
        SafeTensorError::MetadataIncompleteBuffer => {
            let covered = diagnose_end(bytes);
            format!(
                "the tensors cover {} data bytes but the file holds {}: truncated, or trailing garbage",
                covered.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
                declared
                    .map(|n| bytes.len().saturating_sub(8 + n as usize).to_string())
                    .unwrap_or_else(|| "?".into())
            )
        }
        other => other.to_string(),
    }
}

fn header_json(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    serde_json::from_str(text).ok()
}

struct Raw {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    start: u64,
    end: u64,
}

fn raw_entries(bytes: &[u8]) -> Option<Vec<Raw>> {
    let map = header_json(bytes)?;
    let mut v = Vec::new();
    for (name, t) in map {
        if name == "__metadata__" {
            continue;
        }
        let offs = t.get("data_offsets")?.as_array()?;
        v.push(Raw {
            dtype: t.get("dtype")?.as_str()?.to_string(),
            shape: t
                .get("shape")?
                .as_array()?
                .iter()
                .map(|x| x.as_u64())
                .collect::<Option<_>>()?,
            start: offs.first()?.as_u64()?,
            end: offs.get(1)?.as_u64()?,
            name,
        });
    }
    v.sort_by_key(|r| (r.start, r.end));
    Some(v)
}

fn diagnose(bytes: &[u8]) -> Option<String> {
    let entries = raw_entries(bytes)?;
    let mut expected_start = 0;
    for r in &entries {
        if r.start != expected_start {
            return Some(format!(
                "tensor '{}' starts at data offset {} but the previous tensor ends at {}",
                r.name, r.start, expected_start
            ));
        }
        expected_start = r.end;
        let dtype = DType::parse(&r.dtype)?;
        let numel = r.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let want = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
        match want {
            None => {
                return Some(format!(
                    "tensor '{}': shape {:?} overflows",
                    r.name, r.shape
                ))
            }
            Some(w) if w != r.end.saturating_sub(r.start) || r.end < r.start => {
                return Some(format!(
                    "tensor '{}': {} {:?} needs {} bytes but its data_offsets [{}, {}] span {}",
                    r.name,
                    r.dtype,
                    r.shape,
                    w,
                    r.start,
                    r.end,
                    r.end as i128 - r.start as i128
                ))
            }
            _ => {}
        }
    }
    None
}

fn diagnose_end(bytes: &[u8]) -> Option<u64> {
    raw_entries(bytes)?.iter().map(|r| r.end).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header of `n` one-byte tensors.
    fn header_of(n: usize) -> Vec<u8> {
        let mut text = String::from("{");
        for i in 0..n {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&format!(
                "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[{i},{}]}}",
                i + 1
            ));
        }
        text.push('}');
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text.into_bytes());
        out.extend(std::iter::repeat_n(0u8, n));
        out
    }

    #[test]
    fn a_header_is_bounded_by_its_tensor_count() {
        let p = Path::new("many.safetensors");
        assert_eq!(parse(p, &header_of(3)).unwrap().entries.len(), 3);
        assert_eq!(declared_tensors(&header_of(1000)), 1000);
        let e = parse(p, &header_of(MAX_TENSORS + 1)).err().unwrap();
        assert!(
            e.message.contains("many.safetensors") && e.message.contains("262145 tensors"),
            "{}",
            e.message
        );
        // A header length past the file's end counts only what is there.
        let mut short = header_of(2);
        short[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(declared_tensors(&short), 2);
    }
}

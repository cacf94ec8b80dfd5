//! A torch_dist checkpoint on disk: where it is, what `.metadata` says, and how to get at the
//! bytes of one item.

use crate::dtypes;
use crate::pickle::{self, Value};
use crate::zip;
use bridgeflow_sdk::{DType, PluginError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Storage {
    pub file: String,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    pub storage: Storage,
}

#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub dtype: DType,
    pub size: Vec<u64>,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Default)]
pub struct CheckpointMeta {
    pub tensors: BTreeMap<String, TensorMeta>,
    pub bytes: BTreeMap<String, Storage>,
}

/// The folder holding `.metadata`: the given one, or the iteration a checkpoint root points to
/// (`latest_checkpointed_iteration.txt` → `iter_XXXXXXX/`).
/// The iteration folder a checkpoint root's `latest_checkpointed_iteration.txt` names
/// (`iter_XXXXXXX` or `release`), with the tracker's text; None without a tracker. Megatron-Core
/// and Megatron-LM roots share it.
pub fn latest_iteration(path: &Path) -> Result<Option<(PathBuf, String)>> {
    let latest = path.join("latest_checkpointed_iteration.txt");
    if !latest.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&latest).map_err(|e| PluginError::io(&latest, "cannot read", e))?;
    let t = text.trim().to_string();
    let dir = if t == "release" {
        path.join("release")
    } else {
        let n: u64 = t.parse().map_err(|_| {
            PluginError::format(format!(
                "{}: '{t}' is not an iteration number",
                latest.display()
            ))
        })?;
        path.join(format!("iter_{n:07}"))
    };
    Ok(Some((dir, t)))
}

pub fn resolve_dir(path: &Path) -> Result<PathBuf> {
    if path.join(".metadata").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest_checkpointed_iteration.txt");
    if let Some((dir, t)) = latest_iteration(path)? {
        if dir.join(".metadata").is_file() {
            return Ok(dir);
        }
        return Err(PluginError::format(format!(
            "{} names iteration '{t}' but {} has no .metadata",
            latest.display(),
            dir.display()
        )));
    }
    Err(PluginError::format(format!(
        "{}: no .metadata and no latest_checkpointed_iteration.txt: not a torch_dist checkpoint",
        path.display()
    )))
}

fn size_of(v: &Value) -> Option<Vec<u64>> {
    // torch.Size((d0, d1, ...)) is REDUCE(torch.Size, ((...),))
    if let Value::Object(o) = v {
        let o = o.borrow();
        if o.name == "Size" {
            return o
                .args
                .first()?
                .items()?
                .iter()
                .map(|d| d.as_int().map(|x| x as u64))
                .collect();
        }
    }
    v.items()?
        .iter()
        .map(|d| d.as_int().map(|x| x as u64))
        .collect()
}

fn storage_of(v: &Value) -> Option<Storage> {
    Some(Storage {
        file: v.field("relative_path")?.as_str()?.to_string(),
        offset: v.field("offset")?.as_int()? as u64,
        length: v.field("length")?.as_int()? as u64,
    })
}

pub fn read_metadata(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(".metadata");
    let bytes = std::fs::read(&path).map_err(|e| PluginError::io(&path, "cannot read", e))?;
    let root = pickle::load(&bytes, &path.display().to_string()).map_err(PluginError::format)?;
    let bad = |what: &str| PluginError::format(format!("{}: {what}", path.display()));
    if root.class().as_deref() != Some("torch.distributed.checkpoint.metadata.Metadata") {
        return Err(bad(
            "the pickle is not a torch.distributed.checkpoint Metadata",
        ));
    }
    // storage_data: (fqn, chunk offsets) → where the bytes are.
    let mut storage: BTreeMap<(String, Vec<u64>), Storage> = BTreeMap::new();
    for (k, v) in root
        .field("storage_data")
        .and_then(|s| s.dict_entries())
        .ok_or_else(|| bad("no storage_data"))?
    {
        let fqn = k
            .field("fqn")
            .and_then(|f| f.as_str().map(str::to_owned))
            .ok_or_else(|| bad("a MetadataIndex without fqn"))?;
        let offsets = k
            .field("offset")
            .and_then(|o| size_of(&o))
            .unwrap_or_default();
        let s = storage_of(&v).ok_or_else(|| bad(&format!("storage of '{fqn}' is incomplete")))?;
        if s.file.contains('/') || s.file.contains("..") {
            return Err(bad(&format!(
                "storage of '{fqn}' points outside the checkpoint: {}",
                s.file
            )));
        }
        storage.insert((fqn, offsets), s);
    }
    let mut meta = CheckpointMeta::default();
    for (k, v) in root
        .field("state_dict_metadata")
        .and_then(|s| s.dict_entries())
        .ok_or_else(|| bad("no state_dict_metadata"))?
    {
        let key = k
            .as_str()
            .ok_or_else(|| bad("a non-string key"))?
            .to_string();
        match v.class().as_deref() {
            Some("torch.distributed.checkpoint.metadata.BytesStorageMetadata") => {
                if let Some(s) = storage.get(&(key.clone(), vec![])) {
                    meta.bytes.insert(key, s.clone());
                }
            }
            Some("torch.distributed.checkpoint.metadata.TensorStorageMetadata") => {
                let props = v
                    .field("properties")
                    .ok_or_else(|| bad(&format!("'{key}' has no properties")))?;
                let dtype = match &props {
                    Value::Object(o) => match o
                        .borrow()
                        .state
                        .as_ref()
                        .and_then(|s| s.items())
                        .and_then(|t| t.first().cloned())
                    {
                        Some(Value::Global(m, n)) if m == "torch" => dtypes::from_torch(&n),
                        _ => None,
                    },
                    _ => None,
                }
                .ok_or_else(|| bad(&format!("'{key}': unknown or missing dtype")))?;
                let size = v
                    .field("size")
                    .and_then(|s| size_of(&s))
                    .ok_or_else(|| bad(&format!("'{key}' has no size")))?;
                let mut chunks = Vec::new();
                for c in v
                    .field("chunks")
                    .and_then(|c| c.items())
                    .ok_or_else(|| bad(&format!("'{key}' has no chunks")))?
                {
                    let offsets = c
                        .field("offsets")
                        .and_then(|o| size_of(&o))
                        .ok_or_else(|| bad(&format!("'{key}': chunk without offsets")))?;
                    let sizes = c
                        .field("sizes")
                        .and_then(|o| size_of(&o))
                        .ok_or_else(|| bad(&format!("'{key}': chunk without sizes")))?;
                    if offsets.len() != size.len()
                        || sizes.len() != size.len()
                        || offsets
                            .iter()
                            .zip(&sizes)
                            .zip(&size)
                            .any(|((o, s), g)| o + s > *g)
                    {
                        return Err(bad(&format!(
                            "'{key}': chunk at {offsets:?} of {sizes:?} lies outside {size:?}"
                        )));
                    }
                    let st = storage
                        .get(&(key.clone(), offsets.clone()))
                        .cloned()
                        .ok_or_else(|| {
                            bad(&format!("'{key}': no storage for the chunk at {offsets:?}"))
                        })?;
                    chunks.push(Chunk {
                        offsets,
                        sizes,
                        storage: st,
                    });
                }
                let covered: u64 = chunks.iter().map(|c| c.sizes.iter().product::<u64>()).sum();
                if covered != size.iter().product::<u64>() {
                    return Err(bad(&format!(
                        "'{key}': chunks cover {covered} of {} elements (missing or overlapping pieces)",
                        size.iter().product::<u64>()
                    )));
                }
                meta.tensors.insert(
                    key,
                    TensorMeta {
                        dtype,
                        size,
                        chunks,
                    },
                );
            }
            other => return Err(bad(&format!("'{key}' has unknown metadata {other:?}"))),
        }
    }
    Ok(meta)
}

/// The payload of one tensor item: its bytes within `item` and its layout.
pub struct ItemTensor {
    pub data: std::ops::Range<usize>,
    pub dtype: DType,
    pub size: Vec<u64>,
}

/// Parses a tensor item (a whole torch.save archive) and returns where its elements are.
/// The tensor of a `torch.save` item; `read` is told of each window of the payload as its
/// CRC check reads it (see [`zip::find_with`]).
pub fn tensor_item(
    item: &[u8],
    read: &mut dyn FnMut(&[u8]),
) -> std::result::Result<ItemTensor, String> {
    let entries = zip::entries(item)?;
    let pkl = zip::find(item, &entries, "data.pkl")?;
    let v = pickle::load(pkl, "data.pkl")?;
    tensor_in(item, &entries, &v, read)
}

/// Whether a pickled value is a tensor (`_rebuild_tensor_v2`, maybe in `_rebuild_parameter`).
pub fn is_tensor(v: &Value) -> bool {
    matches!(
        v.class().as_deref(),
        Some("torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_parameter")
    )
}

/// Where the elements of the tensor `v` (unpickled from the archive `item`'s data.pkl) are in
/// `item`, after the CRC check of its storage record.
pub fn tensor_in(
    item: &[u8],
    entries: &[zip::Entry],
    v: &Value,
    read: &mut dyn FnMut(&[u8]),
) -> std::result::Result<ItemTensor, String> {
    // _rebuild_parameter(tensor, ...) wraps _rebuild_tensor_v2(storage, offset, size, stride, ...)
    let mut t = v.clone();
    if let Value::Object(o) = &t {
        let inner = {
            let o = o.borrow();
            (o.name == "_rebuild_parameter")
                .then(|| o.args.first().cloned())
                .flatten()
        };
        if let Some(i) = inner {
            t = i;
        }
    }
    let Value::Object(o) = &t else {
        return Err("data.pkl holds no tensor".into());
    };
    let o = o.borrow();
    if o.name != "_rebuild_tensor_v2" || o.args.len() < 4 {
        return Err(format!(
            "data.pkl holds {}.{}, not a tensor",
            o.module, o.name
        ));
    }
    let Value::Persistent(pid) = &o.args[0] else {
        return Err("tensor without storage".into());
    };
    let pid = pid.items().ok_or("bad storage id")?;
    let (dtype, key, numel) = match pid.as_slice() {
        [_, Value::Global(_, cls), key, _, numel] => (
            dtypes::from_storage(cls).ok_or_else(|| format!("unknown storage {cls}"))?,
            key.as_str()
                .ok_or("storage key is not a string")?
                .to_string(),
            numel.as_int().ok_or("storage size is not an integer")? as u64,
        ),
        _ => return Err("unexpected storage id".into()),
    };
    let offset = o.args[1]
        .as_int()
        .ok_or("storage offset is not an integer")? as u64;
    let size: Vec<u64> = o.args[2]
        .items()
        .ok_or("size is not a tuple")?
        .iter()
        .map(|d| d.as_int().map(|x| x as u64))
        .collect::<Option<_>>()
        .ok_or("bad size")?;
    let stride: Vec<u64> = o.args[3]
        .items()
        .ok_or("stride is not a tuple")?
        .iter()
        .map(|d| d.as_int().map(|x| x as u64))
        .collect::<Option<_>>()
        .ok_or("bad stride")?;
    // Only contiguous row-major layouts (what torch_dist writes: every chunk is cloned).
    let mut want = 1u64;
    for (d, s) in size.iter().zip(&stride).rev() {
        if *d > 1 && *s != want {
            return Err(format!(
                "non-contiguous tensor (size {size:?}, stride {stride:?})"
            ));
        }
        want *= d;
    }
    let numel_needed: u64 = size.iter().product();
    if offset + numel_needed > numel {
        return Err(format!(
            "tensor of {numel_needed} elements at offset {offset} overruns its storage of {numel}"
        ));
    }
    let storage = zip::find_with(item, entries, &format!("data/{key}"), read)?;
    let es = dtype.size() as u64;
    if storage.len() as u64 != numel * es {
        return Err(format!(
            "storage record has {} bytes, {numel} × {es} expected",
            storage.len()
        ));
    }
    let start = storage.as_ptr() as usize - item.as_ptr() as usize + (offset * es) as usize;
    Ok(ItemTensor {
        data: start..start + (numel_needed * es) as usize,
        dtype,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::{either::Arg, Pickler};

    /// A `.metadata` for one [4, 2] f32 tensor with the given chunks (offsets, sizes).
    fn metadata(chunks: &[([u64; 2], [u64; 2])]) -> Vec<u8> {
        const M: &str = "torch.distributed.checkpoint.metadata";
        let mut p = Pickler::new();
        p.newobj(M, "Metadata");
        p.dict_begin();
        p.str("state_dict_metadata");
        p.dict_begin();
        p.str("w");
        p.newobj(M, "TensorStorageMetadata");
        p.dict_begin();
        p.str("properties");
        p.newobj(M, "TensorProperties");
        p.mark();
        p.global("torch", "float32");
        p.reduce1(
            "torch.serialization",
            "_get_layout",
            Arg::Str("torch.strided"),
        );
        p.bool(false);
        p.reduce1(M, "_MEM_FORMAT_ENCODING", Arg::Int(0));
        p.bool(false);
        p.tuple(5);
        p.build();
        p.str("size");
        p.torch_size(&[4, 2]);
        p.str("chunks");
        p.empty_list();
        p.mark();
        for (o, s) in chunks {
            p.newobj(M, "ChunkStorageMetadata");
            p.dict_begin();
            p.str("offsets");
            p.torch_size(o);
            p.str("sizes");
            p.torch_size(s);
            p.dict_end();
            p.build();
        }
        p.op(b'e');
        p.dict_end();
        p.build();
        p.dict_end();
        p.str("storage_data");
        p.dict_begin();
        for (i, (o, _)) in chunks.iter().enumerate() {
            p.newobj(M, "MetadataIndex");
            p.dict_begin();
            p.str("fqn");
            p.str("w");
            p.str("offset");
            p.torch_size(o);
            p.dict_end();
            p.build();
            p.newobj("torch.distributed.checkpoint.filesystem", "_StorageInfo");
            p.dict_begin();
            p.str("relative_path");
            p.str("__0_0.distcp");
            p.str("offset");
            p.int(i as i64 * 100);
            p.str("length");
            p.int(100);
            p.dict_end();
            p.build();
        }
        p.dict_end();
        p.dict_end();
        p.build();
        p.finish()
    }

    #[test]
    fn chunks_must_tile_the_tensor() {
        let dir = std::env::temp_dir().join(format!("bf-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(".metadata"),
            metadata(&[([0, 0], [2, 2]), ([2, 0], [2, 2])]),
        )
        .unwrap();
        let m = read_metadata(&dir).unwrap();
        assert_eq!(m.tensors["w"].chunks.len(), 2);
        std::fs::write(dir.join(".metadata"), metadata(&[([0, 0], [2, 2])])).unwrap();
        let e = read_metadata(&dir).unwrap_err();
        assert!(
            e.message.contains("'w': chunks cover 4 of 8 elements"),
            "{e}"
        );
        std::fs::write(
            dir.join(".metadata"),
            metadata(&[([0, 0], [2, 2]), ([3, 0], [2, 2])]),
        )
        .unwrap();
        let e = read_metadata(&dir).unwrap_err();
        assert!(e.message.contains("lies outside"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

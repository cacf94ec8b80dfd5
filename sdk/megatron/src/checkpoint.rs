//! A torch_dist checkpoint on disk: where it is, what `.metadata` says, and how to get at the
//! bytes of one item.

use crate::dtypes;
use crate::names;
use crate::pickle::{self, Value};
use crate::tiling::{overlapping_pair, Region};
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
    let latest = path.join(names::LATEST_ITERATION);
    if !latest.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&latest).map_err(|e| PluginError::io(&latest, "cannot read", e))?;
    let t = text.trim().to_string();
    let dir = if t == names::RELEASE {
        path.join(names::RELEASE)
    } else {
        let n: u64 = t.parse().map_err(|_| {
            PluginError::format(format!(
                "{}: '{t}' is not an iteration number",
                latest.display()
            ))
        })?;
        path.join(names::iteration_dir(n))
    };
    Ok(Some((dir, t)))
}

pub fn resolve_dir(path: &Path) -> Result<PathBuf> {
    if path.join(".metadata").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(names::LATEST_ITERATION);
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

/// A `.metadata` error: its path and what is wrong.
type Bad<'a> = &'a dyn Fn(&str) -> PluginError;

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
    let storage = storage_data(&root, &bad)?;
    check_files_tiled(dir, &storage)?;
    let mut used: std::collections::HashSet<(String, Vec<u64>)> = Default::default();
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
                    used.insert((key.clone(), vec![]));
                    meta.bytes.insert(key, s.clone());
                }
            }
            Some("torch.distributed.checkpoint.metadata.TensorStorageMetadata") => {
                let t = tensor_meta(&key, &v, &storage, &mut used, &bad)?;
                meta.tensors.insert(key, t);
            }
            other => return Err(bad(&format!("'{key}' has unknown metadata {other:?}"))),
        }
    }
    // Stored bytes that no entry describes: an entry lost from state_dict_metadata.
    let orphans: Vec<&str> = storage
        .keys()
        .filter(|k| !used.contains(*k))
        .map(|(fqn, _)| fqn.as_str())
        .collect();
    if let Some(first) = orphans.first() {
        return Err(bad(&format!(
            "{} stored item(s) have no entry in state_dict_metadata, first '{first}' (a damaged .metadata would lose the tensor)",
            orphans.len()
        )));
    }
    Ok(meta)
}

/// `storage_data`: (fqn, chunk offsets) → where the bytes are, each inside the checkpoint.
fn storage_data(root: &Value, bad: Bad) -> Result<BTreeMap<(String, Vec<u64>), Storage>> {
    let mut storage: BTreeMap<(String, Vec<u64>), Storage> = BTreeMap::new();
    for (k, v) in root
        .field("storage_data")
        .and_then(|s| s.dict_entries())
        .ok_or_else(|| bad("no storage_data"))?
    {
        few_fields(&k, "a MetadataIndex").map_err(|e| bad(&e))?;
        few_fields(&v, "a storage entry").map_err(|e| bad(&e))?;
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
    Ok(storage)
}

/// A `TensorStorageMetadata` entry: dtype, size and chunks, each chunk inside the tensor and
/// stored once (`used`), the chunks covering the tensor's elements.
fn tensor_meta(
    key: &str,
    v: &Value,
    storage: &BTreeMap<(String, Vec<u64>), Storage>,
    used: &mut std::collections::HashSet<(String, Vec<u64>)>,
    bad: Bad,
) -> Result<TensorMeta> {
    few_fields(v, &format!("'{key}'")).map_err(|e| bad(&e))?;
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
        chunks.push(chunk_meta(key, &c, (dtype, &size), storage, used, bad)?);
    }
    let elements = |dims: &[u64]| dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let covered = chunks
        .iter()
        .try_fold(0u64, |n, c| n.checked_add(elements(&c.sizes)?));
    let whole = elements(&size);
    if covered.is_none() || covered != whole {
        let n = |v: Option<u64>| v.map_or("over 2^64".into(), |v| v.to_string());
        return Err(bad(&format!(
            "'{key}': chunks cover {} of {} elements (missing or overlapping pieces)",
            n(covered),
            n(whole)
        )));
    }
    check_disjoint(key, &chunks).map_err(|e| bad(&e))?;
    Ok(TensorMeta {
        dtype,
        size,
        chunks,
    })
}

/// No element in two chunks: with the count above, the chunks tile the tensor exactly.
fn check_disjoint(key: &str, chunks: &[Chunk]) -> std::result::Result<(), String> {
    let regions: Vec<Region> = chunks
        .iter()
        .map(|c| Region {
            offsets: &c.offsets,
            sizes: &c.sizes,
        })
        .collect();
    match overlapping_pair(&regions) {
        None => Ok(()),
        Some((i, j)) => Err(format!(
            "'{key}': the chunks at {:?} of {:?} and at {:?} of {:?} overlap (so others leave \
             elements missing)",
            chunks[i].offsets, chunks[i].sizes, chunks[j].offsets, chunks[j].sizes
        )),
    }
}

/// One `ChunkStorageMetadata` of tensor `key` (`dtype`, `size`): inside the tensor, with its
/// own stored item holding at least its elements.
fn chunk_meta(
    key: &str,
    c: &Value,
    (dtype, size): (DType, &[u64]),
    storage: &BTreeMap<(String, Vec<u64>), Storage>,
    used: &mut std::collections::HashSet<(String, Vec<u64>)>,
    bad: Bad,
) -> Result<Chunk> {
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
            .zip(size)
            .any(|((o, s), g)| o.checked_add(*s).is_none_or(|end| end > *g))
    {
        return Err(bad(&format!(
            "'{key}': chunk at {offsets:?} of {sizes:?} lies outside {size:?}"
        )));
    }
    let st = storage
        .get(&(key.to_string(), offsets.clone()))
        .cloned()
        .ok_or_else(|| bad(&format!("'{key}': no storage for the chunk at {offsets:?}")))?;
    // Each chunk its own stored item, holding at least its elements: a chunk listed twice, or
    // larger than its bytes, is a lie that would size memory.
    if !used.insert((key.to_string(), offsets.clone())) {
        return Err(bad(&format!(
            "'{key}': the chunk at {offsets:?} is listed twice"
        )));
    }
    let chunk_bytes = sizes
        .iter()
        .try_fold(dtype.size() as u64, |n, &d| n.checked_mul(d));
    if chunk_bytes.is_none_or(|b| b > st.length) {
        return Err(bad(&format!(
            "'{key}': the chunk at {offsets:?} of {sizes:?} needs more bytes than its stored {}",
            st.length
        )));
    }
    Ok(Chunk {
        offsets,
        sizes,
        storage: st,
    })
}

/// Where one stored item lies: file, first byte, length, and whose it is.
type Placement<'a> = (&'a str, u64, u64, &'a str);

/// Every data file is exactly its items end to end, as torch's FileSystemWriter and ours write
/// them: a hole is bytes a damaged `.metadata` no longer describes (a lost tensor), an overlap
/// or a run past the end is a lie about where bytes are.
fn check_files_tiled(dir: &Path, storage: &BTreeMap<(String, Vec<u64>), Storage>) -> Result<()> {
    let mut by_file: BTreeMap<&str, Vec<Placement>> = BTreeMap::new();
    for ((fqn, _), s) in storage {
        by_file.entry(s.file.as_str()).or_default().push((
            s.file.as_str(),
            s.offset,
            s.length,
            fqn.as_str(),
        ));
    }
    for (file, mut items) in by_file {
        let path = dir.join(file);
        let len = std::fs::metadata(&path)
            .map_err(|e| PluginError::io(&path, "cannot read", e))?
            .len();
        items.sort_by_key(|&(_, at, n, _)| (at, n));
        tiling_gap(&items, len).map_or(Ok(()), |why| {
            Err(PluginError::format(format!("{}: {why}", path.display())))
        })?;
    }
    Ok(())
}

/// Why items sorted by offset do not tile a file of `len` bytes, if they do not.
fn tiling_gap(items: &[Placement], len: u64) -> Option<String> {
    let mut at = 0u64;
    for &(_, offset, length, fqn) in items {
        if offset > at {
            return Some(format!(
                "bytes {at}..{offset} belong to no item of .metadata (before '{fqn}'): an entry is missing"
            ));
        }
        if offset < at {
            return Some(format!(
                "'{fqn}' at byte {offset} overlaps the item before it"
            ));
        }
        at = match offset.checked_add(length) {
            Some(end) => end,
            None => return Some(format!("'{fqn}' claims {length} bytes at {offset}")),
        };
    }
    match at.cmp(&len) {
        std::cmp::Ordering::Less => Some(format!(
            "bytes {at}..{len} belong to no item of .metadata: an entry is missing"
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "its items run to byte {at}, past its {len} bytes: truncated"
        )),
        std::cmp::Ordering::Equal => None,
    }
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
/// Most fields a checkpoint metadata object has (torch's have at most five): looking fields up
/// is a scan, so a shared object with thousands of junk fields would make reading quadratic.
const MAX_FIELDS: usize = 16;

fn few_fields(v: &Value, what: &str) -> std::result::Result<(), String> {
    if let Value::Object(o) = v {
        if let Some(Value::Dict(d)) = o.borrow().state.as_ref() {
            let n = d.borrow().len();
            if n > MAX_FIELDS {
                return Err(format!("{what} has {n} fields, more than {MAX_FIELDS}"));
            }
        }
    }
    Ok(())
}

/// A pickled integer that must be ≥ 0 (a size, offset or stride from an untrusted file).
fn nonneg(v: &Value, what: &str) -> std::result::Result<u64, String> {
    match v.as_int() {
        Some(n) if n >= 0 => Ok(n as u64),
        Some(n) => Err(format!("{what} {n} is negative")),
        None => Err(format!("{what} is not an integer")),
    }
}

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
            nonneg(numel, "storage size")?,
        ),
        _ => return Err("unexpected storage id".into()),
    };
    let offset = nonneg(&o.args[1], "storage offset")?;
    let dims = |v: &Value, what: &str| -> std::result::Result<Vec<u64>, String> {
        v.items()
            .ok_or(format!("{what} is not a tuple"))?
            .iter()
            .map(|d| nonneg(d, what))
            .collect()
    };
    let size = dims(&o.args[2], "size")?;
    let stride = dims(&o.args[3], "stride")?;
    if stride.len() != size.len() {
        return Err(format!("size {size:?} with stride {stride:?}"));
    }
    // Only contiguous row-major layouts (what torch_dist writes: every chunk is cloned).
    let mut want = 1u64;
    for (d, s) in size.iter().zip(&stride).rev() {
        if *d > 1 && *s != want {
            return Err(format!(
                "non-contiguous tensor (size {size:?}, stride {stride:?})"
            ));
        }
        want = want.saturating_mul(*d);
    }
    let numel_needed = size
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("size {size:?} overflows"))?;
    if offset
        .checked_add(numel_needed)
        .is_none_or(|end| end > numel)
    {
        return Err(format!(
            "tensor of {numel_needed} elements at offset {offset} overruns its storage of {numel}"
        ));
    }
    let storage = zip::find_with(item, entries, &format!("data/{key}"), read)?;
    let es = dtype.size() as u64;
    if numel.checked_mul(es) != Some(storage.len() as u64) {
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

/// Copies the part of `chunk` (row-major over its sizes) inside the region (`r_off`, `r_size`)
/// into `out` (row-major over the region's sizes); `es` is the element size.
pub fn copy_block(
    src: &[u8],
    chunk: &Chunk,
    r_off: &[u64],
    r_size: &[u64],
    es: usize,
    out: &mut [u8],
) {
    let n = r_size.len();
    if n == 0 {
        out.copy_from_slice(&src[..es]);
        return;
    }
    let lo: Vec<u64> = (0..n).map(|d| chunk.offsets[d].max(r_off[d])).collect();
    let hi: Vec<u64> = (0..n)
        .map(|d| (chunk.offsets[d] + chunk.sizes[d]).min(r_off[d] + r_size[d]))
        .collect();
    if (0..n).any(|d| lo[d] >= hi[d]) {
        return;
    }
    let strides = |s: &[u64]| {
        let mut st = vec![1u64; s.len()];
        for d in (0..s.len().saturating_sub(1)).rev() {
            st[d] = st[d + 1] * s[d + 1];
        }
        st
    };
    let (cs, rs) = (strides(&chunk.sizes), strides(r_size));
    let run = ((hi[n - 1] - lo[n - 1]) as usize) * es;
    let mut idx = lo.clone();
    loop {
        let s: u64 = (0..n).map(|d| (idx[d] - chunk.offsets[d]) * cs[d]).sum();
        let t: u64 = (0..n).map(|d| (idx[d] - r_off[d]) * rs[d]).sum();
        let (s, t) = (s as usize * es, t as usize * es);
        out[t..t + run].copy_from_slice(&src[s..s + run]);
        // Odometer over all dimensions but the last.
        let mut d = n - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < hi[d] {
                break;
            }
            idx[d] = lo[d];
        }
    }
}

/// The elements a region of `sizes` holds, None past 2^64.
fn elements(sizes: &[u64]) -> Option<u64> {
    sizes.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
}

/// The elements the chunk and the region have in common.
fn overlap(c: &Chunk, offsets: &[u64], sizes: &[u64]) -> u64 {
    (0..sizes.len())
        .map(|d| {
            let lo = c.offsets[d].max(offsets[d]);
            let hi = (c.offsets[d] + c.sizes[d]).min(offsets[d] + sizes[d]);
            hi.saturating_sub(lo)
        })
        .product()
}

/// Reads whole stored items of one checkpoint folder by position (pread, no map): for the
/// small and mid-sized reads of a resume, where a map's page accounting buys nothing.
pub struct ItemReader {
    dir: PathBuf,
    files: BTreeMap<String, std::fs::File>,
}

impl ItemReader {
    pub fn new(dir: &Path) -> ItemReader {
        ItemReader {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        }
    }

    /// The bytes of one stored item (`read_metadata` checked that it lies inside its file).
    pub fn item(&mut self, s: &Storage) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let path = self.dir.join(&s.file);
        if !self.files.contains_key(&s.file) {
            let f =
                std::fs::File::open(&path).map_err(|e| PluginError::io(&path, "cannot open", e))?;
            self.files.insert(s.file.clone(), f);
        }
        let mut bytes = vec![0u8; s.length as usize];
        self.files[&s.file]
            .read_exact_at(&mut bytes, s.offset)
            .map_err(|e| PluginError::io(&path, "cannot read", e))?;
        Ok(bytes)
    }

    /// The region (`offsets`, `sizes`) of tensor `key`, row-major in its dtype, assembled from
    /// the chunks that cover it, whatever their cut; each chunk's item is checked (its CRC-32,
    /// its dtype and shape against the index) before use.
    pub fn region(
        &mut self,
        key: &str,
        t: &TensorMeta,
        offsets: &[u64],
        sizes: &[u64],
    ) -> Result<Vec<u8>> {
        let path = self.dir.clone();
        let bad = |what: String| {
            PluginError::format(format!("{}: tensor '{key}': {what}", path.display()))
        };
        let inside = offsets.len() == t.size.len()
            && sizes.len() == t.size.len()
            && (0..sizes.len()).all(|d| {
                offsets[d]
                    .checked_add(sizes[d])
                    .is_some_and(|e| e <= t.size[d])
            });
        if !inside {
            return Err(PluginError::shape(format!(
                "{}: tensor '{key}' is {:?}; the region at {offsets:?} of {sizes:?} is not inside it",
                path.display(),
                t.size
            )));
        }
        let es = t.dtype.size();
        let want = elements(sizes).ok_or_else(|| bad(format!("{sizes:?} overflows")))?;
        let mut out = vec![0u8; want as usize * es];
        let mut covered = 0u64;
        for c in t.chunks.iter().filter(|c| overlap(c, offsets, sizes) > 0) {
            let item = self.item(&c.storage)?;
            let it = tensor_item(&item, &mut |_| {}).map_err(|e| {
                bad(format!(
                    "chunk at {:?} in {}: {e}",
                    c.offsets, c.storage.file
                ))
            })?;
            if it.dtype != t.dtype || it.size != c.sizes {
                return Err(PluginError::shape(format!(
                    "{}: tensor '{key}' chunk at {:?} holds {} {:?}; the metadata says {} {:?}",
                    path.join(&c.storage.file).display(),
                    c.offsets,
                    it.dtype,
                    it.size,
                    t.dtype,
                    c.sizes
                )));
            }
            copy_block(&item[it.data], c, offsets, sizes, es, &mut out);
            covered += overlap(c, offsets, sizes);
        }
        if covered != want {
            return Err(bad(format!(
                "the chunks cover {covered} of the {want} elements at {offsets:?} of {sizes:?}"
            )));
        }
        Ok(out)
    }
}

/// A `torch.save` archive read whole (`common.pt`, `train_state.pt`, a byte object's payload):
/// its unpickled `data.pkl`, and the values of the small tensors in it.
pub struct TorchSave {
    bytes: Vec<u8>,
    entries: Vec<zip::Entry>,
    pub root: Value,
    what: String,
}

impl TorchSave {
    pub fn parse(bytes: Vec<u8>, what: &str) -> Result<TorchSave> {
        let bad = |e: String| PluginError::format(format!("{what}: {e}"));
        let entries = zip::entries(&bytes).map_err(bad)?;
        let pkl = zip::find(&bytes, &entries, "data.pkl").map_err(bad)?;
        let root = pickle::load(pkl, what).map_err(bad)?;
        Ok(TorchSave {
            bytes,
            entries,
            root,
            what: what.to_string(),
        })
    }

    pub fn read(path: &Path) -> Result<TorchSave> {
        let bytes = std::fs::read(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
        TorchSave::parse(bytes, &path.display().to_string())
    }

    /// The file (or item) it was read from, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The value of a one-element tensor `v` of this archive (the 0-d tensors of
    /// `train_state.pt`, a loss scale), its storage's CRC-32 checked.
    pub fn scalar(&self, v: &Value) -> Result<f64> {
        let bad = |e: String| PluginError::format(format!("{}: {e}", self.what));
        let t = tensor_in(&self.bytes, &self.entries, v, &mut |_| {}).map_err(bad)?;
        if elements(&t.size) != Some(1) {
            return Err(bad(format!(
                "a tensor of {:?} where one value was expected",
                t.size
            )));
        }
        let b = &self.bytes[t.data];
        let le = |n: usize| -> [u8; 8] {
            let mut a = [0u8; 8];
            a[..n].copy_from_slice(&b[..n]);
            a
        };
        Ok(match t.dtype {
            DType::F64 => f64::from_le_bytes(le(8)),
            DType::F32 => f32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as f64,
            DType::I64 => i64::from_le_bytes(le(8)) as f64,
            DType::I32 => i32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as f64,
            DType::BOOL | DType::U8 => b[0] as f64,
            other => return Err(bad(format!("a {other} scalar (not read)"))),
        })
    }
}

/// The byte object megatron-core ≥ 0.19 keeps the common state in (`torch.save([state])`).
const COMMON_STATE_ITEM: &str = "common_state/shard_0_1";

/// A checkpoint's common state (iteration, optimizer's parameter groups, scheduler, …) and the
/// archive it is in: `common.pt` where there is one (megatron-core ≤ 0.16's layout, which
/// bridgeflow writes), else the `common_state` byte object of the data files (0.19's).
pub fn read_common_state(dir: &Path, meta: &CheckpointMeta) -> Result<(TorchSave, Value)> {
    let legacy = dir.join("common.pt");
    if legacy.is_file() {
        let saved = TorchSave::read(&legacy)?;
        let root = saved.root.clone();
        return Ok((saved, root));
    }
    let Some(s) = meta.bytes.get(COMMON_STATE_ITEM) else {
        return Err(PluginError::format(format!(
            "{}: no common.pt and no '{COMMON_STATE_ITEM}' item: the checkpoint has no common state",
            dir.display()
        )));
    };
    let what = format!("{} item '{COMMON_STATE_ITEM}'", dir.join(&s.file).display());
    let saved = TorchSave::parse(ItemReader::new(dir).item(s)?, &what)?;
    let root = match saved.root.items().as_deref() {
        Some([state]) => state.clone(),
        _ => {
            return Err(PluginError::format(format!(
                "{what}: not a one-element list of the state"
            )))
        }
    };
    Ok((saved, root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcp;

    /// A `.metadata` for one [4, 2] f32 tensor with the given chunks (offsets, sizes), each
    /// item 100 bytes of `__0_0.distcp`.
    fn metadata(chunks: &[([u64; 2], [u64; 2])]) -> Vec<u8> {
        let chunks: Vec<dcp::Chunk> = chunks
            .iter()
            .enumerate()
            .map(|(i, (o, s))| dcp::Chunk {
                key: "w",
                dtype: DType::F32,
                global: &[4, 2],
                offsets: o,
                local: s,
                stored: dcp::Stored {
                    file: "__0_0.distcp".into(),
                    offset: i as u64 * 100,
                    len: 100,
                },
            })
            .collect();
        dcp::metadata_pickle(&chunks, &[])
    }

    #[test]
    fn data_files_must_be_their_items_end_to_end() {
        let items = |v: &[(u64, u64)]| -> Vec<Placement<'static>> {
            v.iter().map(|&(a, n)| ("f", a, n, "t")).collect()
        };
        assert_eq!(tiling_gap(&items(&[(0, 4), (4, 6)]), 10), None);
        let hole = tiling_gap(&items(&[(0, 4), (6, 4)]), 10).unwrap();
        assert!(
            hole.contains("bytes 4..6") && hole.contains("missing"),
            "{hole}"
        );
        let tail = tiling_gap(&items(&[(0, 4)]), 10).unwrap();
        assert!(tail.contains("bytes 4..10"), "{tail}");
        let over = tiling_gap(&items(&[(0, 4), (2, 4)]), 6).unwrap();
        assert!(over.contains("overlaps"), "{over}");
        let past = tiling_gap(&items(&[(0, 12)]), 10).unwrap();
        assert!(past.contains("truncated"), "{past}");
        assert!(tiling_gap(&items(&[(0, u64::MAX), (1, 1)]), 10).is_some());
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
        // The data file: one 100-byte item per chunk, end to end.
        std::fs::write(dir.join("__0_0.distcp"), vec![0u8; 200]).unwrap();
        let m = read_metadata(&dir).unwrap();
        assert_eq!(m.tensors["w"].chunks.len(), 2);
        std::fs::write(dir.join("__0_0.distcp"), vec![0u8; 300]).unwrap();
        let e = read_metadata(&dir).unwrap_err();
        assert!(
            e.message.contains("bytes 200..300 belong to no item"),
            "{e}"
        );
        std::fs::write(dir.join("__0_0.distcp"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.join(".metadata"), metadata(&[([0, 0], [2, 2])])).unwrap();
        let e = read_metadata(&dir).unwrap_err();
        assert!(
            e.message.contains("'w': chunks cover 4 of 8 elements"),
            "{e}"
        );
        std::fs::write(dir.join("__0_0.distcp"), vec![0u8; 200]).unwrap();
        std::fs::write(
            dir.join(".metadata"),
            metadata(&[([0, 0], [2, 2]), ([3, 0], [2, 2])]),
        )
        .unwrap();
        let e = read_metadata(&dir).unwrap_err();
        assert!(e.message.contains("lies outside"), "{e}");
        // Rows 1..3 twice, row 3 never: the element count alone would pass.
        std::fs::write(
            dir.join(".metadata"),
            metadata(&[([0, 0], [2, 2]), ([1, 0], [2, 2])]),
        )
        .unwrap();
        let e = read_metadata(&dir).unwrap_err();
        assert!(
            e.message
                .contains("'w': the chunks at [0, 0] of [2, 2] and at [1, 0] of [2, 2] overlap"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

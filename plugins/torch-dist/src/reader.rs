//! The reader: global tensors reassembled from whatever chunking a checkpoint has (one chunk,
//! per layer, per TP rank, per SwiGLU half), streamed one tensor — or, with `split_layers`, one
//! layer of a stacked tensor — at a time. A tensor stored as one contiguous chunk is handed out
//! as a view of the memory map, without a copy.

use crate::checkpoint::{
    copy_block, read_metadata, resolve_dir, tensor_item, CheckpointMeta, Chunk, TensorMeta,
};
use bridgeflow_megatron::names;
use bridgeflow_sdk::{
    schemars, serde, Buffer, BufferPool, Emitter, InputMap, MapView, PluginError, Result, Source,
    StreamPlan, Tensor, TensorInfo,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct ReaderConfig {
    /// A checkpoint root (with `latest_checkpointed_iteration.txt`) or an iteration folder
    /// (with `.metadata`).
    pub path: PathBuf,
    /// Emit stacked `[<module>.]decoder.layers.<param>` tensors one layer at a time, as
    /// `decoder.layers.<l>.<param>` (bounded memory, and the per-layer view mappers work on).
    #[serde(default)]
    pub split_layers: bool,
    /// Check every chunk against the `bridgeflow-manifest.json` written beside `.metadata`
    /// (blake3); a missing manifest is an error.
    #[serde(default)]
    pub verify: bool,
    /// Hand a tensor (or layer) stored as several blocks of whole rows — SwiGLU halves, q/k/v
    /// group blocks, TP shards of column-parallel weights — out as those blocks, each a view
    /// of the map named `<name>#<row>` with a shard descriptor over the whole, instead of
    /// assembling it: nothing is copied. The consumer must take pieces (the models mapper and
    /// both writers do).
    #[serde(default)]
    pub row_pieces: bool,
}

struct Planned {
    /// What is emitted (its shape drops the layer axis of a split stacked tensor).
    info: TensorInfo,
    key: String,
    /// Region of the global tensor: offsets and sizes (with the layer axis).
    offsets: Vec<u64>,
    sizes: Vec<u64>,
}

pub struct TorchDistReader {
    cfg: ReaderConfig,
    dir: PathBuf,
    meta: CheckpointMeta,
    planned: Vec<Planned>,
    maps: HashMap<String, Arc<InputMap>>,
    pool: BufferPool,
    manifest: Option<bridgeflow_sdk::manifest::Manifest>,
}

/// Items above this size are not kept resident between their CRC check and their use.
const LARGE_ITEM: usize = 32 << 20;

fn is_stacked(key: &str, t: &TensorMeta) -> bool {
    names::is_stacked(key) && !t.size.is_empty()
}

/// A piece's offset in its tensor of `rank` axes when it starts at `row` and spans every other
/// axis whole.
fn at_row(row: u64, rank: usize) -> Vec<u64> {
    let mut at = vec![0; rank];
    at[0] = row;
    at
}

/// Where the region's rows along axis `axis` (from `start`, `len` of them) are cut by the blocks:
/// 0, every block edge inside, `len`; sorted, each once.
fn slab_bounds(blocks: &[&Chunk], axis: usize, start: u64, len: u64) -> Vec<u64> {
    let mut cuts = vec![0, len];
    for c in blocks {
        for edge in [c.offsets[axis], c.offsets[axis] + c.sizes[axis]] {
            if edge > start && edge < start + len {
                cuts.push(edge - start);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// The blocks of a region when each lies inside it and is one run of its elements (an
/// expert's gate or up half of a layer's experts), with each block's offsets within the region
/// (without the dropped axes before `skip`), in element order; None when any is not.
fn contiguous_blocks(
    blocks: &[&Chunk],
    offsets: &[u64],
    sizes: &[u64],
    skip: usize,
) -> Option<Vec<(Chunk, Vec<u64>)>> {
    let shape = &sizes[skip..];
    let mut out = Vec::with_capacity(blocks.len());
    let mut covered = 0u64;
    for c in blocks {
        let inside = (0..sizes.len()).all(|d| {
            c.offsets[d] >= offsets[d] && c.offsets[d] + c.sizes[d] <= offsets[d] + sizes[d]
        });
        if !inside || c.sizes[..skip].iter().any(|&n| n != 1) {
            return None;
        }
        let at: Vec<u64> = (skip..sizes.len())
            .map(|d| c.offsets[d] - offsets[d])
            .collect();
        let start = bridgeflow_sdk::tensor::contiguous_offset(shape, &at, &c.sizes[skip..])?;
        covered += c.sizes.iter().product::<u64>();
        out.push((start, (*c).clone(), at));
    }
    // Blocks that overlap or leave a gap are the metadata's error, named where it is read.
    if covered != shape.iter().product::<u64>() {
        return None;
    }
    out.sort_by_key(|(start, _, _)| *start);
    Some(out.into_iter().map(|(_, c, at)| (c, at)).collect())
}

impl TorchDistReader {
    /// Plans one region (a whole tensor, or one layer of a stacked one): as itself, or with
    /// `row_pieces` as the stored blocks of whole rows it is made of (or, when a large region's
    /// blocks are cut along other axes too, as slabs of whole rows between the blocks' edges).
    #[allow(clippy::too_many_arguments)]
    fn plan_region(
        &mut self,
        infos: &mut Vec<TensorInfo>,
        key: &str,
        t: &TensorMeta,
        name: String,
        offsets: Vec<u64>,
        sizes: Vec<u64>,
        drop_first: bool,
    ) {
        let skip = drop_first as usize;
        let shape = &sizes[skip..];
        let blocks: Vec<&Chunk> = t
            .chunks
            .iter()
            .filter(|c| {
                (0..sizes.len()).all(|d| {
                    c.offsets[d] < offsets[d] + sizes[d] && offsets[d] < c.offsets[d] + c.sizes[d]
                })
            })
            .collect();
        // Blocks of rows: every axis but the region's first spans the region exactly.
        let rows_only = blocks.len() > 1
            && !shape.is_empty()
            && blocks.iter().all(|c| {
                (0..sizes.len())
                    .filter(|&d| d != skip)
                    .all(|d| c.offsets[d] == offsets[d] && c.sizes[d] == sizes[d])
            });
        let bytes = sizes.iter().product::<u64>() * t.dtype.size() as u64;
        if self.cfg.row_pieces && !rows_only && !shape.is_empty() && bytes > LARGE_ITEM as u64 {
            // Blocks split along other axes too (an expert's gate and up halves). A large
            // region is never assembled whole (1.75 GiB of DeepSeek-V3 experts would be
            // resident): blocks that are each one run of the region's elements go as views,
            // as stored; otherwise slabs of whole rows, each assembled from the blocks it cuts.
            if let Some(pieces) = contiguous_blocks(&blocks, &offsets, &sizes, skip) {
                for (c, at) in pieces {
                    let id: Vec<String> = at.iter().map(u64::to_string).collect();
                    let info = TensorInfo::new(
                        format!("{name}#{}", id.join(".")),
                        t.dtype,
                        &c.sizes[skip..],
                    )
                    .with_shard(shape, &at);
                    self.plan_piece(infos, key, info, c.offsets, c.sizes);
                }
                return;
            }
            let slabs = slab_bounds(&blocks, skip, offsets[skip], sizes[skip]);
            if slabs.len() > 2 {
                for w in slabs.windows(2) {
                    let (row, n) = (w[0], w[1] - w[0]);
                    let mut local = shape.to_vec();
                    local[0] = n;
                    let info = TensorInfo::new(format!("{name}#{row}"), t.dtype, &local)
                        .with_shard(shape, &at_row(row, shape.len()));
                    let (mut o, mut z) = (offsets.clone(), sizes.clone());
                    o[skip] += row;
                    z[skip] = n;
                    self.plan_piece(infos, key, info, o, z);
                }
                return;
            }
        }
        if !(self.cfg.row_pieces && rows_only) {
            let info = TensorInfo::new(name, t.dtype, shape);
            self.plan_piece(infos, key, info, offsets, sizes);
            return;
        }
        let mut blocks: Vec<Chunk> = blocks.into_iter().cloned().collect();
        blocks.sort_by_key(|c| c.offsets[skip]);
        for c in blocks {
            let row = c.offsets[skip] - offsets[skip];
            let info = TensorInfo::new(format!("{name}#{row}"), t.dtype, &c.sizes[skip..])
                .with_shard(shape, &at_row(row, shape.len()));
            self.plan_piece(infos, key, info, c.offsets, c.sizes);
        }
    }

    /// Lists `info` and plans its read: the stored `key`'s elements at `offsets`/`sizes`.
    fn plan_piece(
        &mut self,
        infos: &mut Vec<TensorInfo>,
        key: &str,
        info: TensorInfo,
        offsets: Vec<u64>,
        sizes: Vec<u64>,
    ) {
        infos.push(info.clone());
        self.planned.push(Planned {
            info,
            key: key.to_string(),
            offsets,
            sizes,
        });
    }

    /// The data file's map, checked to be the file first mapped (a truncated or changed file
    /// is named, see bridgeflow_sdk::inputs).
    fn map(&mut self, file: &str) -> Result<Arc<InputMap>> {
        if let Some(m) = self.maps.get(file) {
            m.check()?;
            return Ok(m.clone());
        }
        let m = Arc::new(InputMap::open(self.dir.join(file))?);
        self.maps.insert(file.to_string(), m.clone());
        Ok(m)
    }

    /// The chunk's elements: (its map, the byte range in it).
    fn chunk_data(
        &mut self,
        key: &str,
        c: &Chunk,
        t: &TensorMeta,
    ) -> Result<(Arc<InputMap>, std::ops::Range<usize>)> {
        let map = self.map(&c.storage.file)?;
        let (a, b) = (
            c.storage.offset as usize,
            (c.storage.offset + c.storage.length) as usize,
        );
        let path = self.dir.join(&c.storage.file);
        let item = map.get(a..b).ok_or_else(|| {
            PluginError::format(format!(
                "{}: tensor '{key}': item at bytes {a}..{b} is past the end of the file ({} bytes): truncated",
                path.display(),
                map.len()
            ))
        })?;
        // The CRC check reads every page of the item. A small item stays resident for its
        // consumer (its bytes count against the budget from now on); a large one would be
        // resident whole, beyond what the budget allows, so each window goes once checked and
        // the consumer brings the pages back a piece at a time.
        let large = b - a > LARGE_ITEM;
        let base = map.as_ptr() as usize;
        let mut read = |w: &[u8]| {
            if large {
                let at = w.as_ptr() as usize - base;
                map.release_pages(at..at + w.len(), true);
            }
        };
        let it = tensor_item(item, &mut read).map_err(|e| {
            // Zeros read from a map truncated meanwhile fail the CRC: name the truncation.
            map.explain(PluginError::format(format!(
                "{}: tensor '{key}' chunk at {:?}: {e}",
                path.display(),
                c.offsets
            )))
        })?;
        if it.dtype != t.dtype || it.size != c.sizes {
            return Err(PluginError::shape(format!(
                "{}: tensor '{key}' chunk at {:?} holds {} {:?}; the metadata says {} {:?}",
                path.display(),
                c.offsets,
                it.dtype,
                it.size,
                t.dtype,
                c.sizes
            )));
        }
        let range = a + it.data.start..a + it.data.end;
        if let Some(m) = &self.manifest {
            let info = TensorInfo::new(
                crate::writer::chunk_name(key, &c.offsets),
                t.dtype,
                &c.sizes,
            );
            m.check(&info, &map[range.clone()]).map_err(|e| {
                map.explain(PluginError::mismatch(format!(
                    "{}: {e}",
                    self.dir.display()
                )))
            })?;
            if large {
                map.release_pages(range.clone(), true);
            }
        }
        map.check()?;
        Ok((map, range))
    }
}

impl Source for TorchDistReader {
    type Config = ReaderConfig;
    const DESCRIPTION: &'static str =
        "Reads Megatron-Core torch_dist checkpoints: global tensors from any chunking, zero-copy where stored whole";
    // Layers one at a time, stored blocks as views: nothing assembled that need not be.
    const ENDPOINTS: &'static [bridgeflow_sdk::Endpoint] = &[bridgeflow_sdk::Endpoint {
        aliases: &["mcore"],
        config: r#"{"split_layers": true, "row_pieces": true}"#,
        ..bridgeflow_sdk::Endpoint::new(
            "megatron",
            "megatron",
            "a Megatron-Core torch_dist checkpoint",
        )
    }];

    fn new(cfg: ReaderConfig) -> Result<Self> {
        Ok(TorchDistReader {
            cfg,
            dir: PathBuf::new(),
            meta: CheckpointMeta::default(),
            planned: Vec::new(),
            maps: HashMap::new(),
            // Idle allocations kept for reuse (bounded: they are outside the budget's count).
            pool: BufferPool::new(16 << 20),
            manifest: None,
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        self.dir = resolve_dir(&self.cfg.path)?;
        self.meta = read_metadata(&self.dir)?;
        let meta = std::mem::take(&mut self.meta);
        if self.cfg.verify {
            let m = self.dir.join(bridgeflow_sdk::manifest::MANIFEST_FILE);
            self.manifest = Some(bridgeflow_sdk::manifest::Manifest::load(&m)?);
        }
        let mut infos = Vec::new();
        self.planned.clear();
        for (key, t) in &meta.tensors {
            if self.cfg.split_layers && is_stacked(key, t) {
                let (stack, rest) = names::decoder_layers(key).expect("stacked");
                for l in 0..t.size[0] {
                    let name = names::unstacked_key(stack, l, rest);
                    let mut sizes = t.size.clone();
                    sizes[0] = 1;
                    let mut offsets = vec![0; t.size.len()];
                    offsets[0] = l;
                    self.plan_region(&mut infos, key, t, name, offsets, sizes, true);
                }
            } else {
                let (offsets, sizes) = (vec![0; t.size.len()], t.size.clone());
                self.plan_region(&mut infos, key, t, key.clone(), offsets, sizes, false);
            }
        }
        self.meta = meta;
        let mut plan = StreamPlan::new(infos);
        plan.set(bridgeflow_sdk::attrs::FORMAT, "torch_dist");
        plan.set(bridgeflow_sdk::attrs::CHECKPOINT_DIR, self.dir.clone());
        plan.set(
            bridgeflow_sdk::attrs::BYTE_OBJECTS,
            self.meta.bytes.keys().cloned().collect::<Vec<_>>(),
        );
        // How each tensor is stored: its chunks and the data file of each (for `inspect`, and
        // for checking a layout against megatron-core's).
        let chunks: serde_json::Map<String, serde_json::Value> = self
            .meta
            .tensors
            .iter()
            .map(|(k, t)| {
                let list: Vec<serde_json::Value> = t
                    .chunks
                    .iter()
                    .map(|c| serde_json::json!({"offsets": c.offsets, "sizes": c.sizes, "file": c.storage.file}))
                    .collect();
                (k.clone(), serde_json::Value::Array(list))
            })
            .collect();
        plan.set(bridgeflow_sdk::attrs::CHUNKS, chunks);
        let tok = self.dir.join("tokenizer");
        if tok.is_dir() {
            plan.set(bridgeflow_sdk::attrs::SOURCE_DIR, tok);
        }
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        let planned = std::mem::take(&mut self.planned);
        for p in planned {
            let t = self.meta.tensors[&p.key].clone();
            let es = t.dtype.size();
            let info = p.info;
            let whole = p.sizes == t.size;
            // A region stored as exactly one chunk (a whole tensor, or one layer of a stacked
            // one) is a view of the map: no copy.
            let single = if whole && t.chunks.len() == 1 {
                Some(t.chunks[0].clone())
            } else {
                t.chunks
                    .iter()
                    .find(|c| c.offsets == p.offsets && c.sizes == p.sizes)
                    .cloned()
            };
            let buffer = if let Some(c) = single {
                let (map, range) = self.chunk_data(&p.key, &c, &t)?;
                Buffer::from_owner(MapView { map, range })
            } else {
                let numel: u64 = p.sizes.iter().product();
                let mut buf = self.pool.take(numel as usize * es);
                for c in &t.chunks {
                    let overlaps = (0..p.sizes.len()).all(|d| {
                        c.offsets[d] < p.offsets[d] + p.sizes[d]
                            && p.offsets[d] < c.offsets[d] + c.sizes[d]
                    });
                    if !overlaps {
                        continue;
                    }
                    let (map, range) = self.chunk_data(&p.key, c, &t)?;
                    copy_block(
                        &map[range.clone()],
                        c,
                        &p.offsets,
                        &p.sizes,
                        es,
                        buf.as_mut_slice(),
                    );
                    map.check()?;
                    map.release_pages(range, true);
                }
                buf.freeze()
            };
            out.tensor(Tensor::new(info, buffer)?)?;
        }
        self.maps.clear();
        Ok(())
    }

    fn summary(&mut self) -> String {
        format!(
            "{} tensors, {} byte objects from {}",
            self.meta.tensors.len(),
            self.meta.bytes.len(),
            self.dir.display()
        )
    }

    fn probe(path: &Path) -> u32 {
        (path.join(".metadata").is_file() || path.join(names::LATEST_ITERATION).is_file()) as u32
            * 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Storage;
    use bridgeflow_sdk::DType;

    fn reader() -> TorchDistReader {
        TorchDistReader::new(ReaderConfig {
            path: PathBuf::new(),
            split_layers: false,
            verify: false,
            row_pieces: true,
        })
        .unwrap()
    }

    fn chunk(offsets: [u64; 3], sizes: [u64; 3]) -> Chunk {
        Chunk {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
            storage: Storage {
                file: "__0_0.distcp".into(),
                offset: 0,
                length: 0,
            },
        }
    }

    /// Experts stored as each expert's gate and up halves (blocks cut along the second axis): a
    /// large tensor goes as those halves, each a view as stored; blocks that are not one run of
    /// elements (TP halves of columns) as one slab of whole rows per expert; a small one whole.
    #[test]
    fn large_blocks_cut_along_other_axes_go_as_views_or_slabs_of_rows() {
        let key = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight";
        let meta = |e: u64, f: u64, h: u64| TensorMeta {
            dtype: DType::BF16,
            size: vec![e, 2 * f, h],
            chunks: (0..e)
                .flat_map(|i| [chunk([i, 0, 0], [1, f, h]), chunk([i, f, 0], [1, f, h])])
                .collect(),
        };
        let plan = |t: &TensorMeta| {
            let mut r = reader();
            let mut infos = Vec::new();
            r.plan_region(
                &mut infos,
                key,
                t,
                key.into(),
                vec![0; 3],
                t.size.clone(),
                false,
            );
            (infos, r.planned)
        };
        // 4 experts of 2 x [2048, 2048] bf16: 64 MiB.
        let t = meta(4, 2048, 2048);
        let (infos, planned) = plan(&t);
        assert_eq!(infos.len(), 8);
        for (i, (info, p)) in infos.iter().zip(&planned).enumerate() {
            let (e, row) = (i as u64 / 2, i as u64 % 2 * 2048);
            assert_eq!(info.name(), format!("{key}#{e}.{row}.0"));
            assert_eq!(info.shape.as_slice(), &[1, 2048, 2048]);
            let s = info.shard().unwrap();
            assert_eq!(s.global_shape.as_slice(), &[4, 4096, 2048]);
            assert_eq!(s.offsets.as_slice(), &[e, row, 0]);
            assert_eq!(
                (p.offsets.as_slice(), p.sizes.as_slice()),
                (&[e, row, 0][..], &[1, 2048, 2048][..])
            );
        }
        // Each half split again by columns (TP 2 of a row-parallel layout): slabs of rows.
        let mut t = meta(4, 2048, 2048);
        t.chunks = t
            .chunks
            .iter()
            .flat_map(|c| {
                let (o, z) = (&c.offsets, &c.sizes);
                [0, 1024].map(|col| chunk([o[0], o[1], col], [z[0], z[1], 1024]))
            })
            .collect();
        let (infos, planned) = plan(&t);
        assert_eq!(infos.len(), 4);
        for (e, (info, p)) in infos.iter().zip(&planned).enumerate() {
            let e = e as u64;
            assert_eq!(info.name(), format!("{key}#{e}"));
            assert_eq!(info.shard().unwrap().offsets.as_slice(), &[e, 0, 0]);
            assert_eq!(
                (p.offsets.as_slice(), p.sizes.as_slice()),
                (&[e, 0, 0][..], &[1, 4096, 2048][..])
            );
        }
        // Small: whole, as before.
        let (infos, _) = plan(&meta(4, 16, 8));
        assert_eq!(infos.len(), 1);
        assert!(infos[0].shard().is_none());
    }
}

//! The index of a torch_dist checkpoint, `.metadata`: PyTorch DCP's `Metadata` pickled as
//! torch writes it — each tensor key's dtype, global size and chunks, each byte object, and
//! where every item lies (data file, offset, length). Shared by the torch_dist writer and the
//! trainer's checkpoints, which lay out their items themselves.

use crate::emit::{either::Arg, Pickler};
use bridgeflow_sdk::DType;
use std::collections::BTreeMap;

const M: &str = "torch.distributed.checkpoint.metadata";

/// Where one item (a `torch.save` archive) lies: its data file, offset and length.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub file: String,
    pub offset: u64,
    pub len: u64,
}

/// One chunk of a tensor key: `local` elements at `offsets` of the `global` tensor.
#[derive(Debug, Clone)]
pub struct Chunk<'a> {
    pub key: &'a str,
    pub dtype: DType,
    pub global: &'a [u64],
    pub offsets: &'a [u64],
    pub local: &'a [u64],
    pub stored: Stored,
}

/// `.metadata`'s bytes: the tensor keys sorted, byte objects after them; `storage_data` with
/// the byte objects first, then the chunks in the order given (the order megatron-core's
/// planner writes them in).
pub fn metadata_pickle(chunks: &[Chunk], bytes: &[(&str, Stored)]) -> Vec<u8> {
    let mut p = Pickler::new();
    p.newobj(M, "Metadata");
    p.dict_begin();
    p.str("state_dict_metadata");
    p.dict_begin();
    let mut by_key: BTreeMap<&str, Vec<&Chunk>> = BTreeMap::new();
    for c in chunks {
        by_key.entry(c.key).or_default().push(c);
    }
    for (key, chunks) in &by_key {
        p.str(key);
        tensor_storage_metadata(&mut p, chunks);
    }
    for (key, _) in bytes {
        p.str(key);
        p.newobj(M, "BytesStorageMetadata");
    }
    p.dict_end();
    p.str("planner_data");
    p.none();
    p.str("storage_data");
    p.dict_begin();
    for (key, s) in bytes {
        storage_info(&mut p, (key, None), s);
    }
    for c in chunks {
        storage_info(&mut p, (c.key, Some(c.offsets)), &c.stored);
    }
    p.dict_end();
    p.str("version");
    p.str("1.0.0");
    p.dict_end();
    p.build();
    p.finish()
}

/// What a tensor chunk's archive derives its serialization id from (torch writes a random one;
/// ours is reproducible): the key and the chunk's offsets.
pub fn archive_seed(key: &str, offsets: &[u64]) -> String {
    format!("{key}{offsets:?}")
}

/// `metadata.json`, as megatron-core 0.16 and 0.19 write it for torch_dist.
pub const METADATA_JSON: &[u8] = br#"{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#;

/// DCP's `TensorStorageMetadata` of one key: its properties (dtype, strided), global size and
/// its chunks.
fn tensor_storage_metadata(p: &mut Pickler, chunks: &[&Chunk]) {
    let first = chunks[0];
    p.newobj(M, "TensorStorageMetadata");
    p.dict_begin();
    p.str("properties");
    p.newobj(M, "TensorProperties");
    p.mark();
    p.global("torch", first.dtype.torch_name());
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
    p.torch_size(first.global);
    p.str("chunks");
    p.empty_list();
    p.mark();
    for c in chunks {
        p.newobj(M, "ChunkStorageMetadata");
        p.dict_begin();
        p.str("offsets");
        p.torch_size(c.offsets);
        p.str("sizes");
        p.torch_size(c.local);
        p.dict_end();
        p.build();
    }
    p.op(b'e');
    p.dict_end();
    p.build();
}

/// One `storage_data` pair: the item's `MetadataIndex` (fqn, chunk offsets or None for a byte
/// object) and its `_StorageInfo` (data file, offset, length).
fn storage_info(p: &mut Pickler, (fqn, offsets): (&str, Option<&[u64]>), s: &Stored) {
    p.newobj(M, "MetadataIndex");
    p.dict_begin();
    p.str("fqn");
    p.str(fqn);
    p.str("offset");
    match offsets {
        Some(o) => p.torch_size(o),
        None => p.none(),
    }
    p.str("index");
    p.none();
    p.dict_end();
    p.build();
    p.newobj("torch.distributed.checkpoint.filesystem", "_StorageInfo");
    p.dict_begin();
    p.str("relative_path");
    p.str(&s.file);
    p.str("offset");
    p.int(s.offset as i64);
    p.str("length");
    p.int(s.len as i64);
    p.dict_end();
    p.build();
}

//! The fuzz targets: each calls a real parser of untrusted input on bytes (through the files a
//! user would hand it, where the parser reads files) and returns `Ok` when the input is
//! accepted, `Err` when it is refused. A panic, a hang or a refused allocation is a finding.
//! Where an accepted value is handed on (a range sliced, a value walked), the target does what
//! the plugin's next step does, so a wrong "accepted" shows as a panic too.
//!
//! Seeds come from `tests/fixtures` (small files, or small representative parts of them), from
//! the plugins' own writers, and from `fuzz/corpus/<target>/` (regression inputs).

use crate::mutate::{byte_mutation, pickle_mutation, text_mutation, Kind, Rng};
use bridgeflow_sdk::{Emitter, Source};
use std::path::{Path, PathBuf};

/// The workspace root (seeds are read from its fixtures).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ sits in the workspace")
        .to_path_buf()
}

/// A parser's verdict on one input.
pub type Verdict = Result<(), String>;
/// One target's call, with whatever context (a temp folder) it keeps between calls.
pub type Call = Box<dyn FnMut(&[u8]) -> Verdict>;
/// A structure-aware mutation: a new input from the pool, or None to fall back.
pub type Custom = fn(&mut Rng, &[Vec<u8>]) -> Option<Vec<u8>>;

pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    pub kind: Kind,
    /// Inputs are capped at this length.
    pub max_len: usize,
    pub seeds: fn() -> Vec<Vec<u8>>,
    pub make: fn() -> Call,
    /// A structure-aware mutation drawn for half the inputs (None: the generic ones only).
    pub custom: Option<Custom>,
}

pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "safetensors",
            about: "safetensors header: bridgeflow_plugin_safetensors::header::parse, every tensor's range sliced",
            kind: Kind::Text,
            max_len: 1 << 20,
            seeds: safetensors_seeds,
            make: safetensors_call,
            custom: Some(safetensors_aware),
        },
        Target {
            name: "pickle",
            about: "restricted unpickler: torch_dist::pickle::load, the value walked (class, fields, items)",
            kind: Kind::Pickle,
            max_len: 1 << 20,
            seeds: pickle_seeds,
            make: pickle_call,
            custom: None,
        },
        Target {
            name: "dcp-metadata",
            about: "torch_dist .metadata: checkpoint::read_metadata on a folder with the fixture's __0_0.distcp, then TorchDistReader plan + run",
            kind: Kind::Pickle,
            max_len: 1 << 20,
            seeds: metadata_seeds,
            make: metadata_call,
            custom: None,
        },
        Target {
            name: "torch-item",
            about: "torch.save zip items: zip::entries, zip::find (CRC) of every record, checkpoint::tensor_item, the payload sliced",
            kind: Kind::Binary,
            max_len: 1 << 20,
            seeds: item_seeds,
            make: item_call,
            custom: Some(zip_aware),
        },
        Target {
            name: "megatron-lm",
            about: "Megatron-LM mp_rank_00/model_optim_rng.pt (pickle in a zip) and its args: LegacyReader plan + run, whole checkpoint and rank mode",
            kind: Kind::Binary,
            max_len: 1 << 20,
            seeds: legacy_seeds,
            make: legacy_call,
            custom: Some(zip_aware),
        },
        Target {
            name: "indexed-idx",
            about: "Megatron .idx header: megatron_indexed::format::Index::parse, every entry read, then IndexedReader plan + run on a matching .bin",
            kind: Kind::Binary,
            max_len: 1 << 20,
            seeds: idx_seeds,
            make: idx_call,
            custom: Some(idx_aware),
        },
        Target {
            name: "run-config-yaml",
            about: "run_config.yaml: models::megatron_config::hf_config_from_run_config (read_yaml, alias/depth bounds, the model section)",
            kind: Kind::Text,
            max_len: 1 << 20,
            seeds: yaml_seeds,
            make: yaml_call,
            custom: None,
        },
        Target {
            name: "jsonl",
            about: "JSON Lines: jsonl::lines::UniversalLines, pyjson::parse_document and document_sentences of every line",
            kind: Kind::Text,
            max_len: 1 << 20,
            seeds: jsonl_seeds,
            make: jsonl_call,
            custom: None,
        },
        Target {
            name: "pipeline-toml",
            about: "pipeline TOML: bridgeflow_core::pipeline::parse (variables, overrides) and graph::build validation (no plugins, no run)",
            kind: Kind::Text,
            max_len: 1 << 20,
            seeds: pipeline_seeds,
            make: pipeline_call,
            custom: None,
        },
    ]
}

pub fn find(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// Regression inputs kept in `fuzz/corpus/<target>/`.
pub fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn fixture(rel: &str) -> Option<Vec<u8>> {
    std::fs::read(root().join(rel)).ok()
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bridgeflow-fuzz-")
        .tempdir()
        .expect("a temp folder")
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Drives a source the way the runtime does: plan, then run with every item dropped.
fn plan_and_run<S: Source>(config: serde_json::Value, run: bool) -> Verdict {
    let cfg: S::Config = serde_json::from_value(config).map_err(err)?;
    let mut s = S::new(cfg).map_err(err)?;
    s.plan().map_err(err)?;
    if run {
        let mut sink = |_item: bridgeflow_sdk::Item| -> bridgeflow_sdk::Result<()> { Ok(()) };
        Emitter::scoped(&mut sink, None, |em| s.run(em)).map_err(err)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------ safetensors

/// A small representative part of a safetensors file: its `__metadata__` and the small
/// tensors (at most 16 KiB each, `limit` bytes in all) with their names, dtypes, shapes and
/// bytes, laid out again end to end.
pub fn shrink_safetensors(bytes: &[u8], limit: u64) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(bytes.get(8..8 + n)?).ok()?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    let data = bytes.get(8 + n..)?;
    let mut tensors: Vec<(u64, u64, String, serde_json::Value)> = map
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, v)| {
            let s = v["data_offsets"][0].as_u64()?;
            let e = v["data_offsets"][1].as_u64()?;
            Some((s, e, k.clone(), v.clone()))
        })
        .collect();
    tensors.sort_by_key(|t| (t.0, t.1));
    let mut kept = serde_json::Map::new();
    if let Some(m) = map.get("__metadata__") {
        kept.insert("__metadata__".into(), m.clone());
    }
    let mut body = Vec::new();
    for (s, e, k, mut v) in tensors {
        let len = e.checked_sub(s)?;
        if len > 16 << 10 || body.len() as u64 + len > limit {
            continue;
        }
        let at = body.len() as u64;
        body.extend_from_slice(data.get(s as usize..e as usize)?);
        v["data_offsets"] = serde_json::json!([at, at + len]);
        kept.insert(k, v);
    }
    let mut header = serde_json::to_string(&kept).ok()?;
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let mut seeds = Vec::new();
    for f in [
        "tests/fixtures/hf/gemma/model.safetensors",
        "tests/fixtures/hf/qwen3/model.safetensors",
        "tests/fixtures/fp8/model.safetensors",
        "tests/fixtures/bridge/gpt_oss/flat_tensors.safetensors",
    ] {
        if let Some(s) = fixture(f).and_then(|b| shrink_safetensors(&b, 32 << 10)) {
            seeds.push(s);
        }
    }
    seeds.extend(fixture(
        "tests/fixtures/hf/gemma/reference/logits.safetensors",
    ));
    // Written by the safetensors crate: several dtypes, a scalar, an empty tensor, metadata.
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let bf16 = vec![0x3fu8, 0x80, 0x40, 0x00, 0xc0, 0x00, 0x00, 0x00];
    let i64s = 7i64.to_le_bytes();
    let views = vec![
        (
            "a.weight",
            TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap(),
        ),
        (
            "b.bias",
            TensorView::new(Dtype::BF16, vec![4], &bf16).unwrap(),
        ),
        (
            "c.step",
            TensorView::new(Dtype::I64, vec![], &i64s).unwrap(),
        ),
        (
            "d.empty",
            TensorView::new(Dtype::U8, vec![0, 3], &[]).unwrap(),
        ),
    ];
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    seeds.push(safetensors::serialize(views, Some(meta)).unwrap());
    seeds
}

/// A mutation of a safetensors header's JSON only (text-aware: offsets, shapes, dtypes, keys),
/// its length prefix made right again and the data kept: the header check is passed and what
/// the header says is tested against the data, instead of stopping at the length check.
pub fn safetensors_aware(rng: &mut Rng, pool: &[Vec<u8>]) -> Option<Vec<u8>> {
    let base = &pool[rng.below(pool.len())];
    let n = u64::from_le_bytes(base.get(..8)?.try_into().ok()?) as usize;
    let mut header = base.get(8..8usize.checked_add(n)?)?.to_vec();
    let data = &base[8 + n..];
    for _ in 0..1 + rng.below(3) {
        if rng.chance(4) {
            let same = [header.clone()];
            byte_mutation(rng, &mut header, &same);
        } else {
            text_mutation(rng, &mut header);
        }
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    Some(out)
}

fn safetensors_call() -> Call {
    let path = PathBuf::from("fuzz.safetensors");
    Box::new(move |b| {
        let h = bridgeflow_plugin_safetensors::header::parse(&path, b).map_err(err)?;
        // The reader serves each tensor as a view of the map at its range.
        let mut sum = 0u64;
        for e in &h.entries {
            let d = &b[e.range.clone()];
            sum = sum.wrapping_add(d.first().copied().unwrap_or(0) as u64);
            let _ = e.info.dtype;
        }
        std::hint::black_box(sum);
        Ok(())
    })
}

// ------------------------------------------------------------------------------ pickles

use bridgeflow_plugin_torch_dist::emit::{self, Archive, Pickler};
use bridgeflow_plugin_torch_dist::{checkpoint, pickle, zip};
use bridgeflow_sdk::DType;

/// Walks an unpickled value as the readers do (class, fields, items, dict entries), at most
/// `budget` nodes, iteratively.
fn walk(v: &pickle::Value, budget: usize) -> usize {
    let mut work = vec![v.clone()];
    let mut n = 0;
    while let Some(v) = work.pop() {
        n += 1;
        if n > budget {
            break;
        }
        let _ = (v.class(), v.as_str(), v.as_int(), v.field("fqn"));
        if let Some(items) = v.items() {
            work.extend(items);
        }
        if let Some(d) = v.dict_entries() {
            for (k, x) in d {
                work.push(k);
                work.push(x);
            }
        }
        match &v {
            pickle::Value::Object(o) => {
                let o = o.borrow();
                work.extend(o.args.iter().cloned());
                work.extend(o.state.clone());
            }
            pickle::Value::Persistent(p) => work.push((**p).clone()),
            _ => {}
        }
    }
    n
}

/// The `data.pkl` of every record set of a zip archive's bytes.
fn pickles_of(archive: &[u8]) -> Vec<Vec<u8>> {
    zip::entries(archive)
        .ok()
        .and_then(|e| zip::find(archive, &e, "data.pkl").ok().map(<[u8]>::to_vec))
        .into_iter()
        .collect()
}

/// (`.metadata`, its folder) of a torch_dist fixture: a bridge one by name
/// (`tests/fixtures/bridge/<name>/iter_0000000`), or a folder under `tests/fixtures`.
fn dcp_fixture(name: &str) -> Option<(Vec<u8>, PathBuf)> {
    let dir = if name.contains('/') {
        root().join("tests/fixtures").join(name)
    } else {
        root()
            .join("tests/fixtures/bridge")
            .join(name)
            .join("iter_0000000")
    };
    Some((std::fs::read(dir.join(".metadata")).ok()?, dir))
}

/// A few items of a fixture's `__0_0.distcp`: each a whole `torch.save` archive, the smallest
/// tensors and a byte object.
fn dcp_items(name: &str, count: usize) -> Vec<Vec<u8>> {
    let Some((_, dir)) = dcp_fixture(name) else {
        return Vec::new();
    };
    let (Ok(meta), Ok(data)) = (
        checkpoint::read_metadata(&dir),
        std::fs::read(dir.join("__0_0.distcp")),
    ) else {
        return Vec::new();
    };
    let mut storages: Vec<checkpoint::Storage> = meta
        .tensors
        .values()
        .flat_map(|t| t.chunks.iter().map(|c| c.storage.clone()))
        .collect();
    storages.sort_by_key(|s| (s.length, s.offset));
    storages.dedup_by_key(|s| s.offset);
    let mut out: Vec<Vec<u8>> = storages
        .iter()
        .filter(|s| s.length <= 64 << 10)
        .step_by((storages.len() / count).max(1))
        .take(count)
        .filter_map(|s| data.get(s.offset as usize..(s.offset + s.length) as usize))
        .map(<[u8]>::to_vec)
        .collect();
    out.extend(
        meta.bytes
            .values()
            .take(1)
            .filter_map(|s| data.get(s.offset as usize..(s.offset + s.length) as usize))
            .map(<[u8]>::to_vec),
    );
    out
}

/// A whole `torch.save` archive of one bf16 tensor, as the writer frames it.
fn tensor_archive(shape: &[u64]) -> Vec<u8> {
    let n: u64 = shape.iter().product::<u64>() * 2;
    let payload: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
    archive(
        "archive",
        emit::tensor_pickle(DType::BF16, shape),
        &[payload],
        "fuzz-item",
    )
}

/// An archive with `payloads` as `data/0..`, framed with their CRCs.
fn archive(prefix: &str, pkl: Vec<u8>, payloads: &[Vec<u8>], seed: &str) -> Vec<u8> {
    let lens: Vec<u64> = payloads.iter().map(|p| p.len() as u64).collect();
    let mut a = Archive::with_payloads(prefix, pkl, &lens, seed);
    let mut out = vec![0u8; a.total as usize];
    for (at, p) in a.payload_offsets().into_iter().zip(payloads) {
        out[at as usize..at as usize + p.len()].copy_from_slice(p);
    }
    let crcs: Vec<u32> = payloads.iter().map(|p| crc32fast::hash(p)).collect();
    for (off, b) in a.frame_all(&crcs) {
        out[off as usize..off as usize + b.len()].copy_from_slice(&b);
    }
    out
}

fn pickle_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // As Megatron-Bridge and megatron-core (0.16, and torch-free) wrote them.
    for name in [
        "gemma",
        "gemma3",
        "shared/mcore/tp1",
        "shared/mcore/torchfree_legacy",
    ] {
        seeds.extend(dcp_fixture(name).map(|(m, _)| m));
    }
    seeds.extend(
        fixture("tests/fixtures/shared/mcore/torchfree_legacy/common.pt")
            .map(|b| pickles_of(&b))
            .unwrap_or_default(),
    );
    for item in dcp_items("gemma", 3) {
        seeds.extend(pickles_of(&item));
    }
    seeds.extend(
        fixture("tests/fixtures/bridge/gemma/iter_0000000/train_state.pt")
            .map(|b| pickles_of(&b))
            .unwrap_or_default(),
    );
    seeds.push(emit::tensor_pickle(DType::BF16, &[4, 8]));
    seeds.push(emit::none_list_pickle());
    for m in legacy_seeds() {
        seeds.extend(pickles_of(&m));
    }
    // Integers of every width, a float, strings, a memoized tuple used twice.
    let mut p = Pickler::new();
    p.mark();
    for v in [0i64, 255, 65535, -1, 1 << 31, (1 << 40) + 5, i64::MIN] {
        p.int(v);
    }
    p.float(1e300);
    p.str("text");
    p.bool(true);
    p.none();
    p.ints_tuple(&[1, 2, 3, 4]);
    p.op(b'h');
    p.op(0); // BINGET 0: the tuple again
    p.tuple(13);
    seeds.push(p.finish());
    seeds
}

fn pickle_call() -> Call {
    Box::new(|b| {
        let v = pickle::load(b, "fuzz.pkl")?;
        std::hint::black_box(walk(&v, 1 << 20));
        Ok(())
    })
}

// ------------------------------------------------------------------------------ .metadata

fn metadata_seeds() -> Vec<Vec<u8>> {
    // gemma's matches the data file beside it; megatron-core's own is refused at the tiling
    // check, its other paths differ.
    ["gemma", "shared/mcore/tp1"]
        .iter()
        .filter_map(|n| dcp_fixture(n).map(|(m, _)| m))
        .collect()
}

fn metadata_call() -> Call {
    // The fixture's data file beside each mutated .metadata: offsets that land in it are read.
    let dir = tmp();
    if let Some((_, src)) = dcp_fixture("gemma") {
        let _ = std::fs::copy(src.join("__0_0.distcp"), dir.path().join("__0_0.distcp"));
    }
    let mut n = 0u64;
    Box::new(move |b| {
        let path = dir.path().join(".metadata");
        std::fs::write(&path, b).map_err(err)?;
        let meta = checkpoint::read_metadata(dir.path()).map_err(err)?;
        std::hint::black_box(meta.tensors.len());
        // Every other input with the layers of stacked tensors split out.
        n += 1;
        plan_and_run::<bridgeflow_plugin_torch_dist::reader::TorchDistReader>(
            serde_json::json!({ "path": dir.path(), "split_layers": !n.is_multiple_of(2) }),
            true,
        )
    })
}

// ------------------------------------------------------------------------------ zip items

fn item_seeds() -> Vec<Vec<u8>> {
    let mut seeds = dcp_items("gemma", 6);
    // torch.save's own items (megatron-core 0.16).
    seeds.extend(dcp_items("shared/mcore/tp1", 3));
    seeds.push(tensor_archive(&[4, 8]));
    seeds.push(Archive::new("archive", emit::none_list_pickle(), None, "fuzz-bytes").bytes());
    seeds.extend(fixture(
        "tests/fixtures/bridge/gemma/iter_0000000/train_state.pt",
    ));
    seeds
}

fn item_call() -> Call {
    Box::new(|b| {
        let entries = zip::entries(b)?;
        for e in &entries {
            // Every record by its name (CRC-checked): find slices it.
            let _ = zip::find(b, &entries, &e.name);
        }
        let t = checkpoint::tensor_item(b, &mut |_| {})?;
        // The reader views the payload at this range, as the dtype's elements.
        let d = &b[t.data.clone()];
        let n: u64 = t.size.iter().product();
        if (d.len() as u64) != n.saturating_mul(t.dtype.size() as u64) {
            return Err(format!(
                "accepted: {} payload bytes for {:?} {:?}",
                d.len(),
                t.dtype,
                t.size
            ));
        }
        Ok(())
    })
}

/// A mutation of the pickle inside a `torch.save` archive: its `data.pkl` mutated (bytes or an
/// integer opcode), sometimes a storage record cut or grown, and the archive framed again with
/// right CRCs, so that the mutation reaches the unpickler and what reads its value instead of
/// stopping at the CRC check.
pub fn zip_aware(rng: &mut Rng, pool: &[Vec<u8>]) -> Option<Vec<u8>> {
    let base = &pool[rng.below(pool.len())];
    let entries = zip::entries(base).ok()?;
    let pkl = entries.iter().find(|e| e.name.ends_with("/data.pkl"))?;
    let prefix = pkl.name.strip_suffix("/data.pkl")?.to_string();
    let mut p = base.get(pkl.data.clone())?.to_vec();
    let mut payloads = Vec::new();
    while let Some(e) = entries
        .iter()
        .find(|e| e.name == format!("{prefix}/data/{}", payloads.len()))
    {
        payloads.push(base.get(e.data.clone())?.to_vec());
    }
    for _ in 0..1 + rng.below(3) {
        if rng.chance(2) {
            pickle_mutation(rng, &mut p);
        } else {
            let same = [p.clone()];
            byte_mutation(rng, &mut p, &same);
        }
    }
    if rng.chance(8) && !payloads.is_empty() {
        let k = rng.below(payloads.len());
        let q = &mut payloads[k];
        if rng.chance(2) {
            q.truncate(rng.below(q.len() + 1));
        } else {
            q.extend(std::iter::repeat_n(0u8, 1 + rng.below(64)));
        }
    }
    Some(archive(&prefix, p, &payloads, "fuzz"))
}

// ------------------------------------------------------------------------------ Megatron-LM

/// A one-rank Megatron-LM checkpoint file (`model_optim_rng.pt`) of a tiny GPT as Megatron-LM
/// saves it: args Namespace, checkpoint_version 3.0, iteration, one state dict per model chunk
/// (`model`, or `model0`, `model1` with virtual pipeline chunks).
pub fn legacy_rank_file(vpp: usize) -> Vec<u8> {
    let (h, ffn, vocab) = (8u64, 16u64, 32u64);
    let layers = vpp as u64;
    let mut p = Pickler::new();
    p.dict_begin();
    p.str("args");
    p.newobj("argparse", "Namespace");
    p.dict_begin();
    let ints: &[(&str, i64)] = &[
        ("num_layers", layers as i64),
        ("hidden_size", h as i64),
        ("ffn_hidden_size", ffn as i64),
        ("num_attention_heads", 2),
        ("num_query_groups", 2),
        ("kv_channels", 4),
        ("padded_vocab_size", vocab as i64),
        ("max_position_embeddings", 64),
        ("tensor_model_parallel_size", 1),
        ("pipeline_model_parallel_size", 1),
        ("expert_model_parallel_size", 1),
        ("iteration", 5),
    ];
    for (k, v) in ints {
        p.str(k);
        p.int(*v);
    }
    for (k, v) in [
        ("swiglu", true),
        ("group_query_attention", false),
        ("untie_embeddings_and_output_weights", true),
        ("bf16", true),
        ("add_bias_linear", false),
    ] {
        p.str(k);
        p.bool(v);
    }
    p.str("virtual_pipeline_model_parallel_size");
    if vpp > 1 {
        p.int(vpp as i64);
    } else {
        p.none();
    }
    p.str("transformer_impl");
    p.str("transformer_engine");
    p.str("normalization");
    p.str("RMSNorm");
    p.str("ckpt_format");
    p.str("torch");
    p.dict_end();
    p.build();
    p.str("checkpoint_version");
    p.float(3.0);
    p.str("iteration");
    p.int(5);
    let mut shapes: Vec<Vec<u64>> = Vec::new();
    for v in 0..vpp {
        p.str(&if vpp > 1 {
            format!("model{v}")
        } else {
            "model".into()
        });
        p.global("collections", "OrderedDict");
        p.tuple(0);
        p.op(b'R');
        p.memo_after();
        p.mark();
        let mut keys: Vec<(String, Vec<u64>)> = Vec::new();
        if v == 0 {
            keys.push(("embedding.word_embeddings.weight".into(), vec![vocab, h]));
        }
        for (k, s) in [
            ("self_attention.linear_qkv.layer_norm_weight", vec![h]),
            ("self_attention.linear_qkv.weight", vec![3 * h, h]),
            ("self_attention.linear_proj.weight", vec![h, h]),
            ("mlp.linear_fc1.layer_norm_weight", vec![h]),
            ("mlp.linear_fc1.weight", vec![2 * ffn, h]),
            ("mlp.linear_fc2.weight", vec![h, ffn]),
        ] {
            keys.push((format!("decoder.layers.0.{k}"), s));
        }
        if v + 1 == vpp {
            keys.push(("decoder.final_layernorm.weight".into(), vec![h]));
            keys.push(("output_layer.weight".into(), vec![vocab, h]));
        }
        for (k, s) in keys {
            p.str(&k);
            emit::tensor_value(&mut p, DType::BF16, &s, shapes.len());
            shapes.push(s);
            if let Some(m) = k.strip_suffix(".weight").filter(|m| m.contains(".linear_")) {
                p.str(&format!("{m}._extra_state"));
                p.none();
            }
        }
        p.op(b'u');
    }
    p.dict_end();
    let payloads: Vec<Vec<u8>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product::<u64>() * 2;
            (0..n)
                .map(|j| ((j * 31 + i as u64 * 7) % 253) as u8)
                .collect()
        })
        .collect();
    archive("model_optim_rng", p.finish(), &payloads, "fuzz-legacy")
}

fn legacy_seeds() -> Vec<Vec<u8>> {
    vec![legacy_rank_file(1), legacy_rank_file(2)]
}

fn legacy_call() -> Call {
    let dir = tmp();
    let rank = dir.path().join("mp_rank_00");
    std::fs::create_dir_all(&rank).expect("rank folder");
    let mut n = 0u64;
    Box::new(move |b| {
        let file = rank.join("model_optim_rng.pt");
        // A new file each time: a map of the last one is never written under.
        let _ = std::fs::remove_file(&file);
        std::fs::write(&file, b).map_err(err)?;
        n += 1;
        // Every other input in rank mode (one file's local tensors, as stored).
        let cfg = if n.is_multiple_of(2) {
            serde_json::json!({ "path": dir.path(), "rank": "mp_rank_00" })
        } else {
            serde_json::json!({ "path": dir.path() })
        };
        plan_and_run::<bridgeflow_plugin_torch_dist::legacy::LegacyReader>(cfg, true)
    })
}

// ------------------------------------------------------------------------------ .idx

/// An `.idx` of `docs` (each a list of sequence lengths), as the indexed writer lays it out.
pub fn idx_file(code: u8, item: u64, docs: &[&[i32]]) -> Vec<u8> {
    let lens: Vec<i32> = docs.iter().flat_map(|d| d.iter().copied()).collect();
    let mut b = Vec::new();
    b.extend_from_slice(bridgeflow_plugin_megatron_indexed::format::MAGIC);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(code);
    b.extend_from_slice(&(lens.len() as u64).to_le_bytes());
    b.extend_from_slice(&(docs.len() as u64 + 1).to_le_bytes());
    for l in &lens {
        b.extend_from_slice(&l.to_le_bytes());
    }
    let mut ptr = 0u64;
    for l in &lens {
        b.extend_from_slice(&ptr.to_le_bytes());
        ptr += *l as u64 * item;
    }
    let mut at = 0u64;
    b.extend_from_slice(&0u64.to_le_bytes());
    for d in docs {
        at += d.len() as u64;
        b.extend_from_slice(&at.to_le_bytes());
    }
    b
}

fn idx_seeds() -> Vec<Vec<u8>> {
    use bridgeflow_plugin_megatron_indexed::format::{header, TokenType};
    let mut seeds = vec![
        idx_file(TokenType::U16.code(), 2, &[&[5, 3], &[7], &[1, 1, 2]]),
        idx_file(TokenType::I32.code(), 4, &[&[12], &[0, 4]]),
        idx_file(TokenType::U8.code(), 1, &[&[1]]),
        idx_file(TokenType::I64.code(), 8, &[]),
    ];
    // Checked against the format module's own header.
    let h = header(TokenType::U16, 6, 4);
    assert_eq!(&seeds[0][..h.len()], &h[..], "idx seed header");
    seeds.push(h); // a header alone: truncated
                   // As Megatron-LM's preprocess_data.py wrote them.
    for f in [
        "edge_syntax_bpe8k_text_document.idx",
        "head200_bpe8k_noeod_text_document.idx",
    ] {
        seeds.extend(fixture(&format!("tests/fixtures/shared/data/indexed/{f}")));
    }
    seeds
}

/// An in-place mutation of an `.idx`: one of its counts or array entries (sizes, pointers,
/// document indices, at their alignment) set to an interesting value or moved by one, the
/// length kept, so that the checks after the length check are reached.
pub fn idx_aware(rng: &mut Rng, pool: &[Vec<u8>]) -> Option<Vec<u8>> {
    use bridgeflow_plugin_megatron_indexed::format::HEADER_LEN;
    let mut d = pool[rng.below(pool.len())].clone();
    if d.len() < HEADER_LEN {
        return None;
    }
    let seqs = u64::from_le_bytes(d[18..26].try_into().ok()?) as usize;
    // (offset, width) of a field: the dtype code, a count, or an entry of an array.
    let l_end = HEADER_LEN.checked_add(seqs.checked_mul(4)?)?;
    let p_end = l_end.checked_add(seqs.checked_mul(8)?)?;
    let (at, w) = match rng.below(5) {
        0 => (17, 1),
        1 => (18 + 8 * rng.below(2), 8),
        2 if seqs > 0 => (HEADER_LEN + 4 * rng.below(seqs), 4),
        3 if seqs > 0 => (l_end + 8 * rng.below(seqs), 8),
        _ if d.len() >= p_end + 8 => (p_end + 8 * rng.below((d.len() - p_end) / 8), 8),
        _ => (17, 1),
    };
    if at + w > d.len() {
        return None;
    }
    let old = d[at..at + w]
        .iter()
        .rev()
        .fold(0u64, |a, &b| (a << 8) | b as u64);
    let v: u64 = match rng.below(4) {
        0 => old.wrapping_add(1),
        1 => old.wrapping_sub(1),
        2 => *[
            0u64,
            1,
            u64::MAX,
            i32::MAX as u64,
            1 << 31,
            1 << 32,
            1 << 40,
            i64::MAX as u64,
        ]
        .get(rng.below(8))?,
        _ => d.len() as u64,
    };
    d[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
    Some(d)
}

fn idx_call() -> Call {
    let dir = tmp();
    Box::new(move |b| {
        use bridgeflow_plugin_megatron_indexed::format::Index;
        let path = dir.path().join("d.idx");
        let idx = Index::parse(&path, b).map_err(err)?;
        // Every entry, as the reader reads them.
        let mut sum = 0i64;
        for i in 0..idx.sequences {
            sum = sum
                .wrapping_add(idx.length(i) as i64)
                .wrapping_add(idx.pointer(i) as i64);
        }
        for i in 0..idx.doc_entries {
            sum = sum.wrapping_add(idx.doc_index(i) as i64);
        }
        std::hint::black_box(sum);
        let bytes = idx.data_bytes();
        if bytes > 1 << 20 {
            return Ok(()); // the .bin it wants is too big to make here
        }
        std::fs::write(&path, b).map_err(err)?;
        let bin = std::fs::File::create(dir.path().join("d.bin")).map_err(err)?;
        bin.set_len(bytes).map_err(err)?;
        drop(bin);
        plan_and_run::<bridgeflow_plugin_megatron_indexed::reader::IndexedReader>(
            serde_json::json!({ "path": dir.path().join("d").display().to_string() }),
            true,
        )
    })
}

// ------------------------------------------------------------------------------ YAML

fn yaml_seeds() -> Vec<Vec<u8>> {
    use bridgeflow_plugin_models::megatron_config::{model_section, run_config, to_yaml};
    let mut seeds = Vec::new();
    for name in [
        "bridge/gemma",
        "bridge/deepseek_v3_mtp",
        "bridge/qwen25_vl",
        "shared/bridge/qwen3_moe",
        "shared/bridge/deepseek_v3",
    ] {
        seeds.extend(fixture(&format!(
            "tests/fixtures/{name}/iter_0000000/run_config.yaml"
        )));
    }
    // As the models plugin writes it, with the original HF config and without (the model
    // section rebuilt).
    for name in ["qwen3", "mixtral"] {
        let Some(hf) = fixture(&format!("tests/fixtures/hf/{name}/config.json"))
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            continue;
        };
        let arch = hf["architectures"][0].as_str().unwrap_or("").to_string();
        let Ok(family) = bridgeflow_plugin_models::families::find(&arch, &[]) else {
            continue;
        };
        let Ok(model) = model_section(&family, &hf, Some("hf/model"), 128, 1) else {
            continue;
        };
        let mut rc = run_config(&hf, model, Some("hf/model"));
        seeds.push(to_yaml(&rc, "# written by bridgeflow\n").into_bytes());
        if let Some(o) = rc.as_object_mut() {
            o.remove("bridgeflow");
        }
        seeds.push(to_yaml(&rc, "").into_bytes());
    }
    seeds
}

fn yaml_call() -> Call {
    let dir = tmp();
    Box::new(move |b| {
        let path = dir.path().join("run_config.yaml");
        std::fs::write(&path, b).map_err(err)?;
        let hf = bridgeflow_plugin_models::megatron_config::hf_config_from_run_config(&path)
            .map_err(err)?;
        std::hint::black_box(hf.is_object());
        Ok(())
    })
}

// ------------------------------------------------------------------------------ JSONL

const JSONL: &str = concat!(
    "{\"text\": \"Hello, world.\", \"id\": 1}\n",
    "{\"text\": [\"two\", \"sentences\"], \"meta\": {\"score\": 0.5, \"tags\": [1, 2, 3]}}\r\n",
    "{\"text\": \"caf\\u00e9 \\ud83d\\ude00 \\\"quoted\\\" \\\\ back\", \"n\": -12e-3}\r",
    "{\"text\": \"nan\", \"v\": NaN, \"w\": Infinity, \"x\": -Infinity, \"big\": 1e400}\n",
    "{\"text\": \"dup\", \"text\": \"last wins\", \"i\": 123456789012345678901234567890}\n",
    "{\"text\": \"deep\", \"d\": [[[[[[[[[[{\"a\": [1]}]]]]]]]]]]}\n",
    "{\"text\": \"max\", \"f\": 1.7976931348623158e308, \"e\": \"\\u2028\\u0000\"}\n",
    "[\"not\", \"an\", \"object\"]\n",
    "{\"nokey\": true}\n",
);

fn jsonl_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = vec![JSONL.as_bytes().to_vec()];
    seeds.extend(JSONL.lines().map(|l| l.as_bytes().to_vec()));
    // The dataset fixtures: Megatron's edge cases, the malformed ones, a corpus's first lines.
    let corpus = "tests/fixtures/shared/data/corpus";
    seeds.extend(fixture(&format!("{corpus}/edge_syntax.jsonl")));
    seeds.extend(fixture(&format!("{corpus}/malformed.jsonl")));
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root().join(corpus).join("malformed_cases"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    cases.sort();
    seeds.extend(cases.iter().filter_map(|p| std::fs::read(p).ok()));
    if let Some(b) = fixture(&format!("{corpus}/paragraphs.jsonl")) {
        let cut = b[..b.len().min(16 << 10)]
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |i| i + 1);
        seeds.push(b[..cut].to_vec());
    }
    seeds
}

fn jsonl_call() -> Call {
    Box::new(|b| {
        use bridgeflow_plugin_jsonl::lines::UniversalLines;
        use bridgeflow_plugin_jsonl::pyjson::{document_sentences, parse_document};
        let mut first_bad: Option<String> = None;
        for (n, line) in UniversalLines::new(b).enumerate() {
            let line = line.map_err(err)?;
            let r = std::str::from_utf8(&line)
                .map_err(err)
                .and_then(parse_document)
                .and_then(|p| document_sentences(&p, "text").map(|s| s.len()));
            if let Err(e) = r {
                first_bad.get_or_insert(format!("line {}: {e}", n + 1));
            }
        }
        first_bad.map_or(Ok(()), Err)
    })
}

// ------------------------------------------------------------------------------ pipelines

fn pipeline_seeds() -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("pipelines"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn pipeline_call() -> Call {
    use bridgeflow_core::pipeline::{self, Override};
    let host = bridgeflow_core::PluginHost::default();
    let sets = [
        "input=data/x.jsonl",
        "workers=4",
        "read.path=other",
        "stages.read.config.path=\"y\"",
        "tp=[1, 2",
        "x.y.z={a = 1}",
    ];
    let mut n = 0usize;
    Box::new(move |b| {
        let text = std::str::from_utf8(b).map_err(err)?;
        n += 1;
        let overrides: Vec<Override> = n
            .is_multiple_of(3)
            .then(|| Override::parse(sets[n / 3 % sets.len()]).ok())
            .flatten()
            .into_iter()
            .collect();
        let path = Path::new("fuzz.toml");
        let spec = pipeline::parse(text, path, &overrides).map_err(|e| format!("{e:?}"))?;
        // Validated against a host without plugins: the graph checks run (stages, inputs,
        // cycles) and every stage is refused as unknown, so only the parse decides the verdict.
        let _ = bridgeflow_core::graph::build(spec, &host);
        Ok(())
    })
}

//! The trainer's golden data (`tests/fixtures/train`, written by `scripts/train_replay.py`) as
//! the tests feed it: Parquet samples of the golden global batches, or their ids and masks.

use bridgeflow_sdk::arrow_array::builder::{Float32Builder, Int64Builder, ListBuilder};
use bridgeflow_sdk::arrow_array::{ArrayRef, RecordBatch};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn train_fixtures() -> PathBuf {
    crate::workspace_root().join("tests/fixtures/train")
}

/// Little-endian f32 values.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Stages `read` and `map`: the HF folder `hf` in Megatron's names and layout.
pub fn read_and_map(hf: &Path) -> String {
    format!(
        r#"
[stages.read]
plugin = "safetensors"
kind = "reader"
config = {{ path = "{hf}" }}

[stages.map]
plugin = "models"
kind = "mapper"
inputs = ["read"]
config = {{ direction = "to-megatron" }}
"#,
        hf = hf.display()
    )
}

/// Stages `data` (the golden samples `data`, Parquet) and `train` (the replays' settings,
/// `scripts/train_replay.py`'s, for `iters` iterations; `extra`: the case's own trainer
/// settings), training the weights of stage `map`.
pub fn replay_data_and_train(data: &Path, iters: usize, extra: &str) -> String {
    format!(
        r#"
[stages.data]
plugin = "parquet"
kind = "reader"
config = {{ path = "{data}", columns = ["tokens", "loss_mask"] }}

[stages.train]
plugin = "trainer"
kind = "trainer"
inputs = ["map", "data"]
config = {{ seq_length = 32, global_batch_size = 4, micro_batch_size = 2, train_iters = {iters}, lr = 1e-3, min_lr = 1e-4, lr_warmup_iters = 2, lr_decay_iters = 20, lr_decay_style = "cosine", weight_decay = 0.033, adam_beta1 = 0.9, adam_beta2 = 0.95, adam_eps = 1e-8, clip_grad = 1.0, {extra} }}
"#,
        data = data.display(),
    )
}

/// HF → Megatron → train on the golden samples `data` with the replays' settings
/// ([`replay_data_and_train`]) → HF at `out`.
pub fn replay_pipeline(hf: &Path, data: &Path, out: &Path, iters: usize, extra: &str) -> String {
    format!(
        r#"{read}{train}
[stages.to_hf]
plugin = "models"
kind = "mapper"
inputs = ["train.weights"]
config = {{ direction = "to-hf", hf_config = "{hf}/config.json" }}

[stages.write]
plugin = "safetensors"
kind = "writer"
inputs = ["to_hf"]
config = {{ path = "{out}" }}
"#,
        read = read_and_map(hf),
        train = replay_data_and_train(data, iters, extra),
        hf = hf.display(),
        out = out.display(),
    )
}

/// The largest absolute difference between same-named f32 tensors of two sets, and where: the
/// sets must hold the same names.
pub fn worst_difference(
    ours: &std::collections::BTreeMap<String, crate::Loaded>,
    theirs: &std::collections::BTreeMap<String, crate::Loaded>,
) -> (f32, String) {
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let mut worst = (0.0f32, String::new());
    for (name, t) in theirs {
        for (a, b) in f32s(&ours[name].bytes).iter().zip(f32s(&t.bytes)) {
            if (a - b).abs() > worst.0 {
                worst = ((a - b).abs(), name.clone());
            }
        }
    }
    worst
}

/// The golden batches as a Parquet file of samples (`tokens`: seq + 1 ids, `loss_mask`),
/// iteration by iteration: the first `iters` global batches.
pub fn write_samples(out: &Path, iters: usize) {
    write_batches(out, 0..iters)
}

/// Those of the golden global batches `which` (0-based iterations), in that order.
pub fn write_batches(out: &Path, which: impl IntoIterator<Item = usize>) {
    write_cut_batches(out, which, usize::MAX)
}

/// [`write_batches`] with each sample cut to its first `keep` ids (and `keep` − 1 mask values).
pub fn write_cut_batches(out: &Path, which: impl IntoIterator<Item = usize>, keep: usize) {
    let bytes = std::fs::read(train_fixtures().join("batches.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tokens = st.tensor("tokens").unwrap();
    let mask = st.tensor("loss_mask").unwrap();
    let (gbs, n_tok) = (tokens.shape()[1], tokens.shape()[2]);
    let cut = keep.min(n_tok);
    let ids: Vec<i64> = tokens
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let m = f32s(mask.data());
    let mut tb = ListBuilder::new(Int64Builder::new());
    let mut mb = ListBuilder::new(Float32Builder::new());
    for s in which.into_iter().flat_map(|k| k * gbs..(k + 1) * gbs) {
        tb.values().append_slice(&ids[s * n_tok..s * n_tok + cut]);
        tb.append(true);
        mb.values()
            .append_slice(&m[s * (n_tok - 1)..s * (n_tok - 1) + cut - 1]);
        mb.append(true);
    }
    let batch = RecordBatch::try_from_iter(vec![
        ("tokens", Arc::new(tb.finish()) as ArrayRef),
        ("loss_mask", Arc::new(mb.finish()) as ArrayRef),
    ])
    .unwrap();
    let f = std::fs::File::create(out).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The golden batches: every sample's 33 ids, and 32 loss-mask values.
pub fn golden_batches() -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(train_fixtures().join("batches.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor("tokens")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    (ids, f32s(st.tensor("loss_mask").unwrap().data()))
}

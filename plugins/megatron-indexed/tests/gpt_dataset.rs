//! The gpt-dataset reader's indices and samples against megatron-core's own, on the
//! repository's golden files (`tests/fixtures/train/gpt_dataset`, made by
//! `scripts/gpt_dataset_goldens.py` with megatron-core 0.19.2's GPTDataset and its compiled
//! `helpers`).

use bridgeflow_plugin_megatron_indexed::format::Index;
use bridgeflow_plugin_megatron_indexed::gpt_dataset::{build, sample_tokens, split_ranges};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ints(b: &[u8], width: usize) -> Vec<i64> {
    b.chunks_exact(width)
        .map(|c| match width {
            4 => i32::from_le_bytes(c.try_into().unwrap()) as i64,
            _ => i64::from_le_bytes(c.try_into().unwrap()),
        })
        .collect()
}

/// Document, sample and shuffle indices element for element, and the first samples' tokens,
/// on the bpe8k corpus for every split of five configs: one epoch, a split at the
/// separate-final-epoch edge, three epochs with the final one shuffled apart, two epochs
/// shuffled jointly.
#[test]
fn indices_and_samples_equal_megatron_core() {
    let dir = root().join("tests/fixtures/train/gpt_dataset");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let prefix = root().join("tests/fixtures/shared/data/indexed/corpus_bpe8k_text_document");
    let idx_path = prefix.with_extension("idx");
    let idx_bytes = std::fs::read(&idx_path).unwrap();
    let bin = std::fs::read(prefix.with_extension("bin")).unwrap();
    let idx = Index::parse(&idx_path, &idx_bytes).unwrap();
    let sizes: Vec<i32> = (0..idx.sequences).map(|i| idx.length(i)).collect();
    let mut checked = 0;
    for (name, case) in cases["cases"].as_object().unwrap() {
        let cfg = &case["config"];
        let seq = cfg["sequence_length"].as_u64().unwrap();
        let seed = cfg["random_seed"].as_u64().unwrap() as u32;
        let ranges = split_ranges(cfg["split"].as_str().unwrap(), idx.sequences).unwrap();
        for (pos, split) in ["train", "valid", "test"].iter().enumerate() {
            let file = dir.join(format!("{name}_{split}.safetensors"));
            if !file.exists() {
                continue;
            }
            let want = &case["splits"][split];
            let range = want["document_range"].as_array().unwrap();
            let (beg, end) = ranges[pos].unwrap();
            let want_range = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
            assert_eq!((beg as u64, end as u64), want_range, "{name} {split}");
            let docs: Vec<i32> = (beg as i32..end as i32).collect();
            let n = want["num_samples_requested"].as_u64().unwrap();
            let ind = build(&sizes, &docs, seq, n, seed).unwrap();
            let at = format!("{name} {split}");
            assert_eq!(ind.num_epochs, want["num_epochs"].as_u64().unwrap(), "{at}");
            let separate = want["separate_final_epoch"].as_bool().unwrap();
            assert_eq!(ind.separate_final_epoch, separate, "{at}");
            let bytes = std::fs::read(&file).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let doc_index: Vec<i64> = ind.document_index.iter().map(|&d| d as i64).collect();
            assert_eq!(
                doc_index,
                ints(st.tensor("document_index").unwrap().data(), 4),
                "{at}"
            );
            let samples: Vec<i64> = ind.sample_index.iter().flat_map(|&(d, o)| [d, o]).collect();
            assert_eq!(
                samples,
                ints(st.tensor("sample_index").unwrap().data(), 4),
                "{at}"
            );
            let shuffle: Vec<i64> = ind.shuffle_index.iter().map(|&s| s as i64).collect();
            let golden: Vec<i64> = st
                .tensor("shuffle_index")
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect();
            assert_eq!(shuffle, golden, "{at}");
            let first = st.tensor("first_tokens").unwrap();
            let mut ours = Vec::new();
            for i in 0..first.shape()[0] {
                sample_tokens(&ind, &idx, &bin, i, &mut ours).unwrap();
            }
            assert_eq!(
                ours,
                ints(first.data(), 8),
                "{at}: the first samples' tokens"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 9, "every golden split checked");
}

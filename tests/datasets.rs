//! Dataset ETL against Megatron-LM's own outputs: `preprocess_data.py` pairs byte for byte, its
//! merge, its edge cases, and the malformed inputs on which it hangs.

use bridgeflow_tests::*;
use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    fixtures().join("data")
}

fn golden(name: &str, ext: &str) -> Vec<u8> {
    std::fs::read(data().join(format!("indexed/{name}_text_document.{ext}"))).unwrap()
}

fn head(n: usize, dir: &Path) -> PathBuf {
    let text = std::fs::read(data().join("corpus/corpus.jsonl")).unwrap();
    let mut end = 0;
    for _ in 0..n {
        end += text[end..].iter().position(|&b| b == b'\n').unwrap() + 1;
    }
    let p = dir.join(format!("head{n}.jsonl"));
    std::fs::write(&p, &text[..end]).unwrap();
    p
}

fn preprocess(
    input: &Path,
    tokenizer: &str,
    prefix: &Path,
    extra: &[&str],
) -> std::process::Output {
    bridgeflow()
        .arg("preprocess")
        .arg("--input")
        .arg(input)
        .arg("--tokenizer")
        .arg(data().join("tokenizer").join(tokenizer))
        .arg("--output-prefix")
        .arg(prefix)
        .args(extra)
        .output()
        .unwrap()
}

fn assert_identical(prefix: &Path, key: &str, golden_name: &str) {
    for ext in ["bin", "idx"] {
        let ours = std::fs::read(format!("{}_{key}_document.{ext}", prefix.display())).unwrap();
        let want =
            std::fs::read(data().join(format!("indexed/{golden_name}_{key}_document.{ext}")))
                .unwrap();
        assert_eq!(ours.len(), want.len(), "{golden_name} {key}.{ext} size");
        assert!(
            ours == want,
            "{golden_name} {key}.{ext} differs from preprocess_data.py's"
        );
    }
}

#[test]
fn corpus_two_keys_byte_identical() {
    let dir = tempdir();
    let prefix = dir.path().join("corpus_bpe8k");
    let o = preprocess(
        &data().join("corpus/corpus.jsonl"),
        "bpe8k",
        &prefix,
        &[
            "--json-keys",
            "text",
            "title",
            "--append-eod",
            "--workers",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("preprocessed 3061 documents"),
        "{}",
        text(&o)
    );
    assert_identical(&prefix, "text", "corpus_bpe8k");
    assert_identical(&prefix, "title", "corpus_bpe8k");
}

#[test]
fn int32_path_with_bos_byte_identical() {
    let dir = tempdir();
    let input = head(500, dir.path());
    let prefix = dir.path().join("h500");
    let o = preprocess(&input, "bpe65500_bos", &prefix, &["--append-eod"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_identical(&prefix, "text", "head500_bpe65500bos");
    let idx = golden("head500_bpe65500bos", "idx");
    assert_eq!(idx[17], 4, "vocab of exactly 65,500 gives int32");
}

#[test]
fn list_valued_text_byte_identical() {
    let dir = tempdir();
    let prefix = dir.path().join("par");
    let o = preprocess(
        &data().join("corpus/paragraphs.jsonl"),
        "bpe8k",
        &prefix,
        &["--append-eod"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_identical(&prefix, "text", "paragraphs_bpe8k");
}

#[test]
fn json_edge_syntax_byte_identical() {
    // Lone \r splits a line, NaN/Infinity parse, duplicate keys keep the last, [] and "" are
    // documents with no sequences.
    let dir = tempdir();
    let prefix = dir.path().join("edge");
    let o = preprocess(
        &data().join("corpus/edge_syntax.jsonl"),
        "bpe8k",
        &prefix,
        &["--append-eod", "--workers", "1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("preprocessed 19 documents"),
        "{}",
        text(&o)
    );
    assert_identical(&prefix, "text", "edge_syntax_bpe8k");
}

#[test]
fn without_append_eod_byte_identical() {
    let dir = tempdir();
    let input = head(200, dir.path());
    let prefix = dir.path().join("noeod");
    let o = preprocess(&input, "bpe8k", &prefix, &["--workers", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_identical(&prefix, "text", "head200_bpe8k_noeod");
}

#[test]
fn partitions_and_merge_byte_identical() {
    let dir = tempdir();
    let input = head(200, dir.path());
    let prefix = dir.path().join("part2");
    let o = preprocess(
        &input,
        "bpe8k",
        &prefix,
        &["--append-eod", "--partitions", "2"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_identical(&prefix, "text", "head200_bpe8k_part2");
    assert!(
        !dir.path()
            .join("part2.part0-of-2_text_document.idx")
            .exists(),
        "parts removed after the merge"
    );

    // Each partition alone, then an explicit merge: the same bytes as Megatron's add_index.
    for k in 0..2 {
        let r = run_text(
            dir.path(),
            &std::fs::read_to_string(workspace_root().join("pipelines/jsonl-to-indexed.toml"))
                .unwrap(),
            &[
                &format!("input={}", input.display()),
                &format!("tokenizer={}", data().join("tokenizer/bpe8k").display()),
                &format!("output_prefix={}/p{k}", dir.path().display()),
                &format!("read.partition={{ index = {k}, count = 2 }}"),
            ],
            1 << 30,
        );
        r.unwrap();
    }
    let merged = dir.path().join("merged");
    let o = bridgeflow()
        .arg("merge")
        .arg(dir.path().join("p0_text_document"))
        .arg(dir.path().join("p1_text_document.idx"))
        .arg("--output")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(merged.with_extension("bin")).unwrap()
            == golden("head200_bpe8k_part2", "bin")
    );
    assert!(
        std::fs::read(merged.with_extension("idx")).unwrap()
            == golden("head200_bpe8k_part2", "idx")
    );
}

#[test]
fn reads_megatron_files_and_reports_stats() {
    let prefix = data().join("indexed/corpus_bpe8k_text_document");
    let o = bridgeflow()
        .arg("inspect")
        .arg("--json")
        .arg(prefix.with_extension("idx"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["reader"], "megatron-indexed");
    assert_eq!(v["attrs"]["documents"], 3061);
    assert_eq!(v["attrs"]["sequences"], 3059);
    assert_eq!(v["attrs"]["tokens"], 1272539);
    assert_eq!(v["attrs"]["token_dtype"], "uint16");
    assert_eq!(
        v["attrs"]["longest_document_tokens"], 88886,
        "bash(1) with its EOD"
    );
    let hist = v["attrs"]["document_length_histogram"].as_object().unwrap();
    assert_eq!(hist["0"], 2, "two empty documents");
    assert_eq!(
        hist.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        3061
    );

    // Read back and written again, a Megatron dataset is reproduced exactly.
    let dir = tempdir();
    let out = dir.path().join("copy");
    let o = bridgeflow()
        .arg("merge")
        .arg(&prefix)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(out.with_extension("idx")).unwrap() == golden("corpus_bpe8k", "idx"));
    assert!(std::fs::read(out.with_extension("bin")).unwrap() == golden("corpus_bpe8k", "bin"));
}

#[test]
fn corrupt_index_is_refused() {
    let dir = tempdir();
    let p = dir.path().join("bad_text_document");
    let mut idx = golden("edge_syntax_bpe8k", "idx");
    std::fs::write(p.with_extension("bin"), golden("edge_syntax_bpe8k", "bin")).unwrap();
    idx.truncate(idx.len() - 8);
    std::fs::write(p.with_extension("idx"), &idx).unwrap();
    let o = bridgeflow()
        .arg("inspect")
        .arg(p.with_extension("idx"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("need 398 (truncated"), "{}", text(&o));
    let mut bin = golden("edge_syntax_bpe8k", "bin");
    bin.pop();
    std::fs::write(p.with_extension("idx"), golden("edge_syntax_bpe8k", "idx")).unwrap();
    std::fs::write(p.with_extension("bin"), &bin).unwrap();
    let o = bridgeflow()
        .arg("inspect")
        .arg(p.with_extension("bin"))
        .output()
        .unwrap();
    assert!(
        text(&o).contains("361 bytes, but its index describes 362"),
        "{}",
        text(&o)
    );
}

/// Megatron hangs on every one of these; we fail fast with file, line and reason.
#[test]
fn malformed_lines_fail_fast_with_file_line_and_reason() {
    let cases = [
        ("01_bad_json.jsonl", 2, "invalid JSON"),
        ("02_missing_key.jsonl", 2, "missing key 'text'"),
        ("03_blank_line.jsonl", 2, "empty line"),
        ("04_text_null.jsonl", 2, "key 'text' is null"),
        ("05_text_number.jsonl", 2, "key 'text' is a number"),
        ("06_raw_control_char.jsonl", 2, "control character"),
        ("07_trailing_comma.jsonl", 2, "invalid JSON"),
        ("08_not_an_object.jsonl", 2, "not an object"),
        ("09_list_with_non_string.jsonl", 2, "item 1 is a number"),
        ("10_lone_surrogate.jsonl", 2, "lone UTF-16 surrogate"),
        ("11_invalid_utf8.jsonl", 2, "invalid UTF-8"),
        ("12_utf8_bom_first_line.jsonl", 1, "byte order mark"),
    ];
    for (file, line, reason) in cases {
        let dir = tempdir();
        let input = data().join("corpus/malformed_cases").join(file);
        let prefix = dir.path().join("out");
        let o = preprocess(&input, "bpe8k", &prefix, &["--append-eod"]);
        let m = text(&o);
        assert_eq!(o.status.code(), Some(1), "{file}: {m}");
        let at = format!("{}:{line}: ", input.display());
        assert!(
            m.contains(&at) && m.contains(reason),
            "{file}: expected {at}…{reason} in {m}"
        );
        assert!(m.contains("--skip-bad-lines"), "{m}");
        // Nothing that looks like a dataset, and no temporary files either.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{file}: left {left:?}");

        // With --skip-bad-lines the good lines make a dataset and the bad one is counted.
        let good = if line == 1 { 1 } else { 2 };
        let o = preprocess(
            &input,
            "bpe8k",
            &prefix,
            &["--append-eod", "--skip-bad-lines"],
        );
        let m = text(&o);
        assert!(o.status.success(), "{file}: {m}");
        assert!(
            m.contains(&format!(
                "read {good} documents from 1 file; skipped 1 bad line"
            )),
            "{file}: {m}"
        );
        let idx = std::fs::read(dir.path().join("out_text_document.idx")).unwrap();
        assert_eq!(
            u64::from_le_bytes(idx[26..34].try_into().unwrap()),
            good + 1,
            "{file}"
        );
    }
}

#[test]
fn mixed_malformed_file_skips_and_counts() {
    let dir = tempdir();
    let prefix = dir.path().join("m");
    let o = preprocess(
        &data().join("corpus/malformed.jsonl"),
        "bpe8k",
        &prefix,
        &["--append-eod", "--skip-bad-lines"],
    );
    let m = text(&o);
    assert!(o.status.success(), "{m}");
    assert!(m.contains("skipped"), "{m}");
}

#[test]
fn compressed_and_globbed_inputs() {
    use std::io::Write;
    let dir = tempdir();
    let input = head(200, dir.path());
    let raw = std::fs::read(&input).unwrap();
    let (a, b) = raw.split_at(raw.len() / 2);
    let cut = a.iter().rposition(|&c| c == b'\n').unwrap() + 1;
    let (first, second) = (&raw[..cut], &raw[cut..]);
    let _ = b;
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let mut gz = flate2_writer(&shards.join("a.jsonl.gz"));
    gz.write_all(first).unwrap();
    drop(gz);
    std::fs::write(shards.join("b.jsonl"), second).unwrap();
    let prefix = dir.path().join("g");
    let o = preprocess(
        Path::new(&format!("{}/*.jsonl*", shards.display())),
        "bpe8k",
        &prefix,
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_identical(&prefix, "text", "head200_bpe8k_noeod");
}

fn flate2_writer(p: &Path) -> impl std::io::Write {
    // A minimal gzip writer: a stored (uncompressed) deflate stream, so the test needs no
    // compression crate of its own.
    struct Gz {
        f: std::fs::File,
        data: Vec<u8>,
    }
    impl std::io::Write for Gz {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.data.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Drop for Gz {
        fn drop(&mut self) {
            use std::io::Write;
            let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
            let chunks: Vec<&[u8]> = self.data.chunks(65535).collect();
            for (i, c) in chunks.iter().enumerate() {
                out.push(if i + 1 == chunks.len() { 1 } else { 0 });
                let n = c.len() as u16;
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(&(!n).to_le_bytes());
                out.extend_from_slice(c);
            }
            out.extend_from_slice(&crc32(&self.data).to_le_bytes());
            out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
            self.f.write_all(&out).unwrap();
        }
    }
    fn crc32(d: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in d {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    Gz {
        f: std::fs::File::create(p).unwrap(),
        data: Vec::new(),
    }
}

type Row = (Vec<i64>, Vec<i8>, Vec<i64>);

/// Decoded rows of a packed Parquet file (read with the parquet crate, not our writer).
fn packed_rows(path: &Path) -> Vec<Row> {
    use bridgeflow_sdk::arrow_array::cast::AsArray;
    use bridgeflow_sdk::arrow_array::types::{Int64Type, Int8Type};
    use bridgeflow_sdk::arrow_array::Array;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let f = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let ids = b
            .column_by_name("input_ids")
            .unwrap()
            .as_list::<i32>()
            .clone();
        let mask = b
            .column_by_name("loss_mask")
            .unwrap()
            .as_list::<i32>()
            .clone();
        let starts = b
            .column_by_name("seq_start_id")
            .unwrap()
            .as_list::<i32>()
            .clone();
        for r in 0..b.num_rows() {
            rows.push((
                ids.value(r).as_primitive::<Int64Type>().values().to_vec(),
                mask.value(r).as_primitive::<Int8Type>().values().to_vec(),
                starts
                    .value(r)
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec(),
            ));
        }
        let _ = ids.len();
    }
    rows
}

fn sft(dir: &Path, split: &str, algorithm: &str) -> PathBuf {
    let out = dir.join(format!("{algorithm}/{split}_512.idx.parquet"));
    let r = run_text(
        dir,
        &std::fs::read_to_string(workspace_root().join("pipelines/sft-pack.toml")).unwrap(),
        &[
            &format!(
                "input={}",
                data().join(format!("sft/input/{split}.jsonl")).display()
            ),
            &format!("tokenizer={}", data().join("tokenizer/bpe8k").display()),
            &format!("output={}", out.display()),
            &format!("algorithm={algorithm}"),
        ],
        1 << 30,
    );
    r.unwrap();
    out
}

#[test]
fn sft_packing_equals_megatron_bridge_row_for_row() {
    let dir = tempdir();
    for (algorithm, golden_dir, splits) in [
        (
            "first_fit_decreasing",
            "first_fit_decreasing_seed1234",
            vec!["training"],
        ),
        (
            "first_fit_shuffle",
            "first_fit_shuffle_seed1234",
            vec!["training", "validation"],
        ),
    ] {
        for split in &splits {
            let ours = packed_rows(&sft(dir.path(), split, algorithm));
            let want =
                packed_rows(&data().join(format!("sft/{golden_dir}/{split}_512.idx.parquet")));
            assert_eq!(ours.len(), want.len(), "{algorithm} {split}: rows");
            for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert!(a == b, "{algorithm} {split}: row {i} differs");
            }
            if algorithm == "first_fit_decreasing" {
                // cu_seqlens of rows 0 and 1, as Bridge's collate_fn gave them.
                let rb: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(data().join("sft/readback_collate_first2.json"))
                        .unwrap(),
                )
                .unwrap();
                for r in 0..2 {
                    let (ids, _, starts) = &ours[r];
                    let starts: Vec<usize> = starts.iter().map(|&s| s as usize).collect();
                    let cu =
                        bridgeflow_plugin_sft::packing::cu_seqlens(&starts, ids.len(), Some(512));
                    let want: Vec<i32> =
                        serde_json::from_value(rb["cu_seqlens_q"][r].clone()).unwrap();
                    assert_eq!(cu, want, "cu_seqlens of row {r}");
                }
            }
        }
        // The metadata list, appended split by split, as Bridge writes it.
        let ours =
            std::fs::read_to_string(dir.path().join(format!("{algorithm}/512_metadata.jsonl")))
                .unwrap();
        let want =
            std::fs::read_to_string(data().join(format!("sft/{golden_dir}/512_metadata.jsonl")))
                .unwrap();
        assert_eq!(ours, want, "{algorithm} metadata");
    }
}

#[test]
fn sft_tokenization_and_masks_equal_bridge() {
    // Every conversation's ids and mask against Bridge's own unpacked dump: with a pack size
    // no conversation exceeds, all 300 are kept; split the rows back into sequences and compare
    // the multisets.
    let dir = tempdir();
    let want: Vec<serde_json::Value> =
        std::fs::read_to_string(data().join("sft/tokenized/training.tokenized.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let out = dir.path().join("one/training.parquet");
    run_text(
        dir.path(),
        &std::fs::read_to_string(workspace_root().join("pipelines/sft-pack.toml")).unwrap(),
        &[
            &format!(
                "input={}",
                data().join("sft/input/training.jsonl").display()
            ),
            &format!("tokenizer={}", data().join("tokenizer/bpe8k").display()),
            &format!("output={}", out.display()),
            "pack_size=100000",
        ],
        1 << 30,
    )
    .unwrap();
    let rows = packed_rows(&out);
    let mut got: Vec<(Vec<i64>, Vec<i8>)> = Vec::new();
    for (ids, mask, starts) in rows {
        let mut b = starts.clone();
        b.push(ids.len() as i64);
        for w in b.windows(2) {
            let (s, e) = (w[0] as usize, w[1] as usize);
            got.push((ids[s..e].to_vec(), mask[s..e].to_vec()));
        }
    }
    assert_eq!(got.len(), 300);
    let mut want_pairs: Vec<(Vec<i64>, Vec<i8>)> = want
        .iter()
        .map(|w| {
            let ids: Vec<i64> = serde_json::from_value(w["input_ids"].clone()).unwrap();
            let m: Vec<i8> = serde_json::from_value(w["loss_mask"].clone()).unwrap();
            // Packed rows hold the mask shifted left by one.
            let mut shifted = m[1..].to_vec();
            shifted.push(0);
            (ids, shifted)
        })
        .collect();
    got.sort();
    want_pairs.sort();
    assert!(
        got == want_pairs,
        "token ids and masks equal Bridge's tokenization"
    );
}

#[test]
fn parquet_and_arrow_ipc_inputs_give_the_same_dataset() {
    use bridgeflow_sdk::arrow_array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let dir = tempdir();
    let input = head(200, dir.path());
    let texts: Vec<String> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // Two files each, to exercise globs; written with the arrow/parquet crates directly.
    let (a, b) = texts.split_at(77);
    for (i, part) in [a, b].iter().enumerate() {
        let batch = RecordBatch::try_from_iter(vec![(
            "text",
            Arc::new(StringArray::from(part.to_vec())) as ArrayRef,
        )])
        .unwrap();
        let f = std::fs::File::create(dir.path().join(format!("part{i}.parquet"))).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let f = std::fs::File::create(dir.path().join(format!("part{i}.arrow"))).unwrap();
        let mut w = arrow_ipc::writer::FileWriter::try_new(f, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
    }
    for (plugin, pattern) in [("parquet", "*.parquet"), ("arrow-ipc", "*.arrow")] {
        let read = format!(
            "path = \"{}/{pattern}\", columns = [\"text\"]",
            dir.path().display()
        );
        let tokenizer = format!(
            "tokenizer = \"{}\"",
            data().join("tokenizer/bpe8k").display()
        );
        let write = format!("output_prefix = \"{}/{plugin}\"", dir.path().display());
        let p = chain(&[
            ("read", plugin, "reader", &read),
            ("tokenize", "tokenize", "transform", &tokenizer),
            ("write", "megatron-indexed", "writer", &write),
        ]);
        run_text(dir.path(), &p, &[], 1 << 30).unwrap();
        assert_identical(&dir.path().join(plugin), "text", "head200_bpe8k_noeod");
    }
}

#[test]
fn zstd_input_and_resumed_partitions() {
    let dir = tempdir();
    let input = head(200, dir.path());
    let raw = std::fs::read(&input).unwrap();
    let mut zst = Vec::new();
    ruzstd::encoding::compress(
        &raw[..],
        &mut zst,
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    let z = dir.path().join("head200.jsonl.zst");
    std::fs::write(&z, zst).unwrap();
    let prefix = dir.path().join("z");
    let o = preprocess(&z, "bpe8k", &prefix, &["--append-eod", "--partitions", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_identical(&prefix, "text", "head200_bpe8k_part2");

    // A partition already written is kept and skipped: write partition 0 alone first.
    let prefix = dir.path().join("r");
    run_text(
        dir.path(),
        &std::fs::read_to_string(workspace_root().join("pipelines/jsonl-to-indexed.toml")).unwrap(),
        &[
            &format!("input={}", input.display()),
            &format!("tokenizer={}", data().join("tokenizer/bpe8k").display()),
            &format!("output_prefix={}.part0-of-2", prefix.display()),
            "read.partition={ index = 0, count = 2 }",
        ],
        1 << 30,
    )
    .unwrap();
    let o = preprocess(
        &input,
        "bpe8k",
        &prefix,
        &["--append-eod", "--partitions", "2"],
    );
    let m = text(&o);
    assert!(o.status.success(), "{m}");
    // One reader summary (partition 1) plus the merge's; partition 0 was not read again.
    assert_eq!(m.matches("read: read 100 documents").count(), 1, "{m}");
    assert_identical(&prefix, "text", "head200_bpe8k_part2");
}

#[test]
fn prompt_completion_records() {
    let dir = tempdir();
    let input = dir.path().join("pc.jsonl");
    std::fs::write(
        &input,
        "{\"input\": \"What is 2+2?\", \"output\": \" Four.\"}\n{\"input\": \"Name a color.\", \"output\": \" Blue\"}\n",
    )
    .unwrap();
    let out = dir.path().join("pc/training_64.idx.parquet");
    run_text(
        dir.path(),
        &std::fs::read_to_string(workspace_root().join("pipelines/sft-pack.toml")).unwrap(),
        &[
            &format!("input={}", input.display()),
            &format!("tokenizer={}", data().join("tokenizer/bpe8k").display()),
            &format!("output={}", out.display()),
            "pack_size=64",
            "algorithm=first_fit_decreasing",
        ],
        1 << 30,
    )
    .unwrap();
    let tok =
        tokenizers::Tokenizer::from_file(data().join("tokenizer/bpe8k/tokenizer.json")).unwrap();
    let rows = packed_rows(&out);
    assert_eq!(rows.len(), 1, "both fit one row of 64");
    let (ids, mask, starts) = &rows[0];
    assert_eq!(starts.len(), 2);
    let mut want_seqs = Vec::new();
    for (p, c) in [("What is 2+2?", " Four."), ("Name a color.", " Blue")] {
        let pi = tok.encode(p, true).unwrap().get_ids().to_vec();
        let ci = tok.encode(c, false).unwrap().get_ids().to_vec();
        let mut ids: Vec<i64> = pi.iter().chain(&ci).map(|&x| x as i64).collect();
        ids.push(0); // eos
        let mut m = vec![0i8; pi.len()];
        m.extend(std::iter::repeat_n(1, ci.len() + 1));
        let mut shifted = m[1..].to_vec();
        shifted.push(0);
        want_seqs.push((ids, shifted));
    }
    let mut got = Vec::new();
    let mut b = starts.clone();
    b.push(ids.len() as i64);
    for w in b.windows(2) {
        let (s, e) = (w[0] as usize, w[1] as usize);
        got.push((ids[s..e].to_vec(), mask[s..e].to_vec()));
    }
    got.sort();
    want_seqs.sort();
    assert_eq!(got, want_seqs);
}

//! Dataset inputs a fuzzer would write: numbers and nesting as Python's `json.loads` takes them,
//! indexed datasets with float or inconsistent headers, and untrusted sizes. Each failure is a
//! named error with its file and line (or its option and the allowed range), never a crash,
//! and leaves nothing in the output location; valid inputs give the same bytes as before.

use bridgeflow_tests::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn data() -> PathBuf {
    fixtures().join("data")
}

fn preprocess(input: &Path, prefix: &Path, extra: &[&str]) -> Output {
    bridgeflow()
        .arg("preprocess")
        .arg("--input")
        .arg(input)
        .arg("--tokenizer")
        .arg(data().join("tokenizer/bpe8k"))
        .arg("--output-prefix")
        .arg(prefix)
        .args(extra)
        .output()
        .unwrap()
}

/// Everything in `dir` (recursively), hidden staging files included.
fn contents(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
            if e.path().is_dir() {
                out.extend(contents(&e.path()));
            }
        }
    }
    out
}

fn dataset(prefix: &Path) -> (Vec<u8>, Vec<u8>) {
    let p = prefix.display();
    (
        std::fs::read(format!("{p}_text_document.bin")).unwrap(),
        std::fs::read(format!("{p}_text_document.idx")).unwrap(),
    )
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn json_loads_numbers_and_nesting_in_unused_keys_keep_the_line() {
    let dir = tempdir();
    // Each line as json.loads reads it (inf, a big int, the largest float, 990 levels deep):
    // the text is what counts, so the dataset equals that of the same texts alone.
    let lines = [
        (
            r#"{"text": "alpha beta", "score": 1e400}"#.to_string(),
            "alpha beta",
        ),
        (
            r#"{"text": "gamma", "n": -1E+400, "m": NaN, "k": [Infinity, -Infinity]}"#.into(),
            "gamma",
        ),
        (
            format!(
                r#"{{"big": 1{}, "max": 1.7976931348623158e308, "text": "delta"}}"#,
                "0".repeat(400)
            ),
            "delta",
        ),
        (
            format!(r#"{{"text": "epsilon", "deep": {}}}"#, nested(989)),
            "epsilon",
        ),
        (
            format!(r#"{{"text": "zeta", "i": -{}}}"#, "9".repeat(4300)),
            "zeta",
        ),
    ];
    let hostile = dir.path().join("hostile.jsonl");
    let plain = dir.path().join("plain.jsonl");
    let join = |f: &dyn Fn(&(String, &str)) -> String| {
        lines.iter().map(f).collect::<Vec<_>>().join("\n") + "\n"
    };
    std::fs::write(&hostile, join(&|l| l.0.clone())).unwrap();
    std::fs::write(&plain, join(&|l| format!(r#"{{"text": "{}"}}"#, l.1))).unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let o = preprocess(&hostile, &a, &["--append-eod"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("read 5 documents"), "{}", text(&o));
    let o = preprocess(&plain, &b, &["--append-eod"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(dataset(&a) == dataset(&b), "same bytes as the texts alone");
}

#[test]
fn json_loads_failures_are_bad_lines_with_file_and_line() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "text_inf",
            r#"{"text": 1e400}"#.into(),
            "key 'text' is null",
        ),
        (
            "text_list_nan",
            r#"{"text": ["ok", NaN]}"#.into(),
            "item 1 is a null",
        ),
        (
            "too_deep",
            format!(r#"{{"text": "x", "d": {}}}"#, nested(990)),
            "nested deeper than 990 levels",
        ),
        // Ten megabytes of '[': an error at once, not a stack overflow.
        (
            "brackets_10mb",
            "[".repeat(10 << 20),
            "nested deeper than 990 levels",
        ),
        (
            "int_4301_digits",
            format!(r#"{{"text": "x", "n": {}}}"#, "1".repeat(4301)),
            "4301 digits",
        ),
    ];
    for (name, bad, reason) in cases {
        let dir = tempdir();
        let input = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(
            &input,
            format!("{{\"text\": \"one\"}}\n{bad}\n{{\"text\": \"three\"}}\n"),
        )
        .unwrap();
        let out = dir.path().join("out");
        let prefix = out.join("ds");
        let t = Instant::now();
        let o = preprocess(&input, &prefix, &["--append-eod"]);
        let m = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {m}");
        assert!(t.elapsed() < Duration::from_secs(60), "{name}: slow");
        let at = format!("{}:2: ", input.display());
        assert!(
            m.contains(&at) && m.contains(reason) && m.contains("--skip-bad-lines"),
            "{name}: expected {at}…{reason} in {m}"
        );
        assert!(
            contents(&out).is_empty(),
            "{name}: left {:?}",
            contents(&out)
        );

        let o = preprocess(&input, &prefix, &["--append-eod", "--skip-bad-lines"]);
        let m = text(&o);
        assert!(o.status.success(), "{name}: {m}");
        assert!(
            m.contains("read 2 documents from 1 file; skipped 1 bad line"),
            "{name}: {m}"
        );
    }
}

/// A copy of a fixture dataset, its files changed by `edit` (on the .idx, then the .bin).
fn corrupt(
    dir: &Path,
    golden: &str,
    edit_idx: impl Fn(&mut Vec<u8>),
    edit_bin: impl Fn(&mut Vec<u8>),
) -> PathBuf {
    let src = data().join(format!("indexed/{golden}_text_document"));
    let p = dir.join("in/bad_text_document");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let mut idx = std::fs::read(src.with_extension("idx")).unwrap();
    let mut bin = std::fs::read(src.with_extension("bin")).unwrap();
    edit_idx(&mut idx);
    edit_bin(&mut bin);
    std::fs::write(p.with_extension("idx"), idx).unwrap();
    std::fs::write(p.with_extension("bin"), bin).unwrap();
    p
}

fn merge(input: &Path, output: &Path) -> Output {
    bridgeflow()
        .arg("merge")
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap()
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn float_or_inconsistent_indexed_datasets_are_refused() {
    let none = |_: &mut Vec<u8>| {};
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    /// (name, golden dataset, edit of its .idx, edit of its .bin, the file named, what the error says).
    type Case<'a> = (&'a str, &'a str, Edit, Edit, &'a str, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (
            "float32 tokens",
            "edge_syntax_bpe8k",
            Box::new(|i| i[17] = 7),
            Box::new(none),
            "idx",
            &["dtype code 7 is float32", "must be an integer type"],
        ),
        (
            "float64 tokens",
            "edge_syntax_bpe8k",
            Box::new(|i| i[17] = 6),
            Box::new(none),
            "idx",
            &["dtype code 6 is float64"],
        ),
        (
            "unknown dtype",
            "edge_syntax_bpe8k",
            Box::new(|i| i[17] = 9),
            Box::new(none),
            "idx",
            &["unknown dtype code 9"],
        ),
        (
            "version",
            "edge_syntax_bpe8k",
            Box::new(|i| put_u64(i, 9, 3)),
            Box::new(none),
            "idx",
            &["index version 3"],
        ),
        (
            "sequence count beyond any file",
            "edge_syntax_bpe8k",
            Box::new(|i| put_u64(i, 18, u64::MAX / 4)),
            Box::new(none),
            "idx",
            &["more than any file holds"],
        ),
        (
            "document count beyond the file",
            "edge_syntax_bpe8k",
            Box::new(|i| put_u64(i, 26, 1 << 40)),
            Box::new(none),
            "idx",
            &["document entries need"],
        ),
        (
            "last document index short of the sequences",
            "edge_syntax_bpe8k",
            Box::new(|i| {
                let n = i.len();
                let last = u64::from_le_bytes(i[n - 8..].try_into().unwrap());
                put_u64(i, n - 8, last - 1);
            }),
            Box::new(none),
            "idx",
            &["document index"],
        ),
        (
            "pointer off its lengths",
            "edge_syntax_bpe8k",
            Box::new(|i| {
                let seqs = u64::from_le_bytes(i[18..26].try_into().unwrap()) as usize;
                let at = 34 + 4 * seqs + 8;
                put_u64(i, at, 1);
            }),
            Box::new(none),
            "idx",
            &["pointer 1 is 1"],
        ),
        (
            "bin shorter than the index",
            "edge_syntax_bpe8k",
            Box::new(none),
            Box::new(|b| b.truncate(b.len() - 2)),
            "bin",
            &["but its index describes"],
        ),
        (
            "negative int32 token id",
            "head500_bpe65500bos",
            Box::new(none),
            Box::new(|b| b[4..8].copy_from_slice(&(-5i32).to_le_bytes())),
            "bin",
            &["sequence 0, token 1: -5 is not a token id"],
        ),
    ];
    for (name, golden, edit_idx, edit_bin, file, want) in cases {
        let dir = tempdir();
        let input = corrupt(dir.path(), golden, edit_idx, edit_bin);
        let out = dir.path().join("out");
        let o = merge(&input, &out.join("merged"));
        let m = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {m}");
        let named = format!("{}.{file}: ", input.display());
        assert!(m.contains(&named), "{name}: expected {named} in {m}");
        for w in want {
            assert!(m.contains(w), "{name}: expected {w} in {m}");
        }
        assert!(
            contents(&out).is_empty(),
            "{name}: left {:?}",
            contents(&out)
        );
    }
    // The untouched datasets still merge to their own bytes.
    for golden in ["edge_syntax_bpe8k", "head500_bpe65500bos"] {
        let dir = tempdir();
        let input = corrupt(dir.path(), golden, none, none);
        let out = dir.path().join("copy");
        let o = merge(&input, &out);
        assert!(o.status.success(), "{golden}: {}", text(&o));
        for ext in ["bin", "idx"] {
            let src = data().join(format!("indexed/{golden}_text_document.{ext}"));
            assert!(std::fs::read(out.with_extension(ext)).unwrap() == std::fs::read(src).unwrap());
        }
    }
}

fn run_cli(pipeline: &str, sets: &[String]) -> Output {
    let mut c = bridgeflow();
    c.arg("run").arg(workspace_root().join(pipeline));
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.arg("--no-progress").output().unwrap()
}

#[test]
fn untrusted_sizes_are_refused_with_option_and_range() {
    let corpus = data().join("corpus/corpus.jsonl");
    let sft_input = data().join("sft/input/training.jsonl");
    let tokenizer = data().join("tokenizer/bpe8k");
    // SFT packing: a pack size of ten billion once aborted on a 240 GB allocation.
    for (set, want) in [
        (
            "pack_size=9999999999",
            "pack_size is 9999999999; allowed: 1 to 16777216 tokens",
        ),
        ("pack_size=0", "pack_size is 0; allowed: 1 to 16777216"),
        (
            "pack.max_seq_length=99999999999",
            "max_seq_length is 99999999999; allowed: 0 to 16777216",
        ),
        (
            "pad_seq_to_mult=100000",
            "pad_seq_to_mult is 100000; allowed: 1 to max_seq_length (512)",
        ),
        (
            "tokenize.workers=100000",
            "workers is 100000; allowed: 0 (all cores) to 1024",
        ),
        (
            "read.batch_rows=99999999999",
            "batch_rows is 99999999999; allowed: 0 to 1048576",
        ),
    ] {
        let dir = tempdir();
        let out = dir.path().join("out");
        let t = Instant::now();
        let o = run_cli(
            "pipelines/sft-pack.toml",
            &[
                format!("input={}", sft_input.display()),
                format!("tokenizer={}", tokenizer.display()),
                format!("output={}", out.join("training_512.idx.parquet").display()),
                set.to_string(),
            ],
        );
        let m = text(&o);
        // 2: refused when the pipeline is validated; never a signal.
        assert!(matches!(o.status.code(), Some(1 | 2)), "{set}: {m}");
        assert!(m.contains(want), "{set}: expected {want} in {m}");
        assert!(t.elapsed() < Duration::from_secs(60), "{set}: slow");
        assert!(
            contents(&out).is_empty(),
            "{set}: left {:?}",
            contents(&out)
        );
    }
    // preprocess: a hundred thousand threads, or a hundred thousand passes over the input.
    for (flag, want) in [
        (
            ["--workers", "100000"],
            "--workers is 100000; allowed: 0 (all cores) to 1024",
        ),
        (
            ["--partitions", "100000"],
            "--partitions is 100000; allowed: 1 to 1024",
        ),
    ] {
        let dir = tempdir();
        let out = dir.path().join("out");
        let t = Instant::now();
        let o = preprocess(&corpus, &out.join("ds"), &flag);
        let m = text(&o);
        // 2: refused when the pipeline is validated; never a signal.
        assert!(matches!(o.status.code(), Some(1 | 2)), "{flag:?}: {m}");
        assert!(m.contains(want), "{flag:?}: expected {want} in {m}");
        assert!(t.elapsed() < Duration::from_secs(60), "{flag:?}: slow");
        assert!(
            contents(&out).is_empty(),
            "{flag:?}: left {:?}",
            contents(&out)
        );
    }
    // The same options within range still work (and give the fixture's bytes).
    let dir = tempdir();
    let prefix = dir.path().join("ok");
    let head: String = std::fs::read_to_string(&corpus)
        .unwrap()
        .lines()
        .take(50)
        .map(|l| format!("{l}\n"))
        .collect();
    let input = dir.path().join("head50.jsonl");
    std::fs::write(&input, head).unwrap();
    let o = preprocess(&input, &prefix, &["--workers", "1024"]);
    assert!(o.status.success(), "{}", text(&o));
    let one = dir.path().join("one");
    let o = preprocess(&input, &one, &["--workers", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(dataset(&prefix) == dataset(&one));
    let parts = dir.path().join("parts");
    let o = preprocess(&input, &parts, &["--partitions", "4"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("50 documents"), "{}", text(&o));
}

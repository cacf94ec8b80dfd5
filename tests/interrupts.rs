//! Signals, kills and concurrent writers, through the `bridgeflow` binary: the commit point
//! (an interrupt after it does not fail the run), SIGTERM/SIGHUP handled like Ctrl-C, staging of
//! dead processes removed by the next run and by `bridgeflow clean`, one writer per output.

use bridgeflow_sdk::fsutil::OutputClaim;
use bridgeflow_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn llama() -> PathBuf {
    fixtures().join("hf/llama")
}

fn write_pipeline(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The tiny Llama copied to `out` by the safetensors reader and writer.
fn copy_pipeline(dir: &Path, out: &Path) -> PathBuf {
    let text = read_write(
        "safetensors",
        &path_cfg(&llama()),
        "safetensors",
        &path_cfg(out),
    );
    write_pipeline(dir, "copy.toml", &text)
}

/// `count` generated tensors, each held `delay_ms` on the way, written to `out` (safetensors).
fn slow_pipeline(dir: &Path, out: &Path, count: usize, delay_ms: u64) -> PathBuf {
    let text = chain(&[
        (
            "gen",
            "testkit",
            "reader",
            &format!("count = {count}, elements = 4096"),
        ),
        (
            "slow",
            "testkit",
            "transform",
            &format!("after = 1000000, delay_ms = {delay_ms}"),
        ),
        ("write", "safetensors", "writer", &path_cfg(out)),
    ]);
    write_pipeline(dir, &format!("slow-{count}-{delay_ms}.toml"), &text)
}

fn run(pipeline: &Path) -> Output {
    bridgeflow()
        .arg("run")
        .arg(pipeline)
        .arg("--no-progress")
        .output()
        .unwrap()
}

fn spawn_run(pipeline: &Path) -> Child {
    bridgeflow()
        .arg("run")
        .arg(pipeline)
        .arg("--no-progress")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(60), "waited for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of a process that has exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// Hidden names in `dir`: staging, moved-aside outputs, lock files.
fn hidden(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    v.sort();
    v
}

fn assert_copy_of_llama(out: &Path) {
    assert_eq!(
        load_tensors(&out.join("model.safetensors")),
        load_tensors(&llama().join("model.safetensors"))
    );
    assert!(out.join("config.json").is_file());
}

#[test]
fn stale_staging_of_a_dead_process_is_removed_by_the_next_run_and_by_clean() {
    let dir = tempdir();
    let d = dir.path();
    let out = d.join("out");
    let dead = dead_pid();
    // What a kill -9 leaves: a full-size staging folder and the lock file with its pid.
    let stale = d.join(format!(".out.partial-{dead}"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join(".out.lock"), format!("{dead}\n")).unwrap();
    let o = run(&copy_pipeline(d, &out));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("removed {}", stale.display())),
        "{}",
        text(&o)
    );
    assert!(hidden(d).is_empty(), "{:?}", hidden(d));
    assert_copy_of_llama(&out);

    // `bridgeflow clean OUTPUT`: the dead pid's staging goes, a live pid's is refused.
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"x").unwrap();
    let live = d.join(format!(".out.partial-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    let other = d.join(format!(".data_text_document.idx.lengths_partial-{dead}"));
    std::fs::write(&other, b"x").unwrap();
    let o = bridgeflow().arg("clean").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stdout.contains(&format!("removed {}", stale.display())),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("refusing to remove {}", live.display()))
            && stderr.contains(&format!("pid {} is running", std::process::id())),
        "{stderr}"
    );
    assert!(!stale.exists() && live.exists() && other.exists());
    assert_copy_of_llama(&out);

    // `bridgeflow clean FOLDER`: every output's stale staging in it.
    std::fs::remove_dir(&live).unwrap();
    let o = bridgeflow().arg("clean").arg(d).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("removed {}", other.display())),
        "{}",
        text(&o)
    );
    assert!(!other.exists());
    let o = bridgeflow().arg("clean").arg(d).output().unwrap();
    assert!(o.status.success() && text(&o).contains("nothing to clean"));
    let o = bridgeflow().args(["clean", "--help"]).output().unwrap();
    assert!(o.status.success() && text(&o).contains("Usage: bridgeflow clean"));
}

#[test]
fn a_second_writer_of_the_same_output_fails_at_once_naming_the_first() {
    let dir = tempdir();
    let d = dir.path();
    let out = d.join("out");
    let me = std::process::id();
    // The lock held by this process, as a first writer would hold it.
    let claim = OutputClaim::claim(&out).unwrap();
    let o = run(&copy_pipeline(d, &out));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let m = text(&o);
    assert!(
        m.contains("output busy") && m.contains(&format!("pid {me}")),
        "{m}"
    );
    assert!(m.contains(&out.display().to_string()), "{m}");
    assert!(!out.exists());
    drop(claim);
    assert!(run(&copy_pipeline(d, &out)).status.success());

    // A run in progress: a second one on its output fails while the first goes on to succeed.
    let out2 = d.join("out2");
    let mut first = spawn_run(&slow_pipeline(d, &out2, 60, 40));
    let lock = d.join(".out2.lock");
    wait_for("the first run's lock", || lock.exists());
    let started = Instant::now();
    let o = run(&slow_pipeline(d, &out2, 3, 0));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("pid {}", first.id())),
        "{}",
        text(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let st = first.wait().unwrap();
    assert!(st.success());
    assert_eq!(load_tensors(&out2.join("model.safetensors")).len(), 60);
    assert!(!lock.exists(), "the lock file goes when the writer is done");

    // Datasets alike: the .bin of a preprocess output held.
    let prefix = d.join("corpus");
    let held = OutputClaim::claim(&d.join("corpus_text_document.bin")).unwrap();
    let o = bridgeflow()
        .arg("preprocess")
        .arg("--input")
        .arg(fixtures().join("data/corpus/corpus.jsonl"))
        .arg("--tokenizer")
        .arg(fixtures().join("data/tokenizer/bpe8k"))
        .arg("--output-prefix")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("output busy") && text(&o).contains(&format!("pid {me}")),
        "{}",
        text(&o)
    );
    drop(held);
    assert!(!d.join("corpus_text_document.idx").exists());
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
}

#[test]
fn sigterm_and_sighup_stop_a_run_like_ctrl_c() {
    let dir = tempdir();
    let d = dir.path();
    let out = d.join("out");
    let slow = slow_pipeline(d, &out, 300, 20);
    for sig in ["TERM", "HUP", "INT"] {
        let child = spawn_run(&slow);
        let staging = d.join(format!(".out.partial-{}", child.id()));
        wait_for("the staging folder", || staging.exists());
        std::thread::sleep(Duration::from_millis(300));
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{sig}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("interrupted (SIG{sig})")),
            "{sig}: {}",
            text(&o)
        );
        assert!(!out.exists(), "{sig}");
        assert!(hidden(d).is_empty(), "{sig}: {:?}", hidden(d));
    }
    let o = run(&slow_pipeline(d, &out, 5, 0));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(load_tensors(&out.join("model.safetensors")).len(), 5);
}

#[test]
fn after_kill_9_the_next_run_removes_the_leftovers() {
    let dir = tempdir();
    let d = dir.path();
    let out = d.join("out");
    let mut child = spawn_run(&slow_pipeline(d, &out, 300, 20));
    let staging = d.join(format!(".out.partial-{}", child.id()));
    wait_for("the staging folder", || staging.exists());
    signal(&child, "KILL");
    child.wait().unwrap();
    assert!(staging.exists() && d.join(".out.lock").exists());
    assert!(!out.exists());
    let o = run(&slow_pipeline(d, &out, 5, 0));
    assert!(o.status.success(), "{}", text(&o));
    assert!(!staging.exists());
    assert!(hidden(d).is_empty(), "{:?}", hidden(d));
}

/// `BRIDGEFLOW_TEST_SIGNAL_AT_COMMIT` has the run send itself SIGTERM exactly at a writer's
/// commit point: just before it (the run fails, nothing is committed) or just after it (the run
/// completes and succeeds).
#[test]
fn an_interrupt_after_the_commit_point_does_not_fail_the_run() {
    let dir = tempdir();
    let d = dir.path();
    let at_commit = |when: &str, args: &[&std::ffi::OsStr]| {
        bridgeflow()
            .env("BRIDGEFLOW_TEST_SIGNAL_AT_COMMIT", when)
            .args(args)
            .output()
            .unwrap()
    };
    // safetensors
    let out = d.join("st");
    let p = copy_pipeline(d, &out);
    let o = at_commit("before", &["run".as_ref(), p.as_os_str()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("interrupted (SIGTERM)"), "{}", text(&o));
    assert!(!out.exists());
    assert!(hidden(d).is_empty(), "{:?}", hidden(d));
    let o = at_commit("after", &["run".as_ref(), p.as_os_str()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("SIGTERM arrived after the commit point"),
        "{}",
        text(&o)
    );
    assert_copy_of_llama(&out);
    assert!(hidden(d).is_empty(), "{:?}", hidden(d));
    // A rerun finds the complete output, as it should.
    let o = run(&p);
    assert!(text(&o).contains("already exists"), "{}", text(&o));

    // torch_dist, through `convert`
    let ckpt = d.join("ckpt");
    let from = format!("hf:{}", llama().display());
    let to = format!("megatron:{}", ckpt.display());
    let args = [
        "convert".as_ref(),
        "--from".as_ref(),
        from.as_ref(),
        "--to".as_ref(),
        to.as_ref(),
    ];
    let o = at_commit("before", &args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!ckpt.exists());
    let o = at_commit("after", &args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(ckpt.join("latest_checkpointed_iteration.txt").is_file());

    // Megatron indexed datasets (two files per key, renamed one after the other)
    let prefix = d.join("corpus");
    let tok = fixtures().join("data/tokenizer/bpe8k");
    let corpus = fixtures().join("data/corpus/corpus.jsonl");
    let args = [
        "preprocess".as_ref(),
        "--input".as_ref(),
        corpus.as_os_str(),
        "--tokenizer".as_ref(),
        tok.as_os_str(),
        "--output-prefix".as_ref(),
        prefix.as_os_str(),
    ];
    let o = at_commit("before", &args);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(!d.join("corpus_text_document.bin").exists());
    let o = at_commit("after", &args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.join("corpus_text_document.idx").is_file());
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
    assert!(hidden(d).is_empty(), "{:?}", hidden(d));
}

//! The short fuzz run CI does: every target, its seeds and a fixed number of mutations with a
//! fixed seed (failures reproduce with `cargo run --release -p bridgeflow-fuzz -- <target>
//! --iterations N --seed 1`). A panic, a hang (> 2 s) or an allocation over 1 GiB fails it.
//!
//! `BRIDGEFLOW_FUZZ_ITERATIONS` changes the number of mutations per target.

use bridgeflow_fuzz::harness::{self, Options};
use bridgeflow_fuzz::targets;

fn iterations(default: u64) -> u64 {
    std::env::var("BRIDGEFLOW_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn short(name: &str, default: u64) {
    let t = targets::find(name).expect("a target");
    let opts = Options {
        iterations: iterations(default),
        seed: 1,
        ..Default::default()
    };
    let st = harness::run(&t, &opts);
    println!("{}", st.line());
    let report: Vec<String> = st
        .findings
        .iter()
        .map(|f| {
            format!(
                "[{}] {}: {}\n  input ({} bytes): {}\n  saved: {}",
                f.target,
                f.kind,
                f.message,
                f.input.len(),
                f.hex(512),
                f.saved
                    .as_ref()
                    .map_or("-".into(), |p| p.display().to_string())
            )
        })
        .collect();
    assert!(
        report.is_empty(),
        "{} finding(s):\n{}",
        report.len(),
        report.join("\n")
    );
    assert!(st.execs as usize >= st.seeds, "{}: seeds not all run", name);
}

#[test]
fn safetensors() {
    short("safetensors", 26000);
}
#[test]
fn pickle() {
    short("pickle", 12000);
}
#[test]
fn dcp_metadata() {
    short("dcp-metadata", 2000);
}
#[test]
fn torch_item() {
    short("torch-item", 26000);
}
#[test]
fn megatron_lm() {
    short("megatron-lm", 6000);
}
#[test]
fn indexed_idx() {
    short("indexed-idx", 26000);
}
#[test]
fn run_config_yaml() {
    short("run-config-yaml", 3000);
}
#[test]
fn jsonl() {
    short("jsonl", 26000);
}
#[test]
fn pipeline_toml() {
    short("pipeline-toml", 12000);
}

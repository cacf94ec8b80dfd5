//! What trainers and exporters need from the runtime, proven with the test plugin alone (no
//! core change): a stage that retains its inputs, a stage with two output ports addressed as
//! `stage.port`, structured metrics in the run report, and a `convert --to fake:` endpoint.

use bridgeflow_tests::{
    bridgeflow, fixtures, load_tensors, run_text, tempdir, text, validate_text,
};

const MIB: u64 = 1 << 20;

/// gen → keep (retains everything) → keep.weights into a tensor sink, keep.metrics into a
/// record sink.
fn keep_pipeline(count: usize, elements: usize) -> String {
    format!(
        r#"
[stages.gen]
plugin = "testkit"
kind = "reader"
config = {{ count = {count}, elements = {elements} }}

[stages.keep]
plugin = "testkit-state"
kind = "trainer"
inputs = ["gen"]

[stages.weights]
plugin = "testkit"
kind = "writer"
inputs = ["keep.weights"]
config = {{ delay_ms = 0 }}

[stages.metrics]
plugin = "testkit-records"
kind = "writer"
inputs = ["keep.metrics"]
"#
    )
}

/// A gigabyte retained under a 256 MiB budget: no overdraft (no warning), retained bytes in the
/// report, the budget still bounding what is in flight, every tensor out on `weights` and one
/// row each on `metrics`.
#[test]
fn a_stage_retaining_a_gigabyte_under_a_256_mib_budget() {
    let dir = tempdir();
    let file = dir.path().join("keep.toml");
    // 64 tensors of 16 MiB.
    std::fs::write(&file, keep_pipeline(64, 4 << 20)).unwrap();
    let report = dir.path().join("report.json");
    let o = bridgeflow()
        .args([
            "run",
            "--no-progress",
            "--memory-budget",
            "256MiB",
            "--report",
        ])
        .arg(&report)
        .arg(&file)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!t.contains("over the memory budget"), "{t}");
    assert!(t.contains("retained by stateful stages: 1.00 GiB"), "{t}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    assert_eq!(r["overdrafts"], 0, "{r}");
    assert_eq!(r["peak_retained"].as_u64(), Some(1 << 30), "{r}");
    assert!(r["peak_in_flight"].as_u64().unwrap() <= 256 * MIB, "{r}");
    let stage = |name: &str| {
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(stage("keep")["metrics"]["kept_bytes"], 1u64 << 30);
    assert_eq!(stage("keep")["metrics"]["kept_tensors"], 64);
    assert_eq!(
        stage("weights")["summary"],
        format!("received 64 tensors, {} bytes", 1u64 << 30)
    );
    assert_eq!(stage("metrics")["summary"], "rows=64 id_sum=2016");
}

/// The same hold in process under a 2 MiB budget, declared and not: declared, nothing waits
/// and nothing is over budget; undeclared, it is what the budget exists to catch — the source
/// is held back until the runtime breaks the stall with an overdraft.
#[test]
fn retaining_undeclared_is_an_overdraft() {
    let dir = tempdir();
    let declared = keep_pipeline(8, 1 << 18);
    let r = run_text(dir.path(), &declared, &[], 2 * MIB).unwrap();
    assert_eq!((r.overdrafts, r.peak_retained), (0, 8 * MIB), "{r:?}");
    assert!(r.peak_in_flight <= 2 * MIB, "{r:?}");
    let undeclared = declared.replace("kind = \"trainer\"", "kind = \"transform\"");
    let r = run_text(dir.path(), &undeclared, &[], 2 * MIB).unwrap();
    assert!(r.overdrafts >= 1 && r.peak_retained == 0, "{r:?}");
    assert!(r.peak_in_flight >= 8 * MIB, "{r:?}");
}

#[test]
fn ports_are_addressed_and_type_checked() {
    let dir = tempdir();
    let good = keep_pipeline(2, 4);
    assert_eq!(validate_text(dir.path(), &good), "valid");
    // An unknown port is named with the ones there are.
    let t = validate_text(dir.path(), &good.replace("keep.metrics", "keep.loss"));
    assert!(
        t.contains("input 'keep.loss': no output port 'loss' (it has: weights, metrics)"),
        "{t}"
    );
    // Records into a tensor sink, named by port.
    let t = validate_text(
        dir.path(),
        &good.replace("inputs = [\"keep.weights\"]", "inputs = [\"keep.metrics\"]"),
    );
    assert!(
        t.contains(
            "port type mismatch: input 0 expects tensors, but 'keep.metrics' outputs records"
        ),
        "{t}"
    );
    // A bare stage name is its first port: weights, tensors.
    let t = validate_text(
        dir.path(),
        &good.replace("inputs = [\"keep.weights\"]", "inputs = [\"keep\"]"),
    );
    assert_eq!(t, "valid");
    // `validate` lists edges by port.
    std::fs::write(dir.path().join("k.toml"), &good).unwrap();
    let o = bridgeflow()
        .arg("validate")
        .arg(dir.path().join("k.toml"))
        .output()
        .unwrap();
    assert!(text(&o).contains("<- keep.metrics"), "{}", text(&o));
}

/// `convert --to fake:` from HF (same naming: reader into writer) and from torch_dist (through
/// the mapper's declared translation), with no core change; options nothing takes are refused.
#[test]
fn a_plugin_adds_a_convert_endpoint() {
    let dir = tempdir();
    let fx = fixtures().join("hf/llama");
    let out = dir.path().join("list.txt");
    let convert = |from: String, to: &std::path::Path, extra: &[&str]| {
        bridgeflow()
            .args(["convert", "--no-progress", "--from"])
            .arg(from)
            .arg("--to")
            .arg(format!("fake:{}", to.display()))
            .args(extra)
            .output()
            .unwrap()
    };
    let o = convert(format!("hf:{}", fx.display()), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let listed = std::fs::read_to_string(&out).unwrap();
    let names: Vec<&str> = listed
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let want: Vec<String> = load_tensors(&fx.join("model.safetensors"))
        .into_keys()
        .collect();
    assert_eq!(names, want);
    assert!(text(&o).contains("listed 21 tensors"), "{}", text(&o));

    // torch_dist → fake: the mapper translates megatron names to HF ones on the way.
    let out2 = dir.path().join("from-megatron.txt");
    let o = convert(
        format!("megatron:{}", fixtures().join("bridge/llama").display()),
        &out2,
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&out2).unwrap(), listed);

    // Options the chain does not take, and unknown schemes, are named.
    let o = convert(
        format!("hf:{}", fx.display()),
        &dir.path().join("x"),
        &["--tp=2"],
    );
    assert!(
        !o.status.success() && text(&o).contains("--tp does not apply"),
        "{}",
        text(&o)
    );
    let o = convert(format!("nope:{}", fx.display()), &dir.path().join("y"), &[]);
    assert!(
        !o.status.success() && text(&o).contains("no reader plugin serves 'nope:'"),
        "{}",
        text(&o)
    );
    // `--overwrite` reaches the writer through its declaration.
    let o = convert(format!("hf:{}", fx.display()), &out, &[]);
    assert!(
        !o.status.success() && text(&o).contains("exists"),
        "{}",
        text(&o)
    );
    let o = convert(format!("hf:{}", fx.display()), &out, &["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));

    // The scheme is listed with the plugins.
    let o = bridgeflow().args(["plugins", "--json"]).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fake = j["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "testkit-state")
        .unwrap();
    assert!(
        fake["stages"].to_string().contains("\"scheme\":\"fake\""),
        "{fake}"
    );
}

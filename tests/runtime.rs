//! The runtime under load and failure: backpressure under a memory budget, errors mid-stream,
//! panics in plugins, fan-out, and record batches crossing plugins.

use bridgeflow_tests::{fixtures, leftovers, run_text, tempdir};

const MIB: u64 = 1 << 20;

fn gen_to_slow(count: usize, elements: usize, delay_ms: u64, middle: Option<&str>) -> String {
    let mut p = format!(
        r#"
[stages.gen]
plugin = "testkit"
kind = "reader"
config = {{ count = {count}, elements = {elements} }}
"#
    );
    let upstream = match middle {
        Some(m) => {
            p.push_str(&format!("\n[stages.mid]\n{m}\ninputs = [\"gen\"]\n"));
            "mid"
        }
        None => "gen",
    };
    p.push_str(&format!(
        r#"
[stages.sink]
plugin = "testkit"
kind = "writer"
inputs = ["{upstream}"]
config = {{ delay_ms = {delay_ms} }}
"#
    ));
    p
}

#[test]
fn slow_sink_keeps_bytes_in_flight_under_budget() {
    let dir = tempdir();
    // 40 tensors of 1 MiB against a 4 MiB budget and a sink that takes 5 ms per tensor.
    let budget = 4 * MIB;
    let r = run_text(dir.path(), &gen_to_slow(40, 1 << 18, 5, None), &[], budget).unwrap();
    assert!(
        r.peak_in_flight <= budget,
        "peak {} > budget {budget}",
        r.peak_in_flight
    );
    assert!(
        r.peak_in_flight >= MIB,
        "the count saw the data: {}",
        r.peak_in_flight
    );
    let sink = r.stages.iter().find(|s| s.name == "sink").unwrap();
    assert_eq!(
        sink.summary,
        format!("received 40 tensors, {} bytes", 40 * MIB)
    );
}

#[test]
fn budget_holds_through_a_pass_through_transform() {
    let dir = tempdir();
    let budget = 3 * MIB;
    let mid = "plugin = \"rename\"\nkind = \"transform\"\nconfig = { rules = [{ pattern = \"^t\", replace = \"u\" }] }";
    let r = run_text(
        dir.path(),
        &gen_to_slow(30, 1 << 18, 3, Some(mid)),
        &[],
        budget,
    )
    .unwrap();
    assert!(r.peak_in_flight <= budget, "peak {}", r.peak_in_flight);
    assert_eq!(r.stages.last().unwrap().items_in, 30);
}

#[test]
fn transforms_that_allocate_overshoot_by_at_most_one_output() {
    let dir = tempdir();
    let budget = 3 * MIB;
    let mid = "plugin = \"cast\"\nkind = \"transform\"\nconfig = { to = \"bf16\" }";
    let r = run_text(
        dir.path(),
        &gen_to_slow(30, 1 << 18, 3, Some(mid)),
        &[],
        budget,
    )
    .unwrap();
    // Sources wait for room; a transform's new buffer is counted without waiting.
    assert!(
        r.peak_in_flight <= budget + MIB / 2,
        "peak {}",
        r.peak_in_flight
    );
    let sink = r.stages.last().unwrap();
    assert_eq!(sink.bytes_in, 30 * MIB / 2, "bf16 is half of f32");
}

#[test]
fn a_tensor_larger_than_the_budget_still_passes_alone() {
    let dir = tempdir();
    let r = run_text(dir.path(), &gen_to_slow(3, 1 << 20, 0, None), &[], MIB).unwrap();
    assert_eq!(r.peak_in_flight, 4 * MIB, "one 4 MiB tensor at a time");
}

#[test]
fn failing_stage_is_named_and_the_writer_leaves_nothing() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let p = format!(
        r#"
[stages.read]
plugin = "safetensors"
kind = "reader"
config = {{ path = "{}" }}

[stages.boom]
plugin = "testkit"
kind = "transform"
inputs = ["read"]
config = {{ after = 5 }}

[stages.write]
plugin = "safetensors"
kind = "writer"
inputs = ["boom"]
config = {{ path = "{}" }}
"#,
        fixtures().join("hf/llama").display(),
        out.display()
    );
    let e = run_text(dir.path(), &p, &[], 64 * MIB).unwrap_err();
    assert!(
        e.starts_with(
            "stage 'boom' (testkit transform) failed: format error: testkit fails on tensor"
        ),
        "{e}"
    );
    assert!(!out.exists(), "no output after a failed run");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn a_panicking_plugin_is_an_error_not_a_crash() {
    let dir = tempdir();
    let mid = "plugin = \"testkit\"\nkind = \"transform\"\nconfig = { after = 2, panic = true }";
    let e = run_text(dir.path(), &gen_to_slow(5, 16, 0, Some(mid)), &[], MIB).unwrap_err();
    assert!(e.contains("stage 'mid'"), "{e}");
    assert!(
        e.contains("plugin panicked: testkit panics on tensor 't.00002'"),
        "{e}"
    );
}

#[test]
fn fan_out_feeds_every_consumer() {
    let dir = tempdir();
    let p = r#"
[stages.gen]
plugin = "testkit"
kind = "reader"
config = { count = 20, elements = 1024 }

[stages.a]
plugin = "testkit"
kind = "writer"
inputs = ["gen"]
config = { delay_ms = 1 }

[stages.cast]
plugin = "cast"
kind = "transform"
inputs = ["gen"]
config = { to = "f16" }

[stages.b]
plugin = "testkit"
kind = "writer"
inputs = ["cast"]
config = { delay_ms = 0 }
"#;
    let r = run_text(dir.path(), p, &[], MIB).unwrap();
    let get = |n: &str| {
        r.stages
            .iter()
            .find(|s| s.name == n)
            .unwrap()
            .summary
            .clone()
    };
    assert_eq!(get("a"), "received 20 tensors, 81920 bytes");
    assert_eq!(get("b"), "received 20 tensors, 40960 bytes");
}

#[test]
fn record_batches_cross_plugins_and_fan_out() {
    let dir = tempdir();
    let p = r#"
[stages.rows]
plugin = "testkit-records"
kind = "reader"
config = { batches = 7, rows = 100 }

[stages.count1]
plugin = "testkit-records"
kind = "writer"
inputs = ["rows"]
config = {}

[stages.count2]
plugin = "testkit-records"
kind = "writer"
inputs = ["rows"]
config = {}
"#;
    let r = run_text(dir.path(), p, &[], MIB).unwrap();
    let sum: i64 = (0..700).sum();
    for s in r.stages.iter().filter(|s| s.name.starts_with("count")) {
        assert_eq!(s.summary, format!("rows=700 id_sum={sum}"));
    }
}

#[test]
fn plan_errors_name_the_stage() {
    let dir = tempdir();
    let p = r#"
[stages.read]
plugin = "safetensors"
kind = "reader"
config = { path = "/nonexistent/model" }

[stages.sink]
plugin = "testkit"
kind = "writer"
inputs = ["read"]
config = { delay_ms = 0 }
"#;
    let e = run_text(dir.path(), p, &[], MIB).unwrap_err();
    assert!(
        e.contains(
            "stage 'read' (safetensors reader) failed: io error: cannot read /nonexistent/model"
        ),
        "{e}"
    );
}

#[test]
fn a_stage_waiting_on_two_sources_cannot_deadlock_the_budget() {
    // verify holds each tensor of one stream until the other stream's copy arrives; with a budget
    // of one tensor the second source could never get room. The runtime notices that nothing
    // can progress and admits it over budget instead of hanging.
    let dir = tempdir();
    let p = r#"
[stages.a]
plugin = "testkit"
kind = "reader"
config = { count = 6, elements = 65536 }

[stages.b]
plugin = "testkit"
kind = "reader"
config = { count = 6, elements = 65536 }

[stages.check]
plugin = "verify"
kind = "transform"
inputs = ["a", "b"]
config = {}
"#;
    let r = run_text(dir.path(), p, &[], 256 * 1024).unwrap();
    assert!(r.overdrafts >= 1, "{r:?}");
    assert_eq!(
        r.stages
            .iter()
            .find(|s| s.name == "check")
            .unwrap()
            .items_in,
        12
    );
}

//! Every validation error is reported before anything runs, with file, stage and line.

use bridgeflow_tests::{tempdir, validate_text};

const OK: &str = r#"
[stages.read]
plugin = "safetensors"
kind = "reader"
config = { path = "x" }

[stages.write]
plugin = "safetensors"
kind = "writer"
inputs = ["read"]
config = { path = "y" }
"#;

fn check(pipeline: &str, expected: &[&str]) {
    let dir = tempdir();
    let msg = validate_text(dir.path(), pipeline);
    for e in expected {
        assert!(msg.contains(e), "expected {e:?} in:\n{msg}");
    }
}

#[test]
fn a_valid_pipeline_validates() {
    check(OK, &["valid"]);
}

#[test]
fn unknown_plugin() {
    check(
        &OK.replace(
            "plugin = \"safetensors\"\nkind = \"reader\"",
            "plugin = \"nosuch\"\nkind = \"reader\"",
        ),
        &[
            "p.toml:2: stage 'read': unknown plugin 'nosuch' (available: ",
            "safetensors",
        ],
    );
}

#[test]
fn unknown_kind() {
    check(
        &OK.replace("kind = \"reader\"", "kind = \"reeder\""),
        &["p.toml:2: stage 'read': unknown kind 'reeder' (expected one of: reader, writer"],
    );
}

#[test]
fn plugin_without_that_kind() {
    check(
        &OK.replace(
            "plugin = \"safetensors\"\nkind = \"reader\"",
            "plugin = \"cast\"\nkind = \"reader\"",
        ),
        &["stage 'read': plugin 'cast' has no reader stage (it provides: transform)"],
    );
}

#[test]
fn unknown_input() {
    check(
        &OK.replace("inputs = [\"read\"]", "inputs = [\"ghost\"]"),
        &["p.toml:7: stage 'write': unknown input 'ghost' (stages: read, write)"],
    );
}

#[test]
fn missing_input() {
    check(
        &OK.replace("inputs = [\"read\"]\n", ""),
        &["p.toml:7: stage 'write': missing input: safetensors writer takes 1 input (tensors), 0 given"],
    );
}

#[test]
fn too_many_inputs() {
    check(
        &OK.replace(
            "kind = \"reader\"\n",
            "kind = \"reader\"\ninputs = [\"write\"]\n",
        ),
        &["stage 'read': too many inputs: safetensors reader takes 0, 1 given"],
    );
}

#[test]
fn cycle() {
    let p = r#"
[stages.read]
plugin = "safetensors"
kind = "reader"
config = { path = "x" }

[stages.a]
plugin = "cast"
kind = "transform"
inputs = ["b"]
config = { to = "bf16" }

[stages.b]
plugin = "rename"
kind = "transform"
inputs = ["a"]
config = { rules = [] }
"#;
    check(p, &["p.toml:7: stage 'a': cycle among stages: a -> b"]);
}

#[test]
fn port_type_mismatch() {
    let p = r#"
[stages.rows]
plugin = "testkit-records"
kind = "reader"
config = { batches = 1, rows = 1 }

[stages.cast]
plugin = "cast"
kind = "transform"
inputs = ["rows"]
config = { to = "bf16" }
"#;
    check(
        p,
        &["p.toml:7: stage 'cast': port type mismatch: input 0 expects tensors, but 'rows' outputs records"],
    );
}

#[test]
fn sink_used_as_input() {
    let p = format!(
        "{OK}\n[stages.more]\nplugin = \"cast\"\nkind = \"transform\"\ninputs = [\"write\"]\nconfig = {{ to = \"bf16\" }}\n"
    );
    check(
        &p,
        &["stage 'more': input 'write' is a safetensors writer and has no output"],
    );
}

#[test]
fn bad_config_unknown_field() {
    check(
        &OK.replace("config = { path = \"x\" }", "config = { pth = \"x\" }"),
        &["p.toml:2: stage 'read': bad config: unknown field `pth`, expected `path`"],
    );
}

#[test]
fn bad_config_value() {
    let p = r#"
[stages.read]
plugin = "safetensors"
kind = "reader"
config = { path = "x" }

[stages.cast]
plugin = "cast"
kind = "transform"
inputs = ["read"]
config = { to = "int8" }
"#;
    check(
        p,
        &["p.toml:7: stage 'cast': bad config: to = \"int8\": expected one of f32, f16, bf16, f64"],
    );
}

#[test]
fn bad_config_type() {
    check(
        &OK.replace(
            "config = { path = \"y\" }",
            "config = { path = \"y\", max_shard_size = \"lots\" }",
        ),
        &["stage 'write': bad config: invalid size 'lots'"],
    );
}

#[test]
fn all_problems_are_reported_together() {
    let p = OK
        .replace("kind = \"reader\"", "kind = \"reeder\"")
        .replace("inputs = [\"read\"]", "inputs = [\"ghost\"]");
    check(
        &p,
        &[
            "2 problems",
            "unknown kind 'reeder'",
            "unknown input 'ghost'",
        ],
    );
}

#[test]
fn toml_syntax_error_has_file_and_line() {
    check(
        "[stages.read]\nplugin = \"safetensors\nkind = 3\n",
        &["p.toml:2: invalid pipeline TOML"],
    );
}

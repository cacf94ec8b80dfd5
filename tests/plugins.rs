//! Plugin loading: a third-party plugin built from examples/, and plugins that must be refused.

use bridgeflow_core::host::PluginHost;
use bridgeflow_sdk::{ABI_VERSION, SDK_VERSION};
use bridgeflow_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles the stand-in for a plugin built against an older SDK (no dependencies: plain rustc).
fn old_plugin(dir: &Path) -> PathBuf {
    let src = workspace_root().join("tests/plugins/abi-mismatch/old_plugin.rs");
    let out = dir.join(format!("libold_plugin.{}", std::env::consts::DLL_EXTENSION));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let st = Command::new(rustc)
        .args(["--crate-type", "cdylib", "--edition", "2021", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

#[test]
fn abi_mismatch_is_refused_with_both_versions() {
    let dir = tempdir();
    let lib = old_plugin(dir.path());
    let host = PluginHost::discover(vec![dir.path().to_path_buf()]);
    assert!(host.plugins.is_empty());
    assert_eq!(host.refused.len(), 1);
    let reason = &host.refused[0].reason;
    assert_eq!(host.refused[0].path, lib.canonicalize().unwrap());
    assert_eq!(
        reason,
        &format!(
            "plugin built against bridgeflow-sdk 0.0.9 (ABI 0), but this bridgeflow uses bridgeflow-sdk {SDK_VERSION} (ABI {ABI_VERSION}); rebuild the plugin against bridgeflow-sdk {SDK_VERSION}"
        )
    );

    // The CLI lists it as refused and keeps working.
    let o = bridgeflow()
        .arg("plugins")
        .arg("--plugin-path")
        .arg(dir.path())
        .output()
        .unwrap();
    let m = text(&o);
    assert!(o.status.success(), "{m}");
    assert!(
        m.contains("refused") && m.contains("bridgeflow-sdk 0.0.9 (ABI 0)"),
        "{m}"
    );
    assert!(m.contains("safetensors"), "{m}");
}

#[test]
fn a_pipeline_naming_a_refused_plugin_says_why() {
    let dir = tempdir();
    old_plugin(dir.path());
    std::fs::write(
        dir.path().join("p.toml"),
        "[stages.x]\nplugin = \"old\"\nkind = \"reader\"\nconfig = {}\n",
    )
    .unwrap();
    let o = bridgeflow()
        .arg("validate")
        .arg(dir.path().join("p.toml"))
        .arg("--plugin-path")
        .arg(dir.path())
        .output()
        .unwrap();
    let m = text(&o);
    assert_eq!(o.status.code(), Some(2), "{m}");
    assert!(m.contains("unknown plugin 'old'"), "{m}");
    assert!(
        m.contains("refused libraries:") && m.contains("(ABI 0)"),
        "{m}"
    );
}

#[test]
fn a_file_that_is_not_a_library_is_refused_not_fatal() {
    let dir = tempdir();
    std::fs::write(
        dir.path()
            .join(format!("libjunk.{}", std::env::consts::DLL_EXTENSION)),
        b"not an ELF file",
    )
    .unwrap();
    let host = PluginHost::discover(vec![dir.path().to_path_buf()]);
    assert_eq!(host.refused.len(), 1);
    assert!(
        host.refused[0].reason.starts_with("cannot open library"),
        "{}",
        host.refused[0].reason
    );
}

#[test]
fn every_plugin_library_loads_separately() {
    // abi_stable's RootModule::load_from_* would cache the first library and return it for the
    // others; each library here must keep its own plugins.
    let host = host();
    let mut files = std::collections::BTreeMap::new();
    for p in &host.plugins {
        files.insert(p.name().to_string(), host.library_of(p).path.clone());
    }
    for name in ["safetensors", "cast", "verify", "scale", "testkit"] {
        assert!(files.contains_key(name), "{name} missing: {files:?}");
    }
    assert_ne!(files["safetensors"], files["cast"]);
    assert_eq!(files["cast"], files["verify"]);
    assert_ne!(files["scale"], files["cast"]);
}

#[test]
fn the_example_third_party_plugin_builds_loads_and_runs() {
    // Built as a user would build it.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "bridgeflow-example-scale"])
        .status()
        .unwrap();
    assert!(st.success());
    let lib = target_dir().join(format!(
        "libbridgeflow_example_scale.{}",
        std::env::consts::DLL_EXTENSION
    ));
    assert!(lib.is_file(), "{}", lib.display());

    let dir = tempdir();
    let out = dir.path().join("scaled");
    let o = bridgeflow()
        .args(["run", "examples/scale-plugin/scale.toml", "--set"])
        .arg(format!("output={}", out.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let src = load_tensors(&fixtures().join("hf/llama/model.safetensors"));
    let got = load_tensors(&out);
    assert_eq!(src.len(), got.len());
    let mut scaled = 0;
    for (name, s) in &src {
        let g = &got[name];
        if name.contains("norm") {
            let a: Vec<f32> = s
                .bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let b: Vec<f32> = g
                .bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x * 2.0 == *y),
                "{name} doubled"
            );
            scaled += 1;
        } else {
            assert!(s.bytes == g.bytes, "{name} untouched");
        }
    }
    assert_eq!(scaled, 5, "2 layers x 2 norms + final norm");
}

//! Helpers shared by the integration tests. Tensor files are read and written here with the
//! safetensors crate directly, independently of bridgeflow's own reader and writer.

use bridgeflow_core::host::PluginHost;
use bridgeflow_core::runtime::{run_blocking, RunOptions, RunReport};
use bridgeflow_core::Override;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod train;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The golden fixtures made by the real tools (transformers, megatron-core, Megatron-Bridge,
/// Megatron-LM): kept in the repository, `tests/fixtures/shared/README.md` says how each was
/// made.
pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures/shared")
}

/// target/<profile>, where the binary and plugin libraries are built.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    deps.parent().unwrap().to_path_buf()
}

/// Builds the whole workspace once per test binary (plugins are cdylibs that `cargo test`
/// alone does not link), so `cargo test` works on its own.
pub fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "--workspace", "--quiet"]);
        if target_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build --workspace failed");
    });
}

pub fn host() -> PluginHost {
    ensure_built();
    PluginHost::discover(vec![target_dir()])
}

pub fn bridgeflow() -> Command {
    ensure_built();
    let mut c = Command::new(target_dir().join("bridgeflow"));
    c.current_dir(workspace_root())
        .env("BRIDGEFLOW_PLUGIN_PATH", target_dir())
        .env_remove("RUST_LOG");
    c
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bridgeflow-test-")
        .tempdir()
        .unwrap()
}

/// The text of a pipeline whose stages run one after the other: each (name, plugin, kind,
/// contents of its inline config table), every stage after the first taking the one before.
pub fn chain(stages: &[(&str, &str, &str, &str)]) -> String {
    let mut text = String::new();
    let mut previous: Option<&str> = None;
    for (name, plugin, kind, config) in stages {
        text.push_str(&format!(
            "[stages.{name}]\nplugin = \"{plugin}\"\nkind = \"{kind}\"\n"
        ));
        if let Some(p) = previous {
            text.push_str(&format!("inputs = [\"{p}\"]\n"));
        }
        text.push_str(&format!("config = {{ {config} }}\n\n"));
        previous = Some(name);
    }
    text
}

/// A reader (`read`) into a writer (`write`): [`chain`] of two.
pub fn read_write(reader: &str, read_cfg: &str, writer: &str, write_cfg: &str) -> String {
    chain(&[
        ("read", reader, "reader", read_cfg),
        ("write", writer, "writer", write_cfg),
    ])
}

/// `path = "<p>"`, the config of most readers and writers.
pub fn path_cfg(p: &Path) -> String {
    format!("path = \"{}\"", p.display())
}

/// Writes a pipeline file into `dir` and runs it in-process.
pub fn run_text(
    dir: &Path,
    pipeline: &str,
    overrides: &[&str],
    budget: u64,
) -> Result<RunReport, String> {
    let file = dir.join("pipeline.toml");
    std::fs::write(&file, pipeline).unwrap();
    let overrides: Vec<Override> = overrides
        .iter()
        .map(|s| Override::parse(s).unwrap())
        .collect();
    let host = host();
    let graph =
        bridgeflow_core::load_pipeline(&file, &overrides, &host).map_err(|e| e.to_string())?;
    run_blocking(
        graph,
        RunOptions {
            memory_budget: budget,
            channel_capacity: 4,
            progress: false,
        },
    )
    .map_err(|e| e.to_string())
}

/// Validation errors of a pipeline text, as one string.
pub fn validate_text(dir: &Path, pipeline: &str) -> String {
    let file = dir.join("p.toml");
    std::fs::write(&file, pipeline).unwrap();
    match bridgeflow_core::load_pipeline(&file, &[], &host()) {
        Ok(_) => String::from("valid"),
        Err(e) => e.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Every tensor of a file or HF folder (all `*.safetensors` in it), via the safetensors crate.
pub fn load_tensors(path: &Path) -> BTreeMap<String, Loaded> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                Loaded {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            );
            assert!(prev.is_none(), "{name} in two files");
        }
    }
    out
}

/// Writes tensors with the safetensors crate (an independent writer).
pub fn save_tensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Names in a folder that look like staging leftovers (or a lock file left behind).
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("partial-") || n.ends_with(".tmp") || n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default()
}

/// Copies a folder tree (files and folders).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Every file under a folder: its path relative to it, and its bytes.
pub fn tree_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

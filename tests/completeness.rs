//! Never lose a tensor silently: an HF model or a Megatron checkpoint that lacks a tensor its
//! table and config call for, has one nothing places, or whose weights do not fit its config
//! fails with the tensor named, and leaves nothing behind. On the repository's Mistral fixture
//! (Llama rows, 2 layers, hidden 64, 4 heads, 2 kv heads, head_dim 16, ffn 128, vocab 256).

use bridgeflow_tests::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn mistral() -> PathBuf {
    workspace_root().join("tests/fixtures/hf/mistral")
}

/// A safetensors header and its tensors' bytes, to edit.
struct Safetensors {
    header: serde_json::Map<String, Value>,
    data: Vec<u8>,
}

impl Safetensors {
    fn read(path: &Path) -> Safetensors {
        let b = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        Safetensors {
            header: header.as_object().unwrap().clone(),
            data: b[8 + n..].to_vec(),
        }
    }

    /// Written again with every remaining tensor's bytes packed in order.
    fn write(&self, path: &Path) {
        let mut entries: Vec<(&String, &Value)> = self
            .header
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .collect();
        entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap());
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (k, v) in entries {
            let (a, b) = (
                v["data_offsets"][0].as_u64().unwrap() as usize,
                v["data_offsets"][1].as_u64().unwrap() as usize,
            );
            let mut v = v.clone();
            v["data_offsets"] = json!([data.len(), data.len() + b - a]);
            data.extend_from_slice(&self.data[a..b]);
            header.insert(k.clone(), v);
        }
        let mut text = Value::Object(header).to_string().into_bytes();
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend(data);
        std::fs::write(path, out).unwrap();
    }
}

/// A copy of the Mistral fixture in `dir/tag`, its header and config edited.
fn variant(
    dir: &Path,
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    config: Value,
) -> PathBuf {
    let hf = dir.join(tag);
    std::fs::create_dir_all(&hf).unwrap();
    let mut st = Safetensors::read(&mistral().join("model.safetensors"));
    edit(&mut st.header);
    st.write(&hf.join("model.safetensors"));
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(mistral().join("config.json")).unwrap())
            .unwrap();
    for (k, v) in config.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    hf
}

fn pipeline(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("pipelines").join(name)).unwrap()
}

fn import(dir: &Path, hf: &Path, out: &Path) -> Result<(), String> {
    let sets = [
        format!("input={}", hf.display()),
        format!("output={}", out.display()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    run_text(dir, &pipeline("hf-to-megatron.toml"), &sets, 1 << 30).map(|_| ())
}

/// The import fails naming every one of `want`, and leaves no output and no staging.
fn refused(dir: &Path, hf: &Path, want: &[&str]) {
    let out = dir.join(format!("{}-out", hf.file_name().unwrap().to_string_lossy()));
    let e = import(dir, hf, &out).expect_err("the import must fail");
    assert!(want.iter().all(|w| e.contains(w)), "want {want:?} in: {e}");
    assert!(!out.exists(), "{}", out.display());
    assert!(leftovers(dir).is_empty(), "{:?}", leftovers(dir));
}

fn drop_tensor(name: &'static str) -> impl FnOnce(&mut serde_json::Map<String, Value>) {
    move |h| {
        h.remove(name).unwrap();
    }
}

fn set(
    name: &'static str,
    key: &'static str,
    value: Value,
) -> impl FnOnce(&mut serde_json::Map<String, Value>) {
    move |h| h[name][key] = value
}

#[test]
fn the_fixture_itself_imports() {
    let dir = tempdir();
    let hf = variant(dir.path(), "same", |_| {}, json!({}));
    import(dir.path(), &hf, &dir.path().join("out")).unwrap();
}

#[test]
fn missing_tensors_are_named() {
    let dir = tempdir();
    let d = dir.path();
    for (tag, name) in [
        ("norm", "model.norm.weight"),
        ("down", "model.layers.1.mlp.down_proj.weight"),
        ("k", "model.layers.0.self_attn.k_proj.weight"),
        ("head", "lm_head.weight"),
    ] {
        let hf = variant(d, tag, drop_tensor(name), json!({}));
        refused(d, &hf, &[name, "missing", &hf.display().to_string()]);
    }
}

#[test]
fn allow_missing_accepts_what_the_user_names() {
    let dir = tempdir();
    let hf = variant(
        dir.path(),
        "norm",
        drop_tensor("model.norm.weight"),
        json!({}),
    );
    let text = pipeline("hf-to-megatron.toml").replace(
        "direction = \"to-megatron\"",
        "direction = \"to-megatron\", allow_missing = [\"model.norm.*\"]",
    );
    assert!(
        text.contains("allow_missing"),
        "the bundled pipeline changed shape"
    );
    let out = dir.path().join("out");
    let sets = [
        format!("input={}", hf.display()),
        format!("output={}", out.display()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    run_text(dir.path(), &text, &sets, 1 << 30).unwrap();
    assert!(out.exists());
}

#[test]
fn configs_that_do_not_fit_the_weights_are_named() {
    let dir = tempdir();
    let d = dir.path();
    let cases: [(&str, Value, &[&str]); 7] = [
        (
            "fewer-layers",
            json!({"num_hidden_layers": 1}),
            &["model.layers.1.", "in layer 1"],
        ),
        (
            "more-layers",
            json!({"num_hidden_layers": 3}),
            &["'model.layers.2.mlp.down_proj.weight'", "missing"],
        ),
        (
            "huge-layers",
            json!({"num_hidden_layers": 2147483647u64}),
            &["num_hidden_layers", "2147483647"],
        ),
        (
            "huge-hidden",
            json!({"hidden_size": 1u64 << 40}),
            &["hidden_size", "1099511627776"],
        ),
        (
            "tied",
            json!({"tie_word_embeddings": true}),
            &["'lm_head.weight' beside tie_word_embeddings"],
        ),
        (
            "vocab",
            json!({"vocab_size": 300}),
            &["model.embed_tokens.weight", "300"],
        ),
        (
            "heads",
            json!({"num_attention_heads": 0}),
            &["num_attention_heads", "is 0"],
        ),
    ];
    for (tag, config, want) in cases {
        let hf = variant(d, tag, |_| {}, config);
        refused(d, &hf, want);
    }
}

#[test]
fn misshapen_and_non_float_weights_are_named() {
    let dir = tempdir();
    let d = dir.path();
    let o_proj = "model.layers.1.self_attn.o_proj.weight";
    let hf = variant(d, "o", set(o_proj, "shape", json!([32, 128])), json!({}));
    refused(d, &hf, &[o_proj, "[32, 128]"]);
    let down = "model.layers.0.mlp.down_proj.weight";
    let hf = variant(d, "down", set(down, "shape", json!([128, 64])), json!({}));
    refused(d, &hf, &[down, "[128, 64]"]);
    let norm = "model.norm.weight";
    let hf = variant(d, "u32", set(norm, "dtype", json!("U32")), json!({}));
    refused(d, &hf, &[norm, "U32", "floating point"]);
}

#[test]
fn an_extra_tensor_is_named() {
    let dir = tempdir();
    let d = dir.path();
    let hf = variant(
        d,
        "extra",
        |h| {
            let v = h["model.norm.weight"].clone();
            h.insert("model.layers.0.mlp.extra.weight".into(), v);
        },
        json!({}),
    );
    refused(d, &hf, &["model.layers.0.mlp.extra.weight", "no mapping"]);
}

/// Export: a checkpoint that lacks every layer's `linear_proj` (as a reader would give it
/// after losing the key from its metadata) fails naming the HF tensors it cannot make.
#[test]
fn a_checkpoint_without_a_tensor_does_not_export() {
    let dir = tempdir();
    let d = dir.path();
    let ckpt = d.join("ckpt");
    import(d, &mistral(), &ckpt).unwrap();
    let out = d.join("hf-out");
    let text = chain(&[
        (
            "read",
            "torch-dist",
            "reader",
            &format!(
                "{}, split_layers = true, row_pieces = true",
                path_cfg(&ckpt)
            ),
        ),
        ("drop", "filter", "transform", "exclude = [\"linear_proj\"]"),
        ("map", "models", "mapper", "direction = \"to-hf\""),
        ("write", "safetensors", "writer", &path_cfg(&out)),
    ]);
    let e = run_text(d, &text, &[], 1 << 30).unwrap_err();
    for w in [
        "'model.layers.0.self_attn.o_proj.weight'",
        "'model.layers.1.self_attn.o_proj.weight'",
        "missing",
        &ckpt.display().to_string(),
    ] {
        assert!(e.contains(w), "want {w} in: {e}");
    }
    assert!(!out.exists());
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
}

/// A torch_dist data file holding bytes that `.metadata` does not describe (what a damaged
/// `.metadata` that lost an entry looks like) is refused, naming the file.
#[test]
fn bytes_no_metadata_entry_describes_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let ckpt = d.join("ckpt");
    import(d, &mistral(), &ckpt).unwrap();
    let iter = std::fs::read_dir(&ckpt)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join(".metadata").is_file())
        .unwrap();
    let data = iter.join("__0_0.distcp");
    let mut bytes = std::fs::read(&data).unwrap();
    let len = bytes.len();
    bytes.extend([0u8; 24]);
    std::fs::write(&data, bytes).unwrap();
    let out = d.join("hf-out");
    let sets = [
        format!("input={}", ckpt.display()),
        format!("output={}", out.display()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let e = run_text(d, &pipeline("megatron-to-hf.toml"), &sets, 1 << 30).unwrap_err();
    let want = format!("bytes {len}..{} belong to no item", len + 24);
    assert!(e.contains("__0_0.distcp") && e.contains(&want), "{e}");
    assert!(!out.exists());
}

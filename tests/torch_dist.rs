//! The torch_dist reader against checkpoints written by megatron-core (0.19.2 at TP=1 and TP=2,
//! bf16, 0.16.1 with common.pt and two files per rank), by the torch-free reference writer, and
//! by Megatron-Bridge's import: every global tensor equal to the ground truth, byte for byte.

use bridgeflow_tests::*;
use std::path::Path;

fn to_safetensors(dir: &Path, ckpt: &Path, split_layers: bool) -> std::path::PathBuf {
    let out = dir.join(format!(
        "{}-{split_layers}.safetensors",
        ckpt.file_name().unwrap().to_string_lossy()
    ));
    let p = format!(
        r#"
[stages.read]
plugin = "torch-dist"
kind = "reader"
config = {{ path = "{}", split_layers = {split_layers} }}

[stages.write]
plugin = "safetensors"
kind = "writer"
inputs = ["read"]
config = {{ path = "{}" }}
"#,
        ckpt.display(),
        out.display()
    );
    run_text(dir, &p, &[], 1 << 30).unwrap();
    out
}

#[test]
fn megatron_core_checkpoints_reassemble_to_the_ground_truth() {
    let dir = tempdir();
    let mcore = fixtures().join("mcore");
    for name in [
        "tp1",
        "tp2",
        "tp1_bf16",
        "tp1_mcore0.16.1",
        "torchfree_mcore",
        "torchfree_legacy",
    ] {
        let got = load_tensors(&to_safetensors(dir.path(), &mcore.join(name), false));
        let want = load_tensors(&mcore.join(format!("{name}_global.safetensors")));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: keys"
        );
        for (k, w) in &want {
            assert!(
                got[k] == *w,
                "{name}: tensor '{k}' differs from the ground truth"
            );
        }
    }
}

#[test]
fn megatron_bridge_checkpoints_equal_their_flat_tensors() {
    let dir = tempdir();
    for name in ["llama", "llama_bf16", "qwen3_moe", "gemma2", "deepseek_v3"] {
        let root = fixtures().join("bridge").join(name);
        let got = load_tensors(&to_safetensors(dir.path(), &root, false));
        let want = load_tensors(&root.join("flat_tensors.safetensors"));
        for (k, w) in &want {
            let g = got
                .get(k)
                .unwrap_or_else(|| panic!("{name}: '{k}' missing"));
            assert!(g == w, "{name}: tensor '{k}' differs");
        }
        assert_eq!(got.len(), want.len(), "{name}: tensor count");
    }
}

#[test]
fn split_layers_gives_each_layer_of_stacked_tensors() {
    let dir = tempdir();
    let ckpt = fixtures().join("mcore/tp2");
    let got = load_tensors(&to_safetensors(dir.path(), &ckpt, true));
    let whole = load_tensors(&fixtures().join("mcore/tp2_global.safetensors"));
    let qkv = &whole["decoder.layers.self_attention.linear_qkv.weight"];
    assert_eq!(qkv.shape, vec![2, 128, 64]);
    let half = qkv.bytes.len() / 2;
    for l in 0..2 {
        let t = &got[&format!("decoder.layers.{l}.self_attention.linear_qkv.weight")];
        assert_eq!(t.shape, vec![128, 64]);
        assert!(t.bytes == qkv.bytes[l * half..(l + 1) * half], "layer {l}");
    }
    assert!(got.contains_key("embedding.word_embeddings.weight"));
    assert!(!got.contains_key("decoder.layers.self_attention.linear_qkv.weight"));
}

#[test]
fn corrupt_checkpoints_are_named() {
    let dir = tempdir();
    let src = fixtures().join("mcore/tp1");
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in [".metadata", "metadata.json"] {
        std::fs::copy(src.join(f), bad.join(f)).unwrap();
    }
    // A truncated data file.
    let data = std::fs::read(src.join("__0_0.distcp")).unwrap();
    std::fs::write(bad.join("__0_0.distcp"), &data[..data.len() / 2]).unwrap();
    let p = format!(
        "[stages.read]\nplugin = \"torch-dist\"\nkind = \"reader\"\nconfig = {{ path = \"{}\" }}\n\n[stages.sink]\nplugin = \"testkit\"\nkind = \"writer\"\ninputs = [\"read\"]\nconfig = {{ delay_ms = 0 }}\n",
        bad.display()
    );
    let e = run_text(dir.path(), &p, &[], 1 << 30).unwrap_err();
    assert!(e.contains("__0_0.distcp") && e.contains("truncated"), "{e}");

    // A flipped byte inside a tensor payload fails its CRC-32.
    let mut flipped = data.clone();
    let n = flipped.len();
    flipped[n / 2] ^= 0xff;
    std::fs::write(bad.join("__0_0.distcp"), &flipped).unwrap();
    let e = run_text(dir.path(), &p, &[], 1 << 30).unwrap_err();
    assert!(
        e.contains("CRC-32") || e.contains("corrupt") || e.contains("pickle"),
        "{e}"
    );

    // A pickle that names a class outside the allow-list is refused, not executed.
    let mut meta = std::fs::read(src.join(".metadata")).unwrap();
    let pos = meta.windows(8).position(|w| w == b"Metadata").unwrap();
    meta[pos..pos + 8].copy_from_slice(b"Metadat_");
    std::fs::write(bad.join(".metadata"), &meta).unwrap();
    let e = run_text(dir.path(), &p, &[], 1 << 30).unwrap_err();
    assert!(e.contains("Metadat_") && e.contains("refusing"), "{e}");
}

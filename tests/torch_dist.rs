//! The torch_dist reader against checkpoints written by megatron-core (0.19.2 at TP=1 and TP=2,
//! bf16, 0.16.1 with common.pt and two files per rank), by the torch-free reference writer, and
//! by Megatron-Bridge's import: every global tensor equal to the ground truth, byte for byte.

use bridgeflow_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn to_safetensors(dir: &Path, ckpt: &Path, split_layers: bool) -> std::path::PathBuf {
    read_to_safetensors(dir, ckpt, split_layers, false).0
}

/// Reads a checkpoint into one safetensors file; also says how many items the reader emitted.
fn read_to_safetensors(
    dir: &Path,
    ckpt: &Path,
    split_layers: bool,
    row_pieces: bool,
) -> (std::path::PathBuf, u64) {
    let out = dir.join(format!(
        "{}-{split_layers}-{row_pieces}.safetensors",
        ckpt.file_name().unwrap().to_string_lossy()
    ));
    let read = format!(
        "{}, split_layers = {split_layers}, row_pieces = {row_pieces}",
        path_cfg(ckpt)
    );
    let p = read_write("torch-dist", &read, "safetensors", &path_cfg(&out));
    let report = run_text(dir, &p, &[], 1 << 30).unwrap();
    (out, report.stages[0].items_out)
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
fn row_pieces_are_the_stored_row_blocks_and_place_back_exactly() {
    // TP=2 stores column-parallel weights (qkv, fc1) as two blocks of rows per layer; with
    // row_pieces the reader hands those blocks out as they are and the writer places them.
    // Row-parallel weights (split by columns) are still assembled.
    let dir = tempdir();
    let ckpt = fixtures().join("mcore/tp2");
    for split in [true, false] {
        let (whole, n_whole) = read_to_safetensors(dir.path(), &ckpt, split, false);
        let (pieces, n_pieces) = read_to_safetensors(dir.path(), &ckpt, split, true);
        let (a, b) = (load_tensors(&whole), load_tensors(&pieces));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            assert!(b[k] == *t, "split_layers={split}: '{k}' differs");
        }
        if split {
            assert!(
                n_pieces > n_whole,
                "no pieces: {n_pieces} items vs {n_whole}"
            );
        }
    }
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
    let p = read_write("torch-dist", &path_cfg(&bad), "testkit", "delay_ms = 0");
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

/// Reads a checkpoint layer by layer and writes it back with our writer (which restacks
/// homogeneous decoders): every tensor and every `_extra_state` object survives. The written
/// checkpoints were also loaded by megatron-core 0.19.2 through `../shared/oracle/check_megatron.py`
/// (PASS for llama, qwen3_moe, gemma2, deepseek_v3: every tensor equal to Bridge's conversion).
#[test]
fn writer_round_trips_bridge_and_mcore_checkpoints() {
    let dir = tempdir();
    let cases: Vec<(std::path::PathBuf, std::path::PathBuf)> =
        ["llama", "llama_bf16", "qwen3_moe", "gemma2", "deepseek_v3"]
            .iter()
            .map(|n| {
                let root = fixtures().join("bridge").join(n);
                (root.clone(), root.join("flat_tensors.safetensors"))
            })
            .chain(["tp2", "tp1_mcore0.16.1"].iter().map(|n| {
                (
                    fixtures().join("mcore").join(n),
                    fixtures().join(format!("mcore/{n}_global.safetensors")),
                )
            }))
            .collect();
    for (i, (src, truth)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("ckpt{i}"));
        let read = format!("{}, split_layers = true", path_cfg(src));
        let p = read_write("torch-dist", &read, "torch-dist", &path_cfg(&out));
        run_text(dir.path(), &p, &[], 1 << 30).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("latest_checkpointed_iteration.txt")).unwrap(),
            "0"
        );
        let iter = out.join("iter_0000000");
        for f in [
            ".metadata",
            "__0_0.distcp",
            "__0_1.distcp",
            "common.pt",
            "metadata.json",
        ] {
            assert!(iter.join(f).is_file(), "{f}");
        }
        let got = load_tensors(&to_safetensors(dir.path(), &out, false));
        let want = load_tensors(truth);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{}",
            src.display()
        );
        for (k, w) in &want {
            assert!(
                got[k] == *w,
                "{}: '{k}' differs after the round trip",
                src.display()
            );
        }
        // The byte objects the model needs are there (Bridge's _extra_state keys).
        let v = inspect_json(&out);
        let ours: Vec<String> = serde_json::from_value(v["attrs"]["byte_objects"].clone()).unwrap();
        let v = inspect_json(src);
        let theirs: Vec<String> =
            serde_json::from_value(v["attrs"]["byte_objects"].clone()).unwrap();
        let theirs: Vec<String> = theirs
            .into_iter()
            .filter(|k| !k.starts_with("common_state"))
            .collect();
        assert_eq!(ours, theirs, "{}: byte objects", src.display());
    }
}

#[test]
fn an_interrupted_write_leaves_no_checkpoint() {
    let dir = tempdir();
    let out = dir.path().join("ckpt");
    let p = chain(&[
        (
            "read",
            "torch-dist",
            "reader",
            &path_cfg(&fixtures().join("mcore/tp1")),
        ),
        ("boom", "testkit", "transform", "after = 3"),
        ("write", "torch-dist", "writer", &path_cfg(&out)),
    ]);
    let e = run_text(dir.path(), &p, &[], 1 << 30).unwrap_err();
    assert!(e.contains("stage 'boom'"), "{e}");
    assert!(!out.exists());
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

fn convert(dir: &Path, pipeline: &str, sets: &[String]) -> Result<(), String> {
    let text = std::fs::read_to_string(workspace_root().join("pipelines").join(pipeline)).unwrap();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    run_text(dir, &text, &sets, 1 << 30).map(|_| ())
}

/// An HF folder imported to torch_dist at `out` with the bundled pipeline.
fn import_hf(dir: &Path, hf: &Path, out: &Path) -> Result<(), String> {
    convert(
        dir,
        "hf-to-megatron.toml",
        &[
            format!("input={}", hf.display()),
            format!("output={}", out.display()),
        ],
    )
}

/// `bridgeflow inspect --json` of a checkpoint.
fn inspect_json(p: &Path) -> serde_json::Value {
    let o = bridgeflow()
        .args(["inspect", "--json"])
        .arg(p)
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A torch_dist checkpoint exported to HF with the bundled pipeline (`out`); its tensors.
fn export_hf(dir: &Path, ckpt: &Path, out: &Path) -> BTreeMap<String, Loaded> {
    convert(
        dir,
        "megatron-to-hf.toml",
        &[
            format!("input={}", ckpt.display()),
            format!("output={}", out.display()),
        ],
    )
    .unwrap();
    load_tensors(out)
}

/// HF → Megatron equals Megatron-Bridge's import tensor by tensor (keys, global shapes, dtypes,
/// bytes, and the `_extra_state` objects) for every family with a Bridge golden: Llama (fp32 and
/// bf16), Qwen3-MoE (experts stacked on their own axis), Gemma 1/2/3 (TOML tables), GPT-OSS
/// (fused experts reshuffled expert by expert, biases, attention sinks) and DeepSeek-V3
/// (MLA, a dense first layer, shared experts, per-layer keys; with a multi-token-prediction
/// layer as `mtp.layers.0.…`, its embedding and head copies written back on export), Qwen2.5-VL
/// (vision tower verbatim), Nemotron-H (hybrid Mamba layers); Bridge's checkpoint and ours
/// exported back give the original HF tensors bit for bit. (The same outputs loaded in
/// megatron-core 0.19.2 via the oracle: every tensor equal to Bridge's conversion.)
#[test]
fn import_equals_megatron_bridge_and_export_is_bit_exact() {
    let dir = tempdir();
    // The shared goldens, and those made here with the same recipe (tests/fixtures/bridge/make.py).
    let local = workspace_root().join("tests/fixtures");
    let cases = ["llama", "llama_bf16", "qwen3_moe", "gemma2", "deepseek_v3"]
        .map(|n| (n, fixtures()))
        .into_iter()
        .chain(
            [
                "gemma",
                "gemma3",
                "gpt_oss",
                "qwen25_vl",
                "nemotron_h",
                "deepseek_v3_mtp",
            ]
            .map(|n| (n, local.clone())),
        );
    for (name, root) in cases {
        let hf = root.join("hf").join(name);
        let bridge = root.join("bridge").join(name);
        let ours = dir.path().join(format!("{name}-megatron"));
        import_hf(dir.path(), &hf, &ours).unwrap();
        let got = load_tensors(&to_safetensors(dir.path(), &ours, false));
        let want = load_tensors(&bridge.join("flat_tensors.safetensors"));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: keys"
        );
        for (k, w) in &want {
            assert!(got[k] == *w, "{name}: '{k}' differs from Megatron-Bridge's");
        }
        let objects = |p: &Path| -> Vec<String> {
            let v = inspect_json(p);
            let all: Vec<String> =
                serde_json::from_value(v["attrs"]["byte_objects"].clone()).unwrap();
            all.into_iter()
                .filter(|k| !k.starts_with("common_state"))
                .collect()
        };
        assert_eq!(
            objects(&ours),
            objects(&bridge),
            "{name}: _extra_state objects"
        );

        // Bridge's checkpoint back to HF, and ours too.
        for (src, tag) in [(&bridge, "bridge"), (&ours, "ours")] {
            let out = dir.path().join(format!("{name}-{tag}-hf"));
            convert(
                dir.path(),
                "megatron-to-hf.toml",
                &[
                    format!("input={}", src.display()),
                    format!("map.hf_config={}", hf.join("config.json").display()),
                    format!("output={}", out.display()),
                ],
            )
            .unwrap();
            assert_eq!(
                load_tensors(&out),
                load_tensors(&hf.join("model.safetensors")),
                "{name} from {tag}: HF tensors bit for bit"
            );
            assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
        }
    }
}

/// GPT-OSS in its MXFP4 release layout (`*_blocks` + `*_scales`, tests/fixtures/mxfp4/make.py):
/// `mxfp4-dequant` gives transformers' `convert_moe_packed_tensors` bit for bit in the bf16 HF
/// layout (and drops `quantization_config` from the config written beside it); HF MXFP4 →
/// torch_dist equals Megatron-Bridge 0.6.2's own import of the MXFP4 folder tensor by tensor,
/// with the experts in one-expert pieces through the pipeline file and with `bridgeflow
/// convert`, which inserts the dequantizer from the config. Blocks without scales are named.
#[test]
fn gpt_oss_mxfp4_imports_as_megatron_bridge_does() {
    let dir = tempdir();
    let fx = workspace_root().join("tests/fixtures/mxfp4");
    let model = fx.join("model");
    let want = load_tensors(&fx.join("bridge/flat_tensors.safetensors"));
    let same_as_bridge = |ckpt: &Path, how: &str| {
        let got = load_tensors(&to_safetensors(dir.path(), ckpt, false));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{how}: keys"
        );
        for (k, w) in &want {
            assert!(got[k] == *w, "{how}: '{k}' differs from Megatron-Bridge's");
        }
    };
    let ours = dir.path().join("pipeline");
    let sets = [
        format!("input={}", model.display()),
        format!("output={}", ours.display()),
        "dequant.piece_bytes=10000".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let file = workspace_root().join("pipelines/hf-mxfp4-to-megatron.toml");
    let pipeline = std::fs::read_to_string(file).unwrap();
    let report = run_text(dir.path(), &pipeline, &sets, 1 << 30).unwrap();
    let dequant = report.stages.iter().find(|s| s.name == "dequant").unwrap();
    // Each fused tensor (from its blocks and scales) in 4 one-expert pieces; the rest as stored.
    let reference = load_tensors(&fx.join("reference/dequantized.safetensors"));
    let stored = load_tensors(&model.join("model.safetensors"));
    let plain = stored.len() - 2 * reference.len();
    assert_eq!(
        dequant.items_out as usize,
        plain + 4 * reference.len(),
        "pieces"
    );
    same_as_bridge(&ours, "pipeline");

    let cli = dir.path().join("cli");
    let o = bridgeflow()
        .args(["convert", "--from"])
        .arg(format!("hf:{}", model.display()))
        .arg("--to")
        .arg(format!("megatron:{}", cli.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    same_as_bridge(&cli, "convert");

    // Dequantized alone: transformers' tensors, the rest as stored, a config without quantization.
    let hf = dir.path().join("bf16");
    let p = chain(&[
        ("read", "safetensors", "reader", &path_cfg(&model)),
        ("dequant", "mxfp4-dequant", "transform", ""),
        ("write", "safetensors", "writer", &path_cfg(&hf)),
    ]);
    run_text(dir.path(), &p, &[], 1 << 30).unwrap();
    let got = load_tensors(&hf);
    assert_eq!(got.len(), plain + reference.len());
    for (k, t) in &got {
        let w = reference.get(k).or(stored.get(k)).unwrap();
        assert!(t == w, "'{k}' differs from transformers' dequantization");
    }
    assert!(config_json(&hf).get("quantization_config").is_none());
    assert!(config_json(&model).get("quantization_config").is_some());

    // A blocks tensor whose scales are missing (renamed in the header, same length).
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(model.join("config.json"), bad.join("config.json")).unwrap();
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let from = b"layers.1.mlp.experts.down_proj_scales";
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    let mut bytes = bytes;
    bytes[at + from.len() - 1] = b'z';
    std::fs::write(bad.join("model.safetensors"), bytes).unwrap();
    let p = chain(&[
        ("read", "safetensors", "reader", &path_cfg(&bad)),
        ("dequant", "mxfp4-dequant", "transform", ""),
        (
            "write",
            "safetensors",
            "writer",
            &path_cfg(&dir.path().join("never")),
        ),
    ]);
    let e = run_text(dir.path(), &p, &[], 1 << 30).unwrap_err();
    assert!(
        e.contains("model.layers.1.mlp.experts.down_proj_blocks")
            && e.contains("model.layers.1.mlp.experts.down_proj_scales"),
        "{e}"
    );
    assert!(!dir.path().join("never").exists());
}

#[test]
fn export_needs_only_the_checkpoint() {
    // Megatron-Bridge's checkpoints carry their model config in run_config.yaml: the HF config
    // is rebuilt from it, for every family.
    let dir = tempdir();
    let text =
        std::fs::read_to_string(workspace_root().join("pipelines/megatron-to-hf.toml")).unwrap();
    let local = workspace_root().join("tests/fixtures");
    let cases = ["llama", "qwen3_moe", "gemma2", "deepseek_v3"]
        .map(|n| (n, fixtures()))
        .into_iter()
        .chain(["gemma", "gemma3"].map(|n| (n, local.clone())));
    for (name, root) in cases {
        let out = dir.path().join(name);
        run_text(
            dir.path(),
            &text,
            &[
                &format!("input={}", root.join("bridge").join(name).display()),
                &format!("output={}", out.display()),
            ],
            1 << 30,
        )
        .unwrap();
        let hf = root.join("hf").join(name);
        assert_eq!(
            load_tensors(&out),
            load_tensors(&hf.join("model.safetensors")),
            "{name}"
        );
        // Every field the model needs comes back from Bridge's model section.
        let (got, want) = (config_json(&out), config_json(&hf));
        for k in [
            "architectures",
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "vocab_size",
            "max_position_embeddings",
            "tie_word_embeddings",
            "rope_parameters",
            "attention_bias",
            "initializer_range",
            "dtype",
            "hidden_act",
            // MoE and MLA
            "num_experts",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "first_k_dense_replace",
            "n_shared_experts",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "routed_scaling_factor",
            // Gemma 2
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
        ] {
            if want.get(k).is_some() {
                assert_eq!(got[k], want[k], "{name}: {k}");
            }
        }
    }
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn unknown_architectures_are_named() {
    let dir = tempdir();
    // The llama fixture under an architecture no table knows.
    let hf = dir.path().join("falcon");
    std::fs::create_dir(&hf).unwrap();
    let src = fixtures().join("hf/llama");
    std::fs::copy(src.join("model.safetensors"), hf.join("model.safetensors")).unwrap();
    let mut cfg = config_json(&src);
    cfg["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    let e = import_hf(dir.path(), &hf, &dir.path().join("x")).unwrap_err();
    assert!(
        e.contains("config.json")
            && e.contains("architecture 'FalconForCausalLM' has no model table"),
        "{e}"
    );
    assert!(!dir.path().join("x").exists());
}

/// A hybrid config that does not fit its weights is named, and nothing is written: Mamba widths
/// that do not add up to `in_proj`'s rows, and a layer pattern of the wrong length.
#[test]
fn hybrid_configs_that_do_not_fit_are_named() {
    let dir = tempdir();
    let src = workspace_root().join("tests/fixtures/hf/nemotron_h");
    let cases: [(&str, serde_json::Value, &[&str]); 2] = [
        (
            "heads",
            serde_json::json!({"mamba_num_heads": 8}),
            &["backbone.layers.0.mixer.in_proj.weight", "z 128"],
        ),
        (
            "pattern",
            serde_json::json!({"layers_block_type": ["mamba", "attention"]}),
            &["backbone.layers.2.", "in layer 2", "describes 2 layers"],
        ),
    ];
    for (tag, change, want) in cases {
        let hf = dir.path().join(tag);
        std::fs::create_dir(&hf).unwrap();
        std::fs::copy(src.join("model.safetensors"), hf.join("model.safetensors")).unwrap();
        let mut cfg = config_json(&src);
        for (k, v) in change.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
        let out = dir.path().join(format!("{tag}-out"));
        let e = import_hf(dir.path(), &hf, &out).unwrap_err();
        assert!(want.iter().all(|w| e.contains(w)), "{tag}: {e}");
        assert!(!out.exists(), "{tag}");
    }
}

#[test]
fn in_memory_roundtrip_pipeline_is_exact() {
    let dir = tempdir();
    for name in ["llama", "llama_bf16"] {
        convert(
            dir.path(),
            "roundtrip.toml",
            &[format!(
                "input={}",
                fixtures().join("hf").join(name).display()
            )],
        )
        .unwrap();
    }
}

/// The Rust fp32 forward pass on Megatron-layout weights against the HF reference logits:
/// Bridge's checkpoint and our conversion both within 1e-4 (measured 2.7e-6), and a checkpoint
/// of other weights fails.
#[test]
fn rust_logits_check() {
    let dir = tempdir();
    let ours = dir.path().join("ours");
    import_hf(dir.path(), &fixtures().join("hf/llama"), &ours).unwrap();
    let text =
        std::fs::read_to_string(workspace_root().join("pipelines/verify-logits.toml")).unwrap();
    let hf = format!("hf={}", fixtures().join("hf/llama").display());
    for ckpt in [fixtures().join("bridge/llama"), ours] {
        let r = run_text(
            dir.path(),
            &text,
            &[&format!("input={}", ckpt.display()), &hf],
            1 << 30,
        )
        .unwrap();
        let s = &r.stages.iter().find(|s| s.name == "check").unwrap().summary;
        assert!(s.contains("top-1 agreement 16/16"), "{s}");
    }
    let e = run_text(
        dir.path(),
        &text,
        &[
            &format!("input={}", fixtures().join("bridge/llama").display()),
            &format!("hf={}", fixtures().join("hf/llama_bf16").display()),
        ],
        1 << 30,
    )
    .unwrap_err();
    assert!(e.contains("mismatch error: logits max abs diff"), "{e}");
}

#[test]
fn manifests_beside_outputs_are_checked_on_read() {
    let dir = tempdir();
    let ckpt = dir.path().join("m");
    import_hf(dir.path(), &fixtures().join("hf/llama"), &ckpt).unwrap();
    let read = |verify: bool| {
        let read = format!("{}, verify = {verify}", path_cfg(&ckpt));
        let p = read_write("torch-dist", &read, "testkit", "delay_ms = 0");
        run_text(dir.path(), &p, &[], 1 << 30)
    };
    read(true).unwrap();
    // A manifest that disagrees (as after a silent change of the data) fails the read.
    let m = ckpt.join("iter_0000000/bridgeflow-manifest.json");
    let text = std::fs::read_to_string(&m).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let first = v["tensors"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    v["tensors"][&first]["blake3"] = serde_json::json!("00".repeat(32));
    std::fs::write(&m, v.to_string()).unwrap();
    let e = read(true).unwrap_err();
    assert!(e.contains("mismatch error") && e.contains("blake3"), "{e}");
    read(false).unwrap();
}

/// Qwen2 (QKV biases), Qwen3 (q/k norms, tied embeddings) and Mistral, from fixtures made by
/// transformers (tests/fixtures/README.md): HF -> Megatron, then the Rust fp32 logits within
/// 1e-4 of the HF reference, and HF -> Megatron -> HF exact.
#[test]
fn llama_family_logits_and_round_trips() {
    let dir = tempdir();
    let logits =
        std::fs::read_to_string(workspace_root().join("pipelines/verify-logits.toml")).unwrap();
    // Qwen2.5-VL: its language model on text (the multimodal RoPE is plain RoPE there).
    for name in ["qwen2", "qwen3", "mistral", "qwen25_vl"] {
        let hf = workspace_root().join("tests/fixtures/hf").join(name);
        let out = dir.path().join(name);
        import_hf(dir.path(), &hf, &out).unwrap();
        let r = run_text(
            dir.path(),
            &logits,
            &[
                &format!("input={}", out.display()),
                &format!("hf={}", hf.display()),
            ],
            1 << 30,
        )
        .unwrap();
        let s = &r.stages.iter().find(|s| s.name == "check").unwrap().summary;
        assert!(s.contains("top-1 agreement 16/16"), "{name}: {s}");
        convert(
            dir.path(),
            "roundtrip.toml",
            &[format!("input={}", hf.display())],
        )
        .unwrap();
        let back = dir.path().join(format!("{name}-hf"));
        assert_eq!(
            export_hf(dir.path(), &out, &back),
            load_tensors(&hf.join("model.safetensors")),
            "{name}"
        );
        // Our run_config.yaml keeps the original config.json: export gives it back exactly.
        assert_eq!(config_json(&back), config_json(&hf), "{name}: config.json");
    }
}

#[test]
fn missing_metadata_and_uncovered_tensors_are_named() {
    let dir = tempdir();
    // A folder that is not a checkpoint.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let p = |path: &Path| read_write("torch-dist", &path_cfg(path), "testkit", "delay_ms = 0");
    let e = run_text(dir.path(), &p(&empty), &[], 1 << 30).unwrap_err();
    assert!(
        e.contains("no .metadata and no latest_checkpointed_iteration.txt"),
        "{e}"
    );
    // A root whose latest iteration has no .metadata.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("iter_0000005")).unwrap();
    std::fs::write(root.join("latest_checkpointed_iteration.txt"), "5").unwrap();
    let e = run_text(dir.path(), &p(&root), &[], 1 << 30).unwrap_err();
    assert!(
        e.contains("names iteration '5'") && e.contains("has no .metadata"),
        "{e}"
    );
}

/// A model table in TOML, loaded at run time: a "new" architecture converts with no
/// compilation (here Gemma 2's table under another name, checked against Bridge's golden), and
/// a malformed table is refused naming its file.
#[test]
fn toml_model_tables_add_architectures_at_run_time() {
    let dir = tempdir();
    let src = fixtures().join("hf/gemma2");
    let hf = dir.path().join("my-gemma");
    std::fs::create_dir(&hf).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), hf.join(f)).unwrap();
        }
    }
    let mut cfg = config_json(&src);
    cfg["architectures"] = serde_json::json!(["MyGemmaForCausalLM"]);
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    let table =
        std::fs::read_to_string(workspace_root().join("plugins/models/src/families/gemma2.toml"))
            .unwrap()
            .replace(r#"name = "gemma2""#, r#"name = "my-gemma""#)
            .replace(r#"["Gemma2ForCausalLM"]"#, r#"["MyGemmaForCausalLM"]"#);
    let table_path = dir.path().join("my-gemma.toml");
    std::fs::write(&table_path, table).unwrap();
    let pipeline = |tables: &str, out: &Path| {
        let map = format!("direction = \"to-megatron\", model_tables = [{tables}]");
        chain(&[
            ("read", "safetensors", "reader", &path_cfg(&hf)),
            ("map", "models", "mapper", &map),
            ("write", "torch-dist", "writer", &path_cfg(out)),
        ])
    };
    let out = dir.path().join("out");
    let e = run_text(dir.path(), &pipeline("", &out), &[], 1 << 30).unwrap_err();
    assert!(e.contains("'MyGemmaForCausalLM' has no model table"), "{e}");
    run_text(
        dir.path(),
        &pipeline(&format!("\"{}\"", table_path.display()), &out),
        &[],
        1 << 30,
    )
    .unwrap();
    let got = load_tensors(&to_safetensors(dir.path(), &out, false));
    let want = load_tensors(&fixtures().join("bridge/gemma2/flat_tensors.safetensors"));
    assert_eq!(got, want);

    std::fs::write(
        &table_path,
        "name = \"broken\"\n[[tensor]]\nkind = \"sideways\"\n",
    )
    .unwrap();
    let e = run_text(
        dir.path(),
        &pipeline(
            &format!("\"{}\"", table_path.display()),
            &dir.path().join("out2"),
        ),
        &[],
        1 << 30,
    )
    .unwrap_err();
    assert!(
        e.contains("my-gemma.toml") && e.contains("not a model table"),
        "{e}"
    );
}

/// Mixtral has no Megatron-Bridge 0.6.2 bridge (so no golden): its table is checked by the
/// layout it must produce (experts stacked as Qwen3-MoE's: [layers, experts, 2·ffn, hidden],
/// the router as `mlp.router.weight`) and an exact round trip, config included.
#[test]
fn mixtral_round_trip_and_expert_layout() {
    let dir = tempdir();
    let hf = workspace_root().join("tests/fixtures/hf/mixtral");
    let out = dir.path().join("mixtral-megatron");
    import_hf(dir.path(), &hf, &out).unwrap();
    let got = load_tensors(&to_safetensors(dir.path(), &out, false));
    let src = load_tensors(&hf.join("model.safetensors"));
    let fc1 = &got["decoder.layers.mlp.experts.experts.linear_fc1.weight"];
    assert_eq!(fc1.shape, vec![2, 4, 256, 64]);
    // Layer 1, expert 3: rows [w1; w3] (gate; up).
    let per_expert = 256 * 64 * 4;
    let at = (4 + 3) * per_expert;
    let w1 = &src["model.layers.1.block_sparse_moe.experts.3.w1.weight"].bytes;
    let w3 = &src["model.layers.1.block_sparse_moe.experts.3.w3.weight"].bytes;
    assert!(fc1.bytes[at..at + w1.len()] == w1[..]);
    assert!(fc1.bytes[at + w1.len()..at + per_expert] == w3[..]);
    assert_eq!(
        got["decoder.layers.mlp.router.weight"].shape,
        vec![2, 4, 64]
    );
    let back = dir.path().join("mixtral-hf");
    assert_eq!(export_hf(dir.path(), &out, &back), src);
    assert_eq!(config_json(&back), config_json(&hf));
}

/// DeepSeek-V3 in its FP8 release layout (projections F8_E4M3 + 128×128 `weight_scale_inv`):
/// dequantized in blocks of rows that go through the mapper as pieces, the checkpoint equals
/// the one made from whole dequantized tensors, tensor by tensor.
#[test]
fn fp8_pieces_through_the_mapper_equal_whole_tensors() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempdir();
    let src = fixtures().join("hf/deepseek_v3");
    let hf = dir.path().join("ds-fp8");
    std::fs::create_dir(&hf).unwrap();
    let tensors = load_tensors(&src.join("model.safetensors"));
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in &tensors {
        let fp8 = t.shape.len() == 2 && name.contains("_proj.weight");
        if !fp8 {
            owned.push((name.clone(), t.dtype, t.shape.clone(), t.bytes.clone()));
            continue;
        }
        // Any FP8 values but NaN, and scales per 128x128 block.
        let n = t.shape[0] * t.shape[1];
        let q: Vec<u8> = (0..n).map(|i| t.bytes[i * 4 + 2] & 0xf7).collect();
        let (sr, sc) = (t.shape[0].div_ceil(128), t.shape[1].div_ceil(128));
        let scales: Vec<u8> = (0..sr * sc)
            .flat_map(|i| (0.01f32 * (i + 1) as f32).to_le_bytes())
            .collect();
        owned.push((name.clone(), Dtype::F8_E4M3, t.shape.clone(), q));
        owned.push((
            format!("{name}_scale_inv"),
            Dtype::F32,
            vec![sr, sc],
            scales,
        ));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &hf.join("model.safetensors")).unwrap();
    let mut cfg = config_json(&src);
    cfg["quantization_config"] =
        serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    let mut flats = Vec::new();
    for piece_bytes in [0, 512] {
        let out = dir.path().join(format!("mg-{piece_bytes}"));
        convert(
            dir.path(),
            "hf-fp8-to-megatron.toml",
            &[
                format!("input={}", hf.display()),
                format!("output={}", out.display()),
                format!("dequant.piece_bytes={piece_bytes}"),
            ],
        )
        .unwrap();
        flats.push(load_tensors(&to_safetensors(dir.path(), &out, false)));
        let rc = std::fs::read_to_string(out.join("iter_0000000/run_config.yaml")).unwrap();
        assert!(
            !rc.contains("quantization_config") && rc.contains("bf16: true"),
            "{rc}"
        );
    }
    assert_eq!(flats[0].len(), flats[1].len());
    for (k, w) in &flats[0] {
        assert!(
            flats[1][k] == *w,
            "'{k}' differs between pieces and whole tensors"
        );
    }
}

/// Written as 2 tensor-parallel ranks would write it, a checkpoint has megatron-core's own TP=2
/// layout: the same chunks (column and row splits, SwiGLU halves per rank, replicated tensors
/// once) in the same rank files (`__0_0.distcp`, `__1_0.distcp`) as its TP=2 fixture.
#[test]
fn tp2_layout_equals_megatron_cores() {
    let dir = tempdir();
    let src = fixtures().join("mcore/tp2");
    let out = dir.path().join("tp2");
    let p = read_write(
        "torch-dist",
        &format!("{}, split_layers = true", path_cfg(&src)),
        "torch-dist",
        &format!("{}, tp = 2, files = 1", path_cfg(&out)),
    );
    run_text(dir.path(), &p, &[], 1 << 30).unwrap();
    let chunks = |p: &Path| -> BTreeMap<String, BTreeSet<String>> {
        let v = inspect_json(p);
        v["attrs"]["chunks"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, cs)| {
                let set = cs
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.to_string())
                    .collect();
                (k.clone(), set)
            })
            .collect()
    };
    let (ours, theirs) = (chunks(&out), chunks(&src));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (k, c) in &theirs {
        assert_eq!(&ours[k], c, "{k}: chunks and files");
    }
    // And the tensors are the ground truth.
    let got = load_tensors(&to_safetensors(dir.path(), &out, false));
    let want = load_tensors(&fixtures().join("mcore/tp2_global.safetensors"));
    assert_eq!(got, want);
}

/// Written as TP2 × PP2 ranks (`convert --tp 2 --pp 2`): each stage's layers, the embedding
/// (first stage) and the output layer and final norm (last stage) in the files of that stage's
/// ranks (rank = tp_rank + 2 · stage), TP-cut as above; the tensors read back are the original.
#[test]
fn pp2_layout_puts_each_stage_in_its_ranks_files() {
    let dir = tempdir();
    let out = dir.path().join("tp2pp2");
    let hf = fixtures().join("hf/llama");
    let o = bridgeflow()
        .args(["convert", "--tp", "2", "--pp", "2", "--from"])
        .arg(format!("hf:{}", hf.display()))
        .arg("--to")
        .arg(format!("megatron:{}", out.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v = inspect_json(&out);
    // Ranks holding each key's chunks, by the chunk's first offset when asked.
    let ranks = |key: &str, layer: Option<u64>| -> BTreeSet<u64> {
        v["attrs"]["chunks"][key]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| layer.is_none_or(|l| c["offsets"][0] == l))
            .map(|c| {
                let f = c["file"].as_str().unwrap();
                f[2..f.rfind('_').unwrap()].parse().unwrap()
            })
            .collect()
    };
    let qkv = "decoder.layers.self_attention.linear_qkv.weight";
    assert_eq!(ranks(qkv, Some(0)), BTreeSet::from([0, 1]));
    assert_eq!(ranks(qkv, Some(1)), BTreeSet::from([2, 3]));
    assert_eq!(
        ranks("embedding.word_embeddings.weight", None),
        BTreeSet::from([0, 1])
    );
    assert_eq!(ranks("output_layer.weight", None), BTreeSet::from([2, 3]));
    assert_eq!(
        ranks("decoder.final_layernorm.weight", None),
        BTreeSet::from([2])
    );
    assert_eq!(
        export_hf(dir.path(), &out, &dir.path().join("hf")),
        load_tensors(&hf.join("model.safetensors"))
    );
}

/// DeepSeek-V3 exported back to its FP8 release layout (`megatron-to-hf-fp8.toml`): the
/// projections as F8_E4M3 with their block scales, everything else untouched, and the config
/// saying so; that output imports again (`hf-fp8-to-megatron.toml`).
#[test]
fn deepseek_exports_to_fp8_and_imports_again() {
    let dir = tempdir();
    let out = dir.path().join("hf-fp8");
    convert(
        dir.path(),
        "megatron-to-hf-fp8.toml",
        &[
            format!("input={}", fixtures().join("bridge/deepseek_v3").display()),
            format!("output={}", out.display()),
        ],
    )
    .unwrap();
    let got = load_tensors(&out);
    let orig = load_tensors(&fixtures().join("hf/deepseek_v3/model.safetensors"));
    for (k, w) in &orig {
        let g = &got[k];
        if k.ends_with("_proj.weight") || k.ends_with("_proj_with_mqa.weight") {
            assert_eq!(g.dtype, safetensors::Dtype::F8_E4M3, "{k}");
            let s = &got[&format!("{k}_scale_inv")];
            assert_eq!(
                s.shape,
                vec![w.shape[0].div_ceil(128), w.shape[1].div_ceil(128)]
            );
        } else {
            assert!(g == w, "'{k}' should pass through");
        }
    }
    assert!(
        config_json(&out)["quantization_config"]["weight_block_size"]
            == serde_json::json!([128, 128])
    );
    convert(
        dir.path(),
        "hf-fp8-to-megatron.toml",
        &[
            format!("input={}", out.display()),
            format!("output={}", dir.path().join("again").display()),
        ],
    )
    .unwrap();
}

/// Runs a bundled pipeline with `sets`; the writer's `(bytes_copied_in_kernel, bytes_written)`.
fn writer_bytes(dir: &Path, pipeline: &str, sets: &[String]) -> (u64, u64) {
    let text = std::fs::read_to_string(workspace_root().join("pipelines").join(pipeline)).unwrap();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let report = run_text(dir, &text, &sets, 1 << 30).unwrap();
    let w = report.stages.iter().find(|s| s.name == "write").unwrap();
    let n = |k: &str| {
        w.metrics[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {}", w.metrics))
    };
    (n("bytes_copied_in_kernel"), n("bytes_written"))
}

/// Tensor bytes that are a view of an input file are copied by the kernel from that file
/// (`copy_file_range`), the rest written from memory; with `kernel_copy = false` every byte is
/// written. Either way the same checkpoints, byte for byte, both ways, with fsync (write-back
/// behind the writes, a durable commit) and without.
#[test]
fn kernel_copies_give_the_same_checkpoints_as_writes() {
    let dir = tempdir();
    // The input beside the outputs: one filesystem, where the kernel can copy.
    let hf = dir.path().join("hf");
    copy_tree(&fixtures().join("hf/llama_bf16"), &hf);
    let sets = |input: &Path, out: &Path, copy: bool, fsync: bool| {
        vec![
            format!("input={}", input.display()),
            format!("output={}", out.display()),
            format!("write.kernel_copy={copy}"),
            format!("write.fsync={fsync}"),
        ]
    };
    for fsync in [true, false] {
        let copied = dir.path().join(format!("mg-copied-{fsync}"));
        let written = dir.path().join(format!("mg-written-{fsync}"));
        let (k, w) = writer_bytes(
            dir.path(),
            "hf-to-megatron.toml",
            &sets(&hf, &copied, true, fsync),
        );
        assert!(
            k > 0 && w > 0,
            "HF -> Megatron: {k} bytes copied in the kernel, {w} written"
        );
        let (k0, w0) = writer_bytes(
            dir.path(),
            "hf-to-megatron.toml",
            &sets(&hf, &written, false, fsync),
        );
        assert_eq!(
            (k0, w0),
            (0, k + w),
            "kernel_copy = false writes every byte"
        );
        assert!(
            tree_bytes(&copied) == tree_bytes(&written),
            "HF -> Megatron: same files"
        );

        let back = dir.path().join(format!("hf-copied-{fsync}"));
        let back_written = dir.path().join(format!("hf-written-{fsync}"));
        let (k, _) = writer_bytes(
            dir.path(),
            "megatron-to-hf.toml",
            &sets(&copied, &back, true, fsync),
        );
        assert!(k > 0, "Megatron -> HF: nothing copied in the kernel");
        let (k0, _) = writer_bytes(
            dir.path(),
            "megatron-to-hf.toml",
            &sets(&copied, &back_written, false, fsync),
        );
        assert_eq!(k0, 0);
        assert!(
            tree_bytes(&back) == tree_bytes(&back_written),
            "Megatron -> HF: same files"
        );
        assert_eq!(
            load_tensors(&back),
            load_tensors(&hf.join("model.safetensors"))
        );
    }
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

/// A tmpfs of `bytes` mounted at `at` while it lives (None where this process may not mount).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A disk too small for the output fails before any data is written: each writer reserves its
/// files' blocks first, and the error says the disk is full; nothing is left behind.
#[test]
fn a_full_disk_fails_before_data_is_written() {
    let dir = tempdir();
    let hf = fixtures().join("hf/llama_bf16");
    let mg = dir.path().join("mg");
    import_hf(dir.path(), &hf, &mg).unwrap();
    let small = dir.path().join("small");
    let Some(_disk) = SmallDisk::mount(&small, 64 << 10) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    };
    let cases = [
        ("hf-to-megatron.toml", &hf, "mg"),
        ("megatron-to-hf.toml", &mg, "hf"),
        ("hf-to-megatron-lm.toml", &hf, "mlm"),
    ];
    for (pipeline, input, tag) in cases {
        let out = small.join(tag);
        let e = convert(
            dir.path(),
            pipeline,
            &[
                format!("input={}", input.display()),
                format!("output={}", out.display()),
            ],
        )
        .unwrap_err();
        assert!(
            e.contains("cannot reserve space for") && e.contains("(disk full)"),
            "{pipeline}: {e}"
        );
        let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
        assert!(left.is_empty(), "{pipeline}: left {left:?}");
    }
}

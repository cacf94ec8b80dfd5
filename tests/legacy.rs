//! Megatron-LM's own checkpoints (`mp_rank_XX[_YYY]/model_optim_rng.pt`): each rank's shard
//! equal to megatron-core's own TP=2 split, any layout to any other exact after reassembly, and
//! broken checkpoints named.

use bridgeflow_tests::*;
use std::collections::BTreeMap;
use std::path::Path;

/// A bundled pipeline file's text.
fn pipeline(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("pipelines").join(name)).unwrap()
}

/// A Megatron-LM checkpoint back to HF at `out` (the HF config from `hf`) with the bundled
/// pipeline; its tensors.
fn export_hf(dir: &Path, ckpt: &Path, hf: &Path, out: &Path) -> BTreeMap<String, Loaded> {
    run_text(
        dir,
        &pipeline("megatron-lm-to-hf.toml"),
        &[
            &format!("input={}", ckpt.display()),
            &format!("hf_config={}", hf.join("config.json").display()),
            &format!("output={}", out.display()),
        ],
        1 << 30,
    )
    .unwrap();
    load_tensors(out)
}

/// torch_dist checkpoint → Megatron-LM checkpoint with the given layout.
fn to_legacy(dir: &Path, src: &Path, out: &Path, layout: &str) {
    let p = read_write(
        "torch-dist",
        &format!("{}, split_layers = true", path_cfg(src)),
        "megatron-lm",
        &format!("{}, {layout}", path_cfg(out)),
    );
    run_text(dir, &p, &[], 1 << 30).unwrap();
}

/// A Megatron-LM checkpoint (or one rank of it) → one safetensors file.
fn read_legacy(
    dir: &Path,
    src: &Path,
    rank: Option<&str>,
    tag: &str,
) -> Result<std::path::PathBuf, String> {
    let out = dir.join(format!("{tag}.safetensors"));
    let rank = rank.map_or(String::new(), |r| format!(", rank = \"{r}\""));
    let p = read_write(
        "megatron-lm",
        &format!("{}{rank}", path_cfg(src)),
        "safetensors",
        &path_cfg(&out),
    );
    run_text(dir, &p, &[], 1 << 30).map(|_| out)
}

/// Writing megatron-core's TP=2 fixture as a Megatron-LM TP=2 checkpoint (local spec) gives
/// each rank exactly the tensors megatron-core itself held on that rank (its SwiGLU halves,
/// column and row splits, vocabulary shards).
#[test]
fn tp2_shards_equal_megatron_cores_own_split() {
    let dir = tempdir();
    let out = dir.path().join("legacy-tp2");
    to_legacy(
        dir.path(),
        &fixtures().join("mcore/tp2"),
        &out,
        "tp = 2, spec = \"local\"",
    );
    assert!(out
        .join("iter_0000000/mp_rank_01/model_optim_rng.pt")
        .is_file());
    for r in 0..2 {
        let got = load_tensors(
            &read_legacy(
                dir.path(),
                &out,
                Some(&format!("mp_rank_{r:02}")),
                &format!("r{r}"),
            )
            .unwrap(),
        );
        let want = load_tensors(&fixtures().join(format!("mcore/tp2_rank{r}_local.safetensors")));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "rank {r}"
        );
        for (k, w) in &want {
            assert!(
                got[k] == *w,
                "rank {r}: '{k}' differs from megatron-core's shard"
            );
        }
    }
}

/// Any layout to any other: TP2·PP2 (TE names, _extra_state) → TP1 (local spec) → torch_dist,
/// every global tensor equal to megatron-core's ground truth.
#[test]
fn any_layout_to_any_other_is_exact() {
    let dir = tempdir();
    let truth = load_tensors(&fixtures().join("mcore/tp2_global.safetensors"));
    let a = dir.path().join("tp2pp2");
    to_legacy(
        dir.path(),
        &fixtures().join("mcore/tp2"),
        &a,
        "tp = 2, pp = 2",
    );
    assert!(a
        .join("iter_0000000/mp_rank_01_001/model_optim_rng.pt")
        .is_file());
    // Legacy → legacy with another layout.
    let b = dir.path().join("tp1");
    let p = read_write(
        "megatron-lm",
        &path_cfg(&a),
        "megatron-lm",
        &format!("{}, spec = \"local\"", path_cfg(&b)),
    );
    run_text(dir.path(), &p, &[], 1 << 30).unwrap();
    for (src, tag) in [(&a, "a"), (&b, "b")] {
        // Back to torch_dist, compared by checkpoint key.
        let td = dir.path().join(format!("{tag}-td"));
        let p = read_write("megatron-lm", &path_cfg(src), "torch-dist", &path_cfg(&td));
        run_text(dir.path(), &p, &[], 1 << 30).unwrap();
        let flat = dir.path().join(format!("{tag}-flat.safetensors"));
        let p = read_write(
            "torch-dist",
            &path_cfg(&td),
            "safetensors",
            &path_cfg(&flat),
        );
        run_text(dir.path(), &p, &[], 1 << 30).unwrap();
        let got = load_tensors(&flat);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            truth.keys().collect::<Vec<_>>(),
            "{tag}"
        );
        for (k, w) in &truth {
            assert!(got[k] == *w, "{tag}: '{k}' differs after the round trip");
        }
    }
}

/// A rank missing from the grid, or a rank whose shapes disagree with the others: named.
#[test]
fn broken_legacy_checkpoints_are_named() {
    let dir = tempdir();
    let a = dir.path().join("tp2");
    to_legacy(dir.path(), &fixtures().join("mcore/tp2"), &a, "tp = 2");
    let rank1 = a.join("iter_0000000/mp_rank_01");
    let moved = dir.path().join("mp_rank_01");
    std::fs::rename(&rank1, &moved).unwrap();
    let e = read_legacy(dir.path(), &a, None, "x").unwrap_err();
    assert!(e.contains("mp_rank_01/model_optim_rng.pt: missing"), "{e}");

    // Rank 1 from a TP=4 split of the same model: half the shard sizes.
    let b = dir.path().join("tp4");
    to_legacy(dir.path(), &fixtures().join("mcore/tp2"), &b, "tp = 4");
    std::fs::create_dir(&rank1).unwrap();
    std::fs::copy(
        b.join("iter_0000000/mp_rank_01/model_optim_rng.pt"),
        rank1.join("model_optim_rng.pt"),
    )
    .unwrap();
    let e = read_legacy(dir.path(), &a, None, "y").unwrap_err();
    assert!(
        e.contains("inconsistent shapes across ranks") && e.contains("mp_rank_01"),
        "{e}"
    );
    assert!(!dir.path().join("y.safetensors").exists());
}

/// Models whose Megatron-LM layout the writer does not know (a VLM's `language_model.*` and
/// vision tower, Nemotron-H's Mamba mixers) are refused by tensor name, and nothing is left.
#[test]
fn models_the_megatron_lm_writer_cannot_place_are_refused() {
    let dir = tempdir();
    let text = pipeline("hf-to-megatron-lm.toml");
    for (name, want) in [("qwen25_vl", "language_model."), ("nemotron_h", "decoder.")] {
        let hf = workspace_root().join("tests/fixtures/hf").join(name);
        let out = dir.path().join(name);
        let sets = [
            format!("input={}", hf.display()),
            format!("output={}", out.display()),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let e = run_text(dir.path(), &text, &sets, 1 << 30).unwrap_err();
        assert!(
            e.contains(&format!("'{want}")) && e.contains("places GPT decoders"),
            "{name}: {e}"
        );
        assert!(!out.exists(), "{name}: output left behind");
    }
}

/// HF → Megatron-LM at TP2·PP2, TP2·PP3·VPP2, and for MoE models TP2·EP2 (experts split for
/// expert-TP) and TP2·EP4 with whole experts (DeepSeek-V3: MLA, shared expert, a dense first
/// layer), with TE names and with the local spec's (SequentialMLP `local_experts.{i}`, MLA's
/// `q_layernorm`/`kv_layernorm`: the names Megatron-LM's loader found in a local-spec model,
/// scripts/check_megatron_lm_load.py) (the bundled pipelines) → HF: the original tensors bit
/// for bit.
#[test]
fn hf_to_megatron_lm_and_back_is_exact() {
    let dir = tempdir();
    let local = workspace_root().join("tests/fixtures/hf");
    let cases: [(std::path::PathBuf, &[&str]); 7] = [
        (fixtures().join("hf/llama"), &["write.tp=2", "write.pp=2"]),
        (local.join("qwen2"), &["write.tp=2", "write.pp=1"]),
        // 6 layers: 3 stages of 2 virtual chunks (model0, model1) of one layer each.
        (
            local.join("gemma3"),
            &["write.tp=2", "write.pp=3", "write.vpp=2"],
        ),
        (
            fixtures().join("hf/qwen3_moe"),
            &["write.tp=2", "write.ep=2"],
        ),
        (
            fixtures().join("hf/deepseek_v3"),
            &["write.tp=2", "write.ep=4", "write.etp=1"],
        ),
        (
            fixtures().join("hf/qwen3_moe"),
            &["write.tp=2", "write.ep=2", "write.spec=local"],
        ),
        (
            fixtures().join("hf/deepseek_v3"),
            &["write.ep=2", "write.spec=local"],
        ),
    ];
    for (case, (hf, layout)) in cases.into_iter().enumerate() {
        let local_spec = layout.contains(&"write.spec=local");
        let name = format!("{}{case}", hf.file_name().unwrap().to_string_lossy());
        let ckpt = dir.path().join(format!("{name}-mlm"));
        let back = dir.path().join(format!("{name}-hf"));
        let input = format!("input={}", hf.display());
        let output = format!("output={}", ckpt.display());
        let mut sets = vec![input.as_str(), output.as_str()];
        sets.extend(layout);
        run_text(
            dir.path(),
            &pipeline("hf-to-megatron-lm.toml"),
            &sets,
            1 << 30,
        )
        .unwrap();
        if layout.contains(&"write.vpp=2") {
            // Stage 2 holds the model's 3rd and 6th layers as model0 and model1.
            let r = read_legacy(dir.path(), &ckpt, Some("mp_rank_01_002"), "vpp").unwrap();
            let names: Vec<String> = load_tensors(&r).into_keys().collect();
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with("model0.decoder.layers.0.")),
                "{names:?}"
            );
            assert!(
                names.contains(&"model1.decoder.final_layernorm.weight".to_string()),
                "{names:?}"
            );
        }
        if local_spec {
            let (rank, want) = if name.starts_with("qwen3_moe") {
                // Expert 3 is EP rank 1's local expert 1.
                (
                    "mp_rank_01_001",
                    "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight",
                )
            } else {
                (
                    "mp_rank_00_001",
                    "decoder.layers.0.self_attention.q_layernorm.weight",
                )
            };
            let r = read_legacy(dir.path(), &ckpt, Some(rank), &name).unwrap();
            let names: Vec<String> = load_tensors(&r).into_keys().collect();
            assert!(names.contains(&want.to_string()), "{names:?}");
        } else if layout.contains(&"write.ep=2") {
            // EP rank 1 holds experts 2 and 3 as local experts 0 and 1, in mp_rank_01_001.
            let r = read_legacy(dir.path(), &ckpt, Some("mp_rank_01_001"), "ep").unwrap();
            let names: Vec<String> = load_tensors(&r).into_keys().collect();
            assert!(
                names.contains(&"decoder.layers.1.mlp.experts.linear_fc1.weight1".to_string()),
                "{names:?}"
            );
            assert!(!names.iter().any(|n| n.ends_with("weight2")), "{names:?}");
            // Read in stored blocks (local experts, TP shards) as views, or assembled: the
            // same tensors, in more items.
            let read = |pieces: bool, out: &Path| {
                let cfg = format!("{}, pieces = {pieces}", path_cfg(&ckpt));
                let p = read_write("megatron-lm", &cfg, "safetensors", &path_cfg(out));
                run_text(dir.path(), &p, &[], 1 << 30).unwrap().stages[0].items_out
            };
            let (a, b) = (
                dir.path().join("whole.safetensors"),
                dir.path().join("blocks.safetensors"),
            );
            let (n_whole, n_blocks) = (read(false, &a), read(true, &b));
            assert!(n_blocks > n_whole, "{n_blocks} vs {n_whole} items");
            assert_eq!(load_tensors(&a), load_tensors(&b));
        }
        assert_eq!(
            export_hf(dir.path(), &ckpt, &hf, &back),
            load_tensors(&hf.join("model.safetensors")),
            "{name}"
        );
    }
}

/// The vocabulary padded for the TP degree on the way in (make_vocab_size_divisible_by × tp:
/// 256 rows → 400 with 100 × 2), each rank holding 200 rows with the padding as zeros, and
/// truncated back on the way out; a TP degree the query groups cannot be split by is refused.
#[test]
fn vocab_padding_per_tp_and_truncation() {
    let dir = tempdir();
    let hf = fixtures().join("hf/llama");
    let ckpt = dir.path().join("mlm");
    let input = format!("input={}", hf.display());
    let output = format!("output={}", ckpt.display());
    run_text(
        dir.path(),
        &pipeline("hf-to-megatron-lm.toml"),
        &[
            &input,
            &output,
            "map.make_vocab_size_divisible_by=100",
            "map.tensor_parallel=2",
            "write.tp=2",
        ],
        1 << 30,
    )
    .unwrap();
    let r1 = load_tensors(&read_legacy(dir.path(), &ckpt, Some("mp_rank_01"), "r1").unwrap());
    let emb = &r1["embedding.word_embeddings.weight"];
    assert_eq!(emb.shape, vec![200, 64]);
    // Rank 1 holds rows 200..400: rows 200..256 real, 256..400 padding.
    let row = 64 * 4;
    assert!(emb.bytes[56 * row..].iter().all(|&b| b == 0));
    assert!(emb.bytes[..56 * row].iter().any(|&b| b != 0));
    let back = dir.path().join("hf");
    assert_eq!(
        export_hf(dir.path(), &ckpt, &hf, &back),
        load_tensors(&hf.join("model.safetensors"))
    );
    // 2 query groups over 4 ranks: refused, nothing written.
    let out4 = format!("output={}", dir.path().join("tp4").display());
    let e = run_text(
        dir.path(),
        &pipeline("hf-to-megatron-lm.toml"),
        &[&input, &out4, "write.tp=4"],
        1 << 30,
    )
    .unwrap_err();
    assert!(
        e.contains("2 query groups do not divide over 4 tensor-parallel ranks"),
        "{e}"
    );
    assert!(!dir.path().join("tp4").exists());
}

/// Any MoE layout to any other: DeepSeek-V3 (MLA, shared expert, dense first layer) from
/// TP2·EP4 to TP4·EP2 through the reader and writer, then to HF: the original tensors.
#[test]
fn moe_layouts_reshard_exactly() {
    let dir = tempdir();
    let hf = fixtures().join("hf/deepseek_v3");
    let a = dir.path().join("tp2ep4");
    run_text(
        dir.path(),
        &pipeline("hf-to-megatron-lm.toml"),
        &[
            &format!("input={}", hf.display()),
            &format!("output={}", a.display()),
            "write.tp=2",
            "write.ep=4",
        ],
        1 << 30,
    )
    .unwrap();
    let b = dir.path().join("tp4ep2");
    let p = read_write(
        "megatron-lm",
        &format!("{}, pieces = true", path_cfg(&a)),
        "megatron-lm",
        &format!("{}, tp = 4, ep = 2", path_cfg(&b)),
    );
    run_text(dir.path(), &p, &[], 1 << 30).unwrap();
    assert!(b
        .join("iter_0000000/mp_rank_03_001/model_optim_rng.pt")
        .is_file());
    let back = dir.path().join("hf");
    assert_eq!(
        export_hf(dir.path(), &b, &hf, &back),
        load_tensors(&hf.join("model.safetensors"))
    );
}

//! The safetensors plugin against files written by transformers and by the safetensors crate:
//! casts checked value by value, re-sharding bit for bit, corrupt input, atomic output.

use bridgeflow_tests::*;
use safetensors::Dtype;
use std::path::Path;

/// Round-to-nearest-even f32 → bf16, written out independently of the code under test.
fn rne_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7fff + lsb) >> 16) as u16
}

#[test]
fn rne_reference_is_right() {
    assert_eq!(rne_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(rne_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert_eq!(rne_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(rne_bf16(-2.0), 0xc000);
}

#[test]
fn fp32_fixture_to_bf16_through_the_bundled_pipeline() {
    let dir = tempdir();
    let out = dir.path().join("llama-bf16");
    let o = bridgeflow()
        .args(["run", "pipelines/hf-to-bf16.toml", "--set"])
        .arg(format!("output={}", out.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let src_dir = fixtures().join("hf/llama");
    let src = load_tensors(&src_dir.join("model.safetensors"));
    let got = load_tensors(&out);
    assert_eq!(
        src.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (name, s) in &src {
        let g = &got[name];
        assert_eq!(s.dtype, Dtype::F32, "{name}");
        assert_eq!(g.dtype, Dtype::BF16, "{name}");
        assert_eq!(g.shape, s.shape, "{name}");
        let want: Vec<u8> = s
            .bytes
            .chunks_exact(4)
            .flat_map(|c| rne_bf16(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
            .collect();
        assert!(g.bytes == want, "{name}: values differ from an RNE cast");
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(src_dir.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f} copied"
        );
    }
    let cfg_src = std::fs::read_to_string(src_dir.join("config.json")).unwrap();
    let cfg_out = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert_eq!(
        cfg_out,
        cfg_src.replace("\"dtype\": \"float32\"", "\"dtype\": \"bfloat16\""),
        "config.json copied, with its dtype updated"
    );
    assert!(out.join("bridgeflow-manifest.json").is_file());
    assert!(leftovers(dir.path()).is_empty());
}

fn reshard(dir: &Path, input: &Path, out: &Path, max: &str) -> String {
    let write = format!("{}, max_shard_size = \"{max}\"", path_cfg(out));
    let p = read_write("safetensors", &path_cfg(input), "safetensors", &write);
    let r = run_text(dir, &p, &[], 1 << 30).unwrap();
    r.stages.last().unwrap().summary.clone()
}

#[test]
fn resharding_is_bit_identical_and_the_index_is_right() {
    let dir = tempdir();
    let src_dir = fixtures().join("hf/llama");
    let out = dir.path().join("sharded");
    let summary = reshard(dir.path(), &src_dir, &out, "100KB");

    let src = load_tensors(&src_dir.join("model.safetensors"));
    assert_eq!(load_tensors(&out), src, "every tensor bit-identical");

    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total: usize = src.values().map(|t| t.bytes.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let wm = index["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), src.len());
    let mut shards: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (tensor, file) in wm {
        shards
            .entry(file.as_str().unwrap().to_string())
            .or_default()
            .push(tensor.clone());
    }
    let n = shards.len();
    assert!(n >= 4, "417 KiB in 100 KB shards: {n}");
    assert!(summary.contains(&format!("in {n} files")), "{summary}");
    assert_eq!(
        shards.keys().cloned().collect::<Vec<_>>(),
        (1..=n)
            .map(|k| format!("model-{k:05}-of-{n:05}.safetensors"))
            .collect::<Vec<_>>()
    );
    for (file, names) in &shards {
        let bytes = std::fs::read(out.join(file)).unwrap();
        assert!(
            bytes.len() as u64 <= 100_000 + 4096,
            "{file} is {} bytes",
            bytes.len()
        );
        // Each shard is byte for byte what the safetensors library writes for its tensors.
        let tmp = dir.path().join("expected.safetensors");
        let list: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = names
            .iter()
            .map(|n| {
                let t = &src[n];
                (n.as_str(), t.dtype, t.shape.clone(), t.bytes.clone())
            })
            .collect();
        save_tensors(&tmp, &list);
        assert!(
            std::fs::read(&tmp).unwrap() == bytes,
            "{file} differs from safetensors.serialize"
        );
    }
    // And our reader reads the sharded folder back, through the index.
    let back = dir.path().join("back.safetensors");
    reshard(dir.path(), &out, &back, "5GB");
    assert_eq!(load_tensors(&back), src);
}

#[test]
fn single_file_output_matches_the_reference_writer() {
    let dir = tempdir();
    let src = fixtures().join("hf/llama_bf16/model.safetensors");
    let out = dir.path().join("copy.safetensors");
    reshard(dir.path(), &src, &out, "5GB");
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&out).unwrap(),
        "a transformers-written file is reproduced byte for byte"
    );
}

#[test]
fn existing_output_is_refused_unless_overwrite() {
    let dir = tempdir();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let o = bridgeflow()
        .args(["run", "pipelines/hf-to-bf16.toml", "--set"])
        .arg(format!("output={}", out.display()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("already exists; set overwrite = true"),
        "{}",
        text(&o)
    );
    assert!(out.join("keep.txt").exists());
    let o = bridgeflow()
        .args(["run", "pipelines/hf-to-bf16.toml", "--set"])
        .arg(format!("output={}", out.display()))
        .args(["--set", "write.overwrite=true"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").exists());
    assert!(leftovers(dir.path()).is_empty());
}

/// A file from a raw header and data section.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn inspect_error(bytes: &[u8]) -> String {
    let dir = tempdir();
    let f = dir.path().join("bad.safetensors");
    std::fs::write(&f, bytes).unwrap();
    let o = bridgeflow().arg("inspect").arg(&f).output().unwrap();
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains(&f.display().to_string()),
        "names the file: {msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    msg
}

fn valid_file() -> Vec<u8> {
    let dir = tempdir();
    let f = dir.path().join("ok.safetensors");
    save_tensors(
        &f,
        &[
            (
                "a",
                Dtype::F32,
                vec![2, 2],
                f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
            ),
            ("b", Dtype::F32, vec![2], f32_bytes(&[5.0, 6.0])),
        ],
    );
    std::fs::read(f).unwrap()
}

#[test]
fn corrupt_truncated_file() {
    let mut b = valid_file();
    b.truncate(b.len() - 4);
    let m = inspect_error(&b);
    assert!(
        m.contains("the tensors cover 24 data bytes but the file holds 20: truncated"),
        "{m}"
    );
}

#[test]
fn corrupt_header_length_past_eof() {
    let mut b = valid_file();
    b[..8].copy_from_slice(&5000u64.to_le_bytes());
    let m = inspect_error(&b);
    assert!(
        m.contains("header length 5000 points past the end of the file"),
        "{m}"
    );
}

#[test]
fn corrupt_header_too_large() {
    let mut b = valid_file();
    b[..8].copy_from_slice(&(200u64 << 20).to_le_bytes());
    let m = inspect_error(&b);
    assert!(m.contains("exceeds the 100 MB limit"), "{m}");
}

#[test]
fn corrupt_tiny_file() {
    let m = inspect_error(b"abc");
    assert!(m.contains("truncated: 3 bytes"), "{m}");
}

#[test]
fn corrupt_overlapping_offsets() {
    let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let m = inspect_error(&raw_file(h, &[0u8; 24]));
    assert!(
        m.contains("tensor 'b': data offsets overlap another tensor or leave a hole"),
        "{m}"
    );
}

#[test]
fn corrupt_hole_between_tensors() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#;
    let m = inspect_error(&raw_file(h, &[0u8; 20]));
    assert!(m.contains("tensor 'b'"), "{m}");
    assert!(
        m.contains("starts at data offset 12 but the previous tensor ends at 8"),
        "{m}"
    );
}

#[test]
fn corrupt_bad_json_header() {
    let m = inspect_error(&raw_file("{\"a\": {\"dtype\": ", &[]));
    assert!(
        m.contains("header is not a valid safetensors JSON header"),
        "{m}"
    );
}

#[test]
fn corrupt_size_does_not_match_dtype_and_shape() {
    let h = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#;
    let m = inspect_error(&raw_file(h, &[0u8; 12]));
    assert!(
        m.contains("tensor 'w': F32 [4] needs 16 bytes but its data_offsets [0, 12] span 12"),
        "{m}"
    );
}

#[test]
fn corrupt_input_in_a_pipeline_names_stage_and_file() {
    let dir = tempdir();
    let f = dir.path().join("model.safetensors");
    let mut b = valid_file();
    b.truncate(b.len() - 1);
    std::fs::write(&f, b).unwrap();
    let out = dir.path().join("out");
    let o = bridgeflow()
        .args(["run", "pipelines/hf-to-bf16.toml", "--set"])
        .arg(format!("input={}", dir.path().display()))
        .arg("--set")
        .arg(format!("output={}", out.display()))
        .output()
        .unwrap();
    let m = text(&o);
    assert_eq!(o.status.code(), Some(1), "{m}");
    assert!(
        m.contains("stage 'read' (safetensors reader) failed: format error:"),
        "{m}"
    );
    assert!(m.contains(&f.display().to_string()), "{m}");
    assert!(!out.exists());
}

#[test]
fn index_naming_a_missing_tensor() {
    let dir = tempdir();
    std::fs::write(
        dir.path().join("model-00001-of-00001.safetensors"),
        valid_file(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00001.safetensors","zz":"model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    let o = bridgeflow()
        .arg("inspect")
        .arg(dir.path())
        .output()
        .unwrap();
    let m = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        m.contains("the index maps tensor 'zz' to this file, but the file has no such tensor"),
        "{m}"
    );
}

#[test]
fn verify_and_manifest_catch_changes() {
    let dir = tempdir();
    let src = fixtures().join("hf/llama");
    let out = dir.path().join("copy");
    reshard(dir.path(), &src, &out, "5GB");
    let verify = |a: &Path, b: &Path, tol: &str| {
        let p = format!(
            r#"
[stages.a]
plugin = "safetensors"
kind = "reader"
config = {{ path = "{}" }}

[stages.b]
plugin = "safetensors"
kind = "reader"
config = {{ path = "{}" }}

[stages.check]
plugin = "verify"
kind = "transform"
inputs = ["a", "b"]
config = {{ tolerance = {tol} }}
"#,
            a.display(),
            b.display()
        );
        run_text(dir.path(), &p, &[], 1 << 30)
    };
    verify(&src, &out, "0").unwrap();
    let e = verify(&src, &fixtures().join("hf/llama_bf16"), "0").unwrap_err();
    assert!(
        e.contains(
            "stage 'check' (verify transform) failed: mismatch error: 21 of 21 tensors failed"
        ),
        "{e}"
    );

    let manifest = out.join("bridgeflow-manifest.json");
    let check = |path: &Path| {
        let m = format!("manifest = \"{}\"", manifest.display());
        let p = chain(&[
            ("read", "safetensors", "reader", &path_cfg(path)),
            ("check", "verify-manifest", "transform", &m),
        ]);
        run_text(dir.path(), &p, &[], 1 << 30)
    };
    check(&out).unwrap();
    // Flip one byte of the last tensor's data.
    let f = out.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(&f, bytes).unwrap();
    let e = check(&out).unwrap_err();
    assert!(
        e.contains("1 of 21 tensors failed the manifest check"),
        "{e}"
    );
    assert!(e.contains("blake3"), "{e}");
}

fn dequant_pipeline(input: &Path, out: &Path) -> String {
    dequant_pipeline_with(input, out, "")
}

fn dequant_pipeline_with(input: &Path, out: &Path, config: &str) -> String {
    chain(&[
        ("read", "safetensors", "reader", &path_cfg(input)),
        ("dequant", "fp8-dequant", "transform", config),
        ("write", "safetensors", "writer", &path_cfg(out)),
    ])
}

/// Block-scaled FP8 (DeepSeek-V3's HF format) dequantized to bf16 equals Megatron-Bridge's own
/// `dequantize_fp8_blockwise`, bit for bit, on weights whose sides are not multiples of 128;
/// the scales are consumed, other tensors pass through; a scale of the wrong shape is named.
#[test]
fn fp8_block_scales_dequantize_as_megatron_bridge() {
    let dir = tempdir();
    let fx = workspace_root().join("tests/fixtures/fp8");
    let out = dir.path().join("out.safetensors");
    run_text(
        dir.path(),
        &dequant_pipeline(&fx.join("model.safetensors"), &out),
        &[],
        1 << 30,
    )
    .unwrap();
    let got = load_tensors(&out);
    let want = load_tensors(&fx.join("reference.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        assert!(got[k] == *w, "'{k}' differs from Bridge's dequantization");
    }
    // The same in blocks of rows (each counted as soon as it is made), placed by the writer.
    let out2 = dir.path().join("pieces.safetensors");
    let p = dequant_pipeline_with(&fx.join("model.safetensors"), &out2, "piece_bytes = 20000");
    let report = run_text(dir.path(), &p, &[], 1 << 30).unwrap();
    let dequant = report.stages.iter().find(|s| s.name == "dequant").unwrap();
    assert!(
        dequant.items_out > 4,
        "no pieces: {} items",
        dequant.items_out
    );
    assert_eq!(load_tensors(&out2), want);

    // A scale grid that does not fit its weight.
    let src = std::fs::read(fx.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&src[8..8 + n]).unwrap();
    header["c.weight_scale_inv"]["shape"] = serde_json::json!([2, 1]);
    let h = serde_json::to_vec(&header).unwrap();
    let mut bad = (h.len() as u64).to_le_bytes().to_vec();
    bad.extend(&h);
    bad.extend(&src[8 + n..]);
    let bad_path = dir.path().join("bad.safetensors");
    std::fs::write(&bad_path, bad).unwrap();
    let e = run_text(
        dir.path(),
        &dequant_pipeline(&bad_path, &dir.path().join("out2.safetensors")),
        &[],
        1 << 30,
    )
    .unwrap_err();
    assert!(
        e.contains("c.weight_scale_inv") && e.contains("[1, 2]"),
        "{e}"
    );
}

/// Re-quantization on export: the f32 weights the FP8 fixture was made from, quantized by
/// `fp8-quant`, give torch's FP8 bytes and DeepSeek's block scales exactly (scale = amax / 448,
/// round to nearest even), scales right after their weights; other tensors pass through.
#[test]
fn fp8_quantization_equals_torch() {
    let dir = tempdir();
    let fx = workspace_root().join("tests/fixtures/fp8");
    let out = dir.path().join("q.safetensors");
    let p = chain(&[
        (
            "read",
            "safetensors",
            "reader",
            &path_cfg(&fx.join("source.safetensors")),
        ),
        (
            "quant",
            "fp8-quant",
            "transform",
            r"include = '^[abc]\.weight$'",
        ),
        ("write", "safetensors", "writer", &path_cfg(&out)),
    ]);
    run_text(dir.path(), &p, &[], 1 << 30).unwrap();
    let got = load_tensors(&out);
    let want = load_tensors(&fx.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        assert!(got[k] == *w, "'{k}' differs from torch's quantization");
    }
}

/// compressed-tensors FP8_DYNAMIC (`scheme = "channel"`): one f32 `weight_scale` per output row,
/// amax / 448, and every element the E4M3 value nearest x / scale, so that scale · e4m3
/// reconstructs each weight within E4M3's half step; the rest passes through and config.json
/// gets vLLM's `compressed-tensors` quantization_config.
#[test]
fn fp8_channel_scales_for_vllm() {
    let dir = tempdir();
    let src = fixtures().join("vllm/_hf/llama");
    let out = dir.path().join("q");
    let p = chain(&[
        ("read", "safetensors", "reader", &path_cfg(&src)),
        (
            "quant",
            "fp8-quant",
            "transform",
            r#"scheme = "channel", include = '(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$'"#,
        ),
        ("write", "safetensors", "writer", &path_cfg(&out)),
    ]);
    run_text(dir.path(), &p, &[], 1 << 30).unwrap();
    let got = load_tensors(&out);
    let want = load_tensors(&src.join("model.safetensors"));
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let mut quantized = 0;
    for (k, w) in &want {
        let Some(scale) = got.get(&format!("{k}_scale")) else {
            assert!(got[k] == *w, "'{k}' should pass through");
            continue;
        };
        quantized += 1;
        let (rows, cols) = (w.shape[0], w.shape[1]);
        assert_eq!(scale.shape, [rows, 1]);
        let (x, s, q) = (f32s(&w.bytes), f32s(&scale.bytes), &got[k].bytes);
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(s[r], amax / 448.0, "{k} row {r}");
            for (c, &v) in row.iter().enumerate() {
                let back = bridgeflow_sdk::numeric::f8_e4m3_to_f64(q[r * cols + c]) as f32 * s[r];
                // E4M3 has 3 mantissa bits: a relative half step of 1/16 (coarser below 2^-6).
                assert!(
                    (back - v).abs() <= v.abs() / 16.0 + s[r] / 512.0 * 1.01,
                    "{k}[{r},{c}]: {v} -> {back}"
                );
            }
        }
    }
    assert_eq!(quantized, 14, "7 projections in each of 2 layers");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(
        q["config_groups"]["group_0"]["weights"]["strategy"],
        "channel"
    );
    assert_eq!(
        q["config_groups"]["group_0"]["input_activations"]["dynamic"],
        true
    );
}

//! GGUF export (llama.cpp, ollama): our files read back tensor by tensor (q/k rows in
//! llama.cpp's rope order), Q8_0 within its rounding, from Megatron the same bytes as from HF,
//! hostile files refused; and, against llama.cpp's own `convert_hf_to_gguf.py`, the same
//! metadata and the same tensor bytes (`tests/fixtures/shared/gguf/`).

use bridgeflow_tests::{bridgeflow, fixtures, load_tensors, tempdir, text, Loaded};
use std::collections::BTreeMap;
use std::path::Path;

fn run(args: &[&str]) -> String {
    let o = bridgeflow().args(args).output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{args:?}: {t}");
    t
}

fn to_gguf(from: &str, out: &Path, dtype: &str) {
    let to = format!("gguf:{}", out.display());
    run(&[
        "convert",
        "--from",
        from,
        "--to",
        &to,
        "--dtype",
        dtype,
        "--no-progress",
    ]);
}

/// A GGUF file's tensors, through our reader and the safetensors writer (Q8_0 comes out f32).
fn read_back(gguf: &Path, dir: &Path) -> BTreeMap<String, Loaded> {
    let out = dir.join("back");
    let pipeline = dir.join("back.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[stages.read]\nplugin = \"gguf\"\nkind = \"reader\"\nconfig = {{ path = {:?} }}\n\n\
             [stages.write]\nplugin = \"safetensors\"\nkind = \"writer\"\ninputs = [\"read\"]\nconfig = {{ path = {:?}, copy_side_files = false }}\n",
            gguf.display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    run(&["run", pipeline.to_str().unwrap(), "--no-progress"]);
    load_tensors(&out)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// HF's rows in llama.cpp's order: within each head, row 2i is HF's row i and row 2i + 1 HF's
/// row d/2 + i (independent of the writer's code: the numpy reshape/swapaxes of
/// `LlamaModel.permute`, spelled out).
fn permuted(x: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0f32; x.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for (j, src) in [(2 * i, i), (2 * i + 1, d / 2 + i)] {
                let (to, from) = ((h * d + j) * cols, (h * d + src) * cols);
                out[to..to + cols].copy_from_slice(&x[from..from + cols]);
            }
        }
    }
    out
}

/// GGUF name → (HF name, heads when q/k rows are permuted) for the Llama fixture.
fn hf_of(gguf: &str) -> (String, Option<usize>) {
    let fixed = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, hf)) = fixed.iter().find(|(g, _)| *g == gguf) {
        return (hf.to_string(), None);
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let (m, kind) = rest.rsplit_once('.').unwrap();
    let (module, heads) = match m {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(4)),
        "attn_k" => ("self_attn.k_proj", Some(2)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        other => panic!("unexpected {other}"),
    };
    (format!("model.layers.{l}.{module}.{kind}"), heads)
}

#[test]
fn llama_reads_back_in_llama_cpps_layout() {
    let tmp = tempdir();
    let src = fixtures().join("hf/llama");
    let hf = load_tensors(&src.join("model.safetensors"));
    for dtype in ["f32", "q8_0"] {
        let file = tmp.path().join(format!("llama-{dtype}.gguf"));
        to_gguf(&format!("hf:{}", src.display()), &file, dtype);
        let dir = tmp.path().join(dtype);
        std::fs::create_dir(&dir).unwrap();
        let back = read_back(&file, &dir);
        assert_eq!(back.len(), hf.len(), "one GGUF tensor per HF tensor");
        for (name, t) in &back {
            let (hf_name, heads) = hf_of(name);
            let w = &hf[&hf_name];
            assert_eq!(t.shape, w.shape, "{name}");
            let x = f32s(&w.bytes);
            let want = match heads {
                Some(h) => permuted(&x, w.shape[0], w.shape[1], h),
                None => x,
            };
            let got = f32s(&t.bytes);
            if dtype == "f32" || w.shape.len() == 1 {
                assert!(got == want, "{dtype} {name} differs from {hf_name}");
                continue;
            }
            // Q8_0: each block of 32 within half its step d = max |x| / 127, plus what rounding d
            // to f16 moves the largest code (127 · d · 2^-11).
            for (b, (g, x)) in got.chunks(32).zip(want.chunks(32)).enumerate() {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (g, x) in g.iter().zip(x) {
                    assert!(
                        (g - x).abs() <= amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7,
                        "{name} block {b}: {x} -> {g}"
                    );
                }
            }
        }
    }
}

#[test]
fn from_megatron_the_same_file() {
    let tmp = tempdir();
    let (a, b) = (tmp.path().join("hf.gguf"), tmp.path().join("mcore.gguf"));
    to_gguf(
        &format!("hf:{}", fixtures().join("hf/llama").display()),
        &a,
        "bf16",
    );
    let config = fixtures().join("hf/llama/config.json");
    let to = format!("gguf:{}", b.display());
    let from = format!("megatron:{}", fixtures().join("bridge/llama").display());
    run(&[
        "convert",
        "--from",
        &from,
        "--to",
        &to,
        "--dtype",
        "bf16",
        "--hf-config",
        config.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "GGUF from Megatron differs from GGUF from HF"
    );
}

#[test]
fn bad_inputs_and_files_are_named() {
    let tmp = tempdir();
    let out = tmp.path().join("x.gguf");
    let to = format!("gguf:{}", out.display());
    // A family llama.cpp's table here does not describe.
    let o = bridgeflow()
        .args([
            "convert",
            "--from",
            &format!("hf:{}", fixtures().join("hf/qwen3_moe").display()),
            "--to",
            &to,
            "--no-progress",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("is not supported"), "{}", text(&o));
    assert!(!out.exists());
    // A truncated GGUF file: inspect names it, no panic.
    let good = tmp.path().join("good.gguf");
    to_gguf(
        &format!("hf:{}", fixtures().join("hf/llama").display()),
        &good,
        "f16",
    );
    let bytes = std::fs::read(&good).unwrap();
    for cut in [10, 200, bytes.len() / 2] {
        let bad = tmp.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let o = bridgeflow()
            .args(["inspect", bad.to_str().unwrap()])
            .output()
            .unwrap();
        let t = text(&o);
        assert!(
            !o.status.success() && t.contains(&format!("cut{cut}.gguf")),
            "cut {cut}: {t}"
        );
        assert!(!t.contains("panicked"), "{t}");
    }
}

/// Byte for byte what llama.cpp's own `convert_hf_to_gguf.py` writes for the same model:
/// metadata (keys, order, values), tokenizer, tensor order, q/k permutation, F16/BF16 rounding,
/// Q8_0 blocks (`tests/fixtures/shared/gguf/README.md` says how the goldens were made).
#[test]
fn files_equal_llama_cpps_converter() {
    let cases = [
        ("llama-f32.gguf", "hf/llama", "f32"),
        ("llama-f16.gguf", "hf/llama", "f16"),
        ("llama-bf16.gguf", "hf/llama", "bf16"),
        ("llama-q8_0.gguf", "hf/llama", "q8_0"),
        ("qwen3-f32.gguf", "vllm/_hf/qwen3", "f32"),
        ("qwen3-q8_0.gguf", "vllm/_hf/qwen3", "q8_0"),
    ];
    let tmp = tempdir();
    for (golden, input, dtype) in cases {
        let out = tmp.path().join(golden);
        to_gguf(
            &format!("hf:{}", fixtures().join(input).display()),
            &out,
            dtype,
        );
        let want = std::fs::read(fixtures().join("gguf").join(golden)).unwrap();
        let got = std::fs::read(&out).unwrap();
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            got == want,
            "{golden}: {} vs {} bytes, first difference at {first:?}",
            got.len(),
            want.len()
        );
    }
}

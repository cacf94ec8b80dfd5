//! The serving exporters against what the engines' own tools wrote:
//!
//! - `convert --to trtllm:` against TensorRT-LLM 0.17's `convert_checkpoint.py` (17 cases: TP
//!   1/2/4, PP 2, MoE-TP × EP, fp32/bf16/fp16, tied and padded vocabularies, parallel
//!   embedding, qkv biases, a shared expert): every tensor of every rank file by sha256, and
//!   `config.json` key by key. The converter's three RoPE tables are the only tensors we leave
//!   out (the loader recomputes them).
//! - `convert --to vllm:` against vLLM 0.32's own `sharded_state` files (Llama fp32/bf16,
//!   Qwen3, Qwen3-MoE, Gemma 2 at TP 1 and 2): every tensor byte for byte, and no tensor more or
//!   less.
//! - From a Megatron checkpoint (through the models mapper) the same files as from HF.

use bridgeflow_tests::{bridgeflow, fixtures, load_tensors, tempdir, text, Loaded};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The tensors TensorRT-LLM's converter writes that we do not (the RoPE tables).
const ROPE_TABLES: [&str; 3] = [
    "embed_positions",
    "embed_positions_for_gpt_attention",
    "rotary_inv_freq",
];

fn convert(from: &str, to: &str, args: &[&str]) -> String {
    let o = bridgeflow()
        .args(["convert", "--from", from, "--to", to, "--no-progress"])
        .args(args)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "convert {from} -> {to} {args:?}: {t}");
    t
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn dtype_name(d: safetensors::Dtype) -> &'static str {
    match d {
        safetensors::Dtype::F32 => "float32",
        safetensors::Dtype::BF16 => "bfloat16",
        safetensors::Dtype::F16 => "float16",
        _ => "other",
    }
}

/// Our TensorRT-LLM checkpoint in `out` against golden `case`: same rank files, same tensors
/// (but the RoPE tables), same dtype, shape and sha256 each, same config.json.
fn same_as_trtllm(out: &Path, case: &str) {
    let golden = fixtures().join("trtllm").join(case);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(golden.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_object().unwrap();
    for (file, entry) in files {
        let ours = load_tensors(&out.join(file));
        let want = entry["tensors"].as_object().unwrap();
        let mut expected = Vec::new();
        for (name, t) in want
            .iter()
            .filter(|(n, _)| !ROPE_TABLES.contains(&n.as_str()))
        {
            let got = ours
                .get(name)
                .unwrap_or_else(|| panic!("{case} {file}: no {name}"));
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.shape, shape, "{case} {file} {name}: shape");
            assert_eq!(
                dtype_name(got.dtype),
                t["dtype"].as_str().unwrap(),
                "{case} {file} {name}: dtype"
            );
            assert_eq!(
                hex(&got.bytes),
                t["sha256"].as_str().unwrap(),
                "{case} {file} {name}: bytes"
            );
            expected.push(name.clone());
        }
        let extra: Vec<_> = ours.keys().filter(|k| !expected.contains(k)).collect();
        assert!(
            extra.is_empty(),
            "{case} {file}: tensors TensorRT-LLM does not write: {extra:?}"
        );
    }
    let mut rank_files: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    rank_files.sort();
    let mut want_files: Vec<String> = files.keys().cloned().collect();
    want_files.sort();
    assert_eq!(rank_files, want_files, "{case}: rank files");
    let cfg = |p: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(p.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(cfg(out), cfg(&golden), "{case}: config.json");
}

/// (golden case, HF input under fixtures, extra convert arguments).
const TRTLLM_CASES: &[(&str, &str, &[&str])] = &[
    ("llama-tp1", "hf/llama", &["--dtype", "fp32"]),
    ("llama-tp2", "hf/llama", &["--dtype", "fp32", "--tp", "2"]),
    ("llama-tp4", "hf/llama", &["--dtype", "fp32", "--tp", "4"]),
    (
        "llama-tp1-pp2",
        "hf/llama",
        &["--dtype", "fp32", "--pp", "2"],
    ),
    ("llama-tp1-bf16", "hf/llama", &["--dtype", "bf16"]),
    (
        "llama-tp2-bf16",
        "hf/llama",
        &["--dtype", "bf16", "--tp", "2"],
    ),
    (
        "llama-tp2-fp16",
        "hf/llama",
        &["--dtype", "fp16", "--tp", "2"],
    ),
    ("llama_bf16-tp2", "hf/llama_bf16", &["--tp", "2"]),
    (
        "llama_tied_v250-tp4",
        "trtllm/_hf/llama_tied_v250",
        &["--tp", "4"],
    ),
    (
        "llama_tied_v250-tp2-pe1",
        "trtllm/_hf/llama_tied_v250",
        &["--tp", "2", "--parallel-embedding", "1"],
    ),
    ("qwen2-tp1", "trtllm/_hf/qwen2", &[]),
    ("qwen2-tp2", "trtllm/_hf/qwen2", &["--tp", "2"]),
    ("mixtral-tp1", "trtllm/_hf/mixtral", &[]),
    ("mixtral-tp2", "trtllm/_hf/mixtral", &["--tp", "2"]),
    (
        "mixtral-tp2-ep2",
        "trtllm/_hf/mixtral",
        &["--tp", "2", "--ep", "2"],
    ),
    (
        "mixtral-tp2-bf16",
        "trtllm/_hf/mixtral",
        &["--tp", "2", "--dtype", "bf16"],
    ),
    ("qwen2_moe-tp1", "trtllm/_hf/qwen2_moe", &[]),
];

#[test]
fn trtllm_checkpoints_equal_tensorrt_llms_own() {
    for (case, input, args) in TRTLLM_CASES {
        let tmp = tempdir();
        let out = tmp.path().join("ckpt");
        let from = format!("hf:{}", fixtures().join(input).display());
        convert(&from, &format!("trtllm:{}", out.display()), args);
        same_as_trtllm(&out, case);
    }
}

/// Our sharded_state folder against vLLM's own: every rank file's tensors byte for byte.
fn same_as_vllm(out: &Path, case: &str) {
    let golden = fixtures().join("vllm").join(case);
    let ranks: Vec<_> = std::fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(!ranks.is_empty());
    for f in &ranks {
        let want = load_tensors(&golden.join(f));
        let got = load_tensors(&out.join(f));
        let names =
            |m: &BTreeMap<String, bridgeflow_tests::Loaded>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{case} {f}: tensor names");
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(
                (g.dtype, &g.shape),
                (w.dtype, &w.shape),
                "{case} {f} {name}"
            );
            assert!(g.bytes == w.bytes, "{case} {f} {name}: bytes differ");
        }
    }
    for side in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(
            out.join(side).is_file(),
            "{case}: no {side} (vLLM needs it)"
        );
    }
}

const VLLM_CASES: &[(&str, &str, &str)] = &[
    ("llama-tp1", "llama", "1"),
    ("llama-tp2", "llama", "2"),
    ("llama_bf16-tp1", "llama_bf16", "1"),
    ("qwen3-tp2", "qwen3", "2"),
    ("qwen3_moe-tp1", "qwen3_moe", "1"),
    ("qwen3_moe-tp2", "qwen3_moe", "2"),
    ("gemma2-tp2", "gemma2", "2"),
    ("deepseek_v3-tp1", "deepseek_v3", "1"),
    ("deepseek_v3-tp2", "deepseek_v3", "2"),
];

#[test]
fn vllm_sharded_state_equals_vllms_own() {
    for (case, model, tp) in VLLM_CASES {
        let tmp = tempdir();
        let out = tmp.path().join("sharded");
        let from = format!("hf:{}", fixtures().join("vllm/_hf").join(model).display());
        convert(&from, &format!("vllm:{}", out.display()), &["--tp", tp]);
        same_as_vllm(&out, case);
    }
}

/// Megatron-Bridge's torch_dist checkpoint of the Llama fixture, through the models mapper:
/// the TensorRT-LLM files equal those made from HF.
#[test]
fn from_megatron_the_same_files() {
    let tmp = tempdir();
    let out = tmp.path().join("ckpt");
    let bridge = fixtures().join("bridge/llama");
    let from = format!("megatron:{}", bridge.display());
    let hf_config = fixtures().join("hf/llama/config.json");
    let hf_config = hf_config.to_str().unwrap();
    convert(
        &from,
        &format!("trtllm:{}", out.display()),
        &["--tp", "2", "--dtype", "fp32", "--hf-config", hf_config],
    );
    same_as_trtllm(&out, "llama-tp2");
}

/// Refused by name, nothing left behind: a model the table does not describe, an input
/// tensor missing, a layout that does not divide.
#[test]
fn bad_inputs_are_named_and_leave_nothing() {
    let tmp = tempdir();
    let run = |from: &str, to: &str, args: &[&str]| {
        let o = bridgeflow()
            .args(["convert", "--from", from, "--to", to, "--no-progress"])
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{from} -> {to} {args:?} succeeded");
        text(&o)
    };
    let out = tmp.path().join("o");
    let to = format!("trtllm:{}", out.display());
    // GPT-OSS is not a TensorRT-LLM 0.17 family here.
    let gemma = format!("hf:{}", fixtures().join("hf/gemma2").display());
    let t = run(&gemma, &to, &[]);
    assert!(t.contains("Gemma2ForCausalLM is not supported"), "{t}");
    // KV heads that cannot be repeated over 3 ranks.
    let llama = format!("hf:{}", fixtures().join("hf/llama").display());
    let t = run(&llama, &to, &["--tp", "3"]);
    assert!(
        t.contains("does not split into 3") || t.contains("cannot be repeated"),
        "{t}"
    );
    // Copies of the model: one tensor missing, one a column short, a config calling for 10^12
    // layers — each refused by every exporter (and the FP8 pipeline), the tensor named.
    let src = fixtures().join("hf/llama");
    let tensors = load_tensors(&src.join("model.safetensors"));
    // A tensor as the copy keeps it (shape, bytes), or None to leave it out.
    type Edit<'a> = &'a dyn Fn(&str, &Loaded) -> Option<(Vec<usize>, Vec<u8>)>;
    let copy = |name: &str, edit: Edit| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let kept: Vec<_> = tensors
            .iter()
            .filter_map(|(n, t)| {
                edit(n, t).map(|(shape, bytes)| (n.as_str(), t.dtype, shape, bytes))
            })
            .collect();
        bridgeflow_tests::save_tensors(&dir.join("model.safetensors"), &kept);
        dir
    };
    const V: &str = "model.layers.1.self_attn.v_proj.weight";
    const DOWN: &str = "model.layers.0.mlp.down_proj.weight";
    let missing = copy("missing", &|n, t| {
        (n != V).then(|| (t.shape.clone(), t.bytes.clone()))
    });
    let short = copy("short", &|n, t| {
        if n != DOWN {
            return Some((t.shape.clone(), t.bytes.clone()));
        }
        // One column fewer: every row shortened by one element.
        let (rows, cols, width) = (
            t.shape[0],
            t.shape[1],
            t.bytes.len() / (t.shape[0] * t.shape[1]),
        );
        let bytes = t
            .bytes
            .chunks(cols * width)
            .flat_map(|r| r[..(cols - 1) * width].to_vec())
            .collect();
        Some((vec![rows, cols - 1], bytes))
    });
    let huge = copy("huge", &|_, t| Some((t.shape.clone(), t.bytes.clone())));
    let mut cfg: Value = json(huge.join("config.json"));
    cfg["num_hidden_layers"] = 1_000_000_000_000u64.into();
    std::fs::write(huge.join("config.json"), cfg.to_string()).unwrap();
    let gguf = tmp.path().join("o.gguf");
    for to in [
        to.clone(),
        format!("vllm:{}", out.display()),
        format!("gguf:{}", gguf.display()),
    ] {
        let t = run(&format!("hf:{}", missing.display()), &to, &[]);
        assert!(t.contains("1 missing") && t.contains(V), "{to}: {t}");
        let t = run(&format!("hf:{}", short.display()), &to, &[]);
        assert!(t.contains("1 misshapen") && t.contains(DOWN), "{to}: {t}");
        let t = run(&format!("hf:{}", huge.display()), &to, &[]);
        assert!(
            t.contains("'num_hidden_layers' is 1000000000000"),
            "{to}: {t}"
        );
    }
    assert!(!gguf.exists(), "a GGUF file was left behind");
    let o = bridgeflow()
        .arg("run")
        .arg(bridgeflow_tests::workspace_root().join("pipelines/hf-to-vllm-fp8.toml"))
        .args(["--set", &format!("input={}", short.display())])
        .args(["--set", &format!("output={}", out.display())])
        .arg("--no-progress")
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains(DOWN),
        "{}",
        text(&o)
    );
    // An option the exporter does not take.
    let t = run(&llama, &format!("vllm:{}", out.display()), &["--pp", "2"]);
    assert!(t.contains("--pp does not apply"), "{t}");
    assert!(!out.exists(), "an output was left behind");
    assert!(bridgeflow_tests::leftovers(tmp.path()).is_empty());
}

/// Runs an FP8 pipeline on the Llama fixture into a fresh folder.
fn fp8_export(pipeline: &str, tmp: &Path) -> std::path::PathBuf {
    let out = tmp.join("fp8");
    let o = bridgeflow()
        .args(["run", pipeline, "--no-progress"])
        .args([
            "--set",
            &format!("input={}", fixtures().join("hf/llama").display()),
        ])
        .args(["--set", &format!("output={}", out.display())])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    out
}

/// `ours` against ModelOpt's `theirs` (the RoPE tables aside): the same names, dtypes and
/// shapes, every tensor byte for byte but the calibrated activation scales (names ending in
/// `calibrated`), which must be within 1 % — our calibration pass runs in fp32, ModelOpt's in
/// bf16 (0.5 % apart on this model). Returns how many were calibrated.
fn same_as_modelopt(
    ours: &BTreeMap<String, bridgeflow_tests::Loaded>,
    theirs: &BTreeMap<String, bridgeflow_tests::Loaded>,
    calibrated: &str,
) -> usize {
    let kept: Vec<&String> = theirs
        .keys()
        .filter(|n| !ROPE_TABLES.contains(&n.as_str()))
        .collect();
    assert_eq!(ours.keys().collect::<Vec<_>>(), kept);
    let f32_of = |b: &[u8]| f32::from_le_bytes(b.try_into().unwrap());
    let mut n = 0;
    for name in kept {
        let (g, t) = (&ours[name], &theirs[name]);
        assert_eq!((g.dtype, &g.shape), (t.dtype, &t.shape), "{name}");
        if name.ends_with(calibrated) {
            let (a, b) = (f32_of(&g.bytes), f32_of(&t.bytes));
            assert!((a - b).abs() <= 0.01 * b, "{name}: {a} vs ModelOpt's {b}");
            n += 1;
        } else {
            assert!(g.bytes == t.bytes, "{name} differs from ModelOpt's");
        }
    }
    n
}

fn json(p: std::path::PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// ModelOpt's unified HF FP8 checkpoint (`pipelines/hf-to-modelopt-fp8.toml`: calibrate, then
/// fp8-static) against the one ModelOpt 0.37 wrote for the same model and calibration input (the
/// reference sequence and its reverse): every e4m3 weight byte, weight scale, KV-cache scale and
/// bf16 tensor equal, the activation scales within 1 %; `quantization_config` and
/// `hf_quant_config.json` equal.
#[test]
fn modelopt_fp8_equals_modelopts_own() {
    let tmp = tempdir();
    let out = fp8_export("pipelines/hf-to-modelopt-fp8.toml", tmp.path());
    let golden = fixtures().join("trtllm/llama-fp8-hf-bf16");
    let n = same_as_modelopt(
        &load_tensors(&out),
        &load_tensors(&golden.join("model.safetensors")),
        ".input_scale",
    );
    assert_eq!(n, 14);
    assert_eq!(
        json(out.join("config.json"))["quantization_config"],
        json(golden.join("config.json"))["quantization_config"]
    );
    assert_eq!(json(out.join("config.json"))["dtype"], "bfloat16");
    assert_eq!(
        json(out.join("hf_quant_config.json")),
        json(golden.join("hf_quant_config.json"))
    );
}

/// TensorRT-LLM FP8 (`pipelines/hf-to-trtllm-fp8.toml`: calibrate, fp8-static in TensorRT-LLM's
/// scale layout, the trtllm exporter) against the checkpoint ModelOpt 0.37's
/// `export_tensorrt_llm_checkpoint` wrote: every e4m3 weight (one scale per fused qkv and
/// gate/up), weight and KV-cache factor and bf16 tensor equal, the activation factors within 1 %,
/// `config.json` (ModelOpt's own keys) equal.
#[test]
fn trtllm_fp8_equals_modelopts_own() {
    let tmp = tempdir();
    let out = fp8_export("pipelines/hf-to-trtllm-fp8.toml", tmp.path());
    let golden = fixtures().join("trtllm/llama-fp8-tp1-bf16");
    let (ours, theirs) = (
        load_tensors(&out.join("rank0.safetensors")),
        load_tensors(&golden.join("rank0.safetensors")),
    );
    assert_eq!(
        same_as_modelopt(&ours, &theirs, "activation_scaling_factor"),
        10
    );
    assert_eq!(
        json(out.join("config.json")),
        json(golden.join("config.json"))
    );
}

/// DeepSeek-V3 as transformers saves it — `num_nextn_predict_layers: 1` in the config, no MTP
/// weights — goes to Megatron and back (the HF export vLLM serves) bit for bit, the missing MTP
/// layers said, not silently assumed.
#[test]
fn deepseek_without_mtp_weights_round_trips() {
    let tmp = tempdir();
    let src = fixtures().join("vllm/_hf/deepseek_v3");
    let (mcore, hf) = (tmp.path().join("mcore"), tmp.path().join("hf"));
    let t = convert(
        &format!("hf:{}", src.display()),
        &format!("megatron:{}", mcore.display()),
        &[],
    );
    assert!(
        t.contains("multi-token-prediction layer(s) but the checkpoint has none"),
        "{t}"
    );
    let config = src.join("config.json");
    convert(
        &format!("megatron:{}", mcore.display()),
        &format!("hf:{}", hf.display()),
        &["--hf-config", config.to_str().unwrap()],
    );
    let (a, b) = (
        load_tensors(&src.join("model.safetensors")),
        load_tensors(&hf),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(
        a.iter().all(|(n, t)| b[n] == *t),
        "round trip changed a tensor"
    );
}

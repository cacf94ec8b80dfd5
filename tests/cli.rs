//! The `bridgeflow` command as people use it.

use bridgeflow_tests::*;

#[test]
fn help_everywhere() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["validate", "--help"],
        vec!["plugins", "--help"],
        vec!["inspect", "--help"],
    ] {
        let o = bridgeflow().args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}");
        assert!(
            text(&o).contains("Usage: bridgeflow"),
            "{args:?}: {}",
            text(&o)
        );
    }
    let o = bridgeflow().args(["run", "--help"]).output().unwrap();
    let m = text(&o);
    assert!(m.contains("--memory-budget") && m.contains("--set"), "{m}");
}

#[test]
fn plugins_lists_name_version_kinds_file() {
    let o = bridgeflow().args(["plugins", "--json"]).output().unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = v["plugins"].as_array().unwrap();
    let st = list.iter().find(|p| p["name"] == "safetensors").unwrap();
    assert_eq!(st["kinds"], serde_json::json!(["reader", "writer"]));
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(st["file"]
        .as_str()
        .unwrap()
        .contains("bridgeflow_plugin_safetensors"));

    let o = bridgeflow()
        .args(["plugins", "--schema", "cast"])
        .output()
        .unwrap();
    let m = text(&o);
    assert!(
        m.contains("\"to\"") && m.contains("round to nearest even"),
        "{m}"
    );
}

#[test]
fn inspect_shows_tensors_and_totals() {
    let fx = fixtures().join("hf/llama");
    let o = bridgeflow().arg("inspect").arg(&fx).output().unwrap();
    let m = text(&o);
    assert!(o.status.success(), "{m}");
    assert!(m.contains("model.layers.0.self_attn.q_proj.weight"), "{m}");
    assert!(m.contains("21 tensors, 106816 parameters"), "{m}");

    let o = bridgeflow()
        .arg("inspect")
        .arg("--json")
        .arg(&fx)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["reader"], "safetensors");
    assert_eq!(v["total_bytes"], 106816 * 4);
    let t = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "lm_head.weight")
        .unwrap();
    assert_eq!(t["dtype"], "F32");
    assert_eq!(t["shape"], serde_json::json!([256, 64]));
}

#[test]
fn inspect_of_something_unreadable() {
    let dir = tempdir();
    let o = bridgeflow()
        .arg("inspect")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("no reader plugin recognises"),
        "{}",
        text(&o)
    );
}

#[test]
fn validate_and_run_report_exit_codes() {
    let o = bridgeflow()
        .args(["validate", "pipelines/hf-to-bf16.toml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ok, 3 stages"));

    let o = bridgeflow()
        .args(["validate", "pipelines/nope.toml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("pipelines/nope.toml: cannot read pipeline file"),
        "{}",
        text(&o)
    );

    let dir = tempdir();
    let report = dir.path().join("report.json");
    let o = bridgeflow()
        .args([
            "run",
            "pipelines/hf-to-bf16.toml",
            "--memory-budget",
            "64KiB",
            "--set",
        ])
        .arg(format!("output={}", dir.path().join("o").display()))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    assert_eq!(r["budget"], 65536);
    assert!(r["peak_in_flight"].as_u64().unwrap() <= 65536 + 32768);
    assert!(text(&o).contains("peak tensor data in flight"));

    let o = bridgeflow()
        .args([
            "run",
            "pipelines/hf-to-bf16.toml",
            "--memory-budget",
            "lots",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("invalid size 'lots'"), "{}", text(&o));
}

#[test]
fn rust_log_turns_on_stage_logs() {
    let dir = tempdir();
    let o = bridgeflow()
        .env("RUST_LOG", "info")
        .args(["run", "pipelines/hf-to-bf16.toml", "--set"])
        .arg(format!("output={}", dir.path().join("o").display()))
        .output()
        .unwrap();
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(
        m.contains("stage{name=cast plugin=cast kind=transform}"),
        "{m}"
    );
    assert!(m.contains("finished"), "{m}");
}

#[test]
fn convert_both_ways() {
    let dir = tempdir();
    let mcore = dir.path().join("m");
    let hf = dir.path().join("h");
    let fx = fixtures().join("hf/llama");
    let o = bridgeflow()
        .arg("convert")
        .arg("--from")
        .arg(format!("hf:{}", fx.display()))
        .arg("--to")
        .arg(format!("megatron:{}", mcore.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = bridgeflow()
        .arg("convert")
        .arg("--from")
        .arg(format!("megatron:{}", mcore.display()))
        .arg("--to")
        .arg(format!("hf:{}", hf.display()))
        .output()
        .unwrap();
    // Without --hf-config: the config is rebuilt from the checkpoint's run_config.yaml.
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        load_tensors(&hf),
        load_tensors(&fx.join("model.safetensors"))
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    let orig: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("config.json")).unwrap()).unwrap();
    for k in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
        "tie_word_embeddings",
    ] {
        assert_eq!(cfg[k], orig[k], "{k}");
    }
    let hf = dir.path().join("h2");
    let o = bridgeflow()
        .arg("convert")
        .arg("--from")
        .arg(format!("megatron:{}", mcore.display()))
        .arg("--to")
        .arg(format!("hf:{}", hf.display()))
        .arg("--hf-config")
        .arg(fx.join("config.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        load_tensors(&hf),
        load_tensors(&fx.join("model.safetensors"))
    );
}

/// One-line moves through Megatron-LM's format: torch_dist → Megatron-LM TP2·PP2 → HF (bit
/// for bit), and an HF export from Megatron-LM without a config is refused with the fix named.
#[test]
fn convert_through_megatron_lm() {
    let dir = tempdir();
    let fx = fixtures().join("hf/llama");
    let mlm = dir.path().join("mlm");
    let run = |args: &[String]| {
        let o = bridgeflow().arg("convert").args(args).output().unwrap();
        (o.status.success(), text(&o))
    };
    let (ok, t) = run(&[
        "--from".into(),
        format!("megatron:{}", fixtures().join("bridge/llama").display()),
        "--to".into(),
        format!("megatron-lm:{}", mlm.display()),
        "--tp=2".into(),
        "--pp=2".into(),
    ]);
    assert!(ok, "{t}");
    assert!(mlm
        .join("iter_0000000/mp_rank_01_001/model_optim_rng.pt")
        .is_file());
    let hf = dir.path().join("hf");
    let (ok, t) = run(&[
        "--from".into(),
        format!("megatron-lm:{}", mlm.display()),
        "--to".into(),
        format!("hf:{}", hf.display()),
    ]);
    assert!(!ok && t.contains("--hf-config"), "{t}");
    let (ok, t) = run(&[
        "--from".into(),
        format!("megatron-lm:{}", mlm.display()),
        "--to".into(),
        format!("hf:{}", hf.display()),
        "--hf-config".into(),
        fx.join("config.json").display().to_string(),
    ]);
    assert!(ok, "{t}");
    assert_eq!(
        load_tensors(&hf),
        load_tensors(&fx.join("model.safetensors"))
    );
}

#[test]
fn verify_command() {
    let fx = fixtures().join("hf/llama");
    let o = bridgeflow()
        .arg("verify")
        .arg("--a")
        .arg(&fx)
        .arg("--b")
        .arg(&fx)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("21 tensors: 21 exact"), "{}", text(&o));
    let bf16 = fixtures().join("hf/llama_bf16");
    let o = bridgeflow()
        .arg("verify")
        .arg("--a")
        .arg(&fx)
        .arg("--b")
        .arg(&bf16)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("21 of 21 tensors failed verification"),
        "{}",
        text(&o)
    );
    let o = bridgeflow()
        .arg("verify")
        .arg("--logits")
        .arg(fixtures().join("bridge/llama"))
        .arg("--hf")
        .arg(&fx)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("top-1 agreement 16/16"), "{}", text(&o));
    let o = bridgeflow().arg("verify").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// Every bundled pipeline file is valid as shipped (plugins, kinds, inputs, configs).
#[test]
fn every_bundled_pipeline_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(workspace_root().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            let o = bridgeflow().arg("validate").arg(&path).output().unwrap();
            assert!(o.status.success(), "{}: {}", path.display(), text(&o));
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} pipelines found");
}

/// Parallel degrees out of range are refused with the option named, before anything is sized
/// from them (`--pp 4294967296` once aborted on a 32 GiB allocation; `--tp 0 --pp 0` were
/// written into the checkpoint). The plugins refuse them in their configs too.
#[test]
fn parallel_degrees_out_of_range_are_refused_naming_the_option() {
    let dir = tempdir();
    let fx = fixtures().join("hf/llama");
    for (opt, value, to) in [
        ("--tp", "0", "megatron"),
        ("--pp", "0", "megatron"),
        ("--pp", "4294967296", "megatron-lm"),
        ("--vpp", "4294967296", "megatron-lm"),
        ("--ep", "0", "megatron-lm"),
        ("--tp", "65537", "megatron"),
    ] {
        let out = dir.path().join(format!("o{}{value}", &opt[2..]));
        let o = bridgeflow()
            .arg("convert")
            .arg("--from")
            .arg(format!("hf:{}", fx.display()))
            .arg("--to")
            .arg(format!("{to}:{}", out.display()))
            .arg(format!("{opt}={value}"))
            .output()
            .unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{opt} {value}: {t}");
        assert!(
            t.contains(opt) && t.contains("1..=65536"),
            "{opt} {value}: {t}"
        );
        assert!(!out.exists(), "{opt} {value}");
    }
    // Model checks still name the model's limit: 2 query groups over 4 ranks.
    let out = dir.path().join("tp4");
    let o = bridgeflow()
        .arg("convert")
        .arg("--from")
        .arg(format!("hf:{}", fx.display()))
        .arg("--to")
        .arg(format!("megatron:{}", out.display()))
        .arg("--tp=4")
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("query groups"),
        "{}",
        text(&o)
    );
    // Pipeline files: the writers' configs.
    for (writer, cfg, want) in [
        (
            "torch-dist",
            "tp = 0",
            "tp = 0: a parallel degree is from 1 to 65536",
        ),
        (
            "torch-dist",
            "pp = 4294967296",
            "pp = 4294967296: a parallel degree",
        ),
        (
            "torch-dist",
            "files = 100000",
            "files = 100000: at most 256",
        ),
        (
            "megatron-lm",
            "vpp = 4294967296",
            "vpp = 4294967296: a parallel degree",
        ),
        (
            "megatron-lm",
            "pp = 2, vpp = 2",
            "pp = 2, vpp = 2: 4 pipeline chunks for 2 layers",
        ),
        (
            "megatron-lm",
            "tp = 256, pp = 256, ep = 2",
            "tp × pp × ep = 256 × 256 × 2",
        ),
    ] {
        let out = dir.path().join("w");
        let p = dir.path().join("p.toml");
        let pipeline = chain(&[
            ("read", "safetensors", "reader", &path_cfg(&fx)),
            ("map", "models", "mapper", r#"direction = "to-megatron""#),
            (
                "write",
                writer,
                "writer",
                &format!("{}, {cfg}", path_cfg(&out)),
            ),
        ]);
        std::fs::write(&p, pipeline).unwrap();
        let o = bridgeflow().arg("run").arg(&p).output().unwrap();
        let t = text(&o);
        // Refused as a config (exit status 2), or at planning against the model (1).
        assert!(
            matches!(o.status.code(), Some(1 | 2)),
            "{writer} {cfg}: {t}"
        );
        assert!(t.contains(want), "{writer} {cfg}: {t}");
        assert!(!out.exists(), "{writer} {cfg}");
    }
}

/// Re-sharding torch_dist → torch_dist keeps the checkpoint's `run_config.yaml` (its parallel
/// sizes now the new layout's), so the result still exports to HF on its own, bit for bit.
#[test]
fn resharding_torch_dist_keeps_run_config() {
    let dir = tempdir();
    let fx = fixtures().join("hf/llama");
    let run = |args: &[String]| {
        let o = bridgeflow().arg("convert").args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    };
    let a = dir.path().join("a");
    run(&[
        "--from".into(),
        format!("hf:{}", fx.display()),
        "--to".into(),
        format!("megatron:{}", a.display()),
    ]);
    // Ours (bridgeflow's run config) and Megatron-Bridge's.
    for (name, src) in [
        ("ours", a.clone()),
        ("bridge", fixtures().join("bridge/llama")),
    ] {
        let b = dir.path().join(format!("{name}-tp2pp2"));
        run(&[
            "--from".into(),
            format!("megatron:{}", src.display()),
            "--to".into(),
            format!("megatron:{}", b.display()),
            "--tp=2".into(),
            "--pp=2".into(),
        ]);
        let rc = std::fs::read_to_string(b.join("iter_0000000/run_config.yaml"))
            .unwrap_or_else(|e| panic!("{name}: no run_config.yaml: {e}"));
        assert!(rc.contains("tensor_model_parallel_size: 2"), "{name}: {rc}");
        assert!(
            rc.contains("pipeline_model_parallel_size: 2"),
            "{name}: {rc}"
        );
        let original = std::fs::read_to_string(
            std::fs::read_dir(&src)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path().join("run_config.yaml")))
                .find(|p| p.is_file())
                .unwrap(),
        )
        .unwrap();
        let unchanged = |t: &str| {
            t.lines()
                .filter(|l| !l.contains("_model_parallel_size:"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(unchanged(&rc), unchanged(&original), "{name}");
        assert!(b.join("iter_0000000/bridgeflow-manifest.json").is_file());
        let o = bridgeflow()
            .args(["verify", "--manifest"])
            .arg(&b)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o));
        // No --hf-config: the config comes from the carried run_config.yaml.
        let hf = dir.path().join(format!("{name}-hf"));
        run(&[
            "--from".into(),
            format!("megatron:{}", b.display()),
            "--to".into(),
            format!("hf:{}", hf.display()),
        ]);
        assert_eq!(
            load_tensors(&hf),
            load_tensors(&fx.join("model.safetensors")),
            "{name}"
        );
    }
}

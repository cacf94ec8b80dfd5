//! Inputs truncated while a run reads them: the reader, a writer writing out of the reader's
//! memory map, and anything touching the map's pages get an error naming the input, never
//! SIGBUS or "Bad address" against the output. The real plugin libraries, loaded as cdylibs
//! (each with its own copy of the SDK's guard). In their own test binary: a truncated input
//! fails every later commit check of the process, as it must.
#![cfg(target_os = "linux")]

use bridgeflow_sdk::reexports::RVec;
use bridgeflow_sdk::{Buffer, Emitter, Item, StageKind, StreamPlan};
use bridgeflow_tests::*;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// Four f32 tensors of 256 KiB each.
fn make_input(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<Vec<u8>> = (0..4)
        .map(|k| f32_bytes(&vec![k as f32 + 1.0; 256 * 256]))
        .collect();
    let names = ["t0", "t1", "t2", "t3"];
    let tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = names
        .iter()
        .zip(data)
        .map(|(n, d)| (*n, Dtype::F32, vec![256, 256], d))
        .collect();
    save_tensors(&p, &tensors);
    p
}

fn truncate(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn create(
    host: &bridgeflow_core::host::PluginHost,
    plugin: &str,
    kind: StageKind,
    cfg: serde_json::Value,
) -> bridgeflow_sdk::StageBox {
    let pl = host.plugin(plugin).expect("plugin loaded");
    host.create(pl, kind, &cfg.to_string()).unwrap()
}

fn read_all(reader: &mut bridgeflow_sdk::StageBox) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    let mut push = |i: Item| {
        items.push(i);
        Ok(())
    };
    Emitter::scoped(&mut push, None, |em| reader.run(em).into_result())
        .map_err(|e| e.to_string())?;
    Ok(items)
}

#[test]
fn a_writer_writing_out_of_a_truncated_input_names_the_input_and_nothing_crashes() {
    let dir = tempdir();
    let input = make_input(dir.path(), "in.safetensors");
    let host = host();
    let mut reader = create(
        &host,
        "safetensors",
        StageKind::Reader,
        serde_json::json!({ "path": input }),
    );
    let plan: StreamPlan = reader.plan(RVec::new()).into_result().unwrap().remove(0);
    let items = read_all(&mut reader).unwrap();
    let views: Vec<Buffer> = items
        .iter()
        .map(|i| match i {
            Item::Tensor(t) => t.data.clone(),
            _ => unreachable!(),
        })
        .collect();
    // The first tensor and part of the second stay in the file.
    truncate(&input, 300 << 10);

    // The writer's write(2) from the mapped view fails with EFAULT: reported as the input's.
    let out = dir.path().join("out");
    let mut writer = create(
        &host,
        "safetensors",
        StageKind::Writer,
        serde_json::json!({ "path": out, "fsync": false }),
    );
    writer.plan(vec![plan].into()).into_result().unwrap();
    let mut first_error = None;
    for item in items {
        let mut none = |_: Item| Ok(());
        let r = Emitter::scoped(&mut none, None, |em| {
            writer.process(0, item, em).into_result()
        });
        if let Err(e) = r {
            first_error = Some(e.to_string());
            break;
        }
    }
    writer.abort();
    let e = first_error.expect("writing a truncated input fails");
    let want = format!("input {} was truncated while being read", input.display());
    assert!(e.contains(&want), "{e}");
    assert!(
        !e.contains("Bad address") || e.starts_with("io error: input"),
        "{e}"
    );

    // Touching the pages past the new end in this process: the reader library's guard turns
    // SIGBUS into zeros and poisons its map (this test would die of SIGBUS otherwise).
    let sum: f64 = views
        .iter()
        .flat_map(|b| b.chunks_exact(4))
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .sum();
    assert!(
        sum < (1.0 + 2.0 + 3.0 + 4.0) * 65536.0,
        "zeros past the end"
    );
    // The commit check, asked from this binary's copy of the SDK, finds the plugin's map.
    let e = bridgeflow_sdk::inputs_intact().unwrap_err();
    assert!(e.message.contains(&want), "{e}");
    drop(views);
    // Still after the map is gone (a writer may commit after the reader let go of it).
    let e = bridgeflow_sdk::inputs_intact().unwrap_err();
    assert!(e.message.contains(&input.display().to_string()), "{e}");
}

#[test]
fn a_reader_whose_input_shrank_after_planning_names_it() {
    let dir = tempdir();
    let input = make_input(dir.path(), "shrunk.safetensors");
    let host = host();
    let mut reader = create(
        &host,
        "safetensors",
        StageKind::Reader,
        serde_json::json!({ "path": input }),
    );
    reader.plan(RVec::new()).into_result().unwrap();
    truncate(&input, 100 << 10);
    let e = read_all(&mut reader).unwrap_err();
    assert!(
        e.contains(&format!(
            "input {} was truncated while being read",
            input.display()
        )),
        "{e}"
    );
}

/// The fuzzer's case, end to end: `bridgeflow run` (safetensors → safetensors) while the input
/// is truncated under it. Wherever the truncation lands (the reader's check, a writer's write
/// from the map, a page touched), the run fails naming the input, is never killed by a signal,
/// and leaves no output. A run that finished before the truncation is fine (and retried).
#[test]
fn a_run_whose_input_is_truncated_meanwhile_fails_naming_it() {
    let dir = tempdir();
    let input = dir.path().join("big.safetensors");
    let tensors: Vec<(String, Vec<u8>)> = (0..32)
        .map(|k| (format!("w{k:02}"), vec![k as u8 + 1; 4 << 20]))
        .collect();
    let list: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d)| (n.as_str(), Dtype::U8, vec![d.len()], d.clone()))
        .collect();
    let mut failed = 0;
    for attempt in 0..6 {
        save_tensors(&input, &list);
        let out = dir.path().join(format!("out{attempt}"));
        let pipeline = dir.path().join("p.toml");
        std::fs::write(
            &pipeline,
            read_write(
                "safetensors",
                &path_cfg(&input),
                "safetensors",
                &path_cfg(&out),
            ),
        )
        .unwrap();
        let mut child = bridgeflow()
            .args(["run", "--memory-budget", "16MiB"])
            .arg(&pipeline)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Once the writer has its staging folder, data is about to flow.
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(20) {
            let staged = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!(".out{attempt}"))
                });
            if staged || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        truncate(&input, 1 << 20);
        let o = child.wait_with_output().unwrap();
        let t = text(&o);
        assert!(
            o.status.code().is_some(),
            "killed by a signal: {:?} {t}",
            o.status
        );
        if o.status.success() {
            continue; // finished before the truncation
        }
        assert!(t.contains(&input.display().to_string()), "{t}");
        assert!(!out.exists(), "{t}");
        failed += 1;
        if failed >= 2 {
            break;
        }
    }
    assert!(failed > 0, "no run saw the truncation");
}

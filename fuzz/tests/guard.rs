//! The harness itself: a panic, a refused allocation and a hang are findings with their inputs
//! saved; an abort (an infallible allocation refused) and a stack overflow take the process
//! down, and the input is on disk first (checked in a child process).

use bridgeflow_fuzz::harness::{self, Options};
use bridgeflow_fuzz::mutate::Kind;
use bridgeflow_fuzz::targets::{Call, Target};
use std::process::Command;

fn target(name: &'static str, make: fn() -> Call) -> Target {
    Target {
        name,
        about: "harness self-test",
        kind: Kind::Binary,
        max_len: 64,
        seeds: || vec![b"ok".to_vec(), b"bad!".to_vec()],
        make,
        custom: None,
    }
}

/// The in-process tests' crash files go to a folder of their own, not fuzz/crashes.
fn quiet_crash_dir() {
    if std::env::var_os("BRIDGEFLOW_FUZZ_CRASHES").is_some() {
        return; // a child: the parent said where
    }
    let dir = std::env::temp_dir().join(format!("bridgeflow-fuzz-selftest-{}", std::process::id()));
    bridgeflow_fuzz::guard::set_crash_dir(&dir);
}

fn opts(iterations: u64) -> Options {
    quiet_crash_dir();
    Options {
        iterations,
        verbose: false,
        ..Default::default()
    }
}

#[test]
fn panics_are_findings_with_a_minimised_input() {
    let t = target("selftest-panic", || {
        Box::new(|b| {
            if b.contains(&b'!') {
                panic!("a bang in {} bytes", b.len());
            }
            Err("no".into())
        })
    });
    let st = harness::run(&t, &opts(50));
    assert_eq!(st.findings.len(), 1, "{:?}", st.findings);
    let f = &st.findings[0];
    assert_eq!(f.kind, "panic");
    assert!(
        f.message.contains("a bang in") && f.message.contains("guard.rs"),
        "{}",
        f.message
    );
    assert_eq!(f.input, b"!", "minimised");
    assert!(f.saved.as_ref().is_some_and(|p| p.is_file()));
    let _ = std::fs::remove_file(f.saved.as_ref().unwrap());
}

#[test]
fn a_huge_fallible_allocation_is_refused_and_reported() {
    let t = target("selftest-alloc", || {
        Box::new(|b| {
            let mut v: Vec<u8> = Vec::new();
            if b.starts_with(b"bad") {
                // 4 GiB: refused by the guard, seen by the caller as an error.
                return v.try_reserve(4 << 30).map_err(|e| e.to_string());
            }
            Ok(())
        })
    });
    let st = harness::run(
        &t,
        &Options {
            minimize: false,
            ..opts(0)
        },
    );
    assert_eq!(st.findings.len(), 1, "{:?}", st.findings);
    assert_eq!(st.findings[0].kind, "alloc");
    assert!(
        st.findings[0].message.contains("4294967296"),
        "{}",
        st.findings[0].message
    );
    let _ = std::fs::remove_file(st.findings[0].saved.as_ref().unwrap());
}

#[test]
fn a_slow_call_is_a_hang() {
    let t = target("selftest-hang", || {
        Box::new(|b| {
            if b.starts_with(b"bad") {
                std::thread::sleep(std::time::Duration::from_millis(2100));
            }
            Ok(())
        })
    });
    let st = harness::run(
        &t,
        &Options {
            minimize: false,
            ..opts(0)
        },
    );
    assert_eq!(st.findings.len(), 1, "{:?}", st.findings);
    assert_eq!(st.findings[0].kind, "hang");
    let _ = std::fs::remove_file(st.findings[0].saved.as_ref().unwrap());
}

/// In the child: the case named by the environment, run as a target (never returns).
#[test]
fn child_case() {
    let Ok(case) = std::env::var("BRIDGEFLOW_FUZZ_SELFTEST") else {
        return;
    };
    let t = match case.as_str() {
        "abort" => target("selftest-abort", || {
            Box::new(|b| {
                // An infallible 8 GiB allocation: refused, so std aborts.
                let v = vec![1u8; (8usize << 30) + b.len()];
                std::hint::black_box(&v);
                Ok(())
            })
        }),
        _ => target("selftest-overflow", || {
            Box::new(|b| {
                #[allow(unconditional_recursion)]
                fn deep(n: u64) -> u64 {
                    let pad = std::hint::black_box([n; 64]);
                    pad[3] + deep(n + 1)
                }
                std::hint::black_box(deep(b.len() as u64));
                Ok(())
            })
        }),
    };
    harness::run_on_thread(t, opts(0));
    unreachable!("the process went down");
}

fn in_child(case: &str) -> (std::process::ExitStatus, String, Vec<std::path::PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_case",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("BRIDGEFLOW_FUZZ_SELFTEST", case)
        .env("BRIDGEFLOW_FUZZ_CRASHES", dir.path())
        .output()
        .unwrap();
    let files = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        files,
    )
}

#[test]
fn an_abort_keeps_the_input() {
    let (status, err, files) = in_child("abort");
    assert!(!status.success());
    assert!(
        err.contains("FINDING [selftest-abort] an allocation of 8589934594 bytes was refused"),
        "{err}"
    );
    assert_eq!(files.len(), 1, "{err}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("selftest-abort-"));
}

#[test]
fn a_stack_overflow_keeps_the_input() {
    let (status, err, files) = in_child("overflow");
    assert!(!status.success());
    assert!(
        err.contains("FINDING [selftest-overflow]") && err.contains("overflowed its stack"),
        "{err}"
    );
    assert_eq!(files.len(), 1, "{err}");
}

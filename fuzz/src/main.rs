//! `bridgeflow-fuzz <target|all> [--iterations N] [--seed S] [--seconds T]`: long fuzz runs.
//! `bridgeflow-fuzz <target> --input FILE`: replays one input (a crash file).

use bridgeflow_fuzz::harness::{self, Options, Stats};
use bridgeflow_fuzz::{guard, targets};
use std::time::{Duration, Instant};

const USAGE: &str = "\
bridgeflow-fuzz: mutation fuzzing of bridgeflow's parsers of untrusted input

usage:
  bridgeflow-fuzz <target|all> [--iterations N] [--seed S] [--seconds T] [--no-minimize]
  bridgeflow-fuzz <target> --input FILE      replay one input (e.g. a crash file)
  bridgeflow-fuzz --list                      the targets and what each covers
  bridgeflow-fuzz --seeds [DIR]               replay every seed (and write them to DIR)
  bridgeflow-fuzz --hostile [NAME] [--write DIR] [--no-run]
                                              run the hand-made hostile inputs (src/hostile.rs)

options:
  --iterations N   mutated inputs per target, after its seeds (default 10000)
  --seed S         the run's seed (default 1): the same seed, the same inputs
  --seconds T      stop each target's mutations after T seconds (with `all`: T in total,
                   shared out evenly)
  --hard-limit T   end the process when one call runs T seconds (default 30; a call over
                   2 s is a hang finding either way)
  --no-minimize    save findings' inputs as found, not shrunk
  --why            count rejections by reason and print the most frequent
  --in-process     with `all`: run every target in this process (by default each runs in a
                   child process, so that one taking its process down does not end the run)

A panic, a hang (> 2 s) or an allocation above 1 GiB (or 3 GiB live) is a finding: its input is
written to fuzz/crashes/<target>-<hash> and the exit status is 1.
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--seeds") {
        // Each target's seeds, replayed: what each one does now.
        for t in targets::all() {
            let mut seeds = (t.seeds)();
            seeds.extend(targets::corpus(t.name));
            seeds.extend(bridgeflow_fuzz::hostile::seeds(t.name));
            for (n, s) in seeds.into_iter().enumerate() {
                if let Some(dir) = args.get(i + 1) {
                    let _ = std::fs::create_dir_all(dir);
                    let _ = std::fs::write(format!("{dir}/{}-{n}", t.name), &s);
                }
                let len = s.len();
                let what =
                    harness::replay(&t, s).unwrap_or_else(|f| format!("FINDING {}", f.message));
                println!("{:<16} seed {n:>2} ({len:>6} B): {what}", t.name);
            }
        }
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--hostile") {
        // The hand-made hostile inputs, each on its target (one name: that one only; with
        // `--write DIR`, their bytes written there).
        let only = args.get(i + 1).filter(|a| !a.starts_with('-'));
        let write = args
            .iter()
            .position(|a| a == "--write")
            .and_then(|j| args.get(j + 1));
        let mut bad = 0;
        for h in bridgeflow_fuzz::hostile::all() {
            if only.is_some_and(|o| o != h.name) {
                continue;
            }
            if let Some(dir) = write {
                let _ = std::fs::create_dir_all(dir);
                let _ = std::fs::write(format!("{dir}/{}", h.name), &h.bytes);
            }
            let t = targets::find(h.target).expect("a target");
            let len = h.bytes.len();
            if args.iter().any(|a| a == "--no-run") {
                println!("{:<24} [{}] ({len} B)\n    {}", h.name, h.target, h.about);
                continue;
            }
            let what = match harness::replay(&t, h.bytes) {
                Ok(w) => w,
                Err(f) => {
                    bad += 1;
                    format!("FINDING {}: {}", f.kind, f.message)
                }
            };
            println!(
                "{:<24} [{}] ({len} B): {what}\n    {}",
                h.name, h.target, h.about
            );
        }
        std::process::exit(if bad > 0 { 1 } else { 0 });
    }
    if args.iter().any(|a| a == "--list") {
        for t in targets::all() {
            println!("{:<16} {}", t.name, t.about);
        }
        return;
    }
    let mut opts = Options {
        iterations: 10_000,
        ..Default::default()
    };
    let mut which: Option<String> = None;
    let mut input: Option<String> = None;
    let mut seconds: Option<f64> = None;
    let (mut in_process, mut summary, mut hard_limit) = (false, false, None::<u64>);
    let mut it = args.into_iter();
    let die = |m: String| -> ! {
        eprintln!("bridgeflow-fuzz: {m}\n\n{USAGE}");
        std::process::exit(2)
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| die(format!("{name} needs a value")))
        };
        match a.as_str() {
            "--iterations" => {
                opts.iterations = val("--iterations")
                    .parse()
                    .unwrap_or_else(|e| die(format!("--iterations: {e}")))
            }
            "--seed" => {
                opts.seed = val("--seed")
                    .parse()
                    .unwrap_or_else(|e| die(format!("--seed: {e}")))
            }
            "--seconds" => {
                seconds = Some(
                    val("--seconds")
                        .parse()
                        .unwrap_or_else(|e| die(format!("--seconds: {e}"))),
                )
            }
            "--hard-limit" => {
                let h = val("--hard-limit")
                    .parse()
                    .unwrap_or_else(|e| die(format!("--hard-limit: {e}")));
                guard::set_hard_limit(h);
                hard_limit = Some(h);
            }
            "--input" => input = Some(val("--input")),
            "--no-minimize" => opts.minimize = false,
            "--in-process" => in_process = true,
            "--summary" => summary = true,
            "--why" => opts.why = true,
            s if s.starts_with('-') => die(format!("unknown option {s}")),
            s if which.is_none() => which = Some(s.to_string()),
            s => die(format!("unexpected argument {s}")),
        }
    }
    let which = which.unwrap_or_else(|| die("no target given".into()));
    let chosen: Vec<targets::Target> = if which == "all" {
        targets::all()
    } else {
        match targets::find(&which) {
            Some(t) => vec![t],
            None => {
                let names: Vec<&str> = targets::all().iter().map(|t| t.name).collect();
                die(format!(
                    "unknown target '{which}' (one of: all, {})",
                    names.join(", ")
                ))
            }
        }
    };
    if let Some(path) = input {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| die(format!("{path}: {e}")));
        match harness::replay(&chosen[0], bytes) {
            Ok(what) => println!("{}: {what}", chosen[0].name),
            Err(f) => {
                println!("{}: FINDING {}: {}", chosen[0].name, f.kind, f.message);
                std::process::exit(1);
            }
        }
        return;
    }
    if let Some(s) = seconds {
        opts.time_limit = Some(Duration::from_secs_f64(s / chosen.len() as f64));
    }
    println!(
        "bridgeflow-fuzz: {} target(s), {} iterations each, seed {}{}",
        chosen.len(),
        opts.iterations,
        opts.seed,
        opts.time_limit
            .map(|l| format!(", at most {:.0} s each", l.as_secs_f64()))
            .unwrap_or_default()
    );
    let start = Instant::now();
    let mut all: Vec<Stats> = Vec::new();
    let mut crashed: Vec<String> = Vec::new();
    if chosen.len() > 1 && !in_process {
        // Each target in a process of its own: one that takes its process down (an abort, a
        // stack overflow, a hang past the hard limit) is reported and the others still run.
        for t in chosen {
            match run_child(&t, &opts, hard_limit) {
                Ok(st) => all.push(st),
                Err(why) => {
                    println!("{:<16} CRASHED: {why} (see the FINDING above)", t.name);
                    crashed.push(format!("[{}] {why}", t.name));
                }
            }
        }
    } else {
        for t in chosen {
            let st = harness::run_on_thread(t, opts.clone());
            println!("{}", st.line());
            for (r, n) in st.top_reasons(12) {
                println!("    {n:>7}  {r}");
            }
            all.push(st);
        }
    }
    let execs: u64 = all.iter().map(|s| s.execs).sum();
    let accepted: u64 = all.iter().map(|s| s.accepted).sum();
    let rejected: u64 = all.iter().map(|s| s.rejected).sum();
    let slowest = all.iter().max_by_key(|s| s.slowest);
    println!(
        "total: {execs} executions, {accepted} accepted, {rejected} rejected, slowest {:.2} ms ({}), {:.1} s",
        slowest.map_or(0.0, |s| s.slowest.as_secs_f64() * 1e3),
        slowest.map_or("-", |s| s.target),
        start.elapsed().as_secs_f64()
    );
    if summary {
        // For a parent process (see run_child).
        for st in &all {
            println!(
                "SUMMARY\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                st.target,
                st.execs,
                st.accepted,
                st.rejected,
                st.slowest.as_nanos(),
                st.slowest_len,
                st.findings.len(),
                st.elapsed.as_nanos()
            );
        }
    }
    for c in &crashed {
        println!("CRASHED {c}");
    }
    let findings: Vec<_> = all.iter().flat_map(|s| s.findings.iter()).collect();
    for f in &findings {
        println!(
            "FINDING [{}] {}: {}\n  input ({} bytes): {}\n  saved: {}",
            f.target,
            f.kind,
            f.message,
            f.input.len(),
            f.hex(256),
            f.saved
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string())
        );
    }
    if !findings.is_empty() || !crashed.is_empty() {
        std::process::exit(1);
    }
}

/// Runs one target as a child process (this binary, `--summary`), its output passed on; its
/// figures from the summary line, or why there is none.
fn run_child(
    t: &targets::Target,
    opts: &Options,
    hard_limit: Option<u64>,
) -> Result<Stats, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(t.name)
        .args(["--iterations", &opts.iterations.to_string()])
        .args(["--seed", &opts.seed.to_string()])
        .arg("--summary");
    if let Some(l) = opts.time_limit {
        cmd.args(["--seconds", &l.as_secs_f64().to_string()]);
    }
    if let Some(h) = hard_limit {
        cmd.args(["--hard-limit", &h.to_string()]);
    }
    if !opts.minimize {
        cmd.arg("--no-minimize");
    }
    if opts.why {
        cmd.arg("--why");
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut st = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("SUMMARY\t") {
            let f: Vec<&str> = rest.split('\t').collect();
            let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            st = Some(Stats {
                target: t.name,
                execs: n(1),
                accepted: n(2),
                rejected: n(3),
                slowest: Duration::from_nanos(n(4)),
                slowest_len: n(5) as usize,
                elapsed: Duration::from_nanos(n(7)),
                findings: Vec::new(),
                ..Default::default()
            });
        } else if !line.starts_with("bridgeflow-fuzz: ") && !line.starts_with("total: ") {
            println!("{line}");
        }
    }
    use std::os::unix::process::ExitStatusExt;
    match (st, out.status.signal()) {
        (_, Some(sig)) => Err(format!("the process died on signal {sig}")),
        (None, _) => Err(format!("the process exited with {}", out.status)),
        (Some(mut st), _) => {
            if !out.status.success() {
                // Its findings were printed by it; counted here by their lines.
                let n = text.lines().filter(|l| l.starts_with("FINDING [")).count();
                st.findings = vec![harness::Finding::counted(t.name); n.max(1)];
            }
            Ok(st)
        }
    }
}

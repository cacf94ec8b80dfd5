//! The fuzz loop: seeds first, then mutated inputs, each call under `catch_unwind`, timed and
//! under the allocation guard; findings (panics, hangs, refused allocations) are deduplicated
//! by where they happen, their inputs minimised and saved to `fuzz/crashes/`.

use crate::guard::{self, Session, HANG};
use crate::mutate::{mutate, Rng};
use crate::targets::{corpus, Call, Target};
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What went wrong with one input.
#[derive(Debug, Clone)]
pub struct Finding {
    pub target: &'static str,
    /// `panic`, `hang` or `alloc`.
    pub kind: &'static str,
    /// The panic message and location, the time taken, or the size refused.
    pub message: String,
    /// Where (file:line of the panic), for deduplication.
    pub at: String,
    /// The (minimised) input, saved under `crashes/`.
    pub input: Vec<u8>,
    pub saved: Option<PathBuf>,
}

impl Finding {
    /// A finding known by its count only (reported by a child process).
    pub fn counted(target: &'static str) -> Finding {
        Finding {
            target,
            kind: "reported",
            message: String::new(),
            at: String::new(),
            input: Vec::new(),
            saved: None,
        }
    }

    /// The input as hex (the first `max` bytes).
    pub fn hex(&self, max: usize) -> String {
        let mut s: String = self
            .input
            .iter()
            .take(max)
            .map(|b| format!("{b:02x}"))
            .collect();
        if self.input.len() > max {
            s.push_str(&format!("... ({} bytes)", self.input.len()));
        }
        s
    }
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub target: &'static str,
    pub seeds: usize,
    pub execs: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub slowest: Duration,
    pub slowest_len: usize,
    pub elapsed: Duration,
    pub findings: Vec<Finding>,
    /// Rejections by reason (with `Options::why`).
    pub reasons: std::collections::HashMap<String, u64>,
}

/// A rejection message with its numbers and paths taken out, so alike ones count together.
fn reason(why: &str) -> String {
    let mut out = String::new();
    for w in why.split_whitespace() {
        let w = if w.contains('/') { "<path>" } else { w };
        let w: String = w
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        out.push_str(&w);
        out.push(' ');
        if out.len() > 90 {
            break;
        }
    }
    out
}

impl Stats {
    /// The `n` most frequent rejection reasons.
    pub fn top_reasons(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.reasons.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// One table line.
    pub fn line(&self) -> String {
        format!(
            "{:<16} execs {:>7}  accepted {:>6}  rejected {:>7}  slowest {:>8.2} ms ({} B)  findings {:>2}  {:>6.1} s",
            self.target,
            self.execs,
            self.accepted,
            self.rejected,
            self.slowest.as_secs_f64() * 1e3,
            self.slowest_len,
            self.findings.len(),
            self.elapsed.as_secs_f64()
        )
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub iterations: u64,
    pub seed: u64,
    /// Stop mutating after this long (the seeds always run).
    pub time_limit: Option<Duration>,
    /// Minimise each finding's input (a few thousand calls at most).
    pub minimize: bool,
    /// Print each new finding as it is found.
    pub verbose: bool,
    /// Count rejections by reason.
    pub why: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            iterations: 1000,
            seed: 1,
            time_limit: None,
            minimize: true,
            verbose: true,
            why: false,
        }
    }
}

thread_local! {
    /// The last panic on this thread (message, location), recorded by the hook.
    static LAST_PANIC: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
    static IS_FUZZ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IS_FUZZ.with(|f| f.get()) {
                return previous(info);
            }
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic)".into());
            let at = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some((msg, at)));
        }));
    });
}

/// The seed of mutation `i` of a run seeded `seed` for `target`.
fn iteration_seed(seed: u64, target: &str, i: u64) -> u64 {
    guard::fnv(target.as_bytes()) ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ i
}

/// One call's outcome.
enum Outcome {
    Accepted,
    Rejected(String),
    Bad(&'static str, String, String),
}

fn one(session: &Session, call: &mut Call, input: &Arc<Vec<u8>>) -> (Outcome, Duration) {
    LAST_PANIC.with(|p| p.borrow_mut().take());
    IS_FUZZ.with(|f| f.set(true));
    let (r, took, refused) = session.call(input, |b| call(b));
    IS_FUZZ.with(|f| f.set(false));
    let out = match r {
        Err(_) => {
            let (msg, at) = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| ("(panic)".into(), String::new()));
            Outcome::Bad("panic", format!("panicked at {at}: {msg}"), at)
        }
        Ok(_) if refused > 0 => Outcome::Bad(
            "alloc",
            format!(
                "asked for an allocation of {refused} bytes (limit {} B each, {} B live)",
                guard::MAX_ALLOC,
                guard::MAX_LIVE
            ),
            format!("alloc {}", refused.next_power_of_two()),
        ),
        Ok(_) if took > HANG => Outcome::Bad(
            "hang",
            format!(
                "took {:.2} s (limit {} s)",
                took.as_secs_f64(),
                HANG.as_secs()
            ),
            "hang".into(),
        ),
        Ok(Ok(())) => Outcome::Accepted,
        Ok(Err(e)) => Outcome::Rejected(e),
    };
    (out, took)
}

/// Shrinks `input` while the call still fails the same way (same kind and place).
fn minimize(
    session: &Session,
    call: &mut Call,
    input: Vec<u8>,
    at: &str,
    budget: usize,
) -> Vec<u8> {
    let mut best = input;
    let mut tries = 0;
    let mut chunk = best.len().next_power_of_two() / 2;
    while chunk >= 1 && tries < budget {
        let mut i = 0;
        while i < best.len() && tries < budget {
            let mut cand = best.clone();
            let end = (i + chunk).min(cand.len());
            cand.drain(i..end);
            tries += 1;
            let cand = Arc::new(cand);
            match one(session, call, &cand) {
                (Outcome::Bad(_, _, a), _) if a == at => {
                    best = Arc::try_unwrap(cand).unwrap_or_else(|a| (*a).clone());
                }
                _ => i += chunk,
            }
        }
        chunk /= 2;
    }
    best
}

/// Runs `target`: its seeds (and corpus) unmutated, then `opts.iterations` mutated inputs.
pub fn run(target: &Target, opts: &Options) -> Stats {
    install_panic_hook();
    guard::install();
    let session = Session::begin(target.name);
    let mut seeds = (target.seeds)();
    seeds.extend(corpus(target.name));
    seeds.extend(crate::hostile::seeds(target.name));
    seeds.retain(|s| s.len() <= target.max_len);
    assert!(!seeds.is_empty(), "{}: no seeds", target.name);
    let mut call = (target.make)();
    let mut st = Stats {
        target: target.name,
        seeds: seeds.len(),
        ..Default::default()
    };
    let start = Instant::now();
    // Inputs that were accepted join the pool (a capped ring): mutations of valid inputs reach
    // deeper than mutations of seeds alone.
    let base = seeds.len();
    let pool_cap = (2 * seeds.iter().map(Vec::len).max().unwrap_or(0))
        .max(4096)
        .min(target.max_len);
    let mut pool = seeds.clone();
    let mut ring = 0usize;
    let mut found: Vec<(String, Vec<u8>, &'static str, String)> = Vec::new();
    let total = seeds.len() as u64 + opts.iterations;
    for i in 0..total {
        if i >= seeds.len() as u64 && opts.time_limit.is_some_and(|l| start.elapsed() > l) {
            break;
        }
        let input = if (i as usize) < seeds.len() {
            seeds[i as usize].clone()
        } else {
            let mut rng = Rng::new(iteration_seed(opts.seed, target.name, i));
            match target.custom.filter(|_| rng.chance(2)) {
                Some(custom) => custom(&mut rng, &pool)
                    .filter(|m| m.len() <= target.max_len)
                    .unwrap_or_else(|| mutate(&mut rng, &pool, target.kind, target.max_len)),
                None => mutate(&mut rng, &pool, target.kind, target.max_len),
            }
        };
        let input = Arc::new(input);
        let (out, took) = one(&session, &mut call, &input);
        st.execs += 1;
        if took > st.slowest {
            st.slowest = took;
            st.slowest_len = input.len();
        }
        match out {
            Outcome::Accepted => {
                st.accepted += 1;
                // Not much larger than the seeds: a pool of ever longer inputs slows every
                // execution and reaches no deeper.
                if i as usize >= seeds.len() && input.len() <= pool_cap {
                    if pool.len() < base + 64 {
                        pool.push((*input).clone());
                    } else {
                        pool[base + ring % 64] = (*input).clone();
                        ring += 1;
                    }
                }
            }
            Outcome::Rejected(why) => {
                st.rejected += 1;
                if opts.why {
                    *st.reasons.entry(reason(&why)).or_default() += 1;
                }
            }
            Outcome::Bad(kind, message, at) => {
                st.rejected += 1;
                if let Some(f) = found.iter_mut().find(|f| f.0 == at) {
                    if input.len() < f.1.len() {
                        f.1 = (*input).clone();
                    }
                } else {
                    if opts.verbose {
                        eprintln!(
                            "bridgeflow-fuzz: FINDING [{}] {kind}: {message} (input {} bytes, iteration {i}, seed {})",
                            target.name,
                            input.len(),
                            opts.seed
                        );
                    }
                    guard::save_crash(target.name, &input);
                    found.push((at, (*input).clone(), kind, message));
                }
            }
        }
    }
    for (at, input, kind, message) in found {
        let input = if opts.minimize && kind == "panic" {
            minimize(&session, &mut call, input, &at, 4000)
        } else {
            input
        };
        let saved = Some(guard::save_crash(target.name, &input));
        st.findings.push(Finding {
            target: target.name,
            kind,
            message,
            at,
            input,
            saved,
        });
    }
    st.elapsed = start.elapsed();
    drop(call);
    st
}

/// The fuzzing threads' stack: 2 MiB, or `BRIDGEFLOW_FUZZ_STACK_MIB`.
pub fn stack_size() -> usize {
    std::env::var("BRIDGEFLOW_FUZZ_STACK_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(2 << 20, |m| m.max(1) << 20)
}

/// Runs `target` on a thread of its own with the stack a pipeline stage's thread has (2 MiB,
/// std's default), as the runtime runs its stages.
pub fn run_on_thread(target: Target, opts: Options) -> Stats {
    std::thread::Builder::new()
        .name(format!("fuzz-{}", target.name))
        .stack_size(stack_size())
        .spawn(move || run(&target, &opts))
        .expect("fuzz thread")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Replays one input on a thread with a stage's stack (2 MiB): its outcome in words.
pub fn replay(target: &Target, input: Vec<u8>) -> Result<String, Box<Finding>> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(format!("fuzz-{}", target.name))
            .stack_size(stack_size())
            .spawn_scoped(s, || replay_here(target, input))
            .expect("replay thread")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn replay_here(target: &Target, input: Vec<u8>) -> Result<String, Box<Finding>> {
    install_panic_hook();
    guard::install();
    let session = Session::begin(target.name);
    let mut call = (target.make)();
    let input = Arc::new(input);
    LAST_PANIC.with(|p| p.borrow_mut().take());
    IS_FUZZ.with(|f| f.set(true));
    let (r, took, refused) = session.call(&input, |b| call(b));
    IS_FUZZ.with(|f| f.set(false));
    let bad = |kind, message: String| {
        Box::new(Finding {
            target: target.name,
            kind,
            message,
            at: String::new(),
            input: (*input).clone(),
            saved: None,
        })
    };
    match r {
        Err(_) => {
            let (msg, at) = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_default();
            Err(bad("panic", format!("panicked at {at}: {msg}")))
        }
        Ok(_) if refused > 0 => Err(bad("alloc", format!("an allocation of {refused} bytes"))),
        Ok(_) if took > HANG => Err(bad("hang", format!("took {:.2} s", took.as_secs_f64()))),
        Ok(Ok(())) => Ok(format!("accepted in {:.2} ms", took.as_secs_f64() * 1e3)),
        Ok(Err(e)) => Ok(format!(
            "rejected in {:.2} ms: {e}",
            took.as_secs_f64() * 1e3
        )),
    }
}

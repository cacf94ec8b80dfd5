//! What keeps a fuzz run from taking the machine down, and what saves the input when a target
//! takes the process down anyway:
//!
//! - a global allocator that refuses (returns null for) any single allocation above
//!   [`MAX_ALLOC`] and any that would take the live heap above [`MAX_LIVE`], recording it as a
//!   finding of the target being run and saving its input first: a fallible caller
//!   (`try_reserve`) sees an error and the harness reports the finding when the call returns; an
//!   infallible one makes std abort, after the input is already on disk. (An allocator must not
//!   unwind: the optimiser assumes it does not, so a panic here would escape `catch_unwind`.)
//! - handlers for SIGSEGV / SIGBUS / SIGABRT / SIGILL that write the running input to the crash
//!   folder before the default action (Rust's stack-overflow message included) runs: a stack
//!   overflow, a double panic or an abort is kept as a reproducer too.
//! - a watchdog thread that reports a call running past the hang limit and, past the hard limit,
//!   saves its input and ends the process.
//!
//! Each fuzzing thread claims a slot holding what it runs now; the allocator and the signal
//! handlers find it through a const thread-local (no destructor, no allocation).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The largest single allocation allowed: above it, an input made a parser size something
/// from an unchecked number.
pub const MAX_ALLOC: usize = 1 << 30;
/// The most live heap allowed in the whole process.
pub const MAX_LIVE: usize = 3 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The harness's allocator (installed by this crate for its binary and tests).
pub struct Guard;

thread_local! {
    /// This thread's slot + 1 (0: not a fuzzing thread).
    static SLOT: Cell<usize> = const { Cell::new(0) };
    /// Set while a refusal is being reported (its own allocations pass).
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

/// Whether an allocation of `size` more bytes is refused: only on a fuzzing thread (the
/// watchdog and the reporting of a finding always get theirs), above [`MAX_ALLOC`] at once or
/// [`MAX_LIVE`] in all.
fn over(size: usize) -> bool {
    (size > MAX_ALLOC || LIVE.load(Relaxed).saturating_add(size) > MAX_LIVE)
        && SLOT.with(|s| s.get()) > 0
        && !REPORTING.with(|r| r.get())
}

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if over(l.size()) {
            refuse(l.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if over(l.size()) {
            refuse(l.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && (over(new - l.size()) || (new > MAX_ALLOC && over(new))) {
            refuse(new);
            return std::ptr::null_mut();
        }
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new, Relaxed);
            LIVE.fetch_sub(l.size(), Relaxed);
        }
        q
    }
}

/// The heap in use now, in bytes.
pub fn live_bytes() -> usize {
    LIVE.load(Relaxed)
}

// ------------------------------------------------------------------------------------ slots

const SLOTS: usize = 32;

/// What one fuzzing thread runs now.
struct Slot {
    used: AtomicBool,
    /// The input of the call in progress (null when idle): read by the allocator and the
    /// signal handlers on the same thread, while the call holds it alive.
    data: AtomicPtr<u8>,
    len: AtomicUsize,
    target: AtomicPtr<u8>,
    target_len: AtomicUsize,
    /// Nanoseconds since [`epoch`] when the call started, 0 when idle.
    started: AtomicU64,
    /// The largest allocation refused during the call (0: none).
    refused: AtomicUsize,
    /// Whether the input of this call was saved already.
    saved: AtomicBool,
    /// The input again, for the watchdog (another thread).
    current: Mutex<Option<Arc<Vec<u8>>>>,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    used: AtomicBool::new(false),
    data: AtomicPtr::new(std::ptr::null_mut()),
    len: AtomicUsize::new(0),
    target: AtomicPtr::new(std::ptr::null_mut()),
    target_len: AtomicUsize::new(0),
    started: AtomicU64::new(0),
    refused: AtomicUsize::new(0),
    saved: AtomicBool::new(false),
    current: Mutex::new(None),
};
static SLOTS_: [Slot; SLOTS] = [EMPTY; SLOTS];

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}
fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64 + 1
}

fn my_slot() -> Option<&'static Slot> {
    let s = SLOT.with(|s| s.get());
    (s > 0).then(|| &SLOTS_[s - 1])
}

/// The calls of one fuzzing thread for one target; dropping it frees the slot.
pub struct Session {
    slot: usize,
    target: &'static str,
}

impl Session {
    pub fn begin(target: &'static str) -> Session {
        install();
        let slot = (0..SLOTS)
            .find(|&i| {
                SLOTS_[i]
                    .used
                    .compare_exchange(false, true, AcqRel, Relaxed)
                    .is_ok()
            })
            .expect("more fuzzing threads than slots");
        SLOT.with(|s| s.set(slot + 1));
        let s = &SLOTS_[slot];
        s.target.store(target.as_ptr() as *mut u8, Release);
        s.target_len.store(target.len(), Release);
        Session { slot, target }
    }

    /// Runs `f` as the call on `input`: returns what it returned (or its panic), how long it
    /// took and the largest allocation it was refused.
    pub fn call<R>(
        &self,
        input: &Arc<Vec<u8>>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> (std::thread::Result<R>, Duration, usize) {
        let s = &SLOTS_[self.slot];
        *s.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(input.clone());
        s.refused.store(0, Relaxed);
        s.saved.store(false, Relaxed);
        s.len.store(input.len(), Release);
        s.data.store(input.as_ptr() as *mut u8, Release);
        let t = Instant::now();
        s.started.store(now_ns(), Release);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(input)));
        s.started.store(0, Release);
        let took = t.elapsed();
        s.data.store(std::ptr::null_mut(), Release);
        s.len.store(0, Release);
        *s.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        (r, took, s.refused.load(Relaxed))
    }

    pub fn target(&self) -> &'static str {
        self.target
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        SLOT.with(|s| s.set(0));
        SLOTS_[self.slot].used.store(false, Release);
    }
}

// ------------------------------------------------------------------------------------ crashes

static CRASH_DIR: OnceLock<PathBuf> = OnceLock::new();
/// The crash folder as bytes with a trailing '/', for the signal handlers.
static CRASH_DIR_RAW: OnceLock<Vec<u8>> = OnceLock::new();

/// Where crashing inputs are written (`fuzz/crashes` unless set before the first run).
pub fn set_crash_dir(dir: &Path) {
    let _ = CRASH_DIR.set(dir.to_path_buf());
}
/// `BRIDGEFLOW_FUZZ_CRASHES` when set, else `fuzz/crashes`.
pub fn crash_dir() -> &'static Path {
    CRASH_DIR.get_or_init(|| match std::env::var_os("BRIDGEFLOW_FUZZ_CRASHES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("crashes"),
    })
}

/// FNV-1a, 64 bits: the name of a crashing input.
pub fn fnv(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Writes a crashing input to `crashes/<target>-<hash>` and returns the path.
pub fn save_crash(target: &str, data: &[u8]) -> PathBuf {
    let dir = crash_dir();
    let _ = std::fs::create_dir_all(dir);
    let p = dir.join(format!("{target}-{:016x}", fnv(data)));
    if let Err(e) = std::fs::write(&p, data) {
        eprintln!("bridgeflow-fuzz: cannot write {}: {e}", p.display());
    }
    p
}

/// A refused allocation: recorded in the slot, the input saved and the finding printed now (the
/// caller may abort the process next).
#[cold]
fn refuse(size: usize) {
    if REPORTING.with(|r| r.replace(true)) {
        return;
    }
    if let Some(s) = my_slot() {
        s.refused.fetch_max(size, Relaxed);
        let data = s.data.load(Acquire);
        if !data.is_null() && !s.saved.swap(true, Relaxed) {
            // SAFETY: the call in progress on this thread holds the input alive.
            let input = unsafe { std::slice::from_raw_parts(data, s.len.load(Acquire)) };
            let target = slot_target(s);
            let p = save_crash(target, input);
            let live = live_bytes();
            let bt = std::backtrace::Backtrace::force_capture();
            eprintln!(
                "bridgeflow-fuzz: FINDING [{target}] an allocation of {size} bytes was refused \
                 (limit {MAX_ALLOC} per allocation, {MAX_LIVE} live; {live} live now); input \
                 saved to {}\n{bt}",
                p.display()
            );
        }
    } else {
        eprintln!("bridgeflow-fuzz: an allocation of {size} bytes was refused (outside a target)");
    }
    REPORTING.with(|r| r.set(false));
}

fn slot_target(s: &Slot) -> &'static str {
    let p = s.target.load(Acquire);
    if p.is_null() {
        return "unknown";
    }
    // SAFETY: set from a &'static str in Session::begin.
    unsafe {
        std::str::from_utf8_unchecked(std::slice::from_raw_parts(p, s.target_len.load(Acquire)))
    }
}

// ------------------------------------------------------------------------------------ signals

const SIGNALS: [libc::c_int; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGABRT, libc::SIGILL];
static OLD: [AtomicPtr<libc::sigaction>; 4] = [
    AtomicPtr::new(std::ptr::null_mut()),
    AtomicPtr::new(std::ptr::null_mut()),
    AtomicPtr::new(std::ptr::null_mut()),
    AtomicPtr::new(std::ptr::null_mut()),
];
/// The path being built in a signal handler (one crash at a time: the first wins).
static mut PATH_BUF: [u8; 4096] = [0; 4096];
static IN_HANDLER: AtomicBool = AtomicBool::new(false);

fn raw_write(fd: libc::c_int, b: &[u8]) {
    let mut off = 0;
    while off < b.len() {
        // SAFETY: writing a valid buffer to a descriptor.
        let n = unsafe { libc::write(fd, b[off..].as_ptr().cast(), b.len() - off) };
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let i = SIGNALS.iter().position(|&s| s == sig).unwrap_or(0);
    if !IN_HANDLER.swap(true, SeqCst) {
        if let (Some(s), Some(dir)) = (my_slot(), CRASH_DIR_RAW.get()) {
            let data = s.data.load(Acquire);
            if !data.is_null() && !s.saved.swap(true, Relaxed) {
                // SAFETY: the crashing call on this thread holds its input alive.
                let input = unsafe { std::slice::from_raw_parts(data, s.len.load(Acquire)) };
                let target = slot_target(s).as_bytes();
                let h = fnv(input);
                // SAFETY: only the first handler to get here uses the buffer.
                let buf = unsafe { &mut *std::ptr::addr_of_mut!(PATH_BUF) };
                let mut n = 0;
                for part in [dir.as_slice(), target, b"-"] {
                    let m = part.len().min(buf.len() - 32 - n);
                    buf[n..n + m].copy_from_slice(&part[..m]);
                    n += m;
                }
                for k in (0..16).rev() {
                    buf[n] = b"0123456789abcdef"[((h >> (4 * k)) & 15) as usize];
                    n += 1;
                }
                buf[n] = 0;
                // SAFETY: a NUL-terminated path; plain syscalls only.
                unsafe {
                    let fd = libc::open(
                        buf.as_ptr().cast(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                        0o644,
                    );
                    if fd >= 0 {
                        raw_write(fd, input);
                        libc::close(fd);
                    }
                }
                raw_write(2, b"\nbridgeflow-fuzz: FINDING [");
                raw_write(2, target);
                raw_write(2, b"] the process is going down on a signal (");
                raw_write(
                    2,
                    match sig {
                        libc::SIGSEGV => b"SIGSEGV: a stack overflow or a bad access" as &[u8],
                        libc::SIGBUS => b"SIGBUS",
                        libc::SIGABRT => {
                            b"SIGABRT: an abort, e.g. a refused allocation or a double panic"
                        }
                        _ => b"SIGILL",
                    },
                );
                raw_write(2, b"); input saved to ");
                raw_write(2, &buf[..n]);
                raw_write(2, b"\n");
            }
        }
    }
    // Hand over to what was there (Rust's stack-overflow handler, or the default action): put
    // it back and return; the fault happens again, or `abort` raises again.
    let old = OLD[i].load(Acquire);
    // SAFETY: restoring an action saved by `install`.
    unsafe {
        if old.is_null() {
            libc::signal(sig, libc::SIG_DFL);
        } else {
            libc::sigaction(sig, old, std::ptr::null_mut());
        }
    }
    let _ = (info, ctx);
    IN_HANDLER.store(false, SeqCst);
}

/// Installs the signal handlers and the watchdog (once).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        epoch();
        let dir = crash_dir();
        let _ = std::fs::create_dir_all(dir);
        let mut raw = dir.as_os_str().as_encoded_bytes().to_vec();
        raw.push(b'/');
        let _ = CRASH_DIR_RAW.set(raw);
        for (i, &sig) in SIGNALS.iter().enumerate() {
            // SAFETY: installing a handler that only makes async-signal-safe calls.
            unsafe {
                let old: *mut libc::sigaction = Box::into_raw(Box::new(std::mem::zeroed()));
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(sig, &sa, old) == 0 {
                    OLD[i].store(old, Release);
                }
            }
        }
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(watchdog)
            .expect("watchdog thread");
    });
}

/// A call taking longer than this is a hang (a finding, reported when it returns).
pub const HANG: Duration = Duration::from_secs(2);
/// A call still running after this is stopped: its input saved, the process ended.
static HARD_LIMIT_S: AtomicU64 = AtomicU64::new(30);

pub fn set_hard_limit(secs: u64) {
    HARD_LIMIT_S.store(secs.max(3), Relaxed);
}

fn watchdog() {
    let mut warned = [0u64; SLOTS];
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = now_ns();
        for (i, s) in SLOTS_.iter().enumerate() {
            let started = s.started.load(Acquire);
            if started == 0 {
                continue;
            }
            let ran = Duration::from_nanos(now.saturating_sub(started));
            if ran > HANG && warned[i] != started {
                warned[i] = started;
                eprintln!(
                    "bridgeflow-fuzz: [{}] one call has run for {:.1} s (hang limit {} s)",
                    slot_target(s),
                    ran.as_secs_f64(),
                    HANG.as_secs()
                );
            }
            if ran > Duration::from_secs(HARD_LIMIT_S.load(Relaxed)) {
                let input = s.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if s.started.load(Acquire) != started {
                    continue;
                }
                let target = slot_target(s);
                let p = input.map(|d| save_crash(target, &d));
                eprintln!(
                    "bridgeflow-fuzz: FINDING [{target}] a call ran for over {} s: a hang; input saved to {}",
                    HARD_LIMIT_S.load(Relaxed),
                    p.map_or_else(|| "?".into(), |p| p.display().to_string())
                );
                std::process::exit(3);
            }
        }
    }
}

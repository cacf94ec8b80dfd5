//! Memory-mapped inputs that fail with their file's name, never with SIGBUS.
//!
//! Readers hand out views of memory maps, so an input truncated (or rewritten) while a run reads
//! it would otherwise kill the process with SIGBUS when a page past the new end is touched, or
//! make a `write(2)` from such a view fail with `EFAULT` ("Bad address") against the *output*.
//! An [`InputMap`] defends against that in three layers:
//!
//! 1. **Checks.** The size and mtime are taken (`fstat`) when the file is mapped;
//!    [`InputMap::check`] takes them again — readers call it whenever they hand out a
//!    tensor's bytes — and names the input if it shrank or changed.
//! 2. **A SIGBUS handler** (Linux), because check-then-read is racy. Every map is entered in a
//!    lock-free registry of address ranges. On SIGBUS (`SA_SIGINFO`), if `si_addr` lies in a
//!    registered map, the faulting page and the rest of that map are replaced with anonymous
//!    zero pages (`mmap(MAP_FIXED)`), the map is marked *poisoned*, and the faulting access
//!    resumes, reading zeros. Faults anywhere else go to the handler installed before (in the
//!    end Rust's own, or the default action), so other crashes stay crashes.
//! 3. **Poison is fatal to the run.** The zeros are never to be used: [`inputs_intact`] fails,
//!    naming the input, once any map of the process got poisoned (or any mapped input shrank
//!    or changed while mapped). Writers call it before they commit (nothing built from a
//!    poisoned map is made visible), hosts before a sink finishes and after a run, and
//!    [`crate::PluginError::io`] consults it on `EFAULT`, so "Bad address" from writing out of
//!    a mapped view is reported against the input that changed.
//!
//! The state is per process and sticky: a map poisoned once fails every later
//! [`inputs_intact`] of the process (a host running several pipelines in one process may clear
//! it between runs with [`forget_faults`]).
//!
//! Each plugin library links its own copy of this SDK, so each has its own registry; the
//! handlers chain (each passes what is not its own to the one installed before it), and
//! [`inputs_intact`] asks every copy loaded in the process, found with `dl_iterate_phdr` and
//! the exported C function `bridgeflow_sdk_inputs_fault_v1`.

use crate::{ErrorKind, PluginError, Result};
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// What `fstat` says about a file, as far as "has it changed" goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
}

fn stamp(file: &File) -> std::io::Result<Stamp> {
    let m = file.metadata()?;
    Ok(Stamp {
        len: m.len(),
        mtime: m.modified().ok(),
    })
}

/// Why an input is not intact, in words naming it; `None` when it is.
fn verdict(
    path: &Path,
    poisoned: bool,
    mapped: u64,
    opened: Stamp,
    now: Option<Stamp>,
) -> Option<String> {
    if poisoned {
        return Some(format!(
            "input {} was truncated while being read (a page past its end was touched)",
            path.display()
        ));
    }
    let now = now?;
    if now.len < mapped {
        return Some(format!(
            "input {} was truncated while being read ({mapped} bytes mapped, {} now)",
            path.display(),
            now.len
        ));
    }
    if now != opened {
        return Some(format!(
            "input {} changed while being read (its size or modification time changed)",
            path.display()
        ));
    }
    None
}

/// A mapped input in this copy's list (for [`inputs_intact`]); the fd is the map's own file,
/// valid while the entry exists (the map removes it before closing the file).
struct Live {
    id: u64,
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    path: PathBuf,
    opened: Stamp,
    /// The map's address (its first byte is the file's first byte) and length.
    base: usize,
    mapped: u64,
    slot: Option<&'static guard::Slot>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());
/// Faults of maps already dropped (the writer may commit after the reader let go).
static FAULTS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(unix)]
fn fstat_fd(fd: std::os::fd::RawFd) -> Option<Stamp> {
    use std::os::fd::FromRawFd;
    // SAFETY: the fd belongs to a live InputMap (see `Live`); ManuallyDrop never closes it.
    let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    stamp(&f).ok()
}

/// A read-only memory map of an input file, guarded as the module docs say. Dereferences to
/// its bytes.
pub struct InputMap {
    map: memmap2::Mmap,
    file: File,
    path: PathBuf,
    opened: Stamp,
    id: u64,
    slot: Option<&'static guard::Slot>,
}

impl InputMap {
    /// Opens and maps `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<InputMap> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| PluginError::io(path, "cannot open", e))?;
        InputMap::from_file(file, path)
    }

    /// Maps an open file (`path` names it in errors).
    pub fn from_file(file: File, path: impl AsRef<Path>) -> Result<InputMap> {
        let path = path.as_ref().to_path_buf();
        // SAFETY: a read-only private map; a file truncated underneath is what the guard is for.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| PluginError::io(&path, "cannot map", e))?;
        let opened = stamp(&file).map_err(|e| PluginError::io(&path, "cannot stat", e))?;
        if opened.len < map.len() as u64 {
            return Err(input_error(format!(
                "input {} was truncated while being opened",
                path.display()
            )));
        }
        let slot = if map.is_empty() {
            None
        } else {
            guard::register(map.as_ptr() as usize, map.len())
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let m = InputMap {
            map,
            file,
            path,
            opened,
            id,
            slot,
        };
        lock(&LIVE).push(Live {
            id,
            #[cfg(unix)]
            fd: std::os::fd::AsRawFd::as_raw_fd(&m.file),
            path: m.path.clone(),
            opened,
            base: m.map.as_ptr() as usize,
            mapped: m.map.len() as u64,
            slot,
        });
        Ok(m)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying map (for [`crate::release_pages`] and madvise).
    pub fn mmap(&self) -> &memmap2::Mmap {
        &self.map
    }

    /// An access-pattern hint; failures are ignored (it is only a hint).
    pub fn advise(&self, advice: memmap2::Advice) {
        let _ = self.map.advise(advice);
    }

    /// See [`crate::release_pages`].
    pub fn release_pages(&self, range: Range<usize>, outward: bool) {
        crate::buffer::release_pages(&self.map, range, outward);
    }

    /// Whether a page past the file's end was touched (the map reads zeros there).
    pub fn is_poisoned(&self) -> bool {
        self.slot.is_some_and(|s| s.is_poisoned())
    }

    /// Fails, naming the input, if it was truncated or changed since it was mapped.
    pub fn check(&self) -> Result<()> {
        let now = stamp(&self.file).ok();
        match verdict(
            &self.path,
            self.is_poisoned(),
            self.map.len() as u64,
            self.opened,
            now,
        ) {
            Some(m) => Err(input_error(m)),
            None => Ok(()),
        }
    }

    /// `e`, or the reason this input is not intact when it is not (a reader's format error
    /// about zeros read from a truncated map is about the truncation).
    pub fn explain(&self, e: PluginError) -> PluginError {
        match self.check() {
            Err(why) => why,
            Ok(()) => e,
        }
    }
}

impl Deref for InputMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl std::fmt::Debug for InputMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "InputMap({}, {} bytes)",
            self.path.display(),
            self.map.len()
        )
    }
}

impl Drop for InputMap {
    fn drop(&mut self) {
        // Out of the registries before the map and file go (fields drop after this).
        lock(&LIVE).retain(|l| l.id != self.id);
        let poisoned = self.slot.map(guard::unregister).unwrap_or(false);
        let now = stamp(&self.file).ok();
        if let Some(m) = verdict(
            &self.path,
            poisoned,
            self.map.len() as u64,
            self.opened,
            now,
        ) {
            let mut faults = lock(&FAULTS);
            if !faults.contains(&m) {
                faults.push(m);
            }
        }
    }
}

fn input_error(m: String) -> PluginError {
    PluginError::new(ErrorKind::Io, m)
}

/// This copy's faults: dropped maps' first, then live maps' (poisoned, shrunk, changed).
fn local_faults() -> Vec<String> {
    let mut out = lock(&FAULTS).clone();
    for l in lock(&LIVE).iter() {
        let poisoned = l.slot.is_some_and(|s| s.is_poisoned());
        #[cfg(unix)]
        let now = fstat_fd(l.fd);
        #[cfg(not(unix))]
        let now = None;
        if let Some(m) = verdict(&l.path, poisoned, l.mapped, l.opened, now) {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

/// Fails, naming them, if any input mapped in this process (by any plugin) was truncated or
/// changed while mapped, or had a page past its end touched. Call before committing output.
pub fn inputs_intact() -> Result<()> {
    let mut all = local_faults();
    for m in other_copies::faults() {
        if !all.contains(&m) {
            all.push(m);
        }
    }
    if all.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 4;
    let more = all.len().saturating_sub(SHOWN);
    let mut text = all.into_iter().take(SHOWN).collect::<Vec<_>>().join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    Err(input_error(text))
}

/// Forgets the faults of maps already dropped, in every copy of the SDK in the process: for
/// hosts that run several pipelines in one process, between runs (never while one is running).
pub fn forget_faults() {
    lock(&FAULTS).clear();
    other_copies::forget();
}

/// The C face of this copy, for the other copies' [`inputs_intact`]: writes this copy's
/// faults (`"; "`-joined, UTF-8, truncated to `cap`) to `buf`; returns the bytes written, 0
/// when intact.
///
/// # Safety
/// `buf` must be valid for `cap` bytes of writing.
#[no_mangle]
pub unsafe extern "C" fn bridgeflow_sdk_inputs_fault_v1(buf: *mut u8, cap: usize) -> usize {
    let text = std::panic::catch_unwind(|| local_faults().join("; ")).unwrap_or_default();
    let mut n = text.len().min(cap);
    while n > 0 && !text.is_char_boundary(n) {
        n -= 1;
    }
    if n > 0 {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf, n);
    }
    n
}

/// The C face of [`forget_faults`] for this copy alone.
#[no_mangle]
pub extern "C" fn bridgeflow_sdk_inputs_forget_v1() {
    lock(&FAULTS).clear();
}

// ------------------------------------------------------------------- where bytes come from

/// The input file that a run of bytes is a view of ([`Origins::find`]): the file's descriptor
/// and the offset of the run's first byte in it, so that a writer can have the kernel copy the
/// run from the file (`copy_file_range(2)`) instead of writing it out of the map.
#[cfg(unix)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOrigin {
    /// The input map's own read-only descriptor: valid while the bytes asked about are held
    /// (a map outlives every view of it, and leaves the registry before its file closes).
    /// Read it with positioned calls only.
    pub fd: std::os::fd::RawFd,
    pub offset: u64,
}

/// This copy's live map holding `ptr..ptr+len` whole, unless it is poisoned (then the bytes
/// are zeros where the file has none: only the map has them, and the run fails anyway).
#[cfg(unix)]
fn local_origin(ptr: usize, len: usize) -> Option<FileOrigin> {
    let end = ptr.checked_add(len)?;
    let live = lock(&LIVE);
    let l = live
        .iter()
        .find(|l| l.base <= ptr && end <= l.base + l.mapped as usize)?;
    if len == 0 || l.slot.is_some_and(|s| s.is_poisoned()) {
        return None;
    }
    Some(FileOrigin {
        fd: l.fd,
        offset: (ptr - l.base) as u64,
    })
}

/// The C face of this copy's [`local_origin`], for the other copies' [`Origins`]: 1 and the
/// file's descriptor and offset when `ptr..ptr+len` lies whole in one of this copy's live
/// input maps, else 0.
///
/// # Safety
/// `fd` and `offset` must be valid for writing.
#[cfg(unix)]
#[no_mangle]
pub unsafe extern "C" fn bridgeflow_sdk_inputs_origin_v1(
    ptr: *const u8,
    len: usize,
    fd: *mut std::ffi::c_int,
    offset: *mut u64,
) -> std::ffi::c_int {
    match std::panic::catch_unwind(|| local_origin(ptr as usize, len)) {
        Ok(Some(o)) => {
            *fd = o.fd;
            *offset = o.offset;
            1
        }
        _ => 0,
    }
}

/// Finds the input file behind bytes of any plugin's input maps: this copy of the SDK's, and
/// those of the copies loaded when it was made (each plugin library links its own copy, and
/// the bytes a writer gets were mostly mapped by a reader in another library). It keeps those
/// libraries loaded while it lives, so make one per output, once the plugins are loaded; a
/// lookup is a lock and a scan of each copy's live maps.
#[cfg(unix)]
pub struct Origins {
    #[cfg(target_os = "linux")]
    others: Vec<other_copies::Held>,
}

#[cfg(unix)]
impl Origins {
    pub fn new() -> Origins {
        Origins {
            #[cfg(target_os = "linux")]
            others: other_copies::origin_fns(),
        }
    }

    /// The input file `bytes` are a view of, whole, if any. The answer holds while `bytes`
    /// are held (a buffer viewing the map keeps the map, and so its file, open).
    pub fn find(&self, bytes: &[u8]) -> Option<FileOrigin> {
        let (ptr, len) = (bytes.as_ptr() as usize, bytes.len());
        if let Some(o) = local_origin(ptr, len) {
            return Some(o);
        }
        #[cfg(target_os = "linux")]
        for h in &self.others {
            if let Some(o) = h.origin(ptr, len) {
                return Some(o);
            }
        }
        None
    }
}

#[cfg(unix)]
impl Default for Origins {
    fn default() -> Self {
        Origins::new()
    }
}

#[cfg(target_os = "linux")]
mod other_copies {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};

    type FaultFn = unsafe extern "C" fn(*mut u8, usize) -> usize;
    type ForgetFn = extern "C" fn();

    unsafe extern "C" fn collect(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        let names = &mut *(data as *mut Vec<CString>);
        let n: *const c_char = (*info).dlpi_name;
        if !n.is_null() && *n != 0 {
            names.push(CStr::from_ptr(n).to_owned());
        }
        0
    }

    /// Every other loaded object's exported `symbol` (each copy of the SDK once).
    fn each(symbol: &CStr, mut f: impl FnMut(*mut c_void)) {
        let mut names: Vec<CString> = Vec::new();
        // SAFETY: the callback only copies names; dlopen is called after the walk.
        unsafe { libc::dl_iterate_phdr(Some(collect), &mut names as *mut _ as *mut c_void) };
        let own = super::bridgeflow_sdk_inputs_fault_v1 as FaultFn as usize;
        let mut seen = vec![own];
        for name in names {
            // SAFETY: RTLD_NOLOAD only returns a handle to an object already loaded.
            unsafe {
                let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
                if h.is_null() {
                    continue;
                }
                let fault = libc::dlsym(h, c"bridgeflow_sdk_inputs_fault_v1".as_ptr());
                let sym = libc::dlsym(h, symbol.as_ptr());
                if !fault.is_null() && !sym.is_null() && !seen.contains(&(fault as usize)) {
                    seen.push(fault as usize);
                    f(sym);
                }
                libc::dlclose(h);
            }
        }
    }

    pub fn faults() -> Vec<String> {
        let mut out = Vec::new();
        each(c"bridgeflow_sdk_inputs_fault_v1", |sym| {
            // SAFETY: the symbol has this signature in every SDK that exports it (`_v1`).
            let f: FaultFn = unsafe { std::mem::transmute(sym) };
            let mut buf = vec![0u8; 8192];
            let n = unsafe { f(buf.as_mut_ptr(), buf.len()) }.min(buf.len());
            if n > 0 {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                out.extend(text.split("; ").map(str::to_string));
            }
        });
        out
    }

    pub fn forget() {
        each(c"bridgeflow_sdk_inputs_forget_v1", |sym| {
            // SAFETY: as above.
            let f: ForgetFn = unsafe { std::mem::transmute(sym) };
            f();
        });
    }

    type OriginFn = unsafe extern "C" fn(*const u8, usize, *mut c_int, *mut u64) -> c_int;

    /// Another copy's `bridgeflow_sdk_inputs_origin_v1`, its library held loaded (the handle
    /// is closed on drop).
    pub struct Held {
        handle: *mut c_void,
        origin: OriginFn,
    }

    // SAFETY: a dlopen handle and a thread-safe C function (its copy's registry is locked).
    unsafe impl Send for Held {}
    unsafe impl Sync for Held {}

    impl Held {
        pub fn origin(&self, ptr: usize, len: usize) -> Option<super::FileOrigin> {
            let (mut fd, mut offset) = (-1, 0u64);
            // SAFETY: the library is held loaded; the out-pointers are ours.
            let found = unsafe { (self.origin)(ptr as *const u8, len, &mut fd, &mut offset) };
            (found == 1 && fd >= 0).then_some(super::FileOrigin { fd, offset })
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            // SAFETY: the handle came from dlopen and is closed once.
            unsafe { libc::dlclose(self.handle) };
        }
    }

    /// Every other loaded copy's origin lookup, each library held (each copy once).
    pub fn origin_fns() -> Vec<Held> {
        let mut names: Vec<CString> = Vec::new();
        // SAFETY: as in `each`.
        unsafe { libc::dl_iterate_phdr(Some(collect), &mut names as *mut _ as *mut c_void) };
        let own = super::bridgeflow_sdk_inputs_origin_v1 as OriginFn as usize;
        let mut seen = vec![own];
        let mut out = Vec::new();
        for name in names {
            // SAFETY: RTLD_NOLOAD only returns a handle to an object already loaded; the
            // symbol has this signature in every SDK that exports it (`_v1`).
            unsafe {
                let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
                if h.is_null() {
                    continue;
                }
                let sym = libc::dlsym(h, c"bridgeflow_sdk_inputs_origin_v1".as_ptr());
                if sym.is_null() || seen.contains(&(sym as usize)) {
                    libc::dlclose(h);
                    continue;
                }
                seen.push(sym as usize);
                out.push(Held {
                    handle: h,
                    origin: std::mem::transmute::<*mut c_void, OriginFn>(sym),
                });
            }
        }
        out
    }
}

#[cfg(not(target_os = "linux"))]
mod other_copies {
    pub fn faults() -> Vec<String> {
        Vec::new()
    }
    pub fn forget() {}
}

/// The registry of mapped ranges and the SIGBUS handler.
#[cfg(target_os = "linux")]
mod guard {
    use std::cell::UnsafeCell;
    use std::ffi::{c_int, c_void};
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
    use std::sync::Once;

    const FREE: u8 = 0;
    const BUSY: u8 = 1;
    const LIVE: u8 = 2;

    /// One registered map: `base..end`, read by the handler without locks.
    pub struct Slot {
        state: AtomicU8,
        base: AtomicUsize,
        end: AtomicUsize,
        poisoned: AtomicBool,
    }

    impl Slot {
        const fn new() -> Slot {
            Slot {
                state: AtomicU8::new(FREE),
                base: AtomicUsize::new(0),
                end: AtomicUsize::new(0),
                poisoned: AtomicBool::new(false),
            }
        }
        pub fn is_poisoned(&self) -> bool {
            self.poisoned.load(Ordering::Acquire)
        }
    }

    const PER_CHUNK: usize = 64;

    /// Slots come in chunks that are never freed, linked from `HEAD` (newest first).
    struct Chunk {
        slots: [Slot; PER_CHUNK],
        next: *mut Chunk,
    }

    static HEAD: AtomicPtr<Chunk> = AtomicPtr::new(std::ptr::null_mut());
    static PAGE: AtomicUsize = AtomicUsize::new(4096);
    static INSTALL: Once = Once::new();

    /// The action installed before ours, to pass on what is not ours.
    struct Previous(UnsafeCell<Option<libc::sigaction>>);
    // SAFETY: written once, before READY is set; read only after.
    unsafe impl Sync for Previous {}
    static PREVIOUS: Previous = Previous(UnsafeCell::new(None));
    static READY: AtomicBool = AtomicBool::new(false);

    fn install() {
        INSTALL.call_once(|| unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::Relaxed);
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
                *PREVIOUS.0.get() = Some(old);
                READY.store(true, Ordering::Release);
            }
        });
    }

    fn slots() -> impl Iterator<Item = &'static Slot> {
        let mut chunk = HEAD.load(Ordering::Acquire);
        std::iter::from_fn(move || {
            if chunk.is_null() {
                return None;
            }
            // SAFETY: chunks are leaked, never freed.
            let c: &'static Chunk = unsafe { &*chunk };
            chunk = c.next;
            Some(c.slots.iter())
        })
        .flatten()
    }

    fn fill(slot: &'static Slot, base: usize, len: usize) -> &'static Slot {
        slot.base.store(base, Ordering::Relaxed);
        slot.end.store(base + len, Ordering::Relaxed);
        slot.poisoned.store(false, Ordering::Relaxed);
        slot.state.store(LIVE, Ordering::Release);
        slot
    }

    /// Enters `base..base+len` (a map's whole range); None if the handler could not be set.
    pub fn register(base: usize, len: usize) -> Option<&'static Slot> {
        install();
        if !READY.load(Ordering::Acquire) {
            return None;
        }
        for s in slots() {
            if s.state
                .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Some(fill(s, base, len));
            }
        }
        let chunk: &'static mut Chunk = Box::leak(Box::new(Chunk {
            slots: [const { Slot::new() }; PER_CHUNK],
            next: std::ptr::null_mut(),
        }));
        chunk.slots[0].state.store(BUSY, Ordering::Relaxed);
        let ptr = chunk as *mut Chunk;
        let mut head = HEAD.load(Ordering::Acquire);
        loop {
            // SAFETY: not yet published; only this thread writes it.
            unsafe { (*ptr).next = head };
            match HEAD.compare_exchange(head, ptr, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        // SAFETY: the chunk is leaked; its slot 0 is ours (BUSY).
        Some(fill(unsafe { &(*ptr).slots[0] }, base, len))
    }

    /// Takes a map out (before it is unmapped); returns whether it was poisoned.
    pub fn unregister(slot: &'static Slot) -> bool {
        slot.state.store(BUSY, Ordering::Release);
        let poisoned = slot.poisoned.swap(false, Ordering::AcqRel);
        slot.state.store(FREE, Ordering::Release);
        poisoned
    }

    /// The live slot whose range holds `addr` (async-signal-safe: atomics only).
    fn find(addr: usize) -> Option<&'static Slot> {
        slots().find(|s| {
            s.state.load(Ordering::Acquire) == LIVE
                && s.base.load(Ordering::Relaxed) <= addr
                && addr < s.end.load(Ordering::Relaxed)
        })
    }

    extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        unsafe {
            // Only faults the kernel raised for an access (not kill/tgkill) have an address.
            if !info.is_null() && (*info).si_code > 0 {
                let addr = (*info).si_addr() as usize;
                if let Some(slot) = find(addr) {
                    let page = PAGE.load(Ordering::Relaxed);
                    let from = addr & !(page - 1);
                    let to = slot.end.load(Ordering::Relaxed).div_ceil(page) * page;
                    // Past the end of a truncated file every page faults: replace the rest of
                    // the map at once with zero pages, and let the access read zeros.
                    let r = libc::mmap(
                        from as *mut c_void,
                        to - from,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                    if r != libc::MAP_FAILED {
                        slot.poisoned.store(true, Ordering::Release);
                        return;
                    }
                }
            }
            pass_on(sig, info, ctx);
        }
    }

    /// What the process would have done without us.
    unsafe fn pass_on(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
        let prev = if READY.load(Ordering::Acquire) {
            *PREVIOUS.0.get()
        } else {
            None
        };
        match prev {
            Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
                if p.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                        std::mem::transmute(p.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(c_int) = std::mem::transmute(p.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                // The default action: restore it; a faulting access faults again on return,
                // a sent signal is raised again (delivered once this handler returns).
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigemptyset(&mut dfl.sa_mask);
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
                if info.is_null() || (*info).si_code <= 0 {
                    libc::raise(libc::SIGBUS);
                }
            }
        }
    }
}

/// Without a handler: maps are only checked (`fstat`), never poisoned.
#[cfg(not(target_os = "linux"))]
mod guard {
    pub struct Slot;
    impl Slot {
        pub fn is_poisoned(&self) -> bool {
            false
        }
    }
    pub fn register(_base: usize, _len: usize) -> Option<&'static Slot> {
        None
    }
    pub fn unregister(_slot: &'static Slot) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    // Truncating and rewriting inputs makes `inputs_intact` fail for the whole process, so
    // those tests live in sdk/tests/inputs.rs (their own process); these change nothing.
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bf-inputs-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn an_unchanged_input_checks_fine_and_reads_its_bytes() {
        let p = temp_file("same", &[7u8; 10_000]);
        let m = InputMap::open(&p).unwrap();
        assert_eq!(m.len(), 10_000);
        assert!(m.iter().all(|&b| b == 7));
        m.check().unwrap();
        assert!(!m.is_poisoned());
        let e = PluginError::format("bad header");
        assert_eq!(m.explain(e.clone()), e);
        drop(m);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn an_empty_file_maps() {
        let p = temp_file("empty", &[]);
        let m = InputMap::open(&p).unwrap();
        assert!(m.is_empty());
        m.check().unwrap();
        drop(m);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn verdicts_name_the_input() {
        let p = Path::new("/d/x.safetensors");
        let t = SystemTime::UNIX_EPOCH;
        let st = |len| Stamp {
            len,
            mtime: Some(t),
        };
        assert_eq!(verdict(p, false, 10, st(10), Some(st(10))), None);
        let m = verdict(p, false, 10, st(10), Some(st(4))).unwrap();
        assert!(
            m.contains("input /d/x.safetensors was truncated while being read"),
            "{m}"
        );
        let m = verdict(p, false, 10, st(10), Some(st(11))).unwrap();
        assert!(m.contains("changed while being read"), "{m}");
        let m = verdict(p, true, 10, st(10), Some(st(10))).unwrap();
        assert!(m.contains("truncated"), "{m}");
    }
}

//! Output files written at the disk's speed, the way `cp` writes them.
//!
//! - **In the kernel where the bytes are unchanged.** A run of bytes that is a view of an input
//!   file's memory map (an [`crate::InputMap`], made by any plugin: [`Origins`]) is copied from
//!   that file by the kernel (`copy_file_range(2)`), page cache to page cache, as `cp` copies;
//!   any other bytes are written with `pwrite`. Both give the same bytes. A filesystem (or a
//!   pair of them) that cannot copy in the kernel (`EXDEV`, `EINVAL`, `EOPNOTSUPP`, `ENOSYS`)
//!   gets `pwrite`s from then on; an input that ends early (truncated while being read) has the
//!   rest written from its map, where the input guard ([`crate::inputs`]) takes over.
//! - **Write-back behind the writes.** A durable file ([`OutputFile::durable`]) hands each
//!   write's pages to write-back at once (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, from a
//!   thread of its own) and waits for those more than [`WRITEBACK_LAG`] behind, so the disk
//!   writes while the conversion reads, hashes and maps, dirty pages stay bounded, and the
//!   closing `fsync` ([`OutputFile::sync`]) has next to nothing left to write.

use crate::inputs::{FileOrigin, Origins};
use crate::{PluginError, Result};
use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes per write call or kernel copy: syscalls cost nothing at this size, and a consumer can
/// let each window's pages go right after it is written.
pub const WINDOW: usize = 8 << 20;

/// Runs at least this long are copied (or written) by a thread of their own while the writer's
/// thread checksums them (a large tensor then takes two cores, not one; a thread costs tens of
/// microseconds, a window's copy milliseconds).
pub const BESIDE: usize = WINDOW;

/// How far write-back of a durable file may fall behind its writes before the writer waits
/// (the dirty pages a file may hold). Waiting stalls the thread's other work, so it waits only
/// when the disk is that far behind (measured: 64 MiB waited often enough to cost 10-15 % on a
/// disk that writes 2 GB/s; 256 MiB as fast as never waiting).
pub const WRITEBACK_LAG: u64 = 256 << 20;

/// How the bytes of an [`OutputFile`] got there, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Copied in the kernel from an input file.
    pub copied: u64,
    /// Written from memory.
    pub written: u64,
}

/// An output file being written at fixed offsets (see the module docs).
pub struct OutputFile {
    file: File,
    path: PathBuf,
    origins: Option<Arc<Origins>>,
    writeback: Option<WriteBack>,
    stats: WriteStats,
}

/// Ranges handed to write-back and not yet waited for, oldest first.
struct WriteBack {
    /// Spans handed to write-back (start, length, bytes written in them), oldest first.
    started: VecDeque<(u64, u64, u64)>,
    /// Bytes in `started`.
    behind: u64,
    /// Writes not yet handed over: the span they cover and their bytes (small writes, such as
    /// an archive's frame, go in batches).
    pending: Option<(u64, u64)>,
    pending_bytes: u64,
    /// The thread that hands the spans to write-back (started on the first).
    starter: Option<Starter>,
}

/// A thread of its own that hands spans of a file to write-back (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). The call does the filesystem's block allocation and submits the
/// I/O on the calling thread; on the writing thread it came on top of the kernel's copy, which
/// is what bounds a conversion. Measured on the 8 GB DeepSeek-shaped checkpoint with fsync,
/// interleaved runs: Megatron -> HF 8.1-10.2 s (median 9.4) against 9.2-10.5 (9.7) with the
/// writer's own calls, HF -> Megatron 4.4-6.5 s (5.8) against 5.1-7.7 (6.4); faster in 9
/// pairs of 11.
struct Starter {
    spans: Option<std::sync::mpsc::Sender<(u64, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The first error a hand-over met (write-back errors also show at the closing fsync).
    failed: Arc<std::sync::Mutex<Option<std::io::Error>>>,
}

impl Starter {
    /// `None` when the file cannot be shared or no thread can be had (the writer then hands
    /// the spans over itself).
    fn new(file: &File) -> Option<Starter> {
        let file = file.try_clone().ok()?;
        let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
        let failed = Arc::new(std::sync::Mutex::new(None));
        let seen = failed.clone();
        let thread = std::thread::Builder::new()
            .name("bridgeflow write-back".into())
            .spawn(move || {
                for (at, len) in rx {
                    if let Err(e) = start_writeback(&file, at, len) {
                        seen.lock().unwrap().get_or_insert(e);
                    }
                }
            })
            .ok()?;
        Some(Starter {
            spans: Some(tx),
            thread: Some(thread),
            failed,
        })
    }

    /// Hands `at..at+len` over; false when the thread is gone.
    fn start(&self, at: u64, len: u64) -> bool {
        self.spans
            .as_ref()
            .is_some_and(|t| t.send((at, len)).is_ok())
    }

    /// The first error a hand-over met, once.
    fn failure(&self) -> Option<std::io::Error> {
        self.failed.lock().unwrap().take()
    }

    /// Waits for every span handed over; the first error any met.
    fn finish(mut self) -> Option<std::io::Error> {
        self.join();
        self.failure()
    }

    fn join(&mut self) {
        self.spans = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Starter {
    fn drop(&mut self) {
        self.join();
    }
}

impl OutputFile {
    /// `file` (open for writing, not `O_APPEND`), written with `pwrite` only; `path` names it in
    /// errors.
    pub fn new(file: File, path: impl Into<PathBuf>) -> OutputFile {
        OutputFile {
            file,
            path: path.into(),
            origins: None,
            writeback: None,
            stats: WriteStats::default(),
        }
    }

    /// Copies runs that view an input file in the kernel, from that file (`None`: never).
    pub fn kernel_copy(mut self, origins: Option<Arc<Origins>>) -> OutputFile {
        self.origins = origins;
        self
    }

    /// Starts write-back behind the writes (for a file that will be [`Self::sync`]ed).
    pub fn durable(mut self, yes: bool) -> OutputFile {
        self.writeback = yes.then(|| WriteBack {
            started: VecDeque::new(),
            behind: 0,
            pending: None,
            pending_bytes: 0,
            starter: None,
        });
        self
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> WriteStats {
        self.stats
    }

    /// Writes `bytes` at `at`.
    pub fn write_at(&mut self, bytes: &[u8], at: u64) -> Result<()> {
        self.write_windows(bytes, at, "cannot write", |_, _| {})
    }

    /// Writes `bytes` at `at` in windows of [`WINDOW`] bytes, calling `each(range, window)` for
    /// each window once it is written (to checksum it while it is in cache, and let its pages
    /// go). At least [`BESIDE`] bytes are written by another thread, which runs ahead: `each`
    /// sees window i while window i+1 is being copied or written, so the two cores overlap, and
    /// a consumer that lets each window go (`discard`) does so at the pace of the writes, which
    /// is the progress the memory budget sees (a buffer checksummed to its end long before the
    /// disk has taken it would look like a stalled pipeline). An error says
    /// `{what} {path}: {error}`.
    pub fn write_windows(
        &mut self,
        bytes: &[u8],
        at: u64,
        what: &str,
        mut each: impl FnMut(Range<usize>, &[u8]),
    ) -> Result<()> {
        let mut origin = self.origins.as_ref().and_then(|o| o.find(bytes));
        if bytes.len() >= BESIDE {
            let copied = std::thread::scope(|s| {
                // One message per window written; dropped (the loop below ends) on an error.
                let (written, windows) = std::sync::mpsc::channel::<()>();
                let copier = std::thread::Builder::new()
                    .name("bridgeflow copy".into())
                    .spawn_scoped(s, || {
                        // Moved in, so that the loop below ends when this thread does.
                        let written = written;
                        let mut done = 0;
                        while done < bytes.len() {
                            let end = (done + WINDOW).min(bytes.len());
                            self.write_window(bytes, done..end, at, what, &mut origin)?;
                            let _ = written.send(());
                            done = end;
                        }
                        Ok(())
                    });
                let Ok(copier) = copier else {
                    return None;
                };
                for (i, window) in bytes.chunks(WINDOW).enumerate() {
                    if windows.recv().is_err() {
                        break;
                    }
                    each(i * WINDOW..i * WINDOW + window.len(), window);
                }
                Some(copier.join())
            });
            match copied {
                Some(Ok(r)) => return r,
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                // No thread to be had: window by window on this one.
                None => {}
            }
        }
        let mut done = 0;
        while done < bytes.len() {
            let end = (done + WINDOW).min(bytes.len());
            self.write_window(bytes, done..end, at, what, &mut origin)?;
            each(done..end, &bytes[done..end]);
            done = end;
        }
        Ok(())
    }

    /// Writes `bytes[range]` at `at + range.start`: copied in the kernel from `origin` (the
    /// file `bytes` view) while it can, the rest from memory (and `origin` forgotten then).
    fn write_window(
        &mut self,
        bytes: &[u8],
        range: Range<usize>,
        at: u64,
        what: &str,
        origin: &mut Option<FileOrigin>,
    ) -> Result<()> {
        let window = &bytes[range.clone()];
        let off = at + range.start as u64;
        let mut copied = 0;
        if let Some(o) = *origin {
            copied = self.copy_in_kernel(o, range.start as u64, window.len(), off, what)?;
            self.stats.copied += copied as u64;
            if copied < window.len() {
                *origin = None;
            }
        }
        if copied < window.len() {
            self.file
                .write_all_at(&window[copied..], off + copied as u64)
                .map_err(|e| PluginError::io(&self.path, what, e))?;
            self.stats.written += (window.len() - copied) as u64;
        }
        self.started(off, window.len() as u64)
    }

    /// Copies `len` bytes from `from` (advanced by `skip`) to `at`: how many were copied; fewer
    /// when the kernel cannot copy (never again for this file then) or the input ended early.
    #[cfg(target_os = "linux")]
    fn copy_in_kernel(
        &mut self,
        from: FileOrigin,
        skip: u64,
        len: usize,
        at: u64,
        what: &str,
    ) -> Result<usize> {
        use std::os::fd::AsRawFd;
        let mut done = 0;
        while done < len {
            let mut off_in = (from.offset + skip + done as u64) as libc::loff_t;
            let mut off_out = (at + done as u64) as libc::loff_t;
            // SAFETY: positioned copy between two open descriptors: `from.fd` is held open by the
            // map the caller's bytes view (see `Origins::find`).
            let n = unsafe {
                libc::copy_file_range(
                    from.fd,
                    &mut off_in,
                    self.file.as_raw_fd(),
                    &mut off_out,
                    len - done,
                    0,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            if n == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(
                    libc::EXDEV
                    | libc::EINVAL
                    | libc::EOPNOTSUPP
                    | libc::ENOSYS
                    | libc::EBADF
                    | libc::EPERM
                    | libc::ETXTBSY,
                ) => {
                    self.origins = None;
                    break;
                }
                _ => return Err(PluginError::io(&self.path, what, e)),
            }
        }
        Ok(done)
    }

    #[cfg(not(target_os = "linux"))]
    fn copy_in_kernel(
        &mut self,
        _: FileOrigin,
        _: u64,
        _: usize,
        _: u64,
        _: &str,
    ) -> Result<usize> {
        self.origins = None;
        Ok(0)
    }

    /// Hands `at..at+len` to write-back, and waits for what is more than [`WRITEBACK_LAG`]
    /// behind.
    fn started(&mut self, at: u64, len: u64) -> Result<()> {
        let Some(wb) = self.writeback.as_mut() else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let (lo, hi) = match wb.pending {
            Some((lo, hi)) => (lo.min(at), hi.max(at + len)),
            None => (at, at + len),
        };
        wb.pending = Some((lo, hi));
        wb.pending_bytes += len;
        // Handed over in batches of at least half a window, or when the writes spread wide.
        if wb.pending_bytes < WINDOW as u64 / 2 && hi - lo < WRITEBACK_LAG {
            return Ok(());
        }
        let bytes = std::mem::take(&mut wb.pending_bytes);
        wb.pending = None;
        if wb.starter.is_none() {
            wb.starter = Starter::new(&self.file);
        }
        let handed = wb.starter.as_ref().is_some_and(|st| st.start(lo, hi - lo));
        if let Some(e) = wb.starter.as_ref().and_then(Starter::failure) {
            return Err(PluginError::io(&self.path, "cannot write", e));
        }
        if !handed {
            sync_range(&self.file, &self.path, lo, hi - lo, false)?;
        }
        wb.started.push_back((lo, hi - lo, bytes));
        wb.behind += bytes;
        while wb.behind > WRITEBACK_LAG {
            let (a, n, bytes) = wb.started.pop_front().expect("behind > 0");
            wb.behind -= bytes;
            sync_range(&self.file, &self.path, a, n, true)?;
        }
        Ok(())
    }

    /// Makes the file durable: what write-back has not yet written, then `fsync`.
    pub fn sync(&mut self) -> Result<()> {
        self.wait_writeback()?;
        self.file
            .sync_all()
            .map_err(|e| PluginError::io(&self.path, "cannot sync", e))
    }

    /// A durable file: writes what write-back has not yet written and waits for it (another
    /// handle of the same file then `fsync`s it cheaply). Nothing otherwise.
    pub fn wait_writeback(&mut self) -> Result<()> {
        if let Some(wb) = self.writeback.as_mut() {
            wb.started.clear();
            wb.behind = 0;
            wb.pending = None;
            wb.pending_bytes = 0;
            // Every span handed over first (their errors once all are in).
            if let Some(e) = wb.starter.take().and_then(Starter::finish) {
                return Err(PluginError::io(&self.path, "cannot write", e));
            }
            // 0 bytes: to the end of the file.
            sync_range(&self.file, &self.path, 0, 0, true)?;
        }
        Ok(())
    }

    pub fn into_file(self) -> File {
        self.file
    }
}

/// `sync_file_range`: start write-back of `at..at+len` (0: to the end of the file), or (`wait`)
/// write it and wait for it; where the call is not supported, nothing (the closing fsync does
/// all the work).
#[cfg(target_os = "linux")]
fn file_range_sync(file: &File, at: u64, len: u64, wait: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    loop {
        // SAFETY: a plain syscall on an open descriptor.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), at as i64, len as i64, flags) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOSYS | libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP) => return Ok(()),
            _ => return Err(e),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn file_range_sync(_: &File, _: u64, _: u64, _: bool) -> std::io::Result<()> {
    Ok(())
}

/// Write-back of `at..at+len` started (the write-back thread's call).
fn start_writeback(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    file_range_sync(file, at, len, false)
}

/// [`file_range_sync`], an error naming `path`.
fn sync_range(file: &File, path: &Path, at: u64, len: u64, wait: bool) -> Result<()> {
    file_range_sync(file, at, len, wait).map_err(|e| PluginError::io(path, "cannot write", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InputMap;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bf-outfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Bytes that differ from window to window and page to page.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    fn create(p: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .unwrap()
    }

    /// An input of a bit more than two windows, written at an odd offset after a few heap
    /// bytes: `(origins, durable)` say how.
    fn write_one(
        d: &Path,
        name: &str,
        origins: Option<Arc<Origins>>,
        durable: bool,
    ) -> (PathBuf, WriteStats, Vec<Range<usize>>) {
        let input = d.join("input.bin");
        if !input.exists() {
            std::fs::write(&input, pattern(2 * WINDOW + 12_345)).unwrap();
        }
        let map = InputMap::open(&input).unwrap();
        let p = d.join(name);
        let mut out = OutputFile::new(create(&p), &p)
            .kernel_copy(origins)
            .durable(durable);
        out.write_at(b"head:", 0).unwrap();
        let mut seen = Vec::new();
        out.write_windows(&map[3..], 5, "writing 'x' to", |r, w| {
            assert_eq!(w, &map[3 + r.start..3 + r.end]);
            seen.push(r);
        })
        .unwrap();
        out.sync().unwrap();
        (p, out.stats(), seen)
    }

    #[test]
    fn kernel_copies_and_writes_give_the_same_bytes() {
        let d = dir("same");
        let n = 2 * WINDOW + 12_345 - 3;
        let mut want = b"head:".to_vec();
        want.extend_from_slice(&pattern(2 * WINDOW + 12_345)[3..]);
        let origins = Some(Arc::new(Origins::new()));
        for durable in [false, true] {
            let (copied, stats, seen) =
                write_one(&d, &format!("copied-{durable}"), origins.clone(), durable);
            assert_eq!(
                stats,
                WriteStats {
                    copied: n as u64,
                    written: 5
                },
                "in the kernel"
            );
            assert_eq!(seen, vec![0..WINDOW, WINDOW..2 * WINDOW, 2 * WINDOW..n]);
            let (written, stats, _) = write_one(&d, &format!("written-{durable}"), None, durable);
            assert_eq!(
                stats,
                WriteStats {
                    copied: 0,
                    written: n as u64 + 5
                },
                "from memory"
            );
            assert!(std::fs::read(&copied).unwrap() == want);
            assert!(std::fs::read(&written).unwrap() == want);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A durable file's spans go to write-back from a thread of its own, and the file synced
    /// after them holds every byte.
    #[test]
    fn a_durable_file_hands_its_spans_to_write_back_from_a_thread() {
        let d = dir("starter");
        let p = d.join("out.bin");
        let bytes = pattern(3 * WINDOW + 99);
        let mut out = OutputFile::new(create(&p), &p).durable(true);
        out.write_at(&bytes, 0).unwrap();
        let wb = out.writeback.as_ref().unwrap();
        assert!(wb.starter.is_some(), "a thread hands the spans over");
        assert!(wb.starter.as_ref().unwrap().failure().is_none());
        out.sync().unwrap();
        assert!(
            out.writeback.as_ref().unwrap().starter.is_none(),
            "joined at the sync"
        );
        assert!(std::fs::read(&p).unwrap() == bytes);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_views_of_input_maps_have_an_origin() {
        let d = dir("origin");
        let p = d.join("in.bin");
        std::fs::write(&p, pattern(10_000)).unwrap();
        let map = InputMap::open(&p).unwrap();
        let o = Origins::new();
        let at = o.find(&map[1000..2000]).unwrap();
        assert_eq!(at.offset, 1000);
        assert_eq!(o.find(&map[..]).unwrap().offset, 0);
        assert_eq!(o.find(&map[5..5]), None, "nothing to copy");
        assert_eq!(o.find(&pattern(100)), None, "heap bytes");
        drop(map);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_source_the_kernel_cannot_copy_from_is_written_instead() {
        // A pipe is no file to copy from (EINVAL): the bytes are written from memory, and the
        // file never asks the kernel again.
        let d = dir("fallback");
        let p = d.join("out.bin");
        let mut out = OutputFile::new(create(&p), &p).kernel_copy(Some(Arc::new(Origins::new())));
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let from = FileOrigin {
            fd: fds[0],
            offset: 0,
        };
        assert_eq!(out.copy_in_kernel(from, 0, 4096, 0, "w").unwrap(), 0);
        assert!(out.origins.is_none());
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        // Another filesystem (tmpfs, when there is one): the same bytes, however they got there.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let (p, _, _) = write_one(&d, "local", Some(Arc::new(Origins::new())), false);
            let q = shm.join(format!("bf-outfile-{}", std::process::id()));
            let _ = std::fs::remove_file(&q);
            let input = InputMap::open(d.join("input.bin")).unwrap();
            let mut out =
                OutputFile::new(create(&q), &q).kernel_copy(Some(Arc::new(Origins::new())));
            out.write_at(b"head:", 0).unwrap();
            out.write_at(&input[3..], 5).unwrap();
            assert_eq!(
                out.stats().copied + out.stats().written,
                input.len() as u64 + 2
            );
            assert!(std::fs::read(&q).unwrap() == std::fs::read(&p).unwrap());
            std::fs::remove_file(&q).unwrap();
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A window reaches `each` only once it is in the file (copied in the kernel or written), so
    /// a consumer letting windows go does so at the pace of the writes.
    #[test]
    fn each_window_is_seen_once_it_is_written() {
        let d = dir("paced");
        let input = d.join("input.bin");
        std::fs::write(&input, pattern(3 * WINDOW + 777)).unwrap();
        let map = InputMap::open(&input).unwrap();
        let heap = pattern(2 * WINDOW + 5);
        for (name, bytes, origins) in [
            ("copied", &map[..], Some(Arc::new(Origins::new()))),
            ("written", &heap[..], None),
        ] {
            let p = d.join(name);
            drop(create(&p));
            let reader = File::open(&p).unwrap();
            let mut out = OutputFile::new(File::options().write(true).open(&p).unwrap(), &p)
                .kernel_copy(origins);
            let mut seen = 0;
            out.write_windows(bytes, 0, "writing", |r, w| {
                let mut back = vec![0u8; w.len()];
                let there = reader.read_exact_at(&mut back, r.start as u64).is_ok() && back == w;
                assert!(there, "{name}: window {r:?} seen before it was written");
                seen += 1;
            })
            .unwrap();
            assert_eq!(seen, bytes.len().div_ceil(WINDOW));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}

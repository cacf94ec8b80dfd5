//! File helpers every reader and writer needs the same way.

use crate::{PluginError, Result};
use std::path::{Path, PathBuf};

/// The input files a `path` config names: the file itself, a folder's files accepted by
/// `wanted`, or a glob's matches; sorted. No match is an error naming the path.
pub fn resolve_inputs(path: &str, wanted: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let p = Path::new(path);
    if p.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = if p.is_dir() {
        std::fs::read_dir(p)
            .map_err(|e| PluginError::io(p, "cannot list", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file() && wanted(f))
            .collect()
    } else {
        glob::glob(path)
            .map_err(|e| PluginError::config(format!("path '{path}': bad glob: {e}")))?
            .filter_map(|r| r.ok())
            .filter(|f| f.is_file())
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(PluginError::io(
            p,
            "no input files match",
            std::io::Error::new(std::io::ErrorKind::NotFound, "nothing found"),
        ));
    }
    Ok(files)
}

/// Sizes `file` to `len` and reserves its blocks, so that a full disk fails before any data is
/// written (filesystems without `fallocate` keep the sparse file).
pub fn reserve(file: &std::fs::File, path: &Path, len: u64) -> Result<()> {
    file.set_len(len)
        .map_err(|e| PluginError::io(path, "cannot size", e))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if len > 0 {
            // SAFETY: a plain syscall on an open descriptor.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(PluginError::io(path, "cannot reserve space for", err));
                }
            }
        }
    }
    Ok(())
}

fn remove_any(p: &Path) {
    let _ = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
}

/// Refuses to write over an existing output unless the stage was told to (`overwrite`).
pub fn refuse_existing(target: &Path, overwrite: bool) -> Result<()> {
    if target.exists() && !overwrite {
        return Err(PluginError::config(format!(
            "{} already exists; set overwrite = true or choose another path",
            target.display()
        )));
    }
    Ok(())
}

/// A hidden name beside `target` for work in progress, `.{name}.{tag}-{pid}`: the same
/// directory (so committing is a rename, not a copy), and named so that it never looks like a
/// finished output and one process's leftovers never clash with another's.
pub fn hidden_sibling(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Makes a finished output visible under its name: one rename when `target` is new; when it
/// exists (the caller checked `overwrite`), the old one is moved aside first, put back if the
/// rename fails, and removed after it succeeds.
///
/// Passes the run's commit point first ([`enter_commit_point`]): a run cancelled before this
/// writer got here gets a `Cancelled` error and nothing is renamed.
pub fn commit(staging: &Path, target: &Path) -> Result<()> {
    // An input truncated or changed while it was read (its pages may have read as zeros)
    // fails the commit: what was written from it cannot be trusted.
    crate::inputs::inputs_intact()?;
    enter_commit_point(target)?;
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| PluginError::io(parent, "cannot create", e))?;
    }
    if !target.exists() {
        return std::fs::rename(staging, target)
            .map_err(|e| PluginError::io(target, "cannot commit", e));
    }
    let aside = hidden_sibling(target, "old");
    std::fs::rename(target, &aside).map_err(|e| PluginError::io(target, "cannot move aside", e))?;
    if let Err(e) = std::fs::rename(staging, target) {
        let _ = std::fs::rename(&aside, target);
        return Err(PluginError::io(target, "cannot commit", e));
    }
    remove_any(&aside);
    Ok(())
}

// ------------------------------------------------------------------------------ commit point

/// The commit point of a run, decided once for every writer in it: either the run is cancelled
/// (an error, or an interrupt that comes in time) and no writer that has not yet reached its
/// commit point makes its output visible, or a writer passes its commit point and finishes its
/// commit whatever comes later. An interrupt that arrives when every writer of the run has
/// passed its commit point no longer fails the run ([`Interrupt::AfterCommitPoint`]).
///
/// The host keeps one gate per run and answers a writer's [`enter_commit_point`] from it; a
/// process without a host (a writer used as a library, unit tests) uses [`process_gate`].
pub struct CommitGate {
    state: std::sync::Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    cancelled: bool,
    /// One flag per writer of the run: it has passed its commit point.
    past: Vec<bool>,
}

/// What an interrupt did to a run ([`CommitGate::interrupt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Some writer had not reached its commit point: the run is cancelled and that writer
    /// will not commit.
    Cancelled,
    /// Every writer had passed its commit point: the run completes and succeeds.
    AfterCommitPoint,
}

impl Default for CommitGate {
    fn default() -> Self {
        CommitGate::new()
    }
}

impl CommitGate {
    /// An open gate with no writers yet ([`Self::set_writers`]).
    pub const fn new() -> CommitGate {
        CommitGate {
            state: std::sync::Mutex::new(GateState {
                cancelled: false,
                past: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the number of writers (the host, before the run starts).
    pub fn set_writers(&self, writers: usize) {
        self.lock().past = vec![false; writers];
    }

    /// Writer `w` reached its commit point: true if it may make its output visible (it is then
    /// past the commit point for good, and asking again answers true), false if the run was
    /// cancelled first. A `w` the gate does not know only learns whether the run is cancelled.
    pub fn enter(&self, w: usize) -> bool {
        let mut s = self.lock();
        match s.past.get(w).copied() {
            Some(true) => true,
            Some(false) if !s.cancelled => {
                s.past[w] = true;
                true
            }
            _ => !s.cancelled,
        }
    }

    /// Writer `w` finished its commit (passed its commit point whether or not it asked).
    pub fn passed(&self, w: usize) {
        if let Some(p) = self.lock().past.get_mut(w) {
            *p = true;
        }
    }

    /// The run failed or is being torn down: writers not yet past their commit point will not
    /// commit. Writers already past it finish.
    pub fn cancel(&self) {
        self.lock().cancelled = true;
    }

    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// An interrupt arrived: cancels the run unless every writer is past its commit point.
    pub fn interrupt(&self) -> Interrupt {
        let mut s = self.lock();
        if !s.cancelled && !s.past.is_empty() && s.past.iter().all(|&p| p) {
            Interrupt::AfterCommitPoint
        } else {
            s.cancelled = true;
            Interrupt::Cancelled
        }
    }
}

/// The gate of a process in which no host answers the commit point: what
/// [`enter_commit_point`] asks when it is called outside a sink's `commit` under a host.
pub fn process_gate() -> &'static CommitGate {
    static GATE: CommitGate = CommitGate::new();
    &GATE
}

thread_local! {
    /// The emitter of the `finish` call this thread is in, if any (set by the sink adapter).
    static COMMIT_HOOK: std::cell::Cell<*const crate::Emitter> =
        const { std::cell::Cell::new(std::ptr::null()) };
}

/// Installed by the SDK around a sink's `commit`: while it lives, [`enter_commit_point`] on
/// this thread asks the host through `finish`'s emitter, whose `is_cancelled` the host answers
/// from its [`CommitGate`] (false: this writer is now past the commit point).
pub(crate) struct CommitHook {
    previous: *const crate::Emitter,
}

impl CommitHook {
    pub(crate) fn install(em: &crate::Emitter) -> CommitHook {
        let previous = COMMIT_HOOK.with(|h| h.replace(em as *const crate::Emitter));
        CommitHook { previous }
    }
}

impl Drop for CommitHook {
    fn drop(&mut self) {
        COMMIT_HOOK.with(|h| h.set(self.previous));
    }
}

/// Passes the commit point of the current run before `target` is made visible: `Cancelled`
/// if the run was cancelled (by an error elsewhere or an interrupt) before this writer got
/// here, in which case the writer must not commit. Once it returns Ok, an interrupt no longer
/// fails the run on this writer's account. [`commit`] and [`OutputClaim::commit`] call it; a
/// writer that renames by itself calls it right before its first rename.
pub fn enter_commit_point(target: &Path) -> Result<()> {
    let hook = COMMIT_HOOK.with(|h| h.get());
    let go = if hook.is_null() {
        process_gate().enter(usize::MAX)
    } else {
        // SAFETY: set by `CommitHook` from a live `&Emitter` for the duration of `finish`.
        !unsafe { &*hook }.is_cancelled()
    };
    if go {
        Ok(())
    } else {
        Err(PluginError::new(
            crate::ErrorKind::Cancelled,
            format!(
                "run cancelled before {} was committed; nothing written there",
                target.display()
            ),
        ))
    }
}

// --------------------------------------------------------------------- one writer per output

/// The hidden lock file of an output, `.{name}.lock`, beside it.
pub fn lock_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.lock"))
}

/// True if a process with this pid exists (`kill(pid, 0)` is not ESRCH).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// A staging name `.{owner}.{tag}-{pid}` (as [`hidden_sibling`] makes them; also the older
/// `.{owner}.{tag}-{pid}-{n}`) taken apart: the output it belongs to, its tag (letters,
/// digits, `_`), and the pid of the process that made it.
pub fn parse_staging_name(file_name: &str) -> Option<(&str, &str, u32)> {
    fn number(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
    }
    fn split(s: &str) -> Option<(&str, &str, u32)> {
        let (head, pid) = s.rsplit_once('-')?;
        let (owner, tag) = head.rsplit_once('.')?;
        if !number(pid) || owner.is_empty() || tag.is_empty() || !tag.bytes().all(tag_byte) {
            return None;
        }
        Some((owner, tag, pid.parse().ok().filter(|&p: &u32| p > 0)?))
    }
    let rest = file_name.strip_prefix('.')?;
    split(rest).or_else(|| {
        let (head, n) = rest.rsplit_once('-')?;
        number(n).then_some(())?;
        split(head)
    })
}

fn tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The output is being written by another process.
fn busy(target: &Path, lock: &Path) -> PluginError {
    let pid = std::fs::read_to_string(lock)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let who = match pid {
        Some(p) => format!("pid {p}"),
        None => "pid unknown".to_string(),
    };
    PluginError::config(format!(
        "output busy: {} is being written by another process ({who}, holding {}); wait for it \
         to finish or choose another path",
        target.display(),
        lock.display()
    ))
}

/// Takes the advisory lock of `target` (`flock(LOCK_EX | LOCK_NB)` on its [`lock_path`]),
/// writing our pid into the file. Fails at once, naming the holder's pid, if another process
/// (or another claim in this one) holds it.
fn lock_output(target: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = lock_path(target);
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| PluginError::io(&path, "cannot create the lock file", e))?;
        // SAFETY: a plain syscall on an open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => return Err(busy(target, &path)),
                Some(libc::EINTR) => continue,
                _ => return Err(PluginError::io(&path, "cannot lock", e)),
            }
        }
        // The holder before us removes the file while holding it: then we locked a file that
        // no longer has this name, and start again with the one that does.
        let ours = file.metadata().map(|m| (m.dev(), m.ino())).ok();
        let named = std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok();
        if ours.is_none() || ours != named {
            continue;
        }
        let pid = format!("{}\n", std::process::id());
        let written = file
            .set_len(0)
            .and_then(|()| std::os::unix::fs::FileExt::write_all_at(&file, pid.as_bytes(), 0));
        written.map_err(|e| PluginError::io(&path, "cannot write", e))?;
        return Ok(file);
    }
}

/// Removes the lock file, then unlocks (close): race-free with [`lock_output`]'s re-check.
fn unlock_output(target: &Path, file: std::fs::File) {
    let _ = std::fs::remove_file(lock_path(target));
    drop(file);
}

/// What [`clear_stale`] and [`clean`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    /// Staging left by processes that are gone, removed.
    pub removed: Vec<PathBuf>,
    /// An output moved aside by an overwrite that was killed half-way, put back (from, to).
    pub restored: Vec<(PathBuf, PathBuf)>,
    /// Left alone, and why (the process that made it is alive, or holds the output's lock).
    pub kept: Vec<(PathBuf, String)>,
}

impl Cleaned {
    fn extend(&mut self, other: Cleaned) {
        self.removed.extend(other.removed);
        self.restored.extend(other.restored);
        self.kept.extend(other.kept);
    }
}

/// The staging siblings of `target` (hidden names `.{name}.{tag}-{pid}` beside it), with pids.
pub fn staging_siblings(target: &Path) -> Vec<(PathBuf, u32, String)> {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Vec::new();
    };
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, u32, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            let (owner, tag, pid) = parse_staging_name(&f)?;
            (owner == name).then(|| (e.path(), pid, tag.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// Removes the staging of dead processes beside `target`; the caller holds `target`'s lock (so
/// no live writer that uses it is at work there). Staging of a live pid is kept. An output
/// moved aside (`.{name}.old-{pid}`) by an overwrite killed before it put the new one in place
/// is put back when `target` is missing, else removed.
pub fn clear_stale(target: &Path) -> Cleaned {
    let mut done = Cleaned::default();
    let me = std::process::id();
    for (path, pid, tag) in staging_siblings(target) {
        if pid == me || pid_alive(pid) {
            done.kept.push((
                path,
                format!("pid {pid} is running and may still be writing it"),
            ));
            continue;
        }
        if tag == "old" && std::fs::symlink_metadata(target).is_err() {
            if std::fs::rename(&path, target).is_ok() {
                done.restored.push((path, target.to_path_buf()));
            }
            continue;
        }
        remove_any(&path);
        if std::fs::symlink_metadata(&path).is_err() {
            done.removed.push(path);
        }
    }
    done
}

/// One writer's claim on an output path: the output's advisory lock, taken before any work
/// starts (the writer's `open`) and held until the commit is done or the writer is dropped, so
/// that a second run writing the same output fails at once naming this one's pid. Claiming
/// also removes staging left there by dead processes.
///
/// The lock file `.{name}.lock` is hidden and removed when the claim is released (race-free:
/// it is unlinked while still locked, and a new claimer re-checks that the name still points
/// at the file it locked). After a kill -9 it stays behind, empty but for the dead pid; the
/// next claim (or `bridgeflow clean`) reuses and removes it.
///
/// Dropping an uncommitted claim removes every staging path it handed out ([`Self::staging`]).
pub struct OutputClaim {
    target: PathBuf,
    lock: Option<std::fs::File>,
    staging: Vec<PathBuf>,
    cleared: Cleaned,
    /// Commit durably ([`Self::durable`]).
    durable: bool,
}

impl std::fmt::Debug for OutputClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputClaim")
            .field("target", &self.target)
            .field("staging", &self.staging)
            .finish()
    }
}

impl OutputClaim {
    /// Locks `target` (creating its parent folder) and clears stale staging beside it. Check
    /// whether the output already exists after this, under the lock.
    pub fn claim(target: &Path) -> Result<OutputClaim> {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| PluginError::io(parent, "cannot create", e))?;
        }
        let lock = lock_output(target)?;
        let cleared = clear_stale(target);
        for p in &cleared.removed {
            eprintln!(
                "note: removed {} (staging of a process that is gone)",
                p.display()
            );
        }
        for (from, to) in &cleared.restored {
            eprintln!(
                "note: put {} back as {} (an overwrite was killed half-way)",
                from.display(),
                to.display()
            );
        }
        Ok(OutputClaim {
            target: target.to_path_buf(),
            lock: Some(lock),
            staging: Vec::new(),
            cleared,
            durable: false,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// What claiming removed or put back.
    pub fn cleared(&self) -> &Cleaned {
        &self.cleared
    }

    /// A staging path for this output, [`hidden_sibling`]`(target, tag)` (`tag`: letters,
    /// digits, `_`), removed when the claim is dropped if it still exists then.
    pub fn staging(&mut self, tag: &str) -> PathBuf {
        debug_assert!(!tag.is_empty() && tag.bytes().all(tag_byte), "tag '{tag}'");
        let p = hidden_sibling(&self.target, tag);
        if !self.staging.contains(&p) {
            self.staging.push(p.clone());
        }
        p
    }

    /// Commits durably (a writer told to `fsync`): everything in the staging (the small files
    /// a writer adds at the end, the folders) is `fsync`ed before the rename, and the folder
    /// holding the target after it, so that once the commit returns the output survives a
    /// crash whole, names included, as after `sync`. The data files are the writer's to sync
    /// (it overlaps that with writing them); here they cost next to nothing.
    pub fn durable(&mut self, yes: bool) {
        self.durable = yes;
    }

    /// Makes `staging` visible as the target ([`commit`], which passes the commit point),
    /// refusing, unless `overwrite`, if something that is not an empty folder appeared at the
    /// target while this run was writing (the existence check at start is not enough).
    pub fn commit(&mut self, staging: &Path, overwrite: bool) -> Result<()> {
        let t = &self.target;
        if !overwrite && std::fs::symlink_metadata(t).is_ok() && !is_empty_dir(t) {
            return Err(PluginError::config(format!(
                "{} already exists (it appeared while this run was writing it); set overwrite \
                 = true or choose another path",
                t.display()
            )));
        }
        if self.durable {
            sync_tree(staging)?;
        }
        commit(staging, t)?;
        self.staging.retain(|p| p != staging);
        if self.durable {
            let parent = t.parent().filter(|p| !p.as_os_str().is_empty());
            sync_path(parent.unwrap_or(Path::new(".")))?;
        }
        Ok(())
    }

    /// Releases the lock now (dropping the claim does the same).
    pub fn release(self) {}
}

impl Drop for OutputClaim {
    fn drop(&mut self) {
        for p in self.staging.drain(..) {
            if std::fs::symlink_metadata(&p).is_ok() {
                remove_any(&p);
            }
        }
        if let Some(f) = self.lock.take() {
            unlock_output(&self.target, f);
        }
    }
}

/// `fsync` of a file or folder (opened read-only).
fn sync_path(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| PluginError::io(p, "cannot sync", e))
}

/// `fsync` of every file and folder under `p` (a file: just it), folders after what they hold.
pub fn sync_tree(p: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(p).map_err(|e| PluginError::io(p, "cannot sync", e))?;
    if meta.is_dir() {
        let rd = std::fs::read_dir(p).map_err(|e| PluginError::io(p, "cannot list", e))?;
        for e in rd {
            let e = e.map_err(|e| PluginError::io(p, "cannot list", e))?;
            sync_tree(&e.path())?;
        }
    } else if !meta.is_file() {
        return Ok(());
    }
    sync_path(p)
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

/// `bridgeflow clean PATH`: removes the staging that dead processes left beside the output
/// `PATH` and, when `PATH` is a folder, beside every output inside it, with their stale lock
/// files. Refuses (keeps, with the reason) what a live process may still be writing: staging of
/// a live pid, or anything of an output whose lock is held.
pub fn clean(path: &Path) -> Result<Cleaned> {
    let mut targets: Vec<PathBuf> = vec![path.to_path_buf()];
    if path.is_dir() {
        let rd = std::fs::read_dir(path).map_err(|e| PluginError::io(path, "cannot list", e))?;
        let mut owners = std::collections::BTreeSet::new();
        for e in rd.filter_map(|e| e.ok()) {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some((owner, _, _)) = parse_staging_name(&f) {
                owners.insert(owner.to_string());
            } else if let Some(owner) = f.strip_prefix('.').and_then(|f| f.strip_suffix(".lock")) {
                if !owner.is_empty() {
                    owners.insert(owner.to_string());
                }
            }
        }
        targets.extend(owners.into_iter().map(|o| path.join(o)));
    }
    let mut done = Cleaned::default();
    for target in targets {
        let lock = lock_path(&target);
        let had_lock = std::fs::symlink_metadata(&lock).is_ok();
        let siblings = staging_siblings(&target);
        if !had_lock && siblings.is_empty() {
            continue;
        }
        match lock_output(&target) {
            Ok(f) => {
                done.extend(clear_stale(&target));
                unlock_output(&target, f);
                if had_lock {
                    done.removed.push(lock);
                }
            }
            Err(e) if e.kind == crate::ErrorKind::Config => {
                for (p, _, _) in siblings {
                    done.kept.push((p, e.message.to_string()));
                }
                done.kept.push((lock, e.message.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_replaces_atomically() {
        let d = std::env::temp_dir().join(format!("bf-commit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (staging, target) = (d.join(".t.partial"), d.join("sub/t"));
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("a"), "new").unwrap();
        commit(&staging, &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "new");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("b"), "newer").unwrap();
        commit(&staging, &target).unwrap();
        assert!(!target.join("a").exists() && target.join("b").exists());
        assert_eq!(
            std::fs::read_dir(d.join("sub")).unwrap().count(),
            1,
            "nothing left aside"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The pid of a process that has exited.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!pid_alive(pid));
        pid
    }

    #[test]
    fn staging_names_parse() {
        assert_eq!(
            parse_staging_name(".model.partial-42"),
            Some(("model", "partial", 42))
        );
        assert_eq!(
            parse_staging_name(".m.safetensors.partial-42-999"),
            Some(("m.safetensors", "partial", 42))
        );
        assert_eq!(
            parse_staging_name(".x_text_document.idx.lengths_partial-7"),
            Some(("x_text_document.idx", "lengths_partial", 7))
        );
        // Another output's staging: `model.v2`, not `model`.
        assert_eq!(
            parse_staging_name(".model.v2.partial-42").map(|p| p.0),
            Some("model.v2")
        );
        for bad in [
            ".model.lock",
            "model.partial-1",
            ".model.partial-",
            ".model.partial-0",
        ] {
            assert_eq!(parse_staging_name(bad), None, "{bad}");
        }
        let me = std::process::id();
        let name = hidden_sibling(Path::new("out/ckpt"), "partial");
        let name = name.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_staging_name(name), Some(("ckpt", "partial", me)));
    }

    #[test]
    fn gate_decides_the_commit_point_once() {
        // An interrupt before the writer's commit point cancels: it must not commit.
        let g = CommitGate::new();
        g.set_writers(1);
        assert_eq!(g.interrupt(), Interrupt::Cancelled);
        assert!(!g.enter(0));
        // An interrupt after it: the run completes, the writer keeps committing.
        let g = CommitGate::new();
        g.set_writers(1);
        assert!(g.enter(0));
        assert_eq!(g.interrupt(), Interrupt::AfterCommitPoint);
        assert!(!g.is_cancelled());
        assert!(g.enter(0), "a writer past its commit point stays past");
        // Two writers, one past: the interrupt cancels the other, not the one committing.
        let g = CommitGate::new();
        g.set_writers(2);
        assert!(g.enter(1));
        assert_eq!(g.interrupt(), Interrupt::Cancelled);
        assert!(!g.enter(0));
        assert!(g.enter(1));
        // A writer that finished without asking counts as past; an error cancels for good.
        let g = CommitGate::new();
        g.set_writers(2);
        g.passed(0);
        assert!(g.enter(1));
        assert_eq!(g.interrupt(), Interrupt::AfterCommitPoint);
        let g = CommitGate::new();
        g.set_writers(1);
        g.cancel();
        assert!(!g.enter(0));
        assert_eq!(g.interrupt(), Interrupt::Cancelled);
    }

    #[test]
    fn commit_asks_the_host_through_the_finish_emitter() {
        let d = tmp("hook");
        let (staging, target) = (d.join(".t.partial-1"), d.join("t"));
        std::fs::create_dir(&staging).unwrap();
        let gate = CommitGate::new();
        gate.set_writers(1);
        let ask = || !gate.enter(0);
        let mut no_emit = |_: crate::Item| -> Result<()> { Ok(()) };
        // Cancelled first: commit refuses and renames nothing.
        gate.cancel();
        let r = crate::Emitter::scoped(&mut no_emit, Some(&ask), |em| {
            let _hook = CommitHook::install(em);
            commit(&staging, &target)
        });
        assert!(r.unwrap_err().is_cancelled());
        assert!(staging.is_dir() && !target.exists());
        // Open: commit passes, and the writer is past the commit point for the host.
        let gate2 = CommitGate::new();
        gate2.set_writers(1);
        let ask2 = || !gate2.enter(0);
        crate::Emitter::scoped(&mut no_emit, Some(&ask2), |em| {
            let _hook = CommitHook::install(em);
            commit(&staging, &target)
        })
        .unwrap();
        assert!(target.is_dir());
        assert_eq!(gate2.interrupt(), Interrupt::AfterCommitPoint);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_durable_commit_syncs_the_staging_and_renames_it() {
        let d = tmp("durable");
        let target = d.join("out");
        let mut claim = OutputClaim::claim(&target).unwrap();
        claim.durable(true);
        let staging = claim.staging("partial");
        std::fs::create_dir_all(staging.join("iter")).unwrap();
        std::fs::write(staging.join("iter/a"), "x").unwrap();
        std::fs::write(staging.join("b"), "y").unwrap();
        sync_tree(&staging).unwrap();
        claim.commit(&staging, false).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("iter/a")).unwrap(), "x");
        assert!(!staging.exists());
        // A single-file output syncs as well.
        let file = d.join("one.bin");
        let mut claim = OutputClaim::claim(&file).unwrap();
        claim.durable(true);
        let staging = claim.staging("partial");
        std::fs::write(&staging, "z").unwrap();
        claim.commit(&staging, false).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "z");
        drop(claim);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn one_claim_per_output() {
        let d = tmp("claim");
        let target = d.join("sub/out");
        let mut first = OutputClaim::claim(&target).unwrap();
        let lock = lock_path(&target);
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap().trim(),
            std::process::id().to_string()
        );
        let e = OutputClaim::claim(&target).unwrap_err().to_string();
        assert!(e.contains("output busy"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains(&target.display().to_string()), "{e}");
        // Another output in the same folder is not affected.
        drop(OutputClaim::claim(&d.join("sub/out2")).unwrap());
        let staging = first.staging("partial");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("a"), "x").unwrap();
        first.commit(&staging, false).unwrap();
        assert!(target.join("a").is_file());
        drop(first);
        assert!(!lock.exists(), "the lock file goes with the claim");
        // Under a new claim, an output that appeared meanwhile is refused at commit.
        let mut again = OutputClaim::claim(&target).unwrap();
        let staging = again.staging("partial");
        std::fs::create_dir(&staging).unwrap();
        let e = again.commit(&staging, false).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        drop(again);
        assert!(
            !staging.exists(),
            "an uncommitted claim removes its staging"
        );
        assert_eq!(
            std::fs::read_dir(d.join("sub")).unwrap().count(),
            1,
            "only the output is left"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stale_staging_is_cleared() {
        let d = tmp("stale");
        let target = d.join("out");
        let dead = dead_pid();
        let stale = d.join(format!(".out.partial-{dead}"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("big"), "x").unwrap();
        let stale_file = d.join(format!(".out.lengths_partial-{dead}"));
        std::fs::write(&stale_file, "x").unwrap();
        let other = d.join(format!(".out.v2.partial-{dead}"));
        std::fs::create_dir(&other).unwrap();
        // A live pid (this process): kept.
        let live = hidden_sibling(&target, "partial");
        std::fs::create_dir(&live).unwrap();
        let claim = OutputClaim::claim(&target).unwrap();
        assert_eq!(
            claim.cleared().removed,
            vec![stale_file.clone(), stale.clone()]
        );
        assert!(!stale.exists() && !stale_file.exists());
        assert!(live.exists() && other.exists());
        // `clean` refuses what a held lock covers.
        let c = clean(&target).unwrap();
        assert!(c.removed.is_empty() && !c.kept.is_empty(), "{c:?}");
        drop(claim);
        // The folder form cleans every output's stale staging; a live pid's is kept.
        let c = clean(&d).unwrap();
        assert_eq!(c.removed, vec![other.clone()]);
        assert_eq!(c.kept.len(), 1, "{c:?}");
        assert!(live.exists() && !other.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_killed_overwrite_gets_its_old_output_back() {
        let d = tmp("aside");
        let target = d.join("out");
        let dead = dead_pid();
        let aside = d.join(format!(".out.old-{dead}"));
        std::fs::create_dir(&aside).unwrap();
        std::fs::write(aside.join("w"), "old").unwrap();
        let lock = lock_path(&target);
        std::fs::write(&lock, format!("{dead}\n")).unwrap();
        let c = clean(&target).unwrap();
        assert_eq!(c.restored, vec![(aside.clone(), target.clone())]);
        assert_eq!(c.removed, vec![lock.clone()]);
        assert_eq!(std::fs::read_to_string(target.join("w")).unwrap(), "old");
        assert!(!lock.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

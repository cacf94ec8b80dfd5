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
pub fn commit(staging: &Path, target: &Path) -> Result<()> {
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
}

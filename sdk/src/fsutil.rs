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

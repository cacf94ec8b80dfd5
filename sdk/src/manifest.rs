//! Checksum manifests: name, dtype, shape, bytes and the blake3 of each tensor's bytes, written
//! beside an output and checked when it is read back.

use crate::{PluginError, Result, TensorInfo};
use std::collections::BTreeMap;
use std::path::Path;

pub const MANIFEST_FORMAT: &str = "bridgeflow-manifest";
/// The file name writers use for the manifest they put inside their output.
pub const MANIFEST_FILE: &str = "bridgeflow-manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub bytes: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tensors: BTreeMap<String, ManifestEntry>,
}

/// blake3 of a tensor's bytes, hex; large tensors hash on all cores.
pub fn hash_bytes(bytes: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    if bytes.len() >= 1 << 20 {
        h.update_rayon(bytes);
    } else {
        h.update(bytes);
    }
    h.finalize().to_hex().to_string()
}

/// Piecewise hashing, for writers that stream a tensor in chunks.
pub struct Hasher(blake3::Hasher);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(blake3::Hasher::new())
    }
    pub fn update(&mut self, bytes: &[u8]) {
        if bytes.len() >= 1 << 20 {
            self.0.update_rayon(bytes);
        } else {
            self.0.update(bytes);
        }
    }
    /// [`Self::update`] on this thread only (for writers that already keep every core busy,
    /// one thread per file).
    pub fn update_serial(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl Manifest {
    pub fn new() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            tensors: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, info: &TensorInfo, bytes: &[u8]) {
        self.add_hashed(info, bytes.len() as u64, hash_bytes(bytes));
    }

    /// Adds an entry whose hash was computed elsewhere (e.g. piecewise with [`Hasher`]).
    pub fn add_hashed(&mut self, info: &TensorInfo, bytes: u64, blake3_hex: String) {
        self.tensors.insert(
            info.name().to_string(),
            ManifestEntry {
                dtype: info.dtype.name().into(),
                shape: info.shape.to_vec(),
                bytes,
                blake3: blake3_hex,
            },
        );
    }

    /// Checks one tensor against its entry: Ok(()) or a message naming the tensor.
    pub fn check(&self, info: &TensorInfo, bytes: &[u8]) -> std::result::Result<(), String> {
        let name = info.name();
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("tensor '{name}' is not in the manifest"))?;
        if e.dtype != info.dtype.name() || e.shape != info.shape.as_slice() {
            return Err(format!(
                "tensor '{name}': manifest says {} {:?}, stream has {} {}",
                e.dtype,
                e.shape,
                info.dtype,
                info.shape_string()
            ));
        }
        let h = hash_bytes(bytes);
        if h != e.blake3 {
            return Err(format!(
                "tensor '{name}': blake3 {} differs from the manifest's {}",
                &h[..16],
                &e.blake3[..16.min(e.blake3.len())]
            ));
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Manifest> {
        let text =
            std::fs::read_to_string(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| PluginError::format(format!("{}: not a manifest: {e}", path.display())))?;
        if m.format != MANIFEST_FORMAT {
            return Err(PluginError::format(format!(
                "{}: format is '{}', expected '{MANIFEST_FORMAT}'",
                path.display(),
                m.format
            )));
        }
        Ok(m)
    }

    /// Writes the manifest atomically (temporary name, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
        let text = serde_json::to_string_pretty(self).expect("json") + "\n";
        std::fs::write(&tmp, text).map_err(|e| PluginError::io(&tmp, "cannot write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            PluginError::io(path, "cannot write", e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn check_catches_changes() {
        let info = TensorInfo::new("w", DType::U8, &[3]);
        let mut m = Manifest::new();
        m.add(&info, &[1, 2, 3]);
        assert!(m.check(&info, &[1, 2, 3]).is_ok());
        assert!(m.check(&info, &[1, 2, 4]).unwrap_err().contains("blake3"));
        let other = TensorInfo::new("w", DType::I8, &[3]);
        assert!(m
            .check(&other, &[1, 2, 3])
            .unwrap_err()
            .contains("manifest says U8"));
        let dir = std::env::temp_dir().join(format!("bf-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.json");
        m.save(&p).unwrap();
        assert_eq!(Manifest::load(&p).unwrap(), m);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

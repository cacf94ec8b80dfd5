//! `checksum`: passes tensors through unchanged and writes a blake3 manifest when the stream
//! ends (atomically, so a failed run leaves no manifest that looks complete).

use bridgeflow_sdk::manifest::Manifest;
use bridgeflow_sdk::{schemars, serde, Emitter, Item, PluginError, Result, StreamPlan, Transform};
use std::path::PathBuf;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct ChecksumConfig {
    /// Where to write the manifest (JSON).
    pub path: PathBuf,
}

pub struct Checksum {
    path: PathBuf,
    manifest: Manifest,
}

impl Transform for Checksum {
    type Config = ChecksumConfig;
    const DESCRIPTION: &'static str =
        "Passes tensors through and writes their blake3 manifest at the end";

    fn new(c: ChecksumConfig) -> Result<Self> {
        if c.path.as_os_str().is_empty() {
            return Err(PluginError::config("path is empty"));
        }
        Ok(Checksum {
            path: c.path,
            manifest: Manifest::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        Ok(inputs[0].clone())
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        self.manifest.add(&t.info, t.bytes());
        out.tensor(t)
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| PluginError::io(parent, "cannot create", e))?;
        }
        self.manifest.save(&self.path)
    }
}

//! Which files make up a checkpoint, and the files that travel with one.

use bridgeflow_sdk::{PluginError, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// Files that belong beside HF weights: model config and tokenizer assets.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
];

/// What to read: files in order, and for an index, which tensors each file must provide.
pub struct Layout {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    /// From the index: file name → tensor names. None when there is no index.
    pub index: Option<BTreeMap<String, BTreeSet<String>>>,
}

pub fn resolve(path: &Path) -> Result<Layout> {
    if path.is_file() {
        return Ok(Layout {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            files: vec![path.to_path_buf()],
            index: None,
        });
    }
    if !path.is_dir() {
        return Err(PluginError::io(
            path,
            "cannot read",
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let index_path = path.join(INDEX_NAME);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| PluginError::io(&index_path, "cannot read", e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            PluginError::format(format!("{}: invalid JSON: {e}", index_path.display()))
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                PluginError::format(format!(
                    "{}: no \"weight_map\" object",
                    index_path.display()
                ))
            })?;
        let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                PluginError::format(format!(
                    "{}: weight_map[\"{tensor}\"] is not a file name",
                    index_path.display()
                ))
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(PluginError::format(format!(
                    "{}: weight_map[\"{tensor}\"] = \"{file}\" leaves the checkpoint folder",
                    index_path.display()
                )));
            }
            by_file
                .entry(file.to_string())
                .or_default()
                .insert(tensor.clone());
        }
        let files = by_file.keys().map(|f| path.join(f)).collect();
        return Ok(Layout {
            dir: path.to_path_buf(),
            files,
            index: Some(by_file),
        });
    }
    let single = path.join(SINGLE_NAME);
    if single.is_file() {
        return Ok(Layout {
            dir: path.to_path_buf(),
            files: vec![single],
            index: None,
        });
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| PluginError::io(path, "cannot list", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PluginError::format(format!(
            "{}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files",
            path.display()
        )));
    }
    Ok(Layout {
        dir: path.to_path_buf(),
        files,
        index: None,
    })
}

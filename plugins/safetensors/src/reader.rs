//! The reader: memory-maps each file and hands out views of it as tensor buffers.

use crate::files::{self, Layout};
use crate::header::{self, Entry};
use bridgeflow_sdk::{
    schemars, serde, Buffer, BufferOwner, Emitter, InputMap, MapView, PluginError, Result, Source,
    StreamPlan, Tensor,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct ReaderConfig {
    /// A `.safetensors` file, or an HF model folder (with `model.safetensors.index.json`,
    /// `model.safetensors`, or several `*.safetensors`).
    pub path: PathBuf,
    /// Check every tensor against the `bridgeflow-manifest.json` in the folder (blake3).
    #[serde(default)]
    pub verify: bool,
}

pub struct SafetensorsReader {
    path: PathBuf,
    verify: bool,
    manifest: Option<bridgeflow_sdk::manifest::Manifest>,
    maps: Vec<Arc<InputMap>>,
    /// (file index, entry) in emission order: file by file, by offset, so reads are sequential.
    entries: Vec<(usize, Entry)>,
    /// Per-rank files: names carry their file ([`bridgeflow_sdk::attrs::FILES_BY_PREFIX`]).
    by_prefix: bool,
}

/// `rank3.safetensors` (TensorRT-LLM) or `model-rank-1-part-0.safetensors` /
/// `model-pp-0-tp-1-part-0.safetensors` (vLLM sharded_state).
fn is_rank_file(p: &Path) -> bool {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    let Some(stem) = name.strip_suffix(".safetensors") else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(r) = stem.strip_prefix("rank") {
        return digits(r);
    }
    let parts: Vec<&str> = stem.split('-').collect();
    match parts.as_slice() {
        ["model", "rank", r, "part", p] => digits(r) && digits(p),
        ["model", "pp", a, "tp", b, "part", p] => digits(a) && digits(b) && digits(p),
        _ => false,
    }
}

impl SafetensorsReader {
    fn open(&mut self) -> Result<Layout> {
        let layout = files::resolve(&self.path)?;
        self.maps.clear();
        self.entries.clear();
        for (i, f) in layout.files.iter().enumerate() {
            // Guarded: a file truncated or changed underneath gives an error naming it (see
            // bridgeflow_sdk::inputs), not SIGBUS.
            let map = InputMap::open(f)?;
            map.advise(memmap2::Advice::Sequential);
            let header = header::parse(f, &map).map_err(|e| map.explain(e))?;
            let mut names: BTreeSet<String> = BTreeSet::new();
            let wanted = layout
                .index
                .as_ref()
                .and_then(|idx| idx.get(f.file_name().unwrap().to_string_lossy().as_ref()));
            for e in header.entries {
                names.insert(e.info.name().to_string());
                if wanted.is_none_or(|w| w.contains(e.info.name())) {
                    self.entries.push((i, e));
                }
            }
            if let Some(w) = wanted {
                if let Some(missing) = w.iter().find(|n| !names.contains(*n)) {
                    return Err(PluginError::format(format!(
                        "{}: the index maps tensor '{missing}' to this file, but the file has no such tensor",
                        f.display()
                    )));
                }
            }
            self.maps.push(Arc::new(map));
        }
        self.by_prefix = layout.index.is_none()
            && layout.files.len() > 1
            && layout.files.iter().all(|f| is_rank_file(f));
        if self.by_prefix {
            // An engine's per-rank files (TensorRT-LLM, vLLM sharded_state) hold the same names:
            // each tensor goes by `FILE/NAME`, as the writer lays such a stream out again.
            for (i, e) in &mut self.entries {
                let file = layout.files[*i]
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy();
                e.info = e
                    .info
                    .clone()
                    .with_name(format!("{file}/{}", e.info.name()));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, e) in &self.entries {
            if !seen.insert(e.info.name().to_string()) {
                return Err(PluginError::format(format!(
                    "{}: tensor '{}' appears in more than one file",
                    layout.files[*i].display(),
                    e.info.name()
                )));
            }
        }
        Ok(layout)
    }
}

impl Source for SafetensorsReader {
    type Config = ReaderConfig;
    const DESCRIPTION: &'static str =
        "Reads safetensors files or an HF model folder; zero-copy views of memory maps";
    const ENDPOINTS: &'static [bridgeflow_sdk::Endpoint] = &[bridgeflow_sdk::Endpoint::new(
        "hf",
        "hf",
        "a Hugging Face model folder (config.json + safetensors)",
    )];

    fn new(config: ReaderConfig) -> Result<Self> {
        Ok(SafetensorsReader {
            path: config.path,
            verify: config.verify,
            manifest: None,
            maps: Vec::new(),
            entries: Vec::new(),
            by_prefix: false,
        })
    }

    fn plan(&mut self) -> Result<StreamPlan> {
        let layout = self.open()?;
        if self.verify {
            let m = layout.dir.join(bridgeflow_sdk::manifest::MANIFEST_FILE);
            self.manifest = Some(bridgeflow_sdk::manifest::Manifest::load(&m)?);
        }
        let mut plan = StreamPlan::new(self.entries.iter().map(|(_, e)| e.info.clone()).collect());
        plan.set(bridgeflow_sdk::attrs::FORMAT, "safetensors");
        plan.set(bridgeflow_sdk::attrs::SOURCE_DIR, layout.dir.clone());
        if self.by_prefix {
            plan.set(bridgeflow_sdk::attrs::FILES_BY_PREFIX, true);
        }
        Ok(plan)
    }

    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        if self.maps.is_empty() && self.entries.is_empty() {
            self.open()?;
        }
        for (i, e) in std::mem::take(&mut self.entries) {
            // Still the file that was planned (checked again before any commit).
            self.maps[i].check()?;
            // Its pages are released as consumers finish with them (bounded RSS).
            let owner = MapView {
                map: self.maps[i].clone(),
                range: e.range.clone(),
            };
            if let Some(m) = &self.manifest {
                m.check(&e.info, owner.bytes()).map_err(|err| {
                    owner.map.explain(PluginError::mismatch(format!(
                        "{}: {err}",
                        self.path.display()
                    )))
                })?;
            }
            let tensor = Tensor::new(e.info, Buffer::from_owner(owner))?;
            out.tensor(tensor)?;
        }
        self.maps.clear();
        Ok(())
    }

    /// `quantization_config.quant_method` of the folder's `config.json`. A missing config is
    /// no answer (the plan names it where it matters); one that is not JSON is an error.
    fn quant_method(path: &Path) -> Result<Option<String>> {
        let cfg = path.join("config.json");
        let Ok(text) = std::fs::read_to_string(&cfg) else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| PluginError::format(format!("{}: {e}", cfg.display())))?;
        let Some(q) = json.get("quantization_config") else {
            return Ok(None);
        };
        match q.get("quant_method").and_then(|m| m.as_str()) {
            Some(m) => Ok(Some(m.to_string())),
            None => Err(PluginError::format(format!(
                "{}: quantization_config has no quant_method string",
                cfg.display()
            ))),
        }
    }

    fn probe(path: &Path) -> u32 {
        if path.is_file() {
            return if path.extension().is_some_and(|x| x == "safetensors") {
                100
            } else {
                0
            };
        }
        if path.join(files::INDEX_NAME).is_file() || path.join(files::SINGLE_NAME).is_file() {
            return 100;
        }
        if path.join("rank0.safetensors").is_file()
            || path.join("model-rank-0-part-0.safetensors").is_file()
        {
            return 100;
        }
        match std::fs::read_dir(path) {
            Ok(rd) => {
                let any = rd
                    .filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
                if any {
                    50
                } else {
                    0
                }
            }
            Err(_) => 0,
        }
    }
}

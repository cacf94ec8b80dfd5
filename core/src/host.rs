//! Plugin discovery and loading.
//!
//! Every dynamic library on the search path is opened with libloading and asked for its plain-C
//! [`AbiStamp`] first; a library without one is not a plugin, and one with another ABI version
//! is refused with both SDK versions named, before any ABI-sensitive type is touched. Only then
//! is the abi_stable root module initialised, which checks type layouts too.
//!
//! Each library is loaded through `lib_header_from_path(..).init_root_module()`, never
//! `RootModule::load_from_*`, which caches one module per root-module type and would silently
//! hand back the first plugin for every later one. Libraries are never unloaded.

use bridgeflow_sdk::plugin::{AbiStamp, ABI_MAGIC, ABI_SYMBOL};
use bridgeflow_sdk::{
    EndpointDecl, PluginDescriptor, PluginError, PluginLibRef, StageBox, StageDescriptor,
    StageKind, TranslationDecl, ABI_VERSION, SDK_VERSION,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tracing::{debug, warn};

/// A plugin library that loaded.
pub struct LoadedLibrary {
    pub path: PathBuf,
    module: PluginLibRef,
}

/// A library that looked like a plugin but was refused.
#[derive(Debug, Clone)]
pub struct RefusedLibrary {
    pub path: PathBuf,
    pub reason: String,
}

/// One plugin (a library may hold several).
#[derive(Clone)]
pub struct Plugin {
    pub descriptor: PluginDescriptor,
    pub library: usize,
}

impl Plugin {
    pub fn name(&self) -> &str {
        self.descriptor.name.as_str()
    }
    pub fn stage(&self, kind: StageKind) -> Option<&StageDescriptor> {
        self.descriptor.stages.iter().find(|s| s.kind == kind)
    }
    pub fn kinds(&self) -> Vec<StageKind> {
        self.descriptor.stages.iter().map(|s| s.kind).collect()
    }
}

/// All plugins found on the search path.
#[derive(Default)]
pub struct PluginHost {
    pub libraries: Vec<LoadedLibrary>,
    pub plugins: Vec<Plugin>,
    pub refused: Vec<RefusedLibrary>,
    pub search_path: Vec<PathBuf>,
}

const DYLIB_EXT: &str = std::env::consts::DLL_EXTENSION;

/// The default search path: `BRIDGEFLOW_PLUGIN_PATH`, then `plugins/` beside the binary, the
/// binary's own folder (a cargo target folder), then the workspace's `target/{release,debug}`.
pub fn default_search_path(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = extra.to_vec();
    if let Some(p) = std::env::var_os("BRIDGEFLOW_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.join("plugins"));
            // Test binaries live in target/<profile>/deps.
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(up) = dir.parent() {
                    dirs.push(up.to_path_buf());
                }
            } else {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    if let Some(root) = workspace_root() {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        dirs.push(target.join("release"));
        dirs.push(target.join("debug"));
    }
    dirs
}

/// The bridgeflow workspace containing the current directory, if any.
fn workspace_root() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .find(|d| d.join("Cargo.toml").is_file() && d.join("sdk").join("Cargo.toml").is_file())
        .map(Path::to_path_buf)
}

impl PluginHost {
    /// Scans the search path and loads every plugin library found.
    pub fn discover(search_path: Vec<PathBuf>) -> PluginHost {
        let mut host = PluginHost {
            search_path: search_path.clone(),
            ..Default::default()
        };
        let mut seen = BTreeSet::new();
        for dir in &search_path {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == DYLIB_EXT))
                .collect();
            files.sort();
            for f in files {
                let canon = f.canonicalize().unwrap_or(f.clone());
                // The same library name in two folders (release and debug): the first wins.
                let key = canon.file_name().map(|n| n.to_os_string());
                if !seen.insert(key) {
                    continue;
                }
                host.load(&canon);
            }
        }
        host
    }

    /// Loads one library (public so tests and `--plugin` can load a file directly).
    pub fn load(&mut self, path: &Path) {
        match load_library(path) {
            Ok(None) => debug!(path = %path.display(), "not a bridgeflow plugin"),
            Ok(Some((module, descriptors))) => {
                let library = self.libraries.len();
                self.libraries.push(LoadedLibrary {
                    path: path.to_path_buf(),
                    module,
                });
                for descriptor in descriptors {
                    if let Some(existing) = self.plugin(descriptor.name.as_str()) {
                        warn!(
                            plugin = %descriptor.name,
                            kept = %self.libraries[existing.library].path.display(),
                            ignored = %path.display(),
                            "plugin name defined twice; keeping the first"
                        );
                        continue;
                    }
                    self.plugins.push(Plugin {
                        descriptor,
                        library,
                    });
                }
            }
            Err(reason) => {
                warn!(path = %path.display(), "{reason}");
                self.refused.push(RefusedLibrary {
                    path: path.to_path_buf(),
                    reason,
                })
            }
        }
    }

    pub fn plugin(&self, name: &str) -> Option<&Plugin> {
        self.plugins.iter().find(|p| p.name() == name)
    }

    pub fn library_of(&self, plugin: &Plugin) -> &LoadedLibrary {
        &self.libraries[plugin.library]
    }

    /// Creates a stage; config errors come back as `Config` errors from the plugin.
    pub fn create(
        &self,
        plugin: &Plugin,
        kind: StageKind,
        config_json: &str,
    ) -> Result<StageBox, PluginError> {
        let module = self.libraries[plugin.library].module;
        let create = module.create();
        create(plugin.name().into(), kind, config_json.into()).into_result()
    }

    /// The reader plugin most confident it can read `path`.
    pub fn probe_reader(&self, path: &Path) -> Option<&Plugin> {
        let p = path.to_string_lossy();
        self.plugins
            .iter()
            .filter(|pl| pl.stage(StageKind::Reader).is_some())
            .map(|pl| {
                let probe = self.libraries[pl.library].module.probe();
                (probe(pl.name().into(), p.as_ref().into()), pl)
            })
            .filter(|(score, _)| *score > 0)
            .max_by_key(|(score, _)| *score)
            .map(|(_, pl)| pl)
    }

    /// The plugin whose `kind` stage declares `scheme` (or an alias of it) as an endpoint, with
    /// that declaration.
    pub fn endpoint(&self, kind: StageKind, scheme: &str) -> Option<(&Plugin, &EndpointDecl)> {
        self.plugins.iter().find_map(|pl| {
            let d = pl
                .stage(kind)?
                .endpoints
                .iter()
                .find(|e| e.answers(scheme))?;
            Some((pl, d))
        })
    }

    /// Every scheme `kind` stages serve, sorted (for messages and `--help`).
    pub fn schemes(&self, kind: StageKind) -> Vec<String> {
        let mut all: Vec<String> = self
            .plugins
            .iter()
            .filter_map(|pl| pl.stage(kind))
            .flat_map(|s| s.endpoints.iter().map(|e| e.scheme.to_string()))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// A stage that translates a stream named `from` into names `to`: (plugin, its kind, the
    /// declaration).
    pub fn translator(
        &self,
        from: &str,
        to: &str,
    ) -> Option<(&Plugin, StageKind, &TranslationDecl)> {
        self.plugins.iter().find_map(|pl| {
            pl.descriptor.stages.iter().find_map(|s| {
                let t = s
                    .translations
                    .iter()
                    .find(|t| t.from == from && t.to == to)?;
                Some((pl, s.kind, t))
            })
        })
    }

    /// The transform that dequantizes `quant_method`, and every method some stage takes.
    pub fn dequantizer(&self, quant_method: &str) -> Result<&Plugin, Vec<String>> {
        let takes = |s: &StageDescriptor| s.quant_methods.iter().any(|m| m == quant_method);
        self.plugins
            .iter()
            .find(|pl| pl.descriptor.stages.iter().any(takes))
            .ok_or_else(|| {
                let mut all: Vec<String> = self
                    .plugins
                    .iter()
                    .flat_map(|pl| pl.descriptor.stages.iter())
                    .flat_map(|s| s.quant_methods.iter().map(|m| m.to_string()))
                    .collect();
                all.sort();
                all.dedup();
                all
            })
    }

    /// The quantization method `plugin`'s reader finds at `path` (None: not quantized).
    pub fn quant_method(
        &self,
        plugin: &Plugin,
        path: &Path,
    ) -> Result<Option<String>, PluginError> {
        let probe = self.libraries[plugin.library].module.quant_method();
        let p = path.to_string_lossy();
        let m = probe(plugin.name().into(), p.as_ref().into()).into_result()?;
        Ok((!m.is_empty()).then(|| m.to_string()))
    }

    /// Text listing what was refused, for "unknown plugin" messages.
    pub fn refused_summary(&self) -> String {
        self.refused
            .iter()
            .map(|r| format!("{}: {}", r.path.display(), r.reason))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

type Loaded = (PluginLibRef, Vec<PluginDescriptor>);

fn load_library(path: &Path) -> Result<Option<Loaded>, String> {
    // SAFETY: opening a library runs its initialisers; only files on the plugin search path
    // are opened.
    let lib = match unsafe { libloading::Library::new(path) } {
        Ok(l) => l,
        Err(e) => return Err(format!("cannot open library: {e}")),
    };
    let stamp = {
        let sym: Result<libloading::Symbol<extern "C" fn() -> AbiStamp>, _> =
            unsafe { lib.get(ABI_SYMBOL) };
        match sym {
            Ok(f) => f(),
            Err(_) => return Ok(None),
        }
    };
    if stamp.magic != ABI_MAGIC {
        return Err("exports bridgeflow_plugin_abi with a bad magic number".into());
    }
    if stamp.abi_version != ABI_VERSION {
        return Err(format!(
            "plugin built against bridgeflow-sdk {} (ABI {}), but this bridgeflow uses bridgeflow-sdk {} (ABI {}); rebuild the plugin against bridgeflow-sdk {}",
            stamp.sdk_version_str(),
            stamp.abi_version,
            SDK_VERSION,
            ABI_VERSION,
            SDK_VERSION
        ));
    }
    let header = abi_stable::library::lib_header_from_path(path)
        .map_err(|e| one_line(&format!("not loadable as a bridgeflow plugin: {e}")))?;
    let module = header
        .init_root_module::<PluginLibRef>()
        .map_err(|e| {
            // abi_stable explains a layout mismatch in ~1,200 lines; keep it for debugging.
            debug!(path = %path.display(), "abi_stable: {e}");
            format!(
                "plugin built against bridgeflow-sdk {} has an incompatible type layout for this bridgeflow (bridgeflow-sdk {}); rebuild it (details with RUST_LOG=debug)",
                stamp.sdk_version_str(),
                SDK_VERSION
            )
        })?;
    drop(lib); // abi_stable holds its own handle and never unloads it.
    let descriptors: Vec<PluginDescriptor> = (module.plugins())().into_iter().collect();
    Ok(Some((module, descriptors)))
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}

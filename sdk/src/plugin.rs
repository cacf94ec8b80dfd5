//! Plugin descriptors, the root module a plugin library exports, and the export macro.

use crate::declare::{output_ports, EndpointDecl, OutputPort, TranslationDecl};
use crate::stage::{SinkAdapter, SourceAdapter, TransformAdapter};
use crate::{
    PluginError, PortType, Result, Sink, Source, StageBox, StageFfi_TO, StageKind, Transform,
};
use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString, RVec},
    StableAbi,
};

/// Bumped on any change to the types that cross the boundary. The host refuses plugins built
/// against another value before touching anything else in them.
pub const ABI_VERSION: u32 = 4;
/// The version of this SDK crate, recorded in every plugin built against it.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One stage a plugin offers.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct StageDescriptor {
    pub kind: StageKind,
    pub description: RString,
    /// JSON Schema of the stage's config table.
    pub config_schema: RString,
    pub inputs: RVec<PortType>,
    /// How many of the last `inputs` a pipeline may leave unwired (see
    /// `Transform::OPTIONAL_INPUTS`).
    pub optional_inputs: u32,
    /// Named output ports, in order (one `out` for most stages; none for sinks).
    pub outputs: RVec<OutputPort>,
    /// The stage keeps its inputs alive (see `Transform::RETAINS_INPUTS`).
    pub retains_inputs: bool,
    /// Command-line schemes a reader or writer serves.
    pub endpoints: RVec<EndpointDecl>,
    /// Name worlds a transform translates between.
    pub translations: RVec<TranslationDecl>,
    /// `quant_method`s a transform dequantizes.
    pub quant_methods: RVec<RString>,
}

impl StageDescriptor {
    /// The index of the output port called `name`.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|p| p.name == name)
    }
}

/// What `bridgeflow plugins` lists.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginDescriptor {
    pub name: RString,
    pub version: RString,
    pub description: RString,
    pub abi_version: u32,
    pub sdk_version: RString,
    pub stages: RVec<StageDescriptor>,
}

/// The root module of a plugin library. New entry points go after the last field, so plugins
/// built against an older SDK keep loading (prefix types).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginLibRef)))]
#[sabi(missing_field(panic))]
pub struct PluginLib {
    pub abi_version: u32,
    pub plugins: extern "C" fn() -> RVec<PluginDescriptor>,
    pub create: extern "C" fn(
        plugin: RStr<'_>,
        kind: StageKind,
        config_json: RStr<'_>,
    ) -> RResult<StageBox, PluginError>,
    pub probe: extern "C" fn(plugin: RStr<'_>, path: RStr<'_>) -> u32,
    /// The quantization method of the input at `path` as the plugin's readers see it (empty:
    /// not quantized).
    #[sabi(last_prefix_field)]
    pub quant_method:
        extern "C" fn(plugin: RStr<'_>, path: RStr<'_>) -> RResult<RString, PluginError>,
}

impl RootModule for PluginLibRef {
    declare_root_module_statics! {PluginLibRef}
    const BASE_NAME: &'static str = "bridgeflow_plugin";
    const NAME: &'static str = "bridgeflow_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// A plain C record every plugin exports as `bridgeflow_plugin_abi`, read with nothing but
/// `dlsym` before any ABI-sensitive type is touched, so a plugin from another SDK is refused
/// with both versions named instead of crashing.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AbiStamp {
    pub magic: [u8; 8],
    pub abi_version: u32,
    /// The SDK version, NUL-padded.
    pub sdk_version: [u8; 32],
}

pub const ABI_MAGIC: [u8; 8] = *b"BRFLOWPL";
/// The exported symbol holding the [`AbiStamp`] function.
pub const ABI_SYMBOL: &[u8] = b"bridgeflow_plugin_abi\0";

impl AbiStamp {
    pub const fn new(abi_version: u32, sdk_version: &str) -> AbiStamp {
        let mut v = [0u8; 32];
        let b = sdk_version.as_bytes();
        let mut i = 0;
        while i < b.len() && i < 31 {
            v[i] = b[i];
            i += 1;
        }
        AbiStamp {
            magic: ABI_MAGIC,
            abi_version,
            sdk_version: v,
        }
    }
    pub const fn current() -> AbiStamp {
        AbiStamp::new(ABI_VERSION, SDK_VERSION)
    }
    pub fn sdk_version_str(&self) -> String {
        let end = self.sdk_version.iter().position(|&b| b == 0).unwrap_or(32);
        String::from_utf8_lossy(&self.sdk_version[..end]).into_owned()
    }
}

type Factory = Box<dyn Fn(&str) -> Result<StageBox> + Send + Sync>;
type Probe = fn(&std::path::Path) -> u32;
type QuantProbe = fn(&std::path::Path) -> Result<Option<String>>;

/// One stage in a plugin's registry (built by [`export_plugins!`]).
pub struct StageEntry {
    descriptor: StageDescriptor,
    factory: Factory,
    probe: Option<Probe>,
    quant_method: Option<QuantProbe>,
}

/// A descriptor with nothing declared beyond its ports.
fn plain(kind: StageKind, description: &str, config_schema: RString) -> StageDescriptor {
    StageDescriptor {
        kind,
        description: description.into(),
        config_schema,
        inputs: RVec::new(),
        optional_inputs: 0,
        outputs: RVec::new(),
        retains_inputs: false,
        endpoints: RVec::new(),
        translations: RVec::new(),
        quant_methods: RVec::new(),
    }
}

fn schema_of<C: schemars::JsonSchema>() -> RString {
    let schema = schemars::schema_for!(C);
    RString::from(serde_json::to_string_pretty(&schema).unwrap_or_default())
}

fn parse_config<C: serde::de::DeserializeOwned>(json: &str) -> Result<C> {
    serde_json::from_str(json).map_err(|e| PluginError::config(e.to_string()))
}

impl StageEntry {
    pub fn source<S: Source>(kind: StageKind) -> StageEntry {
        StageEntry {
            descriptor: StageDescriptor {
                outputs: output_ports(S::OUTPUTS, S::OUTPUT),
                endpoints: S::ENDPOINTS.iter().map(EndpointDecl::from).collect(),
                ..plain(kind, S::DESCRIPTION, schema_of::<S::Config>())
            },
            factory: Box::new(|json| {
                let stage = S::new(parse_config(json)?)?;
                Ok(StageFfi_TO::from_value(SourceAdapter(stage), TD_Opaque))
            }),
            probe: Some(S::probe),
            quant_method: Some(S::quant_method),
        }
    }
    pub fn transform<T: Transform>(kind: StageKind) -> StageEntry {
        StageEntry {
            descriptor: StageDescriptor {
                inputs: T::INPUTS.to_vec().into(),
                optional_inputs: T::OPTIONAL_INPUTS as u32,
                outputs: output_ports(T::OUTPUTS, T::OUTPUT),
                retains_inputs: T::RETAINS_INPUTS,
                endpoints: T::ENDPOINTS.iter().map(EndpointDecl::from).collect(),
                translations: T::TRANSLATES.iter().map(TranslationDecl::from).collect(),
                quant_methods: T::QUANT_METHODS.iter().map(|&m| RString::from(m)).collect(),
                ..plain(kind, T::DESCRIPTION, schema_of::<T::Config>())
            },
            factory: Box::new(|json| {
                let stage = T::new(parse_config(json)?)?;
                Ok(StageFfi_TO::from_value(TransformAdapter(stage), TD_Opaque))
            }),
            probe: None,
            quant_method: None,
        }
    }
    pub fn sink<K: Sink>(kind: StageKind) -> StageEntry {
        StageEntry {
            descriptor: StageDescriptor {
                inputs: K::INPUTS.to_vec().into(),
                retains_inputs: K::RETAINS_INPUTS,
                endpoints: K::ENDPOINTS.iter().map(EndpointDecl::from).collect(),
                ..plain(kind, K::DESCRIPTION, schema_of::<K::Config>())
            },
            factory: Box::new(|json| {
                let stage = K::new(parse_config(json)?)?;
                Ok(StageFfi_TO::from_value(SinkAdapter(stage), TD_Opaque))
            }),
            probe: None,
            quant_method: None,
        }
    }
}

/// One plugin in a library's registry.
pub struct PluginEntry {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    pub stages: Vec<StageEntry>,
}

/// Everything a plugin library offers. Built once by the code [`export_plugins!`] generates.
pub struct Registry {
    plugins: Vec<PluginEntry>,
}

impl Registry {
    pub fn new(plugins: Vec<PluginEntry>) -> Registry {
        Registry { plugins }
    }

    pub fn descriptors(&self) -> RVec<PluginDescriptor> {
        self.plugins
            .iter()
            .map(|p| PluginDescriptor {
                name: p.name.into(),
                version: p.version.into(),
                description: p.description.into(),
                abi_version: ABI_VERSION,
                sdk_version: SDK_VERSION.into(),
                stages: p.stages.iter().map(|s| s.descriptor.clone()).collect(),
            })
            .collect()
    }

    fn stage(&self, plugin: &str, kind: StageKind) -> Result<&StageEntry> {
        let p = self
            .plugins
            .iter()
            .find(|p| p.name == plugin)
            .ok_or_else(|| PluginError::config(format!("no plugin '{plugin}' in this library")))?;
        p.stages
            .iter()
            .find(|s| s.descriptor.kind == kind)
            .ok_or_else(|| PluginError::config(format!("plugin '{plugin}' has no {kind} stage")))
    }

    pub fn create(&self, plugin: &str, kind: StageKind, config_json: &str) -> Result<StageBox> {
        (self.stage(plugin, kind)?.factory)(config_json)
    }

    pub fn probe(&self, plugin: &str, path: &str) -> u32 {
        self.plugins
            .iter()
            .filter(|p| p.name == plugin)
            .flat_map(|p| p.stages.iter())
            .filter_map(|s| s.probe)
            .map(|f| f(std::path::Path::new(path)))
            .max()
            .unwrap_or(0)
    }

    /// The first quantization method a reader of `plugin` finds at `path`.
    pub fn quant_method(&self, plugin: &str, path: &str) -> Result<Option<String>> {
        for probe in self
            .plugins
            .iter()
            .filter(|p| p.name == plugin)
            .flat_map(|p| p.stages.iter())
            .filter_map(|s| s.quant_method)
        {
            if let Some(m) = probe(std::path::Path::new(path))? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    pub fn quant_method_ffi(
        &self,
        plugin: RStr<'_>,
        path: RStr<'_>,
    ) -> RResult<RString, PluginError> {
        crate::stage::guard(|| {
            self.quant_method(plugin.as_str(), path.as_str())
                .map(|m| RString::from(m.unwrap_or_default()))
        })
    }

    /// The FFI entry point behind [`PluginLib::create`].
    pub fn create_ffi(
        &self,
        plugin: RStr<'_>,
        kind: StageKind,
        config: RStr<'_>,
    ) -> RResult<StageBox, PluginError> {
        crate::stage::guard(|| self.create(plugin.as_str(), kind, config.as_str()))
    }

    pub fn probe_ffi(&self, plugin: RStr<'_>, path: RStr<'_>) -> u32 {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.probe(plugin.as_str(), path.as_str())
        }))
        .unwrap_or(0)
    }
}

/// Builds the root module value (used by [`export_plugins!`]).
#[doc(hidden)]
pub fn __root_module(
    plugins: extern "C" fn() -> RVec<PluginDescriptor>,
    create: extern "C" fn(RStr<'_>, StageKind, RStr<'_>) -> RResult<StageBox, PluginError>,
    probe: extern "C" fn(RStr<'_>, RStr<'_>) -> u32,
    quant_method: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<RString, PluginError>,
) -> PluginLibRef {
    PluginLib {
        abi_version: ABI_VERSION,
        plugins,
        create,
        probe,
        quant_method,
    }
    .leak_into_prefix()
}

/// The name abi_stable looks up; `export_plugins!` must spell it as a literal (checked by a
/// test against `abi_stable::library::ROOT_MODULE_LOADER_NAME`).
#[doc(hidden)]
pub const __ROOT_MODULE_LOADER_NAME: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Exports one or more plugins from a `cdylib`. The one line a plugin author writes:
///
/// ```ignore
/// bridgeflow_sdk::export_plugins! {
///     "scale" {
///         version: env!("CARGO_PKG_VERSION"),
///         description: "Multiplies float tensors by a constant",
///         transform: Transform(ScaleStage),
///     }
/// }
/// ```
///
/// Each stage line is `<kind>: <Role>(<Type>)` where kind is one of reader, writer, mapper,
/// sharder, transform, trainer, exporter and Role is `Source`, `Transform` or `Sink` — the
/// trait the type implements.
#[macro_export]
macro_rules! export_plugins {
    ($( $name:literal {
        version: $version:expr,
        description: $desc:expr,
        $( $kind:ident : $role:ident ( $ty:ty ) ),+ $(,)?
    } )+) => {
        #[doc(hidden)]
        fn __bridgeflow_registry() -> &'static $crate::plugin::Registry {
            static REGISTRY: ::std::sync::OnceLock<$crate::plugin::Registry> =
                ::std::sync::OnceLock::new();
            REGISTRY.get_or_init(|| {
                $crate::plugin::Registry::new(vec![$(
                    $crate::plugin::PluginEntry {
                        name: $name,
                        version: $version,
                        description: $desc,
                        stages: vec![$(
                            $crate::__stage_entry!($role, $ty, $kind)
                        ),+],
                    }
                ),+])
            })
        }

        #[doc(hidden)]
        extern "C" fn __bridgeflow_plugins()
            -> $crate::reexports::RVec<$crate::plugin::PluginDescriptor> {
            __bridgeflow_registry().descriptors()
        }
        #[doc(hidden)]
        extern "C" fn __bridgeflow_create(
            plugin: $crate::reexports::RStr<'_>,
            kind: $crate::StageKind,
            config: $crate::reexports::RStr<'_>,
        ) -> $crate::reexports::RResult<$crate::StageBox, $crate::PluginError> {
            __bridgeflow_registry().create_ffi(plugin, kind, config)
        }
        #[doc(hidden)]
        extern "C" fn __bridgeflow_probe(
            plugin: $crate::reexports::RStr<'_>,
            path: $crate::reexports::RStr<'_>,
        ) -> u32 {
            __bridgeflow_registry().probe_ffi(plugin, path)
        }
        #[doc(hidden)]
        extern "C" fn __bridgeflow_quant_method(
            plugin: $crate::reexports::RStr<'_>,
            path: $crate::reexports::RStr<'_>,
        ) -> $crate::reexports::RResult<$crate::reexports::RString, $crate::PluginError> {
            __bridgeflow_registry().quant_method_ffi(plugin, path)
        }
        #[doc(hidden)]
        fn __bridgeflow_root() -> $crate::plugin::PluginLibRef {
            $crate::plugin::__root_module(
                __bridgeflow_plugins,
                __bridgeflow_create,
                __bridgeflow_probe,
                __bridgeflow_quant_method,
            )
        }

        /// Read by the host with plain `dlsym` before anything else.
        #[no_mangle]
        pub extern "C" fn bridgeflow_plugin_abi() -> $crate::plugin::AbiStamp {
            $crate::plugin::AbiStamp::current()
        }

        /// What `#[abi_stable::export_root_module]` generates, spelled out so that plugin
        /// crates need no direct dependency on abi_stable.
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __BRIDGEFLOW_LIB_HEADER: $crate::reexports::LibHeader = {
            extern "C" fn erased() -> $crate::reexports::RootModuleResult {
                $crate::reexports::__call_root_module_loader(__bridgeflow_root)
            }
            unsafe {
                $crate::reexports::LibHeader::from_constructor::<$crate::plugin::PluginLibRef>(
                    erased,
                    $crate::reexports::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __stage_entry {
    (Source, $ty:ty, $kind:ident) => {
        $crate::plugin::StageEntry::source::<$ty>($crate::__kind!($kind))
    };
    (Transform, $ty:ty, $kind:ident) => {
        $crate::plugin::StageEntry::transform::<$ty>($crate::__kind!($kind))
    };
    (Sink, $ty:ty, $kind:ident) => {
        $crate::plugin::StageEntry::sink::<$ty>($crate::__kind!($kind))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __kind {
    (reader) => {
        $crate::StageKind::Reader
    };
    (writer) => {
        $crate::StageKind::Writer
    };
    (mapper) => {
        $crate::StageKind::Mapper
    };
    (sharder) => {
        $crate::StageKind::Sharder
    };
    (transform) => {
        $crate::StageKind::Transform
    };
    (trainer) => {
        $crate::StageKind::Trainer
    };
    (exporter) => {
        $crate::StageKind::Exporter
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_name_matches_abi_stable() {
        assert_eq!(
            __ROOT_MODULE_LOADER_NAME,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }

    #[test]
    fn stamp_records_versions() {
        let s = AbiStamp::current();
        assert_eq!(s.magic, ABI_MAGIC);
        assert_eq!(s.abi_version, ABI_VERSION);
        assert_eq!(s.sdk_version_str(), SDK_VERSION);
    }
}

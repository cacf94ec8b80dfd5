//! # bridgeflow-sdk
//!
//! The only crate a bridgeflow plugin depends on. It defines what crosses the boundary between
//! the host runtime and a plugin loaded at run time, with a stable ABI (abi_stable):
//!
//! - [`Tensor`]: name, [`DType`], shape, optional [`ShardInfo`], and a reference-counted
//!   [`Buffer`] whose release callback belongs to the library that owns the memory, so memory
//!   maps and plugin allocations cross without a copy;
//! - record batches through the Arrow C Data Interface ([`RecordBatchFfi`]);
//! - stages: implement [`Source`], [`Transform`] or [`Sink`], then export with
//!   [`export_plugins!`];
//! - errors with a kind and a message ([`PluginError`]).

// sabi_trait expands to impls of foreign traits inside a const block.
#![allow(non_local_definitions)]

pub mod attrs;
pub mod buffer;
pub mod declare;
pub mod dtype;
pub mod error;
pub mod fsutil;
pub mod inputs;
pub mod manifest;
pub mod numeric;
pub mod outfile;
pub mod plugin;
pub mod records;
pub mod stage;
pub mod tensor;
pub mod units;

pub use attrs::{Attr, AttrValue};
pub use buffer::{
    release_pages, Buffer, BufferOwner, BufferPool, BufferVTable, MapView, MappedBytes, PooledVec,
};
pub use declare::{
    Endpoint, EndpointDecl, OutputPort, Port, Translation, TranslationDecl, DEFAULT_PORT,
};
pub use dtype::DType;
pub use error::{ErrorKind, PluginError, Result};
pub use inputs::{inputs_intact, InputMap};
pub use plugin::{
    AbiStamp, PluginDescriptor, PluginLib, PluginLibRef, StageDescriptor, ABI_VERSION, SDK_VERSION,
};
pub use records::RecordBatchFfi;
pub use stage::{
    Emitter, Finished, Item, PortType, Sink, Source, StageBox, StageFfi, StageFfi_TO, StageKind,
    StreamPlan, Transform,
};
pub use tensor::{ShardInfo, Tensor, TensorInfo};

/// Crates plugin authors get through the SDK, so their versions always match the host's.
pub use arrow_array;
pub use arrow_schema;
pub use half;
pub use schemars;
pub use serde;
pub use serde_json;

/// `ROption` as it appears in [`TensorInfo::shard`].
pub mod abi_option {
    pub use abi_stable::std_types::ROption::{self, RNone, RSome};
}

#[doc(hidden)]
pub mod reexports {
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
    };
    pub use abi_stable::std_types::{RResult, RStr, RString, RVec};
}

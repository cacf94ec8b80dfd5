//! # bridgeflow-core
//!
//! The runtime behind the `bridgeflow` command, in the order a run goes through it:
//! [`pipeline`] (file → spec, variables, overrides) → [`host`] (plugin discovery and loading) →
//! [`graph`] (validation, stage objects, topological order) → [`runtime`] (streaming execution
//! under a [`budget`]).

pub mod budget;
pub mod convert;
pub mod error;
pub mod graph;
pub mod host;
pub mod jobs;
pub mod pipeline;
pub mod progress;
pub mod runtime;

pub use error::{LocatedError, RunError, ValidationErrors};
pub use graph::Graph;
pub use host::PluginHost;
pub use pipeline::{Override, PipelineSpec};
pub use runtime::{RunOptions, RunReport};

use std::path::Path;

/// Loads, validates and builds a pipeline file against the plugins in `host`.
pub fn load_pipeline(
    path: &Path,
    overrides: &[Override],
    host: &PluginHost,
) -> Result<Graph, ValidationErrors> {
    let spec = pipeline::load(path, overrides)?;
    graph::build(spec, host)
}

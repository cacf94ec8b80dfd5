//! Errors of the host: located validation errors and stage failures.

use bridgeflow_sdk::PluginError;
use std::fmt;
use std::path::PathBuf;

/// A problem found in a pipeline file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub stage: Option<String>,
    pub message: String,
}

impl LocatedError {
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        LocatedError {
            file: file.into(),
            line: None,
            stage: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for LocatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(stage) = &self.stage {
            write!(f, ": stage '{stage}'")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while validating a pipeline (all are reported, not just the first).
#[derive(Debug, Clone)]
pub struct ValidationErrors(pub Vec<LocatedError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "pipeline is invalid ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for (i, e) in self.0.iter().enumerate() {
            if i + 1 < n {
                writeln!(f, "  {e}")?;
            } else {
                write!(f, "  {e}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// A run that failed: which stage, and its error.
#[derive(Debug, Clone)]
pub struct RunError {
    pub stage: String,
    pub plugin: String,
    pub kind: String,
    pub error: PluginError,
}

impl RunError {
    /// An error of the run as a whole (interrupt, a panicked task), not of one stage.
    pub fn runtime(error: PluginError) -> Self {
        RunError {
            stage: "-".into(),
            plugin: "-".into(),
            kind: "-".into(),
            error,
        }
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stage '{}' ({} {}) failed: {}",
            self.stage, self.plugin, self.kind, self.error
        )
    }
}

impl std::error::Error for RunError {}

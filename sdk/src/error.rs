//! Errors that cross the plugin boundary: a kind and a message.

use abi_stable::{std_types::RString, StableAbi};
use std::fmt;

/// What went wrong, coarsely: lets the host decide how to report it (a config error is the
/// user's to fix; `Cancelled` is not an error of the stage that returns it).
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The stage's configuration is invalid.
    Config,
    /// Reading or writing a file failed (including a full disk).
    Io,
    /// Input bytes do not follow their format (corrupt, truncated, bad header).
    Format,
    /// Shapes, dtypes or names disagree with what the stage expects.
    Shape,
    /// A valid input the stage does not handle (architecture, dtype, feature).
    Unsupported,
    /// The run was cancelled because another stage failed; not this stage's fault.
    Cancelled,
    /// Two streams or a stream and a manifest disagree.
    Mismatch,
    /// A bug or an invariant broken inside a plugin.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Config => "config",
            ErrorKind::Io => "io",
            ErrorKind::Format => "format",
            ErrorKind::Shape => "shape",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::Internal => "internal",
        };
        f.write_str(s)
    }
}

/// An error as it crosses the ABI. Messages should name the file and tensor involved.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        PluginError {
            kind,
            message: RString::from(message.to_string()),
        }
    }
    pub fn config(m: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Config, m)
    }
    pub fn format(m: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Format, m)
    }
    pub fn shape(m: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Shape, m)
    }
    pub fn unsupported(m: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Unsupported, m)
    }
    pub fn mismatch(m: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Mismatch, m)
    }
    pub fn internal(m: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, m)
    }
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "run cancelled")
    }
    /// An I/O error with the path it happened on. `EFAULT` ("Bad address") is what writing
    /// out of a memory map of a truncated input gives: it is reported against that input
    /// when one is found (see [`crate::inputs`]).
    pub fn io(path: impl AsRef<std::path::Path>, what: &str, e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::EFAULT) {
            if let Err(input) = crate::inputs::inputs_intact() {
                return Self::new(
                    ErrorKind::Io,
                    format!(
                        "{} ({what} {}: {e})",
                        input.message,
                        path.as_ref().display()
                    ),
                );
            }
        }
        let hint = if e.raw_os_error() == Some(28) {
            " (disk full)"
        } else {
            ""
        };
        Self::new(
            ErrorKind::Io,
            format!("{what} {}: {e}{hint}", path.as_ref().display()),
        )
    }
    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }
    /// Prefixes the message with context, keeping the kind.
    pub fn context(self, ctx: impl fmt::Display) -> Self {
        PluginError::new(self.kind, format!("{ctx}: {}", self.message))
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind, self.message)
    }
}

impl std::error::Error for PluginError {}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;

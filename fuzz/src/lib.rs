//! bridgeflow-fuzz: a deterministic mutation fuzzer (stable toolchain, no cargo-fuzz) for every
//! parser of untrusted input in the converters. See `fuzz/README.md`.
//!
//! - [`mutate`]: the mutation engine (splitmix64-seeded byte and text mutations);
//! - [`targets`]: one function per parser, and its seeds;
//! - [`harness`]: the loop (catch_unwind, timing, findings, minimisation, crash files);
//! - [`guard`]: the allocation guard, crash-saving signal handlers and the hang watchdog.

pub mod guard;
pub mod harness;
pub mod hostile;
pub mod mutate;
pub mod targets;

/// Every binary and test of this crate runs under the allocation guard.
#[global_allocator]
static GUARD: guard::Guard = guard::Guard;

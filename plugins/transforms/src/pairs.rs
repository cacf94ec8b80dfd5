//! Tensors that travel in pairs — a quantized weight and its scales — matched by a key. In HF
//! checkpoints the two sit side by side in one shard, so whichever comes first waits only until
//! the other arrives.

use bridgeflow_sdk::{PluginError, Result, Tensor};
use std::collections::HashMap;

#[derive(Default)]
pub struct Pairs {
    /// Whichever of a pair came first, by key, and whether it is the pair's first member.
    waiting: HashMap<String, (Tensor, bool)>,
}

impl Pairs {
    /// Offers `t`, the `first` (or second) member of the pair `key`; returns (first, second) once
    /// both have arrived.
    pub fn offer(&mut self, key: &str, t: Tensor, first: bool) -> Option<(Tensor, Tensor)> {
        match self.waiting.remove(key) {
            Some((other, _)) if first => Some((t, other)),
            Some((other, _)) => Some((other, t)),
            None => {
                self.waiting.insert(key.to_string(), (t, first));
                None
            }
        }
    }

    /// An error naming a pair of which only one member arrived.
    pub fn finish(&self, what: &str) -> Result<()> {
        match self.waiting.values().next() {
            Some((t, _)) => Err(PluginError::shape(format!(
                "'{}' arrived but its {what} did not",
                t.name()
            ))),
            None => Ok(()),
        }
    }
}

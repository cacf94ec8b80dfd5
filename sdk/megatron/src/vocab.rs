//! Vocabulary padding: Megatron pads the embedding and output layer rows to a multiple of
//! `make_vocab_size_divisible_by` × the tensor-parallel size, so that every TP rank holds an
//! equal share.

use bridgeflow_sdk::{PluginError, Result};

/// Megatron's default `make_vocab_size_divisible_by`.
pub const DEFAULT_DIVISIBLE_BY: u64 = 128;

/// The largest `make_vocab_size_divisible_by` accepted.
pub const MAX_DIVISIBLE_BY: u64 = 1 << 20;

/// `n` rounded up to a multiple of `m` (`m` = 0: `n`).
pub fn round_up(n: u64, m: u64) -> u64 {
    if m == 0 {
        n
    } else {
        n.div_ceil(m) * m
    }
}

/// The padded vocabulary of `vocab` tokens for `divisible_by` and `tp` ranks (Megatron's
/// `_vocab_size_with_padding`).
pub fn padded(vocab: u64, divisible_by: u64, tp: u64) -> u64 {
    round_up(vocab, divisible_by * tp.max(1))
}

/// Refuses a `make_vocab_size_divisible_by` outside 1..=[`MAX_DIVISIBLE_BY`].
pub fn check_divisible_by(divisible_by: u64) -> Result<()> {
    if !(1..=MAX_DIVISIBLE_BY).contains(&divisible_by) {
        return Err(PluginError::config(format!(
            "make_vocab_size_divisible_by is {divisible_by}; expected 1 to {MAX_DIVISIBLE_BY}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding() {
        assert_eq!(round_up(32000, 128), 32000);
        assert_eq!(round_up(32001, 128), 32128);
        assert_eq!(round_up(7, 0), 7);
        assert_eq!(padded(32001, 128, 1), 32128);
        assert_eq!(padded(32001, 128, 2), 32256);
        assert_eq!(padded(100, 100, 0), 100);
        check_divisible_by(1).unwrap();
        check_divisible_by(MAX_DIVISIBLE_BY).unwrap();
        let e = check_divisible_by(0).unwrap_err();
        assert_eq!(
            e.message.as_str(),
            "make_vocab_size_divisible_by is 0; expected 1 to 1048576"
        );
    }
}

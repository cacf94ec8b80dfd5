//! The bounds of a parallel degree (TP, PP, EP, ETP, virtual pipeline chunks): each is checked
//! before anything is sized or looped over from it.

use bridgeflow_sdk::{PluginError, Result};

/// The largest parallel degree (TP, PP, EP, virtual pipeline chunks) and the most ranks
/// accepted: beyond any cluster, and small enough that nothing sized from it can exhaust memory.
pub const MAX_DEGREE: u64 = 1 << 16;

/// Refuses a parallel degree outside 1..=[`MAX_DEGREE`], naming the option (`tp`, `--pp`, ...).
pub fn check_degree(option: &str, value: u64) -> Result<()> {
    if !(1..=MAX_DEGREE).contains(&value) {
        return Err(PluginError::config(format!(
            "{option} = {value}: a parallel degree is from 1 to {MAX_DEGREE}"
        )));
    }
    Ok(())
}

/// Refuses degrees whose product (ranks, or stages × virtual chunks) exceeds [`MAX_DEGREE`];
/// `what` names them (`tp × pp`).
pub fn check_product(what: &str, degrees: &[u64]) -> Result<u64> {
    let n = degrees
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_DEGREE)
        .ok_or_else(|| {
            PluginError::config(format!(
                "{what} = {}: more than {MAX_DEGREE} ranks",
                degrees
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" × ")
            ))
        })?;
    Ok(n)
}

/// Checks each `(option, value)` with [`check_degree`], in order.
pub fn check_degrees(degrees: &[(&str, u64)]) -> Result<()> {
    degrees.iter().try_for_each(|&(o, v)| check_degree(o, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degrees_are_bounded_and_named() {
        check_degree("tp", 1).unwrap();
        check_degree("tp", MAX_DEGREE).unwrap();
        let e = check_degree("tp", 0).unwrap_err();
        assert!(e.message.starts_with("tp = 0: "), "{e}");
        let e = check_degree("vpp", 1 << 32).unwrap_err();
        assert!(e.message.starts_with("vpp = 4294967296: "), "{e}");
        assert_eq!(check_product("tp × pp", &[8, 16]).unwrap(), 128);
        let e = check_product("tp × pp", &[65536, 2]).unwrap_err();
        assert!(e.message.contains("65536 × 2"), "{e}");
        assert!(check_product("x", &[u64::MAX, 2]).is_err());
        let e = check_degrees(&[("tp", 2), ("pp", 0)]).unwrap_err();
        assert!(e.message.starts_with("pp = 0: "), "{e}");
    }
}

//! `exp` over a slice, vectorized. libm's `expf` is one call per element, and the step's
//! softmaxes, cross-entropy and SiLU take ~75M of them at seq 512 (3 % of a 32M Llama step, the
//! largest cost after the products). This is Cephes' `expf` (range reduction by ln 2 in two
//! parts, a degree-6 polynomial; relative error under 2.5e-7, within 2 ulp of libm's) written
//! without branches, so that the compiler vectorizes the loop, and compiled twice: for the
//! baseline x86-64 and for AVX2 (chosen at run time). No fused multiply-adds, so both give the
//! same bits.
//!
//! Inputs below -87.3 give 0 (libm gives subnormals down to -103.9, all below 1.2e-38), above
//! 88.3 infinity (libm: finite up to 88.72); NaN stays NaN, -inf gives 0.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5 · 2²³ rounds to the nearest integer (|x · log₂e| < 2²²).
const ROUND: f32 = 12_582_912.0;
const LO: f32 = -87.9;
const HI: f32 = 88.3;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

#[inline(always)]
fn exp1(x: f32) -> f32 {
    let c = x.clamp(LO, HI);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let p = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let e = p * (r * r) + r + 1.0;
    // 2ⁿ from n's bits: t's mantissa holds n + 1.5 · 2²³; n = -127 gives 0.
    let bits = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    let y = e * f32::from_bits(bits as u32);
    let y = if x > HI { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
fn exp_all(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp1(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_all_avx2(xs: &mut [f32]) {
    exp_all(xs)
}

/// Every element of `xs` replaced by its exponential.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only feature the function is compiled for.
        return unsafe { exp_all_avx2(xs) };
    }
    exp_all(xs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(x: f32) -> f32 {
        let mut v = [x];
        exp_in_place(&mut v);
        v[0]
    }

    #[test]
    fn within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let n = 2_000_000;
        for i in 0..=n {
            let x = -87.3 + (88.3 + 87.3) * i as f32 / n as f32;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "{worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn the_edges() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-87.0) > 0.0 && exp(88.0).is_finite());
    }

    #[test]
    fn both_builds_agree_bit_for_bit() {
        let mut a: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 0.0177).collect();
        let mut b = a.clone();
        exp_all(&mut a);
        exp_in_place(&mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

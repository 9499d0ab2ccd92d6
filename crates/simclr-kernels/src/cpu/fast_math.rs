//! Vectorisable elementary functions over `f32`.
//!
//! The NT-Xent kernels take two exponentials per entry of the 2N x 2N similarity matrix in every
//! pass (67 million per pass at 2N = 8192); a call into libm per element would cost more than the
//! matrix products themselves. [`exp_approx`] is branch-free straight-line arithmetic on `f32`
//! and `i32`, so a loop of it over a slice compiles to SIMD code (AVX2 + FMA with the workspace's
//! `target-cpu=x86-64-v3`), at a relative error of about 1e-7, like the CUDA kernel's `__expf`
//! twin is allowed to have.

/// Fused multiply-add where the target has it, so that the code stays correct (only slower)
/// when the crate is built for a CPU without FMA: `f32::mul_add` would then call libm's `fmaf`
/// per element, which is far slower than a separate multiply and add.
#[inline(always)]
pub(crate) fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// Inputs below this give 0: `e^-86.6 < 2^-125`, the smallest power of two the scaling below
/// builds exactly. Dropping the last decade of normal numbers and all subnormals keeps the
/// code branch-free and away from slow subnormal arithmetic; the absolute error is under 3e-38.
const EXP_LO: f32 = -86.6;
/// Inputs are clamped to this from above: `n = 128` at most, and `2^(n-1) * 2 * e^r` overflows
/// to `+inf` for every input above `ln(f32::MAX) = 88.7228`, as it should.
const EXP_HI: f32 = 88.8;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part with few significant bits (so `n * LN2_HI` is exact) and the rest
/// (Cody and Waite's range reduction, constants from Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to an integer (ties to even) in the low mantissa bits, which
/// vectorises where `f32::round` would not be a single instruction.
const ROUND_SHIFT: f32 = 12_582_912.0;

/// `e^r` for `|r| <= ln 2 / 2`: `1 + r + r^2 P(r)` with Cephes' `expf` coefficients (the last,
/// 0.5000000120, is 0.5 in `f32`).
#[inline(always)]
fn exp_reduced(r: f32) -> f32 {
    let mut p = 1.987_569_2e-4_f32;
    p = fmadd(p, r, 1.398_199_9e-3);
    p = fmadd(p, r, 8.333_452e-3);
    p = fmadd(p, r, 4.166_579_6e-2);
    p = fmadd(p, r, 1.666_666_5e-1);
    p = fmadd(p, r, 0.5);
    fmadd(p, r * r, r) + 1.0
}

/// `e^x` to about 1e-7 relative error, in straight-line code that vectorises in a loop.
///
/// `x = n ln 2 + r` with `|r| <= ln2 / 2`, `e^r` from Cephes' degree-7 polynomial (six
/// coefficients after the exact `1 + r`), and `2^n` built in the exponent bits. Inputs below
/// about -86.6 (including `-inf`) give exactly 0, inputs above `ln(f32::MAX)` give `+inf`, NaN
/// gives NaN.
///
/// ```
/// use simclr_kernels::cpu::fast_math::exp_approx;
/// assert!((exp_approx(1.0) - std::f32::consts::E).abs() < 1e-6);
/// assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
/// ```
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    // Everything below is computed unconditionally and the out-of-range cases are patched
    // with bit masks: an `if` around the expensive part would make LLVM branch per element
    // instead of vectorising. The clamps are plain selects (min/max); NaN passes through them
    // and poisons the polynomial, so it stays NaN.
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let xc = if xc > EXP_HI { EXP_HI } else { xc };
    let t = fmadd(xc, LOG2E, ROUND_SHIFT);
    let n = t - ROUND_SHIFT;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_SHIFT.to_bits() as i32);
    let r = fmadd(-n, LN2_HI, xc);
    let r = fmadd(-n, LN2_LO, r);
    let y = exp_reduced(r);
    // 2^n as 2^(n-1) * 2, so that n = 128 stays a finite scale (the product overflows to inf).
    let scale = f32::from_bits((ni.wrapping_add(126) as u32) << 23);
    let v = (y + y) * scale;
    // All ones where the input is in range (or NaN), zero where it underflows.
    let keep = ((x >= EXP_LO || x.is_nan()) as u32).wrapping_neg();
    f32::from_bits(v.to_bits() & keep)
}

/// `e^x` for `x` in `[-86, 1]`, where no clamping is needed: the same polynomial as
/// [`exp_approx`] without its range handling, a quarter fewer instructions. The NT-Xent kernels
/// call it on `s - 1/tau`, which their callers keep inside that range; outside it the result is
/// meaningless (but computing it is not undefined behaviour).
#[inline(always)]
pub(crate) fn exp_in_range(x: f32) -> f32 {
    let t = fmadd(x, LOG2E, ROUND_SHIFT);
    let n = t - ROUND_SHIFT;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_SHIFT.to_bits() as i32);
    let r = fmadd(-n, LN2_HI, x);
    let r = fmadd(-n, LN2_LO, r);
    let y = exp_reduced(r);
    y * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// Replaces every element by its exponential ([`exp_approx`]), vectorised.
pub fn exp_in_place(xs: &mut [f32]) {
    for x in xs {
        *x = exp_approx(*x);
    }
}

/// Lanes of the partial sums and maxima: two AVX2 registers' worth, so the loop-carried
/// dependency of the reductions does not serialise on the add latency.
const LANES: usize = 16;

/// The maximum of `xs` (`-inf` for an empty slice), NaN-free input assumed.
pub fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// `sum_k e^(xs[k] - shift)` with [`exp_approx`], vectorised.
pub fn sum_exp_shifted(xs: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += exp_approx(c[j] - shift);
        }
    }
    let mut s = 0.0f32;
    for &v in chunks.remainder() {
        s += exp_approx(v - shift);
    }
    // Pairwise, to keep the rounding of the final sum down.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0] + s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_the_range() {
        let mut worst = 0.0f64;
        let n = 2_000_000;
        for i in 0..=n {
            let x = -86.0 + 174.0 * i as f32 / n as f32;
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            let rel = ((got - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-1e30), 0.0);
        assert_eq!(exp_approx(-90.0), 0.0);
        assert_eq!(exp_approx(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_approx(89.0), f32::INFINITY);
        assert!(exp_approx(88.7).is_finite());
        assert!(exp_approx(f32::NAN).is_nan());
        let v = exp_approx(-86.0);
        assert!((v as f64 / (-86.0f64).exp() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn exp_in_range_matches_std() {
        let n = 1_000_000;
        for i in 0..=n {
            let x = -86.0 + 87.0 * i as f32 / n as f32;
            let want = (x as f64).exp();
            let rel = ((exp_in_range(x) as f64 - want) / want).abs();
            assert!(rel < 2.5e-7, "exp_in_range({x}) relative error {rel}");
        }
    }

    #[test]
    fn slice_helpers() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let m = max_of(&xs);
        assert_eq!(m, xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let s = sum_exp_shifted(&xs, m) as f64;
        let want: f64 = xs.iter().map(|&x| (x as f64 - m as f64).exp()).sum();
        assert!((s / want - 1.0).abs() < 1e-6);
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            assert!((*y as f64 / (*x as f64).exp() - 1.0).abs() < 3e-7);
        }
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
        assert_eq!(sum_exp_shifted(&[], 0.0), 0.0);
    }
}

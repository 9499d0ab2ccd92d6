//! Element-wise kernels.
//!
//! The activation kernels are generic over the storage type [`Elem`]: each value is widened to
//! f32, the f32 formula applied, and the result rounded once on store. The f32 instantiation is
//! therefore the plain f32 kernel, and the bf16 one is the CPU twin of the `_bf16` GPU kernels.

use rayon::prelude::*;

use crate::Elem;

const CHUNK: usize = 1 << 14;

/// `y = max(x, 0)` in place (NaN becomes 0, as `f32::max`). bf16 values are compared in f32;
/// the result is one of the inputs or 0, so rounding it back is exact.
pub fn relu_inplace<T: Elem>(x: &mut [T]) {
    x.par_chunks_mut(CHUNK).for_each(|c| {
        c.iter_mut()
            .for_each(|v| *v = T::from_f32(v.to_f32().max(0.0)))
    });
}

/// `dy *= (y > 0)` in place, where `y` is the ReLU's output: `dy` is zeroed where `y <= 0` and
/// left untouched elsewhere, NaN in `y` included (so a NaN forward stays visible backward). The
/// test widens `y` to f32, so bf16 masks exactly as f32 does.
pub fn relu_backward_inplace<T: Elem>(dy: &mut [T], y: &[T]) {
    dy.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(d, y)| {
            for (d, y) in d.iter_mut().zip(y) {
                if y.to_f32() <= 0.0 {
                    *d = T::from_f32(0.0);
                }
            }
        });
}

/// `a += b`. For bf16 the sum is taken in f32 and rounded once, as the GPU kernel does, so a
/// residual add loses no more than one rounding.
pub fn add_inplace<T: Elem>(a: &mut [T], b: &[T]) {
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            a.iter_mut()
                .zip(b)
                .for_each(|(a, b)| *a = T::from_f32(a.to_f32() + b.to_f32()))
        });
}

/// `a = max(a + b, 0)`: a residual block's add and ReLU in one pass over the activations
/// instead of two. Summed in f32 and rounded once, as the GPU's `add` kernel with its ReLU.
pub fn add_relu_inplace<T: Elem>(a: &mut [T], b: &[T]) {
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            a.iter_mut()
                .zip(b)
                .for_each(|(a, b)| *a = T::from_f32((a.to_f32() + b.to_f32()).max(0.0)))
        });
}

/// NCHW to NHWC.
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize, y: &mut [f32]) {
    y.par_chunks_mut(h * w * c).enumerate().for_each(|(i, yi)| {
        let xi = &x[i * c * h * w..(i + 1) * c * h * w];
        for ch in 0..c {
            for p in 0..h * w {
                yi[p * c + ch] = xi[ch * h * w + p];
            }
        }
    });
    debug_assert_eq!(y.len(), n * c * h * w);
}

/// NHWC to NCHW.
pub fn nhwc_to_nchw(x: &[f32], n: usize, h: usize, w: usize, c: usize, y: &mut [f32]) {
    y.par_chunks_mut(h * w * c).enumerate().for_each(|(i, yi)| {
        let xi = &x[i * c * h * w..(i + 1) * c * h * w];
        for ch in 0..c {
            for p in 0..h * w {
                yi[ch * h * w + p] = xi[p * c + ch];
            }
        }
    });
    debug_assert_eq!(y.len(), n * c * h * w);
}

/// `y[r, j] = b[j]` for every row of `y` (`[rows, b.len()]`).
pub fn broadcast_rows(b: &[f32], y: &mut [f32]) {
    y.chunks_exact_mut(b.len().max(1))
        .for_each(|r| r.copy_from_slice(b));
}

/// `out[j] = sum_r x[r, j]` over the rows of `x` (`[rows, out.len()]`), in f32 and row order:
/// the bias gradient of a linear layer.
pub fn column_sums(x: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for r in x.chunks_exact(out.len().max(1)) {
        out.iter_mut().zip(r).for_each(|(a, v)| *a += v);
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The bf16 instantiations against the f32 ones on the widened inputs: the bf16 result must
    //! be the f32 result rounded once, bit for bit.

    use super::*;
    use half::bf16;

    /// A small deterministic generator (64-bit LCG, high bits out), so failures reproduce.
    pub(crate) struct Lcg(u64);

    impl Lcg {
        pub(crate) fn new(seed: u64) -> Self {
            Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        /// Uniform in `[lo, hi)`, with all 24 mantissa bits random so bf16 rounding bites.
        pub(crate) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (self.0 >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            ((self.uniform(0.0, 1.0) * n as f32) as usize).min(n - 1)
        }

        /// `len` values in `[lo, hi)`, rounded to bf16: the bf16 inputs and their exact widening.
        pub(crate) fn bf16_vec(&mut self, len: usize, lo: f32, hi: f32) -> (Vec<bf16>, Vec<f32>) {
            let b: Vec<bf16> = (0..len)
                .map(|_| bf16::from_f32(self.uniform(lo, hi)))
                .collect();
            let f = widen(&b);
            (b, f)
        }
    }

    pub(crate) fn widen(b: &[bf16]) -> Vec<f32> {
        b.iter().map(|v| v.to_f32()).collect()
    }

    /// `got` (the bf16 kernel) is `want` (the f32 kernel) rounded to bf16, bit for bit.
    #[track_caller]
    pub(crate) fn assert_rounded(got: &[bf16], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let r = bf16::from_f32(*w);
            assert_eq!(
                g.to_bits(),
                r.to_bits(),
                "element {i}: bf16 kernel gave {g} ({:#06x}), f32 kernel {w} rounds to {r} ({:#06x})",
                g.to_bits(),
                r.to_bits()
            );
        }
    }

    #[test]
    fn relu_bf16_matches_rounded_f32() {
        let mut rng = Lcg::new(1);
        let (mut xb, mut xf) = rng.bf16_vec(1000, -2.0, 2.0);
        for (i, v) in [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
            .into_iter()
            .enumerate()
        {
            xb[i * 7] = bf16::from_f32(v);
            xf[i * 7] = xb[i * 7].to_f32();
        }
        relu_inplace(&mut xb);
        relu_inplace(&mut xf);
        assert_rounded(&xb, &xf);
        assert!(xf.iter().all(|v| *v >= 0.0));
    }

    #[test]
    fn relu_backward_bf16_matches_rounded_f32_and_keeps_dy_at_nan() {
        let mut rng = Lcg::new(2);
        let (mut yb, mut yf) = rng.bf16_vec(1000, -1.0, 1.0);
        let (mut db, mut df) = rng.bf16_vec(1000, -3.0, 3.0);
        // Exact zeros (masked), a negative zero (masked) and NaNs (kept) in the forward output.
        for (i, v) in [0.0, -0.0, f32::NAN, f32::NAN, 0.0].into_iter().enumerate() {
            yb[i * 11] = bf16::from_f32(v);
            yf[i * 11] = yb[i * 11].to_f32();
        }
        let before = df.clone();
        relu_backward_inplace(&mut db, &yb);
        relu_backward_inplace(&mut df, &yf);
        assert_rounded(&db, &df);
        for i in 0..yf.len() {
            let want = if yf[i] <= 0.0 { 0.0 } else { before[i] };
            assert_eq!(df[i].to_bits(), want.to_bits(), "element {i}");
        }
        assert_eq!(df[22], before[22], "NaN in y must keep dy");
    }

    #[test]
    fn add_bf16_rounds_the_f32_sum_once() {
        let mut rng = Lcg::new(3);
        // Spread the magnitudes so many sums are not representable in bf16.
        let (mut ab, mut af) = rng.bf16_vec(1000, -4.0, 4.0);
        let (bb, bf) = rng.bf16_vec(1000, -0.05, 0.05);
        add_inplace(&mut ab, &bb);
        add_inplace(&mut af, &bf);
        assert_rounded(&ab, &af);
        assert!(
            af.iter().any(|v| bf16::from_f32(*v).to_f32() != *v),
            "the test should exercise rounding"
        );
    }

    #[test]
    fn add_relu_is_the_add_then_the_relu_with_one_rounding() {
        let mut rng = Lcg::new(4);
        let (mut ab, mut af) = rng.bf16_vec(1000, -4.0, 4.0);
        let (bb, bf) = rng.bf16_vec(1000, -4.0, 4.0);
        let mut two_passes = af.clone();
        add_inplace(&mut two_passes, &bf);
        relu_inplace(&mut two_passes);
        add_relu_inplace(&mut af, &bf);
        assert_eq!(af, two_passes, "f32: the same bits as the two passes");
        assert!(af.contains(&0.0) && af.iter().any(|&v| v > 0.0));
        add_relu_inplace(&mut ab, &bb);
        assert_rounded(&ab, &af);
    }
}

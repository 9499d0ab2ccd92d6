//! Batch normalisation over the rows of a `[rows, channels]` matrix (NHWC activations flattened,
//! or the features of a linear layer).
//!
//! Activations (`x`, `dy`, the fused ReLU's output, `y`, `dx`) are generic over the storage type
//! [`Elem`]; statistics, scale and shift, gamma and the reductions stay f32/f64. Each activation
//! is widened to f32 on load and rounded once on store, so the f32 instantiation is the plain
//! f32 kernel and the bf16 one is the CPU twin of the `_bf16` GPU kernels.

use rayon::prelude::*;

use super::REDUCE_GROUPS;
use crate::Elem;

/// Per-channel sums over rows, in fixed row groups (reproducible whatever the thread count),
/// accumulated in f64.
fn channel_sums(rows: usize, c: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let per = rows.div_ceil(REDUCE_GROUPS).max(1);
    let parts: Vec<Vec<f64>> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|gi| {
            let mut acc = vec![0.0f64; c];
            for r in gi * per..((gi + 1) * per).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; c];
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Per-channel sums of `x` (`[rows, c]`), in f64: the first pass of the statistics. For global
/// batch norm these are all-reduced over the replicas before use. bf16 values widen exactly, so
/// the sums of bf16 activations are the sums of their f32 values.
pub fn channel_sum<T: Elem>(x: &[T], rows: usize, c: usize) -> Vec<f64> {
    channel_sums(rows, c, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
            *a += v.to_f32() as f64;
        }
    })
}

/// Per-channel sums of `(x - mean)^2`, in f64: the second pass (two passes keep the variance of
/// values far from zero accurate). bf16 values are widened exactly, as in [`channel_sum`].
pub fn channel_centered_sq<T: Elem>(x: &[T], rows: usize, c: usize, mean: &[f64]) -> Vec<f64> {
    channel_sums(rows, c, |r, acc| {
        for ((a, v), m) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(mean) {
            let d = v.to_f32() as f64 - m;
            *a += d * d;
        }
    })
}

/// Batch mean and biased variance per channel of `x` (`[rows, c]`), in f32 whatever the storage
/// type: the statistics of bf16 activations are those of their exact f32 values.
pub fn batch_stats<T: Elem>(x: &[T], rows: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let sum = channel_sum(x, rows, c);
    let mean: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
    let sq = channel_centered_sq(x, rows, c, &mean);
    (
        mean.iter().map(|&m| m as f32).collect(),
        sq.iter().map(|s| (s / rows as f64) as f32).collect(),
    )
}

/// `y = (x - mean) * scale + shift` per channel, where the caller folded gamma, beta and the
/// inverse standard deviation into `scale` and `shift`. For bf16 the affine map and the fused
/// ReLU run in f32 and `y` is rounded once, so fusing the ReLU adds no rounding.
pub fn affine_rows<T: Elem>(
    x: &[T],
    c: usize,
    scale: &[f32],
    shift: &[f32],
    y: &mut [T],
    relu: bool,
) {
    let (scale, shift) = (&scale[..c], &shift[..c]);
    y.par_chunks_mut(c * 256)
        .zip(x.par_chunks(c * 256))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                // Rows and parameters all of length c, and the ReLU decided outside the loop:
                // the compiler vectorises it.
                let lanes = yr.iter_mut().zip(xr).zip(scale.iter().zip(shift));
                if relu {
                    for ((y, x), (s, b)) in lanes {
                        *y = T::from_f32((x.to_f32() * s + b).max(0.0));
                    }
                } else {
                    for ((y, x), (s, b)) in lanes {
                        *y = T::from_f32(x.to_f32() * s + b);
                    }
                }
            }
        });
}

/// `dy` widened to f32, or 0 where the fused ReLU's output `y` is not positive (NaN keeps `dy`).
#[inline(always)]
fn masked<T: Elem>(dy: T, y: T) -> f32 {
    if y.to_f32() <= 0.0 {
        0.0
    } else {
        dy.to_f32()
    }
}

/// Row `r` of a `[rows, c]` matrix.
#[inline(always)]
fn row<T>(m: &[T], r: usize, c: usize) -> &[T] {
    &m[r * c..(r + 1) * c]
}

/// The per-channel sums of the batch-norm backward pass, `[sum g | sum g * xhat]` (`2c` values,
/// f64) with `g = dy` masked where the fused ReLU's output `relu_out` is not positive. For global
/// batch norm these are all-reduced over the replicas before [`batchnorm_backward_dx`]. bf16
/// activations are widened and the sums are the f32 algorithm's, so they stay f64 for any `T`.
pub fn batchnorm_backward_sums<T: Elem>(
    x: &[T],
    dy: &[T],
    relu_out: Option<&[T]>,
    rows: usize,
    c: usize,
    mean: &[f32],
    invstd: &[f32],
) -> Vec<f64> {
    let (mean, invstd) = (&mean[..c], &invstd[..c]);
    // Per element: g in f64 added to db, and g times xhat (computed in f32) added to dg.
    let add = |db: &mut f64, dg: &mut f64, g: f32, x: T, m: f32, s: f32| {
        let g = g as f64;
        *db += g;
        *dg += g * ((x.to_f32() - m) * s) as f64;
    };
    channel_sums(rows, 2 * c, |r, acc| {
        let (db, dg) = acc.split_at_mut(c);
        let (xr, dyr) = (row(x, r, c), row(dy, r, c));
        // Slices of one length and no branch on the ReLU inside: the loops vectorise.
        let sums = db.iter_mut().zip(dg.iter_mut());
        let params = mean.iter().zip(invstd);
        match relu_out {
            Some(y) => {
                let yr = row(y, r, c);
                let values = xr.iter().zip(dyr.iter().zip(yr));
                for ((db, dg), ((x, (dy, y)), (m, s))) in sums.zip(values.zip(params)) {
                    add(db, dg, masked(*dy, *y), *x, *m, *s);
                }
            }
            None => {
                for ((db, dg), ((x, dy), (m, s))) in sums.zip(xr.iter().zip(dyr).zip(params)) {
                    add(db, dg, dy.to_f32(), *x, *m, *s);
                }
            }
        }
    })
}

/// `dx = gamma * invstd * (g - dbeta / count - xhat * dgamma / count)` from the sums of
/// [`batchnorm_backward_sums`] over `count` rows (the global batch for global batch norm). For
/// bf16 the formula runs in f32 and each `dx` is rounded once on store, as on the GPU.
pub fn batchnorm_backward_dx<T: Elem>(
    x: &[T],
    dy: &[T],
    relu_out: Option<&[T]>,
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    sums: &[f64],
    count: usize,
    dx: &mut [T],
) {
    let (dbeta, dgamma) = sums.split_at(c);
    let k1: Vec<f32> = (0..c).map(|i| gamma[i] * invstd[i]).collect();
    let mb: Vec<f32> = dbeta.iter().map(|&b| (b / count as f64) as f32).collect();
    let mg: Vec<f32> = dgamma.iter().map(|&g| (g / count as f64) as f32).collect();
    // Every slice below has length c, so the loops index without bounds checks and vectorise.
    let (mean, invstd, k1, mb, mg) = (&mean[..c], &invstd[..c], &k1[..c], &mb[..c], &mg[..c]);
    // Per element, in f32: dx = k1 * (g - mb - xhat * mg), rounded once to T.
    let dx_of = |g: f32, x: T, i: usize| {
        let xhat = (x.to_f32() - mean[i]) * invstd[i];
        T::from_f32(k1[i] * (g - mb[i] - xhat * mg[i]))
    };
    const BLOCK: usize = 256;
    dx.par_chunks_mut(c * BLOCK)
        .enumerate()
        .for_each(|(bi, dxc)| {
            for (k, dr) in dxc.chunks_exact_mut(c).enumerate() {
                let r = bi * BLOCK + k;
                let (xr, dyr, dr) = (row(x, r, c), row(dy, r, c), &mut dr[..c]);
                match relu_out {
                    Some(y) => {
                        let yr = row(y, r, c);
                        for i in 0..c {
                            dr[i] = dx_of(masked(dyr[i], yr[i]), xr[i], i);
                        }
                    }
                    None => {
                        for i in 0..c {
                            dr[i] = dx_of(dyr[i].to_f32(), xr[i], i);
                        }
                    }
                }
            }
        });
}

/// The backward pass of training-mode batch norm. Returns (dgamma, dbeta) and writes dx. With
/// `relu_out` (the output of a fused ReLU), `dy` is masked where that output is not positive, on
/// the fly rather than in a separate pass over the tensor. dgamma and dbeta are f32 for any `T`;
/// a bf16 `dx` is the f32 result rounded once.
pub fn batchnorm_backward<T: Elem>(
    x: &[T],
    dy: &[T],
    relu_out: Option<&[T]>,
    rows: usize,
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    dx: &mut [T],
) -> (Vec<f32>, Vec<f32>) {
    let sums = batchnorm_backward_sums(x, dy, relu_out, rows, c, mean, invstd);
    batchnorm_backward_dx(x, dy, relu_out, c, mean, invstd, gamma, &sums, rows, dx);
    let (dbeta, dgamma) = sums.split_at(c);
    (
        dgamma.iter().map(|&v| v as f32).collect(),
        dbeta.iter().map(|&v| v as f32).collect(),
    )
}

#[cfg(test)]
mod tests {
    //! The bf16 instantiations against the f32 ones on the widened inputs: bf16 activations must
    //! be the f32 ones rounded once, and the f32/f64 statistics and sums must be equal.

    use super::*;
    use crate::cpu::eltwise::tests::{assert_rounded, widen, Lcg};
    use half::bf16;

    // More than 256 rows, so the blocked loops run several chunks, and not a multiple of the
    // reduction groups.
    const ROWS: usize = 301;
    const C: usize = 5;

    /// Inputs whose channels sit at different offsets, so centring matters.
    fn input(rng: &mut Lcg) -> (Vec<bf16>, Vec<f32>) {
        let (mut b, _) = rng.bf16_vec(ROWS * C, -1.0, 1.0);
        for (i, v) in b.iter_mut().enumerate() {
            *v = bf16::from_f32(v.to_f32() * (1 + i % C) as f32 + (i % C) as f32 - 2.0);
        }
        let f = widen(&b);
        (b, f)
    }

    fn params(rng: &mut Lcg) -> (Vec<f32>, Vec<f32>) {
        let a = (0..C).map(|_| rng.uniform(0.5, 2.0)).collect();
        let b = (0..C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        (a, b)
    }

    #[test]
    fn statistics_of_bf16_equal_those_of_the_widened_values() {
        let mut rng = Lcg::new(10);
        let (xb, xf) = input(&mut rng);
        assert_eq!(channel_sum(&xb, ROWS, C), channel_sum(&xf, ROWS, C));
        let mean: Vec<f64> = channel_sum(&xf, ROWS, C)
            .iter()
            .map(|s| s / ROWS as f64)
            .collect();
        assert_eq!(
            channel_centered_sq(&xb, ROWS, C, &mean),
            channel_centered_sq(&xf, ROWS, C, &mean)
        );
        assert_eq!(batch_stats(&xb, ROWS, C), batch_stats(&xf, ROWS, C));
    }

    #[test]
    fn affine_rows_bf16_matches_rounded_f32_with_and_without_relu() {
        let mut rng = Lcg::new(11);
        let (xb, xf) = input(&mut rng);
        let (scale, shift) = params(&mut rng);
        for relu in [false, true] {
            let mut yb = vec![bf16::from_f32(7.0); ROWS * C];
            let mut yf = vec![7.0f32; ROWS * C];
            affine_rows(&xb, C, &scale, &shift, &mut yb, relu);
            affine_rows(&xf, C, &scale, &shift, &mut yf, relu);
            assert_rounded(&yb, &yf);
            assert_eq!(yf.iter().any(|v| *v < 0.0), !relu, "relu = {relu}");
        }
    }

    #[test]
    fn batchnorm_backward_bf16_matches_rounded_f32_with_and_without_relu() {
        let mut rng = Lcg::new(12);
        let (xb, xf) = input(&mut rng);
        let (dyb, dyf) = rng.bf16_vec(ROWS * C, -1.0, 1.0);
        let (gamma, _) = params(&mut rng);
        let (mean, var) = batch_stats(&xf, ROWS, C);
        let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        // A fused ReLU's output: zeros where masked, plus a NaN that must keep its dy.
        let scale: Vec<f32> = (0..C).map(|i| invstd[i] * gamma[i]).collect();
        let shift: Vec<f32> = (0..C).map(|i| -mean[i] * scale[i]).collect();
        let mut ob = vec![bf16::ZERO; ROWS * C];
        affine_rows(&xb, C, &scale, &shift, &mut ob, true);
        ob[17] = bf16::NAN;
        let of = widen(&ob);
        assert!(of.iter().filter(|v| **v == 0.0).count() > ROWS);

        for relu in [false, true] {
            let (rb, rf) = if relu {
                (Some(&ob[..]), Some(&of[..]))
            } else {
                (None, None)
            };
            let sb = batchnorm_backward_sums(&xb, &dyb, rb, ROWS, C, &mean, &invstd);
            let sf = batchnorm_backward_sums(&xf, &dyf, rf, ROWS, C, &mean, &invstd);
            assert_eq!(sb, sf, "sums, relu = {relu}");

            let mut dxb = vec![bf16::ZERO; ROWS * C];
            let mut dxf = vec![0.0f32; ROWS * C];
            batchnorm_backward_dx(
                &xb, &dyb, rb, C, &mean, &invstd, &gamma, &sb, ROWS, &mut dxb,
            );
            batchnorm_backward_dx(
                &xf, &dyf, rf, C, &mean, &invstd, &gamma, &sf, ROWS, &mut dxf,
            );
            assert_rounded(&dxb, &dxf);

            let mut dxb2 = vec![bf16::ZERO; ROWS * C];
            let mut dxf2 = vec![0.0f32; ROWS * C];
            let gb = batchnorm_backward(&xb, &dyb, rb, ROWS, C, &mean, &invstd, &gamma, &mut dxb2);
            let gf = batchnorm_backward(&xf, &dyf, rf, ROWS, C, &mean, &invstd, &gamma, &mut dxf2);
            assert_eq!(gb, gf, "dgamma/dbeta, relu = {relu}");
            assert_rounded(&dxb2, &dxf2);
            assert_eq!(dxf2, dxf);
        }
    }
}

//! Batch normalisation over the rows of a `[rows, channels]` matrix (NHWC activations flattened,
//! or the features of a linear layer).

use rayon::prelude::*;

use super::REDUCE_GROUPS;

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
/// batch norm these are all-reduced over the replicas before use.
pub fn channel_sum(x: &[f32], rows: usize, c: usize) -> Vec<f64> {
    channel_sums(rows, c, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
            *a += *v as f64;
        }
    })
}

/// Per-channel sums of `(x - mean)^2`, in f64: the second pass (two passes keep the variance of
/// values far from zero accurate).
pub fn channel_centered_sq(x: &[f32], rows: usize, c: usize, mean: &[f64]) -> Vec<f64> {
    channel_sums(rows, c, |r, acc| {
        for ((a, v), m) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(mean) {
            let d = *v as f64 - m;
            *a += d * d;
        }
    })
}

/// Batch mean and biased variance per channel of `x` (`[rows, c]`).
pub fn batch_stats(x: &[f32], rows: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let sum = channel_sum(x, rows, c);
    let mean: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
    let sq = channel_centered_sq(x, rows, c, &mean);
    (
        mean.iter().map(|&m| m as f32).collect(),
        sq.iter().map(|s| (s / rows as f64) as f32).collect(),
    )
}

/// `y = (x - mean) * scale + shift` per channel, where the caller folded gamma, beta and the
/// inverse standard deviation into `scale` and `shift`.
pub fn affine_rows(x: &[f32], c: usize, scale: &[f32], shift: &[f32], y: &mut [f32], relu: bool) {
    y.par_chunks_mut(c * 256)
        .zip(x.par_chunks(c * 256))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                for i in 0..c {
                    let v = xr[i] * scale[i] + shift[i];
                    yr[i] = if relu { v.max(0.0) } else { v };
                }
            }
        });
}

/// `dy[i]`, or 0 where the fused ReLU's output is not positive.
#[inline(always)]
fn masked_grad(dy: &[f32], relu_out: Option<&[f32]>, i: usize) -> f32 {
    match relu_out {
        Some(y) if y[i] <= 0.0 => 0.0,
        _ => dy[i],
    }
}

/// The per-channel sums of the batch-norm backward pass, `[sum g | sum g * xhat]` (`2c` values,
/// f64) with `g = dy` masked where the fused ReLU's output `relu_out` is not positive. For global
/// batch norm these are all-reduced over the replicas before [`batchnorm_backward_dx`].
pub fn batchnorm_backward_sums(
    x: &[f32],
    dy: &[f32],
    relu_out: Option<&[f32]>,
    rows: usize,
    c: usize,
    mean: &[f32],
    invstd: &[f32],
) -> Vec<f64> {
    let grad = |i: usize| masked_grad(dy, relu_out, i);
    channel_sums(rows, 2 * c, |r, acc| {
        let (db, dg) = acc.split_at_mut(c);
        for i in 0..c {
            let g = grad(r * c + i) as f64;
            db[i] += g;
            dg[i] += g * ((x[r * c + i] - mean[i]) * invstd[i]) as f64;
        }
    })
}

/// `dx = gamma * invstd * (g - dbeta / count - xhat * dgamma / count)` from the sums of
/// [`batchnorm_backward_sums`] over `count` rows (the global batch for global batch norm).
pub fn batchnorm_backward_dx(
    x: &[f32],
    dy: &[f32],
    relu_out: Option<&[f32]>,
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    sums: &[f64],
    count: usize,
    dx: &mut [f32],
) {
    let grad = |i: usize| masked_grad(dy, relu_out, i);
    let (dbeta, dgamma) = sums.split_at(c);
    let k1: Vec<f32> = (0..c).map(|i| gamma[i] * invstd[i]).collect();
    let mb: Vec<f32> = dbeta.iter().map(|&b| (b / count as f64) as f32).collect();
    let mg: Vec<f32> = dgamma.iter().map(|&g| (g / count as f64) as f32).collect();
    const BLOCK: usize = 256;
    dx.par_chunks_mut(c * BLOCK)
        .enumerate()
        .for_each(|(bi, dxc)| {
            let base = bi * BLOCK * c;
            for (r, dr) in dxc.chunks_exact_mut(c).enumerate() {
                let o = base + r * c;
                for i in 0..c {
                    let xhat = (x[o + i] - mean[i]) * invstd[i];
                    dr[i] = k1[i] * (grad(o + i) - mb[i] - xhat * mg[i]);
                }
            }
        });
}

/// The backward pass of training-mode batch norm. Returns (dgamma, dbeta) and writes dx. With
/// `relu_out` (the output of a fused ReLU), `dy` is masked where that output is not positive, on
/// the fly rather than in a separate pass over the tensor.
pub fn batchnorm_backward(
    x: &[f32],
    dy: &[f32],
    relu_out: Option<&[f32]>,
    rows: usize,
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let sums = batchnorm_backward_sums(x, dy, relu_out, rows, c, mean, invstd);
    batchnorm_backward_dx(x, dy, relu_out, c, mean, invstd, gamma, &sums, rows, dx);
    let (dbeta, dgamma) = sums.split_at(c);
    (
        dgamma.iter().map(|&v| v as f32).collect(),
        dbeta.iter().map(|&v| v as f32).collect(),
    )
}

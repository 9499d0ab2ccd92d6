//! Element-wise kernels.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `y = max(x, 0)` in place.
pub fn relu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
}

/// `dy *= (y > 0)` in place, where `y` is the ReLU's output.
pub fn relu_backward_inplace(dy: &mut [f32], y: &[f32]) {
    dy.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(d, y)| {
            for (d, y) in d.iter_mut().zip(y) {
                if *y <= 0.0 {
                    *d = 0.0;
                }
            }
        });
}

/// `a += b`.
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
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

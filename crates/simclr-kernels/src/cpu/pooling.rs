//! Max pooling and global average pooling on NHWC tensors.

use rayon::prelude::*;

/// Max pooling geometry (square window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Batch size.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Window side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding (implicit -inf).
    pub pad: usize,
}

impl PoolGeom {
    /// Output height.
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Output width.
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// Max pooling forward; `arg` receives, per output value, the flat input index of the maximum
/// (the first one on ties, as PyTorch).
pub fn maxpool_forward(x: &[f32], g: &PoolGeom, y: &mut [f32], arg: &mut [u32]) {
    let (oh, ow, c) = (g.oh(), g.ow(), g.c);
    let in_img = g.h * g.w * c;
    y.par_chunks_mut(oh * ow * c)
        .zip(arg.par_chunks_mut(oh * ow * c))
        .enumerate()
        .for_each(|(n, (yi, ai))| {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yo = &mut yi[(oy * ow + ox) * c..][..c];
                    let ao = &mut ai[(oy * ow + ox) * c..][..c];
                    yo.fill(f32::NEG_INFINITY);
                    for ky in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        for kx in 0..g.k {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if ix < 0 || ix >= g.w as isize {
                                continue;
                            }
                            let base = n * in_img + (iy as usize * g.w + ix as usize) * c;
                            let xs = &x[base..base + c];
                            for i in 0..c {
                                // `>` keeps the first maximum; NaN propagates like PyTorch.
                                if xs[i] > yo[i] || xs[i].is_nan() {
                                    yo[i] = xs[i];
                                    ao[i] = (base + i) as u32;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// Max pooling backward: scatters `dy` to the saved argmax positions of `dx` (zeroed first).
pub fn maxpool_backward(dy: &[f32], arg: &[u32], g: &PoolGeom, dx: &mut [f32]) {
    let in_img = g.h * g.w * g.c;
    let out_img = g.oh() * g.ow() * g.c;
    dx.par_chunks_mut(in_img)
        .zip(dy.par_chunks(out_img).zip(arg.par_chunks(out_img)))
        .enumerate()
        .for_each(|(n, (dxi, (dyi, ai)))| {
            dxi.fill(0.0);
            let base = n * in_img;
            for (d, &a) in dyi.iter().zip(ai) {
                dxi[a as usize - base] += d;
            }
        });
}

/// Global average pooling: `[n, h*w, c]` to `[n, c]`.
pub fn gap_forward(x: &[f32], n: usize, hw: usize, c: usize, y: &mut [f32]) {
    y.par_chunks_mut(c).enumerate().for_each(|(i, yi)| {
        yi.fill(0.0);
        for p in x[i * hw * c..(i + 1) * hw * c].chunks_exact(c) {
            for (a, v) in yi.iter_mut().zip(p) {
                *a += v;
            }
        }
        let s = 1.0 / hw as f32;
        yi.iter_mut().for_each(|v| *v *= s);
    });
    debug_assert_eq!(y.len(), n * c);
}

/// Global average pooling backward.
pub fn gap_backward(dy: &[f32], hw: usize, c: usize, dx: &mut [f32]) {
    let s = 1.0 / hw as f32;
    dx.par_chunks_mut(hw * c).enumerate().for_each(|(i, dxi)| {
        let g = &dy[i * c..(i + 1) * c];
        for p in dxi.chunks_exact_mut(c) {
            for (d, v) in p.iter_mut().zip(g) {
                *d = v * s;
            }
        }
    });
}

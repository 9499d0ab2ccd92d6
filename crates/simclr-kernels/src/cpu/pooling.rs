//! Max pooling and global average pooling on NHWC tensors.
//!
//! Activations are generic over the storage type [`Elem`]: values are widened to f32, the f32
//! algorithm runs, and each stored value is rounded once. The f32 instantiation is the plain f32
//! kernel; the bf16 one is the CPU twin of the `_bf16` GPU kernels.

use rayon::prelude::*;

use crate::Elem;

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
/// (the first one on ties, as PyTorch). bf16 values are compared widened to f32, which is exact,
/// so the argmax is the f32 kernel's and `y` holds the winning input itself (no rounding).
pub fn maxpool_forward<T: Elem>(x: &[T], g: &PoolGeom, y: &mut [T], arg: &mut [u32]) {
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
                    yo.fill(T::from_f32(f32::NEG_INFINITY));
                    // A window of -inf only keeps index 0, as the GPU kernel does.
                    ao.fill(0);
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
                                let (v, m) = (xs[i].to_f32(), yo[i].to_f32());
                                if v > m || v.is_nan() {
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

/// Max pooling backward: scatters `dy` to the saved argmax positions of `dx` (zeroed first),
/// adding in ascending output order. Overlapping windows can send several gradients to one
/// input, so for bf16 they are summed in an f32 scratch image and each `dx` rounded once, as the
/// GPU kernel does; f32 accumulates in `dx` itself.
pub fn maxpool_backward<T: Elem>(dy: &[T], arg: &[u32], g: &PoolGeom, dx: &mut [T]) {
    let in_img = g.h * g.w * g.c;
    let out_img = g.oh() * g.ow() * g.c;
    let scatter = |n: usize, acc: &mut [f32], dyi: &[T], ai: &[u32]| {
        acc.fill(0.0);
        let base = n * in_img;
        for (d, &a) in dyi.iter().zip(ai) {
            acc[a as usize - base] += d.to_f32();
        }
    };
    if let Some(dx) = T::as_f32_mut(dx) {
        dx.par_chunks_mut(in_img)
            .zip(dy.par_chunks(out_img).zip(arg.par_chunks(out_img)))
            .enumerate()
            .for_each(|(n, (dxi, (dyi, ai)))| scatter(n, dxi, dyi, ai));
        return;
    }
    dx.par_chunks_mut(in_img)
        .zip(dy.par_chunks(out_img).zip(arg.par_chunks(out_img)))
        .enumerate()
        .for_each_init(Vec::new, |acc, (n, (dxi, (dyi, ai)))| {
            acc.resize(in_img, 0.0);
            scatter(n, acc, dyi, ai);
            for (d, v) in dxi.iter_mut().zip(acc.iter()) {
                *d = T::from_f32(*v);
            }
        });
}

/// Global average pooling: `[n, h*w, c]` to `[n, c]`. The output stays f32 for any `T` (it feeds
/// the projection head); bf16 inputs are widened and summed exactly as f32 ones.
pub fn gap_forward<T: Elem>(x: &[T], n: usize, hw: usize, c: usize, y: &mut [f32]) {
    y.par_chunks_mut(c).enumerate().for_each(|(i, yi)| {
        yi.fill(0.0);
        for p in x[i * hw * c..(i + 1) * hw * c].chunks_exact(c) {
            for (a, v) in yi.iter_mut().zip(p) {
                *a += v.to_f32();
            }
        }
        let s = 1.0 / hw as f32;
        yi.iter_mut().for_each(|v| *v *= s);
    });
    debug_assert_eq!(y.len(), n * c);
}

/// Global average pooling backward, from an f32 `dy` (`[n, c]`). `v / hw` is computed in f32 and
/// rounded once into a bf16 `dx`.
pub fn gap_backward<T: Elem>(dy: &[f32], hw: usize, c: usize, dx: &mut [T]) {
    let s = 1.0 / hw as f32;
    dx.par_chunks_mut(hw * c).enumerate().for_each(|(i, dxi)| {
        let g = &dy[i * c..(i + 1) * c];
        for p in dxi.chunks_exact_mut(c) {
            for (d, v) in p.iter_mut().zip(g) {
                *d = T::from_f32(v * s);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    //! The bf16 instantiations against the f32 ones on the widened inputs: bf16 activations must
    //! be the f32 ones rounded once, indices and f32 outputs must be equal.

    use super::*;
    use crate::cpu::eltwise::tests::{assert_rounded, widen, Lcg};
    use half::bf16;

    /// Overlapping 3x3 windows (stride 2, pad 1) on an odd-sized image, as ResNet's stem.
    const G: PoolGeom = PoolGeom {
        n: 2,
        h: 7,
        w: 6,
        c: 3,
        k: 3,
        stride: 2,
        pad: 1,
    };

    /// Inputs from a few levels, so windows tie and neighbouring windows share a maximum, plus
    /// a NaN that must win its windows. Two equal peaks per channel sit where windows overlap:
    /// (3, 3) wins 4 windows, and (5, 1) ties with it in one window, loses it (first maximum
    /// wins) and wins the other 3, so some inputs gather 3 or 4 gradients.
    fn pool_input(rng: &mut Lcg) -> (Vec<bf16>, Vec<f32>) {
        let len = G.n * G.h * G.w * G.c;
        let mut b: Vec<bf16> = (0..len)
            .map(|_| bf16::from_f32([-1.5, 0.25, 0.75, 1.0][rng.below(4)]))
            .collect();
        for n in 0..G.n {
            for (y, x) in [(3, 3), (5, 1)] {
                for ch in 0..G.c {
                    b[((n * G.h + y) * G.w + x) * G.c + ch] = bf16::from_f32(2.0);
                }
            }
        }
        b[G.h * G.w * G.c + 2 * G.w * G.c + 3 * G.c + 1] = bf16::NAN;
        let f = widen(&b);
        (b, f)
    }

    #[test]
    fn maxpool_forward_bf16_matches_f32_indices_and_values() {
        let mut rng = Lcg::new(20);
        let (xb, xf) = pool_input(&mut rng);
        let out = G.n * G.oh() * G.ow() * G.c;
        let (mut yb, mut ab) = (vec![bf16::ZERO; out], vec![u32::MAX; out]);
        let (mut yf, mut af) = (vec![0.0f32; out], vec![u32::MAX; out]);
        maxpool_forward(&xb, &G, &mut yb, &mut ab);
        maxpool_forward(&xf, &G, &mut yf, &mut af);
        assert_eq!(ab, af);
        assert_rounded(&yb, &yf);
        assert!(yf.iter().any(|v| v.is_nan()), "the NaN must propagate");
        // Ties: some window's maximum is not its only occurrence in that window.
        let mut sorted = af.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert!(sorted.len() < out, "windows should share a maximum");
    }

    #[test]
    fn maxpool_backward_bf16_sums_in_f32_and_rounds_once() {
        let mut rng = Lcg::new(21);
        let (xb, _) = pool_input(&mut rng);
        let out = G.n * G.oh() * G.ow() * G.c;
        let (mut y, mut arg) = (vec![bf16::ZERO; out], vec![0u32; out]);
        maxpool_forward(&xb, &G, &mut y, &mut arg);
        let (dyb, dyf) = rng.bf16_vec(out, -1.0, 1.0);
        let len = xb.len();
        let mut dxb = vec![bf16::from_f32(5.0); len];
        let mut dxf = vec![5.0f32; len];
        maxpool_backward(&dyb, &arg, &G, &mut dxb);
        maxpool_backward(&dyf, &arg, &G, &mut dxf);
        assert_rounded(&dxb, &dxf);
        // The reference: ascending output order, in f32.
        let mut want = vec![0.0f32; len];
        for (d, &a) in dyf.iter().zip(&arg) {
            want[a as usize] += d;
        }
        assert_eq!(dxf, want);
        // Some inputs gather enough gradients that rounding after every addition would differ
        // from rounding the f32 sum once: the test can tell the two apart.
        let mut per_add = vec![bf16::ZERO; len];
        for (d, &a) in dyb.iter().zip(&arg) {
            per_add[a as usize] = bf16::from_f32(per_add[a as usize].to_f32() + d.to_f32());
        }
        assert!(per_add.iter().zip(&dxb).any(|(p, d)| p != d));
    }

    #[test]
    fn gap_bf16_matches_f32() {
        let mut rng = Lcg::new(22);
        let (n, hw, c) = (3, 10, 4);
        let (xb, xf) = rng.bf16_vec(n * hw * c, -2.0, 2.0);
        let (mut yb, mut yf) = (vec![0.0f32; n * c], vec![1.0f32; n * c]);
        gap_forward(&xb, n, hw, c, &mut yb);
        gap_forward(&xf, n, hw, c, &mut yf);
        assert_eq!(yb, yf);

        let dy: Vec<f32> = (0..n * c).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut dxb = vec![bf16::ZERO; n * hw * c];
        let mut dxf = vec![0.0f32; n * hw * c];
        gap_backward(&dy, hw, c, &mut dxb);
        gap_backward(&dy, hw, c, &mut dxf);
        assert_rounded(&dxb, &dxf);
        assert!(dxf.iter().any(|v| bf16::from_f32(*v).to_f32() != *v));
    }
}

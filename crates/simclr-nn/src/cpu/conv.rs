//! 2-D convolution on channels-last (NHWC) tensors as im2col + GEMM, in chunks of images so the
//! column buffer stays small.
//!
//! Weights are `[out, kh, kw, in]` (OHWI) so that one im2col row, the `kh x kw x in` patch of an
//! output pixel, is a run of contiguous input channels.

use rayon::prelude::*;

use super::gemm::{matmul, Mat, Par};
use super::winograd;
use super::REDUCE_GROUPS;

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    /// Batch size.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes).
    pub pad: usize,
}

impl ConvGeom {
    /// Output height.
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }

    /// Output width.
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }

    /// Length of one im2col row.
    pub fn k(&self) -> usize {
        self.kh * self.kw * self.cin
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Images per chunk: enough rows that the weight-gradient GEMM (whose inner dimension is
    /// the rows) amortises reading and writing dW, few enough that the column buffer stays
    /// near the last-level cache (about 8 MB).
    fn chunk_images(&self) -> usize {
        let rows_per_image = self.oh() * self.ow();
        let target_rows = (1 << 21) / self.k().max(1);
        (target_rows.clamp(256, 8192) / rows_per_image.max(1)).clamp(1, self.n.max(1))
    }

    /// Groups of images whose weight gradients are summed separately, then added in order. The
    /// count depends on the problem only, never on the thread count, so results are
    /// reproducible; each group gets at least a chunk's worth of rows.
    fn reduce_groups(&self) -> usize {
        (self.n / self.chunk_images()).clamp(1, REDUCE_GROUPS)
    }
}

fn im2col(x: &[f32], g: &ConvGeom, images: usize, col: &mut [f32]) {
    let (oh, ow, k) = (g.oh(), g.ow(), g.k());
    let cin = g.cin;
    for img in 0..images {
        let xi = &x[img * g.h * g.w * cin..(img + 1) * g.h * g.w * cin];
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &mut col[((img * oh + oy) * ow + ox) * k..][..k];
                for ky in 0..g.kh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    let dst = &mut row[ky * g.kw * cin..(ky + 1) * g.kw * cin];
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src_row = &xi[iy as usize * g.w * cin..(iy as usize + 1) * g.w * cin];
                    for kx in 0..g.kw {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        let d = &mut dst[kx * cin..(kx + 1) * cin];
                        if ix < 0 || ix >= g.w as isize {
                            d.fill(0.0);
                        } else {
                            d.copy_from_slice(&src_row[ix as usize * cin..(ix as usize + 1) * cin]);
                        }
                    }
                }
            }
        }
    }
}

fn col2im_add(col: &[f32], g: &ConvGeom, images: usize, dx: &mut [f32]) {
    let (oh, ow, k) = (g.oh(), g.ow(), g.k());
    let cin = g.cin;
    for img in 0..images {
        let xi = &mut dx[img * g.h * g.w * cin..(img + 1) * g.h * g.w * cin];
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &col[((img * oh + oy) * ow + ox) * k..][..k];
                for ky in 0..g.kh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    for kx in 0..g.kw {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix < 0 || ix >= g.w as isize {
                            continue;
                        }
                        let s = &row[(ky * g.kw + kx) * cin..][..cin];
                        let d = &mut xi[(iy as usize * g.w + ix as usize) * cin..][..cin];
                        for (d, s) in d.iter_mut().zip(s) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv(x, w)`; `x` is `[n, h, w, cin]`, `w` `[cout, kh, kw, cin]`, `y` `[n, oh, ow, cout]`.
pub fn conv2d_forward(x: &[f32], w: &[f32], g: &ConvGeom, y: &mut [f32]) {
    if winograd::applies(g) {
        winograd::conv3x3_forward(x, w, g, y);
        return;
    }
    let (k, rows_per_image) = (g.k(), g.oh() * g.ow());
    let ci = g.chunk_images();
    let wt = Mat::row_major(w, g.cout, k).t();
    let in_img = g.h * g.w * g.cin;
    let out_img = rows_per_image * g.cout;
    x.par_chunks(ci * in_img)
        .zip(y.par_chunks_mut(ci * out_img))
        .for_each_init(
            || {
                vec![
                    0.0f32;
                    if g.pointwise() {
                        0
                    } else {
                        ci * rows_per_image * k
                    }
                ]
            },
            |col, (xc, yc)| {
                let images = xc.len() / in_img;
                let rows = images * rows_per_image;
                let a = if g.pointwise() {
                    Mat::row_major(xc, rows, k)
                } else {
                    im2col(xc, g, images, col);
                    Mat::row_major(&col[..rows * k], rows, k)
                };
                matmul(a, wt, yc, false, Par::Seq);
            },
        );
}

/// The kernel of the transposed convolution: `w'[ci, ky, kx, co] = w[co, kh-1-ky, kw-1-kx, ci]`.
fn flipped_transposed(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    let mut t = vec![0.0f32; w.len()];
    for co in 0..g.cout {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                for ci in 0..g.cin {
                    let src = ((co * g.kh + ky) * g.kw + kx) * g.cin + ci;
                    let dst =
                        ((ci * g.kh + (g.kh - 1 - ky)) * g.kw + (g.kw - 1 - kx)) * g.cout + co;
                    t[dst] = w[src];
                }
            }
        }
    }
    t
}

/// Gradients of a convolution: `dw` (`[cout, kh, kw, cin]`) is overwritten with dL/dw, and `dx`,
/// when given, with dL/dx.
pub fn conv2d_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    dw: &mut [f32],
    mut dx: Option<&mut [f32]>,
) {
    // With stride 1, dL/dx is a plain convolution of dy with the flipped, transposed kernel:
    // one GEMM as efficient as the forward pass's (inner dimension kh*kw*cout rather than cout)
    // and no scatter-add.
    if g.stride == 1 && g.pad < g.kh && g.pad < g.kw && g.kh == g.kw {
        if let Some(dx) = dx.take() {
            let gt = ConvGeom {
                n: g.n,
                h: g.oh(),
                w: g.ow(),
                cin: g.cout,
                cout: g.cin,
                kh: g.kh,
                kw: g.kw,
                stride: 1,
                pad: g.kh - 1 - g.pad,
            };
            debug_assert_eq!((gt.oh(), gt.ow()), (g.h, g.w));
            conv2d_forward(dy, &flipped_transposed(w, g), &gt, dx);
        }
    }
    if winograd::applies(g) {
        // dx, when asked for, was computed above (pad 1 stays pad 1, so it ran Winograd too).
        debug_assert!(dx.is_none());
        winograd::conv3x3_weight_grad(x, dy, g, dw);
        return;
    }
    let (k, rows_per_image) = (g.k(), g.oh() * g.ow());
    let ci = g.chunk_images();
    let in_img = g.h * g.w * g.cin;
    let out_img = rows_per_image * g.cout;
    let wm = Mat::row_major(w, g.cout, k);
    if let Some(dx) = dx.as_deref_mut() {
        dx.fill(0.0);
    }
    // Fixed groups of images, each summing its own dW, so the reduction order does not depend on
    // the number of threads: runs are reproducible on any machine.
    let groups = g.reduce_groups();
    let per_group = g.n.div_ceil(groups);
    let mut dx_groups: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => dx.chunks_mut(per_group * in_img).map(Some).collect(),
        None => (0..g.n.div_ceil(per_group)).map(|_| None).collect(),
    };
    let partials: Vec<Vec<f32>> = x
        .par_chunks(per_group * in_img)
        .zip(dy.par_chunks(per_group * out_img))
        .zip(dx_groups.par_iter_mut())
        .map(|((xg, dyg), dxg)| {
            let mut dw_part = vec![0.0f32; g.cout * k];
            let mut col = vec![
                0.0f32;
                if g.pointwise() {
                    0
                } else {
                    ci * rows_per_image * k
                }
            ];
            let mut dcol = vec![
                0.0f32;
                if g.pointwise() {
                    0
                } else {
                    ci * rows_per_image * k
                }
            ];
            let images_g = xg.len() / in_img;
            let mut start = 0;
            while start < images_g {
                let images = ci.min(images_g - start);
                let rows = images * rows_per_image;
                let xc = &xg[start * in_img..(start + images) * in_img];
                let dyc = Mat::row_major(
                    &dyg[start * out_img..(start + images) * out_img],
                    rows,
                    g.cout,
                );
                let a = if g.pointwise() {
                    Mat::row_major(xc, rows, k)
                } else {
                    im2col(xc, g, images, &mut col);
                    Mat::row_major(&col[..rows * k], rows, k)
                };
                matmul(dyc.t(), a, &mut dw_part, true, Par::Seq);
                if let Some(dxg) = dxg.as_deref_mut() {
                    let dxc = &mut dxg[start * in_img..(start + images) * in_img];
                    if g.pointwise() {
                        matmul(dyc, wm, dxc, false, Par::Seq);
                    } else {
                        matmul(dyc, wm, &mut dcol[..rows * k], false, Par::Seq);
                        col2im_add(&dcol[..rows * k], g, images, dxc);
                    }
                }
                start += images;
            }
            dw_part
        })
        .collect();
    dw.fill(0.0);
    for p in &partials {
        for (d, s) in dw.iter_mut().zip(p) {
            *d += s;
        }
    }
}

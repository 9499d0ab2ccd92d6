//! The passes' fast path: each pass as f64 matrix products (the `gemm` crate) over im2col
//! matrices, on the same dense NCHW / KCRS f64 copies the direct loops of the parent module
//! take.
//!
//! For one group, with `j = (c, t)` a local input channel and a filter tap (the filter's own
//! storage position, so flipping for `CUDNN_CONVOLUTION` is done by where a value lands) and
//! `p` an output position, `col[j][p]` is the input value that tap `t` reads for output `p`,
//! or 0 where it falls in the padding. Then
//!
//! - forward: `y[k][p] = sum_j w[k][j] col[j][p]`;
//! - backward data: `dcol[j][p] = sum_k w[k][j] dy[k][p]`, and `dx` is the sum of `dcol` over
//!   the positions each input value was gathered to (col2im), padding dropped;
//! - backward filter: `dw[k][j] = sum_(n, p) dy[n][k][p] col_n[j][p]`.
//!
//! These are the direct loops' products, summed in f64 in another order. The only products
//! added that the direct loops skip are the padding's zeros times a filter value (forward) or
//! an output gradient (backward filter), which change nothing unless that value is infinite
//! or NaN: the parent module sends those cases to the direct loops.
//!
//! Work is split by images: each thread takes a contiguous range of images (so its share of
//! `y` or `dx` is its own) and walks it in blocks of up to [`BLOCK_BYTES`] of im2col matrix,
//! several small images or part of a large one per block, so that one product covers many
//! output positions (the filter is packed once per block, not once per small image).

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use gemm::Parallelism;

use super::Geom;

/// Most bytes of one thread's im2col block: large enough that products amortise packing
/// the filter, small enough to stay in a core's L2/L3 share with a few threads running.
const BLOCK_BYTES: usize = 4 << 20;

/// Below this many multiply-adds a pass runs on the calling thread alone: starting threads
/// costs more than it saves.
const SERIAL_WORK: usize = 1 << 18;

/// A run of output positions `p0..p0 + len` (in an OH x OW plane) of image `n`, at columns
/// `col..col + len` of a block.
#[derive(Clone, Copy, Debug)]
struct Seg {
    n: usize,
    p0: usize,
    len: usize,
    col: usize,
}

/// A pass's sizes, and for each filter row (column) the output rows (columns) whose input
/// row (column) is inside the input.
struct Plan {
    g: Geom,
    cpg: usize,
    kpg: usize,
    rs: usize,
    crs: usize,
    hw: usize,
    ohw: usize,
    /// Columns per block.
    cap: usize,
    /// `(r, s, t)`: each filter position and the offset, in an R x S plane, of its tap.
    taps: Vec<(usize, usize, usize)>,
    oh_in: Vec<Range<usize>>,
    ow_in: Vec<Range<usize>>,
}

/// The outputs `o` in `0..outs` with `o * stride + f * dil - pad` in `0..len`: contiguous,
/// as the input index grows with `o`.
fn inside(outs: usize, f: usize, stride: i64, dil: i64, pad: i64, len: usize) -> Range<usize> {
    let ok = |o: usize| {
        let i = o as i64 * stride + f as i64 * dil - pad;
        i >= 0 && (i as usize) < len
    };
    let lo = (0..outs).find(|&o| ok(o)).unwrap_or(outs);
    let hi = (lo..outs).find(|&o| !ok(o)).unwrap_or(outs);
    lo..hi
}

impl Plan {
    fn new(g: &Geom) -> Plan {
        let (cpg, kpg, rs) = (g.cpg(), g.kpg(), g.r * g.s);
        let crs = cpg * rs;
        let taps = (0..g.r)
            .flat_map(|r| (0..g.s).map(move |s| (r, s)))
            .map(|(r, s)| {
                let (fr, fs) = if g.flip {
                    (g.r - 1 - r, g.s - 1 - s)
                } else {
                    (r, s)
                };
                (r, s, fr * g.s + fs)
            })
            .collect();
        Plan {
            g: *g,
            cpg,
            kpg,
            rs,
            crs,
            hw: g.h * g.w,
            ohw: g.oh * g.ow,
            cap: (BLOCK_BYTES / (8 * crs.max(kpg))).max(1),
            taps,
            oh_in: (0..g.r)
                .map(|r| inside(g.oh, r, g.sh, g.dh, g.ph, g.h))
                .collect(),
            ow_in: (0..g.s)
                .map(|s| inside(g.ow, s, g.sw, g.dw, g.pw, g.w))
                .collect(),
        }
    }

    /// Whether every tap of every output position reads inside the input (no padding read):
    /// then im2col matrices hold no zeros of their own.
    pub(super) fn all_inside(&self) -> bool {
        let g = &self.g;
        self.oh_in.iter().all(|r| *r == (0..g.oh)) && self.ow_in.iter().all(|r| *r == (0..g.ow))
    }

    /// The blocks of `images`, in order, each with its width: runs of output positions
    /// filling up to `cap` columns each; and the widest block's width, which sizes a thread's
    /// buffers (no larger than its images need).
    fn blocks(&self, images: Range<usize>) -> (Vec<(Vec<Seg>, usize)>, usize) {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut used = 0;
        for n in images {
            let mut p0 = 0;
            while p0 < self.ohw {
                let len = (self.ohw - p0).min(self.cap - used);
                cur.push(Seg {
                    n,
                    p0,
                    len,
                    col: used,
                });
                used += len;
                p0 += len;
                if used == self.cap {
                    out.push((std::mem::take(&mut cur), used));
                    used = 0;
                }
            }
        }
        if !cur.is_empty() {
            out.push((cur, used));
        }
        let widest = out.iter().map(|b| b.1).max().unwrap_or(0);
        (out, widest)
    }

    /// Calls `f(oh, ows, off)` for each output row a segment touches: `ows` its columns in
    /// the segment, `off` the segment offset of `(oh, ows.start)`.
    fn rows(&self, seg: &Seg, mut f: impl FnMut(usize, Range<usize>, usize)) {
        let ow = self.g.ow;
        let end = seg.p0 + seg.len;
        let mut p = seg.p0;
        while p < end {
            let (oh, a) = (p / ow, p % ow);
            let b = ow.min(a + end - p);
            f(oh, a..b, p - seg.p0);
            p += b - a;
        }
    }

    /// For filter position (r, s) and output row `oh` with columns `ows`: the columns whose
    /// input is inside (a subrange of `ows`), the input offset in an H x W plane of the
    /// first of them, and the step between inputs of consecutive columns. None when the row
    /// reads only padding.
    fn span(
        &self,
        r: usize,
        s: usize,
        oh: usize,
        ows: &Range<usize>,
    ) -> Option<(Range<usize>, usize, usize)> {
        let g = &self.g;
        if !self.oh_in[r].contains(&oh) {
            return None;
        }
        let inn = &self.ow_in[s];
        let (a, b) = (ows.start.max(inn.start), ows.end.min(inn.end));
        if a >= b {
            return None;
        }
        let ih = oh as i64 * g.sh + r as i64 * g.dh - g.ph;
        let iw = a as i64 * g.sw + s as i64 * g.dw - g.pw;
        Some((a..b, ih as usize * g.w + iw as usize, g.sw as usize))
    }

    /// Fills the block's im2col matrix (`crs` rows of `ld` columns) for group `grp` from x.
    fn im2col(&self, x: &[f64], grp: usize, block: &[Seg], ld: usize, col: &mut [f64]) {
        let g = &self.g;
        for c in 0..self.cpg {
            for &(r, s, t) in &self.taps {
                let row = &mut col[(c * self.rs + t) * ld..][..ld];
                for seg in block {
                    let xp = &x[(seg.n * g.c + grp * self.cpg + c) * self.hw..][..self.hw];
                    let dst = &mut row[seg.col..][..seg.len];
                    self.rows(seg, |oh, ows, off| {
                        let d = &mut dst[off..][..ows.len()];
                        let Some((inn, i0, step)) = self.span(r, s, oh, &ows) else {
                            d.fill(0.0);
                            return;
                        };
                        let (a, b) = (inn.start - ows.start, inn.end - ows.start);
                        d[..a].fill(0.0);
                        d[b..].fill(0.0);
                        let d = &mut d[a..b];
                        if step == 1 {
                            d.copy_from_slice(&xp[i0..][..d.len()]);
                        } else {
                            for (v, &e) in d.iter_mut().zip(xp[i0..].iter().step_by(step)) {
                                *v = e;
                            }
                        }
                    });
                }
            }
        }
    }

    /// Adds the block's `dcol` (`crs` rows of `ld` columns) for group `grp` into `dx`, whose
    /// first image is `n0`; what lands in the padding is dropped.
    fn col2im(
        &self,
        dcol: &[f64],
        grp: usize,
        block: &[Seg],
        ld: usize,
        dx: &mut [f64],
        n0: usize,
    ) {
        let g = &self.g;
        for c in 0..self.cpg {
            for &(r, s, t) in &self.taps {
                let row = &dcol[(c * self.rs + t) * ld..][..ld];
                for seg in block {
                    let plane = (seg.n - n0) * g.c + grp * self.cpg + c;
                    let xp = &mut dx[plane * self.hw..][..self.hw];
                    let src = &row[seg.col..][..seg.len];
                    self.rows(seg, |oh, ows, off| {
                        let Some((inn, i0, step)) = self.span(r, s, oh, &ows) else {
                            return;
                        };
                        let src = &src[off + inn.start - ows.start..][..inn.len()];
                        if step == 1 {
                            for (e, &v) in xp[i0..][..src.len()].iter_mut().zip(src) {
                                *e += v;
                            }
                        } else {
                            for (e, &v) in xp[i0..].iter_mut().step_by(step).zip(src) {
                                *e += v;
                            }
                        }
                    });
                }
            }
        }
    }

    /// Copies the block's output gradients for group `grp` into `dyc` (`kpg` rows of `ld`
    /// columns), from dense NKPQ `dy`.
    fn gather_dy(&self, dy: &[f64], grp: usize, block: &[Seg], ld: usize, dyc: &mut [f64]) {
        for k in 0..self.kpg {
            for seg in block {
                let plane = seg.n * self.g.k + grp * self.kpg + k;
                dyc[k * ld + seg.col..][..seg.len]
                    .copy_from_slice(&dy[plane * self.ohw + seg.p0..][..seg.len]);
            }
        }
    }

    /// The threads a pass of `work` multiply-adds uses: contiguous image ranges, one per
    /// thread, and the parallelism of each product. Images are the unit so that threads own
    /// disjoint outputs; a batch smaller than the thread count runs its products in parallel
    /// instead.
    fn split(&self, work: usize) -> (Vec<Range<usize>>, Parallelism) {
        let n = self.g.n;
        let threads = cores();
        if threads <= 1 || work < SERIAL_WORK {
            return (std::iter::once(0..n).collect(), Parallelism::None);
        }
        if n < threads {
            return (std::iter::once(0..n).collect(), Parallelism::Rayon(threads));
        }
        let per = n.div_ceil(threads);
        let ranges = (0..n).step_by(per).map(|a| a..(a + per).min(n)).collect();
        (ranges, Parallelism::None)
    }
}

/// The threads of rayon's pool, which runs the passes' shares and gemm's parallel products.
fn cores() -> usize {
    rayon::current_num_threads()
}

thread_local! {
    /// A pool thread's scratch (im2col blocks, products), kept between calls: allocating and
    /// zeroing megabytes per call cost as much as the products of a small layer.
    static SCRATCH: RefCell<[Vec<f64>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` with two scratch buffers of `a` and `b` values, contents unspecified (each user
/// writes what it reads).
fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f64], &mut [f64]) -> R) -> R {
    let run = |bufs: &mut [Vec<f64>; 2]| {
        let [x, y] = bufs;
        for (v, n) in [(&mut *x, a), (&mut *y, b)] {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
        f(&mut x[..a], &mut y[..b])
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => run(&mut bufs),
        // Only if a pass ever ran inside another on this thread: fresh buffers then.
        Err(_) => run(&mut [Vec::new(), Vec::new()]),
    })
}

/// A matrix view: `rows x cols` values of `data`, element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f64],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Mat<'_> {
    fn last(&self) -> usize {
        (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
    }
}

/// `dst = a b`, or `dst += a b` with `acc`; `dst` row-major with rows `ld` apart.
fn matmul(a: Mat, b: Mat, dst: &mut [f64], ld: usize, acc: bool, par: Parallelism) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(k, b.rows, "inner dimensions");
    assert!(m > 0 && n > 0 && k > 0, "empty product");
    // The views' and the output's last elements inside their slices: every element is then.
    assert!(a.last() < a.data.len() && b.last() < b.data.len());
    assert!((m - 1) * ld + n <= dst.len());
    // SAFETY: all three ranges are inside their slices (checked above), and `dst` is borrowed
    // mutably, so nothing it points into is read through `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Splits `out` (images of `per_image` values) by `ranges` and runs `f(range, part)` for each
/// on rayon's pool (on the calling thread for a single range); the results in range order.
fn per_range<R: Send>(
    out: &mut [f64],
    per_image: usize,
    ranges: &[Range<usize>],
    f: impl Fn(Range<usize>, &mut [f64]) -> R + Sync,
) -> Vec<R> {
    if ranges.len() == 1 {
        return vec![f(ranges[0].clone(), out)];
    }
    let mut parts = Vec::with_capacity(ranges.len());
    let mut rest = out;
    for r in ranges {
        let (part, tail) = rest.split_at_mut(r.len() * per_image);
        parts.push((r.clone(), part));
        rest = tail;
    }
    parts.into_par_iter().map(|(r, part)| f(r, part)).collect()
}

/// Forward: y (dense NKPQ) from x (NCHW) and w (KCRS).
pub(super) fn forward(g: &Geom, x: &[f64], w: &[f64]) -> Vec<f64> {
    let pl = Plan::new(g);
    let (kpg, crs, ohw) = (pl.kpg, pl.crs, pl.ohw);
    let mut y = vec![0.0; g.n * g.k * ohw];
    let (ranges, par) = pl.split(g.n * g.k * crs * ohw);
    per_range(&mut y, g.k * ohw, &ranges, |images, out| {
        let n0 = images.start;
        let (blocks, widest) = pl.blocks(images);
        with_scratch(crs * widest, kpg * widest, |col, tmp| {
            for (block, ld) in &blocks {
                let (block, ld) = (&block[..], *ld);
                for grp in 0..g.groups {
                    pl.im2col(x, grp, block, ld, col);
                    let wg = Mat {
                        data: &w[grp * kpg * crs..][..kpg * crs],
                        rows: kpg,
                        cols: crs,
                        rs: crs,
                        cs: 1,
                    };
                    let cm = Mat {
                        data: col,
                        rows: crs,
                        cols: ld,
                        rs: ld,
                        cs: 1,
                    };
                    matmul(wg, cm, tmp, ld, false, par);
                    for seg in block {
                        for k in 0..kpg {
                            let plane = (seg.n - n0) * g.k + grp * kpg + k;
                            out[plane * ohw + seg.p0..][..seg.len]
                                .copy_from_slice(&tmp[k * ld + seg.col..][..seg.len]);
                        }
                    }
                }
            }
        });
    });
    y
}

/// Backward data: dx (dense NCHW) from w (KCRS) and dy (NKPQ).
pub(super) fn backward_data(g: &Geom, w: &[f64], dy: &[f64]) -> Vec<f64> {
    let pl = Plan::new(g);
    let (kpg, crs, ohw) = (pl.kpg, pl.crs, pl.ohw);
    let mut dx = vec![0.0; g.n * g.c * pl.hw];
    let (ranges, par) = pl.split(g.n * g.k * crs * ohw);
    per_range(&mut dx, g.c * pl.hw, &ranges, |images, out| {
        let n0 = images.start;
        let (blocks, widest) = pl.blocks(images);
        with_scratch(kpg * widest, crs * widest, |dyc, dcol| {
            for (block, ld) in &blocks {
                let (block, ld) = (&block[..], *ld);
                for grp in 0..g.groups {
                    pl.gather_dy(dy, grp, block, ld, dyc);
                    // The group's filter transposed: element (j, k) is w[k][j].
                    let wt = Mat {
                        data: &w[grp * kpg * crs..][..kpg * crs],
                        rows: crs,
                        cols: kpg,
                        rs: 1,
                        cs: crs,
                    };
                    let dm = Mat {
                        data: dyc,
                        rows: kpg,
                        cols: ld,
                        rs: ld,
                        cs: 1,
                    };
                    matmul(wt, dm, dcol, ld, false, par);
                    pl.col2im(dcol, grp, block, ld, out, n0);
                }
            }
        });
    });
    dx
}

/// Backward filter: dw (dense KCRS) from x (NCHW) and dy (NKPQ). Each thread sums its images
/// into its own copy; the copies are added in thread order, so a result depends on the
/// host's core count only through f64 summation order.
pub(super) fn backward_filter(g: &Geom, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let pl = Plan::new(g);
    let (kpg, crs, ohw) = (pl.kpg, pl.crs, pl.ohw);
    let (ranges, par) = pl.split(g.n * g.k * crs * ohw);
    let parts = per_range(&mut [], 0, &ranges, |images, _| {
        let (blocks, widest) = pl.blocks(images);
        let mut dw = vec![0.0; g.k * crs];
        with_scratch(crs * widest, kpg * widest, |col, dyc| {
            for (block, ld) in &blocks {
                let (block, ld) = (&block[..], *ld);
                for grp in 0..g.groups {
                    pl.im2col(x, grp, block, ld, col);
                    pl.gather_dy(dy, grp, block, ld, dyc);
                    let dm = Mat {
                        data: dyc,
                        rows: kpg,
                        cols: ld,
                        rs: ld,
                        cs: 1,
                    };
                    // The im2col matrix transposed: element (p, j) is col[j][p].
                    let ct = Mat {
                        data: col,
                        rows: ld,
                        cols: crs,
                        rs: 1,
                        cs: ld,
                    };
                    matmul(dm, ct, &mut dw[grp * kpg * crs..], crs, true, par);
                }
            }
        });
        dw
    });
    let mut parts = parts.into_iter();
    let mut dw = parts.next().unwrap_or_default();
    for p in parts {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}

/// Whether the fast path computes exactly the direct loops' set of products for this pass's
/// operand `v` (the filter for forward, dy for backward filter): unless padding is read,
/// or `v` is all finite, the extra zero products add nothing.
pub(super) fn zero_products_harmless(g: &Geom, v: &[f64]) -> bool {
    Plan::new(g).all_inside() || v.iter().all(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::super::{Compute, CUDNN_DATA_FLOAT, CUDNN_FMA_MATH};
    use super::*;
    use crate::numeric::Elem;

    /// A geometry with dense NCHW strides (the passes see only dense copies).
    #[allow(clippy::type_complexity)]
    fn geom(
        (n, c, h, w): (usize, usize, usize, usize),
        (k, r, s): (usize, usize, usize),
        (ph, pw, sh, sw, dh, dw): (i64, i64, i64, i64, i64, i64),
        groups: usize,
        flip: bool,
    ) -> Geom {
        let out = |len: usize, f: usize, p: i64, st: i64, d: i64| {
            ((len as i64 + 2 * p - (f as i64 - 1) * d - 1) / st + 1) as usize
        };
        let (oh, ow) = (out(h, r, ph, sh, dh), out(w, s, pw, sw, dw));
        Geom {
            n,
            c,
            h,
            w,
            k,
            r,
            s,
            oh,
            ow,
            ph,
            pw,
            sh,
            sw,
            dh,
            dw,
            groups,
            flip,
            dtype: CUDNN_DATA_FLOAT,
            elem: Elem::F32,
            math: CUDNN_FMA_MATH,
            x_strides: [c * h * w, h * w, w, 1],
            y_strides: [k * oh * ow, oh * ow, ow, 1],
            w_strides: [c / groups * r * s, r * s, s, 1],
        }
    }

    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut st = seed;
        (0..len)
            .map(|_| {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (st >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                "{what}: element {i}: {x} vs {y}"
            );
        }
    }

    /// Geometries that exercise each part: padding on one side only, strides, dilations,
    /// groups, flips, rectangular filters, blocks that split an image (`cap` below its
    /// plane), batches below and above the thread count.
    fn cases() -> Vec<Geom> {
        vec![
            geom((2, 3, 9, 8), (4, 3, 3), (2, 2, 2, 2, 2, 2), 1, false),
            geom((2, 4, 6, 7), (6, 2, 3), (1, 0, 1, 1, 1, 1), 2, true),
            geom((1, 2, 8, 8), (3, 3, 3), (1, 1, 1, 1, 1, 1), 1, false),
            geom((5, 6, 7, 5), (6, 1, 1), (0, 0, 2, 1, 1, 1), 3, false),
            geom((7, 4, 5, 9), (4, 3, 2), (0, 3, 1, 3, 2, 1), 4, true),
            geom((33, 8, 6, 6), (16, 3, 3), (1, 1, 2, 2, 1, 1), 1, false),
            geom((3, 2, 40, 30), (2, 5, 5), (2, 2, 1, 1, 1, 1), 1, true),
            geom((1, 64, 70, 70), (8, 3, 3), (1, 1, 1, 1, 1, 1), 1, false),
        ]
    }

    #[test]
    fn fast_path_computes_the_direct_loops_sums() {
        for (i, g) in cases().into_iter().enumerate() {
            let c = Compute { g };
            let x = values(g.n * g.c * g.h * g.w, 1 + i as u64);
            let w = values(g.k * g.cpg() * g.r * g.s, 2 + i as u64);
            let dy = values(g.n * g.k * g.oh * g.ow, 3 + i as u64);
            close(&forward(&g, &x, &w), &c.forward_direct(&x, &w), "forward");
            close(
                &backward_data(&g, &w, &dy),
                &c.backward_data_direct(&w, &dy),
                "backward data",
            );
            close(
                &backward_filter(&g, &x, &dy),
                &c.backward_filter_direct(&x, &dy),
                "backward filter",
            );
        }
    }

    #[test]
    fn the_last_case_splits_images_into_blocks() {
        let g = *cases().last().unwrap();
        let pl = Plan::new(&g);
        assert!(pl.cap < pl.ohw, "cap {} plane {}", pl.cap, pl.ohw);
    }

    #[test]
    fn infinities_met_with_padding_take_the_direct_loops() {
        // An infinite filter tap that some output meets only in the padding: the direct loop
        // skips it there (finite), a zero times it would be NaN.
        let g = geom((1, 1, 4, 4), (1, 3, 3), (1, 1, 1, 1, 1, 1), 1, false);
        let c = Compute { g };
        let x = values(16, 7);
        let mut w = values(9, 8);
        w[0] = f64::INFINITY;
        let y = c.forward(&x, &w);
        assert_eq!(
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            c.forward_direct(&x, &w)
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        );
        assert!(y[0].is_finite() && y[15].is_infinite());
        let mut dy = values(16, 9);
        dy[0] = f64::NAN;
        let dw = c.backward_filter(&x, &dy);
        // Tap (0, 0) meets output (0, 0) only in the padding: finite, as in the direct loop;
        // tap (2, 2) meets it inside.
        assert!(dw[0].is_finite() && dw[8].is_nan());
        assert!(!zero_products_harmless(&g, &dy));
    }
}

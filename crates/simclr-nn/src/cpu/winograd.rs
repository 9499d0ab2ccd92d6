//! Winograd F(2x2, 3x3) convolution (Lavin & Gray, 2016) for 3x3, stride-1, pad-1 layers on
//! channels-last (NHWC) tensors: 16 multiplies per 2x2 output tile and channel pair instead of
//! 36, so the GEMM work of the im2col path shrinks 2.25x.
//!
//! The output is cut into 2x2 tiles (`ceil(oh/2) x ceil(ow/2)` per image); each reads the 4x4
//! input patch around it, zeros outside the image, and writes only the outputs that exist. Per
//! chunk of images:
//!
//! - the input transform `V = B^T d B` turns every patch into 16 values (`xi = 0..16`) per input
//!   channel, stored `[tile, xi, cin]`, so one patch's outputs are contiguous (the transform
//!   vectorises across channels and images can be transformed in parallel);
//! - 16 GEMMs `M_xi [tiles, cout] = V_xi [tiles, cin] x U_xi [cin, cout]`, where `U = G g G^T`
//!   is the transformed kernel, computed once per call; the 16 are independent, so they also
//!   run in parallel when a problem has few chunks (small images, many channels);
//! - the output transform `Y = A^T M A` gives the 2x2 tile.
//!
//! The weight gradient runs the same transforms backwards: `dM = A dY A^T` per tile,
//! `dU_xi += dM_xi^T V_xi` summed over chunks, then `dW = G^T dU G`.
//!
//! Chunks are sized so `V` and `M` stay a couple of megabytes (in the last-level cache) while
//! the GEMMs keep enough rows to run near peak. Every size that affects the order of a sum
//! depends on the problem only, never on the thread count, so results are bit-for-bit
//! reproducible. The transformed tensors live in a small pool of buffers kept between calls
//! (see `Scratch`).

use std::sync::Mutex;

use rayon::prelude::*;

use super::conv::ConvGeom;
use super::gemm::{matmul, Mat, Par};
use super::REDUCE_GROUPS;

/// Channels handled together by the transforms: one AVX2 register of f32.
const LANES: usize = 8;

/// Bytes of transformed input and output (`V` and `M`) one chunk aims for: a couple of MB,
/// well inside the last-level cache, so the transforms and GEMMs of a chunk pass the data
/// between them through the cache.
const CHUNK_BYTES: usize = 2 << 20;

/// Floats added to the row strides of the transformed tensors. Unpadded, those strides are
/// often multiples of 4 KiB (16 x 64 channels x 4 bytes, or a whole `[tiles, cout]` plane), so
/// the 16 rows that one transform or one GEMM panel touches together fall into the same cache
/// set and evict each other; one extra cache line per row spreads them out.
const SKEW: usize = 16;

/// A row length with the [`SKEW`] added.
fn skewed(len: usize) -> usize {
    len + SKEW
}

/// Fewest tiles in a forward chunk: below this the GEMMs (`tiles` rows) get inefficient.
const MIN_FORWARD_TILES: usize = 256;

/// Fewest tiles in a weight-gradient chunk: the GEMMs' inner dimension, which must amortise
/// reading and writing the `dU` sums (16 x cin x cout).
const MIN_WEIGHT_GRAD_TILES: usize = 256;

/// Most bytes the per-group partial `dU` sums (16 x cin x cout each) may take together: with
/// 512 channels (16 MB each) the weight gradient sums in one group, its parallelism then coming
/// from the 16 GEMMs and the transforms.
const PARTIAL_BYTES: usize = 16 << 20;

/// True when the Winograd kernels apply to `g`: a 3x3 kernel, stride 1, padding 1 (the output
/// is then as large as the input).
pub fn applies(g: &ConvGeom) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1
}

/// How one problem is cut up: tiles, chunks of images, and (weight gradient) reduce groups.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Tile rows and columns per image.
    th: usize,
    tw: usize,
    /// Images per chunk.
    chunk: usize,
    /// Images per reduce group of the weight gradient (a whole number of chunks).
    per_group: usize,
}

impl Plan {
    /// Chunks of about `bytes` of transformed data but at least `min_tiles` tiles, and at most
    /// `partial_bytes` of partial `dU` sums over all reduce groups.
    fn new(g: &ConvGeom, bytes: usize, min_tiles: usize, partial_bytes: usize) -> Self {
        let (th, tw) = (g.oh().div_ceil(2), g.ow().div_ceil(2));
        let tile_bytes = 16 * (g.cin + g.cout) * std::mem::size_of::<f32>();
        let tiles = (bytes / tile_bytes.max(1)).max(min_tiles);
        let chunk = (tiles / (th * tw).max(1)).clamp(1, g.n.max(1));
        let du_bytes = 16 * g.cin * g.cout * std::mem::size_of::<f32>();
        let max_groups = (partial_bytes / du_bytes.max(1)).max(1);
        Self::with_chunk(g, chunk, max_groups)
    }

    /// `chunk` images per chunk, at most `max_groups` reduce groups (also capped by
    /// [`REDUCE_GROUPS`]). Only the problem's sizes go in, never the thread count.
    fn with_chunk(g: &ConvGeom, chunk: usize, max_groups: usize) -> Self {
        let (th, tw) = (g.oh().div_ceil(2), g.ow().div_ceil(2));
        let chunks = g.n.div_ceil(chunk).max(1);
        let groups = chunks.min(REDUCE_GROUPS).min(max_groups).max(1);
        Plan {
            th,
            tw,
            chunk,
            per_group: chunks.div_ceil(groups) * chunk,
        }
    }

    fn forward(g: &ConvGeom) -> Self {
        Self::new(g, CHUNK_BYTES, MIN_FORWARD_TILES, 0)
    }

    fn weight_grad(g: &ConvGeom) -> Self {
        Self::new(g, CHUNK_BYTES, MIN_WEIGHT_GRAD_TILES, PARTIAL_BYTES)
    }

    fn tiles_per_image(&self) -> usize {
        self.th * self.tw
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch buffers kept between calls.
//
// The transformed tensors are megabytes each. Freshly allocated, they are fresh pages from the
// kernel on every call, and freeing them unmaps pages, which costs inter-processor interrupts on
// a virtual machine: together that measured 30-50% of a call at ResNet's 4x4x512 layers. A
// small pool keeps the buffers of recent calls instead, bounded in count and bytes.

/// Most buffers the pool keeps.
const POOL_BUFFERS: usize = 32;

/// Most bytes the pool keeps.
const POOL_BYTES: usize = 256 << 20;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A `len`-long buffer of unspecified contents, back to the pool when dropped.
struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    fn new(len: usize) -> Self {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest buffer that fits, so big ones stay for big requests.
        let best = (0..pool.len())
            .filter(|&i| pool[i].len() >= len)
            .min_by_key(|&i| pool[i].len());
        let buf = match best {
            Some(i) => pool.swap_remove(i),
            None => {
                drop(pool);
                vec![0.0f32; len]
            }
        };
        Scratch { buf, len }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.is_empty() {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(buf);
        // Over the bounds, drop the smallest buffers: the big ones are the costly ones to remake.
        let bytes = |p: &Vec<Vec<f32>>| p.iter().map(|b| b.len() * 4).sum::<usize>();
        while pool.len() > POOL_BUFFERS || bytes(&pool) > POOL_BYTES {
            let smallest = (0..pool.len())
                .min_by_key(|&i| pool[i].len())
                .expect("non-empty");
            pool.swap_remove(smallest);
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

// ---------------------------------------------------------------------------------------------
// The transforms on blocks of `L` channels. Written over fixed-size arrays so LLVM keeps each
// block in vector registers (L = LANES) and the same code serves the channel remainder (L = 1).

/// `B^T d B` for a 4x4 patch `d` (row-major, one `[f32; L]` per position).
#[inline(always)]
fn input_tile<const L: usize>(d: &[[f32; L]; 16]) -> [[f32; L]; 16] {
    // B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], first on the rows...
    let mut t = [[0.0f32; L]; 16];
    for b in 0..4 {
        for l in 0..L {
            let (d0, d1, d2, d3) = (d[b][l], d[4 + b][l], d[8 + b][l], d[12 + b][l]);
            t[b][l] = d0 - d2;
            t[4 + b][l] = d1 + d2;
            t[8 + b][l] = d2 - d1;
            t[12 + b][l] = d1 - d3;
        }
    }
    // ...then on the columns.
    let mut v = [[0.0f32; L]; 16];
    for a in 0..4 {
        for l in 0..L {
            let (t0, t1, t2, t3) = (
                t[4 * a][l],
                t[4 * a + 1][l],
                t[4 * a + 2][l],
                t[4 * a + 3][l],
            );
            v[4 * a][l] = t0 - t2;
            v[4 * a + 1][l] = t1 + t2;
            v[4 * a + 2][l] = t2 - t1;
            v[4 * a + 3][l] = t1 - t3;
        }
    }
    v
}

/// `A^T m A`: the 2x2 output tile (row-major) of a 4x4 product tile.
#[inline(always)]
fn output_tile<const L: usize>(m: &[[f32; L]; 16]) -> [[f32; L]; 4] {
    // A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
    let mut t = [[0.0f32; L]; 8];
    for b in 0..4 {
        for l in 0..L {
            let (m0, m1, m2, m3) = (m[b][l], m[4 + b][l], m[8 + b][l], m[12 + b][l]);
            t[b][l] = m0 + m1 + m2;
            t[4 + b][l] = m1 - m2 - m3;
        }
    }
    let mut y = [[0.0f32; L]; 4];
    for a in 0..2 {
        for l in 0..L {
            let (t0, t1, t2, t3) = (
                t[4 * a][l],
                t[4 * a + 1][l],
                t[4 * a + 2][l],
                t[4 * a + 3][l],
            );
            y[2 * a][l] = t0 + t1 + t2;
            y[2 * a + 1][l] = t1 - t2 - t3;
        }
    }
    y
}

/// `A dy A^T`: the 4x4 gradient of the products from a 2x2 output-gradient tile (the adjoint of
/// [`output_tile`]).
#[inline(always)]
fn output_tile_adjoint<const L: usize>(dy: &[[f32; L]; 4]) -> [[f32; L]; 16] {
    // A = [[1, 0], [1, 1], [1, -1], [0, -1]].
    let mut t = [[0.0f32; L]; 8];
    for b in 0..2 {
        for l in 0..L {
            let (y0, y1) = (dy[b][l], dy[2 + b][l]);
            t[b][l] = y0;
            t[2 + b][l] = y0 + y1;
            t[4 + b][l] = y0 - y1;
            t[6 + b][l] = -y1;
        }
    }
    let mut m = [[0.0f32; L]; 16];
    for a in 0..4 {
        for l in 0..L {
            let (p, q) = (t[2 * a][l], t[2 * a + 1][l]);
            m[4 * a][l] = p;
            m[4 * a + 1][l] = p + q;
            m[4 * a + 2][l] = p - q;
            m[4 * a + 3][l] = -q;
        }
    }
    m
}

/// `G g G^T`: the 4x4 transformed kernel of a 3x3 kernel `g` (row-major).
#[inline(always)]
fn kernel_tile<const L: usize>(g: &[[f32; L]; 9]) -> [[f32; L]; 16] {
    // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
    let mut t = [[0.0f32; L]; 12];
    for b in 0..3 {
        for l in 0..L {
            let (g0, g1, g2) = (g[b][l], g[3 + b][l], g[6 + b][l]);
            t[b][l] = g0;
            t[3 + b][l] = 0.5 * (g0 + g1 + g2);
            t[6 + b][l] = 0.5 * (g0 - g1 + g2);
            t[9 + b][l] = g2;
        }
    }
    let mut u = [[0.0f32; L]; 16];
    for a in 0..4 {
        for l in 0..L {
            let (t0, t1, t2) = (t[3 * a][l], t[3 * a + 1][l], t[3 * a + 2][l]);
            u[4 * a][l] = t0;
            u[4 * a + 1][l] = 0.5 * (t0 + t1 + t2);
            u[4 * a + 2][l] = 0.5 * (t0 - t1 + t2);
            u[4 * a + 3][l] = t2;
        }
    }
    u
}

/// `G^T du G`: the 3x3 kernel gradient from the gradient of the transformed kernel (the adjoint
/// of [`kernel_tile`]).
#[inline(always)]
fn kernel_tile_adjoint<const L: usize>(du: &[[f32; L]; 16]) -> [[f32; L]; 9] {
    // G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]].
    let mut t = [[0.0f32; L]; 12];
    for b in 0..4 {
        for l in 0..L {
            let (u0, u1, u2, u3) = (du[b][l], du[4 + b][l], du[8 + b][l], du[12 + b][l]);
            t[b][l] = u0 + 0.5 * (u1 + u2);
            t[4 + b][l] = 0.5 * (u1 - u2);
            t[8 + b][l] = 0.5 * (u1 + u2) + u3;
        }
    }
    let mut g = [[0.0f32; L]; 9];
    for a in 0..3 {
        for l in 0..L {
            let (t0, t1, t2, t3) = (
                t[4 * a][l],
                t[4 * a + 1][l],
                t[4 * a + 2][l],
                t[4 * a + 3][l],
            );
            g[3 * a][l] = t0 + 0.5 * (t1 + t2);
            g[3 * a + 1][l] = 0.5 * (t1 - t2);
            g[3 * a + 2][l] = 0.5 * (t1 + t2) + t3;
        }
    }
    g
}

/// Applies a transform to `K` input slices and writes its `R` results into `dst`, `LANES`
/// channels at a time (`f8`, vectorised) and the remainder one by one (`f1`, the same
/// transform): `src[k][c]` is channel `c` of input `k`, and result `r` of channel `c` goes to
/// `dst[dst_off[r] + c]`. All inputs are `channels` long.
#[inline(always)]
fn map_channels<const K: usize, const R: usize>(
    src: &[&[f32]; K],
    dst: &mut [f32],
    dst_off: &[usize; R],
    channels: usize,
    f8: impl Fn(&[[f32; LANES]; K]) -> [[f32; LANES]; R],
    f1: impl Fn(&[[f32; 1]; K]) -> [[f32; 1]; R],
) {
    // Checked once here, so the loops below need no per-access checks to be safe in spirit
    // (LLVM still keeps some, but they never fail and predict perfectly).
    assert!(src.iter().all(|s| s.len() >= channels));
    assert!(dst_off.iter().all(|&o| o + channels <= dst.len()));
    let mut c = 0;
    while c + LANES <= channels {
        // Plain loops rather than iterator or `from_fn` chains: everything must inline so the
        // blocks stay in registers instead of being copied through the stack.
        let mut d = [[0.0f32; LANES]; K];
        for k in 0..K {
            d[k].copy_from_slice(&src[k][c..c + LANES]);
        }
        let r = f8(&d);
        for i in 0..R {
            let o = dst_off[i] + c;
            dst[o..o + LANES].copy_from_slice(&r[i]);
        }
        c += LANES;
    }
    while c < channels {
        let mut d = [[0.0f32; 1]; K];
        for k in 0..K {
            d[k][0] = src[k][c];
        }
        let r = f1(&d);
        for i in 0..R {
            dst[dst_off[i] + c] = r[i][0];
        }
        c += 1;
    }
}

/// Offsets `0, stride, 2 * stride, ...`: results stored one after another.
fn strided<const R: usize>(stride: usize) -> [usize; R] {
    std::array::from_fn(|r| r * stride)
}

// ---------------------------------------------------------------------------------------------
// Whole-tensor passes.

/// `U_xi` for every kernel: `w` is `[cout, 3, 3, cin]`, `u` becomes `[cout, 16, cin]` (rows
/// [`skewed`]), so the transform runs along contiguous input channels. `U_xi^T` is then the
/// `[cout, cin]` matrix at offset `xi * cin` with rows `skewed(16 * cin)` apart; `gemm` packs it
/// once per product anyway, so no transpose is needed. Parallel over output channels.
fn transform_kernel(w: &[f32], g: &ConvGeom, u: &mut [f32]) {
    let cin = g.cin;
    u.par_chunks_mut(skewed(16 * cin))
        .zip(w.par_chunks(9 * cin))
        .for_each(|(uk, wk)| {
            let src: [&[f32]; 9] = std::array::from_fn(|k| &wk[k * cin..(k + 1) * cin]);
            map_channels(
                &src,
                uk,
                &strided(cin),
                cin,
                kernel_tile::<LANES>,
                kernel_tile::<1>,
            );
        });
}

/// `V` for the images of `x` (`[images, h, w, cin]`): `v` becomes `[tiles, 16, cin]` (rows
/// [`skewed`]), tiles in image, row, column order. Parallel over images.
fn transform_input(x: &[f32], g: &ConvGeom, p: &Plan, v: &mut [f32]) {
    let (h, w, cin) = (g.h, g.w, g.cin);
    let zeros = vec![0.0f32; cin];
    let zeros = &zeros[..];
    let in_img = h * w * cin;
    let ld = skewed(16 * cin);
    v.par_chunks_mut(p.tiles_per_image() * ld)
        .zip(x.par_chunks(in_img))
        .for_each(|(vi, xi)| {
            for ty in 0..p.th {
                for tx in 0..p.tw {
                    // The 4x4 patch starts one row and column above-left of the tile.
                    let src: [&[f32]; 16] = std::array::from_fn(|k| {
                        let iy = (2 * ty + k / 4).wrapping_sub(1);
                        let ix = (2 * tx + k % 4).wrapping_sub(1);
                        if iy < h && ix < w {
                            &xi[(iy * w + ix) * cin..(iy * w + ix + 1) * cin]
                        } else {
                            zeros
                        }
                    });
                    let t = ty * p.tw + tx;
                    map_channels(
                        &src,
                        &mut vi[t * ld..t * ld + 16 * cin],
                        &strided(cin),
                        cin,
                        input_tile::<LANES>,
                        input_tile::<1>,
                    );
                }
            }
        });
}

/// `y` (`[images, oh, ow, cout]`) from the products `m` (16 planes `[tiles, cout]`, each
/// [`skewed`]). Parallel over images.
fn transform_output(m: &[f32], g: &ConvGeom, p: &Plan, tiles: usize, y: &mut [f32]) {
    let (oh, ow, cout) = (g.oh(), g.ow(), g.cout);
    let tpi = p.tiles_per_image();
    let plane = skewed(tiles * cout);
    y.par_chunks_mut(oh * ow * cout).enumerate().for_each_init(
        || vec![0.0f32; 4 * cout],
        |out, (img, yi)| {
            for ty in 0..p.th {
                for tx in 0..p.tw {
                    let t = img * tpi + ty * p.tw + tx;
                    let src: [&[f32]; 16] = std::array::from_fn(|xi| {
                        &m[xi * plane + t * cout..xi * plane + (t + 1) * cout]
                    });
                    let (oy, ox) = (2 * ty, 2 * tx);
                    if oy + 1 < oh && ox + 1 < ow {
                        // A whole tile: straight into y, two pixels of each of two rows.
                        map_channels(
                            &src,
                            &mut yi[(oy * ow + ox) * cout..],
                            &[0, cout, ow * cout, (ow + 1) * cout],
                            cout,
                            output_tile::<LANES>,
                            output_tile::<1>,
                        );
                        continue;
                    }
                    // On the bottom or right edge of an odd-sized output only some of the
                    // pixels exist: through a small buffer.
                    map_channels(
                        &src,
                        out,
                        &strided(cout),
                        cout,
                        output_tile::<LANES>,
                        output_tile::<1>,
                    );
                    for k in 0..4 {
                        let (oy, ox) = (oy + k / 2, ox + k % 2);
                        if oy < oh && ox < ow {
                            yi[(oy * ow + ox) * cout..(oy * ow + ox + 1) * cout]
                                .copy_from_slice(&out[k * cout..(k + 1) * cout]);
                        }
                    }
                }
            }
        },
    );
}

/// `dM` (`[tiles, 16, cout]`, rows [`skewed`]) from the output gradient `dy`
/// (`[images, oh, ow, cout]`), zeros outside the image. Parallel over images.
fn transform_output_grad(dy: &[f32], g: &ConvGeom, p: &Plan, dm: &mut [f32]) {
    let (oh, ow, cout) = (g.oh(), g.ow(), g.cout);
    let zeros = vec![0.0f32; cout];
    let zeros = &zeros[..];
    let ld = skewed(16 * cout);
    dm.par_chunks_mut(p.tiles_per_image() * ld)
        .zip(dy.par_chunks(oh * ow * cout))
        .for_each(|(dmi, dyi)| {
            for ty in 0..p.th {
                for tx in 0..p.tw {
                    let src: [&[f32]; 4] = std::array::from_fn(|k| {
                        let (oy, ox) = (2 * ty + k / 2, 2 * tx + k % 2);
                        if oy < oh && ox < ow {
                            &dyi[(oy * ow + ox) * cout..(oy * ow + ox + 1) * cout]
                        } else {
                            zeros
                        }
                    });
                    let t = ty * p.tw + tx;
                    map_channels(
                        &src,
                        &mut dmi[t * ld..t * ld + 16 * cout],
                        &strided(cout),
                        cout,
                        output_tile_adjoint::<LANES>,
                        output_tile_adjoint::<1>,
                    );
                }
            }
        });
}

/// `y = conv3x3(x, w)` with stride 1 and padding 1, the same contract as
/// [`conv2d_forward`](super::conv::conv2d_forward): `x` is `[n, h, w, cin]`, `w`
/// `[cout, 3, 3, cin]`, `y` `[n, h, w, cout]` (fully overwritten).
///
/// # Panics
/// If `g` is not a 3x3, stride-1, pad-1 convolution (see [`applies`]) or a slice has the wrong
/// length.
pub fn conv3x3_forward(x: &[f32], w: &[f32], g: &ConvGeom, y: &mut [f32]) {
    assert!(applies(g), "winograd: needs a 3x3 kernel, stride 1, pad 1");
    forward_with(x, w, g, y, &Plan::forward(g));
}

fn forward_with(x: &[f32], w: &[f32], g: &ConvGeom, y: &mut [f32], p: &Plan) {
    let (in_img, out_img) = (g.h * g.w * g.cin, g.oh() * g.ow() * g.cout);
    assert_eq!(x.len(), g.n * in_img, "winograd: x has the wrong length");
    assert_eq!(
        w.len(),
        g.cout * 9 * g.cin,
        "winograd: w has the wrong length"
    );
    assert_eq!(y.len(), g.n * out_img, "winograd: y has the wrong length");
    if y.is_empty() {
        return;
    }
    if g.cin == 0 {
        y.fill(0.0);
        return;
    }
    let mut u = Scratch::new(g.cout * skewed(16 * g.cin));
    transform_kernel(w, g, &mut u);
    let u = &*u;
    let (cin, cout, tpi) = (g.cin, g.cout, p.tiles_per_image());
    let max_tiles = p.chunk * tpi;
    x.par_chunks(p.chunk * in_img)
        .zip(y.par_chunks_mut(p.chunk * out_img))
        .for_each_init(
            || {
                (
                    Scratch::new(max_tiles * skewed(16 * cin)),
                    Scratch::new(16 * skewed(max_tiles * cout)),
                )
            },
            |(v, m), (xc, yc)| {
                let tiles = xc.len() / in_img * tpi;
                let v = &mut v[..tiles * skewed(16 * cin)];
                let m = &mut m[..16 * skewed(tiles * cout)];
                transform_input(xc, g, p, v);
                let v = &*v;
                // The 16 products are independent: spread them over the pool when the chunks
                // alone do not fill it (few large images, or few chunks).
                m.par_chunks_mut(skewed(tiles * cout))
                    .enumerate()
                    .for_each(|(xi, mx)| {
                        let a = Mat::with_ld(&v[xi * cin..], tiles, cin, skewed(16 * cin));
                        let b = Mat::with_ld(&u[xi * cin..], cout, cin, skewed(16 * cin));
                        matmul(a, b.t(), &mut mx[..tiles * cout], false, Par::Seq);
                    });
                transform_output(m, g, p, tiles, yc);
            },
        );
}

/// The weight gradient of [`conv3x3_forward`]: `dw` (`[cout, 3, 3, cin]`) is overwritten with
/// dL/dw from the input `x` (`[n, h, w, cin]`) and the output gradient `dy` (`[n, h, w, cout]`).
///
/// Images are summed in a fixed number of groups that depends on the problem only, so the bits
/// of `dw` do not depend on the number of threads.
///
/// # Panics
/// If `g` is not a 3x3, stride-1, pad-1 convolution (see [`applies`]) or a slice has the wrong
/// length.
pub fn conv3x3_weight_grad(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    assert!(applies(g), "winograd: needs a 3x3 kernel, stride 1, pad 1");
    weight_grad_with(x, dy, g, dw, &Plan::weight_grad(g));
}

fn weight_grad_with(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32], p: &Plan) {
    let (in_img, out_img) = (g.h * g.w * g.cin, g.oh() * g.ow() * g.cout);
    assert_eq!(x.len(), g.n * in_img, "winograd: x has the wrong length");
    assert_eq!(dy.len(), g.n * out_img, "winograd: dy has the wrong length");
    assert_eq!(
        dw.len(),
        g.cout * 9 * g.cin,
        "winograd: dw has the wrong length"
    );
    if dw.is_empty() {
        return;
    }
    if g.n == 0 {
        dw.fill(0.0);
        return;
    }
    let (cin, cout, tpi) = (g.cin, g.cout, p.tiles_per_image());
    // dU as 16 planes [cout, cin], skewed like the other tensors for the final transform.
    let plane = skewed(cout * cin);
    // Fixed groups of images (see `Plan`), each summing its own dU over its chunks in order;
    // then the groups are added in order.
    let per_group = p.per_group;
    let max_tiles = p.chunk * tpi;
    let partials: Vec<Scratch> = x
        .par_chunks(per_group * in_img)
        .zip(dy.par_chunks(per_group * out_img))
        .map(|(xg, dyg)| {
            let mut du = Scratch::new(16 * plane);
            let mut v = Scratch::new(max_tiles * skewed(16 * cin));
            let mut dm = Scratch::new(max_tiles * skewed(16 * cout));
            for (i, (xc, dyc)) in xg
                .chunks(p.chunk * in_img)
                .zip(dyg.chunks(p.chunk * out_img))
                .enumerate()
            {
                let tiles = xc.len() / in_img * tpi;
                let v = &mut v[..tiles * skewed(16 * cin)];
                let dm = &mut dm[..tiles * skewed(16 * cout)];
                rayon::join(
                    || transform_input(xc, g, p, v),
                    || transform_output_grad(dyc, g, p, dm),
                );
                let (v, dm) = (&*v, &*dm);
                // dU_xi^T [cout, cin] += dM_xi^T [cout, tiles] x V_xi [tiles, cin]; each plane
                // is one GEMM on one thread, so the order of its sums is fixed.
                du.par_chunks_mut(plane).enumerate().for_each(|(xi, dux)| {
                    let dux = &mut dux[..cout * cin];
                    let a = Mat::with_ld(&dm[xi * cout..], tiles, cout, skewed(16 * cout));
                    let b = Mat::with_ld(&v[xi * cin..], tiles, cin, skewed(16 * cin));
                    // The first chunk overwrites: the scratch holds stale values.
                    matmul(a.t(), b, dux, i > 0, Par::Seq);
                });
            }
            du
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut du = parts.next().expect("at least one group");
    for part in parts {
        for (d, s) in du.iter_mut().zip(part.iter()) {
            *d += s;
        }
    }
    let du = &*du;
    // dW = G^T dU G, per output channel along contiguous input channels.
    dw.par_chunks_mut(9 * cin)
        .enumerate()
        .for_each(|(co, dwk)| {
            let src: [&[f32]; 16] =
                std::array::from_fn(|xi| &du[xi * plane + co * cin..xi * plane + (co + 1) * cin]);
            map_channels(
                &src,
                dwk,
                &strided(cin),
                cin,
                kernel_tile_adjoint::<LANES>,
                kernel_tile_adjoint::<1>,
            );
        });
}

#[cfg(test)]
mod tests {
    use super::super::conv::{conv2d_backward, conv2d_forward};
    use super::*;

    fn geom(n: usize, h: usize, w: usize, cin: usize, cout: usize) -> ConvGeom {
        ConvGeom {
            n,
            h,
            w,
            cin,
            cout,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        }
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.618_034).sin() + 0.25 * ((i as f32) * 0.0137).cos())
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{what}[{i}]: {a} vs {b} (scale {scale})"
            );
        }
    }

    /// Compares both kernels with the direct convolution, with the default plan and with small
    /// chunks and several reduce groups (uneven last chunk and group included).
    fn check(n: usize, h: usize, w: usize, cin: usize, cout: usize) {
        let g = geom(n, h, w, cin, cout);
        assert!(applies(&g));
        let x = data(n * h * w * cin, 1.0);
        let k = data(cout * 9 * cin, 2.0);
        let dy = data(n * h * w * cout, 3.0);
        let what = format!("n={n} h={h} w={w} cin={cin} cout={cout}");

        let mut want = vec![0.0; n * h * w * cout];
        conv2d_forward(&x, &k, &g, &mut want);
        let mut want_dw = vec![0.0; k.len()];
        conv2d_backward(&x, &k, &dy, &g, &mut want_dw, None);

        let mut got = vec![f32::NAN; want.len()];
        conv3x3_forward(&x, &k, &g, &mut got);
        assert_close(&got, &want, &format!("y {what}"));
        let mut got_dw = vec![f32::NAN; k.len()];
        conv3x3_weight_grad(&x, &dy, &g, &mut got_dw);
        assert_close(&got_dw, &want_dw, &format!("dw {what}"));

        for (chunk, groups) in [(1, 1), (1, 16), (2, 2)] {
            let p = Plan::with_chunk(&g, chunk, groups);
            let mut got = vec![f32::NAN; want.len()];
            forward_with(&x, &k, &g, &mut got, &p);
            assert_close(&got, &want, &format!("y {what} {p:?}"));
            let mut got_dw = vec![f32::NAN; k.len()];
            weight_grad_with(&x, &dy, &g, &mut got_dw, &p);
            assert_close(&got_dw, &want_dw, &format!("dw {what} {p:?}"));
        }
    }

    #[test]
    fn matches_direct_convolution() {
        for n in [1, 3] {
            for (h, w) in [
                (1, 1),
                (2, 2),
                (3, 3),
                (5, 5),
                (8, 8),
                (4, 7),
                (7, 4),
                (1, 6),
                (5, 2),
            ] {
                for (cin, cout) in [(1, 1), (3, 8), (8, 3), (17, 17), (8, 17), (17, 1)] {
                    check(n, h, w, cin, cout);
                }
            }
        }
    }

    #[test]
    fn matches_direct_convolution_with_default_chunks() {
        // Enough images and channels that the default plans cut several chunks, the last one
        // partial, and several reduce groups.
        let g = geom(37, 9, 9, 64, 40);
        for p in [Plan::forward(&g), Plan::weight_grad(&g)] {
            assert!(p.chunk < g.n && g.n % p.chunk != 0, "{p:?}");
        }
        assert!(Plan::weight_grad(&g).per_group < g.n);
        check(37, 9, 9, 64, 40);
    }

    #[test]
    fn does_not_depend_on_thread_count() {
        let g = geom(29, 6, 5, 24, 19);
        let x = data(g.n * g.h * g.w * g.cin, 4.0);
        let k = data(g.cout * 9 * g.cin, 5.0);
        let dy = data(g.n * g.h * g.w * g.cout, 6.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut out = Vec::new();
                for p in [
                    Plan::forward(&g),
                    Plan::weight_grad(&g),
                    Plan::with_chunk(&g, 2, 16),
                ] {
                    let mut y = vec![0.0; dy.len()];
                    forward_with(&x, &k, &g, &mut y, &p);
                    let mut dw = vec![0.0; k.len()];
                    weight_grad_with(&x, &dy, &g, &mut dw, &p);
                    out.push((y, dw));
                }
                let mut y = vec![0.0; dy.len()];
                conv3x3_forward(&x, &k, &g, &mut y);
                let mut dw = vec![0.0; k.len()];
                conv3x3_weight_grad(&x, &dy, &g, &mut dw);
                out.push((y, dw));
                out
            })
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let (one, three) = (run(1), run(3));
        for ((y1, dw1), (y3, dw3)) in one.iter().zip(&three) {
            assert_eq!(bits(y1), bits(y3));
            assert_eq!(bits(dw1), bits(dw3));
        }
    }

    #[test]
    fn empty_problems() {
        let g = geom(0, 4, 4, 3, 2);
        let mut dw = vec![f32::NAN; 2 * 9 * 3];
        conv3x3_weight_grad(&[], &[], &g, &mut dw);
        assert!(dw.iter().all(|&v| v == 0.0));
        conv3x3_forward(&[], &dw, &g, &mut []);
        let g = geom(2, 4, 4, 0, 2);
        let mut y = vec![f32::NAN; 2 * 16 * 2];
        conv3x3_forward(&[], &[], &g, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn rejects_other_geometries() {
        let mut g = geom(1, 4, 4, 1, 1);
        g.stride = 2;
        assert!(!applies(&g));
        let mut g = geom(1, 4, 4, 1, 1);
        g.pad = 0;
        assert!(!applies(&g));
        let mut g = geom(1, 4, 4, 1, 1);
        g.kh = 1;
        g.kw = 1;
        assert!(!applies(&g));
    }

    /// Speed against the im2col path on ResNet-18 (CIFAR) shapes:
    /// `cargo test --release -p simclr-nn winograd::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        use std::time::Instant;
        let reps: usize = std::env::var("WINO_REPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        let best = |f: &mut dyn FnMut()| {
            f();
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        for (hw, c) in [(32, 64), (16, 128), (8, 256), (4, 512)] {
            let g = geom(64, hw, hw, c, c);
            let x = data(g.n * hw * hw * c, 1.0);
            let k = data(c * 9 * c, 2.0);
            let dy = data(g.n * hw * hw * c, 3.0);
            let mut y = vec![0.0; dy.len()];
            let mut dw = vec![0.0; k.len()];
            let f_direct = best(&mut || conv2d_forward(&x, &k, &g, &mut y));
            let f_wino = best(&mut || conv3x3_forward(&x, &k, &g, &mut y));
            let b_direct = best(&mut || conv2d_backward(&x, &k, &dy, &g, &mut dw, None));
            let b_wino = best(&mut || conv3x3_weight_grad(&x, &dy, &g, &mut dw));
            println!(
                "{hw:>2}x{hw:<2} c={c:<3} forward {f_direct:7.2} ms -> {f_wino:7.2} ms ({:.2}x)   \
                 weight grad {b_direct:7.2} ms -> {b_wino:7.2} ms ({:.2}x)",
                f_direct / f_wino,
                b_direct / b_wino
            );
        }
    }
}

//! The NT-Xent loss (SimCLR's normalised temperature-scaled cross entropy), forward and
//! backward, fused and tiled: the CPU twin of the CUDA kernel.
//!
//! # Definition
//!
//! `z` holds `M = 2N` rows of `dim` values (row-major `f32`): rows `0..N` are the first view of
//! images `0..N`, rows `N..2N` the second view, so the positive of row `i` is `(i + N) mod M`.
//! With `u_i = z_i / max(||z_i||, 1e-12)` (PyTorch's `F.normalize`) and `s_ik = u_i . u_k / tau`,
//!
//! ```text
//! loss_i = -s_{i,pos(i)} + log sum_{k != i} exp(s_ik),      loss = (1/M) sum_i loss_i.
//! ```
//!
//! # Algorithm
//!
//! The `M x M` similarity matrix is never stored: memory is `O(M * dim)` (the normalised rows
//! packed for the micro-kernels, per-row statistics, the gradient) plus one `b x b` tile per
//! thread (`b` = 48 to 144 rows).
//!
//! * Rows are normalised once and packed for the register-blocked micro-kernels
//!   (`microkernel.rs`, 6 x 16 blocks of AVX2 FMAs).
//! * **Pass 1** computes every anchor row's log-sum-exp over tiles `S = U_I U_K^T / tau` of row
//!   blocks `I` and column blocks `K`. `S` is symmetric, so only the pairs `I <= K` are computed
//!   and each off-diagonal tile updates the statistics of the rows of `I` (row-wise) and of `K`
//!   (column-wise): half the products of the plain algorithm. The statistics are an online
//!   log-sum-exp (running max and sum); for `tau >= 0.025`, where every `s_ik` lies within 80
//!   of `1/tau`, the max is the constant `1/tau` and each entry takes a single exponential,
//!   taken in the micro-kernel's registers (the tile is never written out).
//! * **Pass 2** recomputes the same tiles and forms `C = exp(S - lse_I) + exp(S - lse_K)` (the
//!   softmax `P` plus its transpose, which by symmetry is `exp(s_ik - lse_k)`), then
//!   `g_I += C U_K` and `g_K += C^T U_I`. The positives' `-Y` term and the `1 / (tau M)` factor
//!   are applied row by row at the end, then the chain rule through the normalisation:
//!   `dz_i = (g_i - u_i (u_i . g_i)) / max(||z_i||, eps)` (and `g_i / eps` for rows whose norm is
//!   below `eps`, where `F.normalize`'s clamp cuts the dependence on the norm).
//! * Both passes visit the block pairs in rounds of a round-robin tournament: in one round no
//!   block appears twice, so the pairs of a round run in parallel (rayon), each writing the
//!   statistics or gradient rows of its two blocks, without atomics or per-thread copies, and
//!   in an order fixed by the schedule (results are reproducible for a given thread count).
//!
//! Pass 1 costs `M^2 dim / 2` multiply-adds and pass 2 three times that: `2 M^2 dim` in all,
//! against `M^2 dim` plus `2 M^2 dim` for the plain algorithm that materialises `S` (one
//! product forward, two backward).
//!
//! # Data-parallel training
//!
//! A replica that owns the anchor rows `anchors` of the gathered `M x dim` matrix (its negatives
//! are all `M` rows) calls the `*_anchors` functions: the loss is normalised by the global `M`
//! and the gradient covers all `M` rows, so summing the replicas' losses and gradients (an
//! all-reduce of the gradient) gives the single-replica result (up to rounding). Only tiles
//! touching the replica's anchors are computed.
//!
//! # Example
//!
//! ```
//! use simclr_kernels::cpu::ntxent::{nt_xent_forward_backward, NtXentConfig};
//!
//! // N = 2 images, two views each, dim 3: the second view of each image is a scaled copy.
//! let z = [
//!     1.0, 0.0, 0.0, //
//!     0.0, 1.0, 0.0, //
//!     2.0, 0.0, 0.0, //
//!     0.0, 3.0, 0.0f32,
//! ];
//! let mut grad = [0.0f32; 12];
//! let loss = nt_xent_forward_backward(&z, 4, 3, &NtXentConfig::new(0.5), &mut grad).unwrap();
//! // Each anchor sees its positive at cosine 1 and two negatives at cosine 0.
//! let want = -2.0 + (2.0f32.exp() + 2.0).ln();
//! assert!((loss - want).abs() < 1e-5);
//! // The loss only depends on directions: the gradient is orthogonal to each row.
//! for (zi, gi) in z.chunks(3).zip(grad.chunks(3)) {
//!     let dot: f32 = zi.iter().zip(gi).map(|(a, b)| a * b).sum();
//!     assert!(dot.abs() < 1e-6);
//! }
//! ```

use std::cell::Cell;
use std::ops::Range;

use rayon::prelude::*;

use super::fast_math::{exp_approx, exp_in_range, max_of, sum_exp_shifted};
use super::microkernel::{kernel_packed, prefetch_part, Block, Row16, MR, NR};
use super::pool::{self, AlignedF32};

/// `eps` of PyTorch's `F.normalize`: norms below it are clamped to it.
pub const NORM_EPS: f64 = 1e-12;

/// Hyper-parameters of the NT-Xent loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NtXentConfig {
    /// The temperature `tau` dividing the cosine similarities; SimCLR uses 0.1 on ImageNet
    /// (batch 4096) and 0.5 on CIFAR-10. Must be finite and positive.
    pub temperature: f32,
}

impl NtXentConfig {
    /// A configuration with the given temperature.
    pub const fn new(temperature: f32) -> Self {
        Self { temperature }
    }
}

impl Default for NtXentConfig {
    /// Temperature 0.5, the paper's CIFAR-10 setting.
    fn default() -> Self {
        Self::new(0.5)
    }
}

/// Why an NT-Xent call rejected its input.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NtXentError {
    /// The number of rows is odd or below 2 (there must be two views per image).
    #[error("NT-Xent needs an even number of rows >= 2 (two views of each image), got {rows}")]
    BadRows {
        /// The number of rows given.
        rows: usize,
    },
    /// The row dimension is zero.
    #[error("NT-Xent needs rows of dimension >= 1, got 0")]
    ZeroDim,
    /// A slice does not hold `rows * dim` values.
    #[error("{what} holds {actual} values, expected rows * dim = {expected}")]
    LengthMismatch {
        /// Which argument (`"z"` or `"grad"`).
        what: &'static str,
        /// `rows * dim`.
        expected: usize,
        /// The slice's length.
        actual: usize,
    },
    /// `rows * dim` does not fit in `usize`.
    #[error("rows * dim overflows: {rows} x {dim}")]
    TooLarge {
        /// The number of rows given.
        rows: usize,
        /// The dimension given.
        dim: usize,
    },
    /// The temperature is not finite or not positive.
    #[error("the temperature must be finite and > 0, got {0}")]
    BadTemperature(f32),
    /// The incoming gradient of the loss is not finite.
    #[error("the incoming gradient of the loss must be finite, got {0}")]
    BadGradOutput(f32),
    /// A row of `z` holds a NaN or an infinity.
    #[error("row {row} of z holds a non-finite value")]
    NonFinite {
        /// The first such row.
        row: usize,
    },
    /// The anchor range is empty-reversed or runs past the last row.
    #[error("anchor rows {start}..{end} are not a range inside 0..{rows}")]
    BadAnchors {
        /// Start of the range given.
        start: usize,
        /// End of the range given.
        end: usize,
        /// The number of rows.
        rows: usize,
    },
}

/// Shapes of one call: the tile size and the padded sizes.
#[derive(Clone, Copy, Debug)]
struct Plan {
    rows: usize,
    dim: usize,
    /// `dim` rounded up to `NR`: the gradient's row length (columns in register blocks).
    dp: usize,
    /// Rows of a block (tile side), a multiple of `MR` and `NR`.
    bsz: usize,
    /// `rows` rounded up to `bsz`; the padding rows of `u` are zero.
    mp: usize,
    nblocks: usize,
}

/// Tile sides tried: multiples of `lcm(MR, NR) = 48`.
const BLOCK_SIZES: [usize; 3] = [48, 96, 144];

/// The per-core cache the operands of a pass-2 tile pair should fit in (Zen 3 has 512 KiB of
/// L2 per core, recent Intel cores 1-2 MiB).
const L2_BYTES: usize = 512 << 10;

impl Plan {
    fn new(rows: usize, dim: usize, threads: usize) -> Self {
        let bsz = choose_block(rows, dim, threads.max(1));
        let nblocks = rows.div_ceil(bsz);
        Self {
            rows,
            dim,
            dp: dim.div_ceil(NR) * NR,
            bsz,
            mp: nblocks * bsz,
            nblocks,
        }
    }

    /// Rows of block `blk` that are real rows (not padding).
    fn valid(&self, blk: usize) -> usize {
        self.bsz.min(self.rows - blk * self.bsz)
    }
}

/// Picks the tile side that minimises a cost model of the round-robin schedule, in
/// multiply-adds of the slowest thread: per round it does `ceil(pairs / threads)` tiles of
/// about `b^2 (dim + 8)` (the products and the per-entry work), plus a fixed cost per round
/// (the barrier). Large tiles waste less on barriers and loop prologues; small ones pad less and
/// balance better. Sides whose pass-2 working set (two blocks of `u` in two layouts, two
/// gradient blocks, the tile and its two packed copies) would overflow the L2 are skipped.
fn choose_block(rows: usize, dim: usize, threads: usize) -> usize {
    let dp = dim.div_ceil(NR) * NR;
    let mut best = (f64::INFINITY, BLOCK_SIZES[0]);
    for &b in &BLOCK_SIZES {
        let working_set = 4 * (4 * b * dim + 2 * b * dp + 3 * b * b);
        if b != BLOCK_SIZES[0] && working_set > L2_BYTES {
            continue;
        }
        let nb = rows.div_ceil(b);
        // Rounds of the circle method (a dummy block makes an odd count even) and real
        // pairs per round; the first round also does every diagonal tile, about one more
        // tile per task.
        let rounds = (nb + nb % 2).saturating_sub(1).max(1);
        let per_round = (nb / 2).div_ceil(threads).max(1);
        // A micro-kernel call over a reduction of length b costs about b + 12 steps (the
        // accumulators' setup and the gradient update), which favours larger tiles.
        let tile = (b * (b + 12) * (dim + 8)) as f64;
        let cost = (rounds * per_round + per_round) as f64 * tile + rounds as f64 * 1e5;
        if cost < best.0 {
            best = (cost, b);
        }
    }
    best.1
}

/// The off-diagonal block pairs `(i, k)`, `i < k`, in rounds of the circle method: every pair
/// appears in exactly one round and no block twice in a round, so a round's pairs can write
/// their two blocks' outputs in parallel.
fn rounds(nb: usize) -> Vec<Vec<(usize, usize)>> {
    if nb < 2 {
        return Vec::new();
    }
    // With an odd count a dummy block `nb` sits out one pair per round.
    let n = nb + nb % 2;
    let mut out = Vec::with_capacity(n - 1);
    for r in 0..n - 1 {
        let mut round = Vec::with_capacity(n / 2);
        let mut push = |a: usize, b: usize| {
            if a < nb && b < nb {
                round.push((a.min(b), a.max(b)));
            }
        };
        push(r, n - 1);
        for t in 1..n / 2 {
            push((r + t) % (n - 1), (r + n - 1 - t) % (n - 1));
        }
        out.push(round);
    }
    out
}

/// Checks everything but the values of `z`.
fn validate(
    z_len: usize,
    rows: usize,
    dim: usize,
    anchors: &Range<usize>,
    cfg: &NtXentConfig,
) -> Result<(), NtXentError> {
    if rows < 2 || rows % 2 != 0 {
        return Err(NtXentError::BadRows { rows });
    }
    if dim == 0 {
        return Err(NtXentError::ZeroDim);
    }
    let t = cfg.temperature;
    if !(t.is_finite() && t > 0.0) {
        return Err(NtXentError::BadTemperature(t));
    }
    let expected = rows
        .checked_mul(dim)
        .ok_or(NtXentError::TooLarge { rows, dim })?;
    if z_len != expected {
        return Err(NtXentError::LengthMismatch {
            what: "z",
            expected,
            actual: z_len,
        });
    }
    if anchors.start > anchors.end || anchors.end > rows {
        return Err(NtXentError::BadAnchors {
            start: anchors.start,
            end: anchors.end,
            rows,
        });
    }
    Ok(())
}

/// The smallest temperature of the fixed-shift path. Every similarity lies in
/// `[-1/tau, 1/tau]`, so with `tau >= 2/80` all `exp(s_ik - 1/tau)` lie in `[e^-80, 1]`: normal
/// `f32` numbers, exact to `f32` precision. One shift then serves every row and every column:
/// pass 1 takes one exponential per entry for both the row and the column sums (the online
/// max would take two, plus the max scans), and pass 2 writes
/// `exp(s - lse_i) + exp(s - lse_k) = exp(s - 1/tau) (a_i + a_k)` with `a_i = exp(1/tau - lse_i)`,
/// again one exponential. Below it (similarities spanning more than 80 nats, where a fixed shift
/// would underflow) the online max of the general path takes over.
const FIXED_SHIFT_MIN_TAU: f32 = 2.0 / 80.0;

/// Running log-sum-exp statistics of one row: `lse = m + ln(l)`, `l = sum exp(s - m)`. The sum
/// is `f64` because it gathers one partial sum per tile (`M / b` of them), at no real cost.
#[derive(Clone, Copy, Debug)]
struct Stat {
    m: f32,
    l: f64,
}

/// Per-thread scratch: one tile and per-row/column partial statistics of it.
struct Scratch {
    b: usize,
    /// The tile, row-major, rows on cache-line boundaries (`b` is a multiple of 16).
    s: AlignedF32,
    /// The tile packed as the broadcast operand of `C U_K` (row panels) and of `C^T U_I`
    /// (column panels).
    pa: Vec<[f32; MR]>,
    pb: Vec<[f32; MR]>,
    rows: Vec<Row16>,
    tm: Vec<f32>,
    tl: Vec<f32>,
    cm: Vec<f32>,
    cl: Vec<f32>,
}

impl Scratch {
    fn new(b: usize) -> Self {
        Self {
            b,
            s: AlignedF32::zeroed(b * b),
            pa: vec![[0.0; MR]; b * b / MR],
            pb: vec![[0.0; MR]; b * b / MR],
            rows: vec![Row16([0.0; NR]); b],
            tm: vec![0.0; b],
            tl: vec![0.0; b],
            cm: vec![0.0; b],
            cl: vec![0.0; b],
        }
    }
}

thread_local! {
    /// Each worker thread keeps its scratch between tasks and calls: a tile task takes tens of
    /// microseconds, and allocating (and zeroing) 50 KiB for each would cost a tenth of that.
    static SCRATCH: Cell<Option<Scratch>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's scratch for tiles of side `b`.
fn with_scratch<R>(b: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut sc = cell
            .take()
            .filter(|sc| sc.b == b)
            .unwrap_or_else(|| Scratch::new(b));
        let r = f(&mut sc);
        cell.set(Some(sc));
        r
    })
}

/// The normalised rows in the layouts the micro-kernels read.
struct Packed {
    /// `mp / MR` panels of `dim` steps: `ua[p * dim + c][r] = u[p * MR + r][c]` (rows past
    /// `rows` are zero). The broadcast operand of `S`, and the copy of `u` the end of the
    /// backward pass reads.
    ua: Vec<[f32; MR]>,
    /// `mp / NR` panels of `dim` steps: `ub[p * dim + c][j] = u[p * NR + j][c] / tau`. The
    /// vector operand of `S = U_I U_K^T / tau`.
    ub: Vec<Row16>,
}

/// Normalises the rows (`u`, and the norms in `f64`, which cannot overflow for finite `f32`).
fn normalise(z: &[f32], plan: &Plan) -> Result<(Vec<f32>, Vec<f64>), NtXentError> {
    let (rows, dim) = (plan.rows, plan.dim);
    let mut u = pool::F32.take(plan.mp * dim, 0.0);
    u[rows * dim..].fill(0.0);
    let mut norms = vec![0.0f64; rows];
    let res = u[..rows * dim]
        .par_chunks_mut(dim)
        .zip(norms.par_iter_mut())
        .zip(z.par_chunks(dim))
        .try_for_each(|((ui, ni), zi)| {
            let ss: f64 = zi.iter().map(|&v| (v as f64) * (v as f64)).sum();
            if !ss.is_finite() {
                return Err(());
            }
            *ni = ss.sqrt();
            let den = ni.max(NORM_EPS);
            for (o, &v) in ui.iter_mut().zip(zi) {
                *o = (v as f64 / den) as f32;
            }
            Ok(())
        });
    if res.is_err() {
        // Name the first offending row, whichever one the parallel scan stopped at.
        let row = z
            .chunks(dim)
            .position(|r| r.iter().any(|v| !v.is_finite()))
            .unwrap_or(0);
        return Err(NtXentError::NonFinite { row });
    }
    Ok((u, norms))
}

fn pack(u: &[f32], plan: &Plan, inv_tau: f32) -> Packed {
    let (dim, mp) = (plan.dim, plan.mp);
    let mut ua = pool::PANEL_MR.take(mp / MR * dim, [0.0; MR]);
    ua.par_chunks_mut(dim).enumerate().for_each(|(p, panel)| {
        for r in 0..MR {
            let row = &u[(p * MR + r) * dim..][..dim];
            for (step, &v) in panel.iter_mut().zip(row) {
                step[r] = v;
            }
        }
    });
    let mut ub = pool::PANEL_NR.take(mp / NR * dim, Row16([0.0; NR]));
    ub.par_chunks_mut(dim).enumerate().for_each(|(p, panel)| {
        for j in 0..NR {
            let row = &u[(p * NR + j) * dim..][..dim];
            for (step, &v) in panel.iter_mut().zip(row) {
                step.0[j] = v * inv_tau;
            }
        }
    });
    Packed { ua, ub }
}

/// `u` in `dp / NR` column chunks of `mp` rows, `uc[q * mp + i][j] = u[i][q * NR + j]` (0 past
/// `dim`): the vector operand of `C U` in pass 2, built from `ua` when pass 2 runs (a
/// forward-only call never needs it).
fn pack_uc(ua: &[[f32; MR]], plan: &Plan) -> Vec<Row16> {
    let (dim, mp) = (plan.dim, plan.mp);
    let mut uc = pool::PANEL_NR.take(plan.dp / NR * mp, Row16([0.0; NR]));
    uc.par_chunks_mut(mp).enumerate().for_each(|(q, chunk)| {
        let c0 = q * NR;
        let w = NR.min(dim - c0);
        for (p, rows) in chunk.chunks_exact_mut(MR).enumerate() {
            let panel = &ua[p * dim + c0..][..w];
            for (r, out) in rows.iter_mut().enumerate() {
                for (o, step) in out.0.iter_mut().zip(panel) {
                    *o = step[r];
                }
                out.0[w..].fill(0.0);
            }
        }
    });
    uc
}

/// The register block of `S` at rows `r0..r0 + MR` of block `i0` and columns `c0..c0 + NR` of
/// block `k0` (offsets inside the tile).
#[inline(always)]
fn s_block(p: &Packed, plan: &Plan, i0: usize, k0: usize, r0: usize, c0: usize) -> Block {
    let dim = plan.dim;
    let ap = &p.ua[(i0 + r0) / MR * dim..][..dim];
    let bp = &p.ub[(k0 + c0) / NR * dim..][..dim];
    kernel_packed(ap, bp)
}

/// Prefetches, at the block `(r0, c0)` of a tile loop with `vr` rows and `vc` columns (column
/// panels outer, row panels inner), a slice of the next column panel of `ub` and, during the
/// first column pass, the next row panel of `ua`: each panel is then in cache when its first
/// micro-kernel call starts.
#[inline(always)]
fn prefetch_s(
    p: &Packed,
    plan: &Plan,
    (i0, k0): (usize, usize),
    (r0, c0): (usize, usize),
    (vr, vc): (usize, usize),
) {
    let dim = plan.dim;
    if c0 + NR < vc {
        let next = &p.ub[(k0 + c0 + NR) / NR * dim..][..dim];
        prefetch_part(next, r0 / MR, vr.div_ceil(MR));
    }
    if c0 == 0 && r0 + MR < vr {
        prefetch_part(&p.ua[(i0 + r0 + MR) / MR * dim..][..dim], 0, 1);
    }
}

/// Whether the register block at `(r0, c0)` of a tile holds a self-pair (diagonal tiles) or a
/// padding row or column (`vr`, `vc`: the tile's real rows and columns).
#[inline(always)]
fn needs_mask(diag: bool, r0: usize, c0: usize, vr: usize, vc: usize) -> bool {
    (diag && r0 < c0 + NR && c0 < r0 + MR) || r0 + MR > vr || c0 + NR > vc
}

/// Zeroes the masked entries of a register block (of exponentials).
#[cold]
fn mask_block(e: &mut Block, diag: bool, r0: usize, c0: usize, vr: usize, vc: usize) {
    for (r, row) in e.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            if (diag && r0 + r == c0 + j) || r0 + r >= vr || c0 + j >= vc {
                *v = 0.0;
            }
        }
    }
}

/// Pass 1 on one tile with the fixed shift: for every real row `r` of the tile,
/// `rows[r][..]` (lanes to be summed) += `exp(s_rk - shift)` over the tile's real columns `k`,
/// and `cols[k]` += the same over the real rows. The tile is never written out: each register
/// block is exponentiated and reduced where the micro-kernel left it.
fn fwd_tile_fixed(
    p: &Packed,
    plan: &Plan,
    (i0, k0): (usize, usize),
    diag: bool,
    (vr, vc): (usize, usize),
    shift: f32,
    rows: &mut [Row16],
    cols: &mut [f32],
) {
    rows.fill(Row16([0.0; NR]));
    cols.fill(0.0);
    for c0 in (0..vc).step_by(NR) {
        for r0 in (0..vr).step_by(MR) {
            prefetch_s(p, plan, (i0, k0), (r0, c0), (vr, vc));
            let mut e = s_block(p, plan, i0, k0, r0, c0);
            for row in e.iter_mut() {
                for v in row.iter_mut() {
                    // s - 1/tau lies in [-2/tau, 0] (up to rounding), inside exp_in_range's
                    // range for tau >= FIXED_SHIFT_MIN_TAU.
                    *v = exp_in_range(*v - shift);
                }
            }
            if needs_mask(diag, r0, c0, vr, vc) {
                mask_block(&mut e, diag, r0, c0, vr, vc);
            }
            let mut csum = [0.0f32; NR];
            for (a, rs) in e.iter().zip(&mut rows[r0..r0 + MR]) {
                for j in 0..NR {
                    rs.0[j] += a[j];
                    csum[j] += a[j];
                }
            }
            for (c, v) in cols[c0..c0 + NR].iter_mut().zip(csum) {
                *c += v;
            }
        }
    }
}

/// Pass 2 on one tile with the fixed shift: `c = exp(S - shift) * (a_i[row] + a_k[col])`, the
/// softmax of the rows plus that of the columns, self-pairs zeroed.
fn bwd_tile_fixed(
    p: &Packed,
    plan: &Plan,
    (i0, k0): (usize, usize),
    diag: bool,
    shift: f32,
    (a_i, a_k): (&[f32], &[f32]),
    ahead: &Ahead<'_>,
    c: &mut [f32],
) {
    let b = plan.bsz;
    let calls = (b / NR) * (b / MR);
    for c0 in (0..b).step_by(NR) {
        let ak: &[f32; NR] = a_k[c0..c0 + NR].try_into().expect("NR columns");
        for r0 in (0..b).step_by(MR) {
            prefetch_s(p, plan, (i0, k0), (r0, c0), (b, b));
            ahead.prefetch(plan, (c0 / NR) * (b / MR) + r0 / MR, calls);
            let acc = s_block(p, plan, i0, k0, r0, c0);
            for (r, a) in acc.iter().enumerate() {
                let ai = a_i[r0 + r];
                let out = &mut c[(r0 + r) * b + c0..][..NR];
                for j in 0..NR {
                    out[j] = exp_in_range(a[j] - shift) * (ai + ak[j]);
                }
            }
        }
    }
    if diag {
        for r in 0..b {
            c[r * b + r] = 0.0;
        }
    }
}

/// What the gradient products of a pass-2 tile pair read after its tile is computed: the
/// vector operands (`uc` rows of both blocks) and the gradient blocks. At large M they come from
/// memory, so the tile loop prefetches them, a slice per micro-kernel call.
struct Ahead<'a> {
    uc: &'a [Row16],
    blocks: [usize; 2],
    g: [&'a [f32]; 2],
}

impl Ahead<'_> {
    #[inline(always)]
    fn prefetch(&self, plan: &Plan, part: usize, parts: usize) {
        let (b, mp) = (plan.bsz, plan.mp);
        for &k0 in &self.blocks {
            for q in 0..plan.dp / NR {
                prefetch_part(&self.uc[q * mp + k0..][..b], part, parts);
            }
        }
        for g in self.g {
            prefetch_part(g, part, parts);
        }
    }
}

/// `s = U_I U_K^T / tau` for the blocks starting at rows `i0` and `k0` (`s` is `bsz x bsz`,
/// row-major).
fn tile_s(p: &Packed, plan: &Plan, i0: usize, k0: usize, s: &mut [f32]) {
    let b = plan.bsz;
    for c0 in (0..b).step_by(NR) {
        for r0 in (0..b).step_by(MR) {
            let acc = s_block(p, plan, i0, k0, r0, c0);
            for (r, a) in acc.iter().enumerate() {
                s[(r0 + r) * b + c0..][..NR].copy_from_slice(a);
            }
        }
    }
}

/// Adds a register block to rows `r0..r0 + MR`, columns `c0..c0 + NR` of `g` (row length
/// `dp`).
#[inline(always)]
fn add_block(g: &mut [f32], dp: usize, r0: usize, c0: usize, acc: &Block) {
    for (r, a) in acc.iter().enumerate() {
        for (o, v) in g[(r0 + r) * dp + c0..][..NR].iter_mut().zip(a) {
            *o += v;
        }
    }
}

/// `g_i += C U_K` for the tile `c` (rows of block `I`, columns of block `K` at row `k0`);
/// `pa` receives `C` packed in row panels.
fn tile_g_rows(
    uc: &[Row16],
    plan: &Plan,
    c: &[f32],
    pa: &mut [[f32; MR]],
    k0: usize,
    g_i: &mut [f32],
) {
    let (b, dp, mp) = (plan.bsz, plan.dp, plan.mp);
    for (pi, panel) in pa.chunks_exact_mut(b).enumerate() {
        let rows: [&[f32]; MR] = std::array::from_fn(|r| &c[(pi * MR + r) * b..][..b]);
        for (k, step) in panel.iter_mut().enumerate() {
            *step = std::array::from_fn(|r| rows[r][k]);
        }
    }
    // Row panels outer: the panel of `C` stays in L1 while the 6 rows of `g_i` it updates are
    // walked front to back (a column-chunk-outer order walks `g_i` with a 512-byte stride and
    // misses on every update).
    for (pi, ap) in pa.chunks_exact(b).enumerate() {
        for q in 0..dp / NR {
            let bp = &uc[q * mp + k0..][..b];
            add_block(g_i, dp, pi * MR, q * NR, &kernel_packed(ap, bp));
        }
    }
}

/// `g_k += C^T U_I` for the tile `c` (rows of block `I` at row `i0`, columns of block `K`);
/// `pb` receives `C^T` packed in row panels (column panels of `C`).
fn tile_g_cols(
    uc: &[Row16],
    plan: &Plan,
    c: &[f32],
    pb: &mut [[f32; MR]],
    i0: usize,
    g_k: &mut [f32],
) {
    let (b, dp, mp) = (plan.bsz, plan.dp, plan.mp);
    for (pk, panel) in pb.chunks_exact_mut(b).enumerate() {
        for (step, row) in panel.iter_mut().zip(c.chunks_exact(b)) {
            step.copy_from_slice(&row[pk * MR..pk * MR + MR]);
        }
    }
    for (pk, ap) in pb.chunks_exact(b).enumerate() {
        for q in 0..dp / NR {
            let bp = &uc[q * mp + i0..][..b];
            add_block(g_k, dp, pk * MR, q * NR, &kernel_packed(ap, bp));
        }
    }
}

/// Folds a tile's statistics (max `tm`, sum of `exp(s - tm)` `tl`) into running ones.
fn merge_stats(st: &mut [Stat], tm: &[f32], tl: &[f32]) {
    for (st, (&tm, &tl)) in st.iter_mut().zip(tm.iter().zip(tl)) {
        // A row with no entry in this tile (only possible for a lone diagonal) has tm = -inf.
        if tm > f32::NEG_INFINITY {
            let nm = if tm > st.m { tm } else { st.m };
            st.l = st.l * exp_approx(st.m - nm) as f64 + tl as f64 * exp_approx(tm - nm) as f64;
            st.m = nm;
        }
    }
}

/// Row-wise statistics of the first `vr` rows and `vc` columns of the tile into `tm`, `tl`.
fn row_stats(s: &[f32], b: usize, vr: usize, vc: usize, tm: &mut [f32], tl: &mut [f32]) {
    for r in 0..vr {
        let row = &s[r * b..][..vc];
        let m = max_of(row);
        tm[r] = m;
        tl[r] = if m > f32::NEG_INFINITY {
            sum_exp_shifted(row, m)
        } else {
            0.0
        };
    }
}

/// Column-wise statistics of the first `vr` rows and `vc` columns of the tile into `cm`, `cl`.
fn col_stats(s: &[f32], b: usize, vr: usize, vc: usize, cm: &mut [f32], cl: &mut [f32]) {
    let (cm, cl) = (&mut cm[..vc], &mut cl[..vc]);
    cm.fill(f32::NEG_INFINITY);
    cl.fill(0.0);
    for r in 0..vr {
        for (m, &v) in cm.iter_mut().zip(&s[r * b..][..vc]) {
            *m = if v > *m { v } else { *m };
        }
    }
    for r in 0..vr {
        for ((l, &m), &v) in cl.iter_mut().zip(cm.iter()).zip(&s[r * b..][..vc]) {
            *l += exp_approx(v - m);
        }
    }
}

fn intersects(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end && !a.is_empty() && !b.is_empty()
}

/// One unit of parallel work: a diagonal tile, or an off-diagonal pair (with, in the first
/// round, the diagonal tiles of both blocks, which saves a round and its barrier).
enum Task<'a, T> {
    Diag(usize, &'a mut [T]),
    Pair(usize, usize, &'a mut [T], &'a mut [T], bool),
}

/// Runs `diag` on every diagonal tile and `pair` on every off-diagonal block pair `i < k`
/// whose blocks touch the anchors, in round-robin rounds: a round's tasks touch disjoint
/// blocks, so each gets its blocks of `out` (`chunk` values per block) mutably, and the rounds
/// run one after the other (the order of the additions is fixed by the schedule, not by the
/// threads).
fn schedule<T, D, P>(
    out: &mut [T],
    chunk: usize,
    plan: &Plan,
    anchors: &Range<usize>,
    diag: D,
    pair: P,
) where
    T: Send,
    D: Fn(&mut Scratch, usize, &mut [T]) + Sync + Send,
    P: Fn(&mut Scratch, usize, usize, &mut [T], &mut [T]) + Sync + Send,
{
    let b = plan.bsz;
    let touches = |i: usize| intersects(&(i * b..(i + 1) * b), anchors);
    let mut rounds = rounds(plan.nblocks);
    if rounds.is_empty() {
        rounds.push(Vec::new());
    }
    for (ri, round) in rounds.iter().enumerate() {
        let mut slots: Vec<Option<&mut [T]>> = out.chunks_mut(chunk).map(Some).collect();
        let mut tasks: Vec<Task<'_, T>> = Vec::with_capacity(round.len() + 1);
        for &(i, k) in round {
            if touches(i) || touches(k) || ri == 0 {
                let oi = slots[i].take().expect("a block appears once per round");
                let ok = slots[k].take().expect("a block appears once per round");
                tasks.push(Task::Pair(i, k, oi, ok, ri == 0));
            }
        }
        if ri == 0 {
            // Blocks that sit out the first round (an odd count, or a single block).
            for (i, slot) in slots.iter_mut().enumerate() {
                if let Some(oi) = slot.take() {
                    tasks.push(Task::Diag(i, oi));
                }
            }
        }
        tasks.into_par_iter().for_each(|task| {
            with_scratch(b, |sc| match task {
                Task::Diag(i, oi) => {
                    if touches(i) {
                        diag(sc, i, oi)
                    }
                }
                Task::Pair(i, k, oi, ok, with_diag) => {
                    if with_diag && touches(i) {
                        diag(sc, i, oi);
                    }
                    if with_diag && touches(k) {
                        diag(sc, k, ok);
                    }
                    if touches(i) || touches(k) {
                        pair(sc, i, k, oi, ok);
                    }
                }
            })
        });
    }
}

/// Pass 1: the log-sum-exp of every anchor row over all `k != i` (`+inf` for other rows,
/// which makes their softmax terms vanish in pass 2).
fn forward_lse(p: &Packed, plan: &Plan, anchors: &Range<usize>, tau: f32) -> Vec<f32> {
    let b = plan.bsz;
    let blk = |i: usize| i * b..(i + 1) * b;
    let mut stats = vec![
        Stat {
            m: f32::NEG_INFINITY,
            l: 0.0
        };
        plan.mp
    ];
    if tau >= FIXED_SHIFT_MIN_TAU {
        let shift = 1.0 / tau;
        for st in stats.iter_mut() {
            st.m = shift;
        }
        let add_rows = |st: &mut [Stat], rows: &[Row16]| {
            for (st, r) in st.iter_mut().zip(rows) {
                st.l += r.0.iter().map(|&v| v as f64).sum::<f64>();
            }
        };
        schedule(
            &mut stats,
            b,
            plan,
            anchors,
            |sc, i, st| {
                let v = plan.valid(i);
                let at = (i * b, i * b);
                fwd_tile_fixed(p, plan, at, true, (v, v), shift, &mut sc.rows, &mut sc.cl);
                add_rows(&mut st[..v], &sc.rows[..v]);
            },
            |sc, i, k, si, sk| {
                let (vi, vk) = (plan.valid(i), plan.valid(k));
                let at = (i * b, k * b);
                fwd_tile_fixed(
                    p,
                    plan,
                    at,
                    false,
                    (vi, vk),
                    shift,
                    &mut sc.rows,
                    &mut sc.cl,
                );
                add_rows(&mut si[..vi], &sc.rows[..vi]);
                for (st, &c) in sk[..vk].iter_mut().zip(&sc.cl) {
                    st.l += c as f64;
                }
            },
        );
    } else {
        schedule(
            &mut stats,
            b,
            plan,
            anchors,
            |sc, i, st| {
                let v = plan.valid(i);
                tile_s(p, plan, i * b, i * b, &mut sc.s);
                for r in 0..v {
                    sc.s[r * b + r] = f32::NEG_INFINITY;
                }
                row_stats(&sc.s, b, v, v, &mut sc.tm, &mut sc.tl);
                merge_stats(&mut st[..v], &sc.tm[..v], &sc.tl[..v]);
            },
            |sc, i, k, si, sk| {
                let (vi, vk) = (plan.valid(i), plan.valid(k));
                tile_s(p, plan, i * b, k * b, &mut sc.s);
                if intersects(&blk(i), anchors) {
                    row_stats(&sc.s, b, vi, vk, &mut sc.tm, &mut sc.tl);
                    merge_stats(&mut si[..vi], &sc.tm[..vi], &sc.tl[..vi]);
                }
                if intersects(&blk(k), anchors) {
                    col_stats(&sc.s, b, vi, vk, &mut sc.cm, &mut sc.cl);
                    merge_stats(&mut sk[..vk], &sc.cm[..vk], &sc.cl[..vk]);
                }
            },
        );
    }
    stats
        .iter()
        .enumerate()
        .map(|(i, st)| {
            if anchors.contains(&i) {
                (st.m as f64 + st.l.ln()) as f32
            } else {
                f32::INFINITY
            }
        })
        .collect()
}

/// `C = exp(S - lse_I[row]) + exp(S - lse_K[col])` in place (general path); a block without
/// anchors has `lse = +inf` and contributes nothing, so its exponentials are skipped.
fn softmax_sum(s: &mut [f32], b: usize, lse_i: &[f32], lse_k: &[f32], any_i: bool, any_k: bool) {
    for (row, &li) in s.chunks_exact_mut(b).zip(lse_i) {
        match (any_i, any_k) {
            (true, true) => {
                for (v, &lk) in row.iter_mut().zip(lse_k) {
                    *v = exp_approx(*v - li) + exp_approx(*v - lk);
                }
            }
            (true, false) => {
                for v in row.iter_mut() {
                    *v = exp_approx(*v - li);
                }
            }
            (false, true) => {
                for (v, &lk) in row.iter_mut().zip(lse_k) {
                    *v = exp_approx(*v - lk);
                }
            }
            (false, false) => row.fill(0.0),
        }
    }
}

/// Pass 2: `g = C U` over all rows (`mp x dp`), without the positives' term and the scale.
fn backward_g(
    p: &Packed,
    plan: &Plan,
    lse: &[f32],
    anchors: &Range<usize>,
    tau: f32,
) -> AlignedF32 {
    let (b, dp) = (plan.bsz, plan.dp);
    let blk = |i: usize| i * b..(i + 1) * b;
    let mut g = AlignedF32::zeroed(plan.mp * dp);
    let uc_buf = pack_uc(&p.ua, plan);
    let uc = &uc_buf[..];
    if tau >= FIXED_SHIFT_MIN_TAU {
        let shift = 1.0 / tau;
        // a_i = exp(shift - lse_i) lies in [1/M, e^80]: lse_i is at least the row's largest
        // similarity (>= -shift) and at most shift + ln M. Rows without anchors get 0.
        let a: Vec<f32> = lse.iter().map(|&l| exp_approx(shift - l)).collect();
        schedule(
            &mut g,
            b * dp,
            plan,
            anchors,
            |sc, i, gi| {
                let ai = &a[blk(i)];
                let ahead = Ahead {
                    uc,
                    blocks: [i * b, i * b],
                    g: [&*gi, &[]],
                };
                let at = (i * b, i * b);
                bwd_tile_fixed(p, plan, at, true, shift, (ai, ai), &ahead, &mut sc.s);
                tile_g_rows(uc, plan, &sc.s, &mut sc.pa, i * b, gi);
            },
            |sc, i, k, gi, gk| {
                let (ai, ak) = (&a[blk(i)], &a[blk(k)]);
                let ahead = Ahead {
                    uc,
                    blocks: [i * b, k * b],
                    g: [&*gi, &*gk],
                };
                let at = (i * b, k * b);
                bwd_tile_fixed(p, plan, at, false, shift, (ai, ak), &ahead, &mut sc.s);
                tile_g_rows(uc, plan, &sc.s, &mut sc.pa, k * b, gi);
                tile_g_cols(uc, plan, &sc.s, &mut sc.pb, i * b, gk);
            },
        );
    } else {
        schedule(
            &mut g,
            b * dp,
            plan,
            anchors,
            |sc, i, gi| {
                tile_s(p, plan, i * b, i * b, &mut sc.s);
                for r in 0..b {
                    sc.s[r * b + r] = f32::NEG_INFINITY;
                }
                let l = &lse[blk(i)];
                softmax_sum(&mut sc.s, b, l, l, true, true);
                tile_g_rows(uc, plan, &sc.s, &mut sc.pa, i * b, gi);
            },
            |sc, i, k, gi, gk| {
                tile_s(p, plan, i * b, k * b, &mut sc.s);
                let any_i = intersects(&blk(i), anchors);
                let any_k = intersects(&blk(k), anchors);
                softmax_sum(&mut sc.s, b, &lse[blk(i)], &lse[blk(k)], any_i, any_k);
                tile_g_rows(uc, plan, &sc.s, &mut sc.pa, k * b, gi);
                tile_g_cols(uc, plan, &sc.s, &mut sc.pb, i * b, gk);
            },
        );
    }
    pool::PANEL_NR.give(uc_buf);
    g
}

/// The result of the forward pass, holding what the backward pass needs: the normalised rows
/// (three layouts), the norms and each anchor's log-sum-exp, `O(rows * dim)` in all.
///
/// This is the shape an autograd layer wants: run the forward when the loss is computed, keep
/// this value, and call [`NtXentForward::backward`] with the incoming gradient later.
pub struct NtXentForward {
    plan: Plan,
    temperature: f32,
    anchors: Range<usize>,
    packed: Packed,
    norms: Vec<f64>,
    lse: Vec<f32>,
    loss: f32,
}

impl std::fmt::Debug for NtXentForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtXentForward")
            .field("rows", &self.plan.rows)
            .field("dim", &self.plan.dim)
            .field("temperature", &self.temperature)
            .field("anchors", &self.anchors)
            .field("loss", &self.loss)
            .finish_non_exhaustive()
    }
}

impl NtXentForward {
    /// Runs the forward pass for the anchor rows `anchors` of `z` (`rows x dim`, row-major)
    /// against all `rows` rows as negatives. The loss is the sum of the anchors' losses divided
    /// by `rows` (so a partition of `0..rows` into replicas' ranges sums to the full loss).
    pub fn new(
        z: &[f32],
        rows: usize,
        dim: usize,
        anchors: Range<usize>,
        cfg: &NtXentConfig,
    ) -> Result<Self, NtXentError> {
        validate(z.len(), rows, dim, &anchors, cfg)?;
        // Run on a pool thread: the parallel loops inside then fork and join as cheap
        // work-stealing operations instead of each one parking this (outside) thread on a
        // latch and waking it again, which costs tens of microseconds apiece in a VM and
        // dominated the small problems.
        rayon::scope(|_| Self::forward_on_pool(z, rows, dim, anchors, cfg))
    }

    fn forward_on_pool(
        z: &[f32],
        rows: usize,
        dim: usize,
        anchors: Range<usize>,
        cfg: &NtXentConfig,
    ) -> Result<Self, NtXentError> {
        let plan = Plan::new(rows, dim, rayon::current_num_threads());
        let tau = cfg.temperature;
        let (u, norms) = normalise(z, &plan)?;
        let loss_rows: Vec<f64> = {
            let n = rows / 2;
            anchors
                .clone()
                .into_par_iter()
                .map(|i| {
                    let pos = (i + n) % rows;
                    let ui = &u[i * dim..][..dim];
                    let up = &u[pos * dim..][..dim];
                    ui.iter()
                        .zip(up)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / tau as f64
                })
                .collect()
        };
        let packed = pack(&u, &plan, 1.0 / tau);
        pool::F32.give(u);
        let lse = forward_lse(&packed, &plan, &anchors, tau);
        let total: f64 = anchors
            .clone()
            .zip(&loss_rows)
            .map(|(i, &sp)| lse[i] as f64 - sp)
            .sum();
        Ok(Self {
            plan,
            temperature: tau,
            anchors,
            packed,
            norms,
            lse,
            loss: (total / rows as f64) as f32,
        })
    }

    /// The loss: the anchors' mean loss times `anchors.len() / rows`.
    pub fn loss(&self) -> f32 {
        self.loss
    }

    /// Each anchor's `log sum_{k != i} exp(s_ik)` (in anchor order).
    pub fn log_sum_exp(&self) -> &[f32] {
        &self.lse[self.anchors.clone()]
    }

    /// The anchor rows this pass covers.
    pub fn anchors(&self) -> Range<usize> {
        self.anchors.clone()
    }

    /// Writes `grad_output * dloss/dz` for all `rows x dim` values of `z` into `grad`
    /// (overwriting it). With anchors that are a part of the rows, the rows outside them still
    /// get the gradient through their role as negatives and positives.
    pub fn backward(&self, grad_output: f32, grad: &mut [f32]) -> Result<(), NtXentError> {
        let (rows, dim) = (self.plan.rows, self.plan.dim);
        if grad.len() != rows * dim {
            return Err(NtXentError::LengthMismatch {
                what: "grad",
                expected: rows * dim,
                actual: grad.len(),
            });
        }
        if !grad_output.is_finite() {
            return Err(NtXentError::BadGradOutput(grad_output));
        }
        if self.anchors.is_empty() || grad_output == 0.0 {
            grad.fill(0.0);
            return Ok(());
        }
        // See `new` for why the work runs inside a scope.
        rayon::scope(|_| self.backward_on_pool(grad_output, grad));
        Ok(())
    }

    fn backward_on_pool(&self, grad_output: f32, grad: &mut [f32]) {
        let plan = &self.plan;
        let (rows, dim, dp) = (plan.rows, plan.dim, plan.dp);
        let g = backward_g(
            &self.packed,
            plan,
            &self.lse,
            &self.anchors,
            self.temperature,
        );
        let ua = &self.packed.ua;
        let u_row = |i: usize, out: &mut [f64]| {
            let panel = &ua[i / MR * dim..][..dim];
            for (o, step) in out.iter_mut().zip(panel) {
                *o = step[i % MR] as f64;
            }
        };
        let n = rows / 2;
        let scale = grad_output as f64 / (self.temperature as f64 * rows as f64);
        let anchors = &self.anchors;
        grad.par_chunks_mut(dim).enumerate().for_each_init(
            || (vec![0.0f64; dim], vec![0.0f64; dim], vec![0.0f64; dim]),
            |(h, ui, up), (i, out)| {
                let pos = (i + n) % rows;
                u_row(i, ui);
                u_row(pos, up);
                // The positives' term of C: -(a_i + a_pos) with a_j = [j is an anchor].
                let y = (anchors.contains(&i) as u8 + anchors.contains(&pos) as u8) as f64;
                for ((h, &gv), &pv) in h.iter_mut().zip(&g[i * dp..][..dim]).zip(up.iter()) {
                    *h = (gv as f64 - y * pv) * scale;
                }
                let norm = self.norms[i];
                if norm >= NORM_EPS {
                    let dot: f64 = h.iter().zip(ui.iter()).map(|(a, b)| a * b).sum();
                    for ((o, &hv), &uv) in out.iter_mut().zip(h.iter()).zip(ui.iter()) {
                        *o = ((hv - uv * dot) / norm) as f32;
                    }
                } else {
                    for (o, &hv) in out.iter_mut().zip(h.iter()) {
                        *o = (hv / NORM_EPS) as f32;
                    }
                }
            },
        );
    }
}

impl Drop for NtXentForward {
    fn drop(&mut self) {
        pool::PANEL_MR.give(std::mem::take(&mut self.packed.ua));
        pool::PANEL_NR.give(std::mem::take(&mut self.packed.ub));
    }
}

/// The NT-Xent loss of `z` (`rows x dim`, row-major, `rows = 2N`), averaged over all rows.
pub fn nt_xent_forward(
    z: &[f32],
    rows: usize,
    dim: usize,
    cfg: &NtXentConfig,
) -> Result<f32, NtXentError> {
    nt_xent_forward_anchors(z, rows, dim, 0..rows, cfg)
}

/// The summed loss of the anchor rows `anchors` of `z`, divided by `rows` (all rows are the
/// negatives): one replica's share of the data-parallel loss.
pub fn nt_xent_forward_anchors(
    z: &[f32],
    rows: usize,
    dim: usize,
    anchors: Range<usize>,
    cfg: &NtXentConfig,
) -> Result<f32, NtXentError> {
    Ok(NtXentForward::new(z, rows, dim, anchors, cfg)?.loss())
}

/// The NT-Xent loss of `z` and its gradient `dloss/dz`, written into `grad` (`rows x dim`).
pub fn nt_xent_forward_backward(
    z: &[f32],
    rows: usize,
    dim: usize,
    cfg: &NtXentConfig,
    grad: &mut [f32],
) -> Result<f32, NtXentError> {
    nt_xent_forward_backward_anchors(z, rows, dim, 0..rows, cfg, 1.0, grad)
}

/// One replica's share: the loss of the anchor rows `anchors` divided by `rows`, and
/// `grad_output` times its gradient with respect to all `rows x dim` values of `z`, written into
/// `grad`. Summing over replicas whose ranges partition `0..rows` gives the full loss and
/// gradient.
pub fn nt_xent_forward_backward_anchors(
    z: &[f32],
    rows: usize,
    dim: usize,
    anchors: Range<usize>,
    cfg: &NtXentConfig,
    grad_output: f32,
    grad: &mut [f32],
) -> Result<f32, NtXentError> {
    // Check the cheap arguments of the backward before paying for the forward.
    if let Some(expected) = rows.checked_mul(dim) {
        if grad.len() != expected && z.len() == expected {
            return Err(NtXentError::LengthMismatch {
                what: "grad",
                expected,
                actual: grad.len(),
            });
        }
    }
    if !grad_output.is_finite() {
        return Err(NtXentError::BadGradOutput(grad_output));
    }
    // One scope around both passes (each also opens its own, which is then free).
    rayon::scope(|_| {
        let fwd = NtXentForward::new(z, rows, dim, anchors, cfg)?;
        fwd.backward(grad_output, grad)?;
        Ok(fwd.loss())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_cover_every_pair_once_without_conflicts() {
        for nb in 0..40 {
            let rs = rounds(nb);
            let mut seen = vec![vec![0u32; nb]; nb];
            for round in &rs {
                let mut used = vec![false; nb];
                for &(i, k) in round {
                    assert!(i < k && k < nb, "nb {nb}: pair ({i}, {k})");
                    assert!(!used[i] && !used[k], "nb {nb}: block twice in a round");
                    used[i] = true;
                    used[k] = true;
                    seen[i][k] += 1;
                }
            }
            for i in 0..nb {
                for k in i + 1..nb {
                    assert_eq!(seen[i][k], 1, "nb {nb}: pair ({i}, {k})");
                }
            }
            let want = if nb < 2 { 0 } else { nb + nb % 2 - 1 };
            assert_eq!(rs.len(), want);
        }
    }

    #[test]
    fn block_choice_is_a_valid_tile() {
        for rows in [2, 4, 64, 130, 512, 2048, 8192, 100_000] {
            for dim in [1, 16, 128, 2048] {
                for threads in [1, 2, 16, 64] {
                    let b = choose_block(rows, dim, threads);
                    assert!(BLOCK_SIZES.contains(&b));
                    assert_eq!(b % MR, 0);
                    assert_eq!(b % NR, 0);
                }
            }
        }
        // Large problems on few cores use the larger tiles.
        assert!(choose_block(8192, 128, 2) >= 96);
    }

    #[test]
    fn fixed_shift_and_online_paths_agree() {
        // The same z at a temperature just above and just below the switch: the losses differ
        // only through tau, so compare each path against the formula via a tiny tau change.
        let (rows, dim) = (200, 24);
        let z: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) + (i % dim) as f32 * 0.01)
            .collect();
        let above = FIXED_SHIFT_MIN_TAU * 1.0001;
        let below = FIXED_SHIFT_MIN_TAU * 0.9999;
        let mut ga = vec![0.0; rows * dim];
        let mut gb = vec![0.0; rows * dim];
        let la =
            nt_xent_forward_backward(&z, rows, dim, &NtXentConfig::new(above), &mut ga).unwrap();
        let lb =
            nt_xent_forward_backward(&z, rows, dim, &NtXentConfig::new(below), &mut gb).unwrap();
        assert!((la - lb).abs() < 2e-3 * la.abs().max(1.0), "{la} vs {lb}");
        let scale = ga.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, b) in ga.iter().zip(&gb) {
            assert!((a - b).abs() < 2e-3 * scale, "{a} vs {b}");
        }
    }
}

//! The fused NT-Xent kernel against a plain `f64` implementation that holds the full matrix,
//! finite differences, invariants of the loss, and the error cases.

use std::ops::Range;

use proptest::prelude::*;
use simclr_kernels::cpu::ntxent::{
    nt_xent_forward, nt_xent_forward_anchors, nt_xent_forward_backward,
    nt_xent_forward_backward_anchors, NtXentConfig, NtXentError, NtXentForward,
};

// ---------------------------------------------------------------------------------------------
// Helpers

/// splitmix64 and Box-Muller: deterministic normal samples without extra dependencies.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (a, b) = (self.uniform(), self.uniform());
        ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
    }
}

fn normal_z(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..rows * dim).map(|_| rng.normal()).collect()
}

/// z whose second view is a noisy copy of the first, like real SimCLR projections late in
/// training: positives are close, which exercises large softmax weights on the positives.
fn correlated_z(rows: usize, dim: usize, noise: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let n = rows / 2;
    let mut z: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
    for i in 0..n {
        for c in 0..dim {
            z[(i + n) * dim + c] = z[i * dim + c] + noise * z[(i + n) * dim + c];
        }
    }
    z
}

const EPS: f64 = 1e-12;

/// The loss of the anchors `anchors` divided by `rows`, and its gradient, in `f64` with the
/// full `rows x rows` similarity matrix: the textbook formula, written for clarity.
fn reference(
    z: &[f32],
    rows: usize,
    dim: usize,
    tau: f64,
    anchors: Range<usize>,
) -> (f64, Vec<f64>) {
    let z: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    reference_f64(&z, rows, dim, tau, anchors)
}

fn reference_f64(
    z: &[f64],
    rows: usize,
    dim: usize,
    tau: f64,
    anchors: Range<usize>,
) -> (f64, Vec<f64>) {
    let n = rows / 2;
    let norm: Vec<f64> = z
        .chunks(dim)
        .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    let u: Vec<Vec<f64>> = z
        .chunks(dim)
        .zip(&norm)
        .map(|(r, &nr)| r.iter().map(|v| v / nr.max(EPS)).collect())
        .collect();
    let s: Vec<Vec<f64>> = (0..rows)
        .map(|i| {
            (0..rows)
                .map(|k| u[i].iter().zip(&u[k]).map(|(a, b)| a * b).sum::<f64>() / tau)
                .collect()
        })
        .collect();
    let mut loss = 0.0;
    let mut gu = vec![vec![0.0f64; dim]; rows];
    for i in anchors {
        let pos = (i + n) % rows;
        let mx = (0..rows)
            .filter(|&k| k != i)
            .map(|k| s[i][k])
            .fold(f64::NEG_INFINITY, f64::max);
        let lse = mx
            + (0..rows)
                .filter(|&k| k != i)
                .map(|k| (s[i][k] - mx).exp())
                .sum::<f64>()
                .ln();
        loss += lse - s[i][pos];
        for k in (0..rows).filter(|&k| k != i) {
            let y = if k == pos { 1.0 } else { 0.0 };
            let w = ((s[i][k] - lse).exp() - y) / (tau * rows as f64);
            for c in 0..dim {
                gu[i][c] += w * u[k][c];
                gu[k][c] += w * u[i][c];
            }
        }
    }
    let mut dz = vec![0.0f64; rows * dim];
    for i in 0..rows {
        let out = &mut dz[i * dim..][..dim];
        if norm[i] >= EPS {
            let dot: f64 = gu[i].iter().zip(&u[i]).map(|(a, b)| a * b).sum();
            for c in 0..dim {
                out[c] = (gu[i][c] - u[i][c] * dot) / norm[i];
            }
        } else {
            for c in 0..dim {
                out[c] = gu[i][c] / EPS;
            }
        }
    }
    (loss / rows as f64, dz)
}

/// The size of the terms whose differences make up the gradient: `P_ik u_k / (tau M |z_i|)`
/// with `P` up to 1. When the softmax saturates (two rows, or a tiny temperature) the gradient
/// itself is orders of magnitude smaller than its terms, and its `f32` rounding error is
/// relative to this, not to the gradient.
fn grad_floor(z: &[f32], rows: usize, dim: usize, tau: f64) -> f64 {
    let min_norm = z
        .chunks(dim)
        .map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
        .fold(f64::INFINITY, f64::min)
        .max(1e-12);
    0.1 / (tau * rows as f64 * min_norm)
}

/// Asserts `got` matches `want` to `rel` of the largest `|want|` (or `floor`, whichever is
/// larger) per element, and in norm, printing the first mismatches.
fn assert_grad_close(got: &[f32], want: &[f64], rel: f64, floor: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(floor);
    let bad: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| ((**g as f64) - **w).abs() > rel * scale || !g.is_finite())
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g:e} want {w:e}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{ctx}: gradient mismatch (tolerance {rel:e} x max |want| = {scale:e}): {}",
        bad.join(", ")
    );
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    assert!(
        num.sqrt() <= rel * den.sqrt().max(floor * (want.len() as f64).sqrt()),
        "{ctx}: gradient relative error in norm {:e}",
        num.sqrt() / den.sqrt()
    );
}

/// How far an `f32` loss may be from the exact one: the loss is a difference of a log-sum-exp
/// and a similarity, each up to about `1/tau + ln(rows)` in size, so its rounding error scales
/// with them, not with the (possibly tiny, even 0 for two rows) loss itself.
fn loss_scale(loss: f64, tau: f64, rows: usize) -> f64 {
    loss.abs() + 1.0 / tau + (rows as f64).ln()
}

fn assert_loss_close(got: f32, want: f64, rel: f64, tau: f64, rows: usize, ctx: &str) {
    let tol = rel * loss_scale(want, tau, rows);
    assert!(
        ((got as f64) - want).abs() <= tol,
        "{ctx}: loss {got} vs reference {want} (difference {:e}, tolerance {tol:e})",
        ((got as f64) - want).abs()
    );
}

fn fused(z: &[f32], rows: usize, dim: usize, tau: f32) -> (f32, Vec<f32>) {
    let mut g = vec![f32::NAN; rows * dim];
    let loss = nt_xent_forward_backward(z, rows, dim, &NtXentConfig::new(tau), &mut g).unwrap();
    (loss, g)
}

// ---------------------------------------------------------------------------------------------
// Against the reference

const SHAPES_ROWS: [usize; 7] = [2, 4, 6, 10, 64, 130, 258];
const SHAPES_DIMS: [usize; 4] = [1, 3, 16, 128];

#[test]
fn matches_reference_on_many_shapes() {
    for (si, &rows) in SHAPES_ROWS.iter().enumerate() {
        for (di, &dim) in SHAPES_DIMS.iter().enumerate() {
            for &tau in &[0.5f32, 0.1] {
                let seed = (si * 10 + di) as u64;
                let z = normal_z(rows, dim, seed);
                let ctx = format!("rows {rows} dim {dim} tau {tau}");
                let (loss, g) = fused(&z, rows, dim, tau);
                let (rl, rg) = reference(&z, rows, dim, tau as f64, 0..rows);
                assert_loss_close(loss, rl, 1e-6, tau as f64, rows, &ctx);
                assert_grad_close(&g, &rg, 2e-5, grad_floor(&z, rows, dim, tau as f64), &ctx);
                let fwd = nt_xent_forward(&z, rows, dim, &NtXentConfig::new(tau)).unwrap();
                assert_eq!(
                    fwd, loss,
                    "{ctx}: forward alone differs from forward+backward"
                );
            }
        }
    }
}

#[test]
fn matches_reference_with_many_blocks() {
    // Enough rows for several tiles in both directions, an odd and an even number of blocks,
    // and rows that are not a multiple of any tile side.
    for &(rows, dim, tau) in &[
        (600usize, 128usize, 0.5f32),
        (1000, 20, 0.1),
        (1154, 7, 0.2),
        (2 * 500, 33, 0.07),
    ] {
        let z = correlated_z(rows, dim, 0.3, rows as u64);
        let ctx = format!("rows {rows} dim {dim} tau {tau}");
        let (loss, g) = fused(&z, rows, dim, tau);
        let (rl, rg) = reference(&z, rows, dim, tau as f64, 0..rows);
        assert_loss_close(loss, rl, 1e-6, tau as f64, rows, &ctx);
        assert_grad_close(&g, &rg, 2e-5, grad_floor(&z, rows, dim, tau as f64), &ctx);
    }
}

#[test]
fn small_temperature_uses_the_online_max() {
    // tau = 0.01: similarities span [-100, 100]; a fixed shift of the exponentials would
    // underflow to 0 for rows far from every other row.
    for &(rows, dim) in &[(10usize, 3usize), (258, 16), (400, 64)] {
        let z = correlated_z(rows, dim, 0.5, 7);
        let (loss, g) = fused(&z, rows, dim, 0.01);
        let (rl, rg) = reference(&z, rows, dim, 0.01, 0..rows);
        let ctx = format!("rows {rows} dim {dim} tau 0.01");
        assert_loss_close(loss, rl, 1e-6, 0.01, rows, &ctx);
        assert_grad_close(&g, &rg, 2e-5, grad_floor(&z, rows, dim, 0.01), &ctx);
    }
}

#[test]
fn anchor_ranges_partition_the_loss_and_gradient() {
    // tau = 0.3 takes the fixed-shift path, tau = 0.01 the online-max one.
    for &(rows, dim, tau) in &[
        (2usize, 3usize, 0.3f32),
        (10, 16, 0.3),
        (130, 3, 0.3),
        (258, 128, 0.3),
        (600, 16, 0.3),
        (10, 16, 0.01),
        (258, 8, 0.01),
    ] {
        let z = correlated_z(rows, dim, 0.5, rows as u64 + 1);
        let cfg = NtXentConfig::new(tau);
        let mut full_g = vec![0.0f32; rows * dim];
        let full = nt_xent_forward_backward(&z, rows, dim, &cfg, &mut full_g).unwrap();
        // Uneven cuts, an empty range, a cut inside a tile and one at a tile edge.
        let mut cuts = vec![0, rows / 3, rows / 3, rows / 2 + 1, rows];
        cuts.sort_unstable();
        cuts.dedup_by(|a, b| *a == *b && *a != rows / 3);
        let mut sum_loss = 0.0f64;
        let mut sum_g = vec![0.0f64; rows * dim];
        for w in cuts.windows(2) {
            let r = w[0]..w[1];
            let mut g = vec![f32::NAN; rows * dim];
            let l = nt_xent_forward_backward_anchors(&z, rows, dim, r.clone(), &cfg, 1.0, &mut g)
                .unwrap();
            assert_eq!(
                l,
                nt_xent_forward_anchors(&z, rows, dim, r.clone(), &cfg).unwrap()
            );
            let (rl, rg) = reference(&z, rows, dim, tau as f64, r.clone());
            let ctx = format!("rows {rows} dim {dim} tau {tau} anchors {r:?}");
            assert_loss_close(l, rl, 1e-6, tau as f64, rows, &ctx);
            if !r.is_empty() {
                assert_grad_close(&g, &rg, 2e-5, grad_floor(&z, rows, dim, tau as f64), &ctx);
            } else {
                assert!(
                    g.iter().all(|&v| v == 0.0),
                    "{ctx}: empty range has a gradient"
                );
            }
            sum_loss += l as f64;
            for (s, v) in sum_g.iter_mut().zip(&g) {
                *s += *v as f64;
            }
        }
        let ctx = format!("rows {rows} dim {dim} tau {tau}: sum over replicas");
        assert_loss_close(full, sum_loss, 1e-6, tau as f64, rows, &ctx);
        let sum_g32: Vec<f32> = sum_g.iter().map(|&v| v as f32).collect();
        let full_g64: Vec<f64> = full_g.iter().map(|&v| v as f64).collect();
        assert_grad_close(
            &sum_g32,
            &full_g64,
            1e-5,
            grad_floor(&z, rows, dim, tau as f64),
            &ctx,
        );
    }
}

#[test]
fn grad_output_scales_the_gradient() {
    let (rows, dim) = (64, 16);
    let z = normal_z(rows, dim, 3);
    let cfg = NtXentConfig::new(0.5);
    let fwd = NtXentForward::new(&z, rows, dim, 0..rows, &cfg).unwrap();
    let mut g1 = vec![0.0f32; rows * dim];
    let mut g3 = vec![0.0f32; rows * dim];
    fwd.backward(1.0, &mut g1).unwrap();
    fwd.backward(-3.0, &mut g3).unwrap();
    for (a, b) in g1.iter().zip(&g3) {
        assert!((a * -3.0 - b).abs() <= 1e-6 * a.abs().max(1e-3), "{a} {b}");
    }
    let mut g0 = vec![1.0f32; rows * dim];
    fwd.backward(0.0, &mut g0).unwrap();
    assert!(g0.iter().all(|&v| v == 0.0));
    assert_eq!(fwd.log_sum_exp().len(), rows);
    assert_eq!(fwd.anchors(), 0..rows);
}

#[test]
fn zero_rows_follow_torch_normalize() {
    // A zero row has norm 0 < eps: u = 0, and F.normalize's clamp makes dz = g / eps.
    let (rows, dim) = (6, 4);
    let mut z = normal_z(rows, dim, 11);
    z[dim..2 * dim].fill(0.0);
    let (loss, g) = fused(&z, rows, dim, 0.5);
    let (rl, rg) = reference(&z, rows, dim, 0.5, 0..rows);
    assert_loss_close(loss, rl, 1e-6, 0.5, rows, "zero row");
    let floor = grad_floor(&z[2 * dim..], rows, dim, 0.5);
    assert_grad_close(&g, &rg, 2e-5, floor, "zero row");
}

#[test]
fn results_are_reproducible_and_agree_across_thread_counts() {
    // For a given thread count the schedule fixes the order of every addition, so repeated
    // runs agree bit for bit; other thread counts may pick another tile size, so they agree
    // to rounding.
    let (rows, dim) = (600, 32);
    let z = normal_z(rows, dim, 5);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| fused(&z, rows, dim, 0.2))
    };
    for threads in [1, 2, 3] {
        let (l1, g1) = run(threads);
        let (l2, g2) = run(threads);
        assert_eq!(
            l1.to_bits(),
            l2.to_bits(),
            "{threads} threads: loss differs"
        );
        assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let (l1, g1) = run(1);
    let (l4, g4) = run(4);
    assert!((l1 - l4).abs() <= 1e-6 * l1);
    let scale = g1.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(g1
        .iter()
        .zip(&g4)
        .all(|(a, b)| (a - b).abs() <= 1e-5 * scale));
}

// ---------------------------------------------------------------------------------------------
// Finite differences

#[test]
fn reference_gradient_matches_finite_differences() {
    // Check the reference's analytic gradient itself, in f64, so that it can vouch for the
    // fused one.
    let (rows, dim, tau) = (6, 5, 0.2);
    let z: Vec<f64> = normal_z(rows, dim, 21).iter().map(|&v| v as f64).collect();
    for anchors in [0..rows, 1..4] {
        let (_, g) = reference_f64(&z, rows, dim, tau, anchors.clone());
        let h = 1e-6;
        for j in 0..rows * dim {
            let mut zp = z.clone();
            let mut zm = z.clone();
            zp[j] += h;
            zm[j] -= h;
            let fd = (reference_f64(&zp, rows, dim, tau, anchors.clone()).0
                - reference_f64(&zm, rows, dim, tau, anchors.clone()).0)
                / (2.0 * h);
            assert!((fd - g[j]).abs() < 1e-7, "[{j}] fd {fd} analytic {}", g[j]);
        }
    }
}

#[test]
fn fused_gradient_matches_finite_differences() {
    // Central differences of the f64 reference loss at the f32 input (the fused loss itself is
    // only f32-accurate, too coarse to difference); the fused gradient must match them.
    for &(rows, dim, tau) in &[(4usize, 3usize, 0.5f64), (10, 8, 0.1), (130, 4, 0.3)] {
        let z = correlated_z(rows, dim, 0.5, 31);
        let (_, g) = fused(&z, rows, dim, tau as f32);
        let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
        let scale = (g.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64)
            .max(grad_floor(&z, rows, dim, tau));
        let step = (rows * dim / 40).max(1);
        for j in (0..rows * dim).step_by(step) {
            let h = 1e-5 * z64[j].abs().max(1.0);
            let mut zp = z64.clone();
            let mut zm = z64.clone();
            zp[j] += h;
            zm[j] -= h;
            let fd = (reference_f64(&zp, rows, dim, tau, 0..rows).0
                - reference_f64(&zm, rows, dim, tau, 0..rows).0)
                / (2.0 * h);
            assert!(
                (fd - g[j] as f64).abs() <= 2e-5 * scale + 1e-8,
                "rows {rows} dim {dim} [{j}] fd {fd} fused {}",
                g[j]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Invariants

fn shape() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=40, 1usize..=24).prop_map(|(n, d)| (2 * n, d))
}

proptest! {
    // No regression files: the failing input is printed, and the tests stay self-contained.
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn loss_is_positive_and_gradient_is_orthogonal_to_rows(
        (rows, dim) in shape(), seed in any::<u64>(), tau in 0.05f32..2.0,
    ) {
        let z = normal_z(rows, dim, seed);
        let (loss, g) = fused(&z, rows, dim, tau);
        // Positive in exact arithmetic (the sum includes the positive); with two rows it is 0.
        let tol = 1e-6 * loss_scale(loss as f64, tau as f64, rows);
        prop_assert!(loss.is_finite() && loss as f64 >= -tol, "loss {}", loss);
        prop_assert_eq!(g.len(), z.len());
        // Rounding leaves a component along z_i relative to the terms of the gradient (see
        // grad_floor), not to the (possibly much smaller) gradient itself.
        let floor = grad_floor(&z, rows, dim, tau as f64);
        for (zi, gi) in z.chunks(dim).zip(g.chunks(dim)) {
            let dot: f64 = zi.iter().zip(gi).map(|(a, b)| *a as f64 * *b as f64).sum();
            let nz: f64 = zi.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let ng: f64 = gi.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            prop_assert!(
                dot.abs() <= 1e-5 * nz * ng.max(floor),
                "z.g = {} (|z| {} |g| {})", dot, nz, ng
            );
        }
    }

    #[test]
    fn loss_is_invariant_to_row_scaling(
        (rows, dim) in shape(), seed in any::<u64>(),
        factors in proptest::collection::vec(0.01f32..100.0, 80),
    ) {
        let z = normal_z(rows, dim, seed);
        let mut zs = z.clone();
        for (i, row) in zs.chunks_mut(dim).enumerate() {
            for v in row {
                *v *= factors[i];
            }
        }
        let (l, g) = fused(&z, rows, dim, 0.5);
        let (ls, gs) = fused(&zs, rows, dim, 0.5);
        let tol = 1e-6 * loss_scale(l as f64, 0.5, rows);
        prop_assert!(((l - ls).abs() as f64) <= tol, "{} vs {}", l, ls);
        // d loss / d (c z) = (d loss / d z) / c.
        let scale = g.iter().fold(0.0f32, |m, v| m.max(v.abs()))
            .max(grad_floor(&z, rows, dim, 0.5) as f32);
        for (i, (a, b)) in g.chunks(dim).zip(gs.chunks(dim)).enumerate() {
            for (x, y) in a.iter().zip(b) {
                prop_assert!((x / factors[i] - y).abs() <= 1e-4 * scale / factors[i],
                    "row {}: {} / {} vs {}", i, x, factors[i], y);
            }
        }
    }

    #[test]
    fn identical_rows_give_log_m_minus_one(
        (rows, dim) in shape(), seed in any::<u64>(), tau in 0.05f32..2.0,
    ) {
        let row = normal_z(1, dim, seed);
        let z: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
        let (loss, g) = fused(&z, rows, dim, tau);
        let want = ((rows - 1) as f32).ln();
        let tol = 1e-6 * loss_scale(want as f64, tau as f64, rows);
        prop_assert!(((loss - want).abs() as f64) <= tol, "{} vs {}", loss, want);
        let nz = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        for v in &g {
            prop_assert!(v.abs() <= 1e-5 / (tau * nz), "gradient {}", v);
        }
    }

    #[test]
    fn permuting_images_permutes_the_gradient(
        (rows, dim) in shape(), seed in any::<u64>(), swap_views in any::<bool>(),
    ) {
        let n = rows / 2;
        let z = normal_z(rows, dim, seed);
        // A permutation of the images (a rotation and a reversal), applied to both views, and
        // optionally the two views exchanged: row new_i of zp is row src(new_i) of z.
        let img = |j: usize| (n - 1 - j + seed as usize % n) % n;
        let src = |new_i: usize| {
            let (view, j) = (new_i / n, new_i % n);
            let view = if swap_views { 1 - view } else { view };
            view * n + img(j)
        };
        let zp: Vec<f32> = (0..rows).flat_map(|i| z[src(i) * dim..][..dim].to_vec()).collect();
        let (l, g) = fused(&z, rows, dim, 0.4);
        let (lp, gp) = fused(&zp, rows, dim, 0.4);
        let tol = 1e-6 * loss_scale(l as f64, 0.4, rows);
        prop_assert!(((l - lp).abs() as f64) <= tol, "{} vs {}", l, lp);
        let scale = g.iter().fold(0.0f32, |m, v| m.max(v.abs()))
            .max(grad_floor(&z, rows, dim, 0.4) as f32);
        for i in 0..rows {
            for c in 0..dim {
                let (a, b) = (gp[i * dim + c], g[src(i) * dim + c]);
                prop_assert!((a - b).abs() <= 1e-5 * scale, "row {} col {}: {} vs {}", i, c, a, b);
            }
        }
    }

    #[test]
    fn fused_matches_reference_on_random_shapes(
        (rows, dim) in shape(), seed in any::<u64>(), tau in 0.05f32..2.0,
        a in 0usize..80, b in 0usize..80,
    ) {
        let z = correlated_z(rows, dim, 0.7, seed);
        let (a, b) = (a.min(rows), b.min(rows));
        let anchors = a.min(b)..a.max(b);
        let mut g = vec![0.0f32; rows * dim];
        let cfg = NtXentConfig::new(tau);
        let l = nt_xent_forward_backward_anchors(&z, rows, dim, anchors.clone(), &cfg, 1.0, &mut g)
            .unwrap();
        let (rl, rg) = reference(&z, rows, dim, tau as f64, anchors.clone());
        let scale = rg
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(grad_floor(&z, rows, dim, tau as f64));
        let tol = 1e-6 * loss_scale(rl, tau as f64, rows);
        prop_assert!((l as f64 - rl).abs() <= tol, "{} vs {}", l, rl);
        for (x, y) in g.iter().zip(&rg) {
            prop_assert!((*x as f64 - y).abs() <= 2e-5 * scale + 1e-12, "{} vs {}", x, y);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn bad_inputs_are_errors() {
    let cfg = NtXentConfig::default();
    let z = normal_z(4, 3, 1);
    let mut g = vec![0.0f32; 12];
    let fb = |z: &[f32], rows, dim, cfg: &NtXentConfig, g: &mut [f32]| {
        nt_xent_forward_backward(z, rows, dim, cfg, g)
    };

    assert_eq!(
        nt_xent_forward(&z[..9], 3, 3, &cfg),
        Err(NtXentError::BadRows { rows: 3 })
    );
    assert_eq!(
        nt_xent_forward(&[], 0, 3, &cfg),
        Err(NtXentError::BadRows { rows: 0 })
    );
    assert_eq!(
        nt_xent_forward(&z[..0], 4, 0, &cfg),
        Err(NtXentError::ZeroDim)
    );
    assert!(matches!(
        nt_xent_forward(&z[..11], 4, 3, &cfg),
        Err(NtXentError::LengthMismatch {
            what: "z",
            expected: 12,
            actual: 11
        })
    ));
    assert!(matches!(
        nt_xent_forward(&z, usize::MAX - 1, 3, &cfg),
        Err(NtXentError::TooLarge { .. })
    ));
    assert!(matches!(
        fb(&z, 4, 3, &cfg, &mut g[..10]),
        Err(NtXentError::LengthMismatch {
            what: "grad",
            expected: 12,
            actual: 10
        })
    ));
    for t in [0.0, -0.5, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            fb(&z, 4, 3, &NtXentConfig::new(t), &mut g),
            Err(NtXentError::BadTemperature(_))
        ));
    }
    for (row, bad) in [
        (2usize, f32::NAN),
        (0, f32::INFINITY),
        (3, f32::NEG_INFINITY),
    ] {
        let mut zb = z.clone();
        zb[row * 3 + 1] = bad;
        zb[11] = if row == 3 { bad } else { zb[11] };
        assert_eq!(
            fb(&zb, 4, 3, &cfg, &mut g),
            Err(NtXentError::NonFinite { row })
        );
    }
    let mut zb = z.clone();
    zb[4] = f32::NAN;
    zb[10] = f32::NAN;
    assert_eq!(
        nt_xent_forward(&zb, 4, 3, &cfg),
        Err(NtXentError::NonFinite { row: 1 }),
        "the first bad row is named"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 3..2;
    for r in [reversed, 0..5, 4..5] {
        assert!(matches!(
            nt_xent_forward_anchors(&z, 4, 3, r.clone(), &cfg),
            Err(NtXentError::BadAnchors { .. })
        ));
        assert!(matches!(
            nt_xent_forward_backward_anchors(&z, 4, 3, r, &cfg, 1.0, &mut g),
            Err(NtXentError::BadAnchors { .. })
        ));
    }
    assert!(matches!(
        nt_xent_forward_backward_anchors(&z, 4, 3, 0..4, &cfg, f32::NAN, &mut g),
        Err(NtXentError::BadGradOutput(_))
    ));
    let fwd = NtXentForward::new(&z, 4, 3, 0..4, &cfg).unwrap();
    assert!(matches!(
        fwd.backward(1.0, &mut g[..3]),
        Err(NtXentError::LengthMismatch { what: "grad", .. })
    ));
    assert!(matches!(
        fwd.backward(f32::INFINITY, &mut g),
        Err(NtXentError::BadGradOutput(_))
    ));
    // The messages name what is wrong.
    let msg = NtXentError::NonFinite { row: 7 }.to_string();
    assert!(msg.contains("row 7"), "{msg}");
    // Huge but finite values are fine (norms are taken in f64).
    let zh: Vec<f32> = z.iter().map(|v| v * 1e37).collect();
    let lh = fb(&zh, 4, 3, &cfg, &mut g).unwrap();
    let l = nt_xent_forward(&z, 4, 3, &cfg).unwrap();
    assert!((l - lh).abs() < 1e-6 * l);
    assert!(g.iter().all(|v| v.is_finite()));
}

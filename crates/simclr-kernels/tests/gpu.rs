//! Every CUDA kernel against its CPU twin. These tests need an NVIDIA GPU with CUDA 13 and
//! NVRTC on the library path; elsewhere each prints that it skipped and passes. The tests that
//! need no GPU (the errors without one) are at the end.

use simclr_kernels::augment::{pack_jitter_order, ViewParams};
use simclr_kernels::cpu;
use simclr_kernels::cpu::ntxent::NtXentConfig;
use simclr_kernels::cuda::augment::{AugOutput, AugmentGpu, Layout};
use simclr_kernels::cuda::ntxent::{NtXentGpu, Precision};
use simclr_kernels::cuda::train::{self, BatchNormGpu, BnParams, LarsConfig, LarsGpu, LarsTensor};
use simclr_kernels::cuda::{gpu_available, Gpu, GpuError};

use half::bf16;

/// Without a GPU a GPU test prints that it skipped, unless `SIMCLR_REQUIRE_GPU=1` (CI on the
/// emulated device, the GPU machine's check), where skipping is a failure.
fn skip_without_gpu(test: &str) {
    if std::env::var("SIMCLR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: no CUDA driver or no GPU, and SIMCLR_REQUIRE_GPU=1 forbids skipping");
    }
    println!("{test}: skipped (no CUDA driver or no GPU on this machine)");
}

fn gpu_or_skip(test: &str) -> Option<Gpu> {
    if !gpu_available() {
        skip_without_gpu(test);
        return None;
    }
    match Gpu::new(0) {
        Ok(g) => {
            println!("{test}: on {}", g.name().unwrap_or_else(|e| e.to_string()));
            Some(g)
        }
        Err(e) => panic!("{test}: a GPU is present but could not be opened: {e}"),
    }
}

/// A small deterministic generator (splitmix64) for test data.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// max |a - b| / max(max |b|, floor).
fn rel_max_diff(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Embeddings whose positives are correlated with their anchors, as in training.
fn embeddings(rng: &mut Rng, rows: usize, dim: usize) -> Vec<f32> {
    let mut z = rng.vec(rows * dim);
    let n = rows / 2;
    for i in 0..n {
        for j in 0..dim {
            z[(n + i) * dim + j] = z[i * dim + j] + 0.5 * z[(n + i) * dim + j];
        }
    }
    z
}

fn check_ntxent(
    gpu: &Gpu,
    rows: usize,
    dim: usize,
    tau: f32,
    prec: Precision,
    tol_loss: f32,
    tol_grad: f32,
) {
    let mut rng = Rng(rows as u64 * 31 + dim as u64);
    let mut z = embeddings(&mut rng, rows, dim);
    // A zero row exercises the norm clamp.
    z[..dim].fill(0.0);
    let mut want_g = vec![0.0; rows * dim];
    let want =
        cpu::nt_xent_forward_backward(&z, rows, dim, &NtXentConfig::new(tau), &mut want_g).unwrap();
    let zd = gpu.upload(&z).unwrap();
    let mut gd = gpu.zeros::<f32>(rows * dim).unwrap();
    let mut ws = NtXentGpu::new(gpu, rows, dim, prec).unwrap();
    let got = ws.forward_backward(gpu, &zd, tau, &mut gd).unwrap();
    let got_g = gpu.download(&gd).unwrap();
    let what = format!("rows {rows} dim {dim} tau {tau} {prec:?}");
    assert!(
        (got - want).abs() <= tol_loss * want.abs().max(1.0),
        "{what}: loss {got} vs CPU {want}"
    );
    let d = rel_max_diff(&got_g, &want_g, 1e-12);
    assert!(
        d <= tol_grad,
        "{what}: gradient differs from the CPU's by {d} of its max"
    );
}

#[test]
fn gpu_ntxent_matches_cpu_twin() {
    let Some(gpu) = gpu_or_skip("gpu_ntxent_matches_cpu_twin") else {
        return;
    };
    for (rows, dim) in [(8, 3), (130, 128), (512, 128), (256, 200), (2048, 64)] {
        for tau in [0.5, 0.1, 0.01] {
            check_ntxent(&gpu, rows, dim, tau, Precision::F32, 2e-5, 2e-4);
            check_ntxent(&gpu, rows, dim, tau, Precision::Tf32, 3e-3, 3e-2);
            check_ntxent(&gpu, rows, dim, tau, Precision::Bf16, 1e-2, 6e-2);
        }
    }
}

#[test]
fn gpu_ntxent_anchor_shares_sum_to_the_whole() {
    let Some(gpu) = gpu_or_skip("gpu_ntxent_anchor_shares_sum_to_the_whole") else {
        return;
    };
    let (rows, dim, tau) = (384, 96, 0.2);
    let mut rng = Rng(7);
    let z = embeddings(&mut rng, rows, dim);
    let zd = gpu.upload(&z).unwrap();
    for prec in [Precision::F32, Precision::Bf16] {
        let mut ws = NtXentGpu::new(&gpu, rows, dim, prec).unwrap();
        let mut total = 0.0;
        let mut gsum = vec![0.0f32; rows * dim];
        for k in 0..4 {
            let anchors = k * rows / 4..(k + 1) * rows / 4;
            let mut gd = gpu.zeros::<f32>(rows * dim).unwrap();
            let l = ws
                .forward_backward_anchors(&gpu, &zd, anchors.clone(), tau, &mut gd)
                .unwrap();
            let g = gpu.download(&gd).unwrap();
            // The CPU twin's share for the same anchors.
            let mut cg = vec![0.0; rows * dim];
            let cl = cpu::nt_xent_forward_backward_anchors(
                &z,
                rows,
                dim,
                anchors,
                &NtXentConfig::new(tau),
                1.0,
                &mut cg,
            )
            .unwrap();
            let tol = if prec == Precision::F32 { 2e-4 } else { 6e-2 };
            assert!(
                (l - cl).abs() <= tol * cl.abs().max(1.0),
                "{prec:?} share {k}: {l} vs {cl}"
            );
            assert!(
                rel_max_diff(&g, &cg, 1e-12) <= tol,
                "{prec:?} share {k}: gradient"
            );
            total += l;
            gsum.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
        let mut want_g = vec![0.0; rows * dim];
        let want =
            cpu::nt_xent_forward_backward(&z, rows, dim, &NtXentConfig::new(tau), &mut want_g)
                .unwrap();
        let tol = if prec == Precision::F32 { 2e-4 } else { 6e-2 };
        assert!(
            (total - want).abs() <= tol * want,
            "{prec:?}: shares sum to {total}, whole {want}"
        );
        assert!(
            rel_max_diff(&gsum, &want_g, 1e-12) <= tol,
            "{prec:?}: summed gradients"
        );
    }
}

#[test]
fn gpu_ntxent_rejects_bad_input() {
    let Some(gpu) = gpu_or_skip("gpu_ntxent_rejects_bad_input") else {
        return;
    };
    assert!(matches!(
        NtXentGpu::new(&gpu, 7, 4, Precision::Bf16),
        Err(GpuError::Invalid(_))
    ));
    let mut ws = NtXentGpu::new(&gpu, 8, 4, Precision::Bf16).unwrap();
    let z = gpu.zeros::<f32>(31).unwrap();
    let e = ws.forward(&gpu, &z, 0.5).unwrap_err();
    assert!(e.to_string().contains("31"), "{e}");
    let z = gpu.zeros::<f32>(32).unwrap();
    assert!(ws.forward(&gpu, &z, f32::NAN).is_err());
}

fn random_view(rng: &mut Rng, h: u32, w: u32, i: usize) -> ViewParams {
    let mut p = ViewParams::identity(w, h, w, h);
    if i % 5 != 4 {
        p.brightness = 0.2 + 1.6 * rng.uniform();
        p.contrast = 0.2 + 1.6 * rng.uniform();
        p.saturation = 0.2 + 1.6 * rng.uniform();
        p.hue = 0.4 * rng.uniform() - 0.2;
        let orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0], [1, 0, 3, 2]];
        p.jitter_order = pack_jitter_order(orders[i % 4]);
    }
    p.grayscale = u32::from(i % 3 == 0);
    if i % 2 == 0 {
        p.blur_sigma = 0.1 + 1.9 * rng.uniform();
        p.blur_kernel = (w / 10) | 1;
    }
    if i % 7 == 1 {
        (p.cutout_x, p.cutout_y, p.cutout_w, p.cutout_h) = (2, 3, w / 3, h / 4);
    }
    if i % 6 == 5 {
        p.noise_std = 0.05;
        p.noise_seed = i as u32;
    }
    p
}

#[test]
fn gpu_augment_matches_cpu_twin() {
    let Some(gpu) = gpu_or_skip("gpu_augment_matches_cpu_twin") else {
        return;
    };
    let (views, h, w) = (24usize, 40usize, 56usize);
    let mut rng = Rng(3);
    let crops: Vec<u8> = (0..views * 3 * h * w)
        .map(|_| (rng.next_u64() & 0xff) as u8)
        .collect();
    let params: Vec<ViewParams> = (0..views)
        .map(|i| random_view(&mut rng, h as u32, w as u32, i))
        .collect();
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    // The CPU twin: u8 -> [0, 1], the colour stage, then (x - mean) / std.
    let n = 3 * h * w;
    let mut want = vec![0.0f32; views * n];
    let mut scratch = Vec::new();
    for v in 0..views {
        let img = &mut want[v * n..(v + 1) * n];
        for (o, &c) in img.iter_mut().zip(&crops[v * n..(v + 1) * n]) {
            *o = c as f32 * (1.0 / 255.0);
        }
        cpu::color::apply_color_stage(img, &params[v], &mut scratch);
        for (c, plane) in img.chunks_exact_mut(h * w).enumerate() {
            for x in plane {
                *x = (*x - mean[c]) * (1.0 / std[c]);
            }
        }
    }
    let cd = gpu.upload(&crops).unwrap();
    let mut aug = AugmentGpu::new(&gpu, views, h, w, mean, std).unwrap();
    let mut out = gpu.zeros::<f32>(views * n).unwrap();
    aug.apply(&gpu, &cd, &params, Layout::Nchw, AugOutput::F32(&mut out))
        .unwrap();
    let got = gpu.download(&out).unwrap();
    let d = rel_max_diff(&got, &want, 1.0);
    assert!(d < 2e-4, "NCHW f32 differs by {d}");

    let mut out16 = gpu.zeros::<u16>(views * n).unwrap();
    aug.apply(
        &gpu,
        &cd,
        &params,
        Layout::Nhwc,
        AugOutput::Bf16(&mut out16),
    )
    .unwrap();
    let got16 = gpu.download(&out16).unwrap();
    for v in 0..views {
        for c in 0..3 {
            for p in 0..h * w {
                let g = f32::from_bits((got16[(v * h * w + p) * 3 + c] as u32) << 16);
                let e = want[v * n + c * h * w + p];
                assert!(
                    (g - e).abs() <= 0.01 * e.abs().max(1.0),
                    "NHWC bf16 view {v} channel {c} pixel {p}: {g} vs {e}"
                );
            }
        }
    }
    let mut sobel = params.clone();
    sobel[3].sobel = 1;
    let e = aug
        .apply(&gpu, &cd, &sobel, Layout::Nchw, AugOutput::F32(&mut out))
        .unwrap_err();
    assert!(e.to_string().contains("view 3"), "{e}");
}

/// ReLU, its backward pass, the residual add (with and without its ReLU) and global average
/// pooling on `x` and `b` (`[n, hw, c]`) of element type `T`, against the CPU twins: one
/// rounding of the same f32 value on both sides, so the same bits, except the pooled sums
/// (summed in another order).
fn elementwise_and_average_pooling<T: simclr_kernels::Elem>(
    gpu: &Gpu,
    x: &[T],
    b: &[T],
    (n, hw, c): (usize, usize, usize),
) {
    let what = T::SUFFIX;
    let xd = gpu.upload(x).unwrap();
    let bd = gpu.upload(b).unwrap();
    let mut yd = gpu.zeros::<T>(x.len()).unwrap();
    train::relu(gpu, &xd, &mut yd).unwrap();
    let mut want = x.to_vec();
    cpu::eltwise::relu_inplace(&mut want);
    assert_eq!(gpu.download(&yd).unwrap(), want, "{what} relu");
    let mut dxd = gpu.zeros::<T>(x.len()).unwrap();
    train::relu_backward(gpu, &bd, &yd, &mut dxd).unwrap();
    let mut wd = b.to_vec();
    cpu::eltwise::relu_backward_inplace(&mut wd, &want);
    assert_eq!(gpu.download(&dxd).unwrap(), wd, "{what} relu backward");
    for relu in [false, true] {
        let mut ad = gpu.upload(x).unwrap();
        train::add(gpu, &mut ad, &bd, relu).unwrap();
        let mut wa = x.to_vec();
        if relu {
            cpu::eltwise::add_relu_inplace(&mut wa, b);
        } else {
            cpu::eltwise::add_inplace(&mut wa, b);
        }
        assert_eq!(gpu.download(&ad).unwrap(), wa, "{what} add (relu {relu})");
    }
    let mut gd = gpu.zeros::<f32>(n * c).unwrap();
    train::gap_forward(gpu, &xd, n, hw, c, &mut gd).unwrap();
    let mut wg = vec![0.0; n * c];
    cpu::pooling::gap_forward(x, n, hw, c, &mut wg);
    assert!(
        rel_max_diff(&gpu.download(&gd).unwrap(), &wg, 1e-6) < 1e-5,
        "{what} average pooling"
    );
    let mut gbd = gpu.zeros::<T>(x.len()).unwrap();
    train::gap_backward(gpu, &gd, n, hw, c, &mut gbd).unwrap();
    let mut wgb = vec![T::default(); x.len()];
    cpu::pooling::gap_backward(&gpu.download(&gd).unwrap(), hw, c, &mut wgb);
    assert_eq!(
        gpu.download(&gbd).unwrap(),
        wgb,
        "{what} average pooling backward"
    );
}

#[test]
fn gpu_elementwise_pooling_and_casts_match_cpu_twins() {
    let Some(gpu) = gpu_or_skip("gpu_elementwise_pooling_and_casts_match_cpu_twins") else {
        return;
    };
    let mut rng = Rng(11);
    let (n, hw, c) = (3usize, 49usize, 40usize);
    let x = rng.vec(n * hw * c);
    let b = rng.vec(n * hw * c);
    let xd = gpu.upload(&x).unwrap();
    elementwise_and_average_pooling(&gpu, &x, &b, (n, hw, c));

    let mut hd = gpu.zeros::<bf16>(x.len()).unwrap();
    train::cast_f32_to_bf16(&gpu, &xd, &mut hd).unwrap();
    let h = gpu.download(&hd).unwrap();
    for (hv, xv) in h.iter().zip(&x) {
        assert_eq!(hv.to_bits(), bf16::from_f32(*xv).to_bits());
    }
    let mut back = gpu.zeros::<f32>(x.len()).unwrap();
    train::cast_bf16_to_f32(&gpu, &hd, &mut back).unwrap();
    for (bv, hv) in gpu.download(&back).unwrap().iter().zip(&h) {
        assert_eq!(*bv, hv.to_f32());
    }

    let s = train::sum(&gpu, &xd).unwrap();
    let ws: f64 = x.iter().map(|&v| v as f64).sum();
    assert!((s - ws).abs() < 1e-9 * x.len() as f64, "{s} vs {ws}");
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn widen(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// max |a - b| in units of |b| / 128, the most bf16's spacing can be at |b| (8 significant
/// bits; at least `floor`'s): one rounding flipped the other way is at most 1.
fn bf16_ulps(a: &[bf16], b: &[bf16], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        let (x, y) = (x.to_f32(), y.to_f32());
        m.max((x - y).abs() / (y.abs().max(floor) / 128.0))
    })
}

#[test]
fn gpu_bf16_activation_kernels_match_cpu_twins() {
    let Some(gpu) = gpu_or_skip("gpu_bf16_activation_kernels_match_cpu_twins") else {
        return;
    };
    use simclr_kernels::cpu::pooling::PoolGeom;
    use simclr_kernels::cuda::layout;
    let mut rng = Rng(17);
    let (n, hw, c) = (3usize, 49usize, 40usize);
    let x = to_bf16(&rng.vec(n * hw * c));
    let b = to_bf16(&rng.vec(n * hw * c));
    elementwise_and_average_pooling(&gpu, &x, &b, (n, hw, c));

    // Max pooling with overlapping windows: same maxima, same indices, same summed gradients.
    let g = PoolGeom {
        n: 2,
        h: 9,
        w: 7,
        c: 6,
        k: 3,
        stride: 2,
        pad: 1,
    };
    let mut px = rng.vec(g.n * g.h * g.w * g.c);
    px.iter_mut().take(12).for_each(|v| *v = 0.5);
    let px = to_bf16(&px);
    let out = g.n * g.oh() * g.ow() * g.c;
    let (mut py, mut parg) = (vec![bf16::ZERO; out], vec![0u32; out]);
    cpu::pooling::maxpool_forward(&px, &g, &mut py, &mut parg);
    let pxd = gpu.upload(&px).unwrap();
    let mut pyd = gpu.zeros::<bf16>(out).unwrap();
    let mut pad = gpu.zeros::<u32>(out).unwrap();
    layout::maxpool_forward(&gpu, &pxd, &g, &mut pyd, &mut pad.as_view_mut()).unwrap();
    assert_eq!(gpu.download(&pyd).unwrap(), py, "max pool");
    assert_eq!(gpu.download(&pad).unwrap(), parg, "max pool indices");
    let pdy = to_bf16(&rng.vec(out));
    let mut pdx = vec![bf16::ZERO; px.len()];
    cpu::pooling::maxpool_backward(&pdy, &parg, &g, &mut pdx);
    let pdyd = gpu.upload(&pdy).unwrap();
    let mut pdxd = gpu.zeros::<bf16>(px.len()).unwrap();
    layout::maxpool_backward(&gpu, &pdyd, &pad.as_view(), &g, &mut pdxd).unwrap();
    assert_eq!(gpu.download(&pdxd).unwrap(), pdx, "max pool backward");

    // Batch norm with a fused ReLU: f64 statistics of the widened values on both sides (summed
    // in different orders, so a last-bit difference can flip one bf16 rounding).
    let (rows, c) = (300usize, 70usize);
    let bx = to_bf16(
        &rng.vec(rows * c)
            .iter()
            .map(|v| 4.0 + 2.0 * v)
            .collect::<Vec<_>>(),
    );
    let bdy = to_bf16(&rng.vec(rows * c));
    let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 / c as f32).collect();
    let beta: Vec<f32> = (0..c).map(|i| 0.1 * i as f32).collect();
    let eps = 1e-5f32;
    let (mean, var) = cpu::norm::batch_stats(&bx, rows, c);
    let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = (0..c).map(|i| gamma[i] * invstd[i]).collect();
    let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
    let mut want_y = vec![bf16::ZERO; rows * c];
    cpu::norm::affine_rows(&bx, c, &scale, &shift, &mut want_y, true);
    let bxd = gpu.upload(&bx).unwrap();
    let gd = gpu.upload(&gamma).unwrap();
    let betad = gpu.upload(&beta).unwrap();
    let mut rm = gpu.zeros::<f32>(c).unwrap();
    let mut rv = gpu.upload(&vec![1.0f32; c]).unwrap();
    let mut byd = gpu.zeros::<bf16>(rows * c).unwrap();
    let mut bn = BatchNormGpu::new(&gpu, c).unwrap();
    let mut identity = |_: &mut cudarc::driver::CudaSlice<f64>| -> Result<(), GpuError> { Ok(()) };
    let p = BnParams {
        gamma: &gd,
        beta: &betad,
        running_mean: &mut rm,
        running_var: &mut rv,
        momentum: 0.1,
        eps,
    };
    let saved = bn
        .forward_train(&gpu, &bxd, rows, rows, p, true, &mut byd, &mut identity)
        .unwrap();
    let got_y = gpu.download(&byd).unwrap();
    assert!(bf16_ulps(&got_y, &want_y, 1e-2) <= 1.0, "bn forward");
    // The backward pass masks by the ReLU output: start both sides from the same output.
    let mut want_dx = vec![bf16::ZERO; rows * c];
    let (want_dg, want_db) = cpu::norm::batchnorm_backward(
        &bx,
        &bdy,
        Some(&got_y),
        rows,
        c,
        &mean,
        &invstd,
        &gamma,
        &mut want_dx,
    );
    let bdyd = gpu.upload(&bdy).unwrap();
    let mut bdxd = gpu.zeros::<bf16>(rows * c).unwrap();
    let mut dgd = gpu.zeros::<f32>(c).unwrap();
    let mut dbd = gpu.zeros::<f32>(c).unwrap();
    bn.backward(
        &gpu,
        &bxd,
        &bdyd,
        Some(&byd),
        rows,
        rows,
        &gd,
        &saved,
        &mut bdxd,
        &mut dgd,
        &mut dbd,
        &mut identity,
    )
    .unwrap();
    assert!(
        bf16_ulps(&gpu.download(&bdxd).unwrap(), &want_dx, 1e-2) <= 1.0,
        "bn dx"
    );
    assert!(rel_max_diff(&gpu.download(&dgd).unwrap(), &want_dg, 1e-6) < 1e-4);
    assert!(rel_max_diff(&gpu.download(&dbd).unwrap(), &want_db, 1e-6) < 1e-4);
    // bf16 storage is lossy only at the rounding: the f32 results, rounded, are within one
    // rounding of the bf16 ones.
    let mut f32_y = vec![0.0f32; rows * c];
    cpu::norm::affine_rows(&widen(&bx), c, &scale, &shift, &mut f32_y, true);
    assert!(bf16_ulps(&got_y, &to_bf16(&f32_y), 1e-2) <= 1.0);
}

#[test]
fn gpu_batchnorm_matches_cpu_twin() {
    let Some(gpu) = gpu_or_skip("gpu_batchnorm_matches_cpu_twin") else {
        return;
    };
    let mut rng = Rng(5);
    let (rows, c) = (300usize, 70usize);
    // Values far from zero: the two-pass variance must stay accurate.
    let x: Vec<f32> = rng.vec(rows * c).iter().map(|v| 100.0 + 3.0 * v).collect();
    let dy = rng.vec(rows * c);
    let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 / c as f32).collect();
    let beta: Vec<f32> = (0..c).map(|i| 0.1 * i as f32).collect();
    let (mean, var) = cpu::norm::batch_stats(&x, rows, c);
    let eps = 1e-5f32;
    let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = (0..c).map(|i| gamma[i] * invstd[i]).collect();
    let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
    let mut want_y = vec![0.0; rows * c];
    cpu::norm::affine_rows(&x, c, &scale, &shift, &mut want_y, true);
    let mut want_dx = vec![0.0; rows * c];
    let (want_dg, want_db) = cpu::norm::batchnorm_backward(
        &x,
        &dy,
        Some(&want_y),
        rows,
        c,
        &mean,
        &invstd,
        &gamma,
        &mut want_dx,
    );

    let xd = gpu.upload(&x).unwrap();
    let gd = gpu.upload(&gamma).unwrap();
    let bd = gpu.upload(&beta).unwrap();
    let mut rm = gpu.zeros::<f32>(c).unwrap();
    let mut rv = gpu.upload(&vec![1.0f32; c]).unwrap();
    let mut yd = gpu.zeros::<f32>(rows * c).unwrap();
    let mut bn = BatchNormGpu::new(&gpu, c).unwrap();
    let mut calls = 0;
    let mut identity = |_: &mut cudarc::driver::CudaSlice<f64>| -> Result<(), GpuError> {
        calls += 1;
        Ok(())
    };
    let p = BnParams {
        gamma: &gd,
        beta: &bd,
        running_mean: &mut rm,
        running_var: &mut rv,
        momentum: 0.1,
        eps,
    };
    let saved = bn
        .forward_train(&gpu, &xd, rows, rows, p, true, &mut yd, &mut identity)
        .unwrap();
    let y = gpu.download(&yd).unwrap();
    assert!(rel_max_diff(&y, &want_y, 1.0) < 1e-4, "forward");
    let rmh = gpu.download(&rm).unwrap();
    let rvh = gpu.download(&rv).unwrap();
    for i in 0..c {
        assert!((rmh[i] - 0.1 * mean[i]).abs() < 1e-3, "running mean {i}");
        let unb = var[i] * rows as f32 / (rows - 1) as f32;
        assert!(
            (rvh[i] - (0.9 + 0.1 * unb)).abs() < 1e-3 * rvh[i],
            "running var {i}"
        );
    }
    let dyd = gpu.upload(&dy).unwrap();
    let mut dxd = gpu.zeros::<f32>(rows * c).unwrap();
    let mut dgd = gpu.zeros::<f32>(c).unwrap();
    let mut dbd = gpu.zeros::<f32>(c).unwrap();
    bn.backward(
        &gpu,
        &xd,
        &dyd,
        Some(&yd),
        rows,
        rows,
        &gd,
        &saved,
        &mut dxd,
        &mut dgd,
        &mut dbd,
        &mut identity,
    )
    .unwrap();
    assert!(
        rel_max_diff(&gpu.download(&dxd).unwrap(), &want_dx, 1e-6) < 2e-4,
        "dx"
    );
    assert!(
        rel_max_diff(&gpu.download(&dgd).unwrap(), &want_dg, 1e-6) < 2e-4,
        "dgamma"
    );
    assert!(
        rel_max_diff(&gpu.download(&dbd).unwrap(), &want_db, 1e-6) < 2e-4,
        "dbeta"
    );
    assert_eq!(
        calls, 3,
        "the reduce hook sees the mean, the variance and the gradient sums"
    );
}

#[test]
fn gpu_optimisers_match_cpu_twins() {
    let Some(gpu) = gpu_or_skip("gpu_optimisers_match_cpu_twins") else {
        return;
    };
    let mut rng = Rng(9);
    let sizes = [1usize, 37, 4096, 10_000, 9000];
    let ps: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
    let gs: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| rng.vec(n).iter().map(|v| 0.01 * v).collect())
        .collect();
    let cfg = LarsConfig {
        lr: 0.3,
        momentum: 0.9,
        weight_decay: 1e-4,
        eta: 0.001,
        nesterov: false,
    };
    let adapt = [false, true, true, true, false];

    // Two LARS steps (the second with non-zero momentum) on the CPU twin and on the GPU.
    let mut cp = ps.clone();
    let mut cv: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    for _ in 0..2 {
        for k in 0..sizes.len() {
            cpu::optim::lars_update(
                &mut cp[k],
                &gs[k],
                &mut cv[k],
                cfg.lr,
                cfg.momentum,
                cfg.weight_decay,
                cfg.eta,
                adapt[k],
                false,
            );
        }
    }
    let mut pd: Vec<_> = ps.iter().map(|p| gpu.upload(p).unwrap()).collect();
    let gd: Vec<_> = gs.iter().map(|g| gpu.upload(g).unwrap()).collect();
    let mut vd: Vec<_> = sizes
        .iter()
        .map(|&n| gpu.zeros::<f32>(n).unwrap())
        .collect();
    let mut lars = LarsGpu::new();
    for _ in 0..2 {
        let mut ts: Vec<LarsTensor<'_>> = pd
            .iter_mut()
            .zip(&gd)
            .zip(vd.iter_mut())
            .zip(adapt)
            .map(|(((p, g), v), adapt)| LarsTensor { p, g, v, adapt })
            .collect();
        lars.step(&gpu, &mut ts, &cfg).unwrap();
    }
    for k in 0..sizes.len() {
        let got = gpu.download(&pd[k]).unwrap();
        assert!(rel_max_diff(&got, &cp[k], 1e-6) < 1e-5, "LARS tensor {k}");
    }

    let mut sp = ps[3].clone();
    let mut sb = vec![0.0; sizes[3]];
    cpu::optim::sgd_update(&mut sp, &gs[3], &mut sb, 0.1, 0.9, 5e-4, true);
    cpu::optim::sgd_update(&mut sp, &gs[3], &mut sb, 0.1, 0.9, 5e-4, true);
    let mut p = gpu.upload(&ps[3]).unwrap();
    let mut b = gpu.zeros::<f32>(sizes[3]).unwrap();
    for _ in 0..2 {
        train::sgd_update(&gpu, &mut p, &gd[3], &mut b, 0.1, 0.9, 5e-4, true).unwrap();
    }
    assert!(
        rel_max_diff(&gpu.download(&p).unwrap(), &sp, 1e-6) < 1e-6,
        "SGD"
    );
}

#[test]
fn gpu_maxpool_permutes_and_bias_match_cpu_twins() {
    let Some(gpu) = gpu_or_skip("gpu_maxpool_permutes_and_bias_match_cpu_twins") else {
        return;
    };
    use simclr_kernels::cpu::pooling::PoolGeom;
    use simclr_kernels::cuda::layout;
    let mut rng = Rng(21);
    // The ImageNet stem's pool, an odd size, a window as large as the input, and ties.
    for g in [
        PoolGeom {
            n: 2,
            h: 16,
            w: 16,
            c: 8,
            k: 3,
            stride: 2,
            pad: 1,
        },
        PoolGeom {
            n: 3,
            h: 7,
            w: 5,
            c: 3,
            k: 3,
            stride: 2,
            pad: 1,
        },
        PoolGeom {
            n: 1,
            h: 4,
            w: 4,
            c: 2,
            k: 4,
            stride: 1,
            pad: 0,
        },
        PoolGeom {
            n: 2,
            h: 9,
            w: 9,
            c: 5,
            k: 2,
            stride: 3,
            pad: 1,
        },
    ] {
        let mut x = rng.vec(g.n * g.h * g.w * g.c);
        // Ties: a run of equal values (the first maximum must win on both sides).
        x.iter_mut().take(12).for_each(|v| *v = 0.5);
        let out = g.n * g.oh() * g.ow() * g.c;
        let (mut y, mut arg) = (vec![0.0f32; out], vec![0u32; out]);
        cpu::pooling::maxpool_forward(&x, &g, &mut y, &mut arg);
        let xd = gpu.upload(&x).unwrap();
        let mut yd = gpu.zeros::<f32>(out).unwrap();
        let mut ad = gpu.zeros::<u32>(out).unwrap();
        layout::maxpool_forward(&gpu, &xd, &g, &mut yd, &mut ad.as_view_mut()).unwrap();
        assert_eq!(gpu.download(&yd).unwrap(), y, "{g:?}");
        assert_eq!(gpu.download(&ad).unwrap(), arg, "{g:?}");
        let dy = rng.vec(out);
        let mut dx = vec![0.0f32; x.len()];
        cpu::pooling::maxpool_backward(&dy, &arg, &g, &mut dx);
        let dyd = gpu.upload(&dy).unwrap();
        let mut dxd = gpu.zeros::<f32>(x.len()).unwrap();
        layout::maxpool_backward(&gpu, &dyd, &ad.as_view(), &g, &mut dxd).unwrap();
        // Same contributions in the same order: the same bits.
        assert_eq!(gpu.download(&dxd).unwrap(), dx, "{g:?}");
    }
    let (n, c, h, w) = (3, 5, 4, 6);
    let x = rng.vec(n * c * h * w);
    let mut nhwc = vec![0.0f32; x.len()];
    cpu::eltwise::nchw_to_nhwc(&x, n, c, h, w, &mut nhwc);
    let xd = gpu.upload(&x).unwrap();
    let mut yd = gpu.zeros::<f32>(x.len()).unwrap();
    layout::nchw_to_nhwc(&gpu, &xd, n, c, h * w, &mut yd).unwrap();
    assert_eq!(gpu.download(&yd).unwrap(), nhwc);
    let mut back = gpu.zeros::<f32>(x.len()).unwrap();
    layout::nhwc_to_nchw(&gpu, &yd, n, h * w, c, &mut back).unwrap();
    assert_eq!(gpu.download(&back).unwrap(), x);
    let (rows, cols) = (37, 19);
    let b = rng.vec(cols);
    let mut want = vec![0.0f32; rows * cols];
    cpu::eltwise::broadcast_rows(&b, &mut want);
    let bd = gpu.upload(&b).unwrap();
    let mut yd = gpu.zeros::<f32>(rows * cols).unwrap();
    layout::broadcast_rows(&gpu, &bd, &mut yd).unwrap();
    assert_eq!(gpu.download(&yd).unwrap(), want);
    let m = rng.vec(rows * cols);
    let mut sums = vec![0.0f32; cols];
    cpu::eltwise::column_sums(&m, &mut sums);
    let md = gpu.upload(&m).unwrap();
    let mut sd = gpu.upload(&vec![1.0f32; cols]).unwrap();
    layout::column_sums(&gpu, &md, &mut sd, false).unwrap();
    assert_eq!(gpu.download(&sd).unwrap(), sums);
    layout::column_sums(&gpu, &md, &mut sd, true).unwrap();
    let twice: Vec<f32> = sums.iter().map(|v| v + v).collect();
    assert_eq!(gpu.download(&sd).unwrap(), twice);
    // Bad shapes are errors.
    let mut short = gpu.zeros::<f32>(5).unwrap();
    assert!(layout::broadcast_rows(&gpu, &bd, &mut short).is_err());
}

#[test]
fn without_a_gpu_opening_one_is_an_error_not_a_panic() {
    if gpu_available() {
        println!("without_a_gpu_opening_one_is_an_error_not_a_panic: skipped (a GPU is present)");
        let e = Gpu::new(usize::MAX >> 1).unwrap_err();
        assert!(matches!(e, GpuError::NoDevice { .. }), "{e}");
        return;
    }
    let e = Gpu::new(0).unwrap_err();
    assert!(
        matches!(e, GpuError::NoDriver | GpuError::NoDevice { .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("CUDA") || e.to_string().contains("device"),
        "{e}"
    );
}

//! Microbenchmarks of the CUDA kernels, read beside `benches/torch_gpu_compare.py` run on the
//! same GPU (the gpu-check script runs both and prints the ratios):
//!
//! - `ntxent/{bf16,tf32,f32}/M`: NT-Xent forward + backward of `M = 2N` rows of dimension 128,
//!   and the workspace's device memory;
//! - `augment/224/{f32-nchw,bf16-nhwc}`: the colour stage (jitter, grayscale, blur, normalise) of
//!   a batch of 256 views at 224x224 with the paper's probabilities, in views per second;
//! - `train/*`: batch norm forward + backward and ReLU (f32 and bf16 activations), LARS over
//!   ResNet-50's parameter tensors;
//! - `layout/*`: max pooling (f32 and bf16), the NCHW to NHWC permute, the linear bias kernels.
//!
//! `cargo bench --bench gpu_kernels [-- --json FILE] [--quick]`. Without a GPU it says so and
//! exits successfully. Times are medians of repeated runs, each run `iters` launches between two
//! stream synchronisations.

use std::time::Instant;

use simclr::kernels::augment::{pack_jitter_order, ViewParams};
use simclr::kernels::cuda::augment::{AugOutput, AugmentGpu, Layout};
use simclr::kernels::cuda::ntxent::{NtXentGpu, Precision};
use simclr::kernels::cuda::train::{self, BatchNormGpu, BnParams, LarsConfig, LarsGpu, LarsTensor};
use simclr::kernels::cuda::{gpu_available, Gpu, GpuError};
use simclr::kernels::Elem;

use half::bf16;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Median seconds per call of `f`, over `reps` runs of `iters` calls.
fn time(
    gpu: &Gpu,
    reps: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<(), GpuError>,
) -> Result<f64, GpuError> {
    for _ in 0..3 {
        f()?;
    }
    gpu.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        gpu.synchronize()?;
        t.push(s.elapsed().as_secs_f64() / iters as f64);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

struct Report {
    rows: Vec<String>,
    /// Where the rows go, rewritten after each one (through a temporary file), so a run cut
    /// short by a time limit keeps what it measured.
    json: Option<String>,
    write_failed: bool,
}

impl Report {
    fn add(&mut self, name: &str, fields: &[(&str, f64)]) {
        let mut line = format!("{name:<32}");
        let mut json = format!("{{\"name\": \"{name}\"");
        for (k, v) in fields {
            line.push_str(&format!("  {k} {v:.4}"));
            json.push_str(&format!(", \"{k}\": {v}"));
        }
        json.push('}');
        println!("{line}");
        self.rows.push(json);
        if let Some(path) = &self.json {
            let body = format!("[\n{}\n]\n", self.rows.join(",\n"));
            let tmp = format!("{path}.tmp");
            if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)) {
                eprintln!("gpu_kernels: cannot write {path}: {e}");
                self.write_failed = true;
            }
        }
    }
}

fn ntxent(gpu: &Gpu, r: &mut Report, quick: bool) -> Result<(), GpuError> {
    let dim = 128;
    let mut rng = Rng(1);
    let sizes: &[usize] = if quick {
        &[512, 8192]
    } else {
        &[512, 2048, 8192, 65536]
    };
    for &rows in sizes {
        let z: Vec<f32> = (0..rows * dim).map(|_| rng.uniform() - 0.5).collect();
        let zd = gpu.upload(&z)?;
        let mut gd = gpu.zeros::<f32>(rows * dim)?;
        for prec in [Precision::Bf16, Precision::Tf32, Precision::F32] {
            if rows > 8192 && prec != Precision::Bf16 {
                continue;
            }
            let (free0, _) = gpu.context().mem_get_info()?;
            let mut ws = NtXentGpu::new(gpu, rows, dim, prec)?;
            let (free1, _) = gpu.context().mem_get_info()?;
            let iters = if rows >= 65536 { 2 } else { 20 };
            let s = time(gpu, if quick { 5 } else { 15 }, iters, || {
                ws.enqueue_forward(gpu, &zd, 0..rows, 0.1)?;
                ws.backward(gpu, &zd, 0.1, 1.0, &mut gd)
            })?;
            let name = format!("ntxent/{}/{rows}", format!("{prec:?}").to_lowercase());
            r.add(
                &name,
                &[
                    ("us", s * 1e6),
                    ("workspace_mib", ws.workspace_bytes() as f64 / 1048576.0),
                    ("device_mib", free0.saturating_sub(free1) as f64 / 1048576.0),
                ],
            );
        }
    }
    Ok(())
}

/// The paper's augmentation probabilities at strength 1 on a 224 view.
fn paper_view(rng: &mut Rng) -> ViewParams {
    let mut p = ViewParams::identity(224, 224, 224, 224);
    if rng.uniform() < 0.8 {
        p.brightness = 0.2 + 1.6 * rng.uniform();
        p.contrast = 0.2 + 1.6 * rng.uniform();
        p.saturation = 0.2 + 1.6 * rng.uniform();
        p.hue = 0.4 * rng.uniform() - 0.2;
        // A permutation: the identity rotated by a random amount.
        let k = (rng.next() % 4) as u32;
        p.jitter_order = pack_jitter_order([k, (k + 1) % 4, (k + 2) % 4, (k + 3) % 4]);
    }
    p.grayscale = u32::from(rng.uniform() < 0.2);
    if rng.uniform() < 0.5 {
        p.blur_sigma = 0.1 + 1.9 * rng.uniform();
        p.blur_kernel = 23;
    }
    p
}

fn augment(gpu: &Gpu, r: &mut Report, quick: bool) -> Result<(), GpuError> {
    let (views, h, w) = (256usize, 224usize, 224usize);
    let mut rng = Rng(2);
    let crops: Vec<u8> = (0..views * 3 * h * w)
        .map(|_| (rng.next() & 0xff) as u8)
        .collect();
    let params: Vec<ViewParams> = (0..views).map(|_| paper_view(&mut rng)).collect();
    let cd = gpu.upload(&crops)?;
    let mut aug = AugmentGpu::new(
        gpu,
        views,
        h,
        w,
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )?;
    let mut out = gpu.zeros::<f32>(views * 3 * h * w)?;
    let mut out16 = gpu.zeros::<u16>(views * 3 * h * w)?;
    let reps = if quick { 5 } else { 15 };
    let s = time(gpu, reps, 5, || {
        aug.apply(gpu, &cd, &params, Layout::Nchw, AugOutput::F32(&mut out))
    })?;
    r.add(
        "augment/224/f32-nchw",
        &[("views_per_s", views as f64 / s), ("ms_per_batch", s * 1e3)],
    );
    let s = time(gpu, reps, 5, || {
        aug.apply(gpu, &cd, &params, Layout::Nhwc, AugOutput::Bf16(&mut out16))
    })?;
    r.add(
        "augment/224/bf16-nhwc",
        &[("views_per_s", views as f64 / s), ("ms_per_batch", s * 1e3)],
    );
    Ok(())
}

/// ResNet-50's parameter tensor sizes (conv weights adapted; BN and biases excluded).
fn resnet50_tensors() -> Vec<(usize, bool)> {
    let mut t = vec![(64 * 3 * 49, true), (64, false), (64, false)];
    let mut cin = 64;
    for (blocks, width) in [(3usize, 64usize), (4, 128), (6, 256), (3, 512)] {
        for b in 0..blocks {
            let out = width * 4;
            for (ci, co, k) in [(cin, width, 1), (width, width, 9), (width, out, 1)] {
                t.push((ci * co * k, true));
                t.push((co, false));
                t.push((co, false));
            }
            if b == 0 {
                t.push((cin * out, true));
                t.push((out, false));
                t.push((out, false));
            }
            cin = out;
        }
    }
    t
}

/// Batch norm (fused ReLU) forward + backward over `[rows, c]` activations of element type `T`.
fn batchnorm_case<T: Elem>(
    gpu: &Gpu,
    r: &mut Report,
    reps: usize,
    (rows, c): (usize, usize),
) -> Result<(), GpuError> {
    let mut rng = Rng(3);
    let x: Vec<T> = (0..rows * c).map(|_| T::from_f32(rng.uniform())).collect();
    let xd = gpu.upload(&x)?;
    let dyd = gpu.upload(&x)?;
    let mut yd = gpu.zeros::<T>(rows * c)?;
    let mut dxd = gpu.zeros::<T>(rows * c)?;
    let gamma = gpu.upload(&vec![1.0f32; c])?;
    let beta = gpu.zeros::<f32>(c)?;
    let mut rm = gpu.zeros::<f32>(c)?;
    let mut rv = gpu.zeros::<f32>(c)?;
    let (mut dg, mut db) = (gpu.zeros::<f32>(c)?, gpu.zeros::<f32>(c)?);
    let mut bn = BatchNormGpu::new(gpu, c)?;
    let mut id = |_: &mut cudarc_slice::CudaSlice<f64>| -> Result<(), GpuError> { Ok(()) };
    let s = time(gpu, reps, 5, || {
        let p = BnParams {
            gamma: &gamma,
            beta: &beta,
            running_mean: &mut rm,
            running_var: &mut rv,
            momentum: 0.1,
            eps: 1e-5,
        };
        let saved = bn.forward_train(gpu, &xd, rows, rows, p, true, &mut yd, &mut id)?;
        bn.backward(
            gpu,
            &xd,
            &dyd,
            Some(&yd),
            rows,
            rows,
            &gamma,
            &saved,
            &mut dxd,
            &mut dg,
            &mut db,
            &mut id,
        )
    })?;
    let bytes = (rows * c * T::BYTES * 9) as f64; // x thrice, y once, x dy y twice, dx once
    r.add(
        &format!("train/batchnorm-fwd-bwd-{}/{rows}x{c}", T::SUFFIX),
        &[("us", s * 1e6), ("gb_per_s", bytes / s / 1e9)],
    );
    let s = time(gpu, reps, 20, || train::relu(gpu, &xd, &mut yd))?;
    r.add(
        &format!("train/relu-{}/{}M", T::SUFFIX, rows * c / 1_000_000),
        &[
            ("us", s * 1e6),
            ("gb_per_s", (rows * c * 2 * T::BYTES) as f64 / s / 1e9),
        ],
    );
    Ok(())
}

fn training(gpu: &Gpu, r: &mut Report, quick: bool) -> Result<(), GpuError> {
    let reps = if quick { 5 } else { 15 };
    // Batch norm over the first stage of ResNet-50 at batch 64: [64 * 56 * 56, 256], with f32
    // and with bf16 (mixed-precision) activations.
    let shape = (64 * 56 * 56, 256);
    batchnorm_case::<f32>(gpu, r, reps, shape)?;
    batchnorm_case::<bf16>(gpu, r, reps, shape)?;
    let mut rng = Rng(4);

    let tensors = resnet50_tensors();
    let mut ps = Vec::new();
    let mut gs = Vec::new();
    let mut vs = Vec::new();
    for &(n, _) in &tensors {
        let v: Vec<f32> = (0..n).map(|_| rng.uniform() - 0.5).collect();
        ps.push(gpu.upload(&v)?);
        gs.push(gpu.upload(&v)?);
        vs.push(gpu.zeros::<f32>(n)?);
    }
    let total: usize = tensors.iter().map(|t| t.0).sum();
    let mut lars = LarsGpu::new();
    let cfg = LarsConfig {
        lr: 1e-6,
        momentum: 0.9,
        weight_decay: 1e-6,
        eta: 0.001,
        nesterov: false,
    };
    let s = time(gpu, reps, 10, || {
        let mut ts: Vec<LarsTensor<'_>> = ps
            .iter_mut()
            .zip(&gs)
            .zip(vs.iter_mut())
            .zip(&tensors)
            .map(|(((p, g), v), t)| LarsTensor {
                p,
                g,
                v,
                adapt: t.1,
            })
            .collect();
        lars.step(gpu, &mut ts, &cfg)
    })?;
    r.add(
        &format!("train/lars/resnet50-{}-tensors", tensors.len()),
        &[("us", s * 1e6), ("params_m", total as f64 / 1e6)],
    );
    Ok(())
}

/// Max pooling forward and backward over activations of element type `T`.
fn maxpool_case<T: Elem>(
    gpu: &Gpu,
    r: &mut Report,
    reps: usize,
    g: &simclr::kernels::cpu::pooling::PoolGeom,
) -> Result<(), GpuError> {
    use simclr::kernels::cuda::layout as l;
    let (nin, nout) = (g.n * g.h * g.w * g.c, g.n * g.oh() * g.ow() * g.c);
    let name = format!("{}x{}x{}x{}", g.n, g.h, g.w, g.c);
    let xd = gpu.zeros::<T>(nin)?;
    let mut yd = gpu.zeros::<T>(nout)?;
    let mut ad = gpu.zeros::<u32>(nout)?;
    let bytes = (nin * T::BYTES + nout * (T::BYTES + 4)) as f64;
    let s = time(gpu, reps, 10, || {
        l::maxpool_forward(gpu, &xd, g, &mut yd, &mut ad.as_view_mut())
    })?;
    r.add(
        &format!("layout/maxpool-fwd-{}/{name}", T::SUFFIX),
        &[("us", s * 1e6), ("gb_per_s", bytes / s / 1e9)],
    );
    let mut dxd = gpu.zeros::<T>(nin)?;
    let s = time(gpu, reps, 10, || {
        l::maxpool_backward(gpu, &yd, &ad.as_view(), g, &mut dxd)
    })?;
    r.add(
        &format!("layout/maxpool-bwd-{}/{name}", T::SUFFIX),
        &[("us", s * 1e6), ("gb_per_s", bytes / s / 1e9)],
    );
    Ok(())
}

/// Max pooling of the ImageNet stem (256 views at 112x112x64), the input permute, and the
/// linear layer's bias kernels at the projection head's size.
fn layout(gpu: &Gpu, r: &mut Report, quick: bool) -> Result<(), GpuError> {
    use simclr::kernels::cpu::pooling::PoolGeom;
    use simclr::kernels::cuda::layout as l;
    let reps = if quick { 5 } else { 15 };
    let g = PoolGeom {
        n: 256,
        h: 112,
        w: 112,
        c: 64,
        k: 3,
        stride: 2,
        pad: 1,
    };
    maxpool_case::<f32>(gpu, r, reps, &g)?;
    maxpool_case::<bf16>(gpu, r, reps, &g)?;
    let n = 3 * 224 * 224 * 256;
    let xd = gpu.zeros::<f32>(n)?;
    let mut yd = gpu.zeros::<f32>(n)?;
    let s = time(gpu, reps, 10, || {
        l::nchw_to_nhwc(gpu, &xd, 256, 3, 224 * 224, &mut yd)
    })?;
    r.add(
        "layout/nchw-to-nhwc/256x3x224x224",
        &[("us", s * 1e6), ("gb_per_s", (n * 8) as f64 / s / 1e9)],
    );
    let (rows, c) = (512, 2048);
    let bd = gpu.zeros::<f32>(c)?;
    let mut md = gpu.zeros::<f32>(rows * c)?;
    let s = time(gpu, reps, 20, || l::broadcast_rows(gpu, &bd, &mut md))?;
    r.add("layout/broadcast-rows/512x2048", &[("us", s * 1e6)]);
    let mut sd = gpu.zeros::<f32>(c)?;
    let s = time(gpu, reps, 20, || l::column_sums(gpu, &md, &mut sd, true))?;
    r.add("layout/column-sums/512x2048", &[("us", s * 1e6)]);
    Ok(())
}

mod cudarc_slice {
    pub use simclr::kernels::cuda::cudarc::driver::CudaSlice;
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    if !gpu_available() {
        println!("gpu_kernels: skipped (no CUDA driver or no GPU on this machine)");
        // SIMCLR_REQUIRE_GPU=1 (the GPU machine's check, the emulated device) makes it a failure.
        if std::env::var("SIMCLR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            std::process::exit(1);
        }
        return;
    }
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu_kernels: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "gpu_kernels on {} ({}, {} SMs)",
        gpu.name().unwrap_or_default(),
        gpu.arch(),
        gpu.multiprocessors()
    );
    let mut r = Report {
        rows: Vec::new(),
        json,
        write_failed: false,
    };
    let mut failed = false;
    for (name, f) in [
        (
            "ntxent",
            ntxent as fn(&Gpu, &mut Report, bool) -> Result<(), GpuError>,
        ),
        ("augment", augment),
        ("train", training),
        ("layout", layout),
    ] {
        if let Err(e) = f(&gpu, &mut r, quick) {
            eprintln!("gpu_kernels: {name}: {e}");
            failed = true;
        }
    }
    if failed || r.write_failed {
        std::process::exit(1);
    }
}

//! One SimCLR training step on the CUDA backend, in source images per second (1 image = 2
//! views), for the workloads of `torch_gpu_baseline.py --only step` run on the same GPU:
//!
//! - `r50`: ResNet-50 + MLP head 2048-2048(BN, ReLU)-128 at 224x224, batch 256 (512 views),
//!   temperature 0.1;
//! - `r18`: ResNet-18 with the CIFAR stem + MLP head 512-512-128 at 32x32, batch 512 (1024
//!   views), temperature 0.5.
//!
//! Both with SGD (momentum 0.9, weight decay 1e-6, as the baseline) in f32, TF32 and bf16 mixed
//! precision (bf16 convolutions and activations), and with LARS in TF32. The views are already
//! on the device, as in the baseline.
//!
//! - `r50-gc`: what no PyTorch implementation offers, the paper's batch of 4096 at 224x224 on
//!   one GPU: gradient caching in 32 chunks of 256 views, bf16, LARS. Its pool peak is the
//!   memory that batch takes (not with `--quick`).
//!
//! The JSON file is rewritten after each case, so a run cut short keeps what it measured.
//!
//! `cargo bench --bench gpu_train_step [-- --json FILE] [--quick]`. Without a GPU it says so
//! and exits successfully. Each figure is the median of timed steps after warm-up steps (the
//! first builds cuDNN plans and compiles the kernels).

use std::time::Instant;

use simclr::nn::cuda::{CudaBackend, MathMode};
use simclr::nn::{
    Device, HeadConfig, Lars, Optimizer, ResNetConfig, Sgd, SimClr, SimClrConfig, Stem, Tensor,
};

struct Case {
    name: &'static str,
    depth: usize,
    stem: Stem,
    side: usize,
    batch: usize,
    temperature: f32,
    /// Gradient-caching chunks (1: the plain step).
    chunks: usize,
}

fn config(c: &Case) -> SimClrConfig {
    let encoder = ResNetConfig::resnet(c.depth, 1, c.stem).expect("a known depth");
    let h = encoder.feature_dim();
    SimClrConfig {
        encoder,
        head: HeadConfig::Mlp {
            hidden_layers: 1,
            hidden_dim: h,
            output_dim: 128,
        },
    }
}

fn run(
    backend: &CudaBackend,
    c: &Case,
    math: MathMode,
    lars: bool,
    quick: bool,
) -> Result<(f64, f32, Memory), simclr::nn::NnError> {
    backend.set_math_mode(math);
    backend.trim_pool()?;
    let dev = Device::Cuda(backend.ordinal());
    let mut model = SimClr::new(&config(c), dev, 0)?;
    let views = 2 * c.batch;
    let n = views * 3 * c.side * c.side;
    let host: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(&[views, 3, c.side, c.side], host)?.to_device(dev)?;
    let mut opt: Box<dyn Optimizer> = if lars {
        Box::new(Lars::default())
    } else {
        Box::new(Sgd::new(0.9, false, 1e-6))
    };
    let mut loss = 0.0;
    let loss_fn = simclr::nn::ContrastiveLoss::NtXent {
        temperature: c.temperature,
    };
    let step = |model: &mut SimClr, opt: &mut dyn Optimizer| {
        if c.chunks > 1 {
            simclr::nn::grad_cache::train_step_cached(model, &x, c.chunks, opt, 1e-3, &loss_fn)
        } else {
            simclr::nn::train_step(model, &x, opt, 1e-3, c.temperature)
        }
        .map(|s| s.loss)
    };
    let (warmup, timed) = match (quick, c.chunks > 1) {
        (_, true) => (2, 3),
        (true, false) => (1, 3),
        (false, false) => (2, 10),
    };
    for _ in 0..warmup {
        loss = step(&mut model, opt.as_mut())?;
    }
    backend.synchronize()?;
    let (before, allocs_before) = (backend.pool_stats()?, backend.gpu().allocations());
    let mut times = Vec::new();
    for _ in 0..timed {
        let s = Instant::now();
        loss = step(&mut model, opt.as_mut())?;
        backend.synchronize()?;
        times.push(s.elapsed().as_secs_f64());
    }
    let (after, allocs_after) = (backend.pool_stats()?, backend.gpu().allocations());
    times.sort_by(|a, b| a.total_cmp(b));
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let memory = Memory {
        peak_mib: mib(after.reserved_peak),
        growth_mib: mib(after.reserved.saturating_sub(before.reserved)),
        // Every device allocation, cache misses and the kernels' own workspaces alike.
        allocations: allocs_after - allocs_before,
    };
    Ok((c.batch as f64 / times[times.len() / 2], loss, memory))
}

/// Device memory of a case: the pool's peak, and what the timed (steady-state) steps added to
/// it (0 when they take no new memory from the driver).
struct Memory {
    peak_mib: f64,
    growth_mib: f64,
    /// Buffers the timed steps allocated rather than took from the cache (0 expected).
    allocations: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    if !simclr::kernels::cuda::gpu_available() {
        println!("gpu_train_step: skipped (no CUDA driver or no GPU on this machine)");
        // SIMCLR_REQUIRE_GPU=1 (the GPU machine's check, the emulated device) makes it a failure.
        if std::env::var("SIMCLR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            std::process::exit(1);
        }
        return;
    }
    let backend = match CudaBackend::get(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gpu_train_step: {e}");
            std::process::exit(1);
        }
    };
    let cases = [
        Case {
            name: "r18",
            depth: 18,
            stem: Stem::Cifar,
            side: 32,
            batch: 512,
            temperature: 0.5,
            chunks: 1,
        },
        Case {
            name: "r50",
            depth: 50,
            stem: Stem::ImageNet,
            side: 224,
            batch: 256,
            temperature: 0.1,
            chunks: 1,
        },
        Case {
            name: "r50-gc",
            depth: 50,
            stem: Stem::ImageNet,
            side: 224,
            batch: 4096,
            temperature: 0.1,
            chunks: 32,
        },
    ];
    let plain = [
        ("fp32-sgd", MathMode::Fp32, false),
        ("tf32-sgd", MathMode::Tf32, false),
        ("tf32-lars", MathMode::Tf32, true),
        ("bf16-sgd", MathMode::Bf16, false),
    ];
    let cached = [("bf16-lars", MathMode::Bf16, true)];
    let mut rows = Vec::new();
    let mut failed = false;
    for c in &cases {
        if quick && c.chunks > 1 {
            continue;
        }
        let variants: &[_] = if c.chunks > 1 { &cached } else { &plain };
        for &(variant, math, lars) in variants {
            if quick && variant == "fp32-sgd" && c.name == "r50" {
                continue;
            }
            match run(&backend, c, math, lars, quick) {
                Ok((ips, loss, mem)) => {
                    println!(
                        "step/{}/{variant:<10} {ips:10.1} images/s   (loss {loss:.4}, pool peak \
                         {:.0} MiB, {:+.1} MiB and {} allocations in the steady state)",
                        c.name, mem.peak_mib, mem.growth_mib, mem.allocations
                    );
                    rows.push(format!(
                        "{{\"name\": \"step/{}/{variant}\", \"model\": \"{}\", \"variant\": \"{variant}\", \"batch\": {}, \"side\": {}, \"images_per_s\": {ips}, \"loss\": {loss}, \"pool_peak_mib\": {}, \"steady_growth_mib\": {}, \"steady_allocations\": {}}}",
                        c.name, c.name, c.batch, c.side, mem.peak_mib, mem.growth_mib, mem.allocations
                    ));
                    if let Some(path) = &json {
                        failed |= !write_json(path, &rows);
                    }
                }
                Err(e) => {
                    println!("step/{}/{variant}: failed: {e}", c.name);
                    failed = true;
                }
            }
        }
    }
    if let Some(path) = &json {
        failed |= !write_json(path, &rows);
    }
    if failed {
        std::process::exit(1);
    }
}

/// Writes the rows so far as a JSON array; false (and a message) when it cannot.
fn write_json(path: &str, rows: &[String]) -> bool {
    let body = format!("[\n  {}\n]\n", rows.join(",\n  "));
    // Through a temporary file: a run killed mid-write leaves the previous, whole file.
    let tmp = format!("{path}.tmp");
    match std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("gpu_train_step: {path}: {e}");
            false
        }
    }
}

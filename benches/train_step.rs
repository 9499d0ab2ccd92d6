//! One SimCLR training step on the CPU: ResNet-18 (CIFAR stem) + MLP head 512-512-128, batch 256
//! images at 32x32, both views through the network as one batch of 512, NT-Xent, SGD.
//! Compare with `torch_cpu_baseline.py`'s section [2] run on the same machine.
//!
//! `SIMCLR_BENCH_BATCH` overrides the batch of images (default 256).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use simclr::nn::{Device, HeadConfig, ResNetConfig, Sgd, SimClr, SimClrConfig, Stem, Tensor};

fn train_step(c: &mut Criterion) {
    let batch: usize = std::env::var("SIMCLR_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let config = SimClrConfig {
        encoder: ResNetConfig::resnet(18, 1, Stem::Cifar).unwrap(),
        head: HeadConfig::paper(512),
    };
    let mut model = SimClr::new(&config, Device::Cpu, 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = 2 * batch * 3 * 32 * 32;
    let views = Tensor::from_vec(
        &[2 * batch, 3, 32, 32],
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect(),
    )
    .unwrap();
    let mut sgd = Sgd::new(0.9, false, 5e-4);
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(20));
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(format!("resnet18_cifar_b{batch}_32x32_sgd"), |b| {
        b.iter(|| simclr::nn::train_step(&mut model, &views, &mut sgd, 0.01, 0.5).unwrap())
    });
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);

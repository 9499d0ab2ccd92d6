//! NT-Xent on the CPU: the fused, tiled kernel's forward and forward+backward at the sizes of
//! `torch_cpu_baseline.py` (N = 256, 1024, 4096 images, 2N rows, d = 128, tau = 0.5), so the
//! medians can be set beside PyTorch's measured in the same session.
//!
//! `cargo bench --bench ntxent`; `cargo bench --bench ntxent -- 4096` for one size.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use simclr::kernels::cpu::ntxent::{nt_xent_forward, nt_xent_forward_backward, NtXentConfig};

/// Standard normal samples (splitmix64 + Box-Muller), seeded: timings do not depend on the
/// values, but the values should look like projections, not like zeros.
fn normal(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (a, b) = (next(), next());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect()
}

fn bench_ntxent(c: &mut Criterion) {
    let dim = 128;
    let cfg = NtXentConfig::new(0.5);
    let mut group = c.benchmark_group("ntxent");
    for n in [256usize, 1024, 4096] {
        let rows = 2 * n;
        let z = normal(rows * dim, n as u64);
        let mut grad = vec![0.0f32; rows * dim];
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(if n >= 4096 { 1500 } else { 500 }));
        group.measurement_time(Duration::from_secs(if n >= 4096 { 6 } else { 2 }));
        // At N = 4096 one call takes a few hundred milliseconds: the same iteration count per
        // sample keeps the total near the measurement time instead of growing linearly.
        group.sampling_mode(if n >= 4096 {
            SamplingMode::Flat
        } else {
            SamplingMode::Auto
        });
        group.bench_with_input(BenchmarkId::new("fwd", n), &n, |b, _| {
            b.iter(|| nt_xent_forward(black_box(&z), rows, dim, &cfg).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("fwd_bwd", n), &n, |b, _| {
            b.iter(|| {
                nt_xent_forward_backward(black_box(&z), rows, dim, &cfg, black_box(&mut grad))
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_ntxent);
criterion_main!(benches);

//! The cache of tensor buffers (`simclr::nn::buffers`): after the first training step, a step
//! takes no new memory, and caching changes no result. The cache is one per process, so these
//! tests live in a binary of their own and take turns.

use std::sync::{Mutex, MutexGuard};

use simclr::nn::buffers::{self, HostBuffer};
use simclr::nn::ops;
use simclr::nn::{Device, HeadConfig, ResNetConfig, Sgd, SimClr, SimClrConfig, Stem, Tensor};

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small CIFAR ResNet whose activations are large enough to be cached (over 128 KiB).
fn model() -> SimClr {
    let mut encoder = ResNetConfig::resnet(18, 1, Stem::Cifar).unwrap();
    encoder.layers = [1, 1, 1, 1];
    encoder.base_width = 8;
    let head = HeadConfig::Mlp {
        hidden_layers: 1,
        hidden_dim: 64,
        output_dim: 32,
    };
    SimClr::new(&SimClrConfig { encoder, head }, Device::Cpu, 3).unwrap()
}

fn views() -> Tensor {
    let n = 16 * 3 * 32 * 32;
    Tensor::from_vec(
        &[16, 3, 32, 32],
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect(),
    )
    .unwrap()
}

/// Losses of `steps` SGD steps.
fn losses(model: &mut SimClr, steps: usize, per_step: &mut dyn FnMut(usize)) -> Vec<f32> {
    let (x, mut sgd) = (views(), Sgd::new(0.9, false, 5e-4));
    (0..steps)
        .map(|s| {
            let l = simclr::nn::train_step(model, &x, &mut sgd, 0.05, 0.5)
                .unwrap()
                .loss;
            per_step(s);
            l
        })
        .collect()
}

#[test]
fn a_steady_training_step_takes_no_new_host_memory() {
    let _t = turn();
    buffers::set_limit(usize::MAX);
    let mut m = model();
    let mut seen = Vec::new();
    let cached = losses(&mut m, 4, &mut |_| seen.push(buffers::stats()));
    // Step 1 fills the cache (and may miss again in step 2, whose optimiser state is new).
    let (s2, s3) = (seen[2], seen[3]);
    assert_eq!(s3.misses, s2.misses, "step 4 allocated: {s2:?} then {s3:?}");
    assert!(
        s3.hits > s2.hits + 20,
        "step 4 reused buffers: {s2:?} then {s3:?}"
    );
    assert!(s3.cached_bytes > 0);

    // The same run with the cache off: bit-identical losses (reused buffers carry nothing over).
    buffers::set_limit(0);
    assert_eq!(buffers::stats().cached_bytes, 0);
    let before = buffers::stats();
    let plain = losses(&mut model(), 4, &mut |_| {});
    let after = buffers::stats();
    assert_eq!(
        after.hits, before.hits,
        "nothing is reused with the cache off"
    );
    assert!(after.misses > before.misses + 80);
    buffers::set_limit(usize::MAX);
    assert_eq!(
        cached.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        plain.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "{cached:?} against {plain:?}"
    );
}

#[test]
fn a_dropped_buffer_serves_the_next_request_of_about_its_size() {
    let _t = turn();
    buffers::set_limit(usize::MAX);
    buffers::release();
    let len = 300_001;
    let a = HostBuffer::zeroed(len);
    let ptr = a.as_ptr();
    drop(a);
    // Up to an eighth smaller may take it; half the size may not.
    let b = HostBuffer::uninit(len - len / 10);
    assert_eq!(b.as_ptr(), ptr, "reused");
    assert_eq!(b.len(), len - len / 10);
    drop(b);
    let c = HostBuffer::uninit(len / 2);
    assert_ne!(
        c.as_ptr(),
        ptr,
        "half the size does not take a buffer twice as large"
    );
    let d = HostBuffer::filled(len, 2.5);
    assert_eq!(d.as_ptr(), ptr);
    assert!(d.iter().all(|&v| v == 2.5), "filled over stale values");
}

#[test]
fn steps_keep_what_they_freed_and_the_limit_bounds_the_rest() {
    let _t = turn();
    buffers::set_limit(usize::MAX);
    buffers::release();
    drop(HostBuffer::zeroed(250_000));
    let held = buffers::stats().cached_bytes;
    assert_eq!(held, 1_000_000);
    // Given back during this step: kept at its end.
    buffers::end_step();
    assert_eq!(buffers::stats().cached_bytes, held);
    // Untouched for a whole step: freed.
    buffers::end_step();
    assert_eq!(buffers::stats().cached_bytes, 0);
    // Allocated elsewhere and given back every step (as a data loader's batches): not kept,
    // with or without step ends.
    for step in 0..4 {
        drop(Tensor::from_vec(&[250_000], vec![1.0; 250_000]).unwrap());
        if step % 2 == 1 {
            buffers::end_step();
        }
    }
    assert_eq!(buffers::stats().cached_bytes, 0);
    let misses = buffers::stats().misses;
    drop(HostBuffer::uninit(250_000));
    assert_eq!(buffers::stats().misses, misses + 1);
    buffers::release();

    // The limit: what does not fit is freed, not kept.
    let three: Vec<HostBuffer> = (0..3).map(|_| HostBuffer::zeroed(200_000)).collect();
    buffers::set_limit(1_000_000);
    drop(three);
    let s = buffers::stats();
    assert!(s.cached_bytes <= 1_000_000, "{s:?}");
    assert_eq!(s.limit_bytes, 1_000_000);
    buffers::set_limit(usize::MAX);
    buffers::release();
    assert_eq!(buffers::stats().cached_bytes, 0);
}

#[test]
fn max_pooling_indices_come_from_the_cache_and_survive_reuse() {
    let _t = turn();
    buffers::set_limit(usize::MAX);
    buffers::release();
    // An ImageNet stem's pooling at a size the cache keeps: 64K outputs and as many indices.
    let shape = [2, 64, 64, 32];
    let n: usize = shape.iter().product();
    let x = Tensor::from_vec(&shape, (0..n).map(|i| ((i * 7919) % 1013) as f32).collect()).unwrap();
    let (y, arg) = ops::max_pool(&x, 3, 2, 1).unwrap();
    let (want_y, want_arg) = (y.to_vec(), arg.to_vec().unwrap());
    assert_eq!(want_y.len(), 2 * 32 * 32 * 32);
    drop((y, arg));
    // Stale indices in the reused buffer would show: the pool of another input differs.
    let other = Tensor::from_vec(&shape, (0..n).map(|i| (n - i) as f32).collect()).unwrap();
    drop(ops::max_pool(&other, 3, 2, 1).unwrap());
    let before = buffers::stats();
    let (y, arg) = ops::max_pool(&x, 3, 2, 1).unwrap();
    let after = buffers::stats();
    assert_eq!(
        (after.hits, after.misses),
        (before.hits + 2, before.misses),
        "the output and its indices reused cached buffers"
    );
    assert_eq!(y.to_vec(), want_y);
    assert_eq!(arg.to_vec().unwrap(), want_arg);
    let dx = ops::max_pool_backward(&y, &arg, &shape, 3, 2, 1).unwrap();
    // Every output's gradient lands on its window's maximum: the sums agree.
    let total: f64 = dx.to_vec().iter().map(|&v| v as f64).sum();
    let want: f64 = want_y.iter().map(|&v| v as f64).sum();
    assert_eq!(total, want);
    buffers::release();
}

//! Two-view SimCLR augmentation throughput of the CPU loader (`simclr::data`), to be read beside
//! `../shared/baselines/torch_cpu_baseline.py --only augment` run on the same machine:
//!
//! - `cifar32`: 2048 random 32x32 images, two 32x32 views each (no blur, s = 0.5);
//! - `imagenet224`: 256 random 256x256 images, two 224x224 views each (blur, s = 1);
//! - `cifar10_jpeg`: JPEG decode + two views of 4096 CIFAR-10 training files, when
//!   `SIMCLR_CIFAR10_JPEG_DIR` (or `target/data/cifar10`) holds the unpacked folder.
//!
//! Every benchmark runs the whole [`Loader`] (2 worker threads, like torch's 2 DataLoader
//! workers) for one epoch; `u8` is torchvision's output format (8-bit, not normalised),
//! `f32` the normalised NCHW batches the trainer eats. Throughput is in views.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{RngCore, SeedableRng};
use simclr::data::{
    AugmentConfig, Augmentation, Dataset, FolderOptions, Image, ImageFolder, ImageSet, Loader,
    LoaderConfig, OutputFormat, Subset,
};

const THREADS: usize = 2;

fn random_images(n: usize, side: u32, seed: u64) -> Arc<dyn Dataset> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let images = (0..n)
        .map(|_| {
            let mut px = vec![0u8; 3 * (side * side) as usize];
            rng.fill_bytes(&mut px);
            Image::new(side, side, px).unwrap()
        })
        .collect();
    Arc::new(ImageSet::new(images, None, Vec::new()).unwrap())
}

fn loader(ds: Arc<dyn Dataset>, aug: AugmentConfig, batch: usize, output: OutputFormat) -> Loader {
    let cfg = LoaderConfig {
        batch_size: batch,
        threads: THREADS,
        output,
        drop_last: false,
        ..LoaderConfig::default()
    };
    Loader::new(ds, Augmentation::new(aug).unwrap(), cfg).unwrap()
}

fn run_epoch(l: &Loader, epoch: &mut u64) {
    *epoch += 1;
    for b in l.epoch(*epoch) {
        black_box(b.unwrap());
    }
}

fn bench_variant(
    c: &mut Criterion,
    name: &str,
    ds: Arc<dyn Dataset>,
    aug: AugmentConfig,
    batch: usize,
) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    g.throughput(Throughput::Elements(2 * ds.len() as u64));
    for (label, output) in [("u8", OutputFormat::U8), ("f32", OutputFormat::F32)] {
        let l = loader(ds.clone(), aug.clone(), batch, output);
        let mut epoch = 0;
        g.bench_function(format!("two_views_{label}_{THREADS}threads"), |b| {
            b.iter(|| run_epoch(&l, &mut epoch))
        });
    }
    g.finish();
}

fn cifar_jpeg_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SIMCLR_CIFAR10_JPEG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/data/cifar10"));
    dir.join("train").is_dir().then_some(dir)
}

fn augment(c: &mut Criterion) {
    bench_variant(
        c,
        "cifar32",
        random_images(2048, 32, 2),
        AugmentConfig::simclr(32, 0.5, false),
        256,
    );
    bench_variant(
        c,
        "imagenet224",
        random_images(256, 256, 2),
        AugmentConfig::simclr(224, 1.0, true),
        32,
    );
    match cifar_jpeg_dir() {
        Some(dir) => {
            let folder: Arc<dyn Dataset> = Arc::new(
                ImageFolder::labelled(&dir.join("train"), &FolderOptions::default()).unwrap(),
            );
            // Every 12th file: 4096 images of all ten classes.
            let idx: Vec<usize> = (0..folder.len()).step_by(12).take(4096).collect();
            let ds: Arc<dyn Dataset> = Arc::new(Subset::new(folder, idx).unwrap());
            bench_variant(c, "cifar10_jpeg", ds, AugmentConfig::cifar10(), 256);
        }
        None => eprintln!(
            "skipped cifar10_jpeg: set SIMCLR_CIFAR10_JPEG_DIR to the unpacked cifar10 folder"
        ),
    }
}

criterion_group!(benches, augment);
criterion_main!(benches);

//! The loaders on the real data sets, read whole: Fashion-MNIST (Debian's
//! `dataset-fashion-mnist`) and CIFAR-10 as JPEG folders (`../shared/data/cifar10-jpeg.tar.gz`).
//!
//! - `SIMCLR_FASHION_MNIST_DIR`: the IDX files (default `/usr/share/datasets/fashion-mnist`);
//! - `SIMCLR_CIFAR10_JPEG_DIR`: the unpacked `cifar10` folder holding `train/` and `test/`
//!   (default `target/data/cifar10` of the workspace);
//! - `SIMCLR_REQUIRE_REAL_DATA=1`: a missing data set fails the test instead of skipping it (CI).
//!
//! Run in release mode: decoding the 60,000 JPEGs takes a few seconds on two cores.

use std::path::PathBuf;
use std::sync::Arc;

use simclr_data::*;

fn data_dir(var: &str, default: PathBuf, probe: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    if dir.join(probe).exists() {
        return Some(dir);
    }
    let msg = format!("{var}: no {probe} under {}", dir.display());
    if std::env::var("SIMCLR_REQUIRE_REAL_DATA").is_ok_and(|v| v == "1") {
        panic!("{msg} (SIMCLR_REQUIRE_REAL_DATA=1)");
    }
    println!("skipped: {msg}");
    None
}

fn mean_rgb(ds: &dyn Dataset, step: usize) -> [f64; 3] {
    let mut s = [0.0f64; 3];
    let mut n = 0usize;
    for i in (0..ds.len()).step_by(step) {
        for px in ds.image(i).unwrap().pixels().chunks(3) {
            for c in 0..3 {
                s[c] += px[c] as f64 / 255.0;
            }
            n += 1;
        }
    }
    s.map(|v| v / n as f64)
}

#[test]
fn fashion_mnist_is_read_whole_with_the_right_counts() {
    let Some(dir) = data_dir(
        "SIMCLR_FASHION_MNIST_DIR",
        PathBuf::from("/usr/share/datasets/fashion-mnist"),
        "train-labels-idx1-ubyte.gz",
    ) else {
        return;
    };
    let train = Mnist::open(&dir, Split::Train, MnistKind::Fashion).unwrap();
    let test = Mnist::open(&dir, Split::Test, MnistKind::Fashion).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(class_counts(&train), vec![6000; 10]);
    assert_eq!(class_counts(&test), vec![1000; 10]);
    let img = train.image(59_999).unwrap();
    assert_eq!((img.width(), img.height()), (28, 28));
    // Fashion-MNIST's published pixel mean is 0.2860.
    let m = mean_rgb(&train, 1)[0];
    assert!((m - 0.2860).abs() < 0.001, "mean {m}");
    // A 1% label subset, through the loader.
    let ds: Arc<dyn Dataset> = Arc::new(train);
    let sub: Arc<dyn Dataset> = Arc::new(label_subset(ds, 0.01, 0).unwrap());
    assert_eq!(class_counts(sub.as_ref()), vec![60; 10]);
    let aug = Augmentation::new(AugmentConfig::simclr(28, 0.5, false)).unwrap();
    let l = Loader::new(
        sub,
        aug,
        LoaderConfig {
            batch_size: 100,
            ..LoaderConfig::default()
        },
    )
    .unwrap();
    let batches: Vec<Batch> = l.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 6);
    assert_eq!(batches[0].shape(), [200, 3, 28, 28]);
}

#[test]
fn cifar10_jpeg_folders_are_read_whole_with_the_right_counts() {
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/data/cifar10");
    let Some(dir) = data_dir("SIMCLR_CIFAR10_JPEG_DIR", default, "test/truck") else {
        return;
    };
    let opts = FolderOptions::default();
    for (split, per_class) in [("train", 5000), ("test", 1000)] {
        let folder = ImageFolder::labelled(&dir.join(split), &opts).unwrap();
        assert_eq!(folder.class_names(), CIFAR10_CLASSES.map(String::from));
        assert_eq!(class_counts(&folder), vec![per_class; 10], "{split}");
        // Decode every file, in parallel.
        let (set, skipped) = ImageSet::load(&folder, ErrorPolicy::Fail).unwrap();
        assert_eq!((set.len(), skipped), (10 * per_class, 0));
        assert_eq!(class_counts(&set), vec![per_class; 10]);
        assert!(set
            .images()
            .iter()
            .all(|i| (i.width(), i.height()) == (32, 32)));
        if split == "test" {
            // CIFAR-10's channel means are about (0.49, 0.48, 0.45): the channel order is right.
            let m = mean_rgb(&set, 1);
            for (c, want) in [0.4914, 0.4822, 0.4465].into_iter().enumerate() {
                assert!((m[c] - want).abs() < 0.02, "channel {c}: {}", m[c]);
            }
            let ds: Arc<dyn Dataset> = Arc::new(set);
            let aug = Augmentation::new(AugmentConfig::cifar10()).unwrap();
            let l = Loader::new(
                ds,
                aug,
                LoaderConfig {
                    batch_size: 512,
                    ..LoaderConfig::default()
                },
            )
            .unwrap();
            let mut n = 0;
            for b in l.epoch(0) {
                let b = b.unwrap();
                assert_eq!(b.shape(), [1024, 3, 32, 32]);
                let x = b.view_f32(0).unwrap();
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
                assert!(mean.abs() < 0.5, "normalised batch mean {mean}");
                n += b.len();
            }
            assert_eq!(n, 9728);
        }
    }
}

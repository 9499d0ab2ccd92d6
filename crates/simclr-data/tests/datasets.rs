//! The synthetic data set, subsets, splits and class-balanced label subsets.

use std::sync::Arc;

use simclr_data::*;

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn digest(ds: &SyntheticShapes, n: usize) -> u64 {
    (0..n).fold(0xcbf2_9ce4_8422_2325, |h, i| {
        fnv1a(ds.image(i).unwrap().pixels(), h)
    })
}

#[test]
fn synthetic_images_are_the_same_for_the_same_seed_on_every_machine() {
    let a = SyntheticShapes::new(100, 32, 0).unwrap();
    let b = SyntheticShapes::new(5000, 32, 0).unwrap();
    assert_eq!(
        a.image(17).unwrap(),
        b.image(17).unwrap(),
        "independent of the length"
    );
    let c = SyntheticShapes::new(100, 32, 1).unwrap();
    assert_ne!(a.image(17).unwrap(), c.image(17).unwrap());
    // Golden digest of the first 20 images of seed 0 at 32 x 32: only integer hashing and
    // IEEE basic arithmetic make them, so this holds on every platform. A change here changes
    // the built-in data set: update the value deliberately.
    assert_eq!(digest(&a, 20), GOLDEN, "digest {:#x}", digest(&a, 20));
}

const GOLDEN: u64 = 0x6481_bacb_f7f7_66f4;

#[test]
fn synthetic_set_is_balanced_any_size_and_labelled() {
    let ds = SyntheticShapes::new(1003, 48, 3).unwrap();
    assert_eq!(ds.len(), 1003);
    assert_eq!(
        class_counts(&ds),
        vec![101, 101, 101, 100, 100, 100, 100, 100, 100, 100]
    );
    assert_eq!(ds.class_names()[7], "checkerboard");
    let img = ds.image(1002).unwrap();
    assert_eq!((img.width(), img.height()), (48, 48));
    assert!(ds.image(1003).is_err());
    assert!(SyntheticShapes::new(10, 4, 0).is_err());
    // Nuisance: two images of one class differ in colour and background.
    assert_ne!(
        ds.image(0).unwrap().pixel(0, 0),
        ds.image(10).unwrap().pixel(0, 0)
    );
}

/// One-vs-all ridge regression (a linear classifier) trained on `train`, accuracy on `test`.
fn ridge_accuracy(train: &[(Vec<f64>, usize)], test: &[(Vec<f64>, usize)], lambda: f64) -> f64 {
    let d = train[0].0.len() + 1;
    let mut a = vec![0.0f64; d * d];
    let mut b = vec![0.0f64; d * 10];
    for (x, y) in train {
        let x: Vec<f64> = x.iter().copied().chain([1.0]).collect();
        for i in 0..d {
            let xi = x[i];
            if xi == 0.0 {
                continue;
            }
            for j in i..d {
                a[i * d + j] += xi * x[j];
            }
            b[i * 10 + y] += xi;
        }
    }
    for i in 0..d {
        for j in 0..i {
            a[i * d + j] = a[j * d + i];
        }
        a[i * d + i] += lambda;
    }
    // Cholesky: a = L L^T, then solve for every class column.
    for j in 0..d {
        let mut s = a[j * d + j];
        for k in 0..j {
            s -= a[j * d + k] * a[j * d + k];
        }
        let l = s.sqrt();
        a[j * d + j] = l;
        for i in j + 1..d {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= a[i * d + k] * a[j * d + k];
            }
            a[i * d + j] = s / l;
        }
    }
    let mut w = b.clone();
    for c in 0..10 {
        for i in 0..d {
            let mut s = w[i * 10 + c];
            for k in 0..i {
                s -= a[i * d + k] * w[k * 10 + c];
            }
            w[i * 10 + c] = s / a[i * d + i];
        }
        for i in (0..d).rev() {
            let mut s = w[i * 10 + c];
            for k in i + 1..d {
                s -= a[k * d + i] * w[k * 10 + c];
            }
            w[i * 10 + c] = s / a[i * d + i];
        }
    }
    let correct = test
        .iter()
        .filter(|(x, y)| {
            let score = |c: usize| {
                x.iter()
                    .enumerate()
                    .map(|(i, v)| v * w[i * 10 + c])
                    .sum::<f64>()
                    + w[(d - 1) * 10 + c]
            };
            (0..10)
                .max_by(|&p, &q| score(p).total_cmp(&score(q)))
                .unwrap()
                == *y
        })
        .count();
    correct as f64 / test.len() as f64
}

#[test]
fn a_linear_classifier_on_raw_pixels_does_clearly_worse_than_on_invariant_features() {
    let ds = SyntheticShapes::new(2000, 16, 11).unwrap();
    let feats = |canonical: bool, range: std::ops::Range<usize>| -> Vec<(Vec<f64>, usize)> {
        range
            .map(|i| {
                let img = if canonical {
                    ds.canonical(i)
                } else {
                    ds.image(i)
                }
                .unwrap();
                let x = img.pixels().iter().map(|&v| v as f64 / 255.0).collect();
                (x, i % 10)
            })
            .collect()
    };
    let raw = ridge_accuracy(&feats(false, 0..1500), &feats(false, 1500..2000), 1.0);
    let good = ridge_accuracy(&feats(true, 0..1500), &feats(true, 1500..2000), 1.0);
    println!("linear probe: raw pixels {raw:.3}, nuisance-free shapes {good:.3}");
    assert!(good > 0.95, "invariant features {good}");
    assert!(raw < 0.6, "raw pixels {raw}");
    assert!(
        raw > 0.1,
        "raw pixels at chance {raw}: the test would prove nothing"
    );
}

#[test]
fn label_subsets_are_class_balanced_and_reproducible() {
    let ds: Arc<dyn Dataset> = Arc::new(SyntheticShapes::new(2000, 8, 0).unwrap());
    for (fraction, per_class) in [(0.01, 2), (0.1, 20)] {
        let s = label_subset(ds.clone(), fraction, 42).unwrap();
        assert_eq!(s.len(), 10 * per_class);
        assert_eq!(class_counts(&s), vec![per_class; 10]);
        let again = label_subset_indices(ds.as_ref(), fraction, 42).unwrap();
        assert_eq!(s.indices(), &again[..]);
        assert_ne!(
            again,
            label_subset_indices(ds.as_ref(), fraction, 43).unwrap()
        );
        assert!(again.windows(2).all(|w| w[0] < w[1]));
    }
    // The 1% subset is not inside the 10% one by construction, but each is reproducible;
    // a class with few images still gets one.
    let tiny: Arc<dyn Dataset> = Arc::new(SyntheticShapes::new(30, 8, 0).unwrap());
    assert_eq!(
        class_counts(&label_subset(tiny, 0.01, 0).unwrap()),
        vec![1; 10]
    );
    assert!(label_subset_indices(ds.as_ref(), 0.0, 0).is_err());
    assert!(label_subset_indices(ds.as_ref(), 1.5, 0).is_err());
    let unlabelled =
        ImageSet::new(vec![Image::new(1, 1, vec![0; 3]).unwrap()], None, vec![]).unwrap();
    assert!(label_subset_indices(&unlabelled, 0.1, 0).is_err());
}

#[test]
fn train_test_split_is_stratified_disjoint_and_complete() {
    let ds: Arc<dyn Dataset> = Arc::new(SyntheticShapes::new(500, 8, 0).unwrap());
    let (train, test) = train_test_split(ds.clone(), 0.2, 7).unwrap();
    assert_eq!((train.len(), test.len()), (400, 100));
    assert_eq!(class_counts(&test), vec![10; 10]);
    let mut all: Vec<usize> = train
        .indices()
        .iter()
        .chain(test.indices())
        .copied()
        .collect();
    all.sort();
    assert_eq!(all, (0..500).collect::<Vec<_>>());
    let (_, test2) = train_test_split(ds.clone(), 0.2, 7).unwrap();
    assert_eq!(test.indices(), test2.indices());
    assert_eq!(test.label(0), ds.label(test.indices()[0]));
    assert!(Subset::new(ds, vec![0, 500]).is_err());
}

#[test]
fn image_set_checks_its_labels() {
    let img = Image::new(2, 2, vec![0; 12]).unwrap();
    assert!(ImageSet::new(vec![img.clone()], Some(vec![0, 1]), vec!["a".into()]).is_err());
    assert!(ImageSet::new(vec![img.clone()], Some(vec![1]), vec!["a".into()]).is_err());
    let s = ImageSet::new(vec![img], Some(vec![0]), vec!["a".into()]).unwrap();
    assert_eq!((s.len(), s.label(0), s.label(1)), (1, Some(0), None));
    assert!(Image::new(2, 2, vec![0; 11]).is_err());
    assert!(Image::new(0, 2, vec![]).is_err());
}

//! The loader: the row convention of the batches, determinism whatever the thread count,
//! shuffling, drop-last, sharding, the prefetch bound, and bad items.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use simclr_data::augment::{apply_color_stage, normalize};
use simclr_data::*;

fn shapes(n: usize) -> Arc<dyn Dataset> {
    Arc::new(SyntheticShapes::new(n, 20, 5).unwrap())
}

fn aug() -> Augmentation {
    Augmentation::new(AugmentConfig {
        normalize: Normalize::CIFAR10,
        ..AugmentConfig::simclr(12, 0.5, true)
    })
    .unwrap()
}

fn cfg(batch: usize, threads: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: batch,
        threads,
        seed: 99,
        ..LoaderConfig::default()
    }
}

fn collect(l: &Loader, epoch: u64) -> Vec<Batch> {
    l.epoch(epoch).map(|b| b.unwrap()).collect()
}

#[test]
fn rows_are_view_major_and_match_the_augmentation() {
    let ds = shapes(40);
    let l = Loader::new(ds.clone(), aug(), cfg(8, 2)).unwrap();
    let batches = collect(&l, 3);
    assert_eq!(batches.len(), 5);
    let a = aug();
    for b in &batches {
        assert_eq!(b.shape(), [16, 3, 12, 12]);
        assert_eq!(b.epoch, 3);
        assert_eq!(b.labels.as_ref().unwrap().len(), 8);
        assert_eq!(b.params.len(), 16);
        let per = 3 * 12 * 12;
        for (i, &idx) in b.indices.iter().enumerate() {
            assert_eq!(b.labels.as_ref().unwrap()[i], (idx % 10) as u32);
            let img = ds.image(idx).unwrap();
            for v in 0..2 {
                let key = ViewKey {
                    seed: 99,
                    epoch: 3,
                    index: idx as u64,
                    view: v as u32,
                };
                let (p, want) = a.view_f32(&img, key).unwrap();
                assert_eq!(b.params[v * 8 + i], p);
                assert_eq!(&b.view_f32(v).unwrap()[i * per..(i + 1) * per], &want[..]);
            }
        }
        // The two views of an image differ.
        assert_ne!(b.view_f32(0).unwrap(), b.view_f32(1).unwrap());
    }
}

#[test]
fn batches_do_not_depend_on_the_thread_count() {
    let one = collect(&Loader::new(shapes(30), aug(), cfg(7, 1)).unwrap(), 1);
    let three = collect(&Loader::new(shapes(30), aug(), cfg(7, 3)).unwrap(), 1);
    assert_eq!(one.len(), 4);
    assert_eq!(one, three);
}

#[test]
fn every_epoch_is_a_new_permutation_and_the_same_on_every_run() {
    let l = Loader::new(
        shapes(43),
        aug(),
        LoaderConfig {
            drop_last: false,
            ..cfg(8, 2)
        },
    )
    .unwrap();
    let e0 = l.epoch_indices(0);
    let e1 = l.epoch_indices(1);
    assert_ne!(e0, e1);
    assert_eq!(e0, l.epoch_indices(0));
    for e in [&e0, &e1] {
        let mut s = e.clone();
        s.sort();
        assert_eq!(s, (0..43).collect::<Vec<_>>());
    }
    let batches = collect(&l, 0);
    assert_eq!(batches.len(), 6);
    assert_eq!(batches[5].len(), 3);
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen, e0);
    let ordered = Loader::new(
        shapes(10),
        aug(),
        LoaderConfig {
            shuffle: false,
            ..cfg(4, 1)
        },
    )
    .unwrap();
    assert_eq!(ordered.epoch_indices(5), (0..10).collect::<Vec<_>>());
}

#[test]
fn drop_last_drops_the_incomplete_batch() {
    let l = Loader::new(shapes(43), aug(), cfg(8, 2)).unwrap();
    let b = collect(&l, 0);
    assert_eq!(b.len(), 5);
    assert_eq!(l.batches_per_epoch(), 5);
    assert!(b.iter().all(|b| b.len() == 8));
}

#[test]
fn shards_are_disjoint_and_equal_with_drop_last() {
    for drop_last in [true, false] {
        let mut all = Vec::new();
        let mut counts = Vec::new();
        for rank in 0..3 {
            let l = Loader::new(
                shapes(43),
                aug(),
                LoaderConfig {
                    rank,
                    world_size: 3,
                    drop_last,
                    ..cfg(4, 1)
                },
            )
            .unwrap();
            let idx = l.epoch_indices(2);
            counts.push((idx.len(), l.batches_per_epoch()));
            all.extend(idx);
        }
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "disjoint");
        if drop_last {
            assert_eq!(counts, vec![(14, 3); 3]);
        } else {
            assert_eq!(all.len(), 43);
            assert_eq!(counts, vec![(15, 4), (14, 4), (14, 4)]);
        }
    }
}

/// A data set that counts its reads and fails (or panics) on chosen indices.
struct Flaky {
    inner: SyntheticShapes,
    bad: Vec<usize>,
    panic_on: Option<usize>,
    reads: AtomicUsize,
}

impl Dataset for Flaky {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.panic_on == Some(index) {
            panic!("flaky data set panics on {index}");
        }
        if self.bad.contains(&index) {
            return Err(DataError::Decode {
                file: format!("bad-{index}.jpg"),
                message: "truncated".into(),
            });
        }
        self.inner.image(index)
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.inner.label(index)
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
}

fn flaky(n: usize, bad: Vec<usize>, panic_on: Option<usize>) -> Arc<Flaky> {
    Arc::new(Flaky {
        inner: SyntheticShapes::new(n, 20, 5).unwrap(),
        bad,
        panic_on,
        reads: AtomicUsize::new(0),
    })
}

#[test]
fn bad_items_fail_the_epoch_or_are_skipped_and_counted() {
    let ds = flaky(24, vec![3, 17], None);
    let l = Loader::new(
        ds.clone(),
        aug(),
        LoaderConfig {
            shuffle: false,
            ..cfg(6, 2)
        },
    )
    .unwrap();
    let results: Vec<_> = l.epoch(0).collect();
    let e = results[0].as_ref().unwrap_err();
    assert!(e.to_string().contains("bad-3.jpg"), "{e}");
    assert_eq!(results.len(), 1, "the epoch ends at the error");

    let skip = Loader::new(
        ds.clone(),
        aug(),
        LoaderConfig {
            shuffle: false,
            errors: ErrorPolicy::Skip,
            ..cfg(6, 2)
        },
    )
    .unwrap();
    let clean = Loader::new(
        shapes(24),
        aug(),
        LoaderConfig {
            shuffle: false,
            ..cfg(6, 2)
        },
    )
    .unwrap();
    let got = collect(&skip, 0);
    let want = collect(&clean, 0);
    assert_eq!(skip.skipped(), 2);
    assert_eq!(got[0].indices, vec![0, 1, 2, 4, 5]);
    assert_eq!(got[0].skipped, 1);
    assert_eq!(got[0].shape(), [10, 3, 12, 12]);
    // The kept rows are those of the clean run, in both views.
    let per = 3 * 12 * 12;
    for v in 0..2 {
        let g = got[0].view_f32(v).unwrap();
        let w = want[0].view_f32(v).unwrap();
        for (row, src) in [0usize, 1, 2, 4, 5].into_iter().enumerate() {
            assert_eq!(
                &g[row * per..(row + 1) * per],
                &w[src * per..(src + 1) * per]
            );
        }
    }
    assert_eq!(got[0].params[5], want[0].params[6]);
    assert_eq!(got[2].len(), 5);
}

#[test]
fn a_panicking_worker_is_an_error_not_a_hang() {
    let ds = flaky(16, vec![], Some(9));
    let l = Loader::new(
        ds,
        aug(),
        LoaderConfig {
            shuffle: false,
            ..cfg(4, 2)
        },
    )
    .unwrap();
    let results: Vec<_> = l.epoch(0).collect();
    assert!(results[0].is_ok() && results[1].is_ok());
    let e = results.last().unwrap().as_ref().unwrap_err();
    assert!(
        matches!(e, DataError::Worker(_)) && e.to_string().contains("panics on 9"),
        "{e}"
    );
}

#[test]
fn prefetch_is_bounded_and_dropping_the_epoch_stops_the_work() {
    let ds = flaky(400, vec![], None);
    let l = Loader::new(
        ds.clone(),
        aug(),
        LoaderConfig {
            prefetch: 2,
            ..cfg(10, 2)
        },
    )
    .unwrap();
    let mut it = l.epoch(0);
    let first = it.next().unwrap().unwrap();
    assert_eq!(first.len(), 10);
    std::thread::sleep(Duration::from_millis(300));
    // One taken, two queued, one blocked in send: at most 4 batches made (fewer only on a
    // machine too busy to make them in 300 ms).
    let reads = ds.reads.load(Ordering::SeqCst);
    assert!((10..=40).contains(&reads), "{reads} reads");
    let t = Instant::now();
    drop(it);
    assert!(t.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ds.reads.load(Ordering::SeqCst),
        reads,
        "no work after the drop"
    );
}

#[test]
fn u8_outputs_are_the_f32_pipeline_quantised_or_its_geometry() {
    let ds = shapes(12);
    let a = Augmentation::new(AugmentConfig {
        cutout_p: 0.5,
        noise_p: 0.5,
        rotation_p: 0.5,
        normalize: Normalize::IMAGENET,
        ..AugmentConfig::simclr(12, 1.0, true)
    })
    .unwrap();
    let make = |output| {
        collect(
            &Loader::new(
                ds.clone(),
                a.clone(),
                LoaderConfig {
                    output,
                    ..cfg(6, 2)
                },
            )
            .unwrap(),
            0,
        )
    };
    let (f, q, g) = (
        make(OutputFormat::F32),
        make(OutputFormat::U8),
        make(OutputFormat::U8Geometry),
    );
    for ((f, q), g) in f.iter().zip(&q).zip(&g) {
        assert_eq!(f.params, g.params);
        assert_eq!(f.indices, q.indices);
        let BatchData::F32(fd) = &f.data else {
            panic!()
        };
        let BatchData::U8(qd) = &q.data else { panic!() };
        let BatchData::U8(gd) = &g.data else { panic!() };
        let per = 3 * 12 * 12;
        for (row, p) in f.params.iter().enumerate() {
            // The GPU path: geometry from the loader, then the colour stage and normalisation.
            let mut x: Vec<f32> = gd[row * per..(row + 1) * per]
                .iter()
                .map(|&v| v as f32 / 255.0)
                .collect();
            apply_color_stage(&mut x, p, &mut Vec::new());
            let mut unnorm = x.clone();
            normalize(&mut x, &Normalize::IMAGENET);
            let want = &fd[row * per..(row + 1) * per];
            let d = x
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-5, "row {row}: {d}");
            for v in &mut unnorm {
                *v = (*v * 255.0 + 0.5).floor();
            }
            let qrow: Vec<f32> = qd[row * per..(row + 1) * per]
                .iter()
                .map(|&v| v as f32)
                .collect();
            assert_eq!(qrow, unnorm);
        }
    }
}

#[test]
fn eval_loader_sees_every_image_once_in_order() {
    let ds = shapes(23);
    let l = Loader::new(
        ds,
        Augmentation::new(AugmentConfig::eval(16, None)).unwrap(),
        LoaderConfig::eval(10),
    )
    .unwrap();
    let b = collect(&l, 0);
    assert_eq!(
        b.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![10, 10, 3]
    );
    assert_eq!(b[2].indices, vec![20, 21, 22]);
    assert_eq!(b[0].shape(), [10, 3, 16, 16]);
    // No randomness: the same pixels in every epoch.
    assert_eq!(collect(&l, 1)[0].data, b[0].data);
}

#[test]
fn bad_configurations_are_errors() {
    let a = aug();
    assert!(Loader::new(shapes(5), a.clone(), cfg(0, 1)).is_err());
    assert!(Loader::new(
        shapes(5),
        a.clone(),
        LoaderConfig {
            rank: 2,
            world_size: 2,
            ..cfg(2, 1)
        }
    )
    .is_err());
    assert!(Loader::new(
        shapes(5),
        a.clone(),
        LoaderConfig {
            views: 0,
            ..cfg(2, 1)
        }
    )
    .is_err());
    let empty: Arc<dyn Dataset> = Arc::new(ImageSet::default());
    assert!(Loader::new(empty, a, cfg(2, 1)).is_err());
}

//! End to end through the facade: the built-in data set, two augmented views per image in the
//! trainer's row convention, the parameters the GPU kernels take, and the evaluation path.

use std::sync::Arc;

use simclr::data::{
    AugmentConfig, Augmentation, BatchData, Dataset, Loader, LoaderConfig, OutputFormat,
    SyntheticShapes,
};
use simclr::kernels::augment::{ViewParams, VIEW_PARAMS_BYTES};

#[test]
fn synthetic_pairs_reach_the_trainer_in_its_convention() {
    let ds: Arc<dyn Dataset> = Arc::new(SyntheticShapes::new(96, 32, 0).unwrap());
    let aug = Augmentation::new(AugmentConfig::cifar10()).unwrap();
    let cfg = LoaderConfig {
        batch_size: 32,
        threads: 2,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(ds.clone(), aug, cfg).unwrap();
    let mut seen = Vec::new();
    let (mut sum, mut sum2, mut count) = (0.0f64, 0.0f64, 0usize);
    for batch in loader.epoch(0) {
        let batch = batch.unwrap();
        assert_eq!(batch.shape(), [64, 3, 32, 32]);
        let BatchData::F32(x) = &batch.data else {
            panic!("f32 expected")
        };
        for &v in x.iter() {
            sum += v as f64;
            sum2 += (v as f64) * (v as f64);
        }
        count += x.len();
        // Rows i and B + i are the two views of image indices[i]: the same source image, so
        // their parameters name the same source size, and differ in their random draws.
        let b = batch.len();
        for i in 0..b {
            let (p, q): (ViewParams, ViewParams) = (batch.params[i], batch.params[b + i]);
            assert_eq!((p.src_w, p.src_h), (32, 32));
            assert_ne!(p, q);
        }
        assert_eq!(
            ViewParams::slice_as_bytes(&batch.params).len(),
            2 * b * VIEW_PARAMS_BYTES
        );
        seen.extend(batch.indices.clone());
        assert_eq!(
            batch.labels.unwrap(),
            batch
                .indices
                .iter()
                .map(|&i| (i % 10) as u32)
                .collect::<Vec<_>>()
        );
    }
    seen.sort();
    assert_eq!(seen, (0..96).collect::<Vec<_>>());
    // Normalised with CIFAR-10's statistics: centred near 0 with a spread near 1 (the
    // synthetic colours are not CIFAR's, so loosely).
    let mean = sum / count as f64;
    let std = (sum2 / count as f64 - mean * mean).sqrt();
    assert!(
        mean.abs() < 0.5 && (0.5..2.0).contains(&std),
        "{mean} {std}"
    );
}

#[test]
fn evaluation_path_is_plain_and_u8_geometry_is_there_for_the_gpu() {
    let ds: Arc<dyn Dataset> = Arc::new(SyntheticShapes::new(10, 40, 1).unwrap());
    let eval = Augmentation::new(AugmentConfig::eval(32, Some(36))).unwrap();
    let l = Loader::new(ds.clone(), eval, LoaderConfig::eval(4)).unwrap();
    let batches: Vec<_> = l.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].shape(), [4, 3, 32, 32]);
    assert!(batches
        .iter()
        .all(|b| b.params.iter().all(|p| !p.has_color_stage())));
    let gpu = Loader::new(
        ds,
        Augmentation::new(AugmentConfig::simclr(32, 1.0, true)).unwrap(),
        LoaderConfig {
            batch_size: 5,
            output: OutputFormat::U8Geometry,
            ..LoaderConfig::default()
        },
    )
    .unwrap();
    let b = gpu.epoch(0).next().unwrap().unwrap();
    assert!(matches!(b.data, BatchData::U8(_)));
    assert_eq!(b.view_u8(1).unwrap().len(), 5 * 3 * 32 * 32);
}

//! Drawing and applying the augmentation: determinism, the paper's distributions, geometry,
//! the ablation-only transforms, and robustness to any parameters.

use proptest::prelude::*;
use simclr_data::augment::{apply_color_stage, ops};
use simclr_data::{AugmentConfig, Augmentation, Crop, Image, Normalize, ViewKey, ViewParams};

fn key(index: u64, view: u32) -> ViewKey {
    ViewKey {
        seed: 7,
        epoch: 3,
        index,
        view,
    }
}

/// A 40 x 30 image whose pixel (x, y) is (x * 6, y * 8, 100).
fn ramp() -> Image {
    let (w, h) = (40u32, 30u32);
    let mut d = Vec::new();
    for y in 0..h {
        for x in 0..w {
            d.extend_from_slice(&[(x * 6) as u8, (y * 8) as u8, 100]);
        }
    }
    Image::new(w, h, d).unwrap()
}

#[test]
fn same_key_same_view_and_different_keys_differ() {
    let aug = Augmentation::new(AugmentConfig::imagenet()).unwrap();
    let a = aug.draw(500, 375, key(11, 0));
    assert_eq!(a, aug.draw(500, 375, key(11, 0)));
    assert_ne!(a, aug.draw(500, 375, key(11, 1)));
    assert_ne!(a, aug.draw(500, 375, key(12, 0)));
    let other_epoch = ViewKey {
        epoch: 4,
        ..key(11, 0)
    };
    assert_ne!(a, aug.draw(500, 375, other_epoch));
}

#[test]
fn random_resized_crop_follows_the_paper_distribution() {
    let aug = Augmentation::new(AugmentConfig::simclr(32, 0.5, false)).unwrap();
    let (sw, sh) = (320u32, 240u32);
    let n = 4000;
    let mut areas = Vec::new();
    for i in 0..n {
        let p = aug.draw(sw, sh, key(i, 0));
        assert!(
            p.crop_x + p.crop_w <= sw && p.crop_y + p.crop_h <= sh,
            "{p:?}"
        );
        assert!(p.crop_w >= 1 && p.crop_h >= 1);
        let area = (p.crop_w * p.crop_h) as f64 / (sw * sh) as f64;
        let ratio = p.crop_w as f64 / p.crop_h as f64;
        // Rounding of the sides moves area and ratio a little off their ranges.
        assert!((0.07..=1.0).contains(&area), "area {area}");
        assert!((0.70..=1.40).contains(&ratio), "ratio {ratio}");
        areas.push(area);
    }
    // torchvision 0.29's `RandomResizedCrop.get_params` on a 320 x 240 image (20,000 draws):
    // mean area 0.435, 31.6% of the areas below 0.3 (large crops of the wrong shape are
    // rejected, so the mean is below uniform's 0.54).
    let mean = areas.iter().sum::<f64>() / n as f64;
    assert!((mean - 0.435).abs() < 0.02, "mean area {mean}");
    let small = areas.iter().filter(|&&a| a < 0.3).count() as f64 / n as f64;
    assert!(
        (small - 0.316).abs() < 0.03,
        "fraction of areas < 0.3: {small}"
    );
}

#[test]
fn probabilities_and_factor_ranges_are_the_papers() {
    let s = 1.0;
    let aug = Augmentation::new(AugmentConfig::simclr(224, s, true)).unwrap();
    let n = 4000;
    let (mut flips, mut jitters, mut grays, mut blurs) = (0, 0, 0, 0);
    let mut orders = std::collections::HashSet::new();
    for i in 0..n {
        let p = aug.draw(256, 256, key(i, (i % 2) as u32));
        flips += p.flip;
        grays += p.grayscale;
        if p.has_jitter() {
            jitters += 1;
            for f in [p.brightness, p.contrast, p.saturation] {
                assert!((0.2..=1.8).contains(&f), "factor {f}");
            }
            assert!(p.hue.abs() <= 0.2);
            orders.insert(p.jitter_order);
        }
        if p.blur_sigma > 0.0 {
            blurs += 1;
            assert!((0.1..=2.0).contains(&p.blur_sigma));
            assert_eq!(p.blur_kernel, 23);
        }
        assert_eq!(
            (p.rotation, p.sobel, p.cutout_w, p.noise_std),
            (0, 0, 0, 0.0)
        );
    }
    let frac = |c: u32| c as f64 / n as f64;
    assert!((frac(flips) - 0.5).abs() < 0.04, "flip {}", frac(flips));
    assert!(
        (frac(jitters) - 0.8).abs() < 0.04,
        "jitter {}",
        frac(jitters)
    );
    assert!((frac(grays) - 0.2).abs() < 0.04, "gray {}", frac(grays));
    assert!((frac(blurs) - 0.5).abs() < 0.04, "blur {}", frac(blurs));
    assert_eq!(
        orders.len(),
        24,
        "every order of the four jitter ops occurs"
    );
}

#[test]
fn cifar_setting_has_no_blur_and_weaker_jitter() {
    let aug = Augmentation::new(AugmentConfig::cifar10()).unwrap();
    for i in 0..500 {
        let p = aug.draw(32, 32, key(i, 0));
        assert_eq!(p.blur_sigma, 0.0);
        assert!(p.brightness >= 0.6 - 1e-6 && p.brightness <= 1.4 + 1e-6);
        assert!(p.hue.abs() <= 0.1 + 1e-6);
    }
    assert_eq!(aug.config().normalize, Normalize::CIFAR10);
}

#[test]
fn switching_a_transform_off_leaves_the_other_draws_alone() {
    let with = Augmentation::new(AugmentConfig::imagenet()).unwrap();
    let without = Augmentation::new(AugmentConfig {
        blur_p: 0.0,
        cutout_p: 1.0,
        ..AugmentConfig::imagenet()
    })
    .unwrap();
    for i in 0..50 {
        let (a, b) = (
            with.draw(300, 200, key(i, 0)),
            without.draw(300, 200, key(i, 0)),
        );
        assert_eq!(
            (
                a.crop_x,
                a.crop_y,
                a.crop_w,
                a.crop_h,
                a.flip,
                a.jitter_order,
                a.grayscale
            ),
            (
                b.crop_x,
                b.crop_y,
                b.crop_w,
                b.crop_h,
                b.flip,
                b.jitter_order,
                b.grayscale
            )
        );
        assert_eq!((a.brightness, a.hue), (b.brightness, b.hue));
        assert_eq!(b.blur_sigma, 0.0);
        assert!(b.cutout_w > 0);
    }
}

#[test]
fn identity_params_resize_only_and_normalise() {
    let img = ramp();
    let aug = Augmentation::new(AugmentConfig {
        normalize: Normalize {
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.5, 2.0],
        },
        ..AugmentConfig::eval(40, None)
    })
    .unwrap();
    let p = ViewParams::identity(40, 30, 40, 30);
    let mut out = vec![0.0; 3 * 40 * 30];
    aug.apply_f32(&img, &p, &mut out).unwrap();
    let n = 40 * 30;
    for (i, px) in img.pixels().chunks(3).enumerate() {
        for c in 0..3 {
            let want = (px[c] as f32 / 255.0 - [0.5, 0.25, 0.0][c]) / [0.5, 0.5, 2.0][c];
            assert!((out[c * n + i] - want).abs() < 1e-6);
        }
    }
}

#[test]
fn flip_and_rotations_move_pixels_as_documented() {
    // A 3 x 3 image with distinct red values 0..9 (x + 3 y) * 10.
    let mut d = Vec::new();
    for y in 0..3u8 {
        for x in 0..3u8 {
            d.extend_from_slice(&[(x + 3 * y) * 10, 0, 0]);
        }
    }
    let img = Image::new(3, 3, d).unwrap();
    let red = |p: ViewParams| {
        let mut out = vec![0u8; 27];
        Augmentation::apply_geometry_u8(&img, &p, &mut out).unwrap();
        out[..9].iter().map(|v| v / 10).collect::<Vec<u8>>()
    };
    let id = ViewParams::identity(3, 3, 3, 3);
    assert_eq!(red(id), vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        red(ViewParams { flip: 1, ..id }),
        vec![2, 1, 0, 5, 4, 3, 8, 7, 6]
    );
    // Clockwise: the left column (0, 3, 6) becomes the top row, read bottom to top.
    assert_eq!(
        red(ViewParams { rotation: 1, ..id }),
        vec![6, 3, 0, 7, 4, 1, 8, 5, 2]
    );
    assert_eq!(
        red(ViewParams { rotation: 2, ..id }),
        vec![8, 7, 6, 5, 4, 3, 2, 1, 0]
    );
    assert_eq!(
        red(ViewParams { rotation: 3, ..id }),
        vec![2, 5, 8, 1, 4, 7, 0, 3, 6]
    );
    // Flip first, then rotate.
    assert_eq!(
        red(ViewParams {
            flip: 1,
            rotation: 1,
            ..id
        }),
        vec![8, 5, 2, 7, 4, 1, 6, 3, 0]
    );
}

#[test]
fn crop_box_selects_the_right_region() {
    let img = ramp();
    let p = ViewParams {
        crop_x: 10,
        crop_y: 5,
        crop_w: 8,
        crop_h: 8,
        ..ViewParams::identity(40, 30, 8, 8)
    };
    let mut out = vec![0u8; 3 * 64];
    Augmentation::apply_geometry_u8(&img, &p, &mut out).unwrap();
    assert_eq!(out[0], 60); // red of x = 10
    assert_eq!(out[64], 40); // green of y = 5
    assert_eq!(out[63], 17 * 6); // red of x = 17
}

#[test]
fn gpu_split_geometry_then_color_stage_equals_the_full_cpu_path() {
    let img = ramp();
    let aug = Augmentation::new(AugmentConfig {
        rotation_p: 0.5,
        sobel_p: 0.2,
        cutout_p: 0.5,
        noise_p: 0.5,
        normalize: Normalize::NONE,
        ..AugmentConfig::simclr(24, 1.0, true)
    })
    .unwrap();
    for i in 0..40 {
        let p = aug.draw(40, 30, key(i, 0));
        let mut full = vec![0.0; 3 * 24 * 24];
        aug.apply_f32(&img, &p, &mut full).unwrap();
        let mut geo = vec![0u8; 3 * 24 * 24];
        Augmentation::apply_geometry_u8(&img, &p, &mut geo).unwrap();
        let mut split: Vec<f32> = geo.iter().map(|&v| v as f32 / 255.0).collect();
        apply_color_stage(&mut split, &p, &mut Vec::new());
        let d = full
            .iter()
            .zip(&split)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "view {i}: {d}");
        // And the 8-bit output is the float one rounded.
        let mut q = vec![0u8; 3 * 24 * 24];
        Augmentation::apply_u8(&img, &p, &mut q).unwrap();
        for (&a, &b) in q.iter().zip(&full) {
            assert!((a as f32 - b * 255.0).abs() <= 0.5 + 1e-3);
        }
    }
}

#[test]
fn ablation_transforms_do_what_they_say() {
    let (w, h) = (16usize, 16usize);
    let flat = vec![0.5f32; 3 * w * h];
    // Cutout zeroes exactly its box.
    let mut x = flat.clone();
    ops::cutout(&mut x, w, h, 3, 4, 5, 2);
    let zeros = x.iter().filter(|&&v| v == 0.0).count();
    assert_eq!(zeros, 3 * 5 * 2);
    assert_eq!(x[4 * w + 3], 0.0);
    assert_eq!(x[4 * w + 8], 0.5);
    // Sobel of a flat image is 0; of a vertical edge, large on the edge only.
    let mut x = flat.clone();
    ops::sobel(&mut x, w, h, &mut Vec::new());
    assert!(x.iter().all(|&v| v == 0.0));
    let mut x: Vec<f32> = (0..3 * w * h)
        .map(|i| if i % w < 8 { 0.0 } else { 1.0 })
        .collect();
    ops::sobel(&mut x, w, h, &mut Vec::new());
    assert!(x[5 * w + 7] > 0.9 && x[5 * w + 2] == 0.0);
    // Noise: mean about 0, std about as asked, reproducible from its seed.
    let mut a = flat.clone();
    ops::add_noise(&mut a, 0.1, 9);
    let mut b = flat.clone();
    ops::add_noise(&mut b, 0.1, 9);
    assert_eq!(a, b);
    let dev: Vec<f32> = a.iter().map(|v| v - 0.5).collect();
    let mean = dev.iter().sum::<f32>() / dev.len() as f32;
    let std = (dev.iter().map(|d| d * d).sum::<f32>() / dev.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.02 && (std - 0.1).abs() < 0.02,
        "{mean} {std}"
    );
}

#[test]
fn rotation_on_non_square_output_is_only_half_turns() {
    let aug = Augmentation::new(AugmentConfig {
        width: 32,
        height: 24,
        rotation_p: 1.0,
        ..AugmentConfig::simclr(32, 0.5, false)
    })
    .unwrap();
    for i in 0..50 {
        assert_eq!(aug.draw(64, 64, key(i, 0)).rotation, 2);
    }
}

#[test]
fn tiny_and_odd_images_work() {
    let aug = Augmentation::new(AugmentConfig::imagenet()).unwrap();
    for (w, h) in [(1, 1), (1, 7), (300, 2), (3, 3)] {
        let img = Image::new(w, h, vec![200; (3 * w * h) as usize]).unwrap();
        for v in 0..4 {
            let (p, out) = aug.view_f32(&img, key(v, 0)).unwrap();
            assert!(p.crop_w <= w && p.crop_h <= h);
            assert_eq!(out.len(), 3 * 224 * 224);
            assert!(out.iter().all(|x| x.is_finite()));
        }
    }
}

#[test]
fn eval_centre_crop_is_deterministic_and_centred() {
    let aug = Augmentation::new(AugmentConfig::eval(224, Some(256))).unwrap();
    let p = aug.draw(512, 400, key(0, 0));
    assert_eq!(p, aug.draw(512, 400, key(99, 1)));
    // 400 -> 256: the 224 crop is 350 source pixels, centred.
    assert_eq!((p.crop_w, p.crop_h), (350, 350));
    assert_eq!((p.crop_x, p.crop_y), (81, 25));
    assert!(!p.has_color_stage() && p.flip == 0);
    let full = Augmentation::new(AugmentConfig {
        crop: Crop::Full,
        ..AugmentConfig::eval(32, None)
    })
    .unwrap();
    let q = full.draw(50, 40, key(0, 0));
    assert_eq!((q.crop_x, q.crop_y, q.crop_w, q.crop_h), (0, 0, 50, 40));
}

#[test]
fn invalid_configurations_are_errors() {
    let bad = [
        AugmentConfig {
            flip_p: 1.5,
            ..AugmentConfig::cifar10()
        },
        AugmentConfig {
            width: 0,
            ..AugmentConfig::cifar10()
        },
        AugmentConfig {
            hue: 0.7,
            ..AugmentConfig::cifar10()
        },
        AugmentConfig {
            blur_kernel: Some(4),
            ..AugmentConfig::imagenet()
        },
        AugmentConfig {
            crop: Crop::RandomResized {
                scale: (0.0, 1.0),
                ratio: (0.75, 1.33),
            },
            ..AugmentConfig::cifar10()
        },
        AugmentConfig {
            normalize: Normalize {
                mean: [0.0; 3],
                std: [1.0, 0.0, 1.0],
            },
            ..AugmentConfig::cifar10()
        },
    ];
    for cfg in bad {
        assert!(Augmentation::new(cfg.clone()).is_err(), "{cfg:?}");
    }
    // Parameters that do not fit the image are an error, not a panic.
    let img = ramp();
    let p = ViewParams {
        crop_x: 35,
        crop_w: 10,
        ..ViewParams::identity(40, 30, 8, 8)
    };
    assert!(Augmentation::apply_geometry_u8(&img, &p, &mut [0u8; 192]).is_err());
    assert!(Augmentation::apply_geometry_u8(
        &img,
        &ViewParams::identity(40, 30, 8, 8),
        &mut [0u8; 5]
    )
    .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any image size and any valid configuration: views are finite, the right size, and
    /// (unnormalised) within [0, 1].
    #[test]
    fn any_image_and_config_gives_a_valid_view(
        w in 1u32..80, h in 1u32..80, out in 1u32..40, seed in any::<u64>(),
        s in 0.0f32..1.5, blur in any::<bool>(), rot in 0.0f32..1.0, cut in 0.0f32..1.0,
        sob in 0.0f32..1.0, noise in 0.0f32..1.0,
    ) {
        let cfg = AugmentConfig {
            rotation_p: rot, cutout_p: cut, sobel_p: sob, noise_p: noise,
            hue: (0.2 * s).min(0.5),
            normalize: Normalize::NONE,
            ..AugmentConfig::simclr(out, s, blur)
        };
        let aug = Augmentation::new(cfg).unwrap();
        let px: Vec<u8> = (0..3 * w * h).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        let img = Image::new(w, h, px).unwrap();
        let k = ViewKey { seed, epoch: 0, index: 0, view: 0 };
        let (p, v) = aug.view_f32(&img, k).unwrap();
        prop_assert_eq!(v.len(), (3 * out * out) as usize);
        prop_assert!(v.iter().all(|x| x.is_finite() && (-1e-6..=1.0 + 1e-6).contains(x)));
        prop_assert!(p.crop_x + p.crop_w <= w && p.crop_y + p.crop_h <= h);
    }
}

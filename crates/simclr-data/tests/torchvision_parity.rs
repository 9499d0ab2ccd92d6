//! The CPU transforms against values torchvision computed (fixtures written by
//! `make_torchvision_fixtures.py`, torchvision 0.29, `transforms.v2.functional` on float tensors).
//!
//! Tolerances: colour operations, grayscale and blur run in `f32` like torchvision's float
//! kernels: at most 2e-6 apart (hue: 1e-5, its HSV round trip divides by small ranges).
//! Crop + resize is on 8-bit pixels in both, but `fast_image_resize`'s antialiased bilinear
//! filter rounds differently from torchvision's: at most 2 steps of 255 apart, 0.5 on average.

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors};
use simclr_data::augment::{apply_color_stage, ops};
use simclr_data::{Augmentation, Image, ViewParams};
use simclr_kernels::augment::pack_jitter_order;

struct Fixture {
    bytes: Vec<u8>,
    ops: HashMap<String, serde_json::Value>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torchvision_ops.safetensors"
    );
    let bytes = std::fs::read(path).expect("fixture present");
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let ops_json = meta.metadata().as_ref().unwrap()["ops"].clone();
    let ops: HashMap<String, serde_json::Value> = serde_json::from_str(&ops_json).unwrap();
    Fixture { bytes, ops }
}

impl Fixture {
    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }
    fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    }
    fn param(&self, name: &str, key: &str) -> f64 {
        self.ops[name][key].as_f64().unwrap()
    }
    fn names(&self, op: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .ops
            .iter()
            .filter(|(_, p)| p["op"] == op)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_op(fx: &Fixture, op: &str, tol: f32, f: impl Fn(&mut [f32], &str)) {
    let names = fx.names(op);
    assert!(!names.is_empty(), "no fixture for {op}");
    let (shape, input) = fx.f32("input");
    assert_eq!(shape, vec![3, 20, 28]);
    for name in names {
        let (_, want) = fx.f32(&name);
        let mut got = input.clone();
        f(&mut got, &name);
        let d = max_abs_diff(&got, &want);
        assert!(d <= tol, "{name}: max |diff| {d:e} > {tol:e}");
        // The op did change the picture (the test can fail).
        assert!(
            max_abs_diff(&input, &want) > 10.0 * tol,
            "{name} is the identity"
        );
    }
}

#[test]
fn brightness_contrast_saturation_match_torchvision() {
    let fx = fixture();
    check_op(&fx, "brightness", 2e-6, |x, n| {
        ops::adjust_brightness(x, fx.param(n, "factor") as f32)
    });
    check_op(&fx, "contrast", 2e-6, |x, n| {
        ops::adjust_contrast(x, fx.param(n, "factor") as f32)
    });
    check_op(&fx, "saturation", 2e-6, |x, n| {
        ops::adjust_saturation(x, fx.param(n, "factor") as f32)
    });
}

#[test]
fn hue_matches_torchvision() {
    let fx = fixture();
    check_op(&fx, "hue", 1e-5, |x, n| {
        ops::adjust_hue(x, fx.param(n, "factor") as f32)
    });
}

#[test]
fn grayscale_and_blur_match_torchvision() {
    let fx = fixture();
    check_op(&fx, "grayscale", 2e-6, |x, _| ops::to_grayscale(x));
    check_op(&fx, "blur", 2e-6, |x, n| {
        let mut scratch = Vec::new();
        ops::gaussian_blur(
            x,
            28,
            20,
            fx.param(n, "kernel") as u32,
            fx.param(n, "sigma") as f32,
            &mut scratch,
        )
    });
}

#[test]
fn jitter_chain_in_random_order_matches_torchvision() {
    let fx = fixture();
    check_op(&fx, "jitter", 1e-5, |x, n| {
        let order: Vec<u32> = fx.ops[n]["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let p = ViewParams {
            brightness: fx.param(n, "brightness") as f32,
            contrast: fx.param(n, "contrast") as f32,
            saturation: fx.param(n, "saturation") as f32,
            hue: fx.param(n, "hue") as f32,
            jitter_order: pack_jitter_order([order[0], order[1], order[2], order[3]]),
            ..ViewParams::identity(28, 20, 28, 20)
        };
        apply_color_stage(x, &p, &mut Vec::new());
    });
}

#[test]
fn resized_crop_matches_torchvision_within_two_steps() {
    let fx = fixture();
    let (shape, planar) = fx.u8("input_u8");
    let (h, w) = (shape[1], shape[2]);
    let img = Image::from_planar(w as u32, h as u32, &planar).unwrap();
    let names = fx.names("resized_crop");
    assert_eq!(names.len(), 3);
    for name in names {
        let g = |k| fx.param(&name, k) as u32;
        let (_, want) = fx.u8(&name);
        let p = ViewParams {
            crop_x: g("left"),
            crop_y: g("top"),
            crop_w: g("width"),
            crop_h: g("height"),
            ..ViewParams::identity(w as u32, h as u32, g("out_width"), g("out_height"))
        };
        let mut got = vec![0u8; want.len()];
        Augmentation::apply_geometry_u8(&img, &p, &mut got).unwrap();
        let diffs: Vec<i32> = got
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        assert!(
            max <= 2 && mean <= 0.5,
            "{name}: max diff {max}, mean {mean}"
        );
    }
}

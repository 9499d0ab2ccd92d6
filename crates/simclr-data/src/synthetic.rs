//! A procedurally generated, labelled image set that needs no download.
//!
//! Ten classes told apart only by the shape or structure of one foreground object; everything
//! else is nuisance that SimCLR's augmentations are meant to make the features ignore: the
//! colours of object and background, the object's position and scale, and the background's
//! texture (a smooth random field, a gradient and speckle). Images are a pure function of
//! (seed, index, side), computed with integer hashing and IEEE basic arithmetic only (no
//! transcendental functions), so the same seed gives the same bytes on every machine.

use crate::dataset::check_index;
use crate::rng::{key, mix64};
use crate::{DataError, Dataset, Image};

/// The class names of [`SyntheticShapes`], by label.
pub const SHAPE_CLASSES: [&str; 10] = [
    "disk",
    "square",
    "triangle",
    "plus",
    "ring",
    "cross",
    "stripes",
    "checkerboard",
    "frame",
    "diamond",
];

/// Object and background colours.
const PALETTE: [[f32; 3]; 8] = [
    [0.85, 0.15, 0.15],
    [0.15, 0.7, 0.2],
    [0.2, 0.3, 0.9],
    [0.9, 0.85, 0.2],
    [0.8, 0.25, 0.8],
    [0.2, 0.8, 0.85],
    [0.95, 0.55, 0.1],
    [0.5, 0.5, 0.5],
];

/// The synthetic shapes data set: `len` images of `side` x `side` pixels, image `i` of class
/// `i % 10` (so every class has the same count, give or take one).
#[derive(Clone, Debug)]
pub struct SyntheticShapes {
    len: usize,
    side: u32,
    seed: u64,
    classes: Vec<String>,
}

/// A small deterministic stream of uniforms.
struct Draw(u64, u64);

impl Draw {
    fn new(k: u64) -> Draw {
        Draw(k, 0)
    }
    fn u64(&mut self) -> u64 {
        self.1 += 1;
        mix64(self.0 ^ mix64(self.1))
    }
    /// Uniform in [0, 1) with 24 bits.
    fn unit(&mut self) -> f32 {
        (self.u64() >> 40) as f32 * (1.0 / 16_777_216.0)
    }
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
}

/// Whether the point (u, v), in units of the object's radius around its centre, is inside the
/// shape of `class`.
fn inside(class: u32, u: f32, v: f32) -> bool {
    let (au, av) = (u.abs(), v.abs());
    let r2 = u * u + v * v;
    match class {
        0 => r2 <= 1.0,
        1 => au <= 0.85 && av <= 0.85,
        2 => {
            // Upward triangle with apex (0, -1) and base at v = 0.8 from u = -1 to 1.
            v <= 0.8 && v >= -1.0 + 1.8 * au
        }
        3 => (au <= 0.3 && av <= 1.0) || (av <= 0.3 && au <= 1.0),
        4 => (0.3025..=1.0).contains(&r2),
        5 => au <= 0.9 && av <= 0.9 && ((u - v).abs() <= 0.4 || (u + v).abs() <= 0.4),
        6 => au <= 1.0 && av <= 1.0 && ((v + 1.0) * 2.5).floor() as i32 % 2 == 0,
        7 => {
            au <= 1.0
                && av <= 1.0
                && (((u + 1.0) * 2.0).floor() as i32 + ((v + 1.0) * 2.0).floor() as i32) % 2 == 0
        }
        8 => {
            let m = au.max(av);
            (0.6..=0.95).contains(&m)
        }
        _ => au + av <= 1.1,
    }
}

impl SyntheticShapes {
    /// `len` images of `side` x `side` pixels (side at least 8) from `seed`.
    pub fn new(len: usize, side: u32, seed: u64) -> Result<SyntheticShapes, DataError> {
        if side < 8 {
            return Err(DataError::Config(format!(
                "synthetic images need a side of at least 8 pixels, got {side}"
            )));
        }
        Ok(SyntheticShapes {
            len,
            side,
            seed,
            classes: SHAPE_CLASSES.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The side of the images.
    pub fn side(&self) -> u32 {
        self.side
    }

    /// Image `index` without nuisance: a white shape of fixed size centred on black, the same
    /// for every image of a class. For tests of how much the nuisance costs a classifier.
    pub fn canonical(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.len)?;
        let class = (index % 10) as u32;
        let s = self.side as f32;
        let mut data = Vec::with_capacity(3 * (self.side * self.side) as usize);
        for y in 0..self.side {
            for x in 0..self.side {
                let cover = coverage(class, x, y, s * 0.5, s * 0.5, s * 0.3);
                let v = (cover * 255.0 + 0.5) as u8;
                data.extend_from_slice(&[v, v, v]);
            }
        }
        Image::new(self.side, self.side, data)
    }

    fn render(&self, index: usize) -> Result<Image, DataError> {
        let class = (index % 10) as u32;
        let mut d = Draw::new(key(self.seed, &[0x5ba9e5, index as u64]));
        let s = self.side as f32;
        // Object: colour, centre, radius.
        // Colours come from a small palette, so every pairing of object and background colour
        // recurs many times in a batch: colour alone cannot tell two images apart, and a
        // contrastive learner has to use the shape (with free colours, the pair of colours is
        // an identity that survives colour jitter, and it learns nothing else).
        let bi = (d.u64() % PALETTE.len() as u64) as usize;
        let fi = (bi + 1 + (d.u64() % (PALETTE.len() as u64 - 1)) as usize) % PALETTE.len();
        let (shade_bg, shade_fg) = (d.range(0.8, 1.0), d.range(0.8, 1.0));
        let bg = PALETTE[bi].map(|c| c * shade_bg);
        let fg = PALETTE[fi].map(|c| c * shade_fg);
        let radius = s * d.range(0.28, 0.42);
        let cx = s * d.range(0.38, 0.62);
        let cy = s * d.range(0.38, 0.62);
        // Background texture: a 5x5 grid of random offsets, bilinearly interpolated, a linear
        // gradient, and speckle.
        let grid: Vec<f32> = (0..25).map(|_| d.range(-0.12, 0.12)).collect();
        let (gx, gy) = (d.range(-0.15, 0.15), d.range(-0.15, 0.15));
        // One speckle strength for all: a per-image noise level would be an identity that no
        // augmentation removes.
        let speckle = 0.04;
        let pixel_key = d.u64();
        let mut data = Vec::with_capacity(3 * (self.side * self.side) as usize);
        for y in 0..self.side {
            for x in 0..self.side {
                let fx = (x as f32 + 0.5) / s * 4.0;
                let fy = (y as f32 + 0.5) / s * 4.0;
                let (ix, iy) = ((fx.floor() as usize).min(3), (fy.floor() as usize).min(3));
                let (tx, ty) = (fx - ix as f32, fy - iy as f32);
                let g = |i: usize, j: usize| grid[j * 5 + i];
                let smooth = (1.0 - ty) * ((1.0 - tx) * g(ix, iy) + tx * g(ix + 1, iy))
                    + ty * ((1.0 - tx) * g(ix, iy + 1) + tx * g(ix + 1, iy + 1));
                let grad = gx * (fx / 4.0 - 0.5) + gy * (fy / 4.0 - 0.5);
                let h = mix64(pixel_key ^ ((y as u64) << 32 | x as u64));
                let spk = speckle * (((h >> 40) as f32 * (1.0 / 16_777_216.0)) - 0.5) * 2.0;
                let cover = coverage(class, x, y, cx, cy, radius);
                for c in 0..3 {
                    let b = bg[c] + smooth + grad + spk;
                    let v = cover * fg[c] + (1.0 - cover) * b;
                    data.push((v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8);
                }
            }
        }
        Image::new(self.side, self.side, data)
    }
}

/// Fraction of pixel (x, y) covered by the shape of `class` centred at (cx, cy) with `radius`,
/// from 4 x 4 samples.
fn coverage(class: u32, x: u32, y: u32, cx: f32, cy: f32, radius: f32) -> f32 {
    let mut hits = 0u32;
    for sy in 0..4 {
        for sx in 0..4 {
            let px = x as f32 + (sx as f32 + 0.5) * 0.25;
            let py = y as f32 + (sy as f32 + 0.5) * 0.25;
            if inside(class, (px - cx) / radius, (py - cy) / radius) {
                hits += 1;
            }
        }
    }
    hits as f32 * (1.0 / 16.0)
}

impl Dataset for SyntheticShapes {
    fn len(&self) -> usize {
        self.len
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.len)?;
        self.render(index)
    }
    fn label(&self, index: usize) -> Option<u32> {
        (index < self.len).then_some((index % 10) as u32)
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
}

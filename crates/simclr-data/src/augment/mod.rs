//! SimCLR's data augmentation on the CPU: drawing the random parameters of each view into a
//! [`ViewParams`] and applying them.
//!
//! The order and the formulas are those of [`simclr_kernels::augment`] (the GPU kernels apply
//! the same struct). Drawing is keyed by (seed, epoch, image index, view): the same key gives
//! the same view on every machine, whatever the number of threads.
//!
//! Semantics follow torchvision (`transforms.v2`) where it defines them:
//! `RandomResizedCrop` (area uniform in `scale`, log-uniform aspect ratio, 10 tries then the
//! centre fallback; antialiased bilinear resize), `RandomHorizontalFlip`,
//! `RandomApply([ColorJitter(b, c, s, h)], p)` (factors uniform in `[max(0, 1 - b), 1 + b]`,
//! hue in `[-h, h]`, the four ops in a random order), `RandomGrayscale`,
//! `RandomApply([GaussianBlur(k, (lo, hi))], p)`. The resize uses `fast_image_resize` on 8-bit
//! pixels, so it differs from torchvision's by at most a couple of 8-bit steps; the colour
//! operations run in `f32` and match torchvision's float kernels to about 1e-6.

pub use simclr_kernels::cpu::color as ops;
pub use simclr_kernels::cpu::color::apply_color_stage;

use std::cell::RefCell;

use fast_image_resize::images::{CroppedImage, Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use simclr_kernels::augment::{pack_jitter_order, JITTER_ORDER_IDENTITY};
pub use simclr_kernels::augment::{JitterOp, ViewParams};

use crate::rng::rng_for;
use crate::{DataError, Image};

/// Per-channel normalisation of the `f32` output: `(x - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    /// Mean of red, green, blue (in \[0, 1\] units).
    pub mean: [f32; 3],
    /// Standard deviation of red, green, blue.
    pub std: [f32; 3],
}

impl Normalize {
    /// CIFAR-10's training-set statistics.
    pub const CIFAR10: Normalize = Normalize {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };
    /// ImageNet's statistics (torchvision's constants).
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// No normalisation: values stay in \[0, 1\].
    pub const NONE: Normalize = Normalize {
        mean: [0.0; 3],
        std: [1.0; 3],
    };
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize::IMAGENET
    }
}

/// How a view is cut from the source image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Crop {
    /// torchvision's `RandomResizedCrop`: area a uniform fraction in `scale` of the image,
    /// aspect ratio (w / h) log-uniform in `ratio`.
    RandomResized {
        /// Range of the area fraction; the paper's is (0.08, 1.0).
        scale: (f32, f32),
        /// Range of the aspect ratio; the paper's is (3/4, 4/3).
        ratio: (f32, f32),
    },
    /// Evaluation: resize the shorter side to `resize` (the output's shorter side when `None`),
    /// then take the centre `out_w x out_h` crop. Done as one resize of the matching centre
    /// box of the source.
    Center {
        /// Shorter side after the resize; `None`: no margin (the whole shorter side is used).
        resize: Option<u32>,
    },
    /// The whole image, resized to the output size.
    Full,
}

/// The parameters of the augmentation pipeline. The defaults of the `simclr*` constructors are
/// the paper's (DESIGN.md section 1); the ablation-only transforms are off (probability 0).
#[derive(Clone, Debug, PartialEq)]
pub struct AugmentConfig {
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// How the view is cut from the image.
    pub crop: Crop,
    /// Probability of a horizontal flip.
    pub flip_p: f32,
    /// Probability of applying the colour jitter.
    pub jitter_p: f32,
    /// Brightness strength: factor uniform in `[max(0, 1 - b), 1 + b]` (0 = off).
    pub brightness: f32,
    /// Contrast strength (0 = off).
    pub contrast: f32,
    /// Saturation strength (0 = off).
    pub saturation: f32,
    /// Hue strength: shift uniform in `[-h, h]`, at most 0.5 (0 = off).
    pub hue: f32,
    /// Probability of converting to grayscale.
    pub grayscale_p: f32,
    /// Probability of the Gaussian blur.
    pub blur_p: f32,
    /// Range of the blur's sigma, in output pixels.
    pub blur_sigma: (f32, f32),
    /// Blur kernel taps (odd); `None`: `int(0.1 * side) // 2 * 2 + 1` of the shorter output
    /// side, as the paper (23 at 224).
    pub blur_kernel: Option<u32>,
    /// Ablation: probability of a rotation by 90, 180 or 270 degrees (only 180 for a
    /// non-square output).
    pub rotation_p: f32,
    /// Ablation: probability of a cutout.
    pub cutout_p: f32,
    /// Ablation: range of the cutout's side as a fraction of the shorter output side.
    pub cutout_scale: (f32, f32),
    /// Ablation: probability of replacing the view by its Sobel gradient magnitude.
    pub sobel_p: f32,
    /// Ablation: probability of additive Gaussian noise.
    pub noise_p: f32,
    /// Ablation: range of the noise's standard deviation (in \[0, 1\] pixel units).
    pub noise_std: (f32, f32),
    /// Normalisation of the `f32` output.
    pub normalize: Normalize,
}

impl AugmentConfig {
    /// The paper's augmentation at `size x size` with colour strength `s`, with or without
    /// blur: random resized crop (0.08 to 1, 3/4 to 4/3), flip p 0.5, colour jitter
    /// (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale p 0.2, blur p 0.5 with sigma in
    /// \[0.1, 2\] when `blur`. ImageNet normalisation.
    pub fn simclr(size: u32, s: f32, blur: bool) -> AugmentConfig {
        AugmentConfig {
            width: size,
            height: size,
            crop: Crop::RandomResized {
                scale: (0.08, 1.0),
                ratio: (3.0 / 4.0, 4.0 / 3.0),
            },
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.8 * s,
            contrast: 0.8 * s,
            saturation: 0.8 * s,
            hue: 0.2 * s,
            grayscale_p: 0.2,
            blur_p: if blur { 0.5 } else { 0.0 },
            blur_sigma: (0.1, 2.0),
            blur_kernel: None,
            rotation_p: 0.0,
            cutout_p: 0.0,
            cutout_scale: (0.1, 0.5),
            sobel_p: 0.0,
            noise_p: 0.0,
            noise_std: (0.0, 0.1),
            normalize: Normalize::IMAGENET,
        }
    }

    /// The paper's CIFAR-10 setting: 32 x 32, s = 0.5, no blur, CIFAR-10 normalisation.
    pub fn cifar10() -> AugmentConfig {
        AugmentConfig {
            normalize: Normalize::CIFAR10,
            ..AugmentConfig::simclr(32, 0.5, false)
        }
    }

    /// The paper's ImageNet setting: 224 x 224, s = 1, blur.
    pub fn imagenet() -> AugmentConfig {
        AugmentConfig::simclr(224, 1.0, true)
    }

    /// Linear evaluation's training augmentation: random resized crop and flip only.
    pub fn linear_eval(size: u32) -> AugmentConfig {
        AugmentConfig {
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            ..AugmentConfig::simclr(size, 0.0, false)
        }
    }

    /// Evaluation (no randomness): the shorter side resized to `resize` (`None`: to `size`),
    /// centre crop `size x size`, normalise. ImageNet's usual is `eval(224, Some(256))`,
    /// CIFAR's `eval(32, None)`.
    pub fn eval(size: u32, resize: Option<u32>) -> AugmentConfig {
        AugmentConfig {
            crop: Crop::Center { resize },
            flip_p: 0.0,
            jitter_p: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            grayscale_p: 0.0,
            ..AugmentConfig::simclr(size, 0.0, false)
        }
    }

    /// The blur kernel's taps.
    pub fn blur_taps(&self) -> u32 {
        self.blur_kernel
            .unwrap_or_else(|| ((self.width.min(self.height) as f32 * 0.1) as u32) / 2 * 2 + 1)
    }

    fn validate(&self) -> Result<(), DataError> {
        let bad = |m: String| Err(DataError::Config(m));
        if self.width == 0 || self.height == 0 || self.width > 16384 || self.height > 16384 {
            return bad(format!(
                "output size {}x{} is not in 1..=16384",
                self.width, self.height
            ));
        }
        for (name, p) in [
            ("flip_p", self.flip_p),
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p", self.blur_p),
            ("rotation_p", self.rotation_p),
            ("cutout_p", self.cutout_p),
            ("sobel_p", self.sobel_p),
            ("noise_p", self.noise_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} = {p} is not a probability"));
            }
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} = {v} must be finite and non-negative"));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return bad(format!("hue = {} is not in [0, 0.5]", self.hue));
        }
        match self.crop {
            Crop::RandomResized { scale, ratio } => {
                if !(scale.0 > 0.0 && scale.0 <= scale.1 && scale.1.is_finite()) {
                    return bad(format!("crop scale {scale:?} must satisfy 0 < lo <= hi"));
                }
                if !(ratio.0 > 0.0 && ratio.0 <= ratio.1 && ratio.1.is_finite()) {
                    return bad(format!("crop ratio {ratio:?} must satisfy 0 < lo <= hi"));
                }
            }
            Crop::Center { resize: Some(0) } => return bad("centre-crop resize of 0".into()),
            _ => {}
        }
        if self.blur_p > 0.0 {
            let (lo, hi) = self.blur_sigma;
            if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
                return bad(format!(
                    "blur sigma {:?} must satisfy 0 < lo <= hi",
                    self.blur_sigma
                ));
            }
            if self.blur_taps() % 2 == 0 {
                return bad(format!("blur kernel {} must be odd", self.blur_taps()));
            }
        }
        let (lo, hi) = self.cutout_scale;
        if self.cutout_p > 0.0 && !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return bad(format!(
                "cutout scale {:?} must be in (0, 1]",
                self.cutout_scale
            ));
        }
        let (lo, hi) = self.noise_std;
        if self.noise_p > 0.0 && !(lo >= 0.0 && lo <= hi && hi.is_finite()) {
            return bad(format!(
                "noise std {:?} must satisfy 0 <= lo <= hi",
                self.noise_std
            ));
        }
        if self
            .normalize
            .std
            .iter()
            .any(|&s| !(s > 0.0 && s.is_finite()))
            || self.normalize.mean.iter().any(|m| !m.is_finite())
        {
            return bad(format!("normalisation {:?} needs std > 0", self.normalize));
        }
        Ok(())
    }
}

/// What identifies one view: its RNG is derived from these four numbers only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ViewKey {
    /// The run's seed.
    pub seed: u64,
    /// The epoch.
    pub epoch: u64,
    /// The image's index in the data set.
    pub index: u64,
    /// The view (0 or 1 for SimCLR's pair).
    pub view: u32,
}

/// Per-thread work buffers of the CPU path.
struct Scratch {
    resizer: Resizer,
    hwc: Vec<u8>,
    planar: Vec<f32>,
    tmp: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        resizer: Resizer::new(),
        hwc: Vec::new(),
        planar: Vec::new(),
        tmp: Vec::new(),
    });
}

/// A validated augmentation pipeline: draws [`ViewParams`] and applies them on the CPU.
#[derive(Clone, Debug)]
pub struct Augmentation {
    cfg: AugmentConfig,
}

/// Sub-streams of a view's RNG, one per transform, so that switching one transform on or off
/// leaves the draws of the others unchanged.
#[repr(u64)]
enum Stream {
    Crop = 1,
    Flip,
    Rotation,
    Jitter,
    Gray,
    Blur,
    Sobel,
    Cutout,
    Noise,
}

fn stream(key: ViewKey, s: Stream) -> ChaCha8Rng {
    rng_for(key.seed, &[key.epoch, key.index, key.view as u64, s as u64])
}

fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    if lo >= hi {
        lo
    } else {
        rng.random_range(lo..hi)
    }
}

/// torchvision's `RandomResizedCrop.get_params`: (x, y, w, h).
fn random_resized_crop(
    rng: &mut ChaCha8Rng,
    src_w: u32,
    src_h: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
) -> (u32, u32, u32, u32) {
    let (w0, h0) = (src_w as f64, src_h as f64);
    let area = w0 * h0;
    let (lr0, lr1) = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale.0, scale.1) as f64;
        let log_r = if lr0 < lr1 {
            rng.random_range(lr0..lr1)
        } else {
            lr0
        };
        let ar = log_r.exp();
        let w = (target * ar).sqrt().round();
        let h = (target / ar).sqrt().round();
        if 0.0 < w && w <= w0 && 0.0 < h && h <= h0 {
            let (w, h) = (w as u32, h as u32);
            let y = rng.random_range(0..=src_h - h);
            let x = rng.random_range(0..=src_w - w);
            return (x, y, w, h);
        }
    }
    // Fallback: the centre crop of the whole image clamped to the ratio range.
    let in_ratio = w0 / h0;
    let (w, h) = if in_ratio < ratio.0 as f64 {
        (
            src_w,
            ((w0 / ratio.0 as f64).round() as u32).clamp(1, src_h),
        )
    } else if in_ratio > ratio.1 as f64 {
        (
            ((h0 * ratio.1 as f64).round() as u32).clamp(1, src_w),
            src_h,
        )
    } else {
        (src_w, src_h)
    };
    ((src_w - w) / 2, (src_h - h) / 2, w, h)
}

impl Augmentation {
    /// A pipeline from a configuration, checked.
    pub fn new(cfg: AugmentConfig) -> Result<Augmentation, DataError> {
        cfg.validate()?;
        Ok(Augmentation { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &AugmentConfig {
        &self.cfg
    }

    /// Output (width, height).
    pub fn output_size(&self) -> (u32, u32) {
        (self.cfg.width, self.cfg.height)
    }

    /// Draws the parameters of the view `key` of a `src_w x src_h` image.
    pub fn draw(&self, src_w: u32, src_h: u32, key: ViewKey) -> ViewParams {
        let c = &self.cfg;
        let (src_w, src_h) = (src_w.max(1), src_h.max(1));
        let mut p = ViewParams::identity(src_w, src_h, c.width, c.height);
        let (x, y, w, h) = match c.crop {
            Crop::RandomResized { scale, ratio } => {
                random_resized_crop(&mut stream(key, Stream::Crop), src_w, src_h, scale, ratio)
            }
            Crop::Center { resize } => {
                // The shorter source side maps to `resize`; take the box that maps to the output.
                let short_out = resize.unwrap_or(c.width.min(c.height)) as f64;
                let k = src_w.min(src_h) as f64 / short_out;
                let w = ((c.width as f64 * k).round() as u32).clamp(1, src_w);
                let h = ((c.height as f64 * k).round() as u32).clamp(1, src_h);
                ((src_w - w) / 2, (src_h - h) / 2, w, h)
            }
            Crop::Full => (0, 0, src_w, src_h),
        };
        (p.crop_x, p.crop_y, p.crop_w, p.crop_h) = (x, y, w, h);

        p.flip = (stream(key, Stream::Flip).random::<f32>() < c.flip_p) as u32;

        let mut rng = stream(key, Stream::Rotation);
        if rng.random::<f32>() < c.rotation_p {
            p.rotation = if c.width == c.height {
                rng.random_range(1..=3)
            } else {
                2
            };
        }

        let mut rng = stream(key, Stream::Jitter);
        if rng.random::<f32>() < c.jitter_p {
            let mut order = [0u32, 1, 2, 3];
            order.shuffle(&mut rng);
            p.jitter_order = pack_jitter_order(order);
            let factor = |rng: &mut ChaCha8Rng, s: f32| {
                if s > 0.0 {
                    uniform(rng, (1.0 - s).max(0.0), 1.0 + s)
                } else {
                    1.0
                }
            };
            p.brightness = factor(&mut rng, c.brightness);
            p.contrast = factor(&mut rng, c.contrast);
            p.saturation = factor(&mut rng, c.saturation);
            p.hue = if c.hue > 0.0 {
                uniform(&mut rng, -c.hue, c.hue)
            } else {
                0.0
            };
        } else {
            p.jitter_order = JITTER_ORDER_IDENTITY;
        }

        p.grayscale = (stream(key, Stream::Gray).random::<f32>() < c.grayscale_p) as u32;

        let mut rng = stream(key, Stream::Blur);
        if rng.random::<f32>() < c.blur_p {
            p.blur_sigma = uniform(&mut rng, c.blur_sigma.0, c.blur_sigma.1);
            p.blur_kernel = c.blur_taps();
        }

        p.sobel = (stream(key, Stream::Sobel).random::<f32>() < c.sobel_p) as u32;

        let mut rng = stream(key, Stream::Cutout);
        if rng.random::<f32>() < c.cutout_p {
            let short = c.width.min(c.height) as f32;
            let side = (uniform(&mut rng, c.cutout_scale.0, c.cutout_scale.1) * short).round();
            let side = (side as u32).clamp(1, c.width.min(c.height));
            p.cutout_w = side;
            p.cutout_h = side;
            p.cutout_x = rng.random_range(0..=c.width - side);
            p.cutout_y = rng.random_range(0..=c.height - side);
        }

        let mut rng = stream(key, Stream::Noise);
        if rng.random::<f32>() < c.noise_p {
            p.noise_std = uniform(&mut rng, c.noise_std.0, c.noise_std.1);
            p.noise_seed = rng.next_u32();
        }
        p
    }

    /// [`Self::check`], and that an output of `len` values holds the planar view; returns its
    /// pixel count.
    fn check_output(
        img: &Image,
        p: &ViewParams,
        len: usize,
        unit: &str,
    ) -> Result<usize, DataError> {
        Self::check(img, p)?;
        let n = p.out_w as usize * p.out_h as usize;
        if len != 3 * n {
            return Err(DataError::Config(format!(
                "output of {len} {unit} for a 3x{}x{} view",
                p.out_h, p.out_w
            )));
        }
        Ok(n)
    }

    fn check(img: &Image, p: &ViewParams) -> Result<(), DataError> {
        let ok = p.src_w == img.width()
            && p.src_h == img.height()
            && p.crop_w > 0
            && p.crop_h > 0
            && p.crop_x as u64 + p.crop_w as u64 <= img.width() as u64
            && p.crop_y as u64 + p.crop_h as u64 <= img.height() as u64
            && p.out_w > 0
            && p.out_h > 0
            && (p.rotation % 2 == 0 || p.out_w == p.out_h);
        if ok {
            Ok(())
        } else {
            Err(DataError::Config(format!(
                "view parameters {p:?} do not fit an image of {}x{}",
                img.width(),
                img.height()
            )))
        }
    }

    /// Step 1 to 3 (crop + resize, flip, rotation) into planar 8-bit `3 x out_h x out_w`:
    /// the input of the GPU colour path.
    pub fn apply_geometry_u8(img: &Image, p: &ViewParams, out: &mut [u8]) -> Result<(), DataError> {
        Self::check_output(img, p, out.len(), "bytes")?;
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            resize_hwc(img, p, &mut s.resizer, &mut s.hwc)?;
            scatter_planar(&s.hwc, p, out, |v| v);
            Ok(())
        })
    }

    /// Every step, into planar `f32` in \[0, 1\] (`3 x out_h x out_w`), not normalised.
    pub fn apply_unnormalized(
        img: &Image,
        p: &ViewParams,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        Self::check_output(img, p, out.len(), "floats")?;
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            resize_hwc(img, p, &mut s.resizer, &mut s.hwc)?;
            scatter_planar(&s.hwc, p, out, |v| v as f32 * (1.0 / 255.0));
            apply_color_stage(out, p, &mut s.tmp);
            Ok(())
        })
    }

    /// Every step, then this pipeline's normalisation, into planar `f32` (`3 x out_h x out_w`).
    pub fn apply_f32(&self, img: &Image, p: &ViewParams, out: &mut [f32]) -> Result<(), DataError> {
        Self::apply_unnormalized(img, p, out)?;
        normalize(out, &self.cfg.normalize);
        Ok(())
    }

    /// Every step, quantised to 8 bits (`round(255 x)`), planar `3 x out_h x out_w`.
    pub fn apply_u8(img: &Image, p: &ViewParams, out: &mut [u8]) -> Result<(), DataError> {
        if !p.has_color_stage() {
            return Self::apply_geometry_u8(img, p, out);
        }
        let n = Self::check_output(img, p, out.len(), "bytes")?;
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            resize_hwc(img, p, &mut s.resizer, &mut s.hwc)?;
            s.planar.resize(3 * n, 0.0);
            scatter_planar(&s.hwc, p, &mut s.planar, |v| v as f32 * (1.0 / 255.0));
            apply_color_stage(&mut s.planar, p, &mut s.tmp);
            for (o, &v) in out.iter_mut().zip(s.planar.iter()) {
                *o = (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
            }
            Ok(())
        })
    }

    /// Draws and applies view `key` of `img`: its parameters and its normalised planar pixels.
    pub fn view_f32(&self, img: &Image, key: ViewKey) -> Result<(ViewParams, Vec<f32>), DataError> {
        let p = self.draw(img.width(), img.height(), key);
        let mut out = vec![0.0; 3 * (p.out_w * p.out_h) as usize];
        self.apply_f32(img, &p, &mut out)?;
        Ok((p, out))
    }
}

/// `(x - mean) / std` per channel of a planar image.
pub fn normalize(planar: &mut [f32], norm: &Normalize) {
    let n = planar.len() / 3;
    for (c, plane) in planar.chunks_exact_mut(n.max(1)).take(3).enumerate() {
        let (m, inv) = (norm.mean[c], 1.0 / norm.std[c]);
        for v in plane {
            *v = (*v - m) * inv;
        }
    }
}

/// Crop + antialiased bilinear resize of the source into interleaved RGB `out_w x out_h`.
fn resize_hwc(
    img: &Image,
    p: &ViewParams,
    resizer: &mut Resizer,
    hwc: &mut Vec<u8>,
) -> Result<(), DataError> {
    let err = |e: &dyn std::fmt::Display| DataError::Config(format!("resize failed: {e}"));
    let n = 3 * p.out_w as usize * p.out_h as usize;
    hwc.resize(n, 0);
    if p.crop_w == p.out_w && p.crop_h == p.out_h {
        // Same size: a plain copy of the box (the resize would be the identity).
        let sw = img.width() as usize;
        let row = 3 * p.crop_w as usize;
        for y in 0..p.crop_h as usize {
            let s = 3 * ((p.crop_y as usize + y) * sw + p.crop_x as usize);
            hwc[y * row..(y + 1) * row].copy_from_slice(&img.pixels()[s..s + row]);
        }
        return Ok(());
    }
    let src = ImageRef::new(img.width(), img.height(), img.pixels(), PixelType::U8x3)
        .map_err(|e| err(&e))?;
    let mut dst = FirImage::from_slice_u8(p.out_w, p.out_h, &mut hwc[..], PixelType::U8x3)
        .map_err(|e| err(&e))?;
    // A cropped view (not a crop option): the filter must not read outside the box, as
    // torchvision crops first and then resizes.
    let cropped =
        CroppedImage::new(&src, p.crop_x, p.crop_y, p.crop_w, p.crop_h).map_err(|e| err(&e))?;
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    resizer
        .resize(&cropped, &mut dst, &opts)
        .map_err(|e| err(&e))
}

/// Interleaved `out_w x out_h` RGB to planar, applying flip then rotation.
fn scatter_planar<T: Copy>(hwc: &[u8], p: &ViewParams, out: &mut [T], conv: impl Fn(u8) -> T) {
    let (w, h) = (p.out_w as usize, p.out_h as usize);
    let n = w * h;
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let flip = p.flip != 0;
    match p.rotation % 4 {
        0 => {
            for y in 0..h {
                let src = &hwc[3 * y * w..3 * (y + 1) * w];
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x };
                    let o = y * w + x;
                    r[o] = conv(src[3 * sx]);
                    g[o] = conv(src[3 * sx + 1]);
                    b[o] = conv(src[3 * sx + 2]);
                }
            }
        }
        rot => {
            // Output (x, y) of the rotated view reads the flipped view F at (fx, fy), and F
            // reads the resized image at (flip ? w - 1 - fx : fx, fy). Rotation is clockwise.
            for y in 0..h {
                for x in 0..w {
                    let (fx, fy) = match rot {
                        1 => (y, h - 1 - x),
                        2 => (w - 1 - x, h - 1 - y),
                        _ => (w - 1 - y, x),
                    };
                    let sx = if flip { w - 1 - fx } else { fx };
                    let s = 3 * (fy * w + sx);
                    let o = y * w + x;
                    r[o] = conv(hwc[s]);
                    g[o] = conv(hwc[s + 1]);
                    b[o] = conv(hwc[s + 2]);
                }
            }
        }
    }
}

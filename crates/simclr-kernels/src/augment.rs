//! Per-view augmentation parameters, drawn on the CPU and applied by the CPU or GPU path.
//!
//! SimCLR's random augmentation of one view is split in two steps:
//!
//! 1. **draw**: every random choice of the view (crop box, flip, jitter factors and their order,
//!    grayscale, blur sigma, the ablation-only transforms) is sampled on the CPU into one
//!    [`ViewParams`], from an RNG derived from (seed, epoch, image index, view), so the result
//!    does not depend on how many threads draw (`simclr-data` does the drawing);
//! 2. **apply**: the CPU path of `simclr-data` or a GPU kernel applies a [`ViewParams`] to an
//!    image. Both read the same struct (the GPU kernels take an array of them, see
//!    [`ViewParams::slice_as_bytes`]) and follow the order and formulas documented here, so the
//!    two paths give the same picture up to floating-point rounding.
//!
//! The order of application, and the formulas (torchvision's where torchvision defines them):
//!
//! | step | transform | formula, on RGB values in \[0, 1\] |
//! | --- | --- | --- |
//! | 1 | crop + resize | the box (`crop_x`, `crop_y`, `crop_w`, `crop_h`) of the source, resized to `out_w` x `out_h` with antialiased bilinear filtering |
//! | 2 | flip | mirror left-right when `flip != 0` |
//! | 3 | rotation | `rotation` quarter turns clockwise |
//! | 4 | colour jitter | the four ops in [`ViewParams::jitter_ops`] order: brightness `x * b`; contrast `c * x + (1 - c) * mean(gray)`; saturation `s * x + (1 - s) * gray`; hue: shift H by `hue` in HSV (a fraction of the circle); each result clamped to \[0, 1\]; an op whose factor is the identity (1, 1, 1, 0) is skipped |
//! | 5 | grayscale | every channel set to `gray` when `grayscale != 0` |
//! | 6 | Gaussian blur | separable, `blur_kernel` taps, weights from [`gaussian_weight`], reflect padding; off when `blur_sigma == 0` |
//! | 7 | Sobel | every channel set to `min(1, sqrt(gx^2 + gy^2) / 4)` of the gray image, edge replication; when `sobel != 0` |
//! | 8 | cutout | the box (`cutout_x`, `cutout_y`, `cutout_w`, `cutout_h`) of the output set to 0; off when `cutout_w == 0` |
//! | 9 | Gaussian noise | `x + noise_std * noise_normal(noise_seed, i)` for element `i = (c * out_h + y) * out_w + x`, clamped to \[0, 1\]; off when `noise_std == 0` |
//!
//! `gray` is ITU-R 601-2 luma with torchvision's weights: [`LUMA`].

/// Luma weights of red, green and blue (ITU-R 601-2, as torchvision writes them).
pub const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// One of the four colour-jitter operations, numbered as torchvision's `ColorJitter` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum JitterOp {
    /// Multiply by the brightness factor.
    Brightness = 0,
    /// Blend with the mean of the grayscale image.
    Contrast = 1,
    /// Blend with the grayscale image.
    Saturation = 2,
    /// Shift the hue in HSV.
    Hue = 3,
}

impl JitterOp {
    /// The four operations in torchvision's numbering.
    pub const ALL: [JitterOp; 4] = [
        JitterOp::Brightness,
        JitterOp::Contrast,
        JitterOp::Saturation,
        JitterOp::Hue,
    ];

    /// The operation numbered `id & 3`.
    pub fn from_id(id: u32) -> JitterOp {
        Self::ALL[(id & 3) as usize]
    }
}

/// The random parameters of one augmented view: a plain `#[repr(C)]` struct of 4-byte fields
/// with no padding (so it is `bytemuck::Pod`-able and a CUDA kernel can take an array of them).
///
/// Every field "off" value makes the transform the identity; [`ViewParams::identity`] is the
/// view that only resizes the whole image.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct ViewParams {
    /// Left edge of the crop box in source pixels.
    pub crop_x: u32,
    /// Top edge of the crop box in source pixels.
    pub crop_y: u32,
    /// Width of the crop box in source pixels (at least 1).
    pub crop_w: u32,
    /// Height of the crop box in source pixels (at least 1).
    pub crop_h: u32,
    /// Width of the source image.
    pub src_w: u32,
    /// Height of the source image.
    pub src_h: u32,
    /// Width of the output view.
    pub out_w: u32,
    /// Height of the output view.
    pub out_h: u32,
    /// 1: mirror left-right; 0: not.
    pub flip: u32,
    /// Quarter turns clockwise, 0..=3 (1 and 3 only for square outputs).
    pub rotation: u32,
    /// Brightness factor (1 = off).
    pub brightness: f32,
    /// Contrast factor (1 = off).
    pub contrast: f32,
    /// Saturation factor (1 = off).
    pub saturation: f32,
    /// Hue shift in \[-0.5, 0.5\], a fraction of the hue circle (0 = off).
    pub hue: f32,
    /// The order of the four jitter ops: op `i` (0-based) is `(jitter_order >> (8 * i)) & 0xff`
    /// in [`JitterOp`] numbering. See [`ViewParams::jitter_ops`].
    pub jitter_order: u32,
    /// 1: convert to grayscale (three equal channels); 0: not.
    pub grayscale: u32,
    /// Standard deviation of the Gaussian blur in output pixels (0 = off).
    pub blur_sigma: f32,
    /// Number of taps of the (separable, square) blur kernel; odd.
    pub blur_kernel: u32,
    /// 1: replace the image by its Sobel gradient magnitude; 0: not.
    pub sobel: u32,
    /// Left edge of the cutout box in output pixels.
    pub cutout_x: u32,
    /// Top edge of the cutout box in output pixels.
    pub cutout_y: u32,
    /// Width of the cutout box (0 = off).
    pub cutout_w: u32,
    /// Height of the cutout box.
    pub cutout_h: u32,
    /// Standard deviation of the additive Gaussian noise (0 = off).
    pub noise_std: f32,
    /// Seed of the noise field, see [`noise_normal`].
    pub noise_seed: u32,
    /// Reserved (keeps the size a multiple of 16 bytes); 0.
    pub reserved: [u32; 3],
}

/// Size of a [`ViewParams`] in bytes.
pub const VIEW_PARAMS_BYTES: usize = 112;

const _: () = assert!(std::mem::size_of::<ViewParams>() == VIEW_PARAMS_BYTES);
const _: () = assert!(std::mem::align_of::<ViewParams>() == 4);

/// The jitter order of torchvision's numbering 0, 1, 2, 3.
pub const JITTER_ORDER_IDENTITY: u32 = pack_jitter_order([0, 1, 2, 3]);

/// Packs four [`JitterOp`] ids (first applied first) into [`ViewParams::jitter_order`].
pub const fn pack_jitter_order(ops: [u32; 4]) -> u32 {
    (ops[0] & 0xff) | (ops[1] & 0xff) << 8 | (ops[2] & 0xff) << 16 | (ops[3] & 0xff) << 24
}

impl ViewParams {
    /// The view that resizes the whole `src_w` x `src_h` image to `out_w` x `out_h` and does
    /// nothing else.
    pub fn identity(src_w: u32, src_h: u32, out_w: u32, out_h: u32) -> ViewParams {
        ViewParams {
            crop_x: 0,
            crop_y: 0,
            crop_w: src_w,
            crop_h: src_h,
            src_w,
            src_h,
            out_w,
            out_h,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            hue: 0.0,
            jitter_order: JITTER_ORDER_IDENTITY,
            blur_kernel: 1,
            ..ViewParams::default()
        }
    }

    /// The four jitter operations in the order they are applied.
    pub fn jitter_ops(&self) -> [JitterOp; 4] {
        let o = self.jitter_order;
        [
            JitterOp::from_id(o & 0xff),
            JitterOp::from_id((o >> 8) & 0xff),
            JitterOp::from_id((o >> 16) & 0xff),
            JitterOp::from_id((o >> 24) & 0xff),
        ]
    }

    /// Whether the colour jitter changes anything (some factor differs from the identity).
    pub fn has_jitter(&self) -> bool {
        self.brightness != 1.0 || self.contrast != 1.0 || self.saturation != 1.0 || self.hue != 0.0
    }

    /// Whether the view needs any colour-stage work (steps 4 to 9 of the module table).
    pub fn has_color_stage(&self) -> bool {
        self.has_jitter()
            || self.grayscale != 0
            || self.blur_sigma > 0.0
            || self.sobel != 0
            || self.cutout_w != 0
            || self.noise_std > 0.0
    }

    /// The structs as raw bytes, for upload to a GPU kernel that takes an array of them.
    pub fn slice_as_bytes(params: &[ViewParams]) -> &[u8] {
        // SAFETY: `ViewParams` is `repr(C)`, made only of 4-byte `u32`/`f32` fields (checked
        // above: size 112 = 28 fields * 4, alignment 4), so it has no padding and every byte
        // is initialised; `u8` has alignment 1 and the length covers exactly the slice.
        unsafe {
            std::slice::from_raw_parts(params.as_ptr().cast::<u8>(), std::mem::size_of_val(params))
        }
    }
}

/// Weight of tap `t` (in `-(kernel - 1) / 2 ..= (kernel - 1) / 2`) of the Gaussian blur, before
/// normalisation: `exp(-t^2 / (2 sigma^2))`, as torchvision's `gaussian_blur`.
pub fn gaussian_weight(t: i32, sigma: f32) -> f32 {
    let x = t as f32 / sigma;
    (-0.5 * x * x).exp()
}

/// The normalised 1-D blur kernel of `kernel` taps (the sum of the weights is 1).
pub fn gaussian_kernel(kernel: u32, sigma: f32) -> Vec<f32> {
    let r = (kernel.max(1) / 2) as i32;
    let mut w: Vec<f32> = (-r..=r).map(|t| gaussian_weight(t, sigma)).collect();
    let sum: f32 = w.iter().sum();
    for v in &mut w {
        *v /= sum;
    }
    w
}

/// A 32-bit integer hash (the "lowbias32" finaliser) used by the noise field.
pub const fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// A standard normal sample for element `index` of the noise field `seed`: Box-Muller on two
/// uniforms hashed from (seed, index). A counter-based generator, so a GPU thread per element
/// computes the same field as the CPU.
pub fn noise_normal(seed: u32, index: u32) -> f32 {
    let a = hash32(index.wrapping_mul(2).wrapping_add(hash32(seed)));
    let b = hash32(a ^ 0x9e37_79b9);
    // u1 in (0, 1], u2 in [0, 1): 24-bit mantissas.
    let u1 = ((a >> 8) as f32 + 1.0) * (1.0 / 16_777_216.0);
    let u2 = (b >> 8) as f32 * (1.0 / 16_777_216.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_order_round_trips() {
        let p = ViewParams {
            jitter_order: pack_jitter_order([3, 1, 0, 2]),
            ..ViewParams::identity(4, 4, 4, 4)
        };
        assert_eq!(
            p.jitter_ops(),
            [
                JitterOp::Hue,
                JitterOp::Contrast,
                JitterOp::Brightness,
                JitterOp::Saturation
            ]
        );
        assert!(!p.has_jitter());
        assert!(!p.has_color_stage());
    }

    #[test]
    fn bytes_cover_every_field() {
        let a = [ViewParams::identity(7, 9, 3, 3); 2];
        let bytes = ViewParams::slice_as_bytes(&a);
        assert_eq!(bytes.len(), 2 * VIEW_PARAMS_BYTES);
        // crop_w of the second struct is the 3rd u32 after its start.
        let off = VIEW_PARAMS_BYTES + 8;
        assert_eq!(
            u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()),
            7
        );
    }

    #[test]
    fn gaussian_kernel_is_normalised_and_symmetric() {
        let k = gaussian_kernel(7, 1.3);
        assert_eq!(k.len(), 7);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(k[0], k[6]);
        assert!(k[3] > k[2] && k[2] > k[1]);
    }

    #[test]
    fn noise_is_standard_normal() {
        let n = 200_000u32;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for i in 0..n {
            let v = noise_normal(42, i) as f64;
            assert!(v.is_finite());
            s += v;
            s2 += v * v;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert_ne!(noise_normal(1, 5), noise_normal(2, 5));
    }
}

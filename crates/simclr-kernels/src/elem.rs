//! The element types activations are stored in: f32, and bf16 for mixed-precision training.
//!
//! The kernels that touch activations (ReLU, residual add, batch norm, pooling) come in one
//! version per element type, on the GPU (`_f32` and `_bf16` entry points of one templated CUDA
//! function) and on the CPU (one generic function). Both read each value as f32, compute in f32
//! (sums in f64) and round once when storing, so the bf16 versions are the f32 algorithm on
//! bf16 storage.

use half::bf16;

/// An element type of activations. Arithmetic happens in f32: values are widened on load and
/// rounded (to nearest even) on store.
pub trait Elem:
    Copy
    + Default
    + PartialEq
    + Send
    + Sync
    + std::fmt::Debug
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + bytemuck::AnyBitPattern
    + 'static
{
    /// The suffix of this type's kernel entry points (`relu_backward_f32`, `..._bf16`).
    const SUFFIX: &'static str;
    /// Bytes per value.
    const BYTES: usize;
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
    /// `v` rounded to this type (nearest even; NaN stays NaN).
    fn from_f32(v: f32) -> Self;
    /// The values themselves when this type is f32 (lets the CPU work in place).
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const BYTES: usize = 4;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
}

impl Elem for bf16 {
    const SUFFIX: &'static str = "bf16";
    const BYTES: usize = 2;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn as_f32_mut(_: &mut [bf16]) -> Option<&mut [f32]> {
        None
    }
}

/// `v` rounded to `T` and widened back: what storing in `T` keeps of an f32.
#[inline(always)]
pub fn round_trip<T: Elem>(v: f32) -> f32 {
    T::from_f32(v).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan() {
        // 1 + 2^-8 lies halfway between two bf16 values: it goes to the even one, 1.0.
        assert_eq!(round_trip::<bf16>(1.0 + 1.0 / 256.0), 1.0);
        // Just above halfway rounds up to 1 + 2^-7.
        assert_eq!(round_trip::<bf16>(1.0 + 1.5 / 256.0), 1.0 + 1.0 / 128.0);
        assert!(round_trip::<bf16>(f32::NAN).is_nan());
        assert_eq!(round_trip::<f32>(0.1), 0.1);
    }
}

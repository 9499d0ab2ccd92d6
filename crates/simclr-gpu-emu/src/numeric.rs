//! Number formats and helpers shared by the emulated cuBLAS ([`crate::cublas`]) and cuDNN
//! ([`crate::cudnn`]): element loads and stores in device memory, the roundings tensor cores
//! apply to their inputs, and a parallel loop over the host's cores.

/// An element type in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// bfloat16: the upper half of a binary32.
    Bf16,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
            Elem::Bf16 => 2,
        }
    }
}

/// How inputs are rounded before they are multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputRounding {
    /// Used as they are (FMA kernels, or inputs already narrow).
    None,
    /// To TF32 (10 explicit mantissa bits), as TF32 tensor cores take them.
    Tf32,
    /// To bfloat16 (`CUBLAS_COMPUTE_32F_FAST_16BF`).
    Bf16,
}

/// Rounds an f32 to TF32, keeping it in f32's format (the low 13 mantissa bits zero).
///
/// Which rounding the tensor cores or the libraries use to feed f32 data to TF32 units is not
/// documented (the hardware, given f32 registers, reads their upper 19 bits); the emulator uses
/// round-to-nearest with ties away from zero, the PTX ISA's `cvt.rna.tf32.f32`, which CUTLASS
/// uses for its f32-to-TF32 conversions. Either way the relative error is within 2^-10.
pub fn round_tf32(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    // Adding half a TF32 ulp to the magnitude bits then truncating rounds ties away from zero;
    // a carry into the exponent is the correct result (up to infinity).
    f32::from_bits((v.to_bits() + 0x1000) & !0x1fff)
}

/// A bfloat16's value.
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Rounds an f32 to bfloat16, to nearest with ties to even (what `__float2bfloat16` and the
/// libraries' epilogues do); a NaN stays a (quiet) NaN.
pub fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    ((bits + 0x7fff + lsb) >> 16) as u16
}

/// Applies an input rounding to a value read as f32.
pub fn round_input(v: f32, r: InputRounding) -> f32 {
    match r {
        InputRounding::None => v,
        InputRounding::Tf32 => round_tf32(v),
        InputRounding::Bf16 => bf16_to_f32(f32_to_bf16(v)),
    }
}

/// Reads element `idx` of type `e` at device address `base`, as f64, with rounding `r` applied
/// (for f32 data only: the others are not narrowed).
///
/// # Safety
/// `base + idx * e.size()` must be readable (the callers checked the range with
/// `memory::check_device`).
pub unsafe fn load(base: usize, idx: usize, e: Elem, r: InputRounding) -> f64 {
    let p = base + idx * e.size();
    // SAFETY: per the contract above; device allocations are aligned to 256 bytes and element
    // offsets keep the element's alignment, but unaligned reads cost nothing here.
    unsafe {
        match e {
            Elem::F32 => round_input((p as *const f32).read_unaligned(), r) as f64,
            Elem::F64 => (p as *const f64).read_unaligned(),
            Elem::Bf16 => bf16_to_f32((p as *const u16).read_unaligned()) as f64,
        }
    }
}

/// Writes `v` as element `idx` of type `e` at `base`, rounding to nearest even: an f64 result
/// is rounded to f32 first, then to bfloat16 for a bf16 output, as the libraries' f32
/// accumulators are converted by their epilogues.
///
/// # Safety
/// `base + idx * e.size()` must be writable device memory no other thread is using.
pub unsafe fn store(base: usize, idx: usize, e: Elem, v: f64) {
    let p = base + idx * e.size();
    // SAFETY: per the contract above.
    unsafe {
        match e {
            Elem::F32 => (p as *mut f32).write_unaligned(v as f32),
            Elem::F64 => (p as *mut f64).write_unaligned(v),
            Elem::Bf16 => (p as *mut u16).write_unaligned(f32_to_bf16(v as f32)),
        }
    }
}

/// Runs `f(i, item)` for every item of `out` split into items of `item_len` values, on the
/// host's cores when the work (`work_per_item` multiply-adds per item) is worth threads.
pub fn par_items(
    out: &mut [f64],
    item_len: usize,
    work_per_item: usize,
    f: impl Fn(usize, &mut [f64]) + Sync,
) {
    if item_len == 0 {
        return;
    }
    let items = out.len() / item_len;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items);
    if threads <= 1 || items.saturating_mul(work_per_item) < (1 << 16) {
        for (i, item) in out.chunks_mut(item_len).enumerate() {
            f(i, item);
        }
        return;
    }
    let per_thread = items.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per_thread * item_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (j, item) in chunk.chunks_mut(item_len).enumerate() {
                    f(t * per_thread + j, item);
                }
            });
        }
    });
}

/// Whether TF32 is allowed at all: `NVIDIA_TF32_OVERRIDE=0` turns it off in cuBLAS and cuDNN
/// whatever the math mode (CUDA documentation, "TF32 Tensor Core Math").
pub fn tf32_allowed() -> bool {
    std::env::var("NVIDIA_TF32_OVERRIDE").map_or(true, |v| v.trim() != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_rounds_to_nearest_ties_away() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: away from zero.
        let half = f32::from_bits(1.0f32.to_bits() | 0x1000);
        assert_eq!(round_tf32(half), 1.0 + 2f32.powi(-10));
        assert_eq!(round_tf32(-half), -(1.0 + 2f32.powi(-10)));
        assert_eq!(round_tf32(f32::from_bits(1.0f32.to_bits() | 0x0fff)), 1.0);
        assert!(round_tf32(f32::NAN).is_nan());
        assert_eq!(round_tf32(f32::MAX), f32::INFINITY);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }
}

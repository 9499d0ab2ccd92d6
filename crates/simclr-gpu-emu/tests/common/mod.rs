//! What the cuBLAS and cuDNN tests share: a current context, device buffers, test data, and
//! the number formats written out independently of the emulator's own (`src/numeric.rs`), so
//! that a wrong rounding there cannot hide by being used on both sides.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::ffi::c_void;
use std::ptr::null_mut;

use simclr_gpu_emu::driver::api;

/// Device 0's primary context, current on this (test) thread.
pub fn init_context() {
    // SAFETY: the driver's own entry points with valid out-pointers.
    unsafe {
        assert_eq!(api::cuInit(0), 0);
        let mut ctx = null_mut();
        assert_eq!(api::cuDevicePrimaryCtxRetain(&mut ctx, 0), 0);
        assert_eq!(api::cuCtxSetCurrent(ctx), 0);
    }
}

/// A fresh allocation of `bytes` bytes (at least one), each 0xFF: NaN as f32, f64 and bf16.
pub fn alloc_bytes(bytes: usize) -> u64 {
    let mut p = 0u64;
    // SAFETY: valid out-pointer.
    unsafe { assert_eq!(api::cuMemAlloc_v2(&mut p, bytes.max(1)), 0) };
    p
}

/// A fresh allocation of `len` values of `T`, as [`alloc_bytes`].
pub fn alloc<T>(len: usize) -> u64 {
    alloc_bytes(len * std::mem::size_of::<T>())
}

/// Device memory holding `v`: an allocation of exactly its bytes, so that range checks past it
/// fail.
pub fn upload<T: Copy>(v: &[T]) -> u64 {
    let bytes = std::mem::size_of_val(v);
    let p = alloc_bytes(bytes);
    // SAFETY: a host source of `bytes` bytes into an allocation of as many.
    unsafe {
        assert_eq!(
            api::cuMemcpyHtoD_v2(p, v.as_ptr() as *const c_void, bytes),
            0
        );
    }
    p
}

/// `len` values of `T` at `p`, once the context's work is done (the libraries' handles queue
/// their work on streams the copy does not wait for).
pub fn download<T: Copy + Default>(p: u64, len: usize) -> Vec<T> {
    let mut v = vec![T::default(); len];
    // SAFETY: a host destination of `len` values.
    unsafe {
        assert_eq!(api::cuCtxSynchronize(), 0);
        assert_eq!(
            api::cuMemcpyDtoH_v2(
                v.as_mut_ptr() as *mut c_void,
                p,
                std::mem::size_of_val(&v[..])
            ),
            0
        );
    }
    v
}

/// A small deterministic generator of values in [-1, 1) with all mantissa bits in use.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value.
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The next `n` values.
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// TF32 as the tests write it: round to nearest, ties away from zero, to 10 mantissa bits.
pub fn tf32(v: f32) -> f32 {
    let b = v.to_bits();
    let mag = b & 0x7fff_ffff;
    let rounded = (mag + (1 << 12)) & !((1 << 13) - 1);
    f32::from_bits((b & 0x8000_0000) | rounded)
}

/// bfloat16, rounded to nearest even.
pub fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A bfloat16's value.
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Widens for the f64 references.
pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Asserts `got` is `want` within `tol` relative to `1 + |want|` element by element.
pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

//! Register-blocked matrix-product micro-kernels in plain Rust.
//!
//! Each kernel accumulates an `MR x NR` (6 x 16) block of a product in 12 AVX2 registers: 6
//! broadcasts times 2 vector loads give 12 independent FMAs per step of the reduction, enough to
//! hide the FMA latency on two FMA pipes while staying within the 16 vector registers. The
//! loops have fixed trip counts over fixed-size arrays, so LLVM unrolls and vectorises them
//! without intrinsics (and the same source is the portable fallback on other targets).
//!
//! Both operands come packed by the caller: `A` as `&[[f32; MR]]` and `B` as `&[Row16]`,
//! one reduction step per element.

use super::fast_math::fmadd;

/// Rows of a register block (broadcast operand).
pub(crate) const MR: usize = 6;
/// Columns of a register block (vector operand): two AVX2 registers.
pub(crate) const NR: usize = 16;

/// A register block of results.
pub(crate) type Block = [[f32; NR]; MR];

/// One reduction step of the vector operand: `NR` floats, aligned to a cache line. With the
/// 4- or 16-byte alignment of a plain `Vec<[f32; 16]>`, one of the two 32-byte loads of every
/// step straddles two cache lines, and the micro-kernels measurably stall on those split loads.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
pub(crate) struct Row16(pub(crate) [f32; NR]);

#[inline(always)]
fn step(acc: &mut Block, a: &[f32; MR], b: &[f32; NR]) {
    for r in 0..MR {
        for j in 0..NR {
            acc[r][j] = fmadd(a[r], b[j], acc[r][j]);
        }
    }
}

/// `acc[r][j] = sum_k a[k][r] * b[k][j]` over `k < min(a.len(), b.len())`: both operands
/// packed, one reduction step per element, so each is a single forward stream the hardware
/// prefetcher follows (reading 6 rows of a row-major matrix instead is six streams, and
/// measurably slower once the rows come from L2).
#[inline(always)]
pub(crate) fn kernel_packed(a: &[[f32; MR]], b: &[Row16]) -> Block {
    let mut acc = [[0.0f32; NR]; MR];
    for (av, bv) in a.iter().zip(b) {
        step(&mut acc, av, &bv.0);
    }
    acc
}

/// Asks the hardware to start loading the `part`-th of `parts` equal pieces of `data` into the
/// cache (one prefetch per 64-byte line). The kernels call it while computing one panel for the
/// memory of the next, spread over the calls in between: at M = 8192 the operands of a tile
/// come from memory, and the hardware's own prefetchers start too late for the 8 KiB vector
/// panel that one micro-kernel call consumes in a few hundred cycles.
#[inline(always)]
pub(crate) fn prefetch_part<T>(data: &[T], part: usize, parts: usize) {
    let bytes = std::mem::size_of_val(data);
    if parts == 0 || bytes == 0 {
        return;
    }
    let lines = bytes.div_ceil(64);
    let per = lines.div_ceil(parts);
    let base = data.as_ptr().cast::<u8>();
    for line in (part * per)..((part + 1) * per).min(lines) {
        let offset = (line * 64).min(bytes - 1);
        prefetch_byte(base.wrapping_add(offset));
    }
}

#[inline(always)]
fn prefetch_byte(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and has no architectural effect, and
    // `p` points into a live slice anyway. SSE is part of the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

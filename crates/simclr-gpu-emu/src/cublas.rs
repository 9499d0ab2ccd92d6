//! cuBLAS (`libcublas.so`) at its C ABI: the calls the project's CUDA backend makes through
//! cudarc (`CudaBlas::new`, `Gemm::gemm` for f32, and drop), and the neighbouring GEMMs cudarc
//! can reach, as the cuBLAS documentation ("cuBLAS Level-3 Function Reference",
//! "cublasGemmEx") describes them, with its status codes.
//!
//! - Matrices are column-major, `op(A)` is `m x k`, `op(B)` is `k x n`, `C` is `m x n`;
//!   `CUBLAS_OP_C` is `CUBLAS_OP_T` on real types.
//! - Work runs in stream order: a call checks its arguments, then queues the product on the
//!   handle's stream (`cublasSetStream`) with [`crate::driver::api::enqueue_on`]. Host-mode
//!   `alpha`/`beta` are read at the call, as cuBLAS reads them before returning.
//! - Every matrix range the dimensions and leading dimensions imply is checked, at the call, to
//!   lie in one device allocation; a range that does not is `CUBLAS_STATUS_EXECUTION_FAILED`
//!   with a message (a GPU would fault in the kernel instead).
//! - `beta == 0` does not read `C` (C may hold NaN: "if beta == 0, C does not have to be a valid
//!   input"); `alpha == 0` or `k == 0` does not read `A` and `B` (the BLAS convention).
//! - Products are a plain loop over `k` accumulating in f64, rounded once to the output type.
//!   Real cuBLAS accumulates in f32 (for `CUBLAS_COMPUTE_32F`) in a blocked order of its
//!   choosing, so results differ in the last bits: a known difference, never in the emulator's
//!   favour of hiding a wrong result.
//! - TF32 (`CUBLAS_TF32_TENSOR_OP_MATH`, `CUBLAS_COMPUTE_32F_FAST_TF32`) rounds each f32 input
//!   to TF32 first ([`numeric::round_tf32`]: nearest, ties away from zero) then multiplies
//!   exactly; `CUBLAS_PEDANTIC_MATH`, `CUBLAS_COMPUTE_32F_PEDANTIC` and
//!   `NVIDIA_TF32_OVERRIDE=0` never round.
//!
//! Entry points cudarc can reach that are not emulated are exported, print their name and fail
//! with `CUBLAS_STATUS_NOT_SUPPORTED`.
#![allow(non_snake_case, clippy::too_many_arguments)]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

use crate::driver::{api, memory};
use crate::numeric::{self, Elem, InputRounding};

/// `cublasStatus_t`.
pub type CublasStatus = u32;
/// `CUBLAS_STATUS_SUCCESS`.
pub const CUBLAS_STATUS_SUCCESS: CublasStatus = 0;
/// `CUBLAS_STATUS_NOT_INITIALIZED`: no or an unknown handle, or no CUDA context.
pub const CUBLAS_STATUS_NOT_INITIALIZED: CublasStatus = 1;
/// `CUBLAS_STATUS_ALLOC_FAILED`.
pub const CUBLAS_STATUS_ALLOC_FAILED: CublasStatus = 3;
/// `CUBLAS_STATUS_INVALID_VALUE`: an unsupported value or parameter.
pub const CUBLAS_STATUS_INVALID_VALUE: CublasStatus = 7;
/// `CUBLAS_STATUS_ARCH_MISMATCH`.
pub const CUBLAS_STATUS_ARCH_MISMATCH: CublasStatus = 8;
/// `CUBLAS_STATUS_EXECUTION_FAILED`: the work could not run (here: a range outside device
/// memory, or the context's sticky error).
pub const CUBLAS_STATUS_EXECUTION_FAILED: CublasStatus = 13;
/// `CUBLAS_STATUS_INTERNAL_ERROR`.
pub const CUBLAS_STATUS_INTERNAL_ERROR: CublasStatus = 14;
/// `CUBLAS_STATUS_NOT_SUPPORTED`: a combination the library (or the emulator) does not do.
pub const CUBLAS_STATUS_NOT_SUPPORTED: CublasStatus = 15;

/// `cublasOperation_t`: `CUBLAS_OP_N`.
pub const CUBLAS_OP_N: u32 = 0;
/// `CUBLAS_OP_T`.
pub const CUBLAS_OP_T: u32 = 1;
/// `CUBLAS_OP_C` (the transpose, on real types).
pub const CUBLAS_OP_C: u32 = 2;

/// `cublasMath_t`: `CUBLAS_DEFAULT_MATH`.
pub const CUBLAS_DEFAULT_MATH: u32 = 0;
/// `CUBLAS_TENSOR_OP_MATH` (deprecated; no effect on f32 products since CUDA 11).
pub const CUBLAS_TENSOR_OP_MATH: u32 = 1;
/// `CUBLAS_PEDANTIC_MATH`.
pub const CUBLAS_PEDANTIC_MATH: u32 = 2;
/// `CUBLAS_TF32_TENSOR_OP_MATH`.
pub const CUBLAS_TF32_TENSOR_OP_MATH: u32 = 3;
/// `CUBLAS_FP32_EMULATED_BF16X9_MATH` (accepted; f32-accurate, computed as f32 here).
pub const CUBLAS_FP32_EMULATED_BF16X9_MATH: u32 = 4;
/// `CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH` (accepted; computed in f64 here).
pub const CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH: u32 = 8;
/// `CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION`: a flag or'ed into a mode.
pub const CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION: u32 = 16;

/// `cublasPointerMode_t`: `CUBLAS_POINTER_MODE_HOST`.
pub const CUBLAS_POINTER_MODE_HOST: u32 = 0;
/// `CUBLAS_POINTER_MODE_DEVICE`.
pub const CUBLAS_POINTER_MODE_DEVICE: u32 = 1;

/// `cudaDataType_t`: `CUDA_R_32F`.
pub const CUDA_R_32F: u32 = 0;
/// `CUDA_R_64F`.
pub const CUDA_R_64F: u32 = 1;
/// `CUDA_R_16F` (not emulated: `CUBLAS_STATUS_NOT_SUPPORTED`).
pub const CUDA_R_16F: u32 = 2;
/// `CUDA_R_16BF`.
pub const CUDA_R_16BF: u32 = 14;

/// `cublasComputeType_t`: `CUBLAS_COMPUTE_32F`.
pub const CUBLAS_COMPUTE_32F: u32 = 68;
/// `CUBLAS_COMPUTE_32F_PEDANTIC`.
pub const CUBLAS_COMPUTE_32F_PEDANTIC: u32 = 69;
/// `CUBLAS_COMPUTE_64F`.
pub const CUBLAS_COMPUTE_64F: u32 = 70;
/// `CUBLAS_COMPUTE_64F_PEDANTIC`.
pub const CUBLAS_COMPUTE_64F_PEDANTIC: u32 = 71;
/// `CUBLAS_COMPUTE_32F_FAST_16BF`.
pub const CUBLAS_COMPUTE_32F_FAST_16BF: u32 = 75;
/// `CUBLAS_COMPUTE_32F_FAST_TF32`.
pub const CUBLAS_COMPUTE_32F_FAST_TF32: u32 = 77;

/// The version reported (`cublasGetVersion`): cuBLAS 13.0.0, of CUDA 13.0, which the
/// project's cudarc bindings (`cuda-13000`) were generated for.
pub const CUBLAS_VERSION: c_int = 130000;

/// `cublasHandle_t`: an opaque pointer.
pub type CublasHandle = *mut c_void;

#[derive(Clone, Copy, Debug)]
struct HandleState {
    stream: usize,
    math: u32,
    pointer_mode: u32,
}

/// Live handles, by address: a destroyed or made-up handle is `NOT_INITIALIZED`, not a crash.
fn handles() -> &'static Mutex<HashMap<usize, HandleState>> {
    static H: OnceLock<Mutex<HashMap<usize, HandleState>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<usize, HandleState>> {
    handles().lock().unwrap_or_else(|e| e.into_inner())
}

fn state(h: CublasHandle) -> Result<HandleState, CublasStatus> {
    lock()
        .get(&(h as usize))
        .copied()
        .ok_or(CUBLAS_STATUS_NOT_INITIALIZED)
}

fn with_state(h: CublasHandle, f: impl FnOnce(&mut HandleState)) -> CublasStatus {
    match lock().get_mut(&(h as usize)) {
        Some(s) => {
            f(s);
            CUBLAS_STATUS_SUCCESS
        }
        None => CUBLAS_STATUS_NOT_INITIALIZED,
    }
}

/// The `cublasGet*` calls: a field of a live handle's state, written to a non-null `out`.
///
/// # Safety
/// `out` is null or writable.
unsafe fn get<T>(
    h: CublasHandle,
    out: *mut T,
    field: impl FnOnce(&HandleState) -> T,
) -> CublasStatus {
    let s = match state(h) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if out.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: non-null out-pointer, writable per the contract.
    unsafe { out.write(field(&s)) };
    CUBLAS_STATUS_SUCCESS
}

fn status(r: Result<(), CublasStatus>) -> CublasStatus {
    match r {
        Ok(()) => CUBLAS_STATUS_SUCCESS,
        Err(s) => s,
    }
}

/// `cublasCreate_v2`: a handle on the current context's device, on the null stream, in
/// `CUBLAS_DEFAULT_MATH` and host pointer mode. Without a current context (cuInit and a
/// context first) it is `CUBLAS_STATUS_NOT_INITIALIZED`, as cuBLAS fails to initialise CUDA.
///
/// # Safety
/// `handle` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut CublasHandle) -> CublasStatus {
    if handle.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if crate::driver::context::current().is_none() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    // A heap byte gives each handle a distinct address that is never reused while it lives.
    let h = Box::into_raw(Box::new(0u8)) as usize;
    lock().insert(
        h,
        HandleState {
            stream: 0,
            math: CUBLAS_DEFAULT_MATH,
            pointer_mode: CUBLAS_POINTER_MODE_HOST,
        },
    );
    // SAFETY: non-null out-pointer from the caller.
    unsafe { handle.write(h as CublasHandle) };
    CUBLAS_STATUS_SUCCESS
}

/// `cublasDestroy_v2`: waits for the handle's queued work (cuBLAS documents that it
/// synchronises), then frees it.
///
/// # Safety
/// `handle` came from `cublasCreate_v2` (anything else is `NOT_INITIALIZED`).
#[no_mangle]
pub unsafe extern "C" fn cublasDestroy_v2(handle: CublasHandle) -> CublasStatus {
    let Some(s) = lock().remove(&(handle as usize)) else {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    };
    // A sticky error does not keep a handle from being destroyed.
    let _ = api::synchronize_stream(s.stream as *mut c_void);
    // SAFETY: the address came from Box::into_raw in cublasCreate_v2 and left the table now.
    drop(unsafe { Box::from_raw(handle as *mut u8) });
    CUBLAS_STATUS_SUCCESS
}

/// `cublasSetStream_v2`: later work runs on `stream` (null: the null stream).
///
/// # Safety
/// `handle` as for `cublasDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cublasSetStream_v2(
    handle: CublasHandle,
    stream: *mut c_void,
) -> CublasStatus {
    with_state(handle, |s| s.stream = stream as usize)
}

/// `cublasGetStream_v2`.
///
/// # Safety
/// `stream` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cublasGetStream_v2(
    handle: CublasHandle,
    stream: *mut *mut c_void,
) -> CublasStatus {
    unsafe { get(handle, stream, |s| s.stream as *mut c_void) }
}

/// `cublasSetMathMode`: one of the documented `cublasMath_t` values, optionally with
/// `CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION`; anything else is `INVALID_VALUE`.
///
/// # Safety
/// `handle` as for `cublasDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cublasSetMathMode(handle: CublasHandle, mode: u32) -> CublasStatus {
    let base = mode & !CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    if state(handle).is_err() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if !matches!(
        base,
        CUBLAS_DEFAULT_MATH
            | CUBLAS_TENSOR_OP_MATH
            | CUBLAS_PEDANTIC_MATH
            | CUBLAS_TF32_TENSOR_OP_MATH
            | CUBLAS_FP32_EMULATED_BF16X9_MATH
            | CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH
    ) {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    with_state(handle, |s| s.math = mode)
}

/// `cublasGetMathMode`.
///
/// # Safety
/// `mode` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cublasGetMathMode(handle: CublasHandle, mode: *mut u32) -> CublasStatus {
    unsafe { get(handle, mode, |s| s.math) }
}

/// `cublasSetPointerMode_v2`: whether `alpha`/`beta` are host or device pointers.
///
/// # Safety
/// `handle` as for `cublasDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cublasSetPointerMode_v2(handle: CublasHandle, mode: u32) -> CublasStatus {
    if state(handle).is_err() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if mode > CUBLAS_POINTER_MODE_DEVICE {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    with_state(handle, |s| s.pointer_mode = mode)
}

/// `cublasGetPointerMode_v2`.
///
/// # Safety
/// `mode` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cublasGetPointerMode_v2(
    handle: CublasHandle,
    mode: *mut u32,
) -> CublasStatus {
    unsafe { get(handle, mode, |s| s.pointer_mode) }
}

/// `cublasSetWorkspace_v2`: accepted and checked (the emulated GEMMs need no workspace).
///
/// # Safety
/// `handle` as for `cublasDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cublasSetWorkspace_v2(
    handle: CublasHandle,
    workspace: *mut c_void,
    size: usize,
) -> CublasStatus {
    if state(handle).is_err() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if size > 0 && memory::check_device(workspace as usize, size, "cublasSetWorkspace").is_err() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    CUBLAS_STATUS_SUCCESS
}

/// `cublasGetVersion_v2`.
///
/// # Safety
/// `version` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cublasGetVersion_v2(
    _handle: CublasHandle,
    version: *mut c_int,
) -> CublasStatus {
    if version.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: non-null out-pointer.
    unsafe { version.write(CUBLAS_VERSION) };
    CUBLAS_STATUS_SUCCESS
}

/// `cublasGetStatusName`: the status's enumerator name.
#[no_mangle]
pub extern "C" fn cublasGetStatusName(s: CublasStatus) -> *const c_char {
    let name: &'static str = match s {
        CUBLAS_STATUS_SUCCESS => "CUBLAS_STATUS_SUCCESS\0",
        CUBLAS_STATUS_NOT_INITIALIZED => "CUBLAS_STATUS_NOT_INITIALIZED\0",
        CUBLAS_STATUS_ALLOC_FAILED => "CUBLAS_STATUS_ALLOC_FAILED\0",
        CUBLAS_STATUS_INVALID_VALUE => "CUBLAS_STATUS_INVALID_VALUE\0",
        CUBLAS_STATUS_ARCH_MISMATCH => "CUBLAS_STATUS_ARCH_MISMATCH\0",
        CUBLAS_STATUS_EXECUTION_FAILED => "CUBLAS_STATUS_EXECUTION_FAILED\0",
        CUBLAS_STATUS_INTERNAL_ERROR => "CUBLAS_STATUS_INTERNAL_ERROR\0",
        CUBLAS_STATUS_NOT_SUPPORTED => "CUBLAS_STATUS_NOT_SUPPORTED\0",
        _ => "CUBLAS_STATUS_UNKNOWN\0",
    };
    name.as_ptr() as *const c_char
}

/// `cublasGetStatusString`: a description of the status.
#[no_mangle]
pub extern "C" fn cublasGetStatusString(s: CublasStatus) -> *const c_char {
    let text: &'static str = match s {
        CUBLAS_STATUS_SUCCESS => "success\0",
        CUBLAS_STATUS_NOT_INITIALIZED => "the library was not initialized\0",
        CUBLAS_STATUS_ALLOC_FAILED => "the resource allocation failed\0",
        CUBLAS_STATUS_INVALID_VALUE => "an invalid numeric value was used as an argument\0",
        CUBLAS_STATUS_ARCH_MISMATCH => "an absent device architectural feature is required\0",
        CUBLAS_STATUS_EXECUTION_FAILED => "the GPU program failed to execute\0",
        CUBLAS_STATUS_INTERNAL_ERROR => "an internal operation failed\0",
        CUBLAS_STATUS_NOT_SUPPORTED => "the functionality requested is not supported\0",
        _ => "unknown error\0",
    };
    text.as_ptr() as *const c_char
}

/// One (possibly batched) GEMM, checked and ready to queue.
#[derive(Clone, Copy, Debug)]
struct Gemm {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: usize,
    lda: usize,
    stride_a: usize,
    b: usize,
    ldb: usize,
    stride_b: usize,
    c: usize,
    ldc: usize,
    stride_c: usize,
    batch: usize,
    ab: Elem,
    ce: Elem,
    round: InputRounding,
}

/// Where `alpha` and `beta` are: read at the call (host) or when the work runs (device).
#[derive(Clone, Copy, Debug)]
enum Scalars {
    Host(f64, f64),
    Device { alpha: usize, beta: usize, e: Elem },
}

/// The raw arguments of a GEMM call, before checking.
struct Args {
    transa: u32,
    transb: u32,
    m: i64,
    n: i64,
    k: i64,
    alpha: *const c_void,
    a: *const c_void,
    lda: i64,
    stride_a: i64,
    b: *const c_void,
    ldb: i64,
    stride_b: i64,
    beta: *const c_void,
    c: *mut c_void,
    ldc: i64,
    stride_c: i64,
    batch: i64,
    types: Types,
    what: &'static str,
}

/// The types of a GEMM call: of its elements, its scalars, and its inputs' rounding.
#[derive(Clone, Copy, Debug)]
struct Types {
    /// The element types of A and B, and of C.
    ab: Elem,
    ce: Elem,
    /// The type of alpha and beta.
    scale: Elem,
    /// Whether the handle's math mode may turn on TF32 (f32 inputs, `CUBLAS_COMPUTE_32F`).
    tf32_by_mode: bool,
    /// Rounding the compute type asks for whatever the math mode.
    round: InputRounding,
}

impl Types {
    /// The typed GEMMs (`cublasS*`, `cublasD*`): everything of type `e`, TF32 by the math mode
    /// on f32.
    fn real(e: Elem) -> Types {
        Types {
            ab: e,
            ce: e,
            scale: e,
            tf32_by_mode: e == Elem::F32,
            round: InputRounding::None,
        }
    }
}

impl Args {
    /// The C arguments as the entry points take them: each matrix as (pointer, leading
    /// dimension, batch stride), strides 0 and a batch of 1 for the unbatched forms.
    fn new(
        (transa, transb): (u32, u32),
        (m, n, k): (c_int, c_int, c_int),
        alpha: *const c_void,
        (a, lda, stride_a): (*const c_void, c_int, i64),
        (b, ldb, stride_b): (*const c_void, c_int, i64),
        beta: *const c_void,
        (c, ldc, stride_c): (*mut c_void, c_int, i64),
        batch: c_int,
        types: Types,
        what: &'static str,
    ) -> Args {
        Args {
            transa,
            transb,
            m: m as i64,
            n: n as i64,
            k: k as i64,
            alpha,
            a,
            lda: lda as i64,
            stride_a,
            b,
            ldb: ldb as i64,
            stride_b,
            beta,
            c,
            ldc: ldc as i64,
            stride_c,
            batch: batch as i64,
            types,
            what,
        }
    }
}

fn gemm(handle: CublasHandle, g: Args) -> CublasStatus {
    status(gemm_inner(handle, g))
}

/// Bytes spanned by a column-major `rows x cols` matrix with leading dimension `ld`.
fn span(rows: usize, cols: usize, ld: usize, e: Elem) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        ((cols - 1) * ld + rows) * e.size()
    }
}

fn gemm_inner(handle: CublasHandle, g: Args) -> Result<(), CublasStatus> {
    let st = state(handle)?;
    let ty = g.types;
    let op_ok = |t: u32| matches!(t, CUBLAS_OP_N | CUBLAS_OP_T | CUBLAS_OP_C);
    // "CUBLAS_STATUS_INVALID_VALUE: if m < 0 or n < 0 or k < 0, or if transa, transb !=
    // CUBLAS_OP_N, CUBLAS_OP_C, CUBLAS_OP_T, or if lda < max(1, m) if transa == CUBLAS_OP_N and
    // lda < max(1, k) otherwise, or if ldb < max(1, k) if transb == CUBLAS_OP_N and
    // ldb < max(1, n) otherwise, or if ldc < max(1, m), or if alpha, beta == NULL, or C == NULL
    // if C needs to be scaled" (cublas<t>gemm); batchCount < 0 for the batched forms.
    if g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0 || !op_ok(g.transa) || !op_ok(g.transb) {
        return Err(CUBLAS_STATUS_INVALID_VALUE);
    }
    let ta = g.transa != CUBLAS_OP_N;
    let tb = g.transb != CUBLAS_OP_N;
    let (a_rows, a_cols) = if ta { (g.k, g.m) } else { (g.m, g.k) };
    let (b_rows, b_cols) = if tb { (g.n, g.k) } else { (g.k, g.n) };
    if g.lda < a_rows.max(1) || g.ldb < b_rows.max(1) || g.ldc < g.m.max(1) {
        return Err(CUBLAS_STATUS_INVALID_VALUE);
    }
    if g.alpha.is_null() || g.beta.is_null() {
        return Err(CUBLAS_STATUS_INVALID_VALUE);
    }
    let (m, n, k, batch) = (g.m as usize, g.n as usize, g.k as usize, g.batch as usize);
    if m == 0 || n == 0 || batch == 0 {
        // Nothing to compute: cuBLAS returns at once.
        return Ok(());
    }
    if g.c.is_null() {
        return Err(CUBLAS_STATUS_INVALID_VALUE);
    }
    if g.stride_a < 0 || g.stride_b < 0 || g.stride_c < 0 {
        // Negative strides are allowed by cuBLAS but nothing here uses them: say so.
        eprintln!(
            "simclr-gpu-emu: {}: negative batch strides are not emulated",
            g.what
        );
        return Err(CUBLAS_STATUS_NOT_SUPPORTED);
    }
    let scalars = if st.pointer_mode == CUBLAS_POINTER_MODE_HOST {
        // SAFETY: non-null host pointers to the scale type, per the cuBLAS contract.
        unsafe {
            Scalars::Host(
                read_scalar(g.alpha, ty.scale),
                read_scalar(g.beta, ty.scale),
            )
        }
    } else {
        for (p, name) in [(g.alpha, "alpha"), (g.beta, "beta")] {
            check(p as usize, ty.scale.size(), g.what, name)?;
        }
        Scalars::Device {
            alpha: g.alpha as usize,
            beta: g.beta as usize,
            e: ty.scale,
        }
    };
    let math = st.math & !CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    let round = if ty.tf32_by_mode && math == CUBLAS_TF32_TENSOR_OP_MATH {
        InputRounding::Tf32
    } else {
        ty.round
    };
    let round = if round == InputRounding::Tf32 && !numeric::tf32_allowed() {
        InputRounding::None
    } else {
        round
    };
    let op = Gemm {
        ta,
        tb,
        m,
        n,
        k,
        a: g.a as usize,
        lda: g.lda as usize,
        stride_a: g.stride_a as usize,
        b: g.b as usize,
        ldb: g.ldb as usize,
        stride_b: g.stride_b as usize,
        c: g.c as usize,
        ldc: g.ldc as usize,
        stride_c: g.stride_c as usize,
        batch,
        ab: ty.ab,
        ce: ty.ce,
        round,
    };
    // The exact ranges the dimensions imply; A and B are read only when k > 0 and alpha != 0
    // (a host alpha of 0 is known now; a device one may be 0, so its A and B are checked).
    let reads_ab = k > 0 && !matches!(scalars, Scalars::Host(a, _) if a == 0.0);
    let whole = |s: usize, one: usize| (batch - 1) * s + one;
    if reads_ab {
        check(
            op.a,
            whole(
                op.stride_a * ty.ab.size(),
                span(a_rows as usize, a_cols as usize, op.lda, ty.ab),
            ),
            g.what,
            "A",
        )?;
        check(
            op.b,
            whole(
                op.stride_b * ty.ab.size(),
                span(b_rows as usize, b_cols as usize, op.ldb, ty.ab),
            ),
            g.what,
            "B",
        )?;
    }
    check(
        op.c,
        whole(op.stride_c * ty.ce.size(), span(m, n, op.ldc, ty.ce)),
        g.what,
        "C",
    )?;
    let what = g.what;
    api::enqueue_on(
        st.stream as *mut c_void,
        Box::new(move || {
            let (alpha, beta) = match scalars {
                Scalars::Host(a, b) => (a, b),
                // SAFETY: both checked to be device memory holding a scalar, at the call.
                Scalars::Device { alpha, beta, e } => unsafe {
                    (
                        numeric::load(alpha, 0, e, InputRounding::None),
                        numeric::load(beta, 0, e, InputRounding::None),
                    )
                },
            };
            // SAFETY: every range was checked at the call; the stream runs this alone.
            unsafe { op.run(alpha, beta) };
            Ok(())
        }),
    )
    .map_err(|e| {
        eprintln!("simclr-gpu-emu: {what}: the stream cannot take work (CUresult {e})");
        CUBLAS_STATUS_EXECUTION_FAILED
    })
}

/// Reads a host scalar of type `e`.
///
/// # Safety
/// `p` points at a readable value of type `e`.
unsafe fn read_scalar(p: *const c_void, e: Elem) -> f64 {
    // SAFETY: per the contract.
    unsafe {
        match e {
            Elem::F32 => (p as *const f32).read_unaligned() as f64,
            Elem::F64 => (p as *const f64).read_unaligned(),
            Elem::Bf16 => numeric::bf16_to_f32((p as *const u16).read_unaligned()) as f64,
        }
    }
}

fn check(ptr: usize, len: usize, what: &str, name: &str) -> Result<(), CublasStatus> {
    if len == 0 {
        return Ok(());
    }
    memory::check_device(ptr, len, &format!("{what} ({name})")).map_err(|(_, msg)| {
        eprintln!("simclr-gpu-emu: {msg}");
        CUBLAS_STATUS_EXECUTION_FAILED
    })
}

impl Gemm {
    /// `C = alpha op(A) op(B) + beta C` for every batch entry.
    ///
    /// # Safety
    /// The ranges `gemm_inner` checked are live device memory, C not used by anyone else.
    unsafe fn run(&self, alpha: f64, beta: f64) {
        let (m, n, k) = (self.m, self.n, self.k);
        for bi in 0..self.batch {
            let a = self.a + bi * self.stride_a * self.ab.size();
            let b = self.b + bi * self.stride_b * self.ab.size();
            let c = self.c + bi * self.stride_c * self.ce.size();
            let mut acc = vec![0.0f64; m * n];
            if k > 0 && alpha != 0.0 {
                // op(A) as m rows of k, op(B)^T as n rows of k: each C element is one dot
                // product of two contiguous rows.
                let mut at = vec![0.0f64; m * k];
                for i in 0..m {
                    for p in 0..k {
                        let idx = if self.ta {
                            p + i * self.lda
                        } else {
                            i + p * self.lda
                        };
                        // SAFETY: inside the checked span of A.
                        at[i * k + p] = unsafe { numeric::load(a, idx, self.ab, self.round) };
                    }
                }
                let mut bt = vec![0.0f64; n * k];
                for j in 0..n {
                    for p in 0..k {
                        let idx = if self.tb {
                            j + p * self.ldb
                        } else {
                            p + j * self.ldb
                        };
                        // SAFETY: inside the checked span of B.
                        bt[j * k + p] = unsafe { numeric::load(b, idx, self.ab, self.round) };
                    }
                }
                // Column j of C is item j.
                numeric::par_items(&mut acc, m, m * k, |j, col| {
                    let bj = &bt[j * k..(j + 1) * k];
                    for (i, out) in col.iter_mut().enumerate() {
                        let ai = &at[i * k..(i + 1) * k];
                        *out = ai.iter().zip(bj).map(|(x, y)| x * y).sum::<f64>();
                    }
                });
            }
            for j in 0..n {
                for i in 0..m {
                    let idx = i + j * self.ldc;
                    let mut v = alpha * acc[i + j * m];
                    if beta != 0.0 {
                        // SAFETY: inside the checked span of C.
                        v += beta * unsafe { numeric::load(c, idx, self.ce, InputRounding::None) };
                    }
                    // SAFETY: as above.
                    unsafe { numeric::store(c, idx, self.ce, v) };
                }
            }
        }
    }
}

/// `cublasSgemm_v2`: f32, TF32 in `CUBLAS_TF32_TENSOR_OP_MATH`.
///
/// # Safety
/// The pointers are what cuBLAS documents: host (or, in device pointer mode, device) scalars,
/// device matrices of the sizes the arguments imply.
#[no_mangle]
pub unsafe extern "C" fn cublasSgemm_v2(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
) -> CublasStatus {
    gemm(
        handle,
        Args::new(
            (transa, transb),
            (m, n, k),
            alpha as _,
            (a as _, lda, 0),
            (b as _, ldb, 0),
            beta as _,
            (c as _, ldc, 0),
            1,
            Types::real(Elem::F32),
            "cublasSgemm",
        ),
    )
}

/// `cublasDgemm_v2`: f64.
///
/// # Safety
/// As for `cublasSgemm_v2`.
#[no_mangle]
pub unsafe extern "C" fn cublasDgemm_v2(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f64,
    a: *const f64,
    lda: c_int,
    b: *const f64,
    ldb: c_int,
    beta: *const f64,
    c: *mut f64,
    ldc: c_int,
) -> CublasStatus {
    gemm(
        handle,
        Args::new(
            (transa, transb),
            (m, n, k),
            alpha as _,
            (a as _, lda, 0),
            (b as _, ldb, 0),
            beta as _,
            (c as _, ldc, 0),
            1,
            Types::real(Elem::F64),
            "cublasDgemm",
        ),
    )
}

/// `cublasSgemmStridedBatched`.
///
/// # Safety
/// As for `cublasSgemm_v2`, for `batchCount` matrices `stride` elements apart.
#[no_mangle]
pub unsafe extern "C" fn cublasSgemmStridedBatched(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    stride_a: i64,
    b: *const f32,
    ldb: c_int,
    stride_b: i64,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
    stride_c: i64,
    batch: c_int,
) -> CublasStatus {
    gemm(
        handle,
        Args::new(
            (transa, transb),
            (m, n, k),
            alpha as _,
            (a as _, lda, stride_a),
            (b as _, ldb, stride_b),
            beta as _,
            (c as _, ldc, stride_c),
            batch,
            Types::real(Elem::F32),
            "cublasSgemmStridedBatched",
        ),
    )
}

/// `cublasDgemmStridedBatched`.
///
/// # Safety
/// As for `cublasSgemmStridedBatched`.
#[no_mangle]
pub unsafe extern "C" fn cublasDgemmStridedBatched(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f64,
    a: *const f64,
    lda: c_int,
    stride_a: i64,
    b: *const f64,
    ldb: c_int,
    stride_b: i64,
    beta: *const f64,
    c: *mut f64,
    ldc: c_int,
    stride_c: i64,
    batch: c_int,
) -> CublasStatus {
    gemm(
        handle,
        Args::new(
            (transa, transb),
            (m, n, k),
            alpha as _,
            (a as _, lda, stride_a),
            (b as _, ldb, stride_b),
            beta as _,
            (c as _, ldc, stride_c),
            batch,
            Types::real(Elem::F64),
            "cublasDgemmStridedBatched",
        ),
    )
}

/// The `cublasGemmEx` type combinations emulated, from the documentation's table of
/// supported (compute type, scale type, A/B type, C type). Anything else (f16, integer, fp8,
/// complex) is `NOT_SUPPORTED`.
fn ex_types(atype: u32, btype: u32, ctype: u32, compute: u32) -> Result<Types, CublasStatus> {
    if atype != btype {
        return Err(CUBLAS_STATUS_NOT_SUPPORTED);
    }
    let none = InputRounding::None;
    let t = |ab, ce, scale, tf32_by_mode, round| {
        Ok(Types {
            ab,
            ce,
            scale,
            tf32_by_mode,
            round,
        })
    };
    match (compute, atype, ctype) {
        (CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_32F) => {
            t(Elem::F32, Elem::F32, Elem::F32, true, none)
        }
        (CUBLAS_COMPUTE_32F_PEDANTIC, CUDA_R_32F, CUDA_R_32F) => {
            t(Elem::F32, Elem::F32, Elem::F32, false, none)
        }
        (CUBLAS_COMPUTE_32F | CUBLAS_COMPUTE_32F_PEDANTIC, CUDA_R_16BF, CUDA_R_16BF) => {
            t(Elem::Bf16, Elem::Bf16, Elem::F32, false, none)
        }
        (CUBLAS_COMPUTE_32F | CUBLAS_COMPUTE_32F_PEDANTIC, CUDA_R_16BF, CUDA_R_32F) => {
            t(Elem::Bf16, Elem::F32, Elem::F32, false, none)
        }
        (CUBLAS_COMPUTE_32F_FAST_TF32, CUDA_R_32F, CUDA_R_32F) => {
            t(Elem::F32, Elem::F32, Elem::F32, false, InputRounding::Tf32)
        }
        (CUBLAS_COMPUTE_32F_FAST_16BF, CUDA_R_32F, CUDA_R_32F) => {
            t(Elem::F32, Elem::F32, Elem::F32, false, InputRounding::Bf16)
        }
        (CUBLAS_COMPUTE_64F | CUBLAS_COMPUTE_64F_PEDANTIC, CUDA_R_64F, CUDA_R_64F) => {
            t(Elem::F64, Elem::F64, Elem::F64, false, none)
        }
        _ => {
            eprintln!(
                "simclr-gpu-emu: cublasGemmEx: types A/B {atype}, C {ctype} with compute type \
                 {compute} are not emulated (or not a documented combination)"
            );
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        }
    }
}

/// `cublasGemmEx`: f32 (`CUBLAS_COMPUTE_32F`, `_PEDANTIC`, `_FAST_TF32`, `_FAST_16BF`), bf16
/// A/B with bf16 or f32 C (`CUBLAS_COMPUTE_32F`), f64; anything else `NOT_SUPPORTED`. `algo`
/// is a hint, ignored.
///
/// # Safety
/// As for `cublasSgemm_v2`, with the elements of the types named.
#[no_mangle]
pub unsafe extern "C" fn cublasGemmEx(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: u32,
    lda: c_int,
    b: *const c_void,
    btype: u32,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ctype: u32,
    ldc: c_int,
    compute: u32,
    _algo: c_int,
) -> CublasStatus {
    unsafe {
        cublasGemmStridedBatchedEx(
            handle, transa, transb, m, n, k, alpha, a, atype, lda, 0, b, btype, ldb, 0, beta, c,
            ctype, ldc, 0, 1, compute, _algo,
        )
    }
}

/// `cublasGemmStridedBatchedEx`.
///
/// # Safety
/// As for `cublasGemmEx`, for `batchCount` matrices `stride` elements apart.
#[no_mangle]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    handle: CublasHandle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: u32,
    lda: c_int,
    stride_a: i64,
    b: *const c_void,
    btype: u32,
    ldb: c_int,
    stride_b: i64,
    beta: *const c_void,
    c: *mut c_void,
    ctype: u32,
    ldc: c_int,
    stride_c: i64,
    batch: c_int,
    compute: u32,
    _algo: c_int,
) -> CublasStatus {
    if state(handle).is_err() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    let types = match ex_types(atype, btype, ctype, compute) {
        Ok(t) => t,
        Err(e) => return e,
    };
    gemm(
        handle,
        Args::new(
            (transa, transb),
            (m, n, k),
            alpha,
            (a, lda, stride_a),
            (b, ldb, stride_b),
            beta,
            (c, ldc, stride_c),
            batch,
            types,
            "cublasGemmEx",
        ),
    )
}

macro_rules! not_emulated {
    ($($name:ident)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not emulated.")]
            ///
            /// It takes no parameters: under the x86-64 System V calling convention the caller
            /// owns its argument registers and stack, so ignoring them is sound.
            #[no_mangle]
            pub extern "C" fn $name() -> CublasStatus {
                eprintln!(concat!("simclr-gpu-emu: ", stringify!($name), " is not emulated"));
                CUBLAS_STATUS_NOT_SUPPORTED
            }
        )*
    };
}

// What cudarc's cublas module can reach besides the above.
not_emulated! {
    cublasSgemv_v2 cublasDgemv_v2 cublasSasum_v2 cublasDasum_v2 cublasHgemm
    cublasHgemmStridedBatched cublasGemmGroupedBatchedEx cublasSgemm_v2_64 cublasDgemm_v2_64
    cublasGemmEx_64 cublasSgemmBatched cublasGemmBatchedEx
}

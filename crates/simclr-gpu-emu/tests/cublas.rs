//! Tests of the emulated cuBLAS (`src/cublas.rs`), through its C ABI, against a GEMM written
//! here from the definition (column-major, `C = alpha op(A) op(B) + beta C`) in f64.
#![allow(clippy::too_many_arguments)]

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;

use common::*;
use simclr_gpu_emu::cublas::*;
use simclr_gpu_emu::driver::api;

/// The reference: column-major matrices, `ta`/`tb` transposing the stored A (rows x cols with
/// leading dimension lda) and B.
fn reference(
    ta: bool,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f64,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    beta: f64,
    c: &[f64],
    ldc: usize,
) -> Vec<f64> {
    let mut out = c.to_vec();
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0.0;
            for p in 0..k {
                let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                acc += av * bv;
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta * c[i + j * ldc]
            };
            out[i + j * ldc] = alpha * acc + old;
        }
    }
    out
}

/// `alpha op(A) op(B)` into a fresh, packed `m x n` C (beta 0).
fn product(
    ta: bool,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f64,
    (a, lda): (&[f64], usize),
    (b, ldb): (&[f64], usize),
) -> Vec<f64> {
    reference(
        ta,
        tb,
        (m, n, k),
        alpha,
        a,
        lda,
        b,
        ldb,
        0.0,
        &vec![0.0; m * n],
        m,
    )
}

fn handle() -> CublasHandle {
    init_context();
    let mut h = null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { cublasCreate_v2(&mut h) }, CUBLAS_STATUS_SUCCESS);
    h
}

/// Runs one Sgemm and returns C, with A and B given as stored (column-major, padded).
fn sgemm(
    h: CublasHandle,
    ta: bool,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    beta: f32,
    (c, ldc): (Option<&[f32]>, usize),
) -> (CublasStatus, Vec<f32>) {
    let da = upload(a);
    let db = upload(b);
    let c_len = ldc * n;
    let dc = match c {
        Some(c) => upload(c),
        None => alloc::<f32>(c_len),
    };
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    // SAFETY: matrices of the sizes the arguments imply; host scalars.
    let s = unsafe {
        cublasSgemm_v2(
            h,
            op(ta),
            op(tb),
            m as i32,
            n as i32,
            k as i32,
            &alpha,
            da as *const f32,
            lda as i32,
            db as *const f32,
            ldb as i32,
            &beta,
            dc as *mut f32,
            ldc as i32,
        )
    };
    (s, download(dc, c_len))
}

#[test]
fn sgemm_matches_the_definition_for_transposes_leading_dims_alpha_beta() {
    let h = handle();
    let mut rng = Lcg(1);
    let (m, n, k) = (7, 5, 9);
    for ta in [false, true] {
        for tb in [false, true] {
            for beta in [0.0f32, 0.75] {
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let (lda, ldb, ldc) = (ar + 3, br + 1, m + 2);
                let a = rng.vec(lda * ac);
                let b = rng.vec(ldb * bc);
                let c = rng.vec(ldc * n);
                // beta == 0: C starts as NaN (a fresh allocation) and must not be read.
                let c_in = (beta != 0.0).then_some(&c[..]);
                let (s, got) = sgemm(
                    h,
                    ta,
                    tb,
                    (m, n, k),
                    1.5,
                    (&a, lda),
                    (&b, ldb),
                    beta,
                    (c_in, ldc),
                );
                assert_eq!(s, CUBLAS_STATUS_SUCCESS);
                let base = if beta == 0.0 {
                    vec![0.0; c.len()]
                } else {
                    to64(&c)
                };
                let want = reference(
                    ta,
                    tb,
                    (m, n, k),
                    1.5,
                    &to64(&a),
                    lda,
                    &to64(&b),
                    ldb,
                    beta as f64,
                    &base,
                    ldc,
                );
                // Rows m..ldc of C are padding: untouched (NaN when fresh, else as given).
                for j in 0..n {
                    for i in 0..ldc {
                        let idx = i + j * ldc;
                        if i < m {
                            let (g, w) = (got[idx] as f64, want[idx]);
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "ta {ta} tb {tb} beta {beta}: C[{i},{j}] = {g}, want {w}"
                            );
                        } else if beta == 0.0 {
                            assert!(got[idx].is_nan(), "padding of C written");
                        } else {
                            assert_eq!(got[idx], c[idx], "padding of C written");
                        }
                    }
                }
            }
        }
    }
    // SAFETY: a live handle.
    assert_eq!(unsafe { cublasDestroy_v2(h) }, CUBLAS_STATUS_SUCCESS);
}

#[test]
fn tf32_math_mode_rounds_inputs_and_pedantic_does_not() {
    let h = handle();
    let mut rng = Lcg(7);
    let (m, n, k) = (4, 3, 16);
    let a = rng.vec(m * k);
    let b = rng.vec(k * n);
    let exact = product(false, false, (m, n, k), 1.0, (&to64(&a), m), (&to64(&b), k));
    let ar: Vec<f64> = a.iter().map(|&v| tf32(v) as f64).collect();
    let br: Vec<f64> = b.iter().map(|&v| tf32(v) as f64).collect();
    let rounded = product(false, false, (m, n, k), 1.0, (&ar, m), (&br, k));
    // SAFETY: a live handle.
    unsafe {
        let mut mode = 99;
        assert_eq!(cublasGetMathMode(h, &mut mode), CUBLAS_STATUS_SUCCESS);
        assert_eq!(mode, CUBLAS_DEFAULT_MATH);
        assert_eq!(
            cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH),
            CUBLAS_STATUS_SUCCESS
        );
    }
    let packed = || {
        sgemm(
            h,
            false,
            false,
            (m, n, k),
            1.0,
            (&a, m),
            (&b, k),
            0.0,
            (None, m),
        )
    };
    let (s, got) = packed();
    assert_eq!(s, CUBLAS_STATUS_SUCCESS);
    assert_close(&got, &rounded, 1e-6, "tf32");
    // The inputs have low bits set: the TF32 product must differ from the exact one.
    assert!(got
        .iter()
        .zip(&exact)
        .any(|(&g, &e)| (g as f64 - e).abs() > 1e-5));
    // SAFETY: a live handle.
    unsafe {
        assert_eq!(
            cublasSetMathMode(h, CUBLAS_PEDANTIC_MATH),
            CUBLAS_STATUS_SUCCESS
        )
    };
    let (_, got) = packed();
    assert_close(&got, &exact, 1e-6, "pedantic");
    // SAFETY: a live handle; 7 is no cublasMath_t.
    unsafe {
        assert_eq!(cublasSetMathMode(h, 7), CUBLAS_STATUS_INVALID_VALUE);
        cublasDestroy_v2(h);
    }
}

#[test]
fn gemm_ex_bf16_inputs_f32_compute_with_f32_and_bf16_outputs() {
    let h = handle();
    let mut rng = Lcg(3);
    let (m, n, k) = (6, 4, 10);
    let a: Vec<u16> = rng.vec(k * m).iter().map(|&v| bf16(v)).collect(); // stored k x m: OP_T
    let b: Vec<u16> = rng.vec(k * n).iter().map(|&v| bf16(v)).collect();
    let a64: Vec<f64> = a.iter().map(|&v| from_bf16(v) as f64).collect();
    let b64: Vec<f64> = b.iter().map(|&v| from_bf16(v) as f64).collect();
    let want = product(true, false, (m, n, k), 1.0, (&a64, k), (&b64, k));
    let (da, db) = (upload(&a), upload(&b));
    let (alpha, beta) = (1.0f32, 0.0f32);
    for ctype in [CUDA_R_32F, CUDA_R_16BF] {
        let dc = if ctype == CUDA_R_32F {
            alloc::<f32>(m * n)
        } else {
            alloc::<u16>(m * n)
        };
        // SAFETY: bf16 A and B, C of ctype, float scalars.
        let s = unsafe {
            cublasGemmEx(
                h,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                da as *const c_void,
                CUDA_R_16BF,
                k as i32,
                db as *const c_void,
                CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                dc as *mut c_void,
                ctype,
                m as i32,
                CUBLAS_COMPUTE_32F,
                -1,
            )
        };
        assert_eq!(s, CUBLAS_STATUS_SUCCESS);
        if ctype == CUDA_R_32F {
            assert_close(&download::<f32>(dc, m * n), &want, 1e-6, "bf16 -> f32");
        } else {
            let got: Vec<f32> = download::<u16>(dc, m * n)
                .iter()
                .map(|&v| from_bf16(v))
                .collect();
            // One bf16 rounding of the f32 result: within 2^-8 relative.
            assert_close(&got, &want, 1.0 / 256.0, "bf16 -> bf16");
        }
    }
    // f16 is not emulated: NOT_SUPPORTED, not a wrong answer.
    // SAFETY: the call is refused before any pointer is used.
    let s = unsafe {
        cublasGemmEx(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            1,
            1,
            1,
            &alpha as *const f32 as *const c_void,
            da as *const c_void,
            CUDA_R_16F,
            1,
            db as *const c_void,
            CUDA_R_16F,
            1,
            &beta as *const f32 as *const c_void,
            null_mut(),
            CUDA_R_16F,
            1,
            CUBLAS_COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(s, CUBLAS_STATUS_NOT_SUPPORTED);
    // SAFETY: a live handle.
    unsafe { cublasDestroy_v2(h) };
}

#[test]
fn strided_batched_and_a_stream() {
    let h = handle();
    let mut stream = null_mut();
    // SAFETY: valid out-pointer; a live handle.
    unsafe {
        assert_eq!(api::cuStreamCreate(&mut stream, 1), 0);
        assert_eq!(cublasSetStream_v2(h, stream), CUBLAS_STATUS_SUCCESS);
        let mut got = null_mut();
        assert_eq!(cublasGetStream_v2(h, &mut got), CUBLAS_STATUS_SUCCESS);
        assert_eq!(got, stream);
    }
    let mut rng = Lcg(11);
    let (m, n, k, batch) = (3, 4, 5, 3);
    let (sa, sb, sc) = (m * k + 2, k * n + 1, m * n + 4);
    let a = rng.vec(sa * batch);
    let b = rng.vec(sb * batch);
    let (da, db, dc) = (upload(&a), upload(&b), alloc::<f32>(sc * batch));
    let (alpha, beta) = (2.0f32, 0.0f32);
    // SAFETY: batch matrices `stride` elements apart.
    let s = unsafe {
        cublasSgemmStridedBatched(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha,
            da as *const f32,
            m as i32,
            sa as i64,
            db as *const f32,
            k as i32,
            sb as i64,
            &beta,
            dc as *mut f32,
            m as i32,
            sc as i64,
            batch as i32,
        )
    };
    assert_eq!(s, CUBLAS_STATUS_SUCCESS);
    // SAFETY: the stream's work done before the copy (which goes on the null stream, and a
    // non-blocking stream does not synchronise with it).
    unsafe { assert_eq!(api::cuStreamSynchronize(stream), 0) };
    let got = download::<f32>(dc, sc * batch);
    for bi in 0..batch {
        let (a, b) = (to64(&a[bi * sa..]), to64(&b[bi * sb..]));
        let want = product(false, false, (m, n, k), 2.0, (&a, m), (&b, k));
        assert_close(&got[bi * sc..bi * sc + m * n], &want, 1e-6, "batched");
    }
    // SAFETY: a live handle.
    unsafe { cublasDestroy_v2(h) };
}

#[test]
fn argument_checks_have_the_documented_statuses() {
    let h = handle();
    let a = upload(&[1.0f32; 64]);
    let (alpha, beta) = (1.0f32, 0.0f32);
    let call = |h: CublasHandle, ta: u32, m: i32, n: i32, k: i32, lda: i32, ldb: i32, ldc: i32| {
        // SAFETY: the arguments are checked before any matrix is read.
        unsafe {
            cublasSgemm_v2(
                h,
                ta,
                CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha,
                a as *const f32,
                lda,
                a as *const f32,
                ldb,
                &beta,
                a as *mut f32,
                ldc,
            )
        }
    };
    let (ok, invalid, failed) = (
        CUBLAS_STATUS_SUCCESS,
        CUBLAS_STATUS_INVALID_VALUE,
        CUBLAS_STATUS_EXECUTION_FAILED,
    );
    // (op(A), [m, n, k, lda, ldb, ldc], the status, why).
    let cases = [
        (CUBLAS_OP_N, [2, 2, 2, 2, 2, 2], ok, "valid"),
        (CUBLAS_OP_N, [-1, 2, 2, 2, 2, 2], invalid, "m < 0"),
        (CUBLAS_OP_N, [2, -1, 2, 2, 2, 2], invalid, "n < 0"),
        (CUBLAS_OP_N, [2, 2, -1, 2, 2, 2], invalid, "k < 0"),
        // lda < max(1, m) for OP_N; < max(1, k) for OP_T.
        (CUBLAS_OP_N, [3, 2, 2, 2, 2, 3], invalid, "lda < m"),
        (CUBLAS_OP_T, [2, 2, 3, 2, 3, 2], invalid, "lda < k"),
        (CUBLAS_OP_T, [2, 2, 3, 3, 3, 2], ok, "lda = k"),
        // ldb < max(1, k); ldc < max(1, m).
        (CUBLAS_OP_N, [2, 2, 3, 2, 2, 2], invalid, "ldb < k"),
        (CUBLAS_OP_N, [2, 2, 2, 2, 2, 1], invalid, "ldc < m"),
        (9, [2, 2, 2, 2, 2, 2], invalid, "op none of N, T, C"),
        (CUBLAS_OP_N, [0, 2, 2, 1, 2, 1], ok, "m == 0: nothing to do"),
        // C's range past its allocation (64 floats): the emulator's device-memory check.
        (CUBLAS_OP_N, [8, 9, 1, 8, 1, 8], failed, "C out of range"),
    ];
    for (ta, [m, n, k, lda, ldb, ldc], want, why) in cases {
        assert_eq!(call(h, ta, m, n, k, lda, ldb, ldc), want, "{why}");
    }
    // A null or destroyed handle.
    assert_eq!(
        call(null_mut(), CUBLAS_OP_N, 2, 2, 2, 2, 2, 2),
        CUBLAS_STATUS_NOT_INITIALIZED
    );
    // SAFETY: a live handle, then a dead one.
    unsafe {
        assert_eq!(cublasDestroy_v2(h), CUBLAS_STATUS_SUCCESS);
        assert_eq!(cublasDestroy_v2(h), CUBLAS_STATUS_NOT_INITIALIZED);
    }
    assert_eq!(
        call(h, CUBLAS_OP_N, 2, 2, 2, 2, 2, 2),
        CUBLAS_STATUS_NOT_INITIALIZED
    );
    // Null alpha.
    let h = handle();
    // SAFETY: refused before anything is read.
    let s = unsafe {
        cublasSgemm_v2(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            1,
            1,
            1,
            std::ptr::null(),
            a as *const f32,
            1,
            a as *const f32,
            1,
            &beta,
            a as *mut f32,
            1,
        )
    };
    assert_eq!(s, CUBLAS_STATUS_INVALID_VALUE);
    // SAFETY: a live handle.
    unsafe { cublasDestroy_v2(h) };
}

//! The linear layer's products through cuBLAS. Tensors are row-major; cuBLAS is column-major,
//! so each product is written for the transposes (a row-major `[r, c]` matrix is a
//! column-major `[c, r]` one with leading dimension `c`).

use simclr_kernels::cuda::cudarc::cublas::{sys::cublasOperation_t as Op, Gemm, GemmConfig};
use simclr_kernels::cuda::cudarc::driver::CudaSlice;

use super::{cuda_err, CudaBackend};
use crate::error::Result;

fn gemm(
    b: &CudaBackend,
    (ta, tb): (Op, Op),
    (m, n, k): (usize, usize, usize),
    (a, lda): (&CudaSlice<f32>, usize),
    (bm, ldb): (&CudaSlice<f32>, usize),
    (c, ldc): (&mut CudaSlice<f32>, usize),
    beta: f32,
) -> Result<()> {
    // cuBLAS runs in the thread's current context: make it this GPU's.
    b.gpu()
        .context()
        .bind_to_thread()
        .map_err(simclr_kernels::cuda::GpuError::from)?;
    let cfg = GemmConfig {
        transa: ta,
        transb: tb,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: 1.0f32,
        lda: lda as i32,
        ldb: ldb as i32,
        beta,
        ldc: ldc as i32,
    };
    // SAFETY: the callers pass buffers holding the m x k, k x n and m x n matrices the
    // configuration describes (their shapes were checked by `ops::linear*`).
    unsafe { b.blas.gemm(cfg, a, bm, c) }.map_err(cuda_err("cublasSgemm"))
}

/// `y[n, o] = x[n, i] w[o, i]^T + beta * y`.
pub(crate) fn linear_forward(
    b: &CudaBackend,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    (n, i, o): (usize, usize, usize),
    y: &mut CudaSlice<f32>,
    beta: f32,
) -> Result<()> {
    // y^T (o x n) = w (o x i, stored as its column-major transpose) * x^T (i x n).
    gemm(
        b,
        (Op::CUBLAS_OP_T, Op::CUBLAS_OP_N),
        (o, n, i),
        (w, i),
        (x, i),
        (y, o),
        beta,
    )
}

/// `dx[n, i] = dy[n, o] w[o, i]`.
pub(crate) fn linear_dx(
    b: &CudaBackend,
    dy: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    (n, i, o): (usize, usize, usize),
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    // dx^T (i x n) = w^T (i x o) * dy^T (o x n).
    gemm(
        b,
        (Op::CUBLAS_OP_N, Op::CUBLAS_OP_N),
        (i, n, o),
        (w, i),
        (dy, o),
        (dx, i),
        0.0,
    )
}

/// `dw[o, i] = dy[n, o]^T x[n, i]`.
pub(crate) fn linear_dw(
    b: &CudaBackend,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    (n, i, o): (usize, usize, usize),
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    // dw^T (i x o) = x^T (i x n) * dy (n x o).
    gemm(
        b,
        (Op::CUBLAS_OP_N, Op::CUBLAS_OP_T),
        (i, o, n),
        (x, i),
        (dy, o),
        (dw, i),
        0.0,
    )
}

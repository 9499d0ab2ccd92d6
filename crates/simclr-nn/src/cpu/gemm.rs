//! A safe front to the `gemm` crate's f32 matrix product, with strided (transposable) views.

use gemm::Parallelism;

/// A read-only strided matrix view over a slice.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix with rows `ld` apart.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::with_ld(data, rows, cols, cols)
    }

    /// A row-major matrix whose rows start `ld` values apart.
    pub(crate) fn with_ld(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        let m = Mat {
            data,
            rows,
            cols,
            rs: ld as isize,
            cs: 1,
        };
        m.check();
        m
    }

    /// The transpose, without moving data.
    pub(crate) fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last =
            (self.rows - 1) * self.rs.unsigned_abs() + (self.cols - 1) * self.cs.unsigned_abs();
        assert!(last < self.data.len(), "matrix view exceeds its slice");
    }
}

/// How many threads one product may use.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Par {
    /// On the calling thread (inside an outer parallel loop).
    Seq,
    /// On the rayon pool.
    Pool,
}

/// `c = a * b` (or `c += a * b` with `accumulate`), `c` row-major `a.rows x b.cols` with rows
/// `ldc` apart.
pub(crate) fn matmul_ld(a: Mat, b: Mat, c: &mut [f32], ldc: usize, accumulate: bool, par: Par) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * ldc + n <= c.len(),
        "matmul: output slice too small"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = match par {
        Par::Seq => Parallelism::None,
        Par::Pool => Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: the views were bounds-checked against their slices on construction, the output
    // against `c` above, and `c` is borrowed mutably so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `c = a * b` (or `+=`) with `c` dense row-major.
pub(crate) fn matmul(a: Mat, b: Mat, c: &mut [f32], accumulate: bool, par: Par) {
    let ldc = b.cols;
    matmul_ld(a, b, c, ldc, accumulate, par)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_naive_with_transposes() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, n, k);
        let mut c = vec![0.0; m * n];
        matmul(
            Mat::row_major(&a, m, k),
            Mat::row_major(&b, k, n),
            &mut c,
            false,
            Par::Pool,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-4);
        }
        // b stored transposed (n x k), viewed through t().
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut c2 = vec![1.0; m * n];
        matmul(
            Mat::row_major(&a, m, k),
            Mat::row_major(&bt, n, k).t(),
            &mut c2,
            true,
            Par::Seq,
        );
        for (x, y) in c2.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-4);
        }
    }
}

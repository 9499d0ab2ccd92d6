//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    // SIMCLR_REPO_ROOT: a test binary built here and run elsewhere (gpu-check on the GPU
    // machine, whose copy of the repository lies at another path).
    std::env::var_os("SIMCLR_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Asserts that `got` matches `want` within relative tolerance `rtol`: both as whole tensors
/// (`|got - want| <= rtol * |want|` in the L2 norm) and element by element
/// (`|g - w| <= rtol * (|w| + mean |want|)`), and prints the first mismatches.
pub fn assert_allclose(what: &str, got: &[f32], want: &[f32], rtol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let (mut diff2, mut want2, mut mean_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff2 += (g as f64 - w as f64).powi(2);
        want2 += (w as f64).powi(2);
        mean_abs += (w as f64).abs();
    }
    mean_abs /= want.len().max(1) as f64;
    let mut bad = vec![];
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rtol * ((w as f64).abs() + mean_abs) + 1e-30;
        // Written so that a NaN on either side counts as a mismatch.
        let close = (g as f64 - w as f64).abs() <= tol;
        if !close {
            bad.push(format!("[{i}] got {g:e} want {w:e}"));
        }
    }
    let rel = (diff2 / want2.max(1e-300)).sqrt();
    assert!(
        bad.is_empty() && rel <= rtol,
        "{what}: relative L2 error {rel:.3e} (tolerance {rtol:e}); {} elements off, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

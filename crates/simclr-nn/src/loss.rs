//! Contrastive losses on projections z.

struct NtXentConfig {
    temperature: f32,
}
fn nt_xent_forward_backward(
    z: &[f32],
    m: usize,
    d: usize,
    c: &NtXentConfig,
    g: &mut [f32],
) -> std::result::Result<f32, String> {
    let n = m / 2;
    let t = c.temperature as f64;
    let u: Vec<Vec<f64>> = (0..m)
        .map(|i| {
            let r = &z[i * d..(i + 1) * d];
            let nn = r
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            r.iter().map(|v| *v as f64 / nn).collect()
        })
        .collect();
    let norms: Vec<f64> = (0..m)
        .map(|i| {
            z[i * d..(i + 1) * d]
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12)
        })
        .collect();
    let mut loss = 0.0;
    let mut gu = vec![vec![0.0f64; d]; m];
    for i in 0..m {
        let s: Vec<f64> = (0..m)
            .map(|k| u[i].iter().zip(&u[k]).map(|(a, b)| a * b).sum::<f64>() / t)
            .collect();
        let mx = (0..m)
            .filter(|&k| k != i)
            .map(|k| s[k])
            .fold(f64::MIN, f64::max);
        let se: f64 = (0..m).filter(|&k| k != i).map(|k| (s[k] - mx).exp()).sum();
        let lse = mx + se.ln();
        let pos = (i + n) % m;
        loss += lse - s[pos];
        for k in 0..m {
            if k == i {
                continue;
            }
            let p = (s[k] - lse).exp() - if k == pos { 1.0 } else { 0.0 };
            let w = p / (t * m as f64);
            for j in 0..d {
                gu[i][j] += w * u[k][j];
                gu[k][j] += w * u[i][j];
            }
        }
    }
    for i in 0..m {
        let dp: f64 = gu[i].iter().zip(&u[i]).map(|(a, b)| a * b).sum();
        for j in 0..d {
            g[i * d + j] = ((gu[i][j] - u[i][j] * dp) / norms[i]) as f32;
        }
    }
    Ok((loss / m as f64) as f32)
}

use crate::error::{NnError, Result};
use crate::tensor::Tensor;

/// NT-Xent (the normalised temperature-scaled cross entropy of SimCLR) and its gradient.
///
/// `z` is `[2N, d]`: rows `0..N` are the first view of images `0..N`, rows `N..2N` the second,
/// so the positive of row `i` is row `(i + N) mod 2N`; the other `2N - 2` rows are its negatives.
/// Returns the mean loss over the `2N` anchors and dL/dz. Runs the fused kernel, which never
/// holds the `2N x 2N` similarity matrix.
pub fn nt_xent(z: &Tensor, temperature: f32) -> Result<(f32, Tensor)> {
    z.expect_rank("nt_xent", 2)?;
    let (rows, dim) = (z.shape()[0], z.shape()[1]);
    let mut grad = vec![0.0f32; rows * dim];
    let loss = nt_xent_forward_backward(
        z.as_slice()?,
        rows,
        dim,
        &NtXentConfig { temperature },
        &mut grad,
    )
    .map_err(|e| NnError::NtXent(e.to_string()))?;
    if !loss.is_finite() {
        return Err(NnError::NonFinite {
            what: format!("NT-Xent loss ({loss})"),
        });
    }
    Ok((loss, Tensor::from_vec(z.shape(), grad)?))
}

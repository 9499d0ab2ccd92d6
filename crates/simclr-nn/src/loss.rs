//! Contrastive losses on projections z.

use simclr_kernels::cpu::ntxent::{nt_xent_forward_backward, NtXentConfig};

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

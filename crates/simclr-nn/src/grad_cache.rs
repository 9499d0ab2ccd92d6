//! Gradient caching: a contrastive batch larger than what fits in memory, on one device.
//!
//! The loss couples every pair of views, so the batch cannot simply be split into independent
//! micro-batches. Gradient caching (Gao et al., 2021) splits the work instead:
//!
//! 1. embed the batch chunk by chunk (each chunk's activations dropped once its z is known);
//! 2. compute the loss of the whole batch and its gradient with respect to every z;
//! 3. run each chunk forward again and backward from its rows of that gradient, accumulating the
//!    parameter gradients.
//!
//! Memory is one chunk's activations plus the batch's z; compute is one extra forward pass. The
//! loss and the gradients are those of the whole batch with one difference: **batch norm
//! normalises each chunk with the chunk's statistics** (as data-parallel replicas without global
//! batch norm do), so the result equals [`crate::dist`]'s step over as many replicas with
//! `global_batch_norm: false` and gathered negatives. The running statistics are updated once
//! per chunk (by the second pass only).

use crate::error::{NnError, Result};
use crate::loss::ContrastiveLoss;
use crate::model::SimClr;
use crate::optim::Optimizer;
use crate::param::{Module, Param, StateVisitor};
use crate::tensor::Tensor;
use crate::train::{check_finite_grads, StepStats};

/// Rows of chunk `c` of `chunks` in a batch of `2n` views: its images' first views, then their
/// second views.
fn chunk_rows(n: usize, chunks: usize, c: usize) -> Vec<usize> {
    let (lo, hi) = (c * n / chunks, (c + 1) * n / chunks);
    (lo..hi).chain(n + lo..n + hi).collect()
}

/// The rows of `x` at `rows`, in that order, on `x`'s device (runs of consecutive rows copied
/// at once: a chunk is two runs, so a batch on the GPU never goes through the host).
fn gather_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for &r in rows {
        match runs.last_mut() {
            Some(last) if last.end == r => last.end += 1,
            _ => runs.push(r..r + 1),
        }
    }
    crate::ops::take_rows(x, &runs)
}

/// Snapshot of the batch-norm running statistics and counters, to undo the first pass's updates.
fn buffers(model: &mut SimClr) -> (Vec<Vec<f32>>, Vec<i64>) {
    struct V(Vec<Vec<f32>>, Vec<i64>);
    impl StateVisitor for V {
        fn param(&mut self, _: &str, _: &mut Param) {}
        fn buffer(&mut self, _: &str, t: &mut Tensor) {
            self.0.push(t.try_to_vec().unwrap_or_default());
        }
        fn counter(&mut self, _: &str, v: &mut i64) {
            self.1.push(*v);
        }
    }
    let mut v = V(Vec::new(), Vec::new());
    model.visit("", &mut v);
    (v.0, v.1)
}

fn restore(model: &mut SimClr, saved: (Vec<Vec<f32>>, Vec<i64>)) {
    struct V(std::vec::IntoIter<Vec<f32>>, std::vec::IntoIter<i64>);
    impl StateVisitor for V {
        fn param(&mut self, _: &str, _: &mut Param) {}
        fn buffer(&mut self, _: &str, t: &mut Tensor) {
            let Some(v) = self.0.next() else { return };
            if v.len() != t.numel() {
                return;
            }
            if let Ok(host) = Tensor::from_vec(t.shape(), v) {
                if let Ok(back) = host.to_device(t.device()) {
                    *t = back;
                }
            }
        }
        fn counter(&mut self, _: &str, v: &mut i64) {
            if let Some(x) = self.1.next() {
                *v = x;
            }
        }
    }
    model.visit("", &mut V(saved.0.into_iter(), saved.1.into_iter()));
}

/// The loss of `views` (`[2N, c, h, w]`, first views then second views) and its gradients, left
/// in the model, computed in `chunks` chunks of `N / chunks` images. Returns the loss.
pub fn forward_backward_cached(
    model: &mut SimClr,
    views: &Tensor,
    chunks: usize,
    loss: &ContrastiveLoss,
) -> Result<f32> {
    let rows = views.shape().first().copied().unwrap_or(0);
    let n = rows / 2;
    if rows % 2 != 0 || chunks == 0 || chunks > n {
        return Err(NnError::Invalid {
            op: "gradient caching",
            msg: format!(
                "{rows} views (two per image) cannot be cut into {chunks} chunks of images"
            ),
        });
    }
    model.zero_grad();
    // Pass 1: z of every chunk, no activations kept beyond the chunk (the next forward replaces
    // them); the running statistics are put back afterwards.
    let saved = buffers(model);
    let mut z_all: Option<Vec<f32>> = None;
    let mut dim = 0;
    for c in 0..chunks {
        let idx = chunk_rows(n, chunks, c);
        let (_, z) = model.forward(&gather_rows(views, &idx)?, true)?;
        if !z.try_all_finite()? {
            restore(model, saved);
            return Err(NnError::NonFinite {
                what: format!("the projections z of chunk {c} (the weights or the input overflow)"),
            });
        }
        dim = z.shape()[1];
        let all = z_all.get_or_insert_with(|| vec![0.0; rows * dim]);
        let zh = z.try_to_vec()?;
        for (k, &r) in idx.iter().enumerate() {
            all[r * dim..(r + 1) * dim].copy_from_slice(&zh[k * dim..(k + 1) * dim]);
        }
    }
    restore(model, saved);
    let z = Tensor::from_vec(&[rows, dim], z_all.unwrap_or_default())?
        .to_device(model.encoder.device())?;
    // The whole batch's loss and dL/dz.
    let (l, dz) = loss.forward_backward(&z)?;
    // Pass 2: each chunk again, backward from its rows of dL/dz.
    for c in 0..chunks {
        let idx = chunk_rows(n, chunks, c);
        model.forward(&gather_rows(views, &idx)?, true)?;
        model.backward(&gather_rows(&dz, &idx)?)?;
    }
    Ok(l)
}

/// [`forward_backward_cached`], a check that every gradient is finite, and the optimiser's update.
pub fn train_step_cached(
    model: &mut SimClr,
    views: &Tensor,
    chunks: usize,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    loss: &ContrastiveLoss,
) -> Result<StepStats> {
    let l = forward_backward_cached(model, views, chunks, loss)?;
    check_finite_grads(model)?;
    if !l.is_finite() {
        return Err(NnError::NonFinite {
            what: "the loss".into(),
        });
    }
    optimizer.step(model, lr)?;
    crate::buffers::end_step();
    Ok(StepStats { loss: l, lr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_once_with_both_views() {
        let mut all: Vec<usize> = (0..3).flat_map(|c| chunk_rows(10, 3, c)).collect();
        assert_eq!(chunk_rows(10, 3, 0), vec![0, 1, 2, 10, 11, 12]);
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }
}

//! Contrastive losses on projections z.

use simclr_kernels::cpu::ntxent::{nt_xent_forward_backward, NtXentConfig};

use crate::error::{NnError, Result};
use crate::tensor::{Device, Tensor};

/// NT-Xent (the normalised temperature-scaled cross entropy of SimCLR) and its gradient.
///
/// `z` is `[2N, d]`: rows `0..N` are the first view of images `0..N`, rows `N..2N` the second,
/// so the positive of row `i` is row `(i + N) mod 2N`; the other `2N - 2` rows are its negatives.
/// Returns the mean loss over the `2N` anchors and dL/dz. Runs the fused kernel, which never
/// holds the `2N x 2N` similarity matrix.
pub fn nt_xent(z: &Tensor, temperature: f32) -> Result<(f32, Tensor)> {
    z.expect_rank("nt_xent", 2)?;
    let (rows, dim) = (z.shape()[0], z.shape()[1]);
    if let Device::Cuda(_) = z.device() {
        let (loss, grad) = crate::cuda::ops::nt_xent(z, temperature)?;
        return finite_loss(loss).map(|l| (l, grad));
    }
    let mut grad = vec![0.0f32; rows * dim];
    let loss = nt_xent_forward_backward(
        z.as_slice()?,
        rows,
        dim,
        &NtXentConfig { temperature },
        &mut grad,
    )
    .map_err(|e| NnError::NtXent(e.to_string()))?;
    Ok((finite_loss(loss)?, Tensor::from_vec(z.shape(), grad)?))
}

fn finite_loss(loss: f32) -> Result<f32> {
    if !loss.is_finite() {
        return Err(NnError::NonFinite {
            what: format!("NT-Xent loss ({loss})"),
        });
    }
    Ok(loss)
}

/// The contrastive objectives of the paper's loss ablation (its table 2), all on the cosine
/// similarities `s_ik = u_i . u_k` of the L2-normalised rows `u` of `z`, with the positive of
/// row `i` at `(i + N) mod 2N` and the other `2N - 2` rows as negatives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ContrastiveLoss {
    /// NT-Xent, SimCLR's loss (the fused kernel; see [`nt_xent`]).
    NtXent {
        /// Temperature.
        temperature: f32,
    },
    /// NT-Logistic: `-log sigmoid(s_ip / t)` for the positive plus the mean over the negatives
    /// of `-log sigmoid(-s_ik / t)` (positive and negatives weighted equally), averaged over
    /// anchors.
    NtLogistic {
        /// Temperature.
        temperature: f32,
    },
    /// Margin triplet: the mean of `max(0, s_ik - s_ip + margin)` over the negatives, averaged
    /// over anchors. With semi-hard mining only the negatives with `s_ip - margin < s_ik <
    /// s_ip` count (the hardest negative when there is none).
    MarginTriplet {
        /// Margin.
        margin: f32,
        /// Semi-hard negative mining.
        semi_hard: bool,
    },
}

impl ContrastiveLoss {
    /// The mean loss and dL/dz.
    pub fn forward_backward(&self, z: &Tensor) -> Result<(f32, Tensor)> {
        match *self {
            ContrastiveLoss::NtXent { temperature } => nt_xent(z, temperature),
            // The ablation losses run on the host at the small batches they are for.
            _ if z.device() != Device::Cpu => {
                let (loss, grad) = self.pairwise(&z.to_device(Device::Cpu)?)?;
                Ok((loss, grad.to_device(z.device())?))
            }
            _ => self.pairwise(z),
        }
    }

    /// The losses other than NT-Xent, with the full similarity matrix: they are for ablations
    /// at small batches, not the fused path.
    fn pairwise(&self, z: &Tensor) -> Result<(f32, Tensor)> {
        z.expect_rank("contrastive loss", 2)?;
        let (rows, d) = (z.shape()[0], z.shape()[1]);
        if rows < 4 || rows % 2 != 0 {
            return Err(NnError::NtXent(format!(
                "{rows} rows: need an even number, at least 4 (two views of two images)"
            )));
        }
        let x = z.as_slice()?;
        let norms: Vec<f32> = x
            .chunks(d)
            .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12))
            .collect();
        let u: Vec<f32> = x
            .chunks(d)
            .zip(&norms)
            .flat_map(|(r, n)| r.iter().map(move |v| v / n))
            .collect();
        let n = rows / 2;
        let sim = |i: usize, k: usize| -> f32 {
            u[i * d..(i + 1) * d]
                .iter()
                .zip(&u[k * d..(k + 1) * d])
                .map(|(a, b)| a * b)
                .sum()
        };
        // dL/ds for every (anchor, other) pair.
        let mut ds = vec![0.0f32; rows * rows];
        let mut total = 0.0f64;
        let sigmoid = |v: f32| 1.0 / (1.0 + (-v).exp());
        // -log sigmoid(v), stably.
        let softplus_neg = |v: f32| {
            if v > 0.0 {
                (-v).exp().ln_1p()
            } else {
                -v + v.exp().ln_1p()
            }
        };
        let negs = (rows - 2) as f32;
        for i in 0..rows {
            let p = (i + n) % rows;
            let sp = sim(i, p);
            match *self {
                ContrastiveLoss::NtLogistic { temperature: t } => {
                    total += softplus_neg(sp / t) as f64;
                    ds[i * rows + p] += -(1.0 - sigmoid(sp / t)) / t;
                    for k in (0..rows).filter(|&k| k != i && k != p) {
                        let sk = sim(i, k);
                        total += (softplus_neg(-sk / t) / negs) as f64;
                        ds[i * rows + k] += sigmoid(sk / t) / t / negs;
                    }
                }
                ContrastiveLoss::MarginTriplet { margin, semi_hard } => {
                    let others: Vec<(usize, f32)> = (0..rows)
                        .filter(|&k| k != i && k != p)
                        .map(|k| (k, sim(i, k)))
                        .collect();
                    let mut chosen: Vec<(usize, f32)> = if semi_hard {
                        others
                            .iter()
                            .copied()
                            .filter(|&(_, s)| s < sp && s > sp - margin)
                            .collect()
                    } else {
                        others.clone()
                    };
                    if chosen.is_empty() {
                        let hardest = others
                            .iter()
                            .copied()
                            .fold((0, f32::NEG_INFINITY), |b, o| if o.1 > b.1 { o } else { b });
                        chosen.push(hardest);
                    }
                    let w = 1.0 / chosen.len() as f32;
                    for (k, sk) in chosen {
                        let hinge = sk - sp + margin;
                        if hinge > 0.0 {
                            total += (w * hinge) as f64;
                            ds[i * rows + k] += w;
                            ds[i * rows + p] -= w;
                        }
                    }
                }
                ContrastiveLoss::NtXent { .. } => unreachable!("handled by the fused kernel"),
            }
        }
        let scale = 1.0 / rows as f32;
        let loss = (total / rows as f64) as f32;
        if !loss.is_finite() {
            return Err(NnError::NonFinite {
                what: format!("contrastive loss ({loss})"),
            });
        }
        // s_ik = u_i . u_k, so dL/du_i = sum_k (ds_ik + ds_ki) u_k; then through u = z / |z|.
        let mut grad = vec![0.0f32; rows * d];
        for i in 0..rows {
            let mut du = vec![0.0f32; d];
            for k in 0..rows {
                let g = (ds[i * rows + k] + ds[k * rows + i]) * scale;
                if g != 0.0 {
                    for (a, b) in du.iter_mut().zip(&u[k * d..(k + 1) * d]) {
                        *a += g * b;
                    }
                }
            }
            let ui = &u[i * d..(i + 1) * d];
            let dot: f32 = du.iter().zip(ui).map(|(a, b)| a * b).sum();
            for j in 0..d {
                grad[i * d + j] = (du[j] - ui[j] * dot) / norms[i];
            }
        }
        Ok((loss, Tensor::from_vec(z.shape(), grad)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z() -> Tensor {
        let v: Vec<f32> = (0..8 * 5)
            .map(|i| ((i as f32) * 0.77).sin() + 0.1)
            .collect();
        Tensor::from_vec(&[8, 5], v).unwrap()
    }

    fn check_gradient(loss: ContrastiveLoss) {
        let z = z();
        let (l, g) = loss.forward_backward(&z).unwrap();
        assert!(l.is_finite());
        let g = g.to_vec();
        let base = z.to_vec();
        let eps = 1e-3;
        for j in 0..base.len() {
            let mut plus = base.clone();
            plus[j] += eps;
            let mut minus = base.clone();
            minus[j] -= eps;
            let lp = loss
                .forward_backward(&Tensor::from_vec(&[8, 5], plus).unwrap())
                .unwrap()
                .0;
            let lm = loss
                .forward_backward(&Tensor::from_vec(&[8, 5], minus).unwrap())
                .unwrap()
                .0;
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[j]).abs() < 2e-3 + 2e-2 * fd.abs(),
                "{loss:?} dz[{j}]: {fd} vs {}",
                g[j]
            );
        }
    }

    #[test]
    fn nt_logistic_gradient_matches_finite_differences() {
        check_gradient(ContrastiveLoss::NtLogistic { temperature: 0.5 });
    }

    #[test]
    fn margin_triplet_gradient_matches_finite_differences() {
        check_gradient(ContrastiveLoss::MarginTriplet {
            margin: 0.5,
            semi_hard: false,
        });
        check_gradient(ContrastiveLoss::MarginTriplet {
            margin: 0.5,
            semi_hard: true,
        });
    }

    #[test]
    fn losses_are_scale_invariant_and_reward_aligned_positives() {
        for loss in [
            ContrastiveLoss::NtLogistic { temperature: 0.5 },
            ContrastiveLoss::MarginTriplet {
                margin: 0.5,
                semi_hard: false,
            },
        ] {
            let a = loss.forward_backward(&z()).unwrap().0;
            let scaled =
                Tensor::from_vec(&[8, 5], z().to_vec().iter().map(|v| v * 3.0).collect()).unwrap();
            assert!((a - loss.forward_backward(&scaled).unwrap().0).abs() < 1e-5);
            // Views that coincide with orthogonal images: the lowest loss of the three setups.
            let mut v = vec![0.0f32; 8 * 5];
            for i in 0..4 {
                v[i * 5 + i] = 1.0;
                v[(i + 4) * 5 + i] = 1.0;
            }
            let aligned = loss
                .forward_backward(&Tensor::from_vec(&[8, 5], v).unwrap())
                .unwrap()
                .0;
            assert!(aligned < a, "{loss:?}: aligned {aligned} vs random {a}");
        }
        assert!(ContrastiveLoss::NtLogistic { temperature: 0.5 }
            .forward_backward(&Tensor::zeros(&[3, 2], crate::Device::Cpu))
            .is_err());
    }
}

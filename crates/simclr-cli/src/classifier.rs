//! The linear classifier of linear evaluation, trained on frozen features, and the softmax
//! cross-entropy it shares with the online probe.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use simclr_nn::layers::Linear;
use simclr_nn::{Module, Optimizer, Sgd, Tensor, WarmupCosine};

use crate::error::{CliError, Result};
use crate::features::Features;

/// Top-1 and top-5 accuracy, in percent.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Accuracy {
    /// Top-1.
    pub top1: f64,
    /// Top-5 (equal to 100 with five classes or fewer).
    pub top5: f64,
}

/// Mean softmax cross-entropy of `logits` (`[n, classes]`) at `labels`, its gradient with
/// respect to the logits, and how many rows are right at top-1.
pub fn softmax_cross_entropy(
    logits: &[f32],
    classes: usize,
    labels: &[u32],
) -> (f32, Vec<f32>, usize) {
    let n = labels.len();
    let mut grad = vec![0.0; logits.len()];
    let mut loss = 0.0f64;
    let mut correct = 0;
    for (i, &y) in labels.iter().enumerate() {
        let row = &logits[i * classes..(i + 1) * classes];
        let g = &mut grad[i * classes..(i + 1) * classes];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for (gj, &v) in g.iter_mut().zip(row) {
            *gj = (v - max).exp();
            sum += *gj;
        }
        let argmax = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (j, &v)| if v > b.1 { (j, v) } else { b },
            )
            .0;
        correct += usize::from(argmax == y as usize);
        loss += (sum.ln() - (row[y as usize] - max)) as f64;
        for gj in g.iter_mut() {
            *gj /= sum * n as f32;
        }
        g[y as usize] -= 1.0 / n as f32;
    }
    ((loss / n.max(1) as f64) as f32, grad, correct)
}

/// Top-1 and top-5 accuracy of `logits` at `labels`.
pub fn accuracy(logits: &[f32], classes: usize, labels: &[u32]) -> Accuracy {
    let (mut top1, mut top5) = (0usize, 0usize);
    for (i, &y) in labels.iter().enumerate() {
        let row = &logits[i * classes..(i + 1) * classes];
        let target = row[y as usize];
        // Rank of the true class: how many classes score strictly higher (ties favour it).
        let higher = row.iter().filter(|&&v| v > target).count();
        top1 += usize::from(higher == 0);
        top5 += usize::from(higher < 5);
    }
    let n = labels.len().max(1) as f64;
    Accuracy {
        top1: 100.0 * top1 as f64 / n,
        top5: 100.0 * top5 as f64 / n,
    }
}

/// How the classifier is trained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearEvalConfig {
    /// Epochs over the features.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Learning rate per 256 (scaled linearly), Nesterov momentum 0.9, cosine decay.
    pub lr: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Seed of the initialisation and of the shuffling.
    pub seed: u64,
}

/// A linear classifier over standardised features.
#[derive(Clone, Debug)]
pub struct LinearClassifier {
    layer: Linear,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    classes: usize,
}

fn labelled(f: &Features, what: &str) -> Result<()> {
    if f.is_empty() {
        return Err(CliError::Usage(format!("no {what} images to evaluate on")));
    }
    if f.labels.contains(&u32::MAX) {
        return Err(CliError::Usage(format!("some {what} images have no label")));
    }
    Ok(())
}

impl LinearClassifier {
    /// Trains on `train` (`classes` classes).
    pub fn train(
        train: &Features,
        classes: usize,
        cfg: &LinearEvalConfig,
    ) -> Result<LinearClassifier> {
        labelled(train, "training")?;
        if let Some(&bad) = train.labels.iter().find(|&&l| l as usize >= classes) {
            return Err(CliError::Usage(format!(
                "label {bad} is not below the {classes} classes"
            )));
        }
        let (n, d) = (train.len(), train.dim);
        // Standardised features make one learning rate fit every encoder (and raw pixels).
        let mut mean = vec![0.0f64; d];
        let mut sq = vec![0.0f64; d];
        for i in 0..n {
            for (j, &v) in train.row(i).iter().enumerate() {
                mean[j] += v as f64;
                sq[j] += (v as f64) * (v as f64);
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();
        let inv_std: Vec<f32> = sq
            .iter()
            .zip(&mean)
            .map(|(s, &m)| {
                let var = (s / n as f64 - (m as f64) * (m as f64)).max(0.0);
                (1.0 / (var.sqrt() + 1e-6)) as f32
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut me = LinearClassifier {
            layer: Linear::new(d, classes, true, &mut rng),
            mean,
            inv_std,
            classes,
        };
        let bs = cfg.batch_size.clamp(1, n);
        let steps_per_epoch = n.div_ceil(bs);
        let schedule = WarmupCosine {
            peak: cfg.lr * bs as f32 / 256.0,
            warmup_steps: 0,
            total_steps: (cfg.epochs * steps_per_epoch) as u64,
        };
        let mut opt = Sgd::new(0.9, true, cfg.weight_decay);
        let mut order: Vec<usize> = (0..n).collect();
        let mut step = 0u64;
        for _ in 0..cfg.epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(bs) {
                let x = me.standardise(chunk.iter().map(|&i| train.row(i)), chunk.len())?;
                let y: Vec<u32> = chunk.iter().map(|&i| train.labels[i]).collect();
                me.layer.zero_grad();
                let logits = me.layer.forward(&x, true)?;
                let (_, g, _) = softmax_cross_entropy(logits.as_slice()?, classes, &y);
                me.layer
                    .backward(&Tensor::from_vec(&[chunk.len(), classes], g)?, false)?;
                opt.step(&mut me.layer, schedule.lr(step))?;
                step += 1;
            }
        }
        Ok(me)
    }

    fn standardise<'a>(&self, rows: impl Iterator<Item = &'a [f32]>, n: usize) -> Result<Tensor> {
        let d = self.mean.len();
        let mut x = Vec::with_capacity(n * d);
        for r in rows {
            x.extend(
                r.iter()
                    .zip(&self.mean)
                    .zip(&self.inv_std)
                    .map(|((v, m), s)| (v - m) * s),
            );
        }
        Ok(Tensor::from_vec(&[n, d], x)?)
    }

    /// Logits `[n, classes]` for `f`.
    pub fn logits(&mut self, f: &Features) -> Result<Vec<f32>> {
        if f.dim != self.mean.len() {
            return Err(CliError::Usage(format!(
                "features of size {} for a classifier of size {}",
                f.dim,
                self.mean.len()
            )));
        }
        let mut out = Vec::with_capacity(f.len() * self.classes);
        for start in (0..f.len()).step_by(1024) {
            let end = (start + 1024).min(f.len());
            let x = self.standardise((start..end).map(|i| f.row(i)), end - start)?;
            out.extend_from_slice(self.layer.forward(&x, false)?.as_slice()?);
        }
        Ok(out)
    }

    /// Accuracy on `test`.
    pub fn evaluate(&mut self, test: &Features) -> Result<Accuracy> {
        labelled(test, "test")?;
        let logits = self.logits(test)?;
        Ok(accuracy(&logits, self.classes, &test.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_matches_its_definition_and_gradient() {
        let logits = [1.0, 2.0, 0.5, -1.0, 0.0, 3.0];
        let labels = [1, 2];
        let (loss, grad, correct) = softmax_cross_entropy(&logits, 3, &labels);
        let ce = |r: &[f32], y: usize| {
            let s: f32 = r.iter().map(|v| v.exp()).sum();
            s.ln() - r[y]
        };
        let expect = (ce(&logits[..3], 1) + ce(&logits[3..], 2)) / 2.0;
        assert!((loss - expect).abs() < 1e-6);
        assert_eq!(correct, 2);
        for k in 0..6 {
            let mut p = logits;
            p[k] += 1e-3;
            let (lp, _, _) = softmax_cross_entropy(&p, 3, &labels);
            assert!(((lp - loss) / 1e-3 - grad[k]).abs() < 1e-3, "d/dlogit {k}");
        }
    }

    #[test]
    fn top5_counts_ranks() {
        let logits: Vec<f32> = (0..7).map(|v| v as f32).collect();
        // Class 6 is top-1; class 2 has four above it (top-5); class 1 has five above it.
        assert_eq!(accuracy(&logits, 7, &[6]).top1, 100.0);
        assert_eq!(
            accuracy(&logits, 7, &[2]),
            Accuracy {
                top1: 0.0,
                top5: 100.0
            }
        );
        assert_eq!(accuracy(&logits, 7, &[1]).top5, 0.0);
    }

    #[test]
    fn separable_features_are_learned() {
        // Two Gaussian blobs in 3 dimensions, one per class.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for i in 0..200 {
            let y = (i % 2) as u32;
            let c = if y == 0 { -1.0 } else { 1.0 };
            for _ in 0..3 {
                data.push(c + rand::Rng::random_range(&mut rng, -0.8..0.8f32));
            }
            labels.push(y);
        }
        let f = Features {
            data,
            dim: 3,
            labels,
        };
        let cfg = LinearEvalConfig {
            epochs: 20,
            batch_size: 32,
            lr: 0.5,
            weight_decay: 0.0,
            seed: 0,
        };
        let mut clf = LinearClassifier::train(&f, 2, &cfg).unwrap();
        assert!(clf.evaluate(&f).unwrap().top1 > 95.0);
    }
}

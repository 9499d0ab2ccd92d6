//! The paper's semi-supervised protocol: fine-tune the whole encoder with a new linear layer on
//! a class-balanced, reproducible subset of the labels (1%, 10% or all), Nesterov SGD without
//! warm-up and a cosine decay, augmented with crop and flip only.

use std::path::Path;
use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use simclr_data::{label_subset, AugmentConfig, Augmentation, Dataset, Loader, LoaderConfig};
use simclr_nn::layers::Linear;
use simclr_nn::{Module, Optimizer, Sgd, SimClr, Tensor, WarmupCosine};

use crate::classifier::{accuracy, softmax_cross_entropy, Accuracy};
use crate::config::Config;
use crate::data::DataSplits;
use crate::error::{CliError, Result};

/// How to fine-tune.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FinetuneConfig {
    /// Fraction of the training labels used, class-balanced (the paper's 0.01 and 0.1, or 1).
    pub fraction: f64,
    /// Epochs over the subset (the paper: 60 for 1%, 30 for 10%).
    pub epochs: usize,
    /// Batch size (at most the subset's size).
    pub batch_size: usize,
    /// Learning rate per 256 images (the paper: 0.05), scaled linearly with the batch.
    pub lr: f32,
    /// Weight decay (the paper uses none).
    pub weight_decay: f32,
    /// Seed of the subset, the classifier's initialisation and the shuffling.
    pub seed: u64,
}

/// The most epochs a fine-tuning may ask for (as `eval.linear_epochs`): more is a typo, and
/// fine-tuning has no step limit that would bound it.
pub const MAX_FINETUNE_EPOCHS: usize = 100_000;

impl FinetuneConfig {
    /// An error naming the option (`--lr`, `--epochs`, `--batch-size`) whose value cannot train.
    pub fn check(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1e6) {
            return Err(CliError::Usage(format!(
                "finetune: --lr {}: it must be a finite number above 0 (at most 1e6)",
                self.lr
            )));
        }
        if !(1..=MAX_FINETUNE_EPOCHS).contains(&self.epochs) {
            return Err(CliError::Usage(format!(
                "finetune: --epochs {}: the allowed range is 1..={MAX_FINETUNE_EPOCHS}",
                self.epochs
            )));
        }
        if self.batch_size == 0 {
            return Err(CliError::Usage(
                "finetune: --batch-size 0: it must be at least 1".into(),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(CliError::Usage(format!(
                "finetune: weight decay {}: it must be a finite number, 0 or more",
                self.weight_decay
            )));
        }
        Ok(())
    }

    /// The paper's settings for `fraction` of the labels.
    pub fn paper(fraction: f64, seed: u64) -> FinetuneConfig {
        FinetuneConfig {
            fraction,
            epochs: if fraction <= 0.01 { 60 } else { 30 },
            batch_size: 256,
            lr: 0.05,
            weight_decay: 0.0,
            seed,
        }
    }
}

/// Parses `1%`, `10%`, `100%` or a fraction like `0.05`.
pub fn parse_fraction(s: &str) -> Result<f64> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| {
        CliError::Usage(format!(
            "--labels {s}: expected 1%, 10%, 100% or a fraction"
        ))
    })?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(CliError::Usage(format!("--labels {s}: not in (0, 100%]")));
    }
    Ok(v)
}

/// The result of fine-tuning.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FinetuneReport {
    /// Labelled images used.
    pub labelled_images: usize,
    /// Steps taken.
    pub steps: u64,
    /// Accuracy on the test split.
    pub test: Accuracy,
}

fn logits_of(model: &mut SimClr, fc: &mut Linear, x: &Tensor, train: bool) -> Result<Tensor> {
    let h = model.encoder.forward(x, train)?;
    Ok(fc.forward(&h, train)?)
}

/// Fine-tunes `model`'s encoder with a new linear layer; returns the report and the layer.
pub fn finetune(
    model: &mut SimClr,
    splits: &DataSplits,
    cfg: &Config,
    ft: &FinetuneConfig,
    progress: &mut dyn FnMut(u64, u64, f32),
) -> Result<(FinetuneReport, Linear)> {
    ft.check()?;
    let classes = splits.train.num_classes();
    let subset: Arc<dyn Dataset> = if ft.fraction < 1.0 {
        Arc::new(label_subset(splits.train.clone(), ft.fraction, ft.seed)?)
    } else {
        splits.train.clone()
    };
    let n = subset.len();
    let mut aug = AugmentConfig::linear_eval(cfg.data.image_size);
    aug.normalize = cfg.augment.normalize.constants();
    let batch = ft.batch_size.clamp(1, n);
    let loader = Loader::new(
        subset,
        Augmentation::new(aug)?,
        LoaderConfig {
            batch_size: batch,
            views: 1,
            seed: ft.seed,
            drop_last: false,
            threads: cfg.data.threads,
            errors: cfg.data.error_policy(),
            ..LoaderConfig::default()
        },
    )?;
    let steps_per_epoch = loader.batches_per_epoch() as u64;
    let total = steps_per_epoch * ft.epochs as u64;
    let schedule = WarmupCosine {
        peak: ft.lr * batch as f32 / 256.0,
        warmup_steps: 0,
        total_steps: total,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(ft.seed ^ 0xf17e);
    let mut fc = Linear::new(model.encoder.feature_dim(), classes, true, &mut rng);
    let (mut opt_enc, mut opt_fc) = (
        Sgd::new(0.9, true, ft.weight_decay),
        Sgd::new(0.9, true, ft.weight_decay),
    );
    let mut step = 0u64;
    for epoch in 0..ft.epochs as u64 {
        for b in loader.epoch(epoch) {
            let b = b?;
            let [bn, c, h, w] = b.shape();
            let x = Tensor::from_slice(
                &[bn, c, h, w],
                b.view_f32(0)
                    .ok_or_else(|| CliError::Usage("the loader gave no f32 pixels".into()))?,
            )?;
            let labels = b
                .labels
                .clone()
                .ok_or_else(|| CliError::Usage("fine-tuning needs labelled images".into()))?;
            model.encoder.zero_grad();
            fc.zero_grad();
            let logits = logits_of(model, &mut fc, &x, true)?;
            let (loss, g, _) = softmax_cross_entropy(logits.as_slice()?, classes, &labels);
            if !loss.is_finite() {
                return Err(CliError::Diverged {
                    step,
                    what: format!("fine-tuning loss {loss}"),
                    checkpoint: "none (fine-tuning keeps no checkpoint)".into(),
                });
            }
            let dh = fc
                .backward(&Tensor::from_vec(&[bn, classes], g)?, true)?
                .expect("asked for dx");
            model.encoder.backward(&dh)?;
            let lr = schedule.lr(step);
            opt_enc.step(&mut model.encoder, lr)?;
            opt_fc.step(&mut fc, lr)?;
            simclr_nn::buffers::end_step();
            step += 1;
            progress(step, total, loss);
        }
    }
    // Test accuracy with the evaluation transform.
    let eval = crate::features::eval_augmentation(cfg)?;
    let test_loader = Loader::new(
        splits.test.clone(),
        eval,
        LoaderConfig {
            threads: cfg.data.threads,
            errors: cfg.data.error_policy(),
            ..LoaderConfig::eval(256)
        },
    )?;
    let (mut all_logits, mut all_labels) = (Vec::new(), Vec::new());
    for b in test_loader.epoch(0) {
        let b = b?;
        let [bn, c, h, w] = b.shape();
        let x = Tensor::from_slice(&[bn, c, h, w], b.view_f32(0).unwrap_or(&[]))?;
        all_logits.extend_from_slice(logits_of(model, &mut fc, &x, false)?.as_slice()?);
        all_labels.extend(
            b.indices
                .iter()
                .map(|&i| splits.test.label(i).unwrap_or(u32::MAX)),
        );
    }
    if all_labels.contains(&u32::MAX) {
        return Err(CliError::Usage("some test images have no label".into()));
    }
    Ok((
        FinetuneReport {
            labelled_images: n,
            steps: step,
            test: accuracy(&all_logits, classes, &all_labels),
        },
        fc,
    ))
}

/// Writes the fine-tuned network as one torchvision ResNet state dict: the encoder's names and
/// `fc.weight`, `fc.bias`.
pub fn save_classifier(
    model: &mut SimClr,
    fc: &mut Linear,
    path: &Path,
    cfg: &Config,
) -> Result<()> {
    crate::export::save_torchvision(model, Some(fc), path, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_fractions_parse() {
        assert_eq!(parse_fraction("1%").unwrap(), 0.01);
        assert_eq!(parse_fraction("10%").unwrap(), 0.1);
        assert_eq!(parse_fraction("100%").unwrap(), 1.0);
        assert_eq!(parse_fraction("0.25").unwrap(), 0.25);
        assert!(parse_fraction("0%").is_err());
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("lots")
            .unwrap_err()
            .to_string()
            .contains("lots"));
    }

    #[test]
    fn paper_epochs() {
        assert_eq!(FinetuneConfig::paper(0.01, 0).epochs, 60);
        assert_eq!(FinetuneConfig::paper(0.1, 0).epochs, 30);
    }
}

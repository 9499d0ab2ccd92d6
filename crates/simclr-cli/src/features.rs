//! Representations of a whole data set from a frozen model: h (encoder) or z (head), computed
//! once in evaluation mode with the deterministic evaluation transform.

use std::sync::Arc;

use simclr_data::{AugmentConfig, Augmentation, Dataset, Loader, LoaderConfig};
use simclr_nn::{SimClr, Tensor};

use crate::config::Config;
use crate::data::SkipLog;
use crate::error::{CliError, Result};

/// Which representation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Representation {
    /// h = f(x), the encoder's output (what the paper evaluates).
    H,
    /// z = g(h), the projection head's output.
    Z,
    /// The normalised pixels themselves (the raw-pixel baseline).
    Pixels,
}

/// Row-major features `[n, dim]` with the label of every row.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    /// The values.
    pub data: Vec<f32>,
    /// Values per row.
    pub dim: usize,
    /// Labels (`u32::MAX` where the image has none).
    pub labels: Vec<u32>,
}

impl Features {
    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// The evaluation transform of `cfg`: resize, centre crop, normalise; no randomness.
pub fn eval_augmentation(cfg: &Config) -> Result<Augmentation> {
    let resize = (cfg.data.eval_resize > 0).then_some(cfg.data.eval_resize);
    let mut a = AugmentConfig::eval(cfg.data.image_size, resize);
    a.normalize = cfg.augment.normalize.constants();
    Ok(Augmentation::new(a)?)
}

/// Computes `rep` for every image of `ds`, in order, `batch` images at a time. With
/// `data.skip_bad_images`, unreadable images are reported on stderr and have no row.
pub fn extract(
    model: &mut SimClr,
    ds: Arc<dyn Dataset>,
    cfg: &Config,
    rep: Representation,
    batch: usize,
) -> Result<Features> {
    extract_logged(model, ds, cfg, rep, batch, &mut SkipLog::default())
}

/// [`extract`], reporting through `log` only the unreadable images it has not reported yet
/// (for a run that extracts the same data set again every few epochs).
pub fn extract_logged(
    model: &mut SimClr,
    ds: Arc<dyn Dataset>,
    cfg: &Config,
    rep: Representation,
    batch: usize,
    log: &mut SkipLog,
) -> Result<Features> {
    let aug = eval_augmentation(cfg)?;
    let loader_cfg = LoaderConfig {
        threads: cfg.data.threads,
        prefetch: cfg.data.prefetch.max(1),
        errors: cfg.data.error_policy(),
        ..LoaderConfig::eval(batch.max(1))
    };
    let loader = Loader::new(ds.clone(), aug, loader_cfg)?;
    let mut data = Vec::new();
    let mut labels = Vec::with_capacity(ds.len());
    let mut dim = 0;
    let mut skipped = 0;
    for b in loader.epoch(0) {
        let b = b?;
        log.report(ds.as_ref(), &b.skipped_images);
        skipped += b.skipped;
        if b.is_empty() {
            continue;
        }
        let [n, c, hh, ww] = b.shape();
        let pixels = b
            .view_f32(0)
            .ok_or_else(|| CliError::Usage("the evaluation loader gave no f32 pixels".into()))?;
        let rows: Vec<f32> = match rep {
            Representation::Pixels => pixels.to_vec(),
            Representation::H | Representation::Z => {
                let x = Tensor::from_slice(&[n, c, hh, ww], pixels)?;
                let (h, z) = if rep == Representation::H {
                    (model.encoder.forward(&x, false)?, None)
                } else {
                    let (h, z) = model.forward(&x, false)?;
                    (h, Some(z))
                };
                z.unwrap_or(h).to_vec()
            }
        };
        // Each batch is a step for the buffer cache: it keeps what the next batch will need.
        simclr_nn::buffers::end_step();
        dim = rows.len() / n.max(1);
        data.extend_from_slice(&rows);
        match &b.labels {
            Some(l) => labels.extend_from_slice(l),
            None => labels.extend(b.indices.iter().map(|&i| ds.label(i).unwrap_or(u32::MAX))),
        }
    }
    if skipped > 0 {
        if labels.is_empty() {
            return Err(CliError::Usage(format!(
                "none of the {} images of the {} can be read (each is named above): fix or \
                 replace them",
                ds.len(),
                crate::data::describe(&cfg.data)
            )));
        }
        eprintln!(
            "warning: skipped {skipped} unreadable images of {} while extracting features",
            ds.len()
        );
    }
    if data.iter().any(|v| !v.is_finite()) {
        return Err(CliError::Usage(
            "the model gives NaN or infinite features; is the checkpoint from a diverged run?"
                .into(),
        ));
    }
    Ok(Features { data, dim, labels })
}

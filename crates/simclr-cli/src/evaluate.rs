//! Evaluation of a pre-trained encoder: linear evaluation on frozen features (the paper's
//! protocol, features computed once) and k-NN, beside the baselines the quick start compares.

use std::path::{Path, PathBuf};

use simclr_nn::{Checkpoint, Device, SimClr};

use crate::classifier::{Accuracy, LinearClassifier, LinearEvalConfig};
use crate::config::Config;
use crate::data::DataSplits;
use crate::error::{CliError, Result};
use crate::features::{extract, Representation};
use crate::knn::knn_accuracy;
use crate::state::{self, ApplyCheckpoint};

/// A run folder's configuration and model: `config.toml` and `checkpoints/last.safetensors`,
/// or `checkpoint` when given (a run checkpoint, an exported encoder or a torchvision file).
pub fn load_run(
    run_dir: &Path,
    checkpoint: Option<&Path>,
    overrides: &[String],
) -> Result<(Config, SimClr)> {
    let cfg_path = run_dir.join("config.toml");
    if !cfg_path.exists() {
        return Err(crate::error::io_err(
            &cfg_path,
            "no config.toml: not a run folder",
        ));
    }
    let mut cfg = Config::build(None, Some(&cfg_path), overrides)?;
    cfg.output.dir = run_dir.to_path_buf();
    let ck_path: PathBuf = checkpoint
        .map(Path::to_path_buf)
        .unwrap_or_else(|| state::checkpoint_path(run_dir));
    // The data layer's errors already name the file.
    let ck = Checkpoint::load(&ck_path)?;
    let mut model = SimClr::new(&cfg.model.simclr()?, Device::Cpu, cfg.train.seed)?;
    model.apply_checkpoint(&ck)?;
    Ok((cfg, model))
}

/// The linear-evaluation settings of `cfg`.
pub fn linear_config(cfg: &Config) -> LinearEvalConfig {
    LinearEvalConfig {
        epochs: cfg.eval.linear_epochs,
        batch_size: cfg.eval.linear_batch_size,
        lr: cfg.eval.linear_lr,
        weight_decay: cfg.eval.linear_weight_decay,
        seed: cfg.train.seed,
    }
}

/// Linear evaluation of `rep` (h, z, or raw pixels): features of the training and test splits
/// computed once, a linear classifier trained on the training features, accuracy on the test
/// features.
pub fn linear_eval(
    model: &mut SimClr,
    splits: &DataSplits,
    cfg: &Config,
    rep: Representation,
) -> Result<Accuracy> {
    let b = cfg.eval.linear_batch_size.max(64);
    let train = extract(model, splits.train.clone(), cfg, rep, b)?;
    let test = extract(model, splits.test.clone(), cfg, rep, b)?;
    let classes = splits.train.num_classes();
    let mut clf = LinearClassifier::train(&train, classes, &linear_config(cfg))?;
    clf.evaluate(&test)
}

/// k-NN accuracy of `rep` with `k` neighbours: at least 1 (an error otherwise); more than the
/// training split holds uses all of them, with a warning on stderr.
pub fn knn_eval(
    model: &mut SimClr,
    splits: &DataSplits,
    cfg: &Config,
    rep: Representation,
    k: usize,
) -> Result<Accuracy> {
    // Checked before the features are computed, which can take a long time.
    if k == 0 {
        return Err(CliError::Usage(
            "k-NN: --k is 0; it must be at least 1".into(),
        ));
    }
    let bank = splits.train.len();
    if bank > 0 && k > bank {
        eprintln!(
            "warning: --k {k} is more than the {bank} images of the memory bank (the training \
             split); using k = {bank}"
        );
    }
    let b = cfg.eval.linear_batch_size.max(64);
    let train = extract(model, splits.train.clone(), cfg, rep, b)?;
    let test = extract(model, splits.test.clone(), cfg, rep, b)?;
    knn_accuracy(
        &train,
        &test,
        splits.train.num_classes(),
        k,
        cfg.eval.knn_temperature,
    )
}

/// One row of a comparison table.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    /// What was evaluated.
    pub name: String,
    /// Linear evaluation.
    pub linear: Accuracy,
}

/// The quick start's comparison: the pre-trained encoder, the same encoder untrained (its
/// initialisation), and a linear classifier on the raw pixels.
pub fn compare(trained: &mut SimClr, splits: &DataSplits, cfg: &Config) -> Result<Vec<Row>> {
    let mut untrained = SimClr::new(&cfg.model.simclr()?, Device::Cpu, cfg.train.seed)?;
    Ok(vec![
        Row {
            name: "SimCLR (pre-trained encoder, h)".into(),
            linear: linear_eval(trained, splits, cfg, Representation::H)?,
        },
        Row {
            name: "same encoder, untrained".into(),
            linear: linear_eval(&mut untrained, splits, cfg, Representation::H)?,
        },
        Row {
            name: "raw pixels".into(),
            linear: linear_eval(&mut untrained, splits, cfg, Representation::Pixels)?,
        },
    ])
}

/// The table as Markdown.
pub fn table(rows: &[Row], title: &str) -> String {
    let mut s = format!(
        "{title}\n\n| representation | linear eval top-1 | top-5 |\n| --- | ---: | ---: |\n"
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1}% | {:.1}% |\n",
            r.name, r.linear.top1, r.linear.top5
        ));
    }
    s
}

//! Opens the configured data set: the pre-training images, and the labelled train and test
//! splits that evaluation uses.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use simclr_data::{
    label_subset_indices, train_test_split, Cifar10, Dataset, ErrorPolicy, FolderOptions,
    ImageFolder, Mnist, MnistKind, Split, Stl10, Subset, SyntheticShapes,
};

use crate::config::{DataConfig, DatasetKind};
use crate::error::{io_err, CliError, Result};

/// The splits of a data set.
#[derive(Clone)]
pub struct DataSplits {
    /// Images for pre-training (labels optional).
    pub pretrain: Arc<dyn Dataset>,
    /// Labelled training images (linear evaluation, the k-NN memory bank).
    pub train: Arc<dyn Dataset>,
    /// Labelled held-out images.
    pub test: Arc<dyn Dataset>,
}

impl std::fmt::Debug for DataSplits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataSplits {{ pretrain: {}, train: {}, test: {} }}",
            self.pretrain.len(),
            self.train.len(),
            self.test.len()
        )
    }
}

fn need_path(cfg: &DataConfig) -> Result<&Path> {
    let p = cfg.path.as_deref().ok_or_else(|| CliError::Config {
        source_name: "settings".into(),
        msg: format!("data.path: the {:?} data set needs a path", cfg.dataset),
    })?;
    if !p.exists() {
        return Err(io_err(p, "data.path does not exist"));
    }
    Ok(p)
}

/// Opens `root` as a labelled folder and checks every file's header at once, so a bad file
/// stops the command before any training (and not when an evaluation first reads it). With
/// [`ErrorPolicy::Skip`], the files that fail are reported and left out.
fn folder(root: &Path, policy: ErrorPolicy, threads: usize) -> Result<Arc<dyn Dataset>> {
    let opts = FolderOptions {
        policy,
        ..FolderOptions::default()
    };
    let ds = ImageFolder::labelled(root, &opts)?;
    let bad = ds.check(threads)?;
    let Some((_, first)) = bad.first() else {
        return Ok(Arc::new(ds));
    };
    let total = ds.len();
    if policy == ErrorPolicy::Fail {
        return Err(CliError::Usage(format!(
            "{first}; {} of the {total} images under {} cannot be read: fix or remove them, or \
             set data.skip_bad_images = true to leave unreadable images out",
            bad.len(),
            root.display()
        )));
    }
    for (_, e) in &bad {
        eprintln!("warning: skipping unreadable image {e}");
    }
    eprintln!(
        "warning: {}: left out {} unreadable images of {total}",
        root.display(),
        bad.len()
    );
    let idx: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
    Ok(Arc::new(ds.without(&idx)?))
}

/// The unreadable images a command has reported, so that each file is reported once however
/// many epochs or evaluations read it again.
#[derive(Debug, Default)]
pub struct SkipLog {
    seen: HashSet<String>,
}

impl SkipLog {
    /// Reports on stderr each image of `skipped` (a [`simclr_data::Batch`]'s `skipped_images`,
    /// indices into `ds`) not reported before.
    pub fn report(&mut self, ds: &dyn Dataset, skipped: &[(usize, String)]) {
        for (index, why) in skipped {
            if self.seen.insert(ds.describe(*index)) {
                eprintln!("warning: skipping unreadable image {why}");
            }
        }
    }
}

/// How `cfg`'s data set is named in errors: its path, or its kind when it has none.
pub fn describe(cfg: &DataConfig) -> String {
    match &cfg.path {
        Some(p) => format!("{:?} data set {}", cfg.dataset, p.display()),
        None => format!("{:?} data set", cfg.dataset),
    }
}

/// At most `max` images of `ds` (0: all), class-balanced and reproducible from `seed`.
fn cap(ds: Arc<dyn Dataset>, max: usize, seed: u64) -> Result<Arc<dyn Dataset>> {
    if max == 0 || max >= ds.len() {
        return Ok(ds);
    }
    let fraction = max as f64 / ds.len() as f64;
    let idx = label_subset_indices(ds.as_ref(), fraction, seed)?;
    Ok(Arc::new(Subset::new(ds, idx)?))
}

/// Opens the splits of `cfg`; `seed` chooses the held-out split where the data set has none.
pub fn open(cfg: &DataConfig, seed: u64) -> Result<DataSplits> {
    let policy = cfg.error_policy();
    let (train, test): (Arc<dyn Dataset>, Arc<dyn Dataset>) = match cfg.dataset {
        DatasetKind::Synthetic => (
            Arc::new(SyntheticShapes::new(
                cfg.synthetic_train,
                cfg.synthetic_side,
                0,
            )?),
            // Another seed gives other images: the test set shares no image with training.
            Arc::new(SyntheticShapes::new(
                cfg.synthetic_test,
                cfg.synthetic_side,
                1,
            )?),
        ),
        DatasetKind::Cifar10 => {
            let p = need_path(cfg)?;
            if p.join("train").is_dir() && p.join("test").is_dir() {
                (
                    folder(&p.join("train"), policy, cfg.threads)?,
                    folder(&p.join("test"), policy, cfg.threads)?,
                )
            } else {
                (
                    Arc::new(Cifar10::open(p, Split::Train)?),
                    Arc::new(Cifar10::open(p, Split::Test)?),
                )
            }
        }
        DatasetKind::Stl10 => {
            let p = need_path(cfg)?;
            (
                Arc::new(Stl10::open(p, Split::Train)?),
                Arc::new(Stl10::open(p, Split::Test)?),
            )
        }
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            let p = need_path(cfg)?;
            let kind = if cfg.dataset == DatasetKind::Mnist {
                MnistKind::Digits
            } else {
                MnistKind::Fashion
            };
            (
                Arc::new(Mnist::open(p, Split::Train, kind)?),
                Arc::new(Mnist::open(p, Split::Test, kind)?),
            )
        }
        DatasetKind::Folder => {
            let p = need_path(cfg)?;
            if p.join("train").is_dir() && p.join("test").is_dir() {
                (
                    folder(&p.join("train"), policy, cfg.threads)?,
                    folder(&p.join("test"), policy, cfg.threads)?,
                )
            } else {
                let all = folder(p, policy, cfg.threads)?;
                let (tr, te) = train_test_split(all, cfg.test_fraction, seed)?;
                (Arc::new(tr), Arc::new(te))
            }
        }
    };
    let train = cap(train, cfg.max_train_images, seed)?;
    let test = cap(test, cfg.max_test_images, seed)?;
    let pretrain: Arc<dyn Dataset> = if cfg.dataset == DatasetKind::Stl10 && cfg.unlabelled {
        Arc::new(Stl10::open(need_path(cfg)?, Split::Unlabelled)?)
    } else {
        train.clone()
    };
    if train.num_classes() == 0 {
        return Err(CliError::Usage(format!(
            "the {:?} training split has no labels; evaluation needs labelled images",
            cfg.dataset
        )));
    }
    Ok(DataSplits {
        pretrain,
        train,
        test,
    })
}

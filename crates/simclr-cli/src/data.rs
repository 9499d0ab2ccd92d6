//! Opens the configured data set: the pre-training images, and the labelled train and test
//! splits that evaluation uses.

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

fn folder(root: &Path, policy: ErrorPolicy) -> Result<Arc<dyn Dataset>> {
    let opts = FolderOptions {
        policy,
        ..FolderOptions::default()
    };
    Ok(Arc::new(ImageFolder::labelled(root, &opts)?))
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
                    folder(&p.join("train"), policy)?,
                    folder(&p.join("test"), policy)?,
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
                    folder(&p.join("train"), policy)?,
                    folder(&p.join("test"), policy)?,
                )
            } else {
                let all = folder(p, policy)?;
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

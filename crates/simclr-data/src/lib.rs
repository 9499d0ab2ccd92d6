//! Data sets and augmentation of SimCLR (Chen et al., 2020).
//!
//! - Data sets ([`Dataset`]): the built-in [`SyntheticShapes`] (no download), CIFAR-10
//!   binary batches ([`Cifar10`]), STL-10 binary ([`Stl10`], with its unlabelled split),
//!   MNIST and Fashion-MNIST IDX files, plain or gzip ([`Mnist`]), and image folders
//!   ([`ImageFolder`]: `root/<class>/*` or unlabelled). Subsets, stratified train/test splits
//!   and class-balanced label subsets ([`label_subset`]).
//! - Augmentation ([`augment`]): every transform of the paper with its parameters as defaults;
//!   the random parameters of each view are drawn into a
//!   [`ViewParams`] (shared with the GPU kernels) from
//!   (seed, epoch, index, view), then applied.
//! - The [`Loader`]: parallel decode and augmentation on rayon threads, a bounded prefetch
//!   queue, two views per image as NCHW `f32` (or 8-bit), shuffling, drop-last and sharding by
//!   (rank, world size).
//!
//! Bad input is an error naming the file (or, with [`ErrorPolicy::Skip`], skipped and
//! counted), never a panic.
//!
//! ```
//! use std::sync::Arc;
//! use simclr_data::{Augmentation, AugmentConfig, Dataset, Loader, LoaderConfig, SyntheticShapes};
//!
//! let ds: Arc<dyn Dataset> = Arc::new(SyntheticShapes::new(64, 32, 0)?);
//! let aug = Augmentation::new(AugmentConfig::cifar10())?;
//! let cfg = LoaderConfig { batch_size: 16, threads: 2, ..LoaderConfig::default() };
//! let loader = Loader::new(ds, aug, cfg)?;
//! let mut batches = 0;
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     // Both views of 16 images: rows 0..16 are the first views, 16..32 the second.
//!     assert_eq!(batch.shape(), [32, 3, 32, 32]);
//!     batches += 1;
//! }
//! assert_eq!(batches, 4);
//! # Ok::<(), simclr_data::DataError>(())
//! ```
#![deny(missing_docs)]

pub mod augment;
mod cifar;
mod dataset;
mod error;
mod folder;
mod image;
mod loader;
mod mnist;
mod rng;
mod stl;
mod synthetic;

pub use augment::{AugmentConfig, Augmentation, Crop, Normalize, ViewKey, ViewParams};
pub use cifar::{parse_cifar10_batch, Cifar10, CIFAR10_CLASSES, CIFAR10_RECORD};
pub use dataset::{
    class_counts, label_subset, label_subset_indices, labels, train_test_split, Dataset,
    ErrorPolicy, ImageSet, Split, Subset,
};
pub use error::DataError;
pub use folder::{FolderOptions, ImageFolder, IMAGE_EXTENSIONS};
pub use image::{decode_image, read_image, DecodeOptions, Image};
pub use loader::{Batch, BatchData, EpochIter, Loader, LoaderConfig, OutputFormat, PixelBuffer};
pub use mnist::{
    maybe_gunzip, parse_idx, read_idx, IdxArray, Mnist, MnistKind, FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
};
pub use stl::{
    parse_stl10_labels, stl10_image, stl10_image_count, Stl10, STL10_CLASSES, STL10_IMAGE_BYTES,
    STL10_SIDE,
};
pub use synthetic::{SyntheticShapes, SHAPE_CLASSES};

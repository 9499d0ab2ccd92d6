//! The [`Dataset`] trait, in-memory data sets, subsets, splits and class-balanced label subsets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::rng::rng_for;
use crate::{DataError, Image};

/// A data set of images, each with an optional class label.
///
/// Implementations are cheap to query for labels ([`Dataset::label`] never decodes) and may
/// decode lazily in [`Dataset::image`], which the loader calls from many threads at once.
pub trait Dataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;

    /// Whether the data set has no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image at `index` (decoded when the data set is lazy), or an error naming it.
    fn image(&self, index: usize) -> Result<Image, DataError>;

    /// The class of the image at `index`, or `None` when it is unlabelled (or out of range).
    fn label(&self, index: usize) -> Option<u32>;

    /// The class names, indexed by label; empty for an unlabelled data set.
    fn class_names(&self) -> &[String];

    /// Number of classes (0 when unlabelled).
    fn num_classes(&self) -> usize {
        self.class_names().len()
    }

    /// A human-readable name of item `index` for logs and errors (a file path where there is one).
    fn describe(&self, index: usize) -> String {
        format!("image {index}")
    }
}

/// Which part of a data set with official splits to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training split.
    Train,
    /// The test split.
    Test,
    /// STL-10's 100,000 unlabelled images.
    Unlabelled,
}

/// What to do with an image that cannot be read or decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ErrorPolicy {
    /// Return the error (naming the file); the default.
    #[default]
    Fail,
    /// Leave the image out, log a warning, and count it.
    Skip,
}

pub(crate) fn check_index(index: usize, len: usize) -> Result<(), DataError> {
    if index < len {
        Ok(())
    } else {
        Err(DataError::OutOfRange { index, len })
    }
}

/// The labels of every image of `ds` (`None` for unlabelled ones).
pub fn labels(ds: &dyn Dataset) -> Vec<Option<u32>> {
    (0..ds.len()).map(|i| ds.label(i)).collect()
}

/// Number of images of each class of `ds` (unlabelled images and labels past
/// [`Dataset::num_classes`] are not counted).
pub fn class_counts(ds: &dyn Dataset) -> Vec<usize> {
    let mut counts = vec![0usize; ds.num_classes()];
    for i in 0..ds.len() {
        if let Some(l) = ds.label(i) {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
    }
    counts
}

/// Images held in memory (decoded once), with optional labels.
#[derive(Clone, Debug, Default)]
pub struct ImageSet {
    images: Vec<Image>,
    labels: Option<Vec<u32>>,
    classes: Vec<String>,
}

impl ImageSet {
    /// An in-memory data set. `labels`, when given, must have one entry per image, each below
    /// `classes.len()`.
    pub fn new(
        images: Vec<Image>,
        labels: Option<Vec<u32>>,
        classes: Vec<String>,
    ) -> Result<ImageSet, DataError> {
        if let Some(l) = &labels {
            if l.len() != images.len() {
                return Err(DataError::Config(format!(
                    "{} labels for {} images",
                    l.len(),
                    images.len()
                )));
            }
            if let Some(bad) = l.iter().find(|&&v| v as usize >= classes.len()) {
                return Err(DataError::Config(format!(
                    "label {bad} with only {} classes",
                    classes.len()
                )));
            }
        }
        Ok(ImageSet {
            images,
            labels,
            classes,
        })
    }

    /// Reads every image of `ds` into memory, in parallel on the current rayon pool. With
    /// [`ErrorPolicy::Skip`] unreadable images are left out; the second value is how many.
    pub fn load(ds: &dyn Dataset, policy: ErrorPolicy) -> Result<(ImageSet, usize), DataError> {
        let skipped = AtomicUsize::new(0);
        let loaded: Vec<Option<(Image, Option<u32>)>> = (0..ds.len())
            .into_par_iter()
            .map(|i| match ds.image(i) {
                Ok(img) => Ok(Some((img, ds.label(i)))),
                Err(e) if policy == ErrorPolicy::Skip && e.is_item_error() => {
                    tracing::warn!("skipping {}: {e}", ds.describe(i));
                    skipped.fetch_add(1, Ordering::Relaxed);
                    Ok(None)
                }
                Err(e) => Err(e),
            })
            .collect::<Result<_, DataError>>()?;
        let mut images = Vec::with_capacity(loaded.len());
        let mut labels = Vec::with_capacity(loaded.len());
        for (img, label) in loaded.into_iter().flatten() {
            images.push(img);
            labels.push(label);
        }
        let labels = if ds.num_classes() > 0 && labels.iter().all(Option::is_some) {
            Some(labels.into_iter().map(|l| l.unwrap_or(0)).collect())
        } else {
            None
        };
        let set = ImageSet::new(images, labels, ds.class_names().to_vec())?;
        Ok((set, skipped.into_inner()))
    }

    /// The images.
    pub fn images(&self) -> &[Image] {
        &self.images
    }
}

impl Dataset for ImageSet {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.images.len())?;
        Ok(self.images[index].clone())
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.labels.as_ref()?.get(index).copied()
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
}

/// The images of another data set at the given indices, in that order.
#[derive(Clone)]
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// The subset of `inner` at `indices` (each must be below `inner.len()`).
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Subset, DataError> {
        let len = inner.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(DataError::OutOfRange { index: bad, len });
        }
        Ok(Subset { inner, indices })
    }

    /// The indices into the inner data set.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl std::fmt::Debug for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subset")
            .field("inner_len", &self.inner.len())
            .field("len", &self.indices.len())
            .finish()
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.indices.len())?;
        self.inner.image(self.indices[index])
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.inner.label(*self.indices.get(index)?)
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
    fn describe(&self, index: usize) -> String {
        match self.indices.get(index) {
            Some(&i) => self.inner.describe(i),
            None => format!("image {index}"),
        }
    }
}

fn indices_by_class(ds: &dyn Dataset) -> Result<Vec<Vec<usize>>, DataError> {
    if ds.num_classes() == 0 {
        return Err(DataError::Config(
            "a class-balanced selection needs a labelled data set".into(),
        ));
    }
    let mut by_class = vec![Vec::new(); ds.num_classes()];
    for i in 0..ds.len() {
        if let Some(c) = ds.label(i).and_then(|l| by_class.get_mut(l as usize)) {
            c.push(i);
        }
    }
    Ok(by_class)
}

/// A class-balanced subset of the labels, chosen reproducibly from `seed`: of every class,
/// `round(fraction * count)` images (at least one when the class has any) drawn at random
/// without replacement; sorted indices into `ds`. The paper's semi-supervised settings are
/// `fraction` 0.01 and 0.1.
pub fn label_subset_indices(
    ds: &dyn Dataset,
    fraction: f64,
    seed: u64,
) -> Result<Vec<usize>, DataError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(DataError::Config(format!(
            "label fraction {fraction} is not in (0, 1]"
        )));
    }
    let mut out = Vec::new();
    for (class, mut idx) in indices_by_class(ds)?.into_iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let take = ((fraction * idx.len() as f64).round() as usize).clamp(1, idx.len());
        idx.shuffle(&mut rng_for(seed, &[0x1abe1, class as u64]));
        out.extend_from_slice(&idx[..take]);
    }
    out.sort_unstable();
    Ok(out)
}

/// The class-balanced label subset of [`label_subset_indices`] as a data set.
pub fn label_subset(ds: Arc<dyn Dataset>, fraction: f64, seed: u64) -> Result<Subset, DataError> {
    let idx = label_subset_indices(ds.as_ref(), fraction, seed)?;
    Subset::new(ds, idx)
}

/// Splits `ds` into (train, test) reproducibly from `seed`, putting `round(test_fraction *
/// count)` images of every class (of the whole set when unlabelled) into test. For data sets
/// without an official split, such as an image folder.
pub fn train_test_split(
    ds: Arc<dyn Dataset>,
    test_fraction: f64,
    seed: u64,
) -> Result<(Subset, Subset), DataError> {
    if !(0.0..1.0).contains(&test_fraction) {
        return Err(DataError::Config(format!(
            "test fraction {test_fraction} is not in [0, 1)"
        )));
    }
    let groups = if ds.num_classes() > 0 {
        indices_by_class(ds.as_ref())?
    } else {
        vec![(0..ds.len()).collect()]
    };
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (g, mut idx) in groups.into_iter().enumerate() {
        idx.shuffle(&mut rng_for(seed, &[0x5b117, g as u64]));
        let n_test = (test_fraction * idx.len() as f64).round() as usize;
        test.extend_from_slice(&idx[..n_test]);
        train.extend_from_slice(&idx[n_test..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((Subset::new(ds.clone(), train)?, Subset::new(ds, test)?))
}

//! The batch loader: parallel decode and augmentation on rayon threads, a bounded prefetch
//! queue, per-epoch shuffling, drop-last and sharding across data-parallel replicas.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::augment::{Augmentation, ViewKey, ViewParams};
use crate::rng::rng_for;
use crate::{DataError, Dataset, ErrorPolicy};

/// The pixel format of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Every transform applied, normalised, `f32` NCHW: what the network eats.
    #[default]
    F32,
    /// Every transform applied, quantised to 8 bits (`round(255 x)`, not normalised), NCHW.
    U8,
    /// Only crop + resize, flip and rotation applied, 8-bit NCHW: the input of the GPU colour
    /// path, which applies the rest from [`Batch::params`].
    U8Geometry,
}

type Pool<T> = Mutex<Vec<Vec<T>>>;

/// The pixel buffer of a batch: a `Vec` that goes back to its loader when dropped, so the
/// next batches reuse its memory instead of faulting in fresh pages (a 224 x 224 batch of 256
/// image pairs is 300 MB). Dereferences to a slice; [`PixelBuffer::into_vec`] keeps the memory.
pub struct PixelBuffer<T> {
    data: Vec<T>,
    pool: Weak<Pool<T>>,
}

impl<T> PixelBuffer<T> {
    fn pooled(data: Vec<T>, pool: &Arc<Pool<T>>) -> PixelBuffer<T> {
        PixelBuffer {
            data,
            pool: Arc::downgrade(pool),
        }
    }

    /// The buffer as a `Vec` (it does not go back to the loader).
    pub fn into_vec(mut self) -> Vec<T> {
        self.pool = Weak::new();
        std::mem::take(&mut self.data)
    }

    fn truncate(&mut self, len: usize) {
        self.data.truncate(len);
    }
}

impl<T> From<Vec<T>> for PixelBuffer<T> {
    fn from(data: Vec<T>) -> Self {
        PixelBuffer {
            data,
            pool: Weak::new(),
        }
    }
}

impl<T> std::ops::Deref for PixelBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T> std::ops::DerefMut for PixelBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

impl<T: Clone> Clone for PixelBuffer<T> {
    fn clone(&self) -> Self {
        PixelBuffer::from(self.data.clone())
    }
}

impl<T: PartialEq> PartialEq for PixelBuffer<T> {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
    }
}

impl<T> std::fmt::Debug for PixelBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PixelBuffer(len {})", self.data.len())
    }
}

impl<T> Drop for PixelBuffer<T> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            if let Ok(mut p) = pool.lock() {
                if p.len() < POOL_CAP {
                    p.push(std::mem::take(&mut self.data));
                }
            }
        }
    }
}

/// Buffers kept for reuse, per loader and element type.
const POOL_CAP: usize = 4;

fn take_buffer<T: Copy + Default>(pool: &Arc<Pool<T>>, len: usize) -> PixelBuffer<T> {
    let reused = pool.lock().ok().and_then(|mut p| p.pop());
    let mut v = reused.unwrap_or_default();
    // Old contents may stay: every row is overwritten (or dropped) by `make_batch`.
    v.resize(len, T::default());
    PixelBuffer::pooled(v, pool)
}

/// The pixels of a batch, `[views * B, 3, H, W]`: rows `v * B .. (v + 1) * B` are view `v` of
/// the batch's images in order.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchData {
    /// [`OutputFormat::F32`].
    F32(PixelBuffer<f32>),
    /// [`OutputFormat::U8`] or [`OutputFormat::U8Geometry`].
    U8(PixelBuffer<u8>),
}

/// One batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The epoch.
    pub epoch: u64,
    /// The batch's number within this rank's epoch.
    pub number: usize,
    /// Indices into the data set of the batch's images (B of them).
    pub indices: Vec<usize>,
    /// Their labels, when every image of the batch has one.
    pub labels: Option<Vec<u32>>,
    /// Views per image.
    pub views: usize,
    /// Height of a view.
    pub height: usize,
    /// Width of a view.
    pub width: usize,
    /// The pixels.
    pub data: BatchData,
    /// The parameters of every row (`views * B`, in the order of the rows).
    pub params: Vec<ViewParams>,
    /// Images of this batch that were skipped as unreadable ([`ErrorPolicy::Skip`]).
    pub skipped: usize,
    /// The data set index and the error (which names the file) of each skipped image, so the
    /// consumer can report them; a skipped image stays in the data set and is read again (and
    /// listed again) in every epoch.
    pub skipped_images: Vec<(usize, String)>,
}

impl Batch {
    /// Number of images (B).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch has no image.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// `[views * B, 3, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.views * self.len(), 3, self.height, self.width]
    }

    /// The `f32` pixels of view `v` (`[B, 3, H, W]`), when the batch is `f32`.
    pub fn view_f32(&self, v: usize) -> Option<&[f32]> {
        let n = self.len() * 3 * self.height * self.width;
        match &self.data {
            BatchData::F32(d) if v < self.views => Some(&d[v * n..(v + 1) * n]),
            _ => None,
        }
    }

    /// The 8-bit pixels of view `v`, when the batch is 8-bit.
    pub fn view_u8(&self, v: usize) -> Option<&[u8]> {
        let n = self.len() * 3 * self.height * self.width;
        match &self.data {
            BatchData::U8(d) if v < self.views => Some(&d[v * n..(v + 1) * n]),
            _ => None,
        }
    }
}

/// How the loader batches an epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Images per batch (per replica).
    pub batch_size: usize,
    /// Views per image: 2 for SimCLR's pairs, 1 for linear evaluation and feature extraction.
    pub views: usize,
    /// Seed of the shuffling and of the augmentation.
    pub seed: u64,
    /// Shuffle every epoch (differently per epoch, identically on every replica).
    pub shuffle: bool,
    /// Drop the last incomplete batch, and the images that do not divide evenly among replicas
    /// (so every replica gets the same number of batches).
    pub drop_last: bool,
    /// This replica's rank, `0..world_size`.
    pub rank: usize,
    /// Number of data-parallel replicas.
    pub world_size: usize,
    /// Batches made ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// The pixel format of the batches.
    pub output: OutputFormat,
    /// What to do with an unreadable image.
    pub errors: ErrorPolicy,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 256,
            views: 2,
            seed: 0,
            shuffle: true,
            drop_last: true,
            rank: 0,
            world_size: 1,
            prefetch: 4,
            threads: 0,
            output: OutputFormat::F32,
            errors: ErrorPolicy::Fail,
        }
    }
}

impl LoaderConfig {
    /// The configuration for evaluation and feature extraction: one view, in order, every image.
    pub fn eval(batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            views: 1,
            shuffle: false,
            drop_last: false,
            ..LoaderConfig::default()
        }
    }
}

struct Shared {
    dataset: Arc<dyn Dataset>,
    aug: Augmentation,
    cfg: LoaderConfig,
    pool: rayon::ThreadPool,
    skipped: AtomicUsize,
    f32_buffers: Arc<Pool<f32>>,
    u8_buffers: Arc<Pool<u8>>,
}

/// Makes the batches of each epoch. Cheap to query; [`Loader::epoch`] starts the producer.
pub struct Loader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("len", &self.shared.dataset.len())
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl Loader {
    /// A loader of `dataset` through `aug`.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        aug: Augmentation,
        cfg: LoaderConfig,
    ) -> Result<Loader, DataError> {
        if cfg.batch_size == 0 {
            return Err(DataError::Config("batch_size must be at least 1".into()));
        }
        if !(1..=16).contains(&cfg.views) {
            return Err(DataError::Config(format!(
                "views = {} is not in 1..=16",
                cfg.views
            )));
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(DataError::Config(format!(
                "rank {} is not in 0..world_size = {}",
                cfg.rank, cfg.world_size
            )));
        }
        if dataset.is_empty() {
            return Err(DataError::Config("the data set is empty".into()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("simclr-data-{i}"))
            .build()
            .map_err(|e| DataError::Worker(format!("cannot start the worker threads: {e}")))?;
        Ok(Loader {
            shared: Arc::new(Shared {
                dataset,
                aug,
                cfg,
                pool,
                skipped: AtomicUsize::new(0),
                f32_buffers: Arc::default(),
                u8_buffers: Arc::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    /// The data set.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.shared.dataset
    }

    /// The augmentation.
    pub fn augmentation(&self) -> &Augmentation {
        &self.shared.aug
    }

    /// Images skipped as unreadable so far, over all epochs ([`ErrorPolicy::Skip`]).
    pub fn skipped(&self) -> usize {
        self.shared.skipped.load(Ordering::Relaxed)
    }

    /// This replica's images of `epoch`, in order: the epoch's permutation (the same on every
    /// replica), of which this rank takes every `world_size`-th from `rank` on. With
    /// `drop_last`, every replica takes `len / world_size` images; otherwise the first
    /// `len % world_size` replicas take one more.
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let cfg = &self.shared.cfg;
        let n = self.shared.dataset.len();
        let mut order: Vec<usize> = (0..n).collect();
        if cfg.shuffle {
            order.shuffle(&mut rng_for(cfg.seed, &[0x005b_ff1e, epoch]));
        }
        let take = if cfg.drop_last {
            n / cfg.world_size
        } else {
            n.div_ceil(cfg.world_size)
        };
        order
            .into_iter()
            .skip(cfg.rank)
            .step_by(cfg.world_size)
            .take(take)
            .collect()
    }

    /// Batches this replica gets per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.epoch_indices(0).len();
        let b = self.shared.cfg.batch_size;
        if self.shared.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The batches of `epoch`, made ahead on the worker threads (at most `prefetch` waiting).
    /// Dropping the iterator stops the work.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch number `first` on, without making the ones before:
    /// the same batches as [`Loader::epoch`] gives from that point, so a resumed run sees
    /// exactly the data it would have seen.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> EpochIter {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let indices = self.epoch_indices(epoch);
        let mut batches: Vec<Vec<usize>> =
            indices.chunks(cfg.batch_size).map(|c| c.to_vec()).collect();
        if cfg.drop_last && batches.last().is_some_and(|b| b.len() < cfg.batch_size) {
            batches.pop();
        }
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("simclr-data-producer".into())
            .spawn(move || {
                for (number, idx) in batches.into_iter().enumerate().skip(first) {
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    let b = make_batch(&shared, epoch, number, idx);
                    let failed = b.is_err();
                    if tx.send(b).is_err() || failed {
                        return;
                    }
                }
            });
        match spawned {
            Ok(handle) => EpochIter {
                rx: Some(rx),
                handle: Some(handle),
                stop,
                pending_error: None,
            },
            Err(e) => EpochIter {
                rx: None,
                handle: None,
                stop,
                pending_error: Some(DataError::Worker(format!(
                    "cannot start the producer thread: {e}"
                ))),
            },
        }
    }
}

/// The batches of one epoch (see [`Loader::epoch`]). After an error it ends.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch, DataError>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pending_error: Option<DataError>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending_error.take() {
            return Some(Err(e));
        }
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(Ok(b)) => Some(Ok(b)),
            Ok(Err(e)) => {
                self.rx = None;
                Some(Err(e))
            }
            Err(_) => {
                // The producer is gone: finished, or panicked.
                self.rx = None;
                match self.handle.take().map(|h| h.join()) {
                    Some(Err(panic)) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Some(Err(DataError::Worker(format!("a worker panicked: {msg}"))))
                    }
                    _ => None,
                }
            }
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver makes a blocked send fail, so the producer ends after at most
        // the batch it is making.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One image's result: its views' parameters, or why it was skipped; `Err` stops the batch.
type ItemResult = Result<Result<Vec<ViewParams>, String>, DataError>;

fn make_batch(
    shared: &Shared,
    epoch: u64,
    number: usize,
    indices: Vec<usize>,
) -> Result<Batch, DataError> {
    let cfg = &shared.cfg;
    let (w, h) = shared.aug.output_size();
    let (w, h) = (w as usize, h as usize);
    let per_view = 3 * w * h;
    let b = indices.len();
    let views = cfg.views;
    let mut data = match cfg.output {
        OutputFormat::F32 => BatchData::F32(take_buffer(&shared.f32_buffers, views * b * per_view)),
        _ => BatchData::U8(take_buffer(&shared.u8_buffers, views * b * per_view)),
    };
    let results: Vec<ItemResult> = shared.pool.install(|| match &mut data {
        BatchData::F32(d) => run_items(shared, epoch, &indices, d, per_view, |img, p, out| {
            shared.aug.apply_f32(img, p, out)
        }),
        BatchData::U8(d) => {
            let geometry_only = cfg.output == OutputFormat::U8Geometry;
            run_items(shared, epoch, &indices, d, per_view, |img, p, out| {
                if geometry_only {
                    Augmentation::apply_geometry_u8(img, p, out)
                } else {
                    Augmentation::apply_u8(img, p, out)
                }
            })
        }
    });
    let mut keep = Vec::with_capacity(b);
    let mut params_by_item = Vec::with_capacity(b);
    let mut skipped_images = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r? {
            Ok(p) => {
                keep.push(i);
                params_by_item.push(p);
            }
            Err(why) => skipped_images.push((indices[i], why)),
        }
    }
    let skipped = b - keep.len();
    if skipped > 0 {
        shared.skipped.fetch_add(skipped, Ordering::Relaxed);
        match &mut data {
            BatchData::F32(d) => compact(d, b, views, per_view, &keep),
            BatchData::U8(d) => compact(d, b, views, per_view, &keep),
        }
    }
    let indices: Vec<usize> = keep.iter().map(|&i| indices[i]).collect();
    let labels: Option<Vec<u32>> = indices
        .iter()
        .map(|&i| shared.dataset.label(i))
        .collect::<Option<Vec<u32>>>()
        .filter(|_| shared.dataset.num_classes() > 0);
    let mut params = Vec::with_capacity(views * indices.len());
    for v in 0..views {
        params.extend(params_by_item.iter().map(|p| p[v]));
    }
    Ok(Batch {
        epoch,
        number,
        indices,
        labels,
        views,
        height: h,
        width: w,
        data,
        params,
        skipped,
        skipped_images,
    })
}

/// Decodes and augments every image of a batch in parallel, writing view `v` of item `i` into
/// row `v * B + i` of `data`.
fn run_items<T: Send>(
    shared: &Shared,
    epoch: u64,
    indices: &[usize],
    data: &mut [T],
    per_view: usize,
    apply: impl Fn(&crate::Image, &ViewParams, &mut [T]) -> Result<(), DataError> + Sync,
) -> Vec<ItemResult> {
    let b = indices.len();
    let views = shared.cfg.views;
    let mut slots: Vec<Vec<&mut [T]>> = (0..b).map(|_| Vec::with_capacity(views)).collect();
    for region in data.chunks_mut(b * per_view) {
        for (i, row) in region.chunks_mut(per_view).enumerate() {
            slots[i].push(row);
        }
    }
    slots
        .into_par_iter()
        .zip(indices.par_iter())
        .map(|(mut rows, &index)| {
            let result = (|| -> Result<Vec<ViewParams>, DataError> {
                let img = shared.dataset.image(index)?;
                let mut ps = Vec::with_capacity(views);
                for (v, row) in rows.iter_mut().enumerate() {
                    let key = ViewKey {
                        seed: shared.cfg.seed,
                        epoch,
                        index: index as u64,
                        view: v as u32,
                    };
                    let p = shared.aug.draw(img.width(), img.height(), key);
                    apply(&img, &p, row)?;
                    ps.push(p);
                }
                Ok(ps)
            })();
            match result {
                Ok(ps) => Ok(Ok(ps)),
                Err(e) if shared.cfg.errors == ErrorPolicy::Skip && e.is_item_error() => {
                    tracing::warn!("skipping {}: {e}", shared.dataset.describe(index));
                    Ok(Err(e.to_string()))
                }
                Err(e) => Err(e),
            }
        })
        .collect()
}

/// Keeps rows `keep` (ascending) of each view region, in place, and truncates.
fn compact<T: Copy>(
    data: &mut PixelBuffer<T>,
    b: usize,
    views: usize,
    per_view: usize,
    keep: &[usize],
) {
    let k = keep.len();
    let mut dst = 0;
    for v in 0..views {
        for &i in keep {
            let src = (v * b + i) * per_view;
            data.copy_within(src..src + per_view, dst);
            dst += per_view;
        }
    }
    data.truncate(views * k * per_view);
}

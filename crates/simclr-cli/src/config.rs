//! The run configuration: every setting of the paper (DESIGN.md section 1) as TOML, built up
//! from the defaults, a preset, a file and `--set key=value` overrides, in that order.
//!
//! Unknown keys and ill-typed values are errors that name the key and where it came from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use simclr_data::{AugmentConfig, Crop, Normalize};
use simclr_nn::{BlockKind, HeadConfig, LrScaling, ResNetConfig, SimClrConfig, Stem};

use crate::error::{CliError, Result};

/// A whole run: data, augmentation, model, optimisation, evaluation and output.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The preset this configuration starts from (read from a file before the file's own keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// The data set.
    pub data: DataConfig,
    /// The augmentation of the pre-training views.
    pub augment: AugmentSettings,
    /// Encoder and projection head.
    pub model: ModelConfig,
    /// Pre-training.
    pub train: TrainConfig,
    /// Evaluation: k-NN monitor and linear evaluation.
    pub eval: EvalConfig,
    /// Where results go.
    pub output: OutputConfig,
}

/// Which data set.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// The built-in synthetic shapes (no download).
    #[default]
    Synthetic,
    /// CIFAR-10: the binary batches, or a folder with `train/<class>` and `test/<class>`.
    Cifar10,
    /// STL-10 binary (its unlabelled split is used for pre-training with `data.unlabelled`).
    Stl10,
    /// MNIST IDX files.
    Mnist,
    /// Fashion-MNIST IDX files.
    FashionMnist,
    /// An image folder: `path/train/<class>/*` and `path/test/<class>/*`, or `path/<class>/*`
    /// with a held-out split of `test_fraction`.
    Folder,
}

/// The data set and how it is read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Which data set.
    pub dataset: DatasetKind,
    /// Where it is (not used by `synthetic`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Side of the views (and of evaluation images).
    pub image_size: u32,
    /// For evaluation, the shorter side is resized to this before the centre crop (ImageNet's
    /// 256 for 224); 0: to `image_size`.
    pub eval_resize: u32,
    /// Training images of the synthetic set.
    pub synthetic_train: usize,
    /// Test images of the synthetic set.
    pub synthetic_test: usize,
    /// Side of the synthetic images.
    pub synthetic_side: u32,
    /// Held-out fraction for data sets without a test split.
    pub test_fraction: f64,
    /// Use at most this many training images (0: all), a class-balanced reproducible subset.
    pub max_train_images: usize,
    /// Use at most this many test images (0: all), a class-balanced reproducible subset.
    pub max_test_images: usize,
    /// STL-10: pre-train on the 100,000 unlabelled images instead of the training split.
    pub unlabelled: bool,
    /// Decode and augmentation threads (0: one per core).
    pub threads: usize,
    /// Batches prepared ahead of the trainer.
    pub prefetch: usize,
    /// Skip unreadable images (counted in the log) instead of stopping.
    pub skip_bad_images: bool,
    /// Colour jitter, grayscale, blur, cutout, noise and normalisation of the pre-training views
    /// on the GPU (when `train.device` is one): the loader threads then only crop, resize, flip
    /// and rotate, and hand 8-bit crops over. Same pictures as the CPU path, from the same
    /// random parameters. Not with Sobel filtering (CPU only).
    pub gpu_augment: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: DatasetKind::Synthetic,
            path: None,
            image_size: 32,
            eval_resize: 0,
            synthetic_train: 5000,
            synthetic_test: 1000,
            synthetic_side: 32,
            test_fraction: 0.1,
            max_train_images: 0,
            max_test_images: 0,
            unlabelled: false,
            threads: 0,
            prefetch: 4,
            skip_bad_images: false,
            gpu_augment: false,
        }
    }
}

impl DataConfig {
    /// What to do with an unreadable image.
    pub fn error_policy(&self) -> simclr_data::ErrorPolicy {
        if self.skip_bad_images {
            simclr_data::ErrorPolicy::Skip
        } else {
            simclr_data::ErrorPolicy::Fail
        }
    }
}

/// Normalisation constants.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NormalizeKind {
    /// CIFAR-10's statistics.
    Cifar10,
    /// ImageNet's statistics.
    #[default]
    Imagenet,
    /// None (values in \[0, 1\]).
    None,
}

impl NormalizeKind {
    /// The constants.
    pub fn constants(self) -> Normalize {
        match self {
            NormalizeKind::Cifar10 => Normalize::CIFAR10,
            NormalizeKind::Imagenet => Normalize::IMAGENET,
            NormalizeKind::None => Normalize::NONE,
        }
    }
}

/// The pre-training augmentation; the defaults are the paper's CIFAR-10 setting.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentSettings {
    /// Random resized crop (false: the whole image, resized).
    pub crop: bool,
    /// Area fraction range of the crop.
    pub crop_scale: [f32; 2],
    /// Aspect-ratio range of the crop.
    pub crop_ratio: [f32; 2],
    /// Probability of a horizontal flip.
    pub flip: f32,
    /// Colour distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s).
    pub strength: f32,
    /// Probability of the colour jitter.
    pub jitter: f32,
    /// Probability of grayscale (colour drop).
    pub grayscale: f32,
    /// Probability of Gaussian blur (the paper: 0.5 on ImageNet, 0 on CIFAR-10).
    pub blur: f32,
    /// Range of the blur's sigma.
    pub blur_sigma: [f32; 2],
    /// Probability of a rotation by 90, 180 or 270 degrees (ablation).
    pub rotation: f32,
    /// Probability of cutout (ablation).
    pub cutout: f32,
    /// Probability of Sobel filtering (ablation).
    pub sobel: f32,
    /// Probability of Gaussian noise (ablation).
    pub noise: f32,
    /// Normalisation after augmentation.
    pub normalize: NormalizeKind,
}

impl Default for AugmentSettings {
    fn default() -> Self {
        AugmentSettings {
            crop: true,
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip: 0.5,
            strength: 0.5,
            jitter: 0.8,
            grayscale: 0.2,
            blur: 0.0,
            blur_sigma: [0.1, 2.0],
            rotation: 0.0,
            cutout: 0.0,
            sobel: 0.0,
            noise: 0.0,
            normalize: NormalizeKind::Cifar10,
        }
    }
}

impl AugmentSettings {
    /// The data layer's configuration for views of `size x size`.
    pub fn to_augment(&self, size: u32) -> AugmentConfig {
        let mut a = AugmentConfig::simclr(size, self.strength, self.blur > 0.0);
        a.crop = if self.crop {
            Crop::RandomResized {
                scale: (self.crop_scale[0], self.crop_scale[1]),
                ratio: (self.crop_ratio[0], self.crop_ratio[1]),
            }
        } else {
            Crop::Full
        };
        a.flip_p = self.flip;
        a.jitter_p = self.jitter;
        a.grayscale_p = self.grayscale;
        a.blur_p = self.blur;
        a.blur_sigma = (self.blur_sigma[0], self.blur_sigma[1]);
        a.rotation_p = self.rotation;
        a.cutout_p = self.cutout;
        a.sobel_p = self.sobel;
        a.noise_p = self.noise;
        a.normalize = self.normalize.constants();
        a
    }
}

/// Encoder stem.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StemKind {
    /// 3x3 stride-1 convolution, no max-pool.
    #[default]
    Cifar,
    /// 7x7 stride-2 convolution and max-pool.
    Imagenet,
}

/// Projection head type.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HeadKind {
    /// z = h.
    None,
    /// One linear layer.
    Linear,
    /// Linear -> BN -> ReLU (repeated) -> Linear.
    #[default]
    Mlp,
}

/// Encoder and projection head.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// ResNet depth: 18, 34 or 50 (also 101, 152).
    pub depth: usize,
    /// Width multiplier (1, 2, 4).
    pub width: usize,
    /// Stem.
    pub stem: StemKind,
    /// Channels of the first stage, overriding 64 x width (small models for tests and demos).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_width: Option<usize>,
    /// Blocks per stage, overriding the depth's (small models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<[usize; 4]>,
    /// Projection head.
    pub head: HeadKind,
    /// Hidden layers of the MLP head.
    pub head_hidden_layers: usize,
    /// Width of the MLP's hidden layers (0: the width of h).
    pub head_hidden_dim: usize,
    /// Size of z (ignored by `none`).
    pub projection_dim: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            depth: 18,
            width: 1,
            stem: StemKind::Cifar,
            base_width: None,
            layers: None,
            head: HeadKind::Mlp,
            head_hidden_layers: 1,
            head_hidden_dim: 0,
            projection_dim: 128,
        }
    }
}

impl ModelConfig {
    /// The encoder's configuration.
    pub fn encoder(&self) -> Result<ResNetConfig> {
        let stem = match self.stem {
            StemKind::Cifar => Stem::Cifar,
            StemKind::Imagenet => Stem::ImageNet,
        };
        if !(1..=MAX_WIDTH_MULTIPLIER).contains(&self.width) {
            return Err(key_err(
                "model.width",
                format!(
                    "{} is not a width multiplier in 1..={MAX_WIDTH_MULTIPLIER}",
                    self.width
                ),
            ));
        }
        let mut c = ResNetConfig::resnet(self.depth, self.width, stem)
            .map_err(|e| key_err("model.depth", e))?;
        if let Some(w) = self.base_width {
            if !(1..=MAX_BASE_WIDTH).contains(&w) {
                return Err(key_err(
                    "model.base_width",
                    format!("{w} channels is not in 1..={MAX_BASE_WIDTH}"),
                ));
            }
            c.base_width = w;
        }
        if let Some(l) = self.layers {
            if l.contains(&0) {
                return Err(key_err("model.layers", "every stage needs a block"));
            }
            if l.iter().any(|&n| n > MAX_BLOCKS_PER_STAGE) {
                return Err(key_err(
                    "model.layers",
                    format!("{l:?}: a stage has more than {MAX_BLOCKS_PER_STAGE} blocks"),
                ));
            }
            c.layers = l;
        }
        Ok(c)
    }

    /// The whole model's configuration.
    pub fn simclr(&self) -> Result<SimClrConfig> {
        let encoder = self.encoder()?;
        let h = encoder.feature_dim();
        let head = match self.head {
            HeadKind::None => HeadConfig::Identity,
            HeadKind::Linear => HeadConfig::Linear {
                output_dim: self.projection_dim,
            },
            HeadKind::Mlp => HeadConfig::Mlp {
                hidden_layers: self.head_hidden_layers,
                hidden_dim: if self.head_hidden_dim == 0 {
                    h
                } else {
                    self.head_hidden_dim
                },
                output_dim: self.projection_dim,
            },
        };
        Ok(SimClrConfig { encoder, head })
    }

    /// A one-line description, e.g. `ResNet-18 (cifar stem, width 16, 1-1-1-1) + mlp head`.
    pub fn describe(&self) -> String {
        match self.encoder() {
            Ok(e) => {
                let kind = match e.block {
                    BlockKind::Basic => "basic",
                    BlockKind::Bottleneck => "bottleneck",
                };
                format!(
                    "ResNet-{} ({:?} stem, {kind} blocks {}-{}-{}-{}, width {}, h = {}) + {:?} head",
                    self.depth,
                    self.stem,
                    e.layers[0],
                    e.layers[1],
                    e.layers[2],
                    e.layers[3],
                    e.base_width,
                    e.feature_dim(),
                    self.head
                )
            }
            Err(e) => format!("invalid model: {e}"),
        }
    }
}

/// The optimiser.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// LARS (the paper's).
    #[default]
    Lars,
    /// SGD with momentum.
    Sgd,
}

/// Learning-rate scaling with the batch size.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ScalingKind {
    /// lr x B / 256.
    #[default]
    Linear,
    /// lr x sqrt(B).
    Sqrt,
    /// lr as given.
    None,
}

impl From<ScalingKind> for LrScaling {
    fn from(s: ScalingKind) -> LrScaling {
        match s {
            ScalingKind::Linear => LrScaling::Linear,
            ScalingKind::Sqrt => LrScaling::Sqrt,
            ScalingKind::None => LrScaling::None,
        }
    }
}

/// The contrastive objective.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// NT-Xent (SimCLR's).
    #[default]
    NtXent,
    /// NT-Logistic (ablation).
    NtLogistic,
    /// Margin triplet, with `train.semi_hard` negative mining or without (ablation).
    MarginTriplet,
}

/// Pre-training.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Images per step (each gives two views).
    pub batch_size: usize,
    /// Epochs.
    pub epochs: u64,
    /// Stop after this many steps (0: no limit).
    pub max_steps: u64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Base learning rate, scaled by `lr_scaling`.
    pub lr: f32,
    /// How the learning rate scales with the batch.
    pub lr_scaling: ScalingKind,
    /// Linear warm-up, in epochs.
    pub warmup_epochs: f64,
    /// Momentum.
    pub momentum: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f32,
    /// LARS trust coefficient.
    pub trust_coefficient: f32,
    /// Exclude batch-norm parameters and biases from weight decay and LARS adaptation.
    pub exclude_bn_and_bias: bool,
    /// The contrastive loss.
    pub loss: LossKind,
    /// Temperature of NT-Xent and NT-Logistic.
    pub temperature: f32,
    /// Margin of the margin triplet loss.
    pub margin: f32,
    /// Semi-hard negative mining for the margin triplet loss.
    pub semi_hard: bool,
    /// Seed of the weights, the shuffling and the augmentation.
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only at the end of each epoch).
    pub checkpoint_every: u64,
    /// Print and record metrics every this many steps.
    pub log_every: u64,
    /// Train a linear probe on h (stop-gradient) alongside, as the paper monitors.
    pub online_probe: bool,
    /// The probe's learning rate (SGD, momentum 0.9).
    pub probe_lr: f32,
    /// Gradient caching: embed each batch in this many chunks and back-propagate chunk by
    /// chunk (a batch larger than memory allows; batch norm then normalises each chunk with its
    /// own statistics, and the online probe is off). 1: off.
    pub grad_cache_chunks: usize,
    /// Where to train: `auto` (the GPU of this rank, the one of its `LOCAL_RANK` or the only
    /// one it sees, when CUDA is usable, else the CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The precision of training on a GPU: `tf32` (TF32 tensor cores for the convolutions,
    /// PyTorch's default for cuDNN), `bf16` (mixed precision: bf16 tensor cores with f32
    /// accumulation and bf16 activations between the trunk's layers; f32 master weights,
    /// batch-norm statistics, head and loss) or `fp32`.
    pub cuda_math: String,
    /// Data-parallel training: the gradient all-reduce overlapped with the backward pass in
    /// buckets of this many MiB (25, as PyTorch DDP); 0: one all-reduce after the backward pass.
    /// The sums are the same bits either way on the CPU (NCCL on more than two GPUs may round
    /// differently: its summation order depends on the size reduced).
    pub allreduce_bucket_mib: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 256,
            epochs: 100,
            max_steps: 0,
            optimizer: OptimizerKind::Lars,
            lr: 0.3,
            lr_scaling: ScalingKind::Linear,
            warmup_epochs: 10.0,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-6,
            trust_coefficient: 0.001,
            exclude_bn_and_bias: true,
            loss: LossKind::NtXent,
            temperature: 0.5,
            margin: 0.5,
            semi_hard: false,
            seed: 0,
            checkpoint_every: 0,
            log_every: 10,
            online_probe: true,
            probe_lr: 0.1,
            grad_cache_chunks: 1,
            device: "auto".into(),
            cuda_math: "tf32".into(),
            allreduce_bucket_mib: simclr_nn::dist::DEFAULT_BUCKET_MIB,
        }
    }
}

/// Evaluation settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Run the k-NN monitor every this many epochs (0: never).
    pub knn_every: u64,
    /// Neighbours of the k-NN classifier.
    pub knn_k: usize,
    /// Temperature of the k-NN vote weights exp(sim / t).
    pub knn_temperature: f32,
    /// Epochs of the linear classifier.
    pub linear_epochs: usize,
    /// Its batch size.
    pub linear_batch_size: usize,
    /// Its learning rate (scaled linearly with the batch, per 256), Nesterov momentum 0.9.
    pub linear_lr: f32,
    /// Its weight decay.
    pub linear_weight_decay: f32,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            knn_every: 1,
            knn_k: 200,
            knn_temperature: 0.1,
            linear_epochs: 100,
            linear_batch_size: 256,
            linear_lr: 0.1,
            linear_weight_decay: 0.0,
        }
    }
}

/// Output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// The run's folder: config.toml, metrics.jsonl, checkpoints/.
    pub dir: PathBuf,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: PathBuf::from("runs/simclr"),
        }
    }
}

/// The built-in presets: (name, TOML).
pub const PRESETS: &[(&str, &str)] = &[
    ("quickstart", include_str!("presets/quickstart.toml")),
    (
        "cifar10-resnet18",
        include_str!("presets/cifar10-resnet18.toml"),
    ),
    (
        "cifar10-resnet50",
        include_str!("presets/cifar10-resnet50.toml"),
    ),
    ("stl10", include_str!("presets/stl10.toml")),
    (
        "imagenet-resnet50-1x",
        include_str!("presets/imagenet-resnet50-1x.toml"),
    ),
    (
        "imagenet-resnet50-2x",
        include_str!("presets/imagenet-resnet50-2x.toml"),
    ),
    (
        "imagenet-resnet50-4x",
        include_str!("presets/imagenet-resnet50-4x.toml"),
    ),
];

/// The most batches `data.prefetch` may hold ahead of the trainer: each holds all its views in
/// memory, and beyond a few the trainer never waits anyway.
pub const MAX_PREFETCH: usize = 64;

/// The lower end of the `data.threads` bound, so that a configuration written for a larger
/// machine still runs on a small one (idle threads cost little; thousands of them do not).
pub const MIN_THREAD_BOUND: usize = 64;

/// The upper end of the `data.threads` bound, whatever the machine.
pub const MAX_THREAD_BOUND: usize = 1024;

/// The largest `train.allreduce_bucket_mib`: a bucket is allocated on every GPU, and one larger
/// than the model's gradients only turns the overlap off.
pub const MAX_ALLREDUCE_BUCKET_MIB: f64 = 1024.0;

/// The largest side of an image (`data.image_size`, `data.eval_resize`,
/// `data.synthetic_side`): 18 times ImageNet's 224, and a batch of views that size already
/// fills a GPU.
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// The most images of either split of the synthetic set: each is drawn on demand, but its
/// index and label are held, and a set larger than this only makes an epoch endless.
pub const MAX_SYNTHETIC_IMAGES: usize = 10_000_000;

/// The largest `model.width` multiplier (the paper goes to 4).
pub const MAX_WIDTH_MULTIPLIER: usize = 16;

/// The most channels of the first stage (`model.base_width`): the last stage has 8 times as
/// many (32 with bottlenecks), and its weights grow with the square.
pub const MAX_BASE_WIDTH: usize = 1024;

/// The most blocks of one stage (`model.layers`; ResNet-152 has 36).
pub const MAX_BLOCKS_PER_STAGE: usize = 256;

/// The most hidden layers of the MLP head (the paper goes to 3).
pub const MAX_HEAD_LAYERS: usize = 64;

/// The widest projection (`model.projection_dim`, `model.head_hidden_dim`): a layer's weights
/// grow with its width times that of h.
pub const MAX_HEAD_DIM: usize = 65_536;

/// The most epochs of the linear evaluation (the paper uses 90 to 100), which has no step
/// limit of its own.
pub const MAX_LINEAR_EPOCHS: usize = 100_000;

/// The lowest `train.temperature`: the similarities are divided by it, and below this the
/// logits leave the range where the loss is computed in f32 without overflow.
pub const MIN_TEMPERATURE: f32 = 1e-4;

/// The cores this process may use (1 when the system does not say).
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most decode and augmentation threads `data.threads` may ask for on this machine: four
/// per core, within [`MIN_THREAD_BOUND`] and [`MAX_THREAD_BOUND`].
pub fn max_data_threads() -> usize {
    available_cores()
        .saturating_mul(4)
        .clamp(MIN_THREAD_BOUND, MAX_THREAD_BOUND)
}

/// Rewrites serde's "invalid value: integer `N`, expected u32" (an integer that does not fit the
/// key's type) as a message naming the key and the allowed range.
fn describe_deserialize_error(path: &str, inner: &str) -> String {
    let range = inner
        .strip_prefix("invalid value: integer `")
        .and_then(|rest| rest.split_once("`, expected "))
        .and_then(|(value, ty)| {
            // The deserialiser may append where the value was ("\nin `key`").
            let ty = ty.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
            let (lo, hi): (i128, u128) = match ty {
                "u8" => (0, u8::MAX.into()),
                "u16" => (0, u16::MAX.into()),
                "u32" => (0, u32::MAX.into()),
                "u64" => (0, u64::MAX.into()),
                "usize" => (0, usize::MAX as u128),
                "i32" => (i32::MIN.into(), i32::MAX as u128),
                "i64" => (i64::MIN.into(), i64::MAX as u128),
                _ => return None,
            };
            Some((value.to_string(), lo, hi))
        });
    match range {
        Some((value, lo, hi)) => {
            format!("{path}: {value} is out of range for {path} (allowed: {lo} to {hi})")
        }
        None => format!("{path}: {inner}"),
    }
}

/// What numbers a setting can take at all, for messages about one beyond them.
const NUMBER_RANGE: &str = "no setting takes an integer beyond -9223372036854775808 to \
    9223372036854775807, or a float beyond about 1.8e308";

/// Whether `value` is written as a number too large for TOML: a decimal integer (with TOML's
/// optional underscores) beyond 64 bits, or a float beyond f64.
fn is_out_of_range_number(value: &str) -> bool {
    use std::num::IntErrorKind;
    let plain = value.replace('_', "");
    let integer_overflows = matches!(
        plain.parse::<i64>().map_err(|e| *e.kind()),
        Err(IntErrorKind::PosOverflow | IntErrorKind::NegOverflow)
    );
    // Rust's float parser rounds 1e400 to infinity; `inf` itself has no digit.
    let float_overflows = plain.contains(|c: char| c.is_ascii_digit())
        && plain.parse::<f64>().is_ok_and(|v| v.is_infinite());
    integer_overflows || float_overflows
}

/// For a TOML parse error at `span` of `text` that is a number too large for TOML, a message
/// naming the line and the key (which the parser's own message does not).
fn out_of_range_in_file(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let value = text.get(span.clone())?.trim();
    if !is_out_of_range_number(value) {
        return None;
    }
    let before = &text[..span.start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let key = before[line_start..].split('=').next()?.trim();
    let bare_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !bare_key {
        return Some(format!(
            "line {line_no}: {value} is out of range ({NUMBER_RANGE})"
        ));
    }
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    let path = match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    };
    Some(format!(
        "line {line_no}: {value} is out of range for {path} ({NUMBER_RANGE})"
    ))
}

// NaN fails every comparison, so these checks are written as "is in the allowed set" rather
// than "is not in the forbidden set".

/// `Ok` when `v` is finite and above 0; otherwise a message naming `key` and `v`.
fn positive<T: Into<f64> + std::fmt::Display + Copy>(
    key: &str,
    v: T,
) -> std::result::Result<(), String> {
    let x: f64 = v.into();
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "{key}: {v} is not allowed: it must be a finite number above 0"
        ))
    }
}

/// `Ok` when `v` is finite and at least 0; otherwise a message naming `key` and `v`.
fn non_negative<T: Into<f64> + std::fmt::Display + Copy>(
    key: &str,
    v: T,
) -> std::result::Result<(), String> {
    let x: f64 = v.into();
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(format!(
            "{key}: {v} is not allowed: it must be a finite number of at least 0"
        ))
    }
}

fn key_err(key: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Config {
        source_name: "settings".into(),
        msg: format!("{key}: {e}"),
    }
}

/// Parses TOML text into a table; `name` names it in errors.
fn parse_table(text: &str, name: &str) -> Result<toml::Table> {
    text.parse::<toml::Table>().map_err(|e| CliError::Config {
        source_name: name.to_string(),
        msg: e
            .span()
            .and_then(|span| out_of_range_in_file(text, span))
            .unwrap_or_else(|| e.to_string()),
    })
}

/// Merges `over` into `base`, tables key by key, other values replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The preset called `name`, as a table (with its own `preset` key removed).
fn preset_table(name: &str) -> Result<toml::Table> {
    let text = PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| CliError::Config {
            source_name: "preset".into(),
            msg: format!(
                "unknown preset `{name}`; the presets are {}",
                PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    parse_table(text, &format!("preset {name}"))
}

/// One `--set key.path=value` override as a table. The value is TOML (`0.5`, `true`,
/// `[0.08, 1.0]`, `"text"`); anything that is not TOML is taken as a string.
pub fn override_table(spec: &str) -> Result<toml::Table> {
    let (key, value) = spec.split_once('=').ok_or_else(|| CliError::Config {
        source_name: format!("--set {spec}"),
        msg: "expected key=value, e.g. train.epochs=10".into(),
    })?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(CliError::Config {
            source_name: format!("--set {spec}"),
            msg: format!("`{key}` is not a key path like train.epochs"),
        });
    }
    let value = value.trim();
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    // A number TOML cannot hold would otherwise be taken as a string, and reported as a string
    // where a number belongs.
    if parsed.is_none() && is_out_of_range_number(value) {
        return Err(CliError::Config {
            source_name: format!("--set {spec}"),
            msg: format!("{key}: {value} is out of range for {key} ({NUMBER_RANGE})"),
        });
    }
    let parsed = parsed.unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut table = toml::Table::new();
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = &mut table;
    for p in &parts[..parts.len() - 1] {
        cur = match cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => t,
            _ => unreachable!("just inserted a table"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(table)
}

impl Config {
    /// Builds a configuration: the defaults, then `preset` (or the file's own `preset` key),
    /// then the file, then the overrides.
    pub fn build(
        preset: Option<&str>,
        file: Option<&Path>,
        overrides: &[String],
    ) -> Result<Config> {
        let mut table = toml::Table::new();
        let mut origin = String::from("defaults");
        let file_table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| CliError::Config {
                    source_name: path.display().to_string(),
                    msg: format!("cannot read: {e}"),
                })?;
                Some(parse_table(&text, &path.display().to_string())?)
            }
            None => None,
        };
        let file_preset = match file_table.as_ref().and_then(|t| t.get("preset")) {
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(CliError::Config {
                    source_name: file.map(|p| p.display().to_string()).unwrap_or_default(),
                    msg: format!("preset: expected a preset name, got {other}"),
                })
            }
            None => None,
        };
        let preset_origin = match (preset, file) {
            (None, Some(path)) => path.display().to_string(),
            _ => "--preset".to_string(),
        };
        if let Some(name) = preset.map(str::to_string).or(file_preset) {
            let preset = preset_table(&name).map_err(|e| match e {
                CliError::Config { msg, .. } => CliError::Config {
                    source_name: preset_origin.clone(),
                    msg: format!("preset: {msg}"),
                },
                other => other,
            })?;
            merge(&mut table, preset);
            table.insert("preset".into(), toml::Value::String(name.clone()));
            origin = format!("preset {name}");
        }
        if let (Some(t), Some(path)) = (file_table, file) {
            merge(&mut table, t);
            origin = path.display().to_string();
        }
        for o in overrides {
            merge(&mut table, override_table(o)?);
        }
        if !overrides.is_empty() {
            origin.push_str(" with --set overrides");
        }
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                CliError::Config {
                    source_name: origin.clone(),
                    msg: describe_deserialize_error(&e.path().to_string(), &e.inner().to_string()),
                }
            })?;
        cfg.validate().map_err(|msg| CliError::Config {
            source_name: origin,
            msg,
        })?;
        Ok(cfg)
    }

    /// Reads a configuration written by [`Config::to_toml`] (a run's config.toml).
    pub fn load(path: &Path) -> Result<Config> {
        Config::build(None, Some(path), &[])
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serialises")
    }

    /// Checks the values that deserialisation cannot; the message names the key, the value and
    /// what is allowed.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.train;
        let check = |ok: bool, key: &str, what: String| {
            if ok {
                Ok(())
            } else {
                Err(format!("{key}: {what}"))
            }
        };
        check(
            t.batch_size >= 2,
            "train.batch_size",
            format!("{} is below 2 (NT-Xent needs negatives)", t.batch_size),
        )?;
        check(
            t.grad_cache_chunks >= 1 && t.grad_cache_chunks <= t.batch_size,
            "train.grad_cache_chunks",
            format!(
                "{} is not between 1 and the batch size {}",
                t.grad_cache_chunks, t.batch_size
            ),
        )?;
        let cuda_ordinal = t.device.strip_prefix("cuda:").map(str::parse::<usize>);
        check(
            matches!(t.device.as_str(), "auto" | "cpu" | "cuda")
                || matches!(cuda_ordinal, Some(Ok(_))),
            "train.device",
            format!("`{}` is not one of auto, cpu, cuda, cuda:N", t.device),
        )?;
        check(
            matches!(t.cuda_math.as_str(), "fp32" | "tf32" | "bf16"),
            "train.cuda_math",
            format!("`{}` is not one of fp32, tf32, bf16", t.cuda_math),
        )?;
        check(
            t.allreduce_bucket_mib.is_finite()
                && (0.0..=MAX_ALLREDUCE_BUCKET_MIB).contains(&t.allreduce_bucket_mib),
            "train.allreduce_bucket_mib",
            format!(
                "{} is not a size in MiB from 0 to {MAX_ALLREDUCE_BUCKET_MIB} (0 turns the \
                 overlap off)",
                t.allreduce_bucket_mib
            ),
        )?;
        check(
            !(self.data.gpu_augment && t.device == "cpu"),
            "data.gpu_augment",
            "the GPU colour stage needs train.device = auto, cuda or cuda:N, not cpu".into(),
        )?;
        check(
            t.epochs >= 1 || t.max_steps >= 1,
            "train.epochs",
            "0 epochs and no max_steps".into(),
        )?;
        positive("train.lr", t.lr)?;
        positive("train.temperature", t.temperature)?;
        check(
            t.temperature >= MIN_TEMPERATURE,
            "train.temperature",
            format!("{} is below {MIN_TEMPERATURE}", t.temperature),
        )?;
        non_negative("train.warmup_epochs", t.warmup_epochs)?;
        check(
            (0.0..1.0).contains(&t.momentum),
            "train.momentum",
            format!("{} is not in [0, 1)", t.momentum),
        )?;
        non_negative("train.weight_decay", t.weight_decay)?;
        positive("train.trust_coefficient", t.trust_coefficient)?;
        non_negative("train.margin", t.margin)?;
        positive("train.probe_lr", t.probe_lr)?;
        let d = &self.data;
        check(
            d.image_size >= 8,
            "data.image_size",
            format!("{} is below 8", d.image_size),
        )?;
        check(
            d.synthetic_side >= 8,
            "data.synthetic_side",
            format!("{} is below 8", d.synthetic_side),
        )?;
        for (key, side) in [
            ("data.image_size", d.image_size),
            ("data.eval_resize", d.eval_resize),
            ("data.synthetic_side", d.synthetic_side),
        ] {
            check(
                side <= MAX_IMAGE_SIDE,
                key,
                format!("{side} pixels is more than {MAX_IMAGE_SIDE}"),
            )?;
        }
        if d.dataset == DatasetKind::Synthetic {
            for (key, n) in [
                ("data.synthetic_train", d.synthetic_train),
                ("data.synthetic_test", d.synthetic_test),
            ] {
                check(
                    (1..=MAX_SYNTHETIC_IMAGES).contains(&n),
                    key,
                    format!("{n} images is not in 1..={MAX_SYNTHETIC_IMAGES}"),
                )?;
            }
        }
        check(
            d.test_fraction > 0.0 && d.test_fraction < 1.0,
            "data.test_fraction",
            format!("{} is not in (0, 1)", d.test_fraction),
        )?;
        check(
            d.dataset == DatasetKind::Synthetic || d.path.is_some(),
            "data.path",
            format!("the {:?} data set needs a path", d.dataset),
        )?;
        let max_threads = max_data_threads();
        check(
            d.threads <= max_threads,
            "data.threads",
            format!(
                "{} threads is too many: the allowed range is 0..={max_threads} (0: one per \
                 core; the bound is 4 per core of the {} cores here, kept within {}..={})",
                d.threads,
                available_cores(),
                MIN_THREAD_BOUND,
                MAX_THREAD_BOUND
            ),
        )?;
        check(
            d.prefetch <= MAX_PREFETCH,
            "data.prefetch",
            format!(
                "{} batches ahead is too many: the allowed range is 0..={MAX_PREFETCH} (each \
                 waiting batch holds all its views in memory)",
                d.prefetch
            ),
        )?;
        let a = &self.augment;
        for (key, p) in [
            ("augment.flip", a.flip),
            ("augment.jitter", a.jitter),
            ("augment.grayscale", a.grayscale),
            ("augment.blur", a.blur),
            ("augment.rotation", a.rotation),
            ("augment.cutout", a.cutout),
            ("augment.sobel", a.sobel),
            ("augment.noise", a.noise),
        ] {
            check(
                (0.0..=1.0).contains(&p),
                key,
                format!("probability {p} is not in [0, 1]"),
            )?;
        }
        non_negative("augment.strength", a.strength)?;
        check(
            0.0 < a.crop_scale[0] && a.crop_scale[0] <= a.crop_scale[1] && a.crop_scale[1] <= 1.0,
            "augment.crop_scale",
            format!("{:?} is not a range within (0, 1]", a.crop_scale),
        )?;
        check(
            0.0 < a.crop_ratio[0]
                && a.crop_ratio[0] <= a.crop_ratio[1]
                && a.crop_ratio[1].is_finite(),
            "augment.crop_ratio",
            format!("{:?} is not a finite positive range [lo, hi]", a.crop_ratio),
        )?;
        check(
            0.0 < a.blur_sigma[0]
                && a.blur_sigma[0] <= a.blur_sigma[1]
                && a.blur_sigma[1].is_finite(),
            "augment.blur_sigma",
            format!("{:?} is not a finite positive range [lo, hi]", a.blur_sigma),
        )?;
        let m = &self.model;
        check(
            (1..=MAX_HEAD_DIM).contains(&m.projection_dim),
            "model.projection_dim",
            format!("{} is not in 1..={MAX_HEAD_DIM}", m.projection_dim),
        )?;
        check(
            m.head_hidden_dim <= MAX_HEAD_DIM,
            "model.head_hidden_dim",
            format!(
                "{} is not in 0..={MAX_HEAD_DIM} (0: the width of h)",
                m.head_hidden_dim
            ),
        )?;
        check(
            m.head_hidden_layers <= MAX_HEAD_LAYERS,
            "model.head_hidden_layers",
            format!("{} is not in 0..={MAX_HEAD_LAYERS}", m.head_hidden_layers),
        )?;
        let e = &self.eval;
        check(e.knn_k >= 1, "eval.knn_k", "must be at least 1".into())?;
        positive("eval.knn_temperature", e.knn_temperature)?;
        check(
            e.linear_batch_size >= 1,
            "eval.linear_batch_size",
            "must be at least 1".into(),
        )?;
        check(
            e.linear_epochs <= MAX_LINEAR_EPOCHS,
            "eval.linear_epochs",
            format!("{} is not in 0..={MAX_LINEAR_EPOCHS}", e.linear_epochs),
        )?;
        positive("eval.linear_lr", e.linear_lr)?;
        non_negative("eval.linear_weight_decay", e.linear_weight_decay)?;
        self.model.encoder().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The contrastive loss of `train`.
    pub fn loss(&self) -> simclr_nn::ContrastiveLoss {
        let t = &self.train;
        match t.loss {
            LossKind::NtXent => simclr_nn::ContrastiveLoss::NtXent {
                temperature: t.temperature,
            },
            LossKind::NtLogistic => simclr_nn::ContrastiveLoss::NtLogistic {
                temperature: t.temperature,
            },
            LossKind::MarginTriplet => simclr_nn::ContrastiveLoss::MarginTriplet {
                margin: t.margin,
                semi_hard: t.semi_hard,
            },
        }
    }

    /// The peak learning rate after batch scaling.
    pub fn peak_lr(&self) -> f32 {
        LrScaling::from(self.train.lr_scaling).scale(self.train.lr, self.train.batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for (name, _) in PRESETS {
            let c = Config::build(Some(name), None, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.preset.as_deref(), Some(*name));
        }
    }

    #[test]
    fn overrides_apply_in_order_and_are_typed() {
        let c = Config::build(
            Some("cifar10-resnet18"),
            None,
            &[
                "train.epochs=3".into(),
                "augment.crop_scale=[0.2, 1.0]".into(),
                "output.dir=out/x".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.epochs, 3);
        assert_eq!(c.augment.crop_scale, [0.2, 1.0]);
        assert_eq!(c.output.dir, PathBuf::from("out/x"));
    }

    #[test]
    fn devices_are_checked_by_name() {
        for ok in ["auto", "cpu", "cuda", "cuda:3"] {
            let c = Config::build(None, None, &[format!("train.device=\"{ok}\"")]).unwrap();
            assert_eq!(c.train.device, ok);
        }
        assert_eq!(Config::build(None, None, &[]).unwrap().train.device, "auto");
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let e = Config::build(None, None, &[format!("train.device=\"{bad}\"")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("train.device") && e.contains(bad), "{e}");
        }
        let e = Config::build(
            None,
            None,
            &[
                "train.device=\"cpu\"".into(),
                "data.gpu_augment=true".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("data.gpu_augment"), "{e}");
        let e = Config::build(None, None, &["train.cuda_math=\"fp16\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.cuda_math") && e.contains("fp16"), "{e}");
        let e = Config::build(None, None, &["train.allreduce_bucket_mib=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.allreduce_bucket_mib") && e.contains("-1"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "[train]\nbach_size = 64\n").unwrap();
        let e = Config::build(None, Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bach_size") && e.contains("run.toml"), "{e}");
        std::fs::write(&path, "[trian]\nbatch_size = 64\n").unwrap();
        let e = Config::build(None, Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("trian") && e.contains("run.toml"), "{e}");
    }

    #[test]
    fn ill_typed_values_name_the_key_path() {
        let e = Config::build(None, None, &["train.batch_size=\"many\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.batch_size"), "{e}");
        let e = Config::build(None, None, &["train.temperature=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.temperature"), "{e}");
        let e = Config::build(Some("nope"), None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("cifar10-resnet18"), "{e}");
    }

    fn build_err(overrides: &[&str]) -> String {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::build(None, None, &overrides)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn resource_settings_have_upper_bounds() {
        let e = build_err(&["data.threads=100000"]);
        assert!(
            e.contains("data.threads") && e.contains("100000") && e.contains("0..="),
            "{e}"
        );
        let e = build_err(&["data.prefetch=100000"]);
        assert!(
            e.contains("data.prefetch") && e.contains("100000") && e.contains("0..=64"),
            "{e}"
        );
        let e = build_err(&["train.allreduce_bucket_mib=1e9"]);
        assert!(e.contains("train.allreduce_bucket_mib"), "{e}");
        let max = max_data_threads();
        assert!((MIN_THREAD_BOUND..=MAX_THREAD_BOUND).contains(&max));
        let ok = Config::build(
            None,
            None,
            &[
                format!("data.threads={max}"),
                format!("data.prefetch={MAX_PREFETCH}"),
            ],
        )
        .unwrap();
        assert_eq!(ok.data.threads, max);
        let e = build_err(&[&format!("data.threads={}", max + 1)]);
        assert!(e.contains(&format!("0..={max}")), "{e}");
    }

    #[test]
    fn float_settings_must_be_finite_and_meaningful() {
        for (key, bad) in [
            ("eval.knn_temperature", "0"),
            ("eval.knn_temperature", "-0.5"),
            // Shown as written, not widened to f64's "-0.10000000149011612".
            ("eval.knn_temperature", "-0.1"),
            ("eval.knn_temperature", "nan"),
            ("eval.knn_temperature", "inf"),
            ("eval.linear_lr", "0"),
            ("eval.linear_lr", "nan"),
            ("eval.linear_weight_decay", "-1"),
            ("eval.linear_weight_decay", "inf"),
            ("train.lr", "nan"),
            ("train.lr", "-inf"),
            ("train.temperature", "0"),
            ("train.weight_decay", "inf"),
            ("train.weight_decay", "-0.1"),
            ("train.warmup_epochs", "inf"),
            ("train.warmup_epochs", "nan"),
            ("train.momentum", "nan"),
            ("train.momentum", "1"),
            ("train.trust_coefficient", "0"),
            ("train.trust_coefficient", "nan"),
            ("train.margin", "-1"),
            ("train.margin", "inf"),
            ("train.probe_lr", "0"),
            ("train.probe_lr", "nan"),
            ("train.allreduce_bucket_mib", "nan"),
            ("data.test_fraction", "nan"),
            ("augment.strength", "-1"),
            ("augment.strength", "inf"),
            ("augment.flip", "nan"),
            ("augment.crop_scale", "[0.0, 1.0]"),
            ("augment.crop_scale", "[0.5, nan]"),
            ("augment.crop_ratio", "[0.75, inf]"),
            ("augment.crop_ratio", "[nan, 1.0]"),
            ("augment.blur_sigma", "[0.1, inf]"),
            ("augment.blur_sigma", "[-1.0, 2.0]"),
            ("augment.blur_sigma", "[2.0, 1.0]"),
        ] {
            let e = build_err(&[&format!("{key}={bad}")]).to_lowercase();
            let shown = bad.trim_start_matches('[').split(',').next().unwrap();
            let shown = shown.replace("inf", "");
            assert!(
                e.contains(key) && e.contains(&shown) && !e.contains("0000000"),
                "{key}={bad}: {e}"
            );
        }
        // Zero is meaningful for these.
        Config::build(
            None,
            None,
            &[
                "train.weight_decay=0".into(),
                "train.warmup_epochs=0".into(),
                "train.margin=0".into(),
                "augment.strength=0".into(),
                "eval.linear_weight_decay=0".into(),
                "train.allreduce_bucket_mib=0".into(),
            ],
        )
        .unwrap();
    }

    #[test]
    fn out_of_range_numbers_name_the_key() {
        for (spec, key) in [
            ("train.epochs=99999999999999999999", "train.epochs"),
            ("train.seed=-99999999999999999999", "train.seed"),
            ("data.image_size=5000000000", "data.image_size"),
            ("train.batch_size=-1", "train.batch_size"),
        ] {
            let e = build_err(&[spec]);
            assert!(
                e.contains(&format!("out of range for {key}")) && !e.contains("invalid type"),
                "{spec}: {e}"
            );
        }
        let e = build_err(&["data.image_size=5000000000"]);
        assert!(e.contains("4294967295"), "{e}");
        let e = build_err(&["train.lr=1e400"]);
        assert!(e.contains("out of range for train.lr"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        for (text, want) in [
            (
                "[train]\nseed = 1\nepochs = 99999999999999999999\n",
                "line 3: 99999999999999999999 is out of range for train.epochs",
            ),
            (
                "train.lr = 1e400\n",
                "line 1: 1e400 is out of range for train.lr",
            ),
            (
                "[augment]\ncrop_scale = [0.1, 1e999]\n",
                "line 2: 1e999 is out of range for augment.crop_scale",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::build(None, Some(&path), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("run.toml") && e.contains(want), "{text}: {e}");
        }
        // Not a number at all: still a type error naming the key.
        let e = build_err(&["train.epochs=1__0"]);
        assert!(e.contains("train.epochs") && e.contains("string"), "{e}");
    }

    #[test]
    fn the_origin_names_overrides_once_and_presets_their_file() {
        let e = build_err(&[
            "train.epochs=1",
            "train.seed=2",
            "train.log_every=3",
            "train.lr=0",
        ]);
        assert_eq!(e.matches("with --set overrides").count(), 1, "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "preset = \"nope\"\n").unwrap();
        let e = Config::build(None, Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml") && e.contains("nope") && e.contains("quickstart"),
            "{e}"
        );
    }

    #[test]
    fn sizes_have_upper_bounds_named_by_key() {
        for (spec, key) in [
            ("model.width=0", "model.width"),
            ("model.width=4294967296", "model.width"),
            ("model.base_width=4294967296", "model.base_width"),
            ("model.layers=[1, 1, 100000, 1]", "model.layers"),
            (
                "model.head_hidden_layers=4294967296",
                "model.head_hidden_layers",
            ),
            ("model.head_hidden_dim=4294967296", "model.head_hidden_dim"),
            ("model.projection_dim=4294967296", "model.projection_dim"),
            ("data.synthetic_train=0", "data.synthetic_train"),
            ("data.synthetic_test=4294967296", "data.synthetic_test"),
            ("data.image_size=4294967295", "data.image_size"),
            ("data.eval_resize=100000", "data.eval_resize"),
            ("eval.linear_epochs=4294967296", "eval.linear_epochs"),
            ("train.temperature=1e-45", "train.temperature"),
        ] {
            let e = build_err(&[spec]);
            assert!(e.contains(key), "{spec}: {e}");
        }
        // The synthetic sizes do not matter for a data set read from disk.
        Config::build(Some("stl10"), None, &["data.synthetic_train=0".into()]).unwrap();
    }

    #[test]
    fn a_written_config_reads_back_the_same() {
        let c = Config::build(Some("stl10"), None, &["train.seed=7".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, c.to_toml()).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
    }
}

//! Pre-training: the SimCLR loop with checkpoints, exact resume, metrics, the online linear
//! probe and the k-NN monitor.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use simclr_data::{Augmentation, Loader, LoaderConfig, OutputFormat};
use simclr_nn::dist::{broadcast_state, Communicator, DataParallel};
use simclr_nn::layers::Linear;
use simclr_nn::{
    Checkpoint, Device, Lars, Module, NnError, Optimizer, Sgd, SimClr, Tensor, WarmupCosine,
};

use crate::classifier::softmax_cross_entropy;
use crate::config::{Config, OptimizerKind};
use crate::data::{self, DataSplits, SkipLog};
use crate::error::{io_err, CliError, Result};
use crate::features::{extract_logged, Representation};
use crate::gpu_augment::GpuAugment;
use crate::knn::knn_accuracy;
use crate::state::{self, Progress};

/// Fewest images a training step takes: batch norm needs two samples per channel, and NT-Xent
/// has no negatives with one image.
const MIN_BATCH: usize = 2;

/// What one step did, passed to the observer.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct StepRecord {
    /// Steps done (this one included).
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// The epoch.
    pub epoch: u64,
    /// NT-Xent loss.
    pub loss: f32,
    /// Learning rate.
    pub lr: f32,
    /// The online probe's top-1 on this batch (percent), if there is a probe.
    pub probe_top1: Option<f64>,
    /// Images per second over the recent steps.
    pub images_per_s: f64,
}

/// What the observer tells the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Write a checkpoint and stop as if interrupted.
    Stop,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Steps done in all.
    pub steps: u64,
    /// The last step's loss.
    pub last_loss: f32,
    /// The last k-NN top-1, if measured.
    pub knn_top1: Option<f64>,
    /// The final checkpoint.
    pub checkpoint: PathBuf,
}

/// The optimiser `cfg` asks for.
pub fn optimizer(cfg: &Config) -> Box<dyn Optimizer> {
    let t = &cfg.train;
    match t.optimizer {
        OptimizerKind::Lars => {
            let mut lars = Lars::default();
            lars.momentum = t.momentum;
            lars.trust_coefficient = t.trust_coefficient;
            lars.weight_decay = t.weight_decay;
            lars.exclude_bn_and_bias = t.exclude_bn_and_bias;
            lars.nesterov = t.nesterov;
            Box::new(lars)
        }
        OptimizerKind::Sgd => Box::new(Sgd::new(t.momentum, t.nesterov, t.weight_decay)),
    }
}

/// A pre-training run in its folder.
pub struct Trainer {
    cfg: Config,
    run_dir: PathBuf,
    splits: DataSplits,
    loader: Loader,
    model: SimClr,
    opt: Box<dyn Optimizer>,
    probe: Option<(Linear, Sgd)>,
    progress: Progress,
    /// The metrics file (rank 0 only).
    metrics: Option<std::fs::File>,
    last_knn: Option<f64>,
    /// The replicas of a data-parallel run.
    dp: Option<DataParallel>,
    /// The colour stage on the GPU (`data.gpu_augment`).
    gpu_augment: Option<GpuAugment>,
    /// The unreadable images reported so far (`data.skip_bad_images`).
    skips: SkipLog,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run_dir", &self.run_dir)
            .field("progress", &self.progress)
            .finish()
    }
}

fn check_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok")
        .map_err(|e| io_err(dir, format!("the output folder is not writable: {e}")))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// What rank 0 writes into the run folder once the trainer is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// A new run: the folder is created and gets its config.toml.
    New,
    /// A resumed run whose settings were overridden: its config.toml is replaced.
    ResumeChanged,
    /// A resumed run as it was: its files stay as they are.
    Resume,
}

impl Trainer {
    /// A new run of `cfg` in `cfg.output.dir`, which must not hold a checkpoint already.
    pub fn new(cfg: Config) -> Result<Trainer> {
        Self::new_data_parallel(cfg, None)
    }

    /// A new run as one replica of a data-parallel group (`comm`; `None`: a single process).
    /// Every replica trains on its share of each batch (`train.batch_size / world` images) with
    /// global batch norm and gathered negatives; only rank 0 writes the run folder, and only
    /// once the data, the model and the devices are ready, so a run that cannot start leaves
    /// no folder behind.
    pub fn new_data_parallel(cfg: Config, comm: Option<Arc<dyn Communicator>>) -> Result<Trainer> {
        let run_dir = cfg.output.dir.clone();
        if state::checkpoint_path(&run_dir).exists() {
            return Err(CliError::Usage(format!(
                "{} already holds a run; resume it with `simclr pretrain --resume {}`, or choose \
                 another output.dir",
                run_dir.display(),
                run_dir.display()
            )));
        }
        Self::build(cfg, run_dir, None, comm, Setup::New)
    }

    /// Resumes the run in `run_dir` from its checkpoint, with its saved configuration
    /// (`overrides` may change, say, `train.epochs`; they are saved into its config.toml once
    /// the run has started, so a resume that fails leaves the folder as it was).
    pub fn resume(run_dir: &Path, overrides: &[String]) -> Result<Trainer> {
        Self::resume_data_parallel(run_dir, overrides, None)
    }

    /// [`Trainer::resume`] as one replica of a data-parallel group: any world size resumes any
    /// run (the batches are the same global batches whatever the number of replicas).
    pub fn resume_data_parallel(
        run_dir: &Path,
        overrides: &[String],
        comm: Option<Arc<dyn Communicator>>,
    ) -> Result<Trainer> {
        let cfg_path = run_dir.join("config.toml");
        if !cfg_path.exists() {
            return Err(io_err(&cfg_path, "no config.toml: not a run folder"));
        }
        let mut cfg = Config::build(None, Some(&cfg_path), overrides)?;
        cfg.output.dir = run_dir.to_path_buf();
        let ck_path = state::checkpoint_path(run_dir);
        let ck = Checkpoint::load(&ck_path)?;
        let setup = if overrides.is_empty() {
            Setup::Resume
        } else {
            Setup::ResumeChanged
        };
        Self::build(cfg, run_dir.to_path_buf(), Some(ck), comm, setup)
    }

    /// Rank 0's writes into the run folder, the last step of [`Trainer::build`]: everything
    /// that can refuse the run has succeeded by then. Returns the open metrics file.
    fn prepare_run_dir(cfg: &Config, run_dir: &Path, setup: Setup) -> Result<std::fs::File> {
        let cfg_path = run_dir.join("config.toml");
        match setup {
            Setup::New => {
                std::fs::create_dir_all(run_dir).map_err(|e| {
                    io_err(run_dir, format!("cannot create the output folder: {e}"))
                })?;
                crate::export::write_whole(&cfg_path, cfg.to_toml().as_bytes())?;
            }
            Setup::ResumeChanged => {
                crate::export::write_whole(&cfg_path, cfg.to_toml().as_bytes())?
            }
            // Nothing else is written before the next checkpoint: an unwritable folder would
            // otherwise be found only after that stretch of training.
            Setup::Resume => check_writable(run_dir)?,
        }
        let metrics_path = run_dir.join("metrics.jsonl");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| io_err(&metrics_path, e))
    }

    fn build(
        cfg: Config,
        run_dir: PathBuf,
        ck: Option<Checkpoint>,
        comm: Option<Arc<dyn Communicator>>,
        setup: Setup,
    ) -> Result<Trainer> {
        let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world_size()));
        if cfg.train.batch_size % world != 0 {
            return Err(CliError::Config {
                source_name: "settings".into(),
                msg: format!(
                    "train.batch_size: {} does not divide among {world} replicas",
                    cfg.train.batch_size
                ),
            });
        }
        if world > 1 && cfg.train.grad_cache_chunks > 1 {
            return Err(CliError::Config {
                source_name: "settings".into(),
                msg: "train.grad_cache_chunks: gradient caching is not combined with data \
                      parallelism yet; use one or the other"
                    .into(),
            });
        }
        let splits = data::open(&cfg.data, cfg.train.seed)?;
        let aug_cfg = cfg.augment.to_augment(cfg.data.image_size);
        let device = train_device(&cfg.train.device)?;
        let gpu_augment = if cfg.data.gpu_augment {
            if cfg.augment.sobel > 0.0 {
                return Err(CliError::Config {
                    source_name: "settings".into(),
                    msg: "data.gpu_augment: Sobel filtering (augment.sobel) runs on the CPU only"
                        .into(),
                });
            }
            let n = &aug_cfg.normalize;
            Some(GpuAugment::new(device, n.mean, n.std)?)
        } else {
            None
        };
        let aug = Augmentation::new(aug_cfg)?;
        let loader = Loader::new(
            splits.pretrain.clone(),
            aug,
            LoaderConfig {
                batch_size: cfg.train.batch_size / world,
                rank,
                world_size: world,
                seed: cfg.train.seed,
                threads: cfg.data.threads,
                prefetch: cfg.data.prefetch.max(1),
                errors: cfg.data.error_policy(),
                output: if gpu_augment.is_some() {
                    OutputFormat::U8Geometry
                } else {
                    OutputFormat::F32
                },
                ..LoaderConfig::default()
            },
        )?;
        if loader.batches_per_epoch() == 0 {
            return Err(CliError::Config {
                source_name: "settings".into(),
                msg: format!(
                    "train.batch_size: {} is more than the {} pre-training images",
                    cfg.train.batch_size,
                    splits.pretrain.len()
                ),
            });
        }
        let mut model = SimClr::new(&cfg.model.simclr()?, device, cfg.train.seed)?;
        if let Device::Cuda(i) = device {
            let math: simclr_nn::cuda::MathMode = cfg.train.cuda_math.parse()?;
            simclr_nn::cuda::CudaBackend::get(i)?.set_math_mode(math);
        }
        // GPU replicas talk through NCCL; the TCP group of the rendezvous carries its id. The
        // ranks first agree that all train on GPUs or all on the CPU (a mix would leave the GPU
        // ranks waiting in NCCL's initialisation for one that never comes).
        if let Some(c) = &comm {
            let kind = [u8::from(matches!(device, Device::Cuda(_)))];
            let kinds = c
                .all_gather_bytes(&kind, "device kinds")
                .map_err(NnError::from)?;
            if kinds.iter().any(|k| k.as_slice() != kind) {
                return Err(CliError::Config {
                    source_name: "settings".into(),
                    msg: format!(
                        "train.device: some ranks train on a GPU and others on the CPU (this \
                         rank: {device}); give every rank a GPU or set train.device = \"cpu\""
                    ),
                });
            }
        }
        let comm = match (comm, device) {
            (Some(tcp), Device::Cuda(_)) if tcp.world_size() > 1 => {
                let nccl = simclr_nn::dist::NcclComm::new(
                    tcp.as_ref(),
                    device,
                    simclr_nn::dist::default_timeout(),
                )?;
                Some(Arc::new(nccl) as Arc<dyn Communicator>)
            }
            (c, _) => c,
        };
        let mut opt = optimizer(&cfg);
        let classes = splits.train.num_classes();
        let mut probe = (cfg.train.online_probe && splits.pretrain.num_classes() > 0).then(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed ^ 0x9e0be);
            (
                Linear::new(model.encoder.feature_dim(), classes, true, &mut rng),
                Sgd::new(0.9, false, 0.0),
            )
        });
        let progress = match &ck {
            Some(ck) => state::load(
                ck,
                &mut model,
                opt.as_mut(),
                probe.as_mut().map(|(l, o)| (l, o as &mut dyn Optimizer)),
            )?,
            None => Progress::default(),
        };
        let bucket_mib = cfg.train.allreduce_bucket_mib;
        let dp = match comm.map(DataParallel::new) {
            // Duplicates the communicator: every rank gets here at the same point.
            Some(dp) if bucket_mib > 0.0 => Some(dp.with_overlap(bucket_mib)?),
            dp => dp,
        };
        if let Some(dp) = &dp {
            // Same seed, same checkpoint: the replicas already agree; the broadcast makes sure.
            broadcast_state(&mut model, dp.comm.as_ref(), 0)?;
        }
        let metrics = if rank == 0 {
            Some(Self::prepare_run_dir(&cfg, &run_dir, setup)?)
        } else {
            None
        };
        Ok(Trainer {
            cfg,
            run_dir,
            splits,
            loader,
            model,
            opt,
            probe,
            progress,
            metrics,
            last_knn: None,
            dp,
            gpu_augment,
            skips: SkipLog::default(),
        })
    }

    /// This process's rank and the number of replicas (0 and 1 without data parallelism).
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.dp
            .as_ref()
            .map_or((0, 1), |d| (d.comm.rank(), d.comm.world_size()))
    }

    fn is_main(&self) -> bool {
        self.rank_and_world().0 == 0
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The model.
    pub fn model(&mut self) -> &mut SimClr {
        &mut self.model
    }

    /// Where the run stands.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// The data splits.
    pub fn splits(&self) -> &DataSplits {
        &self.splits
    }

    /// Steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.loader.batches_per_epoch() as u64
    }

    /// Steps of the whole run (`max_steps` aside).
    pub fn total_steps(&self) -> u64 {
        self.cfg.train.epochs * self.steps_per_epoch()
    }

    fn schedule(&self) -> WarmupCosine {
        WarmupCosine {
            peak: self.cfg.peak_lr(),
            warmup_steps: (self.cfg.train.warmup_epochs * self.steps_per_epoch() as f64).round()
                as u64,
            total_steps: self.total_steps(),
        }
    }

    fn checkpoint(&mut self) -> Result<PathBuf> {
        let path = state::checkpoint_path(&self.run_dir);
        if !self.is_main() {
            return Ok(path);
        }
        let toml = self.cfg.to_toml();
        state::save(
            &path,
            &mut self.model,
            self.opt.as_mut(),
            self.probe
                .as_mut()
                .map(|(l, o)| (l, o as &mut dyn Optimizer)),
            self.progress,
            &toml,
        )?;
        Ok(path)
    }

    fn record(&mut self, value: serde_json::Value) -> Result<()> {
        let path = self.run_dir.join("metrics.jsonl");
        match &mut self.metrics {
            Some(m) => writeln!(m, "{value}").map_err(|e| io_err(&path, e)),
            None => Ok(()),
        }
    }

    /// The k-NN top-1 of the current encoder: the labelled training split as the memory bank,
    /// the test split as queries.
    pub fn knn(&mut self) -> Result<f64> {
        let b = self.cfg.eval.linear_batch_size.max(64);
        let train = extract_logged(
            &mut self.model,
            self.splits.train.clone(),
            &self.cfg,
            Representation::H,
            b,
            &mut self.skips,
        )?;
        let test = extract_logged(
            &mut self.model,
            self.splits.test.clone(),
            &self.cfg,
            Representation::H,
            b,
            &mut self.skips,
        )?;
        let acc = knn_accuracy(
            &train,
            &test,
            self.splits.train.num_classes(),
            self.cfg.eval.knn_k,
            self.cfg.eval.knn_temperature,
        )?;
        Ok(acc.top1)
    }

    fn probe_step(&mut self, h: &Tensor, labels: &[u32], lr: f32) -> Result<Option<f64>> {
        let Some((layer, opt)) = self.probe.as_mut() else {
            return Ok(None);
        };
        let n = h.shape()[0];
        // Both views of image i carry its label; h is detached (a copy), so no gradient
        // reaches the encoder.
        let y: Vec<u32> = (0..n).map(|r| labels[r % labels.len()]).collect();
        layer.zero_grad();
        let logits = layer.forward(h, true)?;
        let classes = layer.outputs();
        let (_, g, correct) = softmax_cross_entropy(logits.as_slice()?, classes, &y);
        layer.backward(&Tensor::from_vec(&[n, classes], g)?, false)?;
        // The probe follows the encoder's schedule shape at its own scale.
        let peak = self.cfg.peak_lr().max(f32::MIN_POSITIVE);
        opt.step(layer, self.cfg.train.probe_lr * lr / peak)?;
        Ok(Some(100.0 * correct as f64 / n as f64))
    }

    /// Runs to the end (or `max_steps`), calling `observe` after every step. Writes a
    /// checkpoint every `checkpoint_every` steps, at the end of every epoch and at the end.
    pub fn run(&mut self, observe: &mut dyn FnMut(&StepRecord) -> Control) -> Result<Summary> {
        let schedule = self.schedule();
        let total = self.total_steps();
        let max_steps = if self.cfg.train.max_steps > 0 {
            self.cfg.train.max_steps.min(total)
        } else {
            total
        };
        let loss = self.cfg.loss();
        let mut last_loss = f32::NAN;
        let mut window = (Instant::now(), 0usize);
        let mut ips = 0.0;
        let mut ckpt = state::checkpoint_path(&self.run_dir);
        while self.progress.epoch < self.cfg.train.epochs && self.progress.step < max_steps {
            let epoch = self.progress.epoch;
            let first_batch = self.progress.batch;
            let batches = self.loader.epoch_from(epoch, first_batch);
            // Unreadable images skipped this epoch, images the epoch tried, steps it trained
            // and batches it left out for having too few readable images.
            let (mut skipped, mut tried, mut trained, mut dropped) = (0usize, 0usize, 0u64, 0);
            for batch in batches {
                let batch = batch?;
                if self.is_main() {
                    self.skips
                        .report(self.splits.pretrain.as_ref(), &batch.skipped_images);
                }
                skipped += batch.skipped;
                tried += batch.len() + batch.skipped;
                if batch.len() < MIN_BATCH {
                    if self.dp.is_some() {
                        // Leaving the step out on this replica alone would leave the others
                        // waiting in it.
                        return Err(CliError::Usage(format!(
                            "batch {} of epoch {epoch} has {} readable images on this replica, \
                             fewer than the {MIN_BATCH} a step needs; remove the unreadable \
                             images named above from the {}",
                            batch.number,
                            batch.len(),
                            data::describe(&self.cfg.data)
                        )));
                    }
                    // Batch norm and NT-Xent's negatives need at least two images: the batch
                    // is left out, as a drop-last batch would be.
                    dropped += 1;
                    self.progress.batch = batch.number + 1;
                    continue;
                }
                let [n, c, hh, ww] = batch.shape();
                let views = match (&batch.data, &mut self.gpu_augment) {
                    (simclr_data::BatchData::F32(d), _) => Tensor::from_slice(&[n, c, hh, ww], d)?,
                    (simclr_data::BatchData::U8(_), Some(g)) => g.views(&batch)?,
                    (simclr_data::BatchData::U8(_), None) => {
                        return Err(CliError::Usage("the loader gave 8-bit pixels".into()))
                    }
                };
                let lr = schedule.lr(self.progress.step);
                let step = self.progress.step;
                let chunks = self.cfg.train.grad_cache_chunks;
                let result = match &self.dp {
                    None if chunks > 1 => simclr_nn::grad_cache::train_step_cached(
                        &mut self.model,
                        &views,
                        chunks,
                        self.opt.as_mut(),
                        lr,
                        &loss,
                    )
                    .map(|s| (s, None)),
                    Some(dp) => simclr_nn::dist::train_step_dp(
                        &mut self.model,
                        &views,
                        self.opt.as_mut(),
                        lr,
                        &loss,
                        dp,
                    )
                    .map(|(s, h)| (s, Some(h))),
                    None => simclr_nn::train_step_with_h(
                        &mut self.model,
                        &views,
                        self.opt.as_mut(),
                        lr,
                        &loss,
                    )
                    .map(|(s, h)| (s, Some(h))),
                };
                let (stats, h) = match result {
                    Ok(r) => r,
                    Err(NnError::NonFinite { what }) => {
                        return Err(self.diverged(step, what));
                    }
                    Err(e) => return Err(e.into()),
                };
                if !stats.loss.is_finite() {
                    return Err(self.diverged(step, format!("loss {}", stats.loss)));
                }
                let probe_top1 = match (&batch.labels, &h) {
                    // The probe is small and lives on the host.
                    (Some(labels), Some(h)) => {
                        self.probe_step(&h.to_device(Device::Cpu)?, labels, lr)?
                    }
                    _ => None,
                };
                last_loss = stats.loss;
                self.progress.step += 1;
                trained += 1;
                // The batch's number, not a count of steps: left-out batches would otherwise
                // shift where a resumed epoch starts.
                self.progress.batch = batch.number + 1;
                window.1 += batch.len() * self.rank_and_world().1;
                let secs = window.0.elapsed().as_secs_f64();
                if secs >= 2.0 || ips == 0.0 {
                    ips = window.1 as f64 / secs.max(1e-9);
                    window = (Instant::now(), 0);
                }
                let rec = StepRecord {
                    step: self.progress.step,
                    total_steps: max_steps,
                    epoch,
                    loss: stats.loss,
                    lr,
                    probe_top1,
                    images_per_s: ips,
                };
                let log_every = self.cfg.train.log_every.max(1);
                if self.progress.step % log_every == 0 || self.progress.step == max_steps {
                    let mut v = serde_json::to_value(rec).expect("a record serialises");
                    v["kind"] = "step".into();
                    self.record(v)?;
                }
                let every = self.cfg.train.checkpoint_every;
                if every > 0 && self.progress.step % every == 0 {
                    ckpt = self.checkpoint()?;
                }
                let mut stop = observe(&rec) == Control::Stop;
                if let Some(dp) = &self.dp {
                    // Stopping is collective: a replica that stopped alone would leave the
                    // others waiting in the next step.
                    let mut any = [f64::from(u8::from(stop))];
                    dp.comm.all_reduce_f64(&mut any).map_err(NnError::from)?;
                    stop = any[0] > 0.0;
                }
                if stop {
                    ckpt = self.checkpoint()?;
                    return Err(CliError::Interrupted {
                        step: self.progress.step,
                        checkpoint: ckpt.display().to_string(),
                        run_dir: self.run_dir.display().to_string(),
                    });
                }
                if self.progress.step >= max_steps {
                    break;
                }
            }
            if trained == 0 && dropped > 0 && first_batch == 0 {
                return Err(CliError::Usage(format!(
                    "none of the {tried} images of epoch {epoch} could be used: {skipped} are \
                     unreadable (each is named above) and no batch kept the {MIN_BATCH} readable \
                     images a step needs; fix or remove the unreadable images of the {}",
                    data::describe(&self.cfg.data)
                )));
            }
            if skipped > 0 && self.is_main() {
                let left_out = if dropped > 0 {
                    format!(
                        "; {dropped} of its batches kept fewer than the {MIN_BATCH} readable \
                         images a step needs and were left out"
                    )
                } else {
                    String::new()
                };
                eprintln!(
                    "warning: epoch {epoch}: skipped {skipped} unreadable images of \
                     {tried}{left_out}"
                );
            }
            if (self.progress.batch as u64) < self.steps_per_epoch() {
                // Stopped by max_steps inside the epoch.
                break;
            }
            self.progress.epoch += 1;
            self.progress.batch = 0;
            let knn_every = self.cfg.eval.knn_every;
            let mut line = serde_json::json!({"kind": "epoch", "epoch": epoch, "step": self.progress.step, "loss": last_loss});
            if skipped > 0 {
                line["skipped_images"] = skipped.into();
            }
            // The epoch is saved before the k-NN monitor reads the evaluation images: a
            // failure there must not cost the epoch's training.
            ckpt = self.checkpoint()?;
            if knn_every > 0 && (epoch + 1) % knn_every == 0 {
                let top1 = self.knn().map_err(|e| {
                    CliError::Usage(format!(
                        "{e}; the k-NN monitor failed after epoch {epoch}, whose checkpoint {} is \
                         kept: fix the cause, then resume with `simclr pretrain --resume {}`",
                        ckpt.display(),
                        self.run_dir.display()
                    ))
                })?;
                self.last_knn = Some(top1);
                line["knn_top1"] = top1.into();
            }
            self.record(line)?;
        }
        if self.progress.step >= max_steps {
            ckpt = self.checkpoint()?;
        }
        if self.is_main() {
            crate::plot::plot_run(&self.run_dir)?;
            let export = self.run_dir.join("encoder.safetensors");
            crate::export::save_encoder(&mut self.model, &export, &self.cfg)?;
        }
        Ok(Summary {
            steps: self.progress.step,
            last_loss,
            knn_top1: self.last_knn,
            checkpoint: ckpt,
        })
    }

    fn diverged(&self, step: u64, what: String) -> CliError {
        let ck = state::checkpoint_path(&self.run_dir);
        CliError::Diverged {
            step,
            what,
            checkpoint: if ck.exists() {
                ck.display().to_string()
            } else {
                "none written yet".into()
            },
        }
    }
}

/// The device of `train.device` for this rank. `auto` and `cuda` take the GPU of the rank's
/// `LOCAL_RANK` (or SLURM's `SLURM_LOCALID`) as [`local_gpu`] chooses it, so the processes of one
/// node spread over its GPUs; `auto` falls back to the CPU when CUDA cannot be used.
pub fn train_device(spec: &str) -> Result<Device> {
    if spec != "auto" && spec != "cuda" {
        return Ok(spec.parse::<Device>()?);
    }
    let count = simclr_nn::cuda::device_count();
    if count == 0 {
        // `cuda` without a GPU fails where the device is opened, with the driver's reason.
        return Ok(if spec == "cuda" {
            Device::Cuda(0)
        } else {
            Device::Cpu
        });
    }
    let local = ["LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| Some((*k, std::env::var(k).ok()?.trim().parse::<usize>().ok()?)));
    let mine = match local {
        Some((var, local)) => Device::Cuda(local_gpu(local, count, var)?),
        None => Device::Cuda(0),
    };
    if spec == "cuda" {
        return Ok(mine);
    }
    // Only this rank's GPU is opened (a context on GPU 0 from every rank would waste memory
    // and fail on exclusive-process GPUs).
    if mine.ensure_usable().is_ok() {
        Ok(mine)
    } else {
        Ok(Device::Cpu)
    }
}

/// The GPU (an index among the `count > 0` this process sees) of local rank `local`, read from
/// the variable `var`: GPU `local` when there is one; GPU 0 when the process sees a single GPU
/// (each rank given its own, as SLURM's `--gpus-per-task` or a `CUDA_VISIBLE_DEVICES` per rank
/// do); else an error, since two ranks on one GPU would make NCCL's initialisation fail.
pub fn local_gpu(local: usize, count: usize, var: &str) -> Result<usize> {
    if local < count {
        Ok(local)
    } else if count == 1 {
        Ok(0)
    } else {
        Err(CliError::Config {
            source_name: "settings".into(),
            msg: format!(
                "train.device: {var}={local} but this process sees {count} GPUs (0 to {}): \
                 start at most one process per GPU on each node, or give each process one GPU \
                 of its own (SLURM --gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank)",
                count - 1
            ),
        })
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn train_devices_resolve() {
        assert_eq!(train_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(train_device("cuda:2").unwrap(), Device::Cuda(2));
        assert!(matches!(train_device("cuda").unwrap(), Device::Cuda(_)));
        assert!(train_device("tpu").is_err());
        if simclr_nn::cuda::device_count() == 0 {
            assert_eq!(
                train_device("auto").unwrap(),
                Device::Cpu,
                "no GPU: the CPU"
            );
        }
    }

    #[test]
    fn each_local_rank_gets_a_gpu_of_its_own_or_an_error() {
        // One process per GPU of the node.
        assert_eq!(local_gpu(0, 4, "LOCAL_RANK").unwrap(), 0);
        assert_eq!(local_gpu(3, 4, "LOCAL_RANK").unwrap(), 3);
        // Each process sees only its own GPU (SLURM --gpus-per-task, CUDA_VISIBLE_DEVICES).
        assert_eq!(local_gpu(0, 1, "SLURM_LOCALID").unwrap(), 0);
        assert_eq!(local_gpu(5, 1, "SLURM_LOCALID").unwrap(), 0);
        // More local ranks than GPUs: two would share one.
        let e = local_gpu(4, 4, "LOCAL_RANK").unwrap_err().to_string();
        assert!(e.contains("LOCAL_RANK=4"), "{e}");
        assert!(e.contains("sees 4 GPUs"), "{e}");
        let e = local_gpu(2, 2, "SLURM_LOCALID").unwrap_err().to_string();
        assert!(e.contains("SLURM_LOCALID=2"), "{e}");
    }
}

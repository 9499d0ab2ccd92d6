//! `simclr`: pre-train, evaluate and export SimCLR models. `simclr --help` lists the commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use simclr_cli::features::{extract, Representation};
use simclr_cli::finetune;
use simclr_cli::{evaluate, CliError, Config, Control, Result, StepRecord, Trainer, PRESETS};
use simclr_data::Augmentation;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(
    name = "simclr",
    version,
    about = "SimCLR: contrastive self-supervised learning of visual representations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// A built-in preset (see `simclr presets`).
    #[arg(long)]
    preset: Option<String>,
    /// A TOML configuration file (it may name a preset to start from).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a setting: `--set train.epochs=10` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn build(&self, default_preset: Option<&str>) -> Result<Config> {
        let preset = self.preset.as_deref().or(if self.config.is_none() {
            default_preset
        } else {
            None
        });
        Config::build(preset, self.config.as_deref(), &self.set)
    }
}

#[derive(Args)]
struct RunArgs {
    /// The run folder (its config.toml and checkpoints/last.safetensors).
    #[arg(long)]
    run: PathBuf,
    /// Weights to use instead of the run's last checkpoint: a run checkpoint, an exported
    /// encoder, or a torchvision ResNet state dict as safetensors.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Override a setting of the run's configuration (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Pre-train: SimCLR on the configured data set, with checkpoints and metrics.
    Pretrain {
        #[command(flatten)]
        config: ConfigArgs,
        /// Resume the run in this folder from its last checkpoint.
        #[arg(long, conflicts_with_all = ["preset", "config"])]
        resume: Option<PathBuf>,
    },
    /// Pre-train, then linear-evaluate beside the untrained encoder and raw pixels (the quick
    /// start: `cargo xtask train`). Resumes the run if its folder holds one.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Linear evaluation of a run's frozen encoder: top-1 and top-5 on the test split.
    LinearEval {
        #[command(flatten)]
        run: RunArgs,
        /// Evaluate this representation.
        #[arg(long, value_enum, default_value = "h")]
        rep: Representation,
        /// Also evaluate the untrained encoder and the raw pixels.
        #[arg(long)]
        baselines: bool,
    },
    /// Fine-tune the whole encoder with a linear layer on a class-balanced subset of the labels
    /// (the paper's semi-supervised protocol); writes the network as a torchvision state dict.
    Finetune {
        #[command(flatten)]
        run: RunArgs,
        /// The labels used: 1%, 10%, 100% (or a fraction).
        #[arg(long, default_value = "10%")]
        labels: String,
        /// Epochs (default: the paper's, 60 for 1% and 30 otherwise).
        #[arg(long)]
        epochs: Option<usize>,
        /// Batch size.
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Learning rate per 256 images (Nesterov SGD, cosine decay, no warm-up).
        #[arg(long, default_value_t = 0.05)]
        lr: f32,
        /// Start from a randomly initialised encoder instead (the supervised baseline).
        #[arg(long)]
        scratch: bool,
    },
    /// k-NN accuracy of a run's encoder (training split as the memory bank).
    Knn {
        #[command(flatten)]
        run: RunArgs,
        /// Neighbours (default: the run's eval.knn_k).
        #[arg(long)]
        k: Option<usize>,
        /// Representation.
        #[arg(long, value_enum, default_value = "h")]
        rep: Representation,
    },
    /// Write the representations of a data split to .npy (labels beside) or .safetensors.
    Embed {
        #[command(flatten)]
        run: RunArgs,
        /// Which split.
        #[arg(long, value_parser = ["train", "test"], default_value = "test")]
        split: String,
        /// Representation.
        #[arg(long, value_enum, default_value = "h")]
        rep: Representation,
        /// Output file (.npy or .safetensors; a .npy gets its labels beside it as
        /// `<name>.labels.npy`). Never a file of a run folder.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the output if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Write a run's encoder as safetensors with torchvision's parameter names.
    Export {
        #[command(flatten)]
        run: RunArgs,
        /// Output file. Never a file of a run folder.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the output if it exists.
        #[arg(long)]
        force: bool,
    },
    /// A PNG grid of images and their augmented views.
    AugmentPreview {
        #[command(flatten)]
        config: ConfigArgs,
        /// Images (rows).
        #[arg(long, default_value_t = 8)]
        images: usize,
        /// Views per image.
        #[arg(long, default_value_t = 6)]
        views: usize,
        /// Output PNG. Never a file of a run folder.
        #[arg(long, default_value = "augment-preview.png")]
        out: PathBuf,
        /// Overwrite the output if it exists.
        #[arg(long)]
        force: bool,
    },
    /// One of the paper's ablations at the scale of the given configuration: every variant
    /// pre-trained and linear-evaluated, then a table and a figure (into OUT/STUDY).
    Ablate {
        /// The study.
        #[arg(long, value_enum)]
        study: simclr_cli::ablate::Study,
        #[command(flatten)]
        config: ConfigArgs,
        /// Where the study's runs, table and figure go.
        #[arg(long, default_value = "runs/ablate")]
        out: PathBuf,
    },
    /// PNG charts of a run's loss, learning rate and accuracy (into RUN/plots).
    Plot {
        /// The run folder.
        #[arg(long)]
        run: PathBuf,
    },
    /// Data-parallel training on this machine: runs a `simclr` command (after `--`) in N
    /// processes, one replica each, with global batch norm and negatives gathered from every
    /// replica (`simclr launch --procs 4 -- pretrain --preset quickstart`). With
    /// `train.device = auto` each process takes the GPU of its `LOCAL_RANK` when there is one
    /// (and the replicas then talk through NCCL); `--gpus N` does the same after checking that
    /// the machine has N GPUs.
    Launch {
        /// Number of processes (replicas); `train.batch_size` must divide among them.
        #[arg(long, required_unless_present = "gpus", conflicts_with = "gpus")]
        procs: Option<usize>,
        /// Number of processes, one per GPU: fails at once unless this machine has that many.
        #[arg(long)]
        gpus: Option<usize>,
        /// Rendezvous port of rank 0 (default: a free one).
        #[arg(long)]
        port: Option<u16>,
        /// The command each process runs.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// List the presets, or print one as TOML.
    Presets {
        /// The preset to print, with every setting.
        show: Option<String>,
    },
}

fn progress_observer(total: u64, done: u64) -> (ProgressBar, impl FnMut(&StepRecord) -> Control) {
    let bar = ProgressBar::new(total).with_position(done);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps, {msg}, {eta} left",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let hidden = bar.is_hidden();
    let b = bar.clone();
    let mut last_print = std::time::Instant::now();
    let observer = move |r: &StepRecord| {
        let probe = r
            .probe_top1
            .map(|a| format!(", probe {a:.0}%"))
            .unwrap_or_default();
        let msg = format!(
            "loss {:.4}, lr {:.3}{probe}, {:.0} img/s",
            r.loss, r.lr, r.images_per_s
        );
        b.set_position(r.step);
        if hidden && (last_print.elapsed().as_secs() >= 10 || r.step == r.total_steps) {
            // No terminal: a plain line now and then instead of the bar.
            eprintln!("step {}/{} epoch {}: {msg}", r.step, r.total_steps, r.epoch);
            last_print = std::time::Instant::now();
        }
        b.set_message(msg);
        if INTERRUPTED.load(Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
        }
    };
    (bar, observer)
}

fn train_loop(trainer: &mut Trainer) -> Result<simclr_cli::Summary> {
    let cfg = trainer.config();
    let total = if cfg.train.max_steps > 0 {
        cfg.train.max_steps.min(trainer.total_steps())
    } else {
        trainer.total_steps()
    };
    let (rank, world) = trainer.rank_and_world();
    if rank != 0 {
        let s = trainer.run(&mut |_| {
            if INTERRUPTED.load(Ordering::SeqCst) {
                Control::Stop
            } else {
                Control::Continue
            }
        })?;
        return Ok(s);
    }
    if world > 1 {
        eprintln!(
            "data-parallel over {world} replicas of {} images each",
            cfg.train.batch_size / world
        );
    }
    eprintln!(
        "pre-training {} on {} images ({} steps of {} images, {} epochs) into {}",
        cfg.model.describe(),
        trainer.splits().pretrain.len(),
        total,
        cfg.train.batch_size,
        cfg.train.epochs,
        cfg.output.dir.display()
    );
    let (bar, mut observe) = progress_observer(total, trainer.progress().step);
    let out = trainer.run(&mut observe);
    bar.finish_and_clear();
    let s = out?;
    if s.last_loss.is_nan() {
        eprintln!(
            "the run was already complete ({} steps); checkpoint {}",
            s.steps,
            s.checkpoint.display()
        );
    } else {
        eprintln!(
            "done: {} steps, last loss {:.4}{}; checkpoint {}",
            s.steps,
            s.last_loss,
            s.knn_top1
                .map(|a| format!(", k-NN top-1 {a:.1}%"))
                .unwrap_or_default(),
            s.checkpoint.display()
        );
    }
    Ok(s)
}

fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
}

/// Writes a result file whole or not at all: a reader never sees half of it.
fn write_file(path: &Path, text: &str) -> Result<()> {
    simclr_nn::checkpoint::write_atomic(path, text.as_bytes()).map_err(|e| CliError::Io {
        path: path.to_path_buf(),
        msg: match e {
            simclr_nn::NnError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        },
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain { config, resume } => {
            let comm = simclr_cli::launch::connect_from_env()?;
            let mut trainer = match resume {
                Some(dir) => Trainer::resume_data_parallel(&dir, &config.set, comm)?,
                None => Trainer::new_data_parallel(config.build(Some("quickstart"))?, comm)?,
            };
            train_loop(&mut trainer)?;
        }
        Command::Launch {
            procs,
            gpus,
            port,
            args,
        } => {
            let replicas = match (procs, gpus) {
                (_, Some(n)) => simclr_cli::launch::Replicas::Gpus(n),
                (Some(n), None) => simclr_cli::launch::Replicas::Procs(n),
                (None, None) => {
                    return Err(CliError::Usage("launch needs --procs N or --gpus N".into()))
                }
            };
            simclr_cli::launch::launch(replicas, port, &args, &INTERRUPTED)?
        }
        Command::Train { config } => {
            let cfg = config.build(Some("quickstart"))?;
            let dir = cfg.output.dir.clone();
            let comm = simclr_cli::launch::connect_from_env()?;
            let mut trainer = if simclr_cli::state::checkpoint_path(&dir).exists() {
                eprintln!("{} holds a run: resuming it", dir.display());
                Trainer::resume_data_parallel(&dir, &config.set, comm)?
            } else {
                Trainer::new_data_parallel(cfg, comm)?
            };
            let started = std::time::Instant::now();
            train_loop(&mut trainer)?;
            if trainer.rank_and_world().0 != 0 {
                // Rank 0 evaluates and reports.
                return Ok(());
            }
            let pretrain_s = started.elapsed().as_secs_f64();
            if INTERRUPTED.load(Ordering::SeqCst) {
                // Pre-training is complete and saved; `simclr train` again evaluates it.
                return Err(CliError::Interrupted {
                    step: trainer.progress().step,
                    checkpoint: simclr_cli::state::checkpoint_path(&dir)
                        .display()
                        .to_string(),
                    run_dir: dir.display().to_string(),
                });
            }
            eprintln!("linear evaluation (frozen features) of the encoder and the baselines...");
            let cfg = trainer.config().clone();
            let splits = trainer.splits().clone();
            let rows = evaluate::compare(trainer.model(), &splits, &cfg)?;
            let title = format!(
                "{} on {:?} ({} training / {} test images), {} pre-training steps in {:.0} s",
                cfg.model.describe(),
                cfg.data.dataset,
                splits.train.len(),
                splits.test.len(),
                trainer.progress().step,
                pretrain_s
            );
            let table = evaluate::table(&rows, &title);
            write_file(&dir.join("results.md"), &table)?;
            write_file(
                &dir.join("results.json"),
                &serde_json::to_string_pretty(&rows).expect("json"),
            )?;
            println!("\n{table}");
        }
        Command::LinearEval {
            run,
            rep,
            baselines,
        } => {
            let (cfg, mut model) =
                evaluate::load_run(&run.run, run.checkpoint.as_deref(), &run.set)?;
            let splits = simclr_cli::data::open(&cfg.data, cfg.train.seed)?;
            if baselines {
                let rows = evaluate::compare(&mut model, &splits, &cfg)?;
                println!(
                    "{}",
                    evaluate::table(
                        &rows,
                        &format!("linear evaluation of {}", run.run.display())
                    )
                );
            } else {
                let acc = evaluate::linear_eval(&mut model, &splits, &cfg, rep)?;
                print_json(
                    serde_json::json!({"rep": format!("{rep:?}"), "top1": acc.top1, "top5": acc.top5}),
                );
            }
        }
        Command::Finetune {
            run,
            labels,
            epochs,
            batch_size,
            lr,
            scratch,
        } => {
            let (cfg, mut model) =
                evaluate::load_run(&run.run, run.checkpoint.as_deref(), &run.set)?;
            if scratch {
                model = simclr_nn::SimClr::new(
                    &cfg.model.simclr()?,
                    simclr_nn::Device::Cpu,
                    cfg.train.seed,
                )?;
            }
            let splits = simclr_cli::data::open(&cfg.data, cfg.train.seed)?;
            let fraction = finetune::parse_fraction(&labels)?;
            let mut ft = finetune::FinetuneConfig::paper(fraction, cfg.train.seed);
            ft.epochs = epochs.unwrap_or(ft.epochs);
            ft.batch_size = batch_size;
            ft.lr = lr;
            let bar = ProgressBar::new(0);
            let (report, mut fc) =
                finetune::finetune(&mut model, &splits, &cfg, &ft, &mut |s, t, loss| {
                    bar.set_length(t);
                    bar.set_position(s);
                    bar.set_message(format!("loss {loss:.4}"));
                })?;
            bar.finish_and_clear();
            let tag = format!(
                "{}{}",
                labels.trim_end_matches('%').replace('.', "_"),
                if scratch { "-scratch" } else { "" }
            );
            let out = run.run.join(format!("finetune-{tag}"));
            finetune::save_classifier(&mut model, &mut fc, &out.join("model.safetensors"), &cfg)?;
            let json = serde_json::json!({
                "labels": labels,
                "labelled_images": report.labelled_images,
                "steps": report.steps,
                "top1": report.test.top1,
                "top5": report.test.top5,
            });
            write_file(
                &out.join("results.json"),
                &serde_json::to_string_pretty(&json).expect("json"),
            )?;
            print_json(json);
        }
        Command::Knn { run, k, rep } => {
            let (cfg, mut model) =
                evaluate::load_run(&run.run, run.checkpoint.as_deref(), &run.set)?;
            let splits = simclr_cli::data::open(&cfg.data, cfg.train.seed)?;
            let k = k.unwrap_or(cfg.eval.knn_k);
            let acc = evaluate::knn_eval(&mut model, &splits, &cfg, rep, k)?;
            // The memory bank is the training split: a larger k used all of it.
            let k = k.min(splits.train.len());
            print_json(
                serde_json::json!({"k": k, "rep": format!("{rep:?}"), "top1": acc.top1, "top5": acc.top5}),
            );
        }
        Command::Embed {
            run,
            split,
            rep,
            out,
            force,
        } => {
            // Before the features are computed: a refusal then costs nothing.
            for path in simclr_cli::export::features_outputs(&out)? {
                simclr_cli::export::check_output(&path, force)?;
            }
            let (cfg, mut model) =
                evaluate::load_run(&run.run, run.checkpoint.as_deref(), &run.set)?;
            let splits = simclr_cli::data::open(&cfg.data, cfg.train.seed)?;
            let ds = if split == "train" {
                splits.train
            } else {
                splits.test
            };
            let f = extract(
                &mut model,
                ds,
                &cfg,
                rep,
                cfg.eval.linear_batch_size.max(64),
            )?;
            simclr_cli::export::save_features(&f, &out)?;
            eprintln!("wrote {} x {} to {}", f.len(), f.dim, out.display());
        }
        Command::Export { run, out, force } => {
            simclr_cli::export::check_output(&out, force)?;
            let (cfg, mut model) =
                evaluate::load_run(&run.run, run.checkpoint.as_deref(), &run.set)?;
            simclr_cli::export::save_encoder(&mut model, &out, &cfg)?;
            eprintln!(
                "wrote the encoder ({}) to {}",
                cfg.model.describe(),
                out.display()
            );
        }
        Command::AugmentPreview {
            config,
            images,
            views,
            out,
            force,
        } => {
            simclr_cli::export::check_output(&out, force)?;
            let cfg = config.build(Some("quickstart"))?;
            let splits = simclr_cli::data::open(&cfg.data, cfg.train.seed)?;
            let aug = Augmentation::new(cfg.augment.to_augment(cfg.data.image_size))?;
            simclr_cli::preview::augment_preview(
                splits.pretrain.as_ref(),
                &aug,
                images,
                views,
                cfg.train.seed,
                &out,
            )?;
            eprintln!("wrote {}", out.display());
        }
        Command::Ablate { study, config, out } => {
            let preset = config.preset.as_deref().or(if config.config.is_none() {
                Some("quickstart")
            } else {
                None
            });
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{prefix}: [{bar:30}] {pos}/{len} steps, {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            let (_, dir) = simclr_cli::ablate::run_study(
                study,
                preset,
                config.config.as_deref(),
                &config.set,
                &out,
                &mut |name, r| {
                    bar.set_prefix(name.to_string());
                    bar.set_length(r.total_steps);
                    bar.set_position(r.step);
                    bar.set_message(format!("loss {:.4}", r.loss));
                    if INTERRUPTED.load(Ordering::SeqCst) {
                        Control::Stop
                    } else {
                        Control::Continue
                    }
                },
            )?;
            bar.finish_and_clear();
            let table = std::fs::read_to_string(dir.join("results.md")).unwrap_or_default();
            println!("{table}\nfigure: {}", dir.join("figure.png").display());
        }
        Command::Plot { run } => {
            for f in simclr_cli::plot::plot_run(&run)? {
                eprintln!("wrote {}", f.display());
            }
        }
        Command::Presets { show } => match show {
            Some(name) => print!("{}", Config::build(Some(&name), None, &[])?.to_toml()),
            None => {
                for (name, text) in PRESETS {
                    let about = text.lines().next().unwrap_or("").trim_start_matches("# ");
                    println!("{name:<22} {about}");
                }
            }
        },
    }
    Ok(())
}

/// The signals that stop a run as Ctrl-C does: a checkpoint after the current step, then exit
/// status 130. Schedulers send SIGTERM at a time limit or on preemption (SLURM, Kubernetes), and
/// SLURM's `--signal=USR1@SECONDS` sends SIGUSR1 ahead of the limit; SIGHUP is a closed terminal.
const STOP_SIGNALS: [(i32, &str); 4] = [
    (signal_hook::consts::SIGINT, "interrupt (SIGINT)"),
    (signal_hook::consts::SIGTERM, "SIGTERM"),
    (signal_hook::consts::SIGUSR1, "SIGUSR1"),
    (signal_hook::consts::SIGHUP, "SIGHUP"),
];

/// Handles the stop signals on a thread of their own from here on: the first asks the run to
/// write a checkpoint and stop (every stage checks `INTERRUPTED`), a second ends the program
/// at once.
fn stop_on_signals() {
    let mut signals = match signal_hook::iterator::Signals::new(STOP_SIGNALS.map(|(s, _)| s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "warning: cannot handle signals ({e}): Ctrl-C or SIGTERM will end the program \
                 without a checkpoint"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = STOP_SIGNALS
                    .iter()
                    .find(|(s, _)| *s == sig)
                    .map_or("a signal", |(_, n)| n);
                if INTERRUPTED.swap(true, Ordering::SeqCst) {
                    eprintln!("\n{name} again: quitting now, without a checkpoint");
                    std::process::exit(128 + sig);
                }
                eprintln!(
                    "\n{name}: writing a checkpoint after this step, then stopping (a second \
                     signal or Ctrl-C quits at once)"
                );
            }
        });
    if let Err(e) = spawned {
        eprintln!("warning: cannot start the signal thread ({e})");
    }
}

fn main() -> ExitCode {
    // First: a signal that came before this would end the program without a checkpoint.
    stop_on_signals();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                // Stopped on request with a checkpoint: a job script can tell this from a
                // failure and queue the run again.
                CliError::Interrupted { .. } | CliError::RanksInterrupted => 130,
                _ => 1,
            })
        }
    }
}

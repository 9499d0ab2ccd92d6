//! The `simclr` program and the library behind it: configuration, pre-training with
//! checkpoints and exact resume, linear evaluation, fine-tuning on label subsets, k-NN, the
//! paper's ablations, charts, export of encoders and representations, and a preview of the
//! augmentations.
//!
//! ```no_run
//! use simclr_cli::{Config, Control, Trainer};
//!
//! # fn main() -> Result<(), simclr_cli::CliError> {
//! // The quick-start preset, shortened.
//! let cfg = Config::build(Some("quickstart"), None, &["train.epochs=2".into()])?;
//! let mut trainer = Trainer::new(cfg)?;
//! let summary = trainer.run(&mut |rec| {
//!     println!("step {} loss {:.3}", rec.step, rec.loss);
//!     Control::Continue
//! })?;
//! println!("k-NN top-1 {:?}", summary.knn_top1);
//! # Ok(())
//! # }
//! ```
//!
//! A smaller example that runs as a doctest, linear evaluation of raw pixels:
//!
//! ```
//! use simclr_cli::{evaluate, features::Representation, Config};
//! use simclr_nn::{Device, SimClr};
//!
//! # fn main() -> Result<(), simclr_cli::CliError> {
//! let cfg = Config::build(Some("quickstart"), None, &[
//!     "data.synthetic_train=200".into(),
//!     "data.synthetic_test=100".into(),
//!     "eval.linear_epochs=5".into(),
//! ])?;
//! let splits = simclr_cli::data::open(&cfg.data, 0)?;
//! let mut model = SimClr::new(&cfg.model.simclr()?, Device::Cpu, 0)?;
//! let acc = evaluate::linear_eval(&mut model, &splits, &cfg, Representation::Pixels)?;
//! assert!(acc.top1 >= 0.0 && acc.top5 >= acc.top1);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod ablate;
pub mod classifier;
pub mod config;
pub mod data;
mod error;
pub mod evaluate;
pub mod export;
pub mod features;
pub mod finetune;
pub mod gpu_augment;
pub mod knn;
pub mod launch;
pub mod plot;
pub mod pretrain;
pub mod preview;
pub mod state;

pub use config::{Config, PRESETS};
pub use error::{CliError, Result};
pub use pretrain::{Control, StepRecord, Summary, Trainer};

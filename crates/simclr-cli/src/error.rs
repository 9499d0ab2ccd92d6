//! The errors of the `simclr` program: each names the file, key or value at fault.

use std::path::PathBuf;

/// Everything that can stop a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A configuration file or override that does not parse, has an unknown key or a value of
    /// the wrong type.
    #[error("config {source_name}: {msg}")]
    Config {
        /// The file (or `--set` override, or preset) at fault.
        source_name: String,
        /// What is wrong, naming the key.
        msg: String,
    },
    /// A file or folder that cannot be read or written.
    #[error("{path}: {msg}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// The data layer's error (it names the file).
    #[error(transparent)]
    Data(#[from] simclr_data::DataError),
    /// The network layer's error.
    #[error(transparent)]
    Nn(#[from] simclr_nn::NnError),
    /// The loss or a gradient became NaN or infinite; the last good checkpoint is kept.
    #[error(
        "training diverged at step {step}: {what}; the last good checkpoint ({checkpoint}) is kept. \
         Lower the learning rate or raise the temperature, then resume from it"
    )]
    Diverged {
        /// The step (0-based) at which it happened.
        step: u64,
        /// What was non-finite.
        what: String,
        /// The checkpoint that survives.
        checkpoint: String,
    },
    /// A checkpoint that does not fit the configured model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        msg: String,
    },
    /// Ctrl-C: a checkpoint was written and the run can be resumed.
    #[error("interrupted at step {step}; checkpoint written to {checkpoint}; resume with `simclr pretrain --resume {run_dir}`")]
    Interrupted {
        /// Steps done.
        step: u64,
        /// The checkpoint written.
        checkpoint: String,
        /// The run's folder.
        run_dir: String,
    },
    /// `simclr launch` on a signal: every rank stopped at the same step, rank 0 having written
    /// a checkpoint.
    #[error(
        "interrupted: every rank stopped and rank 0 wrote a checkpoint; resume with `simclr \
         launch ... -- pretrain --resume RUN_DIR`"
    )]
    RanksInterrupted,
    /// An argument that makes no sense.
    #[error("{0}")]
    Usage(String),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, CliError>;

/// An I/O error naming `path`.
pub(crate) fn io_err(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> CliError {
    CliError::Io {
        path: path.into(),
        msg: e.to_string(),
    }
}

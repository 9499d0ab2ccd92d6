//! The error type of simclr-nn.

use std::path::PathBuf;

/// Everything that can go wrong in simclr-nn. Library code returns these; it never panics on
/// input.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// Two shapes that must agree do not.
    #[error("{op}: shape mismatch: expected {expected:?}, got {got:?}")]
    Shape {
        /// The operation that found the mismatch.
        op: &'static str,
        /// What the operation needed.
        expected: Vec<usize>,
        /// What it was given.
        got: Vec<usize>,
    },
    /// A value outside what an operation accepts (a zero stride, an empty batch, ...).
    #[error("{op}: invalid argument: {msg}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// An operation needs a tensor on another device.
    #[error("{op}: tensor is on {got}, expected {expected}")]
    Device {
        /// The operation.
        op: &'static str,
        /// The device it needed.
        expected: String,
        /// The device the tensor is on.
        got: String,
    },
    /// `backward` was called without a preceding training-mode `forward`.
    #[error("{0}: backward called without a saved forward pass")]
    NoForward(&'static str),
    /// A loss or a tensor holds NaN or infinity.
    #[error("non-finite value in {what}")]
    NonFinite {
        /// Where it was found.
        what: String,
    },
    /// The NT-Xent kernel refused its input.
    #[error("NT-Xent: {0}")]
    NtXent(String),
    /// A checkpoint could not be read or does not fit the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong, naming the key where there is one.
        msg: String,
    },
    /// A data-parallel collective failed (a rank died, timed out or disagreed).
    #[error("data-parallel communication: {0}")]
    Comm(#[from] crate::dist::CommError),
    /// A CUDA call failed, or CUDA is not usable on this machine (the message says which
    /// library or call).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result with [`NnError`].
pub type Result<T, E = NnError> = std::result::Result<T, E>;

impl From<simclr_kernels::cuda::GpuError> for NnError {
    fn from(e: simclr_kernels::cuda::GpuError) -> NnError {
        NnError::Cuda(e.to_string())
    }
}

//! CPU twins of the kernels: the same algorithms in plain Rust, and the CPU path of training.
//!
//! - [`ntxent`]: the fused, tiled, online-softmax NT-Xent loss, forward and backward.
//! - [`fast_math`]: vectorisable `exp` and reductions the kernels are built from.
//! - [`eltwise`], [`norm`], [`pooling`], [`optim`]: ReLU, residual add, batch norm, pooling, and
//!   the SGD and LARS updates, on NHWC (`[rows, channels]`) activations.
//! - [`color`]: the colour stage of the augmentation (jitter, grayscale, blur, ...).
//!
//! Reductions over the batch sum in [`REDUCE_GROUPS`] fixed groups, so a run gives the same bits
//! on 1 thread or 64.

pub mod color;
pub mod eltwise;
pub mod fast_math;
mod microkernel;
pub mod norm;
pub mod ntxent;
pub mod optim;
mod pool;
pub mod pooling;

/// Number of fixed partial sums in batch reductions.
pub const REDUCE_GROUPS: usize = 16;

pub use pool::release_cached_buffers;

pub use ntxent::{
    nt_xent_forward, nt_xent_forward_anchors, nt_xent_forward_backward,
    nt_xent_forward_backward_anchors, NtXentConfig, NtXentError, NtXentForward,
};

//! CPU twins of the kernels: the same algorithms in plain Rust.
//!
//! - [`ntxent`]: the fused, tiled, online-softmax NT-Xent loss, forward and backward.
//! - [`fast_math`]: vectorisable `exp` and reductions the kernels are built from.

pub mod fast_math;
mod microkernel;
pub mod ntxent;
mod pool;

pub use pool::release_cached_buffers;

pub use ntxent::{
    nt_xent_forward, nt_xent_forward_anchors, nt_xent_forward_backward,
    nt_xent_forward_backward_anchors, NtXentConfig, NtXentError, NtXentForward,
};

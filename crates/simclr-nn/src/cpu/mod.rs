//! The CPU backend: kernels over plain slices, parallel on the rayon pool.
//!
//! Reductions over the batch (weight gradients, batch-norm statistics) sum in a fixed number of
//! groups, so a run gives the same bits on 1 thread or 64.
//!
//! The element-wise, batch-norm, pooling and optimiser kernels are the CPU twins of the CUDA
//! kernels and live in [`simclr_kernels::cpu`]; they are re-exported here under their old names.

pub mod conv;
pub(crate) mod gemm;
pub mod winograd;

pub use simclr_kernels::cpu::pooling as pool;
pub use simclr_kernels::cpu::{eltwise, norm, optim};

/// Number of fixed partial sums in batch reductions.
pub(crate) const REDUCE_GROUPS: usize = simclr_kernels::cpu::REDUCE_GROUPS;

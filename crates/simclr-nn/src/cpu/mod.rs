//! The CPU backend: kernels over plain slices, parallel on the rayon pool.
//!
//! Reductions over the batch (weight gradients, batch-norm statistics) sum in a fixed number of
//! groups, so a run gives the same bits on 1 thread or 64.

pub mod conv;
pub mod eltwise;
pub(crate) mod gemm;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod winograd;

/// Number of fixed partial sums in batch reductions.
pub(crate) const REDUCE_GROUPS: usize = 16;

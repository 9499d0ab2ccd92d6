//! Hand-written kernels of SimCLR and their CPU twins.
//!
//! The [`cpu`] module holds the reference (and CPU-path) implementation of every kernel;
//! [`augment`] holds the per-view augmentation parameters shared by the CPU and GPU paths.
#![deny(missing_docs)]

pub mod augment;
pub mod cpu;
pub mod cuda;
pub mod elem;

pub use elem::Elem;

//! SimCLR in Rust: the facade over the workspace's crates.
#![deny(missing_docs)]

pub use simclr_data as data;
pub use simclr_kernels as kernels;
pub use simclr_nn as nn;

//! Layers with explicit forward and backward passes.
//!
//! `forward(x, train)` keeps what the backward pass needs when `train` is true; `backward(dy)`
//! consumes it, adds the parameter gradients to each [`crate::Param::grad`] and returns dL/dx.

mod conv;
mod linear;
mod norm;
mod pool;

pub use conv::Conv2d;
pub use linear::Linear;
pub use norm::BatchNorm;
pub use pool::{GlobalAvgPool, MaxPool, Relu};

//! Pooling and activation layers without parameters.

use crate::error::{NnError, Result};
use crate::ops;
use crate::tensor::{DType, Tensor};

/// Max pooling (the ImageNet stem's 3x3, stride 2, padding 1).
#[derive(Clone, Debug)]
pub struct MaxPool {
    /// Window side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub padding: usize,
    saved: Option<(Vec<usize>, ops::PoolIndices)>,
}

impl MaxPool {
    /// A max pool.
    pub fn new(kernel: usize, stride: usize, padding: usize) -> MaxPool {
        MaxPool {
            kernel,
            stride,
            padding,
            saved: None,
        }
    }

    /// Forward on NHWC.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (y, arg) = ops::max_pool(x, self.kernel, self.stride, self.padding)?;
        self.saved = train.then(|| (x.shape().to_vec(), arg));
        Ok(y)
    }

    /// dL/dx.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (shape, arg) = self.saved.take().ok_or(NnError::NoForward("MaxPool"))?;
        ops::max_pool_backward(dy, &arg, &shape, self.kernel, self.stride, self.padding)
    }
}

/// Global average pooling, NHWC to `[n, c]`.
#[derive(Clone, Debug, Default)]
pub struct GlobalAvgPool {
    saved_shape: Option<(Vec<usize>, DType)>,
}

impl GlobalAvgPool {
    /// Forward.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = ops::global_avg_pool(x)?;
        self.saved_shape = train.then(|| (x.shape().to_vec(), x.dtype()));
        Ok(y)
    }

    /// dL/dx.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (shape, dtype) = self
            .saved_shape
            .take()
            .ok_or(NnError::NoForward("GlobalAvgPool"))?;
        ops::global_avg_pool_backward(dy, &shape, dtype)
    }
}

/// ReLU, keeping its output for the backward pass.
#[derive(Clone, Debug, Default)]
pub struct Relu {
    saved_output: Option<Tensor>,
}

impl Relu {
    /// Forward, consuming `x` (computed in place).
    pub fn forward(&mut self, mut x: Tensor, train: bool) -> Result<Tensor> {
        ops::relu_(&mut x)?;
        self.saved_output = train.then(|| x.clone());
        Ok(x)
    }

    /// The ReLU of `x + skip` (a residual block's output), consuming `x`: the add and the ReLU
    /// in one pass over the activations. The backward pass is [`Relu::backward`]'s.
    pub fn forward_add(&mut self, mut x: Tensor, skip: &Tensor, train: bool) -> Result<Tensor> {
        ops::add_relu_(&mut x, skip)?;
        self.saved_output = train.then(|| x.clone());
        Ok(x)
    }

    /// dL/dx, consuming `dy` (computed in place).
    pub fn backward(&mut self, mut dy: Tensor) -> Result<Tensor> {
        let y = self.saved_output.take().ok_or(NnError::NoForward("Relu"))?;
        ops::relu_backward_(&mut dy, &y)?;
        Ok(dy)
    }
}

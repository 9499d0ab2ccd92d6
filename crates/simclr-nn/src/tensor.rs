//! [`Tensor`] and [`Device`].
//!
//! A tensor is a shape plus storage on a device. CPU storage is reference counted, so a layer can
//! keep its input for the backward pass without copying it; writing to a shared tensor copies it
//! first. Operations dispatch on the storage (see [`crate::ops`]), so a CUDA backend adds a
//! storage variant and one arm per operation, and the layers stay as they are.
//!
//! Activations of convolutional layers are channels-last (NHWC): `[batch, height, width,
//! channels]`. Models accept NCHW input, as PyTorch and the data loader produce it, and convert
//! once at the entrance.

use std::fmt;
use std::sync::Arc;

use crate::error::{NnError, Result};

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Device {
    /// Host memory, computed on CPU threads (rayon).
    #[default]
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

/// The memory behind a tensor.
#[derive(Clone)]
#[non_exhaustive]
pub enum Storage {
    /// f32 values in host memory.
    Cpu(Arc<Vec<f32>>),
}

/// An f32 tensor: a shape and the values in row-major order.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.device())
    }
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], device: Device) -> Tensor {
        Self::full(shape, 0.0, device)
    }

    /// A tensor with every value `value`.
    pub fn full(shape: &[usize], value: f32, device: Device) -> Tensor {
        let n = shape.iter().product();
        match device {
            Device::Cpu => Tensor {
                shape: shape.to_vec(),
                storage: Storage::Cpu(Arc::new(vec![value; n])),
            },
        }
    }

    /// A CPU tensor from values; fails if their count does not fit the shape.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(NnError::Invalid {
                op: "Tensor::from_vec",
                msg: format!("shape {shape:?} holds {n} values, got {}", data.len()),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(data)),
        })
    }

    /// A CPU tensor copied from a slice.
    pub fn from_slice(shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Self::from_vec(shape, data.to_vec())
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The device holding the values.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    /// The storage, for backends.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The values of a CPU tensor.
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.as_slice()),
        }
    }

    /// Mutable values of a CPU tensor; copies them first if another tensor shares them.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(Arc::make_mut(v).as_mut_slice()),
        }
    }

    /// The values copied to a host vector, whatever the device.
    pub fn to_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::Cpu(v) => v.as_ref().clone(),
        }
    }

    /// The same values under another shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(NnError::Shape {
                op: "reshape",
                expected: self.shape.clone(),
                got: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// A tensor of the same shape and device filled with zeros.
    pub fn zeros_like(&self) -> Tensor {
        Self::zeros(&self.shape, self.device())
    }

    /// Fails with a shape error unless the shape is `expected`.
    pub fn expect_shape(&self, op: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(NnError::Shape {
                op,
                expected: expected.to_vec(),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Fails with a shape error unless the tensor has `rank` dimensions.
    pub fn expect_rank(&self, op: &'static str, rank: usize) -> Result<()> {
        if self.shape.len() != rank {
            return Err(NnError::Invalid {
                op,
                msg: format!("expected a rank-{rank} tensor, got shape {:?}", self.shape),
            });
        }
        Ok(())
    }

    /// True when every value is finite.
    pub fn all_finite(&self) -> bool {
        match &self.storage {
            Storage::Cpu(v) => v.iter().all(|x| x.is_finite()),
        }
    }
}

//! [`Conv2d`]: a convolution without bias on NHWC activations.

use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::error::{NnError, Result};
use crate::ops;
use crate::param::{Module, Param, ParamKind, StateVisitor};
use crate::tensor::{Device, Tensor};

/// A 2-D convolution without bias (every convolution of a ResNet is followed by batch norm).
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// The kernel, `[out, kh, kw, in]`.
    pub weight: Param,
    /// Stride, both axes.
    pub stride: usize,
    /// Zero padding, both axes.
    pub padding: usize,
    saved_input: Option<Tensor>,
}

impl Conv2d {
    /// A convolution initialised as torchvision does (Kaiming normal, fan-out, ReLU gain).
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        rng: &mut impl Rng,
    ) -> Conv2d {
        let std = (2.0 / (cout * kernel * kernel) as f32).sqrt();
        let normal = Normal::new(0.0f32, std).expect("finite std");
        let data = (0..cout * kernel * kernel * cin)
            .map(|_| normal.sample(rng))
            .collect();
        let w = Tensor::from_vec(&[cout, kernel, kernel, cin], data).expect("sizes agree");
        Conv2d {
            weight: Param::new(w, ParamKind::ConvWeight),
            stride,
            padding,
            saved_input: None,
        }
    }

    /// `y = conv(x)`; keeps `x` for the backward pass when `train`.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        // In bf16 mixed precision an f32 input (the images) is rounded once, here, and kept so:
        // the backward pass reads the same values without rounding again, from half the memory.
        let x = ops::conv_input(x)?;
        let y = ops::conv2d(&x, &self.weight.value, self.stride, self.padding)?;
        self.saved_input = train.then_some(x);
        Ok(y)
    }

    /// Adds dL/dw to the weight's gradient and returns dL/dx when `need_dx`.
    pub fn backward(&mut self, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let x = self
            .saved_input
            .take()
            .ok_or(NnError::NoForward("Conv2d"))?;
        let (dw, dx) = ops::conv2d_backward(
            &x,
            &self.weight.value,
            dy,
            self.stride,
            self.padding,
            need_dx,
        )?;
        ops::add_(&mut self.weight.grad, &dw)?;
        Ok(dx)
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.weight.value.device()
    }
}

impl Module for Conv2d {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        v.param(&format!("{prefix}weight"), &mut self.weight);
    }
}

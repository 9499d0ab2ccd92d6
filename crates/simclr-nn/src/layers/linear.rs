//! [`Linear`]: a fully connected layer.

use rand::Rng;

use crate::error::{NnError, Result};
use crate::ops;
use crate::param::{Module, Param, ParamKind, StateVisitor};
use crate::tensor::Tensor;

/// `y = x W^T + b` on `[n, in]` rows, W `[out, in]` as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The weight, `[out, in]`.
    pub weight: Param,
    /// The bias, `[out]`, if any.
    pub bias: Option<Param>,
    saved_input: Option<Tensor>,
}

impl Linear {
    /// A layer initialised as PyTorch does: uniform in +-1/sqrt(in) for weight and bias.
    pub fn new(inputs: usize, outputs: usize, bias: bool, rng: &mut impl Rng) -> Linear {
        let bound = 1.0 / (inputs.max(1) as f32).sqrt();
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..=bound)).collect() };
        let w = Tensor::from_vec(&[outputs, inputs], uniform(outputs * inputs)).expect("sizes");
        let b = bias.then(|| {
            Param::new(
                Tensor::from_vec(&[outputs], uniform(outputs)).expect("sizes"),
                ParamKind::Bias,
            )
        });
        Linear {
            weight: Param::new(w, ParamKind::LinearWeight),
            bias: b,
            saved_input: None,
        }
    }

    /// The number of outputs.
    pub fn outputs(&self) -> usize {
        self.weight.value.shape()[0]
    }

    /// Forward; keeps `x` for the backward pass when `train`.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = ops::linear(x, &self.weight.value, self.bias.as_ref().map(|b| &b.value))?;
        self.saved_input = train.then(|| x.clone());
        Ok(y)
    }

    /// Adds the parameter gradients and returns dL/dx when `need_dx`.
    pub fn backward(&mut self, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let x = self
            .saved_input
            .take()
            .ok_or(NnError::NoForward("Linear"))?;
        let (dx, dw, db) = ops::linear_backward(&x, &self.weight.value, dy, need_dx)?;
        ops::add_(&mut self.weight.grad, &dw)?;
        if let Some(b) = &mut self.bias {
            ops::add_(&mut b.grad, &db)?;
        }
        Ok(dx)
    }
}

impl Module for Linear {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        v.param(&format!("{prefix}weight"), &mut self.weight);
        if let Some(b) = &mut self.bias {
            v.param(&format!("{prefix}bias"), b);
        }
    }
}

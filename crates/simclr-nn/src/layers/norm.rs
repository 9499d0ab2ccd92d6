//! [`BatchNorm`]: batch normalisation over the last axis, with an optional fused ReLU.

use crate::error::{NnError, Result};
use crate::ops;
use crate::param::{Module, Param, ParamKind, StateVisitor};
use crate::tensor::{Device, Tensor};

/// Batch normalisation of the channels (the last axis) of NHWC activations or `[n, features]`
/// rows: `BatchNorm2d` and `BatchNorm1d` of PyTorch in one, with the same running statistics
/// (momentum 0.1, unbiased running variance) and eps.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// Scale (gamma), initialised to 1.
    pub weight: Param,
    /// Shift (beta), initialised to 0.
    pub bias: Param,
    /// Running mean, used in evaluation mode.
    pub running_mean: Tensor,
    /// Running (unbiased) variance, used in evaluation mode.
    pub running_var: Tensor,
    /// Training-mode forward passes so far.
    pub num_batches_tracked: i64,
    /// Weight of the newest batch in the running statistics.
    pub momentum: f32,
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Apply ReLU to the output (saves a pass and a buffer over a separate ReLU).
    pub relu: bool,
    saved: Option<Saved>,
}

#[derive(Clone, Debug)]
struct Saved {
    x: Tensor,
    y: Option<Tensor>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

impl BatchNorm {
    /// Batch norm over `channels`, optionally followed by ReLU.
    pub fn new(channels: usize, relu: bool, device: Device) -> BatchNorm {
        BatchNorm {
            weight: Param::new(
                Tensor::full(&[channels], 1.0, device),
                ParamKind::NormWeight,
            ),
            bias: Param::new(Tensor::zeros(&[channels], device), ParamKind::NormBias),
            running_mean: Tensor::zeros(&[channels], device),
            running_var: Tensor::full(&[channels], 1.0, device),
            num_batches_tracked: 0,
            momentum: 0.1,
            eps: 1e-5,
            relu,
            saved: None,
        }
    }

    /// The number of channels.
    pub fn channels(&self) -> usize {
        self.weight.value.numel()
    }

    /// Normalises with batch statistics (and updates the running ones) when `train`, else with
    /// the running statistics.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.channels();
        if x.shape().last() != Some(&c) {
            return Err(NnError::Shape {
                op: "BatchNorm (channels, last axis)",
                expected: vec![c],
                got: x.shape().to_vec(),
            });
        }
        let gamma = self.weight.value.as_slice()?;
        let beta = self.bias.value.as_slice()?;
        if !train {
            let rm = self.running_mean.as_slice()?;
            let rv = self.running_var.as_slice()?;
            let scale: Vec<f32> = (0..c)
                .map(|i| gamma[i] / (rv[i] + self.eps).sqrt())
                .collect();
            let shift: Vec<f32> = (0..c).map(|i| beta[i] - rm[i] * scale[i]).collect();
            self.saved = None;
            return ops::channel_affine(x, &scale, &shift, self.relu);
        }
        let rows = x.numel() / c;
        if rows < 2 {
            return Err(NnError::Invalid {
                op: "BatchNorm",
                msg: format!(
                    "training needs more than one value per channel, got input {:?}",
                    x.shape()
                ),
            });
        }
        let (mean, var) = ops::channel_stats(x)?;
        let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let scale: Vec<f32> = (0..c).map(|i| gamma[i] * invstd[i]).collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
        let y = ops::channel_affine(x, &scale, &shift, self.relu)?;
        self.update_running(&mean, &var, rows)?;
        self.saved = Some(Saved {
            x: x.clone(),
            y: self.relu.then(|| y.clone()),
            mean,
            invstd,
        });
        Ok(y)
    }

    fn update_running(&mut self, mean: &[f32], var: &[f32], rows: usize) -> Result<()> {
        let m = self.momentum;
        let unbias = rows as f32 / (rows - 1) as f32;
        for (r, v) in self.running_mean.as_mut_slice()?.iter_mut().zip(mean) {
            *r = (1.0 - m) * *r + m * v;
        }
        for (r, v) in self.running_var.as_mut_slice()?.iter_mut().zip(var) {
            *r = (1.0 - m) * *r + m * v * unbias;
        }
        self.num_batches_tracked += 1;
        Ok(())
    }

    /// Adds dL/dgamma and dL/dbeta to the gradients and returns dL/dx.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let s = self.saved.take().ok_or(NnError::NoForward("BatchNorm"))?;
        let (dx, dg, db) = ops::batch_norm_backward(
            &s.x,
            dy,
            s.y.as_ref(),
            &s.mean,
            &s.invstd,
            &self.weight.value,
        )?;
        for (g, d) in self.weight.grad.as_mut_slice()?.iter_mut().zip(&dg) {
            *g += d;
        }
        for (g, d) in self.bias.grad.as_mut_slice()?.iter_mut().zip(&db) {
            *g += d;
        }
        Ok(dx)
    }
}

impl Module for BatchNorm {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        v.param(&format!("{prefix}weight"), &mut self.weight);
        v.param(&format!("{prefix}bias"), &mut self.bias);
        v.buffer(&format!("{prefix}running_mean"), &mut self.running_mean);
        v.buffer(&format!("{prefix}running_var"), &mut self.running_var);
        v.counter(
            &format!("{prefix}num_batches_tracked"),
            &mut self.num_batches_tracked,
        );
    }
}

//! [`BatchNorm`]: batch normalisation over the last axis, with an optional fused ReLU.

use std::sync::Arc;

use simclr_kernels::cpu;

use crate::buffers::HostBuffer;
use crate::cuda::ops as cuda;
use crate::dist::Communicator;
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
    /// Global batch norm: the replicas of data-parallel training whose batches this layer
    /// normalises as one (statistics and their gradients all-reduced). `None`: this batch only.
    pub sync: Option<Arc<dyn Communicator>>,
    /// Every replica's input has this layer's shape (checked once per step by the
    /// data-parallel step): the global row count is then the local one times the world size,
    /// without a collective.
    pub(crate) same_shape_everywhere: bool,
    saved: Option<Saved>,
    workspace: cuda::BnWorkspace,
}

#[derive(Clone, Debug)]
struct Saved {
    x: Tensor,
    y: Option<Tensor>,
    stats: Stats,
    /// Rows the statistics were taken over (all replicas' for global batch norm).
    count: usize,
}

/// The batch statistics, where the computation ran.
#[derive(Clone, Debug)]
enum Stats {
    Host { mean: Vec<f32>, invstd: Vec<f32> },
    Cuda(cuda::BnStats),
}

impl Stats {
    /// The device statistics, moved out (host statistics stay where they are).
    fn take_cuda(&mut self) -> Option<cuda::BnStats> {
        if let Stats::Host { .. } = self {
            return None;
        }
        let host = Stats::Host {
            mean: Vec::new(),
            invstd: Vec::new(),
        };
        match std::mem::replace(self, host) {
            Stats::Cuda(stats) => Some(stats),
            Stats::Host { .. } => None,
        }
    }
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
            sync: None,
            same_shape_everywhere: false,
            saved: None,
            workspace: cuda::BnWorkspace::default(),
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
        if let Device::Cuda(_) = x.device() {
            return self.forward_cuda(x, train);
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
        if rows < 2 && self.sync.is_none() {
            return Err(NnError::Invalid {
                op: "BatchNorm",
                msg: format!(
                    "training needs more than one value per channel, got input {:?}",
                    x.shape()
                ),
            });
        }
        let (mean, var, count) = match &self.sync {
            None => {
                let (m, v) = ops::channel_stats(x)?;
                (m, v, rows)
            }
            Some(comm) => global_stats(x.as_slice()?, rows, c, comm.as_ref())?,
        };
        let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let scale: Vec<f32> = (0..c).map(|i| gamma[i] * invstd[i]).collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
        let y = ops::channel_affine(x, &scale, &shift, self.relu)?;
        self.update_running(&mean, &var, count)?;
        self.saved = Some(Saved {
            x: x.clone(),
            y: self.relu.then(|| y.clone()),
            stats: Stats::Host { mean, invstd },
            count,
        });
        Ok(y)
    }

    /// Rows over all replicas: this batch's, or their sum for global batch norm.
    fn global_rows(&self, rows: usize) -> Result<usize> {
        let Some(comm) = &self.sync else {
            return Ok(rows);
        };
        if self.same_shape_everywhere {
            return Ok(rows * comm.world_size());
        }
        let mut n = [rows as f64];
        comm.all_reduce_f64(&mut n)?;
        Ok(n[0] as usize)
    }

    fn forward_cuda(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Statistics no backward pass took (gradient caching's first pass, an evaluation after
        // a training forward) serve this pass rather than new memory.
        if let Some(stats) = self.saved.take().and_then(|mut s| s.stats.take_cuda()) {
            self.workspace.recycle(stats);
        }
        // Evaluation takes no collective: ranks may evaluate independently.
        let count = if train {
            self.global_rows(x.numel() / self.channels())?
        } else {
            0
        };
        let p = cuda::BnTensors {
            gamma: &self.weight.value,
            beta: &self.bias.value,
            running_mean: &mut self.running_mean,
            running_var: &mut self.running_var,
            momentum: self.momentum,
            eps: self.eps,
            workspace: &mut self.workspace,
        };
        if !train {
            self.saved = None;
            return cuda::batch_norm_forward(x, p, self.relu, None).map(|(y, _)| y);
        }
        if count < 2 {
            return Err(NnError::Invalid {
                op: "BatchNorm",
                msg: format!(
                    "training needs more than one value per channel (over all replicas), got \
                     input {:?}",
                    x.shape()
                ),
            });
        }
        let (y, stats) =
            cuda::batch_norm_forward(x, p, self.relu, Some((count, self.sync.as_deref())))?;
        let stats = stats.ok_or(NnError::NoForward("BatchNorm (no statistics)"))?;
        self.num_batches_tracked += 1;
        self.saved = Some(Saved {
            x: x.clone(),
            y: self.relu.then(|| y.clone()),
            stats: Stats::Cuda(stats),
            count,
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
        let mut s = self.saved.take().ok_or(NnError::NoForward("BatchNorm"))?;
        // Moved out, not shared: the device statistics go back to the workspace once done.
        if let Some(stats) = s.stats.take_cuda() {
            dy.expect_shape("BatchNorm backward (dy)", s.x.shape())?;
            return cuda::batch_norm_backward(
                &s.x,
                dy,
                s.y.as_ref(),
                stats,
                s.count,
                &self.weight.value,
                (&mut self.weight.grad, &mut self.bias.grad),
                &mut self.workspace,
                self.sync.as_deref(),
            );
        }
        let (mean, invstd) = match &s.stats {
            Stats::Host { mean, invstd } => (mean, invstd),
            Stats::Cuda(_) => return Err(NnError::NoForward("BatchNorm")),
        };
        if let Some(comm) = self.sync.clone() {
            return self.backward_global(&s, mean, invstd, dy, comm.as_ref());
        }
        let (dx, dg, db) =
            ops::batch_norm_backward(&s.x, dy, s.y.as_ref(), mean, invstd, &self.weight.value)?;
        for (g, d) in self.weight.grad.as_mut_slice()?.iter_mut().zip(&dg) {
            *g += d;
        }
        for (g, d) in self.bias.grad.as_mut_slice()?.iter_mut().zip(&db) {
            *g += d;
        }
        Ok(dx)
    }
}

impl BatchNorm {
    /// The backward pass of global batch norm: the per-channel sums are all-reduced for dx; the
    /// parameter gradients get this replica's share only (the gradient all-reduce sums them).
    fn backward_global(
        &mut self,
        s: &Saved,
        mean: &[f32],
        invstd: &[f32],
        dy: &Tensor,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        dy.expect_shape("BatchNorm backward (dy)", s.x.shape())?;
        let c = self.channels();
        let rows = s.x.numel() / c;
        let x = s.x.as_slice()?;
        let relu_out = match &s.y {
            Some(y) => Some(y.as_slice()?),
            None => None,
        };
        let dys = dy.as_slice()?;
        let local = cpu::norm::batchnorm_backward_sums(x, dys, relu_out, rows, c, mean, invstd);
        let mut global = local.clone();
        comm.all_reduce_f64(&mut global)?;
        let mut dx = HostBuffer::uninit(x.len());
        let gamma = self.weight.value.as_slice()?;
        cpu::norm::batchnorm_backward_dx(
            x, dys, relu_out, c, mean, invstd, gamma, &global, s.count, &mut dx,
        );
        let (db, dg) = local.split_at(c);
        for (g, d) in self.weight.grad.as_mut_slice()?.iter_mut().zip(dg) {
            *g += *d as f32;
        }
        for (g, d) in self.bias.grad.as_mut_slice()?.iter_mut().zip(db) {
            *g += *d as f32;
        }
        Tensor::from_host(s.x.shape(), dx)
    }
}

/// Mean and biased variance over every replica's rows, and their number: two all-reduced passes
/// (sums, then centred squares), as the single-replica statistics.
fn global_stats(
    x: &[f32],
    rows: usize,
    c: usize,
    comm: &dyn Communicator,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let mut sum = cpu::norm::channel_sum(x, rows, c);
    sum.push(rows as f64);
    comm.all_reduce_f64(&mut sum)?;
    let count = sum[c];
    if count < 2.0 {
        return Err(NnError::Invalid {
            op: "BatchNorm",
            msg: format!(
                "training needs more than one value per channel over all replicas, got {count}"
            ),
        });
    }
    let mean: Vec<f64> = sum[..c].iter().map(|s| s / count).collect();
    let mut sq = cpu::norm::channel_centered_sq(x, rows, c, &mean);
    comm.all_reduce_f64(&mut sq)?;
    Ok((
        mean.iter().map(|&m| m as f32).collect(),
        sq.iter().map(|s| (s / count) as f32).collect(),
        count as usize,
    ))
}

impl Module for BatchNorm {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        v.batch_norm(prefix, self);
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

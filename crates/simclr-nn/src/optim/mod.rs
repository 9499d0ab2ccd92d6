//! Optimisers (SGD, LARS) and learning-rate schedules.
//!
//! An optimiser keeps its state (momentum buffers) by parameter name, so it survives a
//! checkpoint round trip and does not depend on the order of parameters.

mod schedule;

use std::collections::BTreeMap;

pub use schedule::{LrScaling, WarmupCosine};

use crate::cpu;
use crate::error::{NnError, Result};
use crate::param::{Module, Param};
use crate::tensor::{Device, Tensor};

/// An optimiser that updates a model's parameters from their gradients.
pub trait Optimizer {
    /// Updates one parameter.
    fn update(&mut self, name: &str, p: &mut Param, lr: f32) -> Result<()>;

    /// The momentum buffers, by parameter name (for checkpoints).
    fn state_mut(&mut self) -> &mut BTreeMap<String, Tensor>;

    /// Updates every parameter of `model` with learning rate `lr`.
    fn step(&mut self, model: &mut dyn Module, lr: f32) -> Result<()> {
        if !lr.is_finite() {
            return Err(NnError::NonFinite {
                what: format!("learning rate {lr}"),
            });
        }
        let mut first_err = None;
        model.for_each_param(&mut |name, p| {
            if first_err.is_none() {
                if let Err(e) = self.update(name, p, lr) {
                    first_err = Some(e);
                }
            }
        });
        first_err.map_or(Ok(()), Err)
    }
}

fn buffer<'a>(
    state: &'a mut BTreeMap<String, Tensor>,
    name: &str,
    p: &Param,
) -> Result<&'a mut Tensor> {
    let b = state
        .entry(name.to_string())
        .or_insert_with(|| p.value.zeros_like());
    if b.shape() != p.value.shape() {
        return Err(NnError::Shape {
            op: "optimiser state",
            expected: p.value.shape().to_vec(),
            got: b.shape().to_vec(),
        });
    }
    // State restored from a checkpoint arrives on the host; it follows the parameters.
    if b.device() != p.value.device() {
        *b = b.to_device(p.value.device())?;
    }
    Ok(b)
}

/// SGD with momentum (optionally Nesterov) and weight decay, as `torch.optim.SGD`.
#[derive(Clone, Debug)]
pub struct Sgd {
    /// Momentum.
    pub momentum: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay.
    pub weight_decay: f32,
    /// Skip weight decay on batch-norm parameters and biases.
    pub exclude_bn_and_bias_from_decay: bool,
    state: BTreeMap<String, Tensor>,
}

impl Sgd {
    /// SGD with these settings and decay on every parameter (as PyTorch).
    pub fn new(momentum: f32, nesterov: bool, weight_decay: f32) -> Sgd {
        Sgd {
            momentum,
            nesterov,
            weight_decay,
            exclude_bn_and_bias_from_decay: false,
            state: BTreeMap::new(),
        }
    }
}

impl Optimizer for Sgd {
    fn update(&mut self, name: &str, p: &mut Param, lr: f32) -> Result<()> {
        let wd = if self.exclude_bn_and_bias_from_decay && p.kind.is_bn_or_bias() {
            0.0
        } else {
            self.weight_decay
        };
        let buf = buffer(&mut self.state, name, p)?;
        if let Device::Cuda(_) = p.value.device() {
            let gpu = p.value.cuda()?.backend().clone();
            let g = p.grad.to_device(p.value.device())?;
            simclr_kernels::cuda::train::sgd_update(
                gpu.gpu(),
                p.value.cuda_mut()?,
                g.cuda()?.slice(),
                buf.cuda_mut()?,
                lr,
                self.momentum,
                wd,
                self.nesterov,
            )?;
            return Ok(());
        }
        cpu::optim::sgd_update(
            p.value.as_mut_slice()?,
            p.grad.as_slice()?,
            buf.as_mut_slice()?,
            lr,
            self.momentum,
            wd,
            self.nesterov,
        );
        Ok(())
    }

    fn state_mut(&mut self) -> &mut BTreeMap<String, Tensor> {
        &mut self.state
    }
}

/// LARS (You et al. 2017) as SimCLR uses it: momentum 0.9, trust coefficient 0.001, weight
/// decay 1e-6, with batch-norm parameters and biases excluded from both weight decay and the
/// trust-ratio adaptation.
#[derive(Clone, Debug)]
pub struct Lars {
    /// Momentum.
    pub momentum: f32,
    /// Trust coefficient eta.
    pub trust_coefficient: f32,
    /// L2 weight decay (on adapted parameters only).
    pub weight_decay: f32,
    /// Exclude batch-norm parameters and biases from decay and adaptation (the paper's setting).
    pub exclude_bn_and_bias: bool,
    /// Nesterov momentum.
    pub nesterov: bool,
    state: BTreeMap<String, Tensor>,
    gpu: GpuTables,
}

/// The device tables of the GPU LARS step, by parameter name (rebuilt, not copied, by a clone:
/// they hold device addresses of the original's buffers).
#[derive(Default)]
struct GpuTables(std::collections::HashMap<String, simclr_kernels::cuda::train::LarsGpu>);

impl Clone for GpuTables {
    fn clone(&self) -> Self {
        GpuTables::default()
    }
}

impl std::fmt::Debug for GpuTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTables({})", self.0.len())
    }
}

impl Default for Lars {
    fn default() -> Lars {
        Lars {
            momentum: 0.9,
            trust_coefficient: 0.001,
            weight_decay: 1e-6,
            exclude_bn_and_bias: true,
            nesterov: false,
            state: BTreeMap::new(),
            gpu: GpuTables::default(),
        }
    }
}

impl Optimizer for Lars {
    fn update(&mut self, name: &str, p: &mut Param, lr: f32) -> Result<()> {
        let adapt = !(self.exclude_bn_and_bias && p.kind.is_bn_or_bias());
        let v = buffer(&mut self.state, name, p)?;
        if let Device::Cuda(_) = p.value.device() {
            let backend = p.value.cuda()?.backend().clone();
            let g = p.grad.to_device(p.value.device())?;
            let lars = self.gpu.0.entry(name.to_string()).or_default();
            let cfg = simclr_kernels::cuda::train::LarsConfig {
                lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                eta: self.trust_coefficient,
                nesterov: self.nesterov,
            };
            let mut t = [simclr_kernels::cuda::train::LarsTensor {
                p: p.value.cuda_mut()?,
                g: g.cuda()?.slice(),
                v: v.cuda_mut()?,
                adapt,
            }];
            lars.step(backend.gpu(), &mut t, &cfg)?;
            return Ok(());
        }
        cpu::optim::lars_update(
            p.value.as_mut_slice()?,
            p.grad.as_slice()?,
            v.as_mut_slice()?,
            lr,
            self.momentum,
            self.weight_decay,
            self.trust_coefficient,
            adapt,
            self.nesterov,
        );
        Ok(())
    }

    fn state_mut(&mut self) -> &mut BTreeMap<String, Tensor> {
        &mut self.state
    }
}

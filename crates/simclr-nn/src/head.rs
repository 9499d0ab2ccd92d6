//! The projection head g: z = g(h).

use rand::Rng;

use crate::error::{NnError, Result};
use crate::layers::{BatchNorm, Linear};
use crate::param::{Module, StateVisitor};
use crate::tensor::{Device, Tensor};

/// The head's form (the paper's figure 8 compares the three).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadConfig {
    /// z = h.
    Identity,
    /// z = W h + b.
    Linear {
        /// Size of z.
        output_dim: usize,
    },
    /// `hidden_layers` times (Linear without bias -> BatchNorm -> ReLU), then Linear with bias.
    /// The paper's head is one hidden layer of size h, output 128.
    Mlp {
        /// Number of hidden layers (1 gives the paper's 2-layer MLP).
        hidden_layers: usize,
        /// Width of the hidden layers.
        hidden_dim: usize,
        /// Size of z.
        output_dim: usize,
    },
}

impl HeadConfig {
    /// The paper's head for features of size `h`: Linear(h, h) -> BN -> ReLU -> Linear(h, 128).
    pub fn paper(h: usize) -> HeadConfig {
        HeadConfig::Mlp {
            hidden_layers: 1,
            hidden_dim: h,
            output_dim: 128,
        }
    }

    /// The size of z given the size of h.
    pub fn output_dim(&self, h: usize) -> usize {
        match self {
            HeadConfig::Identity => h,
            HeadConfig::Linear { output_dim } | HeadConfig::Mlp { output_dim, .. } => *output_dim,
        }
    }
}

/// The projection head, named as `nn.Sequential` names its children (`0.weight`, `1.running_mean`,
/// ...; ReLUs take an index and hold nothing).
#[derive(Clone, Debug)]
pub struct ProjectionHead {
    hidden: Vec<(Linear, BatchNorm)>,
    out: Option<Linear>,
}

impl ProjectionHead {
    /// A head on features of size `input_dim`.
    pub fn new(
        config: &HeadConfig,
        input_dim: usize,
        device: Device,
        rng: &mut impl Rng,
    ) -> Result<ProjectionHead> {
        let mut head = Self::new_on_host(config, input_dim, rng)?;
        head.to_device(device)?;
        Ok(head)
    }

    fn new_on_host(
        config: &HeadConfig,
        input_dim: usize,
        rng: &mut impl Rng,
    ) -> Result<ProjectionHead> {
        let device = Device::Cpu;
        match config {
            HeadConfig::Identity => Ok(ProjectionHead {
                hidden: vec![],
                out: None,
            }),
            HeadConfig::Linear { output_dim } => {
                if *output_dim == 0 {
                    return Err(NnError::Invalid {
                        op: "ProjectionHead",
                        msg: "output_dim must be positive".into(),
                    });
                }
                Ok(ProjectionHead {
                    hidden: vec![],
                    out: Some(Linear::new(input_dim, *output_dim, true, rng)),
                })
            }
            HeadConfig::Mlp {
                hidden_layers,
                hidden_dim,
                output_dim,
            } => {
                if *hidden_dim == 0 || *output_dim == 0 {
                    return Err(NnError::Invalid {
                        op: "ProjectionHead",
                        msg: "hidden_dim and output_dim must be positive".into(),
                    });
                }
                let mut hidden = Vec::new();
                let mut d = input_dim;
                for _ in 0..*hidden_layers {
                    hidden.push((
                        Linear::new(d, *hidden_dim, false, rng),
                        BatchNorm::new(*hidden_dim, true, device),
                    ));
                    d = *hidden_dim;
                }
                Ok(ProjectionHead {
                    hidden,
                    out: Some(Linear::new(d, *output_dim, true, rng)),
                })
            }
        }
    }

    /// z for `[n, h]`.
    pub fn forward(&mut self, h: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = h.clone();
        for (lin, bn) in &mut self.hidden {
            x = bn.forward(&lin.forward(&x, train)?, train)?;
        }
        match &mut self.out {
            Some(out) => out.forward(&x, train),
            None => Ok(x),
        }
    }

    /// dL/dh from dL/dz; adds the head's parameter gradients.
    pub fn backward(&mut self, dz: &Tensor) -> Result<Tensor> {
        let mut g = match &mut self.out {
            Some(out) => out
                .backward(dz, true)?
                .ok_or(NnError::NoForward("ProjectionHead"))?,
            None => dz.clone(),
        };
        for (lin, bn) in self.hidden.iter_mut().rev() {
            g = lin
                .backward(&bn.backward(&g)?, true)?
                .ok_or(NnError::NoForward("ProjectionHead"))?;
        }
        Ok(g)
    }
}

impl Module for ProjectionHead {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        for (i, (lin, bn)) in self.hidden.iter_mut().enumerate() {
            lin.visit(&format!("{prefix}{}.", 3 * i), v);
            bn.visit(&format!("{prefix}{}.", 3 * i + 1), v);
        }
        if let Some(out) = &mut self.out {
            out.visit(&format!("{prefix}{}.", 3 * self.hidden.len()), v);
        }
    }
}

//! Tensors, layers with explicit backward passes, ResNets, the NT-Xent loss, LARS and SGD,
//! and safetensors checkpoints: the training core of SimCLR.
//!
//! Every layer has a hand-written `forward(x, train)` and `backward(dy)` (llm.c style, no
//! autograd); operations dispatch on the [`Device`] of their tensors, so the CPU backend
//! ([`cpu`]) and the CUDA one ([`cuda`]: cuDNN, cuBLAS and our kernels) share the layers.
//! On a GPU, [`cuda::MathMode::Bf16`] trains in mixed precision: the trunk's activations are
//! bf16 tensors ([`DType::Bf16`]), everything the optimiser and the loss see stays f32.
//!
//! ```
//! use simclr_nn::{Device, HeadConfig, Lars, ResNetConfig, SimClr, SimClrConfig, Stem, Tensor};
//!
//! # fn main() -> Result<(), simclr_nn::NnError> {
//! // A small CIFAR-style ResNet with the paper's MLP head.
//! let mut encoder = ResNetConfig::resnet(18, 1, Stem::Cifar)?;
//! encoder.layers = [1, 1, 1, 1];
//! encoder.base_width = 4;
//! let head = HeadConfig::Mlp { hidden_layers: 1, hidden_dim: 32, output_dim: 16 };
//! let mut model = SimClr::new(&SimClrConfig { encoder, head }, Device::Cpu, 0)?;
//!
//! // Two views of 4 images: rows 0..4 first views, rows 4..8 second views.
//! let views = Tensor::from_vec(&[8, 3, 8, 8], (0..8 * 3 * 64).map(|i| (i as f32 * 0.37).sin()).collect())?;
//! let mut lars = Lars::default();
//! let stats = simclr_nn::train_step(&mut model, &views, &mut lars, 0.3, 0.5)?;
//! assert!(stats.loss.is_finite());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod buffers;
pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod dist;
mod error;
pub mod grad_cache;
mod head;
pub mod layers;
mod loss;
mod model;
pub mod ops;
pub mod optim;
mod param;
mod resnet;
mod tensor;
mod train;

pub use checkpoint::Checkpoint;
pub use error::{NnError, Result};
pub use head::{HeadConfig, ProjectionHead};
pub use loss::{nt_xent, ContrastiveLoss};
pub use model::{SimClr, SimClrConfig};
pub use optim::{Lars, LrScaling, Optimizer, Sgd, WarmupCosine};
pub use param::{Module, Param, ParamKind, StateVisitor};
pub use resnet::{Block, BlockKind, GradsReady, ResNet, ResNetConfig, Stem};
pub use tensor::{DType, Device, Storage, Tensor};
pub use train::{train_step, train_step_with_h, StepStats};

//! [`SimClr`]: the encoder f and the projection head g.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::head::{HeadConfig, ProjectionHead};
use crate::param::{Module, StateVisitor};
use crate::resnet::{GradsReady, ResNet, ResNetConfig};
use crate::tensor::{Device, Tensor};

/// The architecture of a SimCLR model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimClrConfig {
    /// The encoder f.
    pub encoder: ResNetConfig,
    /// The projection head g.
    pub head: HeadConfig,
}

/// Encoder plus projection head. State names are `encoder.<torchvision name>` and
/// `head.<index>.<name>`.
#[derive(Clone, Debug)]
pub struct SimClr {
    /// f: images to h.
    pub encoder: ResNet,
    /// g: h to z.
    pub head: ProjectionHead,
}

impl SimClr {
    /// A model initialised from `seed` (the same seed gives the same weights everywhere).
    pub fn new(config: &SimClrConfig, device: Device, seed: u64) -> Result<SimClr> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let encoder = ResNet::new(config.encoder.clone(), device, &mut rng)?;
        let head = ProjectionHead::new(&config.head, encoder.feature_dim(), device, &mut rng)?;
        Ok(SimClr { encoder, head })
    }

    /// The device holding the weights.
    pub fn device(&self) -> Device {
        self.encoder.device()
    }

    /// (h, z) for NCHW images.
    pub fn forward(&mut self, images: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let h = self.encoder.forward(images, train)?;
        let z = self.head.forward(&h, train)?;
        Ok((h, z))
    }

    /// Backward from dL/dz through head and encoder, adding every gradient.
    pub fn backward(&mut self, dz: &Tensor) -> Result<()> {
        self.backward_with(dz, &mut |_| Ok(()))
    }

    /// [`SimClr::backward`], handing each part of the model to `ready` as soon as its
    /// parameters' gradients are final (the head first, then the encoder's parts as
    /// [`ResNet::backward_with`] does). Every parameter is handed over exactly once.
    pub fn backward_with(&mut self, dz: &Tensor, ready: &mut GradsReady<'_>) -> Result<()> {
        let dh = self.head.backward(dz)?;
        ready(&mut self.head)?;
        self.encoder.backward_with(&dh, ready)
    }
}

impl Module for SimClr {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        self.encoder.visit(&format!("{prefix}encoder."), v);
        self.head.visit(&format!("{prefix}head."), v);
    }
}

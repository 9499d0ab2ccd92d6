//! ResNet-18/34/50 (torchvision v1.5: the stride of a bottleneck is on its 3x3 convolution) with
//! SimCLR's width multiplier and CIFAR stem.

use rand::Rng;

use crate::error::{NnError, Result};
use crate::layers::{BatchNorm, Conv2d, GlobalAvgPool, MaxPool, Relu};
use crate::ops;
use crate::param::{Module, StateVisitor};
use crate::tensor::{Device, Tensor};

/// The residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1 with expansion 4 (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    /// Output channels over the block's width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The first layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stem {
    /// 7x7 stride-2 convolution and 3x3 stride-2 max pooling (ImageNet).
    ImageNet,
    /// 3x3 stride-1 convolution, no pooling (SimCLR's stem for CIFAR-10's 32x32 images).
    Cifar,
}

/// The shape of a ResNet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Block type.
    pub block: BlockKind,
    /// Blocks per stage (four stages).
    pub layers: [usize; 4],
    /// Width of the stem and the first stage: 64 times the width multiplier.
    pub base_width: usize,
    /// The stem.
    pub stem: Stem,
    /// Input channels (3 for RGB).
    pub in_channels: usize,
}

impl ResNetConfig {
    /// ResNet-18, 34 or 50 with a width multiplier (1, 2, 4 in the paper).
    pub fn resnet(depth: usize, width_multiplier: usize, stem: Stem) -> Result<ResNetConfig> {
        let (block, layers) = match depth {
            18 => (BlockKind::Basic, [2, 2, 2, 2]),
            34 => (BlockKind::Basic, [3, 4, 6, 3]),
            50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            101 => (BlockKind::Bottleneck, [3, 4, 23, 3]),
            152 => (BlockKind::Bottleneck, [3, 8, 36, 3]),
            d => {
                return Err(NnError::Invalid {
                    op: "ResNetConfig",
                    msg: format!("depth {d} is not one of 18, 34, 50, 101, 152"),
                })
            }
        };
        if width_multiplier == 0 {
            return Err(NnError::Invalid {
                op: "ResNetConfig",
                msg: "width multiplier must be at least 1".into(),
            });
        }
        Ok(ResNetConfig {
            block,
            layers,
            base_width: 64 * width_multiplier,
            stem,
            in_channels: 3,
        })
    }

    /// The size of the representation h: the last stage's output channels.
    pub fn feature_dim(&self) -> usize {
        self.base_width * 8 * self.block.expansion()
    }
}

/// One residual block, basic or bottleneck.
#[derive(Clone, Debug)]
pub struct Block {
    kind: BlockKind,
    convs: Vec<Conv2d>,
    bns: Vec<BatchNorm>,
    downsample: Option<(Conv2d, BatchNorm)>,
    out_relu: Relu,
}

impl Block {
    fn new(
        kind: BlockKind,
        cin: usize,
        width: usize,
        stride: usize,
        dev: Device,
        rng: &mut impl Rng,
    ) -> Block {
        let cout = width * kind.expansion();
        let (convs, bns) = match kind {
            BlockKind::Basic => (
                vec![
                    Conv2d::new(cin, width, 3, stride, 1, rng),
                    Conv2d::new(width, width, 3, 1, 1, rng),
                ],
                vec![
                    BatchNorm::new(width, true, dev),
                    BatchNorm::new(width, false, dev),
                ],
            ),
            BlockKind::Bottleneck => (
                vec![
                    Conv2d::new(cin, width, 1, 1, 0, rng),
                    Conv2d::new(width, width, 3, stride, 1, rng),
                    Conv2d::new(width, cout, 1, 1, 0, rng),
                ],
                vec![
                    BatchNorm::new(width, true, dev),
                    BatchNorm::new(width, true, dev),
                    BatchNorm::new(cout, false, dev),
                ],
            ),
        };
        let downsample = (stride != 1 || cin != cout).then(|| {
            (
                Conv2d::new(cin, cout, 1, stride, 0, rng),
                BatchNorm::new(cout, false, dev),
            )
        });
        Block {
            kind,
            convs,
            bns,
            downsample,
            out_relu: Relu::default(),
        }
    }

    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (conv, bn) in self.convs.iter_mut().zip(&mut self.bns) {
            h = bn.forward(&conv.forward(&h, train)?, train)?;
        }
        match &mut self.downsample {
            Some((conv, bn)) => {
                let id = bn.forward(&conv.forward(x, train)?, train)?;
                self.out_relu.forward_add(h, &id, train)
            }
            None => self.out_relu.forward_add(h, x, train),
        }
    }

    fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        let d = self.out_relu.backward(dy)?;
        let mut g = d.clone();
        for (conv, bn) in self.convs.iter_mut().zip(&mut self.bns).rev() {
            g = conv
                .backward(&bn.backward(&g)?, true)?
                .ok_or(NnError::NoForward("Block"))?;
        }
        let id = match &mut self.downsample {
            Some((conv, bn)) => conv
                .backward(&bn.backward(&d)?, true)?
                .ok_or(NnError::NoForward("Block"))?,
            None => d,
        };
        ops::add_(&mut g, &id)?;
        Ok(g)
    }
}

impl Module for Block {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        for (i, (conv, bn)) in self.convs.iter_mut().zip(&mut self.bns).enumerate() {
            conv.visit(&format!("{prefix}conv{}.", i + 1), v);
            bn.visit(&format!("{prefix}bn{}.", i + 1), v);
        }
        if let Some((conv, bn)) = &mut self.downsample {
            conv.visit(&format!("{prefix}downsample.0."), v);
            bn.visit(&format!("{prefix}downsample.1."), v);
        }
    }
}

/// Called during a backward pass with a part of the model whose parameter gradients are final.
pub type GradsReady<'a> = dyn FnMut(&mut dyn Module) -> Result<()> + 'a;

/// A ResNet encoder f: NCHW images to the representation h after global average pooling.
#[derive(Clone, Debug)]
pub struct ResNet {
    config: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: Option<MaxPool>,
    stages: Vec<Vec<Block>>,
    pool: GlobalAvgPool,
}

impl ResNet {
    /// A ResNet initialised as torchvision does, from `rng`.
    pub fn new(config: ResNetConfig, device: Device, rng: &mut impl Rng) -> Result<ResNet> {
        if config.base_width == 0 || config.in_channels == 0 || config.layers.contains(&0) {
            return Err(NnError::Invalid {
                op: "ResNet",
                msg: format!("every stage needs a block and a width: {config:?}"),
            });
        }
        // Built on the host (the initialisation draws there), then moved.
        device.ensure_usable()?;
        let target = device;
        let device = Device::Cpu;
        let w = config.base_width;
        let (conv1, maxpool) = match config.stem {
            Stem::ImageNet => (
                Conv2d::new(config.in_channels, w, 7, 2, 3, rng),
                Some(MaxPool::new(3, 2, 1)),
            ),
            Stem::Cifar => (Conv2d::new(config.in_channels, w, 3, 1, 1, rng), None),
        };
        let bn1 = BatchNorm::new(w, true, device);
        let mut cin = w;
        let mut stages = Vec::new();
        for (s, &blocks) in config.layers.iter().enumerate() {
            let width = w << s;
            let mut stage = Vec::new();
            for b in 0..blocks {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                stage.push(Block::new(config.block, cin, width, stride, device, rng));
                cin = width * config.block.expansion();
            }
            stages.push(stage);
        }
        let mut net = ResNet {
            config,
            conv1,
            bn1,
            maxpool,
            stages,
            pool: GlobalAvgPool::default(),
        };
        net.to_device(target)?;
        Ok(net)
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// The device holding the weights.
    pub fn device(&self) -> Device {
        self.conv1.device()
    }

    /// The size of h.
    pub fn feature_dim(&self) -> usize {
        self.config.feature_dim()
    }

    /// h for NCHW images `[n, c, height, width]`, on the model's device (images elsewhere are
    /// copied there first).
    pub fn forward(&mut self, images: &Tensor, train: bool) -> Result<Tensor> {
        images.expect_rank("ResNet input (NCHW)", 4)?;
        if images.shape()[1] != self.config.in_channels {
            return Err(NnError::Shape {
                op: "ResNet input channels",
                expected: vec![self.config.in_channels],
                got: vec![images.shape()[1]],
            });
        }
        let x = ops::nchw_to_nhwc(&images.to_device(self.conv1.device())?)?;
        let mut h = self.bn1.forward(&self.conv1.forward(&x, train)?, train)?;
        if let Some(mp) = &mut self.maxpool {
            h = mp.forward(&h, train)?;
        }
        for stage in &mut self.stages {
            for block in stage {
                h = block.forward(&h, train)?;
            }
        }
        self.pool.forward(&h, train)
    }

    /// Backward from dL/dh; adds every parameter's gradient. The input gets no gradient.
    pub fn backward(&mut self, dh: &Tensor) -> Result<()> {
        self.backward_with(dh, &mut |_| Ok(()))
    }

    /// [`ResNet::backward`], handing each part of the network to `ready` as soon as its
    /// parameters' gradients are final: every block from the last to the first, then the stem's
    /// batch norm and its convolution. The data-parallel step reduces those gradients while the
    /// rest of the backward pass runs.
    pub fn backward_with(&mut self, dh: &Tensor, ready: &mut GradsReady<'_>) -> Result<()> {
        let mut g = self.pool.backward(dh)?;
        for stage in self.stages.iter_mut().rev() {
            for block in stage.iter_mut().rev() {
                g = block.backward(g)?;
                ready(block)?;
            }
        }
        if let Some(mp) = &mut self.maxpool {
            g = mp.backward(&g)?;
        }
        let g = self.bn1.backward(&g)?;
        ready(&mut self.bn1)?;
        self.conv1.backward(&g, false)?;
        ready(&mut self.conv1)
    }

    /// The block kind of each block, for diagnostics.
    pub fn block_kinds(&self) -> Vec<BlockKind> {
        self.stages.iter().flatten().map(|b| b.kind).collect()
    }
}

impl Module for ResNet {
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor) {
        self.conv1.visit(&format!("{prefix}conv1."), v);
        self.bn1.visit(&format!("{prefix}bn1."), v);
        for (s, stage) in self.stages.iter_mut().enumerate() {
            for (b, block) in stage.iter_mut().enumerate() {
                block.visit(&format!("{prefix}layer{}.{b}.", s + 1), v);
            }
        }
    }
}

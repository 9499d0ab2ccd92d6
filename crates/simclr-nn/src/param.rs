//! Trainable parameters and the visitor that walks a model's state by name.

use crate::tensor::Tensor;

/// What a parameter is: decides its layout in checkpoints and whether weight decay and LARS
/// adaptation apply to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Convolution kernel, stored `[out, kh, kw, in]` here and `[out, in, kh, kw]` in checkpoints.
    ConvWeight,
    /// Linear layer weight `[out, in]`.
    LinearWeight,
    /// Linear layer bias.
    Bias,
    /// Batch-norm scale (gamma).
    NormWeight,
    /// Batch-norm shift (beta).
    NormBias,
}

impl ParamKind {
    /// True for batch-norm parameters and biases, which SimCLR excludes from weight decay and
    /// from LARS adaptation.
    pub fn is_bn_or_bias(self) -> bool {
        !matches!(self, ParamKind::ConvWeight | ParamKind::LinearWeight)
    }
}

/// A parameter with its gradient (same shape, accumulated by `backward`).
#[derive(Clone, Debug)]
pub struct Param {
    /// The values.
    pub value: Tensor,
    /// dL/dvalue, summed over the backward passes since the last [`Param::zero_grad`].
    pub grad: Tensor,
    /// What the parameter is.
    pub kind: ParamKind,
}

impl Param {
    /// A parameter with a zero gradient.
    pub fn new(value: Tensor, kind: ParamKind) -> Param {
        let grad = value.zeros_like();
        Param { value, grad, kind }
    }

    /// Sets the gradient to zero (in place, so a GPU gradient keeps its address).
    pub fn zero_grad(&mut self) {
        if self.grad.shape() != self.value.shape()
            || self.grad.device() != self.value.device()
            || self.grad.fill_zero_().is_err()
        {
            self.grad = self.value.zeros_like();
        }
    }
}

/// Receives a model's state, named as torchvision names it (`layer1.0.bn1.running_mean`).
pub trait StateVisitor {
    /// A trainable parameter.
    fn param(&mut self, name: &str, p: &mut Param);
    /// A non-trainable f32 buffer (batch-norm running statistics).
    fn buffer(&mut self, name: &str, t: &mut Tensor);
    /// An integer buffer (batch-norm `num_batches_tracked`).
    fn counter(&mut self, name: &str, v: &mut i64);
    /// A batch-norm layer, `name` its prefix, before its parameters and buffers are visited
    /// (nothing by default; [`crate::dist`] uses it to make batch norm global).
    fn batch_norm(&mut self, _name: &str, _bn: &mut crate::layers::BatchNorm) {}
}

/// Something with named state: layers, blocks, models.
pub trait Module {
    /// Walks every parameter and buffer, names prefixed by `prefix` (which ends with `.` or is
    /// empty).
    fn visit(&mut self, prefix: &str, v: &mut dyn StateVisitor);

    /// Calls `f` on every trainable parameter.
    fn for_each_param(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        struct P<'a>(&'a mut dyn FnMut(&str, &mut Param));
        impl StateVisitor for P<'_> {
            fn param(&mut self, name: &str, p: &mut Param) {
                (self.0)(name, p)
            }
            fn buffer(&mut self, _: &str, _: &mut Tensor) {}
            fn counter(&mut self, _: &str, _: &mut i64) {}
        }
        self.visit("", &mut P(f));
    }

    /// Zeroes every gradient.
    fn zero_grad(&mut self) {
        self.for_each_param(&mut |_, p| p.zero_grad());
    }

    /// Moves every parameter, gradient and buffer to `device` (no copy for those already
    /// there).
    fn to_device(&mut self, device: crate::tensor::Device) -> crate::error::Result<()> {
        device.ensure_usable()?;
        struct M {
            device: crate::tensor::Device,
            err: Option<crate::error::NnError>,
        }
        impl M {
            fn mv(&mut self, t: &mut Tensor) {
                if self.err.is_none() {
                    match t.to_device(self.device) {
                        Ok(m) => *t = m,
                        Err(e) => self.err = Some(e),
                    }
                }
            }
        }
        impl StateVisitor for M {
            fn param(&mut self, _: &str, p: &mut Param) {
                self.mv(&mut p.value);
                self.mv(&mut p.grad);
            }
            fn buffer(&mut self, _: &str, t: &mut Tensor) {
                self.mv(t);
            }
            fn counter(&mut self, _: &str, _: &mut i64) {}
        }
        let mut m = M { device, err: None };
        self.visit("", &mut m);
        m.err.map_or(Ok(()), Err)
    }

    /// The number of trainable values.
    fn num_params(&mut self) -> usize {
        let mut n = 0;
        self.for_each_param(&mut |_, p| n += p.value.numel());
        n
    }
}

//! Tensor operations, dispatched on the device of their operands.
//!
//! Layers call these and never touch a backend directly; each operation checks shapes, then
//! hands the values to the backend of the device: [`crate::cpu`] or [`crate::cuda`].

use crate::buffers::HostBuffer;
use crate::cpu;
use crate::cpu::conv::ConvGeom;
use crate::cpu::gemm::{matmul, Mat, Par};
use crate::cpu::pool::PoolGeom;
use crate::cuda::ops as gpu;
use crate::error::{NnError, Result};
use crate::tensor::{DType, Device, Tensor};

fn same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<Device> {
    if a.device() != b.device() {
        return Err(NnError::Device {
            op,
            expected: a.device().to_string(),
            got: b.device().to_string(),
        });
    }
    Ok(a.device())
}

fn out(shape: &[usize], device: Device, data: HostBuffer) -> Result<Tensor> {
    Tensor::from_host(shape, data)?.to_device(device)
}

/// An output buffer the operation overwrites entirely, from the cache of earlier steps' buffers.
fn uninit(n: usize) -> HostBuffer {
    HostBuffer::uninit(n)
}

/// The geometry of a convolution of NHWC `x` with OHWI `w`, checked.
pub fn conv_geom(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<ConvGeom> {
    x.expect_rank("conv2d", 4)?;
    w.expect_rank("conv2d", 4)?;
    let (xs, ws) = (x.shape(), w.shape());
    if xs[3] != ws[3] {
        return Err(NnError::Shape {
            op: "conv2d (input channels)",
            expected: vec![ws[3]],
            got: vec![xs[3]],
        });
    }
    if stride == 0 || xs[1] + 2 * pad < ws[1] || xs[2] + 2 * pad < ws[2] {
        return Err(NnError::Invalid {
            op: "conv2d",
            msg: format!("input {xs:?} too small for kernel {ws:?} (stride {stride}, pad {pad})"),
        });
    }
    Ok(ConvGeom {
        n: xs[0],
        h: xs[1],
        w: xs[2],
        cin: xs[3],
        cout: ws[0],
        kh: ws[1],
        kw: ws[2],
        stride,
        pad,
    })
}

/// `x` in the element type convolutions on its device read: bf16 on a GPU in
/// [`crate::cuda::MathMode::Bf16`], else `x` itself (shared, not copied).
pub fn conv_input(x: &Tensor) -> Result<Tensor> {
    if let Device::Cuda(i) = x.device() {
        if crate::cuda::CudaBackend::get(i)?.math_mode() == crate::cuda::MathMode::Bf16 {
            return x.to_dtype(DType::Bf16);
        }
    }
    Ok(x.clone())
}

/// Convolution forward: NHWC `x`, OHWI `w`, returns NHWC.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let g = conv_geom(x, w, stride, pad)?;
    let dev = same_device("conv2d", x, w)?;
    if let Device::Cuda(_) = dev {
        return gpu::conv2d(x, w, &g);
    }
    let mut y = uninit(g.n * g.oh() * g.ow() * g.cout);
    cpu::conv::conv2d_forward(x.as_slice()?, w.as_slice()?, &g, &mut y);
    out(&[g.n, g.oh(), g.ow(), g.cout], dev, y)
}

/// Convolution backward: returns dL/dw and, if `need_dx`, dL/dx.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
    need_dx: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let g = conv_geom(x, w, stride, pad)?;
    let dev = same_device("conv2d_backward", x, dy)?;
    dy.expect_shape("conv2d_backward (dy)", &[g.n, g.oh(), g.ow(), g.cout])?;
    if let Device::Cuda(_) = dev {
        return gpu::conv2d_backward(x, w, dy, &g, need_dx);
    }
    let mut dw = uninit(w.numel());
    let mut dx = need_dx.then(|| uninit(x.numel()));
    cpu::conv::conv2d_backward(
        x.as_slice()?,
        w.as_slice()?,
        dy.as_slice()?,
        &g,
        &mut dw,
        dx.as_deref_mut(),
    );
    let dx = match dx {
        Some(d) => Some(out(x.shape(), dev, d)?),
        None => None,
    };
    Ok((out(w.shape(), dev, dw)?, dx))
}

/// Rows and channels of a batch-norm input: the last axis is the channel.
fn rows_channels(x: &Tensor) -> (usize, usize) {
    let c = *x.shape().last().unwrap_or(&1);
    (x.numel() / c.max(1), c)
}

/// Batch statistics of the channels (last axis): (mean, biased variance).
pub fn channel_stats(x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let (rows, c) = rows_channels(x);
    if rows == 0 {
        return Err(NnError::Invalid {
            op: "batch_norm",
            msg: "empty batch".into(),
        });
    }
    let host = x.to_device(Device::Cpu)?;
    Ok(cpu::norm::batch_stats(host.as_slice()?, rows, c))
}

/// `y = x * scale + shift` per channel (last axis), optionally followed by ReLU.
pub fn channel_affine(x: &Tensor, scale: &[f32], shift: &[f32], relu: bool) -> Result<Tensor> {
    let (_, c) = rows_channels(x);
    if scale.len() != c || shift.len() != c {
        return Err(NnError::Shape {
            op: "channel_affine",
            expected: vec![c],
            got: vec![scale.len()],
        });
    }
    if let Device::Cuda(_) = x.device() {
        return gpu::channel_affine(x, scale, shift, relu);
    }
    let mut y = uninit(x.numel());
    cpu::norm::affine_rows(x.as_slice()?, c, scale, shift, &mut y, relu);
    out(x.shape(), x.device(), y)
}

/// Training-mode batch-norm backward: returns (dx, dgamma, dbeta). `relu_out` is the output of a
/// ReLU fused after the normalisation, if any.
pub fn batch_norm_backward(
    x: &Tensor,
    dy: &Tensor,
    relu_out: Option<&Tensor>,
    mean: &[f32],
    invstd: &[f32],
    gamma: &Tensor,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    dy.expect_shape("batch_norm_backward (dy)", x.shape())?;
    if let Device::Cuda(_) = x.device() {
        // The layer runs its own device path; this one serves callers with host statistics.
        let host = |t: &Tensor| t.to_device(Device::Cpu);
        let y = relu_out.map(host).transpose()?;
        let (dx, dg, db) = batch_norm_backward(
            &host(x)?,
            &host(dy)?,
            y.as_ref(),
            mean,
            invstd,
            &host(gamma)?,
        )?;
        return Ok((dx.to_device(x.device())?.to_dtype(x.dtype())?, dg, db));
    }
    let (rows, c) = rows_channels(x);
    let mut dx = uninit(x.numel());
    let relu_out = match relu_out {
        Some(y) => {
            y.expect_shape("batch_norm_backward (relu output)", x.shape())?;
            Some(y.as_slice()?)
        }
        None => None,
    };
    let (dg, db) = cpu::norm::batchnorm_backward(
        x.as_slice()?,
        dy.as_slice()?,
        relu_out,
        rows,
        c,
        mean,
        invstd,
        gamma.as_slice()?,
        &mut dx,
    );
    Ok((out(x.shape(), x.device(), dx)?, dg, db))
}

/// ReLU in place.
pub fn relu_(x: &mut Tensor) -> Result<()> {
    if let Device::Cuda(_) = x.device() {
        *x = gpu::relu(x)?;
        return Ok(());
    }
    cpu::eltwise::relu_inplace(x.as_mut_slice()?);
    Ok(())
}

/// Zeroes `dy` where the ReLU output `y` was not positive.
pub fn relu_backward_(dy: &mut Tensor, y: &Tensor) -> Result<()> {
    dy.expect_shape("relu_backward", y.shape())?;
    if let Device::Cuda(_) = same_device("relu_backward", dy, y)? {
        *dy = gpu::relu_backward(dy, y)?;
        return Ok(());
    }
    cpu::eltwise::relu_backward_inplace(dy.as_mut_slice()?, y.as_slice()?);
    Ok(())
}

/// `a += b`.
pub fn add_(a: &mut Tensor, b: &Tensor) -> Result<()> {
    a.expect_shape("add", b.shape())?;
    if let Device::Cuda(_) = same_device("add", a, b)? {
        return gpu::add_(a, b);
    }
    cpu::eltwise::add_inplace(a.as_mut_slice()?, b.as_slice()?);
    Ok(())
}

/// `a = max(a + b, 0)` in one pass (a residual block's add and ReLU).
pub fn add_relu_(a: &mut Tensor, b: &Tensor) -> Result<()> {
    a.expect_shape("add_relu", b.shape())?;
    if let Device::Cuda(_) = same_device("add_relu", a, b)? {
        return gpu::add_relu_(a, b);
    }
    cpu::eltwise::add_relu_inplace(a.as_mut_slice()?, b.as_slice()?);
    Ok(())
}

/// Where the maxima of a max pooling were (flat input indices), on the device of its input:
/// what the backward pass needs.
#[derive(Clone, Debug)]
pub struct PoolIndices(Indices);

/// The u32 indices live in the bits of an f32 buffer, so that they come from the buffer caches
/// (see [`crate::buffers`]) like a tensor's values: a steady-state step allocates nothing.
#[derive(Clone, Debug)]
enum Indices {
    Host(std::sync::Arc<HostBuffer>),
    Cuda(std::sync::Arc<crate::cuda::CudaBuffer<f32>>),
}

impl PoolIndices {
    /// The indices copied to the host.
    pub fn to_vec(&self) -> Result<Vec<u32>> {
        match &self.0 {
            Indices::Host(v) => Ok(bytemuck::cast_slice::<f32, u32>(&v[..]).to_vec()),
            Indices::Cuda(s) => {
                let stream = s.stream().clone();
                Ok(stream
                    .clone_dtoh(&gpu::indices(s))
                    .map_err(simclr_kernels::cuda::GpuError::from)?)
            }
        }
    }
}

/// Max pooling of NHWC `x`; returns the output and the argmax indices for the backward pass.
pub fn max_pool(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<(Tensor, PoolIndices)> {
    x.expect_rank("max_pool", 4)?;
    let s = x.shape();
    if stride == 0 || s[1] + 2 * pad < k || s[2] + 2 * pad < k || pad * 2 > k {
        return Err(NnError::Invalid {
            op: "max_pool",
            msg: format!("input {s:?} does not fit window {k} stride {stride} pad {pad}"),
        });
    }
    if x.numel() > u32::MAX as usize {
        return Err(NnError::Invalid {
            op: "max_pool",
            msg: "input exceeds 2^32 values".into(),
        });
    }
    let g = PoolGeom {
        n: s[0],
        h: s[1],
        w: s[2],
        c: s[3],
        k,
        stride,
        pad,
    };
    if let Device::Cuda(_) = x.device() {
        let (y, arg) = gpu::max_pool(x, &g)?;
        return Ok((y, PoolIndices(Indices::Cuda(std::sync::Arc::new(arg)))));
    }
    let n_out = g.n * g.oh() * g.ow() * g.c;
    let (mut y, mut arg) = (uninit(n_out), HostBuffer::uninit(n_out));
    cpu::pool::maxpool_forward(
        x.as_slice()?,
        &g,
        &mut y,
        bytemuck::cast_slice_mut(&mut arg[..]),
    );
    Ok((
        out(&[g.n, g.oh(), g.ow(), g.c], x.device(), y)?,
        PoolIndices(Indices::Host(std::sync::Arc::new(arg))),
    ))
}

/// Max pooling backward, given the input shape and the forward's argmax indices.
pub fn max_pool_backward(
    dy: &Tensor,
    arg: &PoolIndices,
    x_shape: &[usize],
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let g = PoolGeom {
        n: x_shape[0],
        h: x_shape[1],
        w: x_shape[2],
        c: x_shape[3],
        k,
        stride,
        pad,
    };
    dy.expect_shape("max_pool_backward", &[g.n, g.oh(), g.ow(), g.c])?;
    let arg = match (&arg.0, dy.device()) {
        (Indices::Cuda(a), Device::Cuda(_)) => return gpu::max_pool_backward(dy, a, &g),
        (Indices::Host(a), Device::Cpu) => bytemuck::cast_slice::<f32, u32>(&a[..]),
        _ => {
            return Err(NnError::Device {
                op: "max_pool_backward (indices)",
                expected: dy.device().to_string(),
                got: "another device".into(),
            })
        }
    };
    let mut dx = uninit(x_shape.iter().product());
    cpu::pool::maxpool_backward(dy.as_slice()?, arg, &g, &mut dx);
    out(x_shape, dy.device(), dx)
}

/// Global average pooling: NHWC to `[n, c]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.expect_rank("global_avg_pool", 4)?;
    if let Device::Cuda(_) = x.device() {
        return gpu::global_avg_pool(x);
    }
    let s = x.shape();
    let mut y = uninit(s[0] * s[3]);
    cpu::pool::gap_forward(x.as_slice()?, s[0], s[1] * s[2], s[3], &mut y);
    out(&[s[0], s[3]], x.device(), y)
}

/// Global average pooling backward: dL/dx with element type `dtype`, the pooled input's
/// (the features `dy` are f32).
pub fn global_avg_pool_backward(dy: &Tensor, x_shape: &[usize], dtype: DType) -> Result<Tensor> {
    dy.expect_shape("global_avg_pool_backward", &[x_shape[0], x_shape[3]])?;
    if let Device::Cuda(_) = dy.device() {
        return gpu::global_avg_pool_backward(dy, x_shape, dtype);
    }
    let mut dx = uninit(x_shape.iter().product());
    cpu::pool::gap_backward(dy.as_slice()?, x_shape[1] * x_shape[2], x_shape[3], &mut dx);
    out(x_shape, dy.device(), dx)
}

/// `y = x w^T (+ b)`, `x` `[n, in]`, `w` `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    x.expect_rank("linear", 2)?;
    let (n, i, o) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    w.expect_shape("linear (weight)", &[o, i])?;
    if let Some(b) = b {
        b.expect_shape("linear (bias)", &[o])?;
    }
    if let Device::Cuda(_) = same_device("linear", x, w)? {
        return gpu::linear(x, w, b, (n, i, o));
    }
    let mut y = uninit(n * o);
    if let Some(b) = b {
        cpu::eltwise::broadcast_rows(b.as_slice()?, &mut y);
    }
    matmul(
        Mat::row_major(x.as_slice()?, n, i),
        Mat::row_major(w.as_slice()?, o, i).t(),
        &mut y,
        b.is_some(),
        Par::Pool,
    );
    out(&[n, o], x.device(), y)
}

/// Linear backward: returns (dx if asked, dw, db).
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (n, i, o) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    x.expect_rank("linear_backward", 2)?;
    w.expect_shape("linear_backward (weight)", &[o, i])?;
    dy.expect_shape("linear_backward (dy)", &[n, o])?;
    if let Device::Cuda(_) = same_device("linear_backward", x, dy)? {
        return gpu::linear_backward(x, w, dy, (n, i, o), need_dx);
    }
    let dys = dy.as_slice()?;
    let mut dw = uninit(o * i);
    matmul(
        Mat::row_major(dys, n, o).t(),
        Mat::row_major(x.as_slice()?, n, i),
        &mut dw,
        false,
        Par::Pool,
    );
    let mut db = HostBuffer::zeroed(o);
    cpu::eltwise::column_sums(dys, &mut db);
    let dx = if need_dx {
        let mut dx = uninit(n * i);
        matmul(
            Mat::row_major(dys, n, o),
            Mat::row_major(w.as_slice()?, o, i),
            &mut dx,
            false,
            Par::Pool,
        );
        Some(out(&[n, i], x.device(), dx)?)
    } else {
        None
    };
    Ok((
        dx,
        out(&[o, i], x.device(), dw)?,
        out(&[o], x.device(), db)?,
    ))
}

/// NCHW to NHWC.
pub fn nchw_to_nhwc(x: &Tensor) -> Result<Tensor> {
    x.expect_rank("nchw_to_nhwc", 4)?;
    if let Device::Cuda(_) = x.device() {
        return gpu::nchw_to_nhwc(x);
    }
    let s = x.shape();
    let mut y = uninit(x.numel());
    cpu::eltwise::nchw_to_nhwc(x.as_slice()?, s[0], s[1], s[2], s[3], &mut y);
    out(&[s[0], s[2], s[3], s[1]], x.device(), y)
}

/// NHWC to NCHW.
pub fn nhwc_to_nchw(x: &Tensor) -> Result<Tensor> {
    x.expect_rank("nhwc_to_nchw", 4)?;
    if let Device::Cuda(_) = x.device() {
        return gpu::nhwc_to_nchw(x);
    }
    let s = x.shape();
    let mut y = uninit(x.numel());
    cpu::eltwise::nhwc_to_nchw(x.as_slice()?, s[0], s[1], s[2], s[3], &mut y);
    out(&[s[0], s[3], s[1], s[2]], x.device(), y)
}

/// The rows of `x` (its first axis) in `ranges`, concatenated in that order, on `x`'s device (a
/// copy per range there: no trip through the host).
pub fn take_rows(x: &Tensor, ranges: &[std::ops::Range<usize>]) -> Result<Tensor> {
    let rows = x.shape().first().copied().unwrap_or(0);
    if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > rows) {
        return Err(NnError::Invalid {
            op: "take_rows",
            msg: format!("rows {r:?} of a tensor of {rows} rows"),
        });
    }
    let per: usize = x.shape().iter().skip(1).product();
    let mut shape = x.shape().to_vec();
    if shape.is_empty() {
        return Err(NnError::Invalid {
            op: "take_rows",
            msg: "a scalar has no rows".into(),
        });
    }
    shape[0] = ranges.iter().map(|r| r.end - r.start).sum();
    if let Device::Cuda(_) = x.device() {
        return gpu::take_rows(x, ranges, per, &shape);
    }
    let src = x.as_slice()?;
    let mut y = uninit(shape[0] * per);
    let mut at = 0;
    for r in ranges {
        let n = (r.end - r.start) * per;
        y[at..at + n].copy_from_slice(&src[r.start * per..r.end * per]);
        at += n;
    }
    Tensor::from_host(&shape, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_taken_in_range_order() {
        let x = Tensor::from_vec(&[5, 2], (0..10).map(|v| v as f32).collect()).unwrap();
        let y = take_rows(&x, &[3..5, 0..1, 2..2]).unwrap();
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(y.to_vec(), vec![6.0, 7.0, 8.0, 9.0, 0.0, 1.0]);
        assert_eq!(take_rows(&x, &[]).unwrap().shape(), &[0, 2]);
        let e = take_rows(&x, &[0..1, 4..6]).unwrap_err().to_string();
        assert!(e.contains("4..6") && e.contains("5 rows"), "{e}");
    }
}

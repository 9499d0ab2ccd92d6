//! The CUDA arms of [`crate::ops`], the batch-norm layer and the NT-Xent loss. Shapes are
//! checked by the callers; these only check that operands share a device.

use std::sync::Arc;

use half::bf16;
use simclr_kernels::cpu::pooling::PoolGeom;
use simclr_kernels::cuda::cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use simclr_kernels::cuda::train::{self as k, BatchNormGpu, BnParams, BnSaved};
use simclr_kernels::cuda::{layout, GpuError};

use super::{blas, CudaBackend, MathMode};
use crate::cpu::conv::ConvGeom;
use crate::dist::Communicator;
use crate::error::{NnError, Result};
use crate::tensor::Tensor;

/// The backend of `t` and its values.
fn dev(t: &Tensor) -> Result<(&Arc<CudaBackend>, &CudaSlice<f32>)> {
    let b = t.cuda()?;
    Ok((&b.backend, &b.data))
}

/// The values of `t`, which must be on the device of `b`.
fn on<'a>(b: &CudaBackend, t: &'a Tensor, what: &'static str) -> Result<&'a CudaSlice<f32>> {
    let (tb, data) = dev(t)?;
    if tb.ordinal() != b.ordinal() {
        return Err(NnError::Device {
            op: what,
            expected: format!("cuda:{}", b.ordinal()),
            got: t.device().to_string(),
        });
    }
    Ok(data)
}

fn new(b: &Arc<CudaBackend>, shape: &[usize]) -> Result<CudaSlice<f32>> {
    b.zeros(shape.iter().product())
}

fn wrap(b: &Arc<CudaBackend>, shape: &[usize], data: CudaSlice<f32>) -> Tensor {
    Tensor::from_cuda(shape, b.clone(), data)
}

fn upload(b: &CudaBackend, v: &[f32]) -> Result<CudaSlice<f32>> {
    Ok(b.gpu().upload(v)?)
}

/// cuDNN's 4-D descriptors hold fewer than 2^31 values per tensor.
fn fits_cudnn(g: &ConvGeom) -> Result<()> {
    let biggest = (g.n * g.h * g.w * g.cin).max(g.n * g.oh() * g.ow() * g.cout);
    if biggest > i32::MAX as usize {
        return Err(NnError::Invalid {
            op: "conv2d (cuDNN)",
            msg: format!(
                "a tensor of {biggest} values exceeds cuDNN's 2^31 limit ({g:?}); use a smaller \
                 batch or train.grad_cache_chunks"
            ),
        });
    }
    Ok(())
}

/// `x` rounded to bf16 (raw bits), for cuDNN's bf16 convolutions.
fn to_bf16(b: &CudaBackend, x: &CudaSlice<f32>) -> Result<CudaSlice<u16>> {
    let mut y = b.gpu().zeros::<u16>(x.len())?;
    k::cast_f32_to_bf16(b.gpu(), x, &mut y)?;
    Ok(y)
}

/// bf16 bits back to f32.
fn from_bf16(b: &CudaBackend, x: &CudaSlice<u16>) -> Result<CudaSlice<f32>> {
    let mut y = b.zeros(x.len())?;
    k::cast_bf16_to_f32(b.gpu(), x, &mut y)?;
    Ok(y)
}

/// The bf16 view of raw bf16 bits (cuDNN's element type).
fn bf16_view(x: &CudaSlice<u16>) -> CudaView<'_, bf16> {
    // SAFETY: u16 and bf16 have the same size and any bits are a valid bf16.
    unsafe { x.transmute::<bf16>(x.len()) }.expect("same size")
}

fn bf16_view_mut(x: &mut CudaSlice<u16>) -> CudaViewMut<'_, bf16> {
    let n = x.len();
    // SAFETY: as in `bf16_view`.
    unsafe { x.transmute_mut::<bf16>(n) }.expect("same size")
}

pub(crate) fn conv2d(x: &Tensor, w: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    fits_cudnn(g)?;
    let (b, xs) = dev(x)?;
    let ws = on(b, w, "conv2d (weight)")?;
    let shape = [g.n, g.oh(), g.ow(), g.cout];
    let mut dnn = b.dnn.lock().unwrap_or_else(|e| e.into_inner());
    if dnn.math == MathMode::Bf16 {
        let (xb, wb) = (to_bf16(b, xs)?, to_bf16(b, ws)?);
        let mut yb = b.gpu().zeros::<u16>(shape.iter().product())?;
        dnn.forward::<bf16>(
            b.gpu(),
            g,
            &bf16_view(&xb),
            &bf16_view(&wb),
            &mut bf16_view_mut(&mut yb),
        )?;
        return Ok(wrap(b, &shape, from_bf16(b, &yb)?));
    }
    let mut y = new(b, &shape)?;
    dnn.forward(b.gpu(), g, xs, ws, &mut y)?;
    Ok(wrap(b, &shape, y))
}

pub(crate) fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    g: &ConvGeom,
    need_dx: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    fits_cudnn(g)?;
    let (b, xs) = dev(x)?;
    let ws = on(b, w, "conv2d_backward (weight)")?;
    let dys = on(b, dy, "conv2d_backward (dy)")?;
    let mut dnn = b.dnn.lock().unwrap_or_else(|e| e.into_inner());
    if dnn.math == MathMode::Bf16 {
        let (xb, wb, dyb) = (to_bf16(b, xs)?, to_bf16(b, ws)?, to_bf16(b, dys)?);
        let mut dwb = b.gpu().zeros::<u16>(w.numel())?;
        dnn.backward_filter::<bf16>(
            b.gpu(),
            g,
            &bf16_view(&xb),
            &bf16_view(&dyb),
            &mut bf16_view_mut(&mut dwb),
            0.0,
        )?;
        let dx = if need_dx {
            let mut dxb = b.gpu().zeros::<u16>(x.numel())?;
            dnn.backward_data::<bf16>(
                b.gpu(),
                g,
                &bf16_view(&wb),
                &bf16_view(&dyb),
                &mut bf16_view_mut(&mut dxb),
            )?;
            Some(wrap(b, x.shape(), from_bf16(b, &dxb)?))
        } else {
            None
        };
        return Ok((wrap(b, w.shape(), from_bf16(b, &dwb)?), dx));
    }
    let mut dw = new(b, w.shape())?;
    dnn.backward_filter(b.gpu(), g, xs, dys, &mut dw, 0.0)?;
    let dx = if need_dx {
        let mut dx = new(b, x.shape())?;
        dnn.backward_data(b.gpu(), g, ws, dys, &mut dx)?;
        Some(wrap(b, x.shape(), dx))
    } else {
        None
    };
    Ok((wrap(b, w.shape(), dw), dx))
}

pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (n, i, o): (usize, usize, usize),
) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let ws = on(b, w, "linear (weight)")?;
    let mut y = new(b, &[n, o])?;
    let beta = match bias {
        Some(bt) => {
            layout::broadcast_rows(b.gpu(), on(b, bt, "linear (bias)")?, &mut y)?;
            1.0
        }
        None => 0.0,
    };
    blas::linear_forward(b, xs, ws, (n, i, o), &mut y, beta)?;
    Ok(wrap(b, &[n, o], y))
}

pub(crate) fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    (n, i, o): (usize, usize, usize),
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (b, xs) = dev(x)?;
    let ws = on(b, w, "linear_backward (weight)")?;
    let dys = on(b, dy, "linear_backward (dy)")?;
    let mut dw = new(b, &[o, i])?;
    blas::linear_dw(b, dys, xs, (n, i, o), &mut dw)?;
    let mut db = new(b, &[o])?;
    layout::column_sums(b.gpu(), dys, &mut db, false)?;
    let dx = if need_dx {
        let mut dx = new(b, &[n, i])?;
        blas::linear_dx(b, dys, ws, (n, i, o), &mut dx)?;
        Some(wrap(b, &[n, i], dx))
    } else {
        None
    };
    Ok((dx, wrap(b, &[o, i], dw), wrap(b, &[o], db)))
}

pub(crate) fn channel_affine(
    x: &Tensor,
    scale: &[f32],
    shift: &[f32],
    relu: bool,
) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let (sc, sh) = (upload(b, scale)?, upload(b, shift)?);
    let mut y = new(b, x.shape())?;
    k::affine_rows(b.gpu(), xs, &sc, &sh, relu, &mut y)?;
    Ok(wrap(b, x.shape(), y))
}

pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let mut y = new(b, x.shape())?;
    k::relu(b.gpu(), xs, &mut y)?;
    Ok(wrap(b, x.shape(), y))
}

pub(crate) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (b, dys) = dev(dy)?;
    let ys = on(b, y, "relu_backward (y)")?;
    let mut dx = new(b, dy.shape())?;
    k::relu_backward(b.gpu(), dys, ys, &mut dx)?;
    Ok(wrap(b, dy.shape(), dx))
}

pub(crate) fn add_(a: &mut Tensor, x: &Tensor) -> Result<()> {
    let b = a.cuda()?.backend.clone();
    let xs = on(&b, x, "add")?;
    k::add(b.gpu(), a.cuda_mut()?, xs, false)?;
    Ok(())
}

pub(crate) fn max_pool(x: &Tensor, g: &PoolGeom) -> Result<(Tensor, CudaSlice<u32>)> {
    let (b, xs) = dev(x)?;
    let shape = [g.n, g.oh(), g.ow(), g.c];
    let mut y = new(b, &shape)?;
    let mut arg = b.gpu().zeros::<u32>(shape.iter().product())?;
    layout::maxpool_forward(b.gpu(), xs, g, &mut y, &mut arg)?;
    Ok((wrap(b, &shape, y), arg))
}

pub(crate) fn max_pool_backward(dy: &Tensor, arg: &CudaSlice<u32>, g: &PoolGeom) -> Result<Tensor> {
    let (b, dys) = dev(dy)?;
    let shape = [g.n, g.h, g.w, g.c];
    let mut dx = new(b, &shape)?;
    layout::maxpool_backward(b.gpu(), dys, arg, g, &mut dx)?;
    Ok(wrap(b, &shape, dx))
}

pub(crate) fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let s = x.shape();
    let mut y = new(b, &[s[0], s[3]])?;
    k::gap_forward(b.gpu(), xs, s[0], s[1] * s[2], s[3], &mut y)?;
    Ok(wrap(b, &[s[0], s[3]], y))
}

pub(crate) fn global_avg_pool_backward(dy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let (b, dys) = dev(dy)?;
    let mut dx = new(b, x_shape)?;
    let s = x_shape;
    k::gap_backward(b.gpu(), dys, s[0], s[1] * s[2], s[3], &mut dx)?;
    Ok(wrap(b, x_shape, dx))
}

pub(crate) fn nchw_to_nhwc(x: &Tensor) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let s = x.shape();
    let shape = [s[0], s[2], s[3], s[1]];
    let mut y = new(b, &shape)?;
    layout::nchw_to_nhwc(b.gpu(), xs, s[0], s[1], s[2] * s[3], &mut y)?;
    Ok(wrap(b, &shape, y))
}

pub(crate) fn nhwc_to_nchw(x: &Tensor) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let s = x.shape();
    let shape = [s[0], s[3], s[1], s[2]];
    let mut y = new(b, &shape)?;
    layout::nhwc_to_nchw(b.gpu(), xs, s[0], s[1] * s[2], s[3], &mut y)?;
    Ok(wrap(b, &shape, y))
}

/// Row ranges of `x` (`per` values a row) concatenated into a new `shape` tensor.
pub(crate) fn take_rows(
    x: &Tensor,
    ranges: &[std::ops::Range<usize>],
    per: usize,
    shape: &[usize],
) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let mut y = new(b, shape)?;
    let mut at = 0;
    for r in ranges.iter().filter(|r| r.end > r.start) {
        let n = (r.end - r.start) * per;
        let src = xs.slice(r.start * per..r.end * per);
        let mut dst = y.slice_mut(at..at + n);
        b.gpu()
            .stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(GpuError::from)?;
        at += n;
    }
    Ok(wrap(b, shape, y))
}

/// NT-Xent on the device: the mean loss and dL/dz.
pub(crate) fn nt_xent(z: &Tensor, temperature: f32) -> Result<(f32, Tensor)> {
    let (b, zs) = dev(z)?;
    let (rows, dim) = (z.shape()[0], z.shape()[1]);
    let mut grad = new(b, z.shape())?;
    let loss = b.with_loss(rows, dim, |ws| {
        ws.forward_backward(b.gpu(), zs, temperature, &mut grad)
            .map_err(|e| NnError::NtXent(e.to_string()))
    })?;
    Ok((loss, wrap(b, z.shape(), grad)))
}

/// What a training-mode batch norm on the device keeps for its backward pass.
pub(crate) type BnStats = Arc<BnSaved>;

/// The parameters and buffers of a batch-norm layer, as tensors on one device.
pub(crate) struct BnTensors<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub running_mean: &'a mut Tensor,
    pub running_var: &'a mut Tensor,
    pub momentum: f32,
    pub eps: f32,
    pub workspace: &'a mut BnWorkspace,
}

/// A batch-norm layer's own device workspace (never shared, so replicas on one GPU in threads
/// do not race; a clone starts empty).
#[derive(Default)]
pub(crate) struct BnWorkspace(Option<(usize, BatchNormGpu)>);

impl Clone for BnWorkspace {
    fn clone(&self) -> Self {
        BnWorkspace(None)
    }
}

impl std::fmt::Debug for BnWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BnWorkspace(allocated)"
        } else {
            "BnWorkspace(empty)"
        })
    }
}

fn with_bn<T>(
    b: &CudaBackend,
    ws: &mut BnWorkspace,
    c: usize,
    f: impl FnOnce(&mut BatchNormGpu) -> Result<T, GpuError>,
) -> Result<T> {
    // Made on the device of its first use; a model moved to another GPU gets a new one.
    if !matches!(&ws.0, Some((o, _)) if *o == b.ordinal()) {
        ws.0 = Some((b.ordinal(), BatchNormGpu::new(b.gpu(), c)?));
    }
    Ok(f(&mut ws.0.as_mut().expect("allocated above").1)?)
}

/// The NCCL communicator of `sync` when it runs on this GPU's compute stream: its reductions
/// can then be queued in line with the kernels, without a wait.
fn nccl_in_line<'a>(
    b: &CudaBackend,
    sync: Option<&'a dyn Communicator>,
) -> Option<&'a crate::dist::NcclComm> {
    sync?
        .nccl()
        .filter(|n| n.stream().cu_stream() == b.gpu().stream().cu_stream())
}

fn bn_comm_err(e: crate::dist::CommError) -> GpuError {
    GpuError::Invalid(format!("global batch norm: {e}"))
}

/// Hands each per-channel sum to the communicator for global batch norm: queued on the device
/// with NCCL, through the host with the CPU communicators.
fn reducer<'a>(
    b: &'a CudaBackend,
    sync: Option<&'a dyn Communicator>,
) -> impl FnMut(&mut CudaSlice<f64>) -> Result<(), GpuError> + 'a {
    move |sums: &mut CudaSlice<f64>| {
        let Some(comm) = sync else { return Ok(()) };
        if let Some(nccl) = nccl_in_line(b, sync) {
            return nccl.queue_all_reduce_device_f64(sums).map_err(bn_comm_err);
        }
        let mut host = b.gpu().download(sums)?;
        comm.all_reduce_f64(&mut host)
            .map_err(|e| GpuError::Invalid(format!("global batch norm: {e}")))?;
        b.gpu().stream().memcpy_htod(&host, sums)?;
        Ok(())
    }
}

/// Batch norm of `x` (`[rows, c]` in effect): with the batch statistics over `count` rows in
/// all, updating the running ones, when `train` is `Some((count, sync))`; with the running
/// statistics otherwise. Returns what the backward pass needs in training mode.
pub(crate) fn batch_norm_forward(
    x: &Tensor,
    p: BnTensors<'_>,
    relu: bool,
    train: Option<(usize, Option<&dyn Communicator>)>,
) -> Result<(Tensor, Option<BnStats>)> {
    let BnTensors {
        gamma,
        beta,
        running_mean,
        running_var,
        momentum,
        eps,
        workspace,
    } = p;
    let (b, xs) = dev(x)?;
    let c = gamma.numel();
    let rows = x.numel() / c;
    let params = BnParams {
        gamma: on(b, gamma, "BatchNorm (weight)")?,
        beta: on(b, beta, "BatchNorm (bias)")?,
        running_mean: running_mean.cuda_mut()?,
        running_var: running_var.cuda_mut()?,
        momentum,
        eps,
    };
    let mut y = new(b, x.shape())?;
    let saved = match train {
        Some((count, sync)) => {
            let mut reduce = reducer(b, sync);
            let s = with_bn(b, workspace, c, |bn| {
                bn.forward_train(b.gpu(), xs, rows, count, params, relu, &mut y, &mut reduce)
            })?;
            Some(Arc::new(s))
        }
        None => {
            with_bn(b, workspace, c, |bn| {
                bn.forward_eval(b.gpu(), xs, rows, params, relu, &mut y)
            })?;
            None
        }
    };
    Ok((wrap(b, x.shape(), y), saved))
}

/// Batch-norm backward: dL/dx, and dL/dgamma, dL/dbeta added to the gradients.
pub(crate) fn batch_norm_backward(
    x: &Tensor,
    dy: &Tensor,
    relu_out: Option<&Tensor>,
    stats: &BnSaved,
    count: usize,
    gamma: &Tensor,
    grads: (&mut Tensor, &mut Tensor),
    workspace: &mut BnWorkspace,
    sync: Option<&dyn Communicator>,
) -> Result<Tensor> {
    let (b, xs) = dev(x)?;
    let c = gamma.numel();
    let rows = x.numel() / c;
    let dys = on(b, dy, "BatchNorm backward (dy)")?;
    let relu_out = match relu_out {
        Some(r) => Some(on(b, r, "BatchNorm backward (output)")?),
        None => None,
    };
    let gs = on(b, gamma, "BatchNorm backward (weight)")?;
    let mut dx = new(b, x.shape())?;
    let (mut dg, mut db) = (b.zeros(c)?, b.zeros(c)?);
    // For global batch norm the sums are all-reduced for dx, but the parameter gradients take
    // this replica's own sums (the gradient all-reduce adds the others'), as on the CPU.
    let mut local: Option<Vec<f64>> = None;
    let mut local_dev: Option<CudaSlice<f64>> = None;
    let in_line = nccl_in_line(b, sync);
    let mut reduce = |sums: &mut CudaSlice<f64>| -> Result<(), GpuError> {
        let Some(comm) = sync else { return Ok(()) };
        if let Some(nccl) = in_line {
            local_dev = Some(sums.try_clone()?);
            return nccl.queue_all_reduce_device_f64(sums).map_err(bn_comm_err);
        }
        let mut host = b.gpu().download(sums)?;
        local = Some(host.clone());
        comm.all_reduce_f64(&mut host)
            .map_err(|e| GpuError::Invalid(format!("global batch norm: {e}")))?;
        b.gpu().stream().memcpy_htod(&host, sums)?;
        Ok(())
    };
    with_bn(b, workspace, c, |bn| {
        bn.backward(
            b.gpu(),
            xs,
            dys,
            relu_out,
            rows,
            count,
            gs,
            stats,
            &mut dx,
            &mut dg,
            &mut db,
            &mut reduce,
        )
    })?;
    if let Some(local) = local {
        let (sum_g, sum_gx) = local.split_at(c);
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        db = upload(b, &f32s(sum_g))?;
        dg = upload(b, &f32s(sum_gx))?;
    }
    if let Some(local) = local_dev {
        k::cast_f64_to_f32(b.gpu(), &local.slice(0..c), &mut db)?;
        k::cast_f64_to_f32(b.gpu(), &local.slice(c..2 * c), &mut dg)?;
    }
    k::add(b.gpu(), grads.0.cuda_mut()?, &dg, false)?;
    k::add(b.gpu(), grads.1.cuda_mut()?, &db, false)?;
    Ok(wrap(b, x.shape(), dx))
}

//! The CUDA arms of [`crate::ops`], the batch-norm layer and the NT-Xent loss. Shapes are
//! checked by the callers; these only check that operands share a device.

use std::borrow::Cow;
use std::sync::Arc;

use half::bf16;
use simclr_kernels::cpu::pooling::PoolGeom;
use simclr_kernels::cuda::cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use simclr_kernels::cuda::train::{self as k, BatchNormGpu, BnParams, BnSaved};
use simclr_kernels::cuda::{layout, GpuError};

use super::{blas, CudaBackend, CudaBuffer, MathMode};
use crate::cpu::conv::ConvGeom;
use crate::dist::Communicator;
use crate::error::{NnError, Result};
use crate::tensor::{DType, DeviceElem, Tensor};

/// Calls `f::<T>(args)` with `T` the element type of `dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::Bf16 => $f::<bf16>($($arg),*),
        }
    };
}

/// The backend of `t` and its f32 values.
fn dev(t: &Tensor) -> Result<(&Arc<CudaBackend>, &CudaSlice<f32>)> {
    dev_of::<f32>(t)
}

/// The backend of `t` and its values, which must be `T`s.
fn dev_of<T: DeviceElem>(t: &Tensor) -> Result<(&Arc<CudaBackend>, &CudaSlice<T>)> {
    let b = t.cuda_of::<T>("CUDA operation")?;
    Ok((&b.backend, &b.data))
}

/// The f32 values of `t`, which must be on the device of `b`.
fn on<'a>(b: &CudaBackend, t: &'a Tensor, what: &'static str) -> Result<&'a CudaSlice<f32>> {
    on_of::<f32>(b, t, what)
}

/// The `T` values of `t`, which must be on the device of `b`.
fn on_of<'a, T: DeviceElem>(
    b: &CudaBackend,
    t: &'a Tensor,
    what: &'static str,
) -> Result<&'a CudaSlice<T>> {
    let buf = t.cuda_of::<T>(what)?;
    if buf.backend.ordinal() != b.ordinal() {
        return Err(NnError::Device {
            op: what,
            expected: format!("cuda:{}", b.ordinal()),
            got: t.device().to_string(),
        });
    }
    Ok(&buf.data)
}

/// `t` with `dtype` values: itself when it has them, else a converted copy. The operands of an
/// operation take the element type of the activation it works on (a gradient may arrive in
/// another type, e.g. from a layer that computes in f32).
fn as_dtype(t: &Tensor, dtype: DType) -> Result<Cow<'_, Tensor>> {
    if t.dtype() == dtype {
        Ok(Cow::Borrowed(t))
    } else {
        Ok(Cow::Owned(t.to_dtype(dtype)?))
    }
}

/// The output buffer of an operation, not zeroed: every operation here writes all of its
/// output (kernels over every element, cuDNN and cuBLAS with beta 0, or a bias broadcast before
/// beta 1), so a memset would only add a write pass over each activation.
fn new(b: &Arc<CudaBackend>, shape: &[usize]) -> Result<CudaSlice<f32>> {
    new_of::<f32>(b, shape)
}

fn new_of<T: DeviceElem>(b: &Arc<CudaBackend>, shape: &[usize]) -> Result<CudaSlice<T>> {
    b.uninit::<T>(shape.iter().product())
}

fn wrap(b: &Arc<CudaBackend>, shape: &[usize], data: CudaSlice<f32>) -> Tensor {
    Tensor::from_cuda(shape, b.clone(), data)
}

fn wrap_of<T: DeviceElem>(b: &Arc<CudaBackend>, shape: &[usize], data: CudaSlice<T>) -> Tensor {
    Tensor::from_cuda_of(shape, b.clone(), data)
}

fn upload(b: &Arc<CudaBackend>, v: &[f32]) -> Result<CudaBuffer<f32>> {
    b.upload_scratch(v)
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

/// f32 weights rounded to bf16 for a bf16 convolution (as autocast does, per call).
fn to_bf16(b: &Arc<CudaBackend>, x: &CudaSlice<f32>) -> Result<CudaBuffer<bf16>> {
    let mut y = b.scratch::<bf16>(x.len())?;
    k::cast_f32_to_bf16(b.gpu(), x, &mut y)?;
    Ok(y)
}

/// bf16 values widened to f32.
fn from_bf16(b: &CudaBackend, x: &CudaSlice<bf16>) -> Result<CudaSlice<f32>> {
    let mut y = b.uninit::<f32>(x.len())?;
    k::cast_bf16_to_f32(b.gpu(), x, &mut y)?;
    Ok(y)
}

/// In [`MathMode::Bf16`] the convolution reads and writes bf16 activations (an f32 input, the
/// images, is rounded first) and its output stays bf16 for the layers after it: activations
/// then take half the memory and bandwidth. In the other modes everything is f32.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    fits_cudnn(g)?;
    let b = x.cuda_backend()?;
    let ws = on(b, w, "conv2d (weight)")?;
    let shape = [g.n, g.oh(), g.ow(), g.cout];
    let mut dnn = b.dnn.lock().unwrap_or_else(|e| e.into_inner());
    if dnn.math == MathMode::Bf16 {
        let x = as_dtype(x, DType::Bf16)?;
        let xs = on_of::<bf16>(b, &x, "conv2d")?;
        let wb = to_bf16(b, ws)?;
        let mut y = new_of::<bf16>(b, &shape)?;
        dnn.forward::<bf16>(b.gpu(), g, xs, &*wb, &mut y)?;
        return Ok(wrap_of(b, &shape, y));
    }
    let x = as_dtype(x, DType::F32)?;
    let xs = on(b, &x, "conv2d")?;
    let mut y = new(b, &shape)?;
    dnn.forward(b.gpu(), g, xs, ws, &mut y)?;
    Ok(wrap(b, &shape, y))
}

/// dL/dw (f32, as the master weights) and dL/dx (in the element type of `x`).
pub(crate) fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    g: &ConvGeom,
    need_dx: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    fits_cudnn(g)?;
    let b = x.cuda_backend()?;
    let ws = on(b, w, "conv2d_backward (weight)")?;
    let mut dnn = b.dnn.lock().unwrap_or_else(|e| e.into_inner());
    if dnn.math == MathMode::Bf16 {
        let (xb, dyb) = (as_dtype(x, DType::Bf16)?, as_dtype(dy, DType::Bf16)?);
        let xs = on_of::<bf16>(b, &xb, "conv2d_backward (x)")?;
        let dys = on_of::<bf16>(b, &dyb, "conv2d_backward (dy)")?;
        let mut dwb = b.scratch::<bf16>(w.numel())?;
        dnn.backward_filter::<bf16>(b.gpu(), g, xs, dys, &mut *dwb, 0.0)?;
        let dx = if need_dx {
            let wb = to_bf16(b, ws)?;
            let mut dxb = new_of::<bf16>(b, x.shape())?;
            dnn.backward_data::<bf16>(b.gpu(), g, &*wb, dys, &mut dxb)?;
            Some(wrap_of(b, x.shape(), dxb).to_dtype(x.dtype())?)
        } else {
            None
        };
        return Ok((wrap(b, w.shape(), from_bf16(b, &dwb)?), dx));
    }
    let (xf, dyf) = (as_dtype(x, DType::F32)?, as_dtype(dy, DType::F32)?);
    let xs = on(b, &xf, "conv2d_backward (x)")?;
    let dys = on(b, &dyf, "conv2d_backward (dy)")?;
    let mut dw = new(b, w.shape())?;
    dnn.backward_filter(b.gpu(), g, xs, dys, &mut dw, 0.0)?;
    let dx = if need_dx {
        let mut dx = new(b, x.shape())?;
        dnn.backward_data(b.gpu(), g, ws, dys, &mut dx)?;
        Some(wrap(b, x.shape(), dx).to_dtype(x.dtype())?)
    } else {
        None
    };
    Ok((wrap(b, w.shape(), dw), dx))
}

/// The linear layers (the projection head) compute in f32: their input, the pooled features, is
/// f32 in every mode.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (n, i, o): (usize, usize, usize),
) -> Result<Tensor> {
    let x = as_dtype(x, DType::F32)?;
    let (b, xs) = dev(&x)?;
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
    let (x, dy) = (as_dtype(x, DType::F32)?, as_dtype(dy, DType::F32)?);
    let (b, xs) = dev(&x)?;
    let ws = on(b, w, "linear_backward (weight)")?;
    let dys = on(b, &dy, "linear_backward (dy)")?;
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
    fn go<T: DeviceElem>(x: &Tensor, scale: &[f32], shift: &[f32], relu: bool) -> Result<Tensor> {
        let (b, xs) = dev_of::<T>(x)?;
        let (sc, sh) = (upload(b, scale)?, upload(b, shift)?);
        let mut y = new_of::<T>(b, x.shape())?;
        k::affine_rows(b.gpu(), xs, &sc, &sh, relu, &mut y)?;
        Ok(wrap_of(b, x.shape(), y))
    }
    by_dtype!(x.dtype(), go(x, scale, shift, relu))
}

pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    fn go<T: DeviceElem>(x: &Tensor) -> Result<Tensor> {
        let (b, xs) = dev_of::<T>(x)?;
        let mut y = new_of::<T>(b, x.shape())?;
        k::relu(b.gpu(), xs, &mut y)?;
        Ok(wrap_of(b, x.shape(), y))
    }
    by_dtype!(x.dtype(), go(x))
}

/// dL/dx of a ReLU, in the element type of its output `y`.
pub(crate) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    fn go<T: DeviceElem>(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
        let dy = as_dtype(dy, T::DTYPE)?;
        let (b, dys) = dev_of::<T>(&dy)?;
        let ys = on_of::<T>(b, y, "relu_backward (y)")?;
        let mut dx = new_of::<T>(b, dy.shape())?;
        k::relu_backward(b.gpu(), dys, ys, &mut dx)?;
        Ok(wrap_of(b, dy.shape(), dx))
    }
    by_dtype!(y.dtype(), go(dy, y))
}

/// `a += x`, in the element type of `a`.
pub(crate) fn add_(a: &mut Tensor, x: &Tensor) -> Result<()> {
    by_dtype!(a.dtype(), add_of(a, x, false))
}

/// `a = max(a + x, 0)`, in the element type of `a`.
pub(crate) fn add_relu_(a: &mut Tensor, x: &Tensor) -> Result<()> {
    by_dtype!(a.dtype(), add_of(a, x, true))
}

fn add_of<T: DeviceElem>(a: &mut Tensor, x: &Tensor, relu: bool) -> Result<()> {
    let x = as_dtype(x, T::DTYPE)?;
    let b = a.cuda_backend()?.clone();
    let xs = on_of::<T>(&b, &x, "add")?;
    k::add(b.gpu(), a.cuda_mut_of::<T>()?, xs, relu)?;
    Ok(())
}

/// Max pooling; the indices are u32 kept in the bits of an f32 buffer, so that they come from
/// the device's cache like every other buffer of a step.
pub(crate) fn max_pool(x: &Tensor, g: &PoolGeom) -> Result<(Tensor, CudaBuffer<f32>)> {
    fn go<T: DeviceElem>(x: &Tensor, g: &PoolGeom) -> Result<(Tensor, CudaBuffer<f32>)> {
        let (b, xs) = dev_of::<T>(x)?;
        let shape = [g.n, g.oh(), g.ow(), g.c];
        let n_out = shape.iter().product();
        let mut y = new_of::<T>(b, &shape)?;
        let mut arg = b.scratch::<f32>(n_out)?;
        layout::maxpool_forward(b.gpu(), xs, g, &mut y, &mut indices_mut(&mut arg))?;
        Ok((wrap_of(b, &shape, y), arg))
    }
    by_dtype!(x.dtype(), go(x, g))
}

/// Max pooling backward, from the indices [`max_pool`] returned.
pub(crate) fn max_pool_backward(
    dy: &Tensor,
    arg: &CudaBuffer<f32>,
    g: &PoolGeom,
) -> Result<Tensor> {
    fn go<T: DeviceElem>(dy: &Tensor, arg: &CudaBuffer<f32>, g: &PoolGeom) -> Result<Tensor> {
        let (b, dys) = dev_of::<T>(dy)?;
        let shape = [g.n, g.h, g.w, g.c];
        let mut dx = new_of::<T>(b, &shape)?;
        layout::maxpool_backward(b.gpu(), dys, &indices(arg), g, &mut dx)?;
        Ok(wrap_of(b, &shape, dx))
    }
    by_dtype!(dy.dtype(), go(dy, arg, g))
}

/// The u32 indices held in `arg`'s bits.
pub(crate) fn indices(arg: &CudaBuffer<f32>) -> CudaView<'_, u32> {
    // SAFETY: u32 and f32 have the same size, and every bit pattern is a valid u32.
    unsafe { arg.transmute::<u32>(arg.len()) }.expect("u32 is as large as f32")
}

/// `len` f64s in the bits of `room`, an f32 buffer at least twice as long.
fn f64_view(room: &CudaBuffer<f32>, len: usize) -> Result<CudaView<'_, f64>, GpuError> {
    // SAFETY: the buffer starts on a 256-byte boundary, two f32s make one f64 in size, and any
    // bits are a valid f64.
    unsafe { room.transmute::<f64>(len) }
        .ok_or_else(|| GpuError::Invalid(format!("no room for {len} f64 values")))
}

/// [`f64_view`], to write.
pub(crate) fn f64_view_mut(
    room: &mut CudaBuffer<f32>,
    len: usize,
) -> Result<CudaViewMut<'_, f64>, GpuError> {
    // SAFETY: as in `f64_view`.
    unsafe { room.transmute_mut::<f64>(len) }
        .ok_or_else(|| GpuError::Invalid(format!("no room for {len} f64 values")))
}

fn indices_mut(arg: &mut CudaBuffer<f32>) -> CudaViewMut<'_, u32> {
    let len = arg.len();
    // SAFETY: as in `indices`.
    unsafe { arg.transmute_mut::<u32>(len) }.expect("u32 is as large as f32")
}

/// The pooled features are f32 whatever the activations' type.
pub(crate) fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    fn go<T: DeviceElem>(x: &Tensor) -> Result<Tensor> {
        let (b, xs) = dev_of::<T>(x)?;
        let s = x.shape();
        let mut y = new(b, &[s[0], s[3]])?;
        k::gap_forward(b.gpu(), xs, s[0], s[1] * s[2], s[3], &mut y)?;
        Ok(wrap(b, &[s[0], s[3]], y))
    }
    by_dtype!(x.dtype(), go(x))
}

/// dL/dx in `dtype`, the element type of the pooled activations.
pub(crate) fn global_avg_pool_backward(
    dy: &Tensor,
    x_shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    fn go<T: DeviceElem>(dy: &Tensor, s: &[usize]) -> Result<Tensor> {
        let dy = as_dtype(dy, DType::F32)?;
        let (b, dys) = dev(&dy)?;
        let mut dx = new_of::<T>(b, s)?;
        k::gap_backward(b.gpu(), dys, s[0], s[1] * s[2], s[3], &mut dx)?;
        Ok(wrap_of(b, s, dx))
    }
    by_dtype!(dtype, go(dy, x_shape))
}

pub(crate) fn nchw_to_nhwc(x: &Tensor) -> Result<Tensor> {
    let x = as_dtype(x, DType::F32)?;
    let (b, xs) = dev(&x)?;
    let s = x.shape();
    let shape = [s[0], s[2], s[3], s[1]];
    let mut y = new(b, &shape)?;
    layout::nchw_to_nhwc(b.gpu(), xs, s[0], s[1], s[2] * s[3], &mut y)?;
    Ok(wrap(b, &shape, y))
}

pub(crate) fn nhwc_to_nchw(x: &Tensor) -> Result<Tensor> {
    let x = as_dtype(x, DType::F32)?;
    let (b, xs) = dev(&x)?;
    let s = x.shape();
    let shape = [s[0], s[3], s[1], s[2]];
    let mut y = new(b, &shape)?;
    layout::nhwc_to_nchw(b.gpu(), xs, s[0], s[1] * s[2], s[3], &mut y)?;
    Ok(wrap(b, &shape, y))
}

/// Row ranges of `x` (`per` values a row) concatenated into a new `shape` tensor of the same
/// element type.
pub(crate) fn take_rows(
    x: &Tensor,
    ranges: &[std::ops::Range<usize>],
    per: usize,
    shape: &[usize],
) -> Result<Tensor> {
    fn go<T: DeviceElem>(
        x: &Tensor,
        ranges: &[std::ops::Range<usize>],
        per: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let (b, xs) = dev_of::<T>(x)?;
        let mut y = new_of::<T>(b, shape)?;
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
        Ok(wrap_of(b, shape, y))
    }
    by_dtype!(x.dtype(), go(x, ranges, per, shape))
}

/// NT-Xent on the device: the mean loss and dL/dz (f32, as the loss in mixed precision).
pub(crate) fn nt_xent(z: &Tensor, temperature: f32) -> Result<(f32, Tensor)> {
    let z = as_dtype(z, DType::F32)?;
    let (b, zs) = dev(&z)?;
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

impl BnWorkspace {
    /// Keeps `stats` for the layer's next training forward pass when nothing else holds them.
    pub(crate) fn recycle(&mut self, stats: BnStats) {
        if let (Ok(saved), Some((_, bn))) = (Arc::try_unwrap(stats), self.0.as_mut()) {
            bn.recycle(saved);
        }
    }
}

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
/// statistics otherwise. The output has the element type of `x`; the statistics are f32 (sums
/// in f64) in every mode. Returns what the backward pass needs in training mode.
pub(crate) fn batch_norm_forward(
    x: &Tensor,
    p: BnTensors<'_>,
    relu: bool,
    train: Option<(usize, Option<&dyn Communicator>)>,
) -> Result<(Tensor, Option<BnStats>)> {
    by_dtype!(x.dtype(), batch_norm_forward_of(x, p, relu, train))
}

fn batch_norm_forward_of<T: DeviceElem>(
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
    let (b, xs) = dev_of::<T>(x)?;
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
    let mut y = new_of::<T>(b, x.shape())?;
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
    Ok((wrap_of(b, x.shape(), y), saved))
}

/// Batch-norm backward: dL/dx (in the element type of `x`), and dL/dgamma, dL/dbeta (f32)
/// added to the gradients.
pub(crate) fn batch_norm_backward(
    x: &Tensor,
    dy: &Tensor,
    relu_out: Option<&Tensor>,
    stats: BnStats,
    count: usize,
    gamma: &Tensor,
    grads: (&mut Tensor, &mut Tensor),
    workspace: &mut BnWorkspace,
    sync: Option<&dyn Communicator>,
) -> Result<Tensor> {
    let dx = by_dtype!(
        x.dtype(),
        batch_norm_backward_of(x, dy, relu_out, &stats, count, gamma, grads, workspace, sync)
    )?;
    // Done with: the layer's next forward pass writes its statistics there.
    workspace.recycle(stats);
    Ok(dx)
}

fn batch_norm_backward_of<T: DeviceElem>(
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
    let (b, xs) = dev_of::<T>(x)?;
    let c = gamma.numel();
    let rows = x.numel() / c;
    let dy = as_dtype(dy, T::DTYPE)?;
    let dys = on_of::<T>(b, &dy, "BatchNorm backward (dy)")?;
    let relu_out = match relu_out {
        Some(r) => Some(as_dtype(r, T::DTYPE)?),
        None => None,
    };
    let relu_out = match &relu_out {
        Some(r) => Some(on_of::<T>(b, r, "BatchNorm backward (output)")?),
        None => None,
    };
    let gs = on(b, gamma, "BatchNorm backward (weight)")?;
    let mut dx = new_of::<T>(b, x.shape())?;
    let (mut dg, mut db) = (b.scratch_zeroed::<f32>(c)?, b.scratch_zeroed::<f32>(c)?);
    // For global batch norm the sums are all-reduced for dx, but the parameter gradients take
    // this replica's own sums (the gradient all-reduce adds the others'), as on the CPU.
    let mut local: Option<Vec<f64>> = None;
    // This replica's sums on the device, as f64 in the bits of a cached f32 buffer.
    let mut local_dev: Option<CudaBuffer<f32>> = None;
    let in_line = nccl_in_line(b, sync);
    let mut reduce = |sums: &mut CudaSlice<f64>| -> Result<(), GpuError> {
        let Some(comm) = sync else { return Ok(()) };
        if let Some(nccl) = in_line {
            let mut room = b
                .scratch::<f32>(2 * sums.len())
                .map_err(|e| GpuError::Invalid(format!("global batch norm: {e}")))?;
            b.gpu()
                .stream()
                .memcpy_dtod(&*sums, &mut f64_view_mut(&mut room, sums.len())?)?;
            local_dev = Some(room);
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
    if let Some(room) = local_dev {
        let local = f64_view(&room, 2 * c)?;
        k::cast_f64_to_f32(b.gpu(), &local.slice(0..c), &mut db)?;
        k::cast_f64_to_f32(b.gpu(), &local.slice(c..2 * c), &mut dg)?;
    }
    k::add(b.gpu(), grads.0.cuda_mut()?, &dg, false)?;
    k::add(b.gpu(), grads.1.cuda_mut()?, &db, false)?;
    Ok(wrap_of(b, x.shape(), dx))
}

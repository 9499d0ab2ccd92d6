//! The training-step kernels beyond cuDNN and cuBLAS (`kernels/train.cu`): the twins of
//! [`crate::cpu::eltwise`], [`crate::cpu::norm`], [`crate::cpu::pooling`] and
//! [`crate::cpu::optim`]. Activations are NHWC, seen as `[rows, channels]`.
//!
//! Batch norm takes a `reduce` hook between its reductions and their use: the identity on one
//! GPU, an all-reduce over the replicas for SimCLR's global batch norm.

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg,
};
use half::bf16;

use super::{ensure, int, Gpu, GpuError, Module};
use crate::Elem;

const THREADS: u32 = 256;

pub(crate) fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn same_len(a: usize, b: usize, what: &str) -> Result<(), GpuError> {
    ensure(a == b, || format!("{what}: lengths differ ({a} and {b})"))
}

/// The train module's entry point `{stem}_{suffix}` for element type `T`.
pub(crate) fn elem_kernel<T: Elem>(gpu: &Gpu, stem: &str) -> Result<CudaFunction, GpuError> {
    gpu.function(Module::Train, &format!("{stem}_{}", T::SUFFIX))
}

/// `y = max(x, 0)` (in f32, rounded to `T` on store).
pub fn relu<T: Elem>(gpu: &Gpu, x: &CudaSlice<T>, y: &mut CudaSlice<T>) -> Result<(), GpuError> {
    same_len(x.len(), y.len(), "relu")?;
    let n = x.len() as u64;
    let f = elem_kernel::<T>(gpu, "relu")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&n);
    // SAFETY: relu_{f32,bf16}(const T*, T*, u64); both hold n values of T.
    unsafe { b.launch(grid_for(x.len())) }?;
    Ok(())
}

/// `dx = dy * (y > 0)` where `y` is the ReLU's output.
pub fn relu_backward<T: Elem>(
    gpu: &Gpu,
    dy: &CudaSlice<T>,
    y: &CudaSlice<T>,
    dx: &mut CudaSlice<T>,
) -> Result<(), GpuError> {
    same_len(dy.len(), y.len(), "relu_backward")?;
    same_len(dy.len(), dx.len(), "relu_backward")?;
    let n = dy.len() as u64;
    let f = elem_kernel::<T>(gpu, "relu_backward")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dy).arg(y).arg(dx).arg(&n);
    // SAFETY: relu_backward_{f32,bf16}(const T*, const T*, T*, u64); all hold n values.
    unsafe { b.launch(grid_for(dy.len())) }?;
    Ok(())
}

/// `a += b` (the residual add), then a ReLU when `relu`; in f32, rounded to `T` once.
pub fn add<T: Elem>(
    gpu: &Gpu,
    a: &mut CudaSlice<T>,
    b_in: &CudaSlice<T>,
    relu: bool,
) -> Result<(), GpuError> {
    same_len(a.len(), b_in.len(), "add")?;
    let n = a.len() as u64;
    let r = i32::from(relu);
    let f = elem_kernel::<T>(gpu, "add")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut *a).arg(b_in).arg(&n).arg(&r);
    // SAFETY: add_{f32,bf16}(T*, const T*, u64, int); both hold n values.
    unsafe { b.launch(grid_for(n as usize)) }?;
    Ok(())
}

/// f32 to bf16 (round to nearest even, NaN kept).
pub fn cast_f32_to_bf16(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    same_len(x.len(), y.len(), "cast")?;
    let n = x.len() as u64;
    let f = gpu.function(Module::Train, "cast_f32_bf16")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&n);
    // SAFETY: cast_f32_bf16(const float*, bf16*, u64); both hold n values.
    unsafe { b.launch(grid_for(n as usize)) }?;
    Ok(())
}

/// bf16 to f32 (exact).
pub fn cast_bf16_to_f32(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    same_len(x.len(), y.len(), "cast")?;
    let n = x.len() as u64;
    let f = gpu.function(Module::Train, "cast_bf16_f32")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&n);
    // SAFETY: cast_bf16_f32(const bf16*, float*, u64); both hold n values.
    unsafe { b.launch(grid_for(n as usize)) }?;
    Ok(())
}

/// The sum of `x`, in f64, in a fixed order (reproducible run to run).
pub fn sum(gpu: &Gpu, x: &CudaSlice<f32>) -> Result<f64, GpuError> {
    let mut out = gpu.zeros::<f64>(1)?;
    sum_into(gpu, &x.as_view(), &mut out.slice_mut(0..1))?;
    Ok(gpu.download(&out)?[0])
}

/// Most blocks of [`sum_into`]'s first pass (and so its partial sums).
const SUM_BLOCKS: usize = 1024;

/// [`sum`] written to `out[0]` on the device, without a wait: many sums, one download. The
/// partial sums go to a buffer the `Gpu` keeps, so a call allocates nothing.
pub fn sum_into(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<(), GpuError> {
    ensure(!out.is_empty(), || "sum_into: no room for the sum".into())?;
    let blocks = x.len().div_ceil(THREADS as usize * 8).clamp(1, SUM_BLOCKS);
    // Held for both launches: calls from other threads queue their passes after ours on the
    // same stream, so one buffer serves them all.
    let mut held = gpu.sum_partials.lock().unwrap_or_else(|e| e.into_inner());
    if held.is_none() {
        *held = Some(gpu.zeros::<f64>(SUM_BLOCKS)?);
    }
    let partials = held.as_mut().expect("allocated above");
    let n = x.len() as u64;
    let f = gpu.function(Module::Train, "sum_partials_f32")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&n).arg(&mut *partials);
    // SAFETY: sum_partials_f32(const float*, u64, double*); partials holds one per block.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    let nb = blocks as i32;
    let scale = 1.0f64;
    let f = gpu.function(Module::Train, "sum_finish")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&*partials).arg(&nb).arg(&scale).arg(out);
    // SAFETY: sum_finish(const double*, int, double, double*), one block; out holds >= 1.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    Ok(())
}

/// Global average pooling: `[n, hw, c]` to `[n, c]`. The features are f32 for any `T`.
pub fn gap_forward<T: Elem>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    n: usize,
    hw: usize,
    c: usize,
    y: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    same_len(x.len(), n * hw * c, "gap_forward input")?;
    same_len(y.len(), n * c, "gap_forward output")?;
    let (ni, hwi, ci) = (int(n, "n")?, int(hw, "hw")?, int(c, "c")?);
    int(n * c, "n * c")?;
    let f = elem_kernel::<T>(gpu, "gap_forward")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&ni).arg(&hwi).arg(&ci).arg(y);
    // SAFETY: gap_forward_{f32,bf16}(const T*, int, int, int, float*); one thread per output.
    unsafe { b.launch(grid_for(n * c)) }?;
    Ok(())
}

/// Global average pooling backward: `[n, c]` (f32) to `[n, hw, c]` in `T`.
pub fn gap_backward<T: Elem>(
    gpu: &Gpu,
    dy: &CudaSlice<f32>,
    n: usize,
    hw: usize,
    c: usize,
    dx: &mut CudaSlice<T>,
) -> Result<(), GpuError> {
    same_len(dy.len(), n * c, "gap_backward input")?;
    same_len(dx.len(), n * hw * c, "gap_backward output")?;
    let (ni, hwi, ci) = (int(n, "n")?, int(hw, "hw")?, int(c, "c")?);
    let f = elem_kernel::<T>(gpu, "gap_backward")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dy).arg(&ni).arg(&hwi).arg(&ci).arg(dx);
    // SAFETY: gap_backward_{f32,bf16}(const float*, int, int, int, T*); grid-stride over dx.
    unsafe { b.launch(grid_for(n * hw * c)) }?;
    Ok(())
}

/// `y = x * scale + shift` per channel of `[rows, c]` rows, then a ReLU when `relu` (batch
/// norm's last pass, with any per-channel scale and shift). In f32, rounded to `T` once.
pub fn affine_rows<T: Elem>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    scale: &CudaSlice<f32>,
    shift: &CudaSlice<f32>,
    relu: bool,
    y: &mut CudaSlice<T>,
) -> Result<(), GpuError> {
    let c = scale.len();
    same_len(shift.len(), c, "affine shift")?;
    same_len(x.len(), y.len(), "affine output")?;
    ensure(c > 0 && x.len() % c == 0, || {
        format!("affine: {} values are not rows of {c}", x.len())
    })?;
    let rows = x.len() / c;
    let (r64, ci, ri) = (rows as u64, int(c, "c")?, i32::from(relu));
    let f = elem_kernel::<T>(gpu, "bn_apply")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x)
        .arg(scale)
        .arg(shift)
        .arg(&r64)
        .arg(&ci)
        .arg(&ri)
        .arg(y);
    // SAFETY: bn_apply_{f32,bf16}(const T*, const float*, const float*, u64, int, int, T*);
    // x and y hold rows * c, scale and shift c.
    unsafe { b.launch(grid_for(rows * c)) }?;
    Ok(())
}

/// Sums per channel that batch norm hands to its `reduce` hook before using them (an
/// all-reduce over the replicas makes the batch norm global).
pub type Reduce<'a> = &'a mut dyn FnMut(&mut CudaSlice<f64>) -> Result<(), GpuError>;

/// Number of fixed row groups of the batch-norm reductions (as the CPU's).
const BN_GROUPS: usize = crate::cpu::REDUCE_GROUPS;

/// What a training-mode batch-norm forward pass keeps for its backward pass.
#[derive(Debug)]
pub struct BnSaved {
    /// Per-channel batch mean.
    pub mean: CudaSlice<f32>,
    /// Per-channel `1 / sqrt(var + eps)`.
    pub invstd: CudaSlice<f32>,
}

/// Workspace of the batch-norm kernels for `c` channels.
#[derive(Debug)]
pub struct BatchNormGpu {
    c: usize,
    partials: CudaSlice<f64>,
    sums: CudaSlice<f64>,
    mean64: CudaSlice<f64>,
    scale: CudaSlice<f32>,
    shift: CudaSlice<f32>,
    /// Statistics a backward pass is done with, for the next forward pass to fill.
    spare: Vec<BnSaved>,
}

/// The most spare [`BnSaved`] a workspace keeps (more than one forward pass may be awaiting
/// its backward pass, as with gradient caching).
const BN_SPARES: usize = 8;

/// The per-channel parameters and running statistics of one batch-norm layer.
#[derive(Debug)]
pub struct BnParams<'a> {
    /// Scale `gamma`.
    pub gamma: &'a CudaSlice<f32>,
    /// Shift `beta`.
    pub beta: &'a CudaSlice<f32>,
    /// Running mean (updated in training mode).
    pub running_mean: &'a mut CudaSlice<f32>,
    /// Running unbiased variance (updated in training mode).
    pub running_var: &'a mut CudaSlice<f32>,
    /// Weight of the newest batch in the running statistics (PyTorch's 0.1).
    pub momentum: f32,
    /// Added to the variance (PyTorch's 1e-5).
    pub eps: f32,
}

impl BatchNormGpu {
    /// Workspace for `c` channels.
    pub fn new(gpu: &Gpu, c: usize) -> Result<Self, GpuError> {
        ensure(c > 0, || "batch norm needs at least one channel".into())?;
        Ok(BatchNormGpu {
            c,
            partials: gpu.zeros(BN_GROUPS * 2 * c)?,
            sums: gpu.zeros(2 * c)?,
            mean64: gpu.zeros(c)?,
            scale: gpu.zeros(c)?,
            shift: gpu.zeros(c)?,
            spare: Vec::new(),
        })
    }

    /// Takes back the statistics of a finished backward pass: the next training forward pass
    /// writes its own into them instead of allocating.
    pub fn recycle(&mut self, saved: BnSaved) {
        if saved.mean.len() == self.c
            && saved.invstd.len() == self.c
            && self.spare.len() < BN_SPARES
        {
            self.spare.push(saved);
        }
    }

    fn partials<T: Elem>(
        &mut self,
        gpu: &Gpu,
        x: &CudaSlice<T>,
        dy_relu: Option<(&CudaSlice<T>, Option<&CudaSlice<T>>)>,
        rows: usize,
        saved: Option<&BnSaved>,
        mode: i32,
    ) -> Result<(), GpuError> {
        let c = self.c;
        let (ri, ci) = (int(rows, "rows")?, int(c, "c")?);
        let width = if mode == 2 { 2 * c } else { c };
        let f = elem_kernel::<T>(gpu, "bn_partials")?;
        let stream = gpu.stream().clone();
        let null: u64 = 0;
        let mut b = stream.launch_builder(&f);
        b.arg(x);
        match dy_relu {
            Some((dy, relu)) => {
                b.arg(dy);
                match relu {
                    Some(r) => b.arg(r),
                    None => b.arg(&null),
                };
            }
            None => {
                b.arg(&null).arg(&null);
            }
        }
        b.arg(&ri).arg(&ci).arg(&self.mean64);
        match saved {
            Some(s) => b.arg(&s.mean).arg(&s.invstd),
            None => b.arg(&null).arg(&null),
        };
        b.arg(&mode).arg(&mut self.partials);
        // SAFETY: bn_partials_{f32,bf16}(const T* x, const T* dy, const T* relu_out, int rows,
        // int c, const double* center, const float* mean, const float* invstd, int mode,
        // double* partials); null pointers only where `mode` does not read them; partials holds
        // BN_GROUPS * 2c doubles.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (c.div_ceil(32) as u32, BN_GROUPS as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        let (g, wi) = (BN_GROUPS as i32, int(width, "width")?);
        let f = gpu.function(Module::Train, "bn_reduce")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&self.partials).arg(&g).arg(&wi).arg(&mut self.sums);
        // SAFETY: bn_reduce(const double*, int, int, double*); sums holds 2c doubles.
        unsafe { b.launch(grid_for(width)) }?;
        Ok(())
    }

    /// Training-mode forward pass over `x` (`[rows, c]`, `rows` local rows of `count` in the
    /// global batch): normalises with the batch statistics, applies gamma and beta (then a ReLU
    /// when `relu`), updates the running statistics, and returns what the backward pass needs.
    /// `reduce` sees each per-channel sum before it is used. With bf16 activations the
    /// statistics are still summed in f64 from the widened values; only `y` is rounded.
    pub fn forward_train<T: Elem>(
        &mut self,
        gpu: &Gpu,
        x: &CudaSlice<T>,
        rows: usize,
        count: usize,
        p: BnParams<'_>,
        relu: bool,
        y: &mut CudaSlice<T>,
        reduce: Reduce<'_>,
    ) -> Result<BnSaved, GpuError> {
        let c = self.c;
        same_len(x.len(), rows * c, "batch norm input")?;
        same_len(y.len(), rows * c, "batch norm output")?;
        for (v, what) in [
            (p.gamma.len(), "gamma"),
            (p.beta.len(), "beta"),
            (p.running_mean.len(), "running_mean"),
            (p.running_var.len(), "running_var"),
        ] {
            same_len(v, c, what)?;
        }
        ensure(count >= 2, || {
            format!("training batch norm needs more than one value per channel, got {count}")
        })?;
        // Both are written in full below, before any read.
        let mut saved = match self.spare.pop() {
            Some(s) => s,
            None => BnSaved {
                mean: gpu.zeros(c)?,
                invstd: gpu.zeros(c)?,
            },
        };
        let stream = gpu.stream().clone();
        let ci = int(c, "c")?;
        let countf = count as f64;
        // Pass 1: the mean.
        self.partials::<T>(gpu, x, None, rows, None, 0)?;
        reduce(&mut self.sums)?;
        let f = gpu.function(Module::Train, "bn_mean")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&self.sums)
            .arg(&countf)
            .arg(&ci)
            .arg(&mut self.mean64)
            .arg(&mut saved.mean);
        // SAFETY: bn_mean(const double*, double, int, double*, float*); all hold >= c.
        unsafe { b.launch(grid_for(c)) }?;
        // Pass 2: centred squares.
        self.partials::<T>(gpu, x, None, rows, None, 1)?;
        reduce(&mut self.sums)?;
        let f = gpu.function(Module::Train, "bn_finalize")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&self.sums)
            .arg(&countf)
            .arg(&p.eps)
            .arg(&saved.mean)
            .arg(p.gamma)
            .arg(p.beta)
            .arg(&p.momentum)
            .arg(&ci)
            .arg(&mut saved.invstd)
            .arg(&mut self.scale)
            .arg(&mut self.shift)
            .arg(p.running_mean)
            .arg(p.running_var);
        // SAFETY: bn_finalize(const double* sq, double count, float eps, const float* mean,
        // const float* gamma, const float* beta, float momentum, int c, float* invstd,
        // float* scale, float* shift, float* running_mean, float* running_var); all hold c.
        unsafe { b.launch(grid_for(c)) }?;
        self.apply(gpu, x, rows, relu, y)?;
        Ok(saved)
    }

    /// Evaluation-mode forward pass: normalises with the running statistics.
    pub fn forward_eval<T: Elem>(
        &mut self,
        gpu: &Gpu,
        x: &CudaSlice<T>,
        rows: usize,
        p: BnParams<'_>,
        relu: bool,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let c = self.c;
        same_len(x.len(), rows * c, "batch norm input")?;
        same_len(y.len(), rows * c, "batch norm output")?;
        // scale and shift from the running statistics: a small host round trip, evaluation only.
        let rm = gpu.download(p.running_mean)?;
        let rv = gpu.download(p.running_var)?;
        let gamma = gpu.download(p.gamma)?;
        let beta = gpu.download(p.beta)?;
        let scale: Vec<f32> = (0..c).map(|i| gamma[i] / (rv[i] + p.eps).sqrt()).collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - rm[i] * scale[i]).collect();
        gpu.stream().memcpy_htod(&scale, &mut self.scale)?;
        gpu.stream().memcpy_htod(&shift, &mut self.shift)?;
        self.apply(gpu, x, rows, relu, y)
    }

    fn apply<T: Elem>(
        &mut self,
        gpu: &Gpu,
        x: &CudaSlice<T>,
        rows: usize,
        relu: bool,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        same_len(x.len(), rows * self.c, "batch norm input")?;
        affine_rows(gpu, x, &self.scale, &self.shift, relu, y)
    }

    /// Backward pass of [`BatchNormGpu::forward_train`]: writes `dx`, `dgamma` and `dbeta`.
    /// `relu_out` is the forward output when a ReLU was fused (its gradient is masked on the
    /// fly). `reduce` sees the per-channel gradient sums before they are used.
    pub fn backward<T: Elem>(
        &mut self,
        gpu: &Gpu,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        relu_out: Option<&CudaSlice<T>>,
        rows: usize,
        count: usize,
        gamma: &CudaSlice<f32>,
        saved: &BnSaved,
        dx: &mut CudaSlice<T>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        reduce: Reduce<'_>,
    ) -> Result<(), GpuError> {
        let c = self.c;
        for (v, what) in [(x.len(), "x"), (dy.len(), "dy"), (dx.len(), "dx")] {
            same_len(v, rows * c, what)?;
        }
        if let Some(r) = relu_out {
            same_len(r.len(), rows * c, "relu_out")?;
        }
        for (v, what) in [
            (gamma.len(), "gamma"),
            (dgamma.len(), "dgamma"),
            (dbeta.len(), "dbeta"),
        ] {
            same_len(v, c, what)?;
        }
        self.partials::<T>(gpu, x, Some((dy, relu_out)), rows, Some(saved), 2)?;
        reduce(&mut self.sums)?;
        let stream = gpu.stream().clone();
        let (r64, ci, countf) = (rows as u64, int(c, "c")?, count as f64);
        let null: u64 = 0;
        let f = elem_kernel::<T>(gpu, "bn_backward_apply")?;
        {
            let mut b = stream.launch_builder(&f);
            b.arg(x).arg(dy);
            match relu_out {
                Some(r) => b.arg(r),
                None => b.arg(&null),
            };
            b.arg(&r64)
                .arg(&ci)
                .arg(&saved.mean)
                .arg(&saved.invstd)
                .arg(gamma)
                .arg(&self.sums)
                .arg(&countf)
                .arg(&mut *dx);
            // SAFETY: bn_backward_apply_{f32,bf16}(const T* x, const T* dy, const T* relu_out,
            // u64 rows, int c, const float* mean, const float* invstd, const float* gamma,
            // const double* sums, double count, T* dx); sizes checked above.
            unsafe { b.launch(grid_for(rows * c)) }?;
        }
        for (range, out) in [(0..c, dbeta), (c..2 * c, dgamma)] {
            cast_f64_to_f32(gpu, &self.sums.slice(range), out)?;
        }
        Ok(())
    }
}

/// `y[i] = x[i] as f32`: per-channel f64 sums (batch norm's) to f32 gradients.
pub fn cast_f64_to_f32(
    gpu: &Gpu,
    x: &CudaView<'_, f64>,
    y: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    same_len(x.len(), y.len(), "cast")?;
    let n = int(x.len(), "values")?;
    let f = gpu.function(Module::Train, "f64_to_f32")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&n);
    // SAFETY: f64_to_f32(const double*, float*, int) over n values, both of length n.
    unsafe { b.launch(grid_for(x.len())) }?;
    Ok(())
}

/// torch.optim.SGD's update (dampening 0) of one parameter tensor, as
/// [`crate::cpu::optim::sgd_update`].
pub fn sgd_update(
    gpu: &Gpu,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    buf: &mut CudaSlice<f32>,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
) -> Result<(), GpuError> {
    same_len(p.len(), g.len(), "sgd gradient")?;
    same_len(p.len(), buf.len(), "sgd momentum buffer")?;
    let (n, nest) = (p.len() as u64, i32::from(nesterov));
    let f = gpu.function(Module::Train, "sgd_update")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut *p)
        .arg(g)
        .arg(buf)
        .arg(&n)
        .arg(&lr)
        .arg(&momentum)
        .arg(&weight_decay)
        .arg(&nest);
    // SAFETY: sgd_update(float*, const float*, float*, u64, float, float, float, int).
    unsafe { b.launch(grid_for(n as usize)) }?;
    Ok(())
}

/// One parameter tensor of a LARS step.
#[derive(Debug)]
pub struct LarsTensor<'a> {
    /// The parameters.
    pub p: &'a mut CudaSlice<f32>,
    /// Their gradient.
    pub g: &'a CudaSlice<f32>,
    /// The momentum buffer.
    pub v: &'a mut CudaSlice<f32>,
    /// Trust-ratio adaptation and weight decay (false for biases and batch-norm parameters).
    pub adapt: bool,
}

/// LARS hyper-parameters (SimCLR's LARSOptimizer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LarsConfig {
    /// Learning rate of this step.
    pub lr: f32,
    /// Momentum (0.9).
    pub momentum: f32,
    /// Weight decay (1e-6), on adapted tensors only.
    pub weight_decay: f32,
    /// Trust coefficient eta (0.001).
    pub eta: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

const LARS_CHUNK: usize = 4096;

/// LARS over a table of tensors in two launches (the norms, then the update), as
/// [`crate::cpu::optim::lars_update`] per tensor. Keeps its tensor table between steps, and
/// rebuilds it (an upload) only when a tensor's buffer moves. (`simclr-nn`'s optimiser passes
/// one tensor per call, two launches per parameter tensor.)
#[derive(Debug, Default)]
pub struct LarsGpu {
    key: Vec<(u64, u64, u64, usize, bool)>,
    table: Option<LarsTable>,
}

#[derive(Debug)]
struct LarsTable {
    p: CudaSlice<u64>,
    g: CudaSlice<u64>,
    v: CudaSlice<u64>,
    lens: CudaSlice<u64>,
    first: CudaSlice<i32>,
    adapt: CudaSlice<i32>,
    partials: CudaSlice<f64>,
    blocks: usize,
}

impl LarsGpu {
    /// An empty optimiser state (the table is built on the first step).
    pub fn new() -> Self {
        Self::default()
    }

    /// One LARS step over `tensors`.
    pub fn step(
        &mut self,
        gpu: &Gpu,
        tensors: &mut [LarsTensor<'_>],
        cfg: &LarsConfig,
    ) -> Result<(), GpuError> {
        ensure(!tensors.is_empty(), || "LARS step over no tensors".into())?;
        let stream = gpu.stream().clone();
        let mut key = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            ensure(
                t.p.len() == t.g.len() && t.p.len() == t.v.len() && !t.p.is_empty(),
                || {
                    format!(
                        "LARS tensor {i}: parameter, gradient and momentum lengths {} / {} / {}",
                        t.p.len(),
                        t.g.len(),
                        t.v.len()
                    )
                },
            )?;
            let (pp, _s1) = t.p.device_ptr(&stream);
            let (gp, _s2) = t.g.device_ptr(&stream);
            let (vp, _s3) = t.v.device_ptr(&stream);
            key.push((pp, gp, vp, t.p.len(), t.adapt));
        }
        if self.key != key || self.table.is_none() {
            let mut first = Vec::with_capacity(key.len() + 1);
            let mut blocks = 0usize;
            for k in &key {
                first.push(int(blocks, "LARS blocks")?);
                blocks += k.3.div_ceil(LARS_CHUNK);
            }
            first.push(int(blocks, "LARS blocks")?);
            let col = |f: fn(&(u64, u64, u64, usize, bool)) -> u64| {
                key.iter().map(f).collect::<Vec<u64>>()
            };
            self.table = Some(LarsTable {
                p: gpu.upload(&col(|k| k.0))?,
                g: gpu.upload(&col(|k| k.1))?,
                v: gpu.upload(&col(|k| k.2))?,
                lens: gpu.upload(&col(|k| k.3 as u64))?,
                first: gpu.upload(&first)?,
                adapt: gpu.upload(&key.iter().map(|k| i32::from(k.4)).collect::<Vec<i32>>())?,
                partials: gpu.zeros(2 * blocks)?,
                blocks,
            });
            self.key = key;
        }
        let t = self.table.as_mut().expect("built above");
        let nt = int(tensors.len(), "tensors")?;
        let cfg_launch = LaunchConfig {
            grid_dim: (t.blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // The tensors' own buffers are not passed as arguments (the table holds their
        // addresses), so order the launches after their producers explicitly: everything here
        // runs on the one stream of `gpu`, after whatever wrote the gradients.
        let f = gpu.function(Module::Train, "lars_norms")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&t.p)
            .arg(&t.g)
            .arg(&t.lens)
            .arg(&t.first)
            .arg(&nt)
            .arg(&cfg.weight_decay)
            .arg(&mut t.partials);
        // SAFETY: lars_norms(const u64* p, const u64* g, const u64* lens, const int* first,
        // int tensors, float wd, double* partials); the table holds live device addresses of
        // `tensors` (borrowed for this call) and partials two doubles per block.
        unsafe { b.launch(cfg_launch) }?;
        let nest = i32::from(cfg.nesterov);
        let f = gpu.function(Module::Train, "lars_update")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&t.p)
            .arg(&t.g)
            .arg(&t.v)
            .arg(&t.lens)
            .arg(&t.first)
            .arg(&t.adapt)
            .arg(&nt)
            .arg(&t.partials)
            .arg(&cfg.lr)
            .arg(&cfg.momentum)
            .arg(&cfg.weight_decay)
            .arg(&cfg.eta)
            .arg(&nest);
        // SAFETY: lars_update(const u64* p, const u64* g, const u64* v, const u64* lens,
        // const int* first, const int* adapt, int tensors, const double* partials, float lr,
        // float momentum, float wd, float eta, int nesterov); as above.
        unsafe { b.launch(cfg_launch) }?;
        Ok(())
    }
}

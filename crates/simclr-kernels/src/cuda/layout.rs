//! Max pooling, the NCHW/NHWC permutes and the linear layer's bias (`kernels/train.cu`): the
//! twins of [`crate::cpu::pooling`]'s max pooling and of [`crate::cpu::eltwise`]'s
//! `nchw_to_nhwc`, `nhwc_to_nchw`, `broadcast_rows` and `column_sums`.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::train::{elem_kernel, grid_for, same_len};
use super::{ensure, int, Gpu, GpuError, Module};
use crate::cpu::pooling::PoolGeom;
use crate::Elem;

fn pool_args(g: &PoolGeom) -> Result<[i32; 9], GpuError> {
    ensure(
        g.stride > 0 && g.k > 0 && g.h + 2 * g.pad >= g.k && g.w + 2 * g.pad >= g.k,
        || {
            format!(
                "max pool: window {} stride {} does not fit {g:?}",
                g.k, g.stride
            )
        },
    )?;
    ensure((g.n * g.h * g.w * g.c) <= u32::MAX as usize, || {
        "max pool: input exceeds 2^32 values".into()
    })?;
    Ok([
        int(g.n, "n")?,
        int(g.h, "h")?,
        int(g.w, "w")?,
        int(g.c, "c")?,
        int(g.k, "k")?,
        int(g.stride, "stride")?,
        int(g.pad, "pad")?,
        int(g.oh(), "oh")?,
        int(g.ow(), "ow")?,
    ])
}

/// Max pooling forward of NHWC `x`; `arg` gets the flat input index of each maximum (a view,
/// so that callers may keep the indices in a buffer of another element type).
pub fn maxpool_forward<T: Elem>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    g: &PoolGeom,
    y: &mut CudaSlice<T>,
    arg: &mut CudaViewMut<'_, u32>,
) -> Result<(), GpuError> {
    let a = pool_args(g)?;
    let out = g.n * g.oh() * g.ow() * g.c;
    same_len(x.len(), g.n * g.h * g.w * g.c, "max pool input")?;
    same_len(y.len(), out, "max pool output")?;
    same_len(arg.len(), out, "max pool indices")?;
    let f = elem_kernel::<T>(gpu, "maxpool_forward")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x);
    for v in &a {
        b.arg(v);
    }
    b.arg(y).arg(arg);
    // SAFETY: maxpool_forward_{f32,bf16}(const T* x, int n, h, w, c, k, stride, pad, oh, ow,
    // T* y, u32* arg); lengths checked above.
    unsafe { b.launch(grid_for(out)) }?;
    Ok(())
}

/// Max pooling backward: `dx` (zero where no window took its maximum) from `dy` and the
/// forward's indices; summed in f32 and rounded to `T` once.
pub fn maxpool_backward<T: Elem>(
    gpu: &Gpu,
    dy: &CudaSlice<T>,
    arg: &CudaView<'_, u32>,
    g: &PoolGeom,
    dx: &mut CudaSlice<T>,
) -> Result<(), GpuError> {
    let a = pool_args(g)?;
    let out = g.n * g.oh() * g.ow() * g.c;
    same_len(dy.len(), out, "max pool dy")?;
    same_len(arg.len(), out, "max pool indices")?;
    same_len(dx.len(), g.n * g.h * g.w * g.c, "max pool dx")?;
    let total = dx.len();
    let f = elem_kernel::<T>(gpu, "maxpool_backward")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dy).arg(arg);
    for v in &a {
        b.arg(v);
    }
    b.arg(&mut *dx);
    // SAFETY: maxpool_backward_{f32,bf16}(const T* dy, const u32* arg, int n, h, w, c, k,
    // stride, pad, oh, ow, T* dx); lengths checked above.
    unsafe { b.launch(grid_for(total)) }?;
    Ok(())
}

/// `[n, c, h*w]` to `[n, h*w, c]`.
pub fn nchw_to_nhwc(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    c: usize,
    hw: usize,
    y: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    permute(gpu, "nchw_to_nhwc_f32", x, [n, c, hw], y)
}

/// `[n, h*w, c]` to `[n, c, h*w]`.
pub fn nhwc_to_nchw(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    hw: usize,
    c: usize,
    y: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    permute(gpu, "nhwc_to_nchw_f32", x, [n, hw, c], y)
}

fn permute(
    gpu: &Gpu,
    name: &str,
    x: &CudaSlice<f32>,
    dims: [usize; 3],
    y: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    let total = dims.iter().product();
    same_len(x.len(), total, "permute input")?;
    same_len(y.len(), total, "permute output")?;
    let d = [
        int(dims[0], "n")?,
        int(dims[1], "dim 1")?,
        int(dims[2], "dim 2")?,
    ];
    let f = gpu.function(Module::Train, name)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&d[0]).arg(&d[1]).arg(&d[2]).arg(y);
    // SAFETY: {nchw_to_nhwc,nhwc_to_nchw}_f32(const float*, int, int, int, float*); both hold
    // the product of the three dimensions.
    unsafe { b.launch(grid_for(total)) }?;
    Ok(())
}

/// `y[r, j] = bias[j]` for every row of `y` (`[rows, bias.len()]`).
pub fn broadcast_rows(
    gpu: &Gpu,
    bias: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    let c = bias.len();
    ensure(c > 0 && y.len() % c == 0, || {
        format!("broadcast_rows: {} values are not rows of {c}", y.len())
    })?;
    let total = y.len();
    let (rows, ci) = ((total / c) as u64, int(c, "c")?);
    let f = gpu.function(Module::Train, "broadcast_rows_f32")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(bias).arg(&rows).arg(&ci).arg(&mut *y);
    // SAFETY: broadcast_rows_f32(const float* b, u64 rows, int c, float* y); y holds rows * c.
    unsafe { b.launch(grid_for(total)) }?;
    Ok(())
}

/// `out[j] = sum_r x[r, j]` (or `out[j] += ...` when `accumulate`), `x` `[rows, out.len()]`.
pub fn column_sums(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    accumulate: bool,
) -> Result<(), GpuError> {
    let c = out.len();
    ensure(c > 0 && x.len() % c == 0, || {
        format!("column_sums: {} values are not rows of {c}", x.len())
    })?;
    let (rows, ci, acc) = (
        int(x.len() / c, "rows")?,
        int(c, "c")?,
        i32::from(accumulate),
    );
    let f = gpu.function(Module::Train, "column_sums_f32")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&rows).arg(&ci).arg(&acc).arg(&mut *out);
    // SAFETY: column_sums_f32(const float* x, int rows, int c, int accumulate, float* out).
    unsafe { b.launch(grid_for(c)) }?;
    Ok(())
}

//! Tensor, filter and convolution descriptors, with the checks the cuDNN API reference lists
//! for their `cudnnSet*Descriptor` calls (`BAD_PARAM` for negative or zero sizes, bad
//! enumerants, negative strides; `NOT_SUPPORTED` for a rank outside [4, `CUDNN_DIM_MAX`] or a
//! tensor over 2^31 elements).
//!
//! A descriptor is an opaque address; its contents live in a table, so a destroyed or made-up
//! descriptor is `BAD_PARAM` rather than a crash.
#![allow(non_snake_case)]

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::{Mutex, OnceLock};

use super::*;
use crate::numeric::Elem;

/// `CUDNN_DIM_MAX`: the largest tensor rank.
pub const CUDNN_DIM_MAX: usize = 8;

/// `cudnnDataType_t` values the emulator computes with.
pub const CUDNN_DATA_FLOAT: u32 = 0;
/// `CUDNN_DATA_DOUBLE`.
pub const CUDNN_DATA_DOUBLE: u32 = 1;
/// `CUDNN_DATA_HALF` (accepted in descriptors; convolutions in it are not emulated).
pub const CUDNN_DATA_HALF: u32 = 2;
/// `CUDNN_DATA_INT8x4`: a vector type (the only kind `CUDNN_TENSOR_NCHW_VECT_C` takes).
pub const CUDNN_DATA_INT8X4: u32 = 5;
/// `CUDNN_DATA_INT8x32`.
pub const CUDNN_DATA_INT8X32: u32 = 8;
/// `CUDNN_DATA_BFLOAT16`.
pub const CUDNN_DATA_BFLOAT16: u32 = 9;
/// The largest `cudnnDataType_t` enumerant of cuDNN 9 (`CUDNN_DATA_COMPLEX_FP64`).
pub const CUDNN_DATA_LAST: u32 = 21;

/// `cudnnTensorFormat_t`: `CUDNN_TENSOR_NCHW`.
pub const CUDNN_TENSOR_NCHW: u32 = 0;
/// `CUDNN_TENSOR_NHWC` (for filters: KRSC, output channels outermost, input channels
/// innermost).
pub const CUDNN_TENSOR_NHWC: u32 = 1;
/// `CUDNN_TENSOR_NCHW_VECT_C`.
pub const CUDNN_TENSOR_NCHW_VECT_C: u32 = 2;

/// `cudnnConvolutionMode_t`: `CUDNN_CONVOLUTION` (the filter flipped).
pub const CUDNN_CONVOLUTION: u32 = 0;
/// `CUDNN_CROSS_CORRELATION`.
pub const CUDNN_CROSS_CORRELATION: u32 = 1;

/// `cudnnMathType_t`: `CUDNN_DEFAULT_MATH` (TF32 allowed for f32 on Ampere and later).
pub const CUDNN_DEFAULT_MATH: u32 = 0;
/// `CUDNN_TENSOR_OP_MATH`.
pub const CUDNN_TENSOR_OP_MATH: u32 = 1;
/// `CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION`.
pub const CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION: u32 = 2;
/// `CUDNN_FMA_MATH`: FMA kernels only (no tensor cores, no TF32).
pub const CUDNN_FMA_MATH: u32 = 3;

/// A tensor: dimensions (N, C, spatial...) and element strides, whatever format set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    /// `cudnnDataType_t`.
    pub dtype: u32,
    /// N, C, then the spatial dimensions.
    pub dims: Vec<i64>,
    /// The stride of each dimension, in elements.
    pub strides: Vec<i64>,
}

/// A filter: dimensions (K, C, spatial...) in a format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// `cudnnDataType_t`.
    pub dtype: u32,
    /// `CUDNN_TENSOR_NCHW` (KCRS) or `CUDNN_TENSOR_NHWC` (KRSC).
    pub format: u32,
    /// K (output channels), C (input channels per group), then the spatial dimensions.
    pub dims: Vec<i64>,
}

impl Filter {
    /// The element strides of K, C and the spatial dimensions in its format.
    pub fn strides(&self) -> Vec<i64> {
        let d = &self.dims;
        let nb = d.len();
        let mut s = vec![0i64; nb];
        if self.format == CUDNN_TENSOR_NHWC {
            // K, spatial..., C innermost.
            s[1] = 1;
            let mut acc = d[1];
            for i in (2..nb).rev() {
                s[i] = acc;
                acc *= d[i];
            }
            s[0] = acc;
        } else {
            let mut acc = 1;
            for i in (0..nb).rev() {
                s[i] = acc;
                acc *= d[i];
            }
        }
        s
    }
}

/// A convolution descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conv {
    /// Zero padding per spatial dimension.
    pub pads: Vec<i64>,
    /// Filter strides per spatial dimension.
    pub strides: Vec<i64>,
    /// Dilations per spatial dimension.
    pub dilations: Vec<i64>,
    /// `CUDNN_CONVOLUTION` or `CUDNN_CROSS_CORRELATION`.
    pub mode: u32,
    /// The compute (accumulation) type, a `cudnnDataType_t`.
    pub compute: u32,
    /// `cudnnMathType_t`.
    pub math: u32,
    /// Groups (`cudnnSetConvolutionGroupCount`).
    pub groups: i64,
}

enum Desc {
    Tensor(Option<Tensor>),
    Filter(Option<Filter>),
    Conv(Option<Conv>),
}

fn table() -> std::sync::MutexGuard<'static, HashMap<usize, Desc>> {
    static T: OnceLock<Mutex<HashMap<usize, Desc>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

unsafe fn create(out: *mut *mut c_void, d: Desc) -> CudnnStatus {
    if out.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    let p = Box::into_raw(Box::new(0u8)) as usize;
    table().insert(p, d);
    // SAFETY: non-null out-pointer.
    unsafe { out.write(p as *mut c_void) };
    CUDNN_STATUS_SUCCESS
}

unsafe fn destroy(p: *mut c_void, kind: fn(&Desc) -> bool) -> CudnnStatus {
    if p.is_null() {
        // cuDNN's destroy calls accept a null descriptor.
        return CUDNN_STATUS_SUCCESS;
    }
    let mut t = table();
    match t.get(&(p as usize)) {
        Some(d) if kind(d) => {
            t.remove(&(p as usize));
            // SAFETY: from Box::into_raw in `create`, out of the table now.
            drop(unsafe { Box::from_raw(p as *mut u8) });
            CUDNN_STATUS_SUCCESS
        }
        _ => CUDNN_STATUS_BAD_PARAM,
    }
}

/// The contents of a set tensor descriptor (`BAD_PARAM` for an unknown or unset one).
pub fn tensor(p: *mut c_void) -> Result<Tensor, CudnnStatus> {
    match table().get(&(p as usize)) {
        Some(Desc::Tensor(Some(t))) => Ok(t.clone()),
        _ => Err(CUDNN_STATUS_BAD_PARAM),
    }
}

/// The contents of a set filter descriptor.
pub fn filter(p: *mut c_void) -> Result<Filter, CudnnStatus> {
    match table().get(&(p as usize)) {
        Some(Desc::Filter(Some(f))) => Ok(f.clone()),
        _ => Err(CUDNN_STATUS_BAD_PARAM),
    }
}

/// The contents of a set convolution descriptor.
pub fn conv(p: *mut c_void) -> Result<Conv, CudnnStatus> {
    match table().get(&(p as usize)) {
        Some(Desc::Conv(Some(c))) => Ok(c.clone()),
        _ => Err(CUDNN_STATUS_BAD_PARAM),
    }
}

fn set(p: *mut c_void, d: Desc) -> CudnnStatus {
    let mut t = table();
    match t.get_mut(&(p as usize)) {
        Some(old) if std::mem::discriminant(old) == std::mem::discriminant(&d) => {
            *old = d;
            CUDNN_STATUS_SUCCESS
        }
        _ => CUDNN_STATUS_BAD_PARAM,
    }
}

fn valid_dtype(d: u32) -> bool {
    d <= CUDNN_DATA_LAST
}

/// The element type of a data type the convolutions compute in.
pub fn elem(dtype: u32) -> Option<Elem> {
    match dtype {
        CUDNN_DATA_FLOAT => Some(Elem::F32),
        CUDNN_DATA_DOUBLE => Some(Elem::F64),
        CUDNN_DATA_BFLOAT16 => Some(Elem::Bf16),
        _ => None,
    }
}

/// "The total size of the tensor descriptor exceeds the maximum limit of 2 Giga-elements":
/// `NOT_SUPPORTED`.
fn check_total(dims: &[i64]) -> Result<(), CudnnStatus> {
    let total = dims.iter().try_fold(1i64, |a, &d| a.checked_mul(d));
    match total {
        Some(t) if t <= i32::MAX as i64 => Ok(()),
        _ => Err(CUDNN_STATUS_NOT_SUPPORTED),
    }
}

/// Packed strides of `dims` (N, C, spatial...) laid out in `format`.
fn packed(dims: &[i64], format: u32) -> Vec<i64> {
    Filter {
        dtype: 0,
        format,
        dims: dims.to_vec(),
    }
    .strides()
}

fn set_tensor(p: *mut c_void, t: Result<Tensor, CudnnStatus>) -> CudnnStatus {
    match t {
        Ok(t) => set(p, Desc::Tensor(Some(t))),
        Err(e) => e,
    }
}

/// `cudnnCreateTensorDescriptor`.
///
/// # Safety
/// `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnCreateTensorDescriptor(out: *mut *mut c_void) -> CudnnStatus {
    unsafe { create(out, Desc::Tensor(None)) }
}

/// `cudnnDestroyTensorDescriptor`.
///
/// # Safety
/// `p` came from `cudnnCreateTensorDescriptor`, or is null.
#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyTensorDescriptor(p: *mut c_void) -> CudnnStatus {
    unsafe { destroy(p, |d| matches!(d, Desc::Tensor(_))) }
}

/// `cudnnSetTensor4dDescriptor`: a packed NCHW or NHWC tensor. `BAD_PARAM` for a size below 1,
/// an unknown format or data type, or `NCHW_VECT_C` with a non-vector type; `NOT_SUPPORTED`
/// over 2^31 elements.
#[no_mangle]
pub extern "C" fn cudnnSetTensor4dDescriptor(
    p: *mut c_void,
    format: u32,
    dtype: u32,
    n: c_int,
    c: c_int,
    h: c_int,
    w: c_int,
) -> CudnnStatus {
    set_tensor(p, tensor4d(format, dtype, [n, c, h, w]))
}

fn tensor4d(format: u32, dtype: u32, d: [c_int; 4]) -> Result<Tensor, CudnnStatus> {
    if d.iter().any(|&v| v <= 0) || !valid_dtype(dtype) || format > CUDNN_TENSOR_NCHW_VECT_C {
        return Err(CUDNN_STATUS_BAD_PARAM);
    }
    if format == CUDNN_TENSOR_NCHW_VECT_C
        && !matches!(dtype, CUDNN_DATA_INT8X4 | CUDNN_DATA_INT8X32)
    {
        return Err(CUDNN_STATUS_BAD_PARAM);
    }
    let dims: Vec<i64> = d.iter().map(|&v| v as i64).collect();
    check_total(&dims)?;
    Ok(Tensor {
        dtype,
        strides: packed(&dims, format),
        dims,
    })
}

/// `cudnnSetTensor4dDescriptorEx`: explicit strides. `BAD_PARAM` for a size below 1, a
/// negative stride or an unknown data type.
#[no_mangle]
pub extern "C" fn cudnnSetTensor4dDescriptorEx(
    p: *mut c_void,
    dtype: u32,
    n: c_int,
    c: c_int,
    h: c_int,
    w: c_int,
    ns: c_int,
    cs: c_int,
    hs: c_int,
    ws: c_int,
) -> CudnnStatus {
    set_tensor(p, tensor_nd(dtype, &[n, c, h, w], &[ns, cs, hs, ws]))
}

fn tensor_nd(dtype: u32, dims: &[c_int], strides: &[c_int]) -> Result<Tensor, CudnnStatus> {
    if dims.iter().any(|&v| v <= 0) || strides.iter().any(|&s| s < 0) || !valid_dtype(dtype) {
        return Err(CUDNN_STATUS_BAD_PARAM);
    }
    let dims: Vec<i64> = dims.iter().map(|&v| v as i64).collect();
    check_total(&dims)?;
    Ok(Tensor {
        dtype,
        dims,
        strides: strides.iter().map(|&v| v as i64).collect(),
    })
}

/// `cudnnSetTensorNdDescriptor`: `NOT_SUPPORTED` for `nbDims` outside [4, 8] (the reference:
/// "nbDims is outside the range [4, CUDNN_DIM_MAX]"), `BAD_PARAM` as the 4-d form.
///
/// # Safety
/// `dims` and `strides` hold `nb` values each.
#[no_mangle]
pub unsafe extern "C" fn cudnnSetTensorNdDescriptor(
    p: *mut c_void,
    dtype: u32,
    nb: c_int,
    dims: *const c_int,
    strides: *const c_int,
) -> CudnnStatus {
    if !(4..=CUDNN_DIM_MAX as c_int).contains(&nb) {
        return CUDNN_STATUS_NOT_SUPPORTED;
    }
    if dims.is_null() || strides.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    // SAFETY: nb values each, per the contract.
    let (d, s) = unsafe {
        (
            std::slice::from_raw_parts(dims, nb as usize),
            std::slice::from_raw_parts(strides, nb as usize),
        )
    };
    set_tensor(p, tensor_nd(dtype, d, s))
}

/// `cudnnSetTensorNdDescriptorEx`: a packed tensor in a format.
///
/// # Safety
/// `dims` holds `nb` values.
#[no_mangle]
pub unsafe extern "C" fn cudnnSetTensorNdDescriptorEx(
    p: *mut c_void,
    format: u32,
    dtype: u32,
    nb: c_int,
    dims: *const c_int,
) -> CudnnStatus {
    if !(4..=CUDNN_DIM_MAX as c_int).contains(&nb) {
        return CUDNN_STATUS_NOT_SUPPORTED;
    }
    if dims.is_null() || format > CUDNN_TENSOR_NHWC {
        return CUDNN_STATUS_BAD_PARAM;
    }
    // SAFETY: nb values, per the contract.
    let d = unsafe { std::slice::from_raw_parts(dims, nb as usize) };
    let d64: Vec<i64> = d.iter().map(|&v| v as i64).collect();
    let s: Vec<c_int> = packed(&d64, format).iter().map(|&v| v as c_int).collect();
    set_tensor(p, tensor_nd(dtype, d, &s))
}

/// `cudnnCreateFilterDescriptor`.
///
/// # Safety
/// `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnCreateFilterDescriptor(out: *mut *mut c_void) -> CudnnStatus {
    unsafe { create(out, Desc::Filter(None)) }
}

/// `cudnnDestroyFilterDescriptor`.
///
/// # Safety
/// `p` came from `cudnnCreateFilterDescriptor`, or is null.
#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyFilterDescriptor(p: *mut c_void) -> CudnnStatus {
    unsafe { destroy(p, |d| matches!(d, Desc::Filter(_))) }
}

fn filter_nd(dtype: u32, format: u32, d: &[c_int]) -> Result<Filter, CudnnStatus> {
    if d.iter().any(|&v| v <= 0) || !valid_dtype(dtype) || format > CUDNN_TENSOR_NCHW_VECT_C {
        return Err(CUDNN_STATUS_BAD_PARAM);
    }
    if format == CUDNN_TENSOR_NCHW_VECT_C
        && !matches!(dtype, CUDNN_DATA_INT8X4 | CUDNN_DATA_INT8X32)
    {
        return Err(CUDNN_STATUS_BAD_PARAM);
    }
    let dims: Vec<i64> = d.iter().map(|&v| v as i64).collect();
    check_total(&dims)?;
    Ok(Filter {
        dtype,
        format,
        dims,
    })
}

/// `cudnnSetFilter4dDescriptor`: K output channels, C input channels (per group), R x S; in
/// `CUDNN_TENSOR_NCHW` (KCRS) or `CUDNN_TENSOR_NHWC` (KRSC). `BAD_PARAM` for a size below 1
/// or an unknown data type or format.
#[no_mangle]
pub extern "C" fn cudnnSetFilter4dDescriptor(
    p: *mut c_void,
    dtype: u32,
    format: u32,
    k: c_int,
    c: c_int,
    h: c_int,
    w: c_int,
) -> CudnnStatus {
    match filter_nd(dtype, format, &[k, c, h, w]) {
        Ok(f) => set(p, Desc::Filter(Some(f))),
        Err(e) => e,
    }
}

/// `cudnnSetFilterNdDescriptor`: `NOT_SUPPORTED` for `nbDims` outside [3, 8].
///
/// # Safety
/// `dims` holds `nb` values.
#[no_mangle]
pub unsafe extern "C" fn cudnnSetFilterNdDescriptor(
    p: *mut c_void,
    dtype: u32,
    format: u32,
    nb: c_int,
    dims: *const c_int,
) -> CudnnStatus {
    if !(3..=CUDNN_DIM_MAX as c_int).contains(&nb) {
        return CUDNN_STATUS_NOT_SUPPORTED;
    }
    if dims.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    // SAFETY: nb values, per the contract.
    let d = unsafe { std::slice::from_raw_parts(dims, nb as usize) };
    match filter_nd(dtype, format, d) {
        Ok(f) => set(p, Desc::Filter(Some(f))),
        Err(e) => e,
    }
}

/// `cudnnCreateConvolutionDescriptor`: math `CUDNN_DEFAULT_MATH`, one group, once set.
///
/// # Safety
/// `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnCreateConvolutionDescriptor(out: *mut *mut c_void) -> CudnnStatus {
    unsafe { create(out, Desc::Conv(None)) }
}

/// `cudnnDestroyConvolutionDescriptor`.
///
/// # Safety
/// `p` came from `cudnnCreateConvolutionDescriptor`, or is null.
#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyConvolutionDescriptor(p: *mut c_void) -> CudnnStatus {
    unsafe { destroy(p, |d| matches!(d, Desc::Conv(_))) }
}

fn set_conv(
    p: *mut c_void,
    pads: &[c_int],
    strides: &[c_int],
    dilations: &[c_int],
    mode: u32,
    compute: u32,
) -> CudnnStatus {
    // "CUDNN_STATUS_BAD_PARAM: ... pad_h or pad_w is negative; u or v is negative or zero;
    // dilation_h or dilation_w is negative or zero; mode has an invalid enumerant value"
    // (cudnnSetConvolution2dDescriptor).
    if pads.iter().any(|&v| v < 0)
        || strides.iter().any(|&v| v <= 0)
        || dilations.iter().any(|&v| v <= 0)
        || mode > CUDNN_CROSS_CORRELATION
        || !valid_dtype(compute)
    {
        return CUDNN_STATUS_BAD_PARAM;
    }
    // Setting the geometry keeps the math type and group count set before.
    let (math, groups) = match conv(p) {
        Ok(c) => (c.math, c.groups),
        Err(_) => (CUDNN_DEFAULT_MATH, 1),
    };
    let v = |a: &[c_int]| a.iter().map(|&x| x as i64).collect::<Vec<_>>();
    set(
        p,
        Desc::Conv(Some(Conv {
            pads: v(pads),
            strides: v(strides),
            dilations: v(dilations),
            mode,
            compute,
            math,
            groups,
        })),
    )
}

/// `cudnnSetConvolution2dDescriptor`.
#[no_mangle]
pub extern "C" fn cudnnSetConvolution2dDescriptor(
    p: *mut c_void,
    pad_h: c_int,
    pad_w: c_int,
    u: c_int,
    v: c_int,
    dil_h: c_int,
    dil_w: c_int,
    mode: u32,
    compute: u32,
) -> CudnnStatus {
    set_conv(p, &[pad_h, pad_w], &[u, v], &[dil_h, dil_w], mode, compute)
}

/// `cudnnSetConvolutionNdDescriptor`: `NOT_SUPPORTED` for `arrayLength` above
/// `CUDNN_DIM_MAX - 2`, `BAD_PARAM` below 1 and as the 2-d form.
///
/// # Safety
/// The arrays hold `len` values each.
#[no_mangle]
pub unsafe extern "C" fn cudnnSetConvolutionNdDescriptor(
    p: *mut c_void,
    len: c_int,
    pads: *const c_int,
    strides: *const c_int,
    dilations: *const c_int,
    mode: u32,
    compute: u32,
) -> CudnnStatus {
    if len > (CUDNN_DIM_MAX - 2) as c_int {
        return CUDNN_STATUS_NOT_SUPPORTED;
    }
    if len < 1 || pads.is_null() || strides.is_null() || dilations.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    let n = len as usize;
    // SAFETY: len values each, per the contract.
    let (pa, st, di) = unsafe {
        (
            std::slice::from_raw_parts(pads, n),
            std::slice::from_raw_parts(strides, n),
            std::slice::from_raw_parts(dilations, n),
        )
    };
    set_conv(p, pa, st, di, mode, compute)
}

fn update_conv(p: *mut c_void, f: impl FnOnce(&mut Conv)) -> CudnnStatus {
    let mut t = table();
    match t.get_mut(&(p as usize)) {
        Some(Desc::Conv(Some(c))) => {
            f(c);
            CUDNN_STATUS_SUCCESS
        }
        _ => CUDNN_STATUS_BAD_PARAM,
    }
}

/// `cudnnSetConvolutionMathType`: `BAD_PARAM` for an unknown math type (or a descriptor whose
/// geometry is not set yet: the emulator keeps the two together).
#[no_mangle]
pub extern "C" fn cudnnSetConvolutionMathType(p: *mut c_void, math: u32) -> CudnnStatus {
    if math > CUDNN_FMA_MATH {
        return CUDNN_STATUS_BAD_PARAM;
    }
    update_conv(p, |c| c.math = math)
}

/// `cudnnGetConvolutionMathType`.
///
/// # Safety
/// `math` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionMathType(
    p: *mut c_void,
    math: *mut u32,
) -> CudnnStatus {
    match (conv(p), math.is_null()) {
        (Ok(c), false) => {
            // SAFETY: non-null out-pointer.
            unsafe { math.write(c.math) };
            CUDNN_STATUS_SUCCESS
        }
        _ => CUDNN_STATUS_BAD_PARAM,
    }
}

/// `cudnnSetConvolutionGroupCount`: `BAD_PARAM` below 1.
#[no_mangle]
pub extern "C" fn cudnnSetConvolutionGroupCount(p: *mut c_void, groups: c_int) -> CudnnStatus {
    if groups < 1 {
        return CUDNN_STATUS_BAD_PARAM;
    }
    update_conv(p, |c| c.groups = groups as i64)
}

/// `cudnnGetConvolutionGroupCount`.
///
/// # Safety
/// `groups` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionGroupCount(
    p: *mut c_void,
    groups: *mut c_int,
) -> CudnnStatus {
    match (conv(p), groups.is_null()) {
        (Ok(c), false) => {
            // SAFETY: non-null out-pointer.
            unsafe { groups.write(c.groups as c_int) };
            CUDNN_STATUS_SUCCESS
        }
        _ => CUDNN_STATUS_BAD_PARAM,
    }
}

/// The output dimensions (N, K, spatial...) of `x` convolved with `w` under `c`, as
/// `cudnnGetConvolutionNdForwardOutputDim` defines them: `1 + (in + 2 pad - ((f - 1) dil + 1))
/// / stride` per spatial dimension. `BAD_PARAM` for ranks that disagree, input channels that
/// are not the filter's times the group count, or a dilated filter larger than the padded
/// input.
pub fn output_dims(c: &Conv, x: &Tensor, w: &Filter) -> Result<Vec<i64>, CudnnStatus> {
    let nb = x.dims.len();
    if w.dims.len() != nb || c.pads.len() + 2 != nb {
        return Err(CUDNN_STATUS_BAD_PARAM);
    }
    if x.dims[1] != w.dims[1] * c.groups || w.dims[0] % c.groups != 0 {
        return Err(CUDNN_STATUS_BAD_PARAM);
    }
    let mut out = vec![x.dims[0], w.dims[0]];
    for i in 0..nb - 2 {
        let padded = x.dims[i + 2] + 2 * c.pads[i];
        let span = (w.dims[i + 2] - 1) * c.dilations[i] + 1;
        if span > padded {
            return Err(CUDNN_STATUS_BAD_PARAM);
        }
        out.push(1 + (padded - span) / c.strides[i]);
    }
    Ok(out)
}

/// `cudnnGetConvolutionNdForwardOutputDim`.
///
/// # Safety
/// `out` holds `nb` writable values.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionNdForwardOutputDim(
    conv_desc: *mut c_void,
    x_desc: *mut c_void,
    w_desc: *mut c_void,
    nb: c_int,
    out: *mut c_int,
) -> CudnnStatus {
    let r = (|| {
        let d = output_dims(&conv(conv_desc)?, &tensor(x_desc)?, &filter(w_desc)?)?;
        if out.is_null() || nb as usize != d.len() {
            return Err(CUDNN_STATUS_BAD_PARAM);
        }
        for (i, v) in d.iter().enumerate() {
            // SAFETY: nb writable values, per the contract.
            unsafe { out.add(i).write(*v as c_int) };
        }
        Ok(())
    })();
    r.err().unwrap_or(CUDNN_STATUS_SUCCESS)
}

/// `cudnnGetConvolution2dForwardOutputDim`.
///
/// # Safety
/// The four out-pointers are writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolution2dForwardOutputDim(
    conv_desc: *mut c_void,
    x_desc: *mut c_void,
    w_desc: *mut c_void,
    n: *mut c_int,
    c: *mut c_int,
    h: *mut c_int,
    w: *mut c_int,
) -> CudnnStatus {
    let mut d = [0 as c_int; 4];
    let s = unsafe {
        cudnnGetConvolutionNdForwardOutputDim(conv_desc, x_desc, w_desc, 4, d.as_mut_ptr())
    };
    if s != CUDNN_STATUS_SUCCESS {
        return s;
    }
    if n.is_null() || c.is_null() || h.is_null() || w.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    // SAFETY: non-null out-pointers.
    unsafe {
        n.write(d[0]);
        c.write(d[1]);
        h.write(d[2]);
        w.write(d[3]);
    }
    CUDNN_STATUS_SUCCESS
}

//! Convolutions: the `*_v7` algorithm heuristics, workspace sizes, and the forward,
//! backward-data and backward-filter passes (2-D, NCHW or NHWC or any strides, groups,
//! dilation, both convolution modes), in the data-type configurations the cuDNN reference
//! lists for `cudnnConvolutionForward`: `FLOAT_CONFIG` (f32 throughout), `DOUBLE_CONFIG`, and
//! `PSEUDO_BFLOAT16_CONFIG` (bf16 tensors, f32 compute type).
//!
//! # Numerics
//!
//! Every algorithm computes the same thing: the definition's sum of products, accumulated in
//! f64 (as matrix products over im2col matrices, module `im2col`, so in no particular order),
//! scaled by `alpha`, plus `beta` times the old output (not read when `beta == 0`: it may hold
//! NaN), then rounded once to the output type (f64 to f32 to bf16 for bf16 outputs). Real cuDNN
//! accumulates in the compute type (f32) in an order each algorithm chooses: results differ in
//! the last bits. A "tensor-core" algorithm (below) on f32 data whose math type allows tensor
//! cores (`CUDNN_DEFAULT_MATH`, `CUDNN_TENSOR_OP_MATH*`; not `CUDNN_FMA_MATH`, nor with
//! `NVIDIA_TF32_OVERRIDE=0`) rounds its inputs to TF32 first, as cuDNN 8+ does on Ampere and
//! later; the heuristics report `CUDNN_TENSOR_OP_MATH` for exactly those.
//!
//! # Algorithms and their refusals
//!
//! The tensor-core algorithms are forward `IMPLICIT_PRECOMP_GEMM`, backward-data `ALGO_1` and
//! backward-filter `ALGO_1`; the heuristics rank them first. An algorithm is refused with a
//! status of cuDNN 9's `NOT_SUPPORTED` family (3000-3999) by these rules, each modelled on a
//! limit of the real library:
//!
//! 1. **bf16 tensor-core kernels need channel counts that are multiples of 8** (their NHWC
//!    loads are 16-byte vectors of 8 bf16): a tensor-core algorithm on bf16 data, math type
//!    not `FMA`, with input or output channels per group not a multiple of 8 (the 3-channel
//!    ImageNet stem) is refused at launch with `CUDNN_STATUS_NOT_SUPPORTED_SHAPE`. The
//!    heuristics still rank it first with `CUDNN_STATUS_SUCCESS` and its workspace query
//!    succeeds: real cuDNN's heuristics and its kernels disagree this way for unusual shapes,
//!    and it is what makes the caller's fallback run.
//! 2. **FFT algorithms** (`FFT`, `FFT_TILING` of each pass) need unit strides and dilations
//!    (an FFT computes a stride-1 correlation), one group, NCHW-packed activations and f32 data
//!    (the reference's support tables for them list NCHW and FLOAT/HALF only); plain `FFT` also
//!    needs the padded input within 256 x 256 and the filter larger than the padding.
//!    Otherwise `CUDNN_STATUS_NOT_SUPPORTED`.
//! 3. **Winograd**: `WINOGRAD` needs a 3x3 filter, `WINOGRAD_NONFUSED` a 3x3 or 5x5 one; both
//!    unit strides and dilations, one group, f32 (nonfused: or bf16) data.
//! 4. **Never implemented**: forward `DIRECT` and backward-filter `WINOGRAD`, which cuDNN lists
//!    but supports for no configuration.
//!
//! Rules 2-4 are known to the heuristics (the algorithm's entry carries the refusal status and
//! is ranked after every supported one) and to the workspace-size queries (which fail with it).
//!
//! # Workspaces
//!
//! Sizes are plausible functions of the geometry (zero for `IMPLICIT_GEMM`, backward `ALGO_0`
//! and fused Winograd; nonzero for the others). A launch checks that the workspace given is at
//! least that large (`CUDNN_STATUS_BAD_PARAM` otherwise, or for a null pointer with a nonzero
//! need) and lies in device memory, and fills the bytes it needs with 0xFF while it runs, as a
//! real algorithm overwrites them: a workspace shared between concurrent convolutions shows.
#![allow(non_snake_case, clippy::too_many_arguments)]

use std::ffi::{c_int, c_void};

use super::desc::{self, *};
use super::*;
use crate::driver::{api, memory};
use crate::numeric::{self, Elem, InputRounding};

mod im2col;

/// The three passes of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// `cudnnConvolutionForward`: y from x and w.
    Forward,
    /// `cudnnConvolutionBackwardData`: dx from dy and w.
    BackwardData,
    /// `cudnnConvolutionBackwardFilter`: dw from x and dy.
    BackwardFilter,
}

impl Pass {
    /// The number of algorithms (`CUDNN_CONVOLUTION_*_ALGO_COUNT`).
    pub fn count(self) -> u32 {
        match self {
            Pass::Forward => 8,
            Pass::BackwardData => 6,
            Pass::BackwardFilter => 7,
        }
    }

    /// The heuristics' preference, best first (before refused algorithms move to the end).
    fn ranking(self) -> &'static [u32] {
        match self {
            // IMPLICIT_PRECOMP_GEMM, IMPLICIT_GEMM, GEMM, WINOGRAD_NONFUSED, WINOGRAD,
            // FFT_TILING, FFT, DIRECT.
            Pass::Forward => &[1, 0, 2, 7, 6, 5, 4, 3],
            // ALGO_1, ALGO_0, WINOGRAD_NONFUSED, WINOGRAD, FFT_TILING, FFT.
            Pass::BackwardData => &[1, 0, 5, 4, 3, 2],
            // ALGO_1, ALGO_0, ALGO_3, WINOGRAD_NONFUSED, FFT_TILING, FFT, WINOGRAD.
            Pass::BackwardFilter => &[1, 0, 3, 5, 6, 2, 4],
        }
    }

    fn is_tensor_core(self, algo: u32) -> bool {
        algo == 1
    }

    fn fft(self, algo: u32) -> Option<bool /* tiling */> {
        match (self, algo) {
            (Pass::Forward, 4) | (Pass::BackwardData, 2) | (Pass::BackwardFilter, 2) => Some(false),
            (Pass::Forward, 5) | (Pass::BackwardData, 3) | (Pass::BackwardFilter, 6) => Some(true),
            _ => None,
        }
    }

    fn winograd(self, algo: u32) -> Option<bool /* nonfused */> {
        match (self, algo) {
            (Pass::Forward, 6) | (Pass::BackwardData, 4) | (Pass::BackwardFilter, 4) => Some(false),
            (Pass::Forward, 7) | (Pass::BackwardData, 5) | (Pass::BackwardFilter, 5) => Some(true),
            _ => None,
        }
    }

    /// Whether the real algorithm accumulates with atomics (backward `ALGO_0`, filter `ALGO_3`).
    fn deterministic(self, algo: u32) -> bool {
        !matches!(
            (self, algo),
            (Pass::BackwardData, 0) | (Pass::BackwardFilter, 0 | 3)
        )
    }

    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "cudnnConvolutionForward",
            Pass::BackwardData => "cudnnConvolutionBackwardData",
            Pass::BackwardFilter => "cudnnConvolutionBackwardFilter",
        }
    }
}

/// A checked 2-D convolution.
#[derive(Clone, Copy, Debug)]
pub struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r: usize,
    s: usize,
    oh: usize,
    ow: usize,
    ph: i64,
    pw: i64,
    sh: i64,
    sw: i64,
    dh: i64,
    dw: i64,
    groups: usize,
    flip: bool,
    dtype: u32,
    elem: Elem,
    math: u32,
    x_strides: [usize; 4],
    y_strides: [usize; 4],
    w_strides: [usize; 4],
}

impl Geom {
    fn cpg(&self) -> usize {
        self.c / self.groups
    }
    fn kpg(&self) -> usize {
        self.k / self.groups
    }
    /// Whether a tensor-core algorithm runs on tensor cores here.
    fn tensor_cores(&self) -> bool {
        self.math != CUDNN_FMA_MATH
            && (self.dtype == CUDNN_DATA_BFLOAT16
                || (self.dtype == CUDNN_DATA_FLOAT && numeric::tf32_allowed()))
    }
    /// Whether x (`out` false) or y (`out` true) is a packed NCHW tensor.
    fn nchw_packed(&self, out: bool) -> bool {
        let (s, c, h, w) = if out {
            (self.y_strides, self.k, self.oh, self.ow)
        } else {
            (self.x_strides, self.c, self.h, self.w)
        };
        s == [c * h * w, h * w, w, 1]
    }
}

fn to4(v: &[i64]) -> [usize; 4] {
    [v[0] as usize, v[1] as usize, v[2] as usize, v[3] as usize]
}

fn fail<T>(status: CudnnStatus, what: &str, why: &str) -> Result<T, CudnnStatus> {
    eprintln!("simclr-gpu-emu: {what}: {why}");
    Err(status)
}

/// Checks x, w, the convolution and y together, as `cudnnConvolutionForward` lists its
/// `BAD_PARAM` and `NOT_SUPPORTED` conditions (the other passes have the same ones).
pub fn geometry(
    x: &Tensor,
    w: &Filter,
    c: &Conv,
    y: &Tensor,
    what: &str,
) -> Result<Geom, CudnnStatus> {
    let nb = x.dims.len();
    if y.dims.len() != nb || w.dims.len() != nb || nb < 3 || c.pads.len() + 2 != nb {
        return fail(
            CUDNN_STATUS_BAD_PARAM,
            what,
            "the tensors', the filter's and the convolution's ranks disagree",
        );
    }
    if nb != 4 {
        return fail(
            CUDNN_STATUS_NOT_SUPPORTED,
            what,
            "only 2-D convolutions (4-d tensors) are emulated",
        );
    }
    if x.dtype != w.dtype || x.dtype != y.dtype {
        return fail(
            CUDNN_STATUS_BAD_PARAM,
            what,
            "x, w and y have different data types",
        );
    }
    let elem = match (x.dtype, c.compute) {
        (CUDNN_DATA_FLOAT, CUDNN_DATA_FLOAT) => Elem::F32,
        (CUDNN_DATA_DOUBLE, CUDNN_DATA_DOUBLE) => Elem::F64,
        (CUDNN_DATA_BFLOAT16, CUDNN_DATA_FLOAT) => Elem::Bf16,
        (t, ct) => {
            return fail(
                CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE,
                what,
                &format!(
                    "data type {t} with compute type {ct} is not a configuration the emulator \
                     does (FLOAT, DOUBLE, PSEUDO_BFLOAT16)"
                ),
            )
        }
    };
    if w.format > CUDNN_TENSOR_NHWC {
        return fail(CUDNN_STATUS_NOT_SUPPORTED_LAYOUT, what, "filter format");
    }
    let out = output_dims(c, x, w).or_else(|e| {
        fail(
            e,
            what,
            "channels (input vs filter times groups, filter vs groups) or a filter larger than \
             the padded input",
        )
    })?;
    if y.dims[0] != x.dims[0] || y.dims[1] != w.dims[0] {
        return fail(
            CUDNN_STATUS_BAD_PARAM,
            what,
            "y's batch or channels do not match x's batch and the filter's output channels",
        );
    }
    if y.dims[2..] != out[2..] {
        // The reference lists this as NOT_SUPPORTED ("yDesc's spatial sizes do not match with
        // the expected size as determined by cudnnGetConvolutionNdForwardOutputDim").
        return fail(
            CUDNN_STATUS_NOT_SUPPORTED,
            what,
            &format!(
                "y's spatial size {:?} is not the convolution's {:?}",
                &y.dims[2..],
                &out[2..]
            ),
        );
    }
    let d = |v: i64| v as usize;
    Ok(Geom {
        n: d(x.dims[0]),
        c: d(x.dims[1]),
        h: d(x.dims[2]),
        w: d(x.dims[3]),
        k: d(w.dims[0]),
        r: d(w.dims[2]),
        s: d(w.dims[3]),
        oh: d(out[2]),
        ow: d(out[3]),
        ph: c.pads[0],
        pw: c.pads[1],
        sh: c.strides[0],
        sw: c.strides[1],
        dh: c.dilations[0],
        dw: c.dilations[1],
        groups: d(c.groups),
        flip: c.mode == CUDNN_CONVOLUTION,
        dtype: x.dtype,
        elem,
        math: c.math,
        x_strides: to4(&x.strides),
        y_strides: to4(&y.strides),
        w_strides: to4(&w.strides()),
    })
}

/// Rules 2-4 of the module documentation: refusals the heuristics know.
fn static_refusal(p: Pass, algo: u32, g: &Geom) -> Option<CudnnStatus> {
    let unit = g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1;
    if matches!((p, algo), (Pass::Forward, 3) | (Pass::BackwardFilter, 4)) {
        return Some(CUDNN_STATUS_NOT_SUPPORTED);
    }
    if let Some(tiling) = p.fft(algo) {
        let packed = g.nchw_packed(false) && g.nchw_packed(true);
        let small = (g.h as i64 + 2 * g.ph) <= 256
            && (g.w as i64 + 2 * g.pw) <= 256
            && g.r as i64 > g.ph
            && g.s as i64 > g.pw;
        if !unit || g.groups != 1 || g.dtype != CUDNN_DATA_FLOAT || !packed || (!tiling && !small) {
            return Some(CUDNN_STATUS_NOT_SUPPORTED);
        }
    }
    if let Some(nonfused) = p.winograd(algo) {
        let filter_ok = (g.r == 3 && g.s == 3) || (nonfused && g.r == 5 && g.s == 5);
        let type_ok = g.dtype == CUDNN_DATA_FLOAT || (nonfused && g.dtype == CUDNN_DATA_BFLOAT16);
        if !unit || g.groups != 1 || !filter_ok || !type_ok {
            return Some(CUDNN_STATUS_NOT_SUPPORTED);
        }
    }
    None
}

/// Rule 1: the bf16 tensor-core channel alignment, checked at launch only.
fn launch_refusal(p: Pass, algo: u32, g: &Geom) -> Option<CudnnStatus> {
    if p.is_tensor_core(algo)
        && g.dtype == CUDNN_DATA_BFLOAT16
        && g.tensor_cores()
        && (g.cpg() % 8 != 0 || g.kpg() % 8 != 0)
    {
        return Some(CUDNN_STATUS_NOT_SUPPORTED_SHAPE);
    }
    None
}

/// The workspace `algo` needs, in bytes (see the module documentation).
fn workspace(p: Pass, algo: u32, g: &Geom) -> usize {
    let e = g.elem.size();
    let crs = g.cpg() * g.r * g.s;
    let tiles = g.oh.div_ceil(4) * g.ow.div_ceil(4);
    let winograd = 4 * 36 * (g.k * g.c + g.n * (g.c + g.k) * tiles);
    let fft = |tiling: bool| {
        let plane = if tiling {
            32 * 17
        } else {
            (g.h + 2 * g.ph as usize) * ((g.w + 2 * g.pw as usize) / 2 + 1)
        };
        8 * (g.n * g.c + g.k * g.c + g.n * g.k) * plane
    };
    if let Some(tiling) = p.fft(algo) {
        return fft(tiling);
    }
    if let Some(nonfused) = p.winograd(algo) {
        return if nonfused { winograd } else { 0 };
    }
    match (p, algo) {
        // Precomputed input offsets.
        (Pass::Forward, 1) => 4 * crs + 256,
        // An explicit im2col of one image.
        (Pass::Forward, 2) => e * crs * g.oh * g.ow,
        // The filter, transposed.
        (Pass::BackwardData, 1) => e * g.k * crs + 256,
        // An f32 copy of dw to accumulate into, and split-k partial sums.
        (Pass::BackwardFilter, 1) => 4 * g.k * crs,
        (Pass::BackwardFilter, 3) => 4 * g.k * crs * g.n.min(8),
        _ => 0,
    }
}

/// `cudnnConvolutionFwdAlgoPerf_t` (and the backward passes' `...PerfStruct`s, laid out the
/// same): what the `_v7` heuristics return per algorithm.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AlgoPerf {
    /// The algorithm.
    pub algo: u32,
    /// `CUDNN_STATUS_SUCCESS`, or why it cannot run.
    pub status: CudnnStatus,
    /// An estimated time in milliseconds (-1 when refused).
    pub time: f32,
    /// Its workspace in bytes.
    pub memory: usize,
    /// `CUDNN_DETERMINISTIC` (1) or `CUDNN_NON_DETERMINISTIC` (0).
    pub determinism: u32,
    /// The math type it runs with.
    pub math_type: u32,
    /// Reserved.
    pub reserved: [c_int; 3],
}

/// The ranked list the `_v7` heuristics return for `g`.
pub fn heuristics(p: Pass, g: &Geom) -> Vec<AlgoPerf> {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for &algo in p.ranking() {
        let math_type = if p.is_tensor_core(algo) && g.tensor_cores() {
            CUDNN_TENSOR_OP_MATH
        } else if g.math == CUDNN_FMA_MATH {
            CUDNN_FMA_MATH
        } else {
            CUDNN_DEFAULT_MATH
        };
        let mut perf = AlgoPerf {
            algo,
            status: CUDNN_STATUS_SUCCESS,
            time: 0.0,
            memory: 0,
            determinism: p.deterministic(algo) as u32,
            math_type,
            reserved: [0; 3],
        };
        match static_refusal(p, algo, g) {
            Some(s) => {
                perf.status = s;
                perf.time = -1.0;
                refused.push(perf);
            }
            None => {
                perf.memory = workspace(p, algo, g);
                perf.time = 0.1 * (ok.len() + 1) as f32;
                ok.push(perf);
            }
        }
    }
    ok.extend(refused);
    ok
}

/// The descriptors of a pass, by role: the activation tensor x (dx), the filter, the output
/// tensor y (dy).
fn descriptors(
    x: *mut c_void,
    w: *mut c_void,
    c: *mut c_void,
    y: *mut c_void,
    what: &str,
) -> Result<Geom, CudnnStatus> {
    geometry(
        &desc::tensor(x)?,
        &desc::filter(w)?,
        &desc::conv(c)?,
        &desc::tensor(y)?,
        what,
    )
}

unsafe fn query(
    p: Pass,
    h: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    c: *mut c_void,
    y: *mut c_void,
    requested: c_int,
    returned: *mut c_int,
    perf: *mut AlgoPerf,
) -> CudnnStatus {
    let r = (|| {
        handle(h)?;
        if requested <= 0 || returned.is_null() || perf.is_null() {
            return Err(CUDNN_STATUS_BAD_PARAM);
        }
        let g = descriptors(x, w, c, y, p.name())?;
        let list = heuristics(p, &g);
        let n = list.len().min(requested as usize);
        for (i, v) in list.iter().take(n).enumerate() {
            // SAFETY: the caller's array holds `requested` entries.
            unsafe { perf.add(i).write(*v) };
        }
        // SAFETY: non-null out-pointer.
        unsafe { returned.write(n as c_int) };
        Ok(())
    })();
    r.err().unwrap_or(CUDNN_STATUS_SUCCESS)
}

unsafe fn workspace_size(
    p: Pass,
    h: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    c: *mut c_void,
    y: *mut c_void,
    algo: u32,
    size: *mut usize,
) -> CudnnStatus {
    let r = (|| {
        handle(h)?;
        if size.is_null() || algo >= p.count() {
            return Err(CUDNN_STATUS_BAD_PARAM);
        }
        let g = descriptors(x, w, c, y, p.name())?;
        if let Some(s) = static_refusal(p, algo, &g) {
            return Err(s);
        }
        // SAFETY: non-null out-pointer.
        unsafe { size.write(workspace(p, algo, &g)) };
        Ok(())
    })();
    r.err().unwrap_or(CUDNN_STATUS_SUCCESS)
}

/// Bytes spanned by a strided 4-d tensor.
fn extent(dims: [usize; 4], strides: [usize; 4], e: Elem) -> usize {
    (dims
        .iter()
        .zip(strides)
        .map(|(d, s)| (d - 1) * s)
        .sum::<usize>()
        + 1)
        * e.size()
}

fn check(ptr: usize, len: usize, what: &str, name: &str) -> Result<(), CudnnStatus> {
    memory::check_device(ptr, len, &format!("{what} ({name})")).map_err(|(_, msg)| {
        eprintln!("simclr-gpu-emu: {msg}");
        CUDNN_STATUS_EXECUTION_FAILED
    })
}

/// Calls `f(i, idx)` for each element of a strided 4-d tensor in dense (outer, inner, row,
/// column) order: `i` its dense index, `idx` its element offset.
#[inline(always)]
fn for_each_strided(dims: [usize; 4], st: [usize; 4], mut f: impl FnMut(usize, usize)) {
    let mut i = 0;
    for a in 0..dims[0] {
        for b in 0..dims[1] {
            for c in 0..dims[2] {
                let row = a * st[0] + b * st[1] + c * st[2];
                for d in 0..dims[3] {
                    f(i, row + d * st[3]);
                    i += 1;
                }
            }
        }
    }
}

/// A strided 4-d tensor in device memory, read densely in (outer, inner, row, column) order.
///
/// # Safety
/// The extent of `dims`/`strides` at `base` is readable device memory.
unsafe fn gather(
    base: usize,
    dims: [usize; 4],
    st: [usize; 4],
    e: Elem,
    round: InputRounding,
) -> Vec<f64> {
    fn dense(dims: [usize; 4], st: [usize; 4], load: impl Fn(usize) -> f64) -> Vec<f64> {
        // Pushed, not written into a zeroed vector: zeroing megabytes is not free.
        let mut out = Vec::with_capacity(dims.iter().product());
        for_each_strided(dims, st, |_, idx| out.push(load(idx)));
        out
    }
    // One loop per element type, each with its type a constant, so that `load` does not
    // decide the type per element.
    // SAFETY (each closure): inside the extent, per the contract.
    match e {
        Elem::F32 => dense(dims, st, |idx| unsafe {
            numeric::load(base, idx, Elem::F32, round)
        }),
        Elem::F64 => dense(dims, st, |idx| unsafe {
            numeric::load(base, idx, Elem::F64, round)
        }),
        Elem::Bf16 => dense(dims, st, |idx| unsafe {
            numeric::load(base, idx, Elem::Bf16, round)
        }),
    }
}

/// Writes `alpha * acc + beta * old` (old not read when beta is 0) to a strided 4-d tensor.
///
/// # Safety
/// The extent is writable device memory nobody else uses.
unsafe fn scatter(
    base: usize,
    dims: [usize; 4],
    st: [usize; 4],
    e: Elem,
    acc: &[f64],
    alpha: f64,
    beta: f64,
) {
    let value = |i: usize, idx: usize| {
        let mut v = alpha * acc[i];
        if beta != 0.0 {
            // SAFETY: inside the extent.
            v += beta * unsafe { numeric::load(base, idx, e, InputRounding::None) };
        }
        v
    };
    // As in `gather`: the element type a constant in each loop.
    // SAFETY (each arm): inside the extent, which nobody else uses.
    match e {
        Elem::F32 => for_each_strided(dims, st, |i, idx| unsafe {
            numeric::store(base, idx, Elem::F32, value(i, idx))
        }),
        Elem::F64 => for_each_strided(dims, st, |i, idx| unsafe {
            numeric::store(base, idx, Elem::F64, value(i, idx))
        }),
        Elem::Bf16 => for_each_strided(dims, st, |i, idx| unsafe {
            numeric::store(base, idx, Elem::Bf16, value(i, idx))
        }),
    }
}

/// The computation of a pass, on dense NCHW (KCRS) f64 copies.
struct Compute {
    g: Geom,
}

impl Compute {
    /// Every filter position (r, s) with the offset, in an R x S filter plane, of the tap used
    /// there: flipped in `CUDNN_CONVOLUTION` mode.
    fn taps(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let g = &self.g;
        (0..g.r).flat_map(move |r| {
            (0..g.s).map(move |s| {
                let (fr, fs) = if g.flip {
                    (g.r - 1 - r, g.s - 1 - s)
                } else {
                    (r, s)
                };
                (r, s, fr * g.s + fs)
            })
        })
    }

    /// Calls `f(o, i)`, in order, for every output position whose input position at filter
    /// position (r, s) is inside the input (not padding): `o` its offset in an OH x OW plane,
    /// `i` the input's in an H x W plane.
    fn overlap(&self, r: usize, s: usize, mut f: impl FnMut(usize, usize)) {
        let g = &self.g;
        for oh in 0..g.oh {
            for ow in 0..g.ow {
                let ih = oh as i64 * g.sh + r as i64 * g.dh - g.ph;
                let iw = ow as i64 * g.sw + s as i64 * g.dw - g.pw;
                if ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w {
                    f(oh * g.ow + ow, ih as usize * g.w + iw as usize);
                }
            }
        }
    }

    /// Forward: the fast path (module [`im2col`]), or the direct loop where the fast path's
    /// extra products with the padding's zeros could turn a result into NaN.
    fn forward(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        if im2col::zero_products_harmless(&self.g, w) {
            im2col::forward(&self.g, x, w)
        } else {
            self.forward_direct(x, w)
        }
    }

    /// Backward data: always the fast path, which multiplies exactly the direct loop's pairs
    /// (what falls in the padding is dropped after the product, not multiplied by zero).
    fn backward_data(&self, w: &[f64], dy: &[f64]) -> Vec<f64> {
        im2col::backward_data(&self.g, w, dy)
    }

    /// Backward filter: as [`Compute::forward`], dy being the operand met with padding.
    fn backward_filter(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        if im2col::zero_products_harmless(&self.g, dy) {
            im2col::backward_filter(&self.g, x, dy)
        } else {
            self.backward_filter_direct(x, dy)
        }
    }

    /// The definition's loop: for each output plane, each input channel and tap, the
    /// in-bounds products in order. The fallback of the fast path, and its reference in the
    /// unit tests.
    fn forward_direct(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        let g = self.g;
        let (cpg, kpg) = (g.cpg(), g.kpg());
        let (hw, rs) = (g.h * g.w, g.r * g.s);
        let mut y = vec![0.0; g.n * g.k * g.oh * g.ow];
        let work = cpg * rs * g.oh * g.ow;
        numeric::par_items(&mut y, g.oh * g.ow, work, |i, plane| {
            let (n, k) = (i / g.k, i % g.k);
            let grp = k / kpg;
            for c in 0..cpg {
                let xp = &x[(n * g.c + grp * cpg + c) * hw..][..hw];
                let wk = &w[(k * cpg + c) * rs..][..rs];
                for (r, s, t) in self.taps() {
                    let wv = wk[t];
                    self.overlap(r, s, |o, i| plane[o] += wv * xp[i]);
                }
            }
        });
        y
    }

    /// As [`Compute::forward_direct`], for backward data (the unit tests' reference only).
    #[cfg(test)]
    fn backward_data_direct(&self, w: &[f64], dy: &[f64]) -> Vec<f64> {
        let g = self.g;
        let (cpg, kpg) = (g.cpg(), g.kpg());
        let (ohw, rs) = (g.oh * g.ow, g.r * g.s);
        let mut dx = vec![0.0; g.n * g.c * g.h * g.w];
        let work = kpg * rs * ohw;
        numeric::par_items(&mut dx, g.h * g.w, work, |i, plane| {
            let (n, c) = (i / g.c, i % g.c);
            let (grp, cl) = (c / cpg, c % cpg);
            for k in grp * kpg..(grp + 1) * kpg {
                let dyp = &dy[(n * g.k + k) * ohw..][..ohw];
                let wk = &w[(k * cpg + cl) * rs..][..rs];
                for (r, s, t) in self.taps() {
                    let wv = wk[t];
                    self.overlap(r, s, |o, i| plane[i] += wv * dyp[o]);
                }
            }
        });
        dx
    }

    /// As [`Compute::forward_direct`], for backward filter.
    fn backward_filter_direct(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        let g = self.g;
        let (cpg, kpg) = (g.cpg(), g.kpg());
        let (hw, ohw, rs) = (g.h * g.w, g.oh * g.ow, g.r * g.s);
        let mut dw = vec![0.0; g.k * cpg * rs];
        let work = g.n * cpg * rs * ohw;
        numeric::par_items(&mut dw, cpg * rs, work, |k, item| {
            let grp = k / kpg;
            for n in 0..g.n {
                let dyp = &dy[(n * g.k + k) * ohw..][..ohw];
                for c in 0..cpg {
                    let xp = &x[(n * g.c + grp * cpg + c) * hw..][..hw];
                    for (r, s, t) in self.taps() {
                        let mut acc = 0.0;
                        self.overlap(r, s, |o, i| acc += dyp[o] * xp[i]);
                        item[c * rs + t] += acc;
                    }
                }
            }
        });
        dw
    }
}

/// The pointers of a launch, by role (see [`descriptors`]).
struct Ptrs {
    x: usize,
    w: usize,
    y: usize,
}

unsafe fn launch(
    p: Pass,
    h: *mut c_void,
    alpha: *const c_void,
    beta: *const c_void,
    descs: (*mut c_void, *mut c_void, *mut c_void, *mut c_void),
    ptrs: Ptrs,
    algo: u32,
    ws: *mut c_void,
    ws_size: usize,
) -> CudnnStatus {
    let what = p.name();
    let r = (|| {
        let hs = handle(h)?;
        let (xd, wd, cd, yd) = descs;
        if alpha.is_null() || beta.is_null() || ptrs.x == 0 || ptrs.w == 0 || ptrs.y == 0 {
            return fail(
                CUDNN_STATUS_BAD_PARAM,
                what,
                "a null data or scaling pointer",
            );
        }
        if algo >= p.count() {
            return fail(CUDNN_STATUS_BAD_PARAM, what, "an unknown algorithm");
        }
        let g = descriptors(xd, wd, cd, yd, what)?;
        if let Some(s) = static_refusal(p, algo, &g).or_else(|| launch_refusal(p, algo, &g)) {
            return Err(s);
        }
        let need = workspace(p, algo, &g);
        if need > 0 && (ws.is_null() || ws_size < need) {
            return fail(
                CUDNN_STATUS_BAD_PARAM,
                what,
                &format!(
                    "algorithm {algo} needs a {need}-byte workspace; given {ws_size} bytes at \
                     {ws:?}"
                ),
            );
        }
        if ws_size > 0 && !ws.is_null() {
            check(ws as usize, ws_size, what, "workspace")?;
        }
        // Scaling factors are host values: double for DOUBLE_CONFIG, else float (the
        // reference's "Scaling Parameters").
        let scale = if g.elem == Elem::F64 {
            Elem::F64
        } else {
            Elem::F32
        };
        // SAFETY: non-null host pointers of the scaling type.
        let (alpha, beta) = unsafe {
            (
                numeric::load(alpha as usize, 0, scale, InputRounding::None),
                numeric::load(beta as usize, 0, scale, InputRounding::None),
            )
        };
        let xdims = [g.n, g.c, g.h, g.w];
        let ydims = [g.n, g.k, g.oh, g.ow];
        let wdims = [g.k, g.cpg(), g.r, g.s];
        let e = g.elem;
        check(ptrs.x, extent(xdims, g.x_strides, e), what, "x")?;
        check(ptrs.w, extent(wdims, g.w_strides, e), what, "w")?;
        check(ptrs.y, extent(ydims, g.y_strides, e), what, "y")?;
        let round = if p.is_tensor_core(algo) && g.tensor_cores() && g.dtype == CUDNN_DATA_FLOAT {
            InputRounding::Tf32
        } else {
            InputRounding::None
        };
        let ws = ws as usize;
        api::enqueue_on(
            hs.stream as *mut c_void,
            Box::new(move || {
                if need > 0 {
                    // SAFETY: checked to be device memory of at least `need` bytes.
                    unsafe { std::ptr::write_bytes(ws as *mut u8, 0xff, need) };
                }
                let c = Compute { g };
                // SAFETY: every range was checked at the call; the stream runs this alone.
                unsafe {
                    match p {
                        Pass::Forward => {
                            let x = gather(ptrs.x, xdims, g.x_strides, e, round);
                            let w = gather(ptrs.w, wdims, g.w_strides, e, round);
                            let y = c.forward(&x, &w);
                            scatter(ptrs.y, ydims, g.y_strides, e, &y, alpha, beta);
                        }
                        Pass::BackwardData => {
                            let w = gather(ptrs.w, wdims, g.w_strides, e, round);
                            let dy = gather(ptrs.y, ydims, g.y_strides, e, round);
                            let dx = c.backward_data(&w, &dy);
                            scatter(ptrs.x, xdims, g.x_strides, e, &dx, alpha, beta);
                        }
                        Pass::BackwardFilter => {
                            let x = gather(ptrs.x, xdims, g.x_strides, e, round);
                            let dy = gather(ptrs.y, ydims, g.y_strides, e, round);
                            let dw = c.backward_filter(&x, &dy);
                            scatter(ptrs.w, wdims, g.w_strides, e, &dw, alpha, beta);
                        }
                    }
                }
                Ok(())
            }),
        )
        .map_err(|code| {
            eprintln!("simclr-gpu-emu: {what}: the stream cannot take work (CUresult {code})");
            CUDNN_STATUS_EXECUTION_FAILED
        })
    })();
    r.err().unwrap_or(CUDNN_STATUS_SUCCESS)
}

/// `cudnnGetConvolutionForwardAlgorithm_v7`: every forward algorithm, ranked (see the module
/// documentation), at most `requested`.
///
/// # Safety
/// `perf` holds `requested` entries; `returned` is writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionForwardAlgorithm_v7(
    h: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    conv: *mut c_void,
    y: *mut c_void,
    requested: c_int,
    returned: *mut c_int,
    perf: *mut AlgoPerf,
) -> CudnnStatus {
    unsafe { query(Pass::Forward, h, x, w, conv, y, requested, returned, perf) }
}

/// `cudnnGetConvolutionBackwardDataAlgorithm_v7`.
///
/// # Safety
/// As for the forward form.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataAlgorithm_v7(
    h: *mut c_void,
    w: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dx: *mut c_void,
    requested: c_int,
    returned: *mut c_int,
    perf: *mut AlgoPerf,
) -> CudnnStatus {
    unsafe {
        query(
            Pass::BackwardData,
            h,
            dx,
            w,
            conv,
            dy,
            requested,
            returned,
            perf,
        )
    }
}

/// `cudnnGetConvolutionBackwardFilterAlgorithm_v7`.
///
/// # Safety
/// As for the forward form.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterAlgorithm_v7(
    h: *mut c_void,
    x: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dw: *mut c_void,
    requested: c_int,
    returned: *mut c_int,
    perf: *mut AlgoPerf,
) -> CudnnStatus {
    unsafe {
        query(
            Pass::BackwardFilter,
            h,
            x,
            dw,
            conv,
            dy,
            requested,
            returned,
            perf,
        )
    }
}

unsafe fn max_count(h: *mut c_void, p: Pass, count: *mut c_int) -> CudnnStatus {
    if handle(h).is_err() || count.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    // SAFETY: non-null out-pointer.
    unsafe { count.write(p.count() as c_int) };
    CUDNN_STATUS_SUCCESS
}

/// `cudnnGetConvolutionForwardAlgorithmMaxCount`.
///
/// # Safety
/// `count` is writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionForwardAlgorithmMaxCount(
    h: *mut c_void,
    count: *mut c_int,
) -> CudnnStatus {
    unsafe { max_count(h, Pass::Forward, count) }
}

/// `cudnnGetConvolutionBackwardDataAlgorithmMaxCount`.
///
/// # Safety
/// `count` is writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataAlgorithmMaxCount(
    h: *mut c_void,
    count: *mut c_int,
) -> CudnnStatus {
    unsafe { max_count(h, Pass::BackwardData, count) }
}

/// `cudnnGetConvolutionBackwardFilterAlgorithmMaxCount`.
///
/// # Safety
/// `count` is writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(
    h: *mut c_void,
    count: *mut c_int,
) -> CudnnStatus {
    unsafe { max_count(h, Pass::BackwardFilter, count) }
}

/// `cudnnGetConvolutionForwardWorkspaceSize`: the algorithm's workspace, or its refusal
/// (rules 2-4).
///
/// # Safety
/// `size` is writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionForwardWorkspaceSize(
    h: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    conv: *mut c_void,
    y: *mut c_void,
    algo: u32,
    size: *mut usize,
) -> CudnnStatus {
    unsafe { workspace_size(Pass::Forward, h, x, w, conv, y, algo, size) }
}

/// `cudnnGetConvolutionBackwardDataWorkspaceSize`.
///
/// # Safety
/// `size` is writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataWorkspaceSize(
    h: *mut c_void,
    w: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dx: *mut c_void,
    algo: u32,
    size: *mut usize,
) -> CudnnStatus {
    unsafe { workspace_size(Pass::BackwardData, h, dx, w, conv, dy, algo, size) }
}

/// `cudnnGetConvolutionBackwardFilterWorkspaceSize`.
///
/// # Safety
/// `size` is writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterWorkspaceSize(
    h: *mut c_void,
    x: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dw: *mut c_void,
    algo: u32,
    size: *mut usize,
) -> CudnnStatus {
    unsafe { workspace_size(Pass::BackwardFilter, h, x, dw, conv, dy, algo, size) }
}

/// `cudnnConvolutionForward`: `y = alpha conv(x, w) + beta y`.
///
/// # Safety
/// Host scaling factors; device tensors as their descriptors describe them; the workspace of
/// `ws_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn cudnnConvolutionForward(
    h: *mut c_void,
    alpha: *const c_void,
    x_desc: *mut c_void,
    x: *const c_void,
    w_desc: *mut c_void,
    w: *const c_void,
    conv: *mut c_void,
    algo: u32,
    ws: *mut c_void,
    ws_size: usize,
    beta: *const c_void,
    y_desc: *mut c_void,
    y: *mut c_void,
) -> CudnnStatus {
    let ptrs = Ptrs {
        x: x as usize,
        w: w as usize,
        y: y as usize,
    };
    unsafe {
        launch(
            Pass::Forward,
            h,
            alpha,
            beta,
            (x_desc, w_desc, conv, y_desc),
            ptrs,
            algo,
            ws,
            ws_size,
        )
    }
}

/// `cudnnConvolutionBackwardData`: `dx = alpha conv_transpose(dy, w) + beta dx`.
///
/// # Safety
/// As for `cudnnConvolutionForward`.
#[no_mangle]
pub unsafe extern "C" fn cudnnConvolutionBackwardData(
    h: *mut c_void,
    alpha: *const c_void,
    w_desc: *mut c_void,
    w: *const c_void,
    dy_desc: *mut c_void,
    dy: *const c_void,
    conv: *mut c_void,
    algo: u32,
    ws: *mut c_void,
    ws_size: usize,
    beta: *const c_void,
    dx_desc: *mut c_void,
    dx: *mut c_void,
) -> CudnnStatus {
    let ptrs = Ptrs {
        x: dx as usize,
        w: w as usize,
        y: dy as usize,
    };
    unsafe {
        launch(
            Pass::BackwardData,
            h,
            alpha,
            beta,
            (dx_desc, w_desc, conv, dy_desc),
            ptrs,
            algo,
            ws,
            ws_size,
        )
    }
}

/// `cudnnConvolutionBackwardFilter`: `dw = alpha dL/dw + beta dw`.
///
/// # Safety
/// As for `cudnnConvolutionForward`.
#[no_mangle]
pub unsafe extern "C" fn cudnnConvolutionBackwardFilter(
    h: *mut c_void,
    alpha: *const c_void,
    x_desc: *mut c_void,
    x: *const c_void,
    dy_desc: *mut c_void,
    dy: *const c_void,
    conv: *mut c_void,
    algo: u32,
    ws: *mut c_void,
    ws_size: usize,
    beta: *const c_void,
    dw_desc: *mut c_void,
    dw: *mut c_void,
) -> CudnnStatus {
    let ptrs = Ptrs {
        x: x as usize,
        w: dw as usize,
        y: dy as usize,
    };
    unsafe {
        launch(
            Pass::BackwardFilter,
            h,
            alpha,
            beta,
            (x_desc, dw_desc, conv, dy_desc),
            ptrs,
            algo,
            ws,
            ws_size,
        )
    }
}

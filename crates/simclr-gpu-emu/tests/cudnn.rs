//! Tests of the emulated cuDNN (`src/cudnn/`), through its C ABI, against convolutions written
//! here from the definition in f64: `y[n,k,oh,ow] = sum_{c,r,s} x[n, g*C/G + c, oh*u - pad +
//! r*dil, ...] * w[k, c, r', s']` (r' = r in cross-correlation, R-1-r in convolution mode), and
//! the backward passes as the sums of the same products over the other indices.
#![allow(clippy::too_many_arguments)]

mod common;

use std::ptr::null_mut;

use common::*;
use simclr_gpu_emu::cudnn::conv::*;
use simclr_gpu_emu::cudnn::desc::*;
use simclr_gpu_emu::cudnn::*;

type P = *mut std::ffi::c_void;

fn handle() -> P {
    init_context();
    let mut h = null_mut();
    // SAFETY: a valid out-pointer.
    unsafe { assert_eq!(cudnnCreate(&mut h), CUDNN_STATUS_SUCCESS) };
    h
}

/// A packed 4-d tensor descriptor of logical (N, C, H, W) dims `d`.
fn tensor(format: u32, dtype: u32, d: [usize; 4]) -> P {
    let [n, c, h, w] = d.map(|v| v as i32);
    let mut t = null_mut();
    // SAFETY: valid out-pointer.
    unsafe { assert_eq!(cudnnCreateTensorDescriptor(&mut t), CUDNN_STATUS_SUCCESS) };
    assert_eq!(
        cudnnSetTensor4dDescriptor(t, format, dtype, n, c, h, w),
        CUDNN_STATUS_SUCCESS
    );
    t
}

/// A filter descriptor of logical (K, C, R, S) dims `d`.
fn filter(format: u32, dtype: u32, d: [usize; 4]) -> P {
    let [k, c, r, s] = d.map(|v| v as i32);
    let mut f = null_mut();
    // SAFETY: valid out-pointer.
    unsafe { assert_eq!(cudnnCreateFilterDescriptor(&mut f), CUDNN_STATUS_SUCCESS) };
    assert_eq!(
        cudnnSetFilter4dDescriptor(f, dtype, format, k, c, r, s),
        CUDNN_STATUS_SUCCESS
    );
    f
}

/// The `_v7` heuristics' forward ranking, 8 entries requested: the status, the entries and
/// how many were written.
fn forward_algos(h: P, x: P, w: P, cd: P, y: P) -> (CudnnStatus, [AlgoPerf; 8], i32) {
    let mut perf = [AlgoPerf::default(); 8];
    let mut count = 0;
    // SAFETY: room for the 8 entries requested; valid out-pointers.
    let s = unsafe {
        cudnnGetConvolutionForwardAlgorithm_v7(h, x, w, cd, y, 8, &mut count, perf.as_mut_ptr())
    };
    (s, perf, count)
}

/// A descriptor and the device buffer it describes.
type Buf = (P, u64);

/// A pass's host scaling factors (`alpha`, `beta`) and workspace (address, bytes): every
/// configuration these tests use scales in f32.
#[derive(Clone, Copy)]
struct Call {
    h: P,
    alpha: f32,
    beta: f32,
    ws: u64,
    ws_size: usize,
}

impl Call {
    /// `y = alpha conv(x, w) + beta y`.
    fn forward(&self, x: Buf, w: Buf, cd: P, algo: u32, y: Buf) -> CudnnStatus {
        // SAFETY: host scalars; buffers as their descriptors describe them (or refused first).
        unsafe {
            cudnnConvolutionForward(
                self.h,
                &self.alpha as *const f32 as _,
                x.0,
                x.1 as _,
                w.0,
                w.1 as _,
                cd,
                algo,
                self.ws as _,
                self.ws_size,
                &self.beta as *const f32 as _,
                y.0,
                y.1 as _,
            )
        }
    }

    /// `dx = alpha conv_transpose(dy, w) + beta dx`.
    fn backward_data(&self, w: Buf, dy: Buf, cd: P, algo: u32, dx: Buf) -> CudnnStatus {
        // SAFETY: as for `forward`.
        unsafe {
            cudnnConvolutionBackwardData(
                self.h,
                &self.alpha as *const f32 as _,
                w.0,
                w.1 as _,
                dy.0,
                dy.1 as _,
                cd,
                algo,
                self.ws as _,
                self.ws_size,
                &self.beta as *const f32 as _,
                dx.0,
                dx.1 as _,
            )
        }
    }

    /// `dw = alpha dL/dw + beta dw`.
    fn backward_filter(&self, x: Buf, dy: Buf, cd: P, algo: u32, dw: Buf) -> CudnnStatus {
        // SAFETY: as for `forward`.
        unsafe {
            cudnnConvolutionBackwardFilter(
                self.h,
                &self.alpha as *const f32 as _,
                x.0,
                x.1 as _,
                dy.0,
                dy.1 as _,
                cd,
                algo,
                self.ws as _,
                self.ws_size,
                &self.beta as *const f32 as _,
                dw.0,
                dw.1 as _,
            )
        }
    }
}

#[derive(Clone, Copy)]
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r: usize,
    s: usize,
    pad: usize,
    stride: usize,
    dil: usize,
    groups: usize,
    flip: bool,
}

impl Geo {
    fn oh(&self) -> usize {
        (self.h + 2 * self.pad - (self.r - 1) * self.dil - 1) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.pad - (self.s - 1) * self.dil - 1) / self.stride + 1
    }
    fn conv(&self, math: u32, compute: u32) -> P {
        let mut c = null_mut();
        // SAFETY: valid out-pointer.
        unsafe {
            assert_eq!(
                cudnnCreateConvolutionDescriptor(&mut c),
                CUDNN_STATUS_SUCCESS
            )
        };
        let (p, u, d) = (self.pad as i32, self.stride as i32, self.dil as i32);
        let mode = if self.flip {
            CUDNN_CONVOLUTION
        } else {
            CUDNN_CROSS_CORRELATION
        };
        assert_eq!(
            cudnnSetConvolution2dDescriptor(c, p, p, u, u, d, d, mode, compute),
            CUDNN_STATUS_SUCCESS
        );
        assert_eq!(cudnnSetConvolutionMathType(c, math), CUDNN_STATUS_SUCCESS);
        assert_eq!(
            cudnnSetConvolutionGroupCount(c, self.groups as i32),
            CUDNN_STATUS_SUCCESS
        );
        c
    }

    /// Every (n, k, oh, ow, c_in, c_local, r', s', ih, iw) term of the convolution, as the
    /// definition has it: `f(y index, x index, w index)` in logical NCHW / KCRS order.
    fn terms(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (cpg, kpg) = (self.c / self.groups, self.k / self.groups);
        let (oh, ow) = (self.oh(), self.ow());
        for n in 0..self.n {
            for k in 0..self.k {
                let g = k / kpg;
                for y in 0..oh {
                    for x in 0..ow {
                        for cl in 0..cpg {
                            let c = g * cpg + cl;
                            for r in 0..self.r {
                                for s in 0..self.s {
                                    let ih =
                                        (y * self.stride + r * self.dil) as i64 - self.pad as i64;
                                    let iw =
                                        (x * self.stride + s * self.dil) as i64 - self.pad as i64;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= self.h as i64
                                        || iw >= self.w as i64
                                    {
                                        continue;
                                    }
                                    let (fr, fs) = if self.flip {
                                        (self.r - 1 - r, self.s - 1 - s)
                                    } else {
                                        (r, s)
                                    };
                                    let yi = ((n * self.k + k) * oh + y) * ow + x;
                                    let xi = ((n * self.c + c) * self.h + ih as usize) * self.w
                                        + iw as usize;
                                    let wi = ((k * cpg + cl) * self.r + fr) * self.s + fs;
                                    f(yi, xi, wi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    /// x's logical dims: (N, C, H, W).
    fn x_dims(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
    /// y's logical dims: (N, K, OH, OW).
    fn y_dims(&self) -> [usize; 4] {
        [self.n, self.k, self.oh(), self.ow()]
    }
    /// w's logical dims: (K, C per group, R, S).
    fn w_dims(&self) -> [usize; 4] {
        [self.k, self.c / self.groups, self.r, self.s]
    }
    fn x_len(&self) -> usize {
        self.x_dims().iter().product()
    }
    fn w_len(&self) -> usize {
        self.w_dims().iter().product()
    }
    fn y_len(&self) -> usize {
        self.y_dims().iter().product()
    }
}

/// Each logical NCHW index of dims `d`, with its index in `format`'s layout (NHWC: channels
/// innermost).
fn positions(d: [usize; 4], format: u32) -> impl Iterator<Item = (usize, usize)> {
    let nhwc = format != CUDNN_TENSOR_NCHW;
    (0..d.iter().product()).map(move |l| {
        let (a, b, c, e) = (
            l / (d[1] * d[2] * d[3]),
            l / (d[2] * d[3]) % d[1],
            l / d[3] % d[2],
            l % d[3],
        );
        (
            l,
            if nhwc {
                ((a * d[2] + c) * d[3] + e) * d[1] + b
            } else {
                l
            },
        )
    })
}

/// Logical NCHW data laid out in `format`.
fn layout<T: Copy + Default>(v: &[T], d: [usize; 4], format: u32) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for (l, p) in positions(d, format) {
        out[p] = v[l];
    }
    out
}

/// The inverse of [`layout`].
fn unlayout<T: Copy + Default>(v: &[T], d: [usize; 4], format: u32) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for (l, p) in positions(d, format) {
        out[l] = v[p];
    }
    out
}

/// The three passes of `g` in f32, layout `format`, checked against the definition.
fn check_f32_passes(g: Geo, format: u32, math: u32, algos: (u32, u32, u32)) {
    let h = handle();
    let mut rng = Lcg(g.n as u64 * 31 + g.c as u64);
    let (x, w, dy) = (rng.vec(g.x_len()), rng.vec(g.w_len()), rng.vec(g.y_len()));
    let (xd, yd, wd) = (g.x_dims(), g.y_dims(), g.w_dims());
    let (tx, ty) = (
        tensor(format, CUDNN_DATA_FLOAT, xd),
        tensor(format, CUDNN_DATA_FLOAT, yd),
    );
    let tw = filter(format, CUDNN_DATA_FLOAT, wd);
    let cd = g.conv(math, CUDNN_DATA_FLOAT);
    let (px, pw, pdy) = (
        upload(&layout(&x, xd, format)),
        upload(&layout(&w, wd, format)),
        upload(&layout(&dy, yd, format)),
    );
    let (mut fy, mut fdx, mut fdw) = (
        vec![0.0; g.y_len()],
        vec![0.0; g.x_len()],
        vec![0.0; g.w_len()],
    );
    g.terms(|yi, xi, wi| {
        fy[yi] += x[xi] as f64 * w[wi] as f64;
        fdx[xi] += dy[yi] as f64 * w[wi] as f64;
        fdw[wi] += dy[yi] as f64 * x[xi] as f64;
    });
    let call = Call {
        h,
        alpha: 1.0,
        beta: 0.0,
        ws: alloc_bytes(1 << 20),
        ws_size: 1 << 20,
    };
    let got = |p: u64, d: [usize; 4]| unlayout(&download(p, d.iter().product()), d, format);
    // Forward, beta 0 into NaN-filled y.
    let py = alloc::<f32>(g.y_len());
    let s = call.forward((tx, px), (tw, pw), cd, algos.0, (ty, py));
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    assert_close(&got(py, yd), &fy, 1e-5, "forward");
    // Forward again, alpha 2 and beta 0.5 over that result.
    let scaled = Call {
        alpha: 2.0,
        beta: 0.5,
        ..call
    };
    let s = scaled.forward((tx, px), (tw, pw), cd, algos.0, (ty, py));
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    let want: Vec<f64> = fy.iter().map(|v| 2.5 * v).collect();
    assert_close(&got(py, yd), &want, 1e-5, "forward alpha beta");
    let pdx = alloc::<f32>(g.x_len());
    let s = call.backward_data((tw, pw), (ty, pdy), cd, algos.1, (tx, pdx));
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    assert_close(&got(pdx, xd), &fdx, 1e-5, "backward data");
    let pdw = alloc::<f32>(g.w_len());
    let s = call.backward_filter((tx, px), (ty, pdy), cd, algos.2, (tw, pdw));
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    assert_close(&got(pdw, wd), &fdw, 1e-5, "backward filter");
    // SAFETY: live handle.
    unsafe { assert_eq!(cudnnDestroy(h), CUDNN_STATUS_SUCCESS) };
}

#[test]
fn f32_nhwc_padded_strided_dilated() {
    let g = Geo {
        n: 2,
        c: 3,
        h: 9,
        w: 8,
        k: 4,
        r: 3,
        s: 3,
        pad: 2,
        stride: 2,
        dil: 2,
        groups: 1,
        flip: false,
    };
    check_f32_passes(g, CUDNN_TENSOR_NHWC, CUDNN_FMA_MATH, (1, 1, 1));
}

#[test]
fn f32_nchw_convolution_mode_grouped() {
    let g = Geo {
        n: 2,
        c: 4,
        h: 6,
        w: 7,
        k: 6,
        r: 2,
        s: 3,
        pad: 1,
        stride: 1,
        dil: 1,
        groups: 2,
        flip: true,
    };
    check_f32_passes(g, CUDNN_TENSOR_NCHW, CUDNN_FMA_MATH, (0, 0, 0));
}

#[test]
fn f32_nchw_fft_and_winograd_where_they_apply() {
    let g = Geo {
        n: 1,
        c: 2,
        h: 8,
        w: 8,
        k: 3,
        r: 3,
        s: 3,
        pad: 1,
        stride: 1,
        dil: 1,
        groups: 1,
        flip: false,
    };
    // FFT (forward 4, backward data 2, backward filter 2) and Winograd (6, 4, 5).
    check_f32_passes(g, CUDNN_TENSOR_NCHW, CUDNN_FMA_MATH, (4, 2, 2));
    check_f32_passes(g, CUDNN_TENSOR_NCHW, CUDNN_FMA_MATH, (6, 4, 5));
}

#[test]
fn tf32_for_tensor_core_algorithms_under_default_math_only() {
    let g = Geo {
        n: 1,
        c: 8,
        h: 5,
        w: 5,
        k: 8,
        r: 3,
        s: 3,
        pad: 1,
        stride: 1,
        dil: 1,
        groups: 1,
        flip: false,
    };
    let h = handle();
    let mut rng = Lcg(5);
    let (x, w) = (rng.vec(g.x_len()), rng.vec(g.w_len()));
    let (mut exact, mut rounded) = (vec![0.0; g.y_len()], vec![0.0; g.y_len()]);
    g.terms(|yi, xi, wi| {
        exact[yi] += x[xi] as f64 * w[wi] as f64;
        rounded[yi] += tf32(x[xi]) as f64 * tf32(w[wi]) as f64;
    });
    let (xd, wd) = (g.x_dims(), g.w_dims());
    let (tx, tw) = (
        tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, xd),
        filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, wd),
    );
    let (px, pw) = (
        upload(&layout(&x, xd, CUDNN_TENSOR_NHWC)),
        upload(&layout(&w, wd, CUDNN_TENSOR_NHWC)),
    );
    let call = Call {
        h,
        alpha: 1.0,
        beta: 0.0,
        ws: alloc_bytes(1 << 16),
        ws_size: 1 << 16,
    };
    for (math, algo, want) in [
        (CUDNN_DEFAULT_MATH, 1, &rounded),
        (CUDNN_FMA_MATH, 1, &exact),
        (CUDNN_DEFAULT_MATH, 0, &exact),
    ] {
        let cd = g.conv(math, CUDNN_DATA_FLOAT);
        // y has x's shape here: 8 channels in and out, same padding.
        let (s, perf, count) = forward_algos(h, tx, tw, cd, tx);
        assert_eq!((s, count), (CUDNN_STATUS_SUCCESS, 8));
        assert_eq!(perf[0].algo, 1, "IMPLICIT_PRECOMP_GEMM first");
        let tc = if math == CUDNN_DEFAULT_MATH {
            CUDNN_TENSOR_OP_MATH
        } else {
            CUDNN_FMA_MATH
        };
        assert_eq!(perf[0].math_type, tc);
        let py = alloc::<f32>(g.y_len());
        let s = call.forward((tx, px), (tw, pw), cd, algo, (tx, py));
        assert_eq!(s, CUDNN_STATUS_SUCCESS);
        let got = unlayout(&download(py, g.y_len()), g.y_dims(), CUDNN_TENSOR_NHWC);
        assert_close(&got, want, 1e-6, "tf32");
    }
    // The TF32 result is not the exact one: the rounding happened.
    assert!(rounded
        .iter()
        .zip(&exact)
        .any(|(a, b)| (a - b).abs() > 1e-5));
}

#[test]
fn bf16_stem_refuses_the_tensor_core_algorithms_the_heuristics_rank_first() {
    // The ImageNet stem: 3 input channels, bf16 NHWC, f32 compute, tensor-op math.
    let g = Geo {
        n: 1,
        c: 3,
        h: 11,
        w: 11,
        k: 8,
        r: 7,
        s: 7,
        pad: 3,
        stride: 2,
        dil: 1,
        groups: 1,
        flip: false,
    };
    let h = handle();
    let mut rng = Lcg(9);
    let x: Vec<u16> = rng.vec(g.x_len()).iter().map(|&v| bf16(v)).collect();
    let w: Vec<u16> = rng.vec(g.w_len()).iter().map(|&v| bf16(v)).collect();
    let xf: Vec<f32> = x.iter().map(|&v| from_bf16(v)).collect();
    let wf: Vec<f32> = w.iter().map(|&v| from_bf16(v)).collect();
    let mut want = vec![0.0; g.y_len()];
    g.terms(|yi, xi, wi| want[yi] += xf[xi] as f64 * wf[wi] as f64);
    let (xd, yd, wd) = (g.x_dims(), g.y_dims(), g.w_dims());
    let tx = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, xd);
    let ty = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, yd);
    let tw = filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, wd);
    let cd = g.conv(CUDNN_TENSOR_OP_MATH, CUDNN_DATA_FLOAT);
    let (px, pw) = (
        upload(&layout(&x, xd, CUDNN_TENSOR_NHWC)),
        upload(&layout(&w, wd, CUDNN_TENSOR_NHWC)),
    );
    let (s, perf, _) = forward_algos(h, tx, tw, cd, ty);
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    assert_eq!((perf[0].algo, perf[0].status), (1, CUDNN_STATUS_SUCCESS));
    assert_eq!(perf[0].math_type, CUDNN_TENSOR_OP_MATH);
    let mut need = 0usize;
    // SAFETY: valid out-pointer.
    unsafe {
        assert_eq!(
            cudnnGetConvolutionForwardWorkspaceSize(h, tx, tw, cd, ty, 1, &mut need),
            CUDNN_STATUS_SUCCESS
        );
    }
    assert!(need > 0);
    let call = Call {
        h,
        alpha: 1.0,
        beta: 0.0,
        ws: alloc_bytes(1 << 20),
        ws_size: 1 << 20,
    };
    let py = alloc::<u16>(g.y_len());
    let s = call.forward((tx, px), (tw, pw), cd, perf[0].algo, (ty, py));
    assert!(
        (3000..4000).contains(&s),
        "refused in the NOT_SUPPORTED family, got {s}"
    );
    // The next algorithm runs, with f32 accumulation and one rounding to bf16.
    let s = call.forward((tx, px), (tw, pw), cd, 0, (ty, py));
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    let got: Vec<f32> = download::<u16>(py, g.y_len())
        .iter()
        .map(|&b| from_bf16(b))
        .collect();
    let got_nchw = unlayout(&got, yd, CUDNN_TENSOR_NHWC);
    assert_close(&got_nchw, &want, 1.0 / 128.0, "bf16 stem forward");
    // The backward passes' tensor-core algorithms (ALGO_1) are refused the same way (before
    // any data is read).
    let pdy = alloc::<u16>(g.y_len());
    let pdx = alloc::<u16>(g.x_len());
    let pdw = alloc::<u16>(g.w_len());
    let s = call.backward_data((tw, pw), (ty, pdy), cd, 1, (tx, pdx));
    assert!((3000..4000).contains(&s));
    let s = call.backward_filter((tx, px), (ty, pdy), cd, 1, (tw, pdw));
    assert!((3000..4000).contains(&s));
    // With 8 input channels the same configuration runs on algorithm 1.
    let tx8 = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [1, 8, 11, 11]);
    let tw8 = filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [8, 8, 7, 7]);
    let (px8, pw8) = (
        upload(&vec![0x3f80u16; 8 * 121]),
        upload(&vec![0x3f80u16; 8 * 8 * 49]),
    );
    let s = call.forward((tx8, px8), (tw8, pw8), cd, 1, (ty, py));
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    // SAFETY: a live handle.
    unsafe { cudnnDestroy(h) };
}

#[test]
fn fft_is_refused_for_strided_convolutions_and_workspaces_are_checked() {
    let h = handle();
    let g = Geo {
        n: 1,
        c: 2,
        h: 8,
        w: 8,
        k: 2,
        r: 3,
        s: 3,
        pad: 1,
        stride: 2,
        dil: 1,
        groups: 1,
        flip: false,
    };
    let tx = tensor(CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, g.x_dims());
    let ty = tensor(CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, g.y_dims());
    let tw = filter(CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, g.w_dims());
    let cd = g.conv(CUDNN_FMA_MATH, CUDNN_DATA_FLOAT);
    let (s, perf, _) = forward_algos(h, tx, tw, cd, ty);
    assert_eq!(s, CUDNN_STATUS_SUCCESS);
    let fft: Vec<_> = perf.iter().filter(|p| p.algo == 4 || p.algo == 5).collect();
    assert!(fft.iter().all(|p| p.status == CUDNN_STATUS_NOT_SUPPORTED));
    // Refused entries come after every supported one.
    let first_refused = perf.iter().position(|p| p.status != 0).unwrap();
    assert!(perf[first_refused..].iter().all(|p| p.status != 0));
    let mut need = 0;
    let mut count = 0;
    let mut dperf = perf;
    // SAFETY: valid out-pointers; room for the 6 entries requested.
    unsafe {
        assert_eq!(
            cudnnGetConvolutionForwardWorkspaceSize(h, tx, tw, cd, ty, 4, &mut need),
            CUDNN_STATUS_NOT_SUPPORTED
        );
        assert_eq!(
            cudnnGetConvolutionBackwardDataAlgorithm_v7(
                h,
                tw,
                ty,
                cd,
                tx,
                6,
                &mut count,
                dperf.as_mut_ptr()
            ),
            CUDNN_STATUS_SUCCESS
        );
    }
    assert_eq!(count, 6);
    assert!(dperf[..6]
        .iter()
        .filter(|p| p.algo == 2 || p.algo == 3)
        .all(|p| p.status == CUDNN_STATUS_NOT_SUPPORTED));
    // Launching FFT anyway: refused, nothing run.
    let x = (tx, upload(&vec![0.0f32; g.x_len()]));
    let w = (tw, upload(&vec![0.0f32; g.w_len()]));
    let y = (ty, alloc::<f32>(g.y_len()));
    let ws = alloc_bytes(1 << 20);
    let call = |algo: u32, ws_size: usize| {
        let c = Call {
            h,
            alpha: 1.0,
            beta: 0.0,
            ws,
            ws_size,
        };
        c.forward(x, w, cd, algo, y)
    };
    assert_eq!(call(4, 1 << 20), CUDNN_STATUS_NOT_SUPPORTED);
    // GEMM (2) needs a workspace: too small a one is BAD_PARAM, enough runs.
    // SAFETY: a valid out-pointer.
    unsafe {
        assert_eq!(
            cudnnGetConvolutionForwardWorkspaceSize(h, tx, tw, cd, ty, 2, &mut need),
            CUDNN_STATUS_SUCCESS
        );
    }
    assert!(need > 0);
    assert_eq!(call(2, need - 1), CUDNN_STATUS_BAD_PARAM);
    assert_eq!(call(2, need), CUDNN_STATUS_SUCCESS);
    // A workspace size larger than the allocation: outside device memory.
    assert_eq!(call(2, (1 << 20) + 1), CUDNN_STATUS_EXECUTION_FAILED);
    // SAFETY: a live handle.
    unsafe { assert_eq!(cudnnDestroy(h), CUDNN_STATUS_SUCCESS) };
}

#[test]
fn descriptors_are_checked_as_cudnn_checks_them() {
    let h = handle();
    let mut t = null_mut();
    let mut f = null_mut();
    let mut c = null_mut();
    // SAFETY: valid out-pointers, arrays of the lengths given.
    unsafe {
        cudnnCreateTensorDescriptor(&mut t);
        cudnnCreateFilterDescriptor(&mut f);
        cudnnCreateConvolutionDescriptor(&mut c);
        assert_eq!(
            cudnnSetTensor4dDescriptor(t, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, 1, 0, 4, 4),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetTensor4dDescriptor(t, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, 1, -2, 4, 4),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetTensor4dDescriptor(t, 7, CUDNN_DATA_FLOAT, 1, 2, 4, 4),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetTensor4dDescriptor(t, CUDNN_TENSOR_NCHW, 99, 1, 2, 4, 4),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetTensor4dDescriptor(t, CUDNN_TENSOR_NCHW_VECT_C, CUDNN_DATA_FLOAT, 1, 4, 4, 4),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetTensor4dDescriptor(t, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, 65536, 65536, 1, 1),
            CUDNN_STATUS_NOT_SUPPORTED
        );
        assert_eq!(
            cudnnSetTensor4dDescriptorEx(t, CUDNN_DATA_FLOAT, 1, 2, 4, 4, 32, 16, -4, 1),
            CUDNN_STATUS_BAD_PARAM
        );
        let d3 = [1, 2, 3];
        assert_eq!(
            cudnnSetTensorNdDescriptor(t, CUDNN_DATA_FLOAT, 3, d3.as_ptr(), d3.as_ptr()),
            CUDNN_STATUS_NOT_SUPPORTED
        );
        assert_eq!(
            cudnnSetFilter4dDescriptor(f, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, 4, 0, 3, 3),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(
                c,
                -1,
                0,
                1,
                1,
                1,
                1,
                CUDNN_CROSS_CORRELATION,
                CUDNN_DATA_FLOAT
            ),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(
                c,
                0,
                0,
                0,
                1,
                1,
                1,
                CUDNN_CROSS_CORRELATION,
                CUDNN_DATA_FLOAT
            ),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(
                c,
                0,
                0,
                1,
                1,
                0,
                1,
                CUDNN_CROSS_CORRELATION,
                CUDNN_DATA_FLOAT
            ),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(c, 0, 0, 1, 1, 1, 1, 5, CUDNN_DATA_FLOAT),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            cudnnSetConvolutionMathType(c, 1),
            CUDNN_STATUS_BAD_PARAM,
            "not set yet"
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(
                c,
                1,
                1,
                2,
                2,
                1,
                1,
                CUDNN_CROSS_CORRELATION,
                CUDNN_DATA_FLOAT
            ),
            CUDNN_STATUS_SUCCESS
        );
        assert_eq!(cudnnSetConvolutionMathType(c, 9), CUDNN_STATUS_BAD_PARAM);
        assert_eq!(cudnnSetConvolutionGroupCount(c, 0), CUDNN_STATUS_BAD_PARAM);
        // Output dims: 1 + (9 + 2 - 3) / 2 = 5.
        let tx = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [2, 4, 9, 9]);
        let tw = filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [6, 4, 3, 3]);
        let (mut n, mut k, mut oh, mut ow) = (0, 0, 0, 0);
        assert_eq!(
            cudnnGetConvolution2dForwardOutputDim(c, tx, tw, &mut n, &mut k, &mut oh, &mut ow),
            CUDNN_STATUS_SUCCESS
        );
        assert_eq!((n, k, oh, ow), (2, 6, 5, 5));
        let q = |x: P, w: P, y: P| forward_algos(h, x, w, c, y).0;
        let good_y = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [2, 6, 5, 5]);
        assert_eq!(q(tx, tw, good_y), CUDNN_STATUS_SUCCESS);
        // Output spatial dims inconsistent with the geometry: NOT_SUPPORTED, as documented.
        assert_eq!(
            q(
                tx,
                tw,
                tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [2, 6, 4, 5])
            ),
            CUDNN_STATUS_NOT_SUPPORTED
        );
        // Output channels or batch not the filter's / input's: BAD_PARAM.
        assert_eq!(
            q(
                tx,
                tw,
                tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [2, 5, 5, 5])
            ),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(
            q(
                tx,
                tw,
                tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [1, 6, 5, 5])
            ),
            CUDNN_STATUS_BAD_PARAM
        );
        // Input channels not the filter's: BAD_PARAM.
        assert_eq!(
            q(
                tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [2, 3, 9, 9]),
                tw,
                good_y
            ),
            CUDNN_STATUS_BAD_PARAM
        );
        // Mismatched data types between x, w and y: BAD_PARAM.
        assert_eq!(
            q(
                tx,
                filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [6, 4, 3, 3]),
                good_y
            ),
            CUDNN_STATUS_BAD_PARAM
        );
        // bf16 tensors with a bf16 compute type: no such configuration (NOT_SUPPORTED family).
        let bx = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [2, 4, 9, 9]);
        let bw = filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [6, 4, 3, 3]);
        let by = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [2, 6, 5, 5]);
        let mut cb = null_mut();
        cudnnCreateConvolutionDescriptor(&mut cb);
        cudnnSetConvolution2dDescriptor(
            cb,
            1,
            1,
            2,
            2,
            1,
            1,
            CUDNN_CROSS_CORRELATION,
            CUDNN_DATA_BFLOAT16,
        );
        let s = forward_algos(h, bx, bw, cb, by).0;
        assert!((3000..4000).contains(&s));
        // A filter larger than the padded input: BAD_PARAM.
        let big = filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [6, 4, 12, 12]);
        assert_eq!(
            cudnnGetConvolution2dForwardOutputDim(c, tx, big, &mut n, &mut k, &mut oh, &mut ow),
            CUDNN_STATUS_BAD_PARAM
        );
        // A destroyed descriptor or handle: BAD_PARAM.
        assert_eq!(cudnnDestroyTensorDescriptor(good_y), CUDNN_STATUS_SUCCESS);
        let mut need = 0;
        assert_eq!(
            cudnnGetConvolutionForwardWorkspaceSize(h, tx, tw, c, good_y, 0, &mut need),
            CUDNN_STATUS_BAD_PARAM
        );
        assert_eq!(cudnnDestroy(h), CUDNN_STATUS_SUCCESS);
        assert_eq!(cudnnSetStream(h, null_mut()), CUDNN_STATUS_BAD_PARAM);
        assert_eq!(cudnnGetVersion(), CUDNN_VERSION);
        let name = std::ffi::CStr::from_ptr(cudnnGetErrorString(CUDNN_STATUS_NOT_SUPPORTED_SHAPE));
        assert_eq!(name.to_str().unwrap(), "CUDNN_STATUS_NOT_SUPPORTED_SHAPE");
    }
}

/// Asserts that each of `got` is `want` rounded once to a format of `bits` mantissa bits (23
/// for f32, 7 for bf16), within one unit in the last place: the emulator accumulates in f64
/// and rounds once, so anything looser would hide a second rounding or a lost term, and the
/// one ulp allows for f64 sums in another order landing on the other side of a tie.
fn assert_rounded_once(got: &[f32], want: &[f64], bits: i32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ulp = 2f64.powi(w.abs().max(1e-30).log2().floor() as i32 - bits);
        assert!(
            (g as f64 - w).abs() <= ulp + 1e-12,
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

/// The three passes of `g` in NHWC, f32 or bf16 data (FMA math, so f32 inputs are used as
/// they are), on algorithm `algo` of each pass, against the definition; backward filter also
/// with beta 1 over its own result.
fn check_nhwc_passes(g: Geo, dtype: u32, algo: u32, seed: u64) {
    let h = handle();
    let mut rng = Lcg(seed);
    let bf = dtype == CUDNN_DATA_BFLOAT16;
    // bf16 data is drawn as f32 and rounded; the reference uses the rounded values.
    let mut draw = |n: usize| -> Vec<f32> {
        let v = rng.vec(n);
        if bf {
            v.iter().map(|&x| from_bf16(bf16(x))).collect()
        } else {
            v
        }
    };
    let (x, w, dy) = (draw(g.x_len()), draw(g.w_len()), draw(g.y_len()));
    let (xd, yd, wd) = (g.x_dims(), g.y_dims(), g.w_dims());
    let f = CUDNN_TENSOR_NHWC;
    let (tx, ty, tw) = (
        tensor(f, dtype, xd),
        tensor(f, dtype, yd),
        filter(f, dtype, wd),
    );
    let cd = g.conv(CUDNN_FMA_MATH, CUDNN_DATA_FLOAT);
    let up = |v: &[f32], d: [usize; 4]| {
        let v = layout(v, d, f);
        if bf {
            upload(&v.iter().map(|&x| bf16(x)).collect::<Vec<u16>>())
        } else {
            upload(&v)
        }
    };
    let (px, pw, pdy) = (up(&x, xd), up(&w, wd), up(&dy, yd));
    let (mut fy, mut fdx, mut fdw) = (
        vec![0.0; g.y_len()],
        vec![0.0; g.x_len()],
        vec![0.0; g.w_len()],
    );
    g.terms(|yi, xi, wi| {
        fy[yi] += x[xi] as f64 * w[wi] as f64;
        fdx[xi] += dy[yi] as f64 * w[wi] as f64;
        fdw[wi] += dy[yi] as f64 * x[xi] as f64;
    });
    let (bits, size) = if bf { (7, 2) } else { (23, 4) };
    let got = |p: u64, d: [usize; 4]| -> Vec<f32> {
        let n = d.iter().product();
        let v: Vec<f32> = if bf {
            download::<u16>(p, n)
                .iter()
                .map(|&b| from_bf16(b))
                .collect()
        } else {
            download::<f32>(p, n)
        };
        unlayout(&v, d, f)
    };
    let call = Call {
        h,
        alpha: 1.0,
        beta: 0.0,
        ws: alloc_bytes(1 << 22),
        ws_size: 1 << 22,
    };
    let py = alloc_bytes(g.y_len() * size);
    assert_eq!(
        call.forward((tx, px), (tw, pw), cd, algo, (ty, py)),
        CUDNN_STATUS_SUCCESS
    );
    assert_rounded_once(&got(py, yd), &fy, bits, "forward");
    let pdx = alloc_bytes(g.x_len() * size);
    assert_eq!(
        call.backward_data((tw, pw), (ty, pdy), cd, algo, (tx, pdx)),
        CUDNN_STATUS_SUCCESS
    );
    assert_rounded_once(&got(pdx, xd), &fdx, bits, "backward data");
    let pdw = alloc_bytes(g.w_len() * size);
    assert_eq!(
        call.backward_filter((tx, px), (ty, pdy), cd, algo, (tw, pdw)),
        CUDNN_STATUS_SUCCESS
    );
    let dw1 = got(pdw, wd);
    assert_rounded_once(&dw1, &fdw, bits, "backward filter");
    // beta 1: the stored (rounded) result is read back and added before the one rounding.
    let again = Call { beta: 1.0, ..call };
    assert_eq!(
        again.backward_filter((tx, px), (ty, pdy), cd, algo, (tw, pdw)),
        CUDNN_STATUS_SUCCESS
    );
    let want: Vec<f64> = fdw.iter().zip(&dw1).map(|(a, &b)| a + b as f64).collect();
    assert_rounded_once(&got(pdw, wd), &want, bits, "backward filter beta 1");
    // SAFETY: a live handle.
    unsafe { assert_eq!(cudnnDestroy(h), CUDNN_STATUS_SUCCESS) };
}

#[test]
fn larger_nhwc_problems_in_f32_and_bf16() {
    // NHWC 8x32x32x16 to 32 channels, 3x3, padding 1, stride 1 and 2: big enough that the
    // passes split their work across threads and blocks of images.
    for stride in [1, 2] {
        let g = Geo {
            n: 8,
            c: 16,
            h: 32,
            w: 32,
            k: 32,
            r: 3,
            s: 3,
            pad: 1,
            stride,
            dil: 1,
            groups: 1,
            flip: false,
        };
        check_nhwc_passes(g, CUDNN_DATA_FLOAT, 1, 11 + stride as u64);
        check_nhwc_passes(g, CUDNN_DATA_BFLOAT16, 1, 21 + stride as u64);
    }
    // Grouped, dilated, convolution mode, images not square, on the non-tensor-core
    // algorithms.
    let g = Geo {
        n: 5,
        c: 16,
        h: 19,
        w: 13,
        k: 24,
        r: 3,
        s: 2,
        pad: 2,
        stride: 1,
        dil: 2,
        groups: 2,
        flip: true,
    };
    check_nhwc_passes(g, CUDNN_DATA_FLOAT, 0, 31);
    check_nhwc_passes(g, CUDNN_DATA_BFLOAT16, 0, 32);
}

/// Times the three passes of a ResNet-sized layer (NHWC f32, 64x16x16x16 to 16 channels,
/// 3x3, padding 1); not a check. `cargo test --release -p simclr-gpu-emu --test cudnn --
/// --ignored --nocapture timing`.
#[test]
#[ignore]
fn timing_of_a_resnet_layer() {
    let g = Geo {
        n: 64,
        c: 16,
        h: 16,
        w: 16,
        k: 16,
        r: 3,
        s: 3,
        pad: 1,
        stride: 1,
        dil: 1,
        groups: 1,
        flip: false,
    };
    let h = handle();
    let mut rng = Lcg(3);
    let (xd, yd, wd) = (g.x_dims(), g.y_dims(), g.w_dims());
    let f = CUDNN_TENSOR_NHWC;
    let t = CUDNN_DATA_FLOAT;
    let x = (tensor(f, t, xd), upload(&rng.vec(g.x_len())));
    let w = (filter(f, t, wd), upload(&rng.vec(g.w_len())));
    let dy = (tensor(f, t, yd), upload(&rng.vec(g.y_len())));
    let y = (dy.0, alloc::<f32>(g.y_len()));
    let dx = (x.0, alloc::<f32>(g.x_len()));
    let dw = (w.0, alloc::<f32>(g.w_len()));
    let cd = g.conv(CUDNN_FMA_MATH, t);
    let call = Call {
        h,
        alpha: 1.0,
        beta: 0.0,
        ws: alloc_bytes(1 << 22),
        ws_size: 1 << 22,
    };
    let time = |what: &str, run: &dyn Fn() -> CudnnStatus| {
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t0 = std::time::Instant::now();
            assert_eq!(run(), CUDNN_STATUS_SUCCESS);
            download::<f32>(y.1, 1);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!("{what}: {:.2} ms (best of 10)", best * 1e3);
    };
    time("forward", &|| call.forward(x, w, cd, 1, y));
    time("backward data", &|| call.backward_data(w, dy, cd, 1, dx));
    time("backward filter", &|| {
        call.backward_filter(x, dy, cd, 1, dw)
    });
    // SAFETY: a live handle.
    unsafe { assert_eq!(cudnnDestroy(h), CUDNN_STATUS_SUCCESS) };
}

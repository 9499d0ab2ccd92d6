//! Tests of the emulated cuDNN (`src/cudnn/`), through its C ABI, against convolutions written
//! here from the definition in f64: `y[n,k,oh,ow] = sum_{c,r,s} x[n, g*C/G + c, oh*u - pad +
//! r*dil, ...] * w[k, c, r', s']` (r' = r in cross-correlation, R-1-r in convolution mode), and
//! the backward passes as the sums of the same products over the other indices.
#![allow(clippy::too_many_arguments)]

use std::ffi::c_void;
use std::ptr::null_mut;

use simclr_gpu_emu::cudnn::conv::*;
use simclr_gpu_emu::cudnn::desc::*;
use simclr_gpu_emu::cudnn::*;
use simclr_gpu_emu::driver::api;

type P = *mut c_void;

fn handle() -> P {
    // SAFETY: the driver's entry points with valid out-pointers.
    unsafe {
        assert_eq!(api::cuInit(0), 0);
        let mut ctx = null_mut();
        assert_eq!(api::cuDevicePrimaryCtxRetain(&mut ctx, 0), 0);
        assert_eq!(api::cuCtxSetCurrent(ctx), 0);
        let mut h = null_mut();
        assert_eq!(cudnnCreate(&mut h), CUDNN_STATUS_SUCCESS);
        h
    }
}

fn upload<T: Copy>(v: &[T]) -> u64 {
    let bytes = std::mem::size_of_val(v);
    let mut p = 0u64;
    // SAFETY: valid out-pointer and host source.
    unsafe {
        assert_eq!(api::cuMemAlloc_v2(&mut p, bytes.max(1)), 0);
        assert_eq!(
            api::cuMemcpyHtoD_v2(p, v.as_ptr() as *const c_void, bytes),
            0
        );
    }
    p
}

fn alloc(bytes: usize) -> u64 {
    let mut p = 0u64;
    // SAFETY: valid out-pointer. Fresh memory is 0xFF bytes: NaN in f32 and bf16.
    unsafe { assert_eq!(api::cuMemAlloc_v2(&mut p, bytes.max(1)), 0) };
    p
}

fn download<T: Copy + Default>(p: u64, len: usize) -> Vec<T> {
    let mut v = vec![T::default(); len];
    // SAFETY: waits for the work, then copies len values.
    unsafe {
        assert_eq!(api::cuCtxSynchronize(), 0);
        let bytes = len * std::mem::size_of::<T>();
        assert_eq!(
            api::cuMemcpyDtoH_v2(v.as_mut_ptr() as *mut c_void, p, bytes),
            0
        );
    }
    v
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn tensor(format: u32, dtype: u32, d: [i32; 4]) -> P {
    let mut t = null_mut();
    // SAFETY: valid out-pointer.
    unsafe { assert_eq!(cudnnCreateTensorDescriptor(&mut t), CUDNN_STATUS_SUCCESS) };
    assert_eq!(
        cudnnSetTensor4dDescriptor(t, format, dtype, d[0], d[1], d[2], d[3]),
        CUDNN_STATUS_SUCCESS
    );
    t
}

fn filter(format: u32, dtype: u32, d: [i32; 4]) -> P {
    let mut f = null_mut();
    // SAFETY: valid out-pointer.
    unsafe { assert_eq!(cudnnCreateFilterDescriptor(&mut f), CUDNN_STATUS_SUCCESS) };
    assert_eq!(
        cudnnSetFilter4dDescriptor(f, dtype, format, d[0], d[1], d[2], d[3]),
        CUDNN_STATUS_SUCCESS
    );
    f
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
    fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    fn w_len(&self) -> usize {
        self.k * (self.c / self.groups) * self.r * self.s
    }
    fn y_len(&self) -> usize {
        self.n * self.k * self.oh() * self.ow()
    }
}

/// Logical NCHW data laid out in `format` (NHWC: channels innermost).
fn layout(v: &[f32], d: [usize; 4], format: u32) -> Vec<f32> {
    if format == CUDNN_TENSOR_NCHW {
        return v.to_vec();
    }
    let mut out = vec![0.0; v.len()];
    for a in 0..d[0] {
        for b in 0..d[1] {
            for c in 0..d[2] {
                for e in 0..d[3] {
                    out[((a * d[2] + c) * d[3] + e) * d[1] + b] =
                        v[((a * d[1] + b) * d[2] + c) * d[3] + e];
                }
            }
        }
    }
    out
}

/// The inverse of [`layout`].
fn unlayout(v: &[f32], d: [usize; 4], format: u32) -> Vec<f32> {
    if format == CUDNN_TENSOR_NCHW {
        return v.to_vec();
    }
    let mut out = vec![0.0; v.len()];
    for a in 0..d[0] {
        for b in 0..d[1] {
            for c in 0..d[2] {
                for e in 0..d[3] {
                    out[((a * d[1] + b) * d[2] + c) * d[3] + e] =
                        v[((a * d[2] + c) * d[3] + e) * d[1] + b];
                }
            }
        }
    }
    out
}

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

/// The three passes of `g` in f32, layout `format`, checked against the definition.
fn check_f32_passes(g: Geo, format: u32, math: u32, algos: (u32, u32, u32)) {
    let h = handle();
    let mut rng = Lcg(g.n as u64 * 31 + g.c as u64);
    let (x, w, dy) = (rng.vec(g.x_len()), rng.vec(g.w_len()), rng.vec(g.y_len()));
    let xd = [g.n, g.c, g.h, g.w];
    let yd = [g.n, g.k, g.oh(), g.ow()];
    let wd = [g.k, g.c / g.groups, g.r, g.s];
    let i32s = |d: [usize; 4]| d.map(|v| v as i32);
    let (tx, ty) = (
        tensor(format, CUDNN_DATA_FLOAT, i32s(xd)),
        tensor(format, CUDNN_DATA_FLOAT, i32s(yd)),
    );
    let tw = filter(format, CUDNN_DATA_FLOAT, i32s(wd));
    let cd = g.conv(math, CUDNN_DATA_FLOAT);
    let (px, pw, pdy) = (
        upload(&layout(&x, xd, format)),
        upload(&layout(&w, wd, format)),
        upload(&layout(&dy, yd, format)),
    );
    let ws = alloc(1 << 20);
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
    let one = 1.0f32;
    let zero = 0.0f32;
    // Forward, beta 0 into NaN-filled y.
    let py = alloc(g.y_len() * 4);
    // SAFETY: tensors as described, host scalars, a 1 MiB workspace.
    unsafe {
        let s = cudnnConvolutionForward(
            h,
            &one as *const f32 as _,
            tx,
            px as _,
            tw,
            pw as _,
            cd,
            algos.0,
            ws as _,
            1 << 20,
            &zero as *const f32 as _,
            ty,
            py as _,
        );
        assert_eq!(s, CUDNN_STATUS_SUCCESS);
    }
    close(
        &unlayout(&download(py, g.y_len()), yd, format),
        &fy,
        1e-5,
        "forward",
    );
    // Forward again, alpha 2 and beta 0.5 over that result.
    let (two, half) = (2.0f32, 0.5f32);
    // SAFETY: as above.
    unsafe {
        let s = cudnnConvolutionForward(
            h,
            &two as *const f32 as _,
            tx,
            px as _,
            tw,
            pw as _,
            cd,
            algos.0,
            ws as _,
            1 << 20,
            &half as *const f32 as _,
            ty,
            py as _,
        );
        assert_eq!(s, CUDNN_STATUS_SUCCESS);
    }
    let want: Vec<f64> = fy.iter().map(|v| 2.5 * v).collect();
    close(
        &unlayout(&download(py, g.y_len()), yd, format),
        &want,
        1e-5,
        "forward alpha beta",
    );
    // Backward data.
    let pdx = alloc(g.x_len() * 4);
    // SAFETY: as above.
    unsafe {
        let s = cudnnConvolutionBackwardData(
            h,
            &one as *const f32 as _,
            tw,
            pw as _,
            ty,
            pdy as _,
            cd,
            algos.1,
            ws as _,
            1 << 20,
            &zero as *const f32 as _,
            tx,
            pdx as _,
        );
        assert_eq!(s, CUDNN_STATUS_SUCCESS);
    }
    close(
        &unlayout(&download(pdx, g.x_len()), xd, format),
        &fdx,
        1e-5,
        "backward data",
    );
    // Backward filter.
    let pdw = alloc(g.w_len() * 4);
    // SAFETY: as above.
    unsafe {
        let s = cudnnConvolutionBackwardFilter(
            h,
            &one as *const f32 as _,
            tx,
            px as _,
            ty,
            pdy as _,
            cd,
            algos.2,
            ws as _,
            1 << 20,
            &zero as *const f32 as _,
            tw,
            pdw as _,
        );
        assert_eq!(s, CUDNN_STATUS_SUCCESS);
    }
    close(
        &unlayout(&download(pdw, g.w_len()), wd, format),
        &fdw,
        1e-5,
        "backward filter",
    );
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

fn tf32(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits((b & 0x8000_0000) | (((b & 0x7fff_ffff) + (1 << 12)) & !((1 << 13) - 1)))
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
    let d = [1, 8, 5, 5];
    let (tx, tw) = (
        tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, d),
        filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, [8, 8, 3, 3]),
    );
    let (px, pw) = (
        upload(&layout(&x, [1, 8, 5, 5], 1)),
        upload(&layout(&w, [8, 8, 3, 3], 1)),
    );
    let ws = alloc(1 << 16);
    for (math, algo, want) in [
        (CUDNN_DEFAULT_MATH, 1, &rounded),
        (CUDNN_FMA_MATH, 1, &exact),
        (CUDNN_DEFAULT_MATH, 0, &exact),
    ] {
        let cd = g.conv(math, CUDNN_DATA_FLOAT);
        let mut perf = [AlgoPerf {
            algo: 0,
            status: 0,
            time: 0.0,
            memory: 0,
            determinism: 0,
            math_type: 0,
            reserved: [0; 3],
        }; 8];
        let mut count = 0;
        // SAFETY: 8 entries.
        unsafe {
            assert_eq!(
                cudnnGetConvolutionForwardAlgorithm_v7(
                    h,
                    tx,
                    tw,
                    cd,
                    tx,
                    8,
                    &mut count,
                    perf.as_mut_ptr()
                ),
                CUDNN_STATUS_SUCCESS
            );
        }
        assert_eq!(count, 8);
        assert_eq!(perf[0].algo, 1, "IMPLICIT_PRECOMP_GEMM first");
        let tc = if math == CUDNN_DEFAULT_MATH {
            CUDNN_TENSOR_OP_MATH
        } else {
            CUDNN_FMA_MATH
        };
        assert_eq!(perf[0].math_type, tc);
        let py = alloc(g.y_len() * 4);
        let (one, zero) = (1.0f32, 0.0f32);
        // SAFETY: as described.
        unsafe {
            let s = cudnnConvolutionForward(
                h,
                &one as *const f32 as _,
                tx,
                px as _,
                tw,
                pw as _,
                cd,
                algo,
                ws as _,
                1 << 16,
                &zero as *const f32 as _,
                tx,
                py as _,
            );
            assert_eq!(s, CUDNN_STATUS_SUCCESS);
        }
        let got = unlayout(&download(py, g.y_len()), [1, 8, 5, 5], 1);
        close(&got, want, 1e-6, "tf32");
    }
    // The TF32 result is not the exact one: the rounding happened.
    assert!(rounded
        .iter()
        .zip(&exact)
        .any(|(a, b)| (a - b).abs() > 1e-5));
}

fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}
fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
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
    let xd = [1, 3, 11, 11];
    let yd = [1, 8, g.oh(), g.ow()];
    let wd = [8, 3, 7, 7];
    let i32s = |d: [usize; 4]| d.map(|v| v as i32);
    let tx = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, i32s(xd));
    let ty = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, i32s(yd));
    let tw = filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, i32s(wd));
    let cd = g.conv(CUDNN_TENSOR_OP_MATH, CUDNN_DATA_FLOAT);
    let lay16 = |v: &[u16], d: [usize; 4]| {
        let f: Vec<f32> = v.iter().map(|&b| f32::from_bits(b as u32)).collect();
        layout(&f, d, CUDNN_TENSOR_NHWC)
            .iter()
            .map(|f| f.to_bits() as u16)
            .collect::<Vec<u16>>()
    };
    let (px, pw) = (upload(&lay16(&x, xd)), upload(&lay16(&w, wd)));
    let ws = alloc(1 << 20);
    let mut perf = [AlgoPerf {
        algo: 0,
        status: 0,
        time: 0.0,
        memory: 0,
        determinism: 0,
        math_type: 0,
        reserved: [0; 3],
    }; 8];
    let mut count = 0;
    // SAFETY: 8 entries.
    unsafe {
        assert_eq!(
            cudnnGetConvolutionForwardAlgorithm_v7(
                h,
                tx,
                tw,
                cd,
                ty,
                8,
                &mut count,
                perf.as_mut_ptr()
            ),
            CUDNN_STATUS_SUCCESS
        );
    }
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
    let (one, zero) = (1.0f32, 0.0f32);
    let py = alloc(g.y_len() * 2);
    let fwd = |algo: u32| unsafe {
        cudnnConvolutionForward(
            h,
            &one as *const f32 as _,
            tx,
            px as _,
            tw,
            pw as _,
            cd,
            algo,
            ws as _,
            1 << 20,
            &zero as *const f32 as _,
            ty,
            py as _,
        )
    };
    let s = fwd(perf[0].algo);
    assert!(
        (3000..4000).contains(&s),
        "refused in the NOT_SUPPORTED family, got {s}"
    );
    // The next algorithm runs, with f32 accumulation and one rounding to bf16.
    assert_eq!(fwd(0), CUDNN_STATUS_SUCCESS);
    let got: Vec<f32> = download::<u16>(py, g.y_len())
        .iter()
        .map(|&b| from_bf16(b))
        .collect();

    let got_nchw = unlayout(&got, yd, CUDNN_TENSOR_NHWC);
    close(&got_nchw, &want, 1.0 / 128.0, "bf16 stem forward");
    // The backward passes' tensor-core algorithms (ALGO_1) are refused the same way.
    let pdy = alloc(g.y_len() * 2);
    let pdx = alloc(g.x_len() * 2);
    let pdw = alloc(g.w_len() * 2);
    // SAFETY: as described (the refusal comes before any data is read).
    unsafe {
        let s = cudnnConvolutionBackwardData(
            h,
            &one as *const f32 as _,
            tw,
            pw as _,
            ty,
            pdy as _,
            cd,
            1,
            ws as _,
            1 << 20,
            &zero as *const f32 as _,
            tx,
            pdx as _,
        );
        assert!((3000..4000).contains(&s));
        let s = cudnnConvolutionBackwardFilter(
            h,
            &one as *const f32 as _,
            tx,
            px as _,
            ty,
            pdy as _,
            cd,
            1,
            ws as _,
            1 << 20,
            &zero as *const f32 as _,
            tw,
            pdw as _,
        );
        assert!((3000..4000).contains(&s));
    }
    // With 8 input channels the same configuration runs on algorithm 1.
    let tx8 = tensor(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [1, 8, 11, 11]);
    let tw8 = filter(CUDNN_TENSOR_NHWC, CUDNN_DATA_BFLOAT16, [8, 8, 7, 7]);
    let (px8, pw8) = (
        upload(&vec![0x3f80u16; 8 * 121]),
        upload(&vec![0x3f80u16; 8 * 8 * 49]),
    );
    // SAFETY: as described.
    unsafe {
        let s = cudnnConvolutionForward(
            h,
            &one as *const f32 as _,
            tx8,
            px8 as _,
            tw8,
            pw8 as _,
            cd,
            1,
            ws as _,
            1 << 20,
            &zero as *const f32 as _,
            ty,
            py as _,
        );
        assert_eq!(s, CUDNN_STATUS_SUCCESS);
    }
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
    let tx = tensor(CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, [1, 2, 8, 8]);
    let ty = tensor(
        CUDNN_TENSOR_NCHW,
        CUDNN_DATA_FLOAT,
        [1, 2, g.oh() as i32, g.ow() as i32],
    );
    let tw = filter(CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, [2, 2, 3, 3]);
    let cd = g.conv(CUDNN_FMA_MATH, CUDNN_DATA_FLOAT);
    let mut perf = [AlgoPerf {
        algo: 0,
        status: 0,
        time: 0.0,
        memory: 0,
        determinism: 0,
        math_type: 0,
        reserved: [0; 3],
    }; 8];
    let mut count = 0;
    // SAFETY: 8 entries; valid out-pointers.
    unsafe {
        assert_eq!(
            cudnnGetConvolutionForwardAlgorithm_v7(
                h,
                tx,
                tw,
                cd,
                ty,
                8,
                &mut count,
                perf.as_mut_ptr()
            ),
            CUDNN_STATUS_SUCCESS
        );
        let fft: Vec<_> = perf.iter().filter(|p| p.algo == 4 || p.algo == 5).collect();
        assert!(fft.iter().all(|p| p.status == CUDNN_STATUS_NOT_SUPPORTED));
        // Refused entries come after every supported one.
        let first_refused = perf.iter().position(|p| p.status != 0).unwrap();
        assert!(perf[first_refused..].iter().all(|p| p.status != 0));
        let mut need = 0;
        assert_eq!(
            cudnnGetConvolutionForwardWorkspaceSize(h, tx, tw, cd, ty, 4, &mut need),
            CUDNN_STATUS_NOT_SUPPORTED
        );
        let mut dperf = perf;
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
        assert_eq!(count, 6);
        assert!(dperf[..6]
            .iter()
            .filter(|p| p.algo == 2 || p.algo == 3)
            .all(|p| p.status == CUDNN_STATUS_NOT_SUPPORTED));
        // Launching FFT anyway: refused, nothing run.
        let (px, pw, py) = (
            upload(&vec![0.0f32; 128]),
            upload(&[0.0f32; 36]),
            alloc(2 * 16 * 4),
        );
        let ws = alloc(1 << 20);
        let (one, zero) = (1.0f32, 0.0f32);
        let fwd = |algo: u32, ws_size: usize| {
            cudnnConvolutionForward(
                h,
                &one as *const f32 as _,
                tx,
                px as _,
                tw,
                pw as _,
                cd,
                algo,
                ws as _,
                ws_size,
                &zero as *const f32 as _,
                ty,
                py as _,
            )
        };
        assert_eq!(fwd(4, 1 << 20), CUDNN_STATUS_NOT_SUPPORTED);
        // GEMM (2) needs a workspace: too small a one is BAD_PARAM, enough runs.
        assert_eq!(
            cudnnGetConvolutionForwardWorkspaceSize(h, tx, tw, cd, ty, 2, &mut need),
            CUDNN_STATUS_SUCCESS
        );
        assert!(need > 0);
        assert_eq!(fwd(2, need - 1), CUDNN_STATUS_BAD_PARAM);
        assert_eq!(fwd(2, need), CUDNN_STATUS_SUCCESS);
        // A workspace size larger than the allocation: outside device memory.
        assert_eq!(fwd(2, (1 << 20) + 1), CUDNN_STATUS_EXECUTION_FAILED);
        assert_eq!(cudnnDestroy(h), CUDNN_STATUS_SUCCESS);
    }
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
        let mut perf = [AlgoPerf {
            algo: 0,
            status: 0,
            time: 0.0,
            memory: 0,
            determinism: 0,
            math_type: 0,
            reserved: [0; 3],
        }; 8];
        let mut count = 0;
        let mut q = |x: P, w: P, y: P| {
            cudnnGetConvolutionForwardAlgorithm_v7(h, x, w, c, y, 8, &mut count, perf.as_mut_ptr())
        };
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
        let s = cudnnGetConvolutionForwardAlgorithm_v7(
            h,
            bx,
            bw,
            cb,
            by,
            8,
            &mut count,
            perf.as_mut_ptr(),
        );
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

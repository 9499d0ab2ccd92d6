//! Convolutions through cuDNN on NHWC activations and OHWI (cuDNN's "NHWC" KRSC) filters, so
//! neither needs a transpose.
//!
//! A plan (descriptors and the three algorithms cuDNN's heuristics pick) is made once per
//! geometry and element type (f32, or bf16 with f32 accumulation) and kept; one workspace,
//! grown to the largest plan's need, serves them all. Should cuDNN refuse an algorithm it picked
//! (its heuristics and its kernels disagree at times, for unusual shapes such as a 3-channel
//! bf16 stem), the others are tried in turn and the first that runs replaces it in the plan.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use half::bf16;
use simclr_kernels::cuda::cudarc::cudnn::result::CudnnError;
use simclr_kernels::cuda::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use simclr_kernels::cuda::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use simclr_kernels::cuda::Gpu;

use super::{cuda_err, MathMode};
use crate::cpu::conv::ConvGeom;
use crate::error::{NnError, Result};

/// The cuDNN handle and what is cached with it. cuDNN handles may move between threads but not
/// be used by two at once: the backend keeps this behind a mutex.
pub(crate) struct Dnn {
    handle: Arc<Cudnn>,
    plans_f32: HashMap<ConvGeom, Plan<f32>>,
    plans_bf16: HashMap<ConvGeom, Plan<bf16>>,
    workspace: Option<CudaSlice<u8>>,
    pub(crate) math: MathMode,
}

// SAFETY: cuDNN allows a handle (and its descriptors) to be used from any thread as long as no
// two threads use it at once; every access goes through the backend's mutex.
unsafe impl Send for Dnn {}

pub(crate) struct Plan<T> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    // Cells: a refused algorithm is replaced while the descriptors are borrowed.
    fwd: Cell<sys::cudnnConvolutionFwdAlgo_t>,
    bwd_data: Cell<sys::cudnnConvolutionBwdDataAlgo_t>,
    bwd_filter: Cell<sys::cudnnConvolutionBwdFilterAlgo_t>,
    workspace: usize,
}

/// The algorithms of one convolution pass.
trait Algo: Copy + PartialEq + std::fmt::Debug + 'static {
    /// All of them, in the order tried when cuDNN refuses its own pick (the general ones
    /// first).
    const ALL: &'static [Self];
}

impl Algo for sys::cudnnConvolutionFwdAlgo_t {
    const ALL: &'static [Self] = {
        use sys::cudnnConvolutionFwdAlgo_t::*;
        &[
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        ]
    };
}

impl Algo for sys::cudnnConvolutionBwdDataAlgo_t {
    const ALL: &'static [Self] = {
        use sys::cudnnConvolutionBwdDataAlgo_t::*;
        &[
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        ]
    };
}

impl Algo for sys::cudnnConvolutionBwdFilterAlgo_t {
    const ALL: &'static [Self] = {
        use sys::cudnnConvolutionBwdFilterAlgo_t::*;
        &[
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        ]
    };
}

/// Whether cuDNN refused the configuration: cuDNN 9's NOT_SUPPORTED family is the codes
/// 3000-3999 (`NOT_SUPPORTED_SHAPE`, `_LAYOUT`, `_DATA_TYPE`, ...), not only 3000.
fn refused(e: &CudnnError) -> bool {
    (e.0 as u32) / 1000 == 3
}

/// The heuristics' pick and its workspace, or when cuDNN cannot say or size it, the first
/// algorithm it can size.
fn pick<A: Algo>(
    what: &'static str,
    heuristic: std::result::Result<A, CudnnError>,
    size: impl Fn(A) -> std::result::Result<usize, CudnnError>,
) -> Result<(A, usize)> {
    let first = heuristic.and_then(|a| Ok((a, size(a)?)));
    match first {
        Ok(found) => Ok(found),
        Err(e) => A::ALL
            .iter()
            .find_map(|&a| size(a).ok().map(|n| (a, n)))
            .ok_or_else(|| NnError::Cuda(format!("{what}: no algorithm for this shape ({e:?})"))),
    }
}

/// Runs `launch` with the plan's algorithm in `choice`; should cuDNN refuse it, tries the
/// others in turn (growing the workspace as they need) and keeps the first that runs.
fn run<A: Algo>(
    what: &'static str,
    gpu: &Gpu,
    workspace: &mut Option<CudaSlice<u8>>,
    choice: &Cell<A>,
    size: impl Fn(A) -> std::result::Result<usize, CudnnError>,
    mut launch: impl FnMut(A, &mut CudaSlice<u8>) -> std::result::Result<(), CudnnError>,
) -> Result<()> {
    let first = choice.get();
    let ws = workspace.as_mut().expect("sized for the plan");
    match launch(first, ws) {
        Err(e) if refused(&e) => {}
        other => return other.map_err(cuda_err(what)),
    }
    for &a in A::ALL.iter().filter(|&&a| a != first) {
        let Ok(need) = size(a) else { continue };
        // An algorithm whose workspace does not fit (FFT ones can take gigabytes) is passed
        // over like a refused one.
        if grow(gpu, workspace, need).is_err() {
            continue;
        }
        // A refusal comes before any work is queued: nothing was written, trying again is safe.
        match launch(a, workspace.as_mut().expect("grown above")) {
            Ok(()) => {
                tracing::warn!("{what}: cuDNN refused {first:?}; {a:?} runs instead");
                choice.set(a);
                return Ok(());
            }
            Err(e) if refused(&e) => {}
            Err(e) => return Err(cuda_err(what)(e)),
        }
    }
    Err(NnError::Cuda(format!(
        "{what}: cuDNN refuses every algorithm for this convolution"
    )))
}

/// Makes `workspace` at least `need` bytes.
fn grow(gpu: &Gpu, workspace: &mut Option<CudaSlice<u8>>, need: usize) -> Result<()> {
    let need = need.max(1);
    if workspace.as_ref().is_none_or(|w| w.len() < need) {
        // The old one goes first: both at once may not fit.
        *workspace = None;
        *workspace = Some(gpu.uninit::<u8>(need)?);
    }
    Ok(())
}

/// The element types the convolutions run in, with their plan cache.
pub(crate) trait ConvType: CudnnDataType + Copy + Sized {
    /// This type's plans, out of the two caches.
    fn plans<'a>(
        f32s: &'a mut HashMap<ConvGeom, Plan<f32>>,
        bf16s: &'a mut HashMap<ConvGeom, Plan<bf16>>,
    ) -> &'a mut HashMap<ConvGeom, Plan<Self>>;
    /// A scaling factor (alpha, beta) in this type.
    fn scalar(v: f32) -> Self;
}

impl ConvType for f32 {
    fn plans<'a>(
        f32s: &'a mut HashMap<ConvGeom, Plan<f32>>,
        _: &'a mut HashMap<ConvGeom, Plan<bf16>>,
    ) -> &'a mut HashMap<ConvGeom, Plan<f32>> {
        f32s
    }
    fn scalar(v: f32) -> f32 {
        v
    }
}

impl ConvType for bf16 {
    fn plans<'a>(
        _: &'a mut HashMap<ConvGeom, Plan<f32>>,
        bf16s: &'a mut HashMap<ConvGeom, Plan<bf16>>,
    ) -> &'a mut HashMap<ConvGeom, Plan<bf16>> {
        bf16s
    }
    fn scalar(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

fn dim(v: usize) -> i32 {
    // `ops::fits_cudnn` checked every tensor of the geometry against 2^31 values.
    v as i32
}

fn make_plan<T: ConvType>(h: &Arc<Cudnn>, g: &ConvGeom, math: MathMode) -> Result<Plan<T>> {
    let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    // Accumulation is f32 in every mode (bf16 inputs: cuDNN's "pseudo-bf16" configuration).
    let mut conv = h
        .create_conv2d::<f32>(
            [dim(g.pad), dim(g.pad)],
            [dim(g.stride), dim(g.stride)],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(cuda_err("cudnnSetConvolution2dDescriptor"))?;
    conv.set_math_type(match math {
        MathMode::Fp32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        MathMode::Tf32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        MathMode::Bf16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    })
    .map_err(cuda_err("cudnnSetConvolutionMathType"))?;
    let x = h
        .create_4d_tensor::<T>(nhwc, [dim(g.n), dim(g.cin), dim(g.h), dim(g.w)])
        .map_err(cuda_err("cudnnSetTensor4dDescriptor (x)"))?;
    let w = h
        .create_4d_filter::<T>(nhwc, [dim(g.cout), dim(g.cin), dim(g.kh), dim(g.kw)])
        .map_err(cuda_err("cudnnSetFilter4dDescriptor"))?;
    let y = h
        .create_4d_tensor::<T>(nhwc, [dim(g.n), dim(g.cout), dim(g.oh()), dim(g.ow())])
        .map_err(cuda_err("cudnnSetTensor4dDescriptor (y)"))?;
    let fwd_op = ConvForward {
        conv: &conv,
        x: &x,
        w: &w,
        y: &y,
    };
    let (fwd, ws_fwd) = pick(
        "cudnnGetConvolutionForwardAlgorithm_v7",
        fwd_op.pick_algorithm(),
        |a| fwd_op.get_workspace_size(a),
    )?;
    let data_op = ConvBackwardData {
        conv: &conv,
        dx: &x,
        w: &w,
        dy: &y,
    };
    let (bwd_data, ws_data) = pick(
        "cudnnGetConvolutionBackwardDataAlgorithm_v7",
        data_op.pick_algorithm(),
        |a| data_op.get_workspace_size(a),
    )?;
    let filter_op = ConvBackwardFilter {
        conv: &conv,
        x: &x,
        dw: &w,
        dy: &y,
    };
    let (bwd_filter, ws_filter) = pick(
        "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
        filter_op.pick_algorithm(),
        |a| filter_op.get_workspace_size(a),
    )?;
    Ok(Plan {
        conv,
        x,
        w,
        y,
        fwd: Cell::new(fwd),
        bwd_data: Cell::new(bwd_data),
        bwd_filter: Cell::new(bwd_filter),
        workspace: ws_fwd.max(ws_data).max(ws_filter),
    })
}

impl Dnn {
    pub(crate) fn new(gpu: &Gpu, math: MathMode) -> Result<Dnn> {
        let handle = Cudnn::new(gpu.stream().clone()).map_err(cuda_err("cuDNN init"))?;
        Ok(Dnn {
            handle,
            plans_f32: HashMap::new(),
            plans_bf16: HashMap::new(),
            workspace: None,
            math,
        })
    }

    pub(crate) fn clear_plans(&mut self) {
        self.plans_f32.clear();
        self.plans_bf16.clear();
    }

    /// The plan of `g` in `T` and the workspace, large enough for it; binds the GPU's context to
    /// this thread, as cuDNN runs in the current one.
    fn plan_and_workspace<T: ConvType>(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
    ) -> Result<(&Plan<T>, &mut Option<CudaSlice<u8>>)> {
        gpu.context()
            .bind_to_thread()
            .map_err(simclr_kernels::cuda::GpuError::from)?;
        let Dnn {
            handle,
            plans_f32,
            plans_bf16,
            workspace,
            math,
        } = self;
        let plans = T::plans(plans_f32, plans_bf16);
        if !plans.contains_key(g) {
            plans.insert(*g, make_plan::<T>(handle, g, *math)?);
        }
        let plan = &plans[g];
        grow(gpu, workspace, plan.workspace)?;
        Ok((plan, workspace))
    }

    /// `y = conv(x, w)`.
    pub(crate) fn forward<T: ConvType>(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let (p, ws) = self.plan_and_workspace::<T>(gpu, g)?;
        let op = ConvForward {
            conv: &p.conv,
            x: &p.x,
            w: &p.w,
            y: &p.y,
        };
        let scale = (T::scalar(1.0), T::scalar(0.0));
        run(
            "cudnnConvolutionForward",
            gpu,
            ws,
            &p.fwd,
            |a| op.get_workspace_size(a),
            // SAFETY: x, w and y hold n*h*w*cin, cout*kh*kw*cin and n*oh*ow*cout values of T
            // in the NHWC / KRSC layouts the descriptors of this plan describe (checked by the
            // caller); the workspace holds what the algorithm needs.
            |a, ws| unsafe { op.launch(a, Some(ws), scale, x, w, y) },
        )
    }

    /// `dx = conv_transpose(dy, w)`.
    pub(crate) fn backward_data<T: ConvType>(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
        w: &impl DevicePtr<T>,
        dy: &impl DevicePtr<T>,
        dx: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let (p, ws) = self.plan_and_workspace::<T>(gpu, g)?;
        let op = ConvBackwardData {
            conv: &p.conv,
            dx: &p.x,
            w: &p.w,
            dy: &p.y,
        };
        let scale = (T::scalar(1.0), T::scalar(0.0));
        run(
            "cudnnConvolutionBackwardData",
            gpu,
            ws,
            &p.bwd_data,
            |a| op.get_workspace_size(a),
            // SAFETY: as in `forward`, dx shaped as x and dy as y.
            |a, ws| unsafe { op.launch(a, Some(ws), scale, dx, w, dy) },
        )
    }

    /// `dw = beta * dw + dL/dw` (beta 1 accumulates into a gradient).
    pub(crate) fn backward_filter<T: ConvType>(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
        x: &impl DevicePtr<T>,
        dy: &impl DevicePtr<T>,
        dw: &mut impl DevicePtrMut<T>,
        beta: f32,
    ) -> Result<()> {
        let (p, ws) = self.plan_and_workspace::<T>(gpu, g)?;
        let op = ConvBackwardFilter {
            conv: &p.conv,
            x: &p.x,
            dw: &p.w,
            dy: &p.y,
        };
        let scale = (T::scalar(1.0), T::scalar(beta));
        run(
            "cudnnConvolutionBackwardFilter",
            gpu,
            ws,
            &p.bwd_filter,
            |a| op.get_workspace_size(a),
            // SAFETY: as in `forward`, dw shaped as w and dy as y.
            |a, ws| unsafe { op.launch(a, Some(ws), scale, x, dw, dy) },
        )
    }
}

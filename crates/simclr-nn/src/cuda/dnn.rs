//! Convolutions through cuDNN on NHWC activations and OHWI (cuDNN's "NHWC" KRSC) filters, so
//! neither needs a transpose.
//!
//! A plan (descriptors and the three algorithms cuDNN's heuristics pick) is made once per
//! geometry and kept; one workspace, grown to the largest plan's need, serves them all.

use std::collections::HashMap;
use std::sync::Arc;

use simclr_kernels::cuda::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use simclr_kernels::cuda::cudarc::driver::CudaSlice;
use simclr_kernels::cuda::Gpu;

use super::{cuda_err, MathMode};
use crate::cpu::conv::ConvGeom;
use crate::error::Result;

/// The cuDNN handle and what is cached with it. cuDNN handles may move between threads but not
/// be used by two at once: the backend keeps this behind a mutex.
pub(crate) struct Dnn {
    handle: Arc<Cudnn>,
    plans: HashMap<ConvGeom, Plan>,
    workspace: Option<CudaSlice<u8>>,
    pub(crate) math: MathMode,
}

// SAFETY: cuDNN allows a handle (and its descriptors) to be used from any thread as long as no
// two threads use it at once; every access goes through the backend's mutex.
unsafe impl Send for Dnn {}

struct Plan {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    bwd_data: sys::cudnnConvolutionBwdDataAlgo_t,
    bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    workspace: usize,
}

fn dim(v: usize) -> i32 {
    // Geometry was checked against i32 by the caller (`ops::conv_geom` sizes fit memory).
    v as i32
}

impl Dnn {
    pub(crate) fn new(gpu: &Gpu, math: MathMode) -> Result<Dnn> {
        let handle = Cudnn::new(gpu.stream().clone()).map_err(cuda_err("cuDNN init"))?;
        Ok(Dnn {
            handle,
            plans: HashMap::new(),
            workspace: None,
            math,
        })
    }

    pub(crate) fn clear_plans(&mut self) {
        self.plans.clear();
    }

    fn plan(&mut self, g: &ConvGeom) -> Result<&Plan> {
        if !self.plans.contains_key(g) {
            let plan = self.make_plan(g)?;
            self.plans.insert(*g, plan);
        }
        Ok(&self.plans[g])
    }

    fn make_plan(&self, g: &ConvGeom) -> Result<Plan> {
        let h = &self.handle;
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let mut conv = h
            .create_conv2d::<f32>(
                [dim(g.pad), dim(g.pad)],
                [dim(g.stride), dim(g.stride)],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(cuda_err("cudnnSetConvolution2dDescriptor"))?;
        conv.set_math_type(match self.math {
            MathMode::Fp32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            MathMode::Tf32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        })
        .map_err(cuda_err("cudnnSetConvolutionMathType"))?;
        let x = h
            .create_4d_tensor::<f32>(nhwc, [dim(g.n), dim(g.cin), dim(g.h), dim(g.w)])
            .map_err(cuda_err("cudnnSetTensor4dDescriptor (x)"))?;
        let w = h
            .create_4d_filter::<f32>(nhwc, [dim(g.cout), dim(g.cin), dim(g.kh), dim(g.kw)])
            .map_err(cuda_err("cudnnSetFilter4dDescriptor"))?;
        let y = h
            .create_4d_tensor::<f32>(nhwc, [dim(g.n), dim(g.cout), dim(g.oh()), dim(g.ow())])
            .map_err(cuda_err("cudnnSetTensor4dDescriptor (y)"))?;
        let fwd_op = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        let fwd = fwd_op
            .pick_algorithm()
            .map_err(cuda_err("cudnnGetConvolutionForwardAlgorithm_v7"))?;
        let ws_fwd = fwd_op
            .get_workspace_size(fwd)
            .map_err(cuda_err("cudnnGetConvolutionForwardWorkspaceSize"))?;
        let data_op = ConvBackwardData {
            conv: &conv,
            dx: &x,
            w: &w,
            dy: &y,
        };
        let bwd_data = data_op
            .pick_algorithm()
            .map_err(cuda_err("cudnnGetConvolutionBackwardDataAlgorithm_v7"))?;
        let ws_data = data_op
            .get_workspace_size(bwd_data)
            .map_err(cuda_err("cudnnGetConvolutionBackwardDataWorkspaceSize"))?;
        let filter_op = ConvBackwardFilter {
            conv: &conv,
            x: &x,
            dw: &w,
            dy: &y,
        };
        let bwd_filter = filter_op
            .pick_algorithm()
            .map_err(cuda_err("cudnnGetConvolutionBackwardFilterAlgorithm_v7"))?;
        let ws_filter = filter_op
            .get_workspace_size(bwd_filter)
            .map_err(cuda_err("cudnnGetConvolutionBackwardFilterWorkspaceSize"))?;
        Ok(Plan {
            conv,
            x,
            w,
            y,
            fwd,
            bwd_data,
            bwd_filter,
            workspace: ws_fwd.max(ws_data).max(ws_filter),
        })
    }

    /// The plan of `g` and a workspace large enough for it; binds the GPU's context to this
    /// thread, as cuDNN runs in the current one.
    fn plan_and_workspace(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
    ) -> Result<(&Plan, &mut CudaSlice<u8>)> {
        gpu.context()
            .bind_to_thread()
            .map_err(simclr_kernels::cuda::GpuError::from)?;
        let need = self.plan(g)?.workspace.max(1);
        if self.workspace.as_ref().is_none_or(|w| w.len() < need) {
            self.workspace = None;
            self.workspace = Some(gpu.zeros::<u8>(need)?);
        }
        Ok((
            &self.plans[g],
            self.workspace.as_mut().expect("allocated above"),
        ))
    }

    /// `y = conv(x, w)`.
    pub(crate) fn forward(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (p, ws) = self.plan_and_workspace(gpu, g)?;
        let op = ConvForward {
            conv: &p.conv,
            x: &p.x,
            w: &p.w,
            y: &p.y,
        };
        // SAFETY: x, w and y hold n*h*w*cin, cout*kh*kw*cin and n*oh*ow*cout f32 values in the
        // NHWC / KRSC layouts the descriptors of this plan describe (checked by the caller).
        unsafe { op.launch(p.fwd, Some(ws), (1.0f32, 0.0f32), x, w, y) }
            .map_err(cuda_err("cudnnConvolutionForward"))
    }

    /// `dx = conv_transpose(dy, w)`.
    pub(crate) fn backward_data(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (p, ws) = self.plan_and_workspace(gpu, g)?;
        let op = ConvBackwardData {
            conv: &p.conv,
            dx: &p.x,
            w: &p.w,
            dy: &p.y,
        };
        // SAFETY: as in `forward`, dx shaped as x and dy as y.
        unsafe { op.launch(p.bwd_data, Some(ws), (1.0f32, 0.0f32), dx, w, dy) }
            .map_err(cuda_err("cudnnConvolutionBackwardData"))
    }

    /// `dw = beta * dw + dL/dw` (beta 1 accumulates into a gradient).
    pub(crate) fn backward_filter(
        &mut self,
        gpu: &Gpu,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        beta: f32,
    ) -> Result<()> {
        let (p, ws) = self.plan_and_workspace(gpu, g)?;
        let op = ConvBackwardFilter {
            conv: &p.conv,
            x: &p.x,
            dw: &p.w,
            dy: &p.y,
        };
        // SAFETY: as in `forward`, dw shaped as w and dy as y.
        unsafe { op.launch(p.bwd_filter, Some(ws), (1.0f32, beta), x, dw, dy) }
            .map_err(cuda_err("cudnnConvolutionBackwardFilter"))
    }
}

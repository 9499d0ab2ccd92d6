//! The GPU half of the augmentation (`data.gpu_augment`): the loader hands 8-bit crops with
//! each view's parameters, the colour kernels finish them on the training GPU.

use std::sync::Arc;

use simclr_data::{Batch, BatchData};
use simclr_kernels::cuda::augment::{AugOutput, AugmentGpu, Layout};
use simclr_kernels::cuda::cudarc::driver::CudaSlice;
use simclr_kernels::cuda::GpuError;
use simclr_nn::cuda::CudaBackend;
use simclr_nn::{Device, NnError, Tensor};

use crate::error::{CliError, Result};

/// The colour stage on one GPU, its buffers sized for the largest batch so far.
pub struct GpuAugment {
    backend: Arc<CudaBackend>,
    /// The buffers, the crops' room, and the (views, height, width) they were made for.
    stage: Option<(AugmentGpu, CudaSlice<u8>, [usize; 3])>,
    mean: [f32; 3],
    std: [f32; 3],
}

impl std::fmt::Debug for GpuAugment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuAugment(cuda:{})", self.backend.ordinal())
    }
}

impl GpuAugment {
    /// The colour stage on `device` (a GPU), normalising with `mean` and `std`.
    pub fn new(device: Device, mean: [f32; 3], std: [f32; 3]) -> Result<GpuAugment> {
        let Device::Cuda(i) = device else {
            return Err(CliError::Usage(format!(
                "data.gpu_augment needs train.device on a GPU, got {device}"
            )));
        };
        Ok(GpuAugment {
            backend: CudaBackend::get(i)?,
            stage: None,
            mean,
            std,
        })
    }

    /// The finished views of an 8-bit batch, `[views * B, 3, H, W]` f32 on the GPU.
    pub fn views(&mut self, batch: &Batch) -> Result<Tensor> {
        let BatchData::U8(crops) = &batch.data else {
            return Err(CliError::Usage(
                "data.gpu_augment: the loader gave finished f32 views, expected 8-bit crops".into(),
            ));
        };
        let shape = batch.shape();
        let (views, h, w) = (shape[0], shape[2], shape[3]);
        let gpu = self.backend.gpu();
        let fits = matches!(&self.stage,
            Some((_, _, [v, sh, sw])) if *v >= views && *sh == h && *sw == w);
        if !fits {
            let stage =
                AugmentGpu::new(gpu, views, h, w, self.mean, self.std).map_err(NnError::from)?;
            let room = gpu.uninit::<u8>(views * 3 * h * w).map_err(NnError::from)?;
            self.stage = Some((stage, room, [views, h, w]));
        }
        let device = Device::Cuda(self.backend.ordinal());
        let (stage, room, _) = self.stage.as_mut().expect("created above");
        // Exactly the batch's bytes: the room is sized for the largest batch so far, so the
        // kernels' own length check would let a short batch read stale bytes.
        if crops.len() != views * 3 * h * w {
            return Err(CliError::Usage(format!(
                "data.gpu_augment: a batch of {} bytes for {views} views of 3x{h}x{w}",
                crops.len()
            )));
        }
        // The crops go to the stage's own room and the views to a cached tensor: a batch
        // allocates nothing on the device once the first has run. (The stream orders this
        // copy after the previous batch's kernels read the room.)
        gpu.stream()
            .memcpy_htod(&crops[..], &mut room.slice_mut(0..crops.len()))
            .map_err(|e| NnError::from(GpuError::from(e)))?;
        let mut views_t = Tensor::try_full(&shape, 0.0, device)?;
        stage
            .apply(
                gpu,
                room,
                &batch.params,
                Layout::Nchw,
                AugOutput::F32(views_t.cuda_mut()?),
            )
            .map_err(NnError::from)?;
        Ok(views_t)
    }
}

//! The colour stage of the augmentation on the GPU (`kernels/augment.cu`): the twin of
//! [`crate::cpu::color::apply_color_stage`] followed by the per-channel normalisation.
//!
//! The CPU decodes, crops, resizes, flips and rotates each view into planar `3 x H x W` u8
//! (`simclr-data`'s `apply_geometry_u8`), draws its [`ViewParams`], and the GPU does the rest for
//! the whole batch: colour jitter in each view's sampled order, grayscale, Gaussian blur, cutout,
//! Gaussian noise and `(x - mean) / std`, into f32 or bf16, NCHW or NHWC.
//!
//! Sobel (an ablation-only transform) is not implemented on the GPU: views that ask for it are
//! rejected with an error (use the CPU path for that ablation).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{ensure, int, Gpu, GpuError, Module};
use crate::augment::{ViewParams, VIEW_PARAMS_BYTES};

/// Most taps of a blur kernel the GPU path takes (the paper's 10% of 224 is 23).
pub const MAX_BLUR_TAPS: u32 = 511;

/// Memory order of the output batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[views, 3, h, w]`.
    #[default]
    Nchw,
    /// `[views, h, w, 3]` (channels last).
    Nhwc,
}

/// The output batch: f32 or bf16 (raw `u16` bit patterns) values.
#[derive(Debug)]
pub enum AugOutput<'a> {
    /// 32-bit floats.
    F32(&'a mut CudaSlice<f32>),
    /// bf16 as raw bits.
    Bf16(&'a mut CudaSlice<u16>),
}

impl AugOutput<'_> {
    fn len(&self) -> usize {
        match self {
            AugOutput::F32(s) => s.len(),
            AugOutput::Bf16(s) => s.len(),
        }
    }
}

/// Buffers for batches of up to `max_views` views of `h x w` pixels.
pub struct AugmentGpu {
    max_views: usize,
    h: usize,
    w: usize,
    params: CudaSlice<u8>,
    work: CudaSlice<f32>,
    tmp: CudaSlice<f32>,
    mean: CudaSlice<f32>,
    inv_std: CudaSlice<f32>,
}

impl std::fmt::Debug for AugmentGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AugmentGpu")
            .field("max_views", &self.max_views)
            .field("h", &self.h)
            .field("w", &self.w)
            .finish()
    }
}

impl AugmentGpu {
    /// Buffers for `max_views` views of `h x w`, normalised with per-channel `mean` and `std`
    /// (use mean 0 and std 1 for values in \[0, 1\]).
    pub fn new(
        gpu: &Gpu,
        max_views: usize,
        h: usize,
        w: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Self, GpuError> {
        ensure(max_views > 0 && h > 0 && w > 0, || {
            format!(
                "an augmentation batch needs views and pixels, got {max_views} views of {w}x{h}"
            )
        })?;
        ensure(std.iter().all(|s| s.is_finite() && *s > 0.0), || {
            format!("normalisation std must be finite and positive, got {std:?}")
        })?;
        ensure(mean.iter().all(|m| m.is_finite()), || {
            format!("normalisation mean must be finite, got {mean:?}")
        })?;
        int(max_views * 3 * h * w, "views * 3 * h * w")?;
        let n = max_views * 3 * h * w;
        let inv: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
        Ok(AugmentGpu {
            max_views,
            h,
            w,
            params: gpu.zeros(max_views * VIEW_PARAMS_BYTES)?,
            work: gpu.zeros(n)?,
            tmp: gpu.zeros(n)?,
            mean: gpu.upload(&mean)?,
            inv_std: gpu.upload(&inv)?,
        })
    }

    /// Applies `params[v]` to crop `v` of `crops` (`views x 3 x h x w` u8, planar) into `out`
    /// (`views x 3 x h x w` values in `layout`).
    pub fn apply(
        &mut self,
        gpu: &Gpu,
        crops: &CudaSlice<u8>,
        params: &[ViewParams],
        layout: Layout,
        out: AugOutput<'_>,
    ) -> Result<(), GpuError> {
        let views = params.len();
        let per = 3 * self.h * self.w;
        ensure(views > 0 && views <= self.max_views, || {
            format!(
                "{views} views given, this batch holds 1 to {}",
                self.max_views
            )
        })?;
        ensure(crops.len() >= views * per, || {
            format!(
                "crops hold {} bytes, {views} views of 3x{}x{} need {}",
                crops.len(),
                self.h,
                self.w,
                views * per
            )
        })?;
        ensure(out.len() >= views * per, || {
            format!(
                "the output holds {} values, {views} views need {}",
                out.len(),
                views * per
            )
        })?;
        for (i, p) in params.iter().enumerate() {
            ensure(
                p.out_w as usize == self.w && p.out_h as usize == self.h,
                || {
                    format!(
                        "view {i} is {}x{}, the batch is {}x{}",
                        p.out_w, p.out_h, self.w, self.h
                    )
                },
            )?;
            if p.sobel != 0 {
                return Err(GpuError::Unsupported(format!(
                    "view {i} asks for the Sobel transform, which only the CPU path implements"
                )));
            }
            ensure(
                p.blur_kernel <= MAX_BLUR_TAPS && (p.blur_kernel <= 1 || p.blur_kernel % 2 == 1),
                || {
                    format!(
                        "view {i}: blur kernel of {} taps (odd, at most {MAX_BLUR_TAPS})",
                        p.blur_kernel
                    )
                },
            )?;
            ensure(p.blur_sigma.is_finite() && p.noise_std.is_finite(), || {
                format!(
                    "view {i}: blur sigma {} / noise std {} must be finite",
                    p.blur_sigma, p.noise_std
                )
            })?;
        }
        let stream = gpu.stream().clone();
        let bytes = ViewParams::slice_as_bytes(params);
        {
            let mut dst = self.params.slice_mut(0..bytes.len());
            stream.memcpy_htod(bytes, &mut dst)?;
        }
        let (h, w) = (int(self.h, "h")?, int(self.w, "w")?);
        let f = gpu.function(Module::Augment, "aug_color")?;
        let mut b = stream.launch_builder(&f);
        b.arg(crops)
            .arg(&self.params)
            .arg(&h)
            .arg(&w)
            .arg(&mut self.work);
        // SAFETY: aug_color(const u8*, const ViewParams*, int, int, float*): one block per view,
        // crops and work hold views * 3 * h * w, params holds `views` structs (112 bytes each,
        // the CUDA struct has the same 28 4-byte fields).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (views as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        let blocks = (per as u32).div_ceil(256);
        let cfg = LaunchConfig {
            grid_dim: (blocks, views as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let any_blur = params
            .iter()
            .any(|p| p.blur_sigma > 0.0 && p.blur_kernel > 1);
        if any_blur {
            let f = gpu.function(Module::Augment, "aug_blur_h")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&self.work)
                .arg(&self.params)
                .arg(&h)
                .arg(&w)
                .arg(&mut self.tmp);
            // SAFETY: aug_blur_h(const float*, const ViewParams*, int, int, float*): grid.y =
            // views, one thread per element of a view.
            unsafe { b.launch(cfg) }?;
        }
        let src = if any_blur { &self.tmp } else { &self.work };
        let layout_i: i32 = match layout {
            Layout::Nchw => 0,
            Layout::Nhwc => 1,
        };
        let dtype: i32 = match out {
            AugOutput::F32(_) => 0,
            AugOutput::Bf16(_) => 1,
        };
        let f = gpu.function(Module::Augment, "aug_finish")?;
        let mut b = stream.launch_builder(&f);
        b.arg(src)
            .arg(&self.params)
            .arg(&h)
            .arg(&w)
            .arg(&self.mean)
            .arg(&self.inv_std)
            .arg(&layout_i);
        match out {
            AugOutput::F32(o) => {
                b.arg(&dtype).arg(o);
                // SAFETY: aug_finish(..., int layout, int dtype, void* out) with out holding
                // views * 3 * h * w f32 (checked above).
                unsafe { b.launch(cfg) }?;
            }
            AugOutput::Bf16(o) => {
                b.arg(&dtype).arg(o);
                // SAFETY: as above, with bf16 (2-byte) values.
                unsafe { b.launch(cfg) }?;
            }
        }
        Ok(())
    }
}

//! The CUDA backend: convolutions through cuDNN, linear layers through cuBLAS, everything else
//! through the hand-written kernels of [`simclr_kernels::cuda`].
//!
//! One [`CudaBackend`] per device ordinal, created on first use and shared by every tensor on
//! that device; every operation runs in order on its one stream, so a tensor is ready for the
//! next operation as soon as the launch that writes it is queued.
//!
//! CUDA is loaded at run time: on a machine without a GPU, [`CudaBackend::get`] returns an
//! error that says what is missing and nothing else changes.

mod blas;
mod cache;
mod dnn;
pub(crate) mod ops;

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

use simclr_kernels::cuda::cudarc::cublas::CudaBlas;
use simclr_kernels::cuda::cudarc::driver::CudaSlice;
use simclr_kernels::cuda::ntxent::{NtXentGpu, Precision as LossPrecision};
use simclr_kernels::cuda::{Gpu, GpuError};

pub(crate) use cache::{end_step_all, DeviceSlice};

use crate::error::{NnError, Result};
use crate::tensor::DeviceElem;

/// How the convolutions of the CUDA backend compute (and, in `Bf16`, what type the trunk's
/// activations have). The linear layers' cuBLAS products and the NT-Xent loss stay f32 in every
/// mode, as under PyTorch's defaults (TF32 allowed for cuDNN, not for matrix products).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MathMode {
    /// Full f32 arithmetic (CUDA cores): the reference against the CPU, tight tolerances.
    #[default]
    Fp32,
    /// TF32 tensor cores for convolutions (10-bit mantissa inputs, f32 accumulation), as
    /// PyTorch's `allow_tf32` for cuDNN: faster, looser.
    Tf32,
    /// Mixed precision: bf16 tensor cores for convolutions (f32 accumulation) and bf16
    /// activations between layers, so the trunk's activations and their gradients take half
    /// the memory and bandwidth. Master weights and their gradients, batch-norm statistics
    /// (summed in f64), the pooled features, the projection head and the loss stay f32, as
    /// under `torch.autocast(bfloat16)` (where the head's products would be bf16 too).
    Bf16,
}

impl std::str::FromStr for MathMode {
    type Err = NnError;

    fn from_str(s: &str) -> Result<MathMode> {
        match s {
            "fp32" => Ok(MathMode::Fp32),
            "tf32" => Ok(MathMode::Tf32),
            "bf16" => Ok(MathMode::Bf16),
            other => Err(NnError::Invalid {
                op: "CUDA math",
                msg: format!("`{other}` is not one of fp32, tf32, bf16"),
            }),
        }
    }
}

/// One GPU as the training backend sees it: the kernels, cuBLAS, cuDNN and the plans and
/// workspaces cached between steps.
pub struct CudaBackend {
    ordinal: usize,
    gpu: Gpu,
    blas: CudaBlas,
    dnn: Mutex<dnn::Dnn>,
    losses: Mutex<HashMap<(usize, usize), NtXentGpu>>,
    cache: cache::DeviceCache,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .field("gpu", &self.gpu)
            .finish()
    }
}

static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();

impl CudaBackend {
    /// The backend of device `ordinal`, created on first use (then shared).
    pub fn get(ordinal: usize) -> Result<Arc<CudaBackend>> {
        let map = BACKENDS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(&ordinal) {
            return Ok(b.clone());
        }
        let b = Arc::new(Self::open(ordinal)?);
        map.insert(ordinal, b.clone());
        Ok(b)
    }

    fn open(ordinal: usize) -> Result<CudaBackend> {
        let gpu = Gpu::new(ordinal)?;
        // SAFETY: only tries to dlopen the libraries under their usual names.
        if !unsafe { simclr_kernels::cuda::cudarc::cublas::sys::is_culib_present() } {
            return Err(NnError::Cuda(
                "cuBLAS (libcublas.so.13) could not be loaded: put the CUDA 13 libraries, or \
                 site-packages/nvidia/cu13/lib of the nvidia-cublas wheel, on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { simclr_kernels::cuda::cudarc::cudnn::sys::is_culib_present() } {
            return Err(NnError::Cuda(
                "cuDNN (libcudnn.so.9) could not be loaded: install nvidia-cudnn-cu13 and put \
                 its lib folder on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        // Compile the training kernels now, so a missing or broken NVRTC is an error here
        // (and `Device::auto` falls back to the CPU) rather than at the first step.
        gpu.function(simclr_kernels::cuda::Module::Train, "relu_f32")?;
        keep_freed_memory(&gpu)?;
        let blas = CudaBlas::new(gpu.stream().clone()).map_err(cuda_err("cuBLAS init"))?;
        let dnn = dnn::Dnn::new(&gpu, math_mode_from_env()?)?;
        Ok(CudaBackend {
            ordinal,
            gpu,
            blas,
            dnn: Mutex::new(dnn),
            losses: Mutex::new(HashMap::new()),
            cache: cache::DeviceCache::new(),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The kernels' view of the device (stream, compiled modules).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The math of the convolutions: [`MathMode::Fp32`] unless `SIMCLR_CUDA_MATH` says
    /// `tf32` or `bf16` (or [`CudaBackend::set_math_mode`] changed it).
    pub fn math_mode(&self) -> MathMode {
        self.dnn.lock().unwrap_or_else(|e| e.into_inner()).math
    }

    /// Sets the math of the convolutions from now on (plans are rebuilt).
    pub fn set_math_mode(&self, math: MathMode) {
        let mut d = self.dnn.lock().unwrap_or_else(|e| e.into_inner());
        if d.math != math {
            d.math = math;
            d.clear_plans();
        }
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.gpu.synchronize()?)
    }

    /// A zeroed buffer of `len` floats (at least one), from the cache when it holds one.
    pub(crate) fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.zeros_of::<f32>(len)
    }

    /// The NT-Xent workspace for `rows x dim`, kept between steps.
    pub(crate) fn with_loss<T>(
        &self,
        rows: usize,
        dim: usize,
        f: impl FnOnce(&mut NtXentGpu) -> Result<T>,
    ) -> Result<T> {
        let mut map = self.losses.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&(rows, dim)) {
            // One shape at a time in practice (the batch is fixed); drop stale workspaces.
            map.clear();
            let ws = NtXentGpu::new(&self.gpu, rows, dim, LossPrecision::F32)?;
            map.insert((rows, dim), ws);
        }
        f(map.get_mut(&(rows, dim)).expect("inserted above"))
    }
}

/// What the device's stream-ordered memory pool holds, in bytes (see [`CudaBackend::pool_stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Memory the pool holds from the driver now.
    pub reserved: u64,
    /// The most it has held.
    pub reserved_peak: u64,
    /// Memory handed out and not yet freed.
    pub used: u64,
}

/// The device's default memory pool, which cudarc's stream-ordered allocations draw on.
fn default_pool(gpu: &Gpu) -> Result<simclr_kernels::cuda::cudarc::driver::sys::CUmemoryPool> {
    use simclr_kernels::cuda::cudarc::driver::sys;
    let ctx = gpu.context();
    ctx.bind_to_thread().map_err(GpuError::from)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver call on this context's device; `pool` outlives it.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(NnError::Cuda(format!("cuDeviceGetDefaultMemPool: {r:?}")));
    }
    Ok(pool)
}

impl CudaBackend {
    /// The memory pool's figures. Between training steps, with the pool keeping what is freed,
    /// `reserved` stays put once the first steps have run: the steady-state step takes no new
    /// memory from the driver; and `used` comes back to where it was: nothing leaks. (`used`
    /// counts the buffers of [`CudaBackend::buffer_stats`]'s cache.)
    pub fn pool_stats(&self) -> Result<PoolStats> {
        use simclr_kernels::cuda::cudarc::driver::sys::{CUmemPool_attribute as A, CUresult};
        if !self.gpu.context().has_async_alloc() {
            return Err(NnError::Cuda(
                "this device has no stream-ordered memory pool".into(),
            ));
        }
        let pool = default_pool(&self.gpu)?;
        let get = |attr: A| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: these attributes are 64-bit values written to `v`, which outlives the call.
            let r = unsafe {
                simclr_kernels::cuda::cudarc::driver::sys::cuMemPoolGetAttribute(
                    pool,
                    attr,
                    (&mut v as *mut u64).cast(),
                )
            };
            if r != CUresult::CUDA_SUCCESS {
                return Err(NnError::Cuda(format!(
                    "cuMemPoolGetAttribute({attr:?}): {r:?}"
                )));
            }
            Ok(v)
        };
        Ok(PoolStats {
            reserved: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_peak: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            used: get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        })
    }

    /// Frees the cached buffers ([`CudaBackend::release_buffers`]), hands the pool's unused
    /// memory back to the driver and restarts its peak from what it holds then (between
    /// benchmark cases, so each case's peak is its own). Waits for the device first.
    pub fn trim_pool(&self) -> Result<()> {
        use simclr_kernels::cuda::cudarc::driver::sys::{self, CUmemPool_attribute as A, CUresult};
        self.free_unused_memory()?;
        if !self.gpu.context().has_async_alloc() {
            return Ok(());
        }
        let pool = default_pool(&self.gpu)?;
        let mut zero = 0u64;
        // SAFETY: a driver call on this device's pool; `zero` outlives it.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
        if r != CUresult::CUDA_SUCCESS {
            return Err(NnError::Cuda(format!("cuMemPoolSetAttribute: {r:?}")));
        }
        Ok(())
    }

    /// Frees the cached buffers and hands the pool's free memory back to the driver (after
    /// the device is done with it): what an allocation that failed needs before a retry.
    pub(crate) fn free_unused_memory(&self) -> Result<()> {
        use simclr_kernels::cuda::cudarc::driver::sys::{self, CUresult};
        self.release_buffers()?;
        if !self.gpu.context().has_async_alloc() {
            return Ok(());
        }
        self.synchronize()?;
        let pool = default_pool(&self.gpu)?;
        // SAFETY: a driver call on this device's pool; trimming releases only memory no
        // allocation holds.
        let r = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(NnError::Cuda(format!("cuMemPoolTrimTo: {r:?}")));
        }
        Ok(())
    }
}

/// Lets the device's stream-ordered memory pool keep what is freed instead of handing it back
/// to the driver at every synchronisation (CUDA's default), so from the second training step
/// on the buffers of a step come from the pool, not from new device allocations.
fn keep_freed_memory(gpu: &Gpu) -> Result<()> {
    use simclr_kernels::cuda::cudarc::driver::sys;
    let ctx = gpu.context();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let pool = default_pool(gpu)?;
    // SAFETY: a plain driver call on this context's pool; `threshold` outlives it.
    unsafe {
        let mut threshold = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(NnError::Cuda(format!("cuMemPoolSetAttribute: {r:?}")));
        }
    }
    Ok(())
}

/// The number of CUDA devices the driver sees (0 without a driver).
pub fn device_count() -> usize {
    if !simclr_kernels::cuda::gpu_available() {
        return 0;
    }
    simclr_kernels::cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n as usize)
}

fn math_mode_from_env() -> Result<MathMode> {
    match std::env::var("SIMCLR_CUDA_MATH").as_deref() {
        Err(_) | Ok("") => Ok(MathMode::Fp32),
        Ok(s) => s.parse().map_err(|_| NnError::Invalid {
            op: "SIMCLR_CUDA_MATH",
            msg: format!("`{s}` is not one of fp32, tf32, bf16"),
        }),
    }
}

/// A closure turning a CUDA library error into [`NnError::Cuda`], naming the call.
pub(crate) fn cuda_err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> NnError {
    move |e| NnError::Cuda(format!("{what}: {e:?}"))
}

/// Values in device memory (f32 unless said otherwise), with the backend that owns them. When
/// dropped, the memory goes to the backend's cache for the next buffer of its size.
pub struct CudaBuffer<T = f32> {
    pub(crate) backend: Arc<CudaBackend>,
    pub(crate) data: ManuallyDrop<CudaSlice<T>>,
    /// Gives the memory to the backend's cache (set where `T`'s cache is known).
    recycle: fn(&CudaBackend, CudaSlice<T>),
}

// The bounds sit on the crate-private methods: `DeviceElem` is not part of the public API.
impl<T> CudaBuffer<T> {
    /// A buffer over `data`, memory of `backend`'s device.
    pub(crate) fn new(backend: Arc<CudaBackend>, data: CudaSlice<T>) -> CudaBuffer<T>
    where
        T: DeviceElem,
    {
        CudaBuffer {
            backend,
            data: ManuallyDrop::new(data),
            recycle: CudaBackend::give_back::<T>,
        }
    }

    /// A copy in other device memory (from the cache when it holds a buffer of this size).
    pub(crate) fn duplicate(&self) -> Result<CudaBuffer<T>>
    where
        T: DeviceElem,
    {
        let mut data = self.backend.uninit::<T>(self.data.len())?;
        self.backend
            .gpu()
            .stream()
            .memcpy_dtod(&*self.data, &mut data)
            .map_err(GpuError::from)?;
        Ok(CudaBuffer::new(self.backend.clone(), data))
    }
}

impl<T> CudaBuffer<T> {
    /// The backend of the device holding the values.
    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    /// The device values.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.data
    }
}

impl<T> std::ops::Deref for CudaBuffer<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.data
    }
}

impl<T> std::ops::DerefMut for CudaBuffer<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }
}

impl<T> Drop for CudaBuffer<T> {
    fn drop(&mut self) {
        // Should the cache free the memory, it does so in the thread's current context: make
        // sure it is this GPU's (a tensor may be dropped on any thread). Binding reports and
        // clears an error an earlier asynchronous call recorded: log it, and bind again.
        let ctx = self.backend.gpu().context();
        if let Err(e) = ctx.bind_to_thread() {
            tracing::warn!(
                "cuda:{}: a device error surfaced: {e}",
                self.backend.ordinal
            );
            let _ = ctx.bind_to_thread();
        }
        // SAFETY: `data` is taken once, here, and never used again.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        (self.recycle)(&self.backend, data);
    }
}

impl<T> std::fmt::Debug for CudaBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuffer(cuda:{}, {})",
            self.backend.ordinal,
            self.data.len()
        )
    }
}

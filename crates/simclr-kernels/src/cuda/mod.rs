//! The CUDA kernels: NVRTC-compiled at first use, cached per context, launched through typed,
//! safe wrappers.
//!
//! The library loads the CUDA driver and NVRTC at run time (cudarc's dynamic loading), so it
//! builds and runs on machines without CUDA: [`Gpu::new`] then returns a [`GpuError`] that says
//! what is missing, and nothing panics.
//!
//! - [`source`]: the embedded `.cu` sources and their compilation to PTX.
//! - [`ntxent`]: the fused NT-Xent loss.
//! - [`augment`]: the colour stage of the augmentation on u8 crops.
//! - [`layout`]: max pooling, NCHW/NHWC permutes, the linear layer's bias.
//! - [`train`]: element-wise ops, batch norm, global average pooling, SGD/LARS, casts.

pub mod augment;
pub mod layout;
pub mod ntxent;
pub mod source;
pub mod train;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    ValidAsZeroBits,
};

pub use source::Module;

/// The cudarc crate the launchers take their buffers from (`CudaSlice`, streams), re-exported so
/// embedders use the same version.
pub use cudarc;

/// Why a GPU operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// The CUDA driver library (`libcuda.so`) is not on the library path.
    #[error(
        "no CUDA driver: libcuda.so could not be loaded (no NVIDIA GPU or driver on this machine)"
    )]
    NoDriver,
    /// NVRTC (`libnvrtc.so.13`) is not on the library path.
    #[error(
        "NVRTC not found: libnvrtc.so.13 could not be loaded (install the CUDA 13 toolkit, or \
         `pip install nvidia-cuda-nvrtc==13.0.88` and put site-packages/nvidia/cu13/lib on \
         LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    /// The driver reports no device with the requested ordinal.
    #[error("no CUDA device {ordinal}: the driver sees {count}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    /// NVRTC rejected a kernel module.
    #[error("NVRTC could not compile kernels/{module}:\n{log}")]
    Compile {
        /// The module's file name.
        module: &'static str,
        /// NVRTC's log.
        log: String,
    },
    /// The device or an argument is outside what the kernels support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An argument does not fit the call (a length, a shape).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Whether a CUDA driver can be loaded and sees at least one device. Never panics.
pub fn gpu_available() -> bool {
    // SAFETY: only tries to dlopen the driver library under its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

/// One GPU: its context, the stream the kernels run on, and the modules compiled for it.
///
/// Modules are compiled with NVRTC for the device's architecture the first time one of their
/// kernels is launched, and kept for the life of the `Gpu`.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sms: u32,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    /// Kernels looked up so far: a launch then costs no `cuModuleGetFunction`.
    functions: Mutex<HashMap<Module, HashMap<String, CudaFunction>>>,
    /// Device allocations made through this `Gpu` (see [`Gpu::allocations`]).
    allocations: AtomicU64,
    /// The per-block partial sums of [`train::sum_into`], allocated once.
    pub(crate) sum_partials: Mutex<Option<CudaSlice<f64>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .field("sms", &self.sms)
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` (its primary context and default stream).
    pub fn new(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only tries to dlopen the driver library under its usual names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(GpuError::Unsupported(format!(
                "compute capability {major}.{minor}: the kernels need bf16 tensor cores (8.0 or newer)"
            )));
        }
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as u32;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            sms,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            allocations: AtomicU64::new(0),
            sum_partials: Mutex::new(None),
        })
    }

    /// The stream every launch of this `Gpu` goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's architecture, as NVRTC names it (`sm_90` for an H100).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.sms
    }

    /// The device's name.
    pub fn name(&self) -> Result<String, GpuError> {
        Ok(self.ctx.name()?)
    }

    /// Kernel `name` of `module`, compiling the module on first use.
    pub fn function(&self, module: Module, name: &str) -> Result<CudaFunction, GpuError> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        let known = functions.entry(module).or_default();
        if let Some(f) = known.get(name) {
            return Ok(f.clone());
        }
        let f = self.load_function(module, name)?;
        known.insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn load_function(&self, module: Module, name: &str) -> Result<CudaFunction, GpuError> {
        let m = {
            let mut cache = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(&module) {
                Some(m) => m.clone(),
                None => {
                    let ptx = source::compile(module, &self.arch)?;
                    let m = self.ctx.load_module(ptx)?;
                    cache.insert(module, m.clone());
                    m
                }
            }
        };
        Ok(m.load_function(name)?)
    }

    /// Copies host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, GpuError> {
        self.count_allocation();
        Ok(self.stream.clone_htod(data)?)
    }

    /// Copies a device buffer back to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        data: &CudaSlice<T>,
    ) -> Result<Vec<T>, GpuError> {
        Ok(self.stream.clone_dtoh(data)?)
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        self.count_allocation();
        Ok(self.stream.alloc_zeros(len.max(1))?)
    }

    /// A device buffer of `len` elements whose values are whatever the memory held: for the
    /// output of a kernel that writes every element, it saves [`Gpu::zeros`]' memset, a full
    /// write pass over the buffer. `T` takes any bit pattern, so the values are merely
    /// unspecified, never invalid.
    pub fn uninit<T: DeviceRepr + bytemuck::AnyBitPattern>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        self.count_allocation();
        // SAFETY: any bits are a valid T (AnyBitPattern), and the memory is the stream's own
        // allocation, ordered after everything queued on it.
        Ok(unsafe { self.stream.alloc(len.max(1)) }?)
    }

    /// How many device buffers [`Gpu::upload`], [`Gpu::zeros`] and [`Gpu::uninit`] have
    /// allocated so far (each one a `cuMemAllocAsync` and cudarc's two events): between two
    /// steady-state training steps it does not move. Allocations made on the stream directly
    /// (as NCCL's host-side collectives do) are not counted.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    fn count_allocation(&self) {
        self.allocations.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for every launch so far.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }
}

/// `GpuError::Invalid` unless `cond`.
pub(crate) fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), GpuError> {
    if cond {
        Ok(())
    } else {
        Err(GpuError::Invalid(msg()))
    }
}

/// Converts a size to the kernels' `int`, or says which argument is too large.
pub(crate) fn int(v: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::Unsupported(format!("{what} = {v} exceeds i32")))
}

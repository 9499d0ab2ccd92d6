//! The CUDA driver API (`libcuda.so`) at its C ABI: the calls cudarc makes, each as the CUDA
//! Driver API reference describes it, with its error codes. A call the emulator does not
//! implement is exported too and fails with `CUDA_ERROR_NOT_SUPPORTED`, naming itself on
//! standard error, never a silent success.
//!
//! Device pointers are host addresses ([`memory`]); every stream is a host thread
//! ([`stream`]); modules are host shared objects built by the emulated NVRTC ([`module`]).

pub mod api;
pub mod context;
pub mod device;
pub mod memory;
pub mod module;
pub mod result;
pub mod stream;
mod stubs;

/// The number of emulated devices: `SIMCLR_GPU_EMU_DEVICES` (1 to 8), 1 by default.
pub fn device_count() -> i32 {
    std::env::var("SIMCLR_GPU_EMU_DEVICES")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map(|n| n.clamp(1, 8))
        .unwrap_or(1)
}

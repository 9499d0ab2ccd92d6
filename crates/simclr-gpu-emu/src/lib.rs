//! An emulated CUDA device for running GPU code without a GPU.
//!
//! Built as a shared library, it stands in for `libcuda.so` (the CUDA driver API) and
//! `libnvrtc.so` (NVRTC) at their C ABI, where cudarc's dynamic loading finds them: put a folder
//! holding links under those names to this library first on `LD_LIBRARY_PATH` (`cargo xtask
//! gpu-emu` does), and the product's own code runs unchanged.
//!
//! - [`compile`]: the emulated NVRTC's compiler: CUDA C++ source, with an emulation prelude, to
//!   a host shared object by the host C++ compiler.
//! - The C++ runtime under `src/runtime/`: CUDA threads as fibers, barriers, warp collectives,
//!   the PTX instructions the kernels use.

pub mod compile;
pub mod cublas;
pub mod cudnn;
pub mod driver;
pub mod nccl;
pub mod numeric;
pub mod nvrtc;

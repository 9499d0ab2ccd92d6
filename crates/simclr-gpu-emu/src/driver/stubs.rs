//! Driver API calls the emulator does not implement. They are exported so that a caller
//! finds them where the real library has them, and each fails with `CUDA_ERROR_NOT_SUPPORTED`
//! and names itself on standard error: a test that reaches one fails saying what to emulate
//! next, never on a silent success.
//!
//! They take no parameters: under the x86-64 System V calling convention the caller owns its
//! argument registers and stack, so a callee that ignores them is sound whatever they were.
#![allow(non_snake_case)]

use super::result::{CuResult, CUDA_ERROR_NOT_SUPPORTED};

macro_rules! not_emulated {
    ($($name:ident)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not emulated.")]
            #[no_mangle]
            pub extern "C" fn $name() -> CuResult {
                eprintln!(concat!("simclr-gpu-emu: ", stringify!($name), " is not emulated"));
                CUDA_ERROR_NOT_SUPPORTED
            }
        )*
    };
}

not_emulated! {
    cuCtxCreate_v3 cuCtxCreate_v4 cuCtxDestroy_v2 cuDevicePrimaryCtxReset_v2
    cuDevicePrimaryCtxSetFlags_v2 cuDeviceSetMemPool cuMemPoolCreate cuMemPoolDestroy
    cuLaunchCooperativeKernel cuLaunchKernelEx cuMemAllocManaged cuMemAdvise_v2
    cuMemPrefetchAsync_v2 cuStreamAttachMemAsync cuStreamBeginCapture_v2 cuStreamEndCapture
    cuGraphInstantiateWithFlags cuGraphLaunch cuGraphUpload cuGraphDestroy cuGraphExecDestroy
    cuImportExternalMemory cuDestroyExternalMemory cuExternalMemoryGetMappedBuffer
    cuMemcpyPeerAsync cuMemcpyPeer cuMemcpy cuMemcpyAsync cuMemcpy2D_v2 cuMemcpy2DAsync_v2
    cuMemHostRegister_v2 cuMemHostUnregister cuMemHostGetDevicePointer_v2 cuPointerGetAttribute
    cuPointerGetAttributes cuOccupancyMaxActiveBlocksPerMultiprocessor
    cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags cuOccupancyMaxPotentialBlockSize
    cuOccupancyMaxPotentialBlockSizeWithFlags cuOccupancyAvailableDynamicSMemPerBlock
    cuOccupancyMaxActiveClusters cuOccupancyMaxPotentialClusterSize cuProfilerStart
    cuProfilerStop cuModuleLoadDataEx cuModuleLoadFatBinary cuLinkCreate_v2 cuLinkAddData_v2
    cuLinkComplete cuLinkDestroy cuDeviceCanAccessPeer cuCtxEnablePeerAccess
    cuCtxDisablePeerAccess cuIpcGetMemHandle cuIpcOpenMemHandle_v2 cuIpcCloseMemHandle
    cuMemGetAddressRange_v2 cuMemAddressReserve cuMemCreate cuMemMap cuMemSetAccess
}

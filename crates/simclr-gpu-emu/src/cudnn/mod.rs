//! cuDNN (`libcudnn.so`, the legacy "graph-free" API of cuDNN 9) at its C ABI: the calls the
//! project's CUDA backend makes through cudarc for its convolutions, as the cuDNN API reference
//! describes them, with its status codes (cuDNN 9's numbering: `BAD_PARAM` 2000, the
//! `NOT_SUPPORTED` family 3000-3999, ...).
//!
//! - [`desc`]: tensor, filter and convolution descriptors, checked as cuDNN checks them.
//! - [`conv`]: the algorithm queries (`*_v7`), workspace sizes, and forward / backward-data /
//!   backward-filter convolutions, with the rules by which an algorithm is refused.
//!
//! Work runs in stream order on the handle's stream (`cudnnSetStream`). Entry points cudarc
//! can reach that are not emulated are exported, print their name and fail with
//! `CUDNN_STATUS_NOT_SUPPORTED`.
#![allow(non_snake_case)]

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::{Mutex, OnceLock};

pub mod conv;
pub mod desc;

/// `cudnnStatus_t`.
pub type CudnnStatus = u32;

macro_rules! statuses {
    ($($name:ident = $v:expr, $text:expr;)*) => {
        $(
            #[doc = $text]
            pub const $name: CudnnStatus = $v;
        )*
        /// The name of a status, NUL-terminated (`cudnnGetErrorString` returns the name).
        fn status_name(s: CudnnStatus) -> &'static str {
            match s {
                $($v => concat!(stringify!($name), "\0"),)*
                _ => "CUDNN_STATUS_UNKNOWN\0",
            }
        }
    };
}

statuses! {
    CUDNN_STATUS_SUCCESS = 0, "The operation completed successfully.";
    CUDNN_STATUS_NOT_INITIALIZED = 1001, "The library was not initialized (no CUDA context).";
    CUDNN_STATUS_BAD_PARAM = 2000, "An incorrect value or parameter was passed.";
    CUDNN_STATUS_INVALID_VALUE = 2001, "An invalid value.";
    CUDNN_STATUS_BAD_PARAM_NULL_POINTER = 2002, "A null pointer where one is not allowed.";
    CUDNN_STATUS_NOT_SUPPORTED = 3000, "The configuration is not supported.";
    CUDNN_STATUS_NOT_SUPPORTED_SHAPE = 3002, "The tensor shapes are not supported.";
    CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE = 3003, "The data types are not supported.";
    CUDNN_STATUS_NOT_SUPPORTED_LAYOUT = 3004, "The tensor layouts are not supported.";
    CUDNN_STATUS_INTERNAL_ERROR = 4000, "An internal cuDNN operation failed.";
    CUDNN_STATUS_EXECUTION_FAILED = 5000, "The GPU program failed to execute.";
}

/// The version reported by `cudnnGetVersion`: 9.2.1 (`CUDNN_VERSION` = major * 10000 +
/// minor * 100 + patch), the headers cudarc's `cudnn` bindings were generated from.
pub const CUDNN_VERSION: usize = 90201;

/// The CUDA runtime version reported by `cudnnGetCudartVersion`: 13.0.
pub const CUDART_VERSION: usize = 13000;

/// A `cudnnHandle_t`'s state.
#[derive(Clone, Copy, Debug)]
pub struct Handle {
    /// The `CUstream` work is queued on (0: the null stream).
    pub stream: usize,
}

fn handles() -> &'static Mutex<HashMap<usize, Handle>> {
    static H: OnceLock<Mutex<HashMap<usize, Handle>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<usize, Handle>> {
    handles().lock().unwrap_or_else(|e| e.into_inner())
}

/// The state of a live handle; a null, destroyed or made-up one is `BAD_PARAM` ("handle is
/// not allocated properly", as the reference words it for every call taking one).
pub fn handle(h: *mut c_void) -> Result<Handle, CudnnStatus> {
    lock()
        .get(&(h as usize))
        .copied()
        .ok_or(CUDNN_STATUS_BAD_PARAM)
}

/// `cudnnCreate`: a handle on the current context's device, on the null stream. Without a
/// current CUDA context it is `CUDNN_STATUS_NOT_INITIALIZED` (cuDNN's CUDA initialisation
/// fails).
///
/// # Safety
/// `h` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnCreate(h: *mut *mut c_void) -> CudnnStatus {
    if h.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    if crate::driver::context::current().is_none() {
        return CUDNN_STATUS_NOT_INITIALIZED;
    }
    let p = Box::into_raw(Box::new(0u8)) as usize;
    lock().insert(p, Handle { stream: 0 });
    // SAFETY: non-null out-pointer.
    unsafe { h.write(p as *mut c_void) };
    CUDNN_STATUS_SUCCESS
}

/// `cudnnDestroy`: waits for the handle's queued work, then frees it.
///
/// # Safety
/// `h` came from `cudnnCreate` (anything else is `BAD_PARAM`).
#[no_mangle]
pub unsafe extern "C" fn cudnnDestroy(h: *mut c_void) -> CudnnStatus {
    let Some(s) = lock().remove(&(h as usize)) else {
        return CUDNN_STATUS_BAD_PARAM;
    };
    let _ = crate::driver::api::synchronize_stream(s.stream as *mut c_void);
    // SAFETY: from Box::into_raw in cudnnCreate, out of the table now.
    drop(unsafe { Box::from_raw(h as *mut u8) });
    CUDNN_STATUS_SUCCESS
}

/// `cudnnSetStream`.
///
/// # Safety
/// `h` as for `cudnnDestroy`.
#[no_mangle]
pub unsafe extern "C" fn cudnnSetStream(h: *mut c_void, stream: *mut c_void) -> CudnnStatus {
    match lock().get_mut(&(h as usize)) {
        Some(s) => {
            s.stream = stream as usize;
            CUDNN_STATUS_SUCCESS
        }
        None => CUDNN_STATUS_BAD_PARAM,
    }
}

/// `cudnnGetStream`.
///
/// # Safety
/// `stream` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn cudnnGetStream(h: *mut c_void, stream: *mut *mut c_void) -> CudnnStatus {
    let s = match handle(h) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if stream.is_null() {
        return CUDNN_STATUS_BAD_PARAM;
    }
    // SAFETY: non-null out-pointer.
    unsafe { stream.write(s.stream as *mut c_void) };
    CUDNN_STATUS_SUCCESS
}

/// `cudnnGetVersion`.
#[no_mangle]
pub extern "C" fn cudnnGetVersion() -> usize {
    CUDNN_VERSION
}

/// `cudnnGetCudartVersion`.
#[no_mangle]
pub extern "C" fn cudnnGetCudartVersion() -> usize {
    CUDART_VERSION
}

/// `cudnnGetErrorString`: the status's name, as cuDNN returns it.
#[no_mangle]
pub extern "C" fn cudnnGetErrorString(s: CudnnStatus) -> *const c_char {
    status_name(s).as_ptr() as *const c_char
}

/// `cudnnAdvVersionCheck`: the sub-libraries are this library: always consistent.
#[no_mangle]
pub extern "C" fn cudnnAdvVersionCheck() -> CudnnStatus {
    CUDNN_STATUS_SUCCESS
}

/// `cudnnCnnVersionCheck`: as `cudnnAdvVersionCheck`.
#[no_mangle]
pub extern "C" fn cudnnCnnVersionCheck() -> CudnnStatus {
    CUDNN_STATUS_SUCCESS
}

/// `cudnnOpsVersionCheck`: as `cudnnAdvVersionCheck`.
#[no_mangle]
pub extern "C" fn cudnnOpsVersionCheck() -> CudnnStatus {
    CUDNN_STATUS_SUCCESS
}

macro_rules! not_emulated {
    ($($name:ident)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not emulated.")]
            ///
            /// It takes no parameters: under the x86-64 System V calling convention the caller
            /// owns its argument registers and stack, so ignoring them is sound.
            #[no_mangle]
            pub extern "C" fn $name() -> CudnnStatus {
                eprintln!(concat!("simclr-gpu-emu: ", stringify!($name), " is not emulated"));
                CUDNN_STATUS_NOT_SUPPORTED
            }
        )*
    };
}

// What cudarc's cudnn module can reach besides the convolution calls.
not_emulated! {
    cudnnActivationForward cudnnConvolutionBiasActivationForward
    cudnnCreateActivationDescriptor cudnnSetActivationDescriptor cudnnDestroyActivationDescriptor
    cudnnCreatePoolingDescriptor cudnnSetPoolingNdDescriptor cudnnDestroyPoolingDescriptor
    cudnnPoolingForward cudnnCreateReduceTensorDescriptor cudnnSetReduceTensorDescriptor
    cudnnDestroyReduceTensorDescriptor cudnnGetReductionIndicesSize
    cudnnGetReductionWorkspaceSize cudnnReduceTensor cudnnSoftmaxForward
    cudnnFindConvolutionForwardAlgorithm cudnnFindConvolutionForwardAlgorithmEx
    cudnnFindConvolutionBackwardDataAlgorithm cudnnFindConvolutionBackwardDataAlgorithmEx
    cudnnFindConvolutionBackwardFilterAlgorithm cudnnFindConvolutionBackwardFilterAlgorithmEx
    cudnnAddTensor cudnnSetTensor cudnnScaleTensor cudnnTransformTensor
}

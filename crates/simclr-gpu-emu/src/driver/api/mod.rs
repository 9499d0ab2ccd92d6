//! The exported driver API entry points.
//!
//! Each follows the CUDA Driver API reference: argument checks and their `CUresult`, the
//! calling thread's current context, stream order, and the sticky error a failed kernel leaves.
#![allow(non_snake_case, clippy::missing_safety_doc)]

mod init;
mod launch;
mod mem;
mod streams;

pub use init::*;
pub use launch::*;
pub use mem::*;
pub use streams::*;

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::context::{self, Context};
use super::memory::{self, Kind};
use super::module::{Function, Launch, Module};
use super::result::*;
use super::stream::{Event, Stream};
use super::{device, device_count};

type CUdevice = c_int;
type CUdeviceptr = u64;
type Handle = *mut c_void;

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Objects handed out as opaque handles (streams, events, modules, functions): the handle is
/// the object's address, and a handle the registry does not hold is `CUDA_ERROR_INVALID_HANDLE`.
struct Registry<T> {
    map: Mutex<HashMap<usize, Arc<T>>>,
}

impl<T> Registry<T> {
    fn new() -> Self {
        Registry {
            map: Mutex::new(HashMap::new()),
        }
    }
    fn insert(&self, v: Arc<T>) -> Handle {
        let h = Arc::as_ptr(&v) as usize;
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(h, v);
        h as Handle
    }
    fn get(&self, h: Handle) -> Option<Arc<T>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(h as usize))
            .cloned()
    }
    fn remove(&self, h: Handle) -> Option<Arc<T>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(h as usize))
    }
    /// The object, or the driver's error for a handle that names none.
    fn lookup(&self, h: Handle) -> Result<Arc<T>, (CuResult, String)> {
        self.get(h).ok_or_else(|| err(CUDA_ERROR_INVALID_HANDLE))
    }
    /// Forgets the object (the `cu*Destroy` and `cuModuleUnload` calls).
    fn destroy(&self, h: Handle) -> Result<Arc<T>, (CuResult, String)> {
        self.remove(h).ok_or_else(|| err(CUDA_ERROR_INVALID_HANDLE))
    }
}

fn streams() -> &'static Registry<Stream> {
    static R: OnceLock<Registry<Stream>> = OnceLock::new();
    R.get_or_init(Registry::new)
}
fn events() -> &'static Registry<Event> {
    static R: OnceLock<Registry<Event>> = OnceLock::new();
    R.get_or_init(Registry::new)
}
fn modules() -> &'static Registry<Module> {
    static R: OnceLock<Registry<Module>> = OnceLock::new();
    R.get_or_init(Registry::new)
}
fn functions() -> &'static Registry<Function> {
    static R: OnceLock<Registry<Function>> = OnceLock::new();
    R.get_or_init(Registry::new)
}

/// Turns a `Result` into a `CUresult`, printing the reason of a failure that has one (the
/// driver itself says nothing; the emulator names what was wrong, to help find the bug).
fn ret(r: Result<(), (CuResult, String)>) -> CuResult {
    match r {
        Ok(()) => CUDA_SUCCESS,
        Err((code, msg)) => {
            if !msg.is_empty() {
                eprintln!("simclr-gpu-emu: {msg}");
            }
            code
        }
    }
}

fn err(code: CuResult) -> (CuResult, String) {
    (code, String::new())
}

fn initialised() -> Result<(), (CuResult, String)> {
    if INITIALISED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(err(CUDA_ERROR_NOT_INITIALIZED))
    }
}

/// The current context, failing as the driver does without one or after a sticky error.
fn ctx() -> Result<Arc<Context>, (CuResult, String)> {
    initialised()?;
    let c = context::current().ok_or_else(|| err(CUDA_ERROR_INVALID_CONTEXT))?;
    match c.sticky() {
        CUDA_SUCCESS => Ok(c),
        e => Err(err(e)),
    }
}

/// The stream a handle names: 0 (legacy) and the documented `CU_STREAM_LEGACY` (1) and
/// `CU_STREAM_PER_THREAD` (2) handles mean the current context's null stream.
fn stream(h: Handle) -> Result<Arc<Stream>, (CuResult, String)> {
    let c = ctx()?;
    match h as usize {
        0..=2 => Ok(c.null_stream()),
        _ => {
            let s = streams().lookup(h)?;
            match s.ctx.sticky() {
                CUDA_SUCCESS => Ok(s),
                e => Err(err(e)),
            }
        }
    }
}

fn device_ok(d: CUdevice) -> Result<(), (CuResult, String)> {
    initialised()?;
    if d < 0 || d >= device_count() {
        return Err(err(CUDA_ERROR_INVALID_DEVICE));
    }
    Ok(())
}

unsafe fn write<T>(p: *mut T, v: T) -> Result<(), (CuResult, String)> {
    if p.is_null() {
        return Err(err(CUDA_ERROR_INVALID_VALUE));
    }
    // SAFETY: non-null out-pointer from the caller.
    unsafe { p.write(v) };
    Ok(())
}

/// Queues `op` on the stream a `CUstream` handle names (null: the current context's null
/// stream), as the libraries' calls that take a stream do; the error is the driver's
/// (`CUDA_ERROR_INVALID_HANDLE` for an unknown stream, a context's sticky error).
pub fn enqueue_on(h: *mut c_void, op: super::stream::Op) -> Result<(), CuResult> {
    let s = stream(h).map_err(|(code, _)| code)?;
    s.enqueue(op);
    Ok(())
}

/// Blocks until everything queued so far on the stream a handle names has run.
pub fn synchronize_stream(h: *mut c_void) -> Result<(), CuResult> {
    let s = stream(h).map_err(|(code, _)| code)?;
    match s.synchronize() {
        CUDA_SUCCESS => Ok(()),
        e => Err(e),
    }
}

//! The exported driver API entry points.
//!
//! Each follows the CUDA Driver API reference: argument checks and their `CUresult`, the
//! calling thread's current context, stream order, and the sticky error a failed kernel leaves.
#![allow(non_snake_case, clippy::missing_safety_doc)]

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

// ---- initialisation, devices ------------------------------------------------------------

/// `cuInit`: flags must be 0.
#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CuResult {
    if flags != 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    INITIALISED.store(true, Ordering::Release);
    CUDA_SUCCESS
}

/// `cuDriverGetVersion`.
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CuResult {
    ret(unsafe { write(v, device::DRIVER_VERSION) })
}

/// `cuDeviceGetCount`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CuResult {
    ret(initialised().and_then(|_| unsafe { write(n, device_count()) }))
}

/// `cuDeviceGet`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(d: *mut CUdevice, ordinal: c_int) -> CuResult {
    ret(device_ok(ordinal).and_then(|_| unsafe { write(d, ordinal) }))
}

/// `cuDeviceGetName`: truncated to `len` bytes, NUL included.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, d: CUdevice) -> CuResult {
    ret(device_ok(d).and_then(|_| {
        if name.is_null() || len <= 0 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let bytes = device::NAME.as_bytes();
        let n = bytes.len().min(len as usize - 1);
        // SAFETY: the caller's buffer holds len bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name as *mut u8, n);
            *name.add(n) = 0;
        }
        Ok(())
    }))
}

/// `cuDeviceGetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(v: *mut c_int, attr: c_int, d: CUdevice) -> CuResult {
    ret(device_ok(d).and_then(|_| {
        let a = device::attribute(attr).ok_or_else(|| err(CUDA_ERROR_INVALID_VALUE))?;
        unsafe { write(v, a) }
    }))
}

/// `cuDeviceTotalMem_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, d: CUdevice) -> CuResult {
    ret(device_ok(d).and_then(|_| unsafe { write(bytes, device::TOTAL_MEMORY as usize) }))
}

/// `cuDeviceGetUuid`: 16 bytes that name the emulated device and its ordinal.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], d: CUdevice) -> CuResult {
    ret(device_ok(d).and_then(|_| {
        let mut u = *b"simclr-gpu-emu\0\0";
        u[15] = d as u8;
        unsafe { write(uuid, u) }
    }))
}

/// `cuDeviceGetUuid_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], d: CUdevice) -> CuResult {
    unsafe { cuDeviceGetUuid(uuid, d) }
}

/// `cuDevicePrimaryCtxRetain`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut Handle, d: CUdevice) -> CuResult {
    ret(device_ok(d).and_then(|_| {
        let c = context::primary(d, true);
        unsafe { write(pctx, context::handle(&c) as Handle) }
    }))
}

/// `cuDevicePrimaryCtxRelease_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(d: CUdevice) -> CuResult {
    ret(device_ok(d).and_then(|_| {
        if context::release(d) {
            Ok(())
        } else {
            Err(err(CUDA_ERROR_INVALID_CONTEXT))
        }
    }))
}

/// `cuDevicePrimaryCtxGetState`: flags 0, active once retained.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    flags: *mut c_uint,
    active: *mut c_int,
    d: CUdevice,
) -> CuResult {
    ret(device_ok(d).and_then(|_| unsafe {
        write(flags, 0)?;
        write(active, 1)
    }))
}

// ---- contexts ------------------------------------------------------------------------------

/// `cuCtxGetCurrent`: null when the thread has none.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let h = context::current().map_or(0, |c| context::handle(&c));
        unsafe { write(pctx, h as Handle) }
    }))
}

/// `cuCtxSetCurrent`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(h: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        if h.is_null() {
            context::set_current(None);
            return Ok(());
        }
        let c = context::from_handle(h as usize).ok_or_else(|| err(CUDA_ERROR_INVALID_CONTEXT))?;
        context::set_current(Some(c));
        Ok(())
    }))
}

/// `cuCtxPushCurrent_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(h: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let c = context::from_handle(h as usize).ok_or_else(|| err(CUDA_ERROR_INVALID_CONTEXT))?;
        context::push_current(c);
        Ok(())
    }))
}

/// `cuCtxPopCurrent_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let c = context::pop_current().ok_or_else(|| err(CUDA_ERROR_INVALID_CONTEXT))?;
        if !pctx.is_null() {
            // SAFETY: non-null out-pointer.
            unsafe { pctx.write(context::handle(&c) as Handle) };
        }
        Ok(())
    }))
}

/// `cuCtxGetDevice`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(d: *mut CUdevice) -> CuResult {
    ret(initialised().and_then(|_| {
        let c = context::current().ok_or_else(|| err(CUDA_ERROR_INVALID_CONTEXT))?;
        unsafe { write(d, c.device) }
    }))
}

/// `cuCtxSynchronize`: waits for every stream of the current context.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CuResult {
    ret(initialised().and_then(|_| {
        let c = context::current().ok_or_else(|| err(CUDA_ERROR_INVALID_CONTEXT))?;
        match c.synchronize() {
            CUDA_SUCCESS => Ok(()),
            e => Err(err(e)),
        }
    }))
}

/// `cuCtxGetLimit`: what was set, else the driver's defaults (1 KiB stack, 1 MiB printf FIFO,
/// 8 MiB malloc heap).
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetLimit(v: *mut usize, limit: c_uint) -> CuResult {
    ret(ctx().and_then(|c| {
        let set = c
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&limit)
            .copied();
        let d = match limit {
            0 => 1024,
            1 => 1 << 20,
            2 => 8 << 20,
            3 => 2,
            4 => 2048,
            5 => 0,
            6 => 32,
            _ => return Err(err(CUDA_ERROR_INVALID_VALUE)),
        };
        unsafe { write(v, set.unwrap_or(d)) }
    }))
}

/// `cuCtxSetLimit`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetLimit(limit: c_uint, v: usize) -> CuResult {
    ret(ctx().and_then(|c| {
        if limit > 6 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        c.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(limit, v);
        Ok(())
    }))
}

/// `cuCtxGetStreamPriorityRange`: [0, -5] as on an H100 (lower is higher priority).
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CuResult {
    ret(ctx().map(|_| {
        // SAFETY: either may be null, per the reference.
        unsafe {
            if !least.is_null() {
                least.write(0);
            }
            if !greatest.is_null() {
                greatest.write(-5);
            }
        }
    }))
}

/// `cuCtxSetFlags`: scheduling flags only; they change nothing here.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetFlags(flags: c_uint) -> CuResult {
    ret(ctx().and_then(|_| {
        if flags & !0x3f != 0 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        Ok(())
    }))
}

/// `cuCtxGetCacheConfig`: prefer none.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCacheConfig(cfg: *mut c_uint) -> CuResult {
    ret(ctx().and_then(|_| unsafe { write(cfg, 0) }))
}

/// `cuCtxSetCacheConfig`: a preference, accepted.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCacheConfig(cfg: c_uint) -> CuResult {
    ret(ctx().and_then(|_| {
        if cfg > 3 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        Ok(())
    }))
}

/// `cuGetErrorName`.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(e: CuResult, s: *mut *const c_char) -> CuResult {
    match name(e) {
        Some(n) => ret(unsafe { write(s, n.as_ptr() as *const c_char) }),
        None => {
            // SAFETY: per the reference, *s is set to NULL for an unknown value.
            if !s.is_null() {
                unsafe { s.write(std::ptr::null()) };
            }
            CUDA_ERROR_INVALID_VALUE
        }
    }
}

/// `cuGetErrorString`.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(e: CuResult, s: *mut *const c_char) -> CuResult {
    match describe(e) {
        Some(n) => ret(unsafe { write(s, n.as_ptr() as *const c_char) }),
        None => {
            if !s.is_null() {
                unsafe { s.write(std::ptr::null()) };
            }
            CUDA_ERROR_INVALID_VALUE
        }
    }
}

// ---- streams and events --------------------------------------------------------------------

const CU_STREAM_NON_BLOCKING: c_uint = 1;

/// `cuStreamCreate`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph: *mut Handle, flags: c_uint) -> CuResult {
    unsafe { cuStreamCreateWithPriority(ph, flags, 0) }
}

/// `cuStreamCreateWithPriority`: priorities outside the range are clamped, as documented.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    ph: *mut Handle,
    flags: c_uint,
    priority: c_int,
) -> CuResult {
    ret(ctx().and_then(|c| {
        if flags & !CU_STREAM_NON_BLOCKING != 0 || ph.is_null() {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let s = Stream::new(
            c.clone(),
            flags & CU_STREAM_NON_BLOCKING == 0,
            false,
            priority.clamp(-5, 0),
        );
        c.add_stream(&s);
        unsafe { write(ph, streams().insert(s)) }
    }))
}

/// `cuStreamDestroy_v2`: work already queued still completes.
#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(h: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let s = streams().destroy(h)?;
        s.close();
        Ok(())
    }))
}

/// `cuStreamSynchronize`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| match s.synchronize() {
        CUDA_SUCCESS => Ok(()),
        e => Err(err(e)),
    }))
}

/// `cuStreamQuery`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| {
        if s.done(s.enqueued()) {
            Ok(())
        } else {
            Err(err(CUDA_ERROR_NOT_READY))
        }
    }))
}

/// `cuStreamGetPriority`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority(h: Handle, p: *mut c_int) -> CuResult {
    ret(stream(h).and_then(|s| unsafe { write(p, s.priority) }))
}

/// `cuStreamGetFlags`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetFlags(h: Handle, f: *mut c_uint) -> CuResult {
    ret(stream(h).and_then(|s| unsafe { write(f, if s.blocking { 0 } else { 1 }) }))
}

/// `cuStreamIsCapturing`: graphs are not emulated, so never.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(h: Handle, status: *mut c_uint) -> CuResult {
    ret(stream(h).and_then(|_| unsafe { write(status, 0) }))
}

/// `cuStreamWaitEvent`: later work on the stream waits for the event's recorded work.
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(h: Handle, e: Handle, flags: c_uint) -> CuResult {
    ret(stream(h).and_then(|s| {
        if flags & !1 != 0 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let ev = events().lookup(e)?;
        if let Some((es, seq)) = ev.point() {
            if !Arc::ptr_eq(&es, &s) {
                s.enqueue(Box::new(move || {
                    es.wait_for(seq);
                    Ok(())
                }));
            }
        }
        Ok(())
    }))
}

/// `cuLaunchHostFunc`: the function runs on the stream's thread in stream order.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(
    h: Handle,
    f: Option<unsafe extern "C" fn(*mut c_void)>,
    data: *mut c_void,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        let f = f.ok_or_else(|| err(CUDA_ERROR_INVALID_VALUE))?;
        let data = data as usize;
        s.enqueue(Box::new(move || {
            // SAFETY: the caller's host function with its data, as cuLaunchHostFunc runs it.
            unsafe { f(data as *mut c_void) };
            Ok(())
        }));
        Ok(())
    }))
}

const CU_EVENT_DISABLE_TIMING: c_uint = 2;

/// `cuEventCreate`.
#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph: *mut Handle, flags: c_uint) -> CuResult {
    ret(ctx().and_then(|_| {
        if flags & !0xf != 0 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let e = Event::new(flags & CU_EVENT_DISABLE_TIMING == 0);
        unsafe { write(ph, events().insert(e)) }
    }))
}

/// `cuEventDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(h: Handle) -> CuResult {
    ret(initialised().and_then(|_| events().destroy(h).map(|_| ())))
}

/// `cuEventRecord`.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: Handle, h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| {
        let ev = events().lookup(e)?;
        ev.record(&s);
        Ok(())
    }))
}

/// `cuEventRecordWithFlags`.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(e: Handle, h: Handle, _flags: c_uint) -> CuResult {
    unsafe { cuEventRecord(e, h) }
}

/// `cuEventQuery`.
#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(e: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let ev = events().lookup(e)?;
        if ev.complete() {
            Ok(())
        } else {
            Err(err(CUDA_ERROR_NOT_READY))
        }
    }))
}

/// `cuEventSynchronize`.
#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let ev = events().lookup(e)?;
        ev.synchronize();
        match ev.point().map_or(CUDA_SUCCESS, |(s, _)| s.ctx.sticky()) {
            CUDA_SUCCESS => Ok(()),
            e => Err(err(e)),
        }
    }))
}

/// `cuEventElapsedTime`: milliseconds between two completed timing events.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let a = events().lookup(start)?;
        let b = events().lookup(end)?;
        if !a.timing || !b.timing {
            return Err(err(CUDA_ERROR_INVALID_HANDLE));
        }
        if !a.complete() || !b.complete() {
            return Err(err(CUDA_ERROR_NOT_READY));
        }
        let (Some(ta), Some(tb)) = (a.time(), b.time()) else {
            return Err(err(CUDA_ERROR_INVALID_HANDLE));
        };
        let d = if tb >= ta {
            (tb - ta).as_secs_f32()
        } else {
            -(ta - tb).as_secs_f32()
        };
        unsafe { write(ms, d * 1e3) }
    }))
}

/// `cuEventElapsedTime_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: Handle,
    end: Handle,
) -> CuResult {
    unsafe { cuEventElapsedTime(ms, start, end) }
}

// ---- memory --------------------------------------------------------------------------------

fn device_alloc(c: &Context, bytes: usize) -> Result<usize, (CuResult, String)> {
    memory::alloc(bytes, Kind::Device(c.device)).map_err(|e| {
        (
            e,
            if e == CUDA_ERROR_INVALID_VALUE {
                "cuMemAlloc of 0 bytes".into()
            } else {
                format!("out of memory allocating {bytes} bytes")
            },
        )
    })
}

/// `cuMemAlloc_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytes: usize) -> CuResult {
    ret(ctx().and_then(|c| {
        let p = device_alloc(&c, bytes)?;
        unsafe { write(dptr, p as CUdeviceptr) }
    }))
}

/// `cuMemAllocAsync`: the memory is usable in stream order (here at once).
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytes: usize,
    h: Handle,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        let p = device_alloc(&s.ctx, bytes)?;
        unsafe { write(dptr, p as CUdeviceptr) }
    }))
}

/// `cuMemAllocFromPoolAsync`: every pool is the device's default pool.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    bytes: usize,
    _pool: Handle,
    h: Handle,
) -> CuResult {
    unsafe { cuMemAllocAsync(dptr, bytes, h) }
}

/// `cuMemFree_v2`: waits for the device, as the reference says cuMemFree synchronises.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(p: CUdeviceptr) -> CuResult {
    ret(ctx().and_then(|c| {
        memory::retire(p as usize, true).map_err(|e| {
            (
                e,
                format!("cuMemFree of {p:#x}, which is not a live device allocation"),
            )
        })?;
        c.synchronize();
        memory::release(p as usize);
        Ok(())
    }))
}

/// `cuMemFreeAsync`: the memory goes back when the stream reaches the call.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(p: CUdeviceptr, h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| {
        memory::retire(p as usize, true).map_err(|e| {
            (
                e,
                format!("cuMemFreeAsync of {p:#x}, which is not a live device allocation"),
            )
        })?;
        s.enqueue(Box::new(move || {
            memory::release(p as usize);
            Ok(())
        }));
        Ok(())
    }))
}

/// `cuMemGetInfo_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CuResult {
    ret(ctx().and_then(|_| {
        let used = memory::USED.load(Ordering::Relaxed);
        unsafe {
            write(free, (device::TOTAL_MEMORY - used) as usize)?;
            write(total, device::TOTAL_MEMORY as usize)
        }
    }))
}

/// `cuMemHostAlloc`: page-locked host memory (copies to and from it are asynchronous).
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CuResult {
    ret(ctx().and_then(|_| {
        let p = memory::alloc(bytes, Kind::Pinned).map_err(err)?;
        unsafe { write(pp, p as *mut c_void) }
    }))
}

/// `cuMemAllocHost_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytes: usize) -> CuResult {
    unsafe { cuMemHostAlloc(pp, bytes, 0) }
}

/// `cuMemFreeHost`.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CuResult {
    ret(ctx().and_then(|c| {
        memory::retire(p as usize, false).map_err(|e| {
            (
                e,
                format!("cuMemFreeHost of {p:?}, which is not page-locked memory"),
            )
        })?;
        c.synchronize();
        memory::release(p as usize);
        Ok(())
    }))
}

/// Queues a copy of `len` bytes; `dst_device`/`src_device` say which side must be device
/// memory. The host side of a copy from pageable memory is read at the call, and a copy to
/// pageable memory completes before the call returns, as the reference's "API synchronization
/// behavior" describes; page-locked host memory is copied in stream order.
fn copy(
    s: &Arc<Stream>,
    dst: usize,
    src: usize,
    len: usize,
    dst_device: bool,
    src_device: bool,
    what: &str,
) -> Result<(), (CuResult, String)> {
    if len == 0 {
        return Ok(());
    }
    if dst_device {
        memory::check_device(dst, len, &format!("{what} destination"))?;
    } else if dst == 0 {
        return Err((
            CUDA_ERROR_INVALID_VALUE,
            format!("{what}: null destination"),
        ));
    }
    if src_device {
        memory::check_device(src, len, &format!("{what} source"))?;
    } else if src == 0 {
        return Err((CUDA_ERROR_INVALID_VALUE, format!("{what}: null source")));
    }
    if !src_device && !memory::is_pinned(src, len) {
        // SAFETY: the caller's host buffer holds len bytes now.
        let staged: Vec<u8> = unsafe { std::slice::from_raw_parts(src as *const u8, len) }.to_vec();
        s.enqueue(Box::new(move || {
            // SAFETY: dst was checked to be a device allocation of at least len bytes.
            unsafe { std::ptr::copy_nonoverlapping(staged.as_ptr(), dst as *mut u8, len) };
            Ok(())
        }));
        return Ok(());
    }
    let seq = s.enqueue(Box::new(move || {
        // SAFETY: both ranges were checked (or are the caller's host memory of len bytes);
        // `copy` tolerates the overlap a device-to-device copy inside one buffer may have.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
        Ok(())
    }));
    if !dst_device && !memory::is_pinned(dst, len) {
        s.wait_for(seq);
        match s.ctx.sticky() {
            CUDA_SUCCESS => {}
            e => return Err(err(e)),
        }
    }
    Ok(())
}

/// `cuMemcpyHtoD_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
) -> CuResult {
    ret(stream(std::ptr::null_mut()).and_then(|s| {
        copy(
            &s,
            dst as usize,
            src as usize,
            n,
            true,
            false,
            "cuMemcpyHtoD",
        )?;
        sync_result(&s)
    }))
}

/// `cuMemcpyHtoDAsync_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    h: Handle,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        copy(
            &s,
            dst as usize,
            src as usize,
            n,
            true,
            false,
            "cuMemcpyHtoDAsync",
        )
    }))
}

/// `cuMemcpyDtoH_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CuResult {
    ret(stream(std::ptr::null_mut()).and_then(|s| {
        copy(
            &s,
            dst as usize,
            src as usize,
            n,
            false,
            true,
            "cuMemcpyDtoH",
        )?;
        sync_result(&s)
    }))
}

/// `cuMemcpyDtoHAsync_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    h: Handle,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        copy(
            &s,
            dst as usize,
            src as usize,
            n,
            false,
            true,
            "cuMemcpyDtoHAsync",
        )
    }))
}

/// `cuMemcpyDtoD_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CuResult {
    ret(stream(std::ptr::null_mut()).and_then(|s| {
        copy(
            &s,
            dst as usize,
            src as usize,
            n,
            true,
            true,
            "cuMemcpyDtoD",
        )?;
        sync_result(&s)
    }))
}

/// `cuMemcpyDtoDAsync_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    h: Handle,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        copy(
            &s,
            dst as usize,
            src as usize,
            n,
            true,
            true,
            "cuMemcpyDtoDAsync",
        )
    }))
}

fn sync_result(s: &Arc<Stream>) -> Result<(), (CuResult, String)> {
    match s.synchronize() {
        CUDA_SUCCESS => Ok(()),
        e => Err(err(e)),
    }
}

fn memset(
    h: Handle,
    dst: CUdeviceptr,
    value: u32,
    width: usize,
    count: usize,
    sync: bool,
    what: &str,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        if count == 0 {
            return Ok(());
        }
        let dst = dst as usize;
        if dst % width != 0 {
            return Err((
                CUDA_ERROR_INVALID_VALUE,
                format!("{what}: {dst:#x} is not {width}-byte aligned"),
            ));
        }
        memory::check_device(dst, count * width, what)?;
        s.enqueue(Box::new(move || {
            // SAFETY: checked to lie in one device allocation, aligned for the width.
            unsafe {
                match width {
                    1 => std::ptr::write_bytes(dst as *mut u8, value as u8, count),
                    2 => std::slice::from_raw_parts_mut(dst as *mut u16, count).fill(value as u16),
                    _ => std::slice::from_raw_parts_mut(dst as *mut u32, count).fill(value),
                }
            }
            Ok(())
        }));
        if sync {
            sync_result(&s)?;
        }
        Ok(())
    }))
}

/// `cuMemsetD8_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, v: u8, n: usize) -> CuResult {
    memset(
        std::ptr::null_mut(),
        dst,
        v as u32,
        1,
        n,
        true,
        "cuMemsetD8",
    )
}
/// `cuMemsetD8Async`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, v: u8, n: usize, h: Handle) -> CuResult {
    memset(h, dst, v as u32, 1, n, false, "cuMemsetD8Async")
}
/// `cuMemsetD16_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, v: u16, n: usize) -> CuResult {
    memset(
        std::ptr::null_mut(),
        dst,
        v as u32,
        2,
        n,
        true,
        "cuMemsetD16",
    )
}
/// `cuMemsetD16Async`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16Async(
    dst: CUdeviceptr,
    v: u16,
    n: usize,
    h: Handle,
) -> CuResult {
    memset(h, dst, v as u32, 2, n, false, "cuMemsetD16Async")
}
/// `cuMemsetD32_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, v: u32, n: usize) -> CuResult {
    memset(std::ptr::null_mut(), dst, v, 4, n, true, "cuMemsetD32")
}
/// `cuMemsetD32Async`.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    v: u32,
    n: usize,
    h: Handle,
) -> CuResult {
    memset(h, dst, v, 4, n, false, "cuMemsetD32Async")
}

/// The default memory pool's handle of device `d` (pools are not objects here: the
/// attributes describe the stream-ordered allocations of all devices).
fn pool_handle(d: CUdevice) -> Handle {
    (0x5000_0000_usize + d as usize * 16) as Handle
}

/// `cuDeviceGetDefaultMemPool`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut Handle, d: CUdevice) -> CuResult {
    ret(device_ok(d).and_then(|_| unsafe { write(pool, pool_handle(d)) }))
}

/// `cuDeviceGetMemPool`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut Handle, d: CUdevice) -> CuResult {
    unsafe { cuDeviceGetDefaultMemPool(pool, d) }
}

fn pool_ok(pool: Handle) -> Result<(), (CuResult, String)> {
    initialised()?;
    if (0..device_count()).any(|d| pool_handle(d) == pool) {
        Ok(())
    } else {
        Err(err(CUDA_ERROR_INVALID_VALUE))
    }
}

/// `cuMemPoolGetAttribute`: reserved and used bytes are the live allocations (the emulator
/// keeps no freed memory in reserve); the release threshold is what was set.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolGetAttribute(
    pool: Handle,
    attr: c_uint,
    v: *mut c_void,
) -> CuResult {
    ret(pool_ok(pool).and_then(|_| {
        if v.is_null() {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let used = memory::USED.load(Ordering::Relaxed);
        let high = memory::USED_HIGH.load(Ordering::Relaxed);
        // SAFETY: v points at an int (attributes 1-3) or a cuuint64_t (4-8), per the reference.
        unsafe {
            match attr {
                1..=3 => (v as *mut c_int).write(1),
                4 => (v as *mut u64).write(RELEASE_THRESHOLD.load(Ordering::Relaxed)),
                5 | 7 => (v as *mut u64).write(used),
                6 | 8 => (v as *mut u64).write(high),
                _ => return Err(err(CUDA_ERROR_INVALID_VALUE)),
            }
        }
        Ok(())
    }))
}

static RELEASE_THRESHOLD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `cuMemPoolSetAttribute`: the release threshold, the reuse flags, and resetting the
/// high-water marks (only to 0, as documented).
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    pool: Handle,
    attr: c_uint,
    v: *mut c_void,
) -> CuResult {
    ret(pool_ok(pool).and_then(|_| {
        if v.is_null() {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        // SAFETY: as in cuMemPoolGetAttribute.
        unsafe {
            match attr {
                1..=3 => {}
                4 => RELEASE_THRESHOLD.store((v as *const u64).read(), Ordering::Relaxed),
                6 | 8 => {
                    if (v as *const u64).read() != 0 {
                        return Err(err(CUDA_ERROR_INVALID_VALUE));
                    }
                    memory::USED_HIGH
                        .store(memory::USED.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                _ => return Err(err(CUDA_ERROR_INVALID_VALUE)),
            }
        }
        Ok(())
    }))
}

/// `cuMemPoolTrimTo`: nothing is held in reserve.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolTrimTo(pool: Handle, _keep: usize) -> CuResult {
    ret(pool_ok(pool))
}

// ---- modules and launches --------------------------------------------------------------------

/// `cuModuleLoadData`: the image is the emulated NVRTC's output, which names the host object
/// that holds the compiled kernels.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(pm: *mut Handle, image: *const c_void) -> CuResult {
    ret(ctx().and_then(|_| {
        if image.is_null() || pm.is_null() {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        // SAFETY: a PTX image is a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(image as *const c_char) }.to_string_lossy();
        let m = Module::load(&text)?;
        unsafe { write(pm, modules().insert(Arc::new(m))) }
    }))
}

/// `cuModuleLoad`: a file holding such an image.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(pm: *mut Handle, fname: *const c_char) -> CuResult {
    ret(ctx().and_then(|_| {
        if fname.is_null() {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        // SAFETY: a NUL-terminated path.
        let path = unsafe { CStr::from_ptr(fname) }
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            (
                CUDA_ERROR_FILE_NOT_FOUND,
                format!("cuModuleLoad({path}): {e}"),
            )
        })?;
        let m = Module::load(&text)?;
        unsafe { write(pm, modules().insert(Arc::new(m))) }
    }))
}

/// `cuModuleUnload`.
#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(m: Handle) -> CuResult {
    ret(initialised().and_then(|_| modules().destroy(m).map(|_| ())))
}

/// `cuModuleGetFunction`.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    pf: *mut Handle,
    m: Handle,
    name: *const c_char,
) -> CuResult {
    ret(ctx().and_then(|_| {
        let m = modules().lookup(m)?;
        if name.is_null() {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        // SAFETY: a NUL-terminated name.
        let n = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let f = m.function(&n).ok_or_else(|| {
            (
                CUDA_ERROR_NOT_FOUND,
                format!(
                    "cuModuleGetFunction: no kernel {n} in the module (it has {:?})",
                    m.kernels
                ),
            )
        })?;
        unsafe { write(pf, functions().insert(Arc::new(f))) }
    }))
}

/// `cuModuleGetGlobal_v2`: module globals are not emulated.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(
    _p: *mut CUdeviceptr,
    _bytes: *mut usize,
    _m: Handle,
    name: *const c_char,
) -> CuResult {
    let n = if name.is_null() {
        String::new()
    } else {
        // SAFETY: a NUL-terminated name.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    };
    eprintln!("simclr-gpu-emu: cuModuleGetGlobal({n}) is not emulated");
    CUDA_ERROR_NOT_SUPPORTED
}

const FUNC_MAX_THREADS: c_int = 0;
const FUNC_SHARED_SIZE: c_int = 1;
const FUNC_CONST_SIZE: c_int = 2;
const FUNC_LOCAL_SIZE: c_int = 3;
const FUNC_NUM_REGS: c_int = 4;
const FUNC_PTX_VERSION: c_int = 5;
const FUNC_BINARY_VERSION: c_int = 6;
const FUNC_CACHE_MODE_CA: c_int = 7;
const FUNC_MAX_DYNAMIC_SHARED: c_int = 8;
const FUNC_CARVEOUT: c_int = 9;

/// `cuFuncGetAttribute`. Registers and local memory are unknown to a host compiler: they read
/// 0, which no real kernel reports, so code cannot mistake them for measurements.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(v: *mut c_int, attr: c_int, f: Handle) -> CuResult {
    ret(ctx().and_then(|_| {
        let f = functions().lookup(f)?;
        let cc = device::COMPUTE_CAPABILITY.0 * 10 + device::COMPUTE_CAPABILITY.1;
        let a = match attr {
            FUNC_MAX_THREADS => f.max_threads as c_int,
            FUNC_SHARED_SIZE => f.static_shared as c_int,
            FUNC_CONST_SIZE | FUNC_LOCAL_SIZE | FUNC_NUM_REGS | FUNC_CACHE_MODE_CA => 0,
            FUNC_PTX_VERSION | FUNC_BINARY_VERSION => cc,
            FUNC_MAX_DYNAMIC_SHARED => f.max_dynamic_shared.load(Ordering::Relaxed) as c_int,
            FUNC_CARVEOUT => -1,
            _ => return Err(err(CUDA_ERROR_INVALID_VALUE)),
        };
        unsafe { write(v, a) }
    }))
}

/// `cuFuncSetAttribute`: the dynamic shared memory limit, up to what sm_90 allows beside the
/// kernel's static shared memory; the carve-out preference is accepted.
#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: Handle, attr: c_int, v: c_int) -> CuResult {
    ret(ctx().and_then(|_| {
        let f = functions().lookup(f)?;
        match attr {
            FUNC_MAX_DYNAMIC_SHARED => {
                let limit = device::SHARED_PER_BLOCK_OPTIN.saturating_sub(f.static_shared);
                if v < 0 || v as u64 > limit {
                    return Err((
                        CUDA_ERROR_INVALID_VALUE,
                        format!(
                            "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {v}): at most {limit} \
                             beside {} bytes of static shared memory",
                            f.static_shared
                        ),
                    ));
                }
                f.max_dynamic_shared.store(v as u64, Ordering::Relaxed);
                Ok(())
            }
            FUNC_CARVEOUT if (-1..=100).contains(&v) => Ok(()),
            _ => Err(err(CUDA_ERROR_INVALID_VALUE)),
        }
    }))
}

/// `cuFuncSetCacheConfig`: a preference, accepted.
#[no_mangle]
pub unsafe extern "C" fn cuFuncSetCacheConfig(f: Handle, cfg: c_uint) -> CuResult {
    ret(ctx().and_then(|_| {
        functions().lookup(f)?;
        if cfg > 3 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        Ok(())
    }))
}

/// `cuLaunchKernel`: checked against the device's limits at the call, run in stream order.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    h: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        let f = functions().lookup(f)?;
        // SAFETY: kernelParams as the driver API defines it.
        let launch = unsafe { Launch::new(f, [gx, gy, gz], [bx, by, bz], shared, params, extra)? };
        s.enqueue(Box::new(move || launch.run()));
        Ok(())
    }))
}

// ---- for the emulated libraries built on the driver (cuBLAS, cuDNN, NCCL) ------------------

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

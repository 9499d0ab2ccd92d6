//! Initialisation, devices, contexts and error strings.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use super::*;

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

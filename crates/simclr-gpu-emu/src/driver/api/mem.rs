//! Device and page-locked memory, copies, memsets and memory pools.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use super::*;

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

/// Takes an allocation out of the table for a free call, naming what `p` is not.
fn retire(p: usize, device: bool, call: &str) -> Result<(), (CuResult, String)> {
    memory::retire(p, device).map_err(|e| {
        let what = if device {
            "a live device allocation"
        } else {
            "page-locked memory"
        };
        (e, format!("{call} of {p:#x}, which is not {what}"))
    })
}

/// `cuMemFree_v2`: waits for the device, as the reference says cuMemFree synchronises.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(p: CUdeviceptr) -> CuResult {
    ret(ctx().and_then(|c| {
        retire(p as usize, true, "cuMemFree")?;
        c.synchronize();
        memory::release(p as usize);
        Ok(())
    }))
}

/// `cuMemFreeAsync`: the memory goes back when the stream reaches the call.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(p: CUdeviceptr, h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| {
        retire(p as usize, true, "cuMemFreeAsync")?;
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
        retire(p as usize, false, "cuMemFreeHost")?;
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

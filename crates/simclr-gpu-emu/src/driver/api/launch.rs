//! Modules, kernels and launches.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use super::*;

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

//! Modules and kernels: a module is a host shared object that the emulated NVRTC built from
//! CUDA source (its "PTX" names the object), loaded with `dlopen`; a launch calls the object's
//! `emu_launch`, which runs the kernel's blocks with one fiber per CUDA thread.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::device;
use super::result::*;

type NamesFn = unsafe extern "C" fn() -> *const *const c_char;
type InfoFn = unsafe extern "C" fn(
    *const c_char,
    *mut c_uint,
    *mut c_ulonglong,
    *mut c_uint,
    *mut c_ulonglong,
) -> c_int;
type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const c_uint,
    *const c_uint,
    c_uint,
    *mut *mut c_void,
    *mut c_char,
    c_ulonglong,
) -> c_int;

/// The line of the emulated NVRTC's output that names the object to load.
pub const OBJECT_MARKER: &str = "// simclr-gpu-emu object: ";

/// A loaded module.
pub struct Module {
    handle: *mut c_void,
    info: InfoFn,
    launch: LaunchFn,
    /// The kernels it defines.
    pub kernels: Vec<String>,
    /// The object file.
    pub path: String,
}

// SAFETY: the dlopen handle and the function pointers may be used from any thread; the
// object's emu_launch serialises launches itself.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and is closed once.
        unsafe { libc::dlclose(self.handle) };
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns a thread-local string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: a valid C string from dlerror.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// The architecture of a PTX text's `.target` line (`sm_90` -> 90).
fn target_arch(text: &str) -> Option<u32> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(".target"))?;
    let t = line.trim_start()[".target".len()..].trim();
    let t = t.split([',', ' ']).next()?;
    let digits = t
        .strip_prefix("sm_")
        .or_else(|| t.strip_prefix("compute_"))?;
    digits.trim_end_matches(['a', 'f']).parse().ok()
}

impl Module {
    /// `cuModuleLoadData` of a NUL-terminated image.
    pub fn load(image: &str) -> Result<Module, (CuResult, String)> {
        let Some(path) = image
            .lines()
            .find_map(|l| l.strip_prefix(OBJECT_MARKER))
            .map(str::trim)
        else {
            return Err((
                CUDA_ERROR_INVALID_PTX,
                "the image is not the emulated NVRTC's output (real PTX and cubins cannot run on \
                 the emulated device)"
                    .into(),
            ));
        };
        let arch = target_arch(image).unwrap_or(0);
        let dev = (device::COMPUTE_CAPABILITY.0 * 10 + device::COMPUTE_CAPABILITY.1) as u32;
        if arch > dev {
            return Err((
                CUDA_ERROR_UNSUPPORTED_PTX_VERSION,
                format!("the module targets sm_{arch}, newer than the device's sm_{dev}"),
            ));
        }
        let c = CString::new(path).map_err(|_| (CUDA_ERROR_INVALID_IMAGE, "bad path".into()))?;
        // SAFETY: dlopen of a shared object the emulated NVRTC built.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err((
                CUDA_ERROR_INVALID_IMAGE,
                format!("cannot load {path}: {}", dl_error()),
            ));
        }
        let sym = |name: &str| {
            let n = CString::new(name).expect("symbol name");
            // SAFETY: dlsym on a live handle.
            let p = unsafe { libc::dlsym(handle, n.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (Some(names), Some(info), Some(launch)) = (
            sym("emu_kernel_names"),
            sym("emu_kernel_info"),
            sym("emu_launch"),
        ) else {
            // SAFETY: handle from dlopen above.
            unsafe { libc::dlclose(handle) };
            return Err((
                CUDA_ERROR_INVALID_IMAGE,
                format!("{path} lacks the emulator's entry points"),
            ));
        };
        // SAFETY: the entry points have the signatures of the runtime's C ABI.
        let (names, info, launch): (NamesFn, InfoFn, LaunchFn) = unsafe {
            (
                std::mem::transmute::<*mut c_void, NamesFn>(names),
                std::mem::transmute::<*mut c_void, InfoFn>(info),
                std::mem::transmute::<*mut c_void, LaunchFn>(launch),
            )
        };
        let mut kernels = Vec::new();
        // SAFETY: a NULL-terminated array of C strings that lives as long as the object.
        unsafe {
            let mut p = names();
            while !p.is_null() && !(*p).is_null() {
                kernels.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
                p = p.add(1);
            }
        }
        Ok(Module {
            handle,
            info,
            launch,
            kernels,
            path: path.to_string(),
        })
    }

    /// `cuModuleGetFunction`.
    pub fn function(self: &Arc<Self>, name: &str) -> Option<Function> {
        let c = CString::new(name).ok()?;
        let mut nparams: c_uint = 0;
        let mut sizes = vec![0 as c_ulonglong; 256];
        let mut max_threads: c_uint = 0;
        let mut static_shared: c_ulonglong = 0;
        // SAFETY: the buffers have the sizes the ABI names.
        let rc = unsafe {
            (self.info)(
                c.as_ptr(),
                &mut nparams,
                sizes.as_mut_ptr(),
                &mut max_threads,
                &mut static_shared,
            )
        };
        if rc != 0 {
            return None;
        }
        sizes.truncate(nparams as usize);
        Some(Function {
            module: self.clone(),
            name: c,
            param_sizes: sizes.into_iter().map(|s| s as usize).collect(),
            max_threads: max_threads.min(device::MAX_THREADS_PER_BLOCK),
            static_shared: static_shared as u64,
            max_dynamic_shared: AtomicU64::new(
                device::SHARED_PER_BLOCK.saturating_sub(static_shared as u64),
            ),
        })
    }
}

/// A kernel of a loaded module.
pub struct Function {
    /// Its module (kept loaded while the function lives).
    pub module: Arc<Module>,
    /// Its name.
    pub name: CString,
    /// The size of each parameter, in order.
    pub param_sizes: Vec<usize>,
    /// `__launch_bounds__`' limit, or the device's.
    pub max_threads: u32,
    /// Static shared memory, bytes.
    pub static_shared: u64,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
    pub max_dynamic_shared: AtomicU64,
}

/// A launch's configuration, checked and with its arguments copied (the driver copies the
/// argument values at the call; the caller may reuse them at once).
pub struct Launch {
    func: Arc<Function>,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared: u32,
    args: Vec<Box<[u128]>>,
}

// SAFETY: the arguments are plain bytes copied at the call.
unsafe impl Send for Launch {}

impl Launch {
    /// Checks a `cuLaunchKernel` against the limits of an H100 and copies its arguments.
    ///
    /// # Safety
    /// `params` must hold one valid pointer per kernel parameter, each to a value of the
    /// parameter's size, as the driver API requires.
    pub unsafe fn new(
        func: Arc<Function>,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_shared: u32,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> Result<Launch, (CuResult, String)> {
        let name = func.name.to_string_lossy().into_owned();
        let bad = |code, msg: String| Err((code, format!("launch of {name}: {msg}")));
        for i in 0..3 {
            if grid[i] == 0 || grid[i] > device::MAX_GRID_DIM[i] {
                return bad(
                    CUDA_ERROR_INVALID_VALUE,
                    format!("grid {grid:?} outside 1..={:?}", device::MAX_GRID_DIM),
                );
            }
            if block[i] == 0 || block[i] > device::MAX_BLOCK_DIM[i] {
                return bad(
                    CUDA_ERROR_INVALID_VALUE,
                    format!("block {block:?} outside 1..={:?}", device::MAX_BLOCK_DIM),
                );
            }
        }
        let threads = block.iter().map(|&b| b as u64).product::<u64>();
        if threads > device::MAX_THREADS_PER_BLOCK as u64 {
            return bad(
                CUDA_ERROR_INVALID_VALUE,
                format!("{threads} threads per block (at most 1024)"),
            );
        }
        if threads > func.max_threads as u64 {
            return bad(
                CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                format!(
                    "{threads} threads per block, above the kernel's __launch_bounds__ of {}",
                    func.max_threads
                ),
            );
        }
        let max_dyn = func.max_dynamic_shared.load(Ordering::Relaxed);
        if dynamic_shared as u64 > max_dyn {
            return bad(
                CUDA_ERROR_INVALID_VALUE,
                format!(
                    "{dynamic_shared} bytes of dynamic shared memory, above the {max_dyn} allowed \
                     (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)"
                ),
            );
        }
        if !extra.is_null() {
            return bad(
                CUDA_ERROR_NOT_SUPPORTED,
                "the `extra` argument form is not emulated; pass kernelParams".into(),
            );
        }
        let n = func.param_sizes.len();
        if n > 0 && params.is_null() {
            return bad(
                CUDA_ERROR_INVALID_VALUE,
                format!("the kernel takes {n} parameters and kernelParams is null"),
            );
        }
        let mut args = Vec::with_capacity(n);
        for (i, &size) in func.param_sizes.iter().enumerate() {
            // SAFETY: the caller passes one pointer per parameter.
            let p = unsafe { *params.add(i) } as *const u8;
            if p.is_null() {
                return bad(
                    CUDA_ERROR_INVALID_VALUE,
                    format!("kernelParams[{i}] is null"),
                );
            }
            let mut buf = vec![0u128; size.div_ceil(16).max(1)].into_boxed_slice();
            // SAFETY: p points at `size` bytes (the parameter's value); buf holds at least that.
            unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr() as *mut u8, size) };
            args.push(buf);
        }
        Ok(Launch {
            func,
            grid,
            block,
            dynamic_shared,
            args,
        })
    }

    /// Runs the launch to completion (on the stream's thread).
    pub fn run(mut self) -> Result<(), (CuResult, String)> {
        let mut ptrs: Vec<*mut c_void> = self
            .args
            .iter_mut()
            .map(|b| b.as_mut_ptr() as *mut c_void)
            .collect();
        let mut msg = vec![0 as c_char; 4096];
        // SAFETY: the entry point of the object; arguments as its ABI says.
        let rc = unsafe {
            (self.func.module.launch)(
                self.func.name.as_ptr(),
                self.grid.as_ptr(),
                self.block.as_ptr(),
                self.dynamic_shared,
                ptrs.as_mut_ptr(),
                msg.as_mut_ptr(),
                msg.len() as c_ulonglong,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the runtime writes a NUL-terminated message into msg.
        let text = unsafe { CStr::from_ptr(msg.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Err((
            rc as CuResult,
            format!(
                "kernel {} (grid {:?}, block {:?}) failed: {text}",
                self.func.name.to_string_lossy(),
                self.grid,
                self.block
            ),
        ))
    }
}

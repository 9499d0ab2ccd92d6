//! Device memory: every allocation is its own host allocation (so AddressSanitizer sees each
//! one's bounds), aligned as the driver aligns them (256 bytes), and filled with 0xFF bytes,
//! a NaN in f32, f64 and bf16, so a value a kernel reads before anything wrote it shows.
//! Copies and memsets are checked against the allocation they touch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::result::*;

/// What an address range belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Device memory of a device.
    Device(i32),
    /// Page-locked host memory (`cuMemHostAlloc`).
    Pinned,
}

#[derive(Clone, Copy, Debug)]
struct Alloc {
    len: usize,
    kind: Kind,
}

fn table() -> &'static Mutex<BTreeMap<usize, Alloc>> {
    static T: OnceLock<Mutex<BTreeMap<usize, Alloc>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<usize, Alloc>> {
    table().lock().unwrap_or_else(|e| e.into_inner())
}

/// Device bytes in use, and the most in use at once, per the memory-pool attributes.
pub static USED: AtomicU64 = AtomicU64::new(0);
/// The high-water mark of [`USED`] (reset by `cuMemPoolSetAttribute`).
pub static USED_HIGH: AtomicU64 = AtomicU64::new(0);

/// The alignment of every allocation (cudaMalloc's documented minimum is 256 bytes).
const ALIGN: usize = 256;

/// Allocates `len` bytes of `kind`, poisoned for device memory.
pub fn alloc(len: usize, kind: Kind) -> Result<usize, CuResult> {
    if len == 0 {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    if matches!(kind, Kind::Device(_))
        && USED.load(Ordering::Relaxed) + len as u64 > super::device::TOTAL_MEMORY
    {
        return Err(CUDA_ERROR_OUT_OF_MEMORY);
    }
    let mut p: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: posix_memalign writes p on success; ALIGN is a power of two and a multiple of
    // the pointer size.
    if unsafe { libc::posix_memalign(&mut p, ALIGN, len) } != 0 || p.is_null() {
        return Err(CUDA_ERROR_OUT_OF_MEMORY);
    }
    if matches!(kind, Kind::Device(_)) {
        // SAFETY: p holds len bytes.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0xff, len) };
        let used = USED.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        USED_HIGH.fetch_max(used, Ordering::Relaxed);
    }
    lock().insert(p as usize, Alloc { len, kind });
    Ok(p as usize)
}

/// Takes the allocation starting at `ptr` out of the table (it may no longer be used); the
/// memory itself is released by [`release`].
pub fn retire(ptr: usize, kind_is_device: bool) -> Result<(), CuResult> {
    let mut t = lock();
    match t.get(&ptr) {
        Some(a) if matches!(a.kind, Kind::Device(_)) == kind_is_device => {
            if kind_is_device {
                USED.fetch_sub(a.len as u64, Ordering::Relaxed);
            }
            t.remove(&ptr);
            Ok(())
        }
        _ => Err(CUDA_ERROR_INVALID_VALUE),
    }
}

/// Returns retired memory to the host.
pub fn release(ptr: usize) {
    // SAFETY: ptr came from posix_memalign in `alloc` and was retired exactly once.
    unsafe { libc::free(ptr as *mut libc::c_void) }
}

/// The allocation holding `[ptr, ptr + len)`, if one does.
pub fn find(ptr: usize, len: usize) -> Option<Kind> {
    let t = lock();
    let (&base, a) = t.range(..=ptr).next_back()?;
    (ptr.checked_add(len)? <= base + a.len).then_some(a.kind)
}

/// Checks that `[ptr, ptr + len)` is device memory of one allocation, naming what is wrong.
pub fn check_device(ptr: usize, len: usize, what: &str) -> Result<(), (CuResult, String)> {
    match find(ptr, len.max(1)) {
        Some(Kind::Device(_)) => Ok(()),
        _ => Err((
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "{what}: [{ptr:#x}, +{len}) is not inside one device allocation{}",
                describe_near(ptr)
            ),
        )),
    }
}

fn describe_near(ptr: usize) -> String {
    let t = lock();
    match t.range(..=ptr).next_back() {
        Some((&base, a)) => format!(
            " (the nearest allocation below starts at {base:#x} and holds {} bytes)",
            a.len
        ),
        None => String::new(),
    }
}

/// Whether `[ptr, ptr + len)` is page-locked host memory.
pub fn is_pinned(ptr: usize, len: usize) -> bool {
    find(ptr, len.max(1)) == Some(Kind::Pinned)
}

/// Allocations in the table of device `d` (for tests of the emulator itself).
pub fn live_device_allocations(d: i32) -> usize {
    lock()
        .values()
        .filter(|a| a.kind == Kind::Device(d))
        .count()
}

/// A pointer a kernel or copy may be given, as a plain address.
pub type DevPtr = u64;

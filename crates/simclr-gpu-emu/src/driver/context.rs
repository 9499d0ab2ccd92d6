//! Contexts: one primary context per device, the calling thread's current context, and the
//! sticky error that a failed kernel leaves (after which every call on the context fails, as on
//! a GPU).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::result::*;
use super::stream::Stream;

/// A CUDA context.
pub struct Context {
    /// The device ordinal.
    pub device: i32,
    sticky: AtomicU32,
    retains: AtomicU64,
    null: OnceLock<Arc<Stream>>,
    streams: Mutex<Vec<Weak<Stream>>>,
    /// `cuCtxSetLimit` values by `CUlimit`.
    pub limits: Mutex<std::collections::HashMap<u32, usize>>,
}

impl Context {
    fn new(device: i32) -> Arc<Context> {
        Arc::new(Context {
            device,
            sticky: AtomicU32::new(CUDA_SUCCESS),
            retains: AtomicU64::new(0),
            null: OnceLock::new(),
            streams: Mutex::new(Vec::new()),
            limits: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The error that ended the context, or `CUDA_SUCCESS`.
    pub fn sticky(&self) -> CuResult {
        self.sticky.load(Ordering::Acquire)
    }

    /// Records a failure of work on the context: the first one sticks.
    pub fn fail(&self, code: CuResult, msg: &str) {
        let _ =
            self.sticky
                .compare_exchange(CUDA_SUCCESS, code, Ordering::AcqRel, Ordering::Acquire);
        eprintln!("simclr-gpu-emu: device {}: {msg}", self.device);
    }

    /// The context's null (legacy default) stream.
    pub fn null_stream(self: &Arc<Self>) -> Arc<Stream> {
        self.null
            .get_or_init(|| Stream::new(self.clone(), true, true, 0))
            .clone()
    }

    /// Registers a stream created on this context.
    pub fn add_stream(&self, s: &Arc<Stream>) {
        let mut v = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(s));
    }

    /// Every live stream of the context, the null stream included.
    pub fn all_streams(self: &Arc<Self>) -> Vec<Arc<Stream>> {
        let v = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<Stream>> = v.iter().filter_map(|w| w.upgrade()).collect();
        out.push(self.null_stream());
        out
    }

    /// The live blocking streams other than the null stream.
    pub fn blocking_streams(self: &Arc<Self>) -> Vec<Arc<Stream>> {
        let v = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        v.iter()
            .filter_map(|w| w.upgrade())
            .filter(|s| s.blocking && !s.null)
            .collect()
    }

    /// `cuCtxSynchronize`.
    pub fn synchronize(self: &Arc<Self>) -> CuResult {
        for s in self.all_streams() {
            s.synchronize();
        }
        self.sticky()
    }
}

/// The primary contexts, by device.
fn primaries() -> &'static Mutex<Vec<Option<Arc<Context>>>> {
    static P: OnceLock<Mutex<Vec<Option<Arc<Context>>>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Vec::new()))
}

/// Device `d`'s primary context, created on first use; `retain` counts a
/// `cuDevicePrimaryCtxRetain`.
pub fn primary(d: i32, retain: bool) -> Arc<Context> {
    let mut p = primaries().lock().unwrap_or_else(|e| e.into_inner());
    let i = d as usize;
    if p.len() <= i {
        p.resize(i + 1, None);
    }
    let c = p[i].get_or_insert_with(|| Context::new(d)).clone();
    if retain {
        c.retains.fetch_add(1, Ordering::AcqRel);
    }
    c
}

/// `cuDevicePrimaryCtxRelease`: false if the context was not retained.
pub fn release(d: i32) -> bool {
    let c = primary(d, false);
    c.retains
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// The context handle the C ABI hands out: the address of the context.
pub fn handle(c: &Arc<Context>) -> usize {
    Arc::as_ptr(c) as usize
}

/// The context a handle names, if it is one of ours.
pub fn from_handle(h: usize) -> Option<Arc<Context>> {
    let p = primaries().lock().unwrap_or_else(|e| e.into_inner());
    p.iter().flatten().find(|c| handle(c) == h).cloned()
}

thread_local! {
    static CURRENT: RefCell<Vec<Arc<Context>>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context.
pub fn current() -> Option<Arc<Context>> {
    CURRENT.with(|c| c.borrow().last().cloned())
}

/// `cuCtxSetCurrent`: replaces the top of the thread's context stack (None pops it).
pub fn set_current(ctx: Option<Arc<Context>>) {
    CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        c.pop();
        if let Some(ctx) = ctx {
            c.push(ctx);
        }
    })
}

/// `cuCtxPushCurrent`.
pub fn push_current(ctx: Arc<Context>) {
    CURRENT.with(|c| c.borrow_mut().push(ctx))
}

/// `cuCtxPopCurrent`.
pub fn pop_current() -> Option<Arc<Context>> {
    CURRENT.with(|c| c.borrow_mut().pop())
}

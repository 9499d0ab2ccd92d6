//! [`NcclComm`]: replicas on GPUs exchanging device buffers through NCCL, one process per GPU.
//!
//! The NCCL unique id travels over a bootstrap [`Communicator`] (the [`super::TcpComm`] of the
//! rendezvous at `MASTER_ADDR`), which also serves as the barrier proving every rank is alive
//! before NCCL's own initialisation blocks on them.
//!
//! NCCL collectives do not time out by themselves. Here every wait for a collective polls an
//! event recorded after it, and NCCL's asynchronous error of the communicator: an error NCCL
//! reports (a peer's connection closed, a network failure) ends the wait at once, and a
//! collective still running after the timeout ends it then. Either way this communicator and
//! its duplicates are aborted, and every later call on them fails with [`CommError::Nccl`]. A
//! NCCL call that blocks on the host (NCCL connecting to a dead peer inside a collective) is
//! found by a watchdog thread once it has taken longer than the timeout. `ncclCommInitRank`
//! runs on a helper thread that is left behind if it does not return within the timeout (a peer
//! died between the id exchange and its own init), so that too ends in an error, not a hang.
//!
//! `ncclCommAbort` frees the communicator without waiting for a call still inside it on another
//! thread (the abort flag it raises wakes that call, which then uses freed memory). So an abort
//! waits a moment for the calls inside to leave, and if one is still inside (blocked on a peer
//! that is gone: the watchdog's case), the process ends with [`NcclComm::BLOCKED_EXIT_CODE`]
//! after saying why, instead of freeing the communicator under it; the other ranks then see
//! this rank leave within their own timeouts. A communicator dropped healthy is finalised, not
//! aborted (an abort would cut off a peer's last collective still draining); one that is not
//! finalised within the timeout is aborted under the same rule. Every teardown binds the
//! communicator's CUDA context first (NCCL's teardown would otherwise touch GPU 0).
//!
//! The communicators are blocking ones, and `ncclInProgress` (the answer of a non-blocking
//! one, which `NCCL_COMM_BLOCKING=0` makes) is an error that says so.
//!
//! What NCCL cannot tell is which peer failed: the errors say that a peer is gone, not which.
//!
//! Collectives run on the communicator's own stream: the compute stream for the one made by
//! [`NcclComm::new`], a new stream for each [`Communicator::duplicate`] (whose collectives then
//! overlap the compute; cudarc orders the two streams' uses of a buffer by events).

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use simclr_kernels::cuda::cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, ValidAsZeroBits,
};
use simclr_kernels::cuda::cudarc::nccl::{self, result::NcclError, sys, NcclType};
use simclr_kernels::cuda::GpuError;

use super::{CommError, Communicator};
use crate::cuda::CudaBackend;
use crate::error::{NnError, Result};
use crate::tensor::Device;

/// One NCCL communicator. Ours rather than cudarc's `Comm`, which keeps its handle private and
/// so can only be aborted by dropping it, i.e. by whoever holds the lock the calls are made
/// under: an abort must reach the handle while another thread is inside a NCCL call on it (a
/// call blocked on a dead peer is what the abort is for), so the handle lives in an atomic,
/// apart from the lock that serialises the calls.
struct Handle {
    /// The communicator; null once aborted or destroyed.
    raw: AtomicPtr<sys::ncclComm>,
    /// Threads inside a NCCL call on `raw` ([`Handle::with`], [`Handle::close`]). An abort
    /// frees the communicator, and NCCL does not wait for calls still inside it, so an abort
    /// proceeds only once this is 0.
    users: AtomicUsize,
    /// Serialises the NCCL calls on this communicator (NCCL calls on one communicator must not
    /// run concurrently); never taken by an abort.
    calls: Mutex<()>,
    /// When the NCCL call under way began, in milliseconds since the family's epoch plus one
    /// (0: none), for the watchdog.
    busy_since: AtomicU64,
    /// The operation of the last NCCL call made (the one under way, if any), for the message
    /// of [`exit_blocked`].
    busy_op: Mutex<String>,
    /// The GPU's context, bound on every thread that tears the communicator down: NCCL's
    /// teardown switches to the communicator's device and back to the thread's current one,
    /// which on a thread without a context is GPU 0, where it would create a context.
    ctx: Arc<CudaContext>,
    rank: usize,
    world: usize,
}

/// How long an abort waits for the threads inside NCCL calls on the communicator (quick ones: a
/// poll, a launch) to leave before it frees it; a call still inside after that is blocked (on
/// a peer that is gone), and the process ends ([`exit_blocked`]).
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Ends the process with [`NcclComm::BLOCKED_EXIT_CODE`]: a NCCL call is blocked on a peer
/// that is gone and the communicator cannot be freed under it. The other ranks see this rank
/// leave (its connections close) within their own timeouts, so the group ends, not hangs.
fn exit_blocked(rank: usize, world: usize, call: &str, why: &str) -> ! {
    let msg = format!(
        "rank {rank} of {world}: NCCL {call}: a NCCL call is blocked on a peer that is gone; \
         ending the process (exit code {}), as freeing the communicator under the blocked call \
         would be unsound ({why})",
        NcclComm::BLOCKED_EXIT_CODE
    );
    tracing::error!("{msg}");
    // Also straight to stderr: a subscriber may buffer or filter, and the process ends now.
    eprintln!("{msg}");
    std::process::exit(NcclComm::BLOCKED_EXIT_CODE)
}

impl Handle {
    fn new(raw: sys::ncclComm_t, ctx: Arc<CudaContext>, rank: usize, world: usize) -> Handle {
        Handle {
            raw: AtomicPtr::new(raw),
            users: AtomicUsize::new(0),
            calls: Mutex::new(()),
            busy_since: AtomicU64::new(0),
            busy_op: Mutex::new(String::new()),
            ctx,
            rank,
            world,
        }
    }

    /// `f` of the live communicator; `None` once aborted.
    fn with<T>(&self, f: impl FnOnce(sys::ncclComm_t) -> T) -> Option<T> {
        // Counted before the handle is read: an abort that swaps the handle out after this
        // read then sees the use (both are sequentially consistent).
        self.users.fetch_add(1, Ordering::SeqCst);
        let raw = self.raw.load(Ordering::SeqCst);
        let out = (!raw.is_null()).then(|| f(raw));
        self.users.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn set_op(&self, op: &str) {
        let mut o = self.busy_op.lock().unwrap_or_else(|e| e.into_inner());
        // Reuses the string's capacity: no allocation per collective once warm.
        o.clear();
        o.push_str(op);
    }

    /// Makes this thread's current context the communicator's GPU's, before a teardown call.
    fn bind(&self) {
        // Tried twice: cudarc's bind first reports (and clears) an error recorded earlier on
        // the context, which does not stop the second from binding it.
        if self.ctx.bind_to_thread().is_err() {
            let _ = self.ctx.bind_to_thread();
        }
    }

    /// `ncclCommAbort`, once, from any thread; `why` is why (for the message if the process has
    /// to end instead). Called while another thread is inside a quick NCCL call on this
    /// communicator (a poll, a launch), it waits [`ABORT_GRACE`] for it to leave first. A call
    /// still inside after that is blocked (connecting to a dead peer, in a group end), and
    /// `ncclCommAbort` would free the communicator under it: NCCL's abort raises the abort
    /// flag, which wakes the blocked call, but does not wait for it to leave before freeing,
    /// so the process ends instead ([`exit_blocked`]). The abort itself may block until the
    /// communicator's kernels end, so callers run it on a thread of its own ([`abort_handles`]).
    fn abort(&self, why: &str) {
        let raw = self.raw.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if raw.is_null() {
            return;
        }
        let t = Instant::now();
        while self.users.load(Ordering::SeqCst) > 0 && t.elapsed() < ABORT_GRACE {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A thread still inside a call: `ncclCommAbort` frees the communicator without waiting
        // for it, and it would use freed memory once the abort flag wakes it. End the process.
        if self.users.load(Ordering::SeqCst) > 0 {
            let call = self
                .busy_op
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            exit_blocked(self.rank, self.world, &call, why)
        }
        self.bind();
        // SAFETY: `raw` came from ncclCommInitRank and, swapped out above, is aborted once; no
        // thread is inside a call on it (`users` is 0, and a later `with` reads null).
        // The result is ignored: the communicator is gone either way, and an abort that fails
        // (a device already in a failed state) must not turn an error report into a crash.
        let _ = unsafe { sys::ncclCommAbort(raw) };
    }

    /// The orderly teardown of a healthy communicator: `ncclCommFinalize` (which waits for its
    /// outstanding operations, so a peer's last collective still draining is not cut off, as
    /// an abort would), then `ncclCommDestroy`. On an error the communicator is left for an
    /// abort. Counts as a use while inside NCCL: an abort meanwhile (the caller's fallback
    /// when this takes too long) then follows [`Handle::abort`]'s rules.
    fn close(&self) -> std::result::Result<(), String> {
        self.users.fetch_add(1, Ordering::SeqCst);
        self.set_op("ncclCommFinalize");
        let raw = self.raw.load(Ordering::SeqCst);
        let out = if raw.is_null() {
            Ok(())
        } else {
            self.bind();
            // SAFETY: `raw` is live: an abort swapping it out waits for this use to end.
            match check(unsafe { sys::ncclCommFinalize(raw) }) {
                Err(e) => Err(format!("ncclCommFinalize: NCCL error: {}", describe(e.0))),
                // Taken over only now, so that an abort until here finds the communicator and
                // sees this thread inside NCCL. If an abort took it first, it aborts it once
                // this use ends.
                Ok(()) => match self.raw.compare_exchange(
                    raw,
                    std::ptr::null_mut(),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    // SAFETY: finalised, swapped out above, so destroyed once and never used
                    // again.
                    Ok(_) => check(unsafe { sys::ncclCommDestroy(raw) })
                        .map_err(|e| format!("ncclCommDestroy: NCCL error: {}", describe(e.0))),
                    Err(_) => Ok(()),
                },
            }
        };
        self.users.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last reference: nothing is inside a call on it. Null already unless the
        // communicator was never handed out (an init the caller gave up on).
        self.abort("the communicator was dropped");
    }
}

/// The communicators of one group on this GPU: the first and its duplicates. A failure in one
/// aborts them all at once: an abort frees device memory, which waits for every kernel still
/// running, so a stuck kernel of another communicator would block it.
struct Family {
    handles: Mutex<Vec<Arc<Handle>>>,
    /// Set when the family was aborted: waits that were under way report it instead of success
    /// (an abort releases the stuck kernels, so their events complete).
    aborted: AtomicBool,
    /// Why it was aborted (the first reason).
    why: Mutex<Option<String>>,
    /// The origin of [`Handle::busy_since`].
    epoch: Instant,
}

/// How long the aborts may take before they are left behind.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// Aborts `handles` (see [`Handle::abort`]; `why` is why), each on its own thread (so that one
/// blocked behind a stuck kernel does not hold up the others), all started before any is waited
/// for; waits at most [`ABORT_WAIT`].
fn abort_handles(handles: Vec<Arc<Handle>>, why: &str) {
    let (tx, rx) = mpsc::channel();
    let mut started = 0;
    for h in handles {
        let tx = tx.clone();
        let why = why.to_owned();
        let spawned = std::thread::Builder::new()
            .name("nccl-abort".into())
            .spawn(move || {
                h.abort(&why);
                let _ = tx.send(());
            });
        started += usize::from(spawned.is_ok());
    }
    let deadline = Instant::now() + ABORT_WAIT;
    for _ in 0..started {
        let left = deadline.saturating_duration_since(Instant::now());
        if rx.recv_timeout(left).is_err() {
            break;
        }
    }
}

/// Closes `handle` ([`Handle::close`]) on a thread of its own, waited for up to `timeout`; an
/// error or the timeout falls back to an abort ([`abort_handles`], which ends the process if
/// the close is still blocked inside NCCL then). So a teardown takes at most about `timeout`
/// plus the abort's bounded wait, never forever.
fn close_handle(handle: Arc<Handle>, timeout: Duration) {
    let (tx, rx) = mpsc::channel();
    let closing = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("nccl-close".into())
        .spawn(move || {
            let _ = tx.send(closing.close());
        });
    let why = match spawned.map(|_| rx.recv_timeout(timeout)) {
        Ok(Ok(Ok(()))) => return,
        Ok(Ok(Err(why))) => why,
        Ok(Err(mpsc::RecvTimeoutError::Timeout)) => {
            format!("ncclCommFinalize not complete after {timeout:?}: a peer is gone or stuck")
        }
        Ok(Err(mpsc::RecvTimeoutError::Disconnected)) => "the close thread panicked".into(),
        Err(e) => format!("cannot start the NCCL close thread: {e}"),
    };
    tracing::warn!(
        "rank {} of {}: closing a NCCL communicator failed ({why}); aborting it",
        handle.rank,
        handle.world
    );
    abort_handles(vec![handle], &why);
}

impl Family {
    /// A new family, with the watchdog that aborts it when a NCCL call of one of its
    /// communicators blocks for longer than `timeout`.
    fn start(timeout: Duration) -> Result<Arc<Family>> {
        let family = Arc::new(Family {
            handles: Mutex::new(Vec::new()),
            aborted: AtomicBool::new(false),
            why: Mutex::new(None),
            epoch: Instant::now(),
        });
        let weak = Arc::downgrade(&family);
        std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || watch(weak, timeout))
            .map_err(|e| NnError::Cuda(format!("cannot start the NCCL watchdog thread: {e}")))?;
        Ok(family)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Aborts every communicator of the family at once; `why` is what later calls report.
    fn abort_all(&self, why: String) {
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.clone());
        self.aborted.store(true, Ordering::SeqCst);
        let handles = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        abort_handles(handles, &why);
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    fn why(&self) -> String {
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "aborted".into())
    }
}

/// The watchdog of a family: a NCCL call that does not return within `timeout` (it blocks on
/// the host, e.g. connecting to a peer that died) cannot be ended by the thread inside it, so
/// this thread aborts the family; with that call still inside, the abort ends the process
/// ([`Handle::abort`]) rather than free the communicator under it. Ends with the family.
fn watch(family: Weak<Family>, timeout: Duration) {
    let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    loop {
        std::thread::sleep(tick);
        let Some(f) = family.upgrade() else { return };
        if f.is_aborted() {
            return;
        }
        let now = f.now_ms();
        let stuck = f
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|h| {
                let since = h.busy_since.load(Ordering::SeqCst);
                since != 0 && now.saturating_sub(since - 1) > limit
            });
        if stuck {
            f.abort_all(format!(
                "a NCCL call blocked for more than {timeout:?} (a peer is gone or stuck; the \
                 communicators of this group are aborted)"
            ));
            return;
        }
    }
}

/// A NCCL communicator for this process's GPU.
///
/// Its failures are errors ([`CommError::Nccl`]) with one exception: when the communicators must
/// be aborted (a peer is gone) while a NCCL call is blocked inside one of them on another
/// thread, the process ends with [`NcclComm::BLOCKED_EXIT_CODE`], as NCCL's abort would free the
/// communicator under that call. Dropped healthy, it is finalised (`ncclCommFinalize`, then
/// `ncclCommDestroy`), waited for up to the timeout; dropped after a failure, it is aborted.
pub struct NcclComm {
    handle: Arc<Handle>,
    family: Arc<Family>,
    backend: Arc<CudaBackend>,
    /// The stream the collectives run on.
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.family
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h| !Arc::ptr_eq(h, &self.handle));
        if !self.family.is_aborted() && self.async_error().is_none() {
            // Healthy: finalised, not aborted. An abort kills this rank's proxy at once, which
            // a peer whose last collective with this rank is still draining would see as a
            // peer gone.
            close_handle(self.handle.clone(), self.timeout);
        } else {
            // On a thread of its own and waited for a bounded time: a stuck kernel of another
            // communicator of the family would block this abort.
            abort_handles(
                vec![self.handle.clone()],
                &format!("dropping a failed communicator: {}", self.family.why()),
            );
        }
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {}, cuda:{})",
            self.rank,
            self.world,
            self.backend.ordinal()
        )
    }
}

/// A new NCCL unique id, made by rank 0 and sent to every rank of `comm`.
fn share_unique_id(comm: &dyn Communicator, op: &str) -> Result<Vec<u8>, CommError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mine: Vec<u8> = if rank == 0 {
        let id = nccl::result::get_uniqueid().map_err(|e| CommError::Nccl {
            rank,
            world,
            op: "ncclGetUniqueId".into(),
            why: format!("NCCL error: {}", describe(e.0)),
        })?;
        id.internal.iter().map(|&c| c as u8).collect()
    } else {
        Vec::new()
    };
    let mut parts = comm.all_gather_bytes(&mine, op)?;
    let want = std::mem::size_of::<sys::ncclUniqueId>();
    if parts[0].len() != want {
        return Err(CommError::Mismatch {
            op: op.into(),
            msg: format!("rank 0 sent {} bytes, expected {want}", parts[0].len()),
        });
    }
    Ok(parts.swap_remove(0))
}

/// A NCCL result code with NCCL's own words for it (and what to do, where we know).
fn describe(r: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static string (or null) for any code.
    let text = unsafe { sys::ncclGetErrorString(r) };
    let hint = hint(r);
    if text.is_null() {
        return format!("{r:?}{hint}");
    }
    // SAFETY: a non-null result is a NUL-terminated static string.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    format!("{r:?} ({text}){hint}")
}

/// What the user can do about `r`, if anything, as a clause to append to its description.
fn hint(r: sys::ncclResult_t) -> &'static str {
    match r {
        sys::ncclResult_t::ncclInProgress => NONBLOCKING_HINT,
        _ => "",
    }
}

const NONBLOCKING_HINT: &str = "; this program needs blocking NCCL communicators (its waits \
    would otherwise end before the operations do), and NCCL_COMM_BLOCKING=0 (in the environment \
    or an NCCL config file) makes them non-blocking: unset NCCL_COMM_BLOCKING or set it to 1";

/// A NCCL call's result, `Ok` only for `ncclSuccess`. Unlike cudarc's `result()`, which takes
/// `ncclInProgress` for success: that comes from a non-blocking communicator only, where the
/// call has not happened yet, so a wait after it would end before the operation does.
fn check(r: sys::ncclResult_t) -> std::result::Result<(), NcclError> {
    match r {
        sys::ncclResult_t::ncclSuccess => Ok(()),
        e => Err(NcclError(e)),
    }
}

/// Whether `value` of `NCCL_COMM_BLOCKING` makes NCCL's communicators non-blocking: it reads the
/// variable as an integer (C's `strtoll` in base 0, 0 when there are no digits) and an empty
/// value as unset, and 0 means non-blocking.
fn blocking_disabled(value: Option<&str>) -> bool {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return false;
    };
    // What strtoll reads: C's white space, a sign, then the digits of the base the prefix says.
    let v = v.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let v = v.strip_prefix(['+', '-']).unwrap_or(v);
    let (v, digit): (&str, fn(&u8) -> bool) =
        match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => (hex, u8::is_ascii_hexdigit),
            None if v.starts_with('0') => (v, |b| (b'0'..=b'7').contains(b)),
            None => (v, u8::is_ascii_digit),
        };
    // Zero: every digit read is 0 (or none is).
    v.bytes().take_while(digit).all(|b| b == b'0')
}

/// An error if the environment makes NCCL's communicators non-blocking (see
/// [`blocking_disabled`]): this code waits for NCCL's calls as blocking ones.
fn check_blocking_env() -> std::result::Result<(), String> {
    let v = std::env::var_os("NCCL_COMM_BLOCKING");
    let v = v.as_ref().map(|v| v.to_string_lossy());
    if blocking_disabled(v.as_deref()) {
        return Err(format!(
            "NCCL_COMM_BLOCKING={:?} in the environment{NONBLOCKING_HINT}",
            v.as_deref().unwrap_or_default()
        ));
    }
    Ok(())
}

/// Whether a NCCL error leaves the communicator unusable (NCCL's error handling guide: every
/// error but a bad argument or a bad use of the API is fatal to the communicator).
fn is_fatal(r: sys::ncclResult_t) -> bool {
    !matches!(
        r,
        sys::ncclResult_t::ncclInvalidArgument | sys::ncclResult_t::ncclInvalidUsage
    )
}

/// The stream in the type NCCL takes.
fn nccl_stream(stream: &CudaStream) -> sys::cudaStream_t {
    stream.cu_stream() as sys::cudaStream_t
}

/// `buf` summed over the ranks in place, queued on `stream`.
fn sum_in_place<T: NcclType, B: DevicePtrMut<T>>(
    comm: sys::ncclComm_t,
    stream: &CudaStream,
    buf: &mut B,
) -> std::result::Result<(), NcclError> {
    let n = buf.len();
    // `stream` waits for earlier uses of `buf`; `_written` marks the write once queued.
    let (p, _written) = buf.device_ptr_mut(stream);
    // SAFETY: `p` is a live device buffer of `n` values of `T`, ordered on `stream`.
    check(unsafe {
        sys::ncclAllReduce(
            p as *const c_void,
            p as *mut c_void,
            n,
            T::as_nccl_type(),
            sys::ncclRedOp_t::ncclSum,
            comm,
            nccl_stream(stream),
        )
    })
}

/// Every rank's `src` concatenated in rank order into `dst` (the caller checks that `dst` holds
/// `src.len()` values per rank), queued on `stream`.
fn gather<T: NcclType>(
    comm: sys::ncclComm_t,
    stream: &CudaStream,
    src: &impl DevicePtr<T>,
    dst: &mut impl DevicePtrMut<T>,
) -> std::result::Result<(), NcclError> {
    let n = src.len();
    let (s, _read) = src.device_ptr(stream);
    let (d, _written) = dst.device_ptr_mut(stream);
    // SAFETY: live device buffers ordered on `stream`, `dst` of `n` values per rank.
    check(unsafe {
        sys::ncclAllGather(
            s as *const c_void,
            d as *mut c_void,
            n,
            T::as_nccl_type(),
            comm,
            nccl_stream(stream),
        )
    })
}

/// One collective of a group, on `n` f32 at device address `p`.
type GroupOp = fn(sys::ncclComm_t, sys::cudaStream_t, u64, usize, i32) -> sys::ncclResult_t;

fn group_sum(
    comm: sys::ncclComm_t,
    s: sys::cudaStream_t,
    p: u64,
    n: usize,
    _root: i32,
) -> sys::ncclResult_t {
    // SAFETY: the caller passes a live device buffer of `n` f32, ordered on `s`.
    unsafe {
        sys::ncclAllReduce(
            p as *const c_void,
            p as *mut c_void,
            n,
            sys::ncclDataType_t::ncclFloat32,
            sys::ncclRedOp_t::ncclSum,
            comm,
            s,
        )
    }
}

fn group_broadcast(
    comm: sys::ncclComm_t,
    s: sys::cudaStream_t,
    p: u64,
    n: usize,
    root: i32,
) -> sys::ncclResult_t {
    // SAFETY: the caller passes a live device buffer of `n` f32, ordered on `s`.
    unsafe {
        sys::ncclBroadcast(
            p as *const c_void,
            p as *mut c_void,
            n,
            sys::ncclDataType_t::ncclFloat32,
            root,
            comm,
            s,
        )
    }
}

impl NcclComm {
    /// The exit status of a process ended because a NCCL call was blocked on a peer that is gone
    /// when its communicator had to be aborted (NCCL's abort would free the communicator under
    /// the blocked call). The reason is logged (`tracing::error!`) and printed to stderr first;
    /// the other ranks see this rank leave within their own timeouts.
    pub const BLOCKED_EXIT_CODE: i32 = 87;

    /// Joins the NCCL group of the ranks of `bootstrap` on `device` (`Device::Cuda(i)`, this
    /// rank's GPU). Every rank must call it at the same point.
    pub fn new(bootstrap: &dyn Communicator, device: Device, timeout: Duration) -> Result<Self> {
        let Device::Cuda(ordinal) = device else {
            return Err(NnError::Invalid {
                op: "NcclComm",
                msg: format!("NCCL needs a CUDA device, got {device}"),
            });
        };
        let backend = CudaBackend::get(ordinal)?;
        // SAFETY: only tries to dlopen the library under its usual names.
        if !unsafe { nccl::sys::is_culib_present() } {
            return Err(NnError::Cuda(
                "NCCL could not be loaded: cudarc looks for libnccl.so (not the libnccl.so.2 that \
                 NCCL installs), so link it, e.g. `ln -s .../nvidia/nccl/lib/libnccl.so.2 \
                 DIR/libnccl.so` with DIR on LD_LIBRARY_PATH (gpu-check/run.sh does this)"
                    .into(),
            ));
        }
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        // Before any NCCL call: every rank has the same environment as a rule, so all fail here
        // (a rank that differs is lost to the others at the id exchange or their init).
        check_blocking_env().map_err(|why| CommError::Nccl {
            rank,
            world,
            op: "ncclCommInitRank".into(),
            why,
        })?;
        let id_bytes = share_unique_id(bootstrap, "NCCL unique id")?;
        let stream = backend.gpu().stream().clone();
        let family = Family::start(timeout)?;
        Self::init(backend, stream, family, rank, world, &id_bytes, timeout)
    }

    /// `ncclCommInitRank` on a helper thread, waited for up to `timeout`, then a warm-up
    /// all-reduce.
    fn init(
        backend: Arc<CudaBackend>,
        stream: Arc<CudaStream>,
        family: Arc<Family>,
        rank: usize,
        world: usize,
        id_bytes: &[u8],
        timeout: Duration,
    ) -> Result<Self> {
        let op = "ncclCommInitRank";
        let fail = |why: String| -> NnError {
            CommError::Nccl {
                rank,
                world,
                op: op.into(),
                why,
            }
            .into()
        };
        let (Ok(nranks), Ok(me)) = (i32::try_from(world), i32::try_from(rank)) else {
            return Err(fail(format!(
                "rank {rank} of {world} is beyond NCCL's range"
            )));
        };
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, &s) in id.internal.iter_mut().zip(id_bytes) {
            *d = s as std::ffi::c_char;
        }
        let (tx, rx) = mpsc::channel();
        let ctx = backend.gpu().context().clone();
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let made = ctx
                    .bind_to_thread()
                    .map_err(|e| format!("CUDA error: {}", GpuError::from(e)))
                    .and_then(|_| {
                        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
                        // SAFETY: `raw` is a valid place for the new handle.
                        let r = unsafe { sys::ncclCommInitRank(&mut raw, nranks, id, me) };
                        if r == sys::ncclResult_t::ncclInProgress && !raw.is_null() {
                            // A non-blocking communicator, still connecting: aborted where the
                            // handle is dropped, which NCCL allows at any point for those.
                            drop(Handle::new(raw, ctx.clone(), rank, world));
                        }
                        check(r)
                            .map(|_| Handle::new(raw, ctx.clone(), rank, world))
                            .map_err(|e| format!("NCCL error: {}", describe(e.0)))
                    });
                // If the caller gave up waiting, the handle is aborted where it is dropped.
                let _ = tx.send(made);
            })
            .map_err(|e| NnError::Cuda(format!("cannot start the NCCL init thread: {e}")))?;
        let handle = match rx.recv_timeout(timeout) {
            Ok(Ok(h)) => Arc::new(h),
            Ok(Err(why)) => return Err(fail(why)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(fail("the init thread panicked".into()))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(fail(format!(
                    "not complete after {timeout:?}: a peer died or never reached its own init \
                     (the init thread is left behind)"
                )))
            }
        };
        family
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle.clone());
        let nccl = NcclComm {
            handle,
            family,
            backend,
            stream,
            rank,
            world,
            timeout,
        };
        // Unless NCCL_RUNTIME_CONNECT=0, NCCL connects its peers lazily, inside the first
        // collectives, and allocates its buffers then: do it now, under the timeout, before
        // the first step.
        let mut probe = nccl.backend.scratch_zeroed::<f32>(1)?;
        nccl.all_reduce_device_f32(&mut probe)?;
        Ok(nccl)
    }

    /// The stream this communicator's collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The GPU this communicator's rank runs on.
    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    fn fail(&self, op: &str, why: String) -> CommError {
        CommError::Nccl {
            rank: self.rank,
            world: self.world,
            op: op.into(),
            why,
        }
    }

    fn cuda_fail(&self, op: &str, e: DriverError) -> CommError {
        self.fail(op, format!("CUDA error: {}", GpuError::from(e)))
    }

    fn aborted(&self, op: &str) -> CommError {
        self.fail(
            op,
            format!(
                "the communicators of this group were aborted: {}",
                self.family.why()
            ),
        )
    }

    /// Runs `f` with the communicator and records an event after what it queued.
    fn launch<T>(
        &self,
        op: &str,
        f: impl FnOnce(sys::ncclComm_t, &CudaStream) -> std::result::Result<T, NcclError>,
    ) -> Result<(T, CudaEvent), CommError> {
        let out = self.enqueue(op, f)?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.cuda_fail(op, e))?;
        Ok((out, event))
    }

    /// Runs `f` (which queues NCCL calls on the stream) with the communicator, one thread at a
    /// time, under the watchdog.
    fn enqueue<T>(
        &self,
        op: &str,
        f: impl FnOnce(sys::ncclComm_t, &CudaStream) -> std::result::Result<T, NcclError>,
    ) -> Result<T, CommError> {
        let _serial = self.handle.calls.lock().unwrap_or_else(|e| e.into_inner());
        if self.family.is_aborted() {
            return Err(self.aborted(op));
        }
        self.backend
            .gpu()
            .context()
            .bind_to_thread()
            .map_err(|e| self.cuda_fail(op, e))?;
        self.handle.set_op(op);
        self.handle
            .busy_since
            .store(self.family.now_ms() + 1, Ordering::SeqCst);
        let out = self.handle.with(|raw| f(raw, &self.stream));
        self.handle.busy_since.store(0, Ordering::SeqCst);
        // An abort during the call (the watchdog's) is what ended it: report that.
        if self.family.is_aborted() {
            return Err(self.aborted(op));
        }
        match out {
            None => Err(self.aborted(op)),
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => {
                let why = format!("NCCL error: {}", describe(e.0));
                if is_fatal(e.0) {
                    self.family.abort_all(format!(
                        "{op} on rank {} of {} failed with {why}",
                        self.rank, self.world
                    ));
                }
                Err(self.fail(op, why))
            }
        }
    }

    /// Runs `f` with the communicator, then waits for what it queued.
    fn run<T>(
        &self,
        op: &str,
        f: impl FnOnce(sys::ncclComm_t, &CudaStream) -> std::result::Result<T, NcclError>,
    ) -> Result<T, CommError> {
        let (out, event) = self.launch(op, f)?;
        self.wait_event(op, &event)?;
        Ok(out)
    }

    /// NCCL's asynchronous error of this communicator, if it has one (a peer's connection
    /// closed, a network failure).
    fn async_error(&self) -> Option<sys::ncclResult_t> {
        self.handle
            .with(|raw| {
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: `raw` is live while `with` runs; `state` is a valid place.
                let call = unsafe { sys::ncclCommGetAsyncError(raw, &mut state) };
                match (call, state) {
                    (
                        sys::ncclResult_t::ncclSuccess,
                        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress,
                    ) => None,
                    (sys::ncclResult_t::ncclSuccess, e) => Some(e),
                    (e, _) => Some(e),
                }
            })
            .flatten()
    }

    /// Polls `event` (and NCCL's asynchronous error) up to the timeout; on an error or the
    /// timeout this communicator and its duplicates are aborted and every later call fails.
    fn wait_event(&self, op: &str, event: &CudaEvent) -> Result<(), CommError> {
        let start = Instant::now();
        loop {
            if self.family.is_aborted() {
                return Err(self.aborted(op));
            }
            match event.try_is_complete() {
                // An abort releases stuck kernels too: only a completion before it counts.
                Ok(true) if self.family.is_aborted() => return Err(self.aborted(op)),
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.cuda_fail(op, e)),
            }
            // A peer whose process died shows here at once (its connection closed), long
            // before the timeout; the collective would otherwise wait for it until then.
            if let Some(e) = self.async_error() {
                let why = format!(
                    "NCCL reported {} (a peer is gone or the network failed; NCCL does not say \
                     which peer; the communicators of this group are aborted)",
                    describe(e)
                );
                self.family.abort_all(why.clone());
                return Err(self.fail(op, why));
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                let why = format!(
                    "not complete after {:?}: a peer is gone or stuck (NCCL does not say which; \
                     the communicators of this group are aborted)",
                    self.timeout
                );
                // Aborting the communicators also releases the stuck kernels.
                self.family.abort_all(format!("{op}: {why}"));
                return Err(self.fail(op, why));
            }
            // Most collectives finish within a millisecond: spin first, then sleep.
            if waited < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Sums `buf` over the ranks in place, on the device.
    pub fn all_reduce_device_f32(&self, buf: &mut CudaSlice<f32>) -> Result<(), CommError> {
        self.run("all_reduce (device)", |c, s| sum_in_place(c, s, buf))
    }

    /// Copies rank `root`'s buffers to every rank, in place on the device, as one NCCL group
    /// waited for once (the initial weights of a run: no trip through the hosts). Every rank
    /// must pass buffers of the same lengths in the same order (NCCL does not check).
    pub fn broadcast_many_device_f32(
        &self,
        bufs: &mut [&mut CudaSlice<f32>],
        root: usize,
    ) -> Result<(), CommError> {
        let op = "broadcast (device, grouped)";
        let root = i32::try_from(root)
            .ok()
            .filter(|&r| (r as usize) < self.world_size())
            .ok_or_else(|| CommError::Mismatch {
                op: op.into(),
                msg: format!(
                    "root rank {root} is not one of the {} ranks",
                    self.world_size()
                ),
            })?;
        let event = self.launch_group(op, bufs, group_broadcast, root)?;
        self.wait_event(op, &event)
    }

    /// Sums `buf` over the ranks in place on the device, queued on this communicator's stream
    /// without waiting for it (global batch norm's sums, which the next kernels on that stream
    /// read: no round trip through the host). A peer that never comes is caught by the next
    /// collective that is waited for, which queues behind this one.
    pub fn queue_all_reduce_device_f64(&self, buf: &mut CudaSlice<f64>) -> Result<(), CommError> {
        self.enqueue("all_reduce (device, queued)", |c, s| {
            sum_in_place(c, s, buf)
        })
    }

    /// Waits (up to the timeout) for everything queued so far on this communicator's stream:
    /// before the host reads what kernels wrote after collectives queued without a wait
    /// ([`NcclComm::queue_all_reduce_device_f64`]), since a plain read would block forever on
    /// a collective whose peer died.
    pub fn fence(&self) -> Result<(), CommError> {
        let op = "fence";
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.cuda_fail(op, e))?;
        self.wait_event(op, &event)
    }

    /// Every rank's `src` (of one length) concatenated in rank order into `dst`, on the device.
    pub fn all_gather_view(
        &self,
        src: &CudaView<'_, f32>,
        dst: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CommError> {
        let op = "all_gather (device)";
        if dst.len() != src.len() * self.world {
            return Err(CommError::Mismatch {
                op: op.into(),
                msg: format!(
                    "{} values gathered from {} ranks of {}",
                    dst.len(),
                    self.world,
                    src.len()
                ),
            });
        }
        self.run(op, |c, s| gather(c, s, src, dst))
    }

    /// Sums every buffer of `bufs` over the ranks in place, as one NCCL group (NCCL fuses the
    /// group's reductions, so many small gradients cost about one large all-reduce).
    pub fn all_reduce_many_f32(&self, bufs: &mut [&mut CudaSlice<f32>]) -> Result<(), CommError> {
        let pending = self.start_all_reduce_many_f32(bufs)?;
        self.wait(pending)
    }

    /// [`NcclComm::all_reduce_many_f32`] queued on this communicator's stream without waiting
    /// for it: the host goes on (with the backward pass) and [`NcclComm::wait`] waits later. The
    /// buffers must not be used before then.
    pub fn start_all_reduce_many_f32(
        &self,
        bufs: &mut [&mut CudaSlice<f32>],
    ) -> Result<NcclPending, CommError> {
        let op = "all_reduce (device, grouped)";
        let event = self.launch_group(op, bufs, group_sum, 0)?;
        Ok(NcclPending { event, op })
    }

    /// Waits (up to the timeout) for a collective started earlier.
    pub fn wait(&self, pending: NcclPending) -> Result<(), CommError> {
        self.wait_event(pending.op, &pending.event)
    }

    /// `each` over every buffer of `bufs` as one NCCL group (NCCL fuses the group's
    /// collectives) queued on this communicator's stream; the event that marks its end.
    fn launch_group(
        &self,
        op: &str,
        bufs: &mut [&mut CudaSlice<f32>],
        each: GroupOp,
        root: i32,
    ) -> Result<CudaEvent, CommError> {
        let ((), event) = self.launch(op, |c, stream| {
            // The stream waits for earlier uses of every buffer here; the guards record the
            // buffers' writes when dropped, after group_end, which is where the grouped
            // collectives are queued, so a later use on another stream waits for them.
            let mut guards = Vec::with_capacity(bufs.len());
            let mut at = Vec::with_capacity(bufs.len());
            for b in bufs.iter_mut() {
                let n = b.len();
                let (p, written) = b.device_ptr_mut(stream);
                at.push((p, n));
                guards.push(written);
            }
            let s = nccl_stream(stream);
            // SAFETY: no arguments; paired with the group end below.
            check(unsafe { sys::ncclGroupStart() })?;
            let mut first_err = None;
            for &(p, n) in &at {
                if let Err(e) = check(each(c, s, p, n, root)) {
                    first_err.get_or_insert(e);
                }
            }
            // SAFETY: ends the group started above.
            let end = check(unsafe { sys::ncclGroupEnd() });
            drop(guards);
            match first_err {
                Some(e) => Err(e),
                None => end,
            }
        })?;
        Ok(event)
    }

    fn upload<T: DeviceRepr>(&self, v: &[T], op: &str) -> Result<CudaSlice<T>, CommError> {
        self.stream.clone_htod(v).map_err(|e| self.cuda_fail(op, e))
    }

    /// `v` copied to the host, on this communicator's stream. Call it only after a wait for a
    /// collective queued after everything else on the stream (so after [`NcclComm::run`]): the
    /// copy's synchronisation then waits for the copy alone, not for work of a peer that may
    /// never come, and the download is bounded like the wait before it.
    fn download<T: DeviceRepr>(&self, v: &CudaSlice<T>, op: &str) -> Result<Vec<T>, CommError> {
        self.stream.clone_dtoh(v).map_err(|e| self.cuda_fail(op, e))
    }

    fn all_reduce_host<T>(&self, buf: &mut [T], op: &str) -> Result<(), CommError>
    where
        T: DeviceRepr + ValidAsZeroBits + NcclType + Copy,
    {
        if buf.is_empty() {
            return self.barrier();
        }
        let mut d = self.upload(buf, op)?;
        self.run(op, |c, s| sum_in_place(c, s, &mut d))?;
        buf.copy_from_slice(&self.download(&d, op)?);
        Ok(())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// Through the device: the lengths are all-gathered first, then the blobs padded to the
    /// longest.
    fn all_gather_bytes(&self, blob: &[u8], op: &str) -> Result<Vec<Vec<u8>>, CommError> {
        let len = self.upload(&[blob.len() as u64], op)?;
        let mut lens = self
            .stream
            .alloc_zeros::<u64>(self.world)
            .map_err(|e| self.cuda_fail(op, e))?;
        self.run(op, |c, s| gather(c, s, &len, &mut lens))?;
        let lens = self.download(&lens, op)?;
        let max = lens.iter().copied().max().unwrap_or(0) as usize;
        if max == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let mut padded = blob.to_vec();
        padded.resize(max, 0);
        let mine = self.upload(&padded, op)?;
        let mut all = self
            .stream
            .alloc_zeros::<u8>(max * self.world)
            .map_err(|e| self.cuda_fail(op, e))?;
        self.run(op, |c, s| gather(c, s, &mine, &mut all))?;
        let all = self.download(&all, op)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * max..r * max + n as usize].to_vec())
            .collect())
    }

    // NCCL's reductions give every rank the same bits (each element is reduced once and then
    // distributed), as the trait requires.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_host(buf, "all_reduce_f32")
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        self.all_reduce_host(buf, "all_reduce_f64")
    }

    /// A new NCCL communicator of the same ranks on a new stream of this GPU (its unique id
    /// sent over this one), so its collectives overlap what runs on the compute stream.
    fn duplicate(&self) -> Result<Arc<dyn Communicator>, CommError> {
        let op = "duplicate";
        let id_bytes = share_unique_id(self, op)?;
        let as_comm = |e: NnError| match e {
            NnError::Comm(c) => c,
            other => self.fail(op, other.to_string()),
        };
        let stream = self
            .backend
            .gpu()
            .context()
            .new_stream()
            .map_err(|e| self.cuda_fail(op, e))?;
        let dup = Self::init(
            self.backend.clone(),
            stream,
            self.family.clone(),
            self.rank,
            self.world,
            &id_bytes,
            self.timeout,
        )
        .map_err(as_comm)?;
        Ok(Arc::new(dup))
    }

    fn nccl(&self) -> Option<&NcclComm> {
        Some(self)
    }
}

/// A NCCL collective queued and not yet waited for (see [`NcclComm::wait`]).
#[derive(Debug)]
pub struct NcclPending {
    event: CudaEvent,
    op: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bad_arguments_leave_a_communicator_usable() {
        assert!(!is_fatal(sys::ncclResult_t::ncclInvalidArgument));
        assert!(!is_fatal(sys::ncclResult_t::ncclInvalidUsage));
        assert!(is_fatal(sys::ncclResult_t::ncclRemoteError));
        assert!(is_fatal(sys::ncclResult_t::ncclSystemError));
    }

    #[test]
    fn only_success_is_success() {
        assert!(check(sys::ncclResult_t::ncclSuccess).is_ok());
        // cudarc's `result()` takes these two for success.
        assert!(check(sys::ncclResult_t::ncclInProgress).is_err());
        assert!(check(sys::ncclResult_t::ncclNumResults).is_err());
        assert!(check(sys::ncclResult_t::ncclRemoteError).is_err());
        assert!(hint(sys::ncclResult_t::ncclInProgress).contains("unset NCCL_COMM_BLOCKING"));
        assert_eq!(hint(sys::ncclResult_t::ncclRemoteError), "");
    }

    #[test]
    fn nccl_comm_blocking_is_read_as_nccl_reads_it() {
        for off in [
            "0", "00", " 0", "+0", "-0", "0x0", "0x", "08", "0abc", "abc", "\t0\n",
        ] {
            assert!(blocking_disabled(Some(off)), "{off:?}");
        }
        for on in ["1", "01", "0x10", "2", " 1", "-1", "10"] {
            assert!(!blocking_disabled(Some(on)), "{on:?}");
        }
        // Unset, or set empty (which NCCL takes for unset).
        assert!(!blocking_disabled(None));
        assert!(!blocking_disabled(Some("")));
    }
}

//! NCCL (`libnccl.so`) at its C ABI: the calls the project makes (through cudarc's
//! `nccl::sys`, see `crates/simclr-nn/src/dist/nccl.rs`) and their neighbours in cudarc's
//! `nccl::result` layer, each as the NCCL API reference ("Communicator Creation and
//! Management", "Collective Communication Functions", "Group Calls", "Types") describes it, with
//! NCCL's `ncclResult_t` codes.
//!
//! - **Ranks** are threads of one process or processes of one machine. The unique id names a
//!   rendezvous folder under `/dev/shm` (or the temporary folder; never the network), where
//!   each collective is exchanged through files (see [`rendezvous`]): rank R writes its
//!   contribution to collective number K, waits until every rank's is there, and computes the
//!   result itself (reductions in rank order, so every rank gets the same bits; see
//!   [`reduce`]). A rank deletes its own contribution to K only once every peer has said (in a
//!   later contribution's header) that it has completed K; the last rank to leave removes the
//!   folder.
//! - **Stream order**: a collective checks its arguments (device buffers with
//!   [`memory::check_device`]) at the call and queues the exchange on its stream with
//!   [`api::enqueue_on`], returning at once, as NCCL's calls do ("NCCL collective operations
//!   are asynchronous with respect to the host"). Inside `ncclGroupStart`/`ncclGroupEnd` the
//!   calls are recorded and queued at the outermost `ncclGroupEnd`, in call order; the
//!   operations of one group on one stream post all their contributions before waiting for any
//!   (NCCL runs a group's operations as one launch, so a group over several communicators
//!   cannot deadlock on their order), and the streams of a group wait for one another ("all
//!   operations in a group are ... executed together"). A call that fails inside a group makes
//!   `ncclGroupEnd` return its error and queue nothing, as NCCL's group error handling does.
//! - **Initialisation** (`ncclCommInitRank`) blocks until every rank has joined, without a
//!   time limit of its own (NCCL documents none); the handle is written before it blocks (as
//!   NCCL's is), so `ncclCommAbort` from another thread ends the wait (`ncclSystemError`). It
//!   fails with `ncclInvalidUsage` where NCCL's does: two ranks of one process on one device
//!   ("Duplicate GPU detected"), a rank joined twice, ranks that disagree on `nranks`.
//! - **Failures** (NCCL's "Fault Tolerance" and `ncclCommGetAsyncError`): a collective waiting
//!   for a peer keeps waiting, with `ncclCommGetAsyncError` reporting `ncclSuccess`, until
//!   either this communicator is aborted (`ncclCommAbort`: the collective stops without writing
//!   its output; the async error becomes `ncclSystemError`, the code NCCL gives an operation
//!   interrupted on this side, not by a peer) or the peer is visibly gone: it aborted or failed
//!   its initialisation (`abort.R`), or its process exited; the collective then stops with
//!   `ncclRemoteError` ("remote process exited or there was a network error"), as NCCL reports
//!   a peer whose connection closed. A peer's contribution already present is used even if it
//!   aborted since. A stopped collective never writes device memory, and an abort waits for a
//!   collective writing device memory to finish, so buffers may be freed once it returns.
//! - **Finalize and destroy**: `ncclCommFinalize` waits until every operation queued on the
//!   communicator has completed ("flushes all issued communications") and returns the async
//!   error, if any; `ncclCommDestroy` finalizes first if that was not done ("ncclCommDestroy will
//!   call ncclCommFinalize internally"), then frees. A handle that was aborted or destroyed
//!   stays known, so a later call on it is `ncclInvalidUsage` with a message rather than a use
//!   of freed memory; `ncclCommGetAsyncError` still reports its last error.
//! - **Non-blocking communicators** (`NCCL_COMM_BLOCKING=0`, or `ncclConfig_t::blocking = 0`)
//!   are refused with `ncclInvalidUsage`, naming the setting (the project treats their
//!   `ncclInProgress` as an error too).
//!
//! Calls cudarc can reach that are not emulated (point-to-point, splits, registration, custom
//! reduction operators) are exported, name themselves on standard error and fail with
//! `ncclInvalidUsage`. Errors are also printed as NCCL's `WARN` lines would be, and
//! `ncclGetLastError` returns the calling thread's last one.
#![allow(non_snake_case, non_upper_case_globals, clippy::missing_safety_doc)]

mod collectives;
mod group;
mod init;
pub mod reduce;
pub mod rendezvous;
mod teardown;

pub use collectives::*;
pub use group::*;
pub use init::*;
pub use teardown::*;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::driver::result::{CuResult, CUDA_ERROR_ILLEGAL_ADDRESS};
use crate::driver::{api, context, device_count, memory};
use rendezvous::{exists, publish, Backoff, ID_BYTES};

/// `ncclResult_t`.
pub type NcclResult = u32;
/// `ncclSuccess`.
pub const ncclSuccess: NcclResult = 0;
/// `ncclUnhandledCudaError`: a CUDA call failed (here: queueing on the stream).
pub const ncclUnhandledCudaError: NcclResult = 1;
/// `ncclSystemError`: a system call failed, or an operation was stopped by `ncclCommAbort`.
pub const ncclSystemError: NcclResult = 2;
/// `ncclInternalError`.
pub const ncclInternalError: NcclResult = 3;
/// `ncclInvalidArgument`.
pub const ncclInvalidArgument: NcclResult = 4;
/// `ncclInvalidUsage`.
pub const ncclInvalidUsage: NcclResult = 5;
/// `ncclRemoteError`: a peer aborted or its process exited.
pub const ncclRemoteError: NcclResult = 6;
/// `ncclInProgress`: a communicator still initialising (`ncclCommGetAsyncError`).
pub const ncclInProgress: NcclResult = 7;

/// The version reported by `ncclGetVersion` (`NCCL_VERSION(2, 28, 3)`).
pub const NCCL_VERSION_CODE: c_int = 22803;

/// `ncclComm_t`: an opaque pointer.
pub type NcclComm = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes (see [`rendezvous`] for what the emulator puts there).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NcclUniqueId {
    /// The bytes.
    pub internal: [c_char; ID_BYTES],
}

/// The leading fields of `ncclConfig_t`, the same in every NCCL version since 2.14; the
/// emulator reads no others.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NcclConfigHead {
    /// `sizeof(ncclConfig_t)`.
    pub size: usize,
    /// `NCCL_CONFIG_INITIALIZER`'s magic, 0xcafebeef.
    pub magic: c_uint,
    /// `NCCL_VERSION_CODE` of the header the caller was built with.
    pub version: c_uint,
    /// 1: blocking, 0: non-blocking, `NCCL_CONFIG_UNDEF_INT`: from `NCCL_COMM_BLOCKING`.
    pub blocking: c_int,
}

/// `NCCL_CONFIG_INITIALIZER`'s magic.
pub const NCCL_CONFIG_MAGIC: c_uint = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: a field left to its default.
pub const NCCL_CONFIG_UNDEF_INT: c_int = i32::MIN;

// ---------------------------------------------------------------------------------------------
// Errors

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Reports `msg` as NCCL's `WARN` line would, keeps it for `ncclGetLastError`, returns `code`.
fn fail(code: NcclResult, msg: impl std::fmt::Display) -> NcclResult {
    let m = format!("{msg}");
    eprintln!("simclr-gpu-emu: NCCL WARN {m}");
    LAST_ERROR.with(|l| *l.borrow_mut() = CString::new(m.replace('\0', " ")).unwrap_or_default());
    code
}

// ---------------------------------------------------------------------------------------------
// Communicators

const INITIALIZING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;
const ABORTED: u8 = 3;
const DESTROYED: u8 = 4;

/// One rank's communicator.
struct Comm {
    rank: usize,
    nranks: usize,
    device: i32,
    dir: PathBuf,
    state: AtomicU8,
    /// Set by `ncclCommAbort`: every wait of the communicator stops.
    aborted: AtomicBool,
    finalized: AtomicBool,
    /// `ncclCommGetAsyncError`'s answer once initialised.
    async_err: AtomicU32,
    /// The number of the last collective queued (collectives are numbered from 1, in call
    /// order, identically on every rank as NCCL requires).
    last_seq: AtomicU64,
    /// Collectives queued and not yet completed (`ncclCommFinalize` waits for 0).
    in_flight: AtomicU64,
    /// Held (shared) while a collective posts its contribution or writes device memory;
    /// `ncclCommAbort` takes it (exclusive) once, so that after it returns nothing of this
    /// communicator touches memory.
    live: RwLock<()>,
    /// The peers' process ids (from their `join.R`), once initialised.
    pids: OnceLock<Vec<i32>>,
    progress: Mutex<Progress>,
}

/// Which collectives have completed, here and (as far as known) at the peers.
struct Progress {
    /// Every collective up to this one has completed on this rank.
    done_upto: u64,
    /// Completed collectives beyond `done_upto` (several streams may complete out of order).
    completed: BTreeSet<u64>,
    /// What each peer said it had completed, in its latest contribution's header.
    peer_done: Vec<u64>,
    /// This rank's contributions up to this collective have been deleted.
    cleaned: u64,
}

impl Comm {
    fn set_async(&self, code: NcclResult) {
        let _ =
            self.async_err
                .compare_exchange(ncclSuccess, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn pids(&self) -> &[i32] {
        self.pids.get().map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// A peer that is visibly gone (aborted, failed its initialisation, or its process
    /// exited), described.
    fn peer_gone(&self, pids: &[i32]) -> Option<String> {
        (0..self.nranks).filter(|&r| r != self.rank).find_map(|r| {
            if exists(&self.dir, &format!("abort.{r}")) {
                Some(format!("rank {r} aborted"))
            } else if pids
                .get(r)
                .is_some_and(|&p| p != 0 && rendezvous::process_gone(p))
            {
                Some(format!("the process of rank {r} exited"))
            } else {
                None
            }
        })
    }

    /// Polls `ready` until it holds; stops on this communicator's abort (`ncclSystemError`) or
    /// a peer gone (`ncclRemoteError`, unless `ready` holds after all).
    fn wait_for(
        &self,
        what: &str,
        pids: impl Fn() -> Vec<i32>,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), Stop> {
        let mut pause = Backoff::new();
        let mut checked = Instant::now();
        loop {
            if ready() {
                return Ok(());
            }
            if self.aborted.load(Ordering::SeqCst) {
                return Err(Stop::Nccl(
                    ncclSystemError,
                    format!("{what}: stopped by ncclCommAbort"),
                ));
            }
            if checked.elapsed() > Duration::from_millis(10) {
                checked = Instant::now();
                if let Some(why) = self.peer_gone(&pids()) {
                    if ready() {
                        return Ok(());
                    }
                    return Err(Stop::Nccl(ncclRemoteError, format!("{what}: {why}")));
                }
            }
            pause.pause();
        }
    }

    /// Collective `seq` completed (or stopped) on this rank: deletes this rank's contributions
    /// every peer has completed.
    fn finish(&self, seq: u64) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.completed.insert(seq);
        loop {
            let next = p.done_upto + 1;
            if !p.completed.remove(&next) {
                break;
            }
            p.done_upto = next;
        }
        let me = self.rank;
        let safe = p
            .peer_done
            .iter()
            .enumerate()
            .filter(|&(r, _)| r != me)
            .map(|(_, &d)| d)
            .min()
            .unwrap_or(p.done_upto)
            .min(p.done_upto);
        for k in p.cleaned + 1..=safe {
            let _ = std::fs::remove_file(self.dir.join(format!("c{k}.{me}")));
        }
        p.cleaned = p.cleaned.max(safe);
        drop(p);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// `ncclCommAbort`'s work: stops every wait, waits for memory writes under way, tells the
    /// peers, leaves the folder.
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            // Operations still queued are stopped, never completed.
            self.set_async(ncclSystemError);
        }
        drop(self.live.write().unwrap_or_else(|e| e.into_inner()));
        self.state.store(ABORTED, Ordering::SeqCst);
        let _ = publish(&self.dir, &format!("abort.{}", self.rank), b"");
        rendezvous::leave(&self.dir, self.rank, self.nranks, self.pids());
    }
}

/// Every communicator handed out, by handle; entries stay after an abort or destroy so a late
/// call on one is an error, not a use of freed memory (and a handle is never reused).
fn registry() -> &'static Mutex<HashMap<usize, Arc<Comm>>> {
    static R: OnceLock<Mutex<HashMap<usize, Arc<Comm>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The communicator of a handle, whatever its state.
fn lookup(h: NcclComm) -> Result<Arc<Comm>, NcclResult> {
    if h.is_null() {
        return Err(fail(ncclInvalidArgument, "comm argument is NULL"));
    }
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(h as usize))
        .cloned()
        .ok_or_else(|| fail(ncclInvalidArgument, format!("{h:p} is not a communicator")))
}

/// The communicator of a handle, which must be initialised and neither aborted nor destroyed.
fn live(h: NcclComm, call: &str) -> Result<Arc<Comm>, NcclResult> {
    let c = lookup(h)?;
    match c.state.load(Ordering::SeqCst) {
        READY => Ok(c),
        s => Err(fail(
            ncclInvalidUsage,
            format!(
                "{call}: the communicator {}",
                match s {
                    INITIALIZING => "is still initialising",
                    FAILED => "failed its initialisation",
                    ABORTED => "was aborted (ncclCommAbort frees it)",
                    _ => "was destroyed",
                }
            ),
        )),
    }
}

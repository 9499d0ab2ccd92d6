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

pub mod reduce;
pub mod rendezvous;

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

// ---------------------------------------------------------------------------------------------
// Version, errors, unique ids

/// `ncclGetVersion`: [`NCCL_VERSION_CODE`].
#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> NcclResult {
    if version.is_null() {
        return fail(ncclInvalidArgument, "ncclGetVersion: version is NULL");
    }
    // SAFETY: a non-null out-pointer from the caller.
    unsafe { version.write(NCCL_VERSION_CODE) };
    ncclSuccess
}

/// `ncclGetErrorString`: NCCL's own text for each code (a static string).
#[no_mangle]
pub extern "C" fn ncclGetErrorString(result: NcclResult) -> *const c_char {
    let s: &'static std::ffi::CStr = match result {
        ncclSuccess => c"no error",
        ncclUnhandledCudaError => c"unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        ncclSystemError => c"unhandled system error (run with NCCL_DEBUG=INFO for details)",
        ncclInternalError => c"internal error - please report this issue to the NCCL developers",
        ncclInvalidArgument => c"invalid argument (run with NCCL_DEBUG=WARN for details)",
        ncclInvalidUsage => c"invalid usage (run with NCCL_DEBUG=WARN for details)",
        ncclRemoteError => c"remote process exited or there was a network error",
        ncclInProgress => c"NCCL operation in progress",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

/// `ncclGetLastError`: the calling thread's last error message (valid until its next error).
#[no_mangle]
pub extern "C" fn ncclGetLastError(_comm: NcclComm) -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// `ncclGetUniqueId`: a new id naming a new rendezvous folder ([`rendezvous`]).
#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(out: *mut NcclUniqueId) -> NcclResult {
    if out.is_null() {
        return fail(ncclInvalidArgument, "ncclGetUniqueId: uniqueId is NULL");
    }
    match rendezvous::new_id() {
        Ok(id) => {
            let mut u = NcclUniqueId {
                internal: [0; ID_BYTES],
            };
            for (d, s) in u.internal.iter_mut().zip(id) {
                *d = s as c_char;
            }
            // SAFETY: a non-null out-pointer from the caller.
            unsafe { out.write(u) };
            ncclSuccess
        }
        Err(e) => fail(ncclSystemError, format!("ncclGetUniqueId: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Initialisation

/// Whether `NCCL_COMM_BLOCKING` makes communicators non-blocking: NCCL reads it with `strtoll`
/// (base 0); an empty value is unset; 0 is non-blocking.
fn env_nonblocking() -> bool {
    let Some(v) = std::env::var_os("NCCL_COMM_BLOCKING").filter(|v| !v.is_empty()) else {
        return false;
    };
    let Ok(c) = CString::new(v.as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated string; no end pointer asked for.
    unsafe { libc::strtoll(c.as_ptr(), std::ptr::null_mut(), 0) == 0 }
}

/// What a rank says when it joins: `nranks pid device`.
fn parse_join(s: &str) -> Option<(usize, i32, i32)> {
    let mut it = s.split_whitespace().map(|w| w.parse::<i64>().ok());
    Some((
        usize::try_from(it.next()??).ok()?,
        i32::try_from(it.next()??).ok()?,
        i32::try_from(it.next()??).ok()?,
    ))
}

/// `ncclCommInitRank` and its variants: `device` is the rank's device (the calling thread's
/// current one unless given).
unsafe fn init_rank(
    out: *mut NcclComm,
    nranks: c_int,
    id: &NcclUniqueId,
    rank: c_int,
    device: Option<i32>,
    call: &str,
) -> NcclResult {
    if out.is_null() {
        return fail(ncclInvalidArgument, format!("{call}: comm is NULL"));
    }
    if nranks < 1 || rank < 0 || rank >= nranks {
        return fail(
            ncclInvalidArgument,
            format!("{call}: invalid rank requested : {rank}/{nranks}"),
        );
    }
    if GROUP.with(|g| g.borrow().depth) > 0 {
        return fail(
            ncclInvalidUsage,
            format!("{call} inside ncclGroupStart/ncclGroupEnd is not emulated"),
        );
    }
    let bytes: [u8; ID_BYTES] = id.internal.map(|c| c as u8);
    let dir = match rendezvous::folder(&bytes) {
        Ok(d) => d,
        Err(e) => return fail(ncclInvalidArgument, format!("{call}: {e}")),
    };
    let (rank, nranks) = (rank as usize, nranks as usize);
    let device = device.unwrap_or_else(|| context::current().map_or(0, |c| c.device));
    let comm = Arc::new(Comm {
        rank,
        nranks,
        device,
        dir,
        state: AtomicU8::new(INITIALIZING),
        aborted: AtomicBool::new(false),
        finalized: AtomicBool::new(false),
        async_err: AtomicU32::new(ncclSuccess),
        last_seq: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        live: RwLock::new(()),
        pids: OnceLock::new(),
        progress: Mutex::new(Progress {
            done_upto: 0,
            completed: BTreeSet::new(),
            peer_done: vec![0; nranks],
            cleaned: 0,
        }),
    });
    let h = Arc::as_ptr(&comm) as usize;
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(h, comm.clone());
    // Written before the wait, as NCCL writes `*comm` before its initialisation blocks, so
    // another thread may abort it. Atomically: that thread may be reading it.
    // SAFETY: a non-null, aligned out-pointer from the caller.
    unsafe { (*(out as *const AtomicPtr<c_void>)).store(h as NcclComm, Ordering::SeqCst) };
    match join(&comm, call) {
        Ok(pids) => {
            let _ = comm.pids.set(pids);
            comm.state.store(READY, Ordering::SeqCst);
            ncclSuccess
        }
        Err(Stop::Nccl(code, msg)) | Err(Stop::Fault(msg, code)) => {
            comm.async_err.store(code, Ordering::SeqCst);
            if !comm.aborted.load(Ordering::SeqCst) {
                // Peers waiting on this rank stop (ncclRemoteError) rather than wait forever.
                comm.state.store(FAILED, Ordering::SeqCst);
                let _ = publish(&comm.dir, &format!("abort.{rank}"), b"");
                rendezvous::leave(&comm.dir, rank, nranks, &[]);
                // SAFETY: as above.
                unsafe {
                    (*(out as *const AtomicPtr<c_void>))
                        .store(std::ptr::null_mut(), Ordering::SeqCst)
                };
            }
            fail(code, format!("{call} (rank {rank} of {nranks}): {msg}"))
        }
    }
}

/// Joins the rendezvous folder and waits for every rank: their process ids.
fn join(comm: &Comm, call: &str) -> Result<Vec<i32>, Stop> {
    let sys =
        |e: std::io::Error| Stop::Nccl(ncclSystemError, format!("{}: {e}", comm.dir.display()));
    std::fs::create_dir_all(&comm.dir).map_err(sys)?;
    let me = format!("join.{}", comm.rank);
    if exists(&comm.dir, &me) {
        return Err(Stop::Nccl(
            ncclInvalidUsage,
            format!("rank {} joined this unique id twice", comm.rank),
        ));
    }
    let pid = std::process::id() as i32;
    let line = format!("{} {pid} {}\n", comm.nranks, comm.device);
    publish(&comm.dir, &me, line.as_bytes()).map_err(sys)?;
    let mut seen: Vec<Option<(usize, i32, i32)>> = vec![None; comm.nranks];
    let mut bad = None;
    let pids_of = |seen: &[Option<(usize, i32, i32)>]| -> Vec<i32> {
        seen.iter().map(|s| s.map_or(0, |s| s.1)).collect()
    };
    let seen_cell = RefCell::new(&mut seen);
    comm.wait_for(
        &format!("{call}: waiting for the other ranks to join"),
        || pids_of(&seen_cell.borrow()),
        || {
            let mut seen = seen_cell.borrow_mut();
            for (r, s) in seen.iter_mut().enumerate() {
                if s.is_none() {
                    if let Ok(t) = std::fs::read_to_string(comm.dir.join(format!("join.{r}"))) {
                        *s = parse_join(&t);
                        if s.is_none() {
                            bad.get_or_insert(format!("rank {r}'s join record is malformed"));
                        }
                    }
                }
            }
            bad.is_some() || seen.iter().all(Option::is_some)
        },
    )?;
    if let Some(b) = bad {
        return Err(Stop::Nccl(ncclInternalError, b));
    }
    let all: Vec<(usize, i32, i32)> = seen.iter().map(|s| s.expect("all joined")).collect();
    for (r, &(n, pid_r, dev_r)) in all.iter().enumerate() {
        if n != comm.nranks {
            return Err(Stop::Nccl(
                ncclInvalidUsage,
                format!(
                    "rank {r} was initialised with nranks {n}, rank {} with {}",
                    comm.rank, comm.nranks
                ),
            ));
        }
        for (s, &(_, pid_s, dev_s)) in all.iter().enumerate().skip(r + 1) {
            if pid_r == pid_s && dev_r == dev_s {
                return Err(Stop::Nccl(
                    ncclInvalidUsage,
                    format!("Duplicate GPU detected : rank {r} and rank {s} both on CUDA device {dev_r} (of process {pid_r}); set SIMCLR_GPU_EMU_DEVICES to present more devices"),
                ));
            }
        }
    }
    Ok(all.iter().map(|a| a.1).collect())
}

/// `ncclCommInitRank`: joins rank `rank` of `nranks` on the calling thread's current device;
/// blocks until every rank has joined.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRank(
    comm: *mut NcclComm,
    nranks: c_int,
    commId: NcclUniqueId,
    rank: c_int,
) -> NcclResult {
    if env_nonblocking() {
        return fail(
            ncclInvalidUsage,
            "ncclCommInitRank: NCCL_COMM_BLOCKING=0 (non-blocking communicators) is not emulated; unset NCCL_COMM_BLOCKING or set it to 1",
        );
    }
    // SAFETY: forwarded from the caller.
    unsafe { init_rank(comm, nranks, &commId, rank, None, "ncclCommInitRank") }
}

/// `ncclCommInitRankConfig`: [`ncclCommInitRank`] with a configuration, of which `blocking`
/// is read (non-blocking is refused with `ncclInvalidUsage`); a configuration without NCCL's
/// magic is `ncclInvalidArgument`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut NcclComm,
    nranks: c_int,
    commId: NcclUniqueId,
    rank: c_int,
    config: *mut NcclConfigHead,
) -> NcclResult {
    let call = "ncclCommInitRankConfig";
    let blocking = if config.is_null() {
        NCCL_CONFIG_UNDEF_INT
    } else {
        // SAFETY: a non-null configuration from the caller, at least its leading fields.
        let c = unsafe { *config };
        if c.magic != NCCL_CONFIG_MAGIC {
            return fail(
                ncclInvalidArgument,
                format!("{call}: the configuration was not set up with NCCL_CONFIG_INITIALIZER (magic {:#x})", c.magic),
            );
        }
        c.blocking
    };
    let nonblocking = match blocking {
        NCCL_CONFIG_UNDEF_INT => env_nonblocking(),
        b => b == 0,
    };
    if nonblocking {
        return fail(
            ncclInvalidUsage,
            format!("{call}: non-blocking communicators (config.blocking = 0 or NCCL_COMM_BLOCKING=0) are not emulated"),
        );
    }
    // SAFETY: forwarded from the caller.
    unsafe { init_rank(comm, nranks, &commId, rank, None, call) }
}

/// `ncclCommInitAll`: a clique of `ndev` communicators in this process, rank `i` on device
/// `devlist[i]` (`0..ndev` when `devlist` is NULL).
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitAll(
    comms: *mut NcclComm,
    ndev: c_int,
    devlist: *const c_int,
) -> NcclResult {
    if comms.is_null() || ndev < 1 {
        return fail(
            ncclInvalidArgument,
            "ncclCommInitAll: comms is NULL or ndev < 1",
        );
    }
    let n = ndev as usize;
    let devs: Vec<i32> = if devlist.is_null() {
        (0..ndev).collect()
    } else {
        // SAFETY: the caller passes `ndev` devices.
        unsafe { std::slice::from_raw_parts(devlist, n) }.to_vec()
    };
    if let Some(&d) = devs.iter().find(|&&d| d < 0 || d >= device_count()) {
        return fail(
            ncclInvalidArgument,
            format!("ncclCommInitAll: invalid device {d}"),
        );
    }
    let mut id = NcclUniqueId {
        internal: [0; ID_BYTES],
    };
    // SAFETY: a valid out-pointer.
    let r = unsafe { ncclGetUniqueId(&mut id) };
    if r != ncclSuccess {
        return r;
    }
    let slots = comms as usize;
    let results: Vec<NcclResult> = std::thread::scope(|s| {
        let hs: Vec<_> = devs
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                s.spawn(move || {
                    let out = (slots as *mut NcclComm).wrapping_add(i);
                    // SAFETY: slot i of the caller's array of `ndev`.
                    unsafe { init_rank(out, ndev, &id, i as c_int, Some(d), "ncclCommInitAll") }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(ncclInternalError))
            .collect()
    });
    if let Some(&e) = results.iter().find(|&&r| r != ncclSuccess) {
        for i in 0..n {
            // SAFETY: slot i of the caller's array.
            let h = unsafe { *comms.add(i) };
            if let Ok(c) = lookup(h) {
                if c.state.load(Ordering::SeqCst) == READY {
                    c.abort();
                }
            }
            // SAFETY: as above.
            unsafe { *comms.add(i) = std::ptr::null_mut() };
        }
        return e;
    }
    ncclSuccess
}

// ---------------------------------------------------------------------------------------------
// Teardown and queries

/// `ncclCommFinalize`: waits until every operation queued on the communicator has completed;
/// returns its asynchronous error, if any.
#[no_mangle]
pub unsafe extern "C" fn ncclCommFinalize(comm: NcclComm) -> NcclResult {
    let c = match live(comm, "ncclCommFinalize") {
        Ok(c) => c,
        Err(e) => return e,
    };
    if c.finalized.load(Ordering::SeqCst) {
        return fail(ncclInvalidUsage, "ncclCommFinalize: already finalized");
    }
    finalize(&c)
}

fn finalize(c: &Comm) -> NcclResult {
    let mut pause = Backoff::new();
    while c.in_flight.load(Ordering::SeqCst) > 0 {
        if c.aborted.load(Ordering::SeqCst) {
            return fail(
                ncclSystemError,
                "ncclCommFinalize: stopped by ncclCommAbort",
            );
        }
        pause.pause();
    }
    c.finalized.store(true, Ordering::SeqCst);
    match c.async_err.load(Ordering::SeqCst) {
        ncclSuccess => ncclSuccess,
        e => fail(
            e,
            format!("ncclCommFinalize: the communicator has an asynchronous error ({e})"),
        ),
    }
}

/// `ncclCommDestroy`: finalizes the communicator if that was not done, then frees it.
#[no_mangle]
pub unsafe extern "C" fn ncclCommDestroy(comm: NcclComm) -> NcclResult {
    let c = match live(comm, "ncclCommDestroy") {
        Ok(c) => c,
        Err(e) => return e,
    };
    if !c.finalized.load(Ordering::SeqCst) {
        // Its error stays in the async error; the communicator is freed either way.
        let _ = finalize(&c);
    }
    if c.aborted.load(Ordering::SeqCst) {
        return fail(
            ncclInvalidUsage,
            "ncclCommDestroy: the communicator was aborted meanwhile",
        );
    }
    c.state.store(DESTROYED, Ordering::SeqCst);
    rendezvous::leave(&c.dir, c.rank, c.nranks, c.pids());
    ncclSuccess
}

/// `ncclCommAbort`: from any thread, stops the communicator's initialisation or operations
/// under way (their asynchronous error becomes `ncclSystemError`), tells the peers (whose
/// waits on this rank end with `ncclRemoteError`), and frees it.
#[no_mangle]
pub unsafe extern "C" fn ncclCommAbort(comm: NcclComm) -> NcclResult {
    let c = match lookup(comm) {
        Ok(c) => c,
        Err(e) => return e,
    };
    match c.state.load(Ordering::SeqCst) {
        INITIALIZING | READY => {
            c.abort();
            ncclSuccess
        }
        _ => fail(
            ncclInvalidUsage,
            "ncclCommAbort: the communicator was already aborted, destroyed or failed",
        ),
    }
}

/// `ncclCommGetAsyncError`: `ncclInProgress` while initialising, then the error that stopped
/// an operation (`ncclSuccess` while operations merely wait for peers).
#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(
    comm: NcclComm,
    asyncError: *mut NcclResult,
) -> NcclResult {
    let c = match lookup(comm) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if asyncError.is_null() {
        return fail(
            ncclInvalidArgument,
            "ncclCommGetAsyncError: asyncError is NULL",
        );
    }
    let v = match c.state.load(Ordering::SeqCst) {
        INITIALIZING if !c.aborted.load(Ordering::SeqCst) => ncclInProgress,
        _ => c.async_err.load(Ordering::SeqCst),
    };
    // SAFETY: a non-null out-pointer from the caller.
    unsafe { asyncError.write(v) };
    ncclSuccess
}

unsafe fn query(comm: NcclComm, out: *mut c_int, f: impl Fn(&Comm) -> c_int) -> NcclResult {
    let c = match lookup(comm) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if out.is_null() {
        return fail(ncclInvalidArgument, "output pointer is NULL");
    }
    // SAFETY: a non-null out-pointer from the caller.
    unsafe { out.write(f(&c)) };
    ncclSuccess
}

/// `ncclCommCount`: the number of ranks.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCount(comm: NcclComm, count: *mut c_int) -> NcclResult {
    // SAFETY: forwarded.
    unsafe { query(comm, count, |c| c.nranks as c_int) }
}

/// `ncclCommUserRank`: this rank.
#[no_mangle]
pub unsafe extern "C" fn ncclCommUserRank(comm: NcclComm, rank: *mut c_int) -> NcclResult {
    // SAFETY: forwarded.
    unsafe { query(comm, rank, |c| c.rank as c_int) }
}

/// `ncclCommCuDevice`: the rank's device.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCuDevice(comm: NcclComm, device: *mut c_int) -> NcclResult {
    // SAFETY: forwarded.
    unsafe { query(comm, device, |c| c.device) }
}

// ---------------------------------------------------------------------------------------------
// Collectives

/// Why a collective stopped.
enum Stop {
    /// An NCCL error: the communicator's async error.
    Nccl(NcclResult, String),
    /// A device buffer was freed before the operation ran (a fault on a GPU): the context's
    /// sticky error.
    Fault(String, NcclResult),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    AllReduce = 0,
    AllGather = 1,
    Broadcast = 2,
    Reduce = 3,
    ReduceScatter = 4,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        [
            Kind::AllReduce,
            Kind::AllGather,
            Kind::Broadcast,
            Kind::Reduce,
            Kind::ReduceScatter,
        ]
        .into_iter()
        .find(|k| *k as u32 == v)
    }
    fn reduces(self) -> bool {
        matches!(self, Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter)
    }
    fn rooted(self) -> bool {
        matches!(self, Kind::Broadcast | Kind::Reduce)
    }
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "ncclAllReduce",
            Kind::AllGather => "ncclAllGather",
            Kind::Broadcast => "ncclBroadcast",
            Kind::Reduce => "ncclReduce",
            Kind::ReduceScatter => "ncclReduceScatter",
        }
    }
}

/// One collective call, checked.
struct Coll {
    comm: Arc<Comm>,
    kind: Kind,
    dtype: u32,
    op: u32,
    count: usize,
    root: usize,
    send: usize,
    recv: usize,
    stream: usize,
}

impl Coll {
    fn elem(&self) -> usize {
        reduce::elem_size(self.dtype).expect("checked")
    }
    /// The bytes this rank contributes.
    fn send_bytes(&self) -> usize {
        let b = self.count * self.elem();
        match self.kind {
            Kind::Broadcast if self.comm.rank != self.root => 0,
            Kind::ReduceScatter => b * self.comm.nranks,
            _ => b,
        }
    }
    /// The bytes this rank receives.
    fn recv_bytes(&self) -> usize {
        let b = self.count * self.elem();
        match self.kind {
            Kind::Reduce if self.comm.rank != self.root => 0,
            Kind::AllGather => b * self.comm.nranks,
            _ => b,
        }
    }
    fn describe(&self) -> String {
        describe(self.kind, self.dtype, self.op, self.count, self.root)
    }
}

fn describe(kind: Kind, dtype: u32, op: u32, count: usize, root: usize) -> String {
    let mut s = format!("{}(count {count}, datatype {dtype}", kind.name());
    if kind.reduces() {
        s += &format!(", op {op}");
    }
    if kind.rooted() {
        s += &format!(", root {root}");
    }
    s + ")"
}

const HEADER: usize = 48;
const COLL_MAGIC: u32 = 0x4e43_4f4c;

/// Checks a collective call's arguments as NCCL's `ncclEnqueueCheck` does; `None` for a
/// collective of no data, which NCCL completes at once.
#[allow(clippy::too_many_arguments)]
fn check(
    kind: Kind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: u32,
    op: u32,
    root: c_int,
    comm: NcclComm,
    stream: *mut c_void,
) -> Result<Option<Coll>, NcclResult> {
    let call = kind.name();
    let c = live(comm, call)?;
    if c.finalized.load(Ordering::SeqCst) {
        return Err(fail(
            ncclInvalidUsage,
            format!("{call}: the communicator was finalized"),
        ));
    }
    if reduce::elem_size(dtype).is_none() {
        return Err(fail(
            ncclInvalidArgument,
            format!("{call}: invalid type {dtype}"),
        ));
    }
    if kind.reduces() && !reduce::reducible(dtype, op) {
        return Err(fail(
            ncclInvalidArgument,
            format!("{call}: reduction op {op} on type {dtype} is not emulated (or invalid)"),
        ));
    }
    if kind.rooted() && (root < 0 || root as usize >= c.nranks) {
        return Err(fail(
            ncclInvalidArgument,
            format!(
                "{call}: invalid root {root} (root must be in [0, {}))",
                c.nranks
            ),
        ));
    }
    if count == 0 {
        return Ok(None);
    }
    let coll = Coll {
        comm: c,
        kind,
        dtype,
        op,
        count,
        root: root.max(0) as usize,
        send: send as usize,
        recv: recv as usize,
        stream: stream as usize,
    };
    for (p, n, what) in [
        (coll.send, coll.send_bytes(), "sendbuff"),
        (coll.recv, coll.recv_bytes(), "recvbuff"),
    ] {
        if n > 0 {
            memory::check_device(p, n, &format!("{call} {what}"))
                .map_err(|(_, m)| fail(ncclInvalidArgument, m))?;
        }
    }
    Ok(Some(coll))
}

impl Coll {
    /// Writes this rank's contribution to collective `seq`.
    fn post(&self, seq: u64) -> Result<(), Stop> {
        let c = &self.comm;
        let _live = c.live.read().unwrap_or_else(|e| e.into_inner());
        if c.aborted.load(Ordering::SeqCst) {
            return Err(Stop::Nccl(
                ncclSystemError,
                format!("{}: stopped by ncclCommAbort", self.kind.name()),
            ));
        }
        let n = self.send_bytes();
        let done = c
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .done_upto;
        let mut data = Vec::with_capacity(HEADER + n);
        for w in [COLL_MAGIC, self.kind as u32, self.dtype, self.op] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        for w in [self.count as u64, self.root as u64, done, n as u64] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        if n > 0 {
            memory::check_device(self.send, n, &format!("{} sendbuff", self.kind.name()))
                .map_err(|(_, m)| Stop::Fault(m, ncclUnhandledCudaError))?;
            // SAFETY: checked above to lie in one live device allocation (a host allocation).
            data.extend_from_slice(unsafe {
                std::slice::from_raw_parts(self.send as *const u8, n)
            });
        }
        publish(&c.dir, &format!("c{seq}.{}", c.rank), &data).map_err(|e| {
            Stop::Nccl(
                ncclSystemError,
                format!("{}: {}: {e}", self.kind.name(), c.dir.display()),
            )
        })
    }

    /// Waits for every rank's contribution to collective `seq`, computes this rank's result and
    /// writes it to the receive buffer.
    fn complete(&self, seq: u64) -> Result<(), Stop> {
        let c = &self.comm;
        let names: Vec<String> = (0..c.nranks).map(|r| format!("c{seq}.{r}")).collect();
        let mut seen = vec![false; c.nranks];
        c.wait_for(
            &format!("{} (collective #{seq})", self.kind.name()),
            || c.pids().to_vec(),
            || {
                for (s, n) in seen.iter_mut().zip(&names) {
                    *s = *s || exists(&c.dir, n);
                }
                seen.iter().all(|&s| s)
            },
        )?;
        let mut files = Vec::with_capacity(c.nranks);
        for (r, n) in names.iter().enumerate() {
            let b = std::fs::read(c.dir.join(n)).map_err(|e| {
                Stop::Nccl(
                    ncclSystemError,
                    format!("{}: reading {n}: {e}", self.kind.name()),
                )
            })?;
            self.check_header(r, seq, &b)?;
            let done = u64::from_le_bytes(b[32..40].try_into().expect("8 bytes"));
            let mut p = c.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.peer_done[r] = p.peer_done[r].max(done);
            drop(p);
            files.push(b);
        }
        let payload = |r: usize| &files[r][HEADER..];
        let out: Vec<u8> = match self.kind {
            Kind::AllReduce | Kind::Reduce => {
                if self.recv_bytes() == 0 {
                    Vec::new()
                } else {
                    let ins: Vec<&[u8]> = (0..c.nranks).map(payload).collect();
                    let mut o = vec![0u8; self.recv_bytes()];
                    reduce::reduce(self.dtype, self.op, &ins, &mut o);
                    o
                }
            }
            Kind::ReduceScatter => {
                let b = self.recv_bytes();
                let at = c.rank * b..(c.rank + 1) * b;
                let ins: Vec<&[u8]> = (0..c.nranks).map(|r| &payload(r)[at.clone()]).collect();
                let mut o = vec![0u8; b];
                reduce::reduce(self.dtype, self.op, &ins, &mut o);
                o
            }
            Kind::AllGather => (0..c.nranks)
                .flat_map(|r| payload(r).iter().copied())
                .collect(),
            Kind::Broadcast => payload(self.root).to_vec(),
        };
        if out.is_empty() {
            return Ok(());
        }
        let _live = c.live.read().unwrap_or_else(|e| e.into_inner());
        if c.aborted.load(Ordering::SeqCst) {
            return Err(Stop::Nccl(
                ncclSystemError,
                format!("{}: stopped by ncclCommAbort", self.kind.name()),
            ));
        }
        memory::check_device(
            self.recv,
            out.len(),
            &format!("{} recvbuff", self.kind.name()),
        )
        .map_err(|(_, m)| Stop::Fault(m, ncclUnhandledCudaError))?;
        // SAFETY: checked above to lie in one live device allocation; `out` is a separate
        // host buffer, so an in-place operation's overlap is harmless.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), self.recv as *mut u8, out.len()) };
        Ok(())
    }

    /// Checks that rank `r` called the same collective as number `seq` (NCCL requires it and
    /// would compute garbage or hang; the emulator says so: `ncclInvalidUsage`).
    fn check_header(&self, r: usize, seq: u64, b: &[u8]) -> Result<(), Stop> {
        let word = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4"));
        let long = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let bad = |m: String| Err(Stop::Nccl(ncclInvalidUsage, m));
        if b.len() < HEADER || word(0) != COLL_MAGIC || (b.len() - HEADER) as u64 != long(40) {
            return bad(format!(
                "collective #{seq}: rank {r}'s contribution is malformed"
            ));
        }
        let theirs = Kind::from_u32(word(1));
        let (dtype, op, count, root) = (word(2), word(3), long(16) as usize, long(24) as usize);
        let same = theirs == Some(self.kind)
            && dtype == self.dtype
            && count == self.count
            && (!self.kind.reduces() || op == self.op)
            && (!self.kind.rooted() || root == self.root);
        if !same {
            let t = theirs.map_or_else(
                || "an unknown collective".into(),
                |k| describe(k, dtype, op, count, root),
            );
            return bad(format!(
                "collective #{seq} of the communicator: rank {} called {} but rank {r} called {t} (every rank must call the same collectives in the same order)",
                self.comm.rank,
                self.describe()
            ));
        }
        let want = match self.kind {
            Kind::Broadcast if r != self.root => 0,
            Kind::ReduceScatter => self.count * self.elem() * self.comm.nranks,
            _ => self.count * self.elem(),
        };
        if (b.len() - HEADER) != want {
            return bad(format!(
                "collective #{seq}: rank {r} sent {} bytes, expected {want}",
                b.len() - HEADER
            ));
        }
        Ok(())
    }
}

/// The streams of one group wait for one another, twice: before any of its operations runs and
/// after all have.
struct Join {
    n: usize,
    arrived: Mutex<[usize; 2]>,
    cv: Condvar,
}

impl Join {
    fn arrive(&self, phase: usize) {
        let mut a = self.arrived.lock().unwrap_or_else(|e| e.into_inner());
        a[phase] += 1;
        self.cv.notify_all();
        while a[phase] < self.n {
            a = self.cv.wait(a).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A group's operations on one stream, queued as one stream operation. Dropped without having
/// run (the stream's context failed, so the stream skips its work), it completes them with
/// `ncclUnhandledCudaError` so that nothing waits for them forever.
struct Bucket {
    items: Vec<(Coll, u64)>,
    join: Option<Arc<Join>>,
    ran: bool,
}

impl Bucket {
    fn run(mut self) -> Result<(), (CuResult, String)> {
        self.ran = true;
        if let Some(j) = &self.join {
            j.arrive(0);
        }
        let posted: Vec<Result<(), Stop>> = self.items.iter().map(|(c, s)| c.post(*s)).collect();
        let mut fault = None;
        for ((c, seq), p) in self.items.iter().zip(posted) {
            match p.and_then(|_| c.complete(*seq)) {
                Ok(()) => {}
                Err(Stop::Nccl(code, msg)) => {
                    c.comm.set_async(code);
                    fail(
                        code,
                        format!("rank {} of {}: {msg}", c.comm.rank, c.comm.nranks),
                    );
                }
                Err(Stop::Fault(msg, code)) => {
                    c.comm.set_async(code);
                    fault.get_or_insert(msg);
                }
            }
            c.comm.finish(*seq);
        }
        if let Some(j) = &self.join {
            j.arrive(1);
        }
        match fault {
            Some(m) => Err((CUDA_ERROR_ILLEGAL_ADDRESS, m)),
            None => Ok(()),
        }
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        if self.ran {
            return;
        }
        for (c, seq) in &self.items {
            c.comm.set_async(ncclUnhandledCudaError);
            c.comm.finish(*seq);
        }
        if let Some(j) = &self.join {
            j.arrive(0);
            j.arrive(1);
        }
    }
}

/// Numbers and queues checked collectives (a group's, in call order) on their streams.
fn launch(colls: Vec<Coll>) -> NcclResult {
    if colls.is_empty() {
        return ncclSuccess;
    }
    // NCCL sets the communicator's device itself; a thread without a current context gets
    // the first communicator's device's primary context for the queueing.
    let pushed = context::current().is_none();
    if pushed {
        context::push_current(context::primary(colls[0].comm.device, false));
    }
    let r = launch_streams(colls);
    if pushed {
        context::pop_current();
    }
    r
}

fn launch_streams(colls: Vec<Coll>) -> NcclResult {
    let mut streams: Vec<usize> = Vec::new();
    for c in &colls {
        if !streams.contains(&c.stream) {
            streams.push(c.stream);
        }
    }
    for &s in &streams {
        if let Err(e) = api::enqueue_on(s as *mut c_void, Box::new(|| Ok(()))) {
            return fail(
                ncclUnhandledCudaError,
                format!("{}: stream {s:#x}: CUDA error {e}", colls[0].kind.name()),
            );
        }
    }
    let join = (streams.len() > 1).then(|| {
        Arc::new(Join {
            n: streams.len(),
            arrived: Mutex::new([0; 2]),
            cv: Condvar::new(),
        })
    });
    let mut buckets: Vec<Bucket> = streams
        .iter()
        .map(|_| Bucket {
            items: Vec::new(),
            join: join.clone(),
            ran: false,
        })
        .collect();
    for c in colls {
        let seq = c.comm.last_seq.fetch_add(1, Ordering::SeqCst) + 1;
        c.comm.in_flight.fetch_add(1, Ordering::SeqCst);
        let i = streams.iter().position(|&s| s == c.stream).expect("listed");
        buckets[i].items.push((c, seq));
    }
    let mut result = ncclSuccess;
    for (s, b) in streams.into_iter().zip(buckets) {
        // A failure drops the bucket, which completes its operations with an error.
        if let Err(e) = api::enqueue_on(s as *mut c_void, Box::new(move || b.run())) {
            result = fail(
                ncclUnhandledCudaError,
                format!("stream {s:#x}: CUDA error {e}"),
            );
        }
    }
    result
}

/// Launches or records a checked call.
fn submit(r: Result<Option<Coll>, NcclResult>) -> NcclResult {
    let now = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        match r {
            Err(code) => {
                if g.depth > 0 && g.err == ncclSuccess {
                    g.err = code;
                }
                Err(code)
            }
            Ok(None) => Ok(None),
            Ok(Some(c)) if g.depth > 0 => {
                g.colls.push(c);
                Ok(None)
            }
            Ok(Some(c)) => Ok(Some(c)),
        }
    });
    match now {
        Err(code) => code,
        Ok(None) => ncclSuccess,
        Ok(Some(c)) => launch(vec![c]),
    }
}

/// `ncclAllReduce`: `recvbuff[i] = op over ranks of sendbuff[i]`, `count` elements (in place
/// when the two are the same).
#[no_mangle]
pub unsafe extern "C" fn ncclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: u32,
    op: u32,
    comm: NcclComm,
    stream: *mut c_void,
) -> NcclResult {
    submit(check(
        Kind::AllReduce,
        sendbuff,
        recvbuff,
        count,
        datatype,
        op,
        0,
        comm,
        stream,
    ))
}

/// `ncclAllGather`: every rank's `sendcount` elements, in rank order, into `recvbuff`.
#[no_mangle]
pub unsafe extern "C" fn ncclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: u32,
    comm: NcclComm,
    stream: *mut c_void,
) -> NcclResult {
    submit(check(
        Kind::AllGather,
        sendbuff,
        recvbuff,
        sendcount,
        datatype,
        0,
        0,
        comm,
        stream,
    ))
}

/// `ncclBroadcast`: rank `root`'s `sendbuff` (read on the root only) into every `recvbuff`.
#[no_mangle]
pub unsafe extern "C" fn ncclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: u32,
    root: c_int,
    comm: NcclComm,
    stream: *mut c_void,
) -> NcclResult {
    submit(check(
        Kind::Broadcast,
        sendbuff,
        recvbuff,
        count,
        datatype,
        0,
        root,
        comm,
        stream,
    ))
}

/// `ncclBcast`: the in-place [`ncclBroadcast`].
#[no_mangle]
pub unsafe extern "C" fn ncclBcast(
    buff: *mut c_void,
    count: usize,
    datatype: u32,
    root: c_int,
    comm: NcclComm,
    stream: *mut c_void,
) -> NcclResult {
    submit(check(
        Kind::Broadcast,
        buff,
        buff,
        count,
        datatype,
        0,
        root,
        comm,
        stream,
    ))
}

/// `ncclReduce`: the reduction, into `recvbuff` of rank `root` only.
#[no_mangle]
pub unsafe extern "C" fn ncclReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: u32,
    op: u32,
    root: c_int,
    comm: NcclComm,
    stream: *mut c_void,
) -> NcclResult {
    submit(check(
        Kind::Reduce,
        sendbuff,
        recvbuff,
        count,
        datatype,
        op,
        root,
        comm,
        stream,
    ))
}

/// `ncclReduceScatter`: block `rank` (of `recvcount` elements) of the reduction of every
/// rank's `nranks * recvcount` elements.
#[no_mangle]
pub unsafe extern "C" fn ncclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: u32,
    op: u32,
    comm: NcclComm,
    stream: *mut c_void,
) -> NcclResult {
    submit(check(
        Kind::ReduceScatter,
        sendbuff,
        recvbuff,
        recvcount,
        datatype,
        op,
        0,
        comm,
        stream,
    ))
}

// ---------------------------------------------------------------------------------------------
// Groups

/// The calling thread's group (NCCL's group state is per thread).
struct Group {
    depth: u32,
    colls: Vec<Coll>,
    /// The first error of a call inside the group: `ncclGroupEnd` returns it, queueing nothing.
    err: NcclResult,
}

thread_local! {
    static GROUP: RefCell<Group> = const {
        RefCell::new(Group {
            depth: 0,
            colls: Vec::new(),
            err: ncclSuccess,
        })
    };
}

/// `ncclGroupStart`: later calls of this thread are recorded until the matching
/// `ncclGroupEnd` (groups nest).
#[no_mangle]
pub extern "C" fn ncclGroupStart() -> NcclResult {
    GROUP.with(|g| g.borrow_mut().depth += 1);
    ncclSuccess
}

/// `ncclGroupEnd`: the outermost one queues the group's calls, in call order.
#[no_mangle]
pub extern "C" fn ncclGroupEnd() -> NcclResult {
    let ended = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            return Err(());
        }
        g.depth -= 1;
        if g.depth > 0 {
            return Ok(None);
        }
        let err = std::mem::replace(&mut g.err, ncclSuccess);
        Ok(Some((std::mem::take(&mut g.colls), err)))
    });
    match ended {
        Err(()) => fail(
            ncclInvalidUsage,
            "ncclGroupEnd: not within ncclGroupStart/ncclGroupEnd",
        ),
        Ok(None) => ncclSuccess,
        Ok(Some((_, err))) if err != ncclSuccess => err,
        Ok(Some((colls, _))) => launch(colls),
    }
}

// ---------------------------------------------------------------------------------------------
// Not emulated

macro_rules! not_emulated {
    ($($name:ident)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not emulated (`ncclInvalidUsage`).")]
            #[no_mangle]
            pub extern "C" fn $name() -> NcclResult {
                fail(ncclInvalidUsage, concat!(stringify!($name), " is not emulated by simclr-gpu-emu"))
            }
        )*
    };
}

// Parameterless: under the x86-64 System V convention the caller owns its argument registers
// and stack, so a callee that ignores them is sound whatever they were.
not_emulated! {
    ncclSend ncclRecv ncclAlltoAll ncclGather ncclScatter ncclCommSplit ncclCommShrink
    ncclCommGrow ncclCommInitRankScalable ncclRedOpCreatePreMulSum ncclRedOpDestroy
    ncclCommRegister ncclCommDeregister ncclCommWindowRegister ncclCommWindowDeregister
    ncclMemAlloc ncclMemFree ncclCommSuspend ncclCommResume ncclCommRevoke ncclCommGetUniqueId
    ncclCommMemStats ncclGroupSimulateEnd
}

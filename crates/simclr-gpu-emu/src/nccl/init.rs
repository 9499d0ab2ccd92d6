//! The version, unique ids and communicator initialisation.
#![allow(non_snake_case, non_upper_case_globals, clippy::missing_safety_doc)]

use super::*;

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

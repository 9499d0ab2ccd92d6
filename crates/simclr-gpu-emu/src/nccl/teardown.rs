//! Finalize, destroy, abort, the asynchronous error and communicator queries.
#![allow(non_snake_case, non_upper_case_globals, clippy::missing_safety_doc)]

use super::*;

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

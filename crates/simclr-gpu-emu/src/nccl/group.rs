//! Group calls, and the calls that are not emulated.
#![allow(non_snake_case, non_upper_case_globals, clippy::missing_safety_doc)]

use super::*;

/// The calling thread's group (NCCL's group state is per thread).
pub(super) struct Group {
    pub(super) depth: u32,
    pub(super) colls: Vec<Coll>,
    /// The first error of a call inside the group: `ncclGroupEnd` returns it, queueing nothing.
    pub(super) err: NcclResult,
}

thread_local! {
    pub(super) static GROUP: RefCell<Group> = const {
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

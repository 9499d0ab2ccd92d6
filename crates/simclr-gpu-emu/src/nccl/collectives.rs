//! The collectives: argument checks, the exchange on the stream, the calls.
#![allow(non_snake_case, non_upper_case_globals, clippy::missing_safety_doc)]

use super::*;

/// Why a collective stopped.
pub(super) enum Stop {
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
pub(super) struct Coll {
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
pub(super) fn launch(colls: Vec<Coll>) -> NcclResult {
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

//! [`NcclComm`]: replicas on GPUs exchanging device buffers through NCCL, one process per GPU.
//!
//! The NCCL unique id travels over a bootstrap [`Communicator`] (the [`super::TcpComm`] of the
//! rendezvous at `MASTER_ADDR`), which also serves as the barrier proving every rank is alive
//! before NCCL's own initialisation blocks on them.
//!
//! NCCL collectives do not time out by themselves: every collective here records an event after
//! its launch and polls it, so a rank that died makes the others fail with [`CommError::Nccl`]
//! after the timeout (this communicator and its duplicates are aborted then, and unusable). `ncclCommInitRank` runs
//! on a helper thread that is left behind if it does not return within the timeout (a peer died
//! between the id exchange and its own init), so that too ends in an error, not a hang.
//!
//! Collectives run on the communicator's own stream: the compute stream for the one made by
//! [`NcclComm::new`], a new stream for each [`Communicator::duplicate`] (whose collectives then
//! overlap the compute; cudarc orders the two streams' uses of a buffer by events).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use simclr_kernels::cuda::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut,
};
use simclr_kernels::cuda::cudarc::nccl::{self, Comm, Id, ReduceOp};

use super::{CommError, Communicator};
use crate::cuda::CudaBackend;
use crate::error::{NnError, Result};
use crate::tensor::Device;

/// A communicator that can move to another thread (to be made or aborted there). Dropping it
/// aborts the communicator; cudarc's drop panics if the abort itself fails (a device already in
/// a failed state), which must not turn an error report into a crash.
struct SendComm(Option<Comm>);

// SAFETY: a NCCL communicator is not tied to a thread; it is used by one thread at a time.
unsafe impl Send for SendComm {}

impl Drop for SendComm {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(c)));
        }
    }
}

/// One communicator, `None` once aborted.
type Slot = Arc<Mutex<Option<SendComm>>>;

/// The communicators of one group on this GPU: the first and its duplicates. A timeout in one
/// aborts them all at once: an abort frees device memory, which waits for every kernel still
/// running, so a stuck kernel of another communicator would block it.
#[derive(Default)]
struct Family {
    slots: Mutex<Vec<Slot>>,
    /// Set when the family was aborted: waits that were under way report it instead of success
    /// (an abort releases the stuck kernels, so their events complete).
    aborted: AtomicBool,
}

/// How long the aborts may take before they are left behind.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// Aborts the communicators of `slots`, each on its own thread (which takes it out of its slot,
/// so a slot held by a stuck thread does not block the others), all started before any is
/// waited for; waits at most [`ABORT_WAIT`].
fn abort_slots(slots: Vec<Slot>) {
    let (tx, rx) = mpsc::channel();
    let mut started = 0;
    for slot in slots {
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("nccl-abort".into())
            .spawn(move || {
                let comm = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                drop(comm);
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

impl Family {
    /// Aborts every communicator of the family at once.
    fn abort_all(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        abort_slots(slots);
    }
}

/// A NCCL communicator for this process's GPU.
pub struct NcclComm {
    comm: Slot,
    family: Arc<Family>,
    backend: Arc<CudaBackend>,
    /// The stream the collectives run on.
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

// SAFETY: a NCCL communicator may be used from any thread, one call at a time; every use goes
// through the mutex.
unsafe impl Send for NcclComm {}
// SAFETY: as above.
unsafe impl Sync for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.family
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| !Arc::ptr_eq(s, &self.comm));
        // On a thread of its own and waited for a bounded time: a stuck kernel of another
        // communicator of the family would block this abort.
        abort_slots(vec![self.comm.clone()]);
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

/// What one NCCL call returns.
type NcclResult = Result<nccl::result::NcclStatus, nccl::result::NcclError>;

fn nccl_err(op: &str) -> impl Fn(nccl::result::NcclError) -> CommError + '_ {
    move |e| CommError::Mismatch {
        op: op.to_string(),
        msg: format!("NCCL: {e:?}"),
    }
}

fn cuda_err(op: &str) -> impl Fn(simclr_kernels::cuda::GpuError) -> CommError + '_ {
    move |e| CommError::Mismatch {
        op: op.to_string(),
        msg: format!("CUDA: {e}"),
    }
}

impl NcclComm {
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
        let mine: Vec<u8> = if rank == 0 {
            let id = Id::new().map_err(|e| NnError::Cuda(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let parts = bootstrap.all_gather_bytes(&mine, "NCCL unique id")?;
        let id_bytes = &parts[0];
        if id_bytes.len() != 128 {
            return Err(CommError::Mismatch {
                op: "NCCL unique id".into(),
                msg: format!("rank 0 sent {} bytes, expected 128", id_bytes.len()),
            }
            .into());
        }
        let stream = backend.gpu().stream().clone();
        let family = Arc::new(Family::default());
        Self::init(backend, stream, family, rank, world, id_bytes, timeout)
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
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, &s) in internal.iter_mut().zip(id_bytes) {
            *d = s as std::ffi::c_char;
        }
        let (tx, rx) = mpsc::channel();
        let ctx = backend.gpu().context().clone();
        let init_stream = stream.clone();
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let made = ctx
                    .bind_to_thread()
                    .map_err(|e| format!("{e:?}"))
                    .and_then(|_| {
                        Comm::from_rank(init_stream, rank, world, Id::uninit(internal))
                            .map(|c| SendComm(Some(c)))
                            .map_err(|e| format!("{e:?}"))
                    });
                // If the caller gave up waiting, the communicator is aborted here (dropped).
                let _ = tx.send(made);
            })
            .map_err(|e| NnError::Cuda(format!("cannot start the NCCL init thread: {e}")))?;
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(NnError::Cuda(format!(
                    "ncclCommInitRank (rank {rank} of {world}): {e}"
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(NnError::Cuda(format!(
                    "ncclCommInitRank (rank {rank} of {world}): the init thread panicked"
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(CommError::Nccl {
                    rank,
                    world,
                    op: "ncclCommInitRank".into(),
                    why: format!(
                        "not complete after {timeout:?}: a peer died or never reached its own \
                         init (the init thread is left behind)"
                    ),
                }
                .into())
            }
        };
        let slot: Slot = Arc::new(Mutex::new(Some(comm)));
        family
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot.clone());
        let nccl = NcclComm {
            comm: slot,
            family,
            backend,
            stream,
            rank,
            world,
            timeout,
        };
        // NCCL connects its peers lazily, inside the first collectives, and allocates its
        // buffers then: do it now, under the timeout, before the first step.
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

    /// Runs `f` with the communicator and records an event after what it queued.
    fn launch<T>(
        &self,
        op: &str,
        f: impl FnOnce(&Comm) -> Result<T, CommError>,
    ) -> Result<(T, CudaEvent), CommError> {
        let out = self.enqueue(op, f)?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| cuda_err(op)(e.into()))?;
        Ok((out, event))
    }

    /// Runs `f` with the communicator (which queues its collectives on the stream).
    fn enqueue<T>(
        &self,
        op: &str,
        f: impl FnOnce(&Comm) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        let guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = guard.as_ref().and_then(|c| c.0.as_ref());
        let Some(comm) = comm.filter(|_| !self.family.aborted.load(Ordering::SeqCst)) else {
            return Err(CommError::Nccl {
                rank: self.rank,
                world: self.world,
                op: op.into(),
                why: "an earlier collective timed out and the communicator was aborted".into(),
            });
        };
        self.backend
            .gpu()
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err(op)(e.into()))?;
        f(comm)
    }

    /// Runs `f` with the communicator, then waits for what it queued.
    fn run<T>(
        &self,
        op: &str,
        f: impl FnOnce(&Comm) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        let (out, event) = self.launch(op, f)?;
        self.wait_event(op, &event)?;
        Ok(out)
    }

    /// Polls `event` up to the timeout; on timeout this communicator and its duplicates are
    /// aborted and every later call fails.
    fn wait_event(&self, op: &str, event: &CudaEvent) -> Result<(), CommError> {
        let start = Instant::now();
        let aborted = || CommError::Nccl {
            rank: self.rank,
            world: self.world,
            op: op.into(),
            why: "the communicators were aborted after a collective timed out".into(),
        };
        loop {
            if self.family.aborted.load(Ordering::SeqCst) {
                return Err(aborted());
            }
            match event.try_is_complete() {
                // An abort releases stuck kernels too: only a completion before it counts.
                Ok(true) if self.family.aborted.load(Ordering::SeqCst) => return Err(aborted()),
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(cuda_err(op)(e.into())),
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                // Aborting the communicators also releases the stuck kernels.
                self.family.abort_all();
                return Err(CommError::Nccl {
                    rank: self.rank,
                    world: self.world,
                    op: op.into(),
                    why: format!(
                        "not complete after {:?}: a peer is gone or stuck (the communicators \
                         of this group are aborted)",
                        self.timeout
                    ),
                });
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
        let op = "all_reduce (device)";
        self.run(op, |c| {
            c.all_reduce_in_place(buf, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(nccl_err(op))
        })
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
        let event = self.launch_group(op, bufs, |c, b| c.broadcast_in_place(b, root))?;
        self.wait_event(op, &event)
    }

    /// Sums `buf` over the ranks in place on the device, queued on this communicator's stream
    /// without waiting for it (global batch norm's sums, which the next kernels on that stream
    /// read: no round trip through the host). A peer that never comes is caught by the next
    /// collective that is waited for, which queues behind this one.
    pub fn queue_all_reduce_device_f64(&self, buf: &mut CudaSlice<f64>) -> Result<(), CommError> {
        let op = "all_reduce (device, queued)";
        self.enqueue(op, |c| {
            c.all_reduce_in_place(buf, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(nccl_err(op))
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
            .map_err(|e| cuda_err(op)(e.into()))?;
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
        self.run(op, |c| {
            c.all_gather(src, dst).map(|_| ()).map_err(nccl_err(op))
        })
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
        let event = self.launch_group(op, bufs, |c, b| c.all_reduce_in_place(b, &ReduceOp::Sum))?;
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
        each: impl Fn(&Comm, &mut CudaSlice<f32>) -> NcclResult,
    ) -> Result<CudaEvent, CommError> {
        let ((), event) = self.launch(op, |c| {
            nccl::group_start().map_err(nccl_err(op))?;
            let mut first_err = None;
            for b in bufs.iter_mut() {
                if let Err(e) = each(c, b) {
                    first_err.get_or_insert(e);
                }
            }
            let end = nccl::group_end();
            // The grouped collectives are queued at group_end, after the write events that
            // cudarc recorded for each buffer: record them again, after the kernels, so that
            // any later use of a buffer on another stream waits for them.
            for b in bufs.iter_mut() {
                let (_, _written) = b.device_ptr_mut(&self.stream);
            }
            if let Some(e) = first_err {
                return Err(nccl_err(op)(e));
            }
            end.map(|_| ()).map_err(nccl_err(op))
        })?;
        Ok(event)
    }

    fn upload<T: simclr_kernels::cuda::cudarc::driver::DeviceRepr>(
        &self,
        v: &[T],
        op: &str,
    ) -> Result<CudaSlice<T>, CommError> {
        self.backend.gpu().upload(v).map_err(cuda_err(op))
    }

    fn download<T: simclr_kernels::cuda::cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        v: &CudaSlice<T>,
        op: &str,
    ) -> Result<Vec<T>, CommError> {
        self.backend.gpu().download(v).map_err(cuda_err(op))
    }

    fn all_reduce_host<T>(&self, buf: &mut [T], op: &str) -> Result<(), CommError>
    where
        T: simclr_kernels::cuda::cudarc::driver::DeviceRepr
            + simclr_kernels::cuda::cudarc::driver::ValidAsZeroBits
            + nccl::NcclType
            + Default
            + Clone
            + Copy,
    {
        if buf.is_empty() {
            return self.barrier();
        }
        let mut d = self.upload(buf, op)?;
        self.run(op, |c| {
            c.all_reduce_in_place(&mut d, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(nccl_err(op))
        })?;
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
            .backend
            .gpu()
            .zeros::<u64>(self.world)
            .map_err(cuda_err(op))?;
        self.run(op, |c| {
            c.all_gather(&len, &mut lens)
                .map(|_| ())
                .map_err(nccl_err(op))
        })?;
        let lens = self.download(&lens, op)?;
        let max = lens.iter().copied().max().unwrap_or(0) as usize;
        if max == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let mut padded = blob.to_vec();
        padded.resize(max, 0);
        let mine = self.upload(&padded, op)?;
        let mut all = self
            .backend
            .gpu()
            .zeros::<u8>(max * self.world)
            .map_err(cuda_err(op))?;
        self.run(op, |c| {
            c.all_gather(&mine, &mut all)
                .map(|_| ())
                .map_err(nccl_err(op))
        })?;
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
        let mine: Vec<u8> = if self.rank == 0 {
            let id = Id::new().map_err(|e| CommError::Nccl {
                rank: self.rank,
                world: self.world,
                op: op.into(),
                why: format!("ncclGetUniqueId: {e:?}"),
            })?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let parts = self.all_gather_bytes(&mine, op)?;
        if parts[0].len() != 128 {
            return Err(CommError::Mismatch {
                op: op.into(),
                msg: format!("rank 0 sent {} bytes, expected 128", parts[0].len()),
            });
        }
        let as_comm = |e: NnError| match e {
            NnError::Comm(c) => c,
            other => CommError::Nccl {
                rank: self.rank,
                world: self.world,
                op: op.into(),
                why: other.to_string(),
            },
        };
        let stream = self
            .backend
            .gpu()
            .context()
            .new_stream()
            .map_err(|e| cuda_err(op)(e.into()))?;
        let dup = Self::init(
            self.backend.clone(),
            stream,
            self.family.clone(),
            self.rank,
            self.world,
            &parts[0],
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

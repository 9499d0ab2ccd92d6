//! The gradient all-reduce overlapped with the backward pass, in buckets.
//!
//! As the backward pass finishes each part of the model ([`SimClr::backward_with`]: the head,
//! then the blocks from the last to the first, then the stem), the gradients of its parameters
//! join the open bucket; a full bucket is all-reduced at once while the backward pass goes on
//! with the parts before it. The buckets go over a [`Communicator::duplicate`] of the group, so
//! they never mix with the collectives of global batch norm that the backward pass makes on the
//! original at the same time:
//!
//! - with NCCL, on the duplicate's own CUDA stream (after an event of the compute stream, so the
//!   bucket's gradients are complete), waited for at the end of the backward pass;
//! - with the CPU communicators, on a worker thread that owns the duplicate.
//!
//! Every rank has the same model and finishes its parts in the same order, so the buckets match
//! across ranks. With the CPU communicators the sums are those of one all-reduce after the
//! backward pass, bit for bit: each value is summed over the ranks in rank order whichever
//! bucket it is in. So with NCCL on two ranks (a + b); on more, NCCL's summation order depends on
//! the size reduced, so a bucket may round differently from the whole.
//!
//! [`SimClr::backward_with`]: crate::SimClr::backward_with

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{Communicator, NcclComm, NcclPending};
use crate::error::{NnError, Result};
use crate::param::{Module, Param};
use crate::tensor::{Device, Tensor};

/// PyTorch DDP's bucket size: large enough for the link's bandwidth, small enough to start
/// early.
pub const DEFAULT_BUCKET_MIB: f64 = 25.0;

/// The first bucket is at most this many MiB, so that the first all-reduce starts as soon as
/// the head's gradients are done.
const FIRST_BUCKET_MIB: f64 = 1.0;

/// Gradients taken out of their parameters, each keyed by its parameter's address (stable for
/// the length of a step: the model is borrowed throughout).
type Bucket = Vec<(usize, Tensor)>;

/// A bucket reduced by the worker thread, with the outcome.
type Reduced = (Bucket, std::result::Result<(), NnError>);

/// The worker thread of the CPU communicators: reduces the buckets it is sent, in order.
struct Worker {
    jobs: Option<Sender<Bucket>>,
    done: Receiver<Reduced>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(comm: Arc<dyn Communicator>) -> Result<Worker> {
        let (jobs, inbox) = mpsc::channel::<Bucket>();
        let (outbox, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("grad-all-reduce-{}", comm.rank()))
            .spawn(move || {
                for mut bucket in inbox {
                    let r = reduce_on_host(comm.as_ref(), &mut bucket);
                    if outbox.send((bucket, r)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| NnError::Invalid {
                op: "overlapped all-reduce",
                msg: format!("cannot start its worker thread: {e}"),
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its current bucket is done (a bucket whose
        // peers never come ends within the communicator's timeout).
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sums the bucket's gradients over the ranks through the host, in one all-reduce.
fn reduce_on_host(comm: &dyn Communicator, bucket: &mut Bucket) -> Result<()> {
    let mut flat = Vec::with_capacity(bucket.iter().map(|(_, t)| t.numel()).sum());
    for (_, t) in bucket.iter() {
        match t.device() {
            Device::Cpu => flat.extend_from_slice(t.as_slice()?),
            _ => flat.extend_from_slice(&t.try_to_vec()?),
        }
    }
    comm.all_reduce_f32(&mut flat)?;
    let mut at = 0;
    for (_, t) in bucket.iter_mut() {
        let n = t.numel();
        super::step::set_values(t, &flat[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// The gradient all-reduce of a data-parallel group, overlapped with the backward pass (see the
/// module's documentation). Made once per run by [`GradBuckets::new`]; each step's reduction is
/// a [`Round`].
pub struct GradBuckets {
    comm: Arc<dyn Communicator>,
    bucket_values: usize,
    worker: Mutex<Option<Worker>>,
}

impl std::fmt::Debug for GradBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GradBuckets({:?}, {} MiB buckets)",
            self.comm,
            self.bucket_values * 4 / (1 << 20)
        )
    }
}

impl GradBuckets {
    /// Duplicates `comm` (a collective: every rank calls it at the same point) for buckets of
    /// `bucket_mib` MiB of gradients.
    pub fn new(comm: &dyn Communicator, bucket_mib: f64) -> Result<GradBuckets> {
        if !(bucket_mib.is_finite() && bucket_mib > 0.0) {
            return Err(NnError::Invalid {
                op: "overlapped all-reduce",
                msg: format!("the bucket size must be a positive number of MiB, got {bucket_mib}"),
            });
        }
        let comm = comm.duplicate()?;
        let bucket_values = ((bucket_mib * (1 << 20) as f64 / 4.0) as usize).max(1);
        if let Some(nccl) = comm.nccl() {
            // NCCL connects per algorithm and protocol at first use (unless
            // NCCL_RUNTIME_CONNECT=0, which `simclr launch` sets): make the connections of both
            // bucket sizes now, under the timeout, not in the first step beside the other
            // communicator's kernels.
            let first = bucket_values.min((FIRST_BUCKET_MIB * (1 << 20) as f64 / 4.0) as usize);
            for n in [first, bucket_values] {
                let mut warm = nccl.backend().scratch_zeroed::<f32>(n)?;
                nccl.all_reduce_device_f32(&mut warm)?;
            }
        }
        Ok(GradBuckets {
            comm,
            bucket_values,
            worker: Mutex::new(None),
        })
    }

    /// The communicator the buckets are reduced over (the duplicate).
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// A new step's reduction. Hand it every part of the model as its gradients become final
    /// ([`Round::ready`]), then [`Round::finish`].
    pub fn round(&self) -> Round<'_> {
        Round {
            owner: self,
            open: Vec::new(),
            open_values: 0,
            sent: 0,
            host_pending: 0,
            device_pending: Vec::new(),
            kept: Vec::new(),
            handed: HashSet::new(),
        }
    }

    /// Sends a bucket to the worker thread, starting it if needed; the bucket comes back with
    /// the error if it cannot be sent.
    fn send_to_worker(&self, bucket: Bucket) -> std::result::Result<(), (Bucket, NnError)> {
        let mut w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            match Worker::start(self.comm.clone()) {
                Ok(started) => *w = Some(started),
                Err(e) => return Err((bucket, e)),
            }
        }
        let stopped = || NnError::Invalid {
            op: "overlapped all-reduce",
            msg: "its worker thread has stopped".into(),
        };
        match w.as_ref().and_then(|w| w.jobs.as_ref()) {
            Some(jobs) => jobs.send(bucket).map_err(|e| (e.0, stopped())),
            None => Err((bucket, stopped())),
        }
    }

    /// The next bucket back from the worker thread.
    fn receive_from_worker(&self) -> Result<Reduced> {
        let w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        w.as_ref()
            .and_then(|w| w.done.recv().ok())
            .ok_or_else(|| NnError::Invalid {
                op: "overlapped all-reduce",
                msg: "its worker thread has stopped".into(),
            })
    }
}

/// One step's bucketed all-reduce. Dropping it unfinished (the backward pass failed) waits for
/// the buckets already sent, so that the next step starts clean.
pub struct Round<'a> {
    owner: &'a GradBuckets,
    open: Bucket,
    open_values: usize,
    sent: usize,
    host_pending: usize,
    device_pending: Vec<(Bucket, NcclPending)>,
    /// Gradients of buckets that could not be started, to be put back.
    kept: Bucket,
    /// The parameters handed over so far (by address).
    handed: HashSet<usize>,
}

impl Round<'_> {
    /// Takes the gradients of `part` (whose backward pass is done) into the open bucket, and
    /// starts its all-reduce once the bucket is full.
    pub fn ready(&mut self, part: &mut dyn Module) -> Result<()> {
        part.for_each_param(&mut |_, p| {
            let key = p as *const Param as usize;
            if self.handed.insert(key) {
                let g = std::mem::replace(&mut p.grad, Tensor::empty());
                self.open_values += g.numel();
                self.open.push((key, g));
            }
        });
        let mib = if self.sent == 0 {
            FIRST_BUCKET_MIB
        } else {
            f64::INFINITY
        };
        let cap = self
            .owner
            .bucket_values
            .min((mib * (1 << 20) as f64 / 4.0) as usize);
        if self.open_values >= cap {
            self.flush()?;
        }
        Ok(())
    }

    /// Starts the all-reduce of the open bucket.
    fn flush(&mut self) -> Result<()> {
        if self.open.is_empty() {
            return Ok(());
        }
        let bucket = std::mem::take(&mut self.open);
        self.open_values = 0;
        self.sent += 1;
        let on_device = bucket.iter().all(|(_, t)| t.device() != Device::Cpu);
        match (self.owner.comm.nccl(), on_device) {
            (Some(nccl), true) => {
                let mut bucket = bucket;
                match start_on_device(nccl, &mut bucket) {
                    Ok(p) => {
                        self.device_pending.push((bucket, p));
                        Ok(())
                    }
                    Err(e) => {
                        // Some of the group may be queued: let it finish (or time out, which
                        // aborts it) before the gradients can be freed or reused.
                        let _ = nccl.fence();
                        self.kept.extend(bucket);
                        Err(e)
                    }
                }
            }
            _ => match self.owner.send_to_worker(bucket) {
                Ok(()) => {
                    self.host_pending += 1;
                    Ok(())
                }
                Err((bucket, e)) => {
                    self.kept.extend(bucket);
                    Err(e)
                }
            },
        }
    }

    /// Waits for every bucket and puts the summed gradients back into `model`; the gradients of
    /// parameters never handed to [`Round::ready`] are reduced last, in one more bucket.
    pub fn finish(mut self, model: &mut dyn Module) -> Result<()> {
        let mut first_err = self.flush().err();
        let mut back: HashMap<usize, Tensor> = HashMap::new();
        first_err = first_err.or(self.collect(&mut back).err());
        // Parameters the backward pass did not hand over (a model whose hooks miss some), unless
        // a bucket failed: this rank alone would then make one more collective than the others.
        let mut rest: Bucket = Vec::new();
        if first_err.is_none() {
            model.for_each_param(&mut |_, p| {
                let key = p as *const Param as usize;
                if !self.handed.contains(&key) {
                    let g = std::mem::replace(&mut p.grad, Tensor::empty());
                    rest.push((key, g));
                }
            });
        }
        if !rest.is_empty() {
            let r = reduce_on_host(self.owner.comm.as_ref(), &mut rest);
            first_err = first_err.or(r.err());
            back.extend(rest);
        }
        model.for_each_param(&mut |_, p| {
            if let Some(g) = back.remove(&(p as *const Param as usize)) {
                p.grad = g;
            }
        });
        // A gradient lost with a failed bucket is left empty; `zero_grad` makes it anew.
        first_err.map_or(Ok(()), Err)
    }

    /// Waits for the buckets sent so far and moves their gradients into `back`.
    fn collect(&mut self, back: &mut HashMap<usize, Tensor>) -> Result<()> {
        let mut first_err = None;
        back.extend(self.kept.drain(..));
        for (bucket, pending) in self.device_pending.drain(..) {
            let nccl = self.owner.comm.nccl();
            if let Some(Err(e)) = nccl.map(|n| n.wait(pending)) {
                first_err.get_or_insert(NnError::from(e));
            }
            back.extend(bucket);
        }
        while self.host_pending > 0 {
            self.host_pending -= 1;
            match self.owner.receive_from_worker() {
                Ok((bucket, r)) => {
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                    back.extend(bucket);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                    self.host_pending = 0;
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        let mut lost = HashMap::new();
        let _ = self.collect(&mut lost);
    }
}

/// Queues the bucket's all-reduce on the NCCL communicator's stream, after the compute stream's
/// work so far (which wrote the gradients).
fn start_on_device(nccl: &NcclComm, bucket: &mut Bucket) -> Result<NcclPending> {
    let compute = nccl.backend().gpu().stream();
    nccl.stream()
        .join(compute)
        .map_err(|e| NnError::Cuda(format!("the all-reduce stream waiting for compute: {e:?}")))?;
    let mut bufs = Vec::with_capacity(bucket.len());
    for (_, g) in bucket.iter_mut() {
        bufs.push(g.cuda_mut()?);
    }
    Ok(nccl.start_all_reduce_many_f32(&mut bufs)?)
}

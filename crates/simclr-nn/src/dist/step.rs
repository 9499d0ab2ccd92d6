//! The data-parallel SimCLR step: each replica holds `b` images (its `2b` views), and the result
//! is the single-replica step on all `B = K b` images.
//!
//! - **Global batch norm**: every batch-norm layer all-reduces its statistics in the forward pass
//!   and their gradient sums in the backward pass (as one batch of `2B` views).
//! - **Gathered negatives**: the projections z of every replica are all-gathered into the order
//!   of one batch (first views of all `B` images, then their second views); each replica's
//!   anchors are its own rows and their negatives are all `2B` rows, with gradient flowing to
//!   every row (an all-reduce of the gradient of z), so the loss and its gradient are the full
//!   batch's.
//! - The parameter gradients are all-reduced (summed) before the update, which then runs
//!   identically on every replica.
//!
//! Switching either of the first two off gives what many PyTorch implementations do (batch norm
//! per replica; negatives from the replica's own batch only): the tests show the difference.

use std::ops::Range;
use std::sync::Arc;

use simclr_kernels::cpu::{nt_xent_forward_backward_anchors, NtXentConfig};

use super::{CommError, Communicator, GradBuckets};
use crate::error::{NnError, Result};
use crate::layers::BatchNorm;
use crate::loss::ContrastiveLoss;
use crate::model::SimClr;
use crate::optim::Optimizer;
use crate::param::{Module, Param, StateVisitor};
use crate::tensor::{Device, Tensor};
use crate::train::{check_finite_grads, StepStats};

/// How the replicas of a data-parallel step cooperate.
#[derive(Clone, Debug)]
pub struct DataParallel {
    /// The group of replicas.
    pub comm: Arc<dyn Communicator>,
    /// Negatives from every replica (SimCLR's choice); `false`: each replica's own batch only.
    pub gather_negatives: bool,
    /// Batch-norm statistics over all replicas' batches (SimCLR's choice); `false`: per replica.
    pub global_batch_norm: bool,
    /// The gradient all-reduce in buckets overlapped with the backward pass (over a duplicate
    /// of `comm`); `None`: one all-reduce after the backward pass. The sums are the same bits
    /// with the CPU communicators and with NCCL on two ranks; NCCL on more may sum a bucket in
    /// another order than the whole (its algorithm depends on the size), a rounding difference.
    pub overlap: Option<Arc<GradBuckets>>,
}

impl DataParallel {
    /// SimCLR's data parallelism over `comm`: gathered negatives and global batch norm.
    pub fn new(comm: Arc<dyn Communicator>) -> DataParallel {
        DataParallel {
            comm,
            gather_negatives: true,
            global_batch_norm: true,
            overlap: None,
        }
    }

    /// The gradient all-reduce overlapped with the backward pass in buckets of `bucket_mib`
    /// MiB ([`super::DEFAULT_BUCKET_MIB`] is PyTorch DDP's). Duplicates the communicator: every
    /// rank calls it at the same point.
    pub fn with_overlap(mut self, bucket_mib: f64) -> Result<DataParallel> {
        self.overlap = Some(Arc::new(GradBuckets::new(self.comm.as_ref(), bucket_mib)?));
        Ok(self)
    }
}

/// Sets (or clears) the communicator of every batch-norm layer of `model`. Only called once
/// every replica's views are known to have one shape, so every layer's input has one shape too.
fn set_batch_norm_sync(model: &mut dyn Module, sync: Option<Arc<dyn Communicator>>) {
    struct V(Option<Arc<dyn Communicator>>);
    impl StateVisitor for V {
        fn param(&mut self, _: &str, _: &mut Param) {}
        fn buffer(&mut self, _: &str, _: &mut Tensor) {}
        fn counter(&mut self, _: &str, _: &mut i64) {}
        fn batch_norm(&mut self, _: &str, bn: &mut BatchNorm) {
            bn.same_shape_everywhere = self.0.is_some();
            bn.sync = self.0.clone();
        }
    }
    model.visit("", &mut V(sync));
}

/// Every replica's views have this replica's shape, or every replica gets the same error (NCCL
/// does not check counts, so replicas with different batches would write past each other's
/// buffers; and global batch norm then knows every layer's row count without asking).
fn check_same_shape(comm: &dyn Communicator, views: &Tensor) -> Result<()> {
    const DIMS: usize = 8;
    let shape = views.shape();
    // Sums of each extent and of its square are equal to world·d and world·d² for every rank
    // exactly when all ranks agree. The same length on every rank, whatever its views (NCCL
    // does not check lengths either): the first DIMS extents, zero-padded, and the rank.
    let mut v = vec![0.0f64; 2 * DIMS + 2];
    for (i, &d) in shape.iter().take(DIMS).enumerate() {
        v[2 * i] = d as f64;
        v[2 * i + 1] = (d as f64) * (d as f64);
    }
    v[2 * DIMS] = shape.len() as f64;
    v[2 * DIMS + 1] = (shape.len() * shape.len()) as f64;
    comm.all_reduce_f64(&mut v)?;
    let world = comm.world_size() as f64;
    let same = v.chunks_exact(2).all(|p| p[1] * world == p[0] * p[0]);
    if !same {
        return Err(CommError::Mismatch {
            op: "data-parallel step".into(),
            msg: format!(
                "the replicas' batches differ in shape (this one's views are {shape:?}; every \
                 replica needs the same number of images of the same size)"
            ),
        }
        .into());
    }
    Ok(())
}

/// How [`broadcast_state`] moved the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BroadcastPath {
    /// In place on the GPUs, over NCCL.
    Device,
    /// Through the hosts, in one broadcast of every value.
    Host,
}

/// Copies rank `root`'s parameters and batch-norm statistics to every replica (the start of a
/// data-parallel run, so replicas begin from the same weights whatever their seeds).
///
/// The ranks first compare their models' tensor sizes, so that replicas built differently stop
/// with an error naming both (NCCL would not notice: it would hang or write past a buffer). Over
/// NCCL, when every rank's tensors are all on its communicator's GPU, each tensor is then
/// broadcast in place on the devices, in one NCCL group; otherwise all values go through the
/// hosts in one broadcast.
pub fn broadcast_state(
    model: &mut dyn Module,
    comm: &dyn Communicator,
    root: usize,
) -> Result<BroadcastPath> {
    let op = "broadcast of the initial weights";
    let gpu = comm.nccl().map(|n| Device::Cuda(n.backend().ordinal()));
    let (mut all_there, mut sizes) = (gpu.is_some(), Vec::new());
    visit_values(model, &mut |t| {
        all_there &= Some(t.device()) == gpu && t.dtype() == crate::tensor::DType::F32;
        sizes.extend_from_slice(&(t.numel() as u64).to_le_bytes());
        Ok(())
    })?;
    let mut blob = vec![u8::from(all_there)];
    blob.extend_from_slice(&sizes);
    let parts = comm.all_gather_bytes(&blob, op)?;
    let summary = |b: &[u8]| {
        let n: Vec<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        format!("{} tensors of {} values", n.len(), n.iter().sum::<u64>())
    };
    for (r, p) in parts.iter().enumerate() {
        if p.get(1..) != Some(&blob[1..]) {
            return Err(CommError::Mismatch {
                op: op.into(),
                msg: format!(
                    "the replicas' models differ: rank {r} has {}, rank {} has {}",
                    summary(p.get(1..).unwrap_or(&[])),
                    comm.rank(),
                    summary(&blob[1..])
                ),
            }
            .into());
        }
    }
    if let Some(nccl) = comm.nccl().filter(|_| parts.iter().all(|p| p[0] == 1)) {
        // Taken out of the model so that all can be borrowed at once, then put back.
        let mut ts = Vec::new();
        visit_values(model, &mut |t| {
            ts.push(std::mem::replace(t, Tensor::empty()));
            Ok(())
        })?;
        let sent = ts
            .iter_mut()
            .map(|t| t.cuda_mut())
            .collect::<Result<Vec<_>>>()
            .and_then(|mut bufs| Ok(nccl.broadcast_many_device_f32(&mut bufs, root)?));
        let mut back = ts.into_iter();
        visit_values(model, &mut |t| {
            *t = back.next().expect("as many tensors as were taken");
            Ok(())
        })?;
        sent?;
        return Ok(BroadcastPath::Device);
    }
    let mut flat = Vec::new();
    visit_values(model, &mut |t| {
        flat.extend_from_slice(&t.try_to_vec()?);
        Ok(())
    })?;
    comm.broadcast_f32(&mut flat, root)?;
    let mut at = 0;
    visit_values(model, &mut |t| {
        let n = t.numel();
        set_values(t, &flat[at..at + n])?;
        at += n;
        Ok(())
    })?;
    Ok(BroadcastPath::Host)
}

/// Overwrites `t`'s values with host values, on its device.
pub(super) fn set_values(t: &mut Tensor, v: &[f32]) -> Result<()> {
    if t.numel() != v.len() {
        return Err(NnError::Shape {
            op: "set_values",
            expected: t.shape().to_vec(),
            got: vec![v.len()],
        });
    }
    match t.device() {
        Device::Cpu => t.as_mut_slice()?.copy_from_slice(v),
        // In place: the buffer keeps its address (the GPU LARS tables are keyed by it).
        _ => t.copy_from_host_(v)?,
    }
    Ok(())
}

/// Every parameter value and f32 buffer of `model`, in visiting order.
fn visit_values(
    model: &mut dyn Module,
    f: &mut dyn FnMut(&mut Tensor) -> Result<()>,
) -> Result<()> {
    struct V<'a> {
        f: &'a mut dyn FnMut(&mut Tensor) -> Result<()>,
        err: Option<NnError>,
    }
    impl StateVisitor for V<'_> {
        fn param(&mut self, _: &str, p: &mut Param) {
            if self.err.is_none() {
                self.err = (self.f)(&mut p.value).err();
            }
        }
        fn buffer(&mut self, _: &str, t: &mut Tensor) {
            if self.err.is_none() {
                self.err = (self.f)(t).err();
            }
        }
        fn counter(&mut self, _: &str, _: &mut i64) {}
    }
    let mut v = V { f, err: None };
    model.visit("", &mut v);
    v.err.map_or(Ok(()), Err)
}

/// Sums every parameter gradient over the replicas, in one all-reduce of the concatenated
/// gradients.
fn all_reduce_grads(model: &mut dyn Module, comm: &dyn Communicator) -> Result<()> {
    if let Some(nccl) = comm.nccl() {
        return all_reduce_grads_nccl(model, nccl);
    }
    let mut flat = Vec::new();
    let mut err = None;
    // Without NCCL a GPU model's gradients go through the host, as the CPU communicators need.
    model.for_each_param(&mut |_, p| match p.grad.try_to_vec() {
        Ok(g) => flat.extend_from_slice(&g),
        Err(e) => err = err.take().or(Some(e)),
    });
    if let Some(e) = err {
        return Err(e);
    }
    comm.all_reduce_f32(&mut flat)?;
    let mut at = 0;
    model.for_each_param(&mut |_, p| {
        let n = p.grad.numel();
        if let Err(e) = set_values(&mut p.grad, &flat[at..at + n]) {
            err = err.take().or(Some(e));
        }
        at += n;
    });
    err.map_or(Ok(()), Err)
}

/// The gradient all-reduce on the GPUs: every gradient reduced in place by one grouped NCCL
/// call (not yet overlapped with the backward pass).
fn all_reduce_grads_nccl(model: &mut dyn Module, nccl: &super::NcclComm) -> Result<()> {
    // The gradients are taken out of the model so that all can be borrowed at once.
    let mut grads = Vec::new();
    model.for_each_param(&mut |_, p| {
        grads.push(std::mem::replace(&mut p.grad, Tensor::empty()));
    });
    let reduced = (|| -> Result<()> {
        let mut bufs = Vec::with_capacity(grads.len());
        for g in grads.iter_mut() {
            bufs.push(g.cuda_mut()?);
        }
        nccl.all_reduce_many_f32(&mut bufs)?;
        Ok(())
    })();
    let mut it = grads.into_iter();
    model.for_each_param(&mut |_, p| {
        if let Some(g) = it.next() {
            p.grad = g;
        }
    });
    reduced
}

/// Whether any replica saw a non-finite value (every replica gets the same answer, so they stop
/// together instead of waiting for each other).
fn any_rank(comm: &dyn Communicator, local: bool) -> Result<bool> {
    let mut v = [f64::from(u8::from(local))];
    comm.all_reduce_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Row of replica `rank`'s local row `i` (of `2b`) in the gathered batch of `K` replicas.
fn global_row(rank: usize, i: usize, b: usize, world: usize) -> usize {
    let (view, j) = (i / b, i % b);
    view * world * b + rank * b + j
}

/// The loss (of the whole data-parallel batch, or of this replica's batch when negatives are not
/// gathered, then averaged over replicas) and its gradient with respect to this replica's z.
fn loss_and_grad(z: &Tensor, loss: &ContrastiveLoss, dp: &DataParallel) -> Result<(f32, Tensor)> {
    if let (Some(nccl), ContrastiveLoss::NtXent { temperature }, true) =
        (dp.comm.nccl(), loss, dp.gather_negatives)
    {
        if z.device() != Device::Cpu {
            return nt_xent_nccl(z, *temperature, nccl);
        }
    }
    if z.device() != Device::Cpu {
        // The gather and the anchor-sharded loss run on the host with the CPU communicators.
        let (l, dz) = loss_and_grad(&z.to_device(Device::Cpu)?, loss, dp)?;
        return Ok((l, dz.to_device(z.device())?));
    }
    let comm = dp.comm.as_ref();
    let world = comm.world_size();
    let rank = comm.rank();
    if !dp.gather_negatives {
        let (l, mut dz) = loss.forward_backward(z)?;
        let inv = 1.0 / world as f32;
        dz.as_mut_slice()?.iter_mut().for_each(|v| *v *= inv);
        let mut lv = [l as f64];
        comm.all_reduce_f64(&mut lv)?;
        return Ok(((lv[0] / world as f64) as f32, dz));
    }
    let (rows, dim) = match z.shape() {
        [r, d] if r % 2 == 0 => (*r, *d),
        s => {
            return Err(NnError::Shape {
                op: "data-parallel loss (z: [2b, dim])",
                expected: vec![2, dim_of(s)],
                got: s.to_vec(),
            })
        }
    };
    let b = rows / 2;
    let mut gathered = vec![0.0f32; world * rows * dim];
    comm.all_gather_f32(z.as_slice()?, &mut gathered)?;
    let big_b = world * b;
    let mut all = vec![0.0f32; gathered.len()];
    for r in 0..world {
        for i in 0..rows {
            let g = global_row(r, i, b, world);
            all[g * dim..(g + 1) * dim]
                .copy_from_slice(&gathered[(r * rows + i) * dim..(r * rows + i + 1) * dim]);
        }
    }
    let m = 2 * big_b;
    let (total, grad_all) = match loss {
        ContrastiveLoss::NtXent { temperature } => {
            // This replica's anchors (its first and its second views) against every row; the
            // shares of the replicas sum to the whole batch's loss and gradient.
            let cfg = NtXentConfig::new(*temperature);
            let mine: [Range<usize>; 2] = [
                rank * b..(rank + 1) * b,
                big_b + rank * b..big_b + (rank + 1) * b,
            ];
            let mut grad = vec![0.0f32; m * dim];
            let mut part = vec![0.0f32; m * dim];
            let mut l = 0.0f64;
            for anchors in mine {
                l += nt_xent_forward_backward_anchors(&all, m, dim, anchors, &cfg, 1.0, &mut part)
                    .map_err(|e| NnError::NtXent(e.to_string()))? as f64;
                grad.iter_mut().zip(&part).for_each(|(g, p)| *g += p);
            }
            comm.all_reduce_f32(&mut grad)?;
            let mut lv = [l];
            comm.all_reduce_f64(&mut lv)?;
            (lv[0] as f32, grad)
        }
        other => {
            // The other losses have no anchor-sharded kernel: every replica computes the whole
            // batch's loss (the same bits everywhere) and keeps its rows of the gradient.
            let (l, g) = other.forward_backward(&Tensor::from_vec(&[m, dim], all)?)?;
            (l, g.as_slice()?.to_vec())
        }
    };
    let mut dz = vec![0.0f32; rows * dim];
    for i in 0..rows {
        let g = global_row(rank, i, b, world);
        dz[i * dim..(i + 1) * dim].copy_from_slice(&grad_all[g * dim..(g + 1) * dim]);
    }
    Ok((total, Tensor::from_vec(&[rows, dim], dz)?))
}

/// The data-parallel NT-Xent on the GPUs: z gathered with NCCL (first views, then second
/// views, so the rows are in the single-batch order without a permute), this replica's anchors
/// through the fused kernel, the gradient all-reduced on the devices and this replica's rows
/// kept. Only the loss (one number) goes through the host.
fn nt_xent_nccl(z: &Tensor, temperature: f32, nccl: &super::NcclComm) -> Result<(f32, Tensor)> {
    use simclr_kernels::cuda::GpuError;
    let (rows, dim) = match z.shape() {
        [r, d] if r % 2 == 0 && *r > 0 => (*r, *d),
        s => {
            return Err(NnError::Shape {
                op: "data-parallel loss (z: [2b, dim])",
                expected: vec![2, dim_of(s)],
                got: s.to_vec(),
            })
        }
    };
    // Every replica's batch has this one's size: `check_same_shape` saw to it.
    let (world, rank) = (nccl.world_size(), nccl.rank());
    let (b, big_b) = (rows / 2, world * rows / 2);
    let m = 2 * big_b;
    let buf = z.cuda()?;
    let backend = buf.backend().clone();
    let gpu = backend.gpu();
    let mut all = backend.scratch_zeroed::<f32>(m * dim)?;
    for half in 0..2 {
        let src = buf.slice().slice(half * b * dim..(half + 1) * b * dim);
        let mut dst = all.slice_mut(half * big_b * dim..(half + 1) * big_b * dim);
        nccl.all_gather_view(&src, &mut dst)?;
    }
    let (mut grad, mut part) = (
        backend.scratch_zeroed::<f32>(m * dim)?,
        backend.scratch_zeroed::<f32>(m * dim)?,
    );
    let mine = [
        rank * b..(rank + 1) * b,
        big_b + rank * b..big_b + (rank + 1) * b,
    ];
    let mut local = 0.0f64;
    backend.with_loss(m, dim, |ws| {
        for (k, anchors) in mine.iter().enumerate() {
            let out = if k == 0 { &mut grad } else { &mut part };
            local += ws
                .forward_backward_anchors(gpu, &all, anchors.clone(), temperature, out)
                .map_err(|e| NnError::NtXent(e.to_string()))? as f64;
        }
        Ok(())
    })?;
    simclr_kernels::cuda::train::add(gpu, &mut grad, &part, false)?;
    nccl.all_reduce_device_f32(&mut grad)?;
    let mut lv = [local];
    nccl.all_reduce_f64(&mut lv)?;
    let mut dz = backend.zeros(rows * dim)?;
    for (half, r) in mine.iter().enumerate() {
        let src = (*grad).slice(r.start * dim..r.end * dim);
        let mut dst = dz.slice_mut(half * b * dim..(half + 1) * b * dim);
        gpu.stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(GpuError::from)?;
    }
    Ok((
        lv[0] as f32,
        Tensor::from_cuda_slice(&[rows, dim], backend.clone(), dz)?,
    ))
}

fn dim_of(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(0)
}

/// Forward and backward of one data-parallel step without the update: returns the loss (of the
/// whole batch) and this replica's representations h, and leaves the all-reduced gradients in
/// the model. `views` is this replica's `[2b, c, h, w]` (first views, then second views of its
/// `b` images). Every replica must call it with the same `b`.
pub fn forward_backward_dp(
    model: &mut SimClr,
    views: &Tensor,
    loss: &ContrastiveLoss,
    dp: &DataParallel,
) -> Result<(f32, Tensor)> {
    let comm = dp.comm.as_ref();
    check_same_shape(comm, views)?;
    set_batch_norm_sync(model, dp.global_batch_norm.then(|| dp.comm.clone()));
    model.zero_grad();
    let out = model.forward(views, true);
    let (h, z) = match out {
        Ok(v) => v,
        Err(e) => {
            if let Some(nccl) = comm.nccl() {
                // Reductions batch norm queued may still run: let them finish or time out.
                let _ = nccl.fence();
            }
            set_batch_norm_sync(model, None);
            return Err(e);
        }
    };
    if let (Some(nccl), true) = (comm.nccl(), dp.global_batch_norm) {
        // Batch norm queued its reductions without waiting: wait for them under the timeout
        // before the host reads z (a plain read would hang on a dead peer).
        if let Err(e) = nccl.fence() {
            set_batch_norm_sync(model, None);
            return Err(e.into());
        }
    }
    let finite = match z.try_all_finite() {
        Ok(f) => f,
        Err(e) => {
            set_batch_norm_sync(model, None);
            return Err(e);
        }
    };
    if any_rank(comm, !finite)? {
        set_batch_norm_sync(model, None);
        return Err(NnError::NonFinite {
            what: "the projections z of some replica (the weights or the input overflow)".into(),
        });
    }
    let (l, dz) = loss_and_grad(&z, loss, dp)?;
    let back = match &dp.overlap {
        Some(buckets) => {
            let mut round = buckets.round();
            let back = model.backward_with(&dz, &mut |part| round.ready(part));
            set_batch_norm_sync(model, None);
            // A failed backward pass drops the round, which waits for the buckets it sent.
            back.and_then(|()| round.finish(model))
        }
        None => {
            let back = model.backward(&dz);
            set_batch_norm_sync(model, None);
            back.and_then(|()| all_reduce_grads(model, comm))
        }
    };
    back?;
    // The gradients are the same on every replica after the all-reduce, so every replica stops
    // here together.
    check_finite_grads(model)?;
    if !l.is_finite() {
        return Err(NnError::NonFinite {
            what: "the loss".into(),
        });
    }
    Ok((l, h))
}

/// [`forward_backward_dp`] and the optimiser's update: one data-parallel training step.
pub fn train_step_dp(
    model: &mut SimClr,
    views: &Tensor,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    loss: &ContrastiveLoss,
    dp: &DataParallel,
) -> Result<(StepStats, Tensor)> {
    let (l, h) = forward_backward_dp(model, views, loss, dp)?;
    optimizer.step(model, lr)?;
    // Each rank ends the step for its own GPU's buffer cache, and one rank for the host's:
    // ranks that are threads of one process share it, and a step end from each, moments apart,
    // would count nothing given back in between and free what the next step needs. The host
    // caches of other processes stay bounded by their steps' own use (see `crate::buffers`).
    if let crate::Device::Cuda(i) = views.device() {
        crate::cuda::CudaBackend::get(i)?.end_step();
    }
    if dp.comm.rank() == 0 {
        crate::buffers::end_host_step();
    }
    Ok((StepStats { loss: l, lr }, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_rows_follow_the_single_batch_order() {
        // 2 replicas of 3 images: replica 1's second view of its image 2 is the second view of
        // image 5 of 6, row 6 + 5 = 11.
        assert_eq!(global_row(1, 5, 3, 2), 11);
        assert_eq!(global_row(0, 0, 3, 2), 0);
        assert_eq!(global_row(1, 0, 3, 2), 3);
        assert_eq!(global_row(0, 3, 3, 2), 6);
        let mut seen: Vec<usize> = (0..2)
            .flat_map(|r| (0..6).map(move |i| global_row(r, i, 3, 2)))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }
}

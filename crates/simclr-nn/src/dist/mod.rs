//! Data-parallel training: the [`Communicator`] that replicas exchange tensors through, and the
//! data-parallel training step.
//!
//! Every collective is built on one primitive, [`Communicator::all_gather_bytes`] (each rank
//! contributes a blob and receives every rank's blob in rank order). The sums of
//! [`Communicator::all_reduce_f32`] and friends are then computed by every rank in rank order from
//! the same blobs, so every replica gets the same bits and the weights of the replicas never
//! drift apart.
//!
//! Three implementations: [`ThreadComm`] (replicas as threads of one process) and [`TcpComm`]
//! (one process per replica over TCP, star-shaped through rank 0) for the CPU, and
//! [`NcclComm`] (one process per GPU, NCCL, its unique id sent over a `TcpComm`). A rank
//! that dies or never arrives makes every other rank's next collective fail with a
//! [`CommError`] within the timeout instead of hanging. Which rank the error names depends on
//! what the rank sees: a [`TcpComm`] other than rank 0 talks to rank 0 alone, so it may report
//! that rank 0 left (rank 0 stops when it sees the rank that died); NCCL says that a peer is gone
//! or stuck, never which. With NCCL the timeout bounds the initialisation, every wait for a
//! collective (an error NCCL reports ends it sooner) and NCCL calls blocked on the host; the
//! communicators are aborted then, which releases their kernels, except that a call blocked on
//! the host ends the process (with [`NcclComm::BLOCKED_EXIT_CODE`]), as NCCL cannot free a
//! communicator under a call still inside it.
//!
//! - [`train_step_dp`]: the data-parallel training step (global batch norm, gathered negatives, the
//!   gradient all-reduce).
//! - [`GradBuckets`]: that all-reduce in buckets, overlapped with the backward pass.

mod nccl;
mod overlap;
mod step;
mod tcp;
mod thread;

use std::time::Duration;

pub use nccl::{NcclComm, NcclPending};
pub use overlap::{GradBuckets, Round, DEFAULT_BUCKET_MIB};
pub use step::{broadcast_state, forward_backward_dp, train_step_dp, BroadcastPath, DataParallel};
pub use tcp::{rendezvous_port, RendezvousConfig, TcpComm, RENDEZVOUS_PORT_VAR};
pub use thread::ThreadComm;

/// Why a collective failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    /// A rank did not take part within the timeout.
    #[error("rank {rank} of {world} did not take part in {op} within {timeout:?} (is it alive?)")]
    Timeout {
        /// The missing rank (the first one found).
        rank: usize,
        /// World size.
        world: usize,
        /// The collective.
        op: String,
        /// The timeout.
        timeout: Duration,
    },
    /// A rank left the group (its process died, its thread ended or its connection closed).
    #[error("rank {rank} of {world} left during {op}: {why}")]
    RankLost {
        /// The rank that left.
        rank: usize,
        /// World size.
        world: usize,
        /// The collective.
        op: String,
        /// What was seen.
        why: String,
    },
    /// The ranks disagree (different buffer lengths, different world sizes).
    #[error("ranks disagree in {op}: {msg}")]
    Mismatch {
        /// The collective.
        op: String,
        /// What differs.
        msg: String,
    },
    /// A NCCL or CUDA call of a NCCL communicator failed (NCCL's error, or one it reported
    /// asynchronously: a peer is gone or the network failed), a NCCL collective or call did not
    /// complete within the timeout (some peer is gone or stuck; NCCL cannot say which), or the
    /// communicator was aborted by an earlier such failure.
    #[error("rank {rank} of {world}: NCCL {op}: {why}")]
    Nccl {
        /// This rank.
        rank: usize,
        /// World size.
        world: usize,
        /// The collective.
        op: String,
        /// What happened.
        why: String,
    },
    /// The rendezvous could not be set up (bad address, port in use, bad environment).
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// This communicator cannot do what was asked.
    #[error("{comm} cannot {op}")]
    Unsupported {
        /// The communicator.
        comm: String,
        /// What it was asked.
        op: String,
    },
}

/// A group of `world_size` replicas. Collectives must be called by every rank in the same order.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This replica's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// The number of replicas.
    fn world_size(&self) -> usize;
    /// Every rank's `blob`, in rank order. `op` names the collective in errors.
    fn all_gather_bytes(&self, blob: &[u8], op: &str) -> Result<Vec<Vec<u8>>, CommError>;

    /// Element-wise sum over the ranks, in rank order (every rank gets the same bits).
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let parts = self.all_gather_bytes(bytemuck::cast_slice(buf), "all_reduce_f32")?;
        sum_parts(&parts, buf, "all_reduce_f32")
    }

    /// Element-wise sum over the ranks in f64, in rank order.
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        let parts = self.all_gather_bytes(bytemuck::cast_slice(buf), "all_reduce_f64")?;
        sum_parts(&parts, buf, "all_reduce_f64")
    }

    /// Every rank's `local` (all of the same length) concatenated in rank order into `out`.
    fn all_gather_f32(&self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let op = "all_gather_f32";
        let parts = self.all_gather_bytes(bytemuck::cast_slice(local), op)?;
        if out.len() != local.len() * parts.len() {
            return Err(CommError::Mismatch {
                op: op.into(),
                msg: format!(
                    "output of {} values for {} ranks of {}",
                    out.len(),
                    parts.len(),
                    local.len()
                ),
            });
        }
        for (r, (p, o)) in parts
            .iter()
            .zip(out.chunks_mut(local.len().max(1)))
            .enumerate()
        {
            if p.len() != 4 * local.len() {
                return Err(CommError::Mismatch {
                    op: op.into(),
                    msg: format!(
                        "rank {r} sent {} bytes, this rank {}",
                        p.len(),
                        4 * local.len()
                    ),
                });
            }
            copy_from_bytes(o, p);
        }
        Ok(())
    }

    /// `buf` of rank `root` copied to every rank.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let op = "broadcast_f32";
        let blob: &[u8] = if self.rank() == root {
            bytemuck::cast_slice(buf)
        } else {
            &[]
        };
        let parts = self.all_gather_bytes(blob, op)?;
        let src = parts.get(root).ok_or_else(|| CommError::Mismatch {
            op: op.into(),
            msg: format!("root {root} outside a world of {}", parts.len()),
        })?;
        if src.len() != 4 * buf.len() {
            return Err(CommError::Mismatch {
                op: op.into(),
                msg: format!(
                    "root sent {} bytes, this rank expects {}",
                    src.len(),
                    4 * buf.len()
                ),
            });
        }
        copy_from_bytes(buf, src);
        Ok(())
    }

    /// Waits until every rank gets here.
    fn barrier(&self) -> Result<(), CommError> {
        self.all_gather_bytes(&[], "barrier").map(|_| ())
    }

    /// A communicator over the same ranks whose collectives never mix with this one's, so that
    /// the two can run at once from different threads: the gradient all-reduce overlapped with
    /// the backward pass runs on a duplicate while global batch norm synchronises on the
    /// original. A collective: every rank calls it at the same point.
    fn duplicate(&self) -> Result<std::sync::Arc<dyn Communicator>, CommError> {
        Err(CommError::Unsupported {
            comm: format!("{self:?}"),
            op: "duplicate itself".into(),
        })
    }

    /// The NCCL communicator behind this one, when the replicas are GPUs joined by NCCL (device
    /// buffers are then reduced on the device, without a trip through the host).
    fn nccl(&self) -> Option<&NcclComm> {
        None
    }
}

/// `out = sum over parts` (each part the bytes of `out.len()` values), in rank order.
fn sum_parts<T>(parts: &[Vec<u8>], out: &mut [T], op: &str) -> Result<(), CommError>
where
    T: bytemuck::Pod + std::ops::AddAssign + Default,
{
    let bytes = std::mem::size_of_val(out);
    for (r, p) in parts.iter().enumerate() {
        if p.len() != bytes {
            return Err(CommError::Mismatch {
                op: op.into(),
                msg: format!("rank {r} sent {} bytes, this rank {bytes}", p.len()),
            });
        }
    }
    out.fill(T::default());
    for p in parts {
        // The blob may not be aligned for T: read it value by value.
        for (o, chunk) in out.iter_mut().zip(p.chunks_exact(std::mem::size_of::<T>())) {
            *o += bytemuck::pod_read_unaligned::<T>(chunk);
        }
    }
    Ok(())
}

/// `out[i]` read from the bytes of `src` (which need not be aligned for `T`).
fn copy_from_bytes<T: bytemuck::Pod>(out: &mut [T], src: &[u8]) {
    for (o, chunk) in out
        .iter_mut()
        .zip(src.chunks_exact(std::mem::size_of::<T>()))
    {
        *o = bytemuck::pod_read_unaligned::<T>(chunk);
    }
}

/// The default timeout of a collective: `SIMCLR_DIST_TIMEOUT` seconds, else 300 s.
pub fn default_timeout() -> Duration {
    std::env::var("SIMCLR_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(300))
}

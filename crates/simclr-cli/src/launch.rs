//! Starting data-parallel runs: one process per replica.
//!
//! `simclr launch --procs N -- pretrain ...` starts N copies of `simclr` on this machine with the
//! variables `torchrun` sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`);
//! on several machines, start one process per replica yourself (SLURM's `srun` does: its
//! `SLURM_PROCID`, `SLURM_NTASKS` and node list are read too). Each process finds its group with
//! [`connect_from_env`]. If one process fails, the launcher stops the others and says which rank
//! failed; a rank that dies mid-run makes the others fail within the collective timeout
//! (`SIMCLR_DIST_TIMEOUT` seconds, 300 by default).
//!
//! With `train.device = auto` each process trains on the GPU of its `LOCAL_RANK` when the
//! machine has GPUs, and the replicas then exchange gradients through NCCL. `simclr launch
//! --gpus N` is `--procs N` that first checks that the machine has N GPUs. The children get
//! `NCCL_RUNTIME_CONNECT=0` unless it is set: NCCL then connects its peers during its
//! initialisation, which is bounded by the timeout, rather than inside the first collectives.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use simclr_nn::dist::{Communicator, RendezvousConfig, TcpComm};

use crate::error::{CliError, Result};

/// The data-parallel group this process belongs to, from its environment: `None` for a single
/// process (no `RANK`/`WORLD_SIZE` nor SLURM variables, or a world of one).
pub fn connect_from_env() -> Result<Option<Arc<dyn Communicator>>> {
    let cfg = RendezvousConfig::from_env().map_err(simclr_nn::NnError::from)?;
    match cfg {
        Some(c) if c.world_size > 1 => {
            let comm = TcpComm::connect(&c).map_err(simclr_nn::NnError::from)?;
            eprintln!(
                "rank {} of {} joined the group at {}:{}",
                c.rank, c.world_size, c.host, c.port
            );
            Ok(Some(Arc::new(comm)))
        }
        _ => Ok(None),
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| CliError::Usage(format!("no free port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| CliError::Usage(e.to_string()))?
        .port())
}

/// How many processes [`launch`] starts, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replicas {
    /// `--procs N`: N processes, on GPUs or not as `train.device` says (CPU data parallelism
    /// needs no GPU).
    Procs(usize),
    /// `--gpus N`: N processes, one per GPU of this machine, which must have N.
    Gpus(usize),
}

impl Replicas {
    /// The number of processes, after checking that `present` GPUs (what
    /// `simclr_nn::cuda::device_count` reports) are enough for `--gpus`.
    pub fn processes(self, present: usize) -> Result<usize> {
        match self {
            Replicas::Procs(n) => Ok(n),
            Replicas::Gpus(n) if n > present => Err(CliError::Usage(format!(
                "--gpus {n}: this machine has {present} GPU{} usable by CUDA{}",
                if present == 1 { "" } else { "s" },
                if present == 0 {
                    " (no driver, no device, or CUDA_VISIBLE_DEVICES hides them); \
                     `--procs N` runs N replicas on the CPU"
                } else {
                    ""
                }
            ))),
            Replicas::Gpus(n) => Ok(n),
        }
    }
}

/// Exit status of a process stopped by Ctrl-C after writing its checkpoint.
const INTERRUPTED_EXIT: i32 = 130;

/// Runs `args` (a `simclr` command line) in as many processes of this program as `replicas`
/// says, rank 0's output shown, the others' errors shown; waits for all and fails if any fails.
/// When `interrupted` becomes true (Ctrl-C), the processes are asked to stop together (SIGINT):
/// rank 0 writes a checkpoint.
pub fn launch(
    replicas: Replicas,
    port: Option<u16>,
    args: &[String],
    interrupted: &AtomicBool,
) -> Result<()> {
    let procs = match replicas {
        Replicas::Procs(0) => return Err(CliError::Usage("--procs must be at least 1".into())),
        Replicas::Gpus(0) => return Err(CliError::Usage("--gpus must be at least 1".into())),
        Replicas::Procs(n) => n,
        Replicas::Gpus(_) => replicas.processes(simclr_nn::cuda::device_count())?,
    };
    if args.is_empty() {
        return Err(CliError::Usage(
            "nothing to launch: `simclr launch --procs N -- pretrain ...`".into(),
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Usage(format!("cannot find this program: {e}")))?;
    let port = match port {
        Some(p) => p,
        None => free_port()?,
    };
    // The replicas share this machine's cores: each gets its share of rayon threads (unless the
    // caller chose).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .unwrap_or_else(|| (cores / procs).max(1).to_string());
    let mut children: Vec<Child> = Vec::with_capacity(procs);
    for rank in 0..procs {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", procs.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RAYON_NUM_THREADS", &threads);
        if let Some((k, v)) = nccl_env(std::env::var_os("NCCL_RUNTIME_CONNECT").is_some()) {
            cmd.env(k, v);
        }
        if rank > 0 {
            cmd.stdout(Stdio::null());
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                stop(&mut children);
                return Err(CliError::Usage(format!("cannot start rank {rank}: {e}")));
            }
        }
    }
    // Wait for all; the first failure stops the rest (they would wait for it until the timeout).
    let mut done = vec![false; procs];
    let mut forwarded = false;
    let mut stopped_by_interrupt = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && !forwarded {
            // A terminal's Ctrl-C reaches the whole process group already; a SIGINT sent to
            // the launcher alone is passed on.
            forwarded = true;
            for c in &children {
                let _ = Command::new("kill")
                    .args(["-INT", &c.id().to_string()])
                    .status();
            }
        }
        let mut running = false;
        for (rank, c) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            match c.try_wait() {
                Ok(Some(status)) => {
                    done[rank] = true;
                    if status.code() == Some(INTERRUPTED_EXIT) {
                        // Stopped on request: the others stop at the same step.
                        stopped_by_interrupt = true;
                        continue;
                    }
                    if !status.success() {
                        stop(&mut children);
                        return Err(CliError::Usage(format!(
                            "rank {rank} of {procs} failed ({status}); the other ranks were stopped"
                        )));
                    }
                }
                Ok(None) => running = true,
                Err(e) => {
                    stop(&mut children);
                    return Err(CliError::Usage(format!("rank {rank}: {e}")));
                }
            }
        }
        if !running {
            if stopped_by_interrupt {
                return Err(CliError::Usage(
                    "interrupted: rank 0 wrote a checkpoint; resume with `simclr launch ... -- \
                     pretrain --resume RUN_DIR`"
                        .into(),
                ));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The NCCL variable the children get, unless the user set it (`user_set`):
/// `NCCL_RUNTIME_CONNECT=0`, so that NCCL connects every peer and algorithm during its
/// initialisation, which is bounded by the timeout, not lazily inside a collective, where a
/// dead peer blocks the call on the host and only the watchdog's abort ends it, and where the
/// connection would run beside another communicator's kernels (the overlapped all-reduce).
fn nccl_env(user_set: bool) -> Option<(&'static str, &'static str)> {
    (!user_set).then_some(("NCCL_RUNTIME_CONNECT", "0"))
}

fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_counted_before_anything_starts_but_procs_are_not() {
        assert_eq!(Replicas::Procs(4).processes(0).unwrap(), 4);
        assert_eq!(Replicas::Gpus(2).processes(2).unwrap(), 2);
        assert_eq!(Replicas::Gpus(2).processes(8).unwrap(), 2);
        let e = Replicas::Gpus(4).processes(2).unwrap_err().to_string();
        assert!(e.contains("--gpus 4: this machine has 2 GPUs"), "{e}");
        let e = Replicas::Gpus(1).processes(0).unwrap_err().to_string();
        assert!(e.contains("has 0 GPUs") && e.contains("--procs N"), "{e}");
    }

    #[test]
    fn launch_with_more_gpus_than_present_fails_up_front() {
        if simclr_nn::cuda::device_count() > 0 {
            return;
        }
        let never = AtomicBool::new(false);
        let args = vec!["pretrain".to_string()];
        let e = launch(Replicas::Gpus(2), None, &args, &never).unwrap_err();
        assert!(e.to_string().contains("--gpus 2"), "{e}");
    }

    #[test]
    fn children_connect_nccl_at_init_unless_the_user_chose() {
        assert_eq!(nccl_env(false), Some(("NCCL_RUNTIME_CONNECT", "0")));
        assert_eq!(nccl_env(true), None);
    }
}

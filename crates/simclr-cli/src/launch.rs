//! Starting data-parallel runs: one process per replica.
//!
//! `simclr launch --procs N -- pretrain ...` starts N copies of `simclr` on this machine with the
//! variables `torchrun` sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`);
//! on several machines, start one process per replica yourself (SLURM's `srun` does: its
//! `SLURM_PROCID`, `SLURM_NTASKS` and node list are read too). Each process finds its group with
//! [`connect_from_env`]. If one process fails, the launcher stops the others and names the rank
//! whose failure explains the rest, and how it ended: a rank killed by a signal (the
//! out-of-memory killer's SIGKILL, a segmentation fault) comes before the ranks that then failed
//! because their peer vanished. A rank that dies mid-run makes the others fail at once, or at
//! the latest within the collective timeout (`SIMCLR_DIST_TIMEOUT` seconds, 300 by default).
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
/// says, rank 0's output shown, the others' errors shown; waits for all and fails if any fails,
/// naming the rank that failed first and how (its exit status or the signal that killed it).
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
    // Every process is started before any can fail: an absurd count must be refused here.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = (4 * cores).clamp(64, 1024);
    if procs > most {
        return Err(CliError::Usage(format!(
            "--procs {procs}: at most {most} processes on this machine ({cores} cores; the \
             bound is 4 per core, kept within 64..=1024)"
        )));
    }
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
    supervise(&mut children, interrupted, FAILURE_GRACE)
}

/// How long the launcher lets the other ranks end on their own after the first failure before
/// it stops them: a rank that was killed is often seen in the same poll as the peers that then
/// lost it, and this window lets every rank that ended by itself be told apart from the ones
/// the launcher stopped.
const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// How one rank ended, as the launcher saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Exited with this non-zero status.
    Exited(i32),
    /// Killed by this signal (not by the launcher).
    Signalled { signal: i32, core_dumped: bool },
}

/// A rank that failed by itself, in the order the launcher saw them fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Failure {
    rank: usize,
    ending: Ending,
}

fn ending(status: std::process::ExitStatus) -> Option<Ending> {
    use std::os::unix::process::ExitStatusExt;
    if status.success() {
        return None;
    }
    Some(match (status.code(), status.signal()) {
        (Some(code), _) => Ending::Exited(code),
        (None, Some(signal)) => Ending::Signalled {
            signal,
            core_dumped: status.core_dumped(),
        },
        // Neither an exit code nor a signal (a stopped process is not reported by wait).
        (None, None) => Ending::Exited(-1),
    })
}

/// The name of a POSIX signal as Linux numbers them.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => return None,
    })
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Ending::Exited(code) => write!(f, "failed (exit status: {code})"),
            Ending::Signalled {
                signal,
                core_dumped,
            } => {
                write!(f, "was killed by signal {signal}")?;
                if let Some(name) = signal_name(signal) {
                    write!(f, " ({name})")?;
                }
                if core_dumped {
                    write!(f, ", core dumped")?;
                }
                Ok(())
            }
        }
    }
}

/// The rank whose failure explains the others': a rank killed by a signal, which cannot be a
/// consequence of a vanished peer, before one that exited with an error (as its peers do when
/// it disappears); among those alike, the first seen.
fn root_cause(failures: &[Failure]) -> Option<Failure> {
    failures
        .iter()
        .find(|f| matches!(f.ending, Ending::Signalled { .. }))
        .or_else(|| failures.first())
        .copied()
}

/// The launcher's report of a failed group: the root cause first, then what the other ranks
/// did.
fn failure_report(failures: &[Failure], stopped: &[usize], procs: usize) -> String {
    let Some(root) = root_cause(failures) else {
        return format!("the ranks of {procs} failed");
    };
    let mut msg = format!("rank {} of {procs} {}", root.rank, root.ending);
    if matches!(root.ending, Ending::Signalled { signal: 9, .. }) {
        msg.push_str(
            " (the kernel's out-of-memory killer sends SIGKILL: `dmesg` says whether it did)",
        );
    }
    let others: Vec<String> = failures
        .iter()
        .filter(|f| f.rank != root.rank)
        .map(|f| format!("rank {} {}", f.rank, f.ending))
        .collect();
    if !others.is_empty() {
        msg.push_str(&format!("; then {}", others.join(", ")));
    }
    let stopped: Vec<String> = stopped.iter().map(usize::to_string).collect();
    match stopped.as_slice() {
        [] => {}
        [one] => msg.push_str(&format!("; rank {one} was stopped")),
        many => msg.push_str(&format!("; ranks {} were stopped", many.join(", "))),
    }
    msg
}

/// Waits for every child, forwarding an interrupt; after the first failure, gives the others
/// `grace` to end by themselves, then stops the rest, and reports the root cause.
fn supervise(children: &mut [Child], interrupted: &AtomicBool, grace: Duration) -> Result<()> {
    let procs = children.len();
    let mut done = vec![false; procs];
    let mut failures: Vec<Failure> = Vec::new();
    let mut first_failure: Option<std::time::Instant> = None;
    let mut forwarded = false;
    let mut stopped_by_interrupt = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && !forwarded {
            // A terminal's Ctrl-C reaches the whole process group already; a SIGINT sent to
            // the launcher alone is passed on.
            forwarded = true;
            for c in children.iter() {
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
                    if let Some(ending) = ending(status) {
                        failures.push(Failure { rank, ending });
                        first_failure.get_or_insert_with(std::time::Instant::now);
                    }
                }
                Ok(None) => running = true,
                Err(e) => {
                    stop(children);
                    return Err(CliError::Usage(format!(
                        "rank {rank} of {procs}: cannot wait for it: {e}; the other ranks were \
                         stopped"
                    )));
                }
            }
        }
        if let Some(t) = first_failure {
            if !running || t.elapsed() >= grace {
                // The ranks still running would wait for the failed one until the collective
                // timeout.
                let stopped: Vec<usize> = (0..procs).filter(|&r| !done[r]).collect();
                stop(children);
                return Err(CliError::Usage(failure_report(&failures, &stopped, procs)));
            }
        }
        if !running {
            if stopped_by_interrupt {
                return Err(CliError::RanksInterrupted);
            }
            return Ok(());
        }
        std::thread::sleep(if first_failure.is_some() {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(100)
        });
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
    fn a_rank_killed_by_a_signal_is_the_root_cause_of_the_peers_errors() {
        let killed = Failure {
            rank: 1,
            ending: Ending::Signalled {
                signal: 9,
                core_dumped: false,
            },
        };
        let lost_peer = Failure {
            rank: 0,
            ending: Ending::Exited(1),
        };
        // Seen in the same poll, rank 0 first: rank 1 is still the cause.
        let report = failure_report(&[lost_peer, killed], &[2], 3);
        assert!(
            report.starts_with("rank 1 of 3 was killed by signal 9 (SIGKILL)"),
            "{report}"
        );
        assert!(
            report.contains("then rank 0 failed (exit status: 1)"),
            "{report}"
        );
        assert!(report.contains("rank 2 was stopped"), "{report}");
        // Without a signal, the first rank seen to fail.
        let other = Failure {
            rank: 2,
            ending: Ending::Exited(1),
        };
        let report = failure_report(&[other, lost_peer], &[1], 3);
        assert!(
            report.starts_with("rank 2 of 3 failed (exit status: 1)"),
            "{report}"
        );
        let segv = Ending::Signalled {
            signal: 11,
            core_dumped: true,
        };
        assert_eq!(
            segv.to_string(),
            "was killed by signal 11 (SIGSEGV), core dumped"
        );
        assert_eq!(
            Ending::Signalled {
                signal: 40,
                core_dumped: false
            }
            .to_string(),
            "was killed by signal 40"
        );
    }

    #[test]
    fn children_connect_nccl_at_init_unless_the_user_chose() {
        assert_eq!(nccl_env(false), Some(("NCCL_RUNTIME_CONNECT", "0")));
        assert_eq!(nccl_env(true), None);
    }
}

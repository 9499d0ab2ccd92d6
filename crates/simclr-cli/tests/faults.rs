//! Faults the `simclr` program must survive without damage: a resume that cannot start leaves
//! its run folder as it was, outputs never replace a run's own files (nor any other file without
//! `--force`), and a launched rank killed by a signal is named as the cause of the group's
//! failure.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

mod common;
use common::simclr;

/// The settings of a run that trains in seconds on the CPU, into `dir`, for `epochs` epochs.
fn tiny(dir: &str, epochs: u32) -> Vec<String> {
    let mut s = common::tiny(dir, epochs);
    s.extend(["--set".into(), "train.device=cpu".into()]);
    s
}

/// Pre-trains the tiny run `dir` (in `cwd`) to its end.
fn make_run(cwd: &Path, dir: &str) {
    let mut args = vec![
        "pretrain".to_string(),
        "--preset".into(),
        "quickstart".into(),
    ];
    args.extend(tiny(dir, 1));
    let (code, _, err) = simclr(&args, cwd);
    assert_eq!(code, 0, "{err}");
    assert!(cwd.join(dir).join("checkpoints/last.safetensors").is_file());
}

/// Every entry under `dir` (relative path) with its bytes and modification time; folders with
/// no bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (Vec<u8>, SystemTime)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if meta.is_dir() {
                out.insert(rel, (Vec::new(), meta.modified().unwrap()));
                walk(root, &path, out);
            } else {
                out.insert(
                    rel,
                    (std::fs::read(&path).unwrap(), meta.modified().unwrap()),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_unchanged(
    before: &BTreeMap<PathBuf, (Vec<u8>, SystemTime)>,
    after: &BTreeMap<PathBuf, (Vec<u8>, SystemTime)>,
    what: &str,
) {
    let names = |m: &BTreeMap<PathBuf, _>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(before), names(after), "{what}: the files changed");
    for (path, (bytes, mtime)) in before {
        let (b, t) = &after[path];
        assert!(b == bytes, "{what}: {} was rewritten", path.display());
        assert_eq!(t, mtime, "{what}: {} was touched", path.display());
    }
}

#[test]
fn a_resume_that_cannot_start_leaves_the_run_folder_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    make_run(cwd, "run");
    let run = cwd.join("run");
    let before = snapshot(&run);
    let failing: [&[&str]; 4] = [
        // A data set whose files are not there.
        &["data.dataset=cifar10", "data.path=/nonexistent/cifar-10"],
        // Another architecture than the checkpoint's.
        &["model.base_width=8"],
        // A GPU that is not there.
        &["train.device=cuda:7"],
        // A change that would be saved, with one that fails.
        &["train.epochs=3", "model.base_width=8"],
    ];
    for sets in failing {
        let mut args = vec!["pretrain", "--resume", "run"];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (code, _, err) = simclr(&args, cwd);
        assert_ne!(code, 0, "{sets:?} should fail:\n{err}");
        assert!(!err.contains("panicked"), "{sets:?}:\n{err}");
        assert!(err.contains("error:"), "{sets:?}:\n{err}");
        assert_unchanged(&before, &snapshot(&run), &format!("{sets:?}"));
    }
    // The run is intact: it resumes for another epoch, resumes as it is, and evaluates.
    let (code, _, err) = simclr(
        &["pretrain", "--resume", "run", "--set", "train.epochs=2"],
        cwd,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = simclr(&["pretrain", "--resume", "run"], cwd);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already complete (8 steps)"), "{err}");
    let (code, out, err) = simclr(&["knn", "--run", "run", "--k", "3"], cwd);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"top1\""), "{out}");
}

#[test]
fn a_new_run_that_cannot_start_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let mut args = vec![
        "pretrain".to_string(),
        "--preset".into(),
        "quickstart".into(),
    ];
    args.extend(tiny("never", 1));
    for s in ["data.dataset=cifar10", "data.path=/nonexistent/cifar-10"] {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let (code, _, err) = simclr(&args, cwd);
    assert_ne!(code, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!cwd.join("never").exists(), "{err}");
}

#[test]
fn outputs_never_replace_a_runs_files_and_others_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    make_run(cwd, "run");
    let run = cwd.join("run");
    let before = snapshot(&run);
    for target in [
        "run/checkpoints/last.safetensors",
        "run/encoder.safetensors",
        "./run/../run/checkpoints/last.safetensors",
    ] {
        for force in [false, true] {
            for cmd in ["export", "embed"] {
                let mut args = vec![cmd, "--run", "run", "--out", target];
                if force {
                    args.push("--force");
                }
                let (code, _, err) = simclr(&args, cwd);
                assert_ne!(code, 0, "{args:?}:\n{err}");
                assert!(!err.contains("panicked"), "{args:?}:\n{err}");
                assert!(err.contains(target), "the error names the file:\n{err}");
                assert!(err.contains("belongs to the run"), "{err}");
            }
        }
    }
    assert_unchanged(&before, &snapshot(&run), "outputs onto the run's files");

    // A file of the user's: refused, then replaced with --force.
    let mine = cwd.join("mine.safetensors");
    std::fs::write(&mine, b"keep me").unwrap();
    let (code, _, err) = simclr(
        &["export", "--run", "run", "--out", "mine.safetensors"],
        cwd,
    );
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("mine.safetensors") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&mine).unwrap(), b"keep me");
    let (code, _, err) = simclr(
        &[
            "export",
            "--run",
            "run",
            "--out",
            "mine.safetensors",
            "--force",
        ],
        cwd,
    );
    assert_eq!(code, 0, "{err}");
    assert!(simclr_nn::Checkpoint::load(&mine)
        .unwrap()
        .tensors
        .contains_key("conv1.weight"));

    // Embeddings: the labels file beside a .npy counts too.
    std::fs::write(cwd.join("h.labels.npy"), b"keep me").unwrap();
    let (code, _, err) = simclr(&["embed", "--run", "run", "--out", "h.npy"], cwd);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("h.labels.npy") && err.contains("--force"),
        "{err}"
    );
    assert!(!cwd.join("h.npy").exists());
    let (code, _, err) = simclr(&["embed", "--run", "run", "--out", "h.npy", "--force"], cwd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        &std::fs::read(cwd.join("h.npy")).unwrap()[..6],
        b"\x93NUMPY"
    );
    assert_eq!(
        &std::fs::read(cwd.join("h.labels.npy")).unwrap()[..6],
        b"\x93NUMPY"
    );
    // A new file needs no --force.
    let (code, _, err) = simclr(&["embed", "--run", "run", "--out", "h.safetensors"], cwd);
    assert_eq!(code, 0, "{err}");
    assert_unchanged(&before, &snapshot(&run), "the run after the exports");
}

/// The children of `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // The fields after the command name, which is in parentheses and may hold spaces.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Whether process `pid` has `var` in its environment.
fn has_env(pid: u32, var: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|kv| kv == var.as_bytes()))
        .unwrap_or(false)
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
}

/// Kills a launcher and its ranks when the test ends, whichever way it ends.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in children_of(self.0.id()) {
            kill(pid, "KILL");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_rank_killed_by_a_signal_is_named_as_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut args = vec!["launch", "--procs", "2", "--", "pretrain"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(tiny("dp", 500));
    let child = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(&args)
        .current_dir(cwd)
        .env("SIMCLR_DIST_TIMEOUT", "60")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut launcher = Reaper(child);
    let mut stderr = launcher.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // Both ranks are training once rank 0 has logged a few steps.
    let metrics = cwd.join("dp/metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "the run did not start");
        assert!(
            launcher.0.try_wait().unwrap().is_none(),
            "the launcher ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rank1 = children_of(launcher.0.id())
        .into_iter()
        .find(|&pid| has_env(pid, "RANK=1"))
        .expect("rank 1's process");
    // As the out-of-memory killer would.
    kill(rank1, "KILL");
    let status = loop {
        if let Some(s) = launcher.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the launcher did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().unwrap();
    assert!(!status.success(), "{err}");
    // The ranks' own errors come first; the launcher's is the last.
    let report = err
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{err}"));
    assert!(
        report.starts_with("error: rank 1 of 2 was killed by signal 9 (SIGKILL)"),
        "{err}"
    );
    assert!(!report.contains("rank 0 of 2"), "{err}");
}

/// Starts `simclr` with `args` in `cwd`, its stderr read on a thread.
fn spawn(args: &[String], cwd: &Path) -> (Reaper, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(args)
        .current_dir(cwd)
        .env("SIMCLR_DIST_TIMEOUT", "60")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    (Reaper(child), reader)
}

/// Waits until the run in `run` has logged `steps` steps.
fn wait_for_steps(run: &Path, steps: usize, p: &mut Reaper, deadline: Instant) {
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count())
        < steps
    {
        assert!(Instant::now() < deadline, "the run did not start");
        assert!(p.0.try_wait().unwrap().is_none(), "the program ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_exit(p: &mut Reaper, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the program did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last step the run's metrics record.
fn last_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap()
}

fn pretrain_args(dir: &str, epochs: u32) -> Vec<String> {
    let mut args = vec![
        "pretrain".to_string(),
        "--preset".into(),
        "quickstart".into(),
    ];
    args.extend(tiny(dir, epochs));
    args
}

/// The signal a scheduler sends before it kills a job (SIGTERM) and the one SLURM sends ahead
/// of a time limit (`--signal=USR1@90`) stop a run as Ctrl-C does: a checkpoint after the
/// current step, exit status 130, and the run resumes from that step.
#[test]
fn sigterm_and_sigusr1_stop_a_run_with_a_checkpoint_it_resumes_from() {
    for signal in ["TERM", "USR1"] {
        let tmp = tempfile::tempdir().unwrap();
        let cwd = tmp.path();
        let run = cwd.join("run");
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut p, stderr) = spawn(&pretrain_args("run", 500), cwd);
        wait_for_steps(&run, 3, &mut p, deadline);
        kill(p.0.id(), signal);
        let status = wait_for_exit(&mut p, deadline);
        let err = stderr.join().unwrap();
        assert_eq!(status.code(), Some(130), "SIG{signal}: {status:?}\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains(&format!("SIG{signal}: writing a checkpoint")),
            "{err}"
        );
        assert!(err.contains("interrupted at step"), "{err}");
        let stopped = last_step(&run);
        // Resumed, it takes the next step: the checkpoint holds the step it stopped at.
        let mut args = vec!["pretrain".to_string(), "--resume".into(), "run".into()];
        args.extend(["--set".into(), format!("train.max_steps={}", stopped + 1)]);
        let (code, _, err) = simclr(&args, cwd);
        assert_eq!(code, 0, "{err}");
        assert_eq!(last_step(&run), stopped + 1, "{err}");
    }
}

/// Whether process `pid` has a handler for signal `sig` (its `SigCgt` mask, /proc).
fn catches(pid: u32, sig: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("SigCgt:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|mask| mask >> (sig - 1) & 1 == 1)
}

/// SIGTERM while the program is still starting (configuration, data, model) stops the run
/// after its first step, with a checkpoint, rather than killing it.
#[test]
fn sigterm_during_start_up_stops_after_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut p, stderr) = spawn(&pretrain_args("run", 500), cwd);
    while !catches(p.0.id(), 15) {
        assert!(Instant::now() < deadline, "no SIGTERM handler");
        assert!(p.0.try_wait().unwrap().is_none(), "the program ended early");
        std::thread::yield_now();
    }
    kill(p.0.id(), "TERM");
    let status = wait_for_exit(&mut p, deadline);
    let err = stderr.join().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}\n{err}");
    assert!(
        cwd.join("run/checkpoints/last.safetensors").is_file(),
        "{err}"
    );
}

/// SIGTERM sent to `simclr launch` alone (as a scheduler that signals the job's first process
/// does) reaches every rank: they stop together at one step, rank 0 writes the checkpoint, and
/// the launcher exits with status 130.
#[test]
fn sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let run = cwd.join("dp");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut args: Vec<String> = ["launch", "--procs", "2", "--"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(pretrain_args("dp", 500));
    let (mut p, stderr) = spawn(&args, cwd);
    wait_for_steps(&run, 3, &mut p, deadline);
    let ranks = children_of(p.0.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    kill(p.0.id(), "TERM");
    let status = wait_for_exit(&mut p, deadline);
    let err = stderr.join().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for rank in ranks {
        assert!(
            !Path::new(&format!("/proc/{rank}")).exists(),
            "rank process {rank} left running"
        );
    }
    assert!(run.join("checkpoints/last.safetensors").is_file(), "{err}");
}

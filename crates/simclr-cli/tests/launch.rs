//! `simclr launch`: data-parallel pre-training in several processes gives the single-process
//! run's losses (same global batches, global batch norm, gathered negatives), resumes with
//! another number of processes, and fails cleanly when a rank fails.

use std::path::Path;
use std::process::Command;

mod common;

/// The program's exit code and stderr.
fn simclr(args: &[impl AsRef<std::ffi::OsStr>], cwd: &Path) -> (i32, String) {
    let (code, _, err) = common::simclr(args, cwd);
    (code, err)
}

use common::tiny as settings;

/// The loss of every step in a run's metrics.
fn losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-4 * y.abs().max(1.0),
            "{what}: {a:?} vs {b:?}"
        );
    }
}

#[test]
fn two_processes_train_as_one_and_resume_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    // The reference: one process, two epochs.
    let mut args = vec!["pretrain".to_string()];
    args.extend(settings("single", 2));
    let (code, err) = simclr(&args, cwd);
    assert_eq!(code, 0, "{err}");
    let want = losses(&cwd.join("single"));
    assert_eq!(want.len(), 8);

    // Two processes, first epoch.
    let mut args = vec!["launch", "--procs", "2", "--", "pretrain"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(settings("dp", 1));
    let (code, err) = simclr(&args, cwd);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("data-parallel over 2 replicas of 8 images"),
        "{err}"
    );
    let got = losses(&cwd.join("dp"));
    assert_close(
        &got,
        &want[..4],
        "2 processes, epoch 1 (one metrics line per step)",
    );

    // Resumed by one process for the second epoch.
    let (code, err) = simclr(
        &["pretrain", "--resume", "dp", "--set", "train.epochs=2"],
        cwd,
    );
    assert_eq!(code, 0, "{err}");
    assert_close(&losses(&cwd.join("dp")), &want, "resumed with 1 process");
    assert!(cwd.join("dp/encoder.safetensors").exists());
}

#[test]
fn a_failing_rank_stops_the_launch_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    // 16 images per batch do not divide among 3 processes: every rank refuses the run.
    let mut args = vec!["launch", "--procs", "3", "--", "pretrain"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(settings("bad", 1));
    let (code, err) = simclr(&args, dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("does not divide among 3 replicas"), "{err}");
    assert!(err.contains("of 3 failed"), "{err}");
    let (code, err) = simclr(&["launch", "--procs", "0", "--", "pretrain"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("--procs must be at least 1"), "{err}");
}

#[test]
fn ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let mut args = vec!["launch", "--procs", "2", "--", "pretrain"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(settings("int", 500));
    let child = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(&args)
        .current_dir(cwd)
        .env("SIMCLR_DIST_TIMEOUT", "60")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few steps, then interrupt the launcher only (not its process group).
    let start = std::time::Instant::now();
    while losses_or_empty(&cwd.join("int")).len() < 3 {
        assert!(start.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted: every rank stopped and rank 0 wrote a checkpoint"),
        "{err}"
    );
    assert!(
        !err.contains("failed"),
        "no rank should fail on an interrupt:\n{err}"
    );
    let steps = losses(&cwd.join("int")).len();
    assert!(steps < 500 * 4, "it stopped early");
    assert!(cwd.join("int/checkpoints/last.safetensors").exists());
    // The checkpoint resumes, with one process.
    let (code, err) = simclr(
        &[
            "pretrain",
            "--resume",
            "int",
            "--set",
            "train.max_steps=2000",
            "--set",
            "train.epochs=1",
        ],
        cwd,
    );
    assert_eq!(code, 0, "{err}");
}

fn losses_or_empty(run: &Path) -> Vec<f64> {
    if run.join("metrics.jsonl").exists() {
        losses(run)
    } else {
        Vec::new()
    }
}

/// `simclr launch --gpus 2`: two processes, one GPU each, talking through NCCL (global batch
/// norm, gathered negatives, the gradient all-reduce), give the losses of one process on one
/// GPU with the whole batch. Needs two GPUs (`cargo xtask gpu-emu` presents two emulated ones);
/// elsewhere it says so and passes.
#[test]
fn two_gpus_train_as_one() {
    let test = "two_gpus_train_as_one";
    let gpus = simclr_nn::cuda::device_count();
    if gpus < 2 {
        println!("{test}: skipped (needs 2 GPUs, this machine has {gpus})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    // FP32 math: TF32 or bf16 would round differently in one process and in two.
    let device = [
        "--set",
        "train.device=cuda",
        "--set",
        "train.cuda_math=fp32",
    ];
    let mut args = vec!["pretrain".to_string()];
    args.extend(settings("single", 1));
    args.extend(device.map(String::from));
    let (code, err) = simclr(&args, cwd);
    assert_eq!(code, 0, "{err}");
    let want = losses(&cwd.join("single"));
    assert_eq!(want.len(), 4);

    let mut args = vec!["launch", "--gpus", "2", "--", "pretrain"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(settings("dp", 1));
    args.extend(device.map(String::from));
    let (code, err) = simclr(&args, cwd);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("data-parallel over 2 replicas of 8 images"),
        "{err}"
    );
    assert_close(&losses(&cwd.join("dp")), &want, "2 GPUs over NCCL");
}

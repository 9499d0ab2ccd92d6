//! `simclr launch`: data-parallel pre-training in several processes gives the single-process
//! run's losses (same global batches, global batch norm, gathered negatives), resumes with
//! another number of processes, and fails cleanly when a rank fails.

use std::path::Path;
use std::process::Command;

fn simclr(args: &[&str], cwd: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(args)
        .current_dir(cwd)
        .env("SIMCLR_DIST_TIMEOUT", "60")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn settings(dir: &str, epochs: u32) -> Vec<String> {
    [
        "data.synthetic_train=64".to_string(),
        "data.synthetic_test=20".into(),
        "data.synthetic_side=16".into(),
        "data.image_size=16".into(),
        "model.base_width=4".into(),
        "model.projection_dim=8".into(),
        "train.batch_size=16".into(),
        format!("train.epochs={epochs}"),
        "train.log_every=1".into(),
        "train.online_probe=false".into(),
        "eval.knn_every=0".into(),
        format!("output.dir={dir}"),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

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
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = simclr(&a, cwd);
    assert_eq!(code, 0, "{err}");
    let want = losses(&cwd.join("single"));
    assert_eq!(want.len(), 8);

    // Two processes, first epoch.
    let mut args = vec!["launch", "--procs", "2", "--", "pretrain"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(settings("dp", 1));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = simclr(&a, cwd);
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
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = simclr(&a, dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("does not divide among 3 replicas"), "{err}");
    assert!(err.contains("of 3 failed"), "{err}");
    let (code, err) = simclr(&["launch", "--procs", "0", "--", "pretrain"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("--procs must be at least 1"), "{err}");
}

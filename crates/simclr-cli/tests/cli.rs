//! The `simclr` binary: its commands, exit codes and messages.

use std::process::Command;

fn simclr(args: &[&str], cwd: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TINY: &[&str] = &[
    "--set",
    "data.synthetic_train=48",
    "--set",
    "data.synthetic_test=20",
    "--set",
    "data.synthetic_side=16",
    "--set",
    "data.image_size=16",
    "--set",
    "model.base_width=4",
    "--set",
    "model.projection_dim=8",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.epochs=1",
    "--set",
    "eval.knn_k=3",
    "--set",
    "eval.linear_epochs=2",
];

#[test]
fn presets_are_listed_and_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = simclr(&["presets"], dir.path());
    assert_eq!(code, 0);
    for p in [
        "quickstart",
        "cifar10-resnet18",
        "cifar10-resnet50",
        "stl10",
        "imagenet-resnet50-4x",
    ] {
        assert!(out.contains(p), "{p} missing from:\n{out}");
    }
    let (code, out, _) = simclr(&["presets", "imagenet-resnet50-2x"], dir.path());
    assert_eq!(code, 0);
    assert!(
        out.contains("batch_size = 4096") && out.contains("width = 2"),
        "{out}"
    );
}

#[test]
fn a_wrong_config_key_fails_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[train]\nepochz = 3\n").unwrap();
    let (code, _, err) = simclr(&["pretrain", "--config", "bad.toml"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("epochz") && err.contains("bad.toml"), "{err}");
    let (code, _, err) = simclr(&["pretrain", "--set", "train.epochs=many"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("train.epochs"), "{err}");
}

#[test]
fn pretrain_then_evaluate_export_embed_and_preview() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["train", "--set", "output.dir=\"run\""];
    args.extend_from_slice(TINY);
    let (code, out, err) = simclr(&args, dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("SimCLR") && out.contains("untrained") && out.contains("raw pixels"),
        "{out}"
    );
    let run = dir.path().join("run");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "checkpoints/last.safetensors",
        "encoder.safetensors",
        "results.md",
        "results.json",
        "plots/loss.png",
        "plots/lr.png",
        "plots/accuracy.png",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let (code, out, err) = simclr(&["knn", "--run", "run", "--k", "3"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"top1\""), "{out}");
    let (code, out, err) = simclr(&["linear-eval", "--run", "run", "--rep", "z"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"top5\""), "{out}");
    let (code, out, err) = simclr(
        &[
            "finetune",
            "--run",
            "run",
            "--labels",
            "50%",
            "--epochs",
            "1",
            "--batch-size",
            "8",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let n = report["labelled_images"].as_u64().unwrap();
    // Half of every class of the 48 images (rounded per class), in batches of 8 for one epoch.
    assert!((20..=30).contains(&n), "{out}");
    assert_eq!(report["steps"].as_u64().unwrap(), n.div_ceil(8), "{out}");
    assert!(report["top1"].as_f64().unwrap() <= report["top5"].as_f64().unwrap());
    let tuned = simclr_nn::Checkpoint::load(&run.join("finetune-50/model.safetensors")).unwrap();
    assert!(tuned.tensors.contains_key("fc.weight") && tuned.tensors.contains_key("conv1.weight"));
    let (code, _, err) = simclr(&["embed", "--run", "run", "--out", "h.npy"], dir.path());
    assert_eq!(code, 0, "{err}");
    let npy = std::fs::read(dir.path().join("h.npy")).unwrap();
    assert_eq!(&npy[..6], b"\x93NUMPY");
    assert!(dir.path().join("h.labels.npy").exists());
    let (code, _, err) = simclr(
        &["export", "--run", "run", "--out", "enc.safetensors"],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let mut prev = vec![
        "augment-preview",
        "--images",
        "3",
        "--views",
        "3",
        "--out",
        "p.png",
    ];
    prev.extend_from_slice(TINY);
    let (code, _, err) = simclr(&prev, dir.path());
    assert_eq!(code, 0, "{err}");
    let png = image::open(dir.path().join("p.png")).unwrap();
    // 3 rows of 4 cells (the image and 3 views), 16-pixel views drawn at 96 with 4-pixel gaps.
    assert_eq!((png.width(), png.height()), (4 * 100 + 4, 3 * 100 + 4));
    // Running `train` again resumes the finished run and evaluates again.
    let (code, _, err) = simclr(&args, dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resuming"), "{err}");
    // A new `pretrain` into the same folder is refused.
    let mut again = vec!["pretrain", "--set", "output.dir=\"run\""];
    again.extend_from_slice(TINY);
    let (code, _, err) = simclr(&again, dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("--resume"), "{err}");
    let (code, _, err) = simclr(&["plot", "--run", "run"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("accuracy.png"), "{err}");
}

#[test]
fn an_ablation_writes_its_table_and_figure() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["ablate", "--study", "head", "--out", "abl"];
    args.extend_from_slice(TINY);
    let (code, out, err) = simclr(&args, dir.path());
    assert_eq!(code, 0, "{err}");
    for head in ["none", "linear", "mlp"] {
        assert!(out.contains(&format!("| {head} |")), "{out}");
    }
    let study = dir.path().join("abl/head");
    assert!(study.join("figure.png").exists() && study.join("results.json").exists());
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(results.as_array().unwrap().len(), 3);
    assert!(results[0]["top1_z"].is_number());
}

/// Ctrl-C (SIGINT) writes a checkpoint after the current step and exits with 130; `--resume`
/// then finishes the run.
#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<&str> = vec!["pretrain", "--set", "output.dir=\"run\""];
    args.extend_from_slice(TINY);
    // Long enough to be caught in the middle.
    args.extend_from_slice(&[
        "--set",
        "train.epochs=400",
        "--set",
        "train.log_every=1",
        "--set",
        "eval.knn_every=0",
    ]);
    let child = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(&args)
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = dir.path().join("run/metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 3) {
        assert!(started.elapsed().as_secs() < 60, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
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
        err.contains("interrupted at step") && err.contains("--resume"),
        "{err}"
    );
    let ck =
        simclr_nn::Checkpoint::load(&dir.path().join("run/checkpoints/last.safetensors")).unwrap();
    let step: u64 = ck.metadata["step"].parse().unwrap();
    assert!(step >= 3, "checkpoint at step {step}");
    // Resume with a shorter run so that it ends soon: the schedule is the saved one, only the
    // stopping point changes.
    let max = format!("train.max_steps={}", step + 2);
    let (code, _, err) = simclr(&["pretrain", "--resume", "run", "--set", &max], dir.path());
    assert_eq!(code, 0, "{err}");
    let ck =
        simclr_nn::Checkpoint::load(&dir.path().join("run/checkpoints/last.safetensors")).unwrap();
    assert_eq!(ck.metadata["step"], (step + 2).to_string());
}

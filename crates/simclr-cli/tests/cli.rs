//! The `simclr` binary: its commands, exit codes and messages.

use std::process::Command;

mod common;
use common::simclr;

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

/// Runs `simclr args` in `cwd`, killing it and failing if it has not ended within `limit`
/// (so that a regression into a hang or a thread storm cannot stall the test run). Returns
/// (exit code, stdout, stderr).
fn simclr_within(
    args: &[&str],
    cwd: &std::path::Path,
    limit: std::time::Duration,
) -> (i32, String, String) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The pipes are drained on their own threads: a child blocked on a full pipe would
    // otherwise look like a hang.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`simclr {}` still running after {limit:?}", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        out.join().unwrap(),
        err.join().unwrap(),
    )
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `simclr args` (bounded in time) and checks that it fails cleanly: exit code 1, no panic,
/// and a message that names every one of `needles`. Returns stderr.
fn fails_naming(args: &[&str], cwd: &std::path::Path, needles: &[&str]) -> String {
    let (code, _, err) = simclr_within(args, cwd, LIMIT);
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    assert_eq!(code, 1, "{args:?} exited with {code}:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` missing from:\n{err}");
    }
    err
}

/// `pretrain` on the tiny data set into `run`, with `extra` settings appended.
fn tiny_pretrain<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["pretrain", "--set", "output.dir=\"run\""];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    args
}

#[test]
fn absurd_thread_and_prefetch_counts_are_rejected_before_training() {
    let dir = tempfile::tempdir().unwrap();
    // Far above any machine's bound (at most 1024), yet harmless if it ever got through.
    let err = fails_naming(
        &tiny_pretrain(&["--set", "data.threads=5000"]),
        dir.path(),
        &["data.threads", "5000", "0..="],
    );
    assert!(err.contains("per core"), "{err}");
    fails_naming(
        &tiny_pretrain(&["--set", "data.prefetch=100000"]),
        dir.path(),
        &["data.prefetch", "100000", "0..=64"],
    );
    fails_naming(
        &tiny_pretrain(&["--set", "train.allreduce_bucket_mib=1e9"]),
        dir.path(),
        &["train.allreduce_bucket_mib", "1000000000"],
    );
    assert!(
        !dir.path().join("run/checkpoints").exists(),
        "training started"
    );
}

#[test]
fn non_finite_and_meaningless_float_settings_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, shown) in [
        ("eval.knn_temperature", "0", "0"),
        ("eval.knn_temperature", "-1", "-1"),
        ("eval.knn_temperature", "nan", "NaN"),
        ("train.lr", "inf", "inf"),
        ("train.weight_decay", "-1", "-1"),
        ("train.trust_coefficient", "0", "0"),
        ("eval.linear_lr", "nan", "NaN"),
        ("augment.strength", "inf", "inf"),
        ("augment.crop_ratio", "[0.75, inf]", "inf"),
        ("augment.blur_sigma", "[0.0, 2.0]", "0.0"),
    ] {
        let set = format!("{key}={value}");
        fails_naming(&tiny_pretrain(&["--set", &set]), dir.path(), &[key, shown]);
    }
}

#[test]
fn knn_rejects_k_0_and_bad_temperatures_and_clamps_a_large_k() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = simclr_within(
        &tiny_pretrain(&["--set", "eval.knn_every=0"]),
        dir.path(),
        LIMIT,
    );
    assert_eq!(code, 0, "{err}");
    fails_naming(&["knn", "--run", "run", "--k", "0"], dir.path(), &["--k"]);
    for t in ["0", "-0.5", "nan"] {
        let set = format!("eval.knn_temperature={t}");
        fails_naming(
            &["knn", "--run", "run", "--k", "3", "--set", &set],
            dir.path(),
            &["eval.knn_temperature"],
        );
    }
    // More neighbours than the 48 training images: all of them, said on stderr.
    let (code, out, err) =
        simclr_within(&["knn", "--run", "run", "--k", "100000"], dir.path(), LIMIT);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("--k 100000") && err.contains("using k = 48"),
        "{err}"
    );
    assert!(out.contains("\"top1\""), "{out}");
}

#[test]
fn config_errors_name_the_file_the_range_and_the_origin_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "preset = \"nope\"\n").unwrap();
    fails_naming(
        &["pretrain", "--config", "bad.toml"],
        dir.path(),
        &["bad.toml", "nope", "quickstart"],
    );
    let err = fails_naming(
        &tiny_pretrain(&["--set", "train.epochs=99999999999999999999"]),
        dir.path(),
        &["train.epochs", "out of range", "99999999999999999999"],
    );
    assert!(!err.contains("invalid type"), "{err}");
    std::fs::write(
        dir.path().join("big.toml"),
        "[train]\nepochs = 99999999999999999999\n",
    )
    .unwrap();
    let err = fails_naming(
        &["pretrain", "--config", "big.toml"],
        dir.path(),
        &["big.toml", "out of range for train.epochs"],
    );
    assert!(!err.contains("invalid type"), "{err}");
    fails_naming(
        &tiny_pretrain(&["--set", "data.image_size=5000000000"]),
        dir.path(),
        &["out of range for data.image_size", "4294967295"],
    );
    // TINY alone has ten overrides.
    let err = fails_naming(
        &tiny_pretrain(&["--set", "train.lr=0"]),
        dir.path(),
        &["train.lr"],
    );
    assert_eq!(err.matches("with --set overrides").count(), 1, "{err}");
}

#[test]
fn an_empty_cifar_folder_names_the_files_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    fails_naming(
        &tiny_pretrain(&[
            "--set",
            "data.dataset=\"cifar10\"",
            "--set",
            "data.path=\"empty\"",
        ]),
        dir.path(),
        &[
            "empty",
            "data_batch_1.bin",
            "data_batch_5.bin",
            "test_batch.bin",
            "cifar-10-batches-bin",
        ],
    );
}

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

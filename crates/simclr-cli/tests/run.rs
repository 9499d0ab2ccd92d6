//! End-to-end runs of the trainer on tiny budgets: exact resume, interruption, divergence,
//! bad settings, export and evaluation.

use std::path::Path;

use simclr_cli::{evaluate, features::Representation, CliError, Config, Control, Trainer};
use simclr_nn::Checkpoint;

fn tiny(dir: &Path, extra: &[&str]) -> Config {
    let mut sets: Vec<String> = [
        "data.synthetic_train=64",
        "data.synthetic_test=40",
        "data.synthetic_side=16",
        "data.image_size=16",
        "data.threads=2",
        "model.base_width=4",
        "model.projection_dim=16",
        "train.batch_size=16",
        "train.epochs=2",
        "train.warmup_epochs=0.5",
        "train.log_every=1",
        "eval.knn_every=1",
        "eval.knn_k=5",
        "eval.linear_epochs=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("output.dir={:?}", dir.display().to_string()));
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::build(Some("quickstart"), None, &sets).unwrap()
}

fn losses(
    trainer: &mut Trainer,
    stop_at: Option<u64>,
) -> (Vec<f32>, Result<simclr_cli::Summary, CliError>) {
    let mut seen = Vec::new();
    let r = trainer.run(&mut |rec| {
        seen.push(rec.loss);
        if Some(rec.step) == stop_at {
            Control::Stop
        } else {
            Control::Continue
        }
    });
    (seen, r)
}

#[test]
fn an_interrupted_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut full = Trainer::new(tiny(&a, &[])).unwrap();
    assert_eq!(full.total_steps(), 8);
    let (reference, r) = losses(&mut full, None);
    let summary = r.unwrap();
    assert_eq!(summary.steps, 8);
    assert!(summary.knn_top1.is_some());
    assert!(reference.iter().all(|l| l.is_finite()));

    // Interrupted after step 3 (mid-epoch), then resumed from the checkpoint.
    let mut first = Trainer::new(tiny(&b, &[])).unwrap();
    let (head, r) = losses(&mut first, Some(3));
    assert!(
        matches!(r, Err(CliError::Interrupted { step: 3, .. })),
        "{r:?}"
    );
    drop(first);
    let mut resumed = Trainer::resume(&b, &[]).unwrap();
    assert_eq!(resumed.progress().step, 3);
    let (tail, r) = losses(&mut resumed, None);
    r.unwrap();
    let joined: Vec<f32> = head.into_iter().chain(tail).collect();
    assert_eq!(joined.len(), reference.len());
    for (i, (x, y)) in joined.iter().zip(&reference).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6,
            "step {}: resumed {x} vs uninterrupted {y}",
            i + 1
        );
    }
    // The final weights agree too.
    let ca = Checkpoint::load(&a.join("checkpoints/last.safetensors")).unwrap();
    let cb = Checkpoint::load(&b.join("checkpoints/last.safetensors")).unwrap();
    for (name, t) in &ca.tensors {
        assert_eq!(Some(t), cb.tensors.get(name), "{name}");
    }
    // Metrics were recorded as JSON lines, one per step and per epoch.
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|v| v["kind"] == "step").count(), 8);
    assert_eq!(lines.iter().filter(|v| v["kind"] == "epoch").count(), 2);
    assert!(lines.iter().any(|v| v["knn_top1"].is_number()));
}

#[test]
fn a_new_run_refuses_a_folder_that_holds_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut t = Trainer::new(tiny(&dir, &["train.max_steps=1"])).unwrap();
    losses(&mut t, None).1.unwrap();
    let e = Trainer::new(tiny(&dir, &[])).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    let cfg = tiny(
        &dir,
        &[
            "train.optimizer=\"sgd\"",
            "train.lr=1e30",
            "train.lr_scaling=\"none\"",
            "train.warmup_epochs=0",
            "train.checkpoint_every=1",
        ],
    );
    let mut t = Trainer::new(cfg).unwrap();
    let (seen, r) = losses(&mut t, None);
    match r {
        Err(CliError::Diverged {
            step, checkpoint, ..
        }) => {
            assert_eq!(step as usize, seen.len(), "stopped at the first bad step");
            if step > 0 {
                assert!(checkpoint.ends_with("last.safetensors"), "{checkpoint}");
                let ck = Checkpoint::load(Path::new(&checkpoint)).unwrap();
                for (name, t) in &ck.tensors {
                    if let simclr_nn::checkpoint::TensorData::F32(v) = &t.data {
                        assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
                    }
                }
            }
        }
        other => panic!("expected divergence, got {other:?}"),
    }
}

#[test]
fn bad_settings_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    // An output folder below a file cannot be created.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let e = Trainer::new(tiny(&file.join("run"), &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("output folder") && e.contains("file"), "{e}");
    // A data set path that does not exist.
    let e = Trainer::new(tiny(
        &tmp.path().join("r"),
        &[
            "data.dataset=\"cifar10\"",
            "data.path=\"/nonexistent/cifar\"",
        ],
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/cifar"), "{e}");
    // A batch larger than the data set.
    let e = Trainer::new(tiny(&tmp.path().join("r2"), &["train.batch_size=1000"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.batch_size"), "{e}");
}

#[test]
fn a_checkpoint_of_another_architecture_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut t = Trainer::new(tiny(&dir, &["train.max_steps=1"])).unwrap();
    losses(&mut t, None).1.unwrap();
    let e = evaluate::load_run(&dir, None, &["model.base_width=8".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("last.safetensors") && e.contains("another architecture"),
        "{e}"
    );
}

#[test]
fn exported_encoders_and_embeddings_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut t = Trainer::new(tiny(&dir, &["train.max_steps=2"])).unwrap();
    losses(&mut t, None).1.unwrap();
    // The encoder written at the end has torchvision's names and no head.
    let enc = Checkpoint::load(&dir.join("encoder.safetensors")).unwrap();
    assert!(enc.tensors.contains_key("conv1.weight"));
    assert!(enc.tensors.contains_key("layer1.0.bn1.running_mean"));
    assert!(!enc
        .tensors
        .keys()
        .any(|k| k.starts_with("head.") || k.starts_with("encoder.")));
    // Loading it gives the same h as the run's checkpoint.
    let (cfg, mut from_run) = evaluate::load_run(&dir, None, &[]).unwrap();
    let (_, mut from_export) =
        evaluate::load_run(&dir, Some(&dir.join("encoder.safetensors")), &[]).unwrap();
    let splits = simclr_cli::data::open(&cfg.data, 0).unwrap();
    let a = simclr_cli::features::extract(
        &mut from_run,
        splits.test.clone(),
        &cfg,
        Representation::H,
        16,
    )
    .unwrap();
    let b = simclr_cli::features::extract(
        &mut from_export,
        splits.test.clone(),
        &cfg,
        Representation::H,
        16,
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 40);
    // Embeddings as safetensors.
    let out = tmp.path().join("h.safetensors");
    simclr_cli::export::save_features(&a, &out).unwrap();
    let ck = Checkpoint::load(&out).unwrap();
    assert_eq!(ck.tensors["features"].shape, vec![40, a.dim]);
    assert_eq!(ck.tensors["labels"].shape, vec![40]);
}

#[test]
fn the_ablation_losses_train() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, loss) in ["\"nt-logistic\"", "\"margin-triplet\""].iter().enumerate() {
        for semi_hard in [false, true] {
            let dir = tmp.path().join(format!("{i}-{semi_hard}"));
            let cfg = tiny(
                &dir,
                &[
                    &format!("train.loss={loss}"),
                    &format!("train.semi_hard={semi_hard}"),
                    "train.max_steps=3",
                ],
            );
            let mut t = Trainer::new(cfg).unwrap();
            let (seen, r) = losses(&mut t, None);
            r.unwrap();
            assert_eq!(seen.len(), 3);
            assert!(
                seen.iter().all(|l| l.is_finite() && *l >= 0.0),
                "{loss}: {seen:?}"
            );
        }
    }
}

/// A checkpoint that cannot be written (as on a full disk) stops the run with an error naming
/// the file, and the previous checkpoint survives unchanged.
#[test]
fn a_failed_checkpoint_write_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut t = Trainer::new(tiny(&dir, &["train.checkpoint_every=1"])).unwrap();
    let ck = dir.join("checkpoints/last.safetensors");
    let mut before = None;
    let r = t.run(&mut |rec| {
        if rec.step == 2 {
            before = Some(std::fs::read(&ck).unwrap());
            // The atomic writer's temporary file cannot be created: the next save fails midway.
            let blocker = dir.join(format!(
                "checkpoints/.last.safetensors.tmp-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(blocker).unwrap();
        }
        Control::Continue
    });
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("last.safetensors") && e.contains("previous checkpoint is intact"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        before.unwrap(),
        "the step-2 checkpoint is untouched"
    );
    assert_eq!(Checkpoint::load(&ck).unwrap().metadata["step"], "2");
}

#[test]
fn a_failed_first_checkpoint_does_not_claim_an_earlier_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut t = Trainer::new(tiny(&dir, &["train.checkpoint_every=1"])).unwrap();
    // The first save (after step 1) cannot create its temporary file.
    let blocker = dir.join(format!(
        "checkpoints/.last.safetensors.tmp-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(blocker).unwrap();
    let e = t.run(&mut |_| Control::Continue).unwrap_err().to_string();
    assert!(
        e.contains("last.safetensors") && e.contains("no earlier checkpoint"),
        "{e}"
    );
    assert!(!e.contains("intact"), "{e}");
    assert!(!dir.join("checkpoints/last.safetensors").exists());
}

#[test]
fn gradient_caching_trains_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("gc");
    let mut t = Trainer::new(tiny(&a, &["train.grad_cache_chunks=4", "train.epochs=1"])).unwrap();
    let (lg, s) = losses(&mut t, None);
    let s = s.unwrap();
    assert_eq!(s.steps, 4);
    assert!(s.last_loss.is_finite());
    // The chunked run's first loss is the plain run's (the weights are the same before the
    // first update; only batch norm differs, per chunk).
    let b = dir.path().join("plain");
    let mut p = Trainer::new(tiny(&b, &["train.epochs=1"])).unwrap();
    let (lp, r) = losses(&mut p, None);
    r.unwrap();
    assert_eq!(lg.len(), lp.len());
    assert!((lg[0] - lp[0]).abs() < 0.5, "{lg:?} vs {lp:?}");
    assert_ne!(lg, lp, "per-chunk batch norm must change the numbers");
    let e = Config::build(
        Some("quickstart"),
        None,
        &["train.grad_cache_chunks=0".into()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("train.grad_cache_chunks"), "{e}");
}

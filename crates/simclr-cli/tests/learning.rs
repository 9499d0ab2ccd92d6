//! SimCLR learns: on small budgets, pre-training then linear evaluation beats the same encoder
//! untrained, on the built-in shapes and on Fashion-MNIST (Debian's dataset-fashion-mnist).

use std::path::{Path, PathBuf};

use simclr_cli::{evaluate, features::Representation, Config, Control, Trainer};

/// Pre-trains the quick-start preset with `settings`, then asserts that linear evaluation of the
/// encoder leads the untrained one by more than `margin` points.
fn assert_simclr_leads(settings: &[&str], margin: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::build(Some("quickstart"), None, &sets(tmp.path(), settings)).unwrap();
    let (trained, untrained) = pretrain_and_compare(cfg);
    assert!(
        trained > untrained + margin,
        "SimCLR {trained:.1}% vs untrained {untrained:.1}%"
    );
}

fn pretrain_and_compare(cfg: Config) -> (f64, f64) {
    let mut trainer = Trainer::new(cfg).unwrap();
    trainer.run(&mut |_| Control::Continue).unwrap();
    let cfg = trainer.config().clone();
    let splits = trainer.splits().clone();
    let trained = evaluate::linear_eval(trainer.model(), &splits, &cfg, Representation::H).unwrap();
    let mut untrained = simclr_nn::SimClr::new(
        &cfg.model.simclr().unwrap(),
        simclr_nn::Device::Cpu,
        cfg.train.seed,
    )
    .unwrap();
    let base = evaluate::linear_eval(&mut untrained, &splits, &cfg, Representation::H).unwrap();
    eprintln!(
        "linear eval top-1: SimCLR {:.1}%, untrained {:.1}%",
        trained.top1, base.top1
    );
    (trained.top1, base.top1)
}

fn sets(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut s: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    s.push(format!("output.dir={:?}", dir.display().to_string()));
    s.push("data.threads=2".into());
    s.push("eval.knn_every=0".into());
    s
}

#[test]
fn simclr_beats_the_untrained_encoder_on_the_built_in_shapes() {
    assert_simclr_leads(
        &[
            "data.synthetic_train=2000",
            "data.synthetic_test=500",
            "train.epochs=10",
            "eval.linear_epochs=50",
        ],
        5.0,
    );
}

fn fashion_mnist() -> Option<PathBuf> {
    let dir = std::env::var_os("SIMCLR_FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"));
    if dir.join("train-images-idx3-ubyte.gz").exists()
        || dir.join("train-images-idx3-ubyte").exists()
    {
        return Some(dir);
    }
    let msg = format!(
        "Fashion-MNIST not found in {} (apt-get install dataset-fashion-mnist)",
        dir.display()
    );
    if std::env::var("SIMCLR_REQUIRE_REAL_DATA").is_ok_and(|v| v == "1") {
        panic!("{msg} (SIMCLR_REQUIRE_REAL_DATA=1)");
    }
    eprintln!("skipped: {msg}");
    None
}

#[test]
fn simclr_beats_the_untrained_encoder_on_fashion_mnist() {
    let Some(data) = fashion_mnist() else { return };
    let path = format!("data.path={:?}", data.display().to_string());
    assert_simclr_leads(
        &[
            "data.dataset=\"fashion-mnist\"",
            &path,
            "data.image_size=28",
            "data.max_train_images=2000",
            "data.max_test_images=1000",
            "train.epochs=8",
            "eval.linear_epochs=50",
        ],
        1.5,
    );
}

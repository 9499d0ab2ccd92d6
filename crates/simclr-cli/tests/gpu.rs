//! The `simclr` program on a GPU: GPU augmentation (the loader crops, the colour kernels finish
//! on the training GPU) gives the CPU augmentation's losses. Needs a GPU; elsewhere it prints
//! that it skipped, unless `SIMCLR_REQUIRE_GPU=1` makes that a failure.

use std::path::Path;
use std::process::Command;

fn pretrain(dir: &str, extra: &[&str], cwd: &Path) -> Vec<f64> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_simclr"));
    cmd.arg("pretrain").current_dir(cwd);
    for s in [
        "data.synthetic_train=64",
        "data.synthetic_test=20",
        "data.synthetic_side=16",
        "data.image_size=16",
        "model.base_width=4",
        "model.projection_dim=8",
        "train.batch_size=16",
        "train.epochs=1",
        "train.log_every=1",
        "train.online_probe=false",
        "eval.knn_every=0",
        "train.device=cuda",
        // FP32 math, so that the comparison is of the augmentation alone.
        "train.cuda_math=fp32",
    ]
    .iter()
    .chain(extra)
    {
        cmd.args(["--set", s]);
    }
    cmd.args(["--set", &format!("output.dir={dir}")]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(cwd.join(dir).join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn gpu_augmentation_gives_the_cpu_augmentations_losses() {
    let test = "gpu_augmentation_gives_the_cpu_augmentations_losses";
    if !simclr_kernels::cuda::gpu_available() {
        if std::env::var("SIMCLR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("{test}: no CUDA driver or no GPU, and SIMCLR_REQUIRE_GPU=1 forbids skipping");
        }
        println!("{test}: skipped (no CUDA driver or no GPU on this machine)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cpu = pretrain("cpu-augment", &[], dir.path());
    let gpu = pretrain("gpu-augment", &["data.gpu_augment=true"], dir.path());
    assert_eq!(cpu.len(), 4, "{cpu:?}");
    assert_eq!(gpu.len(), cpu.len(), "{gpu:?} vs {cpu:?}");
    for (g, c) in gpu.iter().zip(&cpu) {
        assert!(
            (g - c).abs() <= 1e-4 * c.abs(),
            "GPU augmentation's losses {gpu:?}, the CPU's {cpu:?}"
        );
    }
}

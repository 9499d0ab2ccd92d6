//! `cargo xtask bench-dp`: the data-parallel step with the gradient all-reduce overlapped with
//! the backward pass against the same step with one all-reduce after it, side by side on this
//! machine (`simclr launch --procs N` over loopback TCP), and a check that both train the same.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::{cargo, flag, root, run};

/// The run: a width-64 ResNet-18 (45 MB of gradients) on small synthetic images, so that the
/// all-reduce weighs against the compute.
fn settings(dir: &Path, bucket_mib: &str, steps: u32) -> Vec<String> {
    [
        "data.synthetic_train=1024".to_string(),
        "data.synthetic_test=20".into(),
        "data.synthetic_side=16".into(),
        "data.image_size=16".into(),
        "model.base_width=64".into(),
        "train.batch_size=16".into(),
        format!("train.max_steps={steps}"),
        "train.log_every=1".into(),
        "train.online_probe=false".into(),
        "train.checkpoint_every=100000".into(),
        "eval.knn_every=0".into(),
        format!("train.allreduce_bucket_mib={bucket_mib}"),
        format!("output.dir={}", dir.display()),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// The losses of a run's metrics, as written (to compare bit for bit).
fn losses(run: &Path) -> Result<Vec<String>, String> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| l.contains("\"kind\":\"step\""))
        .filter_map(|l| l.split("\"loss\":").nth(1))
        .map(|rest| rest.split(',').next().unwrap_or("").to_string())
        .collect())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs both variants `--reps` times, alternating, and prints the medians and their ratio.
pub fn bench_dp(args: &[String]) -> Result<(), String> {
    let procs: usize = flag(args, "--procs")
        .map_or(Ok(2), |v| v.parse())
        .map_err(|e| format!("--procs: {e}"))?;
    let reps: usize = flag(args, "--reps")
        .map_or(Ok(3), |v| v.parse())
        .map_err(|e| format!("--reps: {e}"))?;
    let steps: u32 = flag(args, "--steps")
        .map_or(Ok(24), |v| v.parse())
        .map_err(|e| format!("--steps: {e}"))?;
    if procs < 2 || reps == 0 || steps == 0 {
        return Err("--procs must be at least 2, --reps and --steps at least 1".into());
    }
    run(cargo().args(["build", "--release", "-p", "simclr-cli", "--bin", "simclr"]))?;
    let exe = root().join("target/release/simclr");
    let out = root().join("target/bench/dp");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let variants = [("overlapped", "25"), ("after", "0")];
    let mut times = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        // Alternating, so that drifts of a noisy machine touch both alike.
        for (k, (name, mib)) in variants.iter().enumerate() {
            let dir = out.join(format!("{name}-{rep}"));
            let mut cmd = Command::new(&exe);
            cmd.args(["launch", "--procs", &procs.to_string(), "--", "pretrain"])
                .args(settings(&dir, mib, steps));
            let t = Instant::now();
            let status = cmd
                .current_dir(root())
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("{}: {e}", exe.display()))?;
            if !status.success() {
                return Err(format!("{name} run {rep} failed ({status})"));
            }
            times[k].push(t.elapsed().as_secs_f64());
        }
    }
    let a = losses(&out.join("overlapped-0"))?;
    let b = losses(&out.join("after-0"))?;
    if a.is_empty() || a != b {
        return Err(format!(
            "the two all-reduces trained differently: {a:?} vs {b:?}"
        ));
    }
    let (over, after) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "{procs} processes, {steps} steps, median of {reps} runs each (wall time, start-up \
         included):\n  overlapped (25 MiB buckets) {over:.2} s\n  one all-reduce after the \
         backward pass {after:.2} s\n  speed-up {:.2}x; the {} losses are identical",
        after / over,
        a.len()
    );
    Ok(())
}

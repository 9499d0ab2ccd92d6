//! `cargo xtask`: project automation that needs more than one cargo command.
//!
//! - `train [ARGS]`: `simclr train ARGS` in release mode: with no arguments, the quick start
//!   (pre-train and linear-evaluate on the built-in data set, then the comparison table);
//!   `--preset NAME`, `--config FILE` and `--set KEY=VALUE` run a real configuration.
//! - `ci`: what CI runs after installing its packages: fmt, clippy, the README's test command.
//! - `fixtures [--python PY]`: regenerate the PyTorch parity fixtures of tests/reference.
//! - `bench-cpu [--python PY] [--quick] [--report-only]`: PyTorch's CPU baseline and our criterion benchmarks in
//!   one run on this machine, and the ratio of their medians.
//! - `check-kernels [--python PY]`: compile every CUDA kernel with NVRTC 13.0 for sm_80 and sm_90
//!   (no GPU needed) and report registers and spills with ptxas.
//! - `gpu-check`: build the GPU tests and benchmarks into `gpu-check/` with the script to run on
//!   a GPU machine.
//! - `gpu-emu [--sanitize address|thread] [-p PACKAGE]... [-- TEST-ARGS]`: the GPU tests on the
//!   emulated device (crates/simclr-gpu-emu), none allowed to skip.
//! - `bench-dp [--procs N] [--reps R] [--steps S]`: data-parallel training with the gradient
//!   all-reduce overlapped with the backward pass against one all-reduce after it.
//! - `fuzz [--seconds N] [--no-asan] [TARGET]...`: build the fuzz targets of
//!   crates/simclr-data/fuzz with nightly (no cargo-fuzz needed) and run each for N seconds.

mod dp;
mod emu;
mod fuzz;
mod gpu;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("train") => train(&args[1..]),
        Some("ci") => ci(),
        Some("fixtures") => fixtures(&args[1..]),
        Some("bench-cpu") => bench_cpu(&args[1..]),
        Some("check-kernels") => gpu::check_kernels(&args[1..]),
        Some("gpu-check") => gpu::gpu_check(&args[1..]),
        Some("gpu-emu") => emu::gpu_emu(&args[1..]),
        Some("bench-dp") => dp::bench_dp(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 train [ARGS]                     pre-train + linear-evaluate (simclr train ARGS)\n  \
                 ci                               fmt --check, clippy -D warnings, the test suite\n  \
                 fixtures [--python PY]           regenerate tests/reference/fixtures with PyTorch\n  \
                 bench-cpu [--python PY] [--quick] [--report-only]\n                                   PyTorch CPU baseline beside our benchmarks\n  \
                 check-kernels [--python PY]      compile every CUDA kernel (NVRTC 13.0, ptxas report)\n  \
                 gpu-check                        build gpu-check/ for a GPU machine\n  \
                 gpu-emu [--sanitize address|thread] [-p PACKAGE]... [-- TEST-ARGS]\n                                   \
                 the GPU tests on the emulated device\n  \
                 bench-dp [--procs N] [--reps R] [--steps S]\n                                   \
                 overlapped against plain gradient all-reduce (CPU, TCP)\n  \
                 fuzz [--seconds N] [--no-asan] [TARGET]...\n                                   \
                 the data fuzz targets, N seconds each (nightly)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `simclr train` built in release mode, run from the caller's folder so that relative paths in
/// its arguments mean what the caller meant.
fn train(args: &[String]) -> Result<(), String> {
    let manifest = root().join("Cargo.toml");
    let mut cmd = cargo();
    cmd.args(["run", "--release", "--manifest-path"])
        .arg(&manifest)
        .args(["-p", "simclr-cli", "--bin", "simclr", "--", "train"])
        .args(args);
    eprintln!("+ {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("simclr train failed with {status}"))
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn ci() -> Result<(), String> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace", "--release"]))
}

fn fixtures(args: &[String]) -> Result<(), String> {
    let python = flag(args, "--python").unwrap_or_else(|| "python3".into());
    run(Command::new(python).args([
        "tests/reference/make_fixtures.py",
        "--out",
        "tests/reference/fixtures",
    ]))
}

/// The shared folder beside the checkout holds the PyTorch baselines.
fn baseline_script() -> Result<PathBuf, String> {
    let candidates = [
        std::env::var("SIMCLR_SHARED").ok().map(PathBuf::from),
        Some(root().join("../shared")),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(|d| d.join("baselines/torch_cpu_baseline.py"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            "torch_cpu_baseline.py not found: set SIMCLR_SHARED to the shared folder".into()
        })
}

/// Median of a criterion benchmark in seconds, from `target/criterion/<group>/<id>/new`.
fn criterion_median(group: &str, id: &str) -> Option<f64> {
    let path = root()
        .join("target/criterion")
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Some(v["median"]["point_estimate"].as_f64()? * 1e-9)
}

fn bench_cpu(args: &[String]) -> Result<(), String> {
    let python = flag(args, "--python").unwrap_or_else(|| "python3".into());
    let quick = args.iter().any(|a| a == "--quick");
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let json = out.join("torch-cpu.json");
    if !args.iter().any(|a| a == "--report-only") {
        measure(&python, quick, &json)?;
    }
    report(&json)
}

/// Runs PyTorch's baseline into `json`, then our criterion benches.
fn measure(python: &str, quick: bool, json: &Path) -> Result<(), String> {
    let script = baseline_script()?;
    let mut torch = Command::new(python);
    torch
        .arg(&script)
        .args(["--only", "ntxent", "step", "--channels-last", "--json"])
        .arg(json);
    if quick {
        torch.arg("--quick");
    }
    run(&mut torch)?;
    let mut bench = cargo();
    bench.args([
        "bench",
        "-p",
        "simclr",
        "--bench",
        "ntxent",
        "--bench",
        "train_step",
    ]);
    if quick {
        bench.env("SIMCLR_BENCH_BATCH", "32");
    }
    run(&mut bench)
}

/// The table of our medians beside PyTorch's.
fn report(json: &Path) -> Result<(), String> {
    let torch: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(json).map_err(|e| format!("{}: {e}", json.display()))?,
    )
    .map_err(|e| format!("{}: {e}", json.display()))?;
    println!(
        "\n{:<44} {:>12} {:>12} {:>8}",
        "benchmark (median)", "ours", "PyTorch", "speed-up"
    );
    let row = |name: String, ours: Option<f64>, theirs: Option<f64>| match (ours, theirs) {
        (Some(o), Some(t)) => println!(
            "{name:<44} {:>10.2}ms {:>10.2}ms {:>7.2}x",
            o * 1e3,
            t * 1e3,
            t / o
        ),
        _ => println!("{name:<44} (missing: ours {ours:?}, PyTorch {theirs:?})"),
    };
    for r in torch["ntxent"].as_array().into_iter().flatten() {
        let n = r["N"].as_u64().unwrap_or(0);
        row(
            format!("NT-Xent fwd+bwd N={n} d=128"),
            criterion_median("ntxent/fwd_bwd", &n.to_string()),
            r["fwd_bwd_ms"].as_f64().map(|v| v * 1e-3),
        );
        row(
            format!("NT-Xent fwd N={n} d=128"),
            criterion_median("ntxent/fwd", &n.to_string()),
            r["fwd_ms"].as_f64().map(|v| v * 1e-3),
        );
    }
    for r in torch["step"].as_array().into_iter().flatten() {
        let batch = r["batch"].as_u64().unwrap_or(0);
        let layout = if r["channels_last"].as_bool() == Some(true) {
            "channels_last"
        } else {
            "NCHW"
        };
        row(
            format!("train step b{batch} vs PyTorch {layout}"),
            criterion_median("train_step", &format!("resnet18_cifar_b{batch}_32x32_sgd")),
            r["step_s"].as_f64(),
        );
    }
    Ok(())
}

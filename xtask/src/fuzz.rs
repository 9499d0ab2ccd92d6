//! `cargo xtask fuzz [--seconds N] [TARGET]...`: every fuzz target of crates/simclr-data/fuzz
//! built as `cargo fuzz build` would (nightly, SanitizerCoverage, AddressSanitizer) and run for
//! N seconds each, without cargo-fuzz installed.
//!
//! The corpus of each target lives in `target/fuzz-corpus/<target>` so that runs accumulate
//! inputs; a crashing input is kept in `target/fuzz-artifacts/<target>/` and its path is the
//! error. libFuzzer's output goes to `target/fuzz-logs/<target>.log`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::root;

/// The triple is given explicitly so that build scripts and proc-macros (run on the host) are
/// not instrumented: `-Zsanitizer` requires it.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// cargo-fuzz's flags for libFuzzer with AddressSanitizer, debug assertions and overflow checks
/// (its defaults for `cargo fuzz run`).
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "fuzzing",
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Cforce-frame-pointers",
];

/// Seconds per target when `--seconds` is not given.
const DEFAULT_SECONDS: u64 = 60;

/// One input may take at most this long before libFuzzer reports it as a hang.
const INPUT_TIMEOUT_S: u64 = 20;

struct Options {
    seconds: u64,
    targets: Vec<String>,
    asan: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        seconds: DEFAULT_SECONDS,
        targets: Vec::new(),
        asan: true,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a number")?;
                o.seconds = v
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| format!("--seconds {v}: a whole number above 0"))?;
            }
            "--no-asan" => o.asan = false,
            other if other.starts_with('-') => {
                return Err(format!("fuzz: unknown argument {other}"))
            }
            target => o.targets.push(target.to_string()),
        }
    }
    Ok(o)
}

/// The fuzzing workspace.
fn fuzz_dir() -> PathBuf {
    root().join("crates/simclr-data/fuzz")
}

/// The build folder: the caller's `CARGO_TARGET_DIR` when set, else the workspace's.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_relative() { root().join(d) } else { d })
        .unwrap_or_else(|| root().join("target"))
}

/// The targets, named as cargo-fuzz names them: the files of `fuzz_targets/`.
fn all_targets() -> Result<Vec<String>, String> {
    let dir = fuzz_dir().join("fuzz_targets");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("no fuzz targets in {}", dir.display()));
    }
    Ok(names)
}

/// A command run with the nightly toolchain, whatever toolchain runs this xtask: rustup's
/// proxy passes its choice on in `RUSTUP_TOOLCHAIN`, and cargo its compiler in `RUSTC`.
fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Installs the nightly toolchain when it is missing (a clean CI machine has only stable).
fn ensure_nightly() -> Result<(), String> {
    let present = nightly("rustc")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("+ rustup toolchain install nightly --profile minimal");
    let status = Command::new("rustup")
        .args(["toolchain", "install", "nightly", "--profile", "minimal"])
        .status()
        .map_err(|e| format!("rustup: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "rustup toolchain install nightly failed with {status}"
        ))
    }
}

fn build(targets: &[String], asan: bool, build_dir: &Path) -> Result<PathBuf, String> {
    let mut flags: Vec<&str> = RUSTFLAGS.to_vec();
    if asan {
        flags.push("-Zsanitizer=address");
    }
    let mut cmd = nightly("cargo");
    cmd.current_dir(fuzz_dir())
        .args(["build", "--release", "--target", TRIPLE])
        .arg("--manifest-path")
        .arg(fuzz_dir().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(build_dir)
        .env("RUSTFLAGS", flags.join(" "));
    for t in targets {
        cmd.args(["--bin", t]);
    }
    eprintln!("+ RUSTFLAGS=\"{}\" {cmd:?}", flags.join(" "));
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!("building the fuzz targets failed with {status}"));
    }
    Ok(build_dir.join(TRIPLE).join("release"))
}

/// What one target's run found.
struct Outcome {
    execs: Option<u64>,
    crash: Option<String>,
}

/// A number libFuzzer prints at the end as `stat::NAME: N`.
fn stat(log: &str, name: &str) -> Option<u64> {
    let prefix = format!("stat::{name}:");
    log.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn run_target(bin: &Path, name: &str, seconds: u64, base: &Path) -> Result<Outcome, String> {
    let corpus = base.join("fuzz-corpus").join(name);
    let artifacts = base.join("fuzz-artifacts").join(name);
    let logs = base.join("fuzz-logs");
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let log_path = logs.join(format!("{name}.log"));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new(bin.join(name));
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1")
        // The trailing separator makes libFuzzer write `<folder>/crash-<sha1>`.
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .stdout(
            log.try_clone()
                .map_err(|e| format!("{}: {e}", log_path.display()))?,
        )
        .stderr(log);
    eprintln!("+ {cmd:?} (log: {})", log_path.display());
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let execs = stat(&text, "number_of_executed_units");
    if status.success() {
        return Ok(Outcome { execs, crash: None });
    }
    let written = text
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map(str::to_string);
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    eprintln!(
        "{name}: libFuzzer exited with {status}; the end of its log:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    Ok(Outcome {
        execs,
        crash: Some(written.unwrap_or_else(|| {
            format!("no input was saved ({status}); see {}", log_path.display())
        })),
    })
}

/// Builds and runs the fuzz targets; an error names every crashing input's file.
pub fn fuzz(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let known = all_targets()?;
    let targets = if o.targets.is_empty() {
        known.clone()
    } else {
        for t in &o.targets {
            if !known.contains(t) {
                return Err(format!(
                    "fuzz: no target {t}; the targets are {}",
                    known.join(", ")
                ));
            }
        }
        o.targets.clone()
    };
    ensure_nightly()?;
    let base = target_dir();
    let bins = build(&targets, o.asan, &base.join("fuzz"))?;
    let mut crashes = Vec::new();
    let mut summary = Vec::new();
    for t in &targets {
        let out = run_target(&bins, t, o.seconds, &base)?;
        let execs = out.execs.map_or("?".to_string(), |n| n.to_string());
        summary.push(format!(
            "{t:<16} {execs:>10} execs in {}s{}",
            o.seconds,
            out.crash
                .as_deref()
                .map(|c| format!(", CRASH: {c}"))
                .unwrap_or_default()
        ));
        if let Some(c) = out.crash {
            crashes.push(format!("{t}: {c}"));
        }
    }
    eprintln!("\n{}", summary.join("\n"));
    if crashes.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzzing found {} crashing input(s):\n  {}\nreproduce with: <binary> <input>, the \
             binaries in {}",
            crashes.len(),
            crashes.join("\n  "),
            bins.display()
        ))
    }
}

//! `cargo xtask gpu-emu`: the GPU tests on the emulated device (crates/simclr-gpu-emu), which
//! stands in for libcuda and NVRTC where cudarc loads them, so the CUDA code runs unchanged on
//! a machine without a GPU.
//!
//! Every test binary of the chosen packages runs with `SIMCLR_REQUIRE_GPU=1` (a GPU test that
//! would skip fails) and NaN-poisoned buffers. `--sanitize address|thread` compiles the
//! emulated kernels with AddressSanitizer or ThreadSanitizer and preloads its runtime into the
//! test binaries (only into them: never into cargo or rustc).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, root};

/// The packages whose GPU tests run on the emulated device by default: the kernels, the CUDA
/// backend (with cuBLAS, cuDNN and NCCL) and the facade's PyTorch parity.
const DEFAULT_PACKAGES: [&str; 3] = ["simclr-kernels", "simclr-nn", "simclr"];

struct Options {
    sanitize: Option<String>,
    packages: Vec<String>,
    filter: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        sanitize: None,
        packages: Vec::new(),
        filter: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sanitize" => {
                let v = it.next().ok_or("--sanitize needs address or thread")?;
                if v != "address" && v != "thread" {
                    return Err(format!("--sanitize {v}: address or thread"));
                }
                o.sanitize = Some(v.clone());
            }
            "-p" | "--package" => {
                o.packages
                    .push(it.next().ok_or("--package needs a name")?.clone());
            }
            "--" => o.filter.extend(it.by_ref().cloned()),
            other => return Err(format!("gpu-emu: unknown argument {other}")),
        }
    }
    if o.packages.is_empty() {
        o.packages = DEFAULT_PACKAGES.iter().map(|s| s.to_string()).collect();
    }
    Ok(o)
}

/// Builds the emulator and links it under the names cudarc loads: the folder to put first on
/// `LD_LIBRARY_PATH`.
pub fn emulator_lib_dir() -> Result<PathBuf, String> {
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["build", "--release", "-p", "simclr-gpu-emu"]);
    eprintln!("+ {cmd:?}");
    let st = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !st.success() {
        return Err(format!("building the emulator failed with {st}"));
    }
    let target = target_dir();
    let so = target.join("release/libsimclr_gpu_emu.so");
    if !so.is_file() {
        return Err(format!("{} was not built", so.display()));
    }
    let dir = target.join("gpu-emu/lib");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // The first name cudarc tries for each library, and the versioned one a loader may ask for.
    for name in [
        "libcuda.so",
        "libcuda.so.1",
        "libnvrtc.so",
        "libnvrtc.so.13",
        "libcublas.so",
        "libcublas.so.13",
        "libcublasLt.so",
        "libcublasLt.so.13",
        "libcudnn.so",
        "libcudnn.so.9",
        "libnccl.so",
        "libnccl.so.2",
    ] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link).map_err(|e| format!("{}: {e}", link.display()))?;
    }
    Ok(dir)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root().join(p) })
        .unwrap_or_else(|| root().join("target"))
}

/// A test executable: its label (package/target), path and package folder.
struct TestBinary {
    label: String,
    exe: PathBuf,
    dir: PathBuf,
}

/// The test executables of `packages`. The whole workspace's tests are built, as `cargo test
/// --workspace --release` builds them: the same features, so the same artifacts, and no second
/// build of the dependencies.
fn test_binaries(packages: &[String]) -> Result<Vec<TestBinary>, String> {
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args([
            "test",
            "--workspace",
            "--release",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit());
    eprintln!("+ {cmd:?}");
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!("building the tests failed with {}", o.status));
    }
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // Test harnesses only: `--no-run` builds the examples too.
        if msg["profile"]["test"] != serde_json::Value::Bool(true) {
            continue;
        }
        let (Some(exe), Some(target), Some(manifest)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let package = package_name(Path::new(manifest))?;
        if packages.contains(&package) {
            v.push(TestBinary {
                label: format!("{package}/{target}"),
                exe: PathBuf::from(exe),
                dir: Path::new(manifest)
                    .parent()
                    .map_or_else(root, Path::to_path_buf),
            });
        }
    }
    for p in packages {
        if !v.iter().any(|b| b.label.starts_with(&format!("{p}/"))) {
            return Err(format!("gpu-emu: no test binary of a package named {p}"));
        }
    }
    Ok(v)
}

/// The `[package]` name of a manifest.
fn package_name(manifest: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let mut in_package = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(v) = line.strip_prefix("name").map(str::trim_start) {
                if let Some(v) = v.strip_prefix('=') {
                    return Ok(v.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    Err(format!("{}: no [package] name", manifest.display()))
}

/// The sanitizer runtime of the host compiler, to preload.
fn sanitizer_runtime(kind: &str) -> Result<PathBuf, String> {
    let lib = if kind == "address" {
        "libasan.so"
    } else {
        "libtsan.so"
    };
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let o = Command::new(&cxx)
        .arg(format!("-print-file-name={lib}"))
        .output()
        .map_err(|e| format!("{cxx}: {e}"))?;
    let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    if !p.is_absolute() || !p.exists() {
        return Err(format!(
            "{cxx} has no {lib} (install the compiler's sanitizer runtime, e.g. Debian's libasan8 / libtsan2)"
        ));
    }
    Ok(p)
}

/// `cargo xtask gpu-emu [--sanitize address|thread] [-p PACKAGE]... [-- TEST-ARGS]`.
pub fn gpu_emu(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let lib = emulator_lib_dir()?;
    let binaries = test_binaries(&o.packages)?;
    let ld_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", lib.display()),
        _ => lib.display().to_string(),
    };
    let cache = target_dir().join("gpu-emu/cache");
    let nccl_dir = target_dir().join("gpu-emu/nccl");
    std::fs::create_dir_all(&nccl_dir).map_err(|e| format!("{}: {e}", nccl_dir.display()))?;
    let preload = o.sanitize.as_deref().map(sanitizer_runtime).transpose()?;
    let start = std::time::Instant::now();
    let mut failed = Vec::new();
    let mut passed = 0usize;
    for TestBinary {
        label: name,
        exe,
        dir,
    } in &binaries
    {
        let mut cmd = if o.sanitize.as_deref() == Some("thread") {
            // ThreadSanitizer needs the fixed memory layout of a process without address-space
            // randomisation.
            let mut c = Command::new("setarch");
            c.args(["x86_64", "-R"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.current_dir(dir)
            .env("LD_LIBRARY_PATH", &ld_path)
            .env("SIMCLR_REQUIRE_GPU", "1")
            .env("SIMCLR_POISON_BUFFERS", "1")
            .env("SIMCLR_GPU_EMU_CACHE", &cache)
            // Two devices, so that the tests that need two GPUs (NCCL between them) run too.
            .env("SIMCLR_GPU_EMU_DEVICES", "2")
            // The emulated NCCL's rendezvous folders: under the build folder rather than
            // /dev/shm, since a test that leaves a rank blocked leaves its folder behind.
            .env("SIMCLR_GPU_EMU_NCCL_DIR", &nccl_dir)
            .args(["--show-output"])
            .args(&o.filter);
        if let (Some(kind), Some(rt)) = (&o.sanitize, &preload) {
            cmd.env("SIMCLR_GPU_EMU_SANITIZE", kind)
                .env("LD_PRELOAD", rt)
                .env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
                // Only the kernels are instrumented: the Rust side's synchronisation is
                // invisible to ThreadSanitizer, so its accesses through interceptors are not
                // judged.
                .env(
                    "TSAN_OPTIONS",
                    "halt_on_error=1:report_signal_unsafe=0:ignore_noninstrumented_modules=1",
                );
        }
        eprintln!("+ [{name}] {}", exe.display());
        let out = cmd
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{stdout}");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        passed += count_passed(&stdout);
        if !out.status.success() {
            failed.push(format!("{name} ({})", out.status));
        }
    }
    let mode = o
        .sanitize
        .map_or("no sanitizer".to_string(), |s| format!("{s} sanitizer"));
    eprintln!(
        "gpu-emu: {passed} tests passed in {} binaries on the emulated device ({mode}) in {:.0} s",
        binaries.len(),
        start.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "on the emulated device, failed: {}",
            failed.join(", ")
        ))
    }
}

/// The passed count of libtest's `test result:` line.
fn count_passed(out: &str) -> usize {
    out.lines()
        .filter_map(|l| l.strip_prefix("test result: "))
        .filter_map(|l| l.split("; ").next())
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|n| n.parse::<usize>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_libtest_results() {
        let out = "running 3 tests\ntest a ... ok\n\ntest result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n";
        assert_eq!(count_passed(out), 3);
        assert_eq!(
            count_passed("test result: FAILED. 2 passed; 1 failed; 0 ignored"),
            2
        );
    }

    #[test]
    fn package_names_come_from_the_manifests() {
        let r = root();
        assert_eq!(
            package_name(&r.join("crates/simclr-kernels/Cargo.toml")).unwrap(),
            "simclr-kernels"
        );
        // The root manifest holds [workspace] tables before its [package].
        assert_eq!(package_name(&r.join("Cargo.toml")).unwrap(), "simclr");
    }

    #[test]
    fn arguments() {
        let o = parse(&[
            "--sanitize".into(),
            "address".into(),
            "--".into(),
            "gpu_".into(),
        ])
        .unwrap();
        assert_eq!(o.sanitize.as_deref(), Some("address"));
        assert_eq!(o.packages, DEFAULT_PACKAGES);
        assert_eq!(o.filter, ["gpu_"]);
        assert!(parse(&["--sanitize".into(), "memory".into()]).is_err());
    }
}

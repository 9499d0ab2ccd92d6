//! The GPU commands: `check-kernels` (compile every kernel with NVRTC, no GPU needed) and
//! `gpu-check` (build what the GPU machine runs).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, flag, root, run};

/// The CUDA 13.0 wheels that give NVRTC and ptxas without a toolkit (DESIGN.md section 3).
const WHEELS: [&str; 2] = ["nvidia-cuda-nvrtc==13.0.88", "nvidia-cuda-nvcc==13.0.88"];
const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// `cargo xtask check-kernels [--python PY] [--tools DIR]`: installs the NVRTC and nvcc wheels
/// (once) into DIR (default target/cuda-tools), compiles every kernel module through the
/// library's own NVRTC path for sm_80 and sm_90, and reports registers, spills and shared memory
/// per kernel with ptxas. Fails when a kernel does not compile or assemble.
pub fn check_kernels(args: &[String]) -> Result<(), String> {
    let python = flag(args, "--python").unwrap_or_else(|| "python3".into());
    let tools = flag(args, "--tools")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/cuda-tools"));
    let lib = tools.join("nvidia/cu13/lib");
    let ptxas = tools.join("nvidia/cu13/bin/ptxas");
    if !lib.join("libnvrtc.so.13").exists() || !ptxas.exists() {
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&tools)
            .args(WHEELS))?;
    }
    let out = root().join("target/kernels-ptx");
    let _ = std::fs::remove_dir_all(&out);
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", lib.display()),
        _ => lib.display().to_string(),
    };
    run(cargo()
        .args([
            "run",
            "--quiet",
            "-p",
            "simclr-kernels",
            "--example",
            "check_kernels",
            "--",
        ])
        .arg(&out)
        .args(ARCHS)
        .env("LD_LIBRARY_PATH", &ld))?;
    let mut ptx: Vec<PathBuf> = std::fs::read_dir(&out)
        .map_err(|e| format!("{}: {e}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ptx"))
        .collect();
    ptx.sort();
    println!(
        "\n{:<40} {:<6} {:>5} {:>7} {:>7} {:>8}",
        "kernel", "arch", "regs", "spill-st", "spill-ld", "smem"
    );
    let mut spills = 0;
    for p in &ptx {
        let arch = p
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.rsplit('.').next())
            .ok_or_else(|| format!("{}: unexpected name", p.display()))?;
        let o = Command::new(&ptxas)
            .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
            .arg(p)
            .output()
            .map_err(|e| format!("{}: {e}", ptxas.display()))?;
        let log = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() {
            return Err(format!("ptxas rejected {}:\n{log}", p.display()));
        }
        for k in parse_ptxas(&log) {
            spills += k.spill_stores + k.spill_loads;
            println!(
                "{:<40} {:<6} {:>5} {:>7} {:>7} {:>8}",
                k.name, arch, k.registers, k.spill_stores, k.spill_loads, k.smem
            );
        }
    }
    println!(
        "\n{} PTX files assembled for {}; {spills} bytes of spills in all",
        ptx.len(),
        ARCHS.join(", ")
    );
    Ok(())
}

#[derive(Debug, Default, PartialEq)]
struct KernelInfo {
    name: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

/// The per-kernel lines of `ptxas -v`.
fn parse_ptxas(log: &str) -> Vec<KernelInfo> {
    let num_before = |line: &str, unit: &str| -> u32 {
        line.find(unit)
            .and_then(|i| line[..i].split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut out: Vec<KernelInfo> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelInfo {
                name,
                ..Default::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("spill stores") {
                k.spill_stores = num_before(line, "bytes spill stores");
                k.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers");
                k.smem = num_before(line, "bytes smem");
            }
        }
    }
    out
}

/// An executable that cargo built, from its `--message-format=json` output.
fn built_executables(cmd: &mut Command) -> Result<Vec<(String, PathBuf)>, String> {
    eprintln!("+ {cmd:?}");
    let o = cmd
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!("{cmd:?} failed with {}", o.status));
    }
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(exe), Some(name)) =
            (msg["executable"].as_str(), msg["target"]["name"].as_str())
        {
            v.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(v)
}

/// The most `gpu-check/` may weigh: it travels to the GPU machine whole, under a limit of
/// 64 MiB, and a margin keeps room for the fixtures and scripts beside it.
const MAX_FOLDER_MIB: f64 = 56.0;

/// What `run.sh` runs, by the names it gives them.
const EXPECTED: [&str; 7] = [
    "test-kernels-gpu",
    "test-nn-cuda",
    "test-nn-nccl_faults",
    "test-parity",
    "bench-gpu_kernels",
    "bench-gpu_train_step",
    "simclr",
];

fn copy_exe(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to).map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
    // Debug info is most of a release test binary (the release profile keeps line tables); the
    // GPU machine only needs to run it, and backtraces keep their function names.
    let stripped = ["strip", "objcopy"].iter().any(|tool| {
        Command::new(tool)
            .arg("--strip-debug")
            .arg(to)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !stripped {
        eprintln!(
            "warning: could not strip the debug info of {} (no strip or objcopy)",
            to.display()
        );
    }
    Ok(())
}

/// The bytes of every file under `dir`, recursively (links not followed).
fn folder_size(dir: &Path) -> Result<u64, String> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let meta = std::fs::symlink_metadata(e.path())
            .map_err(|err| format!("{}: {err}", e.path().display()))?;
        total += if meta.is_dir() {
            folder_size(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// `cargo xtask gpu-check`: builds the release GPU test and benchmark binaries and the `simclr`
/// program into the git-ignored `gpu-check/` folder with `run.sh`, the one script to run on the
/// GPU machine. Fails when a binary is missing or the folder is over [`MAX_FOLDER_MIB`].
pub fn gpu_check(_args: &[String]) -> Result<(), String> {
    let dir = root().join("gpu-check");
    let bin = dir.join("bin");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    let tests = built_executables(cargo().args([
        "test",
        "--release",
        "--no-run",
        "--message-format=json",
        "-p",
        "simclr-kernels",
        "--test",
        "gpu",
    ]))?;
    let nn_tests = built_executables(cargo().args([
        "test",
        "--release",
        "--no-run",
        "--message-format=json",
        "-p",
        "simclr-nn",
        "--test",
        "cuda",
        "--test",
        "nccl_faults",
    ]))?;
    // The PyTorch parity fixtures, on the GPU too (the fixtures travel with the repository).
    let parity = built_executables(cargo().args([
        "test",
        "--release",
        "--no-run",
        "--message-format=json",
        "-p",
        "simclr",
        "--test",
        "parity",
    ]))?;
    let benches = built_executables(cargo().args([
        "bench",
        "--no-run",
        "--message-format=json",
        "-p",
        "simclr",
        "--bench",
        "gpu_kernels",
        "--bench",
        "gpu_train_step",
    ]))?;
    // The program itself, for an end-to-end run on the GPU (GPU augmentation, bf16, the
    // linear evaluation).
    let program = built_executables(cargo().args([
        "build",
        "--release",
        "--message-format=json",
        "-p",
        "simclr-cli",
        "--bin",
        "simclr",
    ]))?;
    let named = program
        .iter()
        .map(|(_, exe)| ("simclr".to_string(), exe))
        .chain(tests.iter().map(|(n, e)| (format!("test-kernels-{n}"), e)))
        .chain(nn_tests.iter().map(|(n, e)| (format!("test-nn-{n}"), e)))
        .chain(parity.iter().map(|(n, e)| (format!("test-{n}"), e)))
        .chain(benches.iter().map(|(n, e)| (format!("bench-{n}"), e)));
    for (name, exe) in named {
        copy_exe(exe, &bin.join(name))?;
    }
    let missing: Vec<&str> = EXPECTED
        .iter()
        .copied()
        .filter(|n| !bin.join(n).exists())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "cargo did not build {} (run.sh expects them in gpu-check/bin)",
            missing.join(", ")
        ));
    }
    let script = dir.join("run.sh");
    std::fs::write(&script, include_str!("../assets/gpu-check.sh"))
        .map_err(|e| format!("{}: {e}", script.display()))?;
    // A syntax error would only show on the GPU machine.
    if let Ok(s) = Command::new("bash").arg("-n").arg(&script).status() {
        if !s.success() {
            return Err(format!(
                "bash -n {}: the script does not parse",
                script.display()
            ));
        }
    }
    let cmp = root().join("benches/torch_gpu_compare.py");
    std::fs::copy(&cmp, dir.join("torch_gpu_compare.py"))
        .map_err(|e| format!("{}: {e}", cmp.display()))?;
    let ratio = root().join("benches/step_ratio.py");
    std::fs::copy(&ratio, dir.join("step_ratio.py"))
        .map_err(|e| format!("{}: {e}", ratio.display()))?;
    // PyTorch's training step, the baseline of the step benchmark, from shared/baselines beside
    // the repository when it is there.
    let baseline = root().join("../shared/baselines/torch_gpu_baseline.py");
    if baseline.exists() {
        std::fs::copy(&baseline, dir.join("torch_gpu_baseline.py"))
            .map_err(|e| format!("{}: {e}", baseline.display()))?;
    } else {
        println!(
            "{} not found: run.sh will skip PyTorch's training step",
            baseline.display()
        );
    }
    let mib = folder_size(&dir)? as f64 / 1048576.0;
    if mib > MAX_FOLDER_MIB {
        return Err(format!(
            "gpu-check/ weighs {mib:.1} MiB, over the {MAX_FOLDER_MIB} MiB it may take to the \
             GPU machine"
        ));
    }
    println!(
        "gpu-check/ ready ({} binaries, {mib:.1} MiB of at most {MAX_FOLDER_MIB}): on the GPU \
         machine, with gpu-check beside the repository's files, run `bash gpu-check/run.sh`",
        EXPECTED.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'ntxent_forward_bf16' for 'sm_80'\n\
ptxas info    : Function properties for ntxent_forward_bf16\n\
    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 64 registers, used 1 barriers, 10240 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'relu_f32' for 'sm_80'\n\
ptxas info    : Function properties for relu_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 14 registers, used 0 barriers, 368 bytes cmem[0]\n";
        let k = parse_ptxas(log);
        assert_eq!(
            k,
            vec![
                KernelInfo {
                    name: "ntxent_forward_bf16".into(),
                    registers: 64,
                    spill_stores: 8,
                    spill_loads: 12,
                    smem: 10240
                },
                KernelInfo {
                    name: "relu_f32".into(),
                    registers: 14,
                    ..Default::default()
                },
            ]
        );
    }
}

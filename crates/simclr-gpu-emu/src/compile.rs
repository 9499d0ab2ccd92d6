//! The emulated NVRTC's compiler: CUDA C++ source to a host shared object.
//!
//! The pipeline (see `emu-contract.md`):
//!
//! 1. The source is preprocessed by the host compiler (`c++ -E`) with `src/runtime/emu_runtime.h`
//!    `-include`d. That header turns `__global__`, `__launch_bounds__(..)` and `__shared__` into
//!    marker tokens, so kernels stamped out by macros are seen as the compiler sees them.
//! 2. The preprocessed text is rewritten in place, line count unchanged (so the line markers
//!    keep diagnostics on the source's own file names and lines): the markers are consumed
//!    (kernels and their launch bounds recorded, `__shared__` variables made block statics,
//!    each function-scope one followed by a marker statement that names it in the assembly),
//!    and each inline `asm` statement becomes an
//!    `__emu_asm(..)` call that the runtime's PTX emulation executes.
//! 3. A registration block is appended (kernel names, parameter sizes deduced from each kernel's
//!    type, entry points unpacking `void** params`) and the result is compiled to assembly with
//!    `c++ -S -O2 -march=native -fPIC`.
//! 4. The assembly gives each kernel's static shared memory (see the module `shared` for the rule): a
//!    kernel over sm_90's 48 KiB fails the compilation with ptxas' message, as NVRTC does when it
//!    builds for a real architecture; the figures are appended as the table
//!    `__emu_kernel_shared` that `emu_kernel_info` serves.
//! 5. The assembly is assembled and linked (`-shared`) into the cache.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

mod rewrite;
pub(crate) mod shared;

/// Names this compiler's pipeline in the cache key: changed when the objects it makes change
/// with the same inputs and runtime headers.
const PIPELINE: &str = "simclr-gpu-emu pipeline 2 (per-kernel static shared memory)";

/// The runtime prelude, `-include`d before every module.
pub const RUNTIME_HEADER: &str = include_str!("runtime/emu_runtime.h");
/// The PTX instruction emulation, `#include`d by [`RUNTIME_HEADER`].
pub const PTX_HEADER: &str = include_str!("runtime/emu_ptx.h");

/// A successful compilation.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The host shared object holding the kernels and the runtime (in a cache folder).
    pub object: PathBuf,
    /// Compiler diagnostics (warnings), in NVRTC's log form; empty when none.
    pub log: String,
    /// The `extern "C" __global__` kernels the module defines, in source order.
    pub kernels: Vec<String>,
}

/// An NVRTC option the emulator does not know, or a bad value: NVRTC_ERROR_INVALID_OPTION.
#[derive(Clone, Debug)]
pub struct OptionError(pub String);

/// Why a compilation failed.
#[derive(Clone, Debug)]
pub enum CompileError {
    /// NVRTC_ERROR_INVALID_OPTION; the message for the log.
    InvalidOption(String),
    /// NVRTC_ERROR_COMPILATION; the log.
    Compilation(String),
}

impl From<OptionError> for CompileError {
    fn from(e: OptionError) -> Self {
        CompileError::InvalidOption(e.0)
    }
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompileError::InvalidOption(m) => write!(f, "invalid option: {m}"),
            CompileError::Compilation(m) => write!(f, "compilation failed:\n{m}"),
        }
    }
}

impl std::error::Error for CompileError {}

/// The NVRTC options, as the host compiler will see them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `--ftz=true`: f32 denormals flushed while the kernels run.
    pub ftz: bool,
    /// `--fmad` (default true): contract multiply-adds into FMAs.
    pub fmad: bool,
    /// The C++ standard (`c++17` at least: the runtime needs it).
    pub std: String,
    /// `-D` definitions, `NAME` or `NAME=VALUE`.
    pub defines: Vec<String>,
    /// `-I` folders.
    pub include_paths: Vec<String>,
    /// `-G`: host debug information, lower optimisation.
    pub debug: bool,
}

fn bool_value(opt: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(OptionError(format!(
            "{opt}: expected true or false, got `{v}`"
        ))),
    }
}

/// Parses NVRTC's options (the forms `--name=value`, `-name=value`, and for `-D`/`-I` the value
/// attached or as the next option).
pub fn parse_options(options: &[String]) -> Result<Options, OptionError> {
    let mut o = Options {
        fmad: true,
        std: "c++17".into(),
        ..Default::default()
    };
    let mut it = options.iter().map(|s| s.trim());
    while let Some(opt) = it.next() {
        let (key, val) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = |v: Option<&'_ str>| -> Result<String, OptionError> {
            v.map(str::to_string)
                .ok_or_else(|| OptionError(format!("{opt}: a value is required")))
        };
        match key {
            "--gpu-architecture" | "-arch" | "--gpu-arch" => {
                let v = need(val)?;
                let ok = ["sm_", "compute_"]
                    .iter()
                    .filter_map(|p| v.strip_prefix(p))
                    .any(|n| {
                        !n.is_empty()
                            && n.trim_end_matches(['a', 'f'])
                                .chars()
                                .all(|c| c.is_ascii_digit())
                    });
                if !ok {
                    return Err(OptionError(format!(
                        "{opt}: unknown GPU architecture `{v}`"
                    )));
                }
            }
            "--ftz" | "-ftz" => o.ftz = bool_value(opt, &need(val)?)?,
            "--fmad" | "-fmad" => o.fmad = bool_value(opt, &need(val)?)?,
            "--prec-div" | "-prec-div" | "--prec-sqrt" | "-prec-sqrt" => {
                bool_value(opt, &need(val)?)?;
            }
            "--use_fast_math" | "-use_fast_math" | "--use-fast-math" => {
                o.ftz = true;
                o.fmad = true;
            }
            "--std" | "-std" => {
                let v = need(val)?;
                o.std = match v.as_str() {
                    // The runtime is C++17: older standards compile as C++17 (a superset for
                    // the code NVRTC accepts in practice).
                    "c++03" | "c++11" | "c++14" | "c++17" => "c++17".into(),
                    "c++20" => "c++20".into(),
                    _ => {
                        return Err(OptionError(format!(
                            "{opt}: unknown language standard `{v}`"
                        )))
                    }
                };
            }
            "--define-macro" => o.defines.push(need(val)?),
            "--include-path" => o.include_paths.push(need(val)?),
            "--maxrregcount" | "-maxrregcount" => {
                need(val)?
                    .parse::<u32>()
                    .map_err(|_| OptionError(format!("{opt}: expected a number")))?;
            }
            "-lineinfo"
            | "--generate-line-info"
            | "--extra-device-vectorization"
            | "-extra-device-vectorization"
            | "-default-device"
            | "--device-as-default-execution-space"
                if val.is_none() => {}
            "--device-debug" | "-G" if val.is_none() => o.debug = true,
            _ if opt == "-D" => o.defines.push(
                it.next()
                    .ok_or_else(|| OptionError("-D: a value is required".into()))?
                    .to_string(),
            ),
            _ if opt == "-I" => o.include_paths.push(
                it.next()
                    .ok_or_else(|| OptionError("-I: a value is required".into()))?
                    .to_string(),
            ),
            _ if opt.starts_with("-D") && opt.len() > 2 => o.defines.push(opt[2..].to_string()),
            _ if opt.starts_with("-I") && opt.len() > 2 => {
                o.include_paths.push(opt[2..].to_string())
            }
            _ => return Err(OptionError(format!("unrecognized option: {opt}"))),
        }
    }
    Ok(o)
}

/// The sanitizer the kernels are built with, from `SIMCLR_GPU_EMU_SANITIZE`.
fn sanitizer() -> Result<Option<&'static str>, CompileError> {
    match std::env::var("SIMCLR_GPU_EMU_SANITIZE").ok().as_deref() {
        None | Some("") => Ok(None),
        Some("address") => Ok(Some("address")),
        Some("thread") => Ok(Some("thread")),
        Some(v) => Err(CompileError::InvalidOption(format!(
            "SIMCLR_GPU_EMU_SANITIZE={v}: expected `address` or `thread`"
        ))),
    }
}

fn compiler() -> String {
    std::env::var("CXX")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "c++".into())
}

fn compiler_version(cxx: &str) -> String {
    static V: OnceLock<std::sync::Mutex<Vec<(String, String)>>> = OnceLock::new();
    let m = V.get_or_init(Default::default);
    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, v)) = m.iter().find(|(c, _)| c == cxx) {
        return v.clone();
    }
    let v = Command::new(cxx)
        .env_remove("LD_PRELOAD")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    m.push((cxx.to_string(), v.clone()));
    v
}

/// The cache folder: `$SIMCLR_GPU_EMU_CACHE`, else `<temp>/simclr-gpu-emu-cache`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("SIMCLR_GPU_EMU_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => std::env::temp_dir().join("simclr-gpu-emu-cache"),
    }
}

fn key_of(parts: &[&str]) -> String {
    // Two differently seeded 64-bit hashes: collisions of 128 bits are not a concern here.
    let mut out = String::new();
    for seed in [0x5eed_u64, 0xc0ffee] {
        let mut h = DefaultHasher::new();
        seed.hash(&mut h);
        for p in parts {
            p.len().hash(&mut h);
            p.hash(&mut h);
        }
        let _ = write!(out, "{:016x}", h.finish());
    }
    out
}

fn unique_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", unique_suffix()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Turns the host compiler's diagnostics into NVRTC's log form: `file(line): error: message`,
/// paths relative to the work folder, carets and include chains left out.
fn nvrtc_log(stderr: &str, work: &Path) -> String {
    let prefix = format!("{}/", work.display());
    let mut out = String::new();
    for line in stderr.lines() {
        let line = line.replace(&prefix, "");
        if line.starts_with("In file included from") || line.trim_start().starts_with("from ") {
            continue;
        }
        // file:line:col: kind: message
        let mut parts = line.splitn(4, ':');
        let (f, l, c, rest) = (parts.next(), parts.next(), parts.next(), parts.next());
        if let (Some(f), Some(l), Some(c), Some(rest)) = (f, l, c, rest) {
            if l.parse::<u32>().is_ok() && c.parse::<u32>().is_ok() {
                let _ = writeln!(out, "{f}({l}):{rest}");
                continue;
            }
        }
        if let (Some(f), Some(l), Some(rest)) = (
            line.split(':').next(),
            line.split(':').nth(1),
            line.splitn(3, ':').nth(2),
        ) {
            if l.parse::<u32>().is_ok() {
                let _ = writeln!(out, "{f}({l}):{rest}");
                continue;
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn safe_relative(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if name.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    Some(p.to_path_buf())
}

/// Compiles one NVRTC program.
///
/// `source`: exactly what nvrtcCreateProgram got; `name`: its program name (NVRTC's default is
/// `default_program`); `headers`: nvrtcCreateProgram's (include name, contents) pairs;
/// `options`: nvrtcCompileProgram's options, as given. The object is cached by a key over all
/// of these, the runtime headers, the host compiler's version and the sanitizer.
pub fn compile(
    source: &str,
    name: &str,
    headers: &[(String, String)],
    options: &[String],
) -> Result<Compiled, CompileError> {
    let opts = parse_options(options)?;
    let san = sanitizer()?;
    let cxx = compiler();
    let version = compiler_version(&cxx);
    let mut parts: Vec<&str> = vec![
        PIPELINE,
        source,
        name,
        RUNTIME_HEADER,
        PTX_HEADER,
        &version,
        san.unwrap_or("none"),
        &cxx,
    ];
    let joined_opts = options.join("\u{1}");
    parts.push(&joined_opts);
    for (n, c) in headers {
        parts.push(n);
        parts.push(c);
    }
    let key = key_of(&parts);
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        CompileError::Compilation(format!(
            "cannot create the cache folder {}: {e}",
            dir.display()
        ))
    })?;
    let object = dir.join(format!("{key}.so"));
    let meta = dir.join(format!("{key}.meta"));
    if object.exists() {
        if let Ok(m) = std::fs::read_to_string(&meta) {
            if let Some((kernels, log)) = m.split_once("\n\u{0}\n") {
                return Ok(Compiled {
                    object,
                    log: log.to_string(),
                    kernels: kernels.lines().map(str::to_string).collect(),
                });
            }
        }
    }
    let work = dir.join(format!("work-{}", unique_suffix()));
    let r = compile_in(
        &work, source, name, headers, &opts, san, &cxx, &object, &meta,
    );
    let _ = std::fs::remove_dir_all(&work);
    r
}

#[allow(clippy::too_many_arguments)]
fn compile_in(
    work: &Path,
    source: &str,
    name: &str,
    headers: &[(String, String)],
    opts: &Options,
    san: Option<&str>,
    cxx: &str,
    object: &Path,
    meta: &Path,
) -> Result<Compiled, CompileError> {
    let io = |what: &str, e: std::io::Error| CompileError::Compilation(format!("{what}: {e}"));
    std::fs::create_dir_all(work).map_err(|e| io("cannot create the work folder", e))?;
    let rt = work.join("emu-runtime");
    std::fs::create_dir_all(&rt).map_err(|e| io("cannot create the work folder", e))?;
    std::fs::write(rt.join("emu_runtime.h"), RUNTIME_HEADER)
        .map_err(|e| io("cannot write the runtime", e))?;
    std::fs::write(rt.join("emu_ptx.h"), PTX_HEADER)
        .map_err(|e| io("cannot write the runtime", e))?;
    let src_name = safe_relative(name)
        .filter(|p| p.components().count() == 1)
        .unwrap_or_else(|| PathBuf::from("default_program"));
    std::fs::write(work.join(&src_name), source).map_err(|e| io("cannot write the source", e))?;
    for (n, c) in headers {
        if let Some(p) = safe_relative(n) {
            let p = work.join(p);
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            std::fs::write(&p, c).map_err(|e| io("cannot write a header", e))?;
        }
    }

    // Flags shared by both steps (the sanitizer's predefined macros select runtime code).
    let mut common: Vec<String> = vec![
        format!("-std={}", opts.std),
        "-fdiagnostics-plain-output".into(),
    ];
    match san {
        Some(s) => common.extend([format!("-fsanitize={s}"), "-g".into(), "-O1".into()]),
        None if opts.debug => common.extend(["-g".into(), "-O1".into()]),
        None => common.push("-O2".into()),
    }
    if opts.ftz {
        common.push("-DEMU_FTZ=1".into());
    }

    // 1. Preprocess.
    // The host compiler must not run under a sanitizer runtime preloaded into this process.
    let pre = Command::new(cxx)
        .env_remove("LD_PRELOAD")
        .current_dir(work)
        .args(&common)
        .arg("-E")
        .arg("-x")
        .arg("c++")
        .args(opts.defines.iter().map(|d| format!("-D{d}")))
        .arg("-I.")
        .args(opts.include_paths.iter().map(|d| format!("-I{d}")))
        .arg("-include")
        .arg("emu-runtime/emu_runtime.h")
        .arg(&src_name)
        .output()
        .map_err(|e| {
            CompileError::Compilation(format!("cannot run the host compiler `{cxx}`: {e}"))
        })?;
    let pre_err = String::from_utf8_lossy(&pre.stderr).into_owned();
    if !pre.status.success() {
        return Err(CompileError::Compilation(nvrtc_log(&pre_err, work)));
    }
    let text = String::from_utf8_lossy(&pre.stdout).into_owned();

    // 2. Rewrite.
    let rw = rewrite::rewrite(&text).map_err(CompileError::Compilation)?;
    let mut unit = rw.text;
    unit.push_str(&rewrite::registration(&rw.kernels));
    let unit_path = work.join("unit.ii");
    std::fs::write(&unit_path, &unit).map_err(|e| io("cannot write the unit", e))?;

    // 3. Compile to assembly.
    let out = Command::new(cxx)
        .env_remove("LD_PRELOAD")
        .current_dir(work)
        .args(&common)
        .args([
            "-S",
            "-march=native",
            "-fPIC",
            "-fvisibility=hidden",
            "-fno-strict-aliasing",
            if opts.fmad {
                "-ffp-contract=fast"
            } else {
                "-ffp-contract=off"
            },
            "-x",
            "c++-cpp-output",
        ])
        .arg("unit.ii")
        .arg("-o")
        .arg("unit.s")
        .output()
        .map_err(|e| {
            CompileError::Compilation(format!("cannot run the host compiler `{cxx}`: {e}"))
        })?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut log = nvrtc_log(&format!("{pre_err}{err}"), work);
    if !out.status.success() {
        return Err(CompileError::Compilation(log));
    }
    let kernels: Vec<String> = rw.kernels.iter().map(|k| k.name.clone()).collect();

    // 4. Each kernel's static shared memory (refused over sm_90's 48 KiB, as ptxas does), the
    //    figures appended to the assembly for emu_kernel_info.
    let asm = std::fs::read(work.join("unit.s")).map_err(|e| io("cannot read the assembly", e))?;
    let analysis = shared::analyse(&String::from_utf8_lossy(&asm), &kernels);
    let refused = shared::over_limit(&kernels, &analysis.per_kernel);
    if !refused.is_empty() {
        log.push_str(&refused);
        return Err(CompileError::Compilation(log));
    }
    std::fs::write(work.join("module.s"), analysis.text)
        .map_err(|e| io("cannot write the assembly", e))?;

    // 5. Assemble and link.
    let tmp_obj = object.with_extension(format!("so.tmp-{}", unique_suffix()));
    let mut link = Command::new(cxx);
    link.env_remove("LD_PRELOAD")
        .current_dir(work)
        .args(["-fPIC", "-shared"]);
    if let Some(s) = san {
        link.arg(format!("-fsanitize={s}"));
    }
    let out = link
        // The C++ driver adds its libraries for C++ inputs only.
        .args([
            "-x",
            "assembler",
            "module.s",
            "-x",
            "none",
            "-lstdc++",
            "-lm",
            "-o",
        ])
        .arg(&tmp_obj)
        .output()
        .map_err(|e| {
            CompileError::Compilation(format!("cannot run the host compiler `{cxx}`: {e}"))
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp_obj);
        log.push_str(&nvrtc_log(&String::from_utf8_lossy(&out.stderr), work));
        return Err(CompileError::Compilation(log));
    }
    let meta_text = format!("{}\n\u{0}\n{log}", kernels.join("\n"));
    write_atomic(meta, meta_text.as_bytes()).map_err(|e| io("cannot write the cache", e))?;
    std::fs::rename(&tmp_obj, object).map_err(|e| io("cannot write the cache", e))?;
    Ok(Compiled {
        object: object.to_path_buf(),
        log,
        kernels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(v: &[&str]) -> Result<Options, OptionError> {
        parse_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options() {
        let p = o(&[
            "--gpu-architecture=sm_90",
            "--ftz=true",
            "--fmad=false",
            "-DX=1",
            "-D",
            "Y",
            "--std=c++14",
        ])
        .unwrap();
        assert!(p.ftz && !p.fmad);
        assert_eq!(p.defines, ["X=1", "Y"]);
        assert_eq!(p.std, "c++17");
        assert!(o(&[
            "-arch=compute_80",
            "-lineinfo",
            "--use_fast_math",
            "--maxrregcount=64"
        ])
        .is_ok());
        assert!(o(&["--frobnicate"]).is_err());
        assert!(o(&["--ftz=maybe"]).is_err());
        assert!(o(&["-arch=gfx90a"]).is_err());
    }

    #[test]
    fn shared_memory_per_kernel_from_the_assembly() {
        // k1 calls f (a template instantiation whose statics are COMDAT, one of them marked),
        // k2 has its own local static (common form) and reaches g through an alias.
        let asm = "\t.text\n\t.globl\tk1\nk1:\n\tjmp\t_Z1fILi1EEvPf@PLT\n\t.size\tk1, .-k1\n\
            \t.section\t.text._Z1fILi1EEvPf,\"axG\",@progbits,_Z1fILi1EEvPf,comdat\n_Z1fILi1EEvPf:\n\
            #APP\n\t# __emu_shared _ZZ1fE2As(%rip) 8+_ZZ1fE1w(%rip)\n#NO_APP\n\
            \tleaq\t_ZZ1fE2As(%rip), %rdx\n\t.section\t.rodata\n.L4:\n\t.long\t.L5-.L4\n\
            \t.section\t.text._Z1fILi1EEvPf\n\tmovl\t$3, _ZZ1fE1w(%rip)\n\tret\n\
            \t.text\nk2:\n\t# __emu_shared _ZZ2k2E1s(%rip)\n\tcall\tgalias\n\tret\n\
            \t.set\tgalias, g\ng:\n\tleaq\t_ZZL1gE1d(%rip), %rax\n\tret\n\
            \t.section\t.bss._ZZ1fE2As,\"awG\",@nobits,_ZZ1fE2As,comdat\n\t.align 16\n\
            \t.size\t_ZZ1fE2As, 512\n_ZZ1fE2As:\n\t.zero\t512\n\
            \t.section\t.bss._ZZ1fE1w,\"awG\",@nobits,_ZZ1fE1w,comdat\n\t.size\t_ZZ1fE1w, 4\n\
            _ZZ1fE1w:\n\t.zero\t4\n\t.local\t_ZZ2k2E1s\n\t.comm\t_ZZ2k2E1s,40960,32\n\
            \t.section\temu_shared,\"aw\"\n\t.size\t_ZZL1gE1d, 64\n_ZZL1gE1d:\n\t.zero\t64\n";
        let kernels = ["k1".to_string(), "k2".into(), "k3".into()];
        let a = shared::analyse(asm, &kernels);
        assert_eq!(a.per_kernel, [Some(516), Some(40960 + 64), None]);
        assert!(a.text.contains(".Lemu_shared_vars1:\n\t.quad\t_ZZ2k2E1s\n\t.quad\t40960\n\t.quad\t_ZZL1gE1d\n\t.quad\t64\n\t.quad\t0\n\t.quad\t0\n"), "{}", a.text);
        assert!(
            a.text.contains(
                "__emu_kernel_shared:\n\t.quad\t516\n\t.quad\t41024\n\t.quad\t18446744073709551615\n\t.quad\t0\n"
            ),
            "{}",
            a.text
        );
        // The COMDAT and common definitions now sit in emu_shared.
        let moved = &a.text[a.text.rfind("\t.section\temu_shared").unwrap()..];
        for l in [
            "_ZZ1fE2As:\n\t.zero\t512",
            "_ZZ1fE1w:\n\t.zero\t4",
            "_ZZ2k2E1s:\n\t.zero 40960",
        ] {
            assert!(moved.contains(l), "{l}: {moved}");
        }
        assert!(!a.text.contains(".comm"));
        assert_eq!(a.text.matches("_ZZ1fE2As:").count(), 1);
        let log = shared::over_limit(&kernels, &[Some(49152), Some(51200), None]);
        assert_eq!(
            log,
            "ptxas error   : Entry function 'k2' uses too much shared data (0xc800 bytes, 0xc000 max)\n"
        );
    }

    #[test]
    fn log_form() {
        let l = nvrtc_log("/w/x/a.cu:12:5: error: bad thing\n", Path::new("/w/x"));
        assert_eq!(l, "a.cu(12): error: bad thing\n");
    }
}

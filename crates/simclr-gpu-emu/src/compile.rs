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

/// The static shared memory of each kernel, read from the module's assembly.
///
/// The rule (what `emu_kernel_info` reports as a kernel's static shared bytes, and what is held
/// against the 48 KiB an H100 allows): the sum of the sizes (`.size`, no padding between them)
/// of the distinct `__shared__` variables that the kernel's code reaches in the compiled
/// module: the kernel's own function and, transitively, every function or data object its code
/// names (calls, including of non-inlined device functions and template instantiations, each
/// instantiation with its own variables). Variables are known as the symbols defined in the
/// `emu_shared` section (non-template, non-inline code) or named by the marker statements that
/// the rewrite adds after each function-scope `__shared__` declaration (see
/// `rewrite::SHARED_MARKER`; they also cover statics of templates and inline functions, whose
/// section attribute the compiler drops because they are COMDAT: this pass moves those into
/// `emu_shared`, so that the runtime poisons them at each block's start as well). A variable
/// declared but optimised away, as ptxas would drop it, is not counted unless its declaration's
/// marker survives: a declaration in code the kernel reaches counts, even in a branch never
/// taken, as on the GPU.
pub(crate) mod shared {
    use std::collections::{HashMap, HashSet};
    use std::fmt::Write as _;

    use super::rewrite::SHARED_MARKER;

    /// The static shared memory a kernel may declare on sm_90 (ptxas refuses more).
    pub const STATIC_LIMIT: u64 = 48 * 1024;

    /// The result of [`analyse`].
    pub struct Analysis {
        /// The assembly, with COMDAT shared variables moved into `emu_shared` and the table
        /// `__emu_kernel_shared` (one `u64` per kernel, `u64::MAX` when unknown) appended.
        pub text: String,
        /// Each kernel's static shared bytes, `None` when its code was not found.
        pub per_kernel: Vec<Option<u64>>,
    }

    fn is_sym_start(c: u8) -> bool {
        c == b'_' || c == b'.' || c == b'$' || c.is_ascii_alphabetic()
    }
    fn is_sym(c: u8) -> bool {
        is_sym_start(c) || c.is_ascii_digit()
    }

    /// The symbol-like words of an assembly line (string literals and registers left out).
    fn words(line: &str) -> impl Iterator<Item = &str> {
        let b = line.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'"' {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            } else if is_sym_start(c) && (i == 0 || !matches!(b[i - 1], b'%' | b'\\')) {
                let s = i;
                while i < b.len() && is_sym(b[i]) {
                    i += 1;
                }
                out.push(&line[s..i]);
            } else if c.is_ascii_digit() || c == b'%' {
                // Numbers (`8+sym`, `1b`) and registers.
                i += 1;
                while i < b.len() && is_sym(b[i]) {
                    i += 1;
                }
            } else {
                i += 1;
            }
        }
        out.into_iter()
    }

    /// The section a `.section` / `.pushsection` directive's operands name.
    fn section_name(ops: &str) -> String {
        let ops = ops.trim();
        if let Some(q) = ops.strip_prefix('"') {
            return q.split('"').next().unwrap_or("").to_string();
        }
        ops.split([',', ' ', '\t']).next().unwrap_or("").to_string()
    }

    struct Region<'a> {
        refs: Vec<&'a str>,
    }

    fn new_region(regions: &mut Vec<Region<'_>>) -> usize {
        regions.push(Region { refs: Vec::new() });
        regions.len() - 1
    }

    fn switch(to: String, section: &mut String, previous: &mut String) {
        *previous = std::mem::replace(section, to);
    }

    /// A definition to move into `emu_shared`: its lines, and the alignment directive before it.
    struct Moved {
        lines: std::ops::Range<usize>,
        align: Option<String>,
        comm: Option<(String, u64, u64)>,
    }

    /// Reads the assembly `asm` of a module whose kernels are `kernels` (their `extern "C"`
    /// names are their labels).
    pub fn analyse(asm: &str, kernels: &[String]) -> Analysis {
        let lines: Vec<&str> = asm.lines().collect();
        let mut regions: Vec<Region<'_>> = Vec::new();
        let mut region_of: HashMap<&str, usize> = HashMap::new();
        // The region each section is in (a function's code resumes after a jump table).
        let mut cur: HashMap<String, Option<usize>> = HashMap::new();
        let mut section = String::from(".text");
        let mut previous = section.clone();
        let mut stack: Vec<String> = Vec::new();
        let mut sizes: HashMap<&str, u64> = HashMap::new();
        let mut in_shared_section: HashSet<&str> = HashSet::new();
        let mut marked: HashSet<&str> = HashSet::new();
        let mut defs: HashMap<&str, Moved> = HashMap::new();
        let mut last_align: Option<String> = None;
        let mut shared_declared = false;
        let mut idx = 0;
        while idx < lines.len() {
            let raw = lines[idx];
            let line = raw.trim();
            let here = idx;
            idx += 1;
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix(SHARED_MARKER) {
                let r = cur.get(&section).copied().flatten();
                for w in words(rest) {
                    marked.insert(w);
                    if let Some(r) = r {
                        regions[r].refs.push(w);
                    }
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (word, ops) = match line.find([' ', '\t']) {
                Some(p) => (&line[..p], line[p..].trim()),
                None => (line, ""),
            };
            // A label.
            if let Some(name) = word.strip_suffix(':') {
                if ops.is_empty() && !name.is_empty() && !name.starts_with(".L") {
                    let r = new_region(&mut regions);
                    region_of.insert(name, r);
                    cur.insert(section.clone(), Some(r));
                    if section == "emu_shared" {
                        in_shared_section.insert(name);
                    } else {
                        // Its data: the lines up to the next that is not a data directive.
                        let mut end = idx;
                        while end < lines.len() {
                            let d = lines[end].trim_start();
                            if [".zero", ".space", ".skip"]
                                .iter()
                                .any(|p| d.starts_with(p))
                            {
                                end += 1;
                            } else {
                                break;
                            }
                        }
                        defs.insert(
                            name,
                            Moved {
                                lines: here..end,
                                align: last_align.clone(),
                                comm: None,
                            },
                        );
                    }
                    last_align = None;
                    continue;
                }
            }
            match word {
                ".section" | ".pushsection" => {
                    let to = section_name(ops);
                    if to == "emu_shared" {
                        shared_declared = true;
                    }
                    if word == ".pushsection" {
                        stack.push(section.clone());
                    }
                    switch(to, &mut section, &mut previous);
                    last_align = None;
                }
                ".text" | ".data" | ".bss" => {
                    switch(word.to_string(), &mut section, &mut previous);
                    last_align = None;
                }
                ".previous" => {
                    let p = previous.clone();
                    switch(p, &mut section, &mut previous);
                    last_align = None;
                }
                ".popsection" => {
                    if let Some(p) = stack.pop() {
                        switch(p, &mut section, &mut previous);
                    }
                    last_align = None;
                }
                ".align" | ".p2align" | ".balign" => last_align = Some(raw.to_string()),
                ".size" => {
                    let mut it = ops.splitn(2, ',');
                    if let (Some(n), Some(v)) = (it.next(), it.next()) {
                        if let Ok(v) = v.trim().parse::<u64>() {
                            sizes.insert(n.trim(), v);
                        }
                    }
                }
                ".comm" | ".lcomm" => {
                    let f: Vec<&str> = ops.split(',').map(str::trim).collect();
                    if let (Some(&n), Some(Ok(size))) = (f.first(), f.get(1).map(|v| v.parse())) {
                        let align = f.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
                        sizes.insert(n, size);
                        let r = new_region(&mut regions);
                        region_of.insert(n, r);
                        defs.insert(
                            n,
                            Moved {
                                lines: here..here + 1,
                                align: None,
                                comm: Some((n.to_string(), size, align)),
                            },
                        );
                    }
                }
                ".set" | ".equ" | ".equiv" => {
                    let mut w = words(ops);
                    if let Some(a) = w.next() {
                        let r = match region_of.get(a) {
                            Some(&r) => r,
                            None => {
                                let r = new_region(&mut regions);
                                region_of.insert(a, r);
                                r
                            }
                        };
                        regions[r].refs.extend(w);
                    }
                }
                ".type" | ".globl" | ".global" | ".weak" | ".hidden" | ".local" | ".file"
                | ".loc" | ".ident" | ".protected" | ".internal" => {}
                _ if word.starts_with(".cfi_") => {}
                _ => {
                    if let Some(r) = cur.get(&section).copied().flatten() {
                        regions[r].refs.extend(words(line));
                    }
                }
            }
        }

        // The shared variables, and those to move into emu_shared.
        let mut shared: HashSet<&str> = in_shared_section.clone();
        let mut moves: Vec<&Moved> = Vec::new();
        for &m in &marked {
            if in_shared_section.contains(m) {
                continue;
            }
            if let Some(d) = defs.get(m) {
                shared.insert(m);
                moves.push(d);
            }
        }
        moves.sort_by_key(|d| d.lines.start);

        // Each kernel's reach. The registration is not followed (it names every kernel); a
        // kernel naming another is an alias or thunk the compiler made of identical code.
        let stop = |w: &str| {
            [
                "__emu_kernel_table",
                "__emu_entry_",
                "__emu_kernels",
                "__emu_name",
            ]
            .iter()
            .any(|s| w.contains(s))
        };
        let reach: Vec<Option<(u64, Vec<String>)>> = kernels
            .iter()
            .map(|k| {
                let &start = region_of.get(k.as_str())?;
                let mut seen = vec![false; regions.len()];
                let mut counted: HashSet<&str> = HashSet::new();
                let mut todo = vec![start];
                seen[start] = true;
                let mut total = 0u64;
                while let Some(r) = todo.pop() {
                    for &w in &regions[r].refs {
                        if shared.contains(w) && counted.insert(w) {
                            total += sizes.get(w).copied().unwrap_or(0);
                        }
                        if stop(w) {
                            continue;
                        }
                        if let Some(&n) = region_of.get(w) {
                            if !seen[n] {
                                seen[n] = true;
                                todo.push(n);
                            }
                        }
                    }
                }
                let mut vars: Vec<String> = counted.into_iter().map(str::to_string).collect();
                vars.sort();
                Some((total, vars))
            })
            .collect();
        let per_kernel: Vec<Option<u64>> = reach.iter().map(|r| r.as_ref().map(|r| r.0)).collect();

        // The text: moved definitions cut out, then appended in emu_shared, then the table.
        let mut text = String::with_capacity(asm.len() + 4096);
        let mut cut = moves.iter().map(|d| d.lines.clone()).peekable();
        let mut i = 0;
        while i < lines.len() {
            if let Some(r) = cut.peek() {
                if r.start == i {
                    i = r.end.max(i + 1);
                    cut.next();
                    continue;
                }
            }
            text.push_str(lines[i]);
            text.push('\n');
            i += 1;
        }
        if !moves.is_empty() {
            text.push_str(if shared_declared {
                "\t.section\temu_shared\n"
            } else {
                "\t.section\temu_shared,\"aw\"\n"
            });
            for d in &moves {
                match &d.comm {
                    Some((n, size, align)) => {
                        let _ = writeln!(
                            text,
                            "\t.balign {align}\n\t.size\t{n}, {size}\n{n}:\n\t.zero {size}"
                        );
                    }
                    None => {
                        if let Some(a) = &d.align {
                            text.push_str(a);
                            text.push('\n');
                        }
                        for l in &lines[d.lines.clone()] {
                            text.push_str(l);
                            text.push('\n');
                        }
                    }
                }
            }
        }
        text.push_str("\t.section\t.rodata\n\t.balign 8\n\t.globl\t__emu_kernel_shared\n\t.hidden\t__emu_kernel_shared\n__emu_kernel_shared:\n");
        for v in &per_kernel {
            let _ = writeln!(text, "\t.quad\t{}", v.unwrap_or(u64::MAX));
        }
        text.push_str("\t.quad\t0\n");
        // __emu_kernel_shared_vars: per kernel, a list of {address, size} ended by {0, 0}.
        text.push_str("\t.section\t.data.rel.ro.local,\"aw\"\n\t.balign 8\n\t.globl\t__emu_kernel_shared_vars\n\t.hidden\t__emu_kernel_shared_vars\n__emu_kernel_shared_vars:\n");
        for (i, r) in reach.iter().enumerate() {
            match r {
                Some(_) => {
                    let _ = writeln!(text, "\t.quad\t.Lemu_shared_vars{i}");
                }
                None => text.push_str("\t.quad\t0\n"),
            }
        }
        text.push_str("\t.quad\t0\n");
        for (i, r) in reach.iter().enumerate() {
            if let Some((_, vars)) = r {
                let _ = writeln!(text, ".Lemu_shared_vars{i}:");
                for v in vars {
                    let size = sizes.get(v.as_str()).copied().unwrap_or(0);
                    let _ = writeln!(text, "\t.quad\t{v}\n\t.quad\t{size}");
                }
                text.push_str("\t.quad\t0\n\t.quad\t0\n");
            }
        }
        Analysis { text, per_kernel }
    }

    /// ptxas' refusal of the kernels over [`STATIC_LIMIT`], in its log form; empty when none.
    pub fn over_limit(kernels: &[String], per_kernel: &[Option<u64>]) -> String {
        let mut log = String::new();
        for (k, v) in kernels.iter().zip(per_kernel) {
            if let Some(v) = *v {
                if v > STATIC_LIMIT {
                    let _ = writeln!(
                        log,
                        "ptxas error   : Entry function '{k}' uses too much shared data (0x{v:x} bytes, 0x{STATIC_LIMIT:x} max)"
                    );
                }
            }
        }
        log
    }
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

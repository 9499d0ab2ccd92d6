//! The CUDA sources, embedded in the library, and their compilation to PTX with NVRTC.
//!
//! Each module is `kernels/common.cuh` followed by the module's `.cu` file, compiled as one
//! translation unit with no include path: the kernels use no CUDA header.

use cudarc::nvrtc::{self, CompileOptions, Ptx};

use super::GpuError;

const COMMON: &str = include_str!("../../kernels/common.cuh");

/// A kernel module: one `.cu` file of `kernels/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    /// `ntxent.cu`: the fused NT-Xent loss, forward and backward.
    NtXent,
    /// `augment.cu`: colour jitter, grayscale, blur and normalisation of u8 crops.
    Augment,
    /// `train.cu`: element-wise ops, batch norm, pooling, optimiser updates, casts.
    Train,
}

impl Module {
    /// Every module.
    pub const ALL: [Module; 3] = [Module::NtXent, Module::Augment, Module::Train];

    /// The file name under `kernels/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Module::NtXent => "ntxent.cu",
            Module::Augment => "augment.cu",
            Module::Train => "train.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Module::NtXent => include_str!("../../kernels/ntxent.cu"),
            Module::Augment => include_str!("../../kernels/augment.cu"),
            Module::Train => include_str!("../../kernels/train.cu"),
        }
    }

    /// The full source NVRTC compiles: the common prelude, then the module.
    pub fn source(self) -> String {
        format!(
            "{COMMON}\n#line 1 \"{}\"\n{}",
            self.file_name(),
            self.body()
        )
    }
}

/// Whether the NVRTC library can be loaded (from the library path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library under its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `module` to PTX for the GPU architecture `arch` (`"sm_80"`, `"sm_90"`, ...).
pub fn compile(module: Module, arch: &str) -> Result<Ptx, GpuError> {
    if !nvrtc_available() {
        return Err(GpuError::NoNvrtc);
    }
    let arch: &'static str = match arch {
        "sm_80" => "sm_80",
        "sm_86" => "sm_86",
        "sm_89" => "sm_89",
        "sm_90" => "sm_90",
        "sm_100" => "sm_100",
        "sm_103" => "sm_103",
        "sm_120" => "sm_120",
        other => {
            return Err(GpuError::Unsupported(format!(
                "GPU architecture {other} (the kernels need bf16 tensor cores: sm_80 to sm_120)"
            )))
        }
    };
    let opts = CompileOptions {
        arch: Some(arch),
        ftz: Some(true),
        fmad: Some(true),
        options: vec!["--std=c++17".into()],
        name: Some(module.file_name().into()),
        ..Default::default()
    };
    nvrtc::compile_ptx_with_opts(module.source(), opts).map_err(|e| match e {
        nvrtc::CompileError::CompileError { log, .. } => GpuError::Compile {
            module: module.file_name(),
            log: log.to_string_lossy().into_owned(),
        },
        other => GpuError::Compile {
            module: module.file_name(),
            log: format!("{other:?}"),
        },
    })
}

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

/// The names of the `extern "C" __global__` kernels a module defines.
pub fn kernel_names(module: Module) -> Vec<String> {
    let src = module.body();
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("__global__") {
        rest = &rest[i + "__global__".len()..];
        // `void [__launch_bounds__(..)] NAME(`, possibly with the macro's NAME parameter.
        let Some(open) = rest.find('(') else { break };
        let mut head = &rest[..open];
        if head.trim_end().ends_with("__launch_bounds__") {
            // Skip the bounds' own parentheses: the name comes after them.
            let Some(close) = rest[open..].find(')') else {
                break;
            };
            let after = &rest[open + close + 1..];
            let Some(o2) = after.find('(') else { break };
            head = &after[..o2];
        }
        if let Some(name) = head.split_whitespace().last() {
            if let Some(stem) = name.strip_suffix("##S") {
                // A `FOR_EACH_ELEM` template entry point: one kernel per element type.
                names.extend(["f32", "bf16"].map(|s| format!("{stem}{s}")));
            } else if name != "NAME" {
                names.push(name.to_string());
            }
        }
    }
    // Kernels stamped out by the NT-Xent macros: `NTX_FWD(name, P)` and `NTX_BWD(name, P, DC)`.
    for mac in ["NTX_FWD(", "NTX_BWD("] {
        for line in src.lines().filter(|l| l.starts_with(mac)) {
            if let Some(name) = line[mac.len()..].split(',').next() {
                names.push(name.trim().to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_launched_kernel_is_defined() {
        let launched: [(Module, &[&str]); 3] = [
            (
                Module::NtXent,
                &[
                    "ntxent_normalize_f32",
                    "ntxent_normalize_bf16",
                    "ntxent_forward_f32",
                    "ntxent_forward_tf32",
                    "ntxent_forward_bf16",
                    "ntxent_backward_f32",
                    "ntxent_backward_tf32",
                    "ntxent_backward_bf16",
                    "ntxent_forward_bf16_d128",
                    "ntxent_backward_bf16_d128",
                    "ntxent_merge",
                    "ntxent_finish",
                    "ntxent_sum",
                ],
            ),
            (Module::Augment, &["aug_color", "aug_blur_h", "aug_finish"]),
            (
                Module::Train,
                &[
                    "relu_f32",
                    "relu_bf16",
                    "relu_backward_f32",
                    "relu_backward_bf16",
                    "add_f32",
                    "add_bf16",
                    "cast_f32_bf16",
                    "cast_bf16_f32",
                    "f64_to_f32",
                    "sum_partials_f32",
                    "sum_finish",
                    "gap_forward_f32",
                    "gap_forward_bf16",
                    "gap_backward_f32",
                    "gap_backward_bf16",
                    "maxpool_forward_f32",
                    "maxpool_forward_bf16",
                    "maxpool_backward_f32",
                    "maxpool_backward_bf16",
                    "bn_partials_f32",
                    "bn_partials_bf16",
                    "bn_reduce",
                    "bn_mean",
                    "bn_finalize",
                    "bn_apply_f32",
                    "bn_apply_bf16",
                    "bn_backward_apply_f32",
                    "bn_backward_apply_bf16",
                    "sgd_update",
                    "lars_norms",
                    "lars_update",
                ],
            ),
        ];
        for (m, names) in launched {
            let defined = kernel_names(m);
            for n in names {
                assert!(
                    defined.iter().any(|d| d == n),
                    "{n} is not defined in kernels/{}: {defined:?}",
                    m.file_name()
                );
            }
        }
    }

    #[test]
    fn compiling_needs_nvrtc_and_says_so() {
        if nvrtc_available() {
            // NVRTC is on the library path (CI puts the wheel's there): the real compilation.
            for m in Module::ALL {
                let ptx = compile(m, "sm_90").unwrap_or_else(|e| panic!("{e}"));
                assert!(ptx.to_src().contains(".target sm_90"));
            }
        } else {
            let e = compile(Module::NtXent, "sm_90").unwrap_err();
            assert!(matches!(e, GpuError::NoNvrtc), "{e}");
            assert!(e.to_string().contains("libnvrtc"), "{e}");
        }
        assert!(matches!(
            compile(Module::Train, "sm_61"),
            Err(GpuError::Unsupported(_)) | Err(GpuError::NoNvrtc)
        ));
    }
}

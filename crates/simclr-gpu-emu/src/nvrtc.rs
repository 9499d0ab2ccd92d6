//! NVRTC (`libnvrtc.so`) at its C ABI: a program is created from CUDA C++ source, compiled by
//! [`crate::compile`] into a host shared object, and its "PTX" is a short text in PTX's form
//! (`.version`, `.target`) that names that object for the emulated driver's
//! `cuModuleLoadData`. Option checks, logs and status codes follow the NVRTC reference.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::compile::{self, CompileError};
use crate::driver::module::OBJECT_MARKER;

/// `nvrtcResult`.
pub type NvrtcResult = c_int;
const NVRTC_SUCCESS: NvrtcResult = 0;
const NVRTC_ERROR_PROGRAM_CREATION_FAILURE: NvrtcResult = 2;
const NVRTC_ERROR_INVALID_INPUT: NvrtcResult = 3;
const NVRTC_ERROR_INVALID_PROGRAM: NvrtcResult = 4;
const NVRTC_ERROR_INVALID_OPTION: NvrtcResult = 5;
const NVRTC_ERROR_COMPILATION: NvrtcResult = 6;
const NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION: NvrtcResult = 9;

/// The version the emulated NVRTC reports: 13.0, the one the project builds against.
const VERSION: (c_int, c_int) = (13, 0);

struct Program {
    source: String,
    name: String,
    headers: Vec<(String, String)>,
    log: Vec<u8>,
    ptx: Option<Vec<u8>>,
}

fn cstr(p: *const c_char) -> Option<String> {
    // SAFETY: callers pass NUL-terminated strings or null.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn program<'a>(p: *mut c_void) -> Option<&'a mut Program> {
    // SAFETY: program handles are boxes made by nvrtcCreateProgram and freed only by
    // nvrtcDestroyProgram; NVRTC requires the caller not to use one from two threads at once.
    (!p.is_null()).then(|| unsafe { &mut *(p as *mut Program) })
}

/// `nvrtcGetErrorString`.
#[no_mangle]
pub extern "C" fn nvrtcGetErrorString(r: NvrtcResult) -> *const c_char {
    let s: &'static str = match r {
        0 => "NVRTC_SUCCESS\0",
        1 => "NVRTC_ERROR_OUT_OF_MEMORY\0",
        2 => "NVRTC_ERROR_PROGRAM_CREATION_FAILURE\0",
        3 => "NVRTC_ERROR_INVALID_INPUT\0",
        4 => "NVRTC_ERROR_INVALID_PROGRAM\0",
        5 => "NVRTC_ERROR_INVALID_OPTION\0",
        6 => "NVRTC_ERROR_COMPILATION\0",
        7 => "NVRTC_ERROR_BUILTIN_OPERATION_FAILURE\0",
        8 => "NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION\0",
        9 => "NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION\0",
        10 => "NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID\0",
        11 => "NVRTC_ERROR_INTERNAL_ERROR\0",
        _ => "NVRTC_ERROR unknown\0",
    };
    s.as_ptr() as *const c_char
}

/// `nvrtcVersion`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcVersion(major: *mut c_int, minor: *mut c_int) -> NvrtcResult {
    if major.is_null() || minor.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: non-null out-pointers.
    unsafe {
        *major = VERSION.0;
        *minor = VERSION.1;
    }
    NVRTC_SUCCESS
}

/// `nvrtcCreateProgram`: `name` defaults to "default_program"; headers are (contents, name)
/// pairs.
#[no_mangle]
pub unsafe extern "C" fn nvrtcCreateProgram(
    prog: *mut *mut c_void,
    src: *const c_char,
    name: *const c_char,
    num_headers: c_int,
    headers: *const *const c_char,
    include_names: *const *const c_char,
) -> NvrtcResult {
    if prog.is_null() {
        return NVRTC_ERROR_INVALID_PROGRAM;
    }
    let Some(source) = cstr(src) else {
        return NVRTC_ERROR_INVALID_INPUT;
    };
    if num_headers < 0 || (num_headers > 0 && (headers.is_null() || include_names.is_null())) {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    let mut hs = Vec::new();
    for i in 0..num_headers as usize {
        // SAFETY: num_headers entries in each array, per the reference.
        let (h, n) = unsafe { (*headers.add(i), *include_names.add(i)) };
        match (cstr(h), cstr(n)) {
            (Some(h), Some(n)) => hs.push((n, h)),
            _ => return NVRTC_ERROR_PROGRAM_CREATION_FAILURE,
        }
    }
    let p = Box::new(Program {
        source,
        name: cstr(name).unwrap_or_else(|| "default_program".into()),
        headers: hs,
        log: vec![0],
        ptx: None,
    });
    // SAFETY: non-null out-pointer.
    unsafe { *prog = Box::into_raw(p) as *mut c_void };
    NVRTC_SUCCESS
}

/// `nvrtcDestroyProgram`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcDestroyProgram(prog: *mut *mut c_void) -> NvrtcResult {
    // SAFETY: a pointer to a handle from nvrtcCreateProgram.
    if prog.is_null() || unsafe { (*prog).is_null() } {
        return NVRTC_ERROR_INVALID_PROGRAM;
    }
    // SAFETY: the box made by nvrtcCreateProgram, freed once.
    unsafe {
        drop(Box::from_raw(*prog as *mut Program));
        *prog = std::ptr::null_mut();
    }
    NVRTC_SUCCESS
}

/// The architecture an option list asks for (`compute_75`, NVRTC 13's default, without one).
fn arch(options: &[String]) -> String {
    let mut arch = "compute_75".to_string();
    let mut it = options.iter();
    while let Some(o) = it.next() {
        let v = if let Some(v) = o
            .strip_prefix("--gpu-architecture=")
            .or_else(|| o.strip_prefix("-arch="))
        {
            Some(v.to_string())
        } else if o == "--gpu-architecture" || o == "-arch" {
            it.next().cloned()
        } else {
            None
        };
        if let Some(v) = v {
            arch = v;
        }
    }
    arch
}

/// `nvrtcCompileProgram`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcCompileProgram(
    prog: *mut c_void,
    num_options: c_int,
    options: *const *const c_char,
) -> NvrtcResult {
    let Some(p) = program(prog) else {
        return NVRTC_ERROR_INVALID_PROGRAM;
    };
    if num_options < 0 || (num_options > 0 && options.is_null()) {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    let mut opts = Vec::new();
    for i in 0..num_options as usize {
        // SAFETY: num_options entries, per the reference.
        match cstr(unsafe { *options.add(i) }) {
            Some(o) => opts.push(o),
            None => return NVRTC_ERROR_INVALID_INPUT,
        }
    }
    let set_log = |p: &mut Program, text: &str| {
        p.log = text.as_bytes().to_vec();
        p.log.push(0);
    };
    match compile::compile(&p.source, &p.name, &p.headers, &opts) {
        Ok(c) => {
            set_log(p, &c.log);
            let arch = arch(&opts);
            let target = arch.replace("compute_", "sm_");
            let text = format!(
                "//\n// Generated by the emulated NVRTC of simclr-gpu-emu: not PTX, a reference to\n\
                 // host code compiled from the same CUDA source.\n//\n\n\
                 .version 9.0\n.target {target}\n.address_size 64\n\n\
                 {OBJECT_MARKER}{}\n// kernels: {}\n",
                c.object.display(),
                c.kernels.join(" ")
            );
            let mut bytes = text.into_bytes();
            bytes.push(0);
            p.ptx = Some(bytes);
            NVRTC_SUCCESS
        }
        Err(CompileError::InvalidOption(log)) => {
            set_log(p, &log);
            NVRTC_ERROR_INVALID_OPTION
        }
        Err(CompileError::Compilation(log)) => {
            set_log(p, &log);
            NVRTC_ERROR_COMPILATION
        }
    }
}

/// `nvrtcGetProgramLogSize`: the log's bytes, its NUL included.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLogSize(
    prog: *mut c_void,
    size: *mut usize,
) -> NvrtcResult {
    let Some(p) = program(prog) else {
        return NVRTC_ERROR_INVALID_PROGRAM;
    };
    if size.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: non-null out-pointer.
    unsafe { *size = p.log.len() };
    NVRTC_SUCCESS
}

/// `nvrtcGetProgramLog`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLog(prog: *mut c_void, log: *mut c_char) -> NvrtcResult {
    let Some(p) = program(prog) else {
        return NVRTC_ERROR_INVALID_PROGRAM;
    };
    if log.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: the caller's buffer holds nvrtcGetProgramLogSize bytes.
    unsafe { std::ptr::copy_nonoverlapping(p.log.as_ptr(), log as *mut u8, p.log.len()) };
    NVRTC_SUCCESS
}

/// `nvrtcGetPTXSize`: an error before a successful compilation.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetPTXSize(prog: *mut c_void, size: *mut usize) -> NvrtcResult {
    let Some(p) = program(prog) else {
        return NVRTC_ERROR_INVALID_PROGRAM;
    };
    match (&p.ptx, size.is_null()) {
        (Some(ptx), false) => {
            // SAFETY: non-null out-pointer.
            unsafe { *size = ptx.len() };
            NVRTC_SUCCESS
        }
        _ => NVRTC_ERROR_INVALID_INPUT,
    }
}

/// `nvrtcGetPTX`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetPTX(prog: *mut c_void, out: *mut c_char) -> NvrtcResult {
    let Some(p) = program(prog) else {
        return NVRTC_ERROR_INVALID_PROGRAM;
    };
    match (&p.ptx, out.is_null()) {
        (Some(ptx), false) => {
            // SAFETY: the caller's buffer holds nvrtcGetPTXSize bytes.
            unsafe { std::ptr::copy_nonoverlapping(ptx.as_ptr(), out as *mut u8, ptx.len()) };
            NVRTC_SUCCESS
        }
        _ => NVRTC_ERROR_INVALID_INPUT,
    }
}

/// `nvrtcGetCUBINSize`: there is no cubin (the emulated device runs host code).
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBINSize(_prog: *mut c_void, _size: *mut usize) -> NvrtcResult {
    eprintln!("simclr-gpu-emu: nvrtcGetCUBINSize: the emulated NVRTC makes no cubin");
    NVRTC_ERROR_INVALID_INPUT
}

/// `nvrtcGetCUBIN`: as `nvrtcGetCUBINSize`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBIN(_prog: *mut c_void, _out: *mut c_char) -> NvrtcResult {
    eprintln!("simclr-gpu-emu: nvrtcGetCUBIN: the emulated NVRTC makes no cubin");
    NVRTC_ERROR_INVALID_INPUT
}

/// `nvrtcAddNameExpression`: name expressions are not emulated.
#[no_mangle]
pub unsafe extern "C" fn nvrtcAddNameExpression(
    _prog: *mut c_void,
    _name: *const c_char,
) -> NvrtcResult {
    eprintln!("simclr-gpu-emu: nvrtcAddNameExpression is not emulated");
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE
}

/// `nvrtcGetLoweredName`: as `nvrtcAddNameExpression`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetLoweredName(
    _prog: *mut c_void,
    _name: *const c_char,
    _lowered: *mut *const c_char,
) -> NvrtcResult {
    eprintln!("simclr-gpu-emu: nvrtcGetLoweredName is not emulated");
    NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION
}

//! Compiles every kernel module with the library's own NVRTC path for the given architectures
//! and writes the PTX: `check_kernels OUT_DIR sm_80 sm_90`. `cargo xtask check-kernels` runs it
//! (it needs libnvrtc.so.13 on the library path, no GPU) and then ptxas on the PTX.

use simclr_kernels::cuda::source::{compile, Module};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        eprintln!("usage: check_kernels OUT_DIR ARCH...");
        std::process::exit(2);
    };
    let archs: Vec<String> = args.collect();
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("cannot create {out}: {e}");
        std::process::exit(1);
    }
    let mut failed = false;
    for arch in &archs {
        for m in Module::ALL {
            match compile(m, arch) {
                Ok(ptx) => {
                    let stem = m.file_name().trim_end_matches(".cu");
                    let path = format!("{out}/{stem}.{arch}.ptx");
                    if let Err(e) = std::fs::write(&path, ptx.to_src()) {
                        eprintln!("cannot write {path}: {e}");
                        failed = true;
                    } else {
                        println!("compiled kernels/{} for {arch} -> {path}", m.file_name());
                    }
                }
                Err(e) => {
                    eprintln!("{arch}: {e}");
                    failed = true;
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

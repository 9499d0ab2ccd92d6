//! CPU twins of the kernels: the same algorithms in plain Rust.

//! The emulated NVRTC's compiler and the C++ runtime, driven directly: CUDA sources compiled by
//! `simclr_gpu_emu::compile::compile`, the object dlopened, kernels run with `emu_launch` and
//! checked against plain Rust.

use std::ffi::{c_char, c_void, CStr, CString};

use simclr_gpu_emu::compile::{compile, CompileError};

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    u32,
    *mut *mut c_void,
    *mut c_char,
    u64,
) -> i32;
type InfoFn = unsafe extern "C" fn(*const c_char, *mut u32, *mut u64, *mut u32, *mut u64) -> i32;
type NamesFn = unsafe extern "C" fn() -> *const *const c_char;

/// A compiled and loaded module.
struct Module {
    launch: LaunchFn,
    info: InfoFn,
    names: NamesFn,
    kernels: Vec<String>,
}

fn sym(h: *mut c_void, name: &str) -> *mut c_void {
    let c = CString::new(name).unwrap();
    // SAFETY: h is a live dlopen handle.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(!p.is_null(), "{name} is not exported");
    p
}

fn load(path: &std::path::Path) -> (*mut c_void, Vec<String>) {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: loading our own compiled object.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a C string after a failure.
        panic!("dlopen: {:?}", unsafe { CStr::from_ptr(libc::dlerror()) });
    }
    (h, Vec::new())
}

fn opts(extra: &[&str]) -> Vec<String> {
    let mut o = vec!["--gpu-architecture=sm_90".to_string(), "--std=c++17".into()];
    o.extend(extra.iter().map(|s| s.to_string()));
    o
}

fn build_with(src: &str, options: &[String]) -> Module {
    let c = compile(src, "test.cu", &[], options).unwrap_or_else(|e| panic!("{e}"));
    let (h, _) = load(&c.object);
    // SAFETY: the symbols have the contract's types.
    unsafe {
        Module {
            launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym(h, "emu_launch")),
            info: std::mem::transmute::<*mut c_void, InfoFn>(sym(h, "emu_kernel_info")),
            names: std::mem::transmute::<*mut c_void, NamesFn>(sym(h, "emu_kernel_names")),
            kernels: c.kernels,
        }
    }
}

fn build(src: &str) -> Module {
    build_with(src, &opts(&["--ftz=true"]))
}

/// Pointers to each argument's value, as cuLaunchKernel's kernelParams.
macro_rules! params {
    ($($a:expr),* $(,)?) => { vec![$(&mut $a as *mut _ as *mut c_void),*] };
}

impl Module {
    fn run(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dyn_shared: u32,
        mut p: Vec<*mut c_void>,
    ) -> Result<(), (i32, String)> {
        let n = CString::new(name).unwrap();
        let mut msg = vec![0 as c_char; 2048];
        // SAFETY: p points at live argument values of the kernel's parameter types.
        let rc = unsafe {
            (self.launch)(
                n.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                dyn_shared,
                p.as_mut_ptr(),
                msg.as_mut_ptr(),
                msg.len() as u64,
            )
        };
        // SAFETY: the runtime NUL-terminates msg.
        let m = unsafe { CStr::from_ptr(msg.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        if rc == 0 {
            Ok(())
        } else {
            Err((rc, m))
        }
    }

    fn info(&self, name: &str) -> Option<(Vec<u64>, u32, u64)> {
        let n = CString::new(name).unwrap();
        let (mut np, mut mt, mut sh) = (0u32, 0u32, 0u64);
        let mut sizes = vec![0u64; 256];
        // SAFETY: out-pointers to live values, sizes has room for 256.
        let rc = unsafe { (self.info)(n.as_ptr(), &mut np, sizes.as_mut_ptr(), &mut mt, &mut sh) };
        (rc == 0).then(|| (sizes[..np as usize].to_vec(), mt, sh))
    }

    fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        // SAFETY: a NULL-terminated array of C strings.
        unsafe {
            let mut p = (self.names)();
            while !(*p).is_null() {
                out.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
                p = p.add(1);
            }
        }
        out
    }
}

#[test]
fn real_modules_compile_and_export_every_kernel() {
    use simclr_kernels::cuda::source::{kernel_names, Module as M};
    std::thread::scope(|s| {
        for m in M::ALL {
            s.spawn(move || {
                let o = opts(&["--ftz=true", "--fmad=true"]);
                let c = compile(&m.source(), m.file_name(), &[], &o)
                    .unwrap_or_else(|e| panic!("{}: {e}", m.file_name()));
                let module = build_with(&m.source(), &o);
                let exported = module.names();
                assert_eq!(exported, c.kernels);
                for k in kernel_names(m) {
                    assert!(
                        exported.contains(&k),
                        "{k} not exported by {}: {exported:?}",
                        m.file_name()
                    );
                    let (sizes, _, _) = module.info(&k).unwrap();
                    assert!(!sizes.is_empty(), "{k}");
                    assert!(sizes.iter().all(|&s| s == 4 || s == 8), "{k}: {sizes:?}");
                }
                if m == M::NtXent {
                    let (sizes, mt, shared) = module.info("ntxent_forward_f32").unwrap();
                    assert_eq!(mt, 128);
                    assert_eq!(sizes, [8, 4, 4, 4, 4, 4, 4, 4, 4, 8]);
                    // Each kernel's own static shared memory: the template instantiation it
                    // calls (As and Bs of 64 x 36 f32 / 64 x 40 bf16), not the module's total.
                    assert_eq!(shared, 2 * 64 * 36 * 4);
                    assert_eq!(module.info("ntxent_merge").unwrap().1, 1024);
                    let sh = |k: &str| module.info(k).unwrap().2;
                    assert_eq!(sh("ntxent_forward_bf16"), 2 * 64 * 40 * 2);
                    // ab_raw, Vt (DC x PV), colw, cola.
                    assert_eq!(sh("ntxent_backward_f32"), 18432 + 64 * 68 * 4 + 512);
                    assert_eq!(sh("ntxent_backward_bf16"), 17408 + 128 * 72 * 2 + 512);
                    assert_eq!(sh("ntxent_backward_bf16_d128"), 64 * 136 * 2 + 512);
                    assert_eq!(sh("ntxent_sum"), 32 * 8);
                    assert_eq!(sh("ntxent_merge"), 0);
                }
                if m == M::Train {
                    let sh = |k: &str| module.info(k).unwrap().2;
                    assert_eq!(sh("relu_f32"), 0);
                    assert_eq!(sh("sum_partials_f32"), 32 * 8);
                }
                for k in kernel_names(m) {
                    let (_, _, shared) = module.info(&k).unwrap();
                    assert!(shared <= 48 * 1024, "{k}: {shared}");
                }
                let _ = module.kernels.len();
            });
        }
    });
}

const REDUCE: &str = r#"
extern "C" __global__ void reduce(const float* x, float* out) {
    __shared__ float warp_sums[32];
    unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    unsigned blk = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    float v = x[blk * nt + tid];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((tid & 31) == 0) warp_sums[tid >> 5] = v;
    __syncthreads();
    if (tid < 32) {
        float w = tid < nt / 32 ? warp_sums[tid] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
        if (tid == 0) out[blk] = w;
    }
}
"#;

#[test]
fn block_reduction_with_barriers_and_shuffles() {
    let m = build(REDUCE);
    let shapes: [([u32; 3], [u32; 3]); 6] = [
        ([1, 1, 1], [32, 1, 1]),
        ([2, 3, 1], [64, 2, 1]),
        ([1, 1, 2], [8, 4, 4]),
        ([3, 1, 1], [1024, 1, 1]),
        ([2, 2, 2], [16, 16, 4]),
        ([5, 1, 1], [96, 1, 1]),
    ];
    for (grid, block) in shapes {
        let nb = (grid[0] * grid[1] * grid[2]) as usize;
        let nt = (block[0] * block[1] * block[2]) as usize;
        // Small integers: every summation order gives the exact sum.
        let x: Vec<f32> = (0..nb * nt)
            .map(|i| ((i * 7919) % 13) as f32 - 6.0)
            .collect();
        let mut out = vec![0f32; nb];
        let (mut px, mut po) = (x.as_ptr(), out.as_mut_ptr());
        m.run("reduce", grid, block, 0, params!(px, po)).unwrap();
        let want: Vec<f32> = x.chunks(nt).map(|c| c.iter().sum()).collect();
        assert_eq!(out, want, "grid {grid:?} block {block:?}");
    }
}

const RACE: &str = r#"
extern "C" __global__ void reverse(const float* x, float* y, int sync) {
    __shared__ float s[256];
    unsigned i = threadIdx.x, n = blockDim.x;
    s[i] = x[blockIdx.x * n + i];
    if (sync) __syncthreads();
    y[blockIdx.x * n + i] = s[n - 1 - i];
}
"#;

#[test]
fn a_missing_syncthreads_gives_a_wrong_result() {
    let m = build(RACE);
    let n = 256usize;
    let x: Vec<f32> = (0..2 * n).map(|i| i as f32).collect();
    let want: Vec<f32> = x.chunks(n).flat_map(|c| c.iter().rev().copied()).collect();
    for sync in [1i32, 0] {
        let mut y = vec![0f32; 2 * n];
        let (mut px, mut py, mut s) = (x.as_ptr(), y.as_mut_ptr(), sync);
        m.run(
            "reverse",
            [2, 1, 1],
            [n as u32, 1, 1],
            0,
            params!(px, py, s),
        )
        .unwrap();
        if sync == 1 {
            assert_eq!(y, want);
        } else {
            // Both blocks (ascending and descending schedules) read poisoned shared memory.
            for b in 0..2 {
                let bad = (0..n).filter(|&i| y[b * n + i] != want[b * n + i]).count();
                assert!(
                    bad >= n / 2 - 1,
                    "block {b}: only {bad} wrong values without the barrier"
                );
                assert!(
                    y[b * n..(b + 1) * n].iter().any(|v| v.is_nan()),
                    "poison (0xFF bytes) is a NaN"
                );
            }
        }
    }
}

// Threads that never wait run one after another on one stack; the first that waits keeps that
// stack, deep frames included, and the rest start on stacks of their own. Threads that exited
// first no longer count at the barrier.
const EARLY_EXITS: &str = r#"
__device__ __noinline__ int deep(int d, int v, int* s, unsigned partner) {
    volatile int pad[16];
    for (int k = 0; k < 16; k++) pad[k] = v * k + d;
    int r;
    if (d == 0) {
        s[threadIdx.x] = v;
        __syncthreads();
        r = s[partner];
        __syncthreads();
    } else {
        r = deep(d - 1, v, s, partner);
    }
    return r + pad[d % 16] - (v * (d % 16) + d);
}
extern "C" __global__ void early_exits(const int* x, int* y, unsigned every) {
    __shared__ int s[1024];
    unsigned i = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    if (i % every == 0) {
        y[base + i] = -1;
        return;
    }
    unsigned p = n - 1 - i;
    if (p % every == 0) p = i;
    y[base + i] = deep(6, x[base + i], s, p);
}
"#;

#[test]
fn threads_that_exit_early_and_threads_that_wait_share_a_block() {
    let m = build(EARLY_EXITS);
    for n in [1usize, 33, 256, 1024] {
        for every in [1u32, 2, 3, 7, 64, 5000] {
            // Two blocks: one scheduled ascending, one descending.
            let x: Vec<i32> = (0..2 * n as i32).map(|i| i * 3 + 1).collect();
            let mut y = vec![0i32; 2 * n];
            let (mut px, mut py, mut e) = (x.as_ptr(), y.as_mut_ptr(), every);
            m.run(
                "early_exits",
                [2, 1, 1],
                [n as u32, 1, 1],
                0,
                params!(px, py, e),
            )
            .unwrap_or_else(|e| panic!("n {n} every {every}: {e:?}"));
            for b in 0..2 {
                for i in 0..n {
                    let want = if i as u32 % every == 0 {
                        -1
                    } else {
                        let p = n - 1 - i;
                        x[b * n + if p as u32 % every == 0 { i } else { p }]
                    };
                    assert_eq!(
                        y[b * n + i],
                        want,
                        "n {n} every {every} block {b} thread {i}"
                    );
                }
            }
        }
    }
}

const FAILS: &str = r#"
extern "C" __global__ void deadlock(int* out) {
    if (threadIdx.x == 0) __syncthreads();
    __syncwarp();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void trap(int* out) {
    if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void failed_assert(int* out) {
    assert(threadIdx.x != 7);
    out[threadIdx.x] = 1;
}
extern "C" __global__ void absent_lane(int* out) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}
extern "C" __global__ void exited_lane(int* out) {
    if (threadIdx.x == 3) return;
    __syncwarp();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void mismatch(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else v = (int)__ballot_sync(0xffffffffu, v & 1);
    out[threadIdx.x] = v;
}
extern "C" __global__ void unsupported_ptx(int* out) {
    unsigned r;
    asm volatile("frobnicate.u32 %0;" : "=r"(r));
    out[0] = r;
}
"#;

#[test]
fn deadlock_trap_and_bad_masks_fail_the_launch() {
    let m = build(FAILS);
    let mut out = vec![0i32; 64];
    let cases: [(&str, u32, u32, &[&str]); 7] = [
        (
            "deadlock",
            1,
            64,
            &[
                "deadlock",
                "block (0,0,0)",
                "__syncthreads at test.cu:3",
                "__syncwarp at test.cu:4",
                "threads 1-31",
            ],
        ),
        (
            "trap",
            2,
            32,
            &["trap", "block (1,0,0) thread (5,0,0)", "test.cu:8"],
        ),
        (
            "failed_assert",
            1,
            32,
            &["assertion", "threadIdx.x != 7", "thread (7,0,0)"],
        ),
        ("absent_lane", 1, 16, &["__shfl_sync", "does not exist"]),
        ("exited_lane", 1, 32, &["exited"]),
        (
            "mismatch",
            1,
            32,
            &["different collectives", "__ballot_sync", "__shfl_xor_sync"],
        ),
        (
            "unsupported_ptx",
            1,
            32,
            &["unsupported inline PTX", "frobnicate.u32"],
        ),
    ];
    for (k, grid, block, want) in cases {
        let mut p = out.as_mut_ptr();
        let (rc, msg) = m
            .run(k, [grid, 1, 1], [block, 1, 1], 0, params!(p))
            .unwrap_err();
        assert_eq!(rc, 719, "{k}: {msg}");
        for w in want {
            assert!(msg.contains(w), "{k}: `{w}` not in: {msg}");
        }
    }
    // The module is still usable after a failed launch.
    let mut p = out.as_mut_ptr();
    m.run("trap", [1, 1, 1], [32, 1, 1], 0, params!(p)).unwrap();
    let mut p = out.as_mut_ptr();
    assert_eq!(
        m.run("nope", [1, 1, 1], [32, 1, 1], 0, params!(p))
            .unwrap_err()
            .0,
        1
    );
}

const MISC: &str = r#"
extern "C" __global__ void dyn_reverse(const float* x, float* y) {
    extern __shared__ __align__(16) float buf[];
    unsigned i = threadIdx.x, n = blockDim.x;
    buf[i] = x[i];
    __syncthreads();
    y[i] = buf[n - 1 - i];
}
extern "C" __global__ void atomics(int* count, float* fsum, unsigned* umax, unsigned long long* ull,
                                   unsigned* inc, int* cas_sum, double* dsum) {
    unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(count, 1);
    atomicAdd(fsum, 1.0f);
    atomicMax(umax, g);
    atomicAdd(ull, (unsigned long long)g);
    atomicInc(inc, 99u);
    atomicAdd(dsum, 0.5);
    int old = *cas_sum, assumed;
    do { assumed = old; old = atomicCAS(cas_sum, assumed, assumed + 2); } while (old != assumed);
    __syncthreads();
    if (threadIdx.x == 0) atomicSub(count, 0);
}
extern "C" __global__ void __launch_bounds__(256, 2) bounded(const float* a, int n, double d, char c, ulonglong2 v) {}
extern "C" __global__ void votes(unsigned* out) {
    unsigned lane = threadIdx.x & 31;
    unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
    int any = __any_sync(0xffffffffu, lane == 31), all = __all_sync(0xffffffffu, lane < 31);
    int c = __syncthreads_count(threadIdx.x % 2 == 0);
    int o = __syncthreads_or(threadIdx.x == 40), a = __syncthreads_and(threadIdx.x < 1000);
    float up = __shfl_up_sync(0xffffffffu, (float)lane, 1, 8);
    double idx = __shfl_sync(0xffffffffu, (double)lane, lane ^ 3, 16);
    if (threadIdx.x == 0) { out[0] = b; out[1] = any; out[2] = all; out[3] = c; out[4] = o; out[5] = a; }
    out[8 + threadIdx.x] = (unsigned)up;
    out[8 + blockDim.x + threadIdx.x] = (unsigned)idx;
}
"#;

#[test]
fn dynamic_shared_memory() {
    let m = build(MISC);
    let n = 512usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let mut y = vec![0f32; n];
    let (mut px, mut py) = (x.as_ptr(), y.as_mut_ptr());
    m.run(
        "dyn_reverse",
        [1, 1, 1],
        [n as u32, 1, 1],
        (n * 4) as u32,
        params!(px, py),
    )
    .unwrap();
    assert_eq!(y, x.iter().rev().copied().collect::<Vec<_>>());
}

#[test]
fn atomics_across_blocks() {
    let m = build(MISC);
    let (blocks, threads) = (8u32, 128u32);
    let total = (blocks * threads) as u64;
    let (mut count, mut fsum, mut umax, mut ull, mut inc, mut cas, mut dsum) =
        (0i32, 0f32, 0u32, 0u64, 0u32, 0i32, 0f64);
    let (mut a, mut b, mut c, mut d, mut e, mut f, mut g) = (
        &mut count as *mut i32,
        &mut fsum as *mut f32,
        &mut umax as *mut u32,
        &mut ull as *mut u64,
        &mut inc as *mut u32,
        &mut cas as *mut i32,
        &mut dsum as *mut f64,
    );
    m.run(
        "atomics",
        [blocks, 1, 1],
        [threads, 1, 1],
        0,
        params!(a, b, c, d, e, f, g),
    )
    .unwrap();
    assert_eq!(count as u64, total);
    assert_eq!(fsum, total as f32);
    assert_eq!(umax as u64, total - 1);
    assert_eq!(ull, total * (total - 1) / 2);
    assert_eq!(inc as u64, total % 100);
    assert_eq!(cas as u64, 2 * total);
    assert_eq!(dsum, total as f64 / 2.0);
}

#[test]
fn votes_shuffles_and_barrier_predicates() {
    let m = build(MISC);
    let n = 64usize;
    let mut out = vec![0u32; 8 + 2 * n];
    let mut p = out.as_mut_ptr();
    m.run("votes", [1, 1, 1], [n as u32, 1, 1], 0, params!(p))
        .unwrap();
    let ballot: u32 = (0..32).filter(|l| l % 3 == 0).map(|l| 1u32 << l).sum();
    assert_eq!(&out[..6], &[ballot, 1, 0, 32, 1, 1]);
    for t in 0..n {
        let lane = t % 32;
        let up = if lane % 8 == 0 { lane } else { lane - 1 };
        assert_eq!(out[8 + t] as usize, up, "shfl_up lane {lane}");
        let idx = (lane & !15) + ((lane ^ 3) & 15);
        assert_eq!(out[8 + n + t] as usize, idx, "shfl lane {lane}");
    }
}

#[test]
fn kernel_info_reports_launch_bounds_and_parameter_sizes() {
    let m = build(MISC);
    let (sizes, max_threads, _) = m.info("bounded").unwrap();
    assert_eq!(sizes, [8, 4, 8, 1, 16]);
    assert_eq!(max_threads, 256);
    let (sizes, max_threads, shared) = m.info("dyn_reverse").unwrap();
    assert_eq!(
        (sizes.as_slice(), max_threads, shared),
        (&[8u64, 8][..], 1024, 0)
    );
    assert!(m.info("missing").is_none());
    assert_eq!(m.kernels, ["dyn_reverse", "atomics", "bounded", "votes"]);
}

const STATIC_SHARED: &str = r#"
// 40 KiB: within sm_90's 48 KiB of static shared memory.
extern "C" __global__ void k40(float* out) {
    __shared__ float s[10240];
    for (int i = threadIdx.x; i < 10240; i += blockDim.x) s[i] = (float)i;
    __syncthreads();
    float acc = 0.0f;
    for (int i = 0; i < 10240; i++) acc += s[i];
    if (threadIdx.x == 0) out[0] = acc;
}
// Shared arrays in a template device function (one per instantiation) and an inline one.
template <int N>
__device__ float tile_sum(const float* x) {
    __shared__ __align__(16) float buf[N], extra;
    for (int i = threadIdx.x; i < N; i += blockDim.x) buf[i] = x[i];
    if (threadIdx.x == 0) extra = 1.0f;
    __syncthreads();
    float acc = extra;
    for (int i = 0; i < N; i++) acc += buf[i];
    return acc;
}
__device__ __forceinline__ int peek(int* out) {
    __shared__ int v[4];
    if (blockIdx.x == 0 && threadIdx.x == 0) v[0] = 7;
    __syncthreads();
    return v[0];
}
extern "C" __global__ void small(const float* x, float* out) { out[0] = tile_sum<16>(x); }
extern "C" __global__ void big(const float* x, float* out) {
    out[0] = tile_sum<1024>(x);
    if (out[1] > 0.0f) out[1] = tile_sum<16>(x);  // both instantiations, one in a branch
}
extern "C" __global__ void none(float* out) { out[threadIdx.x] = 1.0f; }
// Block 1 reads what block 0 wrote unless shared memory is poisoned at each block's start.
extern "C" __global__ void stale(int* out) {
    int v = peek(out);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}
"#;

#[test]
fn static_shared_memory_is_each_kernels_own() {
    let m = build(STATIC_SHARED);
    let sh = |k: &str| m.info(k).unwrap().2;
    assert_eq!(sh("k40"), 40 * 1024);
    assert_eq!(sh("small"), 16 * 4 + 4);
    assert_eq!(sh("big"), 1024 * 4 + 4 + 16 * 4 + 4);
    assert_eq!(sh("none"), 0);
    assert_eq!(sh("stale"), 16);

    let mut out = 0f32;
    let mut po = &mut out as *mut f32;
    m.run("k40", [1, 1, 1], [256, 1, 1], 0, params!(po))
        .unwrap();
    assert_eq!(out, (0..10240).map(|i| i as f32).sum::<f32>());

    let x: Vec<f32> = (0..1024).map(|i| (i % 5) as f32).collect();
    let mut o = [0f32, 1.0];
    let (mut px, mut po) = (x.as_ptr(), o.as_mut_ptr());
    m.run("big", [1, 1, 1], [128, 1, 1], 0, params!(px, po))
        .unwrap();
    assert_eq!(o[0], 1.0 + x.iter().sum::<f32>());
    assert_eq!(o[1], 1.0 + x[..16].iter().sum::<f32>());

    // A template's or inline function's statics are COMDAT (the compiler drops their section
    // attribute): they are poisoned at each block's start all the same.
    let mut v = [0i32; 2];
    let mut pv = v.as_mut_ptr();
    m.run("stale", [2, 1, 1], [32, 1, 1], 0, params!(pv))
        .unwrap();
    assert_eq!(v, [7, -1]);

    // Static and dynamic shared memory together: at most 227 KiB.
    let mut o = [0f32; 32];
    let mut po = o.as_mut_ptr();
    let err = m
        .run(
            "k40",
            [1, 1, 1],
            [32, 1, 1],
            227 * 1024 - 40 * 1024 + 1,
            params!(po),
        )
        .unwrap_err();
    assert_eq!(err.0, 1, "{err:?}");
    assert!(err.1.contains("k40"), "{err:?}");
}

#[test]
fn static_shared_memory_over_48_kib_is_refused() {
    let src = "#line 1 \"big.cu\"\ntemplate <int N> __device__ void f(float* x) {\n    __shared__ float s[N];\n    s[threadIdx.x] = 1.0f;\n    __syncthreads();\n    x[threadIdx.x] = s[N - 1 - threadIdx.x];\n}\nextern \"C\" __global__ void fits(float* x) { f<1024>(x); }\nextern \"C\" __global__ void too_big(float* x) { f<12800>(x); }\n";
    match compile(src, "big_program", &[], &opts(&[])) {
        Err(CompileError::Compilation(log)) => {
            assert!(
                log.contains(
                    "Entry function 'too_big' uses too much shared data (0xc800 bytes, 0xc000 max)"
                ),
                "{log}"
            );
            assert!(!log.contains("'fits'"), "{log}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn compile_errors_name_the_file_and_line() {
    let src = "#line 1 \"bad.cu\"\nextern \"C\" __global__ void k(float* x) {\n    x[0] = undefined_thing;\n}\n";
    match compile(src, "bad_program", &[], &opts(&[])) {
        Err(CompileError::Compilation(log)) => {
            assert!(log.contains("bad.cu(2): error"), "{log}");
            assert!(log.contains("undefined_thing"), "{log}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_options_are_rejected() {
    match compile(REDUCE, "p", &[], &opts(&["--frobnicate"])) {
        Err(CompileError::InvalidOption(m)) => assert!(m.contains("--frobnicate"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        compile(REDUCE, "p", &[], &opts(&["--fmad=maybe"])),
        Err(CompileError::InvalidOption(_))
    ));
}

#[test]
fn a_real_kernel_runs() {
    use simclr_kernels::cuda::source::Module as M;
    let o = opts(&["--ftz=true", "--fmad=true"]);
    let m = build_with(&M::Train.source(), &o);
    let n = 1000usize;
    let x: Vec<f64> = (0..n).map(|i| (i % 17) as f64).collect();
    let mut out = 0f64;
    let (mut px, mut pn, mut s, mut po) = (x.as_ptr(), n as i32, 0.5f64, &mut out as *mut f64);
    m.run(
        "sum_finish",
        [1, 1, 1],
        [256, 1, 1],
        0,
        params!(px, pn, s, po),
    )
    .unwrap();
    assert_eq!(out, x.iter().sum::<f64>() * 0.5);
}

// ---- sanitizers: the test binary re-runs itself as a child with the sanitizer runtime ----

const ROLE: &str = "SIMCLR_GPU_EMU_TEST_ROLE";

const SANITIZED: &str = r#"
extern "C" __global__ void read_past(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + 1];  // reads x[n]
}
extern "C" __global__ void shared_race(int* out) {
    __shared__ int word;
    if (threadIdx.x == 0) word = 42;
    if (threadIdx.x == 1) out[0] = word;  // no barrier between the write and the read
}
"#;

/// The child's side: does nothing unless the parent set the role.
#[test]
fn sanitizer_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "asan-oob" => {
            let m = build(SANITIZED);
            let n = 100usize;
            let x: Vec<f32> = vec![1.0; n];
            let mut y = vec![0f32; n];
            let (mut px, mut py, mut pn) = (x.as_ptr(), y.as_mut_ptr(), n as i32);
            m.run("read_past", [1, 1, 1], [128, 1, 1], 0, params!(px, py, pn))
                .unwrap();
        }
        "tsan-race" => {
            let m = build(SANITIZED);
            let mut out = vec![0i32; 1];
            let mut p = out.as_mut_ptr();
            m.run("shared_race", [1, 1, 1], [32, 1, 1], 0, params!(p))
                .unwrap();
        }
        "clean" => {
            let m = build(REDUCE);
            let x: Vec<f32> = (0..2 * 256).map(|i| (i % 5) as f32).collect();
            let mut out = vec![0f32; 2];
            let (mut px, mut po) = (x.as_ptr(), out.as_mut_ptr());
            m.run("reduce", [2, 1, 1], [256, 1, 1], 0, params!(px, po))
                .unwrap();
            assert_eq!(
                out,
                [x[..256].iter().sum::<f32>(), x[256..].iter().sum::<f32>()]
            );
            let m = build(RACE);
            let mut y = vec![0f32; 2 * 128];
            let (mut px, mut py, mut s) = (x.as_ptr(), y.as_mut_ptr(), 1i32);
            m.run("reverse", [2, 1, 1], [128, 1, 1], 0, params!(px, py, s))
                .unwrap();
            assert_eq!(y[0], x[127]);
        }
        other => panic!("unknown role {other}"),
    }
    eprintln!("CHILD DONE");
    // Leave before the test harness's own cross-thread reporting, which the (uninstrumented)
    // Rust standard library does with atomics TSan cannot see.
    // SAFETY: ends the process; nothing is left to clean up.
    unsafe { libc::_exit(0) };
}

fn runtime_lib(name: &str) -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let o = std::process::Command::new(cxx)
        .arg(format!("-print-file-name={name}"))
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
    std::path::Path::new(&p).is_absolute().then_some(p)
}

/// Runs the child role under `sanitizer`; its (success, stderr).
fn run_child(role: &str, sanitizer: &str) -> Option<(bool, String)> {
    let lib = runtime_lib(if sanitizer == "address" {
        "libasan.so"
    } else {
        "libtsan.so"
    });
    let Some(lib) = lib else {
        eprintln!("skipped: the host compiler has no {sanitizer} sanitizer runtime");
        return None;
    };
    let exe = std::env::current_exe().unwrap();
    // TSan needs its fixed memory layout, which address-space randomisation can break on some
    // kernels: setarch -R runs the child without it.
    let mut cmd = if sanitizer == "thread" && std::path::Path::new("/usr/bin/setarch").exists() {
        let mut c = std::process::Command::new("/usr/bin/setarch");
        c.args(["x86_64", "-R"]).arg(&exe);
        c
    } else {
        std::process::Command::new(&exe)
    };
    let out = cmd
        .args([
            "--exact",
            "sanitizer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env("SIMCLR_GPU_EMU_SANITIZE", sanitizer)
        .env("LD_PRELOAD", &lib)
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .env("TSAN_OPTIONS", "halt_on_error=1 report_signal_unsafe=0")
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Some((out.status.success(), err))
}

#[test]
fn address_sanitizer_reports_a_read_past_a_buffer() {
    let Some((ok, err)) = run_child("asan-oob", "address") else {
        return;
    };
    assert!(!ok, "the child should fail:\n{err}");
    assert!(
        err.contains("ERROR: AddressSanitizer: heap-buffer-overflow"),
        "{err}"
    );
    assert!(err.contains("READ of size 4"), "{err}");
}

#[test]
fn address_sanitizer_is_quiet_on_correct_kernels() {
    let Some((ok, err)) = run_child("clean", "address") else {
        return;
    };
    assert!(
        ok && err.contains("CHILD DONE") && !err.contains("AddressSanitizer"),
        "{err}"
    );
}

#[test]
fn thread_sanitizer_reports_a_shared_memory_race() {
    let Some((ok, err)) = run_child("tsan-race", "thread") else {
        return;
    };
    assert!(!ok, "the child should fail:\n{err}");
    assert!(err.contains("ThreadSanitizer: data race"), "{err}");
}

#[test]
fn thread_sanitizer_is_quiet_on_correct_kernels() {
    let Some((ok, err)) = run_child("clean", "thread") else {
        return;
    };
    assert!(
        ok && err.contains("CHILD DONE") && !err.contains("ThreadSanitizer"),
        "{err}"
    );
}

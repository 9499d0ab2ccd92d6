//! Tests of the emulated NCCL (`src/nccl/`), through its C ABI: ranks as threads of this
//! process (each on its own emulated device and non-blocking stream) and as a child process
//! (this test binary run again, its role and the unique id in its environment), against
//! results computed here from the definitions.

use std::ffi::{c_int, c_void, CStr};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use simclr_gpu_emu::driver::api;
use simclr_gpu_emu::nccl::reduce::*;
use simclr_gpu_emu::nccl::*;

/// `CU_STREAM_NON_BLOCKING`.
const NON_BLOCKING: u32 = 1;
/// `CUDA_ERROR_NOT_READY`.
const NOT_READY: u32 = 600;
/// The child process's role, and the unique id it joins (hex).
const ROLE: &str = "SIMCLR_NCCL_TEST_ROLE";
const ID: &str = "SIMCLR_NCCL_TEST_ID";

/// The driver initialised with enough devices for one rank per device (NCCL refuses two ranks
/// of a process on one device).
fn init_driver() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("SIMCLR_GPU_EMU_DEVICES", "4"));
    // SAFETY: the driver's entry point.
    assert_eq!(unsafe { api::cuInit(0) }, 0);
}

/// Makes device `d`'s primary context current on this thread; a new non-blocking stream.
fn bind(d: i32) -> *mut c_void {
    init_driver();
    // SAFETY: valid out-pointers.
    unsafe {
        let mut ctx = null_mut();
        assert_eq!(api::cuDevicePrimaryCtxRetain(&mut ctx, d), 0);
        assert_eq!(api::cuCtxSetCurrent(ctx), 0);
        let mut s = null_mut();
        assert_eq!(api::cuStreamCreate(&mut s, NON_BLOCKING), 0);
        s
    }
}

fn upload(v: &[u8]) -> u64 {
    let p = alloc(v.len());
    // SAFETY: host source of `v.len()` bytes into an allocation of as many.
    assert_eq!(
        unsafe { api::cuMemcpyHtoD_v2(p, v.as_ptr() as *const c_void, v.len()) },
        0
    );
    p
}

/// A fresh allocation: its bytes 0xFF.
fn alloc(bytes: usize) -> u64 {
    let mut p = 0u64;
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { api::cuMemAlloc_v2(&mut p, bytes) }, 0);
    p
}

/// `bytes` of `p` once `stream` has run everything queued.
fn download(stream: *mut c_void, p: u64, bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    // SAFETY: host destination of `bytes` bytes.
    unsafe {
        assert_eq!(api::cuStreamSynchronize(stream), 0);
        assert_eq!(
            api::cuMemcpyDtoH_v2(v.as_mut_ptr() as *mut c_void, p, bytes),
            0
        );
    }
    v
}

fn unique_id() -> NcclUniqueId {
    let mut id = NcclUniqueId { internal: [0; 128] };
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, ncclSuccess);
    id
}

fn init(n: usize, id: NcclUniqueId, rank: usize) -> NcclComm {
    let mut c = null_mut();
    // SAFETY: valid out-pointer.
    let r = unsafe { ncclCommInitRank(&mut c, n as c_int, id, rank as c_int) };
    assert_eq!(r, ncclSuccess, "init of rank {rank} of {n}");
    c
}

fn async_error(c: NcclComm) -> NcclResult {
    let mut e = 99;
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { ncclCommGetAsyncError(c, &mut e) }, ncclSuccess);
    e
}

fn close(c: NcclComm) {
    // SAFETY: a live communicator.
    unsafe {
        assert_eq!(ncclCommFinalize(c), ncclSuccess);
        assert_eq!(ncclCommDestroy(c), ncclSuccess);
    }
}

/// Runs `f(rank, stream, comm)` on `n` rank threads, each on device `rank`, all joined to one
/// new communicator; their results in rank order.
fn ranks<T: Send>(n: usize, f: impl Fn(usize, *mut c_void, NcclComm) -> T + Sync) -> Vec<T> {
    let id = unique_id();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let f = &f;
                s.spawn(move || {
                    let stream = bind(r as i32);
                    let c = init(n, id, r);
                    let out = f(r, stream, c);
                    close(c);
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A small deterministic generator.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
    fn f32(&mut self) -> f32 {
        (self.next() % (1 << 24)) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Rank `rank`'s `n` elements of `dtype`, as bytes: floats in [-1, 1) with every mantissa bit
/// in use (f32, f64), small integers for the 16-bit floats (so their sums are exact), anything
/// for integers.
fn data(dtype: u32, rank: usize, n: usize) -> Vec<u8> {
    let mut g = Lcg(rank as u64 * 1000 + dtype as u64 + 1);
    let mut v = Vec::new();
    for _ in 0..n {
        match dtype {
            NCCL_FLOAT32 => v.extend(g.f32().to_le_bytes()),
            NCCL_FLOAT64 => v.extend((g.f32() as f64 * (1.0 + 1e-12)).to_le_bytes()),
            NCCL_BFLOAT16 => {
                let x = (g.next() % 128) as f32 - 64.0;
                v.extend(((x.to_bits() >> 16) as u16).to_le_bytes())
            }
            NCCL_FLOAT16 => v.extend(f16_bits((g.next() % 128) as f64 - 64.0).to_le_bytes()),
            _ => {
                let b = g.next().to_le_bytes();
                v.extend(&b[..elem_size(dtype).unwrap()])
            }
        }
    }
    v
}

/// The sum over ranks, in rank order, computed in each type.
fn expected_sum(dtype: u32, inputs: &[Vec<u8>]) -> Vec<u8> {
    let es = elem_size(dtype).unwrap();
    let n = inputs[0].len() / es;
    let mut out = Vec::new();
    for i in 0..n {
        let el = |r: usize| &inputs[r][i * es..(i + 1) * es];
        macro_rules! sum {
            ($t:ty, $add:expr) => {{
                let mut acc = <$t>::from_le_bytes(el(0).try_into().unwrap());
                for r in 1..inputs.len() {
                    acc = $add(acc, <$t>::from_le_bytes(el(r).try_into().unwrap()));
                }
                out.extend(acc.to_le_bytes());
            }};
        }
        match dtype {
            NCCL_FLOAT32 => sum!(f32, |a, b| a + b),
            NCCL_FLOAT64 => sum!(f64, |a, b| a + b),
            NCCL_INT8 => sum!(i8, i8::wrapping_add),
            NCCL_UINT8 => sum!(u8, u8::wrapping_add),
            NCCL_INT32 => sum!(i32, i32::wrapping_add),
            NCCL_UINT32 => sum!(u32, u32::wrapping_add),
            NCCL_INT64 => sum!(i64, i64::wrapping_add),
            NCCL_UINT64 => sum!(u64, u64::wrapping_add),
            // Exact: small integers.
            NCCL_BFLOAT16 => {
                let s: f32 = (0..inputs.len())
                    .map(|r| {
                        f32::from_bits((u16::from_le_bytes(el(r).try_into().unwrap()) as u32) << 16)
                    })
                    .sum();
                out.extend(((s.to_bits() >> 16) as u16).to_le_bytes())
            }
            NCCL_FLOAT16 => {
                let s: f64 = (0..inputs.len())
                    .map(|r| f16_value(u16::from_le_bytes(el(r).try_into().unwrap())))
                    .sum();
                out.extend(f16_bits(s).to_le_bytes())
            }
            _ => unreachable!(),
        }
    }
    out
}

const TYPES: [u32; 10] = [
    NCCL_FLOAT32,
    NCCL_FLOAT64,
    NCCL_BFLOAT16,
    NCCL_FLOAT16,
    NCCL_INT8,
    NCCL_UINT8,
    NCCL_INT32,
    NCCL_UINT32,
    NCCL_INT64,
    NCCL_UINT64,
];

#[test]
fn all_reduce_sums_every_type_on_2_and_3_ranks() {
    const N: usize = 37;
    for n in [2, 3] {
        let got = ranks(n, |r, s, c| {
            let mut outs = Vec::new();
            for dtype in TYPES {
                let bytes = N * elem_size(dtype).unwrap();
                let send = upload(&data(dtype, r, N));
                let recv = alloc(bytes);
                // SAFETY: device buffers of N elements; the call returns before the exchange.
                let rc = unsafe { ncclAllReduce(send as _, recv as _, N, dtype, NCCL_SUM, c, s) };
                assert_eq!(rc, ncclSuccess);
                outs.push(download(s, recv, bytes));
            }
            // In place, f32.
            let buf = upload(&data(NCCL_FLOAT32, r, N));
            // SAFETY: as above.
            let rc = unsafe { ncclAllReduce(buf as _, buf as _, N, NCCL_FLOAT32, NCCL_SUM, c, s) };
            assert_eq!(rc, ncclSuccess);
            outs.push(download(s, buf, N * 4));
            outs
        });
        for (i, dtype) in TYPES.into_iter().enumerate() {
            let inputs: Vec<Vec<u8>> = (0..n).map(|r| data(dtype, r, N)).collect();
            let want = expected_sum(dtype, &inputs);
            for (r, g) in got.iter().enumerate() {
                assert_eq!(g[i], want, "type {dtype}, rank {r} of {n}");
            }
        }
        let inputs: Vec<Vec<u8>> = (0..n).map(|r| data(NCCL_FLOAT32, r, N)).collect();
        for g in &got {
            assert_eq!(
                g[TYPES.len()],
                expected_sum(NCCL_FLOAT32, &inputs),
                "in place"
            );
        }
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn gather_broadcast_reduce_and_other_operators() {
    const N: usize = 5;
    for n in [2, 3] {
        let vals = |r: usize| -> Vec<f32> { (0..N).map(|i| (r * 10 + i) as f32 + 0.5).collect() };
        let got = ranks(n, |r, s, c| {
            let mine = upload(&bytes(&vals(r)));
            let gathered = alloc(N * n * 4);
            let bcast = alloc(N * 4);
            let inplace = upload(&bytes(&vals(r)));
            let reduced = alloc(N * 4);
            let scattered = alloc(4);
            let big: Vec<f32> = (0..n).map(|i| (r * n + i) as f32).collect();
            let big = upload(&bytes(&big));
            let maxed = alloc(N * 4);
            let avg = alloc(N * 4);
            let root = n - 1;
            // SAFETY: device buffers of the sizes each call reads and writes; the broadcast's
            // send buffer is read on the root only, so the others pass NULL.
            unsafe {
                assert_eq!(
                    ncclAllGather(mine as _, gathered as _, N, NCCL_FLOAT32, c, s),
                    0
                );
                let src = if r == 1 {
                    mine as *const c_void
                } else {
                    std::ptr::null()
                };
                assert_eq!(ncclBroadcast(src, bcast as _, N, NCCL_FLOAT32, 1, c, s), 0);
                assert_eq!(ncclBcast(inplace as _, N, NCCL_FLOAT32, 0, c, s), 0);
                let dst = if r == root {
                    reduced as *mut c_void
                } else {
                    null_mut()
                };
                assert_eq!(
                    ncclReduce(
                        mine as _,
                        dst,
                        N,
                        NCCL_FLOAT32,
                        NCCL_SUM,
                        root as c_int,
                        c,
                        s
                    ),
                    0
                );
                assert_eq!(
                    ncclReduceScatter(big as _, scattered as _, 1, NCCL_FLOAT32, NCCL_SUM, c, s),
                    0
                );
                assert_eq!(
                    ncclAllReduce(mine as _, maxed as _, N, NCCL_FLOAT32, NCCL_MAX, c, s),
                    0
                );
                assert_eq!(
                    ncclAllReduce(mine as _, avg as _, N, NCCL_FLOAT32, NCCL_AVG, c, s),
                    0
                );
            }
            let reduced = (r == root).then(|| f32s(&download(s, reduced, N * 4)));
            (
                f32s(&download(s, gathered, N * n * 4)),
                f32s(&download(s, bcast, N * 4)),
                f32s(&download(s, inplace, N * 4)),
                reduced,
                f32s(&download(s, scattered, 4)),
                f32s(&download(s, maxed, N * 4)),
                f32s(&download(s, avg, N * 4)),
            )
        });
        let all: Vec<f32> = (0..n).flat_map(vals).collect();
        let sum: Vec<f32> = (0..N)
            .map(|i| (1..n).fold(vals(0)[i], |a, r| a + vals(r)[i]))
            .collect();
        let scale = 1.0 / n as f32;
        let avg: Vec<f32> = (0..N)
            .map(|i| (1..n).fold(vals(0)[i] * scale, |a, r| a + vals(r)[i] * scale))
            .collect();
        for (r, g) in got.iter().enumerate() {
            assert_eq!(g.0, all, "all-gather, rank {r} of {n}");
            assert_eq!(g.1, vals(1), "broadcast from rank 1");
            assert_eq!(g.2, vals(0), "in-place broadcast from rank 0");
            assert_eq!(
                g.3.as_ref(),
                (r == n - 1).then_some(&sum),
                "reduce to the last rank"
            );
            // Rank r's block of sum over q of [q*n, q*n+1, ...].
            let want = (0..n).map(|q| (q * n + r) as f32).sum::<f32>();
            assert_eq!(g.4, vec![want], "reduce-scatter, rank {r}");
            assert_eq!(g.5, vals(n - 1), "max");
            assert_eq!(g.6, avg, "avg");
        }
    }
}

#[test]
fn grouped_calls_over_two_communicators_in_different_orders() {
    const N: usize = 8;
    let (a, b) = (unique_id(), unique_id());
    let got: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                sc.spawn(move || {
                    let s1 = bind(r as i32);
                    let mut s2 = null_mut();
                    // SAFETY: valid out-pointer.
                    assert_eq!(unsafe { api::cuStreamCreate(&mut s2, NON_BLOCKING) }, 0);
                    let ca = init(2, a, r);
                    let cb = init(2, b, r);
                    let x = upload(&bytes(&[r as f32 + 1.0; N]));
                    let y = upload(&bytes(&[r as f32 * 10.0; N]));
                    let z = upload(&bytes(&[r as f32 + 100.0; N]));
                    let yg = alloc(2 * N * 4);
                    let zb = alloc(N * 4);
                    // Twice: every call on one stream, then communicator b's on a second.
                    let mut outs = Vec::new();
                    for sb in [s1, s2] {
                        // SAFETY: device buffers of the sizes the calls use; the group queues
                        // them at its end.
                        unsafe {
                            assert_eq!(ncclGroupStart(), 0);
                            let on_a = || {
                                assert_eq!(
                                    ncclAllReduce(
                                        x as _,
                                        x as _,
                                        N,
                                        NCCL_FLOAT32,
                                        NCCL_SUM,
                                        ca,
                                        s1
                                    ),
                                    0
                                );
                                assert_eq!(
                                    ncclAllReduce(
                                        z as _,
                                        zb as _,
                                        N,
                                        NCCL_FLOAT32,
                                        NCCL_MIN,
                                        ca,
                                        s1
                                    ),
                                    0
                                );
                            };
                            let on_b = || {
                                assert_eq!(
                                    ncclAllGather(y as _, yg as _, N, NCCL_FLOAT32, cb, sb),
                                    0
                                );
                            };
                            // Rank 0 calls a's first, rank 1 b's first: NCCL's groups allow it.
                            if r == 0 {
                                on_a();
                                on_b();
                            } else {
                                on_b();
                                on_a();
                            }
                            assert_eq!(ncclGroupEnd(), 0);
                        }
                        // SAFETY: a live stream.
                        assert_eq!(unsafe { api::cuStreamSynchronize(sb) }, 0);
                        outs.push((
                            f32s(&download(s1, x, N * 4)),
                            f32s(&download(s1, zb, N * 4)),
                            f32s(&download(sb, yg, 2 * N * 4)),
                        ));
                    }
                    close(ca);
                    close(cb);
                    outs
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let gathered: Vec<f32> = [vec![0.0; N], vec![10.0; N]].concat();
    for outs in &got {
        // x summed in place twice: (1 + 2), then (3 + 3).
        assert_eq!(outs[0].0, vec![3.0; N]);
        assert_eq!(outs[1].0, vec![6.0; N]);
        for o in outs {
            assert_eq!(o.1, vec![100.0; N]);
            assert_eq!(o.2, gathered);
        }
    }
}

/// Waits up to 5 s for `stream` to run everything queued; how long it took.
fn wait_stream(stream: *mut c_void) -> Duration {
    let t = Instant::now();
    // SAFETY: a live stream.
    while unsafe { api::cuStreamQuery(stream) } == NOT_READY {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the stream is still blocked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

/// Checks for a while that a collective queued on `stream` is still waiting, with no
/// asynchronous error (NCCL's behaviour while a peer is merely absent).
fn still_waiting(stream: *mut c_void, c: NcclComm) {
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: a live stream.
        assert_eq!(unsafe { api::cuStreamQuery(stream) }, NOT_READY);
        assert_eq!(async_error(c), ncclSuccess);
    }
}

#[test]
fn a_peer_that_aborts_ends_the_others_wait_with_a_remote_error() {
    let id = unique_id();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    std::thread::scope(|sc| {
        let peer = sc.spawn(move || {
            let s = bind(1);
            let c = init(2, id, 1);
            let buf = upload(&bytes(&[2.0; 4]));
            // SAFETY: a device buffer of 4 f32.
            assert_eq!(
                unsafe { ncclAllReduce(buf as _, buf as _, 4, NCCL_FLOAT32, NCCL_SUM, c, s) },
                0
            );
            assert_eq!(f32s(&download(s, buf, 16)), vec![3.0; 4]);
            go_rx.recv().unwrap();
            // SAFETY: a live communicator with nothing queued.
            assert_eq!(unsafe { ncclCommAbort(c) }, ncclSuccess);
        });
        let s = bind(0);
        let c = init(2, id, 0);
        let buf = upload(&bytes(&[1.0; 4]));
        // SAFETY: a device buffer of 4 f32; the second all-reduce has no partner.
        unsafe {
            assert_eq!(
                ncclAllReduce(buf as _, buf as _, 4, NCCL_FLOAT32, NCCL_SUM, c, s),
                0
            );
            assert_eq!(f32s(&download(s, buf, 16)), vec![3.0; 4]);
            let out = alloc(16);
            assert_eq!(
                ncclAllReduce(buf as _, out as _, 4, NCCL_FLOAT32, NCCL_SUM, c, s),
                0
            );
            still_waiting(s, c);
            go_tx.send(()).unwrap();
            let took = wait_stream(s);
            assert!(took < Duration::from_secs(2), "{took:?}");
            assert_eq!(async_error(c), ncclRemoteError);
            // Nothing written; the context is healthy.
            assert_eq!(download(s, out, 16), vec![0xff; 16]);
            // NCCL's advice after an error: abort.
            assert_eq!(ncclCommAbort(c), ncclSuccess);
            assert_eq!(async_error(c), ncclRemoteError);
            assert_eq!(ncclCommDestroy(c), ncclInvalidUsage);
        }
        peer.join().unwrap();
    });
}

#[test]
fn an_abort_stops_a_blocked_collective_and_a_blocked_init() {
    let id = unique_id();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::scope(|sc| {
        let peer = sc.spawn(move || {
            let _s = bind(1);
            let c = init(2, id, 1);
            done_rx.recv().unwrap();
            assert_eq!(async_error(c), ncclSuccess);
            // It called no collective: finalize and destroy return at once.
            close(c);
        });
        let s = bind(0);
        let c = init(2, id, 0);
        let buf = upload(&bytes(&[1.0; 4]));
        let out = alloc(16);
        // SAFETY: device buffers of 4 f32.
        unsafe {
            assert_eq!(
                ncclAllReduce(buf as _, out as _, 4, NCCL_FLOAT32, NCCL_SUM, c, s),
                0
            );
        }
        still_waiting(s, c);
        let handle = c as usize;
        let t = Instant::now();
        // SAFETY: a live communicator, aborted from another thread while its collective waits.
        let rc = std::thread::spawn(move || unsafe { ncclCommAbort(handle as NcclComm) })
            .join()
            .unwrap();
        assert_eq!(rc, ncclSuccess);
        let took = wait_stream(s);
        assert!(t.elapsed() < Duration::from_secs(2), "{took:?}");
        assert_eq!(async_error(c), ncclSystemError);
        assert_eq!(download(s, out, 16), vec![0xff; 16]);
        // A call on the aborted communicator is an error, not a use of freed memory.
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                ncclAllReduce(buf as _, out as _, 4, NCCL_FLOAT32, NCCL_SUM, c, s),
                ncclInvalidUsage
            );
        }
        done_tx.send(()).unwrap();
        peer.join().unwrap();
    });

    // An init whose peer never comes, aborted from another thread through the handle it wrote.
    let id = unique_id();
    let slot = AtomicPtr::<c_void>::new(null_mut());
    std::thread::scope(|sc| {
        let slot = &slot;
        let init = sc.spawn(move || {
            let _s = bind(0);
            // SAFETY: the out-pointer is an aligned pointer-sized cell.
            unsafe { ncclCommInitRank(slot.as_ptr(), 2, id, 0) }
        });
        let t = Instant::now();
        let h = loop {
            let h = slot.load(Ordering::SeqCst);
            if !h.is_null() {
                break h;
            }
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(async_error(h), ncclInProgress);
        let t = Instant::now();
        // SAFETY: the handle of an init under way.
        assert_eq!(unsafe { ncclCommAbort(h) }, ncclSuccess);
        assert_eq!(init.join().unwrap(), ncclSystemError);
        assert!(t.elapsed() < Duration::from_secs(2));
    });
}

#[test]
fn arguments_configurations_and_groups_are_checked_as_nccl_does() {
    let s = bind(0);
    // SAFETY: valid and invalid arguments to the entry points; every pointer passed is valid
    // or NULL.
    unsafe {
        let mut v = 0;
        assert_eq!(ncclGetVersion(&mut v), ncclSuccess);
        assert_eq!(v, NCCL_VERSION_CODE);
        let text = |r| CStr::from_ptr(ncclGetErrorString(r)).to_str().unwrap();
        assert_eq!(text(ncclSuccess), "no error");
        assert_eq!(
            text(ncclRemoteError),
            "remote process exited or there was a network error"
        );
        assert_eq!(text(ncclInProgress), "NCCL operation in progress");

        let mut c = null_mut();
        let bad = NcclUniqueId { internal: [7; 128] };
        assert_eq!(ncclCommInitRank(&mut c, 1, bad, 0), ncclInvalidArgument);
        assert_eq!(
            ncclCommInitRank(&mut c, 2, unique_id(), 2),
            ncclInvalidArgument
        );
        let mut cfg = NcclConfigHead {
            size: 128,
            magic: NCCL_CONFIG_MAGIC,
            version: NCCL_VERSION_CODE as u32,
            blocking: 0,
        };
        assert_eq!(
            ncclCommInitRankConfig(&mut c, 1, unique_id(), 0, &mut cfg),
            ncclInvalidUsage
        );
        let last = CStr::from_ptr(ncclGetLastError(null_mut())).to_string_lossy();
        assert!(last.contains("non-blocking"), "{last}");
        cfg.magic = 0;
        assert_eq!(
            ncclCommInitRankConfig(&mut c, 1, unique_id(), 0, &mut cfg),
            ncclInvalidArgument
        );
        cfg.magic = NCCL_CONFIG_MAGIC;
        cfg.blocking = 1;
        assert_eq!(
            ncclCommInitRankConfig(&mut c, 1, unique_id(), 0, &mut cfg),
            ncclSuccess
        );

        // One rank: the collectives are copies.
        let (mut n, mut r) = (0, 9);
        assert_eq!(ncclCommCount(c, &mut n), 0);
        assert_eq!(ncclCommUserRank(c, &mut r), 0);
        assert_eq!((n, r), (1, 0));
        let x = upload(&bytes(&[1.5, -2.0]));
        let y = alloc(8);
        assert_eq!(
            ncclAllReduce(x as _, y as _, 2, NCCL_FLOAT32, NCCL_SUM, c, s),
            0
        );
        assert_eq!(f32s(&download(s, y, 8)), vec![1.5, -2.0]);

        // Bad arguments fail at the call.
        assert_eq!(
            ncclAllReduce(x as _, y as _, 3, NCCL_FLOAT32, NCCL_SUM, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclAllReduce(x as _, y as _, 2, 42, NCCL_SUM, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclAllReduce(x as _, y as _, 2, NCCL_FLOAT32, 9, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclBroadcast(x as _, y as _, 2, NCCL_FLOAT32, 1, c, s),
            ncclInvalidArgument
        );
        assert_eq!(
            ncclAllReduce(x as _, y as _, 2, NCCL_FLOAT32, NCCL_SUM, null_mut(), s),
            ncclInvalidArgument
        );
        assert_eq!(ncclGroupEnd(), ncclInvalidUsage);
        // A group with a bad call queues nothing and returns the error at its end.
        assert_eq!(ncclGroupStart(), 0);
        assert_eq!(
            ncclAllReduce(x as _, y as _, 2, NCCL_FLOAT32, NCCL_PROD, c, s),
            0
        );
        assert_eq!(
            ncclAllReduce(x as _, y as _, 2, 42, NCCL_SUM, c, s),
            ncclInvalidArgument
        );
        assert_eq!(ncclGroupEnd(), ncclInvalidArgument);
        // Nested groups queue at the outermost end.
        assert_eq!(ncclGroupStart(), 0);
        assert_eq!(ncclGroupStart(), 0);
        assert_eq!(
            ncclAllReduce(x as _, x as _, 2, NCCL_FLOAT32, NCCL_SUM, c, s),
            0
        );
        assert_eq!(ncclGroupEnd(), 0);
        assert_eq!(ncclGroupEnd(), 0);
        assert_eq!(f32s(&download(s, x, 8)), vec![1.5, -2.0]);
        close(c);
        assert_eq!(
            ncclAllReduce(x as _, y as _, 2, NCCL_FLOAT32, NCCL_SUM, c, s),
            ncclInvalidUsage
        );
    }

    // Two ranks of one process on one device: NCCL's "Duplicate GPU detected".
    let id = unique_id();
    let rcs: Vec<NcclResult> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                sc.spawn(move || {
                    let _s = bind(3);
                    let mut c = null_mut();
                    // SAFETY: a valid out-pointer.
                    let rc = unsafe { ncclCommInitRank(&mut c, 2, id, r) };
                    assert!(c.is_null());
                    rc
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(rcs, vec![ncclInvalidUsage; 2]);
}

fn hex(id: &NcclUniqueId) -> String {
    id.internal
        .iter()
        .map(|&b| format!("{:02x}", b as u8))
        .collect()
}

fn unhex(s: &str) -> NcclUniqueId {
    let mut id = NcclUniqueId { internal: [0; 128] };
    for (i, d) in id.internal.iter_mut().enumerate() {
        *d = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap() as _;
    }
    id
}

/// This test binary again, as rank 1 of the communicator `id`, in role `role` (see
/// [`child_rank`]).
fn spawn_child(role: &str, id: &NcclUniqueId) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_rank", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(ID, hex(id))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Rank 1 in a child process: nothing unless the parent set [`ROLE`]. `exchange`: an
/// all-reduce, an all-gather and a broadcast with rank 0, checked; `die`: joins, then exits
/// without a word to NCCL.
#[test]
fn child_rank() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let id = unhex(&std::env::var(ID).unwrap());
    let s = bind(0);
    let c = init(2, id, 1);
    if role == "die" {
        std::process::exit(3);
    }
    assert_eq!(exchange(1, s, c), expected_exchange());
    close(c);
}

fn exchange(r: usize, s: *mut c_void, c: NcclComm) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mine: Vec<f32> = (0..1000).map(|i| (i * (r + 1)) as f32 * 0.25).collect();
    let x = upload(&bytes(&mine));
    let sum = alloc(4000);
    let all = alloc(8000);
    let b = alloc(4000);
    // SAFETY: device buffers of the sizes the calls use.
    unsafe {
        assert_eq!(
            ncclAllReduce(x as _, sum as _, 1000, NCCL_FLOAT32, NCCL_SUM, c, s),
            0
        );
        assert_eq!(ncclAllGather(x as _, all as _, 1000, NCCL_FLOAT32, c, s), 0);
        assert_eq!(
            ncclBroadcast(x as _, b as _, 1000, NCCL_FLOAT32, 1, c, s),
            0
        );
    }
    (
        f32s(&download(s, sum, 4000)),
        f32s(&download(s, all, 8000)),
        f32s(&download(s, b, 4000)),
    )
}

fn expected_exchange() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let v = |r: usize| -> Vec<f32> { (0..1000).map(|i| (i * (r + 1)) as f32 * 0.25).collect() };
    let sum = v(0).iter().zip(v(1)).map(|(a, b)| a + b).collect();
    (sum, [v(0), v(1)].concat(), v(1))
}

#[test]
fn two_processes_exchange_data() {
    let s = bind(0);
    let id = unique_id();
    let mut child = spawn_child("exchange", &id);
    let c = init(2, id, 0);
    assert_eq!(exchange(0, s, c), expected_exchange());
    close(c);
    assert!(child.wait().unwrap().success(), "the child rank failed");
}

#[test]
fn a_peer_process_that_exits_fails_the_collective_with_a_remote_error() {
    let s = bind(0);
    let id = unique_id();
    let mut child = spawn_child("die", &id);
    let c = init(2, id, 0);
    assert_eq!(child.wait().unwrap().code(), Some(3));
    let x = upload(&bytes(&[1.0; 4]));
    // SAFETY: a device buffer of 4 f32.
    unsafe {
        assert_eq!(
            ncclAllReduce(x as _, x as _, 4, NCCL_FLOAT32, NCCL_SUM, c, s),
            0
        );
    }
    let took = wait_stream(s);
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(async_error(c), ncclRemoteError);
    assert_eq!(f32s(&download(s, x, 16)), vec![1.0; 4]);
    // SAFETY: a live communicator.
    assert_eq!(unsafe { ncclCommAbort(c) }, ncclSuccess);
}

#[test]
fn contributions_are_deleted_once_every_rank_has_read_them() {
    let id = unique_id();
    let bytes_id: [u8; 128] = id.internal.map(|c| c as u8);
    let dir = simclr_gpu_emu::nccl::rendezvous::folder(&bytes_id).unwrap();
    let dir = &dir;
    std::thread::scope(|sc| {
        for r in 0..2 {
            sc.spawn(move || {
                let s = bind(r as i32);
                let c = init(2, id, r);
                let x = upload(&bytes(&[1.0; 16]));
                for _ in 0..100 {
                    // SAFETY: a device buffer of 16 f32.
                    let rc =
                        unsafe { ncclAllReduce(x as _, x as _, 16, NCCL_FLOAT32, NCCL_SUM, c, s) };
                    assert_eq!(rc, 0);
                }
                assert_eq!(f32s(&download(s, x, 64)), vec![2f32.powi(100); 16]);
                let left = std::fs::read_dir(dir)
                    .unwrap()
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .starts_with('c')
                    })
                    .count();
                // At most the last two collectives' contributions of each rank.
                assert!(left <= 4, "{left} contributions left");
                close(c);
            });
        }
    });
    assert!(!dir.exists(), "the last rank to leave removes the folder");
}

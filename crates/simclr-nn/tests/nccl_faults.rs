//! NCCL's failures end in an error within the timeout, never in a hang: here a peer that took
//! part in the unique-id exchange but never reached its own `ncclCommInitRank` (it died in
//! between). A test binary of its own: the init thread it leaves behind stays blocked inside
//! NCCL until the process ends. Needs one GPU; prints that it skipped elsewhere.

use std::time::{Duration, Instant};

use simclr_nn::dist::{CommError, Communicator, NcclComm, ThreadComm};
use simclr_nn::{Device, NnError};

/// Without a GPU a GPU test prints that it skipped, unless `SIMCLR_REQUIRE_GPU=1` (CI on the
/// emulated device, the GPU machine's check), where skipping is a failure.
fn skip_without_gpu(test: &str) {
    if std::env::var("SIMCLR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: no CUDA driver or no GPU, and SIMCLR_REQUIRE_GPU=1 forbids skipping");
    }
    println!("{test}: skipped (no CUDA driver or no GPU on this machine)");
}

#[test]
fn an_init_whose_peer_never_comes_fails_within_the_timeout() {
    if !simclr_kernels::cuda::gpu_available() {
        skip_without_gpu("an_init_whose_peer_never_comes_fails_within_the_timeout");
        return;
    }
    let mut comms = ThreadComm::group(2, Duration::from_secs(60));
    let peer = comms.pop().unwrap();
    let me = comms.pop().unwrap();
    let (gone_tx, gone_rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        // The id exchange, then nothing: this rank "dies" before its init (its handle stays
        // open until the test ends, so the bootstrap group does not report it lost).
        peer.all_gather_bytes(&[], "NCCL unique id").unwrap();
        let _ = gone_rx.recv();
    });
    let timeout = Duration::from_secs(3);
    let t = Instant::now();
    let e = match NcclComm::new(&me, Device::Cuda(0), timeout) {
        Ok(_) => panic!("a NCCL group of 2 started with one rank"),
        Err(e) => e,
    };
    let took = t.elapsed();
    drop(gone_tx);
    h.join().unwrap();
    assert!(
        matches!(&e, NnError::Comm(CommError::Nccl { op, .. }) if op == "ncclCommInitRank"),
        "{e}"
    );
    assert!(e.to_string().contains("not complete after 3s"), "{e}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    println!("init without its peer failed after {took:?}: {e}");
}

//! Data parallelism is exact: K replicas with B/K images each give the loss, the gradients and
//! the weights after a few LARS steps of one replica with all B images, when batch norm is global
//! and the negatives are gathered; with either switched off they do not (the difference is
//! measured, so these tests can fail). Also: a killed rank ends the others with an error, and
//! ranks started by torchrun meet beside its agent's store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use simclr_nn::dist::{
    broadcast_state, forward_backward_dp, CommError, Communicator, DataParallel, RendezvousConfig,
    TcpComm, ThreadComm,
};
use simclr_nn::{
    ContrastiveLoss, HeadConfig, Lars, Module, Optimizer, ResNetConfig, SimClr, SimClrConfig, Stem,
    Tensor,
};

const B: usize = 8;
const SIDE: usize = 8;
const STEPS: usize = 3;
const LR: f32 = 0.5;

fn model(seed: u64) -> SimClr {
    model_with_output(seed, 8)
}

/// The test model with `output_dim` embedding dimensions.
fn model_with_output(seed: u64, output_dim: usize) -> SimClr {
    let mut encoder = ResNetConfig::resnet(18, 1, Stem::Cifar).unwrap();
    encoder.layers = [1, 1, 1, 1];
    encoder.base_width = 4;
    let head = HeadConfig::Mlp {
        hidden_layers: 1,
        hidden_dim: 16,
        output_dim,
    };
    SimClr::new(
        &SimClrConfig { encoder, head },
        simclr_nn::Device::Cpu,
        seed,
    )
    .unwrap()
}

/// Two views of B images for each step: `[view][image][3][SIDE][SIDE]`.
fn batches() -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    (0..STEPS)
        .map(|_| {
            let base: Vec<f32> = (0..B * 3 * SIDE * SIDE)
                .map(|_| rng.random::<f32>())
                .collect();
            let mut v = base.clone();
            v.extend(
                base.iter()
                    .map(|x| (x + 0.3 * rng.random::<f32>()).min(1.0)),
            );
            v
        })
        .collect()
}

/// Replica `rank`'s views of its images `rank * b .. (rank + 1) * b`, as `[2b, 3, SIDE, SIDE]`.
fn local_views(all: &[f32], rank: usize, world: usize) -> Tensor {
    let b = B / world;
    let img = 3 * SIDE * SIDE;
    let mut v = Vec::with_capacity(2 * b * img);
    for view in 0..2 {
        let start = (view * B + rank * b) * img;
        v.extend_from_slice(&all[start..start + b * img]);
    }
    Tensor::from_vec(&[2 * b, 3, SIDE, SIDE], v).unwrap()
}

fn lars() -> Lars {
    let mut l = Lars::default();
    l.weight_decay = 1e-4;
    l
}

/// What a run of STEPS steps gives: the losses, the gradients of the first step and the weights
/// at the end (both flattened in visiting order).
#[derive(Debug)]
struct Run {
    losses: Vec<f32>,
    grads: Vec<f32>,
    weights: Vec<f32>,
}

fn flat(model: &mut SimClr, grads: bool) -> Vec<f32> {
    let mut v = Vec::new();
    model.for_each_param(&mut |_, p| {
        let t = if grads { &p.grad } else { &p.value };
        v.extend_from_slice(t.as_slice().unwrap());
    });
    v
}

fn single(loss: &ContrastiveLoss) -> Run {
    run_steps(model(0), 0, 1, |m, views| {
        m.zero_grad();
        let (_, z) = m.forward(views, true).unwrap();
        let (l, dz) = loss.forward_backward(&z).unwrap();
        m.backward(&dz).unwrap();
        l
    })
}

/// STEPS LARS steps from `m` on replica `rank`'s share of each batch, `fwd_bwd` leaving the
/// gradients in the model and returning the loss.
fn run_steps(
    mut m: SimClr,
    rank: usize,
    world: usize,
    mut fwd_bwd: impl FnMut(&mut SimClr, &Tensor) -> f32,
) -> Run {
    let mut opt = lars();
    let mut run = Run {
        losses: vec![],
        grads: vec![],
        weights: vec![],
    };
    for (s, batch) in batches().iter().enumerate() {
        let views = local_views(batch, rank, world);
        let l = fwd_bwd(&mut m, &views);
        if s == 0 {
            run.grads = flat(&mut m, true);
        }
        opt.step(&mut m, LR).unwrap();
        run.losses.push(l);
    }
    run.weights = flat(&mut m, false);
    run
}

fn replica(
    comm: Arc<dyn Communicator>,
    loss: &ContrastiveLoss,
    gather: bool,
    global_bn: bool,
    bucket_mib: Option<f64>,
) -> Run {
    let rank = comm.rank();
    let world = comm.world_size();
    // Different seeds: the broadcast must make the replicas start from rank 0's weights.
    let mut m = model(rank as u64 * 1000);
    assert_eq!(
        broadcast_state(&mut m, comm.as_ref(), 0).unwrap(),
        simclr_nn::dist::BroadcastPath::Host,
        "CPU communicators broadcast through the host"
    );
    let mut dp = DataParallel::new(comm);
    dp.gather_negatives = gather;
    dp.global_batch_norm = global_bn;
    if let Some(mib) = bucket_mib {
        dp = dp.with_overlap(mib).unwrap();
    }
    run_steps(m, rank, world, |m, views| {
        forward_backward_dp(m, views, loss, &dp).unwrap().0
    })
}

fn data_parallel(world: usize, loss: &ContrastiveLoss, gather: bool, global_bn: bool) -> Vec<Run> {
    data_parallel_with(world, loss, gather, global_bn, None)
}

fn data_parallel_with(
    world: usize,
    loss: &ContrastiveLoss,
    gather: bool,
    global_bn: bool,
    bucket_mib: Option<f64>,
) -> Vec<Run> {
    let comms = ThreadComm::group(world, Duration::from_secs(60));
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let loss = *loss;
                s.spawn(move || replica(Arc::new(c), &loss, gather, global_bn, bucket_mib))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// max |a - b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn max_loss_diff(a: &Run, b: &Run) -> f32 {
    a.losses
        .iter()
        .zip(&b.losses)
        .map(|(x, y)| (x - y).abs() / y.abs())
        .fold(0.0, f32::max)
}

const NT_XENT: ContrastiveLoss = ContrastiveLoss::NtXent { temperature: 0.2 };

#[test]
fn k_replicas_equal_one_replica_with_the_whole_batch() {
    let one = single(&NT_XENT);
    for world in [2, 4] {
        let runs = data_parallel(world, &NT_XENT, true, true);
        for (r, run) in runs.iter().enumerate() {
            let dl = max_loss_diff(run, &one);
            assert!(
                dl < 1e-5,
                "K={world} rank {r}: losses {:?} vs {:?}",
                run.losses,
                one.losses
            );
            let dg = rel(&run.grads, &one.grads);
            assert!(dg < 1e-4, "K={world} rank {r}: gradients differ by {dg}");
            let dw = rel(&run.weights, &one.weights);
            assert!(
                dw < 1e-4,
                "K={world} rank {r}: weights after {STEPS} LARS steps differ by {dw}"
            );
            if r == 0 {
                println!(
                    "K={world}: loss {dl:.1e}, gradients {dg:.1e}, weights {dw:.1e} (relative)"
                );
            }
            // Every replica holds exactly the same weights.
            assert_eq!(
                run.weights, runs[0].weights,
                "K={world}: rank {r} drifted from rank 0"
            );
        }
    }
}

#[test]
fn without_global_batch_norm_or_gathered_negatives_the_result_differs() {
    let one = single(&NT_XENT);
    let world = 4;
    let local_bn = &data_parallel(world, &NT_XENT, true, false)[0];
    let local_neg = &data_parallel(world, &NT_XENT, false, true)[0];
    // Far outside the tolerance of the exact test above.
    let (bn_l, bn_g) = (
        max_loss_diff(local_bn, &one),
        rel(&local_bn.grads, &one.grads),
    );
    assert!(
        bn_g > 1e-2,
        "per-replica batch norm: gradients only differ by {bn_g}"
    );
    let (neg_l, neg_g) = (
        max_loss_diff(local_neg, &one),
        rel(&local_neg.grads, &one.grads),
    );
    assert!(
        neg_l > 0.05,
        "local negatives: losses only differ by {neg_l}"
    );
    assert!(
        neg_g > 1e-2,
        "local negatives: gradients only differ by {neg_g}"
    );
    // With fewer negatives the loss is lower: log(2b - 1) against log(2B - 1) terms.
    assert!(local_neg.losses[0] < one.losses[0]);
    println!("per-replica BN: loss {bn_l:.2e}, grads {bn_g:.2e}; local negatives: loss {neg_l:.2e}, grads {neg_g:.2e}");
}

/// The all-reduce overlapped with the backward pass, in many small buckets or in one, sums the
/// same values in the same order as the one after the backward pass: the same bits.
#[test]
fn the_overlapped_all_reduce_gives_the_same_bits() {
    for world in [2, 4] {
        let plain = data_parallel(world, &NT_XENT, true, true);
        // 0.0005 MiB is 131 values: a bucket or more for every block.
        for mib in [0.0005, 64.0] {
            let over = data_parallel_with(world, &NT_XENT, true, true, Some(mib));
            for (r, (o, p)) in over.iter().zip(&plain).enumerate() {
                assert_eq!(o.losses, p.losses, "K={world} rank {r}, {mib} MiB: losses");
                assert_eq!(o.grads, p.grads, "K={world} rank {r}, {mib} MiB: gradients");
                assert_eq!(
                    o.weights, p.weights,
                    "K={world} rank {r}, {mib} MiB: weights"
                );
            }
        }
    }
}

/// `f` on each rank of a group of 2 threads; the results in rank order.
fn on_two_ranks<T: Send>(f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
    let comms = ThreadComm::group(2, Duration::from_secs(60));
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Parameters that the backward pass never hands over are still reduced, at the end.
#[test]
fn gradients_never_handed_over_are_reduced_at_the_end() {
    let grads = on_two_ranks(|c| {
        let rank = c.rank();
        let mut m = model(0);
        let views = local_views(&batches()[0], rank, 2);
        let (_, z) = m.forward(&views, true).unwrap();
        let (_, dz) = NT_XENT.forward_backward(&z).unwrap();
        m.backward(&dz).unwrap();
        let mut want = flat(&mut m, true);
        c.all_reduce_f32(&mut want).unwrap();
        let buckets = simclr_nn::dist::GradBuckets::new(&c, 0.001).unwrap();
        let mut round = buckets.round();
        // Only the head is handed over; the encoder's gradients are left behind.
        round.ready(&mut m.head).unwrap();
        round.finish(&mut m).unwrap();
        (flat(&mut m, true), want)
    });
    for (got, want) in &grads {
        assert_eq!(got, want);
    }
    assert_eq!(grads[0].0, grads[1].0);
}

/// Replicas with batches of different sizes all stop with the same clear error before any
/// collective could mix them.
#[test]
fn replicas_with_different_batches_all_stop_with_an_error() {
    let errs = on_two_ranks(|c| {
        let rank = c.rank();
        let mut m = model(0);
        // Rank 1 lost an image: 3 images against rank 0's 4.
        let all = &batches()[0];
        let mut views = local_views(all, 0, 2);
        if rank == 1 {
            let img = 3 * SIDE * SIDE;
            let v = views.as_slice().unwrap();
            let mut short = v[..3 * img].to_vec();
            short.extend_from_slice(&v[4 * img..7 * img]);
            views = Tensor::from_vec(&[6, 3, SIDE, SIDE], short).unwrap();
        }
        let dp = DataParallel::new(Arc::new(c));
        forward_backward_dp(&mut m, &views, &NT_XENT, &dp)
            .unwrap_err()
            .to_string()
    });
    for e in &errs {
        assert!(e.contains("batches differ in shape"), "{e}");
    }
    assert!(errs[1].contains("[6, 3, 8, 8]"), "{}", errs[1]);
}

/// Replicas built differently (here a wider head on rank 1) all stop with an error naming
/// both models' sizes, before any value moves.
#[test]
fn replicas_with_different_models_all_stop_at_the_broadcast() {
    let errs = on_two_ranks(|c| {
        let mut m = model_with_output(0, if c.rank() == 1 { 12 } else { 8 });
        broadcast_state(&mut m, &c, 0).unwrap_err().to_string()
    });
    for e in &errs {
        assert!(e.contains("models differ"), "{e}");
    }
    // Rank 0 names rank 1's model and its own: rank 1's last layer has 4 more outputs, each
    // with 16 weights and a bias.
    let count = |e: &str, who: &str| -> u64 {
        let at = e.find(who).unwrap_or_else(|| panic!("{who} in {e}")) + who.len();
        let rest = &e[at..];
        let of = rest.find("tensors of ").unwrap() + "tensors of ".len();
        rest[of..].split(' ').next().unwrap().parse().unwrap()
    };
    let e = &errs[0];
    assert_eq!(
        count(e, "rank 1 has "),
        count(e, "rank 0 has ") + 16 * 4 + 4,
        "{e}"
    );
}

#[test]
fn other_losses_are_exact_too() {
    let loss = ContrastiveLoss::NtLogistic { temperature: 0.5 };
    let one = single(&loss);
    let runs = data_parallel(2, &loss, true, true);
    assert!(max_loss_diff(&runs[0], &one) < 1e-5);
    assert!(rel(&runs[1].grads, &one.grads) < 1e-4);
}

#[test]
fn k_replicas_over_tcp_equal_one_replica() {
    let one = single(&NT_XENT);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let cfg = RendezvousConfig {
                        rank,
                        world_size: 2,
                        host: "127.0.0.1".into(),
                        port,
                        rendezvous_timeout: Duration::from_secs(30),
                        timeout: Duration::from_secs(60),
                    };
                    let c = TcpComm::connect(&cfg).unwrap();
                    // Overlapped, in small buckets: over a second set of connections.
                    replica(Arc::new(c), &NT_XENT, true, true, Some(0.002))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for run in &runs {
        assert!(max_loss_diff(run, &one) < 1e-5);
        assert!(rel(&run.weights, &one.weights) < 1e-4);
    }
}

/// The rank-1 process of `a_killed_rank_ends_the_others_with_an_error`: joins at the port in
/// SIMCLR_TEST_PORT, takes part in one collective, then waits to be killed.
#[test]
#[ignore = "a helper process that a_killed_rank_ends_the_others_with_an_error starts"]
fn killed_rank_helper_process() {
    let port: u16 = std::env::var("SIMCLR_TEST_PORT")
        .expect("started by the parent test")
        .parse()
        .unwrap();
    let cfg = RendezvousConfig {
        rank: 1,
        world_size: 2,
        host: "127.0.0.1".into(),
        port,
        rendezvous_timeout: Duration::from_secs(30),
        timeout: Duration::from_secs(600),
    };
    let c = TcpComm::connect(&cfg).unwrap();
    c.barrier().unwrap();
    // Alive but silent until killed (the connection stays open).
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_killed_rank_ends_the_others_with_an_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_rank_helper_process",
            "--ignored",
            "--nocapture",
        ])
        .env("SIMCLR_TEST_PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let timeout = Duration::from_secs(20);
    let cfg = RendezvousConfig {
        rank: 0,
        world_size: 2,
        host: "127.0.0.1".into(),
        port,
        rendezvous_timeout: Duration::from_secs(30),
        timeout,
    };
    let c = TcpComm::connect(&cfg).unwrap();
    c.barrier().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    let mut v = [1.0f32];
    let e = c.all_reduce_f32(&mut v).unwrap_err();
    assert!(t.elapsed() < timeout, "took {:?}", t.elapsed());
    assert!(matches!(e, CommError::RankLost { rank: 1, .. }), "{e}");
    assert!(e.to_string().contains("rank 1 of 2"), "{e}");
}

/// Under torchrun the elastic agent's store already listens on `MASTER_PORT` on the master node
/// (and the workers are told so by `TORCHELASTIC_USE_AGENT_STORE=True`): the ranks meet on the
/// next port instead of failing with "address in use".
#[test]
fn ranks_under_torchrun_meet_beside_the_agents_store() {
    // A port held by a stand-in for the agent's store, whose next port is free.
    let (store, master_port) = (0..50)
        .find_map(|_| {
            let l = std::net::TcpListener::bind("0.0.0.0:0").ok()?;
            let p = l.local_addr().ok()?.port();
            let next = p.checked_add(1)?;
            drop(std::net::TcpListener::bind(("0.0.0.0", next)).ok()?);
            Some((l, p))
        })
        .expect("a free pair of ports");
    let env = move |rank: usize| {
        move |k: &str| -> Option<String> {
            match k {
                "RANK" => Some(rank.to_string()),
                "WORLD_SIZE" => Some("2".into()),
                "MASTER_ADDR" => Some("127.0.0.1".into()),
                "MASTER_PORT" => Some(master_port.to_string()),
                "TORCHELASTIC_USE_AGENT_STORE" => Some("True".into()),
                _ => None,
            }
        }
    };
    let sums: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let cfg = RendezvousConfig::from_vars(env(rank)).unwrap().unwrap();
                    assert_eq!(cfg.port, master_port + 1);
                    let c = TcpComm::connect(&cfg).unwrap();
                    let mut v = [rank as f64 + 1.0];
                    c.all_reduce_f64(&mut v).unwrap();
                    v[0]
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sums, vec![3.0, 3.0]);
    // Without the hint, rank 0 would have tried the store's port: the error says what to do.
    let cfg = RendezvousConfig {
        rank: 0,
        world_size: 2,
        host: "127.0.0.1".into(),
        port: master_port,
        rendezvous_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    };
    let e = TcpComm::connect(&cfg).unwrap_err().to_string();
    assert!(e.contains(&format!("port {master_port}")), "{e}");
    assert!(e.contains("SIMCLR_RENDEZVOUS_PORT"), "{e}");
    drop(store);
}

#[test]
fn a_replica_stuck_outside_the_step_times_the_others_out() {
    // Rank 1 never calls the step: rank 0's first collective gives up after its timeout.
    let mut comms = ThreadComm::group(2, Duration::from_millis(500));
    let c1 = comms.pop().unwrap();
    let c0 = Arc::new(comms.pop().unwrap());
    let mut m = model(0);
    let dp = DataParallel::new(c0);
    let views = local_views(&batches()[0], 0, 2);
    let t = Instant::now();
    let e = forward_backward_dp(&mut m, &views, &NT_XENT, &dp).unwrap_err();
    assert!(
        e.to_string().contains("rank 1 of 2 did not take part"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(c1);
}

/// Gradient caching in C chunks is the data-parallel step over C replicas with per-replica batch
/// norm and gathered negatives, computed one chunk after the other on one device.
#[test]
fn gradient_caching_equals_chunked_batch_norm_with_all_negatives() {
    for chunks in [2, 4] {
        let want = &data_parallel(chunks, &NT_XENT, true, false)[0];
        let got = run_steps(model(0), 0, 1, |m, views| {
            simclr_nn::grad_cache::forward_backward_cached(m, views, chunks, &NT_XENT).unwrap()
        });
        assert!(
            max_loss_diff(&got, want) < 1e-5,
            "{chunks} chunks: {:?} vs {:?}",
            got.losses,
            want.losses
        );
        assert!(
            rel(&got.grads, &want.grads) < 1e-4,
            "{chunks} chunks: gradients"
        );
        assert!(
            rel(&got.weights, &want.weights) < 1e-4,
            "{chunks} chunks: weights"
        );
        // And it is not the full-batch step (batch norm differs), as documented.
        let full = single(&NT_XENT);
        assert!(rel(&got.grads, &full.grads) > 1e-2);
    }
    // One chunk is the plain full-batch step.
    let full = single(&NT_XENT);
    let mut m = model(0);
    let views = local_views(&batches()[0], 0, 1);
    let l = simclr_nn::grad_cache::forward_backward_cached(&mut m, &views, 1, &NT_XENT).unwrap();
    assert!((l - full.losses[0]).abs() < 1e-6 * full.losses[0]);
    assert!(rel(&flat(&mut m, true), &full.grads) < 1e-6);
    // The running statistics are updated by the second pass only: once per chunk.
    let mut m = model(0);
    simclr_nn::grad_cache::forward_backward_cached(&mut m, &views, 4, &NT_XENT).unwrap();
    struct Count(Vec<i64>);
    impl simclr_nn::StateVisitor for Count {
        fn param(&mut self, _: &str, _: &mut simclr_nn::Param) {}
        fn buffer(&mut self, _: &str, _: &mut Tensor) {}
        fn counter(&mut self, _: &str, v: &mut i64) {
            self.0.push(*v);
        }
    }
    let mut c = Count(Vec::new());
    m.visit("", &mut c);
    assert!(!c.0.is_empty() && c.0.iter().all(|&v| v == 4), "{:?}", c.0);
}

//! Parity with PyTorch (llm.c style): tensors that tests/reference/make_fixtures.py computed with
//! PyTorch (in float64) for the same tiny models, matched within 1e-4 by the Rust CPU path and,
//! where a GPU is present, by the CUDA backend in FP32 math, and within bf16's tolerances in bf16
//! mixed precision (elsewhere the GPU half prints that it skipped).

mod common;

use std::collections::BTreeMap;

use common::{assert_allclose, repo_root};
use simclr::nn::checkpoint::{param_to_torch, Checkpoint, NamedTensor, TensorData};
use simclr::nn::{
    nt_xent, BlockKind, Device, HeadConfig, Lars, Module, Optimizer, Param, ResNet, ResNetConfig,
    Sgd, SimClr, SimClrConfig, StateVisitor, Stem, Tensor,
};

const RTOL: f64 = 1e-4;

/// The GPU's math mode is one setting for the whole process: the tests take turns.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

type Turn = std::sync::MutexGuard<'static, ()>;

/// Without a GPU a GPU test prints that it skipped, unless `SIMCLR_REQUIRE_GPU=1` (CI on the
/// emulated device, the GPU machine's check), where skipping is a failure.
fn skip_without_gpu(test: &str) {
    if std::env::var("SIMCLR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: no CUDA driver or no GPU, and SIMCLR_REQUIRE_GPU=1 forbids skipping");
    }
    println!("{test}: skipped (no CUDA driver or no GPU on this machine)");
}

/// The CPU, and the first GPU when there is one (in FP32 math: TF32 or bf16 would not meet the
/// tolerance), with this test's turn on the GPU.
fn devices(test: &str) -> (Vec<Device>, Turn) {
    let turn = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = vec![Device::Cpu];
    if !simclr::kernels::cuda::gpu_available() {
        skip_without_gpu(&format!("{test} on cuda:0"));
        return (d, turn);
    }
    match simclr::nn::cuda::CudaBackend::get(0) {
        Ok(b) => {
            b.set_math_mode(simclr::nn::cuda::MathMode::Fp32);
            let name = b.gpu().name().unwrap_or_else(|e| e.to_string());
            println!("{test}: on {name}");
            d.push(Device::Cuda(0));
        }
        Err(e) => panic!("{test}: a GPU is present but the CUDA backend could not start: {e}"),
    }
    (d, turn)
}

fn fixture(name: &str) -> Checkpoint {
    let path = repo_root().join("tests/reference/fixtures").join(name);
    Checkpoint::load(&path)
        .unwrap_or_else(|e| panic!("{e}: regenerate with tests/reference/README.md"))
}

fn f32s<'a>(ck: &'a Checkpoint, key: &str) -> &'a [f32] {
    match &ck
        .tensors
        .get(key)
        .unwrap_or_else(|| panic!("fixture lacks {key}"))
        .data
    {
        TensorData::F32(v) => v,
        TensorData::I64(_) => panic!("{key} is not f32"),
    }
}

fn tensor(ck: &Checkpoint, key: &str) -> Tensor {
    let t = &ck.tensors[key];
    Tensor::from_slice(&t.shape, f32s(ck, key)).unwrap()
}

/// Every parameter's gradient in PyTorch's layout, by name.
fn grads(m: &mut dyn Module) -> BTreeMap<String, NamedTensor> {
    let mut out = BTreeMap::new();
    m.for_each_param(&mut |name, p| {
        let as_value = Param::new(p.grad.clone(), p.kind);
        out.insert(name.to_string(), param_to_torch(&as_value));
    });
    out
}

fn values(m: &mut dyn Module) -> BTreeMap<String, NamedTensor> {
    let mut out = BTreeMap::new();
    m.for_each_param(&mut |name, p| {
        out.insert(name.to_string(), param_to_torch(p));
    });
    out
}

fn data(t: &NamedTensor) -> &[f32] {
    match &t.data {
        TensorData::F32(v) => v,
        TensorData::I64(_) => unreachable!("parameters are f32"),
    }
}

/// Every parameter gradient against the fixture's `grad.<name>`; returns how many.
fn check_grads(dev: Device, m: &mut dyn Module, ck: &Checkpoint) -> usize {
    let g = grads(m);
    for (name, t) in &g {
        assert_allclose(
            &format!("{dev}: grad.{name}"),
            data(t),
            f32s(ck, &format!("grad.{name}")),
            RTOL,
        );
    }
    g.len()
}

/// Running statistics after the forward pass.
fn check_running_stats(m: &mut dyn Module, ck: &Checkpoint) -> usize {
    struct V<'a>(&'a Checkpoint, usize);
    impl StateVisitor for V<'_> {
        fn param(&mut self, _: &str, _: &mut Param) {}
        fn buffer(&mut self, name: &str, t: &mut Tensor) {
            assert_allclose(
                name,
                &t.to_vec(),
                f32s(self.0, &format!("after_forward.{name}")),
                RTOL,
            );
            self.1 += 1;
        }
        fn counter(&mut self, name: &str, v: &mut i64) {
            assert_eq!(*v, 1, "{name}");
        }
    }
    let mut v = V(ck, 0);
    m.visit("", &mut v);
    v.1
}

fn basic_config(ck: &Checkpoint) -> SimClrConfig {
    let z_dim = ck.tensors["z"].shape[1];
    let h_dim = ck.tensors["h"].shape[1];
    SimClrConfig {
        encoder: ResNetConfig {
            block: BlockKind::Basic,
            layers: [1, 1, 1, 1],
            base_width: h_dim / 8,
            stem: Stem::Cifar,
            in_channels: 3,
        },
        head: HeadConfig::Mlp {
            hidden_layers: 1,
            hidden_dim: h_dim,
            output_dim: z_dim,
        },
    }
}

#[test]
fn basic_resnet_simclr_step_matches_pytorch() {
    let (devs, _turn) = devices("basic_resnet_simclr_step_matches_pytorch");
    for dev in devs {
        basic_step_on(dev);
    }
}

fn basic_step_on(dev: Device) {
    let ck = fixture("basic_simclr.safetensors");
    let mut model = SimClr::new(&basic_config(&ck), dev, 0).unwrap();
    let unused = ck.apply(&mut model, "param.").unwrap();
    assert!(
        unused.iter().all(|k| !k.starts_with("param.")),
        "model ignores {unused:?}"
    );
    assert_eq!(model.device(), dev);

    let (h, z) = model.forward(&tensor(&ck, "input"), true).unwrap();
    assert_allclose(&format!("{dev}: h"), &h.to_vec(), f32s(&ck, "h"), RTOL);
    assert_allclose(&format!("{dev}: z"), &z.to_vec(), f32s(&ck, "z"), RTOL);
    let tau = f32s(&ck, "meta.temperature")[0];
    let (loss, dz) = nt_xent(&z, tau).unwrap();
    assert_allclose(&format!("{dev}: loss"), &[loss], f32s(&ck, "loss"), RTOL);
    model.backward(&dz).unwrap();

    assert!(check_grads(dev, &mut model, &ck) >= 20);
    assert!(check_running_stats(&mut model, &ck) >= 10);

    // One SGD step (Nesterov, weight decay on everything, as torch.optim.SGD).
    let before = values(&mut model);
    let mut sgd_model = model.clone();
    Sgd::new(0.9, true, 1e-4).step(&mut sgd_model, 0.1).unwrap();
    let after = values(&mut sgd_model);
    for (name, t) in &after {
        let want = f32s(&ck, &format!("sgd.{name}"));
        let what = format!("{dev}: sgd.{name}");
        assert_allclose(&what, data(t), want, RTOL);
        check_update(&what, data(&before[name]), data(t), want);
    }

    // Two LARS steps with the same gradients: the second exercises the momentum buffer.
    let mut lars = Lars::default();
    let mut lars_model = model.clone();
    for step in ["lars", "lars2"] {
        lars.step(&mut lars_model, 0.5).unwrap();
        let after = values(&mut lars_model);
        for (name, t) in &after {
            let want = f32s(&ck, &format!("{step}.{name}"));
            let what = format!("{dev}: {step}.{name}");
            assert_allclose(&what, data(t), want, RTOL);
            check_update(&what, data(&before[name]), data(t), want);
        }
    }
}

/// Relative L2 error of `got` against `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Relative L2 error of `got` against `want`, failing beyond `tol`.
fn assert_rel_l2(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let rel = rel_l2(got, want);
    // Written so that NaN fails.
    assert!(
        rel <= tol,
        "{what}: relative L2 error {rel:.3e} (tolerance {tol:e})"
    );
}

/// bf16 mixed precision on the GPU against PyTorch's float64 fixtures: bf16 activations round
/// each layer's output to 8 significant bits, so the tolerances are bf16's (relative L2, and
/// over all gradients together: a gradient that is a sum cancelling to near zero, such as a
/// batch-norm bias's, has no meaningful relative error of its own).
#[test]
fn basic_step_in_bf16_mixed_precision_tracks_pytorch() {
    let test = "basic_step_in_bf16_mixed_precision_tracks_pytorch";
    let (devs, _turn) = devices(test);
    let Some(&dev) = devs.get(1) else {
        return;
    };
    let backend = simclr::nn::cuda::CudaBackend::get(0).unwrap();
    backend.set_math_mode(simclr::nn::cuda::MathMode::Bf16);
    let ck = fixture("basic_simclr.safetensors");
    let mut model = SimClr::new(&basic_config(&ck), dev, 0).unwrap();
    ck.apply(&mut model, "param.").unwrap();
    let (h, z) = model.forward(&tensor(&ck, "input"), true).unwrap();
    assert_rel_l2("bf16: h", &h.to_vec(), f32s(&ck, "h"), 4e-2);
    assert_rel_l2("bf16: z", &z.to_vec(), f32s(&ck, "z"), 4e-2);
    let tau = f32s(&ck, "meta.temperature")[0];
    let (loss, dz) = nt_xent(&z, tau).unwrap();
    assert_rel_l2("bf16: loss", &[loss], f32s(&ck, "loss"), 3e-2);
    model.backward(&dz).unwrap();
    let got = all_grads(&mut model);
    let want = fixture_grads(&mut model, &ck);
    // This tiny model's gradients are very sensitive: the f32 CPU step on the input scaled by
    // 1 +- 2^-9 (half a bf16 unit in the last place) moves them by 22% (relative L2), far more
    // than its h (0.4%). bf16 rounds every layer's output, not only the input: allow twice that.
    let mut cpu = SimClr::new(&basic_config(&ck), Device::Cpu, 0).unwrap();
    ck.apply(&mut cpu, "param.").unwrap();
    let (_, zc) = cpu
        .forward(&bf16_noise(&tensor(&ck, "input")), true)
        .unwrap();
    cpu.backward(&nt_xent(&zc, tau).unwrap().1).unwrap();
    let noise = rel_l2(&all_grads(&mut cpu), &want);
    assert_rel_l2("bf16: every gradient", &got, &want, 2.0 * noise);
    backend.set_math_mode(simclr::nn::cuda::MathMode::Fp32);
}

/// `x` with each value scaled by 1 + 2^-9 or 1 - 2^-9 (a fixed pseudo-random choice).
fn bf16_noise(x: &Tensor) -> Tensor {
    let mut v = x.to_vec();
    let mut s = 7u64;
    for x in v.iter_mut() {
        s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        *x *= if (s >> 33) & 1 == 0 {
            1.0 + 1.0 / 512.0
        } else {
            1.0 - 1.0 / 512.0
        };
    }
    Tensor::from_vec(x.shape(), v).unwrap()
}

/// Every gradient of `model`, in parameter order, on the host.
fn all_grads(model: &mut SimClr) -> Vec<f32> {
    grads(model)
        .values()
        .flat_map(|t| data(t).to_vec())
        .collect()
}

/// The fixture's gradients in `model`'s parameter order.
fn fixture_grads(model: &mut SimClr, ck: &Checkpoint) -> Vec<f32> {
    grads(model)
        .keys()
        .flat_map(|name| f32s(ck, &format!("grad.{name}")).to_vec())
        .collect()
}

/// The update itself (after - before), which is small beside the weights for LARS, must match
/// too; its tolerance allows for the f32 rounding of the stored weights.
fn check_update(what: &str, before: &[f32], ours: &[f32], want: &[f32]) {
    let d_ours: Vec<f32> = ours.iter().zip(before).map(|(a, b)| a - b).collect();
    let d_want: Vec<f32> = want.iter().zip(before).map(|(a, b)| a - b).collect();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in d_ours.iter().zip(&d_want) {
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let rel = (num / den.max(1e-300)).sqrt();
    assert!(
        rel < 2e-3,
        "{what}: update differs by {rel:.3e} (relative L2)"
    );
}

#[test]
fn bottleneck_resnet_forward_backward_matches_pytorch() {
    let (devs, _turn) = devices("bottleneck_resnet_forward_backward_matches_pytorch");
    for dev in devs {
        let ck = fixture("bottleneck_resnet.safetensors");
        let h_dim = ck.tensors["h"].shape[1];
        let config = ResNetConfig {
            block: BlockKind::Bottleneck,
            layers: [1, 1, 1, 1],
            base_width: h_dim / 32,
            stem: Stem::ImageNet,
            in_channels: 3,
        };
        let mut model = ResNet::new(config, dev, &mut rand_seeded()).unwrap();
        ck.apply(&mut model, "param.").unwrap();
        let h = model.forward(&tensor(&ck, "input"), true).unwrap();
        assert_allclose(&format!("{dev}: h"), &h.to_vec(), f32s(&ck, "h"), RTOL);
        model
            .backward(&tensor(&ck, "r").to_device(dev).unwrap())
            .unwrap();
        assert!(check_grads(dev, &mut model, &ck) > 0);
        assert!(check_running_stats(&mut model, &ck) >= 10);
    }
}

#[test]
fn eval_mode_uses_running_statistics_like_pytorch() {
    let (devs, _turn) = devices("eval_mode_uses_running_statistics_like_pytorch");
    for dev in devs {
        let ck = fixture("basic_eval.safetensors");
        let train = fixture("basic_simclr.safetensors");
        let mut model = SimClr::new(&basic_config(&train), dev, 0).unwrap();
        train.apply(&mut model, "param.").unwrap();
        let h = model.encoder.forward(&tensor(&ck, "input"), false).unwrap();
        assert_allclose(
            &format!("{dev}: h (eval)"),
            &h.to_vec(),
            f32s(&ck, "h"),
            RTOL,
        );
    }
}

fn rand_seeded() -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    rand_chacha::ChaCha8Rng::seed_from_u64(0)
}

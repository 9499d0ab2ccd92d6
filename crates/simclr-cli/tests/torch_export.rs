//! An encoder written by `simclr export` loads into PyTorch's own torchvision ResNet and gives
//! the same h. Runs where Python with torch and torchvision is found (`SIMCLR_TORCH_PYTHON`, or
//! `python3`), and says that it skipped elsewhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use simclr_cli::Config;
use simclr_nn::checkpoint::{NamedTensor, TensorData};
use simclr_nn::{Checkpoint, Device, Lars, SimClr, Tensor};

fn torch_python() -> Option<String> {
    let python = std::env::var("SIMCLR_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import torch, torchvision, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

#[test]
fn an_exported_encoder_gives_the_same_h_in_torchvision() {
    let Some(python) = torch_python() else {
        eprintln!(
            "skipped: no Python with torch, torchvision and safetensors (set SIMCLR_TORCH_PYTHON)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // torchvision's ResNet has the standard widths: base width 64, one block per stage.
    let cfg = Config::build(
        Some("quickstart"),
        None,
        &[
            "model.base_width=64".into(),
            "model.layers=[1, 1, 1, 1]".into(),
        ],
    )
    .unwrap();
    let mut model = SimClr::new(&cfg.model.simclr().unwrap(), Device::Cpu, 3).unwrap();
    // Two training steps, so that the running statistics and weights are not the initial ones.
    let n = 6;
    let views: Vec<f32> = (0..2 * n * 3 * 16 * 16)
        .map(|i| ((i as f32) * 0.013).sin())
        .collect();
    let views = Tensor::from_vec(&[2 * n, 3, 16, 16], views).unwrap();
    let mut lars = Lars::default();
    for _ in 0..2 {
        simclr_nn::train_step(&mut model, &views, &mut lars, 0.5, 0.5).unwrap();
    }
    let images: Vec<f32> = (0..n * 3 * 16 * 16)
        .map(|i| ((i as f32) * 0.029).cos())
        .collect();
    let x = Tensor::from_vec(&[n, 3, 16, 16], images.clone()).unwrap();
    let h = model.encoder.forward(&x, false).unwrap();
    let enc = dir.path().join("enc.safetensors");
    simclr_cli::export::save_encoder(&mut model, &enc, &cfg).unwrap();
    let io = dir.path().join("io.safetensors");
    let tensor = |shape: &[usize], v: Vec<f32>| NamedTensor {
        shape: shape.to_vec(),
        data: TensorData::F32(v),
    };
    Checkpoint {
        tensors: BTreeMap::from([
            ("images".to_string(), tensor(&[n, 3, 16, 16], images)),
            ("h".to_string(), tensor(h.shape(), h.to_vec())),
        ]),
        metadata: BTreeMap::new(),
        path: io.clone(),
    }
    .save(&io)
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torch/check_export.py");
    let out = Command::new(&python)
        .arg(script)
        .args([
            "--encoder".as_ref(),
            enc.as_os_str(),
            "--data".as_ref(),
            io.as_os_str(),
        ])
        .args(["--layers", "1,1,1,1", "--block", "basic", "--stem", "cifar"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
}

//! Checkpoints: torchvision's names and shapes at full size, round trips, and clear errors.

mod common;

use common::repo_root;
use simclr::nn::checkpoint::{state_dict, Checkpoint, TensorData};
use simclr::nn::{
    Device, HeadConfig, Module, NnError, ResNet, ResNetConfig, SimClr, SimClrConfig, Stem,
};

fn resnet(depth: usize, stem: Stem) -> ResNet {
    use rand::SeedableRng;
    let cfg = ResNetConfig::resnet(depth, 1, stem).unwrap();
    ResNet::new(
        cfg,
        Device::Cpu,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap()
}

/// Our ResNet-18 and ResNet-50 have exactly torchvision's state names and shapes (fc aside), in
/// torchvision's order.
#[test]
fn names_and_shapes_are_torchvisions() {
    let text =
        std::fs::read_to_string(repo_root().join("tests/reference/fixtures/torchvision_keys.json"))
            .unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (depth, key) in [(18, "resnet18"), (50, "resnet50")] {
        let mut model = resnet(depth, Stem::ImageNet);
        let ours = state_dict(&mut model, "");
        let theirs: Vec<(String, Vec<usize>)> = want[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let shape = e[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (e[0].as_str().unwrap().to_string(), shape)
            })
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{key}: number of tensors");
        for (name, shape) in &theirs {
            let t = ours
                .get(name)
                .unwrap_or_else(|| panic!("{key}: we lack {name}"));
            assert_eq!(&t.shape, shape, "{key}: {name}");
        }
        // And the visiting order is torchvision's (state dicts are ordered there).
        let mut order = vec![];
        struct Names<'a>(&'a mut Vec<String>);
        impl simclr::nn::StateVisitor for Names<'_> {
            fn param(&mut self, n: &str, _: &mut simclr::nn::Param) {
                self.0.push(n.into())
            }
            fn buffer(&mut self, n: &str, _: &mut simclr::nn::Tensor) {
                self.0.push(n.into())
            }
            fn counter(&mut self, n: &str, _: &mut i64) {
                self.0.push(n.into())
            }
        }
        model.visit("", &mut Names(&mut order));
        let want_order: Vec<&String> = theirs.iter().map(|(n, _)| n).collect();
        assert_eq!(order.iter().collect::<Vec<_>>(), want_order, "{key}: order");
    }
}

#[test]
fn save_load_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SimClrConfig {
        encoder: ResNetConfig {
            layers: [1, 1, 1, 1],
            base_width: 4,
            ..ResNetConfig::resnet(50, 1, Stem::Cifar).unwrap()
        },
        head: HeadConfig::paper(128),
    };
    let mut a = SimClr::new(&cfg, Device::Cpu, 1).unwrap();
    let mut b = SimClr::new(&cfg, Device::Cpu, 2).unwrap();
    a.encoder
        .forward(
            &simclr::nn::Tensor::full(&[2, 3, 8, 8], 0.5, Device::Cpu),
            true,
        )
        .unwrap();
    let ck = Checkpoint {
        tensors: state_dict(&mut a, ""),
        metadata: [("arch".to_string(), "test".to_string())].into(),
        ..Default::default()
    };
    let path = dir.path().join("model.safetensors");
    ck.save(&path).unwrap();
    let loaded = Checkpoint::load(&path).unwrap();
    assert_eq!(loaded.metadata["arch"], "test");
    assert!(loaded.apply(&mut b, "").unwrap().is_empty());
    assert_eq!(state_dict(&mut a, ""), state_dict(&mut b, ""));
    match &loaded.tensors["encoder.bn1.num_batches_tracked"].data {
        TensorData::I64(v) => assert_eq!(v, &[1]),
        other => panic!("num_batches_tracked is {other:?}"),
    }
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r18.safetensors");
    let mut r18 = resnet(18, Stem::Cifar);
    Checkpoint {
        tensors: state_dict(&mut r18, ""),
        ..Default::default()
    }
    .save(&path)
    .unwrap();
    // Another architecture: ResNet-50 needs tensors the file lacks or shapes it does not have.
    let mut r50 = resnet(50, Stem::Cifar);
    let err = Checkpoint::load(&path)
        .unwrap()
        .apply(&mut r50, "")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("r18.safetensors") && msg.contains("layer"),
        "{msg}"
    );
    // A truncated file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = Checkpoint::load(&cut).unwrap_err().to_string();
    assert!(msg.contains("cut.safetensors"), "{msg}");
    // A missing file.
    let err = Checkpoint::load(&dir.path().join("absent.safetensors")).unwrap_err();
    assert!(matches!(err, NnError::Io { .. }) && err.to_string().contains("absent.safetensors"));
    // Saving into a folder that does not exist fails and names it.
    let bad = dir.path().join("no/such/dir/x.safetensors");
    let msg = Checkpoint::default().save(&bad).unwrap_err().to_string();
    assert!(msg.contains("no/such/dir"), "{msg}");
}

/// A failed save leaves the previous checkpoint intact (the file is replaced by a rename only
/// after the new one is complete on disk).
#[test]
fn failed_save_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    let mut m = resnet(18, Stem::Cifar);
    let good = Checkpoint {
        tensors: state_dict(&mut m, ""),
        ..Default::default()
    };
    good.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    // A directory squatting on the temporary file's name makes the write fail midway.
    let tmp = dir
        .path()
        .join(format!(".ck.safetensors.tmp-{}", std::process::id()));
    std::fs::create_dir(&tmp).unwrap();
    assert!(good.save(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

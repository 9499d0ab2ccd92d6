//! Writing results for other tools: the encoder as safetensors with torchvision's names, and
//! representations as `.npy` or safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use simclr_nn::checkpoint::{state_dict, NamedTensor, TensorData};
use simclr_nn::layers::Linear;
use simclr_nn::{Checkpoint, SimClr};

use crate::config::Config;
use crate::error::{io_err, CliError, Result};
use crate::features::Features;

/// Writes the encoder alone with torchvision's parameter names (`conv1.weight`,
/// `layer1.0.bn1.running_mean`, ...), so `torchvision.models.resnet*` loads it with
/// `load_state_dict(..., strict=False)` (the `fc` layer is absent). The metadata records the
/// architecture.
pub fn save_encoder(model: &mut SimClr, path: &Path, cfg: &Config) -> Result<()> {
    save_torchvision(model, None, path, cfg)
}

/// Writes the encoder, and the classifier `fc` when given, as one torchvision ResNet state dict
/// (the classifier as `fc.weight`, `fc.bias`); creates the folder.
pub fn save_torchvision(
    model: &mut SimClr,
    fc: Option<&mut Linear>,
    path: &Path,
    cfg: &Config,
) -> Result<()> {
    let mut tensors = state_dict(&mut model.encoder, "");
    let format = match fc {
        Some(fc) => {
            tensors.extend(state_dict(fc, "fc."));
            "simclr-classifier-1"
        }
        None => "simclr-encoder-1",
    };
    let metadata = BTreeMap::from([
        ("format".to_string(), format.to_string()),
        ("architecture".to_string(), cfg.model.describe()),
        (
            "model".to_string(),
            toml::to_string(&cfg.model).unwrap_or_default(),
        ),
    ]);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    Checkpoint {
        tensors,
        metadata,
        path: path.to_path_buf(),
    }
    .save(path)
    .map_err(|e| io_err(path, e))
}

fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_txt = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded to 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes `f` as `path` (`[n, dim]` float32) and its labels beside it: `<stem>.labels.npy`
/// (int64, -1 for none) for `.npy`, or as tensors `features` and `labels` in one `.safetensors`.
pub fn save_features(f: &Features, path: &Path) -> Result<()> {
    let labels: Vec<i64> = f
        .labels
        .iter()
        .map(|&l| if l == u32::MAX { -1 } else { l as i64 })
        .collect();
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => {
            let bytes = npy_bytes("<f4", &[f.len(), f.dim], bytemuck::cast_slice(&f.data));
            simclr_nn::checkpoint::write_atomic(path, &bytes).map_err(|e| io_err(path, e))?;
            let lpath = path.with_extension("labels.npy");
            let lbytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
            let bytes = npy_bytes("<i8", &[labels.len()], &lbytes);
            simclr_nn::checkpoint::write_atomic(&lpath, &bytes).map_err(|e| io_err(&lpath, e))
        }
        Some("safetensors") => {
            let tensors = BTreeMap::from([
                (
                    "features".to_string(),
                    NamedTensor {
                        shape: vec![f.len(), f.dim],
                        data: TensorData::F32(f.data.clone()),
                    },
                ),
                (
                    "labels".to_string(),
                    NamedTensor {
                        shape: vec![labels.len()],
                        data: TensorData::I64(labels),
                    },
                ),
            ]);
            Checkpoint {
                tensors,
                metadata: BTreeMap::new(),
                path: path.to_path_buf(),
            }
            .save(path)
            .map_err(|e| io_err(path, e))
        }
        _ => Err(CliError::Usage(format!(
            "{}: the output must end in .npy or .safetensors",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let b = npy_bytes("<f4", &[2, 3], &[0u8; 24]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        assert_eq!(b.len(), 10 + hlen + 24);
        let one = npy_bytes("<i8", &[4], &[0u8; 32]);
        let hlen = u16::from_le_bytes([one[8], one[9]]) as usize;
        assert!(std::str::from_utf8(&one[10..10 + hlen])
            .unwrap()
            .contains("'shape': (4,)"));
    }
}

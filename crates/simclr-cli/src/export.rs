//! Writing results for other tools: the encoder as safetensors with torchvision's names, and
//! representations as `.npy` or safetensors.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

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

/// The files of a run folder that belong to the run: what a command writing a user's `--out`
/// never replaces, `--force` or not. `rel` is relative to the run folder; `None` when the run
/// does not own it.
fn run_owned(rel: &Path) -> Option<&'static str> {
    let mut parts = rel
        .components()
        .map(|c| c.as_os_str().to_str().unwrap_or(""));
    let first = parts.next()?;
    let nested = parts.next().is_some();
    Some(match (first, nested) {
        ("config.toml", false) => "its configuration",
        ("metrics.jsonl", false) => "its metrics",
        ("results.md" | "results.json", false) => "its results",
        ("encoder.safetensors", false) => "its exported encoder",
        ("checkpoints", _) => "its checkpoints",
        ("plots", true) => "its charts",
        (name, true) if name.starts_with("finetune-") => "its fine-tuned models",
        _ => return None,
    })
}

/// Whether `dir` is a run folder: it holds a checkpoint, or the configuration and metrics that
/// a run writes when it starts.
fn is_run_dir(dir: &Path) -> bool {
    crate::state::checkpoint_path(dir).is_file()
        || (dir.join("config.toml").is_file() && dir.join("metrics.jsonl").is_file())
}

/// `path` made absolute, its links resolved where they exist and its `.` and `..` taken out, so
/// that the run folder above it is found whatever way `path` was written.
fn resolved(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                // What exists is resolved as the system resolves it; below a missing folder
                // nothing can be written anyway.
                if let Ok(real) = out.canonicalize() {
                    out = real;
                }
            }
        }
    }
    out
}

/// The run folder above `path` that owns it, with what of the run it is.
fn owning_run(path: &Path) -> Option<(PathBuf, &'static str)> {
    let mut candidates = vec![resolved(path)];
    if path.is_symlink() {
        // Also the link's own place: a rename onto it replaces the link, a plain write follows it.
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let (Some(name), Ok(d)) = (path.file_name(), dir.canonicalize()) {
                candidates.push(d.join(name));
            }
        }
    }
    candidates.iter().find_map(|p| {
        p.ancestors().skip(1).find_map(|dir| {
            let what = run_owned(p.strip_prefix(dir).ok()?)?;
            is_run_dir(dir).then(|| (dir.to_path_buf(), what))
        })
    })
}

/// Checks that a command may write its output `path`: never a file a run folder owns (its
/// checkpoints, config.toml, metrics.jsonl, results, charts, fine-tuned models or exported
/// encoder), present or not, since the run reads or rewrites it; another existing file only
/// when `force` is set. The error names the file.
pub fn check_output(path: &Path, force: bool) -> Result<()> {
    if let Some((run, what)) = owning_run(path) {
        return Err(io_err(
            path,
            format!(
                "belongs to the run in {} ({what}); write the output elsewhere (--force does not \
                 overwrite a run's own files)",
                run.display()
            ),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(io_err(path, "is a folder; name a file to write")),
        Ok(_) if !force => Err(io_err(
            path,
            "exists; pass --force to overwrite it, or choose another name",
        )),
        _ => Ok(()),
    }
}

/// The files [`save_features`] writes for `path`: `path` itself, and for `.npy` the labels
/// beside it. An error for another extension.
pub fn features_outputs(path: &Path) -> Result<Vec<PathBuf>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => Ok(vec![path.to_path_buf(), path.with_extension("labels.npy")]),
        Some("safetensors") => Ok(vec![path.to_path_buf()]),
        _ => Err(CliError::Usage(format!(
            "{}: the output must end in .npy or .safetensors",
            path.display()
        ))),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader (or a crash)
/// sees the old file or the new one, never a part; the error names `path` once.
pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    simclr_nn::checkpoint::write_atomic(path, bytes).map_err(|e| match e {
        simclr_nn::NnError::Io { source, .. } => io_err(path, source),
        other => io_err(path, other),
    })
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
            write_whole(path, &bytes)?;
            let lpath = path.with_extension("labels.npy");
            let lbytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
            let bytes = npy_bytes("<i8", &[labels.len()], &lbytes);
            write_whole(&lpath, &bytes)
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
    fn a_run_owns_its_checkpoints_configuration_metrics_and_results() {
        for owned in [
            "config.toml",
            "metrics.jsonl",
            "results.md",
            "results.json",
            "encoder.safetensors",
            "checkpoints/last.safetensors",
            "checkpoints/other.safetensors",
            "plots/loss.png",
            "finetune-10/model.safetensors",
        ] {
            assert!(run_owned(Path::new(owned)).is_some(), "{owned}");
        }
        for free in [
            "h.npy",
            "enc.safetensors",
            "plots",
            "finetune-10",
            "notes/config.toml",
        ] {
            assert!(run_owned(Path::new(free)).is_none(), "{free}");
        }
    }

    #[test]
    fn outputs_are_checked_against_runs_and_existing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir_all(run.join("checkpoints")).unwrap();
        std::fs::write(run.join("config.toml"), "").unwrap();
        std::fs::write(run.join("checkpoints/last.safetensors"), "x").unwrap();
        let ck = run.join("checkpoints/last.safetensors");
        for force in [false, true] {
            let e = check_output(&ck, force).unwrap_err().to_string();
            assert!(
                e.contains("last.safetensors") && e.contains("checkpoints"),
                "{e}"
            );
            // Written another way, and not yet there.
            let other = run.join("plots/../checkpoints/./x.safetensors");
            assert!(check_output(&other, force).is_err());
            assert!(check_output(&run.join("encoder.safetensors"), force).is_err());
        }
        // A file of the user's beside the run's.
        let mine = run.join("h.npy");
        check_output(&mine, false).unwrap();
        std::fs::write(&mine, "x").unwrap();
        let e = check_output(&mine, false).unwrap_err().to_string();
        assert!(e.contains("h.npy") && e.contains("--force"), "{e}");
        check_output(&mine, true).unwrap();
        // A folder is never a file to write.
        assert!(check_output(tmp.path(), true).is_err());
        // A config.toml alone does not make a run folder.
        let plain = tmp.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("config.toml"), "").unwrap();
        check_output(&plain.join("config.toml"), true).unwrap();
    }

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

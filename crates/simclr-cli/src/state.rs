//! A run's checkpoint: the model (torchvision names under `encoder.`, the head under `head.`),
//! the optimiser's and the online probe's momentum buffers, and where the run stands, in one
//! safetensors file written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use simclr_nn::checkpoint::{state_dict, NamedTensor, TensorData};
use simclr_nn::layers::Linear;
use simclr_nn::{Checkpoint, Optimizer, SimClr, Tensor};

use crate::error::{CliError, Result};

/// The format tag in the metadata.
pub const FORMAT: &str = "simclr-run-1";

/// Where a run stands: the next step to take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// The epoch of the next step.
    pub epoch: u64,
    /// The number of the next batch within its epoch.
    pub batch: usize,
}

/// The checkpoint files of a run folder.
pub fn checkpoint_path(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints").join("last.safetensors")
}

fn tensor_entry(t: &Tensor) -> NamedTensor {
    NamedTensor {
        shape: t.shape().to_vec(),
        data: TensorData::F32(t.to_vec()),
    }
}

/// Everything needed to continue a run exactly.
pub fn save(
    path: &Path,
    model: &mut SimClr,
    optimizer: &mut dyn Optimizer,
    probe: Option<(&mut Linear, &mut dyn Optimizer)>,
    progress: Progress,
    config_toml: &str,
) -> Result<()> {
    let mut tensors = state_dict(model, "");
    for (name, t) in optimizer.state_mut().iter() {
        tensors.insert(format!("optimizer.{name}"), tensor_entry(t));
    }
    if let Some((layer, opt)) = probe {
        tensors.extend(state_dict(layer, "probe."));
        for (name, t) in opt.state_mut().iter() {
            tensors.insert(format!("probe_optimizer.{name}"), tensor_entry(t));
        }
    }
    let metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("step".to_string(), progress.step.to_string()),
        ("epoch".to_string(), progress.epoch.to_string()),
        ("batch".to_string(), progress.batch.to_string()),
        ("config".to_string(), config_toml.to_string()),
    ]);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::io_err(dir, e))?;
    }
    // Before the save, which replaces it: only then can the error say what is left.
    let previous = path.exists();
    Checkpoint {
        tensors,
        metadata,
        path: path.to_path_buf(),
    }
    .save(path)
    .map_err(|e| CliError::Io {
        path: path.to_path_buf(),
        msg: if previous {
            format!("cannot write the checkpoint ({e}); the previous checkpoint is intact")
        } else {
            format!("cannot write the checkpoint ({e}); this run has no earlier checkpoint")
        },
    })
}

fn meta<T: std::str::FromStr>(ck: &Checkpoint, key: &str) -> Result<T> {
    ck.metadata
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| CliError::Checkpoint {
            path: ck.path.clone(),
            msg: format!("metadata `{key}` is missing or malformed; not a run checkpoint"),
        })
}

fn restore_state(ck: &Checkpoint, prefix: &str, into: &mut BTreeMap<String, Tensor>) -> Result<()> {
    into.clear();
    for (name, t) in &ck.tensors {
        if let Some(rest) = name.strip_prefix(prefix) {
            let TensorData::F32(v) = &t.data else {
                return Err(CliError::Checkpoint {
                    path: ck.path.clone(),
                    msg: format!("{name} is not a float tensor"),
                });
            };
            into.insert(rest.to_string(), Tensor::from_vec(&t.shape, v.clone())?);
        }
    }
    Ok(())
}

/// Loads the model's weights (`encoder.*`, `head.*`) from `ck`; a checkpoint of another
/// architecture is an error naming the first tensor that does not fit.
pub fn load_model(ck: &Checkpoint, model: &mut SimClr) -> Result<()> {
    model.apply_checkpoint(ck)
}

/// Restores a run from its checkpoint; returns where it stands.
pub fn load(
    ck: &Checkpoint,
    model: &mut SimClr,
    optimizer: &mut dyn Optimizer,
    probe: Option<(&mut Linear, &mut dyn Optimizer)>,
) -> Result<Progress> {
    if ck.metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(CliError::Checkpoint {
            path: ck.path.clone(),
            msg: format!("not a {FORMAT} run checkpoint"),
        });
    }
    load_model(ck, model)?;
    restore_state(ck, "optimizer.", optimizer.state_mut())?;
    if let Some((layer, opt)) = probe {
        if ck.tensors.contains_key("probe.weight") {
            ck.apply(layer, "probe.")
                .map_err(|e| CliError::Checkpoint {
                    path: ck.path.clone(),
                    msg: format!("the online probe does not fit: {e}"),
                })?;
            restore_state(ck, "probe_optimizer.", opt.state_mut())?;
        }
    }
    Ok(Progress {
        step: meta(ck, "step")?,
        epoch: meta(ck, "epoch")?,
        batch: meta(ck, "batch")?,
    })
}

/// Loading a model from a checkpoint, whichever kind: a run checkpoint (`encoder.*`), or an
/// encoder alone with torchvision's names (`conv1.weight`, as `simclr export` writes and
/// PyTorch saves).
pub trait ApplyCheckpoint {
    /// Loads what the checkpoint has for this model.
    fn apply_checkpoint(&mut self, ck: &Checkpoint) -> Result<()>;
}

impl ApplyCheckpoint for SimClr {
    fn apply_checkpoint(&mut self, ck: &Checkpoint) -> Result<()> {
        let err = |e: simclr_nn::NnError| CliError::Checkpoint {
            path: ck.path.clone(),
            msg: format!("does not fit the configured model (another architecture?): {e}"),
        };
        if ck.tensors.contains_key("encoder.conv1.weight") {
            ck.apply(self, "").map_err(err)?;
        } else {
            // An encoder alone: the head keeps its initialisation.
            ck.apply(&mut self.encoder, "").map_err(err)?;
        }
        Ok(())
    }
}

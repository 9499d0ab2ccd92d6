//! Checkpoints as safetensors, with torchvision's names and layouts, so PyTorch loads our
//! encoders and we load theirs.
//!
//! Convolution kernels are `[out, in, kh, kw]` in the file (PyTorch's layout) and `[out, kh, kw,
//! in]` in memory; the conversion happens here and nowhere else. Files are written atomically: a
//! temporary file beside the target, flushed to disk, then renamed over it, so a crash or a full
//! disk leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{NnError, Result};
use crate::param::{Module, Param, ParamKind, StateVisitor};
use crate::tensor::Tensor;

/// The values of a named tensor in a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats (16- and 64-bit floats are converted to these on reading).
    F32(Vec<f32>),
    /// 64-bit integers (`num_batches_tracked`).
    I64(Vec<i64>),
}

/// One tensor of a checkpoint, in PyTorch's layout.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values.
    pub data: TensorData,
}

/// The contents of a checkpoint file.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    /// Tensors by name.
    pub tensors: BTreeMap<String, NamedTensor>,
    /// The file's string metadata.
    pub metadata: BTreeMap<String, String>,
    /// Where it was read from (empty for one built in memory).
    pub path: PathBuf,
}

fn ohwi_to_oihw(src: &[f32], s: &[usize]) -> Vec<f32> {
    let (o, h, w, i) = (s[0], s[1], s[2], s[3]);
    let mut d = vec![0.0; src.len()];
    for a in 0..o {
        for y in 0..h {
            for x in 0..w {
                for c in 0..i {
                    d[((a * i + c) * h + y) * w + x] = src[((a * h + y) * w + x) * i + c];
                }
            }
        }
    }
    d
}

fn oihw_to_ohwi(src: &[f32], s: &[usize]) -> Vec<f32> {
    let (o, i, h, w) = (s[0], s[1], s[2], s[3]);
    let mut d = vec![0.0; src.len()];
    for a in 0..o {
        for c in 0..i {
            for y in 0..h {
                for x in 0..w {
                    d[((a * h + y) * w + x) * i + c] = src[((a * i + c) * h + y) * w + x];
                }
            }
        }
    }
    d
}

/// A parameter's shape in PyTorch's layout (convolution kernels OIHW).
fn torch_shape(p: &Param) -> Vec<usize> {
    let s = p.value.shape();
    match p.kind {
        ParamKind::ConvWeight => vec![s[0], s[3], s[1], s[2]],
        _ => s.to_vec(),
    }
}

/// A parameter's values in PyTorch's layout.
pub fn param_to_torch(p: &Param) -> NamedTensor {
    let v = p.value.to_vec();
    let data = match p.kind {
        ParamKind::ConvWeight => ohwi_to_oihw(&v, p.value.shape()),
        _ => v,
    };
    NamedTensor {
        shape: torch_shape(p),
        data: TensorData::F32(data),
    }
}

/// Everything of `model` (parameters and buffers), names prefixed with `prefix`.
pub fn state_dict(model: &mut dyn Module, prefix: &str) -> BTreeMap<String, NamedTensor> {
    struct V(BTreeMap<String, NamedTensor>);
    impl StateVisitor for V {
        fn param(&mut self, name: &str, p: &mut Param) {
            self.0.insert(name.to_string(), param_to_torch(p));
        }
        fn buffer(&mut self, name: &str, t: &mut Tensor) {
            self.0.insert(
                name.to_string(),
                NamedTensor {
                    shape: t.shape().to_vec(),
                    data: TensorData::F32(t.to_vec()),
                },
            );
        }
        fn counter(&mut self, name: &str, v: &mut i64) {
            self.0.insert(
                name.to_string(),
                NamedTensor {
                    shape: vec![],
                    data: TensorData::I64(vec![*v]),
                },
            );
        }
    }
    let mut v = V(BTreeMap::new());
    model.visit(prefix, &mut v);
    v.0
}

impl Checkpoint {
    /// Reads a safetensors file.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses safetensors bytes; `path` names them in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
        let err = |msg: String| NnError::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = decode(&view).map_err(|m| err(format!("tensor {name}: {m}")))?;
            tensors.insert(
                name,
                NamedTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(Checkpoint {
            tensors,
            metadata,
            path: path.to_path_buf(),
        })
    }

    /// Writes the checkpoint to `path` atomically (see the module docs).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes_store: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| match &t.data {
                TensorData::F32(v) => (
                    name.clone(),
                    Dtype::F32,
                    t.shape.clone(),
                    bytemuck::cast_slice(v).to_vec(),
                ),
                TensorData::I64(v) => (
                    name.clone(),
                    Dtype::I64,
                    t.shape.clone(),
                    bytemuck::cast_slice(v).to_vec(),
                ),
            })
            .collect();
        let mut views = Vec::with_capacity(bytes_store.len());
        for (name, dtype, shape, bytes) in &bytes_store {
            let view =
                TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| NnError::Checkpoint {
                    path: path.to_path_buf(),
                    msg: format!("tensor {name}: {e}"),
                })?;
            views.push((name.clone(), view));
        }
        let meta: Option<HashMap<String, String>> = (!self.metadata.is_empty()).then(|| {
            self.metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        let bytes =
            safetensors::tensor::serialize(views, meta).map_err(|e| NnError::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("serialising: {e}"),
            })?;
        write_atomic(path, &bytes)
    }

    /// Loads the tensors named `prefix + <model's name>` into `model`. Every parameter and buffer
    /// of the model must be present with its shape (an error names the first that is not);
    /// tensors of the file that the model does not use are returned (a torchvision file's `fc.*`,
    /// say).
    pub fn apply(&self, model: &mut dyn Module, prefix: &str) -> Result<Vec<String>> {
        struct V<'a> {
            ck: &'a Checkpoint,
            used: Vec<String>,
            err: Option<NnError>,
        }
        impl V<'_> {
            fn get(&mut self, name: &str, shape: &[usize]) -> Option<&NamedTensor> {
                if self.err.is_some() {
                    return None;
                }
                let path = self.ck.path.clone();
                match self.ck.tensors.get(name) {
                    None => {
                        self.err = Some(NnError::Checkpoint {
                            path,
                            msg: format!(
                                "missing tensor {name} (is it a checkpoint of this architecture?)"
                            ),
                        });
                        None
                    }
                    Some(t) if t.shape != shape => {
                        self.err = Some(NnError::Checkpoint {
                            path,
                            msg: format!(
                                "tensor {name} has shape {:?}, the model needs {shape:?} (another architecture?)",
                                t.shape
                            ),
                        });
                        None
                    }
                    Some(t) => {
                        self.used.push(name.to_string());
                        Some(t)
                    }
                }
            }
            fn f32s<'b>(&mut self, name: &str, t: &'b NamedTensor) -> Option<&'b [f32]> {
                match &t.data {
                    TensorData::F32(v) => Some(v),
                    TensorData::I64(_) => {
                        self.err = Some(NnError::Checkpoint {
                            path: self.ck.path.clone(),
                            msg: format!("tensor {name} is integer, expected float"),
                        });
                        None
                    }
                }
            }
        }
        impl StateVisitor for V<'_> {
            fn param(&mut self, name: &str, p: &mut Param) {
                // Only the shape is needed: no copy of the values (from a GPU, a download).
                let Some(t) = self.get(name, &torch_shape(p)).cloned() else {
                    return;
                };
                let Some(v) = self.f32s(name, &t) else { return };
                let v = match p.kind {
                    ParamKind::ConvWeight => oihw_to_ohwi(v, &t.shape),
                    _ => v.to_vec(),
                };
                let host = Tensor::from_vec(p.value.shape(), v).expect("shape checked");
                match host.to_device(p.value.device()) {
                    Ok(t) => p.value = t,
                    Err(e) => self.err = Some(e),
                }
            }
            fn buffer(&mut self, name: &str, b: &mut Tensor) {
                let shape = b.shape().to_vec();
                let Some(t) = self.get(name, &shape).cloned() else {
                    return;
                };
                if let Some(v) = self.f32s(name, &t) {
                    let host = Tensor::from_slice(&shape, v).expect("shape checked");
                    match host.to_device(b.device()) {
                        Ok(t) => *b = t,
                        Err(e) => self.err = Some(e),
                    }
                }
            }
            fn counter(&mut self, name: &str, c: &mut i64) {
                if self.err.is_some() {
                    return;
                }
                // Older checkpoints lack the counter; it only feeds momentum-free BN, so 0 is fine.
                match self.ck.tensors.get(name).map(|t| &t.data) {
                    Some(TensorData::I64(v)) if v.len() == 1 => {
                        *c = v[0];
                        self.used.push(name.to_string());
                    }
                    Some(TensorData::F32(v)) if v.len() == 1 => {
                        *c = v[0] as i64;
                        self.used.push(name.to_string());
                    }
                    _ => {}
                }
            }
        }
        let mut v = V {
            ck: self,
            used: vec![],
            err: None,
        };
        model.visit(prefix, &mut v);
        if let Some(e) = v.err {
            return Err(e);
        }
        let used: std::collections::BTreeSet<_> = v.used.into_iter().collect();
        Ok(self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect())
    }
}

fn decode(view: &TensorView<'_>) -> std::result::Result<TensorData, String> {
    let b = view.data();
    let n: usize = view.shape().iter().product();
    let (size, data) = match view.dtype() {
        Dtype::F32 => (
            4,
            TensorData::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
        ),
        Dtype::F64 => (
            8,
            TensorData::F32(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
            ),
        ),
        Dtype::F16 => (
            2,
            TensorData::F32(
                b.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
        ),
        Dtype::BF16 => (
            2,
            TensorData::F32(
                b.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
        ),
        Dtype::I64 => (
            8,
            TensorData::I64(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
        ),
        other => return Err(format!("unsupported dtype {other:?}")),
    };
    if b.len() != n * size {
        return Err(format!(
            "holds {} bytes, shape {:?} needs {}",
            b.len(),
            view.shape(),
            n * size
        ));
    }
    Ok(data)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| NnError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path.file_name().ok_or_else(|| NnError::Invalid {
        op: "write_atomic",
        msg: format!("{} names no file", path.display()),
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

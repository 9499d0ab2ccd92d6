//! [`Tensor`] and [`Device`].
//!
//! A tensor is a shape plus storage on a device. CPU storage is reference counted, so a layer can
//! keep its input for the backward pass without copying it; writing to a shared tensor copies it
//! first. Operations dispatch on the storage (see [`crate::ops`]), so a CUDA backend adds a
//! storage variant and one arm per operation, and the layers stay as they are.
//!
//! CUDA storage is reference counted the same way; a tensor on `Device::Cuda(i)` lives in the
//! memory of GPU `i` and every operation on it runs there (see [`crate::cuda`]).
//!
//! Activations of convolutional layers are channels-last (NHWC): `[batch, height, width,
//! channels]`. Models accept NCHW input, as PyTorch and the data loader produce it, and convert
//! once at the entrance.

use std::fmt;
use std::sync::Arc;

use crate::cuda::{CudaBackend, CudaBuffer};
use crate::error::{NnError, Result};

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Device {
    /// Host memory, computed on CPU threads (rayon).
    #[default]
    Cpu,
    /// The memory of CUDA device `i` (its ordinal), computed by cuDNN, cuBLAS and our kernels.
    Cuda(usize),
}

impl Device {
    /// CUDA device 0 when one can be used (driver, device, NVRTC, cuBLAS and cuDNN all load),
    /// else the CPU.
    pub fn auto() -> Device {
        if simclr_kernels::cuda::gpu_available() && CudaBackend::get(0).is_ok() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// Checks that the device can be used (opens the CUDA backend), with an error that says
    /// what is missing.
    pub fn ensure_usable(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => CudaBackend::get(i).map(|_| ()),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = NnError;

    /// `cpu`, `cuda` (device 0) or `cuda:N`; `auto` picks as [`Device::auto`].
    fn from_str(s: &str) -> Result<Device> {
        let bad = || NnError::Invalid {
            op: "device",
            msg: format!("`{s}` is not one of auto, cpu, cuda, cuda:N"),
        };
        match s {
            "auto" => Ok(Device::auto()),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Device::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The memory behind a tensor.
#[derive(Clone)]
#[non_exhaustive]
pub enum Storage {
    /// f32 values in host memory.
    Cpu(Arc<Vec<f32>>),
    /// f32 values in the memory of a CUDA device.
    Cuda(Arc<CudaBuffer>),
}

/// An f32 tensor: a shape and the values in row-major order.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.device())
    }
}

impl Tensor {
    /// A tensor of zeros.
    ///
    /// # Panics
    /// On a CUDA device that cannot be opened or is out of memory, as a `Vec` does when the
    /// host is; [`Tensor::try_full`] returns the error instead.
    pub fn zeros(shape: &[usize], device: Device) -> Tensor {
        Self::full(shape, 0.0, device)
    }

    /// A tensor with every value `value`.
    ///
    /// # Panics
    /// As [`Tensor::zeros`].
    pub fn full(shape: &[usize], value: f32, device: Device) -> Tensor {
        Self::try_full(shape, value, device)
            .unwrap_or_else(|e| panic!("allocating a {shape:?} tensor on {device}: {e}"))
    }

    /// A tensor with every value `value`, or the error of the device.
    pub fn try_full(shape: &[usize], value: f32, device: Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        match device {
            Device::Cpu => Ok(Tensor {
                shape: shape.to_vec(),
                storage: Storage::Cpu(Arc::new(vec![value; n])),
            }),
            Device::Cuda(i) => {
                let backend = CudaBackend::get(i)?;
                let data = if value == 0.0 {
                    backend.zeros(n)?
                } else {
                    backend.gpu().upload(&vec![value; n.max(1)])?
                };
                Ok(Tensor::from_cuda(shape, backend, data))
            }
        }
    }

    /// A tensor over device values (`data` holds at least the shape's count).
    pub(crate) fn from_cuda(
        shape: &[usize],
        backend: Arc<CudaBackend>,
        data: simclr_kernels::cuda::cudarc::driver::CudaSlice<f32>,
    ) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda(Arc::new(CudaBuffer { backend, data })),
        }
    }

    /// A tensor over values already on a GPU (`data` must hold at least the shape's count; the
    /// rest is ignored).
    pub fn from_cuda_slice(
        shape: &[usize],
        backend: Arc<CudaBackend>,
        data: simclr_kernels::cuda::cudarc::driver::CudaSlice<f32>,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if data.len() < n {
            return Err(NnError::Invalid {
                op: "Tensor::from_cuda_slice",
                msg: format!(
                    "shape {shape:?} holds {n} values, the buffer {}",
                    data.len()
                ),
            });
        }
        Ok(Tensor::from_cuda(shape, backend, data))
    }

    /// The same values on `device` (shared, not copied, when already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let host = self.try_to_vec()?;
        match device {
            Device::Cpu => Tensor::from_vec(&self.shape, host),
            Device::Cuda(i) => {
                let backend = CudaBackend::get(i)?;
                let data = if host.is_empty() {
                    backend.zeros(0)?
                } else {
                    backend.gpu().upload(&host)?
                };
                Ok(Tensor::from_cuda(&self.shape, backend, data))
            }
        }
    }

    /// A host tensor of no values (shape `[0]`): a placeholder for one taken out.
    pub fn empty() -> Tensor {
        Tensor {
            shape: vec![0],
            storage: Storage::Cpu(Arc::new(Vec::new())),
        }
    }

    /// A CPU tensor from values; fails if their count does not fit the shape.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(NnError::Invalid {
                op: "Tensor::from_vec",
                msg: format!("shape {shape:?} holds {n} values, got {}", data.len()),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(data)),
        })
    }

    /// A CPU tensor copied from a slice.
    pub fn from_slice(shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Self::from_vec(shape, data.to_vec())
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The device holding the values.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(b) => Device::Cuda(b.backend.ordinal()),
        }
    }

    /// The storage, for backends.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The values of a CPU tensor; an error for a tensor on a GPU (see [`Tensor::to_device`]).
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.as_slice()),
            Storage::Cuda(_) => Err(self.not_on_cpu("as_slice")),
        }
    }

    /// Mutable values of a CPU tensor; copies them first if another tensor shares them.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        if let Storage::Cuda(_) = self.storage {
            return Err(self.not_on_cpu("as_mut_slice"));
        }
        match &mut self.storage {
            Storage::Cpu(v) => Ok(Arc::make_mut(v).as_mut_slice()),
            Storage::Cuda(_) => unreachable!("handled above"),
        }
    }

    fn not_on_cpu(&self, op: &'static str) -> NnError {
        NnError::Device {
            op,
            expected: Device::Cpu.to_string(),
            got: self.device().to_string(),
        }
    }

    /// The device buffer of a CUDA tensor.
    pub fn cuda(&self) -> Result<&CudaBuffer> {
        match &self.storage {
            Storage::Cuda(b) => Ok(b),
            Storage::Cpu(_) => Err(NnError::Device {
                op: "cuda",
                expected: "cuda".into(),
                got: "cpu".into(),
            }),
        }
    }

    /// The device values of a CUDA tensor, to write; copied first if another tensor shares them.
    pub(crate) fn cuda_mut(
        &mut self,
    ) -> Result<&mut simclr_kernels::cuda::cudarc::driver::CudaSlice<f32>> {
        let Storage::Cuda(b) = &mut self.storage else {
            return Err(NnError::Device {
                op: "cuda_mut",
                expected: "cuda".into(),
                got: "cpu".into(),
            });
        };
        if Arc::get_mut(b).is_none() {
            *b = Arc::new(b.duplicate()?);
        }
        Ok(&mut Arc::get_mut(b).expect("unique after the copy").data)
    }

    /// Overwrites the values with `v` (as many as the tensor holds), in place on its device.
    pub fn copy_from_host_(&mut self, v: &[f32]) -> Result<()> {
        if v.len() != self.numel() {
            return Err(NnError::Shape {
                op: "copy_from_host_",
                expected: self.shape.clone(),
                got: vec![v.len()],
            });
        }
        match &self.storage {
            Storage::Cpu(_) => self.as_mut_slice()?.copy_from_slice(v),
            Storage::Cuda(b) => {
                let backend = b.backend.clone();
                let dst = self.cuda_mut()?;
                if !v.is_empty() {
                    let mut view = dst.slice_mut(0..v.len());
                    backend
                        .gpu()
                        .stream()
                        .memcpy_htod(v, &mut view)
                        .map_err(simclr_kernels::cuda::GpuError::from)?;
                }
            }
        }
        Ok(())
    }

    /// The values copied to a host vector, whatever the device.
    ///
    /// # Panics
    /// If a GPU copy fails (a device fault); [`Tensor::try_to_vec`] returns the error instead.
    pub fn to_vec(&self) -> Vec<f32> {
        self.try_to_vec()
            .unwrap_or_else(|e| panic!("copying {self:?} to the host: {e}"))
    }

    /// The values copied to a host vector, whatever the device.
    pub fn try_to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.as_ref().clone()),
            Storage::Cuda(b) => {
                let mut v = b.backend.gpu().download(&b.data)?;
                v.truncate(self.numel());
                Ok(v)
            }
        }
    }

    /// The same values under another shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(NnError::Shape {
                op: "reshape",
                expected: self.shape.clone(),
                got: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// A tensor of the same shape and device filled with zeros.
    ///
    /// # Panics
    /// As [`Tensor::zeros`].
    pub fn zeros_like(&self) -> Tensor {
        Self::zeros(&self.shape, self.device())
    }

    /// Sets every value to zero, in place when nothing else shares the values.
    pub fn fill_zero_(&mut self) -> Result<()> {
        match &mut self.storage {
            Storage::Cpu(v) => {
                match Arc::get_mut(v) {
                    Some(v) => v.fill(0.0),
                    None => *v = Arc::new(vec![0.0; v.len()]),
                }
                Ok(())
            }
            Storage::Cuda(b) => {
                let backend = b.backend.clone();
                match Arc::get_mut(b) {
                    Some(buf) => backend
                        .gpu()
                        .stream()
                        .memset_zeros(&mut buf.data)
                        .map_err(simclr_kernels::cuda::GpuError::from)?,
                    None => {
                        let data = backend.zeros(b.data.len())?;
                        *b = Arc::new(CudaBuffer { backend, data });
                    }
                }
                Ok(())
            }
        }
    }

    /// Fails with a shape error unless the shape is `expected`.
    pub fn expect_shape(&self, op: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(NnError::Shape {
                op,
                expected: expected.to_vec(),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Fails with a shape error unless the tensor has `rank` dimensions.
    pub fn expect_rank(&self, op: &'static str, rank: usize) -> Result<()> {
        if self.shape.len() != rank {
            return Err(NnError::Invalid {
                op,
                msg: format!("expected a rank-{rank} tensor, got shape {:?}", self.shape),
            });
        }
        Ok(())
    }

    /// True when every value is finite (false too when a GPU cannot say).
    pub fn all_finite(&self) -> bool {
        self.try_all_finite().unwrap_or(false)
    }

    /// [`Tensor::all_finite`], with the device's error when it cannot say (a CUDA fault is not
    /// a divergence).
    pub fn try_all_finite(&self) -> Result<bool> {
        Ok(all_finite_each(std::slice::from_ref(self))?[0])
    }
}

/// Whether each tensor's values are all finite. The tensors on a GPU cost one reduction each
/// and one download for all of them (not a wait per tensor).
pub(crate) fn all_finite_each(ts: &[Tensor]) -> Result<Vec<bool>> {
    let mut out = vec![true; ts.len()];
    let mut on_gpu: Vec<usize> = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        match &t.storage {
            Storage::Cpu(v) => out[i] = v.iter().all(|x| x.is_finite()),
            Storage::Cuda(_) => on_gpu.push(i),
        }
    }
    // Grouped by device: the sums of one device go to one buffer there.
    while let Some(&first) = on_gpu.first() {
        let backend = ts[first].cuda()?.backend().clone();
        let (here, rest): (Vec<usize>, Vec<usize>) = on_gpu.iter().partition(|&&i| {
            Arc::ptr_eq(
                ts[i].cuda().map(|b| b.backend()).unwrap_or(&backend),
                &backend,
            )
        });
        let gpu = backend.gpu();
        let mut sums = gpu.zeros::<f64>(here.len())?;
        for (k, &i) in here.iter().enumerate() {
            let data = &ts[i].cuda()?.data;
            // The f64 sum of f32 values is finite exactly when they all are (it cannot
            // overflow), and costs one reduction instead of a copy to the host.
            simclr_kernels::cuda::train::sum_into(gpu, data, &mut sums.slice_mut(k..k + 1))?;
        }
        for (s, &i) in gpu.download(&sums)?.iter().zip(&here) {
            out[i] = s.is_finite();
        }
        on_gpu = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finiteness_of_each_tensor() {
        let t = |v: Vec<f32>| Tensor::from_vec(&[v.len()], v).unwrap();
        let ts = [
            t(vec![1.0, 2.0]),
            t(vec![1.0, f32::NAN]),
            t(vec![f32::INFINITY]),
            t(vec![]),
            t(vec![f32::MAX, f32::MAX]),
        ];
        assert_eq!(
            all_finite_each(&ts).unwrap(),
            vec![true, false, false, true, true]
        );
        assert!(!ts[2].try_all_finite().unwrap());
        if crate::cuda::device_count() > 0 {
            // The same answers from the GPU's reductions, one download for all.
            let on: Vec<Tensor> = ts
                .iter()
                .map(|x| x.to_device(Device::Cuda(0)).unwrap())
                .collect();
            assert_eq!(all_finite_each(&on).unwrap(), all_finite_each(&ts).unwrap());
        }
    }

    #[test]
    fn zeroing_and_host_writes_leave_sharers_alone() {
        let a = Tensor::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut b = a.clone();
        b.fill_zero_().unwrap();
        assert_eq!(b.to_vec(), vec![0.0; 4]);
        assert_eq!(
            a.to_vec(),
            vec![1.0, 2.0, 3.0, 4.0],
            "the sharer keeps its values"
        );
        let mut c = a.clone();
        c.copy_from_host_(&[5.0, 6.0, 7.0, 8.0]).unwrap();
        assert_eq!(c.to_vec(), vec![5.0, 6.0, 7.0, 8.0]);
        assert_eq!(a.to_vec(), vec![1.0, 2.0, 3.0, 4.0]);
        let e = c.copy_from_host_(&[1.0]).unwrap_err();
        assert!(matches!(e, NnError::Shape { .. }), "{e}");
        // In place when not shared: the same allocation.
        let mut d = Tensor::from_vec(&[3], vec![1.0; 3]).unwrap();
        let before = d.as_slice().unwrap().as_ptr();
        d.fill_zero_().unwrap();
        assert_eq!(d.as_slice().unwrap().as_ptr(), before);
    }

    #[test]
    fn moving_to_the_host_shares_and_device_errors_are_clear() {
        let a = Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap();
        let b = a.to_device(Device::Cpu).unwrap();
        assert_eq!(
            a.as_slice().unwrap().as_ptr(),
            b.as_slice().unwrap().as_ptr(),
            "no copy"
        );
        assert_eq!(a.try_to_vec().unwrap(), vec![1.0, 2.0, 3.0]);
        let e = a.cuda().unwrap_err();
        assert!(e.to_string().contains("cpu"), "{e}");
        if !simclr_kernels::cuda::gpu_available() {
            let e = a.to_device(Device::Cuda(0)).unwrap_err();
            assert!(matches!(e, NnError::Cuda(_)), "{e}");
        }
    }
}

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
//!
//! Values are f32, except the activations of mixed-precision training on a GPU, which are bf16
//! ([`DType::Bf16`]): half the memory and bandwidth of f32. Operations read bf16 values as f32,
//! compute in f32 and round once on store; parameters, gradients of parameters, batch-norm
//! statistics and the loss stay f32.

use std::fmt;
use std::sync::Arc;

use half::bf16;
use simclr_kernels::cuda::cudarc::driver::CudaSlice;
use simclr_kernels::cuda::GpuError;
use simclr_kernels::Elem;

use crate::buffers::HostBuffer;
use crate::cuda::{CudaBackend, CudaBuffer, DeviceSlice};
use crate::error::{NnError, Result};

/// The element type of a tensor's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit floats: every CPU tensor, parameters and gradients everywhere.
    #[default]
    F32,
    /// bfloat16 (8-bit exponent, 8-bit significand): activations of mixed-precision training,
    /// on CUDA devices only.
    Bf16,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        })
    }
}

/// An element type a CUDA tensor can hold, with the storage variant that holds it.
pub(crate) trait DeviceElem: Elem {
    /// This type's [`DType`].
    const DTYPE: DType;
    /// The buffer of `s` when it holds this type on a GPU.
    fn buffer(s: &Storage) -> Option<&Arc<CudaBuffer<Self>>>;
    /// As [`DeviceElem::buffer`], to write.
    fn buffer_mut(s: &mut Storage) -> Option<&mut Arc<CudaBuffer<Self>>>;
    /// The storage over `b`.
    fn storage(b: Arc<CudaBuffer<Self>>) -> Storage;
    /// `s` as a buffer of a GPU's cache.
    fn into_device_slice(s: CudaSlice<Self>) -> DeviceSlice;
    /// The slice, when the cache's buffer `s` holds this type.
    fn from_device_slice(s: DeviceSlice) -> Option<CudaSlice<Self>>;
}

impl DeviceElem for f32 {
    const DTYPE: DType = DType::F32;
    fn buffer(s: &Storage) -> Option<&Arc<CudaBuffer<f32>>> {
        match s {
            Storage::Cuda(b) => Some(b),
            _ => None,
        }
    }
    fn buffer_mut(s: &mut Storage) -> Option<&mut Arc<CudaBuffer<f32>>> {
        match s {
            Storage::Cuda(b) => Some(b),
            _ => None,
        }
    }
    fn storage(b: Arc<CudaBuffer<f32>>) -> Storage {
        Storage::Cuda(b)
    }
    fn into_device_slice(s: CudaSlice<f32>) -> DeviceSlice {
        DeviceSlice::F32(s)
    }
    fn from_device_slice(s: DeviceSlice) -> Option<CudaSlice<f32>> {
        match s {
            DeviceSlice::F32(s) => Some(s),
            DeviceSlice::Bf16(_) => None,
        }
    }
}

impl DeviceElem for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn buffer(s: &Storage) -> Option<&Arc<CudaBuffer<bf16>>> {
        match s {
            Storage::CudaBf16(b) => Some(b),
            _ => None,
        }
    }
    fn buffer_mut(s: &mut Storage) -> Option<&mut Arc<CudaBuffer<bf16>>> {
        match s {
            Storage::CudaBf16(b) => Some(b),
            _ => None,
        }
    }
    fn storage(b: Arc<CudaBuffer<bf16>>) -> Storage {
        Storage::CudaBf16(b)
    }
    fn into_device_slice(s: CudaSlice<bf16>) -> DeviceSlice {
        DeviceSlice::Bf16(s)
    }
    fn from_device_slice(s: DeviceSlice) -> Option<CudaSlice<bf16>> {
        match s {
            DeviceSlice::Bf16(s) => Some(s),
            DeviceSlice::F32(_) => None,
        }
    }
}

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
    /// f32 values in host memory, cached for reuse when dropped (see [`crate::buffers`]).
    Cpu(Arc<HostBuffer>),
    /// f32 values in the memory of a CUDA device.
    Cuda(Arc<CudaBuffer>),
    /// bf16 values in the memory of a CUDA device (mixed-precision activations).
    CudaBf16(Arc<CudaBuffer<bf16>>),
}

/// A tensor: a shape and the values in row-major order, f32 unless it is a bf16 activation on
/// a GPU (see [`DType`]).
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dtype() {
            DType::F32 => write!(f, "Tensor({:?}, {})", self.shape, self.device()),
            dt => write!(f, "Tensor({:?}, {}, {dt})", self.shape, self.device()),
        }
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
                storage: Storage::Cpu(Arc::new(HostBuffer::filled(n, value))),
            }),
            Device::Cuda(i) => {
                let backend = CudaBackend::get(i)?;
                let data = if value == 0.0 {
                    backend.zeros(n)?
                } else {
                    backend.upload(&vec![value; n])?
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
        Self::from_cuda_of(shape, backend, data)
    }

    /// A tensor over device values of any element type.
    pub(crate) fn from_cuda_of<T: DeviceElem>(
        shape: &[usize],
        backend: Arc<CudaBackend>,
        data: CudaSlice<T>,
    ) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: T::storage(Arc::new(CudaBuffer::new(backend, data))),
        }
    }

    /// The backend of a tensor on a GPU, whatever its element type.
    pub(crate) fn cuda_backend(&self) -> Result<&Arc<CudaBackend>> {
        match &self.storage {
            Storage::Cuda(b) => Ok(&b.backend),
            Storage::CudaBf16(b) => Ok(&b.backend),
            Storage::Cpu(_) => Err(NnError::Device {
                op: "CUDA operation",
                expected: "cuda".into(),
                got: "cpu".into(),
            }),
        }
    }

    /// The element type of the values.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(_) | Storage::Cuda(_) => DType::F32,
            Storage::CudaBf16(_) => DType::Bf16,
        }
    }

    /// The same values as `dtype` (shared, not copied, when already so): rounded to nearest
    /// even for bf16. bf16 tensors live on CUDA devices only.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        match (&self.storage, dtype) {
            (Storage::Cuda(b), DType::Bf16) => {
                let mut y = b.backend.uninit::<bf16>(b.data.len())?;
                simclr_kernels::cuda::train::cast_f32_to_bf16(b.backend.gpu(), &b.data, &mut y)?;
                Ok(Tensor::from_cuda_of(&self.shape, b.backend.clone(), y))
            }
            (Storage::CudaBf16(b), DType::F32) => {
                let mut y = b.backend.uninit::<f32>(b.data.len())?;
                simclr_kernels::cuda::train::cast_bf16_to_f32(b.backend.gpu(), &b.data, &mut y)?;
                Ok(Tensor::from_cuda(&self.shape, b.backend.clone(), y))
            }
            _ => Err(NnError::Invalid {
                op: "Tensor::to_dtype",
                msg: format!("{dtype} tensors cannot live on {}", self.device()),
            }),
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

    /// The same values on `device` (shared, not copied, when already there), as f32 when they
    /// move.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let host = self.try_to_vec()?;
        match device {
            Device::Cpu => Tensor::from_vec(&self.shape, host),
            Device::Cuda(i) => {
                let backend = CudaBackend::get(i)?;
                // Into a cached buffer: a training loop uploads a batch of the same size every
                // step.
                let data = backend.upload(&host)?;
                Ok(Tensor::from_cuda(&self.shape, backend, data))
            }
        }
    }

    /// A host tensor of no values (shape `[0]`): a placeholder for one taken out.
    pub fn empty() -> Tensor {
        Tensor {
            shape: vec![0],
            storage: Storage::Cpu(Arc::new(HostBuffer::default())),
        }
    }

    /// A CPU tensor from values; fails if their count does not fit the shape.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Self::from_host(shape, HostBuffer::from_vec(data))
    }

    /// A CPU tensor over a host buffer; fails if its length does not fit the shape.
    pub fn from_host(shape: &[usize], data: HostBuffer) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(NnError::Invalid {
                op: "Tensor::from_host",
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
            Storage::CudaBf16(b) => Device::Cuda(b.backend.ordinal()),
        }
    }

    /// The storage, for backends.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The values of a CPU tensor; an error for a tensor on a GPU (see [`Tensor::to_device`]).
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(&v[..]),
            _ => Err(self.not_on_cpu("as_slice")),
        }
    }

    /// Mutable values of a CPU tensor; copies them first if another tensor shares them.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        if !matches!(self.storage, Storage::Cpu(_)) {
            return Err(self.not_on_cpu("as_mut_slice"));
        }
        match &mut self.storage {
            Storage::Cpu(v) => Ok(&mut Arc::make_mut(v)[..]),
            _ => unreachable!("handled above"),
        }
    }

    fn not_on_cpu(&self, op: &'static str) -> NnError {
        NnError::Device {
            op,
            expected: Device::Cpu.to_string(),
            got: self.device().to_string(),
        }
    }

    /// The device buffer of an f32 CUDA tensor.
    pub fn cuda(&self) -> Result<&CudaBuffer> {
        self.cuda_of::<f32>("cuda")
    }

    /// The device buffer of a bf16 CUDA tensor.
    pub fn cuda_bf16(&self) -> Result<&CudaBuffer<bf16>> {
        self.cuda_of::<bf16>("cuda_bf16")
    }

    /// Why the values are not a `T` buffer on a GPU.
    fn not_a_buffer_of<T: DeviceElem>(&self, op: &'static str) -> NnError {
        if self.device() == Device::Cpu {
            return NnError::Device {
                op,
                expected: "cuda".into(),
                got: "cpu".into(),
            };
        }
        NnError::Invalid {
            op,
            msg: format!("a {} tensor where {} was needed", self.dtype(), T::DTYPE),
        }
    }

    /// The device buffer of a CUDA tensor of `T` values.
    pub(crate) fn cuda_of<T: DeviceElem>(&self, op: &'static str) -> Result<&CudaBuffer<T>> {
        match T::buffer(&self.storage) {
            Some(b) => Ok(b),
            None => Err(self.not_a_buffer_of::<T>(op)),
        }
    }

    /// The device values of an f32 CUDA tensor, to write; copied first if another tensor
    /// shares them.
    pub fn cuda_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        self.cuda_mut_of::<f32>()
    }

    /// [`Tensor::cuda_mut`] for `T` values.
    pub(crate) fn cuda_mut_of<T: DeviceElem>(&mut self) -> Result<&mut CudaSlice<T>> {
        if T::buffer(&self.storage).is_none() {
            return Err(self.not_a_buffer_of::<T>("cuda_mut"));
        }
        let b = T::buffer_mut(&mut self.storage).expect("checked above");
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
            Storage::Cuda(_) => self.upload_::<f32>(v)?,
            Storage::CudaBf16(_) => {
                let rounded: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                self.upload_::<bf16>(&rounded)?;
            }
        }
        Ok(())
    }

    fn upload_<T: DeviceElem>(&mut self, v: &[T]) -> Result<()> {
        let backend = self.cuda_of::<T>("copy_from_host_")?.backend.clone();
        let dst = self.cuda_mut_of::<T>()?;
        if !v.is_empty() {
            let mut view = dst.slice_mut(0..v.len());
            backend
                .gpu()
                .stream()
                .memcpy_htod(v, &mut view)
                .map_err(GpuError::from)?;
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

    /// The values copied to a host vector, whatever the device (bf16 widened to f32, exactly).
    pub fn try_to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.to_vec()),
            Storage::Cuda(b) => {
                let mut v = b.backend.gpu().download(&b.data)?;
                v.truncate(self.numel());
                Ok(v)
            }
            Storage::CudaBf16(b) => {
                let v = b.backend.gpu().download(&b.data)?;
                Ok(v[..self.numel()].iter().map(|x| x.to_f32()).collect())
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

    /// An f32 tensor of the same shape and device filled with zeros.
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
                    None => *v = Arc::new(HostBuffer::zeroed(v.len())),
                }
                Ok(())
            }
            Storage::Cuda(b) => zero_buffer(b),
            Storage::CudaBf16(b) => zero_buffer(b),
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

/// Zeroes a device buffer in place, or replaces it with a zeroed one when it is shared.
fn zero_buffer<T: DeviceElem>(b: &mut Arc<CudaBuffer<T>>) -> Result<()> {
    let backend = b.backend.clone();
    match Arc::get_mut(b) {
        Some(buf) => backend
            .gpu()
            .stream()
            .memset_zeros(&mut *buf.data)
            .map_err(GpuError::from)?,
        None => {
            let data = backend.zeros_of::<T>(b.data.len())?;
            *b = Arc::new(CudaBuffer::new(backend, data));
        }
    }
    Ok(())
}

/// Whether each tensor's values are all finite. The tensors on a GPU cost one reduction each
/// and one download for all of them (not a wait per tensor).
pub(crate) fn all_finite_each(ts: &[Tensor]) -> Result<Vec<bool>> {
    let mut out = vec![true; ts.len()];
    let mut on_gpu: Vec<usize> = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        match &t.storage {
            // Only the tensor's values: a buffer may be longer than its shape (an empty
            // tensor's holds one unspecified value).
            Storage::Cpu(v) => out[i] = v[..t.numel()].iter().all(|x| x.is_finite()),
            Storage::Cuda(_) if t.numel() > 0 => on_gpu.push(i),
            Storage::Cuda(_) => {}
            // Rare (parameters and gradients are f32): widened on the device, then as f32.
            Storage::CudaBf16(_) => out[i] = t.to_dtype(DType::F32)?.try_all_finite()?,
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
        // The f64 sums in the bits of a cached f32 buffer twice as long: no allocation.
        let mut room = backend.scratch::<f32>(2 * here.len())?;
        let mut sums = crate::cuda::ops::f64_view_mut(&mut room, here.len())?;
        for (k, &i) in here.iter().enumerate() {
            let t = &ts[i];
            let data = t.cuda()?.data.slice(0..t.numel());
            // The f64 sum of f32 values is finite exactly when they all are (it cannot
            // overflow), and costs one reduction instead of a copy to the host.
            simclr_kernels::cuda::train::sum_into(gpu, &data, &mut sums.slice_mut(k..k + 1))?;
        }
        let sums = gpu.stream().clone_dtoh(&sums).map_err(GpuError::from)?;
        for (s, &i) in sums.iter().zip(&here) {
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
    fn bf16_lives_on_gpus_only_and_round_trips_there() {
        let a = Tensor::from_vec(&[3], vec![1.0, 1.0 + 1.0 / 256.0, -3.5]).unwrap();
        assert_eq!(a.dtype(), DType::F32);
        assert_eq!(a.to_dtype(DType::F32).unwrap().to_vec(), a.to_vec());
        let e = a.to_dtype(DType::Bf16).unwrap_err().to_string();
        assert!(e.contains("bf16") && e.contains("cpu"), "{e}");
        let e = a.cuda_bf16().unwrap_err().to_string();
        assert!(e.contains("cpu"), "{e}");
        if crate::cuda::device_count() > 0 {
            let g = a.to_device(Device::Cuda(0)).unwrap();
            let h = g.to_dtype(DType::Bf16).unwrap();
            assert_eq!(h.dtype(), DType::Bf16);
            assert!(format!("{h:?}").contains("bf16"));
            // Rounded to nearest even once; widened exactly.
            assert_eq!(h.try_to_vec().unwrap(), vec![1.0, 1.0, -3.5]);
            assert_eq!(
                h.to_dtype(DType::F32).unwrap().to_vec(),
                vec![1.0, 1.0, -3.5]
            );
            let e = h.cuda().unwrap_err().to_string();
            assert!(e.contains("bf16") && e.contains("f32"), "{e}");
            let mut z = h.clone();
            z.fill_zero_().unwrap();
            assert_eq!(z.to_vec(), vec![0.0; 3]);
            assert_eq!(
                h.to_vec(),
                vec![1.0, 1.0, -3.5],
                "the sharer keeps its values"
            );
            let mut w = h.clone();
            w.copy_from_host_(&[2.0, f32::NAN, 0.1]).unwrap();
            let back = w.to_vec();
            assert_eq!(back[0], 2.0);
            assert!(back[1].is_nan());
            assert_eq!(back[2], half::bf16::from_f32(0.1).to_f32());
            assert_eq!(all_finite_each(&[h, w]).unwrap(), vec![true, false]);
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

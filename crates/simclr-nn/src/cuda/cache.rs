//! Device buffers kept from one training step for the next.
//!
//! The buffers of a step are the same every step, so when the last tensor holding one drops,
//! it goes to its GPU's cache rather than back to the driver, and the next request of that
//! element type and length takes it: after the first step, a step makes no allocation call for
//! its tensors and temporaries (no `cuMemAllocAsync`, and none of the events cudarc creates per
//! allocation), which [`CudaBackend::buffer_stats`] shows. Max pooling keeps its u32 indices in
//! an f32 buffer's bits so that they come from here too. A buffer keeps its cudarc read and
//! write events, so its next user on another stream (an NCCL all-reduce) still waits for its
//! last one.
//!
//! Memory held: the cache takes back only buffers it handed out; [`crate::buffers::end_step`]
//! keeps of each size as many buffers as the step freed; an allocation the device cannot serve
//! frees the whole cache and tries again; and [`CudaBackend::set_buffer_limit`] caps it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use half::bf16;
use simclr_kernels::cuda::cudarc::driver::{sys, CudaSlice, DevicePtrMut, DriverError};
use simclr_kernels::cuda::GpuError;

use super::{CudaBackend, CudaBuffer, BACKENDS};
use crate::buffers::{BufferStats, FreeLists};
use crate::error::{NnError, Result};
use crate::tensor::{DType, DeviceElem};

/// A cached buffer of either element type.
pub(crate) enum DeviceSlice {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

/// One GPU's free buffers, by element type and length.
pub(crate) struct DeviceCache {
    lists: Mutex<FreeLists<(DType, usize), DeviceSlice>>,
    limit: AtomicUsize,
}

impl DeviceCache {
    pub(crate) fn new() -> DeviceCache {
        DeviceCache {
            lists: Mutex::new(FreeLists::new()),
            limit: AtomicUsize::new(usize::MAX),
        }
    }

    fn lists(&self) -> MutexGuard<'_, FreeLists<(DType, usize), DeviceSlice>> {
        // Every update leaves the lists consistent: a panic while they were held changes nothing.
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn out_of_memory(e: &GpuError) -> bool {
    matches!(
        e,
        GpuError::Driver(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY))
    )
}

impl CudaBackend {
    /// A buffer of `len` `T`s (at least one) whose values are unspecified (all bits set, NaN,
    /// when [`crate::buffers::set_poison`] is on): for an output the operation writes
    /// entirely. From the cache when it holds one of that length; it goes back there only as
    /// the buffer of a tensor or a [`CudaBackend::scratch`].
    pub(crate) fn uninit<T: DeviceElem>(&self, len: usize) -> Result<CudaSlice<T>> {
        let len = len.max(1);
        let key = (T::DTYPE, len);
        let bytes = len * std::mem::size_of::<T>();
        let cached = self.cache.lists().take(key..=key, key, bytes);
        let s = match cached {
            Some((_, s)) => Ok(T::from_device_slice(s).expect("the key holds the element type")),
            None => match self.gpu.uninit::<T>(len) {
                Err(e) if out_of_memory(&e) => {
                    // Buffers of other sizes may be what the device lacks: hand them and the
                    // pool's free memory back to the driver, then try once more.
                    self.free_unused_memory()
                        .and_then(|()| Ok(self.gpu.uninit::<T>(len)?))
                }
                other => other.map_err(NnError::from),
            },
        };
        let poisoned = s.and_then(|mut s| {
            if crate::buffers::poisoning() {
                self.poison(&mut s, bytes)?;
            }
            Ok(s)
        });
        if poisoned.is_err() {
            // Never handed out: it will not come back.
            self.cache.lists().untake(key);
        }
        poisoned
    }

    /// Sets every byte of `s` (`bytes` long) to 0xFF: NaN in f32 and bf16.
    fn poison<T: DeviceElem>(&self, s: &mut CudaSlice<T>, bytes: usize) -> Result<()> {
        // A buffer from the cache comes without a driver call that would make this device's
        // context current on this thread.
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(GpuError::from)?;
        let stream = self.gpu.stream().clone();
        let (ptr, _sync) = s.device_ptr_mut(&stream);
        // SAFETY: `ptr` addresses the `bytes` bytes of `s`, which `_sync` keeps borrowed (and
        // ordered on `stream`) for the call.
        unsafe { sys::cuMemsetD8Async(ptr, 0xFF, bytes, stream.cu_stream()) }
            .result()
            .map_err(GpuError::from)?;
        Ok(())
    }

    /// A buffer for an operation's own use (a weight cast, a partial sum), from the cache and
    /// back to it when dropped.
    pub(crate) fn scratch<T: DeviceElem>(self: &Arc<Self>, len: usize) -> Result<CudaBuffer<T>> {
        Ok(CudaBuffer::new(self.clone(), self.uninit::<T>(len)?))
    }

    /// [`CudaBackend::scratch`], zeroed.
    pub(crate) fn scratch_zeroed<T: DeviceElem>(
        self: &Arc<Self>,
        len: usize,
    ) -> Result<CudaBuffer<T>> {
        Ok(CudaBuffer::new(self.clone(), self.zeros_of::<T>(len)?))
    }

    /// `v` (at least one value's room) in a buffer from the cache.
    pub(crate) fn upload<T: DeviceElem>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        let mut s = self.uninit::<T>(v.len())?;
        if !v.is_empty() {
            let mut view = s.slice_mut(0..v.len());
            self.gpu
                .stream()
                .memcpy_htod(v, &mut view)
                .map_err(GpuError::from)?;
        }
        Ok(s)
    }

    /// [`CudaBackend::upload`] into a [`CudaBackend::scratch`] buffer.
    pub(crate) fn upload_scratch<T: DeviceElem>(
        self: &Arc<Self>,
        v: &[T],
    ) -> Result<CudaBuffer<T>> {
        Ok(CudaBuffer::new(self.clone(), self.upload(v)?))
    }

    /// A zeroed buffer of `len` `T`s (at least one).
    pub(crate) fn zeros_of<T: DeviceElem>(&self, len: usize) -> Result<CudaSlice<T>> {
        let mut s = self.uninit::<T>(len)?;
        self.gpu
            .stream()
            .memset_zeros(&mut s)
            .map_err(GpuError::from)?;
        Ok(s)
    }

    /// Keeps `s` for a later [`CudaBackend::uninit`] of its length, or frees it when the cache
    /// is at its limit. Called as a tensor's buffer drops, with this device's context current.
    pub(crate) fn give_back<T: DeviceElem>(&self, s: CudaSlice<T>) {
        let (len, bytes) = (s.len(), s.len() * std::mem::size_of::<T>());
        let limit = self.cache.limit.load(Ordering::Relaxed);
        let refused =
            self.cache
                .lists()
                .give((T::DTYPE, len), T::into_device_slice(s), bytes, limit);
        drop(refused);
    }

    /// The cache's counts so far (hits: buffers reused; misses: buffers allocated) and the bytes
    /// it holds: between two steady-state training steps the misses do not move.
    pub fn buffer_stats(&self) -> BufferStats {
        let (hits, misses, cached_bytes) = self.cache.lists().counts();
        BufferStats {
            hits,
            misses,
            cached_bytes,
            limit_bytes: self.cache.limit.load(Ordering::Relaxed),
        }
    }

    /// Frees every cached buffer of this device (to its memory pool; [`CudaBackend::trim_pool`]
    /// hands the pool's back to the driver).
    pub fn release_buffers(&self) -> Result<()> {
        self.trim_cache(0)
    }

    /// Caps the bytes this device's cache holds, freeing what is over; `0` turns it off.
    /// Unlimited by default: a step's buffers fit the device, and an allocation that does not
    /// fit frees the cache first.
    pub fn set_buffer_limit(&self, bytes: usize) -> Result<()> {
        self.cache.limit.store(bytes, Ordering::Relaxed);
        self.trim_cache(bytes)
    }

    /// Frees cached buffers until at most `bytes` are held, in this device's context.
    fn trim_cache(&self, bytes: usize) -> Result<()> {
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(GpuError::from)?;
        let freed = self.cache.lists().trim_to(bytes);
        drop(freed);
        Ok(())
    }

    /// Ends a step for this device's cache (see [`crate::buffers::end_step`]).
    pub(crate) fn end_step(&self) {
        // The freed buffers must be released in this device's context. Binding it also reports
        // (and clears) an error an earlier asynchronous free recorded: it is logged rather than
        // lost, and the buffers are kept for the next step.
        if let Err(e) = self.gpu.context().bind_to_thread() {
            tracing::warn!(
                "cuda:{}: a step end found a device error: {e}",
                self.ordinal
            );
            return;
        }
        let freed = self.cache.lists().end_step();
        drop(freed);
    }
}

/// [`crate::buffers::end_step`] on every GPU opened so far.
pub(crate) fn end_step_all() {
    let Some(map) = BACKENDS.get() else {
        return;
    };
    let backends: Vec<_> = map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for b in backends {
        b.end_step();
    }
}

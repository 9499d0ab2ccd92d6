//! A small cache of large buffers, reused from one call to the next.
//!
//! A training loop calls the loss with the same shapes every step. Freshly allocated large
//! buffers come from the kernel as untouched pages, and the first write to each page faults:
//! measured here (a VM), the faults of the NT-Xent kernel's `O(M d)` buffers cost 10-15% of the
//! whole forward and backward pass at M = 4096. Keeping a few buffers between calls trades a
//! bounded amount of memory (at most [`KEEP`] buffers per element type, only those smaller
//! than [`MAX_BYTES`]) for those faults. [`release_cached_buffers`] frees them.

use std::sync::Mutex;

/// Buffers kept per element type.
const KEEP: usize = 6;
/// Buffers larger than this (1 GiB) are freed rather than kept.
const MAX_BYTES: usize = 1 << 30;

pub(crate) struct Pool<T> {
    bufs: Mutex<Vec<Vec<T>>>,
}

impl<T: Copy> Pool<T> {
    pub(crate) const fn new() -> Self {
        Self {
            bufs: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<T>>> {
        // A panic elsewhere while the lock was held cannot leave the list inconsistent.
        self.bufs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` elements. Their values are unspecified (`fill` or left over from an
    /// earlier use): callers overwrite every element they read.
    pub(crate) fn take(&self, len: usize, fill: T) -> Vec<T> {
        let reused = {
            let mut bufs = self.lock();
            // The smallest buffer that is large enough, so large ones stay for large requests.
            let best = bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| bufs.swap_remove(i))
        };
        match reused {
            Some(mut v) => {
                v.truncate(len);
                v.resize(len, fill);
                v
            }
            None => vec![fill; len],
        }
    }

    /// Returns a buffer for later calls.
    pub(crate) fn give(&self, v: Vec<T>) {
        if v.capacity() == 0 || v.capacity() * std::mem::size_of::<T>() > MAX_BYTES {
            return;
        }
        let mut bufs = self.lock();
        bufs.push(v);
        if bufs.len() > KEEP {
            // Drop the smallest: the large ones are the expensive ones to fault in again.
            if let Some(i) = bufs
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
            {
                bufs.swap_remove(i);
            }
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

pub(crate) static F32: Pool<f32> = Pool::new();
pub(crate) static PANEL_MR: Pool<[f32; super::microkernel::MR]> = Pool::new();
pub(crate) static PANEL_NR: Pool<super::microkernel::Row16> = Pool::new();

/// An `f32` buffer whose first element sits on a 64-byte boundary (a cache line), so that the
/// kernels' 32-byte vector accesses at multiples of 16 floats never straddle two lines. Taken
/// from the pool, zeroed, and given back when dropped.
pub(crate) struct AlignedF32 {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedF32 {
    /// Slack for moving the start to a cache line: at most 15 floats.
    const SLACK: usize = 64 / std::mem::size_of::<f32>() - 1;

    pub(crate) fn zeroed(len: usize) -> Self {
        let mut buf = F32.take(len + Self::SLACK, 0.0);
        // `align_offset` cannot fail for `f32` pointers (4-byte aligned); `min` keeps any
        // answer in bounds regardless.
        let off = buf.as_ptr().align_offset(64).min(Self::SLACK);
        buf[off..off + len].fill(0.0);
        Self { buf, off, len }
    }
}

impl std::ops::Deref for AlignedF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for AlignedF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

impl Drop for AlignedF32 {
    fn drop(&mut self) {
        F32.give(std::mem::take(&mut self.buf));
    }
}

/// Frees the buffers the CPU kernels keep between calls to avoid page faults (a few buffers of
/// `O(rows * dim)` floats, the sizes of the largest recent calls).
pub fn release_cached_buffers() {
    F32.clear();
    PANEL_MR.clear();
    PANEL_NR.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let pool: Pool<f32> = Pool::new();
        let a = pool.take(1000, 0.0);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(500, 1.0);
        assert_eq!(b.as_ptr(), ptr, "reused");
        assert_eq!(b.len(), 500);
        pool.give(b);
        for n in 0..10 {
            pool.give(vec![0.0; 10 + n]);
        }
        assert!(pool.lock().len() <= KEEP);
        assert!(
            pool.lock().iter().any(|b| b.capacity() >= 1000),
            "the large one is kept"
        );
        pool.clear();
        assert!(pool.lock().is_empty());
    }

    #[test]
    fn aligned_buffers() {
        for len in [0, 1, 17, 1000] {
            let mut a = AlignedF32::zeroed(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert!(a.iter().all(|&v| v == 0.0));
            a.iter_mut().for_each(|v| *v = 1.0);
        }
    }
}

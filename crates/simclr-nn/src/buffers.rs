//! Host memory for tensor values, kept from one training step for the next.
//!
//! A training step allocates the same buffers every time: one per activation, one per
//! gradient. Large allocations come from the kernel as fresh pages (glibc maps anything over
//! 32 MiB, and smaller blocks too until its threshold adapts), and the first write to each page
//! faults and zero-fills it. Measured on this project's 2-core CI machine, those faults cost
//! 10-15% of a ResNet-18 CIFAR step at batch 128. So the values of CPU tensors live in
//! [`HostBuffer`]s, which go back to a cache when the last tensor holding them drops, and the
//! next request of about the same size takes them from there: after the first step, a step
//! takes no new memory (see [`stats`]).
//!
//! Memory held: the cache keeps buffers of the sizes the last step used ([`end_step`], which
//! the training steps call, frees the others), never more than [`limit_bytes`] in all, and
//! [`release`] frees everything. Buffers under 128 KiB go straight back to the allocator, whose
//! own free lists serve them without faults.
//!
//! A buffer taken with [`HostBuffer::uninit`] holds whatever its last user left there: the
//! operations that take one write every value before anything reads it. [`set_poison`] (or
//! `SIMCLR_POISON_BUFFERS=1`, which CI sets) fills such buffers with NaN instead, so a test shows
//! any value read before it was written.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Buffers shorter than this (128 KiB of f32) are left to the allocator.
const MIN_LEN: usize = 32 * 1024;

/// A request of `len` values takes a cached buffer of up to `len + len / SLACK` values, so that
/// sizes that differ a little (the last, smaller batch of an epoch) share buffers.
const SLACK: usize = 8;

/// Values of a CPU tensor: a `Vec<f32>` that goes back to the cache when dropped.
#[derive(Default)]
pub struct HostBuffer {
    v: Vec<f32>,
}

impl HostBuffer {
    /// `len` values, unspecified (left over from an earlier use, or NaN when poisoning): the
    /// caller writes every one before reading it.
    pub fn uninit(len: usize) -> HostBuffer {
        let fill = if poisoning() { f32::NAN } else { 0.0 };
        let mut v = take(len, fill);
        if fill.is_nan() {
            v.fill(f32::NAN);
        }
        HostBuffer { v }
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> HostBuffer {
        Self::filled(len, 0.0)
    }

    /// `len` copies of `value`.
    pub fn filled(len: usize, value: f32) -> HostBuffer {
        let mut v = take(len, value);
        v.fill(value);
        HostBuffer { v }
    }

    /// Takes `v` over; it goes to the cache when dropped like any other buffer.
    pub fn from_vec(v: Vec<f32>) -> HostBuffer {
        HostBuffer { v }
    }

    /// The values as a `Vec`, which leaves the cache's care.
    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.v)
    }
}

impl Clone for HostBuffer {
    fn clone(&self) -> HostBuffer {
        let mut v = take(self.v.len(), 0.0);
        v.copy_from_slice(&self.v);
        HostBuffer { v }
    }
}

impl std::ops::Deref for HostBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v
    }
}

impl std::ops::DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.v));
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBuffer({} values)", self.v.len())
    }
}

/// What the cache has done since the process started (counts), and what it holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BufferStats {
    /// Requests of cached size (128 KiB or more) served from the cache.
    pub hits: u64,
    /// Requests of cached size that found nothing to reuse and allocated.
    pub misses: u64,
    /// Bytes the cache holds now, in buffers no tensor uses.
    pub cached_bytes: usize,
    /// Most bytes it will hold ([`set_limit`]).
    pub limit_bytes: usize,
}

struct Cache {
    /// Free buffers by capacity, each list with the step that last used that capacity.
    free: BTreeMap<usize, (Vec<Vec<f32>>, u64)>,
    bytes: usize,
    limit: Option<usize>,
    step: u64,
    hits: u64,
    misses: u64,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    free: BTreeMap::new(),
    bytes: 0,
    limit: None,
    step: 0,
    hits: 0,
    misses: 0,
});

/// Whether [`set_poison`] has been called, and with what.
static POISON_SET: AtomicBool = AtomicBool::new(false);
static POISON: AtomicBool = AtomicBool::new(false);

/// Whether [`HostBuffer::uninit`] fills with NaN: as last [`set_poison`], else as
/// `SIMCLR_POISON_BUFFERS` says (`1` on, `0` off), else in debug builds only.
fn poisoning() -> bool {
    if POISON_SET.load(Ordering::Acquire) {
        return POISON.load(Ordering::Relaxed);
    }
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    *FROM_ENV.get_or_init(|| match std::env::var("SIMCLR_POISON_BUFFERS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => cfg!(debug_assertions),
    })
}

fn cache() -> MutexGuard<'static, Cache> {
    // Every update leaves the cache consistent, so a panic while it was held changes nothing.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Half the machine's memory where Linux says how much that is, else 8 GiB.
fn default_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        });
        match total_kib {
            Some(kib) => kib.saturating_mul(1024) / 2,
            None => 8 << 30,
        }
    })
}

impl Cache {
    fn limit(&self) -> usize {
        self.limit.unwrap_or_else(default_limit)
    }

    fn remove_list(&mut self, cap: usize) {
        if let Some((list, _)) = self.free.remove(&cap) {
            self.bytes -= list.len() * cap * 4;
        }
    }
}

/// A vector of `len` values; those beyond what a reused buffer held before are `fill`, the
/// others unspecified.
fn take(len: usize, fill: f32) -> Vec<f32> {
    if len < MIN_LEN {
        return vec![fill; len];
    }
    let reused = {
        let mut c = cache();
        let step = c.step;
        let found = c
            .free
            .range_mut(len..=len + len / SLACK)
            .find_map(|(&cap, (list, used))| {
                let v = list.pop()?;
                *used = step;
                Some((cap, v))
            });
        match found {
            Some((cap, v)) => {
                c.bytes -= cap * 4;
                c.hits += 1;
                Some(v)
            }
            None => {
                c.misses += 1;
                None
            }
        }
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

/// Keeps `v` for a later [`take`], unless it is small or the cache is full.
fn give(v: Vec<f32>) {
    let cap = v.capacity();
    if cap < MIN_LEN {
        return;
    }
    let mut c = cache();
    if c.bytes + cap * 4 > c.limit() {
        return;
    }
    let step = c.step;
    let (list, used) = c.free.entry(cap).or_default();
    list.push(v);
    *used = step;
    c.bytes += cap * 4;
}

/// Ends a training step: frees the cached buffers of sizes this step neither took nor gave
/// back, so that memory follows the current shapes (after an evaluation at another batch
/// size, say). The training steps of this crate call it.
pub fn end_step() {
    let mut c = cache();
    let step = c.step;
    let stale: Vec<usize> = c
        .free
        .iter()
        .filter(|(_, (_, used))| *used < step)
        .map(|(&cap, _)| cap)
        .collect();
    for cap in stale {
        c.remove_list(cap);
    }
    c.step += 1;
}

/// Frees every cached buffer (tensors in use keep theirs).
pub fn release() {
    let mut c = cache();
    c.free.clear();
    c.bytes = 0;
}

/// Caps the bytes the cache holds, freeing what is over; `0` turns caching off. The default is
/// half the machine's memory (8 GiB where it cannot be read).
pub fn set_limit(bytes: usize) {
    let mut c = cache();
    c.limit = Some(bytes);
    // Larger buffers first: fewer frees for the same memory.
    while c.bytes > bytes {
        let Some((&cap, _)) = c.free.iter().next_back() else {
            break;
        };
        let emptied = {
            let (list, _) = c.free.get_mut(&cap).expect("listed above");
            list.pop();
            list.is_empty()
        };
        c.bytes -= cap * 4;
        if emptied {
            c.free.remove(&cap);
        }
    }
}

/// The cache's byte limit now.
pub fn limit_bytes() -> usize {
    cache().limit()
}

/// The counts so far and the bytes held.
pub fn stats() -> BufferStats {
    let c = cache();
    BufferStats {
        hits: c.hits,
        misses: c.misses,
        cached_bytes: c.bytes,
        limit_bytes: c.limit(),
    }
}

/// Fills every buffer taken with [`HostBuffer::uninit`] with NaN (`true`) rather than leaving
/// what was there, so a test shows a value read before it is written. Costs a pass over each
/// buffer. Without a call, the environment variable `SIMCLR_POISON_BUFFERS` decides (`1` on,
/// `0` off), and without it debug builds poison and release builds do not.
pub fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed);
    POISON_SET.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    //! The cache is one per process and other tests use it at the same time: these check
    //! only what does not depend on the cache's contents. `tests/buffers.rs` checks the rest.

    use super::*;

    #[test]
    fn poisoned_buffers_are_nan_and_zeroed_ones_zero() {
        set_poison(true);
        let len = MIN_LEN + 5;
        let mut a = HostBuffer::uninit(len);
        assert!(a.iter().all(|v| v.is_nan()));
        a.fill(1.0);
        drop(a);
        assert!(HostBuffer::uninit(len).iter().all(|v| v.is_nan()));
        assert!(HostBuffer::zeroed(len).iter().all(|&v| v == 0.0));
        // Small buffers too.
        assert!(HostBuffer::uninit(3).iter().all(|v| v.is_nan()));
    }

    #[test]
    fn clones_copy_and_small_buffers_bypass_the_cache() {
        let a = HostBuffer::from_vec((0..MIN_LEN + 3).map(|i| i as f32).collect());
        let b = a.clone();
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(&a[..], &b[..]);
        let v = b.into_vec();
        assert_eq!(v.len(), MIN_LEN + 3);
        assert_eq!(HostBuffer::zeroed(0).len(), 0);
    }
}

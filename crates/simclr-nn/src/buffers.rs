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
//! Memory held: the cache takes back only buffers it handed out, so it never holds more of a
//! size than were in use at once; it keeps, of each size, as many buffers as the last step
//! freed ([`end_step`], which the training steps call, frees the others); never more than
//! [`limit_bytes`] in all; and [`release`] frees everything. Buffers under 128 KiB go straight
//! back to the allocator, whose own free lists serve them without faults.
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
        let mut v = take(len, 0.0);
        if poisoning() {
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

    /// Takes `v` over. Allocated elsewhere, it is freed when dropped: the cache takes back only
    /// buffers it handed out.
    pub fn from_vec(v: Vec<f32>) -> HostBuffer {
        HostBuffer { v }
    }

    /// The values as a `Vec`, which leaves the cache's care.
    pub fn into_vec(mut self) -> Vec<f32> {
        let v = std::mem::take(&mut self.v);
        if v.capacity() >= MIN_LEN {
            cache().free.untake(v.capacity());
        }
        v
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
    /// Requests served from the cache (on the host, of those of 128 KiB or more).
    pub hits: u64,
    /// Requests that found nothing to reuse and allocated.
    pub misses: u64,
    /// Bytes the cache holds now, in buffers no tensor uses.
    pub cached_bytes: usize,
    /// Most bytes it will hold ([`set_limit`]).
    pub limit_bytes: usize,
}

/// Free buffers by a key (a size): the core of the host cache here and of each GPU's
/// (`crate::cuda`). Buffers it lets go are returned to the caller, to be dropped after the lock
/// is released.
///
/// A key accepts only as many buffers as were taken under it and not yet given back, so the
/// cache never holds more of a size than the most that were in use at once: a buffer allocated
/// elsewhere (a data loader's batch) and given back every step does not pile up, with or
/// without step ends. A taken buffer counts under the key it was taken as (a miss: the key the
/// caller allocates, given to [`FreeLists::take`]); [`FreeLists::untake`] undoes the count of
/// a buffer that never came back (its allocation failed, or it left the cache's care).
///
/// At the end of a step a list keeps at most as many buffers as the step gave back to it: what
/// the step freed is what the next one needs after a change of shapes.
pub(crate) struct FreeLists<K, B> {
    lists: BTreeMap<K, FreeList<B>>,
    bytes: usize,
    hits: u64,
    misses: u64,
}

struct FreeList<B> {
    bufs: Vec<B>,
    bytes_each: usize,
    /// Buffers given back since the last end of a step.
    given: usize,
    /// Buffers taken under this key and not given back yet.
    out: usize,
}

impl<K: Ord + Copy, B> FreeLists<K, B> {
    pub(crate) const fn new() -> Self {
        FreeLists {
            lists: BTreeMap::new(),
            bytes: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// A buffer of the smallest key in `keys`, counted as a hit; or a miss, and the caller
    /// allocates a buffer of key `miss` (`bytes` bytes), which counts as taken.
    pub(crate) fn take(
        &mut self,
        keys: std::ops::RangeInclusive<K>,
        miss: K,
        bytes: usize,
    ) -> Option<(K, B)> {
        let found = self.lists.range_mut(keys).find_map(|(&k, list)| {
            let b = list.bufs.pop()?;
            list.out += 1;
            Some((k, b, list.bytes_each))
        });
        match found {
            Some((k, b, bytes)) => {
                self.bytes -= bytes;
                self.hits += 1;
                Some((k, b))
            }
            None => {
                self.misses += 1;
                self.list(miss, bytes).out += 1;
                None
            }
        }
    }

    /// Forgets a buffer taken under `key` that will not be given back.
    pub(crate) fn untake(&mut self, key: K) {
        if let Some(list) = self.lists.get_mut(&key) {
            list.out = list.out.saturating_sub(1);
            if list.out == 0 && list.bufs.is_empty() {
                self.lists.remove(&key);
            }
        }
    }

    fn list(&mut self, key: K, bytes: usize) -> &mut FreeList<B> {
        self.lists.entry(key).or_insert_with(|| FreeList {
            bufs: Vec::new(),
            bytes_each: bytes,
            given: 0,
            out: 0,
        })
    }

    /// Keeps `b` (of `bytes` bytes) under `key`, or hands it back: when no buffer taken under
    /// `key` is out (`b` was allocated elsewhere), or when it would take the cache over `limit`
    /// bytes.
    pub(crate) fn give(&mut self, key: K, b: B, bytes: usize, limit: usize) -> Option<B> {
        let over = self.bytes.saturating_add(bytes) > limit;
        let Some(list) = self.lists.get_mut(&key).filter(|l| l.out > 0) else {
            return Some(b);
        };
        list.out -= 1;
        if over {
            return Some(b);
        }
        list.bufs.push(b);
        list.given += 1;
        self.bytes += bytes;
        None
    }

    /// Ends a step: each list keeps at most as many buffers as the step gave back to it (none
    /// for a size the step did not free) and lets go of the rest.
    pub(crate) fn end_step(&mut self) -> Vec<B> {
        let mut out = Vec::new();
        for list in self.lists.values_mut() {
            let extra = list.bufs.len().saturating_sub(list.given);
            self.bytes -= extra * list.bytes_each;
            out.extend(list.bufs.drain(..extra));
            list.given = 0;
        }
        self.lists.retain(|_, l| !l.bufs.is_empty() || l.out > 0);
        out
    }

    /// Lets go of buffers, the last keys first (the largest, on the host), until at most
    /// `bytes` are held.
    pub(crate) fn trim_to(&mut self, bytes: usize) -> Vec<B> {
        let mut out = Vec::new();
        for list in self.lists.values_mut().rev() {
            if self.bytes <= bytes {
                break;
            }
            while self.bytes > bytes {
                let Some(b) = list.bufs.pop() else { break };
                self.bytes -= list.bytes_each;
                out.push(b);
            }
        }
        self.lists.retain(|_, l| !l.bufs.is_empty() || l.out > 0);
        out
    }

    /// Hits and misses so far, and the bytes held.
    pub(crate) fn counts(&self) -> (u64, u64, usize) {
        (self.hits, self.misses, self.bytes)
    }
}

struct Cache {
    free: FreeLists<usize, Vec<f32>>,
    limit: Option<usize>,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    free: FreeLists::new(),
    limit: None,
});

/// Whether [`set_poison`] has been called, and with what.
static POISON_SET: AtomicBool = AtomicBool::new(false);
static POISON: AtomicBool = AtomicBool::new(false);

/// Whether [`HostBuffer::uninit`] fills with NaN: as last [`set_poison`], else as
/// `SIMCLR_POISON_BUFFERS` says (`1` on, `0` off), else in debug builds only.
pub(crate) fn poisoning() -> bool {
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

/// Half the memory this process may use: the machine's, or its container's limit when lower
/// (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`); 8 GiB where Linux does not say.
fn default_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let total = read("/proc/meminfo").and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
                .map(|kib| kib.saturating_mul(1024))
        });
        // "max" (no limit) and v1's huge sentinel both leave the machine's figure in charge.
        let container = [
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ]
        .iter()
        .filter_map(|p| read(p)?.trim().parse::<usize>().ok())
        .min();
        match (total, container) {
            (Some(t), Some(c)) => t.min(c) / 2,
            (Some(m), None) | (None, Some(m)) => m / 2,
            (None, None) => 8 << 30,
        }
    })
}

impl Cache {
    fn limit(&self) -> usize {
        self.limit.unwrap_or_else(default_limit)
    }
}

/// A vector of `len` values; those beyond what a reused buffer held before are `fill`, the
/// others unspecified.
fn take(len: usize, fill: f32) -> Vec<f32> {
    if len < MIN_LEN {
        return vec![fill; len];
    }
    let reused = cache().free.take(len..=len + len / SLACK, len, len * 4);
    match reused {
        Some((_, mut v)) => {
            v.truncate(len);
            v.resize(len, fill);
            v
        }
        None => vec![fill; len],
    }
}

/// Keeps `v` for a later [`take`], unless it is small, was not handed out by the cache, or the
/// cache is full.
fn give(v: Vec<f32>) {
    let cap = v.capacity();
    if cap < MIN_LEN {
        return;
    }
    let refused = {
        let mut c = cache();
        let limit = c.limit();
        c.free.give(cap, v, cap * 4, limit)
    };
    drop(refused);
}

/// Ends a training step, here and on every GPU in use: the cache keeps, of each size, at most
/// as many buffers as the step freed, so that memory follows the current shapes (after an
/// evaluation at another batch size, say). The training steps of this crate call it.
pub fn end_step() {
    end_host_step();
    crate::cuda::end_step_all();
}

/// [`end_step`] for the host cache only.
pub(crate) fn end_host_step() {
    let freed = cache().free.end_step();
    drop(freed);
}

/// Frees every cached host buffer (tensors in use keep theirs).
pub fn release() {
    let freed = cache().free.trim_to(0);
    drop(freed);
}

/// Caps the bytes the host cache holds, freeing what is over; `0` turns caching off. The
/// default is half the memory the process may use (the machine's, or its container's limit
/// when lower; 8 GiB where neither can be read).
pub fn set_limit(bytes: usize) {
    let freed = {
        let mut c = cache();
        c.limit = Some(bytes);
        c.free.trim_to(bytes)
    };
    drop(freed);
}

/// The host cache's byte limit now.
pub fn limit_bytes() -> usize {
    cache().limit()
}

/// The host cache's counts so far and the bytes it holds.
pub fn stats() -> BufferStats {
    let c = cache();
    let (hits, misses, cached_bytes) = c.free.counts();
    BufferStats {
        hits,
        misses,
        cached_bytes,
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
    fn free_lists_serve_the_smallest_fitting_key_and_take_back_only_their_own() {
        const MAX: usize = usize::MAX;
        let mut f: FreeLists<usize, &str> = FreeLists::new();
        assert!(f.take(10..=12, 12, 48).is_none());
        assert!(f.take(10..=12, 11, 44).is_none());
        assert!(f.take(20..=20, 20, 80).is_none());
        assert_eq!(f.give(12, "a", 48, MAX), None);
        assert_eq!(f.give(11, "b", 44, MAX), None);
        assert_eq!(f.give(20, "c", 80, MAX), None);
        // More than was taken under a key: allocated elsewhere, handed back to be freed.
        assert_eq!(f.give(11, "x", 44, MAX), Some("x"));
        assert_eq!(f.give(13, "y", 52, MAX), Some("y"));
        assert_eq!(f.counts(), (0, 3, 172));
        assert_eq!(f.take(10..=12, 10, 40), Some((11, "b")));
        assert_eq!(f.take(10..=12, 10, 40), Some((12, "a")));
        assert_eq!(f.take(10..=12, 10, 40), None);
        assert_eq!(f.counts(), (2, 4, 80));
        // Over the limit, the buffer comes back to be freed.
        assert_eq!(f.give(12, "a", 48, 100), Some("a"));
        assert_eq!(f.trim_to(0), vec!["c"]);
        assert_eq!(f.counts().2, 0);
        // A buffer taken and never given back (its allocation failed): forgotten.
        assert!(f.take(30..=30, 30, 120).is_none());
        f.untake(30);
        assert_eq!(f.give(30, "z", 120, MAX), Some("z"));
    }

    #[test]
    fn a_step_end_keeps_what_the_step_gave_back() {
        const MAX: usize = usize::MAX;
        let mut f: FreeLists<usize, u32> = FreeLists::new();
        // Step 1 allocates and frees three buffers of one size and one of another.
        for _ in 0..3 {
            assert!(f.take(100..=100, 100, 400).is_none());
        }
        assert!(f.take(7..=7, 7, 28).is_none());
        for b in [1, 2, 3] {
            assert_eq!(f.give(100, b, 400, MAX), None);
        }
        assert_eq!(f.give(7, 9, 28, MAX), None);
        assert!(f.end_step().is_empty());
        // Step 2 takes and frees two of the first size, and none of the second.
        for _ in 0..2 {
            let (k, b) = f.take(100..=100, 100, 400).unwrap();
            assert_eq!(f.give(k, b, 400, MAX), None);
        }
        let mut freed = f.end_step();
        freed.sort();
        assert_eq!(freed, vec![1, 9], "one spare of size 100 and all of size 7");
        assert_eq!(f.counts().2, 800);
        // A buffer allocated elsewhere and given back every step does not pile up.
        for step in 0..5 {
            assert_eq!(f.give(55, 100 + step, 220, MAX), Some(100 + step));
            f.end_step();
        }
        // And the size-100 buffers, unused by these steps, went at the first end.
        assert_eq!(f.counts().2, 0);
    }

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
    fn clones_are_independent_copies() {
        let a = HostBuffer::from_vec((0..MIN_LEN + 3).map(|i| i as f32).collect());
        let mut b = a.clone();
        assert_eq!(&a[..], &b[..]);
        b[0] = -1.0;
        assert_eq!(a[0], 0.0);
        let v = b.into_vec();
        assert_eq!((v.len(), v[0]), (MIN_LEN + 3, -1.0));
        assert_eq!(HostBuffer::zeroed(0).len(), 0);
    }
}

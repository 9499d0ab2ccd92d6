//! [`ThreadComm`]: replicas as threads of one process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{CommError, Communicator};

#[derive(Debug)]
struct State {
    /// Collectives completed so far.
    generation: u64,
    /// This round's blobs, by rank.
    slots: Vec<Option<Vec<u8>>>,
    /// The last completed round's blobs (a rank cannot be two rounds ahead of another: the next
    /// round needs every rank, so this is still the round a late reader waits for).
    last: Arc<Vec<Vec<u8>>>,
    /// Ranks whose handle was dropped (their thread ended or panicked).
    left: Vec<bool>,
}

#[derive(Debug)]
struct Hub {
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
    /// The hubs of this group's duplicates, the `k`-th duplicate at index `k` (made by the
    /// first rank to ask for it).
    dups: Mutex<Vec<Arc<Hub>>>,
}

impl Hub {
    fn new(world: usize, timeout: Duration) -> Hub {
        Hub {
            state: Mutex::new(State {
                generation: 0,
                slots: vec![None; world],
                last: Arc::new(Vec::new()),
                left: vec![false; world],
            }),
            cv: Condvar::new(),
            timeout,
            dups: Mutex::new(Vec::new()),
        }
    }
}

/// One rank of a group of threads. Made by [`ThreadComm::group`]; move each handle into its
/// thread. Dropping a handle (its thread returned or panicked) makes the other ranks' collectives
/// fail with [`CommError::RankLost`].
#[derive(Debug)]
pub struct ThreadComm {
    rank: usize,
    world: usize,
    hub: Arc<Hub>,
    /// How many duplicates this handle has made.
    dups_made: AtomicUsize,
}

impl ThreadComm {
    /// `world` connected handles, rank `i` at index `i`; collectives wait at most `timeout` for
    /// the other ranks.
    pub fn group(world: usize, timeout: Duration) -> Vec<ThreadComm> {
        let hub = Arc::new(Hub::new(world, timeout));
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                world,
                hub: hub.clone(),
                dups_made: AtomicUsize::new(0),
            })
            .collect()
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather_bytes(&self, blob: &[u8], op: &str) -> Result<Vec<Vec<u8>>, CommError> {
        let hub = &*self.hub;
        let mut st = hub.state.lock().unwrap_or_else(|e| e.into_inner());
        let lost = |st: &State| {
            st.left
                .iter()
                .position(|&l| l)
                .map(|rank| CommError::RankLost {
                    rank,
                    world: self.world,
                    op: op.into(),
                    why: "its thread ended".into(),
                })
        };
        if let Some(e) = lost(&st) {
            return Err(e);
        }
        let gen = st.generation;
        st.slots[self.rank] = Some(blob.to_vec());
        if st.slots.iter().all(Option::is_some) {
            let blobs: Vec<Vec<u8>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            st.last = Arc::new(blobs);
            st.generation += 1;
            hub.cv.notify_all();
            return Ok(st.last.as_ref().clone());
        }
        let deadline = Instant::now() + hub.timeout;
        loop {
            if st.generation > gen {
                return Ok(st.last.as_ref().clone());
            }
            if let Some(e) = lost(&st) {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let rank = st.slots.iter().position(Option::is_none).unwrap_or(0);
                return Err(CommError::Timeout {
                    rank,
                    world: self.world,
                    op: op.into(),
                    timeout: hub.timeout,
                });
            }
            st = hub
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// A new hub for the same threads; the ranks check that they make the same duplicate.
    fn duplicate(&self) -> Result<Arc<dyn Communicator>, CommError> {
        let op = "duplicate";
        let k = self.dups_made.fetch_add(1, Ordering::Relaxed);
        let parts = self.all_gather_bytes(&(k as u64).to_le_bytes(), op)?;
        if let Some(r) = parts.iter().position(|p| p[..] != (k as u64).to_le_bytes()) {
            return Err(CommError::Mismatch {
                op: op.into(),
                msg: format!("rank {r} is making another duplicate than this rank's number {k}"),
            });
        }
        let hub = {
            let mut dups = self.hub.dups.lock().unwrap_or_else(|e| e.into_inner());
            while dups.len() <= k {
                dups.push(Arc::new(Hub::new(self.world, self.hub.timeout)));
            }
            dups[k].clone()
        };
        Ok(Arc::new(ThreadComm {
            rank: self.rank,
            world: self.world,
            hub,
            dups_made: AtomicUsize::new(0),
        }))
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let mut st = self.hub.state.lock().unwrap_or_else(|e| e.into_inner());
        st.left[self.rank] = true;
        self.hub.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        let comms = ThreadComm::group(3, Duration::from_secs(10));
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut v = vec![c.rank() as f32, 1.0, 0.1];
                        for _ in 0..5 {
                            c.all_reduce_f32(&mut v).unwrap();
                        }
                        let mut g = vec![0.0; 6];
                        c.all_gather_f32(&[c.rank() as f32, 10.0], &mut g).unwrap();
                        v.extend(g);
                        v
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(out[0], out[1]);
        assert_eq!(out[0], out[2]);
        assert_eq!(out[0][..2], [3.0 * 81.0, 243.0]);
        assert_eq!(out[0][3..], [0.0, 10.0, 1.0, 10.0, 2.0, 10.0]);
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_quickly() {
        let mut comms = ThreadComm::group(2, Duration::from_secs(30));
        let c1 = comms.pop().unwrap();
        let c0 = comms.pop().unwrap();
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            let mut v = [1.0f32];
            c1.all_reduce_f32(&mut v).unwrap();
            // ... and the thread ends: c1 is dropped.
        });
        let mut v = [1.0f32];
        c0.all_reduce_f32(&mut v).unwrap();
        h.join().unwrap();
        let e = c0.all_reduce_f32(&mut v).unwrap_err();
        assert!(matches!(e, CommError::RankLost { rank: 1, .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_duplicate_runs_its_collectives_beside_the_original() {
        let comms = ThreadComm::group(2, Duration::from_secs(10));
        let out: Vec<(f32, f32)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let dup = c.duplicate().unwrap();
                        assert_eq!((dup.rank(), dup.world_size()), (c.rank(), 2));
                        // The duplicate's collective runs on another thread while the original
                        // does its own: neither sees the other's data.
                        let r = c.rank() as f32;
                        let side = std::thread::scope(|s2| {
                            let h = s2.spawn(|| {
                                let mut v = [100.0 + r];
                                dup.all_reduce_f32(&mut v).unwrap();
                                v[0]
                            });
                            let mut v = [r];
                            c.all_reduce_f32(&mut v).unwrap();
                            (v[0], h.join().unwrap())
                        });
                        side
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(out, vec![(1.0, 201.0), (1.0, 201.0)]);
    }

    #[test]
    fn a_rank_that_never_comes_times_out() {
        let comms = ThreadComm::group(2, Duration::from_millis(200));
        let mut v = [1.0f32];
        let e = comms[0].all_reduce_f32(&mut v).unwrap_err();
        assert!(matches!(e, CommError::Timeout { rank: 1, .. }), "{e}");
        assert!(e.to_string().contains("rank 1 of 2"), "{e}");
    }
}

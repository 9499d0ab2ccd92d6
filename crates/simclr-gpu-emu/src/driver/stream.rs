//! Streams and events: each stream is a host thread that runs its queued operations in order,
//! so work is asynchronous with respect to the caller as on a GPU, and a missing
//! synchronisation can show.
//!
//! The null stream has the legacy semantics of the CUDA Driver API ("Stream synchronization
//! behavior"): work on it waits for all earlier work on the context's blocking streams, and
//! work on a blocking stream waits for earlier work on the null stream. Streams created with
//! `CU_STREAM_NON_BLOCKING` do neither.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

use super::context::Context;
use super::result::*;

/// A queued operation.
pub type Op = Box<dyn FnOnce() -> Result<(), (CuResult, String)> + Send>;

struct Queue {
    ops: VecDeque<Op>,
    enqueued: u64,
    completed: u64,
    worker: bool,
    closed: bool,
}

/// One stream of a context.
pub struct Stream {
    /// The context the stream belongs to.
    pub ctx: Arc<Context>,
    /// Whether the stream synchronises with the null stream (created without
    /// `CU_STREAM_NON_BLOCKING`, or the null stream itself).
    pub blocking: bool,
    /// Whether this is the context's null stream.
    pub null: bool,
    /// The priority it was created with.
    pub priority: i32,
    queue: Mutex<Queue>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stream {
    /// A new stream of `ctx` (its worker thread starts with the first operation).
    pub fn new(ctx: Arc<Context>, blocking: bool, null: bool, priority: i32) -> Arc<Stream> {
        Arc::new(Stream {
            ctx,
            blocking,
            null,
            priority,
            queue: Mutex::new(Queue {
                ops: VecDeque::new(),
                enqueued: 0,
                completed: 0,
                worker: false,
                closed: false,
            }),
            cv: Condvar::new(),
        })
    }

    /// Queues `op` after everything queued so far (and, for the legacy null-stream semantics,
    /// after what it must wait for); returns its sequence number.
    pub fn enqueue(self: &Arc<Self>, op: Op) -> u64 {
        let deps = self.implicit_dependencies();
        let op: Op = if deps.is_empty() {
            op
        } else {
            Box::new(move || {
                for (s, seq) in deps {
                    s.wait_for(seq);
                }
                op()
            })
        };
        let mut q = lock(&self.queue);
        q.enqueued += 1;
        let seq = q.enqueued;
        q.ops.push_back(op);
        if !q.worker {
            q.worker = true;
            let me = Arc::downgrade(self);
            std::thread::Builder::new()
                .name("gpu-emu-stream".into())
                .spawn(move || worker(me))
                .expect("simclr-gpu-emu: cannot start a stream thread");
        }
        self.cv.notify_all();
        seq
    }

    fn implicit_dependencies(self: &Arc<Self>) -> Vec<(Arc<Stream>, u64)> {
        if !self.blocking {
            return Vec::new();
        }
        let others = if self.null {
            self.ctx.blocking_streams()
        } else {
            vec![self.ctx.null_stream()]
        };
        others
            .into_iter()
            .filter(|s| !Arc::ptr_eq(s, self))
            .map(|s| {
                let seq = s.enqueued();
                (s, seq)
            })
            .filter(|(_, seq)| *seq > 0)
            .collect()
    }

    /// Operations queued so far.
    pub fn enqueued(&self) -> u64 {
        lock(&self.queue).enqueued
    }

    /// Whether operation `seq` has run.
    pub fn done(&self, seq: u64) -> bool {
        lock(&self.queue).completed >= seq
    }

    /// Blocks until operation `seq` has run.
    pub fn wait_for(&self, seq: u64) {
        let mut q = lock(&self.queue);
        while q.completed < seq {
            q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until everything queued so far has run; returns the context's error, if any.
    pub fn synchronize(&self) -> CuResult {
        let seq = self.enqueued();
        self.wait_for(seq);
        self.ctx.sticky()
    }

    /// Ends the worker once the queue is drained (`cuStreamDestroy`: work already queued
    /// still runs).
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.cv.notify_all();
    }
}

fn worker(stream: Weak<Stream>) {
    loop {
        let Some(s) = stream.upgrade() else { return };
        let op = {
            let mut q = lock(&s.queue);
            loop {
                if let Some(op) = q.ops.pop_front() {
                    break Some(op);
                }
                if q.closed {
                    break None;
                }
                // Wake now and then so a stream dropped without close ends its thread.
                let (g, _) =
                    s.cv.wait_timeout(q, std::time::Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner());
                q = g;
                if Arc::strong_count(&s) == 1 && q.ops.is_empty() {
                    break None;
                }
            }
        };
        let Some(op) = op else { return };
        // After an error the context is unusable: later work is dropped, as on a GPU.
        if s.ctx.sticky() == CUDA_SUCCESS {
            if let Err((code, msg)) = op() {
                s.ctx.fail(code, &msg);
            }
        }
        let mut q = lock(&s.queue);
        q.completed += 1;
        s.cv.notify_all();
    }
}

/// An event: the point of a stream's queue at which it was last recorded.
pub struct Event {
    /// `CU_EVENT_DISABLE_TIMING` was not given.
    pub timing: bool,
    state: Mutex<EventState>,
}

#[derive(Default)]
struct EventState {
    recorded: Option<(Arc<Stream>, u64)>,
    time: Option<Instant>,
}

impl Event {
    /// A new event that has recorded nothing.
    pub fn new(timing: bool) -> Arc<Event> {
        Arc::new(Event {
            timing,
            state: Mutex::new(EventState::default()),
        })
    }

    /// `cuEventRecord`.
    pub fn record(self: &Arc<Self>, stream: &Arc<Stream>) {
        let me = self.clone();
        lock(&self.state).time = None;
        let seq = stream.enqueue(Box::new(move || {
            lock(&me.state).time = Some(Instant::now());
            Ok(())
        }));
        lock(&self.state).recorded = Some((stream.clone(), seq));
    }

    /// What the event waits for, if it was recorded.
    pub fn point(&self) -> Option<(Arc<Stream>, u64)> {
        lock(&self.state).recorded.clone()
    }

    /// Whether the recorded work has completed (true if nothing was recorded).
    pub fn complete(&self) -> bool {
        self.point().is_none_or(|(s, seq)| s.done(seq))
    }

    /// Blocks until the recorded work has completed.
    pub fn synchronize(&self) {
        if let Some((s, seq)) = self.point() {
            s.wait_for(seq);
        }
    }

    /// When the recorded work completed.
    pub fn time(&self) -> Option<Instant> {
        lock(&self.state).time
    }
}

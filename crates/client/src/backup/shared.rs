//! State shared by the threads and jobs of one backup, and the one way a
//! backup fails: [`Shared::fail`] records the cause and wakes every waiter.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{bail, err, Error, Result};
use byteback_protocol::{BackupStats, ClientMsg, Entry};

use super::pool::BufPool;
use super::queue::{Outgoing, Queue};
use crate::conn::Breaker;
use crate::walk::Found;

/// Batches sent and not yet answered, with the absolute path of each entry.
pub(super) type Batches = Mutex<VecDeque<(u64, Vec<(Found, Entry)>)>>;

/// Flow control: the entries from the oldest unresolved one to the newest.
/// The server has to hold all of them (it writes its manifest in order), so
/// their count and size stay under the protocol's caps.
#[derive(Default)]
pub(super) struct Flow {
    /// (resolved, buffer cost) per entry, from the oldest unresolved on.
    pub(super) window: VecDeque<(bool, usize)>,
    /// Sequence number of `window[0]`.
    pub(super) window_base: u64,
    /// Sum of costs in `window`.
    pub(super) window_bytes: usize,
    /// Transfer id -> sequence number of its entry.
    pub(super) transfer_seq: HashMap<u32, u64>,
    /// Why the backup stopped, once it has (see [`Shared::fail`]).
    pub(super) failed: Option<Failure>,
    /// The server's answer to `BackupEnd`, once the reader has it.
    pub(super) done: Option<Committed>,
    /// Threads and delta jobs of the backup that have not ended yet.
    pub(super) running: usize,
    /// Threads waiting on the flow's condition variable.
    pub(super) waiting: usize,
}

/// What the server reported on committing the backup.
pub(super) struct Committed {
    pub(super) snapshot: Option<String>,
    pub(super) message: String,
    pub(super) stats: BackupStats,
    /// The committed manifest's generation.
    pub(super) generation: Option<[u8; 32]>,
}

/// The cause a failed backup reports.
pub(super) struct Failure {
    pub(super) message: String,
    /// An `Error` frame: the server's own account, worth more than the
    /// broken pipe or closed connection it causes here.
    pub(super) from_server: bool,
}

impl Flow {
    pub(super) fn resolve(&mut self, seq: u64) {
        if let Some(slot) = seq
            .checked_sub(self.window_base)
            .and_then(|i| self.window.get_mut(i as usize))
        {
            slot.0 = true;
        }
        while let Some(&(true, cost)) = self.window.front() {
            self.window.pop_front();
            self.window_base += 1;
            self.window_bytes -= cost;
        }
    }
}

pub(super) use crate::sync::{lock, wait};

/// How long a failed backup waits for its threads and jobs to end (they
/// normally do within milliseconds) before it gives up on them.
pub(super) const STOP_WAIT: Duration = Duration::from_secs(10);

/// See [`Shared::sig_waiters`].
pub(super) type SigWaiters = HashMap<u32, (SyncSender<Option<Vec<u8>>>, usize)>;

/// Most warnings a backup keeps for its report (see [`Shared::warnings`]).
const KEPT_WARNINGS: usize = 10_000;
/// Most bytes of them (a warning names a path: up to 16 KiB escaped).
const KEPT_WARNING_BYTES: usize = 4 << 20;

/// What every thread and job of one backup shares (see the module doc).
pub(super) struct Shared {
    pub(super) flow: Mutex<Flow>,
    pub(super) cv: Condvar,
    /// Set with `flow.failed`, for checks without the lock.
    pub(super) stopped: AtomicBool,
    pub(super) queue: Queue,
    pub(super) pool: BufPool,
    /// Delta jobs waiting for a signature, each with the largest it takes
    /// (see `send::sig_limit`; a larger one is dropped by the reader and
    /// the job gets `None`); `None` once the backup failed.
    pub(super) sig_waiters: Mutex<Option<SigWaiters>>,
    /// Tears the connection down.
    pub(super) breaker: Breaker,
    /// The first warnings, for the report (all are logged as they come):
    /// at most [`KEPT_WARNINGS`] of them, of at most [`KEPT_WARNING_BYTES`].
    pub(super) warnings: Mutex<(Vec<String>, usize)>,
    pub(super) vanished: AtomicU64,
    pub(super) partial: AtomicU64,
    pub(super) wire: AtomicU64,
    pub(super) verbose: bool,
    /// Whether data chunks are compressed (see [`Shared::compress_next`]).
    pub(super) compress: Policy,
    /// Bytes of chunks before encoding: compressed, and stored as they are.
    pub(super) compressed_raw: AtomicU64,
    pub(super) stored_raw: AtomicU64,
}

/// Whether the delta threads compress data chunks (`--compress`, resolved
/// for the transport).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Policy {
    Always,
    Never,
}

impl Shared {
    /// Nothing started yet; `breaker` tears down the backup's connection.
    pub(super) fn new(
        breaker: Breaker,
        queue_depth: usize,
        buffer_budget: usize,
        verbose: bool,
        compress: Policy,
    ) -> Self {
        Shared {
            flow: Mutex::new(Flow::default()),
            cv: Condvar::new(),
            stopped: AtomicBool::new(false),
            queue: Queue::new(queue_depth),
            pool: BufPool::new(buffer_budget),
            sig_waiters: Mutex::new(Some(HashMap::new())),
            breaker,
            warnings: Mutex::new((vec![], 0)),
            vanished: AtomicU64::new(0),
            partial: AtomicU64::new(0),
            wire: AtomicU64::new(0),
            verbose,
            compress,
            compressed_raw: AtomicU64::new(0),
            stored_raw: AtomicU64::new(0),
        }
    }

    /// Whether the next data chunk is to be compressed.
    pub(super) fn compress_next(&self) -> bool {
        self.compress == Policy::Always
    }

    /// Counts a chunk of `raw` bytes as compressed or stored.
    pub(super) fn count_chunk(&self, raw: usize, compressed: bool) {
        let c = if compressed {
            &self.compressed_raw
        } else {
            &self.stored_raw
        };
        c.fetch_add(raw as u64, Ordering::Relaxed);
    }

    /// Stops the backup: the one way it fails, from whichever thread or job
    /// finds the problem (the main thread included). Records the cause (the
    /// first one, unless the server's own error comes after what it caused
    /// here), then wakes everyone who could be waiting: the main thread and
    /// the announcer on the flow, senders and the writer on the queue, delta
    /// jobs on the buffer pool or for a signature; and tears the connection
    /// down, so that the reader's and writer's blocked reads and writes
    /// return. Every one of them then ends by itself.
    pub(super) fn fail(&self, cause: &Error) {
        let from_server = cause.is_from_server();
        {
            let mut f = lock(&self.flow);
            let replace = match &f.failed {
                None => true,
                Some(old) => from_server && !old.from_server,
            };
            if replace {
                f.failed = Some(Failure {
                    message: format!("{cause:#}"),
                    from_server,
                });
            }
        }
        self.stopped.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        self.queue.close();
        self.pool.close();
        drop(lock(&self.sig_waiters).take());
        self.breaker.trip();
    }

    /// Waits on the flow until `ready` holds; fails with the backup's cause
    /// once it has failed.
    pub(super) fn wait_flow(
        &self,
        mut ready: impl FnMut(&Flow) -> bool,
    ) -> Result<MutexGuard<'_, Flow>> {
        let mut f = lock(&self.flow);
        while !ready(&f) && f.failed.is_none() {
            f.waiting += 1;
            f = wait(&self.cv, f);
            f.waiting -= 1;
        }
        if let Some(e) = &f.failed {
            bail!("{}", e.message);
        }
        Ok(f)
    }

    /// Wakes the flow's waiters after a change to `f` (held): only when
    /// there are any, since a wake is a system call even with none.
    pub(super) fn wake(&self, f: &Flow) {
        if f.waiting > 0 {
            self.cv.notify_all();
        }
    }

    pub(super) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// The cause recorded by [`Shared::fail`], and whether the server gave it.
    pub(super) fn failure(&self) -> Option<(String, bool)> {
        lock(&self.flow)
            .failed
            .as_ref()
            .map(|f| (f.message.clone(), f.from_server))
    }

    /// Counts one more thread or job as running; it holds the returned
    /// guard until it ends.
    pub(super) fn enter(self: &Arc<Self>) -> Running {
        lock(&self.flow).running += 1;
        Running(self.clone())
    }

    /// Waits until every thread and job has ended, at most `limit`; false
    /// if some have not.
    pub(super) fn wait_ended(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut f = lock(&self.flow);
        while f.running > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            f.waiting += 1;
            f = crate::sync::wait_timeout(&self.cv, f, deadline - now);
            f.waiting -= 1;
        }
        true
    }

    pub(super) fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        let mut w = lock(&self.warnings);
        let (kept, bytes) = &mut *w;
        if kept.len() < KEPT_WARNINGS && *bytes + msg.len() <= KEPT_WARNING_BYTES {
            *bytes += msg.len();
            kept.push(msg);
        }
    }

    /// The warnings kept for the report (see [`Shared::warnings`]).
    pub(super) fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.warnings).0)
    }

    pub(super) fn send(&self, msg: ClientMsg) -> Result<()> {
        self.send_pooled(msg, 0)
    }

    /// Queues a message whose data buffer came from the pool at capacity
    /// `pooled`; the writer gives it back once the message is on the wire.
    pub(super) fn send_pooled(&self, msg: ClientMsg, pooled: usize) -> Result<()> {
        self.queue.push(Outgoing { msg, pooled })
    }
}

/// A running thread or job of a backup (see [`Shared::enter`]). Dropped
/// when it ends; if it ends by panicking, the backup fails, so that nobody
/// waits for what it would have done.
pub(super) struct Running(pub(super) Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail(&err!("internal error: a backup thread panicked"));
        }
        let mut f = lock(&self.0.flow);
        f.running -= 1;
        self.0.wake(&f);
    }
}

/// Starts a thread of the backup; it runs `f` and fails the backup with its error.
pub(super) fn start_thread(
    shared: &Arc<Shared>,
    name: &str,
    f: impl FnOnce(&Arc<Shared>) -> Result<()> + Send + 'static,
) -> Result<JoinHandle<()>> {
    let running = shared.enter();
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let shared = running.0.clone();
            if let Err(e) = f(&shared) {
                shared.fail(&e);
            }
            drop(running);
        });
    spawned.map_err(|e| {
        let e = err!("cannot start a thread: {e}");
        shared.fail(&e);
        e
    })
}

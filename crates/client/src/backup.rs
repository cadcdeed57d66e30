//! One backup, top to bottom: walk → announce entries → send what the server
//! needs, many files at once → commit.
//!
//! Three kinds of threads share the work: this thread walks and announces
//! entries in batches; a reader thread takes the server's replies and hands
//! files to a rayon pool, which reads each file in segments, diffs every
//! segment against the server's signature and queues compressed deltas; a
//! writer thread puts the queue on the wire. Every segment buffer (file data
//! read, its delta, the compressed chunk until the writer has sent it) comes
//! from one [`BufPool`] with a byte budget, and the number of
//! announced-but-unfinished files is capped, so memory stays bounded whatever
//! the number or size of the files.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use byteback_delta::{
    diff_window_into, literal_header, FileHasher, Signature, DELTA_END, LITERAL_HEADER_MAX,
};
use byteback_protocol::codec::{compress_bound, ChunkCompressor};
use byteback_protocol::limits::{MAX_BATCH, MAX_BUFFERED_BYTES, MAX_CHUNK, MAX_PENDING};
use byteback_protocol::{BackupStats, ClientMsg, Compressed, Entry, ServerMsg};

use crate::conn::{self, Breaker, ConnReader, ConnWriter, Connection, ServerError};
use crate::progress::BACKUP as PROGRESS;
use crate::walk::{self, EntrySink, Excludes, Found, OpenError, WalkWarning};

/// Raw bytes of a segment when there is no basis.
const PLAIN_SEGMENT: usize = 2 << 20;
const ZSTD_LEVEL: i32 = 1;
/// Bytes read at a time when hashing a file before offering it for cloning.
const HASH_CHUNK: usize = 1 << 20;
/// Most bytes of segment buffers (file data, deltas, compressed chunks in
/// the delta workers or queued for the writer) held at once.
const BUFFER_BUDGET: usize = 32 << 20;
/// Messages the writer's queue holds; the bytes of their data are bounded by
/// [`BUFFER_BUDGET`], so this only needs to be deep enough for small files.
const QUEUE_DEPTH: usize = 64;

/// What a backup did.
#[derive(Debug, Default)]
pub struct BackupReport {
    /// Server's counters.
    pub stats: BackupStats,
    /// Snapshot taken, if any.
    pub snapshot: Option<String>,
    /// Server's note.
    pub message: String,
    /// Entries sent.
    pub entries: u64,
    /// Non-fatal problems.
    pub warnings: Vec<String>,
    /// Objects that vanished during the backup.
    pub vanished: u64,
    /// Files that changed while being read, or could not be read.
    pub partial: u64,
    /// Bytes of deltas put on the wire (compressed).
    pub wire_bytes: u64,
}

/// Options for one backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Sources (absolute after normalisation).
    pub sources: Vec<PathBuf>,
    /// Exclude patterns.
    pub excludes: Vec<String>,
    /// rsync filter rules (`/etc/byteback/rsync_filter`), checked after the excludes.
    pub filter: Option<Arc<crate::filter::Filter>>,
    /// Print every file sent.
    pub verbose: bool,
    /// Stay on each source's filesystem (`--one-file-system`).
    pub one_file_system: bool,
}

/// Batches sent and not yet answered, with the absolute path of each entry.
type Batches = Mutex<VecDeque<(u64, Vec<(Found, Entry)>)>>;

struct Job {
    id: u32,
    found: Found,
    entry: Entry,
    basis: bool,
    /// The server may hold this content: offer its BLAKE3 first.
    twin: bool,
}

/// Flow control: the entries from the oldest unresolved one to the newest.
/// The server has to hold all of them (it writes its manifest in order), so
/// their count and size stay under the protocol's caps.
#[derive(Default)]
struct Flow {
    /// (resolved, buffer cost) per entry, from the oldest unresolved on.
    window: VecDeque<(bool, usize)>,
    /// Sequence number of `window[0]`.
    window_base: u64,
    /// Sum of costs in `window`.
    window_bytes: usize,
    /// Transfer id -> sequence number of its entry.
    transfer_seq: HashMap<u32, u64>,
    /// Why the backup stopped, once it has (see [`Shared::fail`]).
    failed: Option<Failure>,
    done: Option<(Option<String>, String, BackupStats)>,
    /// Threads and delta jobs of the backup that have not ended yet.
    running: usize,
}

/// The cause a failed backup reports.
struct Failure {
    message: String,
    /// An `Error` frame: the server's own account, worth more than the
    /// broken pipe or closed connection it causes here.
    from_server: bool,
}

impl Flow {
    fn resolve(&mut self, seq: u64) {
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

/// A message for the writer, with the pool capacity its data buffer was
/// counted at (0 if it has none from the pool).
struct Outgoing {
    msg: ClientMsg,
    pooled: usize,
}

/// A buffer lent by a [`BufPool`], with the capacity it is counted at.
struct PoolBuf {
    buf: Vec<u8>,
    counted: usize,
}

/// The segment buffers of a backup. The capacity of every buffer the pool
/// owns, free or lent out (in a worker or queued for the writer), stays
/// within the budget, except that one request is always granted when
/// nothing is lent, so a segment larger than the budget still goes through.
/// Buffers are reused rather than freed, so a large transfer does not pay a
/// fresh mmap and its page faults per segment.
struct BufPool {
    st: Mutex<PoolState>,
    cv: Condvar,
    cap: usize,
}

#[derive(Default)]
struct PoolState {
    /// Free buffers, any capacity.
    free: Vec<Vec<u8>>,
    /// Capacity of all the pool's buffers, free and lent.
    total: usize,
    /// Buffers lent out.
    lent: usize,
    /// The backup failed: nobody waits any more.
    closed: bool,
}

impl BufPool {
    fn new(cap: usize) -> Self {
        BufPool {
            st: Mutex::new(PoolState::default()),
            cv: Condvar::new(),
            cap,
        }
    }

    /// `k` buffers of capacity at least `len` each, all at once (a worker
    /// never holds some while waiting for more), waiting while they would
    /// take the pool over its budget.
    fn take(&self, k: usize, len: usize) -> Result<Vec<PoolBuf>> {
        let mut st = lock(&self.st);
        loop {
            if st.closed {
                bail!("the backup failed");
            }
            // Reuse the largest free buffers; the others may be dropped to make room.
            st.free.sort_unstable_by_key(Vec::capacity);
            let reuse = st.free.len().min(k);
            let keep_from = st.free.len() - reuse;
            let grow: usize = st.free[keep_from..]
                .iter()
                .map(|b| len.saturating_sub(b.capacity()))
                .sum::<usize>()
                + (k - reuse) * len;
            let spare: usize = st.free[..keep_from].iter().map(Vec::capacity).sum();
            if st.total + grow <= self.cap + spare || st.lent == 0 {
                let mut dropped = 0;
                while st.total + grow > self.cap + dropped {
                    let Some(b) = st.free.first() else { break };
                    if st.free.len() <= reuse {
                        break;
                    }
                    dropped += b.capacity();
                    st.free.remove(0);
                }
                st.total -= dropped;
                let at = st.free.len() - reuse;
                let mut out: Vec<PoolBuf> = st
                    .free
                    .split_off(at)
                    .into_iter()
                    .map(|buf| PoolBuf { buf, counted: 0 })
                    .collect();
                for b in &mut out {
                    let before = b.buf.capacity();
                    if before < len {
                        // Contents are scratch: no need to copy them over.
                        b.buf = Vec::with_capacity(len);
                    }
                    b.counted = b.buf.capacity();
                    st.total = st.total + b.counted - before;
                }
                while out.len() < k {
                    let buf = Vec::with_capacity(len);
                    st.total += buf.capacity();
                    out.push(PoolBuf {
                        counted: buf.capacity(),
                        buf,
                    });
                }
                st.lent += k;
                return Ok(out);
            }
            st = wait(&self.cv, st);
        }
    }

    /// Takes back a buffer lent at capacity `counted` (it may have grown since).
    fn give(&self, buf: Vec<u8>, counted: usize) {
        {
            let mut st = lock(&self.st);
            st.lent = st.lent.saturating_sub(1);
            st.total = (st.total + buf.capacity()).saturating_sub(counted);
            if st.total > self.cap || st.closed {
                st.total -= buf.capacity().min(st.total);
            } else {
                st.free.push(buf);
            }
        }
        self.cv.notify_all();
    }

    fn give_back(&self, b: PoolBuf) {
        self.give(b.buf, b.counted);
    }

    fn close(&self) {
        {
            let mut st = lock(&self.st);
            st.closed = true;
            st.free.clear();
        }
        self.cv.notify_all();
    }
}

/// The writer's queue: bounded, and closed for good when the backup fails,
/// which wakes whoever waits on it (the writer for work, the others for room).
struct Queue {
    st: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    cap: usize,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Outgoing>,
    closed: bool,
    /// Senders waiting for room.
    pushers: usize,
    /// The writer waits for a message.
    popper: bool,
}

impl Queue {
    fn new(cap: usize) -> Self {
        Queue {
            st: Mutex::new(QueueState::default()),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            cap,
        }
    }

    /// Queues a message, waiting for room; fails once the queue is closed.
    fn push(&self, o: Outgoing) -> Result<()> {
        let mut st = lock(&self.st);
        loop {
            if st.closed {
                bail!("the backup stopped");
            }
            if st.items.len() < self.cap {
                break;
            }
            st.pushers += 1;
            st = wait(&self.not_full, st);
            st.pushers -= 1;
        }
        st.items.push_back(o);
        let wake = st.popper;
        drop(st);
        if wake {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    /// The next message; `None` when there is none and `block` is false.
    /// Fails once the queue is closed.
    fn pop(&self, block: bool) -> Result<Option<Outgoing>> {
        let mut st = lock(&self.st);
        loop {
            if st.closed {
                bail!("the backup stopped");
            }
            if let Some(o) = st.items.pop_front() {
                let wake = st.pushers > 0;
                drop(st);
                if wake {
                    self.not_full.notify_one();
                }
                return Ok(Some(o));
            }
            if !block {
                return Ok(None);
            }
            st.popper = true;
            st = wait(&self.not_empty, st);
            st.popper = false;
        }
    }

    fn close(&self) {
        let dropped = {
            let mut st = lock(&self.st);
            st.closed = true;
            std::mem::take(&mut st.items)
        };
        drop(dropped);
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }
}

/// Locks a mutex; a thread that panicked while holding it has already failed
/// the backup (see [`Running`]), and what it guards is still fine to read.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(PoisonError::into_inner)
}

/// How long a failed backup waits for its threads and jobs to end (they
/// normally do within milliseconds) before it gives up on them.
const STOP_WAIT: Duration = Duration::from_secs(10);

struct Shared {
    flow: Mutex<Flow>,
    cv: Condvar,
    /// Set with `flow.failed`, for checks without the lock.
    stopped: AtomicBool,
    queue: Queue,
    pool: BufPool,
    /// Delta jobs waiting for a signature; `None` once the backup failed.
    sig_waiters: Mutex<Option<HashMap<u32, SyncSender<Vec<u8>>>>>,
    /// Tears the connection down.
    breaker: Breaker,
    warnings: Mutex<Vec<String>>,
    vanished: AtomicU64,
    partial: AtomicU64,
    wire: AtomicU64,
    verbose: bool,
}

impl Shared {
    /// Stops the backup: the one way it fails, from whichever thread or job
    /// finds the problem (the main thread included). Records the cause (the
    /// first one, unless the server's own error comes after what it caused
    /// here), then wakes everyone who could be waiting: the main thread and
    /// the announcer on the flow, senders and the writer on the queue, delta
    /// jobs on the buffer pool or for a signature; and tears the connection
    /// down, so that the reader's and writer's blocked reads and writes
    /// return. Every one of them then ends by itself.
    fn fail(&self, cause: &anyhow::Error) {
        let from_server = cause.downcast_ref::<ServerError>().is_some();
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

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// The cause recorded by [`Shared::fail`], and whether the server gave it.
    fn failure(&self) -> Option<(String, bool)> {
        lock(&self.flow)
            .failed
            .as_ref()
            .map(|f| (f.message.clone(), f.from_server))
    }

    /// Counts one more thread or job as running; it holds the returned
    /// guard until it ends.
    fn enter(self: &Arc<Self>) -> Running {
        lock(&self.flow).running += 1;
        Running(self.clone())
    }

    /// Waits until every thread and job has ended, at most `limit`; false
    /// if some have not.
    fn wait_ended(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut f = lock(&self.flow);
        while f.running > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            f = self
                .cv
                .wait_timeout(f, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        let mut w = lock(&self.warnings);
        if w.len() < 10_000 {
            w.push(msg);
        }
    }

    fn send(&self, msg: ClientMsg) -> Result<()> {
        self.send_pooled(msg, 0)
    }

    /// Queues a message whose data buffer came from the pool at capacity
    /// `pooled`; the writer gives it back once the message is on the wire.
    fn send_pooled(&self, msg: ClientMsg, pooled: usize) -> Result<()> {
        self.queue.push(Outgoing { msg, pooled })
    }
}

/// A running thread or job of a backup (see [`Shared::enter`]). Dropped
/// when it ends; if it ends by panicking, the backup fails, so that nobody
/// waits for what it would have done.
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail(&anyhow!("internal error: a backup thread panicked"));
        }
        lock(&self.0.flow).running -= 1;
        self.0.cv.notify_all();
    }
}

/// Starts a thread of the backup; it runs `f` and fails the backup with its error.
fn start_thread(
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
        let e = anyhow!("cannot start a thread: {e}");
        shared.fail(&e);
        e
    })
}

/// Runs one backup over an open connection.
///
/// Whatever goes wrong (the server reports an error, dies or is killed, a
/// file cannot be sent, the walk fails), the backup stops through
/// [`Shared::fail`], every thread and job ends, the server is stopped, and
/// the error names the first cause; nothing is left waiting.
pub fn run_backup(mut conn: Connection, opts: &BackupOptions) -> Result<BackupReport> {
    PROGRESS.reset();
    let started = (|| {
        let sources = walk::normalise_sources(&opts.sources)?;
        let excludes = Excludes::new(&opts.excludes)?;
        // The walk holds a directory fd per level of depth.
        walk::raise_fd_limit();
        conn.send(&ClientMsg::BackupStart { checksum: false })?;
        match conn.recv()? {
            ServerMsg::BackupReady => {}
            m => bail!("unexpected {} at backup start", m.name()),
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    .clamp(2, 8)
                    * 2,
            )
            .thread_name(|i| format!("byteback-delta-{i}"))
            .build()?;
        Ok((sources, excludes, pool))
    })();
    let transport = conn.take_transport();
    let (sources, excludes, pool) = match started {
        Ok(x) => x,
        Err(e) => {
            let how = transport.abort();
            return Err(conn::with_exit(e, how));
        }
    };
    let Connection { reader, writer, .. } = conn;
    let shared = Arc::new(Shared {
        flow: Mutex::new(Flow::default()),
        cv: Condvar::new(),
        stopped: AtomicBool::new(false),
        queue: Queue::new(QUEUE_DEPTH),
        pool: BufPool::new(BUFFER_BUDGET),
        sig_waiters: Mutex::new(Some(HashMap::new())),
        breaker: transport.breaker(),
        warnings: Mutex::new(vec![]),
        vanished: AtomicU64::new(0),
        partial: AtomicU64::new(0),
        wire: AtomicU64::new(0),
        verbose: opts.verbose,
    });
    let batches: Arc<Batches> = Arc::new(Mutex::new(VecDeque::new()));
    let pool = Arc::new(pool);

    let mut threads = vec![];
    let reader_batches = batches.clone();
    let reader_pool = pool.clone();
    let result = start_thread(&shared, "byteback-writer", move |shared| {
        writer_loop(writer, shared)
    })
    .and_then(|t| {
        threads.push(t);
        start_thread(&shared, "byteback-reader", move |shared| {
            reader_loop(reader, shared, &reader_batches, &reader_pool)
        })
    })
    .and_then(|t| {
        threads.push(t);
        let mut announcer = Announcer {
            shared: shared.clone(),
            batches,
            batch: vec![],
            batch_cost: 0,
            entries: 0,
            walk_vanished: 0,
        };
        let walk_opts = walk::WalkOptions {
            one_file_system: opts.one_file_system,
            filter: opts.filter.clone(),
        };
        walk::walk(&sources, &excludes, walk_opts, &mut announcer)?;
        PROGRESS.walk_finished();
        announcer.flush()?;
        // Wait until every file is resolved, then commit.
        {
            let mut f = lock(&shared.flow);
            while !f.window.is_empty() && f.failed.is_none() {
                f = wait(&shared.cv, f);
            }
            if let Some(e) = &f.failed {
                bail!("{}", e.message);
            }
        }
        shared.send(ClientMsg::BackupEnd)?;
        let mut f = lock(&shared.flow);
        while f.done.is_none() && f.failed.is_none() {
            f = wait(&shared.cv, f);
        }
        if let Some(e) = &f.failed {
            bail!("{}", e.message);
        }
        let done = f.done.take().ok_or_else(|| anyhow!("no result"))?;
        Ok((done, announcer.entries))
    });
    let ((snapshot, message, stats), entries) = match result {
        Ok(r) => {
            // Committed: a goodbye that does not go through changes nothing.
            let _ = shared.send(ClientMsg::Bye);
            r
        }
        Err(e) => {
            // Whatever failed here, or elsewhere first: stop everything.
            shared.fail(&e);
            let ended = shared.wait_ended(STOP_WAIT);
            let (cause, from_server) = shared
                .failure()
                .unwrap_or_else(|| (format!("{e:#}"), false));
            let how = transport.abort();
            if ended {
                for t in threads {
                    let _ = t.join();
                }
            } else {
                tracing::warn!(
                    "some threads of the failed backup had not ended after {} s",
                    STOP_WAIT.as_secs()
                );
            }
            // How the server ended only matters when it did not say why.
            let how = how.filter(|_| !from_server);
            return Err(conn::with_exit(anyhow!("{cause}"), how));
        }
    };
    // The writer ends after Bye, the reader after BackupDone, jobs before
    // the window emptied.
    if shared.wait_ended(STOP_WAIT) {
        for t in threads {
            let _ = t.join();
        }
    } else {
        tracing::warn!(
            "the connection's threads had not ended after {} s",
            STOP_WAIT.as_secs()
        );
        shared.breaker.trip();
    }
    if let Some((cause, _)) = shared.failure() {
        // Already committed: only saying goodbye went wrong.
        tracing::warn!("after the backup: {cause}");
    }
    let report = BackupReport {
        stats,
        snapshot,
        message,
        entries,
        warnings: lock(&shared.warnings).clone(),
        vanished: shared.vanished.load(Ordering::Relaxed),
        partial: shared.partial.load(Ordering::Relaxed),
        wire_bytes: shared.wire.load(Ordering::Relaxed),
    };
    drop(shared);
    drop(pool);
    transport.finish()?;
    Ok(report)
}

struct Announcer {
    shared: Arc<Shared>,
    batches: Arc<Batches>,
    batch: Vec<(Found, Entry)>,
    batch_cost: usize,
    entries: u64,
    walk_vanished: u64,
}

impl Announcer {
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let n = self.batch.len();
        let cost = self.batch_cost;
        let start = {
            let mut f = lock(&self.shared.flow);
            while (f.window.len() + n >= MAX_PENDING || f.window_bytes + cost > MAX_BUFFERED_BYTES)
                && !f.window.is_empty()
                && f.failed.is_none()
            {
                f = wait(&self.shared.cv, f);
            }
            if let Some(e) = &f.failed {
                bail!("{}", e.message);
            }
            let start = f.window_base + f.window.len() as u64;
            for (_, e) in &self.batch {
                f.window.push_back((false, e.buffer_cost()));
            }
            f.window_bytes += cost;
            start
        };
        let batch = std::mem::take(&mut self.batch);
        self.batch_cost = 0;
        let entries: Vec<Entry> = batch.iter().map(|(_, e)| e.clone()).collect();
        // Queued before sending, so the reader always finds the batch a Needs answers.
        lock(&self.batches).push_back((start, batch));
        self.shared.send(ClientMsg::Entries(entries))
    }
}

impl EntrySink for Announcer {
    fn entry(&mut self, found: Found, entry: Entry) -> Result<()> {
        if self.shared.stopped() {
            // Whatever stopped the backup is its cause; this only ends the walk.
            bail!("the backup stopped");
        }
        self.entries += 1;
        PROGRESS.found(entry.size());
        let cost = entry.buffer_cost();
        if !self.batch.is_empty() && self.batch_cost + cost > MAX_BUFFERED_BYTES / 4 {
            self.flush()?;
        }
        self.batch_cost += cost;
        self.batch.push((found, entry));
        if self.batch.len() >= MAX_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn note(&mut self, what: String) {
        tracing::debug!("{what}");
    }

    fn warning(&mut self, w: WalkWarning) {
        if w.vanished {
            self.walk_vanished += 1;
            self.shared.vanished.fetch_add(1, Ordering::Relaxed);
            self.shared
                .warn(format!("{}: vanished during the backup", w.path.display()));
        } else {
            self.shared.partial.fetch_add(1, Ordering::Relaxed);
            self.shared
                .warn(format!("{}: {}", w.path.display(), w.message));
        }
    }
}

fn writer_loop(mut w: ConnWriter, shared: &Shared) -> Result<()> {
    loop {
        let Outgoing { msg, pooled } = match shared.queue.pop(false)? {
            Some(m) => m,
            None => {
                // Nothing more for now: out with what is buffered, then wait.
                w.flush()?;
                match shared.queue.pop(true)? {
                    Some(m) => m,
                    None => continue,
                }
            }
        };
        let bye = matches!(msg, ClientMsg::Bye);
        w.send(&msg)?;
        if let ClientMsg::FileData { delta, .. } = msg {
            if pooled > 0 {
                shared.pool.give(delta.data, pooled);
            }
        }
        if bye {
            break;
        }
    }
    w.flush()
}

fn reader_loop(
    mut r: ConnReader,
    shared: &Arc<Shared>,
    batches: &Batches,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    // Transfers in progress, kept for a possible whole-file resend.
    let mut jobs: HashMap<u32, (Found, Entry)> = HashMap::new();
    loop {
        let msg = r.recv()?;
        match msg {
            ServerMsg::Needs(needs) => {
                let (start, batch) = lock(batches)
                    .pop_front()
                    .ok_or_else(|| anyhow!("server answered a batch that was never sent"))?;
                let n = batch.len();
                tracing::trace!(
                    "entries {start}..{}: the server needs {} of them",
                    start + n as u64,
                    needs.len()
                );
                let mut needed = vec![false; n];
                for need in &needs {
                    if let Some(x) = needed.get_mut(need.index as usize) {
                        *x = true;
                    }
                }
                {
                    let mut f = lock(&shared.flow);
                    for need in &needs {
                        f.transfer_seq.insert(need.id, start + need.index as u64);
                    }
                    for (i, needed) in needed.iter().enumerate() {
                        if !needed {
                            f.resolve(start + i as u64);
                        }
                    }
                    shared.cv.notify_all();
                }
                for ((_, e), _) in batch.iter().zip(&needed).filter(|(_, n)| !**n) {
                    PROGRESS.skipped(e.size());
                }
                let mut batch: Vec<Option<(Found, Entry)>> = batch.into_iter().map(Some).collect();
                for need in needs {
                    let (found, entry) = batch
                        .get_mut(need.index as usize)
                        .and_then(Option::take)
                        .ok_or_else(|| anyhow!("bad need index"))?;
                    jobs.insert(need.id, (found.clone(), entry.clone()));
                    spawn_job(
                        pool,
                        shared,
                        Job {
                            id: need.id,
                            found,
                            entry,
                            basis: need.basis,
                            twin: need.twin,
                        },
                    );
                }
            }
            ServerMsg::Signature { id, sig } => {
                let waiter = lock(&shared.sig_waiters)
                    .as_mut()
                    .and_then(|w| w.remove(&id));
                if let Some(w) = waiter {
                    let _ = w.send(sig);
                }
            }
            ServerMsg::FileOk { id } => {
                jobs.remove(&id);
                PROGRESS.finished();
                let mut f = lock(&shared.flow);
                if let Some(seq) = f.transfer_seq.remove(&id) {
                    f.resolve(seq);
                }
                shared.cv.notify_all();
            }
            ServerMsg::FileRetry { id } => {
                let (found, entry) = jobs
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| anyhow!("retry for unknown file {id}"))?;
                shared.warn(format!(
                    "{}: the server asked for it again (failed verification, or it made room after a full disc); resending whole",
                    found.abs.display()
                ));
                spawn_job(
                    pool,
                    shared,
                    Job {
                        id,
                        found,
                        entry,
                        basis: false,
                        twin: false,
                    },
                );
            }
            ServerMsg::SendData { id } => {
                // The server does not hold the content offered: send it.
                let (found, entry) = jobs
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| anyhow!("send-data for unknown file {id}"))?;
                spawn_job(
                    pool,
                    shared,
                    Job {
                        id,
                        found,
                        entry,
                        basis: false,
                        twin: false,
                    },
                );
            }
            ServerMsg::BackupDone {
                snapshot,
                message,
                stats,
            } => {
                let mut f = lock(&shared.flow);
                f.done = Some((snapshot, message, stats));
                shared.cv.notify_all();
                return Ok(());
            }
            m => bail!("unexpected {} during a backup", m.name()),
        }
    }
}

fn spawn_job(pool: &rayon::ThreadPool, shared: &Arc<Shared>, job: Job) {
    let running = shared.enter();
    pool.spawn(move || {
        let shared = &running.0;
        let id = job.id;
        // Jobs queued before the backup failed have nothing left to do.
        if !shared.stopped() {
            if let Err(e) = send_file(shared, job) {
                // The connection is gone or the protocol broke: the backup fails.
                shared.fail(&e.context(format!("sending transfer {id}")));
            }
        }
        drop(running);
    });
}

/// Segment length for a signature's block size: a whole number of blocks, about 4 MiB.
fn segment_len(block: usize) -> usize {
    let target = 4 << 20;
    (target / block).max(1) * block
}

fn send_file(shared: &Shared, job: Job) -> Result<()> {
    let Job {
        id,
        found,
        entry,
        basis,
        twin,
    } = job;
    let abs = &found.abs;
    // Beneath the source's fd, never through a symlink, and only the very
    // file the walk saw (see Found::open_file).
    let mut file = match found.open_file() {
        Ok(f) => f,
        Err(OpenError::Vanished(_)) => {
            shared.vanished.fetch_add(1, Ordering::Relaxed);
            shared.warn(format!("{}: vanished during the backup", abs.display()));
            return shared.send(ClientMsg::FileAbort { id });
        }
        Err(e) => {
            shared.partial.fetch_add(1, Ordering::Relaxed);
            shared.warn(format!("{}: {e}", abs.display()));
            return shared.send(ClientMsg::FileAbort { id });
        }
    };

    if twin && !basis {
        if offer_twin(shared, id, &mut file, &entry)? {
            return Ok(());
        }
        // Changed or unreadable while hashed: sent as any other file.
        file.seek(SeekFrom::Start(0))?;
    }
    let sig = if basis {
        let (stx, srx) = sync_channel(1);
        match lock(&shared.sig_waiters).as_mut() {
            Some(w) => w.insert(id, stx),
            None => bail!("the backup stopped"),
        };
        shared.send(ClientMsg::SigRequest { id })?;
        // The sender is dropped when the backup fails.
        let bytes = srx
            .recv()
            .map_err(|_| anyhow!("the backup stopped while waiting for a signature"))?;
        match Signature::parse(&bytes) {
            Ok(s) => Some(s),
            Err(e) => bail!("server sent a bad signature for {}: {e}", abs.display()),
        }
    } else {
        None
    };
    if shared.verbose {
        tracing::debug!(target: byteback_protocol::term::FILE_TARGET, "{}", abs.display());
    }
    PROGRESS.current(abs);
    let seg = sig
        .as_ref()
        .map(|s| segment_len(s.block_size() as usize))
        .unwrap_or(PLAIN_SEGMENT);
    // With a basis, each piece is diffed with up to a block of the next
    // piece's bytes behind it, and the next piece starts where this one's
    // delta ended (see diff_window_into): a block straddling the boundary
    // is still found, so an insertion does not cost a block per segment.
    // The bytes read beyond that end are carried into the next piece.
    let look = sig
        .as_ref()
        .map(|s| (s.block_size() as usize - 1).min(MAX_CHUNK.saturating_sub(seg + 4096)))
        .unwrap_or(0);
    let size = entry.size();
    // Sized to the file: a segment-sized buffer for every small file cost
    // more (allocating and zeroing 2 MiB) than everything else done for it.
    let seg_cap = (seg + look)
        .min(usize::try_from(size).unwrap_or(seg))
        .max(1);
    // Room for the data behind a literal header, or for a delta of it (at
    // most 14 bytes longer than the data), and for its compressed form.
    let buf_len = compress_bound(seg_cap + LITERAL_HEADER_MAX + 64);
    let mut hasher = FileHasher::new();
    let mut total = 0u64;
    let mut read_total = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    while total < size {
        let want = (seg + look - carry.len()).min((size - read_total) as usize);
        // Read buffer, compressed chunk and (with a basis) the delta.
        let mut bufs = shared
            .pool
            .take(if sig.is_some() { 3 } else { 2 }, buf_len)?;
        let delta_buf = if sig.is_some() { bufs.pop() } else { None };
        let (Some(out), Some(mut data)) = (bufs.pop(), bufs.pop()) else {
            bail!("buffer pool returned too few buffers");
        };
        let head = if sig.is_some() { 0 } else { LITERAL_HEADER_MAX };
        data.buf.clear();
        data.buf.resize(head, 0);
        data.buf.extend_from_slice(&carry);
        carry.clear();
        let before = data.buf.len();
        // Reads into the spare capacity: nothing to zero first.
        let read = (&mut file).take(want as u64).read_to_end(&mut data.buf);
        let got = data.buf.len() - before;
        read_total += got as u64;
        let n = data.buf.len() - head;
        if let Err(e) = read {
            shared.pool.give_back(data);
            shared.pool.give_back(out);
            if let Some(d) = delta_buf {
                shared.pool.give_back(d);
            }
            shared.partial.fetch_add(1, Ordering::Relaxed);
            shared.warn(format!("{}: read error: {e}", abs.display()));
            return shared.send(ClientMsg::FileAbort { id });
        }
        if n == 0 {
            shared.pool.give_back(data);
            shared.pool.give_back(out);
            if let Some(d) = delta_buf {
                shared.pool.give_back(d);
            }
            break;
        }
        // The file's last piece (or it ended early): everything goes.
        let last = got < want || read_total >= size;
        let counted = out.counted;
        let (c, used) = match (&sig, delta_buf) {
            (Some(s), Some(mut d)) => {
                let target = if last { n } else { seg.min(n) };
                let r = diff_window_into(s, &data.buf, target, &mut d.buf)
                    .map_err(anyhow::Error::from)
                    .and_then(|used| Ok((compress(&d.buf, out.buf)?, used)));
                shared.pool.give_back(d);
                match r {
                    Ok((c, used)) => {
                        hasher.update(&data.buf[..used]);
                        carry.extend_from_slice(&data.buf[used..]);
                        (Ok(c), used)
                    }
                    Err(e) => (Err(e), 0),
                }
            }
            _ => {
                hasher.update(&data.buf[head..]);
                // The literal delta, built in place around the data.
                let (h, hl) = literal_header(n as u64);
                data.buf[head - hl..head].copy_from_slice(&h[..hl]);
                data.buf.push(DELTA_END);
                (compress(&data.buf[head - hl..], out.buf), n)
            }
        };
        shared.pool.give_back(data);
        let c = c?;
        shared
            .wire
            .fetch_add(c.data.len() as u64, Ordering::Relaxed);
        PROGRESS.read(n as u64);
        PROGRESS.sent(c.data.len() as u64);
        PROGRESS.current(abs);
        shared.send_pooled(ClientMsg::FileData { id, delta: c }, counted)?;
        total += used as u64;
    }
    // A file that changed while it was read is sent as read, but recorded
    // with its old mtime, so the next run looks at it again.
    if let Ok(md) = file.metadata() {
        if md.len() != size
            || md.mtime() != entry.mtime_sec
            || md.mtime_nsec() as u32 != entry.mtime_nsec
            || total != size
        {
            shared.partial.fetch_add(1, Ordering::Relaxed);
            shared.warn(format!("{}: changed while being read", abs.display()));
        }
    }
    shared.send(ClientMsg::FileEnd {
        id,
        size: total,
        hash: hasher.finish(),
        mtime_sec: entry.mtime_sec,
        mtime_nsec: entry.mtime_nsec,
    })
}

/// For a new file the server may already hold (a moved or copied file):
/// reads it whole for its BLAKE3 and offers that instead of the data. The
/// server clones the content if it holds it (FileOk) or asks for the data
/// (SendData). Returns false, having sent nothing, when the file could not
/// be read or changed while it was: it is then sent as usual. Reading a file
/// twice when the server does not hold it is bounded to files of a size the
/// server holds (the server sets `twin` only then).
fn offer_twin(shared: &Shared, id: u32, file: &mut std::fs::File, entry: &Entry) -> Result<bool> {
    let size = entry.size();
    let mut bufs = shared.pool.take(1, HASH_CHUNK)?;
    let Some(mut buf) = bufs.pop() else {
        bail!("buffer pool returned too few buffers");
    };
    buf.buf.resize(HASH_CHUNK, 0);
    let mut hasher = FileHasher::new();
    let mut read = 0u64;
    let outcome = loop {
        match file.read(&mut buf.buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hasher.update(&buf.buf[..n]);
                read += n as u64;
                if read > size {
                    break Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    shared.pool.give_back(buf);
    if outcome.is_err() || read != size {
        return Ok(false);
    }
    match file.metadata() {
        Ok(md)
            if md.len() == size
                && md.mtime() == entry.mtime_sec
                && md.mtime_nsec() as u32 == entry.mtime_nsec => {}
        _ => return Ok(false),
    }
    shared.send(ClientMsg::FileClone {
        id,
        size,
        hash: hasher.finish(),
        mtime_sec: entry.mtime_sec,
        mtime_nsec: entry.mtime_nsec,
    })?;
    Ok(true)
}

thread_local! {
    /// One zstd context per delta thread, instead of one per segment.
    static COMPRESSOR: std::cell::RefCell<Option<ChunkCompressor>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(delta: &[u8], out: Vec<u8>) -> Result<Compressed> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = match &mut *c {
            Some(c) => c,
            None => c.insert(ChunkCompressor::new(ZSTD_LEVEL)?),
        };
        Ok(c.compress_into(delta, out)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Transport;
    use byteback_protocol::{decode_client, read_frame, write_msg, Need};
    use std::os::unix::net::UnixStream;

    fn recv(s: &mut UnixStream) -> Option<ClientMsg> {
        read_frame(s).unwrap().map(|f| decode_client(&f).unwrap())
    }

    fn send(s: &mut UnixStream, m: &ServerMsg) {
        write_msg(s, m).unwrap();
    }

    /// A backup of a one-file tree against a scripted server: it answers the
    /// handshake and BackupStart, then `script` gets the socket. Returns the
    /// backup's result and how long it took, failing if it takes 5 s (a
    /// hang: a failed backup stops in milliseconds).
    fn backup_against(
        script: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (Result<BackupReport>, std::time::Duration) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![7u8; 100_000]).unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            assert!(matches!(recv(&mut theirs), Some(ClientMsg::Hello { .. })));
            send(
                &mut theirs,
                &ServerMsg::HelloOk {
                    version: byteback_protocol::PROTOCOL_VERSION,
                    host: "h".into(),
                },
            );
            assert!(matches!(
                recv(&mut theirs),
                Some(ClientMsg::BackupStart { .. })
            ));
            send(&mut theirs, &ServerMsg::BackupReady);
            script(&mut theirs);
            // The connection stays open: the client must not need it closed.
            let _ = stop_rx.recv();
        });
        let conn = Connection::handshake(
            Box::new(ours.try_clone().unwrap()),
            Box::new(ours),
            Transport::None,
        )
        .unwrap();
        let opts = BackupOptions {
            sources: vec![dir.path().to_path_buf()],
            excludes: vec![],
            filter: None,
            verbose: false,
            one_file_system: false,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let start = Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(run_backup(conn, &opts));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the backup hangs");
        let took = start.elapsed();
        drop(stop_tx);
        server.join().unwrap();
        (r, took)
    }

    /// Reads the client's one batch of entries; the index of the file in it.
    fn entries(s: &mut UnixStream) -> u32 {
        match recv(s) {
            Some(ClientMsg::Entries(e)) => {
                e.iter().position(|e| e.path.ends_with(b"/f")).unwrap() as u32
            }
            m => panic!("expected entries, got {m:?}"),
        }
    }

    #[test]
    fn a_server_error_while_the_client_waits_ends_the_backup() {
        let (r, took) = backup_against(|s| {
            entries(s);
            send(
                s,
                &ServerMsg::Error {
                    message: "no space left on device".into(),
                },
            );
        });
        let e = format!("{:#}", r.unwrap_err());
        assert_eq!(e, "server: no space left on device");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_server_gone_while_the_client_waits_ends_the_backup() {
        let (r, _) = backup_against(|s| {
            entries(s);
            let _ = s.shutdown(std::net::Shutdown::Both);
        });
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("closed the connection"), "{e}");
    }

    #[test]
    fn a_job_waiting_for_a_signature_ends_with_the_backup() {
        let (r, took) = backup_against(|s| {
            let index = entries(s);
            send(
                s,
                &ServerMsg::Needs(vec![Need {
                    index,
                    id: 0,
                    basis: true,
                    twin: false,
                }]),
            );
            assert!(matches!(recv(s), Some(ClientMsg::SigRequest { id: 0 })));
            send(
                s,
                &ServerMsg::Error {
                    message: "cannot read the stored copy".into(),
                },
            );
        });
        assert!(format!("{:#}", r.unwrap_err()).contains("stored copy"));
        // Well under STOP_WAIT: the job did not keep the backup waiting.
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    fn test_shared() -> Shared {
        Shared {
            flow: Mutex::new(Flow::default()),
            cv: Condvar::new(),
            stopped: AtomicBool::new(false),
            queue: Queue::new(1024),
            pool: BufPool::new(BUFFER_BUDGET),
            sig_waiters: Mutex::new(Some(HashMap::new())),
            breaker: crate::conn::Breaker::default(),
            warnings: Mutex::new(vec![]),
            vanished: AtomicU64::new(0),
            partial: AtomicU64::new(0),
            wire: AtomicU64::new(0),
            verbose: false,
        }
    }

    fn sent(shared: &Shared) -> Vec<ClientMsg> {
        let mut out = vec![];
        while let Ok(Some(o)) = shared.queue.pop(false) {
            out.push(o.msg);
        }
        out
    }

    #[derive(Default)]
    struct Collect(Vec<(Found, Entry)>);
    impl EntrySink for Collect {
        fn entry(&mut self, found: Found, entry: Entry) -> Result<()> {
            self.0.push((found, entry));
            Ok(())
        }
        fn warning(&mut self, w: WalkWarning) {
            panic!("{w:?}");
        }
    }

    /// A file replaced (another inode) between the walk and the read is
    /// reported as changed and none of the new content is sent.
    #[test]
    fn send_file_refuses_a_file_replaced_after_the_walk() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f"), b"walked content").unwrap();
        std::fs::write(src.join("d/g"), b"unchanged").unwrap();
        let mut sink = Collect::default();
        walk::walk(
            &walk::normalise_sources(std::slice::from_ref(&src)).unwrap(),
            &Excludes::new::<&str>(&[]).unwrap(),
            walk::WalkOptions::default(),
            &mut sink,
        )
        .unwrap();
        let job = |name: &str, id| {
            let (found, entry) = sink
                .0
                .iter()
                .find(|(f, _)| f.abs == src.join("d").join(name))
                .unwrap()
                .clone();
            Job {
                id,
                found,
                entry,
                basis: false,
                twin: false,
            }
        };
        let (f_job, g_job) = (job("f", 7), job("g", 8));
        std::fs::write(src.join("d/new"), b"NEW CONTENT, not what was walked").unwrap();
        std::fs::rename(src.join("d/new"), src.join("d/f")).unwrap();

        let shared = test_shared();
        send_file(&shared, f_job).unwrap();
        let msgs = sent(&shared);
        assert!(
            matches!(msgs.as_slice(), [ClientMsg::FileAbort { id: 7 }]),
            "{msgs:?}"
        );
        assert_eq!(shared.partial.load(Ordering::Relaxed), 1);
        assert_eq!(shared.vanished.load(Ordering::Relaxed), 0);
        let w = shared.warnings.lock().unwrap().clone();
        assert!(
            w.len() == 1 && w[0].contains("changed during the backup"),
            "{w:?}"
        );

        // The file left alone goes through whole.
        send_file(&shared, g_job).unwrap();
        let msgs = sent(&shared);
        assert!(
            matches!(msgs.last(), Some(ClientMsg::FileEnd { id: 8, size: 9, .. })),
            "{msgs:?}"
        );
        assert!(matches!(msgs[0], ClientMsg::FileData { id: 8, .. }));
        assert_eq!(shared.partial.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_closed_queue_wakes_its_waiters() {
        let q = Arc::new(Queue::new(1));
        let out = |n| Outgoing {
            msg: ClientMsg::FileAbort { id: n },
            pooled: 0,
        };
        q.push(out(1)).unwrap();
        let q2 = q.clone();
        let pusher = std::thread::spawn(move || q2.push(out(2)).is_err());
        let popper = {
            let q = Arc::new(Queue::new(1));
            let q3 = q.clone();
            (q, std::thread::spawn(move || q3.pop(true).is_err()))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished() && !popper.1.is_finished());
        q.close();
        popper.0.close();
        assert!(pusher.join().unwrap());
        assert!(popper.1.join().unwrap());
        assert!(q.pop(false).is_err());
    }

    #[test]
    fn pool_keeps_its_budget_and_reuses_buffers() {
        let pool = Arc::new(BufPool::new(10 << 20));
        let a = pool.take(2, 4 << 20).unwrap();
        assert!(a.iter().all(|b| b.buf.capacity() >= 4 << 20));
        // Another 8 MiB would exceed 10 MiB: it waits until some come back.
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || p2.take(2, 4 << 20).map(|v| v.len()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished());
        for b in a {
            pool.give_back(b);
        }
        assert_eq!(waiter.join().unwrap().unwrap(), 2);
        let st = pool.st.lock().unwrap();
        assert!(st.total <= 10 << 20, "{}", st.total);
        assert_eq!(st.lent, 2);
    }

    #[test]
    fn pool_grants_an_oversized_request_when_idle_and_wakes_on_close() {
        let pool = Arc::new(BufPool::new(1 << 20));
        let big = pool.take(3, 4 << 20).unwrap();
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || p2.take(1, 16).is_err());
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.close();
        assert!(waiter.join().unwrap());
        for b in big {
            pool.give_back(b);
        }
        // Buffers above the budget are freed, not kept.
        assert!(pool.st.lock().unwrap().total <= 1 << 20);
    }
}

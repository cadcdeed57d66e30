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
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{anyhow, bail, Result};
use byteback_delta::{
    diff_segment_into, literal_header, FileHasher, Signature, DELTA_END, LITERAL_HEADER_MAX,
};
use byteback_protocol::codec::{compress_bound, ChunkCompressor};
use byteback_protocol::limits::{MAX_BATCH, MAX_BUFFERED_BYTES, MAX_PENDING};
use byteback_protocol::{BackupStats, ClientMsg, Compressed, Entry, ServerMsg};

use crate::conn::{ConnReader, ConnWriter, Connection};
use crate::walk::{self, EntrySink, Excludes, Found, OpenError, WalkWarning};

/// Raw bytes of a segment when there is no basis.
const PLAIN_SEGMENT: usize = 2 << 20;
const ZSTD_LEVEL: i32 = 1;
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
    /// Print every file sent.
    pub verbose: bool,
    /// Stay on each source's filesystem (`--one-file-system`).
    pub one_file_system: bool,
}

/// Batches sent and not yet answered, with what the walk saw of each entry.
type Batches = Mutex<VecDeque<(u64, Vec<(Found, Entry)>)>>;

struct Job {
    id: u32,
    found: Found,
    entry: Entry,
    basis: bool,
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
    failed: Option<String>,
    done: Option<(Option<String>, String, BackupStats)>,
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
        let mut st = self.st.lock().map_err(|_| anyhow!("lock poisoned"))?;
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
            st = self.cv.wait(st).map_err(|_| anyhow!("lock poisoned"))?;
        }
    }

    /// Takes back a buffer lent at capacity `counted` (it may have grown since).
    fn give(&self, buf: Vec<u8>, counted: usize) {
        if let Ok(mut st) = self.st.lock() {
            st.lent = st.lent.saturating_sub(1);
            st.total = (st.total + buf.capacity()).saturating_sub(counted);
            if st.total > self.cap {
                st.total -= buf.capacity();
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
        if let Ok(mut st) = self.st.lock() {
            st.closed = true;
            st.free.clear();
        }
        self.cv.notify_all();
    }
}

struct Shared {
    flow: Mutex<Flow>,
    cv: Condvar,
    tx: SyncSender<Outgoing>,
    pool: BufPool,
    sig_waiters: Mutex<HashMap<u32, SyncSender<Vec<u8>>>>,
    warnings: Mutex<Vec<String>>,
    vanished: AtomicU64,
    partial: AtomicU64,
    wire: AtomicU64,
    verbose: bool,
}

impl Shared {
    fn fail(&self, msg: String) {
        if let Ok(mut f) = self.flow.lock() {
            f.failed.get_or_insert(msg);
        }
        self.cv.notify_all();
        self.pool.close();
    }

    fn warn(&self, msg: String) {
        eprintln!("byteback-backup: warning: {msg}");
        if let Ok(mut w) = self.warnings.lock() {
            if w.len() < 10_000 {
                w.push(msg);
            }
        }
    }

    fn send(&self, msg: ClientMsg) -> Result<()> {
        self.send_pooled(msg, 0)
    }

    /// Queues a message whose data buffer came from the pool at capacity
    /// `pooled`; the writer gives it back once the message is on the wire.
    fn send_pooled(&self, msg: ClientMsg, pooled: usize) -> Result<()> {
        self.tx
            .send(Outgoing { msg, pooled })
            .map_err(|_| anyhow!("connection to the server is closed"))
    }
}

/// Runs one backup over an open connection.
pub fn run_backup(mut conn: Connection, opts: &BackupOptions) -> Result<BackupReport> {
    let sources = walk::normalise_sources(&opts.sources)?;
    let excludes = Excludes::new(&opts.excludes)?;
    // The walk holds a directory fd per level of depth.
    walk::raise_fd_limit();
    conn.send(&ClientMsg::BackupStart { checksum: false })?;
    match conn.recv()? {
        ServerMsg::BackupReady => {}
        m => bail!("unexpected {} at backup start", m.name()),
    }
    let transport = conn.take_transport();
    let Connection { reader, writer, .. } = conn;
    let (tx, rx) = sync_channel::<Outgoing>(QUEUE_DEPTH);
    let shared = Arc::new(Shared {
        flow: Mutex::new(Flow::default()),
        cv: Condvar::new(),
        tx,
        pool: BufPool::new(BUFFER_BUDGET),
        sig_waiters: Mutex::new(HashMap::new()),
        warnings: Mutex::new(vec![]),
        vanished: AtomicU64::new(0),
        partial: AtomicU64::new(0),
        wire: AtomicU64::new(0),
        verbose: opts.verbose,
    });
    let batches: Arc<Batches> = Arc::new(Mutex::new(VecDeque::new()));
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    .clamp(2, 8)
                    * 2,
            )
            .thread_name(|i| format!("byteback-delta-{i}"))
            .build()?,
    );

    let writer_shared = shared.clone();
    let writer_thread = std::thread::spawn(move || {
        if let Err(e) = writer_loop(writer, rx, &writer_shared.pool) {
            writer_shared.fail(format!("{e:#}"));
        }
    });
    let reader_shared = shared.clone();
    let reader_batches = batches.clone();
    let reader_pool = pool.clone();
    let reader_thread = std::thread::spawn(move || {
        if let Err(e) = reader_loop(reader, &reader_shared, &reader_batches, &reader_pool) {
            reader_shared.fail(format!("{e:#}"));
        }
    });

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
    };
    let walked =
        walk::walk(&sources, &excludes, walk_opts, &mut announcer).and_then(|_| announcer.flush());
    let result = walked.and_then(|_| {
        // Wait until every file is resolved, then commit.
        let mut f = shared.flow.lock().map_err(|_| anyhow!("lock poisoned"))?;
        while !f.window.is_empty() && f.failed.is_none() {
            f = shared.cv.wait(f).map_err(|_| anyhow!("lock poisoned"))?;
        }
        if let Some(e) = &f.failed {
            bail!("{e}");
        }
        drop(f);
        shared.send(ClientMsg::BackupEnd)?;
        let mut f = shared.flow.lock().map_err(|_| anyhow!("lock poisoned"))?;
        while f.done.is_none() && f.failed.is_none() {
            f = shared.cv.wait(f).map_err(|_| anyhow!("lock poisoned"))?;
        }
        if let Some(e) = &f.failed {
            bail!("{e}");
        }
        f.done.take().ok_or_else(|| anyhow!("no result"))
    });
    let entries = announcer.entries;
    drop(announcer);
    let (snapshot, message, stats) = match result {
        Ok(r) => {
            let _ = shared.send(ClientMsg::Bye);
            r
        }
        Err(e) => {
            // Tear the transport down first: the writer may be blocked
            // sending to a server that is gone.
            transport.abort();
            // The writer holds a sender itself (through `Shared`), so its
            // queue never disconnects: wake it if it waits for a message.
            // With a full queue it is busy writing and fails on the aborted
            // transport instead.
            let _ = shared.tx.try_send(Outgoing {
                msg: ClientMsg::Bye,
                pooled: 0,
            });
            drop(shared);
            drop(pool);
            let _ = writer_thread.join();
            let _ = reader_thread.join();
            return Err(e);
        }
    };
    let report = BackupReport {
        stats,
        snapshot,
        message,
        entries,
        warnings: shared
            .warnings
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default(),
        vanished: shared.vanished.load(Ordering::Relaxed),
        partial: shared.partial.load(Ordering::Relaxed),
        wire_bytes: shared.wire.load(Ordering::Relaxed),
    };
    drop(shared);
    drop(pool);
    let _ = writer_thread.join();
    let _ = reader_thread.join();
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
            let mut f = self
                .shared
                .flow
                .lock()
                .map_err(|_| anyhow!("lock poisoned"))?;
            while (f.window.len() + n >= MAX_PENDING || f.window_bytes + cost > MAX_BUFFERED_BYTES)
                && !f.window.is_empty()
                && f.failed.is_none()
            {
                f = self
                    .shared
                    .cv
                    .wait(f)
                    .map_err(|_| anyhow!("lock poisoned"))?;
            }
            if let Some(e) = &f.failed {
                bail!("{e}");
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
        self.batches
            .lock()
            .map_err(|_| anyhow!("lock poisoned"))?
            .push_back((start, batch));
        self.shared.send(ClientMsg::Entries(entries))
    }
}

impl EntrySink for Announcer {
    fn entry(&mut self, found: Found, entry: Entry) -> Result<()> {
        self.entries += 1;
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

    fn note(&mut self, what: String) {
        if self.shared.verbose {
            eprintln!("byteback-backup: {what}");
        }
    }
}

fn writer_loop(mut w: ConnWriter, rx: Receiver<Outgoing>, pool: &BufPool) -> Result<()> {
    loop {
        let Outgoing { msg, pooled } = match rx.try_recv() {
            Ok(m) => m,
            Err(TryRecvError::Empty) => {
                w.flush()?;
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let bye = matches!(msg, ClientMsg::Bye);
        w.send(&msg)?;
        if let ClientMsg::FileData { delta, .. } = msg {
            if pooled > 0 {
                pool.give(delta.data, pooled);
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
                let (start, batch) = batches
                    .lock()
                    .map_err(|_| anyhow!("lock poisoned"))?
                    .pop_front()
                    .ok_or_else(|| anyhow!("server answered a batch that was never sent"))?;
                let n = batch.len();
                let mut needed = vec![false; n];
                for need in &needs {
                    if let Some(x) = needed.get_mut(need.index as usize) {
                        *x = true;
                    }
                }
                {
                    let mut f = shared.flow.lock().map_err(|_| anyhow!("lock poisoned"))?;
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
                        },
                    );
                }
            }
            ServerMsg::Signature { id, sig } => {
                let waiter = shared
                    .sig_waiters
                    .lock()
                    .map_err(|_| anyhow!("lock poisoned"))?
                    .remove(&id);
                if let Some(w) = waiter {
                    let _ = w.send(sig);
                }
            }
            ServerMsg::FileOk { id } => {
                jobs.remove(&id);
                let mut f = shared.flow.lock().map_err(|_| anyhow!("lock poisoned"))?;
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
                    "{}: failed verification on the server; resending whole",
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
                    },
                );
            }
            ServerMsg::BackupDone {
                snapshot,
                message,
                stats,
            } => {
                let mut f = shared.flow.lock().map_err(|_| anyhow!("lock poisoned"))?;
                f.done = Some((snapshot, message, stats));
                shared.cv.notify_all();
                return Ok(());
            }
            m => bail!("unexpected {} during a backup", m.name()),
        }
    }
}

fn spawn_job(pool: &rayon::ThreadPool, shared: &Arc<Shared>, job: Job) {
    let shared = shared.clone();
    pool.spawn(move || {
        let id = job.id;
        if let Err(e) = send_file(&shared, job) {
            // The connection is gone or the protocol broke: the backup fails.
            shared.fail(format!("sending transfer {id}: {e:#}"));
        }
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
    let sig = if basis {
        let (stx, srx) = sync_channel(1);
        shared
            .sig_waiters
            .lock()
            .map_err(|_| anyhow!("lock poisoned"))?
            .insert(id, stx);
        shared.send(ClientMsg::SigRequest { id })?;
        let bytes = srx
            .recv()
            .map_err(|_| anyhow!("connection closed while waiting for a signature"))?;
        match Signature::parse(&bytes) {
            Ok(s) => Some(s),
            Err(e) => bail!("server sent a bad signature for {}: {e}", abs.display()),
        }
    } else {
        None
    };
    if shared.verbose {
        eprintln!("{}", abs.display());
    }
    let seg = sig
        .as_ref()
        .map(|s| segment_len(s.block_size() as usize))
        .unwrap_or(PLAIN_SEGMENT);
    let size = entry.size();
    // Sized to the file: a segment-sized buffer for every small file cost
    // more (allocating and zeroing 2 MiB) than everything else done for it.
    let seg_cap = seg.min(usize::try_from(size).unwrap_or(seg)).max(1);
    // Room for the data behind a literal header, or for a delta of it (at
    // most 14 bytes longer than the data), and for its compressed form.
    let buf_len = compress_bound(seg_cap + LITERAL_HEADER_MAX + 64);
    let mut hasher = FileHasher::new();
    let mut total = 0u64;
    while total < size {
        let want = seg.min((size - total) as usize);
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
        // Reads into the spare capacity: nothing to zero first.
        let read = (&mut file).take(want as u64).read_to_end(&mut data.buf);
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
        hasher.update(&data.buf[head..]);
        let counted = out.counted;
        let c = match (&sig, delta_buf) {
            (Some(s), Some(mut d)) => {
                let r = diff_segment_into(s, &data.buf, &mut d.buf)
                    .map_err(anyhow::Error::from)
                    .and_then(|_| compress(&d.buf, out.buf));
                shared.pool.give_back(d);
                r
            }
            _ => {
                // The literal delta, built in place around the data.
                let (h, hl) = literal_header(n as u64);
                data.buf[head - hl..head].copy_from_slice(&h[..hl]);
                data.buf.push(DELTA_END);
                compress(&data.buf[head - hl..], out.buf)
            }
        };
        shared.pool.give_back(data);
        let c = c?;
        shared
            .wire
            .fetch_add(c.data.len() as u64, Ordering::Relaxed);
        shared.send_pooled(ClientMsg::FileData { id, delta: c }, counted)?;
        total += n as u64;
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

    fn test_shared() -> (Shared, Receiver<Outgoing>) {
        let (tx, rx) = sync_channel::<Outgoing>(1024);
        let shared = Shared {
            flow: Mutex::new(Flow::default()),
            cv: Condvar::new(),
            tx,
            pool: BufPool::new(BUFFER_BUDGET),
            sig_waiters: Mutex::new(HashMap::new()),
            warnings: Mutex::new(vec![]),
            vanished: AtomicU64::new(0),
            partial: AtomicU64::new(0),
            wire: AtomicU64::new(0),
            verbose: false,
        };
        (shared, rx)
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

    /// The server goes away after the first batch of entries, while the
    /// writer thread waits for something to send: the backup fails instead
    /// of waiting for that thread forever.
    #[test]
    fn a_server_that_goes_away_fails_the_backup_without_hanging() {
        use byteback_protocol::{read_frame, write_msg, PROTOCOL_VERSION};
        use std::os::unix::net::UnixStream;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), b"content").unwrap();
        let (client, server) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(server.try_clone().unwrap());
            let mut w = server;
            read_frame(&mut r).unwrap().unwrap(); // Hello
            let hello = ServerMsg::HelloOk {
                version: PROTOCOL_VERSION,
                host: "h".into(),
            };
            write_msg(&mut w, &hello).unwrap();
            read_frame(&mut r).unwrap().unwrap(); // BackupStart
            write_msg(&mut w, &ServerMsg::BackupReady).unwrap();
            read_frame(&mut r).unwrap().unwrap(); // Entries
                                                  // Gone without a word.
        });
        let conn = Connection::handshake(
            Box::new(client.try_clone().unwrap()),
            Box::new(client),
            crate::conn::Transport::None,
        )
        .unwrap();
        let opts = BackupOptions {
            sources: vec![src],
            excludes: vec![],
            verbose: false,
            one_file_system: false,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run_backup(conn, &opts).map(|_| ()));
        });
        let res = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("run_backup hung after the server went away");
        assert!(res.is_err());
        fake.join().unwrap();
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
            }
        };
        let (f_job, g_job) = (job("f", 7), job("g", 8));
        std::fs::write(src.join("d/new"), b"NEW CONTENT, not what was walked").unwrap();
        std::fs::rename(src.join("d/new"), src.join("d/f")).unwrap();

        let (shared, rx) = test_shared();
        send_file(&shared, f_job).unwrap();
        let msgs: Vec<ClientMsg> = rx.try_iter().map(|o| o.msg).collect();
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
        let msgs: Vec<ClientMsg> = rx.try_iter().map(|o| o.msg).collect();
        assert!(
            matches!(msgs.last(), Some(ClientMsg::FileEnd { id: 8, size: 9, .. })),
            "{msgs:?}"
        );
        assert!(matches!(msgs[0], ClientMsg::FileData { id: 8, .. }));
        assert_eq!(shared.partial.load(Ordering::Relaxed), 1);
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

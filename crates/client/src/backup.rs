//! One backup, top to bottom: walk → announce entries → send what the server
//! needs, many files at once → commit.
//!
//! Three kinds of threads share the work: this thread walks and announces
//! entries in batches; a reader thread takes the server's replies and hands
//! files to a rayon pool, which reads each file in segments, diffs every
//! segment against the server's signature and queues compressed deltas; a
//! writer thread puts the queue on the wire. The queue is bounded and the
//! number of announced-but-unfinished files is capped, so memory stays
//! bounded whatever the number or size of the files.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{anyhow, bail, Result};
use byteback_delta::{diff_segment, literal_delta, FileHasher, Signature};
use byteback_protocol::codec::ChunkCompressor;
use byteback_protocol::limits::{MAX_BATCH, MAX_BUFFERED_BYTES, MAX_PENDING};
use byteback_protocol::{BackupStats, ClientMsg, Compressed, Entry, ServerMsg};

use crate::conn::{ConnReader, ConnWriter, Connection};
use crate::walk::{self, EntrySink, Excludes, WalkWarning};

/// Raw bytes of a segment when there is no basis.
const PLAIN_SEGMENT: usize = 2 << 20;
const ZSTD_LEVEL: i32 = 1;

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
}

/// Batches sent and not yet answered, with the absolute path of each entry.
type Batches = Mutex<VecDeque<(u64, Vec<(PathBuf, Entry)>)>>;

struct Job {
    id: u32,
    abs: PathBuf,
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

struct Shared {
    flow: Mutex<Flow>,
    cv: Condvar,
    tx: SyncSender<ClientMsg>,
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
        self.tx
            .send(msg)
            .map_err(|_| anyhow!("connection to the server is closed"))
    }
}

/// Runs one backup over an open connection.
pub fn run_backup(mut conn: Connection, opts: &BackupOptions) -> Result<BackupReport> {
    let sources = walk::normalise_sources(&opts.sources)?;
    let excludes = Excludes::new(&opts.excludes)?;
    conn.send(&ClientMsg::BackupStart { checksum: false })?;
    match conn.recv()? {
        ServerMsg::BackupReady => {}
        m => bail!("unexpected {} at backup start", m.name()),
    }
    let transport = conn.take_transport();
    let Connection { reader, writer, .. } = conn;
    let (tx, rx) = sync_channel::<ClientMsg>(4);
    let shared = Arc::new(Shared {
        flow: Mutex::new(Flow::default()),
        cv: Condvar::new(),
        tx,
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
        if let Err(e) = writer_loop(writer, rx) {
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
    let walked = walk::walk(&sources, &excludes, &mut announcer).and_then(|_| announcer.flush());
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
    batch: Vec<(PathBuf, Entry)>,
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
    fn entry(&mut self, abs: PathBuf, entry: Entry) -> Result<()> {
        self.entries += 1;
        let cost = entry.buffer_cost();
        if !self.batch.is_empty() && self.batch_cost + cost > MAX_BUFFERED_BYTES / 4 {
            self.flush()?;
        }
        self.batch_cost += cost;
        self.batch.push((abs, entry));
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
}

fn writer_loop(mut w: ConnWriter, rx: Receiver<ClientMsg>) -> Result<()> {
    loop {
        let msg = match rx.try_recv() {
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
    let mut jobs: HashMap<u32, (PathBuf, Entry)> = HashMap::new();
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
                let mut batch: Vec<Option<(PathBuf, Entry)>> =
                    batch.into_iter().map(Some).collect();
                for need in needs {
                    let (abs, entry) = batch
                        .get_mut(need.index as usize)
                        .and_then(Option::take)
                        .ok_or_else(|| anyhow!("bad need index"))?;
                    jobs.insert(need.id, (abs.clone(), entry.clone()));
                    spawn_job(
                        pool,
                        shared,
                        Job {
                            id: need.id,
                            abs,
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
                let (abs, entry) = jobs
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| anyhow!("retry for unknown file {id}"))?;
                shared.warn(format!(
                    "{}: failed verification on the server; resending whole",
                    abs.display()
                ));
                spawn_job(
                    pool,
                    shared,
                    Job {
                        id,
                        abs,
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

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn send_file(shared: &Shared, job: Job) -> Result<()> {
    let Job {
        id,
        abs,
        entry,
        basis,
    } = job;
    let mut file = match open_nofollow(&abs) {
        Ok(f) => f,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::NotFound {
                shared.vanished.fetch_add(1, Ordering::Relaxed);
                shared.warn(format!("{}: vanished during the backup", abs.display()));
            } else {
                shared.partial.fetch_add(1, Ordering::Relaxed);
                shared.warn(format!("{}: {e}", abs.display()));
            }
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
    let mut buf = vec![0u8; seg.min(usize::try_from(size).unwrap_or(seg)).max(1)];
    let mut hasher = FileHasher::new();
    let mut total = 0u64;
    while total < size {
        let want = seg.min((size - total) as usize);
        let n = match read_full(&mut file, &mut buf[..want]) {
            Ok(n) => n,
            Err(e) => {
                shared.partial.fetch_add(1, Ordering::Relaxed);
                shared.warn(format!("{}: read error: {e}", abs.display()));
                return shared.send(ClientMsg::FileAbort { id });
            }
        };
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        hasher.update(data);
        let delta = match &sig {
            Some(s) => diff_segment(s, data)?,
            None => literal_delta(data),
        };
        let c = compress(&delta)?;
        shared
            .wire
            .fetch_add(c.data.len() as u64, Ordering::Relaxed);
        shared.send(ClientMsg::FileData { id, delta: c })?;
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

fn compress(delta: &[u8]) -> Result<Compressed> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = match &mut *c {
            Some(c) => c,
            None => c.insert(ChunkCompressor::new(ZSTD_LEVEL)?),
        };
        Ok(c.compress(delta)?)
    })
}

fn open_nofollow(p: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(p)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no longer a regular file",
        ));
    }
    Ok(f)
}

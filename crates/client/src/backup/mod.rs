//! One backup, top to bottom: walk → announce entries → send what the server
//! needs, many files at once → commit → shut down.
//!
//! Three kinds of threads share the work: this thread walks and announces
//! entries in batches ([`announce`]); a reader thread takes the server's
//! replies and hands files to a rayon pool ([`wire`]), which reads each file
//! in segments, diffs every segment against the server's signature and
//! queues compressed deltas ([`send`]); a writer thread puts the queue
//! ([`queue`]) on the wire. Every segment buffer comes from one byte-budgeted
//! [`pool::BufPool`], and the number of announced-but-unfinished files is
//! capped, so memory stays bounded whatever the number or size of the files.
//!
//! However it ends, a backup ends in [`shut_down`]: a failure anywhere goes
//! through [`shared::Shared::fail`], which wakes every waiter and tears the
//! connection down, and `shut_down` then waits for every thread and job.

mod announce;
pub mod cache;
mod direct;
mod pool;
mod queue;
mod send;
mod shared;
mod wire;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{bail, err, Result};
use byteback_protocol::{BackupStats, ClientMsg, ServerMsg};

use crate::conn::{self, Connection, Transport};
use crate::progress::BACKUP as PROGRESS;
use crate::walk::{self, Excludes};
use announce::Announcer;
use shared::{start_thread, Batches, Committed, Policy, Shared, STOP_WAIT};

/// Most bytes of segment buffers (file data, deltas, compressed chunks in
/// the delta workers or queued for the writer) held at once.
const BUFFER_BUDGET: usize = 24 << 20;
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
    /// Bytes of deltas put on the wire (compressed unless `--compress` says not to).
    pub wire_bytes: u64,
    /// Bytes of deltas compressed (before compression).
    pub compressed_raw: u64,
    /// Bytes of deltas stored as they were (see `--compress`; incompressible
    /// ones too).
    pub stored_raw: u64,
    /// Entries that went in runs of unchanged ones (see [`cache`]).
    pub unchanged: u64,
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
    /// When file data is compressed (`--compress`).
    pub compress: Compress,
    /// The record of the last backup to this destination (see [`cache`]).
    pub record: Option<PathBuf>,
    /// Compare files by content too (`--checksum`): every file whose size
    /// and mtime match its stored copy is read and its BLAKE3 offered.
    pub checksum: bool,
    /// When the run must end (`--max-time`), if ever.
    pub deadline: Option<Deadline>,
}

/// The end of a run's time (`--max-time`).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// When.
    pub at: Instant,
    /// `--max-time`, for messages.
    pub secs: u64,
}

/// When file data is compressed on its way to the server (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compress {
    /// Over SSH; not for a local store, whose bytes do not leave this
    /// machine (compressing them would only cost CPU, on both sides).
    #[default]
    Auto,
    /// Always (zstd level -1; data that does not shrink is stored).
    Always,
    /// Never.
    Never,
}

/// What the walk works on, set up before any thread starts.
struct Started {
    sources: Vec<PathBuf>,
    excludes: Excludes,
    pool: rayon::ThreadPool,
    /// The server's manifest's generation.
    generation: Option<[u8; 32]>,
}

/// Runs one backup over an open connection.
///
/// Whatever goes wrong (the server reports an error, dies or is killed, a
/// file cannot be sent, the walk fails), the backup stops through
/// [`Shared::fail`], every thread and job ends, the server is stopped, and
/// the error names the first cause; nothing is left waiting.
pub fn run_backup(mut conn: Connection, opts: &BackupOptions) -> Result<BackupReport> {
    PROGRESS.reset();
    let started = {
        // A stop (see `stop`) while the server prepares tears it down; so
        // does the end of the run's time (`--max-time`).
        let breaker = conn.breaker();
        let _abort = crate::stop::abort_while(move || breaker.trip());
        let limit = opts.deadline.map(|d| {
            conn::Deadline::start(
                d.at.saturating_duration_since(Instant::now()),
                conn.breaker(),
            )
        });
        start(&mut conn, opts).map_err(|e| match (&limit, opts.deadline) {
            (Some(l), Some(d)) if l.passed() => e.context(out_of_time(d)),
            _ => e,
        })
    };
    let transport = conn.take_transport();
    let Started {
        sources,
        excludes,
        pool,
        generation,
    } = match started {
        Ok(x) => x,
        Err(e) => {
            let how = transport.abort();
            return Err(conn::with_exit(e, how));
        }
    };
    let Connection { reader, writer, .. } = conn;
    let policy = match (opts.compress, &transport) {
        (Compress::Never, _) | (Compress::Auto, Transport::Child(..)) => Policy::Never,
        _ => Policy::Always,
    };
    let shared = Arc::new(Shared::new(
        transport.breaker(),
        QUEUE_DEPTH,
        BUFFER_BUDGET,
        opts.verbose,
        policy,
    ));
    // A stop by a signal (see `stop`) tears the transfer down as an error
    // does: every thread ends, the connection is closed.
    crate::stop::set_abort(Some(Box::new({
        let shared = shared.clone();
        move || {
            let sig = crate::stop::stopped().unwrap_or(libc::SIGTERM);
            shared.fail(&err!("{}", crate::stop::message(sig)));
        }
    })));
    let over = AttemptOver(Arc::new(AtomicBool::new(false)));
    watch_for_a_stuck_attempt(shared.clone(), over.0.clone(), opts.deadline);
    let batches: Arc<Batches> = Arc::new(Mutex::new(VecDeque::new()));
    let pool = Arc::new(pool);

    let mut threads = vec![];
    let reader_batches = batches.clone();
    let reader_pool = pool.clone();
    let outcome = start_thread(&shared, "byteback-writer", move |shared| {
        wire::writer_loop(writer, shared)
    })
    .and_then(|t| {
        threads.push(t);
        start_thread(&shared, "byteback-reader", move |shared| {
            wire::reader_loop(reader, shared, &reader_batches, &reader_pool)
        })
    })
    .and_then(|t| {
        threads.push(t);
        let (old, new) = records(opts.record.as_deref(), generation);
        // Checksum mode announces every entry, so the server can ask for
        // the content of each file it would keep; the record is still made.
        let old = old.filter(|_| !opts.checksum);
        walk_and_commit(&shared, batches, &sources, &excludes, opts, old, new)
    });
    let done = shut_down(shared, pool, threads, transport, outcome);
    crate::stop::set_abort(None);
    drop(over);
    done
}

/// Why a run past its `--max-time` failed.
fn out_of_time(d: Deadline) -> String {
    format!(
        "the backup ran for more than {} s (--max-time); giving up (the next run resumes it)",
        d.secs
    )
}

/// Set when an attempt has ended (dropped), for its watchdog.
struct AttemptOver(Arc<AtomicBool>);

impl Drop for AttemptOver {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How long a failed attempt has to end before its watchdog ends the run.
const STUCK_LIMIT: Duration = Duration::from_secs(120);

/// [`STUCK_LIMIT`]; in a debug build, for the tests,
/// `$BYTEBACK_TEST_STUCK_LIMIT_SECS` if set.
fn stuck_limit() -> std::time::Duration {
    crate::test_knob("BYTEBACK_TEST_STUCK_LIMIT_SECS", STUCK_LIMIT)
}

/// Once the attempt has failed (`--io-timeout`, an error), every thread
/// is woken and the connection torn down, but a thread in a system call
/// that does not return (the walk listing a directory of a filesystem
/// that stopped answering) cannot be: if the attempt has not ended
/// (`over`) [`STUCK_LIMIT`] after its failure, the run ends without it,
/// saying why, its post-backup hooks run (see [`crate::stop::give_up`]).
/// Before, such a run never ended, holding its locks. A stop by a signal
/// has a fallback of its own. Past the run's `deadline` (`--max-time`),
/// the attempt fails, however its server trickles data.
fn watch_for_a_stuck_attempt(
    shared: Arc<Shared>,
    over: Arc<AtomicBool>,
    deadline: Option<Deadline>,
) {
    let nap = Duration::from_millis(100);
    let spawned = std::thread::Builder::new()
        .name("byteback-watch".into())
        .spawn(move || {
            while !shared.stopped() {
                if over.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(d) = deadline.filter(|d| Instant::now() >= d.at) {
                    shared.fail(&err!("{}", out_of_time(d)));
                }
                std::thread::sleep(nap);
            }
            let (failed_at, limit) = (Instant::now(), stuck_limit());
            while !over.load(Ordering::SeqCst) {
                if crate::stop::stopped().is_some() {
                    return;
                }
                if failed_at.elapsed() >= limit {
                    let cause = shared.failure().map(|f| f.0).unwrap_or_default();
                    let msg = format!(
                        "{cause}; the backup did not stop within {} s of that (a source \
                         filesystem that does not answer?): ending the run without it",
                        limit.as_secs()
                    );
                    crate::stop::give_up(1, &msg, &msg);
                    return;
                }
                std::thread::sleep(nap);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the watchdog of a stuck backup: {e}");
    }
}

/// Checks the sources and asks the server to start; nothing runs yet.
fn start(conn: &mut Connection, opts: &BackupOptions) -> Result<Started> {
    // Checked before the first attempt (a source that does not exist is a
    // usage error there); one gone since is no reason not to retry.
    let sources = walk::normalise_sources(&opts.sources).map_err(|e| err!("{e:#}"))?;
    let excludes = Excludes::new(&opts.excludes)?;
    // The walk holds a directory fd per level of depth.
    walk::raise_fd_limit();
    conn.send(&ClientMsg::BackupStart {
        checksum: opts.checksum,
    })?;
    let generation = match conn.recv()? {
        ServerMsg::BackupReady { generation } => generation,
        m => bail!("unexpected {} at backup start", m.name()),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    // One allocator arena per two delta threads, before they start.
    byteback_protocol::os::bounded_heap(cores);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cores * 2)
        .thread_name(|i| format!("byteback-delta-{i}"))
        .build()
        .map_err(|e| err!("cannot start the delta threads: {e}"))?;
    Ok(Started {
        sources,
        excludes,
        pool,
        generation,
    })
}

/// The record of the last backup at `path`, if the server's manifest is
/// the one it records (`generation`), and this backup's. Neither is needed
/// for a backup: a record that cannot be read or written is said and
/// left out.
fn records(
    path: Option<&std::path::Path>,
    generation: Option<[u8; 32]>,
) -> (Option<cache::OldRecord>, Option<cache::NewRecord>) {
    let Some(path) = path else {
        return (None, None);
    };
    let old = match generation.map(|g| cache::OldRecord::open(path, &g)) {
        Some(Ok(old)) => old,
        Some(Err(e)) => {
            tracing::warn!(
                "cannot read the record of the last backup {}: {e}; every entry is sent",
                path.display()
            );
            None
        }
        None => None,
    };
    tracing::debug!(
        "record of the last backup {}: {}",
        path.display(),
        match (&old, generation) {
            (Some(_), _) => "matches the server's manifest",
            (None, Some(_)) => "missing or for another manifest",
            (None, None) => "not usable (the server offers no generation)",
        }
    );
    let new = match cache::NewRecord::create(path) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(
                "cannot write the record of this backup at {}: {e}; the next backup sends every entry",
                path.display()
            );
            None
        }
    };
    (old, new)
}

/// This thread's part: walks and announces every entry, waits until each
/// is resolved, then commits. Returns the server's answer and the number of
/// entries found.
fn walk_and_commit(
    shared: &Arc<Shared>,
    batches: Arc<Batches>,
    sources: &[PathBuf],
    excludes: &Excludes,
    opts: &BackupOptions,
    old: Option<cache::OldRecord>,
    new: Option<cache::NewRecord>,
) -> Result<(Committed, u64, u64)> {
    let announcer = Announcer::new(shared.clone(), batches, old.is_some(), new);
    let walk_opts = walk::WalkOptions {
        one_file_system: opts.one_file_system,
        filter: opts.filter.clone(),
        nested: walk::nested_sources(&opts.sources)?,
    };
    let mut announcer = announce::walk_into(shared, announcer, old, |feeder| {
        walk::walk(sources, excludes, walk_opts, feeder)
    })?;
    PROGRESS.walk_finished();
    if announcer.vouched > 0 {
        tracing::debug!(
            "extended attributes of {} entries not read: unchanged since the record of the last backup (inode, ctime and metadata as recorded)",
            announcer.vouched
        );
    }
    // Wait until every file is resolved, then commit.
    drop(shared.wait_flow(|f| f.window.is_empty())?);
    shared.send(ClientMsg::BackupEnd)?;
    let mut f = shared.wait_flow(|f| f.done.is_some())?;
    let done = f.done.take().ok_or_else(|| err!("no result"))?;
    drop(f);
    if let Some(new) = announcer.new.take() {
        match new.finish(done.generation) {
            Ok(kept) => tracing::debug!(
                "record of this backup {}",
                if kept {
                    "kept"
                } else {
                    "not kept: the server's manifest differs from what was announced"
                }
            ),
            Err(e) => tracing::warn!("cannot keep the record of this backup: {e}"),
        }
    }
    Ok((done, announcer.entries, announcer.unchanged))
}

/// The one way a backup ends, whatever happened: says goodbye after a
/// commit, or stops everything after a failure; then waits (at most
/// [`STOP_WAIT`]) for every thread and job, and for the server.
fn shut_down(
    shared: Arc<Shared>,
    pool: Arc<rayon::ThreadPool>,
    threads: Vec<JoinHandle<()>>,
    transport: Transport,
    outcome: Result<(Committed, u64, u64)>,
) -> Result<BackupReport> {
    let (committed, entries, unchanged) = match outcome {
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
            join(threads, ended, "some threads of the failed backup");
            // How the server ended only matters when it did not say why.
            let how = how.filter(|_| !from_server);
            return Err(conn::with_exit(err!("{cause}"), how));
        }
    };
    // The writer ends after Bye, the reader after BackupDone, jobs before
    // the window emptied.
    if !join(
        threads,
        shared.wait_ended(STOP_WAIT),
        "the connection's threads",
    ) {
        shared.breaker.trip();
    }
    if let Some((cause, _)) = shared.failure() {
        // Already committed: only saying goodbye went wrong.
        tracing::warn!("after the backup: {cause}");
    }
    let report = BackupReport {
        stats: committed.stats,
        snapshot: committed.snapshot,
        message: committed.message,
        entries,
        warnings: shared.take_warnings(),
        vanished: shared.vanished.load(Ordering::Relaxed),
        partial: shared.partial.load(Ordering::Relaxed),
        wire_bytes: shared.wire.load(Ordering::Relaxed),
        compressed_raw: shared.compressed_raw.load(Ordering::Relaxed),
        stored_raw: shared.stored_raw.load(Ordering::Relaxed),
        unchanged,
    };
    tracing::debug!(
        "deltas: {} bytes compressed, {} stored as they were (compression {:?})",
        report.compressed_raw,
        report.stored_raw,
        shared.compress
    );
    drop(shared);
    drop(pool);
    let partial = report.partial.saturating_add(report.stats.left_out) > 0;
    crate::stop::committed(if partial { 24 } else { 0 }, report.snapshot.clone());
    // The snapshot is taken: a server that ends badly now (or not at all)
    // costs a warning, never the backup or a retry of it.
    if let Err(e) = transport.finish_after_commit() {
        tracing::warn!("after the backup: {e:#}");
    }
    Ok(report)
}

/// Joins the threads if they all `ended`, or warns that `which` had not;
/// returns `ended`.
fn join(threads: Vec<JoinHandle<()>>, ended: bool, which: &str) -> bool {
    if ended {
        for t in threads {
            let _ = t.join();
        }
    } else {
        tracing::warn!("{which} had not ended after {} s", STOP_WAIT.as_secs());
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Transport;
    use byteback_protocol::{decode_client, read_frame, write_msg, Need};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

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
            send(&mut theirs, &ServerMsg::BackupReady { generation: None });
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
            compress: Compress::Auto,
            record: None,
            checksum: false,
            deadline: None,
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

    /// Asks for entry `index` of the batch as transfer 0.
    fn need(s: &mut UnixStream, index: u32, basis: bool) {
        need_hash(s, index, basis, false);
    }

    /// [`need`], asking for the file's hash first when `twin`.
    fn need_hash(s: &mut UnixStream, index: u32, basis: bool, twin: bool) {
        send(
            s,
            &ServerMsg::Needs(vec![Need {
                index,
                id: 0,
                basis,
                twin,
            }]),
        );
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

    /// Only a regular file's data is sent: a need for a directory (or a
    /// device, a FIFO) is the server's error, and nothing is opened.
    #[test]
    fn a_need_for_anything_but_a_regular_file_ends_the_backup() {
        let (r, _) = backup_against(|s| {
            let batch = match recv(s) {
                Some(ClientMsg::Entries(e)) => e,
                m => panic!("expected entries, got {m:?}"),
            };
            let index = batch
                .iter()
                .position(|e| e.kind == byteback_protocol::Kind::Dir)
                .unwrap() as u32;
            need(s, index, false);
        });
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("which is not a regular file"), "{e}");
    }

    /// A need asking for the hash of a moved or copied file smaller than
    /// such files are looked for ends the backup (each file would be read
    /// twice); with a basis (checksum mode, a taken-over 1.x `current`,
    /// after a crash) any size is asked for, and the file is offered.
    #[test]
    fn a_need_for_a_hash_no_honest_server_asks_ends_the_backup() {
        let (r, _) = backup_against(|s| {
            let index = entries(s);
            need_hash(s, index, false, true);
        });
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("(100000 bytes), under the 1048576 bytes"), "{e}");
        let (r, _) = backup_against(|s| {
            let index = entries(s);
            need_hash(s, index, true, true);
            assert!(matches!(recv(s), Some(ClientMsg::FileClone { id: 0, .. })));
            send(
                s,
                &ServerMsg::Error {
                    message: "enough".into(),
                },
            );
        });
        assert_eq!(format!("{:#}", r.unwrap_err()), "server: enough");
    }

    /// A server asking for the same file again and again is refused after
    /// 16 resends instead of keeping the backup going for ever.
    #[test]
    fn a_server_asking_for_a_file_again_without_end_is_refused() {
        let (r, _) = backup_against(|s| {
            let index = entries(s);
            need(s, index, false);
            for _ in 0..17 {
                loop {
                    match recv(s) {
                        Some(ClientMsg::FileEnd { .. }) => break,
                        Some(_) => {}
                        None => return,
                    }
                }
                send(s, &ServerMsg::FileRetry { id: 0 });
            }
        });
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("again 16 times; giving up"), "{e}");
    }

    /// A signature header with strong hashes of `strong` bytes and
    /// `blocks` blocks (of zeros).
    fn sig(strong: u32, blocks: usize) -> Vec<u8> {
        let mut v = vec![];
        v.extend_from_slice(&0x7273_0136u32.to_be_bytes());
        v.extend_from_slice(&512u32.to_be_bytes());
        v.extend_from_slice(&strong.to_be_bytes());
        v.resize(12 + blocks * (4 + strong as usize), 0);
        v
    }

    /// A signature without strong hashes (any rolling checksum hit would
    /// be a match) is refused (the backup fails, as for any bad one);
    /// ours, of 6 bytes or more, pass.
    #[test]
    fn a_signature_of_too_short_hashes_is_refused() {
        for strong in [0, 5] {
            let e = send::sig_shape_ok(&sig(strong, 100)).unwrap_err();
            assert!(
                e.contains(&format!("strong hashes of {strong} bytes, fewer than 6")),
                "{e}"
            );
        }
        for strong in [6, 8, 16] {
            assert_eq!(send::sig_shape_ok(&sig(strong, 100_000)), Ok(()));
        }
        // A server's: full MD4s cut for the wire, down to 6 bytes.
        let full = byteback_delta::signature(&vec![3u8; 100_000]).0;
        let honest = byteback_delta::shorten_signature(full, byteback_delta::wire_strong_len(1));
        assert_eq!(
            byteback_delta::signature_shape(&honest).map(|s| s.0),
            Some(6)
        );
        assert_eq!(send::sig_shape_ok(&honest), Ok(()));
    }

    #[test]
    fn a_job_waiting_for_a_signature_ends_with_the_backup() {
        let (r, took) = backup_against(|s| {
            let index = entries(s);
            need(s, index, true);
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
}

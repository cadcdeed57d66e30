//! Serving one backup: the host's lock, the receiver (see
//! [`crate::backup`]), its message loop, and after the commit the
//! snapshot, the reply, the usage line and the prune. Running out of space
//! writing a file is answered here: idle partial copies go, then
//! snapshots, then the file is sent again (creating and renaming, which
//! need metadata space, make room where they are: see `backup::room`).

use std::collections::VecDeque;
use std::io::{Read, Write};

use byteback_protocol::limits::{window_within_caps, MAX_BUFFERED_BYTES, MAX_PENDING};
use byteback_protocol::{ClientMsg, Entry, ProtocolError, ServerMsg};

use super::{refused, Conn, ServeConfig};
use crate::backup::{BackupReceiver, Chunk, Room, TransferResult};
use crate::config::StoreConfig;
use crate::error::{shown, Context, Error, Result};
use crate::store::{HostStore, Store};
use crate::time;

/// What one backup runs against.
struct Target<'a> {
    cfg: &'a ServeConfig,
    store: &'a Store,
    host: &'a HostStore,
    config: &'a StoreConfig,
}

impl Target<'_> {
    fn now(&self) -> i64 {
        self.cfg.now.unwrap_or_else(time::now)
    }
}

/// Serves a backup after `BackupStart`, until its `BackupDone`.
pub(super) fn backup<R: Read, W: Write>(
    cfg: &ServeConfig,
    store: &Store,
    conn: &mut Conn<R, W>,
    checksum: bool,
) -> Result<()> {
    let config = StoreConfig::load(&cfg.store)?;
    if config.max_session > 0 {
        let limit = std::time::Duration::from_secs(config.max_session.unsigned_abs());
        cfg.clock.start(limit);
        crate::timed::start_backup_deadline(limit);
    }
    let host = store.host(&cfg.host, true)?;
    let lock = host.lock()?;
    if let Err(e) = crate::pruner::name_lost_snapshot(&host) {
        tracing::warn!("cannot look for a snapshot the usage log lost: {e}");
    }
    let room = Room::new(store, &host, &config, cfg.now)?;
    let mut rx = BackupReceiver::new(&host, Some(room))?;
    rx.set_checksum(checksum);
    match rx.clean_leftovers_if_short(config.minpercent) {
        Ok(Some(note)) => eprintln!("byteback-server: {note}"),
        Ok(None) => {}
        Err(e) => return Err(rx.after_no_space(e)),
    }
    conn.send(&ServerMsg::BackupReady {
        generation: rx.generation(),
    })?;
    let target = Target {
        cfg,
        store,
        host: &host,
        config: &config,
    };
    let e = match receive(&target, conn, &mut rx) {
        Ok(prune) => {
            // The prune after the snapshot (minutes, each deletion waiting
            // for btrfs) runs without the host's lock: it needs the store's
            // prune lock only, and the host's restores of current, its
            // verify and its next backup need not wait for it. What the
            // receiver holds goes first (it has no transfer left).
            drop(rx);
            drop(lock);
            if let Some(p) = prune {
                slow_prune_fault();
                crate::pruner::after_snapshot(store, &config, p.now, p.only_host);
            }
            return Ok(());
        }
        Err(e) => e,
    };
    // What it wrote stays for the next run to resume from: the growth
    // guard counts it (a client cutting its runs short must not
    // write without limit, unseen). What the log has and was thrown
    // away is not (the next run writes it again, counted then), nor
    // the new manifest, which goes now (the next run starts its own).
    rx.abandon_manifest();
    settle_credit(&host, target.now(), &mut rx);
    if rx.unrecorded() > 0 {
        match crate::pruner::record_written(&host, target.now(), rx.unrecorded(), None) {
            // Counted once: the deletion on the way out reads it there.
            Ok(()) => rx.recorded(),
            Err(e2) => tracing::error!("cannot record the interrupted backup's usage: {e2}"),
        }
    }
    if rx.manifest_damaged() {
        return Err(match rx.set_aside_manifest() {
            Ok(()) => e.context(
                "the manifest of current was set aside; the next backup recovers one from the newest snapshot",
            ),
            Err(e2) => e.context(format!("and the damaged manifest could not be set aside: {e2}")),
        });
    }
    Err(rx.after_no_space(e))
}

/// Tells the usage log of bytes it has from this backup's notes that were
/// thrown away and not written again (a transfer that ran out of space),
/// so they do not count twice with the next backup's.
fn settle_credit(host: &crate::store::HostStore, now: i64, rx: &mut BackupReceiver) {
    let over = rx.overcounted();
    if over == 0 {
        return;
    }
    match crate::pruner::record_credit(host, now, over) {
        Ok(()) => rx.credited(),
        Err(e) => tracing::error!("cannot record usage: {e}"),
    }
}

/// Bytes a backup writes between the lines the usage log gets while it
/// runs (see [`note_growth`]).
const GROWTH_NOTE: u64 = 256 << 20;

/// What a backup running now has written (file data, and the objects its
/// entries create) goes to its host's usage log every [`GROWTH_NOTE`]
/// bytes, as a line without a snapshot marked `running` (which the report
/// folds into the backup's next line): the growth guard of a prune that
/// another host's backup starts meanwhile counts it. It saw a backup's
/// growth only once the backup had committed or was cut off, so one host
/// uploading a giant tree while others' backups ended let their prunes
/// delete other hosts' history for it. `next`: the unrecorded bytes that
/// call for a line (raised after a failed append, so a full disc costs a
/// warning per [`GROWTH_NOTE`], not one per message).
fn note_growth(target: &Target, rx: &mut BackupReceiver, next: &mut u64) {
    let every = if cfg!(debug_assertions) {
        std::env::var("BYTEBACK_TEST_GROWTH_NOTE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(GROWTH_NOTE)
    } else {
        GROWTH_NOTE
    };
    let unrecorded = rx.unrecorded();
    if unrecorded < (*next).max(every) {
        return;
    }
    match crate::pruner::record_running(target.host, target.now(), unrecorded) {
        Ok(()) => {
            rx.recorded();
            *next = every;
        }
        // Still counted in memory, and recorded at the commit.
        Err(e) => {
            tracing::warn!("cannot record usage: {e}");
            *next = unrecorded.saturating_add(every);
        }
    }
}

/// The message loop of one backup, until the snapshot is taken. Errors
/// about one transfer name its file and what was being done.
fn receive<R: Read, W: Write>(
    target: &Target,
    conn: &mut Conn<R, W>,
    rx: &mut BackupReceiver,
) -> Result<Option<PruneAfter>> {
    let budget = fd_budget();
    // Room for an honest client's files in flight even under a low limit;
    // beyond the budget (or that), a client starting every file it was
    // asked for at once is refused.
    rx.limit_held_fds(budget.max(FILES_IN_FLIGHT * FDS_PER_FILE));
    // Batches of entries not answered yet (bounded by the client's window).
    let mut waiting = Waiting::default();
    let mut next_note = 0;
    loop {
        answer_waiting(conn, rx, &mut waiting, budget)?;
        note_growth(target, rx, &mut next_note);
        let msg = conn
            .recv()?
            .ok_or_else(|| refused("client went away in the middle of a backup"))?;
        match msg {
            ClientMsg::Entries(entries) => waiting.push(Batch::Entries(entries))?,
            ClientMsg::Unchanged { count, digest } => {
                waiting.push(Batch::Unchanged { count, digest })?
            }
            ClientMsg::KeepUnread { path } => waiting.push(Batch::KeepUnread(path))?,
            ClientMsg::SigRequest { id } => {
                let name = rx.transfer_name(id);
                let sig = rx.signature(id).context_with(|| {
                    format!("starting {name} (its basis, signature and rebuild)")
                })?;
                conn.send(&ServerMsg::Signature { id, sig })?;
            }
            ClientMsg::FileData { id, delta } => {
                let name = rx.transfer_name(id);
                rx.data(id, Chunk::Zstd(&delta))
                    .context_with(|| format!("writing {name}"))?;
            }
            ClientMsg::FileRaw { id, delta } => {
                let name = rx.transfer_name(id);
                rx.data(id, Chunk::Raw(delta.as_slice()))
                    .context_with(|| format!("writing {name}"))?;
                // The frame buffer it was read into, for the next frame.
                conn.give_back_frame(delta.into_buf());
            }
            ClientMsg::FileEnd {
                id,
                size,
                hash,
                mtime_sec,
                mtime_nsec,
            } => {
                let reply = end_file(target, rx, id, size, hash, (mtime_sec, mtime_nsec))?;
                conn.send(&reply)?;
            }
            ClientMsg::FileClone {
                id,
                size,
                hash,
                mtime_sec,
                mtime_nsec,
            } => {
                let name = rx.transfer_name(id);
                let cloned = rx
                    .offer(id, size, hash, (mtime_sec, mtime_nsec))
                    .context_with(|| format!("cloning a stored copy for {name}"))?;
                conn.send(&if cloned {
                    ServerMsg::FileOk { id }
                } else {
                    ServerMsg::SendData { id }
                })?;
            }
            ClientMsg::FileAbort { id } => {
                let name = rx.transfer_name(id);
                rx.abort(id)
                    .context_with(|| format!("giving up on {name}"))?;
                conn.send(&ServerMsg::FileOk { id })?;
            }
            ClientMsg::BackupEnd => return finish(target, conn, rx),
            m => return Err(refused(format!("unexpected {} during a backup", m.name()))),
        }
    }
}

/// Ends transfer `id` and says what the client is to do next: nothing
/// (`FileOk`) or send the file again (`FileRetry`), after making room
/// where writing it ran out of space.
fn end_file(
    target: &Target,
    rx: &mut BackupReceiver,
    id: u32,
    size: u64,
    hash: [u8; 32],
    mtime: (i64, u32),
) -> Result<ServerMsg> {
    let name = rx.transfer_name(id);
    let ended = rx
        .end(id, size, hash, mtime)
        .context_with(|| format!("finishing {name}"))?;
    Ok(match ended {
        TransferResult::Done => ServerMsg::FileOk { id },
        TransferResult::Retry => ServerMsg::FileRetry { id },
        TransferResult::NoSpace { path, need, quota } => {
            make_room(target, rx, &path, need, quota)?;
            ServerMsg::FileRetry { id }
        }
    })
}

/// Descriptors a file in flight may hold.
const FDS_PER_FILE: usize = crate::backup::FDS_PER_TRANSFER;
/// Files in flight an honest client may have at once: one per delta
/// thread (at most 16), the rest for files waiting for a resend.
const FILES_IN_FLIGHT: usize = 64;
/// Descriptors kept for everything else (the directory chain, the
/// manifests, the store's own files).
const FDS_RESERVED: usize = 512;

/// Descriptors the transfers may hold: the open-file limit (already raised
/// to the hard limit) less [`FDS_RESERVED`]. A limit too low for the files
/// a client has in flight is said once; batches of entries are then
/// answered only while the files in flight leave room for one more (or
/// none is open).
fn fd_budget() -> usize {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let soft = lim
        .current
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let budget = soft.saturating_sub(FDS_RESERVED);
    let need = FILES_IN_FLIGHT * FDS_PER_FILE;
    if budget < need {
        tracing::warn!(
            "the open-file limit is {soft}: the {FILES_IN_FLIGHT} files a backup may have in flight may need more (each holds its rebuild, the stored copy and an earlier rebuild); raise it (nofile, LimitNOFILE=) to at least {}",
            need + FDS_RESERVED
        );
    }
    budget
}

/// Answers the waiting batches of entries, oldest first, while the files
/// in flight leave room under `budget` for one more (or none is open). A
/// transfer opens its files when it starts (its signature asked for, or
/// its first data), so its entry costs no descriptor, and an honest
/// client's files in flight are bounded by its delta threads; this only
/// slows a backup under a very low limit. The client goes on sending the
/// files already needed, and each one finished makes room.
fn answer_waiting<R: Read, W: Write>(
    conn: &mut Conn<R, W>,
    rx: &mut BackupReceiver,
    waiting: &mut Waiting,
    budget: usize,
) -> Result<()> {
    while !waiting.batches.is_empty() {
        let held = rx.files_held();
        if held > 0 && held + FDS_PER_FILE > budget {
            break;
        }
        let needs = match waiting.pop() {
            Some(Batch::Entries(batch)) => rx.entries(batch)?,
            Some(Batch::Unchanged { count, digest }) => {
                rx.unchanged(count, &digest)?;
                vec![]
            }
            Some(Batch::KeepUnread(path)) => {
                rx.keep_unread(&path).context_with(|| {
                    format!("keeping {} (unreadable on the client)", shown(&path))
                })?;
                vec![]
            }
            None => break,
        };
        conn.send(&ServerMsg::Needs(needs))?;
    }
    Ok(())
}

/// Batches of entries waiting for their answer, and what they hold.
#[derive(Default)]
struct Waiting {
    /// Each with its entries and their cost.
    batches: VecDeque<(Batch, usize, usize)>,
    /// Entries (runs of unchanged ones count as one) and their
    /// [`Entry::buffer_cost`] in `batches`.
    entries: usize,
    bytes: usize,
}

impl Waiting {
    /// Queues `batch`. Batches wait only while the files in flight hold
    /// the descriptors the server may use; what waits is part of the
    /// client's window, which it keeps within the protocol's caps (a batch
    /// alone may exceed them), so a client that sends more is refused
    /// rather than held in memory.
    fn push(&mut self, batch: Batch) -> Result<()> {
        let (n, cost) = match &batch {
            Batch::Entries(e) => (e.len(), e.iter().map(Entry::buffer_cost).sum()),
            Batch::Unchanged { .. } => (1, 0),
            Batch::KeepUnread(p) => (1, p.len()),
        };
        if !self.batches.is_empty()
            && !window_within_caps(self.entries + n, self.bytes.saturating_add(cost))
        {
            return Err(refused(format!(
                "client sent more than {MAX_PENDING} entries or {MAX_BUFFERED_BYTES} bytes of entries waiting for an answer"
            )));
        }
        self.entries += n;
        self.bytes = self.bytes.saturating_add(cost);
        self.batches.push_back((batch, n, cost));
        Ok(())
    }

    fn pop(&mut self) -> Option<Batch> {
        let (batch, n, cost) = self.batches.pop_front()?;
        self.entries -= n;
        self.bytes -= cost;
        Some(batch)
    }
}

/// A batch of entries waiting for its answer.
enum Batch {
    /// Sent.
    Entries(Vec<Entry>),
    /// A run of unchanged ones (see [`BackupReceiver::unchanged`]).
    Unchanged { count: u32, digest: [u8; 32] },
    /// A subtree the client could not read (see [`BackupReceiver::keep_unread`]).
    KeepUnread(Vec<u8>),
}

/// Writing `path` (`need` bytes sent; `quota`: a quota's error) ran out
/// of space: marks the store, drops idle partial copies, then prunes
/// snapshots to make room (or fails saying what is missing).
fn make_room(
    target: &Target,
    rx: &mut BackupReceiver,
    path: &str,
    need: u64,
    quota: bool,
) -> Result<()> {
    rx.note_no_space();
    // Rebuilds kept from interrupted runs go first.
    let freed = rx.drop_idle_partials()?;
    if freed > 0 {
        eprintln!("byteback-server: no space left on device for {path:?}: removed {freed} bytes of interrupted transfers' partial copies");
    }
    // Bytes the log has that were thrown away (a transfer that ran out of
    // space): the log's pending bytes count them, so the growth guard must
    // not count them twice; the room to write them again is needed all the
    // same (they were freed).
    let room = crate::pruner::RoomFor {
        host: target.host,
        path,
        need,
        written: rx.unrecorded(),
        credit: rx.overcounted(),
        quota,
    };
    crate::pruner::make_room(target.store, target.config, target.now(), &room)
}

/// The prune a backup's snapshot calls for, run once the host's lock is
/// let go.
struct PruneAfter {
    now: i64,
    /// Only this host's snapshots (its growth is in no usage log).
    only_host: Option<String>,
}

/// `BackupEnd`: commits, records usage, takes the snapshot, replies, then
/// names the snapshot in the usage log (which only logs on failure: the
/// snapshot is taken). Returns the prune to run after, if any.
fn finish<R: Read, W: Write>(
    target: &Target,
    conn: &mut Conn<R, W>,
    rx: &mut BackupReceiver,
) -> Result<Option<PruneAfter>> {
    let warnings = std::mem::take(&mut rx.warnings);
    let (stats, generation) = rx.commit()?;
    let now = target.now();
    // Counted before the snapshot, synced: a crash after it must not lose
    // this backup's growth from the guard's view.
    let space = crate::space::measure(target.store.fd()).ok();
    settle_credit(target.host, now, rx);
    match crate::pruner::record_written(target.host, now, rx.unrecorded(), space.as_ref()) {
        // Counted: not again if the snapshot fails (the error path records
        // what is left), nor as this run's writing when it makes room.
        Ok(()) => rx.recorded(),
        Err(e) => tracing::error!("cannot record usage: {e}"),
    }
    crash_point("BYTEBACK_TEST_CRASH_BEFORE_SNAPSHOT");
    if cfg!(debug_assertions) && std::env::var_os("BYTEBACK_TEST_SNAPSHOT_FAILS").is_some() {
        return Err(Error::Store(
            "taking the snapshot failed (test fault)".into(),
        ));
    }
    let taken = rx.with_room(
        || "taking the snapshot".into(),
        |_| {
            target
                .host
                .snapshot(now, target.config.min_snapshot_interval)
        },
    )?;
    let (snapshot, mut message) = match taken {
        Ok(name) => (Some(name), String::new()),
        Err(why) => (None, why),
    };
    if snapshot.is_none() && rx.unrecorded() > 0 {
        // No snapshot line to carry what the line before could not record:
        // tried once more, so the guard sees it.
        match crate::pruner::record_written(target.host, now, rx.unrecorded(), space.as_ref()) {
            Ok(()) => rx.recorded(),
            Err(e) => tracing::error!("cannot record usage: {e}"),
        }
    }
    let dropped = (rx.warnings_dropped > 0)
        .then(|| format!("{} more warnings not kept", rx.warnings_dropped));
    let (mut in_message, total) = (0u64, warnings.len() as u64 + rx.warnings_dropped);
    for w in warnings {
        tracing::warn!("{w}");
        if message.len() < 2048 {
            message.push_str(&format!("\nwarning: {w}"));
            in_message += 1;
        }
    }
    // What the message had no room for is counted in it, never lost unsaid.
    if let Some(d) = dropped {
        tracing::warn!("{d}");
    }
    if in_message < total {
        let logged = total - in_message - rx.warnings_dropped;
        let said = match (logged, rx.warnings_dropped) {
            (l, 0) => format!("{l} more warnings in the server's log"),
            (0, d) => format!("{d} more warnings not kept"),
            (l, d) => format!("{l} more warnings in the server's log, {d} more not kept"),
        };
        message.push_str(&format!("\nwarning: {said}"));
    }
    // The snapshot is taken: a client gone by now must not cost the usage
    // line and the prune, so a failed send only logs.
    let told = conn
        .send(&ServerMsg::BackupDone {
            snapshot: snapshot.clone(),
            message,
            stats,
            generation,
        })
        .and_then(|()| {
            conn.output
                .flush()
                .map_err(|e| Error::Protocol(ProtocolError::Io(e)))
        });
    if let Err(e) = told {
        tracing::error!("the client went away before hearing the result: {e}");
    }
    if let Some(name) = &snapshot {
        // What the line before the snapshot could not record (a full disc,
        // say) goes on this one, so the guard still sees it.
        let unrecorded = rx.unrecorded();
        let mut only_host = None;
        if let Err(e) =
            crate::pruner::record_snapshot(target.host, now, name, space.as_ref(), unrecorded)
        {
            tracing::error!("cannot record usage: {e}");
            if unrecorded > 0 {
                // The guard cannot judge growth the log does not hold:
                // this host pays for it, not the others.
                tracing::warn!(
                    "{unrecorded} bytes this backup wrote are in no usage log: the prune after it deletes only snapshots of {}",
                    target.host.name
                );
                only_host = Some(target.host.name.clone());
            }
        }
        return Ok(Some(PruneAfter { now, only_host }));
    }
    Ok(None)
}

/// Debug builds only: `BYTEBACK_TEST_PRUNE_SLOW=SECS` makes the prune
/// after a snapshot wait that long first, as a long prune would take.
fn slow_prune_fault() {
    if !cfg!(debug_assertions) {
        return;
    }
    if let Some(s) = std::env::var("BYTEBACK_TEST_PRUNE_SLOW")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_secs(s));
    }
}

/// Debug builds only: the server dies at once (as in a crash or a power
/// cut) where the variable `var` is set, so the tests can show what a
/// crash there leaves.
fn crash_point(var: &str) {
    if cfg!(debug_assertions) && std::env::var_os(var).is_some() {
        std::process::abort();
    }
}

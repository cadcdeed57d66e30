//! Announcing the walk's entries to the server: batched, and held back while
//! the window of unresolved entries is at the protocol's caps. With a
//! record of the last backup that the server's manifest matches (see
//! [`super::cache`]), entries equal to their record go as runs of
//! unchanged entries instead.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{bail, Result};
use byteback_protocol::limits::{window_within_caps, MAX_BATCH, MAX_BUFFERED_BYTES};
use byteback_protocol::unchanged::{entry_digest, Chain, EntryDigest};
use byteback_protocol::{ClientMsg, Entry};

use super::cache::{Cursor, NewRecord, OldRecord, Sought};
use super::shared::{lock, Batches, Shared};
use crate::progress::BACKUP as PROGRESS;
use crate::walk::{shown, EntrySink, Found, WalkWarning};

/// The walk's sink: entries go to the server in batches, as many at a time
/// as the flow-control window allows.
pub(super) struct Announcer {
    shared: Arc<Shared>,
    batches: Arc<Batches>,
    /// Entries to send.
    batch: Vec<(Found, Entry)>,
    batch_cost: usize,
    /// Entries equal to the next ones of the server's manifest.
    run: Vec<(Found, Entry)>,
    run_cost: usize,
    run_chain: Chain,
    /// Whether there is a record of the last backup that the server's
    /// manifest matches (read by the walk's [`Feeder`]).
    old: bool,
    /// The record of this one.
    pub(super) new: Option<NewRecord>,
    /// Entries found by the walk.
    pub(super) entries: u64,
    /// Entries that went in runs of unchanged ones.
    pub(super) unchanged: u64,
    /// Entries whose xattrs the record vouched for (not read).
    pub(super) vouched: u64,
    /// Paths the server was told to keep (unreadable here).
    pub(super) kept_unread: u64,
}

impl Announcer {
    pub(super) fn new(
        shared: Arc<Shared>,
        batches: Arc<Batches>,
        old: bool,
        new: Option<NewRecord>,
    ) -> Self {
        Announcer {
            shared,
            batches,
            batch: vec![],
            batch_cost: 0,
            run: vec![],
            run_cost: 0,
            run_chain: Chain::new(),
            old,
            new,
            entries: 0,
            unchanged: 0,
            vouched: 0,
            kept_unread: 0,
        }
    }

    /// Tells the server to keep what the last backup holds at and below
    /// `path`, after everything announced before it.
    /// Sent once everything before it is resolved (no file in flight):
    /// the server then writes the kept entries out as it takes them, in
    /// bounded memory, however large the subtree.
    fn keep_unread(&mut self, path: Vec<u8>) -> Result<()> {
        self.flush()?;
        drop(self.shared.wait_flow(|f| f.window.is_empty())?);
        self.kept_unread += 1;
        self.send(vec![], 0, ClientMsg::KeepUnread { path })
    }

    /// Sends what is collected so far, waiting for room in the window.
    pub(super) fn flush(&mut self) -> Result<()> {
        self.flush_batch()?;
        self.flush_run()
    }

    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let cost = std::mem::take(&mut self.batch_cost);
        let entries: Vec<Entry> = batch.iter().map(|(_, e)| e.clone()).collect();
        self.send(batch, cost, ClientMsg::Entries(entries))
    }

    fn flush_run(&mut self) -> Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let run = std::mem::take(&mut self.run);
        let cost = std::mem::take(&mut self.run_cost);
        let digest = std::mem::take(&mut self.run_chain).finish();
        self.unchanged += run.len() as u64;
        let count = run.len() as u32;
        self.send(run, cost, ClientMsg::Unchanged { count, digest })
    }

    /// Sends `msg`, which announces `batch` (costing `cost`), once the
    /// window has room; the server's answer resolves its entries.
    fn send(&mut self, batch: Vec<(Found, Entry)>, cost: usize, msg: ClientMsg) -> Result<()> {
        let n = batch.len();
        let start = {
            // Room under the caps, or nothing pending (a batch larger than
            // the caps still goes, alone).
            let mut f = self.shared.wait_flow(|f| {
                f.window.is_empty() || window_within_caps(f.window.len() + n, f.window_bytes + cost)
            })?;
            let start = f.window_base + f.window.len() as u64;
            for (found, e) in &batch {
                f.window.push_back((false, announced_cost(found, e)));
            }
            if batch.is_empty() {
                // A message with no entries (KeepUnread) holds one slot
                // until the server answers it: nothing is done before that.
                f.window.push_back((false, 0));
            }
            f.window_bytes += cost;
            start
        };
        // Queued before sending, so the reader always finds the batch a Needs answers.
        lock(&self.batches).push_back((start, batch));
        self.shared.send(msg)
    }
}

/// What `entry` costs the server while it is buffered ([`Entry::buffer_cost`]),
/// with the xattrs it has on the server's side: those of its record when
/// the walk did not read them (the server carries them from its manifest,
/// and counts them).
fn announced_cost(found: &Found, entry: &Entry) -> usize {
    entry.buffer_cost() + found.known.map_or(0, |k| k.xattr_cost as usize)
}

/// What the walk hands to the announcer, in walk order. (Entries are nearly
/// all of it: boxing them would cost an allocation each.)
#[allow(clippy::large_enum_variant)]
enum Fed {
    Entry(Walked),
    /// A path it could not read (see [`EntrySink::keep_unread`]).
    KeepUnread(Vec<u8>),
    /// A record of the last backup at or below such a path: the server
    /// keeps its entry, so this backup's record holds it too.
    Kept(Vec<u8>, super::cache::Recorded),
}

/// One entry of the walk on its way to the announcer.
struct Walked {
    found: Found,
    entry: Entry,
    record: Sought,
}

/// Entries handed from the walk to the announcer at a time: at most this
/// many, costing at most [`CHUNK_BYTES`] (unless one entry alone does).
const CHUNK: usize = 256;
/// See [`CHUNK`]: with [`CHUNKS_QUEUED`] waiting, one being filled and one
/// being announced, at most 10/32 of the window's bytes.
const CHUNK_BYTES: usize = MAX_BUFFERED_BYTES / 32;
/// Chunks that may wait for the announcer.
const CHUNKS_QUEUED: usize = 8;

/// Runs `walk` on this thread with the announcer on a thread of its own:
/// the walk reads directories and metadata, and the record of the last
/// backup (it must know whether the record vouches for an entry's xattrs
/// before reading them: see [`super::cache`]), while the announcer digests
/// entries, writes the record of this backup and waits for room in the
/// window. They share no more than [`CHUNKS_QUEUED`]
/// chunks of [`CHUNK`] entries. Returns the announcer once everything
/// found is announced.
pub(super) fn walk_into(
    shared: &Arc<Shared>,
    mut announcer: Announcer,
    old: Option<OldRecord>,
    walk: impl FnOnce(&mut Feeder) -> Result<()>,
) -> Result<Announcer> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Fed>>(CHUNKS_QUEUED);
    let quick_keys = old.is_some() || announcer.new.is_some();
    std::thread::scope(|s| {
        let announcing = std::thread::Builder::new()
            .name("byteback-announce".into())
            .spawn_scoped(s, move || -> Result<Announcer> {
                let announced = (|| {
                    for chunk in rx {
                        for w in chunk {
                            match w {
                                Fed::Entry(w) => announcer.announce(w)?,
                                Fed::KeepUnread(p) => announcer.keep_unread(p)?,
                                Fed::Kept(p, r) => announcer.record_kept(&p, &r),
                            }
                        }
                    }
                    announcer.flush()
                })();
                if let Err(e) = &announced {
                    // The cause of the backup's failure; the walk then stops.
                    announcer.shared.fail(e);
                }
                announced.map(|()| announcer)
            })
            .map_err(|e| crate::error::err!("cannot start a thread: {e}"))?;
        let mut feeder = Feeder {
            shared: shared.clone(),
            tx: Some(tx),
            chunk: Vec::with_capacity(CHUNK),
            chunk_bytes: 0,
            old: Cursor::new(old),
            quick_keys,
        };
        let walked = walk(&mut feeder).and_then(|()| feeder.send());
        if let Err(e) = &walked {
            // The backup's failure: the announcer stops at once.
            shared.fail(e);
        }
        // The announcer ends once the last chunk is in.
        drop(feeder);
        let announced = announcing.join().unwrap_or_else(|_| {
            let e = crate::error::err!("the announcing thread panicked");
            shared.fail(&e);
            Err(e)
        });
        walked.and(announced)
    })
}

/// The walk's sink: hands entries to the announcer in chunks, each with
/// what the record of the last backup holds for it.
pub(super) struct Feeder {
    shared: Arc<Shared>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<Fed>>>,
    chunk: Vec<Fed>,
    /// `buffer_cost` of the chunk's entries.
    chunk_bytes: usize,
    /// The record of the last backup, when the server's manifest is its.
    old: Cursor,
    /// Whether entries get quick keys (a record is read or written).
    quick_keys: bool,
}

impl Feeder {
    fn send(&mut self) -> Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        self.chunk_bytes = 0;
        match &self.tx {
            Some(tx) if tx.send(chunk).is_ok() => Ok(()),
            // The announcer stopped: whatever stopped it is the cause.
            _ => bail!("the backup stopped"),
        }
    }
}

impl EntrySink for Feeder {
    fn entry(&mut self, found: Found, entry: Entry) -> Result<()> {
        if self.shared.stopped() {
            // Whatever stopped the backup is its cause; this only ends the walk.
            bail!("the backup stopped");
        }
        PROGRESS.found(entry.size());
        let cost = announced_cost(&found, &entry);
        if !self.chunk.is_empty() && self.chunk_bytes + cost > CHUNK_BYTES {
            self.send()?;
        }
        self.chunk_bytes += cost;
        let record = self.old.entry(&entry.path);
        self.chunk.push(Fed::Entry(Walked {
            found,
            entry,
            record,
        }));
        if self.chunk.len() >= CHUNK {
            self.send()?;
        }
        Ok(())
    }

    fn note(&mut self, what: String) {
        tracing::debug!("{what}");
    }

    fn keep_unread(&mut self, path: &[u8]) {
        // In order with the entries; a full chunk goes at once (a failure
        // to send is the backup's, and the next entry says so).
        self.chunk.push(Fed::KeepUnread(path.to_vec()));
        // Then the records of what the server keeps, however many, a
        // chunk at a time.
        loop {
            if self.chunk.len() >= CHUNK && self.send().is_err() {
                return;
            }
            match self.old.next_kept(path) {
                Some((p, r)) => self.chunk.push(Fed::Kept(p, r)),
                None => break,
            }
        }
    }

    fn quick_keys(&self) -> bool {
        self.quick_keys
    }

    fn recorded_as(
        &mut self,
        path: &[u8],
        quick: &EntryDigest,
        ctime_sec: i64,
    ) -> Option<super::cache::Recorded> {
        self.old.vouch(path, quick, ctime_sec)
    }

    fn warning(&mut self, w: WalkWarning) {
        if w.vanished {
            self.shared.vanished.fetch_add(1, Ordering::Relaxed);
            self.shared
                .warn(format!("{}: vanished during the backup", shown(&w.path)));
        } else {
            self.shared.partial.fetch_add(1, Ordering::Relaxed);
            self.shared
                .warn(format!("{}: {}", shown(&w.path), w.message));
        }
    }
}

impl Announcer {
    /// Puts the record of an entry the server keeps (unread here) into
    /// this backup's record, as recorded last time.
    fn record_kept(&mut self, path: &[u8], r: &super::cache::Recorded) {
        if let Some(new) = self.new.as_mut() {
            // No quick key: it would be vouched for against this backup's
            // start, later than the one it was taken at (see
            // `OldRecord::vouches_at`), so its xattrs are read next time.
            if let Err(e) = new.push(path, &r.digest, &EntryDigest::default(), r.xattr_cost) {
                tracing::warn!(
                    "cannot write the record of this backup ({e}); the next one sends every entry"
                );
                if let Some(n) = self.new.take() {
                    n.discard();
                }
            }
        }
    }

    /// Announces one entry found by the walk.
    fn announce(&mut self, w: Walked) -> Result<()> {
        let Walked {
            found,
            entry,
            record,
        } = w;
        if self.shared.stopped() {
            bail!("the backup stopped");
        }
        self.entries += 1;
        let cost = announced_cost(&found, &entry);
        if found.known.is_some() && !self.old {
            bail!(
                "{}: its xattrs were not read, yet there is no record of the last backup",
                shown(&found.abs)
            );
        }
        if self.old || self.new.is_some() {
            // An entry whose xattrs were not read has its record's digest.
            let d = found
                .known
                .map_or_else(|| entry_digest(&entry), |k| k.digest);
            if let Some(new) = self.new.as_mut() {
                let quick = found.quick.unwrap_or_default();
                let xattr_cost = found.known.map_or_else(
                    || u32::try_from(entry.xattr_cost()).unwrap_or(u32::MAX),
                    |k| k.xattr_cost,
                );
                if let Err(e) = new.push(&entry.path, &d, &quick, xattr_cost) {
                    tracing::warn!("cannot write the record of this backup ({e}); the next one sends every entry");
                    if let Some(n) = self.new.take() {
                        n.discard();
                    }
                }
            }
            let recorded = matches!(record, Some((Some(r), false)) if r.digest == d);
            if found.known.is_some() && !recorded {
                // Never sent without the xattrs it has.
                bail!(
                    "{}: its xattrs were not read, yet it does not join a run of unchanged entries",
                    shown(&found.abs)
                );
            }
            if recorded {
                if found.known.is_some() {
                    self.vouched += 1;
                    tracing::trace!("{}: xattrs as recorded, not read", shown(&found.abs));
                }
                self.flush_batch()?;
                if !self.run.is_empty() && self.run_cost + cost > MAX_BUFFERED_BYTES / 4 {
                    self.flush_run()?;
                }
                self.run_chain.push(&d);
                self.run_cost += cost;
                self.run.push((found, entry));
                if self.run.len() >= MAX_BATCH {
                    self.flush_run()?;
                }
                return Ok(());
            }
            if self.old {
                let shown = byteback_protocol::escape_bytes(&entry.path);
                tracing::trace!("{shown}: not as recorded");
            }
            self.flush_run()?;
        }
        if !self.batch.is_empty() && self.batch_cost + cost > MAX_BUFFERED_BYTES / 4 {
            self.flush_batch()?;
        }
        self.batch_cost += cost;
        self.batch.push((found, entry));
        if self.batch.len() >= MAX_BATCH {
            self.flush_batch()?;
        }
        Ok(())
    }
}

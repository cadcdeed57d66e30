//! The backup's two connection threads: the writer puts the queue on the
//! wire; the reader takes the server's replies, resolves entries in the
//! flow-control window and hands the files the server needs to delta jobs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::error::{bail, err, Result};
use byteback_protocol::{ClientMsg, Entry, Kind, Need, ServerMsg};

use super::queue::Outgoing;
use super::send::{spawn_job, spawn_jobs, Job};
use super::shared::{lock, Batches, Committed, Shared};
use crate::conn::{ConnReader, ConnWriter};
use crate::progress::BACKUP as PROGRESS;
use crate::walk::{shown, Found};

/// Sends what is queued, flushing whenever the queue runs dry; ends after
/// `Bye`, or with an error once the backup stopped.
pub(super) fn writer_loop(mut w: ConnWriter, shared: &Shared) -> Result<()> {
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
        if pooled > 0 {
            match msg {
                ClientMsg::FileData { delta, .. } => shared.pool.give(delta.data, pooled),
                ClientMsg::FileRaw { delta, .. } => shared.pool.give(delta.into_buf(), pooled),
                _ => {}
            }
        }
        if bye {
            break;
        }
    }
    w.flush()
}

/// Handles the server's replies until `BackupDone` (or an error).
pub(super) fn reader_loop(
    mut r: ConnReader,
    shared: &Arc<Shared>,
    batches: &Batches,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let mut reader = Reader {
        shared,
        batches,
        pool,
        jobs: HashMap::new(),
        retries: HashMap::new(),
        verifying: HashSet::new(),
    };
    loop {
        match r.recv()? {
            ServerMsg::Needs(needs) => reader.needs(needs)?,
            ServerMsg::Signature { id, sig } => {
                let waiter = lock(&shared.sig_waiters)
                    .as_mut()
                    .and_then(|w| w.remove(&id));
                if let Some((w, limit)) = waiter {
                    // Dropped here, at once, when larger than its file
                    // could need: never held by a job, let alone parsed.
                    let _ = w.send((sig.len() <= limit).then_some(sig));
                }
            }
            ServerMsg::FileOk { id } => {
                reader.jobs.remove(&id);
                reader.retries.remove(&id);
                reader.verifying.remove(&id);
                PROGRESS.finished();
                let mut f = lock(&shared.flow);
                if let Some(seq) = f.transfer_seq.remove(&id) {
                    f.resolve(seq);
                }
                shared.wake(&f);
            }
            ServerMsg::FileRetry { id } => {
                let (found, entry) = reader.transfer(id, "retry")?;
                reader.verifying.remove(&id);
                let n = reader.retries.entry(id).or_insert(0);
                *n += 1;
                if *n > MAX_RETRIES {
                    bail!(
                        "the server asked for {} again {MAX_RETRIES} times; giving up",
                        shown(&found.abs)
                    );
                }
                shared.warn(format!(
                    "{}: the server asked for it again (failed verification, or it made room after a full disc); resending whole",
                    shown(&found.abs)
                ));
                reader.send_whole(id, found, entry);
            }
            // The server does not hold the content offered: send it.
            ServerMsg::SendData { id } => {
                let (found, entry) = reader.transfer(id, "send-data")?;
                if reader.verifying.remove(&id) {
                    shared.warn(format!(
                        "{}: its content differs from the server's copy, though its size and mtime do not; sending it",
                        shown(&found.abs)
                    ));
                    reader.send(id, found, entry, true);
                } else {
                    reader.send_whole(id, found, entry);
                }
            }
            ServerMsg::BackupDone {
                snapshot,
                message,
                stats,
                generation,
            } => {
                check_snapshot_name(snapshot.as_deref())?;
                let mut f = lock(&shared.flow);
                f.done = Some(Committed {
                    snapshot,
                    message,
                    stats,
                    generation,
                });
                shared.wake(&f);
                return Ok(());
            }
            m => bail!("unexpected {} during a backup", m.name()),
        }
    }
}

/// The name the server gives the snapshot it took must be a snapshot's
/// (`YYYY-MM-DDTHH:MM+ZZZZ[.N]`): it is printed, and given to the
/// post-backup hooks (run as root) as `$BYTEBACK_SNAPSHOT`, where a name
/// such as `-rf` would pass for an option.
fn check_snapshot_name(name: Option<&str>) -> Result<()> {
    match name {
        Some(n) if !byteback_protocol::has_snapshot_shape(n) => bail!(
            "the server named its snapshot {}, which is not a snapshot's name (YYYY-MM-DDTHH:MM+ZZZZ)",
            n.escape_default()
        ),
        _ => Ok(()),
    }
}

/// The reader thread's own state.
struct Reader<'a> {
    shared: &'a Arc<Shared>,
    batches: &'a Batches,
    pool: &'a rayon::ThreadPool,
    /// Transfers in progress, kept for a possible whole-file resend.
    jobs: HashMap<u32, (Found, Entry)>,
    /// How often the server asked for each transfer again.
    retries: HashMap<u32, u32>,
    /// Transfers whose content is offered to be compared with a stored
    /// copy of the same size and mtime (a need with both `twin` and
    /// `basis`: checksum mode, or a copy nothing vouches for, in a
    /// taken-over 1.x `current` or after a crash); another content is sent
    /// against that copy.
    verifying: HashSet<u32>,
}

/// Resends of one file the server may ask for: an honest one asks again
/// after a failed hash (once) and after making room on a full disc (three
/// times at most); one asking without end would keep the backup going.
const MAX_RETRIES: u32 = 16;

impl Reader<'_> {
    /// The server's answer to the oldest unanswered batch: the entries it
    /// does not need are resolved, a delta job starts for each one it does.
    fn needs(&mut self, needs: Vec<Need>) -> Result<()> {
        let (start, batch) = lock(self.batches)
            .pop_front()
            .ok_or_else(|| err!("server answered a batch that was never sent"))?;
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
            let mut f = lock(&self.shared.flow);
            for need in &needs {
                f.transfer_seq.insert(need.id, start + need.index as u64);
            }
            for (i, needed) in needed.iter().enumerate() {
                if !needed {
                    f.resolve(start + i as u64);
                }
            }
            if n == 0 {
                // The one slot of a message with no entries (see `Announcer::send`).
                f.resolve(start);
            }
            self.shared.wake(&f);
        }
        for ((_, e), _) in batch.iter().zip(&needed).filter(|(_, n)| !**n) {
            PROGRESS.skipped(e.size());
        }
        let mut batch: Vec<Option<(Found, Entry)>> = batch.into_iter().map(Some).collect();
        let mut jobs = Vec::with_capacity(needs.len());
        for need in needs {
            let (found, entry) = batch
                .get_mut(need.index as usize)
                .and_then(Option::take)
                .ok_or_else(|| err!("bad need index"))?;
            // Only a regular file's data is ever sent: opening anything
            // else (a device, a FIFO) as root could have side effects.
            if !matches!(entry.kind, Kind::File { .. }) {
                bail!(
                    "the server asked for the data of {}, which is not a regular file",
                    shown(&found.abs)
                );
            }
            // What an honest server asks: a moved or copied file's hash
            // only for one of at least TWIN_MIN bytes (else each file would
            // be read twice). With a basis (its own copy to compare: in
            // checksum mode, or a copy nothing vouches for, in a taken-over
            // 1.x `current` or after a crash) any size is asked.
            if need.twin && !need.basis && entry.size() < byteback_protocol::limits::TWIN_MIN {
                bail!(
                    "the server asked for the hash of {} ({} bytes), under the {} bytes of a moved or copied file it looks for",
                    shown(&found.abs),
                    entry.size(),
                    byteback_protocol::limits::TWIN_MIN
                );
            }
            self.jobs.insert(need.id, (found.clone(), entry.clone()));
            if need.twin && need.basis {
                self.verifying.insert(need.id);
            }
            jobs.push(Job {
                id: need.id,
                found,
                entry,
                basis: need.basis,
                twin: need.twin,
            });
        }
        spawn_jobs(self.pool, self.shared, jobs);
        Ok(())
    }

    /// The file of transfer `id`; `what` names the server's request in the
    /// error for an unknown id.
    fn transfer(&self, id: u32, what: &str) -> Result<(Found, Entry)> {
        self.jobs
            .get(&id)
            .cloned()
            .ok_or_else(|| err!("{what} for unknown file {id}"))
    }

    /// Sends transfer `id` again, whole.
    fn send_whole(&self, id: u32, found: Found, entry: Entry) {
        self.send(id, found, entry, false);
    }

    /// Sends transfer `id` (without offering its hash): against the
    /// server's copy with `basis` (checksum mode, whose offer found the
    /// content changed), else whole.
    fn send(&self, id: u32, found: Found, entry: Entry, basis: bool) {
        spawn_job(
            self.pool,
            self.shared,
            Job {
                id,
                found,
                entry,
                basis,
                twin: false,
            },
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::check_snapshot_name;

    /// What the server names its snapshot reaches the hooks: a name that
    /// is no snapshot's (one starting with a dash, say) fails the backup.
    #[test]
    fn the_servers_snapshot_name_must_be_a_snapshots() {
        for ok in [
            None,
            Some("2026-11-27T03:00+0000"),
            Some("2026-11-27T03:00-0130.2"),
        ] {
            assert!(check_snapshot_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["-rf", "current", "2026-11-27T03:00+0000.x", "a b"] {
            let e = check_snapshot_name(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("which is not a snapshot's name"), "{e}");
        }
    }
}

//! Announcing the walk's entries to the server: batched, and held back while
//! the window of unresolved entries is at the protocol's caps.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{bail, Result};
use byteback_protocol::limits::{window_within_caps, MAX_BATCH, MAX_BUFFERED_BYTES};
use byteback_protocol::{ClientMsg, Entry};

use super::shared::{lock, Batches, Shared};
use crate::progress::BACKUP as PROGRESS;
use crate::walk::{EntrySink, Found, WalkWarning};

/// The walk's sink: entries go to the server in batches, as many at a time
/// as the flow-control window allows.
pub(super) struct Announcer {
    shared: Arc<Shared>,
    batches: Arc<Batches>,
    batch: Vec<(Found, Entry)>,
    batch_cost: usize,
    /// Entries found by the walk.
    pub(super) entries: u64,
    walk_vanished: u64,
}

impl Announcer {
    pub(super) fn new(shared: Arc<Shared>, batches: Arc<Batches>) -> Self {
        Announcer {
            shared,
            batches,
            batch: vec![],
            batch_cost: 0,
            entries: 0,
            walk_vanished: 0,
        }
    }

    /// Sends the entries collected so far, waiting for room in the window.
    pub(super) fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let n = self.batch.len();
        let cost = self.batch_cost;
        let start = {
            // Room under the caps, or nothing pending (a batch larger than
            // the caps still goes, alone).
            let mut f = self.shared.wait_flow(|f| {
                f.window.is_empty() || window_within_caps(f.window.len() + n, f.window_bytes + cost)
            })?;
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

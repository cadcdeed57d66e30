//! Moved and copied files: a new file whose content the client hashed
//! first is cloned from a stored file with the same BLAKE3 and size (by the
//! old manifest, see [`crate::twins`]), checked, and committed as if it had
//! been received.

use crate::error::{shown, Error, IoContext, Result};

use byteback_protocol::ManifestEntry;

use super::partial::prev_name;
use super::sink::is_no_space;
use super::slots::Slot;
use super::transfer::unknown;
use super::{BackupReceiver, TransferResult};
use crate::fsops;
use crate::twins::{self, TwinIndex};

impl BackupReceiver {
    /// The index of stored content, read from the old manifest the first
    /// time it is needed. A manifest that cannot be read gives an empty
    /// index (and a warning): files are then sent, never wrongly cloned.
    pub(super) fn twins(&mut self) -> &TwinIndex {
        if self.twins.is_none() {
            let path = self.meta_path.join("manifest");
            let loaded = if self.start.has_manifest {
                fsops::open_file(&self.meta, super::MANIFEST)
                    .and_then(|f| TwinIndex::load(f, &path))
                    .map_err(|e| {
                        self.warn(format!(
                            "cannot index stored files for moved and copied ones ({e}); they are sent"
                        ))
                    })
                    .unwrap_or_default()
            } else {
                TwinIndex::default()
            };
            if loaded.left_out > 0 {
                tracing::warn!(
                    "the index of stored files for moved and copied ones is full ({} files); {} larger files are not offered for cloning",
                    loaded.len(),
                    loaded.left_out
                );
            }
            self.twins = Some(loaded);
        }
        self.twins.get_or_insert_with(TwinIndex::default)
    }

    /// The client says new file `id` has content `hash` (and nothing was
    /// sent): when a stored file of this host's `current` has that content
    /// by the old manifest, it is cloned (or copied) into the transfer's
    /// file, hashed again from there and committed as if received. Returns
    /// false when the content is not held or the copy does not check out:
    /// the client then sends the data, and nothing of this attempt is kept.
    ///
    /// In checksum mode, for a file whose stored copy has its size and mtime
    /// (see `start_verify`), the same content keeps the stored copy as it
    /// is; other content is received against it, never cloned.
    pub fn offer(&mut self, id: u32, size: u64, hash: [u8; 32], mtime: (i64, u32)) -> Result<bool> {
        let t = self.transfers.get(&id).ok_or_else(|| unknown(id))?;
        if let Some(stored) = t.verify {
            let e = &t.entry;
            let same = stored == hash && e.size() == size && (e.mtime_sec, e.mtime_nsec) == mtime;
            if same && t.to_open.is_some() {
                self.keep_verified(id)?;
                return Ok(true);
            }
            return Ok(false);
        }
        let src_path = match self.twins().find(&hash, size) {
            Some(p) => p.to_vec(),
            None => return Ok(false),
        };
        self.open_files(id)?;
        let clone_ok = self.clone_ok;
        let t = self
            .transfers
            .get_mut(&id)
            .ok_or_else(|| Error::Refused(format!("unknown transfer {id}")))?;
        let w = &mut t.writer;
        if w.basis.is_some() || w.written != 0 || t.entry.size() != size || src_path == t.entry.path
        {
            return Ok(false);
        }
        let Some(src) = twins::open_stored(&self.current, &src_path, size) else {
            return Ok(false);
        };
        let out = w.out().op("clone into", || shown(&t.entry.path))?;
        let (got, shared, holes) = match twins::copy_into(&src, out, size, clone_ok) {
            Ok(x) => x,
            Err(e) => {
                out.set_len(0).op("empty", || shown(&t.entry.path))?;
                if is_no_space(&e) {
                    // Sending it needs the same room: that path makes it.
                    return Ok(false);
                }
                let path = shown(&t.entry.path);
                self.warn(format!(
                    "{path}: cannot copy its stored twin ({e}); sent instead"
                ));
                return Ok(false);
            }
        };
        if got != hash {
            out.set_len(0).op("empty", || shown(&t.entry.path))?;
            return Ok(false);
        }
        // Hashed just now from what the file holds (see `copy_into`):
        // `end` checks that.
        w.filled(size, got);
        if !shared {
            self.clone_ok = false;
        }
        // Shared: the extent items of the clone, counted as a delta's are
        // (it counted nothing, so moved or copied files cloned by the
        // thousand, 100 bytes each on the wire, filled the metadata unseen).
        let grown = if shared {
            super::sink::clone_items(size).saturating_mul(super::sink::CLONE_COST)
        } else {
            size.saturating_sub(holes)
        };
        match self.end(id, size, hash, mtime)? {
            TransferResult::Done => {
                self.stats.files_transferred = self.stats.files_transferred.saturating_sub(1);
                self.stats.cloned += 1;
                self.stats.matched_bytes += size;
                self.grown = self.grown.saturating_add(grown);
                Ok(true)
            }
            _ => Err(Error::Internal("a verified clone failed its commit")),
        }
    }

    /// Checksum mode: the client's content of transfer `id` is its stored
    /// copy's (nothing was opened or written for it): the stored copy
    /// stays, and the entry goes into the manifest with its new metadata.
    fn keep_verified(&mut self, id: u32) -> Result<()> {
        let t = *self.transfers.remove(&id).ok_or_else(|| unknown(id))?;
        self.old_held = self.old_held.saturating_sub(t.old_cost);
        if t.has_prev {
            // An earlier run's rebuild, now of no use.
            let prev = prev_name(&t.partial);
            fsops::remove_any(&self.partial, &prev).op("remove", || self.partial_path(&prev))?;
        }
        let hash = t.verify.ok_or(Error::Internal("kept without a hash"))?;
        let me = ManifestEntry {
            entry: t.entry,
            hash,
        };
        // A trimmed old entry (see `hold_old`) is not the old manifest's.
        if t.old_trimmed || t.old.as_ref() != Some(&me) {
            self.mark_changed()?;
        }
        self.files.note_content(&me, t.old.as_ref());
        let cost = me.entry.buffer_cost();
        self.slots.set(t.seq, Slot::Ready(me), cost);
        self.flush_slots()
    }
}

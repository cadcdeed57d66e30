//! Runs of unchanged entries ([`ClientMsg::Unchanged`]): the next entries of
//! the old manifest, carried into the new one without the client sending
//! them; and the manifest's generation, the chain of its entries' digests
//! (see [`byteback_protocol::unchanged`]), kept in an xattr of the
//! manifest file so it goes and comes with the manifest itself.
//!
//! [`ClientMsg::Unchanged`]: byteback_protocol::ClientMsg::Unchanged

use std::cmp::Ordering;
use std::os::fd::AsFd;

use byteback_protocol::limits::MAX_BUFFERED_BYTES;
use byteback_protocol::unchanged::{entry_digest, Chain, EntryDigest};
use byteback_protocol::{compare_paths, Kind, ManifestEntry, UNCHANGED_MISMATCH};

use super::slots::Slot;
use super::{BackupReceiver, OpenDir};
use crate::error::{shown, Error, Result};

/// The xattr of `.byteback/manifest` holding its generation.
const GENERATION_XATTR: &str = "user.byteback.generation";

/// What the manifest file says of its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Recorded.
    Is([u8; 32]),
    /// None recorded (a manifest of a version before generations), or a
    /// value of the wrong length.
    Missing,
    /// The filesystem keeps no user xattrs (or the manifest is not there).
    Unsupported,
}

/// The generation recorded on the manifest file `fd`.
pub(crate) fn read_generation(fd: impl AsFd) -> Stored {
    let mut buf = [0u8; 33];
    match rustix::fs::fgetxattr(fd, GENERATION_XATTR, &mut buf[..]) {
        Ok(32) => buf[..32].try_into().map_or(Stored::Missing, Stored::Is),
        Ok(_) | Err(rustix::io::Errno::NODATA | rustix::io::Errno::RANGE) => Stored::Missing,
        Err(_) => Stored::Unsupported,
    }
}

/// Records `generation` on the manifest file `fd`, not yet in place (an
/// xattr of a manifest in place could be one of a snapshot too, where
/// snapshots are hard-link copies). Returns whether it was: a filesystem
/// without user xattrs only costs the next backup its runs of unchanged
/// entries.
pub(super) fn write_generation(fd: impl AsFd, generation: &[u8; 32]) -> bool {
    match rustix::fs::fsetxattr(
        fd,
        GENERATION_XATTR,
        generation,
        rustix::fs::XattrFlags::empty(),
    ) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "cannot record the manifest's generation ({e}): the next backup announces every entry one by one"
            );
            false
        }
    }
}

impl BackupReceiver {
    /// The generation a client may send runs of unchanged entries against:
    /// the manifest's, when `current` matches it exactly.
    pub fn generation(&self) -> Option<[u8; 32]> {
        match self.start.generation {
            Stored::Is(g) if self.start.clean => Some(g),
            _ => None,
        }
    }

    /// Carries the next `count` entries of the old manifest into the new
    /// one, after checking that their digests chain to `digest`: the
    /// client's run of unchanged entries. Each is what the manifest says
    /// (`current` matched it when the backup started, and nothing of this
    /// backup has touched those paths: every path is handled once, in
    /// order). The directory structure is checked as for entries sent.
    pub fn unchanged(&mut self, count: u32, digest: &[u8; 32]) -> Result<()> {
        if self.generation().is_none() {
            return Err(Error::Refused(
                "unchanged entries sent, but no generation was offered".into(),
            ));
        }
        let mut run: Vec<(ManifestEntry, EntryDigest)> = Vec::with_capacity(count as usize);
        let mut chain = Chain::new();
        // Held before the check: bounded as a batch of entries sent is (a
        // client keeps a run to a quarter of this).
        let mut cost = 0;
        for _ in 0..count {
            let (e, d) = self
                .old
                .advance_with_digest()
                .map_err(Error::Manifest)?
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "{UNCHANGED_MISMATCH}: the manifest has fewer entries"
                    ))
                })?;
            let d = d.unwrap_or_else(|| entry_digest(&e.entry));
            chain.push(&d);
            cost += e.entry.buffer_cost();
            if cost > MAX_BUFFERED_BYTES {
                return Err(Error::Refused(format!(
                    "a run of unchanged entries holds more than {MAX_BUFFERED_BYTES} bytes"
                )));
            }
            run.push((e, d));
        }
        if chain.finish() != *digest {
            let first = run
                .first()
                .map(|(e, _)| shown(&e.entry.path))
                .unwrap_or_default();
            return Err(Error::Refused(format!(
                "{UNCHANGED_MISMATCH} (a run of {count} from {first})"
            )));
        }
        for (e, d) in run {
            self.carry(e, d)?;
        }
        self.flush_slots()
    }

    /// Takes one old entry over as it is.
    fn carry(&mut self, e: ManifestEntry, d: EntryDigest) -> Result<()> {
        self.stats.entries += 1;
        self.parent_dir(&e.entry.path)?;
        if e.entry.kind == Kind::Dir {
            self.dirs.push(OpenDir {
                path: e.entry.path.clone(),
                fd: None,
                created: false,
            });
        }
        self.last_carried = Some(e.entry.path.clone());
        let cost = e.entry.buffer_cost();
        self.slots.push(Slot::Carried(e, d), cost)?;
        Ok(())
    }

    /// An entry sent after a run of unchanged ones must come after them.
    pub(super) fn check_after_carried(&mut self, path: &[u8]) -> Result<()> {
        match self.last_carried.take() {
            Some(last) if compare_paths(&last, path) != Ordering::Less => {
                Err(Error::Refused(format!(
                    "entry {} sent out of order, after unchanged ones",
                    shown(path)
                )))
            }
            _ => Ok(()),
        }
    }
}

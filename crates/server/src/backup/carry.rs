//! Runs of unchanged entries ([`ClientMsg::Unchanged`]): the next entries of
//! the old manifest, carried into the new one without the client sending
//! them; and the manifest's generation, the chain of its entries' digests
//! (see [`byteback_protocol::unchanged`]), kept in an xattr of the
//! manifest file so it goes and comes with the manifest itself.
//!
//! [`ClientMsg::Unchanged`]: byteback_protocol::ClientMsg::Unchanged

use std::cmp::Ordering;
use std::os::fd::AsFd;

use byteback_protocol::unchanged::{entry_digest, Chain, EntryDigest};
use byteback_protocol::{compare_paths, Kind, ManifestEntry, UNCHANGED_MISMATCH};

use super::slots::Slot;
use super::{BackupReceiver, OpenDir};
use crate::error::{shown, Error, Result};

/// The xattr of `.byteback/manifest` holding its generation.
const GENERATION_XATTR: &str = "user.byteback.generation";

/// The generation recorded on the manifest file `fd`, if any.
pub(super) fn read_generation(fd: impl AsFd) -> Option<[u8; 32]> {
    let mut buf = [0u8; 33];
    match rustix::fs::fgetxattr(fd, GENERATION_XATTR, &mut buf[..]) {
        Ok(32) => buf[..32].try_into().ok(),
        _ => None,
    }
}

/// Records `generation` on the manifest file `fd`. A filesystem without
/// user xattrs only costs the next backup its runs of unchanged entries.
pub(super) fn write_generation(fd: impl AsFd, generation: &[u8; 32]) {
    if let Err(e) = rustix::fs::fsetxattr(
        fd,
        GENERATION_XATTR,
        generation,
        rustix::fs::XattrFlags::empty(),
    ) {
        tracing::debug!("cannot record the manifest's generation: {e}");
    }
}

impl BackupReceiver {
    /// The generation a client may send runs of unchanged entries against:
    /// the manifest's, when `current` matches it exactly.
    pub fn generation(&self) -> Option<[u8; 32]> {
        self.start.generation
    }

    /// Carries the next `count` entries of the old manifest into the new
    /// one, after checking that their digests chain to `digest`: the
    /// client's run of unchanged entries. Each is what the manifest says
    /// (`current` matched it when the backup started, and nothing of this
    /// backup has touched those paths: every path is handled once, in
    /// order). The directory structure is checked as for entries sent.
    pub fn unchanged(&mut self, count: u32, digest: &[u8; 32]) -> Result<()> {
        if self.start.generation.is_none() {
            return Err(Error::Refused(
                "unchanged entries sent, but no generation was offered".into(),
            ));
        }
        let mut run: Vec<(ManifestEntry, EntryDigest)> = Vec::with_capacity(count as usize);
        let mut chain = Chain::new();
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

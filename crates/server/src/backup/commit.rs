//! The manifest's side of a backup: taking the clean marker away before
//! the first change, recovering a damaged manifest, and the commit (sweep,
//! one sync, the new manifest renamed into place, the marker back).

use std::io;
use std::os::fd::AsFd;

use anyhow::{anyhow, bail, Result};
use byteback_protocol::BackupStats;

use super::sweep::remove_stale;
use super::{BackupReceiver, CLEAN, DAMAGED, MANIFEST, NO_SPACE, PARTIAL};
use crate::fsops;
use crate::manifest::{ManifestReader, ManifestWriter, PeekableManifest};
use crate::store::{HostStore, META_DIR};

/// Sets a damaged manifest of `current` aside (and drops the clean marker),
/// so the next backup starts from a recovered one instead of failing again.
pub fn set_aside_manifest(meta: impl AsFd) -> Result<()> {
    fsops::remove_any(&meta, CLEAN)?;
    rustix::fs::renameat(&meta, "manifest", &meta, "manifest.damaged")?;
    fsops::fsync(&meta)?;
    Ok(())
}

/// Puts a manifest back into `current` after its own was found damaged:
/// the newest snapshot's (checked to read whole), else none. Files changed
/// since that snapshot differ from it and are sent again; without any
/// manifest every file is. Returns the warning to give.
pub(super) fn recover_manifest(
    host: &HostStore,
    meta: impl AsFd,
    manifest_path: &std::path::Path,
) -> String {
    let shown = manifest_path.display();
    let from_snapshot = || -> Result<String> {
        let (name, _) = host
            .snapshots()?
            .pop()
            .ok_or_else(|| anyhow!("there is no snapshot"))?;
        let snap = host.open_snapshot(&name)?;
        let smeta = fsops::open_dir(&snap, META_DIR)?;
        let spath = host
            .path
            .join(&name)
            .join(crate::store::META_DIR_NAME)
            .join("manifest");
        let mut check = ManifestReader::new(fsops::open_file(&smeta, MANIFEST)?, &spath)?;
        while check.next_entry()?.is_some() {}
        let mut src = fsops::open_file(&smeta, MANIFEST)?;
        fsops::remove_any(&meta, b"manifest.new")?;
        let mut dst = fsops::create_new(&meta, b"manifest.new")?;
        io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
        fsops::replace(&meta, b"manifest.new", &meta, MANIFEST)?;
        Ok(name)
    };
    let msg = match from_snapshot() {
        Ok(name) => format!(
            "the manifest {shown} was damaged; recovered from snapshot {name}'s (files changed since are sent again)"
        ),
        Err(e) => format!(
            "the manifest {shown} was damaged and no snapshot's could replace it ({e:#}); every file is sent again"
        ),
    };
    let _ = fsops::remove_any(&meta, DAMAGED);
    let _ = fsops::fsync(&meta);
    tracing::warn!("{msg}");
    msg
}

impl BackupReceiver {
    /// Called before the first change to `current` or to the manifest: takes
    /// the clean marker away (durably, so a crash from here on leaves a
    /// store that the next run does not trust) and starts the new manifest
    /// with the entries resolved so far, which equal the old manifest's first ones.
    pub(super) fn mark_changed(&mut self) -> Result<()> {
        if self.work.changed {
            return Ok(());
        }
        if self.work.marker {
            fsops::remove_any(&self.meta, CLEAN)?;
            fsops::fsync(&self.meta)?;
            self.work.marker = false;
        }
        let mut new = ManifestWriter::new(fsops::create_new(&self.meta, b"manifest.new")?)?;
        if self.work.unwritten > 0 {
            let path = self.meta_path.join("manifest");
            let mut old = ManifestReader::new(fsops::open_file(&self.meta, b"manifest")?, &path)?;
            for _ in 0..self.work.unwritten {
                let e = old.next_entry()?.ok_or_else(|| {
                    anyhow!(
                        "the manifest {} ended early (is it damaged?)",
                        path.display()
                    )
                })?;
                new.push(&e)?;
            }
        }
        self.new = Some(new);
        self.work.changed = true;
        Ok(())
    }

    /// Called before creating, replacing or removing anything in `current`.
    pub(super) fn touch(&mut self) -> Result<()> {
        self.work.touched = true;
        self.mark_changed()
    }

    /// Commits: removes what the new manifest does not name, syncs, and
    /// atomically replaces the manifest.
    pub fn commit(&mut self) -> Result<BackupStats> {
        if !self.transfers.is_empty() {
            bail!("backup ended with {} transfers open", self.transfers.len());
        }
        self.flush_slots()?;
        if !self.slots.is_empty() {
            bail!("backup ended with unresolved entries");
        }
        if self.old.peek().is_some() {
            // Old entries after the last one sent: deleted.
            self.work.needs_sweep = true;
            self.mark_changed()?;
        }
        if !self.work.changed {
            // `current` was clean and nothing differs: it still matches the
            // manifest, and nothing new needs to reach the disc.
            fsops::remove_any(&self.meta, PARTIAL)?;
            return Ok(std::mem::take(&mut self.stats));
        }
        let new = self
            .new
            .take()
            .ok_or_else(|| anyhow!("manifest already finished"))?;
        let new_file = new.finish()?;
        self.old = PeekableManifest::new(ManifestReader::empty())?;
        if self.work.needs_sweep {
            let mut manifest = PeekableManifest::new(ManifestReader::new(
                fsops::open_file(&self.meta, b"manifest.new")?,
                &self.meta_path.join("manifest.new"),
            )?)?;
            let mut deleted = 0;
            remove_stale(&self.current, &[], true, &mut manifest, &mut deleted)?;
            self.stats.deleted = deleted;
            self.work.touched |= deleted > 0;
        }
        // Every transfer has ended: what is left of interrupted runs is
        // stale (its file is gone, unchanged or was sent whole), and no
        // partial may reach a snapshot.
        fsops::remove_any(&self.meta, PARTIAL)?;
        if self.work.touched {
            // One sync of the whole filesystem instead of an fsync per file.
            rustix::fs::syncfs(&self.current)?;
        } else {
            // Only metadata changed: the manifest is all there is to write.
            fsops::fsync(&new_file)?;
        }
        drop(new_file);
        rustix::fs::renameat(&self.meta, "manifest.new", &self.meta, "manifest")?;
        fsops::fsync(&self.meta)?;
        fsops::remove_any(&self.meta, NO_SPACE)?;
        // Not synced: if it is lost, the next run just does not trust `current`.
        drop(fsops::create_new(&self.meta, CLEAN)?);
        Ok(std::mem::take(&mut self.stats))
    }
}

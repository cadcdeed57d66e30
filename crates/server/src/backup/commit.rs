//! The manifest's side of a backup: taking the clean marker away before
//! the first change, recovering a damaged manifest, and the commit (sweep,
//! one sync, the new manifest renamed into place, the marker back).

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use byteback_protocol::BackupStats;

use super::sweep::remove_stale;
use super::{
    carry, in_dir, BackupReceiver, BOOT, BOOT_NEW, CLEAN, DAMAGED, MANIFEST, NO_SPACE, PARTIAL,
    TAKEOVER,
};
use crate::error::{Error, IoContext, Result};
use crate::fsops;
use crate::manifest::{ManifestReader, ManifestWriter, PeekableManifest};
use crate::store::{HostStore, META_DIR};

/// Sets a damaged manifest of `current` aside (and drops the clean marker),
/// so the next backup starts from a recovered one instead of failing again.
/// (`meta` is `.byteback` at `meta_path`.)
pub(super) fn set_aside_manifest(meta: impl AsFd, meta_path: &Path) -> Result<()> {
    let at = |name: &[u8]| in_dir(meta_path, name);
    fsops::remove_any(&meta, CLEAN).op("remove", || at(CLEAN))?;
    rustix::fs::renameat(&meta, "manifest", &meta, "manifest.damaged")
        .op("set aside", || at(MANIFEST))?;
    fsops::fsync(&meta).op("sync", || meta_path.display())?;
    Ok(())
}

/// Puts a manifest back into `current` after its own was found damaged:
/// the newest snapshot's (checked to read whole), else none. Files changed
/// since that snapshot differ from it and are sent again; without any
/// manifest every file is. Returns the warning to give.
pub(super) fn recover_manifest(host: &HostStore, meta: impl AsFd, manifest_path: &Path) -> String {
    let shown = manifest_path.display();
    let new_path = manifest_path.with_extension("new");
    let from_snapshot = || -> Result<String> {
        let (name, _) = host
            .snapshots()?
            .pop()
            .ok_or_else(|| Error::Store("there is no snapshot".into()))?;
        let snap = host.open_snapshot(&name)?;
        let smeta_path = host.path.join(&name).join(crate::store::META_DIR_NAME);
        let smeta = fsops::open_dir(&snap, META_DIR).op("open", || smeta_path.display())?;
        let spath = smeta_path.join("manifest");
        let open = || fsops::open_file(&smeta, MANIFEST).op("open", || spath.display());
        let mut check = ManifestReader::new(open()?, &spath).map_err(Error::Manifest)?;
        while check.next_entry().map_err(Error::Manifest)?.is_some() {}
        let mut src = open()?;
        fsops::remove_any(&meta, b"manifest.new").op("remove", || new_path.display())?;
        let mut dst =
            fsops::create_new(&meta, b"manifest.new").op("create", || new_path.display())?;
        io::copy(&mut src, &mut dst).op("copy the manifest into", || new_path.display())?;
        dst.sync_all().op("sync", || new_path.display())?;
        fsops::replace(&meta, b"manifest.new", &meta, MANIFEST)
            .op("rename into place", || new_path.display())?;
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
    /// `name` in `.byteback`, for messages.
    fn meta_file(&self, name: &[u8]) -> String {
        in_dir(&self.meta_path, name)
    }

    /// Called before the first change to `current` or to the manifest: takes
    /// the clean marker away (durably, so a crash from here on leaves a
    /// store that the next run does not trust) and starts the new manifest
    /// with the entries resolved so far, which equal the old manifest's first ones.
    pub(super) fn mark_changed(&mut self) -> Result<()> {
        if self.work.changed {
            return Ok(());
        }
        if self.work.marker {
            fsops::remove_any(&self.meta, CLEAN).op("remove", || self.meta_file(CLEAN))?;
            fsops::fsync(&self.meta).op("sync", || self.meta_path.display())?;
            self.work.marker = false;
        }
        self.record_boot()?;
        let new_shown = self.meta_file(b"manifest.new");
        let new = self.with_room(
            || format!("creating {new_shown}"),
            |rx| rx.start_manifest(&new_shown),
        )?;
        self.new = Some(new);
        self.new_pending = true;
        self.work.changed = true;
        Ok(())
    }

    /// Records, durably and before anything in `current` changes, the boot
    /// the changes are made under; not when this run suspects an earlier
    /// one's files (the record then keeps naming the boot they came from).
    fn record_boot(&mut self) -> Result<()> {
        let Some(boot) = self.start.boot.clone().filter(|_| !self.start.suspect) else {
            return Ok(());
        };
        if crate::pruner::read_small(&self.meta, "boot").is_some_and(|r| r == boot) {
            return Ok(());
        }
        let shown = self.meta_file(BOOT);
        self.with_room(
            || format!("writing {shown}"),
            // A new file renamed over the old: in a store without btrfs
            // the old one is hard-linked into the snapshots (and made
            // read-only there), so writing it in place would change them
            // too, or fail for a server that is not root.
            |rx| {
                fsops::remove_any(&rx.meta, BOOT_NEW)
                    .and_then(|()| fsops::create_new(&rx.meta, BOOT_NEW))
                    .and_then(|mut f| {
                        std::io::Write::write_all(&mut f, boot.as_bytes())?;
                        fsops::fsync(&f)
                    })
                    .and_then(|()| fsops::replace(&rx.meta, BOOT_NEW, &rx.meta, BOOT))
                    .and_then(|()| fsops::fsync(&rx.meta))
                    .op("write", || shown.clone())
            },
        )
    }

    /// Creates the new manifest (over what a failed try left) with the
    /// entries resolved so far (`new_shown` names it).
    fn start_manifest(&mut self, new_shown: &str) -> Result<ManifestWriter> {
        let new_path = || new_shown;
        fsops::remove_any(&self.meta, b"manifest.new").op("remove", new_path)?;
        // What a failed try wrote is gone with it.
        self.grown = self.grown.saturating_sub(self.manifest_grown);
        self.manifest_grown = 0;
        if let Some(e) = super::transfer::test_fault::no_space(super::transfer::test_fault::CREATE)
        {
            return Err(e).op("create", new_path);
        }
        let created = fsops::create_new(&self.meta, b"manifest.new").op("create", new_path)?;
        // From here it is on disc, to go should this backup not commit.
        self.new_pending = true;
        let mut new = ManifestWriter::new(created).op("create", new_path)?;
        if self.work.unwritten > 0 {
            let path = self.meta_path.join("manifest");
            let file = fsops::open_file(&self.meta, MANIFEST).op("open", || path.display())?;
            let mut old = ManifestReader::new(file, &path).map_err(Error::Manifest)?;
            for _ in 0..self.work.unwritten {
                let e = old.next_entry().map_err(Error::Manifest)?.ok_or_else(|| {
                    Error::Store(format!(
                        "the manifest {} ended early (is it damaged?)",
                        path.display()
                    ))
                })?;
                new.push(&e).op("write", new_path)?;
                self.sigs.note(&e);
            }
        }
        Ok(new)
    }

    /// Called before creating, replacing or removing anything in `current`.
    pub(super) fn touch(&mut self) -> Result<()> {
        self.work.touched = true;
        self.mark_changed()
    }

    /// Commits: removes what the new manifest does not name, syncs, and
    /// atomically replaces the manifest. Returns the counters and the
    /// committed manifest's generation.
    pub fn commit(&mut self) -> Result<(BackupStats, Option<[u8; 32]>)> {
        let generation = self.settle()?;
        let partial = in_dir(&self.meta_path, PARTIAL);
        if !self.work.changed {
            // `current` was clean and nothing differs: it still matches the
            // manifest, and nothing new needs to reach the disc.
            fsops::remove_any(&self.meta, PARTIAL).op("remove", || &partial)?;
            // Every entry of the manifest went through the slots, in order.
            let kept =
                (self.start.generation == carry::Stored::Is(generation)).then_some(generation);
            return Ok((std::mem::take(&mut self.stats), kept));
        }
        let new_path = self.meta_path.join("manifest.new");
        let new = self
            .new
            .take()
            .ok_or(Error::Internal("manifest already finished"))?;
        let bytes = new.bytes();
        let new_file =
            match super::transfer::test_fault::no_space(super::transfer::test_fault::MANIFEST) {
                Some(e) => Err(e),
                None => new.finish(),
            }
            .op("write", || new_path.display())?;
        // Each snapshot keeps its own manifest: new space, however few of
        // its entries changed (xattrs a client sends are stored here only).
        let manifest_len = new_file.metadata().map_or(0, |m| m.len());
        self.grown = self
            .grown
            .saturating_add(manifest_len.saturating_sub(self.manifest_grown));
        self.manifest_grown = manifest_len;
        // Atomic with the manifest: an attribute of its file, synced with it.
        let kept = carry::write_generation(&new_file, &generation).then_some(generation);
        crate::manifest::write_bytes(&new_file, bytes);
        self.old = PeekableManifest::new(ManifestReader::empty()).map_err(Error::Manifest)?;
        if self.work.needs_sweep {
            self.remove_deleted(&new_path)?;
        }
        // Signatures of content no file has any more (before the sync, so
        // no snapshot keeps them).
        self.sigs.sweep()?;
        if self.sigs.digests_used > 0 {
            tracing::info!(
                "{} changed files rebuilt from kept chaining values: ranges copied in place \
                 not read; {} bytes read back to hash what changed around them",
                self.sigs.digests_used,
                self.sigs.reread
            );
        }
        // Every transfer has ended: what is left of interrupted runs is
        // stale (its file is gone, unchanged or was sent whole), and no
        // partial may reach a snapshot.
        fsops::remove_any(&self.meta, PARTIAL).op("remove", || &partial)?;
        self.put_in_place(new_file, &new_path)?;
        Ok((std::mem::take(&mut self.stats), kept))
    }

    /// Checks that every transfer and entry has ended, notes deletions at
    /// the end and a manifest to write anew, and returns the new
    /// manifest's generation.
    fn settle(&mut self) -> Result<[u8; 32]> {
        if !self.transfers.is_empty() {
            return Err(Error::Refused(format!(
                "backup ended with {} transfers open",
                self.transfers.len()
            )));
        }
        self.flush_slots()?;
        if !self.slots.is_empty() {
            return Err(Error::Refused(
                "backup ended with unresolved entries".into(),
            ));
        }
        if self.old.peek().is_some() {
            // Old entries after the last one sent: deleted.
            self.work.needs_sweep = true;
            self.mark_changed()?;
        }
        let generation = self.chain.finish();
        let stale = match self.start.generation {
            carry::Stored::Missing => true,
            carry::Stored::Is(g) => g != generation,
            carry::Stored::Unsupported => false,
        };
        if !self.work.changed && stale {
            // A manifest of a version before generations (or with a wrong
            // one): written anew, with its generation, once.
            self.mark_changed()?;
        }
        Ok(generation)
    }

    /// Removes from `current` what the new manifest (at `new_path`, in the
    /// store's metadata directory as `manifest.new`) does not name.
    fn remove_deleted(&mut self, new_path: &std::path::Path) -> Result<()> {
        let file =
            fsops::open_file(&self.meta, b"manifest.new").op("open", || new_path.display())?;
        let mut manifest = ManifestReader::new(file, new_path)
            .and_then(PeekableManifest::new)
            .map_err(Error::Manifest)?;
        let mut deleted = 0;
        remove_stale(&self.current, &[], true, &mut manifest, &mut deleted)?;
        self.stats.deleted = deleted;
        self.work.touched |= deleted > 0;
        Ok(())
    }

    /// Gives the files placed a second before their mtime (see
    /// `on_disc_mtime`) their mtime, now that the commit made their data
    /// durable and the manifest names it: otherwise every run after an
    /// interrupted one would receive them again. Best effort (not synced:
    /// one left so costs a resend, never a wrong file).
    fn unoffset(&mut self) {
        for (path, (sec, nsec)) in std::mem::take(&mut self.work.offset) {
            let set = fsops::open_file(&self.current, &crate::store::disk_path(&path))
                .and_then(|f| fsops::set_mtime(&f, sec, nsec));
            if let Err(e) = set {
                tracing::debug!("cannot give {} its mtime: {e}", crate::error::shown(&path));
            }
        }
        self.work.offset_bytes = 0;
    }

    /// Syncs what the backup wrote and renames the new manifest into
    /// place: the commit point.
    fn put_in_place(&mut self, new_file: std::fs::File, new_path: &std::path::Path) -> Result<()> {
        self.work.committing = true;
        if self.work.touched {
            // One sync of the whole filesystem instead of an fsync per file.
            rustix::fs::syncfs(&self.current)
                .op("sync the filesystem of", || self.meta_path.display())?;
        } else {
            // Only metadata changed: the manifest is all there is to write.
            fsops::fsync(&new_file).op("sync", || new_path.display())?;
        }
        drop(new_file);
        self.with_room(
            || format!("putting {} in place", new_path.display()),
            |rx| {
                rustix::fs::renameat(&rx.meta, "manifest.new", &rx.meta, "manifest")
                    .op("rename into place", || new_path.display())
            },
        )?;
        self.new_pending = false;
        fsops::fsync(&self.meta).op("sync", || self.meta_path.display())?;
        self.unoffset();
        fsops::remove_any(&self.meta, NO_SPACE).op("remove", || self.meta_file(NO_SPACE))?;
        fsops::remove_any(&self.meta, TAKEOVER).op("remove", || self.meta_file(TAKEOVER))?;
        // Not synced: if it is lost, the next run just does not trust
        // `current`; nor is failing to create it (for want of space) an
        // error: the backup is committed.
        if let Err(e) = fsops::create_new(&self.meta, CLEAN) {
            tracing::warn!(
                "cannot create {} ({e}); the next backup looks at every stored file",
                self.meta_file(CLEAN)
            );
        }
        Ok(())
    }
}

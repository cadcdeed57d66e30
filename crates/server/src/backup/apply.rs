//! Carrying out the decision for one entry: looking at the disc when the
//! decision needs it, then one applier per kind (directory, symlink, file
//! kept, file to receive). Entries arrive and are applied in walk order.

use std::cmp::Ordering;
use std::os::fd::OwnedFd;

use byteback_protocol::limits::TWIN_MIN;
use byteback_protocol::{compare_paths, Entry, Kind, ManifestEntry};
use rustix::fs::FileType;

use super::decide::{self, Action, OnDisc};
use super::partial::partial_name;
use super::sigs;
use super::sink::{hash_file, FileWriter};
use super::slots::Slot;
use super::{BackupReceiver, OldCopy, OpenDir, ToOpen, Transfer};
use crate::error::{shown, Error, IoContext, Result};
use crate::fsops::{self, split};
use crate::store::disk_path;

/// Whether `path` is `prefix` or lies below it (the empty prefix, the
/// root, holds everything).
fn within(prefix: &[u8], path: &[u8]) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix) && (path.len() == prefix.len() || path[prefix.len()] == b'/'))
}

/// A file the client is to send.
pub(super) struct Started {
    /// Its transfer id.
    pub id: u32,
    /// The server has a basis to offer a signature of.
    pub has_basis: bool,
    /// A stored file of its size could be its twin (see [`crate::twins`]).
    pub twin: bool,
}

impl BackupReceiver {
    /// Handles one entry in walk order; returns the transfer it starts, if any.
    pub(super) fn entry(&mut self, e: Entry) -> Result<Option<Started>> {
        self.stats.entries += 1;
        self.check_after_carried(&e.path)?;
        if let Some(k) = self.kept_unread.as_deref() {
            if within(k, &e.path) {
                return Err(Error::Refused(format!(
                    "entry {} sent within {}, which the client said it could not read",
                    shown(&e.path),
                    shown(k)
                )));
            }
        }
        self.pass_old_before(&e.path)?;
        let old = self.old.seek(&e.path).map_err(Error::Manifest)?;
        self.apply_entry(e, old, false)
    }

    /// The client could not read `path` (its entry is not sent) or could
    /// not list it (its entry was sent just before), and sends nothing
    /// below it: the old entries at and below it are kept, not deleted
    /// (see [`Self::replay`]). The client sends it with no file in flight,
    /// so the kept entries are written out as they are taken.
    pub fn keep_unread(&mut self, path: &[u8]) -> Result<()> {
        // The directory itself may have just been carried in a run.
        if let Some(last) = self.last_carried.take() {
            if compare_paths(&last, path) == Ordering::Greater {
                return Err(Error::Refused(format!(
                    "{} to keep sent out of order, after unchanged ones",
                    shown(path)
                )));
            }
        }
        self.pass_old_before(path)?;
        self.kept_unread = Some(path.to_vec());
        let mut n = 0u64;
        while self.old.peek().is_some_and(|p| within(path, &p.entry.path)) {
            if let Some(o) = self.old.advance().map_err(Error::Manifest)? {
                self.replay(o)?;
            }
            n += 1;
            if n.is_multiple_of(1024) {
                self.flush_slots()?;
            }
        }
        self.flush_slots()
    }

    /// Passes the old entries before `path`: the client no longer sends
    /// them, so they are deleted.
    fn pass_old_before(&mut self, path: &[u8]) -> Result<()> {
        if self
            .old
            .peek()
            .is_some_and(|p| compare_paths(&p.entry.path, path) == Ordering::Less)
        {
            self.work.needs_sweep = true;
            self.mark_changed()?;
        }
        while self
            .old
            .peek()
            .is_some_and(|p| compare_paths(&p.entry.path, path) == Ordering::Less)
        {
            self.old.advance().map_err(Error::Manifest)?;
        }
        Ok(())
    }

    /// Keeps old entry `o`, which the client could not read this time, as
    /// if it had sent it again: what is on disc is checked as for any entry
    /// (a clean `current` holds it as the manifest says). One whose stored
    /// copy no longer matches the manifest (an interrupted run changed it)
    /// cannot be received and is left out, with a warning.
    pub(super) fn replay(&mut self, o: ManifestEntry) -> Result<()> {
        // A hard link whose first name (outside the kept subtree, before
        // it) got other content in this backup: the unread link may still
        // name the old content (a file replaced) or the new (written in
        // place); which, nothing here tells. Left out, so a restore takes
        // it from the last snapshot, which holds it with the content it had.
        if let Kind::HardLink { target } = &o.entry.kind {
            if self.files.content_changed(target) {
                self.mark_changed()?;
                self.left_out(format!(
                    "{}: kept from the last backup (unreadable), a hard link to {}, whose content \
                     changed since: left out of this backup, as which content it names is not \
                     known; the last snapshot holds it",
                    crate::error::shown(&o.entry.path),
                    crate::error::shown(target)
                ));
                return Ok(());
            }
        }
        self.stats.entries += 1;
        self.stats.kept_unread += 1;
        let e = o.entry.clone();
        if self.apply_entry(e, Some(o), true)?.is_some() {
            return Err(Error::Internal("a kept entry started a transfer"));
        }
        Ok(())
    }

    /// Applies entry `e` (`old`: the old manifest's at its path); `replay`:
    /// an old entry kept for a subtree the client could not read, which
    /// must not start a transfer.
    fn apply_entry(
        &mut self,
        e: Entry,
        old: Option<ManifestEntry>,
        replay: bool,
    ) -> Result<Option<Started>> {
        if decide::disc_type_changed(old.as_ref(), &e) {
            // The old object may stay on disc until the commit's sweep.
            self.work.needs_sweep = true;
        }
        let (parent_i, fresh_parent) = self.parent_dir(&e.path)?;
        match decide::without_disc(old.as_ref(), &e, self.start.clean) {
            Some(Action::Trusted { hash }) if self.verifies(&e) && !replay => {
                return self.start_verify(e, old, hash).map(Some);
            }
            Some(Action::Trusted { hash }) => {
                if e.kind == Kind::Dir {
                    self.dirs.push(OpenDir {
                        path: e.path.clone(),
                        fd: None,
                        created: false,
                    });
                }
                self.push_ready(ManifestEntry { entry: e, hash }, old.as_ref())?;
                return Ok(None);
            }
            Some(_) => {
                self.push_ready(unhashed(e), old.as_ref())?;
                return Ok(None);
            }
            None => {}
        }
        let disk = disk_path(&e.path);
        let name = split(&disk).1.to_vec();
        let parent = self.dir_fd(parent_i)?;
        // In a directory this backup created there is nothing to look at
        // (a first backup saves a stat per entry).
        let on_disc = if fresh_parent {
            None
        } else {
            look(&parent, &name, &e).op("look at", || shown(&e.path))?
        };
        match decide::with_disc(old.as_ref(), &e, on_disc.as_ref()) {
            Action::KeepDir => self.enter_dir(e, &parent, &name, false, old),
            Action::MakeDir { replace } => {
                self.make_dir(&e.path, &parent, &name, replace)?;
                self.enter_dir(e, &parent, &name, !replace, old)
            }
            Action::KeepSymlink => self.keep(unhashed(e), old),
            Action::MakeSymlink => self.make_symlink(e, &parent, &name, old),
            Action::KeepFile { hash } => {
                let vouched = hash.is_some();
                let hash = match hash.map_or_else(|| hash_stored(&parent, &name), Ok) {
                    Ok(h) => h,
                    // Written by an interrupted run (so not in the manifest
                    // yet) and unreadable now: received whole again, rather
                    // than failing this backup and every one after it.
                    Err(err) if !replay => {
                        self.warn(format!(
                            "{}: cannot read its stored copy ({err}); received again",
                            shown(&e.path)
                        ));
                        return self.start_file(e, old, false, None).map(Some);
                    }
                    Err(err) => return Err(err).op("read the stored copy of", || shown(&e.path)),
                };
                // After a crash its data may not be what was written; and
                // in byteback 1.x's `current`, until a byteback backup
                // commits into it, nothing vouches for what is stored:
                // rsync kept files by size and mtime too, so a stale or
                // damaged copy must not be certified by its own hash. (A
                // first backup of byteback's own cut short has no
                // manifest either, but what it kept it verified.)
                let unvouched = self.start.suspect || self.start.takeover;
                let suspect = !vouched && unvouched && e.size() > 0;
                if (self.verifies(&e) || suspect) && !replay {
                    return self.start_verify(e, old, hash).map(Some);
                }
                self.keep(ManifestEntry { entry: e, hash }, old)
            }
            Action::Receive { .. } if replay => {
                // Not what the manifest says, and not readable on the client.
                self.work.needs_sweep = true;
                self.mark_changed()?;
                self.left_out(format!(
                    "{}: the client could not read it, and its stored copy is not the one the last backup recorded: left out",
                    shown(&e.path)
                ));
                Ok(None)
            }
            Action::Receive {
                in_place,
                stored_basis,
            } => {
                let stored = on_disc.filter(|_| stored_basis).map(|d| d.size);
                self.start_file(e, old, in_place, stored).map(Some)
            }
            Action::Trusted { .. } | Action::ManifestOnly => self.keep(unhashed(e), old),
        }
    }

    /// Creates symlink `e` as `name` in `parent`, in place of whatever is
    /// there.
    fn make_symlink(
        &mut self,
        e: Entry,
        parent: &OwnedFd,
        name: &[u8],
        old: Option<ManifestEntry>,
    ) -> Result<Option<Started>> {
        self.touch()?;
        if let Kind::Symlink { target } = &e.kind {
            self.with_room(
                || format!("creating symlink {:?}", shown(&e.path)),
                |_| {
                    fsops::remove_any(parent, name).op("replace", || shown(&e.path))?;
                    created(|| fsops::symlink(parent, name, target))
                        .op("create symlink", || shown(&e.path))
                },
            )?;
            self.grew_metadata(target.len());
        }
        self.keep(unhashed(e), old)
    }

    /// Whether file `e`, kept by its size and mtime, must have its content
    /// compared too (checksum mode; an empty file has nothing to compare).
    fn verifies(&self, e: &Entry) -> bool {
        self.checksum && matches!(e.kind, Kind::File { size } if size > 0)
    }

    /// Checksum mode: file `e`'s stored copy has its size and mtime and,
    /// by the manifest (or hashed just now), content `hash`. The client is
    /// asked for its BLAKE3 first (`twin` with a basis): the same keeps the
    /// stored copy untouched ([`BackupReceiver::offer`]); another makes it
    /// a changed file, received against the stored copy.
    fn start_verify(
        &mut self,
        e: Entry,
        old: Option<ManifestEntry>,
        hash: [u8; 32],
    ) -> Result<Started> {
        let size = e.size();
        let started = self.start_transfer(e, old, false, Some(size))?;
        self.transfer(started.id)?.verify = Some(hash);
        Ok(Started {
            twin: true,
            ..started
        })
    }

    /// Creates directory `name` in `parent` (`replace`: over whatever is there).
    fn make_dir(
        &mut self,
        path: &[u8],
        parent: &OwnedFd,
        name: &[u8],
        replace: bool,
    ) -> Result<()> {
        self.touch()?;
        self.with_room(
            || format!("creating directory {:?}", shown(path)),
            |_| {
                created(|| {
                    if replace {
                        fsops::ensure_dir(parent, name, 0o700)
                    } else {
                        let mode = rustix::fs::Mode::from_raw_mode(0o700);
                        rustix::fs::mkdirat(parent, os(name), mode).map_err(std::io::Error::from)
                    }
                })
                .op("create directory", || shown(path))
            },
        )?;
        self.grew_metadata(0);
        Ok(())
    }

    /// Counts an object this backup created (and `inline` bytes of it kept
    /// in the filesystem's metadata, a symlink's target) as written: a
    /// client must not fill the disc with empty objects unseen by the
    /// growth guard.
    pub(super) fn grew_metadata(&mut self, inline: usize) {
        self.grown = self.grown.saturating_add(super::INODE_COST + inline as u64);
    }

    fn keep(&mut self, me: ManifestEntry, old: Option<ManifestEntry>) -> Result<Option<Started>> {
        self.push_ready(me, old.as_ref())?;
        Ok(None)
    }

    /// Records directory `e` (present at `name` in `parent`) and makes it
    /// the innermost of the directory chain; `created`: by this backup.
    fn enter_dir(
        &mut self,
        e: Entry,
        parent: &OwnedFd,
        name: &[u8],
        created: bool,
        old: Option<ManifestEntry>,
    ) -> Result<Option<Started>> {
        let fd = fsops::open_dir(parent, name).op("open directory", || shown(&e.path))?;
        self.dirs.push(OpenDir {
            path: e.path.clone(),
            fd: Some(fd),
            created,
        });
        self.keep(unhashed(e), old)
    }

    /// Starts receiving file `e` into `name` in `parent` (`in_place`:
    /// nothing is there) or into its rebuild in `.byteback/partial`, with
    /// the stored copy (`stored`: its size) and an earlier run's rebuild as
    /// the basis. Nothing is opened yet: the basis and the file written are
    /// opened when the transfer starts (its signature asked for, or its
    /// first data; see `open_files`), so a window of entries holds no
    /// descriptors, only the files in flight do.
    fn start_file(
        &mut self,
        e: Entry,
        old: Option<ManifestEntry>,
        in_place: bool,
        stored: Option<u64>,
    ) -> Result<Started> {
        self.touch()?;
        self.start_transfer(e, old, in_place, stored)
    }

    /// [`Self::start_file`] without touching `current`: for a file checksum
    /// mode may keep as it is (its transfer touches it once it opens).
    fn start_transfer(
        &mut self,
        e: Entry,
        old: Option<ManifestEntry>,
        in_place: bool,
        stored: Option<u64>,
    ) -> Result<Started> {
        // In a clean `current`, a stored copy of the manifest's size holds
        // the manifest's content.
        let vouched = old
            .as_ref()
            .filter(|o| self.start.clean && stored == Some(o.entry.size()));
        let stored_hash = vouched.map(|o| o.hash);
        let old_copy = match &old {
            Some(o)
                if matches!(o.entry.kind, Kind::File { .. })
                    && !in_place
                    && stored == Some(o.entry.size()) =>
            {
                if self.start.clean {
                    OldCopy::Vouched
                } else {
                    OldCopy::Unverified
                }
            }
            _ => OldCopy::Gone,
        };
        let partial = partial_name(&e.path);
        // A kept rebuild needs a file that was there when it was made, and
        // the commit or a start on a short disc that removed that file
        // removed the rebuilds too.
        let prev = if in_place {
            None
        } else {
            self.take_partial(&partial)?
        };
        let has_prev = prev.is_some();
        let basis_hash = stored_hash.filter(|_| !has_prev);
        let has_basis = prev.is_some() || stored.is_some();
        let id = self.next_id;
        self.next_id += 1;
        let size = e.size();
        let twin = !has_basis && size >= TWIN_MIN && self.twins().has_size(size);
        let seq = self.slots.push(Slot::Waiting, e.buffer_cost())?;
        let lease = sigs::keeps(size).then(|| self.kept.lease(size)).flatten();
        let (old, old_cost, old_trimmed) = self.hold_old(old);
        self.transfers.insert(
            id,
            Box::new(Transfer {
                seq,
                entry: e,
                old,
                old_cost,
                old_trimmed,
                partial,
                has_prev,
                in_place,
                old_copy,
                retried: false,
                nospace_rounds: 0,
                fds: 0,
                to_open: Some(ToOpen {
                    prev,
                    stored,
                    vouched: stored_hash,
                }),
                verified: None,
                writer: FileWriter::new(None, None, size, lease),
                basis_hash,
                verify: None,
            }),
        );
        Ok(Started {
            id,
            has_basis,
            twin,
        })
    }
}

/// Creates something with `make`, unless the tests inject a no-space
/// error for it (see `test_fault`).
fn created<T>(make: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    match super::transfer::test_fault::no_space(super::transfer::test_fault::CREATE) {
        Some(e) => Err(e),
        None => make(),
    }
}

/// A manifest entry without content hash (anything but a regular file).
fn unhashed(entry: Entry) -> ManifestEntry {
    ManifestEntry {
        entry,
        hash: [0; 32],
    }
}

/// What is at `name` in `parent`, for the decision about `e`.
fn look(parent: &OwnedFd, name: &[u8], e: &Entry) -> std::io::Result<Option<OnDisc>> {
    let Some(st) = fsops::lstat_at(parent, name)? else {
        return Ok(None);
    };
    let kind = fsops::file_type(&st);
    let same_target = match (&e.kind, kind) {
        (Kind::Symlink { target }, FileType::Symlink) => fsops::read_link(parent, name)? == *target,
        _ => false,
    };
    Ok(Some(OnDisc {
        kind,
        size: st.st_size as u64,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        same_target,
    }))
}

/// BLAKE3 of the stored file `name` in `parent` (client path `path`).
fn hash_stored(parent: &OwnedFd, name: &[u8]) -> std::io::Result<[u8; 32]> {
    if let Some(e) = super::transfer::test_fault::eio(name) {
        return Err(e);
    }
    fsops::open_file(parent, name).and_then(|f| hash_file(&f))
}

fn os(p: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(p)
}

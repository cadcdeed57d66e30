//! The messages of one file transfer: the basis's signature, delta
//! segments, the end (verify, then into place, or a resend), and an abort.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use byteback_delta::SignatureBuilder;
use byteback_protocol::{Kind, ManifestEntry};

use super::partial::prev_name;
use super::sink::{count_dropped, Basis, BasisPart, Chunk, IO_CHUNK};
use super::slots::Slot;
use super::sweep::remove_in_place;
use super::{
    BackupReceiver, LastParent, OldCopy, ToOpen, Transfer, TransferResult, Verified,
    FDS_PER_TRANSFER,
};
use crate::error::{shown, Error, IoContext, Result};
use crate::fsops::{self, split};
use crate::store::disk_path;

impl BackupReceiver {
    pub(super) fn transfer(&mut self, id: u32) -> Result<&mut Transfer> {
        self.transfers
            .get_mut(&id)
            .map(|t| &mut **t)
            .ok_or_else(|| unknown(id))
    }

    /// Signature of the basis of transfer `id`, as it is sent: its strong
    /// hashes cut to [`byteback_delta::wire_strong_len`] bytes.
    pub fn signature(&mut self, id: u32) -> Result<Vec<u8>> {
        self.open_files(id)?;
        let len = self
            .transfer(id)?
            .writer
            .basis
            .as_ref()
            .map_or(0, Basis::len);
        let sig = self.full_signature(id)?;
        Ok(byteback_delta::shorten_signature(
            sig,
            byteback_delta::wire_strong_len(len),
        ))
    }

    /// Signature of the basis of transfer `id`. A stored copy that cannot be
    /// read is dropped as a basis (with a warning): the client then sends
    /// the whole file, so an unreadable stored file is resent, never fatal.
    fn full_signature(&mut self, id: u32) -> Result<Vec<u8>> {
        let t = self.transfers.get(&id).ok_or_else(|| unknown(id))?;
        // The session lets only a transfer with a basis ask; none is left
        // when its stored copy could not be opened (said then): the
        // signature of nothing makes the client send it whole.
        let Some(basis) = t.writer.basis.as_ref() else {
            return Ok(SignatureBuilder::new(0).finish().0);
        };
        if let (Some(hash), [part]) = (t.basis_hash, &basis.parts[..]) {
            if let Some(sig) = self.sigs.load(&hash, basis.len()) {
                let len = basis.len();
                // Copies from it to the same offset need no reading if it
                // still has the manifest's mtime and its digests are kept.
                let same_mtime = t.old.as_ref().is_some_and(|o| {
                    fsops::mtime_of(&part.file)
                        .is_ok_and(|m| m == (o.entry.mtime_sec, o.entry.mtime_nsec))
                });
                let digest = same_mtime
                    .then(|| self.sigs.load_digest(&hash, len, &sig))
                    .flatten();
                // Held as long as the transfer, from the budget of kept
                // digests: by the stored copy's size (a client could
                // otherwise hold a huge copy's values for each small file).
                if let Some(d) = digest {
                    let t = self.transfers.get_mut(&id).ok_or_else(|| unknown(id))?;
                    if t.writer.use_basis_digest(d, &self.kept) {
                        self.sigs.digests_used += 1;
                    }
                }
                return Ok(sig);
            }
        }
        match sign(basis) {
            Ok(sig) => Ok(sig),
            Err(e) => {
                let path = shown(&t.entry.path);
                self.warn(format!(
                    "{path}: cannot read the stored copy ({e}); sent again whole"
                ));
                self.drop_prev(id)?;
                Ok(SignatureBuilder::new(0).finish().0)
            }
        }
    }

    /// Opens what transfer `id` works on, once, when it starts (its
    /// signature asked for, its first data, its end or an offer): its basis
    /// (an earlier run's rebuild, then the stored copy) and the file it
    /// writes. Until then a transfer holds no descriptor, so they are
    /// bounded by the files in flight, not by the client's window.
    pub(super) fn open_files(&mut self, id: u32) -> Result<()> {
        let t = self.transfer(id)?;
        if t.to_open.is_none() && t.writer.is_open() {
            return Ok(());
        }
        if self.held_fds + FDS_PER_TRANSFER > self.max_held_fds {
            return Err(Error::Refused(format!(
                "more files in flight than the open-file limit allows ({} descriptors held); an honest client has about one per delta thread",
                self.held_fds
            )));
        }
        if self.transfer(id)?.verify.is_some() {
            // Checksum mode, the content differs: `current` changes after all.
            self.touch()?;
        }
        if let Some(to_open) = self.transfer(id)?.to_open.take() {
            self.open_basis(id, to_open)?;
        }
        self.open_out(id)
    }

    /// Closes transfer `id`'s basis, if it is open.
    pub(super) fn drop_basis(&mut self, id: u32) -> Result<()> {
        let t = self.transfer(id)?;
        let parts = t.writer.basis.take().map_or(0, |b| b.parts.len());
        t.fds = t.fds.saturating_sub(parts);
        self.held_fds = self.held_fds.saturating_sub(parts);
        Ok(())
    }

    /// Opens the basis of transfer `id`. An earlier run's rebuild that is
    /// gone is left out (the stored copy alone is then the basis, and its
    /// kept signature may serve); a stored copy that cannot be opened is
    /// too, with a warning (the file is then sent whole). Running out of
    /// descriptors or memory is an error.
    fn open_basis(&mut self, id: u32, to_open: ToOpen) -> Result<()> {
        let t = self.transfer(id)?;
        let (partial, path) = (t.partial.clone(), t.entry.path.clone());
        let mut parts = vec![];
        let mut start = 0;
        if let Some(len) = to_open.prev {
            match self.open_prev(&partial, len)? {
                Some(file) => {
                    parts.push(BasisPart { file, start, len });
                    start += len;
                }
                None => {
                    let t = self.transfer(id)?;
                    t.has_prev = false;
                    t.basis_hash = to_open.vouched;
                }
            }
        }
        if let Some(seen) = to_open.stored {
            let opened = in_parent(&self.current, &mut self.last_parent, &path, |p, n| {
                fsops::open_file(p, n)
            })
            .and_then(|r| r)
            .and_then(|f| f.metadata().map(|m| (m.len(), f)));
            match opened {
                Ok((len, file)) => {
                    if len != seen {
                        // Not what the manifest vouched for any more.
                        self.transfer(id)?.basis_hash = None;
                    }
                    parts.push(BasisPart { file, start, len });
                }
                Err(e) if fsops::out_of_resources(&e) => {
                    return Err(e).op("open the stored copy of", || shown(&path));
                }
                Err(e) => {
                    self.transfer(id)?.basis_hash = None;
                    self.warn(format!(
                        "{}: cannot open the stored copy ({e}); sent again whole",
                        shown(&path)
                    ));
                }
            }
        }
        let t = self.transfer(id)?;
        t.fds += parts.len();
        self.held_fds += parts.len();
        if !parts.is_empty() {
            self.transfer(id)?.writer.basis = Some(Basis { parts });
        }
        Ok(())
    }

    /// Creates the file transfer `id` writes if it is not yet: its rebuild
    /// in `.byteback/partial`, or the file at its own path (nothing was
    /// there), exclusively.
    fn open_out(&mut self, id: u32) -> Result<()> {
        let t = self.transfer(id)?;
        if t.writer.is_open() {
            return Ok(());
        }
        let (in_place, partial, path) = (t.in_place, t.partial.clone(), t.entry.path.clone());
        let created = self.with_room(
            || format!("creating {:?}", shown(&path)),
            |rx| {
                if let Some(e) = test_fault::no_space(test_fault::CREATE) {
                    return Err(e).op("create", || shown(&path));
                }
                if in_place {
                    in_parent(&rx.current, &mut rx.last_parent, &path, |p, n| {
                        fsops::create_new(p, n)
                    })
                    .op("open the directory of", || shown(&path))?
                    .op("create", || shown(&path))
                } else {
                    // `take_partial` left nothing at that name.
                    fsops::create_new(&rx.partial, &partial)
                        .op("create", || rx.partial_path(&partial))
                }
            },
        )?;
        let t = self.transfer(id)?;
        t.writer.open(created);
        t.fds += 1;
        self.held_fds += 1;
        Ok(())
    }

    /// Applies one delta segment to transfer `id`.
    pub fn data(&mut self, id: u32, delta: Chunk<'_>) -> Result<()> {
        self.open_files(id)?;
        let t = self.transfers.get_mut(&id).ok_or_else(|| unknown(id))?;
        if t.writer.nospace {
            // Dropped undecoded: the end asks for room and a resend.
            let n = count_dropped(delta.raw_len(), delta.wire_len());
            t.writer.attempted = t.writer.attempted.saturating_add(n);
            return Ok(());
        }
        let raw = self.decoder.decode(delta)?;
        let t = self.transfers.get_mut(&id).ok_or_else(|| unknown(id))?;
        let applied = t
            .writer
            .write(raw, t.entry.size(), &t.entry.path, &mut self.clone_ok)?;
        t.writer.counted.add(applied);
        self.grown = self.grown.saturating_add(applied.grown());
        self.stats.matched_bytes += applied.matched;
        self.stats.literal_bytes += applied.literal;
        Ok(())
    }

    /// Finishes transfer `id`: verify, rename into place, record.
    pub fn end(
        &mut self,
        id: u32,
        size: u64,
        hash: [u8; 32],
        mtime: (i64, u32),
    ) -> Result<TransferResult> {
        self.open_files(id)?;
        let t = self.transfer(id)?;
        if t.writer.nospace {
            let path = String::from_utf8_lossy(&t.entry.path).into_owned();
            t.nospace_rounds += 1;
            if t.nospace_rounds > 3 {
                return Err(Error::Store(format!(
                    "no space left on device storing {path:?}, even after making room three times"
                )));
            }
            // Room for what the client sent, not for what it declared.
            let need = size.min(t.writer.attempted);
            let quota = t.writer.quota;
            // What this attempt wrote is thrown away: not the backup's growth.
            let counted = t.writer.counted;
            self.stats.literal_bytes = self.stats.literal_bytes.saturating_sub(counted.literal);
            self.stats.matched_bytes = self.stats.matched_bytes.saturating_sub(counted.matched);
            self.grown = self.grown.saturating_sub(counted.grown());
            if quota {
                // The backup fails (see `make_room`); emptying the file may
                // need quota too, and the receiver's end removes it.
                return Ok(TransferResult::NoSpace { path, need, quota });
            }
            // Its earlier rebuild goes too: the space is needed.
            self.drop_prev(id)?;
            let t = self.transfer(id)?;
            t.writer.restart().op("empty", || shown(&t.entry.path))?;
            return Ok(TransferResult::NoSpace { path, need, quota });
        }
        let ok = t
            .writer
            .verify(size, &hash)
            .op("read back", || shown(&t.entry.path))?;
        if !ok {
            if !t.retried {
                // Never commit a file that fails its hash: start over without a basis.
                t.retried = true;
                self.drop_prev(id)?;
                let t = self.transfer(id)?;
                t.writer.restart().op("empty", || shown(&t.entry.path))?;
                self.stats.retried += 1;
                return Ok(TransferResult::Retry);
            }
            let path = shown(&t.entry.path);
            self.left_out(format!(
                "{path}: content failed its BLAKE3 check twice; kept the previous version"
            ));
            return self.abort(id);
        }
        let sig = t
            .writer
            .take_kept(size)
            .op("read back", || shown(&t.entry.path))?;
        t.verified = Some(Verified {
            size,
            hash,
            mtime,
            sig,
        });
        self.place(id)
    }

    /// Puts verified transfer `id` in place: sets its length and mtime,
    /// renames its rebuild over the stored copy, records it. When that runs
    /// out of space (btrfs needs metadata space for a rename), room is made
    /// and it is tried again (see [`super::room`]); the data is not sent
    /// again.
    fn place(&mut self, id: u32) -> Result<TransferResult> {
        let t = self.transfer(id)?;
        let Some((size, mtime)) = t.verified.as_ref().map(|v| (v.size, v.mtime)) else {
            return Err(Error::Refused(format!("transfer {id} is not verified")));
        };
        // A new file under the size and mtime the old manifest gives it
        // (checksum mode found other content, a client whose file ended
        // with the old mtime, or the same content sent again after
        // `verify` marked the stored copy): after a crash that lost its
        // data, it would pass for the copy the manifest vouches for.
        let collides = t.old.as_ref().is_some_and(|o| {
            o.entry.kind == Kind::File { size } && (o.entry.mtime_sec, o.entry.mtime_nsec) == mtime
        });
        let (path, partial, in_place) = (t.entry.path.clone(), t.partial.clone(), t.in_place);
        self.with_room(
            || format!("putting {:?} in place", shown(&path)),
            |rx| {
                let t = rx.transfer(id)?;
                let finished = t.writer.finish(size, on_disc_mtime(collides, mtime));
                finished
                    .and_then(|()| match in_place {
                        false => rx.try_rename_into_place(&path, &partial),
                        true => Ok(()),
                    })
                    .op("put in place", || shown(&path))
            },
        )?;
        // Each entry's own cost too, not its path's alone.
        let cost = path.len() + 64;
        if collides && self.work.offset_bytes + cost <= super::MAX_OFFSET_BYTES {
            self.work.offset_bytes += cost;
            self.work.offset.push((path.clone(), mtime));
        }
        let mut t = self.transfers.remove(&id).ok_or_else(|| unknown(id))?;
        self.held_fds = self.held_fds.saturating_sub(t.fds);
        self.old_held = self.old_held.saturating_sub(t.old_cost);
        // A new inode, whatever its data cost.
        self.grew_metadata(0);
        let Verified {
            size,
            hash,
            mtime,
            sig,
        } = t.verified.take().ok_or_else(|| unknown(id))?;
        self.sigs.reread += t.writer.reread();
        drop(t.writer);
        t.entry.kind = Kind::File { size };
        t.entry.mtime_sec = mtime.0;
        t.entry.mtime_nsec = mtime.1;
        if t.has_prev {
            let prev = prev_name(&t.partial);
            fsops::remove_any(&self.partial, &prev).op("remove", || self.partial_path(&prev))?;
        }
        if let Some(kept) = sig {
            let before = self.sigs.written;
            if let Some(w) = self.sigs.keep(&hash, size, kept) {
                self.warn(w);
            }
            // A new file (an inode each) and its bytes, as any.
            let written = self.sigs.written - before;
            if written > 0 {
                self.grown = self
                    .grown
                    .saturating_add(written)
                    .saturating_add(2 * super::INODE_COST);
            }
        }
        self.stats.files_transferred += 1;
        let cost = t.entry.buffer_cost();
        let me = ManifestEntry {
            entry: t.entry,
            hash,
        };
        self.files.note_content(&me, t.old.as_ref());
        self.slots.set(t.seq, Slot::Ready(me), cost);
        self.flush_slots()?;
        Ok(TransferResult::Done)
    }

    /// Renames a verified rebuild from `.byteback/partial` over the stored copy.
    fn try_rename_into_place(&mut self, path: &[u8], partial: &[u8]) -> io::Result<()> {
        let from = &self.partial;
        in_parent(
            &self.current,
            &mut self.last_parent,
            path,
            |parent, name| {
                test_fault::no_space(test_fault::RENAME)
                    .map_or_else(|| fsops::replace(from, partial, parent, name), Err)
            },
        )?
    }

    /// Gives up on transfer `id`; the previous version, if any, stays.
    pub fn abort(&mut self, id: u32) -> Result<TransferResult> {
        let t = *self.transfers.remove(&id).ok_or_else(|| unknown(id))?;
        self.held_fds = self.held_fds.saturating_sub(t.fds);
        self.old_held = self.old_held.saturating_sub(t.old_cost);
        let created = t.writer.is_open();
        drop(t.writer);
        if t.in_place {
            // Nothing was at its path before: take the unverified file
            // away (if it was created at all).
            if created {
                remove_in_place(&self.current, &t.entry.path)?;
            }
        } else {
            fsops::remove_any(&self.partial, &t.partial)
                .op("remove", || self.partial_path(&t.partial))?;
        }
        if t.has_prev {
            let prev = prev_name(&t.partial);
            fsops::remove_any(&self.partial, &prev).op("remove", || self.partial_path(&prev))?;
        }
        // The old copy in `current` was not touched: its manifest entry
        // still holds if that copy is the old manifest's file.
        let cost = t.entry.buffer_cost();
        let slot = match t.old {
            Some(o) if self.old_copy_stays(t.old_copy, &o)? => {
                if t.old_trimmed {
                    // Not the old manifest's entry any more.
                    self.mark_changed()?;
                    self.left_out(format!(
                        "{}: kept at its last version without its xattrs (the server held too \
                         many old entries' xattrs for the files in flight)",
                        shown(&o.entry.path)
                    ));
                }
                Slot::Ready(o)
            }
            _ => {
                // Whatever is at its path goes with the commit's sweep.
                self.work.needs_sweep = true;
                Slot::Dropped(cost)
            }
        };
        self.slots.set(t.seq, slot, cost);
        self.flush_slots()?;
        Ok(TransferResult::Done)
    }
}

impl BackupReceiver {
    /// Whether the file at `old`'s path in `current` is the one `old`
    /// describes, for a transfer given up (see [`OldCopy`]).
    fn old_copy_stays(&mut self, copy: OldCopy, old: &ManifestEntry) -> Result<bool> {
        match copy {
            OldCopy::Vouched => Ok(true),
            OldCopy::Gone => Ok(false),
            OldCopy::Unverified => {
                let hashed = in_parent(
                    &self.current,
                    &mut self.last_parent,
                    &old.entry.path,
                    |parent, name| {
                        fsops::open_file(parent, name).and_then(|f| super::sink::hash_file(&f))
                    },
                );
                match hashed {
                    Ok(Ok(h)) => Ok(h == old.hash),
                    Ok(Err(e)) | Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    // Unreadable: not vouched for, so not kept (failing here
                    // would fail every backup until someone steps in).
                    Ok(Err(e)) | Err(e) => {
                        self.warn(format!(
                            "{}: cannot read its stored copy ({e}); its last backed-up version is not kept",
                            shown(&old.entry.path)
                        ));
                        Ok(false)
                    }
                }
            }
        }
    }
}

/// Faults the tests inject where the kernel gives them only by chance.
/// Debug builds only: a release build has none.
pub(super) mod test_fault {
    /// `BYTEBACK_TEST_NO_SPACE_RENAME`: renames into place.
    pub const RENAME: usize = 0;
    /// `BYTEBACK_TEST_NO_SPACE_CREATE`: files, directories and symlinks
    /// created in `current`, and new manifests started.
    pub const CREATE: usize = 1;
    /// `BYTEBACK_TEST_NO_SPACE_MANIFEST`: the new manifest's last write.
    pub const MANIFEST: usize = 2;

    /// `ENOSPC` for operations of kind `which`, as its variable says,
    /// read once: `N`, the first N; `N,runs=R`, runs of R failures with
    /// one success between them, until N have failed; `N,alternate`, the
    /// same with runs of one (each operation fails once, its retry
    /// succeeds).
    #[cfg(debug_assertions)]
    pub fn no_space(which: usize) -> Option<std::io::Error> {
        use std::sync::atomic::{AtomicI64, Ordering};
        use std::sync::OnceLock;
        const VARS: [&str; 3] = [
            "BYTEBACK_TEST_NO_SPACE_RENAME",
            "BYTEBACK_TEST_NO_SPACE_CREATE",
            "BYTEBACK_TEST_NO_SPACE_MANIFEST",
        ];
        // Failures left, the length of a run, calls so far.
        static LEFT: [OnceLock<(AtomicI64, i64, AtomicI64)>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let (left, run, calls) = LEFT[which].get_or_init(|| {
            let v = std::env::var(VARS[which]).unwrap_or_default();
            let (n, run) = match v.split_once(',') {
                Some((n, "alternate")) => (n, 1),
                Some((n, r)) => (
                    n,
                    r.strip_prefix("runs=")
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(i64::MAX),
                ),
                None => (v.as_str(), i64::MAX),
            };
            (
                AtomicI64::new(n.parse().unwrap_or(0)),
                run.max(1),
                AtomicI64::new(0),
            )
        });
        let call = calls.fetch_add(1, Ordering::Relaxed);
        if *run < i64::MAX && call % (run + 1) == *run {
            return None;
        }
        (left.fetch_sub(1, Ordering::Relaxed) > 0)
            .then(|| std::io::Error::from_raw_os_error(libc::ENOSPC))
    }

    #[cfg(not(debug_assertions))]
    pub fn no_space(_which: usize) -> Option<std::io::Error> {
        None
    }

    /// `BYTEBACK_TEST_SERVER_EIO=NAME`: reading a stored file named NAME
    /// (its last component) to hash it fails with EIO, as on a failing disc.
    #[cfg(debug_assertions)]
    pub fn eio(name: &[u8]) -> Option<std::io::Error> {
        let want = std::env::var_os("BYTEBACK_TEST_SERVER_EIO")?;
        let last = name.rsplit(|b| *b == b'/').next()?;
        (last == std::os::unix::ffi::OsStrExt::as_bytes(want.as_os_str()))
            .then(|| std::io::Error::from_raw_os_error(libc::EIO))
    }

    #[cfg(not(debug_assertions))]
    pub fn eio(_name: &[u8]) -> Option<std::io::Error> {
        None
    }
}

/// Runs `f` on the parent directory of client path `path`, opened beneath
/// `current` (or kept in `last` from the last file created or renamed
/// there, most often the same one), and the path's last name. The outer
/// error is opening the directory.
fn in_parent<T>(
    current: &OwnedFd,
    last: &mut Option<LastParent>,
    path: &[u8],
    f: impl FnOnce(&OwnedFd, &[u8]) -> io::Result<T>,
) -> io::Result<io::Result<T>> {
    let disk = disk_path(path);
    let (pdir, name) = split(&disk);
    let parent = match last.take() {
        Some(l) if l.path == pdir => l.fd,
        _ => fsops::open_dir(current, pdir)?,
    };
    let done = f(&parent, name);
    *last = Some(LastParent {
        path: pdir.to_vec(),
        fd: parent,
    });
    Ok(done)
}

/// The mtime a placed file gets on disc: the client's, except for a file
/// placed under the old manifest's size and mtime (`collides`), which
/// gets it a second earlier. Otherwise a run interrupted after placing it
/// (its data lost with the power) leaves a file the next run (with
/// `current` not clean) would take for the copy the old manifest vouches
/// for by its size and mtime, recording the old hash. A whole second,
/// not a nanosecond: a store may keep whole seconds only (ext4 with
/// 128-byte inodes), which would round a nanosecond off back to the old
/// mtime. The manifest keeps the client's mtime, which is what a restore
/// sets.
fn on_disc_mtime(collides: bool, (sec, nsec): (i64, u32)) -> (i64, u32) {
    match collides {
        false => (sec, nsec),
        true => (sec.saturating_sub(1), nsec),
    }
}

/// A transfer id the client never got or already finished.
pub(super) fn unknown(id: u32) -> Error {
    Error::Refused(format!("unknown transfer {id}"))
}

/// The block signature of a whole basis.
fn sign(basis: &Basis) -> io::Result<Vec<u8>> {
    let mut b = SignatureBuilder::new(basis.len());
    let mut buf = vec![0u8; IO_CHUNK];
    for part in &basis.parts {
        let mut off = 0u64;
        while off < part.len {
            let want = IO_CHUNK.min((part.len - off) as usize);
            let n = part.file.read_at(&mut buf[..want], off)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "it became shorter",
                ));
            }
            b.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(b.finish().0)
}

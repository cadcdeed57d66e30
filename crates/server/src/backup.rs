//! Receiving a backup into `current`.
//!
//! Entries arrive in walk order and are merged against the last committed
//! manifest as a stream. A regular file whose copy in `current` has the same
//! size and mtime costs nothing; any other file is rebuilt in
//! `.byteback/partial`, from cloned or copied ranges of the old copy plus literal
//! data, checked against the client's BLAKE3, and renamed into place. A file
//! whose path is free in `current` is written there directly (created with
//! `O_EXCL` in its parent, itself opened beneath `current`), saving the
//! rename; it gets the client's mtime only once its hash checks out and is
//! deleted if it never does, so until then it can never pass for a stored
//! copy (the next run compares size and mtime), and a manifest only ever
//! names verified files. The new
//! manifest is written as entries resolve; commit deletes what the manifest no
//! longer names, syncs the filesystem once, and renames the manifest into place.
//!
//! Resuming: an interrupted transfer (client gone, connection cut, server
//! killed) leaves what it wrote: a new file at its own path (never with the
//! client's mtime, so it never passes for a stored copy), a rebuild in
//! `.byteback/partial/<hash of the path>`. The next run offers the client a
//! signature over a *virtual basis*: that partial rebuild's prefix followed
//! by the stored copy, so everything already received matches and only the
//! rest travels. The result is checked against the client's BLAKE3 as any
//! other; a rebuild left over is renamed `<name>.prev` while the next one is
//! written, and the longer of the two is kept when that one is interrupted
//! too. Partials are never trusted (only matched block by block), never in
//! a snapshot (the commit removes `.byteback/partial` before it syncs), and
//! the first to go when the disc is full.
//!
//! A commit leaves a `clean` marker in `.byteback`: `current` then holds
//! exactly what its manifest names. The first change of a later backup
//! removes the marker (durably) before touching anything. While it is there,
//! an entry that matches the manifest needs no look at the disc, and a backup
//! in which nothing differs from the manifest commits nothing: no new
//! manifest, no deletion walk, no sync.

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use byteback_delta::{apply_ops, DeltaError, FileHasher, PatchSink, SignatureBuilder};
use byteback_protocol::codec::ChunkDecompressor;
use byteback_protocol::limits::{MAX_BUFFERED_BYTES, MAX_PENDING, TWIN_MIN};
use byteback_protocol::{compare_paths, BackupStats, Compressed, Entry, Kind, ManifestEntry, Need};
use rustix::fs::FileType;

use crate::fsops::{self, split};
use crate::manifest::{ManifestReader, ManifestWriter, PeekableManifest};
use crate::store::{disk_path, HostStore, META_DIR, META_DIR_NAME};
use crate::twins::{self, TwinIndex};

const FS_BLOCK: u64 = 4096;
const IO_CHUNK: usize = 1 << 20;
/// Start writeback of a file being received every this many bytes.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Marker in `.byteback`: `current` matches its manifest exactly.
const CLEAN: &[u8] = b"clean";
/// The manifest of `current`, in `.byteback`.
const MANIFEST: &[u8] = b"manifest";
/// A damaged manifest set aside; the next backup recovers one.
const DAMAGED: &[u8] = b"manifest.damaged";
/// Directory in `.byteback` of rebuilds of changed files, kept when interrupted.
const PARTIAL: &[u8] = b"partial";
/// Suffix of a partial rebuild from an earlier run, while it serves as a basis.
const PREV: &[u8] = b".prev";
/// Marker in `.byteback`: a backup ran out of space since the last commit,
/// so the next one starts by removing what failed runs left.
const NO_SPACE: &[u8] = b"nospace";

/// Name in `.byteback/partial` of the rebuild of client path `path`.
fn partial_name(path: &[u8]) -> Vec<u8> {
    let h = byteback_delta::hash_bytes(path);
    let mut s = Vec::with_capacity(32);
    for b in &h[..16] {
        s.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    s
}

fn prev_name(name: &[u8]) -> Vec<u8> {
    [name, PREV].concat()
}

/// What a delta's copies read from: the prefix of an interrupted rebuild of
/// the same file, if one was kept, followed by the stored copy, if any. A
/// copy is served from whichever part holds its offset.
struct Basis {
    /// (file, start in the virtual basis, length).
    parts: Vec<(File, u64, u64)>,
}

impl Basis {
    fn len(&self) -> u64 {
        self.parts.last().map(|(_, s, l)| s + l).unwrap_or(0)
    }

    /// The part holding virtual offset `off`: its file, the offset in it and
    /// how many bytes of the part are left from there.
    fn locate(&self, off: u64) -> Option<(&File, u64, u64)> {
        self.parts
            .iter()
            .find(|(_, s, l)| off >= *s && off < s + l)
            .map(|(f, s, l)| (f, off - s, s + l - off))
    }
}

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
fn recover_manifest(host: &HostStore, meta: impl AsFd, manifest_path: &std::path::Path) -> String {
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

enum Slot {
    Ready(ManifestEntry),
    Waiting,
    /// Given up; carries the cost it was admitted with.
    Dropped(usize),
}

struct Transfer {
    seq: u64,
    entry: Entry,
    old: Option<ManifestEntry>,
    basis: Option<Basis>,
    basis_len: u64,
    out: File,
    /// Name of its rebuild in `.byteback/partial` (unused when written in place).
    partial: Vec<u8>,
    /// An earlier run's rebuild, `<partial>.prev`, is there (part of the basis).
    has_prev: bool,
    /// Written at its own path in `current` (nothing was there).
    in_place: bool,
    written: u64,
    /// Bytes of `out` whose writeback has been started.
    flushed: u64,
    hasher: FileHasher,
    /// Content hash of what `out` holds, when it was filled from a stored
    /// twin and hashed from `out` (instead of through `hasher`).
    verified: Option<[u8; 32]>,
    retried: bool,
    /// Writing hit "no space left on device": the rest of its data is
    /// dropped, and its end asks for room and a resend.
    nospace: bool,
    /// How often that happened to this file.
    nospace_rounds: u8,
}

/// Outcome of a finished transfer, for the reply.
pub enum TransferResult {
    /// Committed to `current` (or dropped after an abort).
    Ok,
    /// Hash mismatch: resend whole.
    Retry,
    /// The store ran out of space for it: make room, then resend whole.
    NoSpace {
        /// The file's path, for messages.
        path: String,
        /// Its size.
        need: u64,
    },
}

/// Whether an I/O error means the filesystem (or a quota) is full.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// State of one backup being received.
pub struct BackupReceiver {
    current: OwnedFd,
    meta: OwnedFd,
    /// Path of `meta`, for messages.
    meta_path: PathBuf,
    /// `.byteback/partial`.
    partial: OwnedFd,
    old: PeekableManifest,
    /// The new manifest; not started until something differs from the old one.
    new: Option<ManifestWriter>,
    /// `current` matched its manifest when this backup started (the marker was there).
    clean: bool,
    /// The old manifest was read (not missing, not replaced by an empty one).
    has_manifest: bool,
    /// The marker is still on disc.
    marker: bool,
    /// Something in this backup differs from the old manifest, or `current`
    /// was not clean: the commit writes a new manifest.
    changed: bool,
    /// Entries resolved before anything changed, not written to `new`: they
    /// are the old manifest's first ones.
    unwritten: u64,
    /// Something in `current` was created, replaced or removed: the commit
    /// syncs the filesystem (otherwise only the new manifest).
    touched: bool,
    /// `current` may hold objects the new manifest does not name (it was
    /// not clean, or an entry was deleted or changed type): the commit walks it.
    needs_sweep: bool,
    slots: VecDeque<Slot>,
    slot_base: u64,
    /// Sum of `buffer_cost` of the entries in `slots` (waiting ones included).
    slot_bytes: usize,
    transfers: HashMap<u32, Transfer>,
    next_id: u32,
    /// The directory chain of the last entry: path, fd (opened when first
    /// needed), and whether this backup created it (so nothing in it needs a stat).
    dirs: Vec<(Vec<u8>, Option<OwnedFd>, bool)>,
    /// Parent directory of the last finished file.
    last_parent: Option<(Vec<u8>, OwnedFd)>,
    unzstd: ChunkDecompressor,
    raw: Vec<u8>,

    btrfs: bool,
    clone_ok: bool,
    /// Stored content by hash, built from the old manifest when first needed.
    twins: Option<TwinIndex>,
    /// Counters reported to the client.
    pub stats: BackupStats,
    /// Non-fatal problems to report.
    pub warnings: Vec<String>,
}

fn same_mtime(st: &rustix::fs::Stat, e: &Entry) -> bool {
    st.st_mtime == e.mtime_sec && st.st_mtime_nsec as u32 == e.mtime_nsec
}

fn hash_file(f: &File) -> io::Result<[u8; 32]> {
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; IO_CHUNK];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finish())
}

impl BackupReceiver {
    /// Prepares `current` of `host` for a new backup.
    pub fn new(host: &HostStore) -> Result<Self> {
        keep_freed_buffers();
        let current = host.current()?;
        fsops::ensure_dir(&current, META_DIR, 0o700)?;
        let meta = fsops::open_dir(&current, META_DIR)?;
        // Leftovers of an interrupted run (`tmp`: of versions before partial
        // rebuilds were kept); `partial` is kept for resuming.
        fsops::remove_any(&meta, b"tmp")?;
        fsops::remove_any(&meta, b"manifest.new")?;
        fsops::ensure_dir(&meta, PARTIAL, 0o700)?;
        let partial = fsops::open_dir(&meta, PARTIAL)?;
        let meta_path = host.path.join("current").join(META_DIR_NAME);
        let manifest_path = meta_path.join("manifest");
        let mut warnings = vec![];
        if fsops::lstat_at(&meta, DAMAGED)?.is_some() && fsops::lstat_at(&meta, MANIFEST)?.is_none()
        {
            warnings.push(recover_manifest(host, &meta, &manifest_path));
        }
        let opened = match fsops::open_file(&meta, MANIFEST) {
            Ok(f) => Some(ManifestReader::new(f, &manifest_path).and_then(PeekableManifest::new)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot open the manifest {}", manifest_path.display())
                })
            }
        };
        let (old, has_manifest) = match opened {
            Some(Ok(m)) => (m, true),
            Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                // Damaged at its start: set aside and recovered at once.
                set_aside_manifest(&meta)?;
                warnings.push(format!("{e}"));
                warnings.push(recover_manifest(host, &meta, &manifest_path));
                match fsops::open_file(&meta, MANIFEST) {
                    Ok(f) => (
                        PeekableManifest::new(ManifestReader::new(f, &manifest_path)?)?,
                        true,
                    ),
                    Err(_) => (PeekableManifest::new(ManifestReader::empty())?, false),
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => (PeekableManifest::new(ManifestReader::empty())?, false),
        };
        let marker = fsops::lstat_at(&meta, CLEAN)?.is_some();
        let clean = marker && has_manifest;
        let dir_fd = fsops::open_dir(&current, b"")?;
        let mut rx = BackupReceiver {
            btrfs: host.btrfs,
            clone_ok: host.btrfs,
            twins: None,
            current,
            meta,
            meta_path,
            partial,
            old,
            new: None,
            clean,
            has_manifest,
            marker,
            changed: false,
            unwritten: 0,
            touched: !clean,
            needs_sweep: !clean,
            slots: VecDeque::new(),
            slot_base: 0,
            slot_bytes: 0,
            transfers: HashMap::new(),
            next_id: 0,
            dirs: vec![(vec![], Some(dir_fd), false)],
            last_parent: None,
            unzstd: ChunkDecompressor::new()?,
            raw: vec![],

            stats: BackupStats::default(),
            warnings,
        };
        if !clean {
            // Leftovers of an interrupted run may be anywhere: the commit
            // has to write the manifest and walk `current` whatever comes.
            rx.mark_changed()?;
        }
        Ok(rx)
    }

    /// Keeps room before anything is written: when the last backup ran out
    /// of space (or the store is below `minpercent` free) and `current` holds
    /// what failed runs left, removes it now rather than at the commit —
    /// every object the last manifest does not name (new files of failed
    /// runs, kept partial ones included) and every kept partial rebuild.
    /// Returns a note for the log, if anything was removed.
    pub fn clean_leftovers_if_short(&mut self, minpercent: u32) -> Result<Option<String>> {
        let marked = fsops::lstat_at(&self.meta, NO_SPACE)?.is_some();
        let short = marked
            || crate::space::measure(&self.current)
                .map(|s| s.percent_free() < f64::from(minpercent))
                .unwrap_or(false);
        if !short || self.clean {
            return Ok(None);
        }
        let mut deleted = 0;
        if self.has_manifest {
            let path = self.meta_path.join("manifest");
            let mut manifest = PeekableManifest::new(ManifestReader::new(
                fsops::open_file(&self.meta, MANIFEST)?,
                &path,
            )?)?;
            remove_stale(&self.current, &[], true, &mut manifest, &mut deleted)?;
        }
        for n in fsops::list_dir(&self.partial)? {
            fsops::remove_any(&self.partial, &n)?;
            deleted += 1;
        }
        fsops::remove_any(&self.meta, NO_SPACE)?;
        Ok((deleted > 0).then(|| {
            format!(
                "short of space: removed {deleted} objects that interrupted or failed backups left in current"
            )
        }))
    }

    /// Records that this backup ran out of space: until a commit, the next
    /// backup starts by removing what failed runs left.
    pub fn note_no_space(&self) -> Result<()> {
        if fsops::lstat_at(&self.meta, NO_SPACE)?.is_none() {
            drop(fsops::create_new(&self.meta, NO_SPACE)?);
        }
        Ok(())
    }

    /// Whether reading the old manifest found it damaged.
    pub fn manifest_damaged(&self) -> bool {
        self.old.is_damaged()
    }

    /// Sets the damaged manifest aside so the next backup recovers one.
    pub fn set_aside_manifest(&self) -> Result<()> {
        set_aside_manifest(&self.meta)
    }

    /// Called before the first change to `current` or to the manifest: takes
    /// the clean marker away (durably, so a crash from here on leaves a
    /// store that the next run does not trust) and starts the new manifest
    /// with the entries resolved so far, which equal the old manifest's first ones.
    fn mark_changed(&mut self) -> Result<()> {
        if self.changed {
            return Ok(());
        }
        if self.marker {
            fsops::remove_any(&self.meta, CLEAN)?;
            fsops::fsync(&self.meta)?;
            self.marker = false;
        }
        let mut new = ManifestWriter::new(fsops::create_new(&self.meta, b"manifest.new")?)?;
        if self.unwritten > 0 {
            let path = self.meta_path.join("manifest");
            let mut old = ManifestReader::new(fsops::open_file(&self.meta, b"manifest")?, &path)?;
            for _ in 0..self.unwritten {
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
        self.changed = true;
        Ok(())
    }

    /// Called before creating, replacing or removing anything in `current`.
    fn touch(&mut self) -> Result<()> {
        self.touched = true;
        self.mark_changed()
    }

    /// The fd of directory `dirs[i]`, opened beneath `current` if not yet.
    fn dir_fd(&mut self, i: usize) -> Result<OwnedFd> {
        let (path, fd, _) = self
            .dirs
            .get_mut(i)
            .ok_or_else(|| anyhow!("directory stack empty"))?;
        if fd.is_none() {
            let opened = fsops::open_dir(&self.current, &disk_path(path)).with_context(|| {
                format!("cannot open directory {:?}", String::from_utf8_lossy(path))
            })?;
            *fd = Some(opened);
        }
        match fd {
            Some(fd) => Ok(fd.try_clone()?),
            None => bail!("directory not open"),
        }
    }

    /// Handles one batch; returns what the server needs for it.
    pub fn entries(&mut self, entries: Vec<Entry>) -> Result<Vec<Need>> {
        let mut needs = vec![];
        for (i, e) in entries.into_iter().enumerate() {
            // Every error names the entry it happened on.
            let path = e.path.clone();
            let handled = self
                .entry(e)
                .with_context(|| format!("storing {}", byteback_protocol::escape_bytes(&path)))?;
            if let Some((id, basis, twin)) = handled {
                needs.push(Need {
                    index: i as u32,
                    id,
                    basis,
                    twin,
                });
            }
        }
        self.flush_slots()?;
        Ok(needs)
    }

    /// What transfer `id` writes, for error messages: its client path,
    /// escaped, or the bare id once the transfer is gone.
    pub fn transfer_name(&self, id: u32) -> String {
        match self.transfers.get(&id) {
            Some(t) => byteback_protocol::escape_bytes(&t.entry.path),
            None => format!("transfer {id}"),
        }
    }

    fn push_slot(&mut self, s: Slot, cost: usize) -> Result<u64> {
        // Entries behind an unfinished transfer wait here; the client's flow
        // control keeps this bounded and a client that ignores it is refused.
        self.slot_bytes += cost;
        if self.slots.len() >= MAX_PENDING || self.slot_bytes > MAX_BUFFERED_BYTES {
            bail!(
                "client sent more than {MAX_PENDING} entries or {MAX_BUFFERED_BYTES} bytes behind unfinished transfers"
            );
        }
        self.slots.push_back(s);
        Ok(self.slot_base + self.slots.len() as u64 - 1)
    }

    fn set_slot(&mut self, seq: u64, s: Slot) {
        if let Some(slot) = self.slots.get_mut((seq - self.slot_base) as usize) {
            *slot = s;
        }
    }

    fn flush_slots(&mut self) -> Result<()> {
        while let Some(front) = self.slots.front() {
            match front {
                Slot::Waiting => break,
                Slot::Ready(e) => {
                    match self.new.as_mut() {
                        Some(new) => new.push(e)?,
                        // Equal to the old manifest's next entry (see `entry`).
                        None => self.unwritten += 1,
                    }
                    self.slot_bytes = self.slot_bytes.saturating_sub(e.entry.buffer_cost());
                }
                Slot::Dropped(cost) => self.slot_bytes = self.slot_bytes.saturating_sub(*cost),
            }
            self.slots.pop_front();
            self.slot_base += 1;
        }
        Ok(())
    }

    /// The index in `dirs` of the directory that holds `path`, checking that
    /// its parent was sent in this backup, and whether this backup created
    /// that directory.
    fn parent_dir(&mut self, path: &[u8]) -> Result<(usize, bool)> {
        let (parent, _) = split(path);
        while self.dirs.len() > 1 {
            let top = &self.dirs[self.dirs.len() - 1].0;
            if path.len() > top.len() && path.starts_with(top) && path[top.len()] == b'/' {
                break;
            }
            self.dirs.pop();
        }
        let (top, _, fresh) = self
            .dirs
            .last()
            .ok_or_else(|| anyhow!("directory stack empty"))?;
        if top.as_slice() != parent {
            bail!(
                "entry {:?} arrived without its parent directory",
                String::from_utf8_lossy(path)
            );
        }
        Ok((self.dirs.len() - 1, *fresh))
    }

    /// For a store that matched its manifest at the start: whether `e` needs
    /// nothing done on disc because the old manifest records the same object
    /// (same type; for files the same size and mtime, for symlinks the same
    /// target). Nothing this backup did can have changed its path yet: every
    /// path is handled once, in order, and deletions wait for the commit.
    fn trusted(&self, e: &Entry, old: Option<&ManifestEntry>) -> bool {
        let Some(o) = old else { return false };
        self.clean
            && o.entry.kind == e.kind
            && match e.kind {
                Kind::Dir | Kind::Symlink { .. } => true,
                Kind::File { .. } => {
                    o.entry.mtime_sec == e.mtime_sec && o.entry.mtime_nsec == e.mtime_nsec
                }
                _ => false,
            }
    }

    /// Records the resolved entry `me`; the manifest must be rewritten if
    /// it differs from the old one at that path.
    fn push_ready(&mut self, me: ManifestEntry, old: Option<&ManifestEntry>) -> Result<()> {
        if old != Some(&me) {
            self.mark_changed()?;
        }
        let cost = me.entry.buffer_cost();
        self.push_slot(Slot::Ready(me), cost)?;
        Ok(())
    }

    /// Handles one entry; for a file that needs data: its transfer id,
    /// whether it has a basis, and whether a stored file of its size could
    /// be its twin (see [`crate::twins`]).
    fn entry(&mut self, e: Entry) -> Result<Option<(u32, bool, bool)>> {
        self.stats.entries += 1;
        // An old entry before this one is not sent any more: it is deleted.
        if let Some(p) = self.old.peek() {
            if compare_paths(&p.entry.path, &e.path) == Ordering::Less {
                self.needs_sweep = true;
                self.mark_changed()?;
            }
        }
        let old = self.old.seek(&e.path)?;
        if let Some(o) = &old {
            if disc_type(&o.entry.kind).is_some() && disc_type(&o.entry.kind) != disc_type(&e.kind)
            {
                // The old object may stay on disc until the commit's walk.
                self.needs_sweep = true;
            }
        }
        let (parent_i, fresh_parent) = self.parent_dir(&e.path)?;
        if self.trusted(&e, old.as_ref()) {
            if e.kind == Kind::Dir {
                self.dirs.push((e.path.clone(), None, false));
            }
            let hash = old.as_ref().map(|o| o.hash).unwrap_or([0; 32]);
            self.push_ready(ManifestEntry { entry: e, hash }, old.as_ref())?;
            return Ok(None);
        }
        if !matches!(e.kind, Kind::Dir | Kind::Symlink { .. } | Kind::File { .. }) {
            // Hard links, FIFOs, sockets and devices live only in the manifest;
            // the commit walk removes whatever older object sits at their path.
            self.push_ready(
                ManifestEntry {
                    entry: e,
                    hash: [0; 32],
                },
                old.as_ref(),
            )?;
            return Ok(None);
        }
        let disk = disk_path(&e.path);
        let (_, name) = split(&disk);
        let name = name.to_vec();
        let parent = self.dir_fd(parent_i)?;
        let parent_raw = parent.as_fd();
        let parent_raw = &parent_raw;
        // In a directory this backup created there is nothing to look at
        // (a first backup saves a stat per entry).
        let st = if fresh_parent {
            None
        } else {
            fsops::lstat_at(parent_raw, &name)?
        };
        match &e.kind {
            Kind::Dir => {
                let is_dir = matches!(&st, Some(s) if fsops::file_type(s) == FileType::Directory);
                if !is_dir {
                    self.touch()?;
                    let created = if st.is_none() {
                        rustix::fs::mkdirat(
                            parent_raw,
                            os(&name),
                            rustix::fs::Mode::from_raw_mode(0o700),
                        )
                        .map_err(io::Error::from)
                    } else {
                        fsops::ensure_dir(parent_raw, &name, 0o700)
                    };
                    created.with_context(|| {
                        format!(
                            "cannot create directory {:?}",
                            String::from_utf8_lossy(&e.path)
                        )
                    })?;
                }
                let fd = fsops::open_dir(parent_raw, &name)?;
                self.dirs.push((e.path.clone(), Some(fd), st.is_none()));
                self.push_ready(
                    ManifestEntry {
                        entry: e,
                        hash: [0; 32],
                    },
                    old.as_ref(),
                )?;
                Ok(None)
            }
            Kind::Symlink { target } => {
                let same = match &st {
                    Some(s) if fsops::file_type(s) == FileType::Symlink => {
                        fsops::read_link(parent_raw, &name)? == *target
                    }
                    _ => false,
                };
                if !same {
                    self.touch()?;
                    fsops::remove_any(parent_raw, &name)?;
                    fsops::symlink(parent_raw, &name, target)?;
                }
                self.push_ready(
                    ManifestEntry {
                        entry: e,
                        hash: [0; 32],
                    },
                    old.as_ref(),
                )?;
                Ok(None)
            }
            Kind::File { size } => {
                let size = *size;
                if let Some(s) = &st {
                    if fsops::file_type(s) == FileType::RegularFile
                        && s.st_size as u64 == size
                        && same_mtime(s, &e)
                    {
                        let hash = match &old {
                            Some(o)
                                if o.entry.kind == e.kind
                                    && o.entry.mtime_sec == e.mtime_sec
                                    && o.entry.mtime_nsec == e.mtime_nsec =>
                            {
                                o.hash
                            }
                            // Written by an interrupted run, so not in the manifest yet.
                            _ => fsops::open_file(parent_raw, &name)
                                .and_then(|f| hash_file(&f))
                                .with_context(|| {
                                    format!(
                                        "cannot read the stored copy of {:?}",
                                        String::from_utf8_lossy(&e.path)
                                    )
                                })?,
                        };
                        self.push_ready(ManifestEntry { entry: e, hash }, old.as_ref())?;
                        return Ok(None);
                    }
                }
                self.touch()?;
                let stored = match &st {
                    Some(s) if fsops::file_type(s) == FileType::RegularFile && s.st_size > 0 => {
                        fsops::open_file(parent_raw, &name)
                            .ok()
                            .map(|f| (f, s.st_size as u64))
                    }
                    _ => None,
                };
                let partial = partial_name(&e.path);
                // A kept rebuild needs a file that was there when it was
                // made, and the commit or a start on a short disc that
                // removed that file removed the rebuilds too.
                let prev = match &st {
                    Some(_) => self.take_partial(&partial)?,
                    None => None,
                };
                let has_prev = prev.is_some();
                let mut parts = vec![];
                let mut start = 0;
                for (f, len) in prev.into_iter().chain(stored) {
                    parts.push((f, start, len));
                    start += len;
                }
                let basis = (!parts.is_empty()).then_some(Basis { parts });
                let basis_len = basis.as_ref().map(Basis::len).unwrap_or(0);
                let id = self.next_id;
                self.next_id += 1;
                // Nothing at the path (looked at, or in a directory this
                // backup created): write it there, exclusively.
                let in_place = st.is_none();
                let out = if in_place {
                    fsops::create_new(parent_raw, &name).with_context(|| {
                        format!("cannot create {:?}", String::from_utf8_lossy(&e.path))
                    })?
                } else {
                    // `take_partial` left nothing at that name.
                    fsops::create_new(&self.partial, &partial)?
                };
                let has_basis = basis.is_some();
                let twin = !has_basis && size >= TWIN_MIN && self.twins().has_size(size);
                let seq = self.push_slot(Slot::Waiting, e.buffer_cost())?;
                self.transfers.insert(
                    id,
                    Transfer {
                        seq,
                        entry: e,
                        old,
                        basis,
                        basis_len,
                        out,
                        partial,
                        has_prev,
                        in_place,
                        written: 0,
                        flushed: 0,
                        hasher: FileHasher::new(),
                        verified: None,
                        retried: false,
                        nospace: false,
                        nospace_rounds: 0,
                    },
                );
                Ok(Some((id, has_basis, twin)))
            }
            _ => bail!("unreachable entry kind"),
        }
    }

    /// An earlier run's rebuild of the file whose partial name is `name`,
    /// kept as `<name>.prev` for use as the front of the basis. Of two (a
    /// rebuild from a rebuild, interrupted again) the longer is kept. Only
    /// whole file-system blocks of it are used, so the stored copy behind it
    /// stays block-aligned (for cloning).
    fn take_partial(&mut self, name: &[u8]) -> Result<Option<(File, u64)>> {
        let prev = prev_name(name);
        let size = |n: &[u8]| -> Result<Option<u64>> {
            Ok(match fsops::lstat_at(&self.partial, n)? {
                Some(s) if fsops::file_type(&s) == FileType::RegularFile => Some(s.st_size as u64),
                Some(_) => {
                    fsops::remove_any(&self.partial, n)?;
                    None
                }
                None => None,
            })
        };
        let (cur_len, prev_len) = (size(name)?, size(&prev)?);
        let len = match (cur_len, prev_len) {
            (None, None) => return Ok(None),
            (Some(c), p) if c > p.unwrap_or(0) => {
                fsops::replace(&self.partial, name, &self.partial, &prev)?;
                c
            }
            (c, p) => {
                if c.is_some() {
                    fsops::remove_any(&self.partial, name)?;
                }
                p.unwrap_or(0)
            }
        } / FS_BLOCK
            * FS_BLOCK;
        if len == 0 {
            fsops::remove_any(&self.partial, &prev)?;
            return Ok(None);
        }
        match fsops::open_file(&self.partial, &prev) {
            Ok(f) => Ok(Some((f, len))),
            Err(_) => {
                fsops::remove_any(&self.partial, &prev)?;
                Ok(None)
            }
        }
    }

    /// Drops transfer `id`'s earlier rebuild (its basis goes with it).
    fn drop_prev(&mut self, id: u32) -> Result<()> {
        let t = self.transfer(id)?;
        t.basis = None;
        t.basis_len = 0;
        if std::mem::take(&mut t.has_prev) {
            let prev = prev_name(&t.partial);
            fsops::remove_any(&self.partial, &prev)?;
        }
        Ok(())
    }

    /// Removes what interrupted runs left in `.byteback/partial` that no
    /// transfer of this run uses (they are the first to go when the disc is
    /// full). Returns the bytes freed.
    pub fn drop_idle_partials(&mut self) -> Result<u64> {
        let mut busy = std::collections::HashSet::new();
        for t in self.transfers.values() {
            if !t.in_place {
                busy.insert(t.partial.clone());
            }
            if t.has_prev {
                busy.insert(prev_name(&t.partial));
            }
        }
        let mut freed = 0;
        for n in fsops::list_dir(&self.partial)? {
            if !busy.contains(&n) {
                if let Some(s) = fsops::lstat_at(&self.partial, &n)? {
                    freed += s.st_blocks as u64 * 512;
                }
                fsops::remove_any(&self.partial, &n)?;
            }
        }
        Ok(freed)
    }

    fn transfer(&mut self, id: u32) -> Result<&mut Transfer> {
        self.transfers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("unknown transfer {id}"))
    }

    /// Signature of the basis of transfer `id`. A stored copy that cannot be
    /// read is dropped as a basis (with a warning): the client then sends
    /// the whole file, so an unreadable stored file is resent, never fatal.
    pub fn signature(&mut self, id: u32) -> Result<Vec<u8>> {
        let t = self.transfer(id)?;
        let basis = t
            .basis
            .as_ref()
            .ok_or_else(|| anyhow!("transfer {id} has no basis"))?;
        let built = (|| -> io::Result<Vec<u8>> {
            let mut b = SignatureBuilder::new(t.basis_len);
            let mut buf = vec![0u8; IO_CHUNK];
            for (f, _, len) in &basis.parts {
                let mut off = 0u64;
                while off < *len {
                    let want = IO_CHUNK.min((len - off) as usize);
                    let n = f.read_at(&mut buf[..want], off)?;
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
        })();
        match built {
            Ok(sig) => Ok(sig),
            Err(e) => {
                let path = String::from_utf8_lossy(&t.entry.path).into_owned();
                self.warnings.push(format!(
                    "{path}: cannot read the stored copy ({e}); sent again whole"
                ));
                self.drop_prev(id)?;
                Ok(SignatureBuilder::new(0).finish().0)
            }
        }
    }

    /// Applies one delta segment to transfer `id`.
    pub fn data(&mut self, id: u32, delta: &Compressed) -> Result<()> {
        let mut raw = std::mem::take(&mut self.raw);
        let r = self.data_with(id, delta, &mut raw);
        self.raw = raw;
        r
    }

    fn data_with(&mut self, id: u32, delta: &Compressed, raw: &mut Vec<u8>) -> Result<()> {
        self.unzstd.decompress_into(delta, raw)?;
        let raw = &raw[..];
        let clone_ok = self.clone_ok;
        let t = self
            .transfers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("unknown transfer {id}"))?;
        if t.nospace {
            return Ok(()); // dropped: the end of this file asks for a resend
        }
        let limit = t.entry.size().saturating_sub(t.written);
        let mut sink = FileSink {
            basis: t.basis.as_ref(),
            out: &t.out,
            pos: t.written,
            hasher: &mut t.hasher,
            clone_ok,
            matched: 0,
            literal: 0,
            buf: vec![],
        };
        let basis_len = if t.basis.is_some() { t.basis_len } else { 0 };
        let applied = apply_ops(raw, basis_len, limit, &mut sink);
        let (pos, matched, literal, clone_after) =
            (sink.pos, sink.matched, sink.literal, sink.clone_ok);
        if let Err(SinkError::Io(e)) = &applied {
            if is_no_space(e) {
                t.nospace = true;
                // Give its blocks back at once; it is sent again whole.
                let _ = t.out.set_len(0);
                return Ok(());
            }
        }
        applied.map_err(|e| {
            let path = String::from_utf8_lossy(&t.entry.path);
            match e {
                SinkError::Io(e) if is_no_space(&e) => {
                    anyhow!("no space left on device storing {path:?}: {e}")
                }
                SinkError::Io(e) => anyhow!("cannot store {path:?}: {e}"),
                e => anyhow!("bad delta for {path:?}: {e}"),
            }
        })?;
        t.written = pos;
        if t.written - t.flushed >= WRITEBACK_EVERY {
            start_writeback(&t.out, t.flushed, t.written - t.flushed);
            t.flushed = t.written;
        }
        self.stats.matched_bytes += matched;
        self.stats.literal_bytes += literal;
        self.clone_ok = clone_after;
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
        let t = self
            .transfers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("unknown transfer {id}"))?;
        if t.nospace {
            let path = String::from_utf8_lossy(&t.entry.path).into_owned();
            t.nospace_rounds += 1;
            if t.nospace_rounds > 3 {
                bail!(
                    "no space left on device storing {path:?}, even after making room three times"
                );
            }
            t.nospace = false;
            t.written = 0;
            t.flushed = 0;
            t.hasher = FileHasher::new();
            t.out.set_len(0)?;
            // Its earlier rebuild goes too: the space is needed.
            self.drop_prev(id)?;
            return Ok(TransferResult::NoSpace { path, need: size });
        }
        let ok = t.written == size && t.verified.unwrap_or_else(|| t.hasher.finish()) == hash;
        if !ok {
            if !t.retried {
                // Never commit a file that fails its hash: start over without a basis.
                t.retried = true;
                t.written = 0;
                t.flushed = 0;
                t.hasher = FileHasher::new();
                t.out.set_len(0)?;
                self.drop_prev(id)?;
                self.stats.retried += 1;
                return Ok(TransferResult::Retry);
            }
            let path = String::from_utf8_lossy(&t.entry.path).into_owned();
            self.warnings.push(format!(
                "{path}: content failed its BLAKE3 check twice; kept the previous version"
            ));
            return self.abort(id);
        }
        let mut t = self
            .transfers
            .remove(&id)
            .ok_or_else(|| anyhow!("unknown transfer {id}"))?;
        // Trailing zero blocks were left as a hole; only then is the length short.
        if t.out.metadata()?.len() != size {
            t.out.set_len(size)?;
        }
        fsops::set_mtime(&t.out, mtime.0, mtime.1)?;
        // Small files wait for the commit's syncfs: started one by one,
        // their writeback cost this (single) thread more than it saved.
        if size >= WRITEBACK_EVERY && size > t.flushed {
            start_writeback(&t.out, t.flushed, size - t.flushed);
        }
        t.entry.kind = Kind::File { size };
        t.entry.mtime_sec = mtime.0;
        t.entry.mtime_nsec = mtime.1;
        if !t.in_place {
            let disk = disk_path(&t.entry.path);
            let (pdir, name) = split(&disk);
            let parent = match self.last_parent.take() {
                Some((p, fd)) if p == pdir => fd,
                _ => fsops::open_dir(&self.current, pdir).with_context(|| {
                    format!(
                        "parent of {:?} vanished",
                        String::from_utf8_lossy(&t.entry.path)
                    )
                })?,
            };
            fsops::replace(&self.partial, &t.partial, &parent, name)?;
            self.last_parent = Some((pdir.to_vec(), parent));
        }
        drop(t.out);
        drop(t.basis);
        if t.has_prev {
            fsops::remove_any(&self.partial, &prev_name(&t.partial))?;
        }
        self.stats.files_transferred += 1;
        self.set_slot(
            t.seq,
            Slot::Ready(ManifestEntry {
                entry: t.entry,
                hash,
            }),
        );
        self.flush_slots()?;
        Ok(TransferResult::Ok)
    }

    /// The index of stored content, read from the old manifest the first
    /// time it is needed. A manifest that cannot be read gives an empty
    /// index (and a warning): files are then sent, never wrongly cloned.
    fn twins(&mut self) -> &TwinIndex {
        if self.twins.is_none() {
            let path = self.meta_path.join("manifest");
            let loaded = if self.has_manifest {
                fsops::open_file(&self.meta, MANIFEST)
                    .and_then(|f| TwinIndex::load(f, &path))
                    .map_err(|e| {
                        self.warnings.push(format!(
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
    pub fn offer(&mut self, id: u32, size: u64, hash: [u8; 32], mtime: (i64, u32)) -> Result<bool> {
        let src_path = match self.twins().find(&hash, size) {
            Some(p) => p.to_vec(),
            None => return Ok(false),
        };
        let clone_ok = self.clone_ok;
        let t = self
            .transfers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("unknown transfer {id}"))?;
        if t.basis.is_some() || t.written != 0 || t.entry.size() != size || src_path == t.entry.path
        {
            return Ok(false);
        }
        let Some(src) = twins::open_stored(&self.current, &src_path, size) else {
            return Ok(false);
        };
        let copied = twins::copy_into(&src, &t.out, size, clone_ok);
        let (got, shared) = match copied {
            Ok(x) => x,
            Err(e) => {
                t.out.set_len(0)?;
                if is_no_space(&e) {
                    // Sending it needs the same room: that path makes it.
                    return Ok(false);
                }
                let path = String::from_utf8_lossy(&t.entry.path).into_owned();
                self.warnings.push(format!(
                    "{path}: cannot copy its stored twin ({e}); sent instead"
                ));
                return Ok(false);
            }
        };
        if got != hash {
            t.out.set_len(0)?;
            return Ok(false);
        }
        if !shared {
            self.clone_ok = false;
        }
        // Hashed from the file itself just now: `end` checks that.
        t.verified = Some(got);
        t.written = size;
        t.flushed = size;
        match self.end(id, size, hash, mtime)? {
            TransferResult::Ok => {
                self.stats.files_transferred = self.stats.files_transferred.saturating_sub(1);
                self.stats.cloned += 1;
                self.stats.matched_bytes += size;
                Ok(true)
            }
            _ => bail!("a verified clone failed its commit"),
        }
    }

    /// Gives up on transfer `id`; the previous version, if any, stays.
    pub fn abort(&mut self, id: u32) -> Result<TransferResult> {
        let t = self
            .transfers
            .remove(&id)
            .ok_or_else(|| anyhow!("unknown transfer {id}"))?;
        drop(t.out);
        drop(t.basis);
        if t.in_place {
            // Nothing was at its path before: take the unverified file away.
            remove_in_place(&self.current, &t.entry.path)?;
        } else {
            fsops::remove_any(&self.partial, &t.partial)?;
        }
        if t.has_prev {
            fsops::remove_any(&self.partial, &prev_name(&t.partial))?;
        }
        // The old copy in `current` was not touched, so its manifest entry still holds.
        let cost = t.entry.buffer_cost();
        let slot = match t.old {
            Some(o) if matches!(o.entry.kind, Kind::File { .. }) => {
                // Account for the old entry instead of the new one.
                self.slot_bytes = (self.slot_bytes + o.entry.buffer_cost()).saturating_sub(cost);
                Slot::Ready(o)
            }
            _ => Slot::Dropped(cost),
        };
        self.set_slot(t.seq, slot);
        self.flush_slots()?;
        Ok(TransferResult::Ok)
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
            self.needs_sweep = true;
            self.mark_changed()?;
        }
        if !self.changed {
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
        if self.needs_sweep {
            let mut manifest = PeekableManifest::new(ManifestReader::new(
                fsops::open_file(&self.meta, b"manifest.new")?,
                &self.meta_path.join("manifest.new"),
            )?)?;
            let mut deleted = 0;
            remove_stale(&self.current, &[], true, &mut manifest, &mut deleted)?;
            self.stats.deleted = deleted;
            self.touched |= deleted > 0;
        }
        // Every transfer has ended: what is left of interrupted runs is
        // stale (its file is gone, unchanged or was sent whole), and no
        // partial may reach a snapshot.
        fsops::remove_any(&self.meta, PARTIAL)?;
        if self.touched {
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
        let _ = self.btrfs;
        Ok(std::mem::take(&mut self.stats))
    }
}

impl Drop for BackupReceiver {
    /// A backup that ends without its commit (the client went away, the
    /// connection was cut, or it was refused) keeps what its open transfers
    /// wrote, for the next run to resume from: a new file at its own path
    /// (never with the client's mtime, so the next run sees it differ and
    /// offers its signature) and a rebuild in `.byteback/partial`. Only
    /// empty ones go. A killed server leaves the same, and the next run's
    /// commit removes whatever the client no longer sends.
    fn drop(&mut self) {
        for (_, t) in self.transfers.drain() {
            drop(t.out);
            if t.written > 0 && !t.nospace {
                continue;
            }
            if t.in_place {
                let _ = remove_in_place(&self.current, &t.entry.path);
            } else {
                let _ = fsops::remove_any(&self.partial, &t.partial);
            }
        }
    }
}

/// What kind of object an entry puts on disc, if any.
fn disc_type(k: &Kind) -> Option<FileType> {
    match k {
        Kind::File { .. } => Some(FileType::RegularFile),
        Kind::Dir => Some(FileType::Directory),
        Kind::Symlink { .. } => Some(FileType::Symlink),
        _ => None,
    }
}

/// Removes the file a transfer was writing at its own client path.
fn remove_in_place(current: &OwnedFd, path: &[u8]) -> Result<()> {
    let disk = disk_path(path);
    let (pdir, name) = split(&disk);
    let parent = fsops::open_dir(current, pdir)?;
    fsops::remove_any(&parent, name)?;
    Ok(())
}

/// Deletes objects under `dir` that the manifest does not name with the same type.
fn remove_stale(
    dir: &OwnedFd,
    prefix: &[u8],
    top: bool,
    manifest: &mut PeekableManifest,
    deleted: &mut u64,
) -> Result<()> {
    let mut children = vec![];
    for (disk_name, t) in fsops::list_dir_typed(dir)? {
        let client_name = if top && disk_name.starts_with(META_DIR) {
            if disk_name == META_DIR {
                continue;
            }
            match disk_name.strip_prefix(b".byteback-".as_slice()) {
                Some(n) if n.starts_with(META_DIR) => n.to_vec(),
                _ => {
                    fsops::remove_any(dir, &disk_name)?;
                    continue;
                }
            }
        } else {
            disk_name.clone()
        };
        children.push((client_name, disk_name, t));
    }
    children.sort_by(|a, b| a.0.cmp(&b.0));
    for (client_name, disk_name, t) in children {
        let path = if prefix.is_empty() {
            client_name
        } else {
            [prefix, b"/", &client_name].concat()
        };
        let keep = match manifest.seek(&path)? {
            Some(m) => matches!(
                (&m.entry.kind, t),
                (Kind::File { .. }, FileType::RegularFile)
                    | (Kind::Dir, FileType::Directory)
                    | (Kind::Symlink { .. }, FileType::Symlink)
            ),
            None => false,
        };
        if !keep {
            fsops::remove_any(dir, &disk_name)?;
            *deleted += 1;
        } else if t == FileType::Directory {
            let sub = fsops::open_dir(dir, &disk_name)?;
            remove_stale(&sub, &path, false, manifest, deleted)?;
        }
    }
    Ok(())
}

fn os(p: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(p)
}

/// Keeps freed multi-MiB buffers (frames, chunks) in the heap instead of
/// returning them to the kernel at once: otherwise each is a fresh mmap, and
/// page faults took a third of this process's time in a large-file backup.
fn keep_freed_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes glibc's allocator; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// Starts writing a range of a received file to disc without waiting for
/// it, so the data is mostly on disc by the commit's syncfs instead of all
/// being written then (the kernel's own writeback starts far later on a
/// machine with much memory).
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open fd; failure only loses the hint.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Writes patch output into the temp file: cloned ranges where the
/// filesystem can share extents, holes for all-zero blocks, plain writes otherwise.
struct FileSink<'a> {
    basis: Option<&'a Basis>,
    out: &'a File,
    pos: u64,
    hasher: &'a mut FileHasher,
    clone_ok: bool,
    matched: u64,
    literal: u64,
    buf: Vec<u8>,
}

/// Why a delta could not be applied.
#[derive(Debug)]
enum SinkError {
    /// The delta itself is wrong (the client's fault).
    Bad(String),
    /// Reading the stored copy or writing the new one failed (the store's).
    Io(io::Error),
}

impl From<DeltaError> for SinkError {
    fn from(e: DeltaError) -> Self {
        SinkError::Bad(e.to_string())
    }
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Bad(e) => write!(f, "{e}"),
            SinkError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for SinkError {
    fn from(e: io::Error) -> Self {
        SinkError::Io(e)
    }
}

impl PatchSink for FileSink<'_> {
    type Error = SinkError;

    fn copy(&mut self, offset: u64, len: u64) -> Result<(), SinkError> {
        let basis = self
            .basis
            .ok_or_else(|| SinkError::Bad("copy without a basis".into()))?;
        let mut done = 0u64;
        while done < len {
            let (file, src, left) = basis
                .locate(offset + done)
                .ok_or_else(|| SinkError::Bad("copy beyond the basis".into()))?;
            let n = (len - done).min(left).min(IO_CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            file.read_exact_at(&mut self.buf[..n], src)?;
            self.hasher.update(&self.buf[..n]);
            let dst = self.pos;
            let aligned = src.is_multiple_of(FS_BLOCK) && dst.is_multiple_of(FS_BLOCK);
            let clone_len = if aligned {
                n as u64 / FS_BLOCK * FS_BLOCK
            } else {
                0
            };
            let mut written = 0usize;
            if self.clone_ok && clone_len > 0 {
                match crate::btrfs::clone_range(file, src, clone_len, self.out, dst) {
                    Ok(()) => written = clone_len as usize,
                    Err(_) => self.clone_ok = false,
                }
            }
            let buf = std::mem::take(&mut self.buf);
            write_sparse(self.out, dst + written as u64, &buf[written..n])?;
            self.buf = buf;
            self.pos += n as u64;
            done += n as u64;
        }
        self.matched += len;
        Ok(())
    }

    fn literal(&mut self, data: &[u8]) -> Result<(), SinkError> {
        self.hasher.update(data);
        write_sparse(self.out, self.pos, data)?;
        self.pos += data.len() as u64;
        self.literal += data.len() as u64;
        Ok(())
    }
}

/// Writes `data` at `pos`, leaving holes for whole file-system blocks of zeros
/// (the file is new, so holes read back as zeros).
fn write_sparse(f: &File, pos: u64, data: &[u8]) -> io::Result<()> {
    let mut i = 0usize;
    let mut run_start: Option<usize> = None;
    while i < data.len() {
        let off = pos + i as u64;
        let to_boundary = (FS_BLOCK - off % FS_BLOCK) as usize;
        let n = to_boundary.min(data.len() - i);
        let piece = &data[i..i + n];
        let zero_block = n as u64 == FS_BLOCK && piece.iter().all(|&b| b == 0);
        if zero_block {
            if let Some(s) = run_start.take() {
                f.write_all_at(&data[s..i], pos + s as u64)?;
            }
        } else if run_start.is_none() {
            run_start = Some(i);
        }
        i += n;
    }
    if let Some(s) = run_start {
        f.write_all_at(&data[s..], pos + s as u64)?;
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes from a reader (used for restore streaming).
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(bytes: &[u8]) -> File {
        let f = tempfile::tempfile().expect("tempfile");
        f.write_all_at(bytes, 0).expect("write");
        f
    }

    #[test]
    fn a_virtual_basis_serves_each_offset_from_its_part() {
        let b = Basis {
            parts: vec![
                (file_of(&[1; 8192]), 0, 8192),
                (file_of(&[2; 100]), 8192, 100),
            ],
        };
        assert_eq!(b.len(), 8292);
        let (_, at, left) = b.locate(0).expect("first part");
        assert_eq!((at, left), (0, 8192));
        let (_, at, left) = b.locate(8191).expect("first part");
        assert_eq!((at, left), (8191, 1));
        let (f, at, left) = b.locate(8192).expect("second part");
        assert_eq!((at, left), (0, 100));
        let mut one = [0u8; 1];
        f.read_exact_at(&mut one, at).expect("read");
        assert_eq!(one, [2]);
        assert!(b.locate(8292).is_none());
        assert!(Basis { parts: vec![] }.locate(0).is_none());
    }

    #[test]
    fn partial_names_are_fixed_hex_and_differ_by_path() {
        let a = partial_name(b"etc/passwd");
        assert_eq!(a.len(), 32);
        assert!(a.iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, partial_name(b"etc/passwd"));
        assert_ne!(a, partial_name(b"etc/passwd-"));
        assert_eq!(prev_name(&a), [&a[..], b".prev"].concat());
    }
}

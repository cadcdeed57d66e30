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
//!
//! Files are synced only by the commit. A file an interrupted run wrote (in
//! no manifest yet) is kept by a later run when its size and mtime match,
//! and hashed as it is: sound while the kernel that wrote it still runs
//! (its page cache is what the file holds), not after a crash, which can
//! keep a file's size and mtime and lose its data. So the first change of a
//! backup records the boot it runs in (`.byteback/boot`, synced), and a run
//! finding `current` unclean from another boot (or with a manifest and no
//! record) *suspects* such files: each is kept only if the client's BLAKE3 of its
//! source matches, and is received against the stored copy otherwise. The
//! record is rewritten only by a run that suspects nothing, so suspicion
//! lasts until a commit. Byteback 1.x's `current` vouches for none of its
//! files until a byteback backup commits into it ([`TAKEOVER`], kept if
//! the first is cut short): each one kept by size and mtime is checked
//! against the client's BLAKE3 the same way. A `current` of byteback's own
//! without a manifest (a first backup cut short) is judged by its boot
//! record like any other.

mod apply;
pub(crate) mod carry;
mod commit;
mod decide;
mod digest;
mod partial;
mod room;
mod sigs;
mod sink;
mod slots;
mod sweep;
mod transfer;
mod twin;

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::error::{shown, Context, Error, IoContext, Result};
use byteback_protocol::{BackupStats, Entry, Kind, ManifestEntry, Need};

use crate::fsops::{self, split};
use crate::manifest::{ManifestReader, ManifestWriter, PeekableManifest};
use crate::store::{disk_path, HostStore, META_DIR, META_DIR_NAME};
use crate::twins::TwinIndex;
use commit::{recover_manifest, set_aside_manifest};
pub use room::Room;
pub use sink::Chunk;
use sink::{Decoder, FileWriter};
use slots::{Slot, Slots};
use sweep::remove_in_place;

/// Marker in `.byteback`: `current` matches its manifest exactly.
const CLEAN: &[u8] = b"clean";
/// The manifest of `current`, in `.byteback`.
const MANIFEST: &[u8] = b"manifest";
/// A damaged manifest set aside; the next backup recovers one.
const DAMAGED: &[u8] = b"manifest.damaged";
/// The boot id of the kernel the last changes to `current` were made under.
const BOOT: &[u8] = b"boot";
/// Where a new [`BOOT`] is written before it is renamed into place.
const BOOT_NEW: &[u8] = b"boot.new";
/// What an object a backup creates takes in the filesystem's metadata, as
/// the growth guard counts it: on btrfs an inode item, its reference and
/// two directory items, about 400 bytes, rounded up.
pub(crate) const INODE_COST: u64 = 512;

/// This kernel's boot id (a new one at every boot), if it can be read,
/// with the id of the mount `current` is on: a store that lost what it had
/// not written yet without a reboot (a transaction aborted and the
/// filesystem mounted again, a USB disc pulled and plugged in) is on
/// another mount. The unique id of Linux 6.8 and later (`mount.N`); else
/// the older one, which a new mount may take again (`mnt.N`).
fn boot_id(current: impl std::os::fd::AsFd) -> Option<String> {
    use rustix::fs::{AtFlags, StatxFlags};
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    if id.is_empty() {
        return None;
    }
    /// `STATX_MNT_ID_UNIQUE`.
    const UNIQUE: u32 = 0x4000;
    let asked = StatxFlags::MNT_ID | StatxFlags::from_bits_retain(UNIQUE);
    let mount = match rustix::fs::statx(current, "", AtFlags::EMPTY_PATH, asked) {
        Ok(st) if st.stx_mask & UNIQUE != 0 => format!(" mount.{}", st.stx_mnt_id),
        Ok(st) if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 => format!(" mnt.{}", st.stx_mnt_id),
        _ => String::new(),
    };
    Some(format!("{id}{mount}"))
}
/// Marker in `.byteback`: `current` is byteback 1.x's, being taken over
/// (made, synced, before anything changes; ignored once a manifest is
/// committed, and removed then): until then no manifest vouches for
/// what 1.x stored, even if the first run is cut short and resumed.
const TAKEOVER: &[u8] = b"from-1x";
/// Directory in `.byteback` of rebuilds of changed files, kept when interrupted.
const PARTIAL: &[u8] = b"partial";
/// Marker in `.byteback`: a backup ran out of space since the last commit,
/// so the next one starts by removing what failed runs left.
const NO_SPACE: &[u8] = b"nospace";

/// Most warnings a backup keeps (each names a path, so a client could
/// make any number of them).
pub const MAX_WARNINGS: usize = 1000;

/// The paths of regular files, as 64-bit keyed hashes (a client cannot
/// aim at a collision without the session's key): about 10 bytes a file,
/// so 10 MB for a million.
#[derive(Default)]
struct FilePaths {
    keys: std::collections::HashSet<u64>,
    /// Files whose content differs from the old manifest's file at their
    /// path (only where there was one: a first backup holds none here).
    changed: std::collections::HashSet<u64>,
    hasher: std::collections::hash_map::RandomState,
}

impl FilePaths {
    fn key(&self, path: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, path)
    }

    fn insert(&mut self, path: &[u8]) {
        let k = self.key(path);
        self.keys.insert(k);
    }

    fn contains(&self, path: &[u8]) -> bool {
        self.keys.contains(&self.key(path))
    }

    /// Notes the file `me` of the new manifest, if the old manifest had a
    /// different object at its path.
    fn note_content(&mut self, me: &ManifestEntry, old: Option<&ManifestEntry>) {
        let differs = match me.entry.kind {
            Kind::File { .. } => {
                old.is_some_and(|o| o.entry.kind != me.entry.kind || o.hash != me.hash)
            }
            Kind::Dir | Kind::HardLink { .. } => false,
            // A symlink, FIFO, socket or device (a hard link may name it):
            // another type, target or device number (as for a file, its
            // metadata alone is no change: a FIFO's mtime moves with
            // every write).
            _ => old.is_some_and(|o| o.entry.kind != me.entry.kind),
        };
        if differs {
            let k = self.key(&me.entry.path);
            self.changed.insert(k);
        }
    }

    /// Whether [`FilePaths::note_content`] found the file at `path` changed.
    fn content_changed(&self, path: &[u8]) -> bool {
        self.changed.contains(&self.key(path))
    }
}

/// A file being received.
struct Transfer {
    /// Its slot in the new manifest.
    seq: u64,
    entry: Entry,
    /// The old manifest's entry at its path, kept for a give-up (see
    /// [`BackupReceiver::hold_old`]).
    old: Option<ManifestEntry>,
    /// What `old`'s xattrs count in [`BackupReceiver::old_held`].
    old_cost: usize,
    /// `old` is held without its xattrs (too many were held already).
    old_trimmed: bool,
    /// Name of its rebuild in `.byteback/partial` (unused when written in place).
    partial: Vec<u8>,
    /// An earlier run's rebuild, `<partial>.prev`, is there (part of the basis).
    has_prev: bool,
    /// Written at its own path in `current` (nothing was there).
    in_place: bool,
    /// Whether the old manifest entry's content is what stays at its path
    /// if the transfer is given up.
    old_copy: OldCopy,
    retried: bool,
    /// How often writing it ran out of space.
    nospace_rounds: u8,
    /// File descriptors it holds: its output and its basis's parts (see
    /// `open_files`, `drop_basis`).
    fds: usize,
    /// What is opened when the transfer starts (see `open_files`); `None`
    /// once it is.
    to_open: Option<ToOpen>,
    /// Set once its content passed the check: what is put in place.
    verified: Option<Verified>,
    writer: FileWriter,
    /// Content hash of the stored copy that is the whole basis, when the
    /// manifest vouches for it (its kept signature may be sent).
    basis_hash: Option<[u8; 32]>,
    /// Checksum mode: the stored copy has the entry's size and mtime and
    /// this content; it is kept if the client's BLAKE3 is the same (see
    /// [`BackupReceiver::offer`]), else the file is received as changed.
    verify: Option<[u8; 32]>,
}

/// What a transfer given up leaves at its path in `current`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum OldCopy {
    /// The old manifest's file, vouched for by a clean `current`.
    Vouched,
    /// A regular file of the old manifest's size, after an interrupted
    /// run: its content is checked against the old manifest's hash.
    Unverified,
    /// Nothing the old manifest's entry describes.
    Gone,
}

/// The basis of a transfer, opened when it starts: the lengths of an
/// earlier run's rebuild (`<partial>.prev`, whole file-system blocks) and
/// of the stored copy at the file's path, as seen at its entry.
struct ToOpen {
    prev: Option<u64>,
    stored: Option<u64>,
    /// The stored copy's content hash by the manifest, when it vouches for
    /// it: the basis's if the earlier rebuild drops out.
    vouched: Option<[u8; 32]>,
}

/// Descriptors a transfer in flight may hold: its output, the stored copy
/// and an earlier run's rebuild.
pub const FDS_PER_TRANSFER: usize = 3;

/// Bytes of old entries' xattrs the transfers in flight may hold (see
/// [`BackupReceiver::hold_old`]): eight times the window's.
const OLD_HELD_MAX: usize = 8 * byteback_protocol::limits::MAX_BUFFERED_BYTES;

/// A transfer whose content passed its BLAKE3 check.
struct Verified {
    size: u64,
    hash: [u8; 32],
    mtime: (i64, u32),
    /// Its block signature and units' chaining values, to keep (see `sigs`).
    sig: Option<digest::Kept>,
}

/// One directory of the chain from `current` to the last entry.
struct OpenDir {
    /// Client path.
    path: Vec<u8>,
    /// Opened beneath `current` when first needed.
    fd: Option<OwnedFd>,
    /// Created by this backup, so nothing in it needs a look.
    created: bool,
}

/// Parent directory of the last file created, opened as a basis or
/// renamed into place at its own path.
struct LastParent {
    /// On-disc path beneath `current`.
    path: Vec<u8>,
    fd: OwnedFd,
}

/// Outcome of a finished transfer, for the reply.
pub enum TransferResult {
    /// Committed to `current` (or dropped after an abort): the reply is `FileOk`.
    Done,
    /// Hash mismatch: resend whole.
    Retry,
    /// The store ran out of space for it: make room, then resend whole.
    NoSpace {
        /// The file's path, for messages.
        path: String,
        /// The bytes the client sent for it (at most its declared size).
        need: u64,
        /// A quota ran out (EDQUOT), not the filesystem.
        quota: bool,
    },
}

/// What `current` and its manifest were when a backup started.
#[derive(Debug, Clone)]
struct Start {
    /// `current` matched its manifest (the clean marker was there).
    clean: bool,
    /// The old manifest was read (not missing, not replaced by an empty one).
    has_manifest: bool,
    /// `current` is byteback 1.x's and no byteback backup has committed
    /// into it yet ([`TAKEOVER`]): nothing vouches for its files, each one
    /// kept by size and mtime is checked against the client's BLAKE3.
    takeover: bool,
    /// The old manifest's generation (see [`carry`]), offered when `clean`.
    generation: carry::Stored,
    /// `current` is unclean and was last changed under another boot (or
    /// no record says which): files no manifest vouches for are checked
    /// against the client's BLAKE3 (see the module's text).
    suspect: bool,
    /// This kernel's boot id.
    boot: Option<String>,
}

/// What the commit has to do, as learnt from the entries so far (see
/// [`commit`]).
#[derive(Debug)]
struct CommitWork {
    /// The clean marker is still on disc.
    marker: bool,
    /// Something in this backup differs from the old manifest, or `current`
    /// was not clean: the commit writes a new manifest.
    changed: bool,
    /// Entries resolved before anything changed, not written to the new
    /// manifest: they are the old manifest's first ones.
    unwritten: u64,
    /// Something in `current` was created, replaced or removed: the commit
    /// syncs the filesystem (otherwise only the new manifest).
    touched: bool,
    /// `current` may hold objects the new manifest does not name (it was
    /// not clean, or an entry was deleted or changed type): the commit
    /// sweeps it.
    needs_sweep: bool,
    /// The commit is under way: `.byteback/partial` and the no-space
    /// marker are gone for good.
    committing: bool,
    /// Files placed a second before their mtime (see `on_disc_mtime`),
    /// with it: given it once the commit has made them durable (at most
    /// [`MAX_OFFSET_BYTES`] of paths; the rest stay so, which costs a
    /// resend after an interrupted run, never a wrong file).
    offset: Vec<(Vec<u8>, (i64, u32))>,
    offset_bytes: usize,
}

/// Most bytes of paths [`CommitWork::offset`] holds.
const MAX_OFFSET_BYTES: usize = 16 << 20;

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
    /// What held when this backup started.
    start: Start,
    /// What the commit has to do, as learnt so far.
    work: CommitWork,
    /// Entries not yet in the new manifest, in walk order.
    slots: Slots,
    /// Boxed: a first backup of small files has up to 8,192 in the window
    /// (about 2.4 KiB each, its hasher inline), and the table's buckets
    /// (and its doubling) then stay small: unboxed, W1's server peaked at
    /// 63 MiB, in tables of 20 and 40 MiB.
    transfers: HashMap<u32, Box<Transfer>>,
    /// The memory the kept digests of the transfers hold, bounded.
    kept: digest::KeptBudget,
    next_id: u32,
    /// File descriptors the open transfers hold (see [`Self::files_held`]).
    held_fds: usize,
    /// See [`Self::limit_held_fds`].
    max_held_fds: usize,
    /// The directory chain of the last entry.
    dirs: Vec<OpenDir>,
    last_parent: Option<LastParent>,
    decoder: Decoder,
    /// The filesystem shares extents (cleared when it refuses a clone).
    clone_ok: bool,
    /// Stored content by hash, built from the old manifest when first needed.
    twins: Option<TwinIndex>,
    /// Kept block signatures.
    sigs: sigs::KeptSigs,
    /// The chain of the digests of the new manifest's entries so far: its
    /// generation once committed.
    chain: byteback_protocol::unchanged::Chain,
    /// The last entry of the latest run of unchanged ones, until an entry
    /// is sent after it.
    last_carried: Option<Vec<u8>>,
    /// Counters reported to the client.
    pub stats: BackupStats,
    /// Bytes this backup wrote to disc that share nothing with stored
    /// copies: literal data and whatever a delta or a twin copied rather
    /// than cloned; the objects it created ([`INODE_COST`] each) and the
    /// manifest it wrote (every snapshot keeps its own). The usage log's
    /// growth and the size guard's figure, so a client cannot fill the disc
    /// with copies, empty objects or xattrs it names in a few bytes.
    pub grown: u64,
    /// Of [`Self::grown`], the bytes of the new manifest written so far:
    /// counted as they are written, since entries that create nothing
    /// (FIFOs, devices, hard links) can carry a MiB of xattrs each, and a
    /// client cut off before its commit must not have filled the disc
    /// unseen by the growth guard.
    manifest_grown: u64,
    /// `manifest.new` is on disc and not renamed into place yet: from the
    /// start of the new manifest to the commit's rename (its writer is
    /// taken before that, to finish it).
    new_pending: bool,
    /// Bytes of the old entries' xattrs the transfers in flight hold (see
    /// [`Self::hold_old`]).
    old_held: usize,
    /// Of [`Self::grown`], what the usage log has already (see
    /// [`Self::unrecorded`]). A transfer's bytes thrown away after they were
    /// recorded (it ran out of space) lower `grown` below it: later growth
    /// pays them back before more is recorded, so they count once.
    pub noted: u64,
    /// Non-fatal problems to report (see [`Self::warn`]).
    pub warnings: Vec<String>,
    /// Warnings beyond [`MAX_WARNINGS`], counted only.
    pub warnings_dropped: u64,
    /// The paths of the regular files in the new manifest so far, for the
    /// check of hard links (see [`FilePaths`]).
    files: FilePaths,
    /// Making room when creating or renaming runs out of space (none: the
    /// error stands).
    room: Option<Room>,
    /// Checksum mode: a file whose size and mtime match its stored copy is
    /// kept only once the client's BLAKE3 of it matches too.
    checksum: bool,
    /// The last path the client said it could not read: nothing within it
    /// may be sent after.
    kept_unread: Option<Vec<u8>>,
}

/// Opens the old manifest of `current` (`meta` is its `.byteback`). One
/// damaged at its start is set aside and recovered at once. Returns it and
/// whether there was one.
fn open_old_manifest(
    host: &HostStore,
    meta: &OwnedFd,
    manifest_path: &std::path::Path,
    warnings: &mut Vec<String>,
) -> Result<(PeekableManifest, bool)> {
    let opened = match fsops::open_file(meta, MANIFEST) {
        Ok(f) => Some(
            ManifestReader::new(f, manifest_path)
                .and_then(|r| PeekableManifest::new(r.with_digests())),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("open the manifest", manifest_path.display(), e)),
    };
    Ok(match opened {
        Some(Ok(m)) => (m, true),
        Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            set_aside_manifest(meta, manifest_path.parent().unwrap_or(manifest_path))?;
            warnings.push(format!("{e}"));
            warnings.push(recover_manifest(host, meta, manifest_path));
            match fsops::open_file(meta, MANIFEST) {
                Ok(f) => (
                    ManifestReader::new(f, manifest_path)
                        .and_then(|r| PeekableManifest::new(r.with_digests()))
                        .map_err(Error::Manifest)?,
                    true,
                ),
                Err(_) => (empty_manifest()?, false),
            }
        }
        Some(Err(e)) => return Err(Error::Manifest(e)),
        None => (empty_manifest()?, false),
    })
}

/// Opens (creating what is missing) the metadata directory of `current`
/// at `meta_path`, its directory of partial rebuilds and its kept
/// signatures, after removing an interrupted run's leftovers.
fn open_meta(
    current: &OwnedFd,
    meta_path: &Path,
    room: &mut Option<Room>,
) -> Result<(OwnedFd, OwnedFd, sigs::KeptSigs)> {
    let at = |name: &[u8]| in_dir(meta_path, name);
    let creating = |p: String| move || format!("creating {p}");
    // byteback 1.x's `current` (no `.byteback`, and not the empty one a
    // new host starts with) is marked as such before `.byteback` is made.
    let from_1x = crate::legacy::is_legacy(current)
        .and_then(|legacy| Ok(legacy && !fsops::is_empty_dir(current)?))
        .op("look at", || meta_path.display())?;
    if from_1x {
        // `.byteback` appears with the marker in it or not at all: made
        // under another name, synced, then renamed into place (a crash
        // between a `.byteback` and its marker would have left a 1.x tree
        // no longer taken for one, its copies trusted by size and mtime).
        // No client path maps to that name (see `disk_path`).
        const BUILDING: &[u8] = b".byteback-takeover";
        use std::os::unix::ffi::OsStrExt;
        let name = |b: &'static [u8]| std::ffi::OsStr::from_bytes(b);
        room::retry(room, creating(at(TAKEOVER)), || {
            (|| -> io::Result<()> {
                fsops::remove_any(current, BUILDING)?;
                fsops::ensure_dir(current, BUILDING, 0o700)?;
                let building = fsops::open_dir(current, BUILDING)?;
                fsops::fsync(&fsops::create_new(&building, TAKEOVER)?)?;
                fsops::fsync(&building)?;
                rustix::fs::renameat(current, name(BUILDING), current, name(META_DIR))?;
                fsops::fsync(current)
            })()
            .op("create", || at(TAKEOVER))
        })?;
    }
    room::retry(room, creating(meta_path.display().to_string()), || {
        fsops::ensure_dir(current, META_DIR, 0o700).op("create", || meta_path.display())
    })?;
    let meta = fsops::open_dir(current, META_DIR).op("open", || meta_path.display())?;
    // Leftovers of an interrupted run (`tmp`: of versions before partial
    // rebuilds were kept); `partial` is kept for resuming.
    for name in [&b"tmp"[..], b"manifest.new", BOOT_NEW] {
        fsops::remove_any(&meta, name).op("remove", || at(name))?;
    }
    room::retry(room, creating(at(PARTIAL)), || {
        fsops::ensure_dir(&meta, PARTIAL, 0o700).op("create", || at(PARTIAL))
    })?;
    let partial = fsops::open_dir(&meta, PARTIAL).op("open", || at(PARTIAL))?;
    let sigs = room::retry(room, creating(in_dir(meta_path, b"sigs")), || {
        sigs::KeptSigs::open(&meta, meta_path)
    })?;
    Ok((meta, partial, sigs))
}

/// A manifest with no entries (of a first backup, or after a damaged one).
fn empty_manifest() -> Result<PeekableManifest> {
    PeekableManifest::new(ManifestReader::empty()).map_err(Error::Manifest)
}

impl BackupReceiver {
    /// The old manifest's entry `o` as a transfer holds it, with what its
    /// xattrs count, and whether they were left out. The window the client
    /// keeps counts the entries it sends, not the old ones, whose xattrs
    /// (up to a MiB each) a hostile client could make the server hold for
    /// thousands of transfers at once for a few bytes each: past
    /// [`OLD_HELD_MAX`] an old entry is held without them (should that
    /// transfer be given up, its entry is kept without its xattrs, said).
    fn hold_old(&mut self, o: Option<ManifestEntry>) -> (Option<ManifestEntry>, usize, bool) {
        let Some(mut o) = o else {
            return (None, 0, false);
        };
        let cost = o.entry.xattr_cost();
        if self.old_held.saturating_add(cost) > OLD_HELD_MAX {
            o.entry.xattrs = vec![];
            return (Some(o), 0, cost > 0);
        }
        self.old_held += cost;
        (Some(o), cost, false)
    }

    /// Counts in [`Self::grown`] what the new manifest wrote since.
    fn count_manifest(&mut self) {
        let written = self.new.as_ref().map_or(0, ManifestWriter::written);
        if written > self.manifest_grown {
            self.grown = self.grown.saturating_add(written - self.manifest_grown);
            self.manifest_grown = written;
        }
    }

    /// The new manifest, of a backup that ends without its commit, goes
    /// (the next run starts its own): what it held is no growth, and a
    /// usage log that counted it gets the credit (see
    /// [`Self::overcounted`]).
    pub fn abandon_manifest(&mut self) {
        // Never started, or committed (it is the manifest now).
        if !self.new_pending {
            return;
        }
        self.new = None;
        if let Err(e) = fsops::remove_any(&self.meta, b"manifest.new") {
            tracing::warn!(
                "cannot remove {}: {e}",
                in_dir(&self.meta_path, b"manifest.new")
            );
            return;
        }
        self.new_pending = false;
        self.grown = self.grown.saturating_sub(self.manifest_grown);
        self.manifest_grown = 0;
    }

    /// Growth the usage log does not have yet.
    pub fn unrecorded(&self) -> u64 {
        self.grown.saturating_sub(self.noted)
    }

    /// The usage log now has [`Self::unrecorded`].
    pub fn recorded(&mut self) {
        self.noted = self.noted.max(self.grown);
    }

    /// Bytes the usage log has that were thrown away since (a transfer
    /// that ran out of space) and not written again.
    pub fn overcounted(&self) -> u64 {
        self.noted.saturating_sub(self.grown)
    }

    /// The usage log was told of [`Self::overcounted`] (see
    /// [`crate::pruner::record_credit`]).
    pub fn credited(&mut self) {
        self.noted = self.noted.min(self.grown);
    }

    /// Prepares `current` of `host` for a new backup; `room` makes room
    /// when creating or renaming something runs out of space (see
    /// [`room`]).
    pub fn new(host: &HostStore, mut room: Option<Room>) -> Result<Self> {
        byteback_protocol::os::keep_freed_buffers();
        let current = host.current()?;
        let meta_path = host.path.join("current").join(META_DIR_NAME);
        let at = |name: &[u8]| in_dir(&meta_path, name);
        let (meta, partial, sigs) = open_meta(&current, &meta_path, &mut room)?;
        let manifest_path = meta_path.join("manifest");
        let mut warnings = vec![];
        let exists = |name: &[u8]| -> Result<bool> {
            Ok(fsops::lstat_at(&meta, name)
                .op("look at", || at(name))?
                .is_some())
        };
        if exists(DAMAGED)? && !exists(MANIFEST)? {
            warnings.push(recover_manifest(host, &meta, &manifest_path));
        }
        let (old, has_manifest) = open_old_manifest(host, &meta, &manifest_path, &mut warnings)?;
        let marker = exists(CLEAN)?;
        let takeover = !has_manifest && exists(TAKEOVER)?;
        let clean = marker && has_manifest;
        let boot = boot_id(&current);
        let recorded = crate::pruner::read_small(&meta, "boot");
        // No record: a fresh `current` (nothing to suspect), or one an
        // older server left unfinished (suspected if it has a manifest).
        let suspect = !clean
            && match (&boot, &recorded) {
                (Some(b), Some(r)) => r.trim() != b,
                (None, Some(_)) => true,
                (_, None) => has_manifest,
            };
        if suspect {
            tracing::info!(
                "current was left unfinished under another boot of this server (or one no record names): files that run wrote are kept only if the client's BLAKE3 matches"
            );
        }
        let generation = match fsops::open_file(&meta, MANIFEST) {
            Ok(f) if has_manifest => carry::read_generation(f),
            _ => carry::Stored::Unsupported,
        };
        let dir_fd = fsops::open_dir(&current, b"")
            .op("open", || host.path.join("current").display().to_string())?;
        let mut rx = BackupReceiver {
            clone_ok: host.btrfs,
            twins: None,
            sigs,
            current,
            meta,
            meta_path,
            partial,
            old,
            new: None,
            start: Start {
                clean,
                has_manifest,
                takeover,
                generation,
                suspect,
                boot,
            },
            chain: Default::default(),
            last_carried: None,
            work: CommitWork {
                marker,
                changed: false,
                unwritten: 0,
                touched: !clean,
                needs_sweep: !clean,
                committing: false,
                offset: vec![],
                offset_bytes: 0,
            },
            slots: Slots::default(),
            transfers: HashMap::new(),
            kept: Default::default(),
            next_id: 0,
            held_fds: 0,
            max_held_fds: usize::MAX,
            dirs: vec![OpenDir {
                path: vec![],
                fd: Some(dir_fd),
                created: false,
            }],
            last_parent: None,
            decoder: Decoder::new()?,
            stats: BackupStats::default(),
            grown: 0,
            manifest_grown: 0,
            new_pending: false,
            old_held: 0,
            noted: 0,
            warnings,
            warnings_dropped: 0,
            files: FilePaths::default(),
            room,
            checksum: false,
            kept_unread: None,
        };
        if !clean {
            // Leftovers of an interrupted run may be anywhere: the commit
            // has to write the manifest and walk `current` whatever comes.
            rx.mark_changed()?;
        }
        Ok(rx)
    }

    /// Checksum mode (the client's `--checksum`): files whose size and
    /// mtime match are compared by the client's BLAKE3 too.
    pub fn set_checksum(&mut self, on: bool) {
        self.checksum = on;
    }

    /// File descriptors the transfers in progress hold: each a file it
    /// writes and the parts of its basis. The serve loop answers a batch of
    /// entries only while they leave room for one more file in flight
    /// under the process's open-file limit (see `serve::backup`).
    pub fn files_held(&self) -> usize {
        self.held_fds
    }

    /// At most `fds` descriptors for the transfers: a transfer that would
    /// need more to start fails the backup (only a client that starts far
    /// more files than it has threads gets there).
    pub fn limit_held_fds(&mut self, fds: usize) {
        self.max_held_fds = fds;
    }

    /// Records that this backup ran out of space: until a commit, the next
    /// backup starts by removing what failed runs left. Creating the marker
    /// needs space too (btrfs metadata): when that fails it is said, and
    /// making room goes on (the next commit cleans up all the same).
    pub fn note_no_space(&self) {
        let at = || in_dir(&self.meta_path, NO_SPACE);
        let noted = fsops::lstat_at(&self.meta, NO_SPACE)
            .op("look at", at)
            .and_then(|st| match st {
                Some(_) => Ok(()),
                None => fsops::create_new(&self.meta, NO_SPACE)
                    .map(drop)
                    .op("create", at),
            });
        if let Err(e) = noted {
            tracing::warn!(
                "cannot mark the store as short of space ({e}); making room all the same"
            );
        }
    }

    /// Whether reading the old manifest found it damaged.
    pub fn manifest_damaged(&self) -> bool {
        self.old.is_damaged()
    }

    /// Sets the damaged manifest aside so the next backup recovers one.
    pub fn set_aside_manifest(&self) -> Result<()> {
        set_aside_manifest(&self.meta, &self.meta_path)
    }

    /// The fd of directory `dirs[i]`, opened beneath `current` if not yet.
    fn dir_fd(&mut self, i: usize) -> Result<OwnedFd> {
        let dir = self
            .dirs
            .get_mut(i)
            .ok_or(Error::Internal("directory stack empty"))?;
        if dir.fd.is_none() {
            let opened = fsops::open_dir(&self.current, &disk_path(&dir.path))
                .op("open directory", || shown(&dir.path))?;
            dir.fd = Some(opened);
        }
        match &dir.fd {
            Some(fd) => fd
                .try_clone()
                .op("duplicate the fd of", || shown(&dir.path)),
            None => Err(Error::Internal("directory not open")),
        }
    }

    /// Handles one batch; returns what the server needs for it.
    pub fn entries(&mut self, entries: Vec<Entry>) -> Result<Vec<Need>> {
        let mut needs = vec![];
        for (i, e) in entries.into_iter().enumerate() {
            // Every error names the entry it happened on.
            let path = e.path.clone();
            let started = self
                .entry(e)
                .context_with(|| format!("storing {}", shown(&path)))?;
            if let Some(started) = started {
                needs.push(Need {
                    index: i as u32,
                    id: started.id,
                    basis: started.has_basis,
                    twin: started.twin,
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
            Some(t) => shown(&t.entry.path),
            None => format!("transfer {id}"),
        }
    }

    /// Writes the resolved entries at the front of the slots to the new
    /// manifest (or counts them while it is not started).
    fn flush_slots(&mut self) -> Result<()> {
        while let Some((e, digest)) = self.slots.pop_ready() {
            match &e.entry.kind {
                // What a later name may link to: any object but a directory.
                Kind::File { .. }
                | Kind::Symlink { .. }
                | Kind::Fifo
                | Kind::Socket
                | Kind::CharDev { .. }
                | Kind::BlockDev { .. } => self.files.insert(&e.entry.path),
                Kind::HardLink { target } if !self.files.contains(target) => {
                    self.drop_link(&e.entry.path, target)?;
                    continue;
                }
                _ => {}
            }
            self.chain.push(
                &digest.unwrap_or_else(|| byteback_protocol::unchanged::entry_digest(&e.entry)),
            );
            match self.new.as_mut() {
                Some(new) => {
                    new.push(&e)
                        .op("write", || in_dir(&self.meta_path, b"manifest.new"))?;
                    self.sigs.note(&e);
                    self.count_manifest();
                }
                // Equal to the old manifest's next entry (see `push_ready`).
                None => self.work.unwritten += 1,
            }
        }
        Ok(())
    }

    /// Leaves hard link `path` out of the new manifest: its `target` is not
    /// a regular file of it (the client gave up on that file, or names
    /// something else), so a restore could not make it.
    fn drop_link(&mut self, path: &[u8], target: &[u8]) -> Result<()> {
        // Every entry before it is written (or counted as the old
        // manifest's): from here the new manifest differs.
        self.mark_changed()?;
        self.left_out(format!(
            "{}: a hard link to {}, which is no file, symlink or special file of this \
             backup: left out",
            crate::error::shown(path),
            crate::error::shown(target)
        ));
        Ok(())
    }

    /// [`Self::warn`] about an entry left out of this backup, or kept at
    /// its last version: the client counts it, and the backup is partial.
    pub(super) fn left_out(&mut self, w: String) {
        self.stats.left_out += 1;
        self.warn(w);
    }

    /// Keeps warning `w` for the client and the log, up to
    /// [`MAX_WARNINGS`]; the rest are counted.
    pub(super) fn warn(&mut self, w: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        } else {
            self.warnings_dropped += 1;
        }
    }

    /// The index in `dirs` of the directory that holds `path`, checking that
    /// its parent was sent in this backup, and whether this backup created
    /// that directory.
    fn parent_dir(&mut self, path: &[u8]) -> Result<(usize, bool)> {
        let (parent, _) = split(path);
        while self.dirs.len() > 1 {
            let top = &self.dirs[self.dirs.len() - 1].path;
            if path.len() > top.len() && path.starts_with(top) && path[top.len()] == b'/' {
                break;
            }
            self.dirs.pop();
        }
        let top = self
            .dirs
            .last()
            .ok_or(Error::Internal("directory stack empty"))?;
        if top.path.as_slice() != parent {
            return Err(Error::Refused(format!(
                "entry {:?} arrived without its parent directory",
                String::from_utf8_lossy(path)
            )));
        }
        Ok((self.dirs.len() - 1, top.created))
    }

    /// Records the resolved entry `me`; the manifest must be rewritten if
    /// it differs from the old one at that path.
    fn push_ready(&mut self, me: ManifestEntry, old: Option<&ManifestEntry>) -> Result<()> {
        if old != Some(&me) {
            self.mark_changed()?;
        }
        self.files.note_content(&me, old);
        let cost = me.entry.buffer_cost();
        self.slots.push(Slot::Ready(me), cost)?;
        Ok(())
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
            let keep = t.writer.written > 0 && !t.writer.nospace;
            let created = t.writer.is_open();
            drop(t.writer);
            if keep {
                continue;
            }
            if t.in_place {
                if !created {
                    continue; // never created: nothing is there
                }
                let _ = remove_in_place(&self.current, &t.entry.path);
            } else {
                let _ = fsops::remove_any(&self.partial, &t.partial);
            }
        }
    }
}

/// `name` in directory `dir` (a path on disc), for messages.
fn in_dir(dir: &std::path::Path, name: &[u8]) -> String {
    use std::os::unix::ffi::OsStrExt;
    dir.join(std::ffi::OsStr::from_bytes(name))
        .display()
        .to_string()
}

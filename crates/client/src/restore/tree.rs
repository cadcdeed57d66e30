//! The restore target, `<into>/<snapshot>/` and everything below it, worked on through directory fds.
//!
//! The root is opened without following a symlink (an existing symlink there
//! is refused). Every directory below is made with `mkdirat` and opened
//! beneath its parent's fd (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`); the directories on the way to the current entry stay
//! open in a stack, in walk order, so no path is ever looked up twice. Files
//! are created `O_EXCL | O_NOFOLLOW` after whatever stood there was removed
//! with `unlinkat` on the parent's fd; hard links are made with `linkat`
//! from an fd of a file this run wrote; metadata goes onto fds (see
//! [`crate::apply`]). While the restore runs, every directory it works in is
//! private to the restoring user (0700, owned by it): nobody else can plant or
//! swap names there. A directory gets its own owner and mode when the walk
//! leaves it, the mode last, so nothing is ever setuid or open to others
//! before its owner and content are final.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{bail, err, IoContext, Result};
use byteback_protocol::{ClientMsg, Entry, Kind, ManifestEntry};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

use super::check::{is_ancestor, parent_of};
use super::{display_path, RestoreReport};
use crate::apply::{self, ApplyRules, Held};
use crate::conn::Connection;

/// How a restore treats what the snapshot asks for.
#[derive(Debug, Clone, Copy)]
pub struct TreeOptions {
    /// Owners, modes and xattrs.
    pub rules: ApplyRules,
    /// Device nodes are not recreated (`--no-devices`).
    pub no_devices: bool,
    /// Name each restored entry on stderr.
    pub verbose: bool,
    /// The snapshot keeps no checksums (byteback 1.x): files are checked for
    /// their size only, and counted as unverified.
    pub unverified: bool,
    /// Every file allocated whole (`--no-sparse`).
    pub no_sparse: bool,
}

/// What a directory gets when the walk leaves it.
enum Leave {
    /// The metadata of its manifest entry; for one that existed before the
    /// restore, with the id its old owner and mode are registered under
    /// (see [`super::interrupt`]), forgotten once the entry's are set; and
    /// whether xattrs were left out of it (see [`RestoreTree::hold_top`]).
    Entry(Box<Entry>, Option<u64>, bool),
    /// It existed before the restore: its owner and mode go back (see
    /// [`super::interrupt`] for `id`).
    Restore {
        uid: u32,
        gid: u32,
        mode: u32,
        id: Option<u64>,
    },
    /// Made by this restore (its root, or on the way to a selected path
    /// whose manifest has no entry for it): mode 0755.
    Default,
}

/// A directory on the way down to the current entry.
struct OpenDir {
    /// Wire path (empty for the root).
    path: Vec<u8>,
    fd: OwnedFd,
    leave: Leave,
    /// What its `leave` holds, by [`Entry::buffer_cost`] (see
    /// [`RestoreTree::held`]).
    cost: usize,
}

/// Bytes of directory entries the stack holds (their xattrs, to be set when
/// each is left) past which a directory keeps its ACLs only; four times
/// this refuses the next. Without a bound, a server nesting 2,048
/// directories that each carry 1 MiB of xattrs made the restore hold 2 GiB.
const STACK_BYTES: usize = 32 << 20;

/// One selected manifest entry, and where its content comes from.
pub struct Wanted {
    /// The entry to restore.
    pub e: ManifestEntry,
    /// For a hard link whose first name was not selected: that name, whose
    /// content is fetched for this path (the entry is then a regular file),
    /// or whose object is made here (a symlink, FIFO, socket or device).
    pub from: Option<Vec<u8>>,
    /// A hard link in the manifest names this object as its first name:
    /// its inode is remembered for the link (see `RestoreTree::created`).
    pub linked: bool,
}

/// Files asked for ahead of the one being restored.
///
/// A restore of many small files waited a round trip to the server for
/// each: ask, wait, write, ask the next. Asking for the next files before
/// the current one's content has come keeps the server busy meanwhile; it
/// answers in order, so the answers come as the restore takes them. What is
/// asked for ahead stays small ([`AHEAD_FILES`], [`AHEAD_BYTES`] of
/// requests), well below what the connection buffers towards the server,
/// so sending it never blocks while the server is blocked sending to us.
#[derive(Default)]
struct ReadAhead {
    /// The files asked for and not yet fetched, in order (their source paths).
    asked: VecDeque<Vec<u8>>,
    /// Bytes of those requests on the wire.
    bytes: usize,
    /// Entries looked at, from the one being restored on.
    seen: usize,
}

/// Most files asked for beyond the one being restored.
const AHEAD_FILES: usize = 64;
/// Most bytes of requests asked ahead (a path is at most 4 KiB).
const AHEAD_BYTES: usize = 32 << 10;

/// The path whose content the restore of `w` fetches from the server, if
/// it fetches any (`unverified`: the snapshot keeps no checksums).
fn fetched_from(w: &Wanted, unverified: bool) -> Option<&[u8]> {
    let Kind::File { size } = w.e.entry.kind else {
        return None;
    };
    let hash = (!unverified).then_some(&w.e.hash);
    needs_fetch(size, hash).then(|| w.from.as_deref().unwrap_or(&w.e.entry.path))
}

/// Whether a file of `size` bytes hashing to `hash` must be fetched (an
/// empty one need not be).
fn needs_fetch(size: u64, hash: Option<&[u8; 32]>) -> bool {
    size != 0 || hash.is_some_and(|h| *h != byteback_delta::hash_bytes(b""))
}

/// Request bytes of a `ReadFile` for `path` (about: for the budget only).
fn request_bytes(snapshot: &str, path: &[u8]) -> usize {
    16 + snapshot.len() + path.len()
}

impl ReadAhead {
    /// Asks for the content of the files among `now` (the entry about to
    /// be restored) and `after` (the ones after it) not asked for yet, as
    /// far as the limits allow. Each entry is looked at once.
    fn ask(
        &mut self,
        conn: &mut Connection,
        snapshot: &str,
        unverified: bool,
        now: &Wanted,
        after: &VecDeque<Wanted>,
    ) -> Result<()> {
        while self.asked.len() <= AHEAD_FILES && self.bytes < AHEAD_BYTES {
            let w = match self.seen.checked_sub(1) {
                None => now,
                Some(i) => match after.get(i) {
                    Some(w) => w,
                    None => break,
                },
            };
            self.seen += 1;
            if let Some(src) = fetched_from(w, unverified) {
                self.send(conn, snapshot, src)?;
            }
        }
        Ok(())
    }

    fn send(&mut self, conn: &mut Connection, snapshot: &str, src: &[u8]) -> Result<()> {
        conn.send(&ClientMsg::ReadFile {
            snapshot: snapshot.to_string(),
            path: src.to_vec(),
        })?;
        self.bytes += request_bytes(snapshot, src);
        self.asked.push_back(src.to_vec());
        Ok(())
    }

    /// The content of `src` is to be received next: asked for ahead, or now.
    fn take(&mut self, conn: &mut Connection, snapshot: &str, src: &[u8]) -> Result<()> {
        match self.asked.front() {
            None => self.send(conn, snapshot, src)?,
            Some(front) if front == src => {}
            Some(front) => bail!(
                "internal error: the restore asked for {} ahead, but fetches {}",
                escape(front),
                escape(src)
            ),
        }
        if let Some(done) = self.asked.pop_front() {
            self.bytes -= request_bytes(snapshot, &done);
        }
        Ok(())
    }

    /// The entry being restored is done with.
    fn next(&mut self) {
        self.seen = self.seen.saturating_sub(1);
    }
}

/// A path for an internal error's message.
fn escape(p: &[u8]) -> String {
    String::from_utf8_lossy(p).escape_default().to_string()
}

/// The restore target.
pub struct RestoreTree {
    snapshot: String,
    /// Files asked for ahead (see [`ReadAhead`]).
    ahead: ReadAhead,
    /// How messages name the directory holding `<snapshot>` (`.` for the current one).
    shown_into: String,
    /// `stack[0]` is `<into>/<snapshot>`; then the directories down to the current entry.
    stack: Vec<OpenDir>,
    /// The sum of the stack's [`OpenDir::cost`].
    stack_bytes: usize,
    /// Per path (its [`path_key`]) of each file this run wrote that a hard
    /// link names as its first name (or that was copied for links, see
    /// [`Wanted::from`]), the (device, inode) it was written as: a link is
    /// made only to what stands at its own first name and is that object.
    /// Only those, so memory grows with the hard links restored, not the
    /// files. With its birth time where the filesystem keeps one: a file a
    /// local user put in its place meanwhile may have the same inode number.
    created: HashMap<u128, ((u64, u64), Birth)>,
    /// Unselected first names of hard links -> the path restored in their place.
    copies: HashMap<Vec<u8>, Vec<u8>>,
    /// Metadata for directories made on the way to selected paths, from
    /// their manifest entries (see [`Self::imply`]).
    implied: HashMap<Vec<u8>, Entry>,
    /// Files removed because their content failed verification (by
    /// [`path_key`]: 16 bytes each, however long the paths).
    damaged: HashSet<u128>,
    /// First names of hard links whose name could not be replaced (see
    /// `restore_file`), as `damaged`.
    unplaced: HashSet<u128>,
    opts: TreeOptions,
    euid: u32,
    egid: u32,
    /// What happened so far.
    pub report: RestoreReport,
}

impl Drop for RestoreTree {
    /// A restore that stops early (an error) still finishes every directory
    /// it worked in, as far as it can: an existing one would otherwise stay
    /// locked down (the restoring user's, 0700), and one it made would
    /// never get its metadata.
    fn drop(&mut self) {
        while !self.stack.is_empty() {
            // `leave_top` pops before it fails, so this ends.
            if let Err(e) = self.leave_top() {
                tracing::warn!("{e}");
            }
        }
    }
}

/// A path's key in sets that may grow with the manifest: the first 16
/// bytes of its BLAKE3.
pub(super) fn path_key(path: &[u8]) -> u128 {
    let d = byteback_delta::hash_bytes(path);
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    u128::from_le_bytes(k)
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Opens directory `name` beneath `parent`, following no symlink at all.
fn open_dir_beneath(parent: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        parent,
        os(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The last component of a wire path.
/// An `O_PATH` descriptor of `path` beneath `root`, never through a
/// symlink; a path too long for the kernel at once (a manifest path may
/// be 4,096 bytes, the kernel takes 4,095) is opened in steps, each
/// beneath the last.
fn path_beneath(root: BorrowedFd<'_>, path: &[u8]) -> rustix::io::Result<OwnedFd> {
    const STEP: usize = 4000;
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let open = |at: BorrowedFd<'_>, p: &[u8], dir: bool| {
        let dir = if dir {
            OFlags::DIRECTORY
        } else {
            OFlags::empty()
        };
        rustix::fs::openat2(
            at,
            os(p),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC | dir,
            Mode::empty(),
            how,
        )
    };
    if path.len() < STEP {
        return open(root, path, false);
    }
    let cut = path[..STEP]
        .iter()
        .rposition(|&b| b == b'/')
        .filter(|&i| i > 0)
        .ok_or(Errno::NAMETOOLONG)?;
    let step = open(root, &path[..cut], true)?;
    path_beneath(step.as_fd(), &path[cut + 1..])
}

/// Whether `file` (of `size` bytes, written) is a Linux swap file: its
/// signature ends its first page. The kernel refuses a swap file with
/// holes, and the blocks of zeros a restore writes as holes would make
/// one useless.
fn is_swap(file: &File, size: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut sig = [0u8; 10];
    size >= 10 * 4096
        && file.read_exact_at(&mut sig, 4096 - 10).is_ok()
        && (&sig == b"SWAPSPACE2" || &sig == b"SWAP-SPACE")
}

/// What tells one inode from another with the same number: its birth
/// time (seconds, nanoseconds) where the filesystem keeps one, and its
/// file handle (`name_to_handle_at`: the inode's number and generation
/// on ext4, btrfs, XFS, tmpfs), which tells apart files made in the same
/// tick of the coarse clock birth times come from (4 ms here).
type Birth = (Option<(i64, u32)>, Option<Vec<u8>>);

/// The [`Birth`] of the object open (or `O_PATH`) as `fd`.
fn birth_of(fd: BorrowedFd<'_>) -> Birth {
    let born = crate::meta::stat_at(crate::meta::At::Fd(fd))
        .ok()
        .filter(|st| st.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0)
        .map(|st| (st.stx_btime.tv_sec, st.stx_btime.tv_nsec));
    (born, handle_of(fd))
}

/// Filesystems whose file handles stay the same for as long as the inode
/// lives (FUSE's, before Linux 6.6, name a node id its daemon may hand
/// out anew once the kernel forgets the inode): ext2-4, XFS, btrfs,
/// tmpfs, F2FS.
const STABLE_HANDLES: [u32; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0xF2F5_2010];

/// The file handle of the object open as `fd`: its type and bytes, on a
/// filesystem of [`STABLE_HANDLES`].
fn handle_of(fd: BorrowedFd<'_>) -> Option<Vec<u8>> {
    let kind = rustix::fs::fstatfs(fd).ok()?.f_type as u64 & 0xFFFF_FFFF;
    if !STABLE_HANDLES.contains(&(kind as u32)) {
        return None;
    }
    // MAX_HANDLE_SZ (128) after the header, 8-byte aligned.
    let mut buf = [0u64; 17];
    let head = std::mem::size_of::<libc::file_handle>();
    let h = buf.as_mut_ptr().cast::<libc::file_handle>();
    let mut mount: libc::c_int = 0;
    // SAFETY: `buf` is aligned for file_handle and has room for its header
    // and the 128 bytes `handle_bytes` allows; the name is an empty C
    // string, with AT_EMPTY_PATH naming `fd` itself.
    let r = unsafe {
        (*h).handle_bytes = 128;
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            h,
            &mut mount,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: the kernel filled in the header and `handle_bytes` (at most
    // 128) bytes after it, all within `buf`.
    let bytes = unsafe {
        let n = ((*h).handle_bytes as usize).min(128);
        let all = std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), head + n);
        let mut v = (*h).handle_type.to_ne_bytes().to_vec();
        v.extend_from_slice(&all[head..]);
        v
    };
    Some(bytes)
}

/// `BYTEBACK_TEST_RECREATE_FIRST_NAME` (debug builds, for the tests): the
/// first name `rel` of a hard link is removed and made again as another
/// file (`planted`, owned by nobody) before the link is made, as a local
/// user could; the inode numbers before and after go to stderr. Set to
/// `rename:OTHER`, file `OTHER` (a path below the root, another file the
/// restore wrote) is renamed over it instead.
#[cfg(debug_assertions)]
fn recreate_fault(root: BorrowedFd<'_>, rel: &[u8]) {
    use std::os::unix::fs::MetadataExt;
    let Some(how) = std::env::var_os("BYTEBACK_TEST_RECREATE_FIRST_NAME") else {
        return;
    };
    let p = Path::new("/proc/self/fd")
        .join(root.as_raw_fd().to_string())
        .join(OsStr::from_bytes(rel));
    if let Some(other) = how.as_bytes().strip_prefix(b"rename:") {
        if other != rel {
            let from = Path::new("/proc/self/fd")
                .join(root.as_raw_fd().to_string())
                .join(OsStr::from_bytes(other));
            let r = std::fs::rename(&from, &p);
            eprintln!("test fault: another file renamed over the first name: {r:?}");
        }
        return;
    }
    let before = std::fs::symlink_metadata(&p).map(|m| m.ino()).unwrap_or(0);
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::write(&p, b"planted");
    let _ = std::os::unix::fs::lchown(&p, Some(65534), Some(65534));
    let after = std::fs::symlink_metadata(&p).map(|m| m.ino()).unwrap_or(0);
    eprintln!("test fault: first name recreated, inode {before} -> {after}");
}

#[cfg(not(debug_assertions))]
fn recreate_fault(_root: BorrowedFd<'_>, _rel: &[u8]) {}

/// Whether `file` is on btrfs.
fn on_btrfs(file: &File) -> bool {
    const BTRFS_SUPER_MAGIC: u32 = 0x9123_683E;
    rustix::fs::fstatfs(file).is_ok_and(|s| s.f_type as u32 == BTRFS_SUPER_MAGIC)
}

/// A copy of swap file `from` (`size` bytes) for btrfs, which swaps only
/// to a NOCOW file (`chattr +C`), a flag only an empty file takes: a new
/// temporary file in `parent` (registered as `temp_id` too), made NOCOW,
/// allocated whole and given `from`'s blocks that are not all zeros.
fn nocow_copy(
    parent: BorrowedFd<'_>,
    temp_id: u64,
    from: &File,
    size: u64,
) -> std::io::Result<(CString, File)> {
    use std::os::unix::fs::FileExt;
    let (name, fd) = super::interrupt::temp_file(parent, temp_id, || create_temp(parent))?;
    let to = File::from(fd);
    let copy = || -> std::io::Result<()> {
        let flags = rustix::fs::ioctl_getflags(&to)?;
        rustix::fs::ioctl_setflags(&to, flags | rustix::fs::IFlags::NOCOW)?;
        rustix::fs::fallocate(&to, rustix::fs::FallocateFlags::empty(), 0, size)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(buf.len() as u64) as usize;
            from.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        Ok(())
    };
    match copy() {
        Ok(()) => Ok((name, to)),
        Err(e) => {
            let _ = rustix::fs::unlinkat(parent, &name, AtFlags::empty());
            Err(e)
        }
    }
}

/// Allocates the holes of restored `file` (zeros as data): a swap file,
/// or every file with `--no-sparse`. A filesystem that cannot is said.
fn allocate_whole(file: &File, size: u64, shown: &str, report: &mut RestoreReport) {
    if let Err(e) = rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        report.warn(format!(
            "{shown}: its holes could not be allocated ({}); it is restored sparse",
            std::io::Error::from(e)
        ));
    }
}

/// Forgets a registered temporary file when dropped (placed, removed, or
/// an error on the way).
struct Forget(u64);

/// An id for [`super::interrupt::temp_file`].
fn next_temp_id() -> u64 {
    static NEXT_TEMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT_TEMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Makes an object with `make` under a temporary name in `parent`
/// (`.byteback-restore.PID.oN`, the first N free), registered as
/// `temp_id` for removal should the restore be stopped; returns the name.
fn make_temp(
    parent: BorrowedFd<'_>,
    temp_id: u64,
    make: impl Fn(&CStr) -> rustix::io::Result<()>,
) -> rustix::io::Result<CString> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let pid = std::process::id();
    let made = super::interrupt::temp_file(parent, temp_id, || loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name =
            CString::new(format!(".byteback-restore.{pid}.o{n}")).map_err(|_| Errno::INVAL)?;
        match make(&name) {
            Err(Errno::EXIST) => continue,
            r => return r.map(|()| (name, ())),
        }
    })?;
    Ok(made.0)
}

impl Drop for Forget {
    fn drop(&mut self) {
        super::interrupt::forget_temp(self.0);
    }
}

/// Creates a new empty file (0600, opened to read too: see [`is_swap`]) in
/// `parent` under a temporary name
/// (`.byteback-restore.PID.N`, the first N free) for a file being
/// restored: see [`RestoreTree::restore_file`].
fn create_temp(parent: BorrowedFd<'_>) -> rustix::io::Result<(CString, OwnedFd)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let pid = std::process::id();
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name =
            CString::new(format!(".byteback-restore.{pid}.{n}")).map_err(|_| Errno::INVAL)?;
        match rustix::fs::openat(
            parent,
            &name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Err(Errno::EXIST) => continue,
            r => return r.map(|fd| (name, fd)),
        }
    }
}

fn last_component(path: &[u8]) -> &[u8] {
    match parent_of(path) {
        Some(p) => &path[p.len() + 1..],
        None => path,
    }
}

/// The fd of the directory on top of the stack (borrowing only the stack,
/// so the report can be updated while it is held).
fn top_fd(stack: &[OpenDir]) -> Result<BorrowedFd<'_>> {
    stack
        .last()
        .map(|d| d.fd.as_fd())
        .ok_or_else(|| err!("restore root already closed"))
}

fn file_type(st: &rustix::fs::Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

impl RestoreTree {
    /// Opens (creating it if needed) `<into>/<snapshot>`, where `base` is
    /// `into`, opened once when the restore started (never looked up by
    /// its path again: between two snapshots, a user who may rename a
    /// directory on that path could put a symlink to any place there); a
    /// symlink or a non-directory standing at `<snapshot>` is refused.
    /// Messages name it `shown_into`.
    pub fn open(
        base: BorrowedFd<'_>,
        into: &Path,
        shown_into: &str,
        snapshot: &str,
        opts: TreeOptions,
    ) -> Result<Self> {
        byteback_protocol::validate_snapshot_name(snapshot)
            .map_err(|e| err!("snapshot name {}: {e}", snapshot.escape_default()))?;
        let fresh = match rustix::fs::mkdirat(base, snapshot, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => bail!("cannot create {}/{snapshot}: {e}", into.display()),
        };
        // Debug builds only, for the tests: another user's directory takes
        // the new one's place between the mkdir and the open.
        #[cfg(debug_assertions)]
        if let Some(uid) = std::env::var("BYTEBACK_TEST_SWAP_NEW_DIR_UID")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|_| fresh)
        {
            let uid = rustix::fs::Uid::from_raw(uid);
            let _ = rustix::fs::chownat(base, snapshot, Some(uid), None, AtFlags::empty());
        }
        let fd = match open_dir_beneath(base, snapshot.as_bytes()) {
            Ok(fd) => fd,
            Err(Errno::LOOP) | Err(Errno::NOTDIR) | Err(Errno::XDEV) => bail!(
                "{}/{snapshot} exists and is a symlink or not a directory; refusing to restore through it",
                into.display()
            ),
            Err(e) => bail!("cannot open {}/{snapshot}: {e}", into.display()),
        };
        // Another user's, or one others may write in (a name planted in a
        // shared directory such as /tmp): its owner could swap what is
        // restored into it before anyone uses it, and would get it back at
        // the end. Checked when made just now too if `into` is a directory
        // others may write in without the sticky bit, or another user's
        // (whatever its mode, its owner may rename what is in it): another
        // user could have put one of their own in its place between the
        // mkdir and the open. Not where nobody else could (root's new
        // directory in root's own directory on an NFS export that squashes
        // root, or on vfat, is not root's); in another user's directory on
        // such a filesystem, the restore is refused, saying so.
        let shared = || {
            rustix::fs::fstat(base).map_or(true, |st| {
                let others_write = st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0;
                // Its owner may rename what is in it, whatever the mode.
                let foreign = st.st_uid != 0 && st.st_uid != rustix::process::geteuid().as_raw();
                others_write || foreign
            })
        };
        if !fresh || shared() {
            let st =
                rustix::fs::fstat(&fd).on("fstat", format!("{}/{snapshot}", into.display()))?;
            let euid = rustix::process::geteuid().as_raw();
            if st.st_uid != euid || st.st_mode & 0o022 != 0 {
                bail!(
                    "{}/{snapshot} {}, owned by uid {} with mode {:o}: refusing to restore into a directory that is not this user's alone (remove it, or restore elsewhere with --target)",
                    into.display(),
                    if fresh {
                        "was made just now but is not this user's alone (replaced as it was made, or a filesystem that maps owners, such as an NFS export that squashes root)"
                    } else {
                        "exists"
                    },
                    st.st_uid,
                    st.st_mode & 0o7777
                );
            }
        }
        let mut tree = RestoreTree {
            snapshot: snapshot.to_string(),
            ahead: ReadAhead::default(),
            shown_into: shown_into.to_string(),
            stack: vec![],
            created: HashMap::new(),
            copies: HashMap::new(),
            implied: HashMap::new(),
            stack_bytes: 0,
            damaged: HashSet::new(),
            unplaced: HashSet::new(),
            opts,
            euid: rustix::process::geteuid().as_raw(),
            egid: rustix::process::getegid().as_raw(),
            report: RestoreReport {
                snapshots: vec![snapshot.to_string()],
                ..Default::default()
            },
        };
        let leave = if fresh {
            Leave::Default
        } else {
            tree.lock_down(&fd, b"")?
        };
        tree.stack.push(OpenDir {
            path: vec![],
            fd,
            leave,
            cost: 0,
        });
        Ok(tree)
    }

    /// Makes an existing directory private to us while the restore works in
    /// it, and says how to put it back.
    fn lock_down(&self, fd: &OwnedFd, path: &[u8]) -> Result<Leave> {
        let st = rustix::fs::fstat(fd).on("fstat", self.shown(path))?;
        let (uid, gid, mode) = (st.st_uid, st.st_gid, st.st_mode & 0o7777);
        let chown = uid != self.euid && self.opts.rules.as_root;
        let id = super::interrupt::lock_down(fd, (uid, gid, mode), chown, || -> Result<()> {
            if chown {
                rustix::fs::fchown(
                    fd,
                    Some(rustix::fs::Uid::from_raw(self.euid)),
                    Some(rustix::fs::Gid::from_raw(self.egid)),
                )
                .on("chown", self.shown(path))?;
            }
            // Private to us, and writable by us (a re-restore into a directory
            // left 0500 must be able to create entries in it).
            if mode != 0o700 {
                rustix::fs::fchmod(fd, Mode::from_raw_mode(0o700)).on("chmod", self.shown(path))?;
            }
            Ok(())
        })?;
        Ok(Leave::Restore { uid, gid, mode, id })
    }

    /// Refuses directory `fd` (at `path`, in `parent`) where it is the root
    /// of another mount than its parent's and a FUSE one, or one whose root
    /// another user owns: its daemon or owner would receive what is
    /// restored there (root's files too), or could hang the restore. A
    /// filesystem the restoring user mounted there (a disc to restore
    /// onto) is entered.
    fn refuse_foreign_mount(
        &self,
        parent: BorrowedFd<'_>,
        fd: &OwnedFd,
        path: &[u8],
    ) -> Result<()> {
        use rustix::fs::StatxFlags;
        let mnt = |at: BorrowedFd<'_>| {
            rustix::fs::statx(at, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)
                .ok()
                .filter(|st| st.stx_mask & StatxFlags::MNT_ID.bits() != 0)
                .map(|st| st.stx_mnt_id)
        };
        let (here, above) = (mnt(fd.as_fd()), mnt(parent));
        if here.is_none() || here == above {
            return Ok(());
        }
        /// `FUSE_SUPER_MAGIC`.
        const FUSE: u64 = 0x6573_5546;
        let st = rustix::fs::fstat(fd).on("fstat", self.shown(path))?;
        let fuse = rustix::fs::fstatfs(fd).is_ok_and(|f| f.f_type as u64 & 0xFFFF_FFFF == FUSE);
        if fuse || st.st_uid != self.euid {
            bail!(
                "{} is a mount point ({}, owned by uid {}): refusing to restore into it (unmount \
                 it, or restore elsewhere with --target)",
                self.shown(path),
                if fuse {
                    "a FUSE filesystem"
                } else {
                    "another filesystem"
                },
                st.st_uid
            );
        }
        Ok(())
    }

    /// `<into>/<snapshot>/path` (`./<snapshot>/path` by default), escaped, for messages.
    fn shown(&self, path: &[u8]) -> String {
        format!(
            "{}/{}{}",
            self.shown_into,
            self.snapshot,
            display_path(path)
        )
    }

    fn top(&self) -> Result<&OpenDir> {
        self.stack
            .last()
            .ok_or_else(|| err!("restore root already closed"))
    }

    /// Makes the stack the chain of directories down to `path`'s parent,
    /// leaving (and finishing) those not on the way.
    fn enter(&mut self, path: &[u8]) -> Result<()> {
        let parent = parent_of(path).unwrap_or(b"");
        while self.stack.len() > 1 {
            let top = &self.top()?.path;
            if top.as_slice() == parent || is_ancestor(top, parent) {
                break;
            }
            self.leave_top()?;
        }
        loop {
            let top = self.top()?;
            if top.path.as_slice() == parent {
                return Ok(());
            }
            let start = if top.path.is_empty() {
                0
            } else {
                top.path.len() + 1
            };
            let end = parent[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(parent.len(), |i| start + i);
            let dir = parent[..end].to_vec();
            let (fd, leave) = self.open_dir(&dir)?;
            let made = matches!(leave, Leave::Default);
            self.stack.push(OpenDir {
                path: dir.clone(),
                fd,
                leave,
                cost: 0,
            });
            if made {
                if let Some(e) = self.implied.remove(&dir) {
                    self.hold_top(e, None)?;
                }
            }
        }
    }

    /// Opens (making it if needed) directory `path`, a child of the top of
    /// the stack; something else standing there is removed first.
    fn open_dir(&self, path: &[u8]) -> Result<(OwnedFd, Leave)> {
        let parent = self.top()?.fd.as_fd();
        let name = last_component(path);
        for _ in 0..3 {
            match rustix::fs::mkdirat(parent, os(name), Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    let fd = open_dir_beneath(parent, name).on("cannot open", self.shown(path))?;
                    return Ok((fd, Leave::Default));
                }
                Err(Errno::EXIST) => {}
                Err(e) => bail!("cannot create {}: {e}", self.shown(path)),
            }
            match open_dir_beneath(parent, name) {
                Ok(fd) => {
                    self.refuse_foreign_mount(parent, &fd, path)?;
                    let leave = self.lock_down(&fd, path)?;
                    return Ok((fd, leave));
                }
                Err(Errno::LOOP) | Err(Errno::NOTDIR) | Err(Errno::XDEV) => {
                    rustix::fs::unlinkat(parent, os(name), AtFlags::empty())
                        .on("cannot remove", self.shown(path))?;
                }
                Err(Errno::NOENT) => {}
                Err(e) => bail!("cannot open {}: {e}", self.shown(path)),
            }
        }
        bail!("{} keeps changing under the restore", self.shown(path))
    }

    /// Gives the directory on top of the stack (just pushed, with what it
    /// had) its entry `e`, to be set when it is left, within
    /// [`STACK_BYTES`]: past it, with its ACLs only (what keeps it
    /// private; said, and its other xattrs are left as they are), past four
    /// times that refused (the directory is then finished as it was).
    fn hold_top(&mut self, mut e: Entry, id: Option<u64>) -> Result<()> {
        let mut stripped = false;
        if self.stack_bytes + e.buffer_cost() > STACK_BYTES {
            let before = e.xattrs.len();
            e.xattrs
                .retain(|(n, _)| n.starts_with(b"system.posix_acl_"));
            stripped = e.xattrs.len() < before;
            if stripped {
                self.report.warn(format!(
                    "{}: the directories above it carry more than {} MiB of xattrs: restored with its ACLs only",
                    self.shown(&e.path),
                    STACK_BYTES >> 20
                ));
            }
        }
        let cost = e.buffer_cost();
        if self.stack_bytes + cost > 4 * STACK_BYTES {
            bail!(
                "{}: the directories above it carry more than {} MiB of ACLs; refusing to go on",
                self.shown(&e.path),
                (4 * STACK_BYTES) >> 20
            );
        }
        let top = self
            .stack
            .last_mut()
            .ok_or_else(|| err!("restore root already closed"))?;
        top.leave = Leave::Entry(Box::new(e), id, stripped);
        top.cost = cost;
        self.stack_bytes += cost;
        Ok(())
    }

    /// Finishes the directory on top of the stack: its metadata, mode last.
    fn leave_top(&mut self) -> Result<()> {
        let Some(d) = self.stack.pop() else {
            return Ok(());
        };
        self.stack_bytes -= d.cost;
        let shown = self.shown(&d.path);
        match d.leave {
            Leave::Entry(e, id, stripped) => {
                let rules = ApplyRules {
                    keep_unlisted_xattrs: stripped,
                    ..self.opts.rules
                };
                let w = super::interrupt::put_back(id, || {
                    apply::apply(Held::Open(d.fd.as_fd()), &e, &rules, &shown)
                })?;
                w.into_iter().for_each(|w| self.report.warn(w));
            }
            Leave::Restore { uid, gid, mode, id } => {
                super::interrupt::put_back(id, || -> Result<()> {
                    if self.opts.rules.as_root {
                        rustix::fs::fchown(
                            &d.fd,
                            Some(rustix::fs::Uid::from_raw(uid)),
                            Some(rustix::fs::Gid::from_raw(gid)),
                        )
                        .on("chown", &shown)?;
                    }
                    rustix::fs::fchmod(&d.fd, Mode::from_raw_mode(mode)).on("chmod", &shown)
                })?;
            }
            Leave::Default => {
                rustix::fs::fchmod(&d.fd, Mode::from_raw_mode(0o755)).on("chmod", &shown)?
            }
        }
        Ok(())
    }

    /// Whether `target`, a first name the patterns left out, was restored
    /// under the name of a link to it (see [`Wanted::from`]).
    pub fn has_copy(&self, target: &[u8]) -> bool {
        self.copies.contains_key(target)
    }

    /// The metadata directories this restore makes on the way to the next
    /// selected paths are to get (manifest entries without xattrs, by
    /// path): their owner, mode and mtime, as if selected.
    pub fn imply(&mut self, implied: HashMap<Vec<u8>, Entry>) {
        self.implied = implied;
    }

    /// Finishes every directory still open, the root last.
    pub fn finish(mut self) -> Result<RestoreReport> {
        while !self.stack.is_empty() {
            self.leave_top()?;
        }
        tracing::debug!(
            "{}: {} inodes remembered for hard links",
            self.snapshot,
            self.created.len()
        );
        Ok(std::mem::take(&mut self.report))
    }

    /// Removes whatever stands at `name` in the top directory.
    fn clear(&self, name: &[u8], path: &[u8]) -> Result<()> {
        let parent = self.top()?.fd.as_fd();
        match rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => bail!("cannot stat {}: {e}", self.shown(path)),
            Ok(st) if file_type(&st) == FileType::Directory => {
                use super::remove::{remove_tree, Unremoved};
                let below = |p: &[u8]| {
                    let mut whole = path.to_vec();
                    if !p.is_empty() {
                        whole.push(b'/');
                        whole.extend_from_slice(p);
                    }
                    self.shown(&whole)
                };
                // Said when it held anything: rsync without `--force`
                // refuses to remove such a directory.
                let held = rustix::fs::openat(
                    parent,
                    os(name),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ok()
                .is_some_and(|fd| {
                    let mut buf = [std::mem::MaybeUninit::uninit(); 1024];
                    let mut it = rustix::fs::RawDir::new(fd, &mut buf);
                    while let Some(Ok(e)) = it.next() {
                        if !matches!(e.file_name().to_bytes(), b"." | b"..") {
                            return true;
                        }
                    }
                    false
                });
                if held {
                    eprintln!(
                        "byteback-restore: note: {}: the directory here, and what was in it, \
                         replaced by what the snapshot has at its name",
                        self.shown(path)
                    );
                }
                match remove_tree(parent, os(name)) {
                    Ok(()) => Ok(()),
                    Err(Unremoved::Mount(p)) => bail!(
                        "cannot replace the directory {} by what the snapshot has there: {} is a \
                         mount point (another filesystem, not the restore's to empty); nothing \
                         was removed. Unmount it, or restore elsewhere",
                        self.shown(path),
                        below(&p)
                    ),
                    Err(Unremoved::Io(p, e)) => bail!("cannot remove {}: {e}", below(&p)),
                }
            }
            Ok(_) => rustix::fs::unlinkat(parent, os(name), AtFlags::empty())
                .on("cannot remove", self.shown(path)),
        }
    }

    /// Restores one selected entry (its parents are made as needed); `after`
    /// holds the entries the restore takes next, whose content may be asked
    /// for meanwhile (see [`ReadAhead`]).
    pub fn restore(
        &mut self,
        conn: &mut Connection,
        w: Wanted,
        after: &VecDeque<Wanted>,
    ) -> Result<()> {
        let unverified = self.opts.unverified;
        self.ahead
            .ask(conn, &self.snapshot, unverified, &w, after)?;
        let done = self.restore_one(conn, w);
        self.ahead.next();
        done
    }

    /// Restores one entry (see [`Self::restore`]).
    fn restore_one(&mut self, conn: &mut Connection, w: Wanted) -> Result<()> {
        let Wanted { e, from, linked } = w;
        let path = e.entry.path.clone();
        self.enter(&path)?;
        if self.opts.verbose {
            tracing::info!(target: byteback_protocol::term::FILE_TARGET, "{}", self.shown(&path));
        }
        crate::progress::RESTORE.current(std::path::Path::new(os(&path)));
        match &e.entry.kind {
            Kind::Dir => {
                // One that was there keeps its old owner and mode
                // registered until its own are set: a signal before that
                // puts them back, after it none does.
                let (fd, was) = self.open_dir(&path)?;
                let id = match was {
                    Leave::Restore { id, .. } => id,
                    _ => None,
                };
                // On the stack with what it had first: should its entry be
                // refused, it is still finished as it was.
                self.stack.push(OpenDir {
                    path,
                    fd,
                    leave: was,
                    cost: 0,
                });
                self.hold_top(e.entry, id)?;
                self.report.restored += 1;
            }
            Kind::File { size } => {
                let size = *size;
                let src = from.clone().unwrap_or_else(|| path.clone());
                let link_target = linked || from.is_some();
                self.restore_file(conn, &e, &src, size, link_target)?;
                // Later links to the same first name link to this copy, or,
                // when it failed verification, are reported damaged with it.
                if let Some(f) = from {
                    self.copies.insert(f, path);
                }
            }
            Kind::HardLink { target } => self.restore_link(&path, target)?,
            _ => {
                self.restore_special(&e.entry, linked || from.is_some())?;
                if let Some(f) = from {
                    self.copies.insert(f, path);
                }
            }
        }
        Ok(())
    }

    /// Writes a regular file from the server's data for `src` under a
    /// temporary name beside it, and puts it in place (replacing what was
    /// there) only once its content is verified and its metadata applied;
    /// one that fails verification is removed and reported damaged, and
    /// what was at its name stays.
    fn restore_file(
        &mut self,
        conn: &mut Connection,
        e: &ManifestEntry,
        src: &[u8],
        size: u64,
        link_target: bool,
    ) -> Result<()> {
        let path = &e.entry.path;
        let name = last_component(path);
        let parent = top_fd(&self.stack)?;
        // Removed by the signal thread should the restore be stopped
        // before it is placed or removed.
        let temp_id = next_temp_id();
        let _forget = Forget(temp_id);
        let (tmp, fd) = match super::interrupt::temp_file(parent, temp_id, || create_temp(parent)) {
            Ok(made) => made,
            // Its directory takes no new names (chattr +i): that file
            // alone is not restored; its data, asked for already, is
            // taken and thrown away.
            Err(Errno::PERM) => {
                return self.discard(conn, e, src, size, link_target);
            }
            Err(err) => return Err(err).on("cannot create a file beside", self.shown(path)),
        };
        let mut st = rustix::fs::fstat(&fd)?;
        let shown = self.shown(path);
        let hash = (!self.opts.unverified).then_some(&e.hash);
        let file = File::from(fd);
        let fetched = if needs_fetch(size, hash) {
            self.ahead
                .take(conn, &self.snapshot, src)
                .and_then(|()| super::data::fetch(conn, size, hash, file, &shown))
        } else {
            Ok((file, None)) // nothing to fetch
        };
        let remove_temp = |t: &CStr| rustix::fs::unlinkat(parent, t, AtFlags::empty());
        let remove = || remove_temp(&tmp);
        let file = match fetched {
            Err(err) => {
                let _ = remove();
                return Err(err);
            }
            Ok((_, Some(problem))) => {
                remove().on("cannot remove damaged", &shown)?;
                self.report
                    .damage(format!("{shown}: {problem}; not restored"));
                // Remembered only where a link may ask (memory grows with
                // the hard links restored, not with what a server damages).
                if link_target {
                    self.damaged.insert(path_key(path));
                }
                return Ok(());
            }
            Ok((file, None)) => file,
        };
        let swap = size > 0 && is_swap(&file, size);
        // One its directory's `chattr +C` made NOCOW needs no copy.
        let nocow = || {
            rustix::fs::ioctl_getflags(&file).is_ok_and(|f| f.contains(rustix::fs::IFlags::NOCOW))
        };
        let (tmp, file) = match swap && on_btrfs(&file) && !nocow() {
            true => match nocow_copy(parent, temp_id, &file, size) {
                Ok((nocow, copy)) => {
                    let _ = remove();
                    st = rustix::fs::fstat(&copy)?;
                    (nocow, copy)
                }
                Err(e) => {
                    self.report.warn(format!(
                        "{shown}: a swap file, but it could not be made NOCOW (chattr +C), \
                         which btrfs needs for swap: {e}"
                    ));
                    (tmp, file)
                }
            },
            false => (tmp, file),
        };
        let remove = || remove_temp(&tmp);
        if size > 0 && (self.opts.no_sparse || swap) {
            allocate_whole(&file, size, &shown, &mut self.report);
        }
        let born = birth_of(file.as_fd());
        let applied = apply::apply(Held::Open(file.as_fd()), &e.entry, &self.opts.rules, &shown)
            .map_err(crate::error::Error::from);
        let placed = applied.and_then(|w| {
            drop(file);
            self.put_in_place(&tmp, name, path).map(|()| w)
        });
        let w = match placed {
            Ok(w) => w,
            // What stands at its name may not be replaced (chattr +i or
            // +a on it or its directory): that file is not restored, the
            // rest of the tree is, as rsync goes on past it.
            Err(crate::error::Error::Io { cause, .. })
                if cause.raw_os_error() == Some(libc::EPERM) =>
            {
                let _ = remove();
                self.report.warn(format!(
                    "{shown}: cannot put in place: {cause} (immutable or append-only? see \
                     lsattr); not restored"
                ));
                // Later names of it are not made either (they would link
                // to what stands there).
                if link_target {
                    self.unplaced.insert(path_key(path));
                }
                return Ok(());
            }
            Err(err) => {
                let _ = remove();
                return Err(err);
            }
        };
        w.into_iter().for_each(|w| self.report.warn(w));
        if link_target {
            self.created
                .insert(path_key(path), ((st.st_dev, st.st_ino), born));
        }
        self.report.restored += 1;
        if self.opts.unverified {
            self.report.unverified += 1;
        }
        Ok(())
    }

    /// Renames `tmp` over `name` in the directory being restored; a
    /// directory standing there is removed first.
    fn put_in_place(&self, tmp: &CStr, name: &[u8], path: &[u8]) -> Result<()> {
        let parent = self.top()?.fd.as_fd();
        match rustix::fs::renameat(parent, tmp, parent, os(name)) {
            Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => {
                self.clear(name, path)?;
                rustix::fs::renameat(parent, tmp, parent, os(name))
            }
            r => r,
        }
        .on("cannot put in place", self.shown(path))
    }

    /// Links `path` to `target`, which must be a regular file this run wrote.
    fn restore_link(&mut self, path: &[u8], target: &[u8]) -> Result<()> {
        let src = self
            .copies
            .get(target)
            .cloned()
            .unwrap_or_else(|| target.to_vec());
        let shown = self.shown(path);
        if self.unplaced.contains(&path_key(&src)) {
            self.report.warn(format!(
                "{shown}: not restored: its first name {} could not be put in place",
                display_path(target)
            ));
            return Ok(());
        }
        if self.damaged.contains(&path_key(&src)) {
            self.report.damage(format!(
                "{shown}: not restored: its first name {} failed verification",
                display_path(target)
            ));
            return Ok(());
        }
        let root = self.stack[0].fd.as_fd();
        recreate_fault(root, &src);
        // Not restored in this run (or not as an object a link may name):
        // the server's manifest is at fault.
        let Some((inode, born)) = self.created.get(&path_key(&src)).cloned() else {
            bail!(
                "the server's manifest links {} to {}, which is not a file, symlink or special \
                 file restored in this run; refusing",
                display_path(path),
                display_path(target)
            );
        };
        // What stands there now is not what this run wrote (a local user
        // renamed another file there, or took it away, in a directory of
        // theirs): that link alone is not made.
        let replaced = |how: String| {
            format!(
                "{shown}: not restored: its first name {} {how} during the restore",
                display_path(target)
            )
        };
        let tfd = match path_beneath(root, &src) {
            Ok(fd) => fd,
            // Not the server's doing: a directory this restore finished
            // without `x` for a non-root restore. That link alone is lost.
            Err(e @ Errno::ACCESS) => {
                self.report.damage(format!(
                    "{shown}: not restored: its first name {} cannot be reached ({e})",
                    display_path(target)
                ));
                return Ok(());
            }
            Err(e) => {
                self.report
                    .warn(replaced(format!("could not be opened ({e})")));
                return Ok(());
            }
        };
        let st = rustix::fs::fstat(&tfd)?;
        // Its inode number, not the file: removed and made again since
        // (by a local user where the restore writes into their tree).
        if (st.st_dev, st.st_ino) != inode
            || file_type(&st) == FileType::Directory
            || birth_of(tfd.as_fd()) != born
        {
            self.report
                .warn(replaced("was replaced by another file".into()));
            return Ok(());
        }
        // Linked under a temporary name, then renamed over what stands at
        // its name, which stays should the link be refused.
        let parent = top_fd(&self.stack)?;
        let proc = format!("/proc/self/fd/{}", tfd.as_raw_fd());
        let temp_id = next_temp_id();
        let _forget = Forget(temp_id);
        let linked = make_temp(parent, temp_id, |tmp| {
            match rustix::fs::linkat(CWD, proc.as_str(), parent, tmp, AtFlags::SYMLINK_FOLLOW) {
                // No /proc: root may link an fd directly.
                Err(Errno::NOENT) => rustix::fs::linkat(&tfd, "", parent, tmp, AtFlags::EMPTY_PATH),
                r => r,
            }
        });
        let tmp = match linked {
            Ok(tmp) => tmp,
            // The target tree's doing, that link alone: its first name at
            // its filesystem's most links, a mount point between them, a
            // directory that refuses new names (chattr +i).
            Err(e @ (Errno::MLINK | Errno::XDEV | Errno::PERM)) => {
                self.report.warn(format!(
                    "{shown}: cannot link it to its first name {}: {e}; not restored",
                    display_path(target)
                ));
                return Ok(());
            }
            Err(e) => bail!("cannot link {shown}: {e}"),
        };
        if self.place_temp(&tmp, path, &shown)? {
            self.report.restored += 1;
        }
        Ok(())
    }

    /// Puts the object at temporary name `tmp` in the top directory in
    /// place at `path` (see [`Self::put_in_place`]): true once it is there;
    /// false when what stands there may not be replaced (`chattr +i` or
    /// `+a`: said, what stands there stays, `tmp` goes).
    fn place_temp(&mut self, tmp: &CStr, path: &[u8], shown: &str) -> Result<bool> {
        let parent = top_fd(&self.stack)?;
        let remove = || rustix::fs::unlinkat(parent, tmp, AtFlags::empty());
        match self.put_in_place(tmp, last_component(path), path) {
            Ok(()) => {
                // A rename between two names of one inode does nothing
                // (an existing hard link restored again): the temporary
                // name would stay.
                let _ = remove();
                Ok(true)
            }
            Err(crate::error::Error::Io { cause, .. })
                if cause.raw_os_error() == Some(libc::EPERM) =>
            {
                let _ = remove();
                self.report.warn(format!(
                    "{shown}: cannot put in place: {cause} (immutable or append-only? see \
                     lsattr); not restored"
                ));
                Ok(false)
            }
            Err(e) => {
                let _ = remove();
                Err(e)
            }
        }
    }

    /// A file that cannot be created where it belongs (its directory
    /// refuses new names): its data, which the read-ahead may have asked
    /// for already, is fetched into an unnamed file in the restore's root
    /// and thrown away, and the file is said not restored; its later names
    /// (`link_target`) are not made either.
    fn discard(
        &mut self,
        conn: &mut Connection,
        e: &ManifestEntry,
        src: &[u8],
        size: u64,
        link_target: bool,
    ) -> Result<()> {
        let path = &e.entry.path;
        let shown = self.shown(path);
        let hash = (!self.opts.unverified).then_some(&e.hash);
        if needs_fetch(size, hash) {
            let root = self.stack[0].fd.as_fd();
            let sink = rustix::fs::openat(
                root,
                c".",
                OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .on("cannot create an unnamed file in", self.shown(b""))?;
            self.ahead.take(conn, &self.snapshot, src)?;
            super::data::fetch(conn, size, hash, File::from(sink), &shown)?;
        }
        self.report.warn(format!(
            "{shown}: cannot create it: {} (its directory immutable? see lsattr); not restored",
            std::io::Error::from(Errno::PERM)
        ));
        if link_target {
            self.unplaced.insert(path_key(path));
        }
        Ok(())
    }

    /// Makes a symlink, fifo, socket or device node, then applies its
    /// metadata; `link_target`: a later hard link names it (its inode is
    /// remembered for the link).
    fn restore_special(&mut self, e: &Entry, link_target: bool) -> Result<()> {
        let path = &e.path;
        let shown = self.shown(path);
        let is_dev = matches!(e.kind, Kind::CharDev { .. } | Kind::BlockDev { .. });
        if is_dev && (!self.opts.rules.as_root || self.opts.no_devices) {
            let why = if self.opts.no_devices {
                "--no-devices"
            } else {
                "not root"
            };
            self.report
                .warn(format!("{shown}: device not recreated ({why})"));
            // Its other names are not made either (said as such).
            if link_target {
                self.unplaced.insert(path_key(path));
            }
            return Ok(());
        }
        // Made under a temporary name with its metadata, then renamed over
        // what stands at its name, which stays should that be refused.
        let parent = top_fd(&self.stack)?;
        let private = Mode::RUSR | Mode::WUSR;
        let ft = match &e.kind {
            Kind::Symlink { .. } => FileType::Symlink,
            Kind::Fifo => FileType::Fifo,
            Kind::Socket => FileType::Socket,
            Kind::CharDev { .. } => FileType::CharacterDevice,
            Kind::BlockDev { .. } => FileType::BlockDevice,
            Kind::File { .. } | Kind::Dir | Kind::HardLink { .. } => {
                bail!("{shown}: not a special file")
            }
        };
        let temp_id = next_temp_id();
        let _forget = Forget(temp_id);
        let made = make_temp(parent, temp_id, |tmp| match &e.kind {
            Kind::Symlink { target } => rustix::fs::symlinkat(os(target), parent, tmp),
            Kind::CharDev { rdev } | Kind::BlockDev { rdev } => {
                rustix::fs::mknodat(parent, tmp, ft, private, *rdev)
            }
            _ => rustix::fs::mknodat(parent, tmp, ft, private, 0),
        });
        let tmp = match made {
            Ok(tmp) => tmp,
            // Refused by the target tree or the machine, that entry alone:
            // a device node where root may not make one (a container
            // without CAP_MKNOD, a nodev mount), a directory that takes no
            // new names (chattr +i).
            Err(e @ (Errno::PERM | Errno::ACCESS)) => {
                self.report
                    .warn(format!("{shown}: cannot create: {e}; not restored"));
                if link_target {
                    self.unplaced.insert(path_key(path));
                }
                return Ok(());
            }
            Err(e) => bail!("cannot create {shown}: {e}"),
        };
        let applied = (|| -> Result<(rustix::fs::Stat, Birth, Vec<String>)> {
            let fd = apply::open_path(parent, tmp.as_bytes()).on("cannot open", &shown)?;
            let st = rustix::fs::fstat(&fd)?;
            let born = birth_of(fd.as_fd());
            if file_type(&st) != ft || st.st_nlink != 1 {
                bail!("{shown} changed under the restore");
            }
            let held = if ft == FileType::Symlink {
                Held::Symlink {
                    fd: fd.as_fd(),
                    parent,
                    name: tmp.as_bytes(),
                }
            } else {
                Held::Path(fd.as_fd())
            };
            Ok((st, born, apply::apply(held, e, &self.opts.rules, &shown)?))
        })();
        let (st, born, w) = match applied {
            Ok(done) => done,
            Err(err) => {
                let _ = rustix::fs::unlinkat(parent, &tmp, AtFlags::empty());
                return Err(err);
            }
        };
        if !self.place_temp(&tmp, path, &shown)? {
            if link_target {
                self.unplaced.insert(path_key(path));
            }
            return Ok(());
        }
        w.into_iter().for_each(|w| self.report.warn(w));
        if link_target {
            self.created
                .insert(path_key(path), ((st.st_dev, st.st_ino), born));
        }
        self.report.restored += 1;
        Ok(())
    }
}

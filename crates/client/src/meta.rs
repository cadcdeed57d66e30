//! Reading a filesystem object's metadata into a protocol Entry, and recreating objects with their metadata on restore.
//!
//! Everything here works on the object itself and never follows a symlink in
//! the last path component. Reading (for backup) is relative to a held
//! directory fd, so no path a user could change is resolved; restoring works
//! by path inside the restore target. POSIX ACLs travel as the `system.posix_acl_access`
//! and `system.posix_acl_default` extended attributes, exactly as the kernel
//! stores them.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use byteback_protocol::{Entry, Kind};
use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, Statx, StatxFlags, Timespec, Timestamps, XattrFlags, CWD,
};
use rustix::io::Errno;

/// Name of the xattr holding a POSIX access ACL.
const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
/// Name of the xattr holding a POSIX default ACL (directories only).
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// First buffer size tried for xattr lists and values; most fit.
const XATTR_FIRST_BUF: usize = 256;
/// How often a list or value that keeps growing is re-read before giving up.
const XATTR_RETRIES: usize = 8;

/// Whether this process runs with euid 0.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Where to read an object from, without resolving any path a user could
/// change: a name in a directory held open, or an fd of the object itself.
#[derive(Debug, Clone, Copy)]
pub enum At<'a> {
    /// The entry `name` (a single component, never followed even if it is a
    /// symlink) of the directory open as `dir`.
    Child {
        /// The directory, open (any mode, `O_PATH` included).
        dir: BorrowedFd<'a>,
        /// One component, without `/`.
        name: &'a CStr,
    },
    /// The object `fd` refers to (any mode, `O_PATH` included). Meant for
    /// objects opened by a trusted path, such as a source root; the object
    /// should not be a symlink (its xattrs would be read through it).
    Fd(BorrowedFd<'a>),
}

impl At<'_> {
    /// A path that reaches the object from the held fd, through procfs:
    /// `/proc/self/fd/<dir>/<name>`, whose last component must not be
    /// followed, or `/proc/self/fd/<fd>`, whose last component (the fd's magic
    /// link) must be. The bool says whether to follow.
    fn proc_path(&self) -> (CString, bool) {
        let (fd, name, follow) = match *self {
            At::Child { dir, name } => (dir.as_raw_fd(), Some(name), false),
            At::Fd(fd) => (fd.as_raw_fd(), None, true),
        };
        let mut p = format!("/proc/self/fd/{fd}").into_bytes();
        if let Some(name) = name {
            p.push(b'/');
            p.extend_from_slice(name.to_bytes());
        }
        // Neither part can hold a NUL: a number, and the bytes of a CStr.
        let p = CString::new(p).unwrap_or_default();
        (p, follow)
    }
}

/// `statx` of the object at `at`, never following a symlink named by
/// [`At::Child`] and never triggering an automount there.
pub fn stat_at(at: At<'_>) -> io::Result<Statx> {
    let r = match at {
        At::Child { dir, name } => rustix::fs::statx(
            dir,
            name,
            AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
            StatxFlags::BASIC_STATS,
        ),
        At::Fd(fd) => rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS),
    };
    r.map_err(io::Error::from)
}

/// `(st_dev, st_ino)` of a statx result, `st_dev` encoded as `stat` gives it.
pub fn dev_ino(st: &Statx) -> (u64, u64) {
    (
        rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
        st.stx_ino,
    )
}

/// Whether `/proc/self/fd` is a mounted procfs, which [`read_entry`] needs
/// to read extended attributes by file descriptor.
pub fn proc_fd_available() -> bool {
    rustix::fs::statfs("/proc/self/fd").is_ok_and(|s| s.f_type == rustix::fs::PROC_SUPER_MAGIC)
}

/// Builds the Entry for the object at `at`, with relative wire path `rel`,
/// from its `statx` result `st` (see [`stat_at`]).
///
/// Nothing is resolved by a path a user could change: a symlink's target is
/// read with `readlinkat` on the held fd, and extended attributes through
/// `/proc/self/fd/<fd>[/<name>]` (procfs must be mounted), which starts at the
/// held fd and, for [`At::Child`], does not follow `name`. If the object was
/// replaced since `st` was taken, the type comes from `st` and the rest may
/// come from the new object at the same place; callers that care compare
/// `(dev, ino)` later.
///
/// Regular files become [`Kind::File`], symlinks carry their raw target,
/// devices their `st_rdev`. `mode` is `st_mode & 0o7777`. Every extended
/// attribute is read (including the POSIX ACL ones), sorted by name; a
/// filesystem without xattr support yields none, and an attribute that
/// vanishes between listing and reading is skipped. Hard links are not
/// detected here. Error messages do not name the object (the caller knows
/// its path); an object that vanished gives `NotFound`.
pub fn read_entry(at: At<'_>, rel: Vec<u8>, st: &Statx) -> io::Result<Entry> {
    let mode = u32::from(st.stx_mode);
    let kind = match FileType::from_raw_mode(mode) {
        FileType::RegularFile => Kind::File { size: st.stx_size },
        FileType::Directory => Kind::Dir,
        FileType::Symlink => {
            let target = match at {
                At::Child { dir, name } => rustix::fs::readlinkat(dir, name, Vec::new()),
                At::Fd(fd) => rustix::fs::readlinkat(fd, c"", Vec::new()),
            }
            .map_err(|e| with_what(e, "reading the symlink"))?;
            Kind::Symlink {
                target: target.into_bytes(),
            }
        }
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => Kind::Socket,
        FileType::CharacterDevice => Kind::CharDev {
            rdev: rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor),
        },
        FileType::BlockDevice => Kind::BlockDev {
            rdev: rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor),
        },
        FileType::Unknown => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown file type (mode {mode:o})"),
            ))
        }
    };
    let mtime_nsec = Some(st.stx_mtime.tv_nsec)
        .filter(|n| *n < 1_000_000_000)
        .unwrap_or(0);
    let (proc_path, follow) = at.proc_path();
    Ok(Entry {
        path: rel,
        kind,
        mode: mode & 0o7777,
        uid: st.stx_uid,
        gid: st.stx_gid,
        mtime_sec: st.stx_mtime.tv_sec,
        mtime_nsec,
        xattrs: read_xattrs(proc_path.as_c_str(), follow)?,
    })
}

/// Reads a variable-sized kernel answer: tries a small buffer, and on
/// `ERANGE` asks `query` for the size and retries (the size may change between
/// calls, hence the loop).
fn read_sized(
    mut read: impl FnMut(&mut [u8]) -> Result<usize, Errno>,
    mut query: impl FnMut() -> Result<usize, Errno>,
) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; XATTR_FIRST_BUF];
    for _ in 0..XATTR_RETRIES {
        // `buf` is never empty: an empty buffer would turn the call into a size query.
        match read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => {
                let need = query()?;
                let len = need.max(buf.len().saturating_mul(2));
                buf.resize(len, 0);
            }
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

/// All xattrs of the object at `path`, sorted by name; the last component of
/// `path` is followed only if `follow`.
fn read_xattrs<P: rustix::path::Arg + Copy>(
    path: P,
    follow: bool,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let listed = if follow {
        read_sized(
            |buf| rustix::fs::listxattr(path, buf),
            || rustix::fs::listxattr_query(path),
        )
    } else {
        read_sized(
            |buf| rustix::fs::llistxattr(path, buf),
            || rustix::fs::llistxattr_query(path),
        )
    };
    let list = match listed {
        Ok(list) => list,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(with_what(e, "listing xattrs")),
    };
    let mut out = Vec::new();
    for name in list.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let value = if follow {
            read_sized(
                |buf| rustix::fs::getxattr(path, name, buf),
                || rustix::fs::getxattr_query(path, name),
            )
        } else {
            read_sized(
                |buf| rustix::fs::lgetxattr(path, name, buf),
                || rustix::fs::lgetxattr_query(path, name),
            )
        };
        match value {
            Ok(value) => out.push((name.to_vec(), value)),
            // Vanished since the listing, or listed but not readable as such.
            Err(Errno::NODATA) | Err(Errno::NOTSUP) => {}
            Err(e) => {
                let what = format!("reading xattr {}", name.escape_ascii());
                return Err(with_what(e, &what));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// An io::Error for `e` that names the operation.
fn with_what(e: Errno, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// An io::Error for `e` that names the path and the operation.
fn with_path(e: Errno, abs: &Path, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{}: {what}: {e}", abs.display()))
}

/// Creates a non-regular, non-directory object at `abs` for restore.
///
/// Symlinks get the raw target (never followed); fifos and sockets are made
/// with `mknod`; character and block devices only when `as_root`, otherwise
/// nothing is created and `Ok(false)` is returned. Returns `Ok(true)` when the
/// object was created. Objects are created with mode 0600 (devices must not be
/// briefly accessible to others); [`apply_metadata`] sets the real mode.
/// [`Kind::File`], [`Kind::Dir`] and [`Kind::HardLink`] are refused with
/// `InvalidInput`. An existing object at `abs` gives `AlreadyExists`.
pub fn create_special(abs: &Path, entry: &Entry, as_root: bool) -> io::Result<bool> {
    let private = Mode::RUSR | Mode::WUSR;
    let node = |ft: FileType, dev: u64| {
        rustix::fs::mknodat(CWD, abs, ft, private, dev).map_err(|e| with_path(e, abs, "mknod"))
    };
    match &entry.kind {
        Kind::Symlink { target } => {
            if target.is_empty() || target.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: symlink target empty or holds NUL", abs.display()),
                ));
            }
            rustix::fs::symlinkat(target.as_slice(), CWD, abs)
                .map_err(|e| with_path(e, abs, "symlink"))?;
        }
        Kind::Fifo => node(FileType::Fifo, 0)?,
        Kind::Socket => node(FileType::Socket, 0)?,
        Kind::CharDev { rdev } | Kind::BlockDev { rdev } => {
            if !as_root {
                return Ok(false);
            }
            let ft = if matches!(entry.kind, Kind::CharDev { .. }) {
                FileType::CharacterDevice
            } else {
                FileType::BlockDevice
            };
            node(ft, *rdev)?;
        }
        Kind::File { .. } | Kind::Dir | Kind::HardLink { .. } => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: create_special called for a '{}' entry",
                    abs.display(),
                    entry.kind.type_char()
                ),
            ))
        }
    }
    Ok(true)
}

/// Errors after which applying metadata makes no sense: the object or the
/// filesystem is gone, broken or full. Anything else is a warning.
fn is_fatal(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT | Errno::NOTDIR | Errno::IO | Errno::NOSPC | Errno::DQUOT | Errno::ROFS
    )
}

/// Applies metadata of `entry` to the object at `abs` (which already has its content), without following symlinks.
///
/// In order:
/// 1. owner and group with `lchown` when `as_root` (skipped silently otherwise);
/// 2. xattrs, set with `lsetxattr`. None are removed, except a POSIX ACL the
///    entry does not have: a freshly created object inherits an access ACL
///    (and a directory a default ACL) from a parent's default ACL, which the
///    source may not have had. When not root, `security.*` and `trusted.*`
///    are skipped silently; on symlinks `user.*` and the ACL names, which the
///    kernel never allows there, are skipped silently;
/// 3. the mode, after chown (which clears setuid/setgid) and after the ACL
///    xattr (setting an ACL rewrites the group bits; the source ACL's mask
///    always equals the source mode's group bits, so chmod last gives exactly
///    the source's ACL and mode); not for symlinks;
/// 4. the mtime (atime left alone), last.
///
/// Returns human-readable warnings for metadata that could not be applied
/// (ownership or an xattr refused, setgid dropped). Errors are reserved for a
/// missing object, I/O errors or a full filesystem, and chmod/utimes failures.
pub fn apply_metadata(abs: &Path, entry: &Entry, as_root: bool) -> io::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let shown = entry.path.escape_ascii();
    let is_link = matches!(entry.kind, Kind::Symlink { .. });
    let is_dir = matches!(entry.kind, Kind::Dir);

    // 1. Ownership.
    if as_root {
        // u32::MAX means "leave unchanged" to the kernel; it cannot be set.
        let uid = (entry.uid != u32::MAX).then(|| rustix::fs::Uid::from_raw(entry.uid));
        let gid = (entry.gid != u32::MAX).then(|| rustix::fs::Gid::from_raw(entry.gid));
        if uid.is_none() || gid.is_none() {
            warnings.push(format!(
                "{shown}: owner {}:{} cannot be set",
                entry.uid, entry.gid
            ));
        }
        match rustix::fs::chownat(CWD, abs, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(()) => {}
            Err(e) if is_fatal(e) => return Err(with_path(e, abs, "lchown")),
            Err(e) => warnings.push(format!(
                "{shown}: cannot set owner {}:{}: {}",
                entry.uid,
                entry.gid,
                io::Error::from(e)
            )),
        }
    }

    // 2. Extended attributes, POSIX ACLs included.
    if !is_link {
        let stale: &[&[u8]] = if is_dir {
            &[ACL_ACCESS, ACL_DEFAULT]
        } else {
            &[ACL_ACCESS]
        };
        for name in stale {
            if entry.xattrs.iter().any(|(n, _)| n == name) {
                continue;
            }
            match rustix::fs::lremovexattr(abs, *name) {
                Ok(()) | Err(Errno::NODATA) | Err(Errno::NOTSUP) => {}
                Err(e) if is_fatal(e) => return Err(with_path(e, abs, "removing ACL")),
                Err(e) => warnings.push(format!(
                    "{shown}: cannot remove inherited {}: {}",
                    name.escape_ascii(),
                    io::Error::from(e)
                )),
            }
        }
    }
    for (name, value) in &entry.xattrs {
        let privileged = name.starts_with(b"security.") || name.starts_with(b"trusted.");
        if !as_root && privileged {
            continue;
        }
        if is_link && (name.starts_with(b"user.") || name.starts_with(b"system.posix_acl_")) {
            continue;
        }
        match rustix::fs::lsetxattr(abs, name.as_slice(), value, XattrFlags::empty()) {
            Ok(()) => {}
            Err(e) if is_fatal(e) => {
                let what = format!("setting xattr {}", name.escape_ascii());
                return Err(with_path(e, abs, &what));
            }
            Err(e) => warnings.push(format!(
                "{shown}: cannot set xattr {}: {}",
                name.escape_ascii(),
                io::Error::from(e)
            )),
        }
    }

    // 3. Mode (symlinks have none of their own).
    if !is_link {
        let mode = entry.mode & 0o7777;
        chmod_nofollow(abs, mode)?;
        if !as_root && mode & 0o2000 != 0 {
            // The kernel silently drops setgid for a group the caller is not in.
            let now = std::fs::symlink_metadata(abs)?.mode() & 0o7777;
            if now != mode {
                warnings.push(format!(
                    "{shown}: mode {mode:04o} applied as {now:04o} (not a member of group {})",
                    entry.gid
                ));
            }
        }
    }

    // 4. Modification time, last (nothing above changes mtime, but keep the
    // order obvious).
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: entry.mtime_sec,
            tv_nsec: entry.mtime_nsec.into(),
        },
    };
    rustix::fs::utimensat(CWD, abs, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| with_path(e, abs, "setting mtime"))?;
    Ok(warnings)
}

/// `chmod` that refuses to follow a symlink at `abs`: Linux's `fchmodat`
/// has no working `AT_SYMLINK_NOFOLLOW` before 6.6, so the object is opened
/// with `O_PATH | O_NOFOLLOW` (no side effects, even for devices and fifos)
/// and changed through its `/proc/self/fd` name, as glibc does.
fn chmod_nofollow(abs: &Path, mode: u32) -> io::Result<()> {
    let mode = Mode::from_raw_mode(mode);
    let fd = rustix::fs::open(
        abs,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| with_path(e, abs, "opening for chmod"))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| with_path(e, abs, "fstat"))?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: is a symlink, not changing its mode", abs.display()),
        ));
    }
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    match rustix::fs::chmod(proc_path.as_str(), mode) {
        Ok(()) => Ok(()),
        // No /proc: fall back to the path, which we just saw is not a symlink.
        Err(Errno::NOENT) => rustix::fs::chmod(abs, mode).map_err(|e| with_path(e, abs, "chmod")),
        Err(e) => Err(with_path(e, abs, "chmod")),
    }
}

/// Size of the blocks [`SparseWriter`] checks for zeros.
const SPARSE_BLOCK: usize = 4096;

/// Writes file content keeping holes.
///
/// A 4096-byte block (aligned to its file offset) that is all zeros is
/// skipped with a seek instead of written; [`SparseWriter::finish`] sets the
/// final length so trailing holes exist. Content is written from offset 0: the
/// file is truncated to 0 first, so skipped blocks read as zeros even if the
/// file held data before.
pub struct SparseWriter {
    file: File,
    /// Bytes of the current, incomplete block (always fewer than a block).
    partial: Vec<u8>,
    /// File offset where `partial` starts: the number of bytes handled so far
    /// excluding `partial`; always block-aligned.
    offset: u64,
    /// The kernel's file position, as far as we moved it.
    file_pos: u64,
    /// Whether the file has been truncated to 0 yet.
    started: bool,
}

impl SparseWriter {
    /// Wraps `file`, which will hold exactly the bytes written.
    pub fn new(file: File) -> Self {
        SparseWriter {
            file,
            partial: Vec::with_capacity(SPARSE_BLOCK),
            offset: 0,
            file_pos: 0,
            started: false,
        }
    }

    /// Appends `data` (any length, any alignment).
    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.start()?;
        if !self.partial.is_empty() {
            let take = (SPARSE_BLOCK - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < SPARSE_BLOCK {
                return Ok(());
            }
            let block = std::mem::take(&mut self.partial);
            let res = self.write_blocks(&block);
            self.partial = block;
            self.partial.clear();
            res?;
        }
        let whole = data.len() - data.len() % SPARSE_BLOCK;
        self.write_blocks(&data[..whole])?;
        self.partial.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Writes the last partial block, sets the final length and returns the file,
    /// positioned at its end.
    pub fn finish(mut self) -> io::Result<File> {
        self.start()?;
        let tail = std::mem::take(&mut self.partial);
        if !is_zero(&tail) {
            self.write_at(self.offset, &tail)?;
        }
        let len = self.offset + tail.len() as u64;
        self.file.set_len(len)?;
        if self.file_pos != len {
            self.file.seek(SeekFrom::Start(len))?;
        }
        Ok(self.file)
    }

    /// Truncates the file once, before anything is written.
    fn start(&mut self) -> io::Result<()> {
        if !self.started {
            self.file.set_len(0)?;
            self.file.seek(SeekFrom::Start(0))?;
            self.started = true;
        }
        Ok(())
    }

    /// Writes whole blocks starting at `self.offset`, skipping the zero ones
    /// and writing each run of non-zero blocks in one call.
    fn write_blocks(&mut self, blocks: &[u8]) -> io::Result<()> {
        debug_assert_eq!(blocks.len() % SPARSE_BLOCK, 0);
        let mut i = 0;
        while i < blocks.len() {
            while i < blocks.len() && is_zero(&blocks[i..i + SPARSE_BLOCK]) {
                i += SPARSE_BLOCK;
            }
            let run = i;
            while i < blocks.len() && !is_zero(&blocks[i..i + SPARSE_BLOCK]) {
                i += SPARSE_BLOCK;
            }
            if run < i {
                self.write_at(self.offset + run as u64, &blocks[run..i])?;
            }
        }
        self.offset += blocks.len() as u64;
        Ok(())
    }

    /// Writes `data` at file offset `at`, seeking only when needed.
    fn write_at(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        if self.file_pos != at {
            self.file.seek(SeekFrom::Start(at))?;
        }
        self.file.write_all(data)?;
        self.file_pos = at + data.len() as u64;
        Ok(())
    }
}

/// Whether `data` is all zero bytes (written to vectorise well).
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let acc = words.by_ref().fold(0u128, |acc, w| {
        let mut b = [0u8; 16];
        b.copy_from_slice(w);
        acc | u128::from_ne_bytes(b)
    });
    acc == 0 && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::process::Command;

    /// Skips (returns true) when not root, or panics under CI.
    fn skip_unless_root(test: &str) -> bool {
        if is_root() {
            return false;
        }
        if std::env::var_os("CI").is_some() {
            panic!("{test} needs root and CI is set");
        }
        eprintln!("SKIPPED {test}: not root");
        true
    }

    fn run(cmd: &str, args: &[&OsStr]) {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn set_mtime(p: &Path, sec: i64, nsec: u32) {
        let ts = Timestamps {
            last_access: Timespec {
                tv_sec: sec,
                tv_nsec: nsec.into(),
            },
            last_modification: Timespec {
                tv_sec: sec,
                tv_nsec: nsec.into(),
            },
        };
        rustix::fs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    fn entry(kind: Kind) -> Entry {
        Entry {
            path: b"x".to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 1_600_000_000,
            mtime_nsec: 5,
            xattrs: Vec::new(),
        }
    }

    /// Pre-order walk, names sorted, `rel` empty for the root.
    fn walk(root: &Path, rel: &[u8], out: &mut Vec<(Vec<u8>, PathBuf, std::fs::Metadata)>) {
        let abs = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(rel))
        };
        let md = std::fs::symlink_metadata(&abs).unwrap();
        let is_dir = md.is_dir();
        out.push((rel.to_vec(), abs.clone(), md));
        if is_dir {
            let mut names: Vec<Vec<u8>> = std::fs::read_dir(&abs)
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            names.sort();
            for name in names {
                let mut child = rel.to_vec();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(&name);
                walk(root, &child, out);
            }
        }
    }

    /// read_entry of `abs` through its parent directory's fd.
    fn entry_at_path(abs: &Path, rel: Vec<u8>) -> Entry {
        let parent = abs.parent().unwrap();
        let dir = rustix::fs::open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let name = CString::new(abs.file_name().unwrap().as_bytes()).unwrap();
        let at = At::Child {
            dir: dir.as_fd(),
            name: &name,
        };
        let st = stat_at(at).unwrap();
        read_entry(at, rel, &st).unwrap()
    }

    fn copy_sparse(from: &Path, to: &Path) {
        let mut src = File::open(from).unwrap();
        let mut w = SparseWriter::new(File::create(to).unwrap());
        let mut buf = vec![0u8; 10_007]; // odd size: unaligned chunks
        loop {
            let n = src.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn meta_roundtrip_matches_rsync() {
        if skip_unless_root("meta_roundtrip_matches_rsync") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let dst = t.path().join("dst");
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();

        // Setuid file with user xattrs and an access ACL.
        let suid = src.join("suid");
        std::fs::write(&suid, b"#!/bin/sh\necho hi\n".repeat(100)).unwrap();
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        rustix::fs::lsetxattr(&suid, "user.zeta", b"last", XattrFlags::empty()).unwrap();
        rustix::fs::lsetxattr(&suid, "user.alpha", b"\x00bin\xff", XattrFlags::empty()).unwrap();
        rustix::fs::lsetxattr(&suid, "trusted.t", b"root only", XattrFlags::empty()).unwrap();
        run(
            "setfacl",
            &[
                "-m".as_ref(),
                "u:1234:rwx,g:5678:r-x".as_ref(),
                suid.as_os_str(),
            ],
        );

        // Directory with a default ACL; children inherit it, one has it removed.
        let dacl = src.join("dacl");
        std::fs::create_dir(&dacl).unwrap();
        run(
            "setfacl",
            &[
                "-d".as_ref(),
                "-m".as_ref(),
                "u:1234:rwx,g:5678:r-x".as_ref(),
                dacl.as_os_str(),
            ],
        );
        std::fs::write(dacl.join("inherits"), b"a").unwrap();
        std::fs::write(dacl.join("plain"), b"b").unwrap();
        run("setfacl", &["-b".as_ref(), dacl.join("plain").as_os_str()]);
        std::fs::create_dir(dacl.join("subdir")).unwrap();
        std::fs::set_permissions(dacl.join("subdir"), std::fs::Permissions::from_mode(0o3750))
            .unwrap();

        // Dangling symlink with a trusted xattr (allowed on symlinks, unlike user.*).
        let link = src.join("dangling");
        std::os::unix::fs::symlink(OsStr::from_bytes(b"no/such\xc3\x28target"), &link).unwrap();
        rustix::fs::lsetxattr(&link, "trusted.link", b"v", XattrFlags::empty()).unwrap();

        // Specials.
        let rw = Mode::from_raw_mode(0o640);
        rustix::fs::mknodat(CWD, src.join("fifo"), FileType::Fifo, rw, 0).unwrap();
        rustix::fs::mknodat(CWD, src.join("sock"), FileType::Socket, rw, 0).unwrap();
        let null = src.join("null");
        let dev = rustix::fs::makedev(1, 3);
        rustix::fs::mknodat(CWD, &null, FileType::CharacterDevice, rw, dev).unwrap();
        let blk = src.join("blk");
        let bdev = rustix::fs::makedev(7, 200);
        rustix::fs::mknodat(CWD, &blk, FileType::BlockDevice, rw, bdev).unwrap();

        // Invalid UTF-8 name with a newline.
        let bad = src.join(OsStr::from_bytes(b"bad\xff\nname"));
        std::fs::write(&bad, b"weird name").unwrap();

        // Foreign owner, nanosecond mtime.
        let owned = src.join("owned");
        std::fs::write(&owned, b"owned content").unwrap();
        std::os::unix::fs::lchown(&owned, Some(1234), Some(5678)).unwrap();
        set_mtime(&owned, 1_234_567_890, 123_456_789);
        rustix::fs::chownat(
            CWD,
            &link,
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        set_mtime(&link, 1_000_000_000, 7);

        // Sparse file: data, hole, data, trailing hole.
        let sparse = src.join("sparse");
        {
            let f = File::create(&sparse).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[1u8; 5000], 0).unwrap();
            f.write_all_at(&[2u8; 3000], 300_000).unwrap();
            f.set_len(1 << 20).unwrap();
        }
        // Setgid dir mtime must be restored after its content.
        set_mtime(&dacl, 1_500_000_000, 999_999_999);

        let mut items = Vec::new();
        walk(&src, b"", &mut items);
        let entries: Vec<Entry> = items
            .iter()
            .map(|(rel, abs, _)| entry_at_path(abs, rel.clone()))
            .collect();

        // Spot checks of read_entry.
        let find = |p: &[u8]| entries.iter().find(|e| e.path == p).unwrap();
        let e = find(b"suid");
        assert_eq!(e.mode & 0o4000, 0o4000);
        let names: Vec<&[u8]> = e.xattrs.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(
            names,
            [
                &b"system.posix_acl_access"[..],
                b"trusted.t",
                b"user.alpha",
                b"user.zeta"
            ]
        );
        assert_eq!(e.xattrs[2].1, b"\x00bin\xff");
        assert!(find(b"dacl").xattrs.iter().any(|(n, _)| n == ACL_DEFAULT));
        assert!(find(b"dacl/plain").xattrs.is_empty());
        assert_eq!(
            find(b"dangling").kind,
            Kind::Symlink {
                target: b"no/such\xc3\x28target".to_vec()
            }
        );
        assert_eq!(find(b"null").kind, Kind::CharDev { rdev: dev });
        assert_eq!(find(b"blk").kind, Kind::BlockDev { rdev: bdev });
        assert_eq!(find(b"fifo").kind, Kind::Fifo);
        assert_eq!(find(b"sock").kind, Kind::Socket);
        assert_eq!(find(b"bad\xff\nname").kind, Kind::File { size: 10 });
        let e = find(b"owned");
        assert_eq!(
            (e.uid, e.gid, e.mtime_sec, e.mtime_nsec),
            (1234, 5678, 1_234_567_890, 123_456_789)
        );

        // Restore in walk order, directories' metadata again at the end (mtime).
        for (e, (_, abs, _)) in entries.iter().zip(&items) {
            let to = if e.path.is_empty() {
                dst.clone()
            } else {
                dst.join(OsStr::from_bytes(&e.path))
            };
            match &e.kind {
                Kind::Dir => {
                    if !e.path.is_empty() {
                        std::fs::create_dir(&to).unwrap();
                    }
                }
                Kind::File { .. } => copy_sparse(abs, &to),
                _ => assert!(create_special(&to, e, true).unwrap()),
            }
            let warnings = apply_metadata(&to, e, true).unwrap();
            assert!(warnings.is_empty(), "{warnings:?}");
        }
        for e in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
            let to = dst.join(OsStr::from_bytes(&e.path));
            assert!(apply_metadata(&to, e, true).unwrap().is_empty());
        }

        // Holes kept in the copy.
        let md = std::fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(md.len(), 1 << 20);
        assert!(md.blocks() * 512 < md.len() / 4, "blocks {}", md.blocks());
        // The symlink got its trusted xattr back.
        assert_eq!(
            read_xattrs(&dst.join("dangling"), false).unwrap(),
            [(b"trusted.link".to_vec(), b"v".to_vec())]
        );

        // The project's oracle.
        let mut src_arg = src.clone().into_os_string();
        src_arg.push("/");
        let mut dst_arg = dst.clone().into_os_string();
        dst_arg.push("/");
        let out = Command::new("rsync")
            .args([
                "-aHAX",
                "--numeric-ids",
                "--checksum",
                "--dry-run",
                "--itemize-changes",
                "--delete",
            ])
            .arg(&src_arg)
            .arg(&dst_arg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rsync: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout.is_empty(),
            "rsync sees differences:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );

        // Re-reading the restored tree gives the same entries.
        let mut again = Vec::new();
        walk(&dst, b"", &mut again);
        let restored: Vec<Entry> = again
            .iter()
            .map(|(rel, abs, _)| entry_at_path(abs, rel.clone()))
            .collect();
        assert_eq!(restored.len(), entries.len());
        for (r, e) in restored.iter().zip(&entries) {
            assert_eq!(
                r,
                e,
                "entry {} differs after restore",
                e.path.escape_ascii()
            );
        }
    }

    #[test]
    fn meta_symlink_xattrs_and_non_root_rules() {
        if skip_unless_root("meta_symlink_xattrs_and_non_root_rules") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        // user.* and ACLs on a symlink are skipped quietly; trusted.* is set.
        let link = t.path().join("l");
        let mut e = entry(Kind::Symlink {
            target: b"target".to_vec(),
        });
        e.xattrs = vec![
            (ACL_ACCESS.to_vec(), b"\x02\x00\x00\x00".to_vec()),
            (b"trusted.a".to_vec(), b"1".to_vec()),
            (b"user.b".to_vec(), b"2".to_vec()),
        ];
        assert!(create_special(&link, &e, true).unwrap());
        assert!(apply_metadata(&link, &e, true).unwrap().is_empty());
        assert_eq!(
            read_xattrs(&link, false).unwrap(),
            [(b"trusted.a".to_vec(), b"1".to_vec())]
        );
        let md = std::fs::symlink_metadata(&link).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 5));

        // As non-root: no chown, security/trusted skipped, user set.
        let f = t.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let mut e = entry(Kind::File { size: 1 });
        e.uid = 4321;
        e.mode = 0o4640;
        e.xattrs = vec![
            (b"trusted.a".to_vec(), b"1".to_vec()),
            (b"user.b".to_vec(), b"2".to_vec()),
        ];
        assert!(apply_metadata(&f, &e, false).unwrap().is_empty());
        let md = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(md.uid(), 0);
        assert_eq!(md.mode() & 0o7777, 0o4640);
        assert_eq!(
            read_xattrs(&f, false).unwrap(),
            [(b"user.b".to_vec(), b"2".to_vec())]
        );

        // A failing xattr is a warning, not an error.
        e.xattrs = vec![(b"bogusns.a".to_vec(), b"1".to_vec())];
        let w = apply_metadata(&f, &e, true).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(std::fs::symlink_metadata(&f).unwrap().uid(), 4321);
    }

    #[test]
    fn meta_create_special_refusals() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x");
        for kind in [
            Kind::File { size: 0 },
            Kind::Dir,
            Kind::HardLink {
                target: b"a".to_vec(),
            },
        ] {
            let err = create_special(&p, &entry(kind), true).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        let dev = entry(Kind::CharDev {
            rdev: rustix::fs::makedev(1, 3),
        });
        assert!(!create_special(&p, &dev, false).unwrap());
        assert!(std::fs::symlink_metadata(&p).is_err());
        let bad = entry(Kind::Symlink {
            target: b"a\0b".to_vec(),
        });
        assert_eq!(
            create_special(&p, &bad, false).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // Fifo works unprivileged; an existing object is an error.
        let fifo = entry(Kind::Fifo);
        assert!(create_special(&p, &fifo, false).unwrap());
        assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_fifo());
        assert_eq!(
            create_special(&p, &fifo, false).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        // apply_metadata never follows: a symlink standing where a file is expected is refused.
        let l = t.path().join("l");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(apply_metadata(&l, &entry(Kind::File { size: 0 }), false).is_err());
        assert_eq!(std::fs::symlink_metadata(&p).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn meta_read_entry_plain_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        set_mtime(&p, 1_700_000_000, 42);
        let e = entry_at_path(&p, b"f".to_vec());
        assert_eq!(e.kind, Kind::File { size: 5 });
        assert_eq!(e.mode, 0o640);
        assert_eq!((e.mtime_sec, e.mtime_nsec), (1_700_000_000, 42));
        assert!(e.xattrs.is_empty());
        // A big xattr value goes through the size query path.
        let big = vec![7u8; 3000];
        rustix::fs::lsetxattr(&p, "user.big", &big, XattrFlags::empty()).unwrap();
        let e = entry_at_path(&p, b"f".to_vec());
        assert_eq!(e.xattrs, [(b"user.big".to_vec(), big)]);
        // The same through an fd of the object itself.
        let fd = rustix::fs::open(&p, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).unwrap();
        let st = stat_at(At::Fd(fd.as_fd())).unwrap();
        assert_eq!(
            read_entry(At::Fd(fd.as_fd()), b"f".to_vec(), &st).unwrap(),
            e
        );
    }

    /// 1 MiB with zero blocks in the middle and at the end, in chunks of `step`.
    fn sparse_case(step: usize) {
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        data[100_000..600_000].fill(0); // middle hole (unaligned edges)
        data[(1 << 20) - 200_000..].fill(0); // trailing hole
        data[10] = 0; // lone zeros inside data blocks
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s");
        std::fs::write(&p, vec![9u8; 2 << 20]).unwrap(); // old content must not show through
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let mut w = SparseWriter::new(f);
        for chunk in data.chunks(step) {
            w.write_all(chunk).unwrap();
        }
        w.write_all(&[]).unwrap();
        let mut f = w.finish().unwrap();
        assert_eq!(f.stream_position().unwrap(), data.len() as u64);
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), data);
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), data.len() as u64);
        assert!(
            md.blocks() * 512 < md.len(),
            "step {step}: {} blocks for {} bytes",
            md.blocks(),
            md.len()
        );
        assert!(md.blocks() * 512 <= (1 << 20) - 600_000 + 8192);
    }

    #[test]
    fn meta_sparse_writer_keeps_holes() {
        for step in [1 << 20, 4096, 65_536, 1000, 4097, 7, 3 * 4096 + 1] {
            sparse_case(step);
        }
    }

    #[test]
    fn meta_sparse_writer_small_and_empty() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("e");
        let f = SparseWriter::new(File::create(&p).unwrap())
            .finish()
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        let mut w = SparseWriter::new(File::create(&p).unwrap());
        w.write_all(&[0, 0, 0]).unwrap();
        w.write_all(&[0; 5000]).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), vec![0u8; 5003]);
        let mut w = SparseWriter::new(File::create(&p).unwrap());
        w.write_all(b"ab").unwrap();
        w.write_all(&[0; 8190]).unwrap();
        w.write_all(b"c").unwrap();
        w.finish().unwrap();
        let mut want = b"ab".to_vec();
        want.extend_from_slice(&[0; 8190]);
        want.push(b'c');
        assert_eq!(std::fs::read(&p).unwrap(), want);
    }

    #[test]
    fn meta_is_zero() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        for i in 0..40 {
            let mut v = vec![0u8; 40];
            v[i] = 1;
            assert!(!is_zero(&v));
        }
    }
}

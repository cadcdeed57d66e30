//! Reading a filesystem object's metadata into a protocol Entry (for backup).
//!
//! Everything here works on the object itself and never follows a symlink:
//! reading is relative to a held directory fd, so no path a user could change
//! is resolved. POSIX ACLs travel as the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes, exactly as the kernel
//! stores them; restore applies them again (see [`crate::apply`]).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use byteback_protocol::os::xattr::XATTR_KERNEL_MAX;
use byteback_protocol::os::{xattr_names, xattr_value, XattrOf};
use byteback_protocol::{Entry, Kind};
use rustix::fs::{AtFlags, FileType, Statx, StatxFlags};
use rustix::io::Errno;

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

/// Who an object is beyond its device and inode numbers, which a deleted
/// object's successor may get again (at once on ext4 and XFS): its birth
/// time where the filesystem keeps one, and its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    birth: Option<(i64, u32)>,
    owner: (u32, u32),
}

impl Identity {
    /// The owner's uid.
    pub fn uid(&self) -> u32 {
        self.owner.0
    }

    /// The identity `st` shows.
    pub fn of(st: &Statx) -> Identity {
        let has_birth = st.stx_mask & StatxFlags::BTIME.bits() != 0;
        Identity {
            birth: has_birth.then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec)),
            owner: (st.stx_uid, st.stx_gid),
        }
    }
}

/// `statx` of the object at `at`, never following a symlink named by
/// [`At::Child`] and never triggering an automount there.
pub fn stat_at(at: At<'_>) -> io::Result<Statx> {
    stat_at_with(at, AtFlags::empty())
}

/// [`stat_at`] from the attributes the kernel has cached, without asking a
/// network filesystem's server (or a FUSE daemon), which may never answer.
pub fn stat_cached_at(at: At<'_>) -> io::Result<Statx> {
    stat_at_with(at, AtFlags::STATX_DONT_SYNC)
}

fn stat_at_with(at: At<'_>, extra: AtFlags) -> io::Result<Statx> {
    let r = match at {
        At::Child { dir, name } => rustix::fs::statx(
            dir,
            name,
            AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT | extra,
            StatxFlags::BASIC_STATS | StatxFlags::MNT_ID | StatxFlags::BTIME,
        ),
        At::Fd(fd) => rustix::fs::statx(
            fd,
            c"",
            AtFlags::EMPTY_PATH | extra,
            StatxFlags::BASIC_STATS | StatxFlags::MNT_ID | StatxFlags::BTIME,
        ),
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
/// read with `readlinkat` on the held fd, and extended attributes with
/// `listxattrat`/`getxattrat` on the held fd (Linux 6.13+) or else through
/// `/proc/self/fd/<fd>[/<name>]` (procfs must be mounted), which starts at
/// the held fd; for [`At::Child`] neither follows `name`. If the object was
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
pub fn read_entry(at: At<'_>, rel: Vec<u8>, st: &Statx) -> io::Result<(Entry, Vec<Vec<u8>>)> {
    let mut e = entry_of_stat(at, rel, st)?;
    let (x, left_out) = read_xattrs(at)?;
    e.xattrs = x;
    Ok((e, left_out))
}

/// [`read_entry`] without the extended attributes (left empty): what
/// `statx` says, and a symlink's target.
pub fn entry_of_stat(at: At<'_>, rel: Vec<u8>, st: &Statx) -> io::Result<Entry> {
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
    Ok(Entry {
        path: rel,
        kind,
        mode: mode & 0o7777,
        uid: st.stx_uid,
        gid: st.stx_gid,
        mtime_sec: st.stx_mtime.tv_sec,
        mtime_nsec,
        xattrs: Vec::new(),
    })
}

/// Xattrs that one entry carries, and the names of those left out.
pub type Fitted = (byteback_protocol::Xattrs, Vec<Vec<u8>>);

/// The xattrs of the object at `at` that one entry carries, sorted by
/// name, and the names of those left out (see [`xattrs_of`]): with
/// `listxattrat` for [`At::Child`] where the kernel has it, else through
/// procfs.
pub fn read_xattrs(at: At<'_>) -> io::Result<Fitted> {
    if let At::Child { dir, name } = at {
        if byteback_protocol::os::xattr::at_calls_available() {
            match xattrs_of(XattrOf::Child { dir, name }) {
                Err((Errno::NOSYS, _)) => {}
                r => return r.map_err(|(e, what)| with_what(e, &what)),
            }
        }
    }
    let (path, follow) = at.proc_path();
    let of = if follow {
        XattrOf::Path(&path)
    } else {
        XattrOf::Link(&path)
    };
    xattrs_of(of).map_err(|(e, what)| with_what(e, &what))
}

/// The xattrs of the object at `at` that carry permissions and labels
/// (POSIX ACLs, file capabilities, the SELinux label), each read by its
/// name, sorted: for one with more names than the kernel lists at once
/// (`E2BIG`, 64 KiB of them), whose other xattrs cannot be found. Without
/// them a restore would widen access (a mode's group bits are an ACL's
/// mask) or lose a program's capabilities.
pub fn read_known_xattrs(at: At<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    const KNOWN: [&[u8]; 4] = [
        b"security.capability",
        b"security.selinux",
        b"system.posix_acl_access",
        b"system.posix_acl_default",
    ];
    let (path, follow) = at.proc_path();
    let of = match at {
        At::Child { dir, name } if byteback_protocol::os::xattr::at_calls_available() => {
            XattrOf::Child { dir, name }
        }
        _ if follow => XattrOf::Path(&path),
        _ => XattrOf::Link(&path),
    };
    let mut out = vec![];
    for name in KNOWN {
        let value = match xattr_value(of, name, XATTR_KERNEL_MAX) {
            // A kernel without `getxattrat`: through procfs.
            Err(Errno::NOSYS) => {
                let of = if follow {
                    XattrOf::Path(&path)
                } else {
                    XattrOf::Link(&path)
                };
                xattr_value(of, name, XATTR_KERNEL_MAX)
            }
            r => r,
        };
        match value {
            Ok(Some(v)) => out.push((name.to_vec(), v)),
            Ok(None) | Err(Errno::NOTSUP) => {}
            Err(e) => {
                return Err(with_what(
                    e,
                    &format!("reading xattr {}", name.escape_ascii()),
                ))
            }
        }
    }
    Ok(out)
}

/// The xattrs of `of` that one entry carries, sorted by name, and the
/// names of those left out, sorted: kept as [`fit_xattrs`] keeps them,
/// each value read in that order and kept or dropped at once, so no more
/// than an entry carries is held (Linux allows thousands of 64 KiB values
/// on one object: reading them all first held up to 512 MiB). An error
/// says what failed.
fn xattrs_of(of: XattrOf<'_>) -> Result<Fitted, (Errno, String)> {
    use byteback_protocol::limits::{MAX_XATTRS, MAX_XATTR_NAME, MAX_XATTR_TOTAL, MAX_XATTR_VALUE};
    let mut names = xattr_names(of, XATTR_KERNEL_MAX).map_err(|e| (e, "listing xattrs".into()))?;
    names.sort_by(|a, b| byteback_protocol::xattr_keep_order(a, b));
    let (mut out, mut left_out, mut total) = (Vec::new(), Vec::new(), 0usize);
    for name in names {
        let room = |value: usize| {
            out.len() < MAX_XATTRS
                && name.len() <= MAX_XATTR_NAME
                && value <= MAX_XATTR_VALUE
                && total + name.len() + value <= MAX_XATTR_TOTAL
        };
        if !room(0) {
            left_out.push(name);
            continue;
        }
        match xattr_value(of, &name, XATTR_KERNEL_MAX) {
            Ok(Some(value)) if room(value.len()) => {
                total += name.len() + value.len();
                out.push((name, value));
            }
            Ok(Some(_)) => left_out.push(name),
            // Vanished since the listing, or listed but not readable as such.
            Ok(None) | Err(Errno::NOTSUP) => {}
            Err(e) => return Err((e, format!("reading xattr {}", name.escape_ascii()))),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    left_out.sort();
    Ok((out, left_out))
}

/// Keeps of `xattrs` what one entry may carry, those that carry
/// permissions and security labels first (see
/// [`byteback_protocol::fit_xattrs`], which the server uses for 1.x
/// snapshots too).
pub use byteback_protocol::fit_xattrs;

/// An io::Error for `e` that names the operation.
fn with_what(e: Errno, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use rustix::fs::{Mode, OFlags, Timespec, Timestamps, XattrFlags, CWD};

    fn cpath(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
    const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

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
    /// One walked object: its relative path, absolute path and metadata.
    type WalkItem = (Vec<u8>, PathBuf, std::fs::Metadata);

    fn walk(root: &Path, rel: &[u8], out: &mut Vec<WalkItem>) {
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
        read_entry(at, rel, &st).unwrap().0
    }

    /// Makes a symlink, fifo, socket or device at `to` (test set-up, by path).
    fn make_special(to: &Path, e: &Entry) {
        let private = Mode::RUSR | Mode::WUSR;
        match &e.kind {
            Kind::Symlink { target } => {
                rustix::fs::symlinkat(OsStr::from_bytes(target), CWD, to).unwrap()
            }
            Kind::Fifo => rustix::fs::mknodat(CWD, to, FileType::Fifo, private, 0).unwrap(),
            Kind::Socket => rustix::fs::mknodat(CWD, to, FileType::Socket, private, 0).unwrap(),
            Kind::CharDev { rdev } => {
                rustix::fs::mknodat(CWD, to, FileType::CharacterDevice, private, *rdev).unwrap()
            }
            Kind::BlockDev { rdev } => {
                rustix::fs::mknodat(CWD, to, FileType::BlockDevice, private, *rdev).unwrap()
            }
            k => panic!("not special: {k:?}"),
        }
    }

    /// Applies `e` to the object at `to` the way restore does, through fds.
    fn apply_at(to: &Path, e: &Entry, as_root: bool) -> Vec<String> {
        use crate::apply::{apply, open_path, ApplyRules, Held};
        let rules = ApplyRules {
            as_root,
            no_setuid: false,
            keep_unlisted_xattrs: false,
        };
        let parent = rustix::fs::open(
            to.parent().unwrap(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let name = to.file_name().unwrap().as_bytes();
        let shown = to.display().to_string();
        match &e.kind {
            Kind::Dir | Kind::File { .. } => {
                let fd = rustix::fs::open(
                    to,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .unwrap();
                apply(Held::Open(fd.as_fd()), e, &rules, &shown).unwrap()
            }
            Kind::Symlink { .. } => {
                let fd = open_path(&parent, name).unwrap();
                let held = Held::Symlink {
                    fd: fd.as_fd(),
                    parent: parent.as_fd(),
                    name,
                };
                apply(held, e, &rules, &shown).unwrap()
            }
            _ => {
                let fd = open_path(&parent, name).unwrap();
                apply(Held::Path(fd.as_fd()), e, &rules, &shown).unwrap()
            }
        }
    }

    fn copy_sparse(from: &Path, to: &Path) {
        let mut src = File::open(from).unwrap();
        let mut w = byteback_protocol::os::SparseWriter::new(File::create(to).unwrap());
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

    /// Every kind of entry and metadata read, applied, compared with rsync
    /// and read again, as named steps.
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
        let devs = make_meta_tree(&src);
        let mut items = Vec::new();
        walk(&src, b"", &mut items);
        let entries: Vec<Entry> = items
            .iter()
            .map(|(rel, abs, _)| entry_at_path(abs, rel.clone()))
            .collect();
        spot_check_entries(&entries, devs);
        restore_in_walk_order(&entries, &items, &dst);
        assert_rsync_sees_no_difference(&src, &dst);
        assert_rereads_the_same(&dst, &entries);
    }

    /// A tree with setuid, ACLs, xattrs, a dangling symlink, specials, a
    /// name that is not UTF-8, a foreign owner, nanosecond mtimes and holes.
    /// Returns the character and block device numbers used. (Long: one
    /// object per kind, each set up in a few lines.)
    fn make_meta_tree(src: &Path) -> (u64, u64) {
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

        (dev, bdev)
    }

    fn spot_check_entries(entries: &[Entry], (dev, bdev): (u64, u64)) {
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
    }

    /// Restores in walk order, directories' metadata again at the end (mtime).
    fn restore_in_walk_order(entries: &[Entry], items: &[WalkItem], dst: &Path) {
        for (e, (_, abs, _)) in entries.iter().zip(items) {
            let to = if e.path.is_empty() {
                dst.to_path_buf()
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
                _ => make_special(&to, e),
            }
            let warnings = apply_at(&to, e, true);
            assert!(warnings.is_empty(), "{warnings:?}");
        }
        for e in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
            let to = dst.join(OsStr::from_bytes(&e.path));
            assert!(apply_at(&to, e, true).is_empty());
        }

        // Holes kept in the copy.
        let md = std::fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(md.len(), 1 << 20);
        assert!(md.blocks() * 512 < md.len() / 4, "blocks {}", md.blocks());
        // The symlink got its trusted xattr back.
        assert_eq!(
            xattrs_of(XattrOf::Link(&cpath(&dst.join("dangling"))))
                .unwrap()
                .0,
            [(b"trusted.link".to_vec(), b"v".to_vec())]
        );
    }

    fn assert_rsync_sees_no_difference(src: &Path, dst: &Path) {
        // The project's oracle.
        let mut src_arg = src.as_os_str().to_owned();
        src_arg.push("/");
        let mut dst_arg = dst.as_os_str().to_owned();
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
    }

    fn assert_rereads_the_same(dst: &Path, entries: &[Entry]) {
        // Re-reading the restored tree gives the same entries.
        let mut again = Vec::new();
        walk(dst, b"", &mut again);
        let restored: Vec<Entry> = again
            .iter()
            .map(|(rel, abs, _)| entry_at_path(abs, rel.clone()))
            .collect();
        assert_eq!(restored.len(), entries.len());
        for (r, e) in restored.iter().zip(entries) {
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
        make_special(&link, &e);
        assert!(apply_at(&link, &e, true).is_empty());
        assert_eq!(
            xattrs_of(XattrOf::Link(&cpath(&link))).unwrap().0,
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
        // The file is not 4321's: its setuid bit is left off, with a warning.
        let w = apply_at(&f, &e, false);
        assert!(
            w.len() == 1 && w[0].contains("setuid left off: owned by 0, not 4321"),
            "{w:?}"
        );
        let md = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(md.uid(), 0);
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(
            xattrs_of(XattrOf::Link(&cpath(&f))).unwrap().0,
            [(b"user.b".to_vec(), b"2".to_vec())]
        );

        // A failing xattr is a warning, not an error.
        e.xattrs = vec![(b"bogusns.a".to_vec(), b"1".to_vec())];
        let w = apply_at(&f, &e, true);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(std::fs::symlink_metadata(&f).unwrap().uid(), 4321);
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
            read_entry(At::Fd(fd.as_fd()), b"f".to_vec(), &st)
                .unwrap()
                .0,
            e
        );
    }

    /// `listxattrat` on the held directory (Linux 6.13+) and the `/proc`
    /// path older kernels use read the same attributes, and neither follows
    /// a symlink.
    #[test]
    fn both_ways_of_reading_xattrs_agree() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let big = vec![9u8; 3000];
        for (name, value) in [("user.a", &b"1"[..]), ("user.big", &big[..])] {
            rustix::fs::lsetxattr(&f, name, value, XattrFlags::empty()).unwrap();
        }
        std::os::unix::fs::symlink(&f, t.path().join("l")).unwrap();
        let dir =
            rustix::fs::open(t.path(), OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).unwrap();
        for name in [c"f", c"l"] {
            let at = At::Child {
                dir: dir.as_fd(),
                name,
            };
            let (path, follow) = at.proc_path();
            assert!(!follow);
            let by_proc = xattrs_of(XattrOf::Link(&path)).unwrap().0;
            match xattrs_of(XattrOf::Child {
                dir: dir.as_fd(),
                name,
            }) {
                Ok(by_fd) => assert_eq!(by_fd.0, by_proc, "{name:?}"),
                Err((Errno::NOSYS, _)) => eprintln!("NOTE: no listxattrat here; /proc only"),
                Err(e) => panic!("{name:?}: {e:?}"),
            }
            let user: Vec<_> = by_proc
                .iter()
                .filter(|(n, _)| n.starts_with(b"user."))
                .collect();
            assert_eq!(user.len(), if name == c"f" { 2 } else { 0 }, "{name:?}");
            assert_eq!(read_xattrs(at).unwrap().0, by_proc, "{name:?}");
        }
    }

    /// What fits is kept, security labels and ACLs first, in name order;
    /// what does not is named.
    #[test]
    fn xattrs_beyond_the_caps_are_left_out_by_kind_then_name() {
        use byteback_protocol::limits::{MAX_XATTRS, MAX_XATTR_TOTAL};
        let x = |n: &str, len: usize| (n.as_bytes().to_vec(), vec![b'v'; len]);
        // Within the caps: untouched.
        let mut few = vec![x("user.a", 10), x("user.b", 10)];
        assert!(fit_xattrs(&mut few).is_empty());
        assert_eq!(few.len(), 2);
        // Too many: the system. and security. ones stay.
        let mut many: Vec<_> = (0..MAX_XATTRS + 2)
            .map(|i| x(&format!("user.k{i:04}"), 1))
            .collect();
        many.push(x("security.capability", 20));
        many.push(x("system.posix_acl_access", 28));
        many.sort();
        let dropped = fit_xattrs(&mut many);
        assert_eq!(many.len(), MAX_XATTRS);
        assert_eq!(dropped.len(), 4);
        assert!(many.iter().any(|(n, _)| n == b"security.capability"));
        assert!(many.iter().any(|(n, _)| n == b"system.posix_acl_access"));
        assert_eq!(
            dropped[0],
            format!("user.k{:04}", MAX_XATTRS - 2).into_bytes()
        );
        assert!(many.windows(2).all(|w| w[0].0 < w[1].0), "not sorted");
        // Too large in all: what fits, and a smaller one after a larger that did not.
        let big = 60 << 10;
        let mut large: Vec<_> = (0..20).map(|i| x(&format!("user.b{i:02}"), big)).collect();
        large.push(x("user.zz", 10));
        let dropped = fit_xattrs(&mut large);
        let total: usize = large.iter().map(|(n, v)| n.len() + v.len()).sum();
        assert!(total <= MAX_XATTR_TOTAL);
        assert_eq!(large.len(), MAX_XATTR_TOTAL / (big + 7) + 1);
        assert!(large.iter().any(|(n, _)| n == b"user.zz"));
        assert_eq!(dropped.len(), 21 - large.len());
    }
}

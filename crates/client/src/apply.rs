//! Applying an entry's metadata to an object restore has just made, through its fd.
//!
//! Nothing here takes a path a local user could change: regular files and
//! directories are changed through the fd restore holds for them (`fchown`,
//! `fsetxattr`, `fchmod`, `futimens`); symlinks, fifos, sockets and devices
//! through an `O_PATH | O_NOFOLLOW` fd (`AT_EMPTY_PATH`, or the fd's
//! `/proc/self/fd` name, which the kernel resolves to the object itself). The
//! order is owner, extended attributes (POSIX ACLs included), mode, mtime:
//! `chown` clears setuid and setting an ACL rewrites the group bits, so the
//! mode comes after both, and an object is never setuid while it still has
//! the wrong owner.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};

use byteback_protocol::{Entry, Kind};
use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

/// Name of the xattr holding a POSIX access ACL.
const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
/// Name of the xattr holding a POSIX default ACL (directories only).
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// This process's user and group.
static SELF: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();

/// What [`apply`] could not give back without root, for one summary: the
/// entries whose owner is another user or group, and those whose
/// `security.*` or `trusted.*` xattrs (file capabilities, SELinux labels)
/// were left out.
static NOT_ROOT: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));

/// The summary of what a restore not run as root could not give back
/// (see [`NOT_ROOT`]), if anything; the counts start again.
pub fn not_root_summary() -> Option<String> {
    let owners = NOT_ROOT.0.swap(0, Ordering::Relaxed);
    let xattrs = NOT_ROOT.1.swap(0, Ordering::Relaxed);
    let mut parts = vec![];
    if owners > 0 {
        parts.push(format!(
            "{owners} files belong to another user or group in the backup, and to this user here"
        ));
    }
    if xattrs > 0 {
        parts.push(format!(
            "{xattrs} entries lost their security.* and trusted.* xattrs (file capabilities \
             among them; SELinux labels are not counted)"
        ));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "not run as root: {}; restore as root to keep them",
            parts.join("; ")
        )
    })
}

/// How restore treats what a snapshot asks for.
#[derive(Debug, Clone, Copy)]
pub struct ApplyRules {
    /// Running as root: owners are set, `security.*`/`trusted.*` xattrs too.
    pub as_root: bool,
    /// Setuid and setgid bits and file capabilities (`security.capability`)
    /// are dropped (`--no-setuid`).
    pub no_setuid: bool,
    /// A directory's xattrs that its entry does not list are left as they
    /// are (its ACLs excepted): the entry had some left out (see
    /// `restore::tree`), so what it lacks may be in the snapshot.
    pub keep_unlisted_xattrs: bool,
}

/// The object an fd stands for, as far as applying metadata is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Held<'a> {
    /// A regular file or directory opened for real: every `f*` call works on it.
    Open(BorrowedFd<'a>),
    /// A fifo, socket or device opened `O_PATH | O_NOFOLLOW`.
    Path(BorrowedFd<'a>),
    /// A symlink opened `O_PATH | O_NOFOLLOW`, with its parent directory's fd
    /// and its name there (extended attributes of a symlink can only be set by name).
    Symlink {
        /// The symlink itself.
        fd: BorrowedFd<'a>,
        /// The directory holding it (restore keeps it private while it runs).
        parent: BorrowedFd<'a>,
        /// Its name in `parent`.
        name: &'a [u8],
    },
}

impl Held<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match *self {
            Held::Open(fd) | Held::Path(fd) | Held::Symlink { fd, .. } => fd,
        }
    }
}

/// `/proc/self/fd/N`: a name the kernel resolves to exactly the object behind `fd`.
fn proc_name(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Whether `obj` carries chattr's immutable or append-only flag (which
/// refuse a change of mode, owner or times even to root).
fn is_immutable(obj: Held<'_>) -> bool {
    rustix::fs::ioctl_getflags(obj.fd())
        .is_ok_and(|f| f.intersects(rustix::fs::IFlags::IMMUTABLE | rustix::fs::IFlags::APPEND))
}

/// Errors after which applying metadata makes no sense: the object or the
/// filesystem is gone, broken or full. Anything else is a warning.
fn is_fatal(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT | Errno::NOTDIR | Errno::IO | Errno::NOSPC | Errno::DQUOT | Errno::ROFS
    )
}

fn err(e: Errno, shown: &str, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{shown}: {what}: {e}"))
}

/// The mode restore gives `entry`, after the rules.
pub fn restored_mode(entry: &Entry, rules: &ApplyRules) -> u32 {
    let mut mode = entry.mode & 0o7777;
    if rules.no_setuid {
        mode &= !0o6000;
    }
    mode
}

/// Applies owner, xattrs, mode and mtime of `entry` to `obj`; `shown` names it in messages.
///
/// Returns warnings for metadata that could not be applied (an owner or an
/// xattr refused, setgid dropped by the kernel); errors are kept for a
/// missing object, I/O errors or a full filesystem, and chmod/utimes failures.
pub fn apply(
    obj: Held<'_>,
    entry: &Entry,
    rules: &ApplyRules,
    shown: &str,
) -> io::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let is_link = matches!(obj, Held::Symlink { .. });
    if rules.as_root {
        set_owner(obj, entry, shown, &mut warnings)?;
    } else {
        let (uid, gid) = *SELF.get_or_init(|| {
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            )
        });
        // A group this user belongs to can be given without root, as
        // rsync does (the owner of a file may give it any of its groups).
        // The object's own group, not ours: a directory that was there
        // keeps the one it had.
        let has = rustix::fs::fstat(obj.fd()).map_or(gid, |st| st.st_gid);
        let mine = entry.gid == gid || in_my_groups(entry.gid);
        let group_set = entry.gid == has || (mine && set_group(obj, entry.gid));
        // Not directories: those made on the way to what is restored
        // (`/home` above one's own files) would make every restore of
        // one's own files partial.
        if (entry.uid != uid || !group_set) && !matches!(entry.kind, Kind::Dir) {
            NOT_ROOT.0.fetch_add(1, Ordering::Relaxed);
        }
        // Nor SELinux labels, which every entry of such a host carries and
        // which the kernel gives a new file anyway.
        if entry.xattrs.iter().any(|(n, _)| {
            (n.starts_with(b"security.") && n.as_slice() != b"security.selinux")
                || n.starts_with(b"trusted.")
        }) {
            NOT_ROOT.1.fetch_add(1, Ordering::Relaxed);
        }
    }
    if matches!(entry.kind, Kind::Dir) && !rules.keep_unlisted_xattrs {
        remove_stale_xattrs(obj, entry, rules, shown, &mut warnings)?;
    } else if !is_link {
        remove_stale_acls(obj, entry, shown, &mut warnings)?;
    }
    // The access ACL, when it could not be set: the mode's group bits are
    // then narrowed to what the ACL gave the owning group.
    let mut acl_lost = None;
    for (name, value) in &entry.xattrs {
        let privileged = name.starts_with(b"security.") || name.starts_with(b"trusted.");
        if !rules.as_root && privileged {
            continue;
        }
        // File capabilities give privileges as setuid does (cap_setuid+ep
        // is root), and a SMACK exec label changes the label a program
        // runs with: dropped with the setuid bits.
        if rules.no_setuid
            && matches!(
                name.as_slice(),
                b"security.capability" | b"security.SMACK64EXEC"
            )
        {
            continue;
        }
        if is_link && (name.starts_with(b"user.") || name.starts_with(b"system.posix_acl_")) {
            continue; // the kernel never allows these on a symlink
        }
        let set = set_xattr(obj, name, value);
        if set.is_err() && name.as_slice() == ACL_ACCESS {
            acl_lost = Some(value.as_slice());
        }
        match set {
            Ok(()) => {}
            // No room for this xattr in this inode (ext4 without ea_inode,
            // btrfs's leaf size) or over this filesystem's limits: the
            // xattr, not the filesystem, is the problem (a full disc shows
            // itself again on the data). As rsync, a warning.
            Err(e @ (Errno::NOSPC | Errno::TOOBIG | Errno::RANGE)) => warnings.push(format!(
                "{shown}: cannot set xattr {} ({} bytes) here: {}",
                name.escape_ascii(),
                value.len(),
                io::Error::from(e)
            )),
            Err(e) if is_fatal(e) => {
                return Err(err(
                    e,
                    shown,
                    &format!("setting xattr {}", name.escape_ascii()),
                ))
            }
            Err(e) => warnings.push(format!(
                "{shown}: cannot set xattr {}: {}",
                name.escape_ascii(),
                io::Error::from(e)
            )),
        }
    }
    if !is_link {
        let mut mode = restored_mode(entry, rules);
        if let Some(acl) = acl_lost {
            let narrowed = (mode & !0o070) | (group_of_acl(acl) & (mode >> 3) & 0o7) << 3;
            if narrowed != mode {
                warnings.push(format!(
                    "{shown}: without its ACL, mode {mode:04o} applied as {narrowed:04o} \
                     (the group bits of a mode with an ACL are its mask, not the group's own)"
                ));
                mode = narrowed;
            }
        }
        let mode = owned_mode(obj, entry, mode, shown, &mut warnings)?;
        match set_mode(obj, mode) {
            Ok(()) => {}
            // An immutable or append-only object (chattr +i, +a), which
            // takes no change from anyone: it keeps the mode it has.
            Err(Errno::PERM) if is_immutable(obj) => {
                warnings.push(format!(
                    "{shown}: mode {mode:04o} not applied: it is immutable or append-only (see lsattr)"
                ));
                return Ok(warnings);
            }
            Err(e) => return Err(err(e, shown, "chmod")),
        }
        if mode & 0o2000 != 0 {
            // The kernel silently drops setgid for a group the caller is not in.
            let now = rustix::fs::fstat(obj.fd()).map_err(|e| err(e, shown, "fstat"))?;
            let now = now.st_mode & 0o7777;
            if now != mode {
                warnings.push(format!(
                    "{shown}: mode {mode:04o} applied as {now:04o} (not a member of group {})",
                    entry.gid
                ));
            }
        }
    }
    set_mtime(obj, entry).map_err(|e| err(e, shown, "setting mtime"))?;
    Ok(warnings)
}

/// The permissions (`rwx`, 3 bits) access ACL `acl` (the kernel's xattr
/// encoding: a 4-byte version 2, then 8-byte entries of tag, permissions
/// and id) gives the owning group: its `group::` entry, within its mask.
/// Nothing (0) for one that does not parse: a restore that cannot tell
/// must not widen access.
fn group_of_acl(acl: &[u8]) -> u32 {
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    if acl.len() < 4 || !(acl.len() - 4).is_multiple_of(8) || acl[..4] != 2u32.to_le_bytes() {
        return 0;
    }
    let (mut group, mut mask) = (None, 0o7);
    for e in acl[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u32::from(u16::from_le_bytes([e[2], e[3]]) & 0o7);
        match tag {
            GROUP_OBJ => group = Some(perm),
            MASK => mask = perm,
            _ => {}
        }
    }
    group.map_or(0, |g| g & mask)
}

/// `mode` without the setuid bit unless the object is owned by the
/// entry's user, and without setgid unless by its group (directories
/// keep setgid: it only names the group new files get): a restore whose
/// owner could not be set (not root, a refused or unmappable owner) must
/// not leave a program that runs as whoever restored it, as tar does.
fn owned_mode(
    obj: Held<'_>,
    entry: &Entry,
    mut mode: u32,
    shown: &str,
    warnings: &mut Vec<String>,
) -> io::Result<u32> {
    if mode & 0o6000 == 0 {
        return Ok(mode);
    }
    let st = rustix::fs::fstat(obj.fd()).map_err(|e| err(e, shown, "fstat"))?;
    let dir = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
    if mode & 0o4000 != 0 && st.st_uid != entry.uid {
        mode &= !0o4000;
        warnings.push(format!(
            "{shown}: setuid left off: owned by {}, not {}",
            st.st_uid, entry.uid
        ));
    }
    if mode & 0o2000 != 0 && !dir && st.st_gid != entry.gid {
        mode &= !0o2000;
        warnings.push(format!(
            "{shown}: setgid left off: group {}, not {}",
            st.st_gid, entry.gid
        ));
    }
    Ok(mode)
}

/// Whether `gid` is one of this process's supplementary groups.
fn in_my_groups(gid: u32) -> bool {
    static GROUPS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    GROUPS
        .get_or_init(|| {
            rustix::process::getgroups()
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_default()
        })
        .contains(&gid)
}

/// Gives `obj` group `gid` (one of this user's, not as root); whether it took.
fn set_group(obj: Held<'_>, gid: u32) -> bool {
    let gid = Some(rustix::fs::Gid::from_raw(gid));
    match obj {
        Held::Open(fd) => rustix::fs::fchown(fd, None, gid),
        Held::Path(fd) | Held::Symlink { fd, .. } => rustix::fs::chownat(
            fd,
            "",
            None,
            gid,
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        ),
    }
    .is_ok()
}

fn set_owner(
    obj: Held<'_>,
    entry: &Entry,
    shown: &str,
    warnings: &mut Vec<String>,
) -> io::Result<()> {
    // u32::MAX means "leave unchanged" to the kernel; it cannot be set.
    let uid = (entry.uid != u32::MAX).then(|| rustix::fs::Uid::from_raw(entry.uid));
    let gid = (entry.gid != u32::MAX).then(|| rustix::fs::Gid::from_raw(entry.gid));
    if uid.is_none() || gid.is_none() {
        warnings.push(format!(
            "{shown}: owner {}:{} cannot be set",
            entry.uid, entry.gid
        ));
    }
    let r = match obj {
        Held::Open(fd) => rustix::fs::fchown(fd, uid, gid),
        Held::Path(fd) | Held::Symlink { fd, .. } => rustix::fs::chownat(
            fd,
            "",
            uid,
            gid,
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        ),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_fatal(e) => Err(err(e, shown, "chown")),
        Err(e) => {
            warnings.push(format!(
                "{shown}: cannot set owner {}:{}: {}",
                entry.uid,
                entry.gid,
                io::Error::from(e)
            ));
            Ok(())
        }
    }
}

/// A fresh object inherits an access ACL (and a directory a default ACL) from
/// a parent's default ACL, which the source may not have had: remove those
/// the entry does not carry.
fn remove_stale_acls(
    obj: Held<'_>,
    entry: &Entry,
    shown: &str,
    warnings: &mut Vec<String>,
) -> io::Result<()> {
    let is_dir = matches!(entry.kind, Kind::Dir);
    let stale: &[&[u8]] = if is_dir {
        &[ACL_ACCESS, ACL_DEFAULT]
    } else {
        &[ACL_ACCESS]
    };
    for name in stale {
        if entry.xattrs.iter().any(|(n, _)| n == name) {
            continue;
        }
        let r = match obj {
            Held::Open(fd) => rustix::fs::fremovexattr(fd, *name),
            Held::Path(fd) => rustix::fs::removexattr(proc_name(fd).as_str(), *name),
            Held::Symlink { .. } => Ok(()),
        };
        match r {
            Ok(()) | Err(Errno::NODATA) | Err(Errno::NOTSUP) => {}
            Err(e) if is_fatal(e) => return Err(err(e, shown, "removing ACL")),
            Err(e) => warnings.push(format!(
                "{shown}: cannot remove inherited {}: {}",
                name.escape_ascii(),
                io::Error::from(e)
            )),
        }
    }
    Ok(())
}

/// Removes from directory `obj` the xattrs `entry` does not have, of those
/// this restore could set: a directory that was there keeps nothing of
/// what was set on it since the backup (a new one has at most inherited
/// ACLs). `system.*` beyond the POSIX ACLs and the SELinux label, which
/// the kernel gives, are left; `security.*` and `trusted.*` only as root.
fn remove_stale_xattrs(
    obj: Held<'_>,
    entry: &Entry,
    rules: &ApplyRules,
    shown: &str,
    warnings: &mut Vec<String>,
) -> io::Result<()> {
    use byteback_protocol::os::{xattr_names, XattrOf};
    let path;
    let of = match obj {
        Held::Open(fd) => XattrOf::Fd(fd),
        Held::Path(fd) => {
            path = std::ffi::CString::new(proc_name(fd)).map_err(io::Error::other)?;
            XattrOf::Path(&path)
        }
        Held::Symlink { .. } => return Ok(()),
    };
    let names = match xattr_names(of, byteback_protocol::os::xattr::XATTR_KERNEL_MAX) {
        Ok(names) => names,
        Err(e) if is_fatal(e) => return Err(err(e, shown, "listing xattrs")),
        // Too many names to list (E2BIG): the ACLs at least, by name.
        Err(e) => {
            warnings.push(format!(
                "{shown}: cannot list xattrs to remove those not in the backup ({}); its \
                 ACLs are set as the backup has them, other xattrs may stay",
                io::Error::from(e)
            ));
            return remove_stale_acls(obj, entry, shown, warnings);
        }
    };
    for name in names {
        let ours = name.starts_with(b"user.")
            || name.as_slice() == ACL_ACCESS
            || name.as_slice() == ACL_DEFAULT
            || (rules.as_root
                && (name.starts_with(b"trusted.")
                    || (name.starts_with(b"security.") && name.as_slice() != b"security.selinux")));
        if !ours || entry.xattrs.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let os_name = OsStr::from_bytes(&name);
        let r = match obj {
            Held::Open(fd) => rustix::fs::fremovexattr(fd, os_name),
            Held::Path(fd) => rustix::fs::removexattr(proc_name(fd).as_str(), os_name),
            Held::Symlink { .. } => Ok(()),
        };
        match r {
            Ok(()) | Err(Errno::NODATA) => {}
            Err(e) if is_fatal(e) => return Err(err(e, shown, "removing xattrs")),
            Err(e) => warnings.push(format!(
                "{shown}: cannot remove xattr {}, which the backup does not have: {}",
                name.escape_ascii(),
                io::Error::from(e)
            )),
        }
    }
    Ok(())
}

fn set_xattr(obj: Held<'_>, name: &[u8], value: &[u8]) -> Result<(), Errno> {
    match obj {
        Held::Open(fd) => rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()),
        // `setxattr` follows the /proc name to the object itself, never opening it.
        Held::Path(fd) => {
            rustix::fs::setxattr(proc_name(fd).as_str(), name, value, XattrFlags::empty())
        }
        Held::Symlink {
            fd,
            parent,
            name: link,
        } => {
            // By name in the held (private) parent, not following the link;
            // then check the name still stands for the symlink we hold.
            let mut path = format!("{}/", proc_name(parent)).into_bytes();
            path.extend_from_slice(link);
            let path = OsStr::from_bytes(&path);
            let ours = rustix::fs::fstat(fd)?;
            let there = rustix::fs::statat(parent, link, AtFlags::SYMLINK_NOFOLLOW)?;
            if (ours.st_dev, ours.st_ino) != (there.st_dev, there.st_ino) {
                return Err(Errno::STALE);
            }
            rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        }
    }
}

fn set_mode(obj: Held<'_>, mode: u32) -> Result<(), Errno> {
    let mode = Mode::from_raw_mode(mode);
    match obj {
        Held::Open(fd) => rustix::fs::fchmod(fd, mode),
        // fchmod refuses O_PATH fds; chmod of the /proc name reaches the object.
        Held::Path(fd) => rustix::fs::chmod(proc_name(fd).as_str(), mode),
        Held::Symlink { .. } => Ok(()),
    }
}

fn set_mtime(obj: Held<'_>, entry: &Entry) -> Result<(), Errno> {
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
    match obj {
        Held::Open(fd) => rustix::fs::futimens(fd, &times),
        Held::Path(fd) | Held::Symlink { fd, .. } => rustix::fs::utimensat(
            fd,
            "",
            &times,
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        ),
    }
}

/// Opens `name` in `dir` as `O_PATH | O_NOFOLLOW` (no side effects, even for
/// devices and fifos), for [`Held::Path`] and [`Held::Symlink`].
pub fn open_path(dir: impl AsFd, name: &[u8]) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::OFlags;
    let fd = rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::group_of_acl;

    fn acl(entries: &[(u16, u16)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for &(tag, perm) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        v
    }

    /// The owning group's own entry, within the mask; nothing for what
    /// does not parse.
    #[test]
    fn the_group_gets_its_own_entry_within_the_mask() {
        // user::rw- user:x:rw- group::--- mask::rw- other::---
        assert_eq!(
            group_of_acl(&acl(&[(1, 6), (2, 6), (4, 0), (0x10, 6), (0x20, 0)])),
            0
        );
        // group::rwx within mask::r--
        assert_eq!(
            group_of_acl(&acl(&[(1, 6), (4, 7), (0x10, 4), (0x20, 0)])),
            4
        );
        // No mask: the group entry itself.
        assert_eq!(group_of_acl(&acl(&[(1, 6), (4, 5), (0x20, 0)])), 5);
        assert_eq!(group_of_acl(b""), 0);
        assert_eq!(group_of_acl(&acl(&[(4, 7)])[..11]), 0);
        let mut v1 = acl(&[(4, 7)]);
        v1[0] = 1;
        assert_eq!(group_of_acl(&v1), 0);
    }
}

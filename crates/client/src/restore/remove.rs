//! Removing a directory tree that stands where a restore puts a file.
//!
//! The tree is walked through directory fds, one level open at a time per
//! depth, never following a symlink. A mount point below it is another
//! filesystem's, not the restore's to empty (as `rm -r --one-file-system`
//! would not): the tree is looked through first, and where it holds one,
//! nothing is removed and the mount point is named.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Statx, StatxFlags};
use rustix::io::Errno;

/// Why a tree was not removed (wholly).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unremoved {
    /// This path below the tree's top is a mount point; nothing was removed.
    Mount(Vec<u8>),
    /// A call failed at this path below the top (empty: the top).
    Io(Vec<u8>, Errno),
}

/// Where an entry is mounted: its mount id, or its device where the kernel
/// gives no mount id (before Linux 5.8). Only the mount id where there is
/// one: a btrfs subvolume below (snapper's `.snapshots`) has a device of
/// its own but is the same mount, and is removed like a directory.
fn mount_of(st: &Statx) -> (bool, u64, u32, u32) {
    if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 {
        (true, st.stx_mnt_id, 0, 0)
    } else {
        (false, 0, st.stx_dev_major, st.stx_dev_minor)
    }
}

fn statx_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<Statx> {
    rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
        StatxFlags::TYPE | StatxFlags::MNT_ID,
    )
}

fn open_below(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// One directory being walked: its fd, a reader of its entries, and its
/// path below the top.
struct Level {
    fd: OwnedFd,
    entries: Dir,
    path: Vec<u8>,
}

fn join(path: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = path.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Walks the directory `name` of `parent`: with `remove`, removes every
/// entry below it and then it; without, only looks for a mount point.
/// Either way stops at the first mount point below.
fn walk(parent: BorrowedFd<'_>, name: &OsStr, remove: bool) -> Result<(), Unremoved> {
    let io = |p: &[u8]| {
        let p = p.to_vec();
        move |e| Unremoved::Io(p, e)
    };
    let here = rustix::fs::statx(
        parent,
        c"",
        AtFlags::EMPTY_PATH,
        StatxFlags::TYPE | StatxFlags::MNT_ID,
    )
    .map_err(io(b""))?;
    let home = mount_of(&here);
    let top = statx_at(parent, name).map_err(io(b""))?;
    if mount_of(&top) != home {
        return Err(Unremoved::Mount(Vec::new()));
    }
    let open = |dir: BorrowedFd<'_>, n: &OsStr, path: Vec<u8>| -> Result<Level, Unremoved> {
        let fd = open_below(dir, n).map_err(io(&path))?;
        let entries = Dir::read_from(&fd).map_err(io(&path))?;
        Ok(Level { fd, entries, path })
    };
    let mut stack = vec![open(parent, name, Vec::new())?];
    while let Some(level) = stack.last_mut() {
        let Some(ent) = level.entries.read() else {
            let done = stack.pop().unwrap_or_else(|| unreachable!());
            drop(done.fd);
            if remove {
                let (dir, n) = match stack.last() {
                    Some(up) => (up.fd.as_fd(), last_name(&done.path)),
                    None => (parent, name.as_bytes()),
                };
                rustix::fs::unlinkat(dir, OsStr::from_bytes(n), AtFlags::REMOVEDIR)
                    .map_err(io(&done.path))?;
            }
            continue;
        };
        let ent = ent.map_err(io(&level.path))?;
        let n = ent.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        let n = OsStr::from_bytes(n);
        let path = join(&level.path, n.as_bytes());
        let st = statx_at(level.fd.as_fd(), n).map_err(io(&path))?;
        if mount_of(&st) != home {
            return Err(Unremoved::Mount(path));
        }
        if FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory {
            let sub = open(level.fd.as_fd(), n, path)?;
            stack.push(sub);
        } else if remove {
            rustix::fs::unlinkat(level.fd.as_fd(), n, AtFlags::empty()).map_err(io(&path))?;
        }
    }
    Ok(())
}

fn last_name(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

/// Removes the directory `name` of `parent` and everything below it, or,
/// where a mount point lies below, nothing.
pub(super) fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Unremoved> {
    walk(parent, name, false)?;
    walk(parent, name, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn removes_a_tree_without_following_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"k").unwrap();
        let t = d.path().join("t");
        let mut deep = t.clone();
        for i in 0..40 {
            deep = deep.join(format!("d{i}"));
            fs::create_dir_all(&deep).unwrap();
            fs::write(deep.join("f"), b"x").unwrap();
        }
        symlink(&outside, t.join("d0/link")).unwrap();
        fs::create_dir_all(t.join("empty/\u{1}\u{ff}")).unwrap();
        let parent = fs::File::open(d.path()).unwrap();
        remove_tree(parent.as_fd(), OsStr::new("t")).unwrap();
        assert!(!t.exists());
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"k");
        // A name that is not a directory is an error, not a removal.
        fs::write(d.path().join("file"), b"f").unwrap();
        assert!(matches!(
            remove_tree(parent.as_fd(), OsStr::new("file")),
            Err(Unremoved::Io(p, Errno::NOTDIR)) if p.is_empty()
        ));
        assert!(d.path().join("file").exists());
    }
}

//! The few btrfs operations the store needs, through the kernel's ioctls.
//!
//! Subvolume creation, read-only snapshots, subvolume deletion and range
//! cloning: no `btrfs` binary is needed on the server, and an unprivileged
//! owner may do all of them (deletion needs `user_subvol_rm_allowed`).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;

const BTRFS_SUPER_MAGIC: u64 = 0x9123_683e;
const BTRFS_IOCTL_MAGIC: u64 = 0x94;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
const VOL_NAME_MAX: usize = 4087;
const SUBVOL_NAME_MAX: usize = 4039;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; VOL_NAME_MAX + 1],
}

#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME_MAX + 1],
}

#[repr(C)]
struct CloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}

const IOC_SUBVOL_CREATE: u64 = iow(14, std::mem::size_of::<VolArgs>());
const IOC_SNAP_DESTROY: u64 = iow(15, std::mem::size_of::<VolArgs>());
const IOC_SNAP_CREATE_V2: u64 = iow(23, std::mem::size_of::<VolArgsV2>());
const IOC_CLONE_RANGE: u64 = iow(13, std::mem::size_of::<CloneRange>());
const IOC_SYNC: u64 = (BTRFS_IOCTL_MAGIC << 8) | 8;

/// Whether the filesystem holding `fd` is btrfs.
pub fn is_btrfs(fd: impl AsFd) -> bool {
    rustix::fs::fstatfs(fd)
        .map(|s| s.f_type as u64 == BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

fn name_buf<const N: usize>(name: &OsStr) -> io::Result<[u8; N]> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= N || b.contains(&0) || b.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad subvolume name",
        ));
    }
    let mut buf = [0u8; N];
    buf[..b.len()].copy_from_slice(b);
    Ok(buf)
}

fn ioctl<T>(fd: impl AsFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, correctly laid out #[repr(C)] struct for `req`.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates subvolume `name` inside directory `dir`.
pub fn create_subvolume(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let mut args = VolArgs {
        fd: 0,
        name: name_buf(name)?,
    };
    ioctl(dir, IOC_SUBVOL_CREATE, &mut args)
}

/// Snapshots subvolume `src` as `name` inside directory `dir`, read-only.
pub fn snapshot_readonly(src: impl AsFd, dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let mut args = VolArgsV2 {
        fd: src.as_fd().as_raw_fd() as i64,
        transid: 0,
        flags: BTRFS_SUBVOL_RDONLY,
        unused: [0; 4],
        name: name_buf(name)?,
    };
    ioctl(dir, IOC_SNAP_CREATE_V2, &mut args)
}

/// Deletes subvolume `name` inside directory `dir`.
pub fn delete_subvolume(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let mut args = VolArgs {
        fd: 0,
        name: name_buf(name)?,
    };
    ioctl(dir, IOC_SNAP_DESTROY, &mut args)
}

/// Forces a btrfs transaction commit.
pub fn sync(fd: impl AsFd) -> io::Result<()> {
    // SAFETY: BTRFS_IOC_SYNC takes no argument.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), IOC_SYNC as _, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Shares `len` bytes at `src_off` of `src` into `dst` at `dst_off` (FICLONERANGE).
/// Offsets and length must be multiples of the filesystem block size.
pub fn clone_range(
    src: impl AsFd,
    src_off: u64,
    len: u64,
    dst: impl AsFd,
    dst_off: u64,
) -> io::Result<()> {
    let mut args = CloneRange {
        src_fd: src.as_fd().as_raw_fd() as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    ioctl(dst, IOC_CLONE_RANGE, &mut args)
}

/// Whether `fd` is the root of a btrfs subvolume (inode 256).
pub fn is_subvolume(fd: impl AsFd) -> bool {
    is_btrfs(fd.as_fd())
        && rustix::fs::fstat(fd)
            .map(|s| s.st_ino == 256)
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(super::IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(super::IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(super::IOC_SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(super::IOC_CLONE_RANGE, 0x4020_940d);
    }
}

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
const IOC_SUBVOL_SETFLAGS: u64 = iow(26, std::mem::size_of::<u64>());
const IOC_SPACE_INFO: u64 = iowr(20, std::mem::size_of::<SpaceArgs>());
const IOC_DEV_INFO: u64 = iowr(30, std::mem::size_of::<DevInfoArgs>());
const IOC_FS_INFO: u64 = ior(31, std::mem::size_of::<FsInfoArgs>());
const IOC_SUBVOL_SYNC_WAIT: u64 = iow(65, std::mem::size_of::<SubvolWait>());

const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}

#[repr(C)]
struct SpaceArgs {
    space_slots: u64,
    total_spaces: u64,
}

#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}

#[repr(C)]
struct DevInfoArgs {
    devid: u64,
    uuid: [u8; 16],
    bytes_used: u64,
    total_bytes: u64,
    fsid: [u8; 16],
    unused: [u64; 377],
    path: [u8; 1024],
}

#[repr(C)]
struct SubvolWait {
    subvolid: u64,
    mode: u32,
    count: u32,
}

const SUBVOL_SYNC_COUNT: u32 = 2;

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

/// Makes the subvolume `fd` writable again (its owner may; deleting a
/// read-only snapshot without privileges needs this first).
pub fn clear_read_only(fd: impl AsFd) -> io::Result<()> {
    let mut flags: u64 = 0;
    ioctl(fd, IOC_SUBVOL_SETFLAGS, &mut flags)
}

/// Makes the subvolume `fd` read-only (again).
pub fn set_read_only(fd: impl AsFd) -> io::Result<()> {
    let mut flags: u64 = BTRFS_SUBVOL_RDONLY;
    ioctl(fd, IOC_SUBVOL_SETFLAGS, &mut flags)
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

/// Block group type and profile bits of a space-info entry (`BTRFS_BLOCK_GROUP_*`).
pub mod flags {
    /// Data block groups.
    pub const DATA: u64 = 1 << 0;
    /// System block groups (chunk tree).
    pub const SYSTEM: u64 = 1 << 1;
    /// Metadata block groups.
    pub const METADATA: u64 = 1 << 2;
    /// RAID1: two copies.
    pub const RAID1: u64 = 1 << 4;
    /// DUP: two copies on one device.
    pub const DUP: u64 = 1 << 5;
    /// RAID10: two copies.
    pub const RAID10: u64 = 1 << 6;
    /// RAID1C3: three copies.
    pub const RAID1C3: u64 = 1 << 9;
    /// RAID1C4: four copies.
    pub const RAID1C4: u64 = 1 << 10;
    /// The global block reserve (metadata the filesystem keeps back for itself).
    pub const GLOBAL_RSV: u64 = 1 << 49;
}

/// One line of `btrfs filesystem df`: allocated chunks of one type and what is used in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceInfo {
    /// Block group type and profile ([`flags`]).
    pub flags: u64,
    /// Bytes allocated to chunks of this kind (logical, after the profile's copies).
    pub total: u64,
    /// Bytes used inside those chunks.
    pub used: u64,
}

/// The space-info table of the filesystem holding `fd` (`BTRFS_IOC_SPACE_INFO`).
pub fn space_info(fd: impl AsFd) -> io::Result<Vec<SpaceInfo>> {
    let fd = fd.as_fd();
    let mut head = SpaceArgs {
        space_slots: 0,
        total_spaces: 0,
    };
    ioctl(fd, IOC_SPACE_INFO, &mut head)?;
    let n = head.total_spaces.min(64) as usize;
    // The kernel writes the header followed by `n` entries into one buffer.
    let words = 2 + 3 * n;
    let mut buf = vec![0u64; words];
    buf[0] = n as u64;
    // SAFETY: buf is a live u64 buffer of the size the kernel will fill for `n` slots.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), IOC_SPACE_INFO as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = (buf[1] as usize).min(n);
    Ok((0..got)
        .map(|i| SpaceInfo {
            flags: buf[2 + 3 * i],
            total: buf[3 + 3 * i],
            used: buf[4 + 3 * i],
        })
        .collect())
}

/// Size and allocated bytes of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceUsage {
    /// Device size.
    pub size: u64,
    /// Bytes of it allocated to chunks.
    pub allocated: u64,
}

/// Size and allocation of every device of the filesystem holding `fd`
/// (`BTRFS_IOC_FS_INFO` + `BTRFS_IOC_DEV_INFO`; neither needs privileges).
pub fn devices(fd: impl AsFd) -> io::Result<Vec<DeviceUsage>> {
    let fd = fd.as_fd();
    // SAFETY: plain data; all-zero is a valid value.
    let mut fsi: Box<FsInfoArgs> = Box::new(unsafe { std::mem::zeroed() });
    ioctl(fd, IOC_FS_INFO, &mut *fsi)?;
    let mut out = vec![];
    for devid in 1..=fsi.max_id.min(1 << 16) {
        // SAFETY: plain data; all-zero is a valid value.
        let mut dev: Box<DevInfoArgs> = Box::new(unsafe { std::mem::zeroed() });
        dev.devid = devid;
        match ioctl(fd, IOC_DEV_INFO, &mut *dev) {
            Ok(()) => out.push(DeviceUsage {
                size: dev.total_bytes,
                allocated: dev.bytes_used,
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Number of deleted subvolumes still waiting for the cleaner
/// (`BTRFS_IOC_SUBVOL_SYNC_WAIT` in count mode, Linux 6.13+).
pub fn deleted_subvolumes_pending(fd: impl AsFd) -> io::Result<u32> {
    let mut args = SubvolWait {
        subvolid: 0,
        mode: SUBVOL_SYNC_COUNT,
        count: 0,
    };
    ioctl(fd, IOC_SUBVOL_SYNC_WAIT, &mut args)?;
    Ok(args.count)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(super::IOC_SPACE_INFO, 0xc010_9414);
        assert_eq!(super::IOC_SUBVOL_SETFLAGS, 0x4008_941a);
        assert_eq!(super::IOC_DEV_INFO, 0xd000_941e);
        assert_eq!(super::IOC_FS_INFO, 0x8400_941f);
        assert_eq!(super::IOC_SUBVOL_SYNC_WAIT, 0x4010_9441);
        assert_eq!(std::mem::size_of::<super::FsInfoArgs>(), 1024);
        assert_eq!(std::mem::size_of::<super::DevInfoArgs>(), 4096);
        assert_eq!(super::IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(super::IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(super::IOC_SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(super::IOC_CLONE_RANGE, 0x4020_940d);
    }
}

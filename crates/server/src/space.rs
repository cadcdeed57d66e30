//! Free space of the store as the filesystem itself counts it.
//!
//! `statvfs` on btrfs is a guess: it can show free space while every metadata
//! chunk is full and writes fail with "No space left on device". On btrfs we
//! read the allocation tables instead (`BTRFS_IOC_SPACE_INFO`, `FS_INFO`,
//! `DEV_INFO`): what is free inside data chunks plus unallocated device space,
//! and the same for metadata (less the global reserve). The store is as free as
//! the scarcer of the two. Other filesystems use `statvfs`.

use std::io;
use std::os::fd::AsFd;

use crate::btrfs::{self, flags, DeviceUsage, SpaceInfo};

/// How much room the store has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Space {
    /// Bytes the filesystem can hold for files (data capacity).
    pub size: u64,
    /// Bytes of file data that can still be written.
    pub free: u64,
    /// Free percentage of data capacity.
    pub data_percent: f64,
    /// Free percentage of metadata capacity (btrfs only).
    pub metadata_percent: Option<f64>,
    /// Which figures these are: `"btrfs"` or `"statvfs"`.
    pub source: &'static str,
}

impl Space {
    /// The store's free percentage: the scarcer of data and metadata.
    pub fn percent_free(&self) -> f64 {
        match self.metadata_percent {
            Some(m) => m.min(self.data_percent),
            None => self.data_percent,
        }
    }
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}% free (data {} MiB of {} MiB free",
            self.percent_free(),
            self.free >> 20,
            self.size >> 20
        )?;
        if let Some(m) = self.metadata_percent {
            write!(f, ", metadata {m:.1}% free")?;
        }
        write!(f, ", {})", self.source)
    }
}

/// Copies a block group profile keeps of each byte.
fn copies(f: u64) -> u64 {
    if f & flags::RAID1C4 != 0 {
        4
    } else if f & flags::RAID1C3 != 0 {
        3
    } else if f & (flags::DUP | flags::RAID1 | flags::RAID10) != 0 {
        2
    } else {
        1
    }
}

fn percent(free: u64, cap: u64) -> f64 {
    if cap == 0 {
        0.0
    } else {
        free as f64 * 100.0 / cap as f64
    }
}

/// Computes [`Space`] from btrfs's own tables (a pure function, so it is tested
/// against figures of full and empty filesystems).
pub fn from_btrfs(infos: &[SpaceInfo], devices: &[DeviceUsage]) -> Space {
    let unallocated: u64 = devices
        .iter()
        .map(|d| d.size.saturating_sub(d.allocated))
        .sum();
    let reserve: u64 = infos
        .iter()
        .filter(|i| i.flags & flags::GLOBAL_RSV != 0)
        .map(|i| i.total)
        .sum();
    let kind = |want: u64, not: u64| {
        infos
            .iter()
            .filter(|i| {
                i.flags & flags::GLOBAL_RSV == 0 && i.flags & want != 0 && i.flags & not == 0
            })
            .fold((0u64, 0u64, 1u64), |(t, u, c), i| {
                (t + i.total, u + i.used, c.max(copies(i.flags)))
            })
    };
    let (dt, du, dc) = kind(flags::DATA, 0);
    let mixed = infos
        .iter()
        .any(|i| i.flags & flags::DATA != 0 && i.flags & flags::METADATA != 0);
    let data_cap = dt + unallocated / dc;
    let mut data_free = dt.saturating_sub(du) + unallocated / dc;
    let metadata_percent = if mixed {
        data_free = data_free.saturating_sub(reserve);
        None
    } else {
        let (mt, mu, mc) = kind(flags::METADATA, flags::DATA);
        let cap = mt + unallocated / mc;
        let free = mt.saturating_sub(mu).saturating_sub(reserve) + unallocated / mc;
        Some(percent(free, cap))
    };
    Space {
        size: data_cap,
        free: data_free,
        data_percent: percent(data_free, data_cap),
        metadata_percent,
        source: "btrfs",
    }
}

/// Measures the filesystem holding `fd`.
pub fn measure(fd: impl AsFd) -> io::Result<Space> {
    let fd = fd.as_fd();
    if btrfs::is_btrfs(fd) {
        if let (Ok(infos), Ok(devs)) = (btrfs::space_info(fd), btrfs::devices(fd)) {
            if !devs.is_empty() {
                return Ok(from_btrfs(&infos, &devs));
            }
        }
    }
    let st = rustix::fs::fstatvfs(fd)?;
    let size = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    Ok(Space {
        size,
        free,
        data_percent: percent(free, size),
        metadata_percent: None,
        source: "statvfs",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn info(f: u64, total: u64, used: u64) -> SpaceInfo {
        SpaceInfo {
            flags: f,
            total: total * MIB,
            used: used * MIB,
        }
    }

    fn dev(size: u64, allocated: u64) -> DeviceUsage {
        DeviceUsage {
            size: size * MIB,
            allocated: allocated * MIB,
        }
    }

    #[test]
    fn unallocated_space_counts_as_free_data() {
        // 1000 MiB device: 200 MiB data chunks (100 used), 2x50 MiB DUP metadata, 8 MiB system.
        let infos = [
            info(flags::DATA, 200, 100),
            info(flags::METADATA | flags::DUP, 50, 5),
            info(flags::SYSTEM | flags::DUP, 8, 0),
            info(flags::GLOBAL_RSV, 5, 0),
        ];
        let s = from_btrfs(&infos, &[dev(1000, 316)]);
        assert_eq!(s.size, (200 + 684) * MIB);
        assert_eq!(s.free, (100 + 684) * MIB);
        assert!(s.metadata_percent.unwrap() > 90.0);
        assert!((s.percent_free() - s.data_percent).abs() < 1e-9);
    }

    #[test]
    fn full_metadata_with_free_data_is_low_space() {
        // df would show 300 MiB free, but metadata cannot grow: writes would fail.
        let infos = [
            info(flags::DATA, 900, 600),
            info(flags::METADATA | flags::DUP, 48, 44),
            info(flags::GLOBAL_RSV, 4, 0),
        ];
        let s = from_btrfs(&infos, &[dev(1000, 996)]);
        assert!(s.data_percent > 30.0);
        assert!(s.percent_free() < 5.0, "{s}");
    }

    #[test]
    fn mixed_block_groups_and_raid1_data() {
        let infos = [
            info(flags::DATA | flags::METADATA, 400, 300),
            info(flags::GLOBAL_RSV, 10, 0),
        ];
        let s = from_btrfs(&infos, &[dev(512, 412)]);
        assert_eq!(s.metadata_percent, None);
        assert_eq!(s.free, (100 + 100 - 10) * MIB);
        let infos = [info(flags::DATA | flags::RAID1, 100, 50)];
        let s = from_btrfs(&infos, &[dev(500, 200), dev(500, 200)]);
        assert_eq!(s.free, (50 + 300) * MIB);
        assert_eq!(s.size, (100 + 300) * MIB);
    }
}

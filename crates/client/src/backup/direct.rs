//! Reading large files with direct I/O (`O_DIRECT`): the filesystem reads
//! straight into the segment's buffer, with no copy out of the page cache
//! and without filling the page cache with the whole backup.
//!
//! Measured on this project's machine (2 cores, btrfs on a loop device): four
//! 512 MiB files read cold at once, `dd bs=4M`, took 0.95-0.99 s of system
//! CPU through the page cache and 0.14-0.15 s with `iflag=direct`; a backup of
//! appends to them (W5) spent a fifth of its samples in that copy.
//!
//! Only for files of [`DIRECT_MIN`] and more, only where the filesystem
//! reports its alignments (`statx` `STATX_DIOALIGN`, Linux 6.1+: ext4, XFS,
//! f2fs) or is btrfs (which does not, and needs its sector size), with
//! alignments of at most [`MAX_ALIGN`], and only for reads that start
//! aligned: any other read, and any read direct I/O refuses (`EINVAL`), goes
//! through the page cache as before, for the rest of the file. The bytes
//! are the same either way: the kernel writes back dirty pages of the range
//! before a direct read. Other filesystems (NFS, FUSE...) are left alone.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicU64;

use rustix::fs::{fcntl_getfl, fcntl_setfl, statx, AtFlags, OFlags, StatxFlags};

/// Bytes this process has read with direct I/O (for tests).
pub(super) static DIRECT_BYTES: AtomicU64 = AtomicU64::new(0);

/// Files at least this long are read with direct I/O where they can be.
pub(super) const DIRECT_MIN: u64 = 16 << 20;
/// Largest memory and file-offset alignment direct I/O is used with; a
/// segment's buffer has room for this much padding in front.
pub(super) const MAX_ALIGN: usize = 4096;

/// `O_DIRECT` is on for a file; reads at multiples of `align` into memory
/// aligned to it bypass the page cache.
#[derive(Debug)]
pub(super) struct Direct {
    align: usize,
}

impl Direct {
    /// Turns `O_DIRECT` on for `file` (`size` bytes long) if it is worth it
    /// and its filesystem allows it; `None` leaves the file as it was.
    pub(super) fn enable(file: &File, size: u64) -> Option<Direct> {
        if size < DIRECT_MIN {
            return None;
        }
        let align = dio_align(file)?;
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return None;
        }
        let flags = fcntl_getfl(file).ok()?;
        fcntl_setfl(file, flags | OFlags::DIRECT).ok()?;
        Some(Direct { align })
    }

    /// Back to the page cache for the rest of the file.
    pub(super) fn disable(self, file: &File) -> io::Result<()> {
        let flags = fcntl_getfl(file)?;
        fcntl_setfl(file, flags.difference(OFlags::DIRECT))?;
        Ok(())
    }

    /// Bytes to leave free in front of what `buf` is to hold, so that the
    /// byte `at` bytes later lands on an aligned address (less than the
    /// alignment; the buffer must not grow beyond its capacity meanwhile).
    pub(super) fn pad(&self, buf: &[u8], at: usize) -> usize {
        let p = buf.as_ptr() as usize + at;
        p.next_multiple_of(self.align) - p
    }

    /// Whether a read may start at file offset `offset` into memory at `addr`.
    pub(super) fn can_read(&self, offset: u64, addr: usize) -> bool {
        offset.is_multiple_of(self.align as u64) && addr.is_multiple_of(self.align)
    }

    /// `want` rounded down to the alignment (a read that does not reach the
    /// end of the file must end aligned for the next one to start so).
    pub(super) fn round_down(&self, want: usize) -> usize {
        want / self.align * self.align
    }

    /// `want` rounded up to the alignment (the read that reaches the end of
    /// the file: the kernel stops there).
    pub(super) fn round_up(&self, want: usize) -> usize {
        want.next_multiple_of(self.align)
    }
}

/// The alignment direct reads of `file` need (memory and file offsets), as
/// `statx` reports it; btrfs (up to Linux 6.18 at least) does not report
/// it, and needs its sector size (`f_bsize`). `None`: no direct I/O.
fn dio_align(file: &File) -> Option<usize> {
    const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;
    let st = statx(file, c"", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
    if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN) {
        let offset = match st.stx_dio_read_offset_align {
            0 => st.stx_dio_offset_align,
            n => n,
        } as usize;
        let mem = st.stx_dio_mem_align as usize;
        return (offset != 0 && mem != 0).then(|| offset.max(mem));
    }
    let fs = rustix::fs::fstatfs(file).ok()?;
    (fs.f_type as u64 == BTRFS_SUPER_MAGIC).then_some(fs.f_bsize as usize)
}

/// Appends to `buf` up to `len` bytes of `file` from `offset` on (fewer at
/// its end), reading into its spare capacity (grown first if it holds less:
/// then the data may no longer be where [`Direct::pad`] aligned it).
/// Returns how many it appended.
pub(super) fn read_at_into(
    file: &File,
    mut offset: u64,
    len: usize,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    buf.reserve(len);
    let mut got = 0;
    while got < len {
        let spare = &mut buf.spare_capacity_mut()[..len - got];
        let n = match rustix::io::pread(file, spare, offset) {
            Ok((read, _)) => read.len(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        // SAFETY: pread initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        got += n;
        offset += n as u64;
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::TempDir, Vec<u8>, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
        File::create(&p).unwrap().write_all(&data).unwrap();
        (dir, data, File::open(&p).unwrap())
    }

    #[test]
    fn reads_at_an_offset_into_spare_capacity_and_stops_at_the_end() {
        let (_d, data, f) = file_of(100_000);
        let mut buf = Vec::with_capacity(200_000);
        buf.extend_from_slice(b"head");
        assert_eq!(read_at_into(&f, 5000, 10_000, &mut buf).unwrap(), 10_000);
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &data[5000..15_000]);
        // At the end: what is there.
        assert_eq!(read_at_into(&f, 99_000, 50_000, &mut buf).unwrap(), 1000);
        assert_eq!(&buf[10_004..], &data[99_000..]);
        // A buffer with too little room grows.
        let mut small = Vec::with_capacity(10);
        assert_eq!(read_at_into(&f, 0, 11, &mut small).unwrap(), 11);
        assert_eq!(small, &data[..11]);
    }

    #[test]
    fn small_files_are_left_to_the_page_cache() {
        let (_d, _data, f) = file_of(4096);
        assert!(Direct::enable(&f, 4096).is_none());
        let flags = fcntl_getfl(&f).unwrap();
        assert!(!flags.contains(OFlags::DIRECT));
    }

    /// Where the filesystem under the temporary directory does direct I/O
    /// (ext4, btrfs, tmpfs since Linux 6.6), aligned reads return the
    /// file's bytes, the end included, and `disable` turns it off again.
    #[test]
    fn direct_reads_return_the_files_bytes() {
        let len = (DIRECT_MIN as usize) + 12_345;
        let (_d, data, f) = file_of(len);
        let Some(d) = Direct::enable(&f, len as u64) else {
            // CI's machine has it (ext4 or tmpfs under /tmp): there it must work.
            assert!(
                std::env::var_os("CI").is_none(),
                "direct I/O not available under the temporary directory"
            );
            eprintln!("SKIPPED: direct I/O not available under the temporary directory");
            return;
        };
        assert!(fcntl_getfl(&f).unwrap().contains(OFlags::DIRECT));
        let mut buf: Vec<u8> = Vec::with_capacity(len + 3 * MAX_ALIGN);
        let pad = d.pad(&buf, 3);
        buf.resize(pad + 3, 0);
        assert!(d.can_read(0, buf.as_ptr() as usize + buf.len()));
        let first = d.round_down(len / 2 + 1);
        assert_eq!(read_at_into(&f, 0, first, &mut buf).unwrap(), first);
        assert!(d.can_read(first as u64, buf.as_ptr() as usize + buf.len()));
        let rest = d.round_up(len - first);
        assert_eq!(
            read_at_into(&f, first as u64, rest, &mut buf).unwrap(),
            len - first
        );
        assert!(
            buf[pad + 3..] == data[..],
            "direct reads differ from the file"
        );
        d.disable(&f).unwrap();
        assert!(!fcntl_getfl(&f).unwrap().contains(OFlags::DIRECT));
    }
}

//! Small OS helpers both sides use: the hole-keeping writer, local time,
//! reading extended attributes and replacing a file atomically.
//!
//! They live here, in the one crate client and server share, so that each
//! exists once. Nothing here resolves a path a local user could change
//! except where a caller hands one in on purpose.

pub mod atomic;
pub mod sorted_dir;
pub mod sparse;
pub mod time;
pub mod xattr;

pub use atomic::{write_atomic, write_atomic_at};
pub use sparse::{is_zero, write_sparse_at, SparseWriter, SPARSE_BLOCK};
pub use time::{localtime, LocalTime};
pub use xattr::{xattr_names, xattr_value, XattrOf};

/// Keeps freed multi-MiB buffers (frames, chunks) in the heap instead of
/// returning them to the kernel at once: otherwise glibc hands each back
/// (a fresh `mmap`, or the heap trimmed and grown again), and its page
/// faults took a third of the server's time in a large-file backup and
/// about as much of a restoring client's. For the processes that move file
/// data one chunk at a time (the server; a restore); the backup client
/// reuses its buffers from a budgeted pool instead.
pub fn keep_freed_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes glibc's allocator; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// Tunes glibc's allocator for the backup client, whose delta threads
/// allocate a buffer sized to each small file in a dozen threads: at most
/// `arenas` arenas (otherwise up to eight per core, each keeping the blocks
/// freed in it), and blocks of 256 KiB or more mapped on their own, so that
/// freeing one gives it back (the buffer pool keeps the segment-sized ones
/// it reuses). Peak RSS of a first backup of `/usr/share` into a local
/// store: 65-69 MiB without either, 57-59 MiB with two arenas, 51-53 MiB
/// with both, at the same speed.
pub fn bounded_heap(arenas: usize) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes glibc's allocator; any value is valid.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas.clamp(1, 64) as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = arenas;
}

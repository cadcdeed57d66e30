//! Hard caps on everything a peer can make us allocate.
//!
//! Every length and count read from the wire is checked against these before
//! memory is reserved for it.

/// Largest frame payload accepted, in bytes.
pub const MAX_FRAME: usize = 20 << 20;
/// Largest raw (decompressed) data chunk carried in one message.
pub const MAX_CHUNK: usize = 10 << 20;
/// Size of new-file segments the client diffs independently.
pub const SEGMENT: usize = 8 << 20;
/// Longest path, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest single path component, in bytes.
pub const MAX_NAME: usize = 255;
/// Most entries in one batch.
pub const MAX_BATCH: usize = 1024;
/// Most files that may be announced as needing data but not yet finished.
pub const MAX_PENDING: usize = 8192;
/// Files a restoring client may ask for beyond the one being sent
/// ([`crate::ClientMsg::ReadFile`] sent ahead; see the session's `Reads`).
pub const MAX_READS_AHEAD: usize = 1024;
/// Most bytes of entries (see [`crate::Entry::buffer_cost`]) the server may have
/// to hold behind a file whose transfer is not finished yet; the client's flow
/// control keeps below it and the server refuses a client that does not.
pub const MAX_BUFFERED_BYTES: usize = 8 << 20;

/// The one rule for entries waiting behind unfinished transfers: a window of
/// `entries` entries costing `bytes` (see [`crate::Entry::buffer_cost`]) is
/// within the caps. The client announces a batch only if the window with it
/// is; the server refuses a client whose window is not ([`MAX_PENDING`],
/// [`MAX_BUFFERED_BYTES`]).
pub fn window_within_caps(entries: usize, bytes: usize) -> bool {
    entries < MAX_PENDING && bytes <= MAX_BUFFERED_BYTES
}
/// Most extended attributes per entry.
pub const MAX_XATTRS: usize = 256;
/// Longest xattr name.
pub const MAX_XATTR_NAME: usize = 255;
/// Largest xattr value (Linux's own limit is 64 KiB).
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Largest total of xattr names and values of one entry.
pub const MAX_XATTR_TOTAL: usize = 1 << 20;
/// Most bytes of file one data message may make (its literal bytes and
/// COPY ops together): an honest client's segment covers at most [`MAX_CHUNK`]
/// bytes of its file; without a cap, a few KB of COPY ops against a stored
/// copy made the server copy up to a file's size (16 TiB) in one message,
/// hours of I/O no deadline checks.
pub const MAX_MESSAGE_OUTPUT: u64 = 64 << 20;
/// Largest serialized signature.
pub const MAX_SIGNATURE: usize = 16 << 20;
/// Longest free-text message (errors, warnings).
pub const MAX_TEXT: usize = 4096;
/// Longest message of a `BackupDone` (why no snapshot, and the server's
/// warnings, at most about 2 KiB of them plus the last one).
pub const MAX_BACKUP_MESSAGE: usize = 64 << 10;
/// Most snapshot names in one listing.
pub const MAX_SNAPSHOTS: usize = 100_000;
/// Largest file size accepted (16 TiB).
pub const MAX_FILE_SIZE: u64 = 16 << 40;
/// Smallest new file the server offers to clone from a stored file with the
/// same content (see [`crate::Need::twin`]): below it, hashing the file
/// first costs more than sending it.
pub const TWIN_MIN: u64 = 1 << 20;
/// Most bytes of paths the server's index of stored content (for cloning
/// moved and copied files) holds; files beyond it are not offered.
pub const MAX_TWIN_INDEX_BYTES: usize = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// The window's caps: fewer than MAX_PENDING entries, at most
    /// MAX_BUFFERED_BYTES of them; client and server share this rule.
    #[test]
    fn window_caps_are_exact() {
        assert!(window_within_caps(0, 0));
        assert!(window_within_caps(MAX_PENDING - 1, MAX_BUFFERED_BYTES));
        assert!(!window_within_caps(MAX_PENDING, 0));
        assert!(!window_within_caps(0, MAX_BUFFERED_BYTES + 1));
    }
}

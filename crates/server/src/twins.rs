//! Moved and copied files: an index of the host's stored content, so a new
//! file whose content `current` already holds is cloned instead of sent.
//!
//! The index is built from the host's last manifest, once per backup and
//! only when the first candidate arrives (a new file of at least
//! [`TWIN_MIN`] bytes): content hash → (size, client path) for regular files
//! of at least that size, and the set of their sizes. It holds at most
//! [`MAX_TWIN_INDEX_BYTES`] of paths; the files beyond are not indexed (a note
//! says so). A client's claim ("this new file has BLAKE3 h") is only ever
//! answered from this host's own tree, and the clone is hashed again before
//! it is committed, so a claim that is false, or a stored file that no longer
//! matches its manifest, gets a file that fails verification and is sent
//! instead.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use byteback_delta::FileHasher;
use byteback_protocol::limits::{MAX_TWIN_INDEX_BYTES, TWIN_MIN};
use byteback_protocol::Kind;

use crate::fsops;
use crate::manifest::ManifestReader;

/// Bytes counted per indexed file besides its path (hash, size, map slots).
const ENTRY_COST: usize = 96;
/// Bytes read at a time when copying or hashing.
const IO_CHUNK: usize = 1 << 20;

/// Stored files by content, from the last manifest.
#[derive(Debug, Default)]
pub struct TwinIndex {
    by_hash: HashMap<[u8; 32], (u64, Vec<u8>)>,
    sizes: HashSet<u64>,
    bytes: usize,
    /// Files left out because the index was full.
    pub left_out: u64,
}

impl TwinIndex {
    /// Reads the manifest `file` (at `path`, for messages) and indexes its
    /// regular files of at least [`TWIN_MIN`] bytes.
    pub fn load(file: File, path: &Path) -> io::Result<TwinIndex> {
        let mut index = TwinIndex::default();
        let mut reader = ManifestReader::new(file, path)?;
        while let Some(me) = reader.next_entry()? {
            if let Kind::File { size } = me.entry.kind {
                if size >= TWIN_MIN {
                    index.insert(me.hash, size, me.entry.path);
                }
            }
        }
        Ok(index)
    }

    /// Adds a stored file; false (and counted in `left_out`) when full.
    pub fn insert(&mut self, hash: [u8; 32], size: u64, path: Vec<u8>) -> bool {
        if self.by_hash.contains_key(&hash) {
            return true;
        }
        let cost = ENTRY_COST + path.len();
        if self.bytes + cost > MAX_TWIN_INDEX_BYTES {
            self.left_out += 1;
            return false;
        }
        self.bytes += cost;
        self.sizes.insert(size);
        self.by_hash.insert(hash, (size, path));
        true
    }

    /// Whether a stored file of exactly `size` bytes is indexed.
    pub fn has_size(&self, size: u64) -> bool {
        self.sizes.contains(&size)
    }

    /// The client path of a stored file with content `hash` and `size`.
    pub fn find(&self, hash: &[u8; 32], size: u64) -> Option<&[u8]> {
        match self.by_hash.get(hash) {
            Some((s, path)) if *s == size => Some(path),
            _ => None,
        }
    }

    /// Number of files indexed.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// Makes the empty file `out` a copy of `src`'s `size` bytes: shared extents
/// (FICLONERANGE to the end of `src`) when `clone` is allowed and the
/// filesystem can, else copied. Returns the BLAKE3 of what `out` then holds
/// (a clone's read back from `out` itself, so it is verified like any
/// received file; a copy's from the bytes written, which `out` holds since
/// it is emptied first: blocks of zeros skipped read back as zeros), whether
/// extents were shared, and the bytes a copy left as holes (its blocks of
/// zeros: a sparse file stays sparse).
pub fn copy_into(
    src: &File,
    out: &File,
    size: u64,
    clone: bool,
) -> io::Result<([u8; 32], bool, u64)> {
    if clone && crate::btrfs::clone_range(src.as_fd(), 0, 0, out.as_fd(), 0).is_ok() {
        return Ok((hash_of(out, size)?, true, 0));
    }
    // Emptied first (a clone may have failed halfway): the zeros skipped
    // as holes must read back as zeros.
    out.set_len(0)?;
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; IO_CHUNK];
    let mut off = 0u64;
    let mut holes = 0u64;
    while off < size {
        crate::timed::within_backup_deadline()?;
        let want = IO_CHUNK.min((size - off) as usize);
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        holes += byteback_protocol::os::write_sparse_at(out, off, &buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    if off == size && fsops_len(out)? < size {
        // A hole at the end: the length is set, not written.
        out.set_len(size)?;
    }
    if off < size || fsops_len(out)? != size {
        // Shorter than announced: whatever it hashes to, it is no match.
        return Ok(([0; 32], false, holes));
    }
    Ok((h.finish(), false, holes))
}

fn fsops_len(f: &File) -> io::Result<u64> {
    Ok(f.metadata()?.len())
}

/// BLAKE3 of the first `size` bytes of `f`, and zeros if `f` is not exactly
/// that long.
fn hash_of(f: &File, size: u64) -> io::Result<[u8; 32]> {
    if fsops_len(f)? != size {
        return Ok([0; 32]);
    }
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; IO_CHUNK];
    let mut off = 0u64;
    while off < size {
        crate::timed::within_backup_deadline()?;
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            return Ok([0; 32]);
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finish())
}

/// Opens the stored file at client path `path` beneath `current` (never
/// through a symlink, only a regular file) if it is `size` bytes long.
pub fn open_stored(current: impl AsFd, path: &[u8], size: u64) -> Option<File> {
    let f = fsops::open_file(current, &crate::store::disk_path(path)).ok()?;
    (fsops_len(&f).ok()? == size).then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_bounded_and_matches_hash_and_size() {
        let mut ix = TwinIndex::default();
        assert!(ix.insert([1; 32], 5 << 20, b"a/big".to_vec()));
        assert!(ix.has_size(5 << 20));
        assert!(!ix.has_size(5 << 20 | 1));
        assert_eq!(ix.find(&[1; 32], 5 << 20), Some(&b"a/big"[..]));
        assert_eq!(ix.find(&[1; 32], 4 << 20), None);
        assert_eq!(ix.find(&[2; 32], 5 << 20), None);
        let long = vec![b'x'; 4000];
        let mut i = 0u32;
        while ix.insert(blake3_of(i), 2 << 20, long.clone()) {
            i += 1;
        }
        assert!(ix.bytes <= MAX_TWIN_INDEX_BYTES);
        assert_eq!(ix.left_out, 1);
        assert_eq!(ix.len(), i as usize + 1);
    }

    fn blake3_of(i: u32) -> [u8; 32] {
        byteback_delta::hash_bytes(&i.to_le_bytes())
    }

    #[test]
    fn a_copy_is_hashed_from_what_was_written() {
        let src = tempfile::tempfile().expect("tmp");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        src.write_all_at(&data, 0).expect("write");
        let out = tempfile::tempfile().expect("tmp");
        let (h, shared, holes) = copy_into(&src, &out, data.len() as u64, false).expect("copy");
        assert!(!shared);
        assert_eq!(holes, 0);
        assert_eq!(h, byteback_delta::hash_bytes(&data));
        // Announced longer than the stored file: no match.
        let out = tempfile::tempfile().expect("tmp");
        let (h, _, _) = copy_into(&src, &out, data.len() as u64 + 1, false).expect("copy");
        assert_eq!(h, [0; 32]);
    }

    /// A sparse file's copy (where the store cannot clone) keeps its holes,
    /// a trailing one included, and says how many bytes they are.
    #[test]
    fn a_copy_of_a_sparse_file_keeps_its_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tmp");
        let src = File::create(dir.path().join("src")).expect("create");
        let size = 64u64 << 20;
        src.set_len(size).expect("len");
        src.write_all_at(&[7u8; 5000], 10 << 20).expect("write");
        let src = File::open(dir.path().join("src")).expect("open");
        let out = File::create(dir.path().join("out")).expect("create");
        let (h, shared, holes) = copy_into(&src, &out, size, false).expect("copy");
        assert!(!shared);
        let mut want = vec![0u8; size as usize];
        want[10 << 20..(10 << 20) + 5000].fill(7);
        assert_eq!(h, byteback_delta::hash_bytes(&want));
        assert_eq!(out.metadata().expect("stat").len(), size);
        // Two 4 KiB blocks hold the data; the rest are holes.
        assert_eq!(holes, size - 2 * 4096);
        assert!(out.metadata().expect("stat").blocks() * 512 <= 64 << 10);
    }
}

//! Writing file content while keeping holes: whole zero blocks are skipped
//! instead of written, on the backup server's new files and on restore.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

/// Size of the blocks checked for zeros (aligned to their file offset).
pub const SPARSE_BLOCK: usize = 4096;

/// Writes `data` at offset `pos` of `f` without moving its position,
/// leaving a hole for every whole, aligned [`SPARSE_BLOCK`] of zeros in it
/// and writing each run of other bytes in one call. The caller guarantees
/// the skipped range already reads as zeros (a new or truncated file), and
/// that `f` is not open with `O_APPEND` (which would ignore `pos`). Returns
/// the bytes left as holes.
pub fn write_sparse_at(f: &File, pos: u64, data: &[u8]) -> io::Result<u64> {
    let block = SPARSE_BLOCK as u64;
    let mut i = 0usize;
    let mut run_start: Option<usize> = None;
    let mut holes = 0u64;
    while i < data.len() {
        let off = pos + i as u64;
        let n = ((block - off % block) as usize).min(data.len() - i);
        let piece = &data[i..i + n];
        if n == SPARSE_BLOCK && is_zero(piece) {
            if let Some(s) = run_start.take() {
                f.write_all_at(&data[s..i], pos + s as u64)?;
            }
            holes += block;
        } else if run_start.is_none() {
            run_start = Some(i);
        }
        i += n;
    }
    if let Some(s) = run_start {
        f.write_all_at(&data[s..], pos + s as u64)?;
    }
    Ok(holes)
}

/// Writes a file's content from offset 0 in pieces of any length, keeping
/// holes.
///
/// A block (aligned to its file offset) that is all zeros is skipped, even
/// when it arrives split over several calls; [`SparseWriter::finish`] sets
/// the final length so trailing holes exist. A file that is not empty is
/// truncated to 0 first, so skipped blocks read as zeros even if it held
/// data before.
/// Writes are positional (`pwrite`), so the file must not be open with
/// `O_APPEND`.
pub struct SparseWriter {
    file: File,
    /// Bytes of the current, incomplete block (always fewer than a block).
    partial: Vec<u8>,
    /// File offset where `partial` starts: the number of bytes handled so far
    /// excluding `partial`; always block-aligned.
    offset: u64,
    /// Whether the file has been truncated to 0 yet.
    started: bool,
}

impl SparseWriter {
    /// Wraps `file`, which will hold exactly the bytes written.
    pub fn new(file: File) -> Self {
        SparseWriter {
            file,
            partial: Vec::with_capacity(SPARSE_BLOCK),
            offset: 0,
            started: false,
        }
    }

    /// Appends `data` (any length, any alignment).
    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.start()?;
        if !self.partial.is_empty() {
            let take = (SPARSE_BLOCK - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < SPARSE_BLOCK {
                return Ok(());
            }
            write_sparse_at(&self.file, self.offset, &self.partial)?;
            self.offset += SPARSE_BLOCK as u64;
            self.partial.clear();
        }
        let whole = data.len() - data.len() % SPARSE_BLOCK;
        write_sparse_at(&self.file, self.offset, &data[..whole])?;
        self.offset += whole as u64;
        self.partial.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Writes the last partial block, sets the final length and returns the
    /// file, positioned at its end.
    pub fn finish(mut self) -> io::Result<File> {
        self.start()?;
        if !is_zero(&self.partial) {
            self.file.write_all_at(&self.partial, self.offset)?;
        }
        let len = self.offset + self.partial.len() as u64;
        // Only where a hole at the end left it short: btrfs truncates (and
        // locks and updates the inode) even to the length a file has.
        if self.file.metadata()?.len() != len {
            self.file.set_len(len)?;
        }
        self.file.seek(SeekFrom::Start(len))?;
        Ok(self.file)
    }

    /// Empties the file once, before anything is written, unless it is
    /// empty already (a new file): on btrfs, truncating to 0 marks the file
    /// to be written back when it is closed, which for a restore of many
    /// small files cost a writeback per file (a seventh of the restoring
    /// client's samples, and as much again for the truncation).
    fn start(&mut self) -> io::Result<()> {
        if !self.started {
            if self.file.metadata()?.len() != 0 {
                self.file.set_len(0)?;
            }
            self.started = true;
        }
        Ok(())
    }
}

/// Whether `data` is all zero bytes (written to vectorise well).
pub fn is_zero(data: &[u8]) -> bool {
    // Pieces of 256 bytes, each folded in 16-byte words: data that is not
    // zeros (nearly all of it) says so in its first piece, where scanning a
    // whole block first cost 3 % of the server's time receiving a large file.
    data.chunks(256).all(|piece| {
        let mut words = piece.chunks_exact(16);
        let acc = words.by_ref().fold(0u128, |acc, w| {
            let mut b = [0u8; 16];
            b.copy_from_slice(w);
            acc | u128::from_ne_bytes(b)
        });
        acc == 0 && words.remainder().iter().all(|b| *b == 0)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// 1 MiB with zero blocks in the middle and at the end.
    fn holey() -> Vec<u8> {
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        data[100_000..600_000].fill(0); // middle hole (unaligned edges)
        data[(1 << 20) - 200_000..].fill(0); // trailing hole
        data[10] = 0; // lone zeros inside data blocks
        data
    }

    /// The file's bytes equal `data`, and at most the non-zero blocks
    /// (plus two for unaligned edges) are allocated.
    fn assert_holey(p: &std::path::Path, data: &[u8], what: &str) {
        assert_eq!(std::fs::read(p).unwrap(), data, "{what}");
        let md = std::fs::metadata(p).unwrap();
        assert_eq!(md.len(), data.len() as u64);
        assert!(
            md.blocks() * 512 <= (1 << 20) - 600_000 + 8192,
            "{what}: {} blocks for {} bytes",
            md.blocks(),
            md.len()
        );
    }

    #[test]
    fn the_writer_keeps_holes_whatever_the_pieces() {
        let data = holey();
        for step in [1 << 20, 4096, 65_536, 1000, 4097, 7, 3 * 4096 + 1] {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("s");
            // Old content must not show through.
            std::fs::write(&p, vec![9u8; 2 << 20]).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let mut w = SparseWriter::new(f);
            for chunk in data.chunks(step) {
                w.write_all(chunk).unwrap();
            }
            w.write_all(&[]).unwrap();
            let mut f = w.finish().unwrap();
            assert_eq!(f.stream_position().unwrap(), data.len() as u64);
            f.sync_all().unwrap();
            drop(f);
            assert_holey(&p, &data, &format!("step {step}"));
        }
    }

    #[test]
    fn the_writer_handles_small_and_empty_files() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("e");
        let f = SparseWriter::new(File::create(&p).unwrap())
            .finish()
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        let mut w = SparseWriter::new(File::create(&p).unwrap());
        w.write_all(&[0, 0, 0]).unwrap();
        w.write_all(&[0; 5000]).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), vec![0u8; 5003]);
        let mut w = SparseWriter::new(File::create(&p).unwrap());
        w.write_all(b"ab").unwrap();
        w.write_all(&[0; 8190]).unwrap();
        w.write_all(b"c").unwrap();
        w.finish().unwrap();
        let mut want = b"ab".to_vec();
        want.extend_from_slice(&[0; 8190]);
        want.push(b'c');
        assert_eq!(std::fs::read(&p).unwrap(), want);
    }

    /// The server's way: positional writes at any offset into a new file,
    /// its length set at the end.
    #[test]
    fn positional_writes_at_unaligned_offsets_keep_holes() {
        let data = holey();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s");
        let f = File::create(&p).unwrap();
        let mut pos = 0;
        let mut holes = 0;
        for chunk in data.chunks(65_537) {
            holes += write_sparse_at(&f, pos as u64, chunk).unwrap();
            pos += chunk.len();
        }
        f.set_len(data.len() as u64).unwrap();
        // The holes it says it left are the whole zero blocks it found:
        // every aligned zero block but those split at pieces' edges.
        let zero_blocks = data
            .chunks(4096)
            .filter(|b| b.len() == 4096 && is_zero(b))
            .count() as u64
            * 4096;
        let split = (data.len() / 65_537 + 1) as u64 * 2 * 4096;
        assert!(
            holes <= zero_blocks && holes + split >= zero_blocks,
            "{holes} {zero_blocks}"
        );
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        // Unaligned pieces split zero blocks at their edges: those two
        // blocks per piece may be written, every other zero block is a hole.
        let md = std::fs::metadata(&p).unwrap();
        let edges = (data.len() / 65_537 + 1) as u64 * 2 * 4096;
        assert!(
            md.blocks() * 512 <= (1 << 20) - 600_000 + 8192 + edges,
            "{} blocks",
            md.blocks()
        );
        // Nothing moved the file position.
        let mut f = f;
        assert_eq!(f.stream_position().unwrap(), 0);
    }

    #[test]
    fn is_zero_finds_any_set_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        for i in 0..40 {
            let mut v = vec![0u8; 40];
            v[i] = 1;
            assert!(!is_zero(&v));
        }
        for i in [0, 15, 16, 255, 256, 257, 1000, 4095] {
            let mut v = vec![0u8; 4096];
            v[i] = 0x80;
            assert!(!is_zero(&v), "{i}");
            assert!(is_zero(&v[..i]) && is_zero(&v[i + 1..]), "{i}");
        }
    }
}

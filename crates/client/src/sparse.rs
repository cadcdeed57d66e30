//! Writing file content while keeping holes: restore's writer.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

/// Size of the blocks [`SparseWriter`] checks for zeros.
const SPARSE_BLOCK: usize = 4096;

/// Writes file content keeping holes.
///
/// A 4096-byte block (aligned to its file offset) that is all zeros is
/// skipped with a seek instead of written; [`SparseWriter::finish`] sets the
/// final length so trailing holes exist. Content is written from offset 0: the
/// file is truncated to 0 first, so skipped blocks read as zeros even if the
/// file held data before.
pub struct SparseWriter {
    file: File,
    /// Bytes of the current, incomplete block (always fewer than a block).
    partial: Vec<u8>,
    /// File offset where `partial` starts: the number of bytes handled so far
    /// excluding `partial`; always block-aligned.
    offset: u64,
    /// The kernel's file position, as far as we moved it.
    file_pos: u64,
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
            file_pos: 0,
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
            let block = std::mem::take(&mut self.partial);
            let res = self.write_blocks(&block);
            self.partial = block;
            self.partial.clear();
            res?;
        }
        let whole = data.len() - data.len() % SPARSE_BLOCK;
        self.write_blocks(&data[..whole])?;
        self.partial.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Writes the last partial block, sets the final length and returns the file,
    /// positioned at its end.
    pub fn finish(mut self) -> io::Result<File> {
        self.start()?;
        let tail = std::mem::take(&mut self.partial);
        if !is_zero(&tail) {
            self.write_at(self.offset, &tail)?;
        }
        let len = self.offset + tail.len() as u64;
        self.file.set_len(len)?;
        if self.file_pos != len {
            self.file.seek(SeekFrom::Start(len))?;
        }
        Ok(self.file)
    }

    /// Truncates the file once, before anything is written.
    fn start(&mut self) -> io::Result<()> {
        if !self.started {
            self.file.set_len(0)?;
            self.file.seek(SeekFrom::Start(0))?;
            self.started = true;
        }
        Ok(())
    }

    /// Writes whole blocks starting at `self.offset`, skipping the zero ones
    /// and writing each run of non-zero blocks in one call.
    fn write_blocks(&mut self, blocks: &[u8]) -> io::Result<()> {
        debug_assert_eq!(blocks.len() % SPARSE_BLOCK, 0);
        let mut i = 0;
        while i < blocks.len() {
            while i < blocks.len() && is_zero(&blocks[i..i + SPARSE_BLOCK]) {
                i += SPARSE_BLOCK;
            }
            let run = i;
            while i < blocks.len() && !is_zero(&blocks[i..i + SPARSE_BLOCK]) {
                i += SPARSE_BLOCK;
            }
            if run < i {
                self.write_at(self.offset + run as u64, &blocks[run..i])?;
            }
        }
        self.offset += blocks.len() as u64;
        Ok(())
    }

    /// Writes `data` at file offset `at`, seeking only when needed.
    fn write_at(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        if self.file_pos != at {
            self.file.seek(SeekFrom::Start(at))?;
        }
        self.file.write_all(data)?;
        self.file_pos = at + data.len() as u64;
        Ok(())
    }
}

/// Whether `data` is all zero bytes (written to vectorise well).
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let acc = words.by_ref().fold(0u128, |acc, w| {
        let mut b = [0u8; 16];
        b.copy_from_slice(w);
        acc | u128::from_ne_bytes(b)
    });
    acc == 0 && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// 1 MiB with zero blocks in the middle and at the end, in chunks of `step`.
    fn sparse_case(step: usize) {
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        data[100_000..600_000].fill(0); // middle hole (unaligned edges)
        data[(1 << 20) - 200_000..].fill(0); // trailing hole
        data[10] = 0; // lone zeros inside data blocks
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s");
        std::fs::write(&p, vec![9u8; 2 << 20]).unwrap(); // old content must not show through
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
        assert_eq!(std::fs::read(&p).unwrap(), data);
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), data.len() as u64);
        assert!(
            md.blocks() * 512 < md.len(),
            "step {step}: {} blocks for {} bytes",
            md.blocks(),
            md.len()
        );
        assert!(md.blocks() * 512 <= (1 << 20) - 600_000 + 8192);
    }

    #[test]
    fn meta_sparse_writer_keeps_holes() {
        for step in [1 << 20, 4096, 65_536, 1000, 4097, 7, 3 * 4096 + 1] {
            sparse_case(step);
        }
    }

    #[test]
    fn meta_sparse_writer_small_and_empty() {
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

    #[test]
    fn meta_is_zero() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        for i in 0..40 {
            let mut v = vec![0u8; 40];
            v[i] = 1;
            assert!(!is_zero(&v));
        }
    }
}

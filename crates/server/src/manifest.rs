//! The manifest: every entry of a backup with its metadata and content hash.
//!
//! Stored inside the subvolume (so each snapshot carries its own) at
//! `.byteback/manifest`, as a magic header followed by one zstd stream of
//! length-prefixed bincode entries in walk order. Reading streams it, so a
//! million-entry manifest never has to fit in memory.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use byteback_protocol::limits::MAX_FRAME;
use byteback_protocol::unchanged::{digest_of_encoding, EntryDigest};
use byteback_protocol::{compare_paths, ManifestEntry};

const MAGIC: &[u8; 8] = b"BBMF0001";

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("manifest: {}", msg.into()),
    )
}

/// A damaged manifest, named.
fn damaged(name: &str, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the manifest {name} is damaged: {msg}"),
    )
}

/// Writes entries, in walk order, to a manifest file.
pub struct ManifestWriter {
    enc: zstd::stream::write::Encoder<'static, BufWriter<Counting>>,
    last: Option<Vec<u8>>,
    count: u64,
    /// Bytes of the files written (their sizes, added up).
    bytes: u64,
}

impl ManifestWriter {
    /// Starts a manifest in `file` (which should be empty).
    pub fn new(file: File) -> io::Result<Self> {
        let mut w = BufWriter::with_capacity(256 << 10, Counting { file, written: 0 });
        w.write_all(MAGIC)?;
        // Level 1: rewriting a large manifest at level 3 took a third of the
        // server's time in a re-run where little changed, for a few % of size.
        let enc = zstd::stream::write::Encoder::new(w, 1)?;
        Ok(ManifestWriter {
            enc,
            last: None,
            count: 0,
            bytes: 0,
        })
    }

    /// Appends one entry; entries must come in strictly increasing walk order.
    pub fn push(&mut self, e: &ManifestEntry) -> io::Result<()> {
        if let Some(last) = &self.last {
            if compare_paths(last, &e.entry.path) != std::cmp::Ordering::Less {
                return Err(corrupt("entries out of order"));
            }
        }
        let bytes =
            bincode::serde::encode_to_vec(e, config()).map_err(|e| corrupt(e.to_string()))?;
        self.enc.write_all(&(bytes.len() as u32).to_le_bytes())?;
        self.enc.write_all(&bytes)?;
        self.last = Some(e.entry.path.clone());
        self.count += 1;
        if let byteback_protocol::Kind::File { size } = e.entry.kind {
            self.bytes = self.bytes.saturating_add(size);
        }
        Ok(())
    }

    /// Bytes written to the file so far (compressed; what the encoder and
    /// the buffer hold is not there yet).
    pub fn written(&self) -> u64 {
        self.enc.get_ref().get_ref().written
    }

    /// Number of entries written.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes of the files written so far, their sizes added up.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Finishes the stream and returns the file (not yet synced).
    pub fn finish(self) -> io::Result<File> {
        let w = self.enc.finish()?;
        w.into_inner().map(|c| c.file).map_err(|e| e.into_error())
    }
}

/// A file that counts the bytes written to it.
struct Counting {
    file: File,
    written: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The xattr of a manifest file that holds its files' bytes, added up
/// (8 bytes, little-endian), so that `status` and `report` need not
/// decode a manifest of millions of entries to show a host's size.
const BYTES_XATTR: &str = "user.byteback.bytes";

/// Records `bytes` (see [`ManifestWriter::bytes`]) on the manifest file
/// `fd`, not yet in place: an attribute of the file, so it goes (and is
/// synced, and snapshotted) with the manifest it adds up. A filesystem
/// without user xattrs only makes `status` decode the manifest.
pub fn write_bytes(fd: impl std::os::fd::AsFd, bytes: u64) {
    let value = bytes.to_le_bytes();
    if let Err(e) = rustix::fs::fsetxattr(fd, BYTES_XATTR, &value, rustix::fs::XattrFlags::empty())
    {
        tracing::debug!("cannot record the manifest's size ({e})");
    }
}

/// The bytes recorded on the manifest file `fd` by [`write_bytes`], if any.
pub fn read_bytes(fd: impl std::os::fd::AsFd) -> Option<u64> {
    let mut buf = [0u8; 9];
    match rustix::fs::fgetxattr(fd, BYTES_XATTR, &mut buf[..]) {
        Ok(8) => buf[..8].try_into().ok().map(u64::from_le_bytes),
        _ => None,
    }
}

/// Streams entries from a manifest file, validating each. A manifest that
/// ends anywhere but after a whole entry at the end of its compressed
/// stream (truncated), or holds anything odd, is an error that names the
/// file; so is an I/O error reading it.
pub struct ManifestReader {
    dec: Option<zstd::stream::read::Decoder<'static, BufReader<BufReader<File>>>>,
    last: Option<Vec<u8>>,
    /// Whether to compute each entry's digest (see [`Self::with_digests`]).
    digests: bool,
    /// The digest of the last entry read, when computed.
    digest: Option<EntryDigest>,
    /// The file, for messages.
    name: String,
}

impl ManifestReader {
    /// Opens a manifest; checks its magic. `path` names it in errors.
    pub fn new(file: File, path: &Path) -> io::Result<Self> {
        let name = path.display().to_string();
        let mut r = BufReader::with_capacity(256 << 10, file);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => damaged(&name, "too short"),
            _ => read_error(&name, e),
        })?;
        if &magic != MAGIC {
            return Err(damaged(&name, "bad magic"));
        }
        Ok(ManifestReader {
            dec: Some(zstd::stream::read::Decoder::new(r).map_err(|e| named(&name, e))?),
            last: None,
            digests: false,
            digest: None,
            name,
        })
    }

    /// A reader that yields nothing (no previous backup).
    pub fn empty() -> Self {
        ManifestReader {
            dec: None,
            last: None,
            digests: false,
            digest: None,
            name: String::new(),
        }
    }

    /// Computes the digest of every entry read (see
    /// [`byteback_protocol::unchanged`]), from the bytes read: an entry's
    /// record is its encoding followed by its 32-byte hash.
    pub fn with_digests(mut self) -> Self {
        self.digests = true;
        self
    }

    /// The digest of the entry last read, when computed.
    pub fn digest(&self) -> Option<EntryDigest> {
        self.digest
    }

    /// Next entry, `Ok(None)` at the end.
    pub fn next_entry(&mut self) -> io::Result<Option<ManifestEntry>> {
        let r = self.read_entry();
        if r.is_err() {
            // Nothing after an error can be trusted.
            self.dec = None;
        }
        r
    }

    fn read_entry(&mut self) -> io::Result<Option<ManifestEntry>> {
        let name = &self.name;
        let Some(dec) = self.dec.as_mut() else {
            return Ok(None);
        };
        // The stream may end only between two entries, and only where its
        // compressed frame ends: zstd reports a frame cut short as an
        // unexpected end, which is a truncated manifest, not its end.
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < len.len() {
            match dec.read(&mut len[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(name, e)),
            }
        }
        if got == 0 {
            self.dec = None;
            return Ok(None);
        }
        if got < len.len() {
            return Err(damaged(name, "truncated (it ends inside an entry)"));
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(damaged(name, "entry too large"));
        }
        let mut buf = vec![0u8; len];
        dec.read_exact(&mut buf).map_err(|e| read_error(name, e))?;
        let (e, used): (ManifestEntry, usize) =
            bincode::serde::decode_from_slice(&buf, config()).map_err(|e| damaged(name, e))?;
        if used != len {
            return Err(damaged(name, "trailing bytes"));
        }
        self.digest = match len.checked_sub(32) {
            Some(n) if self.digests => Some(digest_of_encoding(&buf[..n])),
            _ => None,
        };
        e.entry.validate().map_err(|e| damaged(name, e))?;
        if let Some(last) = &self.last {
            if compare_paths(last, &e.entry.path) != std::cmp::Ordering::Less {
                return Err(damaged(name, "entries out of order"));
            }
        }
        self.last = Some(e.entry.path.clone());
        Ok(Some(e))
    }
}

/// An I/O error reading the manifest `name`, named.
fn named(name: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot read the manifest {name}: {e}"))
}

/// An error from the decompressed stream: the end of the data where more was
/// due, bad compressed data, or EIO (how btrfs reports a block whose
/// checksum fails) is damage, which the next backup recovers from (the
/// manifest is set aside and one is taken from the newest snapshot);
/// anything else an I/O error.
fn read_error(name: &str, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EIO) {
        return damaged(name, e);
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            damaged(name, "truncated (its compressed stream ends early)")
        }
        io::ErrorKind::Other | io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
            damaged(name, e)
        }
        _ => named(name, e),
    }
}

/// A manifest reader with one entry of look-ahead, for merging against a sorted stream.
pub struct PeekableManifest {
    inner: ManifestReader,
    peeked: Option<ManifestEntry>,
    /// Its digest, if the reader computes them.
    peeked_digest: Option<EntryDigest>,
    /// A read found the manifest damaged (the caller may set it aside).
    damaged: bool,
}

impl PeekableManifest {
    /// Wraps a reader.
    pub fn new(mut inner: ManifestReader) -> io::Result<Self> {
        let peeked = inner.next_entry()?;
        Ok(PeekableManifest {
            peeked_digest: inner.digest(),
            inner,
            peeked,
            damaged: false,
        })
    }

    /// Whether a read found the manifest damaged.
    pub fn is_damaged(&self) -> bool {
        self.damaged
    }

    /// The next entry without consuming it.
    pub fn peek(&self) -> Option<&ManifestEntry> {
        self.peeked.as_ref()
    }

    /// Consumes the next entry.
    pub fn advance(&mut self) -> io::Result<Option<ManifestEntry>> {
        Ok(self.advance_with_digest()?.map(|(e, _)| e))
    }

    /// Consumes the next entry; with its digest if the reader computes them.
    pub fn advance_with_digest(
        &mut self,
    ) -> io::Result<Option<(ManifestEntry, Option<EntryDigest>)>> {
        let next = self.inner.next_entry().inspect_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                self.damaged = true;
            }
        })?;
        let digest = std::mem::replace(&mut self.peeked_digest, self.inner.digest());
        Ok(std::mem::replace(&mut self.peeked, next).map(|e| (e, digest)))
    }

    /// Skips entries before `path` and returns the one equal to it, if any.
    pub fn seek(&mut self, path: &[u8]) -> io::Result<Option<ManifestEntry>> {
        while let Some(p) = self.peeked.as_ref() {
            match compare_paths(&p.entry.path, path) {
                std::cmp::Ordering::Less => {
                    self.advance()?;
                }
                std::cmp::Ordering::Equal => return self.advance(),
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EIO reading the manifest (btrfs: a block failing its checksum) is
    /// damage, which the next backup recovers from, not an error that
    /// fails every backup until someone steps in.
    #[test]
    fn eio_is_damage() {
        let e = read_error("m", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("is damaged"), "{e}");
        let e = read_error("m", io::Error::from_raw_os_error(libc::EMFILE));
        assert_ne!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
    use byteback_protocol::{Entry, Kind};

    fn me(path: &str) -> ManifestEntry {
        ManifestEntry {
            entry: Entry {
                path: path.as_bytes().to_vec(),
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_sec: 1,
                mtime_nsec: 2,
                xattrs: vec![],
            },
            hash: [0; 32],
        }
    }

    #[test]
    fn round_trip_and_seek() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let mut w = ManifestWriter::new(File::create(&p).unwrap()).unwrap();
        for n in ["a", "a/b", "a/c", "a.b", "z"] {
            w.push(&me(n)).unwrap();
        }
        assert!(w.push(&me("b")).is_err());
        w.finish().unwrap();
        let mut r =
            PeekableManifest::new(ManifestReader::new(File::open(&p).unwrap(), &p).unwrap())
                .unwrap();
        assert_eq!(r.seek(b"a/c").unwrap().unwrap().entry.path, b"a/c");
        assert!(r.seek(b"a.a").unwrap().is_none());
        assert_eq!(r.seek(b"z").unwrap().unwrap().entry.path, b"z");
        assert!(r.advance().unwrap().is_none());
    }

    #[test]
    fn a_truncated_manifest_is_an_error_naming_it_never_a_shorter_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("manifest");
        let mut w = ManifestWriter::new(File::create(&p).unwrap()).unwrap();
        let n = 20_000;
        for i in 0..n {
            let mut e = me(&format!("d/{i:06}"));
            e.hash = [i as u8; 32];
            w.push(&e).unwrap();
        }
        w.finish().unwrap();
        let full = std::fs::read(&p).unwrap();
        let read_all = |bytes: &[u8]| -> io::Result<usize> {
            let q = dir.path().join("cut");
            std::fs::write(&q, bytes).unwrap();
            let mut r = ManifestReader::new(File::open(&q).unwrap(), &q)?;
            let mut count = 0;
            while r.next_entry()?.is_some() {
                count += 1;
            }
            Ok(count)
        };
        assert_eq!(read_all(&full).unwrap(), n);
        let len = full.len();
        for cut in [
            0,
            5,
            8,
            9,
            12,
            len / 4,
            len / 2,
            len * 3 / 4,
            len - 4,
            len - 1,
        ] {
            let e = read_all(&full[..cut]).expect_err(&format!("cut at {cut} of {len}"));
            let msg = e.to_string();
            assert!(
                msg.contains("cut") && msg.contains("damaged"),
                "cut at {cut}: {msg}"
            );
        }
    }

    #[test]
    fn digests_from_the_records_equal_the_entries_own() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let mut w = ManifestWriter::new(File::create(&p).unwrap()).unwrap();
        let mut all = vec![];
        for (i, n) in ["a", "a/b", "z"].into_iter().enumerate() {
            let mut e = me(n);
            e.hash = [i as u8 + 200; 32];
            e.entry.xattrs = vec![(b"user.x".to_vec(), vec![i as u8; 300])];
            e.entry.mtime_sec = -1 - i as i64 * 1_000_000_007;
            w.push(&e).unwrap();
            all.push(e);
        }
        w.finish().unwrap();
        let open = || ManifestReader::new(File::open(&p).unwrap(), &p).unwrap();
        let mut r = PeekableManifest::new(open().with_digests()).unwrap();
        for e in &all {
            let (got, d) = r.advance_with_digest().unwrap().unwrap();
            assert_eq!(&got, e);
            assert_eq!(
                d,
                Some(byteback_protocol::unchanged::entry_digest(&e.entry))
            );
        }
        assert!(r.advance_with_digest().unwrap().is_none());
        let mut plain = PeekableManifest::new(open()).unwrap();
        assert_eq!(plain.advance_with_digest().unwrap().unwrap().1, None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, b"BBMF0001garbage-garbage").unwrap();
        let mut r = ManifestReader::new(File::open(&p).unwrap(), &p).unwrap();
        assert!(r.next_entry().is_err());
    }
}

//! The client's record of the last backup to a destination: every entry
//! it announced (path and digest, see [`byteback_protocol::unchanged`]), in
//! walk order, under the generation the server gave the manifest it
//! committed. When the server offers that same generation at the start of
//! the next backup, an entry whose digest equals its record's (and whose
//! record follows the last one used: nothing was deleted in between) need
//! not be sent: runs of them go as [`ClientMsg::Unchanged`].
//!
//! The record is only a hint: the server checks every run against its own
//! manifest, so a stale, damaged or tampered record can cost a backup
//! (it fails, and is run again announcing every entry, see
//! [`crate::backup::run_backup`]'s caller), never let a change through.
//! It is read as a stream and written as one, so memory stays bounded.
//!
//! File: `<cache dir>/<key>.entries`, where the key hashes the destination
//! and the host name: magic, the generation, then one zstd stream of
//! records (`u32` path length, path, 16-byte digest).
//!
//! [`ClientMsg::Unchanged`]: byteback_protocol::ClientMsg::Unchanged

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use byteback_protocol::compare_paths;
use byteback_protocol::limits::MAX_PATH;
use byteback_protocol::unchanged::{Chain, EntryDigest};

const MAGIC: &[u8; 8] = b"BBEC0001";

/// The cache directory: `$BYTEBACK_CACHE_DIR`, else `/var/cache/byteback`
/// for root, else `$XDG_CACHE_HOME/byteback` or `~/.cache/byteback`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v: &std::ffi::OsString| !v.is_empty());
    let dir = if let Some(d) = var("BYTEBACK_CACHE_DIR") {
        Some(PathBuf::from(d))
    } else if rustix::process::geteuid().is_root() {
        Some(PathBuf::from("/var/cache/byteback"))
    } else {
        var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("byteback"))
    };
    // Only an absolute path can be left out of the walk (the record
    // changes while it runs).
    match dir {
        Some(d) if d.is_absolute() => Some(d),
        Some(d) => {
            tracing::warn!(
                "the cache directory {} is not an absolute path: no record of the last backup is kept",
                d.display()
            );
            None
        }
        None => None,
    }
}

/// The record file for backups of host `host` to destination `dest`
/// (any text naming it) in `dir`.
pub fn record_path(dir: &Path, dest: &str, host: &str) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(dest.as_bytes());
    h.update(&[0]);
    h.update(host.as_bytes());
    let hex = h.finalize().to_hex();
    dir.join(format!("{}.entries", &hex[..32]))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// A record being read, one entry ahead.
pub struct OldRecord {
    dec: zstd::stream::read::Decoder<'static, BufReader<File>>,
    peeked: Option<(Vec<u8>, EntryDigest)>,
}

impl OldRecord {
    /// Opens the record at `path` if it was written under `generation`.
    pub fn open(path: &Path, generation: &[u8; 32]) -> io::Result<Option<Self>> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut r = BufReader::with_capacity(64 << 10, f);
        let mut head = [0u8; 40];
        r.read_exact(&mut head)?;
        if &head[..8] != MAGIC || head[8..] != generation[..] {
            return Ok(None);
        }
        let mut rec = OldRecord {
            dec: zstd::stream::read::Decoder::with_buffer(r)?,
            peeked: None,
        };
        rec.peeked = rec.read_one()?;
        Ok(Some(rec))
    }

    fn read_one(&mut self) -> io::Result<Option<(Vec<u8>, EntryDigest)>> {
        let mut len = [0u8; 4];
        match self.dec.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_PATH {
            return Err(bad("path too long"));
        }
        let mut path = vec![0u8; len];
        self.dec.read_exact(&mut path)?;
        let mut d = [0u8; 16];
        self.dec.read_exact(&mut d)?;
        Ok(Some((path, d)))
    }

    /// Moves to `path`: returns the digest recorded for it, if the record
    /// holds it, and whether records before it were passed over (entries
    /// the walk no longer found).
    pub fn seek(&mut self, path: &[u8]) -> io::Result<(Option<EntryDigest>, bool)> {
        let mut skipped = false;
        while let Some((p, d)) = &self.peeked {
            match compare_paths(p, path) {
                std::cmp::Ordering::Less => skipped = true,
                std::cmp::Ordering::Equal => {
                    let d = *d;
                    self.peeked = self.read_one()?;
                    return Ok((Some(d), skipped));
                }
                std::cmp::Ordering::Greater => break,
            }
            self.peeked = self.read_one()?;
        }
        Ok((None, skipped))
    }
}

/// The record of this backup, written as entries are announced; put in
/// place under the generation the server commits, if that is the chain of
/// exactly these entries.
pub struct NewRecord {
    /// Taken when finished; a record dropped before is removed.
    enc: Option<zstd::stream::write::Encoder<'static, BufWriter<File>>>,
    tmp: PathBuf,
    path: PathBuf,
    chain: Chain,
}

impl NewRecord {
    /// Starts the record that will replace `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let tmp = path.with_extension("entries.new");
        // A new file, never through a symlink planted at its name.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(64 << 10, f);
        w.write_all(MAGIC)?;
        w.write_all(&[0u8; 32])?;
        Ok(NewRecord {
            enc: Some(zstd::stream::write::Encoder::new(w, 1)?),
            tmp,
            path: path.to_path_buf(),
            chain: Chain::new(),
        })
    }

    /// Records one announced entry.
    pub fn push(&mut self, path: &[u8], d: &EntryDigest) -> io::Result<()> {
        self.chain.push(d);
        let Some(enc) = self.enc.as_mut() else {
            return Err(bad("record already finished"));
        };
        enc.write_all(&(path.len() as u32).to_le_bytes())?;
        enc.write_all(path)?;
        enc.write_all(d)
    }

    /// Puts the record in place if `generation` (the server's, after its
    /// commit) is the chain of the entries recorded; otherwise removes it
    /// and the old one (the server's manifest is not what was announced:
    /// a file given up, or one that changed while it was read). Returns
    /// whether it was kept.
    pub fn finish(mut self, generation: Option<[u8; 32]>) -> io::Result<bool> {
        let ours = self.chain.finish();
        let enc = self.enc.take();
        if generation != Some(ours) || enc.is_none() {
            let _ = std::fs::remove_file(&self.tmp);
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => return Ok(false),
            }
        }
        let Some(enc) = enc else { return Ok(false) };
        let put = (|| -> io::Result<()> {
            let mut f = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
            f.seek(SeekFrom::Start(8))?;
            f.write_all(&ours)?;
            drop(f);
            std::fs::rename(&self.tmp, &self.path)
        })();
        if put.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        put.map(|()| true)
    }

    /// Gives the record up.
    pub fn discard(self) {}
}

impl Drop for NewRecord {
    /// A record not finished (the backup failed) is removed.
    fn drop(&mut self) {
        if self.enc.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> EntryDigest {
        [n; 16]
    }

    #[test]
    fn a_record_is_kept_under_its_own_chain_only_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "Local(\"/s\")", "h");
        assert_ne!(path, record_path(dir.path(), "Local(\"/s\")", "g"));
        let entries: [(&[u8], u8); 4] = [(b"a", 1), (b"a/b", 2), (b"a/c", 3), (b"b", 4)];
        let mut rec = NewRecord::create(&path).unwrap();
        let mut chain = Chain::new();
        for (p, n) in entries {
            rec.push(p, &d(n)).unwrap();
            chain.push(&d(n));
        }
        let generation = chain.finish();
        assert!(rec.finish(Some(generation)).unwrap());
        assert!(OldRecord::open(&path, &[9; 32]).unwrap().is_none());
        let mut old = OldRecord::open(&path, &generation).unwrap().unwrap();
        assert_eq!(old.seek(b"a").unwrap(), (Some(d(1)), false));
        // a/b passed over: the walk did not find it.
        assert_eq!(old.seek(b"a/c").unwrap(), (Some(d(3)), true));
        assert_eq!(old.seek(b"a/d").unwrap(), (None, false));
        assert_eq!(old.seek(b"b").unwrap(), (Some(d(4)), false));
        assert_eq!(old.seek(b"c").unwrap(), (None, false));

        // Another chain than the server's: no record at all afterwards.
        let mut rec = NewRecord::create(&path).unwrap();
        rec.push(b"a", &d(1)).unwrap();
        assert!(!rec.finish(Some(generation)).unwrap());
        assert!(!path.exists());
        assert!(OldRecord::open(&path, &generation).unwrap().is_none());
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.entries");
        let mut bytes = MAGIC.to_vec();
        bytes.extend([5u8; 32]);
        bytes.extend(zstd::encode_all(&[0xffu8, 0xff, 0xff, 0x7f, 1][..], 1).unwrap());
        std::fs::write(&path, &bytes).unwrap();
        assert!(OldRecord::open(&path, &[5; 32]).is_err());
    }
}

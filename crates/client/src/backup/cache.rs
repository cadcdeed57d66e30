//! The client's record of the last backup to a destination: every entry
//! it announced (path and digest, see [`byteback_protocol::unchanged`]), in
//! walk order, under the generation the server gave the manifest it
//! committed. When the server offers that same generation at the start of
//! the next backup, an entry whose digest equals its record's (and whose
//! record follows the last one used: nothing was deleted in between) need
//! not be sent: runs of them go as [`ClientMsg::Unchanged`].
//!
//! The record is only a hint: the server checks every run against its own
//! manifest, so a stale or damaged record can cost a backup (it fails, and
//! is run again announcing every entry, see [`crate::backup::run_backup`]'s
//! caller), never let a change through. The one thing it is trusted with
//! is the quick key below: a record forged to match an object's `statx`
//! could hide a change of that object's xattrs, so it belongs where only
//! the client's user may write (for root, `/var/cache/byteback`; the
//! directory is created with mode 0700 if missing, the file with mode
//! 0600; an existing directory's mode is left as it is). It is read as a
//! stream and written as one, so memory stays bounded.
//!
//! Each record also holds the entry's *quick key* ([`quick_key`]): what
//! `statx` says of the object, its inode number and its ctime. An entry
//! whose quick key equals its record's, and whose ctime is older than the
//! start of the backup that recorded it by more than [`RACY_SECS`], has the
//! extended attributes it had then: every change of an xattr moves the
//! ctime to the time of the change, which is after that start. Such an
//! entry's xattrs are not read again; its record's digest stands for it.
//! (A ctime younger than that could be kept by a change within the same
//! tick of a coarse clock, as git's index calls "racy".) Only on
//! filesystems whose ctimes Linux keeps itself (ext2/3/4, XFS, btrfs,
//! tmpfs, F2FS; not network or FUSE filesystems, whose ctimes come from
//! another clock, a cache or a program), below a directory on the same
//! mount and device, and when `statx` gives a ctime at all (see the walk's
//! `emit`).
//!
//! File: `<cache dir>/<key>.entries`, where the key hashes the destination
//! and the host name: magic, the generation, the start of the backup that
//! wrote it (`i64` seconds since the epoch), then one zstd stream of records
//! (`u32` path length, path, 16-byte digest, 16-byte quick key, `u32`
//! xattr cost: the entry's xattrs' part of its `buffer_cost`, which the
//! server counts for an entry it carries, and the client for one whose
//! xattrs it did not read).
//!
//! [`ClientMsg::Unchanged`]: byteback_protocol::ClientMsg::Unchanged

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use byteback_protocol::compare_paths;
use byteback_protocol::limits::MAX_PATH;
use byteback_protocol::unchanged::{entry_digest, Chain, EntryDigest};
use byteback_protocol::Entry;

const MAGIC: &[u8; 8] = b"BBEC0003";
/// Bytes before the records: magic, generation, start.
const HEAD: usize = 8 + 32 + 8;
/// How much older than the recording backup's start a ctime must be for
/// the record to vouch for the entry's xattrs: ample for the coarsest
/// timestamps Linux filesystems keep (FAT's two seconds) and a clock that
/// lags the wall clock by a tick.
pub const RACY_SECS: i64 = 3;

/// What `statx` says of an entry (`e`, its xattrs not looked at), its
/// inode number and its ctime, hashed: equal keys mean the same object,
/// unchanged since, if its ctime is old enough (see the module's text).
pub fn quick_key(e: &Entry, ino: u64, ctime: (i64, u32)) -> EntryDigest {
    let mut h = blake3::Hasher::new();
    if e.xattrs.is_empty() {
        h.update(&entry_digest(e));
    } else {
        let bare = Entry {
            xattrs: Vec::new(),
            ..e.clone()
        };
        h.update(&entry_digest(&bare));
    }
    h.update(&ino.to_le_bytes());
    h.update(&ctime.0.to_le_bytes());
    h.update(&ctime.1.to_le_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.finalize().as_bytes()[..16]);
    k
}

/// One entry of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Its digest (xattrs included).
    pub digest: EntryDigest,
    /// Its quick key ([`quick_key`]).
    pub quick: EntryDigest,
    /// Its xattrs' part of its `buffer_cost` ([`Entry::xattr_cost`]).
    pub xattr_cost: u32,
}

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
    peeked: Option<(Vec<u8>, Recorded)>,
    /// When the backup that wrote it started (seconds since the epoch).
    started: i64,
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
        let mut head = [0u8; HEAD];
        match r.read_exact(&mut head) {
            // Shorter than a header: not a record (of this version).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            r => r?,
        }
        if &head[..8] != MAGIC || head[8..40] != generation[..] {
            return Ok(None);
        }
        let mut started = [0u8; 8];
        started.copy_from_slice(&head[40..]);
        let mut rec = OldRecord {
            dec: zstd::stream::read::Decoder::with_buffer(r)?,
            peeked: None,
            started: i64::from_le_bytes(started),
        };
        rec.peeked = rec.read_one()?;
        Ok(Some(rec))
    }

    fn read_one(&mut self) -> io::Result<Option<(Vec<u8>, Recorded)>> {
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
        let mut d = [0u8; 36];
        self.dec.read_exact(&mut d)?;
        let (digest, rest) = d.split_at(16);
        let (quick, cost) = rest.split_at(16);
        let mut rec = Recorded {
            digest: [0; 16],
            quick: [0; 16],
            xattr_cost: 0,
        };
        rec.digest.copy_from_slice(digest);
        rec.quick.copy_from_slice(quick);
        let mut c = [0u8; 4];
        c.copy_from_slice(cost);
        rec.xattr_cost = u32::from_le_bytes(c);
        Ok(Some((path, rec)))
    }

    /// Whether a ctime of `ctime_sec` is old enough for this record to
    /// vouch for the xattrs of an entry whose quick key it holds.
    pub fn vouches_at(&self, ctime_sec: i64) -> bool {
        ctime_sec < self.started.saturating_sub(RACY_SECS)
    }

    /// Moves to `path`: returns what is recorded for it, if the record
    /// holds it, and whether records before it were passed over (entries
    /// the walk no longer found).
    pub fn seek(&mut self, path: &[u8]) -> io::Result<(Option<Recorded>, bool)> {
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

/// What the record of the last backup holds for an entry: `None` without a
/// record (or one that could not be read); else the entry's record, if any,
/// and whether records before it were passed over (entries the server still
/// has that the walk did not hand on: the next entry sent must say so, so
/// no run goes on).
pub type Sought = Option<(Option<Recorded>, bool)>;

/// The record of the last backup as the walk reads it: one seek per entry
/// handed on, in walk order, whether the walk asked about the entry first
/// ([`Cursor::vouch`]) or not ([`Cursor::entry`]).
pub struct Cursor {
    old: Option<OldRecord>,
    /// The record [`Cursor::vouch`] found for an entry not handed on yet:
    /// its path, the record and whether records were passed over.
    sought: Option<(Vec<u8>, Option<Recorded>, bool)>,
    /// A record was passed over since the last entry handed on: one sought
    /// for an entry the walk then left out (its xattrs could not be read).
    passed: bool,
}

impl Cursor {
    /// Reads `old`, if there is one.
    pub fn new(old: Option<OldRecord>) -> Self {
        Cursor {
            old,
            sought: None,
            passed: false,
        }
    }

    fn seek(&mut self, path: &[u8]) -> Sought {
        if let Some((_, r, skipped)) = self.sought.take() {
            // Sought, but never handed on: the server's entry is passed over.
            self.passed |= r.is_some() || skipped;
        }
        let old = self.old.as_mut()?;
        match old.seek(path) {
            Ok((r, skipped)) => Some((r, skipped || std::mem::take(&mut self.passed))),
            Err(e) => {
                tracing::warn!("the record of the last backup cannot be read ({e}); every further entry is sent");
                self.old = None;
                None
            }
        }
    }

    /// The record of the entry at `path`, if it has the quick key `quick`,
    /// vouches for its ctime `ctime_sec` and the entry will join a run (no
    /// record passed over before it): then its xattrs need not be read.
    pub fn vouch(&mut self, path: &[u8], quick: &EntryDigest, ctime_sec: i64) -> Option<Recorded> {
        let (r, skipped) = self.seek(path)?;
        self.sought = Some((path.to_vec(), r, skipped));
        let old = self.old.as_ref()?;
        r.filter(|r| !skipped && r.quick == *quick && old.vouches_at(ctime_sec))
    }

    /// The next record at or below `path`, which the walk could not read
    /// and the server keeps as the last backup has it: the new record
    /// takes these as they are, so its chain stays the server's. `None`
    /// once there are no more (or there is no record).
    pub fn next_kept(&mut self, path: &[u8]) -> Option<(Vec<u8>, Recorded)> {
        let within = |p: &[u8]| {
            p == path
                || path.is_empty()
                || (p.starts_with(path) && p.get(path.len()) == Some(&b'/'))
        };
        // The walk may have asked about `path` itself before it failed.
        if let Some((p, r, skipped)) = self.sought.take() {
            if within(&p) {
                self.passed |= skipped;
                if let Some(r) = r {
                    return Some((p, r));
                }
            } else {
                self.sought = Some((p, r, skipped));
            }
        }
        loop {
            let old = self.old.as_mut()?;
            let (p, r) = old.peeked.take()?;
            let before = !within(&p) && compare_paths(&p, path) == std::cmp::Ordering::Less;
            if !before && !within(&p) {
                old.peeked = Some((p, r));
                return None;
            }
            match old.read_one() {
                Ok(next) => old.peeked = next,
                Err(e) => {
                    tracing::warn!("the record of the last backup cannot be read ({e}); every further entry is sent");
                    self.old = None;
                }
            }
            if before {
                // An entry the walk did not hand on: the server deletes it.
                self.passed = true;
                continue;
            }
            return Some((p, r));
        }
    }

    /// What the record holds for the entry at `path`, handed on now.
    pub fn entry(&mut self, path: &[u8]) -> Sought {
        match self.sought.take() {
            Some((p, r, skipped)) if p == path => Some((r, skipped)),
            other => {
                self.sought = other;
                self.seek(path)
            }
        }
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

/// Seconds since the epoch, now.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
        // Taken before the walk's first statx: what the walk sees changed
        // after it.
        w.write_all(&now_secs().to_le_bytes())?;
        Ok(NewRecord {
            enc: Some(zstd::stream::write::Encoder::new(w, 1)?),
            tmp,
            path: path.to_path_buf(),
            chain: Chain::new(),
        })
    }

    /// Records one announced entry: its digest, its quick key and its
    /// xattrs' cost.
    pub fn push(
        &mut self,
        path: &[u8],
        d: &EntryDigest,
        quick: &EntryDigest,
        xattr_cost: u32,
    ) -> io::Result<()> {
        self.chain.push(d);
        let Some(enc) = self.enc.as_mut() else {
            return Err(bad("record already finished"));
        };
        enc.write_all(&(path.len() as u32).to_le_bytes())?;
        enc.write_all(path)?;
        enc.write_all(d)?;
        enc.write_all(quick)?;
        enc.write_all(&xattr_cost.to_le_bytes())
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
        let before = now_secs();
        for (p, n) in entries {
            rec.push(p, &d(n), &d(n + 100), u32::from(n) << 20).unwrap();
            chain.push(&d(n));
        }
        let generation = chain.finish();
        assert!(rec.finish(Some(generation)).unwrap());
        assert!(OldRecord::open(&path, &[9; 32]).unwrap().is_none());
        let mut old = OldRecord::open(&path, &generation).unwrap().unwrap();
        let r = |n| Recorded {
            digest: d(n),
            quick: d(n + 100),
            xattr_cost: u32::from(n) << 20,
        };
        assert_eq!(old.seek(b"a").unwrap(), (Some(r(1)), false));
        // a/b passed over: the walk did not find it.
        assert_eq!(old.seek(b"a/c").unwrap(), (Some(r(3)), true));
        assert_eq!(old.seek(b"a/d").unwrap(), (None, false));
        assert_eq!(old.seek(b"b").unwrap(), (Some(r(4)), false));
        assert_eq!(old.seek(b"c").unwrap(), (None, false));
        // The record's start bounds the ctimes it vouches for.
        assert!(old.started >= before && old.started <= now_secs());
        assert!(old.vouches_at(old.started - RACY_SECS - 1));
        assert!(!old.vouches_at(old.started - RACY_SECS));
        assert!(!old.vouches_at(old.started + 5));

        // Another chain than the server's: no record at all afterwards.
        let mut rec = NewRecord::create(&path).unwrap();
        rec.push(b"a", &d(1), &d(2), 0).unwrap();
        assert!(!rec.finish(Some(generation)).unwrap());
        assert!(!path.exists());
        assert!(OldRecord::open(&path, &generation).unwrap().is_none());
    }

    /// A path kept unread: its records (and its own, if the walk asked
    /// about it before failing) go to the new record as they are; records
    /// before it the walk passed over are not kept, and the next entry is
    /// marked as after passed-over ones.
    #[test]
    fn the_records_of_a_kept_path_are_taken_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.entries");
        let names: [&[u8]; 6] = [b"a", b"b", b"k", b"k/x", b"k/y", b"z"];
        let mut rec = NewRecord::create(&path).unwrap();
        let mut chain = Chain::new();
        for (n, p) in names.iter().enumerate() {
            rec.push(p, &d(n as u8), &d(0), 0).unwrap();
            chain.push(&d(n as u8));
        }
        let generation = chain.finish();
        assert!(rec.finish(Some(generation)).unwrap());
        let kept = |c: &mut Cursor, p: &[u8]| -> Vec<Vec<u8>> {
            std::iter::from_fn(|| c.next_kept(p).map(|(p, _)| p)).collect()
        };
        let mut c = Cursor::new(OldRecord::open(&path, &generation).unwrap());
        assert_eq!(
            c.entry(b"a"),
            Some((
                Some(Recorded {
                    digest: d(0),
                    quick: d(0),
                    xattr_cost: 0
                }),
                false
            ))
        );
        // b not found by the walk; k asked about, then unreadable.
        let _ = c.vouch(b"k", &d(0), 0);
        assert_eq!(
            kept(&mut c, b"k"),
            [b"k".to_vec(), b"k/x".to_vec(), b"k/y".to_vec()]
        );
        // b was passed over (the server deletes it): z says so.
        assert_eq!(
            c.entry(b"z"),
            Some((
                Some(Recorded {
                    digest: d(5),
                    quick: d(0),
                    xattr_cost: 0
                }),
                true
            ))
        );
        // k's own entry sent, its listing failed: only what is below it.
        let mut c = Cursor::new(OldRecord::open(&path, &generation).unwrap());
        let _ = c.entry(b"a");
        let _ = c.entry(b"b");
        let _ = c.entry(b"k");
        assert_eq!(kept(&mut c, b"k"), [b"k/x".to_vec(), b"k/y".to_vec()]);
        // Records before the kept path that the walk passed over are not
        // kept: the next entry says records were passed over.
        let mut c = Cursor::new(OldRecord::open(&path, &generation).unwrap());
        let _ = c.entry(b"a");
        assert_eq!(kept(&mut c, b"k/x"), [b"k/x".to_vec()]);
        assert_eq!(c.entry(b"z").map(|(_, passed)| passed), Some(true));
    }

    #[test]
    fn the_cursor_vouches_only_for_entries_that_join_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.entries");
        let names: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
        let mut rec = NewRecord::create(&path).unwrap();
        let mut chain = Chain::new();
        for (n, p) in names.iter().enumerate() {
            let n = n as u8;
            rec.push(p, &d(n), &d(n + 100), 0).unwrap();
            chain.push(&d(n));
        }
        let generation = chain.finish();
        assert!(rec.finish(Some(generation)).unwrap());
        let mut c = Cursor::new(OldRecord::open(&path, &generation).unwrap());
        let r = |n: u8| Recorded {
            digest: d(n),
            quick: d(n + 100),
            xattr_cost: 0,
        };
        // As recorded, with an old ctime: vouched for, and handed on.
        assert_eq!(c.vouch(b"a", &d(100), 0).map(|r| r.digest), Some(d(0)));
        assert_eq!(c.entry(b"a"), Some((Some(r(0)), false)));
        // Another quick key, or a ctime within the margin: not vouched
        // for, yet the record is what it is.
        assert_eq!(c.vouch(b"b", &d(7), 0), None);
        assert_eq!(c.entry(b"b"), Some((Some(r(1)), false)));
        assert_eq!(c.vouch(b"c", &d(102), now_secs()), None);
        // c is left out by the walk after all (its xattrs could not be
        // read): the server's c is passed over, so d neither is vouched
        // for nor joins a run, though its record matches.
        assert_eq!(c.vouch(b"d", &d(103), 0), None);
        assert_eq!(c.entry(b"d"), Some((Some(r(3)), true)));
        // An entry the walk never asked about is sought when handed on.
        assert_eq!(c.entry(b"e"), Some((Some(r(4)), false)));
        assert_eq!(c.entry(b"f"), Some((None, false)));
        // Without a record: nothing.
        let mut none = Cursor::new(None);
        assert_eq!(none.vouch(b"a", &d(100), 0), None);
        assert_eq!(none.entry(b"a"), None);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.entries");
        let mut bytes = MAGIC.to_vec();
        bytes.extend([5u8; 32]);
        bytes.extend(0i64.to_le_bytes());
        bytes.extend(zstd::encode_all(&[0xffu8, 0xff, 0xff, 0x7f, 1][..], 1).unwrap());
        std::fs::write(&path, &bytes).unwrap();
        assert!(OldRecord::open(&path, &[5; 32]).is_err());
    }

    #[test]
    fn a_record_of_the_first_version_or_cut_short_is_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.entries");
        let mut bytes = b"BBEC0001".to_vec();
        bytes.extend([5u8; 32]);
        bytes.extend(zstd::encode_all(&[1u8, 0, 0, 0, b'a'][..], 1).unwrap());
        std::fs::write(&path, &bytes).unwrap();
        assert!(OldRecord::open(&path, &[5; 32]).unwrap().is_none());
        std::fs::write(&path, &MAGIC[..]).unwrap();
        assert!(OldRecord::open(&path, &[5; 32]).unwrap().is_none());
    }

    fn entry(xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Entry {
        Entry {
            path: b"a/b".to_vec(),
            kind: byteback_protocol::Kind::File { size: 3 },
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
            xattrs,
        }
    }

    #[test]
    fn quick_keys_follow_the_stat_fields_the_inode_and_the_ctime_not_the_xattrs() {
        let e = entry(vec![]);
        let k = quick_key(&e, 7, (100, 1));
        let with_xattr = entry(vec![(b"user.x".to_vec(), b"1".to_vec())]);
        assert_eq!(quick_key(&with_xattr, 7, (100, 1)), k);
        assert_ne!(quick_key(&e, 8, (100, 1)), k);
        assert_ne!(quick_key(&e, 7, (101, 1)), k);
        assert_ne!(quick_key(&e, 7, (100, 2)), k);
        let changes: [fn(&mut Entry); 6] = [
            |e| e.mode = 0o600,
            |e| e.uid = 0,
            |e| e.gid = 0,
            |e| e.mtime_nsec = 6,
            |e| e.kind = byteback_protocol::Kind::File { size: 4 },
            |e| {
                e.kind = byteback_protocol::Kind::HardLink {
                    target: b"a/a".to_vec(),
                }
            },
        ];
        for change in changes {
            let mut other = entry(vec![]);
            change(&mut other);
            assert_ne!(quick_key(&other, 7, (100, 1)), k, "{other:?}");
        }
    }
}

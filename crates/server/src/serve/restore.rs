//! Listing and restore serving: snapshot names and kinds, a snapshot's
//! manifest (derived from the tree for a 1.x one), and stored files'
//! content. A stored file that cannot be opened or read is sent short (the
//! client reports it damaged); a path through a symlink or out of the tree
//! is refused.

use std::io::{Read, Write};

use byteback_protocol::codec::{ChunkCompressor, DATA_LEVEL};
use byteback_protocol::limits::{MAX_BATCH, MAX_BUFFERED_BYTES, MAX_CHUNK};
use byteback_protocol::{
    Compressed, CurrentNews, ManifestEntry, RawBytes, ServerMsg, SnapshotKind,
};

use super::{Conn, ServeConfig};
use crate::error::{Context, Error, IoContext, Result};
use crate::fsops;
use crate::legacy::{self, LegacyWalk, Walked};
use crate::manifest::ManifestReader;
use crate::store::{disk_path, HostStore, Store, META_DIR, META_DIR_NAME};

/// Whether `e`, from opening a host's directory, says there is none (a
/// host with no backups yet); any other error (a store this user may not
/// read) is said as it is, not as "no snapshots".
fn no_such_host(e: &crate::error::Error) -> bool {
    e.io_error()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
}

/// Answers `ListSnapshots`: the host's snapshot names (none for a host
/// without any).
pub(super) fn list_snapshots<R: Read, W: Write>(
    cfg: &ServeConfig,
    store: &Store,
    conn: &mut Conn<R, W>,
) -> Result<()> {
    let names = match store.host(&cfg.host, false) {
        Ok(h) => h.snapshots()?.into_iter().map(|(n, _)| n).collect(),
        Err(e) if no_such_host(&e) => vec![],
        Err(e) => return Err(e),
    };
    conn.send(&ServerMsg::Snapshots(names))
}

/// Answers `ListSnapshotKinds`: each snapshot's kind, and `current`'s.
pub(super) fn list_snapshot_kinds<R: Read, W: Write>(
    cfg: &ServeConfig,
    store: &Store,
    conn: &mut Conn<R, W>,
) -> Result<()> {
    let (snapshots, current, current_news) = match store.host(&cfg.host, false) {
        Ok(h) => {
            let mut out = vec![];
            let mut newest = None;
            for (name, _) in h.snapshots()? {
                let fd = h.open_snapshot(&name)?;
                let kind = snapshot_kind(&fd, &h, &name)?;
                out.push((name, kind));
                newest = Some((fd, kind));
            }
            let (current, news) = match h.open_snapshot("current") {
                Ok(fd) => {
                    let kind = snapshot_kind(&fd, &h, "current")?;
                    let news = match kind {
                        SnapshotKind::Byteback => {
                            // A backup running holds the lock: current is changing.
                            current_news(&fd, newest.as_ref(), !h.backup_running())
                        }
                        SnapshotKind::Legacy1x => CurrentNews::No,
                    };
                    (Some(kind), news)
                }
                Err(_) => (None, CurrentNews::No),
            };
            (out, current, news)
        }
        Err(e) if no_such_host(&e) => (vec![], None, CurrentNews::No),
        Err(e) => return Err(e),
    };
    conn.send(&ServerMsg::SnapshotKinds {
        snapshots,
        current,
        current_news,
    })
}

/// What identifies a committed manifest: its generation (when recorded),
/// size and modification time, which a snapshot keeps.
#[derive(PartialEq, Eq)]
struct ManifestStamp {
    generation: Option<[u8; 32]>,
    size: u64,
    mtime: (i64, u64),
}

/// The stamp of the manifest of the snapshot (or `current`) open at
/// `snap`, and whether that tree is clean (matches it exactly); `None`
/// without a manifest.
fn manifest_stamp(snap: &std::os::fd::OwnedFd) -> Option<(ManifestStamp, bool)> {
    let meta = fsops::open_dir(snap, META_DIR).ok()?;
    let file = fsops::open_file(&meta, b"manifest").ok()?;
    let st = rustix::fs::fstat(&file).ok()?;
    let generation = match crate::backup::carry::read_generation(&file) {
        crate::backup::carry::Stored::Is(g) => Some(g),
        _ => None,
    };
    let clean = matches!(fsops::lstat_at(&meta, b"clean"), Ok(Some(_)));
    Some((
        ManifestStamp {
            generation,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as u64),
        },
        clean,
    ))
}

/// Whether byteback's `current` (open at `cur`) holds a committed backup
/// that the newest snapshot (`newest`, with its kind) does not: its
/// manifest differs from the snapshot's, by generation where both record
/// one, else by size and time. A `current` that is not clean has been
/// changed since its commit, by a backup cut off (or its marker was lost);
/// one not `idle` is being changed by a backup running now.
fn current_news(
    cur: &std::os::fd::OwnedFd,
    newest: Option<&(std::os::fd::OwnedFd, SnapshotKind)>,
    idle: bool,
) -> CurrentNews {
    let Some((stamp, clean)) = manifest_stamp(cur) else {
        return CurrentNews::No;
    };
    let same = match newest {
        Some((fd, SnapshotKind::Byteback)) => match manifest_stamp(fd) {
            Some((s, _)) => match (s.generation, stamp.generation) {
                (Some(a), Some(b)) => a == b,
                _ => s.size == stamp.size && s.mtime == stamp.mtime,
            },
            None => false,
        },
        // A 1.x snapshot is older than any backup byteback committed.
        Some((_, SnapshotKind::Legacy1x)) | None => false,
    };
    match (same, clean && idle) {
        (true, _) => CurrentNews::No,
        (false, true) => CurrentNews::Newer(stamp.mtime.0),
        (false, false) => CurrentNews::NewerBusy(stamp.mtime.0),
    }
}

/// Before `snapshot` is read: for `current`, takes the host's lock shared
/// (into `held`) until the restore reads another snapshot or the session
/// ends, so no backup changes it under the restore (refused while a backup
/// runs); the session then ends after `max_session` at the latest, so a
/// restore never holds backups off for longer. Snapshots never change:
/// reading one lets the lock go (a restore reads each snapshot's parts
/// together).
pub(super) fn hold_current(
    cfg: &ServeConfig,
    store: &Store,
    snapshot: &str,
    held: &mut Option<Option<std::fs::File>>,
) -> Result<()> {
    if snapshot != "current" {
        *held = None;
        return Ok(());
    }
    if held.is_some() {
        return Ok(());
    }
    let host = store.host(&cfg.host, false)?;
    let lock = host.lock_shared()?;
    let config = crate::config::StoreConfig::load(&cfg.store)?;
    if config.max_session > 0 {
        cfg.clock.start(std::time::Duration::from_secs(
            config.max_session.unsigned_abs(),
        ));
    }
    *held = Some(lock);
    Ok(())
}

/// A snapshot a restore session holds against prunes, and the host's
/// hold it takes for that (one session of a host at a time).
pub(super) type Held = (String, std::os::fd::OwnedFd, std::os::fd::OwnedFd);

/// The snapshot a request reads: `current` opened anew (the host's lock
/// keeps backups off it, see [`hold_current`]); any other opened once and
/// locked against prunes (see `HostStore::open_snapshot_to_read`), kept in
/// `held` while the session reads it, so a prune that another host's backup
/// starts does not delete it halfway through a restore. Only one session
/// of a host holds a snapshot at a time (`HostStore::restore_hold`): a
/// client cannot keep all of its host's snapshots from prunes (which would
/// delete other hosts' history instead); other sessions open it by name
/// for each request, as before.
pub(super) fn reading(
    cfg: &ServeConfig,
    store: &Store,
    snapshot: &str,
    held: &mut Option<Held>,
) -> Result<std::os::fd::OwnedFd> {
    let host = store.host(&cfg.host, false)?;
    let shown = || host.path.join(snapshot).display().to_string();
    if let Some((name, fd, _)) = held.as_ref() {
        if name == snapshot {
            return fd.try_clone().op("dup", shown);
        }
    }
    *held = None;
    if snapshot == "current" {
        return host.open_snapshot(snapshot);
    }
    // Held by another session (or the lock failing): read as before.
    let Some(hold) = host.restore_hold().ok().flatten() else {
        return host.open_snapshot(snapshot);
    };
    // Being deleted: refused at once, rather than failing halfway. A lock
    // that cannot be had otherwise: read unheld, as before.
    let Some(fd) = host.open_snapshot_to_read(snapshot)? else {
        return host.open_snapshot(snapshot);
    };
    let dup = fd.try_clone().op("dup", shown)?;
    *held = Some((snapshot.to_string(), fd, hold));
    Ok(dup)
}

/// Answers `ReadManifest`: the manifest of `snapshot` (open at `snap`), in parts.
pub(super) fn send_manifest<R: Read, W: Write>(
    cfg: &ServeConfig,
    store: &Store,
    conn: &mut Conn<R, W>,
    snapshot: &str,
    snap: std::os::fd::OwnedFd,
) -> Result<()> {
    let host = store.host(&cfg.host, false)?;
    if is_legacy(&snap, &host, snapshot)? {
        return send_legacy_manifest(conn, snap, snapshot);
    }
    let meta_path = host.path.join(snapshot).join(META_DIR_NAME);
    let meta = fsops::open_dir(&snap, META_DIR).op("open", || meta_path.display())?;
    let path = meta_path.join("manifest");
    let file = fsops::open_file(&meta, b"manifest").op("open", || path.display())?;
    let mut reader = ManifestReader::new(file, &path).map_err(Error::Manifest)?;
    let mut part = Batch::default();
    while let Some(e) = reader.next_entry().map_err(Error::Manifest)? {
        part.add(conn, e)?;
    }
    part.end(conn)
}

/// Manifest entries gathered for one `ManifestPart`: at most [`MAX_BATCH`]
/// of them, and at most a quarter of [`MAX_BUFFERED_BYTES`] by their
/// buffer cost (as the client announces them), so a message stays far
/// below a frame's limit whatever their xattrs. Cut by count alone, 1,024
/// entries of 20 KB of xattrs each made a message the client refused, and
/// the snapshot could not be listed or restored.
#[derive(Default)]
struct Batch {
    entries: Vec<ManifestEntry>,
    cost: usize,
}

impl Batch {
    fn add<R: Read, W: Write>(&mut self, conn: &mut Conn<R, W>, e: ManifestEntry) -> Result<()> {
        let cost = e.entry.buffer_cost();
        if !self.entries.is_empty() && self.cost + cost > MAX_BUFFERED_BYTES / 4 {
            self.send(conn)?;
        }
        self.cost += cost;
        self.entries.push(e);
        if self.entries.len() == MAX_BATCH {
            self.send(conn)?;
        }
        Ok(())
    }

    fn send<R: Read, W: Write>(&mut self, conn: &mut Conn<R, W>) -> Result<()> {
        self.cost = 0;
        conn.send(&ServerMsg::ManifestPart(std::mem::take(&mut self.entries)))
    }

    /// Sends what is left, then `ManifestEnd`.
    fn end<R: Read, W: Write>(mut self, conn: &mut Conn<R, W>) -> Result<()> {
        if !self.entries.is_empty() {
            self.send(conn)?;
        }
        conn.send(&ServerMsg::ManifestEnd)
    }
}

/// Answers `ReadFile`: the content of `path` in `snapshot` (open at
/// `snap`), then `FileDone`. A stored file that cannot be opened or read
/// ends early: the client finds it short, reports it damaged and goes on
/// with the rest of the restore.
pub(super) fn send_stored_file<R: Read, W: Write>(
    cfg: &ServeConfig,
    store: &Store,
    conn: &mut Conn<R, W>,
    streamer: &mut Option<Streamer>,
    (snapshot, snap): (&str, std::os::fd::OwnedFd),
    path: &[u8],
) -> Result<()> {
    let host = store.host(&cfg.host, false)?;
    let shown = crate::error::shown(path);
    // 1.x stored client paths as they are; byteback escapes top-level names
    // starting with `.byteback`.
    let on_disk = if is_legacy(&snap, &host, snapshot)? {
        path.to_vec()
    } else {
        disk_path(path)
    };
    match fsops::open_file(&snap, &on_disk) {
        Ok(f) => match streamer_for(streamer)?.send_file(conn, f, cfg.compress) {
            Ok(()) => {}
            Err(SendError::Read(io)) => tracing::error!(
                "cannot read {shown:?} in {snapshot}: {io}; sent what could be read"
            ),
            Err(SendError::Send(e)) => return Err(e),
        },
        // A path through a symlink or out of the tree is never a
        // legitimate read: refused, as before.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV)) => {
            return Err(Error::io("open", format!("{shown:?} in {snapshot}"), e))
        }
        Err(e) => tracing::error!("cannot open {shown:?} in {snapshot}: {e}"),
    }
    conn.send(&ServerMsg::FileDone)
}

/// Whether the snapshot (or `current`) open at `snap` is one of byteback 1.x.
fn is_legacy(snap: &std::os::fd::OwnedFd, host: &HostStore, name: &str) -> Result<bool> {
    legacy::is_legacy(snap).op("look at", || host.path.join(name).display().to_string())
}

/// The kind of the snapshot (or `current`) open at `snap`.
fn snapshot_kind(
    snap: &std::os::fd::OwnedFd,
    host: &HostStore,
    name: &str,
) -> Result<SnapshotKind> {
    Ok(if is_legacy(snap, host, name)? {
        SnapshotKind::Legacy1x
    } else {
        SnapshotKind::Byteback
    })
}

/// Streams the entries of a 1.x snapshot, derived from its tree (see
/// [`legacy`]), as a manifest; what an entry lost (rsync ACLs, xattrs
/// beyond byteback's limits) and entries left out (that cannot be read
/// as 1.x wrote them) go to the client as notes, in walk order.
fn send_legacy_manifest<R: Read, W: Write>(
    conn: &mut Conn<R, W>,
    snap: std::os::fd::OwnedFd,
    snapshot: &str,
) -> Result<()> {
    let walked = || format!("1.x snapshot {snapshot}");
    let mut walk = LegacyWalk::new(snap).context_with(walked)?;
    let mut part = Batch::default();
    // A note goes out as soon as it is found (the entries before it
    // first), so none is held; one on an entry is followed by that entry.
    let note = |conn: &mut Conn<R, W>, part: &mut Batch, n: legacy::Note| {
        if !part.entries.is_empty() {
            part.send(conn)?;
        }
        conn.send(&ServerMsg::ManifestNote {
            path: n.path,
            skipped: n.skipped,
            message: n.message,
        })
    };
    while let Some(step) = walk.next_step().context_with(walked)? {
        let e = match step {
            Walked::Skipped(n) => {
                note(conn, &mut part, n)?;
                continue;
            }
            Walked::Entry(e, n) => {
                if let Some(n) = n {
                    note(conn, &mut part, n)?;
                }
                e
            }
        };
        part.add(conn, e)?;
    }
    part.end(conn)
}

/// Why streaming a stored file stopped.
enum SendError {
    /// Reading it failed (what was read by then has been sent).
    Read(std::io::Error),
    /// Sending failed.
    Send(Error),
}

/// What streaming stored files reuses from one to the next: the read
/// buffer, the zstd context and the buffer of the part being sent (fresh
/// ones per part cost page faults for every MiB; see
/// [`byteback_protocol::os::keep_freed_buffers`]).
pub(super) struct Streamer {
    zstd: ChunkCompressor,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// Bytes of a stored file read (and sent) at a time.
const READ_LEN: usize = if MAX_CHUNK < 1 << 20 {
    MAX_CHUNK
} else {
    1 << 20
};

/// The session's [`Streamer`], made at its first file.
fn streamer_for(s: &mut Option<Streamer>) -> Result<&mut Streamer> {
    if s.is_none() {
        byteback_protocol::os::keep_freed_buffers();
        *s = Some(Streamer {
            zstd: ChunkCompressor::new(DATA_LEVEL).map_err(Error::from)?,
            buf: vec![0u8; READ_LEN],
            out: Vec::new(),
        });
    }
    s.as_mut().ok_or(Error::Internal("no streamer"))
}

impl Streamer {
    /// Streams a stored file's content as `FilePart`s, compressed, or as
    /// `FilePartRaw`s, sent from the read buffer as they are, where a
    /// sample says they do not shrink (see
    /// [`ChunkCompressor::compress_if_worth_it`]) or `compress` is off.
    fn send_file<R: Read, W: Write>(
        &mut self,
        conn: &mut Conn<R, W>,
        mut f: std::fs::File,
        compress: bool,
    ) -> std::result::Result<(), SendError> {
        loop {
            let n = read_full(&mut f, &mut self.buf).map_err(SendError::Read)?;
            if n == 0 {
                return Ok(());
            }
            let out = std::mem::take(&mut self.out);
            let packed = match compress {
                true => self.zstd.compress_if_worth_it(&self.buf[..n], out),
                false => Ok(Err(out)),
            }
            .map_err(|e| SendError::Send(e.into()))?;
            let sent = match packed {
                Ok(part) => {
                    let msg = ServerMsg::FilePart(part);
                    let sent = conn.send(&msg);
                    if let ServerMsg::FilePart(Compressed { data, .. }) = msg {
                        self.out = data;
                    }
                    sent
                }
                Err(out) => {
                    self.out = out;
                    let buf = std::mem::take(&mut self.buf);
                    let msg = ServerMsg::FilePartRaw(RawBytes::part(buf, 0, n));
                    let sent = conn.send(&msg);
                    if let ServerMsg::FilePartRaw(raw) = msg {
                        self.buf = raw.into_buf();
                    }
                    sent
                }
            };
            sent.map_err(SendError::Send)?;
            if n < self.buf.len() {
                return Ok(());
            }
        }
    }
}

/// Reads up to `buf.len()` bytes, fewer only at the end of `r`.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

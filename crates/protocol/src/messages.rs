//! The messages exchanged by client and server, and their validation.
//!
//! Paths are raw bytes relative to the backed-up root (`etc/passwd` for
//! `/etc/passwd`): Linux names can hold any byte but `/` and NUL.

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::limits::*;
use crate::path::validate_path;

/// What kind of filesystem object an entry is, with the data that depends on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Regular file of `size` bytes.
    File {
        /// Length in bytes.
        size: u64,
    },
    /// Directory.
    Dir,
    /// Symbolic link; never followed by either side.
    Symlink {
        /// Raw link target.
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// A further name of an object sent earlier in the same backup: a
    /// regular file, or (protocol 11) a symlink, FIFO, socket or device
    /// node; never a directory.
    HardLink {
        /// Path of the first name of the object.
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    CharDev {
        /// Device number as `st_rdev`.
        rdev: u64,
    },
    /// Block device.
    BlockDev {
        /// Device number as `st_rdev`.
        rdev: u64,
    },
}

impl Kind {
    /// One-letter type as in `ls -l`.
    pub fn type_char(&self) -> char {
        match self {
            Kind::File { .. } | Kind::HardLink { .. } => '-',
            Kind::Dir => 'd',
            Kind::Symlink { .. } => 'l',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
            Kind::CharDev { .. } => 'c',
            Kind::BlockDev { .. } => 'b',
        }
    }
}

/// What wrote a snapshot, as the server found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Written by byteback: it carries a manifest with the BLAKE3 of every file.
    Byteback,
    /// Written by byteback 1.x (rsync `--fake-super`): no manifest; the
    /// server derives the entries from the tree, and sends no stored hash
    /// (files from it are restored unverified).
    Legacy1x,
}

/// Whether `current` holds a committed backup that no snapshot has: one
/// committed within the minimum interval between snapshots, or whose
/// snapshot could not be taken. byteback 1.x's restore read `current`
/// along with the snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CurrentNews {
    /// No: `current` is the newest snapshot's backup, or there is none.
    No,
    /// Yes, committed at this Unix time.
    Newer(i64),
    /// Yes, committed at this Unix time, but a backup of the host is
    /// writing `current` now, or was cut off since (it may not match).
    NewerBusy(i64),
}

impl SnapshotKind {
    /// How listings name the kind.
    pub fn label(self) -> &'static str {
        match self {
            SnapshotKind::Byteback => "byteback",
            SnapshotKind::Legacy1x => "1.x",
        }
    }
}

/// Extended attributes as (name, value) pairs of raw bytes.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The order in which [`fit_xattrs`] keeps xattrs: those that carry
/// permissions and security labels first (`system.`, then `security.`,
/// then `trusted.`), then the rest, each kind by name.
pub fn xattr_keep_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let rank = |n: &[u8]| {
        [&b"system."[..], b"security.", b"trusted."]
            .iter()
            .position(|p| n.starts_with(p))
            .unwrap_or(3)
    };
    rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
}

/// Keeps of `xattrs` (sorted by name) what one entry may carry (see
/// [`crate::limits`]: [`MAX_XATTRS`] of them, [`MAX_XATTR_TOTAL`]
/// bytes of names and values): those that carry permissions and security
/// labels first (`system.`, then `security.`, then `trusted.`), then the
/// rest, each kind in name order. Returns the names left out (none on
/// almost every file: Linux allows more, few filesystems hold that many).
///
/// [`MAX_XATTRS`]: crate::limits::MAX_XATTRS
/// [`MAX_XATTR_TOTAL`]: crate::limits::MAX_XATTR_TOTAL
pub fn fit_xattrs(xattrs: &mut Xattrs) -> Vec<Vec<u8>> {
    use crate::limits::{MAX_XATTRS, MAX_XATTR_NAME, MAX_XATTR_TOTAL, MAX_XATTR_VALUE};
    let size = |(n, v): &(Vec<u8>, Vec<u8>)| n.len() + v.len();
    if xattrs.len() <= MAX_XATTRS && xattrs.iter().map(size).sum::<usize>() <= MAX_XATTR_TOTAL {
        return Vec::new();
    }
    let mut all = std::mem::take(xattrs);
    all.sort_by(|a, b| xattr_keep_order(&a.0, &b.0));
    let (mut total, mut dropped) = (0usize, Vec::new());
    for x in all {
        let fits = xattrs.len() < MAX_XATTRS
            && x.0.len() <= MAX_XATTR_NAME
            && x.1.len() <= MAX_XATTR_VALUE
            && total + size(&x) <= MAX_XATTR_TOTAL;
        if fits {
            total += size(&x);
            xattrs.push(x);
        } else {
            dropped.push(x.0);
        }
    }
    xattrs.sort_by(|a, b| a.0.cmp(&b.0));
    dropped.sort();
    dropped
}

/// One filesystem object as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to `/`, raw bytes.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    /// Type and type-specific data.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds part.
    pub mtime_nsec: u32,
    /// Extended attributes (including `system.posix_acl_*`), sorted by name.
    #[serde(with = "xattr_bytes")]
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// Checks every field against the protocol limits.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        validate_path(&self.path)?;
        if self.mode > 0o7777 {
            return Err(ProtocolError::Limit(format!(
                "mode {:o} has non-permission bits",
                self.mode
            )));
        }
        if self.mtime_nsec >= 1_000_000_000 {
            return Err(ProtocolError::Limit(
                "mtime nanoseconds out of range".into(),
            ));
        }
        match &self.kind {
            Kind::File { size } if *size > MAX_FILE_SIZE => {
                return Err(ProtocolError::Limit(format!("file size {size} too large")))
            }
            Kind::Symlink { target }
                if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) =>
            {
                return Err(ProtocolError::Limit(
                    "symlink target empty, too long or has NUL".into(),
                ))
            }
            Kind::HardLink { target } => validate_path(target)?,
            // The kernel's device numbers are 12 bits of major and 20 of
            // minor: glibc's encoding of those fits in 32 bits, and
            // anything larger would be made as another device (or refused).
            Kind::CharDev { rdev } | Kind::BlockDev { rdev } if *rdev > u64::from(u32::MAX) => {
                return Err(ProtocolError::Limit(format!(
                    "device number {rdev:#x} is not one Linux can make"
                )))
            }
            _ => {}
        }
        if self.xattrs.len() > MAX_XATTRS {
            return Err(ProtocolError::Limit(format!(
                "{} xattrs on one entry",
                self.xattrs.len()
            )));
        }
        let mut total = 0usize;
        for (name, value) in &self.xattrs {
            if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains(&0) {
                return Err(ProtocolError::Limit("bad xattr name".into()));
            }
            if value.len() > MAX_XATTR_VALUE {
                return Err(ProtocolError::Limit("xattr value too large".into()));
            }
            total += name.len() + value.len();
        }
        if total > MAX_XATTR_TOTAL {
            return Err(ProtocolError::Limit("xattrs too large in total".into()));
        }
        Ok(())
    }

    /// Approximate memory an entry takes while buffered, for flow control.
    pub fn buffer_cost(&self) -> usize {
        let target = match &self.kind {
            Kind::Symlink { target } | Kind::HardLink { target } => target.len(),
            _ => 0,
        };
        128 + self.path.len() + target + self.xattr_cost()
    }

    /// The xattrs' part of [`Entry::buffer_cost`].
    pub fn xattr_cost(&self) -> usize {
        self.xattrs
            .iter()
            .map(|(n, v)| 48 + n.len() + v.len())
            .sum::<usize>()
    }

    /// Size in bytes for regular files, else 0.
    pub fn size(&self) -> u64 {
        match self.kind {
            Kind::File { size } => size,
            _ => 0,
        }
    }
}

/// An entry as recorded in a manifest: the entry plus, for files, the BLAKE3 of its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// The entry as the client described it.
    pub entry: Entry,
    /// BLAKE3 of the content for regular files, zeros otherwise.
    pub hash: [u8; 32],
}

/// Bytes compressed with zstd, with their declared raw length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compressed {
    /// Length after decompression; at most [`MAX_CHUNK`].
    pub raw_len: u32,
    /// zstd frame.
    #[serde(with = "bulk_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Compressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Compressed({} -> {} bytes)",
            self.data.len(),
            self.raw_len
        )
    }
}

/// Bytes carried as they are, from where they start in a buffer: a sender
/// that filled a buffer behind room for a header sends the rest without
/// moving it, and a receiver can take over the buffer it read the frame into
/// (see [`crate::codec::decode_client_frame`]). Equal when the bytes are.
#[derive(Clone, Default)]
pub struct RawBytes {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RawBytes {
    /// `buf[start..]` (nothing if `start` is beyond its end).
    pub fn new(buf: Vec<u8>, start: usize) -> Self {
        let end = buf.len();
        Self::part(buf, start, end)
    }

    /// `buf[start..end]`, clamped to the buffer; [`into_buf`](Self::into_buf)
    /// gives back all of `buf`, so a reader's buffer need not be resized
    /// (and zeroed) again for the next read.
    pub fn part(buf: Vec<u8>, start: usize, end: usize) -> Self {
        let end = end.min(buf.len());
        let start = start.min(end);
        RawBytes { buf, start, end }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Their number.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole buffer they are in, to be used again.
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }
}

impl From<Vec<u8>> for RawBytes {
    fn from(buf: Vec<u8>) -> Self {
        RawBytes::new(buf, 0)
    }
}

impl PartialEq for RawBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for RawBytes {}

impl std::fmt::Debug for RawBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawBytes({} bytes)", self.len())
    }
}

impl Serialize for RawBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_slice())
    }
}

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bulk_bytes::deserialize(d).map(RawBytes::from)
    }
}

impl Compressed {
    /// Compresses `raw` (at most [`MAX_CHUNK`] bytes).
    pub fn compress(raw: &[u8], level: i32) -> Result<Self, ProtocolError> {
        if raw.len() > MAX_CHUNK {
            return Err(ProtocolError::Encode(format!(
                "chunk of {} bytes too large",
                raw.len()
            )));
        }
        let data =
            zstd::bulk::compress(raw, level).map_err(|e| ProtocolError::Encode(e.to_string()))?;
        Ok(Compressed {
            raw_len: raw.len() as u32,
            data,
        })
    }

    /// Decompresses, refusing anything larger than declared or than [`MAX_CHUNK`].
    pub fn decompress(&self) -> Result<Vec<u8>, ProtocolError> {
        let raw_len = self.raw_len as usize;
        if raw_len > MAX_CHUNK {
            return Err(ProtocolError::Limit(format!(
                "declared chunk of {raw_len} bytes"
            )));
        }
        let out = zstd::bulk::decompress(&self.data, raw_len)
            .map_err(|e| ProtocolError::Compression(e.to_string()))?;
        if out.len() != raw_len {
            return Err(ProtocolError::Compression(format!(
                "chunk decompressed to {} bytes, {} declared",
                out.len(),
                raw_len
            )));
        }
        Ok(out)
    }
}

/// What the server wants for one entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    /// Index of the entry within its batch.
    pub index: u32,
    /// Transfer id the client uses for this file's data.
    pub id: u32,
    /// Whether the server has a basis to diff against (ask with [`ClientMsg::SigRequest`]).
    pub basis: bool,
    /// The server holds a stored file of this size (at least
    /// [`crate::limits::TWIN_MIN`] bytes) in the host's tree: the client may
    /// offer the file's BLAKE3 with [`ClientMsg::FileClone`] before sending
    /// any data, and the server clones that content if it holds it. Set
    /// with a basis only in checksum mode, for a file whose stored copy has
    /// the entry's size and mtime: the server keeps that copy if the offered
    /// BLAKE3 is its content, else answers [`ServerMsg::SendData`] and the
    /// file is sent as a changed one, against the basis.
    pub twin: bool,
}

/// What the server's error says when a run of unchanged entries does not
/// match its manifest: the client then forgets what it recorded and runs the
/// backup again announcing every entry.
pub const UNCHANGED_MISMATCH: &str = "unchanged entries do not match the manifest";

/// Counters the server reports at the end of a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Entries received.
    pub entries: u64,
    /// Files whose data was transferred.
    pub files_transferred: u64,
    /// Bytes of file content written by patches (literal) on the server.
    pub literal_bytes: u64,
    /// Bytes reused from the previous version.
    pub matched_bytes: u64,
    /// Entries deleted from `current`.
    pub deleted: u64,
    /// Files that failed their hash check and were resent whole.
    pub retried: u64,
    /// New files taken from a stored file with the same content (moved or
    /// copied files): cloned on the server, nothing sent.
    pub cloned: u64,
    /// Entries kept from the last backup because the client could not read
    /// them this time ([`ClientMsg::KeepUnread`]).
    pub kept_unread: u64,
    /// Entries the server left out of this backup, or kept at their last
    /// version, each with a warning in [`ServerMsg::BackupDone`]'s message
    /// (a hard link whose content it cannot tell, a file whose data failed
    /// its check twice): the backup is partial.
    pub left_out: u64,
}

/// Messages from client to server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message: magic and version.
    Hello {
        /// Must equal [`crate::MAGIC`].
        magic: [u8; 8],
        /// Must equal [`crate::PROTOCOL_VERSION`].
        version: u32,
    },
    /// Start a backup into `current`.
    BackupStart {
        /// Compare content by BLAKE3 instead of size and mtime.
        checksum: bool,
    },
    /// A batch of entries, in strictly increasing walk order.
    Entries(#[serde(deserialize_with = "capped::batch")] Vec<Entry>),
    /// A batch of `count` entries (1 to [`MAX_BATCH`]) equal to the next
    /// `count` entries of the server's manifest, in place of sending them:
    /// `digest` is the [`crate::unchanged::Chain`] of their digests. Only
    /// sent when [`ServerMsg::BackupReady`] named the generation of the
    /// manifest the client recorded. The server checks the digest against
    /// its own entries and carries them over (a mismatch fails the backup,
    /// see [`UNCHANGED_MISMATCH`]); it answers with an empty
    /// [`ServerMsg::Needs`], like a batch that needs nothing.
    Unchanged {
        /// Entries in the run.
        count: u32,
        /// Chain of their digests.
        digest: [u8; 32],
    },
    /// Ask for the signature of the basis of transfer `id`.
    SigRequest {
        /// Transfer id.
        id: u32,
    },
    /// One delta segment of transfer `id` (librsync delta format), compressed.
    FileData {
        /// Transfer id.
        id: u32,
        /// The delta segment.
        delta: Compressed,
    },
    /// All data of transfer `id` sent.
    FileEnd {
        /// Transfer id.
        id: u32,
        /// Size of the file as read.
        size: u64,
        /// BLAKE3 of the content as read.
        hash: [u8; 32],
        /// mtime as read, in case the file changed while being read.
        mtime_sec: i64,
        /// mtime nanoseconds.
        mtime_nsec: u32,
    },
    /// Transfer `id` (announced with [`Need::twin`], nothing sent yet) has
    /// this content: if the server holds a stored file with that BLAKE3 and
    /// size, it clones it, checks the clone's BLAKE3 and answers
    /// [`ServerMsg::FileOk`]; otherwise [`ServerMsg::SendData`].
    FileClone {
        /// Transfer id.
        id: u32,
        /// Size of the file as read.
        size: u64,
        /// BLAKE3 of the content as read.
        hash: [u8; 32],
        /// mtime as read.
        mtime_sec: i64,
        /// mtime nanoseconds.
        mtime_nsec: u32,
    },
    /// Transfer `id` will not complete (file vanished or could not be read).
    FileAbort {
        /// Transfer id.
        id: u32,
    },
    /// All entries sent; commit, snapshot and report.
    BackupEnd,
    /// List the host's snapshots.
    ListSnapshots,
    /// Stream the manifest of one snapshot (or `current`).
    ReadManifest {
        /// Snapshot name.
        snapshot: String,
    },
    /// Stream the content of one file of a snapshot.
    ReadFile {
        /// Snapshot name.
        snapshot: String,
        /// Path as in the manifest.
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
    },
    /// End the session.
    Bye,
    /// List the host's snapshots with their kinds (and the kind of `current`).
    ListSnapshotKinds,
    /// An [`ClientMsg::Entries`] message, zstd-compressed: the paths of a
    /// batch share most of their bytes. Only on the wire: the decoder turns it
    /// back into `Entries` (see [`crate::codec::decode_client`]), so nothing
    /// after it, the session included, ever sees this variant.
    EntriesZ(Compressed),
    /// [`ClientMsg::FileData`] sent as it is, not as a zstd frame: what a
    /// client sends when compressing would only cost CPU (a local store,
    /// incompressible data). Neither side copies it into or out of a frame.
    FileRaw {
        /// Transfer id.
        id: u32,
        /// The delta segment, at most [`MAX_CHUNK`] bytes.
        delta: RawBytes,
    },
    /// The client could not read `path` (its entry is not sent) or could
    /// not list the directory `path` (its entry was sent just before): the
    /// server keeps the old entries at and below `path` that the client
    /// does not send, instead of deleting them. In walk order with the
    /// entries (not before the last path sent); answered with an empty
    /// [`ServerMsg::Needs`], like a batch that needs nothing.
    /// Last of the variants: the tags of those before it stay as they
    /// were (the codec reads [`ClientMsg::FileRaw`]'s tag itself).
    KeepUnread {
        /// The path, as entries name it.
        path: Vec<u8>,
    },
}

impl ClientMsg {
    /// Name of the message kind, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            ClientMsg::Hello { .. } => "Hello",
            ClientMsg::BackupStart { .. } => "BackupStart",
            ClientMsg::Entries(_) => "Entries",
            ClientMsg::Unchanged { .. } => "Unchanged",
            ClientMsg::KeepUnread { .. } => "KeepUnread",
            ClientMsg::SigRequest { .. } => "SigRequest",
            ClientMsg::FileData { .. } => "FileData",
            ClientMsg::FileRaw { .. } => "FileRaw",
            ClientMsg::FileEnd { .. } => "FileEnd",
            ClientMsg::FileClone { .. } => "FileClone",
            ClientMsg::FileAbort { .. } => "FileAbort",
            ClientMsg::BackupEnd => "BackupEnd",
            ClientMsg::ListSnapshots => "ListSnapshots",
            ClientMsg::ReadManifest { .. } => "ReadManifest",
            ClientMsg::ReadFile { .. } => "ReadFile",
            ClientMsg::Bye => "Bye",
            ClientMsg::ListSnapshotKinds => "ListSnapshotKinds",
            ClientMsg::EntriesZ(_) => "EntriesZ",
        }
    }

    /// Checks the message's contents against the limits (paths, counts, sizes).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            ClientMsg::Entries(entries) => {
                if entries.is_empty() || entries.len() > MAX_BATCH {
                    return Err(ProtocolError::Limit(format!(
                        "batch of {} entries",
                        entries.len()
                    )));
                }
                entries.iter().try_for_each(Entry::validate)
            }
            ClientMsg::KeepUnread { path } => {
                // The root (empty) too: a source `/` the client cannot list.
                if path.is_empty() {
                    Ok(())
                } else {
                    validate_path(path)
                }
            }
            ClientMsg::Unchanged { count, .. } => {
                if *count == 0 || *count as usize > MAX_BATCH {
                    return Err(ProtocolError::Limit(format!(
                        "run of {count} unchanged entries"
                    )));
                }
                Ok(())
            }
            ClientMsg::FileData { delta, .. } => {
                if delta.raw_len as usize > MAX_CHUNK {
                    return Err(ProtocolError::Limit("data chunk too large".into()));
                }
                Ok(())
            }
            ClientMsg::FileRaw { delta, .. } => {
                if delta.len() > MAX_CHUNK {
                    return Err(ProtocolError::Limit("data chunk too large".into()));
                }
                Ok(())
            }
            ClientMsg::FileEnd {
                size, mtime_nsec, ..
            }
            | ClientMsg::FileClone {
                size, mtime_nsec, ..
            } => {
                if *size > MAX_FILE_SIZE || *mtime_nsec >= 1_000_000_000 {
                    return Err(ProtocolError::Limit("file end out of range".into()));
                }
                Ok(())
            }
            ClientMsg::ReadManifest { snapshot } => crate::path::validate_snapshot_name(snapshot),
            ClientMsg::ReadFile { snapshot, path } => {
                crate::path::validate_snapshot_name(snapshot)?;
                validate_path(path)
            }
            _ => Ok(()),
        }
    }
}

/// Messages from server to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Reply to Hello.
    HelloOk {
        /// Server's version.
        version: u32,
        /// Host name the server files this session under (from its own command line).
        host: String,
    },
    /// Backup accepted; entries may follow.
    BackupReady {
        /// The generation of the manifest of `current` (the
        /// [`crate::unchanged::Chain`] of its entries), when `current`
        /// matches it exactly: a client that recorded the same may send
        /// [`ClientMsg::Unchanged`].
        generation: Option<[u8; 32]>,
    },
    /// Reply to one Entries batch: which entries need data.
    Needs(#[serde(deserialize_with = "capped::batch")] Vec<Need>),
    /// Reply to SigRequest.
    Signature {
        /// Transfer id.
        id: u32,
        /// Serialized signature.
        #[serde(with = "bulk_bytes")]
        sig: Vec<u8>,
    },
    /// Transfer committed to `current`.
    FileOk {
        /// Transfer id.
        id: u32,
    },
    /// Transfer failed its hash check; resend it whole (no basis) under the same id.
    FileRetry {
        /// Transfer id.
        id: u32,
    },
    /// Reply to [`ClientMsg::FileClone`]: the server does not hold that
    /// content (or its copy did not check out); send the data (against the
    /// basis when the need had one, see [`Need::twin`]).
    SendData {
        /// Transfer id.
        id: u32,
    },
    /// Backup committed.
    BackupDone {
        /// Name of the snapshot taken, if one was.
        snapshot: Option<String>,
        /// Human-readable note (e.g. why no snapshot was taken).
        message: String,
        /// Counters.
        stats: BackupStats,
        /// The generation of the manifest now committed (see
        /// [`ServerMsg::BackupReady`]).
        generation: Option<[u8; 32]>,
    },
    /// The host's snapshots, oldest first.
    Snapshots(#[serde(deserialize_with = "capped::snapshots")] Vec<String>),
    /// Part of a manifest.
    ManifestPart(#[serde(deserialize_with = "capped::batch")] Vec<ManifestEntry>),
    /// End of a manifest.
    ManifestEnd,
    /// Part of a file's content.
    FilePart(Compressed),
    /// End of a file's content.
    FileDone,
    /// Fatal error; the server closes the session.
    Error {
        /// What went wrong.
        message: String,
    },
    /// Reply to `ListSnapshotKinds`: the host's snapshots, oldest first, each
    /// with its kind, and the kind of `current` (`None` when there is none).
    SnapshotKinds {
        /// (name, kind), oldest first.
        #[serde(deserialize_with = "capped::snapshots")]
        snapshots: Vec<(String, SnapshotKind)>,
        /// Kind of `current`.
        current: Option<SnapshotKind>,
        /// Whether `current` holds a backup no snapshot has.
        current_news: CurrentNews,
    },
    /// [`ServerMsg::FilePart`] sent as it is, not as a zstd frame: what a
    /// server sends when compressing would only cost CPU (a local store,
    /// incompressible data). Neither side copies it into or out of a frame.
    FilePartRaw(RawBytes),
    /// Within a manifest (between its parts): `path` could not be sent as
    /// it is stored (a byteback 1.x snapshot's xattrs trimmed, an rsync ACL
    /// not decoded, an entry that does not parse). A client restoring the
    /// path warns and ends partial.
    ManifestNote {
        /// The path, as in the manifest.
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        /// The entry is left out of the manifest (with everything below
        /// it; when its own path is longer than a path may be, `path` is
        /// the directory holding it and `message` names it); otherwise it
        /// is the next entry sent, with less than was stored.
        skipped: bool,
        /// What was lost, and why.
        message: String,
    },
}

impl ServerMsg {
    /// Name of the message kind, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            ServerMsg::HelloOk { .. } => "HelloOk",
            ServerMsg::BackupReady { .. } => "BackupReady",
            ServerMsg::Needs(_) => "Needs",
            ServerMsg::Signature { .. } => "Signature",
            ServerMsg::FileOk { .. } => "FileOk",
            ServerMsg::FileRetry { .. } => "FileRetry",
            ServerMsg::SendData { .. } => "SendData",
            ServerMsg::BackupDone { .. } => "BackupDone",
            ServerMsg::Snapshots(_) => "Snapshots",
            ServerMsg::ManifestPart(_) => "ManifestPart",
            ServerMsg::ManifestEnd => "ManifestEnd",
            ServerMsg::FilePart(_) => "FilePart",
            ServerMsg::FilePartRaw(_) => "FilePartRaw",
            ServerMsg::FileDone => "FileDone",
            ServerMsg::Error { .. } => "Error",
            ServerMsg::SnapshotKinds { .. } => "SnapshotKinds",
            ServerMsg::ManifestNote { .. } => "ManifestNote",
        }
    }

    /// Checks the message's contents against the limits.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            ServerMsg::Needs(needs) if needs.len() > MAX_BATCH => {
                Err(ProtocolError::Limit("too many needs".into()))
            }
            ServerMsg::Signature { sig, .. } if sig.len() > MAX_SIGNATURE => {
                Err(ProtocolError::Limit("signature too large".into()))
            }
            ServerMsg::Snapshots(s) if s.len() > MAX_SNAPSHOTS => {
                Err(ProtocolError::Limit("too many snapshots".into()))
            }
            ServerMsg::SnapshotKinds { snapshots, .. } if snapshots.len() > MAX_SNAPSHOTS => {
                Err(ProtocolError::Limit("too many snapshots".into()))
            }
            ServerMsg::ManifestPart(entries) => {
                // An empty part moves nothing on: a stream of them would
                // keep a restore waiting with its I/O timeout never due.
                if entries.is_empty() || entries.len() > MAX_BATCH {
                    return Err(ProtocolError::Limit(
                        "manifest part empty or too large".into(),
                    ));
                }
                entries.iter().try_for_each(|e| e.entry.validate())
            }
            ServerMsg::FilePart(c) if c.raw_len as usize > MAX_CHUNK => {
                Err(ProtocolError::Limit("chunk too large".into()))
            }
            ServerMsg::FilePartRaw(b) if b.len() > MAX_CHUNK => {
                Err(ProtocolError::Limit("chunk too large".into()))
            }
            ServerMsg::ManifestNote { path, message, .. } => {
                if message.len() > MAX_TEXT {
                    return Err(ProtocolError::Limit("manifest note too long".into()));
                }
                validate_path(path)
            }
            ServerMsg::Error { message } if message.len() > MAX_TEXT => {
                Err(ProtocolError::Limit("error text too long".into()))
            }
            ServerMsg::BackupDone {
                snapshot, message, ..
            } => {
                if message.len() > MAX_BACKUP_MESSAGE {
                    return Err(ProtocolError::Limit("backup message too long".into()));
                }
                match snapshot {
                    Some(name) => crate::validate_snapshot_name(name)
                        .map_err(|e| ProtocolError::Limit(format!("bad snapshot name: {e}"))),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

/// Large byte strings (chunks, signatures), encoded as `serde_bytes` does,
/// decoded by copying them out of the frame: bincode's own `Vec<u8>` decoding
/// zeroed each one before copying (1 % of the server's time receiving a large
/// file).
mod bulk_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

/// Encodes xattr names and values as byte strings rather than sequences of
/// single bytes (which bincode would write one element at a time).
mod xattr_bytes {
    use serde::{Deserializer, Serialize, Serializer};
    use serde_bytes::ByteBuf;

    pub fn serialize<S: Serializer>(v: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(&serde_bytes::Bytes, &serde_bytes::Bytes)> = v
            .iter()
            .map(|(n, x)| (serde_bytes::Bytes::new(n), serde_bytes::Bytes::new(x)))
            .collect();
        pairs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Xattrs, D::Error> {
        let pairs: Vec<(ByteBuf, ByteBuf)> = super::capped::seq(d, super::MAX_XATTRS, "xattrs")?;
        Ok(pairs
            .into_iter()
            .map(|(n, x)| (n.into_vec(), x.into_vec()))
            .collect())
    }
}

/// Sequences from the wire decoded with their length capped before any
/// element is: bincode checks the frame's bytes, not what they decode to,
/// and an element can take many times its bytes on the wire in memory (an
/// empty xattr pair: 2 bytes sent, 48 held). A sequence longer than the
/// protocol allows is refused from its length alone; `validate` checks the
/// rest once the message is decoded.
mod capped {
    use std::marker::PhantomData;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    /// At most [`super::MAX_BATCH`] elements (entries, needs, manifest entries).
    pub fn batch<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        seq(d, super::MAX_BATCH, "entries in a batch")
    }

    /// At most [`super::MAX_SNAPSHOTS`] elements.
    pub fn snapshots<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        seq(d, super::MAX_SNAPSHOTS, "snapshots")
    }

    /// A sequence of at most `max` elements (`what` names them in the error).
    pub fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
        max: usize,
        what: &'static str,
    ) -> Result<Vec<T>, D::Error> {
        struct Capped<T> {
            max: usize,
            what: &'static str,
            t: PhantomData<T>,
        }
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "at most {} {}", self.max, self.what)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let too_many = || A::Error::custom(format!("more than {} {}", self.max, self.what));
                let hint = seq.size_hint().unwrap_or(0);
                if hint > self.max {
                    return Err(too_many());
                }
                let mut v = Vec::with_capacity(hint.min(1024));
                while let Some(x) = seq.next_element()? {
                    if v.len() == self.max {
                        return Err(too_many());
                    }
                    v.push(x);
                }
                Ok(v)
            }
        }
        d.deserialize_seq(Capped {
            max,
            what,
            t: PhantomData,
        })
    }
}

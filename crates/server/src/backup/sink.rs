//! Writing one received file: decompressing its delta segments, applying
//! them against the basis (cloned ranges where the filesystem can share
//! extents, holes for all-zero blocks, plain writes otherwise), hashing
//! what is written, checking the client's BLAKE3 and size, and finishing
//! the file (length, mtime, writeback). The one sparse writer of the server.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;

use byteback_delta::{apply_ops, DeltaError, FileHasher, PatchSink};
use byteback_protocol::codec::ChunkDecompressor;
use byteback_protocol::Compressed;

use super::digest::{BasisDigest, Digest, Kept, KeptBudget, Lease};
use crate::error::{shown, Error, Result};
use crate::fsops;
use byteback_protocol::os::write_sparse_at;

/// The block size holes and clones are aligned to.
pub(super) const FS_BLOCK: u64 = byteback_protocol::os::SPARSE_BLOCK as u64;
pub(super) const IO_CHUNK: usize = 1 << 20;
/// Start writeback of a file being received every this many bytes.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// One part of a [`Basis`]: `len` bytes of `file`, at `start` in the basis.
pub(super) struct BasisPart {
    pub file: File,
    pub start: u64,
    pub len: u64,
}

/// What a delta's copies read from: the prefix of an interrupted rebuild of
/// the same file, if one was kept, followed by the stored copy, if any. A
/// copy is served from whichever part holds its offset.
pub(super) struct Basis {
    pub parts: Vec<BasisPart>,
}

impl Basis {
    pub fn len(&self) -> u64 {
        self.parts.last().map(|p| p.start + p.len).unwrap_or(0)
    }

    /// The part holding virtual offset `off`: its file, the offset in it and
    /// how many bytes of the part are left from there.
    pub fn locate(&self, off: u64) -> Option<(&File, u64, u64)> {
        self.parts
            .iter()
            .find(|p| off >= p.start && off < p.start + p.len)
            .map(|p| (&p.file, off - p.start, p.start + p.len - off))
    }
}

/// One delta segment as it came: a zstd frame, or the delta itself.
#[derive(Clone, Copy)]
pub enum Chunk<'a> {
    /// [`byteback_protocol::ClientMsg::FileData`]'s.
    Zstd(&'a Compressed),
    /// [`byteback_protocol::ClientMsg::FileRaw`]'s.
    Raw(&'a [u8]),
}

impl Chunk<'_> {
    /// Its length once decoded (as declared, for a zstd frame).
    pub fn raw_len(&self) -> u32 {
        match self {
            Chunk::Zstd(c) => c.raw_len,
            // Capped at MAX_CHUNK by the message's validation.
            Chunk::Raw(r) => u32::try_from(r.len()).unwrap_or(u32::MAX),
        }
    }

    /// Its length on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            Chunk::Zstd(c) => c.data.len(),
            Chunk::Raw(r) => r.len(),
        }
    }
}

/// Decompresses delta segments into a buffer kept between them.
pub(super) struct Decoder {
    unzstd: ChunkDecompressor,
    raw: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Result<Self> {
        Ok(Decoder {
            unzstd: ChunkDecompressor::new()?,
            raw: vec![],
        })
    }

    /// The delta: a raw one where it lies, a zstd frame decompressed.
    pub fn decode<'a>(&'a mut self, delta: Chunk<'a>) -> Result<&'a [u8]> {
        match delta {
            Chunk::Raw(r) => Ok(r),
            Chunk::Zstd(c) => {
                self.unzstd.decompress_into(c, &mut self.raw)?;
                Ok(&self.raw)
            }
        }
    }
}

/// Bytes of a segment served from the basis and sent literally, and of
/// those served from the basis, the ones written out rather than shared
/// with it by a clone (disc space they take as literal bytes do).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Applied {
    pub matched: u64,
    pub literal: u64,
    pub copied: u64,
    /// Of the literal and copied bytes, the whole blocks of zeros left as
    /// holes (no disc space: a sparse file's holes are not growth).
    pub holes: u64,
    /// Extent items clones added to the filesystem's metadata, counted as
    /// [`clone_items`] (see [`CLONE_COST`]).
    pub clones: u64,
}

/// What one clone costs on disc, counted as growth: the extent item it
/// adds to the btrfs metadata (118-120 bytes measured per clone of 4 KiB,
/// twice with DUP metadata). An honest delta clones once per run of
/// matched blocks (adjacent COPY ops are merged), so this is little
/// against the bytes it writes; a client sending a delta of thousands of
/// 7-byte COPY ops of 4 KiB at shuffled offsets fills the metadata at
/// this rate, and the growth guard sees it.
pub(super) const CLONE_COST: u64 = 256;

/// Extent items a clone of `len` bytes is counted for: one per 128 KiB
/// (the most one extent holds on a store mounted with `compress`; a
/// source shredded into small extents costs more, which this does not
/// see).
pub(super) fn clone_items(len: u64) -> u64 {
    len.div_ceil(128 << 10).max(1)
}

impl Applied {
    /// What these bytes cost on disc: literal and copied bytes, and the
    /// metadata of the clones.
    pub fn grown(&self) -> u64 {
        self.literal
            .saturating_add(self.copied)
            .saturating_sub(self.holes)
            .saturating_add(self.clones.saturating_mul(CLONE_COST))
    }

    pub fn add(&mut self, o: Applied) {
        self.matched = self.matched.saturating_add(o.matched);
        self.literal = self.literal.saturating_add(o.literal);
        self.copied = self.copied.saturating_add(o.copied);
        self.holes = self.holes.saturating_add(o.holes);
        self.clones = self.clones.saturating_add(o.clones);
    }
}

/// The file being written for one transfer.
pub(super) struct FileWriter {
    /// The file written; `None` until it is created, on its first data
    /// (see [`Self::open`]).
    out: Option<File>,
    pub basis: Option<Basis>,
    pub written: u64,
    /// Bytes of `out` whose writeback has been started.
    flushed: u64,
    /// Its BLAKE3 and, for a file whose digests are kept (see `sigs`),
    /// its signature and units' chaining values (see `digest`).
    digest: Digest,
    /// The length it was started for, and whether its digests are kept.
    len: u64,
    keep: bool,
    /// The memory its kept digests hold (see `digest::KeptBudget`).
    _lease: Option<Lease>,
    /// ... and those of the stored copy it is rebuilt from, held as long
    /// (see [`Self::use_basis_digest`]).
    basis_lease: Option<Lease>,
    /// Content hash of what `out` holds, when it was filled from a stored
    /// twin and hashed from `out` (instead of through `digest`).
    verified: Option<[u8; 32]>,
    /// Writing hit "no space left on device": the rest of its data is
    /// dropped, and its end asks for room and a resend.
    pub nospace: bool,
    /// ... and it was a quota's (EDQUOT), not the filesystem's.
    pub quota: bool,
    /// Once `nospace`: the bytes this attempt brought, written or dropped
    /// (what took space up to the failure, holes and clones not, plus the
    /// segments after it, counted by [`count_dropped`]), so the room asked
    /// for is what the client sent, never just what it declared.
    pub attempted: u64,
    /// Bytes of this attempt counted in the backup's statistics and
    /// growth: taken back when the attempt is thrown away.
    pub counted: Applied,
}

/// The most a dropped segment counts for, per byte it took on the wire:
/// zstd shrinks text about three times at the levels we use; a stream of zeros
/// (thousands of times) must not ask for room it never sent.
pub const DROPPED_PER_WIRE_BYTE: u64 = 16;

/// What a segment that arrives after "no space left on device" adds to
/// [`FileWriter::attempted`]: its length, at most
/// [`DROPPED_PER_WIRE_BYTE`] times its bytes on the wire.
pub fn count_dropped(raw_len: u32, wire_len: usize) -> u64 {
    u64::from(raw_len).min((wire_len as u64).saturating_mul(DROPPED_PER_WIRE_BYTE))
}

/// Whether an I/O error means the filesystem (or a quota) is full.
pub(super) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl FileWriter {
    /// A writer into `out` of a file expected to be `len` bytes long;
    /// `lease`: its digests are to be kept, in that memory.
    pub fn new(out: Option<File>, basis: Option<Basis>, len: u64, lease: Option<Lease>) -> Self {
        let keep = lease.is_some();
        FileWriter {
            out,
            basis,
            written: 0,
            flushed: 0,
            digest: Digest::new(len, keep),
            len,
            keep,
            _lease: lease,
            basis_lease: None,
            verified: None,
            nospace: false,
            quota: false,
            attempted: 0,
            counted: Applied::default(),
        }
    }

    /// Whether the file written is created.
    pub fn is_open(&self) -> bool {
        self.out.is_some()
    }

    /// Gives the writer the file it writes, created now (see [`Self::new`]).
    pub fn open(&mut self, out: File) {
        self.out = Some(out);
    }

    /// The file written.
    pub fn out(&self) -> io::Result<&File> {
        opened(&self.out)
    }

    /// Takes in the kept digests of the stored copy that is the whole
    /// basis, before any data: copies from it to the same offset are then
    /// neither read nor hashed. False when they cannot be used. `lease`:
    /// the memory they hold (the stored copy's size, not the new file's:
    /// a small file rebuilt from a huge stored copy holds the copy's).
    pub fn use_basis_digest(&mut self, d: BasisDigest, budget: &KeptBudget) -> bool {
        let whole = matches!(&self.basis, Some(b) if b.parts.len() == 1 && b.len() == d.len);
        if !whole || self.written != 0 {
            return false;
        }
        let Some(lease) = budget.lease(d.len) else {
            return false;
        };
        let used = self.digest.use_basis(d);
        if used {
            self.basis_lease = Some(lease);
        }
        used
    }

    /// Bytes read back from the new file to hash it (see `digest`).
    pub fn reread(&self) -> u64 {
        self.digest.reread()
    }

    /// What to keep of the file written (its signature and units' values),
    /// when it is exactly `size` bytes long and they were computed for that
    /// length. Call once the file is verified.
    pub fn take_kept(&mut self, size: u64) -> io::Result<Option<Kept>> {
        if self.written != size || self.len != size {
            return Ok(None);
        }
        self.digest.take_kept(opened(&self.out)?)
    }

    /// Applies one decompressed segment for the file `size` bytes long at
    /// `path`. Running out of space is not an error: the writer drops the
    /// rest and [`FileWriter::nospace`] is set. `clone_ok` is cleared when
    /// the filesystem refuses a clone.
    pub fn write(
        &mut self,
        raw: &[u8],
        size: u64,
        path: &[u8],
        clone_ok: &mut bool,
    ) -> Result<Applied> {
        if self.nospace {
            return Ok(Applied::default()); // dropped: the end asks for a resend
        }
        let limit = size
            .saturating_sub(self.written)
            .min(byteback_protocol::limits::MAX_MESSAGE_OUTPUT);
        let basis_len = self.basis.as_ref().map(Basis::len).unwrap_or(0);
        let out = opened(&self.out).map_err(|e| Error::io("store", shown(path), e))?;
        let mut sink = FileSink {
            basis: self.basis.as_ref(),
            out,
            pos: self.written,
            digest: &mut self.digest,
            clone_ok: *clone_ok,
            applied: Applied::default(),
            buf: vec![],
        };
        let result = apply_ops(raw, basis_len, limit, &mut sink);
        let (pos, applied) = (sink.pos, sink.applied);
        *clone_ok = sink.clone_ok;
        match result {
            Err(SinkError::Io(e)) if is_no_space(&e) => {
                self.nospace = true;
                self.quota = e.raw_os_error() == Some(libc::EDQUOT);
                // What took space: not holes, nor what clones shared (a
                // stream of zeros declaring a huge file asked for room the
                // size of its holes).
                let mut tried = self.counted;
                tried.add(applied);
                self.attempted = tried.grown();
                // Give its blocks back at once; it is sent again whole.
                let _ = out.set_len(0);
                return Ok(Applied::default());
            }
            Err(e) => {
                return Err(match e {
                    SinkError::Io(e) => Error::io("store", shown(path), e),
                    e => Error::Refused(format!("bad delta for {}: {e}", shown(path))),
                });
            }
            Ok(_) => {}
        }
        self.written = pos;
        if self.written - self.flushed >= WRITEBACK_EVERY {
            start_writeback(out, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
        Ok(applied)
    }

    /// Whether what was written is `size` bytes hashing to `hash`.
    pub fn verify(&mut self, size: u64, hash: &[u8; 32]) -> io::Result<bool> {
        if self.written != size {
            return Ok(false);
        }
        let got = match self.verified {
            Some(h) => Some(h),
            // Shorter than its entry said (it shrank while the client read
            // it): the digests were laid out for the announced length, so
            // it is hashed from what was written.
            None if size != self.len => {
                self.out()?.set_len(size)?; // trailing zeros may be a hole yet
                Some(hash_file(self.out()?)?)
            }
            None => {
                // Trailing zero blocks are a hole not yet counted in the
                // length (see `finish`), and the digest may read back a unit
                // that reaches into them: the file's full length first.
                let out = opened(&self.out)?;
                if out.metadata()?.len() < size {
                    out.set_len(size)?;
                }
                self.digest.finish(out)?
            }
        };
        Ok(got == Some(*hash))
    }

    /// Records that `out` was filled whole (`size` bytes) from a stored
    /// twin, and `hash` was computed from `out` itself: [`Self::verify`]
    /// checks that instead of what went through the hasher.
    pub fn filled(&mut self, size: u64, hash: [u8; 32]) {
        // The twin's digests, if kept, are this content's too.
        self.digest = Digest::new(0, false);
        self.verified = Some(hash);
        self.written = size;
        self.flushed = size;
    }

    /// Starts over from an empty file (a resend), with no basis.
    pub fn restart(&mut self) -> io::Result<()> {
        self.nospace = false;
        self.quota = false;
        self.attempted = 0;
        self.counted = Applied::default();
        self.written = 0;
        self.flushed = 0;
        self.digest = Digest::new(self.len, self.keep);
        self.verified = None;
        self.basis = None;
        match &self.out {
            Some(f) => f.set_len(0),
            None => Ok(()),
        }
    }

    /// Finishes a verified file: its full length (trailing zero blocks were
    /// left as a hole), the client's mtime, and writeback of what is left.
    pub fn finish(&mut self, size: u64, mtime: (i64, u32)) -> io::Result<()> {
        let out = self.out()?;
        if out.metadata()?.len() != size {
            out.set_len(size)?;
        }
        fsops::set_mtime(out, mtime.0, mtime.1)?;
        // Small files wait for the commit's syncfs: started one by one,
        // their writeback cost this (single) thread more than it saved.
        if size >= WRITEBACK_EVERY && size > self.flushed {
            start_writeback(out, self.flushed, size - self.flushed);
            self.flushed = size;
        }
        Ok(())
    }
}

/// The file of a writer, once created.
fn opened(out: &Option<File>) -> io::Result<&File> {
    out.as_ref()
        .ok_or_else(|| io::Error::other("the transfer's file is not created yet"))
}

/// BLAKE3 of a whole file.
pub(super) fn hash_file(f: &File) -> io::Result<[u8; 32]> {
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; IO_CHUNK];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finish())
}

/// Ranges of received files whose writeback is to start, for the thread
/// that starts it (`None`: no such thread could be started).
static FLUSHER: OnceLock<Option<SyncSender<(File, u64, u64)>>> = OnceLock::new();
/// Ranges that may wait for that thread; beyond, the caller starts it.
const FLUSH_QUEUE: usize = 16;

/// Starts writing a range of a received file to disc without waiting for
/// it, so the data is mostly on disc by the commit's syncfs instead of all
/// being written then (the kernel's own writeback starts far later on a
/// machine with much memory). Starting it costs the caller the filesystem's
/// work of submitting the range (btrfs checksums the data then), so a
/// thread of its own does that while this one goes on receiving.
fn start_writeback(f: &File, offset: u64, len: u64) {
    let flusher = FLUSHER.get_or_init(|| {
        let (tx, rx) = sync_channel::<(File, u64, u64)>(FLUSH_QUEUE);
        std::thread::Builder::new()
            .name("byteback-flush".into())
            .spawn(move || {
                for (f, offset, len) in rx {
                    sync_file_range_write(&f, offset, len);
                }
            })
            .ok()
            .map(|_| tx)
    });
    if let (Some(tx), Ok(dup)) = (flusher, f.try_clone()) {
        if tx.try_send((dup, offset, len)).is_ok() {
            return;
        }
    }
    sync_file_range_write(f, offset, len);
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: starts writeback, waits for none.
fn sync_file_range_write(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open fd; failure only loses the hint.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Bytes from which hashing and signing go to a second thread, beside the write.
const HASH_APART_MIN: usize = 256 << 10;

/// Feeds `data` to the file's hash and, if it is kept, its signature,
/// while `then` runs (writing the same bytes): with
/// enough bytes, the BLAKE3 and the signature's MD4 are computed on a
/// second thread meanwhile, so a large file's hashing overlaps its write.
/// If no thread can be started they run here, after `then`.
fn hash_sign_and<R>(digest: &mut Digest, data: &[u8], then: impl FnOnce() -> R) -> R {
    let hash = |d: &mut Digest| d.feed(data);
    if data.len() < HASH_APART_MIN {
        hash(digest);
        return then();
    }
    let work = std::sync::Mutex::new(Some(digest));
    let take = || {
        work.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    };
    std::thread::scope(|s| {
        let hashing = std::thread::Builder::new()
            .name("byteback-hash".into())
            .spawn_scoped(s, || take().map(hash));
        let r = then();
        match hashing {
            // A panic there is re-raised here, as it would be inline.
            Ok(h) => {
                if let Err(p) = h.join() {
                    std::panic::resume_unwind(p);
                }
            }
            Err(e) => {
                tracing::debug!("no thread to hash with ({e}): hashing inline");
                if let Some(w) = take() {
                    hash(w);
                }
            }
        }
        r
    })
}

/// Writes patch output into the file being received.
struct FileSink<'a> {
    basis: Option<&'a Basis>,
    out: &'a File,
    pos: u64,
    digest: &'a mut Digest,
    clone_ok: bool,
    applied: Applied,
    buf: Vec<u8>,
}

impl FileSink<'_> {
    /// Copies `len` bytes of the basis, a stored copy whose digests are
    /// known, to the same offset: cloned where the filesystem shares
    /// extents, else read and written; not hashed (see `digest`).
    fn copy_same_offset(&mut self, basis: &Basis, offset: u64, len: u64) -> Result<(), SinkError> {
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let (file, src, left) = basis
                .locate(at)
                .ok_or_else(|| SinkError::Bad("copy beyond the basis".into()))?;
            let n = (len - done).min(left);
            let mut cloned = 0;
            if self.clone_ok && at.is_multiple_of(FS_BLOCK) && n >= FS_BLOCK {
                let clone_len = (n / FS_BLOCK * FS_BLOCK).min(CLONE_MAX);
                match crate::btrfs::clone_range(file, src, clone_len, self.out, at) {
                    Ok(()) => {
                        cloned = clone_len;
                        self.applied.clones += clone_items(clone_len);
                    }
                    Err(_) => self.clone_ok = false,
                }
            }
            if cloned == 0 {
                let k = (n.min(IO_CHUNK as u64)) as usize;
                self.buf.resize(k, 0);
                file.read_exact_at(&mut self.buf[..k], src)?;
                self.applied.holes += write_sparse_at(self.out, at, &self.buf[..k])?;
                cloned = k as u64;
                self.applied.copied += cloned;
            }
            self.digest.skip(cloned);
            self.pos += cloned;
            done += cloned;
        }
        self.applied.matched += len;
        Ok(())
    }
}

/// Most bytes cloned in one call.
const CLONE_MAX: u64 = 256 << 20;

/// Why a delta could not be applied.
#[derive(Debug)]
enum SinkError {
    /// The delta itself is wrong (the client's fault).
    Bad(String),
    /// Reading the stored copy or writing the new one failed (the store's).
    Io(io::Error),
}

impl From<DeltaError> for SinkError {
    fn from(e: DeltaError) -> Self {
        SinkError::Bad(e.to_string())
    }
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Bad(e) => write!(f, "{e}"),
            SinkError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for SinkError {
    fn from(e: io::Error) -> Self {
        SinkError::Io(e)
    }
}

impl PatchSink for FileSink<'_> {
    type Error = SinkError;

    fn copy(&mut self, offset: u64, len: u64) -> Result<(), SinkError> {
        let basis = self
            .basis
            .ok_or_else(|| SinkError::Bad("copy without a basis".into()))?;
        if self.digest.can_skip() && offset == self.pos && basis.parts.len() == 1 {
            return self.copy_same_offset(basis, offset, len);
        }
        let mut done = 0u64;
        while done < len {
            let (file, src, left) = basis
                .locate(offset + done)
                .ok_or_else(|| SinkError::Bad("copy beyond the basis".into()))?;
            let n = (len - done).min(left).min(IO_CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            file.read_exact_at(&mut self.buf[..n], src)?;
            let dst = self.pos;
            let aligned = src.is_multiple_of(FS_BLOCK) && dst.is_multiple_of(FS_BLOCK);
            let clone_len = if aligned {
                n as u64 / FS_BLOCK * FS_BLOCK
            } else {
                0
            };
            let (out, clone_ok) = (self.out, &mut self.clone_ok);
            let buf = std::mem::take(&mut self.buf);
            let mut clones = 0;
            // Cloned or written while the same bytes are hashed.
            let stored = hash_sign_and(self.digest, &buf[..n], || {
                let mut written = 0usize;
                if *clone_ok && clone_len > 0 {
                    match crate::btrfs::clone_range(file, src, clone_len, out, dst) {
                        Ok(()) => {
                            written = clone_len as usize;
                            clones = clone_items(clone_len);
                        }
                        Err(_) => *clone_ok = false,
                    }
                }
                write_sparse_at(out, dst + written as u64, &buf[written..n])
                    .map(|holes| (n - written, holes))
            });
            self.buf = buf;
            let (stored, holes) = stored?;
            self.applied.copied += stored as u64;
            self.applied.holes += holes;
            self.applied.clones += clones;
            self.pos += n as u64;
            done += n as u64;
        }
        self.applied.matched += len;
        Ok(())
    }

    fn literal(&mut self, data: &[u8]) -> Result<(), SinkError> {
        let (out, pos) = (self.out, self.pos);
        self.applied.holes += hash_sign_and(self.digest, data, || write_sparse_at(out, pos, data))?;
        self.pos += data.len() as u64;
        self.applied.literal += data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn dropped_segments_count_at_most_sixteen_times_their_wire_bytes() {
        // 10 MiB of zeros in about 350 bytes of zstd: 5,600 bytes, not 10 MiB.
        assert_eq!(count_dropped(10 << 20, 350), 350 * DROPPED_PER_WIRE_BYTE);
        // Stored or lightly compressed data counts whole.
        assert_eq!(count_dropped(1000, 1009), 1000);
        assert_eq!(count_dropped(3000, 1000), 3000);
    }

    use super::*;

    fn file_of(bytes: &[u8]) -> File {
        let f = tempfile::tempfile().expect("tempfile");
        f.write_all_at(bytes, 0).expect("write");
        f
    }

    /// The stored copy's kept values a rebuild takes in are leased by the
    /// copy's size: small files rebuilt from a huge stored copy each hold
    /// its values, so only as many as the budget of kept digests allows
    /// take them in (a client announcing thousands held gigabytes).
    #[test]
    fn a_basis_digest_is_leased_by_the_stored_copys_size() {
        let budget = KeptBudget::default();
        let huge: u64 = 1 << 30;
        let mut writers = vec![];
        let mut used = 0;
        for _ in 0..200 {
            let stored = tempfile::tempfile().expect("tempfile");
            stored.set_len(huge).expect("set_len");
            let basis = Basis {
                parts: vec![BasisPart {
                    file: stored,
                    start: 0,
                    len: huge,
                }],
            };
            let small = 4u64 << 20;
            let lease = budget.lease(small);
            let mut w = FileWriter::new(None, Some(basis), small, lease);
            let d = BasisDigest {
                len: huge,
                cvs: vec![[0u8; 32]; super::super::digest::units_of(huge) as usize],
                entries: vec![],
            };
            used += usize::from(w.use_basis_digest(d, &budget));
            writers.push(w);
        }
        let cost = super::super::digest::kept_cost(huge);
        assert!(used > 0, "no basis digest used at all");
        assert!(
            (used as u64) * cost <= 32 << 20,
            "{used} stored copies' values of {cost} bytes each held"
        );
        drop(writers);
        let stored = tempfile::tempfile().expect("tempfile");
        stored.set_len(huge).expect("set_len");
        assert!(budget.lease(huge).is_some(), "not given back");
    }

    #[test]
    fn a_virtual_basis_serves_each_offset_from_its_part() {
        let b = Basis {
            parts: vec![
                BasisPart {
                    file: file_of(&[1; 8192]),
                    start: 0,
                    len: 8192,
                },
                BasisPart {
                    file: file_of(&[2; 100]),
                    start: 8192,
                    len: 100,
                },
            ],
        };
        assert_eq!(b.len(), 8292);
        let (_, at, left) = b.locate(0).expect("first part");
        assert_eq!((at, left), (0, 8192));
        let (_, at, left) = b.locate(8191).expect("first part");
        assert_eq!((at, left), (8191, 1));
        let (f, at, left) = b.locate(8192).expect("second part");
        assert_eq!((at, left), (0, 100));
        let mut one = [0u8; 1];
        f.read_exact_at(&mut one, at).expect("read");
        assert_eq!(one, [2]);
        assert!(b.locate(8292).is_none());
        assert!(Basis { parts: vec![] }.locate(0).is_none());
    }
}

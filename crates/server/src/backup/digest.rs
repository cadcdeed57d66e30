//! The digests of a file being received: its BLAKE3 and, for a file whose
//! signature is kept (see `sigs`), its block signature and the chaining
//! values of its BLAKE3 subtrees ("units", 64 KiB or more).
//!
//! A large file's BLAKE3 is computed unit by unit and the units' chaining
//! values merged into the root, which is the file's BLAKE3. When the stored
//! copy the file is rebuilt from has its chaining values and signature kept,
//! bytes copied from it *to the same offset* are neither read nor hashed: a
//! unit or signature block made only of such bytes takes the stored copy's
//! value. A unit or block that mixes them with other bytes is hashed from
//! the new file once it is written (at most two per changed range), so an
//! edit costs reading about the bytes it changed, not the file.
//!
//! The stored values are only used after they merged into exactly the
//! content hash the manifest has for that copy (so they are that content's,
//! not planted), for a copy that `current` vouches for (see `apply`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use byteback_delta::{
    block_entries, block_size_for, md4_batch, FileHasher, SignatureBytes, ENTRY_LEN,
};

/// Smallest unit: 64 KiB, 64 BLAKE3 chunks (enough for its SIMD).
const MIN_UNIT: u64 = 64 << 10;
/// A file has at most this many units (their values are held: 2 MiB).
const MAX_UNITS: u64 = 1 << 16;
/// Signature blocks redone from the file beyond which the new signature is
/// not kept (the next backup signs the stored copy instead).
const MAX_REDO_BLOCKS: usize = 1 << 16;
/// Bytes of blocks redone together.
const RUN_BYTES: u64 = 1 << 20;
/// Length of a chaining value.
pub(super) const CV_LEN: usize = 32;
/// Bytes of the ranges still to be read back that the kernel is asked to
/// read ahead of the range in hand (see [`ReadAhead`]).
const READ_AHEAD: u64 = 16 << 20;
/// Most bytes announced in one call: Linux reads at most the device's
/// read-ahead size per `POSIX_FADV_WILLNEED` (128 KiB by default), so a
/// longer range (a unit of a file over 4 GiB, a run of blocks) is
/// announced in pieces.
const ADVICE_MAX: u64 = 128 << 10;

/// Most bytes of a unit read back at once (see [`ReadAhead::read_pieces`]).
const UNIT_PIECE: u64 = 1 << 20;

/// Ranges of a file read back one after the other, each announced to the
/// kernel (`POSIX_FADV_WILLNEED`) up to [`READ_AHEAD`] bytes before it is
/// read. An edited file has hundreds of such ranges (each changed range's
/// units and blocks), mostly of bytes cloned from the stored copy and not
/// in the page cache; read in turn, each was a wait on the disc (W4 of the
/// harness: 980 reads back, 0.73 s of the server's main thread). Announced,
/// they are read by the device in parallel while the first ones are
/// hashed. The page cache holds what is announced; this process does not.
struct ReadAhead<'a> {
    out: &'a File,
    ranges: &'a [(u64, u64)],
    /// Next range to announce.
    next: usize,
    /// Bytes announced and not yet read.
    ahead: u64,
    /// Most bytes announced beyond the range in hand.
    window: u64,
}

impl<'a> ReadAhead<'a> {
    fn new(out: &'a File, ranges: &'a [(u64, u64)]) -> Self {
        ReadAhead {
            out,
            ranges,
            next: 0,
            ahead: 0,
            window: READ_AHEAD,
        }
    }

    /// Reads range `i` (ranges are read in order) into `buf`.
    fn read(&mut self, i: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        self.read_pieces(i, buf, u64::MAX, |_| ())
    }

    /// Reads range `i` (ranges are read in order) into `buf` in pieces of
    /// at most `piece` bytes, handing each to `f`: a unit of a file of
    /// terabytes is tens of MiB, more than is held for one file.
    fn read_pieces(
        &mut self,
        i: usize,
        buf: &mut Vec<u8>,
        piece: u64,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        let (start, end) = self.ranges[i];
        while self.next < self.ranges.len() && (self.next <= i || self.ahead < self.window) {
            let (s, e) = self.ranges[self.next];
            let mut at = s;
            while at < e {
                let n = (e - at).min(ADVICE_MAX);
                // Advice only: where it is refused, the read below still reads.
                // SAFETY: plain syscall on an open descriptor.
                unsafe {
                    libc::posix_fadvise(
                        self.out.as_raw_fd(),
                        at as libc::off_t,
                        n as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
                at += n;
            }
            self.ahead += e - s;
            self.next += 1;
        }
        buf.clear();
        let mut at = start;
        while at < end {
            let n = (end - at).min(piece);
            buf.resize(n as usize, 0);
            self.out.read_exact_at(buf, at)?;
            f(buf);
            at += n;
        }
        self.ahead = self.ahead.saturating_sub(end - start);
        Ok(())
    }
}

/// Most bytes the kept digests of one backup's files in flight hold
/// together. Their size follows the size a file is announced with, before
/// any of its data: a client announcing thousands of huge files would
/// have the server hold gigabytes. A file announced beyond this budget
/// has its digests not kept (its signature is made from the stored copy
/// the next time it changes, as for a file stored before signatures were
/// kept); honest backups hold a few MiB (a 512 MiB file's are 0.5 MiB).
const MAX_KEPT_BYTES: u64 = 32 << 20;

/// What a kept digest of a file of `len` bytes holds: its units' chaining
/// values and its signature's entries (0 when it is a plain stream).
pub(super) fn kept_cost(len: u64) -> u64 {
    if len <= unit_for(len) {
        return 0;
    }
    let blocks = len.div_ceil(u64::from(block_size_for(len)));
    units_of(len) * CV_LEN as u64 + blocks * ENTRY_LEN as u64
}

/// The bytes kept digests of one backup's files in flight hold, bounded
/// by [`MAX_KEPT_BYTES`].
#[derive(Debug, Default, Clone)]
pub(super) struct KeptBudget(std::sync::Arc<std::sync::atomic::AtomicU64>);

/// Bytes of a [`KeptBudget`] one file's digests hold, given back when it
/// is dropped.
#[derive(Debug)]
pub(super) struct Lease(KeptBudget, u64);

impl KeptBudget {
    /// The bytes a kept digest of a file of `len` bytes needs, if the
    /// budget has them.
    pub fn lease(&self, len: u64) -> Option<Lease> {
        use std::sync::atomic::Ordering;
        let cost = kept_cost(len);
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                let now = held.checked_add(cost)?;
                (now <= MAX_KEPT_BYTES).then_some(now)
            })
            .ok()
            .map(|_| Lease(self.clone(), cost))
    }

    #[cfg(test)]
    fn held(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        (self.0)
            .0
            .fetch_sub(self.1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The unit size for a file of `len` bytes: a power of two, at least
/// [`MIN_UNIT`], so that there are at most [`MAX_UNITS`].
pub(super) fn unit_for(len: u64) -> u64 {
    MIN_UNIT.max(len.div_ceil(MAX_UNITS).next_power_of_two())
}

/// How many units a file of `len` bytes has.
pub(super) fn units_of(len: u64) -> u64 {
    len.div_ceil(unit_for(len))
}

/// The BLAKE3 of a file of `len` bytes (more than one unit) whose units
/// have these chaining values.
pub(super) fn root_of(cvs: &[ChainingValue], len: u64) -> Option<[u8; 32]> {
    let unit = unit_for(len);
    if len <= unit || cvs.len() as u64 != len.div_ceil(unit) {
        return None;
    }
    fn subtree(cvs: &[ChainingValue], unit: u64, start: u64, end: u64) -> ChainingValue {
        if end - start <= unit {
            return cvs[(start / unit) as usize];
        }
        let mid = start + hazmat::left_subtree_len(end - start);
        let (l, r) = (subtree(cvs, unit, start, mid), subtree(cvs, unit, mid, end));
        hazmat::merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
    let mid = hazmat::left_subtree_len(len);
    let (l, r) = (subtree(cvs, unit, 0, mid), subtree(cvs, unit, mid, len));
    Some(*hazmat::merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

/// What the stored copy a file is rebuilt from has kept: its length, the
/// chaining values of its units and its signature's block entries.
pub(super) struct BasisDigest {
    pub len: u64,
    pub cvs: Vec<ChainingValue>,
    /// Signature entries, without the header.
    pub entries: Vec<u8>,
}

/// Receives what a [`Grid`] decides about each unit of one kind.
trait UnitSink {
    /// The next bytes, all of units fed nothing but such bytes so far,
    /// starting at file offset `at`.
    fn feed(&mut self, at: u64, data: &[u8]);
    /// Unit `k` is, whole, the stored copy's unit `k`: take its value.
    /// False when there is none.
    fn reuse(&mut self, k: u64) -> bool;
    /// Unit `k` mixes both: drop what was fed of it; redone at the end.
    fn mixed(&mut self, k: u64);
}

/// Where the current unit stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Nothing of it yet.
    Fresh,
    /// Only fed bytes so far.
    Feeding,
    /// Only bytes equal to the stored copy's at the same offset so far.
    Skipping,
    /// Both: redone at the end.
    Mixed,
}

/// Splits the file's bytes, in order, along a grid of units of one size
/// (the last one may be short) and tells a [`UnitSink`] what to do.
#[derive(Debug)]
struct Grid {
    unit: u64,
    len: u64,
    pos: u64,
    state: State,
}

impl Grid {
    fn new(unit: u64, len: u64) -> Self {
        Grid {
            unit,
            len,
            pos: 0,
            state: State::Fresh,
        }
    }

    /// End of the unit holding offset `p` (beyond the length: `p`).
    fn unit_end(&self, p: u64) -> u64 {
        ((p / self.unit + 1) * self.unit).min(self.len).max(p)
    }

    /// The next bytes of the file, to be hashed.
    fn feed(&mut self, sink: &mut impl UnitSink, data: &[u8]) {
        let mut run: Option<usize> = None;
        let mut i = 0;
        while i < data.len() {
            let p = self.pos + i as u64;
            let end = self.unit_end(p);
            if end == p {
                break; // beyond the length: the file fails its check
            }
            let piece = (end - p).min((data.len() - i) as u64) as usize;
            match self.state {
                State::Fresh | State::Feeding => {
                    run.get_or_insert(i);
                    self.state = State::Feeding;
                }
                State::Skipping => {
                    flush(sink, self.pos, data, &mut run, i);
                    sink.mixed(p / self.unit);
                    self.state = State::Mixed;
                }
                State::Mixed => flush(sink, self.pos, data, &mut run, i),
            }
            i += piece;
            if p + piece as u64 == end {
                self.state = State::Fresh;
            }
        }
        flush(sink, self.pos, data, &mut run, i);
        self.pos += data.len() as u64;
    }

    /// The next `n` bytes equal the stored copy's at the same offset.
    fn skip(&mut self, sink: &mut impl UnitSink, n: u64) {
        let mut done = 0;
        while done < n {
            let p = self.pos + done;
            let end = self.unit_end(p);
            if end == p {
                break;
            }
            let piece = (end - p).min(n - done);
            let k = p / self.unit;
            let whole = p + piece == end;
            match self.state {
                State::Fresh | State::Skipping => {
                    self.state = State::Skipping;
                    if whole && !sink.reuse(k) {
                        sink.mixed(k);
                    }
                }
                State::Feeding => {
                    sink.mixed(k);
                    self.state = State::Mixed;
                }
                State::Mixed => {}
            }
            if whole {
                self.state = State::Fresh;
            }
            done += piece;
        }
        self.pos += n;
    }
}

/// Feeds `data[run..to]` (bytes at `base + run`) to the sink, if any.
fn flush(sink: &mut impl UnitSink, base: u64, data: &[u8], run: &mut Option<usize>, to: usize) {
    if let Some(from) = run.take() {
        if to > from {
            sink.feed(base + from as u64, &data[from..to]);
        }
    }
}

/// The chaining values of a file's units.
struct Units {
    unit: u64,
    len: u64,
    cvs: Vec<ChainingValue>,
    /// Units whose value is set (fed, or taken from the stored copy).
    set: u64,
    cur: Option<(u64, blake3::Hasher)>,
    redo: Vec<u32>,
    old: Option<(u64, Vec<ChainingValue>)>,
    /// Bytes read back from the file to redo units.
    reread: u64,
}

impl Units {
    fn new(len: u64) -> Self {
        let unit = unit_for(len);
        Units {
            unit,
            len,
            cvs: vec![[0; CV_LEN]; len.div_ceil(unit) as usize],
            set: 0,
            cur: None,
            redo: vec![],
            old: None,
            reread: 0,
        }
    }

    /// Redoes the mixed units from `out` and merges all into the root.
    /// `None`: not every unit was written.
    fn finish(&mut self, out: &File) -> io::Result<Option<[u8; 32]>> {
        let redo = std::mem::take(&mut self.redo);
        let ranges: Vec<(u64, u64)> = redo
            .iter()
            .map(|&k| {
                let start = u64::from(k) * self.unit;
                (start, (start + self.unit).min(self.len))
            })
            .collect();
        let mut ahead = ReadAhead::new(out, &ranges);
        let mut buf = vec![];
        for (i, (&k, &(start, end))) in redo.iter().zip(&ranges).enumerate() {
            let mut h = blake3::Hasher::new();
            h.set_input_offset(start);
            ahead.read_pieces(i, &mut buf, UNIT_PIECE, |b| {
                h.update(b);
            })?;
            self.reread += end - start;
            self.cvs[k as usize] = h.finalize_non_root();
            self.set += 1;
        }
        Ok((self.set == self.cvs.len() as u64)
            .then(|| root_of(&self.cvs, self.len))
            .flatten())
    }
}

impl UnitSink for Units {
    fn feed(&mut self, at: u64, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            let p = at + i as u64;
            let k = p / self.unit;
            let end = ((k + 1) * self.unit).min(self.len);
            let n = ((end - p) as usize).min(data.len() - i);
            let (_, h) = match &mut self.cur {
                Some(c) if c.0 == k => c,
                cur => cur.insert((k, {
                    let mut h = blake3::Hasher::new();
                    h.set_input_offset(k * self.unit);
                    h
                })),
            };
            h.update(&data[i..i + n]);
            if p + n as u64 == end {
                if let Some(cv) = self.cvs.get_mut(k as usize) {
                    *cv = h.finalize_non_root();
                    self.set += 1;
                }
                self.cur = None;
            }
            i += n;
        }
    }

    fn reuse(&mut self, k: u64) -> bool {
        let Some((old_len, old)) = &self.old else {
            return false;
        };
        let start = k * self.unit;
        let same = start < *old_len
            && (start + self.unit).min(self.len) == (start + self.unit).min(*old_len);
        match (same, old.get(k as usize), self.cvs.get_mut(k as usize)) {
            (true, Some(o), Some(cv)) => {
                *cv = *o;
                self.set += 1;
                true
            }
            _ => false,
        }
    }

    fn mixed(&mut self, k: u64) {
        if self.cur.as_ref().is_some_and(|c| c.0 == k) {
            self.cur = None;
        }
        if let Ok(k) = u32::try_from(k) {
            self.redo.push(k);
        }
    }
}

/// The signature's block entries of a file.
struct Blocks {
    bs: u64,
    len: u64,
    entries: Vec<u8>,
    set: u64,
    /// Bytes of a batch of blocks (see [`md4_batch`]).
    batch: u64,
    /// Bytes fed and not signed yet (less than a batch, from a block's
    /// start), and the index of their first block.
    pending: Vec<u8>,
    pending_k: u64,
    redo: Vec<u32>,
    /// More than [`MAX_REDO_BLOCKS`] to redo: not kept.
    given_up: bool,
    /// The stored copy's length and entries, if it has the same block size.
    old: Option<(u64, Vec<u8>)>,
    tmp: Vec<u8>,
    /// Bytes read back from the file to redo blocks.
    reread: u64,
}

impl Blocks {
    fn new(len: u64) -> Self {
        let bs = u64::from(block_size_for(len));
        let n = len.div_ceil(bs) as usize;
        Blocks {
            bs,
            len,
            batch: bs * md4_batch(bs as u32) as u64,
            entries: vec![0; n * ENTRY_LEN],
            set: 0,
            pending: vec![],
            pending_k: 0,
            redo: vec![],
            given_up: false,
            old: None,
            tmp: vec![],
            reread: 0,
        }
    }

    /// Puts the entries of `data`, whole blocks from block `k` on, in place.
    fn put(&mut self, k: u64, data: &[u8]) {
        self.tmp.clear();
        block_entries(data, self.bs as u32, &mut self.tmp);
        let at = k as usize * ENTRY_LEN;
        if let Some(dst) = self.entries.get_mut(at..at + self.tmp.len()) {
            dst.copy_from_slice(&self.tmp);
            self.set += (self.tmp.len() / ENTRY_LEN) as u64;
        }
    }

    /// Signs the whole blocks held back to fill a batch; a partly fed
    /// block is dropped (it is redone, or the file was not all written).
    fn put_pending(&mut self) {
        let held = self.pending.len();
        let upto = if self.pending_k * self.bs + held as u64 == self.len {
            held // through the file's short last block
        } else {
            held / self.bs as usize * self.bs as usize
        };
        let pending = std::mem::take(&mut self.pending);
        if upto > 0 {
            self.put(self.pending_k, &pending[..upto]);
        }
        self.pending = pending;
        self.pending.clear();
    }

    /// Redoes the mixed blocks from `out`: the signature, if every block
    /// was written and not too many had to be redone.
    fn finish(&mut self, out: &File) -> io::Result<Option<SignatureBytes>> {
        self.put_pending();
        if self.given_up {
            return Ok(None);
        }
        // Runs of consecutive blocks are read and signed together (up to
        // a MiB or one block, in whole batches), so the signature's MD4
        // runs on 8 lanes.
        let redo = std::mem::take(&mut self.redo);
        let per_batch = self.batch / self.bs;
        let per_run = ((RUN_BYTES / self.bs) / per_batch * per_batch).max(per_batch);
        // (first block, range) of each run.
        let mut runs = vec![];
        let mut i = 0;
        while i < redo.len() {
            let first = u64::from(redo[i]);
            let mut n = 1;
            while i + n < redo.len()
                && n < per_run as usize
                && u64::from(redo[i + n]) == first + n as u64
            {
                n += 1;
            }
            let start = first * self.bs;
            runs.push((first, (start, (start + n as u64 * self.bs).min(self.len))));
            i += n;
        }
        let ranges: Vec<(u64, u64)> = runs.iter().map(|r| r.1).collect();
        let mut ahead = ReadAhead::new(out, &ranges);
        let mut buf = vec![];
        for (i, &(first, _)) in runs.iter().enumerate() {
            ahead.read(i, &mut buf)?;
            self.reread += buf.len() as u64;
            let run = std::mem::take(&mut buf);
            self.put(first, &run);
            buf = run;
        }
        let n = self.entries.len() / ENTRY_LEN;
        Ok((self.set == n as u64)
            .then(|| SignatureBytes::from_entries(self.bs as u32, &self.entries)))
    }
}

impl UnitSink for Blocks {
    fn feed(&mut self, at: u64, mut data: &[u8]) {
        let mut p = at;
        if !self.pending.is_empty() && p != self.pending_k * self.bs + self.pending.len() as u64 {
            self.put_pending();
        }
        while !data.is_empty() {
            if self.pending.is_empty() {
                self.pending_k = p / self.bs;
                if p.is_multiple_of(self.bs) {
                    // Whole batches (through the file's short last block).
                    let end = p + data.len() as u64;
                    let run_end = if end >= self.len {
                        self.len
                    } else {
                        p + (end - p) / self.batch * self.batch
                    };
                    if run_end > p {
                        let n = (run_end - p) as usize;
                        self.put(self.pending_k, &data[..n]);
                        data = &data[n..];
                        p = run_end;
                        continue;
                    }
                }
            }
            // Held until the batch (or the file) is complete.
            let end = (self.pending_k * self.bs + self.batch).min(self.len);
            let n = ((end - p) as usize).min(data.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            p += n as u64;
            if p == end {
                self.put_pending();
            }
        }
    }

    fn reuse(&mut self, k: u64) -> bool {
        // Blocks before `k` were fed whole.
        self.put_pending();
        let Some((old_len, old)) = &self.old else {
            return false;
        };
        let start = k * self.bs;
        let same =
            start < *old_len && (start + self.bs).min(self.len) == (start + self.bs).min(*old_len);
        let at = k as usize * ENTRY_LEN;
        match (same, old.get(at..at + ENTRY_LEN)) {
            (true, Some(o)) => {
                self.entries[at..at + ENTRY_LEN].copy_from_slice(o);
                self.set += 1;
                true
            }
            _ => false,
        }
    }

    fn mixed(&mut self, k: u64) {
        // Blocks before `k` were fed whole; what was fed of `k` is dropped.
        self.put_pending();
        if self.redo.len() >= MAX_REDO_BLOCKS {
            self.given_up = true;
            self.redo = vec![];
        } else if let (false, Ok(k)) = (self.given_up, u32::try_from(k)) {
            self.redo.push(k);
        }
    }
}

/// What is kept of a verified file: its signature and its units' values.
pub(super) struct Kept {
    pub sig: SignatureBytes,
    pub cvs: Vec<ChainingValue>,
}

/// Hashing by units, for a file whose digests are kept.
pub(super) struct Tree {
    units_grid: Grid,
    units: Units,
    blocks_grid: Grid,
    blocks: Blocks,
    /// The stored copy's values are in: same-offset copies may be skipped.
    skippable: bool,
    /// The root, once computed.
    root: Option<[u8; 32]>,
}

/// The digests of the file being received. The stream is inline: it is
/// what every small file has, and a transfer is boxed already.
#[allow(clippy::large_enum_variant)]
pub(super) enum Digest {
    /// A file whose digests are not kept: one BLAKE3 stream.
    Stream(FileHasher),
    Tree(Box<Tree>),
}

impl Digest {
    /// Digests of a file expected to be `len` bytes; `keep`: its signature
    /// and units' values are to be kept.
    pub fn new(len: u64, keep: bool) -> Self {
        if keep && len > unit_for(len) {
            Digest::Tree(Box::new(Tree {
                units_grid: Grid::new(unit_for(len), len),
                units: Units::new(len),
                blocks_grid: Grid::new(u64::from(block_size_for(len)), len),
                blocks: Blocks::new(len),
                skippable: false,
                root: None,
            }))
        } else {
            Digest::Stream(FileHasher::new())
        }
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, data: &[u8]) {
        match self {
            Digest::Stream(h) => h.update(data),
            Digest::Tree(t) => {
                t.units_grid.feed(&mut t.units, data);
                t.blocks_grid.feed(&mut t.blocks, data);
            }
        }
    }

    /// Whether bytes copied from the stored copy to the same offset may be
    /// passed with [`Self::skip`] instead of being fed.
    pub fn can_skip(&self) -> bool {
        matches!(self, Digest::Tree(t) if t.skippable)
    }

    /// The next `n` bytes are the stored copy's at the same offset (only
    /// when [`Self::can_skip`]).
    pub fn skip(&mut self, n: u64) {
        if let Digest::Tree(t) = self {
            if t.skippable {
                t.units_grid.skip(&mut t.units, n);
                t.blocks_grid.skip(&mut t.blocks, n);
            }
        }
    }

    /// Takes in the kept values of the stored copy the file is rebuilt
    /// from, before any byte of it. False when they cannot be used.
    pub fn use_basis(&mut self, basis: BasisDigest) -> bool {
        let Digest::Tree(t) = self else {
            return false;
        };
        let fresh = t.units_grid.pos == 0 && t.blocks_grid.pos == 0;
        let same_unit = unit_for(basis.len) == t.units.unit;
        if !fresh || !same_unit || basis.cvs.len() as u64 != units_of(basis.len) {
            return false;
        }
        if u64::from(block_size_for(basis.len)) == t.blocks.bs {
            t.blocks.old = Some((basis.len, basis.entries));
        }
        t.units.old = Some((basis.len, basis.cvs));
        t.skippable = true;
        true
    }

    /// The file's BLAKE3 (`None`: not all of it was written), reading what
    /// must be hashed again from `out`.
    pub fn finish(&mut self, out: &File) -> io::Result<Option<[u8; 32]>> {
        match self {
            Digest::Stream(h) => Ok(Some(h.finish())),
            Digest::Tree(t) => {
                if t.root.is_none() {
                    t.root = t.units.finish(out)?;
                }
                Ok(t.root)
            }
        }
    }

    /// Bytes read back from the file so far to hash what mixed copied and
    /// other bytes.
    pub fn reread(&self) -> u64 {
        match self {
            Digest::Stream(_) => 0,
            Digest::Tree(t) => t.units.reread + t.blocks.reread,
        }
    }

    /// What to keep of the file once verified (after [`Self::finish`]).
    pub fn take_kept(&mut self, out: &File) -> io::Result<Option<Kept>> {
        let Digest::Tree(t) = self else {
            return Ok(None);
        };
        if t.root.is_none() {
            return Ok(None);
        }
        let Some(sig) = t.blocks.finish(out)? else {
            return Ok(None);
        };
        t.root = None; // taken once
        let cvs = std::mem::take(&mut t.units.cvs);
        Ok(Some(Kept { sig, cvs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (((i as u64 * 2_654_435_761) >> 13) as u8) ^ seed)
            .collect()
    }

    /// Files announced huge hold at most the budget between them; what a
    /// file gives back is leased again.
    #[test]
    fn kept_digests_of_announced_files_are_bounded() {
        let budget = KeptBudget::default();
        let huge = 16u64 << 40;
        assert!(kept_cost(huge) > 8 << 20, "{}", kept_cost(huge));
        let mut held = vec![];
        for _ in 0..1000 {
            held.extend(budget.lease(huge));
        }
        assert!(!held.is_empty() && held.len() < 5, "{}", held.len());
        assert!(budget.held() <= MAX_KEPT_BYTES);
        // A small file's digest is a stream: it costs nothing.
        assert_eq!(kept_cost(MIN_UNIT), 0);
        assert!(budget.lease(MIN_UNIT).is_some());
        // Honest files fit by the dozen.
        assert!(kept_cost(512 << 20) <= 1 << 20, "{}", kept_cost(512 << 20));
        held.clear();
        assert_eq!(budget.held(), 0);
        assert!(budget.lease(huge).is_some());
    }

    fn cvs_of(content: &[u8]) -> Vec<ChainingValue> {
        let len = content.len() as u64;
        let unit = unit_for(len) as usize;
        content
            .chunks(unit)
            .enumerate()
            .map(|(k, c)| {
                let mut h = blake3::Hasher::new();
                h.set_input_offset((k * unit) as u64).update(c);
                h.finalize_non_root()
            })
            .collect()
    }

    fn file_of(bytes: &[u8]) -> File {
        let f = tempfile::tempfile().expect("tempfile");
        f.write_all_at(bytes, 0).expect("write");
        f
    }

    /// A range read in pieces (a unit of a file of terabytes) comes in
    /// order, none larger than asked, together the range.
    #[test]
    fn a_range_read_in_pieces_is_the_range() {
        let content = data(1 << 20, 7);
        let f = file_of(&content);
        let ranges = [(10, 300_010), (500_000, 500_001)];
        let mut ahead = ReadAhead::new(&f, &ranges);
        let mut buf = vec![];
        for (i, &(s, e)) in ranges.iter().enumerate() {
            let mut got = vec![];
            ahead
                .read_pieces(i, &mut buf, 65_536, |b| {
                    assert!(!b.is_empty() && b.len() <= 65_536);
                    got.extend_from_slice(b);
                })
                .expect("read back");
            assert_eq!(got, content[s as usize..e as usize], "range {i}");
        }
    }

    #[test]
    fn ranges_read_back_are_the_files_and_announced_a_window_ahead() {
        let content = data(3 << 20, 5);
        let f = file_of(&content);
        // Ranges of 64 KiB every 96 KiB, a short one at the end.
        let mut ranges: Vec<(u64, u64)> = (0..32u64)
            .map(|k| (k * (96 << 10), k * (96 << 10) + (64 << 10)))
            .collect();
        ranges.push(((3 << 20) - 100, 3 << 20));
        let mut ahead = ReadAhead::new(&f, &ranges);
        ahead.window = 256 << 10;
        let mut buf = vec![];
        for (i, &(s, e)) in ranges.iter().enumerate() {
            ahead.read(i, &mut buf).expect("read back");
            assert_eq!(buf, content[s as usize..e as usize], "range {i}");
            // Announced: this range and the next up to the window's bytes.
            assert!(ahead.next > i, "range {i} read before it was announced");
            let beyond: u64 = ranges[i + 1..ahead.next].iter().map(|r| r.1 - r.0).sum();
            assert_eq!(beyond, ahead.ahead, "range {i}");
            let window = beyond + (e - s);
            // Below the window plus one more range: never a range beyond it.
            assert!(
                window < ahead.window + (64 << 10),
                "range {i}: {window} announced"
            );
            if ahead.next < ranges.len() {
                assert!(window >= ahead.window, "range {i}: only {window} announced");
            }
        }
        assert_eq!(ahead.next, ranges.len());
        // A range longer than the window, and one after it, read whole.
        let long = [(4096, (1 << 20) + 4096), ((2 << 20) + 1, (3 << 20) - 1)];
        let mut ahead = ReadAhead::new(&f, &long);
        ahead.window = 256 << 10;
        for (i, &(s, e)) in long.iter().enumerate() {
            ahead.read(i, &mut buf).expect("read back");
            assert_eq!(buf, content[s as usize..e as usize], "long range {i}");
            assert_eq!(ahead.next, i + 1, "long range {i}: announced too far");
        }
        // A range beyond the end fails as a read does.
        let past = [(3 << 20, (3 << 20) + 10)];
        assert!(ReadAhead::new(&f, &past).read(0, &mut buf).is_err());
    }

    #[test]
    fn units_grow_past_the_cap_and_merge_into_blake3() {
        assert_eq!(unit_for(1 << 20), 64 << 10);
        assert_eq!(unit_for(4 << 30), 64 << 10);
        assert_eq!(unit_for((4 << 30) + 1), 128 << 10);
        assert!(units_of(1 << 44) <= MAX_UNITS);
        for len in [
            (64 << 10) + 1,
            128 << 10,
            (128 << 10) + 1,
            (3 << 20) + 12345,
            4 << 20,
        ] {
            let d = data(len, 7);
            assert_eq!(
                root_of(&cvs_of(&d), len as u64),
                Some(*blake3::hash(&d).as_bytes()),
                "len {len}"
            );
        }
        assert_eq!(root_of(&cvs_of(&data(1000, 1)), 1000), None);
    }

    /// One step of building the new file: bytes that differ, or a range
    /// copied from the stored copy to the same offset.
    #[derive(Debug, Clone)]
    enum Step {
        Fresh(usize),
        Same(usize),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                (1usize..200_000).prop_map(Step::Fresh),
                (1usize..400_000).prop_map(Step::Same),
                Just(Step::Same(64 << 10)),
                Just(Step::Fresh(4096)),
            ],
            1..24,
        )
    }

    /// Builds the new file from `steps` against `old`, feeding or skipping,
    /// and checks its BLAKE3 and kept values against the real ones.
    fn check(old: &[u8], steps: &[Step], extra: usize, use_basis: bool) -> u64 {
        check_in(old, steps, extra, use_basis, usize::MAX)
    }

    /// [`check`], feeding bytes in pieces of at most `piece` (as writes come).
    fn check_in(old: &[u8], steps: &[Step], extra: usize, use_basis: bool, piece: usize) -> u64 {
        let basis = BasisDigest {
            len: old.len() as u64,
            cvs: cvs_of(old),
            entries: byteback_delta::signature(old).as_bytes()[12..].to_vec(),
        };
        let mut new = vec![];
        let mut skips = vec![];
        for (i, s) in steps.iter().enumerate() {
            match *s {
                Step::Fresh(n) => new.extend(data(n, i as u8 + 1)),
                Step::Same(n) => {
                    let from = new.len().min(old.len());
                    let to = (from + n).min(old.len());
                    skips.push((new.len(), to - from));
                    new.extend_from_slice(&old[from..to]);
                }
            }
        }
        new.extend(data(extra, 99));
        let len = new.len() as u64;
        let mut d = Digest::new(len, true);
        let took = use_basis && d.use_basis(basis);
        let mut pos = 0;
        let feed = |d: &mut Digest, bytes: &[u8]| bytes.chunks(piece).for_each(|c| d.feed(c));
        for &(at, n) in &skips {
            feed(&mut d, &new[pos..at]);
            if took && d.can_skip() {
                d.skip(n as u64);
            } else {
                feed(&mut d, &new[at..at + n]);
            }
            pos = at + n;
        }
        feed(&mut d, &new[pos..]);
        let out = file_of(&new);
        if len <= unit_for(len) {
            assert_eq!(
                d.finish(&out).unwrap(),
                Some(*blake3::hash(&new).as_bytes())
            );
            return 0;
        }
        assert_eq!(
            d.finish(&out).unwrap(),
            Some(*blake3::hash(&new).as_bytes())
        );
        let kept = d.take_kept(&out).unwrap().expect("kept");
        assert_eq!(kept.sig, byteback_delta::signature(&new));
        assert_eq!(kept.cvs, cvs_of(&new));
        assert!(d.take_kept(&out).unwrap().is_none(), "taken once");
        d.reread()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn skipped_copies_give_the_same_hash_signature_and_values(
            old_len in (70usize << 10)..(1 << 20),
            steps in steps(),
            extra in 0usize..70_000,
            use_basis in any::<bool>(),
            piece in prop_oneof![Just(usize::MAX), 1usize..5000, 5000usize..300_000],
        ) {
            let old = data(old_len, 0);
            let _ = check_in(&old, &steps, extra, use_basis, piece);
        }
    }

    #[test]
    fn an_unchanged_file_and_an_append_take_every_value_from_the_basis() {
        let old = data(3 << 20, 0);
        assert_eq!(check(&old, &[Step::Same(3 << 20)], 0, true), 0);
        // Appended: the old last block and unit are whole in the new file
        // (a length with the same block size).
        let big = data(20 << 20, 0);
        assert_eq!(block_size_for(20 << 20), block_size_for(21 << 20));
        assert_eq!(check(&big, &[Step::Same(20 << 20)], 1 << 20, true), 0);
        // With another block size, the signature is made from the file.
        assert_ne!(block_size_for(3 << 20), block_size_for((3 << 20) + 777_777));
        let read = check(&old, &[Step::Same(3 << 20)], 777_777, true);
        let new_bs = u64::from(block_size_for((3 << 20) + 777_777));
        assert!(read >= 3 << 20 && read < (3 << 20) + new_bs, "{read}");
        // Five bytes changed: one unit and one block are read back (less
        // the five bytes), not the file.
        let bs = u64::from(block_size_for(3 << 20));
        let read = check(
            &old,
            &[
                Step::Same(1 << 20),
                Step::Fresh(5),
                Step::Same((2 << 20) - 5),
            ],
            0,
            true,
        );
        assert_eq!(read, (64 << 10) + bs);
        // Without the stored copy's values every byte is hashed as it comes.
        assert_eq!(check(&old, &[Step::Same(3 << 20)], 0, false), 0);
    }

    #[test]
    fn a_file_not_fully_written_has_no_hash() {
        let mut d = Digest::new(1 << 20, true);
        d.feed(&data(1000, 1));
        let out = file_of(&data(1000, 1));
        assert_eq!(d.finish(&out).unwrap(), None);
        assert!(d.take_kept(&out).unwrap().is_none());
    }
}

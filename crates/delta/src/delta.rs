//! Deltas: computing them per segment, parsing them, and applying them with bounds.
//!
//! The format is librsync's delta format as written by fast_rsync:
//!
//! ```text
//! magic: u32 BE = 0x72730236
//! commands, each starting with one byte:
//!   0x00            END (must be the last byte)
//!   0x01..=0x40     LITERAL of 1..=64 bytes (length = command byte), then the bytes
//!   0x41..=0x44     LITERAL, length in the next 1/2/4/8 bytes (BE), then the bytes
//!   0x45..=0x54     COPY, m = cmd - 0x45: offset in 1 << (m / 4) bytes, then
//!                   length in 1 << (m % 4) bytes (both BE); offsets are absolute
//!                   basis offsets, the length is never zero
//! ```

use crate::{rolling, DeltaError, Signature};

const DELTA_MAGIC: u32 = 0x7273_0236;
const OP_END: u8 = 0x00;
const OP_LITERAL_1: u8 = 0x01;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N2: u8 = 0x42;
const OP_LITERAL_N4: u8 = 0x43;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

/// Delta of one segment of the new file against the signature.
///
/// The caller splits a large new file into segments (e.g. 8 MiB) and calls
/// this per segment; each segment's delta is independent and reproduces
/// exactly that segment's bytes (COPY ops reference absolute basis offsets).
/// Blocks straddling a segment boundary are sent as literals.
///
/// Like all rsync-style deltas the result is only probabilistically correct
/// (a 32-bit rolling checksum plus an 8-byte MD4 prefix identify a block);
/// verify the reconstructed file with a whole-file hash.
pub fn diff_segment(sig: &Signature, new_segment: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::with_capacity(new_segment.len() / 16 + 64);
    diff_segment_into(sig, new_segment, &mut out)?;
    Ok(out)
}

/// Like [`diff_segment`], but writes into `out` (cleared first), so the
/// caller can reuse one buffer for every segment.
pub fn diff_segment_into(
    sig: &Signature,
    new_segment: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DeltaError> {
    diff_after_into(sig, new_segment, None, out)
}

/// [`diff_segment_into`] of data expected to line up with basis offset
/// `origin` (see `rolling::search`).
fn diff_after_into(
    sig: &Signature,
    data: &[u8],
    origin: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<(), DeltaError> {
    out.clear();
    out.extend_from_slice(&DELTA_MAGIC.to_be_bytes());
    let mut w = OpWriter { out, copy: None };
    rolling::search(sig.index(), sig.entries(), data, origin, &mut w);
    w.finish();
    Ok(())
}

/// Delta of the next piece of the new file, found across segment boundaries.
///
/// `window` is the new file from the end of the previous piece on: the
/// bytes of this segment plus look-ahead (up to `block_size - 1` bytes of
/// the next one), so that a block starting in this segment but ending in the
/// next is still found. The delta covers `window[..n]`, where `n` (returned)
/// is the smallest op boundary at or past `want`: a copy that straddles
/// `want` is kept whole (so `n` may exceed `want` by less than a block), a
/// literal that straddles it is cut at `want`. The caller starts the next
/// piece at `window[n..]`, so a match that began in this segment lines the
/// next one up with the basis's blocks again: an insertion costs about the
/// inserted bytes, not a block per segment. With `want >= window.len()`
/// (the file's last piece) the delta covers the whole window.
///
/// `lined_up` is the basis offset the window's data is expected to line up
/// with, if any: for a file edited in place the window's offset in the new
/// file; after a piece whose delta ended with a copy, where that copy ended
/// in the basis ([`copy_end`]), so that data shifted by an insertion lines
/// up again from the next piece on. When it is a multiple of the block
/// size, the *aligned fast path* runs first: block `k` of the window is
/// compared with basis block `lined_up / block_size + k`, hashing the
/// window's blocks in chunks with fast_rsync's (SIMD) signature code and
/// comparing each entry (rolling checksum and strong hash: the very
/// criterion of a match in [`diff_segment`]) with the basis's. Runs of equal
/// blocks become COPY ops (adjacent ones merged); the bytes between them
/// (changed blocks) and after the last run are diffed as by
/// [`diff_segment`], so moved data there is still found. A file edited in
/// place is so diffed several times faster than by rolling through every
/// block. Data that does not line up costs one small chunk of hashing: when
/// the first chunk has no match at all, or a later one none, the rest of the
/// window is diffed the plain way. With `None`, or an offset that is not a
/// multiple of the block size, the window is diffed the plain way only. A
/// wrong `lined_up` costs time, never correctness.
///
/// `out` is cleared first; the delta in it is a valid delta of
/// `window[..n]` (librsync format, as [`diff_segment`]).
pub fn diff_window_into(
    sig: &Signature,
    window: &[u8],
    lined_up: Option<u64>,
    want: usize,
    out: &mut Vec<u8>,
) -> Result<usize, DeltaError> {
    let aligned = match lined_up {
        Some(at) => diff_aligned(sig, window, at, out)?,
        None => false,
    };
    if !aligned {
        diff_after_into(sig, window, lined_up, out)?;
    }
    if want >= window.len() {
        return Ok(window.len());
    }
    let (cut, produced, shorten) = find_cut(out, want)?;
    if let Some((at, keep)) = shorten {
        // The literal straddling `want` keeps its header's width (a shorter
        // length in as many bytes is as valid), so nothing moves.
        let cmd = out.get(at).copied().ok_or(DeltaError::Malformed)?;
        if (OP_LITERAL_1..=OP_LITERAL_64).contains(&cmd) {
            out[at] = u8::try_from(keep).map_err(|_| DeltaError::Malformed)?;
        } else {
            let width = 1usize << (cmd - OP_LITERAL_N1);
            let be = (keep as u64).to_be_bytes();
            let dst = out
                .get_mut(at + 1..at + 1 + width)
                .ok_or(DeltaError::Malformed)?;
            dst.copy_from_slice(&be[8 - width..]);
        }
    }
    out.truncate(cut);
    out.push(OP_END);
    Ok(produced)
}

/// Where the data after `delta` is expected to continue in the basis: the
/// end of its last op if that is a COPY (`offset + len`), else `None` (also
/// for a malformed delta). See [`diff_window_into`]'s `lined_up`.
pub fn copy_end(delta: &[u8]) -> Option<u64> {
    match ops(delta).last()? {
        Ok(Op::Copy { offset, len }) => offset.checked_add(len),
        _ => None,
    }
}

/// Blocks hashed in the aligned fast path's first chunk: small, so a window
/// whose data does not line up with the basis wastes little.
const ALIGNED_FIRST_CHUNK: usize = 16;
/// Largest chunk of the aligned fast path (the chunk doubles after each
/// chunk with a match, up to this).
const ALIGNED_MAX_CHUNK: usize = 256;

/// The aligned fast path of [`diff_window_into`]: writes the whole window's
/// delta into `out` and returns true, or returns false (with `out` in an
/// unspecified state) when it does not apply or found no aligned match.
fn diff_aligned(
    sig: &Signature,
    window: &[u8],
    at: u64,
    out: &mut Vec<u8>,
) -> Result<bool, DeltaError> {
    let bs64 = u64::from(sig.block_size());
    let Ok(bs) = usize::try_from(bs64) else {
        return Ok(false);
    };
    if bs == 0 || at % bs64 != 0 {
        return Ok(false);
    }
    let first = at / bs64;
    // The basis blocks compared in line: all but the last, which may be
    // short (a full block of the window never matches it here; the plain
    // diff of the rest still can).
    let comparable = sig.block_count().saturating_sub(1);
    if first >= comparable {
        return Ok(false);
    }
    let full = window.len() / bs;
    let lined = usize::try_from((comparable - first).min(full as u64)).unwrap_or(full);
    let entry = sig.entry_len();
    let entries = sig.entries();
    let first = usize::try_from(first).map_err(|_| DeltaError::Diff("basis too long".into()))?;
    let options = sig.options();

    out.clear();
    out.extend_from_slice(&DELTA_MAGIC.to_be_bytes());
    let mut w = OpWriter { out, copy: None };
    // Window bytes covered by ops so far; next block to compare; chunk size.
    let (mut done, mut next, mut chunk) = (0usize, 0usize, ALIGNED_FIRST_CHUNK);
    // The basis offset the data at `done` lines up with.
    let mut origin = at;
    // The window's entries, a chunk at a time.
    let mut ours = Vec::new();
    while next < lined {
        let m = chunk.min(lined - next);
        let data = window
            .get(next * bs..(next + m) * bs)
            .ok_or(DeltaError::Diff("window range".into()))?;
        ours.clear();
        crate::signature::entries_into(data, options, &mut ours);
        let theirs = entries
            .get((first + next) * entry..(first + next + m) * entry)
            .ok_or(DeltaError::Diff("signature range".into()))?;
        let mut matched = false;
        for (i, (a, b)) in ours
            .chunks_exact(entry)
            .zip(theirs.chunks_exact(entry))
            .enumerate()
        {
            if a != b {
                continue;
            }
            let pos = (next + i) * bs;
            if pos > done {
                diff_gap(sig, &window[done..pos], origin, &mut w);
            }
            let block = (first + next + i) as u64;
            w.copy(block * bs64, bs64);
            done = pos + bs;
            origin = (block + 1) * bs64;
            matched = true;
        }
        next += m;
        if !matched {
            break;
        }
        chunk = (chunk * 2).min(ALIGNED_MAX_CHUNK);
    }
    if done == 0 {
        return Ok(false);
    }
    if done < window.len() {
        diff_gap(sig, &window[done..], origin, &mut w);
    }
    w.finish();
    Ok(true)
}

/// Diff `gap` (expected to line up with basis offset `origin`) the plain
/// way and append its ops to `w`.
fn diff_gap(sig: &Signature, gap: &[u8], origin: u64, w: &mut OpWriter<'_>) {
    rolling::search(sig.index(), sig.entries(), gap, Some(origin), w);
}

impl rolling::Found for OpWriter<'_> {
    fn literal(&mut self, data: &[u8]) {
        OpWriter::literal(self, data);
    }

    fn copy(&mut self, offset: u64, len: u64) {
        OpWriter::copy(self, offset, len);
    }
}

/// Writes delta ops after the magic, merging adjacent copies.
pub(crate) struct OpWriter<'a> {
    out: &'a mut Vec<u8>,
    /// A copy not written yet: (basis offset, length).
    copy: Option<(u64, u64)>,
}

impl<'a> OpWriter<'a> {
    /// A writer of a delta into `out`, cleared and given the magic first.
    #[cfg(test)]
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        out.clear();
        out.extend_from_slice(&DELTA_MAGIC.to_be_bytes());
        OpWriter { out, copy: None }
    }

    fn copy(&mut self, offset: u64, len: u64) {
        if let Some((o, l)) = self.copy {
            if o.checked_add(l) == Some(offset) {
                self.copy = Some((o, l + len));
                return;
            }
        }
        self.flush();
        self.copy = Some((offset, len));
    }

    fn literal(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.flush();
        let (h, n) = literal_header(data.len() as u64);
        self.out.extend_from_slice(&h[4..n]);
        self.out.extend_from_slice(data);
    }

    fn flush(&mut self) {
        if let Some((offset, len)) = self.copy.take() {
            let (oc, ob) = uint_class(offset);
            let (lc, lb) = uint_class(len);
            self.out.push(OP_COPY_N1_N1 + oc * 4 + lc);
            self.out.extend_from_slice(&offset.to_be_bytes()[8 - ob..]);
            self.out.extend_from_slice(&len.to_be_bytes()[8 - lb..]);
        }
    }

    pub(crate) fn finish(mut self) {
        self.flush();
        self.out.push(OP_END);
    }
}

/// Size class (0..=3) of the shortest of 1, 2, 4 or 8 big-endian bytes
/// holding `v`, and that number of bytes.
fn uint_class(v: u64) -> (u8, usize) {
    if v <= u64::from(u8::MAX) {
        (0, 1)
    } else if v <= u64::from(u16::MAX) {
        (1, 2)
    } else if v <= u64::from(u32::MAX) {
        (2, 4)
    } else {
        (3, 8)
    }
}

/// Where to cut `delta` so that it produces at least `want` bytes: (length
/// of the delta kept before END, bytes it produces, and for a literal cut
/// short: the position of its command byte and its new length).
#[allow(clippy::type_complexity)]
fn find_cut(
    delta: &[u8],
    want: usize,
) -> Result<(usize, usize, Option<(usize, usize)>), DeltaError> {
    let total = delta.len();
    let mut it = ops(delta);
    let mut produced = 0usize;
    if want == 0 {
        // Nothing wanted: an empty delta (magic only).
        return Ok((4.min(total), 0, None));
    }
    loop {
        let before = if it.started { total - it.rest.len() } else { 4 };
        let op = match it.next() {
            Some(op) => op?,
            None => return Ok((total.saturating_sub(1), produced, None)),
        };
        let after = total - it.rest.len();
        match op {
            Op::Copy { len, .. } => {
                produced += usize::try_from(len).map_err(|_| DeltaError::TooLong)?;
            }
            Op::Literal(data) => {
                if produced + data.len() > want {
                    let keep = want - produced;
                    let data_start = after - data.len();
                    return Ok((data_start + keep, want, Some((before, keep))));
                }
                produced += data.len();
            }
        }
        if produced >= want {
            return Ok((after, produced, None));
        }
    }
}

/// Longest header [`literal_header`] returns: magic plus the longest LITERAL command.
pub const LITERAL_HEADER_MAX: usize = 4 + 1 + 8;
/// The byte that ends every delta (what follows the data of a [`literal_header`]).
pub const DELTA_END: u8 = OP_END;

/// The bytes that come before `len` bytes of data in a [`literal_delta`]
/// (magic and one LITERAL command, none for empty data), in the first
/// returned-length bytes of the array. `literal_header(n) ++ data ++
/// [DELTA_END]` is exactly `literal_delta(data)`, so a caller can read file
/// data straight into a buffer behind room for the header, without a copy.
pub fn literal_header(len: u64) -> ([u8; LITERAL_HEADER_MAX], usize) {
    let mut h = [0u8; LITERAL_HEADER_MAX];
    h[..4].copy_from_slice(&DELTA_MAGIC.to_be_bytes());
    let n = if len == 0 {
        4 // nothing but END follows
    } else if len <= 64 {
        h[4] = OP_LITERAL_1 + (len - 1) as u8;
        5
    } else if let Ok(n) = u8::try_from(len) {
        h[4] = OP_LITERAL_N1;
        h[5] = n;
        6
    } else if let Ok(n) = u16::try_from(len) {
        h[4] = OP_LITERAL_N2;
        h[5..7].copy_from_slice(&n.to_be_bytes());
        7
    } else if let Ok(n) = u32::try_from(len) {
        h[4] = OP_LITERAL_N4;
        h[5..9].copy_from_slice(&n.to_be_bytes());
        9
    } else {
        h[4] = OP_LITERAL_N8;
        h[5..13].copy_from_slice(&len.to_be_bytes());
        13
    };
    (h, n)
}

/// A "whole file" delta for segment data when there is no basis: a single
/// LITERAL op (none for empty data), using the shortest length encoding.
pub fn literal_delta(data: &[u8]) -> Vec<u8> {
    let (h, n) = literal_header(data.len() as u64);
    let mut out = Vec::with_capacity(data.len() + n + 1);
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(data);
    out.push(OP_END);
    out
}

/// One operation of a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Copy `len` bytes from absolute basis offset `offset`.
    Copy {
        /// Basis offset to copy from.
        offset: u64,
        /// Number of bytes (never zero).
        len: u64,
    },
    /// Append these bytes (may be empty if the delta encodes a zero-length literal).
    Literal(&'a [u8]),
}

impl Op<'_> {
    /// Number of output bytes this operation produces.
    pub fn out_len(&self) -> u64 {
        match *self {
            Op::Copy { len, .. } => len,
            Op::Literal(data) => data.len() as u64,
        }
    }
}

/// Iterator over the operations of a delta; see [`ops`].
#[derive(Debug, Clone)]
pub struct Ops<'a> {
    rest: &'a [u8],
    started: bool,
    done: bool,
}

/// Parse the operations of `delta` lazily, checking structure only (magic,
/// known commands, lengths present, non-zero copies, END last with nothing
/// after it). Yields `Err(DeltaError::Malformed)` at the first problem and
/// then stops. Copy ranges and output length are not checked here; use
/// [`apply_ops`] for that.
pub fn ops(delta: &[u8]) -> Ops<'_> {
    Ops {
        rest: delta,
        started: false,
        done: false,
    }
}

impl<'a> Ops<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DeltaError> {
        if self.rest.len() < n {
            return Err(DeltaError::Malformed);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    /// A big-endian unsigned integer of `n <= 8` bytes.
    fn take_uint(&mut self, n: usize) -> Result<u64, DeltaError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn step(&mut self) -> Result<Option<Op<'a>>, DeltaError> {
        if !self.started {
            if self.take_uint(4)? != u64::from(DELTA_MAGIC) {
                return Err(DeltaError::Malformed);
            }
            self.started = true;
        }
        let cmd = self
            .take(1)?
            .first()
            .copied()
            .ok_or(DeltaError::Malformed)?;
        match cmd {
            OP_END => {
                if self.rest.is_empty() {
                    Ok(None)
                } else {
                    Err(DeltaError::Malformed)
                }
            }
            OP_LITERAL_1..=OP_LITERAL_64 => Ok(Some(Op::Literal(self.take(usize::from(cmd))?))),
            OP_LITERAL_N1..=OP_LITERAL_N8 => {
                let len = self.take_uint(1 << (cmd - OP_LITERAL_N1))?;
                let len = usize::try_from(len).map_err(|_| DeltaError::Malformed)?;
                Ok(Some(Op::Literal(self.take(len)?)))
            }
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let mode = cmd - OP_COPY_N1_N1;
                let offset = self.take_uint(1 << (mode / 4))?;
                let len = self.take_uint(1 << (mode % 4))?;
                if len == 0 {
                    return Err(DeltaError::Malformed);
                }
                Ok(Some(Op::Copy { offset, len }))
            }
            _ => Err(DeltaError::Malformed),
        }
    }
}

impl<'a> Iterator for Ops<'a> {
    type Item = Result<Op<'a>, DeltaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(op)) => Some(Ok(op)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl std::iter::FusedIterator for Ops<'_> {}

/// Receives patch operations; implemented by the server (pwrite / FICLONERANGE)
/// and by the in-memory applier.
pub trait PatchSink {
    /// The sink's error type; delta errors convert into it.
    type Error: From<DeltaError>;
    /// Copy `len` bytes from basis offset `offset` to the current output position.
    fn copy(&mut self, offset: u64, len: u64) -> Result<(), Self::Error>;
    /// Append literal bytes at the current output position.
    fn literal(&mut self, data: &[u8]) -> Result<(), Self::Error>;
}

/// Parse `delta` (librsync format, as produced by [`diff_segment`]) and push
/// its ops into `sink`, in order. Returns the number of output bytes produced.
///
/// Bounded and all-or-nothing with respect to the delta: the whole delta is
/// validated before the first op reaches `sink`, so on a [`DeltaError`] the
/// sink has seen nothing. It fails with
/// * [`DeltaError::Malformed`] for truncated or garbage input,
/// * [`DeltaError::BasisRange`] if a COPY reaches beyond `basis_len`,
/// * [`DeltaError::TooLong`] if the total output would exceed `max_out` bytes,
///
/// whichever the first offending op triggers (checked in that order). It
/// never panics. Zero-length literals are not passed to the sink. Errors
/// returned by the sink abort the application and are passed through.
pub fn apply_ops<S: PatchSink>(
    delta: &[u8],
    basis_len: u64,
    max_out: u64,
    sink: &mut S,
) -> Result<u64, S::Error> {
    let total = validate(delta, basis_len, max_out)?;
    emit(delta, sink)?;
    Ok(total)
}

/// Check a whole delta; returns its output length.
fn validate(delta: &[u8], basis_len: u64, max_out: u64) -> Result<u64, DeltaError> {
    let mut total = 0u64;
    for op in ops(delta) {
        let op = op?;
        if let Op::Copy { offset, len } = op {
            match offset.checked_add(len) {
                Some(end) if end <= basis_len => {}
                _ => return Err(DeltaError::BasisRange),
            }
        }
        total = total
            .checked_add(op.out_len())
            .filter(|&t| t <= max_out)
            .ok_or(DeltaError::TooLong)?;
    }
    Ok(total)
}

/// Push the ops of an already validated delta into `sink`.
fn emit<S: PatchSink>(delta: &[u8], sink: &mut S) -> Result<(), S::Error> {
    for op in ops(delta) {
        match op? {
            Op::Copy { offset, len } => sink.copy(offset, len)?,
            Op::Literal([]) => {}
            Op::Literal(data) => sink.literal(data)?,
        }
    }
    Ok(())
}

/// In-memory sink for [`apply_to_vec`].
struct VecSink<'b> {
    basis: &'b [u8],
    out: Vec<u8>,
}

impl PatchSink for VecSink<'_> {
    type Error = DeltaError;

    fn copy(&mut self, offset: u64, len: u64) -> Result<(), DeltaError> {
        let start = usize::try_from(offset).map_err(|_| DeltaError::BasisRange)?;
        let len = usize::try_from(len).map_err(|_| DeltaError::BasisRange)?;
        let end = start.checked_add(len).ok_or(DeltaError::BasisRange)?;
        let src = self.basis.get(start..end).ok_or(DeltaError::BasisRange)?;
        self.out.extend_from_slice(src);
        Ok(())
    }

    fn literal(&mut self, data: &[u8]) -> Result<(), DeltaError> {
        self.out.extend_from_slice(data);
        Ok(())
    }
}

/// Convenience in-memory apply (tests, small files): basis in memory, output
/// `Vec`, limited to `max_out` bytes. Same checks as [`apply_ops`].
pub fn apply_to_vec(basis: &[u8], delta: &[u8], max_out: u64) -> Result<Vec<u8>, DeltaError> {
    let total = validate(delta, basis.len() as u64, max_out)?;
    let capacity = usize::try_from(total).map_err(|_| DeltaError::TooLong)?;
    let mut sink = VecSink {
        basis,
        out: Vec::with_capacity(capacity),
    };
    emit(delta, &mut sink)?;
    Ok(sink.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records ops; optionally fails on the n-th call.
    #[derive(Default)]
    struct Recorder {
        ops: Vec<(u64, u64, Vec<u8>)>,
        fail_at: Option<usize>,
    }

    #[derive(Debug)]
    enum RecErr {
        Delta(DeltaError),
        Sink,
    }

    impl From<DeltaError> for RecErr {
        fn from(e: DeltaError) -> Self {
            RecErr::Delta(e)
        }
    }

    impl Recorder {
        fn check_fail(&self) -> Result<(), RecErr> {
            if self.fail_at == Some(self.ops.len()) {
                Err(RecErr::Sink)
            } else {
                Ok(())
            }
        }
    }

    impl PatchSink for Recorder {
        type Error = RecErr;
        fn copy(&mut self, offset: u64, len: u64) -> Result<(), RecErr> {
            self.check_fail()?;
            self.ops.push((offset, len, Vec::new()));
            Ok(())
        }
        fn literal(&mut self, data: &[u8]) -> Result<(), RecErr> {
            self.check_fail()?;
            self.ops.push((0, 0, data.to_vec()));
            Ok(())
        }
    }

    fn delta(body: &[u8]) -> Vec<u8> {
        let mut d = DELTA_MAGIC.to_be_bytes().to_vec();
        d.extend_from_slice(body);
        d
    }

    fn apply_rec(d: &[u8], basis_len: u64, max_out: u64) -> (Result<u64, RecErr>, Recorder) {
        let mut rec = Recorder::default();
        let r = apply_ops(d, basis_len, max_out, &mut rec);
        (r, rec)
    }

    #[test]
    fn literal_delta_encodings() {
        for (len, head) in [
            (0usize, vec![]),
            (1, vec![0x01]),
            (64, vec![0x40]),
            (65, vec![0x41, 65]),
            (255, vec![0x41, 255]),
            (256, vec![0x42, 1, 0]),
            (65_535, vec![0x42, 0xff, 0xff]),
            (65_536, vec![0x43, 0, 1, 0, 0]),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let d = literal_delta(&data);
            assert_eq!(&d[..4], &DELTA_MAGIC.to_be_bytes());
            assert_eq!(&d[4..4 + head.len()], &head[..], "len {len}");
            assert_eq!(d.len(), 4 + head.len() + len + 1);
            assert_eq!(d.last(), Some(&OP_END));
            assert_eq!(apply_to_vec(&[], &d, len as u64).expect("apply"), data);
            let mut fr = Vec::new();
            fast_rsync::apply(&[], &d, &mut fr).expect("fast_rsync accepts literal_delta");
            assert_eq!(fr, data);
        }
    }

    #[test]
    fn literal_header_matches_literal_delta() {
        for len in [0u64, 1, 64, 65, 255, 256, 65_535, 65_536, 4 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let (h, n) = literal_header(len);
            let mut d = h[..n].to_vec();
            d.extend_from_slice(&data);
            d.push(DELTA_END);
            assert_eq!(d, literal_delta(&data), "len {len}");
        }
        let (h, n) = literal_header(1 << 32);
        assert_eq!(n, LITERAL_HEADER_MAX);
        assert_eq!(h[4], OP_LITERAL_N8);
    }

    #[test]
    fn diff_segment_into_reuses_the_buffer() {
        let basis: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let sig = Signature::parse(crate::signature(&basis).as_bytes()).expect("sig");
        let mut new = basis.clone();
        new[1000..1100].fill(7);
        let mut out = vec![1, 2, 3];
        diff_segment_into(&sig, &new, &mut out).expect("diff");
        assert_eq!(out, diff_segment(&sig, &new).expect("diff"));
        assert_eq!(
            apply_to_vec(&basis, &out, new.len() as u64).expect("apply"),
            new
        );
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect()
    }

    /// What the client does: pieces of about `seg` bytes, each diffed with
    /// `look` bytes of look-ahead, the next starting where the last ended,
    /// with the aligned fast path if `fast`. Returns the rebuilt file and
    /// the delta bytes.
    fn windowed(basis: &[u8], new: &[u8], seg: usize, look: usize, fast: bool) -> (Vec<u8>, usize) {
        let sig = Signature::parse(crate::signature(basis).as_bytes()).expect("sig");
        let (mut pos, mut rebuilt, mut wire, mut d) = (0, vec![], 0, vec![]);
        let mut lined_up = 0;
        while pos < new.len() {
            let end = (pos + seg + look).min(new.len());
            let want = if end == new.len() { end - pos } else { seg };
            let at = fast.then_some(lined_up);
            let n = diff_window_into(&sig, &new[pos..end], at, want, &mut d).expect("diff");
            lined_up = copy_end(&d).unwrap_or(lined_up + n as u64);
            assert!(n >= want.min(end - pos) && n <= end - pos, "piece {n}");
            let out = apply_to_vec(basis, &d, n as u64).expect("apply");
            assert_eq!(out, &new[pos..pos + n], "piece at {pos}");
            rebuilt.extend_from_slice(&out);
            wire += d.len();
            pos += n;
        }
        (rebuilt, wire)
    }

    #[test]
    fn an_insertion_costs_the_inserted_bytes_across_segments() {
        let basis = noise(4 << 20, 1);
        let bs = crate::block_size_for(basis.len() as u64) as usize;
        let seg = 64 * bs;
        let mut new = basis[..1000].to_vec();
        new.extend_from_slice(b"7 bytes");
        new.extend_from_slice(&basis[1000..]);
        let pieces = new.len().div_ceil(seg);
        for fast in [false, true] {
            let (rebuilt, wire) = windowed(&basis, &new, seg, bs - 1, fast);
            assert_eq!(rebuilt, new);
            // The block holding the insertion travels as literal, and every
            // piece costs a copy op and its framing: no block per segment.
            assert!(
                wire <= bs + 7 + pieces * 32,
                "wire {wire} for {pieces} pieces of {seg}, block {bs}"
            );
        }
        let (_, wire) = windowed(&basis, &new, seg, bs - 1, true);
        // Fixed segments without look-ahead lose about a block per segment.
        let (_, fixed) = windowed(&basis, &new, seg, 0, false);
        assert!(fixed > (pieces - 1) * (bs - 7), "fixed {fixed}");
        assert!(wire * 4 < fixed, "windowed {wire} vs fixed {fixed}");
    }

    #[test]
    fn windows_cut_literals_and_rebuild_any_content() {
        let basis = noise(300_000, 2);
        let bs = crate::block_size_for(basis.len() as u64) as usize;
        // Fresh data (long literals cut at the wanted length), blocks moved
        // around, short pieces, and an unchanged file.
        let mut mixed = noise(70_000, 3);
        mixed.extend_from_slice(&basis[5_000..200_000]);
        mixed.extend_from_slice(&noise(333, 4));
        mixed.extend_from_slice(&basis[..90_000]);
        for new in [
            noise(500_000, 5),
            mixed,
            basis.clone(),
            basis[..1234].to_vec(),
        ] {
            for (seg, look) in [(bs, bs - 1), (7 * bs, bs - 1), (10 * bs, 0), (100, 40)] {
                for fast in [false, true] {
                    let (rebuilt, _) = windowed(&basis, &new, seg, look, fast);
                    assert_eq!(rebuilt, new, "seg {seg} look {look} fast {fast}");
                }
            }
        }
        let sig = Signature::parse(crate::signature(&basis).as_bytes()).expect("sig");
        let mut d = vec![];
        for at in [None, Some(0)] {
            assert_eq!(
                diff_window_into(&sig, &basis[..5000], at, 0, &mut d).expect("empty"),
                0
            );
        }
        assert_eq!(
            apply_to_vec(&basis, &d, 0).expect("apply"),
            Vec::<u8>::new()
        );
    }

    /// Bytes a delta sends as literals.
    fn literal_bytes(delta: &[u8]) -> usize {
        ops(delta)
            .map(|op| match op.expect("valid") {
                Op::Literal(d) => d.len(),
                Op::Copy { .. } => 0,
            })
            .sum()
    }

    #[test]
    fn a_short_last_block_is_found_after_an_append_and_at_the_end() {
        let len = 300_000 + 777;
        let basis = noise(len, 7);
        let bs = crate::block_size_for(len as u64) as usize;
        let r = len % bs;
        assert!(r > 0 && r < bs, "a short last block: {r} of {bs}");
        let sig = Signature::parse(crate::signature(&basis).as_bytes()).expect("sig");
        let last = len - r;
        // Grown: only the appended bytes travel, whole, in a window that
        // lines up (aligned path, or plain when it starts at the last block),
        // and in windows of any size.
        let grown = [&basis[..], &noise(5000, 8)].concat();
        let whole = diff_segment(&sig, &grown).expect("diff");
        assert_eq!(literal_bytes(&whole), 5000);
        let mut d = vec![];
        for at in [0, 20 * bs, last - bs, last] {
            let n = diff_window_into(&sig, &grown[at..], Some(at as u64), usize::MAX, &mut d)
                .expect("diff");
            assert_eq!(n, grown.len() - at);
            assert_eq!(literal_bytes(&d), 5000, "window from {at}");
            assert_eq!(
                apply_to_vec(&basis, &d, n as u64).expect("apply"),
                &grown[at..]
            );
        }
        for fast in [false, true] {
            let (rebuilt, _) = windowed(&basis, &grown, 7 * bs, bs - 1, fast);
            assert_eq!(rebuilt, grown);
        }
        // Edited elsewhere: the unchanged tail is copied, only the block travels.
        let mut edited = basis.clone();
        edited[3 * bs + 5] ^= 1;
        let d = diff_segment(&sig, &edited).expect("diff");
        assert_eq!(literal_bytes(&d), bs);
        assert_eq!(apply_to_vec(&basis, &d, len as u64).expect("apply"), edited);
        // The tail cut short, or changed: not taken for the basis's.
        for new in [basis[..len - 100].to_vec(), {
            let mut t = basis.clone();
            t[len - 1] ^= 1;
            t
        }] {
            let d = diff_segment(&sig, &new).expect("diff");
            assert_eq!(literal_bytes(&d), new.len() - last);
            assert_eq!(
                apply_to_vec(&basis, &d, new.len() as u64).expect("apply"),
                new
            );
        }
    }

    #[test]
    fn aligned_fast_path_engages_only_where_data_lines_up() {
        let basis = noise(1 << 20, 6);
        let bs = crate::block_size_for(basis.len() as u64) as usize;
        let sig = Signature::parse(crate::signature(&basis).as_bytes()).expect("sig");
        let mut new = basis.clone();
        for b in [3, 4, 100, 200] {
            new[b * bs + 10..b * bs + 20].fill(0);
        }
        let (mut fast, mut plain) = (vec![], vec![]);
        let window = &new[64 * bs..];
        assert!(diff_aligned(&sig, window, (64 * bs) as u64, &mut fast).expect("diff"));
        diff_segment_into(&sig, window, &mut plain).expect("diff");
        // Same ops: copies merged, the changed block 100 (36th of the window) literal.
        assert_eq!(fast, plain);
        let all: Vec<Op> = ops(&fast).collect::<Result<_, _>>().expect("valid");
        assert_eq!(
            all,
            vec![
                Op::Copy {
                    offset: (64 * bs) as u64,
                    len: (36 * bs) as u64
                },
                Op::Literal(&new[100 * bs..101 * bs]),
                Op::Copy {
                    offset: (101 * bs) as u64,
                    len: (99 * bs) as u64
                },
                Op::Literal(&new[200 * bs..201 * bs]),
                Op::Copy {
                    offset: (201 * bs) as u64,
                    len: (basis.len() - 201 * bs) as u64
                },
            ]
        );
        // Not at a block boundary, not where the data is, past the basis's
        // comparable blocks, or with data shifted: no fast path.
        assert!(!diff_aligned(&sig, window, (64 * bs + 1) as u64, &mut fast).expect("diff"));
        assert!(!diff_aligned(&sig, window, (32 * bs) as u64, &mut fast).expect("diff"));
        assert!(
            !diff_aligned(&sig, &new[..bs], (basis.len() / bs * bs) as u64, &mut fast)
                .expect("diff")
        );
        let shifted = [b"7 bytes".as_slice(), &basis].concat();
        assert!(!diff_aligned(&sig, &shifted, 0, &mut fast).expect("diff"));
        // A window of the first 16 blocks changed but the rest in place: the
        // first chunk finds nothing, so the plain diff does it all.
        let mut head = basis.clone();
        head[..16 * bs].fill(1);
        assert!(!diff_aligned(&sig, &head, 0, &mut fast).expect("diff"));
        head[15 * bs..16 * bs].copy_from_slice(&basis[15 * bs..16 * bs]);
        assert!(diff_aligned(&sig, &head, 0, &mut fast).expect("diff"));
        assert_eq!(
            apply_to_vec(&basis, &fast, head.len() as u64).expect("apply"),
            head
        );
    }

    #[test]
    fn copy_encodings() {
        let basis: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        // 1-byte offset + 1-byte len, 2+2, 4+1, 8+8.
        let d = delta(&[
            0x45, 3, 4, //
            0x4a, 0x01, 0x00, 0x01, 0x00, //
            0x4d, 0, 1, 0, 0, 2, //
            0x54, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, //
            0x00,
        ]);
        let out = apply_to_vec(&basis, &d, 1000).expect("apply");
        let mut want = basis[3..7].to_vec();
        want.extend_from_slice(&basis[256..512]);
        want.extend_from_slice(&basis[65_536..65_538]);
        want.push(basis[9]);
        assert_eq!(out, want);
        let (r, rec) = apply_rec(&d, basis.len() as u64, 1000);
        assert_eq!(r.expect("apply_ops"), want.len() as u64);
        assert_eq!(
            rec.ops,
            vec![
                (3, 4, vec![]),
                (256, 256, vec![]),
                (65_536, 2, vec![]),
                (9, 1, vec![])
            ]
        );
    }

    #[test]
    fn too_long_is_refused_before_any_op() {
        let data = vec![9u8; 1000];
        let mut d = literal_delta(&data);
        // literal 1000 + copy 100 = 1100 bytes of output
        d.pop();
        d.extend_from_slice(&[0x45, 0, 100, OP_END]);
        let (r, rec) = apply_rec(&d, 100, 1099);
        assert!(matches!(r, Err(RecErr::Delta(DeltaError::TooLong))));
        assert!(rec.ops.is_empty());
        let (r, rec) = apply_rec(&d, 100, 1100);
        assert_eq!(r.expect("exact limit"), 1100);
        assert_eq!(rec.ops.len(), 2);
        assert!(matches!(
            apply_to_vec(&[0; 100], &d, 0),
            Err(DeltaError::TooLong)
        ));
        assert!(matches!(
            apply_to_vec(&[0; 100], &d, 999),
            Err(DeltaError::TooLong)
        ));
        // A huge copy length that still fits u64 when added.
        let d = delta(&[0x45, 0, 1, 0x45, 0, 1, OP_END]);
        assert!(matches!(
            apply_to_vec(&[1], &d, 1),
            Err(DeltaError::TooLong)
        ));
        assert_eq!(apply_to_vec(&[1], &d, 2).expect("fits"), vec![1, 1]);
    }

    #[test]
    fn copy_beyond_basis_is_refused() {
        // offset 10, len 1 against a 10-byte basis
        let d = delta(&[0x01, 42, 0x45, 10, 1, OP_END]);
        let (r, rec) = apply_rec(&d, 10, u64::MAX);
        assert!(matches!(r, Err(RecErr::Delta(DeltaError::BasisRange))));
        assert!(rec.ops.is_empty());
        assert!(matches!(
            apply_to_vec(&[0; 10], &d, 1 << 20),
            Err(DeltaError::BasisRange)
        ));
        assert_eq!(
            apply_to_vec(&[0; 11], &d, 2).expect("in range"),
            vec![42, 0]
        );
        // offset + len overflowing u64
        let mut body = vec![0x54];
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        body.extend_from_slice(&2u64.to_be_bytes());
        body.push(OP_END);
        let d = delta(&body);
        let (r, _) = apply_rec(&d, u64::MAX, u64::MAX);
        assert!(matches!(r, Err(RecErr::Delta(DeltaError::BasisRange))));
        // any copy against an empty basis
        assert!(matches!(
            apply_to_vec(&[], &delta(&[0x45, 0, 1, OP_END]), 10),
            Err(DeltaError::BasisRange)
        ));
    }

    #[test]
    fn malformed_is_refused_before_any_op() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short magic", DELTA_MAGIC.to_be_bytes()[..3].to_vec()),
            ("wrong magic", vec![0x72, 0x73, 0x01, 0x36, OP_END]),
            ("no END", delta(&[0x01, 7])),
            ("only magic", delta(&[])),
            ("trailing", delta(&[0x01, 7, OP_END, 0])),
            ("truncated literal", delta(&[0x03, 1, 2])),
            ("truncated literal len", delta(&[0x01, 7, 0x42, 1])),
            (
                "truncated N8 literal",
                delta(&[0x44, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, OP_END]),
            ),
            ("truncated copy", delta(&[0x01, 7, 0x46, 1, 0])),
            ("zero copy", delta(&[0x01, 7, 0x45, 0, 0, OP_END])),
            ("unknown 0x55", delta(&[0x01, 7, 0x55, OP_END])),
            ("unknown 0xff", delta(&[0xff, OP_END])),
        ];
        for (what, d) in cases {
            let (r, rec) = apply_rec(&d, 1 << 20, 1 << 20);
            assert!(
                matches!(r, Err(RecErr::Delta(DeltaError::Malformed))),
                "{what}: {r:?}"
            );
            assert!(rec.ops.is_empty(), "{what}");
            assert!(
                matches!(
                    apply_to_vec(&[0; 64], &d, 1 << 20),
                    Err(DeltaError::Malformed)
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn empty_and_zero_literals() {
        let d = delta(&[OP_END]);
        assert_eq!(apply_to_vec(&[], &d, 0).expect("empty"), Vec::<u8>::new());
        // zero-length N1 literal: accepted (like fast_rsync), not passed to the sink
        let d = delta(&[0x41, 0, 0x01, 5, OP_END]);
        let (r, rec) = apply_rec(&d, 0, 1);
        assert_eq!(r.expect("zero literal"), 1);
        assert_eq!(rec.ops, vec![(0, 0, vec![5])]);
    }

    #[test]
    fn sink_errors_pass_through() {
        let d = delta(&[0x01, 1, 0x01, 2, 0x01, 3, OP_END]);
        let mut rec = Recorder {
            fail_at: Some(1),
            ..Recorder::default()
        };
        let r = apply_ops(&d, 0, 10, &mut rec);
        assert!(matches!(r, Err(RecErr::Sink)));
        assert_eq!(rec.ops.len(), 1);
    }

    #[test]
    fn ops_iterator() {
        let d = delta(&[0x02, 1, 2, 0x45, 3, 4, OP_END]);
        let all: Vec<_> = ops(&d).collect::<Result<_, _>>().expect("valid");
        assert_eq!(
            all,
            vec![Op::Literal(&[1, 2]), Op::Copy { offset: 3, len: 4 }]
        );
        let mut it = ops(&[1, 2, 3]);
        assert!(matches!(it.next(), Some(Err(DeltaError::Malformed))));
        assert!(it.next().is_none());
    }
}

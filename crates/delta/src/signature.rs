//! Signatures: computing (whole or streamed), serializing and parsing.
//!
//! The serialized form is fast_rsync's (librsync's) MD4 signature format:
//!
//! ```text
//! magic: u32 BE = 0x72730136
//! block_size: u32 BE
//! strong_hash_len: u32 BE
//! per block, in order: rolling checksum u32 BE, strong_hash_len bytes of MD4
//! ```
//!
//! The last block may be shorter than `block_size`. Every block entry depends
//! only on that block's bytes, so signatures of block-aligned pieces
//! concatenate (minus their headers) into the signature of the whole; this is
//! what [`SignatureBuilder`] relies on.

use std::fmt;

use fast_rsync::SignatureOptions;

use crate::{block_size_for, DeltaError, MAX_BLOCK, MAX_SIG_BLOCKS, MIN_BLOCK, STRONG_HASH_LEN};

/// fast_rsync's MD4 signature magic (the only kind fast_rsync can diff against).
const MD4_MAGIC: u32 = 0x7273_0136;
/// Magic, block size, strong hash length.
pub(crate) const HEADER_LEN: usize = 12;
/// Length of the rolling checksum in each block entry.
const ROLLING_LEN: usize = 4;
/// Length of an MD4 digest, the largest possible strong hash.
const MD4_LEN: u32 = 16;

fn options(block_size: u32) -> SignatureOptions {
    SignatureOptions {
        block_size,
        crypto_hash_size: STRONG_HASH_LEN,
    }
}

fn header(block_size: u32) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[0..4].copy_from_slice(&MD4_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&block_size.to_be_bytes());
    h[8..12].copy_from_slice(&STRONG_HASH_LEN.to_be_bytes());
    h
}

/// Length of one block's entry in a signature: rolling checksum and strong hash.
pub const ENTRY_LEN: usize = ROLLING_LEN + STRONG_HASH_LEN as usize;

/// The entries (no header) of `data`'s blocks of `block_size` bytes, all but
/// the last full, appended to `out`: the same bytes [`signature`] gives
/// those blocks wherever they are in a file.
pub fn block_entries(data: &[u8], block_size: u32, out: &mut Vec<u8>) {
    entries_into(data, options(block_size), out);
}

/// [`block_entries`] with any strong hash length (`options`): a block of
/// zeros (a sparse or preallocated file's holes) takes the entry of a zero
/// block, computed once per thread, instead of its rolling checksum and
/// MD4; runs of other blocks are hashed together, as by fast_rsync.
pub(crate) fn entries_into(data: &[u8], options: SignatureOptions, out: &mut Vec<u8>) {
    let bs = options.block_size as usize;
    let hash = |piece: &[u8], out: &mut Vec<u8>| {
        if !piece.is_empty() {
            let sig = fast_rsync::Signature::calculate(piece, options);
            out.extend_from_slice(sig.serialized().get(HEADER_LEN..).unwrap_or_default());
        }
    };
    if bs == 0 {
        return hash(data, out);
    }
    let full = data.len() / bs;
    // Start of the run of blocks not hashed yet (none of them zeros).
    let mut run = 0;
    for k in 0..full {
        let block = &data[k * bs..(k + 1) * bs];
        if !is_zero(block) {
            continue;
        }
        hash(&data[run * bs..k * bs], out);
        ZERO_ENTRY.with(|z| {
            let mut z = z.borrow_mut();
            let fresh = z.as_ref().is_some_and(|(o, _)| {
                (o.block_size, o.crypto_hash_size) == (options.block_size, options.crypto_hash_size)
            });
            if !fresh {
                let mut e = Vec::new();
                hash(block, &mut e);
                *z = Some((options, e));
            }
            if let Some((_, e)) = z.as_ref() {
                out.extend_from_slice(e);
            }
        });
        run = k + 1;
    }
    hash(&data[run * bs..], out);
}

thread_local! {
    /// The entry of a block of zeros, and the options it was made with.
    static ZERO_ENTRY: std::cell::RefCell<Option<(SignatureOptions, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether `data` is all zero bytes: pieces of 256 bytes folded in 16-byte
/// words (vectorised), so data that is not zeros says so in its first piece.
pub(crate) fn is_zero(data: &[u8]) -> bool {
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

/// Blocks whose MD4s are computed side by side (fast_rsync's widest SIMD
/// lanes); a call of [`block_entries`] with fewer whole blocks, or with
/// some over a multiple of it, hashes those one at a time, several times
/// slower per byte.
const MD4_LANES: usize = 8;
/// Most bytes held to fill the lanes.
const MD4_BATCH_MAX: usize = 1 << 20;

/// Whole blocks of `block_size` bytes worth gathering before a call of
/// [`block_entries`], so that every block's MD4 runs in a SIMD lane: eight,
/// or fewer for blocks over 128 KiB (at most a MiB is held), at least one.
pub fn md4_batch(block_size: u32) -> usize {
    (MD4_BATCH_MAX / (block_size.max(1) as usize)).clamp(1, MD4_LANES)
}

/// Bytes of strong hash a signature of a `len`-byte basis keeps on the
/// wire: enough that, even if the rolling checksum told nothing, a window
/// of the new file would pass for a block it is not with a chance under
/// 2^-20 per file (one comparison per byte: `len` * 2^-(8 * bytes)), so
/// 7 bytes for most large files and 6 below 16 MiB, at most the 8 kept.
/// rsync cuts further (3 bytes for 512 MiB, a chance of 2^-10 with a
/// uniform checksum) because its retry is another delta; a file that fails
/// its BLAKE3 here is sent again whole.
pub fn wire_strong_len(len: u64) -> u32 {
    let bits = 64 - len.max(1).leading_zeros(); // ceil(log2(len + 1))
    (bits + 20).div_ceil(8).clamp(6, STRONG_HASH_LEN)
}

/// The shortest strong hash [`wire_strong_len`] gives: a signature with
/// shorter ones is none this crate's servers make (with none at all, any
/// rolling checksum hit would count as a match).
pub const MIN_WIRE_STRONG_LEN: u32 = 6;

/// What the header of serialized signature `raw` says, before it is
/// parsed (and indexed, which costs memory by the block): its strong hash
/// length and how many blocks its length makes with it. `None` if the
/// header is cut short or its strong hash is over 16 bytes.
pub fn signature_shape(raw: &[u8]) -> Option<(u32, u64)> {
    let strong = u32::from_be_bytes(raw.get(8..12)?.try_into().ok()?);
    if strong > MD4_LEN {
        return None;
    }
    let entry = (ROLLING_LEN + strong as usize) as u64;
    Some((strong, (raw.len() - HEADER_LEN) as u64 / entry))
}

/// `sig` (a serialized signature) with each block's strong hash cut to
/// `strong` bytes, if it has more: a valid signature of the same blocks.
/// Anything that does not parse as a signature is returned as it is.
pub fn shorten_signature(sig: Vec<u8>, strong: u32) -> Vec<u8> {
    let field = |at: usize| {
        sig.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
    };
    let (Some(block_size), Some(have)) = (field(4), field(8)) else {
        return sig;
    };
    if have <= strong || (sig.len() - HEADER_LEN) % (ROLLING_LEN + have as usize) != 0 {
        return sig;
    }
    let keep = ROLLING_LEN + strong as usize;
    let mut out = Vec::with_capacity(
        HEADER_LEN + (sig.len() - HEADER_LEN) / (ROLLING_LEN + have as usize) * keep,
    );
    out.extend_from_slice(&sig[..4]);
    out.extend_from_slice(&block_size.to_be_bytes());
    out.extend_from_slice(&strong.to_be_bytes());
    for e in sig[HEADER_LEN..].chunks_exact(ROLLING_LEN + have as usize) {
        out.extend_from_slice(&e[..keep]);
    }
    out
}

/// A signature of a basis file, in serialized form (what goes on the wire).
#[derive(Clone, PartialEq, Eq)]
pub struct SignatureBytes(pub Vec<u8>);

impl SignatureBytes {
    /// The serialized signature.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The signature of blocks of `block_size` with these `entries` (as
    /// [`block_entries`] gives them, in order).
    pub fn from_entries(block_size: u32, entries: &[u8]) -> Self {
        let mut s = Vec::with_capacity(HEADER_LEN + entries.len());
        s.extend_from_slice(&header(block_size));
        s.extend_from_slice(entries);
        SignatureBytes(s)
    }

    /// Consume into the serialized signature.
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl AsRef<[u8]> for SignatureBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignatureBytes")
            .field("len", &self.0.len())
            .finish()
    }
}

/// Compute the signature of `basis` (whole content in memory or memory-mapped
/// by the caller) with [`block_size_for`]`(basis.len())`.
pub fn signature(basis: &[u8]) -> SignatureBytes {
    let block_size = block_size_for(basis.len() as u64);
    let mut out = header(block_size).to_vec();
    block_entries(basis, block_size, &mut out);
    SignatureBytes(out)
}

/// Incremental signature computation, for streaming a file without mapping it.
///
/// Feed the basis in order with [`update`](Self::update), in chunks of any
/// size; [`finish`](Self::finish) returns exactly what [`signature`] returns
/// for the concatenation of the chunks. The block size is chosen from the
/// `total_len` given to [`new`](Self::new); if more data than that is fed, the
/// signature may end up with more than [`MAX_SIG_BLOCKS`] blocks and be
/// rejected by [`Signature::parse`]. Up to [`md4_batch`] blocks are buffered
/// between calls (at most a MiB, or one block), so that blocks are hashed
/// eight at a time however the chunks fall.
pub struct SignatureBuilder {
    block_size: u32,
    /// Bytes of the blocks not hashed yet (always shorter than a batch).
    pending: Vec<u8>,
    out: Vec<u8>,
}

impl SignatureBuilder {
    /// Start a signature of a basis expected to be `total_len` bytes long.
    pub fn new(total_len: u64) -> Self {
        let block_size = block_size_for(total_len);
        let blocks = total_len
            .div_ceil(u64::from(block_size))
            .min(MAX_SIG_BLOCKS);
        let entry = ROLLING_LEN as u64 + u64::from(STRONG_HASH_LEN);
        let capacity = usize::try_from(blocks * entry).unwrap_or(0) + HEADER_LEN;
        let mut out = Vec::with_capacity(capacity);
        out.extend_from_slice(&header(block_size));
        SignatureBuilder {
            block_size,
            pending: Vec::new(),
            out,
        }
    }

    /// The block size this signature uses.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Feed the next bytes of the basis.
    pub fn update(&mut self, mut chunk: &[u8]) {
        let batch = self.block_size as usize * md4_batch(self.block_size);
        if !self.pending.is_empty() {
            let take = (batch - self.pending.len()).min(chunk.len());
            let (head, rest) = chunk.split_at(take);
            self.pending.extend_from_slice(head);
            chunk = rest;
            if self.pending.len() < batch {
                return;
            }
            let blocks = std::mem::take(&mut self.pending);
            self.hash_blocks(&blocks);
            self.pending = blocks;
            self.pending.clear();
        }
        let whole = chunk.len() - chunk.len() % batch;
        let (blocks, tail) = chunk.split_at(whole);
        if !blocks.is_empty() {
            self.hash_blocks(blocks);
        }
        if !tail.is_empty() {
            self.pending.reserve_exact(batch);
            self.pending.extend_from_slice(tail);
        }
    }

    /// Finish and return the serialized signature.
    pub fn finish(mut self) -> SignatureBytes {
        if !self.pending.is_empty() {
            let last = std::mem::take(&mut self.pending);
            self.hash_blocks(&last);
        }
        SignatureBytes(self.out)
    }

    /// Append the entries of `data`'s blocks; all but the last are full blocks.
    fn hash_blocks(&mut self, data: &[u8]) {
        block_entries(data, self.block_size, &mut self.out);
    }
}

impl fmt::Debug for SignatureBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignatureBuilder")
            .field("block_size", &self.block_size)
            .field("pending", &self.pending.len())
            .field("out_len", &self.out.len())
            .finish()
    }
}

/// A parsed, validated signature ready for diffing.
///
/// Parsing builds the block index once; it is reused by every
/// [`diff_segment`](crate::diff_segment) call.
pub struct Signature {
    /// The blocks by rolling checksum, for the search.
    index: crate::rolling::Index,
    /// The serialized signature.
    raw: Vec<u8>,
    block_size: u32,
    strong_hash_len: u32,
    blocks: u64,
}

impl Signature {
    /// Parse and validate a serialized signature: magic (MD4 signatures only),
    /// block size in `[MIN_BLOCK, MAX_BLOCK]`, strong hash length at most 16,
    /// at most [`MAX_SIG_BLOCKS`] blocks, and a length that is exactly the
    /// header plus whole block entries. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<Signature, DeltaError> {
        Self::from_vec(bytes.to_vec())
    }

    /// [`Signature::parse`] of a buffer it takes over (a signature read
    /// from the wire is not copied again: it is held once, with its index).
    pub fn from_vec(raw: Vec<u8>) -> Result<Signature, DeltaError> {
        let bytes = &raw[..];
        let bad = DeltaError::InvalidSignature;
        let field = |at: usize| -> Result<u32, DeltaError> {
            bytes
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or(bad("truncated header"))
        };
        if field(0)? != MD4_MAGIC {
            return Err(bad("wrong magic"));
        }
        let block_size = field(4)?;
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(bad("block size out of range"));
        }
        let strong_hash_len = field(8)?;
        if strong_hash_len > MD4_LEN {
            return Err(bad("strong hash too long"));
        }
        let entry = ROLLING_LEN + strong_hash_len as usize;
        let body = bytes.len().saturating_sub(HEADER_LEN);
        if body % entry != 0 {
            return Err(bad("length is not a whole number of blocks"));
        }
        let blocks = (body / entry) as u64;
        if blocks > MAX_SIG_BLOCKS {
            return Err(bad("too many blocks"));
        }
        let index = crate::rolling::Index::new(block_size, strong_hash_len, &raw[HEADER_LEN..]);
        Ok(Signature {
            index,
            raw,
            block_size,
            strong_hash_len,
            blocks,
        })
    }

    /// Block size of the signature.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of strong-hash bytes stored per block.
    pub fn strong_hash_len(&self) -> u32 {
        self.strong_hash_len
    }

    /// Number of blocks in the signature.
    pub fn block_count(&self) -> u64 {
        self.blocks
    }

    /// The blocks by rolling checksum.
    pub(crate) fn index(&self) -> &crate::rolling::Index {
        &self.index
    }

    /// The serialized block entries (rolling checksum and strong hash of
    /// each block, in block order), without the header.
    pub(crate) fn entries(&self) -> &[u8] {
        self.raw.get(HEADER_LEN..).unwrap_or_default()
    }

    /// fast_rsync's options for hashing new data into entries comparable
    /// with [`entries`](Self::entries).
    pub(crate) fn options(&self) -> SignatureOptions {
        SignatureOptions {
            block_size: self.block_size,
            crypto_hash_size: self.strong_hash_len,
        }
    }

    /// Length of one block entry in [`entries`](Self::entries).
    pub(crate) fn entry_len(&self) -> usize {
        ROLLING_LEN + self.strong_hash_len as usize
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signature")
            .field("block_size", &self.block_size)
            .field("strong_hash_len", &self.strong_hash_len)
            .field("blocks", &self.blocks)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zero blocks take a kept entry, other blocks are hashed in runs: the
    /// entries are fast_rsync's all the same, whatever the block size and
    /// strong hash length (the kept entry follows both), the zero blocks'
    /// places and a short last block of zeros or data.
    #[test]
    fn zero_blocks_have_fast_rsyncs_entries() {
        let cases = [(512u32, 8u32), (4096, 8), (4096, 6), (1000, 16), (512, 8)];
        for (n, &(bs, strong)) in cases.iter().enumerate() {
            let b = bs as usize;
            let mut d = data(23 * b + 100, n as u32);
            for k in [0usize, 1, 2, 7, 8, 9, 15, 22] {
                d[k * b..(k + 1) * b].fill(0);
            }
            // A block with one byte set, at its end, is not zeros.
            d[4 * b..5 * b].fill(0);
            d[5 * b - 1] = 1;
            for tail in [0, 100, 99] {
                let mut d = d[..22 * b + tail].to_vec();
                if tail == 99 {
                    d[22 * b..].fill(0);
                }
                let options = SignatureOptions {
                    block_size: bs,
                    crypto_hash_size: strong,
                };
                let want = fast_rsync::Signature::calculate(&d, options);
                let mut got = Vec::new();
                entries_into(&d, options, &mut got);
                assert_eq!(
                    &got[..],
                    &want.serialized()[HEADER_LEN..],
                    "{bs} {strong} {tail}"
                );
            }
        }
    }

    fn data(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    fn raw_sig(magic: u32, block: u32, hash: u32, body: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&magic.to_be_bytes());
        v.extend_from_slice(&block.to_be_bytes());
        v.extend_from_slice(&hash.to_be_bytes());
        v.resize(HEADER_LEN + body, 0xa5);
        v
    }

    #[test]
    fn format_and_parse() {
        for len in [0usize, 1, 511, 512, 513, 4096, 100_000] {
            let base = data(len, 1);
            let sig = signature(&base);
            let bs = block_size_for(len as u64);
            assert_eq!(&sig.0[..HEADER_LEN], &header(bs));
            let blocks = len.div_ceil(bs as usize);
            assert_eq!(sig.0.len(), HEADER_LEN + blocks * 12);
            let parsed = Signature::parse(sig.as_bytes()).expect("own signature parses");
            assert_eq!(parsed.block_size(), bs);
            assert_eq!(parsed.strong_hash_len(), STRONG_HASH_LEN);
            assert_eq!(parsed.block_count(), blocks as u64);
        }
    }

    #[test]
    fn parse_rejects() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("short header", raw_sig(MD4_MAGIC, 512, 8, 0)[..11].to_vec()),
            ("blake2 magic", raw_sig(0x7273_0137, 512, 8, 12)),
            ("delta magic", raw_sig(0x7273_0236, 512, 8, 12)),
            ("block 0", raw_sig(MD4_MAGIC, 0, 8, 12)),
            ("block 511", raw_sig(MD4_MAGIC, MIN_BLOCK - 1, 8, 12)),
            ("block too big", raw_sig(MD4_MAGIC, MAX_BLOCK + 1, 8, 12)),
            ("block u32::MAX", raw_sig(MD4_MAGIC, u32::MAX, 8, 12)),
            ("hash 17", raw_sig(MD4_MAGIC, 512, 17, 21)),
            ("hash u32::MAX", raw_sig(MD4_MAGIC, 512, u32::MAX, 0)),
            ("partial entry", raw_sig(MD4_MAGIC, 512, 8, 13)),
            ("partial entry 2", raw_sig(MD4_MAGIC, 512, 8, 11)),
            (
                "too many blocks",
                raw_sig(MD4_MAGIC, 512, 8, 12 * (MAX_SIG_BLOCKS as usize + 1)),
            ),
        ];
        for (what, bytes) in cases {
            assert!(
                matches!(
                    Signature::parse(&bytes),
                    Err(DeltaError::InvalidSignature(_))
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn parse_accepts_limits() {
        for (block, hash, body) in [
            (MIN_BLOCK, 0, 0),
            (MIN_BLOCK, 0, 4 * 10),
            (MAX_BLOCK, 16, 20 * 3),
            (4096, 8, 12 * MAX_SIG_BLOCKS as usize),
        ] {
            let sig =
                Signature::parse(&raw_sig(MD4_MAGIC, block, hash, body)).expect("valid signature");
            assert_eq!(sig.block_size(), block);
            assert_eq!(sig.strong_hash_len(), hash);
        }
    }

    #[test]
    fn batches_fill_the_md4_lanes_within_a_mib() {
        assert_eq!(md4_batch(MIN_BLOCK), 8);
        assert_eq!(md4_batch(24 << 10), 8);
        assert_eq!(md4_batch(128 << 10), 8);
        assert_eq!(md4_batch(256 << 10), 4);
        assert_eq!(md4_batch(1 << 20), 1);
        assert_eq!(md4_batch(MAX_BLOCK), 1);
    }

    #[test]
    fn builder_matches_whole() {
        let base = data(300_000, 7);
        let want = signature(&base);
        for step in [1usize, 7, 511, 512, 513, 1000, 4096, 65_536, 300_000] {
            let mut b = SignatureBuilder::new(base.len() as u64);
            for chunk in base.chunks(step) {
                b.update(chunk);
                b.update(&[]);
                // Less than a batch is held, and never over a MiB.
                let batch = b.block_size() as usize * md4_batch(b.block_size());
                assert!(b.pending.len() < batch && b.pending.len() < 1 << 20);
            }
            assert_eq!(b.finish(), want, "step {step}");
        }
        let empty = SignatureBuilder::new(0).finish();
        assert_eq!(empty, signature(&[]));
    }

    #[test]
    fn index_survives_moves() {
        let base = data(3000, 5);
        let sig = Signature::parse(&signature(&base).0).expect("parses");
        // Move the signature around: the index points into heap memory that
        // must stay put.
        let mut moved = vec![sig];
        let sig = Box::new(moved.pop().expect("just pushed"));
        let new = [&base[1000..], &base[..1000]].concat();
        let delta = crate::diff_segment(&sig, &new).expect("diff");
        assert!(delta.len() < 1500, "delta {}", delta.len());
        let out = crate::apply_to_vec(&base, &delta, new.len() as u64).expect("apply");
        assert_eq!(out, new);
        drop(sig);
    }

    #[test]
    fn a_shortened_signature_finds_the_same_blocks() {
        assert_eq!(wire_strong_len(1 << 20), 6);
        assert_eq!(wire_strong_len(512 << 20), 7);
        assert_eq!(wire_strong_len(1 << 40), 8);
        let basis: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let mut new = basis.clone();
        new[150_000..150_100].fill(7);
        let full = signature(&basis);
        let short = shorten_signature(full.0.clone(), 6);
        let blocks = (full.0.len() - HEADER_LEN) / 12;
        assert_eq!(short.len(), HEADER_LEN + blocks * 10);
        let sig = Signature::parse(&short).expect("parses");
        assert_eq!(sig.strong_hash_len(), 6);
        assert_eq!(sig.block_count(), blocks as u64);
        let d = crate::diff_segment(&sig, &new).expect("diff");
        let full_d = crate::diff_segment(&Signature::parse(&full.0).unwrap(), &new).unwrap();
        assert_eq!(d, full_d);
        assert_eq!(crate::apply_to_vec(&basis, &d, u64::MAX).unwrap(), new);
        // Never lengthened; garbage passes through.
        assert_eq!(shorten_signature(short.clone(), 8), short);
        assert_eq!(shorten_signature(vec![1, 2, 3], 6), vec![1, 2, 3]);
    }

    #[test]
    fn signature_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Signature>();
        check::<SignatureBytes>();
        check::<SignatureBuilder>();
    }
}

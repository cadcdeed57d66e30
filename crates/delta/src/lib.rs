//! Rolling-checksum signatures, deltas and bounded patching, plus whole-file BLAKE3.
//!
//! This crate is pure computation: it has no I/O policy and never opens a file.
//! Callers hand it byte slices (in memory or memory-mapped) and get byte
//! vectors back, or push patch operations into their own [`PatchSink`].
//!
//! The flow of one file transfer is:
//!
//! 1. The side holding the old version (the *basis*) computes a [`signature`]
//!    (or streams it through a [`SignatureBuilder`]) and sends the
//!    [`SignatureBytes`] to the other side.
//! 2. The side holding the new version [`Signature::parse`]s it and, for each
//!    segment of the new file, computes a delta with [`diff_segment`]. Each
//!    segment's delta is independent: its COPY operations reference absolute
//!    basis offsets and it reproduces exactly that segment's bytes.
//!    [`diff_window_into`] does the same with look-ahead into the next
//!    segment and a segment end that follows the last match, so matches are
//!    found across segment boundaries, and with the basis offset the data is
//!    expected to line up with it takes an aligned fast path for data that
//!    did not move (a file edited in place).
//! 3. The basis side replays each delta with [`apply_ops`] into a
//!    [`PatchSink`] (or [`apply_to_vec`] in memory). Application is bounded: a
//!    delta can never make the output longer than the caller's limit or read
//!    outside the basis, and garbage input is reported as an error, never a
//!    panic.
//! 4. Both sides check the result with a whole-file BLAKE3 ([`FileHasher`],
//!    [`hash_bytes`]); rsync-style deltas are only probabilistically correct.
//!
//! Signatures and deltas use the librsync formats produced by `fast_rsync`
//! (MD4 signature magic `0x72730136`, delta magic `0x72730236`).
//!
//! ```
//! use byteback_delta::{apply_to_vec, diff_segment, signature, Signature};
//!
//! let old = vec![7u8; 10_000];
//! let mut new = old.clone();
//! new[5_000] = 8;
//!
//! let sig = Signature::parse(&signature(&old).0)?;
//! let delta = diff_segment(&sig, &new)?;
//! assert!(delta.len() < 2_000);
//! assert_eq!(apply_to_vec(&old, &delta, new.len() as u64)?, new);
//! # Ok::<(), byteback_delta::DeltaError>(())
//! ```

#![deny(missing_docs)]

mod delta;
mod hash;
mod rolling;
mod signature;

pub use delta::{
    apply_ops, apply_to_vec, copy_end, diff_segment, diff_segment_into, diff_window_into,
    literal_delta, literal_header, ops, Op, Ops, PatchSink, DELTA_END, LITERAL_HEADER_MAX,
};
pub use hash::{hash_bytes, FileHasher};
pub use signature::{
    block_entries, md4_batch, shorten_signature, signature, signature_shape, wire_strong_len,
    Signature, SignatureBuilder, SignatureBytes, ENTRY_LEN, MIN_WIRE_STRONG_LEN,
};

/// Smallest block size a signature may use.
pub const MIN_BLOCK: u32 = 512;
/// Largest block size a signature may use (16 MiB).
pub const MAX_BLOCK: u32 = 16 << 20;
/// A signature never has more blocks than this.
pub const MAX_SIG_BLOCKS: u64 = 1 << 20;
/// Length of the strong (MD4-prefix) hash stored per block (`crypto_hash_size` for fast_rsync).
pub const STRONG_HASH_LEN: u32 = 8;
/// Largest basis for which [`block_size_for`] can honour both [`MAX_BLOCK`] and
/// [`MAX_SIG_BLOCKS`] (16 TiB). A signature of a longer basis is rejected by
/// [`Signature::parse`]; send such files whole.
pub const MAX_BASIS_LEN: u64 = MAX_BLOCK as u64 * MAX_SIG_BLOCKS;

/// Files at least this long get filesystem-block-aligned signature blocks.
const LARGE_BASIS: u64 = 16 << 20;
/// Alignment of block sizes for large files (filesystem block size, for FICLONERANGE).
const LARGE_ALIGN: u64 = 4096;
/// Preferred upper bound of the block size for large files.
const LARGE_PREFERRED_MAX: u64 = 256 << 10;
/// Alignment of block sizes for small files.
const SMALL_ALIGN: u64 = 64;
/// Upper bound of the block size for small files.
const SMALL_MAX: u64 = 4096;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// A serialized signature was rejected; the text says why.
    #[error("invalid signature: {0}")]
    InvalidSignature(&'static str),
    /// A delta is truncated, has trailing bytes, a wrong magic, an unknown
    /// command or a zero-length copy.
    #[error("malformed delta")]
    Malformed,
    /// Applying a delta would produce more output than allowed.
    #[error("delta output exceeds the allowed length")]
    TooLong,
    /// A delta copies from beyond the end of the basis.
    #[error("delta copies from beyond the end of the basis")]
    BasisRange,
    /// The diff engine failed unexpectedly.
    #[error("delta computation failed: {0}")]
    Diff(String),
}

/// Block size for a basis file of `len` bytes: about `sqrt(len)`.
///
/// * `len < 16 MiB`: `sqrt(len)` rounded up to a multiple of 64, clamped to
///   `[MIN_BLOCK, 4096]`.
/// * `len >= 16 MiB`: `sqrt(len)` rounded up to a multiple of 4096 (so copies
///   stay aligned to filesystem blocks for FICLONERANGE), at most 256 KiB, but
///   raised (to a multiple of 4096) so that the signature has at most
///   [`MAX_SIG_BLOCKS`] blocks (counting a short last block).
///
/// The result never exceeds [`MAX_BLOCK`]; for `len > MAX_BASIS_LEN` it is
/// `MAX_BLOCK` and the block count bound cannot be met.
pub fn block_size_for(len: u64) -> u32 {
    let root = ceil_sqrt(len);
    let block = if len < LARGE_BASIS {
        round_up(root, SMALL_ALIGN).clamp(u64::from(MIN_BLOCK), SMALL_MAX)
    } else {
        let preferred = round_up(root, LARGE_ALIGN).min(LARGE_PREFERRED_MAX);
        let needed = round_up(len.div_ceil(MAX_SIG_BLOCKS), LARGE_ALIGN);
        preferred.max(needed).min(u64::from(MAX_BLOCK))
    };
    // Every branch above is bounded by MAX_BLOCK, which fits in u32.
    u32::try_from(block).unwrap_or(MAX_BLOCK)
}

/// Smallest `r` with `r * r >= n`.
fn ceil_sqrt(n: u64) -> u64 {
    let r = n.isqrt();
    if r * r < n {
        r + 1
    } else {
        r
    }
}

/// `n` rounded up to a multiple of `to` (`n` is small enough not to overflow).
fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn blocks(len: u64) -> u64 {
        len.div_ceil(u64::from(block_size_for(len)))
    }

    #[test]
    fn block_size_table() {
        let table: &[(u64, u32)] = &[
            (0, 512),
            (1, 512),
            (1000, 512),
            (512 * 512, 512),
            (512 * 512 + 1, 576),
            (MIB, 1024),
            (16 * MIB - 1, 4096),
            (16 * MIB, 4096),
            (16 * MIB + 1, 8192),
            (GIB, 32768),
            (4 * GIB, 65536),
            (64 * GIB, 256 * 1024),
            (100 * GIB, 256 * 1024),
            (256 * GIB, 256 * 1024),
            (4 * TIB, 4 * 1024 * 1024),
            (16 * TIB, MAX_BLOCK),
        ];
        for &(len, want) in table {
            assert_eq!(block_size_for(len), want, "len {len}");
        }
    }

    #[test]
    fn block_size_bounds() {
        let mut lens = vec![0, 1, 2, 511, 512, 513, MIB, 16 * MIB - 1, 16 * MIB];
        lens.extend([
            GIB,
            4 * GIB,
            100 * GIB,
            4 * TIB,
            MAX_BASIS_LEN - 1,
            MAX_BASIS_LEN,
        ]);
        // A sweep over many magnitudes, including odd values.
        let mut len = 1u64;
        while len <= MAX_BASIS_LEN {
            lens.extend([len - 1, len, len + 1, len / 3 * 2 + 7]);
            len = len * 5 / 4 + 1;
        }
        for len in lens {
            let b = u64::from(block_size_for(len));
            assert!(
                b >= u64::from(MIN_BLOCK) && b <= u64::from(MAX_BLOCK),
                "len {len}"
            );
            assert!(
                blocks(len) <= MAX_SIG_BLOCKS,
                "len {len}: {} blocks",
                blocks(len)
            );
            if len < 16 * MIB {
                assert!(b <= 4096 && b % 64 == 0, "len {len}: block {b}");
            } else {
                assert_eq!(b % 4096, 0, "len {len}: block {b}");
                // About sqrt(len), unless the block count bound forces more.
                if len <= 64 * GIB {
                    assert!(
                        b >= ceil_sqrt(len) && b < ceil_sqrt(len) + 4096,
                        "len {len}"
                    );
                }
                if len <= 256 * GIB {
                    assert!(b <= 256 * KIB, "len {len}");
                }
            }
        }
    }

    #[test]
    fn block_size_monotonic() {
        let mut prev = 0;
        let mut len = 0u64;
        while len <= MAX_BASIS_LEN + TIB {
            let b = block_size_for(len);
            assert!(b >= prev, "len {len}: {b} < {prev}");
            prev = b;
            len = len * 9 / 8 + 17;
        }
    }

    #[test]
    fn block_size_beyond_max_basis() {
        assert_eq!(block_size_for(MAX_BASIS_LEN + 1), MAX_BLOCK);
        assert_eq!(block_size_for(u64::MAX), MAX_BLOCK);
        assert!(blocks(MAX_BASIS_LEN + 1) > MAX_SIG_BLOCKS);
    }

    #[test]
    fn ceil_sqrt_edges() {
        assert_eq!(ceil_sqrt(0), 0);
        assert_eq!(ceil_sqrt(1), 1);
        assert_eq!(ceil_sqrt(2), 2);
        assert_eq!(ceil_sqrt(4), 2);
        assert_eq!(ceil_sqrt(5), 3);
        assert_eq!(ceil_sqrt(u64::MAX), 1 << 32);
    }
}

//! Block signatures kept beside the data, so a changed file's signature is
//! sent at once instead of after reading and signing its whole stored copy.
//!
//! The server signs every file of at least [`KEEP_MIN`] bytes while it
//! writes it (the sink sees every byte of the new file: literal data and
//! ranges copied from the basis alike) and, once the file is verified,
//! keeps the signature at `.byteback/sigs/<BLAKE3 of the content, hex>`
//! inside `current`, so every snapshot carries the signatures of its own
//! files. Content-addressed, a kept signature never changes: two files with
//! the same content share one, and a new version of a file gets a new name.
//! The commit of a changed backup removes the signatures no file of the new
//! manifest has.
//!
//! A kept signature is used only for a stored copy that is known to hold the
//! manifest's content (`current` was clean, and the copy has the manifest's
//! size) and only when it has the exact length and header the content's
//! length implies; anything else is signed from the data as before. A wrong
//! signature can only cost bandwidth: the file is verified against the
//! client's BLAKE3 before it is committed and sent again whole if it fails.
//!
//! Beside each signature, `<hash>.cv` keeps the chaining values of the
//! file's BLAKE3 units (see `digest`), 32 bytes per 64 KiB or more. They
//! spare reading the ranges a changed file shares with its stored copy at
//! the same offsets, and so they are trusted: they are used only when they
//! merge into exactly the content hash they are named by (values of other
//! content would need a BLAKE3 collision), for a stored copy that `current`
//! vouches for and that still has the manifest's size and mtime.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use byteback_delta::{block_size_for, STRONG_HASH_LEN};
use byteback_protocol::{Kind, ManifestEntry};

use super::digest::{self, BasisDigest, Kept, CV_LEN};
use super::in_dir;
use crate::error::{IoContext, Result};
use crate::fsops;
use crate::verify::{hex, unhex};

/// Directory in `.byteback` of kept signatures.
pub(super) const SIGS: &[u8] = b"sigs";
/// Files at least this long get their signature kept (a smaller one is
/// signed in the time it takes to read it; its signature would cost up to
/// 1.2 % of its size on disc).
pub(super) const KEEP_MIN: u64 = 4 << 20;
/// Content hashes of the new manifest remembered for the sweep, by their
/// first 8 bytes (about 10 bytes each in the set: 20 MB at most; two
/// hashes sharing them only keep a stale signature). Beyond that no
/// signature is kept and none is swept, until a commit with fewer files
/// that large: signatures it could not sweep would pile up with every
/// backup.
const MAX_REFERENCED: usize = 1 << 21;
/// librsync's MD4 signature magic, as the delta crate writes it.
const MAGIC: u32 = 0x7273_0136;
/// Magic, block size and strong hash length.
const HEADER_LEN: u64 = 12;
/// Rolling checksum and strong hash of one block.
const ENTRY_LEN: u64 = 4 + STRONG_HASH_LEN as u64;
/// Suffix of a signature being written.
const TMP: &[u8] = b".tmp";
/// Suffix of the chaining values kept beside a signature.
const CVS: &[u8] = b".cv";

/// `.byteback/sigs` of `current`, and the hashes the new manifest names.
pub(super) struct KeptSigs {
    dir: OwnedFd,
    /// Path of `dir`, for messages.
    path: std::path::PathBuf,
    referenced: HashSet<u64>,
    /// More hashes than [`MAX_REFERENCED`]: no sweep this time.
    overflow: bool,
    /// The directory held more than two files (a signature and its
    /// chaining values) per hash [`MAX_REFERENCED`] allows when this backup
    /// began: none is kept (the sweep goes on, and once it brought them
    /// below, signatures are kept again).
    full: bool,
    /// A signature could not be written (warned about once).
    write_failed: bool,
    /// Signatures sent from the store instead of signing the stored copy.
    pub reused: u64,
    /// Transfers whose same-offset copies were neither read nor hashed.
    pub digests_used: u64,
    /// Bytes those transfers read back from their new files.
    pub reread: u64,
    /// Bytes of signatures and chaining values written (growth: a file of
    /// holes costs little on disc, its signature 0.6 % of its length).
    pub written: u64,
}

/// What the sweep knows a content hash by.
fn key(hash: &[u8; 32]) -> u64 {
    u64::from_le_bytes([
        hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7],
    ])
}

/// Serialized length of the signature of `len` bytes.
fn expected_len(len: u64) -> u64 {
    HEADER_LEN + len.div_ceil(u64::from(block_size_for(len))) * ENTRY_LEN
}

fn expected_header(len: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0; HEADER_LEN as usize];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&block_size_for(len).to_be_bytes());
    h[8..12].copy_from_slice(&STRONG_HASH_LEN.to_be_bytes());
    h
}

/// File name of the signature of content `hash`.
pub(super) fn sig_name(hash: &[u8; 32]) -> Vec<u8> {
    hex(hash).into_bytes()
}

/// Whether a file of this size gets its signature kept.
pub(super) fn keeps(size: u64) -> bool {
    size >= KEEP_MIN
}

impl KeptSigs {
    /// Opens (creating it if needed) `.byteback/sigs` in `meta`, the
    /// directory at `meta_path`.
    pub fn open(meta: &OwnedFd, meta_path: &std::path::Path) -> Result<Self> {
        let path = std::path::PathBuf::from(in_dir(meta_path, SIGS));
        fsops::ensure_dir(meta, SIGS, 0o700).op("create", || path.display())?;
        let dir = fsops::open_dir(meta, SIGS).op("open", || path.display())?;
        // Past the bound, no new signature: a backup whose set of hashes
        // overflows sweeps nothing, so those it kept before it overflowed
        // stay; the next backup then keeps none until a sweep brought the
        // directory below.
        let mut held = 0usize;
        fsops::for_each_child(&dir, |_, _| {
            held += 1;
            Ok(())
        })
        .op("list", || path.display())?;
        Ok(KeptSigs {
            dir,
            path,
            referenced: HashSet::new(),
            full: held > 2 * MAX_REFERENCED,
            overflow: false,
            write_failed: false,
            reused: 0,
            digests_used: 0,
            reread: 0,
            written: 0,
        })
    }

    /// Records an entry of the new manifest (its signature stays).
    pub fn note(&mut self, me: &ManifestEntry) {
        if self.overflow {
            return;
        }
        if let Kind::File { size } = me.entry.kind {
            if keeps(size) {
                if self.referenced.len() >= MAX_REFERENCED {
                    self.overflow = true;
                    self.referenced = HashSet::new();
                } else {
                    self.referenced.insert(key(&me.hash));
                }
            }
        }
    }

    /// The kept signature of content `hash`, `len` bytes long, if there is
    /// one of exactly the length and header that length implies.
    pub fn load(&mut self, hash: &[u8; 32], len: u64) -> Option<Vec<u8>> {
        if !keeps(len) {
            return None;
        }
        let f = fsops::open_file(&self.dir, &sig_name(hash)).ok()?;
        let want = expected_len(len);
        if f.metadata().ok()?.len() != want {
            return None;
        }
        let mut sig = vec![0u8; usize::try_from(want).ok()?];
        f.read_exact_at(&mut sig, 0).ok()?;
        if sig.get(..HEADER_LEN as usize)? != expected_header(len) {
            return None;
        }
        self.reused += 1;
        Some(sig)
    }

    /// The kept digests of content `hash`, `len` bytes long, whose
    /// signature `sig` was loaded: only if its units' chaining values are
    /// kept too and merge into exactly `hash`.
    pub fn load_digest(&mut self, hash: &[u8; 32], len: u64, sig: &[u8]) -> Option<BasisDigest> {
        let f = fsops::open_file(&self.dir, &[&sig_name(hash)[..], CVS].concat()).ok()?;
        let want = digest::units_of(len).checked_mul(CV_LEN as u64)?;
        if f.metadata().ok()?.len() != want {
            return None;
        }
        let mut raw = vec![0u8; usize::try_from(want).ok()?];
        f.read_exact_at(&mut raw, 0).ok()?;
        let cvs: Vec<[u8; CV_LEN]> = raw
            .chunks_exact(CV_LEN)
            .map(|c| c.try_into().unwrap_or([0; CV_LEN]))
            .collect();
        if digest::root_of(&cvs, len) != Some(*hash) {
            return None;
        }
        Some(BasisDigest {
            len,
            cvs,
            entries: sig.get(HEADER_LEN as usize..)?.to_vec(),
        })
    }

    /// Keeps the signature and units' chaining values of content `hash`
    /// (`len` bytes), unless kept already. A failure is returned once as a
    /// warning to give (the next backup signs the stored copy instead).
    pub fn keep(&mut self, hash: &[u8; 32], len: u64, kept: Kept) -> Option<String> {
        let Kept { sig, cvs } = kept;
        if self.overflow || self.full {
            return None; // it could not be swept
        }
        if sig.as_bytes().len() as u64 != expected_len(len) {
            return None; // not the signature of `len` bytes: nothing to keep
        }
        let name = sig_name(hash);
        let mut written = self.write(&name, sig.as_bytes());
        if written.is_ok() {
            if digest::root_of(&cvs, len) == Some(*hash) {
                written = self.write(&[&name[..], CVS].concat(), cvs.as_flattened());
            } else {
                // Never expected: the values were merged into this hash
                // when the file was verified.
                tracing::warn!(
                    "chaining values of content {} do not merge into its hash: not kept",
                    hex(hash)
                );
            }
        }
        match written {
            Ok(()) => None,
            Err(e) if !self.write_failed => {
                self.write_failed = true;
                Some(format!(
                    "cannot keep a block signature in {} ({e}); the next backup of a changed \
                     file reads its stored copy to sign it instead",
                    self.path.display()
                ))
            }
            Err(_) => None,
        }
    }

    fn write(&mut self, name: &[u8], sig: &[u8]) -> io::Result<()> {
        if let Some(st) = fsops::lstat_at(&self.dir, name)? {
            if st.st_size as u64 == sig.len() as u64 {
                return Ok(()); // the same content's, kept before
            }
        }
        let tmp = [name, TMP].concat();
        fsops::remove_any(&self.dir, &tmp)?;
        let f: File = fsops::create_new(&self.dir, &tmp)?;
        let written = f.write_all_at(sig, 0);
        drop(f);
        if let Err(e) = written {
            let _ = fsops::remove_any(&self.dir, &tmp);
            return Err(e);
        }
        // Made durable by the commit's sync, like the file itself.
        fsops::replace(&self.dir, &tmp, &self.dir, name)?;
        self.written = self.written.saturating_add(sig.len() as u64);
        Ok(())
    }

    /// Removes the signatures no entry of the new manifest has (and what
    /// interrupted writes left). Returns how many went.
    pub fn sweep(&mut self) -> Result<u64> {
        if self.overflow {
            tracing::info!(
                "more than {MAX_REFERENCED} files of 4 MiB or more: no block signature was kept, and none is swept"
            );
            return Ok(0);
        }
        // Removed as they are listed: the names are not held (millions of
        // them, stale ones included, after a day of changes).
        let mut removed = 0;
        let mut failed = None;
        fsops::for_each_child(&self.dir, |n, _| {
            if !self.names_referenced(n) {
                match fsops::remove_any(&self.dir, n) {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        failed.get_or_insert((n.to_vec(), e));
                    }
                }
            }
            Ok(())
        })
        .op("list", || self.path.display())?;
        if let Some((n, e)) = failed {
            let shown = self.path.join(String::from_utf8_lossy(&n).as_ref());
            return Err(e).op("remove", || shown.display().to_string());
        }
        Ok(removed)
    }

    /// Whether `name` is the signature (or chaining values) of a hash the
    /// new manifest names.
    fn names_referenced(&self, name: &[u8]) -> bool {
        let name = name.strip_suffix(CVS).unwrap_or(name);
        parse_name(name).is_some_and(|h| self.referenced.contains(&key(&h)))
    }
}

/// The content hash a signature's file name spells, if it is one.
/// Only the name [`sig_name`] gives it (lowercase) counts.
fn parse_name(name: &[u8]) -> Option<[u8; 32]> {
    let h: [u8; 32] = unhex(std::str::from_utf8(name).ok()?)?.try_into().ok()?;
    (sig_name(&h) == name).then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_lowercase_hex_of_64_parses() {
        let h: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
        let n = sig_name(&h);
        assert_eq!(n.len(), 64);
        assert_eq!(parse_name(&n), Some(h));
        assert_eq!(parse_name(&[&n[..], TMP].concat()), None);
        assert_eq!(parse_name(&n.to_ascii_uppercase()), None);
        assert_eq!(parse_name(&n[..63]), None);
        assert_eq!(parse_name(b""), None);
    }

    #[test]
    fn expected_length_and_header_are_those_of_a_real_signature() {
        for len in [
            KEEP_MIN,
            KEEP_MIN + 1,
            16 << 20,
            (16 << 20) + 4097,
            40 << 20,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sig = byteback_delta::signature(&data);
            assert_eq!(sig.as_bytes().len() as u64, expected_len(len), "len {len}");
            assert_eq!(sig.as_bytes()[..12], expected_header(len), "len {len}");
        }
    }
}

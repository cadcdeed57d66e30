//! The rolling search: finds the basis's blocks anywhere in new data.
//!
//! rsync's algorithm as fast_rsync's `diff` implements it, with the same
//! matches (a window whose rolling checksum and strong hash equal a basis
//! block's; a checksum that collided 1,024 times is not looked at again),
//! on an index built for the search. Of equal blocks, fast_rsync takes the
//! first; this search takes the one the data is expected to line up with
//! (right after the block copied last, or at the data's own offset) if it
//! is one of them, else the first (without a hint of where the data lines
//! up, as fast_rsync): a run of equal blocks (zeros above all:
//! a sparse or preallocated file) is so copied from where it was, which
//! the server clones without reading it (see the server's `sink`), where
//! copies of the first zero block were read and written again. The
//! window's rolling checksum is first looked up at every byte in a bitset
//! of the signature's checksums (64 bits per block, at most 2 MiB, so
//! mostly in cache); only a hit goes on to a table of the checksums and,
//! for an equal one, to the window's strong hash. fast_rsync looks up two
//! hash maps at every byte (about 25 ns a byte on appended data, where
//! nothing matches); this costs a few.

use std::collections::HashMap;

use fast_rsync::SignatureOptions;

/// A checksum whose strong hash differed this often is not looked up again
/// (fast_rsync's limit, against signatures crafted to make every byte a
/// candidate).
const MAX_CRC_COLLISIONS: u32 = 1024;
/// Bytes one search may hash in vain (windows whose checksum is a block's
/// but whose strong hash is not), per byte searched. Honest signatures
/// collide by chance, about `data * file size / 2^32` bytes (the data's
/// length at 4 GiB files, sixteen times it at 64 GiB); a signature whose
/// checksums were picked to collide with the data (a hostile server's:
/// one checksum of a zero window and a block of 10 MiB made every zero
/// region cost 1024 blocks of MD4 per segment) costs at most this many
/// times the data. Past it, the rest of the data is sent as it is.
const WASTE_PER_BYTE: u64 = 16;
/// librsync's rolling checksum offset.
const CRC_MAGIC: u16 = 31;
const MIN_FILTER_BITS: u32 = 12;
const MAX_FILTER_BITS: u32 = 24;

/// librsync's rolling checksum of `buf` (what a signature entry starts with).
pub(crate) fn crc_of(buf: &[u8]) -> u32 {
    let (mut s1, mut s2) = (0u16, 0u16);
    for &b in buf {
        s1 = s1.wrapping_add(u16::from(b));
        s2 = s2.wrapping_add(s1);
    }
    let len = buf.len() as u64;
    s1 = s1.wrapping_add((len as u16).wrapping_mul(CRC_MAGIC));
    s2 = s2.wrapping_add(((len.wrapping_mul(len + 1) / 2) as u16).wrapping_mul(CRC_MAGIC));
    u32::from(s1) | (u32::from(s2) << 16)
}

/// The checksum of the window moved on by one byte: `old` left, `new` came.
#[inline]
fn rotate(crc: u32, size: u16, old: u8, new: u8) -> u32 {
    let (old, new) = (u16::from(old), u16::from(new));
    let s1 = (crc as u16).wrapping_add(new).wrapping_sub(old);
    let s2 = ((crc >> 16) as u16)
        .wrapping_add(s1)
        .wrapping_sub(size.wrapping_mul(old.wrapping_add(CRC_MAGIC)));
    u32::from(s1) | (u32::from(s2) << 16)
}

/// The top `bits` bits of `crc` times `mul` (an odd number).
#[inline]
fn spread(crc: u32, mul: u64, bits: u32) -> usize {
    ((u64::from(crc).wrapping_mul(mul)) >> (64 - bits)) as usize
}

/// A multiplier for [`spread`] that the other peer cannot know: with a
/// fixed one, a hostile server could pick thousands of checksums that all
/// fall into one run of the table (28 s to index one file's signature,
/// and each byte of the data probing the whole run), where random ones
/// fall apart by chance.
fn random_multiplier() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x6279_7465_6261_636bu64) | 1
}

/// One checksum of the signature: its blocks are `order[start..start + len]`.
#[derive(Clone, Copy, Default)]
struct Slot {
    crc: u32,
    start: u32,
    /// 0: an empty slot.
    len: u32,
}

/// The signature's blocks, indexed by rolling checksum.
pub(crate) struct Index {
    block_size: usize,
    strong_len: usize,
    filter: Vec<u64>,
    filter_bits: u32,
    /// The multiplier of [`spread`], random per index.
    mul: u64,
    /// One slot per distinct checksum; open addressing, linear probing.
    table: Vec<Slot>,
    table_bits: u32,
    /// Block numbers ordered by checksum, strong hash, number.
    order: Vec<u32>,
}

impl Index {
    /// The index of the signature entries `entries` (checksum and
    /// `strong_len` bytes of strong hash per block).
    pub fn new(block_size: u32, strong_len: u32, entries: &[u8]) -> Self {
        let entry = 4 + strong_len as usize;
        let n = entries.len() / entry;
        let e = |i: u32| &entries[i as usize * entry..(i as usize + 1) * entry];
        let crc = |i: u32| u32::from_be_bytes([e(i)[0], e(i)[1], e(i)[2], e(i)[3]]);
        let mut order: Vec<u32> = (0..n as u32).collect();
        // Checksum first, then the strong hash, then the block number.
        order.sort_unstable_by(|&a, &b| (crc(a), &e(a)[4..], a).cmp(&(crc(b), &e(b)[4..], b)));
        let log = |x: usize| usize::BITS - x.max(1).next_power_of_two().leading_zeros() - 1;
        let filter_bits = (log(n) + 6).clamp(MIN_FILTER_BITS, MAX_FILTER_BITS);
        let table_bits = log(n) + 1;
        let mul = random_multiplier();
        let mut ix = Index {
            block_size: block_size as usize,
            strong_len: strong_len as usize,
            filter: vec![0; 1 << (filter_bits - 6)],
            filter_bits,
            mul,
            table: vec![Slot::default(); 1 << table_bits],
            table_bits,
            order: vec![],
        };
        let mask = ix.table.len() - 1;
        let mut start = 0;
        while start < n {
            let c = crc(order[start]);
            let mut end = start + 1;
            while end < n && crc(order[end]) == c {
                end += 1;
            }
            let f = spread(c, mul, filter_bits);
            ix.filter[f / 64] |= 1 << (f % 64);
            let mut s = spread(c, mul, table_bits);
            while ix.table[s].len != 0 {
                s = (s + 1) & mask;
            }
            ix.table[s] = Slot {
                crc: c,
                start: start as u32,
                len: (end - start) as u32,
            };
            start = end;
        }
        ix.order = order;
        ix
    }

    /// The longest run of occupied slots in the table: what a lookup
    /// may probe.
    #[cfg(test)]
    fn longest_run(&self) -> usize {
        let (mut run, mut longest) = (0, 0);
        // Twice round, for a run that wraps.
        for slot in self.table.iter().chain(&self.table) {
            run = if slot.len == 0 { 0 } else { run + 1 };
            longest = longest.max(run);
        }
        longest.min(self.table.len())
    }

    #[inline]
    fn maybe(&self, crc: u32) -> bool {
        let f = spread(crc, self.mul, self.filter_bits);
        self.filter[f / 64] & (1 << (f % 64)) != 0
    }

    /// The block `window` is, if any: of the blocks with checksum `crc`
    /// whose strong hash is the window's, `prefer` if it is one of them,
    /// else the first. With `None`, `collided` says whether there were
    /// blocks with that checksum.
    fn find(
        &self,
        crc: u32,
        window: &[u8],
        entries: &[u8],
        prefer: Option<u64>,
        collided: &mut bool,
    ) -> Option<u32> {
        let mask = self.table.len() - 1;
        let mut s = spread(crc, self.mul, self.table_bits);
        let slot = loop {
            let slot = self.table[s];
            if slot.len == 0 {
                return None;
            }
            if slot.crc == crc {
                break slot;
            }
            s = (s + 1) & mask;
        };
        let entry = 4 + self.strong_len;
        let strong = |i: u32| {
            entries
                .get(i as usize * entry + 4..(i as usize + 1) * entry)
                .unwrap_or_default()
        };
        let ours = self.strong_of(window);
        let blocks = &self.order[slot.start as usize..(slot.start + slot.len) as usize];
        let at = blocks.partition_point(|&b| strong(b) < &ours[..]);
        match blocks.get(at) {
            Some(&b) if strong(b) == &ours[..] => {
                // Equal blocks are ordered by number: look for `prefer`.
                let p = prefer
                    .and_then(|p| u32::try_from(p).ok())
                    .filter(|&p| p > b);
                let preferred = p.filter(|&p| {
                    let rest = &blocks[at..];
                    let i = rest.partition_point(|&x| (strong(x), x) < (&ours[..], p));
                    rest.get(i) == Some(&p) && strong(p) == &ours[..]
                });
                Some(preferred.unwrap_or(b))
            }
            _ => {
                *collided = true;
                None
            }
        }
    }

    /// The strong hash (MD4 prefix) of one window, as a signature has it.
    fn strong_of(&self, window: &[u8]) -> Vec<u8> {
        #[cfg(test)]
        tests::HASHED.with(|h| h.set(h.get() + window.len() as u64));
        let options = SignatureOptions {
            block_size: self.block_size as u32,
            crypto_hash_size: self.strong_len as u32,
        };
        // A window of zeros takes the kept entry of a zero block.
        let mut entry = Vec::with_capacity(4 + self.strong_len);
        crate::signature::entries_into(window, options, &mut entry);
        entry.split_off(4.min(entry.len()))
    }
}

/// Where a short last block of the basis is looked for in data: right
/// after a copy of the block before it (the file goes on in line, e.g. it
/// grew), or at the data's end (the file's end is unchanged).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tail {
    Start,
    End,
}

impl Index {
    /// The length of the basis's last block if `data` starts (`Tail::Start`)
    /// or ends (`Tail::End`) with it and it is shorter than a block: a
    /// signature does not record that length, so each length below a block
    /// is tried by its rolling checksum (built up a byte at a time), and a
    /// checksum that matches by its strong hash. The bytes hashed in vain
    /// are added to `wasted`, and no length is hashed past `waste_max`
    /// (see [`WASTE_PER_BYTE`]: a hostile last checksum, that of a zero
    /// byte, matched thousands of lengths of a zero region).
    fn short_last(
        &self,
        entries: &[u8],
        data: &[u8],
        at: Tail,
        (wasted, waste_max): (&mut u64, u64),
    ) -> Option<usize> {
        let entry = 4 + self.strong_len;
        let n = entries.len() / entry;
        let last = entries.get(n.checked_sub(1)? * entry..n * entry)?;
        let want = u32::from_be_bytes([last[0], last[1], last[2], last[3]]);
        let (mut s1, mut s2) = (0u16, 0u16);
        for r in 1..self.block_size.min(data.len() + 1) {
            // Prepending a byte to a suffix gives it weight r; appending one
            // to a prefix adds the new sum of bytes to the weighted sum.
            match at {
                Tail::Start => {
                    s1 = s1.wrapping_add(u16::from(data[r - 1]));
                    s2 = s2.wrapping_add(s1);
                }
                Tail::End => {
                    let b = u16::from(data[data.len() - r]);
                    s1 = s1.wrapping_add(b);
                    s2 = s2.wrapping_add((r as u16).wrapping_mul(b));
                }
            }
            let len = r as u64;
            let c1 = s1.wrapping_add((len as u16).wrapping_mul(CRC_MAGIC));
            let c2 =
                s2.wrapping_add(((len.wrapping_mul(len + 1) / 2) as u16).wrapping_mul(CRC_MAGIC));
            if u32::from(c1) | (u32::from(c2) << 16) != want {
                continue;
            }
            let piece = match at {
                Tail::Start => &data[..r],
                Tail::End => &data[data.len() - r..],
            };
            if *wasted >= waste_max {
                return None;
            }
            if self.strong_of(piece) == last[4..] {
                return Some(r);
            }
            *wasted += r as u64;
        }
        None
    }
}

/// What the search finds, in order: literal bytes and copies of blocks.
pub(crate) trait Found {
    fn literal(&mut self, data: &[u8]);
    fn copy(&mut self, offset: u64, len: u64);
}

/// Searches `data` for the basis's blocks (`entries` are the signature's,
/// indexed by `ix`) and reports literals and copies to `out`. `origin`: the
/// basis offset `data` is expected to line up with, if any (where the copy
/// it follows ended, or its own offset in a file edited in place). Of equal
/// blocks, the one in line is taken (see the module's text), but only with
/// an `origin`: without one (files under 16 MiB, see the client's
/// `FAST_PATH_MIN_BLOCK`) the first, as before, since small files copied
/// in line and so cloned ran the 400-day pruning simulation's btrfs short
/// of metadata (a log of repeated lines is mostly equal blocks). A short last
/// block of the basis (see [`Index::short_last`]) is found right after a
/// copy of the block before it, and at the end of `data`. Gives the bytes it
/// hashed in vain (see [`WASTE_PER_BYTE`]).
pub(crate) fn search(
    ix: &Index,
    entries: &[u8],
    data: &[u8],
    origin: Option<u64>,
    out: &mut impl Found,
) -> u64 {
    let bs = ix.block_size;
    let size = bs as u16; // the checksum is mod 2^16 anyway
    let blocks = (entries.len() / (4 + ix.strong_len)) as u64;
    let last = blocks.checked_sub(1);
    let before_last = last.and_then(|l| l.checked_sub(1));
    let bs64 = bs as u64;
    // The block whose copy `data` follows.
    let after = origin
        .filter(|&o| bs64 > 0 && o >= bs64 && o % bs64 == 0)
        .map(|o| o / bs64 - 1);
    // A position in `data` and the basis offset it lines up with.
    let mut line = origin.map(|o| (0usize, o));
    // The block the window at `here` is expected to be, if any.
    let expected = |line: Option<(usize, u64)>, here: usize| {
        let (pos, off) = line?;
        let at = off.checked_add((here - pos) as u64)?;
        (bs64 > 0 && at % bs64 == 0).then(|| at / bs64)
    };
    let mut collisions: HashMap<u32, u32> = HashMap::new();
    let waste_max = (data.len() as u64).saturating_mul(WASTE_PER_BYTE);
    let mut wasted = 0u64;
    let (mut here, mut lit) = (0usize, 0usize);
    // Where data goes on in line with the basis's short last block.
    let mut in_line = after.is_some() && after == before_last;
    loop {
        if in_line {
            in_line = false;
            let found = ix.short_last(
                entries,
                &data[here..],
                Tail::Start,
                (&mut wasted, waste_max),
            );
            if let (Some(l), Some(r)) = (last, found) {
                out.literal(&data[lit..here]);
                out.copy(l * bs64, r as u64);
                here += r;
                lit = here;
                if line.is_some() {
                    line = Some((here, l * bs64 + r as u64));
                }
            }
        }
        if bs == 0 || data.len() - here < bs {
            break;
        }
        let mut crc = crc_of(&data[here..here + bs]);
        loop {
            if ix.maybe(crc)
                && wasted < waste_max
                && collisions.get(&crc).is_none_or(|&n| n < MAX_CRC_COLLISIONS)
            {
                let mut collided = false;
                let prefer = expected(line, here);
                let window = &data[here..here + bs];
                if let Some(idx) = ix.find(crc, window, entries, prefer, &mut collided) {
                    out.literal(&data[lit..here]);
                    out.copy(u64::from(idx) * bs64, bs64);
                    here += bs;
                    lit = here;
                    if line.is_some() {
                        line = Some((here, (u64::from(idx) + 1) * bs64));
                    }
                    in_line = Some(u64::from(idx)) == before_last;
                    break;
                }
                if collided {
                    *collisions.entry(crc).or_insert(0) += 1;
                    wasted += bs as u64;
                }
            }
            if here + bs >= data.len() {
                here = data.len(); // no full window left
                break;
            }
            crc = rotate(crc, size, data[here], data[here + bs]);
            here += 1;
        }
    }
    let rest = &data[lit..];
    let found = ix.short_last(entries, rest, Tail::End, (&mut wasted, waste_max));
    match (last, found) {
        (Some(l), Some(r)) => {
            out.literal(&rest[..rest.len() - r]);
            out.copy(l * bs as u64, r as u64);
        }
        _ => out.literal(rest),
    }
    wasted
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Bytes [`Index::strong_of`] hashed on this thread.
        pub(super) static HASHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// Checksums picked so that the fixed multiplier this index once used
    /// puts all of them in one run of the table (a hostile server's
    /// signature: its index took 28 s to build, and every byte of the
    /// data probed the run) fall apart under the index's random one.
    #[test]
    fn checksums_picked_to_cluster_do_not() {
        let n = 1usize << 16;
        let tb = 17; // the table's bits for n distinct checksums
        let fixed = 0x9E37_79B9_7F4A_7C15u64;
        let mut entries = vec![];
        let mut c = 0u32;
        while entries.len() < n * 4 {
            if spread(c, fixed, tb) < 64 {
                entries.extend_from_slice(&c.to_be_bytes());
            }
            c += 1;
        }
        let ix = Index::new(512, 0, &entries);
        assert_eq!(ix.table.iter().filter(|s| s.len > 0).count(), n);
        let run = ix.longest_run();
        assert!(run < 200, "a run of {run} slots");
        let zeros = vec![0u8; 1 << 20];
        let mut t = Tally::default();
        search(&ix, &entries, &zeros, None, &mut t);
        assert_eq!(t.0, zeros.len() as u64);
    }

    /// A hostile last entry whose checksum is that of one zero byte (so
    /// thousands of lengths of a zero region have it) after a zero block:
    /// the short last block's search hashes at most the search's budget
    /// in vain (it hashed 28 times the honest search's bytes), and the
    /// rest of the data goes as it is.
    #[test]
    fn a_hostile_short_last_block_costs_the_budget_at_most() {
        // Lengths r = 1 + 131,072 k have the checksum: about bs / 131,072
        // candidates of bs / 2 bytes each after every block, so past 4 MiB
        // blocks more than the budget's 16 bytes a byte.
        let bs = 8usize << 20;
        let zeros = vec![0u8; 64 << 20];
        let options = SignatureOptions {
            block_size: bs as u32,
            crypto_hash_size: 8,
        };
        let mut entries = vec![];
        crate::signature::entries_into(&zeros[..bs], options, &mut entries);
        entries.extend_from_slice(&crc_of(&[0]).to_be_bytes());
        entries.extend_from_slice(&[0xee; 8]);
        let ix = Index::new(bs as u32, 8, &entries);
        HASHED.with(|h| h.set(0));
        let mut t = Tally::default();
        search(&ix, &entries, &zeros, None, &mut t);
        let vain = HASHED.with(|h| h.get()) - t.1;
        let max = zeros.len() as u64 * WASTE_PER_BYTE + bs as u64;
        assert!(vain <= max, "{vain} bytes hashed in vain, at most {max}");
        // Past the budget the rest goes as it is.
        assert_eq!(t.0 + t.1, zeros.len() as u64);
    }

    #[test]
    fn checksums_are_the_signatures_and_roll() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        for bs in [512u32, 700, 4096, 65_536] {
            let sig = fast_rsync::Signature::calculate(
                &data[..bs as usize],
                SignatureOptions {
                    block_size: bs,
                    crypto_hash_size: 8,
                },
            );
            let e =
                &sig.serialized()[crate::signature::HEADER_LEN..crate::signature::HEADER_LEN + 4];
            assert_eq!(
                crc_of(&data[..bs as usize]),
                u32::from_be_bytes(e.try_into().unwrap())
            );
            let mut crc = crc_of(&data[..bs as usize]);
            for i in 0..1000 {
                crc = rotate(crc, bs as u16, data[i], data[i + bs as usize]);
                assert_eq!(
                    crc,
                    crc_of(&data[i + 1..i + 1 + bs as usize]),
                    "bs {bs} at {i}"
                );
            }
        }
    }

    /// Ops of a delta as (copy?, bytes), adjacent copies and adjacent
    /// literals joined, a copy by the bytes it copies from `basis`: two
    /// encoders' deltas compare by what they say, whichever of equal
    /// blocks they copy.
    fn normal(delta: &[u8], basis: &[u8]) -> Vec<(bool, Vec<u8>)> {
        let mut v: Vec<(bool, Vec<u8>)> = vec![];
        for op in crate::ops(delta) {
            let (copy, d) = match op.expect("valid delta") {
                crate::Op::Copy { offset, len } => {
                    (true, &basis[offset as usize..(offset + len) as usize])
                }
                crate::Op::Literal(d) => (false, d),
            };
            match v.last_mut() {
                Some((c, bytes)) if *c == copy => bytes.extend_from_slice(d),
                _ => v.push((copy, d.to_vec())),
            }
        }
        v
    }

    /// Copies of a delta as (offset, length), adjacent ones merged.
    fn copies(delta: &[u8]) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = vec![];
        for op in crate::ops(delta) {
            if let crate::Op::Copy { offset, len } = op.expect("valid delta") {
                match v.last_mut() {
                    Some((o, l)) if *o + *l == offset => *l += len,
                    _ => v.push((offset, len)),
                }
            }
        }
        v
    }

    /// Equal blocks (zeros: a sparse file) are copied from where the data
    /// lines up, after a change too, not from the first of them: the
    /// server clones copies to the same offset without reading them.
    #[test]
    fn of_equal_blocks_the_one_in_line_is_copied() {
        let bs = 4096usize;
        let mut basis = vec![0u8; 64 * bs];
        basis[10 * bs..10 * bs + 100].copy_from_slice(&noise(100, 3));
        let mut new = basis.clone();
        new[30 * bs + 7..30 * bs + 307].copy_from_slice(&noise(300, 4));
        let options = SignatureOptions {
            block_size: bs as u32,
            crypto_hash_size: 8,
        };
        let sig = fast_rsync::Signature::calculate(&basis, options);
        let sig = crate::Signature::parse(sig.serialized()).unwrap();
        // The aligned fast path, the changed block diffed alone.
        let mut d = vec![];
        crate::delta::diff_window_into(&sig, &new, Some(0), usize::MAX, &mut d).unwrap();
        assert_eq!(crate::apply_to_vec(&basis, &d, u64::MAX).unwrap(), new);
        let b = bs as u64;
        assert_eq!(copies(&d), vec![(0, 30 * b), (31 * b, 33 * b)]);
        // The rolling search alone, with where the data lines up: each zero
        // block from its own place (the first one each time before).
        for origin in [11 * b, 40 * b] {
            let zeros = vec![0u8; 20 * bs];
            let mut out = vec![];
            let mut w = crate::delta::OpWriter::new(&mut out);
            search(sig.index(), sig.entries(), &zeros, Some(origin), &mut w);
            w.finish();
            assert_eq!(copies(&out), vec![(origin, 20 * b)]);
        }
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Bytes of literals and copies a search reports.
    #[derive(Default)]
    struct Tally(u64, u64);

    impl Found for Tally {
        fn literal(&mut self, data: &[u8]) {
            self.0 += data.len() as u64;
        }
        fn copy(&mut self, _: u64, len: u64) {
            self.1 += len;
        }
    }

    /// A signature whose checksums collide with the data everywhere (a
    /// hostile server's: the checksum of a zero window, or of windows of
    /// the data it stores, with strong hashes that never match) costs a
    /// bounded multiple of the data in vain hashing, not a block per byte.
    #[test]
    fn colliding_signatures_cost_a_bounded_multiple_of_the_data() {
        let bs = 1 << 20;
        let strong_len = 8;
        let zeros = vec![0u8; 4 << 20];
        let mut entries = crc_of(&zeros[..bs]).to_be_bytes().to_vec();
        entries.extend_from_slice(&[0xee; 8]);
        let ix = Index::new(bs as u32, strong_len, &entries);
        let mut t = Tally::default();
        let wasted = search(&ix, &entries, &zeros, None, &mut t);
        assert_eq!((t.0, t.1), (zeros.len() as u64, 0));
        let max = zeros.len() as u64 * 16 + bs as u64;
        assert!(wasted > 0 && wasted <= max, "{wasted} bytes hashed in vain");

        // Many checksums, each of a window of the data.
        let bs = 4096;
        let data = noise(1 << 20, 5);
        let mut entries = vec![];
        for at in (0..data.len() - bs).step_by(97).take(5000) {
            entries.extend_from_slice(&crc_of(&data[at..at + bs]).to_be_bytes());
            entries.extend_from_slice(&[0xee; 8]);
        }
        let ix = Index::new(bs as u32, strong_len, &entries);
        let mut t = Tally::default();
        let wasted = search(&ix, &entries, &data, None, &mut t);
        assert_eq!((t.0, t.1), (data.len() as u64, 0));
        let max = data.len() as u64 * 16 + bs as u64;
        assert!(wasted <= max, "{wasted} bytes hashed in vain");
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The same matches as fast_rsync's diff, on bases with repeated
        /// blocks and new data made of moved, repeated and new pieces.
        #[test]
        fn finds_what_fast_rsync_finds(
            seed in any::<u64>(),
            bs in prop_oneof![Just(512u32), Just(640), Just(1024)],
            blocks in 1usize..40,
            tail in 0usize..700,
            pieces in prop::collection::vec((0usize..50_000, 1usize..3000, any::<bool>()), 0..30),
            strong in prop_oneof![Just(8u32), Just(16), Just(2)],
        ) {
            let mut basis = noise(blocks * bs as usize + tail, seed);
            // Some equal blocks.
            if blocks > 3 {
                let b = bs as usize;
                let first = basis[..b].to_vec();
                basis[2 * b..3 * b].copy_from_slice(&first);
            }
            let mut new = vec![];
            for (i, &(at, len, moved)) in pieces.iter().enumerate() {
                if moved && !basis.is_empty() {
                    let at = at % basis.len();
                    new.extend_from_slice(&basis[at..(at + len).min(basis.len())]);
                } else {
                    new.extend(noise(len, seed ^ i as u64));
                }
            }
            let options = SignatureOptions { block_size: bs, crypto_hash_size: strong };
            let sig = fast_rsync::Signature::calculate(&basis, options);
            let mut theirs = vec![];
            fast_rsync::diff(&sig.index(), &new, &mut theirs).unwrap();
            let ours = crate::diff_segment(
                &crate::Signature::parse(sig.serialized()).unwrap(),
                &new,
            )
            .unwrap();
            prop_assert_eq!(&crate::apply_to_vec(&basis, &ours, u64::MAX).unwrap(), &new);
            // Runs of zero blocks in the basis, and the search told where
            // the data lines up (so of equal blocks the one in line is
            // copied): it rebuilds the data, and without a short last block
            // (which one copy or another may line up for) it copies and
            // sends the same bytes as without.
            let mut zbasis = basis.clone();
            let b = bs as usize;
            let n = zbasis.len();
            zbasis[b.min(n)..(3 * b).min(n)].fill(0);
            if seed % 2 == 0 {
                zbasis[(5 * b).min(n)..(8 * b).min(n)].fill(0);
            }
            let mut znew = new.clone();
            znew.extend_from_slice(&zbasis[..(4 * b).min(n)]);
            let zsig = fast_rsync::Signature::calculate(&zbasis, options);
            let parsed = crate::Signature::parse(zsig.serialized()).unwrap();
            let plain = crate::diff_segment(&parsed, &znew).unwrap();
            let mut lined = vec![];
            let mut w = crate::delta::OpWriter::new(&mut lined);
            search(parsed.index(), parsed.entries(), &znew, Some(0), &mut w);
            w.finish();
            prop_assert_eq!(&crate::apply_to_vec(&zbasis, &lined, u64::MAX).unwrap(), &znew);
            if tail % b == 0 {
                prop_assert_eq!(normal(&lined, &zbasis), normal(&plain, &zbasis));
            }
            if tail % bs as usize == 0 {
                prop_assert_eq!(normal(&ours, &basis), normal(&theirs, &basis));
            } else {
                // A short last block fast_rsync finds only as the whole rest
                // of the data, found where it follows the block before it or
                // ends the data: at most a block more literal bytes than
                // fast_rsync's (taken greedily, its bytes may be where a full
                // block would have matched: new = the basis's last 1,264
                // bytes, then 511 bytes of block 8 whose byte before is, by
                // chance, the basis's last: fast_rsync sent 239 literal
                // bytes, this 628), and mostly fewer.
                let lit = |d: &[u8]| -> usize {
                    normal(d, &basis).iter().filter(|o| !o.0).map(|o| o.1.len()).sum()
                };
                prop_assert!(lit(&ours) <= lit(&theirs) + bs as usize);
            }
        }
    }
}

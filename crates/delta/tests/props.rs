//! Property tests: round trips through signature / diff / apply, streamed
//! signatures, segmented deltas, and robustness against garbage input.
//!
//! Inputs are generated from small seeds (not byte vectors) so that cases of
//! up to ~256 KiB stay cheap to generate and shrink.

use byteback_delta::{
    apply_ops, apply_to_vec, block_size_for, copy_end, diff_segment, diff_window_into,
    literal_delta, ops, signature, DeltaError, Op, PatchSink, Signature, SignatureBuilder,
    MAX_SIG_BLOCKS,
};
use proptest::prelude::*;

const MAX_LEN: usize = 256 << 10;

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What kind of content a generated file has.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Incompressible.
    Random,
    /// Three symbols only: many rolling-checksum collisions.
    LowEntropy,
    /// A short random pattern repeated: many identical blocks.
    Periodic(u16),
    /// All zeros.
    Zeros,
}

fn content(kind: Kind, len: usize, seed: u64) -> Vec<u8> {
    match kind {
        Kind::Random => noise(len, seed),
        Kind::LowEntropy => noise(len, seed).into_iter().map(|b| b % 3).collect(),
        Kind::Periodic(p) => {
            let pat = noise(usize::from(p.max(1)), seed);
            pat.iter().copied().cycle().take(len).collect()
        }
        Kind::Zeros => vec![0; len],
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        6 => Just(Kind::Random),
        1 => Just(Kind::LowEntropy),
        1 => (1u16..3000).prop_map(Kind::Periodic),
        1 => Just(Kind::Zeros),
    ]
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 0usize..2048,
        3 => 0usize..=MAX_LEN,
    ]
}

fn base() -> impl Strategy<Value = Vec<u8>> {
    (kind(), length(), any::<u64>()).prop_map(|(k, len, seed)| content(k, len, seed))
}

/// An edit turning the basis into the new file. Positions and lengths are
/// taken modulo the current length.
#[derive(Debug, Clone)]
enum Edit {
    Insert { at: usize, len: usize, seed: u64 },
    Delete { at: usize, len: usize },
    Overwrite { at: usize, len: usize, seed: u64 },
    Move { from: usize, len: usize, to: usize },
    Duplicate { from: usize, len: usize, to: usize },
    Append { len: usize, seed: u64 },
    Truncate { keep: usize },
    FlipByte { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    let pos = any::<usize>();
    let small = 0usize..5000;
    let big = 0usize..=MAX_LEN;
    prop_oneof![
        (pos, small.clone(), any::<u64>()).prop_map(|(at, len, seed)| Edit::Insert {
            at,
            len,
            seed
        }),
        (pos, small.clone()).prop_map(|(at, len)| Edit::Delete { at, len }),
        (pos, small.clone(), any::<u64>()).prop_map(|(at, len, seed)| Edit::Overwrite {
            at,
            len,
            seed
        }),
        (pos, big.clone(), pos).prop_map(|(from, len, to)| Edit::Move { from, len, to }),
        (pos, big, pos).prop_map(|(from, len, to)| Edit::Duplicate { from, len, to }),
        (small, any::<u64>()).prop_map(|(len, seed)| Edit::Append { len, seed }),
        pos.prop_map(|keep| Edit::Truncate { keep }),
        pos.prop_map(|at| Edit::FlipByte { at }),
    ]
}

fn apply_edit(v: &mut Vec<u8>, e: &Edit) {
    let n = v.len();
    match *e {
        Edit::Insert { at, len, seed } => {
            let at = at % (n + 1);
            v.splice(at..at, noise(len, seed));
        }
        Edit::Delete { at, len } => {
            let at = at % (n + 1);
            let end = at + len.min(n - at);
            v.drain(at..end);
        }
        Edit::Overwrite { at, len, seed } => {
            let at = at % (n + 1);
            let end = at + len.min(n - at);
            v.splice(at..end, noise(end - at, seed));
        }
        Edit::Move { from, len, to } => {
            let from = from % (n + 1);
            let len = len.min(n - from);
            let piece: Vec<u8> = v.drain(from..from + len).collect();
            let to = to % (v.len() + 1);
            v.splice(to..to, piece);
        }
        Edit::Duplicate { from, len, to } => {
            let from = from % (n + 1);
            let len = len.min(n - from).min(MAX_LEN);
            let piece = v[from..from + len].to_vec();
            let to = to % (n + 1);
            v.splice(to..to, piece);
        }
        Edit::Append { len, seed } => v.extend(noise(len, seed)),
        Edit::Truncate { keep } => v.truncate(keep % (n + 1)),
        Edit::FlipByte { at } => {
            if n > 0 {
                v[at % n] ^= 0x5a;
            }
        }
    }
}

/// A basis and a new version derived from it by a few edits.
fn pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        base(),
        prop::collection::vec(edit(), 0..6),
        any::<bool>(),
        kind(),
        length(),
        any::<u64>(),
    )
        .prop_map(|(base, edits, unrelated, k, len, seed)| {
            // Occasionally the new file has nothing to do with the basis.
            let mut new = if unrelated && seed % 8 == 0 {
                content(k, len, seed)
            } else {
                base.clone()
            };
            for e in &edits {
                apply_edit(&mut new, e);
            }
            (base, new)
        })
}

fn parse(base: &[u8]) -> Signature {
    Signature::parse(&signature(base).0).expect("own signature parses")
}

/// A server-like sink writing into an output buffer.
struct WriteSink<'a> {
    basis: &'a [u8],
    out: Vec<u8>,
}

impl PatchSink for WriteSink<'_> {
    type Error = DeltaError;
    fn copy(&mut self, offset: u64, len: u64) -> Result<(), DeltaError> {
        let start = usize::try_from(offset).map_err(|_| DeltaError::BasisRange)?;
        let end = start + usize::try_from(len).map_err(|_| DeltaError::BasisRange)?;
        self.out.extend_from_slice(&self.basis[start..end]);
        Ok(())
    }
    fn literal(&mut self, data: &[u8]) -> Result<(), DeltaError> {
        self.out.extend_from_slice(data);
        Ok(())
    }
}

/// Apply with both our applier and fast_rsync's; they must agree.
fn apply_both(basis: &[u8], delta: &[u8], max_out: u64) -> Result<Vec<u8>, DeltaError> {
    let ours = apply_to_vec(basis, delta, max_out);
    let mut theirs = Vec::new();
    let limit = usize::try_from(max_out).unwrap_or(usize::MAX);
    let fr = fast_rsync::apply_limited(basis, delta, &mut theirs, limit);
    match (&ours, fr) {
        (Ok(out), Ok(())) => assert_eq!(out, &theirs, "appliers disagree on output"),
        (Err(_), Err(_)) => {}
        (o, f) => panic!("appliers disagree: ours {o:?}, fast_rsync {f:?}"),
    }
    ours
}

/// One piece of a windowed diff: its offset in the new file, the bytes its
/// delta covers, and the delta.
#[derive(Debug)]
struct Piece {
    at: usize,
    n: usize,
    delta: Vec<u8>,
}

/// What the client does: a first piece of `first` bytes, then pieces of
/// `seg`, each diffed with up to `look` bytes of look-ahead and starting
/// where the last one's delta ended. `hint(offset, lined_up)` gives the
/// `lined_up` passed for a piece at a file offset, given the one the client
/// would pass (tracked with `copy_end`). Checks every piece's delta and the
/// semantics of `n` (documented on `diff_window_into`) and returns the
/// pieces.
fn windowed(
    base: &[u8],
    sig: &Signature,
    new: &[u8],
    (first, seg, look): (usize, usize, usize),
    hint: impl Fn(usize, u64) -> Option<u64>,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rebuilt = Vec::new();
    let mut pos = 0;
    let mut lined_up = 0u64;
    let mut d = vec![1, 2, 3];
    while pos < new.len() {
        let want = if pieces.is_empty() { first } else { seg }.max(1);
        let end = (pos + want + look).min(new.len());
        let window = &new[pos..end];
        let want = if end == new.len() { window.len() } else { want };
        let n = diff_window_into(sig, window, hint(pos, lined_up), want, &mut d).expect("diff");
        lined_up = copy_end(&d).unwrap_or(lined_up + n as u64);
        assert!(
            n >= want.min(window.len()) && n <= window.len(),
            "n {n} want {want}"
        );
        let out = apply_both(base, &d, n as u64).expect("apply piece");
        assert_eq!(out, &window[..n], "piece at {pos}");
        // n is the first op boundary at or past want: only the last op
        // reaches it, and a literal reaching past want was cut at want.
        let all: Vec<Op> = ops(&d).collect::<Result<_, _>>().expect("valid delta");
        if want < window.len() {
            let last = all.last().map_or(0, |op| op.out_len() as usize);
            assert!(n - last < want, "n {n}, last op {last}, want {want}");
            if let Some(Op::Literal(_)) = all.last() {
                assert_eq!(n, want, "a literal is cut at want");
            }
        }
        rebuilt.extend_from_slice(&out);
        pieces.push(Piece {
            at: pos,
            n,
            delta: d.clone(),
        });
        pos += n;
    }
    assert_eq!(rebuilt, new);
    pieces
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn roundtrip((base, new) in pair()) {
        let sig = parse(&base);
        let delta = diff_segment(&sig, &new).expect("diff");
        let out = apply_both(&base, &delta, new.len() as u64).expect("apply");
        prop_assert_eq!(&out, &new);

        // The exact length is the tightest limit that works.
        if !new.is_empty() {
            prop_assert!(matches!(
                apply_to_vec(&base, &delta, new.len() as u64 - 1),
                Err(DeltaError::TooLong)
            ));
        }

        // Through a PatchSink, as the server does it.
        let mut sink = WriteSink { basis: &base, out: Vec::new() };
        let n = apply_ops(&delta, base.len() as u64, u64::MAX, &mut sink).expect("apply_ops");
        prop_assert_eq!(n, new.len() as u64);
        prop_assert_eq!(&sink.out, &new);

        // Without a basis, the literal delta reproduces the data too.
        let lit = literal_delta(&new);
        prop_assert_eq!(&apply_both(&[], &lit, new.len() as u64).expect("literal"), &new);
    }

    #[test]
    fn segmented(
        (base, new) in pair(),
        sizes in prop::collection::vec(prop_oneof![1 => Just(0usize), 8 => 1usize..100_000], 1..8),
    ) {
        let sig = parse(&base);
        let mut out = Vec::new();
        let mut rest = &new[..];
        let mut i = 0;
        // Zero sizes give empty segments; the next segment always makes progress.
        while !rest.is_empty() || i == 0 {
            let size = sizes[i % sizes.len()];
            let size = if size == 0 && i % 2 == 1 { 50_000 } else { size };
            let (seg, tail) = rest.split_at(size.min(rest.len()));
            let delta = diff_segment(&sig, seg).expect("diff");
            let part = apply_both(&base, &delta, seg.len() as u64).expect("apply segment");
            prop_assert_eq!(&part, seg);
            out.extend_from_slice(&part);
            rest = tail;
            i += 1;
        }
        prop_assert_eq!(out, new);
    }

    #[test]
    fn identical_file_is_all_copies(k in kind(), len in length(), seed in any::<u64>()) {
        let base = content(k, len, seed);
        let sig = parse(&base);
        let delta = diff_segment(&sig, &base).expect("diff");
        let bs = block_size_for(len as u64) as usize;
        let mut literal = 0;
        for op in ops(&delta) {
            if let Op::Literal(d) = op.expect("valid delta") {
                literal += d.len();
            }
        }
        // Every block is copied, a trailing partial one too.
        prop_assert_eq!(literal, 0, "block {}, tail {}", bs, len % bs);
        if matches!(k, Kind::Random) {
            // Distinct consecutive blocks merge into a single COPY.
            prop_assert!(delta.len() <= 32);
        }
        prop_assert_eq!(apply_to_vec(&base, &delta, len as u64).expect("apply"), base);
    }

    /// Windowed deltas, with and without the aligned fast path, and with a
    /// wrong hint: every piece rebuilds exactly, whatever the edits, the
    /// window sizes or where the windows start.
    #[test]
    fn windowed_roundtrip(
        (base, new) in pair(),
        first in prop_oneof![Just(0usize), 1usize..5000],
        blocks in 1usize..40,
        odd in 0usize..3,
        look in 0usize..3,
    ) {
        let sig = parse(&base);
        let bs = block_size_for(base.len() as u64) as usize;
        // Segments a whole number of blocks as in the client, or not.
        let seg = blocks * bs + [0, 1, bs / 2][odd];
        let look = [0, bs - 1, 3 * bs][look];
        let shape = (first, seg, look);
        let plain = windowed(&base, &sig, &new, shape, |_, _| None);
        let fast = windowed(&base, &sig, &new, shape, |_, l| Some(l));
        windowed(&base, &sig, &new, shape, |at, _| Some(at as u64));
        // Hints that are a multiple of the block size but wrong.
        windowed(&base, &sig, &new, shape, |at, _| Some((at + 3 * bs) as u64));
        windowed(&base, &sig, &new, shape, |_, _| Some(0));
        // Data within the first piece is one piece (none when empty).
        if !new.is_empty() && new.len() <= first {
            prop_assert_eq!(plain.len(), 1);
            prop_assert_eq!(fast.len(), 1);
        }
    }

    /// Random data edited in place (as W4: blocks rewritten, aligned or
    /// not, and the last short block changed), or with a few insertions and
    /// deletions (as W9) and appended data (as W5): with the hint the client
    /// passes, every piece is cut at the same place as by the plain diff,
    /// and its delta is never bigger.
    #[test]
    fn aligned_edits_like_the_plain_diff(
        len in 0usize..=MAX_LEN,
        seed in any::<u64>(),
        edits in prop::collection::vec(
            (any::<usize>(), 1usize..3000, any::<bool>(), 0u8..8),
            0..8,
        ),
        blocks in 1usize..40,
        tail in any::<bool>(),
        append in prop_oneof![Just(0usize), 1usize..50_000],
    ) {
        let base = noise(len, seed);
        let bs = block_size_for(len as u64) as usize;
        let mut new = base.clone();
        for (i, &(at, n, aligned, kind)) in edits.iter().enumerate() {
            if new.is_empty() {
                break;
            }
            let at = at % new.len();
            let at = if aligned { at / bs * bs } else { at };
            let end = (at + n).min(new.len());
            let fresh = noise(end - at, seed ^ (i as u64 + 1));
            match kind {
                0 => drop(new.splice(at..at, fresh)),
                1 => drop(new.drain(at..end)),
                _ => new[at..end].copy_from_slice(&fresh),
            }
        }
        if tail && !new.is_empty() {
            let last = new.len() - 1;
            new[last] ^= 0x5a;
        }
        new.extend_from_slice(&noise(append, !seed));
        let sig = parse(&base);
        let shape = (blocks * bs, blocks * bs, bs - 1);
        let plain = windowed(&base, &sig, &new, shape, |_, _| None);
        let fast = windowed(&base, &sig, &new, shape, |_, l| Some(l));
        prop_assert_eq!(plain.len(), fast.len());
        for (p, f) in plain.iter().zip(&fast) {
            prop_assert_eq!((p.at, p.n), (f.at, f.n));
            prop_assert!(
                f.delta.len() <= p.delta.len(),
                "piece at {}: fast {} > plain {}", f.at, f.delta.len(), p.delta.len()
            );
        }
    }

    #[test]
    fn builder_matches_signature(
        k in kind(),
        len in prop_oneof![0usize..4096, 0usize..=(1 << 20)],
        seed in any::<u64>(),
        steps in prop::collection::vec(
            prop_oneof![0usize..16, 0usize..2000, 0usize..300_000],
            1..16,
        ),
    ) {
        let data = content(k, len, seed);
        let mut builder = SignatureBuilder::new(len as u64);
        let mut rest = &data[..];
        let mut i = 0;
        while !rest.is_empty() {
            let step = steps[i % steps.len()];
            if step == 0 {
                builder.update(&[]);
            }
            let (chunk, tail) = rest.split_at(step.clamp(1, rest.len()));
            builder.update(chunk);
            rest = tail;
            i += 1;
        }
        let built = builder.finish();
        prop_assert_eq!(&built, &signature(&data));
        let sig = Signature::parse(&built.0).expect("parses");
        prop_assert!(sig.block_count() <= MAX_SIG_BLOCKS);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn garbage_delta_never_panics(
        basis_len in 0usize..4096,
        with_magic in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        max_out in prop_oneof![0u64..100, 0u64..(1 << 20), Just(u64::MAX)],
    ) {
        let basis = noise(basis_len, 1);
        let mut delta = Vec::new();
        if with_magic {
            delta.extend_from_slice(&0x7273_0236u32.to_be_bytes());
        }
        delta.extend_from_slice(&body);
        // Bound fast_rsync's side too: it allocates as it goes.
        let _ = apply_both(&basis, &delta, max_out.min(1 << 24));
        let _ = apply_to_vec(&basis, &delta, max_out);
        let mut sink = WriteSink { basis: &basis, out: Vec::new() };
        let _ = apply_ops(&delta, basis_len as u64, max_out.min(1 << 24), &mut sink);
    }

    #[test]
    fn mutated_delta_never_panics(
        (base, new) in pair(),
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..6),
        cut in prop::option::of(any::<usize>()),
        lie_about_basis in any::<bool>(),
    ) {
        let sig = parse(&base);
        let mut delta = diff_segment(&sig, &new).expect("diff");
        for &(at, mask) in &flips {
            let n = delta.len();
            delta[at % n] ^= mask;
        }
        if let Some(cut) = cut {
            delta.truncate(cut % (delta.len() + 1));
        }
        let r = apply_both(&base, &delta, new.len() as u64 + 4096);
        if let Ok(out) = r {
            prop_assert!(out.len() as u64 <= new.len() as u64 + 4096);
        }
        // A sink must never be asked to copy outside the basis length it was given.
        let basis_len = if lie_about_basis { base.len() / 2 } else { base.len() };
        let mut sink = WriteSink { basis: &base[..basis_len], out: Vec::new() };
        let _ = apply_ops(&delta, basis_len as u64, u64::MAX, &mut sink);
    }

    #[test]
    fn garbage_signature_never_panics(
        header in prop::option::of((
            prop_oneof![Just(0x7273_0136u32), Just(0x7273_0137u32), any::<u32>()],
            prop_oneof![Just(512u32), 0u32..70_000, any::<u32>()],
            prop_oneof![0u32..=17, any::<u32>()],
        )),
        body in prop::collection::vec(any::<u8>(), 0..4096),
        new_seed in any::<u64>(),
        lined_up in prop::option::of(prop_oneof![Just(0u64), any::<u64>(), 0u64..100_000]),
        want in 0usize..30_000,
    ) {
        let mut bytes = Vec::new();
        if let Some((magic, block, hash)) = header {
            bytes.extend_from_slice(&magic.to_be_bytes());
            bytes.extend_from_slice(&block.to_be_bytes());
            bytes.extend_from_slice(&hash.to_be_bytes());
        }
        bytes.extend_from_slice(&body);
        if let Ok(sig) = Signature::parse(&bytes) {
            // Whatever parses must be usable.
            let new = noise(20_000, new_seed);
            let delta = diff_segment(&sig, &new).expect("diff against parsed signature");
            let _ = apply_to_vec(&noise(4096, 2), &delta, 1 << 20);
            // And the windowed search with a hint of where the data lines
            // up (the aligned fast path, the cut and its shortened literal).
            let mut out = Vec::new();
            if let Ok(n) = diff_window_into(&sig, &new, lined_up, want, &mut out) {
                prop_assert!(n <= new.len() && n >= want.min(new.len()));
            }
        }
    }

    #[test]
    fn mutated_signature_never_panics(
        (base, new) in pair(),
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let mut bytes = signature(&base).0;
        for &(at, mask) in &flips {
            let n = bytes.len();
            bytes[at % n] ^= mask;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        if let Ok(sig) = Signature::parse(&bytes) {
            let delta = diff_segment(&sig, &new).expect("diff");
            // A wrong signature may give a wrong or unappliable delta, never a panic
            // and never more output than the new data.
            if let Ok(out) = apply_both(&base, &delta, new.len() as u64) {
                prop_assert_eq!(out.len(), new.len());
            }
        }
    }
}

#[test]
fn edge_cases() {
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (vec![], vec![]),
        (vec![], noise(1000, 1)),
        (noise(1000, 1), vec![]),
        (vec![1], vec![1]),
        (noise(100, 1), noise(100, 1)),
        (noise(511, 3), noise(511, 3)),
        (noise(512, 3), noise(512, 3)),
        (noise(513, 3), noise(513, 3)),
        (noise(512, 3), [noise(512, 3), noise(512, 3)].concat()),
        (noise(100_000, 4), noise(100_000, 4)[..50_000].to_vec()),
        (noise(100_000, 4), noise(100_000, 4)[50_001..].to_vec()),
    ];
    for (base, new) in cases {
        let sig = parse(&base);
        let delta = diff_segment(&sig, &new).expect("diff");
        let out = apply_both(&base, &delta, new.len() as u64).expect("apply");
        assert_eq!(out, new, "base {} new {}", base.len(), new.len());
    }
}

#[test]
fn small_change_gives_small_delta() {
    let base = noise(MAX_LEN, 9);
    let mut new = base.clone();
    new[100_000] ^= 1;
    new.splice(200_000..200_000, b"inserted".iter().copied());
    let delta = diff_segment(&parse(&base), &new).expect("diff");
    // Two damaged blocks plus a few ops.
    assert!(
        delta.len() < 3 * 512 + 100,
        "delta is {} bytes",
        delta.len()
    );
    assert_eq!(
        apply_to_vec(&base, &delta, new.len() as u64).expect("apply"),
        new
    );
}

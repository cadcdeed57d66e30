//! Micro-benchmarks of the delta engine: signature, diff, patch and BLAKE3,
//! plus the zstd step every segment goes through, each with
//! `Throughput::Bytes` so criterion prints MiB/s.
//!
//! `cargo bench --bench delta` (add `-- --quick` for a fast pass). The
//! figures are per core: the client runs diffs on a rayon pool, the server
//! patches and hashes on one thread.

use std::hint::black_box;
use std::time::Duration;

use byteback_delta::{
    apply_to_vec, copy_end, diff_segment, diff_window_into, hash_bytes, literal_delta, signature,
    Signature, SignatureBuilder,
};
use byteback_protocol::Compressed;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Size of the basis and of the new data in every benchmark (the client's
/// diff segment is about 4 MiB; 16 MiB spans a few of them).
const SIZE: usize = 16 << 20;

/// splitmix64, so every run benchmarks the same bytes.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// `base` with `count` 4 KiB blocks rewritten at deterministic offsets (as W4).
fn rewritten(base: &[u8], count: usize) -> Vec<u8> {
    let mut new = base.to_vec();
    let fresh = random_bytes(99, count * 4096);
    let blocks = base.len() / 4096;
    for i in 0..count {
        let b = (i * 7919) % blocks;
        new[b * 4096..(b + 1) * 4096].copy_from_slice(&fresh[i * 4096..(i + 1) * 4096]);
    }
    new
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

fn bench_signature(c: &mut Criterion) {
    let basis = random_bytes(1, SIZE);
    let mut g = c.benchmark_group("signature");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("calculate_16MiB", |b| {
        b.iter(|| signature(black_box(&basis)))
    });
    g.bench_function("streamed_1MiB_chunks_16MiB", |b| {
        b.iter(|| {
            let mut s = SignatureBuilder::new(basis.len() as u64);
            for chunk in basis.chunks(1 << 20) {
                s.update(chunk);
            }
            s.finish()
        })
    });
    let sig = signature(&basis);
    g.bench_function("parse_and_index_16MiB", |b| {
        b.iter(|| Signature::parse(black_box(sig.as_bytes())))
    });
    g.finish();
}

fn bench_diff(c: &mut Criterion) {
    let basis = random_bytes(1, SIZE);
    let sig = Signature::parse(signature(&basis).as_bytes()).expect("valid signature");
    let cases = [
        ("unchanged", basis.clone()),
        ("200_rewrites", rewritten(&basis, 200)),
        ("all_new", random_bytes(2, SIZE)),
    ];
    let mut g = c.benchmark_group("diff");
    g.throughput(Throughput::Bytes(SIZE as u64));
    for (name, new) in &cases {
        // The client diffs in segments of about 4 MiB, so does the benchmark.
        g.bench_with_input(BenchmarkId::new("4MiB_segments", name), new, |b, new| {
            b.iter(|| {
                let mut out = 0usize;
                for seg in new.chunks(4 << 20) {
                    out += diff_segment(&sig, seg).expect("diff").len();
                }
                out
            })
        });
    }
    g.finish();
}

/// Size of the basis in the windowed diff benchmarks (W4/W9 at 1/8 scale).
const BIG: usize = 64 << 20;

/// The client's loop over a new file: pieces of about 4 MiB (whole blocks)
/// with a block of look-ahead, each starting where the last delta ended;
/// `fast` passes where the data is expected in the basis, as the client
/// does (the aligned fast path). Returns the delta bytes.
fn windowed(sig: &Signature, new: &[u8], fast: bool) -> usize {
    let bs = sig.block_size() as usize;
    let seg = (4 << 20) / bs * bs;
    let (mut pos, mut wire, mut d, mut lined_up) = (0, 0, Vec::new(), 0);
    while pos < new.len() {
        let end = (pos + seg + bs - 1).min(new.len());
        let want = if end == new.len() { end - pos } else { seg };
        let at = fast.then_some(lined_up);
        let n = diff_window_into(sig, &new[pos..end], at, want, &mut d).expect("diff");
        lined_up = copy_end(&d).unwrap_or(lined_up + n as u64);
        pos += n;
        wire += d.len();
    }
    wire
}

/// Windowed diffs of a 64 MiB file, as the client does them, without
/// ("plain") and with ("aligned") the aligned fast path: 200 random 4 KiB
/// blocks rewritten in place (W4), 7 bytes inserted at offset 1000 (W9:
/// no block is where it was), 16 MiB appended (W5), and unchanged.
fn bench_windowed_diff(c: &mut Criterion) {
    let basis = random_bytes(1, BIG);
    let sig = Signature::parse(signature(&basis).as_bytes()).expect("valid signature");
    let mut inserted = basis[..1000].to_vec();
    inserted.extend_from_slice(b"7 bytes");
    inserted.extend_from_slice(&basis[1000..]);
    let mut appended = basis.clone();
    appended.extend_from_slice(&random_bytes(5, 16 << 20));
    let cases = [
        ("200_aligned_4KiB_rewrites", rewritten(&basis, 200)),
        ("7_bytes_inserted_at_1000", inserted),
        ("16MiB_appended", appended),
        ("unchanged", basis.clone()),
    ];
    let mut g = c.benchmark_group("diff_64MiB_windows");
    g.throughput(Throughput::Bytes(BIG as u64));
    for (name, new) in &cases {
        for (path, fast) in [("plain", false), ("aligned", true)] {
            eprintln!("{name} {path}: delta {} bytes", windowed(&sig, new, fast));
            g.bench_with_input(BenchmarkId::new(path, name), new, |b, new| {
                b.iter(|| windowed(&sig, black_box(new), fast))
            });
        }
    }
    g.finish();
}

fn bench_patch(c: &mut Criterion) {
    let basis = random_bytes(1, SIZE);
    let sig = Signature::parse(signature(&basis).as_bytes()).expect("valid signature");
    let new = rewritten(&basis, 200);
    let delta = diff_segment(&sig, &new).expect("diff");
    let literal = literal_delta(&new);
    let mut g = c.benchmark_group("patch");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("200_rewrites_16MiB", |b| {
        b.iter(|| apply_to_vec(&basis, black_box(&delta), SIZE as u64).expect("patch"))
    });
    g.bench_function("literal_16MiB", |b| {
        b.iter(|| apply_to_vec(&[], black_box(&literal), SIZE as u64).expect("patch"))
    });
    g.finish();
}

fn bench_hash_and_compress(c: &mut Criterion) {
    let data = random_bytes(3, SIZE);
    let mut text = Vec::with_capacity(SIZE);
    while text.len() < SIZE {
        text.extend_from_slice(b"fn main() { println!(\"hello, byteback\"); } // 0123456789\n");
    }
    text.truncate(SIZE);
    let mut g = c.benchmark_group("blake3");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("16MiB", |b| b.iter(|| hash_bytes(black_box(&data))));
    g.finish();

    let mut g = c.benchmark_group("zstd_level1");
    let seg = 4 << 20;
    g.throughput(Throughput::Bytes(seg as u64));
    let random_delta = literal_delta(&data[..seg]);
    let text_delta = literal_delta(&text[..seg]);
    g.bench_function("compress_incompressible_4MiB", |b| {
        b.iter(|| Compressed::compress(black_box(&random_delta), 1).expect("zstd"))
    });
    g.bench_function("compress_text_4MiB", |b| {
        b.iter(|| Compressed::compress(black_box(&text_delta), 1).expect("zstd"))
    });
    let packed = Compressed::compress(&random_delta, 1).expect("zstd");
    g.bench_function("decompress_incompressible_4MiB", |b| {
        b.iter(|| black_box(&packed).decompress().expect("unzstd"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_signature, bench_diff, bench_windowed_diff, bench_patch, bench_hash_and_compress
}
criterion_main!(benches);

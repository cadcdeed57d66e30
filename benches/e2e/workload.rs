//! Deterministic workloads: the same seed gives the same tree on every run
//! and machine, so byteback and rsync (and two runs of the harness) see the
//! same bytes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use crate::rng::Rng;

/// Sizes of one harness run (full or `--quick`).
#[derive(Clone, Debug)]
pub struct Sizes {
    /// W1: number of small files (1–16 KiB).
    pub small_files: usize,
    /// W2: number of large files.
    pub large_files: usize,
    /// W2: size of each large file.
    pub large_size: u64,
    /// W4: 4 KiB rewrites per large file.
    pub rewrites: usize,
    /// W5: bytes appended to each large file.
    pub append: u64,
    /// W6: a real tree on this machine.
    pub real_tree: PathBuf,
    /// W7 (optional): number of tiny files.
    pub million: usize,
    /// W8: size of the file renamed and copied.
    pub moved: u64,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            small_files: 50_000,
            large_files: 4,
            large_size: 512 << 20,
            rewrites: 200,
            append: 16 << 20,
            real_tree: PathBuf::from("/usr/share"),
            million: 1_000_000,
            moved: 1 << 30,
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            small_files: 2_000,
            large_files: 4,
            large_size: 32 << 20,
            rewrites: 200,
            append: 1 << 20,
            real_tree: PathBuf::from("/usr/share/doc"),
            million: 100_000,
            moved: 64 << 20,
        }
    }
}

/// A fixed mtime (2024-01-01) plus `i` seconds, so a regenerated tree is identical.
fn set_mtime(p: &Path, i: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_704_067_200 + i);
    let f = File::options()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.set_modified(t)
        .unwrap_or_else(|e| panic!("utimes {}: {e}", p.display()));
}

const WORDS: &[&str] = &[
    "backup", "snapshot", "delta", "block", "server", "client", "btrfs", "rsync", "extent",
    "manifest", "the", "of", "and", "a", "to", "in", "is", "file", "data", "byte",
];

/// W1: `n` files of 1–16 KiB in directories of 500. About half of each file
/// is random, half word salad, so it compresses roughly as source code or
/// configuration does (zstd level 1: about 1.6:1).
pub fn small_files(root: &Path, n: usize, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut total = 0u64;
    let mut buf = Vec::with_capacity(16 << 10);
    for i in 0..n {
        let dir = root.join(format!("d{:03}", i / 500));
        if i % 500 == 0 {
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        let size = 1024 + rng.below(15 * 1024 + 1) as usize;
        buf.clear();
        buf.resize(size / 2, 0);
        rng.fill(&mut buf);
        while buf.len() < size {
            let w = WORDS[rng.below(WORDS.len() as u64) as usize];
            buf.extend_from_slice(w.as_bytes());
            buf.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
        }
        buf.truncate(size);
        let p = dir.join(format!("f{i:06}.txt"));
        fs::write(&p, &buf).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        set_mtime(&p, i as u64);
        total += size as u64;
    }
    total
}

fn large_name(i: usize) -> String {
    format!("large{i}.bin")
}

/// W2: `count` incompressible files of `size` bytes.
pub fn large_files(root: &Path, count: usize, size: u64, seed: u64) -> u64 {
    fs::create_dir_all(root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..count {
        let mut rng = Rng::new(seed ^ (i as u64) << 32);
        let p = root.join(large_name(i));
        let mut f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])
                .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
            left -= n as u64;
        }
        drop(f);
        set_mtime(&p, i as u64);
    }
    count as u64 * size
}

/// W4: `count` random 4 KiB-aligned blocks rewritten in place in each large
/// file (as a database does); returns the bytes changed.
pub fn rewrite_blocks(root: &Path, files: usize, count: usize, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut block = [0u8; 4096];
    for i in 0..files {
        let p = root.join(large_name(i));
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let blocks = f.metadata().expect("stat").len() / 4096;
        for _ in 0..count {
            let b = rng.below(blocks);
            rng.fill(&mut block);
            f.write_all_at(&block, b * 4096)
                .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
    }
    (files * count * 4096) as u64
}

/// W5: `bytes` of fresh random data appended to each large file.
pub fn append(root: &Path, files: usize, bytes: u64, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..files {
        let p = root.join(large_name(i));
        let mut f = OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])
                .unwrap_or_else(|e| panic!("append {}: {e}", p.display()));
            left -= n as u64;
        }
    }
    files as u64 * bytes
}

/// W9: 7 bytes inserted at offset 1000 of each large file (the file is
/// rewritten through a temporary file, so everything after moves by 7).
pub fn insert(root: &Path, files: usize, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..files {
        let p = root.join(large_name(i));
        let tmp = root.join(format!(".{}.tmp", large_name(i)));
        let data = File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let mut out =
            File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        let mut off = 0u64;
        loop {
            let n = data.read_at(&mut buf, off).expect("read");
            if n == 0 {
                break;
            }
            if off == 0 && n >= 1000 {
                let mut seven = [0u8; 7];
                rng.fill(&mut seven);
                out.write_all(&buf[..1000]).expect("write");
                out.write_all(&seven).expect("write");
                out.write_all(&buf[1000..n]).expect("write");
            } else {
                out.write_all(&buf[..n]).expect("write");
            }
            off += n as u64;
        }
        drop(out);
        fs::rename(&tmp, &p).unwrap_or_else(|e| panic!("rename {}: {e}", p.display()));
    }
    files as u64 * 7
}

/// W8: one incompressible file of `size` bytes, `moved0.bin`.
pub fn moved_file(root: &Path, size: u64, seed: u64) -> u64 {
    fs::create_dir_all(root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
    let mut rng = Rng::new(seed);
    let p = root.join("moved0.bin");
    let mut f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        left -= n as u64;
    }
    drop(f);
    set_mtime(&p, 0);
    size
}

/// W8, run `i`: `moved{i}.bin` renamed to `moved{i+1}.bin`, the copy of the
/// last run removed and a new one made (`copy{i}.bin`), so the tree stays at
/// two copies of the file.
pub fn move_and_copy(root: &Path, i: usize) {
    let from = root.join(format!("moved{i}.bin"));
    let to = root.join(format!("moved{}.bin", i + 1));
    fs::rename(&from, &to).unwrap_or_else(|e| panic!("rename {}: {e}", from.display()));
    if i > 0 {
        let old = root.join(format!("copy{}.bin", i - 1));
        fs::remove_file(&old).unwrap_or_else(|e| panic!("rm {}: {e}", old.display()));
    }
    let copy = root.join(format!("copy{i}.bin"));
    // A real copy of the bytes (no reflink on the source filesystem).
    let mut src = File::open(&to).unwrap_or_else(|e| panic!("open {}: {e}", to.display()));
    let mut dst = File::create(&copy).unwrap_or_else(|e| panic!("create {}: {e}", copy.display()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut src, &mut buf).expect("read");
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).expect("write");
    }
}

/// W7: `n` tiny files (0–64 bytes) in directories of 1000: a million-entry
/// tree for the memory goal.
pub fn tiny_files(root: &Path, n: usize, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut total = 0u64;
    let mut buf = [0u8; 64];
    for i in 0..n {
        let dir = root.join(format!("d{:04}", i / 1000));
        if i % 1000 == 0 {
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        let size = rng.below(65) as usize;
        rng.fill(&mut buf[..size]);
        let p = dir.join(format!("t{i:07}"));
        fs::write(&p, &buf[..size]).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        total += size as u64;
    }
    total
}

/// Bytes and entries of a tree (regular file sizes, every entry counted).
pub fn tree_size(root: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut entries = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            entries += 1;
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                bytes += md.len();
            }
        }
    }
    (bytes, entries)
}

//! Wire cost of moved, copied and shifted big files (issue 12, W8 and W9),
//! against a real store on btrfs:
//!
//! * a big file renamed, and a copy of it made: both new paths are offered
//!   by their BLAKE3 and cloned on the server; the data on the wire (the
//!   client's summary line) is under 1 % of one file's size, both files
//!   share their extents with the stored one (`filefrag -v` says `shared`),
//!   and the snapshot restores exactly (rsync);
//! * 7 bytes inserted near the start of a big file: a delta found across
//!   segment boundaries costs about the inserted bytes and one block, not a
//!   block per segment, and restores exactly.

use crate::util;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::*;

const MIB: u64 = 1 << 20;
/// Size of the big file (12 segments of the client's delta).
const BIG: u64 = 48 * MIB;

fn write_random(p: &Path, bytes: u64, rng: &mut Rng) {
    let mut f = fs::File::create(p).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..bytes / MIB {
        rng.fill(&mut buf);
        f.write_all(&buf).unwrap();
    }
}

struct World {
    store: PathBuf,
    src: PathBuf,
    work: tempfile::TempDir,
    _fs: BtrfsLoop,
}

impl World {
    fn backup(&self) -> String {
        let out = run_status(
            Command::new(bin("byteback-backup"))
                .arg("--destination")
                .arg(&self.store)
                .args(["--hostname", "moves", "--retry-number", "0"])
                .arg("--source")
                .arg(&self.src)
                .stdin(Stdio::null()),
        );
        assert!(out.status.success(), "backup failed: {}", stderr(&out));
        stderr(&out)
    }

    fn stored(&self, name: &str) -> PathBuf {
        self.store
            .join("moves/current")
            .join(self.src.strip_prefix("/").unwrap())
            .join(name)
    }

    fn assert_restores_exactly(&self, tag: &str) {
        let into = self.work.path().join(format!("restore-{tag}"));
        fs::create_dir_all(&into).unwrap();
        let out = run_status(
            Command::new(bin("byteback-restore"))
                .arg("--destination")
                .arg(&self.store)
                .args(["--hostname", "moves", "--restore", "/"])
                .current_dir(&into)
                .stdin(Stdio::null()),
        );
        assert!(out.status.success(), "restore: {}", stderr(&out));
        let snap = fs::read_dir(&into)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .max()
            .expect("restored nothing");
        assert_same_tree(&self.src, &snap.join(self.src.strip_prefix("/").unwrap()));
    }
}

fn world() -> World {
    let work = scratch();
    let fs_ = BtrfsLoop::new(768);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    World {
        store,
        src,
        work,
        _fs: fs_,
    }
}

/// Whether `filefrag -v` reports a shared extent in `p`.
fn has_shared_extents(p: &Path) -> (bool, String) {
    let out = run(Command::new("filefrag").arg("-v").arg(p));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text.contains("shared"), text)
}

#[test]
fn a_moved_and_a_copied_big_file_are_cloned_not_sent() {
    if !require_root("moves (btrfs loop device)") {
        return;
    }
    let w = world();
    let mut rng = Rng::new(0x3003);
    write_random(&w.src.join("big.bin"), BIG, &mut rng);
    fs::write(w.src.join("small.txt"), b"small\n").unwrap();
    let first = w.backup();
    assert!(
        summary_number(&first, " on the wire").unwrap_or(0) >= BIG,
        "{first}"
    );

    fs::rename(w.src.join("big.bin"), w.src.join("moved.bin")).unwrap();
    fs::copy(w.src.join("moved.bin"), w.src.join("copy.bin")).unwrap();
    let err = w.backup();
    let wire = summary_number(&err, " on the wire").unwrap_or(0);
    let cloned = summary_number(&err, " moved or copied files cloned").unwrap_or(0);
    eprintln!("moved and copied: {wire} bytes on the wire, {cloned} cloned");
    assert_eq!(cloned, 2, "{err}");
    assert!(wire < BIG / 100, "{wire} bytes on the wire:\n{err}");
    for name in ["moved.bin", "copy.bin"] {
        let (shared, text) = has_shared_extents(&w.stored(name));
        assert!(shared, "{name} shares no extent:\n{text}");
    }
    // The clones count for their metadata in the usage log (an extent item
    // of 256 bytes per 128 KiB), not as nothing: cloned by the thousand,
    // 100 bytes each on the wire, they filled it unseen by the guard.
    let usage = fs::read_to_string(w.store.join("moves/.byteback-usage")).unwrap();
    let grown: u64 = usage
        .lines()
        .rfind(|l| l.split_whitespace().nth(2) == Some("-"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(grown >= 2 * (BIG / (128 << 10)) * 256, "{grown}: {usage}");
    assert!(grown < BIG / 10, "{grown}: {usage}");
    w.assert_restores_exactly("moved");
}

#[test]
fn an_insertion_near_the_start_costs_about_the_inserted_bytes() {
    if !require_root("moves (btrfs loop device)") {
        return;
    }
    let w = world();
    let mut rng = Rng::new(0x7007);
    let p = w.src.join("shifted.bin");
    write_random(&p, BIG, &mut rng);
    w.backup();
    // 7 bytes inserted at offset 1000: everything after moves by 7.
    let old = fs::read(&p).unwrap();
    let mut new = old[..1000].to_vec();
    new.extend_from_slice(b"INSERT!");
    new.extend_from_slice(&old[1000..]);
    fs::File::create(&p).unwrap().write_all_at(&new, 0).unwrap();
    drop((old, new));
    let err = w.backup();
    let wire = summary_number(&err, " on the wire").unwrap_or(0);
    eprintln!("insertion: {wire} bytes on the wire");
    // One 8 KiB block around the insertion travels as literal; a block per
    // 4 MiB segment (12 of them) would be about 100 KiB.
    assert!(wire < 32 << 10, "{wire} bytes on the wire:\n{err}");
    w.assert_restores_exactly("shifted");
}

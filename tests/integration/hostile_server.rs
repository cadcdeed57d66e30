//! Hostile servers: the real `byteback-restore`, run as root, against the
//! scripted `byteback-fake-server` (tests/support/fake_server.rs), which
//! answers with crafted snapshot names, manifests and file data.
//!
//! Every test plants a [`Sentinel`] in `<scratch>/outside`, the directory the
//! attacks aim at, and restores from `<scratch>/work`. After each attack the
//! restore must have failed with a clear message (or, where the input is
//! legal, done only what it asked for) and the sentinel directory must be
//! untouched: contents, modes, owners, xattrs (ctime) and link counts.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

use crate::util;

#[path = "../support/scenario.rs"]
mod scenario;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use byteback_delta::hash_bytes;
use byteback_protocol::{Entry, Kind, ManifestEntry};
use scenario::{Scenario, SCENARIO_ENV};

use util::*;

/// The snapshot the scenarios list.
const SNAP: &str = "2026-11-27T03:00+0000";
/// A snapshot before it, for scenarios of several snapshots.
const OLD: &str = "2026-11-26T03:00+0000";
/// A restore still running after this long has hung: it is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(120);

/// One attack's surroundings: scratch, the sentinel outside, the restore's cwd.
struct Stage {
    dir: tempfile::TempDir,
    sentinel: Sentinel,
}

/// What a restore run left.
struct Ran {
    code: Option<i32>,
    stderr: String,
}

impl Ran {
    fn assert_failed(&self, needles: &[&str]) {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "restore should have failed: exit {:?}\n{}",
            self.code,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "restore panicked:\n{}",
            self.stderr
        );
        let low = self.stderr.to_lowercase();
        assert!(
            needles.iter().any(|n| low.contains(&n.to_lowercase())),
            "expected one of {needles:?} in:\n{}",
            self.stderr
        );
    }

    fn assert_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "stderr:\n{}", self.stderr);
    }
}

impl Stage {
    fn new() -> Stage {
        let dir = scratch();
        fs::create_dir(dir.path().join("outside")).unwrap();
        fs::create_dir(dir.path().join("work")).unwrap();
        fs::create_dir(dir.path().join("store")).unwrap();
        let sentinel = Sentinel::plant(&dir.path().join("outside"));
        Stage { dir, sentinel }
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// `work/<SNAP>/<rel>`.
    fn restored(&self, rel: &str) -> PathBuf {
        self.restored_in(SNAP, rel)
    }

    /// `work/<snap>/<rel>`.
    fn restored_in(&self, snap: &str, rel: &str) -> PathBuf {
        self.work().join(snap).join(rel)
    }

    /// Empties `work`.
    fn clear_work(&self) {
        fs::remove_dir_all(self.work()).unwrap();
        fs::create_dir(self.work()).unwrap();
    }

    /// Runs `byteback-restore --restore ARGS` against the scripted server.
    fn restore(&self, sc: &Scenario, args: &[&str]) -> Ran {
        self.restore_limited(sc, args, None)
    }

    /// Runs `byteback-restore --list ARGS` against the scripted server.
    fn list_limited(&self, sc: &Scenario, args: &[&str], data_limit: Option<u64>) -> Ran {
        let args: Vec<&str> = ["--list"].iter().chain(args).copied().collect();
        self.run_limited(sc, &args, data_limit)
    }

    /// Runs `byteback-restore --restore ARGS` (`--list ARGS` when they start with it).
    fn run_limited(&self, sc: &Scenario, args: &[&str], data_limit: Option<u64>) -> Ran {
        self.restore_cmd(Command::new(bin("byteback-restore")), sc, args, data_limit)
    }

    fn restore_limited(&self, sc: &Scenario, args: &[&str], data_limit: Option<u64>) -> Ran {
        self.run_limited(sc, args, data_limit)
    }

    /// [`Self::restore_limited`] of `cmd`: byteback-restore, or a wrapper
    /// running it.
    fn restore_cmd(
        &self,
        cmd: Command,
        sc: &Scenario,
        args: &[&str],
        data_limit: Option<u64>,
    ) -> Ran {
        let mut child = self.spawn_restore(cmd, sc, args, data_limit);
        let mut err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut err, &mut s).unwrap();
            s
        });
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("byteback-restore hung for {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ran {
            code: status.code(),
            stderr: reader.join().unwrap(),
        }
    }

    /// `byteback-restore --json` through a shell writing its stdout (the
    /// report) to the file returned (`spawn_restore` drops stdout).
    fn json_restore(&self) -> (PathBuf, Command) {
        let json = self.dir.path().join("report.json");
        let mut wrapper = Command::new("sh");
        wrapper
            .args(["-c", "exec \"$0\" --json \"$@\" >\"$JSON_OUT\""])
            .arg(bin("byteback-restore"))
            .env("JSON_OUT", &json);
        (json, wrapper)
    }

    /// Starts `cmd` (byteback-restore, or a wrapper running it) as
    /// `--restore ARGS` (`--list ...` as it is) against the scripted
    /// server, stderr piped.
    fn spawn_restore(
        &self,
        mut cmd: Command,
        sc: &Scenario,
        args: &[&str],
        data_limit: Option<u64>,
    ) -> std::process::Child {
        let script = self.dir.path().join("scenario.bin");
        let bytes = bincode::serde::encode_to_vec(sc, bincode::config::standard()).unwrap();
        fs::write(&script, bytes).unwrap();
        cmd.arg("--destination")
            .arg(self.dir.path().join("store"))
            .args(["--hostname", "victim"])
            .args((args.first() != Some(&"--list")).then_some("--restore"))
            .args(args)
            .current_dir(self.work())
            .env("BYTEBACK_SERVER", bin("byteback-fake-server"))
            .env(SCENARIO_ENV, &script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = data_limit {
            limit_data(&mut cmd, limit);
        }
        cmd.spawn().unwrap()
    }
}

fn entry(path: &str, kind: Kind) -> ManifestEntry {
    ManifestEntry {
        entry: Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 0,
            xattrs: vec![],
        },
        hash: [0; 32],
    }
}

/// A btrfs filesystem bind-mounted over a stage's `work` (restores go
/// there): unmounted when dropped, a swap file on it swapped off first.
struct BtrfsWork {
    work: PathBuf,
    /// A file on it given to `swapon`.
    swap: Option<PathBuf>,
    _fs: util::BtrfsLoop,
}

impl BtrfsWork {
    fn mount(st: &Stage) -> BtrfsWork {
        let fs_ = util::BtrfsLoop::new(256);
        util::run(
            Command::new("mount")
                .arg("--bind")
                .arg(&fs_.mount)
                .arg(st.work()),
        );
        BtrfsWork {
            work: st.work(),
            swap: None,
            _fs: fs_,
        }
    }
}

impl Drop for BtrfsWork {
    fn drop(&mut self) {
        if let Some(swap) = &self.swap {
            let _ = Command::new("swapoff").arg(swap).status();
        }
        let _ = Command::new("umount").arg(&self.work).status();
    }
}

fn dir(path: &str) -> ManifestEntry {
    let mut e = entry(path, Kind::Dir);
    e.entry.mode = 0o755;
    e
}

/// A regular file whose manifest size and hash match `data`.
fn file(path: &str, data: &[u8]) -> ManifestEntry {
    let mut e = entry(
        path,
        Kind::File {
            size: data.len() as u64,
        },
    );
    e.hash = hash_bytes(data);
    e
}

fn symlink(path: &str, target: &Path) -> ManifestEntry {
    entry(
        path,
        Kind::Symlink {
            target: target.as_os_str().as_encoded_bytes().to_vec(),
        },
    )
}

fn hardlink(path: &str, target: &str) -> ManifestEntry {
    entry(
        path,
        Kind::HardLink {
            target: target.as_bytes().to_vec(),
        },
    )
}

/// A scenario whose one snapshot's manifest is `entries` (one part) and whose files are `files`.
fn scenario(entries: Vec<ManifestEntry>, files: &[(&str, &[u8])]) -> Scenario {
    Scenario {
        host: "victim".into(),
        snapshots: vec![SNAP.into()],
        parts: vec![entries],
        files: files
            .iter()
            .map(|(p, d)| (p.as_bytes().to_vec(), d.to_vec()))
            .collect(),
        ..Default::default()
    }
}

/// [`scenario`] with file contents built at run time.
fn scenario_of(entries: Vec<ManifestEntry>, files: &[(String, Vec<u8>)]) -> Scenario {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (p.as_str(), &d[..])).collect();
    scenario(entries, &files)
}

/// One snapshot of a scripted server: name, manifest (one part), file contents.
type Snap<'a> = (&'a str, Vec<ManifestEntry>, &'a [(&'a str, &'a [u8])]);

/// A scenario of several snapshots, oldest first, each with its own
/// manifest and its own file contents.
fn snapshots_scenario(snaps: Vec<Snap<'_>>) -> Scenario {
    let mut sc = scenario(vec![], &[]);
    sc.snapshots = snaps.iter().map(|(s, ..)| s.to_string()).collect();
    for (s, entries, files) in snaps {
        sc.manifests.push((s.to_string(), vec![entries]));
        for (p, d) in files {
            sc.snapshot_files
                .push((s.to_string(), p.as_bytes().to_vec(), d.to_vec()));
        }
    }
    sc
}

/// `/` restores everything (the restore's patterns are absolute).
const ALL: &str = "/";

#[test]
fn hostile_snapshot_names_are_refused() {
    if !require_root("hostile_snapshot_names_are_refused") {
        return;
    }
    let st = Stage::new();
    let outside = st.outside();
    for name in [
        outside.to_str().unwrap().to_string(),
        "../outside".to_string(),
        "..".to_string(),
        "a/../../outside".to_string(),
        "x\u{1b}[2J".to_string(),
    ] {
        let mut sc = scenario(vec![file("SENTINEL", b"evil")], &[("SENTINEL", b"evil")]);
        sc.snapshots = vec![name.clone()];
        let r = st.restore(&sc, &[ALL]);
        r.assert_failed(&["invalid snapshot name"]);
        assert!(
            !r.stderr.contains('\u{1b}'),
            "escape reached the terminal: {name:?}"
        );
        st.sentinel.assert_untouched();
    }
    assert_eq!(
        fs::read_dir(st.work()).unwrap().count(),
        0,
        "restore created something"
    );
    // A valid name that is not a snapshot's: a restore run in `/` would
    // write into (and lock down) `/etc`.
    let etc = st.work().join("etc");
    fs::create_dir(&etc).unwrap();
    fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).unwrap();
    let mut sc = scenario(vec![file("cron", b"evil")], &[("cron", b"evil")]);
    sc.snapshots = vec!["etc".into()];
    let r = st.restore(&sc, &[ALL]);
    r.assert_failed(&["which is not a snapshot's name"]);
    assert_eq!(fs::read_dir(&etc).unwrap().count(), 0, "wrote into ./etc");
    assert_eq!(fs::metadata(&etc).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn hostile_entry_paths_are_refused() {
    if !require_root("hostile_entry_paths_are_refused") {
        return;
    }
    let st = Stage::new();
    let abs = format!("{}/SENTINEL", st.outside().display());
    for (path, why) in [
        ("../../outside/SENTINEL", "dot component"),
        (abs.as_str(), "absolute"),
        ("a//b", "empty component"),
        ("./x", "dot component"),
    ] {
        let sc = scenario(vec![file(path, b"evil")], &[(path, b"evil")]);
        let r = st.restore(&sc, &[ALL]);
        r.assert_failed(&[&format!("invalid path {path:?}: {why}")]);
        st.sentinel.assert_untouched();
    }
}

#[test]
fn out_of_order_and_repeated_entries_are_refused() {
    if !require_root("out_of_order_and_repeated_entries_are_refused") {
        return;
    }
    let st = Stage::new();
    let outside = st.outside();
    let mut evil_link = hardlink("z", "x/secret");
    evil_link.entry.mode = 0o4777;
    evil_link.entry.uid = 4321;
    evil_link.entry.xattrs = vec![(b"user.evil".to_vec(), b"1".to_vec())];
    let cases: Vec<(&str, Vec<ManifestEntry>, &[&str])> = vec![
        // The attack from the issue: a child first, so its parent would be
        // made a directory, then the parent as a symlink outside, then a
        // setuid hard link through it.
        (
            "child before parent",
            vec![
                file("x/secret", b"s"),
                symlink("x", &outside),
                evil_link.clone(),
            ],
            &["without its parent"],
        ),
        (
            "directory then symlink at the same path",
            vec![
                dir("x"),
                file("x/secret", b"s"),
                symlink("x", &outside),
                evil_link.clone(),
            ],
            &["out of order"],
        ),
        (
            "repeated file",
            vec![file("a", b"1"), file("a", b"1")],
            &["out of order"],
        ),
        (
            "backwards",
            vec![file("b", b"1"), file("a", b"1")],
            &["out of order"],
        ),
        (
            "child of a symlink",
            vec![symlink("x", &outside), file("x/SENTINEL", b"evil")],
            &["without its parent"],
        ),
    ];
    for (what, entries, needles) in cases {
        let sc = scenario(
            entries,
            &[
                ("x/secret", b"s"),
                ("a", b"1"),
                ("b", b"1"),
                ("x/SENTINEL", b"evil"),
            ],
        );
        let r = st.restore(&sc, &[ALL]);
        println!("{what}: {}", r.stderr.trim());
        r.assert_failed(needles);
        st.sentinel.assert_untouched();
    }
}

#[test]
fn hard_links_only_to_files_restored_in_this_run() {
    if !require_root("hard_links_only_to_files_restored_in_this_run") {
        return;
    }
    let st = Stage::new();
    let outside = st.outside();
    let mut dev = entry(
        "a",
        Kind::CharDev {
            rdev: rustix::fs::makedev(1, 3),
        },
    );
    dev.entry.mode = 0o600;
    // Links to a symlink or a device made in this run are made (protocol
    // 11: rsync's -H keeps them): a second name of the same inode, which
    // points where it pointed, outside included, and writes nothing there;
    // unselected, its one taken name is made as the object itself.
    let to_symlink = || vec![symlink("a", &outside.join("SENTINEL")), hardlink("b", "a")];
    let allowed: Vec<(&str, Vec<ManifestEntry>, &str, bool)> = vec![
        ("to a symlink", to_symlink(), ALL, true),
        (
            "to a device",
            vec![dev.clone(), hardlink("b", "a")],
            ALL,
            true,
        ),
        ("to an unselected symlink", to_symlink(), "/b", false),
        (
            "to an unselected device",
            vec![dev, hardlink("b", "a")],
            "/b",
            false,
        ),
    ];
    for (what, entries, pattern, linked) in allowed {
        st.clear_work();
        let sc = scenario(entries, &[]);
        let r = st.restore(&sc, &[pattern]);
        assert_eq!(r.code, Some(0), "{what}: {}", r.stderr);
        st.sentinel.assert_untouched();
        let b = fs::symlink_metadata(st.restored("b")).unwrap();
        assert!(!b.is_file() && !b.is_dir(), "{what}: {b:?}");
        match linked {
            true => assert_eq!(
                fs::symlink_metadata(st.restored("a")).unwrap().ino(),
                b.ino(),
                "{what}"
            ),
            false => assert!(fs::symlink_metadata(st.restored("a")).is_err(), "{what}"),
        }
    }
    st.clear_work();
    let cases: Vec<(&str, Vec<ManifestEntry>, &str)> = vec![
        ("to a directory", vec![dir("a"), hardlink("b", "a")], ALL),
        (
            "to a path not in the manifest",
            vec![hardlink("b", "a")],
            ALL,
        ),
        (
            "through a symlink",
            vec![symlink("x", &outside), hardlink("y", "x/SENTINEL")],
            ALL,
        ),
        (
            "to an unselected path not in the manifest",
            vec![hardlink("b", "a")],
            "/b",
        ),
        (
            "to an unselected directory",
            vec![dir("a"), hardlink("b", "a")],
            "/b",
        ),
    ];
    for (what, entries, pattern) in cases {
        let sc = scenario(entries, &[]);
        let r = st.restore(&sc, &[pattern]);
        println!("{what}: {}", r.stderr.trim());
        r.assert_failed(&["links", "refusing"]);
        st.sentinel.assert_untouched();
        let b = st.restored("b");
        assert!(
            fs::symlink_metadata(&b).is_err(),
            "{what}: {} was made",
            b.display()
        );
    }
}

#[test]
fn file_data_never_beyond_the_manifest_and_bad_files_removed() {
    if !require_root("file_data_never_beyond_the_manifest_and_bad_files_removed") {
        return;
    }
    let st = Stage::new();
    // 64 MiB for a 1-byte entry: refused at the first chunk, nothing left;
    // as the first file read (a zstd frame) and the second (raw bytes; see
    // the fake server).
    let big = vec![7u8; 64 << 20];
    for first in [None, Some("e")] {
        let mut entries = vec![file("f", b"x")];
        let mut files: Vec<(&str, &[u8])> = vec![("f", &big)];
        if let Some(e) = first {
            entries.insert(0, file(e, b"y"));
            files.push((e, b"y"));
        }
        let sc = scenario(entries, &files);
        let r = st.restore(&sc, &[ALL]);
        r.assert_failed(&["more than the 1 bytes"]);
        assert!(
            fs::symlink_metadata(st.restored("f")).is_err(),
            "f left behind"
        );
        let _ = fs::remove_file(st.restored("e"));
    }

    // A file whose content fails its BLAKE3 is removed and reported, the
    // rest is restored, and the exit code says so.
    let sc = scenario(
        vec![
            dir("d"),
            file("d/bad", b"hello"),
            file("d/bad2", b"world"),
            file("d/good", b"fine"),
            file("d/short", b"12345678"),
            file("e", b"after"),
        ],
        // Sent as a zstd frame, raw, a frame, raw, a frame.
        &[
            ("d/bad", b"HELLO"),
            ("d/bad2", b"WORLD"),
            ("d/good", b"fine"),
            ("d/short", b"1234"),
            ("e", b"after"),
        ],
    );
    let r = st.restore(&sc, &[ALL]);
    r.assert_code(1);
    assert!(
        r.stderr.contains("DAMAGED: ./2026-11-27T03:00+0000/d/bad"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("d/short"), "{}", r.stderr);
    assert!(r.stderr.contains("d/bad2"), "{}", r.stderr);
    for bad in ["d/bad", "d/bad2"] {
        assert!(
            fs::symlink_metadata(st.restored(bad)).is_err(),
            "{bad} kept"
        );
    }
    assert!(
        fs::symlink_metadata(st.restored("d/short")).is_err(),
        "short file kept"
    );
    assert_eq!(fs::read(st.restored("d/good")).unwrap(), b"fine");
    assert_eq!(fs::read(st.restored("e")).unwrap(), b"after");

    // Restoring over that tree: a file is written beside its name and put
    // in place only once verified, so one that fails keeps what was there.
    let sc = scenario(
        vec![dir("d"), file("d/good", b"new!"), file("e", b"AFTER")],
        &[("d/good", b"NEW!"), ("e", b"AFTER")],
    );
    let r = st.restore(&sc, &[ALL]);
    r.assert_code(1);
    assert!(
        r.stderr.contains("DAMAGED: ./2026-11-27T03:00+0000/d/good"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(st.restored("d/good")).unwrap(), b"fine");
    assert_eq!(fs::read(st.restored("e")).unwrap(), b"AFTER");
    for d in [st.restored("."), st.restored("d")] {
        let left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".byteback-restore"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", d.display());
    }

    // Empty parts, which would keep a restore busy for ever: refused.
    let mut sc = scenario(vec![file("z", b"zz")], &[("z", b"zz")]);
    sc.empty_parts = 3;
    let r = st.restore(&sc, &[ALL]);
    r.assert_failed(&["empty part"]);
    // Empty manifest parts, likewise.
    let mut sc = scenario(vec![file("z", b"zz")], &[("z", b"zz")]);
    sc.empty_manifest_parts = 3;
    let r = st.restore(&sc, &[ALL]);
    r.assert_failed(&["manifest part empty"]);
    st.sentinel.assert_untouched();
}

#[test]
fn a_flood_of_manifest_parts_stays_in_bounded_memory() {
    if !require_root("a_flood_of_manifest_parts_stays_in_bounded_memory") {
        return;
    }
    let st = Stage::new();
    // 25,000 selected (empty) files, each with a 3,000-byte xattr: 75 MB of
    // entries. A client holding them all at once does not fit in 72 MiB; this
    // one restores them in passes of at most CHUNK_BYTES (32 MiB) held.
    let mut sc = scenario(vec![dir("flood")], &[]);
    sc.flood_parts = 25;
    sc.flood_xattr_len = 3000;
    let r = st.restore_limited(&sc, &[ALL], Some(72 << 20));
    r.assert_code(0);
    let flood = st.restored("flood");
    assert_eq!(fs::read_dir(&flood).unwrap().count(), 25_000);
    let last = flood.join("000000024999");
    assert_eq!(
        xattrs(&last),
        vec![(b"user.flood".to_vec(), vec![b'x'; 3000])]
    );
    // 300,000 entries that the pattern does not select are checked and
    // dropped as they stream by, in even less memory.
    let mut sc = scenario(vec![dir("flood")], &[]);
    sc.flood_parts = 300;
    let r = st.restore_limited(&sc, &["/nothing-here"], Some(32 << 20));
    r.assert_failed(&["nothing in snapshot"]);
    st.sentinel.assert_untouched();
}

/// A server flooding a 1.x manifest with notes on paths it left out
/// (30,000 of them, each near 8 KiB: a path near 4 KiB and a 4,000-byte
/// message) is not held: a restore or listing warns of the first 1,000,
/// counts the rest, and stays in bounded memory (it held every one: 780 MB
/// for 100,000). Patterns that reach none of them get a clean run.
#[test]
fn a_flood_of_manifest_notes_stays_in_bounded_memory() {
    if !require_root("a_flood_of_manifest_notes_stays_in_bounded_memory") {
        return;
    }
    let st = Stage::new();
    let mut sc = scenario(vec![dir("flood"), file("z", b"zz")], &[("z", b"zz")]);
    sc.legacy = true;
    sc.flood_notes = 30_000;
    sc.flood_note_len = 4000;
    let limit = Some(64 << 20);
    let shown = |r: &Ran| {
        r.stderr
            .lines()
            .filter(|l| l.contains("/flood/skipped-"))
            .count()
    };
    let r = st.restore_limited(&sc, &[ALL], limit);
    r.assert_code(24);
    assert_eq!(fs::read(st.restored("z")).unwrap(), b"zz");
    assert_eq!(shown(&r), 1000, "{}", &r.stderr[..2000]);
    assert!(
        r.stderr.contains("29000 more"),
        "{}",
        &r.stderr[r.stderr.len() - 2000..]
    );
    let r = st.list_limited(&sc, &[ALL], limit);
    r.assert_code(24);
    assert_eq!(shown(&r), 1000, "{}", &r.stderr[..2000]);
    assert!(
        r.stderr.contains("29000 more"),
        "{}",
        &r.stderr[r.stderr.len() - 2000..]
    );
    st.clear_work();
    let r = st.restore_limited(&sc, &["/z"], limit);
    r.assert_code(0);
    let r = st.list_limited(&sc, &["/z"], limit);
    r.assert_code(0);
    st.sentinel.assert_untouched();
}

/// Notes come only with a 1.x snapshot's manifest, which the server
/// derives from its tree: one in a byteback snapshot's is refused.
#[test]
fn a_manifest_note_in_a_byteback_snapshot_is_refused() {
    if !require_root("a_manifest_note_in_a_byteback_snapshot_is_refused") {
        return;
    }
    let st = Stage::new();
    let mut sc = scenario(vec![dir("flood"), file("z", b"zz")], &[("z", b"zz")]);
    sc.flood_notes = 1;
    sc.flood_note_len = 10;
    st.restore(&sc, &[ALL])
        .assert_failed(&["whose manifest never has one"]);
    st.list_limited(&sc, &[ALL], None)
        .assert_failed(&["whose manifest never has one"]);
    sc.legacy = true;
    st.clear_work();
    st.restore(&sc, &[ALL]).assert_code(24);
    st.sentinel.assert_untouched();
}

/// A pattern among several that matches nothing (a typo) is named in a
/// warning and the restore ends partial (24), the rest restored; listing
/// the same way names it too.
#[test]
fn a_pattern_that_matches_nothing_is_named() {
    if !require_root("a_pattern_that_matches_nothing_is_named") {
        return;
    }
    let st = Stage::new();
    let sc = scenario(
        vec![file("a", b"A"), file("b", b"B")],
        &[("a", b"A"), ("b", b"B")],
    );
    let r = st.restore(&sc, &["/a", "/typo"]);
    r.assert_code(24);
    assert!(
        r.stderr.contains("pattern \"/typo\" matches nothing"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(st.restored("a")).unwrap(), b"A");
    assert!(fs::symlink_metadata(st.restored("b")).is_err());
    st.sentinel.assert_untouched();
}

#[test]
fn planted_symlinks_in_the_restore_directory() {
    if !require_root("planted_symlinks_in_the_restore_directory") {
        return;
    }
    let st = Stage::new();
    let entries = vec![dir("etc"), file("etc/SENTINEL", b"evil"), file("top", b"t")];
    let files: &[(&str, &[u8])] = &[("etc/SENTINEL", b"evil"), ("top", b"t")];

    // ./<snapshot> itself a symlink: refused, nothing written through it.
    std::os::unix::fs::symlink(st.outside(), st.work().join(SNAP)).unwrap();
    let r = st.restore(&scenario(entries.clone(), files), &[ALL]);
    r.assert_failed(&["refusing to restore through it"]);
    st.sentinel.assert_untouched();
    fs::remove_file(st.work().join(SNAP)).unwrap();

    // An intermediate directory planted as a symlink: replaced by a real
    // directory, the restore goes on, nothing outside changes.
    fs::create_dir(st.work().join(SNAP)).unwrap();
    std::os::unix::fs::symlink(st.outside(), st.restored("etc")).unwrap();
    std::os::unix::fs::symlink(st.outside().join("SENTINEL"), st.restored("top")).unwrap();
    let r = st.restore(&scenario(entries, files), &[ALL]);
    r.assert_code(0);
    assert!(fs::symlink_metadata(st.restored("etc")).unwrap().is_dir());
    assert_eq!(fs::read(st.restored("etc/SENTINEL")).unwrap(), b"evil");
    assert!(fs::symlink_metadata(st.restored("top")).unwrap().is_file());
    st.sentinel.assert_untouched();
}

/// `./<snapshot>` made by the restore just now, but replaced by another
/// user's between the mkdir and the open (simulated in debug builds by
/// `BYTEBACK_TEST_SWAP_NEW_DIR_UID`): refused where others could have done
/// so, in a directory others may write in without the sticky bit or one
/// another user owns; in root's own directory nobody else could, and the
/// new directory is not second-guessed (root's is not root's on an NFS
/// export that squashes root).
#[test]
fn a_new_snapshot_directory_swapped_where_others_can_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    if !require_root("a_new_snapshot_directory_swapped_where_others_can_is_refused") {
        return;
    }
    let st = Stage::new();
    let sc = scenario(vec![file("top", b"t")], &[("top", b"t")]);
    let swapped = || {
        let mut cmd = Command::new(bin("byteback-restore"));
        cmd.env("BYTEBACK_TEST_SWAP_NEW_DIR_UID", "1234");
        st.restore_cmd(cmd, &sc, &[ALL], None)
    };
    let work = st.work();
    for (mode, uid) in [(0o777, 0), (0o755, 1234)] {
        fs::set_permissions(&work, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&work, Some(uid), Some(uid)).unwrap();
        let r = swapped();
        r.assert_failed(&[
            "was made just now",
            "replaced as it was made",
            "not this user's alone",
        ]);
        assert!(fs::symlink_metadata(st.restored("top")).is_err());
        fs::remove_dir(work.join(SNAP)).unwrap();
    }
    std::os::unix::fs::chown(&work, Some(0), Some(0)).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o1777)).unwrap();
    swapped().assert_code(0);
    assert_eq!(fs::read(st.restored("top")).unwrap(), b"t");
    st.sentinel.assert_untouched();
}

/// `./<snapshot>` planted by another user (root restoring in a shared
/// directory such as /tmp), or one others may write in: refused, since its
/// owner could swap what is restored into it and got it back at the end.
#[test]
fn a_snapshot_directory_planted_by_another_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    if !require_root("a_snapshot_directory_planted_by_another_user_is_refused") {
        return;
    }
    let st = Stage::new();
    let sc = scenario(vec![file("top", b"t")], &[("top", b"t")]);
    let planted = st.work().join(SNAP);
    fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(1234), Some(1234)).unwrap();
    let r = st.restore(&sc, &[ALL]);
    r.assert_failed(&["not this user's alone"]);
    assert!(fs::symlink_metadata(planted.join("top")).is_err());
    std::os::unix::fs::chown(&planted, Some(0), Some(0)).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o777)).unwrap();
    let r = st.restore(&sc, &[ALL]);
    r.assert_failed(&["not this user's alone"]);
    // This user's own, as an earlier restore leaves it: restored into.
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o755)).unwrap();
    st.restore(&sc, &[ALL]).assert_code(0);
    assert_eq!(fs::read(planted.join("top")).unwrap(), b"t");
    st.sentinel.assert_untouched();
}

#[test]
fn swapping_restored_directories_for_symlinks_while_restoring() {
    if !require_root("swapping_restored_directories_for_symlinks_while_restoring") {
        return;
    }
    let st = Stage::new();
    let mut entries = vec![dir("d")];
    let mut files: Vec<(String, Vec<u8>)> = vec![];
    for i in 0..60 {
        let p = format!("d/f{i:02}");
        let data = format!("content {i}").into_bytes();
        let mut e = file(&p, &data);
        e.entry.mode = 0o4755;
        e.entry.uid = 4321;
        e.entry.xattrs = vec![(b"user.x".to_vec(), b"y".to_vec())];
        entries.push(e);
        files.push((p, data));
    }
    let mut sc = scenario_of(entries, &files);
    sc.file_delay_ms = 15;
    let stop = Arc::new(AtomicBool::new(false));
    let racer = {
        let stop = stop.clone();
        let d = st.restored("d");
        let moved = st.restored("d.moved");
        let root = st.work().join(SNAP);
        let outside = st.outside();
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if fs::rename(&d, &moved).is_ok() {
                    let _ = std::os::unix::fs::symlink(&outside, &d);
                    std::thread::sleep(Duration::from_millis(3));
                    let _ = fs::remove_file(&d);
                    let _ = fs::rename(&moved, &d);
                    swaps += 1;
                }
                // The root too, now and then.
                if swaps % 7 == 3 {
                    let side = root.with_extension("moved");
                    if fs::rename(&root, &side).is_ok() {
                        let _ = std::os::unix::fs::symlink(&outside, &root);
                        std::thread::sleep(Duration::from_millis(2));
                        let _ = fs::remove_file(&root);
                        let _ = fs::rename(&side, &root);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            swaps
        })
    };
    // Several restores under the race: each may fail (it refuses to go
    // through a symlink) or succeed; none may reach outside.
    for round in 0..4 {
        let r = st.restore(&sc, &[ALL]);
        println!("round {round}: exit {:?}: {}", r.code, r.stderr.trim());
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        st.sentinel.assert_untouched();
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = racer.join().unwrap();
    println!("{swaps} swaps");
    assert!(swaps > 10, "the race did not run ({swaps} swaps)");
    st.sentinel.assert_untouched();
    // Whatever the race did, every file restored is where the restore put it.
    for (p, d) in &files {
        if let Ok(got) = fs::read(st.restored(p)) {
            assert_eq!(&got, d);
        }
    }
}

/// A restore asks for the next files while the current one's content is
/// on its way (a restore of small files used to wait a round trip for each);
/// the answers, taken in order, land where they belong: empty files (never
/// asked for: the server has nothing for them and would answer an error), a
/// file of several parts among small ones, links and a symlink in between.
/// The scripted server holds each answer back until the next request
/// comes: a client that waited for each answer before asking for the next
/// would get none of them early (and take half a second a file).
#[test]
fn a_restore_asks_for_files_ahead_and_takes_the_answers_in_order() {
    if !require_root("a_restore_asks_for_files_ahead_and_takes_the_answers_in_order") {
        return;
    }
    let st = Stage::new();
    let mut entries = vec![dir("d")];
    let mut files: Vec<(String, Vec<u8>)> = vec![];
    for i in 0..300 {
        let p = format!("d/f{i:03}");
        let data = match i {
            _ if i % 50 == 7 => vec![],
            150 => (0..3_500_000u32)
                .map(|k| (k * 7 + k / 1000) as u8)
                .collect(),
            _ => format!("content of file {i} ")
                .repeat(1 + i % 9)
                .into_bytes(),
        };
        entries.push(file(&p, &data));
        if i % 40 == 5 {
            entries.push(hardlink(&format!("d/f{i:03}.link"), &p));
        }
        if i == 100 {
            entries.push(symlink("d/f100.sym", Path::new("f100")));
        }
        if !data.is_empty() {
            files.push((p, data));
        }
    }
    let mut sc = scenario_of(entries, &files);
    sc.hold_answers_ms = 500;
    let r = st.restore(&sc, &[ALL]);
    r.assert_code(0);
    for (p, d) in &files {
        assert_eq!(&fs::read(st.restored(p)).unwrap(), d, "{p}");
    }
    assert_eq!(fs::metadata(st.restored("d/f007")).unwrap().len(), 0);
    assert_eq!(
        fs::read(st.restored("d/f045.link")).unwrap(),
        fs::read(st.restored("d/f045")).unwrap()
    );
    assert_eq!(
        fs::read_link(st.restored("d/f100.sym")).unwrap(),
        Path::new("f100")
    );
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("files were asked for ahead"))
        .unwrap_or_else(|| panic!("no count from the fake server: {}", r.stderr));
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(n.len(), 2, "{line}");
    let (ahead, reads) = (n[0], n[1]);
    assert_eq!(reads, files.len() as u64, "{line}");
    // Every one but the last: nothing comes after it to ask for.
    assert_eq!(ahead, reads - 1, "{line}");
}

/// Hard links whose first names the patterns do not select get those
/// files' content under their own names; what the restore keeps of each
/// first name is its size and hash, not its entry: 8,000 first names with
/// 16 KiB of xattrs each (128 MiB of entries) and a link to each restore
/// under a 96 MiB data limit (before, every first name's entry was held
/// whole, and the client ran out of memory).
#[test]
fn first_names_of_selected_links_are_looked_up_in_bounded_memory() {
    if !require_root("first_names_of_selected_links_are_looked_up_in_bounded_memory") {
        return;
    }
    let st = Stage::new();
    let mut sc = scenario(vec![dir("flood")], &[]);
    sc.flood_parts = 8;
    sc.flood_xattr_len = 16 << 10;
    sc.flood_links = 8000;
    let r = st.restore_limited(&sc, &["/zlinks"], Some(96 << 20));
    r.assert_code(0);
    let links = st.restored("zlinks");
    assert_eq!(fs::read_dir(&links).unwrap().count(), 8000);
    let one = fs::metadata(links.join("000000007999")).unwrap();
    assert!(one.is_file() && one.len() == 0);
    assert!(fs::symlink_metadata(st.restored("flood")).is_err());
    st.sentinel.assert_untouched();
}

/// Two selected hard links to a first name the patterns leave out, whose
/// content fails verification: the first link gets the (damaged, removed)
/// copy, the second is reported damaged with it, and the rest of the
/// restore goes on (before, the second link ended the whole restore with
/// "links ... which is not a file restored in this run").
#[test]
fn links_to_a_damaged_first_name_are_reported_and_the_restore_goes_on() {
    if !require_root("links_to_a_damaged_first_name_are_reported_and_the_restore_goes_on") {
        return;
    }
    let st = Stage::new();
    let entries = vec![
        file("lonely", b"first name"),
        hardlink("z-a", "lonely"),
        hardlink("z-b", "lonely"),
        file("z-c", b"fine"),
    ];
    let sc = scenario(entries, &[("lonely", b"CORRUPTED!"), ("z-c", b"fine")]);
    let r = st.restore(&sc, &["/z-*"]);
    r.assert_code(1);
    for name in ["z-a", "z-b"] {
        assert!(
            r.stderr.contains(&format!("DAMAGED: ./{SNAP}/{name}")),
            "{name}: {}",
            r.stderr
        );
        assert!(
            fs::symlink_metadata(st.restored(name)).is_err(),
            "{name} kept"
        );
    }
    assert!(
        r.stderr.contains("2 files failed verification"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(st.restored("z-c")).unwrap(), b"fine");
    st.sentinel.assert_untouched();
}

/// A restore over a directory that was there leaves it exactly the
/// backup's xattrs: those set on it since (a `user.` one, a `trusted.`
/// one, a default ACL) are removed, and one the backup has gets the
/// backup's value; a file created in it does not keep the ACL it would
/// inherit. They stayed.
#[test]
fn a_restore_over_an_existing_directory_removes_the_xattrs_the_backup_lacks() {
    if !require_root("a_restore_over_an_existing_directory_removes_the_xattrs (trusted.*)") {
        return;
    }
    let st = Stage::new();
    let d = st.restored("d");
    fs::create_dir_all(&d).unwrap();
    for (name, value) in [
        ("user.stale", "old"),
        ("user.keep", "old"),
        ("trusted.stale", "old"),
    ] {
        rustix::fs::setxattr(&d, name, value.as_bytes(), rustix::fs::XattrFlags::empty()).unwrap();
    }
    util::run(
        Command::new("setfacl")
            .args(["-d", "-m", "u:1000:rwx"])
            .arg(&d),
    );
    let mut entry = dir("d");
    entry.entry.xattrs = vec![(b"user.keep".to_vec(), b"new".to_vec())];
    let entries = vec![entry, file("d/f", b"x")];
    let r = st.restore(&scenario(entries, &[("d/f", b"x")]), &[ALL]);
    r.assert_code(0);
    let xattrs = |p: &Path| {
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::listxattr(p, &mut buf).unwrap();
        let mut names: Vec<String> = buf[..n]
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty() && !n.starts_with(b"security.selinux"))
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(xattrs(&d), ["user.keep"], "{}", r.stderr);
    let mut value = [0u8; 16];
    let n = rustix::fs::getxattr(&d, "user.keep", &mut value).unwrap();
    assert_eq!(&value[..n], b"new");
    assert_eq!(xattrs(&st.restored("d/f")), Vec::<String>::new());
    st.sentinel.assert_untouched();
}

/// A directory that was there with more xattr names than the kernel
/// lists (on btrfs): its stale ACLs go all the same, by name, with a
/// warning that other xattrs may stay (they all stayed, the ACLs too).
#[test]
fn a_restore_over_a_directory_with_too_many_xattr_names_still_removes_its_acls() {
    if !require_root("btrfs, trusted.*") {
        return;
    }
    let st = Stage::new();
    let on_btrfs = BtrfsWork::mount(&st);
    let d = st.restored("d");
    fs::create_dir_all(&d).unwrap();
    for i in 0..300 {
        let name = format!("user.{i:03}{}", "n".repeat(240));
        rustix::fs::setxattr(&d, name.as_str(), b"v", rustix::fs::XattrFlags::empty()).unwrap();
    }
    util::run(Command::new("setfacl").args(["-m", "u:1000:rwx"]).arg(&d));
    util::run(
        Command::new("setfacl")
            .args(["-d", "-m", "u:1000:rwx"])
            .arg(&d),
    );
    let r = st.restore(&scenario(vec![dir("d")], &[]), &[ALL]);
    r.assert_code(24);
    assert!(
        r.stderr.contains("cannot list xattrs to remove"),
        "{}",
        r.stderr
    );
    for acl in ["system.posix_acl_access", "system.posix_acl_default"] {
        let mut v = [0u8; 64];
        assert_eq!(
            rustix::fs::getxattr(&d, acl, &mut v),
            Err(rustix::io::Errno::NODATA),
            "{acl} stayed: {}",
            r.stderr
        );
    }
    assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o755);
    drop(on_btrfs);
}

/// A scenario of `levels` nested directories, each carrying 15 xattrs of
/// 64,000 bytes named `PREFIXNN`, and a file at the bottom; and its path.
fn nested(levels: usize, prefix: &str) -> (Scenario, String) {
    let mut entries = vec![];
    let mut path = String::new();
    for i in 0..levels {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(&format!("{i:x}"));
        let mut d = dir(&path);
        d.entry.xattrs = (0..15)
            .map(|k| (format!("{prefix}{k:02}").into_bytes(), vec![7u8; 64_000]))
            .collect();
        entries.push(d);
    }
    let leaf = format!("{path}/f");
    entries.push(file(&leaf, b"deep"));
    let mut sc = scenario(vec![], &[(leaf.as_str(), b"deep")]);
    sc.parts = entries.into_iter().map(|e| vec![e]).collect();
    (sc, leaf)
}

/// Directories on the way to a selected path are kept with their xattrs
/// (to be made with them), within bounds: a server nesting directories
/// that each carry 1 MiB of ACL bytes is refused once they pass 128 MiB,
/// rather than held (2,048 levels would be 2 GiB).
#[test]
fn directories_on_the_way_cannot_make_a_restore_hold_unbounded_xattrs() {
    let st = Stage::new();
    // (A value is at most 64 KiB: 15 of them, under ACL names.)
    let (sc, leaf) = nested(140, "system.posix_acl_");
    let r = st.restore(&sc, &[&format!("/{leaf}")]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("more than 128 MiB of ACLs"),
        "{}",
        r.stderr
    );
    st.sentinel.assert_untouched();
    // Between the bounds (40 levels of 960 KB): the path is restored, and
    // the xattrs the directories on the way lose are a warning (exit 24;
    // it was a note, and the restore exited 0).
    let st = Stage::new();
    let (sc, leaf) = nested(40, "user.big");
    let r = st.restore(&sc, &[&format!("/{leaf}")]);
    assert_eq!(r.code, Some(24), "{}", r.stderr);
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("warning") && l.contains("get their ACLs only")),
        "{}",
        r.stderr
    );
    st.sentinel.assert_untouched();
}

/// Directories restored whole are held with their xattrs until they are
/// left (their metadata is set last), within bounds too: past 32 MiB on
/// the stack a directory keeps its ACLs only (said), past 128 MiB the
/// restore stops, rather than hold what a server nesting directories of
/// 1 MiB of xattrs each sends (2,048 levels would be 2 GiB).
#[test]
fn nested_directories_cannot_make_a_restore_hold_unbounded_xattrs() {
    if !require_root("nested_directories_cannot_make_a_restore_hold_unbounded_xattrs") {
        return;
    }
    let st = Stage::new();
    // 40 levels of 960 KB: the deepest few restored with their ACLs only;
    // the xattrs such a directory already has are left as they are (its
    // entry lacks some the snapshot has), not removed as stale.
    let (sc, leaf) = nested(40, "user.x");
    let deepest = st.restored(Path::new(&leaf).parent().unwrap().to_str().unwrap());
    fs::create_dir_all(&deepest).unwrap();
    set_xattr(&deepest, "user.x00", b"there before");
    let r = st.restore(&sc, &[ALL]);
    assert!(
        r.stderr
            .contains("carry more than 32 MiB of xattrs: restored with its ACLs only"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("refusing to go on"), "{}", r.stderr);
    assert_eq!(fs::read(st.restored(&leaf)).unwrap(), b"deep");
    assert_eq!(
        xattrs(&deepest),
        vec![(b"user.x00".to_vec(), b"there before".to_vec())]
    );
    st.clear_work();
    // 140 levels of ACL bytes: refused past 128 MiB. Restored over
    // directories that are there already (another user's, mode 0750): the
    // one refused is given back its owner and mode, not left locked down
    // (root's, mode 0700) as the restore made it; the others get their
    // entries'.
    let (sc, leaf) = nested(140, "system.posix_acl_");
    let top = Path::new(&leaf).parent().unwrap();
    fs::create_dir_all(st.restored(top.to_str().unwrap())).unwrap();
    let levels: Vec<PathBuf> = top
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| st.restored(p.to_str().unwrap()))
        .collect();
    assert_eq!(levels.len(), 140);
    for d in &levels {
        std::os::unix::fs::chown(d, Some(1234), Some(1234)).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o750)).unwrap();
    }
    let r = st.restore(&sc, &[ALL]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("carry more than 128 MiB of ACLs; refusing to go on"),
        "{}",
        r.stderr
    );
    assert!(fs::symlink_metadata(st.restored(&leaf)).is_err());
    // `levels` runs from the deepest up: the deepest, refused, has what it
    // had; every other got its entry's (root's, 0755) as it was left.
    for (i, d) in levels.iter().enumerate() {
        let m = fs::metadata(d).unwrap();
        let want = match i {
            0 => (1234, 1234, 0o750),
            _ => (0, 0, 0o755),
        };
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            want,
            "{} not given its owner and mode",
            d.display()
        );
    }
    st.sentinel.assert_untouched();
}

/// A restore that fails half-way (here: a file with more data than its
/// entry says) still gives an existing directory it worked in its owner
/// and mode back, instead of leaving it the restoring user's, mode 0700.
#[test]
fn a_failed_restore_gives_existing_directories_back_their_owner_and_mode() {
    if !require_root("a_failed_restore_gives_existing_directories_back_their_owner_and_mode") {
        return;
    }
    let st = Stage::new();
    let home = st.restored("home");
    fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(1000), Some(1000)).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o2775)).unwrap();
    let entries = vec![dir("home"), file("home/f", b"x"), file("home/g", b"y")];
    let sc = scenario(entries, &[("home/f", b"way too long"), ("home/g", b"y")]);
    let r = st.restore(&sc, &["/home/f", "/home/g"]);
    assert!(r.code.is_some_and(|c| c != 0), "{}", r.stderr);
    let md = fs::metadata(&home).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (1000, 1000, 0o2775),
        "{}",
        r.stderr
    );
    st.sentinel.assert_untouched();
}

/// A restore interrupted by SIGINT or SIGTERM (a server that stalls, an
/// operator's Ctrl-C) gives the existing directories it locked down their
/// owner and mode back before it exits.
#[test]
fn an_interrupted_restore_gives_existing_directories_back_their_owner_and_mode() {
    if !require_root("an_interrupted_restore_gives_existing_directories_back_their_owner_and_mode")
    {
        return;
    }
    for (sig, code) in [(Signal::INT, 130), (Signal::TERM, 143)] {
        let st = Stage::new();
        let home = st.restored("home");
        fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(1000), Some(1000)).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o2775)).unwrap();
        let entries = vec![dir("home"), file("home/f", b"x")];
        let mut sc = scenario(entries, &[("home/f", b"x")]);
        // A server that stalls (its own stderr, which the test reads to the
        // end, closes when it wakes).
        sc.file_delay_ms = 8_000;
        // Its stdout, the --json report, into a file (spawn_restore drops stdout).
        let (json, wrapper) = st.json_restore();
        let mut child = st.spawn_restore(wrapper, &sc, &[ALL], None);
        let locked = Instant::now();
        while fs::metadata(&home).unwrap().mode() & 0o7777 != 0o700 {
            assert!(locked.elapsed() < TIMEOUT, "home never locked down");
            std::thread::sleep(Duration::from_millis(20));
        }
        send_signal(child.id(), sig);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(code), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        // The --json report says so too.
        let report: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap())
            .unwrap_or_else(|e| {
                panic!(
                    "no JSON report ({e}): {:?}\n{stderr}",
                    fs::read_to_string(&json)
                )
            });
        assert_eq!(report["exit_code"], code, "{report}");
        assert_eq!(report["status"], "failed", "{report}");
        assert!(
            report["errors"][0]
                .as_str()
                .unwrap()
                .starts_with("interrupted ("),
            "{report}"
        );
        let md = fs::metadata(&home).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (1000, 1000, 0o2775),
            "{stderr}"
        );
        st.sentinel.assert_untouched();
    }
}

/// A restore stopped by SIGTERM while a file comes in removes that file's
/// temporary copy; the directories it made stay private (0700), and a
/// restore run again restores the file (it cannot tell those directories
/// from ones the user made private, and keeps them 0700).
#[test]
fn a_stopped_restore_leaves_no_temporary_file() {
    if !require_root("a_stopped_restore_leaves_no_temporary_file") {
        return;
    }
    let st = Stage::new();
    let entries = vec![dir("a"), dir("a/b"), file("a/b/f", b"x")];
    let mut sc = scenario(entries.clone(), &[("a/b/f", b"x")]);
    sc.file_delay_ms = 8_000;
    let mut child = st.spawn_restore(
        Command::new(bin("byteback-restore")),
        &sc,
        &["/a/b/f"],
        None,
    );
    let temps = || -> Vec<String> {
        fs::read_dir(st.restored("a/b"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".byteback-restore."))
                    .collect()
            })
            .unwrap_or_default()
    };
    let t = Instant::now();
    while temps().is_empty() {
        assert!(t.elapsed() < TIMEOUT, "no temporary file ever made");
        std::thread::sleep(Duration::from_millis(20));
    }
    send_signal(child.id(), Signal::TERM);
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert_eq!(temps(), Vec::<String>::new());
    let mode = |rel: &str| fs::metadata(st.restored(rel)).unwrap().mode() & 0o7777;
    assert_eq!((mode(""), mode("a"), mode("a/b")), (0o700, 0o700, 0o700));
    let r = st.restore(&scenario(entries, &[("a/b/f", b"x")]), &["/a/b/f"]);
    r.assert_code(0);
    assert_eq!((mode(""), mode("a"), mode("a/b")), (0o700, 0o700, 0o700));
    assert_eq!(fs::read(st.restored("a/b/f")).unwrap(), b"x");
    assert_eq!(temps(), Vec::<String>::new());
    st.sentinel.assert_untouched();
}

/// Blocks of zeros are restored as holes, but a swap file comes back
/// allocated whole (the kernel refuses one with holes), and with
/// `--no-sparse` every file does, as 1.x's rsync wrote them.
#[test]
fn swap_files_and_no_sparse_restores_come_back_allocated() {
    use std::os::unix::fs::MetadataExt;
    let st = Stage::new();
    let mut swap = vec![0u8; 1 << 20];
    swap[4086..4096].copy_from_slice(b"SWAPSPACE2");
    swap[1024] = 1;
    let zeros = vec![0u8; 1 << 20];
    let entries = vec![dir("d"), file("d/swapfile", &swap), file("d/zeros", &zeros)];
    let files: &[(&str, &[u8])] = &[("d/swapfile", &swap), ("d/zeros", &zeros)];
    let allocated = |rel: &str| fs::metadata(st.restored(rel)).unwrap().blocks() * 512;
    let r = st.restore(&scenario(entries.clone(), files), &[ALL]);
    r.assert_code(0);
    assert_eq!(fs::read(st.restored("d/swapfile")).unwrap(), swap);
    assert!(
        allocated("d/swapfile") >= 1 << 20,
        "{}",
        allocated("d/swapfile")
    );
    assert_eq!(fs::read(st.restored("d/zeros")).unwrap(), zeros);
    assert!(allocated("d/zeros") < 64 << 10, "{}", allocated("d/zeros"));
    st.clear_work();
    let r = st.restore(&scenario(entries, files), &["--no-sparse", ALL]);
    r.assert_code(0);
    assert!(allocated("d/zeros") >= 1 << 20, "{}", allocated("d/zeros"));
    assert_eq!(fs::read(st.restored("d/zeros")).unwrap(), zeros);
}

/// A swap file restored onto btrfs is NOCOW (`chattr +C`), which btrfs
/// needs to swap to it: `swapon` takes it (it refused the copy restore
/// made before, with "Invalid argument").
#[test]
fn a_swap_file_restored_onto_btrfs_can_be_swapped_to() {
    if !require_root("a_swap_file_restored_onto_btrfs (mount, swapon)") {
        return;
    }
    let st = Stage::new();
    let mut on_btrfs = BtrfsWork::mount(&st);
    let made = st.dir.path().join("made-swap");
    fs::write(&made, vec![0u8; 4 << 20]).unwrap();
    util::run(Command::new("mkswap").arg(&made));
    let swap = fs::read(&made).unwrap();
    let entries = vec![dir("d"), file("d/swapfile", &swap)];
    let r = st.restore(&scenario(entries, &[("d/swapfile", &swap)]), &[ALL]);
    r.assert_code(0);
    let restored = st.restored("d/swapfile");
    assert_eq!(fs::read(&restored).unwrap(), swap);
    let flags = rustix::fs::ioctl_getflags(fs::File::open(&restored).unwrap()).unwrap();
    assert!(flags.contains(rustix::fs::IFlags::NOCOW), "{flags:?}");
    let out = Command::new("swapon").arg(&restored).output().unwrap();
    assert!(
        out.status.success(),
        "swapon: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    on_btrfs.swap = Some(restored.clone());
    drop(on_btrfs);
    st.sentinel.assert_untouched();
}

/// A restore not run as root cannot give files their owners or their
/// `security.*` and `trusted.*` xattrs (file capabilities): it says so in
/// one summary and ends partial (24), where it said nothing and exited 0.
#[test]
fn a_restore_not_run_as_root_says_what_it_could_not_give_back() {
    if !require_root("a_restore_not_run_as_root (setpriv to nobody)") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let st = Stage::new();
    for d in [
        st.dir.path().to_path_buf(),
        st.work(),
        st.dir.path().join("store"),
    ] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut cap = file("ping", b"x");
    cap.entry.mode = 0o755;
    cap.entry.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2])];
    let mine = {
        let mut e = file("mine", b"y");
        (e.entry.uid, e.entry.gid) = (65534, 65534);
        e
    };
    // A group this user is a member of is given, as rsync does; one it
    // is not a member of cannot be.
    let member = {
        let mut e = file("member", b"m");
        (e.entry.uid, e.entry.gid, e.entry.mode) = (65534, 100, 0o2755);
        e
    };
    let other = {
        let mut e = file("other", b"o");
        (e.entry.uid, e.entry.gid) = (65534, 4);
        e
    };
    // A directory that was there, of another of its groups: given the
    // backup's group (the user's own), which it kept.
    let mut kd = dir("kd");
    (kd.entry.uid, kd.entry.gid) = (65534, 65534);
    let snap_dir = st.restored("");
    fs::create_dir_all(snap_dir.join("kd")).unwrap();
    std::os::unix::fs::chown(&snap_dir, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(snap_dir.join("kd"), Some(65534), Some(100)).unwrap();
    let sc = scenario(
        vec![kd, member, mine, other, cap],
        &[
            ("ping", b"x"),
            ("mine", b"y"),
            ("member", b"m"),
            ("other", b"o"),
        ],
    );
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--groups=100", "--"])
        .arg(bin("byteback-restore"));
    let mut child = st.spawn_restore(cmd, &sc, &[ALL], None);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(24), "{err}");
    assert!(
        err.contains("not run as root: 2 files belong to another user or group")
            && err.contains("1 entries lost their security.* and trusted.* xattrs"),
        "{err}"
    );
    assert_eq!(fs::read(st.restored("ping")).unwrap(), b"x");
    let member = fs::metadata(st.restored("member")).unwrap();
    assert_eq!((member.gid(), member.mode() & 0o7777), (100, 0o2755));
    assert_eq!(fs::metadata(st.restored("other")).unwrap().gid(), 65534);
    assert_eq!(
        fs::metadata(st.restored("kd")).unwrap().gid(),
        65534,
        "{err}"
    );
    st.sentinel.assert_untouched();
}

/// A name the restore may not replace (`chattr +i` on what stands there)
/// is a warning naming it, and the rest is restored (it stopped the whole
/// restore); a restore that fails later still counts, in `--json`, what it
/// restored before.
#[test]
fn an_immutable_name_is_skipped_and_a_failed_restore_counts_what_it_wrote() {
    if !require_root("an_immutable_name_is_skipped (chattr +i)") {
        return;
    }
    let st = Stage::new();
    // `d/l` is a hard link to `d/a`: with `d/a` not put in place, it is
    // not made either, and nothing else stops.
    let entries = vec![
        dir("d"),
        file("d/a", b"a"),
        file("d/b", b"b"),
        hardlink("d/l", "d/a"),
    ];
    let files: &[(&str, &[u8])] = &[("d/a", b"a"), ("d/b", b"b")];
    st.restore(&scenario(entries.clone(), files), &[ALL])
        .assert_code(0);
    fs::remove_file(st.restored("d/l")).unwrap();
    let a = st.restored("d/a");
    let chattr = |flag: &str| run(Command::new("chattr").arg(flag).arg(&a));
    chattr("+i");
    fs::remove_file(st.restored("d/b")).unwrap();
    let r = st.restore(&scenario(entries, files), &[ALL]);
    chattr("-i");
    r.assert_code(24);
    assert!(
        r.stderr.contains("d/a: cannot put in place"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("d/l: not restored: its first name /d/a could not be put in place"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(st.restored("d/b")).unwrap(), b"b");
    // The server sends more than the manifest's size for the second file:
    // the restore stops there, having written the first.
    st.clear_work();
    let entries = vec![dir("e"), file("e/a", b"a"), file("e/b", b"b")];
    let sc = scenario(
        entries,
        &[("e/a", b"a"), ("e/b", b"far more than one byte")],
    );
    let (json, wrapper) = st.json_restore();
    let r = st.restore_cmd(wrapper, &sc, &[ALL], None);
    r.assert_code(1);
    let report: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    assert!(
        report["entries"].as_u64().unwrap() >= 1,
        "{report}\n{}",
        r.stderr
    );
    assert_eq!(fs::read(st.restored("e/a")).unwrap(), b"a");
    st.sentinel.assert_untouched();
}

/// Warnings are printed as they come and only the first 1,000 are kept
/// (for the summary and `--json`), so a server sending entries that each
/// cost a warning cannot grow the client's memory without bound: 3,000
/// fifos with an xattr no filesystem takes give 3,000 warnings, all
/// printed, counted in the summary, the exit code "partial".
#[test]
fn warnings_are_printed_as_they_come_and_kept_only_up_to_a_bound() {
    if !require_root("warnings_are_printed_as_they_come_and_kept_only_up_to_a_bound") {
        return;
    }
    let st = Stage::new();
    let mut entries = vec![dir("p")];
    for i in 0..3000 {
        let mut e = entry(&format!("p/{i:05}"), Kind::Fifo);
        e.entry.xattrs = vec![(b"zz.not-a-namespace".to_vec(), b"v".to_vec())];
        entries.push(e);
    }
    let mut sc = scenario(vec![], &[]);
    sc.parts = entries.chunks(500).map(|c| c.to_vec()).collect();
    let r = st.restore(&sc, &[ALL]);
    r.assert_code(24);
    assert_eq!(
        r.stderr
            .matches("cannot set xattr zz.not-a-namespace")
            .count(),
        3000
    );
    assert!(
        r.stderr
            .contains("3000 warnings in all (the first 1000 are in --json)"),
        "{}",
        &r.stderr[r.stderr.len().saturating_sub(2000)..]
    );
    assert_eq!(fs::read_dir(st.restored("p")).unwrap().count(), 3000);
    st.sentinel.assert_untouched();
}

/// Two selected links to a first name the patterns leave out, restored in
/// different passes (the 36 MB of flood entries between them exceed one
/// pass's 32 MiB): the first gets the content, the second is a hard link to
/// it, as in the snapshot (it became a second, separate copy).
#[test]
fn links_to_one_left_out_first_name_stay_links_across_passes() {
    if !require_root("links_to_one_left_out_first_name_stay_links_across_passes") {
        return;
    }
    let st = Stage::new();
    let mut sc = scenario(
        vec![
            file("a-first", b"shared content"),
            hardlink("a-link", "a-first"),
            dir("flood"),
        ],
        &[("a-first", b"shared content")],
    );
    sc.flood_parts = 12;
    sc.flood_xattr_len = 3000;
    sc.tail = vec![vec![hardlink("zlast", "a-first")]];
    let r = st.restore(&sc, &["/a-link", "/flood", "/zlast"]);
    r.assert_code(0);
    let md = |p: &str| fs::symlink_metadata(st.restored(p)).unwrap();
    assert_eq!(fs::read(st.restored("zlast")).unwrap(), b"shared content");
    assert_eq!(
        md("a-link").ino(),
        md("zlast").ino(),
        "the second link is a copy"
    );
    assert!(fs::symlink_metadata(st.restored("a-first")).is_err());
    assert_eq!(fs::read_dir(st.restored("flood")).unwrap().count(), 12_000);
    st.sentinel.assert_untouched();
}

/// The restore remembers the inode of a file only when a hard link names
/// it as its first name (or it is a copy made for links): memory grows with
/// the links restored, not with the files. Here 200 files, of which one is
/// linked twice and one first name is left out by the patterns (its copy is
/// remembered): two inodes, and the links are links.
#[test]
fn only_first_names_of_hard_links_are_remembered() {
    if !require_root("only_first_names_of_hard_links_are_remembered") {
        return;
    }
    let st = Stage::new();
    let mut entries = vec![file("a-first", b"left out"), hardlink("a-link", "a-first")];
    let mut files: Vec<(String, Vec<u8>)> = vec![("a-first".into(), b"left out".to_vec())];
    entries.push(dir("d"));
    for i in 0..200 {
        let p = format!("d/f{i:03}");
        let data = format!("file {i}").into_bytes();
        entries.push(file(&p, &data));
        files.push((p, data));
    }
    entries.push(hardlink("d/g1", "d/f007"));
    entries.push(hardlink("d/g2", "d/f007"));
    entries.push(hardlink("z-link", "a-first"));
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    let sc = scenario(entries, &files);
    let mut cmd = Command::new(bin("byteback-restore"));
    cmd.env("BYTEBACK_LOG", "debug");
    let r = st.restore_cmd(cmd, &sc, &["/a-link", "/d", "/z-link"], None);
    r.assert_code(0);
    assert!(
        r.stderr
            .contains(&format!("{SNAP}: 2 inodes remembered for hard links")),
        "{}",
        r.stderr
    );
    let ino = |p: &str| fs::symlink_metadata(st.restored(p)).unwrap().ino();
    assert_eq!(ino("d/f007"), ino("d/g1"));
    assert_eq!(ino("d/f007"), ino("d/g2"));
    assert_eq!(ino("a-link"), ino("z-link"));
    assert_eq!(fs::read(st.restored("z-link")).unwrap(), b"left out");
    assert_eq!(fs::read(st.restored("d/f199")).unwrap(), b"file 199");
    st.sentinel.assert_untouched();
}

/// A path restored alone gets the directories on its way made with their
/// manifest metadata (owner, mode, mtime, xattrs and ACLs), as if
/// selected: a file kept private by its directory stays private in the
/// restore (they were made root's, mode 0755; later without their ACLs,
/// so that a group the ACL kept out got the mask's rights).
#[test]
fn directories_made_on_the_way_to_a_selected_path_get_their_manifest_metadata() {
    if !require_root("directories_made_on_the_way_to_a_selected_path_get_their_manifest_metadata") {
        return;
    }
    let st = Stage::new();
    let mut alice = dir("home/alice");
    (alice.entry.uid, alice.entry.gid, alice.entry.mode) = (1000, 1000, 0o750);
    let mut private = dir("home/alice/private");
    // With an ACL (user 1001 may, the group may not): its mode's group
    // bits are the mask, rwx; made without it, the group got rwx.
    (private.entry.uid, private.entry.gid, private.entry.mode) = (1000, 1000, 0o770);
    private.entry.mtime_sec = 1_600_000_000;
    let acl: Vec<u8> = [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 7, 1001),
        (0x04, 0, u32::MAX),
    ]
    .into_iter()
    .chain([(0x10, 7, u32::MAX), (0x20, 0, u32::MAX)])
    .fold(2u32.to_le_bytes().to_vec(), |mut v, (tag, perm, id)| {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
        v
    });
    private.entry.xattrs = vec![(b"system.posix_acl_access".to_vec(), acl.clone())];
    let mut notes = file("home/alice/private/notes", b"secret");
    (notes.entry.uid, notes.entry.gid) = (1000, 1000);
    let entries = vec![
        dir("home"),
        alice,
        private,
        notes,
        file("home/alice/public", b"hello"),
    ];
    let sc = scenario(
        entries,
        &[
            ("home/alice/private/notes", b"secret"),
            ("home/alice/public", b"hello"),
        ],
    );
    let r = st.restore(&sc, &["/home/alice/private/notes"]);
    r.assert_code(0);
    let md = |p: &str| fs::symlink_metadata(st.restored(p)).unwrap();
    let owner_mode = |p: &str| (md(p).uid(), md(p).gid(), md(p).mode() & 0o7777);
    assert_eq!(owner_mode("home/alice/private"), (1000, 1000, 0o770));
    let mut got = vec![0u8; 256];
    let n = rustix::fs::getxattr(
        st.restored("home/alice/private"),
        "system.posix_acl_access",
        &mut got,
    )
    .unwrap_or_else(|e| panic!("no ACL: {e}\n{}", r.stderr));
    assert_eq!(got[..n], acl[..]);
    assert_eq!(md("home/alice/private").mtime(), 1_600_000_000);
    assert_eq!(owner_mode("home/alice"), (1000, 1000, 0o750));
    assert_eq!(owner_mode("home"), (0, 0, 0o755));
    assert_eq!(owner_mode("home/alice/private/notes"), (1000, 1000, 0o644));
    assert_eq!(
        fs::read(st.restored("home/alice/private/notes")).unwrap(),
        b"secret"
    );
    assert!(fs::symlink_metadata(st.restored("home/alice/public")).is_err());
    st.sentinel.assert_untouched();
}

/// The restore holds a descriptor per level of the path it restores, so
/// it raises its soft open-file limit to the hard one as the backup does:
/// a tree 1,100 levels deep restores under a soft limit of 1,024 (it failed
/// with "Too many open files").
#[test]
fn a_tree_deeper_than_the_soft_open_file_limit_restores() {
    if !require_root("a_tree_deeper_than_the_soft_open_file_limit_restores") {
        return;
    }
    let st = Stage::new();
    let mut entries = vec![];
    let mut p = String::new();
    for _ in 0..1100 {
        if !p.is_empty() {
            p.push('/');
        }
        p.push('a');
        entries.push(dir(&p));
    }
    let deep = format!("{p}/f");
    entries.push(file(&deep, b"deep"));
    let mut sc = scenario(vec![], &[(deep.as_str(), b"deep")]);
    sc.parts = entries.chunks(500).map(|c| c.to_vec()).collect();
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=1024:4096", "--"])
        .arg(bin("byteback-restore"));
    let r = st.restore_cmd(cmd, &sc, &[ALL], None);
    r.assert_code(0);
    assert_eq!(fs::read(st.restored(&deep)).unwrap(), b"deep");
    st.sentinel.assert_untouched();
}

/// A restore over an earlier one finds its directories there: each is
/// locked down while it is worked in, and forgotten once its metadata is
/// set. Before, a selected directory that existed stayed registered (with
/// a descriptor) for the whole run, so a tree of more directories than the
/// open-file limit failed with EMFILE, and a signal late in the run set
/// finished directories back to their old owner and mode.
#[test]
fn a_restore_over_an_earlier_one_holds_no_descriptor_per_directory() {
    if !require_root("a_restore_over_an_earlier_one_holds_no_descriptor_per_directory") {
        return;
    }
    let st = Stage::new();
    let mut entries = vec![];
    for i in 0..1500 {
        entries.push(dir(&format!("d{i:04}")));
    }
    entries.push(file("d1499/f", b"last"));
    let mut sc = scenario(vec![], &[("d1499/f", b"last")]);
    sc.parts = entries.chunks(500).map(|c| c.to_vec()).collect();
    for _ in 0..2 {
        let mut cmd = Command::new("prlimit");
        cmd.args(["--nofile=1024:1024", "--"])
            .arg(bin("byteback-restore"));
        let r = st.restore_cmd(cmd, &sc, &[ALL], None);
        r.assert_code(0);
    }
    assert_eq!(fs::read(st.restored("d1499/f")).unwrap(), b"last");
    st.sentinel.assert_untouched();
}

#[test]
fn a_legal_manifest_restores_exactly_with_the_safety_switches() {
    if !require_root("a_legal_manifest_restores_exactly_with_the_safety_switches") {
        return;
    }
    let st = Stage::new();
    let mut suid = file("bin/su", b"#!/bin/sh\n");
    suid.entry.mode = 0o4755;
    // A file capability (cap_setuid+ep: root, as a setuid bit would give).
    let mut cap = vec![];
    cap.extend(0x0200_0001u32.to_le_bytes()); // VFS_CAP_REVISION_2, effective
    cap.extend((1u32 << 7).to_le_bytes()); // permitted: CAP_SETUID
    cap.extend([0u8; 12]);
    let capability = (b"security.capability".to_vec(), cap);
    let mut capable = file("bin/cap", b"#!/bin/sh\n");
    capable.entry.mode = 0o755;
    capable.entry.xattrs = vec![capability.clone()];
    let mut owned = file("home/u/f", b"data");
    owned.entry.uid = 1234;
    owned.entry.gid = 5678;
    owned.entry.mode = 0o640;
    owned.entry.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
    let mut null = entry(
        "dev/null",
        Kind::CharDev {
            rdev: rustix::fs::makedev(1, 3),
        },
    );
    null.entry.mode = 0o666;
    let mut home = dir("home");
    home.entry.mode = 0o1777;
    let entries = vec![
        dir("bin"),
        capable,
        suid,
        dir("dev"),
        null,
        entry("dev/pipe", Kind::Fifo),
        home,
        dir("home/u"),
        owned,
        hardlink("home/u/g", "home/u/f"),
        symlink("home/u/l", Path::new("f")),
        file("lonely", b"first name"),
        hardlink("z-link", "lonely"),
    ];
    let files: &[(&str, &[u8])] = &[
        ("bin/cap", b"#!/bin/sh\n"),
        ("bin/su", b"#!/bin/sh\n"),
        ("home/u/f", b"data"),
        ("lonely", b"first name"),
    ];
    let r = st.restore(&scenario(entries.clone(), files), &[ALL]);
    r.assert_code(0);
    let md = |p: &str| fs::symlink_metadata(st.restored(p)).unwrap();
    assert_eq!(md("bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(xattrs(&st.restored("bin/cap")), vec![capability.clone()]);
    assert!(md("dev/null").file_type().is_char_device());
    assert_eq!(md("dev/null").rdev(), rustix::fs::makedev(1, 3));
    assert!(md("dev/pipe").file_type().is_fifo());
    assert_eq!(md("home").mode() & 0o7777, 0o1777);
    assert_eq!((md("home/u/f").uid(), md("home/u/f").gid()), (1234, 5678));
    assert_eq!(md("home/u/f").mode() & 0o7777, 0o640);
    assert_eq!(md("home/u/f").ino(), md("home/u/g").ino());
    assert_eq!(md("home/u/f").mtime(), 1_700_000_000);
    assert_eq!(
        fs::read_link(st.restored("home/u/l")).unwrap(),
        Path::new("f")
    );
    assert_eq!(
        xattrs(&st.restored("home/u/f")),
        vec![(b"user.k".to_vec(), b"v".to_vec())]
    );
    assert_eq!(md("lonely").ino(), md("z-link").ino());
    assert_eq!(md(".").mode() & 0o777, 0o755);

    // Only the second name selected: its first name's content is fetched
    // for it and verified.
    fs::remove_dir_all(st.work().join(SNAP)).unwrap();
    let r = st.restore(&scenario(entries.clone(), files), &["/z-link"]);
    r.assert_code(0);
    assert_eq!(fs::read(st.restored("z-link")).unwrap(), b"first name");
    assert!(fs::symlink_metadata(st.restored("lonely")).is_err());

    // --no-setuid --no-devices: for data one does not trust (no setuid
    // bits, no file capabilities, no device nodes).
    fs::remove_dir_all(st.work().join(SNAP)).unwrap();
    // A SMACK exec label (the label a program runs with) goes with them.
    let mut entries = entries;
    let mut smack = file("bin/smack", b"#!/bin/sh\n");
    smack.entry.xattrs = vec![(b"security.SMACK64EXEC".to_vec(), b"System".to_vec())];
    let at = entries
        .iter()
        .position(|e| e.entry.path.as_slice() == b"bin/su")
        .unwrap();
    entries.insert(at, smack);
    let files = [files, &[("bin/smack", &b"#!/bin/sh\n"[..])]].concat();
    let r = st.restore(
        &scenario(entries, &files),
        &["--no-setuid", "--no-devices", ALL],
    );
    r.assert_code(24);
    assert_eq!(
        xattrs(&st.restored("bin/smack")),
        vec![],
        "a SMACK exec label came back"
    );
    assert!(r.stderr.contains("--no-devices"), "{}", r.stderr);
    assert_eq!(md("bin/su").mode() & 0o7777, 0o755);
    assert_eq!(
        xattrs(&st.restored("bin/cap")),
        vec![],
        "a file capability came back"
    );
    assert_eq!(md("bin/cap").mode() & 0o7777, 0o755);
    assert!(fs::symlink_metadata(st.restored("dev/null")).is_err());
    assert!(md("dev/pipe").file_type().is_fifo());
    let perms = fs::metadata(st.work().join(SNAP)).unwrap().permissions();
    assert_eq!(perms.mode() & 0o777, 0o755);
    st.sentinel.assert_untouched();
}

/// A hard link whose first name is as deep as a manifest path may be
/// (4,096 bytes, one more than the kernel takes at once) is made: the
/// first name is looked up in steps, each beneath the last.
#[test]
fn a_hard_link_to_a_first_name_of_the_longest_path_is_made() {
    if !require_root("a_hard_link_to_a_first_name_of_the_longest_path_is_made") {
        return;
    }
    let st = Stage::new();
    let mut entries = vec![];
    let mut path = String::new();
    for i in 0..20u8 {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(&((b'a' + i) as char).to_string().repeat(200));
        entries.push(dir(&path));
    }
    path.push('/');
    let deep = format!("{path}{}", "f".repeat(4096 - path.len()));
    assert_eq!(deep.len(), 4096);
    let body: &[u8] = b"deep first name";
    entries.push(file(&deep, body));
    entries.push(hardlink("z-link", &deep));
    let r = st.restore(&scenario(entries, &[(deep.as_str(), body)]), &[ALL]);
    r.assert_code(0);
    let link = fs::metadata(st.restored("z-link")).unwrap();
    assert_eq!(fs::read(st.restored("z-link")).unwrap(), body);
    assert_eq!(link.nlink(), 2, "{}", r.stderr);
    st.sentinel.assert_untouched();
}

/// A setuid or setgid bit stays only on a file owned as the manifest says:
/// an owner that cannot be set (here one the kernel cannot take, as for an
/// unmapped id or a restore by another user) leaves the file owned by who
/// restored it, and the bit would make it run as them.
#[test]
fn setuid_and_setgid_stay_only_on_files_owned_as_the_manifest_says() {
    if !require_root("setuid_and_setgid_stay_only_on_files_owned_as_the_manifest_says") {
        return;
    }
    let st = Stage::new();
    let body: &[u8] = b"#!/bin/sh\n";
    let mut unowned = file("bin/x", body);
    unowned.entry.mode = 0o6755;
    unowned.entry.uid = u32::MAX;
    unowned.entry.gid = u32::MAX;
    let mut owned = file("bin/y", body);
    owned.entry.mode = 0o6755;
    owned.entry.uid = 1234;
    owned.entry.gid = 5678;
    let mut shared = dir("shared");
    shared.entry.mode = 0o2775;
    shared.entry.gid = u32::MAX;
    let entries = vec![dir("bin"), unowned, owned, shared];
    let files: &[(&str, &[u8])] = &[("bin/x", body), ("bin/y", body)];
    let r = st.restore(&scenario(entries, files), &[ALL]);
    let md = |p: &str| fs::symlink_metadata(st.restored(p)).unwrap();
    assert_eq!(md("bin/x").mode() & 0o7777, 0o755, "{}", r.stderr);
    assert_eq!((md("bin/x").uid(), md("bin/x").gid()), (0, 0));
    assert!(r.stderr.contains("bin/x: setuid left off"), "{}", r.stderr);
    assert!(r.stderr.contains("bin/x: setgid left off"), "{}", r.stderr);
    assert_eq!(md("bin/y").mode() & 0o7777, 0o6755, "{}", r.stderr);
    assert_eq!((md("bin/y").uid(), md("bin/y").gid()), (1234, 5678));
    // A directory's setgid only names the group of what is made in it.
    assert_eq!(md("shared").mode() & 0o7777, 0o2775, "{}", r.stderr);
    assert_ne!(
        r.code,
        Some(0),
        "warnings make a partial restore: {}",
        r.stderr
    );
    st.sentinel.assert_untouched();
}

#[test]
fn each_path_comes_from_the_newest_snapshot_holding_it() {
    if !require_root("each_path_comes_from_the_newest_snapshot_holding_it") {
        return;
    }
    let st = Stage::new();
    let mut new_a = file("d/a", b"new a!");
    new_a.entry.mtime_sec += 100;
    let sc = snapshots_scenario(vec![
        (
            OLD,
            vec![
                dir("d"),
                file("d/a", b"old a"),
                file("d/gone", b"gone later"),
                hardlink("d/link", "d/a"),
                file("d/same", b"same"),
            ],
            &[
                ("d/a", b"old a"),
                ("d/gone", b"gone later"),
                ("d/same", b"same"),
            ],
        ),
        (
            SNAP,
            vec![dir("d"), new_a, file("d/same", b"same")],
            &[("d/a", b"new a!"), ("d/same", b"same")],
        ),
    ]);
    let md = |snap: &str, p: &str| fs::symlink_metadata(st.restored_in(snap, p));
    let read = |snap: &str, p: &str| fs::read(st.restored_in(snap, p)).unwrap();

    // The latest version of each path, from the newest snapshot holding it;
    // a link whose first name the older snapshot does not supply gets that
    // snapshot's content of it.
    let r = st.restore(&sc, &[ALL]);
    r.assert_code(0);
    assert!(
        r.stderr
            .contains(&format!("restored 5 entries into ./{OLD}/ and ./{SNAP}/")),
        "{}",
        r.stderr
    );
    assert_eq!(read(SNAP, "d/a"), b"new a!");
    assert_eq!(read(SNAP, "d/same"), b"same");
    assert!(md(SNAP, "d/gone").is_err() && md(SNAP, "d/link").is_err());
    assert_eq!(read(OLD, "d/gone"), b"gone later");
    assert_eq!(read(OLD, "d/link"), b"old a");
    assert!(md(OLD, "d/a").is_err() && md(OLD, "d/same").is_err());
    assert_eq!(md(OLD, "d/link").unwrap().nlink(), 1);

    // --all: every version, each from the oldest snapshot holding it.
    st.clear_work();
    let r = st.restore(&sc, &["--all", ALL]);
    r.assert_code(0);
    assert_eq!(read(OLD, "d/a"), b"old a");
    assert_eq!(read(OLD, "d/same"), b"same");
    assert_eq!(read(OLD, "d/gone"), b"gone later");
    assert_eq!(
        md(OLD, "d/link").unwrap().ino(),
        md(OLD, "d/a").unwrap().ino()
    );
    assert_eq!(read(SNAP, "d/a"), b"new a!");
    assert!(md(SNAP, "d/same").is_err() && md(SNAP, "d/gone").is_err());

    // --snapshot: that one only, whole.
    st.clear_work();
    let r = st.restore(&sc, &["--snapshot", OLD, ALL]);
    r.assert_code(0);
    assert_eq!(read(OLD, "d/same"), b"same");
    assert_eq!(
        fs::read_dir(st.work()).unwrap().count(),
        1,
        "more than {OLD} written"
    );

    // A pattern only an older snapshot matches restores from it alone.
    st.clear_work();
    let r = st.restore(&sc, &["/d/gone"]);
    r.assert_code(0);
    assert_eq!(read(OLD, "d/gone"), b"gone later");
    assert!(md(SNAP, "").is_err(), "{SNAP} made for nothing");
    let r = st.restore(&sc, &["/nowhere"]);
    r.assert_failed(&["nothing in any of the 2 snapshots matches"]);

    // --target: everything below it, nothing in the current directory.
    st.clear_work();
    let target = st.dir.path().join("target");
    fs::create_dir(&target).unwrap();
    let r = st.restore(&sc, &["--target", target.to_str().unwrap(), ALL]);
    r.assert_code(0);
    assert_eq!(fs::read(target.join(SNAP).join("d/a")).unwrap(), b"new a!");
    assert_eq!(
        fs::read(target.join(OLD).join("d/gone")).unwrap(),
        b"gone later"
    );
    assert_eq!(fs::read_dir(st.work()).unwrap().count(), 0);
    assert!(
        r.stderr
            .contains(&format!("into {}/{OLD}/ and", target.display())),
        "{}",
        r.stderr
    );

    // --target missing: a usage error, nothing made.
    let missing = st.dir.path().join("no-such-dir");
    let r = st.restore(&sc, &["--target", missing.to_str().unwrap(), ALL]);
    r.assert_code(2);
    assert!(r.stderr.contains("--target"), "{}", r.stderr);
    assert!(fs::symlink_metadata(&missing).is_err());
    assert_eq!(fs::read_dir(st.work()).unwrap().count(), 0);
    st.sentinel.assert_untouched();
}

#[test]
fn a_path_in_two_snapshots_cannot_lead_outside() {
    if !require_root("a_path_in_two_snapshots_cannot_lead_outside") {
        return;
    }
    let st = Stage::new();
    let outside = st.outside();
    let target = st.dir.path().join("target");
    fs::create_dir(&target).unwrap();

    // `x` a symlink outside in the newest snapshot, a directory holding
    // SENTINEL in the older one: each lands in its own snapshot directory,
    // the older one's `x` a real directory.
    let sc = snapshots_scenario(vec![
        (
            OLD,
            vec![
                dir("x"),
                file("x/SENTINEL", b"evil"),
                file("x/pwn", b"evil"),
            ],
            &[("x/SENTINEL", b"evil"), ("x/pwn", b"evil")],
        ),
        (SNAP, vec![symlink("x", &outside)], &[]),
    ]);
    for args in [
        &[ALL][..],
        &["--all", ALL],
        &["--target", target.to_str().unwrap(), ALL],
        &["--all", "--target", target.to_str().unwrap(), ALL],
    ] {
        st.clear_work();
        let _ = fs::remove_dir_all(target.join(OLD));
        let _ = fs::remove_dir_all(target.join(SNAP));
        let r = st.restore(&sc, args);
        println!("{args:?}: {}", r.stderr.trim());
        r.assert_code(0);
        let base = if args.contains(&"--target") {
            target.clone()
        } else {
            st.work()
        };
        assert!(fs::symlink_metadata(base.join(SNAP).join("x"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(base.join(OLD).join("x"))
            .unwrap()
            .is_dir());
        assert_eq!(
            fs::read(base.join(OLD).join("x/SENTINEL")).unwrap(),
            b"evil"
        );
        st.sentinel.assert_untouched();
    }

    // A link whose first name the older snapshot says is a symlink outside,
    // while the newest holds a file there: the link is made as that symlink
    // (protocol 11: a hard link may name a symlink), never followed.
    let evil_first = vec![symlink("a", &outside.join("SENTINEL")), hardlink("b", "a")];
    let sc = snapshots_scenario(vec![
        (OLD, evil_first.clone(), &[]),
        (SNAP, vec![file("a", b"fine")], &[("a", b"fine")]),
    ]);
    st.clear_work();
    let r = st.restore(&sc, &[ALL]);
    r.assert_code(0);
    let b = st.restored_in(OLD, "b");
    assert_eq!(
        fs::read_link(&b).unwrap(),
        outside.join("SENTINEL"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(st.restored_in(SNAP, "a")).unwrap(), b"fine");
    st.sentinel.assert_untouched();
    // The same the other way round (--all takes the oldest first): the
    // link names the symlink restored beside it.
    let sc = snapshots_scenario(vec![
        (OLD, vec![file("a", b"fine")], &[("a", b"fine")]),
        (SNAP, evil_first, &[]),
    ]);
    for args in [&[ALL][..], &["--all", ALL]] {
        st.clear_work();
        let r = st.restore(&sc, args);
        println!("{args:?}: {}", r.stderr.trim());
        r.assert_code(0);
        let (a, b) = (st.restored_in(SNAP, "a"), st.restored_in(SNAP, "b"));
        assert_eq!(fs::read_link(&b).unwrap(), outside.join("SENTINEL"));
        assert_eq!(
            fs::symlink_metadata(&a).unwrap().ino(),
            fs::symlink_metadata(&b).unwrap().ino()
        );
        st.sentinel.assert_untouched();
    }

    // The older snapshot's directory planted as a symlink outside: refused
    // when the restore gets to it, nothing written through it.
    let sc = snapshots_scenario(vec![
        (
            OLD,
            vec![file("SENTINEL", b"evil")],
            &[("SENTINEL", b"evil")],
        ),
        (SNAP, vec![file("new", b"n")], &[("new", b"n")]),
    ]);
    st.clear_work();
    std::os::unix::fs::symlink(&outside, st.work().join(OLD)).unwrap();
    let r = st.restore(&sc, &[ALL]);
    r.assert_failed(&["refusing to restore through it"]);
    st.sentinel.assert_untouched();
}

#[test]
fn many_snapshots_stay_in_bounded_memory() {
    if !require_root("many_snapshots_stay_in_bounded_memory") {
        return;
    }
    let st = Stage::new();
    // 200 snapshots of 5,000 files each (1,000,000 entries with 64-byte
    // xattrs, every one a version of its own), plus 5 files in each that
    // only it holds. A client that held every path of every snapshot would
    // not fit in 48 MiB; this one remembers 16 bytes per selected path.
    let names: Vec<String> = (0..200)
        .map(|i| format!("2026-{:02}-{:02}T03:00+0000", 1 + i / 28, 1 + i % 28))
        .collect();
    let mut sc = scenario(vec![dir("flood")], &[]);
    sc.snapshots = names.clone();
    sc.flood_parts = 5;
    sc.flood_xattr_len = 64;
    sc.flood_mtime_by_snapshot = true;
    sc.flood_own = 5;
    let limit = Some(48 << 20);
    let started = Instant::now();
    let r = st.restore_limited(&sc, &[ALL], limit);
    println!("latest: {:?}", started.elapsed());
    r.assert_code(0);
    assert_eq!(fs::read_dir(st.work()).unwrap().count(), 200);
    let newest = st.work().join(&names[199]).join("flood");
    assert_eq!(fs::read_dir(&newest).unwrap().count(), 5005);
    assert_eq!(
        fs::metadata(newest.join("000000004999")).unwrap().mtime(),
        199
    );
    for (i, n) in names.iter().enumerate().take(199) {
        let flood = st.work().join(n).join("flood");
        let mut got: Vec<String> = fs::read_dir(&flood)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        let want: Vec<String> = (0..5).map(|j| format!("own-{i:04}-{j:06}")).collect();
        assert_eq!(got, want, "{n}");
    }

    // --all: every version of two paths, each in its own snapshot's directory.
    let target = st.dir.path().join("all");
    fs::create_dir(&target).unwrap();
    let started = Instant::now();
    let r = st.restore_limited(
        &sc,
        &[
            "--all",
            "--target",
            target.to_str().unwrap(),
            "/flood/00000000000[01]",
        ],
        limit,
    );
    println!("all: {:?}", started.elapsed());
    r.assert_code(0);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 200);
    for (i, n) in names.iter().enumerate() {
        let f = target.join(n).join("flood/000000000001");
        assert_eq!(fs::metadata(&f).unwrap().mtime(), i as i64, "{n}");
        assert_eq!(
            fs::read_dir(target.join(n).join("flood")).unwrap().count(),
            2
        );
    }
    st.sentinel.assert_untouched();
}

//! End to end: real `byteback-backup`, `byteback-server` and `byteback-restore`
//! processes, plain and btrfs stores, rsync as the oracle.

use crate::util;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use util::*;

/// Restores everything of `snapshot` (or the newest) into `into`; returns `<into>/<snapshot>`.
fn restore_all(store: &Path, host: &str, snapshot: Option<&str>, into: &Path) -> PathBuf {
    fs::create_dir_all(into).unwrap();
    let mut cmd = Command::new(bin("byteback-restore"));
    cmd.current_dir(into)
        .arg("--destination")
        .arg(store)
        .args(["--hostname", host, "--restore"]);
    if let Some(s) = snapshot {
        cmd.args(["--snapshot", s]);
    }
    run(cmd.arg("/"));
    let snap = snapshot
        .map(str::to_string)
        .unwrap_or_else(|| snapshots(store, host).pop().unwrap());
    into.join(snap)
}

/// `byteback-backup` of `src` as host `h` into the local store `store`,
/// with the debug-build fault `var`=`value`; its output, whatever its exit.
fn backup_with_fault(store: &Path, src: &Path, var: &str, value: &str) -> Output {
    run_status(
        Command::new(bin("byteback-backup"))
            .env(var, value)
            .arg("--destination")
            .arg(store)
            .arg("--source")
            .arg(src)
            .args(["--hostname", "h", "--retry-number", "0"]),
    )
}

/// A scratch directory with an empty `src/` and a `store/` that takes a
/// snapshot at every backup: what most tests here start from.
fn site() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let store = d.path().join("store");
    store_without_interval(&store);
    (d, src, store)
}

fn restored_path(root: &Path, src: &Path) -> PathBuf {
    root.join(src.strip_prefix("/").unwrap())
}

/// Edits of every kind between two backups.
fn edit_tree(src: &Path, rng: &mut Rng) {
    let big = src.join("big.bin");
    let mut data = rng.bytes(3 << 20);
    fs::write(&big, &data).unwrap();
    fs::write(src.join("append.log"), b"line 1\n").unwrap();
    fs::write(src.join("shrink.txt"), vec![b'x'; 100_000]).unwrap();
    fs::write(src.join("doomed.txt"), b"to be deleted").unwrap();
    fs::create_dir_all(src.join("olddir/inner")).unwrap();
    fs::write(src.join("olddir/inner/f"), b"f").unwrap();
    fs::write(src.join("becomes-dir"), b"file now").unwrap();
    fs::write(src.join("rename-me"), b"moving").unwrap();
    let _ = &mut data;
}

fn edit_tree_again(src: &Path, rng: &mut Rng) {
    let big = src.join("big.bin");
    let mut data = fs::read(&big).unwrap();
    // In-place rewrite of a few blocks and an insertion.
    data[1_000_000..1_000_100].copy_from_slice(&rng.bytes(100));
    data.splice(2_000_000..2_000_000, rng.bytes(777));
    fs::write(&big, &data).unwrap();
    fs::write(src.join("append.log"), b"line 1\nline 2\n").unwrap();
    fs::write(src.join("shrink.txt"), b"short").unwrap();
    fs::remove_file(src.join("doomed.txt")).unwrap();
    fs::remove_dir_all(src.join("olddir")).unwrap();
    fs::remove_file(src.join("becomes-dir")).unwrap();
    fs::create_dir(src.join("becomes-dir")).unwrap();
    fs::write(src.join("becomes-dir/child"), b"child").unwrap();
    fs::rename(src.join("rename-me"), src.join("renamed")).unwrap();
    fs::write(src.join("brand-new"), rng.bytes(5000)).unwrap();
}

fn round_trip(store: &Path, work: &Path) {
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(7);
    make_rich_tree(&src, &mut rng);
    store_without_interval(store);
    local_backup(store, &src, "rich");
    let root = restore_all(store, "rich", None, &work.join("restore"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

/// `--compress`: data for a local store is stored as it is by default
/// (compressing bytes that never leave the machine only costs CPU),
/// compressed with `always`; what is stored is the same either way.
#[test]
fn data_for_a_local_store_is_compressed_only_when_asked() {
    let dir = scratch();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let mut rng = Rng::new(0xC0);
    let text = b"backup snapshot delta block server client ".repeat(100_000);
    fs::write(src.join("text.txt"), &text).unwrap();
    for i in 0..200 {
        fs::write(src.join(format!("d/small{i}")), &text[i..i + 3000]).unwrap();
    }
    fs::write(src.join("random.bin"), rng.bytes(1 << 20)).unwrap();
    let raw = (text.len() + 200 * 3000 + (1 << 20)) as u64;
    let store = dir.path().join("store");
    let mut wire = vec![];
    for (mode, host) in [("auto", "a"), ("always", "b"), ("never", "c")] {
        let out = run(Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(&store)
            .arg("--source")
            .arg(&src)
            .args([
                "--hostname",
                host,
                "--retry-number",
                "0",
                "--compress",
                mode,
            ]));
        let err = stderr(&out);
        wire.push(summary_number(&err, " on the wire").expect(&err));
        let root = restore_all(&store, host, None, &dir.path().join(host));
        assert_same_tree(&src, &restored_path(&root, &src));
    }
    eprintln!("{raw} bytes of data; on the wire (auto, always, never): {wire:?}");
    assert!(wire[0] >= raw && wire[2] >= raw, "stored: {wire:?}, {raw}");
    assert!(wire[1] < raw / 2, "compressed: {wire:?}, {raw}");
    let bad = run_status(
        Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(&store)
            .args(["--source", "/nonexistent", "--compress", "sometimes"]),
    );
    assert_eq!(bad.status.code(), Some(2), "{}", output_text(&bad));
    assert!(stderr(&bad).contains("--compress"), "{}", output_text(&bad));
    // A source that does not exist is a configuration error too (exit 2,
    // never retried: a retry would not make it exist), beside one that does.
    let missing = run_status(
        Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(&store)
            .args(["--retry-number", "3", "--retry-delay", "60", "--source"])
            .arg(&src)
            .arg("/nonexistent"),
    );
    let out = output_text(&missing);
    assert_eq!(missing.status.code(), Some(2), "{out}");
    assert!(out.contains("source /nonexistent does not exist"), "{out}");
}

/// A file whose tail is zeros (a hole: a `lastlog`, a preallocated
/// database or disc image) changed just before that tail: the rebuild
/// leaves the tail a hole, counted in its length only once placed, and
/// the check of its BLAKE3 read back part of that tail. Before, that read
/// failed ("failed to fill whole buffer") and with it the whole attempt,
/// every time such a file changed; a retry got through only by resuming
/// from what the failed attempt left. On a plain store and on btrfs (where
/// the unchanged ranges are clones), each first attempt must succeed. And
/// its holes are not counted as the host's growth (the first backup of
/// this 64 MiB file with 4 KiB of data counted 64 MiB before).
#[test]
fn a_file_changed_just_before_a_tail_of_zeros_is_stored_at_the_first_attempt() {
    let btrfs = is_root().then(|| BtrfsLoop::new(300));
    if btrfs.is_none() {
        require_root("btrfs loop filesystem");
    }
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let stores = std::iter::once(d.path().join("store"))
        .chain(btrfs.as_ref().map(|b| b.mount.join("store")));
    let mut rng = Rng::new(0x5A);
    for (k, store) in stores.enumerate() {
        store_without_interval(&store);
        let f = src.join("lastlog");
        let file = fs::File::create(&f).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&rng.bytes(4096), 0).unwrap();
        let backup = || run_status(&mut local_backup_cmd(&store, &src, "h"));
        // Bytes the host's usage log has counted so far.
        let counted = || -> u64 {
            let text = fs::read_to_string(store.join("h/.byteback-usage")).unwrap_or_default();
            text.lines()
                .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
                .sum()
        };
        for at in [0u64, 4000 * 4096, 9000 * 4096] {
            if at > 0 {
                file.write_all_at(&rng.bytes(4096), at).unwrap();
            }
            let before = counted();
            let o = backup();
            assert_eq!(o.status.code(), Some(0), "at {at}: {}", output_text(&o));
            // The holes are no growth (64 MiB were counted for the first
            // backup before): the file's data, the kept signature and the
            // manifest are.
            let grown = counted() - before;
            assert!(grown < 2 << 20, "at {at}: {grown} bytes counted as growth");
            let stored = restored_path(&store.join("h/current"), &src).join("lastlog");
            assert!(
                fs::read(&stored).unwrap() == fs::read(&f).unwrap(),
                "at {at}"
            );
            // Still sparse in the store.
            assert!(allocated_bytes(&stored) < 8 << 20, "at {at}");
        }
        // And restored as it is, holes included.
        let into = d.path().join(format!("restore{k}"));
        let restored = restored_path(&restore_all(&store, "h", None, &into), &src).join("lastlog");
        assert!(fs::read(&restored).unwrap() == fs::read(&f).unwrap());
        assert!(allocated_bytes(&restored) < 8 << 20);
        fs::remove_file(&f).unwrap();
    }
}

/// A server that trickles its answer to the handshake, a byte a second
/// (each resets --io-timeout), is given up on as a whole: before, a
/// hostile or broken server held the run for as long as it liked. (The
/// limit, 120 s, is shortened for the test.)
#[test]
fn a_server_trickling_its_handshake_is_given_up_on() {
    use std::os::unix::fs::PermissionsExt;
    let (d, src, store) = site();
    let trickle = d.path().join("trickle");
    // A frame's length within the cap (256 or 65,536 bytes, whichever the
    // byte order), then its payload a byte a second.
    let script = "#!/bin/sh\nprintf '\\000\\001\\000\\000'\nwhile :; do printf x; sleep 1; done\n";
    fs::write(&trickle, script).unwrap();
    fs::set_permissions(&trickle, fs::Permissions::from_mode(0o755)).unwrap();
    let (out, took) = run_bounded(
        local_backup_cmd(&store, &src, "h")
            .env("BYTEBACK_SERVER", &trickle)
            .env("BYTEBACK_TEST_HANDSHAKE_LIMIT_SECS", "3"),
        std::time::Duration::from_secs(60),
        trickle.to_str().unwrap(),
    );
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("did not complete the handshake within 3 s"),
        "{text}"
    );
    assert!(
        took < std::time::Duration::from_secs(30),
        "{took:?}: {text}"
    );
}

/// A local server that does not end after it committed the backup (here
/// its wrapper sleeps after the real server, as a prune stuck on a slow
/// store would) holds the client only a bounded time (60 s; 3 s here
/// through a debug-build knob), then costs a warning: the backup succeeds,
/// its snapshot taken; so for a listing. Before, the client waited for it
/// for ever (over SSH it was bounded already).
#[test]
fn a_local_server_that_does_not_end_after_the_session_does_not_hold_the_client() {
    use std::os::unix::fs::PermissionsExt;
    let (d, src, store) = site();
    fs::write(src.join("f"), b"held").unwrap();
    let held = d.path().join("held-server");
    let script = format!(
        "#!/bin/sh\n'{}' \"$@\"\nexec sleep 307\n",
        bin("byteback-server").display()
    );
    fs::write(&held, script).unwrap();
    fs::set_permissions(&held, fs::Permissions::from_mode(0o755)).unwrap();
    let client = |prog: &str| {
        let mut c = Command::new(bin(prog));
        c.env("BYTEBACK_SERVER", &held)
            .env("BYTEBACK_TEST_POST_COMMIT_WAIT_SECS", "3")
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "h"]);
        c
    };
    let limit = std::time::Duration::from_secs(60);
    let mut backup = client("byteback-backup");
    backup
        .arg("--source")
        .arg(&src)
        .args(["--retry-number", "0"]);
    let (o, took) = run_bounded(&mut backup, limit, "sleep 307");
    let mut list = client("byteback-restore");
    list.args(["--list", "/**"]);
    let (l, listed) = run_bounded(&mut list, limit, "sleep 307");
    for (pid, _) in processes_naming("sleep 307") {
        kill9(pid);
    }
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("after the backup: the server")
            && text.contains("had not ended 3 s after the backup"),
        "{text}"
    );
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    assert_eq!(snapshots(&store, "h").len(), 1);
    let text = output_text(&l);
    assert_eq!(l.status.code(), Some(0), "{text}");
    assert!(
        text.contains("had not ended 3 s after the session"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&l.stdout).contains("/f"), "{text}");
    assert!(listed < std::time::Duration::from_secs(30), "{listed:?}");
}

/// A walk stuck in a system call that never returns (a source filesystem
/// that stopped answering; injected in a debug build) cannot be woken when
/// --io-timeout fails the attempt: the run ends without it 120 s later (3 s
/// here through a debug-build knob), saying why, its post-backup hooks run
/// and told it failed, its --json report printed. Before, the run never
/// ended, holding its locks (and with them every later run).
#[test]
fn a_walk_stuck_in_the_kernel_does_not_hold_the_run_for_ever() {
    use std::os::unix::fs::PermissionsExt;
    let (d, src, store) = site();
    fs::create_dir_all(src.join("stuck/below")).unwrap();
    fs::write(src.join("stuck/below/f"), b"x").unwrap();
    let config = d.path().join("config");
    let hooks = config.join("post-backup.d");
    fs::create_dir_all(&hooks).unwrap();
    let told = d.path().join("told");
    let hook = hooks.join("10-say");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$BYTEBACK_STATUS\" > '{}'\n",
            told.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let (o, took) = run_bounded(
        local_backup_cmd(&store, &src, "h")
            .env("BYTEBACK_CONFIG_DIR", &config)
            .env("BYTEBACK_TEST_WALK_STALL", "stuck")
            .env("BYTEBACK_TEST_STUCK_LIMIT_SECS", "3")
            .args(["--io-timeout", "3", "--json"]),
        std::time::Duration::from_secs(60),
        src.to_str().unwrap(),
    );
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("no data moved for 3 s"), "{text}");
    assert!(
        text.contains("the backup did not stop within 3 s of that"),
        "{text}"
    );
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    assert_eq!(fs::read_to_string(&told).unwrap().trim(), "1", "{text}");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect(&text);
    assert_eq!(json["status"], "failed", "{json}");
    assert!(snapshots(&store, "h").is_empty());
}

/// A server that trickles its answers, a byte every 200 ms (so that no
/// timeout based on idleness fires), holds the run no longer than
/// --max-time (two days by default) in all: the attempt then fails and no
/// retry follows. Before, a hostile or broken server held it for ever.
#[test]
fn a_trickling_server_holds_the_run_no_longer_than_max_time() {
    let (_d, src, store) = site();
    fs::write(src.join("f"), b"data").unwrap();
    // A manifest, whose generation the answer to the start of the next
    // backups carries: 3 s is then over while that answer trickles in
    // (about 8 s), which is cut short; 12 s is over later.
    local_backup(&store, &src, "h");
    for max in [3, 12] {
        let took = trickled_backup(&src, &store, max);
        assert!(
            took < std::time::Duration::from_secs(max + 4),
            "--max-time {max}: {took:?}"
        );
    }
    // A listing too, with --max-time (no limit by default for restores).
    let (o, took) = run_bounded(
        Command::new(bin("byteback-restore"))
            .env("BYTEBACK_SERVER", bin("byteback-fake-server"))
            .env("BYTEBACK_FAKE_TRICKLE", bin("byteback-server"))
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "h", "--list", "--max-time", "3", "/**"]),
        std::time::Duration::from_secs(90),
        store.to_str().unwrap(),
    );
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("it ran for more than 3 s (--max-time)"),
        "{text}"
    );
    assert!(took < std::time::Duration::from_secs(7), "{took:?}: {text}");
}

/// A backup of `src` into `store` through a trickling server, with
/// `--max-time max`: it fails saying why, with no retry; how long it took.
fn trickled_backup(src: &Path, store: &Path, max: u64) -> std::time::Duration {
    let (o, took) = run_bounded(
        Command::new(bin("byteback-backup"))
            .env("BYTEBACK_SERVER", bin("byteback-fake-server"))
            .env("BYTEBACK_FAKE_TRICKLE", bin("byteback-server"))
            .arg("--destination")
            .arg(store)
            .arg("--source")
            .arg(src)
            .args([
                "--hostname",
                "h",
                "--retry-number",
                "3",
                "--retry-delay",
                "1",
            ])
            .args(["--max-time", &max.to_string()]),
        std::time::Duration::from_secs(90),
        store.to_str().unwrap(),
    );
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "the backup ran for more than {max} s (--max-time)"
        )),
        "{text}"
    );
    assert!(!text.contains("retrying"), "{text}");
    took
}

/// 3,000 files with long names in `src`: `-v` names them in far more than
/// a pipe or a terminal holds.
fn many_names(src: &Path) {
    for i in 0..3000 {
        fs::write(src.join(format!("a-file-with-a-longish-name-{i:05}")), b"x").unwrap();
    }
}

/// A stderr nobody reads (a pipe to a stopped reader, a stalled journal)
/// does not stop the run: a write waits for room at most 5 s, and what
/// finds none is dropped and counted. Here `-v` names 3,000 files, far
/// more than a pipe holds, and the pipe is never read. Before, every
/// thread of the client blocked on its next line for ever, and
/// --io-timeout could not end it.
#[test]
fn a_stderr_nobody_reads_does_not_stop_the_backup() {
    let (_d, src, store) = site();
    many_names(&src);
    let start = std::time::Instant::now();
    let mut child = local_backup_cmd(&store, &src, "h")
        .arg("-v")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_until(&mut child, start, std::time::Duration::from_secs(90));
    let Some(status) = status else {
        panic!("HANG: the backup is still running after 90 s with its stderr full");
    };
    assert!(status.success(), "{status:?}");
    let snaps = snapshots(&store, "h");
    assert_eq!(snaps.len(), 1);
    let stored = restored_path(&store.join("h").join(&snaps[0]), &src);
    assert_eq!(fs::read_dir(stored).unwrap().count(), 3000);
}

/// The same on a terminal whose reader stopped (an SSH session whose
/// network died; here `script`'s pseudo-terminal, `script` itself blocked
/// on a pipe nobody reads), with the progress bar shown and `-v`: the
/// backup ends. Before, a write with some room on the terminal, and the
/// bar's redraw, blocked for ever.
#[test]
fn a_terminal_nobody_reads_does_not_stop_the_backup() {
    let (_d, src, store) = site();
    many_names(&src);
    let line = format!(
        "'{}' --destination '{}' --source '{}' --hostname h --retry-number 0 -v --progress",
        bin("byteback-backup").display(),
        store.display(),
        src.display()
    );
    let mut script = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let marker = src.to_str().unwrap();
    let ended = loop {
        let running = processes_naming(marker)
            .iter()
            .any(|(_, cmd)| cmd.contains("byteback-backup") && !cmd.contains("script"));
        if !running && !snapshots(&store, "h").is_empty() {
            break true;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    for (pid, _) in processes_naming(marker) {
        kill9(pid);
    }
    let _ = script.kill();
    let _ = script.wait();
    assert!(
        ended,
        "HANG: the backup still runs after 60 s, its terminal unread"
    );
    let snaps = snapshots(&store, "h");
    let stored = restored_path(&store.join("h").join(&snaps[0]), &src);
    assert_eq!(fs::read_dir(stored).unwrap().count(), 3000);
}

#[test]
fn rich_tree_round_trip_plain_store() {
    let d = scratch();
    round_trip(&d.path().join("store"), d.path());
}

#[test]
fn rich_tree_round_trip_btrfs_store() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(400);
    let d = scratch();
    round_trip(&fs_.mount.join("store"), d.path());
    // On btrfs, current is a subvolume and the snapshot is a read-only one.
    let snap = snapshots(&fs_.mount.join("store"), "rich").pop().unwrap();
    assert!(is_btrfs_subvolume(&fs_.mount.join("store/rich/current")));
    assert!(is_read_only_snapshot(
        &fs_.mount.join("store/rich").join(snap)
    ));
}

fn second_backup(store: &Path, work: &Path) {
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(11);
    make_rich_tree(&src.join("rich"), &mut {
        fs::create_dir_all(src.join("rich")).unwrap();
        Rng::new(3)
    });
    edit_tree(&src, &mut rng);
    store_without_interval(store);
    local_backup(store, &src, "h");
    let first = snapshots(store, "h").pop().unwrap();
    let first_path = store.join("h").join(&first);
    let before = tree_digest(&first_path);
    let copy_of_source = work.join("copy1");
    // cp -a keeps nanosecond mtimes everywhere (rsync rounds some directory times).
    run(Command::new("cp").arg("-a").arg(&src).arg(&copy_of_source));

    edit_tree_again(&src, &mut rng);
    let out = local_backup(store, &src, "h");
    let snaps = snapshots(store, "h");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let second = snaps[1].clone();
    // The new snapshot equals the new source.
    let root2 = restore_all(store, "h", Some(&second), &work.join("r2"));
    assert_same_tree(&src, &restored_path(&root2, &src));
    // The old snapshot is unchanged, still restores the old tree, and is read-only.
    assert_eq!(digest_diff(&before, &tree_digest(&first_path)), "");
    let root1 = restore_all(store, "h", Some(&first), &work.join("r1"));
    assert_same_tree(&copy_of_source, &restored_path(&root1, &src));
    assert!(
        is_read_only(&first_path),
        "{} is writable",
        first_path.display()
    );
    assert!(is_read_only(&store.join("h").join(&second)));
    // Only the changed data crossed: far less than the 3 MiB file, the
    // rest of which was reused; what went is counted as deleted.
    let e = stderr(&out);
    let new = summary_number(&e, " bytes new").expect(&e);
    let reused = summary_number(&e, " reused").expect(&e);
    let deleted = summary_number(&e, " deleted").expect(&e);
    eprintln!("second backup: {new} bytes new, {reused} reused, {deleted} deleted");
    assert!(new < 200_000, "{e}");
    assert!(reused > 2_900_000, "{e}");
    // doomed.txt, olddir (with all below it) and rename-me.
    assert_eq!(deleted, 3, "{e}");

    // A third run with nothing changed sends no file at all.
    let out = local_backup(store, &src, "h");
    let e = stderr(&out);
    assert!(e.contains(" 0 files sent"), "{e}");
}

#[test]
fn second_backup_after_edits_plain_store() {
    let d = scratch();
    second_backup(&d.path().join("store"), d.path());
}

#[test]
fn second_backup_after_edits_btrfs_store() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(400);
    let d = scratch();
    second_backup(&fs_.mount.join("store"), d.path());
}

fn btrfs_data_used(mount: &Path) -> u64 {
    run(&mut Command::new("sync"));
    run(Command::new("btrfs")
        .args(["filesystem", "sync"])
        .arg(mount));
    let out = run(Command::new("btrfs")
        .args(["filesystem", "df", "--raw"])
        .arg(mount));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("Data"))
        .unwrap_or_else(|| panic!("{text}"));
    let used = line.split("used=").nth(1).unwrap().trim();
    used.parse().unwrap_or_else(|_| panic!("{line}"))
}

/// A large file with a few changed blocks adds only about those blocks to the
/// new snapshot: unchanged ranges are cloned from the old version.
#[test]
fn changed_blocks_share_extents_on_btrfs() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(600);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(5);
    let size = 96usize << 20;
    let mut data = rng.bytes(size);
    fs::write(src.join("disk.img"), &data).unwrap();
    local_backup(&store, &src, "vm");
    let before = btrfs_data_used(&fs_.mount);
    for i in 0..8 {
        let off = (i * 11 + 3) * (1 << 20) + 4096 * i;
        data[off..off + 4096].copy_from_slice(&rng.bytes(4096));
    }
    fs::write(src.join("disk.img"), &data).unwrap();
    let out = local_backup(&store, &src, "vm");
    let after = btrfs_data_used(&fs_.mount);
    let added = after.saturating_sub(before);
    eprintln!(
        "second backup added {added} bytes of data for 8 changed 4 KiB blocks in a 96 MiB file"
    );
    assert!(
        added < 8 << 20,
        "added {added} bytes: ranges were copied, not cloned\n{}",
        stderr(&out)
    );
    // The unchanged ranges were cloned without being read again: the kept
    // chaining values of the first backup's copy were used.
    assert!(
        stderr(&out).contains("1 changed files rebuilt from kept chaining values"),
        "kept chaining values not used:\n{}",
        stderr(&out)
    );
    let root = restore_all(&store, "vm", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

/// A multi-segment file edited in place (4 KiB blocks rewritten: the
/// delta's aligned fast path), with 7 bytes inserted in the middle (the
/// data behind is shifted: the fast path lines up again after the next
/// copy) and data appended, restores exactly, and only about the changed
/// blocks, the insertion and the appended data travel as new bytes.
#[test]
fn in_place_edits_insertion_and_append_in_a_large_file() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(12);
    let size = 40usize << 20;
    let mut data = rng.bytes(size);
    fs::write(src.join("big.img"), &data).unwrap();
    fs::write(src.join("sentinel"), b"untouched").unwrap();
    local_backup(&store, &src, "fp");
    let rewrites = 50;
    for i in 0..rewrites {
        let off = (i * 197 + 5) % (size / 4096) * 4096;
        data[off..off + 4096].copy_from_slice(&rng.bytes(4096));
    }
    let mid = size / 2 + 1000;
    data.splice(mid..mid, b"7 bytes".iter().copied());
    let appended = 1 << 20;
    data.extend_from_slice(&rng.bytes(appended));
    fs::write(src.join("big.img"), &data).unwrap();
    let out = local_backup(&store, &src, "fp");
    let e = stderr(&out);
    let new = summary_number(&e, " bytes new").unwrap_or_else(|| panic!("{e}"));
    // The block size for 40 MiB is 8 KiB: a rewritten 4 KiB costs at most
    // a block, the insertion its block and itself, the appended data itself.
    eprintln!("in-place edits, insertion, append: {new} bytes new");
    assert!(
        new <= (rewrites as u64 + 1) * 8192 + 7 + appended as u64,
        "{new} bytes new\n{e}"
    );
    let root = restore_all(&store, "fp", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

/// The block size of a basis of `len` bytes is `bs`, and its last block short.
fn block_size_ok(len: usize, bs: usize) -> bool {
    byteback_delta::block_size_for(len as u64) as usize == bs && !len.is_multiple_of(bs)
}

/// A file whose length is not a multiple of the block size ends in a short
/// block: grown, only the new bytes travel (the old short block is found
/// where the data goes on in line); changed elsewhere, its end is copied.
#[test]
fn a_grown_file_costs_its_new_bytes_and_an_unchanged_short_tail_is_copied() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(13);
    // Half a block past a multiple of the block size, and a short last
    // block again after the append.
    let bs = byteback_delta::block_size_for(5_000_000) as usize;
    let len = 5_000_000 / bs * bs + bs / 2;
    let grown = len + 10_000;
    let bs2 = byteback_delta::block_size_for(grown as u64) as usize;
    assert!(
        block_size_ok(len, bs) && !grown.is_multiple_of(bs2),
        "{len} {bs} {grown} {bs2}"
    );
    let mut data = rng.bytes(len);
    fs::write(src.join("app.log"), &data).unwrap();
    local_backup(&store, &src, "tail");
    data.extend_from_slice(&rng.bytes(10_000));
    fs::write(src.join("app.log"), &data).unwrap();
    let e = stderr(&local_backup(&store, &src, "tail"));
    let new = summary_number(&e, " bytes new").unwrap_or_else(|| panic!("{e}"));
    assert_eq!(new, 10_000, "appended 10,000 bytes:\n{e}");
    // One byte changed at the start: its block travels, the tail does not.
    data[100] ^= 0xff;
    fs::write(src.join("app.log"), &data).unwrap();
    let e = stderr(&local_backup(&store, &src, "tail"));
    let new = summary_number(&e, " bytes new").unwrap_or_else(|| panic!("{e}"));
    assert_eq!(new, bs2 as u64, "one changed byte, blocks of {bs2}:\n{e}");
    let root = restore_all(&store, "tail", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

#[test]
fn client_paths_cannot_reach_the_manifest() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    // A source at the root would be needed for a top-level `.byteback`; use a
    // nested source whose top component we cannot choose, plus a direct check
    // of the escaping through a source named .byteback under a fake root.
    let src = d.path().join("src");
    fs::create_dir_all(src.join(".byteback")).unwrap();
    fs::write(src.join(".byteback/manifest"), b"not the manifest").unwrap();
    fs::write(src.join(".byteback-x"), b"x").unwrap();
    local_backup(&store, &src, "m");
    let root = restore_all(&store, "m", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

#[test]
fn a_file_named_with_every_odd_byte_round_trips() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let names: Vec<Vec<u8>> = vec![
        b"with space".to_vec(),
        b"new\nline".to_vec(),
        vec![0xff, 0xfe, b'x'],
        b"-dash".to_vec(),
        b"back\\slash".to_vec(),
        vec![b'n'; 255],
        b"*?[glob]{a,b}".to_vec(),
    ];
    for n in &names {
        fs::write(src.join(OsStr::from_bytes(n)), n).unwrap();
    }
    local_backup(&store, &src, "n");
    let root = restore_all(&store, "n", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

#[test]
fn restore_list_shows_versions() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f.txt"), b"one").unwrap();
    local_backup(&store, &src, "l");
    fs::write(src.join("f.txt"), b"two!").unwrap();
    set_mtime(&src.join("f.txt"), 2_000_000_000, 5);
    local_backup(&store, &src, "l");
    let list = |extra: &[&str]| {
        let out = run(Command::new(bin("byteback-restore"))
            .current_dir(&src)
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "l", "--list"])
            .args(extra)
            .arg("*.txt"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let latest = list(&[]);
    let lines: Vec<&str> = latest.lines().collect();
    // 1.x's columns, and its mtimes (Ruby's Time#to_s, local time).
    let heading: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        heading,
        [
            "snapshot",
            "modestring",
            "size",
            "uid",
            "gid",
            "mtime",
            "path"
        ],
        "{latest}"
    );
    assert!(lines[1].starts_with("----"), "{latest}");
    assert_eq!(lines.len(), 3, "{latest}");
    assert!(
        lines[2].contains(" 4 ") && lines[2].contains("-rw"),
        "{latest}"
    );
    let mtime = byteback_protocol::os::localtime(2_000_000_000)
        .unwrap()
        .to_listing();
    assert!(mtime.len() == 25 && mtime.contains(' '), "{mtime}");
    assert!(lines[2].contains(&format!(" {mtime} ")), "{latest}");
    let all = list(&["--all"]);
    assert_eq!(all.lines().count(), 4, "{all}");
}

/// A directory too large for one window of names (made small here with
/// the debug builds' `BYTEBACK_TEST_DIR_WINDOW`; 8 MiB of names for all
/// the directories walked, in release builds) is walked and swept in
/// several readings of it, and lets go of its window while a
/// subdirectory is walked: every name once and in order, and what only
/// the sweep removes (strays in a `current` an interrupted backup left)
/// removed in every window. Both sides held all of a directory's names
/// at once.
#[test]
fn a_directory_read_in_many_windows_is_backed_up_and_swept_whole() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    let big = src.join("big");
    fs::create_dir_all(big.join("sub")).unwrap();
    let name = |i: usize| format!("f{i:04}-{}", "x".repeat(i % 30));
    for i in 0..600 {
        fs::write(big.join(name(i)), i.to_string()).unwrap();
    }
    for i in 0..50 {
        fs::write(big.join("sub").join(format!("s{i}")), b"s").unwrap();
    }
    // After `sub`: the names a window let go of while `sub` was walked
    // (or swept) and read again after it.
    for i in 0..100 {
        fs::write(big.join(format!("z-{i:03}")), b"z").unwrap();
    }
    let backup =
        || run(local_backup_cmd(&store, &src, "h").env("BYTEBACK_TEST_DIR_WINDOW", "2048"));
    backup();
    let root = restore_all(&store, "h", None, &d.path().join("r1"));
    assert_same_tree(&src, &restored_path(&root, &src));
    let current = store.join("h/current").join(src.strip_prefix("/").unwrap());
    for i in (0..600).step_by(3) {
        fs::remove_file(big.join(name(i))).unwrap();
    }
    for i in 0..100 {
        fs::write(big.join(format!("g{i}")), b"new").unwrap();
    }
    for i in (0..100).step_by(7) {
        fs::remove_file(big.join(format!("z-{i:03}"))).unwrap();
    }
    for stray in [
        "big/0-stray",
        "big/m-stray",
        "big/zzz-stray",
        "big/sub/zz-stray",
    ] {
        fs::write(current.join(stray), b"stray").unwrap();
    }
    fs::remove_file(store.join("h/current/.byteback/clean")).unwrap();
    backup();
    for stray in [
        "big/0-stray",
        "big/m-stray",
        "big/zzz-stray",
        "big/sub/zz-stray",
    ] {
        assert!(!current.join(stray).exists(), "{stray} kept");
    }
    let root = restore_all(&store, "h", None, &d.path().join("r2"));
    assert_same_tree(&src, &restored_path(&root, &src));
    // Removed between two of its windows (getdents says ENOENT): its
    // names not read yet are vanished, and the walk goes on (it read
    // that window again for ever).
    let marker = d.path().display().to_string();
    let (o, _) = run_bounded(
        local_backup_cmd(&store, &src, "h")
            .env("BYTEBACK_TEST_DIR_WINDOW", "2048")
            .env("BYTEBACK_TEST_GONE_WINDOW", "big"),
        std::time::Duration::from_secs(60),
        &marker,
    );
    let err = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        err.matches("big: vanished during the backup").count(),
        1,
        "{err}"
    );
}

/// A filesystem mounted beneath a bind mount whose own files are backed up
/// elsewhere (private mount propagation: it shows only there), or beneath
/// a second mount of a filesystem, is in the backup: the walk left both
/// mounts out and those filesystems were in no backup, exit 0, nothing
/// said. With `--one-file-system`, a bind mount of the source's own
/// filesystem is walked, as `rsync -x` walks it.
#[test]
fn filesystems_mounted_beneath_a_bind_or_second_mount_are_backed_up() {
    if !require_root("mounts in a private mount namespace") {
        return;
    }
    let (d, src, store) = site();
    let img = |name: &str| {
        let p = d.path().join(name);
        fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&p));
        p
    };
    let (a, b, c) = (img("a.img"), img("b.img"), img("c.img"));
    for dir in ["data/www", "srv/www", "t/disk", "t/disk2"] {
        fs::create_dir_all(src.join(dir)).unwrap();
    }
    fs::write(src.join("data/www/index.html"), b"index").unwrap();
    let script = format!(
        "set -e
         mount --bind data/www srv/www
         mkdir -p data/www/uploads
         mount -o loop {a} srv/www/uploads
         echo photo > srv/www/uploads/photo.jpg
         loop=$(losetup -f --show {b})
         trap 'losetup -d $loop' EXIT
         mount $loop t/disk
         mount $loop t/disk2
         mkdir -p t/disk/inner
         mount -o loop {c} t/disk2/inner
         echo inner > t/disk2/inner/file
         \"$@\" --hostname h -r 0 -s \"$PWD\"
         \"$@\" --hostname x -r 0 --one-file-system -s \"$PWD/srv\"",
        a = a.display(),
        b = b.display(),
        c = c.display()
    );
    let o = run(Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "bash",
            "-c",
            &script,
            "bash",
        ])
        .arg(bin("byteback-backup"))
        .arg("-d")
        .arg(&store)
        .current_dir(&src));
    let err = output_text(&o);
    let current = |host: &str| {
        store
            .join(host)
            .join("current")
            .join(src.strip_prefix("/").unwrap())
    };
    let read = |p: PathBuf| fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}\n{err}", p.display()));
    assert_eq!(
        read(current("h").join("srv/www/uploads/photo.jpg")),
        b"photo\n"
    );
    assert_eq!(read(current("h").join("t/disk2/inner/file")), b"inner\n");
    assert_eq!(read(current("h").join("data/www/index.html")), b"index");
    assert_eq!(read(current("x").join("srv/www/index.html")), b"index");
    assert!(
        !current("x").join("srv/www/uploads/photo.jpg").exists(),
        "{err}"
    );
}

/// A directory with more xattr names than the kernel lists at once
/// (64 KiB; anyone who may write to it can add them, on btrfs or XFS) is
/// backed up without its xattrs, with a warning, and what is below it is
/// backed up: it was kept as the last backup had it, all below frozen.
#[test]
fn a_directory_with_too_many_xattr_names_is_backed_up_with_what_is_below() {
    if !require_root("a btrfs source (mount)") {
        return;
    }
    let fs_ = BtrfsLoop::new(256);
    let src = fs_.mount.join("src");
    let shared = src.join("shared");
    fs::create_dir_all(shared.join("sub")).unwrap();
    for i in 0..300 {
        let name = format!("user.{i:03}{}", "n".repeat(240));
        rustix::fs::setxattr(
            &shared,
            name.as_str(),
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    fs::write(shared.join("sub/new"), b"below").unwrap();
    // Its ACL is read by name: without it, a restore would give the
    // owning group the ACL's mask.
    run(Command::new("setfacl")
        .args(["-m", "u:1001:rwx,g::-"])
        .arg(&shared));
    let acl = |p: &Path| {
        let mut v = vec![0u8; 256];
        let n = rustix::fs::getxattr(p, "system.posix_acl_access", &mut v).unwrap();
        v.truncate(n);
        v
    };
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let o = local_backup_status(&store, &src, "h");
    let err = output_text(&o);
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("shared")
            && err.contains("backed up with its ACLs, capabilities and SELinux label only"),
        "{err}"
    );
    let root = restore_all(&store, "h", None, &d.path().join("r"));
    let restored = restored_path(&root, &src).join("shared");
    let below = fs::read(restored.join("sub/new")).unwrap_or_default();
    assert_eq!(below, b"below", "{err}");
    assert_eq!(acl(&restored), acl(&shared));
}

/// A file under a write lease (Samba's oplocks, an NFS server's
/// delegations) is read once the lease is broken, as rsync's open waits
/// for it: the non-blocking open's EAGAIN made it "changed ... not read",
/// and a file a lease kept was never backed up. The holder here ignores
/// SIGIO, so the kernel breaks the lease itself after the
/// lease-break-time, lowered to 1 s for the test.
#[test]
fn a_file_under_a_write_lease_is_read_once_the_lease_is_broken() {
    if !require_root("a write lease and fs.lease-break-time") {
        return;
    }
    let (_d, src, store) = site();
    let f = src.join("shared.doc");
    fs::write(&f, b"under a lease").unwrap();
    struct BreakTime(String);
    impl Drop for BreakTime {
        fn drop(&mut self) {
            let _ = fs::write("/proc/sys/fs/lease-break-time", &self.0);
        }
    }
    let _restore = BreakTime(fs::read_to_string("/proc/sys/fs/lease-break-time").unwrap());
    fs::write("/proc/sys/fs/lease-break-time", "1").unwrap();
    unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
    let holder = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&holder);
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) };
    assert_eq!(r, 0, "F_SETLEASE: {}", std::io::Error::last_os_error());
    let o = local_backup_status(&store, &src, "h");
    drop(holder);
    let err = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let stored = store
        .join("h/current")
        .join(src.strip_prefix("/").unwrap())
        .join("shared.doc");
    assert_eq!(fs::read(stored).unwrap(), b"under a lease");
}

/// A listing shows the second name of a hard link with its file's size
/// (as 1.x did; it showed 0), also when the pattern leaves the first
/// name out.
#[test]
fn a_listing_shows_a_hard_link_with_its_files_size() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.dat"), vec![7u8; 1234]).unwrap();
    fs::hard_link(src.join("a.dat"), src.join("b.txt")).unwrap();
    // Names that read like a symlink's or a hard link's line.
    fs::write(src.join("x -> y"), b"a file").unwrap();
    fs::write(src.join("h => -> => shadow"), b"a file").unwrap();
    std::os::unix::fs::symlink("y => z", src.join("x")).unwrap();
    // Two symlinks that read alike unless a trailing " ->" is escaped.
    std::os::unix::fs::symlink("t", src.join("s ->")).unwrap();
    std::os::unix::fs::symlink("-> t", src.join("s")).unwrap();
    fs::write(src.join("é ü -> ✓"), b"a file").unwrap();
    local_backup(&store, &src, "l");
    for pattern in ["*", "*.txt"] {
        let out = run(Command::new(bin("byteback-restore"))
            .current_dir(&src)
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "l", "--list", pattern]));
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let link = out.lines().find(|l| l.contains("/b.txt")).unwrap();
        assert_eq!(link.split_whitespace().nth(2), Some("1234"), "{out}");
        assert!(
            link.contains("/b.txt => /") && link.ends_with("/a.dat"),
            "{out}"
        );
    }
    let out = run(Command::new(bin("byteback-restore"))
        .current_dir(&src)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "l", "--list", "*"]));
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |end: &str| {
        let l = out.lines().find(|l| l.ends_with(end));
        l.unwrap_or_else(|| panic!("no line ends with {end}: {out}"))
    };
    assert!(!line("/x\\x20-> y").contains(" -> "), "{out}");
    assert!(
        !line("/h\\x20=>\\x20->\\x20=> shadow").contains(" => "),
        "{out}"
    );
    assert!(line("/x -> y\\x20=> z").contains("/x -> y"), "{out}");
    assert!(line("/s\\x20-> -> t").contains(" -> "), "{out}");
    assert!(line("/s -> -> t").contains(" -> "), "{out}");
    assert!(!line("/é ü\\x20-> ✓").contains(" -> "), "{out}");
}

/// As byteback 1.x: `--restore` takes each path from the newest snapshot
/// holding it (a file deleted before the last backup comes back from an
/// older one, into that snapshot's directory); `--all` every version, each
/// into the oldest snapshot holding it; `--target` somewhere else.
#[test]
fn restore_takes_each_path_from_the_newest_snapshot_holding_it() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("kept"), b"same in both").unwrap();
    fs::write(src.join("changed"), b"first version").unwrap();
    fs::write(src.join("sub/deleted"), b"only in the first").unwrap();
    local_backup(&store, &src, "v");
    fs::write(src.join("changed"), b"second version!").unwrap();
    set_mtime(&src.join("changed"), 2_000_000_000, 7);
    fs::remove_file(src.join("sub/deleted")).unwrap();
    fs::write(src.join("new"), b"only in the second").unwrap();
    local_backup(&store, &src, "v");
    let snaps = snapshots(&store, "v");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let (s1, s2) = (snaps[0].as_str(), snaps[1].as_str());
    // Restores go elsewhere: the source's parent directories are backed up too.
    let rs = scratch();
    let restore = |cwd: &Path, extra: &[&str], pattern: &OsStr| {
        fs::create_dir_all(cwd).unwrap();
        run_status(
            Command::new(bin("byteback-restore"))
                .current_dir(cwd)
                .arg("--destination")
                .arg(&store)
                .args(["--hostname", "v", "--restore"])
                .args(extra)
                .arg(pattern),
        )
    };
    let under =
        |root: &Path, snap: &str, rel: &str| restored_path(&root.join(snap), &src).join(rel);
    let read = |p: PathBuf| fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let absent = |p: PathBuf| assert!(fs::symlink_metadata(&p).is_err(), "{} exists", p.display());
    let dirs = |root: &Path| {
        let mut v: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    // The latest version of each path.
    let r = rs.path().join("latest");
    let out = restore(&r, &[], src.as_os_str());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("into ./{s1}/ and ./{s2}/")),
        "{}",
        stderr(&out)
    );
    assert_eq!(dirs(&r), [s1, s2]);
    assert_eq!(read(under(&r, s2, "kept")), b"same in both");
    assert_eq!(read(under(&r, s2, "changed")), b"second version!");
    assert_eq!(read(under(&r, s2, "new")), b"only in the second");
    absent(under(&r, s2, "sub/deleted"));
    assert_eq!(read(under(&r, s1, "sub/deleted")), b"only in the first");
    absent(under(&r, s1, "kept"));
    absent(under(&r, s1, "changed"));

    // Every version: the unchanged file once, in the oldest snapshot holding it.
    let r = rs.path().join("all");
    let out = restore(&r, &["--all"], src.as_os_str());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read(under(&r, s1, "kept")), b"same in both");
    assert_eq!(read(under(&r, s1, "changed")), b"first version");
    assert_eq!(read(under(&r, s1, "sub/deleted")), b"only in the first");
    assert_eq!(read(under(&r, s2, "changed")), b"second version!");
    assert_eq!(read(under(&r, s2, "new")), b"only in the second");
    absent(under(&r, s2, "kept"));
    absent(under(&r, s2, "sub/deleted"));

    // --target: everything below it; relative patterns still from the
    // current directory; nothing in the current directory.
    let target = rs.path().join("target");
    fs::create_dir(&target).unwrap();
    let t = target.to_str().unwrap();
    let out = restore(&src, &["--target", t], OsStr::new("sub"));
    assert!(out.status.success(), "{}", stderr(&out));
    // (`sub` itself, now empty, is the newest snapshot's.)
    assert_eq!(dirs(&target), [s1, s2]);
    assert_eq!(
        read(under(&target, s1, "sub/deleted")),
        b"only in the first"
    );
    assert!(dirs(&under(&target, s2, "sub")).is_empty());
    absent(under(&target, s2, "kept"));
    assert!(
        stderr(&out).contains(&format!("into {t}/{s1}/ and {t}/{s2}/")),
        "{}",
        stderr(&out)
    );
    let cwd = rs.path().join("cwd");
    let out = restore(&cwd, &["--target", t], src.as_os_str());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dirs(&target), [s1, s2]);
    assert_eq!(read(under(&target, s2, "changed")), b"second version!");
    assert!(dirs(&cwd).is_empty());
    // --snapshot with --target: that snapshot only.
    let one = rs.path().join("one");
    fs::create_dir(&one).unwrap();
    let out = restore(
        &cwd,
        &["--snapshot", s1, "--target", one.to_str().unwrap()],
        src.as_os_str(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dirs(&one), [s1]);
    assert_eq!(read(under(&one, s1, "kept")), b"same in both");
    assert_eq!(read(under(&one, s1, "changed")), b"first version");

    // A --target that does not exist: usage error, nothing created.
    let missing = rs.path().join("typo/deeper");
    let out = restore(
        &cwd,
        &["--target", missing.to_str().unwrap()],
        src.as_os_str(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--target"), "{}", stderr(&out));
    absent(rs.path().join("typo"));
    assert!(dirs(&cwd).is_empty());
    // --target goes with --restore only.
    let out = run_status(
        Command::new(bin("byteback-restore"))
            .current_dir(&cwd)
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "v", "--list", "--target", t, "/"]),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn second_concurrent_backup_of_a_host_is_refused_and_a_killed_lock_does_not_block() {
    use byteback_protocol::{encode, ClientMsg, MAGIC, PROTOCOL_VERSION};
    use std::io::Write;
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let start = |store: &Path| {
        let mut c = Command::new(bin("byteback-server"))
            .args(["serve", "--host", "busy", "--store"])
            .arg(store)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        stdin
            .write_all(
                &encode(&ClientMsg::Hello {
                    magic: MAGIC,
                    version: PROTOCOL_VERSION,
                })
                .unwrap(),
            )
            .unwrap();
        stdin
            .write_all(&encode(&ClientMsg::BackupStart { checksum: false }).unwrap())
            .unwrap();
        stdin.flush().unwrap();
        (c, stdin)
    };
    let (mut first, _keep) = start(&store);
    // Wait until the first holds the lock (its BackupReady is on stdout).
    let mut out = first.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    use std::io::Read;
    let mut got = 0;
    while got < 8 {
        got += out.read(&mut buf[got..]).unwrap();
    }
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let o = run_status(
        Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(&store)
            .arg("--source")
            .arg(&src)
            .args(["--hostname", "busy", "--retry-number", "0"]),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("another backup of host busy is running"),
        "{}",
        stderr(&o)
    );
    first.kill().unwrap();
    first.wait().unwrap();
    local_backup(&store, &src, "busy");
}

/// A run with nothing to change keeps the manifest as it is (no rewrite, no
/// sync) yet its snapshot restores the tree; metadata-only changes and
/// deletions still rewrite it; and leftovers in `current` from a run that
/// stopped half-way are still removed.
fn unchanged_runs(store: &Path, work: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    store_without_interval(store);
    let src = work.join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    for (p, c) in [
        ("a/1", "one"),
        ("a/b/2", "two"),
        ("a/b/3", "three"),
        ("z", "zed"),
    ] {
        fs::write(src.join(p), c).unwrap();
    }
    let current = store.join("u/current");
    let cur_src = current.join(src.strip_prefix("/").unwrap());
    let manifest = current.join(".byteback/manifest");
    let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
    // Restores go elsewhere: the source's parent directories are backed up too.
    let restores = scratch();
    let mut n = 0;
    let mut check = |what: &str| {
        n += 1;
        let snaps = snapshots(store, "u");
        assert!(snaps.len() >= n, "[{what}] {snaps:?}");
        let root = restore_all(
            store,
            "u",
            snaps.last().map(|s| s.as_str()),
            &restores.path().join(format!("r{n}")),
        );
        assert_same_tree(&src, &restored_path(&root, &src));
    };
    local_backup(store, &src, "u");
    check("first");
    let mut m1 = ino(&manifest);

    // The source's parent directories are shared with other tests, which
    // may change their mtimes; one of a few runs sees nothing changed.
    let kept = (0..5).any(|_| {
        let out = local_backup(store, &src, "u");
        assert!(stderr(&out).contains(" 0 files sent"), "{}", stderr(&out));
        let now = ino(&manifest);
        std::mem::replace(&mut m1, now) == now
    });
    assert!(kept, "every unchanged run rewrote the manifest");
    check("unchanged");

    fs::set_permissions(src.join("a/1"), fs::Permissions::from_mode(0o600)).unwrap();
    local_backup(store, &src, "u");
    let m2 = ino(&manifest);
    assert_ne!(m2, m1, "a mode change did not reach the manifest");
    check("chmod");

    fs::remove_file(src.join("a/b/2")).unwrap();
    fs::remove_file(src.join("z")).unwrap();
    local_backup(store, &src, "u");
    assert_ne!(ino(&manifest), m2, "deletions did not reach the manifest");
    assert!(!cur_src.join("a/b/2").exists() && !cur_src.join("z").exists());
    check("deletions");

    // A run that stopped half-way leaves a file the manifest does not name
    // (and took the clean marker away before touching anything).
    fs::write(cur_src.join("a/stray"), "left over").unwrap();
    fs::remove_file(current.join(".byteback/clean")).unwrap();
    local_backup(store, &src, "u");
    assert!(!cur_src.join("a/stray").exists(), "leftover kept");
    let snap = snapshots(store, "u").pop().unwrap();
    let snap_src = store
        .join("u")
        .join(snap)
        .join(src.strip_prefix("/").unwrap());
    assert!(snap_src.join("a/1").exists() && !snap_src.join("a/stray").exists());
    check("after an interrupted run");
}

#[test]
fn unchanged_runs_plain_store() {
    let d = scratch();
    unchanged_runs(&d.path().join("store"), d.path());
}

#[test]
fn unchanged_runs_btrfs_store() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(400);
    let d = scratch();
    unchanged_runs(&fs_.mount.join("store"), d.path());
}

/// Runs `cmd` (stdin null, output to files in `logs`) and kills it after
/// `limit`: a backup racing a hostile user must never hang.
fn run_with_timeout(cmd: &mut Command, logs: &Path, limit: std::time::Duration) -> (i32, String) {
    use std::process::Stdio;
    fs::create_dir_all(logs).unwrap();
    let out = logs.join("stdout");
    let err = logs.join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}\n{}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let code = status
        .code()
        .unwrap_or_else(|| panic!("{cmd:?} killed by a signal: {status:?}"));
    (code, fs::read_to_string(&err).unwrap_or_default())
}

/// Regular files below `root` (symlinks never followed) whose content holds `mark`.
fn files_holding(root: &Path, mark: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                todo.push(p);
            } else if md.is_file() && fs::read(&p).unwrap().windows(mark.len()).any(|w| w == mark) {
                found.push(p);
            }
        }
    }
    found
}

/// A local user who owns a directory of the source swaps it, again and
/// again while backups run, for a symlink to a directory outside the source
/// holding files of the same names (think /etc and shadow). The walk must
/// never go through the symlink and no file may be read through it: the
/// outside content must appear nowhere in the store nor in a restore.
#[test]
fn a_directory_swapped_for_a_symlink_during_the_backup_leaks_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const MARK: &[u8] = b"OUTSIDE-SENTINEL-3f9a71c0";
    const FILES: usize = 300;
    const ROUNDS: usize = 6;
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    let dir = src.join("user/d");
    let away = src.join("user/d.away");
    let outside = d.path().join("outside");
    for sub in ["", "sub"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
        fs::create_dir_all(outside.join(sub)).unwrap();
    }
    let mut names: Vec<String> = (0..FILES).map(|i| format!("f{i:04}")).collect();
    names.push("secret".into());
    names.push("sub/secret".into());
    for n in &names {
        fs::write(dir.join(n), format!("inside {n}\n").repeat(20)).unwrap();
        let mut evil = MARK.to_vec();
        evil.extend_from_slice(format!(" {n}\n").repeat(20).as_bytes());
        fs::write(outside.join(n), evil).unwrap();
    }
    fs::write(src.join("user/plain"), b"never swapped").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let racer = {
        let (stop, swaps) = (stop.clone(), swaps.clone());
        let (dir, away, outside) = (dir.clone(), away.clone(), outside.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                fs::rename(&dir, &away).unwrap();
                std::os::unix::fs::symlink(&outside, &dir).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(500));
                fs::remove_file(&dir).unwrap();
                fs::rename(&away, &dir).unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        })
    };
    let mut codes = Vec::new();
    for round in 0..ROUNDS {
        // A new host every round: every file is sent again.
        let host = format!("race{round}");
        let (code, err) = run_with_timeout(
            Command::new(bin("byteback-backup"))
                .arg("--destination")
                .arg(&store)
                .arg("--source")
                .arg(&src)
                .args(["--hostname", &host, "--retry-number", "0"]),
            &d.path().join(format!("logs{round}")),
            std::time::Duration::from_secs(180),
        );
        assert!(code == 0 || code == 24, "round {round}: exit {code}\n{err}");
        let count = |what: &str| err.lines().filter(|l| l.contains(what)).count();
        eprintln!(
            "round {round}: exit {code}, {} changed, {} vanished",
            count("changed during the backup"),
            count("vanished")
        );
        codes.push(code);
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    eprintln!(
        "{} swaps during {ROUNDS} backups; exit codes {codes:?}",
        swaps.load(Ordering::Relaxed)
    );
    assert!(swaps.load(Ordering::Relaxed) > 0);

    let leaked = files_holding(&store, MARK);
    assert!(
        leaked.is_empty(),
        "outside content in the store: {leaked:?}"
    );
    // What a restore hands back (the listing and the restored tree).
    for round in [0, ROUNDS - 1] {
        let host = format!("race{round}");
        let root = restore_all(&store, &host, None, &d.path().join(format!("r{round}")));
        let leaked = files_holding(&root, MARK);
        assert!(leaked.is_empty(), "outside content restored: {leaked:?}");
        let restored = restored_path(&root, &src);
        assert_eq!(
            fs::read(restored.join("user/plain")).unwrap(),
            b"never swapped"
        );
        // Whatever of user/d made it is the inside content, under its own name.
        let rd = restored.join("user/d");
        if fs::symlink_metadata(&rd).is_ok_and(|m| m.is_dir()) {
            for n in &names {
                if let Ok(c) = fs::read(rd.join(n)) {
                    assert_eq!(c, format!("inside {n}\n").repeat(20).into_bytes(), "{n}");
                }
            }
        }
    }
    let out = run(Command::new(bin("byteback-restore"))
        .current_dir(d.path())
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "race0", "--list", "*"]));
    assert!(!out.stdout.windows(MARK.len()).any(|w| w == MARK));
    // The source is back as it was.
    assert!(fs::symlink_metadata(&dir).unwrap().is_dir());
}

// ---------------------------------------------------------------------------
// A failed backup never hangs: whatever stops it (the server reports an
// error, dies, is killed), the client ends within seconds with an error
// naming the cause, retries as told, and leaves no process behind. Every run
// here has a hard deadline: a client still running then is killed and the
// test fails.
// ---------------------------------------------------------------------------

/// Fails (after killing them) if processes naming `marker` are still there
/// a moment after the client ended.
fn assert_none_left(marker: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let left = processes_naming(marker);
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() >= deadline {
            for (pid, _) in &left {
                kill9(*pid);
            }
            panic!("processes left running after the client ended: {left:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn backup_cmd(store: &Path, src: &Path, host: &str, retries: u32) -> Command {
    let mut c = Command::new(bin("byteback-backup"));
    c.arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", host, "--retry-number"])
        .arg(retries.to_string())
        .args(["--retry-delay", "1"]);
    c
}

/// The issue's reproduction, made certain: the server finds its manifest
/// truncated while the client, all its entries sent in one batch, waits with
/// nothing to send. The client used to wait forever (its writer held a
/// sender of its own channel); now every attempt fails at once, naming the
/// damaged file, the retries happen, and the next run is not refused.
#[test]
fn a_truncated_manifest_fails_one_attempt_fast_then_is_recovered() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    // Enough entries for a manifest of several compressed blocks, all in a
    // part of the tree the next run no longer sends.
    make_wide_tree(&src);
    local_backup(&store, &src, "t");
    fs::remove_dir_all(src.join("a")).unwrap();
    let manifest = store.join("t/current/.byteback/manifest");
    let len = fs::metadata(&manifest).unwrap().len();
    assert!(len > 200_000, "manifest of {len} bytes: too small to cut");
    // The snapshot shares the file (hard link); cut a copy instead.
    let cut = fs::read(&manifest).unwrap()[..(len / 2) as usize].to_vec();
    fs::remove_file(&manifest).unwrap();
    fs::write(&manifest, cut).unwrap();

    let marker = store.to_str().unwrap().to_string();
    let limit = std::time::Duration::from_secs(60);
    let (o, took) = run_bounded(&mut backup_cmd(&store, &src, "t", 2), limit, &marker);
    let e = stderr(&o);
    eprintln!("took {took:?}:\n{e}");
    // The first attempt fails at once, naming the manifest and setting it
    // aside; the retry recovers one from the newest snapshot and succeeds.
    assert!(o.status.success(), "{e}");
    assert!(e.contains("attempt 1 failed"), "{e}");
    assert!(!e.contains("attempt 2 failed"), "{e}");
    assert!(
        e.contains(manifest.to_str().unwrap()) && e.contains("damaged"),
        "the error does not name the damaged manifest: {e}"
    );
    assert!(e.contains("recovered from snapshot"), "{e}");
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    assert!(!store.join("t/current/.byteback/manifest.damaged").exists());
    assert_none_left(&marker);
    // The recovered backup is right, and the next run needs no one either.
    let root = restore_all(&store, "t", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
    let (o, _) = run_bounded(&mut backup_cmd(&store, &src, "t", 0), limit, &marker);
    let e = stderr(&o);
    assert!(o.status.success() && !e.contains("damaged"), "{e}");
    assert_none_left(&marker);
}

/// A tree that takes a debug build about a second to back up.
fn busy_tree(src: &Path) {
    let mut rng = Rng::new(99);
    for i in 0..20 {
        let dir = src.join(format!("small/{i:02}"));
        fs::create_dir_all(&dir).unwrap();
        for j in 0..100 {
            fs::write(dir.join(format!("f{j:03}")), rng.bytes(200 + j * 37)).unwrap();
        }
    }
    fs::create_dir_all(src.join("big")).unwrap();
    let block = rng.bytes(1 << 20);
    for i in 0..3u8 {
        let mut data = block.repeat(16);
        data[0] = i;
        fs::write(src.join(format!("big/{i}.bin")), data).unwrap();
    }
}

/// `byteback-server serve` of `host` in `store`.
fn server_pids(store: &Path, host: &str) -> Vec<u32> {
    processes_naming(store.to_str().unwrap())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(" serve ") && cmd.contains(&format!("--host {host} ")))
        .map(|(pid, _)| pid)
        .collect()
}

/// The server killed (SIGKILL) at random moments of a backup, and at its
/// commit (while the client waits for it), several times: the client ends
/// within a few seconds every time, with an error that says what happened,
/// and no process is left.
#[test]
fn server_killed_at_random_moments_never_leaves_the_client_hanging() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    busy_tree(&src);
    let marker = store.to_str().unwrap().to_string();
    let limit = std::time::Duration::from_secs(120);
    // How long a whole backup takes here (the second time, with the source
    // in the page cache), to spread the kills over it.
    let mut full = std::time::Duration::ZERO;
    for host in ["full1", "full2"] {
        let (o, took) = run_bounded(&mut backup_cmd(&store, &src, host, 0), limit, &marker);
        assert!(o.status.success(), "{}", stderr(&o));
        full = took;
    }
    let mut rng = Rng::from_time();
    let mut failed = 0;
    for round in 0..6 {
        let host = format!("k{round}");
        let started = std::time::Instant::now();
        let mut child = backup_cmd(&store, &src, &host, 0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut err, &mut s).unwrap();
            s
        });
        let delay = if round % 2 == 0 {
            let delay =
                std::time::Duration::from_millis(rng.below(full.as_millis() as u64 * 9 / 10 + 1));
            std::thread::sleep(delay);
            delay
        } else {
            // At the commit: the server removes its temporary directory just
            // before it syncs, renames the manifest and snapshots; the client
            // waits for it with nothing to send.
            let tmp = store.join(&host).join("current/.byteback/partial");
            let mut seen = false;
            while started.elapsed() < std::time::Duration::from_secs(30) {
                let there = tmp.exists();
                if seen && !there {
                    break;
                }
                seen |= there;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            started.elapsed()
        };
        let pids = server_pids(&store, &host);
        for &pid in &pids {
            kill9(pid);
        }
        let killed_at = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if killed_at.elapsed() > std::time::Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "HANG: the client still runs 30 s after its server was killed \
                     ({delay:?} into the backup)"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let after = killed_at.elapsed();
        let e = reader.join().unwrap();
        eprintln!(
            "round {round}: server {pids:?} killed {delay:?} into a {full:?} backup; \
             client exited {status} after {after:?} (ran {:?}): {}",
            started.elapsed(),
            e.lines().last().unwrap_or_default()
        );
        assert!(
            after < std::time::Duration::from_secs(10),
            "the client took {after:?} to end"
        );
        if !status.success() {
            failed += 1;
            assert!(
                e.contains("server") || e.contains("connection"),
                "the error does not say what happened: {e}"
            );
        }
        assert_none_left(&marker);
    }
    // The kills land inside the backups, not after them, most of the time.
    assert!(failed >= 3, "only {failed} of 6 backups were interrupted");
    // And a backup after all that works.
    local_backup(&store, &src, "k0");
}

/// A `byteback-server` wrapper that passes the server's handshake and
/// `BackupReady` to the client, then holds everything else back for a
/// second and kills the server: the client, its entries sent, waits with
/// nothing to send when the connection ends. Each attempt ends the same way.
fn server_killed_while_the_client_waits_wrapper(dir: &Path, host: &str) -> PathBuf {
    use byteback_protocol::{encode, ServerMsg, PROTOCOL_VERSION};
    use std::os::unix::fs::PermissionsExt;
    let k = encode(&ServerMsg::HelloOk {
        version: PROTOCOL_VERSION,
        host: host.to_string(),
    })
    .unwrap()
    .len()
        + encode(&ServerMsg::BackupReady { generation: None })
            .unwrap()
            .len();
    let p = dir.join("server-killed-while-the-client-waits");
    fs::write(
        &p,
        format!(
            r#"#!/bin/sh
fifo=$(mktemp -u "{dir}/fifo.XXXXXX")
mkfifo "$fifo"
# (A background job's stdin is /dev/null, even with <&0: go through fd 4.)
exec 4<&0
'{server}' "$@" <&4 4<&- >"$fifo" &
pid=$!
exec 4<&-
exec 3<"$fifo"
rm -f "$fifo"
dd bs=1 count={k} status=none <&3
sleep 1
kill -9 $pid
"#,
            dir = dir.display(),
            server = bin("byteback-server").display(),
        ),
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn server_killed_while_the_client_has_nothing_to_send_is_retried_then_reported() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("dir/{i}")), format!("{i}")).unwrap();
    }
    let wrapper = server_killed_while_the_client_waits_wrapper(d.path(), "w");
    let marker = d.path().to_str().unwrap().to_string();
    let limit = std::time::Duration::from_secs(60);
    let (o, took) = run_bounded(
        backup_cmd(&store, &src, "w", 2).env("BYTEBACK_SERVER", &wrapper),
        limit,
        &marker,
    );
    let e = stderr(&o);
    eprintln!("3 attempts, each killed after 1 s, 1 s apart: failed in {took:?}:\n{e}");
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("attempt 1 failed") && e.contains("attempt 2 failed"),
        "{e}"
    );
    assert!(
        e.lines()
            .last()
            .unwrap_or_default()
            .contains("closed the connection"),
        "{e}"
    );
    // 3 × (1 s held + a moment) + 2 × 1 s: well under 15 s unless something waited.
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
    assert_none_left(&marker);
    // And without the wrapper the store takes a backup at once.
    local_backup(&store, &src, "w");
}

/// A stored copy that cannot be read (a damaged block on btrfs: its
/// checksum fails, reads give EIO) when the server needs it as the basis of
/// a changed file: the server warns, naming the file, drops it as a basis,
/// and the client sends the file whole; the backup succeeds and repairs it.
#[test]
fn unreadable_stored_copy_is_resent_not_fatal() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut data = Rng::new(42).bytes(1 << 20);
    fs::write(src.join("victim"), &data).unwrap();
    local_backup(&store, &src, "e");
    let stored = store
        .join("e/current")
        .join(src.strip_prefix("/").unwrap())
        .join("victim");
    run(&mut Command::new("sync"));
    // Where its first block lies on the device.
    let out = String::from_utf8_lossy(
        &run(Command::new("filefrag").args(["-v", "-b4096"]).arg(&stored)).stdout,
    )
    .into_owned();
    let logical: u64 = out
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"0:")).then(|| f[3].trim_end_matches([':', '.']).parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no extent in:\n{out}"));
    let out = String::from_utf8_lossy(
        &run(Command::new("btrfs-map-logical")
            .arg("-l")
            .arg((logical * 4096).to_string())
            .arg(&fs_.device))
        .stdout,
    )
    .into_owned();
    let physical: u64 = out
        .split_whitespace()
        .skip_while(|w| *w != "physical")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no physical offset in:\n{out}"));
    // Damage it behind the filesystem's back; remount so nothing is cached.
    run(Command::new("umount").arg(&fs_.mount));
    {
        use std::os::unix::fs::FileExt;
        let dev = fs::OpenOptions::new()
            .write(true)
            .open(&fs_.device)
            .unwrap();
        dev.write_all_at(&[0x5a; 4096], physical).unwrap();
        dev.sync_all().unwrap();
    }
    run(Command::new("mount")
        .args(["-t", "btrfs", "-o", "user_subvol_rm_allowed"])
        .arg(&fs_.device)
        .arg(&fs_.mount));
    assert!(fs::read(&stored).is_err(), "the damaged copy still reads");
    // A change: the server needs the stored copy as the basis.
    data[(1 << 20) - 1] ^= 1;
    fs::write(src.join("victim"), &data).unwrap();
    let marker = store.to_str().unwrap().to_string();
    let (o, took) = run_bounded(
        &mut backup_cmd(&store, &src, "e", 1),
        std::time::Duration::from_secs(60),
        &marker,
    );
    let e = stderr(&o);
    eprintln!("took {took:?}:\n{e}");
    assert!(o.status.success(), "{e}");
    assert!(!e.contains("attempt 1 failed"), "{e}");
    assert!(
        e.contains("cannot read the stored copy") && e.contains("victim"),
        "the warning does not name the file: {e}"
    );
    assert_eq!(fs::read(&stored).unwrap(), data, "current not repaired");
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    assert_none_left(&marker);
}

/// A fallback snapshot (plain store) that failed half-way never stays
/// behind: the next snapshot removes such leftovers, read-only ones too.
#[test]
fn a_failed_fallback_snapshot_is_cleaned_up() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    local_backup(&store, &src, "fb");
    let left = store.join("fb/.snapshot-2020-01-01T00:00+0000");
    fs::create_dir_all(left.join("sub")).unwrap();
    fs::write(left.join("sub/copy"), b"a stale copy").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(left.join("sub"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(&left, fs::Permissions::from_mode(0o555)).unwrap();
    fs::write(src.join("f"), b"more data").unwrap();
    local_backup(&store, &src, "fb");
    assert!(!left.exists(), "the leftover is still there");
    assert_eq!(snapshots(&store, "fb").len(), 2);
}

/// An I/O error while storing names the file it happened on (here a
/// directory of `current` made immutable, so nothing can change in it); the
/// next backup, with the directory writable again, completes.
#[test]
fn a_storage_error_names_the_path() {
    if !require_root("chattr +i on a btrfs loop filesystem") {
        return;
    }
    let d = scratch();
    let fs_ = BtrfsLoop::new(300);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("dir/old"), "old").unwrap();
    local_backup(&store, &src, "t");
    fs::write(src.join("dir/new-file"), "new").unwrap();
    let stored_dir = store
        .join("t/current")
        .join(src.strip_prefix("/").unwrap())
        .join("dir");
    let chattr = |flag: &str| {
        let st = Command::new("chattr")
            .arg(flag)
            .arg(&stored_dir)
            .status()
            .unwrap();
        assert!(st.success(), "chattr {flag}");
    };
    chattr("+i");
    let o = run_status(&mut backup_cmd(&store, &src, "t", 0));
    chattr("-i");
    let e = stderr(&o);
    assert!(
        !o.status.success(),
        "a backup into an immutable directory: {e}"
    );
    // Paths on the wire are relative to `/`.
    let named = src.join("dir/new-file");
    let named = named.strip_prefix("/").unwrap();
    // (A new file is created when its data arrives: "writing ...: cannot create ...".)
    assert!(
        e.contains(&format!("cannot create {}", named.display()))
            && e.contains("Operation not permitted"),
        "the error does not name the path and the cause: {e}"
    );
    let o = run_status(&mut backup_cmd(&store, &src, "t", 0));
    assert!(o.status.success(), "{}", stderr(&o));
    let root = restore_all(&store, "t", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

/// A script in `dir` running byteback-server under an open-file limit of
/// `n` (soft and hard: the server raises its soft limit to the hard one).
fn server_with_nofile(dir: &Path, n: u32) -> PathBuf {
    write_script(
        &dir.join(format!("server-nofile-{n}")),
        &format!(
            "#!/bin/sh\nulimit -n {n} || exit 99\nexec '{}' \"$@\"\n",
            bin("byteback-server").display()
        ),
    )
}

/// The server opens a file's output, stored copy and earlier rebuild when
/// its transfer starts, not when its entry arrives: a backup holds
/// descriptors only for the files in flight, not for the client's window of
/// 8,192 entries. Under an open-file limit of 2,048 (set by the server's
/// wrapper) 6,000 new files, then the same 6,000 files all changed, arrive
/// without a word about the limit.
#[test]
fn a_low_open_file_limit_on_the_server_is_enough_for_new_and_changed_files() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    let write_all = |round: usize| {
        for dir in 0..12 {
            fs::create_dir_all(src.join(format!("d{dir}"))).unwrap();
            for i in 0..500 {
                let body = format!("{dir} {i} ").repeat(1 + round * 40);
                fs::write(src.join(format!("d{dir}/f{i}")), body).unwrap();
            }
        }
    };
    let wrapper = server_with_nofile(d.path(), 2048);
    for round in 0..2 {
        write_all(round);
        let o = run_status(backup_cmd(&store, &src, "w", 0).env("BYTEBACK_SERVER", &wrapper));
        let e = stderr(&o);
        assert!(o.status.success(), "round {round}: {e}");
        assert!(e.contains(" 6000 files sent"), "round {round}: {e}");
        assert!(!e.contains("open-file limit"), "round {round}: {e}");
        let root = restore_all(&store, "w", None, &d.path().join(format!("r{round}")));
        assert_same_tree(&src, &restored_path(&root, &src));
    }
}

/// Even an open-file limit of 256 (below one batch of 1,024 entries) only
/// slows a backup, said on stderr: 3,000 new files, then the same files
/// all changed (each with a stored copy as its basis), are all stored.
/// Before a changed file's rebuild and basis were opened at its start, the
/// second backup failed with "Too many open files".
#[test]
fn a_backup_holds_descriptors_only_for_the_files_in_flight() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    let wrapper = server_with_nofile(d.path(), 256);
    for round in 0..2 {
        for dir in 0..3 {
            fs::create_dir_all(src.join(format!("d{dir}"))).unwrap();
            for i in 0..1000 {
                // The second round keeps the first's bytes and adds some, so
                // each file is rebuilt from its stored copy.
                let body = format!("{dir} {i} ").repeat(200);
                let tail = if round == 1 { "changed" } else { "" };
                fs::write(src.join(format!("d{dir}/f{i}")), body + tail).unwrap();
            }
        }
        if round == 0 {
            fs::write(src.join("d0/empty"), b"").unwrap();
        }
        let o = run_status(backup_cmd(&store, &src, "w", 0).env("BYTEBACK_SERVER", &wrapper));
        let e = stderr(&o);
        assert!(o.status.success(), "round {round}: {e}");
        let sent = if round == 0 {
            " 3001 files sent"
        } else {
            " 3000 files sent"
        };
        assert!(e.contains(sent), "round {round}: {e}");
        assert!(
            e.contains("the open-file limit is 256"),
            "round {round}: {e}"
        );
        if round == 1 {
            // Rebuilt from the stored copies, not sent whole.
            let reused = summary_number(&e, " reused").expect(&e);
            assert!(reused > 3000 * 1000, "{e}");
        }
        let root = restore_all(&store, "w", None, &d.path().join(format!("r{round}")));
        assert_same_tree(&src, &restored_path(&root, &src));
    }
}

/// Once the server has committed a backup and taken its snapshot, a server
/// that then ends badly (here: exits 3 after a clean run) costs a warning,
/// not a failed backup retried from the start: exit 0, one attempt, the
/// snapshot there.
#[test]
fn a_server_ending_badly_after_its_commit_costs_a_warning_not_the_backup() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"content").unwrap();
    let wrapper = write_script(
        &d.path().join("server-exits-3"),
        &format!(
            "#!/bin/sh\n'{}' \"$@\"\nexit 3\n",
            bin("byteback-server").display()
        ),
    );
    let o = run_status(backup_cmd(&store, &src, "h", 2).env("BYTEBACK_SERVER", &wrapper));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert!(e.contains("after the backup: byteback-server"), "{e}");
    assert!(e.contains(" taken;"), "{e}");
    assert!(!e.contains("retrying") && !e.contains("attempt 2"), "{e}");
    let root = restore_all(&store, "h", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

/// `byteback-backup` of `src` as `host` into `store`, its record of the
/// last backup kept in `cache`; returns its stderr and the summary's
/// entries and unchanged entries.
fn backup_with_record(store: &Path, src: &Path, host: &str, cache: &Path) -> (String, u64, u64) {
    let out = run(Command::new(bin("byteback-backup"))
        .env("BYTEBACK_CACHE_DIR", cache)
        .arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", host, "--retry-number", "0"]));
    let err = stderr(&out);
    let entries = summary_number(&err, " entries,").expect(&err);
    let unchanged = summary_number(&err, " entries unchanged").unwrap_or(0);
    (err, entries, unchanged)
}

/// The client's record of the last backup: a re-run with nothing changed
/// announces every entry in runs of unchanged ones, and after edits of
/// every kind (content, sizes, deletions of files and trees, a file
/// become a directory, a rename, new files, a mode, an xattr, a new hard
/// link) only what changed goes one by one, and the snapshot restores
/// equal to the source; the next run is all runs again.
#[test]
fn unchanged_entries_go_as_runs_and_every_change_still_lands() {
    let dir = scratch();
    // In a directory of its own: the ancestors of a source are entries
    // too, and the scratch directory changes with the restores.
    let src = dir.path().join("tree/src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(0x5eed);
    make_rich_tree(&src, &mut rng);
    edit_tree(&src, &mut rng);
    let store = dir.path().join("store");
    store_without_interval(&store);
    let cache = dir.path().join("cache");

    let (_, entries, unchanged) = backup_with_record(&store, &src, "runs", &cache);
    assert_eq!(unchanged, 0, "no record yet");
    // Every entry of the tree is as recorded; its ancestors (entries too)
    // may have changed with other tests' files.
    let all_but_ancestors = |entries: u64| entries - (src.ancestors().count() as u64 - 1);
    let (err, entries2, unchanged) = backup_with_record(&store, &src, "runs", &cache);
    assert_eq!(entries2, entries, "{err}");
    assert!(unchanged >= all_but_ancestors(entries), "{err}");

    edit_tree_again(&src, &mut rng);
    let sub = src.join("olddir-gone-but-this-stays");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("f"), b"new in a new directory").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(src.join("renamed"), fs::Permissions::from_mode(0o600)).unwrap();
    rustix::fs::lsetxattr(
        src.join("append.log"),
        "user.edited",
        b"yes",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::hard_link(src.join("brand-new"), src.join("brand-new-link")).unwrap();
    let (err, entries3, unchanged) = backup_with_record(&store, &src, "runs", &cache);
    assert!(unchanged > 0 && unchanged + 10 < entries3, "{err}");
    let root = restore_all(&store, "runs", None, &dir.path().join("restore"));
    assert_same_tree(&src, &restored_path(&root, &src));

    let (err, entries4, unchanged) = backup_with_record(&store, &src, "runs", &cache);
    assert_eq!(entries4, entries3, "{err}");
    assert!(unchanged >= all_but_ancestors(entries3), "{err}");
    let root = restore_all(&store, "runs", None, &dir.path().join("restore2"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

/// The record of the last backup vouches for an entry's extended
/// attributes while its inode, its ctime (older than the recording
/// backup's start by more than a few seconds) and the rest of its metadata
/// are as recorded: such xattrs are not read again. A changed, added or
/// removed xattr or ACL moves the ctime, so the next backup reads and
/// stores it; an entry whose ctime was too young when it was recorded (a
/// change in the same tick could have kept it) is read again too.
#[test]
fn xattrs_as_recorded_are_not_read_again_and_every_change_of_them_lands() {
    let dir = scratch();
    let src = dir.path().join("tree/src");
    fs::create_dir_all(src.join("d")).unwrap();
    let set = |p: &Path, name: &str, v: &[u8]| {
        rustix::fs::lsetxattr(p, name, v, rustix::fs::XattrFlags::empty()).unwrap();
    };
    for i in 0..100 {
        let f = src.join(format!("d/f{i:03}"));
        fs::write(&f, format!("file {i}")).unwrap();
        set(&f, "user.label", format!("v{i}").as_bytes());
    }
    set(&src.join("d"), "user.dir", b"1");
    let store = dir.path().join("store");
    store_without_interval(&store);
    let cache = dir.path().join("cache");
    let backup = || {
        let out = run(Command::new(bin("byteback-backup"))
            .env("BYTEBACK_CACHE_DIR", &cache)
            .arg("--destination")
            .arg(&store)
            .arg("--source")
            .arg(&src)
            .args(["--hostname", "x", "--retry-number", "0", "-vv"]));
        stderr(&out)
    };
    let vouched = |err: &str, name: &str| {
        err.contains(&format!(
            "{}: xattrs as recorded, not read",
            src.join(name).display()
        ))
    };
    // Every ctime older than the first recording backup's start by more
    // than the racy margin.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let err = backup();
    assert!(!vouched(&err, "d/f000"), "no record yet\n{err}");
    let err = backup();
    for name in ["d", "d/f000", "d/f005", "d/f010", "d/f020", "d/f099"] {
        assert!(vouched(&err, name), "{name}\n{err}");
    }

    set(&src.join("d/f005"), "user.label", b"w5");
    rustix::fs::lremovexattr(src.join("d/f020"), "user.label").unwrap();
    let acl = Command::new("setfacl")
        .args(["-m", "u:4242:r"])
        .arg(src.join("d/f010"))
        .status()
        .expect("setfacl (package acl)");
    assert!(acl.success());
    let err = backup();
    for name in ["d/f005", "d/f010", "d/f020"] {
        assert!(!vouched(&err, name), "{name}\n{err}");
    }
    assert!(vouched(&err, "d/f006"), "{err}");
    // Their ctimes are within the margin of this backup's start: the next
    // backup reads them again, though nothing changed.
    let err = backup();
    for name in ["d/f005", "d/f010", "d/f020"] {
        assert!(!vouched(&err, name), "{name}\n{err}");
    }
    assert!(vouched(&err, "d/f006"), "{err}");

    let root = restore_all(&store, "x", None, &dir.path().join("restore"));
    let restored = restored_path(&root, &src);
    assert_same_tree(&src, &restored);
    let mut v = [0u8; 16];
    let n = rustix::fs::lgetxattr(restored.join("d/f005"), "user.label", &mut v[..]).unwrap();
    assert_eq!(&v[..n], b"w5");
    assert!(rustix::fs::lgetxattr(restored.join("d/f020"), "user.label", &mut v[..]).is_err());
    let mut acl = [0u8; 256];
    assert!(rustix::fs::lgetxattr(
        restored.join("d/f010"),
        "system.posix_acl_access",
        &mut acl[..]
    )
    .is_ok());
}

/// Hard links between symlinks, FIFOs, sockets and device nodes come back
/// as hard links, as rsync's -H (which 1.x ran) keeps them (each name came
/// back as an inode of its own); a name restored without its first name
/// is made as the object itself.
#[test]
fn hard_links_between_special_files_are_kept() {
    use std::os::unix::fs::MetadataExt;
    if !require_root("device nodes") {
        return;
    }
    let (d, src, store) = site();
    fs::create_dir_all(src.join("d")).unwrap();
    run(Command::new("mkfifo").arg(src.join("p1")));
    std::os::unix::fs::symlink("somewhere", src.join("s1")).unwrap();
    run(Command::new("mknod")
        .arg(src.join("c1"))
        .args(["c", "1", "3"]));
    drop(std::os::unix::net::UnixListener::bind(src.join("u1")).unwrap());
    let pairs = [
        ("p1", "d/p2"),
        ("s1", "d/s2"),
        ("c1", "d/c2"),
        ("u1", "d/u2"),
    ];
    for (a, b) in pairs {
        // link(2) on a symlink names the symlink itself.
        fs::hard_link(src.join(a), src.join(b)).unwrap();
        assert_eq!(lstat(&src.join(a)).nlink(), 2, "{a}");
    }
    fs::write(src.join("f"), b"a file").unwrap();
    local_backup(&store, &src, "h");
    let root = restore_all(&store, "h", None, &d.path().join("r"));
    let got = restored_path(&root, &src);
    assert_same_tree(&src, &got);
    for (a, b) in pairs {
        assert_eq!(
            lstat(&got.join(a)).ino(),
            lstat(&got.join(b)).ino(),
            "{a} {b}"
        );
    }
    // The second names only.
    let into = d.path().join("r2");
    fs::create_dir_all(&into).unwrap();
    let out = run(Command::new(bin("byteback-restore"))
        .current_dir(&into)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "h", "--restore"])
        .arg(src.join("d")));
    let snap = snapshots(&store, "h").pop().unwrap();
    let got2 = restored_path(&into.join(&snap), &src);
    for (a, b) in pairs {
        assert!(!got2.join(a).exists(), "{a}: {}", stderr(&out));
        let (was, is) = (lstat(&src.join(b)), lstat(&got2.join(b)));
        assert_eq!(
            (was.mode(), was.rdev(), is.nlink()),
            (is.mode(), is.rdev(), 1),
            "{b}: {}",
            stderr(&out)
        );
    }
    assert_eq!(
        fs::read_link(got2.join("d/s2")).unwrap(),
        Path::new("somewhere")
    );
    // A listing shows each further name (in walk order: d/ comes before
    // p1) with its object's type letter.
    let out = run(Command::new(bin("byteback-restore"))
        .current_dir(&into)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "h", "--list"])
        .arg(format!("{}/**", src.display())));
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    for (name, letter) in [("d/c2", 'c'), ("p1", 'p'), ("s1", 'l'), ("u1", 's')] {
        let line = list
            .lines()
            .find(|l| l.contains(&format!("/{name} => ")))
            .unwrap_or_else(|| panic!("{name}: {list}"));
        let mode = line.split_whitespace().nth(1).unwrap();
        assert!(mode.starts_with(letter), "{name}: {line}");
    }
}

/// A file with two links whose first path is left out (its xattrs cannot
/// be read: injected, as a rename between its `statx` and the read gives
/// it) is stored at its second path as a file of its own, never as a hard
/// link to a path the backup does not hold; the backup says what it left
/// out, and the snapshot restores.
#[test]
fn a_hard_link_never_names_a_path_the_backup_left_out() {
    let dir = scratch();
    let src = dir.path().join("tree/src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"linked content").unwrap();
    fs::hard_link(src.join("a"), src.join("b")).unwrap();
    fs::write(src.join("c"), b"plain").unwrap();
    let store = dir.path().join("store");
    store_without_interval(&store);
    let out = run_status(backup_cmd(&store, &src, "links", 0).env("BYTEBACK_TEST_XATTR_FAIL", "a"));
    let err = stderr(&out);
    // As a file renamed away during the backup: said, and not an error.
    assert_eq!(out.status.code(), Some(0), "{err}");
    let gone = format!("{}: vanished during the backup", src.join("a").display());
    assert!(err.contains(&gone), "{err}");
    let root = restore_all(&store, "links", None, &dir.path().join("restore"));
    let restored = restored_path(&root, &src);
    assert!(!restored.join("a").exists());
    assert_eq!(fs::read(restored.join("b")).unwrap(), b"linked content");
    assert_eq!(fs::read(restored.join("c")).unwrap(), b"plain");
}

/// A record that does not describe the server's manifest, though the
/// generations agree (here: another host's record and generation planted
/// for this one), fails the server's check of the first run; the client
/// then removes the record and runs the backup again at once, announcing
/// every entry: the backup succeeds and the snapshot is the source's.
#[test]
fn a_record_the_manifest_does_not_match_costs_a_rerun_never_a_change() {
    let dir = scratch();
    let src = dir.path().join("tree/src");
    fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("d/f{i:02}")), format!("file {i}")).unwrap();
    }
    let store = dir.path().join("store");
    store_without_interval(&store);
    let cache = dir.path().join("cache");
    let records = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(&cache)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    // Host b is backed up without d/f25, host a with it.
    let late = src.join("d/f25");
    let kept = fs::read(&late).unwrap();
    fs::remove_file(&late).unwrap();
    backup_with_record(&store, &src, "b", &cache);
    let b_record = records();
    assert_eq!(b_record.len(), 1);
    fs::write(&late, &kept).unwrap();
    backup_with_record(&store, &src, "a", &cache);
    let a_record: Vec<PathBuf> = records()
        .into_iter()
        .filter(|p| !b_record.contains(p))
        .collect();
    assert_eq!(a_record.len(), 1);
    // a's record and generation, planted for b.
    fs::copy(&a_record[0], &b_record[0]).unwrap();
    let manifest = |h: &str| store.join(h).join("current/.byteback/manifest");
    let mut generation = [0u8; 64];
    let n = rustix::fs::getxattr(
        manifest("a"),
        "user.byteback.generation",
        &mut generation[..],
    )
    .unwrap();
    assert_eq!(n, 32);
    rustix::fs::setxattr(
        manifest("b"),
        "user.byteback.generation",
        &generation[..32],
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();

    let (err, entries, unchanged) = backup_with_record(&store, &src, "b", &cache);
    assert!(err.contains("do not match the manifest"), "{err}");
    assert!(err.contains("runs again"), "{err}");
    assert_eq!(unchanged, 0, "{err}");
    assert!(entries > 50, "{err}");
    let root = restore_all(&store, "b", None, &dir.path().join("restore"));
    assert_same_tree(&src, &restored_path(&root, &src));
    // And the record written by the rerun is b's own: all runs next time.
    let (err, entries2, unchanged) = backup_with_record(&store, &src, "b", &cache);
    assert_eq!(entries2, entries, "{err}");
    assert!(
        unchanged >= entries - (src.ancestors().count() as u64 - 1),
        "{err}"
    );
}

/// The record of the last backup is written while the walk runs: its
/// directory is left out of the backup even when it lies beneath a
/// source (otherwise it would be a file changing while read, exit 24).
#[test]
fn the_record_of_the_last_backup_is_never_backed_up() {
    let dir = scratch();
    let src = dir.path().join("tree/src");
    fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..300 {
        fs::write(src.join(format!("d/f{i}")), format!("{i}")).unwrap();
    }
    let cache = src.join("var/cache/byteback");
    let store = dir.path().join("store");
    store_without_interval(&store);
    for round in 0..2 {
        let (err, _, unchanged) = backup_with_record(&store, &src, "self", &cache);
        assert!(round == 0 || unchanged > 300, "{err}");
        assert!(!err.contains("warning"), "{err}");
    }
    assert!(fs::read_dir(&cache).unwrap().count() == 1);
    let root = restore_all(&store, "self", None, &dir.path().join("restore"));
    let restored = restored_path(&root, &src);
    assert!(restored.join("d/f299").is_file());
    assert!(restored.join("var/cache").is_dir());
    assert!(!restored.join("var/cache/byteback").exists());
}

/// `byteback-backup -c` (`--checksum`) of `src` as `host` into the local
/// store `store`, no retries.
fn checksum_backup(store: &Path, src: &Path, host: &str) -> Command {
    let mut c = Command::new(bin("byteback-backup"));
    c.arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", host, "--retry-number", "0", "-c"]);
    c
}

/// `--checksum`: a file whose content changed while its size and mtime did
/// not is missed by a default backup (as rsync without `-c`) and found by
/// one with `--checksum`, which sends it as a delta against the stored copy
/// and keeps every other file as stored (nothing else sent or rewritten).
#[test]
fn checksum_mode_finds_content_changed_under_the_same_size_and_mtime() {
    use std::os::unix::fs::MetadataExt;
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    let mut rng = Rng::new(77);
    let mut big = vec![0u8; 3 << 20];
    rng.fill(&mut big);
    fs::write(src.join("sub/big"), &big).unwrap();
    fs::write(src.join("small"), b"the first words").unwrap();
    fs::write(src.join("same"), b"never changes").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    local_backup(&store, &src, "ck");
    // Same sizes, mtimes put back: one block of `big`, all of `small`.
    let keep_mtime = |p: &Path, write: &dyn Fn()| {
        let md = fs::metadata(p).unwrap();
        write();
        set_mtime(p, md.mtime(), md.mtime_nsec());
    };
    big[1 << 20..(1 << 20) + 100].fill(0x55);
    keep_mtime(&src.join("sub/big"), &|| {
        fs::write(src.join("sub/big"), &big).unwrap()
    });
    keep_mtime(&src.join("small"), &|| {
        fs::write(src.join("small"), b"the other words").unwrap()
    });
    let stored = |snap: &str, p: &str| fs::read(store.join("ck").join(snap).join(p)).unwrap();
    let src_rel = src.strip_prefix("/").unwrap();

    let out = local_backup(&store, &src, "ck");
    let e = stderr(&out);
    assert_eq!(summary_number(&e, " files sent"), Some(0), "{e}");
    let snap = snapshots(&store, "ck").pop().unwrap();
    assert_eq!(
        stored(&snap, &format!("{}/small", src_rel.display())),
        b"the first words"
    );

    let out = run(&mut checksum_backup(&store, &src, "ck"));
    let e = stderr(&out);
    assert_eq!(summary_number(&e, " files sent"), Some(2), "{e}");
    for p in ["small", "sub/big"] {
        let shown = src.join(p);
        assert!(
            e.contains(&format!(
                "{}: its content differs from the server's copy, though its size and mtime do not",
                shown.display()
            )),
            "{e}"
        );
    }
    assert!(!e.contains("never changes") && !e.contains("/same:"), "{e}");
    // The big file went as a delta: most of it reused from the stored copy.
    let reused = summary_number(&e, " reused").expect(&e);
    assert!(reused >= 2 << 20, "reused {reused}:\n{e}");
    let snap = snapshots(&store, "ck").pop().unwrap();
    // Restored elsewhere: a new directory beside the source would change
    // its parent, which is backed up too.
    let rs = scratch();
    let r = restore_all(&store, "ck", Some(&snap), &rs.path().join("r"));
    assert_same_tree(&src, &restored_path(&r, &src));
    assert_eq!(
        stored(&snap, &format!("{}/sub/big", src_rel.display())),
        big
    );

    // Nothing changed: a checksum run reads everything, sends nothing,
    // and leaves the stored files as they were.
    let in_current = |p: &str| store.join("ck/current").join(src_rel).join(p);
    let ids = || {
        ["same", "small", "sub/big"].map(|p| {
            let m = fs::metadata(in_current(p)).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        })
    };
    let before = ids();
    let out = run(&mut checksum_backup(&store, &src, "ck"));
    let e = stderr(&out);
    assert_eq!(summary_number(&e, " files sent"), Some(0), "{e}");
    assert!(
        !e.contains("its content differs from the server's copy"),
        "{e}"
    );
    assert_eq!(ids(), before, "stored files were rewritten");
}

/// A checksum backup that stored changed content (same size and mtime)
/// but failed before its commit leaves `current` not trusted; the next,
/// default, backup must not take that file for the old content by its size
/// and mtime and record the old hash (its restore would then fail the
/// BLAKE3 check): the file is placed on disc a second earlier, so it is
/// looked at again. The failure is injected into the new manifest's last
/// write (debug builds).
#[test]
fn a_checksum_backup_cut_short_before_its_commit_leaves_no_wrong_hash() {
    use std::os::unix::fs::MetadataExt;
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"old content!").unwrap();
    fs::write(src.join("g"), b"other").unwrap();
    local_backup(&store, &src, "cc");
    let md = fs::metadata(src.join("f")).unwrap();
    fs::write(src.join("f"), b"new content!").unwrap();
    set_mtime(&src.join("f"), md.mtime(), md.mtime_nsec());
    let out =
        run_status(checksum_backup(&store, &src, "cc").env("BYTEBACK_TEST_NO_SPACE_MANIFEST", "1"));
    let e = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{e}");
    assert!(
        e.contains("its content differs from the server's copy"),
        "{e}"
    );
    // The changed file is in `current` already, a second earlier (a
    // nanosecond would be rounded away where a store keeps seconds).
    let placed = store
        .join("cc/current")
        .join(src.strip_prefix("/").unwrap())
        .join("f");
    assert_eq!(fs::read(&placed).unwrap(), b"new content!");
    let on_disc = fs::metadata(&placed).unwrap();
    assert_eq!(
        (on_disc.mtime(), on_disc.mtime_nsec()),
        (md.mtime() - 1, md.mtime_nsec())
    );
    // A default backup then records the new content's hash, and the
    // file, committed, gets its own mtime on disc again.
    local_backup(&store, &src, "cc");
    let on_disc = fs::metadata(&placed).unwrap();
    assert_eq!(
        (on_disc.mtime(), on_disc.mtime_nsec()),
        (md.mtime(), md.mtime_nsec())
    );
    let snap = snapshots(&store, "cc").pop().unwrap();
    let r = restore_all(&store, "cc", Some(&snap), &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&r, &src));
    let v = run_status(
        Command::new(bin("byteback-server"))
            .args(["verify", "--store"])
            .arg(&store),
    );
    assert_eq!(v.status.code(), Some(0), "{}", output_text(&v));
}

/// The server widens the pipes it is given (by sshd, or by a local client)
/// from 64 KiB to 1 MiB, so data segments go through in large writes; a
/// profile of W5 over SSH had sshd spending a third of both cores moving
/// its channel buffer after each 64 KiB write.
#[test]
fn the_server_widens_its_standard_pipes() {
    use std::os::fd::AsRawFd;
    use std::process::Stdio;
    let d = scratch();
    let store = d.path().join("store");
    fs::create_dir_all(&store).unwrap();
    let mut child = Command::new(bin("byteback-server"))
        .args(["serve", "--host", "pipes", "--store"])
        .arg(&store)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let capacity = |fd: i32| {
        // SAFETY: F_GETPIPE_SZ on a pipe end this process owns.
        unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) }
    };
    let fds = [
        child.stdin.as_ref().unwrap().as_raw_fd(),
        child.stdout.as_ref().unwrap().as_raw_fd(),
    ];
    // What the system allows an unprivileged process (root may go further,
    // but the server asks for 1 MiB).
    let max: i32 = fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = max.min(1 << 20);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut got = fds.map(capacity);
    while got.iter().any(|&c| c < want) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        got = fds.map(capacity);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, [want, want], "pipe capacities (stdin, stdout)");
}

/// Files are synced only by the commit, so a crash of the server's machine
/// can keep a file an interrupted run wrote at its size and mtime and lose
/// its data. A later run under another boot keeps such a file only if the
/// client's BLAKE3 of the source matches: here the crash left zeros, and
/// the file is received again (before, the zeros were hashed and committed
/// as the file's content, and restores verified them as good).
#[test]
fn a_file_written_before_a_crash_is_checked_against_the_client() {
    let (_d, src, store) = site();
    fs::write(src.join("old"), b"old data").unwrap();
    local_backup(&store, &src, "h");
    let content = Rng::new(5).bytes(300_000);
    fs::write(src.join("new"), &content).unwrap();
    set_mtime(&src.join("new"), 1_700_000_000, 5);
    // What the crash left: an unfinished `current` (no clean marker) last
    // changed under another boot, holding `new` at its size and mtime, its
    // data lost.
    let cur = store.join("h/current");
    let stored = cur.join(src.strip_prefix("/").unwrap()).join("new");
    fs::remove_file(cur.join(".byteback/clean")).unwrap();
    fs::write(cur.join(".byteback/boot"), "a boot before the crash").unwrap();
    fs::write(&stored, vec![0u8; content.len()]).unwrap();
    set_mtime(&stored, 1_700_000_000, 5);
    let out = local_backup(&store, &src, "h");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("under another boot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(&stored).unwrap() == content,
        "zeros kept in current"
    );
    let mut snaps: Vec<_> = fs::read_dir(store.join("h"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.as_bytes()[0].is_ascii_digit())
        .collect();
    snaps.sort();
    let newest = store.join("h").join(snaps.last().unwrap());
    let in_snap = newest.join(src.strip_prefix("/").unwrap()).join("new");
    assert!(
        fs::read(in_snap).unwrap() == content,
        "zeros in the snapshot"
    );
    // A run that suspected nothing records this boot again: the next
    // unfinished run of this boot trusts what it wrote.
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    fs::write(src.join("newer"), b"x").unwrap();
    local_backup(&store, &src, "h");
    let recorded = fs::read_to_string(cur.join(".byteback/boot")).unwrap();
    assert!(
        recorded.starts_with(&format!("{} mount", boot.trim()))
            || recorded.starts_with(&format!("{} mnt.", boot.trim())),
        "{recorded}"
    );
}

/// The record of where `current` was last changed names the mount too: a
/// store that lost what it had not written yet without a reboot (its
/// filesystem mounted again after an aborted transaction, a USB disc
/// plugged in again) is suspected as after a crash, and a file the
/// interrupted run left is checked against the client.
#[test]
fn a_store_mounted_again_is_suspected_as_after_a_crash() {
    if !require_root("mounting a btrfs store again") {
        return;
    }
    let fs_ = BtrfsLoop::new(200);
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    fs::write(src.join("old"), b"old data").unwrap();
    local_backup(&store, &src, "h");
    let content = Rng::new(6).bytes(200_000);
    fs::write(src.join("new"), &content).unwrap();
    set_mtime(&src.join("new"), 1_700_000_000, 5);
    // What a lost write left, recorded under this boot and mount.
    let cur = store.join("h/current");
    let stored = cur.join(src.strip_prefix("/").unwrap()).join("new");
    fs::remove_file(cur.join(".byteback/clean")).unwrap();
    fs::write(&stored, vec![0u8; content.len()]).unwrap();
    set_mtime(&stored, 1_700_000_000, 5);
    run(Command::new("umount").arg(&fs_.mount));
    run(Command::new("mount").arg(&fs_.device).arg(&fs_.mount));
    let out = local_backup(&store, &src, "h");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("under another boot"), "{err}");
    assert!(
        fs::read(&stored).unwrap() == content,
        "zeros kept in current"
    );
}

/// In a store without btrfs a snapshot is a hard-link copy of `current`,
/// so the boot a run records in `current` goes in a new file renamed into
/// place: the snapshots keep theirs. Before, it was rewritten in place,
/// which changed it in every snapshot sharing it (or, for a server that
/// is not root, failed on the read-only copy, failing every backup).
#[test]
fn a_new_boot_is_recorded_without_touching_the_snapshots() {
    use std::os::unix::fs::MetadataExt;
    let (_d, src, store) = site();
    fs::write(src.join("a"), b"1").unwrap();
    local_backup(&store, &src, "h");
    // As if the last change had been made under an earlier boot; a run
    // that changes nothing records no boot, and its snapshot shares it.
    let boot_file = store.join("h/current/.byteback/boot");
    fs::remove_file(&boot_file).unwrap();
    fs::write(&boot_file, "an earlier boot").unwrap();
    local_backup(&store, &src, "h");
    let mut snaps: Vec<_> = fs::read_dir(store.join("h"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().as_bytes()[0].is_ascii_digit())
        .collect();
    snaps.sort();
    let in_snap = snaps.last().unwrap().join(".byteback/boot");
    let (a, b) = (
        fs::metadata(&in_snap).unwrap(),
        fs::metadata(&boot_file).unwrap(),
    );
    assert_eq!(
        (a.dev(), a.ino()),
        (b.dev(), b.ino()),
        "not a hard-link store"
    );
    fs::write(src.join("a"), b"2").unwrap();
    local_backup(&store, &src, "h");
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert!(fs::read_to_string(&boot_file)
        .unwrap()
        .starts_with(boot.trim()));
    assert_eq!(fs::read_to_string(&in_snap).unwrap(), "an earlier boot");
}

/// A source that is a symlink to a directory (a disc mounted elsewhere)
/// and dangles now is no deletion: the last backup's files are kept, and
/// the run says so (exit 24). Before, the failed open counted as a file
/// that vanished, and the server deleted everything below the source,
/// with exit 0.
#[test]
fn a_source_that_cannot_be_opened_is_kept_not_deleted() {
    let (d, src, store) = site();
    let disc = d.path().join("disc");
    fs::create_dir_all(disc.join("data")).unwrap();
    fs::write(disc.join("data/f"), b"on the disc").unwrap();
    let link = src.join("data");
    std::os::unix::fs::symlink(disc.join("data"), &link).unwrap();
    local_backup(&store, &link, "h");
    fs::rename(&disc, d.path().join("unmounted")).unwrap();
    let o = backup_with_fault(&store, &link, "BYTEBACK_TEST_NONE", "");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(err.contains("source cannot be opened"), "{err}");
    let r = restore_all(&store, "h", None, &d.path().join("r"));
    let got = restored_path(&r, &link);
    assert_eq!(fs::read(got.join("f")).unwrap(), b"on the disc", "{err}");
}

/// A directory the client cannot list, or a file it cannot stat (EIO on a
/// failing disc, through a debug-build fault), is not a deletion: the
/// server keeps what the last backup holds there, the snapshot has it, and
/// the run says so (exit 24). Before, the server deleted the whole subtree
/// from `current` and from the new snapshot (rsync, which 1.x ran, skips
/// deletions after an I/O error). Once readable again, the next run backs
/// it up as usual, deletions included.
#[test]
fn what_the_client_cannot_read_is_kept_not_deleted() {
    let d = scratch();
    let src = d.path().join("src");
    for (p, data) in [
        ("bad/one", &b"first"[..]),
        ("bad/sub/two", b"second"),
        ("e/bad", b"a file"),
        ("e/fine", b"fine"),
        ("x", b"x1"),
    ] {
        fs::create_dir_all(src.join(p).parent().unwrap()).unwrap();
        fs::write(src.join(p), data).unwrap();
    }
    let store = d.path().join("store");
    store_without_interval(&store);
    local_backup(&store, &src, "h");
    fs::write(src.join("x"), b"x2").unwrap();
    fs::write(src.join("bad/one"), b"changed, unseen").unwrap();
    let o = backup_with_fault(&store, &src, "BYTEBACK_TEST_EIO", "bad");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(err.contains("kept as the last backup has them"), "{err}");
    let r = restore_all(&store, "h", None, &d.path().join("r1"));
    let got = restored_path(&r, &src);
    assert_eq!(fs::read(got.join("x")).unwrap(), b"x2");
    assert_eq!(fs::read(got.join("bad/one")).unwrap(), b"first", "{err}");
    assert_eq!(fs::read(got.join("bad/sub/two")).unwrap(), b"second");
    assert_eq!(fs::read(got.join("e/bad")).unwrap(), b"a file");
    assert_eq!(fs::read(got.join("e/fine")).unwrap(), b"fine");
    // Readable again: backed up as it is now.
    fs::remove_file(src.join("bad/sub/two")).unwrap();
    local_backup(&store, &src, "h");
    let r = restore_all(&store, "h", None, &d.path().join("r2"));
    let got = restored_path(&r, &src);
    assert_eq!(fs::read(got.join("bad/one")).unwrap(), b"changed, unseen");
    assert!(!got.join("bad/sub/two").exists());
    assert_same_tree(&src, &got);
}

/// An unreadable directory holding more entries than the protocol lets
/// wait behind a file in flight, after a large changed file: the client
/// tells the server once nothing is in flight, and the server writes the
/// kept entries out as it takes them.
#[test]
fn a_large_unreadable_directory_is_kept_after_a_file_in_flight() {
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("bad")).unwrap();
    let mut rng = Rng::new(77);
    fs::write(src.join("a.big"), rng.bytes(24 << 20)).unwrap();
    for i in 0..9000 {
        fs::write(src.join(format!("bad/f{i:05}")), format!("{i}")).unwrap();
    }
    let store = d.path().join("store");
    store_without_interval(&store);
    local_backup(&store, &src, "h");
    fs::write(src.join("a.big"), rng.bytes(24 << 20)).unwrap();
    let o = backup_with_fault(&store, &src, "BYTEBACK_TEST_EIO", "bad");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("9000 entries kept as the last backup has them"),
        "{err}"
    );
    let r = restore_all(&store, "h", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&r, &src));
}

/// In a `current` an interrupted run left unfinished, a kept entry whose
/// stored copy is no longer the one the last backup recorded cannot be
/// vouched for (and the client cannot send it): it is left out, with a
/// warning; the rest of the unreadable directory is kept.
#[test]
fn a_kept_entry_whose_stored_copy_changed_is_left_out() {
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("bad")).unwrap();
    fs::write(src.join("bad/same"), b"same").unwrap();
    fs::write(src.join("bad/touched"), b"touched").unwrap();
    let store = d.path().join("store");
    store_without_interval(&store);
    local_backup(&store, &src, "h");
    // An interrupted run's leftovers: not clean, one stored file rewritten.
    let cur = store.join("h/current");
    fs::remove_file(cur.join(".byteback/clean")).unwrap();
    let stored = restored_path(&cur, &src).join("bad/touched");
    // A new file, as the server writes (the snapshot may share the old one's inode).
    fs::remove_file(&stored).unwrap();
    fs::write(&stored, b"half written").unwrap();
    let o = backup_with_fault(&store, &src, "BYTEBACK_TEST_EIO", "bad");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("bad/touched: the client could not read it, and its stored copy is not the one the last backup recorded: left out"),
        "{err}"
    );
    let r = restore_all(&store, "h", None, &d.path().join("r"));
    let got = restored_path(&r, &src);
    assert_eq!(fs::read(got.join("bad/same")).unwrap(), b"same");
    assert!(!got.join("bad/touched").exists(), "{err}");
}

/// A file an interrupted run left in `current` that cannot be read any more
/// (EIO, through a debug-build fault) is received whole again, with a
/// warning, instead of failing this backup and every one after it.
#[test]
fn an_unreadable_stored_copy_is_received_again() {
    let (d, src, store) = site();
    fs::write(src.join("old"), b"old").unwrap();
    local_backup(&store, &src, "h");
    let content = Rng::new(9).bytes(100_000);
    fs::write(src.join("left"), &content).unwrap();
    set_mtime(&src.join("left"), 1_700_000_000, 0);
    // What an interrupted run of this boot left: `left` in place, verified
    // (the client's mtime), no manifest naming it yet.
    let cur = store.join("h/current");
    let stored = restored_path(&cur, &src).join("left");
    fs::remove_file(cur.join(".byteback/clean")).unwrap();
    fs::write(&stored, &content).unwrap();
    set_mtime(&stored, 1_700_000_000, 0);
    let o = backup_with_fault(&store, &src, "BYTEBACK_TEST_SERVER_EIO", "left");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("cannot read its stored copy"), "{err}");
    let r = restore_all(&store, "h", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&r, &src));
}

/// A path longer than the protocol carries (4096 bytes) is left out with a
/// warning and the backup goes on: it is in no stored backup either, so
/// nothing is asked to be kept for it (a keep with such a path would be
/// refused by the server and fail every backup).
#[test]
fn a_path_too_long_is_left_out_and_the_backup_goes_on() {
    use rustix::fs::{mkdirat, openat, Mode, OFlags};
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("kept"), b"kept").unwrap();
    // 24 levels of 200-byte names, made through directory fds: no path
    // given to the kernel is longer than one name.
    let name = "d".repeat(200);
    let mut dir = openat(
        rustix::fs::CWD,
        &src,
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .unwrap();
    for _ in 0..24 {
        mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        dir = openat(
            &dir,
            name.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
    }
    let f = openat(
        &dir,
        "deep",
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    drop(f);
    let store = d.path().join("store");
    store_without_interval(&store);
    let o = local_backup_status(&store, &src, "h");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(err.contains("path too long; skipped"), "{err}");
    let r = restore_all(&store, "h", None, &d.path().join("r"));
    assert_eq!(
        fs::read(restored_path(&r, &src).join("kept")).unwrap(),
        b"kept"
    );
    // The scratch directory's removal needs the same care.
    let mut dir = openat(
        rustix::fs::CWD,
        &src,
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .unwrap();
    let mut chain = vec![];
    for _ in 0..24 {
        chain.push(
            openat(
                &dir,
                name.as_str(),
                OFlags::DIRECTORY | OFlags::RDONLY,
                Mode::empty(),
            )
            .unwrap(),
        );
        dir = chain.last().unwrap().try_clone().unwrap();
    }
    rustix::fs::unlinkat(&dir, "deep", rustix::fs::AtFlags::empty()).unwrap();
    chain.pop();
    while let Some(parent) = chain.pop() {
        rustix::fs::unlinkat(&parent, name.as_str(), rustix::fs::AtFlags::REMOVEDIR).unwrap();
    }
    rustix::fs::unlinkat(
        rustix::fs::CWD,
        src.join(&name),
        rustix::fs::AtFlags::REMOVEDIR,
    )
    .unwrap();
}

/// A server that dies after committing a backup and before its snapshot
/// (a crash, a power cut) has already counted what the backup wrote in the
/// host's usage log, synced, so the growth guard and pruning still see it:
/// the next snapshot carries those bytes.
#[test]
fn a_crash_before_the_snapshot_keeps_the_backups_growth_counted() {
    let (d, src, store) = site();
    let data = Rng::new(5).bytes(300_000);
    fs::write(src.join("f"), &data).unwrap();
    let o = backup_with_fault(&store, &src, "BYTEBACK_TEST_CRASH_BEFORE_SNAPSHOT", "1");
    assert!(
        !o.status.success(),
        "the server was to die before the snapshot"
    );
    let log = store.join("h/.byteback-usage");
    let bytes_of = |text: &str| -> Vec<(u64, String)> {
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].parse().unwrap(), f[2].to_string())
            })
            .collect()
    };
    let text = fs::read_to_string(&log).unwrap_or_default();
    let lines = bytes_of(&text);
    assert!(
        lines
            .iter()
            .any(|(b, s)| s == "-" && *b >= data.len() as u64),
        "the crashed backup's growth is not in the usage log: {text:?}"
    );
    // The next backup writes nothing new and takes the snapshot, which
    // carries the crashed backup's bytes.
    local_backup(&store, &src, "h");
    let text = fs::read_to_string(&log).unwrap();
    let lines = bytes_of(&text);
    let first_snap = lines
        .iter()
        .position(|(_, s)| s != "-")
        .expect("a snapshot line");
    let growth: u64 = lines[..=first_snap].iter().map(|(b, _)| b).sum();
    assert!(
        growth >= data.len() as u64,
        "the first snapshot's growth is {growth} bytes: {text:?}"
    );
    let r = restore_all(&store, "h", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&r, &src));
}

/// A backup within the minimum interval between snapshots makes none, so
/// its files are only in `current`. A restore or listing without
/// `--snapshot` reads `current` too, as 1.x's did, and says so; a
/// `current` changed since its commit (a backup cut off) is left out with
/// a warning, and the newest snapshot gives what it holds.
#[test]
fn a_restore_reads_a_current_newer_than_every_snapshot_plain_store() {
    let d = scratch();
    current_newer_than_every_snapshot(&d.path().join("store"), d.path());
}

#[test]
fn a_restore_reads_a_current_newer_than_every_snapshot_btrfs_store() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    let d = scratch();
    current_newer_than_every_snapshot(&fs_.mount.join("store"), d.path());
}

/// `byteback-backup` of `src` as host `h` that must fail; its output.
fn backup_to_fail(store: &Path, src: &Path) -> Output {
    let o = run_status(
        Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(store)
            .arg("--source")
            .arg(src)
            .args(["--hostname", "h", "--retry-number", "0"]),
    );
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn current_newer_than_every_snapshot(store: &Path, work: &Path) {
    let store = store.to_path_buf();
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"first version").unwrap();
    fs::write(src.join("same"), b"unchanged").unwrap();
    local_backup(&store, &src, "h");
    assert_eq!(snapshots(&store, "h").len(), 1);
    let first = snapshots(&store, "h").pop().unwrap();
    // Nothing newer than the snapshot yet: current is not read.
    let restore = |into: &Path, args: &[&str]| -> Output {
        fs::create_dir_all(into).unwrap();
        run(Command::new(bin("byteback-restore"))
            .current_dir(into)
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "h"])
            .args(args))
    };
    let o = restore(&work.join("r0"), &["--restore", "/"]);
    assert!(
        !work.join("r0/current").exists(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(work.join("r0").join(&first).exists());

    fs::remove_file(src.join("f")).unwrap();
    fs::write(src.join("f"), b"second version, newer").unwrap();
    fs::write(src.join("new"), b"made after the snapshot").unwrap();
    local_backup(&store, &src, "h");
    assert_eq!(
        snapshots(&store, "h"),
        vec![first.clone()],
        "no snapshot within 6 h"
    );

    let r1 = work.join("r1");
    let o = restore(&r1, &["--restore", "/"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("current holds a backup committed at"), "{err}");
    let got = restored_path(&r1.join("current"), &src);
    assert_same_tree(&src, &got);
    let o = restore(&work.join("l"), &["--list", "/**"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = |name: &str| {
        out.lines()
            .find(|l| l.ends_with(&format!("/{name}")))
            .unwrap_or_else(|| panic!("no {name} in:\n{out}"))
            .to_string()
    };
    assert!(line("f").starts_with("current "), "{out}");
    assert!(line("new").starts_with("current "), "{out}");
    let o = restore(&work.join("l"), &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.lines().last().unwrap().starts_with("current "), "{out}");
    // A named snapshot is that snapshot only.
    let r2 = work.join("r2");
    restore(&r2, &["--restore", "--snapshot", &first, "/"]);
    assert_eq!(
        fs::read(restored_path(&r2.join(&first), &src).join("f")).unwrap(),
        b"first version"
    );

    // A backup running (its lock held): current is left out with a
    // warning, and reading it by name is refused until the backup ends.
    let lock = fs::File::open(store.join("h/.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let r4 = work.join("r4");
    let o = restore(&r4, &["--restore", "/"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("current is left out"), "{err}");
    assert_eq!(
        fs::read(restored_path(&r4.join(&first), &src).join("f")).unwrap(),
        b"first version"
    );
    let o = run_status(
        Command::new(bin("byteback-restore"))
            .current_dir(&r4)
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "h", "--restore", "--snapshot", "current", "/"]),
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("a backup of host h is running"), "{err}");
    // A restore reading current (the lock shared): no backup starts.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockShared).unwrap();
    let o = backup_to_fail(&store, &src);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("a restore is reading its current"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(lock);

    // current changed since its commit (as by a backup cut off): left
    // out with a warning, the snapshot restored.
    fs::remove_file(store.join("h/current/.byteback/clean")).unwrap();
    let r3 = work.join("r3");
    let o = restore(&r3, &["--restore", "/"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("current is left out"), "{err}");
    assert!(!r3.join("current").exists());
    assert_eq!(
        fs::read(restored_path(&r3.join(&first), &src).join("f")).unwrap(),
        b"first version"
    );
}

/// A backup whose snapshot fails after its commit has its bytes counted in
/// the usage log once, not again by the error path: twice would make the
/// next snapshot look like a growth spike and stop pruning.
#[test]
fn a_failed_snapshot_counts_the_backups_growth_once() {
    let (_d, src, store) = site();
    let data = Rng::new(6).bytes(300_000);
    fs::write(src.join("f"), &data).unwrap();
    let o = backup_with_fault(&store, &src, "BYTEBACK_TEST_SNAPSHOT_FAILS", "1");
    assert!(!o.status.success(), "the snapshot was to fail");
    let text = fs::read_to_string(store.join("h/.byteback-usage")).unwrap();
    let total: u64 = text
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(
        total >= data.len() as u64 && total < 2 * data.len() as u64,
        "{total} bytes counted for {} written: {text:?}",
        data.len()
    );
}

/// A backup of `a` ("old content"), `z/link` (a second name of it) and
/// `z/plain`, then `change` done to `a`, then a backup with `z` unreadable:
/// the kept link is left out, said, and the run is partial. Its output.
fn kept_link_after(change: fn(&Path)) -> (tempfile::TempDir, PathBuf, PathBuf, String) {
    let (d, src, store) = site();
    fs::create_dir_all(src.join("z")).unwrap();
    fs::write(src.join("a"), b"old content").unwrap();
    fs::hard_link(src.join("a"), src.join("z/link")).unwrap();
    fs::write(src.join("z/plain"), b"plain").unwrap();
    local_backup(&store, &src, "h");
    change(&src.join("a"));
    let o = backup_with_fault(&store, &src, "BYTEBACK_TEST_EIO", "z");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("whose content changed since: left out"),
        "{err}"
    );
    (d, src, store, err)
}

/// A hard link in an unreadable directory, kept from the last backup,
/// whose first name elsewhere was replaced since: which content the link
/// names now is not known (the old file, if replaced; the new, if written
/// in place), so it is left out with a warning, and a restore takes it
/// from the last snapshot with the content it had there.
#[test]
fn a_kept_hard_link_whose_first_name_changed_is_left_out() {
    // Replaced: z/link still names the old file.
    let (d, src, store, err) = kept_link_after(|a| {
        fs::remove_file(a).unwrap();
        fs::write(a, b"new content").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
    });
    let first = snapshots(&store, "h")[0].clone();
    // Counted by the client too: the server's left-out entry makes it partial.
    assert!(
        err.contains("1 entries left out or kept at their last version by the server"),
        "{err}"
    );
    let second = snapshots(&store, "h").pop().unwrap();
    assert_ne!(first, second);
    let into = d.path().join("r");
    fs::create_dir_all(&into).unwrap();
    run(Command::new(bin("byteback-restore"))
        .current_dir(&into)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "h", "--restore", "/"]));
    let newest = restored_path(&into.join(&second), &src);
    assert_eq!(fs::read(newest.join("a")).unwrap(), b"new content");
    assert_eq!(fs::read(newest.join("z/plain")).unwrap(), b"plain");
    assert!(!newest.join("z/link").exists(), "the link was kept");
    let older = restored_path(&into.join(&first), &src);
    assert_eq!(fs::read(older.join("z/link")).unwrap(), b"old content");
}

/// The same for a first name replaced by a symlink (hard links may name
/// one since protocol 11): the kept link is not made a name of the
/// symlink.
#[test]
fn a_kept_hard_link_whose_first_name_became_a_symlink_is_left_out() {
    let (d, src, store, _) = kept_link_after(|a| {
        fs::remove_file(a).unwrap();
        std::os::unix::fs::symlink("elsewhere", a).unwrap();
    });
    let root = restore_all(&store, "h", None, &d.path().join("r"));
    let newest = restored_path(&root, &src);
    assert!(fs::symlink_metadata(newest.join("a")).unwrap().is_symlink());
    assert!(
        fs::symlink_metadata(newest.join("z/link")).is_err(),
        "the link was kept"
    );
}

/// A path the client cannot read is kept by the server as the last backup
/// has it; the client's record of this backup takes those entries from
/// its record of the last one, so it stays the chain of the server's
/// manifest: the next run, the path still unreadable, goes as runs of
/// unchanged entries instead of announcing every entry.
#[test]
fn a_kept_path_leaves_a_record_the_next_run_can_use() {
    let d = scratch();
    let src = d.path().join("tree/src");
    for i in 0..50 {
        let f = src.join(format!("bad/sub/f{i:02}"));
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, format!("{i}")).unwrap();
        fs::write(src.join(format!("ok{i:02}")), format!("ok {i}")).unwrap();
    }
    let store = d.path().join("store");
    store_without_interval(&store);
    let cache = d.path().join("cache");
    let with_fault = |fault: bool| -> (String, u64, u64) {
        let mut cmd = Command::new(bin("byteback-backup"));
        if fault {
            cmd.env("BYTEBACK_TEST_EIO", "bad");
        }
        let out = run_status(
            cmd.env("BYTEBACK_CACHE_DIR", &cache)
                .arg("--destination")
                .arg(&store)
                .arg("--source")
                .arg(&src)
                .args(["--hostname", "h", "--retry-number", "0"]),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(if fault { 24 } else { 0 }), "{err}");
        let entries = summary_number(&err, " entries,").expect(&err);
        let unchanged = summary_number(&err, " entries unchanged").unwrap_or(0);
        (err, entries, unchanged)
    };
    with_fault(false);
    let (err, _, unchanged) = with_fault(true);
    assert!(unchanged >= 40, "the ok files as recorded: {err}");
    // Still unreadable: the 50 readable files go as runs again.
    let (err, _, unchanged) = with_fault(true);
    assert!(
        unchanged >= 50,
        "the record of the keeping run was not used: {err}"
    );
    // Readable again: everything as recorded, and the tree restores.
    let (err, entries, unchanged) = with_fault(false);
    assert!(unchanged + 5 >= entries, "{err}");
    let root = restore_all(&store, "h", None, &d.path().join("r"));
    assert_same_tree(&src, &restored_path(&root, &src));
}

/// A local backup's server inherits the client's stderr (with `-q`, or no
/// terminal), which is the user's terminal or a script's pipe, shared with
/// the shell: nothing may leave that shared stream non-blocking (the
/// server's stderr relay once did, and later writes to it failed with
/// EAGAIN).
#[test]
fn a_local_backup_leaves_its_stderr_as_it_found_it() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (_d, src, store) = site();
    fs::write(src.join("f"), b"f").unwrap();
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array for pipe2; each end is owned once.
    let (r, w) = unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    let ours = w.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = std::io::Read::read_to_end(&mut fs::File::from(r), &mut v);
        v
    });
    for extra in [&["-q"][..], &[][..]] {
        let st = Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(&store)
            .arg("--source")
            .arg(&src)
            .args(["--hostname", "h", "--retry-number", "0"])
            .args(extra)
            .stderr(std::process::Stdio::from(w.try_clone().unwrap()))
            .status()
            .unwrap();
        assert!(st.success());
        // SAFETY: F_GETFL on a descriptor the test owns.
        let flags = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "stderr left non-blocking ({extra:?})"
        );
    }
    drop((w, ours));
    reader.join().unwrap();
}

/// A file written while the client reads it, its mtime then put back (a
/// tool that keeps times), moved only its ctime: the backup says so (exit
/// 24) and records it so that the next run reads it again. Before, the
/// mixed copy passed for the file by size and mtime in every later backup.
#[test]
fn a_write_hidden_by_its_mtime_while_read_is_caught_and_read_again() {
    let site = LocalSite::fresh();
    let f = site.src.join("db");
    // Sparse: 2 GiB to read, nothing on the disc.
    fs::File::create(&f).unwrap().set_len(2 << 30).unwrap();
    let m = fs::metadata(&f).unwrap();
    let backup = |host: &str| {
        Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(&site.store)
            .arg("--source")
            .arg(&site.src)
            .args(["--hostname", host, "--retry-number", "0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let reading = |pid: u32| {
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
            d.flatten()
                .any(|e| fs::read_link(e.path()).is_ok_and(|l| l == f))
        })
    };
    // Its mtime put back while the client reads (only the ctime tells),
    // or after the run that saw it move (a `touch -r` later): either way
    // the next run reads it again.
    for (late, text) in [
        (false, b"written while read"),
        (true, b"WRITTEN WHILE READ"),
    ] {
        written_while_read(&site, &f, &m, late, text, &backup, &reading);
    }
}

fn written_while_read(
    site: &LocalSite,
    f: &Path,
    m: &fs::Metadata,
    late: bool,
    text: &[u8; 18],
    backup: &dyn Fn(&str) -> std::process::Child,
    reading: &dyn Fn(u32) -> bool,
) {
    use std::os::unix::fs::{FileExt, MetadataExt};
    // Caught while reading (the read takes about a second; tried again
    // should a run be too quick for the poll).
    let mut caught = None;
    for attempt in 0..5 {
        let host = format!("h{late}{attempt}");
        let child = backup(&host);
        let pid = child.id();
        let t = std::time::Instant::now();
        while !reading(pid) && t.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if reading(pid) {
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            let w = fs::OpenOptions::new().write(true).open(f).unwrap();
            w.write_all_at(text, 0).unwrap();
            w.write_all_at(text, (2 << 30) - 100).unwrap();
            drop(w);
            if !late {
                set_mtime(f, m.mtime(), m.mtime_nsec());
            }
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            let o = child.wait_with_output().unwrap();
            if late {
                set_mtime(f, m.mtime(), m.mtime_nsec());
            }
            caught = Some((host, o));
            break;
        }
        let _ = child.wait_with_output();
    }
    let (host, o) = caught.expect("the client was never seen reading the file");
    let err = output_text(&o);
    assert_eq!(o.status.code(), Some(24), "late {late}: {err}");
    assert!(err.contains("db: changed while being read"), "{err}");
    // The next run reads it again: current then holds the file as it is.
    let o = backup(&host).wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let stored = site
        .store
        .join(&host)
        .join("current")
        .join(f.strip_prefix("/").unwrap());
    let (a, b) = (fs::File::open(f).unwrap(), fs::File::open(&stored).unwrap());
    for at in [0, (2 << 30) - 100] {
        let (mut x, mut y) = ([0u8; 18], [0u8; 18]);
        a.read_exact_at(&mut x, at).unwrap();
        b.read_exact_at(&mut y, at).unwrap();
        assert_eq!(x, y, "late {late}, at {at}");
    }
    assert_eq!(fs::metadata(&stored).unwrap().mtime_nsec(), m.mtime_nsec());
}

/// A listing whose reader goes away (`| head`) ends quietly with 0, and a
/// store this user may not read says so, not "no snapshots here".
#[test]
fn a_listing_into_a_closed_pipe_ends_quietly_and_an_unreadable_store_says_so() {
    use std::io::BufRead;
    let site = LocalSite::fresh();
    for i in 0..3000 {
        fs::write(
            site.src.join(format!("file-with-a-longish-name-{i:05}")),
            b"x",
        )
        .unwrap();
    }
    run(Command::new(bin("byteback-backup"))
        .arg("--destination")
        .arg(&site.store)
        .arg("--source")
        .arg(&site.src)
        .args(["--hostname", "h", "--retry-number", "0"]));
    let list = || {
        let mut c = Command::new(bin("byteback-restore"));
        c.arg("--destination")
            .arg(&site.store)
            .args(["--hostname", "h", "--list", "/"]);
        c
    };
    let mut child = list()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("snapshot"), "{first}");
    let o = child.wait_with_output().unwrap();
    let err = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
    if !require_root("listing a store as another user") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut dir = site.store.clone();
    while dir != Path::new("/") {
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o005)).unwrap();
        dir.pop();
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("byteback-restore"))
        .arg("--destination")
        .arg(&site.store)
        .args(["--hostname", "h", "--list", "/"]);
    let o = run_status(&mut c);
    let err = output_text(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!err.contains("no snapshots"), "{err}");
}

/// A local store's server killed (-9) before it answers, and again in the
/// middle of a backup: the client sees it at once and ends (it kept the
/// server's ends of the sockets open while it waited for the answer, and
/// then waited for its I/O timeout, three hours).
#[test]
fn a_client_ends_at_once_when_its_local_server_is_killed() {
    use std::os::unix::fs::PermissionsExt;
    let site = LocalSite::fresh();
    let f = site.src.join("big");
    fs::File::create(&f).unwrap().set_len(4 << 30).unwrap();
    // A server that is slow to answer (its sleep holds none of the sockets).
    let slow = site.work.join("slow-server");
    fs::write(
        &slow,
        format!(
            "#!/bin/sh\nsleep 30 </dev/null >/dev/null\nexec '{}' \"$@\"\n",
            bin("byteback-server").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&slow, fs::Permissions::from_mode(0o755)).unwrap();
    let marker = site.store.to_str().unwrap().to_string();
    for (server, wait_ms) in [(Some(&slow), 0), (None, 200)] {
        let mut c = Command::new(bin("byteback-backup"));
        c.arg("--destination")
            .arg(&site.store)
            .arg("--source")
            .arg(&site.src)
            .args(["--hostname", "h", "--retry-number", "0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(s) = server {
            c.env("BYTEBACK_SERVER", s);
        }
        let mut child = c.spawn().unwrap();
        let t = std::time::Instant::now();
        let pid = loop {
            let found: Vec<u32> = processes_naming(&marker)
                .into_iter()
                .filter(|(p, c)| c.contains(" serve ") && *p != child.id())
                .map(|(p, _)| p)
                .collect();
            if let Some(p) = found.first() {
                break *p;
            }
            assert!(t.elapsed().as_secs() < 30, "no server started");
            assert!(
                child.try_wait().unwrap().is_none(),
                "the backup ended first"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        send_signal(pid, Signal::KILL);
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed().as_secs() > 20 {
                let _ = child.kill();
                panic!("the client did not end within 20 s of its server's death ({server:?})");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(!status.success(), "{status:?}");
    }
}

/// `status` takes a host's size from what the commit recorded on its
/// newest manifest (an xattr), not by decoding the manifest, whose time
/// grew with the host's entries (about 1 s for 100,000 entries with long
/// paths, past a monitoring check's timeout near a million); a manifest
/// without the record (an older server's, 1.x's) is still added up.
#[test]
fn status_takes_a_hosts_size_from_its_manifests_record() {
    if !require_root("the status test (it edits a snapshot's manifest's xattrs)") {
        return;
    }
    let (_d, src, store) = site();
    let mut rng = Rng::new(0x51);
    let mut total = 0u64;
    for (i, len) in [0usize, 1, 4096, 300_000].into_iter().enumerate() {
        fs::write(src.join(format!("f{i}")), rng.bytes(len)).unwrap();
        total += len as u64;
    }
    fs::create_dir(src.join("d")).unwrap();
    std::os::unix::fs::symlink("f1", src.join("d/l")).unwrap();
    local_backup(&store, &src, "h");
    let snap = snapshots(&store, "h").pop().unwrap();
    let manifest = store.join("h").join(&snap).join(".byteback/manifest");
    let size = || -> u64 {
        let o = run_status(
            Command::new(bin("byteback-server"))
                .args(["status", "--json", "--store"])
                .arg(&store),
        );
        let text = output_text(&o);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect(&text);
        j["hosts"][0]["size_bytes"].as_u64().expect(&text)
    };
    assert_eq!(size(), total);
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(&manifest, "user.byteback.bytes", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], &total.to_le_bytes());
    // The record is what status shows...
    let planted = (total + 12_345).to_le_bytes();
    rustix::fs::setxattr(
        &manifest,
        "user.byteback.bytes",
        &planted,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    assert_eq!(size(), total + 12_345);
    // ...and without one the manifest is added up.
    rustix::fs::removexattr(&manifest, "user.byteback.bytes").unwrap();
    assert_eq!(size(), total);
    // After a backup that carries most entries over, deletes one and adds
    // one, the record is the new manifest's sum.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::remove_file(src.join("f3")).unwrap();
    fs::write(src.join("g"), rng.bytes(77_777)).unwrap();
    local_backup(&store, &src, "h");
    let total = total - 300_000 + 77_777;
    assert_eq!(size(), total);
    let snap = snapshots(&store, "h").pop().unwrap();
    let manifest = store.join("h").join(&snap).join(".byteback/manifest");
    let n = rustix::fs::getxattr(&manifest, "user.byteback.bytes", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], &total.to_le_bytes());
}

/// A backup of `src` as host `h`, its growth noted every `every` bytes:
/// the `running` lines it added to the usage log, and the log.
fn notes_of_a_backup(store: &Path, src: &Path, every: &str) -> (usize, String) {
    let log = store.join("h/.byteback-usage");
    let before = fs::read_to_string(&log).unwrap().lines().count();
    let o =
        run_status(local_backup_cmd(store, src, "h").env("BYTEBACK_TEST_GROWTH_NOTE_BYTES", every));
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let text = fs::read_to_string(&log).unwrap();
    let running = text
        .lines()
        .skip(before)
        .filter(|l| l.ends_with(" - running"))
        .count();
    (running, text)
}

/// A backup that runs long records what it has written in its host's
/// usage log as it goes (every 256 MiB; 1 MiB here, through a debug-build
/// knob), so the growth guard of a prune that another host's backup starts
/// meanwhile counts it. Before, the log had a backup's growth only once it
/// committed (or was cut off), and a giant upload in progress let other
/// hosts' prunes delete their history for it.
#[test]
fn a_running_backup_records_its_growth_as_it_goes() {
    let (_d, src, store) = site();
    let mut rng = Rng::new(0x77);
    for i in 0..4 {
        fs::write(src.join(format!("f{i}")), rng.bytes(3 << 20)).unwrap();
    }
    let o = run_status(
        local_backup_cmd(&store, &src, "h").env("BYTEBACK_TEST_GROWTH_NOTE_BYTES", "1048576"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let text = fs::read_to_string(store.join("h/.byteback-usage")).unwrap();
    let lines: Vec<(u64, String)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].parse().unwrap(), f[2].to_string())
        })
        .collect();
    let snap = lines
        .iter()
        .position(|(_, s)| s != "-")
        .expect("a snapshot line");
    // The file data (12 MiB) over several lines before the snapshot's,
    // which all count for it.
    assert!(snap >= 6, "{snap} lines before the snapshot's: {text}");
    let growth: u64 = lines[..=snap].iter().map(|(b, _)| b).sum();
    assert!((12 << 20..14 << 20).contains(&growth), "{growth}: {text}");
    // The notes are marked, so the report draws one backup.
    assert!(text.lines().any(|l| l.ends_with(" - running")), "{text}");

    // Growth from entries alone (512 bytes counted per object made): noted
    // too, not only file data.
    let src2 = src.join("d");
    fs::create_dir(&src2).unwrap();
    for i in 0..3000 {
        fs::create_dir(src2.join(format!("dir{i:05}"))).unwrap();
    }
    let (running, text) = notes_of_a_backup(&store, &src, "524288");
    assert!(running >= 1, "no note for 3,000 directories: {text}");

    // Growth from the manifest alone: FIFOs create nothing on the server
    // but each carries its xattrs into the new manifest (3 KB of random
    // bytes each here, up to a MiB a client may send), noted as written,
    // not only at the commit (a client cut off before it filled the disc
    // unseen by the guard).
    if !require_root("xattrs on FIFOs (trusted.*)") {
        return;
    }
    let src3 = src.join("fifos");
    fs::create_dir(&src3).unwrap();
    for i in 0..2000 {
        let f = src3.join(format!("p{i:05}"));
        run(Command::new("mkfifo").arg(&f));
        set_xattr(&f, "trusted.x", &rng.bytes(3000));
    }
    let (running, text) = notes_of_a_backup(&store, &src, "1048576");
    assert!(
        running >= 3,
        "6 MB of manifest noted {running} times: {text}"
    );

    // A backup cut off before its commit (its walk stuck, as on a
    // filesystem that stopped answering) leaves no new manifest behind, and
    // the usage log, which noted it as written, gets it back as a credit.
    let src4 = src.join("fifos2");
    fs::create_dir(&src4).unwrap();
    for i in 0..2000 {
        let f = src4.join(format!("p{i:05}"));
        run(Command::new("mkfifo").arg(&f));
        set_xattr(&f, "trusted.x", &rng.bytes(3000));
    }
    fs::create_dir(src.join("zz-stuck")).unwrap();
    let before = text.lines().count();
    let (o, _) = run_bounded(
        local_backup_cmd(&store, &src, "h")
            .env("BYTEBACK_TEST_GROWTH_NOTE_BYTES", "1048576")
            .env("BYTEBACK_TEST_WALK_STALL", "zz-stuck")
            .env("BYTEBACK_TEST_STUCK_LIMIT_SECS", "3")
            .args(["--io-timeout", "3"]),
        std::time::Duration::from_secs(60),
        src.to_str().unwrap(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let new_manifest = store.join("h/current/.byteback/manifest.new");
    let gone = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while new_manifest.exists() && std::time::Instant::now() < gone {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !new_manifest.exists(),
        "the cut-off backup's new manifest stays"
    );
    let text = fs::read_to_string(store.join("h/.byteback-usage")).unwrap();
    let lines: Vec<&str> = text.lines().skip(before).collect();
    let running = lines.iter().filter(|l| l.ends_with(" - running")).count();
    assert!(running >= 1, "the cut-off backup noted nothing: {text}");
    let (mut noted, mut credit) = (0u64, 0u64);
    for l in &lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.get(3) {
            Some(&"credit") => credit += f[4].parse::<u64>().unwrap(),
            _ => noted += f[1].parse::<u64>().unwrap(),
        }
    }
    assert!(
        noted.saturating_sub(credit) < 1 << 20,
        "noted {noted}, credited {credit}: {text}"
    );
}

/// A restore of hard links whose first names it does not select makes
/// each first name's object under the link's name (here symlinks with
/// 4,000-byte targets): the chunk it holds counts what that adds, so its
/// memory stays near its budget (it held each target twice, uncounted:
/// 12,000 such links peaked at 107 MiB where the budget is 32 MiB).
#[test]
fn links_to_unselected_symlinks_keep_a_restore_within_its_budget() {
    let (d, src, store) = site();
    // The first names in a/, walked before d/.
    fs::create_dir_all(src.join("a")).unwrap();
    fs::create_dir_all(src.join("d")).unwrap();
    const N: usize = 12_000;
    for i in 0..N {
        let target = format!("{i:05}{}", "t".repeat(3995));
        std::os::unix::fs::symlink(&target, src.join(format!("a/s{i:05}"))).unwrap();
        fs::hard_link(
            src.join(format!("a/s{i:05}")),
            src.join(format!("d/l{i:05}")),
        )
        .unwrap();
    }
    local_backup(&store, &src, "h");
    let into = d.path().join("r");
    fs::create_dir_all(&into).unwrap();
    let mut cmd = Command::new(bin("byteback-restore"));
    cmd.current_dir(&into)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "h", "--restore"])
        .arg(src.join("d"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Its peak from its own VmHWM, read until it ends (wait4's maxrss
    // counts what the test process, forked, held before the exec).
    let mut child = cmd.spawn().unwrap();
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(text) = fs::read_to_string(format!("/proc/{}/status", child.id())) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(status.success(), "{status}");
    let rss_mib = peak_kib / 1024;
    let snap = snapshots(&store, "h").pop().unwrap();
    let got = restored_path(&into.join(&snap), &src);
    for i in [0, N / 2, N - 1] {
        assert_eq!(
            fs::read_link(got.join(format!("d/l{i:05}"))).unwrap(),
            Path::new(&format!("{i:05}{}", "t".repeat(3995)))
        );
    }
    assert_eq!(fs::read_dir(got.join("d")).unwrap().count(), N);
    // 44 MiB here; 61 counting nothing, 107 also holding each twice.
    assert!(rss_mib < 54, "the restore peaked at {rss_mib} MiB");
}

/// A restore into a tree where a directory takes no changes (chattr +i)
/// passes over each entry there it cannot replace or make, hard links and
/// special files as regular files, with a warning each (exit 24), and
/// restores the rest (a symlink, FIFO or link there ended the whole run).
#[test]
fn a_restore_passes_over_what_an_immutable_directory_refuses() {
    if !require_root("chattr +i on a btrfs loop filesystem") {
        return;
    }
    let (_d, src, store) = site();
    fs::create_dir_all(src.join("a")).unwrap();
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("a/x"), b"first name").unwrap();
    fs::write(src.join("d/f"), b"a file").unwrap();
    std::os::unix::fs::symlink("somewhere", src.join("d/s")).unwrap();
    run(Command::new("mkfifo").arg(src.join("d/p")));
    fs::hard_link(src.join("a/x"), src.join("d/l")).unwrap();
    // Root's and 0700 already, so the restore need not change d itself
    // to work in it (an immutable directory takes no chmod either).
    fs::set_permissions(
        src.join("d"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    local_backup(&store, &src, "h");
    let fs_ = BtrfsLoop::new(300);
    let into = fs_.mount.join("r");
    let root = restore_all(&store, "h", None, &into);
    let d = restored_path(&root, &src).join("d");
    let chattr = |flag: &str| {
        let st = Command::new("chattr").arg(flag).arg(&d).status().unwrap();
        assert!(st.success(), "chattr {flag}");
    };
    // Restored again into the same place: d's entries are to be
    // replaced, and a/x, gone meanwhile, made again.
    let x = restored_path(&root, &src).join("a/x");
    fs::remove_file(&x).unwrap();
    // What stands in d must stay as it is where the restore cannot put
    // the snapshot's entries in its place.
    let before: Vec<_> = ["s", "p", "l", "f"]
        .iter()
        .map(|n| std::os::unix::fs::MetadataExt::ino(&lstat(&d.join(n))))
        .collect();
    chattr("+i");
    let o = run_status(
        Command::new(bin("byteback-restore"))
            .current_dir(&into)
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", "h", "--restore", "/"]),
    );
    chattr("-i");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(24), "{err}");
    for n in ["s", "p", "l", "f"] {
        let shown = d.strip_prefix(&into).unwrap().join(n);
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{}: cannot", shown.display()))
                    && l.contains("not restored")),
            "{n}: {err}"
        );
    }
    for (n, how) in [
        ("l", "cannot link it to its first name"),
        ("p", "cannot create: "),
        ("s", "cannot create: "),
        ("f", "cannot create it"),
    ] {
        assert!(err.contains(&format!("d/{n}: {how}")), "{n}: {err}");
    }
    let after: Vec<_> = ["s", "p", "l", "f"]
        .iter()
        .map(|n| std::os::unix::fs::MetadataExt::ino(&lstat(&d.join(n))))
        .collect();
    assert_eq!(before, after, "what stood in d changed");
    assert_eq!(fs::read(x).unwrap(), b"first name");
}

/// A file the protocol cannot carry (over 16 TiB: a sparse file costs
/// nothing to make on btrfs) is named in a warning and passed over (exit
/// 24); the rest is backed up. Sent, it made the server refuse the whole
/// batch, and every backup of the machine failed.
#[test]
fn a_file_beyond_the_protocols_limits_is_passed_over_not_the_backup() {
    if !require_root("a btrfs loop filesystem as the source") {
        return;
    }
    let (_d, _, store) = site();
    let fs_ = BtrfsLoop::new(200);
    let src = fs_.mount.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("small"), b"kept").unwrap();
    let big = fs::File::create(src.join("huge")).unwrap();
    big.set_len(17 << 40).unwrap();
    drop(big);
    let o = local_backup_status(&store, &src, "h");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("huge: 18691697672192 bytes, larger than 16 TiB, more than a backup can store; not backed up"),
        "{err}"
    );
    let stored = restored_path(&store.join("h/current"), &src);
    assert_eq!(fs::read(stored.join("small")).unwrap(), b"kept");
    assert!(!stored.join("huge").exists());
    assert_eq!(snapshots(&store, "h").len(), 1);
}

//! `byteback-server verify` on a real btrfs store: damage in `current` and in
//! a read-only snapshot is found, the next backup repairs `current`, a
//! restore from the damaged snapshot reports the file and restores the rest,
//! and budgeted runs cover the whole host over several runs.

use crate::util;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use util::*;

const HOST: &str = "h";

fn backup(store: &Path, src: &Path) -> Output {
    run(Command::new(bin("byteback-backup"))
        .arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", HOST, "--retry-number", "0"]))
}

fn verify(store: &Path, args: &[&str]) -> Output {
    run_status(
        Command::new(bin("byteback-server"))
            .arg("verify")
            .arg("--store")
            .arg(store)
            .args(args),
    )
}

/// A btrfs store with one backup of `n` random files of `size` bytes
/// (`f0`...), made from `seed`.
struct Site {
    fs_: BtrfsLoop,
    store: PathBuf,
    work: tempfile::TempDir,
    src: PathBuf,
    rng: Rng,
}

/// [`Site`], or `None` (said loudly) when not root.
fn backed_up_site(seed: u64, n: usize, size: usize) -> Option<Site> {
    if !require_root("verify on a btrfs store") {
        return None;
    }
    let fs_ = BtrfsLoop::new(300);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let work = scratch();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(seed);
    for i in 0..n {
        fs::write(src.join(format!("f{i}")), rng.bytes(size)).unwrap();
    }
    backup(&store, &src);
    Some(Site {
        fs_,
        store,
        work,
        src,
        rng,
    })
}

/// Flips one byte of `path` in place, keeping its size and mtime.
fn flip_byte(path: &Path, at: u64) {
    let m = fs::symlink_metadata(path).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
    drop(f);
    set_mtime(path, m.mtime(), m.mtime_nsec());
}

fn set_read_only(subvol: &Path, ro: bool) {
    run(Command::new("btrfs")
        .args(["property", "set", "-ts"])
        .arg(subvol)
        .args(["ro", if ro { "true" } else { "false" }]));
}

/// `<store>/<host>/<snapshot>/<src without leading />/<rel>`.
fn stored(store: &Path, snap: &str, src: &Path, rel: &str) -> PathBuf {
    store
        .join(HOST)
        .join(snap)
        .join(src.strip_prefix("/").unwrap())
        .join(rel)
}

#[test]
fn verify_finds_damage_the_next_backup_repairs_current_and_restore_goes_on() {
    if !require_root("verify on a btrfs store") {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let work = scratch();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    let mut rng = Rng::new(7);
    fs::write(src.join("a"), rng.bytes(100_000)).unwrap();
    fs::write(src.join("b"), b"small").unwrap();
    fs::write(src.join("dir/c"), rng.bytes(1 << 20)).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("dir/f{i}")), rng.bytes(10_000)).unwrap();
    }
    backup(&store, &src);
    let s1 = snapshots(&store, HOST).pop().unwrap();
    // --verify-warn: a host never verified whole is due once its oldest
    // snapshot is older than the limit, not before.
    let now = unix_now();
    // The report's page says the same (its summary and the host's part).
    let page_dir = work.path().join("page");
    let verify_warn = |at: i64| {
        let o = run_status(
            Command::new(bin("byteback-server"))
                .args(["status", "--verify-warn", "1h", "--now", &rfc3339(at)])
                .arg("--store")
                .arg(&store),
        );
        let r = run_status(
            Command::new(bin("byteback-server"))
                .args(["report", "--verify-warn", "1h", "--now", &rfc3339(at)])
                .arg("--html")
                .arg(&page_dir)
                .arg("--store")
                .arg(&store),
        );
        assert_eq!(r.status.code(), Some(0), "{}", output_text(&r));
        let page = fs::read_to_string(page_dir.join("index.html")).unwrap();
        assert!(page.contains("whole verification due after 1h"), "{page}");
        let out = output_text(&o);
        let summary = format!(
            "id=\"summary\">{}<",
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .replace('"', "&quot;")
        );
        let host_warned = page.contains(&format!("data-host=\"{HOST}\" data-state=\"WARNING\""))
            && page.contains("verified whole");
        assert!(page.contains(&summary), "{summary} in {page}");
        assert_eq!(host_warned, o.status.code() == Some(1), "{out}: {page}");
        (o.status.code(), out)
    };
    let (code, out) = verify_warn(now + 600);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = verify_warn(now + 7200);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("BYTEBACK WARNING - {HOST} never verified whole")),
        "{out}"
    );

    // Nothing damaged yet.
    let o = verify(&store, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    // Verified whole now: due again only an hour later.
    let (code, out) = verify_warn(now + 600);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = verify_warn(now + 7200);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("BYTEBACK WARNING - {HOST} last verified whole")),
        "{out}"
    );

    // A byte flipped in current (mtime kept) and one in the read-only snapshot.
    flip_byte(&stored(&store, "current", &src, "a"), 5000);
    let snap_path = store.join(HOST).join(&s1);
    set_read_only(&snap_path, false);
    flip_byte(&stored(&store, &s1, &src, "dir/c"), 123_456);
    set_read_only(&snap_path, true);
    assert!(is_read_only(&snap_path));

    let o = verify(&store, &[]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let rel = src.strip_prefix("/").unwrap().display().to_string();
    assert!(
        out.contains(&format!("DAMAGED {HOST} current /{rel}/a:")),
        "{out}"
    );
    assert!(
        out.contains(&format!("DAMAGED {HOST} {s1} /{rel}/dir/c:")),
        "{out}"
    );
    assert!(
        out.contains("1 in current marked for the next backup"),
        "{out}"
    );
    assert_eq!(out.matches("DAMAGED").count(), 2, "{out}");
    // status names the damage and turns WARNING.
    let o = run_status(
        Command::new(bin("byteback-server"))
            .args(["status", "--warn", "1d", "--store"])
            .arg(&store),
    );
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("BYTEBACK WARNING") && out.contains("2 damaged files"),
        "{out}"
    );
    assert!(out.contains(&format!("DAMAGED {s1} /{rel}/dir/c")), "{out}");
    assert!(out.contains(" ago"), "last full verify not shown: {out}");
    let o = verify(&store, &["--json", "--snapshot", &s1]);
    let json = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(json.contains("\"damaged\":[{\"snapshot\":"), "{json}");
    assert!(json.contains("dir/c"), "{json}");

    // The next backup (source unchanged) rebuilds current's damaged file.
    backup(&store, &src);
    let o = verify(&store, &["--snapshot", "current"]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    assert_eq!(
        fs::read(stored(&store, "current", &src, "a")).unwrap(),
        fs::read(src.join("a")).unwrap()
    );
    let o = run_status(
        Command::new(bin("byteback-server"))
            .args(["status", "--store"])
            .arg(&store),
    );
    let out = output_text(&o);
    assert!(
        !out.contains("DAMAGED current"),
        "repaired current still listed: {out}"
    );
    assert!(out.contains(&format!("DAMAGED {s1} ")), "{out}");
    let s2 = snapshots(&store, HOST).pop().unwrap();
    assert_ne!(s1, s2);
    let o = verify(&store, &["--snapshot", &s2]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));

    // A stored file the server cannot open at all (here: a directory in its
    // place) ends short; the restore reports it too and goes on.
    set_read_only(&snap_path, false);
    let b = stored(&store, &s1, &src, "b");
    fs::remove_file(&b).unwrap();
    fs::create_dir(&b).unwrap();
    set_read_only(&snap_path, true);
    // A restore from the damaged snapshot reports the files, removes them and
    // restores everything else.
    let into = work.path().join("restore");
    fs::create_dir_all(&into).unwrap();
    let o = run_status(
        Command::new(bin("byteback-restore"))
            .current_dir(&into)
            .arg("--destination")
            .arg(&store)
            .args(["--hostname", HOST, "--restore", "--snapshot", &s1, "/"]),
    );
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("DAMAGED") && out.contains("dir/c"), "{out}");
    let restored = into.join(&s1).join(&rel);
    assert!(
        fs::symlink_metadata(restored.join("dir/c")).is_err(),
        "{out}"
    );
    assert_eq!(
        fs::read(restored.join("a")).unwrap(),
        fs::read(src.join("a")).unwrap()
    );
    for i in 0..20 {
        let p = format!("dir/f{i}");
        assert_eq!(
            fs::read(restored.join(&p)).unwrap(),
            fs::read(src.join(&p)).unwrap()
        );
    }
}

/// A failing disc can damage millions of files: verify lists the first
/// 10,000 (in its report, its state and `status`) and counts the rest,
/// once however often it finds them, and still marks every damaged file
/// of `current` for the next backup, which repairs them all.
#[test]
fn damage_beyond_the_list_is_counted_and_all_of_current_is_repaired() {
    const N: usize = 10_050;
    let Some(Site {
        fs_: _fs,
        store,
        work: _work,
        src,
        ..
    }) = backed_up_site(31, N, 16)
    else {
        return;
    };
    let s1 = snapshots(&store, HOST).pop().unwrap();
    // Every stored file of the snapshot and of current damaged, its size
    // and mtime kept (no sync per file: one for all).
    let damage = |snap: &str| {
        for i in 0..N {
            let p = stored(&store, snap, &src, &format!("f{i}"));
            let m = fs::symlink_metadata(&p).unwrap();
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, 3).unwrap();
            f.write_all_at(&[b[0] ^ 0x5a], 3).unwrap();
            drop(f);
            set_mtime(&p, m.mtime(), m.mtime_nsec());
        }
    };
    let snap_path = store.join(HOST).join(&s1);
    set_read_only(&snap_path, false);
    damage(&s1);
    set_read_only(&snap_path, true);
    damage("current");
    run(&mut Command::new("sync"));
    let tail = |s: &str| s[s.len().saturating_sub(2000)..].to_string();
    let o = verify(&store, &[]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{}", tail(&out));
    // The snapshot is checked first: its files fill the list.
    assert_eq!(
        out.matches(&format!("DAMAGED {HOST} {s1} /")).count(),
        10_000
    );
    assert_eq!(out.matches(&format!("DAMAGED {HOST} current /")).count(), 0);
    for (snap, n) in [(&s1[..], 50), ("current", N)] {
        let line = format!("DAMAGED {HOST} {snap} and {n} more files, not listed");
        assert!(out.contains(&line), "{line} in {}", tail(&out));
    }
    assert!(
        out.contains(&format!(
            "{} damaged, {N} in current marked for the next backup",
            2 * N
        )),
        "{}",
        tail(&out)
    );
    let state_file = store.join(HOST).join(".byteback-verify");
    let state = || fs::read_to_string(&state_file).unwrap();
    let listed_and_unlisted = |st: &str| {
        let listed = st.lines().filter(|l| l.starts_with("damage ")).count();
        let counts: Vec<String> = st
            .lines()
            .filter(|l| l.starts_with("damage-count "))
            .map(String::from)
            .collect();
        (listed, counts)
    };
    let want = (
        10_000,
        vec![
            format!("damage-count {s1} {N}"),
            format!("damage-count current {N}"),
        ],
    );
    let mut got = listed_and_unlisted(&state());
    got.1.sort_by_key(|l| l.contains("current"));
    assert_eq!(got, want);
    let status = |args: &[&str]| {
        let o = run_status(
            Command::new(bin("byteback-server"))
                .arg("status")
                .args(args)
                .arg("--store")
                .arg(&store),
        );
        (o.status.code(), output_text(&o))
    };
    let (code, out) = status(&["--warn", "1d"]);
    assert_eq!(code, Some(1), "{}", tail(&out));
    assert!(
        out.contains(&format!("{} damaged files", 2 * N)),
        "{}",
        tail(&out)
    );
    assert!(
        out.contains(&format!("DAMAGED and {} more files, not listed", N + 50)),
        "{}",
        tail(&out)
    );
    let (_, json) = status(&["--json"]);
    assert!(
        json.contains(&format!("\"damaged_unlisted\":{}", N + 50)),
        "{}",
        tail(&json)
    );
    // A second pass finds the snapshot's files again, and counts them
    // once (current, marked for the next backup, is passed over).
    let o = verify(&store, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", tail(&output_text(&o)));
    let mut got = listed_and_unlisted(&state());
    got.1.sort_by_key(|l| l.contains("current"));
    assert_eq!(got, want);
    // Budgeted passes, each checking the snapshot in two runs (25 MiB a run,
    // 4 KiB counted per file): still counted once (a run that checked part of
    // it added what the list had no room for on top of the count each pass).
    for run in 0..4 {
        let o = verify(&store, &["--budget", "25M"]);
        assert_eq!(o.status.code(), Some(1), "{}", tail(&output_text(&o)));
        let mut got = listed_and_unlisted(&state());
        got.1.sort_by_key(|l| l.contains("current"));
        assert_eq!(got, want, "budgeted run {run}");
    }

    // The next backup, the source unchanged, rewrites every marked file.
    backup(&store, &src);
    let o = verify(&store, &["--snapshot", "current"]);
    assert_eq!(o.status.code(), Some(0), "{}", tail(&output_text(&o)));
    for i in [0, 4095, 4096, 9999, 10_000, N - 1] {
        let f = format!("f{i}");
        assert_eq!(
            fs::read(stored(&store, "current", &src, &f)).unwrap(),
            fs::read(src.join(&f)).unwrap(),
            "{f}"
        );
    }
    let (_, out) = status(&[]);
    assert!(!out.contains("DAMAGED current"), "{}", tail(&out));
    assert!(
        out.contains("DAMAGED and 50 more files, not listed"),
        "{}",
        tail(&out)
    );
}

/// The files a verify run says it checked (`...: N files ...`).
fn files_checked(out: &str) -> u64 {
    out.split(": ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no file count in {out}"))
}

#[test]
fn budgeted_verify_covers_the_host_over_several_runs() {
    let Some(Site {
        fs_: _fs,
        store,
        work: _work,
        src,
        mut rng,
    }) = backed_up_site(9, 10, 100_000)
    else {
        return;
    };
    fs::write(src.join("f0"), rng.bytes(100_000)).unwrap();
    backup(&store, &src);
    // Two snapshots and current, 10 files each: 3 MB in all; 700 kB a run.
    let state = store.join(HOST).join(".byteback-verify");
    let mut runs = 0;
    let mut files = 0;
    loop {
        runs += 1;
        assert!(runs <= 8, "no full pass after {runs} runs");
        let o = verify(&store, &["--budget", "700K"]);
        let out = output_text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}");
        files += files_checked(&out);
        let st = fs::read_to_string(&state).unwrap();
        if st.contains("last-full") {
            assert!(!st.contains("cursor"), "{st}");
            break;
        }
        assert!(st.contains("cursor"), "{st}");
    }
    assert!(runs >= 4, "a 700 kB budget covered 3 MB in {runs} runs");
    assert_eq!(files, 30, "every file of every snapshot checked once");

    // Damage in the newest snapshot, found by a pass, stays listed while
    // the next pass has not come back to that snapshot.
    let s2 = snapshots(&store, HOST).pop().unwrap();
    let s2_path = store.join(HOST).join(&s2);
    set_read_only(&s2_path, false);
    flip_byte(&stored(&store, &s2, &src, "f5"), 10);
    set_read_only(&s2_path, true);
    let mut found = false;
    for _ in 0..8 {
        let o = verify(&store, &["--budget", "700K"]);
        found |= o.status.code() == Some(1);
        if !fs::read_to_string(&state).unwrap().contains("cursor") {
            break; // the pass is done
        }
    }
    assert!(found, "the flipped byte was never found");
    // A new pass begins with the oldest snapshot, which is sound.
    let o = verify(&store, &["--budget", "700K"]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let status = |args: &[&str]| {
        output_text(&run_status(
            Command::new(bin("byteback-server"))
                .arg("status")
                .args(args)
                .arg("--store")
                .arg(&store),
        ))
    };
    let out = status(&[]);
    assert!(
        out.contains(&format!("DAMAGED {s2} ")),
        "the damage was forgotten: {out}"
    );

    // current as an interrupted backup left it (no clean marker, a file
    // half rebuilt) is not verified, and not reported damaged.
    let clean = store.join(HOST).join("current/.byteback/clean");
    fs::remove_file(&clean).unwrap();
    flip_byte(&stored(&store, "current", &src, "f3"), 10);
    let o = verify(&store, &["--snapshot", "current"]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("left by an interrupted backup"), "{out}");
    assert!(!out.contains("DAMAGED"), "{out}");
    // Nor while a backup holds the host's lock.
    fs::write(&clean, b"").unwrap();
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(store.join(HOST).join(".lock"))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let o = verify(&store, &["--snapshot", "current"]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("is being written by a backup"), "{out}");
    // Held shared, as a restore of current holds it: said as such.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared).unwrap();
    let o = verify(&store, &["--snapshot", "current"]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("is being read by a restore"), "{out}");
    drop(lock);
    // Once settled, it is checked as any snapshot.
    let o = verify(&store, &["--snapshot", "current"]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
}

/// A verify that stops early (its budget spent, under `--snapshot` or in
/// a pass) forgets nothing of the damage known in the files it did not
/// reach: it forgot all of the snapshot's until they were checked again.
#[test]
fn a_verify_that_stops_early_keeps_the_damage_it_did_not_reach() {
    let Some(Site {
        fs_: _fs,
        store,
        work: _work,
        src,
        rng: _,
    }) = backed_up_site(11, 10, 100_000)
    else {
        return;
    };
    let s1 = snapshots(&store, HOST).pop().unwrap();
    let s1_path = store.join(HOST).join(&s1);
    set_read_only(&s1_path, false);
    flip_byte(&stored(&store, &s1, &src, "f0"), 10);
    flip_byte(&stored(&store, &s1, &src, "f9"), 10);
    set_read_only(&s1_path, true);
    let o = verify(&store, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let rel = src.strip_prefix("/").unwrap().display().to_string();
    let listed = || {
        let out = output_text(&run_status(
            Command::new(bin("byteback-server"))
                .arg("status")
                .arg("--store")
                .arg(&store),
        ));
        ["f0", "f9"].map(|f| out.contains(&format!("DAMAGED {s1} /{rel}/{f}")))
    };
    assert_eq!(listed(), [true, true]);
    for args in [
        &["--snapshot", &s1, "--budget", "150K"][..],
        &["--budget", "150K"],
    ] {
        let o = verify(&store, args);
        let out = output_text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {out}");
        assert!(!out.contains("/f9"), "{args:?} reached f9: {out}");
        assert_eq!(listed(), [true, true], "{args:?}: {out}");
    }
}

/// A btrfs store (its loop filesystem held) that snapshots every backup,
/// and a scratch directory for the hosts' sources; `None` (said) when not
/// root.
fn hosts_site() -> Option<(BtrfsLoop, std::path::PathBuf, tempfile::TempDir)> {
    if !require_root("verify on a btrfs store") {
        return None;
    }
    let fs_ = BtrfsLoop::new(300);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    Some((fs_, store, scratch()))
}

/// Whether `host` of `store` was ever verified whole.
fn verified_whole(store: &std::path::Path, host: &str) -> bool {
    fs::read_to_string(store.join(host).join(".byteback-verify"))
        .is_ok_and(|s| s.contains("last-full"))
}

/// A budgeted verify of several hosts takes a pass under way first, then
/// the host verified whole longest ago: a first host that alone takes the
/// whole budget does not keep the others from ever being verified whole.
#[test]
fn budgeted_verify_reaches_every_host() {
    let Some((_fs, store, work)) = hosts_site() else {
        return;
    };
    let mut rng = Rng::new(11);
    for host in ["a", "b"] {
        let src = work.path().join(host);
        fs::create_dir_all(&src).unwrap();
        for i in 0..10 {
            fs::write(src.join(format!("f{i}")), rng.bytes(100_000)).unwrap();
        }
        local_backup(&store, &src, host);
    }
    // Each host: a snapshot and current, 2 MB; 300 kB a run.
    let full = |h: &str| verified_whole(&store, h);
    for run in 1..=24 {
        let o = verify(&store, &["--budget", "300K"]);
        assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
        if full("a") && full("b") {
            assert!(run >= 10, "4 MB in {run} runs of 300 kB");
            return;
        }
    }
    panic!(
        "after 24 runs: a verified whole {}, b {}",
        full("a"),
        full("b")
    );
}

/// A host whose pass never ends (here its backups add more between two
/// runs than a run's budget reads) does not keep the others from their
/// turn: runs take the hosts in turn, the one a run worked on longest ago
/// first. Before, a pass under way was always taken first, so such a host
/// (honest and large, or a client writing sparse files, cheap to store
/// and read in full) had every run to itself, and damage elsewhere was
/// never found.
#[test]
fn a_host_whose_pass_never_ends_does_not_keep_the_others_from_their_turn() {
    let Some((_fs, store, work)) = hosts_site() else {
        return;
    };
    let mut rng = Rng::new(12);
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(b.join("f"), rng.bytes(50_000)).unwrap();
    local_backup(&store, &b, "b");
    let full = |h: &str| verified_whole(&store, h);
    for run in 0..4 {
        // A new 400 kB file and snapshot for a before every run.
        fs::write(a.join(format!("f{run}")), rng.bytes(400_000)).unwrap();
        local_backup(&store, &a, "a");
        let o = verify(&store, &["--budget", "300K"]);
        assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    }
    assert!(!full("a"), "a's pass ended: the test shows nothing");
    assert!(full("b"), "b was never verified whole");
}

/// A file larger than a run's budget is verified over several runs, a
/// piece (64 MiB) at a time, each byte read once; a file of `current`
/// rewritten between two runs is hashed again from its start, so damage
/// in a piece hashed before it changed is found.
#[test]
fn budgeted_verify_goes_on_within_a_large_file() {
    if !require_root("verify on a btrfs store") {
        return;
    }
    const PIECE: u64 = 64 << 20;
    const SIZE: u64 = 2 * PIECE + (12 << 20);
    let fs_ = BtrfsLoop::new(700);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let work = scratch();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(13);
    {
        let mut f = fs::File::create(src.join("big")).unwrap();
        for _ in 0..SIZE / (4 << 20) {
            std::io::Write::write_all(&mut f, &rng.bytes(4 << 20)).unwrap();
        }
    }
    backup(&store, &src);
    let state = store.join(HOST).join(".byteback-verify");
    // A run with a budget of 50 MiB; its files and bytes read, and the state.
    let budgeted = |code: i32| {
        let o = verify(&store, &["--budget", "50M"]);
        let out = output_text(&o);
        assert_eq!(o.status.code(), Some(code), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("h: "))
            .unwrap_or_else(|| panic!("no summary in {out}"));
        let n = |i: usize| -> u64 { line.split(' ').nth(i).unwrap().parse().unwrap() };
        (n(1), n(3), fs::read_to_string(&state).unwrap(), out)
    };
    // The snapshot's copy, then current's: five pieces in five runs.
    let (mut files, mut bytes, mut partials) = (0, 0, 0);
    for run in 1.. {
        assert!(run <= 5, "no whole pass in 5 runs");
        let (f, b, st, _) = budgeted(0);
        assert!(b <= (50 << 20) + PIECE, "run {run} read {b} bytes");
        files += f;
        bytes += b;
        partials += st.contains("\npartial ") as u32;
        if st.contains("last-full") {
            assert!(!st.contains("partial"), "{st}");
            break;
        }
    }
    assert_eq!((files, bytes), (2, 2 * SIZE), "each byte read once");
    assert!(partials >= 3, "{partials} runs stopped within the file");

    // A new pass: the snapshot's copy whole, then the first piece of
    // current's; then current's copy is damaged within that first piece.
    let mut st = String::new();
    for _ in 0..3 {
        st = budgeted(0).2;
        if st.contains("partial current ") {
            break;
        }
    }
    assert!(st.contains("partial current "), "{st}");
    flip_byte(&stored(&store, "current", &src, "big"), 10);
    let mut found = None;
    for _ in 0..4 {
        let o = verify(&store, &["--budget", "50M"]);
        let out = output_text(&o);
        if o.status.code() == Some(1) {
            found = Some(out);
            break;
        }
        assert_eq!(o.status.code(), Some(0), "{out}");
    }
    let out = found.expect("the damage in the first piece was never found");
    assert!(out.contains("DAMAGED h current "), "{out}");
    assert!(out.contains("content does not match its BLAKE3"), "{out}");
}

/// A backup that starts while verify checks `current` (holding the host's
/// lock) is not refused: verify lets go, says so, and goes on next time.
/// (It refused the backup as "another backup of host h is running".)
#[test]
fn a_backup_is_never_refused_for_a_verify_of_current() {
    let Some(Site {
        fs_: _fs,
        store,
        work: _work,
        src,
        ..
    }) = backed_up_site(7, 8, 8 << 20)
    else {
        return;
    };
    // 100 ms a MiB: about 6 s for current's 64 MiB, if it did not let go.
    let verifying = Command::new(bin("byteback-server"))
        .arg("verify")
        .arg("--store")
        .arg(&store)
        .args(["--snapshot", "current"])
        .env("BYTEBACK_TEST_VERIFY_SLOW", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until verify holds the host's lock.
    let lock = store.join(HOST).join(".lock");
    let held = || {
        !run_status(
            Command::new("flock")
                .args(["-n", "-s"])
                .arg(&lock)
                .arg("true"),
        )
        .status
        .success()
    };
    let t = std::time::Instant::now();
    while !held() {
        assert!(t.elapsed().as_secs() < 30, "verify never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fs::write(src.join("new"), b"written while verify ran").unwrap();
    let o = run_status(
        Command::new(bin("byteback-backup"))
            .arg("--destination")
            .arg(&store)
            .arg("--source")
            .arg(&src)
            .args(["--hostname", HOST, "--retry-number", "0"]),
    );
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let v = verifying.wait_with_output().unwrap();
    let out = output_text(&v);
    assert_eq!(v.status.code(), Some(0), "{out}");
    assert!(out.contains("a backup of the host waits"), "{out}");
    assert!(out.contains("stopped in current for a backup"), "{out}");
    // A run without a budget keeps no place: a budgeted pass under way
    // would otherwise go on from there, skipping what it had not checked.
    let state = fs::read_to_string(store.join(HOST).join(".byteback-verify")).unwrap_or_default();
    assert!(!state.contains("cursor "), "{state}");
    // Nothing was taken for damage; the next run checks current whole.
    let o = verify(&store, &["--snapshot", "current"]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains("DAMAGED"), "{out}");
    assert_eq!(
        fs::read(stored(&store, "current", &src, "new")).unwrap(),
        b"written while verify ran"
    );
}

/// Usage errors of verify and byteback-prune exit 2, as the README says
/// (they gave 3 and 1, as if the store were at fault).
#[test]
fn usage_errors_of_verify_and_prune_exit_2() {
    let work = scratch();
    let store = work.path().join("store");
    store_without_interval(&store);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"f").unwrap();
    backup(&store, &src);
    let o = verify(&store, &["--host", HOST, "--snapshot", "no-such-snapshot"]);
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(output_text(&o).contains("has no snapshot no-such-snapshot"));
    let o = run_status(
        Command::new(bin("byteback-prune"))
            .arg("--store")
            .arg(&store)
            .args(["--minpercent", "50", "--maxpercent", "10", "--prune"]),
    );
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(output_text(&o).contains("--minpercent must not exceed --maxpercent"));
}

/// Each file checked takes 4 KiB of a byte budget beyond its bytes, so a
/// host of millions of empty files is verified over several budgeted runs,
/// not in one run bounded only by `--max-time` (empty files cost nothing
/// before: here all 600 in one run of a 100 KiB budget).
#[test]
fn empty_files_take_their_share_of_a_budget() {
    let Some(Site {
        fs_: _fs,
        store,
        work: _work,
        ..
    }) = backed_up_site(11, 300, 0)
    else {
        return;
    };
    // current and one snapshot: 600 empty files; 100 KiB is 25 of them.
    let o = verify(&store, &["--budget", "100K"]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let n = files_checked(&out);
    assert!((20..=30).contains(&n), "{n} files checked: {out}");
    let st = fs::read_to_string(store.join(HOST).join(".byteback-verify")).unwrap();
    assert!(st.contains("cursor"), "{st}");
}

/// The cursor line of a host's verify state: the snapshot a budgeted pass
/// goes on in.
fn cursor_snapshot(store: &Path) -> Option<String> {
    let st = fs::read_to_string(store.join(HOST).join(".byteback-verify")).unwrap_or_default();
    st.lines()
        .find_map(|l| l.strip_prefix("cursor "))
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
}

/// Verify against prunes and against itself:
/// - a budgeted pass whose snapshot was pruned goes on with the next one
///   (it started over, and on a store pruning its oldest snapshot every day
///   a pass checking less than a snapshot a day never got past the oldest);
/// - a snapshot being deleted is passed over, said, never read (a prune
///   deleting it under the verify made every later file "damaged"), and
///   one verify reads holds prunes off;
/// - a second verify of the store refuses to run (each saved its state over
///   the other's, and they shared a temporary file).
#[test]
fn verify_keeps_its_place_when_snapshots_are_pruned_and_runs_alone() {
    let Some(Site {
        fs_: _fs,
        store,
        work: _work,
        src,
        mut rng,
    }) = backed_up_site(21, 10, 100_000)
    else {
        return;
    };
    for _ in 0..2 {
        fs::write(src.join("f0"), rng.bytes(100_000)).unwrap();
        backup(&store, &src);
    }
    let snaps = snapshots(&store, HOST);
    assert_eq!(snaps.len(), 3);
    // Budgeted runs until the pass is in the second snapshot.
    for _ in 0..6 {
        if cursor_snapshot(&store).as_deref() == Some(snaps[1].as_str()) {
            break;
        }
        let o = verify(&store, &["--budget", "300K"]);
        assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    }
    assert_eq!(cursor_snapshot(&store).as_deref(), Some(snaps[1].as_str()));
    // Pruned: the next run goes on in the third, not in the first.
    run(Command::new("btrfs")
        .args(["subvolume", "delete"])
        .arg(store.join(HOST).join(&snaps[1])));
    let o = verify(&store, &["--budget", "300K"]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    assert_eq!(cursor_snapshot(&store).as_deref(), Some(snaps[2].as_str()));

    // Being deleted (a prune holds it): passed over, said, no damage.
    let dir = fs::File::open(store.join(HOST).join(&snaps[0])).unwrap();
    rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let o = verify(&store, &["--snapshot", &snaps[0]]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("was pruned meanwhile"), "{out}");
    assert!(!out.contains("DAMAGED"), "{out}");
    drop(dir);
    // While a verify reads it (slowed: 100 ms a file), a prune cannot have
    // it: the lock a deletion takes is refused.
    let mut slow = Command::new(bin("byteback-server"));
    slow.args(["verify", "--store"])
        .arg(&store)
        .args(["--snapshot", &snaps[0]])
        .env("BYTEBACK_TEST_VERIFY_SLOW", "1");
    let mut child = slow.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let dir = fs::File::open(store.join(HOST).join(&snaps[0])).unwrap();
    let held = rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive);
    assert!(
        held.is_err(),
        "a prune could delete the snapshot verify reads"
    );
    assert!(child.wait().unwrap().success());
    drop(dir);

    // A second verify of the store refuses, saying why.
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(store.join(".byteback-verify.lock"))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let o = verify(&store, &[]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(
        out.contains("another verify of this store is running"),
        "{out}"
    );
    drop(lock);
    let o = verify(&store, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let state = store.join(HOST).join(".byteback-verify");
    assert!(fs::read_to_string(&state).unwrap().contains("last-full"));

    // A pass that had to pass current over (an interrupted backup left it)
    // is no whole pass: `status` must not show the host verified now.
    fs::remove_file(&state).unwrap();
    fs::remove_file(store.join(HOST).join("current/.byteback/clean")).unwrap();
    let o = verify(&store, &[]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("left by an interrupted backup"), "{out}");
    let st = fs::read_to_string(&state).unwrap();
    assert!(!st.contains("last-full"), "{st}");
}

/// A damaged file of `current` whose own mtime is the epoch (reproducible
/// builds stamp files so) is marked with an mtime of its own, not 0, so
/// the next backup rebuilds it: marked with 0, it kept the damaged copy by
/// its size and mtime, and verify found it again at every pass.
#[test]
fn damage_to_a_file_stamped_at_the_epoch_is_repaired() {
    let Some(site) = backed_up_site(31, 2, 10_000) else {
        return;
    };
    let (store, src) = (&site.store, &site.src);
    set_mtime(&src.join("f0"), 0, 0);
    backup(store, src);
    let current = stored(store, "current", src, "f0");
    assert_eq!(fs::metadata(&current).unwrap().mtime(), 0);
    flip_byte(&current, 100);
    let out = output_text(&verify(store, &[]));
    assert!(
        out.contains("1 in current marked for the next backup"),
        "{out}"
    );
    assert_ne!(fs::metadata(&current).unwrap().mtime(), 0, "{out}");
    backup(store, src);
    assert_eq!(
        fs::read(&current).unwrap(),
        fs::read(src.join("f0")).unwrap()
    );
    let v = verify(store, &[]);
    assert_eq!(v.status.code(), Some(0), "{}", output_text(&v));
}

//! `--json` reports of byteback-backup, byteback-restore, byteback-prune and
//! byteback-server status: stdout is exactly one JSON object, and its figures
//! are what happened (files sent = files in a fresh tree, 0 on a re-run, the
//! snapshot that exists on disc, the snapshots a prune deleted are gone and
//! the ones it kept are there; the restored tree equals the source).

use crate::util;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use util::*;

const DAY: i64 = 86_400;

/// The one JSON object on stdout (nothing else may be there).
/// The report of a run that succeeded: exit 0, and the report says so.
fn ok_json_of(o: &Output) -> Value {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    let j = json_of(o);
    assert_eq!(j["exit_code"], 0, "{j}");
    assert_eq!(j["status"], "ok", "{j}");
    j
}

fn json_of(o: &Output) -> Value {
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(
        out.lines().count(),
        1,
        "stdout must be one JSON line:\n{out}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn snapshot_set(store: &Path, host: &str) -> BTreeSet<String> {
    snapshots(store, host).into_iter().collect()
}

struct Setup {
    store: PathBuf,
    conf: PathBuf,
    wrapper: PathBuf,
}

impl Setup {
    /// A store on `fs_` (no minimum interval), settings in `dir/conf`, the
    /// server started "as of" the time each backup gives.
    fn new(fs_: &BtrfsLoop, dir: &Path) -> Setup {
        let store = fs_.mount.join("store");
        store_without_interval(&store);
        let conf = dir.join("conf");
        fs::create_dir_all(&conf).unwrap();
        Setup {
            store,
            conf,
            wrapper: server_wrapper(dir),
        }
    }

    fn backup(&self, src: &Path, host: &str, now: i64) -> Output {
        run_status(
            backup_at(&self.store, &self.wrapper, src, host, now)
                .env("BYTEBACK_CONFIG_DIR", &self.conf)
                .arg("--json"),
        )
    }
}

/// A fresh tree: `n` regular files of known sizes in a few directories, a
/// symlink and an empty directory. Returns the total bytes of file data.
fn fresh_tree(src: &Path, n: usize, rng: &mut Rng) -> u64 {
    let mut total = 0;
    for i in 0..n {
        let dir = src.join(format!("d{}", i % 4));
        fs::create_dir_all(&dir).unwrap();
        let len = 1 + rng.below(200_000) as usize;
        fs::write(dir.join(format!("f{i}")), rng.bytes(len)).unwrap();
        total += len as u64;
    }
    std::os::unix::fs::symlink("d0/f0", src.join("link")).unwrap();
    fs::create_dir_all(src.join("empty")).unwrap();
    total
}

#[test]
fn backup_and_restore_json_figures_match_what_happened() {
    if !require_root("the --json backup and restore test") {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    let d = scratch();
    let s = Setup::new(&fs_, d.path());
    // An option file byteback 2 ignores, with a warning: it must be listed.
    fs::write(s.conf.join("rsync_flags"), "--whatever\n").unwrap();
    let src = d.path().join("src");
    let mut rng = Rng::new(13);
    let total = fresh_tree(&src, N, &mut rng);
    let t0 = 1_790_000_040; // a whole minute: snapshot names have minutes
    let (snap1, entries) = first_backup_sends_every_file(&s, &src, t0, total);
    let snap2 = unchanged_backup_sends_nothing(&s, &src, t0 + DAY, entries);
    assert_ne!(snap1, snap2);
    let snap3 = grown_file_reuses_its_old_bytes(&s, &src, t0 + 2 * DAY, &mut rng);
    restore_json_names_the_snapshot_and_tree(&s.store, &src, &snap3, &d.path().join("restored"));
    // --json goes with --restore only: a listing is data already.
    let o = run_status(
        Command::new(bin("byteback-restore"))
            .arg("--destination")
            .arg(&s.store)
            .args(["--hostname", "jsonhost", "--list", "--json", "/"]),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());

    failed_backup_still_reports(&s, &src, &d.path().join("not-a-store"));
}

/// Files in the tree of the backup and restore test.
const N: usize = 37;

/// First run: every file is sent, every byte is new, the ignored
/// `rsync_flags` is warned about, the snapshot exists and the summary line
/// on stderr is unchanged. Returns the snapshot and the entry count.
fn first_backup_sends_every_file(s: &Setup, src: &Path, t0: i64, total: u64) -> (String, u64) {
    let o = s.backup(src, "jsonhost", t0);
    let j = ok_json_of(&o);
    assert_eq!(j["host"], "jsonhost", "{j}");
    assert_eq!(j["files_sent"], N as u64, "{j}");
    assert_eq!(j["bytes_new"], total, "{j}");
    assert_eq!(j["bytes_reused"], 0, "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert!(j["bytes_wire"].as_u64().unwrap() > 0, "{j}");
    assert!(j["duration_seconds"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["errors"].as_array().unwrap().is_empty(), "{j}");
    let warnings = j["warnings"].as_array().unwrap();
    assert!(
        warnings.len() == 1 && warnings[0].as_str().unwrap().contains("rsync_flags"),
        "{j}"
    );
    // Files + directories + the symlink (and the source's own entries).
    let entries = j["entries"].as_u64().unwrap();
    assert!(entries > N as u64 + 4 + 2, "{j}");
    let snap1 = j["snapshot"].as_str().unwrap().to_string();
    assert_eq!(
        snapshot_set(&s.store, "jsonhost"),
        BTreeSet::from([snap1.clone()])
    );
    // The summary line on stderr is unchanged.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "snapshot {snap1} taken; {entries} entries, {N} files sent"
        )),
        "{err}"
    );
    (snap1, entries)
}

/// Second run, nothing changed: nothing sent, same entries. Returns the snapshot.
fn unchanged_backup_sends_nothing(s: &Setup, src: &Path, now: i64, entries: u64) -> String {
    let o = s.backup(src, "jsonhost", now);
    let j = json_of(&o);
    assert_eq!(j["exit_code"], 0, "{j}");
    assert_eq!(j["files_sent"], 0, "{j}");
    assert_eq!(j["bytes_new"], 0, "{j}");
    assert_eq!(j["entries"], entries, "{j}");
    j["snapshot"].as_str().unwrap().to_string()
}

/// One file grows: one file sent, its old bytes reused. Returns the snapshot.
fn grown_file_reuses_its_old_bytes(s: &Setup, src: &Path, now: i64, rng: &mut Rng) -> String {
    let f = src.join("d1/f1");
    let old = fs::metadata(&f).unwrap().len();
    let mut data = fs::read(&f).unwrap();
    data.extend(rng.bytes(10_000));
    fs::write(&f, &data).unwrap();
    let o = s.backup(src, "jsonhost", now);
    let j = json_of(&o);
    assert_eq!(j["files_sent"], 1, "{j}");
    assert_eq!(
        j["bytes_new"].as_u64().unwrap() + j["bytes_reused"].as_u64().unwrap(),
        data.len() as u64,
        "{j}"
    );
    assert!(j["bytes_reused"].as_u64().unwrap() >= old / 2, "{j}");
    j["snapshot"].as_str().unwrap().to_string()
}

/// Restore with --json: the figures name `snap` and the directory, the
/// tree is the source's, every entry below it and its ancestors counted.
fn restore_json_names_the_snapshot_and_tree(store: &Path, src: &Path, snap: &str, into: &Path) {
    fs::create_dir_all(into).unwrap();
    let o = run_status(
        Command::new(bin("byteback-restore"))
            .current_dir(into)
            .arg("--destination")
            .arg(store)
            .args(["--hostname", "jsonhost", "--restore", "--json"])
            .arg(src),
    );
    let j = ok_json_of(&o);
    assert_eq!(j["snapshots"], serde_json::json!([snap]), "{j}");
    let dir = PathBuf::from(j["directories"][0].as_str().unwrap());
    assert_eq!(dir, into.join(snap));
    assert_same_tree(src, &dir.join(src.strip_prefix("/").unwrap()));
    // Every entry below the source, and the source's ancestors.
    let below = walk(src).len() as u64;
    let restored = j["entries"].as_u64().unwrap();
    assert!(restored > below, "{restored} <= {below}: {j}");
    assert!(j["damaged"].as_array().unwrap().is_empty(), "{j}");
}

/// A failed backup (the store is a regular file) still reports, with its
/// exit code and the error.
fn failed_backup_still_reports(s: &Setup, src: &Path, not_a_store: &Path) {
    fs::write(not_a_store, "x").unwrap();
    let o = run_status(
        Command::new(bin("byteback-backup"))
            .env("BYTEBACK_CONFIG_DIR", &s.conf)
            .arg("--destination")
            .arg(not_a_store)
            .arg("--source")
            .arg(src)
            .args(["--hostname", "jsonhost", "--retry-number", "0", "--json"]),
    );
    assert_eq!(o.status.code(), Some(1));
    let j = json_of(&o);
    assert_eq!(j["exit_code"], 1, "{j}");
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["snapshot"], Value::Null, "{j}");
    assert!(!j["errors"].as_array().unwrap().is_empty(), "{j}");
}

#[test]
fn prune_and_status_json_name_what_was_deleted_and_kept() {
    if !require_root("the --json prune and status test") {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    let d = scratch();
    let s = Setup::new(&fs_, d.path());
    let store = s.store.clone();
    let src = d.path().join("src");
    let mut rng = Rng::new(7);
    fresh_tree(&src, 5, &mut rng);
    let t0 = 1_790_000_040; // a whole minute: snapshot names have minutes
    for (host, days) in [("alpha", 0..4), ("beta", 0..2)] {
        for day in days {
            let o = s.backup(&src, host, t0 + day * DAY);
            assert_eq!(json_of(&o)["exit_code"], 0);
        }
    }
    let now = rfc3339(t0 + 20 * DAY);
    let all: BTreeSet<(String, String)> = ["alpha", "beta"]
        .iter()
        .flat_map(|h| snapshots(&store, h).into_iter().map(|n| (h.to_string(), n)))
        .collect();
    assert_eq!(all.len(), 6);
    let pairs = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["host"].as_str().unwrap().to_string(),
                    e["snapshot"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let prune = |args: &[&str]| {
        run_status(
            Command::new(bin("byteback-prune"))
                .env("TZ", "UTC")
                .arg("--store")
                .arg(&store)
                .args(["--now", &now, "--json"])
                .args(args),
        )
    };

    // --list --json: the same order as the plain list.
    let o = prune(&["--list"]);
    let j = json_of(&o);
    let listed = run(Command::new(bin("byteback-prune"))
        .env("TZ", "UTC")
        .arg("--store")
        .arg(&store)
        .args(["--now", &now, "--list"]));
    let lines: Vec<(String, String)> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (h, s) = l.split_once('/').unwrap();
            (h.to_string(), s.to_string())
        })
        .collect();
    assert_eq!(pairs(&j["kept"]), lines, "{j}");
    assert_eq!(j["mode"], "list");

    // --prune-force: deletes at least one; deleted are gone, kept are there.
    let o = prune(&["--prune-force"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j = json_of(&o);
    assert_eq!(j["exit_code"], 0, "{j}");
    assert_eq!(j["mode"], "prune-force", "{j}");
    let deleted = pairs(&j["deleted"]);
    let kept = pairs(&j["kept"]);
    assert!(!deleted.is_empty(), "{j}");
    let now_there: BTreeSet<(String, String)> = ["alpha", "beta"]
        .iter()
        .flat_map(|h| snapshots(&store, h).into_iter().map(|n| (h.to_string(), n)))
        .collect();
    assert_eq!(
        kept.iter().cloned().collect::<BTreeSet<_>>(),
        now_there,
        "{j}"
    );
    for d in &deleted {
        assert!(all.contains(d) && !now_there.contains(d), "{d:?}: {j}");
    }
    assert_eq!(deleted.len() + kept.len(), all.len(), "{j}");
    assert!(j["before"]["free_bytes"].as_u64().unwrap() > 0, "{j}");
    assert!(j["after"]["size_bytes"].as_u64().unwrap() > 0, "{j}");

    // status --json: per-host state by --warn/--crit, exit code.
    let status = |args: &[&str]| {
        run_status(
            Command::new(bin("byteback-server"))
                .args(["status", "--json", "--store"])
                .arg(&store)
                .args(["--now", &rfc3339(t0 + 3 * DAY + 3600)])
                .args(args),
        )
    };
    let o = status(&["--warn", "1d", "--crit", "2d"]);
    let j = json_of(&o);
    assert_eq!(o.status.code(), Some(2), "{j}");
    assert_eq!(j["exit_code"], 2, "{j}");
    assert_eq!(j["state"], "CRITICAL", "{j}");
    let hosts = j["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{j}");
    assert_eq!(hosts[0]["host"], "alpha");
    assert_eq!(hosts[0]["state"], "OK", "{j}");
    assert_eq!(hosts[0]["age_seconds"], 3600, "{j}");
    assert_eq!(hosts[1]["host"], "beta");
    assert_eq!(hosts[1]["state"], "CRITICAL", "{j}");
    assert_eq!(hosts[1]["age_seconds"], 2 * DAY + 3600, "{j}");
    let snaps: usize = hosts
        .iter()
        .map(|h| h["snapshots"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(snaps, kept.len(), "{j}");
    assert!(
        j["summary"]
            .as_str()
            .unwrap()
            .starts_with("BYTEBACK CRITICAL - beta"),
        "{j}"
    );
    // A store that cannot be read: UNKNOWN, still one object.
    let o = run_status(
        Command::new(bin("byteback-server"))
            .args(["status", "--json", "--store"])
            .arg(d.path().join("nowhere")),
    );
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(json_of(&o)["state"], "UNKNOWN");
}

//! kill -9 torture: for a fixed budget, back up a changing tree of big and
//! small files into a real btrfs store and kill the client or the server
//! (alternating) at random moments, commit and snapshot included. After
//! every kill each existing snapshot is unchanged (tree digest), no byteback
//! process is left and the client has exited within a bound; at the end a
//! backup succeeds and restores exactly.
//!
//! The budget is `BYTEBACK_TORTURE_SECS` (default 45 s, for CI); set it
//! higher for a soak: `BYTEBACK_TORTURE_SECS=600 cargo test --test integration
//! torture::`.

use crate::util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// Changes the tree a little: rewrites some small files, one big file in
/// part, adds and removes a few.
fn mutate(src: &Path, rng: &mut Rng, round: u64) {
    for _ in 0..20 {
        let i = rng.below(200);
        let p = src.join(format!("small/{:02}/f{i:03}", i % 10));
        let len = 100 + rng.below(20_000) as usize;
        fs::write(&p, rng.bytes(len)).unwrap();
    }
    let big = src.join(format!("big/{}.bin", rng.below(3)));
    let mut data = fs::read(&big).unwrap();
    let at = rng.below(data.len() as u64 - 70_000) as usize;
    data[at..at + 65_536].copy_from_slice(&rng.bytes(65_536));
    fs::write(&big, data).unwrap();
    fs::write(src.join(format!("new/r{round}")), rng.bytes(5000)).unwrap();
    if round >= 3 {
        let _ = fs::remove_file(src.join(format!("new/r{}", round - 3)));
    }
}

fn make_tree(src: &Path, rng: &mut Rng) {
    for d in 0..10 {
        fs::create_dir_all(src.join(format!("small/{d:02}"))).unwrap();
    }
    for i in 0..200u64 {
        let p = src.join(format!("small/{:02}/f{i:03}", i % 10));
        fs::write(p, rng.bytes(100 + (i as usize * 97) % 20_000)).unwrap();
    }
    fs::create_dir_all(src.join("big")).unwrap();
    for i in 0..3 {
        fs::write(src.join(format!("big/{i}.bin")), rng.bytes(6 << 20)).unwrap();
    }
    fs::create_dir_all(src.join("new")).unwrap();
}

fn backup_cmd(store: &Path, src: &Path) -> Command {
    let mut c = Command::new(bin("byteback-backup"));
    c.arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", "t", "--retry-number", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn wait_gone(marker: &str, within: Duration) -> Vec<(u32, String)> {
    let deadline = Instant::now() + within;
    loop {
        let left = processes_naming(marker);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_9_at_random_moments_never_changes_a_snapshot() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let budget = budget_from_env("BYTEBACK_TORTURE_SECS", 45);
    let fs_ = BtrfsLoop::new(1200);
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let d = scratch();
    let src = d.path().join("src");
    let mut rng = Rng::from_time();
    println!("seed: {}", rng.0);
    make_tree(&src, &mut rng);
    let marker = store.to_str().unwrap().to_string();

    // How long a backup after a round's changes takes, to spread the kills over it.
    assert!(backup_cmd(&store, &src).status().unwrap().success());
    mutate(&src, &mut rng, 0);
    let t = Instant::now();
    assert!(backup_cmd(&store, &src).status().unwrap().success());
    let full = t.elapsed().max(Duration::from_millis(50));
    let mut digests = SnapshotDigests::default();
    let started = Instant::now();
    let (mut rounds, mut client_kills, mut server_kills, mut completed) = (0u64, 0, 0, 0);
    while started.elapsed() < budget {
        rounds += 1;
        digests.check(&store, "t", rounds);
        mutate(&src, &mut rng, rounds);
        let mut child = backup_cmd(&store, &src).spawn().unwrap();
        let delay = Duration::from_millis(rng.below(full.as_millis() as u64 * 5 / 4 + 1));
        std::thread::sleep(delay);
        let kill_client = rounds % 2 == 1;
        if child.try_wait().unwrap().is_some() {
            completed += 1;
        } else if kill_client {
            let _ = child.kill();
            client_kills += 1;
        } else {
            let servers: Vec<u32> = processes_naming(&marker)
                .into_iter()
                .filter(|(_, c)| c.contains(" serve "))
                .map(|(p, _)| p)
                .collect();
            for p in &servers {
                send_signal(*p, Signal::KILL);
            }
            // A kill only when there was a server to kill.
            server_kills += u32::from(!servers.is_empty());
        }
        // The client always ends, promptly.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the client hung after a kill (round {rounds})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = wait_gone(&marker, Duration::from_secs(15));
        assert!(
            left.is_empty(),
            "processes left after round {rounds}: {left:?}"
        );
    }
    println!(
        "{rounds} rounds in {:?}: {client_kills} client kills, {server_kills} server kills, {completed} finished first; {} snapshots checked",
        started.elapsed(),
        digests.seen().len()
    );
    assert!(
        client_kills >= 1 && server_kills >= 1,
        "a kind of kill never landed"
    );
    // Every snapshot is still what it was when first seen.
    for (s, old) in digests.seen() {
        let now = tree_digest(&store.join("t").join(s));
        assert_eq!(digest_diff(old, &now), "", "snapshot {s} changed");
    }
    // And a last backup succeeds and restores exactly.
    run(backup_cmd(&store, &src).stderr(Stdio::piped()));
    let into: PathBuf = d.path().join("restore");
    fs::create_dir_all(&into).unwrap();
    let snap = snapshots(&store, "t").pop().unwrap();
    run(Command::new(bin("byteback-restore"))
        .current_dir(&into)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "t", "--restore", "--snapshot", &snap, "/"]));
    assert_same_tree(&src, &into.join(&snap).join(src.strip_prefix("/").unwrap()));
}

//! Resuming an interrupted big file: a new file, or a changed one (rewritten
//! at random), is interrupted once the server has stored about half of it —
//! the client killed, the server killed, or the SSH connection cut by killing
//! the per-connection sshd processes (never a byteback one), or the server
//! stopped so that the client gives up after `--io-timeout` — and the next
//! run sends only about the rest: its data on the wire (the client's summary
//! line: "on the wire" locally, "bytes sent over SSH" remotely) is below 65 %
//! of the file. The restored file equals the source (rsync --checksum).
//!
//! The file is 256 MiB; `BYTEBACK_RESUME_MIB` sets another size
//! (`BYTEBACK_RESUME_MIB=2048 cargo test --test integration resume::` for the
//! issue's 2 GiB). Also a cut-the-connection loop over SSH for a short
//! budget (`BYTEBACK_SSH_TORTURE_SECS`, default 30): after every cut each
//! snapshot's digest is unchanged, the client has exited within a bound and
//! no server process is left; at the end a backup restores exactly.

use crate::util;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::sshd::Sshd;
use util::*;

fn mib() -> u64 {
    match std::env::var("BYTEBACK_RESUME_MIB") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("BYTEBACK_RESUME_MIB={v:?} is not a number")),
        Err(_) => 256,
    }
}

/// Writes `mib` MiB of random bytes to `p`, streaming (never all in memory).
fn write_random(p: &Path, mib: u64, rng: &mut Rng) {
    let mut f = fs::File::create(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// kill -9 of the client.
    Client,
    /// kill -9 of the server.
    Server,
    /// The SSH connection dropped: the per-connection sshd processes killed.
    Connection,
    /// The server stopped (SIGSTOP): silent, the client gives up after
    /// `--io-timeout`.
    Stop,
    /// The network went silent: the per-connection sshd processes stopped
    /// (SIGSTOP), so nothing closes either end. The client gives up after
    /// `--io-timeout`, the server after the store's `io_timeout`, each on
    /// its own.
    Silent,
}

impl Drop for World {
    /// A failed assertion must not leave stopped sshd processes behind.
    fn drop(&mut self) {
        self.kill_silenced();
    }
}

/// The store, the source and, over SSH, the sshd and the client's config dir.
struct World {
    store: PathBuf,
    src: PathBuf,
    host: String,
    ssh: Option<(Sshd, PathBuf)>,
    /// sshd processes stopped by `Cut::Silent`, killed when done with.
    silenced: std::cell::RefCell<Vec<u32>>,
    work: tempfile::TempDir,
    _fs: BtrfsLoop,
}

impl World {
    fn new(over_ssh: bool, fs_mib: u64) -> World {
        let work = scratch();
        let fs_ = BtrfsLoop::new(fs_mib);
        let store = fs_.mount.join("store");
        store_without_interval(&store);
        let src = work.path().join("src");
        fs::create_dir_all(&src).unwrap();
        let host = "resume".to_string();
        let ssh = over_ssh.then(|| {
            let sshd = Sshd::start(&work.path().join("sshd"), &store);
            let client = work.path().join("client");
            fs::create_dir_all(&client).unwrap();
            let out = run_status(
                Command::new(bin("byteback-setup-client"))
                    .env("BYTEBACK_CONFIG_DIR", &client)
                    .env("HOME", &client)
                    .arg("--destination")
                    .arg(sshd.destination())
                    .args(["--hostname", &host])
                    .arg("--admin-key")
                    .arg(&sshd.admin_key)
                    .arg("--accept-new-host-key")
                    .arg("--server-command")
                    .arg(bin("byteback-server"))
                    .stdin(Stdio::null()),
            );
            assert!(out.status.success(), "setup: {}", stderr(&out));
            (sshd, client)
        });
        World {
            store,
            src,
            host,
            ssh,
            silenced: Default::default(),
            work,
            _fs: fs_,
        }
    }

    /// Kills the sshd processes `Cut::Silent` stopped (a stopped process
    /// takes SIGKILL).
    fn kill_silenced(&self) {
        for p in self.silenced.borrow_mut().drain(..) {
            send_signal(p, Signal::KILL);
        }
    }

    fn client(&self, prog: &str) -> Command {
        let mut c = Command::new(bin(prog));
        match &self.ssh {
            Some((_, client)) => {
                c.env("BYTEBACK_CONFIG_DIR", client).env("HOME", client);
            }
            None => {
                c.arg("--destination")
                    .arg(&self.store)
                    .args(["--hostname", &self.host]);
            }
        }
        c.stdin(Stdio::null());
        c
    }

    fn backup_cmd(&self) -> Command {
        let mut c = self.client("byteback-backup");
        c.arg("--source")
            .arg(&self.src)
            .args(["--retry-number", "0"]);
        c
    }

    /// A backup that must succeed; its stderr.
    fn backup(&self) -> String {
        let out = run_status(&mut self.backup_cmd());
        assert!(out.status.success(), "backup failed: {}", stderr(&out));
        stderr(&out)
    }

    fn current(&self) -> PathBuf {
        self.store.join(&self.host).join("current")
    }

    fn snapshots(&self) -> Vec<String> {
        snapshots(&self.store, &self.host)
    }

    /// Restores the newest snapshot and checks it equals the source.
    fn assert_restores_exactly(&self, tag: &str) {
        let into = self.work.path().join(format!("restore-{tag}"));
        fs::create_dir_all(&into).unwrap();
        let snap = self.snapshots().pop().expect("no snapshot");
        let out = run_status(self.client("byteback-restore").current_dir(&into).args([
            "--restore",
            "--snapshot",
            &snap,
            "/",
        ]));
        assert!(out.status.success(), "restore: {}", stderr(&out));
        assert_same_tree(
            &self.src,
            &into.join(&snap).join(self.src.strip_prefix("/").unwrap()),
        );
    }

    /// The byteback-server processes of this world's store.
    fn servers(&self) -> Vec<u32> {
        match &self.ssh {
            Some((sshd, _)) => sshd.pids("byteback-server serve"),
            None => processes_naming(self.store.to_str().unwrap())
                .into_iter()
                .filter(|(_, c)| c.contains(" serve "))
                .map(|(p, _)| p)
                .collect(),
        }
    }

    /// Drops the SSH connection: kills the sshd processes between the
    /// listener and the byteback server (the per-connection monitor and its
    /// unprivileged child), never a byteback process.
    fn cut_connection(&self) -> bool {
        !self.signal_connection(Signal::KILL).is_empty()
    }

    /// Sends `sig` to the sshd processes between the listener and the
    /// byteback server; returns them.
    fn signal_connection(&self, sig: Signal) -> Vec<u32> {
        let (sshd, _) = self.ssh.as_ref().expect("not over SSH");
        let listener = fs::read_to_string(sshd.dir.join("sshd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let mut victims = vec![];
        for server in self.servers() {
            let mut pid = server;
            while let Some(parent) = parent_of(pid) {
                if parent <= 1 || Some(parent) == listener {
                    break;
                }
                if comm(parent).starts_with("sshd") {
                    victims.push(parent);
                }
                pid = parent;
            }
        }
        victims.sort_unstable();
        victims.dedup();
        for &p in &victims {
            send_signal(p, sig);
        }
        victims
    }

    fn cut(&self, how: Cut, child: &mut Child) -> bool {
        match how {
            Cut::Client => child.kill().is_ok(),
            Cut::Server => {
                let servers = self.servers();
                for &p in &servers {
                    send_signal(p, Signal::KILL);
                }
                !servers.is_empty()
            }
            Cut::Connection => self.cut_connection(),
            Cut::Silent => {
                let stopped = self.signal_connection(Signal::STOP);
                self.silenced.borrow_mut().extend(&stopped);
                !stopped.is_empty()
            }
            Cut::Stop => {
                let servers = self.servers();
                for &p in &servers {
                    send_signal(p, Signal::STOP);
                }
                !servers.is_empty()
            }
        }
    }

    /// Waits for the client to exit (bounded) and for every server to go.
    fn wait_all_gone(&self, child: &mut Child, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the client hung after {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = self.servers();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server processes left after {what}: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Size of the largest file in `dir` (0 if none).
fn largest_in(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Backs up `big` (`size` bytes) and cuts the run (`how`) once the server
/// has stored at least half of it (at its own path when new, in
/// `.byteback/partial` when changed); then the next run must send less than
/// 65 % of it and the result must restore exactly.
fn interrupt_then_resume(w: &World, how: Cut, changed: bool, size: u64) {
    let in_current = w
        .current()
        .join(w.src.strip_prefix("/").unwrap())
        .join("big");
    let partial = w.current().join(".byteback/partial");
    let log = w.work.path().join("cut.log");
    let mut cmd = w.backup_cmd();
    if matches!(how, Cut::Stop | Cut::Silent) {
        cmd.args(["--io-timeout", "3"]);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    let stored = loop {
        let stored = if changed {
            largest_in(&partial)
        } else {
            fs::metadata(&in_current).map(|m| m.len()).unwrap_or(0)
        };
        if stored >= size / 2 {
            break stored;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before half of the file was stored ({stored} bytes)"
        );
        assert!(Instant::now() < deadline, "the server never stored half");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(w.cut(how, &mut child), "nothing to kill for {how:?}");
    // With the network silent, the server must end by its own timeout while
    // sshd is still stopped: nothing else can end it.
    w.wait_all_gone(&mut child, &format!("{how:?}"));
    // The network "comes back" only now, as a dead connection.
    w.kill_silenced();
    assert!(
        !child.wait().unwrap().success(),
        "the cut backup cannot have succeeded"
    );
    if matches!(how, Cut::Stop | Cut::Silent) {
        let said = fs::read_to_string(&log).unwrap();
        assert!(
            said.contains("no data moved for 3 s (--io-timeout)"),
            "the client does not name the cause: {said}"
        );
    }
    // What was received is kept, and is not in any snapshot.
    let kept = if changed {
        largest_in(&partial)
    } else {
        fs::metadata(&in_current).map(|m| m.len()).unwrap_or(0)
    };
    assert!(
        kept >= stored,
        "{how:?}: the server kept {kept} bytes of the {stored} it had stored"
    );
    for s in w.snapshots() {
        let p = w.store.join(&w.host).join(&s).join(".byteback/partial");
        assert!(!p.exists(), "a partial copy is in snapshot {s}");
    }

    let err = w.backup();
    let number = |marker: &str| {
        summary_number(&err, marker)
            .unwrap_or_else(|| panic!("no summary line with {marker:?} in:\n{err}"))
    };
    let sent = match &w.ssh {
        Some(_) => number(" bytes sent and "),
        None => number(" on the wire"),
    };
    let reused = number(" reused");
    println!(
        "{how:?} ({}): {stored} of {size} bytes stored when cut; the next run sent {sent} bytes, reused {reused}",
        if changed { "changed file" } else { "new file" }
    );
    assert!(
        sent * 100 < size * 65,
        "{how:?}: the resumed run sent {sent} bytes of a {size}-byte file (half was stored): {err}"
    );
    assert!(
        reused * 100 >= size * 35,
        "{how:?}: the resumed run reused only {reused} bytes: {err}"
    );
    assert!(
        !partial.exists() || largest_in(&partial) == 0,
        "partial copies left after a full backup"
    );
    w.assert_restores_exactly(&format!("{how:?}-{changed}"));
}

fn scenario(over_ssh: bool, how: Cut, changed: bool) {
    let size_mib = mib();
    let w = World::new(over_ssh, 3 * size_mib + 600);
    if how == Cut::Silent {
        // The server's own deadline (default 3 h), well within
        // wait_all_gone's 20 s once the client has given up after 3 s.
        fs::write(
            w.store.join("byteback.toml"),
            "min_snapshot_interval = 0\nio_timeout = 8\n",
        )
        .unwrap();
    }
    let mut rng = Rng::new(0x5eed ^ size_mib ^ (how as u64) << 8 ^ u64::from(changed));
    fs::write(w.src.join("small"), rng.bytes(10_000)).unwrap();
    if changed {
        // Stored whole first, then rewritten at random.
        write_random(&w.src.join("big"), size_mib, &mut rng);
        w.backup();
    }
    write_random(&w.src.join("big"), size_mib, &mut rng);
    interrupt_then_resume(&w, how, changed, size_mib << 20);
}

#[test]
fn new_file_resumes_after_the_client_is_killed() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    scenario(false, Cut::Client, false);
}

#[test]
fn new_file_resumes_after_the_server_is_killed() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    scenario(false, Cut::Server, false);
}

#[test]
fn changed_file_resumes_after_the_client_is_killed() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    scenario(false, Cut::Client, true);
}

#[test]
fn changed_file_resumes_after_the_server_is_killed() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    scenario(false, Cut::Server, true);
}

/// A silent local server (stopped) does not hang the client: it ends after
/// `--io-timeout` naming the cause, and the next run resumes.
#[test]
fn a_stopped_local_server_times_out_and_the_next_run_resumes() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    scenario(false, Cut::Stop, false);
}

#[test]
fn new_file_resumes_after_the_ssh_connection_drops() {
    if !require_root("an sshd, a server account and btrfs") {
        return;
    }
    scenario(true, Cut::Connection, false);
}

/// The network goes silent mid-file (sshd stopped, nothing closed): the
/// client gives up after `--io-timeout`, the server after the store's
/// `io_timeout` (so it releases the host's lock with no one acting), and
/// the next run resumes.
#[test]
fn a_silent_network_ends_both_sides_and_the_next_run_resumes() {
    if !require_root("an sshd, a server account and btrfs") {
        return;
    }
    scenario(true, Cut::Silent, false);
}

#[test]
fn changed_file_resumes_after_the_ssh_connection_drops() {
    if !require_root("an sshd, a server account and btrfs") {
        return;
    }
    scenario(true, Cut::Connection, true);
}

/// Changes the tree a little: some small files rewritten, one big file in
/// part, one new file per round.
fn mutate(src: &Path, rng: &mut Rng, round: u64) {
    for _ in 0..10 {
        let i = rng.below(100);
        let len = 100 + rng.below(20_000) as usize;
        fs::write(src.join(format!("small/f{i:03}")), rng.bytes(len)).unwrap();
    }
    let big = src.join(format!("big/{}.bin", rng.below(2)));
    let mut data = fs::read(&big).unwrap();
    let at = rng.below(data.len() as u64 - 70_000) as usize;
    data[at..at + 65_536].copy_from_slice(&rng.bytes(65_536));
    fs::write(&big, data).unwrap();
    fs::write(src.join(format!("new/r{round}")), rng.bytes(3 << 20)).unwrap();
    if round >= 2 {
        let _ = fs::remove_file(src.join(format!("new/r{}", round - 2)));
    }
}

#[test]
fn cutting_the_ssh_connection_at_random_moments_never_changes_a_snapshot() {
    if !require_root("an sshd, a server account and btrfs") {
        return;
    }
    let budget = budget_from_env("BYTEBACK_SSH_TORTURE_SECS", 30);
    let w = World::new(true, 1200);
    let mut rng = Rng::from_time();
    println!("seed: {}", rng.0);
    fs::create_dir_all(w.src.join("small")).unwrap();
    fs::create_dir_all(w.src.join("big")).unwrap();
    fs::create_dir_all(w.src.join("new")).unwrap();
    for i in 0..100u64 {
        fs::write(
            w.src.join(format!("small/f{i:03}")),
            rng.bytes(100 + (i as usize * 197) % 20_000),
        )
        .unwrap();
    }
    for i in 0..2 {
        write_random(&w.src.join(format!("big/{i}.bin")), 8, &mut rng);
    }
    w.backup();
    mutate(&w.src, &mut rng, 0);
    let t = Instant::now();
    w.backup();
    let mut full = t.elapsed().max(Duration::from_millis(50));

    let mut digests = SnapshotDigests::default();
    let started = Instant::now();
    let (mut rounds, mut cuts, mut completed) = (0u64, 0u64, 0u64);
    // Past the budget only while fewer than two cuts landed (a slow first
    // measurement of `full` made most runs finish before their cut).
    while started.elapsed() < budget || (cuts < 2 && started.elapsed() < budget * 4) {
        rounds += 1;
        digests.check(&w.store, &w.host, rounds);
        mutate(&w.src, &mut rng, rounds);
        let spawned = Instant::now();
        let mut child = w
            .backup_cmd()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if rounds % 4 == 0 {
            // Left to finish now and then: it resumes what the cuts left,
            // and makes a snapshot for the later rounds to check.
            w.wait_all_gone(&mut child, &format!("an uncut run (round {rounds})"));
            assert!(child.wait().unwrap().success(), "round {rounds} failed");
            completed += 1;
            // What a whole run takes now: the cuts aim within it.
            full = spawned.elapsed().max(Duration::from_millis(50));
            continue;
        }
        std::thread::sleep(Duration::from_millis(
            rng.below(full.as_millis() as u64 * 5 / 4 + 1),
        ));
        if child.try_wait().unwrap().is_some() {
            completed += 1;
        } else if w.cut_connection() {
            cuts += 1;
        }
        w.wait_all_gone(&mut child, &format!("a cut (round {rounds})"));
    }
    println!(
        "{rounds} rounds in {:?}: {cuts} connections cut, {completed} finished; {} snapshots checked",
        started.elapsed(),
        digests.seen().len()
    );
    assert!(cuts >= 2, "no cut landed");
    for (s, old) in digests.seen() {
        let now = tree_digest(&w.store.join(&w.host).join(s));
        assert_eq!(digest_diff(old, &now), "", "snapshot {s} changed");
    }
    w.backup();
    w.assert_restores_exactly("torture");
}

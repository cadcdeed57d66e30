//! Backups over SSH: a real sshd on 127.0.0.1 with its own config and host
//! key, an unprivileged server account created per test, byteback-setup-client
//! run against it, then backups and restores through the key's forced command.

use crate::util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use util::sshd::Sshd;
use util::*;

/// A server (sshd + account whose home is the store) and a client config dir.
struct World {
    sshd: Sshd,
    /// The store (the account's home), on btrfs.
    store: PathBuf,
    _fs: BtrfsLoop,
    work: tempfile::TempDir,
}

impl World {
    fn new(fs_mib: u64) -> World {
        let work = scratch();
        let fs = BtrfsLoop::new(fs_mib);
        let store = fs.mount.join("store");
        store_without_interval(&store);
        let sshd = Sshd::start(&work.path().join("sshd"), &store);
        World {
            sshd,
            store,
            _fs: fs,
            work,
        }
    }

    /// A world of `fs_mib` MiB with one client `client-NAME` set up and a
    /// source holding one file `f` with `data`: the start of most tests.
    fn with_one_client(fs_mib: u64, name: &str, data: &[u8]) -> (World, PathBuf, PathBuf) {
        let w = World::new(fs_mib);
        let client = w.enrolled(name);
        let src = w.one_file_src(data);
        (w, client, src)
    }

    /// A client's config dir (stands in for /etc/byteback).
    /// A client whose settings are in `client-NAME/`, set up (successfully)
    /// as host `client-NAME`.
    fn enrolled(&self, name: &str) -> PathBuf {
        let client = self.client_dir(name);
        let out = self.setup(&client, &format!("client-{name}"));
        assert!(out.status.success(), "setup: {}", stderr(&out));
        client
    }

    /// `src/`, holding one file `f` with `data`.
    fn one_file_src(&self, data: &[u8]) -> PathBuf {
        let src = self.work.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("f"), data).unwrap();
        src
    }

    fn client_dir(&self, name: &str) -> PathBuf {
        let d = self.work.path().join(format!("client-{name}"));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn setup(&self, client: &Path, hostname: &str) -> Output {
        self.setup_with(client, hostname, &[])
    }

    /// [`Self::setup`] with `extra` flags.
    fn setup_with(&self, client: &Path, hostname: &str, extra: &[&str]) -> Output {
        run_status(
            Command::new(bin("byteback-setup-client"))
                .args(extra)
                .env("BYTEBACK_CONFIG_DIR", client)
                .env("HOME", client)
                .arg("--destination")
                .arg(self.sshd.destination())
                .args(["--hostname", hostname])
                .arg("--admin-key")
                .arg(&self.sshd.admin_key)
                .arg("--host-key")
                .arg(self.sshd.host_key_fingerprint())
                .arg("--server-command")
                .arg(bin("byteback-server"))
                .stdin(Stdio::null()),
        )
    }

    /// byteback-setup-client logging in with the account's password.
    fn setup_with_password(&self, client: &Path, hostname: &str, password: &str) -> Output {
        run_status(
            Command::new(bin("byteback-setup-client"))
                .env("BYTEBACK_CONFIG_DIR", client)
                .env("HOME", client)
                .env("BYTEBACK_PASSWORD", password)
                .arg("--destination")
                .arg(self.sshd.destination())
                .args(["--hostname", hostname])
                .arg("--host-key")
                .arg(self.sshd.host_key_fingerprint())
                .arg("--server-command")
                .arg(bin("byteback-server"))
                .stdin(Stdio::null()),
        )
    }

    /// byteback-restore with `args`, run in `into`.
    fn restore(&self, client: &Path, into: &Path, args: &[&str]) -> Output {
        fs::create_dir_all(into).unwrap();
        run_status(
            self.client(client, "byteback-restore")
                .current_dir(into)
                .args(args),
        )
    }

    fn client(&self, client: &Path, prog: &str) -> Command {
        let mut c = Command::new(bin(prog));
        c.env("BYTEBACK_CONFIG_DIR", client)
            .env("HOME", client)
            .env("BYTEBACK_CACHE_DIR", client.join("cache"))
            .stdin(Stdio::null());
        c
    }

    fn backup(&self, client: &Path, src: &Path) -> Output {
        run_status(
            self.client(client, "byteback-backup")
                .arg("--source")
                .arg(src)
                .args(["--retry-number", "0"]),
        )
    }

    fn snapshots(&self, host: &str) -> Vec<String> {
        snapshots(&self.store, host)
    }

    /// Restores `/` over SSH into a fresh dir; returns `<dir>/<snapshot>`.
    /// The restore's last line names the bytes it moved over SSH, and
    /// `--json` has them too.
    fn restore_all(&self, client: &Path, host: &str, into: &Path) -> PathBuf {
        fs::create_dir_all(into).unwrap();
        let out = run(self
            .client(client, "byteback-restore")
            .current_dir(into)
            .args(["--restore", "--json", "/"]));
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.contains("received over SSH"))
            .unwrap_or_else(|| panic!("no SSH byte counts in: {err}"));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (sent, received) = (&j["ssh_bytes_sent"], &j["ssh_bytes_received"]);
        assert!(sent.as_u64().unwrap() > 0, "{j}");
        assert!(received.as_u64().unwrap() > sent.as_u64().unwrap(), "{j}");
        assert!(
            line.contains(&format!(
                "; {sent} bytes sent and {received} received over SSH"
            )),
            "{line} / {j}"
        );
        into.join(self.snapshots(host).pop().unwrap())
    }
}

fn under(root: &Path, src: &Path) -> PathBuf {
    root.join(src.strip_prefix("/").unwrap())
}

#[test]
fn setup_client_then_backup_and_restore_over_ssh() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(400);
    let client = w.client_dir("a");
    let out = w.setup(&client, "client-a");
    assert!(out.status.success(), "setup failed: {}", stderr(&out));
    assert!(
        stderr(&out).contains("SHA256:"),
        "setup shows the host key fingerprint: {}",
        stderr(&out)
    );
    // What setup leaves behind.
    assert!(client.join("key").is_file() && client.join("key.pub").is_file());
    assert_eq!(
        fs::read_to_string(client.join("destination")).unwrap(),
        format!("{}\n", w.sshd.destination())
    );
    let known = fs::read_to_string(client.join("known_hosts")).unwrap();
    assert!(known.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", w.sshd.port)));
    let keys = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    let lines: Vec<&str> = keys.lines().collect();
    assert_eq!(lines.len(), 2, "admin key + one client line: {keys}");
    assert!(
        lines[1].starts_with(&format!(
            "restrict,from=\"127.0.0.1\",command=\"{} serve --host client-a\" ssh-ed25519 ",
            bin("byteback-server").display()
        )),
        "{}",
        lines[1]
    );
    assert!(is_btrfs_subvolume(&w.store.join("client-a/current")));
    // As a stock sshd wants it (StrictModes, as the test sshd runs): the
    // account's own, mode 0600, in its own .ssh of mode 0700.
    {
        use std::os::unix::fs::MetadataExt;
        let keys_file = w.sshd.authorized_keys();
        let ak = fs::metadata(&keys_file).unwrap();
        let dir = fs::metadata(keys_file.parent().unwrap()).unwrap();
        let home = fs::metadata(keys_file.parent().unwrap().parent().unwrap()).unwrap();
        assert_eq!((ak.mode() & 0o777, ak.uid()), (0o600, home.uid()));
        assert_eq!((dir.mode() & 0o777, dir.uid()), (0o700, home.uid()));
    }

    // Running it twice changes nothing.
    let out = w.setup(&client, "client-a");
    assert!(out.status.success(), "second setup: {}", stderr(&out));
    assert_eq!(fs::read_to_string(w.sshd.authorized_keys()).unwrap(), keys);
    assert_eq!(
        fs::read_to_string(client.join("known_hosts")).unwrap(),
        known
    );

    // Back up a rich tree and restore it over SSH; rsync sees no difference.
    let src = w.work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(11);
    make_rich_tree(&src, &mut rng);
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(w.snapshots("client-a").len(), 1);
    assert!(is_read_only(
        &w.store.join("client-a").join(&w.snapshots("client-a")[0])
    ));
    let root = w.restore_all(&client, "client-a", &w.work.path().join("restore"));
    assert_same_tree(&src, &under(&root, &src));

    // Change things and go again: a second snapshot, again identical.
    fs::write(src.join("new-after-first"), rng.bytes(200_000)).unwrap();
    let text = b"over ssh the data is compressed ".repeat(1 << 16);
    fs::write(src.join("text-after-first"), &text).unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "second backup: {}", stderr(&out));
    // Over SSH data is compressed by default (`--compress auto`): 2 MiB of
    // text costs a few KiB, the random 200 kB their size.
    let wire = summary_number(&stderr(&out), " on the wire").expect("wire bytes");
    assert!(wire < 300_000, "{wire} bytes on the wire: {}", stderr(&out));
    // What did not change went as runs of unchanged entries, checked by
    // the server against its manifest.
    let entries = summary_number(&stderr(&out), " entries,").expect("entries");
    let unchanged = summary_number(&stderr(&out), " entries unchanged").unwrap_or(0);
    assert!(
        unchanged > entries / 2 && unchanged < entries,
        "{}",
        stderr(&out)
    );
    assert_eq!(w.snapshots("client-a").len(), 2);
    let root = w.restore_all(&client, "client-a", &w.work.path().join("restore2"));
    assert_same_tree(&src, &under(&root, &src));
}

#[test]
fn setup_refuses_bad_names_and_keys() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(200);
    let before = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    for bad in ["../x", "a\",command=\"sh", "a b", ""] {
        let client = w.client_dir("bad");
        let out = w.setup(&client, bad);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert_eq!(
            fs::read_to_string(w.sshd.authorized_keys()).unwrap(),
            before,
            "{bad:?} changed authorized_keys"
        );
    }
    // The server-side enrolment refuses a key with a newline or options in it,
    // even from an admin login.
    let server = bin("byteback-server");
    let server = server.to_str().unwrap();
    let real = fs::read_to_string(w.sshd.admin_key.with_extension("pub")).unwrap();
    let blob = real.split_whitespace().nth(1).unwrap();
    for key in [
        format!("ssh-ed25519 {blob}\nssh-ed25519 {blob}"),
        format!("ssh-ed25519 {blob}\" command=\"sh"),
        "ssh-ed25519 AAAA".to_string(),
        format!("ssh-dss {blob}"),
    ] {
        let quoted = key.replace('\'', "'\\''");
        let out = w.sshd.openssh(
            &w.sshd.admin_key,
            &[],
            &[&format!("{server} enrol --host evil --key '{quoted}'")],
        );
        assert!(!out.status.success(), "key {key:?} was accepted");
        assert_eq!(
            fs::read_to_string(w.sshd.authorized_keys()).unwrap(),
            before
        );
    }
    assert!(!w.store.join("evil").exists());
    assert!(!w.store.join("x").exists());

    // A server that trickles its answer to the enrolment, a byte a second
    // (each resets the idle timeout), is given up on as a whole (the limit
    // shortened for the test), and nothing points backups at it.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let trickle = dir.path().join("trickle");
    fs::write(&trickle, "#!/bin/sh\nwhile :; do printf x; sleep 1; done\n").unwrap();
    fs::set_permissions(&trickle, fs::Permissions::from_mode(0o755)).unwrap();
    let client = w.client_dir("slow");
    let (out, took) = run_bounded(
        Command::new(bin("byteback-setup-client"))
            .env("BYTEBACK_CONFIG_DIR", &client)
            .env("HOME", &client)
            .env("BYTEBACK_TEST_ENROL_LIMIT_SECS", "4")
            .arg("--destination")
            .arg(w.sshd.destination())
            .args(["--hostname", "slow"])
            .arg("--admin-key")
            .arg(&w.sshd.admin_key)
            .arg("--host-key")
            .arg(w.sshd.host_key_fingerprint())
            .arg("--server-command")
            .arg(&trickle)
            .stdin(Stdio::null()),
        Duration::from_secs(60),
        trickle.to_str().unwrap(),
    );
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did not finish enrolling within 4 s"),
        "{}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(!client.join("destination").exists());
}

#[test]
fn client_key_is_confined_to_its_own_host() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(300);
    let a = w.client_dir("a");
    let b = w.client_dir("b");
    for (dir, name) in [(&a, "host-a"), (&b, "host-b")] {
        let out = w.setup(dir, name);
        assert!(out.status.success(), "setup {name}: {}", stderr(&out));
    }
    let src_a = w.work.path().join("src-a");
    let src_b = w.work.path().join("src-b");
    fs::create_dir_all(&src_a).unwrap();
    fs::create_dir_all(&src_b).unwrap();
    fs::write(src_a.join("only-on-a"), b"a").unwrap();
    fs::write(src_b.join("secret-of-b"), b"b").unwrap();
    assert!(w.backup(&a, &src_a).status.success());
    assert!(w.backup(&b, &src_b).status.success());

    let outside = w.work.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let sentinel = Sentinel::plant(&outside);
    let key_a = a.join("key");
    let touch = outside.join("pwned");
    let touch_s = touch.to_str().unwrap();

    // A shell command, with the client's key, is refused and never runs.
    for cmd in [
        format!("touch {touch_s}"),
        format!("sh -c 'touch {touch_s}'"),
        format!("backup; touch {touch_s}"),
        "serve --host host-b".to_string(),
        format!("{} serve --host host-b", bin("byteback-server").display()),
        "list --host host-b".to_string(),
    ] {
        let out = w.sshd.openssh(&key_a, &[], &[&cmd]);
        assert!(!out.status.success(), "{cmd:?} succeeded");
        assert!(
            stderr(&out).contains("refused"),
            "{cmd:?}: {}",
            stderr(&out)
        );
    }
    assert!(!touch.exists());
    // An sftp subsystem request is refused: the forced command runs instead
    // and exits 2 (sshd drops a subsystem's stderr, so there is no message).
    let out = w.sshd.openssh(&key_a, &["-s"], &["sftp"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Port forwarding is refused (restrict).
    let out = w
        .sshd
        .openssh(&key_a, &["-W", &format!("127.0.0.1:{}", w.sshd.port)], &[]);
    assert!(!out.status.success(), "stdio forwarding worked");
    let out = run_status(
        Command::new("timeout")
            .args(["10", "ssh", "-p", &w.sshd.port.to_string(), "-i"])
            .arg(&key_a)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ExitOnForwardFailure=yes",
                "-N",
                "-R",
                "0:127.0.0.1:22",
            ])
            .arg(format!("{}@127.0.0.1", w.sshd.user))
            .stdin(Stdio::null()),
    );
    assert!(!out.status.success(), "remote forwarding was set up");

    // Restore patterns with `..` are normalised as 1.x's File.expand_path
    // did (above the root is the root): they name backed-up paths, never
    // a place to write, and nothing is written for what matches nothing.
    let into = w.work.path().join("restore-dotdot");
    fs::create_dir_all(&into).unwrap();
    for pat in ["../../outside", "/../../etc", "x/../../y"] {
        let out = run_status(
            w.client(&a, "byteback-restore")
                .current_dir(&into)
                .args(["--restore", pat]),
        );
        assert!(!out.status.success(), "{pat:?} matched");
        assert!(stderr(&out).contains("matches"), "{}", stderr(&out));
    }
    assert_eq!(fs::read_dir(&into).unwrap().count(), 0);

    // Host A's key sees host A's files only, whatever --hostname says.
    let list = run(w
        .client(&a, "byteback-restore")
        .args(["--list", "--hostname", "host-b", "/"]));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("only-on-a"), "{text}");
    assert!(!text.contains("secret-of-b"), "{text}");
    let into = w.work.path().join("restore-a");
    fs::create_dir_all(&into).unwrap();
    run(w.client(&a, "byteback-restore").current_dir(&into).args([
        "--restore",
        "--hostname",
        "host-b",
        "/",
    ]));
    let mut found = vec![];
    for e in walkdir_all(&into) {
        found.push(e);
    }
    assert!(found.iter().any(|p| p.ends_with("only-on-a")));
    assert!(!found.iter().any(|p| p.ends_with("secret-of-b")));
    sentinel.assert_untouched();

    // A key other users may read is refused, as ssh refuses it (whoever
    // reads it can restore this host's backups): a usage error, exit 2.
    use std::os::unix::fs::PermissionsExt;
    for mode in [0o644, 0o640, 0o604] {
        fs::set_permissions(&key_a, fs::Permissions::from_mode(mode)).unwrap();
        let out = w.backup(&a, &src_a);
        assert_eq!(out.status.code(), Some(2), "{mode:o}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("other users may read or change it"),
            "{}",
            stderr(&out)
        );
    }
    fs::set_permissions(&key_a, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(w.backup(&a, &src_a).status.success());
}

fn walkdir_all(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// A key enrolled `--read-only` for a host (a second machine, to restore
/// that host's files there) lists and restores its backups, needs no
/// `--add-key`, and cannot back up: the host's tree is unchanged.
#[test]
fn a_read_only_key_restores_and_never_backs_up() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(300);
    let a = w.client_dir("a");
    let out = w.setup(&a, "host-a");
    assert!(out.status.success(), "{}", stderr(&out));
    let src = w.one_file_src(b"only on a");
    assert!(w.backup(&a, &src).status.success());
    // A machine that backs up elsewhere: its key and destination stay.
    let r = w.client_dir("r");
    fs::write(r.join("destination"), "/srv/elsewhere\n").unwrap();
    let out = w.setup_with(&r, "host-a", &["--read-only"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("never back up there"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fs::read_to_string(r.join("destination")).unwrap(),
        "/srv/elsewhere\n"
    );
    assert!(!r.join("key").exists());
    let key = r.join("restore-key-host-a").to_str().unwrap().to_string();
    let dest = w.sshd.destination();
    let keys = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    assert_eq!(
        keys.matches("serve --host host-a --read-only").count(),
        1,
        "{keys}"
    );
    let snaps = w.snapshots("host-a");
    let into = w.work.path().join("restore-r");
    let o = w.restore(
        &r,
        &into,
        &["--destination", &dest, "-k", &key, "--restore", "/"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let found: Vec<PathBuf> = walkdir_all(&into);
    assert!(
        found
            .iter()
            .any(|p| fs::read(p).is_ok_and(|b| b == b"only on a")),
        "{found:?}"
    );
    let other = w.work.path().join("src-r");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("from-r"), b"r").unwrap();
    let o = run_status(
        w.client(&r, "byteback-backup")
            .args(["--destination", &dest, "-k", &key, "--retry-number", "3"])
            .arg("--source")
            .arg(&other),
    );
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("retrying"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("may only list and restore"),
        "{}",
        stderr(&o)
    );
    assert_eq!(w.snapshots("host-a"), snaps);
    assert!(!walkdir_all(&w.store.join("host-a"))
        .iter()
        .any(|p| p.ends_with("from-r")));
}

#[test]
fn changed_host_key_is_refused() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let (mut w, client, src) = World::with_one_client(200, "a", b"data");
    assert!(w.backup(&client, &src).status.success());
    let known = fs::read_to_string(client.join("known_hosts")).unwrap();

    w.sshd.restart_with_new_host_key();
    fs::write(src.join("g"), b"more").unwrap();
    let out = w.backup(&client, &src);
    assert!(!out.status.success(), "connected despite a new host key");
    assert!(
        stderr(&out).contains("HOST KEY CHANGED"),
        "{}",
        stderr(&out)
    );
    assert_eq!(w.snapshots("client-a").len(), 1, "nothing new was stored");
    // Setup does not paper over it either.
    let out = w.setup(&client, "client-a");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HOST KEY CHANGED"));
    assert_eq!(
        fs::read_to_string(client.join("known_hosts")).unwrap(),
        known
    );

    // An unknown host (no known_hosts at all) is refused too.
    fs::remove_file(client.join("known_hosts")).unwrap();
    let out = w.backup(&client, &src);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not in"), "{}", stderr(&out));
}

/// What sshd logged since `mark` (a length of the log), after a moment for
/// its session processes to finish writing.
fn log_since(sshd: &Sshd, mark: usize) -> String {
    std::thread::sleep(Duration::from_millis(300));
    sshd.log()[mark..].to_string()
}

/// Root backing up with a key another user owns (mode 0600) is told: that
/// user may put a key of theirs in its place, and so choose where the
/// machine's backups go. The backup itself goes through.
#[test]
fn root_is_warned_of_a_key_another_user_owns() {
    if !require_root("an sshd, and root's view of a key's owner") {
        return;
    }
    let (w, client, src) = World::with_one_client(200, "owned", b"data");
    let key = client.join("key");
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("who may replace it"),
        "{}",
        stderr(&out)
    );
    std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
    fs::write(src.join("f"), b"again").unwrap();
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{} belongs to uid 65534, who may replace it",
            key.display()
        )),
        "{err}"
    );
    assert_eq!(w.snapshots("client-owned").len(), 2);
}

/// A client that recorded the server's ECDSA key (OpenSSH before 8.5
/// preferred ECDSA, so a 1.x client's known_hosts may hold only that) backs
/// up to a server offering Ed25519 beside it: the recorded type is asked
/// for first, as OpenSSH does, not refused as a changed key.
#[test]
fn a_recorded_host_key_of_the_second_type_the_server_offers_is_used() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let (mut w, client, src) = World::with_one_client(200, "ec", b"data");
    let ec_pub = w.sshd.restart_with_second_host_key("ecdsa", None);
    let ec = fs::read_to_string(ec_pub).unwrap();
    let ec: Vec<&str> = ec.split_whitespace().take(2).collect();
    assert_eq!(ec[0], "ecdsa-sha2-nistp256");
    let kh = client.join("known_hosts");
    fs::write(
        &kh,
        format!("[127.0.0.1]:{} {} {}\n", w.sshd.port, ec[0], ec[1]),
    )
    .unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.snapshots("client-ec").len(), 1);
}

/// A known server that now offers a key of another algorithm than the one
/// recorded (ssh-ed25519 recorded, ecdsa-sha2-nistp256 shown) has a changed
/// key, not an unknown one: backups, restores and set-up refuse it; set-up
/// neither sends the password nor learns the key. Hashed entries too.
#[test]
fn host_key_of_another_algorithm_is_a_changed_key() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let (mut w, client, src) = World::with_one_client(200, "a", b"data");
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(w.snapshots("client-a").len(), 1);
    let kh = client.join("known_hosts");
    let known = fs::read_to_string(&kh).unwrap();
    assert_eq!(known.lines().count(), 1, "{known}");
    assert!(
        known.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", w.sshd.port)),
        "{known}"
    );

    // The sshd log shows password logins: a wrong password appears there
    // (so the check below, that none was sent, can see one).
    let mark = w.sshd.log().len();
    let out = w.setup_with_password(&client, "client-a", "wrong password");
    assert!(!out.status.success(), "a wrong password was accepted");
    let log = log_since(&w.sshd, mark);
    assert!(log.contains("Failed password"), "sshd log: {log}");

    // A second host key (ECDSA) beside the first: while sshd offers both, the
    // client picks Ed25519, the recorded one, and all is well.
    let ec_pub = w.sshd.restart_with_second_host_key("ecdsa", None);
    fs::write(src.join("g"), b"more").unwrap();
    let out = w.backup(&client, &src);
    assert!(
        out.status.success(),
        "backup with both keys: {}",
        stderr(&out)
    );
    assert_eq!(w.snapshots("client-a").len(), 2);

    // Now sshd offers only the ECDSA key: a changed key, not an unknown one.
    w.sshd
        .restart_with_second_host_key("ecdsa", Some("ecdsa-sha2-nistp256"));
    fs::write(src.join("h"), b"even more").unwrap();
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "connected to a changed host key: {err}"
    );
    assert!(err.contains("HOST KEY CHANGED"), "{err}");
    assert!(err.contains("ecdsa-sha2-nistp256"), "{err}");
    assert!(
        err.contains(&format!("{}:1 (ssh-ed25519)", kh.display())),
        "names the recorded line: {err}"
    );
    assert_eq!(w.snapshots("client-a").len(), 2, "nothing new was stored");
    // A changed host key is not retried: retrying cannot fix it.
    let started = Instant::now();
    let out = run_status(
        w.client(&client, "byteback-backup")
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "3", "--retry-delay", "30"]),
    );
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("HOST KEY CHANGED"),
        "{err}"
    );
    assert!(
        !err.contains("retrying"),
        "a changed host key was retried: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(25), "{err}");

    // Restores refuse it too, before writing anything.
    let into = w.work.path().join("restore");
    for args in [&["--list", "/"][..], &["--restore", "/"]] {
        let out = w.restore(&client, &into, args);
        let err = stderr(&out);
        assert!(!out.status.success(), "restore {args:?} connected: {err}");
        assert!(err.contains("HOST KEY CHANGED"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed a listing");
    }
    assert_eq!(fs::read_dir(&into).unwrap().count(), 0);

    // Set-up, with the right password or the admin key: refused before any
    // login, nothing learnt, nothing enrolled.
    let keys = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    let mark = w.sshd.log().len();
    let out = w.setup_with_password(&client, "client-a", util::sshd::PASSWORD);
    let err = stderr(&out);
    assert!(!out.status.success(), "setup accepted the new key: {err}");
    assert!(err.contains("HOST KEY CHANGED"), "{err}");
    assert!(!err.contains("recorded in"), "{err}");
    let out = w.setup(&client, "client-a");
    let err = stderr(&out);
    assert!(!out.status.success(), "setup accepted the new key: {err}");
    assert!(err.contains("HOST KEY CHANGED"), "{err}");
    let log = log_since(&w.sshd, mark);
    assert!(!log.contains("password"), "a password was sent: {log}");
    assert!(!log.contains("Accepted"), "a login happened: {log}");
    assert_eq!(
        fs::read_to_string(&kh).unwrap(),
        known,
        "known_hosts changed"
    );
    assert_eq!(fs::read_to_string(w.sshd.authorized_keys()).unwrap(), keys);

    // Hashed entries (as `ssh-keygen -H` writes them) are matched too.
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&kh));
    let hashed = fs::read_to_string(&kh).unwrap();
    assert!(
        hashed.starts_with("|1|") && !hashed.contains("127.0.0.1"),
        "{hashed}"
    );
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert!(!out.status.success(), "hashed entry ignored: {err}");
    assert!(err.contains("HOST KEY CHANGED"), "{err}");
    assert!(err.contains(&format!("{}:1", kh.display())), "{err}");
    let out = w.setup(&client, "client-a");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("HOST KEY CHANGED"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_to_string(&kh).unwrap(), hashed);
    assert_eq!(w.snapshots("client-a").len(), 2);

    // Once the ECDSA key is recorded as well, the same server is accepted:
    // the refusals above came from the check, not from the server.
    let ec = fs::read_to_string(&ec_pub).unwrap();
    let ec: Vec<&str> = ec.split_whitespace().take(2).collect();
    fs::write(
        &kh,
        format!("{hashed}[127.0.0.1]:{} {} {}\n", w.sshd.port, ec[0], ec[1]),
    )
    .unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "recorded ECDSA key: {}", stderr(&out));
    assert_eq!(w.snapshots("client-a").len(), 3);
}

/// A host key listed as `@revoked` is refused, even though another line
/// (in another file) accepts it; a revocation for another host does not apply.
#[test]
fn revoked_host_key_is_refused() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let (w, client, src) = World::with_one_client(200, "a", b"data");
    let kh = client.join("known_hosts");
    let known = fs::read_to_string(&kh).unwrap();
    // HOME is the client dir: this is the user's ~/.ssh/known_hosts.
    let users = client.join(".ssh/known_hosts");
    fs::create_dir_all(users.parent().unwrap()).unwrap();
    let hk = w.sshd.host_key_pub();
    assert!(hk.starts_with("ssh-ed25519 "), "{hk}");

    // Revocations for other hosts do not apply.
    fs::write(
        &users,
        format!(
            "@revoked [127.0.0.1]:{} {hk}\n@revoked *.example.com {hk}\n@revoked *,![127.0.0.1]:{} {hk}\n",
            w.sshd.port + 1,
            w.sshd.port
        ),
    )
    .unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(w.snapshots("client-a").len(), 1);

    // Revoked for every host, in the user's file, while ours accepts it.
    fs::write(
        &users,
        format!("# never trust this key again\n@revoked * {hk} compromised\n"),
    )
    .unwrap();
    fs::write(src.join("g"), b"more").unwrap();
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert!(!out.status.success(), "connected with a revoked key: {err}");
    assert!(err.contains("REVOKED"), "{err}");
    assert!(err.contains(&format!("{}:2", users.display())), "{err}");
    assert_eq!(w.snapshots("client-a").len(), 1, "nothing new was stored");
    let into = w.work.path().join("restore");
    let out = w.restore(&client, &into, &["--list", "/"]);
    assert!(!out.status.success(), "restore connected: {}", stderr(&out));
    assert!(stderr(&out).contains("REVOKED"), "{}", stderr(&out));
    let keys = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    let out = w.setup(&client, "client-a");
    assert!(!out.status.success(), "setup connected: {}", stderr(&out));
    assert!(stderr(&out).contains("REVOKED"), "{}", stderr(&out));
    assert_eq!(fs::read_to_string(&kh).unwrap(), known);
    assert_eq!(fs::read_to_string(w.sshd.authorized_keys()).unwrap(), keys);

    // A user's file others may write (or another user's, under sudo -E)
    // is not read: its lines are not this user's word.
    fs::set_permissions(&users, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("is not this user's alone"), "{err}");
    assert_eq!(w.snapshots("client-a").len(), 2);

    // Revoked for this host only, in our own file after the accepting line.
    fs::remove_file(&users).unwrap();
    fs::write(
        &kh,
        format!("{known}@revoked [127.0.0.1]:{} {hk}\n", w.sshd.port),
    )
    .unwrap();
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert!(!out.status.success(), "connected with a revoked key: {err}");
    assert!(err.contains("REVOKED"), "{err}");
    assert!(err.contains(&format!("{}:2", kh.display())), "{err}");
    assert_eq!(w.snapshots("client-a").len(), 2);

    // Without the revocation it works again.
    fs::write(&kh, &known).unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(w.snapshots("client-a").len(), 3);
}

/// What a server prints reaches the client's terminal only escaped: its
/// stderr (relayed line by line as `server: ...`) and its stdout during set-up.
#[test]
fn server_output_is_escaped() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(200);
    let client = w.client_dir("a");
    // A "server program" that writes terminal escapes, run by set-up through
    // the admin login (the account must be able to run it).
    let evil = w.sshd.dir.join("evil-server");
    fs::write(
        &evil,
        "#!/bin/sh\n\
         printf 'evil\\033]0;pwned\\007 \\033[2J\\tend\\n' >&2\n\
         printf 'out\\033[31m\\n'\n\
         printf 'no newline\\033[1m' >&2\n\
         exit 3\n",
    )
    .unwrap();
    fs::set_permissions(&evil, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_status(
        Command::new(bin("byteback-setup-client"))
            .env("BYTEBACK_CONFIG_DIR", &client)
            .env("HOME", &client)
            .arg("--destination")
            .arg(w.sshd.destination())
            .args(["--hostname", "client-a"])
            .arg("--admin-key")
            .arg(&w.sshd.admin_key)
            .arg("--accept-new-host-key")
            .arg("--server-command")
            .arg(&evil)
            .stdin(Stdio::null()),
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("exit status 3"), "{err}");
    assert!(
        err.contains("server: evil\\x1b]0;pwned\\x07 \\x1b[2J\\x09end\n"),
        "{err}"
    );
    assert!(err.contains("server: out\\x1b[31m\n"), "{err}");
    assert!(err.contains("server: no newline\\x1b[1m\n"), "{err}");
    for b in [0x1bu8, 0x07, b'\t', b'\r'] {
        assert!(!out.stderr.contains(&b), "raw byte {b:#x} in {err:?}");
    }
}

/// A server that keeps the SSH session open after it committed the backup
/// (here its forced command sleeps after the real server) holds the client
/// only a bounded time (60 s; 3 s here through a debug-build knob), then
/// costs a warning: the backup succeeds, its snapshot there. Before, the
/// client waited for the session to end, up to `--io-timeout`.
#[test]
fn a_server_holding_the_session_after_its_commit_does_not_hold_the_client() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(200);
    let client = w.enrolled("p");
    let server = bin("byteback-server");
    let held = w.sshd.dir.join("held-server");
    fs::write(
        &held,
        format!("#!/bin/sh\n'{}' \"$@\"\nexec sleep 300\n", server.display()),
    )
    .unwrap();
    fs::set_permissions(&held, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let keys = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    let from = format!("command=\"{} serve", server.display());
    assert!(keys.contains(&from), "{keys}");
    let to = format!("command=\"{} serve", held.display());
    fs::write(w.sshd.authorized_keys(), keys.replace(&from, &to)).unwrap();
    let src = w.one_file_src(b"held");
    let (o, took) = run_bounded(
        w.client(&client, "byteback-backup")
            .env("BYTEBACK_TEST_POST_COMMIT_WAIT_SECS", "3")
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "0"]),
        Duration::from_secs(60),
        w.store.to_str().unwrap(),
    );
    for p in w.sshd.pids("sleep 300") {
        send_signal(p, Signal::KILL);
    }
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("after the backup: the server had not ended 3 s after the backup"),
        "{e}"
    );
    assert!(e.contains(" taken;"), "{e}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(w.snapshots("client-p").len(), 1);
}

/// A server that stops speaking the protocol but keeps writing to its
/// stderr (a byte a second) is still a stalled server: `--io-timeout`
/// counts only protocol data, so the backup fails after it, saying why.
#[test]
fn a_server_writing_only_to_stderr_is_timed_out() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(200);
    let client = w.enrolled("q");
    let server = bin("byteback-server");
    let chatty = w.sshd.dir.join("chatty-server");
    fs::write(
        &chatty,
        "#!/bin/sh\nwhile :; do printf . >&2; sleep 1; done\n",
    )
    .unwrap();
    fs::set_permissions(&chatty, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let keys = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    let from = format!("command=\"{} serve", server.display());
    assert!(keys.contains(&from), "{keys}");
    let to = format!("command=\"{} serve", chatty.display());
    fs::write(w.sshd.authorized_keys(), keys.replace(&from, &to)).unwrap();
    let src = w.one_file_src(b"chatty");
    let (o, took) = run_bounded(
        w.client(&client, "byteback-backup")
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "0", "--io-timeout", "3"]),
        Duration::from_secs(60),
        w.store.to_str().unwrap(),
    );
    for p in w.sshd.pids("chatty-server") {
        send_signal(p, Signal::KILL);
    }
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("no data moved for 3 s"), "{e}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// A server flooding its stderr while ours is stalled (nobody reads it, as
/// with a terminal paused by XOFF or journald behind): the client relays the
/// server's lines through a thread of its own and drops what does not fit,
/// so `--io-timeout` still ends the connection. Before, the relay blocked
/// in the write, and the watchdog with it, until stderr moved again.
#[test]
fn a_stalled_stderr_does_not_hold_the_io_timeout() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(200);
    let client = w.enrolled("s");
    let server = bin("byteback-server");
    let flood = w.sshd.dir.join("flood-server");
    fs::write(&flood, "#!/bin/sh\nyes 'a line of the flood' >&2\n").unwrap();
    fs::set_permissions(&flood, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let keys = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    let from = format!("command=\"{} serve", server.display());
    assert!(keys.contains(&from), "{keys}");
    let to = format!("command=\"{} serve", flood.display());
    fs::write(w.sshd.authorized_keys(), keys.replace(&from, &to)).unwrap();
    let src = w.one_file_src(b"flood");
    let start = Instant::now();
    let mut child = w
        .client(&client, "byteback-backup")
        .arg("--source")
        .arg(&src)
        .args(["--retry-number", "0", "--io-timeout", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr is not read: the flood started, then the connection ended.
    let (mut seen, mut ended) = (false, false);
    while start.elapsed() < Duration::from_secs(30) {
        let running = !w.sshd.pids("flood-server").is_empty();
        seen |= running;
        if seen && !running {
            ended = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = start.elapsed();
    // Now stderr moves again, and the client ends.
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut s).unwrap();
        s
    });
    let status = wait_until(&mut child, start, Duration::from_secs(60));
    for p in w.sshd.pids("flood-server") {
        send_signal(p, Signal::KILL);
    }
    let e = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let tail: String = e
        .chars()
        .rev()
        .take(2000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(seen, "the flood never started:\n{tail}");
    assert!(
        ended,
        "the connection was held while stderr stalled ({took:?}):\n{tail}"
    );
    let status = status.expect("the client did not end once stderr moved");
    assert!(!status.success(), "{tail}");
    assert!(e.contains("no data moved for 3 s"), "{tail}");
    assert!(e.contains("server: a line of the flood\n"), "{tail}");
    // (The count of lines dropped may not be written before the client
    // exits; ssh::tests::a_stalled_stderr_drops_lines_and_says_how_many.)
}

#[test]
fn killed_server_mid_backup_is_retried_and_the_result_is_complete() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(1200);
    let client = w.enrolled("a");
    let src = w.work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(99);
    for i in 0..12 {
        fs::write(src.join(format!("big-{i:02}")), rng.bytes(24 << 20)).unwrap();
    }
    fs::create_dir_all(src.join("rich")).unwrap();
    make_rich_tree(&src.join("rich"), &mut rng);

    let child = w
        .client(&client, "byteback-backup")
        .arg("--source")
        .arg(&src)
        .args(["--retry-number", "3", "--retry-delay", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the server is receiving file data, then kill it. A changed
    // file is rebuilt in .byteback/partial, a new one at its own path.
    let tmp = w.store.join("client-a/current/.byteback/partial");
    let first_new = w
        .store
        .join("client-a/current")
        .join(src.strip_prefix("/").unwrap())
        .join("big-00");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed = false;
    while Instant::now() < deadline {
        let busy = fs::read_dir(&tmp).map(|d| d.count() > 0).unwrap_or(false) || first_new.exists();
        if busy {
            let pids = w.sshd.pids("byteback-server serve");
            assert!(!pids.is_empty(), "no server process");
            for p in pids {
                run_status(Command::new("kill").args(["-9", &p.to_string()]));
            }
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(killed, "the server never started receiving");
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "backup did not recover: {err}");
    assert!(err.contains("attempt 1 failed"), "{err}");
    // Exactly one snapshot: the broken run committed nothing.
    let snaps = w.snapshots("client-a");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let root = w.restore_all(&client, "client-a", &w.work.path().join("restore"));
    assert_same_tree(&src, &under(&root, &src));
}

#[test]
fn setup_with_a_password() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(200);
    let client = w.client_dir("pw");
    // Without a controlling terminal (setsid), as a script runs it.
    let setup_with = |password: &str, trust: &[&str]| {
        run_status(
            Command::new("setsid")
                .arg("--wait")
                .arg(bin("byteback-setup-client"))
                .env("BYTEBACK_CONFIG_DIR", &client)
                .env("HOME", &client)
                .env("BYTEBACK_PASSWORD", password)
                .arg("--destination")
                .arg(w.sshd.destination())
                .args(["--hostname", "pw-host"])
                .args(trust)
                .arg("--server-command")
                .arg(bin("byteback-server"))
                .stdin(Stdio::null()),
        )
    };
    let before = fs::read_to_string(w.sshd.authorized_keys()).unwrap();
    // First contact: a host key nobody confirmed gets neither the password
    // nor anything else (a man in the middle would have had both, and
    // become this client's destination). Without --host-key and with no
    // terminal to ask on: refused, saying how to go on.
    let fp = w.sshd.host_key_fingerprint();
    let out = setup_with(util::sshd::PASSWORD, &[]);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("--host-key {fp}")),
        "{}",
        stderr(&out)
    );
    // Another key's fingerprint: refused as well.
    let out = setup_with(
        util::sshd::PASSWORD,
        &[
            "--host-key",
            "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ],
    );
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("not SHA256:AAAA"), "{}", stderr(&out));
    assert!(!client.join("known_hosts").exists());
    assert!(!client.join("destination").exists());
    assert_eq!(
        fs::read_to_string(w.sshd.authorized_keys()).unwrap(),
        before
    );
    let setup = |password: &str| setup_with(password, &["--host-key", &fp]);
    let out = setup("wrong password");
    assert!(!out.status.success(), "a wrong password was accepted");
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
    assert_eq!(
        fs::read_to_string(w.sshd.authorized_keys()).unwrap(),
        before
    );
    assert!(!w.store.join("pw-host").exists());

    let out = setup(util::sshd::PASSWORD);
    assert!(out.status.success(), "{}", stderr(&out));
    let src = w.one_file_src(b"over ssh");
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.snapshots("pw-host").len(), 1);
}

/// Over SSH too, a failed backup ends at once: a damaged manifest (the
/// server reports it while the client waits with nothing to send, sets it
/// aside, and the retry recovers one); then the server killed at its commit, while the client waits
/// for it. No server process is left either time.
#[test]
fn over_ssh_a_failing_or_killed_server_never_leaves_the_client_hanging() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let w = World::new(400);
    let client = w.enrolled("h");
    let src = w.work.path().join("src");
    make_wide_tree(&src);
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = w.store.join("client-h/current/.byteback/manifest");
    let original = fs::read(&manifest).unwrap();
    fs::remove_dir_all(src.join("a")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&manifest)
        .unwrap()
        .set_len(original.len() as u64 / 2)
        .unwrap();
    let limit = Duration::from_secs(60);
    let (o, took) = run_bounded(
        w.client(&client, "byteback-backup")
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "1", "--retry-delay", "1"]),
        limit,
        w.store.to_str().unwrap(),
    );
    let e = stderr(&o);
    eprintln!("over SSH, took {took:?}:\n{e}");
    // The first attempt fails at once naming the damaged manifest; the
    // retry recovers one from the newest snapshot and succeeds.
    assert!(o.status.success(), "{e}");
    assert!(e.contains("attempt 1 failed"), "{e}");
    assert!(e.contains("manifest") && e.contains("damaged"), "{e}");
    assert!(e.contains("recovered from snapshot"), "{e}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let left = |w: &World| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !w.sshd.pids("byteback-server serve").is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        w.sshd.pids("byteback-server serve")
    };
    assert_eq!(left(&w), Vec::<u32>::new(), "server processes left");

    // Many new small files (their data waits for the commit's sync), and
    // the server killed at the commit. The commit can be quick: a kill that
    // comes after it is tried again with more files.
    let mut rng = Rng::new(5);
    let mut landed = false;
    for round in 0..3 {
        for i in 0..1500 {
            fs::write(
                src.join(format!("b/new-{round}-{i:04}")),
                rng.bytes(24 << 10),
            )
            .unwrap();
        }
        let tmp = w.store.join("client-h/current/.byteback/partial");
        // Left by the failed runs; the next one makes its own.
        let _ = fs::remove_dir_all(&tmp);
        let start = Instant::now();
        let mut child = w
            .client(&client, "byteback-backup")
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut seen = false;
        let mut pids = vec![];
        while start.elapsed() < limit {
            if pids.is_empty() {
                pids = w.sshd.pids("byteback-server serve");
            }
            let there = tmp.exists();
            if seen && !there {
                break;
            }
            seen |= there;
            std::thread::sleep(Duration::from_micros(200));
        }
        for &p in &pids {
            send_signal(p, Signal::KILL);
        }
        let killed = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "HANG: the client still runs 30 s after its server was killed at the commit"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        eprintln!(
            "server {pids:?} killed at the commit ({:?} in); the client exited {status} {:?} later",
            killed - start,
            killed.elapsed()
        );
        assert!(killed.elapsed() < Duration::from_secs(10));
        assert_eq!(left(&w), Vec::<u32>::new(), "server processes left");
        if !status.success() {
            landed = true;
            break;
        }
    }
    assert!(landed, "every kill came after the commit");
    // And the next backup goes through.
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Over SSH too (protocol 8, through the key's forced command): a backup
/// within the minimum interval between snapshots makes none, and a restore
/// without `--snapshot` reads it from `current`, saying so.
#[test]
fn over_ssh_a_restore_reads_a_current_newer_than_every_snapshot() {
    if !require_root("an sshd and a server account") {
        return;
    }
    let (w, client, src) = World::with_one_client(300, "c", b"first");
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    fs::write(
        w.store.join("byteback.toml"),
        "min_snapshot_interval = 21600\n",
    )
    .unwrap();
    fs::remove_file(src.join("f")).unwrap();
    fs::write(src.join("f"), b"second, within the interval").unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.snapshots("client-c").len(), 1, "{}", stderr(&out));
    let into = w.work.path().join("r");
    let out = w.restore(&client, &into, &["--restore", "/"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("current holds a backup committed at"), "{err}");
    assert_eq!(
        fs::read(under(&into.join("current"), &src).join("f")).unwrap(),
        b"second, within the interval"
    );
}

/// A `Host` block of the OpenSSH configuration, in
/// `/etc/ssh/ssh_config.d/` (Debian's ssh_config includes it), removed
/// however the test ends. Its alias is unique, so it touches nothing else.
struct SshConfigBlock(PathBuf);

impl SshConfigBlock {
    fn write(alias: &str, body: &str) -> SshConfigBlock {
        let dir = Path::new("/etc/ssh/ssh_config.d");
        fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("{alias}.conf"));
        fs::write(&path, format!("Host {alias}\n{body}")).unwrap();
        SshConfigBlock(path)
    }
}

impl Drop for SshConfigBlock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `byteback-server enrol` run as root (`sudo byteback-server enrol ...`,
/// as an error message's advice may be read) edits the keys as the
/// store's account: sshd reads them as that account, and a file root
/// rewrote (mode 0600) would lock out every client and the admin. What
/// would still be written as root for another account is refused, and so
/// is a symlink in the file's place.
#[test]
fn enrol_run_as_root_edits_the_keys_as_the_store_account() {
    use std::os::unix::fs::MetadataExt;
    if !require_root("an account and its store") {
        return;
    }
    let w = World::new(300);
    let account = fs::metadata(&w.store).unwrap().uid();
    assert_ne!(account, 0);
    let key = w.work.path().join("rootkey");
    util::sshd::keygen(&key);
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    let public: Vec<&str> = public.split_whitespace().take(2).collect();
    let public = public.join(" ");
    let ak = w.sshd.authorized_keys();
    let enrol_given = |store: &Path, ak: Option<&Path>, host: &str| {
        let mut c = Command::new(bin("byteback-server"));
        c.args([
            "enrol",
            "--from",
            "127.0.0.1",
            "--host",
            host,
            "--key",
            &public,
        ])
        .env("HOME", "/root")
        .arg("--store")
        .arg(store);
        if let Some(ak) = ak {
            c.arg("--authorized-keys").arg(ak);
        }
        run_status(&mut c)
    };
    let enrol = |store: &Path, ak: &Path, host: &str| enrol_given(store, Some(ak), host);
    // No --authorized-keys: the account's own, not root's $HOME's.
    let out = enrol_given(&w.store, None, "byroot");
    assert!(out.status.success(), "{}", stderr(&out));
    let m = fs::metadata(&ak).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (account, 0o600));
    assert!(fs::read_to_string(&ak).unwrap().contains("--host byroot"));
    assert_eq!(fs::metadata(w.store.join("byroot")).unwrap().uid(), account);

    // What the account could not edit (here the enrolment lock, as an
    // enrol run as root before this fix left it) is named, with the fix.
    let lock = w.sshd.home.join(".ssh/.byteback-enrol.lock");
    std::os::unix::fs::chown(&lock, Some(0), Some(0)).unwrap();
    let out = enrol(&w.store, &ak, "byroot");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{} belongs to uid 0, not to the store's account (uid {account})",
            lock.display()
        )) && stderr(&out).contains(&format!("`chown {account}: {}`", lock.display())),
        "{}",
        stderr(&out)
    );
    std::os::unix::fs::chown(&lock, Some(account), None).unwrap();
    let out = enrol(&w.store, &ak, "byroot");
    assert!(out.status.success(), "{}", stderr(&out));

    // A symlink in the file's place stays, untouched.
    let real = w.sshd.home.join(".ssh/real_keys");
    fs::rename(&ak, &real).unwrap();
    std::os::unix::fs::symlink(&real, &ak).unwrap();
    std::os::unix::fs::lchown(&ak, Some(account), None).unwrap();
    let out = enrol(&w.store, &ak, "byroot2");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a regular file"),
        "{}",
        stderr(&out)
    );
    assert!(fs::symlink_metadata(&ak).unwrap().file_type().is_symlink());
    assert!(!fs::read_to_string(&real).unwrap().contains("byroot2"));
    fs::remove_file(&ak).unwrap();
    fs::rename(&real, &ak).unwrap();

    // Root's store, another account's keys: refused, nothing written.
    let other = w.work.path().join("other");
    let theirs = other.join("home");
    fs::create_dir_all(other.join("store")).unwrap();
    fs::create_dir_all(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let theirs_ak = theirs.join(".ssh/authorized_keys");
    let out = enrol(&other.join("store"), &theirs_ak, "mixed");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is root's, but")
            && stderr(&out).contains("is uid 65534's")
            && stderr(&out).contains("give the account's store with --store"),
        "{}",
        stderr(&out)
    );
    assert!(!theirs.join(".ssh").exists());
    assert!(!other.join("store/mixed").exists());

    // The account's store, keys outside its home that are not its own
    // (root's): refused, and no chown of them is advised.
    let roots = w.work.path().join("roots/.ssh");
    fs::create_dir_all(&roots).unwrap();
    let out = enrol(&w.store, &roots.join("authorized_keys"), "byroot");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "give the account's own with --authorized-keys (default {})",
            ak.display()
        )) && !err.contains("chown"),
        "{err}"
    );
    assert!(!roots.join("authorized_keys").exists());

    // A `.ssh` that is root's symlink (to root's directory): refused, and
    // no chown advised (chown follows a symlink: it would hand over where
    // the link leads).
    let ssh_dir = w.sshd.home.join(".ssh");
    let kept = w.sshd.home.join(".ssh-kept");
    let rootssh = w.work.path().join("rootssh");
    fs::create_dir_all(&rootssh).unwrap();
    fs::rename(&ssh_dir, &kept).unwrap();
    std::os::unix::fs::symlink(&rootssh, &ssh_dir).unwrap();
    let out = enrol(&w.store, &ak, "byroot");
    let err = stderr(&out);
    fs::remove_file(&ssh_dir).unwrap();
    fs::rename(&kept, &ssh_dir).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{} belongs to uid 0", ssh_dir.display()))
            && err.contains("give the account's own with --authorized-keys")
            && !err.contains("chown"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&rootssh).unwrap().count(), 0);

    // migrate-keys run as root edits the account's keys as the account.
    let before = fs::read_to_string(&ak).unwrap();
    let out = run_status(
        Command::new(bin("byteback-server"))
            .env("HOME", "/root")
            .arg("migrate-keys")
            .arg("--store")
            .arg(&w.store),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("no 1.x line to migrate in {}", ak.display())),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&ak).unwrap(), before);
    assert_eq!(fs::metadata(&ak).unwrap().uid(), account);
}

/// An SSH configuration `ssh -G` refuses, or does not answer for in time,
/// stops the backup with ssh's words (not retried when refused): never a
/// connection to the name as written, which the configuration may have
/// meant for another machine (and `--accept-new-host-key` would learn its
/// key). A stand-in for ssh (`BYTEBACK_TEST_OPENSSH`) fails per command,
/// leaving the machine's configuration to the tests running beside.
#[test]
fn an_ssh_configuration_that_cannot_be_read_stops_the_backup() {
    if !require_root("an sshd") {
        return;
    }
    let (w, client, src) = World::with_one_client(300, "badcfg", b"never sent");
    let fake = client.join("fake-ssh");
    fs::write(
        &fake,
        "#!/bin/sh\nprintf 'line 3: Bad configuration option: \\033[31mnosuchoption\\n' >&2\nexit 255\n",
    )
    .unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let start = std::time::Instant::now();
    let out = run_status(
        w.client(&client, "byteback-backup")
            .env("BYTEBACK_TEST_OPENSSH", &fake)
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "3", "--retry-delay", "60"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("-G 127.0.0.1 refuses the SSH configuration (exited with status 255)")
            && err.contains("Bad configuration option: \\x1b[31mnosuchoption"),
        "{err}"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "retried: {err}"
    );
    assert!(w.snapshots("client-badcfg").is_empty());

    // One that hangs is stopped at the bound, said.
    fs::write(&fake, "#!/bin/sh\nsleep 60\n").unwrap();
    let start = std::time::Instant::now();
    let out = run_status(
        w.client(&client, "byteback-backup")
            .env("BYTEBACK_TEST_OPENSSH", &fake)
            .env("BYTEBACK_TEST_SSH_G_WAIT_SECS", "1")
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "0"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("took over 1 s to give the SSH configuration"),
        "{err}"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "{err}"
    );
    assert!(w.snapshots("client-badcfg").is_empty());

    // ssh's words come even while a command its configuration ran holds
    // its stderr open (a `Match exec` leaving a process behind).
    fs::write(
        &fake,
        "#!/bin/sh\n(sleep 30 >/dev/null &)\necho 'line 7: Bad configuration option: held' >&2\nexit 255\n",
    )
    .unwrap();
    let start = std::time::Instant::now();
    let out = run_status(
        w.client(&client, "byteback-backup")
            .env("BYTEBACK_TEST_OPENSSH", &fake)
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "0"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refuses the SSH configuration (exited with status 255): line 7: Bad configuration option: held"),
        "{err}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(6), "{err}");
    assert!(w.snapshots("client-badcfg").is_empty());

    // One that fails for another reason (here, as for a uid without a
    // passwd entry) leaves the configuration unused, said; the backup goes
    // through.
    fs::write(
        &fake,
        "#!/bin/sh\necho 'No user exists for uid 4242' >&2\nexit 255\n",
    )
    .unwrap();
    let out = run_status(
        w.client(&client, "byteback-backup")
            .env("BYTEBACK_TEST_OPENSSH", &fake)
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "0"]),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("-G 127.0.0.1: exited with status 255: No user exists for uid 4242; the SSH configuration is not used for it"),
        "{err}"
    );
    assert_eq!(w.snapshots("client-badcfg").len(), 1);

    // The real one: the backup goes through, without a word of it.
    fs::write(src.join("f"), b"sent at last").unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("SSH configuration"),
        "{}",
        stderr(&out)
    );
    assert_eq!(w.snapshots("client-badcfg").len(), 2);
}

/// A server byteback does not know, but which a known_hosts file the SSH
/// configuration names (`UserKnownHostsFile`, not read by byteback) or a
/// `@cert-authority` line records, is refused naming both, so the admin
/// knows where the key is and why it does not count.
#[test]
fn an_unknown_host_names_the_files_that_record_it_elsewhere() {
    if !require_root("an sshd and /etc/ssh/ssh_config.d") {
        return;
    }
    let (w, client, src) = World::with_one_client(200, "elsewhere", b"data");
    let kh = client.join("known_hosts");
    let line = fs::read_to_string(&kh).unwrap();
    let theirs = w.work.path().join("their_known_hosts");
    fs::write(&theirs, &line).unwrap();
    let key = line
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ");
    fs::write(
        &kh,
        format!("@cert-authority [127.0.0.1]:{} {key}\n", w.sshd.port),
    )
    .unwrap();
    let alias = format!("byteback-test-kh-{}", std::process::id());
    let _block = SshConfigBlock::write(
        &alias,
        &format!(
            "    HostName 127.0.0.1\n    Port {}\n    UserKnownHostsFile {}\n",
            w.sshd.port,
            theirs.display()
        ),
    );
    fs::write(
        client.join("destination"),
        format!("{}@{alias}:\n", w.sshd.user),
    )
    .unwrap();
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for said in [
        "is not in".to_string(),
        format!("Note: {}:1 names it as a @cert-authority", kh.display()),
        format!(
            "Note: the SSH configuration's known_hosts file {}:1 records it, but byteback does \
             not read that file (copy the line into {})",
            theirs.display(),
            kh.display()
        ),
    ] {
        assert!(err.contains(&said), "{said}: {err}");
    }
    assert!(w.snapshots("client-elsewhere").is_empty());
}

/// A destination whose host is an alias of the OpenSSH configuration
/// (`HostName`, `Port`), as byteback 1.x, which ran `ssh`, followed it,
/// reaches the same server; a `ProxyJump` there is an error naming it,
/// at once, not retries.
#[test]
fn a_destination_is_resolved_through_the_openssh_configuration() {
    if !require_root("an sshd and /etc/ssh/ssh_config.d") {
        return;
    }
    assert!(
        fs::read_to_string("/etc/ssh/ssh_config")
            .is_ok_and(|c| c.contains("Include /etc/ssh/ssh_config.d/")),
        "this test needs Debian's /etc/ssh/ssh_config (openssh-client)"
    );
    let (w, client, src) = World::with_one_client(300, "alias", b"through an alias");
    let alias = format!("byteback-test-alias-{}", std::process::id());
    let block = SshConfigBlock::write(
        &alias,
        &format!("    HostName 127.0.0.1\n    Port {}\n", w.sshd.port),
    );
    fs::write(
        client.join("destination"),
        format!("{}@{alias}:\n", w.sshd.user),
    )
    .unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.snapshots("client-alias").len(), 1);
    // A key learnt under the alias (by a byteback that did not read the
    // configuration) is still found.
    let kh = client.join("known_hosts");
    let known = fs::read_to_string(&kh).unwrap();
    let by_alias = known.replace(&format!("[127.0.0.1]:{}", w.sshd.port), &alias);
    assert_ne!(by_alias, known);
    fs::write(&kh, by_alias).unwrap();
    fs::write(src.join("f"), b"through an alias, again").unwrap();
    let out = w.backup(&client, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    fs::write(&kh, known).unwrap();
    drop(block);

    // Settings 1.x's ssh followed and byteback does not are named.
    let block = SshConfigBlock::write(
        &alias,
        &format!(
            "    HostName 127.0.0.1\n    Port {}\n    BindAddress 127.0.0.1\n    \
             StrictHostKeyChecking accept-new\n",
            w.sshd.port
        ),
    );
    fs::write(src.join("f"), b"through an alias, a third time").unwrap();
    let out = w.backup(&client, &src);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    for said in [
        "sets BindAddress 127.0.0.1, which byteback",
        "sets StrictHostKeyChecking accept-new, which byteback does not follow",
    ] {
        assert!(err.contains(said), "{said}: {err}");
    }
    drop(block);

    let _block = SshConfigBlock::write(
        &alias,
        &format!(
            "    HostName 127.0.0.1\n    Port {}\n    ProxyJump nobody@127.0.0.1:1\n",
            w.sshd.port
        ),
    );
    let start = std::time::Instant::now();
    let out = run_status(
        w.client(&client, "byteback-backup")
            .arg("--source")
            .arg(&src)
            .args(["--retry-number", "3", "--retry-delay", "60"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("(ssh -G {alias}) reaches ")) && err.contains("ProxyJump nobody@"),
        "{err}"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "retried: {err}"
    );
}

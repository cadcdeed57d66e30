//! byteback 1.x stores: snapshots written by rsync `--fake-super` (no
//! manifest) are listed and restored with their metadata through the normal
//! byteback-restore path, beside byteback's own snapshots of the same host.

use crate::util;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::sshd::Sshd;
use util::*;

/// 1.x's snapshot name format (`%Y-%m-%dT%H:%M%z`).
const OLD_SNAP: &str = "2026-11-20T03:00+0000";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn restore_cmd(store: &Path, host: &str) -> Command {
    let mut c = Command::new(bin("byteback-restore"));
    c.arg("--destination").arg(store).args(["--hostname", host]);
    c
}

/// A restore of all of `host`'s newest 1.x snapshot (`OLD_SNAP`) into
/// `r` on `fsys`, which must end partial (24, what 1.x kept is not all
/// restored): its stderr and the snapshot's restored root.
fn restore_all_partial(fsys: &BtrfsLoop, store: &Path, host: &str) -> (String, PathBuf) {
    let into = fsys.mount.join("r");
    fs::create_dir_all(&into).unwrap();
    let out = run_status(
        restore_cmd(store, host)
            .current_dir(&into)
            .args(["--restore", "/"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(24), "{err}");
    (err, into.join(OLD_SNAP))
}

/// A remote shell for rsync that runs the "remote" command locally, so the
/// receiving rsync is started exactly as 1.x started it over SSH (with
/// `--rsync-path 'rsync --fake-super'`: only the receiver fakes super).
fn fake_rsh(dir: &Path) -> PathBuf {
    let p = dir.join("fake-rsh");
    fs::write(&p, "#!/bin/sh\nshift\nexec sh -c \"$*\"\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Copies `src` into `<store>/<host>/current` (a btrfs subvolume) with the
/// rsync options byteback 1.x used, plus `--hard-links --xattrs` (what a
/// 1.x `rsync_flags` file could add), then snapshots it read-only as 1.x did.
fn backup_as_1x(
    scratch: &Path,
    store: &Path,
    host: &str,
    src: &Path,
    snap: &str,
    owner: Option<&str>,
) {
    let hostdir = store.join(host);
    fs::create_dir_all(&hostdir).unwrap();
    let current = hostdir.join("current");
    if !current.exists() {
        run(Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&current));
    }
    run(Command::new("rsync")
        .args([
            "--archive",
            "--numeric-ids",
            "--delete-excluded",
            "--delete-during",
            "--inplace",
            "--relative",
            "--hard-links",
            "--xattrs",
            "--rsync-path",
            "rsync --fake-super",
            "--rsh",
        ])
        .arg(fake_rsh(scratch))
        .arg(src)
        .arg(format!("localhost:{}", current.display())));
    if let Some(user) = owner {
        // 1.x's store belongs to its backup account.
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(&hostdir));
    }
    run(Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&current)
        .arg(hostdir.join(snap)));
}

/// From a `--list` of a host holding one 1.x snapshot and then one of
/// byteback's (in that order, each named by kind), the byteback one's name.
fn byteback_snapshot_after_1x(listing: &str) -> String {
    let kinds: Vec<&str> = listing
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(kinds, ["1.x", "byteback"], "{listing}");
    listing
        .lines()
        .nth(3)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn restored(root: &Path, src: &Path) -> PathBuf {
    root.join(src.strip_prefix("/").unwrap())
}

#[test]
fn a_1x_snapshot_lists_and_restores_exactly_beside_byteback_snapshots() {
    if !require_root("1.x store compatibility (btrfs, owners, devices)") {
        return;
    }
    let fsys = BtrfsLoop::new(400);
    let store = fsys.mount.join("store-legacy");
    store_without_interval(&store);
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    make_rich_tree(&src, &mut Rng::new(0x1e9a));
    // Hard links between a FIFO's, a symlink's and a device's names, which
    // rsync's -H kept (--fake-super stores each as a file, hard-linked).
    let sp = src.join("speciallinks");
    fs::create_dir_all(&sp).unwrap();
    run(Command::new("mkfifo").arg(sp.join("p1")));
    std::os::unix::fs::symlink("there", sp.join("s1")).unwrap();
    run(Command::new("mknod")
        .arg(sp.join("c1"))
        .args(["c", "1", "3"]));
    for n in ["p", "s", "c"] {
        fs::hard_link(sp.join(format!("{n}1")), sp.join(format!("{n}2"))).unwrap();
    }
    // 1.x did not keep ACLs (rsync --fake-super without -A): none in the source.
    run(Command::new("setfacl").arg("-R").arg("-b").arg(&src));
    let host = "legacy1x";
    backup_as_1x(d.path(), &store, host, &src, OLD_SNAP, None);
    // The store really is rsync's fake-super layout.
    let stored = restored(&store.join(host).join(OLD_SNAP), &src);
    let stat = run(Command::new("getfattr")
        .args(["-h", "--only-values", "-n", "user.rsync.%stat"])
        .arg(stored.join("owners/setuid_foreign")));
    assert_eq!(text(&stat.stdout), "104755 0,0 1234:5678");
    assert!(fs::symlink_metadata(stored.join("links/absolute"))
        .unwrap()
        .is_file());
    assert!(!store.join(host).join(OLD_SNAP).join(".byteback").exists());

    // A plain listing names the kind.
    let out = run(restore_cmd(&store, host).arg("--list"));
    let plain = text(&out.stdout);
    assert!(
        plain
            .lines()
            .any(|l| l.starts_with(OLD_SNAP) && l.trim_end().ends_with(" 1.x")),
        "{plain}"
    );

    // A file listing shows 1.x's metadata from the xattrs.
    let out = run(restore_cmd(&store, host)
        .arg("--list")
        .arg(format!("{}/**", src.display())));
    let list = text(&out.stdout);
    let line = |suffix: &str| -> String {
        list.lines()
            .find(|l| l.ends_with(suffix))
            .unwrap_or_else(|| panic!("no line ending {suffix:?} in\n{list}"))
            .to_string()
    };
    let l = line("/owners/setuid_foreign");
    assert!(
        l.starts_with(OLD_SNAP) && l.contains("-rwsr-xr-x") && l.contains(" 1234   5678 "),
        "{l}"
    );
    assert!(line("/special/fifo").contains(" prw"), "{list}");
    assert!(line("/special/char_null").contains(" crw"), "{list}");
    assert!(line("/special/block_loop200").contains(" brw"), "{list}");
    assert!(
        line("/links/absolute -> /etc/passwd").contains(" lrwxrwxrwx"),
        "{list}"
    );
    assert!(stderr(&out).contains("byteback 1.x"), "{}", stderr(&out));

    // Restored exactly: contents, types, modes, owners, devices, symlinks,
    // hard links, xattrs (trusted.* too), mtimes to the nanosecond.
    let into = d.path().join("r1");
    fs::create_dir_all(&into).unwrap();
    let sentinel_dir = d.path().join("outside");
    fs::create_dir_all(&sentinel_dir).unwrap();
    let sentinel = Sentinel::plant(&sentinel_dir);
    let out = run(restore_cmd(&store, host)
        .current_dir(&into)
        .arg("--restore")
        .arg(&src));
    assert!(
        stderr(&out).contains("byteback 1.x snapshots, which keep no checksums"),
        "{}",
        stderr(&out)
    );
    {
        // rsync's -H links specials after it set their times and their
        // directory's (and with --fake-super keeps the link's time as it
        // made it): 1.x stored those times, which the restore gives back.
        use std::os::unix::fs::MetadataExt;
        let st = restored(&store.join(host).join(OLD_SNAP), &src);
        for p in [
            "",
            "speciallinks",
            "speciallinks/c1",
            "speciallinks/p1",
            "speciallinks/s1",
        ] {
            let m = fs::symlink_metadata(st.join(p)).unwrap();
            set_mtime(&src.join(p), m.mtime(), m.mtime_nsec());
        }
    }
    assert_same_tree(&src, &restored(&into.join(OLD_SNAP), &src));
    sentinel.assert_untouched();

    // byteback takes over the same host: its first backup goes into the
    // 1.x `current`, and the store then holds both kinds.
    fs::write(src.join("files/new_after_1x"), b"byteback").unwrap();
    run(Command::new(bin("byteback-backup"))
        .arg("--destination")
        .arg(&store)
        .arg("--source")
        .arg(&src)
        .args(["--hostname", host, "--retry-number", "0"]));
    let out = run(restore_cmd(&store, host).arg("--list"));
    let new_snap = byteback_snapshot_after_1x(&text(&out.stdout));
    // Every version of a file the two snapshots hold differently.
    let out = run(restore_cmd(&store, host)
        .args(["--list", "--all"])
        .arg(src.join("files/new_after_1x")));
    assert_eq!(
        text(&out.stdout).lines().count(),
        3,
        "{}",
        text(&out.stdout)
    );
    // The newest (byteback) snapshot restores exactly, verified.
    let into2 = d.path().join("r2");
    fs::create_dir_all(&into2).unwrap();
    let out = run(restore_cmd(&store, host)
        .current_dir(&into2)
        .args(["--restore", "--snapshot", &new_snap])
        .arg(&src));
    assert!(!stderr(&out).contains("no checksums"), "{}", stderr(&out));
    assert_same_tree(&src, &restored(&into2.join(&new_snap), &src));
    // verify checks the byteback snapshot and says the 1.x one has nothing to check.
    let out = run(Command::new(bin("byteback-server"))
        .args(["verify", "--host", host, "--store"])
        .arg(&store));
    assert!(
        stderr(&out).contains(&format!("{OLD_SNAP} is a byteback 1.x snapshot")),
        "{}",
        stderr(&out)
    );
    // And the 1.x one still does, asked for by name.
    let into3 = d.path().join("r3");
    fs::create_dir_all(&into3).unwrap();
    run(restore_cmd(&store, host)
        .current_dir(&into3)
        .args(["--restore", "--snapshot", OLD_SNAP])
        .arg(&src));
    assert_same_tree(
        &restored(&into.join(OLD_SNAP), &src),
        &restored(&into3.join(OLD_SNAP), &src),
    );
}

#[test]
fn a_migrated_1x_rsa_key_backs_up_over_ssh_into_its_1x_host_until_rotated() {
    if !require_root("an sshd, a server account and btrfs") {
        return;
    }
    let work = scratch();
    let fsys = BtrfsLoop::new(400);
    let store = fsys.mount.join("store-migrate");
    store_without_interval(&store);
    let sshd = Sshd::start(&work.path().join("sshd"), &store);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    make_rich_tree(&src, &mut Rng::new(0x1e9b));
    run(Command::new("setfacl").arg("-R").arg("-b").arg(&src));
    let host = "web1x";
    backup_as_1x(work.path(), &store, host, &src, OLD_SNAP, Some(&sshd.user));
    let client = OneXClient::new(work.path().join("client"), &sshd, host);
    // Before the migration the key runs byteback-receive, which is not there.
    let out = run_status(&mut client.backup(&src));
    assert!(!out.status.success());

    migrate_keys_and_check(&sshd, &store, host, &client.keys_1x);

    // The same key now backs up, into the 1.x host, beside its 1.x snapshot.
    fs::write(src.join("files/after_migration"), b"new").unwrap();
    run(&mut client.backup(&src));
    let out = run(client.cmd("byteback-restore").arg("--list"));
    let new_snap = byteback_snapshot_after_1x(&text(&out.stdout));
    client.restore_equals(&src, &new_snap, &work.path().join("r"));

    rotate_key_and_check(&client, &sshd, host, &work.path().join("old-rsa-key"));
    fs::write(src.join("files/after_rotation"), b"ed25519").unwrap();
    run(&mut client.backup(&src));
    let out = run(client.cmd("byteback-restore").arg("--list"));
    let listing = text(&out.stdout);
    assert_eq!(listing.lines().count(), 5, "{listing}");
    let newest = listing
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    client.restore_equals(&src, &newest, &work.path().join("r-rotated"));
}

/// A client as byteback 1.x left it: its settings directory (standing in
/// for /etc/byteback) with an RSA key in the old PEM format and the
/// destination, root's known_hosts, and the key's line as 1.x's
/// byteback-setup-client-receive appended it to the server account's
/// authorized_keys.
struct OneXClient {
    dir: PathBuf,
    /// The RSA public key line.
    public: String,
    /// authorized_keys with the 1.x line.
    keys_1x: String,
}

impl OneXClient {
    fn new(dir: PathBuf, sshd: &Sshd, host: &str) -> OneXClient {
        fs::create_dir_all(dir.join(".ssh")).unwrap();
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "rsa",
                "-b",
                "3072",
                "-m",
                "PEM",
                "-N",
                "",
                "-C",
                "root@web1x",
                "-f",
            ])
            .arg(dir.join("key")));
        assert!(fs::read_to_string(dir.join("key"))
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        fs::write(dir.join("destination"), sshd.destination()).unwrap();
        fs::write(
            dir.join(".ssh/known_hosts"),
            format!("[127.0.0.1]:{} {}\n", sshd.port, sshd.host_key_pub()),
        )
        .unwrap();
        let public = fs::read_to_string(dir.join("key.pub")).unwrap();
        let ak = sshd.authorized_keys();
        let mut keys_1x = fs::read_to_string(&ak).unwrap();
        keys_1x.push_str(&format!(
            "command=\"byteback-receive\",from=\"127.0.0.1\",environment=\"BYTEBACK_HOST={host}\" {}",
            public.trim_end()
        ));
        keys_1x.push('\n');
        fs::write(&ak, &keys_1x).unwrap();
        OneXClient {
            dir,
            public,
            keys_1x,
        }
    }

    /// `prog` run with this client's settings and home.
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(bin(prog));
        c.env("BYTEBACK_CONFIG_DIR", &self.dir)
            .env("HOME", &self.dir)
            .stdin(std::process::Stdio::null());
        c
    }

    /// A backup of `src` to the configured destination, no retries.
    fn backup(&self, src: &Path) -> Command {
        let mut c = self.cmd("byteback-backup");
        c.arg("--source").arg(src).args(["--retry-number", "0"]);
        c
    }

    /// Restores `src` from `snap` into `into`: it equals `src`.
    fn restore_equals(&self, src: &Path, snap: &str, into: &Path) {
        fs::create_dir_all(into).unwrap();
        run(self
            .cmd("byteback-restore")
            .current_dir(into)
            .args(["--restore", "--snapshot", snap])
            .arg(src));
        assert_same_tree(src, &restored(&into.join(snap), src));
    }
}

/// `byteback-server migrate-keys` as the server account: a dry run changes
/// nothing; the real one turns the 1.x line into a restricted `serve` line
/// for `host`, keeps the old file as `authorized_keys.byteback-1x`, and a
/// second run finds no 1.x line.
fn migrate_keys_and_check(sshd: &Sshd, store: &Path, host: &str, keys_1x: &str) {
    let ak = sshd.authorized_keys();
    let migrate = |extra: &[&str]| {
        run(Command::new("runuser")
            .args(["-u", &sshd.user, "--"])
            .arg(bin("byteback-server"))
            .arg("migrate-keys")
            .arg("--authorized-keys")
            .arg(&ak)
            .arg("--store")
            .arg(store)
            .args(extra))
    };
    let dry = migrate(&["--dry-run"]);
    assert!(
        text(&dry.stdout).contains("would become"),
        "{}",
        text(&dry.stdout)
    );
    assert_eq!(fs::read_to_string(&ak).unwrap(), keys_1x);
    migrate(&[]);
    let migrated = fs::read_to_string(&ak).unwrap();
    let line = migrated.lines().last().unwrap();
    assert!(
        line.starts_with("restrict,from=\"127.0.0.1\",command=\"")
            && line.contains(&format!(" serve --host {host} --store "))
            && line.ends_with(&format!("byteback:{host}")),
        "{migrated}"
    );
    assert_eq!(
        fs::read_to_string(ak.with_file_name("authorized_keys.byteback-1x")).unwrap(),
        keys_1x
    );
    // Idempotent.
    let again = migrate(&[]);
    assert!(stderr(&again).contains("no 1.x line"), "{}", stderr(&again));
    assert_eq!(fs::read_to_string(&ak).unwrap(), migrated);
}

/// `--rotate-key`: a new ed25519 key is enrolled (admin login), switched to,
/// and the RSA key's line is gone, so the RSA key (kept at `old_key`) no
/// longer logs in.
fn rotate_key_and_check(client: &OneXClient, sshd: &Sshd, host: &str, old_key: &Path) {
    fs::copy(client.dir.join("key"), old_key).unwrap();
    let old_blob = client.public.split_whitespace().nth(1).unwrap().to_string();
    let out = run(client
        .cmd("byteback-setup-client")
        .args(["--rotate-key", "--hostname", host])
        .arg("--admin-key")
        .arg(&sshd.admin_key)
        .arg("--server-command")
        .arg(bin("byteback-server")));
    assert!(
        stderr(&out).contains("switched to the new key"),
        "{}",
        stderr(&out)
    );
    assert!(fs::read_to_string(client.dir.join("key"))
        .unwrap()
        .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    assert!(fs::read_to_string(client.dir.join("key.pub"))
        .unwrap()
        .starts_with("ssh-ed25519 "));
    assert!(!client.dir.join("key.new").exists() && !client.dir.join("key.retired").exists());
    let keys_now = fs::read_to_string(sshd.authorized_keys()).unwrap();
    assert!(!keys_now.contains(&old_blob), "{keys_now}");
    assert!(keys_now
        .lines()
        .last()
        .unwrap()
        .ends_with(&format!("byteback:{host}")));
    let out = sshd.openssh(old_key, &[], &["ping"]);
    assert!(!out.status.success(), "{}", stderr(&out));
}

/// Sets a `user.rsync.%stat` value as rsync --fake-super would (or worse).
fn set_stat(path: &Path, value: &str) {
    run(Command::new("setfattr")
        .args(["-h", "-n", "user.rsync.%stat", "-v", value])
        .arg(path));
}

#[test]
fn a_hostile_1x_tree_is_read_without_following_anything_and_parsed_strictly() {
    let Some((_fsys, store)) = store_on_btrfs("store-hostile1x") else {
        return;
    };
    let d = scratch();
    let outside = d.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let sentinel = Sentinel::plant(&outside);
    let make_host = |host: &str, fill: &dyn Fn(&Path)| {
        let hostdir = store.join(host);
        fs::create_dir_all(&hostdir).unwrap();
        let current = hostdir.join("current");
        run(Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&current));
        fill(&current);
        run(Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(&current)
            .arg(hostdir.join(OLD_SNAP)));
    };
    // A symlink stored as a real symlink, pointing out of the store at the
    // sentinel's directory, and a symlink stored as rsync stores one.
    make_host("symlinks", &|c| {
        fs::create_dir_all(c.join("d")).unwrap();
        std::os::unix::fs::symlink(&outside, c.join("d/escape")).unwrap();
        fs::write(c.join("d/link"), outside.join("SENTINEL").to_str().unwrap()).unwrap();
        set_stat(&c.join("d/link"), "120777 0,0 0:0");
        fs::write(c.join("d/file"), b"content").unwrap();
    });
    let out = run(restore_cmd(&store, "symlinks").args(["--list", "/d/**"]));
    let list = text(&out.stdout);
    assert!(
        list.contains(&format!("/d/escape -> {}", outside.display())),
        "{list}"
    );
    assert!(
        list.contains(&format!("/d/link -> {}/SENTINEL", outside.display())),
        "{list}"
    );
    assert!(
        !list.contains("/d/escape/"),
        "nothing beneath the symlink: {list}"
    );
    assert_eq!(list.lines().count(), 2 + 3, "{list}");
    let into = d.path().join("r");
    fs::create_dir_all(&into).unwrap();
    run(restore_cmd(&store, "symlinks")
        .current_dir(&into)
        .args(["--restore", "/d"]));
    let r = into.join(OLD_SNAP).join("d");
    assert_eq!(fs::read_link(r.join("escape")).unwrap(), outside);
    assert_eq!(
        fs::read_link(r.join("link")).unwrap(),
        outside.join("SENTINEL")
    );
    assert_eq!(fs::read(r.join("file")).unwrap(), b"content");
    sentinel.assert_untouched();

    // Each bad %stat leaves its entry out with a warning naming the path;
    // the listing goes on, and ends partial.
    for (host, value, why) in [
        (
            "bad-syntax",
            "100644 0,0 1:2 ; rm -rf /",
            "corrupt user.rsync.%stat",
        ),
        (
            "bad-number",
            "100644 0,0 99999999999:0",
            "corrupt user.rsync.%stat",
        ),
        ("bad-type", "170644 0,0 0:0", "corrupt user.rsync.%stat"),
        ("file-as-dir", "40755 0,0 0:0", "says it is a directory"),
    ] {
        make_host(host, &|c| {
            fs::write(c.join("victim"), b"x").unwrap();
            set_stat(&c.join("victim"), value);
            fs::write(c.join("zz_sound"), b"x").unwrap();
        });
        let out = run_status(restore_cmd(&store, host).args(["--list", "/"]));
        assert_eq!(out.status.code(), Some(24), "{host}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(why) && err.contains("/victim: left out"),
            "{host}: {err}"
        );
        let list = text(&out.stdout);
        assert!(
            list.contains("/zz_sound") && !list.contains("/victim"),
            "{host}: {list}"
        );
    }
    // A directory said to be a file, and a symlink target too long.
    make_host("dir-as-file", &|c| {
        fs::create_dir_all(c.join("victim")).unwrap();
        fs::write(c.join("victim/inside"), b"x").unwrap();
        set_stat(&c.join("victim"), "100644 0,0 0:0");
        fs::write(c.join("zz_sound"), b"x").unwrap();
    });
    make_host("long-target", &|c| {
        fs::write(c.join("victim"), vec![b'a'; 5000]).unwrap();
        set_stat(&c.join("victim"), "120777 0,0 0:0");
        fs::write(c.join("zz_sound"), b"x").unwrap();
    });
    for (host, why) in [
        ("dir-as-file", "says it is not one"),
        ("long-target", "longer than 4096"),
    ] {
        let out = run_status(restore_cmd(&store, host).args(["--list", "/"]));
        assert_eq!(out.status.code(), Some(24), "{host}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{host}: {}", stderr(&out));
        let list = text(&out.stdout);
        assert!(
            list.contains("/zz_sound") && !list.contains("/victim"),
            "{host}: {list}"
        );
    }
    sentinel.assert_untouched();
}

/// A small source tree for the 1.x tests below: `<src>/files/{a,b}`.
fn small_source(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("files")).unwrap();
    fs::write(src.join("files/a"), b"the client's own content, a").unwrap();
    fs::write(src.join("files/b"), b"the client's own content, b").unwrap();
    set_mtime(&src.join("files/a"), 1_700_000_000, 123_456_789);
    set_mtime(&src.join("files/b"), 1_700_000_000, 987_654_321);
    src
}

/// Taking over a 1.x `current` (no manifest): a stored file whose size and
/// mtime match the client's but whose content does not (1.x's rsync kept
/// files by size and mtime too, and a disc can rot) is compared with the
/// client's BLAKE3 and received again, never certified by its own hash.
#[test]
fn taking_over_a_1x_current_checks_every_kept_file_against_the_client() {
    let Some((_fsys, store)) = store_on_btrfs("store-takeover") else {
        return;
    };
    let d = scratch();
    let src = small_source(d.path());
    let host = "takeover1x";
    backup_as_1x(d.path(), &store, host, &src, OLD_SNAP, None);
    swap_stored_a(&store, host, &src);
    let out = local_backup(&store, &src, host);
    let snaps = snapshots(&store, host);
    let new_snap = snaps.last().unwrap();
    assert_ne!(new_snap, OLD_SNAP);
    let kept = restored(&store.join(host).join(new_snap), &src);
    assert_eq!(
        fs::read(kept.join("files/a")).unwrap(),
        fs::read(src.join("files/a")).unwrap(),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fs::read(kept.join("files/b")).unwrap(),
        fs::read(src.join("files/b")).unwrap()
    );
    // And a restore of it verifies.
    let into = d.path().join("r");
    fs::create_dir_all(&into).unwrap();
    run(restore_cmd(&store, host)
        .current_dir(&into)
        .args(["--restore", "--snapshot", new_snap])
        .arg(&src));
    assert_same_tree(&src, &restored(&into.join(new_snap), &src));
}

/// `verify` passes over a 1.x `current` as 1.x's (no checksums to check),
/// not as one an interrupted backup left.
#[test]
fn verify_names_a_1x_current_as_1x() {
    let Some((_fsys, store)) = store_on_btrfs("store-verify1x") else {
        return;
    };
    let d = scratch();
    let src = small_source(d.path());
    let host = "verify1x";
    backup_as_1x(d.path(), &store, host, &src, OLD_SNAP, None);
    let out = run(Command::new(bin("byteback-server"))
        .args(["verify", "--host", host, "--store"])
        .arg(&store));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{host}/current is byteback 1.x's")),
        "{err}"
    );
    assert!(!err.contains("interrupted"), "{err}");
    // Nothing to verify there is no reason the pass is not whole: the host
    // counts as verified whole (it stayed 'never', and status
    // --verify-warn WARNING for good).
    let o = run_status(
        Command::new(bin("byteback-server"))
            .args([
                "status",
                "--verify-warn",
                "1h",
                "--now",
                &rfc3339(unix_now() + 600),
            ])
            .arg("--store")
            .arg(&store),
    );
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
}

/// Makes `<store>/<host>/current` (a btrfs subvolume), fills it with
/// `fill` (the store as 1.x's rsync would have left it, or worse) and
/// snapshots it read-only as `snap`.
fn make_1x_by_hand(store: &Path, host: &str, snap: &str, fill: &dyn Fn(&Path)) {
    let hostdir = store.join(host);
    fs::create_dir_all(&hostdir).unwrap();
    let current = hostdir.join("current");
    if !current.exists() {
        run(Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&current));
    }
    fill(&current);
    run(Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&current)
        .arg(hostdir.join(snap)));
}

/// One entry a listing or restore cannot take as it is stored never breaks
/// the rest: a file with more xattrs than an entry carries keeps what fits
/// (in the client's order) with a warning naming it, and an entry whose
/// `%stat` does not parse, or names a device Linux cannot make, is left out
/// with a warning naming it and its snapshot. Whoever asks for them ends
/// partial (24); whoever asks for the rest only gets a clean run.
#[test]
fn a_bad_1x_entry_is_left_out_with_a_warning_and_the_rest_restores() {
    let Some((fsys, store)) = store_on_btrfs("store-bad1x") else {
        return;
    };
    let host = "bad1x";
    make_1x_by_hand(&store, host, OLD_SNAP, &|c| {
        fs::create_dir_all(c.join("d/sub")).unwrap();
        fs::write(c.join("d/good"), b"good").unwrap();
        fs::write(c.join("d/many"), b"many xattrs").unwrap();
        for i in 0..300 {
            set_xattr(&c.join("d/many"), &format!("user.x{i:03}"), b"v");
        }
        set_xattr(&c.join("d/many"), "user.rsync.trusted.t", b"kept first");
        fs::write(c.join("d/sub/in_bad_dir"), b"x").unwrap();
        set_stat(&c.join("d/sub"), "100644 0,0 0:0"); // a directory said to be a file
        fs::write(c.join("d/corrupt"), b"x").unwrap();
        set_stat(&c.join("d/corrupt"), "100644 0,0 1:2 ; rm -rf /");
        fs::write(c.join("d/nodev"), b"").unwrap();
        set_stat(&c.join("d/nodev"), "20644 4294967295,4294967295 0:0");
        fs::write(c.join("d/bigmajor"), b"").unwrap();
        set_stat(&c.join("d/bigmajor"), "60644 4096,0 0:0");
        fs::write(c.join("d/largest"), b"").unwrap();
        set_stat(&c.join("d/largest"), "20644 4095,1048575 0:0");
    });
    let out = run_status(restore_cmd(&store, host).args(["--list", "/"]));
    let (list, err) = (text(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(24), "{list}\n{err}");
    for p in ["/d/good", "/d/many", "/d/largest"] {
        assert!(list.lines().any(|l| l.ends_with(p)), "{p}: {list}");
    }
    for p in ["/d/sub", "/d/corrupt", "/d/nodev", "/d/bigmajor"] {
        assert!(!list.lines().any(|l| l.contains(p)), "{p}: {list}");
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{p}: left out")) && l.contains(OLD_SNAP)),
            "{p}: {err}"
        );
    }
    assert!(err.contains("not one Linux can make"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("/d/many: more xattrs") && l.contains("user.x255")),
        "{err}"
    );

    // A restore of everything: the rest is there, exit 24.
    let into = fsys.mount.join("r");
    fs::create_dir_all(&into).unwrap();
    let out = run_status(
        restore_cmd(&store, host)
            .current_dir(&into)
            .args(["--restore", "/"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(24), "{err}");
    let r = into.join(OLD_SNAP).join("d");
    assert_eq!(fs::read(r.join("good")).unwrap(), b"good");
    let x = xattrs(&r.join("many"));
    assert_eq!(x.len(), 256, "{err}");
    assert!(x
        .iter()
        .any(|(n, v)| n == b"trusted.t" && v == b"kept first"));
    assert!(x.iter().any(|(n, _)| n == b"user.x254"));
    assert!(!x.iter().any(|(n, _)| n == b"user.x255"));
    for p in ["sub", "corrupt", "nodev", "bigmajor"] {
        assert!(fs::symlink_metadata(r.join(p)).is_err(), "{p}");
    }
    let largest = fs::symlink_metadata(r.join("largest")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (libc::major(largest.rdev()), libc::minor(largest.rdev())),
        (4095, 1048575)
    );
    assert!(err.contains("/d/nodev: left out"), "{err}");

    // Asking for a path below one left out is told so.
    let out = run_status(
        restore_cmd(&store, host)
            .current_dir(&into)
            .args(["--restore", "/d/sub/in_bad_dir"]),
    );
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/d/sub: left out"),
        "{}",
        stderr(&out)
    );

    // Asking only for what is sound: a clean run.
    let into2 = fsys.mount.join("r2");
    fs::create_dir_all(&into2).unwrap();
    let out = run_status(
        restore_cmd(&store, host)
            .current_dir(&into2)
            .args(["--restore", "/d/good"]),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// rsync `--fake-super` keeps a client's `trusted.*` or `security.*` xattr
/// as `user.rsync.<name>`, which any user who may write to a file can also
/// set on the client as it is (a `user.*` xattr): a file capability or a
/// label of their choosing, which a restore as root applied. Such a name is
/// taken for its own only on a file root owns that no one else may write;
/// elsewhere it is restored under its stored name, with a note.
/// `user.rsync.system.*` (rsync sends no `system.*` xattr) is never taken
/// for one. And a `%stat` owner of 4294967295, which `fchown` takes for
/// "unchanged", is refused.
#[test]
fn renamed_xattrs_are_taken_for_their_own_only_where_root_alone_could_set_them() {
    let Some((fsys, store)) = store_on_btrfs("store-forged1x") else {
        return;
    };
    let host = "forged1x";
    make_1x_by_hand(&store, host, OLD_SNAP, &|c| {
        for (name, stat) in [
            ("root", "100644 0,0 0:0"),
            ("users", "100755 0,0 1000:1000"),
            ("shared", "100666 0,0 0:0"),
        ] {
            fs::write(c.join(name), name).unwrap();
            set_stat(&c.join(name), stat);
            set_xattr(&c.join(name), "user.rsync.trusted.t", b"v");
            set_xattr(&c.join(name), "user.rsync.system.posix_acl_access", b"x");
        }
        fs::write(c.join("noone"), b"").unwrap();
        set_stat(&c.join("noone"), "104755 0,0 4294967295:0");
        // A symlink (stored as a file holding its target): no user may set
        // a user.* xattr on one, so whoever owns it, the name is its own.
        fs::write(c.join("lnk"), b"root").unwrap();
        set_stat(&c.join("lnk"), "120777 0,0 1000:1000");
        set_xattr(&c.join("lnk"), "user.rsync.trusted.t", b"v");
    });
    let (err, r) = restore_all_partial(&fsys, &store, host);
    let names =
        |f: &str| -> Vec<Vec<u8>> { xattrs(&r.join(f)).into_iter().map(|(n, _)| n).collect() };
    assert_eq!(
        names("root"),
        vec![
            b"trusted.t".to_vec(),
            b"user.rsync.system.posix_acl_access".to_vec()
        ],
        "{err}"
    );
    for f in ["users", "shared"] {
        assert_eq!(
            names(f),
            vec![
                b"user.rsync.system.posix_acl_access".to_vec(),
                b"user.rsync.trusted.t".to_vec()
            ],
            "{f}: {err}"
        );
        assert!(
            err.lines().any(|l| l.contains(&format!("/{f}"))
                && l.contains("trusted.t stored by rsync as user.rsync.*")),
            "{f}: {err}"
        );
    }
    assert_eq!(fs::read_link(r.join("lnk")).unwrap(), Path::new("root"));
    assert_eq!(names("lnk"), vec![b"trusted.t".to_vec()], "{err}");
    assert!(!err.contains("/lnk"), "{err}");
    assert!(fs::symlink_metadata(r.join("noone")).is_err());
    assert!(err.contains("/noone: left out"), "{err}");
    assert!(err.contains("uid 4294967295 is no owner"), "{err}");
}

/// A 1.x snapshot made with `-A` keeps ACLs in rsync's own format, which
/// byteback does not restore: the mode's group bits (the ACL's mask) are
/// narrowed to the ACL's `group::` entry, so the group never gets more
/// than the source gave it, and the restore says so, naming the file, and
/// ends partial (24). Taken from the newest of two such snapshots, the file
/// is warned about once.
#[test]
fn a_1x_acl_is_never_widened_and_its_loss_is_said() {
    let Some((_fsys, store)) = store_on_btrfs("store-acl1x") else {
        return;
    };
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let f = src.join("shared");
    fs::write(&f, b"group may read, not write").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    run(Command::new("setfacl")
        .args(["-m", "u:1234:rw-,g::r--,m::rw-,o::r--"])
        .arg(&f));
    fs::write(src.join("plain"), b"no acl").unwrap();
    let host = "acl1x";
    let hostdir = store.join(host);
    fs::create_dir_all(&hostdir).unwrap();
    let current = hostdir.join("current");
    run(Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(&current));
    for snap in [OLD_SNAP, "2026-11-21T03:00+0000"] {
        run(Command::new("rsync")
            .args([
                "--archive",
                "--numeric-ids",
                "--relative",
                "--acls",
                "--rsync-path",
                "rsync --fake-super",
                "--rsh",
            ])
            .arg(fake_rsh(d.path()))
            .arg(&src)
            .arg(format!("localhost:{}", current.display())));
        run(Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(&current)
            .arg(hostdir.join(snap)));
    }
    let stored = restored(&hostdir.join(OLD_SNAP), &src).join("shared");
    assert!(
        xattrs(&stored)
            .iter()
            .any(|(n, _)| n == b"user.rsync.%aacl"),
        "rsync kept no ACL"
    );
    let into = d.path().join("r");
    fs::create_dir_all(&into).unwrap();
    let out = run_status(
        restore_cmd(&store, host)
            .current_dir(&into)
            .arg("--restore")
            .arg(&src),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(24), "{err}");
    let r = restored(&into.join("2026-11-21T03:00+0000"), &src);
    let mode = fs::metadata(r.join("shared")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644, "group::r-- within mask::rw-: {err}");
    assert_eq!(fs::read(r.join("plain")).unwrap(), b"no acl");
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("ACL")).collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains("/shared:") && warned[0].contains("0664 applied as 0644"),
        "{err}"
    );
    // Only the plain file: a clean run.
    let into2 = d.path().join("r2");
    fs::create_dir_all(&into2).unwrap();
    let out = run_status(
        restore_cmd(&store, host)
            .current_dir(&into2)
            .arg("--restore")
            .arg(src.join("plain")),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A `byteback-server` for `BYTEBACK_SERVER` whose data segment is capped
/// at `mib` MiB (the client's is not).
fn server_limited_to(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("limited-server");
    fs::write(
        &p,
        format!(
            "#!/bin/sh\nulimit -d {}\nexec '{}' \"$@\"\n",
            mib << 10,
            bin("byteback-server").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A long run of entries the server leaves out (40,000 in one deep
/// directory, each path near 4 KiB) is streamed to the client note by
/// note: the server holds none of them until a good entry comes (it held
/// them all: 164 MB here, and without bound for more).
#[test]
fn a_long_run_of_bad_1x_entries_is_streamed_in_bounded_memory() {
    if !require_root("a 1.x store on btrfs") {
        return;
    }
    let fsys = BtrfsLoop::new(400);
    let store = fsys.mount.join("store-badrun");
    fs::create_dir_all(&store).unwrap();
    let host = "badrun";
    let deep: PathBuf = std::iter::once("d".to_string())
        .chain((0..15).map(|i| format!("{i:x}").repeat(250)))
        .collect();
    make_1x_by_hand(&store, host, OLD_SNAP, &|c| {
        let dir = c.join(&deep);
        fs::create_dir_all(&dir).unwrap();
        for i in 0..40_000 {
            let f = dir.join(format!("f{i:05}"));
            fs::write(&f, b"").unwrap();
            set_xattr(&f, "user.rsync.%stat", b"not a stat");
        }
        fs::write(c.join("good"), b"good").unwrap();
    });
    let d = scratch();
    let out = run_status(
        restore_cmd(&store, host)
            .env("BYTEBACK_SERVER", server_limited_to(d.path(), 64))
            .args(["--list", "/good"]),
    );
    let (list, err) = (text(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{list}\n{err}");
    assert!(list.lines().any(|l| l.ends_with("/good")), "{list}");
    // Asking for the directory: told of what was left out in it.
    let out = run_status(
        restore_cmd(&store, host)
            .env("BYTEBACK_SERVER", server_limited_to(d.path(), 64))
            .args(["--list", "/d"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(24), "{err}");
    assert!(err.contains("/f00000: left out"), "{err}");
}

/// A hard-linked 1.x file whose first name cannot be sent (here larger
/// than byteback's 16 TiB limit, sparse) is left out under every name
/// with a note, and the rest restores. Before, its first name was taken
/// as the target of the later ones before it was checked, so they came as
/// links to a path the client never got, which refused the whole restore.
#[test]
fn a_1x_hard_link_whose_first_name_is_left_out_breaks_nothing() {
    let Some((fsys, store)) = store_on_btrfs("store-links1x") else {
        return;
    };
    let host = "links1x";
    make_1x_by_hand(&store, host, OLD_SNAP, &|c| {
        fs::create_dir_all(c.join("a")).unwrap();
        let big = fs::File::create(c.join("a/big")).unwrap();
        big.set_len(17 << 40).unwrap();
        fs::hard_link(c.join("a/big"), c.join("a/link")).unwrap();
        fs::write(c.join("a/ok"), b"ok").unwrap();
    });
    let into = fsys.mount.join("r");
    fs::create_dir_all(&into).unwrap();
    let out = run_status(
        restore_cmd(&store, host)
            .current_dir(&into)
            .args(["--restore", "/a"]),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(24), "{err}");
    let r = into.join(OLD_SNAP).join("a");
    assert_eq!(fs::read(r.join("ok")).unwrap(), b"ok", "{err}");
    for p in ["big", "link"] {
        assert!(fs::symlink_metadata(r.join(p)).is_err(), "{p}");
        assert!(err.contains(&format!("/a/{p}: left out")), "{p}: {err}");
    }
}

/// A 1.x path longer than byteback's 4096 bytes cannot be sent, nor named
/// in a note (the client refuses an invalid path, which failed the whole
/// listing): it is left out with a note naming the directory that holds
/// it, and the listing and restore go on. Its file's next hard link, with
/// a path that fits, is sent as the file.
#[test]
fn a_1x_path_longer_than_byteback_takes_is_left_out_and_the_rest_goes_on() {
    let Some((fsys, store)) = store_on_btrfs("store-long1x") else {
        return;
    };
    let host = "long1x";
    let deep: PathBuf = std::iter::once("d".to_string())
        .chain((0..16).map(|i| format!("{i:x}").repeat(250)))
        .collect();
    let deep_text = deep.display().to_string();
    assert!(deep_text.len() < 4096 && deep_text.len() + 201 > 4096);
    make_1x_by_hand(&store, host, OLD_SNAP, &|c| {
        use rustix::fs::{AtFlags, Mode, OFlags, CWD};
        fs::create_dir_all(c.join(&deep)).unwrap();
        // Longer than PATH_MAX in all: made beneath its directory's fd.
        let dir = rustix::fs::open(c.join(&deep), OFlags::DIRECTORY, Mode::empty()).unwrap();
        let long = "l".repeat(200);
        let f = rustix::fs::openat(
            &dir,
            long.as_str(),
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        fs::File::from(f).write_all(b"linked content").unwrap();
        fs::create_dir_all(c.join("e")).unwrap();
        rustix::fs::linkat(&dir, long.as_str(), CWD, c.join("e/link"), AtFlags::empty()).unwrap();
        fs::write(c.join("e/plain"), b"plain").unwrap();
    });
    let out = run_status(restore_cmd(&store, host).args(["--list", "/"]));
    let (list, err) = (text(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(24), "{list}\n{err}");
    for p in ["/e/link", "/e/plain"] {
        assert!(list.lines().any(|l| l.ends_with(p)), "{p}: {list}");
    }
    assert!(
        err.contains(&format!("/{deep_text}: "))
            && err.contains("longer than 4096 bytes")
            && err.contains(OLD_SNAP),
        "{err}"
    );
    let (_, r) = restore_all_partial(&fsys, &store, host);
    assert_eq!(fs::read(r.join("e/link")).unwrap(), b"linked content");
    assert_eq!(fs::read(r.join("e/plain")).unwrap(), b"plain");
    assert!(fs::symlink_metadata(r.join(&deep)).unwrap().is_dir());
    // Asking only for what is sound: a clean run.
    let out = run_status(restore_cmd(&store, host).args(["--list", "/e"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A backup cut short before its commit (its manifest's last write fails
/// for want of space, a debug build's fault): `current` left with no manifest.
fn backup_cut_before_commit(store: &Path, src: &Path, host: &str) {
    let out = run_status(
        Command::new(bin("byteback-backup"))
            .env("BYTEBACK_TEST_NO_SPACE_MANIFEST", "1")
            .arg("--destination")
            .arg(store)
            .arg("--source")
            .arg(src)
            .args(["--hostname", host, "--retry-number", "0"]),
    );
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A store directory `name` (no minimum interval between snapshots) on a
/// btrfs loop of its own; `None`, said loudly, when not root.
fn store_on_btrfs(name: &str) -> Option<(BtrfsLoop, PathBuf)> {
    if !require_root("a 1.x store on btrfs") {
        return None;
    }
    let fsys = BtrfsLoop::new(300);
    let store = fsys.mount.join(name);
    store_without_interval(&store);
    Some((fsys, store))
}

/// Over `current`'s copy of `files/a`: other bytes, same size and mtime.
fn swap_stored_a(store: &Path, host: &str, src: &Path) -> PathBuf {
    let stored = restored(&store.join(host).join("current"), src).join("files/a");
    let other = b"other bytes, same size as a";
    assert_eq!(other.len(), fs::metadata(&stored).unwrap().len() as usize);
    fs::write(&stored, other).unwrap();
    set_mtime(&stored, 1_700_000_000, 123_456_789);
    stored
}

/// The check of every kept file against the client is for a 1.x `current`
/// only: a byteback host whose first backup was cut short (no manifest yet,
/// under this boot) resumes it keeping what it verified as it is, hashed,
/// as the README promises, without the client reading every file again;
/// a takeover of a 1.x `current` cut short still checks every file when
/// it resumes.
#[test]
fn only_a_1x_current_has_every_kept_file_checked_against_the_client() {
    let Some((_fsys, store)) = store_on_btrfs("store-resume") else {
        return;
    };
    let d = scratch();
    let src = small_source(d.path());

    // byteback's own first backup, cut short, then resumed: the stored copy
    // this boot wrote and verified is kept, not read again on the client
    // (here swapped, to tell).
    backup_cut_before_commit(&store, &src, "first");
    let current = store.join("first/current");
    assert!(!current.join(".byteback/manifest").exists());
    let stored = swap_stored_a(&store, "first", &src);
    local_backup(&store, &src, "first");
    assert_eq!(
        fs::read(&stored).unwrap(),
        b"other bytes, same size as a",
        "the resumed first backup checked a file this boot wrote against the client"
    );

    // A takeover of a 1.x current, cut short, then resumed: still checked.
    let host = "takeover1x";
    backup_as_1x(d.path(), &store, host, &src, OLD_SNAP, None);
    backup_cut_before_commit(&store, &src, host);
    let stored = swap_stored_a(&store, host, &src);
    local_backup(&store, &src, host);
    assert_eq!(
        fs::read(&stored).unwrap(),
        fs::read(src.join("files/a")).unwrap(),
        "a resumed takeover kept 1.x's copy by size and mtime"
    );
}

/// A listing warns for what it shows, as a restore of the same paths does:
/// not for an older snapshot's note on a version it does not show (with
/// `--all`, which shows it, it does); a path an older snapshot left out is
/// said wherever the patterns reach it, as a restore says it.
#[test]
fn a_listing_warns_for_what_it_shows_as_a_restore_does() {
    let Some((fsys, store)) = store_on_btrfs("store-warn1x") else {
        return;
    };
    let host = "warn1x";
    const NEW_SNAP: &str = "2026-11-21T03:00+0000";
    // The older snapshot: d/f with more xattrs than an entry carries (a
    // note on it), d/sub left out (a %stat that contradicts it).
    make_1x_by_hand(&store, host, OLD_SNAP, &|c| {
        fs::create_dir_all(c.join("d/sub")).unwrap();
        fs::write(c.join("d/f"), b"f").unwrap();
        set_mtime(&c.join("d/f"), 1_700_000_000, 0);
        for i in 0..300 {
            set_xattr(&c.join("d/f"), &format!("user.x{i:03}"), b"v");
        }
        fs::write(c.join("d/sub/in"), b"in").unwrap();
        set_stat(&c.join("d/sub"), "100644 0,0 0:0");
    });
    // The newer one: both sound.
    make_1x_by_hand(&store, host, NEW_SNAP, &|c| {
        for i in 0..300 {
            rustix::fs::lremovexattr(c.join("d/f"), format!("user.x{i:03}").as_str()).unwrap();
        }
        rustix::fs::lremovexattr(c.join("d/sub"), "user.rsync.%stat").unwrap();
    });
    let into = fsys.mount.join("r");
    fs::create_dir_all(&into).unwrap();
    // d/sub, left out of the older snapshot, is said even where the newer
    // one has it: a directory's newer copy may lack what only the older
    // one held. d/f's note goes with its row, shown only with --all.
    for all in [false, true] {
        let code = 24;
        let extra: &[&str] = if all { &["--all"] } else { &[] };
        let out = run_status(
            restore_cmd(&store, host)
                .arg("--list")
                .args(extra)
                .arg("/d"),
        );
        let (list, err) = (text(&out.stdout), stderr(&out));
        assert_eq!(out.status.code(), Some(code), "--all {all}: {list}\n{err}");
        assert!(list.lines().any(|l| l.ends_with("/d/sub/in")), "{list}");
        assert_eq!(err.contains("/d/f: more xattrs"), all, "{err}");
        assert!(err.contains("/d/sub: left out"), "{err}");
        let target = into.join(format!("all-{all}"));
        fs::create_dir_all(&target).unwrap();
        let out = run_status(
            restore_cmd(&store, host)
                .arg("--restore")
                .args(extra)
                .arg("--target")
                .arg(&target)
                .arg("/d"),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "--all {all}: {err}");
        assert_eq!(
            fs::read(target.join(NEW_SNAP).join("d/sub/in")).unwrap(),
            b"in"
        );
    }
}

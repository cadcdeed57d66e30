//! Pre- and post-backup hooks (`<config dir>/pre-backup.d/`,
//! `post-backup.d/`) with the real `byteback-backup` into a local store.

use crate::util;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use util::*;

/// A [`LocalSite`] with this area's methods.
struct Setup(LocalSite);

impl std::ops::Deref for Setup {
    type Target = LocalSite;
    fn deref(&self) -> &LocalSite {
        &self.0
    }
}

fn setup() -> Setup {
    let site = LocalSite::fresh();
    fs::write(site.src.join("file"), b"some data").unwrap();
    Setup(site)
}

impl Setup {
    /// A shell script `<conf>/<sub>/<name>` with `body`, mode `mode`.
    fn hook(&self, sub: &str, name: &str, body: &str, mode: u32) {
        let d = self.conf.join(sub);
        fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A hook line appending `what` to `<work>/log`.
    fn log_line(&self, what: &str) -> String {
        format!("echo \"{what}\" >> '{}'", self.work.join("log").display())
    }

    fn log(&self) -> String {
        fs::read_to_string(self.work.join("log")).unwrap_or_default()
    }

    fn backup_to(&self, dest: &Path, extra: &[&str]) -> Output {
        run_status(
            Command::new(bin("byteback-backup"))
                .env("BYTEBACK_CONFIG_DIR", &self.conf)
                .arg("--destination")
                .arg(dest)
                .arg("--source")
                .arg(&self.src)
                .args(["--hostname", "h"])
                .args(if extra.contains(&"--retry-number") {
                    &[][..]
                } else {
                    &["--retry-number", "0"][..]
                })
                .args(extra),
        )
    }

    /// `byteback-backup` of the source into `dest` with `extra`, its
    /// standard output and error piped, to be spawned.
    fn piped(&self, dest: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(bin("byteback-backup"));
        c.env("BYTEBACK_CONFIG_DIR", &self.conf)
            .arg("--destination")
            .arg(dest)
            .arg("--source")
            .arg(&self.src)
            .args(["--hostname", "h"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    }

    fn backup(&self, extra: &[&str]) -> Output {
        self.backup_to(&self.store, extra)
    }

    fn snapshots(&self) -> Vec<String> {
        snapshots(&self.store, "h")
    }

    /// `<snapshot>/<src>/<rel>` in the store.
    fn in_snapshot(&self, snap: &str, rel: &str) -> PathBuf {
        self.store
            .join("h")
            .join(snap)
            .join(self.src.strip_prefix("/").unwrap())
            .join(rel)
    }
}

/// A post hook that records what it sees in `<work>/post-env`.
fn record_post_env(s: &Setup) {
    s.hook(
        "post-backup.d",
        "10-record",
        &format!(
            "printf '%s|%s|%s\\n' \"$BYTEBACK_STATUS\" \"$BYTEBACK_STATUS_TEXT\" \"${{BYTEBACK_SNAPSHOT-unset}}\" >> '{}'",
            s.work.join("post-env").display()
        ),
        0o755,
    );
}

fn post_env(s: &Setup) -> String {
    fs::read_to_string(s.work.join("post-env")).unwrap_or_default()
}

/// A stop by a signal after the server committed the backup, while the
/// client waits for the server to end (here a local server's wrapper
/// sleeps after it, and the waits are lengthened and shortened through
/// debug-build knobs so that the stop's fallback ends the run): the run
/// says the backup was committed, exits as the backup did (0), and the
/// post-backup hooks are told so, with the snapshot. Before, it reported a
/// failure with no snapshot, and the hooks were told 143.
#[test]
fn a_stop_after_the_commit_reports_the_backup_committed() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    record_post_env(&s);
    let held = s.work.join("held-server");
    let script = format!(
        "#!/bin/sh\n'{}' \"$@\"\nexec sleep 311\n",
        bin("byteback-server").display()
    );
    fs::write(&held, script).unwrap();
    fs::set_permissions(&held, fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = s.piped(&s.store, &["--retry-number", "0", "--json"]);
    cmd.env("BYTEBACK_SERVER", &held)
        .env("BYTEBACK_TEST_POST_COMMIT_WAIT_SECS", "100")
        .env("BYTEBACK_TEST_MAIN_WAIT_SECS", "50");
    let start = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    while s.snapshots().is_empty() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no snapshot"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Past the commit, into the wait for the server, which the signal
    // cuts short (it would last 100 s).
    std::thread::sleep(std::time::Duration::from_secs(1));
    send_signal(child.id(), Signal::TERM);
    let signalled = std::time::Instant::now();
    let status = wait_until(&mut child, start, std::time::Duration::from_secs(60));
    let after = signalled.elapsed();
    for (pid, _) in processes_naming("sleep 311") {
        kill9(pid);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let status = status.unwrap_or_else(|| panic!("HANG: {err}"));
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("the backup was committed"), "{err}");
    let snap = s.snapshots().pop().unwrap();
    assert_eq!(post_env(&s), format!("0|ok|{snap}\n"), "{err}");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect(&err);
    assert_eq!(json["exit_code"], 0, "{json}");
    assert_eq!(json["snapshot"], snap.as_str(), "{json}");
    assert_eq!(json["errors"], serde_json::json!([]), "{json}");
    assert!(
        after < std::time::Duration::from_secs(15),
        "{after:?}: {err}"
    );
}

#[test]
fn a_failing_pre_hook_fails_the_backup_before_anything_is_sent() {
    let s = setup();
    s.hook("pre-backup.d", "10-ok", &s.log_line("10-ok"), 0o755);
    s.hook(
        "pre-backup.d",
        "20-dump",
        "echo starting the dump; echo 'mysqldump: Got error: 2002: cannot connect' >&2; exit 3",
        0o755,
    );
    // As run-parts, the hooks after a failing one still run.
    s.hook("pre-backup.d", "30-after", &s.log_line("30-after"), 0o755);
    record_post_env(&s);
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "pre-backup hook failed, nothing was backed up: pre-backup.d/20-dump exited with \
             status 3; its last output:\n    starting the dump\n    mysqldump: Got error: 2002"
        ),
        "{err}"
    );
    // Its output went through, prefixed.
    assert!(
        err.contains("byteback-backup: pre-backup.d/20-dump: starting the dump\n"),
        "{err}"
    );
    assert_eq!(s.log(), "10-ok\n30-after\n");
    // Nothing was sent: the server never ran for this host.
    assert!(!s.store.join("h").exists(), "{err}");
    // The post hooks ran, told of the failure (they may undo what a pre
    // hook set up).
    assert_eq!(post_env(&s), "1|failed|\n");
}

#[test]
fn post_hooks_see_the_status_and_the_snapshot() {
    let s = setup();
    // A pre hook writes into the source: what it wrote is in the backup.
    s.hook(
        "pre-backup.d",
        "50-dump",
        &format!("echo fresh dump > '{}'", s.src.join("dump.sql").display()),
        0o755,
    );
    record_post_env(&s);
    s.hook("post-backup.d", "20-say", "echo hello from post", 0o755);
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let snaps = s.snapshots();
    assert_eq!(snaps.len(), 1, "{err}");
    assert_eq!(post_env(&s), format!("0|ok|{}\n", snaps[0]));
    assert_eq!(
        fs::read_to_string(s.in_snapshot(&snaps[0], "dump.sql")).unwrap(),
        "fresh dump\n"
    );
    assert!(
        err.contains("byteback-backup: post-backup.d/20-say: hello from post\n"),
        "{err}"
    );
}

/// A hook that reads the terminal, for a backup run by hand on one (here
/// a pseudo-terminal from `script`), finds none: it runs in a session of
/// its own, so its read fails at once. Before, it was stopped by SIGTTIN,
/// silent, and the run waited out the whole --hook-timeout (an hour by
/// default) before calling it timed out.
#[test]
fn a_hook_reading_the_terminal_fails_at_once() {
    let s = setup();
    s.hook(
        "pre-backup.d",
        "20-ask",
        &format!("read x < /dev/tty || exit 7\n{}", s.log_line("read")),
        0o755,
    );
    let line = format!(
        "BYTEBACK_CONFIG_DIR='{}' '{}' --destination '{}' --source '{}' --hostname h \
         --retry-number 0 --hook-timeout 40",
        s.conf.display(),
        bin("byteback-backup").display(),
        s.store.display(),
        s.src.display()
    );
    let start = std::time::Instant::now();
    let o = run_status(
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(std::process::Stdio::null()),
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("20-ask exited with status 7"), "{out}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "{:?}: {out}",
        start.elapsed()
    );
    assert_eq!(s.log(), "");
    assert!(s.snapshots().is_empty());
}

/// A configuration error met during the run (a key that cannot be loaded)
/// exits 2, and is not retried; the post hooks are told 1, failed, so a
/// hook that runs only on success (`!= 1`, as the README says) does not.
#[test]
fn a_configuration_error_exits_2_and_the_hooks_are_told_it_failed() {
    let s = setup();
    record_post_env(&s);
    let o = s.backup_to(
        Path::new("bb@127.0.0.1:"),
        &[
            "--ssh-key",
            "/nonexistent-key",
            "--retry-number",
            "3",
            "-e",
            "60",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("retrying"), "{err}");
    assert_eq!(post_env(&s), "1|failed|\n", "{err}");
}

/// The client blocks SIGTERM, SIGHUP and SIGINT in all its threads (one
/// thread takes them); what it starts, a local store's server and the
/// hooks, gets an empty mask, or an admin's `kill` could not stop them.
#[test]
fn the_server_and_the_hooks_start_with_no_signal_blocked() {
    let s = setup();
    let seen = s.work.join("masks");
    let record = |who: &str| {
        format!(
            "grep SigBlk /proc/$$/status | sed 's/^/{who} /' >> '{}'",
            seen.display()
        )
    };
    s.hook("pre-backup.d", "10-mask", &record("hook"), 0o755);
    let wrapper = s.work.join("server");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{}\nexec '{}' \"$@\"\n",
            record("server"),
            bin("byteback-server").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let o = run_status(
        Command::new(bin("byteback-backup"))
            .env("BYTEBACK_CONFIG_DIR", &s.conf)
            .env("BYTEBACK_SERVER", &wrapper)
            .arg("--destination")
            .arg(&s.store)
            .arg("--source")
            .arg(&s.src)
            .args(["--hostname", "h", "--retry-number", "0"]),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let masks = fs::read_to_string(&seen).unwrap();
    assert_eq!(
        masks,
        "hook SigBlk:\t0000000000000000\nserver SigBlk:\t0000000000000000\n"
    );
}

#[test]
fn a_failing_post_hook_gives_exit_1_but_keeps_the_snapshot() {
    let s = setup();
    s.hook(
        "post-backup.d",
        "10-notify",
        "echo cannot reach the monitoring; exit 5",
        0o755,
    );
    s.hook("post-backup.d", "20-next", &s.log_line("20-next"), 0o755);
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "post-backup hook failed: post-backup.d/10-notify exited with status 5; its last \
             output:\n    cannot reach the monitoring"
        ),
        "{err}"
    );
    assert!(
        err.contains("the backup itself succeeded (exit 0 without the hook)"),
        "{err}"
    );
    assert_eq!(s.log(), "20-next\n");
    let snaps = s.snapshots();
    assert_eq!(snaps.len(), 1, "{err}");
    assert!(s.in_snapshot(&snaps[0], "file").is_file());
}

#[test]
fn only_valid_executables_run_in_byte_order() {
    let s = setup();
    for name in ["20-b", "10-a", "1_c", "B"] {
        s.hook("pre-backup.d", name, &s.log_line(name), 0o755);
    }
    for name in [
        "x.sh",
        "README.md",
        "50-mysql.dpkg-old",
        "50-mysql~",
        ".hidden",
    ] {
        s.hook("pre-backup.d", name, &s.log_line(name), 0o755);
    }
    s.hook("pre-backup.d", "40-noexec", &s.log_line("40-noexec"), 0o644);
    fs::create_dir(s.conf.join("pre-backup.d/60-dir")).unwrap();
    let o = s.backup(&["--verbose"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(s.log(), "10-a\n1_c\n20-b\nB\n");
    for (name, why) in [
        ("x.sh", "its name is not made of A-Z a-z 0-9 _ -"),
        ("README.md", "its name"),
        ("50-mysql.dpkg-old", "its name"),
        ("50-mysql~", "its name"),
        (".hidden", "its name"),
        ("40-noexec", "it is not executable"),
        ("60-dir", "it is not a regular file"),
    ] {
        assert!(
            err.contains(&format!(
                "byteback-backup: pre-backup.d: skipping \"{name}\": {why}"
            )),
            "{name}: {err}"
        );
    }
    // Without --verbose, only executable files left out for their names
    // (most likely meant to run) are named; the rest is silent, as
    // run-parts is.
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("skipping \"x.sh\": its name"), "{err}");
    assert!(
        !err.contains("40-noexec") && !err.contains("60-dir"),
        "{err}"
    );
}

/// A hook runs as root, so one that someone else could have put there or
/// changed (not root's, or writable by its group or others; the same for
/// its directory) is not run, and the backup fails naming it.
#[test]
fn hooks_that_others_could_change_are_not_run() {
    if !require_root("hooks owned by another user") {
        return;
    }
    let s = setup();
    s.hook("pre-backup.d", "10-open", &s.log_line("open"), 0o755);
    let open = s.conf.join("pre-backup.d/10-open");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o757)).unwrap();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is writable by its group or others (mode 0757; `chmod go-w"),
        "{err}"
    );
    assert_eq!(s.log(), "", "it ran: {err}");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&open, Some(1000), None).unwrap();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is owned by uid 1000, not root"), "{err}");
    std::os::unix::fs::chown(&open, Some(0), None).unwrap();
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(s.log(), "open\n");

    // A symlink to a hook whose directory is root's, in a directory a
    // deploy user owns: they could rename the hook's directory away and
    // put their own in its place.
    let deploy = s.work.join("opt-app");
    let hooks = deploy.join("hooks");
    fs::create_dir_all(&hooks).unwrap();
    let real = hooks.join("dump");
    fs::write(&real, format!("#!/bin/sh\n{}\n", s.log_line("linked"))).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&deploy, Some(1000), None).unwrap();
    std::os::unix::fs::symlink(&real, s.conf.join("pre-backup.d/20-linked")).unwrap();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{} above it is not root's (uid 1000",
            deploy.display()
        )),
        "{err}"
    );
    assert_eq!(s.log(), "open\nopen\n", "it ran: {err}");
    std::os::unix::fs::chown(&deploy, Some(0), None).unwrap();
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(s.log().ends_with("linked\n"), "{}", s.log());

    // A root-only hook reached through a symlink in a deploy user's
    // directory: they could swap that symlink between the check and the run.
    let home = s.work.join("home-deploy");
    fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(&real, home.join("link")).unwrap();
    std::os::unix::fs::chown(&home, Some(1000), None).unwrap();
    let hop = s.conf.join("pre-backup.d/20-linked");
    fs::remove_file(&hop).unwrap();
    std::os::unix::fs::symlink(home.join("link"), &hop).unwrap();
    let before = s.log();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the directory of a symlink to it"), "{err}");
    assert_eq!(s.log(), format!("{before}open\n"), "it ran: {err}");
}

#[test]
fn hooks_run_once_however_many_attempts() {
    let s = setup();
    s.hook("pre-backup.d", "10-pre", &s.log_line("pre"), 0o755);
    s.hook("post-backup.d", "10-post", &s.log_line("post"), 0o755);
    record_post_env(&s);
    // A "store" that is a regular file: every attempt fails.
    let bad = s.work.join("not-a-store");
    fs::write(&bad, b"").unwrap();
    let o = s.backup_to(&bad, &["--retry-number", "2", "--retry-delay", "0"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("attempt 2 failed"), "{err}");
    assert_eq!(s.log(), "pre\npost\n");
    assert_eq!(post_env(&s), "1|failed|\n");
}

#[test]
fn a_hanging_pre_hook_is_killed_at_the_timeout() {
    let s = setup();
    s.hook("pre-backup.d", "10-hang", "echo waiting; sleep 120", 0o755);
    let start = Instant::now();
    let o = s.backup(&["--hook-timeout", "1"]);
    let took = start.elapsed();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(
        err.contains("pre-backup.d/10-hang timed out after 1 s and was killed"),
        "{err}"
    );
    assert!(s.snapshots().is_empty());
    let o = s.backup(&["--hook-timeout", "0"]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(stderr(&o).contains("--hook-timeout must be at least 1 second"));
}

/// byteback 1.x command lines and files: `-s a b`, `-x` replacing the
/// default excludes, `/etc/byteback/io_timeout` (a bad one is a usage
/// error naming it), `rsync_filter` applied (tests/filter.rs has the rest), restore's short
/// flags `-l -r -s -a`.
#[test]
fn one_x_command_lines_and_files() {
    let s = setup();
    let a = s.work.join("a");
    let b = s.work.join("b");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("fa"), b"A").unwrap();
    fs::write(b.join("fb"), b"B").unwrap();
    fs::write(b.join("left-out.tmp"), b"T").unwrap();
    fs::write(s.conf.join("rsync_filter"), "- *.tmp\n").unwrap();
    let backup = |extra: &[&str]| {
        run_status(
            Command::new(bin("byteback-backup"))
                .env("BYTEBACK_CONFIG_DIR", &s.conf)
                .arg("--destination")
                .arg(&s.store)
                .args(["--hostname", "h", "--retry-number", "0", "-s"])
                .arg(&a)
                .arg(&b)
                .args(extra),
        )
    };
    let o = backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("rsync_filter"), "{err}");
    let current = s.store.join("h/current");
    assert!(!current
        .join(b.strip_prefix("/").unwrap())
        .join("left-out.tmp")
        .exists());
    assert!(current
        .join(a.strip_prefix("/").unwrap())
        .join("fa")
        .is_file());
    assert!(current
        .join(b.strip_prefix("/").unwrap())
        .join("fb")
        .is_file());

    fs::write(s.conf.join("io_timeout"), "soon\n").unwrap();
    let o = backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("io_timeout") && err.contains("soon"), "{err}");
    // 1.x's rsync took 0 as no timeout: the backup runs, with a limit
    // still, and says so.
    fs::write(s.conf.join("io_timeout"), "0\n").unwrap();
    let o = backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning") && err.contains("io_timeout: 0") && err.contains("10800"),
        "{err}"
    );
    fs::write(s.conf.join("io_timeout"), "300\n").unwrap();
    // An excludes file that cannot be used is an error naming it, never
    // a backup without its excludes.
    fs::write(s.conf.join("excludes"), b"*.tmp\n/home/caf\xe9/\n").unwrap();
    let o = backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("excludes:2: not UTF-8"), "{err}");
    fs::remove_file(s.conf.join("excludes")).unwrap();
    fs::create_dir(s.conf.join("excludes")).unwrap();
    let o = backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read") && err.contains("excludes"),
        "{err}"
    );
    fs::remove_dir(s.conf.join("excludes")).unwrap();
    // rsync's old prefixes: `- ` excludes, `+ ` is refused.
    fs::write(s.conf.join("excludes"), "- fa\n").unwrap();
    let o = backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!current
        .join(a.strip_prefix("/").unwrap())
        .join("fa")
        .exists());
    fs::write(s.conf.join("excludes"), "+ fa\n").unwrap();
    let o = backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("\"+ fa\" is an include rule"), "{err}");
    fs::remove_file(s.conf.join("excludes")).unwrap();
    let o = backup(&["-x", "fb", "nothing-else"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!current
        .join(b.strip_prefix("/").unwrap())
        .join("fb")
        .exists());

    let into = s.work.join("r");
    fs::create_dir_all(&into).unwrap();
    let restore = |args: &[&str]| {
        run_status(
            Command::new(bin("byteback-restore"))
                .current_dir(&into)
                .arg("-d")
                .arg(&s.store)
                .args(["--hostname", "h"])
                .args(args),
        )
    };
    let pat = format!("{}/**", a.display());
    let o = restore(&["-l", "-a", &pat]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("/fa"));
    let snap = fs::read_dir(s.store.join("h"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        .min()
        .unwrap();
    let o = restore(&["-r", "-s", &snap, &pat]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        fs::read(
            into.join(&snap)
                .join(a.strip_prefix("/").unwrap())
                .join("fa")
        )
        .unwrap(),
        b"A"
    );
}

/// Quiet when all is well: `-q` prints nothing on success, the default one
/// summary line; warnings still print with `-q`.
#[test]
fn quiet_runs_print_nothing_and_the_default_one_line() {
    let s = setup();
    let run = |extra: &[&str]| {
        run_status(
            Command::new(bin("byteback-backup"))
                .env("BYTEBACK_CONFIG_DIR", &s.conf)
                .arg("--destination")
                .arg(&s.store)
                .arg("--source")
                .arg(&s.src)
                .args(["--hostname", "h", "--retry-number", "0"])
                .args(extra),
        )
    };
    let o = run(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("taken;") && err.contains("files sent"),
        "{err}"
    );
    let o = run(&["-q"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "a quiet successful run printed something");
    // Hooks that say what they did (as the database hooks do) stay quiet
    // too while they succeed; a failing one's output is shown.
    s.hook(
        "pre-backup.d",
        "10-chatty",
        "echo dumped all databases",
        0o755,
    );
    s.hook("post-backup.d", "10-chatty", "echo done >&2", 0o755);
    let o = run(&["-q"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "",
        "a quiet successful run printed its hooks' notes"
    );
    let o = run(&[]);
    assert!(stderr(&o).contains("pre-backup.d/10-chatty: dumped all databases"));
    s.hook("pre-backup.d", "20-fails", "echo the reason; exit 3", 0o755);
    let o = run(&["-q"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("20-fails exited with status 3") && err.contains("the reason"),
        "{err}"
    );
    fs::remove_file(s.conf.join("pre-backup.d/20-fails")).unwrap();
    fs::write(s.conf.join("rsync_flags"), "--whatever\n").unwrap();
    let o = run(&["-q"]);
    let err = stderr(&o);
    assert!(
        err.contains("warning") && err.contains("rsync_flags"),
        "{err}"
    );
}

/// `/etc/byteback/rsync_flags` as 1.x users wrote it: `--exclude` and
/// `--exclude-from` patterns are applied, `-x` and `-c` too; flags naming
/// what byteback always does are dropped without a warning, and the rest
/// are named, each, in one warning.
#[test]
fn rsync_flags_are_applied_where_byteback_has_an_equivalent() {
    let s = setup();
    fs::write(s.src.join("keep"), b"k").unwrap();
    fs::write(s.src.join("big.iso"), b"iso").unwrap();
    fs::create_dir_all(s.src.join("cache")).unwrap();
    fs::write(s.src.join("cache/x"), b"x").unwrap();
    let list = s.work.join("list");
    fs::write(&list, "# rsync's comments\ncache/\n").unwrap();
    fs::write(s.src.join("wanted.iso"), b"iso").unwrap();
    // One argument a line, as 1.x passed them to rsync after its filter:
    // a `+` rule in rsync_filter comes first.
    fs::write(
        s.conf.join("rsync_flags"),
        format!(
            "-aHAX\n--numeric-ids\n--exclude=*.iso\n--exclude-from={}\n--bwlimit=500\n-c\n-e\nssh\n",
            list.display()
        ),
    )
    .unwrap();
    fs::write(s.conf.join("rsync_filter"), "+ wanted.iso\n").unwrap();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("rsync_flags") && warnings[0].contains("--bwlimit=500 -e ssh"),
        "{err}"
    );
    assert!(!warnings[0].contains("--numeric-ids"), "{err}");
    let stored = s
        .store
        .join("h/current")
        .join(s.src.strip_prefix("/").unwrap());
    assert!(stored.join("keep").is_file());
    assert!(
        !stored.join("big.iso").exists(),
        "--exclude=*.iso not applied"
    );
    assert!(!stored.join("cache").exists(), "--exclude-from not applied");
    assert!(
        stored.join("wanted.iso").is_file(),
        "rsync_filter's + came after the flags"
    );
    // -c: content changed under the same size and mtime is found.
    let keep = s.src.join("keep");
    let m = fs::metadata(&keep).unwrap();
    fs::write(&keep, b"K").unwrap();
    set_mtime(&keep, m.mtime(), m.mtime_nsec());
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        fs::read(stored.join("keep")).unwrap(),
        b"K",
        "-c not applied"
    );
    // A restore (1.x's passed the flags to its rsync too) names what it
    // does not apply, and restores what its patterns select.
    let into = s.work.join("r");
    fs::create_dir_all(&into).unwrap();
    let o = run_status(
        Command::new(bin("byteback-restore"))
            .env("BYTEBACK_CONFIG_DIR", &s.conf)
            .current_dir(&into)
            .arg("--destination")
            .arg(&s.store)
            .args(["--hostname", "h", "--restore", "--snapshot", "current", "/"]),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("not applied to a restore") && err.contains("--exclude=*.iso"),
        "{err}"
    );
    assert!(into
        .join("current")
        .join(s.src.strip_prefix("/").unwrap())
        .join("wanted.iso")
        .is_file());
    // An include flag cannot be ordered with the excludes: an error.
    fs::write(s.conf.join("rsync_flags"), "--include=*.iso\n").unwrap();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("put them in rsync_filter"), "{err}");
    // An --exclude-from file that cannot be read stops the backup.
    fs::write(
        s.conf.join("rsync_flags"),
        format!("--exclude-from={}\n", list.display()),
    )
    .unwrap();
    fs::remove_file(&list).unwrap();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--exclude-from=") && err.contains("cannot read"),
        "{err}"
    );
}

/// Starts a backup with `extra`, waits for `<work>/<marker>` to appear,
/// sends `sig` to byteback (not to the hook, which has a process group of
/// its own), and returns what it printed once it ended.
fn signal_when(s: &Setup, marker: &str, sig: i32, extra: &[&str]) -> Output {
    let mut args = vec!["--retry-number", "0", "--json"];
    args.extend_from_slice(extra);
    let child = s.piped(&s.store, &args).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.work.join(marker).exists() {
        assert!(Instant::now() < deadline, "{marker} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain syscall on a child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    child.wait_with_output().unwrap()
}

/// Waits (at most 60 s) for the marker file a pre-backup hook touches.
fn wait_for_pre_hook(marker: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the pre hook never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Installs `10-slow` in `dir`: it starts a `sleep 100` of its own, writes
/// that child's pid to the first path returned, touches the second, and
/// waits.
fn slow_hook(s: &Setup, dir: &str) -> (PathBuf, PathBuf) {
    let pid = s.work.join("hook-pid");
    let started = s.work.join("started");
    s.hook(
        dir,
        "10-slow",
        &format!(
            "sleep 100 & echo $! > '{}'; touch '{}'; wait",
            pid.display(),
            started.display()
        ),
        0o755,
    );
    (pid, started)
}

fn alive(pid: &str) -> bool {
    fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .is_ok_and(|st| !st.split(") ").nth(1).unwrap_or("").starts_with('Z'))
}

/// SIGTERM or SIGINT during a pre-backup hook (systemctl stop, Ctrl-C)
/// stops that hook's process group, runs the post-backup hooks told of
/// the stop, prints the JSON report and exits 128 + the signal.
#[test]
fn a_backup_stopped_by_a_signal_stops_its_pre_hook_and_runs_the_post_hooks() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let s = setup();
        let (pid, _) = slow_hook(&s, "pre-backup.d");
        s.hook("pre-backup.d", "20-next", &s.log_line("20-next"), 0o755);
        record_post_env(&s);
        let o = signal_when(&s, "started", sig, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{err}");
        assert_eq!(post_env(&s), format!("{code}|failed|\n"), "{err}");
        assert!(err.contains("interrupted (SIG"), "{err}");
        let json = String::from_utf8_lossy(&o.stdout);
        assert!(
            json.contains(&format!("\"exit_code\":{code}")) && json.contains("interrupted"),
            "{json}"
        );
        // The hook's own child was stopped with it; the hooks after it did
        // not run, and nothing was backed up.
        let pid = fs::read_to_string(&pid).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(&pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!alive(&pid), "the pre hook's sleep {pid} still runs");
        assert_eq!(s.log(), "", "a later pre hook ran");
        assert!(s.snapshots().is_empty());
    }
}

/// A signal while the post-backup hooks run (the backup itself has ended)
/// lets them finish; the run ends with the backup's own outcome.
#[test]
fn a_signal_during_the_post_hooks_lets_them_finish() {
    let s = setup();
    let started = s.work.join("started");
    s.hook(
        "post-backup.d",
        "10-slow",
        &format!(
            "touch '{}'; sleep 1; {}",
            started.display(),
            s.log_line("post done $BYTEBACK_STATUS")
        ),
        0o755,
    );
    let o = signal_when(&s, "started", libc::SIGTERM, &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(s.log(), "post done 0\n", "{err}");
    assert!(err.contains("the post-backup hooks finish first"), "{err}");
    assert_eq!(s.snapshots().len(), 1);
}

/// A second signal ends byteback at once, and takes the hook running then
/// along (its process group): it was left running, orphaned, in a session
/// of its own.
#[test]
fn a_second_signal_ends_the_running_hook_too() {
    let s = setup();
    let (pid, started) = slow_hook(&s, "post-backup.d");
    let child = s.piped(&s.store, &["--retry-number", "0"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists()
        || fs::read_to_string(&pid)
            .unwrap_or_default()
            .trim()
            .is_empty()
    {
        assert!(Instant::now() < deadline, "the post hook never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..2 {
        // SAFETY: plain syscall on a child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("again: stopping now"), "{err}");
    let pid = fs::read_to_string(&pid).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(&pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(&pid), "the post hook's sleep {pid} still runs");
}

/// A backup started with `--json` in the background, its hooks seeing
/// `TAG=tag`.
fn spawn_backup(s: &Setup, dest: &Path, tag: &str) -> std::process::Child {
    s.piped(dest, &["--retry-number", "0", "--json"])
        .env("TAG", tag)
        .spawn()
        .unwrap()
}

/// Hooks are the machine's: a backup to a second destination that starts
/// while another runs its hooks waits for that one's post-backup hooks
/// (as 1.x ran one backup at a time), so one run's post hook never tears
/// down what the other's pre hook set up under it. A signal while it
/// waits stops it at once, with no hook run.
#[test]
fn backups_to_two_destinations_run_their_hooks_one_after_the_other() {
    let s = setup();
    let started = s.work.join("a-started");
    s.hook(
        "pre-backup.d",
        "10-setup",
        &format!(
            "{}; [ \"$TAG\" = a ] && touch '{}' && sleep 2; true",
            s.log_line("$TAG pre"),
            started.display()
        ),
        0o755,
    );
    s.hook(
        "post-backup.d",
        "10-teardown",
        &s.log_line("$TAG post"),
        0o755,
    );
    let second = s.work.join("store2");
    store_without_interval(&second);
    let a = spawn_backup(&s, &s.store, "a");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(Instant::now() < deadline, "a's pre hook never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = spawn_backup(&s, &second, "b");
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    let b_err = stderr(&b);
    assert_eq!(b.status.code(), Some(0), "{b_err}");
    assert!(b_err.contains("waiting for it to end"), "{b_err}");
    assert_eq!(s.log(), "a pre\na post\nb pre\nb post\n");

    // Waiting, stopped: nothing of b's hooks runs.
    fs::remove_file(s.work.join("log")).unwrap();
    fs::remove_file(&started).unwrap();
    let a = spawn_backup(&s, &s.store, "a");
    while !started.exists() {
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "a's pre hook never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut b = spawn_backup(&s, &second, "b");
    // Signalled once it says it waits (read as it comes).
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let said = said.clone();
        let mut err = b.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
                if n == 0 {
                    break;
                }
                said.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    while !said.lock().unwrap().contains("waiting for it to end") {
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "b never waited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain syscall on a child's pid.
    assert_eq!(unsafe { libc::kill(b.id() as i32, libc::SIGTERM) }, 0);
    let b = b.wait_with_output().unwrap();
    reader.join().unwrap();
    let a = a.wait_with_output().unwrap();
    let b_err = said.lock().unwrap().clone();
    assert_eq!(b.status.code(), Some(143), "{b_err}");
    assert!(String::from_utf8_lossy(&b.stdout).contains("\"exit_code\":143"));
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    assert_eq!(s.log(), "a pre\na post\n");
}

/// SIGTERM while the data goes over: the transfer is torn down first (no
/// snapshot), then the post-backup hooks run, told of the stop, and the
/// run ends with 143 soon after, not once the data is all sent.
#[test]
fn a_backup_stopped_during_its_transfer_runs_the_post_hooks_after_it() {
    let s = setup();
    let mut rng = Rng::new(31);
    for i in 0..300 {
        fs::write(s.src.join(format!("big{i:03}")), rng.bytes(1 << 20)).unwrap();
    }
    let ready = s.work.join("pre-done");
    s.hook(
        "pre-backup.d",
        "10-ready",
        &format!("touch '{}'", ready.display()),
        0o755,
    );
    record_post_env(&s);
    // What else byteback-backup still runs when the post hooks start (its
    // server, for a local store): nothing, once the transfer is torn down.
    let kids = s.work.join("kids");
    s.hook(
        "post-backup.d",
        "20-kids",
        &format!(
            "cat /proc/$PPID/task/*/children | tr ' ' '\\n' | grep -v -e '^$' -e \"^$$\\$\" | wc -l > '{}'",
            kids.display()
        ),
        0o755,
    );
    let child = s
        .piped(&s.store, &["--retry-number", "3", "--retry-delay", "600"])
        .spawn()
        .unwrap();
    wait_for_pre_hook(&ready);
    std::thread::sleep(Duration::from_millis(200));
    let signalled = Instant::now();
    // SAFETY: plain syscall on a child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(signalled.elapsed() < Duration::from_secs(20), "{err}");
    assert_eq!(post_env(&s), "143|failed|\n", "{err}");
    assert_eq!(
        fs::read_to_string(&kids).unwrap().trim(),
        "0",
        "the server still ran"
    );
    assert!(s.snapshots().is_empty(), "{err}");
    assert!(
        !err.contains("retrying"),
        "a stopped backup was retried: {err}"
    );
}

/// SIGTERM while the server has not answered yet (a local server that
/// never says hello; an SSH server that accepts the connection and says
/// nothing): the wait ends at once, the post-backup hooks run, told of
/// the stop, and the run ends with 143, not after the connect timeout
/// (30 s) or the fallback's wait (60 s).
#[test]
fn a_backup_stopped_before_the_server_answers_ends_at_once() {
    let s = setup();
    let ready = s.work.join("pre-done");
    s.hook(
        "pre-backup.d",
        "10-ready",
        &format!("touch '{}'", ready.display()),
        0o755,
    );
    record_post_env(&s);
    let silent = s.work.join("silent-server");
    let server_pid = s.work.join("server-pid");
    fs::write(
        &silent,
        format!(
            "#!/bin/sh\necho $$ > '{}'\nexec sleep 600\n",
            server_pid.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&silent, fs::Permissions::from_mode(0o755)).unwrap();
    // An SSH "server" that accepts connections and never speaks.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let key = s.conf.join("key");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(made.success());
    let ssh_dest = PathBuf::from(format!("ssh://backup@127.0.0.1:{port}/"));
    for dest in [&s.store, &ssh_dest] {
        let _ = fs::remove_file(&ready);
        let _ = fs::remove_file(s.work.join("post-env"));
        // stderr to a file: the silent server, were it left running,
        // would hold a pipe open.
        let log = s.work.join("stderr");
        let mut child = s
            .piped(dest, &["--retry-number", "0"])
            .env("BYTEBACK_SERVER", &silent)
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for_pre_hook(&ready);
        // Well into the wait for the server.
        std::thread::sleep(Duration::from_millis(1500));
        let signalled = Instant::now();
        // SAFETY: plain syscall on a child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if signalled.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{}: still running 15 s after SIGTERM: {}",
                    dest.display(),
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status.code(), Some(143), "{}: {err}", dest.display());
        assert_eq!(post_env(&s), "143|failed|\n", "{}: {err}", dest.display());
        assert!(err.contains("interrupted (SIGTERM)"), "{err}");
        assert!(s.snapshots().is_empty(), "{err}");
    }
    // The local server was started, and does not outlive the backup.
    let pid = fs::read_to_string(&server_pid).expect("the local server never started");
    assert!(!alive(&pid), "the silent server still runs");
}

/// A hangup ignored when the backup started (`nohup byteback-backup &`
/// in an SSH session that then drops) does not stop it.
#[test]
fn a_hangup_ignored_from_the_start_does_not_stop_the_backup() {
    use std::os::unix::process::CommandExt;
    let s = setup();
    let started = s.work.join("started");
    s.hook(
        "pre-backup.d",
        "10-slow",
        &format!("touch '{}'; sleep 1", started.display()),
        0o755,
    );
    record_post_env(&s);
    let mut cmd = s.piped(&s.store, &["--retry-number", "0"]);
    // SAFETY: only signal(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    wait_for_pre_hook(&started);
    // SAFETY: plain syscall on a child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(post_env(&s).starts_with("0|ok|"), "{}", post_env(&s));
    assert_eq!(s.snapshots().len(), 1);
}

/// Stopped while its stderr is a pipe nobody reads any more (`... 2>&1 |
/// tee log`, and Ctrl-C ended tee too): it still runs the post-backup
/// hooks and ends, instead of hanging for ever.
#[test]
fn a_backup_stopped_with_its_stderr_closed_still_ends() {
    let s = setup();
    let started = s.work.join("started");
    s.hook(
        "pre-backup.d",
        "10-slow",
        &format!("touch '{}'; sleep 30", started.display()),
        0o755,
    );
    record_post_env(&s);
    let mut child = s
        .piped(&s.store, &["--retry-number", "0", "--json", "-v"])
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    drop(child.stdout.take());
    wait_for_pre_hook(&started);
    // SAFETY: plain syscall on a child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("byteback-backup did not end after SIGINT with its stderr closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    assert_eq!(post_env(&s), "130|failed|\n");
}

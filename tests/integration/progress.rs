//! Operations on a terminal and in logs: the progress bar (only on a
//! terminal, or with `--progress`; never with `--no-progress` or in a log),
//! log levels (`-v`, `-vv`, `-q`, `BYTEBACK_LOG`) and journald priority
//! prefixes (when `JOURNAL_STREAM` names stderr).
//!
//! The terminal is a real pseudo-terminal: `script` (util-linux) runs the
//! real binaries on one and records what they wrote to it.

use crate::util;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use util::*;

/// A local store with a byteback.toml that snapshots every run, a source
/// tree and an empty settings directory (so /etc/byteback is never read).
struct Setup {
    _dir: tempfile::TempDir,
    store: PathBuf,
    src: PathBuf,
    conf: PathBuf,
    host: &'static str,
}

impl Setup {
    fn new(store: Option<PathBuf>, host: &'static str) -> Setup {
        let dir = scratch();
        let store = store.unwrap_or_else(|| dir.path().join("store"));
        let src = dir.path().join("src");
        let conf = dir.path().join("conf");
        for d in [&store, &src, &conf] {
            fs::create_dir_all(d).unwrap();
        }
        store_without_interval(&store);
        for i in 0..20 {
            fs::write(src.join(format!("small-{i:02}")), format!("file {i}\n")).unwrap();
        }
        Setup {
            _dir: dir,
            store,
            src,
            conf,
            host,
        }
    }

    /// byteback-backup's command line (store, source, host, no retries).
    fn backup_args(&self) -> Vec<String> {
        vec![
            bin("byteback-backup").display().to_string(),
            "--destination".into(),
            self.store.display().to_string(),
            "--source".into(),
            self.src.display().to_string(),
            "--hostname".into(),
            self.host.into(),
            "--retry-number".into(),
            "0".into(),
        ]
    }

    /// Runs the backup with stderr captured (not a terminal).
    fn backup(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let args = self.backup_args();
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..])
            .args(extra)
            .env("BYTEBACK_CONFIG_DIR", &self.conf)
            .env_remove("BYTEBACK_LOG")
            .env_remove("JOURNAL_STREAM");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_status(&mut cmd)
    }
}

/// Single-quoted for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `args` on a pseudo-terminal (stdin, stdout and stderr all on it)
/// in `cwd`; returns everything written to the terminal and the exit code.
fn on_pty(args: &[String], cwd: &Path, conf: &Path) -> (String, i32) {
    let line: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
    let out = run_status(
        Command::new("script")
            .args(["-qec", &line.join(" "), "/dev/null"])
            .current_dir(cwd)
            .env("TERM", "xterm")
            .env("BYTEBACK_CONFIG_DIR", conf)
            .env_remove("BYTEBACK_LOG")
            .env_remove("JOURNAL_STREAM"),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// No sign of a progress bar: no escape sequence, no carriage return other
/// than the terminal's own `\r\n` line ends.
fn assert_no_progress(text: &str, what: &str) {
    assert!(
        !text.contains('\x1b'),
        "{what}: an escape sequence in {text:?}"
    );
    let bare_cr = text
        .as_bytes()
        .windows(2)
        .any(|w| w[0] == b'\r' && w[1] != b'\n')
        || text.ends_with('\r');
    assert!(!bare_cr, "{what}: a carriage return in {text:?}");
}

/// Whether `s` holds anything but cursor movements (`ESC [ digits letter`) and `\r`.
fn has_printable(s: &str) -> bool {
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                if chars.next() != Some('[') {
                    return true;
                }
                while chars.peek().is_some_and(|c| c.is_ascii_digit()) {
                    chars.next();
                }
                chars.next();
            }
            _ => return true,
        }
    }
    false
}

#[test]
fn backup_and_restore_on_a_terminal_show_progress_and_restore_exactly() {
    if !require_root("progress on a pty, restored exactly") {
        return;
    }
    let fs_ = BtrfsLoop::new(512);
    let setup = Setup::new(Some(fs_.mount.join("store")), "pty-progress");
    let mut rng = Rng::new(0x9e06_2e55);
    fs::create_dir(setup.src.join("rich")).unwrap();
    make_rich_tree(&setup.src.join("rich"), &mut rng);
    // Big enough that the bar is drawn while it is sent.
    fs::write(setup.src.join("big"), rng.bytes(48 << 20)).unwrap();
    // A neighbour of the store and of the restore's target: never touched.
    let neighbour = fs_.mount.join("neighbour");
    fs::create_dir(&neighbour).unwrap();
    let sentinel = Sentinel::plant(&neighbour);
    // The server's prune after the snapshot then says it will not prune (no
    // snapshot is 7 days old): a line from the local server, which must come
    // out whole, above the bar.
    fs::write(
        setup.store.join("byteback.toml"),
        "min_snapshot_interval = 0\nminpercent = 100\nmaxpercent = 100\n",
    )
    .unwrap();

    let (text, code) = on_pty(&setup.backup_args(), &setup.src, &setup.conf);
    assert_eq!(code, 0, "{text}");
    let at = text
        .find("byteback-server: prune: no snapshot is older than 7 days; not pruning (")
        .unwrap_or_else(|| panic!("no line from the server: {text:?}"));
    // Printed on a line of its own: after a line end, or after the bar
    // was cleared (nothing printable since the last clear-line).
    let before = &text[..at];
    let since_clear = before.rsplit("\x1b[2K").next().unwrap_or("");
    assert!(
        before.is_empty()
            || before.ends_with('\n')
            || (before.contains("\x1b[2K") && !has_printable(since_clear)),
        "the server's line was written into the bar: {text:?}"
    );
    // The first frame: the walk has not finished, the totals still grow.
    assert!(text.contains("walking… "), "no walking frame: {text:?}");
    assert!(text.contains("+ files"), "no growing file count: {text:?}");
    // In a frame of the bar, not only in the summary line after it.
    let frames = text
        .rfind("byteback-backup: snapshot ")
        .map_or(&text[..], |at| &text[..at]);
    assert!(frames.contains(" on the wire"), "no wire bytes: {text:?}");
    assert!(text.contains("\x1b["), "no cursor movement: {text:?}");
    // The summary line still comes, after the bar is cleared.
    assert!(
        text.contains("byteback-backup: snapshot "),
        "no summary: {text:?}"
    );
    sentinel.assert_untouched();

    // Restore on the terminal too: its own bar, and the tree comes back exact.
    let into = fs_.mount.join("into");
    fs::create_dir(&into).unwrap();
    let mut restore = vec![
        bin("byteback-restore").display().to_string(),
        "--destination".into(),
        setup.store.display().to_string(),
        "--hostname".into(),
        setup.host.into(),
        "--restore".into(),
        "--target".into(),
        into.display().to_string(),
    ];
    restore.push(setup.src.display().to_string());
    let (text, code) = on_pty(&restore, &into, &setup.conf);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("entries restored"),
        "no restore progress: {text:?}"
    );
    assert!(text.contains("restored "), "no summary: {text:?}");
    let snap = snapshots(&setup.store, setup.host)
        .pop()
        .expect("no snapshot");
    let restored = into.join(&snap).join(setup.src.strip_prefix("/").unwrap());
    assert_same_tree(&setup.src, &restored);
    sentinel.assert_untouched();
}

#[test]
fn no_progress_in_logs_or_with_no_progress() {
    let setup = Setup::new(None, "no-progress");
    fs::write(setup.src.join("data"), vec![7u8; 3 << 20]).unwrap();
    // stderr is a pipe: a log, not a terminal.
    let o = setup.backup(&[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("byteback-backup: snapshot "));
    assert_no_progress(&stderr(&o), "stderr a pipe");
    // Unless asked for.
    let o = setup.backup(&["--progress"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("walking… "), "{}", stderr(&o));
    // A terminal, but --no-progress.
    let mut args = setup.backup_args();
    args.push("--no-progress".into());
    let (text, code) = on_pty(&args, &setup.src, &setup.conf);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("byteback-backup: snapshot "), "{text:?}");
    assert_no_progress(&text, "--no-progress on a pty");
    // A terminal and -q: nothing at all.
    let mut args = setup.backup_args();
    args.push("-q".into());
    let (text, code) = on_pty(&args, &setup.src, &setup.conf);
    assert_eq!(code, 0, "{text}");
    assert_eq!(text, "", "-q on a pty printed something");
}

#[test]
fn log_levels_follow_v_and_byteback_log() {
    let setup = Setup::new(None, "log-levels");
    let file = setup.src.join("small-07").display().to_string();
    // An rsync flag byteback has no equivalent for: one warning on every run.
    fs::write(setup.conf.join("rsync_flags"), "--bwlimit=100\n").unwrap();

    let plain = stderr(&setup.backup(&[], &[]));
    assert!(plain.contains("byteback-backup: snapshot "), "{plain}");
    assert!(plain.contains("byteback-backup: warning: /"), "{plain}");
    assert!(!plain.lines().any(|l| l == file), "{plain}");
    assert!(!plain.contains("connecting to"), "{plain}");

    // -v: every file sent, as a bare path, and debug lines.
    fs::write(setup.src.join("small-07"), "changed\n").unwrap();
    let v = stderr(&setup.backup(&["-v"], &[]));
    assert!(v.lines().any(|l| l == file), "{v}");
    assert!(v.contains("byteback-backup: connecting to "), "{v}");
    assert!(!v.contains("the server needs"), "{v}");
    // BYTEBACK_LOG=debug is -v.
    fs::write(setup.src.join("small-07"), "changed again\n").unwrap();
    let d = stderr(&setup.backup(&[], &[("BYTEBACK_LOG", "debug")]));
    assert!(d.lines().any(|l| l == file), "{d}");
    // -vv: trace lines too.
    let vv = stderr(&setup.backup(&["-vv"], &[]));
    assert!(vv.contains("the server needs"), "{vv}");

    // BYTEBACK_LOG=warn: the warning, not the info line.
    let o = setup.backup(&[], &[("BYTEBACK_LOG", "warn")]);
    assert_eq!(o.status.code(), Some(0));
    let w = stderr(&o);
    assert!(w.contains("byteback-backup: warning: /"), "{w}");
    assert!(!w.contains("snapshot "), "{w}");
    // -q: the same.
    let q = stderr(&setup.backup(&["-q"], &[]));
    assert!(q.contains("warning: /"), "{q}");
    assert!(!q.contains("snapshot "), "{q}");
    // A level that is none: a usage error naming it, nothing backed up.
    let o = setup.backup(&[], &[("BYTEBACK_LOG", "loud")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("BYTEBACK_LOG=loud is not a log level"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn under_systemd_lines_carry_priorities() {
    let setup = Setup::new(None, "journal");
    fs::write(setup.conf.join("rsync_flags"), "-W\n").unwrap();
    let log_dir = scratch();
    let log = log_dir.path().join("journal");
    let run = |journal_stream: &dyn Fn(&fs::Metadata) -> String| -> String {
        let f = fs::File::create(&log).unwrap();
        let md = f.metadata().unwrap();
        let args = setup.backup_args();
        let st = run_status(
            Command::new(&args[0])
                .args(&args[1..])
                .env("BYTEBACK_CONFIG_DIR", &setup.conf)
                .env_remove("BYTEBACK_LOG")
                .env("JOURNAL_STREAM", journal_stream(&md))
                .stderr(f),
        );
        assert_eq!(st.status.code(), Some(0));
        fs::read_to_string(&log).unwrap()
    };
    // JOURNAL_STREAM names stderr: every line has its priority.
    let text = run(&|md| format!("{}:{}", md.dev(), md.ino()));
    assert!(text.contains("<4>byteback-backup: warning: /"), "{text}");
    assert!(text.contains("<6>byteback-backup: snapshot "), "{text}");
    for line in text.lines() {
        assert!(
            line.len() > 3 && line.starts_with('<') && line.as_bytes()[2] == b'>',
            "line without a priority: {line:?} in {text}"
        );
    }
    // Set, but stderr is another file (redirected by a script): plain lines.
    let text = run(&|md| format!("{}:{}", md.dev(), md.ino() + 1));
    assert!(text.contains("byteback-backup: snapshot "), "{text}");
    assert!(!text.contains("<6>") && !text.contains("<4>"), "{text}");
}

#[test]
fn prune_shows_a_spinner_only_when_asked_or_on_a_terminal() {
    let setup = Setup::new(None, "prune-spin");
    let o = setup.backup(&[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let prune = |extra: &[&str]| {
        run_status(
            Command::new(bin("byteback-prune"))
                .args(["--prune", "--minpercent", "0", "--maxpercent", "0"])
                .arg("--store")
                .arg(&setup.store)
                .args(extra),
        )
    };
    let o = prune(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_no_progress(&stderr(&o), "prune, stderr a pipe");
    let o = prune(&["--progress"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("pruning: "), "{}", stderr(&o));
    // Nothing was deleted: the one snapshot is still there.
    snapshots(&setup.store, setup.host)
        .pop()
        .expect("no snapshot");

    // The pruner's own lines carry priorities under the journal too.
    let log_dir = scratch();
    let log = log_dir.path().join("journal");
    let f = fs::File::create(&log).unwrap();
    let md = f.metadata().unwrap();
    let o = run_status(
        Command::new(bin("byteback-prune"))
            .args(["--prune", "--minpercent", "0", "--maxpercent", "0", "-v"])
            .arg("--store")
            .arg(&setup.store)
            .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
            .env_remove("BYTEBACK_LOG")
            .stderr(f),
    );
    assert_eq!(o.status.code(), Some(0));
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("<6>byteback-prune: "), "{text}");
    assert!(text.lines().all(|l| l.starts_with("<6>")), "{text}");
}

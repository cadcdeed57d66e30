//! `/etc/byteback/rsync_filter` against real rsync as the oracle, and
//! `--snapshot` globs: real `byteback-backup` / `byteback-restore` processes
//! with `BYTEBACK_CONFIG_DIR` pointing at a private settings directory.

use crate::util;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    Setup(site)
}

fn p(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

fn put(root: &Path, rel: &[u8], data: &[u8]) {
    let f = p(root, rel);
    fs::create_dir_all(f.parent().unwrap()).unwrap();
    fs::write(f, data).unwrap();
}

/// Restores the source of the newest snapshot and checks it is `want`
/// (rsync's copy), both ways.
fn restores_as(s: &Setup, want: &Path) {
    let snap = snapshots(&s.store, "h").pop().expect("a snapshot");
    let into = s.work.join("restored");
    fs::create_dir_all(&into).unwrap();
    let o = s.restore(&[
        OsStr::new("--restore"),
        OsStr::new("--target"),
        into.as_os_str(),
        s.src.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let got = into.join(&snap).join(s.src.strip_prefix("/").unwrap());
    assert_same_tree(want, &got);
    assert_same_tree(&got, want);
}

impl Setup {
    fn backup(&self, extra: &[&OsStr]) -> Output {
        run_status(
            Command::new(bin("byteback-backup"))
                .env("BYTEBACK_CONFIG_DIR", &self.conf)
                .arg("--destination")
                .arg(&self.store)
                .args(["--hostname", "h", "--retry-number", "0", "--source"])
                .arg(&self.src)
                .args(extra),
        )
    }

    fn restore(&self, args: &[&OsStr]) -> Output {
        run_status(
            Command::new(bin("byteback-restore"))
                .env("BYTEBACK_CONFIG_DIR", &self.conf)
                .current_dir(&self.work)
                .arg("--destination")
                .arg(&self.store)
                .args(["--hostname", "h"])
                .args(args),
        )
    }

    /// A pre-backup hook that leaves a marker: whether the backup started.
    fn marker_hook(&self) -> PathBuf {
        let marker = self.work.join("hook-ran");
        let d = self.conf.join("pre-backup.d");
        fs::create_dir_all(&d).unwrap();
        let hook = d.join("10-marker");
        fs::write(&hook, format!("#!/bin/sh\ntouch '{}'\n", marker.display())).unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        marker
    }
}

/// The tree of the oracle test: every name the rules below decide about.
fn build_tree(src: &Path) {
    for (rel, data) in [
        (&b"a b/file one.txt"[..], &b"kept"[..]),
        (b"a b/x.tmp", b"- *.tmp"),
        (b"tmpkeep/y.tmp", b"+ /.../tmpkeep/***"),
        (b"tmpkeep/sub/z.tmp", b"+ /.../tmpkeep/***"),
        (b"star*dir/f*", b"- star\\*dir/f\\*"),
        (b"star*dir/g", b"kept"),
        (b"caf\xe9.tmp", b"- *.tmp, non-UTF-8"),
        (b"k\xe9ep", b"kept, non-UTF-8"),
        (b"\xff\xfe/inner", b"- \\xff\\xfe/"),
        (b"deep/er/drop.log", b"- deep/**/drop.log"),
        (b"deep/er/est/keep.log", b"kept"),
        (b"deep/drop.log", b"kept: ** needs a directory here"),
        (b"cache/f", b"- cache/"),
        (b"x/cache", b"kept: a file, not a directory"),
        (b"12.dat", b"- [0-9][0-9].dat"),
        (b"1a.dat", b"kept"),
        (b"a.q", b"- ?.q"),
        (b"ab.q", b"kept"),
        (b"anch1", b"- /.../src/anch*"),
        (b"x/anch2", b"kept: anchored rule"),
        (b"secret-shown", b"S secret-shown"),
        (b"secret-hidden", b"H secret*"),
        (b"old.bak", b"merged: - *.bak"),
        (b"by-x", b"excluded by -x before the filter's + by-x"),
        (b"trail ", b"kept: trailing space"),
        (b"proj/.rsync-filter", b"+ important.o\n- *.o\n- /build/\n"),
        (b"proj/a.o", b"- *.o"),
        (b"proj/important.o", b"+ important.o"),
        (b"proj/build/out", b"- /build/ anchored at proj"),
        (b"proj/sub/build/out", b"kept"),
        (b"proj/sub/.rsync-filter", b"+ *.o\n"),
        (b"proj/sub/b.o", b"+ *.o of sub comes first"),
        (b"proj/.excl", b"only-here\n"),
        (b"proj/only-here", b"- from .excl"),
        (b"proj/sub/only-here", b"kept: n = not inherited"),
        (b"proj/clr/.rsync-filter", b"- z\n!\n- y\n"),
        (b"proj/clr/c.o", b"kept: inherited rules cleared"),
        (b"proj/clr/z", b"kept: cleared"),
        (b"proj/clr/y", b"- y"),
        (b"from-parent", b"- from-parent in ../.fr"),
        (b"sub2/from-parent", b"- from-parent in ../.fr, inherited"),
        (b"anch-fr", b"- /src/anch-fr in ../.fr"),
        (b"sub2/anch-fr", b"kept: anchored at ../"),
    ] {
        put(src, rel, data);
    }
    set_mtime(&src.join("a b/file one.txt"), 1_700_000_000, 123_456_789);
}

fn filter_file(s: &Setup) -> Vec<u8> {
    let abs = s.src.as_os_str().as_bytes();
    let more = s.work.join("more-rules");
    fs::write(&more, "# merged\n- *.bak\n").unwrap();
    let mut f: Vec<u8> = vec![];
    f.extend_from_slice(b"# byteback 1.x style filter file\n; both comment styles\n\nexclude no-such-name\n+ nor-this\n");
    f.extend_from_slice(b"+ by-x\nP /protected\ninclude ");
    f.extend_from_slice(abs);
    f.extend_from_slice(b"/tmpkeep/***\nexclude *.tmp\n- star\\*dir/f\\*\n- \xff\xfe/\n");
    f.extend_from_slice(b"- deep/**/drop.log\n- cache/\n- [0-9][0-9].dat\n- ?.q\n- ");
    f.extend_from_slice(abs);
    f.extend_from_slice(b"/anch*\nS secret-shown\nH secret*\nmerge ");
    f.extend_from_slice(more.as_os_str().as_bytes());
    f.extend_from_slice(b"\n: .rsync-filter\ndir-merge,ne- .excl\ndir-merge /.fr\n");
    // rsync's -F form: read in / and every directory above the source too.
    fs::write(s.work.join(".fr"), "- from-parent\n- /src/anch-fr\n").unwrap();
    f
}

/// rsync itself (as 1.x ran it: `--relative`, its `--exclude`s, then
/// `--filter='merge rsync_filter'`) and byteback with the same files give the
/// same tree, byte for byte and with the same metadata.
#[test]
fn rsync_filter_selects_exactly_what_rsync_selects() {
    if !require_root("rsync_filter_selects_exactly_what_rsync_selects") {
        return;
    }
    let s = setup();
    build_tree(&s.src);
    let filter = filter_file(&s);
    let filter_path = s.conf.join("rsync_filter");
    fs::write(&filter_path, &filter).unwrap();
    let by_x = s.src.join("by-x");

    let oracle = s.work.join("rsync");
    fs::create_dir_all(&oracle).unwrap();
    let mut merge = std::ffi::OsString::from("merge ");
    merge.push(&filter_path);
    run(Command::new("rsync")
        // Nanosecond mtimes: otherwise rsync leaves a directory made in
        // the same second as its source with the time it was made.
        .args(["-aHAX", "--numeric-ids", "--modify-window=-1", "--relative"])
        .arg("--exclude")
        .arg(&by_x)
        .arg("--filter")
        .arg(&merge)
        .arg(&s.src)
        .arg(format!("{}/", oracle.display())));
    let want = oracle.join(s.src.strip_prefix("/").unwrap());
    // The oracle did what the rules say (so the comparison cannot pass by
    // both sides keeping everything).
    for rel in [
        &b"a b/x.tmp"[..],
        b"star*dir/f*",
        b"caf\xe9.tmp",
        b"\xff\xfe",
        b"deep/er/drop.log",
        b"cache",
        b"12.dat",
        b"a.q",
        b"anch1",
        b"secret-hidden",
        b"old.bak",
        b"by-x",
        b"proj/a.o",
        b"proj/build",
        b"proj/.excl",
        b"proj/only-here",
        b"proj/clr/y",
        b"from-parent",
        b"sub2/from-parent",
        b"anch-fr",
    ] {
        assert!(!p(&want, rel).exists(), "rsync kept {}", rel.escape_ascii());
    }
    for rel in [
        &b"a b/file one.txt"[..],
        b"tmpkeep/sub/z.tmp",
        b"star*dir/g",
        b"k\xe9ep",
        b"deep/drop.log",
        b"deep/er/est/keep.log",
        b"x/cache",
        b"secret-shown",
        b"trail ",
        b"proj/.rsync-filter",
        b"proj/important.o",
        b"proj/sub/build/out",
        b"proj/sub/b.o",
        b"proj/sub/only-here",
        b"proj/clr/c.o",
        b"proj/clr/z",
        b"sub2/anch-fr",
    ] {
        assert!(
            p(&want, rel).exists(),
            "rsync left out {}",
            rel.escape_ascii()
        );
    }

    let o = s.backup(&[OsStr::new("-x"), by_x.as_os_str()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("rsync_filter:7") && err.contains("has no effect"),
        "the P rule is named in a note: {err}"
    );
    restores_as(&s, &want);
}

/// An unsupported rule in `rsync_filter` stops the backup before anything
/// runs (exit 2, the file and line named, no hook run, nothing stored); one in
/// a per-directory file found during the walk fails the backup (exit 1, named)
/// and commits nothing.
#[test]
fn unsupported_filter_rules_stop_the_backup_naming_file_and_line() {
    if !require_root("unsupported_filter_rules_stop_the_backup_naming_file_and_line") {
        return;
    }
    let s = setup();
    put(&s.src, b"f", b"data");
    let marker = s.marker_hook();
    fs::write(s.conf.join("rsync_filter"), "- *.tmp\n-C cvs-style\n").unwrap();
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("rsync_filter:2:"), "{err}");
    assert!(err.contains("modifier 'C'"), "{err}");
    assert!(!marker.exists(), "a pre-backup hook ran");
    assert!(!s.store.join("h").exists(), "something was stored");

    for bad in ["foo\n", "dir-merge a/b\n", "-C x\n"] {
        fs::write(s.conf.join("rsync_filter"), bad).unwrap();
        let o = s.backup(&[]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("rsync_filter:1:"), "{}", stderr(&o));
    }
    assert!(!s.store.join("h").exists());

    // Found during the walk: the backup fails, naming the file and line.
    fs::write(s.conf.join("rsync_filter"), ": .rsync-filter\n").unwrap();
    put(&s.src, b"d/.rsync-filter", b"- ok\nwhat is this\n");
    put(&s.src, b"d/g", b"data");
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let named = format!("{}:2:", s.src.join("d/.rsync-filter").display());
    assert!(err.contains(&named), "{named} in {err}");
    assert!(snapshots(&s.store, "h").is_empty(), "a snapshot was taken");
    // A symlink is never followed.
    fs::remove_file(s.src.join("d/.rsync-filter")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", s.src.join("d/.rsync-filter")).unwrap();
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("symlink"), "{}", stderr(&o));
    assert!(snapshots(&s.store, "h").is_empty());
    fs::remove_file(s.src.join("d/.rsync-filter")).unwrap();
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(snapshots(&s.store, "h").len(), 1);

    // One a user could have written (theirs, or in a directory others may
    // write to) never fails the backup of the machine: its directory is
    // kept as the last backup has it, named in a warning (exit 24), and
    // everything else is backed up.
    let stored = s
        .store
        .join("h/current")
        .join(s.src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(stored.join("d/g")).unwrap(), b"data");
    for (i, how) in [
        "a user's file",
        "root's, in a directory others may write to",
    ]
    .iter()
    .enumerate()
    {
        put(&s.src, b"d/.rsync-filter", b"- ok\nwhat is this\n");
        if i == 0 {
            std::os::unix::fs::lchown(s.src.join("d/.rsync-filter"), Some(65534), Some(65534))
                .unwrap();
        } else {
            fs::set_permissions(s.src.join("d"), fs::Permissions::from_mode(0o777)).unwrap();
        }
        put(&s.src, b"d/g", format!("changed {i}").as_bytes());
        put(&s.src, format!("new{i}").as_bytes(), b"new");
        let o = s.backup(&[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(24), "{how}: {err}");
        let named = format!("{}:2:", s.src.join("d/.rsync-filter").display());
        assert!(
            err.contains(&named)
                && err.contains("the directory's content is kept as the last backup has it"),
            "{how}: {err}"
        );
        assert_eq!(fs::read(stored.join("d/g")).unwrap(), b"data", "{how}");
        assert_eq!(
            fs::read(stored.join(format!("new{i}"))).unwrap(),
            b"new",
            "{how}"
        );
        fs::remove_file(s.src.join("d/.rsync-filter")).unwrap();
    }
}

/// A user's per-directory filter file whose wildcard rules would cost more
/// than the walk's bound to match against each entry below it: its
/// directory is kept as the last backup has it (exit 24, named), the rest
/// is backed up; the same rules in root's file in root's directory are the
/// admin's and apply; a user's few wildcard rules apply as they are.
#[test]
fn a_users_costly_filter_rules_pass_over_their_directory_only() {
    if !require_root("a_users_costly_filter_rules_pass_over_their_directory_only") {
        return;
    }
    let s = setup();
    fs::write(s.conf.join("rsync_filter"), ": .rsync-filter\n").unwrap();
    put(&s.src, b"u/f", b"first");
    put(&s.src, b"u/skip.o", b"object");
    put(&s.src, b"other", b"first");
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let stored = s
        .store
        .join("h/current")
        .join(s.src.strip_prefix("/").unwrap());

    // 2,000 rules of 16 tokens: about 5,000 steps each against a path
    // below u/, 10 million an entry, ten times the bound.
    let costly: String = (0..2000)
        .map(|i| format!("- **/{i}*a*b*c*d*e*\n"))
        .collect();
    put(&s.src, b"u/.rsync-filter", costly.as_bytes());
    let user = |p: &Path| std::os::unix::fs::lchown(p, Some(65534), Some(65534)).unwrap();
    user(&s.src.join("u/.rsync-filter"));
    put(&s.src, b"u/f", b"second");
    put(&s.src, b"other", b"second");
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("steps of matching an entry")
            && err.contains("the directory's content is kept as the last backup has it")
            && err.contains(&*s.src.join("u").to_string_lossy()),
        "{err}"
    );
    assert_eq!(fs::read(stored.join("u/f")).unwrap(), b"first");
    assert_eq!(fs::read(stored.join("other")).unwrap(), b"second");

    // Root's file, in root's directory: the admin's rules, whatever they cost.
    std::os::unix::fs::lchown(s.src.join("u/.rsync-filter"), Some(0), Some(0)).unwrap();
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(fs::read(stored.join("u/f")).unwrap(), b"second");

    // Root's file above the source (read as rsync --relative reads the
    // parents of the transfer) is the admin's too; writable by others,
    // it is not, and the source is passed over.
    fs::remove_file(s.src.join("u/.rsync-filter")).unwrap();
    let above = s.src.parent().unwrap().join(".rsync-filter");
    fs::write(&above, costly.as_bytes()).unwrap();
    put(&s.src, b"other", b"third");
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "root's, above: {}", stderr(&o));
    assert_eq!(fs::read(stored.join("other")).unwrap(), b"third");
    fs::set_permissions(&above, fs::Permissions::from_mode(0o666)).unwrap();
    put(&s.src, b"other", b"fourth");
    let o = s.backup(&[]);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(24),
        "writable by others, above: {err}"
    );
    assert!(err.contains("steps of matching an entry"), "{err}");
    assert_eq!(fs::read(stored.join("other")).unwrap(), b"third");
    fs::remove_file(&above).unwrap();

    // A user's few wildcard rules apply.
    put(&s.src, b"u/.rsync-filter", b"- *.o\n- **/x*y*z\n");
    user(&s.src.join("u/.rsync-filter"));
    put(&s.src, b"u/f", b"third");
    let o = s.backup(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(fs::read(stored.join("u/f")).unwrap(), b"third");
    assert!(!stored.join("u/skip.o").exists(), "the user's rule applies");
}

/// `--snapshot` with a glob, as 1.x scripts pass it: the matching snapshots
/// only, latest version per path among them (every version with `--all`); a
/// glob matching nothing is an error counting the snapshots; a glob that
/// cannot be a snapshot name is refused before connecting.
#[test]
fn snapshot_globs_select_the_matching_snapshots() {
    if !require_root("snapshot_globs_select_the_matching_snapshots") {
        return;
    }
    let s = setup();
    let wrapper = server_wrapper(&s.work);
    let days = [
        ("2026-10-15T12:00:00Z", "october"),
        ("2026-11-05T12:00:00Z", "november-1"),
        ("2026-11-20T12:00:00Z", "november-2"),
    ];
    for (i, (now, v)) in days.iter().enumerate() {
        put(&s.src, b"v", v.as_bytes());
        set_mtime(&s.src.join("v"), 1_780_000_000 + i as i64, 0);
        if i == 0 {
            put(&s.src, b"only-october", b"gone after october");
        } else {
            let _ = fs::remove_file(s.src.join("only-october"));
        }
        let o = run_status(
            Command::new(bin("byteback-backup"))
                .env("BYTEBACK_CONFIG_DIR", &s.conf)
                .env("BYTEBACK_SERVER", &wrapper)
                .env("BYTEBACK_TEST_NOW", now)
                .arg("--destination")
                .arg(&s.store)
                .args(["--hostname", "h", "--retry-number", "0", "--source"])
                .arg(&s.src),
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    let snaps = snapshots(&s.store, "h");
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    assert!(snaps[0].starts_with("2026-10-15") && snaps[2].starts_with("2026-11-20"));
    let v = s.src.join("v");
    let list = |glob: &str, all: bool| {
        let mut args = vec![
            OsStr::new("--list"),
            OsStr::new("--snapshot"),
            OsStr::new(glob),
        ];
        if all {
            args.push(OsStr::new("--all"));
        }
        args.push(s.src.as_os_str());
        s.restore(&args)
    };
    let o = list("2026-11-*", false);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with(&*v.to_string_lossy()))
        .collect();
    assert_eq!(v_lines.len(), 1, "{out}");
    assert!(v_lines[0].starts_with(&snaps[2]), "{out}");
    assert!(
        !out.contains("only-october") && !out.contains(&snaps[0]),
        "{out}"
    );
    let o = list("2026-11-*", true);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let v_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with(&*v.to_string_lossy()))
        .collect();
    assert_eq!(v_lines.len(), 2, "{out}");
    let o = list("2026-1[!1]-*", false);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("only-october") && !out.contains(&snaps[1]),
        "{out}"
    );

    // Restore: each path from the newest matching snapshot.
    let into = s.work.join("restored");
    fs::create_dir_all(&into).unwrap();
    let o = s.restore(&[
        OsStr::new("--restore"),
        OsStr::new("--snapshot"),
        OsStr::new("2026-11-?5T*"),
        OsStr::new("--target"),
        into.as_os_str(),
        s.src.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let got = into.join(&snaps[1]).join(v.strip_prefix("/").unwrap());
    assert_eq!(fs::read(&got).unwrap(), b"november-1");
    let names: Vec<_> = fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(&snaps[1])]);

    let o = list("2025-*", false);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no snapshot matches") && err.contains("there are 3 snapshots"),
        "{err}"
    );
    for bad in ["*/../*", "[2026", "2026 *"] {
        let o = list(bad, false);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("--snapshot"), "{}", stderr(&o));
    }
}

/// A source that a rule of `rsync_filter` leaves out whole (as rsync
/// `--relative` applied the rules to the source itself) is named in a
/// warning: the user asked for it, and nothing of it is backed up. The
/// other sources are backed up.
#[test]
fn a_source_left_out_whole_by_a_filter_rule_is_warned_about() {
    let s = setup();
    put(&s.src, b"kept", b"kept");
    let other = s.work.join("other");
    put(&other, b"f", b"left out");
    fs::write(
        s.conf.join("rsync_filter"),
        format!("- {}\n", other.display()),
    )
    .unwrap();
    let o = s.backup(&[OsStr::new("--source"), other.as_os_str()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let warning = format!("source {} is left out whole by a rule", other.display());
    assert!(err.contains(&warning), "{err}");
    let cur = s.store.join("h/current");
    assert!(cur
        .join(s.src.strip_prefix("/").unwrap())
        .join("kept")
        .is_file());
    assert!(!cur.join(other.strip_prefix("/").unwrap()).exists());
}

/// As 1.x, which made each run of slashes in its `-x` patterns one:
/// `-x $PREFIX/cache` with `PREFIX=/var/` leaves out /var/cache.
#[test]
fn doubled_slashes_in_an_exclude_are_one() {
    let s = setup();
    put(&s.src, b"kept/f", b"kept");
    put(&s.src, b"cache/f", b"left out");
    let x = format!("{}//cache/", s.src.display());
    let o = s.backup(&[OsStr::new("-x"), OsStr::new(&x)]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let cur = s
        .store
        .join("h/current")
        .join(s.src.strip_prefix("/").unwrap());
    assert!(cur.join("kept/f").is_file(), "{err}");
    assert!(!cur.join("cache").exists(), "{err}");
}

/// The excludes (`-x`, `/etc/byteback/excludes`) with rsync's matching, and
/// the filter rules rsync reads differently from a first reading: rsync
/// itself, run as 1.x ran it (`--exclude`s, `--exclude-from`, then
/// `--filter='merge rsync_filter'`), and byteback with the same settings
/// back up the same tree. Each name below was once backed up by one and
/// not the other.
#[test]
fn excludes_and_filter_corners_select_exactly_what_rsync_selects() {
    if !require_root("excludes_and_filter_corners_select_exactly_what_rsync_selects") {
        return;
    }
    let s = setup();
    for (rel, why) in [
        (&b"back\\slash"[..], &b"- back\\slash: literal"[..]),
        (b"backslash", b"kept"),
        (b"{p,q}", b"- {p,q}: no braces"),
        (b"p", b"kept"),
        (b"a.{o,txt}", b"- *.{o,txt}"),
        (b"a.o", b"kept"),
        (b"foo/bar/f", b"kept: ** needs a directory"),
        (b"foo/x/bar/f", b"- foo/**/bar"),
        (b" lead", b"- ' lead'"),
        (b"lead", b"kept"),
        (b"trail ", b"- 'trail ' in the excludes file"),
        (b"trail", b"kept"),
        (b"cr", b"- cr, a CRLF line"),
        (b"cr\r", b"kept"),
        (b"[abc", b"kept: [abc matches nothing"),
        (b"tri/f", b"- tri/***, the directory too"),
        (b"regfile", b"kept: regfile/*** is for a directory"),
        (b"regdir/f", b"- regfile/***"),
        (b"sub/abs", b"-/ abs: a name"),
        (b"x.rs", b"-rs *.rs"),
        (b"m1", b"- m1 in a merge,- file"),
        (b"m2", b"- m2 after a '!' pattern there"),
        (b"par", b"- par in ../.ff"),
        (b"sub/par2", b"- /src/sub/par2 in ../.ff"),
        (b"d/x/f", b"- */x: a / in the literal tail"),
        (b"d/xx/f", b"kept"),
    ] {
        put(&s.src, rel, why);
    }
    std::os::unix::fs::symlink("target", s.src.join("regsym")).unwrap();
    // A second source, left out whole by an exclude naming it.
    let other = s.work.join("other");
    put(&other, b"f", b"- other/");
    // A third source inside it: walked still, as rsync sends it.
    let inner = other.join("inner");
    put(&inner, b"g", b"a source inside an excluded one");
    // And a source inside it holding another: walked whole.
    let inner2 = other.join("b/inner2");
    put(&inner2, b"keepme", b"in a source holding another");
    let deep = inner2.join("deep");
    put(&deep, b"h", b"in the deepest source");
    fs::write(s.work.join(".ff"), "- par\n- /src/sub/par2\n").unwrap();
    let merged = s.work.join("merged");
    fs::write(&merged, "m1\n!\nm2\n").unwrap();
    let filter_path = s.conf.join("rsync_filter");
    fs::write(
        &filter_path,
        format!(
            "- regfile/***\n- regsym/***\n- regdir/***\n-/ abs\n-rs *.rs\n.- {}\n: .ff\n- /\n",
            merged.display()
        ),
    )
    .unwrap();
    let excludes_path = s.conf.join("excludes");
    fs::write(&excludes_path, "# comment\ntrail \ncr\r\n").unwrap();
    let xs = [
        "back\\slash",
        "{p,q}",
        "*.{o,txt}",
        "foo/**/bar",
        " lead",
        "tri/***",
        "[abc",
        "other/",
        "*/x",
    ];

    let oracle = s.work.join("rsync");
    fs::create_dir_all(&oracle).unwrap();
    let mut rsync = Command::new("rsync");
    rsync.args(["-aHAX", "--numeric-ids", "--modify-window=-1", "--relative"]);
    for x in xs {
        rsync.arg("--exclude").arg(x);
    }
    let mut merge = std::ffi::OsString::from("merge ");
    merge.push(&filter_path);
    run(rsync
        .arg("--exclude-from")
        .arg(&excludes_path)
        .arg("--filter")
        .arg(&merge)
        .arg(&s.src)
        .arg(&other)
        .arg(&inner)
        .arg(&inner2)
        .arg(&deep)
        .arg(format!("{}/", oracle.display())));
    let want = oracle.join(s.src.strip_prefix("/").unwrap());
    // The oracle did what the comments above say.
    for rel in [
        &b"back\\slash"[..],
        b"{p,q}",
        b"a.{o,txt}",
        b"foo/x/bar",
        b" lead",
        b"trail ",
        b"cr",
        b"tri",
        b"regdir",
        b"sub/abs",
        b"x.rs",
        b"m1",
        b"m2",
        b"par",
        b"sub/par2",
        b"d/x",
    ] {
        assert!(!p(&want, rel).exists(), "rsync kept {}", rel.escape_ascii());
    }
    for rel in [
        &b"backslash"[..],
        b"p",
        b"a.o",
        b"foo/bar/f",
        b"lead",
        b"trail",
        b"cr\r",
        b"[abc",
        b"regfile",
        b"sub",
        b"d/xx/f",
    ] {
        assert!(
            p(&want, rel).exists(),
            "rsync left out {}",
            rel.escape_ascii()
        );
    }
    assert!(fs::symlink_metadata(want.join("regsym")).is_ok());
    let theirs = oracle.join(other.strip_prefix("/").unwrap());
    assert!(!theirs.join("f").exists());
    assert!(theirs.join("inner/g").is_file());
    assert!(theirs.join("b/inner2/keepme").is_file());
    assert!(theirs.join("b/inner2/deep/h").is_file());

    let mut args: Vec<&OsStr> = vec![
        OsStr::new("--source"),
        other.as_os_str(),
        OsStr::new("--source"),
        inner.as_os_str(),
        OsStr::new("--source"),
        inner2.as_os_str(),
        OsStr::new("--source"),
        deep.as_os_str(),
    ];
    for x in &xs {
        args.extend([OsStr::new("-x"), OsStr::new(x)]);
    }
    let o = s.backup(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let left_out = format!(
        "source {} is left out by an exclude, but for the sources inside it",
        other.display()
    );
    assert!(err.contains(&left_out), "{err}");
    assert!(
        err.contains("--exclude \"[abc\": exclude \"[abc\""),
        "{err}"
    );
    assert!(err.contains("rsync_filter:8: \"- /\""), "{err}");
    let cur = s.store.join("h/current");
    let ours = cur.join(other.strip_prefix("/").unwrap());
    assert!(!ours.join("f").exists());
    assert_eq!(
        fs::read(ours.join("inner/g")).unwrap(),
        b"a source inside an excluded one"
    );
    assert_eq!(
        fs::read(ours.join("b/inner2/keepme")).unwrap(),
        b"in a source holding another"
    );
    assert_eq!(
        fs::read(ours.join("b/inner2/deep/h")).unwrap(),
        b"in the deepest source"
    );
    restores_as(&s, &want);
}

/// Per-directory filter files above a source, where others may write
/// (`/tmp`): one that is a symlink, a directory or too large is named and
/// not read, never the end of every backup; and notes on their rules, one
/// per file in many directories, are counted past the first 20.
#[test]
fn filter_files_above_a_source_never_fail_the_backup_and_notes_are_bounded() {
    let s = setup();
    let top = s.work.join("top");
    let src = top.join("a/b/src");
    put(&src, b"keep", b"kept");
    for i in 0..30 {
        put(&src, format!("d{i:02}/.ff").as_bytes(), b"- [abc\n");
    }
    fs::write(s.work.join("elsewhere"), "- keep\n").unwrap();
    std::os::unix::fs::symlink(s.work.join("elsewhere"), top.join(".ff")).unwrap();
    fs::create_dir_all(top.join("a/.ff")).unwrap();
    // One that reads, with a rule rsync would refuse too.
    fs::write(top.join("a/b/.ff"), "hello world\n").unwrap();
    fs::write(s.conf.join("rsync_filter"), ": .ff\n").unwrap();
    let o = run_status(
        Command::new(bin("byteback-backup"))
            .env("BYTEBACK_CONFIG_DIR", &s.conf)
            .arg("--destination")
            .arg(&s.store)
            .arg("--source")
            .arg(&src)
            .args(["--hostname", "h", "--retry-number", "0"]),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    for f in [top.join(".ff"), top.join("a/.ff")] {
        assert!(
            err.contains(&format!(
                "per-directory filter file {}, above a source:",
                f.display()
            )),
            "{err}"
        );
    }
    assert!(
        err.contains(&format!("{}:1: ", top.join("a/b/.ff").display()))
            && err.contains("above a source; not read"),
        "{err}"
    );
    assert_eq!(err.matches("\"- [abc\": unterminated").count(), 20, "{err}");
    assert!(
        err.contains("10 more notes on the rules of per-directory filter files not shown"),
        "{err}"
    );
    let stored = s
        .store
        .join("h/current")
        .join(src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(stored.join("keep")).unwrap(), b"kept");
}

//! Shared helpers for byteback's end-to-end tests.
//!
//! Every integration test binary does `mod util;` and uses the subset it
//! needs, hence the `dead_code` allowance below. The helpers shell out to the
//! real tools (`mkfs.btrfs`, `losetup`, `mount`, `btrfs`, `rsync`, `setfacl`,
//! `lsattr`) on purpose: the tests check byteback against the system, not
//! against a model of it. Everything panics with a clear message on failure;
//! only [`require_root`] may turn a test into a (loudly reported) skip.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

mod rng;
pub mod sshd;

pub use rng::Rng;

// ---------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------

/// True when the test process runs with effective uid 0.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Gate for tests that need root. Use as `if !require_root("what") { return; }`.
///
/// * root: returns `true`.
/// * not root and the `CI` environment variable is set: panics, so CI can
///   never pass by silently skipping the interesting tests.
/// * not root otherwise: prints a loud `SKIPPED: {what} needs root` line to
///   stderr (bypassing libtest's output capture, so it shows even for a
///   passing test) and returns `false`.
pub fn require_root(what: &str) -> bool {
    is_root() || skip_loudly(&format!("{what} needs root"))
}

/// A test that cannot run here: panics with `why` when `CI` is set (CI must
/// never pass by skipping), else prints a loud `SKIPPED: why` line and
/// returns false. Written to the real stderr, not through eprintln!, which
/// libtest captures and shows only for failing tests.
pub fn skip_loudly(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{why} and CI is set (scripts/test.sh installs what the tests need)");
    }
    let _ = writeln!(io::stderr(), "\n******** SKIPPED: {why} ********\n");
    false
}

// ---------------------------------------------------------------------------
// Locations
// ---------------------------------------------------------------------------

/// A fresh temporary directory under cargo's per-target scratch directory
/// (`target/tmp`), removed on drop.
///
/// Prefer it over `/tmp` for trees that carry `user.*` xattrs and ACLs:
/// `/tmp` may be a tmpfs, which (before Linux 6.6) refuses `user.*` xattrs.
///
/// The environment variable `BYTEBACK_TEST_TMPDIR`, when set, replaces
/// `target/tmp` (e.g. to run the tests as another user).
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("BYTEBACK_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let base = base.as_path();
    fs::create_dir_all(base).unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
    tempfile::Builder::new()
        .prefix("byteback-test-")
        .tempdir_in(base)
        .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", base.display()))
}

/// Path of a workspace binary (`byteback-backup`, `byteback-restore`,
/// `byteback-server`, ...).
///
/// Integration tests of the root package cannot use `CARGO_BIN_EXE_*` for
/// binaries of other workspace members, so the binary is looked up next to
/// the test executable: tests run from `target/<profile>/deps/`, binaries
/// live in `target/<profile>/`. Panics, naming `cargo build --bins`, when the
/// binary is not there.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe() failed");
    let exe_dir = exe
        .parent()
        .expect("test executable has no parent directory");
    let mut candidates = Vec::new();
    if exe_dir.file_name() == Some(OsStr::new("deps")) {
        if let Some(profile_dir) = exe_dir.parent() {
            candidates.push(profile_dir.join(name));
        }
    }
    candidates.push(exe_dir.join(name));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "binary `{name}` not found (looked at {candidates:?}); build the workspace binaries first \
         with `cargo build --bins` (same profile as the tests, e.g. `cargo build --workspace --bins`)"
    );
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

fn describe_output(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {cmd:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}--- end ---",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to completion (stdin null, stdout and stderr captured) and
/// returns its output whatever the exit status. Panics only when the command
/// cannot be started at all (e.g. the tool is not installed).
pub fn run_status(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (is the tool installed?)"))
}

/// Runs `cmd` like [`run_status`]; when it exits unsuccessfully, prints and
/// panics with the command line, the exit status, stdout and stderr.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_status(cmd);
    if !out.status.success() {
        let msg = describe_output(cmd, &out);
        eprintln!("{msg}");
        panic!("command failed:\n{msg}");
    }
    out
}

// ---------------------------------------------------------------------------
// Looking at outputs and tools
// ---------------------------------------------------------------------------

/// A command's stderr as text (lossy UTF-8).
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A command's exit code, stdout and stderr, for assertion messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// True when `cmd` runs and succeeds (a probe such as `tool --version`).
/// When it does not, `what` is missing: panics when `CI` is set (scripts/test.sh
/// installs it), else says so loudly on stderr and returns false.
pub fn have(what: &str, cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
        || skip_loudly(&format!("{what} is not installed"))
}

/// [`have`] for a program found on `$PATH` (`command -v TOOL`).
pub fn have_tool(tool: &str) -> bool {
    have(
        tool,
        Command::new("sh").args(["-c", &format!("command -v {tool}")]),
    )
}

// ---------------------------------------------------------------------------
// Small filesystem primitives (all panic with the path on failure)
// ---------------------------------------------------------------------------

fn bytes_name(b: &[u8]) -> OsString {
    OsString::from_vec(b.to_vec())
}

fn mkdir(p: &Path, mode: u32) {
    fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    set_mode(p, mode);
}

fn write_file(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// chmod (follows symlinks; never call it on one).
fn set_mode(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, p.display()));
}

fn symlink(target: &[u8], link: &Path) {
    std::os::unix::fs::symlink(OsStr::from_bytes(target), link)
        .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("lchown {uid}:{gid} {}: {e}", p.display()));
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

/// Sets atime and mtime of `p` (not following symlinks) to `sec.nsec`.
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// mknod of a device (`kind` [`rustix::fs::FileType::CharacterDevice`] or
/// `BlockDevice`), a FIFO or a socket, relative to the current directory.
fn mknod(p: &Path, kind: rustix::fs::FileType, mode: u32, major: u32, minor: u32) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        kind,
        rustix::fs::Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
}

fn mkfifo(p: &Path, mode: u32) {
    mknod(p, rustix::fs::FileType::Fifo, mode, 0, 0);
}

pub fn lstat(p: &Path) -> Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// Entries of a directory sorted by raw name bytes.
fn sorted_entries(dir: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
                .file_name()
        })
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names
}

/// Every path below `root` (not `root` itself), depth first, parents before
/// children, siblings sorted by name bytes. Never follows symlinks.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    fn rec(dir: &Path, out: &mut Vec<PathBuf>) {
        for name in sorted_entries(dir) {
            let p = dir.join(&name);
            let is_dir = lstat(&p).file_type().is_dir();
            out.push(p.clone());
            if is_dir {
                rec(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    rec(root, &mut out);
    out
}

/// Bytes actually allocated on disk for `path` (`st_blocks * 512`); compare
/// with the size to tell whether a file is still sparse.
pub fn allocated_bytes(path: &Path) -> u64 {
    lstat(path).blocks() * 512
}

// ---------------------------------------------------------------------------
// Rich tree
// ---------------------------------------------------------------------------

/// 1970-01-01T00:00:01.000000001Z, used on `times/epoch_1970`.
pub const MTIME_1970: (i64, i64) = (1, 1);
/// 2100-01-01T00:00:00.999999999Z, used on `times/year_2100`.
pub const MTIME_2100: (i64, i64) = (4_102_444_800, 999_999_999);

/// Creates under `root` (which must exist) a tree with every kind of entry a
/// backup must carry. Deterministic for a given `rng` state (contents, names,
/// modes, xattrs, ACLs and all mtimes), apart from inode numbers, ctimes and
/// atimes. Panics on any failure.
///
/// Layout (`[root]` = only when running as root):
/// * `files/`: `empty` (0 B), `one_byte`, `size_4095`, `size_4096`,
///   `size_4097`, `random_1MiB` (1 MiB + 12345 random bytes),
///   `compressible_3MiB` (3 MiB + 777 bytes of text), `sparse` (4 KiB of data
///   at 8 MiB, 16 MiB long).
/// * `empty_dir/`, `empty_parent/empty_child/`: empty directories.
/// * `deep/level_00/.../level_39/bottom.txt` (40 levels), plus a file at level 20.
/// * `names/`: a space, several spaces and a tab, a newline, invalid UTF-8
///   (`0xff 0xfe`), a 255-byte name, leading/trailing spaces, a leading dash,
///   a backslash, glob characters `*?[]{}`, non-ASCII UTF-8, and a directory
///   with a space holding a file with a newline.
/// * `links/`: `dangling`, `absolute` (-> `/etc/passwd`), `relative_file`
///   (-> `../files/size_4096`), `dir_link` (-> `../deep/level_00`),
///   `to_self` (-> itself), `weird_target` (dangling, target has 0xff and a
///   newline); `[root]` `foreign_owner` symlink owned by 1234:5678.
/// * `hard/a/first`, `hard/a/second`, `hard/b/third`: one inode, three names.
/// * `special/fifo`, `special/socket` (a bound, closed unix socket),
///   `[root]` `special/char_null` (c 1 3), `special/block_loop200` (b 7 200).
/// * `modes/`: `setuid` (04755 file), `setgid_dir/` (02755, holding a file and
///   a subdirectory that inherits the bit), `sticky_dir/` (01777, holding a
///   file), `readonly` (0400), `private_dir/` (0700, holding `secret` 0600).
/// * `[root]` `owners/`: `file` and `dir/` owned by 1234:5678, `setuid_foreign`
///   (04755, 1234:5678), `private_foreign/` (0700, 1234:5678, holding a file).
/// * `xattrs/`: `binary` (`user.binary` = bytes 0..=255), `big` (`user.big` =
///   4000 bytes), `several` (`user.a`, `user.empty` = "", `user.with.dots`),
///   `dir/` (`user.on_dir`), `[root]` `trusted` (`trusted.byteback`).
/// * `acl/`: `file_acl` (access ACL for u:1234, g:5678, mask rw-, so its
///   mode reads 0660: with an ACL the group bits show the mask), `default_dir/`
///   (access + default ACL) holding `inherited` (created after, so it inherits).
/// * `times/`: `epoch_1970` ([`MTIME_1970`]) and `year_2100` ([`MTIME_2100`]).
///
/// Every entry, including symlinks and `root` itself, gets an explicit mtime
/// with a non-zero nanosecond part; directories are stamped last, deepest
/// first, after everything inside them is complete.
pub fn make_rich_tree(root: &Path, rng: &mut Rng) {
    let root_user = is_root();
    assert!(
        lstat(root).is_dir(),
        "make_rich_tree: {} is not a directory",
        root.display()
    );

    rich_files(root, rng);
    rich_empty_dirs(root);
    rich_deep_tree(root, rng);
    rich_names(root, rng);
    rich_links(root, root_user);
    rich_hard_links(root, rng);
    rich_special_files(root, root_user);
    rich_modes(root);
    if root_user {
        rich_owners(root);
    }
    rich_xattrs(root, rng, root_user);
    rich_acls(root);
    rich_times(root, rng);
}

/// Regular files: empty, small around a page, random, compressible and sparse.
fn rich_files(root: &Path, rng: &mut Rng) {
    let files = root.join("files");
    mkdir(&files, 0o755);
    write_file(&files.join("empty"), &[]);
    write_file(&files.join("one_byte"), &rng.bytes(1));
    for n in [4095usize, 4096, 4097] {
        write_file(&files.join(format!("size_{n}")), &rng.bytes(n));
    }
    write_file(&files.join("random_1MiB"), &rng.bytes((1 << 20) + 12345));
    {
        let words = [
            "alpha ",
            "beta ",
            "gamma ",
            "delta ",
            "backup ",
            "snapshot ",
            "btrfs ",
        ];
        let target = (3 << 20) + 777;
        let mut text = Vec::with_capacity(target + 64);
        let mut line = 0u64;
        while text.len() < target {
            text.extend_from_slice(format!("{line:08} ").as_bytes());
            for _ in 0..8 {
                text.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
            }
            text.push(b'\n');
            line += 1;
        }
        text.truncate(target);
        write_file(&files.join("compressible_3MiB"), &text);
    }
    {
        let p = files.join("sparse");
        let mut f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.seek(SeekFrom::Start(8 << 20))
            .expect("seek in sparse file");
        f.write_all(&rng.bytes(4096))
            .expect("write sparse file data");
        f.set_len(16 << 20).expect("extend sparse file");
    }
}

/// Empty directories.
fn rich_empty_dirs(root: &Path) {
    mkdir(&root.join("empty_dir"), 0o755);
    mkdir(&root.join("empty_parent"), 0o755);
    mkdir(&root.join("empty_parent/empty_child"), 0o750);
}

/// A 40-level deep tree.
fn rich_deep_tree(root: &Path, rng: &mut Rng) {
    let mut d = root.join("deep");
    mkdir(&d, 0o755);
    for level in 0..40 {
        d.push(format!("level_{level:02}"));
        mkdir(&d, 0o755);
        if level == 20 {
            write_file(&d.join("halfway.txt"), &rng.bytes(100));
        }
    }
    write_file(&d.join("bottom.txt"), b"bottom of the deep tree\n");
}

/// Awkward names: spaces, a tab, a newline, invalid UTF-8, 255 bytes, glob characters, non-ASCII.
fn rich_names(root: &Path, rng: &mut Rng) {
    let names = root.join("names");
    mkdir(&names, 0o755);
    let mut long = b"long_".to_vec();
    while long.len() < 255 {
        long.push(b'a' + (long.len() % 26) as u8);
    }
    let list: Vec<Vec<u8>> = vec![
        b"with space".to_vec(),
        b"several   spaces\tand tab".to_vec(),
        b"new\nline".to_vec(),
        b"bad\xff\xfeutf8".to_vec(),
        long,
        b" leading space".to_vec(),
        b"trailing space ".to_vec(),
        b"-leading-dash".to_vec(),
        b"back\\slash".to_vec(),
        b"glob*?[x]{a,b}".to_vec(),
        "unicode \u{fc}n\u{ef}c\u{f6}d\u{e9} \u{2713}"
            .as_bytes()
            .to_vec(),
    ];
    for n in &list {
        let len = 16 + rng.below(64) as usize;
        let data = rng.bytes(len);
        write_file(&names.join(bytes_name(n)), &data);
    }
    let d = names.join("dir with space");
    mkdir(&d, 0o755);
    write_file(&d.join("file\nin dir"), b"x");
}

/// Symbolic links: dangling, absolute, relative, to a directory, to itself, a weird target; `[root]` one with a foreign owner.
fn rich_links(root: &Path, root_user: bool) {
    let links = root.join("links");
    mkdir(&links, 0o755);
    symlink(b"does/not/exist", &links.join("dangling"));
    symlink(b"/etc/passwd", &links.join("absolute"));
    symlink(b"../files/size_4096", &links.join("relative_file"));
    symlink(b"../deep/level_00", &links.join("dir_link"));
    symlink(b"to_self", &links.join("to_self"));
    symlink(b"nowhere\xff\nweird", &links.join("weird_target"));
    if root_user {
        let p = links.join("foreign_owner");
        symlink(b"../files/one_byte", &p);
        lchown(&p, 1234, 5678);
    }
}

/// Hard links: one inode, three names, two directories.
fn rich_hard_links(root: &Path, rng: &mut Rng) {
    let hard = root.join("hard");
    mkdir(&hard, 0o755);
    mkdir(&hard.join("a"), 0o755);
    mkdir(&hard.join("b"), 0o755);
    let first = hard.join("a/first");
    write_file(&first, &rng.bytes(10_000));
    for other in ["a/second", "b/third"] {
        let p = hard.join(other);
        fs::hard_link(&first, &p).unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
    }
}

/// Special files: a FIFO, a socket; `[root]` a character and a block device.
fn rich_special_files(root: &Path, root_user: bool) {
    let special = root.join("special");
    mkdir(&special, 0o755);
    mkfifo(&special.join("fifo"), 0o640);
    set_mode(&special.join("fifo"), 0o640);
    let sock = special.join("socket");
    drop(
        std::os::unix::net::UnixListener::bind(&sock)
            .unwrap_or_else(|e| panic!("bind {}: {e}", sock.display())),
    );
    set_mode(&sock, 0o755);
    if root_user {
        mknod(
            &special.join("char_null"),
            rustix::fs::FileType::CharacterDevice,
            0o666,
            1,
            3,
        );
        mknod(
            &special.join("block_loop200"),
            rustix::fs::FileType::BlockDevice,
            0o660,
            7,
            200,
        );
        set_mode(&special.join("char_null"), 0o666);
        set_mode(&special.join("block_loop200"), 0o660);
    }
}

/// Special modes: setuid, setgid and sticky directories, read-only, private.
fn rich_modes(root: &Path) {
    let modes = root.join("modes");
    mkdir(&modes, 0o755);
    let p = modes.join("setuid");
    write_file(&p, b"#!/bin/sh\necho setuid\n");
    set_mode(&p, 0o4755);
    let d = modes.join("setgid_dir");
    mkdir(&d, 0o2755);
    write_file(&d.join("inside"), b"in setgid dir\n");
    set_mode(&d.join("inside"), 0o644);
    mkdir(&d.join("subdir"), 0o2755);
    let d = modes.join("sticky_dir");
    mkdir(&d, 0o1777);
    write_file(&d.join("inside"), b"in sticky dir\n");
    set_mode(&d.join("inside"), 0o666);
    let p = modes.join("readonly");
    write_file(&p, b"read only\n");
    set_mode(&p, 0o400);
    let d = modes.join("private_dir");
    mkdir(&d, 0o755);
    write_file(&d.join("secret"), b"secret\n");
    set_mode(&d.join("secret"), 0o600);
    set_mode(&d, 0o700);
}

/// Foreign owners (call as root only). chown clears set-id bits, so chmod after.
fn rich_owners(root: &Path) {
    let owners = root.join("owners");
    mkdir(&owners, 0o755);
    let p = owners.join("file");
    write_file(&p, b"owned by 1234:5678\n");
    lchown(&p, 1234, 5678);
    set_mode(&p, 0o640);
    let d = owners.join("dir");
    mkdir(&d, 0o755);
    lchown(&d, 1234, 5678);
    let p = owners.join("setuid_foreign");
    write_file(&p, b"setuid foreign\n");
    lchown(&p, 1234, 5678);
    set_mode(&p, 0o4755);
    let d = owners.join("private_foreign");
    mkdir(&d, 0o755);
    write_file(&d.join("inside"), b"private foreign\n");
    lchown(&d.join("inside"), 1234, 5678);
    set_mode(&d.join("inside"), 0o600);
    lchown(&d, 1234, 5678);
    set_mode(&d, 0o700);
}

/// Extended attributes: binary, big, several, on a directory; `[root]` trusted.*.
fn rich_xattrs(root: &Path, rng: &mut Rng, root_user: bool) {
    let x = root.join("xattrs");
    mkdir(&x, 0o755);
    let p = x.join("binary");
    write_file(&p, b"binary xattr\n");
    let all: Vec<u8> = (0..=255u8).collect();
    set_xattr(&p, "user.binary", &all);
    let p = x.join("big");
    write_file(&p, b"big xattr\n");
    set_xattr(&p, "user.big", &rng.bytes(4000));
    let p = x.join("several");
    write_file(&p, b"several xattrs\n");
    set_xattr(&p, "user.a", b"A");
    set_xattr(&p, "user.empty", b"");
    set_xattr(&p, "user.with.dots", b"dots");
    let d = x.join("dir");
    mkdir(&d, 0o755);
    set_xattr(&d, "user.on_dir", b"directory xattr");
    if root_user {
        let p = x.join("trusted");
        write_file(&p, b"trusted xattr\n");
        set_xattr(&p, "trusted.byteback", b"trusted value");
    }
}

/// POSIX ACLs: an access ACL on a file, access and default ACLs on a directory and a file inheriting them.
fn rich_acls(root: &Path) {
    let a = root.join("acl");
    mkdir(&a, 0o755);
    let p = a.join("file_acl");
    write_file(&p, b"file with an ACL\n");
    set_mode(&p, 0o640);
    run(Command::new("setfacl")
        .arg("-m")
        .arg("u:1234:rw-,g:5678:r--,m::rw-,o::---")
        .arg(&p));
    let d = a.join("default_dir");
    mkdir(&d, 0o755);
    run(Command::new("setfacl")
        .arg("-m")
        .arg("u:1234:rwx,d:u::rwx,d:g::r-x,d:u:1234:rwx,d:g:5678:r-x,d:m::rwx,d:o::---")
        .arg(&d));
    write_file(&d.join("inherited"), b"inherits the default ACL\n");
}

/// Explicit mtimes: `times/` with the extreme ones, then every other entry at random, directories deepest first, `root` last.
fn rich_times(root: &Path, rng: &mut Rng) {
    let times = root.join("times");
    mkdir(&times, 0o755);
    write_file(&times.join("epoch_1970"), b"1970\n");
    write_file(&times.join("year_2100"), b"2100\n");

    let all = walk(root);
    let base = 1_500_000_000i64; // 2017-07-14
    let stamp = |rng: &mut Rng| {
        (
            base + rng.below(300_000_000) as i64,
            1 + rng.below(999_999_999) as i64,
        )
    };
    for p in all.iter().filter(|p| !lstat(p).is_dir()) {
        let (s, ns) = stamp(rng);
        set_mtime(p, s, ns);
    }
    set_mtime(&times.join("epoch_1970"), MTIME_1970.0, MTIME_1970.1);
    set_mtime(&times.join("year_2100"), MTIME_2100.0, MTIME_2100.1);
    let mut dirs: Vec<&PathBuf> = all.iter().filter(|p| lstat(p).is_dir()).collect();
    // Deepest first; ties in walk order (deterministic).
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for d in dirs {
        let (s, ns) = stamp(rng);
        set_mtime(d, s, ns);
    }
    let (s, ns) = stamp(rng);
    set_mtime(root, s, ns);
}

// ---------------------------------------------------------------------------
// rsync as an oracle
// ---------------------------------------------------------------------------

/// `path` made absolute (without resolving symlinks), as an rsync argument
/// ending in `/`. Absolute paths also stop rsync from reading a colon in a
/// name such as `2026-11-27T03:00+0000` as `host:path`.
fn rsync_dir_arg(path: &Path) -> OsString {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().expect("current_dir").join(path)
    };
    let mut s = abs.into_os_string();
    if !s.as_bytes().ends_with(b"/") {
        s.push("/");
    }
    s
}

/// Compares two trees with rsync itself:
/// `rsync -aHAX --numeric-ids --checksum --dry-run --itemize-changes --delete
/// --modify-window=-1 SRC/ DST/` and returns its stdout: empty when rsync
/// would change nothing, otherwise one itemized line per difference
/// (`*deleting` for extra entries in DST, `hf ... => ...` for a hard link to
/// restore).
///
/// `--modify-window=-1` makes rsync compare mtimes to the nanosecond; without
/// it rsync ignores sub-second differences, and a backup that drops
/// nanoseconds would pass. Paths are made absolute first (a relative
/// `2026-11-27T03:00+0000/` would be read as `host:path`).
///
/// Panics when rsync fails. Covers contents, type, permissions, owner and
/// group (numeric; as root only), mtimes (ns), symlink targets, device
/// numbers, hard links, ACLs and xattrs (`user.*` only unless root). Not
/// covered: sparseness, atime/ctime.
pub fn rsync_diff(src: &Path, dst: &Path) -> String {
    let out = run(Command::new("rsync")
        .args([
            "-aHAX",
            "--numeric-ids",
            "--checksum",
            "--dry-run",
            "--itemize-changes",
            "--delete",
            "--modify-window=-1",
        ])
        .arg(rsync_dir_arg(src))
        .arg(rsync_dir_arg(dst)));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics, showing the rsync itemized differences, unless [`rsync_diff`]
/// finds `src` and `dst` identical.
pub fn assert_same_tree(src: &Path, dst: &Path) {
    let diff = rsync_diff(src, dst);
    if !diff.is_empty() {
        panic!(
            "trees differ: {} -> {}\nrsync itemized changes (what rsync would do to dst):\n{diff}",
            src.display(),
            dst.display()
        );
    }
}

// ---------------------------------------------------------------------------
// Tree digest
// ---------------------------------------------------------------------------

/// FNV-1a 64 of `data`, continuing from `h` (start with [`FNV_OFFSET`]).
pub fn fnv1a64(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;

/// Escapes raw bytes for the digest: printable ASCII except space and
/// backslash as is, everything else `\xNN`.
fn esc(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_graphic() && c != b'\\' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    s
}

fn file_fnv(p: &Path) -> u64 {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = FNV_OFFSET;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if n == 0 {
            return h;
        }
        h = fnv1a64(h, &buf[..n]);
    }
}

/// All extended attributes of `p` (not following symlinks), sorted by name.
/// Includes `system.posix_acl_*` (the kernel's ACL encoding). A filesystem
/// without xattr support gives an empty list.
pub fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    use rustix::io::Errno;
    let names = loop {
        let size = match rustix::fs::llistxattr_query(p) {
            Ok(size) => size,
            Err(Errno::NOTSUP) => return Vec::new(),
            Err(e) => panic!("listxattr {}: {e}", p.display()),
        };
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(p, &mut buf[..]) {
            Ok(got) => {
                buf.truncate(got);
                break buf;
            }
            Err(Errno::RANGE) => continue, // grew in between
            Err(e) => panic!("listxattr {}: {e}", p.display()),
        }
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).expect("xattr name with NUL");
        let value = loop {
            let size = rustix::fs::lgetxattr_query(p, &cn)
                .unwrap_or_else(|e| panic!("getxattr {} {}: {e}", esc(name), p.display()));
            let mut buf = vec![0u8; size];
            match rustix::fs::lgetxattr(p, &cn, &mut buf[..]) {
                Ok(got) => {
                    buf.truncate(got);
                    break buf;
                }
                Err(Errno::RANGE) => continue,
                Err(e) => panic!("getxattr {} {}: {e}", esc(name), p.display()),
            }
        };
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// A deterministic, human-readable digest of the tree at `root`: one line
/// per entry (`root` itself is `.`), sorted by raw path bytes. Never follows
/// symlinks. Each line holds:
///
/// `PATH TYPE mode=OOOOO uid=U gid=G mtime=SEC.NSEC` and then per type
/// `size=N fnv=HEX [link=FIRST]` for files (`link` names the first path, in
/// sorted order, of a hard-link group with at least two names in the tree),
/// `target=BYTES` for symlinks, `rdev=MAJ:MIN` for devices, then
/// ` xattr:NAME=LEN:HEX` for each xattr (ACLs included).
///
/// Paths and byte strings are escaped (`\xNN` for anything not printable
/// ASCII, space and backslash included); content hashes are FNV-1a 64.
/// Deliberately left out: atime, ctime, inode numbers, directory sizes and
/// link counts (filesystem-specific) and sparseness. Two digests are equal
/// iff the trees are the same in every other respect; compare them with
/// `assert_eq!` or [`digest_diff`].
pub fn tree_digest(root: &Path) -> String {
    let mut entries: Vec<(Vec<u8>, PathBuf, Metadata)> =
        vec![(b".".to_vec(), root.into(), lstat(root))];
    for p in walk(root) {
        let rel = p.strip_prefix(root).expect("walk stays below root");
        let m = lstat(&p);
        entries.push((rel.as_os_str().as_bytes().to_vec(), p, m));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));

    // Hard-link groups among regular files, labelled by their first path.
    let mut groups: HashMap<(u64, u64), (Vec<u8>, usize)> = HashMap::new();
    for (rel, _, m) in &entries {
        if m.file_type().is_file() && m.nlink() > 1 {
            let g = groups
                .entry((m.dev(), m.ino()))
                .or_insert_with(|| (rel.clone(), 0));
            g.1 += 1;
        }
    }

    let mut out = String::new();
    for (rel, p, m) in &entries {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() {
            "chardev"
        } else if ft.is_block_device() {
            "blockdev"
        } else {
            "unknown"
        };
        out.push_str(&format!(
            "{} {kind} mode={:05o} uid={} gid={} mtime={}.{:09}",
            esc(rel),
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec()
        ));
        if ft.is_file() {
            out.push_str(&format!(" size={} fnv={:016x}", m.len(), file_fnv(p)));
            if let Some((first, n)) = groups.get(&(m.dev(), m.ino())) {
                if *n > 1 {
                    out.push_str(&format!(" link={}", esc(first)));
                }
            }
        } else if ft.is_symlink() {
            let t = fs::read_link(p).unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()));
            out.push_str(&format!(" target={}", esc(t.as_os_str().as_bytes())));
        } else if ft.is_char_device() || ft.is_block_device() {
            let r = m.rdev();
            out.push_str(&format!(
                " rdev={}:{}",
                rustix::fs::major(r),
                rustix::fs::minor(r)
            ));
        }
        for (name, value) in xattrs(p) {
            out.push_str(&format!(
                " xattr:{}={}:{:016x}",
                esc(&name),
                value.len(),
                fnv1a64(FNV_OFFSET, &value)
            ));
        }
        out.push('\n');
    }
    out
}

/// The lines only in `a` (prefixed `- `) and only in `b` (prefixed `+ `) of
/// two [`tree_digest`] listings; empty when they are equal.
pub fn digest_diff(a: &str, b: &str) -> String {
    let la: BTreeSet<&str> = a.lines().collect();
    let lb: BTreeSet<&str> = b.lines().collect();
    let mut out = String::new();
    for l in la.difference(&lb) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in lb.difference(&la) {
        out.push_str(&format!("+ {l}\n"));
    }
    out
}

// ---------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------

/// A tripwire file: proves nothing wrote to (or added to, or removed from) a
/// directory that must stay untouched, e.g. a path outside the store that a
/// hostile client tries to reach.
pub struct Sentinel {
    dir: PathBuf,
    path: PathBuf,
    content: Vec<u8>,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    nlink: u64,
    listing: BTreeSet<Vec<u8>>,
    /// Mode, owner and ctime of `dir` itself (the empty name) and of
    /// everything below it: a chmod, chown, utimes or xattr change made
    /// through a planted symlink to `dir` changes nothing inside it.
    meta: BTreeMap<Vec<u8>, Meta>,
}

/// What [`Sentinel`] keeps of each object: mode, uid, gid, ctime, mtime
/// and xattrs (ctime alone misses a change within one tick of the coarse
/// clock that stamps it on kernels before 6.13).
type Meta = (
    u32,
    u32,
    u32,
    (i64, i64),
    (i64, i64),
    Vec<(Vec<u8>, Vec<u8>)>,
);

/// The xattrs of `p` (not followed), an error read in their place (one it
/// cannot read, as a user, is still compared, never a panic).
fn xattrs_as_seen(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 64 << 10];
    let names = match rustix::fs::llistxattr(p, &mut names[..]) {
        Ok(n) => names[..n].to_vec(),
        Err(e) => return vec![(b"(list)".to_vec(), e.to_string().into_bytes())],
    };
    names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let cn = CString::new(name).expect("xattr name with NUL");
            let mut v = vec![0u8; 64 << 10];
            let value = match rustix::fs::lgetxattr(p, &cn, &mut v[..]) {
                Ok(n) => v[..n].to_vec(),
                Err(e) => format!("({e})").into_bytes(),
            };
            (name.to_vec(), value)
        })
        .collect()
}

fn meta_below(dir: &Path) -> BTreeMap<Vec<u8>, Meta> {
    let of = |p: &Path| {
        let m = lstat(p);
        (
            m.mode(),
            m.uid(),
            m.gid(),
            (m.ctime(), m.ctime_nsec()),
            (m.mtime(), m.mtime_nsec()),
            xattrs_as_seen(p),
        )
    };
    let mut out: BTreeMap<Vec<u8>, Meta> = walk(dir)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).expect("below dir");
            (rel.as_os_str().as_bytes().to_vec(), of(&p))
        })
        .collect();
    out.insert(vec![], of(dir));
    out
}

fn listing(dir: &Path) -> BTreeSet<Vec<u8>> {
    walk(dir)
        .into_iter()
        .map(|p| {
            p.strip_prefix(dir)
                .expect("below dir")
                .as_os_str()
                .as_bytes()
                .to_vec()
        })
        .collect()
}

impl Sentinel {
    /// Name of the file planted in the directory.
    pub const NAME: &'static str = "SENTINEL";

    /// Writes `dir/SENTINEL` (random content, mode 0644) and records its
    /// bytes, mode, mtime, ctime, inode and link count, plus the recursive
    /// listing of `dir` (names only, symlinks not followed) and the mode,
    /// owner and ctime of `dir` and of everything below it.
    pub fn plant(dir: &Path) -> Sentinel {
        let path = dir.join(Self::NAME);
        let mut rng = Rng::from_time();
        let len = 1000 + rng.below(1000) as usize;
        let content = rng.bytes(len);
        write_file(&path, &content);
        set_mode(&path, 0o644);
        let m = lstat(&path);
        Sentinel {
            dir: dir.to_path_buf(),
            content,
            mode: m.mode(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            nlink: m.nlink(),
            listing: listing(dir),
            meta: meta_below(dir),
            path,
        }
    }

    /// Path of the sentinel file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Panics, listing every finding, if the sentinel file is gone, replaced
    /// (other inode or type), rewritten, chmod-ed, re-timed, hard-linked or
    /// otherwise touched (ctime), if any path appeared in or vanished from
    /// `dir` (recursively), or if `dir` or anything below it had its mode,
    /// owner or ctime changed (chmod, chown, utimes, xattrs, ACLs) since
    /// [`Sentinel::plant`].
    pub fn assert_untouched(&self) {
        let mut problems = Vec::new();
        match fs::symlink_metadata(&self.path) {
            Err(e) => problems.push(format!("sentinel {} is gone: {e}", self.path.display())),
            Ok(m) if !m.file_type().is_file() => problems.push(format!(
                "sentinel is no longer a regular file: {:?}",
                m.file_type()
            )),
            Ok(m) => {
                if m.ino() != self.ino {
                    problems.push(format!("inode changed {} -> {}", self.ino, m.ino()));
                }
                if m.mode() != self.mode {
                    problems.push(format!("mode changed {:o} -> {:o}", self.mode, m.mode()));
                }
                if (m.mtime(), m.mtime_nsec()) != self.mtime {
                    problems.push(format!(
                        "mtime changed {:?} -> {:?}",
                        self.mtime,
                        (m.mtime(), m.mtime_nsec())
                    ));
                }
                if (m.ctime(), m.ctime_nsec()) != self.ctime {
                    problems.push(format!(
                        "ctime changed {:?} -> {:?} (metadata touched)",
                        self.ctime,
                        (m.ctime(), m.ctime_nsec())
                    ));
                }
                if m.nlink() != self.nlink {
                    problems.push(format!(
                        "link count changed {} -> {}",
                        self.nlink,
                        m.nlink()
                    ));
                }
                match fs::read(&self.path) {
                    Ok(c) if c == self.content => {}
                    Ok(c) => problems.push(format!(
                        "content changed ({} bytes -> {} bytes)",
                        self.content.len(),
                        c.len()
                    )),
                    Err(e) => problems.push(format!("cannot read sentinel: {e}")),
                }
            }
        }
        let now = listing(&self.dir);
        for p in now.difference(&self.listing) {
            problems.push(format!("appeared: {}", esc(p)));
        }
        for p in self.listing.difference(&now) {
            problems.push(format!("vanished: {}", esc(p)));
        }
        let now = meta_below(&self.dir);
        for (p, was) in &self.meta {
            match now.get(p) {
                Some(is) if is != was => problems.push(format!(
                    "metadata changed: {} (mode, uid, gid, ctime, mtime, xattrs) {was:?} -> {is:?}",
                    match p.is_empty() {
                        true => ".".to_string(),
                        false => esc(p),
                    }
                )),
                _ => {}
            }
        }
        if !problems.is_empty() {
            panic!(
                "sentinel directory {} was touched:\n  {}",
                self.dir.display(),
                problems.join("\n  ")
            );
        }
    }
}

// ---------------------------------------------------------------------------
// btrfs on a loop device
// ---------------------------------------------------------------------------

const BTRFS_SUPER_MAGIC: u32 = 0x9123_683E;

/// True when `path` lives on a btrfs filesystem (statfs magic; follows
/// symlinks). False when statfs fails.
pub fn is_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type as u32 == BTRFS_SUPER_MAGIC)
}

/// Serialises losetup/mount within one test binary; across processes the
/// retries in [`BtrfsLoop::new`] take care of races.
static LOOP_LOCK: Mutex<()> = Mutex::new(());

/// A fresh btrfs filesystem on a loop device, mounted with
/// `user_subvol_rm_allowed` (as the byteback store is), unmounted and
/// detached on drop. Needs root; call [`require_root`] first.
pub struct BtrfsLoop {
    /// Where the filesystem is mounted (root dir mode 0755; its parent is
    /// 0755 too, so unprivileged users can reach it).
    pub mount: PathBuf,
    /// The loop device, e.g. `/dev/loop3`.
    pub device: PathBuf,
    image: PathBuf,
    mounted: bool,
    _base: tempfile::TempDir,
}

impl BtrfsLoop {
    /// Creates a sparse image of `size_mib` MiB in a temp dir, `mkfs.btrfs
    /// -q`, attaches it with `losetup --find --show` (retried, since
    /// concurrent `--find`s race for the same free device) and mounts it on
    /// another temp dir. `size_mib` must be at least 114 (mkfs.btrfs refuses
    /// smaller images with its default profiles); 256+ is comfortable.
    /// Panics with the failing command's output on any failure: tests using
    /// it must not silently skip.
    pub fn new(size_mib: u64) -> BtrfsLoop {
        assert!(
            is_root(),
            "BtrfsLoop::new needs root (gate the test with require_root)"
        );
        let base = tempfile::Builder::new()
            .prefix("byteback-btrfs-")
            .tempdir()
            .expect("cannot create a temp dir for the btrfs image");
        set_mode(base.path(), 0o755);
        let image = base.path().join("btrfs.img");
        let mount = base.path().join("mnt");
        {
            let f =
                File::create(&image).unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
            f.set_len(size_mib << 20)
                .unwrap_or_else(|e| panic!("truncate {}: {e}", image.display()));
        }
        run(Command::new("mkfs.btrfs").arg("-q").arg("-f").arg(&image));
        mkdir(&mount, 0o755);

        let _guard = LOOP_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut last = String::new();
        let mut device = None;
        for attempt in 0..10u64 {
            let mut cmd = Command::new("losetup");
            cmd.arg("--find").arg("--show").arg(&image);
            let out = run_status(&mut cmd);
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && dev.starts_with("/dev/") {
                device = Some(PathBuf::from(dev));
                break;
            }
            last = describe_output(&cmd, &out);
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        let device = device.unwrap_or_else(|| {
            let busy = run_status(Command::new("losetup").arg("-a"));
            panic!(
                "cannot attach {} to a loop device after 10 attempts:\n{last}\nlosetup -a:\n{}",
                image.display(),
                String::from_utf8_lossy(&busy.stdout)
            )
        });
        // From here on, Drop detaches the device even if mounting fails.
        let mut me = BtrfsLoop {
            mount,
            device,
            image,
            mounted: false,
            _base: base,
        };
        let mut last = String::new();
        for attempt in 0..5u64 {
            let mut cmd = Command::new("mount");
            cmd.args(["-t", "btrfs", "-o", "user_subvol_rm_allowed"])
                .arg(&me.device)
                .arg(&me.mount);
            let out = run_status(&mut cmd);
            if out.status.success() {
                me.mounted = true;
                break;
            }
            last = describe_output(&cmd, &out);
            std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
        }
        if !me.mounted {
            panic!(
                "cannot mount {} on {}:\n{last}",
                me.device.display(),
                me.mount.display()
            );
        }
        assert!(
            is_btrfs(&me.mount),
            "{} was mounted but is not btrfs",
            me.mount.display()
        );
        set_mode(&me.mount, 0o755);
        me
    }

    /// Path of the backing image file.
    pub fn image(&self) -> &Path {
        &self.image
    }
}

impl Drop for BtrfsLoop {
    /// `umount` (retried while busy, then lazily with `umount -l`), then
    /// `losetup -d`. Never panics (it may run during a panic); problems are
    /// reported on stderr.
    fn drop(&mut self) {
        let _guard = LOOP_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.mounted {
            let mut ok = false;
            for attempt in 0..5u64 {
                if let Ok(out) = Command::new("umount").arg(&self.mount).output() {
                    if out.status.success() {
                        ok = true;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
            }
            if !ok {
                eprintln!(
                    "BtrfsLoop: {} busy, unmounting lazily",
                    self.mount.display()
                );
                match Command::new("umount").arg("-l").arg(&self.mount).output() {
                    Ok(out) if out.status.success() => {}
                    Ok(out) => eprintln!(
                        "BtrfsLoop: umount -l {} failed: {}",
                        self.mount.display(),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                    Err(e) => eprintln!("BtrfsLoop: cannot run umount: {e}"),
                }
            }
        }
        // After a lazy unmount the device is still busy; losetup -d then only
        // sets autoclear and the kernel detaches it when the last user leaves.
        for attempt in 0..3u64 {
            match Command::new("losetup").arg("-d").arg(&self.device).output() {
                Ok(out) if out.status.success() => return,
                Ok(out) if attempt == 2 => eprintln!(
                    "BtrfsLoop: losetup -d {} failed: {}",
                    self.device.display(),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => {
                    eprintln!("BtrfsLoop: cannot run losetup: {e}");
                    return;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Read-only checks
// ---------------------------------------------------------------------------

/// The subvolume root containing `path` on btrfs: walk up while the parent
/// is on the same `st_dev` (each btrfs subvolume has its own anonymous dev).
fn btrfs_subvolume_root(path: &Path) -> PathBuf {
    let mut cur = path.to_path_buf();
    let dev = lstat(&cur).dev();
    while let Some(parent) = cur.parent() {
        if parent.as_os_str().is_empty() || lstat(parent).dev() != dev {
            break;
        }
        cur = parent.to_path_buf();
    }
    cur
}

/// `lsattr -d PATH` shows the immutable (`i`) flag. False when lsattr fails
/// (e.g. a filesystem without inode flags).
fn is_immutable(path: &Path) -> bool {
    let out = run_status(Command::new("lsattr").arg("-d").arg(path));
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .is_some_and(|flags| flags.contains('i'))
}

fn mounted_read_only(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|st| st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// True when `path` is the root of a btrfs subvolume (inode 256 on btrfs).
pub fn is_btrfs_subvolume(path: &Path) -> bool {
    is_btrfs(path) && lstat(path).ino() == 256
}

/// True when `path` is a btrfs subvolume whose `ro` property is set: a
/// read-only snapshot, not a tree made read-only by its mode bits.
pub fn is_read_only_snapshot(path: &Path) -> bool {
    if !is_btrfs_subvolume(path) {
        return false;
    }
    let out = run_status(
        Command::new("btrfs")
            .args(["property", "get", "-ts"])
            .arg(path)
            .arg("ro"),
    );
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ro=true"
}

/// True when `path` (file or directory; symlinks in it are resolved first)
/// refuses writes. Exactly:
///
/// 1. On a read-only mount (`statvfs` `ST_RDONLY`): true.
/// 2. On btrfs, when the subvolume containing `path` has the read-only
///    property (`btrfs property get -ts SUBVOL ro` prints `ro=true`): true.
///    This covers a read-only snapshot and everything inside it.
/// 3. Otherwise (a plain directory, or inside a writable subvolume), the
///    mode-bit rule, which is also what holds against root: true only if
///    every entry of the tree at `path` (recursively, symlinks excluded since
///    their mode is meaningless) has no write bit set (`mode & 0o222 == 0`)
///    or carries the immutable attribute (`lsattr -d` shows `i`).
///    When not running as root and `path` is a directory, a probe is also
///    made: creating `path/.byteback-ro-probe-<pid>` must fail (if it
///    succeeds the probe is removed and the answer is false).
///
/// Root is never probed by writing: as root the write would succeed on any
/// plain directory and would change the directory's mtime.
pub fn is_read_only(path: &Path) -> bool {
    let path = fs::canonicalize(path)
        .unwrap_or_else(|e| panic!("is_read_only: cannot resolve {}: {e}", path.display()));
    if mounted_read_only(&path) {
        return true;
    }
    if is_btrfs(&path) {
        let sub = btrfs_subvolume_root(&path);
        let out = run_status(
            Command::new("btrfs")
                .args(["property", "get", "-ts"])
                .arg(&sub)
                .arg("ro"),
        );
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ro=true" {
            return true;
        }
    }
    let top = lstat(&path);
    let mut entries = vec![path.clone()];
    if top.is_dir() {
        entries.extend(walk(&path));
    }
    for e in &entries {
        let m = lstat(e);
        if m.file_type().is_symlink() {
            continue;
        }
        if m.mode() & 0o222 != 0 && !is_immutable(e) {
            return false;
        }
    }
    if !is_root() && top.is_dir() {
        let probe = path.join(format!(".byteback-ro-probe-{}", std::process::id()));
        if fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .is_ok()
        {
            let _ = fs::remove_file(&probe);
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Processes and simulated time
// ---------------------------------------------------------------------------

pub use rustix::process::Signal;

/// Sends `sig` to process `pid`. A process already gone (`ESRCH`) is not an
/// error: the pids come from `/proc` or from children that may have ended
/// since; any other failure panics.
pub fn send_signal(pid: u32, sig: Signal) {
    let p = rustix::process::Pid::from_raw(pid as i32)
        .unwrap_or_else(|| panic!("send_signal: no such pid {pid}"));
    match rustix::process::kill_process(p, sig) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => panic!("kill -{} {pid}: {e}", sig.as_raw()),
    }
}

/// Starts `cmd` with its data segment limited to `bytes` (`RLIMIT_DATA`,
/// soft and hard), as a memory cap a greedy process dies against.
pub fn limit_data(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    let lim = rustix::process::Rlimit {
        current: Some(bytes),
        maximum: Some(bytes),
    };
    // SAFETY: the closure runs between fork and exec and only makes the
    // setrlimit system call (async-signal-safe; no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setrlimit(rustix::process::Resource::Data, lim)
                .map_err(io::Error::from)
        });
    }
}

/// Every process whose command line mentions `marker` (not this one). The
/// tests of all areas run concurrently in one process: pass a marker only
/// the test's own processes carry (its store's or scratch directory's path).
pub fn processes_naming(marker: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut out = vec![];
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if pid != me && cmd.contains(marker) {
            out.push((pid, cmd));
        }
    }
    out
}

/// The snapshots of `host` in the local store `store`, oldest first (names
/// within one minute carry suffixes .1, .2, ... .10, which sort after the
/// plain name and by number). No host directory: none.
pub fn snapshots(store: &Path, host: &str) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(store.join(host)) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => vec![],
        Err(e) => panic!("read_dir {}: {e}", store.join(host).display()),
    };
    v.sort_by_key(|n| match n.split_once('.') {
        Some((base, k)) => (base.to_string(), k.parse::<u64>().unwrap_or(0) + 1),
        None => (n.clone(), 0),
    });
    v
}

/// `byteback-backup` of `src` as `host` into `store` "as of" `now` (Unix
/// seconds): the server is started through `wrapper` ([`server_wrapper`]),
/// no retries.
pub fn backup_at(store: &Path, wrapper: &Path, src: &Path, host: &str, now: i64) -> Command {
    let mut c = Command::new(bin("byteback-backup"));
    c.env("BYTEBACK_SERVER", wrapper)
        .env("BYTEBACK_TEST_NOW", rfc3339(now))
        .env("TZ", "UTC")
        .arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", host, "--retry-number", "0"]);
    c
}

/// Creates the local store directory `store` (if missing) with a
/// `byteback.toml` of `min_snapshot_interval = 0`, so every backup of a test
/// makes a snapshot however close together they run.
pub fn store_without_interval(store: &Path) {
    fs::create_dir_all(store).unwrap_or_else(|e| panic!("mkdir {}: {e}", store.display()));
    write_file(&store.join("byteback.toml"), b"min_snapshot_interval = 0\n");
}

/// `byteback-backup` of `src` as `host` into the local store `store`, no
/// retries; panics (with its output) when it fails.
pub fn local_backup(store: &Path, src: &Path, host: &str) -> Output {
    run(&mut local_backup_cmd(store, src, host))
}

/// [`local_backup`], whatever its exit code.
pub fn local_backup_status(store: &Path, src: &Path, host: &str) -> Output {
    run_status(&mut local_backup_cmd(store, src, host))
}

/// The command [`local_backup`] runs.
pub fn local_backup_cmd(store: &Path, src: &Path, host: &str) -> Command {
    let mut cmd = Command::new(bin("byteback-backup"));
    cmd.arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", host, "--retry-number", "0"]);
    cmd
}

/// The number just before `marker` in the client's last summary line
/// (`byteback-backup: ... N marker ...`) in `err`; `None` without one.
pub fn summary_number(err: &str, marker: &str) -> Option<u64> {
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with("byteback-backup:") && l.contains(marker))?;
    let at = line.find(marker)?;
    line[..at]
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// A test's time budget: `$VAR` seconds when set (and a number), else
/// `default_secs`.
pub fn budget_from_env(var: &str, default_secs: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_secs),
    )
}

/// 40 directories `a/NN` of 250 small files each under `src`, and `b/kept`:
/// enough entries for a manifest of several compressed blocks, all in a part
/// (`a/`) a test can remove before the next run.
pub fn make_wide_tree(src: &Path) {
    for i in 0..40 {
        let dir = src.join(format!("a/{i:02}"));
        fs::create_dir_all(&dir).unwrap();
        for j in 0..250 {
            fs::write(dir.join(format!("file-{j:03}")), format!("{i} {j}")).unwrap();
        }
    }
    fs::create_dir_all(src.join("b")).unwrap();
    fs::write(src.join("b/kept"), "kept").unwrap();
}

/// A scratch directory laid out for local backups: `conf/` (the client's
/// settings, passed as `BYTEBACK_CONFIG_DIR`), `store/` (made by
/// [`store_without_interval`]) and an empty `src/`.
pub struct LocalSite {
    pub work: PathBuf,
    pub conf: PathBuf,
    pub store: PathBuf,
    pub src: PathBuf,
    _dir: tempfile::TempDir,
}

impl LocalSite {
    pub fn fresh() -> LocalSite {
        let dir = scratch();
        let work = dir.path().to_path_buf();
        let (conf, store, src) = (work.join("conf"), work.join("store"), work.join("src"));
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&src).unwrap();
        store_without_interval(&store);
        LocalSite {
            work,
            conf,
            store,
            src,
            _dir: dir,
        }
    }
}

/// The tree digest of every snapshot of a host as first seen, to check
/// that none ever changes afterwards (the torture tests).
#[derive(Default)]
pub struct SnapshotDigests(std::collections::BTreeMap<String, String>);

impl SnapshotDigests {
    /// Every snapshot seen so far, with its digest.
    pub fn seen(&self) -> &std::collections::BTreeMap<String, String> {
        &self.0
    }

    /// Records the snapshots of `host` in `store` not seen before; panics
    /// (naming `round`) when one seen before differs now.
    pub fn check(&mut self, store: &Path, host: &str, round: u64) {
        for s in snapshots(store, host) {
            let dig = tree_digest(&store.join(host).join(&s));
            match self.0.get(&s) {
                Some(old) => assert_eq!(
                    digest_diff(old, &dig),
                    "",
                    "snapshot {s} changed (round {round})"
                ),
                None => {
                    self.0.insert(s, dig);
                }
            }
        }
    }
}

/// Waits for `child` until `limit` has passed since `start`; then kills
/// and reaps it and returns `None`.
pub fn wait_until(
    child: &mut std::process::Child,
    start: std::time::Instant,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` with a hard deadline and returns its output and how long it
/// ran. Still running at the deadline: the client is killed, and so is
/// every process naming `marker` (its server), and the test fails.
pub fn run_bounded(
    cmd: &mut Command,
    limit: std::time::Duration,
    marker: &str,
) -> (Output, std::time::Duration) {
    let dir = scratch();
    let (out_p, err_p) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let start = std::time::Instant::now();
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&out_p).unwrap())
        .stderr(fs::File::create(&err_p).unwrap())
        .spawn()
        .unwrap();
    let Some(status) = wait_until(&mut child, start, limit) else {
        for (pid, _) in processes_naming(marker) {
            kill9(pid);
        }
        panic!(
            "HANG: {cmd:?} still running after {} s; stderr so far:\n{}",
            limit.as_secs(),
            fs::read_to_string(&err_p).unwrap_or_default()
        );
    };
    let took = start.elapsed();
    let out = Output {
        status,
        stdout: fs::read(&out_p).unwrap(),
        stderr: fs::read(&err_p).unwrap(),
    };
    (out, took)
}

pub fn kill9(pid: u32) {
    send_signal(pid, Signal::KILL);
}

/// The time now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// RFC 3339 form of Unix seconds (UTC).
pub fn rfc3339(t: i64) -> String {
    let n = byteback_server::time::format_name(t, 0);
    format!("{}:{:02}Z", &n[..16], t.rem_euclid(60))
}

/// A `byteback-server` wrapper in `dir` that adds `--now $BYTEBACK_TEST_NOW`:
/// the client starts it through `BYTEBACK_SERVER`, so whole backups run "as
/// of" a date.
pub fn server_wrapper(dir: &Path) -> PathBuf {
    write_script(
        &dir.join("server-at-now"),
        &format!(
            "#!/bin/sh\nexec '{}' \"$@\" --now \"$BYTEBACK_TEST_NOW\"\n",
            bin("byteback-server").display()
        ),
    )
}

/// Writes an executable script `text` at `p` and returns its path.
pub fn write_script(p: &Path, text: &str) -> PathBuf {
    fs::write(p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    p.to_path_buf()
}

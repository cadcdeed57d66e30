//! Hostile clients: crafted protocol bytes fed straight into the real
//! `byteback-server serve --host victim --store STORE`.
//!
//! Every test starts from a store holding one legitimate snapshot of `victim`
//! (made by the real `byteback-backup`), a neighbouring host `neighbour` with
//! a [`Sentinel`] in its directory, a file `SENTINEL` in the store root and a
//! [`Sentinel`] in `<scratch>/outside`, the directory the attacks aim at.
//! After each hostile session the server must have refused (non-zero exit and
//! a clear message on stderr and in a final `Error` frame), or, where the
//! input is legal, succeeded without doing anything unsafe; in both cases
//! nothing outside `<store>/victim` changed and no existing snapshot changed.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

use crate::util;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use byteback_delta::{hash_bytes, literal_delta, shorten_signature, wire_strong_len};
use byteback_protocol::limits::{MAX_CHUNK, MAX_FRAME};
use byteback_protocol::{
    decode_server, encode, read_frame, ClientMsg, Compressed, Entry, Kind, ServerMsg, MAGIC,
    PROTOCOL_VERSION,
};

use util::*;

/// The host every hostile session is filed under.
const HOST: &str = "victim";
/// A server still running after this long has hung: it is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(20);
/// `RLIMIT_DATA` for sessions that try to make the server allocate: the
/// server's buffers, one 20 MiB frame and one 10 MiB chunk fit; inflating a
/// 64 MiB bomb does not (the allocation fails and the server aborts, which
/// the test reports as a death by signal).
const DATA_LIMIT: u64 = 48 << 20;

// ---------------------------------------------------------------------------
// Running the server
// ---------------------------------------------------------------------------

/// What one server run produced.
struct Outcome {
    what: String,
    /// Exit code; `None` when killed by a signal.
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    /// Decoded frames of stdout.
    msgs: Vec<ServerMsg>,
    /// Why stdout did not decode cleanly to the end, if it did not.
    stdout_problem: Option<String>,
    elapsed: Duration,
}

impl Outcome {
    fn describe(&self) -> String {
        let names: Vec<&str> = self.msgs.iter().map(ServerMsg::name).collect();
        format!(
            "[{}] exit {:?} signal {:?} after {:?}\nframes: {names:?}\nlast error frame: {:?}\nstdout problem: {:?}\nstderr:\n{}",
            self.what,
            self.code,
            self.signal,
            self.elapsed,
            self.error_frame(),
            self.stdout_problem,
            self.stderr
        )
    }

    /// The message of the last frame if it is an `Error`.
    fn error_frame(&self) -> Option<&str> {
        match self.msgs.last() {
            Some(ServerMsg::Error { message }) => Some(message),
            _ => None,
        }
    }

    fn backup_done(&self) -> Option<&ServerMsg> {
        self.msgs
            .iter()
            .find(|m| matches!(m, ServerMsg::BackupDone { .. }))
    }

    /// Never a panic, never a signal, and stdout carries nothing but whole frames.
    fn assert_sane(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "server panicked:\n{}",
            self.describe()
        );
        assert!(
            self.signal.is_none() && self.code.is_some(),
            "server died from a signal:\n{}",
            self.describe()
        );
        assert!(
            self.stdout_problem.is_none(),
            "server stdout is not a clean frame stream:\n{}",
            self.describe()
        );
    }

    /// Non-zero exit, a final `Error` frame, the same reason on stderr, no
    /// commit, no file content sent, and one of `needles` (case-insensitive)
    /// in the message.
    fn assert_refused(&self, needles: &[&str]) {
        self.assert_sane();
        assert!(
            self.code.is_some_and(|c| c != 0),
            "server should have failed:\n{}",
            self.describe()
        );
        let Some(frame) = self.error_frame() else {
            panic!("no final Error frame:\n{}", self.describe());
        };
        assert!(
            !frame.trim().is_empty() && self.stderr.contains("byteback-server: "),
            "the reason is not reported on both channels:\n{}",
            self.describe()
        );
        let text = format!("{frame}\n{}", self.stderr).to_lowercase();
        assert!(
            needles.iter().any(|n| text.contains(&n.to_lowercase())),
            "message does not say {needles:?}:\n{}",
            self.describe()
        );
        assert!(
            self.backup_done().is_none(),
            "a refused session committed a backup:\n{}",
            self.describe()
        );
        assert!(
            !self.msgs.iter().any(|m| matches!(
                m,
                ServerMsg::FilePart(_) | ServerMsg::FilePartRaw(_) | ServerMsg::FileDone
            )),
            "a refused session sent file content:\n{}",
            self.describe()
        );
    }

    /// A successful backup: exit 0, HelloOk naming `victim`, `files` files
    /// acknowledged, no retry, and a snapshot taken. Returns its name.
    fn assert_backup_ok(&self, files: usize) -> String {
        self.assert_sane();
        assert_eq!(self.code, Some(0), "backup failed:\n{}", self.describe());
        match self.msgs.first() {
            Some(ServerMsg::HelloOk { host, .. }) => assert_eq!(host, HOST),
            _ => panic!("no HelloOk first:\n{}", self.describe()),
        }
        let oks = self
            .msgs
            .iter()
            .filter(|m| matches!(m, ServerMsg::FileOk { .. }))
            .count();
        assert_eq!(oks, files, "FileOk count:\n{}", self.describe());
        assert!(
            !self
                .msgs
                .iter()
                .any(|m| matches!(m, ServerMsg::FileRetry { .. } | ServerMsg::Error { .. })),
            "{}",
            self.describe()
        );
        match self.msgs.last() {
            Some(ServerMsg::BackupDone {
                snapshot: Some(s), ..
            }) => s.clone(),
            _ => panic!("no BackupDone with a snapshot:\n{}", self.describe()),
        }
    }
}

/// Runs `byteback-server ARGS` with `input` as its whole stdin (then closed),
/// collecting stdout and stderr, optionally under `RLIMIT_DATA` =
/// `data_limit`; kills it and fails after [`TIMEOUT`].
fn run_server(what: &str, args: &[OsString], input: &[u8], data_limit: Option<u64>) -> Outcome {
    let mut cmd = Command::new(bin("byteback-server"));
    cmd.args(args);
    if let Some(limit) = data_limit {
        limit_data(&mut cmd, limit);
    }
    run_server_cmd(what, cmd, input)
}

/// [`run_server`] of a command made by the caller.
fn run_server_cmd(what: &str, mut cmd: Command, input: &[u8]) -> Outcome {
    let start = Instant::now();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start byteback-server: {e}"));
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // The server may stop reading at any point; a broken pipe is expected then.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = err.read_to_end(&mut v);
        v
    });
    // Wait on a helper thread, so the wait can time out. The child is reaped
    // only there, so until then its pid cannot be reused and the kill below
    // hits nothing else.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let (status, hung) = match rx.recv_timeout(TIMEOUT) {
        Ok(s) => (s, false),
        Err(_) => {
            send_signal(pid, Signal::KILL);
            (rx.recv().unwrap(), true)
        }
    };
    let status = status.unwrap_or_else(|e| panic!("[{what}] cannot wait for the server: {e}"));
    let elapsed = start.elapsed();
    let _ = writer.join();
    let stdout = out_reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    let (msgs, stdout_problem) = decode_frames(&stdout);
    let o = Outcome {
        what: what.to_string(),
        code: status.code(),
        signal: status.signal(),
        stderr,
        msgs,
        stdout_problem,
        elapsed,
    };
    assert!(
        !hung,
        "server hung: killed after {TIMEOUT:?}\n{}",
        o.describe()
    );
    o
}

fn decode_frames(mut bytes: &[u8]) -> (Vec<ServerMsg>, Option<String>) {
    let mut msgs = vec![];
    loop {
        match read_frame(&mut bytes) {
            Ok(None) => return (msgs, None),
            Ok(Some(f)) => match decode_server(&f) {
                Ok(m) => msgs.push(m),
                Err(e) => return (msgs, Some(format!("undecodable frame: {e}"))),
            },
            Err(e) => return (msgs, Some(format!("bad frame: {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------
// Building sessions
// ---------------------------------------------------------------------------

/// Client bytes, remembering where each frame ends.
#[derive(Clone, Default)]
struct Script {
    bytes: Vec<u8>,
    frame_ends: Vec<usize>,
}

impl Script {
    fn msg(mut self, m: &ClientMsg) -> Self {
        self.bytes.extend(encode(m).unwrap());
        self.frame_ends.push(self.bytes.len());
        self
    }

    fn raw(mut self, b: &[u8]) -> Self {
        self.bytes.extend_from_slice(b);
        self
    }

    /// Hello only.
    fn hello() -> Self {
        Script::default().msg(&ClientMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        })
    }

    /// Hello and BackupStart.
    fn backup() -> Self {
        Self::hello().msg(&ClientMsg::BackupStart { checksum: false })
    }
}

/// A fresh mtime for every session, so a crafted file never matches what
/// `current` already holds (which would spare it a transfer and shift the ids).
/// All values have the same bincode length, so sessions differing only in
/// mtime have the same frame layout.
fn fresh_mtime() -> i64 {
    static N: AtomicI64 = AtomicI64::new(0);
    1_600_000_000 + N.fetch_add(1, Ordering::Relaxed)
}

fn entry(path: &[u8], kind: Kind, mode: u32, mtime: i64) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: mtime,
        mtime_nsec: 0,
        xattrs: vec![],
    }
}

fn dir_e(path: &[u8], mtime: i64) -> Entry {
    entry(path, Kind::Dir, 0o755, mtime)
}

fn file_e(path: &[u8], size: usize, mtime: i64) -> Entry {
    entry(path, Kind::File { size: size as u64 }, 0o644, mtime)
}

fn symlink_e(path: &[u8], target: &[u8], mtime: i64) -> Entry {
    entry(
        path,
        Kind::Symlink {
            target: target.to_vec(),
        },
        0o777,
        mtime,
    )
}

fn file_data(id: u32, content: &[u8]) -> ClientMsg {
    ClientMsg::FileData {
        id,
        delta: Compressed::compress(&literal_delta(content), 1).unwrap(),
    }
}

fn file_end(id: u32, content: &[u8], mtime: i64) -> ClientMsg {
    ClientMsg::FileEnd {
        id,
        size: content.len() as u64,
        hash: hash_bytes(content),
        mtime_sec: mtime,
        mtime_nsec: 0,
    }
}

/// A whole backup as an honest client would send it: one batch with every
/// entry, then the content of each regular file (transfer ids 0, 1, ... in
/// entry order, which is how the server assigns them when every file is
/// new or changed), then BackupEnd.
fn backup_script(items: &[(Entry, Option<&[u8]>)]) -> Script {
    let entries: Vec<Entry> = items.iter().map(|(e, _)| e.clone()).collect();
    let mut s = Script::backup().msg(&ClientMsg::Entries(entries));
    let mut id = 0;
    for (e, content) in items {
        if let Kind::File { .. } = e.kind {
            let c = content.expect("a File item needs content");
            s = s.msg(&file_data(id, c)).msg(&file_end(id, c, e.mtime_sec));
            id += 1;
        }
    }
    s.msg(&ClientMsg::BackupEnd)
}

fn frame_of_payload(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// One block of a hand-made zstd frame.
enum ZBlock<'a> {
    Raw(&'a [u8]),
    /// `n` copies of one byte.
    Rle(u8, u32),
}

/// A zstd frame (RFC 8878) of raw and RLE blocks, without a content size or
/// checksum and with a 128 KiB window: lets a tiny frame expand to any size
/// without needing a compressor.
fn zstd_frame(blocks: &[ZBlock]) -> Vec<u8> {
    let mut out = 0xFD2F_B528u32.to_le_bytes().to_vec();
    out.push(0x00); // Frame_Header_Descriptor: no FCS, not single-segment, no checksum, no dict
    out.push(7 << 3); // Window_Descriptor: 2^(10 + 7) = 128 KiB
    for (i, b) in blocks.iter().enumerate() {
        let last = u32::from(i + 1 == blocks.len());
        let (ty, size, body) = match b {
            ZBlock::Raw(d) => (0u32, d.len() as u32, d.to_vec()),
            ZBlock::Rle(byte, n) => (1u32, *n, vec![*byte]),
        };
        assert!(size <= 128 << 10, "zstd block too large");
        out.extend_from_slice(&((size << 3) | (ty << 1) | last).to_le_bytes()[..3]);
        out.extend(body);
    }
    out
}

/// librsync delta header of one literal of `len` bytes, 8-byte length form.
fn literal_header(len: u64) -> Vec<u8> {
    let mut h = 0x7273_0236u32.to_be_bytes().to_vec();
    h.push(0x44);
    h.extend_from_slice(&len.to_be_bytes());
    h
}

// ---------------------------------------------------------------------------
// The store under attack
// ---------------------------------------------------------------------------

fn names_in(dir: &Path) -> BTreeSet<Vec<u8>> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect()
}

/// Every path below `root` with its lstat, parents first; never follows symlinks.
fn walk_all(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for name in names_in(&d) {
            let p = d.join(OsStr::from_bytes(&name));
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, m));
        }
    }
    out
}

/// A scratch directory with a store under attack; see the module docs.
struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
    outside: PathBuf,
    /// Where restores go.
    work: PathBuf,
    outside_sentinel: Sentinel,
    neighbour_sentinel: Sentinel,
    /// Snapshot name -> tree digest.
    snaps: BTreeMap<String, String>,
    /// Names in `<store>/victim`.
    host_listing: BTreeSet<Vec<u8>>,
    /// Digest of the store with everything under `victim` left out.
    store_rest: String,
    /// `current/.byteback/manifest` as last committed.
    manifest: Vec<u8>,
    /// Names at the top of the scratch directory.
    root_listing: BTreeSet<Vec<u8>>,
}

impl Env {
    fn new() -> Env {
        Env::in_dir(scratch())
    }

    /// An environment in `dir` (on a btrfs filesystem, for clones).
    fn in_dir(dir: tempfile::TempDir) -> Env {
        let root = dir.path().to_path_buf();
        let store = root.join("store");
        store_without_interval(&store);
        let outside = root.join("outside");
        fs::create_dir(&outside).unwrap();
        let outside_sentinel = Sentinel::plant(&outside);
        let work = root.join("work");
        fs::create_dir(&work).unwrap();

        let src = root.join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("hello.txt"), b"hello\n").unwrap();
        fs::write(src.join("sub/data.bin"), Rng::new(1).bytes(5000)).unwrap();
        std::os::unix::fs::symlink("../hello.txt", src.join("sub/link")).unwrap();
        local_backup(&store, &src, "neighbour");
        local_backup(&store, &src, HOST);
        // Next to the host directory: another host's backups, and a file in the store root.
        let neighbour_sentinel = Sentinel::plant(&store.join("neighbour"));
        fs::write(store.join("SENTINEL"), Rng::from_time().bytes(1234)).unwrap();

        let mut env = Env {
            _dir: dir,
            root: root.clone(),
            store,
            outside,
            work,
            outside_sentinel,
            neighbour_sentinel,
            snaps: BTreeMap::new(),
            host_listing: BTreeSet::new(),
            store_rest: String::new(),
            manifest: vec![],
            root_listing: names_in(&root),
        };
        env.store_rest = env.store_rest_digest();
        let new = env.accept();
        assert_eq!(new.len(), 1, "the legitimate backup made no snapshot");
        env
    }

    fn host_dir(&self) -> PathBuf {
        self.store.join(HOST)
    }

    fn current(&self) -> PathBuf {
        self.host_dir().join("current")
    }

    fn snapshot_names(&self) -> Vec<String> {
        names_in(&self.host_dir())
            .into_iter()
            .map(|n| String::from_utf8(n).unwrap())
            .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
            .collect()
    }

    fn store_rest_digest(&self) -> String {
        tree_digest(&self.store)
            .lines()
            .filter(|l| !l.starts_with("victim ") && !l.starts_with("victim/"))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    fn read_manifest(&self) -> Vec<u8> {
        fs::read(self.current().join(".byteback/manifest")).unwrap()
    }

    fn serve(&self, what: &str, input: &[u8]) -> Outcome {
        self.serve_as(what, HOST, &[], input)
    }

    /// [`Env::serve`] under `RLIMIT_DATA` = [`DATA_LIMIT`].
    fn serve_limited(&self, what: &str, input: &[u8]) -> Outcome {
        run_server(what, &self.serve_args(HOST, &[]), input, Some(DATA_LIMIT))
    }

    fn serve_as(&self, what: &str, host: &str, extra: &[&str], input: &[u8]) -> Outcome {
        run_server(what, &self.serve_args(host, extra), input, None)
    }

    fn serve_args(&self, host: &str, extra: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["serve".into(), format!("--host={host}").into()];
        args.push("--store".into());
        args.push(self.store.clone().into());
        args.extend(extra.iter().map(OsString::from));
        args
    }

    /// The previously recorded snapshots are intact; nothing outside
    /// `<store>/victim` changed.
    fn check_world(&self) {
        self.outside_sentinel.assert_untouched();
        self.neighbour_sentinel.assert_untouched();
        let rest = self.store_rest_digest();
        assert!(
            rest == self.store_rest,
            "the store outside {HOST}/ changed:\n{}",
            digest_diff(&self.store_rest, &rest)
        );
        assert_eq!(
            names_in(&self.root),
            self.root_listing,
            "names appeared or vanished next to the store"
        );
        for (name, digest) in &self.snaps {
            let path = self.host_dir().join(name);
            assert!(path.is_dir(), "snapshot {name} is gone");
            let now = tree_digest(&path);
            assert!(
                &now == digest,
                "snapshot {name} changed:\n{}",
                digest_diff(digest, &now)
            );
        }
    }

    /// After a refused session: [`Env::check_world`], no new snapshot (the
    /// host directory holds the same names) and the manifest was not replaced.
    fn check_unchanged(&self) {
        self.check_world();
        let listing = names_in(&self.host_dir());
        assert!(
            listing == self.host_listing,
            "{}/ changed: {:?} -> {:?}",
            HOST,
            self.host_listing
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect::<Vec<_>>(),
            listing
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect::<Vec<_>>()
        );
        assert!(
            self.read_manifest() == self.manifest,
            "a refused session replaced the manifest"
        );
    }

    /// After a successful session: [`Env::check_world`], then records the new
    /// snapshots (returned), the host listing and the manifest.
    fn accept(&mut self) -> Vec<String> {
        self.check_world();
        let mut new = vec![];
        for name in self.snapshot_names() {
            if !self.snaps.contains_key(&name) {
                let d = tree_digest(&self.host_dir().join(&name));
                self.snaps.insert(name.clone(), d);
                new.push(name);
            }
        }
        self.host_listing = names_in(&self.host_dir());
        self.manifest = self.read_manifest();
        new
    }

    /// Refused session: the outcome and the store both say so.
    fn refused(&self, o: &Outcome, needles: &[&str]) {
        o.assert_refused(needles);
        self.check_unchanged();
        assert_nothing_named(&self.root, "pwn");
    }

    fn restore_cmd(&self) -> Command {
        let mut c = Command::new(bin("byteback-restore"));
        c.current_dir(&self.work)
            .arg("--destination")
            .arg(&self.store)
            .args(["--hostname", HOST]);
        c
    }
}

/// Panics if anything named `name` exists anywhere below `root`.
fn assert_nothing_named(root: &Path, name: &str) {
    for (p, _) in walk_all(root) {
        assert!(
            p.file_name() != Some(OsStr::new(name)),
            "{} exists",
            p.display()
        );
    }
}

// ---------------------------------------------------------------------------
// 1-3: paths that leave the tree
// ---------------------------------------------------------------------------

#[test]
fn dot_dot_components_are_refused() {
    let env = Env::new();
    let m = fresh_mtime();
    let pwn = b"pwned".as_slice();
    // From current/a, four `..` reach the scratch root, which holds outside/.
    for (what, path) in [
        (
            "a/../../../../outside/pwn",
            b"a/../../../../outside/pwn".as_slice(),
        ),
        ("../../../outside/pwn", b"../../../outside/pwn".as_slice()),
        ("a/..", b"a/..".as_slice()),
    ] {
        // The parent goes in a batch of its own, so it is acted on before the attack arrives.
        let s = Script::backup()
            .msg(&ClientMsg::Entries(vec![dir_e(b"a", m)]))
            .msg(&ClientMsg::Entries(vec![file_e(path, pwn.len(), m)]))
            .msg(&file_data(0, pwn))
            .msg(&file_end(0, pwn, m))
            .msg(&ClientMsg::BackupEnd);
        let o = env.serve(what, &s.bytes);
        env.refused(&o, &["dot component"]);
    }
    for kind in [
        Kind::Dir,
        Kind::File { size: 5 },
        Kind::Symlink {
            target: b"x".to_vec(),
        },
    ] {
        let s = backup_script(&[(entry(b"..", kind.clone(), 0o755, m), Some(pwn))]);
        let o = env.serve(&format!("`..` alone as {kind:?}"), &s.bytes);
        env.refused(&o, &["dot component"]);
    }
    // A hard link whose first name is outside.
    let s = backup_script(&[(
        entry(
            b"h",
            Kind::HardLink {
                target: b"../../../outside/SENTINEL".to_vec(),
            },
            0o644,
            m,
        ),
        None,
    )]);
    let o = env.serve("hard link to ../", &s.bytes);
    env.refused(&o, &["dot component"]);
    // Reading through `..`.
    let s = Script::hello().msg(&ClientMsg::ReadFile {
        snapshot: "current".into(),
        path: b"../../../outside/SENTINEL".to_vec(),
    });
    let o = env.serve("ReadFile ../", &s.bytes);
    env.refused(&o, &["dot component"]);
    for snap in ["..", "../neighbour/current", "."] {
        let s = Script::hello().msg(&ClientMsg::ReadManifest {
            snapshot: snap.into(),
        });
        let o = env.serve(&format!("ReadManifest {snap}"), &s.bytes);
        env.refused(&o, &["not a valid snapshot name"]);
    }
}

#[test]
fn absolute_paths_are_refused() {
    let env = Env::new();
    let m = fresh_mtime();
    let pwn = b"pwned".as_slice();
    let target = env.outside.join("pwn");
    let abs = target.as_os_str().as_bytes();
    let s = backup_script(&[(file_e(abs, pwn.len(), m), Some(pwn))]);
    let o = env.serve("absolute file path", &s.bytes);
    env.refused(&o, &["absolute"]);
    let s = backup_script(&[(dir_e(env.outside.as_os_str().as_bytes(), m), None)]);
    let o = env.serve("absolute dir path", &s.bytes);
    env.refused(&o, &["absolute"]);
    let s = backup_script(&[(dir_e(b"/", m), None)]);
    let o = env.serve("the root itself", &s.bytes);
    env.refused(&o, &["absolute"]);
    let s = backup_script(&[(
        entry(
            b"h",
            Kind::HardLink {
                target: b"/etc/passwd".to_vec(),
            },
            0o644,
            m,
        ),
        None,
    )]);
    let o = env.serve("hard link to an absolute path", &s.bytes);
    env.refused(&o, &["absolute"]);
    let s = Script::hello().msg(&ClientMsg::ReadFile {
        snapshot: "current".into(),
        path: b"/etc/passwd".to_vec(),
    });
    let o = env.serve("ReadFile /etc/passwd", &s.bytes);
    env.refused(&o, &["absolute"]);
    assert!(!target.exists());
}

#[test]
fn nul_in_path_is_refused() {
    let env = Env::new();
    let m = fresh_mtime();
    let pwn = b"pwned".as_slice();
    for path in [
        b"a\0b".as_slice(),
        b"pwn\0".as_slice(),
        b"\0".as_slice(),
        b"d\0/../../../outside/pwn".as_slice(),
    ] {
        let s = backup_script(&[(file_e(path, pwn.len(), m), Some(pwn))]);
        let o = env.serve(&format!("NUL in {path:?}"), &s.bytes);
        env.refused(&o, &["NUL"]);
    }
    let s = backup_script(&[(symlink_e(b"l", b"/etc\0/passwd", m), None)]);
    let o = env.serve("NUL in a symlink target", &s.bytes);
    env.refused(&o, &["NUL"]);
    let mut e = file_e(b"x", pwn.len(), m);
    e.xattrs = vec![(b"user.a\0b".to_vec(), b"v".to_vec())];
    let s = backup_script(&[(e, Some(pwn))]);
    let o = env.serve("NUL in an xattr name", &s.bytes);
    env.refused(&o, &["bad xattr name"]);
    let s = Script::hello().msg(&ClientMsg::ReadFile {
        snapshot: "current".into(),
        path: b"work\0".to_vec(),
    });
    let o = env.serve("ReadFile with NUL", &s.bytes);
    env.refused(&o, &["NUL"]);
}

// ---------------------------------------------------------------------------
// 4: symlinks planted in the tree
// ---------------------------------------------------------------------------

#[test]
fn symlink_cannot_redirect_writes() {
    let mut env = Env::new();
    let outside = env.outside.as_os_str().as_bytes().to_vec();
    let sentinel = env.outside.join("SENTINEL");
    let sentinel_b = sentinel.as_os_str().as_bytes().to_vec();
    let pwn = b"pwned through a symlink".as_slice();

    // In one session: a symlink, then a file beneath it.
    let m = fresh_mtime();
    let s = backup_script(&[
        (symlink_e(b"evil", &outside, m), None),
        (file_e(b"evil/pwn", pwn.len(), m), Some(pwn)),
    ]);
    let o = env.serve("symlink then file beneath it", &s.bytes);
    env.refused(&o, &["without its parent directory"]);

    // The same one level down.
    let s = backup_script(&[
        (dir_e(b"d", m), None),
        (symlink_e(b"d/link", &outside, m), None),
        (file_e(b"d/link/pwn", pwn.len(), m), Some(pwn)),
    ]);
    let o = env.serve("dir, symlink in it, file beneath the symlink", &s.bytes);
    env.refused(&o, &["without its parent directory"]);

    // A directory beneath the symlink, then a file in that directory.
    let s = backup_script(&[
        (symlink_e(b"evil", &outside, m), None),
        (dir_e(b"evil/sub", m), None),
        (file_e(b"evil/sub/pwn", pwn.len(), m), Some(pwn)),
    ]);
    let o = env.serve("symlink then dir beneath it", &s.bytes);
    env.refused(&o, &["without its parent directory"]);

    // Across sessions: the symlinks are legal content and get committed...
    let m = fresh_mtime();
    let s = backup_script(&[
        (symlink_e(b"evil", &outside, m), None),
        (symlink_e(b"leak", &sentinel_b, m), None),
        (symlink_e(b"over", &sentinel_b, m), None),
    ]);
    let o = env.serve("commit symlinks to outside", &s.bytes);
    let snap1 = o.assert_backup_ok(0);
    assert_eq!(env.accept(), vec![snap1.clone()]);
    assert_eq!(
        fs::read_link(env.current().join("evil")).unwrap(),
        env.outside
    );

    // ...and cannot be read through.
    for (what, path) in [
        ("ReadFile of a symlink to outside", b"leak".as_slice()),
        ("ReadFile beneath a symlink to outside", b"evil/SENTINEL"),
    ] {
        for snap in ["current", snap1.as_str()] {
            let s = Script::hello().msg(&ClientMsg::ReadFile {
                snapshot: snap.into(),
                path: path.to_vec(),
            });
            let o = env.serve(&format!("{what} in {snap}"), &s.bytes);
            env.refused(&o, &["cannot open"]);
        }
    }

    // Next session: a real directory where the symlink was, a file in it,
    // and a regular file where another symlink was.
    let m = fresh_mtime();
    let s = backup_script(&[
        (dir_e(b"evil", m), None),
        (file_e(b"evil/pwn", pwn.len(), m), Some(pwn)),
        (file_e(b"over", pwn.len(), m), Some(pwn)),
    ]);
    let o = env.serve("dir and file replacing the symlinks", &s.bytes);
    let snap2 = o.assert_backup_ok(2);
    assert_eq!(env.accept(), vec![snap2.clone()]);
    for base in [env.current(), env.host_dir().join(&snap2)] {
        let evil = fs::symlink_metadata(base.join("evil")).unwrap();
        assert!(evil.is_dir(), "evil is not a real directory in {base:?}");
        assert_eq!(fs::read(base.join("evil/pwn")).unwrap(), pwn);
        let over = fs::symlink_metadata(base.join("over")).unwrap();
        assert!(over.is_file(), "over is not a regular file in {base:?}");
        assert_eq!(fs::read(base.join("over")).unwrap(), pwn);
    }
    // The first snapshot still holds the symlinks (check_world compared its digest).
    assert!(
        fs::symlink_metadata(env.host_dir().join(&snap1).join("evil"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    env.check_world();
}

// ---------------------------------------------------------------------------
// 5-6: resource exhaustion
// ---------------------------------------------------------------------------

#[test]
fn oversized_frames_fail_fast() {
    let env = Env::new();
    let junk = vec![0x5au8; 64 << 10];
    let over = (MAX_FRAME as u32 + 1).to_le_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "0xFFFFFFFF as the first frame",
            Script::default().raw(&[0xff; 4]).raw(&junk).bytes,
            "exceeds the limit",
        ),
        (
            "MAX_FRAME + 1 as the first frame",
            Script::default().raw(&over).raw(&junk).bytes,
            "exceeds the limit",
        ),
        (
            "0xFFFFFFFF inside a backup",
            Script::backup().raw(&[0xff; 4]).raw(&junk).bytes,
            "exceeds the limit",
        ),
        (
            "MAX_FRAME + 1 inside a backup",
            Script::backup().raw(&over).raw(&junk).bytes,
            "exceeds the limit",
        ),
        (
            "MAX_FRAME exactly, but only 64 KiB sent",
            Script::backup()
                .raw(&(MAX_FRAME as u32).to_le_bytes())
                .raw(&junk)
                .bytes,
            "middle of a frame",
        ),
        (
            "an Entries batch claiming 2^60 entries",
            Script::backup()
                .raw(&frame_of_payload(
                    &[&[2u8, 253][..], &(1u64 << 60).to_le_bytes()].concat(),
                ))
                .bytes,
            "undecodable",
        ),
        (
            "a path claiming 2^40 bytes",
            Script::backup()
                .raw(&frame_of_payload(
                    &[&[2u8, 1, 253][..], &(1u64 << 40).to_le_bytes()].concat(),
                ))
                .bytes,
            "undecodable",
        ),
    ];
    for (what, input, needle) in cases {
        let o = env.serve_limited(what, &input);
        env.refused(&o, &[needle]);
        assert!(
            o.elapsed < Duration::from_secs(5),
            "not refused quickly:\n{}",
            o.describe()
        );
    }
}

/// Panics if any file under `root` is larger than `max` bytes.
fn assert_no_file_larger(root: &Path, max: u64) {
    for (p, m) in walk_all(root) {
        assert!(
            m.len() <= max || m.is_dir(),
            "{} has {} bytes",
            p.display(),
            m.len()
        );
    }
}

/// `s` and 12 batches of 8 directories with 960 KiB of xattrs each (about
/// 90 MiB of entries).
fn heavy_batches(mut s: Script, m: i64) -> Script {
    let mut n = 0;
    for _ in 0..12 {
        let mut batch = vec![];
        for _ in 0..8 {
            let mut e = dir_e(format!("d{n:04}").as_bytes(), m);
            e.xattrs = (0..15u8)
                .map(|i| (format!("user.x{i:02}").into_bytes(), vec![i; 64 << 10]))
                .collect();
            batch.push(e);
            n += 1;
        }
        s = s.msg(&ClientMsg::Entries(batch));
    }
    s
}

/// While one announced file stays unfinished, the entries after it wait in
/// memory to be written to the manifest in order. A client that never
/// finishes that file and keeps sending entries (each may carry up to 1 MiB
/// of xattrs) must not be able to grow that queue without bound.
#[test]
fn open_transfer_cannot_make_the_server_buffer_entries_without_bound() {
    let env = Env::new();
    let m = fresh_mtime();
    // File `a` needs data that never comes; then 12 batches of 8 directories
    // with 960 KiB of xattrs each: about 90 MiB of entries behind it.
    let s = heavy_batches(
        Script::backup().msg(&ClientMsg::Entries(vec![file_e(b"a", 10, m)])),
        m,
    );
    let o = env.serve_limited("entries queued behind an open transfer", &s.bytes);
    assert!(
        !(o.signal == Some(Signal::ABORT.as_raw()) && o.stderr.contains("memory allocation")),
        "the server kept every entry queued behind the unfinished transfer in memory \
         and ran out of its {} MiB data limit (BackupReceiver::slots is unbounded):\n{}",
        DATA_LIMIT >> 20,
        o.describe()
    );
    o.assert_sane();
    // Whether it refuses early or holds out until the client leaves, nothing commits.
    assert!(o.code != Some(0), "{}", o.describe());
    assert!(o.backup_done().is_none(), "{}", o.describe());
    env.check_unchanged();
}

/// A delta of copies that do not line up with the stored copy's blocks
/// costs disc space as literal data does: a client naming ten megabytes of
/// them in a few kilobytes must have them counted in the usage log, which
/// the size guard and the prune go by, not pass for a backup that wrote
/// nothing.
/// A backup of `big` as a delta of COPY ops of `stored`'s (offset,
/// length) `ranges`, and the content it makes.
fn copies_script(stored: &[u8], ranges: &[(usize, usize)]) -> (Script, Vec<u8>) {
    let m = fresh_mtime();
    let mut delta = literal_delta(b"")[..4].to_vec(); // the magic
    let mut content = vec![];
    for &(from, len) in ranges {
        delta.push(0x54); // COPY, 8-byte offset and length
        delta.extend_from_slice(&(from as u64).to_be_bytes());
        delta.extend_from_slice(&(len as u64).to_be_bytes());
        content.extend_from_slice(&stored[from..from + len]);
    }
    delta.push(0); // END
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![file_e(b"big", content.len(), m)]))
        .msg(&ClientMsg::FileData {
            id: 0,
            delta: Compressed::compress(&delta, 1).unwrap(),
        })
        .msg(&file_end(0, &content, m))
        .msg(&ClientMsg::BackupEnd);
    (s, content)
}

/// Serves `s` (see [`copies_script`]), which must commit `big` as
/// `content`; the growth the usage log then records, and its line.
fn commit_copies(env: &mut Env, what: &str, s: &Script, content: &[u8]) -> (u64, String) {
    let o = env.serve(what, &s.bytes);
    o.assert_sane();
    assert!(o.backup_done().is_some(), "{}", o.describe());
    assert_eq!(env.accept().len(), 1, "{}", o.describe());
    assert_eq!(fs::read(env.current().join("big")).unwrap(), content);
    last_backup_growth(env)
}

#[test]
fn copies_a_delta_makes_count_as_written() {
    let mut env = Env::new();
    let stored = Rng::new(7).bytes(5000);
    let m = fresh_mtime();
    let first = backup_script(&[(file_e(b"big", stored.len(), m), Some(&stored))]);
    let o = env.serve("a file to copy from", &first.bytes);
    assert!(o.backup_done().is_some(), "{}", o.describe());
    assert_eq!(env.accept().len(), 1, "{}", o.describe());
    let ranges = vec![(1, stored.len() - 1); 2000];
    let (s, content) = copies_script(&stored, &ranges);
    assert!(s.bytes.len() < 64 << 10, "{} bytes", s.bytes.len());
    let (grown, last) = commit_copies(&mut env, "ten megabytes of unaligned copies", &s, &content);
    assert!(
        grown >= content.len() as u64,
        "the usage log says the backup wrote {grown} bytes; it wrote {} ({last:?})",
        content.len()
    );
}

/// One data message makes at most 64 MiB of its file: 238 KB of COPY ops
/// against a 5,000-byte stored copy asking for 70 MB are refused (without
/// the cap, a few KB of them made the server copy up to 16 TiB in one
/// message).
#[test]
fn one_data_message_makes_at_most_64_mib() {
    let mut env = Env::new();
    let stored = Rng::new(8).bytes(5000);
    let m = fresh_mtime();
    let first = backup_script(&[(file_e(b"big", stored.len(), m), Some(&stored))]);
    let o = env.serve("a file to copy from", &first.bytes);
    assert!(o.backup_done().is_some(), "{}", o.describe());
    env.accept();
    let (s, content) = copies_script(&stored, &vec![(0, stored.len()); 14_000]);
    assert_eq!(content.len(), 70_000_000);
    let o = env.serve("70 MB of copies in one message", &s.bytes);
    o.assert_refused(&["bad delta for big: delta output exceeds the allowed length"]);
    assert_no_file_larger(&env.host_dir(), 64 << 20);
    env.accept();
}

/// Clones cost metadata: a delta of hundreds of 4 KiB COPY ops at
/// shuffled offsets (7 bytes each on the wire) makes the server clone each
/// one, an extent item apiece in the btrfs metadata, and the usage log
/// counts them, while the data shared with the basis is not counted again.
#[test]
fn clones_a_delta_makes_count_for_their_metadata() {
    if !require_root("a btrfs store") {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    let base = tempfile::Builder::new()
        .prefix("byteback-test-")
        .tempdir_in(&fs_.mount)
        .unwrap();
    let mut env = Env::in_dir(base);
    const BLOCK: usize = 4096;
    const BLOCKS: usize = 256;
    let stored = Rng::new(17).bytes(BLOCK * BLOCKS);
    let m = fresh_mtime();
    let first = backup_script(&[(file_e(b"big", stored.len(), m), Some(&stored))]);
    let o = env.serve("a file to clone from", &first.bytes);
    assert!(o.backup_done().is_some(), "{}", o.describe());
    assert_eq!(env.accept().len(), 1, "{}", o.describe());
    // Block k of the new file is block (k * 97 + 13) mod 256 of the old:
    // no two neighbours stay neighbours.
    let ranges: Vec<(usize, usize)> = (0..BLOCKS)
        .map(|k| ((k * 97 + 13) % BLOCKS * BLOCK, BLOCK))
        .collect();
    let (s, content) = copies_script(&stored, &ranges);
    let (grown, last) = commit_copies(&mut env, "256 shuffled clones", &s, &content);
    assert!(
        grown < content.len() as u64 / 2,
        "the blocks were written, not cloned: {grown} bytes ({last:?})"
    );
    assert!(
        grown >= (BLOCKS * 200) as u64,
        "the usage log says the backup wrote {grown} bytes for {BLOCKS} clones ({last:?})"
    );
}

/// What a backup stores besides file data counts as written too: its
/// manifest (each snapshot keeps its own) and the objects it creates.
/// Before, a client could store megabytes of xattrs on FIFOs (kept in the
/// manifest only) at every backup, and the growth guard saw nothing.
#[test]
fn xattrs_and_empty_objects_count_as_written() {
    let mut env = Env::new();
    let m = fresh_mtime();
    let mut rng = Rng::new(8);
    let mut entries = vec![];
    for i in 0..64 {
        let mut e = entry(format!("fifo{i:02}").as_bytes(), Kind::Fifo, 0o644, m);
        e.xattrs = (0..16)
            .map(|j| (format!("user.x{j:02}").into_bytes(), rng.bytes(4000)))
            .collect();
        entries.push(e);
    }
    for i in 0..1000 {
        entries.push(dir_e(format!("z{i:04}").as_bytes(), m));
    }
    let s = Script::backup()
        .msg(&ClientMsg::Entries(entries[..64].to_vec()))
        .msg(&ClientMsg::Entries(entries[64..564].to_vec()))
        .msg(&ClientMsg::Entries(entries[564..].to_vec()))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("xattrs on FIFOs and empty directories", &s.bytes);
    assert!(o.backup_done().is_some(), "{}", o.describe());
    assert_eq!(env.accept().len(), 1, "{}", o.describe());
    let (grown, last) = last_backup_growth(&env);
    let manifest = fs::metadata(env.current().join(".byteback/manifest"))
        .unwrap()
        .len();
    assert!(manifest > 64 * 16 * 4000, "{manifest}");
    assert!(
        grown >= manifest + 1000 * 400,
        "the usage log says the backup wrote {grown} bytes; its manifest alone is {manifest} ({last:?})"
    );
}

/// A kept block signature counts as written: a file of zeros is stored as
/// holes and costs little on disc, but its signature and chaining values
/// take their 0.3 % of its length (before, a client sending files of
/// zeros grew `.byteback/sigs` unseen by the growth guard).
#[test]
fn kept_signatures_count_as_written() {
    let mut env = Env::new();
    let m = fresh_mtime();
    let zeros = vec![0u8; 64 << 20];
    let mut s = Script::backup().msg(&ClientMsg::Entries(vec![file_e(b"z", zeros.len(), m)]));
    for piece in zeros.chunks(8 << 20) {
        s = s.msg(&file_data(0, piece));
    }
    let s = s.msg(&file_end(0, &zeros, m)).msg(&ClientMsg::BackupEnd);
    let o = env.serve("64 MiB of zeros", &s.bytes);
    assert!(o.backup_done().is_some(), "{}", o.describe());
    assert_eq!(env.accept().len(), 1, "{}", o.describe());
    let sigs: u64 = fs::read_dir(env.current().join(".byteback/sigs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(sigs > 64 << 10, "{sigs} bytes of signatures kept");
    let (grown, last) = last_backup_growth(&env);
    assert!(
        grown >= sigs,
        "the usage log says the backup wrote {grown} bytes; its signatures take {sigs} ({last:?})"
    );
    // Another content at the next backup: the old content's signature and
    // chaining values are swept, the new one's kept.
    let ones = vec![1u8; 5 << 20];
    let m2 = fresh_mtime() + 1;
    let mut s = Script::backup().msg(&ClientMsg::Entries(vec![file_e(b"z", ones.len(), m2)]));
    s = s.msg(&file_data(0, &ones));
    let s = s.msg(&file_end(0, &ones, m2)).msg(&ClientMsg::BackupEnd);
    let o = env.serve("5 MiB of ones", &s.bytes);
    assert!(o.backup_done().is_some(), "{}", o.describe());
    env.accept();
    let hex: String = hash_bytes(&ones)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let names: BTreeSet<String> = fs::read_dir(env.current().join(".byteback/sigs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [hex.clone(), format!("{hex}.cv")].into());
}

/// The bytes the last backup of the host wrote, by its own line of the
/// usage log (the snapshot's follows it), and that line.
fn last_backup_growth(env: &Env) -> (u64, String) {
    let usage = fs::read_to_string(env.host_dir().join(".byteback-usage")).unwrap();
    let last = usage
        .lines()
        .rfind(|l| l.split_whitespace().nth(2) == Some("-"))
        .unwrap()
        .to_string();
    (
        last.split_whitespace().nth(1).unwrap().parse().unwrap(),
        last,
    )
}

fn link_e(path: &[u8], target: &[u8], mtime: i64) -> Entry {
    entry(
        path,
        Kind::HardLink {
            target: target.to_vec(),
        },
        0o644,
        mtime,
    )
}

/// A hard link goes into the manifest only if its first name is a file (or
/// a symlink or special file) of the same backup: not a file the client
/// gave up on (an honest
/// client does that when the file vanishes), not a directory, not a path
/// never sent. Those links are left out with a warning, so the snapshot
/// restores whole.
#[test]
fn hard_links_only_to_files_of_the_same_backup() {
    let mut env = Env::new();
    let m = fresh_mtime();
    let body = b"the first name".as_slice();
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![
            file_e(b"a", 10, m),
            link_e(b"b", b"a", m),
            dir_e(b"c", m),
            link_e(b"d", b"c", m),
            link_e(b"e", b"a0", m),
            file_e(b"f", body.len(), m),
            link_e(b"g", b"f", m),
            entry(b"h", Kind::Fifo, 0o644, m),
            link_e(b"i", b"h", m),
        ]))
        .msg(&ClientMsg::FileAbort { id: 0 })
        .msg(&file_data(1, body))
        .msg(&file_end(1, body, m))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("hard links to what is not a file of the backup", &s.bytes);
    let snap = o.assert_backup_ok(2);
    assert_eq!(env.accept(), vec![snap.clone()]);
    for (link, target) in [("b", "a"), ("d", "c"), ("e", "a0")] {
        let w = format!(
            "{link}: a hard link to {target}, which is no file, symlink or special file of this \
             backup: left out"
        );
        assert!(o.stderr.contains(&w), "no {w:?}:\n{}", o.describe());
    }
    run(env
        .restore_cmd()
        .args(["--restore", "--snapshot", &snap, "/"]));
    let r = env.work.join(&snap);
    let names: BTreeSet<Vec<u8>> = names_in(&r);
    let want: BTreeSet<Vec<u8>> = [b"c", b"f", b"g", b"h", b"i"].map(|n| n.to_vec()).into();
    assert_eq!(names, want);
    assert_eq!(fs::read(r.join("g")).unwrap(), body);
    for (first, link) in [("f", "g"), ("h", "i")] {
        assert_eq!(
            fs::symlink_metadata(r.join(first)).unwrap().ino(),
            fs::symlink_metadata(r.join(link)).unwrap().ino(),
            "{link}"
        );
    }
    assert!(fs::symlink_metadata(r.join("i"))
        .unwrap()
        .file_type()
        .is_fifo());
}

/// The server's warnings that do not fit its final message (2 KiB of
/// them) are counted there, so a client's report never loses them unsaid.
#[test]
fn warnings_beyond_the_final_message_are_counted_in_it() {
    let mut env = Env::new();
    let m = fresh_mtime();
    let n = 100;
    let links: Vec<Entry> = (0..n)
        .map(|i| {
            link_e(
                format!("l{i:03}").as_bytes(),
                format!("a{i:03}").as_bytes(),
                m,
            )
        })
        .collect();
    let s = Script::backup()
        .msg(&ClientMsg::Entries(links))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("links to nothing, each a warning", &s.bytes);
    o.assert_backup_ok(0);
    env.accept();
    let Some(ServerMsg::BackupDone { message, .. }) = o.backup_done() else {
        unreachable!()
    };
    let shown = message.matches("which is no file").count();
    assert!(shown > 0 && shown < n, "{shown}: {message}");
    let more = format!("warning: {} more warnings in the server's log", n - shown);
    assert!(message.ends_with(&more), "{more:?} at the end of {message}");
}

/// A file the client gives up on keeps its old manifest entry only where
/// the old file is what stays at its path: after a run cut off having put
/// a symlink there, the entry goes (with the symlink); after one that left
/// the file alone, the entry stays, its content checked. Either way the
/// snapshot restores whole.
#[test]
fn a_file_given_up_keeps_its_old_entry_only_if_its_old_copy_is_there() {
    let mut env = Env::new();
    let (x, y) = (b"old f".as_slice(), b"old g".as_slice());
    let m = fresh_mtime();
    let s = backup_script(&[
        (file_e(b"f", x.len(), m), Some(x)),
        (file_e(b"g", y.len(), m), Some(y)),
    ]);
    env.serve("f and g", &s.bytes).assert_backup_ok(2);
    env.accept();
    // Cut off after making f a symlink: `current` is left dirty.
    let s = Script::backup().msg(&ClientMsg::Entries(vec![symlink_e(
        b"f",
        b"x",
        fresh_mtime(),
    )]));
    let o = env.serve("f as a symlink, cut off", &s.bytes);
    assert!(o.backup_done().is_none(), "{}", o.describe());
    assert!(fs::symlink_metadata(env.current().join("f"))
        .unwrap()
        .is_symlink());
    // Both files changed, both given up.
    let m = fresh_mtime();
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![
            file_e(b"f", 7, m),
            file_e(b"g", 7, m),
        ]))
        .msg(&ClientMsg::FileAbort { id: 0 })
        .msg(&ClientMsg::FileAbort { id: 1 })
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("f and g given up", &s.bytes);
    let snap = o.assert_backup_ok(2);
    assert_eq!(env.accept(), vec![snap.clone()]);
    assert!(fs::symlink_metadata(env.current().join("f")).is_err());
    let out = run(env
        .restore_cmd()
        .args(["--restore", "--snapshot", &snap, "/"]));
    let r = env.work.join(&snap);
    assert_eq!(
        names_in(&r),
        [b"g".to_vec()].into(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(r.join("g")).unwrap(), y);
}

/// The old manifest's entries that transfers hold (to keep, should the file
/// be given up) are not in the window the client keeps: a client sending
/// small entries for files whose old entries carry a MiB of xattrs each
/// made the server hold gigabytes for a few MB. Past 64 MiB of them they
/// are held without their xattrs, and a file given up then keeps its old
/// entry without them, said.
#[test]
fn old_entries_held_for_transfers_are_bounded() {
    let mut env = Env::new();
    let n = 72u32;
    let names: Vec<Vec<u8>> = (0..n).map(|i| format!("f{i:03}").into_bytes()).collect();
    let xattrs: Vec<(Vec<u8>, Vec<u8>)> = (0..15u8)
        .map(|k| (format!("user.x{k:02}").into_bytes(), vec![k; 64 << 10]))
        .collect();
    // First backup: each file 1 byte with 15 x 64 KiB of xattrs, sent 7 at
    // a time (the window holds 8 MiB of entries behind open transfers).
    let m = fresh_mtime();
    let mut s = Script::backup();
    for (c, chunk) in names.chunks(7).enumerate() {
        let es = chunk
            .iter()
            .map(|p| {
                let mut e = file_e(p, 1, m);
                e.xattrs = xattrs.clone();
                e
            })
            .collect();
        s = s.msg(&ClientMsg::Entries(es));
        for i in 0..chunk.len() {
            let id = (c * 7 + i) as u32;
            s = s.msg(&file_data(id, b"x")).msg(&file_end(id, b"x", m));
        }
    }
    let o = env.serve(
        "files with a MiB of xattrs each",
        &s.msg(&ClientMsg::BackupEnd).bytes,
    );
    o.assert_backup_ok(n as usize);
    env.accept();
    // Second: every file changed, sent without xattrs, and given up.
    let m2 = fresh_mtime() + 1;
    let mut s = Script::backup().msg(&ClientMsg::Entries(
        names.iter().map(|p| file_e(p, 2, m2)).collect(),
    ));
    for id in 0..n {
        s = s.msg(&ClientMsg::FileAbort { id });
    }
    let o = env.serve("every file given up", &s.msg(&ClientMsg::BackupEnd).bytes);
    // Each give-up is answered FileOk.
    o.assert_backup_ok(n as usize);
    env.accept();
    let Some(ServerMsg::BackupDone { message, .. }) = o.backup_done() else {
        unreachable!()
    };
    let said =
        |p: &str| message.contains(&format!("{p}: kept at its last version without its xattrs"));
    // 64 MiB hold 68 of them (983,850 bytes each as counted).
    assert!(!said("f000") && !said("f067"), "{message}");
    assert!(said("f068") && said("f071"), "{message}");
    // Those held whole kept their xattrs in the new manifest; the others
    // their old entry without them.
    let kept = manifest_entries(&env);
    assert_eq!(kept.len(), n as usize);
    for (i, e) in kept.iter().enumerate() {
        assert_eq!(e.entry.mtime_sec, m, "{i}: not the old entry");
        let want = if i < 68 { xattrs.len() } else { 0 };
        assert_eq!(e.entry.xattrs.len(), want, "f{i:03}");
    }
}

/// A file placed with the size and mtime the old manifest gives it, but
/// other content (a client whose file ended with the old mtime), gets a
/// second earlier on disc: a run cut off after placing it must not leave a
/// file the next run would keep by its size and mtime, recording the old
/// hash for the new bytes (before, only checksum mode did this). The same
/// content placed again (sent after `verify` marked the stored copy)
/// too: its data could be lost with the power before the commit.
#[test]
fn new_content_under_the_old_size_and_mtime_is_not_taken_for_the_old() {
    use std::os::unix::fs::MetadataExt;
    let mut env = Env::new();
    let (old, new) = (b"old data".as_slice(), b"new data".as_slice());
    let m = fresh_mtime();
    let s = backup_script(&[(file_e(b"f", old.len(), m), Some(old))]);
    env.serve("f", &s.bytes).assert_backup_ok(1);
    env.accept();
    // Announced changed, ended with mtime `end` (then cut off, unless the
    // backup ends).
    let ending = |content: &[u8], end: i64| {
        Script::backup()
            .msg(&ClientMsg::Entries(vec![file_e(
                b"f",
                content.len(),
                fresh_mtime(),
            )]))
            .msg(&file_data(0, content))
            .msg(&file_end(0, content, end))
    };
    let s = ending(new, m);
    let o = env.serve("f with new content and the old mtime, cut off", &s.bytes);
    assert!(o.backup_done().is_none(), "{}", o.describe());
    let f = env.current().join("f");
    assert_eq!(fs::read(&f).unwrap(), new, "{}", o.describe());
    let meta = fs::metadata(&f).unwrap();
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (m - 1, 0),
        "new content on disc under the old size and mtime"
    );
    // The old content again, under the old size and mtime.
    let s = ending(old, m);
    let o = env.serve("f with its old content again, cut off", &s.bytes);
    assert!(o.backup_done().is_none(), "{}", o.describe());
    let stored_as = |content: &[u8], mtime: i64, why: String| {
        assert_eq!(fs::read(&f).unwrap(), content, "{why}");
        let meta = fs::metadata(&f).unwrap();
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (mtime, 0), "{why}");
    };
    stored_as(old, m - 1, o.describe());
    // The client's file now has other content at that very second (files
    // stamped in whole seconds): the copy on disc is not kept by its size
    // and mtime, the content is received.
    let other = b"3rd data".as_slice();
    let s = backup_script(&[(file_e(b"f", other.len(), m - 1), Some(other))]);
    let o = env.serve("f with other content at the offset second", &s.bytes);
    o.assert_backup_ok(1);
    assert_eq!(fs::read(&f).unwrap(), other, "{}", o.describe());
    env.accept();
    // Committed, a file placed a second early (ending with the old
    // manifest's size and mtime) gets its own mtime back.
    let s = ending(old, m - 1).msg(&ClientMsg::BackupEnd);
    let o = env.serve("f ending with the old size and mtime, committed", &s.bytes);
    o.assert_backup_ok(1);
    stored_as(old, m - 1, o.describe());
    env.accept();
}

/// A path as long as the protocol allows (4,096 bytes) is longer than the
/// kernel takes at once: the server opens it in steps, so it is stored,
/// read back for a restore and verified.
#[test]
fn paths_as_long_as_the_protocol_allows_are_stored_and_restored() {
    let env = Env::new();
    let m = fresh_mtime();
    let body = b"deep down".as_slice();
    let mut items: Vec<(Entry, Option<&[u8]>)> = vec![];
    let mut path = vec![];
    for i in 0..20u8 {
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend(std::iter::repeat_n(b'a' + i, 200));
        items.push((dir_e(&path, m), None));
    }
    path.push(b'/');
    let file = [path.clone(), vec![b'f'; 4096 - path.len()]].concat();
    assert_eq!(file.len(), 4096);
    items.push((file_e(&file, body.len(), m), Some(body)));
    let o = env.serve("a 4096-byte path", &backup_script(&items).bytes);
    // (Not `env.accept()`: its tree digest goes by whole paths.)
    let snap = o.assert_backup_ok(1);
    let out = run(env
        .restore_cmd()
        .args(["--restore", "--snapshot", &snap, "/"]));
    // Read back in steps: the whole path is too long for open(2).
    let mut dir = fs::File::open(env.work.join(&snap)).unwrap();
    for comp in path[..path.len() - 1].split(|&b| b == b'/') {
        dir = open_beneath(&dir, comp);
    }
    let name = &file[path.len()..];
    let got = read_beneath(&dir, name);
    assert_eq!(got, body, "{}", String::from_utf8_lossy(&out.stderr));
}

fn open_beneath(dir: &fs::File, name: &[u8]) -> fs::File {
    use std::os::fd::AsFd;
    let fd = rustix::fs::openat(
        dir.as_fd(),
        OsStr::from_bytes(name),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    fs::File::from(fd)
}

/// Waits for `child` (a server) for at most [`TIMEOUT`], then kills it;
/// its exit status (`None`: killed) and its stderr.
fn wait_reading_stderr(
    child: &mut std::process::Child,
) -> (Option<std::process::ExitStatus>, String) {
    let status = wait_until(child, Instant::now(), TIMEOUT);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

fn read_beneath(dir: &fs::File, name: &[u8]) -> Vec<u8> {
    let mut v = vec![];
    open_beneath(dir, name).read_to_end(&mut v).unwrap();
    v
}

/// A client that asks for a file and never reads the answer leaves the
/// server in a write larger than the pipe holds: the store's `io_timeout`
/// ends it there too (the write takes what fits and waits by the clock),
/// so the session ends instead of holding a server process for ever.
#[test]
fn a_client_that_never_reads_ends_a_server_mid_write() {
    let mut env = Env::new();
    let big = Rng::new(9).bytes(4 << 20);
    let m = fresh_mtime();
    let s = backup_script(&[(file_e(b"big", big.len(), m), Some(&big))]);
    env.serve("a file to read", &s.bytes).assert_backup_ok(1);
    env.accept();
    let toml = env.store.join("byteback.toml");
    let mut conf = fs::read_to_string(&toml).unwrap();
    conf.push_str("io_timeout = 2\n");
    fs::write(&toml, conf).unwrap();
    let ask = Script::hello().msg(&ClientMsg::ReadFile {
        snapshot: "current".into(),
        path: b"big".to_vec(),
    });
    let mut child = Command::new(bin("byteback-server"))
        .args(env.serve_args(HOST, &[]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Asked, and the answer never read (stdout stays open).
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&ask.bytes).unwrap();
    let _stdout = child.stdout.take().unwrap();
    let (status, err) = wait_reading_stderr(&mut child);
    let status = status.unwrap_or_else(|| panic!("still writing after {TIMEOUT:?}:\n{err}"));
    assert!(!status.success(), "{err}");
    assert!(err.contains("took nothing for 2 s"), "{err}");
    drop(stdin);
}

/// A client that sends a byte every tenth of a second is never silent for
/// `io_timeout`, and would hold its host's lock for as long as it liked:
/// the store's `max_session` ends the backup, and the host's next backup
/// runs.
#[test]
fn a_client_dripping_bytes_is_ended_by_max_session() {
    let mut env = Env::new();
    let toml = env.store.join("byteback.toml");
    let mut conf = fs::read_to_string(&toml).unwrap();
    conf.push_str("io_timeout = 5\nmax_session = 2\n");
    fs::write(&toml, conf).unwrap();
    env.store_rest = env.store_rest_digest();
    let m = fresh_mtime();
    let content = Rng::new(11).bytes(4000);
    let start_of =
        Script::backup().msg(&ClientMsg::Entries(vec![file_e(b"slow", content.len(), m)]));
    let drip = encode(&file_data(0, &content)).unwrap();
    let mut child = Command::new(bin("byteback-server"))
        .args(env.serve_args(HOST, &[]))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&start_of.bytes).unwrap();
    // One byte at a time, 40 s for the frame: far past TIMEOUT.
    let dripper = std::thread::spawn(move || {
        for b in drip {
            if stdin.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let (status, err) = wait_reading_stderr(&mut child);
    dripper.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("still running after {TIMEOUT:?}:\n{err}"));
    assert!(!status.success(), "{err}");
    assert!(err.contains("max_session"), "{err}");
    env.check_world();
    // The lock is free, and the next backup commits.
    let s = backup_script(&[(file_e(b"slow", content.len(), m), Some(&content))]);
    env.serve("the next backup", &s.bytes).assert_backup_ok(1);
    env.accept();
}

/// A client that says it could not read a directory and then sends
/// entries within it is refused: what the server kept there must not be
/// applied a second time.
#[test]
fn entries_within_a_path_said_unreadable_are_refused() {
    let env = Env::new();
    let m = fresh_mtime();
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![dir_e(b"d", m)]))
        .msg(&ClientMsg::KeepUnread {
            path: b"d".to_vec(),
        })
        .msg(&ClientMsg::Entries(vec![file_e(b"d/x", 3, m)]))
        .msg(&file_data(0, b"abc"))
        .msg(&file_end(0, b"abc", m))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("entries after a keep", &s.bytes);
    env.refused(&o, &["which the client said it could not read"]);
    env.check_world();
}

/// Under a low open-file limit the server stops answering batches of
/// entries while the files in flight hold its descriptors; the batches the
/// client sends meanwhile wait unanswered. A client that keeps sending
/// them (each entry may carry 1 MiB of xattrs) is refused at the window's
/// caps instead of being held in memory.
#[test]
fn unanswered_batches_of_entries_are_capped_in_memory() {
    let env = Env::new();
    let m = fresh_mtime();
    // File `a` is started (holding its descriptors) and never finished;
    // then 12 batches of 8 directories with 960 KiB of xattrs each.
    let s = heavy_batches(
        Script::backup()
            .msg(&ClientMsg::Entries(vec![file_e(b"a", 10, m)]))
            .msg(&file_data(0, b"01234")),
        m,
    );
    // 256 descriptors: none left for transfers beyond the reserve, so
    // nothing is answered while `a` is open.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--"])
        .arg(bin("byteback-server"))
        .args(env.serve_args(HOST, &[]));
    limit_data(&mut cmd, DATA_LIMIT);
    let o = run_server_cmd(
        "unanswered batches under a low open-file limit",
        cmd,
        &s.bytes,
    );
    assert!(
        !(o.signal == Some(Signal::ABORT.as_raw()) && o.stderr.contains("memory allocation")),
        "the server held every unanswered batch in memory and ran out of its {} MiB data limit:\n{}",
        DATA_LIMIT >> 20,
        o.describe()
    );
    o.assert_refused(&["bytes of entries waiting for an answer"]);
    env.check_unchanged();
}

/// Thousands of files announced at a terabyte each, none of their data
/// sent: the digests the server keeps for large files (their signature and
/// BLAKE3 subtrees, sized by the announced size before any data) stay
/// within a bound instead of gigabytes (here: under a data limit of 96 MiB,
/// where 2,000 such digests would need 5 GiB).
#[test]
fn files_announced_huge_do_not_make_the_server_hold_their_digests() {
    let env = Env::new();
    let m = fresh_mtime();
    let mut s = Script::backup();
    for batch in 0..4 {
        let entries: Vec<Entry> = (0..500)
            .map(|i| file_e(format!("f{batch}-{i:04}").as_bytes(), 1 << 40, m))
            .collect();
        s = s.msg(&ClientMsg::Entries(entries));
    }
    let mut cmd = Command::new(bin("byteback-server"));
    cmd.args(env.serve_args(HOST, &[]));
    limit_data(&mut cmd, 96 << 20);
    let o = run_server_cmd("2,000 files announced at 1 TiB", cmd, &s.bytes);
    assert!(
        !o.stderr.contains("memory allocation"),
        "the server ran out of its 96 MiB data limit:\n{}",
        o.describe()
    );
    o.assert_sane();
    env.check_unchanged();
}

/// A client that never reads the server's stderr (over SSH: stops taking
/// its channel's data) cannot hold the server in a write to it, with the
/// host's lock (or the store's prune lock) held: here its stderr is a pipe
/// filled to the brim that nobody reads, the session starts a backup (the
/// host's lock taken) and then fails (garbage), and the server still ends,
/// its lock released for the next backup.
#[test]
fn a_client_that_never_reads_stderr_does_not_hold_the_server() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let env = Env::new();
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array for pipe2; each end is owned once; the
    // write end is filled non-blocking, then made blocking again.
    let (keep_open, full) = unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        let flags = libc::fcntl(w.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(w.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        let junk = [b'.'; 4096];
        while libc::write(w.as_raw_fd(), junk.as_ptr().cast(), junk.len()) > 0 {}
        libc::fcntl(w.as_raw_fd(), libc::F_SETFL, flags);
        (r, w)
    };
    let mut child = Command::new(bin("byteback-server"))
        .args(env.serve_args(HOST, &[]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(full))
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        let mut input = Script::backup().bytes;
        input.extend_from_slice(b"not a byteback frame at all, and then some more of it");
        let _ = stdin.write_all(&input);
    }
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = out.read_to_end(&mut v);
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server is held in a write to a stderr nobody reads");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    drop(keep_open);
    assert!(!status.success());
    // The host's lock is free: a good backup goes through.
    let m = fresh_mtime();
    let good = backup_script(&[(file_e(b"after", 2, m), Some(b"ok".as_slice()))]);
    let o = env.serve("a backup after it", &good.bytes);
    assert!(o.backup_done().is_some(), "{}", o.describe());
}

/// A client that starts every file it was asked for at once (its first
/// data, never its end) is refused once they would need more descriptors
/// than the server's open-file limit leaves, with an error saying so,
/// instead of running the server out of descriptors; nothing commits.
#[test]
fn starting_every_file_at_once_is_refused_within_the_open_file_limit() {
    let env = Env::new();
    let m = fresh_mtime();
    let files = 600;
    let entries: Vec<Entry> = (0..files)
        .map(|i| file_e(format!("f{i:04}").as_bytes(), 10, m))
        .collect();
    let mut s = Script::backup().msg(&ClientMsg::Entries(entries));
    for id in 0..files as u32 {
        s = s.msg(&file_data(id, b"0123456789"));
    }
    // The limit is set for soft and hard (the server raises its soft limit
    // to the hard one): 256 descriptors, of which transfers may hold 192.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--"])
        .arg(bin("byteback-server"))
        .args(env.serve_args(HOST, &[]));
    let o = run_server_cmd("every file started at once", cmd, &s.bytes);
    o.assert_sane();
    o.assert_refused(&["more files in flight than the open-file limit allows"]);
    assert!(
        !o.stderr.contains("Too many open files"),
        "{}",
        o.describe()
    );
    env.check_unchanged();
}

#[test]
fn zstd_bombs_are_refused() {
    let mut env = Env::new();

    // Positive control: the hand-made zstd frame is real zstd and a real delta.
    let m = fresh_mtime();
    let mut header = 0x7273_0236u32.to_be_bytes().to_vec();
    header.extend_from_slice(&[0x41, 200]);
    let data = zstd_frame(&[
        ZBlock::Raw(&header),
        ZBlock::Rle(b'x', 200),
        ZBlock::Raw(&[0x00]),
    ]);
    let content = vec![b'x'; 200];
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![file_e(b"rle", 200, m)]))
        .msg(&ClientMsg::FileData {
            id: 0,
            delta: Compressed {
                raw_len: (header.len() + 201) as u32,
                data,
            },
        })
        .msg(&file_end(0, &content, m))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("hand-made zstd frame", &s.bytes);
    let snap = o.assert_backup_ok(1);
    assert_eq!(env.accept(), vec![snap.clone()]);
    assert_eq!(fs::read(env.current().join("rle")).unwrap(), content);

    // The bomb: a literal of 64 MiB of zeros in 2 KiB of zstd.
    const BOMB: u64 = 64 << 20;
    let header = literal_header(BOMB);
    let mut blocks = vec![ZBlock::Raw(&header)];
    blocks.extend((0..BOMB / (128 << 10)).map(|_| ZBlock::Rle(0, 128 << 10)));
    blocks.push(ZBlock::Raw(&[0x00]));
    let bomb = zstd_frame(&blocks);
    assert!(bomb.len() < 4096);
    for (what, raw_len, needles) in [
        (
            "declares 1 KiB, inflates to 64 MiB",
            1024u32,
            &["compressed data"][..],
        ),
        (
            "declares MAX_CHUNK, inflates to 64 MiB",
            MAX_CHUNK as u32,
            &["compressed data"][..],
        ),
        (
            "declares u32::MAX",
            u32::MAX,
            &["too large", "limit exceeded"][..],
        ),
    ] {
        let m = fresh_mtime();
        let s = Script::backup()
            .msg(&ClientMsg::Entries(vec![file_e(b"bomb", BOMB as usize, m)]))
            .msg(&ClientMsg::FileData {
                id: 0,
                delta: Compressed {
                    raw_len,
                    data: bomb.clone(),
                },
            })
            .msg(&ClientMsg::FileEnd {
                id: 0,
                size: BOMB,
                hash: [0; 32],
                mtime_sec: m,
                mtime_nsec: 0,
            })
            .msg(&ClientMsg::BackupEnd);
        let o = env.serve_limited(what, &s.bytes);
        env.refused(&o, needles);
        assert!(
            o.elapsed < Duration::from_secs(5),
            "not refused quickly:\n{}",
            o.describe()
        );
        assert!(!env.current().join("bomb").exists());
        assert_no_file_larger(&env.store, 1 << 20);
    }
}

// ---------------------------------------------------------------------------
// 7-8: truncated, random and mutated input
// ---------------------------------------------------------------------------

fn small_session(content: &[u8], mtime: i64) -> Script {
    backup_script(&[
        (dir_e(b"d", mtime), None),
        (file_e(b"d/f", content.len(), mtime), Some(content)),
    ])
}

#[test]
fn truncated_sessions_never_commit() {
    let mut env = Env::new();
    let content = Rng::new(0x7ac7).bytes(200);
    let full = small_session(&content, fresh_mtime());
    let o = env.serve("the whole session", &full.bytes);
    let snap = o.assert_backup_ok(1);
    assert_eq!(env.accept(), vec![snap.clone()]);
    assert_eq!(fs::read(env.current().join("d/f")).unwrap(), content);
    assert_eq!(
        fs::read(env.host_dir().join(&snap).join("d/f")).unwrap(),
        content
    );

    let len = full.bytes.len();
    let step = len.div_ceil(600).max(1);
    let hello_end = full.frame_ends[0];
    for cut in (0..len).step_by(step) {
        // A new mtime each time, so the file is always transferred again.
        let s = small_session(&content, fresh_mtime());
        assert_eq!(s.frame_ends, full.frame_ends, "layout must not change");
        let o = env.serve(&format!("first {cut} of {len} bytes"), &s.bytes[..cut]);
        if cut == 0 || cut == hello_end {
            // Closing between requests is a clean goodbye.
            o.assert_sane();
            assert_eq!(o.code, Some(0), "{}", o.describe());
            assert!(o.error_frame().is_none() && o.backup_done().is_none());
            env.check_unchanged();
        } else if full.frame_ends.contains(&cut) {
            env.refused(&o, &["went away"]);
        } else {
            env.refused(&o, &["middle of a frame"]);
        }
    }
}

/// Checks a mutated session that the server accepted: every regular file
/// it committed (outside the server's `.byteback`) holds exactly `content`.
fn check_committed_content(env: &Env, snap: &str, content: &[u8], what: &str) {
    let base = env.host_dir().join(snap);
    for (p, m) in walk_all(&base) {
        if p.starts_with(base.join(".byteback")) {
            continue;
        }
        if m.is_file() {
            assert_eq!(
                fs::read(&p).unwrap(),
                content,
                "[{what}] {} holds content that was never sent",
                p.display()
            );
        }
    }
}

#[test]
fn random_garbage_never_panics() {
    let env = Env::new();
    let mut rng = Rng::new(0x06a7_ba6e);
    for i in 0..64 {
        let len = 1 + rng.below(2048) as usize;
        let input = rng.bytes(len);
        let o = env.serve(&format!("random buffer {i} ({len} bytes)"), &input);
        o.assert_sane();
        assert!(o.code != Some(0), "garbage accepted:\n{}", o.describe());
        assert!(o.backup_done().is_none());
        env.check_unchanged();
    }
    // Well-framed garbage after a valid start, so it reaches the decoder and
    // the backup code: random payloads behind message tags 2..=6 (Entries to
    // FileAbort; never BackupEnd, so nothing may commit).
    for i in 0..64 {
        let mut s = Script::backup();
        for _ in 0..1 + rng.below(4) {
            let mut payload = vec![2 + rng.below(5) as u8];
            let n = rng.below(600) as usize;
            payload.extend(rng.bytes(n));
            s = s.raw(&frame_of_payload(&payload));
        }
        let o = env.serve(&format!("random frames {i}"), &s.bytes);
        o.assert_sane();
        assert!(o.code != Some(0), "garbage accepted:\n{}", o.describe());
        assert!(o.backup_done().is_none());
        env.check_unchanged();
    }
}

#[test]
fn bit_flipped_sessions_never_commit_bad_content() {
    let mut env = Env::new();
    let content = Rng::new(0xf11b).bytes(200);
    let mut rng = Rng::new(0xb17f);
    let mut accepted = 0;
    for i in 0..64 {
        let mut input = small_session(&content, fresh_mtime()).bytes;
        let flips = 1 + rng.below(3);
        let mut at = vec![];
        for _ in 0..flips {
            let bit = rng.below(input.len() as u64 * 8) as usize;
            input[bit / 8] ^= 1 << (bit % 8);
            at.push(bit);
        }
        let what = format!("mutation {i}: bits {at:?} flipped");
        let o = env.serve(&what, &input);
        o.assert_sane();
        match o.backup_done() {
            Some(ServerMsg::BackupDone { snapshot, .. }) => {
                // The flip hit something harmless (a mode, a name...): the
                // content must still be exactly what was sent.
                assert_eq!(o.code, Some(0), "{}", o.describe());
                let new = env.accept();
                assert_eq!(
                    new.iter().collect::<Vec<_>>(),
                    snapshot.iter().collect::<Vec<_>>(),
                    "{}",
                    o.describe()
                );
                for s in &new {
                    check_committed_content(&env, s, &content, &what);
                }
                accepted += 1;
            }
            _ => {
                // Refused (or, if the flip turned a request into a harmless
                // one, finished without committing anything).
                if o.code != Some(0) {
                    assert!(o.error_frame().is_some(), "{}", o.describe());
                }
                env.check_unchanged();
            }
        }
    }
    eprintln!("{accepted} of 64 mutated sessions were still valid");
}

// ---------------------------------------------------------------------------
// 9-11: names the server reserves, metadata it must not apply, host names
// ---------------------------------------------------------------------------

#[test]
fn client_cannot_overwrite_the_manifest() {
    let mut env = Env::new();
    let fake = b"not a manifest at all".as_slice();
    let tmp = b"client tmp".as_slice();
    let m = fresh_mtime();
    let s = backup_script(&[
        (dir_e(b".byteback", m), None),
        (file_e(b".byteback/manifest", fake.len(), m), Some(fake)),
        (file_e(b".byteback/manifest.new", fake.len(), m), Some(fake)),
        (file_e(b".byteback/tmp", tmp.len(), m), Some(tmp)),
        (file_e(b".byteback-x", tmp.len(), m), Some(tmp)),
    ]);
    let o = env.serve(".byteback/manifest", &s.bytes);
    let snap1 = o.assert_backup_ok(4);
    assert_eq!(env.accept(), vec![snap1.clone()]);
    assert!(env.current().join(".byteback/manifest").is_file());
    assert_ne!(env.read_manifest(), fake);

    // The listing reads the server's manifest and shows the client's files.
    let out = run(env
        .restore_cmd()
        .args(["--list", "--snapshot", &snap1, "/"]));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for p in [
        "/.byteback/manifest",
        "/.byteback/manifest.new",
        "/.byteback/tmp",
        "/.byteback-x",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {p}"))),
            "{p} not listed:\n{listing}"
        );
    }
    // And each restores under its own name with the client's content.
    run(env
        .restore_cmd()
        .args(["--restore", "--snapshot", &snap1, "/"]));
    let r = env.work.join(&snap1);
    assert_eq!(fs::read(r.join(".byteback/manifest")).unwrap(), fake);
    assert_eq!(fs::read(r.join(".byteback/manifest.new")).unwrap(), fake);
    assert_eq!(fs::read(r.join(".byteback/tmp")).unwrap(), tmp);
    assert_eq!(fs::read(r.join(".byteback-x")).unwrap(), tmp);

    // Next: `.byteback` as a plain file, and the escaped name of the last
    // session's directory as a client name of its own.
    let other = b"second session".as_slice();
    let m = fresh_mtime();
    let s = backup_script(&[
        (file_e(b".byteback", fake.len(), m), Some(fake)),
        (dir_e(b".byteback-.byteback", m), None),
        (
            file_e(b".byteback-.byteback/manifest", other.len(), m),
            Some(other),
        ),
    ]);
    let o = env.serve(".byteback as a file", &s.bytes);
    let snap2 = o.assert_backup_ok(2);
    assert_eq!(env.accept(), vec![snap2.clone()]);
    assert!(env.current().join(".byteback/manifest").is_file());
    let out = run(env.restore_cmd().args(["--list", "/"]));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing.contains(" /.byteback-.byteback/manifest"),
        "{listing}"
    );
    run(env
        .restore_cmd()
        .args(["--restore", "--snapshot", &snap2, "/"]));
    let r = env.work.join(&snap2);
    assert_eq!(fs::read(r.join(".byteback")).unwrap(), fake);
    assert_eq!(
        fs::read(r.join(".byteback-.byteback/manifest")).unwrap(),
        other
    );
    // The first snapshot is still fully readable.
    let out = run(env
        .restore_cmd()
        .args(["--list", "--snapshot", &snap1, "/"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains(" /.byteback/manifest"));
}

#[test]
fn setuid_bits_and_device_nodes_are_not_materialised() {
    let mut env = Env::new();
    let m = fresh_mtime();
    let body = b"#!/bin/sh\nexec /bin/sh\n".as_slice();
    let owned = |mut e: Entry| {
        e.uid = 1234;
        e.gid = 5678;
        e
    };
    let s = backup_script(&[
        (owned(entry(b"fifo", Kind::Fifo, 0o4777, m)), None),
        (
            owned(entry(
                b"loop",
                Kind::BlockDev {
                    rdev: rustix::fs::makedev(7, 0),
                },
                0o666,
                m,
            )),
            None,
        ),
        (
            owned(entry(
                b"null",
                Kind::CharDev {
                    rdev: rustix::fs::makedev(1, 3),
                },
                0o666,
                m,
            )),
            None,
        ),
        (owned(entry(b"sgid", Kind::Dir, 0o2777, m)), None),
        (
            owned(entry(
                b"sgid/f",
                Kind::File {
                    size: body.len() as u64,
                },
                0o6777,
                m,
            )),
            Some(body),
        ),
        (owned(entry(b"sock", Kind::Socket, 0o777, m)), None),
        (
            owned(entry(
                b"suid",
                Kind::File {
                    size: body.len() as u64,
                },
                0o4755,
                m,
            )),
            Some(body),
        ),
    ]);
    let o = env.serve("setuid files and devices", &s.bytes);
    let snap = o.assert_backup_ok(2);
    assert_eq!(env.accept(), vec![snap.clone()]);

    assert_eq!(fs::read(env.current().join("suid")).unwrap(), body);
    let euid = rustix::process::geteuid().as_raw();
    for (p, md) in walk_all(&env.store) {
        let ft = md.file_type();
        assert!(
            !(ft.is_char_device() || ft.is_block_device() || ft.is_fifo() || ft.is_socket()),
            "special file {} in the store",
            p.display()
        );
        assert_eq!(
            md.mode() & 0o7000,
            0,
            "{} has mode {:o}",
            p.display(),
            md.mode()
        );
        if p.starts_with(env.host_dir()) && !ft.is_symlink() {
            assert_eq!(
                md.uid(),
                euid,
                "{} is owned by uid {}",
                p.display(),
                md.uid()
            );
        }
    }
    // The metadata is kept in the manifest for restores.
    let out = run(env.restore_cmd().args(["--list", "--snapshot", &snap, "/"]));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for (mode, path) in [
        ("-rwsr-xr-x", "/suid"),
        ("-rwsrwsrwx", "/sgid/f"),
        ("crw-rw-rw-", "/null"),
        ("brw-rw-rw-", "/loop"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.contains(mode) && l.ends_with(&format!(" {path}"))),
            "{path} not listed as {mode}:\n{listing}"
        );
    }
}

#[test]
fn host_name_comes_only_from_the_server_command_line() {
    let mut env = Env::new();
    let store_names = names_in(&env.store);
    let content = b"filed under victim".as_slice();
    let m = fresh_mtime();
    let s = backup_script(&[(file_e(b"f", content.len(), m), Some(content))]);
    let o = env.serve("a plain backup", &s.bytes);
    o.assert_backup_ok(1);
    env.accept();
    assert_eq!(fs::read(env.current().join("f")).unwrap(), content);
    assert_eq!(
        names_in(&env.store),
        store_names,
        "a host directory appeared"
    );

    for host in [
        "../x",
        "a/b",
        "..",
        ".",
        "",
        "x y",
        "../../outside",
        // Names of the store's own files, or that read as options.
        "byteback.toml",
        ".byteback-usage",
        ".ssh",
        "-rf",
    ] {
        let s = backup_script(&[(file_e(b"pwn", content.len(), fresh_mtime()), Some(content))]);
        let o = env.serve_as(&format!("--host={host:?}"), host, &[], &s.bytes);
        o.assert_sane();
        assert_eq!(o.code, Some(2), "{}", o.describe());
        assert!(o.msgs.is_empty(), "{}", o.describe());
        assert!(
            o.stderr.contains("not a valid host name"),
            "{}",
            o.describe()
        );
        env.check_unchanged();
        assert_eq!(names_in(&env.store), store_names);
        assert!(!env.root.join("x").exists() && !env.store.join("a").exists());
        assert_nothing_named(&env.root, "pwn");
    }
}

#[test]
fn read_only_key_cannot_back_up() {
    let env = Env::new();
    let content = b"x".as_slice();
    let s = backup_script(&[(file_e(b"pwn", 1, fresh_mtime()), Some(content))]);
    let o = env.serve_as("--read-only backup", HOST, &["--read-only"], &s.bytes);
    env.refused(&o, &["may only list and restore"]);
}

/// New files are written at their own path in `current` (no temporary name):
/// one cut off mid-transfer, or failing its hash twice, never reaches a
/// snapshot, never carries the client's mtime (so it cannot pass for a
/// stored copy), and is gone or replaced after the next backup.
#[test]
fn new_files_written_in_place_are_never_committed_unverified() {
    let mut env = Env::new();
    let t = fresh_mtime();
    let content = Rng::new(0x1a7e).bytes(5000);
    let o = env.serve("d only", &backup_script(&[(dir_e(b"d", t), None)]).bytes);
    o.assert_backup_ok(0);
    env.accept();

    let cut = || {
        Script::backup()
            .msg(&ClientMsg::Entries(vec![
                dir_e(b"d", t),
                file_e(b"d/g", content.len(), t),
            ]))
            .msg(&file_data(0, &content[..2500]))
    };
    let o = env.serve("new file cut off mid-transfer", &cut().bytes);
    env.refused(&o, &["went away"]);
    let partial = env.current().join("d/g");
    if let Ok(m) = fs::symlink_metadata(&partial) {
        assert_ne!(
            m.mtime(),
            t,
            "an unverified file carries the client's mtime"
        );
    }

    // The client no longer has it: the leftover goes, the snapshot is exact.
    let o = env.serve("without g", &backup_script(&[(dir_e(b"d", t), None)]).bytes);
    let snap = o.assert_backup_ok(0);
    env.accept();
    assert!(!partial.exists(), "leftover of an interrupted run kept");
    assert!(!env.host_dir().join(&snap).join("d/g").exists());

    // Cut off again, then sent whole: the leftover is replaced by verified content.
    let o = env.serve("cut off again", &cut().bytes);
    env.refused(&o, &["went away"]);
    let with_g = backup_script(&[
        (dir_e(b"d", t), None),
        (file_e(b"d/g", content.len(), t), Some(&content)),
    ]);
    let o = env.serve("with g", &with_g.bytes);
    let snap = o.assert_backup_ok(1);
    env.accept();
    assert_eq!(
        fs::read(env.host_dir().join(&snap).join("d/g")).unwrap(),
        content
    );

    // A new file whose content fails its hash twice is not kept at all.
    let bad = Rng::new(0xbad).bytes(content.len());
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![
            dir_e(b"d", t),
            file_e(b"d/g", content.len(), t),
            file_e(b"d/h", content.len(), t),
        ]))
        .msg(&file_data(0, &bad))
        .msg(&file_end(0, &content, t))
        .msg(&file_data(0, &bad))
        .msg(&file_end(0, &content, t))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("new file failing its hash twice", &s.bytes);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let snap = match o.msgs.last() {
        Some(ServerMsg::BackupDone {
            snapshot: Some(s), ..
        }) => s.clone(),
        _ => panic!("no BackupDone with a snapshot:\n{}", o.describe()),
    };
    env.accept();
    assert!(!env.current().join("d/h").exists(), "unverified file kept");
    assert!(!env.host_dir().join(&snap).join("d/h").exists());
    assert_eq!(fs::read(env.current().join("d/g")).unwrap(), content);
}

/// Names in `dir/.byteback/sigs` of kept block signatures.
fn kept_sigs(dir: &Path) -> BTreeSet<Vec<u8>> {
    names_in(&dir.join(".byteback/sigs"))
        .into_iter()
        .filter(|n| !n.ends_with(b".cv"))
        .collect()
}

/// Names in `dir/.byteback/sigs` of kept chaining values.
fn kept_cvs(dir: &Path) -> BTreeSet<Vec<u8>> {
    names_in(&dir.join(".byteback/sigs"))
        .into_iter()
        .filter(|n| n.ends_with(b".cv"))
        .collect()
}

/// A fresh store holding one 5 MiB file `big` of random bytes (seed
/// `seed`): the store, the file's mtime, the generator, the content and the
/// snapshot taken.
fn big_file_stored(seed: u64) -> (Env, i64, Rng, Vec<u8>, String) {
    let mut env = Env::new();
    let t = fresh_mtime();
    let mut rng = Rng::new(seed);
    let old = rng.bytes(5 << 20);
    let o = env.serve(
        "big file stored",
        &backup_script(&[(file_e(b"big", old.len(), t), Some(&old))]).bytes,
    );
    let snap1 = o.assert_backup_ok(1);
    env.accept();
    (env, t, rng, old, snap1)
}

/// `base` with 4 KiB of new bytes at `at`.
fn edit_4k(base: &[u8], at: usize, rng: &mut Rng) -> Vec<u8> {
    let mut v = base.to_vec();
    v[at..at + 4096].copy_from_slice(&rng.bytes(4096));
    v
}

/// A backup in which file `big` (stored) changed to `content` (mtime `m`)
/// and is sent as `delta`; `resend`: then whole again, after a FileRetry.
fn changed_big(content: &[u8], m: i64, delta: Vec<u8>, resend: bool) -> Script {
    let mut s = Script::backup()
        .msg(&ClientMsg::Entries(vec![file_e(b"big", content.len(), m)]))
        .msg(&ClientMsg::SigRequest { id: 0 })
        .msg(&ClientMsg::FileData {
            id: 0,
            delta: Compressed::compress(&delta, 1).unwrap(),
        })
        .msg(&file_end(0, content, m));
    if resend {
        s = s.msg(&file_data(0, content)).msg(&file_end(0, content, m));
    }
    s.msg(&ClientMsg::BackupEnd)
}

/// Whether the server asked for a file again whole.
fn retried(o: &Outcome) -> bool {
    o.msgs
        .iter()
        .any(|m| matches!(m, ServerMsg::FileRetry { .. }))
}

/// The kept signature of `content` in snapshot or `current` `dir`.
fn kept(dir: &Path, content: &[u8]) -> Vec<u8> {
    let name = String::from_utf8(sig_name_of(content)).unwrap();
    fs::read(dir.join(".byteback/sigs").join(name)).unwrap()
}

/// Name of the kept signature of `content`.
fn sig_name_of(content: &[u8]) -> Vec<u8> {
    hash_bytes(content)
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect()
}

/// A file of at least 4 MiB gets its block signature kept beside the data,
/// named by its BLAKE3, in `current` and in its snapshot; a changed file's
/// signature is then served from there (not signed from the stored copy),
/// and the old one goes at the commit. A kept signature is never trusted:
/// one that is not the stored copy's (planted here, as damage would) only
/// makes the delta fail its BLAKE3 and the file is resent whole; one of the
/// wrong length is ignored and the stored copy signed instead.
#[test]
fn kept_signatures_are_the_contents_own_and_never_trusted() {
    use byteback_delta::{diff_segment, signature, Signature};
    let (mut env, t, mut rng, old, snap1) = big_file_stored(0x5165);
    let only = |c: &[u8]| BTreeSet::from([sig_name_of(c)]);
    assert_eq!(kept_sigs(&env.current()), only(&old));
    assert_eq!(kept(&env.current(), &old), signature(&old).0);
    assert_eq!(kept(&env.host_dir().join(&snap1), &old), signature(&old).0);

    // A changed file: the signature served is the kept one, and is right.
    let edit = edit_4k;
    let sig_sent = |o: &Outcome| {
        o.msgs.iter().find_map(|m| match m {
            ServerMsg::Signature { sig, .. } => Some(sig.clone()),
            _ => None,
        })
    };
    let changed = changed_big;
    let new = edit(&old, 1 << 20, &mut rng);
    let delta = diff_segment(&Signature::parse(&signature(&old).0).unwrap(), &new).unwrap();
    assert!(delta.len() < 64 << 10, "the delta copies little");
    let o = env.serve("changed", &changed(&new, t + 1, delta, false).bytes);
    let snap2 = o.assert_backup_ok(1);
    env.accept();
    // Sent with its strong hashes cut for the wire (6 of 8 bytes here).
    let wire = |sig: Vec<u8>| shorten_signature(sig, wire_strong_len(old.len() as u64));
    assert_eq!(wire_strong_len(old.len() as u64), 6);
    assert_eq!(
        sig_sent(&o),
        Some(wire(signature(&old).0)),
        "{}",
        o.describe()
    );
    assert!(!retried(&o), "{}", o.describe());
    assert_eq!(fs::read(env.current().join("big")).unwrap(), new);
    assert_eq!(kept_sigs(&env.current()), only(&new), "the old one stayed");
    assert_eq!(kept(&env.current(), &new), signature(&new).0);
    assert_eq!(kept_sigs(&env.host_dir().join(&snap2)), only(&new));
    assert_eq!(kept_sigs(&env.host_dir().join(&snap1)), only(&old));

    // A planted signature (of other content of the same length) is what the
    // server sends, so it is read from the store; the delta made against
    // it copies blocks the stored copy does not hold, fails its BLAKE3, and
    // the file is resent whole. Only the right content is committed.
    let newer = edit(&new, 3 << 20, &mut rng);
    let planted = signature(&newer).0;
    let name = String::from_utf8(sig_name_of(&new)).unwrap();
    // Replaced, not written through: snapshots share the inode without btrfs.
    let replace = |path: &Path, bytes: &[u8]| {
        let tmp = path.with_extension("test");
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, path).unwrap();
    };
    replace(&env.current().join(".byteback/sigs").join(&name), &planted);
    let delta = diff_segment(&Signature::parse(&planted).unwrap(), &newer).unwrap();
    let o = env.serve(
        "planted signature",
        &changed(&newer, t + 2, delta, true).bytes,
    );
    o.assert_sane();
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(
        matches!(
            o.msgs.last(),
            Some(ServerMsg::BackupDone {
                snapshot: Some(_),
                ..
            })
        ),
        "{}",
        o.describe()
    );
    env.accept();
    assert_eq!(sig_sent(&o), Some(wire(planted)), "{}", o.describe());
    assert!(
        retried(&o),
        "the wrong delta was not caught:\n{}",
        o.describe()
    );
    assert_eq!(fs::read(env.current().join("big")).unwrap(), newer);
    assert_eq!(kept_sigs(&env.current()), only(&newer));
    assert_eq!(kept(&env.current(), &newer), signature(&newer).0);

    // One of the wrong length is not used: the stored copy is signed.
    let name = String::from_utf8(sig_name_of(&newer)).unwrap();
    let path = env.current().join(".byteback/sigs").join(&name);
    let mut short = fs::read(&path).unwrap();
    short.truncate(short.len() - 12);
    replace(&path, &short);
    let last = edit(&newer, 0, &mut rng);
    let delta = diff_segment(&Signature::parse(&signature(&newer).0).unwrap(), &last).unwrap();
    let o = env.serve(
        "short signature",
        &changed(&last, t + 3, delta, false).bytes,
    );
    o.assert_backup_ok(1);
    env.accept();
    assert_eq!(
        sig_sent(&o),
        Some(wire(signature(&newer).0)),
        "{}",
        o.describe()
    );
    assert!(!retried(&o), "{}", o.describe());
    assert_eq!(fs::read(env.current().join("big")).unwrap(), last);
    assert_eq!(kept_sigs(&env.current()), only(&last));
}

/// Beside its signature, a large file gets the chaining values of its
/// BLAKE3 subtrees kept (`<hash>.cv`, 32 bytes per 64 KiB). A changed file
/// is then rebuilt without reading what it copies from the stored copy to
/// the same offset: only the units around the change are read back. The
/// values are used only for a stored copy that still has the manifest's
/// size and mtime, and only when they merge into the manifest's hash: a
/// stored copy changed behind the server's back (another mtime) is read as
/// before, its bad bytes fail the BLAKE3 and the file is resent whole;
/// damaged values are not used.
#[test]
fn kept_chaining_values_spare_reading_and_are_used_only_for_a_vouched_copy() {
    use byteback_delta::{diff_segment, signature, Signature};
    let (mut env, t, mut rng, old, snap1) = big_file_stored(0xc7a1);
    let cv_name = |c: &[u8]| [sig_name_of(c), b".cv".to_vec()].concat();
    let cv_path = |dir: &Path, c: &[u8]| {
        dir.join(".byteback/sigs")
            .join(std::ffi::OsStr::from_bytes(&cv_name(c)))
    };
    assert_eq!(kept_cvs(&env.current()), BTreeSet::from([cv_name(&old)]));
    // 80 units of 64 KiB, 32 bytes each.
    assert_eq!(
        fs::read(cv_path(&env.current(), &old)).unwrap().len(),
        80 * 32
    );
    assert_eq!(
        fs::read(cv_path(&env.host_dir().join(&snap1), &old)).unwrap(),
        fs::read(cv_path(&env.current(), &old)).unwrap()
    );

    let edit = edit_4k;
    // The delta an honest client makes against the signature of `base`.
    let changed = |base: &[u8], content: &[u8], m: i64, resend: bool| {
        let delta = diff_segment(&Signature::parse(&signature(base).0).unwrap(), content).unwrap();
        changed_big(content, m, delta, resend)
    };
    // "N changed files rebuilt from kept chaining values ...; M bytes read back".
    let rebuilt = |o: &Outcome| -> Option<(u64, u64)> {
        let line = o
            .stderr
            .lines()
            .find(|l| l.contains("rebuilt from kept chaining values"))?;
        let num = |before: &str| -> u64 {
            let head = &line[..line.find(before).unwrap()];
            let word = head.split_whitespace().last().unwrap();
            word.parse().unwrap()
        };
        Some((num(" changed files"), num(" bytes read back")))
    };

    // A 4 KiB change: the rest is neither read nor hashed; two units
    // around the change are read back.
    let new = edit(&old, 1 << 20, &mut rng);
    let o = env.serve("changed", &changed(&old, &new, t + 1, false).bytes);
    o.assert_backup_ok(1);
    env.accept();
    assert!(!retried(&o), "{}", o.describe());
    assert_eq!(fs::read(env.current().join("big")).unwrap(), new);
    let (files, read) = rebuilt(&o).unwrap_or_else(|| panic!("not used:\n{}", o.describe()));
    assert_eq!(files, 1);
    assert!(read <= 256 << 10, "{read} bytes read back");
    assert_eq!(kept_cvs(&env.current()), BTreeSet::from([cv_name(&new)]));
    assert_eq!(kept(&env.current(), &new), signature(&new).0);

    // The stored copy changed behind the server's back (so its mtime did):
    // its values are not used, and its bad bytes are caught.
    let path = env.current().join("big");
    let mut tampered = new.clone();
    tampered[3 << 20] ^= 0xff;
    let tmp = path.with_extension("test");
    fs::write(&tmp, &tampered).unwrap();
    fs::rename(&tmp, &path).unwrap();
    let newer = edit(&new, 4 << 20, &mut rng);
    let o = env.serve("tampered copy", &changed(&new, &newer, t + 2, true).bytes);
    o.assert_sane();
    assert_eq!(o.code, Some(0), "{}", o.describe());
    env.accept();
    assert_eq!(rebuilt(&o), None, "{}", o.describe());
    assert!(
        retried(&o),
        "the tampered copy was not caught:\n{}",
        o.describe()
    );
    assert_eq!(fs::read(env.current().join("big")).unwrap(), newer);
    assert_eq!(kept_cvs(&env.current()), BTreeSet::from([cv_name(&newer)]));

    // Damaged values (one bit) do not merge into the hash: not used, and
    // the stored copy is read as before; the new file's are right again.
    let cvs = cv_path(&env.current(), &newer);
    let mut bad = fs::read(&cvs).unwrap();
    bad[40 * 32] ^= 1;
    fs::write(cvs.with_extension("test"), &bad).unwrap();
    fs::rename(cvs.with_extension("test"), &cvs).unwrap();
    let last = edit(&newer, 0, &mut rng);
    let o = env.serve(
        "damaged values",
        &changed(&newer, &last, t + 3, false).bytes,
    );
    o.assert_backup_ok(1);
    env.accept();
    assert_eq!(rebuilt(&o), None, "{}", o.describe());
    assert!(!retried(&o), "{}", o.describe());
    assert_eq!(fs::read(env.current().join("big")).unwrap(), last);
    assert_eq!(
        fs::read(cv_path(&env.current(), &last)).unwrap().len(),
        80 * 32
    );
    let next = edit(&last, 2 << 20, &mut rng);
    let o = env.serve(
        "values used again",
        &changed(&last, &next, t + 4, false).bytes,
    );
    o.assert_backup_ok(1);
    env.accept();
    assert_eq!(rebuilt(&o).map(|r| r.0), Some(1), "{}", o.describe());
    assert_eq!(fs::read(env.current().join("big")).unwrap(), next);
}

/// A large file that shrank while the client read it arrives shorter than
/// its entry said (FileEnd has the length read): it is stored as read, with
/// its hash checked, and not asked for again; the same for a changed file
/// rebuilt from a stored copy whose chaining values are kept.
#[test]
fn a_large_file_that_shrank_while_read_is_stored_as_read() {
    use byteback_delta::{diff_segment, signature, Signature};
    let (mut env, t, mut rng, old, _) = big_file_stored(0x5a1c);
    // New, announced at 6 MiB, 4.5 MiB arrive.
    let grown = rng.bytes(6 << 20);
    let read = &grown[..(9 << 19)];
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![
            file_e(b"big", old.len(), t),
            file_e(b"new", grown.len(), t),
        ]))
        .msg(&file_data(0, read))
        .msg(&file_end(0, read, t))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("new file shrank", &s.bytes);
    o.assert_backup_ok(1);
    env.accept();
    assert!(!retried(&o), "{}", o.describe());
    assert_eq!(fs::read(env.current().join("new")).unwrap(), read);
    // Changed, announced at its old length, 4 MiB arrive, made of the
    // stored copy's first 3 MiB (copied in place) and 1 MiB of new bytes.
    let mut shrunk = old[..4 << 20].to_vec();
    shrunk[3 << 20..].copy_from_slice(&rng.bytes(1 << 20));
    let delta = diff_segment(&Signature::parse(&signature(&old).0).unwrap(), &shrunk).unwrap();
    let m = t + 1;
    let s = Script::backup()
        .msg(&ClientMsg::Entries(vec![
            file_e(b"big", old.len(), m),
            file_e(b"new", read.len(), t),
        ]))
        .msg(&ClientMsg::SigRequest { id: 0 })
        .msg(&ClientMsg::FileData {
            id: 0,
            delta: Compressed::compress(&delta, 1).unwrap(),
        })
        .msg(&file_end(0, &shrunk, m))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("changed file shrank", &s.bytes);
    o.assert_backup_ok(1);
    env.accept();
    assert!(!retried(&o), "{}", o.describe());
    assert_eq!(fs::read(env.current().join("big")).unwrap(), shrunk);
}

/// The only file in `current/.byteback/partial` (a kept rebuild), if any.
fn kept_partial(env: &Env) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(env.current().join(".byteback/partial"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(v.len() <= 1, "more than one partial: {v:?}");
    v.pop()
}

/// A changed file cut off mid-transfer keeps its rebuild in
/// `.byteback/partial` (never in a snapshot); the next session's basis is
/// that rebuild's prefix followed by the stored copy, so a delta copying
/// the prefix from offset 0 rebuilds the file. A kept rebuild is never
/// trusted: one damaged in between makes the copy fail its BLAKE3, the file
/// is resent whole, and only verified content is committed.
#[test]
fn a_kept_partial_rebuild_is_only_a_basis_and_never_trusted() {
    use byteback_delta::{diff_segment, signature, Signature};
    let mut env = Env::new();
    let t = fresh_mtime();
    let mut rng = Rng::new(0x9a27);
    let old = rng.bytes(20_000);
    let o = env.serve(
        "d/f stored",
        &backup_script(&[
            (dir_e(b"d", t), None),
            (file_e(b"d/f", old.len(), t), Some(&old)),
        ])
        .bytes,
    );
    o.assert_backup_ok(1);
    env.accept();

    for (round, damage) in [(1i64, false), (2, true)] {
        let new = rng.bytes(20_000);
        let m = t + round;
        let entries = || ClientMsg::Entries(vec![dir_e(b"d", t), file_e(b"d/f", new.len(), m)]);
        // Cut off after 12 KiB: the rebuild is kept.
        let cut = Script::backup()
            .msg(&entries())
            .msg(&file_data(0, &new[..12_288]));
        let o = env.serve("changed file cut off", &cut.bytes);
        env.refused(&o, &["went away"]);
        let partial = kept_partial(&env).expect("the partial rebuild was not kept");
        assert_eq!(fs::read(&partial).unwrap(), &new[..12_288]);
        for s in env.snapshot_names() {
            assert!(
                !env.host_dir().join(&s).join(".byteback/partial").exists(),
                "a partial in snapshot {s}"
            );
        }
        if damage {
            let mut bad = new[..12_288].to_vec();
            bad[5000] ^= 0xff;
            fs::write(&partial, bad).unwrap();
        }
        // The delta an honest client makes against prefix + stored copy.
        let stored = fs::read(env.current().join("d/f")).unwrap();
        let basis = [&new[..12_288], &stored[..]].concat();
        let sig = Signature::parse(&signature(&basis).0).unwrap();
        let delta = diff_segment(&sig, &new).unwrap();
        assert!(delta.len() < 10_000, "the delta copies nothing");
        let mut s = Script::backup()
            .msg(&entries())
            .msg(&ClientMsg::SigRequest { id: 0 })
            .msg(&ClientMsg::FileData {
                id: 0,
                delta: Compressed::compress(&delta, 1).unwrap(),
            })
            .msg(&file_end(0, &new, m));
        if damage {
            // FileRetry: sent again whole.
            s = s.msg(&file_data(0, &new)).msg(&file_end(0, &new, m));
        }
        let o = env.serve("resumed", &s.msg(&ClientMsg::BackupEnd).bytes);
        let snap = if damage {
            o.assert_sane();
            assert_eq!(o.code, Some(0), "{}", o.describe());
            match o.msgs.last() {
                Some(ServerMsg::BackupDone {
                    snapshot: Some(s), ..
                }) => s.clone(),
                _ => panic!("no BackupDone with a snapshot:\n{}", o.describe()),
            }
        } else {
            o.assert_backup_ok(1)
        };
        let retried = o
            .msgs
            .iter()
            .any(|m| matches!(m, ServerMsg::FileRetry { .. }));
        assert_eq!(retried, damage, "{}", o.describe());
        let sig_len = o.msgs.iter().find_map(|m| match m {
            ServerMsg::Signature { sig, .. } => Some(sig.len()),
            _ => None,
        });
        let sent = shorten_signature(signature(&basis).0, wire_strong_len(basis.len() as u64));
        assert_eq!(sig_len, Some(sent.len()), "{}", o.describe());
        env.accept();
        assert_eq!(fs::read(env.current().join("d/f")).unwrap(), new);
        assert_eq!(
            fs::read(env.host_dir().join(&snap).join("d/f")).unwrap(),
            new
        );
        assert!(
            kept_partial(&env).is_none(),
            "a partial outlived the commit"
        );
    }
}

/// A client that offers a content hash for a new file (moved or copied
/// files, `FileClone`) only ever gets content of its own host's tree that
/// checks out against the hash: another host's content is never found, and
/// a stored copy that no longer matches its hash fails verification, so the
/// server asks for the data and commits what was sent.
#[test]
fn clone_offers_never_give_another_hosts_data_or_an_unverified_copy() {
    const BIG: usize = 2 << 20;
    let mut env = Env::new();
    // The neighbour holds a big secret.
    let nsrc = env.work.join("neighbour-src");
    fs::create_dir_all(&nsrc).unwrap();
    let secret = Rng::new(0x5ec7).bytes(BIG);
    fs::write(nsrc.join("secret.bin"), &secret).unwrap();
    let o = local_backup(&env.store, &nsrc, "neighbour");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // From here on, nothing of the neighbour's may change.
    env.neighbour_sentinel = Sentinel::plant(&env.store.join("neighbour"));
    env.store_rest = env.store_rest_digest();
    // The victim stores a big file of the same size: new files of that size
    // are invited to offer their hash.
    let own = Rng::new(0x0e0e).bytes(BIG);
    let mtime = fresh_mtime();
    let o = env.serve(
        "a big file of the victim's own",
        &backup_script(&[
            (dir_e(b"d", mtime), None),
            (file_e(b"d/own.bin", BIG, mtime), Some(&own)),
        ])
        .bytes,
    );
    o.assert_backup_ok(1);
    env.accept();

    // Offers a hash, then (asked for the data) sends `sent` as new file `name`.
    let offer = |name: &[u8], hash: [u8; 32], sent: &[u8]| {
        let m2 = fresh_mtime();
        Script::backup()
            .msg(&ClientMsg::Entries(vec![
                dir_e(b"d", mtime),
                file_e(b"d/own.bin", BIG, mtime),
                file_e(name, BIG, m2),
            ]))
            .msg(&ClientMsg::FileClone {
                id: 0,
                size: BIG as u64,
                hash,
                mtime_sec: m2,
                mtime_nsec: 0,
            })
            .msg(&file_data(0, sent))
            .msg(&file_end(0, sent, m2))
            .msg(&ClientMsg::BackupEnd)
    };
    let asked_for_data = |o: &Outcome| {
        let invited = o.msgs.iter().any(|m| match m {
            ServerMsg::Needs(n) => n.len() == 1 && n[0].twin && !n[0].basis,
            _ => false,
        });
        assert!(invited, "not invited to offer:\n{}", o.describe());
        assert!(
            o.msgs
                .iter()
                .any(|m| matches!(m, ServerMsg::SendData { id: 0 })),
            "the offer was taken:\n{}",
            o.describe()
        );
    };

    // The neighbour's hash: not this host's content, so the data is asked for.
    let mine = Rng::new(0xda7a).bytes(BIG);
    let o = env.serve(
        "offering another host's hash",
        &offer(b"d/stolen.bin", hash_bytes(&secret), &mine).bytes,
    );
    asked_for_data(&o);
    let snap = o.assert_backup_ok(1);
    env.accept();
    assert_eq!(fs::read(env.current().join("d/stolen.bin")).unwrap(), mine);
    assert_eq!(
        fs::read(env.host_dir().join(&snap).join("d/stolen.bin")).unwrap(),
        mine
    );

    // The stored copy no longer matches its manifest's hash (changed behind
    // the server's back): its clone fails verification, and the data is
    // asked for instead of committing it.
    let stored = env.current().join("d/own.bin");
    let mut tampered = own.clone();
    tampered[BIG / 2] ^= 0xff;
    // Replaced, not written in place: snapshots may share its inode.
    let tmp = env.current().join("d/own.tmp");
    fs::write(&tmp, &tampered).unwrap();
    fs::rename(&tmp, &stored).unwrap();
    let o = env.serve(
        "offering the hash of a stored copy that changed",
        &offer(b"d/twin.bin", hash_bytes(&own), &own).bytes,
    );
    asked_for_data(&o);
    o.assert_backup_ok(1);
    assert_eq!(fs::read(env.current().join("d/twin.bin")).unwrap(), own);

    // No host's tree holds the secret but the neighbour's.
    for (p, m) in walk_all(&env.host_dir()) {
        if m.is_file() && m.len() == BIG as u64 {
            assert_ne!(fs::read(&p).unwrap(), secret, "{}", p.display());
        }
    }
    env.outside_sentinel.assert_untouched();
    env.neighbour_sentinel.assert_untouched();
}

/// The entries of `current`'s manifest, in order.
fn manifest_entries(env: &Env) -> Vec<byteback_protocol::ManifestEntry> {
    let p = env.current().join(".byteback/manifest");
    let mut r =
        byteback_server::manifest::ManifestReader::new(fs::File::open(&p).unwrap(), &p).unwrap();
    let mut v = vec![];
    while let Some(e) = r.next_entry().unwrap() {
        v.push(e);
    }
    v
}

/// The chain of `entries`' digests.
fn chain_of(entries: &[byteback_protocol::ManifestEntry]) -> [u8; 32] {
    let mut c = byteback_protocol::unchanged::Chain::new();
    for e in entries {
        c.push_entry(&e.entry);
    }
    c.finish()
}

/// Runs of unchanged entries (`Unchanged`): the server offers its
/// manifest's generation only while `current` matches it, carries a run
/// only when its digest chains to the manifest's own next entries, and
/// checks the directory structure and the order around a run as for
/// entries sent. A lying run fails the backup and commits nothing.
#[test]
fn runs_of_unchanged_entries_are_checked_against_the_manifest() {
    let mut env = Env::new();
    let old = manifest_entries(&env);
    let n = old.len() as u32;
    let generation = chain_of(&old);
    let unchanged = |count: u32, digest: [u8; 32]| ClientMsg::Unchanged { count, digest };

    // The whole manifest as one run: the same manifest, a new snapshot, the
    // same generation before and after.
    let s = Script::backup()
        .msg(&unchanged(n, generation))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("one honest run", &s.bytes);
    o.assert_backup_ok(0);
    assert!(
        o.msgs.iter().any(
            |m| matches!(m, ServerMsg::BackupReady { generation: Some(g) } if *g == generation)
        ),
        "{}",
        o.describe()
    );
    match o.backup_done() {
        Some(ServerMsg::BackupDone { generation: g, .. }) => assert_eq!(*g, Some(generation)),
        _ => panic!("{}", o.describe()),
    }
    env.accept();
    assert_eq!(manifest_entries(&env), old);

    // A digest off by one bit, a run longer than the manifest.
    let mut bad = generation;
    bad[7] ^= 1;
    let s = Script::backup()
        .msg(&unchanged(n, bad))
        .msg(&ClientMsg::BackupEnd);
    env.refused(&env.serve("wrong digest", &s.bytes), &["do not match"]);
    let s = Script::backup()
        .msg(&unchanged(n + 1, generation))
        .msg(&ClientMsg::BackupEnd);
    env.refused(
        &env.serve("longer than the manifest", &s.bytes),
        &["do not match"],
    );
    // An entry sent after a run must come after it.
    let file_at = old
        .iter()
        .position(|e| matches!(e.entry.kind, Kind::File { .. }))
        .unwrap();
    let k = file_at as u32 + 1;
    let s = Script::backup()
        .msg(&unchanged(k, chain_of(&old[..k as usize])))
        .msg(&ClientMsg::Entries(vec![old[file_at].entry.clone()]))
        .msg(&ClientMsg::BackupEnd);
    env.refused(
        &env.serve("entry inside a run", &s.bytes),
        &["out of order"],
    );

    // A run of the old entries after a change of one of them: the file's
    // old entry claimed unchanged after the client said it changed.
    let mut changed = old[file_at].entry.clone();
    changed.mtime_sec += 1;
    let s = Script::backup()
        .msg(&ClientMsg::Entries(
            old[..file_at].iter().map(|e| e.entry.clone()).collect(),
        ))
        .msg(&ClientMsg::Entries(vec![changed]))
        .msg(&unchanged(1, chain_of(&old[file_at..=file_at])))
        .msg(&ClientMsg::BackupEnd);
    env.refused(
        &env.serve("changed, then unchanged", &s.bytes),
        &["do not match"],
    );

    // Sent whole again: `current` matches its manifest once more.
    let recommit = |env: &mut Env| {
        let mut s = Script::backup();
        for part in old.chunks(1000) {
            s = s.msg(&ClientMsg::Entries(
                part.iter().map(|e| e.entry.clone()).collect(),
            ));
        }
        let o = env.serve("sent whole", &s.msg(&ClientMsg::BackupEnd).bytes);
        o.assert_backup_ok(0);
        env.accept();
        assert!(env.current().join(".byteback/clean").exists());
    };
    recommit(&mut env);

    // A directory turned into a file, then its old children claimed
    // unchanged: they would have no directory to live in.
    let dir_at = old
        .iter()
        .rposition(|e| {
            e.entry.kind == Kind::Dir
                && old.iter().any(|c| {
                    c.entry
                        .path
                        .starts_with(&[&e.entry.path[..], b"/"].concat())
                })
        })
        .unwrap();
    let mut as_file = old[dir_at].entry.clone();
    as_file.kind = Kind::File { size: 0 };
    let s = Script::backup()
        .msg(&ClientMsg::Entries(
            old[..dir_at].iter().map(|e| e.entry.clone()).collect(),
        ))
        .msg(&ClientMsg::Entries(vec![as_file]))
        .msg(&unchanged(1, chain_of(&old[dir_at + 1..=dir_at + 1])))
        .msg(&ClientMsg::BackupEnd);
    env.refused(
        &env.serve("children of a file", &s.bytes),
        &["without its parent"],
    );
    recommit(&mut env);

    // A manifest without a generation (written by a version before them),
    // or with a wrong one: a backup that changes nothing writes it anew,
    // with its own, and only then names one.
    let manifest = env.current().join(".byteback/manifest");
    let name = "user.byteback.generation";
    for planted in [None, Some([7u8; 32])] {
        // A copy put in its place: where snapshots are hard-link copies the
        // manifest in place is a snapshot's too.
        let copy = manifest.with_extension("planted");
        fs::write(&copy, fs::read(&manifest).unwrap()).unwrap();
        if let Some(g) = planted {
            rustix::fs::setxattr(&copy, name, &g, rustix::fs::XattrFlags::empty()).unwrap();
        }
        fs::rename(&copy, &manifest).unwrap();
        let mut s = Script::backup();
        for part in old.chunks(1000) {
            s = s.msg(&ClientMsg::Entries(
                part.iter().map(|e| e.entry.clone()).collect(),
            ));
        }
        let o = env.serve(
            "generation missing or wrong",
            &s.msg(&ClientMsg::BackupEnd).bytes,
        );
        o.assert_backup_ok(0);
        env.accept();
        match o.backup_done() {
            Some(ServerMsg::BackupDone { generation: g, .. }) => assert_eq!(*g, Some(generation)),
            _ => panic!("{}", o.describe()),
        }
        let mut got = [0u8; 64];
        let n = rustix::fs::getxattr(&manifest, name, &mut got[..]).unwrap();
        assert_eq!(&got[..n], &generation[..], "{planted:?}");
        assert_eq!(manifest_entries(&env), old);
    }

    // Once `current` does not match its manifest (no clean marker), no
    // generation is offered and no run is taken.
    fs::remove_file(env.current().join(".byteback/clean")).unwrap();
    let s = Script::backup()
        .msg(&unchanged(n, generation))
        .msg(&ClientMsg::BackupEnd);
    let o = env.serve("not clean", &s.bytes);
    assert!(
        o.msgs
            .iter()
            .any(|m| matches!(m, ServerMsg::BackupReady { generation: None })),
        "{}",
        o.describe()
    );
    env.refused(&o, &["no generation"]);
}

/// A run of unchanged entries is held by the server only up to the bytes a
/// batch of entries sent may take: a manifest of entries with large xattrs
/// (planted by an earlier session of the same client) cannot make one run
/// cost more.
#[test]
fn a_run_of_unchanged_entries_is_bounded_in_bytes() {
    let mut env = Env::new();
    let m = fresh_mtime();
    let big = |i: usize| {
        let mut e = entry(format!("d/fifo{i:03}").as_bytes(), Kind::Fifo, 0o644, m);
        e.xattrs = vec![(b"user.big".to_vec(), vec![i as u8; 64 << 10])];
        e
    };
    let mut s = Script::backup().msg(&ClientMsg::Entries(vec![dir_e(b"d", m)]));
    for part in (0..200).collect::<Vec<_>>().chunks(100) {
        s = s.msg(&ClientMsg::Entries(part.iter().map(|&i| big(i)).collect()));
    }
    let o = env.serve(
        "entries with large xattrs",
        &s.msg(&ClientMsg::BackupEnd).bytes,
    );
    o.assert_backup_ok(0);
    env.accept();
    let old = manifest_entries(&env);
    assert_eq!(old.len(), 201);
    // Refused on the bytes before the digest is checked.
    let s = Script::backup()
        .msg(&ClientMsg::Unchanged {
            count: 201,
            digest: [0; 32],
        })
        .msg(&ClientMsg::BackupEnd);
    env.refused(
        &env.serve("a run of 12 MiB", &s.bytes),
        &["holds more than"],
    );
}

//! `byteback-server verify`: re-hashing stored files against their manifests.
//!
//! Every regular file a manifest names is read beneath its snapshot's fd and
//! its size and BLAKE3 compared with the manifest's; each mismatch or read
//! error is reported per snapshot. A damaged file in `current` is marked so
//! the next backup rebuilds it: its mtime is set to 0 (so it no longer
//! matches the client's) and the `clean` marker is removed, under the host's
//! lock; the damaged copy stays as the delta basis, so only the damaged
//! blocks travel again. Snapshots are read-only and keep their damage; the
//! report names them so a restore from them can be avoided.
//!
//! A budgeted run (`--budget BYTES`, `--max-time SECONDS`) continues where
//! the previous one stopped: `<store>/<host>/.byteback-verify` keeps the
//! position (snapshot and path), when a whole pass over the host last ended,
//! and the damage that pass found, for `status`. A file larger than
//! [`PIECE`] is hashed a piece at a time, and a budgeted run that runs out
//! within it keeps the chaining values of the pieces it hashed: the next
//! run goes on from there, so `--max-time` bounds a run whatever the file
//! sizes and a file too large for one run is verified over several.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use byteback_protocol::{compare_paths, Kind, ManifestEntry};

use crate::error::{Error, IoContext, Result};
use crate::fsops;
use crate::manifest::ManifestReader;
use crate::store::{disk_path, HostStore, Store, META_DIR, META_DIR_NAME};

/// The state file in each host directory.
pub const STATE: &[u8] = b".byteback-verify";
/// In the store's root: held by the verify running (see [`run`]).
const VERIFY_LOCK: &[u8] = b".byteback-verify.lock";
/// Marker in `current/.byteback`: current matches its manifest (see backup.rs).
const CLEAN: &[u8] = b"clean";
const MANIFEST: &[u8] = b"manifest";
/// Bytes of a large file hashed as one BLAKE3 subtree; a budgeted run
/// stops between pieces (a second or so of reading).
pub const PIECE: u64 = 64 << 20;

/// `byteback-server verify` options.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Store root (default: the home directory of the user running it; as root,
    /// the account byteback's).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Only these hosts (default: every host).
    #[arg(long)]
    pub host: Vec<String>,
    /// Only this snapshot (or `current`).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Read at most this many bytes (e.g. 500M, 20G; each file counts 4 KiB more), continuing where the last budgeted run stopped.
    #[arg(long, value_parser = parse_bytes)]
    pub budget: Option<u64>,
    /// Stop after this many seconds, continuing next time where this run stopped.
    #[arg(long)]
    pub max_time: Option<u64>,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Parses `123`, `500K`, `500M`, `20G`, `1T` (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 500M, 20G)"))
}

/// One damaged file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Snapshot (or `current`).
    pub snapshot: String,
    /// Wire path.
    pub path: Vec<u8>,
    /// What is wrong.
    pub problem: String,
}

/// What one host's verification found.
#[derive(Debug, Default)]
pub struct HostReport {
    /// Host name.
    pub host: String,
    /// Snapshots read (wholly or in part).
    pub snapshots: Vec<String>,
    /// Regular files checked.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Damaged files, the first [`MAX_DAMAGE_LISTED`] of them.
    pub damaged: Vec<Damage>,
    /// Damaged files found beyond those listed, per snapshot.
    pub unlisted: BTreeMap<String, u64>,
    /// Damaged files in `current` marked for the next backup.
    pub marked: u64,
    /// Whether this run reached the end of the host's last snapshot.
    pub finished: bool,
    /// It stopped in `current` for a backup of the host that waited.
    pub yielded: bool,
    /// Problems that stopped part of the check (an unreadable manifest...).
    pub errors: Vec<String>,
}

impl HostReport {
    /// Counts damaged file `d`, listing it while the list has room.
    fn found(&mut self, d: Damage) {
        if self.damaged.len() < MAX_DAMAGE_LISTED {
            self.damaged.push(d);
        } else {
            *self.unlisted.entry(d.snapshot).or_default() += 1;
        }
    }

    /// Damaged files found, listed or not.
    pub fn damaged_count(&self) -> u64 {
        self.damaged.len() as u64 + self.unlisted.values().sum::<u64>()
    }
}

/// What each file checked takes from a byte budget beyond its bytes.
const FILE_COST: u64 = 4096;

/// Damaged files one host's report lists, and its state keeps, by name;
/// beyond them they are counted per snapshot. A failing disc can damage
/// millions of files: each listed costs a path and a message in memory,
/// in the state file and in every `status`.
pub const MAX_DAMAGE_LISTED: usize = 10_000;

/// Marks for the next backup made at a time in `current` (the paths of
/// damaged files wait in memory until then).
const MARK_BATCH: usize = 4096;

/// The budget of one run, shared by its hosts.
pub struct Budget {
    bytes: Option<u64>,
    until: Option<Instant>,
    used: u64,
    /// A run may stop within a large file (its place there is kept): only
    /// a budgeted pass, which keeps its place.
    within_files: bool,
    /// While `current` is verified: the host's file a backup waiting for
    /// its lock holds shared (see `HostStore::lock`); the check then stops
    /// as if the budget were spent, and goes on next time.
    yield_to: Option<File>,
}

impl Budget {
    /// A budget of `bytes` and `time`, either unlimited when `None`.
    pub fn new(bytes: Option<u64>, time: Option<Duration>) -> Self {
        Budget {
            bytes,
            until: time.map(|t| Instant::now() + t),
            used: 0,
            within_files: false,
            yield_to: None,
        }
    }

    fn spent(&self) -> bool {
        self.bytes.is_some_and(|b| self.used >= b)
            || self.until.is_some_and(|u| Instant::now() >= u)
            || self.backup_waits()
    }

    /// Whether a backup waits for the lock held while `current` is checked.
    fn backup_waits(&self) -> bool {
        use rustix::fs::{flock, FlockOperation};
        self.yield_to.as_ref().is_some_and(|f| {
            match flock(f, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    let _ = flock(f, FlockOperation::Unlock);
                    false
                }
                Err(_) => true,
            }
        })
    }

    fn limited(&self) -> bool {
        self.bytes.is_some() || self.until.is_some()
    }
}

/// Where a budgeted pass over a host stands, and what the last whole pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    /// Snapshot and last path checked by the pass under way.
    pub cursor: Option<(String, Vec<u8>)>,
    /// When the last whole pass ended (Unix seconds).
    pub last_full: Option<i64>,
    /// When a budgeted run last took its turn at this host (Unix seconds).
    pub last_turn: Option<i64>,
    /// Damage found since the last whole pass began, the first
    /// [`MAX_DAMAGE_LISTED`] files of it.
    pub damage: Vec<Damage>,
    /// Damaged files known per snapshot, listed or not (at least those
    /// listed): what the last run that checked the whole snapshot found,
    /// or the pass that checked it in several runs; while a pass is under
    /// way in it, the larger of that and what the pass found so far.
    pub counts: BTreeMap<String, u64>,
    /// Damaged files the runs of the pass under way found in a snapshot
    /// whose end they have not reached yet.
    pub pass: BTreeMap<String, u64>,
    /// The file after the cursor, hashed in part: its snapshot and path.
    pub partial: Option<(String, Vec<u8>, Progress)>,
    /// The pass under way passed something over (`current`, a snapshot
    /// being deleted) or could not read a manifest, in any of its runs: it
    /// will not count as whole.
    pub incomplete: bool,
}

/// How far a large file was hashed: the chaining values of its first
/// `pieces` pieces, merged as BLAKE3 merges subtrees (one value per bit
/// set in `pieces`, the largest subtree first), and what the file was then
/// (size, inode and ctime: a file changed since is hashed again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    ident: String,
    pieces: u64,
    stack: Vec<ChainingValue>,
}

impl Progress {
    fn render(&self) -> String {
        let cvs: String = self.stack.iter().map(|cv| hex(cv)).collect();
        format!("{} {} {cvs}", self.ident, self.pieces)
    }

    fn parse(ident: &str, pieces: &str, cvs: &str) -> Option<Progress> {
        let pieces: u64 = pieces.parse().ok()?;
        let bytes = unhex(cvs)?;
        let stack: Vec<ChainingValue> = bytes
            .chunks(32)
            .map(|c| c.try_into().ok())
            .collect::<Option<_>>()?;
        (pieces > 0 && stack.len() == pieces.count_ones() as usize).then(|| Progress {
            ident: ident.to_string(),
            pieces,
            stack,
        })
    }
}

/// Lowercase hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes hex text `s` spells (either case), if it does.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl State {
    /// Parses the state file; lines it does not understand are skipped.
    pub fn parse(text: &str) -> State {
        let mut st = State::default();
        for line in text.lines() {
            let mut w = line.splitn(4, ' ');
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("cursor"), Some(snap), Some(p), None) => {
                    if let Some(p) = unhex(p) {
                        st.cursor = Some((snap.to_string(), p));
                    }
                }
                (Some("last-full"), Some(t), None, None) => st.last_full = t.parse().ok(),
                (Some("last-turn"), Some(t), None, None) => st.last_turn = t.parse().ok(),
                (Some("incomplete"), None, None, None) => st.incomplete = true,
                (Some("partial"), Some(snap), Some(p), Some(rest)) => {
                    let mut r = rest.split(' ');
                    let got = (r.next(), r.next(), r.next(), r.next());
                    if let (Some(path), (Some(id), Some(n), Some(cvs), None)) = (unhex(p), got) {
                        if let Some(pr) = Progress::parse(id, n, cvs) {
                            st.partial = Some((snap.to_string(), path, pr));
                        }
                    }
                }
                (Some(w @ ("damage-count" | "damage-pass")), Some(snap), Some(n), None) => {
                    if let Ok(n) = n.parse() {
                        match w {
                            "damage-count" => st.counts.insert(snap.to_string(), n),
                            _ => st.pass.insert(snap.to_string(), n),
                        };
                    }
                }
                (Some("damage"), _, _, _) if st.damage.len() >= MAX_DAMAGE_LISTED => {}
                (Some("damage"), Some(snap), Some(p), problem) => {
                    if let Some(path) = unhex(p) {
                        st.damage.push(Damage {
                            snapshot: snap.to_string(),
                            path,
                            problem: problem.unwrap_or("").to_string(),
                        });
                    }
                }
                _ => {}
            }
        }
        st
    }

    /// The state file's text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some((snap, p)) = &self.cursor {
            s.push_str(&format!("cursor {snap} {}\n", hex(p)));
        }
        if let Some(t) = self.last_full {
            s.push_str(&format!("last-full {t}\n"));
        }
        if let Some(t) = self.last_turn {
            s.push_str(&format!("last-turn {t}\n"));
        }
        if self.incomplete {
            s.push_str("incomplete\n");
        }
        if let Some((snap, p, pr)) = &self.partial {
            s.push_str(&format!("partial {snap} {} {}\n", hex(p), pr.render()));
        }
        for (snap, n) in &self.counts {
            s.push_str(&format!("damage-count {snap} {n}\n"));
        }
        for (snap, n) in &self.pass {
            s.push_str(&format!("damage-pass {snap} {n}\n"));
        }
        for d in &self.damage {
            let problem = d.problem.replace(['\n', '\r'], " ");
            s.push_str(&format!(
                "damage {} {} {problem}\n",
                d.snapshot,
                hex(&d.path)
            ));
        }
        s
    }

    /// Damaged files known, listed or not, of the snapshots `kept`
    /// (`current` always).
    pub fn damaged_count(&self, kept: impl Fn(&str) -> bool) -> u64 {
        let kept = |s: &str| s == "current" || kept(s);
        let mut known: BTreeMap<&str, u64> = BTreeMap::new();
        for d in self.damage.iter().filter(|d| kept(&d.snapshot)) {
            *known.entry(&d.snapshot).or_default() += 1;
        }
        for (s, n) in self.counts.iter().filter(|(s, _)| kept(s)) {
            let k = known.entry(s).or_default();
            *k = (*k).max(*n);
        }
        known.values().sum()
    }

    /// Reads a host's state (empty when there is none).
    pub fn load(host: &HostStore) -> State {
        let mut text = String::new();
        match fsops::open_file(host.fd(), STATE) {
            Ok(mut f) => {
                if f.read_to_string(&mut text).is_err() {
                    return State::default();
                }
                State::parse(&text)
            }
            Err(_) => State::default(),
        }
    }

    fn save(&self, host: &HostStore) -> Result<()> {
        let tmp = b".byteback-verify.tmp";
        let _ = fsops::remove_any(host.fd(), tmp);
        let path = || host.path.join(".byteback-verify.tmp").display().to_string();
        let mut f = fsops::create_new(host.fd(), tmp).op("create", path)?;
        f.write_all(self.render().as_bytes())
            .and_then(|()| f.sync_all())
            .op("write", path)?;
        fsops::replace(host.fd(), tmp, host.fd(), STATE).op("rename into place", path)?;
        Ok(())
    }
}

/// What hashing a file came to.
#[derive(Debug)]
enum Hashed {
    /// Its length read and, when that is the length expected, its BLAKE3.
    Whole(u64, Option<[u8; 32]>),
    /// The budget ran out between two pieces.
    Stopped(Progress),
}

/// Size, inode and ctime of a file, which a file rewritten since differs in.
fn ident_of(m: &std::fs::Metadata) -> String {
    format!("{}-{}-{}.{}", m.len(), m.ino(), m.ctime(), m.ctime_nsec())
}

/// `BYTEBACK_TEST_VERIFY_SLOW` (debug builds): 100 ms per MiB read, so a
/// test can start a backup while `current` is being checked.
fn slow_for_tests() {
    static SLOW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if cfg!(debug_assertions)
        && *SLOW.get_or_init(|| std::env::var_os("BYTEBACK_TEST_VERIFY_SLOW").is_some())
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Hashes a file the manifest says has `size` bytes, `piece` bytes at a
/// time when it is larger than one piece, going on from `from` when that
/// is this same file's; between pieces, stops when the budget is spent
/// and `stoppable`. The file is read to `size` only: its length on disc is
/// checked first.
fn hash_pieces(
    file: &File,
    size: u64,
    piece: u64,
    from: Option<Progress>,
    budget: &mut Budget,
    stoppable: bool,
) -> std::io::Result<Hashed> {
    let meta = file.metadata()?;
    if meta.len() != size {
        return Ok(Hashed::Whole(meta.len(), None));
    }
    let mut buf = vec![0u8; (1 << 20).min(piece as usize)];
    // Hashes bytes `start..end` into `h`; false if the file ended first.
    let mut read = |h: &mut blake3::Hasher, budget: &mut Budget, start: u64, end: u64| {
        let mut at = start;
        while at < end {
            slow_for_tests();
            let want = (end - at).min(buf.len() as u64) as usize;
            let got = file.read_at(&mut buf[..want], at)?;
            if got == 0 {
                return Ok::<_, std::io::Error>(false);
            }
            h.update(&buf[..got]);
            at += got as u64;
            budget.used += got as u64;
        }
        Ok(true)
    };
    if size <= piece {
        let mut h = blake3::Hasher::new();
        return Ok(match read(&mut h, budget, 0, size)? {
            true => Hashed::Whole(size, Some(*h.finalize().as_bytes())),
            false => Hashed::Whole(file.metadata()?.len(), None),
        });
    }
    let ident = ident_of(&meta);
    // Whole pieces before the last, which holds 1..=piece bytes.
    let before_last = (size - 1) / piece;
    let (mut pieces, mut stack) = match from {
        Some(p) if p.ident == ident && p.pieces <= before_last => (p.pieces, p.stack),
        _ => (0, Vec::new()),
    };
    loop {
        let start = pieces * piece;
        let end = (start + piece).min(size);
        let mut h = blake3::Hasher::new();
        h.set_input_offset(start);
        if !read(&mut h, budget, start, end)? {
            return Ok(Hashed::Whole(file.metadata()?.len(), None));
        }
        let cv = h.finalize_non_root();
        if pieces == before_last {
            // The last piece: merged with the subtrees before it, right to left.
            let mut right = cv;
            while stack.len() > 1 {
                let left = stack.pop().unwrap_or_default();
                right = hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash);
            }
            let left = stack.pop().unwrap_or_default();
            let root = hazmat::merge_subtrees_root(&left, &right, Mode::Hash);
            return Ok(Hashed::Whole(size, Some(*root.as_bytes())));
        }
        stack.push(cv);
        pieces += 1;
        while stack.len() > pieces.count_ones() as usize {
            let right = stack.pop().unwrap_or_default();
            let left = stack.pop().unwrap_or_default();
            stack.push(hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        // Stopped for a backup even where a budget could not stop: its
        // place is kept by a budgeted pass, and the file is checked again
        // by any other.
        if (stoppable && budget.spent()) || budget.backup_waits() {
            return Ok(Hashed::Stopped(Progress {
                ident,
                pieces,
                stack,
            }));
        }
    }
}

/// What checking one file came to.
enum Checked {
    /// Whole: `Some(problem)` when it is damaged.
    Done(Option<String>),
    /// Hashed in part: the budget ran out.
    Stopped(Progress),
}

/// Checks one file of a snapshot, going on from `from` (see [`hash_pieces`]).
fn check_file(
    snap: impl AsFd,
    e: &ManifestEntry,
    size: u64,
    from: Option<Progress>,
    budget: &mut Budget,
    stoppable: bool,
) -> Checked {
    let file = match fsops::open_file(&snap, &disk_path(&e.entry.path)) {
        Ok(f) => f,
        Err(err) => return Checked::Done(Some(format!("cannot open: {err}"))),
    };
    Checked::Done(
        match hash_pieces(&file, size, PIECE, from, budget, stoppable) {
            Err(err) => Some(format!("cannot read: {err}")),
            Ok(Hashed::Stopped(p)) => return Checked::Stopped(p),
            Ok(Hashed::Whole(n, _)) if n != size => {
                Some(format!("{n} bytes stored, {size} in the manifest"))
            }
            Ok(Hashed::Whole(_, h)) if h != Some(e.hash) => {
                Some("content does not match its BLAKE3".into())
            }
            Ok(_) => None,
        },
    )
}

/// Sets a damaged file of `current` to an mtime of its own (0, else 2 or
/// 4 s after the epoch) so the next backup rebuilds it; synced, so a power
/// cut cannot lose the mark while the manifest still vouches for the
/// damaged copy (which the next backup, finding `current` unclean, would
/// keep by its size and mtime). Not the manifest's mtime, which is the
/// file's on disc or a second after it (see `on_disc_mtime`): a file
/// stamped 0 (reproducible builds) would be kept damaged, for good.
fn mark_for_resend(current: impl AsFd, path: &[u8]) -> Result<()> {
    let f = fsops::open_file(&current, &disk_path(path)).op("open", || shown(path))?;
    let now = rustix::fs::fstat(&f).op("stat", || shown(path))?.st_mtime;
    let mark = [0, 2, 4]
        .into_iter()
        .find(|m| *m != now && *m != now.saturating_add(1))
        .unwrap_or(0);
    fsops::set_mtime(&f, mark, 0).op("set the mtime of", || shown(path))?;
    fsops::fsync(&f).op("sync", || shown(path))?;
    Ok(())
}

/// Verifies one snapshot from `after` on; `None` when it was passed over
/// (pruned since it was listed, or being deleted); false when the budget ran out first
/// (then `cursor` holds the last path checked). `partial` holds on entry
/// a file of this snapshot hashed in part by an earlier run, on return the
/// file this run stopped within, if it did.
fn verify_snapshot(
    host: &HostStore,
    name: &str,
    after: Option<&[u8]>,
    budget: &mut Budget,
    report: &mut HostReport,
    cursor: &mut Option<Vec<u8>>,
    partial: &mut Option<(Vec<u8>, Progress)>,
) -> Result<Option<bool>> {
    let stoppable = budget.within_files;
    let mut from = partial.take();
    // Held against prunes while it is read (another host's backup may
    // start one): one deleted under it had every file after read as
    // damaged. One pruned since it was listed is passed over.
    let snap = if name == "current" {
        host.open_snapshot(name)?
    } else {
        match host.open_snapshot_to_read(name) {
            Ok(Some(fd)) => fd,
            Ok(None) => host.open_snapshot(name)?,
            Err(e) if host.snapshot_going(name) => {
                eprintln!(
                    "byteback-server: verify: {}/{name} was pruned meanwhile ({e}): passed over",
                    host.name
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    };
    let snap_path = host.path.join(name);
    if crate::legacy::is_legacy(&snap).op("look at", || snap_path.display().to_string())? {
        eprintln!(
            "byteback-server: verify: {}/{name} is a byteback 1.x snapshot, which keeps no checksums: not verified",
            host.name
        );
        return Ok(Some(true));
    }
    let meta_path = snap_path.join(META_DIR_NAME);
    let no_manifest = |e: Error| e.context(format!("{name}: no manifest"));
    let meta = fsops::open_dir(&snap, META_DIR)
        .op("open", || meta_path.display().to_string())
        .map_err(no_manifest)?;
    let shown = meta_path.join("manifest");
    let mf = fsops::open_file(&meta, MANIFEST)
        .op("open", || shown.display().to_string())
        .map_err(no_manifest)?;
    let damaged = |e| Error::Manifest(e).context(format!("{name}: manifest"));
    let mut reader = ManifestReader::new(mf, &shown).map_err(damaged)?;
    report.snapshots.push(name.to_string());
    let mut damaged_current = vec![];
    let mut finished = true;
    while let Some(e) = reader.next_entry().map_err(damaged)? {
        if after.is_some_and(|a| compare_paths(a, &e.entry.path) != std::cmp::Ordering::Less) {
            continue;
        }
        if budget.spent() {
            *partial = from.take();
            finished = false;
            break;
        }
        let Kind::File { size } = e.entry.kind else {
            continue;
        };
        let before = budget.used;
        let resume = match from.take() {
            Some((p, pr)) if p == e.entry.path => Some(pr),
            other => {
                from = other;
                None
            }
        };
        let problem = match check_file(&snap, &e, size, resume, budget, stoppable) {
            Checked::Done(problem) => problem,
            Checked::Stopped(pr) => {
                report.bytes += budget.used - before;
                *partial = Some((e.entry.path.clone(), pr));
                finished = false;
                break;
            }
        };
        if let Some(problem) = problem {
            if name == "current" {
                damaged_current.push(e.entry.path.clone());
                if damaged_current.len() >= MARK_BATCH {
                    report.marked += mark_current(host, &snap, &damaged_current, report)?;
                    damaged_current.clear();
                }
            }
            report.found(Damage {
                snapshot: name.to_string(),
                path: e.entry.path.clone(),
                problem,
            });
        }
        report.files += 1;
        report.bytes += budget.used - before;
        // Opening a file costs something whatever its size: millions of
        // empty files are not a free pass through a byte budget.
        budget.used = budget.used.saturating_add(FILE_COST);
        *cursor = Some(e.entry.path.clone());
    }
    if !damaged_current.is_empty() {
        report.marked += mark_current(host, &snap, &damaged_current, report)?;
    }
    Ok(Some(finished))
}

/// The host's lock, held while `current` is verified, when no backup
/// holds it and `current` has its clean marker; else why not (byteback
/// 1.x's `current` has no manifest to verify).
fn current_settled(host: &HostStore) -> std::result::Result<Settled, String> {
    let lock = host.lock_within(10).map_err(|_| {
        // Held shared (a restore of `current` reads it) or not at all
        // (a backup writes it).
        match host.lock_shared() {
            Ok(_) => "is being read by a restore".to_string(),
            Err(_) => "is being written by a backup".to_string(),
        }
    })?;
    let current = match host.current() {
        Ok(c) => c,
        // A host kept for its snapshots alone: nothing to verify, and no
        // reason a pass is not whole.
        Err(_) if !host.path.join("current").exists() => {
            return Ok(Settled::Nothing("does not exist".into()))
        }
        Err(e) => return Err(e.to_string()),
    };
    // byteback 1.x's `current` (no byteback backup has run into it yet)
    // has no manifest and so nothing to verify, which is no sign of an
    // interrupted backup, nor a reason a pass is not whole (as 1.x
    // snapshots).
    if crate::legacy::is_legacy(&current).unwrap_or(false) {
        return Ok(Settled::Nothing(
            "is byteback 1.x's (no byteback backup has taken it over yet), which keeps no checksums".into(),
        ));
    }
    let clean = fsops::open_dir(&current, META_DIR).and_then(|meta| {
        Ok(rustix::fs::statat(
            &meta,
            os(CLEAN),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?)
    });
    match clean {
        Ok(_) => Ok(Settled::Yes(lock)),
        Err(_) => Err("was left by an interrupted backup (no clean marker)".into()),
    }
}

/// What [`current_settled`] found `current` to be.
enum Settled {
    /// Whole, as a backup left it: verified, under the host's lock.
    Yes(std::fs::File),
    /// Nothing to verify (why): passed over, yet the pass is whole.
    Nothing(String),
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}

/// Marks damaged files of `current` for the next backup (the host's lock
/// is held: see [`current_settled`]).
fn mark_current(
    host: &HostStore,
    current: impl AsFd,
    paths: &[Vec<u8>],
    report: &mut HostReport,
) -> Result<u64> {
    let meta_path = host.path.join("current").join(META_DIR_NAME);
    let at = || meta_path.display().to_string();
    let meta = fsops::open_dir(&current, META_DIR).op("open", at)?;
    fsops::remove_any(&meta, CLEAN).op("remove the clean marker in", at)?;
    fsops::fsync(&meta).op("sync", at)?;
    let mut n = 0;
    for p in paths {
        match mark_for_resend(&current, p) {
            Ok(()) => n += 1,
            Err(e) => report.errors.push(format!(
                "current: cannot mark {} for the next backup: {e}",
                shown(p)
            )),
        }
    }
    Ok(n)
}

/// Verifies one host: its snapshots oldest first, then `current`.
pub fn verify_host(
    host: &HostStore,
    only: Option<&str>,
    budget: &mut Budget,
    now: i64,
) -> Result<HostReport> {
    let mut report = HostReport {
        host: host.name.clone(),
        ..Default::default()
    };
    let mut names: Vec<String> = host.snapshots()?.into_iter().map(|(n, _)| n).collect();
    names.push("current".into());
    if let Some(s) = only {
        names.retain(|n| n == s);
        if names.is_empty() {
            return Err(Error::Usage(format!(
                "host {} has no snapshot {s}",
                host.name
            )));
        }
    }
    let resume = budget.limited() && only.is_none();
    budget.within_files = resume;
    let mut state = State::load(host);
    if resume {
        // The turn is taken, whatever comes of it: a host whose state
        // cannot be saved at the end (a full disc) must not come first
        // again at every run.
        state.last_turn = Some(now);
        state.save(host)?;
    }
    // Where this run starts: after the cursor of a budgeted pass under way.
    let (first, mut after) = match (&state.cursor, resume) {
        (Some((snap, path)), true) => match names.iter().position(|n| n == snap) {
            Some(i) => (i, (!path.is_empty()).then(|| path.clone())),
            // Pruned since: the pass goes on with the next snapshot after
            // it. (Starting over, a pass on a store that prunes its oldest
            // snapshot a day and checks less than one a day never got past
            // the oldest ones.)
            None => (next_after(&names, snap), None),
        },
        _ => (0, None),
    };
    if first == 0 && after.is_none() && only.is_none() {
        // A new pass begins: damage of snapshots pruned since goes; the
        // rest stays listed until its snapshot is checked again.
        state.damage.retain(|d| names.contains(&d.snapshot));
        state.counts.retain(|s, _| names.contains(s));
        // A run without a budget leaves a budgeted pass under way its
        // tally and its incompleteness (it keeps the pass's place).
        if resume || state.cursor.is_none() {
            state.pass.clear();
            state.incomplete = false;
        }
    }
    // A file hashed in part, when this run goes on where it stopped.
    let mut partial = match state.partial.take_if(|_| resume) {
        Some((snap, path, pr)) if names.get(first) == Some(&snap) => Some((path, pr)),
        _ => None,
    };
    let mut finished = true;
    // `current` not checked (a backup changes it, or left it unsettled):
    // the pass ends without it, but is no full pass.
    let mut passed_over = false;
    // What this run checked: per snapshot, the files after a path (or
    // from its start) up to a path (or to its end). What is found there
    // replaces what was known; what it did not reach (a snapshot passed
    // over, see `current_settled`, or the rest of one it stopped in)
    // stays known.
    let mut reached: Vec<Reached> = vec![];
    for i in first..names.len() {
        let name = &names[i];
        let mut cursor = None;
        // `current` only while no backup changes it, and only as a backup
        // left it whole: after an interrupted one, what differs from its
        // manifest is the next backup's to settle, not damage.
        let _lock = if name == "current" {
            match current_settled(host) {
                Ok(Settled::Yes(lock)) => {
                    budget.yield_to = host.wanted().ok();
                    Some(lock)
                }
                Ok(Settled::Nothing(why)) => {
                    eprintln!(
                        "byteback-server: verify: {}/current {why}; nothing to verify",
                        host.name
                    );
                    continue;
                }
                Err(why) => {
                    eprintln!(
                        "byteback-server: verify: {}/current {why}; not verified this time",
                        host.name
                    );
                    passed_over = true;
                    continue;
                }
            }
        } else {
            None
        };
        match verify_snapshot(
            host,
            name,
            after.as_deref(),
            budget,
            &mut report,
            &mut cursor,
            &mut partial,
        ) {
            // Not checked: what is known of it stays; a pass without it is
            // whole only if it is gone by now (a deletion that failed
            // leaves it).
            Ok(None) => {
                let listed = host.snapshots().map(|l| l.iter().any(|(n, _)| n == name));
                passed_over |= listed.unwrap_or(true);
            }
            Ok(Some(true)) => reached.push((name.clone(), after.clone(), None)),
            Ok(Some(false)) => {
                if let Some(to) = &cursor {
                    reached.push((name.clone(), after.clone(), Some(to.clone())));
                }
                if budget.backup_waits() {
                    report.yielded = true;
                    eprintln!(
                        "byteback-server: verify: {}/current: a backup of the host waits; \
                         stopped here ({})",
                        host.name,
                        if resume {
                            "the next run goes on from here"
                        } else {
                            "checked again by the next run"
                        }
                    );
                }
                // Only a budgeted pass keeps its place: a run without one
                // (or of one snapshot) stopped for a backup must not move
                // the place of the pass under way.
                if resume {
                    state.cursor = Some((name.clone(), cursor.or(after).unwrap_or_default()));
                    state.partial = partial.take().map(|(p, pr)| (name.clone(), p, pr));
                }
                finished = false;
                break;
            }
            Err(e) => report.errors.push(format!("{name}: {e}")),
        }
        after = None;
        if budget.spent() && i + 1 < names.len() {
            state.cursor = Some((names[i + 1].clone(), Vec::new()));
            finished = false;
            break;
        }
    }
    // The next host's check must not stop for this one's backup.
    budget.yield_to = None;
    report.finished = finished;
    // What this run found replaces what was known of the files it
    // checked (a budgeted pass going on after another run checked them,
    // one that stopped for a backup and kept no place, must not list
    // them twice either).
    merge_found(&mut state, &report, &reached, resume);
    if only.is_none() && (passed_over || !report.errors.is_empty()) {
        state.incomplete = true;
    }
    if only.is_none() && finished {
        state.cursor = None;
        state.partial = None;
        // A whole pass only when none of its runs passed anything over or
        // failed (a manifest that cannot be read): `status` shows its age.
        if !state.incomplete {
            state.last_full = Some(now);
        }
    }
    if resume {
        state.last_turn = Some(now);
    }
    state.save(host)?;
    Ok(report)
}

/// Puts what a run found (`report`, in the parts of snapshots it
/// `reached`) into the state: it replaces what was listed of those parts,
/// and the counts are updated (see [`count_damage`]; `pass`: the run is
/// one of a budgeted pass).
fn merge_found(state: &mut State, report: &HostReport, reached: &[Reached], pass: bool) {
    let found: HashSet<(&str, &[u8])> = report
        .damaged
        .iter()
        .map(|f| (f.snapshot.as_str(), f.path.as_slice()))
        .collect();
    state.damage.retain(|d| {
        let checked = reached.iter().any(|(snap, from, to)| {
            *snap == d.snapshot
                && from
                    .as_ref()
                    .is_none_or(|f| compare_paths(f, &d.path).is_lt())
                && to
                    .as_ref()
                    .is_none_or(|t| compare_paths(&d.path, t).is_le())
        });
        !checked && !found.contains(&(d.snapshot.as_str(), d.path.as_slice()))
    });
    state.damage.extend(report.damaged.iter().cloned());
    // Beyond the list, counted only.
    state.damage.truncate(MAX_DAMAGE_LISTED);
    count_damage(state, report, reached, pass);
}

/// Counts what this run found in each snapshot it checked (see
/// [`State::counts`]): a run that checked a whole snapshot sets its count;
/// the runs of a budgeted pass (`pass`) add up what they find in it, which
/// becomes its count once they reach its end, and until then raises it
/// only (which of the files they have not reached are still damaged is
/// not known yet). A count is never below what the list holds of it.
fn count_damage(state: &mut State, report: &HostReport, reached: &[Reached], pass: bool) {
    let mut found: BTreeMap<&str, u64> = BTreeMap::new();
    for d in &report.damaged {
        *found.entry(&d.snapshot).or_default() += 1;
    }
    for (s, n) in &report.unlisted {
        *found.entry(s).or_default() += n;
    }
    for (snap, from, to) in reached {
        let n = found.get(snap.as_str()).copied().unwrap_or(0);
        let so_far = match from {
            Some(_) if pass => state.pass.get(snap).copied().unwrap_or(0) + n,
            _ => n,
        };
        if to.is_none() && (from.is_none() || pass) {
            state.counts.insert(snap.clone(), so_far);
            // Another run's whole check leaves a pass under way its tally.
            if pass {
                state.pass.remove(snap);
            }
        } else {
            if pass {
                state.pass.insert(snap.clone(), so_far);
            }
            let c = state.counts.entry(snap.clone()).or_default();
            *c = (*c).max(so_far);
        }
    }
    // Found in a snapshot the run did not finish for an error (a manifest
    // that could not be read on): known damage, at least.
    for (snap, n) in found {
        if !reached.iter().any(|(s, _, _)| s == snap) {
            let c = state.counts.entry(snap.to_string()).or_default();
            *c = (*c).max(n);
        }
    }
    let mut listed: BTreeMap<&str, u64> = BTreeMap::new();
    for d in &state.damage {
        *listed.entry(&d.snapshot).or_default() += 1;
    }
    for (s, n) in listed {
        let c = state.counts.entry(s.to_string()).or_default();
        *c = (*c).max(n);
    }
    state.counts.retain(|_, n| *n > 0);
}

/// Of `names` (snapshots oldest first, then `current`), the index of the
/// first taken after snapshot `gone`, which is no longer among them.
fn next_after(names: &[String], gone: &str) -> usize {
    if crate::time::parse_name(gone).is_none() {
        return 0;
    }
    // In the order the host lists them (see `time::cmp_names`).
    names
        .iter()
        .position(|n| crate::time::cmp_names(n, gone).is_gt())
        .unwrap_or(0)
}

/// A snapshot's files a run checked: after a path (or from its start) up
/// to a path (or to its end).
type Reached = (String, Option<Vec<u8>>, Option<Vec<u8>>);

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Path for display: `/` + path escaped as every message escapes one
/// (`crate::error::shown`).
fn shown(p: &[u8]) -> String {
    format!("/{}", crate::error::shown(p))
}

fn render_json(reports: &[HostReport]) -> String {
    let hosts: Vec<String> = reports
        .iter()
        .map(|r| {
            let damaged: Vec<String> = r
                .damaged
                .iter()
                .map(|d| {
                    format!(
                        "{{\"snapshot\":{},\"path\":{},\"problem\":{}}}",
                        json_str(&d.snapshot),
                        json_str(&shown(&d.path)),
                        json_str(&d.problem)
                    )
                })
                .collect();
            let errors: Vec<String> = r.errors.iter().map(|e| json_str(e)).collect();
            format!(
                "{{\"host\":{},\"snapshots\":{},\"files\":{},\"bytes\":{},\"finished\":{},\"marked_for_resend\":{},\"damaged\":[{}],\"damaged_unlisted\":{},\"errors\":[{}]}}",
                json_str(&r.host),
                r.snapshots.len(),
                r.files,
                r.bytes,
                r.finished,
                r.marked,
                damaged.join(","),
                r.damaged_count() - r.damaged.len() as u64,
                errors.join(",")
            )
        })
        .collect();
    format!("{{\"hosts\":[{}]}}\n", hosts.join(","))
}

/// Orders hosts for a budgeted run: in turn, the host a run worked on
/// longest ago first (never: first of all); among equals a pass under way
/// first, then hosts never verified whole, then the one verified whole
/// longest ago. Else the first host listed would start a new pass every
/// day, taking the whole budget when it is large, and those after it would
/// never be reached; and a pass under way taken first every time, one that
/// never ends (a host larger than the budget, snapshotted daily) would keep
/// every other host from its turn.
fn fair_order(store: &Store, hosts: &mut [String]) {
    let key = |h: &String| match store.host(h, false) {
        Ok(host) => {
            let st = State::load(&host);
            (
                st.last_turn.unwrap_or(i64::MIN),
                st.cursor.is_none(),
                st.last_full.unwrap_or(i64::MIN),
            )
        }
        Err(_) => (i64::MAX, true, i64::MAX),
    };
    hosts.sort_by_cached_key(key);
}

fn run(args: VerifyArgs) -> Result<u8> {
    let root = crate::admin::store_root(args.store)?;
    crate::admin::become_store_owner(&root)?;
    let store = Store::open(&root)?;
    // One verify of a store at a time: two would each save their hosts'
    // state over the other's (a pass's place, damage found), and share a
    // temporary file.
    let lock = fsops::open_lock(store.fd(), VERIFY_LOCK).op("open", || {
        root.join(String::from_utf8_lossy(VERIFY_LOCK).as_ref())
            .display()
            .to_string()
    })?;
    if let Err(e) = rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        return Err(Error::Store(format!(
            "another verify of this store is running ({e}); not verifying"
        )));
    }
    let mut budget = Budget::new(args.budget, args.max_time.map(Duration::from_secs));
    let hosts = if args.host.is_empty() {
        let mut hosts = store.hosts()?;
        if budget.limited() && args.snapshot.is_none() {
            fair_order(&store, &mut hosts);
        }
        hosts
    } else {
        args.host.clone()
    };
    let now = crate::time::now();
    let mut reports = vec![];
    for h in &hosts {
        // One host's failure (its state not saved on a full disc, a
        // snapshot that cannot be listed) is reported, and the others
        // still get their turn.
        let done = store
            .host(h, false)
            .and_then(|host| verify_host(&host, args.snapshot.as_deref(), &mut budget, now));
        match done {
            Ok(r) => reports.push(r),
            Err(e) if !matches!(e, Error::Usage(_)) => reports.push(HostReport {
                host: h.clone(),
                errors: vec![e.to_string()],
                ..Default::default()
            }),
            Err(e) => return Err(e),
        }
        if budget.spent() {
            break;
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        out.write_all(render_json(&reports).as_bytes())
            .op("write", || STDOUT)?;
    } else {
        for r in &reports {
            for d in &r.damaged {
                writeln!(
                    out,
                    "DAMAGED {} {} {}: {}",
                    r.host,
                    d.snapshot,
                    shown(&d.path),
                    d.problem
                )
                .op("write", || STDOUT)?;
            }
            for (snap, n) in &r.unlisted {
                writeln!(
                    out,
                    "DAMAGED {} {snap} and {n} more files, not listed",
                    r.host
                )
                .op("write", || STDOUT)?;
            }
            for e in &r.errors {
                writeln!(out, "ERROR {} {e}", r.host).op("write", || STDOUT)?;
            }
            writeln!(
                out,
                "{}: {} files, {} bytes in {} snapshots checked, {} damaged{}{}",
                r.host,
                r.files,
                r.bytes,
                r.snapshots.len(),
                r.damaged_count(),
                if r.marked > 0 {
                    format!(", {} in current marked for the next backup", r.marked)
                } else {
                    String::new()
                },
                if r.finished {
                    ""
                } else if r.yielded {
                    " (stopped in current for a backup; the next run checks it)"
                } else {
                    " (budget used up; the next run continues)"
                }
            )
            .op("write", || STDOUT)?;
        }
    }
    out.flush().op("write", || STDOUT)?;
    let damaged = reports.iter().any(|r| r.damaged_count() > 0);
    let errors = reports.iter().any(|r| !r.errors.is_empty());
    Ok(if damaged {
        1
    } else if errors {
        3
    } else {
        0
    })
}

/// Where reports go, for messages.
const STDOUT: &str = "standard output";

/// `byteback-server verify`: 0 nothing damaged, 1 damage found, 2 usage, 3 could not check everything.
pub fn run_verify(args: VerifyArgs) -> ExitCode {
    match run(args) {
        Ok(c) => ExitCode::from(c),
        Err(e) => {
            let line = format!("byteback-server verify: {e}\n");
            byteback_protocol::term::print_lines(tracing::Level::ERROR, line.as_bytes());
            ExitCode::from(if matches!(e, Error::Usage(_)) { 2 } else { 3 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts stay true however the list's room moves: a snapshot that
    /// fills the list, another checked in two runs of a pass, then the
    /// first pruned (its share of the list goes).
    #[test]
    fn damage_counts_follow_passes_whatever_the_list_holds() {
        let damage = |snap: &str, from: usize, n: usize| -> Vec<Damage> {
            (from..from + n)
                .map(|i| Damage {
                    snapshot: snap.into(),
                    path: format!("f{i:06}").into_bytes(),
                    problem: "bad".into(),
                })
                .collect()
        };
        let run = |st: &mut State, found: Vec<Damage>, reached: Vec<Reached>| {
            let mut report = HostReport::default();
            found.into_iter().for_each(|d| report.found(d));
            merge_found(st, &report, &reached, true);
        };
        let cut = |i: usize| Some(format!("f{i:06}").into_bytes());
        let mut st = State::default();
        // Run A: R whole (10,000 damaged), S up to its 2,500th file.
        let mut a = damage("R", 0, 10_000);
        a.extend(damage("S", 0, 2_500));
        run(
            &mut st,
            a,
            vec![("R".into(), None, None), ("S".into(), None, cut(2_499))],
        );
        assert_eq!(st.damaged_count(|_| true), 12_500);
        // Run B: the rest of S (2,500 more), no room left in the list.
        run(
            &mut st,
            damage("S", 2_500, 2_500),
            vec![("S".into(), cut(2_499), None)],
        );
        assert_eq!((st.counts["R"], st.counts["S"]), (10_000, 5_000));
        assert_eq!(st.damaged_count(|_| true), 15_000);
        assert_eq!(st.damage.len(), MAX_DAMAGE_LISTED);
        // R is pruned; a new pass checks S in two runs again.
        st.damage.retain(|d| d.snapshot != "R");
        st.counts.remove("R");
        st.pass.clear();
        run(
            &mut st,
            damage("S", 0, 2_500),
            vec![("S".into(), None, cut(2_499))],
        );
        assert_eq!(st.damaged_count(|_| true), 5_000);
        run(
            &mut st,
            damage("S", 2_500, 2_500),
            vec![("S".into(), cut(2_499), None)],
        );
        assert_eq!(st.damaged_count(|_| true), 5_000);
        assert_eq!(st.damage.len(), 5_000);
        // Repaired: a pass finding nothing clears it, once it reaches the end.
        run(&mut st, vec![], vec![("S".into(), None, cut(2_499))]);
        assert_eq!(st.damaged_count(|_| true), 5_000, "not known yet");
        run(&mut st, vec![], vec![("S".into(), cut(2_499), None)]);
        assert_eq!(st.damaged_count(|_| true), 0);
    }

    /// A whole check of a snapshot outside the budgeted pass under way in
    /// it (`verify --snapshot`) leaves the pass its tally; damage found
    /// before a run failed in a snapshot counts.
    #[test]
    fn a_check_outside_the_pass_leaves_its_tally() {
        let beyond = |n: u64| HostReport {
            unlisted: [("S".to_string(), n)].into(),
            ..Default::default()
        };
        let cut = Some(b"m".to_vec());
        let mut st = State::default();
        merge_found(
            &mut st,
            &beyond(3_000),
            &[("S".into(), None, cut.clone())],
            true,
        );
        merge_found(&mut st, &beyond(5_000), &[("S".into(), None, None)], false);
        assert_eq!(st.counts["S"], 5_000);
        merge_found(&mut st, &beyond(2_000), &[("S".into(), cut, None)], true);
        assert_eq!(
            st.counts["S"], 5_000,
            "the pass's two runs found 3,000 + 2,000"
        );
        // A run that failed in T after finding some: counted.
        merge_found(&mut st, &beyond(0), &[], true);
        let failed = HostReport {
            unlisted: [("T".to_string(), 7)].into(),
            ..Default::default()
        };
        merge_found(&mut st, &failed, &[], true);
        assert_eq!(st.counts["T"], 7);
    }

    #[test]
    fn state_round_trips() {
        let st = State {
            partial: None,
            cursor: Some(("2026-11-27T03:00+0000".into(), b"a/\xff b".to_vec())),
            last_full: Some(1_800_000_000),
            last_turn: Some(1_800_000_100),
            incomplete: true,
            counts: [("2026-11-27T03:00+0000".to_string(), 7)].into(),
            pass: [("current".to_string(), 3)].into(),
            damage: vec![Damage {
                snapshot: "current".into(),
                path: b"x\ny".to_vec(),
                problem: "content does not match\nits BLAKE3".into(),
            }],
        };
        let mut st = st;
        st.partial = Some((
            "current".into(),
            b"big \xfe".to_vec(),
            Progress {
                ident: "1-2-3.4".into(),
                pieces: 3,
                stack: vec![[1; 32], [2; 32]],
            },
        ));
        let back = State::parse(&st.render());
        assert_eq!(back.partial, st.partial);
        assert_eq!(back.cursor, st.cursor);
        assert_eq!(back.last_full, st.last_full);
        assert_eq!(back.last_turn, st.last_turn);
        assert!(back.incomplete);
        assert_eq!((back.counts, back.pass), (st.counts, st.pass));
        assert_eq!(back.damage[0].path, b"x\ny");
        assert_eq!(back.damage[0].problem, "content does not match its BLAKE3");
    }

    /// Hashes `data` as a file, `piece` bytes at a time, stopping after
    /// every piece (a budget of one byte) and going on from there; the
    /// number of runs it took and the result.
    fn hash_in_runs(file: &File, size: u64, piece: u64) -> (u32, Hashed) {
        let mut from = None;
        for runs in 1.. {
            let mut budget = Budget::new(Some(1), None);
            match hash_pieces(file, size, piece, from.take(), &mut budget, true).unwrap() {
                Hashed::Stopped(p) => {
                    // What the state file keeps is all a run needs.
                    let line = format!("partial current 61 {}", p.render());
                    from = State::parse(&line).partial.map(|(_, _, p)| p);
                    assert_eq!(from.as_ref(), Some(&p));
                }
                whole => return (runs, whole),
            }
        }
        unreachable!()
    }

    #[test]
    fn pieces_hashed_over_several_runs_give_the_files_blake3() {
        let piece = 2048;
        for len in [
            0u64, 1, 1023, 1024, 2047, 2048, 2049, 4096, 4097, 6144, 6145, 16384, 16389, 26700,
            65536, 65537,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&data).unwrap();
            let want = *blake3::hash(&data).as_bytes();
            let mut budget = Budget::new(None, None);
            match hash_pieces(&f, len, piece, None, &mut budget, true).unwrap() {
                Hashed::Whole(n, h) => assert_eq!((n, h), (len, Some(want)), "{len}"),
                other => panic!("{len}: {other:?}"),
            }
            assert_eq!(budget.used, len);
            let (runs, got) = hash_in_runs(&f, len, piece);
            match got {
                Hashed::Whole(n, h) => assert_eq!((n, h), (len, Some(want)), "{len}"),
                other => panic!("{len}: {other:?}"),
            }
            assert_eq!(runs as u64, len.div_ceil(piece).max(1), "{len}");
        }
    }

    #[test]
    fn a_file_changed_between_runs_is_hashed_again_from_its_start() {
        let piece = 2048;
        let mut data = vec![3u8; 5 * 2048];
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let mut budget = Budget::new(Some(1), None);
        let Hashed::Stopped(p) = hash_pieces(&f, 10240, piece, None, &mut budget, true).unwrap()
        else {
            panic!("not stopped")
        };
        // The first piece changes after it was hashed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        data[5] = 4;
        f.write_all_at(&data[..6], 0).unwrap();
        let mut budget = Budget::new(None, None);
        let got = hash_pieces(&f, 10240, piece, Some(p), &mut budget, true).unwrap();
        let want = *blake3::hash(&data).as_bytes();
        assert!(
            matches!(got, Hashed::Whole(10240, Some(h)) if h == want),
            "{got:?}"
        );
        assert_eq!(budget.used, 10240, "read again whole");
        // A file of another length is not read at all.
        let got = hash_pieces(&f, 10241, piece, None, &mut budget, true).unwrap();
        assert!(matches!(got, Hashed::Whole(10240, None)), "{got:?}");
        // Progress that does not fit the file's pieces is not used.
        assert!(Progress::parse("x", "3", &"00".repeat(32)).is_none());
        assert!(Progress::parse("x", "0", "").is_none());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("500M"), Ok(500 << 20));
        assert_eq!(parse_bytes("7"), Ok(7));
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}

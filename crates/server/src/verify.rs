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
//! and the damage that pass found, for `status`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use byteback_delta::FileHasher;
use byteback_protocol::{compare_paths, Kind, ManifestEntry};

use crate::error::{Error, IoContext, Result};
use crate::fsops;
use crate::manifest::ManifestReader;
use crate::store::{disk_path, HostStore, Store, META_DIR, META_DIR_NAME};

/// The state file in each host directory.
pub const STATE: &[u8] = b".byteback-verify";
/// Marker in `current/.byteback`: current matches its manifest (see backup.rs).
const CLEAN: &[u8] = b"clean";
const MANIFEST: &[u8] = b"manifest";

/// `byteback-server verify` options.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Store root (default: the home directory of the server user).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Only these hosts (default: every host).
    #[arg(long)]
    pub host: Vec<String>,
    /// Only this snapshot (or `current`).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Read at most this many bytes (e.g. 500M, 20G), continuing where the last budgeted run stopped.
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
    /// Damaged files.
    pub damaged: Vec<Damage>,
    /// Damaged files in `current` marked for the next backup.
    pub marked: u64,
    /// Whether this run reached the end of the host's last snapshot.
    pub finished: bool,
    /// Problems that stopped part of the check (an unreadable manifest...).
    pub errors: Vec<String>,
}

/// The budget of one run, shared by its hosts.
pub struct Budget {
    bytes: Option<u64>,
    until: Option<Instant>,
    used: u64,
}

impl Budget {
    /// A budget of `bytes` and `time`, either unlimited when `None`.
    pub fn new(bytes: Option<u64>, time: Option<Duration>) -> Self {
        Budget {
            bytes,
            until: time.map(|t| Instant::now() + t),
            used: 0,
        }
    }

    fn spent(&self) -> bool {
        self.bytes.is_some_and(|b| self.used >= b)
            || self.until.is_some_and(|u| Instant::now() >= u)
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
    /// Damage found since the last whole pass began.
    pub damage: Vec<Damage>,
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

/// Reads `file` to the end, hashing it and counting against the budget.
fn hash_file(mut file: File, budget: &mut Budget) -> std::io::Result<(u64, [u8; 32])> {
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = file.read(&mut buf)?;
        if got == 0 {
            return Ok((n, h.finish()));
        }
        h.update(&buf[..got]);
        n += got as u64;
        budget.used += got as u64;
    }
}

/// Checks one file of a snapshot; `Some(problem)` when it is damaged.
fn check_file(
    snap: impl AsFd,
    e: &ManifestEntry,
    size: u64,
    budget: &mut Budget,
) -> Option<String> {
    let file = match fsops::open_file(&snap, &disk_path(&e.entry.path)) {
        Ok(f) => f,
        Err(err) => return Some(format!("cannot open: {err}")),
    };
    match hash_file(file, budget) {
        Err(err) => Some(format!("cannot read: {err}")),
        Ok((n, _)) if n != size => Some(format!("{n} bytes stored, {size} in the manifest")),
        Ok((_, h)) if h != e.hash => Some("content does not match its BLAKE3".into()),
        Ok(_) => None,
    }
}

/// Sets a damaged file of `current` to mtime 0 so the next backup rebuilds
/// it; synced, so a power cut cannot lose the mark while the manifest
/// still vouches for the damaged copy (which the next backup, finding
/// `current` unclean, would keep by its size and mtime).
fn mark_for_resend(current: impl AsFd, path: &[u8]) -> Result<()> {
    let f = fsops::open_file(&current, &disk_path(path)).op("open", || shown(path))?;
    fsops::set_mtime(&f, 0, 0).op("set the mtime of", || shown(path))?;
    fsops::fsync(&f).op("sync", || shown(path))?;
    Ok(())
}

/// Verifies one snapshot from `after` on; false when the budget ran out first
/// (then `cursor` holds the last path checked).
fn verify_snapshot(
    host: &HostStore,
    name: &str,
    after: Option<&[u8]>,
    budget: &mut Budget,
    report: &mut HostReport,
    cursor: &mut Option<Vec<u8>>,
) -> Result<bool> {
    let snap = host.open_snapshot(name)?;
    let snap_path = host.path.join(name);
    if crate::legacy::is_legacy(&snap).op("look at", || snap_path.display().to_string())? {
        eprintln!(
            "byteback-server: verify: {}/{name} is a byteback 1.x snapshot, which keeps no checksums: not verified",
            host.name
        );
        return Ok(true);
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
            finished = false;
            break;
        }
        let Kind::File { size } = e.entry.kind else {
            continue;
        };
        let before = budget.used;
        if let Some(problem) = check_file(&snap, &e, size, budget) {
            if name == "current" {
                damaged_current.push(e.entry.path.clone());
            }
            report.damaged.push(Damage {
                snapshot: name.to_string(),
                path: e.entry.path.clone(),
                problem,
            });
        }
        report.files += 1;
        report.bytes += budget.used - before;
        *cursor = Some(e.entry.path.clone());
    }
    if !damaged_current.is_empty() {
        report.marked += mark_current(host, &snap, &damaged_current, report)?;
    }
    Ok(finished)
}

/// The host's lock, held while `current` is verified, when no backup
/// holds it and `current` has its clean marker; else why not.
fn current_settled(host: &HostStore) -> std::result::Result<std::fs::File, String> {
    let lock = host
        .lock()
        .map_err(|_| "is being written by a backup".to_string())?;
    let current = host.current().map_err(|e| e.to_string())?;
    let clean = fsops::open_dir(&current, META_DIR).and_then(|meta| {
        Ok(rustix::fs::statat(
            &meta,
            os(CLEAN),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?)
    });
    match clean {
        Ok(_) => Ok(lock),
        Err(_) => Err("was left by an interrupted backup (no clean marker)".into()),
    }
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
    let mut state = State::load(host);
    // Where this run starts: after the cursor of a budgeted pass under way.
    let (first, mut after) = match (&state.cursor, resume) {
        (Some((snap, path)), true) => match names.iter().position(|n| n == snap) {
            Some(i) => (i, (!path.is_empty()).then(|| path.clone())),
            None => (0, None), // pruned since: start a new pass
        },
        _ => (0, None),
    };
    if first == 0 && after.is_none() && only.is_none() {
        // A new pass begins: damage of snapshots pruned since goes; the
        // rest stays listed until its snapshot is checked again.
        state.damage.retain(|d| names.contains(&d.snapshot));
    }
    let mut finished = true;
    // A snapshot passed over (see `current_settled`): what is known of its
    // damage stays.
    let mut unchecked: Option<String> = None;
    for i in first..names.len() {
        let name = &names[i];
        let mut cursor = None;
        // `current` only while no backup changes it, and only as a backup
        // left it whole: after an interrupted one, what differs from its
        // manifest is the next backup's to settle, not damage.
        let _lock = if name == "current" {
            match current_settled(host) {
                Ok(lock) => Some(lock),
                Err(why) => {
                    eprintln!(
                        "byteback-server: verify: {}/current {why}; not verified this time",
                        host.name
                    );
                    unchecked = Some(name.clone());
                    continue;
                }
            }
        } else {
            None
        };
        if after.is_none() && only.is_none() {
            // Checked again from its start: what is found replaces it.
            state.damage.retain(|d| d.snapshot != *name);
        }
        match verify_snapshot(
            host,
            name,
            after.as_deref(),
            budget,
            &mut report,
            &mut cursor,
        ) {
            Ok(true) => {}
            Ok(false) => {
                state.cursor = Some((name.clone(), cursor.or(after).unwrap_or_default()));
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
    report.finished = finished;
    if let Some(snap) = only {
        // A check of one snapshot replaces what is known of its damage.
        if unchecked.as_deref() != Some(snap) {
            state.damage.retain(|d| d.snapshot != snap);
        }
        state.damage.extend(report.damaged.iter().cloned());
    } else {
        state.damage.extend(report.damaged.iter().cloned());
        if finished {
            state.cursor = None;
            state.last_full = Some(now);
        }
    }
    state.save(host)?;
    Ok(report)
}

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

/// Path for display: `/` + path with control characters and invalid UTF-8 escaped.
fn shown(p: &[u8]) -> String {
    format!("/{}", p.escape_ascii())
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
                "{{\"host\":{},\"snapshots\":{},\"files\":{},\"bytes\":{},\"finished\":{},\"marked_for_resend\":{},\"damaged\":[{}],\"errors\":[{}]}}",
                json_str(&r.host),
                r.snapshots.len(),
                r.files,
                r.bytes,
                r.finished,
                r.marked,
                damaged.join(","),
                errors.join(",")
            )
        })
        .collect();
    format!("{{\"hosts\":[{}]}}\n", hosts.join(","))
}

/// Orders hosts for a budgeted run: a pass under way first, then hosts
/// never verified whole, then the one verified whole longest ago. Else the
/// first host listed would start a new pass every day, taking the whole
/// budget when it is large, and those after it would never be reached.
fn fair_order(store: &Store, hosts: &mut [String]) {
    let key = |h: &String| match store.host(h, false) {
        Ok(host) => {
            let st = State::load(&host);
            (st.cursor.is_none(), st.last_full.unwrap_or(i64::MIN))
        }
        Err(_) => (true, i64::MAX),
    };
    hosts.sort_by_cached_key(key);
}

fn run(args: VerifyArgs) -> Result<u8> {
    let root = crate::admin::store_root(args.store)?;
    let store = Store::open(&root)?;
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
        let host = store.host(h, false)?;
        reports.push(verify_host(
            &host,
            args.snapshot.as_deref(),
            &mut budget,
            now,
        )?);
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
                r.damaged.len(),
                if r.marked > 0 {
                    format!(", {} in current marked for the next backup", r.marked)
                } else {
                    String::new()
                },
                if r.finished {
                    ""
                } else {
                    " (budget used up; the next run continues)"
                }
            )
            .op("write", || STDOUT)?;
        }
    }
    out.flush().op("write", || STDOUT)?;
    let damaged = reports.iter().any(|r| !r.damaged.is_empty());
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
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let st = State {
            cursor: Some(("2026-11-27T03:00+0000".into(), b"a/\xff b".to_vec())),
            last_full: Some(1_800_000_000),
            damage: vec![Damage {
                snapshot: "current".into(),
                path: b"x\ny".to_vec(),
                problem: "content does not match\nits BLAKE3".into(),
            }],
        };
        let back = State::parse(&st.render());
        assert_eq!(back.cursor, st.cursor);
        assert_eq!(back.last_full, st.last_full);
        assert_eq!(back.damage[0].path, b"x\ny");
        assert_eq!(back.damage[0].problem, "content does not match its BLAKE3");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("500M"), Ok(500 << 20));
        assert_eq!(parse_bytes("7"), Ok(7));
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}

//! Listing and restoring backed-up files, as byteback 1.x's `byteback-restore`.
//!
//! Patterns are made absolute against the current directory, then globbed
//! (`*`, `**`, `?`, `[set]`, `{a,b}`, `\` escapes) against backed-up paths; a
//! pattern matching a directory takes everything beneath it. Restores land in
//! `./<snapshot>/<absolute path>` and never write through a symlink.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use byteback_delta::FileHasher;
use byteback_protocol::{ClientMsg, Kind, ManifestEntry, ServerMsg};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::conn::Connection;
use crate::meta;

/// Compiled restore patterns.
pub struct Patterns {
    set: GlobSet,
}

impl Patterns {
    /// Makes each pattern absolute (against `cwd`) and compiles it.
    pub fn new(patterns: &[String], cwd: &Path) -> Result<Self> {
        if patterns.is_empty() {
            bail!("give at least one pattern (e.g. / for everything)");
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            let abs = if p.starts_with('/') {
                p.clone()
            } else {
                let c = cwd
                    .to_str()
                    .ok_or_else(|| anyhow!("current directory is not UTF-8"))?;
                format!("{}/{}", c.trim_end_matches('/'), p)
            };
            let rel = abs.trim_start_matches('/').trim_end_matches('/');
            if rel.split('/').any(|c| c == "..") {
                bail!("pattern {p:?} contains '..'");
            }
            let rel = if rel.is_empty() { "**" } else { rel };
            b.add(
                GlobBuilder::new(rel)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .with_context(|| format!("bad pattern {p:?}"))?,
            );
        }
        Ok(Patterns { set: b.build()? })
    }

    fn matches(&self, path: &[u8]) -> bool {
        self.set.is_match(Path::new(OsStr::from_bytes(path)))
    }
}

/// Selects manifest entries matching the patterns, with everything under a matching directory.
struct Selector<'a> {
    pats: &'a Patterns,
    matched_dir: Option<Vec<u8>>,
}

impl Selector<'_> {
    fn select(&mut self, e: &ManifestEntry) -> bool {
        let p = &e.entry.path;
        if let Some(d) = &self.matched_dir {
            if p.len() > d.len() && p.starts_with(d) && p[d.len()] == b'/' {
                return true;
            }
            self.matched_dir = None;
        }
        if self.pats.matches(p) {
            if e.entry.kind == Kind::Dir {
                self.matched_dir = Some(p.clone());
            }
            return true;
        }
        false
    }
}

fn snapshots(conn: &mut Connection) -> Result<Vec<String>> {
    conn.send(&ClientMsg::ListSnapshots)?;
    match conn.recv()? {
        ServerMsg::Snapshots(s) => Ok(s),
        m => bail!("unexpected {}", m.name()),
    }
}

fn read_manifest(
    conn: &mut Connection,
    snapshot: &str,
    mut each: impl FnMut(ManifestEntry) -> Result<()>,
) -> Result<()> {
    conn.send(&ClientMsg::ReadManifest {
        snapshot: snapshot.to_string(),
    })?;
    loop {
        match conn.recv()? {
            ServerMsg::ManifestPart(p) => p.into_iter().try_for_each(&mut each)?,
            ServerMsg::ManifestEnd => return Ok(()),
            m => bail!("unexpected {}", m.name()),
        }
    }
}

fn pick_snapshots(conn: &mut Connection, snapshot: Option<&str>) -> Result<Vec<String>> {
    let all = snapshots(conn)?;
    match snapshot {
        Some(s) => {
            if !all.iter().any(|x| x == s) && s != "current" {
                bail!("no snapshot {s:?}; there are {}", all.len());
            }
            Ok(vec![s.to_string()])
        }
        None => Ok(all),
    }
}

/// `ls -l` style mode string.
pub fn mode_string(e: &ManifestEntry) -> String {
    let m = e.entry.mode;
    let mut s = String::with_capacity(10);
    s.push(e.entry.kind.type_char());
    let bit = |b: u32, c: char| if m & b != 0 { c } else { '-' };
    let exec = |x: u32, special: u32, on: char, off: char| match (m & x != 0, m & special != 0) {
        (true, true) => on,
        (false, true) => off,
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(exec(0o100, 0o4000, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(exec(0o010, 0o2000, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(exec(0o001, 0o1000, 't', 'T'));
    s
}

/// A path for display: `/` + path, with control characters and invalid UTF-8 escaped.
pub fn display_path(p: &[u8]) -> String {
    let mut out = String::from("/");
    for chunk in p.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn format_time(sec: i64) -> String {
    let t = sec as libc::time_t;
    // SAFETY: tm is plain data filled by localtime_r.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return sec.to_string();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn version_key(e: &ManifestEntry) -> (u64, i64, u32, [u8; 32], u32, u32, u32, String) {
    (
        e.entry.size(),
        e.entry.mtime_sec,
        e.entry.mtime_nsec,
        e.hash,
        e.entry.mode,
        e.entry.uid,
        e.entry.gid,
        format!("{:?}", e.entry.kind),
    )
}

/// Prints the listing: latest version per path, every distinct version with
/// `all`, every copy in every snapshot with `verbose`.
pub fn list(
    conn: &mut Connection,
    pats: &Patterns,
    snapshot: Option<&str>,
    all: bool,
    verbose: bool,
    out: &mut dyn Write,
) -> Result<usize> {
    let snaps = pick_snapshots(conn, snapshot)?;
    // path -> versions seen, as (key, snapshot, entry); newest snapshot first.
    let mut rows: HashMap<Vec<u8>, Vec<(String, ManifestEntry)>> = HashMap::new();
    for s in snaps.iter().rev() {
        let mut sel = Selector {
            pats,
            matched_dir: None,
        };
        read_manifest(conn, s, |e| {
            if sel.select(&e) {
                let v = rows.entry(e.entry.path.clone()).or_default();
                if verbose
                    || (all && !v.iter().any(|(_, x)| version_key(x) == version_key(&e)))
                    || v.is_empty()
                {
                    v.push((s.clone(), e));
                } else if all {
                    // Same version seen in a newer snapshot: report the oldest snapshot holding it.
                    if let Some(slot) = v
                        .iter_mut()
                        .find(|(_, x)| version_key(x) == version_key(&e))
                    {
                        slot.0 = s.clone();
                    }
                }
            }
            Ok(())
        })?;
    }
    let mut paths: Vec<&Vec<u8>> = rows.keys().collect();
    paths.sort_by(|a, b| byteback_protocol::compare_paths(a, b));
    let heading = format!(
        "{:<25} {:<10} {:>12} {:>6} {:>6} {:<19} path",
        "snapshot", "mode", "size", "uid", "gid", "mtime"
    );
    writeln!(out, "{heading}")?;
    writeln!(out, "{}", "-".repeat(heading.len()))?;
    let mut n = 0;
    for p in paths {
        let mut v = rows[p].clone();
        v.reverse(); // oldest first
        for (s, e) in v {
            let mut line = format!(
                "{:<25} {:<10} {:>12} {:>6} {:>6} {:<19} {}",
                s,
                mode_string(&e),
                e.entry.size(),
                e.entry.uid,
                e.entry.gid,
                format_time(e.entry.mtime_sec),
                display_path(&e.entry.path)
            );
            match &e.entry.kind {
                Kind::Symlink { target } => {
                    line.push_str(&format!(" -> {}", display_path(target).split_at(1).1))
                }
                Kind::HardLink { target } => {
                    line.push_str(&format!(" => {}", display_path(target)))
                }
                _ => {}
            }
            writeln!(out, "{line}")?;
            n += 1;
        }
    }
    Ok(n)
}

/// Outcome of a restore.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Snapshot restored from.
    pub snapshot: String,
    /// Entries restored.
    pub restored: u64,
    /// Problems that did not stop the restore.
    pub warnings: Vec<String>,
}

/// Restores matching entries of one snapshot (the newest by default) into `<into>/<snapshot>/`.
pub fn restore(
    conn: &mut Connection,
    pats: &Patterns,
    snapshot: Option<&str>,
    into: &Path,
    verbose: bool,
) -> Result<RestoreReport> {
    let snaps = pick_snapshots(conn, snapshot)?;
    let snap = snaps
        .last()
        .ok_or_else(|| anyhow!("host {} has no snapshots yet", conn.host))?
        .clone();
    let mut selected = vec![];
    let mut sel = Selector {
        pats,
        matched_dir: None,
    };
    read_manifest(conn, &snap, |e| {
        if sel.select(&e) {
            selected.push(e);
        }
        Ok(())
    })?;
    if selected.is_empty() {
        bail!("nothing in snapshot {snap} matches");
    }
    let root = into.join(&snap);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let as_root = meta::is_root();
    let mut report = RestoreReport {
        snapshot: snap.clone(),
        ..Default::default()
    };
    let mut restored: HashSet<Vec<u8>> = HashSet::new();
    let mut dirs = vec![];
    for e in &selected {
        let abs = root.join(OsStr::from_bytes(&e.entry.path));
        ensure_parents(&root, &e.entry.path)?;
        if verbose {
            eprintln!("{}", display_path(&e.entry.path));
        }
        match &e.entry.kind {
            Kind::Dir => {
                match std::fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        std::fs::remove_file(&abs)?;
                        std::fs::create_dir(&abs)?;
                    }
                    Err(_) => std::fs::create_dir(&abs)?,
                }
                dirs.push(e);
                restored.insert(e.entry.path.clone());
                report.restored += 1;
                continue;
            }
            Kind::File { .. } => {
                remove_existing(&abs)?;
                fetch_file(conn, &snap, &e.entry.path, &e.hash, &abs)?;
            }
            Kind::HardLink { target } => {
                remove_existing(&abs)?;
                if restored.contains(target) {
                    std::fs::hard_link(root.join(OsStr::from_bytes(target)), &abs)?;
                } else {
                    // The first name was not selected: fetch its content here.
                    let hash = find_hash(&selected, target);
                    fetch_file(conn, &snap, target, &hash, &abs)?;
                }
            }
            _ => {
                remove_existing(&abs)?;
                if !meta::create_special(&abs, &e.entry, as_root)? {
                    report.warnings.push(format!(
                        "{}: device not recreated (not root)",
                        display_path(&e.entry.path)
                    ));
                    continue;
                }
            }
        }
        for w in meta::apply_metadata(&abs, &e.entry, as_root)? {
            report
                .warnings
                .push(format!("{}: {w}", display_path(&e.entry.path)));
        }
        restored.insert(e.entry.path.clone());
        report.restored += 1;
    }
    // Directory metadata last, deepest first, so their mtimes survive the filling.
    for e in dirs.iter().rev() {
        let abs = root.join(OsStr::from_bytes(&e.entry.path));
        for w in meta::apply_metadata(&abs, &e.entry, as_root)? {
            report
                .warnings
                .push(format!("{}: {w}", display_path(&e.entry.path)));
        }
    }
    Ok(report)
}

fn find_hash(selected: &[ManifestEntry], path: &[u8]) -> [u8; 32] {
    selected
        .iter()
        .find(|e| e.entry.path == path)
        .map(|e| e.hash)
        .unwrap_or([0; 32])
}

fn remove_existing(abs: &Path) -> Result<()> {
    match std::fs::symlink_metadata(abs) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(abs)?,
        Ok(_) => std::fs::remove_file(abs)?,
        Err(_) => {}
    }
    Ok(())
}

/// Creates missing parents of `rel` under `root`, refusing to pass through a symlink.
fn ensure_parents(root: &Path, rel: &[u8]) -> Result<()> {
    let mut cur = root.to_path_buf();
    let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(OsStr::from_bytes(c));
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "refusing to restore through non-directory {}",
                cur.display()
            ),
            Err(_) => std::fs::create_dir(&cur)
                .with_context(|| format!("cannot create {}", cur.display()))?,
        }
    }
    Ok(())
}

/// Streams one file's content from the server into `abs`, keeping holes, and checks its BLAKE3.
fn fetch_file(
    conn: &mut Connection,
    snap: &str,
    path: &[u8],
    hash: &[u8; 32],
    abs: &PathBuf,
) -> Result<()> {
    conn.send(&ClientMsg::ReadFile {
        snapshot: snap.to_string(),
        path: path.to_vec(),
    })?;
    let f = File::create(abs).with_context(|| format!("cannot create {}", abs.display()))?;
    let mut w = meta::SparseWriter::new(f);
    let mut h = FileHasher::new();
    loop {
        match conn.recv()? {
            ServerMsg::FilePart(c) => {
                let data = c.decompress()?;
                h.update(&data);
                w.write_all(&data)?;
            }
            ServerMsg::FileDone => break,
            m => bail!("unexpected {}", m.name()),
        }
    }
    w.finish()?;
    if &h.finish() != hash {
        bail!(
            "{}: restored content does not match its BLAKE3 in the manifest",
            display_path(path)
        );
    }
    Ok(())
}

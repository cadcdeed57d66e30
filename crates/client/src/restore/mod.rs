//! Listing and restoring backed-up files, as byteback 1.x's `byteback-restore`.
//!
//! Patterns are made absolute against the current directory, then globbed
//! (`*`, `**`, `?`, `[set]`, `{a,b}`, `\` escapes) against backed-up paths; a
//! pattern matching a directory takes everything beneath it. A restore takes
//! each path from the newest snapshot holding it (every distinct version with
//! `--all`, or one snapshot with `--snapshot`) into
//! `<target>/<snapshot>/<absolute path>` (`./` by default), and never writes
//! through a symlink.
//!
//! The server is not trusted: [`check`] validates everything it sends, and
//! [`tree`] writes only beneath held directory fds. A restore holds at most
//! [`CHUNK_ENTRIES`] selected entries (or [`CHUNK_BYTES`] of them) at a time:
//! a larger selection is restored in several passes over the manifest, each
//! taking the next entries after the last one restored. Across snapshots it
//! remembers 16 bytes per selected path (at most [`CLAIM_KEYS`]), never the
//! paths of every snapshot.

pub mod check;
mod data;
pub mod interrupt;
mod remove;
pub mod tree;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{bail, err, Error, Result};
use byteback_protocol::{
    ClientMsg, CurrentNews, Entry, Kind, ManifestEntry, ServerMsg, SnapshotKind,
};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::apply::ApplyRules;
use crate::conn::Connection;
use crate::meta;

/// An absolute pattern without its leading `/`, its empty and `.`
/// components dropped and each `..` taking the component before it away
/// (at the root, nothing), as 1.x's `File.expand_path` did: `/etc/.`,
/// `/etc//ssh/..` and `/etc/` are `etc`.
fn normalise(abs: &str) -> String {
    let mut parts: Vec<&str> = vec![];
    for c in abs.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// `patterns`, each made absolute against `cwd`, as UTF-8 text: a byte
/// of a file name that is not UTF-8 cannot be written in a glob, so each
/// becomes `?` (which matches any one byte there), with a note on stderr.
/// The selection can then be a little wider than asked, never narrower:
/// such a byte inside `[...]` or after `\`, where `?` would be a literal,
/// is a usage error.
pub fn utf8_patterns(patterns: &[std::ffi::OsString], cwd: &Path) -> Result<Vec<String>> {
    let mut out = vec![];
    for p in patterns {
        let p = p.as_bytes();
        let abs = if p.starts_with(b"/") {
            p.to_vec()
        } else {
            let c = cwd.as_os_str().as_bytes();
            let c = c.strip_suffix(b"/").unwrap_or(c);
            [c, b"/", p].concat()
        };
        if std::str::from_utf8(&abs).is_ok() {
            out.push(String::from_utf8_lossy(&abs).into_owned());
            continue;
        }
        let (mut text, mut escaped, mut class) = (String::new(), false, None::<usize>);
        for chunk in abs.utf8_chunks() {
            for ch in chunk.valid().chars() {
                text.push(ch);
                // `class`: the characters of an open `[...]` so far; `]`
                // first (after `[` or `[!`) is one of them.
                match ch {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '[' if class.is_none() => {
                        class = Some(0);
                        continue;
                    }
                    ']' if class.is_some_and(|n| n > 0) => {
                        class = None;
                        continue;
                    }
                    '!' if class == Some(0) => continue,
                    _ => {}
                }
                if let Some(n) = class.as_mut() {
                    *n += 1;
                }
            }
            if !chunk.invalid().is_empty() {
                if escaped || class.is_some() {
                    return Err(Error::Usage(format!(
                        "pattern {}: a byte that is not UTF-8 after \\ or inside [...] cannot \
                         be matched; write ? for it",
                        abs.escape_ascii()
                    )));
                }
                text.push_str(&"?".repeat(chunk.invalid().len()));
            }
        }
        eprintln!(
            "byteback-restore: note: {} is not UTF-8; its other bytes match as `?` (any one \
             byte): {text}",
            abs.escape_ascii()
        );
        out.push(text);
    }
    Ok(out)
}

/// Compiled restore patterns.
pub struct Patterns {
    set: GlobSet,
    /// Each pattern's leading components without glob characters
    /// (normalised): what it can match lies at or below them.
    literal: Vec<Vec<u8>>,
    /// The patterns as given, for [`Patterns::unmatched`].
    given: Vec<String>,
    /// Which of them matched a path so far.
    hit: std::cell::RefCell<Vec<bool>>,
}

impl Patterns {
    /// Makes each pattern absolute (against `cwd`) and compiles it.
    pub fn new(patterns: &[String], cwd: impl AsRef<Path>) -> Result<Self> {
        let cwd = cwd.as_ref();
        if patterns.is_empty() {
            return Err(Error::Usage(
                "give at least one pattern (e.g. / for everything)".into(),
            ));
        }
        let mut b = GlobSetBuilder::new();
        let mut literal = vec![];
        for p in patterns {
            let abs = if p.starts_with('/') {
                p.clone()
            } else {
                let c = cwd
                    .to_str()
                    .ok_or_else(|| err!("current directory is not UTF-8"))?;
                format!("{}/{}", c.trim_end_matches('/'), p)
            };
            let rel = normalise(&abs);
            let rel = if rel.is_empty() { "**" } else { &rel };
            let fixed: Vec<&str> = rel
                .split('/')
                .take_while(|c| !c.contains(['*', '?', '[', '{', '\\']))
                .collect();
            literal.push(fixed.join("/").into_bytes());
            b.add(
                GlobBuilder::new(rel)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| Error::Usage(format!("bad pattern {p:?}: {e}")))?,
            );
        }
        Ok(Patterns {
            set: b.build()?,
            literal,
            given: patterns.to_vec(),
            hit: std::cell::RefCell::new(vec![false; patterns.len()]),
        })
    }

    /// Notes which patterns `path` (which matched) matches.
    fn note_hit(&self, path: &[u8]) {
        let mut hit = self.hit.borrow_mut();
        if hit.iter().all(|h| *h) {
            return;
        }
        for i in self.set.matches(Path::new(OsStr::from_bytes(path))) {
            if let Some(h) = hit.get_mut(i) {
                *h = true;
            }
        }
    }

    /// The patterns that matched no path in what was read (a typo in
    /// one of several patterns is said, not silently restored around).
    pub fn unmatched(&self) -> Vec<&str> {
        let hit = self.hit.borrow();
        self.given
            .iter()
            .zip(hit.iter())
            .filter(|(_, h)| !**h)
            .map(|(p, _)| p.as_str())
            .collect()
    }

    fn matches(&self, path: &[u8]) -> bool {
        self.set.is_match(Path::new(OsStr::from_bytes(path)))
    }

    /// Whether an entry left out at `path` (with everything below it) is
    /// one the patterns ask for: it is selected, or a pattern names
    /// something below it.
    fn reaches(&self, path: &[u8]) -> bool {
        self.selects(path) || self.literal.iter().any(|l| check::is_ancestor(path, l))
    }

    /// Whether `path` is selected: it or one of its ancestors (directories, in
    /// a checked manifest) matches.
    fn selects(&self, path: &[u8]) -> bool {
        self.matches(path)
            || path
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'/' && self.matches(&path[..i]))
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
            self.pats.note_hit(p);
            if e.entry.kind == Kind::Dir {
                self.matched_dir = Some(p.clone());
            }
            return true;
        }
        false
    }
}

/// The host's snapshots with their kinds, oldest first, and the kind of `current`.
pub fn snapshots(conn: &mut Connection) -> Result<Listing> {
    conn.send(&ClientMsg::ListSnapshotKinds)?;
    match conn.recv()? {
        ServerMsg::SnapshotKinds {
            snapshots,
            current,
            current_news,
        } => {
            let names: Vec<String> = snapshots.iter().map(|(n, _)| n.clone()).collect();
            check::check_snapshots(&names)?;
            Ok(Listing {
                snaps: snapshots
                    .into_iter()
                    .map(|(name, kind)| Snap { name, kind })
                    .collect(),
                current,
                news: match current {
                    Some(SnapshotKind::Byteback) => current_news,
                    _ => CurrentNews::No,
                },
            })
        }
        m => bail!("unexpected {} from the server", m.name()),
    }
}

/// The host's snapshots as the server lists them.
pub struct Listing {
    /// Oldest first.
    pub snaps: Vec<Snap>,
    /// The kind of `current`, if there is one.
    pub current: Option<SnapshotKind>,
    /// Whether `current` holds a backup no snapshot has.
    pub news: CurrentNews,
}

impl Listing {
    /// `current` as a snapshot to read along with the others: when it holds
    /// a committed backup no snapshot has, and nothing changed it since, as
    /// byteback 1.x read it. A note says so, or a warning why it is left out.
    fn current_too(&self) -> Option<Snap> {
        let newest = self.snaps.last().map_or_else(
            || "there is no snapshot".to_string(),
            |s| format!("the newest snapshot is {}", s.name),
        );
        match self.news {
            CurrentNews::No => None,
            CurrentNews::Newer(t) => {
                eprintln!(
                    "byteback-restore: note: current holds a backup committed at {} that no snapshot has ({newest}; a backup within the minimum interval between snapshots makes none): it is read as snapshot \"current\"",
                    format_time(t)
                );
                Some(Snap {
                    name: "current".into(),
                    kind: SnapshotKind::Byteback,
                })
            }
            CurrentNews::NewerBusy(t) => {
                eprintln!(
                    "byteback-restore: warning: current holds a backup committed at {} that no snapshot has ({newest}), but a backup is running or was cut off since (current is changing, or not known to match that backup): current is left out; --snapshot current reads it once no backup runs, and its files changed since fail verification",
                    format_time(t)
                );
                None
            }
        }
    }
}

/// A snapshot and what wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    /// Its name.
    pub name: String,
    /// byteback's own, or 1.x's (no stored hashes).
    pub kind: SnapshotKind,
}

/// Prints the host's snapshots, oldest first, each with its kind.
pub fn list_snapshots(conn: &mut Connection, out: &mut dyn Write) -> Result<usize> {
    let listing = snapshots(conn)?;
    let snaps = listing.snaps;
    if snaps.is_empty() && listing.news == CurrentNews::No {
        bail!(
            "host {} has no snapshots here (is the host name right? see --hostname)",
            conn.host
        );
    }
    let heading = format!("{:<25} kind", "snapshot");
    writeln!(out, "{heading}")?;
    writeln!(out, "{}", "-".repeat(heading.len() + 4))?;
    for s in &snaps {
        writeln!(out, "{:<25} {}", s.name, s.kind.label())?;
    }
    let n = snaps.len();
    match listing.news {
        CurrentNews::No => Ok(n),
        CurrentNews::Newer(t) | CurrentNews::NewerBusy(t) => {
            let busy = if matches!(listing.news, CurrentNews::NewerBusy(_)) {
                "; a backup is running or was cut off since"
            } else {
                ""
            };
            writeln!(
                out,
                "{:<25} byteback (committed {}, in no snapshot{busy})",
                "current",
                format_time(t)
            )?;
            Ok(n + 1)
        }
    }
}

/// A warning on `path` of `snapshot` from the server's note on it (see
/// [`ServerMsg::ManifestNote`]), its text escaped.
fn note_text(snapshot: &str, path: &[u8], message: &str) -> String {
    format!(
        "{}: {} (snapshot {})",
        display_path(path),
        byteback_protocol::escape_text(message),
        byteback_protocol::escape_text(snapshot)
    )
}

/// Reads one snapshot's manifest, every entry checked (see [`check`]) before `each` sees it,
/// with the server's note on it if there is one (the entry came with less than was stored);
/// `skipped` gets each path the server left out (with everything below it) and why.
/// Only a 1.x snapshot's manifest (`legacy`), derived from its tree, has notes: one in
/// a byteback snapshot's is refused.
fn read_manifest(
    conn: &mut Connection,
    snapshot: &str,
    legacy: bool,
    mut each: impl FnMut(ManifestEntry, Option<String>) -> Result<()>,
    mut skipped: impl FnMut(Vec<u8>, String) -> Result<()>,
) -> Result<()> {
    conn.send(&ClientMsg::ReadManifest {
        snapshot: snapshot.to_string(),
    })?;
    let mut checker = check::ManifestCheck::default();
    // A note on the entry that must come next.
    let mut pending: Option<(Vec<u8>, String)> = None;
    let unfollowed = |p: &[u8]| {
        err!(
            "the server's note on {} is not followed by its entry",
            display_path(p)
        )
    };
    loop {
        match conn.recv()? {
            ServerMsg::ManifestPart(p) => {
                for e in p {
                    checker.check(&e)?;
                    let note = match pending.take() {
                        Some((p, m)) if p == e.entry.path => Some(m),
                        Some((p, _)) => return Err(unfollowed(&p)),
                        None => None,
                    };
                    each(e, note)?;
                }
            }
            ServerMsg::ManifestNote {
                path,
                skipped: left_out,
                message,
            } => {
                if !legacy {
                    bail!(
                        "the server sent a note on {} in snapshot {}, a byteback snapshot, whose \
                         manifest never has one; refusing",
                        display_path(&path),
                        byteback_protocol::escape_text(snapshot)
                    );
                }
                if let Some((p, _)) = &pending {
                    return Err(unfollowed(p));
                }
                if left_out {
                    skipped(path, message)?;
                } else {
                    pending = Some((path, message));
                }
            }
            ServerMsg::ManifestEnd => {
                if let Some((p, _)) = &pending {
                    return Err(unfollowed(p));
                }
                return Ok(());
            }
            m => bail!("unexpected {} from the server", m.name()),
        }
    }
}

/// Whether `--snapshot` is a glob (`*`, `?`, `[...]`) rather than a name.
pub fn is_snapshot_glob(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// Checks a `--snapshot` glob before anything is sent: only the bytes of
/// snapshot names (`[A-Za-z0-9:+._-]`) and `* ? [ ] ! ^`, a well-formed
/// class, at most 255 bytes. The glob never goes to the server: the client
/// matches it against the (checked) list the server sends, then asks for
/// each matching snapshot by name, which the server validates as always.
pub fn snapshot_glob(s: &str) -> Result<crate::filter::Glob> {
    if s.is_empty() || s.len() > 255 {
        bail!("a snapshot glob is 1 to 255 bytes");
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ":+._-*?[]!^".contains(*c)))
    {
        bail!("{c:?} cannot appear in a snapshot name or glob");
    }
    crate::filter::Glob::new(s.as_bytes()).map_err(|e| err!("{e}"))
}

/// The snapshots `--snapshot` selects, oldest first: all of them, the one
/// named (or `current`), or every one a glob matches.
fn pick_snapshots(conn: &mut Connection, snapshot: Option<&str>) -> Result<Vec<Snap>> {
    let listing = snapshots(conn)?;
    let current = listing.current;
    let with_current = |mut all: Vec<Snap>| {
        all.extend(listing.current_too());
        all
    };
    let all = listing.snaps.clone();
    match snapshot {
        Some("current") => match current {
            Some(kind) => Ok(vec![Snap {
                name: "current".into(),
                kind,
            }]),
            None => bail!("host {} has no current backup", conn.host),
        },
        Some(s) if is_snapshot_glob(s) => {
            let glob = snapshot_glob(s)?;
            // 1.x globbed the host's folder, `current` included.
            let all = if glob.matches(b"current") {
                with_current(all)
            } else {
                all
            };
            let count = all.len();
            let range = match (all.first(), all.last()) {
                (Some(a), Some(z)) => format!(
                    " (oldest {}, newest {})",
                    byteback_protocol::escape_text(&a.name),
                    byteback_protocol::escape_text(&z.name)
                ),
                _ => String::new(),
            };
            let picked: Vec<Snap> = all
                .into_iter()
                .filter(|x| glob.matches(x.name.as_bytes()))
                .collect();
            if picked.is_empty() {
                bail!("no snapshot matches --snapshot {s:?}; there are {count} snapshots{range}");
            }
            Ok(picked)
        }
        Some(s) => match all.into_iter().find(|x| x.name == s) {
            Some(x) => Ok(vec![x]),
            None => bail!("no snapshot {s:?}"),
        },
        None => Ok(with_current(all)),
    }
}

/// A note naming the 1.x snapshots among `snaps` (their files carry no stored hash).
fn legacy_note(snaps: &[Snap]) -> Option<String> {
    let legacy: Vec<&str> = snaps
        .iter()
        .filter(|s| s.kind == SnapshotKind::Legacy1x)
        .map(|s| s.name.as_str())
        .collect();
    match legacy.as_slice() {
        [] => None,
        [one] => Some(format!(
            "snapshot {one} was written by byteback 1.x (rsync --fake-super): it has no stored checksums"
        )),
        [first, .., last] => Some(format!(
            "{} snapshots ({first} .. {last}) were written by byteback 1.x (rsync --fake-super): they have no stored checksums",
            legacy.len()
        )),
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
    format!("/{}", byteback_protocol::escape_bytes(p))
}

/// A path (or a symlink's target) as a listing shows it: escaped as
/// [`display_path`] escapes it, and a space followed by `->` or `=>` as
/// `\x20`, so that in a line only the separator before a symlink's target
/// or a hard link's first name reads ` -> ` or ` => ` (a file named
/// `a -> b` would read as the symlink `a`; a symlink `a ->` to `t` as the
/// symlink `a` to `-> t`).
fn listed(shown: &str) -> String {
    let mut out = String::with_capacity(shown.len());
    for (i, c) in shown.char_indices() {
        let rest = &shown[i + c.len_utf8()..];
        if c == ' ' && (rest.starts_with("->") || rest.starts_with("=>")) {
            out.push_str("\\x20");
        } else {
            out.push(c);
        }
    }
    out
}

fn format_time(sec: i64) -> String {
    match byteback_protocol::os::localtime(sec) {
        Some(t) => t.to_iso_seconds(),
        None => sec.to_string(),
    }
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

/// One row of a listing: the snapshot, the entry, the server's note on it.
type Row = (String, ManifestEntry, Option<String>);

/// The rows of a listing, gathered newest snapshot first: per path, the
/// versions kept (`all`), every copy (`verbose`) or the latest only.
struct Rows {
    /// Path -> (snapshot, entry, the server's note on it), newest snapshot first.
    by_path: HashMap<Vec<u8>, Vec<Row>>,
    /// With `all`: the key of a path's version -> its place in `by_path`, so
    /// that a version met again (in an older snapshot) is found without
    /// comparing it with every other version of the path.
    versions: HashMap<u128, usize>,
    all: bool,
    verbose: bool,
    /// Bytes held, refused beyond `cap` ([`LIST_BYTES`]).
    held: usize,
    cap: usize,
}

impl Rows {
    fn new(all: bool, verbose: bool) -> Rows {
        Rows {
            by_path: HashMap::new(),
            versions: HashMap::new(),
            all,
            verbose,
            held: 0,
            cap: LIST_BYTES,
        }
    }

    /// Takes `e` from `snap`, older than every snapshot added before,
    /// with the server's note on it (held, and counted, only while its
    /// row is: a row is printed with the note's warning).
    fn add(&mut self, snap: &str, e: ManifestEntry, note: Option<String>) -> Result<()> {
        let v = self.by_path.entry(e.entry.path.clone()).or_default();
        let key = (self.all && !self.verbose).then(|| version_digest(&e, true));
        let note_cost = |n: &Option<String>| n.as_ref().map_or(0, String::len);
        if let Some(&i) = key.as_ref().and_then(|k| self.versions.get(k)) {
            // Seen in a newer snapshot: report the oldest snapshot holding
            // it, with that snapshot's note (as a restore takes it).
            self.held = self.held - note_cost(&v[i].2) + note_cost(&note);
            v[i].0 = snap.to_string();
            v[i].2 = note;
        } else if self.verbose || self.all || v.is_empty() {
            self.held += e.entry.buffer_cost()
                + snap.len()
                + 64
                + note_cost(&note)
                + if key.is_some() { 48 } else { 0 };
            if let Some(k) = key {
                self.versions.insert(k, v.len());
            }
            v.push((snap.to_string(), e, note));
        }
        if self.held > self.cap {
            bail!(
                "the listing would hold more than {} MiB; give narrower patterns",
                self.cap >> 20
            );
        }
        Ok(())
    }
}

/// Most warnings a listing remembers having given (16 bytes each), so as
/// not to give them again for another snapshot; beyond, they may repeat.
const LIST_WARNED_KEYS: usize = 1 << 16;

/// The warnings a listing gives from the server's notes: each (path,
/// text) once, the first few printed ([`NoteBudget`]).
#[derive(Default)]
struct ListWarnings {
    warned: HashSet<u128>,
    budget: NoteBudget,
    /// Counts them (keeps none: `budget` prints them).
    report: RestoreReport,
}

impl ListWarnings {
    fn warn(&mut self, snap: &str, path: &[u8], message: &str) {
        let mut h = path_hasher(path);
        h.update(message.as_bytes());
        let k = digest_of(h);
        if self.warned.contains(&k) {
            return;
        }
        if self.warned.len() < LIST_WARNED_KEYS {
            self.warned.insert(k);
        }
        self.budget
            .warn(&mut self.report, || note_text(snap, path, message));
        self.report.warnings.clear();
    }
}

/// Prints the listing: latest version per path, every distinct version with
/// `all`, every copy in every snapshot with `verbose`.
///
/// Over 80 lines: collecting the manifests and the three levels of detail
/// share one pass over the entries.
pub fn list(
    conn: &mut Connection,
    pats: &Patterns,
    snapshot: Option<&str>,
    all: bool,
    verbose: bool,
    out: &mut dyn Write,
) -> Result<(usize, u64)> {
    let snaps = pick_snapshots(conn, snapshot)?;
    if snaps.is_empty() {
        bail!(
            "host {} has no snapshots here (is the host name right? see --hostname)",
            conn.host
        );
    }
    // Notes on what the listing shows, each path's once (by its text
    // without the snapshot), the first few printed (see [`NoteBudget`]).
    let warner = std::cell::RefCell::new(ListWarnings::default());
    if let Some(note) = legacy_note(&snaps) {
        eprintln!("byteback-restore: note: {note}");
    }
    let snaps: Vec<(String, bool)> = snaps
        .into_iter()
        .map(|s| (s.name, s.kind == SnapshotKind::Legacy1x))
        .collect();
    // Warnings go with what is shown: a note on an entry with its row
    // when it is printed (not for a version the listing does not show),
    // one on a path left out wherever the patterns reach it, as in a
    // restore.
    let rows = std::cell::RefCell::new(Rows::new(all, verbose));
    for (s, legacy) in snaps.iter().rev() {
        let mut sel = Selector {
            pats,
            matched_dir: None,
        };
        read_manifest(
            conn,
            s,
            *legacy,
            |e, note| {
                if sel.select(&e) {
                    rows.borrow_mut().add(s, e, note)?;
                }
                Ok(())
            },
            // Said wherever the patterns reach it, whatever newer
            // snapshots hold: what was left out may be a directory (or
            // the directory of an over-long path) whose newer copy lacks
            // files only this snapshot had.
            |p, m| {
                if pats.reaches(&p) {
                    pats.note_hit(&p);
                    warner.borrow_mut().warn(s, &p, &m);
                }
                Ok(())
            },
        )?;
    }
    let mut warner = warner.into_inner();
    let rows = rows.into_inner().by_path;
    let link_sizes = link_sizes(conn, &rows, &snaps)?;
    let mut paths: Vec<&Vec<u8>> = rows.keys().collect();
    paths.sort_by(|a, b| byteback_protocol::compare_paths(a, b));
    // 1.x's columns and mtimes (`2026-11-20 03:00:00 +0000`).
    let heading = format!(
        "{:<25} {:<10} {:>12} {:>6} {:>6} {:<25} path",
        "snapshot", "modestring", "size", "uid", "gid", "mtime"
    );
    writeln!(out, "{heading}")?;
    writeln!(out, "{}", "-".repeat(heading.len()))?;
    let mut n = 0;
    for p in paths {
        let mut v = rows[p].clone();
        v.reverse(); // oldest first
        for (s, e, note) in v {
            if let Some(m) = note {
                warner.warn(&s, &e.entry.path, &m);
            }
            let mtime = match byteback_protocol::os::localtime(e.entry.mtime_sec) {
                Some(t) => t.to_listing(),
                None => e.entry.mtime_sec.to_string(),
            };
            // A further name shows its object's size and type letter (a
            // symlink's, FIFO's... since protocol 11).
            let mut mode = mode_string(&e);
            let size = match &e.entry.kind {
                Kind::HardLink { target } => {
                    let (size, letter) = link_sizes
                        .get(&(s.clone(), target.clone()))
                        .copied()
                        .unwrap_or((0, '-'));
                    mode.replace_range(0..1, letter.encode_utf8(&mut [0; 4]));
                    size
                }
                _ => e.entry.size(),
            };
            let mut line = format!(
                "{:<25} {:<10} {:>12} {:>6} {:>6} {:<25} {}",
                s,
                mode,
                size,
                e.entry.uid,
                e.entry.gid,
                mtime,
                listed(&display_path(&e.entry.path))
            );
            match &e.entry.kind {
                Kind::Symlink { target } => line.push_str(&format!(
                    " -> {}",
                    listed(display_path(target).split_at(1).1)
                )),
                Kind::HardLink { target } => {
                    line.push_str(&format!(" => {}", listed(&display_path(target))))
                }
                _ => {}
            }
            writeln!(out, "{line}")?;
            n += 1;
        }
    }
    if let Some(w) = warner.budget.unshown() {
        tracing::warn!("{w}");
    }
    Ok((n, warner.report.warnings_total))
}

/// Per (snapshot, first name) a listing's hard links name: the object's
/// size and type letter.
type LinkedObjects = HashMap<(String, Vec<u8>), (u64, char)>;

/// The sizes of the files that the hard links among `rows` name, by
/// snapshot and path (a listing shows a link with its file's size, as
/// 1.x did): one more reading of each snapshot with such a link shown,
/// holding what the rows already bound.
fn link_sizes(
    conn: &mut Connection,
    rows: &HashMap<Vec<u8>, Vec<Row>>,
    snaps: &[(String, bool)],
) -> Result<LinkedObjects> {
    let mut wanted: HashMap<&str, HashSet<&[u8]>> = HashMap::new();
    for (s, e, _) in rows.values().flatten() {
        if let Kind::HardLink { target } = &e.entry.kind {
            wanted.entry(s).or_default().insert(target);
        }
    }
    let mut sizes = HashMap::new();
    for (s, legacy) in snaps {
        let Some(targets) = wanted.get(s.as_str()) else {
            continue;
        };
        let each = |e: ManifestEntry, _| {
            if targets.contains(e.entry.path.as_slice()) {
                let seen = (e.entry.size(), e.entry.kind.type_char());
                sizes.insert((s.clone(), e.entry.path), seen);
            }
            Ok(())
        };
        read_manifest(conn, s, *legacy, each, |_, _| Ok(()))?;
    }
    Ok(sizes)
}

/// Most selected entries a restore holds at once; more are restored in further passes.
pub const CHUNK_ENTRIES: usize = 100_000;
/// Most bytes of selected entries (by [`byteback_protocol::Entry::buffer_cost`]) held at once.
pub const CHUNK_BYTES: usize = 32 << 20;
/// Most bytes of rows a listing holds before it asks for narrower patterns.
pub const LIST_BYTES: usize = 1 << 30;
/// Most paths (or versions, with `--all`) a restore across several snapshots
/// remembers as already assigned to a snapshot, 16 bytes each (about twice
/// that in its hash set), before it asks for narrower patterns.
pub const CLAIM_KEYS: usize = 16 << 20;

/// Outcome of a restore.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Snapshots restored from (each into its own directory), oldest first.
    pub snapshots: Vec<String>,
    /// Entries restored.
    pub restored: u64,
    /// Problems that did not stop the restore (metadata not applied,
    /// devices skipped): printed as they happen, the first
    /// [`KEPT_MESSAGES`] kept here.
    pub warnings: Vec<String>,
    /// How many warnings there were.
    pub warnings_total: u64,
    /// Files not restored because their content failed verification
    /// (removed): printed as they happen, the first [`KEPT_MESSAGES`] kept.
    pub damaged: Vec<String>,
    /// How many files were damaged.
    pub damaged_total: u64,
    /// Files restored from 1.x snapshots, which keep no checksum to verify them against.
    pub unverified: u64,
}

/// Warnings and damaged files a restore keeps for its summary and
/// `--json` (each is printed when it happens): a hostile server could
/// otherwise grow them without bound.
pub const KEPT_MESSAGES: usize = 1000;

impl RestoreReport {
    fn merge(&mut self, other: RestoreReport) {
        self.snapshots.extend(other.snapshots);
        self.restored += other.restored;
        keep(&mut self.warnings, other.warnings);
        self.warnings_total += other.warnings_total;
        keep(&mut self.damaged, other.damaged);
        self.damaged_total += other.damaged_total;
        self.unverified += other.unverified;
    }

    /// Prints warning `w` and keeps it if there is room.
    pub(crate) fn warn(&mut self, w: String) {
        tracing::warn!("{w}");
        self.warnings_total += 1;
        keep(&mut self.warnings, [w]);
    }

    /// Prints damaged file `d` and keeps it if there is room.
    pub(crate) fn damage(&mut self, d: String) {
        tracing::error!("DAMAGED: {d}");
        self.damaged_total += 1;
        keep(&mut self.damaged, [d]);
    }
}

/// The warnings a run gives from the server's notes (see
/// [`ServerMsg::ManifestNote`]): the first [`KEPT_MESSAGES`] are printed
/// (and kept), the rest only counted, so that a server sending any
/// number of them costs neither memory nor a flood of output.
#[derive(Debug, Default)]
struct NoteBudget {
    shown: usize,
    unshown: u64,
}

impl NoteBudget {
    /// Warns `w()` into `report`, or counts it there when enough were shown.
    fn warn(&mut self, report: &mut RestoreReport, w: impl FnOnce() -> String) {
        if self.shown < KEPT_MESSAGES {
            self.shown += 1;
            report.warn(w());
        } else {
            self.unshown += 1;
            report.warnings_total += 1;
        }
    }

    /// The last warning, on those not shown, if any.
    fn unshown(&self) -> Option<String> {
        (self.unshown > 0).then(|| {
            format!(
                "and {} more entries the server left out or sent with less than was stored \
                 (not named: only the first {KEPT_MESSAGES} are)",
                self.unshown
            )
        })
    }
}

/// Appends `more` to `list` up to [`KEPT_MESSAGES`].
fn keep(list: &mut Vec<String>, more: impl IntoIterator<Item = String>) {
    let room = KEPT_MESSAGES.saturating_sub(list.len());
    list.extend(more.into_iter().take(room));
}

/// 128 bits of BLAKE3 of an entry's path and, with `version`, of what makes
/// one version of it differ from another ([`version_key`]).
fn version_digest(e: &ManifestEntry, version: bool) -> u128 {
    let mut h = path_hasher(&e.entry.path);
    if version {
        let (size, sec, nsec, hash, mode, uid, gid, kind) = version_key(e);
        h.update(&size.to_le_bytes());
        h.update(&sec.to_le_bytes());
        h.update(&nsec.to_le_bytes());
        h.update(&hash);
        h.update(&mode.to_le_bytes());
        h.update(&uid.to_le_bytes());
        h.update(&gid.to_le_bytes());
        h.update(kind.as_bytes());
        // xattrs and ACLs too: a capability or an ACL entry added (or
        // taken away to revoke access) is a version of its own.
        let mut x: Vec<&(Vec<u8>, Vec<u8>)> = e.entry.xattrs.iter().collect();
        x.sort();
        h.update(&(x.len() as u64).to_le_bytes());
        for (name, value) in x {
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name);
            h.update(&(value.len() as u64).to_le_bytes());
            h.update(value);
        }
    }
    digest_of(h)
}

/// A hasher fed with a path, as [`version_digest`] starts.
fn path_hasher(p: &[u8]) -> byteback_delta::FileHasher {
    let mut h = byteback_delta::FileHasher::new();
    h.update(&(p.len() as u64).to_le_bytes());
    h.update(p);
    h
}

/// 128 bits of `h`'s BLAKE3.
fn digest_of(h: byteback_delta::FileHasher) -> u128 {
    let d = h.finish();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    u128::from_le_bytes(k)
}

/// What restore does beyond the selection.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Every distinct version of each path, each from the oldest snapshot
    /// holding it; by default only the latest, from the newest snapshot holding it.
    pub all: bool,
    /// Name each restored entry on stderr.
    pub verbose: bool,
    /// Do not recreate device nodes.
    pub no_devices: bool,
    /// Drop setuid and setgid bits.
    pub no_setuid: bool,
    /// Allocate every restored file whole (zeros as data, no holes).
    pub no_sparse: bool,
}

/// Where a restore writes: `<dir>/<snapshot>/...`.
#[derive(Debug, Clone, Copy)]
pub struct RestoreInto<'a> {
    /// The directory that receives the snapshot directories, opened once
    /// (`O_PATH`) before the restore starts.
    pub fd: BorrowedFd<'a>,
    /// Its path, for messages.
    pub dir: &'a Path,
    /// How messages name it (`.` for the current directory).
    pub shown: &'a str,
}

/// What a restore across several snapshots remembers of the paths (or,
/// with `--all`, the versions) already assigned to a snapshot processed
/// before: 128 bits of BLAKE3 each, never the paths themselves, so a
/// whole-host restore over many snapshots holds 16 bytes per selected path.
///
/// The set uses std's randomly keyed hasher: the keys come from names the
/// (untrusted) server chose, and must not be steerable into one bucket.
struct Claims {
    keys: HashSet<u128>,
    /// Distinct versions rather than paths.
    all: bool,
    /// Most keys held, counting those not yet merged ([`CLAIM_KEYS`]).
    cap: usize,
}

impl Claims {
    fn new(all: bool) -> Self {
        Claims {
            keys: HashSet::new(),
            all,
            cap: CLAIM_KEYS,
        }
    }

    /// The key of an entry: its path, or with `all` its path and version.
    fn key(&self, e: &ManifestEntry) -> u128 {
        version_digest(e, self.all)
    }

    fn contains(&self, e: &ManifestEntry) -> bool {
        self.keys.contains(&self.key(e))
    }

    /// Refuses to remember more than the cap, `pending` keys not merged yet included.
    fn room(&self, pending: usize) -> Result<()> {
        if self.keys.len() + pending >= self.cap {
            bail!(
                "the restore would remember more than {} selected {} across snapshots; \
                 give narrower patterns (or --snapshot)",
                self.cap,
                if self.all { "versions" } else { "paths" }
            );
        }
        Ok(())
    }
}

/// How one snapshot's restore stands among the snapshots of the run.
#[derive(Debug, Clone, Copy)]
struct Turn {
    /// Processed first: takes everything the patterns select.
    first: bool,
    /// Processed last: what it takes need not be remembered.
    last: bool,
}

/// One pass's share of the selection.
struct Chunk {
    wanted: Vec<tree::Wanted>,
    /// The directories on the way to them that the patterns do not select,
    /// by path (without xattrs): a directory the restore makes for them
    /// gets that metadata, so a file kept private by its directory stays so.
    implied: HashMap<Vec<u8>, Entry>,
    /// Whether the selection ended within this pass.
    complete: bool,
    /// Warnings on the entries of `wanted` (from the server's notes),
    /// counted in the chunk's bytes.
    notes: Vec<String>,
}

/// Reads the manifest once and takes the entries `take` selects after
/// `after`, up to the chunk limits. `take` sees every entry, in order.
/// Files of the chunk that a hard link anywhere after them names as its
/// first name are marked [`tree::Wanted::linked`]. On the first pass
/// (no `after`), `skipped` gets each path the server left out and why, as
/// it comes: none is held here.
fn collect_chunk(
    conn: &mut Connection,
    snap: &str,
    legacy: bool,
    after: Option<&[u8]>,
    mut take: impl FnMut(&ManifestEntry) -> Result<bool>,
    mut skipped: impl FnMut(Vec<u8>, String),
    copies: impl Fn(&[u8]) -> bool,
) -> Result<Chunk> {
    let mut chunk = Chunk {
        wanted: vec![],
        implied: HashMap::new(),
        complete: true,
        notes: vec![],
    };
    let mut bytes = 0usize;
    // The directories not selected on the way down to the current entry,
    // outermost first: made with their whole metadata, xattrs and ACLs
    // too (without its ACL, a directory's group would get the rights of
    // the ACL's mask, which its mode's group bits are).
    let mut chain: Vec<Entry> = vec![];
    // Their bytes (by `buffer_cost`), and whether the xattrs left out
    // past CHUNK_BYTES were said.
    let mut chain_bytes = 0usize;
    let mut stripped_said = false;
    // The chunk's regular files by path key, to mark those links name.
    let mut files: HashMap<u128, usize> = HashMap::new();
    // First names not selected that links of the chunk name, counted once
    // each (see below).
    let mut charged: HashSet<u128> = HashSet::new();
    read_manifest(
        conn,
        snap,
        legacy,
        |e, note| {
            if let Kind::HardLink { target } = &e.entry.kind {
                if let Some(&i) = files.get(&tree::path_key(target)) {
                    chunk.wanted[i].linked = true;
                }
            }
            while chain
                .last()
                .is_some_and(|d| !check::is_ancestor(&d.path, &e.entry.path))
            {
                chain_bytes -= chain.pop().map_or(0, |d| d.buffer_cost());
            }
            let selected = take(&e)?;
            if !selected && e.entry.kind == Kind::Dir {
                // Bounded against a server nesting directories that each
                // carry 1 MiB of xattrs: past CHUNK_BYTES on the way down,
                // a directory keeps its ACLs only (what keeps it private);
                // past four times that, the manifest is refused.
                let mut d = e.entry.clone();
                if chain_bytes + d.buffer_cost() > CHUNK_BYTES {
                    d.xattrs
                        .retain(|(n, _)| n.starts_with(b"system.posix_acl_"));
                    if !stripped_said {
                        // A warning (exit 24), as the tree's own for the
                        // directories it holds: xattrs are not restored.
                        stripped_said = true;
                        chunk.notes.push(format!(
                            "snapshot {snap}: the directories above {} carry more than {} MiB \
                             of xattrs; those made on the way to it get their ACLs only",
                            display_path(&d.path),
                            CHUNK_BYTES >> 20
                        ));
                    }
                }
                if chain_bytes + d.buffer_cost() > 4 * CHUNK_BYTES {
                    bail!(
                        "snapshot {snap}: the directories above {} carry more than {} MiB of \
                         ACLs; refusing the manifest",
                        display_path(&d.path),
                        (4 * CHUNK_BYTES) >> 20
                    );
                }
                chain_bytes += d.buffer_cost();
                chain.push(d);
            }
            let later = after.is_none_or(|a| {
                byteback_protocol::compare_paths(a, &e.entry.path) == std::cmp::Ordering::Less
            });
            if !selected || !later {
                return Ok(());
            }
            if !chunk.complete {
                return Ok(());
            }
            if chunk.wanted.len() >= CHUNK_ENTRIES || bytes >= CHUNK_BYTES {
                chunk.complete = false;
                return Ok(());
            }
            for d in &chain {
                if !chunk.implied.contains_key(&d.path) {
                    bytes += d.buffer_cost();
                    chunk.implied.insert(d.path.clone(), d.clone());
                }
            }
            bytes += e.entry.buffer_cost();
            // A link whose first name may become a copy of its object (see
            // [`resolve_unselected_targets`]) counts what that may add:
            // a symlink's target, up to a path's length; once per first
            // name (its further links stay links, to the copy).
            if let Kind::HardLink { target } = &e.entry.kind {
                if copies(target) && charged.insert(tree::path_key(target)) {
                    bytes += byteback_protocol::limits::MAX_PATH;
                }
            }
            // What a later hard link may name: any object but a directory.
            if !matches!(e.entry.kind, Kind::Dir | Kind::HardLink { .. }) {
                files.insert(tree::path_key(&e.entry.path), chunk.wanted.len());
            }
            if let Some(m) = note {
                let w = note_text(snap, &e.entry.path, &m);
                bytes += w.len();
                chunk.notes.push(w);
            }
            chunk.wanted.push(tree::Wanted {
                e,
                from: None,
                linked: false,
            });
            Ok(())
        },
        |p, m| {
            if after.is_none() {
                skipped(p, m);
            }
            Ok(())
        },
    )?;
    Ok(chunk)
}

/// What the hard links of a chunk need of a first name they do not take.
struct LinkTarget {
    /// Its kind (a regular file's size, a symlink's target, a device's
    /// number).
    kind: Kind,
    hash: [u8; 32],
    /// A snapshot processed before claimed it.
    claimed: bool,
}

/// Hard links whose first name this snapshot's restore does not take (the
/// patterns did not select it, or a snapshot processed before claimed it)
/// get that file's content (looked up in one more pass over the manifest)
/// under their own name; later links to the same first name link to this copy.
fn resolve_unselected_targets(
    conn: &mut Connection,
    snap: &str,
    legacy: bool,
    pats: &Patterns,
    claimed: Option<&Claims>,
    copied: &dyn Fn(&[u8]) -> bool,
    chunk: &mut Chunk,
) -> Result<()> {
    // Targets the patterns do not select are not taken; those they select
    // may have been claimed by another snapshot: looked up too. Those an
    // earlier pass copied (`copied`) stay links, to the copy.
    let mut wanted_targets: HashSet<Vec<u8>> = HashSet::new();
    for w in &chunk.wanted {
        if let Kind::HardLink { target } = &w.e.entry.kind {
            if copied(target) {
                continue;
            }
            if claimed.is_some() || !pats.selects(target) {
                wanted_targets.insert(target.clone());
            }
        }
    }
    if wanted_targets.is_empty() {
        return Ok(());
    }
    // Only what the links need of each target, not its entry: a target's
    // xattrs would otherwise be held for every link the chunk names.
    let mut found: HashMap<Vec<u8>, LinkTarget> = HashMap::new();
    read_manifest(
        conn,
        snap,
        legacy,
        |e, _| {
            if wanted_targets.contains(&e.entry.path) {
                let target = LinkTarget {
                    kind: e.entry.kind.clone(),
                    hash: e.hash,
                    claimed: claimed.is_some_and(|c| c.contains(&e)),
                };
                found.insert(e.entry.path.clone(), target);
            }
            Ok(())
        },
        |_, _| Ok(()),
    )?;
    let mut copied: HashSet<Vec<u8>> = HashSet::new();
    for w in &mut chunk.wanted {
        let Kind::HardLink { target } = &w.e.entry.kind else {
            continue;
        };
        if !wanted_targets.contains(target) || copied.contains(target) {
            continue; // later links to a copy made above stay links to it
        }
        let Some(t) = found.get(target) else {
            bail!(
                "the server's manifest links {} to {}, which it does not hold",
                display_path(&w.e.entry.path),
                display_path(target)
            );
        };
        let taken = pats.selects(target) && !t.claimed;
        if taken {
            continue; // restored (or refused) by the tree as a link
        }
        if matches!(t.kind, Kind::Dir | Kind::HardLink { .. }) {
            bail!(
                "the server's manifest links {} to {}, which is no file, symlink or special \
                 file; refusing",
                display_path(&w.e.entry.path),
                display_path(target)
            );
        }
        // The first link taken gets the object (a file's content, fetched
        // under the first name); later ones link to it. Moved, not copied:
        // a symlink's target is held once (the chunk counted it).
        let target = target.clone();
        if let Some(t) = found.remove(&target) {
            w.e.entry.kind = t.kind;
            w.e.hash = t.hash;
        }
        copied.insert(target.clone());
        w.from = Some(target);
    }
    Ok(())
}

/// Restores what one snapshot supplies into `<into>/<snap>/`: on its first
/// turn everything the patterns select, on later turns only what no snapshot
/// processed before claimed. Claims what it takes for the snapshots after it.
/// `None` when it supplies nothing (its directory is then not made); with
/// it, the warnings from what the server noted it lost or left out.
#[allow(clippy::too_many_arguments)] // one snapshot's share of the run's state
fn restore_snapshot(
    conn: &mut Connection,
    pats: &Patterns,
    snap: &str,
    into: RestoreInto<'_>,
    tree_opts: tree::TreeOptions,
    claims: &mut Claims,
    turn: Turn,
    budget: &mut NoteBudget,
) -> Result<(Option<RestoreReport>, RestoreReport)> {
    // Warnings from the server's notes (printed as they are found, the
    // first few of the run: see [`NoteBudget`]).
    let mut notes = RestoreReport::default();
    // Its files are restored unverified: a 1.x snapshot, which alone has notes.
    let legacy = tree_opts.unverified;
    let mut tree: Option<tree::RestoreTree> = None;
    let mut after: Option<Vec<u8>> = None;
    // What this snapshot takes, merged into the claims only once it is
    // done (its passes must see the claims as they were).
    let mut mine: Vec<u128> = vec![];
    let mut first_pass = true;
    loop {
        let mut sel = Selector {
            pats,
            matched_dir: None,
        };
        let record = first_pass && !turn.last;
        let claimed = &*claims;
        let mut chunk = collect_chunk(
            conn,
            snap,
            legacy,
            after.as_deref(),
            |e| {
                if !sel.select(e) {
                    return Ok(false);
                }
                if turn.first && !record {
                    return Ok(true);
                }
                let k = claimed.key(e);
                if !turn.first && claimed.keys.contains(&k) {
                    return Ok(false);
                }
                if record {
                    claimed.room(mine.len())?;
                    mine.push(k);
                }
                Ok(true)
            },
            // Left out by the server: a warning where the patterns ask
            // for it, whatever snapshots read before supplied (it may be
            // a directory whose newer copy lacks what only this one had).
            |p, m| {
                if pats.reaches(&p) {
                    pats.note_hit(&p);
                    budget.warn(&mut notes, || note_text(snap, &p, &m));
                }
            },
            // As `resolve_unselected_targets` decides which may.
            |target| !turn.first || !pats.selects(target),
        )?;
        for w in std::mem::take(&mut chunk.notes) {
            budget.warn(&mut notes, || w);
        }
        first_pass = false;
        if chunk.wanted.is_empty() && after.is_none() {
            return Ok((None, notes));
        }
        if tree.is_none() && !turn.first {
            swap_target_fault(into.dir);
        }
        let t = match &mut tree {
            Some(t) => t,
            None => tree.insert(tree::RestoreTree::open(
                into.fd, into.dir, into.shown, snap, tree_opts,
            )?),
        };
        let claimed = (!turn.first).then_some(&*claims);
        // A first name an earlier pass copied for a link is linked to that copy.
        let copied = |target: &[u8]| t.has_copy(target);
        resolve_unselected_targets(conn, snap, legacy, pats, claimed, &copied, &mut chunk)?;
        after = chunk.wanted.last().map(|w| w.e.entry.path.clone());
        let progress = &crate::progress::RESTORE;
        for w in &chunk.wanted {
            progress.found(w.e.entry.size());
        }
        if turn.last && chunk.complete {
            progress.walk_finished();
        }
        t.imply(chunk.implied);
        let mut wanted = std::collections::VecDeque::from(chunk.wanted);
        while let Some(w) = wanted.pop_front() {
            let size = w.e.entry.size();
            t.restore(conn, w, &wanted)?;
            progress.finished();
            progress.read(size);
        }
        if chunk.complete {
            break;
        }
    }
    claims.keys.extend(mine);
    Ok((tree.map(tree::RestoreTree::finish).transpose()?, notes))
}

/// Debug builds only, for the tests: before a later snapshot's tree is
/// made, the target directory is renamed and a symlink to
/// `$BYTEBACK_TEST_SWAP_TARGET` put on its path, as a user who may rename
/// it could.
#[cfg(debug_assertions)]
fn swap_target_fault(dir: &Path) {
    if let Some(to) = std::env::var_os("BYTEBACK_TEST_SWAP_TARGET") {
        let mut moved = dir.as_os_str().to_owned();
        moved.push(".moved");
        if std::fs::rename(dir, &moved).is_ok() {
            let _ = std::os::unix::fs::symlink(to, dir);
            eprintln!("test fault: {} now a symlink", dir.display());
        }
    }
}

#[cfg(not(debug_assertions))]
fn swap_target_fault(_dir: &Path) {}

/// Restores matching entries into `<into>/<snapshot>/<path>`.
///
/// With `snapshot`, from that snapshot only. Otherwise each selected path
/// comes from the newest snapshot holding it (with `opts.all`, each distinct
/// version from the oldest snapshot holding it), each snapshot into its own
/// directory. Snapshots are read newest first (oldest first with `all`); the
/// first one read is restored by the patterns alone, and what it restores is
/// remembered as 128-bit hashes (`Claims`), so each later snapshot
/// restores only what no snapshot read before supplied, and memory stays at
/// 16 bytes per selected path plus one chunk of entries.
pub fn restore(
    conn: &mut Connection,
    pats: &Patterns,
    snapshot: Option<&str>,
    into: RestoreInto<'_>,
    opts: RestoreOptions,
) -> Result<RestoreReport> {
    let snaps = pick_snapshots(conn, snapshot)?;
    if snaps.is_empty() {
        bail!("host {} has no snapshots yet", conn.host);
    }
    // The tree holds a descriptor per level of the path restored, as the
    // backup's walk did per level backed up.
    crate::walk::raise_fd_limit();
    // File data arrives a megabyte at a time.
    byteback_protocol::os::keep_freed_buffers();
    let tree_opts = tree::TreeOptions {
        rules: ApplyRules {
            as_root: meta::is_root(),
            no_setuid: opts.no_setuid,
            keep_unlisted_xattrs: false,
        },
        no_devices: opts.no_devices,
        verbose: opts.verbose,
        unverified: false,
        no_sparse: opts.no_sparse,
    };
    let order: Vec<&Snap> = if opts.all {
        snaps.iter().collect()
    } else {
        snaps.iter().rev().collect()
    };
    let mut claims = Claims::new(opts.all);
    let mut report = RestoreReport::default();
    let mut budget = NoteBudget::default();
    for (i, snap) in order.iter().enumerate() {
        let turn = Turn {
            first: i == 0,
            last: i + 1 == order.len(),
        };
        let tree_opts = tree::TreeOptions {
            unverified: snap.kind == SnapshotKind::Legacy1x,
            ..tree_opts
        };
        let (r, notes) = restore_snapshot(
            conn,
            pats,
            &snap.name,
            into,
            tree_opts,
            &mut claims,
            turn,
            &mut budget,
        )?;
        report.merge(notes);
        if let Some(r) = r {
            report.merge(r);
        }
    }
    if let Some(w) = budget.unshown() {
        report.warn(w);
    }
    match snaps.as_slice() {
        _ if !report.snapshots.is_empty() => {}
        [one] => bail!("nothing in snapshot {} matches", one.name),
        all => bail!("nothing in any of the {} snapshots matches", all.len()),
    }
    for p in pats.unmatched() {
        report.warn(format!(
            "pattern {p:?} matches nothing; nothing restored for it"
        ));
    }
    if let Some(w) = crate::apply::not_root_summary() {
        report.warn(w);
    }
    report
        .snapshots
        .sort_by_key(|s| snaps.iter().position(|x| &x.name == s));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use byteback_protocol::Entry;

    #[test]
    fn snapshot_globs_are_checked_before_sending_and_match_names() {
        assert!(is_snapshot_glob("2026-11-*"));
        assert!(!is_snapshot_glob("2026-11-27T03:00+0000"));
        let g = snapshot_glob("2026-11-*").unwrap();
        assert!(g.matches(b"2026-11-27T03:00+0000"));
        assert!(!g.matches(b"2026-12-01T03:00+0000"));
        let g = snapshot_glob("2026-1[01]-0?T*").unwrap();
        assert!(g.matches(b"2026-10-05T03:00+0000"));
        assert!(!g.matches(b"2026-12-05T03:00+0000"));
        for bad in ["*/..", "../*", "[abc", "a*\\n", "*\u{1b}", "", "x y*"] {
            assert!(snapshot_glob(bad).is_err(), "{bad:?}");
        }
        assert!(snapshot_glob(&"*".repeat(256)).is_err());
    }

    fn me(path: &str, mtime: i64) -> ManifestEntry {
        ManifestEntry {
            entry: Entry {
                path: path.as_bytes().to_vec(),
                kind: Kind::File { size: 1 },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_sec: mtime,
                mtime_nsec: 0,
                xattrs: vec![],
            },
            hash: [0; 32],
        }
    }

    /// A pattern or current directory that is not UTF-8 still selects the
    /// file it names: each other byte matches as `?`.
    #[test]
    fn patterns_that_are_not_utf8_select_what_they_name() {
        use std::os::unix::ffi::OsStringExt;
        let odd = std::ffi::OsString::from_vec(b"odd/\xff\xfelatin\xe9".to_vec());
        let cwd = Path::new(OsStr::from_bytes(b"/srv/d\xe9j\xe0"));
        let texts = utf8_patterns(&[odd], cwd).unwrap();
        assert_eq!(texts, ["/srv/d?j?/odd/??latin?"]);
        let pats = Patterns::new(&texts, "").unwrap();
        assert!(pats.selects(b"srv/d\xe9j\xe0/odd/\xff\xfelatin\xe9"));
        assert!(!pats.selects(b"srv/d\xe9j\xe0/odd/\xfflatin\xe9"));
        assert_eq!(utf8_patterns(&["/etc".into()], cwd).unwrap(), ["/etc"]);
        // Where `?` would be a literal, never a narrower selection: refused.
        for bad in [
            &b"/caf[\xe9x]"[..],
            b"/caf\\\xe9",
            b"/[]\xe9]",
            b"/[!]\xe9]",
        ] {
            let p = std::ffi::OsString::from_vec(bad.to_vec());
            assert!(utf8_patterns(&[p], cwd).unwrap_err().is_usage(), "{bad:?}");
        }
        let p = std::ffi::OsString::from_vec(b"/[ab]\xe9\\[".to_vec());
        assert_eq!(utf8_patterns(&[p], cwd).unwrap(), ["/[ab]?\\["]);
    }

    /// Patterns are made absolute and then normalised as 1.x's
    /// `File.expand_path` did: `.`, `./x`, `a//b`, `x/..` and `../x` name
    /// what they say.
    #[test]
    fn relative_patterns_are_normalised() {
        let sel = |p: &str, cwd: &str, path: &str| {
            Patterns::new(&[p.to_string()], Path::new(cwd))
                .unwrap()
                .selects(path.as_bytes())
        };
        for (p, cwd) in [
            (".", "/etc"),
            ("./", "/etc"),
            ("./passwd", "/etc"),
            ("ssh/../passwd", "/etc"),
            ("/etc//passwd", "/"),
            ("../passwd", "/etc/ssh"),
            ("../../../etc/./passwd", "/etc/ssh"),
            ("passwd", "/etc/"),
        ] {
            assert!(sel(p, cwd, "etc/passwd"), "{p} in {cwd}");
        }
        assert!(!sel("./passwd", "/etc", "etc/shadow"));
        assert!(sel("..", "/etc", "etc/passwd"), "the root holds everything");
        assert!(sel("./s*", "/etc", "etc/ssh/sshd_config"));
        assert!(!sel("./s*", "/etc", "etc/passwd"));
    }

    #[test]
    fn claim_keys_are_paths_or_versions() {
        let paths = Claims::new(false);
        let versions = Claims::new(true);
        assert_eq!(paths.key(&me("a", 1)), paths.key(&me("a", 2)));
        assert_ne!(paths.key(&me("a", 1)), paths.key(&me("b", 1)));
        assert_ne!(versions.key(&me("a", 1)), versions.key(&me("a", 2)));
        assert_eq!(versions.key(&me("a", 1)), versions.key(&me("a", 1)));
        let mut x = me("a", 1);
        x.entry.uid = 5;
        assert_ne!(versions.key(&me("a", 1)), versions.key(&x));
        // A capability or an ACL entry alone makes a version too, whatever
        // the order the xattrs come in.
        let mut cap = me("a", 1);
        cap.entry.xattrs = vec![
            (b"security.capability".to_vec(), vec![1, 2]),
            (b"user.a".to_vec(), vec![3]),
        ];
        assert_ne!(versions.key(&me("a", 1)), versions.key(&cap));
        let mut same = cap.clone();
        same.entry.xattrs.reverse();
        assert_eq!(versions.key(&cap), versions.key(&same));
    }

    #[test]
    fn a_listing_keeps_each_version_once_from_the_oldest_snapshot_holding_it() {
        let snaps = ["s4", "s3", "s2", "s1"]; // newest first, as the listing reads them
                                              // Oldest first: a is at version 1 in s1 and s2, 2 in s3, 1 again in s4.
        let seen = [me("a", 1), me("a", 2), me("a", 1), me("a", 1)];
        let rows_for = |all: bool, verbose: bool| {
            let mut rows = Rows::new(all, verbose);
            for (s, e) in snaps.iter().zip(seen.iter()) {
                rows.add(s, e.clone(), None).unwrap();
                rows.add(s, me("b", 7), None).unwrap();
            }
            let named = |p: &str| -> Vec<(String, i64)> {
                rows.by_path[p.as_bytes()]
                    .iter()
                    .map(|(s, e, _)| (s.clone(), e.entry.mtime_sec))
                    .collect()
            };
            (named("a"), named("b"))
        };
        let v = |x: &[(&str, i64)]| -> Vec<(String, i64)> {
            x.iter().map(|(s, t)| (s.to_string(), *t)).collect()
        };
        assert_eq!(rows_for(false, false), (v(&[("s4", 1)]), v(&[("s4", 7)])));
        assert_eq!(
            rows_for(true, false),
            (v(&[("s1", 1), ("s3", 2)]), v(&[("s1", 7)]))
        );
        let every = rows_for(true, true);
        assert_eq!(every.0.len(), 4);
        assert_eq!(every.1.len(), 4);
    }

    #[test]
    fn a_listing_of_many_versions_is_capped() {
        let mut rows = Rows::new(true, false);
        rows.cap = 1 << 20;
        let mut failed = None;
        for i in 0..rows.cap as i64 {
            if let Err(e) = rows.add("s", me("a", i), None) {
                failed = Some((i, e.to_string()));
                break;
            }
        }
        let (i, e) = failed.expect("never capped");
        assert!(e.contains("narrower patterns"), "{e}");
        assert!(rows.held > rows.cap && i > 1000, "{i}");
        assert!(rows.by_path[&b"a"[..]].len() < 10_000);
    }

    #[test]
    fn claims_are_capped() {
        let mut c = Claims::new(false);
        c.cap = 3;
        c.room(2).unwrap();
        c.keys.insert(1);
        c.keys.insert(2);
        let e = c.room(1).unwrap_err().to_string();
        assert!(e.contains("narrower patterns"), "{e}");
    }
}

//! What the client accepts from a server serving a listing or a restore.
//!
//! The server may be hostile (a compromised backup server must not also own
//! every client), so what it sends is checked with the rules the server
//! applies to a client: snapshot names by the server's own validator, every
//! entry by the protocol's validation (paths, lengths, modes), the manifest in
//! strictly increasing walk order with each parent directory sent before its
//! children, no repeats, hard links only to earlier paths. The check keeps
//! only the chain of directories above the last entry, so a manifest of any
//! length is checked in bounded memory.

use std::cmp::Ordering;
use std::collections::HashSet;

use crate::error::{bail, Result};
use byteback_protocol::limits::MAX_SNAPSHOTS;
use byteback_protocol::{compare_paths, validate_snapshot_name, Kind, ManifestEntry};

use super::display_path;

/// Checks a list of snapshot names from the server.
pub fn check_snapshots(names: &[String]) -> Result<()> {
    if names.len() > MAX_SNAPSHOTS {
        bail!(
            "the server listed {} snapshots (at most {MAX_SNAPSHOTS})",
            names.len()
        );
    }
    let mut seen = HashSet::with_capacity(names.len());
    for n in names {
        if let Err(e) = validate_snapshot_name(n) {
            bail!(
                "the server sent an invalid snapshot name {}: {e}",
                n.escape_default()
            );
        }
        if !byteback_protocol::has_snapshot_shape(n) {
            bail!(
                "the server listed {}, which is not a snapshot's name (YYYY-MM-DDTHH:MM+ZZZZ): a restore writes into ./<snapshot>",
                n.escape_default()
            );
        }
        if !seen.insert(n.as_str()) {
            bail!("the server listed snapshot {n} twice");
        }
    }
    Ok(())
}

/// The parent of a wire path, `None` at the top level.
pub fn parent_of(path: &[u8]) -> Option<&[u8]> {
    path.iter().rposition(|&b| b == b'/').map(|i| &path[..i])
}

/// Whether `dir` is a proper ancestor of `path`.
pub fn is_ancestor(dir: &[u8], path: &[u8]) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/'
}

/// Checks one manifest stream, entry by entry.
#[derive(Debug, Default)]
pub struct ManifestCheck {
    last: Option<Vec<u8>>,
    /// Directory entries on the way down to the last entry, outermost first.
    dirs: Vec<Vec<u8>>,
    /// Entries checked so far.
    pub entries: u64,
}

impl ManifestCheck {
    /// Checks the next entry of the stream; an error ends the listing or restore.
    pub fn check(&mut self, e: &ManifestEntry) -> Result<()> {
        let path = &e.entry.path;
        if let Err(err) = e.entry.validate() {
            bail!("the server sent an invalid manifest entry: {err}");
        }
        if let Some(last) = &self.last {
            if compare_paths(last, path) != Ordering::Less {
                bail!(
                    "the server's manifest is out of order or repeats a path: {} after {}",
                    display_path(path),
                    display_path(last)
                );
            }
        }
        while self.dirs.last().is_some_and(|d| !is_ancestor(d, path)) {
            self.dirs.pop();
        }
        if let Some(parent) = parent_of(path) {
            if self.dirs.last().map(Vec::as_slice) != Some(parent) {
                bail!(
                    "the server's manifest has {} without its parent directory before it",
                    display_path(path)
                );
            }
        }
        match &e.entry.kind {
            Kind::Dir => self.dirs.push(path.clone()),
            Kind::HardLink { target } if compare_paths(target, path) != Ordering::Less => bail!(
                "the server's manifest links {} to {}, which does not come before it",
                display_path(path),
                display_path(target)
            ),
            _ => {}
        }
        self.last = Some(path.clone());
        self.entries += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use byteback_protocol::Entry;

    fn me(path: &str, kind: Kind) -> ManifestEntry {
        ManifestEntry {
            entry: Entry {
                path: path.as_bytes().to_vec(),
                kind,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            },
            hash: [0; 32],
        }
    }

    fn run(entries: &[ManifestEntry]) -> Result<()> {
        let mut c = ManifestCheck::default();
        entries.iter().try_for_each(|e| c.check(e))
    }

    fn file(p: &str) -> ManifestEntry {
        me(p, Kind::File { size: 1 })
    }

    fn dir(p: &str) -> ManifestEntry {
        me(p, Kind::Dir)
    }

    fn link(p: &str, t: &str) -> ManifestEntry {
        me(
            p,
            Kind::HardLink {
                target: t.as_bytes().to_vec(),
            },
        )
    }

    #[test]
    fn accepts_a_walk() {
        run(&[
            dir("a"),
            dir("a/b"),
            file("a/b/c"),
            file("a/d"),
            link("a/e", "a/b/c"),
            file("b"),
            dir("c"),
        ])
        .unwrap();
    }

    #[test]
    fn refuses_what_a_hostile_server_sends() {
        let cases: Vec<(&str, Vec<ManifestEntry>, &str)> = vec![
            (
                "child without parent",
                vec![file("x/secret")],
                "without its parent",
            ),
            (
                "file as parent",
                vec![file("x"), file("x/secret")],
                "without its parent",
            ),
            (
                "symlink after its child",
                vec![
                    dir("x"),
                    file("x/secret"),
                    me(
                        "x",
                        Kind::Symlink {
                            target: b"/".to_vec(),
                        },
                    ),
                ],
                "out of order",
            ),
            ("repeat", vec![file("a"), file("a")], "out of order"),
            ("backwards", vec![file("b"), file("a")], "out of order"),
            (
                "link forward",
                vec![link("a", "b"), file("b")],
                "does not come before",
            ),
            (
                "link to itself",
                vec![link("a", "a")],
                "does not come before",
            ),
            ("dotdot", vec![file("../x")], "invalid"),
            ("absolute", vec![file("/etc/passwd")], "invalid"),
            ("empty component", vec![dir("a"), file("a//b")], "invalid"),
            ("link dotdot", vec![file("a"), link("b", "../a")], "invalid"),
            (
                "parent left",
                vec![dir("a"), dir("b"), file("a/c")],
                "out of order",
            ),
        ];
        for (what, entries, needle) in cases {
            let e = run(&entries).expect_err(what).to_string();
            assert!(e.contains(needle), "{what}: {e}");
        }
    }

    #[test]
    fn snapshot_names() {
        check_snapshots(&[
            "2026-11-27T03:00+0000".into(),
            "2026-11-28T03:00+0100.2".into(),
        ])
        .unwrap();
        for bad in [
            // `current` is the client's to ask for, never a listed snapshot.
            vec!["current".to_string()],
            vec!["etc".into()],
            vec!["/etc".into()],
            vec!["..".into()],
            vec!["a/../b".into()],
            vec!["x".into(), "x".into()],
        ] {
            assert!(check_snapshots(&bad).is_err(), "{bad:?}");
        }
    }
}

//! What must happen to one entry: a pure decision from the old manifest's
//! entry at its path, the new entry, and (once looked at) what is on disc
//! there. No syscalls here; [`super::apply`] carries the decision out.

use byteback_protocol::{Entry, Kind, ManifestEntry};
use rustix::fs::FileType;

/// What is on disc at an entry's path, as far as the decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OnDisc {
    pub kind: FileType,
    pub size: u64,
    pub mtime: (i64, u32),
    /// For a symlink: whether its target is the entry's (the caller reads
    /// the link only for a symlink entry meeting a symlink).
    pub same_target: bool,
}

/// What must happen to an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// `current` matched its manifest at the start and the manifest records
    /// the same object: record it with the old hash, touch nothing.
    Trusted { hash: [u8; 32] },
    /// Hard links, FIFOs, sockets and devices live only in the manifest;
    /// the commit's sweep removes whatever older object sits at the path.
    ManifestOnly,
    /// A directory is there already.
    KeepDir,
    /// Create the directory; `replace`: something else is at its path.
    MakeDir { replace: bool },
    /// The same symlink is there.
    KeepSymlink,
    /// (Re)create the symlink; whatever is at its path goes.
    MakeSymlink,
    /// The stored file has the entry's size and mtime. `hash`: the old
    /// manifest's, or `None` when an interrupted run wrote it (not in the
    /// manifest yet) and it must be hashed.
    KeepFile { hash: Option<[u8; 32]> },
    /// Receive the file: written at its own path when nothing is there
    /// (`in_place`), else rebuilt in `.byteback/partial`, with the stored
    /// copy as a basis when it is a non-empty regular file.
    Receive { in_place: bool, stored_basis: bool },
}

/// What kind of object an entry puts on disc, if any.
pub(super) fn disc_type(k: &Kind) -> Option<FileType> {
    match k {
        Kind::File { .. } => Some(FileType::RegularFile),
        Kind::Dir => Some(FileType::Directory),
        Kind::Symlink { .. } => Some(FileType::Symlink),
        _ => None,
    }
}

/// Whether the old object at the path is of another type on disc than the
/// new one (it may stay on disc until the commit's sweep).
pub(super) fn disc_type_changed(old: Option<&ManifestEntry>, e: &Entry) -> bool {
    old.is_some_and(|o| {
        disc_type(&o.entry.kind).is_some() && disc_type(&o.entry.kind) != disc_type(&e.kind)
    })
}

fn same_mtime(o: &Entry, e: &Entry) -> bool {
    o.mtime_sec == e.mtime_sec && o.mtime_nsec == e.mtime_nsec
}

/// The decision that needs no look at the disc, if there is one. `clean`:
/// `current` held exactly what its manifest names when this backup
/// started (nothing this backup did can have changed the entry's path yet:
/// every path is handled once, in order, and deletions wait for the commit).
pub(super) fn without_disc(old: Option<&ManifestEntry>, e: &Entry, clean: bool) -> Option<Action> {
    let trusted = old.filter(|o| {
        clean
            && o.entry.kind == e.kind
            && match e.kind {
                Kind::Dir | Kind::Symlink { .. } => true,
                Kind::File { .. } => same_mtime(&o.entry, e),
                _ => false,
            }
    });
    if let Some(o) = trusted {
        return Some(Action::Trusted { hash: o.hash });
    }
    match e.kind {
        Kind::Dir | Kind::Symlink { .. } | Kind::File { .. } => None,
        _ => Some(Action::ManifestOnly),
    }
}

/// The decision for a directory, symlink or file once its path was looked
/// at (`disc`: what is there, `None` when nothing is, or when its parent
/// was created by this backup).
pub(super) fn with_disc(old: Option<&ManifestEntry>, e: &Entry, disc: Option<&OnDisc>) -> Action {
    match &e.kind {
        Kind::Dir => match disc {
            Some(d) if d.kind == FileType::Directory => Action::KeepDir,
            Some(_) => Action::MakeDir { replace: true },
            None => Action::MakeDir { replace: false },
        },
        Kind::Symlink { .. } => match disc {
            Some(d) if d.kind == FileType::Symlink && d.same_target => Action::KeepSymlink,
            _ => Action::MakeSymlink,
        },
        Kind::File { size } => {
            let regular = disc.filter(|d| d.kind == FileType::RegularFile);
            if let Some(d) = regular {
                // Placed a second before the old manifest's mtime (see
                // `on_disc_mtime`): content the manifest does not vouch
                // for, or not committed yet; never kept by its size and
                // mtime, even should the client's file now have that
                // second (files stamped in whole seconds). Any time in
                // that second up to the manifest's nanoseconds: a store
                // keeping coarser times cut them.
                let offset = old.is_some_and(|o| {
                    o.entry.kind == e.kind
                        && d.mtime.0 == o.entry.mtime_sec.saturating_sub(1)
                        && d.mtime.1 <= o.entry.mtime_nsec
                });
                if !offset && d.size == *size && d.mtime == (e.mtime_sec, e.mtime_nsec) {
                    let hash = old
                        .filter(|o| o.entry.kind == e.kind && same_mtime(&o.entry, e))
                        .map(|o| o.hash);
                    return Action::KeepFile { hash };
                }
            }
            Action::Receive {
                in_place: disc.is_none(),
                stored_basis: regular.is_some_and(|d| d.size > 0),
            }
        }
        _ => Action::ManifestOnly,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, mtime: i64) -> Entry {
        Entry {
            path: b"a/b".to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: mtime,
            mtime_nsec: 7,
            xattrs: vec![],
        }
    }

    fn old(kind: Kind, mtime: i64) -> ManifestEntry {
        ManifestEntry {
            entry: entry(kind, mtime),
            hash: [9; 32],
        }
    }

    fn disc(kind: FileType, size: u64, mtime: i64, same_target: bool) -> OnDisc {
        OnDisc {
            kind,
            size,
            mtime: (mtime, 7),
            same_target,
        }
    }

    const F10: Kind = Kind::File { size: 10 };
    const REG: FileType = FileType::RegularFile;
    const DIR: FileType = FileType::Directory;
    const LNK: FileType = FileType::Symlink;

    #[test]
    fn decisions_without_a_look_at_the_disc() {
        let link = || Kind::Symlink {
            target: b"t".to_vec(),
        };
        let fifo = Kind::Fifo;
        #[rustfmt::skip]
        let table: Vec<(Option<ManifestEntry>, Entry, bool, Option<Action>)> = vec![
            // clean store, same record: trusted with the old hash
            (Some(old(F10, 5)), entry(F10, 5), true, Some(Action::Trusted { hash: [9; 32] })),
            (Some(old(Kind::Dir, 5)), entry(Kind::Dir, 6), true, Some(Action::Trusted { hash: [9; 32] })),
            (Some(old(link(), 5)), entry(link(), 6), true, Some(Action::Trusted { hash: [9; 32] })),
            // not clean, other mtime, other size, other kind: look
            (Some(old(F10, 5)), entry(F10, 5), false, None),
            (Some(old(F10, 5)), entry(F10, 6), true, None),
            (Some(old(F10, 5)), entry(Kind::File { size: 11 }, 5), true, None),
            (Some(old(Kind::Dir, 5)), entry(F10, 5), true, None),
            (None, entry(Kind::Dir, 5), true, None),
            // special kinds: the manifest only (trusted when recorded alike)
            (None, entry(fifo.clone(), 5), true, Some(Action::ManifestOnly)),
            (Some(old(fifo.clone(), 5)), entry(fifo.clone(), 5), false, Some(Action::ManifestOnly)),
            (Some(old(fifo.clone(), 5)), entry(fifo, 5), true, Some(Action::ManifestOnly)),
        ];
        for (i, (o, e, clean, want)) in table.into_iter().enumerate() {
            assert_eq!(without_disc(o.as_ref(), &e, clean), want, "row {i}");
        }
    }

    #[test]
    fn decisions_with_what_is_on_disc() {
        let link = Kind::Symlink {
            target: b"t".to_vec(),
        };
        let recv = |in_place, stored_basis| Action::Receive {
            in_place,
            stored_basis,
        };
        #[rustfmt::skip]
        let table: Vec<(Option<ManifestEntry>, Entry, Option<OnDisc>, Action)> = vec![
            (None, entry(Kind::Dir, 5), None, Action::MakeDir { replace: false }),
            (None, entry(Kind::Dir, 5), Some(disc(DIR, 0, 1, false)), Action::KeepDir),
            (None, entry(Kind::Dir, 5), Some(disc(REG, 3, 1, false)), Action::MakeDir { replace: true }),
            (None, entry(link.clone(), 5), None, Action::MakeSymlink),
            (None, entry(link.clone(), 5), Some(disc(LNK, 1, 1, true)), Action::KeepSymlink),
            (None, entry(link.clone(), 5), Some(disc(LNK, 1, 1, false)), Action::MakeSymlink),
            (None, entry(link, 5), Some(disc(DIR, 1, 1, true)), Action::MakeSymlink),
            // same size and mtime on disc: kept, hash from the manifest if it agrees
            (Some(old(F10, 5)), entry(F10, 5), Some(disc(REG, 10, 5, false)), Action::KeepFile { hash: Some([9; 32]) }),
            (Some(old(F10, 4)), entry(F10, 5), Some(disc(REG, 10, 5, false)), Action::KeepFile { hash: None }),
            (None, entry(F10, 5), Some(disc(REG, 10, 5, false)), Action::KeepFile { hash: None }),
            // a copy a second before the old manifest's mtime: received, even
            // when the client's file has that second now
            (Some(old(F10, 6)), entry(F10, 5), Some(disc(REG, 10, 5, false)), recv(false, true)),
            // ... its nanoseconds cut by a store keeping whole seconds
            (Some(old(F10, 6)), Entry { mtime_nsec: 0, ..entry(F10, 5) }, Some(OnDisc { mtime: (5, 0), ..disc(REG, 10, 5, false) }), recv(false, true)),
            // otherwise received: in place when nothing is there
            (None, entry(F10, 5), None, recv(true, false)),
            (Some(old(F10, 5)), entry(F10, 6), Some(disc(REG, 10, 5, false)), recv(false, true)),
            (Some(old(F10, 5)), entry(F10, 5), Some(disc(REG, 0, 5, false)), recv(false, false)),
            (None, entry(F10, 5), Some(disc(DIR, 10, 5, false)), recv(false, false)),
        ];
        for (i, (o, e, d, want)) in table.into_iter().enumerate() {
            assert_eq!(with_disc(o.as_ref(), &e, d.as_ref()), want, "row {i}");
        }
    }

    #[test]
    fn a_change_of_type_on_disc_is_noticed() {
        let o = old(F10, 5);
        assert!(disc_type_changed(Some(&o), &entry(Kind::Dir, 5)));
        assert!(disc_type_changed(Some(&o), &entry(Kind::Fifo, 5)));
        assert!(!disc_type_changed(
            Some(&o),
            &entry(Kind::File { size: 3 }, 5)
        ));
        assert!(!disc_type_changed(
            Some(&old(Kind::Fifo, 5)),
            &entry(F10, 5)
        ));
        assert!(!disc_type_changed(None, &entry(F10, 5)));
    }
}

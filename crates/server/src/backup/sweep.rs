//! Removing what `current` holds and the manifest does not name: the
//! commit's sweep, the early clean-up on a short disc, and an unverified
//! file written at its own path.

use std::os::fd::{AsFd, OwnedFd};

use byteback_protocol::os::sorted_dir::{let_go, level_cap, read_window, window_cap, Window};
use byteback_protocol::Kind;
use rustix::fs::FileType;

use super::{in_dir, BackupReceiver, MANIFEST, NO_SPACE, PARTIAL};
use crate::error::{shown, Error, IoContext, Result};
use crate::fsops::{self, split};
use crate::manifest::{ManifestReader, PeekableManifest};
use crate::store::{disk_path, META_DIR};

impl BackupReceiver {
    /// Keeps room before anything is written: when the last backup ran out
    /// of space (or the store is below `minpercent` free) and `current` holds
    /// what failed runs left, removes it now rather than at the commit —
    /// every object the last manifest does not name (new files of failed
    /// runs, kept partial ones included) and every kept partial rebuild.
    /// Returns a note for the log, if anything was removed.
    pub fn clean_leftovers_if_short(&mut self, minpercent: u32) -> Result<Option<String>> {
        let marker = || in_dir(&self.meta_path, NO_SPACE);
        let marked = fsops::lstat_at(&self.meta, NO_SPACE)
            .op("look at", marker)?
            .is_some();
        let short = marked
            || crate::space::measure(&self.current)
                .map(|s| s.percent_free() < f64::from(minpercent))
                .unwrap_or(false);
        if !short || self.start.clean {
            return Ok(None);
        }
        let mut deleted = 0;
        if self.start.has_manifest {
            let path = self.meta_path.join("manifest");
            let file = fsops::open_file(&self.meta, MANIFEST).op("open", || path.display())?;
            let mut manifest = ManifestReader::new(file, &path)
                .and_then(PeekableManifest::new)
                .map_err(Error::Manifest)?;
            remove_stale(&self.current, &[], true, &mut manifest, &mut deleted)?;
        }
        let partial = in_dir(&self.meta_path, PARTIAL);
        // Removed as they are listed: the names are not held.
        let mut failed = None;
        let listed = fsops::for_each_child(&self.partial, |n, _| {
            match fsops::remove_any(&self.partial, n) {
                Ok(()) => deleted += 1,
                Err(e) => {
                    failed =
                        Some(Err::<(), _>(e).op("remove", || format!("{partial}/{}", shown(n))));
                    return Err(std::io::Error::other("stopped"));
                }
            }
            Ok(())
        });
        if let Some(Err(e)) = failed {
            return Err(e);
        }
        listed.op("list", || &partial)?;
        fsops::remove_any(&self.meta, NO_SPACE).op("remove", marker)?;
        Ok((deleted > 0).then(|| {
            format!(
                "short of space: removed {deleted} objects that interrupted or failed backups left in current"
            )
        }))
    }
}

/// Removes the file a transfer was writing at its own client path.
pub(super) fn remove_in_place(current: &OwnedFd, path: &[u8]) -> Result<()> {
    let disk = disk_path(path);
    let (pdir, name) = split(&disk);
    let parent = fsops::open_dir(current, pdir).op("open the directory of", || shown(path))?;
    fsops::remove_any(&parent, name).op("remove", || shown(path))?;
    Ok(())
}

/// Bytes of names the sweep holds for the directories it is in (see
/// [`byteback_protocol::os::sorted_dir`]): a larger directory is read in
/// windows, each a further reading of it. A client could otherwise make
/// the server hold any number of names (one directory of millions).
const SWEEP_NAMES: usize = 8 << 20;
/// Bytes of names a directory may hold however deep it is.
const LEVEL_NAMES_MIN: usize = 1 << 20;

/// Deletes objects under `dir` that the manifest does not name with the same type.
pub(super) fn remove_stale(
    dir: &OwnedFd,
    prefix: &[u8],
    top: bool,
    manifest: &mut PeekableManifest,
    deleted: &mut u64,
) -> Result<()> {
    let mut sweep = Sweep {
        manifest,
        deleted,
        buf: vec![std::mem::MaybeUninit::uninit(); 32 << 10],
        levels: vec![],
    };
    sweep.dir(dir, prefix, top)
}

/// One directory being swept: a window of its names, and the next one.
struct Level {
    window: Window,
    next: usize,
}

/// A sweep under way: the windows of the directories it is in, one per
/// level (see [`Sweep::dir`]).
struct Sweep<'a> {
    manifest: &'a mut PeekableManifest,
    deleted: &'a mut u64,
    buf: Vec<std::mem::MaybeUninit<u8>>,
    levels: Vec<Level>,
}

impl Sweep<'_> {
    /// [`remove_stale`] of directory `dir`, below the levels on the stack.
    /// Over [`SWEEP_NAMES`], the largest windows above let go of their
    /// names and are read again after the name they are in.
    fn dir(&mut self, dir: &OwnedFd, prefix: &[u8], top: bool) -> Result<()> {
        // Client paths, for messages (`current` itself is the empty one).
        let here = || if top { "current".into() } else { shown(prefix) };
        let under = |name: &[u8]| {
            if top {
                shown(name)
            } else {
                format!("{}/{}", shown(prefix), shown(name))
            }
        };
        let held: usize = self.levels.iter().map(|l| l.window.held()).sum();
        let cap = level_cap(SWEEP_NAMES, held, LEVEL_NAMES_MIN);
        let window = read_window(dir.as_fd(), None, cap, &mut self.buf)
            .map_err(std::io::Error::from)
            .op("list", here)?;
        self.levels.push(Level { window, next: 0 });
        let depth = self.levels.len() - 1;
        let swept = self.entries(dir, prefix, top, depth, cap, &here, &under);
        self.levels.pop();
        swept
    }

    /// The names of the directory on level `depth`, window after window.
    #[allow(clippy::too_many_arguments)]
    fn entries(
        &mut self,
        dir: &OwnedFd,
        prefix: &[u8],
        top: bool,
        depth: usize,
        cap: usize,
        here: &dyn Fn() -> String,
        under: &dyn Fn(&[u8]) -> String,
    ) -> Result<()> {
        loop {
            let level = &mut self.levels[depth];
            let Some((name, mut t)) = level.window.get(level.next) else {
                if !level.window.more() {
                    return Ok(());
                }
                let after = level.window.last().map(<[u8]>::to_vec);
                level.window = read_window(dir.as_fd(), after.as_deref(), cap, &mut self.buf)
                    .map_err(std::io::Error::from)
                    .op("list", here)?;
                level.next = 0;
                continue;
            };
            level.next += 1;
            let disk_name = name.to_bytes().to_vec();
            if t == FileType::Unknown {
                if let Some(st) =
                    fsops::lstat_at(dir, &disk_name).op("look at", || under(&disk_name))?
                {
                    t = fsops::file_type(&st);
                }
            }
            // In `current` itself, a client name starting with `.byteback`
            // is stored as `.byteback-` and the name: the store's order is
            // the client's (no other name starts with `.byteback`).
            let client_name = if top && disk_name.starts_with(META_DIR) {
                if disk_name == META_DIR {
                    continue;
                }
                match disk_name.strip_prefix(b".byteback-".as_slice()) {
                    Some(n) if n.starts_with(META_DIR) => n,
                    _ => {
                        fsops::remove_any(dir, &disk_name).op("remove", || under(&disk_name))?;
                        continue;
                    }
                }
            } else {
                &disk_name[..]
            };
            let path = if prefix.is_empty() {
                client_name.to_vec()
            } else {
                [prefix, b"/", client_name].concat()
            };
            let keep = match self.manifest.seek(&path).map_err(Error::Manifest)? {
                Some(m) => matches!(
                    (&m.entry.kind, t),
                    (Kind::File { .. }, FileType::RegularFile)
                        | (Kind::Dir, FileType::Directory)
                        | (Kind::Symlink { .. }, FileType::Symlink)
                ),
                None => false,
            };
            if !keep {
                fsops::remove_any(dir, &disk_name).op("remove", || shown(&path))?;
                *self.deleted += 1;
            } else if t == FileType::Directory {
                let sub = fsops::open_dir(dir, &disk_name).op("open directory", || shown(&path))?;
                self.let_go_over_budget();
                self.dir(&sub, &path, false)?;
            }
        }
    }

    /// Over [`SWEEP_NAMES`], the largest windows on the stack let go.
    fn let_go_over_budget(&mut self) {
        let held: usize = self.levels.iter().map(|l| l.window.held()).sum();
        let mut windows: Vec<_> = self
            .levels
            .iter_mut()
            .map(|l| (&mut l.window, &mut l.next))
            .collect();
        let_go(&mut windows, held, window_cap(SWEEP_NAMES));
    }
}

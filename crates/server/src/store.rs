//! The store: `<store>/<host>/current` plus read-only snapshots beside it.
//!
//! On btrfs, `current` is a subvolume and snapshots are read-only btrfs
//! snapshots. Elsewhere a fallback keeps the same layout: a snapshot is a
//! hard-link copy of `current` with every write bit removed (the server only
//! ever replaces files in `current` by rename, so the shared inodes never change).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use byteback_protocol::validate_host_name;
use rustix::fs::{FileType, Mode, OFlags};

use crate::{btrfs, fsops, time};

/// Name of the reserved directory inside `current` (manifest, temp files).
pub const META_DIR: &[u8] = META_DIR_NAME.as_bytes();
/// [`META_DIR`] as text, for paths in messages.
pub const META_DIR_NAME: &str = ".byteback";
/// Prefix that escapes client top-level names which start with `.byteback`.
const ESCAPE: &[u8] = b".byteback-";
/// Prefix of a hard-link snapshot being deleted, in its host's directory.
const DELETING: &str = ".deleting-";

/// Maps a client path to its path inside `current`: top-level names starting
/// with `.byteback` get a prefix, so no client path can reach [`META_DIR`].
pub fn disk_path(path: &[u8]) -> Vec<u8> {
    if path.starts_with(META_DIR) {
        [ESCAPE, path].concat()
    } else {
        path.to_vec()
    }
}

/// A store root.
pub struct Store {
    /// Path of the store root (for messages).
    pub root: PathBuf,
    fd: OwnedFd,
}

impl Store {
    /// Opens an existing store directory.
    pub fn open(root: &Path) -> Result<Self> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .op("open store", || root.display())?;
        Ok(Store {
            root: root.to_path_buf(),
            fd,
        })
    }

    /// The same store, through a duplicate of its descriptor.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Store {
            root: self.root.clone(),
            fd: self
                .fd
                .try_clone()
                .op("duplicate the descriptor of", || self.root.display())?,
        })
    }

    /// The store root directory fd.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Names of hosts in the store: directories with a host's name that
    /// hold `current` or a snapshot. Others (an admin's `bin/` or
    /// `scripts/` in the store account's home) are no host, as 1.x took
    /// only directories with `current` (see [`Self::not_hosts`]).
    pub fn hosts(&self) -> Result<Vec<String>> {
        Ok(self.split_hosts()?.0)
    }

    /// Directories with a host's name that hold neither `current` nor a
    /// snapshot: never pruned, verified or reported as hosts.
    pub fn not_hosts(&self) -> Result<Vec<String>> {
        Ok(self.split_hosts()?.1)
    }

    fn split_hosts(&self) -> Result<(Vec<String>, Vec<String>)> {
        let (mut hosts, mut others) = (vec![], vec![]);
        for (name, t) in fsops::list_dir_typed(&self.fd).op("list", || self.root.display())? {
            if t != FileType::Directory {
                continue;
            }
            let Ok(s) = String::from_utf8(name) else {
                continue;
            };
            if validate_host_name(&s).is_err() || s.starts_with('.') {
                continue;
            }
            match self.looks_like_a_host(&s) {
                true => hosts.push(s),
                false => others.push(s),
            }
        }
        Ok((hosts, others))
    }

    /// Whether directory `name` holds `current` or a snapshot (one that
    /// cannot be read is taken for a host: its errors are then named).
    fn looks_like_a_host(&self, name: &str) -> bool {
        let current = [name.as_bytes(), b"/current"].concat();
        if !matches!(fsops::lstat_at(&self.fd, &current), Ok(None)) {
            return true;
        }
        let Ok(dir) = fsops::open_dir(&self.fd, name.as_bytes()) else {
            return true;
        };
        match fsops::list_dir(&dir) {
            Ok(names) => names.iter().any(|n| {
                std::str::from_utf8(n).is_ok_and(|n| crate::time::parse_name(n).is_some())
            }),
            Err(_) => true,
        }
    }

    /// Opens a host's directory, creating it (and `current`) when `create`.
    pub fn host(&self, name: &str, create: bool) -> Result<HostStore> {
        validate_host_name(name).map_err(|e| Error::Refused(e.to_string()))?;
        let path = self.root.join(name);
        if create {
            fsops::ensure_dir_only(&self.fd, name.as_bytes(), 0o700)
                .op("create", || path.display())?;
        }
        let fd = fsops::open_dir(&self.fd, name.as_bytes()).map_err(|e| {
            Error::io("open", path.display(), e)
                .context(format!("no host {name:?} in store {}", self.root.display()))
        })?;
        let btrfs = btrfs::is_btrfs(&fd);
        let h = HostStore {
            name: name.to_string(),
            path,
            fd,
            btrfs,
        };
        let current = || h.path.join("current").display().to_string();
        if create
            && fsops::lstat_at(&h.fd, b"current")
                .op("look at", current)?
                .is_none()
        {
            if btrfs {
                btrfs::create_subvolume(&h.fd, OsStr::new("current"))
                    .op("create subvolume", current)?;
            } else {
                rustix::fs::mkdirat(&h.fd, "current", Mode::from_raw_mode(0o700))
                    .op("create", current)?;
            }
        }
        Ok(h)
    }
}

/// One host's part of the store.
pub struct HostStore {
    /// Host name.
    pub name: String,
    /// Path of `<store>/<host>`.
    pub path: PathBuf,
    fd: OwnedFd,
    /// Whether the store is on btrfs.
    pub btrfs: bool,
}

/// Held shared by a backup waiting for its host's lock.
const WANTED: &[u8] = b".lock-wanted";

impl HostStore {
    /// The host directory fd.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Another handle on the same host directory.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(HostStore {
            name: self.name.clone(),
            path: self.path.clone(),
            fd: self
                .fd
                .try_clone()
                .op("duplicate the descriptor of", || self.path.display())?,
            btrfs: self.btrfs,
        })
    }

    /// Takes the host's exclusive lock for a backup, or says who holds it.
    /// The lock is an flock, so a killed process never leaves it behind.
    /// While it waits, the backup holds [`WANTED`] shared: a verify of
    /// `current` lets go of the host's lock when it sees that (within a
    /// second; see `verify`), so a backup is never refused for a check.
    pub fn lock(&self) -> Result<File> {
        let wanted = fsops::open_lock(&self.fd, WANTED).op("open", || {
            self.path.join(".lock-wanted").display().to_string()
        })?;
        rustix::fs::flock(&wanted, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| Error::io("lock", self.path.join(".lock-wanted").display(), e.into()))?;
        // Up to 15 s: a verify lets go within a second or two (the piece
        // it reads), a backup or a restore holds it much longer.
        self.lock_within(300)
    }

    /// Takes the host's exclusive lock, trying `tries` times 50 ms apart
    /// (a listing of restores looks at it shared for an instant), or says
    /// who holds it.
    pub fn lock_within(&self, tries: u32) -> Result<File> {
        let lock = || self.path.join(".lock").display().to_string();
        let f = fsops::open_lock(&self.fd, b".lock").op("open", lock)?;
        let mut tried = 0;
        let got = loop {
            match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Err(rustix::io::Errno::WOULDBLOCK) if tried < tries => {
                    tried += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => break r,
            }
        };
        match got {
            Ok(()) => Ok(f),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Store(format!(
                "another backup of host {} is running, or a restore is reading its current; \
                 refusing to start now",
                self.name
            ))),
            Err(e) => Err(Error::io("lock", lock(), e.into())),
        }
    }

    /// The file a backup waiting for the host's lock holds shared (see
    /// [`HostStore::lock`]).
    pub fn wanted(&self) -> Result<File> {
        fsops::open_lock(&self.fd, WANTED).op("open", || {
            self.path.join(".lock-wanted").display().to_string()
        })
    }

    /// Takes the host's lock shared, so no backup changes `current` while a
    /// restore reads it (a backup takes it exclusive, and fails rather than
    /// wait), or says a backup holds it. Opened read-only (and never
    /// blocking, whatever is there), never created: where there is none, no
    /// backup ever ran, and none is needed (`None`). One this user may not
    /// open is an error: whether a backup runs is then unknown.
    pub fn lock_shared(&self) -> Result<Option<File>> {
        let lock = || self.path.join(".lock").display().to_string();
        let f = match rustix::fs::openat(
            &self.fd,
            ".lock",
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::CLOEXEC
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            // No backup ever ran here, or none can.
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(Error::io("open", lock(), e.into())),
        };
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Store(format!(
                "a backup of host {} is running, so its current is changing: restore from a \
                 snapshot (--snapshot), or again once the backup has ended",
                self.name
            ))),
            Err(e) => Err(Error::io("lock", lock(), e.into())),
        }
    }

    /// Whether a backup of the host may hold its lock now (also when the
    /// lock cannot be looked at).
    pub fn backup_running(&self) -> bool {
        self.lock_shared().is_err()
    }

    /// Opens `current` (must exist).
    pub fn current(&self) -> Result<OwnedFd> {
        fsops::open_dir(&self.fd, b"current")
            .op("open", || self.path.join("current").display().to_string())
    }

    /// Opens a snapshot (or `current`) by name.
    pub fn open_snapshot(&self, name: &str) -> Result<OwnedFd> {
        byteback_protocol::validate_snapshot_name(name)
            .map_err(|e| Error::Refused(e.to_string()))?;
        if name != "current" && time::parse_name(name).is_none() {
            return Err(Error::Refused(format!("{name:?} is not a snapshot name")));
        }
        fsops::open_dir(&self.fd, name.as_bytes()).map_err(|e| {
            Error::io("open", self.path.join(name).display(), e)
                .context(format!("no snapshot {name:?} of host {}", self.name))
        })
    }

    /// Snapshot `name` (not `current`) opened for a restore to read, its
    /// directory locked shared while the descriptor (or a duplicate) is
    /// open: a prune passes it over (see [`Self::lock_for_deletion`]), so a
    /// long restore of an old snapshot is not cut off halfway by a prune
    /// that another host's backup started. Refused if it is being deleted;
    /// `None` if the lock cannot be had otherwise (read it unheld).
    pub fn open_snapshot_to_read(&self, name: &str) -> Result<Option<OwnedFd>> {
        let fd = self.open_snapshot(name)?;
        let being_deleted = || {
            Error::Store(format!(
                "snapshot {name:?} of host {} is being deleted",
                self.name
            ))
        };
        match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(being_deleted()),
            Err(_) => return Ok(None),
        }
        // Opened, then deleted by a prune, then locked: no longer its name.
        let again = self.open_snapshot(name).map_err(|_| being_deleted())?;
        let id = |fd: &OwnedFd| rustix::fs::fstat(fd).map(|st| (st.st_dev, st.st_ino));
        match (id(&fd), id(&again)) {
            (Ok(a), Ok(b)) if a == b => Ok(Some(fd)),
            _ => Err(being_deleted()),
        }
    }

    /// Whether snapshot `name` is gone or being deleted (for a reader that
    /// passes over one pruned since it was listed).
    pub fn snapshot_going(&self, name: &str) -> bool {
        match fsops::open_dir(&self.fd, name.as_bytes()) {
            Err(e) => e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()),
            Ok(fd) => matches!(
                rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockShared),
                Err(rustix::io::Errno::WOULDBLOCK)
            ),
        }
    }

    /// The host's one hold on a snapshot against prunes (see
    /// [`Self::open_snapshot_to_read`]), if no other session has it: a
    /// client holding many sessions open cannot keep all of its host's
    /// snapshots from prunes (which would then delete other hosts'
    /// history instead), only one at a time.
    ///
    /// The lock is the host directory's own (nothing else locks it): no
    /// file is made for it, so a session that is refused changes nothing,
    /// and a store mounted read-only for a disaster recovery holds too.
    pub fn restore_hold(&self) -> Result<Option<OwnedFd>> {
        let f = fsops::open_dir(&self.fd, b"").op("open", || self.path.display())?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io("lock", self.path.display(), e.into())),
        }
    }

    /// Locks snapshot `name` for its deletion (held until the descriptor is
    /// closed): `None` while a restore reads it (see
    /// [`Self::open_snapshot_to_read`]).
    pub fn lock_for_deletion(&self, name: &str) -> Result<Option<OwnedFd>> {
        let fd = self.open_snapshot(name)?;
        match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(fd)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io("lock", self.path.join(name).display(), e.into())),
        }
    }

    /// Snapshot names with their times, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(String, i64)>> {
        let mut out = vec![];
        for (name, t) in fsops::list_dir_typed(&self.fd).op("list", || self.path.display())? {
            if t != FileType::Directory {
                continue;
            }
            let Ok(s) = String::from_utf8(name) else {
                continue;
            };
            if let Some(ts) = time::parse_name(&s) {
                out.push((s, ts));
            }
        }
        out.sort_by(|a, b| time::cmp_names(&a.0, &b.0));
        Ok(out)
    }

    /// Directories in the host's folder that are neither `current` nor
    /// named as a snapshot (hidden ones are byteback's own): never listed,
    /// restored or pruned, so the space they hold is the admin's to free.
    pub fn strays(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = fsops::list_dir_typed(&self.fd)
            .op("list", || self.path.display())?
            .into_iter()
            .filter(|(name, t)| {
                *t == FileType::Directory
                    && name.first() != Some(&b'.')
                    && name != b"current"
                    && std::str::from_utf8(name).map_or(true, |s| time::parse_name(s).is_none())
            })
            .map(|(name, _)| crate::error::shown(&name))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Takes a read-only snapshot of `current` named after `now`, unless the
    /// newest is younger than `min_interval`. Returns the name, or why not.
    pub fn snapshot(
        &self,
        now: i64,
        min_interval: i64,
    ) -> Result<std::result::Result<String, String>> {
        let snapshots = self.snapshots()?;
        // One a wrong clock dated in the future never holds the next back
        // (it would for as long as the clock was off): said, and passed by.
        let slack = now.saturating_add(crate::prune::FUTURE_SLACK);
        for (name, _) in snapshots.iter().filter(|(_, ts)| *ts > slack) {
            tracing::warn!(
                "snapshot {}/{name} is dated in the future (a clock set wrong when it was taken?); it is neither the newest nor ever pruned: delete it by hand once checked",
                self.name
            );
        }
        if let Some((last, ts)) = snapshots.iter().rev().find(|(_, ts)| *ts <= slack) {
            if now - ts < min_interval {
                return Ok(Err(format!(
                    "no snapshot taken: the newest, {last}, is younger than the minimum interval of {min_interval} s"
                )));
            }
        }
        let base = time::format_name(now, time::local_offset(now));
        // After the highest suffix of this minute, never a lower one a
        // prune freed: a newer snapshot must sort after the older ones.
        let taken = (snapshots.iter())
            .filter_map(|(s, _)| match s.strip_prefix(base.as_str())? {
                "" => Some(0),
                rest => rest.strip_prefix('.')?.parse::<u64>().ok(),
            })
            .max();
        let (mut name, mut n) = match taken {
            Some(m) => (format!("{base}.{}", m + 1), m + 2),
            None => (base.clone(), 1),
        };
        let here = |n: &str| self.path.join(n).display().to_string();
        while fsops::lstat_at(&self.fd, name.as_bytes())
            .op("look at", || here(&name))?
            .is_some()
        {
            name = format!("{base}.{n}");
            n += 1;
        }
        // Leftovers of fallback snapshots that failed (the caller holds the
        // host's lock, so none is in the making).
        for leftover in fsops::list_dir(&self.fd).op("list", || self.path.display())? {
            if leftover.starts_with(b".snapshot-") {
                fsops::remove_any(&self.fd, &leftover)
                    .op("remove", || here(&String::from_utf8_lossy(&leftover)))?;
            }
        }
        let current = self.current()?;
        if self.btrfs && btrfs::is_subvolume(&current) {
            btrfs::snapshot_readonly(&current, &self.fd, OsStr::new(&name))
                .op("snapshot", || here("current"))?;
        } else {
            let tmp = format!(".snapshot-{name}");
            let made = (|| -> Result<()> {
                rustix::fs::mkdirat(&self.fd, tmp.as_str(), Mode::from_raw_mode(0o700))
                    .op("create", || here(&tmp))?;
                let dst = fsops::open_dir(&self.fd, tmp.as_bytes()).op("open", || here(&tmp))?;
                link_copy(&current, &dst)
                    .op("copy current into the fallback snapshot", || here(&tmp))?;
                make_read_only(&dst).op("make read-only", || here(&tmp))?;
                rustix::fs::fchmod(&dst, Mode::from_raw_mode(0o555))
                    .op("make read-only", || here(&tmp))?;
                rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name.as_str())
                    .op("rename into place", || here(&name))?;
                Ok(())
            })();
            if let Err(e) = made {
                // Never left behind: it would hold a copy of current for good.
                let _ = fsops::remove_any(&self.fd, tmp.as_bytes());
                return Err(e);
            }
        }
        // The snapshot is there: failing to sync its directory (out of
        // space, say) must not make the caller take it again.
        if let Err(e) = fsops::fsync(&self.fd) {
            tracing::warn!(
                "snapshot {name} taken, but cannot sync {}: {e}",
                self.path.display()
            );
        }
        Ok(Ok(name))
    }

    /// Deletes a snapshot.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        if time::parse_name(name).is_none() {
            return Err(Error::Refused(format!("{name:?} is not a snapshot name")));
        }
        let path = || self.path.join(name).display().to_string();
        let fd = fsops::open_dir(&self.fd, name.as_bytes()).op("open", path)?;
        if btrfs::is_subvolume(&fd) {
            // Without CAP_SYS_ADMIN a read-only snapshot cannot be deleted
            // (EROFS/EPERM); its owner may make it writable first.
            drop(fd);
            let r = btrfs::delete_subvolume(&self.fd, OsStr::new(name));
            let r = match r {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EPERM)) => {
                    fsops::open_dir(&self.fd, name.as_bytes()).and_then(|fd| {
                        btrfs::clear_read_only(&fd)?;
                        // Not deleted after all: read-only again, as a
                        // snapshot must be.
                        btrfs::delete_subvolume(&self.fd, OsStr::new(name)).inspect_err(|_| {
                            let _ = btrfs::set_read_only(&fd);
                        })
                    })
                }
                r => r,
            };
            r.op("delete subvolume", path)?;
        } else {
            drop(fd);
            // A hard-link copy goes file by file: renamed out of the
            // snapshots' names first (durably), so a deletion cut short
            // leaves no directory that passes for a snapshot (without its
            // `.byteback`, a 1.x one), and what it left is removed by the
            // next deletion.
            let doomed = format!("{DELETING}{name}");
            // One of that name left by a deletion cut short goes first.
            self.remove_doomed()?;
            rustix::fs::renameat(&self.fd, name, &self.fd, doomed.as_str())
                .map_err(io::Error::from)
                .and_then(|()| fsops::fsync(&self.fd))
                .op("rename", path)?;
            self.remove_doomed()?;
        }
        Ok(())
    }

    /// Removes what deletions of hard-link snapshots left (see
    /// [`HostStore::delete_snapshot`]).
    fn remove_doomed(&self) -> Result<()> {
        let listed =
            fsops::list_dir_typed(&self.fd).op("list", || self.path.display().to_string())?;
        for (name, _) in listed {
            if name.starts_with(DELETING.as_bytes()) {
                fsops::remove_any(&self.fd, &name).op("remove", || {
                    self.path
                        .join(OsStr::from_bytes(&name))
                        .display()
                        .to_string()
                })?;
            }
        }
        Ok(())
    }
}

/// Recreates the tree of `src` in `dst`: directories made, files hard-linked, symlinks copied.
fn link_copy(src: &OwnedFd, dst: &OwnedFd) -> io::Result<()> {
    fsops::for_each_child(src, |name, t| {
        let n = OsStr::from_bytes(name);
        match t {
            FileType::Directory => {
                rustix::fs::mkdirat(dst, n, Mode::from_raw_mode(0o700))?;
                let s = fsops::open_dir(src, name)?;
                let d = fsops::open_dir(dst, name)?;
                link_copy(&s, &d)?;
            }
            FileType::Symlink => {
                let target = fsops::read_link(src, name)?;
                fsops::symlink(dst, name, &target)?;
            }
            FileType::RegularFile => {
                rustix::fs::linkat(src, n, dst, n, rustix::fs::AtFlags::empty())?;
            }
            _ => {}
        }
        Ok(())
    })
}

/// Removes every write bit under `dir` (files and directories).
fn make_read_only(dir: &OwnedFd) -> io::Result<()> {
    fsops::for_each_child(dir, |name, t| {
        match t {
            FileType::Directory => {
                let d = fsops::open_dir(dir, name)?;
                make_read_only(&d)?;
                rustix::fs::fchmod(&d, Mode::from_raw_mode(0o555))?;
            }
            FileType::RegularFile => {
                let f = rustix::fs::openat(
                    dir,
                    OsStr::from_bytes(name),
                    OFlags::PATH | OFlags::NOFOLLOW,
                    Mode::empty(),
                )?;
                let st = rustix::fs::fstat(&f)?;
                let mode = st.st_mode & 0o555;
                // fchmod does not work on O_PATH fds; use the /proc link of this fd.
                let _ = f.as_fd();
                rustix::fs::chmodat(
                    dir,
                    OsStr::from_bytes(name),
                    Mode::from_raw_mode(mode),
                    rustix::fs::AtFlags::empty(),
                )?;
            }
            _ => {}
        }
        Ok(())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A restore's shared lock: none needed where no backup ever ran (no
    /// lock file, nothing created), refused while a backup holds it, and
    /// it holds a backup off; a backup starting while a listing looks for
    /// an instant still starts.
    #[test]
    fn the_shared_lock_keeps_backups_off_and_needs_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        assert!(host.lock_shared().unwrap().is_none());
        assert!(!dir.path().join("h/.lock").exists(), "created by a reader");
        assert!(!host.backup_running());
        let backup = host.lock().unwrap();
        assert!(host.backup_running());
        let e = host.lock_shared().unwrap_err().to_string();
        assert!(e.contains("a backup of host h is running"), "{e}");
        drop(backup);
        let reading = host.lock_shared().unwrap().expect("a lock file now");
        let e = host.lock().unwrap_err().to_string();
        assert!(e.contains("a restore is reading its current"), "{e}");
        drop(reading);
        // Released within the tries: the backup starts.
        let h2 = store.host("h", false).unwrap();
        let brief = h2.lock_shared().unwrap().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(120));
            drop(brief);
        });
        assert!(host.lock().is_ok());
        t.join().unwrap();
    }

    /// A hard-link snapshot is renamed out of the snapshots' names before
    /// it is removed, so one whose deletion was cut short never passes for
    /// a snapshot; what such a deletion left goes with the next one.
    /// A snapshot is "going" for a reader that passes such over only when
    /// it is gone or a deletion holds it; another reader's hold, or an
    /// error opening it, is no sign of that.
    #[test]
    fn a_snapshot_is_going_only_when_gone_or_being_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        let name = "2026-11-01T03:00+0000";
        assert!(host.snapshot_going(name));
        std::fs::create_dir(dir.path().join("h").join(name)).unwrap();
        assert!(!host.snapshot_going(name));
        let reading = host.open_snapshot_to_read(name).unwrap().unwrap();
        assert!(!host.snapshot_going(name));
        drop(reading);
        let deleting = host.lock_for_deletion(name).unwrap().unwrap();
        assert!(host.snapshot_going(name));
        drop(deleting);
        // Not a directory (so no deletion made it so): an error, not going.
        let other = "2026-11-02T03:00+0000";
        std::fs::write(dir.path().join("h").join(other), b"").unwrap();
        assert!(!host.snapshot_going(other));
    }

    /// Snapshots of one minute take the suffix after the highest one,
    /// never one a prune freed, so the newest sorts last.
    #[test]
    fn a_snapshot_of_the_same_minute_sorts_after_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        std::fs::create_dir_all(dir.path().join("h/current/etc")).unwrap();
        let now = 1_795_000_000;
        let names: Vec<String> = (0..3)
            .map(|_| host.snapshot(now, 0).unwrap().unwrap())
            .collect();
        let base = &names[0];
        assert_eq!(names[1..], [format!("{base}.1"), format!("{base}.2")]);
        host.delete_snapshot(&names[1]).unwrap();
        let next = host.snapshot(now, 0).unwrap().unwrap();
        assert_eq!(next, format!("{base}.3"));
        let listed: Vec<String> = host.snapshots().unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(listed.last(), Some(&next), "{listed:?}");
    }

    #[test]
    fn a_hard_link_snapshot_is_renamed_away_before_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        let h = dir.path().join("h");
        let snap = "2026-11-01T03:00+0000";
        std::fs::create_dir_all(h.join(snap).join("etc")).unwrap();
        std::fs::write(h.join(snap).join("etc/f"), b"x").unwrap();
        // What a deletion cut short left: of an older snapshot, and of this
        // very one (whose name was then taken again: a rename onto it
        // would fail for ever).
        let older = h.join(".deleting-2026-10-01T03:00+0000");
        std::fs::create_dir_all(older.join("usr")).unwrap();
        let left = h.join(format!(".deleting-{snap}"));
        std::fs::create_dir_all(left.join("var")).unwrap();
        std::fs::write(left.join("var/g"), b"y").unwrap();
        host.delete_snapshot(snap).unwrap();
        let names: Vec<_> = std::fs::read_dir(&h)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("2026-")), "{names:?}");
    }
}

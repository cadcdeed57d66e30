//! Running out of space creating or renaming something. btrfs needs
//! metadata space to create a file, a directory or a symlink and to rename
//! one, and a disc of small files (stored inline, in metadata) fills its
//! metadata first, with the free data space saying nothing of it. Such an
//! operation is tried again after a round of making room: the first round
//! commits the filesystem, each later one deletes one snapshot (see
//! [`crate::pruner::make_room_for_metadata`]). A backup that fails for want
//! of space all the same deletes one more snapshot on its way out (see
//! [`BackupReceiver::after_no_space`]), so the next one has room: a full
//! disc never fails every backup from then on.
//!
//! A backup deletes at most [`ROOM_ROUNDS`] less one snapshot this way,
//! and a host's backups together at most [`PER_HOST_PER_DAY`] a day
//! (counted in `<host>/.byteback-room`), so a client that reconnects again
//! and again cannot delete other hosts' history five at a time.

use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::pruner::{self, ROOM_ROUNDS};
use crate::store::{HostStore, Store};

use super::BackupReceiver;

/// Most snapshots a host's backups delete for metadata in a day (UTC):
/// two backups' worth, a failing one and its retry.
pub const PER_HOST_PER_DAY: usize = 2 * (ROOM_ROUNDS as usize - 1);

/// Where a host's deletions for metadata are counted: `DAY COUNT`.
const COUNTED: &str = ".byteback-room";

/// What making room needs, and what this backup deleted for it.
pub struct Room {
    store: Store,
    host: HostStore,
    config: StoreConfig,
    /// The time the backup runs as (`--now`), else the clock's.
    now: Option<i64>,
    /// Snapshots deleted so far: at most [`ROOM_ROUNDS`] less one per
    /// backup, however many operations need room.
    deleted: usize,
    /// A deletion could not be counted on disc: no more for this backup.
    uncounted: bool,
}

/// Whether `e` is, at its root, "no space left on device" (a quota is not:
/// deleting snapshots, of any host, is for a full disc).
pub fn is_no_space(e: &Error) -> bool {
    e.io_error().and_then(std::io::Error::raw_os_error) == Some(libc::ENOSPC)
}

impl Room {
    /// Making room in `store` (configured by `config`) for a backup run as
    /// of `now`.
    pub fn new(
        store: &Store,
        host: &HostStore,
        config: &StoreConfig,
        now: Option<i64>,
    ) -> Result<Self> {
        Ok(Room {
            store: store.try_clone()?,
            host: host.try_clone()?,
            config: config.clone(),
            now,
            deleted: 0,
            uncounted: false,
        })
    }

    fn now(&self) -> i64 {
        self.now.unwrap_or_else(crate::time::now)
    }

    /// Why no snapshot may be deleted now, if none may.
    fn refusal(&self) -> Option<String> {
        if self.deleted >= usize::from(ROOM_ROUNDS - 1) {
            return Some(format!(
                "this backup deleted {} already to make room for metadata",
                ROOM_ROUNDS - 1
            ));
        }
        if self.uncounted {
            return Some(format!(
                "its last deletion could not be counted in {}",
                self.host.path.join(COUNTED).display()
            ));
        }
        match self.counted() {
            Ok(today) if today < PER_HOST_PER_DAY => None,
            Ok(today) => Some(format!(
                "backups of {} deleted {today} already today (UTC) to make room for metadata; \
                 the next day allows more (or run byteback-prune)",
                self.host.name
            )),
            Err(why) => Some(why),
        }
    }

    /// The deletions counted for today (UTC). A count that cannot be read
    /// (written half by a crash, say) is today's whole budget when the file
    /// was written today: the budget fails closed, for a day at most.
    fn counted(&self) -> std::result::Result<usize, String> {
        let day = self.now().div_euclid(86_400);
        let path = || self.host.path.join(COUNTED).display().to_string();
        let file = match crate::fsops::open_file(self.host.fd(), COUNTED.as_bytes()) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("cannot read {}: {e}", path())),
        };
        let mut text = String::new();
        let read = std::io::Read::read_to_string(&mut std::io::Read::take(&file, 64), &mut text);
        let mut f = text.split_whitespace().map(str::parse::<i64>);
        match (read, f.next(), f.next()) {
            (Ok(_), Some(Ok(d)), Some(Ok(_))) if d < day => Ok(0),
            (Ok(_), Some(Ok(_)), Some(Ok(n))) => Ok(usize::try_from(n).unwrap_or(PER_HOST_PER_DAY)),
            _ => match crate::fsops::mtime_of(&file) {
                Ok((t, _)) if t.div_euclid(86_400) < day => Ok(0),
                _ => Err(format!("cannot make out the count in {}", path())),
            },
        }
    }

    /// Counts `n` more deletions, for this backup and for the host's day.
    /// A count that cannot be written (the disc is full) is said, and this
    /// backup deletes no more.
    fn count(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.deleted += n;
        let day = self.now().div_euclid(86_400);
        let line = format!("{day} {}\n", self.counted().unwrap_or(0) + n);
        if let Err(e) =
            crate::fsops::write_small(self.host.fd(), COUNTED.as_bytes(), line.as_bytes())
        {
            self.uncounted = true;
            tracing::warn!(
                "cannot count deletions for metadata in {}: {e}; this backup deletes no more",
                self.host.path.join(COUNTED).display()
            );
        }
    }

    /// `e`, from `what`, ran out of space: one more round of making room
    /// (`round` counts them), or, after the last, the error to fail with.
    /// `grown`: what the backup wrote so far and the usage log does not
    /// have yet (see [`BackupReceiver::unrecorded`]), for the growth guard.
    fn next_round(&mut self, e: Error, what: &str, round: &mut u8, grown: u64) -> Result<()> {
        *round += 1;
        if *round > ROOM_ROUNDS {
            let hint = match crate::btrfs::is_btrfs(self.store.fd()) {
                true => "btrfs may have no room left for metadata (see `btrfs filesystem usage`; `btrfs balance start -dusage=50` on the store's filesystem gives it some)",
                false => "the filesystem may be out of inodes or refuse it for another reason (see `df -i`)",
            };
            return Err(Error::Store(format!(
                "no space left on device {what}, even after committing the filesystem and deleting up to {} snapshots one by one; {hint}: {e}",
                ROOM_ROUNDS - 1
            )));
        }
        let refusal = self.refusal();
        let (now, r) = (self.now(), *round);
        let grown = Some((&self.host, grown));
        let n = pruner::make_room_for_metadata(
            &self.store,
            &self.config,
            now,
            what,
            r,
            refusal,
            grown,
        )?;
        self.count(n);
        Ok(())
    }
}

/// Runs `op` (which `what` describes), making room and running it again
/// while it runs out of space, with `room` (none: the error stands).
/// Before a backup's receiver exists; see [`BackupReceiver::with_room`].
pub fn retry<T>(
    room: &mut Option<Room>,
    what: impl Fn() -> String,
    mut op: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut round = 0;
    loop {
        match (op(), room.as_mut()) {
            (Err(e), Some(room)) if is_no_space(&e) => {
                room.next_round(e, &what(), &mut round, 0)?
            }
            (r, _) => return r,
        }
    }
}

impl BackupReceiver {
    /// Runs `op` (which `what` describes: "creating \"PATH\""), making room
    /// and running it again while it runs out of space. Each round first
    /// marks the store short of space and drops the partial copies no
    /// transfer in progress uses.
    pub fn with_room<T>(
        &mut self,
        what: impl Fn() -> String,
        mut op: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let mut room = self.room.take();
        let mut round = 0;
        let result = loop {
            match (op(self), room.as_mut()) {
                (Err(e), Some(room)) if is_no_space(&e) => {
                    let what = what();
                    self.before_making_room(&what);
                    if let Err(e) = room.next_round(e, &what, &mut round, self.unrecorded()) {
                        break Err(e);
                    }
                }
                (r, _) => break r,
            }
        };
        self.room = room;
        result
    }

    /// Marks the store short of space and drops idle partial copies (a
    /// failure to do either is said, and making room goes on).
    fn before_making_room(&mut self, what: &str) {
        if self.work.committing {
            // Nothing of that is left, and a marker now would reach the
            // snapshot.
            return;
        }
        self.note_no_space();
        match self.drop_idle_partials() {
            Ok(0) => {}
            Ok(freed) => eprintln!(
                "byteback-server: no space left on device {what}: removed {freed} bytes of interrupted transfers' partial copies"
            ),
            Err(e) => tracing::warn!("cannot remove idle partial copies: {e}"),
        }
    }

    /// The backup is failing with `e`: when that is for want of space, the
    /// store is marked short of space (so the next backup starts by
    /// removing what this one left) and one snapshot is deleted, if this
    /// backup may still delete one, so the next backup has room. Returns
    /// the error to fail with, saying so.
    pub fn after_no_space(&mut self, e: Error) -> Error {
        let unrecorded = self.unrecorded();
        let Some(room) = self.room.as_mut().filter(|_| is_no_space(&e)) else {
            return e;
        };
        let (now, refusal) = (room.now(), room.refusal());
        let grown = Some((&room.host, unrecorded));
        let deleted = pruner::delete_one(&room.store, &room.config, now, refusal, grown);
        if let Ok(n) = deleted {
            room.count(n);
        }
        // After the deletion, which may have made room for the marker (not
        // once the commit is under way: nothing is left to clean up).
        if !self.work.committing {
            self.note_no_space();
        }
        match deleted {
            Ok(0) => e,
            Ok(n) => Error::Store(format!(
                "{e}; deleted {n} snapshot to make room for the next backup"
            )),
            Err(e2) => Error::Store(format!("{e}; and making room failed: {e2}")),
        }
    }
}

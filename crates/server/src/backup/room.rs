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

use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::pruner::{self, ROOM_ROUNDS};
use crate::store::Store;

use super::BackupReceiver;

/// What making room needs, and what this backup deleted for it.
pub struct Room {
    store: Store,
    config: StoreConfig,
    /// The time the backup runs as (`--now`), else the clock's.
    now: Option<i64>,
    /// Snapshots deleted so far: at most [`ROOM_ROUNDS`] less one per
    /// backup, however many operations need room.
    deleted: usize,
}

/// Whether `e` is, at its root, "no space left on device" (a quota is not:
/// deleting snapshots, of any host, is for a full disc).
pub fn is_no_space(e: &Error) -> bool {
    e.io_error().and_then(std::io::Error::raw_os_error) == Some(libc::ENOSPC)
}

impl Room {
    /// Making room in `store` (configured by `config`) for a backup run as
    /// of `now`.
    pub fn new(store: &Store, config: &StoreConfig, now: Option<i64>) -> Result<Self> {
        Ok(Room {
            store: store.try_clone()?,
            config: config.clone(),
            now,
            deleted: 0,
        })
    }

    fn now(&self) -> i64 {
        self.now.unwrap_or_else(crate::time::now)
    }

    fn may_delete(&self) -> bool {
        self.deleted < usize::from(ROOM_ROUNDS - 1)
    }

    /// `e`, from `what`, ran out of space: one more round of making room
    /// (`round` counts them), or, after the last, the error to fail with.
    fn next_round(&mut self, e: Error, what: &str, round: &mut u8) -> Result<()> {
        *round += 1;
        if *round > ROOM_ROUNDS {
            return Err(Error::Store(format!(
                "no space left on device {what}, even after committing the filesystem and deleting up to {} snapshots one by one; btrfs may have no room left for metadata (see `btrfs filesystem usage`; `btrfs balance start -dusage=50` on the store's filesystem gives it some): {e}",
                ROOM_ROUNDS - 1
            )));
        }
        let may = self.may_delete();
        let (now, r) = (self.now(), *round);
        self.deleted +=
            pruner::make_room_for_metadata(&self.store, &self.config, now, what, r, may)?;
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
            (Err(e), Some(room)) if is_no_space(&e) => room.next_round(e, &what(), &mut round)?,
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
                    if let Err(e) = room.next_round(e, &what, &mut round) {
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
        let Some(room) = self.room.as_mut().filter(|_| is_no_space(&e)) else {
            return e;
        };
        let (now, may) = (room.now(), room.may_delete());
        let deleted = pruner::delete_one(&room.store, &room.config, now, may);
        if let Ok(n) = deleted {
            room.deleted += n;
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

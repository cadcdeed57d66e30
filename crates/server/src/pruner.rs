//! Keeping the disc from filling: deletes the least important snapshots while
//! the store is short of space, and the per-host usage log the growth guard reads.
//!
//! Shared by `byteback-prune`, `byteback-server prune` and the prune the server
//! runs after each snapshot. The decisions are [`crate::prune`]'s pure functions;
//! this module measures, deletes, waits for btrfs to free the space, and reports.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use byteback_protocol::term::{print_lines, LinesAt};
use std::time::{Duration, Instant};
use tracing::Level;

use rustix::fs::{Mode, OFlags};

use crate::error::{Error, IoContext, Result};
use crate::prune::{next_to_delete, prune_order, spikes, Order, Snapshot, Spike, Usage};
use crate::space::{self, Space};
use crate::store::{HostStore, Store};
use crate::{btrfs, fsops, time};

/// Per-host log of what each backup wrote, beside `current` (out of the client's reach).
pub const USAGE_LOG: &str = ".byteback-usage";
/// Store-wide list of growth spikes the admin accepted with `--prune-force`.
pub const ACCEPTED: &str = ".byteback-accepted-growth";
/// Written while the growth guard holds pruning back; read by `status`.
pub const REFUSED: &str = ".byteback-prune-refused";
const LOCK: &str = ".byteback-prune.lock";
/// Pruning waits until some snapshot is older than this.
pub const MIN_AGE: i64 = 7 * 86_400;

/// How a prune run behaves.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Start pruning below this free percentage.
    pub minpercent: u32,
    /// Stop once free space is above this percentage.
    pub maxpercent: u32,
    /// Delete even when space is fine (at least one snapshot), override the
    /// 7-day rule and accept growth spikes. A host's newest snapshot stays.
    pub force: bool,
    /// Deletion order.
    pub order: Order,
    /// The clock (Unix seconds).
    pub now: i64,
    /// Local time offset for "midday" (seconds east of UTC).
    pub offset: i64,
    /// Report every step.
    pub verbose: bool,
    /// Only report what would be deleted.
    pub dry_run: bool,
    /// Make this many bytes free (a backup ran out of space): prune from
    /// whatever free space there is, whatever the snapshots' age, until then.
    pub target_free: Option<u64>,
    /// Stop after this many deletions, whatever the free space.
    pub max_deletions: Option<usize>,
    /// Delete only this host's snapshots.
    pub only_host: Option<String>,
    /// Growth spikes the admin accepts by name (`HOST/SNAPSHOT`, as the
    /// refusal names them; see [`accept`]): with these, `force` accepts no
    /// others.
    pub accept: Vec<String>,
}

impl PruneOptions {
    /// The prune the server runs by itself: store settings, importance
    /// order, its clock; `target_free` when a backup needs room.
    pub fn server(cfg: &crate::config::StoreConfig, now: i64, target_free: Option<u64>) -> Self {
        PruneOptions {
            minpercent: cfg.minpercent,
            maxpercent: cfg.maxpercent,
            force: false,
            order: Order::Importance,
            now,
            offset: time::local_offset(now),
            verbose: false,
            dry_run: false,
            target_free,
            max_deletions: None,
            only_host: None,
            accept: vec![],
        }
    }

    /// Whether this prune may delete `s` (by host; a host's newest is kept
    /// by [`next_to_delete`]).
    pub fn may_delete(&self, s: &Snapshot) -> bool {
        self.only_host.as_ref().is_none_or(|h| s.host == *h)
    }
}

/// Why a backup short of room must make it from its own host's snapshots
/// only, if it must: it is a growth spike by the guard's rule (see
/// [`spikes`]), counting what it has written and needs.
fn own_only(room: &RoomFor, capacity: u64) -> Option<String> {
    // Since the host's last snapshot: the backups committed without one,
    // this one's writing so far and what it needs now.
    let (mut with_this, pending) = match read_usage_pending(room.host) {
        Ok(usage) => usage,
        Err(e) => {
            return Some(format!(
                "its usage log cannot be read ({e}), so its growth cannot be judged"
            ))
        }
    };
    let growth = pending
        .saturating_add(room.written)
        .saturating_add(room.need.saturating_sub(room.credit));
    with_this.push(Usage {
        snapshot: "(this backup)".into(),
        time: i64::MAX,
        new_bytes: growth,
    });
    let spike = spikes(&room.host.name, &with_this, capacity)
        .into_iter()
        .find(|s| s.snapshot == "(this backup)")?;
    Some(format!(
        "this backup needs to write about {} bytes, more than {} times the usual {} of {} and \
         more than {} % of the store (the growth guard)",
        spike.new_bytes,
        crate::prune::SPIKE_FACTOR,
        spike.usual,
        room.host.name,
        crate::prune::SPIKE_MIN_PERCENT
    ))
}

/// What a prune run did.
#[derive(Debug, Clone)]
pub struct PruneOutcome {
    /// Snapshots deleted (or that would be, in a dry run), in order.
    pub deleted: Vec<Snapshot>,
    /// Free space before.
    pub before: Space,
    /// Free space after.
    pub after: Space,
    /// Why pruning stopped short of `maxpercent`, if it did.
    pub refused: Option<String>,
    /// Another prune of the store held its lock, so nothing was tried.
    pub busy: bool,
}

/// Every snapshot of every host in the store.
pub fn all_snapshots(store: &Store) -> Result<Vec<Snapshot>> {
    let mut out = vec![];
    for host in store.hosts()? {
        let h = store.host(&host, false)?;
        for (name, time) in h.snapshots()? {
            out.push(Snapshot {
                host: host.clone(),
                name,
                time,
            });
        }
    }
    Ok(out)
}

/// Appends the bytes of file data a backup wrote to the host's usage log,
/// with no snapshot (`-`) and the store's free and total bytes then (for
/// the report's free-space chart; lines of older versions have three
/// fields), and syncs it. A committed backup writes this line before it
/// takes its snapshot, and [`record_snapshot`] names the snapshot after:
/// a crash between the two leaves the bytes counted for the next
/// snapshot, where a line written after the snapshot would have lost them
/// from the growth guard's view. An interrupted backup writes this line
/// alone.
pub fn record_written(
    host: &HostStore,
    now: i64,
    new_bytes: u64,
    space: Option<&Space>,
) -> Result<()> {
    append_usage(host, now, new_bytes, None, space, Tail::None)
}

/// Appends what a backup still running has written so far
/// (`TIME BYTES - running`): counted as a backup's line without a snapshot
/// by every reader (older ones too, which take the fourth field for no
/// space figures), and folded by [`read_usage_lines`] into the backup's
/// next line, so the report shows one backup, not one per note.
pub fn record_running(host: &HostStore, now: i64, new_bytes: u64) -> Result<()> {
    append_usage(host, now, new_bytes, None, None, Tail::Running)
}

/// Appends that `bytes` the usage log counts (in a running backup's notes)
/// were thrown away and not written again (`TIME 0 - credit BYTES`): a
/// transfer that ran out of space, in a backup that then ended. Taken off
/// the host's growth since its last snapshot by every reader of this
/// version (older ones see a line of no bytes), so a backup that failed for
/// want of space does not count, with the next one's, as a spike.
pub fn record_credit(host: &HostStore, now: i64, bytes: u64) -> Result<()> {
    append_usage(host, now, 0, None, None, Tail::Credit(bytes))
}

/// Appends the line naming the snapshot a backup took, after its
/// [`record_written`] line of the same time (`now 0 NAME`; the readers
/// take the two as one), and syncs it. `unrecorded`: bytes that line
/// could not record (its append failed), counted here instead.
pub fn record_snapshot(
    host: &HostStore,
    now: i64,
    snapshot: &str,
    space: Option<&Space>,
    unrecorded: u64,
) -> Result<()> {
    append_usage(host, now, unrecorded, Some(snapshot), space, Tail::None)
}

/// After a crash between a backup's usage line and its snapshot's: names
/// the snapshot that backup took (one named after the minute of the
/// line's time and named nowhere in the log), so its growth is its own, not
/// the next snapshot's. Called under the host's lock.
pub fn name_lost_snapshot(host: &HostStore) -> Result<()> {
    let lines = read_usage_lines(host);
    // (A running backup's last note is no backup's line before a snapshot.)
    let Some(last) = lines.last().filter(|l| l.snapshot.is_none() && !l.running) else {
        return Ok(());
    };
    let named: std::collections::HashSet<&str> =
        lines.iter().filter_map(|l| l.snapshot.as_deref()).collect();
    let lost = host.snapshots()?.into_iter().rev().find(|(name, ts)| {
        *ts <= last.time && last.time - ts < 60 && !named.contains(name.as_str())
    });
    if let Some((name, _)) = lost {
        tracing::info!(
            "the usage log of {} did not name snapshot {name} (a crash right after it was taken): named now",
            host.name
        );
        record_snapshot(host, last.time, &name, None, 0)?;
    }
    Ok(())
}

/// What follows a usage line's snapshot field when it has no space figures.
enum Tail {
    None,
    /// See [`record_running`].
    Running,
    /// See [`record_credit`].
    Credit(u64),
}

/// A usage log past this many bytes is compacted before the next line is
/// appended (see [`compact_usage`]): about 60,000 lines.
const USAGE_COMPACT_AT: u64 = 4 << 20;
/// The snapshots a compacted usage log keeps a line for, the newest.
const USAGE_KEEP: usize = 1000;

fn append_usage(
    host: &HostStore,
    now: i64,
    new_bytes: u64,
    snapshot: Option<&str>,
    space: Option<&Space>,
    tail: Tail,
) -> Result<()> {
    let path = || host.path.join(USAGE_LOG).display().to_string();
    let big = fsops::lstat_at(host.fd(), USAGE_LOG.as_bytes())
        .ok()
        .flatten()
        .is_some_and(|st| st.st_size as u64 > USAGE_COMPACT_AT);
    if big {
        // Appended to as it is if it cannot be: nothing is lost then.
        if let Err(e) = compact_usage(host) {
            tracing::warn!("cannot compact {}: {e}", path());
        }
    }
    let fd = rustix::fs::openat(
        host.fd(),
        USAGE_LOG,
        OFlags::RDWR | OFlags::APPEND | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .op("open", path)?;
    // After a torn append (a crash, a full disc), the line starts on a
    // line of its own rather than glued to the torn one's end.
    let len = rustix::fs::fstat(&fd).op("stat", path)?.st_size;
    let mut last = [0u8; 1];
    let torn = len > 0
        && rustix::io::pread(&fd, &mut last, (len - 1) as u64).op("read", path)? == 1
        && last[0] != b'\n';
    let mut line = format!(
        "{}{now} {new_bytes} {}",
        if torn { "\n" } else { "" },
        snapshot.unwrap_or("-")
    );
    match (space, tail) {
        (Some(sp), _) => line.push_str(&format!(" {} {}", sp.free, sp.size)),
        (None, Tail::Running) => line.push_str(" running"),
        (None, Tail::Credit(b)) => line.push_str(&format!(" credit {b}")),
        (None, Tail::None) => {}
    }
    line.push('\n');
    let mut f = std::fs::File::from(fd);
    f.write_all(line.as_bytes()).op("append to", path)?;
    // Written: a failed sync is said, not an error, or the caller would
    // count the same bytes again elsewhere.
    let synced = f.sync_data().map_err(|e| e.to_string()).and_then(|()| {
        // Its directory too, so the file's name is durable when it was just
        // created (a directory sync per line written: two a backup).
        crate::fsops::fsync(host.fd()).map_err(|e| e.to_string())
    });
    if let Err(e) = synced {
        tracing::error!("cannot sync {}: {e}", path());
    }
    Ok(())
}

/// Rewrites the host's usage log (a new file renamed over it, with the
/// old one's owner and mode) as its readers take it: a line for each
/// snapshot that still exists and each of the last [`USAGE_KEEP`] (the
/// bytes written since the snapshot before, its time, name and space
/// figures), then one line of the bytes written since the last snapshot
/// (`-`, `running` when its last line was), if any lines came after it.
/// The growth guard's figures stay what they were; the sessions between
/// two snapshots become one line. So a client that makes a great many
/// sessions (each writes a line) can neither push its snapshots out of
/// the 64 MiB every reader takes (its host would pass for a new one,
/// judged by no guard) nor grow the log without end. Called by the log's
/// one writer, under the host's lock.
fn compact_usage(host: &HostStore) -> Result<()> {
    let path = || host.path.join(USAGE_LOG).display().to_string();
    let Some(old) = fsops::lstat_at(host.fd(), USAGE_LOG.as_bytes()).op("look at", path)? else {
        return Ok(());
    };
    let euid = rustix::process::geteuid().as_raw();
    if old.st_uid != euid && euid != 0 {
        return Err(Error::Store(format!(
            "{}: owned by uid {}, not this server's (uid {euid}); not compacted (give it \
             to the store's account)",
            path(),
            old.st_uid
        )));
    }
    let Some(text) = read_small_checked(host.fd(), USAGE_LOG).op("read", path)? else {
        return Ok(());
    };
    let existing: HashSet<String> = host.snapshots()?.into_iter().map(|(n, _)| n).collect();
    // Each snapshot's line, and whether that snapshot is still there.
    let mut snapshots: Vec<(String, bool)> = vec![];
    // The space figures of the last line before a snapshot's that had
    // some (a backup's line; the snapshot's may have none).
    let mut last_space = String::new();
    // Bytes since the last snapshot line, the time and kind of the last
    // line that counted for them.
    let mut pending: u64 = 0;
    let mut after: Option<(i64, bool)> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(t), Some(b), Some(&s)) = (f.first(), f.get(1), f.get(2)) else {
            continue;
        };
        let (Ok(t), Ok(b)) = (t.parse::<i64>(), b.parse::<u64>()) else {
            continue;
        };
        // As `read_usage_pending` reads it.
        if let Some(c) = credit_of(s, f.get(3).copied(), f.get(4).copied()) {
            pending = pending.saturating_sub(c);
            after = Some((t, after.is_some_and(|a| a.1)));
            continue;
        }
        pending = pending.saturating_add(b);
        let space = match (f.get(3), f.get(4)) {
            (Some(free), Some(size))
                if free.parse::<u64>().is_ok() && size.parse::<u64>().is_ok() =>
            {
                format!(" {free} {size}")
            }
            _ => String::new(),
        };
        if s == "-" {
            after = Some((t, f.get(3) == Some(&"running")));
            // Only a backup's own figures go onto its snapshot's line.
            last_space = space;
            continue;
        }
        let space = if space.is_empty() {
            std::mem::take(&mut last_space)
        } else {
            space
        };
        snapshots.push((format!("{t} {pending} {s}{space}\n"), existing.contains(s)));
        pending = 0;
        after = None;
        last_space.clear();
    }
    let newest = snapshots.len().saturating_sub(USAGE_KEEP);
    let mut out: String = snapshots
        .iter()
        .enumerate()
        .filter(|(i, (_, there))| *i >= newest || *there)
        .map(|(_, (line, _))| line.as_str())
        .collect();
    if let Some((t, running)) = after {
        let tail = if running { " running" } else { "" };
        out.push_str(&format!("{t} {pending} -{tail}\n"));
    }
    let tmp = format!("{USAGE_LOG}.compact");
    let written = (|| -> std::io::Result<()> {
        // One a run of another user left is no reason to fail each time.
        fsops::remove_any(host.fd(), tmp.as_bytes())?;
        let fd = rustix::fs::openat(
            host.fd(),
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )?;
        if old.st_uid != euid {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(old.st_uid)),
                Some(rustix::fs::Gid::from_raw(old.st_gid)),
            )?;
        } else if old.st_gid != rustix::process::getegid().as_raw() {
            // Its owner may give it any group of theirs (a monitoring one).
            let _ = rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(old.st_gid)));
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(old.st_mode & 0o7777))?;
        let mut f = std::fs::File::from(fd);
        f.write_all(out.as_bytes())?;
        f.sync_data()?;
        rustix::fs::renameat(host.fd(), tmp.as_str(), host.fd(), USAGE_LOG)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(host.fd(), tmp.as_str(), rustix::fs::AtFlags::empty());
        return Err(e).op("compact", path);
    }
    fsops::fsync(host.fd()).op("sync the directory of", path)?;
    Ok(())
}

/// The host's usage per snapshot, oldest first: bytes written by the backups
/// since the previous snapshot. Hosts without a log (1.x stores) have none.
/// A log that cannot be read shows none (for reports; the growth guard
/// reads it with [`read_usage_pending`]).
pub fn read_usage(host: &HostStore) -> Vec<Usage> {
    read_usage_pending(host).map(|u| u.0).unwrap_or_default()
}

/// [`read_usage`], and the bytes written since the last snapshot by
/// backups that made none (committed within the minimum interval, or cut
/// off), which the next snapshot's figure will hold. A log that is there
/// but cannot be read is an error.
pub fn read_usage_pending(host: &HostStore) -> std::io::Result<(Vec<Usage>, u64)> {
    let Some(text) = read_small_checked(host.fd(), USAGE_LOG)? else {
        return Ok((vec![], 0));
    };
    let mut out = vec![];
    let mut pending: u64 = 0;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(t), Some(b), Some(s)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(t), Ok(b)) = (t.parse::<i64>(), b.parse::<u64>()) else {
            continue;
        };
        if let Some(c) = credit_of(s, f.next(), f.next()) {
            pending = pending.saturating_sub(c);
            continue;
        }
        pending = pending.saturating_add(b);
        if s != "-" {
            out.push(Usage {
                snapshot: s.to_string(),
                time: t,
                new_bytes: pending,
            });
            pending = 0;
        }
    }
    Ok((out, pending))
}

/// One line of a usage log, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLine {
    /// Unix seconds of the backup's commit.
    pub time: i64,
    /// Bytes of file data it wrote.
    pub new_bytes: u64,
    /// The snapshot it made, if any (as written: not validated).
    pub snapshot: Option<String>,
    /// The store's free and total bytes then (lines of older versions have none).
    pub space: Option<(u64, u64)>,
    /// Written while its backup ran (see [`record_running`]): only a
    /// last line is left so, the rest are folded into the next line.
    pub running: bool,
}

/// Every well-formed line of the host's usage log, in the order written
/// (at most the log's first 64 MiB); malformed lines are skipped. A
/// snapshot's line that follows its backup's line of the same time (see
/// [`record_snapshot`]) completes it: the two are one backup.
pub fn read_usage_lines(host: &HostStore) -> Vec<UsageLine> {
    let Some(text) = read_small(host.fd(), USAGE_LOG) else {
        return vec![];
    };
    let mut out: Vec<UsageLine> = vec![];
    for text in text.lines() {
        let f: Vec<&str> = text.split_whitespace().collect();
        if let Some(c) = f
            .get(2)
            .and_then(|s| credit_of(s, f.get(3).copied(), f.get(4).copied()))
        {
            // Off the backup's bytes the line before holds (its notes, or
            // its interrupted line): one not yet snapshotted.
            if let Some(last) = out.last_mut().filter(|l| l.snapshot.is_none()) {
                last.new_bytes = last.new_bytes.saturating_sub(c);
            }
            continue;
        }
        let Some(mut line) = parse_usage_line(text) else {
            continue;
        };
        // A running backup's notes go into its next line (or, after a
        // crash, the next backup's).
        if let Some(noted) = out.last().filter(|l| l.running).map(|l| l.new_bytes) {
            out.pop();
            line.new_bytes = line.new_bytes.saturating_add(noted);
        }
        match out.last_mut() {
            Some(last)
                if last.snapshot.is_none()
                    && line.snapshot.is_some()
                    && line.new_bytes == 0
                    && line.time == last.time =>
            {
                last.snapshot = line.snapshot;
                last.space = line.space.or(last.space);
            }
            _ => out.push(line),
        }
    }
    out
}

/// The bytes of a credit line (see [`record_credit`]), from its third,
/// fourth and fifth fields.
fn credit_of(snapshot: &str, word: Option<&str>, bytes: Option<&str>) -> Option<u64> {
    (snapshot == "-" && word == Some("credit"))
        .then(|| bytes?.parse().ok())
        .flatten()
}

fn parse_usage_line(line: &str) -> Option<UsageLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (Some(t), Some(b), Some(s)) = (f.first(), f.get(1), f.get(2)) else {
        return None;
    };
    let space = match (f.get(3), f.get(4)) {
        (Some(free), Some(size)) => free.parse().ok().zip(size.parse().ok()),
        _ => None,
    };
    Some(UsageLine {
        time: t.parse().ok()?,
        new_bytes: b.parse().ok()?,
        snapshot: (*s != "-").then(|| s.to_string()),
        space,
        running: *s == "-" && f.get(3) == Some(&"running"),
    })
}

/// The last 64 MiB of file `name` in `dir` (whole lines: one cut at the
/// start is dropped), bytes that are not UTF-8 replaced: a damaged byte
/// costs its line, never the file (a usage log ignored whole would switch
/// the growth guard off for its host).
/// Any error reading it is `None` too (see [`read_small_checked`]).
pub(crate) fn read_small(dir: impl AsFd, name: &str) -> Option<String> {
    read_small_checked(dir, name).ok().flatten()
}

/// [`read_small`], where only a file that is not there is `None`: what
/// cannot be read is an error, not taken for an empty file (an unreadable
/// usage log would switch the growth guard off for its host).
pub(crate) fn read_small_checked(dir: impl AsFd, name: &str) -> std::io::Result<Option<String>> {
    const MAX: u64 = 64 << 20;
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut f = std::fs::File::from(fd);
    let len = f.metadata()?.len();
    let start = len.saturating_sub(MAX);
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    f.take(MAX).read_to_end(&mut bytes)?;
    if start > 0 {
        let cut = bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        bytes.drain(..cut);
    }
    // Not copied when it is UTF-8 (a log of 64 MiB is held once).
    Ok(Some(String::from_utf8(bytes).unwrap_or_else(|e| {
        String::from_utf8_lossy(e.as_bytes()).into_owned()
    })))
}

/// Writes `text` to `name` in the store root: appended when `append`,
/// else as its whole content, written beside it and renamed over it (a
/// reader, `status` among them, never sees it empty or half written, and
/// two writers never mix their texts).
fn write_small(store: &Store, name: &str, text: &str, append: bool) -> Result<()> {
    let path = || store.root.join(name).display().to_string();
    let tmp = format!(".{name}.{}.tmp", std::process::id());
    let (file, mode) = if append {
        (name, OFlags::APPEND)
    } else {
        (tmp.as_str(), OFlags::TRUNC)
    };
    let fd = rustix::fs::openat(
        store.fd(),
        file,
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW | mode,
        Mode::from_raw_mode(0o644),
    )
    .op("open", path)?;
    let mut f = std::fs::File::from(fd);
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_data())
        .op("write", path);
    // What the admin accepted, and why pruning refused, outlive a crash.
    if append {
        return written;
    }
    let placed = written.and_then(|()| {
        rustix::fs::renameat(store.fd(), file, store.fd(), name)
            .and_then(|()| rustix::fs::fsync(store.fd()))
            .map_err(std::io::Error::from)
            .op("rename into place", path)
    });
    if placed.is_err() {
        let _ = rustix::fs::unlinkat(store.fd(), file, rustix::fs::AtFlags::empty());
    }
    placed
}

/// Forgets the recorded refusal once the store has at least `minpercent`
/// free (`space`): a prune that only made room for one backup (its target
/// met, the store still short) or got past the growth guard and is still
/// deleting says nothing of whether the store is short.
fn clear_refusal(store: &Store, opts: &PruneOptions, space: &Space) {
    if !opts.dry_run && space.percent_free() >= f64::from(opts.minpercent) {
        let _ = rustix::fs::unlinkat(store.fd(), REFUSED, rustix::fs::AtFlags::empty());
    }
}

/// Growth spikes whose snapshot still exists and that the admin has not
/// accepted; and, for each host, what it wrote since its last snapshot
/// (backups committed within the minimum interval, or cut off) judged as
/// its next snapshot will be: junk in `current` with no snapshot yet must
/// not evict other hosts' history either. Such a spike is named
/// `current-since-SNAPSHOT` (its last snapshot); accepting it accepts the
/// snapshot that follows it too.
///
/// A usage log that is there but cannot be read is an error (the guard
/// cannot judge that host), but for host `own`'s: a prune limited to that
/// host's own snapshots needs no judgement of it.
pub fn open_spikes(
    store: &Store,
    snapshots: &[Snapshot],
    capacity: u64,
    own: Option<&str>,
) -> Result<Vec<Spike>> {
    // `HOST/SNAPSHOT`, or `HOST/current-since-SNAPSHOT BYTES`: growth not
    // snapshotted yet is accepted up to twice what it was when accepted.
    let lines = read_small(store.fd(), ACCEPTED).unwrap_or_default();
    let accepted: HashSet<&str> = lines.lines().map(str::trim).collect();
    let accepted_up_to = |name: &str| -> Option<u64> {
        lines.lines().find_map(|l| {
            let (n, b) = l.trim().split_once(' ')?;
            (n == name).then(|| b.trim().parse::<u64>().ok())?
        })
    };
    let pending_accepted =
        |name: &str, bytes: u64| accepted_up_to(name).is_some_and(|b| bytes <= b.saturating_mul(2));
    let existing: HashSet<(&str, &str)> = snapshots
        .iter()
        .map(|s| (s.host.as_str(), s.name.as_str()))
        .collect();
    let mut out = vec![];
    for host in store.hosts()? {
        let h = store.host(&host, false)?;
        let (mut history, pending) = match read_usage_pending(&h) {
            Ok(usage) => usage,
            Err(_) if own == Some(host.as_str()) => continue,
            Err(e) => return Err(e).op("read", || h.path.join(USAGE_LOG).display().to_string()),
        };
        // Listed after the log is read: a snapshot is taken before the
        // line naming it is written, so one a backup took since the
        // caller listed `snapshots` (its spike named by that line, which
        // also ended the growth pending before it) counts.
        let now_there: HashSet<String> = h
            .snapshots()
            .map(|v| v.into_iter().map(|(n, _)| n).collect())
            .unwrap_or_default();
        let is_accepted = |history: &[Usage], s: &Spike| {
            let before = history
                .iter()
                .position(|u| u.snapshot == s.snapshot)
                .and_then(|i| i.checked_sub(1))
                .map(|i| pending_name(&history[i].snapshot));
            accepted.contains(format!("{}/{}", s.host, s.snapshot).as_str())
                || before.is_some_and(|b| pending_accepted(&format!("{}/{b}", s.host), s.new_bytes))
        };
        for s in spikes(&host, &history, capacity) {
            if (existing.contains(&(s.host.as_str(), s.snapshot.as_str()))
                || now_there.contains(&s.snapshot))
                && !is_accepted(&history, &s)
            {
                out.push(s);
            }
        }
        if let Some(last) = history.last().filter(|_| pending > 0) {
            let name = pending_name(&last.snapshot);
            history.push(Usage {
                snapshot: name.clone(),
                time: i64::MAX,
                new_bytes: pending,
            });
            if let Some(s) = spikes(&host, &history, capacity)
                .into_iter()
                .find(|s| s.snapshot == name)
            {
                if !pending_accepted(&format!("{host}/{name}"), s.new_bytes) {
                    out.push(s);
                }
            }
        }
    }
    Ok(out)
}

/// The name a growth spike not snapshotted yet goes by: what `current`
/// holds since snapshot `last` (see [`open_spikes`]).
fn pending_name(last: &str) -> String {
    format!("{PENDING_PREFIX}{last}")
}

/// See [`pending_name`].
const PENDING_PREFIX: &str = "current-since-";

/// The prune refusal left by the last run, if any.
pub fn refusal(store: &Store) -> Option<String> {
    read_small(store.fd(), REFUSED).filter(|s| !s.trim().is_empty())
}

/// Snapshots a prune passes over when they cannot be deleted, before it
/// stops (see [`prune`]).
const MAX_UNDELETABLE: usize = 3;

/// Deletes snapshot `s` of `host` (a test may make it fail); false, and
/// nothing done, while a restore reads it.
fn delete_snapshot(host: &HostStore, s: &Snapshot) -> Result<bool> {
    #[cfg(test)]
    if tests::UNDELETABLE.with(|u| u.borrow().contains(&s.name)) {
        return Err(Error::Store("it will not go (a test)".into()));
    }
    // Held while it goes: no restore starts reading it meanwhile.
    let Some(_lock) = host.lock_for_deletion(&s.name)? else {
        return Ok(false);
    };
    host.delete_snapshot(&s.name).map(|()| true)
}

/// Waits until btrfs has released the space of deleted subvolumes (like
/// `btrfs subvolume sync`), then commits so the space figures are current.
pub fn wait_for_cleaner(fd: impl AsFd) -> Result<()> {
    #[cfg(test)]
    if tests::CLEANER_STUCK.with(std::cell::Cell::get) {
        return Err(Error::Store("the cleaner is stuck (a test)".into()));
    }
    let fd = fd.as_fd();
    if !btrfs::is_btrfs(fd) {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let sync = || btrfs::sync(fd).op("sync", || STORE_FS);
    sync()?;
    match btrfs::deleted_subvolumes_pending(fd) {
        Ok(_) => {
            let mut pause = Duration::from_millis(2);
            while btrfs::deleted_subvolumes_pending(fd)
                .op("count the deleted snapshots of", || STORE_FS)?
                > 0
            {
                if Instant::now() > deadline {
                    return Err(Error::Store(
                        "btrfs is still cleaning deleted snapshots after 5 minutes".into(),
                    ));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
        Err(_) => {
            // Kernels before 6.13 cannot count the cleaner's queue without
            // privileges: wait until the used bytes stop changing.
            let used = |fd| -> Result<u64> {
                let info = btrfs::space_info(fd).op("measure", || STORE_FS)?;
                Ok(info.iter().map(|i| i.used).sum())
            };
            let mut last = used(fd)?;
            let mut stable = 0;
            while stable < 3 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                sync()?;
                let now = used(fd)?;
                stable = if now == last { stable + 1 } else { 0 };
                last = now;
            }
        }
    }
    sync()?;
    Ok(())
}

/// What [`wait_for_cleaner`] works on, for messages.
const STORE_FS: &str = "the store's filesystem";

/// The host of the client session this process serves, if it does (see
/// [`set_viewer`]).
static VIEWER: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Says that what this process prints goes to the client of `host`'s
/// session (its stderr, its error messages): other hosts' snapshots and
/// growth are then not named in it, only counted (`status`, the log of
/// `byteback-prune` and the refusal file for `status` keep the names). A
/// client learns nothing of the other hosts of its store.
pub fn set_viewer(host: &str) {
    *VIEWER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(host.to_string());
}

/// `host/snapshot`, or "a snapshot of another host" for a session's client.
fn named(host: &str, snapshot: &str) -> String {
    match &*VIEWER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        Some(v) if v != host => "a snapshot of another host".to_string(),
        _ => format!("{host}/{snapshot}"),
    }
}

/// A spike as [`named`] shows its snapshot.
fn spike_shown(s: &Spike) -> String {
    format!(
        "{} wrote {} MiB, its usual backup writes {} MiB",
        named(&s.host, &s.snapshot),
        s.new_bytes >> 20,
        s.usual >> 20
    )
}

/// Writes one line of the prune's progress to `log`.
fn say(log: &mut dyn Write, line: std::fmt::Arguments) -> Result<()> {
    writeln!(log, "{line}").op("write", || "the prune's log")
}

/// Snapshots the running prune looked at (for `byteback-prune`'s spinner).
pub static EXAMINED: AtomicU64 = AtomicU64::new(0);
/// Snapshots the running prune has deleted.
pub static DELETED: AtomicU64 = AtomicU64::new(0);

/// Runs one prune of `store`; progress goes to `log` (stderr in the binaries).
/// Long (~95 lines) because the lock, the checks that may refuse and
/// the deletion loop share the outcome being built; the growth check
/// is its own function ([`check_growth`]).
pub fn prune(store: &Store, opts: &PruneOptions, log: &mut dyn Write) -> Result<PruneOutcome> {
    let lock = fsops::open_lock(store.fd(), LOCK.as_bytes())
        .op("open", || store.root.join(LOCK).display().to_string())?;
    let measure = || space::measure(store.fd()).op("measure", || store.root.display());
    if let Err(e) = rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        let before = measure()?;
        return Ok(PruneOutcome {
            deleted: vec![],
            before,
            after: before,
            refused: Some(format!("another prune of this store is running ({e})")),
            busy: true,
        });
    }
    let before = measure()?;
    // A filesystem that says nothing of its size (a FUSE one without
    // statfs): 0 % free by these figures, for which every prune would
    // delete all it may. Not known is an error, and nothing is deleted.
    if before.size == 0 {
        return Err(Error::Store(format!(
            "{}: the filesystem reports a size of 0, so its free space is not known; not pruning",
            store.root.display()
        )));
    }
    let mut out = PruneOutcome {
        deleted: vec![],
        before,
        after: before,
        refused: None,
        busy: false,
    };
    if opts.verbose {
        say(log, format_args!("byteback-prune: {before}"))?;
    }
    let roomy = match opts.target_free {
        Some(t) => before.free >= t,
        None => before.percent_free() >= f64::from(opts.minpercent),
    };
    if !opts.force && roomy {
        if opts.verbose {
            say(
                log,
                format_args!(
                    "byteback-prune: at least {}% free, nothing to do",
                    opts.minpercent
                ),
            )?;
        }
        clear_refusal(store, opts, &before);
        return Ok(out);
    }
    let mut snapshots = all_snapshots(store)?;
    EXAMINED.store(snapshots.len() as u64, Ordering::Relaxed);
    if !opts.force
        && opts.target_free.is_none()
        && !snapshots.iter().any(|s| s.time < opts.now - MIN_AGE)
    {
        let why = "no snapshot is older than 7 days; not pruning";
        record_refusal(
            store,
            opts,
            &format!("short of space ({before}), but {why}"),
        );
        out.refused = Some(why.into());
        return Ok(out);
    }
    if let Some(why) = check_growth(store, opts, log, &snapshots, before.size)? {
        out.refused = Some(why);
        return Ok(out);
    }
    // Past the guard, a prune of the whole store (the daily one) replaces
    // what an earlier one recorded (a spike since accepted, say): it
    // records again if it ends short. One making room for a backup, or
    // limited to a host, leaves it.
    if !opts.dry_run && opts.target_free.is_none() && opts.only_host.is_none() {
        let _ = rustix::fs::unlinkat(store.fd(), REFUSED, rustix::fs::AtFlags::empty());
    }
    // Snapshots whose deletion failed this run: passed over, so one that
    // cannot go does not stop pruning for good (the order is the same every
    // run); each is recorded for `status`.
    let mut undeletable: Vec<Snapshot> = vec![];
    // Snapshots a restore reads: passed over this run, not counted as failures.
    let mut in_use: Vec<Snapshot> = vec![];
    let mut failures = String::new();
    loop {
        // Judged again before each deletion after the first: a host's
        // backup may have grown since (its notes every 256 MiB), and one
        // uploading as fast as deletions free space would otherwise have
        // every other host's history deleted in this one run. Not when
        // forced: the admin accepted what there was.
        // Not either where only one host's snapshots may go: the guard
        // keeps the others'.
        let forced = opts.force && opts.accept.is_empty();
        if !out.deleted.is_empty() && !forced && !opts.dry_run && opts.only_host.is_none() {
            // What was deleted stays reported whatever stops the run.
            let why = match check_growth(store, opts, log, &snapshots, before.size) {
                Ok(None) => None,
                Ok(Some(why)) => Some(why),
                Err(e) => Some(format!("the growth guard cannot judge: {e}")),
            };
            if let Some(why) = why {
                say(log, format_args!("byteback-prune: stopping: {why}"))?;
                out.refused = Some(why);
                break;
            }
        }
        let order = prune_order(&snapshots, opts.now, opts.offset, opts.order);
        let Some(victim) = next_to_delete(&order, opts.now, |s| {
            opts.may_delete(s) && !undeletable.contains(s) && !in_use.contains(s)
        })
        .cloned() else {
            let why = match &opts.only_host {
                Some(h) => format!("nothing of {h} left to delete but its newest snapshot"),
                None => "nothing left to delete: every host is down to its newest snapshot".into(),
            };
            // Deletions that failed this run stay in the record too.
            let short = |why: &str| format!("{failures}short of space: {why}");
            if !in_use.is_empty() {
                // Not a failure: they go once their restores end. Below
                // `minpercent` meanwhile, the store is short of space,
                // which `status` says (a restore may read for a long time).
                let why = format!(
                    "nothing left to delete now but {} snapshot(s) a restore or verify is reading",
                    in_use.len()
                );
                if opts.only_host.is_none() && out.after.percent_free() < f64::from(opts.minpercent)
                {
                    record_refusal(store, opts, &short(&why));
                }
                out.refused = Some(why);
                break;
            }
            if opts.only_host.is_none() {
                record_refusal(store, opts, &short(&why));
            }
            out.refused = Some(why);
            break;
        };
        if opts.dry_run {
            say(
                log,
                format_args!(
                    "byteback-prune: would delete {}",
                    named(&victim.host, &victim.name)
                ),
            )?;
        } else {
            let host = store.host(&victim.host, false)?;
            let deleted = delete_snapshot(&host, &victim);
            if let Ok(false) = deleted {
                // A restore reads it: passed over, not a failure (it goes
                // at a later prune, once the restore has ended).
                say(
                    log,
                    format_args!(
                        "byteback-prune: {} passed over: a restore or verify is reading it",
                        named(&victim.host, &victim.name)
                    ),
                )?;
                in_use.push(victim.clone());
                continue;
            }
            if let Err(e) = deleted {
                undeletable.push(victim.clone());
                // The error names the snapshot's path: for a session's client,
                // only when it is its own (`status` shows the rest).
                // The refusal file is the admin's (`status`): every name.
                failures.push_str(&format!("cannot delete {victim}: {e}\n"));
                let shown = named(&victim.host, &victim.name);
                let e = if shown == victim.to_string() {
                    e.to_string()
                } else {
                    "an error (byteback-server status shows it)".to_string()
                };
                let why = format!("cannot delete {shown}: {e}");
                record_refusal(store, opts, failures.trim_end());
                // A few are passed over; more say the filesystem itself
                // fails (read-only, out of metadata space): stop there.
                if undeletable.len() >= MAX_UNDELETABLE {
                    say(log, format_args!("byteback-prune: {why}; stopping"))?;
                    out.refused = Some(format!(
                        "stopped: {} snapshots could not be deleted; the last: {e}",
                        undeletable.len()
                    ));
                    break;
                }
                say(log, format_args!("byteback-prune: {why}; passed over"))?;
                continue;
            }
            DELETED.fetch_add(1, Ordering::Relaxed);
            // Deleted whatever comes of the wait: counted as such (the
            // caps on deletions per backup and per day go by the count).
            if let Err(e) = wait_for_cleaner(store.fd()) {
                snapshots.retain(|s| *s != victim);
                out.deleted.push(victim.clone());
                say(
                    log,
                    format_args!(
                        "byteback-prune: deleted {}; then: {e}",
                        named(&victim.host, &victim.name)
                    ),
                )?;
                let why = format!(
                    "stopped after deleting {}: {e}",
                    named(&victim.host, &victim.name)
                );
                // Still short: said for `status` (the record was cleared
                // past the growth guard).
                let after = measure().unwrap_or(out.after);
                if opts.only_host.is_none() && after.percent_free() < f64::from(opts.minpercent) {
                    record_refusal(store, opts, &format!("short of space: {why}"));
                }
                out.refused = Some(why);
                break;
            }
        }
        snapshots.retain(|s| *s != victim);
        out.deleted.push(victim.clone());
        after_deletion_fault();
        if opts.dry_run {
            // What a deletion frees cannot be known without deleting: a dry run shows one step.
            break;
        }
        out.after = measure()?;
        say(
            log,
            format_args!(
                "byteback-prune: deleted {}, now {}",
                named(&victim.host, &victim.name),
                out.after
            ),
        )?;
        let enough = match opts.target_free {
            Some(t) => out.after.free >= t,
            None => out.after.percent_free() > f64::from(opts.maxpercent),
        } || opts.max_deletions.is_some_and(|m| out.deleted.len() >= m);
        if enough || (opts.force && before.percent_free() >= f64::from(opts.minpercent)) {
            break;
        }
    }
    // A refusal recorded before (or a failure this run) stays while the
    // store is short or a snapshot could not be deleted.
    if failures.is_empty() && out.refused.is_none() {
        clear_refusal(store, opts, &out.after);
    }
    Ok(out)
}

/// Debug builds only, for the tests: `$BYTEBACK_TEST_AFTER_DELETION` is
/// run by `sh -c` after each deletion of a prune (another host's backup
/// growing meanwhile, say).
#[cfg(debug_assertions)]
fn after_deletion_fault() {
    if let Some(cmd) = std::env::var_os("BYTEBACK_TEST_AFTER_DELETION") {
        let _ = std::process::Command::new("sh").arg("-c").arg(cmd).status();
    }
}

#[cfg(not(debug_assertions))]
fn after_deletion_fault() {}

/// The prune the server runs after a snapshot: store settings, the server's
/// clock; problems go to stderr and never fail the backup.
pub fn after_snapshot(
    store: &Store,
    cfg: &crate::config::StoreConfig,
    now: i64,
    only_host: Option<String>,
) {
    let mut opts = PruneOptions::server(cfg, now, None);
    opts.only_host = only_host;
    let mut err = std::io::LineWriter::new(LinesAt(Level::INFO));
    match prune(store, &opts, &mut err) {
        Ok(o) => {
            if let Some(why) = o.refused.filter(|_| {
                o.after.percent_free() < f64::from(cfg.minpercent) || !o.deleted.is_empty()
            }) {
                print_lines(
                    Level::WARN,
                    format!("byteback-server: prune: {why} ({})\n", o.after).as_bytes(),
                );
            }
        }
        Err(e) => {
            print_lines(
                Level::ERROR,
                format!("byteback-server: prune failed: {e:#}\n").as_bytes(),
            );
        }
    }
}

/// Growth spikes (a host that suddenly wrote far more than usual) stop a
/// prune, which would delete other hosts' history for them: a forced prune
/// accepts them (recorded in the store), any other returns why it refuses
/// (recorded too, for the status).
fn check_growth(
    store: &Store,
    opts: &PruneOptions,
    log: &mut dyn Write,
    snapshots: &[Snapshot],
    capacity: u64,
) -> Result<Option<String>> {
    let mut spikes = match open_spikes(store, snapshots, capacity, opts.only_host.as_deref()) {
        Ok(spikes) => spikes,
        Err(e) => {
            // For `status`, which reads the logs leniently.
            record_refusal(
                store,
                opts,
                &format!("not pruning: the growth guard cannot judge: {e}"),
            );
            return Err(e);
        }
    };
    // Making room for a backup of its own host (which the guard judged
    // already, see `own_only`): that backup is part of its host's growth
    // not snapshotted yet, which must not lock it out of its own history.
    if let Some(h) = &opts.only_host {
        spikes.retain(|s| !(&s.host == h && s.snapshot.starts_with(PENDING_PREFIX)));
    }
    // Accepted by name in this run (a dry run records nothing).
    spikes.retain(|s| !opts.accept.contains(&format!("{}/{}", s.host, s.snapshot)));
    if spikes.is_empty() {
        return Ok(None);
    }
    if opts.force && opts.accept.is_empty() {
        if !opts.dry_run {
            let lines: String = spikes
                .iter()
                .map(|s| match s.snapshot.starts_with(PENDING_PREFIX) {
                    true => format!("{}/{} {}\n", s.host, s.snapshot, s.new_bytes),
                    false => format!("{}/{}\n", s.host, s.snapshot),
                })
                .collect();
            write_small(store, ACCEPTED, &lines, true)?;
        }
        let verb = if opts.dry_run {
            "would accept growth"
        } else {
            "accepting growth"
        };
        for s in &spikes {
            say(
                log,
                format_args!("byteback-prune: {verb}: {}", spike_shown(s)),
            )?;
        }
        return Ok(None);
    }
    let why = |shown: &dyn Fn(&Spike) -> String| {
        format!(
            "not pruning: {}; deleting other hosts' history for it needs the admin's decision \
             (byteback-prune --prune --accept HOST/SNAPSHOT accepts one, --prune-force every \
             spike; or delete that snapshot, where it names one: growth not snapshotted yet, \
             current-since-..., is only accepted)",
            spikes.iter().map(shown).collect::<Vec<_>>().join("; ")
        )
    };
    if !opts.dry_run {
        // Best effort: on a full disc it may not fit, and the refusal is
        // said all the same. (The admin's `status` names every host.)
        let whole = why(&|s: &Spike| s.to_string());
        if let Err(e) = write_small(store, REFUSED, &format!("{whole}\n"), false) {
            tracing::warn!("cannot record the refusal for `status`: {e}");
        }
    }
    Ok(Some(why(&spike_shown)))
}

/// Accepts the growth spikes `names` (`HOST/SNAPSHOT`, as a refusal names
/// them), recorded in [`ACCEPTED`] unless `dry_run`, each said in `log`.
/// A name that is no open spike is a usage error naming those that are:
/// an admin accepts what they looked at, and nothing is accepted unseen.
pub fn accept(store: &Store, names: &[String], dry_run: bool, log: &mut dyn Write) -> Result<()> {
    let snapshots = all_snapshots(store)?;
    let capacity = space::measure(store.fd())
        .op("measure", || store.root.display())?
        .size;
    let open = open_spikes(store, &snapshots, capacity, None)?;
    let name = |s: &Spike| format!("{}/{}", s.host, s.snapshot);
    let mut lines = String::new();
    let mut said = vec![];
    let before = read_small(store.fd(), ACCEPTED).unwrap_or_default();
    for n in names {
        let already = before
            .lines()
            .any(|l| l.trim().split(' ').next() == Some(n.as_str()));
        if already && !open.iter().any(|s| name(s) == *n) {
            say(log, format_args!("byteback-prune: {n}: accepted already"))?;
            continue;
        }
        let Some(s) = open.iter().find(|s| name(s) == *n) else {
            let open = open.iter().map(name).collect::<Vec<_>>();
            return Err(Error::Usage(format!(
                "--accept {n}: no growth spike of that name is open ({}); nothing accepted",
                if open.is_empty() {
                    "none is".to_string()
                } else {
                    format!("open: {}", open.join(", "))
                }
            )));
        };
        lines.push_str(&match s.snapshot.starts_with(PENDING_PREFIX) {
            true => format!("{n} {}\n", s.new_bytes),
            false => format!("{n}\n"),
        });
        said.push(spike_shown(s));
    }
    if !dry_run && !lines.is_empty() {
        write_small(store, ACCEPTED, &lines, true)?;
    }
    let verb = if dry_run {
        "would accept growth"
    } else {
        "accepting growth"
    };
    for s in said {
        say(log, format_args!("byteback-prune: {verb}: {s}"))?;
    }
    Ok(())
}

/// Records why pruning could not make the room it should (for `status`,
/// which turns WARNING): best effort, as on a full disc it may not fit.
fn record_refusal(store: &Store, opts: &PruneOptions, why: &str) {
    if !opts.dry_run {
        if let Err(e) = write_small(store, REFUSED, &format!("{why}\n"), false) {
            tracing::warn!("cannot record the refusal for `status`: {e}");
        }
    }
}

/// Creating or renaming something in a backup ran out of space (round
/// `round` of [`ROOM_ROUNDS`]; `what` says what, "creating \"PATH\""):
/// btrfs needs metadata space to create a file, a directory or a symlink
/// and to rename, which the free data space does not show, so pruning to
/// a free-space target would delete too much on a small disc and nothing
/// on a large one. The first round commits the filesystem (and waits for
/// deleted snapshots to be cleaned), so what was freed becomes usable;
/// each later round deletes the next snapshot in importance order, one,
/// whatever the free space says, if `may_delete` (the caller bounds a
/// backup's deletions). A round that deletes nothing says why; the caller
/// tries again after each round and gives up after the last. Returns the
/// number deleted.
pub fn make_room_for_metadata(
    store: &Store,
    cfg: &crate::config::StoreConfig,
    now: i64,
    what: &str,
    round: u8,
    refusal: Option<String>,
    grown: Option<(&HostStore, u64)>,
) -> Result<usize> {
    let space = crate::space::measure(store.fd())
        .map(|s| s.to_string())
        .unwrap_or_else(|e| format!("free space unknown: {e}"));
    let hint = match btrfs::is_btrfs(store.fd()) {
        true => "; btrfs needs metadata space for it",
        false => "",
    };
    let doing = if round <= 1 {
        "committing the filesystem"
    } else {
        "deleting one snapshot"
    };
    print_lines(
        Level::WARN,
        format!(
            "byteback-server: no space left on device {what} ({space}{hint}); {doing} and trying again\n"
        )
        .as_bytes(),
    );
    if round <= 1 {
        return wait_for_cleaner(store.fd()).map(|()| 0);
    }
    delete_one(store, cfg, now, refusal, grown)
}

/// Why "no space left on device" is no sign of a full disc, if it is not:
/// on a store that is not btrfs, whose free blocks and inodes are both
/// above `minpercent` (ext4 says so of a directory whose index is full,
/// whatever the free space; deleting snapshots frees nothing it needs).
/// On btrfs, metadata space runs out before any free figure shows it.
fn not_a_full_disc(store: &Store, cfg: &crate::config::StoreConfig) -> Option<String> {
    if btrfs::is_btrfs(store.fd()) {
        return None;
    }
    let st = rustix::fs::fstatvfs(store.fd()).ok()?;
    let percent = |free: u64, all: u64| match all {
        0 => 100.0,
        all => free as f64 * 100.0 / all as f64,
    };
    let blocks = percent(st.f_bavail, st.f_blocks);
    let inodes = percent(st.f_favail, st.f_files);
    // At least 1 %: with `minpercent = 0` a full disc is still one.
    let min = f64::from(cfg.minpercent).max(1.0);
    (st.f_blocks > 0 && blocks > min && inodes > min).then(|| {
        format!(
            "the store is not short of space ({blocks:.1} % of its blocks and {inodes:.1} % of \
             its inodes free): the filesystem refused it for another reason (a directory's \
             index full?)"
        )
    })
}

/// Deletes the next snapshot in importance order, unless `refusal` says
/// why not, and if the rules allow; says why when none goes. For a backup
/// (`grown`: its host and the bytes it wrote so far) that is a growth
/// spike by the guard's rule, only that host's snapshots may go, as in
/// [`make_room`]. Returns the number deleted.
pub fn delete_one(
    store: &Store,
    cfg: &crate::config::StoreConfig,
    now: i64,
    refusal: Option<String>,
    grown: Option<(&HostStore, u64)>,
) -> Result<usize> {
    if let Some(why) = refusal.or_else(|| not_a_full_disc(store, cfg)) {
        print_lines(
            Level::WARN,
            format!("byteback-server: no snapshot deleted: {why}\n").as_bytes(),
        );
        return Ok(0);
    }
    let mut opts = PruneOptions::server(cfg, now, Some(u64::MAX));
    opts.max_deletions = Some(1);
    if let Some((host, written)) = grown {
        let capacity = space::measure(store.fd())
            .op("measure", || store.root.display())?
            .size;
        let room = RoomFor {
            host,
            path: "",
            need: 0,
            written,
            credit: 0,
            quota: false,
        };
        if let Some(why) = own_only(&room, capacity) {
            print_lines(
                Level::WARN,
                format!(
                    "byteback-server: {why}: only snapshots of {} may be deleted for it\n",
                    host.name
                )
                .as_bytes(),
            );
            opts.only_host = Some(host.name.clone());
        }
    }
    let mut err = std::io::LineWriter::new(LinesAt(Level::INFO));
    let out = prune_waiting(store, &opts, &mut err, LOCK_WAIT)?;
    if out.deleted.is_empty() {
        print_lines(
            Level::WARN,
            format!(
                "byteback-server: no snapshot deleted: {}\n",
                out.refused.unwrap_or_else(|| "nothing to delete".into())
            )
            .as_bytes(),
        );
    }
    Ok(out.deleted.len())
}

/// How long a backup that needs room ([`delete_one`], [`make_room`])
/// waits for another prune of the store to end.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// [`prune`], waiting up to `wait` while another prune (another host's
/// backup, cron) holds the store's lock, as it may while the btrfs cleaner
/// works: a backup short of room must not fail for that.
fn prune_waiting(
    store: &Store,
    opts: &PruneOptions,
    log: &mut dyn Write,
    wait: std::time::Duration,
) -> Result<PruneOutcome> {
    let start = std::time::Instant::now();
    let mut out = prune(store, opts, log)?;
    while out.busy && start.elapsed() < wait {
        std::thread::sleep(std::time::Duration::from_millis(200));
        out = prune(store, opts, log)?;
    }
    Ok(out)
}

/// Rounds of [`make_room_for_metadata`] before a backup gives up on one
/// creation or rename: a commit, then up to five deletions (also the most
/// a backup deletes for metadata, however many files need it).
pub const ROOM_ROUNDS: u8 = 6;

/// What a backup that ran out of space writing a file needs room for.
pub struct RoomFor<'a> {
    /// The host backing up.
    pub host: &'a crate::store::HostStore,
    /// The file, for messages.
    pub path: &'a str,
    /// Bytes the client sent for it (never more than it declared).
    pub need: u64,
    /// Bytes of file data this backup wrote before it.
    pub written: u64,
    /// Bytes the usage log already counts that were thrown away (a
    /// transfer that ran out of space, noted while it was sent): the growth
    /// guard must not count them twice, but writing them again needs the
    /// room all the same.
    pub credit: u64,
    /// A quota ran out (EDQUOT), not the filesystem.
    pub quota: bool,
}

/// A backup ran out of space writing `room.path` (`room.need` bytes):
/// deletes snapshots by importance, under the usual rules (never a host's
/// newest, the growth guard holds; the 7-day rule gives way), until `need`
/// plus a margin is free. Fails, saying how much is missing and what
/// `byteback-prune --prune-force` would delete, when nothing may go.
///
/// Nothing is deleted for a quota (it confines this host) or for a file
/// larger than the whole store; and other hosts' snapshots not for a backup
/// that is itself a growth spike by the guard's rule (its data written so
/// far and this file's, against the host's usual): only the host's own go.
pub fn make_room(
    store: &Store,
    cfg: &crate::config::StoreConfig,
    now: i64,
    room: &RoomFor,
) -> Result<()> {
    const MARGIN: u64 = 64 << 20;
    let (path, need) = (room.path, room.need);
    if room.quota {
        // The filesystem's free space says nothing of a quota, and a quota
        // confines this host: other hosts' history is not for it.
        return Err(Error::Store(format!(
            "disk quota exceeded writing {path:?} ({need} bytes); no snapshot deleted \
             (raise the quota of {}, or delete some of its snapshots)",
            room.host.name
        )));
    }
    let capacity = space::measure(store.fd())
        .op("measure", || store.root.display())?
        .size;
    if need > capacity {
        return Err(Error::Store(format!(
            "no space left on device: {path:?} needs {need} bytes, more than the whole store \
             holds ({capacity} bytes); no snapshot deleted"
        )));
    }
    let target = need.saturating_add(MARGIN);
    let mut opts = PruneOptions::server(cfg, now, Some(target));
    let own_only = own_only(room, capacity);
    if let Some(why) = &own_only {
        opts.only_host = Some(room.host.name.clone());
        print_lines(
            Level::WARN,
            format!(
                "byteback-server: {why}: only snapshots of {} may be deleted for it\n",
                room.host.name
            )
            .as_bytes(),
        );
    }
    let mut err = std::io::LineWriter::new(LinesAt(Level::INFO));
    print_lines(
        Level::WARN,
        format!(
            "byteback-server: no space left on device writing {path:?} ({need} bytes); pruning to make room\n"
        )
        .as_bytes(),
    );
    let out = prune_waiting(store, &opts, &mut err, LOCK_WAIT)?;
    if !out.deleted.is_empty() || out.after.free >= target {
        let _ = writeln!(
            err,
            "byteback-server: made room: deleted {} snapshots, {}",
            out.deleted.len(),
            out.after
        );
        return Ok(());
    }
    let snapshots = all_snapshots(store)?;
    let order = prune_order(&snapshots, now, opts.offset, Order::Importance);
    let mut would = vec![];
    let mut left = order.clone();
    while let Some(v) = next_to_delete(&left, now, |_| true).cloned() {
        would.push(named(&v.host, &v.name));
        left.retain(|s| *s != v);
    }
    let would = if would.is_empty() {
        "nothing (every host is down to its newest snapshot)".to_string()
    } else {
        would.join(", ")
    };
    Err(Error::Store(format!(
        "no space left on device: {path:?} needs {need} bytes and the store has {} free ({}); \
         {}. byteback-prune --prune-force would delete, in order: {would}",
        out.after.free,
        out.after,
        out.refused
            .unwrap_or_else(|| "pruning freed nothing".into())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// [`wait_for_cleaner`] fails, as after 5 minutes of a slow disc.
        pub(super) static CLEANER_STUCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Snapshots whose deletion fails.
        pub(super) static UNDELETABLE: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// A backup short of room waits for a prune that holds the store's
    /// lock (bounded), instead of failing at once as it did from
    /// `make_room`.
    #[test]
    fn a_prune_waits_for_the_lock_of_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let lock = fsops::open_lock(store.fd(), LOCK.as_bytes()).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let cfg = crate::config::StoreConfig::default();
        let opts = PruneOptions::server(&cfg, 1_796_400_000, Some(u64::MAX));
        let short = std::time::Duration::from_millis(300);
        let out = prune_waiting(&store, &opts, &mut Vec::new(), short).unwrap();
        assert!(out.busy, "{out:?}");
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(500));
            drop(lock);
        });
        let wait = std::time::Duration::from_secs(20);
        let out = prune_waiting(&store, &opts, &mut Vec::new(), wait).unwrap();
        holder.join().unwrap();
        assert!(!out.busy, "{out:?}");
    }

    /// A store whose host `h` has three snapshots, a prune of one deletion
    /// whatever the free space, and the snapshot it deletes first (learnt
    /// from a dry run).
    fn three_snapshots() -> (tempfile::TempDir, crate::store::Store, PruneOptions, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        store.host("h", true).unwrap();
        for snap in [
            "2026-11-01T03:00+0000",
            "2026-11-02T03:00+0000",
            "2026-11-03T03:00+0000",
        ] {
            std::fs::create_dir_all(dir.path().join("h").join(snap).join("etc")).unwrap();
        }
        let cfg = crate::config::StoreConfig::default();
        let mut opts = PruneOptions::server(&cfg, 1_796_400_000, Some(u64::MAX));
        opts.max_deletions = Some(1);
        let mut dry = opts.clone();
        dry.dry_run = true;
        let first = prune(&store, &dry, &mut Vec::new()).unwrap().deleted[0]
            .name
            .clone();
        (dir, store, opts, first)
    }

    /// A snapshot that cannot be deleted is passed over, and said where
    /// `status` sees it: before, it stopped every prune, and since the
    /// order is the same every run, pruning for good.
    #[test]
    fn a_snapshot_that_cannot_be_deleted_is_passed_over() {
        let (dir, store, opts, first) = three_snapshots();
        // Whichever comes first fails.
        UNDELETABLE.with(|u| u.borrow_mut().push(first.clone()));
        let mut log = Vec::new();
        let out = prune(&store, &opts, &mut log);
        UNDELETABLE.with(|u| u.borrow_mut().clear());
        let out = out.unwrap();
        assert_eq!(out.deleted.len(), 1, "{out:?}");
        assert_ne!(out.deleted[0].name, first);
        assert!(dir.path().join("h").join(&first).exists());
        let refused = std::fs::read_to_string(dir.path().join(REFUSED)).unwrap();
        assert!(refused.contains("cannot delete"), "{refused}");
        // Failing again with nothing else left: both are recorded (the
        // failure is not hidden behind the shortage it causes).
        UNDELETABLE.with(|u| u.borrow_mut().push(first.clone()));
        let mut all = opts.clone();
        all.max_deletions = None;
        let out = prune(&store, &all, &mut Vec::new());
        UNDELETABLE.with(|u| u.borrow_mut().clear());
        assert!(out.unwrap().deleted.is_empty());
        let refused = std::fs::read_to_string(dir.path().join(REFUSED)).unwrap();
        assert!(refused.starts_with("cannot delete h/"), "{refused}");
        assert!(
            refused.contains("\nshort of space: nothing left"),
            "{refused}"
        );
    }

    /// A store with host `h`, and space figures for its usage lines.
    fn host_with_space() -> (tempfile::TempDir, crate::store::HostStore, Space) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        let sp = Space {
            free: 70,
            size: 100,
            data_percent: 70.0,
            metadata_percent: None,
            source: "statvfs",
        };
        (dir, host, sp)
    }

    /// The lines a running backup writes count as its growth for the
    /// guard as they come, and are one backup in the lines the report
    /// draws: folded into the backup's next line (its commit, or after a
    /// crash the next backup's); a last one stands alone, still pending.
    #[test]
    fn a_running_backups_lines_are_one_backup() {
        let (dir, host, sp) = host_with_space();
        record_running(&host, 100, 3).unwrap();
        record_running(&host, 110, 4).unwrap();
        assert_eq!(read_usage_pending(&host).unwrap().1, 7);
        let lines = read_usage_lines(&host);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].running && lines[0].new_bytes == 7, "{lines:?}");
        record_written(&host, 120, 5, Some(&sp)).unwrap();
        record_snapshot(&host, 120, "s1", Some(&sp), 0).unwrap();
        record_running(&host, 200, 6).unwrap();
        let (usage, pending) = read_usage_pending(&host).unwrap();
        assert_eq!((usage.len(), usage[0].new_bytes, pending), (1, 12, 6));
        let lines = read_usage_lines(&host);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            (
                lines[0].new_bytes,
                lines[0].snapshot.as_deref(),
                lines[0].running
            ),
            (12, Some("s1"), false)
        );
        assert!(lines[1].running && lines[1].new_bytes == 6);
        // Older readers' view: the fourth field is no space figure.
        let text = std::fs::read_to_string(dir.path().join("h").join(USAGE_LOG)).unwrap();
        assert!(text.lines().any(|l| l == "100 3 - running"), "{text}");
    }

    /// A usage log past [`USAGE_COMPACT_AT`] is compacted before the next
    /// line: the growth guard's figures for the snapshots it keeps, and
    /// the growth since the last one, are those of the whole log; a flood
    /// of sessions without a snapshot (each writes a line) keeps it small
    /// and never pushes the snapshots out of what readers take.
    #[test]
    fn a_long_usage_log_is_compacted_to_the_same_figures() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        let sp = Space {
            size: 1000,
            free: 400,
            data_percent: 40.0,
            metadata_percent: None,
            source: "statvfs",
        };
        // The oldest is a snapshot that is still there: its line stays.
        let kept = "2026-01-01T00:00+0000";
        std::fs::create_dir(dir.path().join("h").join(kept)).unwrap();
        for i in 0..(USAGE_KEEP as i64 + 20) {
            let t = i * 1000;
            record_written(&host, t, 10 + i as u64, None).unwrap();
            record_running(&host, t + 1, 5).unwrap();
            record_credit(&host, t + 2, 2).unwrap();
            record_written(&host, t + 3, 1, Some(&sp)).unwrap();
            let name = if i == 0 {
                kept.to_string()
            } else {
                format!("s{i}")
            };
            record_snapshot(&host, t + 3, &name, None, 0).unwrap();
        }
        record_running(&host, 9_000_000, 7).unwrap();
        let (before, pending_before) = read_usage_pending(&host).unwrap();
        let lines_before = read_usage_lines(&host);
        compact_usage(&host).unwrap();
        let (after, pending_after) = read_usage_pending(&host).unwrap();
        assert_eq!(after.len(), USAGE_KEEP + 1);
        assert_eq!(after[0], before[0]);
        assert_eq!(after[1..], before[before.len() - USAGE_KEEP..]);
        assert_eq!(pending_after, pending_before);
        let lines = read_usage_lines(&host);
        let last = lines.last().unwrap();
        assert!(last.running && last.new_bytes == 7, "{last:?}");
        let snap = &lines[lines.len() - 2];
        assert_eq!(snap.space, Some((400, 1000)));
        assert_eq!(snap.space, lines_before[lines_before.len() - 2].space);
        // The sessions of that snapshot are its line now.
        let newest = before.last().unwrap();
        assert_eq!(
            (snap.snapshot.as_deref(), snap.new_bytes),
            (Some(newest.snapshot.as_str()), newest.new_bytes)
        );
        assert!(lines.len() < lines_before.len());
        // Sessions without a snapshot, a great many (their lines written
        // here at once): compacted at the next line written.
        let log = dir.path().join("h").join(USAGE_LOG);
        let flood: String = (0..400_000)
            .map(|i| format!("{} 3 -\n", 10_000_000 + i))
            .collect();
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(flood.as_bytes()).unwrap();
        drop(f);
        assert!(std::fs::metadata(&log).unwrap().len() > USAGE_COMPACT_AT);
        record_written(&host, 20_000_000, 4, None).unwrap();
        assert!(std::fs::metadata(&log).unwrap().len() < 100_000);
        let (usage, pending) = read_usage_pending(&host).unwrap();
        assert_eq!(usage.len(), USAGE_KEEP + 1);
        assert_eq!(pending, 7 + 400_000 * 3 + 4);
    }

    /// Bytes a running backup noted and then threw away (a transfer that
    /// ran out of space), in a backup that then ended, are taken off its
    /// host's growth: the next backup writes them again and counts them
    /// then. Before, both counted, so a backup after a failed one could
    /// pass for a spike.
    #[test]
    fn bytes_noted_then_thrown_away_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        record_written(&host, 10, 5, None).unwrap();
        record_snapshot(&host, 10, "s0", None, 0).unwrap();
        // A failed backup: 8 noted, 6 of them thrown away.
        record_running(&host, 100, 8).unwrap();
        record_credit(&host, 101, 6).unwrap();
        assert_eq!(read_usage_pending(&host).unwrap().1, 2);
        let lines = read_usage_lines(&host);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].running && lines[1].new_bytes == 2, "{lines:?}");
        // The next one writes the 6 again, and 1 more.
        record_written(&host, 200, 7, None).unwrap();
        record_snapshot(&host, 200, "s1", None, 0).unwrap();
        let (usage, pending) = read_usage_pending(&host).unwrap();
        assert_eq!((usage[1].new_bytes, pending), (9, 0), "{usage:?}");
        let lines = read_usage_lines(&host);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            (lines[1].new_bytes, lines[1].snapshot.as_deref()),
            (9, Some("s1"))
        );
        // Never below nothing; and a credit after a snapshot line is not
        // taken off the snapshot's growth.
        record_credit(&host, 300, 50).unwrap();
        assert_eq!(read_usage_pending(&host).unwrap().1, 0);
        assert_eq!(read_usage_lines(&host)[1].new_bytes, 9);
        let text = std::fs::read_to_string(dir.path().join("h").join(USAGE_LOG)).unwrap();
        assert!(text.lines().any(|l| l == "101 0 - credit 6"), "{text}");
    }

    /// A snapshot a restore reads is passed over by a prune (the next one
    /// goes instead; not a failure, so nothing for `status` to warn
    /// about while others could go; when nothing else could, the store is
    /// short of space, which `status` says): before, the prune deleted it
    /// and the restore failed at its next file. And one being deleted is
    /// not opened for a restore.
    #[test]
    fn a_snapshot_a_restore_reads_is_not_deleted_under_it() {
        let (dir, store, opts, first) = three_snapshots();
        let host = store.host("h", false).unwrap();
        let reading = host.open_snapshot_to_read(&first).unwrap().unwrap();
        let out = prune(&store, &opts, &mut Vec::new()).unwrap();
        assert_eq!(out.deleted.len(), 1, "{out:?}");
        assert_ne!(out.deleted[0].name, first);
        assert!(dir.path().join("h").join(&first).exists());
        // Not a failure: nothing for `status` to warn about.
        assert!(!dir.path().join(REFUSED).exists());
        // Nothing else may go (each host keeps its newest): said, and,
        // below `minpercent` (what `status` calls short of space), recorded.
        let mut all = opts.clone();
        all.max_deletions = None;
        let out = prune(&store, &all, &mut Vec::new()).unwrap();
        assert_eq!(out.deleted.len(), 0, "{out:?}");
        let why = out.refused.unwrap_or_default();
        assert!(why.contains("a restore or verify is reading"), "{why}");
        assert!(!dir.path().join(REFUSED).exists());
        all.minpercent = 100;
        let out = prune(&store, &all, &mut Vec::new()).unwrap();
        assert!(out.deleted.is_empty(), "{out:?}");
        let refused = std::fs::read_to_string(dir.path().join(REFUSED)).unwrap();
        assert_eq!(
            refused,
            "short of space: nothing left to delete now but 1 snapshot(s) a restore or verify is reading\n"
        );
        // Still readable through the restore's descriptor.
        assert!(fsops::open_dir(&reading, b"etc").is_ok());
        drop(reading);
        // Being deleted (its lock held): not opened to read.
        let deleting = host.lock_for_deletion(&first).unwrap().unwrap();
        let e = host.open_snapshot_to_read(&first).unwrap_err().to_string();
        assert!(e.contains("is being deleted"), "{e}");
        drop(deleting);
        // One session of a host holds a snapshot at a time: a client cannot
        // keep all of its snapshots from prunes with many sessions.
        let hold = host.restore_hold().unwrap().expect("the first hold");
        assert!(host.restore_hold().unwrap().is_none());
        drop(hold);
        assert!(host.restore_hold().unwrap().is_some());
        // Gone once the restore has ended, and the record with it.
        let out = prune(&store, &opts, &mut Vec::new()).unwrap();
        assert_eq!(out.deleted[0].name, first, "{out:?}");
        assert!(!dir.path().join("h").join(&first).exists());
        assert!(!dir.path().join(REFUSED).exists());
    }

    /// The recorded refusal `status` warns about is forgotten only once
    /// the store has `minpercent` free: not by a prune making room for one
    /// backup whose target is met while the store stays short. It is
    /// written whole (beside, then renamed), leaving nothing beside it.
    #[test]
    fn a_refusal_is_cleared_only_once_the_store_has_room() {
        let (dir, store, opts, _) = three_snapshots();
        let mut roomy = opts.clone();
        roomy.minpercent = 0;
        record_refusal(&store, &roomy, "short of space, said by the daily prune");
        let refused = || std::fs::read_to_string(dir.path().join(REFUSED)).ok();
        assert_eq!(
            refused().as_deref(),
            Some("short of space, said by the daily prune\n")
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !names.iter().any(|n| n.to_string_lossy().ends_with(".tmp")),
            "{names:?}"
        );
        // Room for one backup (nothing needed), the store short of its
        // 100 % free: kept.
        let mut for_one_backup = roomy.clone();
        for_one_backup.target_free = Some(0);
        for_one_backup.minpercent = 100;
        let out = prune(&store, &for_one_backup, &mut Vec::new()).unwrap();
        assert!(out.deleted.is_empty(), "{out:?}");
        assert!(refused().is_some(), "cleared by a prune making room");
        // One making room past the growth guard, deleting, the store still
        // short: kept too.
        let mut deleting = opts.clone();
        deleting.minpercent = 100;
        let out = prune(&store, &deleting, &mut Vec::new()).unwrap();
        assert_eq!(out.deleted.len(), 1, "{out:?}");
        assert!(
            refused().is_some(),
            "cleared by a prune making room past the guard"
        );
        let mut whole = roomy.clone();
        whole.target_free = None;
        prune(&store, &whole, &mut Vec::new()).unwrap();
        assert!(refused().is_none(), "kept once the store has room");
    }

    /// A deletion whose wait for the btrfs cleaner fails is still counted
    /// (the caps on deletions per backup and per day go by the count), and
    /// pruning stops there, saying why.
    #[test]
    fn a_deletion_whose_cleaner_wait_fails_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        store.host("h", true).unwrap();
        for snap in [
            "2026-11-01T03:00+0000",
            "2026-11-02T03:00+0000",
            "2026-11-03T03:00+0000",
        ] {
            std::fs::create_dir_all(dir.path().join("h").join(snap).join("etc")).unwrap();
        }
        let cfg = crate::config::StoreConfig::default();
        let now = 1_796_400_000;
        let mut opts = PruneOptions::server(&cfg, now, Some(u64::MAX));
        opts.max_deletions = Some(2);
        CLEANER_STUCK.with(|c| c.set(true));
        let mut log = Vec::new();
        let out = prune(&store, &opts, &mut log).unwrap();
        CLEANER_STUCK.with(|c| c.set(false));
        assert_eq!(out.deleted.len(), 1, "{out:?}");
        let why = out.refused.unwrap_or_default();
        assert!(why.starts_with("stopped after deleting"), "{why}");
        let left = std::fs::read_dir(dir.path().join("h"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("2026")
            })
            .count();
        assert_eq!(left, 2);
    }

    /// A host whose backups each stay under the guard's threshold but
    /// commit without snapshots (within the minimum interval, or cut off)
    /// has written their sum since its last snapshot: a backup that then
    /// runs out of room is judged on that sum, as its snapshot would be.
    #[test]
    fn growth_since_the_last_snapshot_counts_for_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        const MIB: u64 = 1 << 20;
        let capacity = 400 * MIB; // the guard's floor: 8 MiB
        let mut log = String::new();
        for (i, snap) in [
            "2026-11-01T03:00+0000",
            "2026-11-02T03:00+0000",
            "2026-11-03T03:00+0000",
        ]
        .iter()
        .enumerate()
        {
            log.push_str(&format!("{} {} {snap}\n", 1000 + i, 2 * MIB));
        }
        std::fs::write(dir.path().join("h").join(USAGE_LOG), &log).unwrap();
        let room = |written| RoomFor {
            host: &host,
            path: "x",
            need: MIB,
            written,
            credit: 0,
            quota: false,
        };
        // 7 MiB written and 1 MiB needed: not above 4 x 2 MiB.
        assert_eq!(own_only(&room(6 * MIB), capacity), None);
        // A transfer noted 8 MiB in the log, then ran out of space: the
        // log's 8 pending MiB and the 8 needed to send it again are one.
        std::fs::write(
            dir.path().join("h").join(USAGE_LOG),
            format!("{log}1500 {} - running\n", 8 * MIB),
        )
        .unwrap();
        let resend = |credit| RoomFor {
            need: 8 * MIB,
            credit,
            ..room(0)
        };
        assert_eq!(own_only(&resend(8 * MIB), capacity), None);
        assert!(own_only(&resend(0), capacity).is_some());
        // Twenty earlier runs of 7 MiB each, no snapshot among them.
        for k in 0..20 {
            log.push_str(&format!("{} {} -\n", 2000 + k, 7 * MIB));
        }
        // And a damaged byte on one line costs that line only.
        log.push_str("3000 \u{fffd}\n");
        let mut bytes = log.into_bytes();
        bytes.extend_from_slice(b"3001 \xff -\n");
        std::fs::write(dir.path().join("h").join(USAGE_LOG), &bytes).unwrap();
        let (usage, pending) = read_usage_pending(&host).unwrap();
        assert_eq!((usage.len(), pending), (3, 140 * MIB));
        let why = own_only(&room(6 * MIB), capacity).expect("a spike");
        assert!(why.contains("(the growth guard)"), "{why}");
    }

    /// What a host wrote since its last snapshot (backups within the
    /// minimum interval, or cut off) is judged as its next snapshot will
    /// be: a spike there stops pruning before any snapshot holds it, and
    /// accepting it accepts the snapshot that then holds it.
    #[test]
    fn growth_not_snapshotted_yet_is_a_spike_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        store.host("h", true).unwrap();
        const MIB: u64 = 1 << 20;
        let capacity = 400 * MIB;
        let names = [
            "2026-11-01T03:00+0000",
            "2026-11-02T03:00+0000",
            "2026-11-03T03:00+0000",
        ];
        let mut log = String::new();
        let mut snapshots = vec![];
        for (i, name) in names.iter().enumerate() {
            log.push_str(&format!("{} {} {name}\n", 1000 + i, 2 * MIB));
            std::fs::create_dir_all(dir.path().join("h").join(name)).unwrap();
            snapshots.push(Snapshot {
                host: "h".into(),
                name: name.to_string(),
                time: crate::time::parse_name(name).unwrap(),
            });
        }
        log.push_str(&format!("2000 {} -\n", 40 * MIB));
        let usage = dir.path().join("h").join(USAGE_LOG);
        std::fs::write(&usage, &log).unwrap();
        let open = |snaps: &[Snapshot]| open_spikes(&store, snaps, capacity, None).unwrap();
        let got = open(&snapshots);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].snapshot, "current-since-2026-11-03T03:00+0000");
        assert_eq!(got[0].new_bytes, 40 * MIB);
        // Accepted (as --prune-force does): no spike now, nor once the
        // snapshot that holds it is taken.
        std::fs::write(
            dir.path().join(ACCEPTED),
            format!("h/current-since-2026-11-03T03:00+0000 {}\n", 40 * MIB),
        )
        .unwrap();
        assert!(open(&snapshots).is_empty());
        // Accepted up to twice what it was: more is a spike again.
        std::fs::write(&usage, format!("{log}2001 {} -\n", 50 * MIB)).unwrap();
        let got = open(&snapshots);
        assert_eq!(got.len(), 1, "{got:?}");
        std::fs::write(&usage, &log).unwrap();
        let next = "2026-11-04T03:00+0000";
        log.push_str(&format!("2000 0 {next}\n"));
        std::fs::write(&usage, &log).unwrap();
        std::fs::create_dir_all(dir.path().join("h").join(next)).unwrap();
        // Taken, and its line written, after the prune listed the
        // snapshots: still the spike (it was missed, and the line had
        // ended the growth pending before it).
        std::fs::remove_file(dir.path().join(ACCEPTED)).unwrap();
        let got = open(&snapshots);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].snapshot, next);
        std::fs::write(
            dir.path().join(ACCEPTED),
            format!("h/current-since-2026-11-03T03:00+0000 {}\n", 40 * MIB),
        )
        .unwrap();
        snapshots.push(Snapshot {
            host: "h".into(),
            name: next.into(),
            time: crate::time::parse_name(next).unwrap(),
        });
        assert!(open(&snapshots).is_empty());
        // Not accepted: that snapshot is the spike.
        std::fs::remove_file(dir.path().join(ACCEPTED)).unwrap();
        let got = open(&snapshots);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].snapshot, next);
    }

    /// `--accept HOST/SNAPSHOT` accepts that spike only: a prune goes on
    /// while another host's spike is open only once that one is accepted
    /// too, `--prune-force` with `--accept` accepts no others, and a name
    /// that is no open spike is a usage error that names the open ones.
    /// Before, the admin's only way was `--prune-force`, which accepted
    /// every spike open, of every host, including any they had not seen.
    #[test]
    fn accepting_a_spike_by_name_accepts_that_one_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let names = [
            "2026-11-01T03:00+0000",
            "2026-11-02T03:00+0000",
            "2026-11-03T03:00+0000",
        ];
        // Far above 2 % of whatever filesystem holds the temporary
        // directory: the store's capacity is measured.
        const HUGE: u64 = 1 << 55;
        for host in ["a", "b"] {
            store.host(host, true).unwrap();
            let mut log = String::new();
            for (i, name) in names.iter().enumerate() {
                let bytes = if i == 2 { HUGE } else { 2 << 20 };
                log.push_str(&format!("{} {bytes} {name}\n", 1000 + i));
                std::fs::create_dir_all(dir.path().join(host).join(name)).unwrap();
            }
            std::fs::write(dir.path().join(host).join(USAGE_LOG), &log).unwrap();
        }
        let cfg = crate::config::StoreConfig::default();
        let mut opts = PruneOptions::server(&cfg, 1_796_400_000, None);
        (opts.minpercent, opts.maxpercent) = (100, 100);
        opts.max_deletions = Some(1);
        let spike = |h: &str| format!("{h}/{}", names[2]);
        let run = |opts: &PruneOptions| {
            let mut log = Vec::new();
            if !opts.accept.is_empty() {
                accept(&store, &opts.accept, opts.dry_run, &mut log)?;
            }
            let out = prune(&store, opts, &mut log)?;
            Ok::<_, Error>((out, String::from_utf8(log).unwrap()))
        };
        // Both open: refused, naming both.
        let (out, _) = run(&opts).unwrap();
        let why = out.refused.unwrap();
        assert!(
            why.contains(&spike("a")) && why.contains(&spike("b")),
            "{why}"
        );
        // A name that is no open spike: nothing accepted, the open named.
        opts.accept = vec!["a/2026-11-02T03:00+0000".into()];
        let e = run(&opts).unwrap_err().to_string();
        assert!(e.contains("no growth spike of that name"), "{e}");
        assert!(e.contains(&spike("a")) && e.contains(&spike("b")), "{e}");
        assert!(!dir.path().join(ACCEPTED).exists());
        // a's accepted, even when forced: b's still stops the prune.
        opts.accept = vec![spike("a")];
        opts.force = true;
        let (out, log) = run(&opts).unwrap();
        assert!(
            log.contains(&format!("accepting growth: {}", spike("a"))),
            "{log}"
        );
        assert!(out.deleted.is_empty(), "{out:?}");
        let why = out.refused.unwrap();
        assert!(
            why.contains(&spike("b")) && !why.contains(&spike("a")),
            "{why}"
        );
        let accepted = std::fs::read_to_string(dir.path().join(ACCEPTED)).unwrap();
        assert_eq!(accepted, format!("{}\n", spike("a")));
        // Accepting it again is no error (a script run twice), and adds
        // nothing.
        let mut log = Vec::new();
        accept(&store, &[spike("a")], false, &mut log).unwrap();
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("accepted already"), "{log}");
        let again = std::fs::read_to_string(dir.path().join(ACCEPTED)).unwrap();
        assert_eq!(again, accepted);
        // Then b's too: the prune goes on.
        opts.accept = vec![spike("b")];
        opts.force = false;
        let (out, _) = run(&opts).unwrap();
        assert_eq!((out.refused, out.deleted.len()), (None, 1));
    }

    /// A crash after a snapshot was taken and before its line: the next
    /// backup names it, so the growth is that snapshot's.
    #[test]
    fn a_snapshot_the_log_lost_is_named_by_the_next_backup() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        let t = 1_796_400_030;
        let name = crate::time::format_name(t, 0);
        std::fs::create_dir_all(dir.path().join("h").join(&name)).unwrap();
        record_written(&host, t, 5, None).unwrap();
        name_lost_snapshot(&host).unwrap();
        let (usage, pending) = read_usage_pending(&host).unwrap();
        assert_eq!(usage.len(), 1);
        assert_eq!(
            (usage[0].snapshot.as_str(), usage[0].new_bytes, pending),
            (name.as_str(), 5, 0)
        );
        // Named once: nothing more to do, and a later pending line of
        // another minute names nothing.
        name_lost_snapshot(&host).unwrap();
        record_written(&host, t + 600, 7, None).unwrap();
        name_lost_snapshot(&host).unwrap();
        assert_eq!(read_usage_lines(&host).len(), 2);
    }

    /// A backup's line and its snapshot's line are one backup to every
    /// reader; a backup line whose snapshot line never came (a crash)
    /// counts for the next snapshot.
    #[test]
    fn a_backup_and_its_snapshot_line_are_one_backup() {
        let (dir, host, sp) = host_with_space();
        record_written(&host, 100, 5, Some(&sp)).unwrap();
        record_snapshot(&host, 100, "s1", Some(&sp), 0).unwrap();
        record_written(&host, 200, 7, None).unwrap();
        // A crash here: s2 was taken but not named in the log.
        record_written(&host, 300, 11, Some(&sp)).unwrap();
        record_snapshot(&host, 300, "s3", None, 0).unwrap();
        record_written(&host, 400, 13, None).unwrap();
        let lines = read_usage_lines(&host);
        let line = |time, new_bytes, snapshot: Option<&str>, space| UsageLine {
            time,
            new_bytes,
            snapshot: snapshot.map(str::to_string),
            space,
            running: false,
        };
        assert_eq!(
            lines,
            vec![
                line(100, 5, Some("s1"), Some((70, 100))),
                line(200, 7, None, None),
                line(300, 11, Some("s3"), Some((70, 100))),
                line(400, 13, None, None),
            ]
        );
        let (usage, pending) = read_usage_pending(&host).unwrap();
        let per: Vec<(&str, u64)> = usage
            .iter()
            .map(|u| (u.snapshot.as_str(), u.new_bytes))
            .collect();
        assert_eq!((per, pending), (vec![("s1", 5), ("s3", 18)], 13));
        // A torn line (a crash mid-append) costs itself only: the next
        // starts on a line of its own.
        let log = dir.path().join("h").join(USAGE_LOG);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"450 99").unwrap();
        drop(f);
        record_written(&host, 500, 17, None).unwrap();
        // A backup whose own line could not be written (a full disc):
        // its bytes go on its snapshot's line.
        record_snapshot(&host, 600, "s6", None, 19).unwrap();
        let (usage, pending) = read_usage_pending(&host).unwrap();
        let last = usage.last().unwrap();
        assert_eq!(
            (last.snapshot.as_str(), last.new_bytes, pending),
            ("s6", 13 + 17 + 19, 0)
        );
    }
}

//! Progress of a backup or restore on a terminal.
//!
//! The pipeline only bumps [`Counters`] (relaxed atomic adds, per entry or
//! per segment; the name of the file read last is recorded per segment of
//! 2 to 4 MiB, only while a bar is shown, with a `try_lock` that never
//! waits). The bar
//! reads them when indicatif's own ticker redraws it, 10 times a second, so
//! drawing never slows the pipeline.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressState, ProgressStyle};

/// What a backup or restore has done so far.
#[derive(Debug)]
pub struct Counters {
    /// Entries found (by the walk, or selected for a restore).
    pub files_total: AtomicU64,
    /// Bytes of the regular files among them.
    pub bytes_total: AtomicU64,
    /// Entries finished (unchanged, sent and verified, or restored).
    pub files_done: AtomicU64,
    /// Bytes of files finished without being read (unchanged).
    pub bytes_skipped: AtomicU64,
    /// Bytes read from files being sent (or restored).
    pub bytes_read: AtomicU64,
    /// Bytes of compressed deltas put on the wire.
    pub wire: AtomicU64,
    /// The walk (or selection) has finished: the totals are final.
    pub walk_done: AtomicBool,
    /// Whether a bar is shown (only then is `current` kept).
    enabled: AtomicBool,
    current: Mutex<Option<PathBuf>>,
}

impl Counters {
    const fn new() -> Self {
        Counters {
            files_total: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            bytes_skipped: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            wire: AtomicU64::new(0),
            walk_done: AtomicBool::new(false),
            enabled: AtomicBool::new(false),
            current: Mutex::new(None),
        }
    }

    /// Back to zero (a retried backup starts over).
    pub fn reset(&self) {
        for c in [
            &self.files_total,
            &self.bytes_total,
            &self.files_done,
            &self.bytes_skipped,
            &self.bytes_read,
            &self.wire,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.walk_done.store(false, Ordering::Relaxed);
    }

    /// One more entry found, of `size` bytes.
    pub fn found(&self, size: u64) {
        self.files_total.fetch_add(1, Ordering::Relaxed);
        self.bytes_total.fetch_add(size, Ordering::Relaxed);
    }

    /// One entry finished without reading it (unchanged), of `size` bytes.
    pub fn skipped(&self, size: u64) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_skipped.fetch_add(size, Ordering::Relaxed);
    }

    /// One entry finished after it was read.
    pub fn finished(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` more bytes read.
    pub fn read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes on the wire.
    pub fn sent(&self, n: u64) {
        self.wire.fetch_add(n, Ordering::Relaxed);
    }

    /// The totals are final.
    pub fn walk_finished(&self) {
        self.walk_done.store(true, Ordering::Relaxed);
    }

    /// The file being sent or restored now (kept only while a bar is shown).
    pub fn current(&self, path: &Path) {
        if self.enabled.load(Ordering::Relaxed) {
            if let Ok(mut c) = self.current.try_lock() {
                *c = Some(path.to_path_buf());
            }
        }
    }
}

/// The backup's counters.
pub static BACKUP: Counters = Counters::new();
/// The restore's counters.
pub static RESTORE: Counters = Counters::new();

/// Which operation a bar shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `byteback-backup`: the total grows while the walk runs.
    Backup,
    /// `byteback-restore`: the selection grows as manifests are read.
    Restore,
}

impl Kind {
    fn counters(self) -> &'static Counters {
        match self {
            Kind::Backup => &BACKUP,
            Kind::Restore => &RESTORE,
        }
    }
}

/// A bar on stderr for as long as it lives; log lines print above it.
pub struct Bar {
    bar: ProgressBar,
    kind: Kind,
}

impl Bar {
    /// Starts drawing `kind`'s counters on stderr (see
    /// [`byteback_protocol::term::progress_wanted`] for when to).
    pub fn start(kind: Kind) -> Bar {
        let c = kind.counters();
        c.reset();
        c.enabled.store(true, Ordering::Relaxed);
        let rate = Arc::new(Mutex::new(Rate::default()));
        let style = ProgressStyle::with_template("{spinner} {figures}\n  {file}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .with_key(
                "figures",
                move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let mut r = crate::sync::lock(&rate);
                    let _ = w.write_str(&figures(kind, c, &mut r, Instant::now()));
                },
            )
            .with_key(
                "file",
                move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&current_line(c, kind));
                },
            );
        let bar = byteback_protocol::term::new_bar(style);
        Bar { bar, kind }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        let c = self.kind.counters();
        c.enabled.store(false, Ordering::Relaxed);
        *crate::sync::lock(&c.current) = None;
        byteback_protocol::term::hide_bar();
        self.bar.finish_and_clear();
    }
}

/// Throughput over the last few seconds, from samples of `bytes_read`.
#[derive(Debug, Default)]
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Bytes per second, once there are two samples half a second apart.
    fn update(&mut self, now: Instant, read: u64) -> Option<f64> {
        self.samples.push_back((now, read));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|&(t, _)| now.duration_since(t) > Duration::from_secs(5))
        {
            self.samples.pop_front();
        }
        let &(t0, b0) = self.samples.front()?;
        let dt = now.duration_since(t0).as_secs_f64();
        (dt >= 0.5).then(|| read.saturating_sub(b0) as f64 / dt)
    }
}

/// `[####>-----] 1.2 GiB/3.4 GiB  1234/5678 files  45 MiB/s  2.1 GiB on the wire  ETA 1m 20s`,
/// with `walking…` and `+` after the totals while they still grow.
fn figures(kind: Kind, c: &Counters, rate: &mut Rate, now: Instant) -> String {
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let final_ = c.walk_done.load(Ordering::Relaxed);
    let total = ld(&c.bytes_total);
    let read = ld(&c.bytes_read);
    let done = (ld(&c.bytes_skipped) + read).min(total);
    let files_total = ld(&c.files_total);
    let files_done = ld(&c.files_done).min(files_total);
    let more = if final_ { "" } else { "+" };
    let mut s = String::new();
    if final_ {
        let width = 20u64;
        let filled = (done * width).checked_div(total).unwrap_or(width) as usize;
        let filled = filled.min(20);
        let _ = write!(s, "[{}{}] ", "#".repeat(filled), "-".repeat(20 - filled));
    } else {
        s.push_str(match kind {
            Kind::Backup => "walking… ",
            Kind::Restore => "selecting… ",
        });
    }
    let _ = write!(
        s,
        "{}/{}{more}  {files_done}/{files_total}{more} {}",
        HumanBytes(done),
        HumanBytes(total),
        match kind {
            Kind::Backup => "files",
            Kind::Restore => "entries restored",
        }
    );
    let per_sec = rate.update(now, read);
    if final_ && files_done == files_total {
        // Everything is sent: the server verifies and commits.
        let _ = write!(
            s,
            "  {}",
            match kind {
                Kind::Backup => "committing…",
                Kind::Restore => "done",
            }
        );
        return s;
    }
    if let Some(r) = per_sec {
        let _ = write!(s, "  {}/s", HumanBytes(r as u64));
    }
    if kind == Kind::Backup {
        let _ = write!(s, "  {} on the wire", HumanBytes(ld(&c.wire)));
    }
    if final_ {
        if let Some(r) = per_sec.filter(|&r| r >= 1.0) {
            let secs = (total - done) as f64 / r;
            if secs < 1e7 {
                let _ = write!(
                    s,
                    "  ETA {}",
                    indicatif::HumanDuration(Duration::from_secs(secs as u64))
                );
            }
        }
    }
    s
}

/// `sending /path` (or `restoring`), cut to the terminal's width.
fn current_line(c: &Counters, kind: Kind) -> String {
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    if c.walk_done.load(Ordering::Relaxed) && ld(&c.files_done) >= ld(&c.files_total) {
        return String::new();
    }
    let path = match c.current.try_lock() {
        Ok(p) => p.clone(),
        Err(_) => return String::new(),
    };
    let Some(path) = path else {
        return String::new();
    };
    let verb = match kind {
        Kind::Backup => "sending",
        Kind::Restore => "restoring",
    };
    let shown = byteback_protocol::escape_bytes(path.as_os_str().as_encoded_bytes());
    let room = (byteback_protocol::term::width() as usize)
        .saturating_sub(verb.len() + 4)
        .max(10);
    let chars = shown.chars().count();
    if chars <= room {
        format!("{verb} {shown}")
    } else {
        let tail: String = shown.chars().skip(chars - (room - 1)).collect();
        format!("{verb} …{tail}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn figures_say_the_total_grows_until_the_walk_ends() {
        let c = Counters::new();
        c.found(1000);
        c.found(3000);
        c.skipped(1000);
        c.read(500);
        c.sent(100);
        let t0 = Instant::now();
        let mut r = Rate::default();
        let s = figures(Kind::Backup, &c, &mut r, t0);
        assert!(s.starts_with("walking… "), "{s}");
        assert!(s.contains("1/2+ files"), "{s}");
        assert!(s.contains("100 B on the wire"), "{s}");
        assert!(!s.contains("ETA"), "{s}");
        c.walk_finished();
        c.read(500);
        let s = figures(Kind::Backup, &c, &mut r, t0 + Duration::from_secs(2));
        assert!(s.starts_with("[##########----------] "), "{s}");
        assert!(s.contains("1/2 files"), "{s}");
        assert!(s.contains("250 B/s"), "{s}");
        assert!(s.contains("ETA 8 seconds"), "{s}");
    }
}

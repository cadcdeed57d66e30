//! `byteback-server status`: per host the newest snapshot, its age, how many
//! snapshots and how much data, for people (a table), Nagios (exit codes) and
//! machines (`--json`).

use std::fmt::Write as _;

use crate::error::{IoContext, Result};

use crate::fsops;
use crate::manifest::ManifestReader;
use crate::pruner;
use crate::space::{self, Space};
use crate::store::{Store, META_DIR, META_DIR_NAME};

/// One host's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    /// Host name.
    pub host: String,
    /// Newest snapshot name.
    pub newest: Option<String>,
    /// Seconds since the newest snapshot.
    pub age: Option<i64>,
    /// Number of snapshots.
    pub snapshots: usize,
    /// Bytes of file data in the newest snapshot (its manifest), if readable.
    pub size: Option<u64>,
    /// Bytes the backups of the retained snapshots wrote after the oldest of
    /// them (from the usage log): the history the host keeps on the disc.
    pub history: Option<u64>,
    /// Seconds since `byteback-server verify` last finished a whole pass over the host.
    pub verified_age: Option<i64>,
    /// Seconds since the host's oldest snapshot (dated in the past).
    pub oldest_age: Option<i64>,
    /// Damaged files the verification found (in snapshots still present), as `snapshot /path`.
    pub damaged: Vec<String>,
    /// Damaged files found beyond those listed (see
    /// [`crate::verify::MAX_DAMAGE_LISTED`]), counted only.
    pub damaged_unlisted: u64,
    /// Snapshots dated in the future (a clock set wrong when they were
    /// taken): never the newest, never pruned, a WARNING until deleted.
    pub future: Vec<String>,
    /// Directories in the host's folder not named as snapshots (see
    /// [`crate::store::HostStore::strays`]): a WARNING until moved away.
    pub strays: Vec<String>,
}

impl HostStatus {
    /// Damaged files known, listed or not.
    pub fn damaged_count(&self) -> u64 {
        self.damaged.len() as u64 + self.damaged_unlisted
    }
}

/// The whole store.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    /// Hosts by name.
    pub hosts: Vec<HostStatus>,
    /// Free space.
    pub space: Space,
    /// Why the last prune refused, if it did.
    pub prune_refused: Option<String>,
    /// Directories with a host's name holding neither `current` nor a
    /// snapshot: no hosts (see [`Store::not_hosts`]), named only.
    pub not_hosts: Vec<String>,
}

fn manifest_size(store: &Store, host: &str, snapshot: &str) -> Option<u64> {
    let h = store.host(host, false).ok()?;
    let snap = h.open_snapshot(snapshot).ok()?;
    let meta = fsops::open_dir(&snap, META_DIR).ok()?;
    let path = h.path.join(snapshot).join(META_DIR_NAME).join("manifest");
    let file = fsops::open_file(&meta, b"manifest").ok()?;
    // Recorded on the manifest when it was written (older servers did
    // not): decoded otherwise.
    if let Some(bytes) = crate::manifest::read_bytes(&file) {
        return Some(bytes);
    }
    let mut r = ManifestReader::new(file, &path).ok()?;
    let mut total = 0u64;
    while let Some(e) = r.next_entry().ok()? {
        if let byteback_protocol::Kind::File { size } = e.entry.kind {
            total = total.saturating_add(size);
        }
    }
    Some(total)
}

/// Collects the status of every host at time `now`.
pub fn collect(store: &Store, now: i64) -> Result<StoreStatus> {
    let mut hosts = vec![];
    let mut names = store.hosts()?;
    names.sort();
    for name in names {
        let h = store.host(&name, false)?;
        let snaps = h.snapshots()?;
        let slack = now.saturating_add(crate::prune::FUTURE_SLACK);
        let future: Vec<String> = snaps
            .iter()
            .filter(|(_, t)| *t > slack)
            .map(|(n, _)| n.clone())
            .collect();
        let newest = snaps.iter().rev().find(|(_, t)| *t <= slack).cloned();
        let usage = pruner::read_usage(&h);
        let kept: std::collections::HashSet<&str> = snaps.iter().map(|s| s.0.as_str()).collect();
        let retained: Vec<u64> = usage
            .iter()
            .filter(|u| kept.contains(u.snapshot.as_str()))
            .map(|u| u.new_bytes)
            .collect();
        let verify = crate::verify::State::load(&h);
        let damaged: Vec<String> = verify
            .damage
            .iter()
            .filter(|d| d.snapshot == "current" || kept.contains(d.snapshot.as_str()))
            .map(shown_damage)
            .collect();
        let damaged_unlisted = verify.damaged_count(|s| kept.contains(s)) - damaged.len() as u64;
        let oldest_age = snaps
            .iter()
            .find(|(_, t)| *t <= slack)
            .map(|(_, t)| now - t);
        hosts.push(HostStatus {
            verified_age: verify.last_full.map(|t| now - t),
            oldest_age,
            damaged,
            damaged_unlisted,
            future,
            strays: h.strays()?,
            size: newest
                .as_ref()
                .and_then(|(n, _)| manifest_size(store, &name, n)),
            history: (!retained.is_empty())
                .then(|| retained[1..].iter().fold(0u64, |a, b| a.saturating_add(*b))),
            age: newest.as_ref().map(|(_, t)| now - t),
            newest: newest.map(|(n, _)| n),
            snapshots: snaps.len(),
            host: name,
        });
    }
    Ok(StoreStatus {
        hosts,
        space: space::measure(store.fd()).op("measure", || store.root.display())?,
        prune_refused: pruner::refusal(store),
        not_hosts: store.not_hosts()?,
    })
}

/// Parses an age: seconds, or a number with `s`, `m`, `h`, `d` or `w`.
pub fn parse_age(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: i64 = num.parse().ok()?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Formats an age compactly: `45s`, `3h12m`, `2d4h`.
pub fn format_age(s: i64) -> String {
    if s < 0 {
        return format!("-{}", format_age(-s));
    }
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{} MiB", b.div_ceil(1 << 20)))
        .unwrap_or_else(|| "-".into())
}

/// What makes a host WARNING or CRITICAL: its last backup older than
/// `warn` or `crit` seconds, and with `verify` a whole verification older
/// than that (or none while its oldest snapshot is older than that).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// WARNING when the newest snapshot is older.
    pub warn: Option<i64>,
    /// CRITICAL when the newest snapshot is older.
    pub crit: Option<i64>,
    /// WARNING when the host was last verified whole longer ago.
    pub verify: Option<i64>,
}

impl Limits {
    /// Whether any threshold is given (the Nagios line is printed).
    pub fn any(&self) -> bool {
        self.warn.is_some() || self.crit.is_some() || self.verify.is_some()
    }
}

/// Why `h` is due a whole verification by `limit` (seconds), if it is: it
/// was last verified whole longer ago, or never while it has had
/// snapshots that long (a new host is not due yet).
pub fn verify_overdue(h: &HostStatus, limit: Option<i64>) -> Option<String> {
    let limit = limit?;
    match h.verified_age {
        Some(a) if a > limit => Some(format!(
            "{} last verified whole {} ago (byteback-server verify --host {})",
            h.host,
            format_age(a),
            h.host
        )),
        Some(_) => None,
        None => h.oldest_age.filter(|a| *a > limit).map(|a| {
            format!(
                "{} never verified whole, with snapshots since {} ago (byteback-server verify --host {})",
                h.host,
                format_age(a),
                h.host
            )
        }),
    }
}

/// The state of one host's last backup by its age alone: 0 OK, 1 WARNING,
/// 2 CRITICAL (a host without snapshots is critical whenever either
/// threshold is given: it has no backup at all).
pub fn age_state(age: Option<i64>, warn: Option<i64>, crit: Option<i64>) -> u8 {
    let Some(age) = age else {
        return if warn.is_some() || crit.is_some() {
            2
        } else {
            0
        };
    };
    if crit.is_some_and(|c| age > c) {
        2
    } else if warn.is_some_and(|w| age > w) {
        1
    } else {
        0
    }
}

/// One host's state: its age's, at least WARNING with damaged files or a
/// verification overdue.
pub fn host_state(h: &HostStatus, limits: &Limits) -> u8 {
    let c = age_state(h.age, limits.warn, limits.crit);
    if h.damaged_count() == 0
        && h.future.is_empty()
        && h.strays.is_empty()
        && verify_overdue(h, limits.verify).is_none()
    {
        c
    } else {
        c.max(1)
    }
}

/// The words for states 0, 1, 2 (and 3, the store could not be read).
pub const STATE_WORDS: [&str; 4] = ["OK", "WARNING", "CRITICAL", "UNKNOWN"];

/// Nagios state: 0 OK, 1 WARNING, 2 CRITICAL, with the reason.
pub fn check(st: &StoreStatus, limits: &Limits) -> (u8, String) {
    let mut code = 0;
    let mut problems = vec![];
    for h in &st.hosts {
        let c = age_state(h.age, limits.warn, limits.crit);
        if c > 0 {
            problems.push(match h.age {
                Some(a) => format!("{} last backup {} ago", h.host, format_age(a)),
                None => format!("{} has no snapshot", h.host),
            });
        }
        code = code.max(c);
        if h.damaged_count() > 0 {
            code = code.max(1);
            problems.push(format!(
                "{} has {} damaged files (byteback-server verify --host {})",
                h.host,
                h.damaged_count(),
                h.host
            ));
        }
        if let Some(why) = verify_overdue(h, limits.verify) {
            code = code.max(1);
            problems.push(why);
        }
        if !h.future.is_empty() {
            code = code.max(1);
            problems.push(format!(
                "{} has snapshots dated in the future: {} (a clock set wrong? delete them once checked)",
                h.host,
                h.future.join(", ")
            ));
        }
    }
    for h in st.hosts.iter().filter(|h| !h.strays.is_empty()) {
        code = code.max(1);
        problems.push(format!(
            "{} has directories not named as snapshots, never pruned or restored: {}",
            h.host,
            h.strays.join(", ")
        ));
    }
    if let Some(why) = &st.prune_refused {
        code = code.max(1);
        problems.push(format!("prune refused: {}", why.trim()));
    }
    let word = STATE_WORDS[code as usize];
    let detail = if problems.is_empty() {
        format!("{} hosts backed up, {}", st.hosts.len(), st.space)
    } else {
        problems.join("; ")
    };
    (code, format!("BYTEBACK {word} - {detail}"))
}

/// The human table.
pub fn table(st: &StoreStatus) -> String {
    let mut out = String::new();
    let w = st
        .hosts
        .iter()
        .map(|h| h.host.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:w$}  {:25}  {:>9}  {:>9}  {:>10}  {:>10}  {:>9}",
        "host", "newest", "age", "snapshots", "size", "history", "verified"
    );
    for h in &st.hosts {
        let _ = writeln!(
            out,
            "{:w$}  {:25}  {:>9}  {:>9}  {:>10}  {:>10}  {:>9}",
            h.host,
            h.newest.as_deref().unwrap_or("-"),
            h.age.map(format_age).unwrap_or_else(|| "-".into()),
            h.snapshots,
            mib(h.size),
            mib(h.history),
            h.verified_age
                .map(|a| format!("{} ago", format_age(a)))
                .unwrap_or_else(|| "never".into()),
        );
        for d in &h.damaged {
            let _ = writeln!(out, "  DAMAGED {d}");
        }
        if h.damaged_unlisted > 0 {
            let _ = writeln!(
                out,
                "  DAMAGED and {} more files, not listed",
                h.damaged_unlisted
            );
        }
        for f in &h.future {
            let _ = writeln!(out, "  DATED IN THE FUTURE {f}");
        }
        for d in &h.strays {
            let _ = writeln!(out, "  NOT A SNAPSHOT NAME {d} (never pruned or restored)");
        }
    }
    let _ = writeln!(out, "store: {}", st.space);
    if let Some(why) = &st.prune_refused {
        let _ = writeln!(out, "prune refused: {}", why.trim());
    }
    if !st.not_hosts.is_empty() {
        let _ = writeln!(
            out,
            "not hosts (no current, no snapshot; never pruned or verified): {}",
            st.not_hosts.join(", ")
        );
    }
    out
}

/// The machine form (`--json`): one JSON object, with each host's state and
/// the store's (by `limits`, as the exit code) and the Nagios line.
pub fn json(st: &StoreStatus, limits: &Limits) -> String {
    let (code, line) = check(st, limits);
    let hosts: Vec<serde_json::Value> = st
        .hosts
        .iter()
        .map(|h| {
            serde_json::json!({
                "host": h.host,
                "state": STATE_WORDS[host_state(h, limits) as usize],
                "newest": h.newest,
                "age_seconds": h.age,
                "snapshots": h.snapshots,
                "size_bytes": h.size,
                "history_bytes": h.history,
                "verified_age_seconds": h.verified_age,
                "verify_overdue": verify_overdue(h, limits.verify).is_some(),
                "damaged": h.damaged,
                "damaged_unlisted": h.damaged_unlisted,
                "dated_in_the_future": h.future,
                "not_snapshots": h.strays,
            })
        })
        .collect();
    let v = serde_json::json!({
        "hosts": hosts,
        "free_percent": (st.space.percent_free() * 100.0).round() / 100.0,
        "free_bytes": st.space.free,
        "size_bytes": st.space.size,
        "prune_refused": st.prune_refused.as_deref().map(str::trim),
        "not_hosts": st.not_hosts,
        "state": STATE_WORDS[code as usize],
        "summary": line,
        "exit_code": code,
    });
    format!("{v}\n")
}

/// A damaged file as `status` lists it: `SNAPSHOT /PATH`, the path's bytes
/// escaped, `|` too: Nagios takes what follows one for performance data,
/// which would hide the lines after it (other hosts' damage among them).
fn shown_damage(d: &crate::verify::Damage) -> String {
    let path = crate::error::shown(&d.path).replace('|', "\\x7c");
    format!("{} /{path}", d.snapshot)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_damaged_path_cannot_end_the_lines_nagios_reads() {
        let d = crate::verify::Damage {
            snapshot: "current".into(),
            path: b"a|b\n\x1b[2J\xff\xc3\xa9\\".to_vec(),
            problem: String::new(),
        };
        assert_eq!(
            shown_damage(&d),
            "current /a\\x7cb\\x0a\\x1b[2J\\xff\u{e9}\\\\"
        );
    }

    #[test]
    fn ages_parse_and_format() {
        assert_eq!(parse_age("90"), Some(90));
        assert_eq!(parse_age("26h"), Some(26 * 3600));
        assert_eq!(parse_age("2d"), Some(172_800));
        assert_eq!(parse_age("1w"), Some(604_800));
        assert_eq!(parse_age("5x"), None);
        assert_eq!(parse_age("h"), None);
        assert_eq!(format_age(45), "45s");
        assert_eq!(format_age(3 * 3600 + 12 * 60), "3h12m");
        assert_eq!(format_age(2 * 86_400 + 4 * 3600), "2d04h");
    }

    /// Host `h`, its newest snapshot `age` seconds old, nothing wrong.
    fn host_aged(age: Option<i64>) -> HostStatus {
        HostStatus {
            host: "h".into(),
            newest: None,
            age,
            snapshots: 1,
            size: None,
            history: None,
            verified_age: None,
            oldest_age: None,
            damaged: vec![],
            damaged_unlisted: 0,
            future: vec![],
            strays: vec![],
        }
    }

    /// A store of `hosts`, half free.
    fn store_of(hosts: Vec<HostStatus>) -> StoreStatus {
        StoreStatus {
            hosts,
            space: Space {
                size: 100,
                free: 50,
                data_percent: 50.0,
                metadata_percent: None,
                source: "statvfs",
            },
            prune_refused: None,
            not_hosts: vec![],
        }
    }

    #[test]
    fn nagios_codes() {
        let h = host_aged;
        let st = store_of;
        let l = Limits {
            warn: Some(100),
            crit: Some(200),
            verify: None,
        };
        assert_eq!(check(&st(vec![h(Some(50))]), &l).0, 0);
        assert_eq!(check(&st(vec![h(Some(50)), h(Some(150))]), &l).0, 1);
        assert_eq!(check(&st(vec![h(Some(250)), h(Some(150))]), &l).0, 2);
        assert_eq!(check(&st(vec![h(None)]), &l).0, 2);
        // No snapshot at all: critical with --warn alone too (it was a
        // warning then), and OK only without thresholds.
        let warn_only = Limits { crit: None, ..l };
        assert_eq!(check(&st(vec![h(None)]), &warn_only).0, 2);
        assert_eq!(age_state(None, None, None), 0);
        let mut s = st(vec![h(Some(1))]);
        s.prune_refused = Some("x".into());
        assert_eq!(check(&s, &l).0, 1);
        let v: serde_json::Value = serde_json::from_str(&json(&s, &l)).unwrap();
        assert_eq!(v["prune_refused"], "x");
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["state"], "WARNING");
        assert_eq!(v["hosts"][0]["state"], "OK");
        // A snapshot dated in the future is a WARNING, named.
        let mut ahead = h(Some(1));
        ahead.future = vec!["2027-01-01T03:00+0000".into()];
        let (code, line) = check(&st(vec![ahead]), &l);
        assert_eq!(code, 1);
        assert!(
            line.contains("dated in the future: 2027-01-01T03:00+0000"),
            "{line}"
        );
    }

    /// With `--verify-warn`, a host verified whole too long ago is a
    /// WARNING, and one never verified whole only once its oldest snapshot
    /// is that old (a new host is not due yet).
    #[test]
    fn a_verification_overdue_is_a_warning() {
        let h = |verified_age: Option<i64>, oldest_age: Option<i64>| HostStatus {
            verified_age,
            oldest_age,
            ..host_aged(Some(10))
        };
        let st = |host| store_of(vec![host]);
        let l = Limits {
            warn: Some(100),
            crit: Some(200),
            verify: Some(1000),
        };
        for (verified, oldest, want) in [
            (Some(999), Some(5000), 0),
            (Some(1001), Some(5000), 1),
            (None, Some(999), 0),
            (None, Some(1001), 1),
            (None, None, 0),
        ] {
            let s = st(h(verified, oldest));
            let (code, line) = check(&s, &l);
            assert_eq!(code, want, "{verified:?} {oldest:?}: {line}");
            assert_eq!(host_state(&s.hosts[0], &l), want);
            let v: serde_json::Value = serde_json::from_str(&json(&s, &l)).unwrap();
            assert_eq!(v["hosts"][0]["verify_overdue"], want == 1);
            // Without the flag, never.
            let plain = Limits { verify: None, ..l };
            assert_eq!(check(&s, &plain).0, 0);
        }
        let (_, line) = check(&st(h(Some(90_000), Some(900_000))), &l);
        assert!(
            line.contains("h last verified whole 1d01h ago (byteback-server verify --host h)"),
            "{line}"
        );
        let (_, line) = check(&st(h(None, Some(90_000))), &l);
        assert!(
            line.contains("h never verified whole, with snapshots since 1d01h ago"),
            "{line}"
        );
    }

    /// A directory in a host's folder whose name is no snapshot's (an
    /// admin's copy, a renamed snapshot) is never pruned: status names it,
    /// a WARNING; hidden ones are byteback's own, `current` is the backup.
    #[test]
    fn directories_not_named_as_snapshots_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = store.host("h", true).unwrap();
        for d in [
            "current",
            "2026-11-01T03:00+0000",
            "2026-11-01T03:00+0000.copy",
            "old",
            ".deleting-2026-10-01T03:00+0000",
        ] {
            std::fs::create_dir_all(dir.path().join("h").join(d)).unwrap();
        }
        std::fs::write(dir.path().join("h/a-file"), b"").unwrap();
        assert_eq!(
            host.strays().unwrap(),
            ["2026-11-01T03:00+0000.copy", "old"]
        );
        let st = collect(&store, 1_796_400_000).unwrap();
        let (code, line) = check(&st, &Limits::default());
        assert_eq!(code, 1, "{line}");
        assert!(
            line.contains("h has directories not named as snapshots, never pruned or restored: 2026-11-01T03:00+0000.copy, old"),
            "{line}"
        );
        assert!(table(&st).contains("NOT A SNAPSHOT NAME old"));
    }
}

//! Maintenance-free disc: snapshots after commit, the minimum interval,
//! importance pruning on a real btrfs loop filesystem driven through `--now`,
//! multi-host fairness, the growth guard, status, and 1.x-named stores.

use crate::util;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use byteback_server::prune::{importance_targets, next_to_delete, prune_order, Order, Snapshot};
use byteback_server::time::{days_from_civil, parse_name};
use util::*;

const DAY: i64 = 86_400;

struct Clocked {
    wrapper: PathBuf,
    store: PathBuf,
}

impl Clocked {
    fn backup(&self, src: &Path, host: &str, now: i64) -> Output {
        run_status(&mut backup_at(&self.store, &self.wrapper, src, host, now))
    }

    fn prune(&self, now: i64, args: &[&str]) -> Output {
        run_status(
            Command::new(bin("byteback-prune"))
                .env("TZ", "UTC")
                .arg("--store")
                .arg(&self.store)
                .args(["--now", &rfc3339(now)])
                .args(args),
        )
    }

    fn status(&self, now: i64, args: &[&str]) -> Output {
        run_status(
            Command::new(bin("byteback-server"))
                .env("TZ", "UTC")
                .args(["status", "--store"])
                .arg(&self.store)
                .args(["--now", &rfc3339(now)])
                .args(args),
        )
    }

    fn free_percent(&self, now: i64) -> f64 {
        let out = self.status(now, &["--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["free_percent"].as_f64().unwrap()
    }

    fn snapshots(&self) -> BTreeSet<Snapshot> {
        let mut out = BTreeSet::new();
        for h in fs::read_dir(&self.store).unwrap() {
            let h = h.unwrap();
            if !h.file_type().unwrap().is_dir() {
                continue;
            }
            let host = h.file_name().to_string_lossy().into_owned();
            for s in fs::read_dir(h.path()).unwrap() {
                let name = s.unwrap().file_name().to_string_lossy().into_owned();
                if let Some(time) = parse_name(&name) {
                    out.insert(Snapshot {
                        host: host.clone(),
                        name,
                        time,
                    });
                }
            }
        }
        out
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `host/name` of every "deleted" line the server's prune logged.
fn deletions(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("byteback-prune: deleted "))
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

fn write_random(path: &Path, len: usize, rng: &mut Rng) {
    fs::write(path, rng.bytes(len)).unwrap();
}

/// One simulated machine: a static part written once, "hot" files rewritten
/// every day (each version lives only in that day's snapshot), a log that
/// grows by appends, documents created and deleted after a month, and for a
/// growing host a data directory that only ever gains files.
struct Machine {
    name: &'static str,
    src: PathBuf,
    rng: Rng,
    hot: Vec<usize>,
    grows_by: usize,
    day: u64,
}

impl Machine {
    fn new(
        root: &Path,
        name: &'static str,
        static_mib: usize,
        hot: Vec<usize>,
        grows_by: usize,
    ) -> Machine {
        let src = root.join(name);
        let mut rng = Rng::new(name.len() as u64 * 7919 + u64::from(name.as_bytes()[0]));
        for d in ["static", "hot", "log", "docs", "data"] {
            fs::create_dir_all(src.join(d)).unwrap();
        }
        for i in 0..static_mib {
            write_random(&src.join(format!("static/blob{i}")), 1 << 20, &mut rng);
        }
        Machine {
            name,
            src,
            rng,
            hot,
            grows_by,
            day: 0,
        }
    }

    fn churn(&mut self) {
        self.day += 1;
        let day = self.day;
        for (i, &len) in self.hot.clone().iter().enumerate() {
            let jitter = self.rng.below(len as u64 / 4 + 1) as usize;
            write_random(
                &self.src.join(format!("hot/h{i}")),
                len - jitter,
                &mut self.rng,
            );
        }
        let mut log = fs::read(self.src.join("log/app.log")).unwrap_or_default();
        log.extend(format!("day {day}: all well\n").repeat(200).as_bytes());
        fs::write(self.src.join("log/app.log"), log).unwrap();
        write_random(
            &self.src.join(format!("docs/d{day}")),
            30_000,
            &mut self.rng,
        );
        let _ = fs::remove_file(self.src.join(format!("docs/d{}", day.saturating_sub(30))));
        if self.grows_by > 0 {
            write_random(
                &self.src.join(format!("data/g{day}")),
                self.grows_by,
                &mut self.rng,
            );
        }
    }
}

/// Replays the prune decisions with the pure functions: each deletion the
/// server logged must be the one `prune_order` names next, and what is left
/// must be what is on the disc. The client of `host` is told its own
/// snapshots by name, other hosts' only as "a snapshot of another host".
fn check_deletions(
    before: &BTreeSet<Snapshot>,
    after: &BTreeSet<Snapshot>,
    made: &[Snapshot],
    deleted: &[String],
    now: i64,
    host: &str,
) {
    let mut set: Vec<Snapshot> = before.iter().cloned().collect();
    set.extend(made.iter().cloned());
    for d in deleted {
        let order = prune_order(&set, now, 0, Order::Importance);
        let victim = next_to_delete(&order, i64::MAX, |_| true).unwrap().clone();
        let shown = if victim.host == host {
            victim.to_string()
        } else {
            "a snapshot of another host".to_string()
        };
        assert_eq!(&shown, d, "deleted out of order ({victim})");
        set.retain(|s| *s != victim);
    }
    let set: BTreeSet<Snapshot> = set.into_iter().collect();
    assert_eq!(&set, after);
}

/// 400 days of backups of three hosts into a 512 MiB btrfs filesystem:
/// the disc never fills, no backup fails, free space stays between the
/// thresholds once pruning has started, every deletion follows the importance
/// order, and what is kept at the end is what the importance targets name.
#[test]
fn four_hundred_days_on_a_fixed_disc() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let started = Instant::now();
    let fs_ = BtrfsLoop::new(512);
    let d = scratch();
    let store = fs_.mount.join("store");
    fs::create_dir_all(&store).unwrap();
    // Defaults (6 h interval, 5 % / 10 %), written out as an admin would.
    fs::write(
        store.join("byteback.toml"),
        "min_snapshot_interval = 21600\nminpercent = 5\nmaxpercent = 10\n",
    )
    .unwrap();
    let sim = Clocked {
        wrapper: server_wrapper(d.path()),
        store: store.clone(),
    };
    let mut machines = [
        Machine::new(d.path(), "alpha", 60, vec![1 << 20, 700 << 10], 0),
        Machine::new(d.path(), "beta", 20, vec![900 << 10], 300 << 10),
        Machine::new(d.path(), "gamma", 30, vec![1 << 20, 300 << 10], 0),
    ];
    let start = days_from_civil(2025, 1, 1) * DAY;
    let days = 400;
    let mut rng = Rng::new(99);
    let mut stats = Stats::default();
    for day in 0..days {
        for (k, m) in machines.iter_mut().enumerate() {
            for at in runs_of_the_day(m, k, &mut rng) {
                backup_within_the_thresholds(&sim, m, start + day * DAY + at, day, &mut stats);
            }
        }
    }
    let end = start + (days - 1) * DAY + 12 * 3600;
    let kept = sim.snapshots();
    let by_host = retained_ages(&kept, end);
    eprintln!(
        "simulation: {days} days, {} backups, {} snapshots pruned (from day {:?}), \
         free space after pruning began {:.1}%..{:.1}%, {:.0} s",
        stats.backups,
        stats.deleted_total,
        stats.pruning_started,
        stats.range.0,
        stats.range.1,
        started.elapsed().as_secs_f64()
    );
    for (host, ages) in &by_host {
        eprintln!("retained ages of {host} (days): {ages:?}");
    }
    let status = sim.status(end, &[]);
    eprintln!("{}", text(&status.stdout));
    assert!(
        stats.pruning_started.is_some(),
        "the disc never needed pruning: the test proves nothing"
    );
    assert_kept_is_the_importance_targets(&kept, end, &by_host);
}

/// The free-space thresholds of the 400-day simulation (its byteback.toml).
const MIN_FREE: f64 = 5.0;
const MAX_FREE: f64 = 10.0;

/// What the 400-day simulation counts.
struct Stats {
    backups: usize,
    deleted_total: usize,
    /// The day of the first deletion.
    pruning_started: Option<i64>,
    /// Lowest and highest free space (%) after pruning began.
    range: (f64, f64),
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            backups: 0,
            deleted_total: 0,
            pruning_started: None,
            range: (f64::MAX, f64::MIN),
        }
    }
}

/// The seconds after midnight at which machine `m` (the `k`th) backs up
/// today: the daily hosts once, a few minutes apart; gamma fails on about a
/// third of the days, and now and then backs up twice in a day.
fn runs_of_the_day(m: &Machine, k: usize, rng: &mut Rng) -> Vec<i64> {
    if m.name == "gamma" {
        match rng.below(10) {
            0..=2 => vec![],
            3 => vec![2 * 3600, 15 * 3600],
            _ => vec![4 * 3600],
        }
    } else {
        vec![3 * 3600 + k as i64 * 600]
    }
}

/// One backup of `m` at `now` (on `day`): it succeeds with one new
/// snapshot, never runs out of space, deletes only in importance order, and
/// once pruning has begun leaves free space within the thresholds.
fn backup_within_the_thresholds(
    sim: &Clocked,
    m: &mut Machine,
    now: i64,
    day: i64,
    stats: &mut Stats,
) {
    m.churn();
    let before = sim.snapshots();
    let out = sim.backup(&m.src, m.name, now);
    stats.backups += 1;
    let err = text(&out.stderr);
    assert!(
        out.status.success() && !err.contains("No space left"),
        "day {day}: backup of {} failed:\n{err}",
        m.name
    );
    let after = sim.snapshots();
    let made: Vec<Snapshot> = after
        .difference(&before)
        .filter(|s| s.time == now - now.rem_euclid(60))
        .cloned()
        .collect();
    assert_eq!(
        made.len(),
        1,
        "day {day}: {} took no snapshot:\n{err}",
        m.name
    );
    let deleted = deletions(&err);
    if !deleted.is_empty() && stats.pruning_started.is_none() {
        stats.pruning_started = Some(day);
    }
    stats.deleted_total += deleted.len();
    check_deletions(&before, &after, &made, &deleted, now, m.name);
    if stats.pruning_started.is_some() {
        let free = sim.free_percent(now);
        stats.range = (stats.range.0.min(free), stats.range.1.max(free));
        assert!(
            free >= MIN_FREE,
            "day {day}: {free:.1}% free after {}'s backup\n{err}",
            m.name
        );
        assert!(
            free <= MAX_FREE + 5.0,
            "day {day}: pruned far past the target: {free:.1}% free after {}'s backup\n{err}",
            m.name
        );
    }
}

/// The ages (days before `end`) of each host's kept snapshots, sorted.
fn retained_ages(kept: &BTreeSet<Snapshot>, end: i64) -> BTreeMap<&str, Vec<i64>> {
    let mut by_host: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for s in kept {
        by_host
            .entry(&s.host)
            .or_default()
            .push((end - s.time) / DAY);
    }
    for ages in by_host.values_mut() {
        ages.sort();
    }
    by_host
}

/// Kept == the importance targets: for each daily host, the snapshot
/// nearest each target is kept for a run of targets from the most
/// important on, and every kept snapshot is nearest to one of them.
fn assert_kept_is_the_importance_targets(
    kept: &BTreeSet<Snapshot>,
    end: i64,
    by_host: &BTreeMap<&str, Vec<i64>>,
) {
    let oldest = kept.iter().map(|s| s.time).min().unwrap();
    let targets = importance_targets(end, 0, oldest);
    for host in ["alpha", "beta"] {
        let mine: Vec<&Snapshot> = kept.iter().filter(|s| s.host == host).collect();
        let nearest = |t: i64| {
            mine.iter()
                .min_by_key(|s| (s.time - t).abs())
                .map(|s| (s.time - t).abs())
                .unwrap()
        };
        let covered = targets.iter().take_while(|&&t| nearest(t) < DAY).count();
        assert!(
            covered >= 11,
            "{host}: only {covered} targets kept: {:?}",
            by_host[host]
        );
        for s in &mine {
            let near = targets[..covered.min(targets.len())]
                .iter()
                .any(|&t| (s.time - t).abs() < DAY);
            let newest = mine.iter().all(|o| o.time <= s.time);
            let recent = end - s.time < 35 * DAY;
            assert!(
                near || newest || recent,
                "{host}: kept {} which no target names (ages {:?})",
                s.name,
                by_host[host]
            );
        }
        let span = by_host[host].last().unwrap();
        eprintln!(
            "{host}: {covered} of {} targets kept, history reaches back {span} days",
            targets.len()
        );
    }
}

/// Two steady hosts share the pruning; then one host's backup suddenly writes
/// far more than usual: the prune refuses to evict the other host's history,
/// says so (stderr, `status`, exit 3), and accepting that spike by name
/// (`--accept`) is the admin's way on.
#[test]
fn hosts_share_the_disc_and_a_sudden_giant_backup_needs_the_admin() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(256);
    let d = scratch();
    let store = fs_.mount.join("store");
    fs::create_dir_all(&store).unwrap();
    fs::write(
        store.join("byteback.toml"),
        "minpercent = 10\nmaxpercent = 25\n",
    )
    .unwrap();
    let sim = Clocked {
        wrapper: server_wrapper(d.path()),
        store: store.clone(),
    };
    let mut a = Machine::new(d.path(), "a", 30, vec![3 << 20], 0);
    let mut b = Machine::new(d.path(), "b", 30, vec![3 << 20], 0);
    let start = days_from_civil(2026, 3, 1) * DAY + 3 * 3600;
    let mut now = start;
    let mut pruned = 0;
    for day in 0..30 {
        now = start + day * DAY;
        for m in [&mut a, &mut b] {
            m.churn();
            let out = sim.backup(&m.src, m.name, now);
            assert!(out.status.success(), "{}", text(&out.stderr));
            pruned += deletions(&text(&out.stderr)).len();
        }
        let snaps = sim.snapshots();
        let count = |h: &str| snaps.iter().filter(|s| s.host == h).count() as i64;
        if pruned > 0 {
            // Fairness: hosts with the same habits keep the same history.
            assert!((count("a") - count("b")).abs() <= 2, "day {day}: {snaps:?}");
        }
    }
    assert!(pruned > 0, "the disc never needed pruning");
    // The admin makes room by hand (a dry run first); then b suddenly backs up
    // 45 MiB of junk (about a quarter of the disc).
    let p = sim.prune(
        now,
        &[
            "--prune",
            "--dry-run",
            "--minpercent",
            "45",
            "--maxpercent",
            "50",
        ],
    );
    assert!(
        text(&p.stderr).contains("would delete"),
        "{}",
        text(&p.stderr)
    );
    let p = sim.prune(
        now,
        &["--prune", "--minpercent", "45", "--maxpercent", "50"],
    );
    assert!(p.status.success(), "{}", text(&p.stderr));
    let mut rng = Rng::new(5);
    for i in 0..45 {
        write_random(&b.src.join(format!("data/junk{i}")), 1 << 20, &mut rng);
    }
    let a_before: BTreeSet<Snapshot> = sim
        .snapshots()
        .into_iter()
        .filter(|s| s.host == "a")
        .collect();
    let mut refused = false;
    // Until the disc needs pruning again: a few days of churn, more when
    // btrfs is slow to account the space under load.
    for _ in 0..20 {
        run(&mut Command::new("sync"));
        now += DAY;
        for m in [&mut b, &mut a] {
            let out = sim.backup(&m.src, m.name, now);
            let err = text(&out.stderr);
            assert!(out.status.success(), "{err}");
            assert!(
                deletions(&err).is_empty(),
                "pruned despite the spike: {err}"
            );
            refused |= err.contains("not pruning: b/");
            m.churn();
        }
        if refused {
            break;
        }
    }
    assert!(refused, "the growth guard never spoke");
    let a_after: BTreeSet<Snapshot> = sim
        .snapshots()
        .into_iter()
        .filter(|s| s.host == "a")
        .collect();
    assert!(
        a_before.is_subset(&a_after),
        "a's history was evicted for b's junk"
    );
    // Monitoring sees the refusal; a plain prune keeps refusing.
    let st = sim.status(now + 700, &["--warn", "2d", "--crit", "4d"]);
    assert_eq!(st.status.code(), Some(1), "{}", text(&st.stdout));
    assert!(
        text(&st.stdout).contains("prune refused"),
        "{}",
        text(&st.stdout)
    );
    let p = sim.prune(now + 800, &["--prune"]);
    assert_eq!(p.status.code(), Some(3), "{}", text(&p.stderr));
    // The admin accepts the growth the refusal names (a name that is no
    // open spike is a usage error): pruning resumes and reaches the target.
    let err = text(&p.stderr);
    let spike = err
        .split("not pruning: ")
        .nth(1)
        .and_then(|r| r.split(" wrote ").next())
        .unwrap_or_else(|| panic!("no spike named: {err}"))
        .to_string();
    assert!(spike.starts_with("b/"), "{err}");
    let p = sim.prune(now + 850, &["--accept", "a/2026-03-01T03:00+0000"]);
    assert_eq!(p.status.code(), Some(2), "{}", text(&p.stderr));
    assert!(text(&p.stderr).contains(&spike), "{}", text(&p.stderr));
    let p = sim.prune(now + 900, &["--prune-force", "--accept", &spike]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    assert!(
        text(&p.stderr).contains(&format!("accepting growth: {spike}")),
        "{}",
        text(&p.stderr)
    );
    assert!(
        !deletions(&text(&p.stderr)).is_empty(),
        "{}",
        text(&p.stderr)
    );
    let p = sim.prune(now + 1000, &["--prune"]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    assert!(sim.free_percent(now + 1000) >= 10.0);
    let st = sim.status(now + 1100, &["--warn", "2d", "--crit", "4d"]);
    assert_eq!(st.status.code(), Some(0), "{}", text(&st.stdout));
}

/// The server snapshots only when the newest is older than the minimum
/// interval; a refused snapshot still leaves the backup in `current`.
/// A store short of space that pruning cannot help (every snapshot is
/// younger than 7 days) is not silent: `status` turns WARNING and says
/// why, until a prune finds room again.
#[test]
fn a_store_short_of_space_that_pruning_cannot_help_is_a_warning() {
    let d = scratch();
    let store = d.path().join("store");
    fs::create_dir_all(&store).unwrap();
    // Always short of space: at least 100 % free wanted.
    fs::write(
        store.join("byteback.toml"),
        "min_snapshot_interval = 0\nminpercent = 100\nmaxpercent = 100\n",
    )
    .unwrap();
    let sim = Clocked {
        wrapper: server_wrapper(d.path()),
        store: store.clone(),
    };
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"one").unwrap();
    let t0 = days_from_civil(2026, 5, 4) * DAY + 3 * 3600;
    assert!(sim.backup(&src, "h", t0).status.success());
    let o = sim.prune(t0 + 3600, &["--prune"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = sim.status(t0 + 3600, &["--warn", "1d"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("prune refused: short of space") && out.contains("older than 7 days"),
        "{out}"
    );
    // Room again: the warning goes with the next prune.
    fs::write(
        store.join("byteback.toml"),
        "min_snapshot_interval = 0\nminpercent = 0\n",
    )
    .unwrap();
    let o = sim.prune(t0 + 7200, &["--prune"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = sim.status(t0 + 7200, &["--warn", "1d"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
}

#[test]
fn snapshots_respect_the_minimum_interval() {
    let d = scratch();
    let store = d.path().join("store");
    fs::create_dir_all(&store).unwrap();
    let sim = Clocked {
        wrapper: server_wrapper(d.path()),
        store: store.clone(),
    };
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"one").unwrap();
    let t0 = days_from_civil(2026, 5, 4) * DAY + 3 * 3600;
    let out = sim.backup(&src, "h", t0);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("snapshot 2026-05-04T03:00+0000 taken"),
        "{}",
        text(&out.stderr)
    );
    fs::write(src.join("f"), b"two").unwrap();
    let out = sim.backup(&src, "h", t0 + 5 * 3600);
    assert!(
        out.status.success(),
        "a refused snapshot is not a failed backup"
    );
    let e = text(&out.stderr);
    assert!(
        e.contains("no snapshot taken") && e.contains("minimum interval of 21600 s"),
        "{e}"
    );
    assert_eq!(
        fs::read(
            store
                .join("h/current")
                .join(src.strip_prefix("/").unwrap())
                .join("f")
        )
        .unwrap(),
        b"two"
    );
    assert_eq!(sim.snapshots().len(), 1);
    let out = sim.backup(&src, "h", t0 + 6 * 3600);
    assert!(text(&out.stderr).contains("snapshot 2026-05-04T09:00+0000 taken"));
    // The store's own setting.
    fs::write(store.join("byteback.toml"), "min_snapshot_interval = 60\n").unwrap();
    let out = sim.backup(&src, "h", t0 + 6 * 3600 + 120);
    assert!(text(&out.stderr).contains("snapshot 2026-05-04T09:02+0000 taken"));
    // Status: newest, age and count; Nagios codes by age.
    let st = sim.status(t0 + 8 * 3600, &["--warn", "1h", "--crit", "3h"]);
    assert_eq!(st.status.code(), Some(1), "{}", text(&st.stdout));
    let s = text(&st.stdout);
    assert!(s.starts_with("BYTEBACK WARNING"), "{s}");
    assert!(
        s.contains("2026-05-04T09:02+0000") && s.contains("h  "),
        "{s}"
    );
    assert_eq!(
        sim.status(t0 + 13 * 3600, &["--warn", "1h", "--crit", "3h"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        sim.status(t0 + 7 * 3600, &["--warn", "1h", "--crit", "3h"])
            .status
            .code(),
        Some(0)
    );
    let j = text(&sim.status(t0 + 7 * 3600, &["--json"]).stdout);
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let h = &v["hosts"][0];
    assert_eq!(h["host"], "h", "{j}");
    assert_eq!(h["newest"], "2026-05-04T09:02+0000", "{j}");
    assert_eq!(h["age_seconds"], 3480, "{j}");
    assert_eq!(h["snapshots"], 3, "{j}");
}

/// A store written by byteback 1.x (snapshot names with the offset of their
/// day, summer and winter time, a `.1` duplicate) is listed in importance
/// order and pruned from the end of that list.
fn one_x_store(store: &Path, btrfs: bool) {
    let names: &[(&str, &[&str])] = &[
        (
            "web1.example.com",
            &[
                "2014-07-01T02:00+0100",
                "2014-06-30T02:00+0100",
                "2014-06-29T02:01+0100",
                "2014-06-28T02:00+0100",
                "2014-06-01T02:00+0100",
                "2014-03-02T02:00+0000",
                "2014-01-05T02:00+0000",
                "2013-12-08T02:00+0000",
            ],
        ),
        (
            "db1",
            &[
                "2014-07-01T04:00+0100",
                "2014-07-01T04:00+0100.1",
                "2014-06-30T04:00+0100",
                "2014-06-15T04:00+0100",
            ],
        ),
    ];
    fs::create_dir_all(store).unwrap();
    for (host, snaps) in names {
        let h = store.join(host);
        fs::create_dir_all(&h).unwrap();
        let mk = |p: &Path| {
            if btrfs {
                run(Command::new("btrfs").args(["subvolume", "create"]).arg(p));
            } else {
                fs::create_dir(p).unwrap();
            }
        };
        mk(&h.join("current"));
        fs::write(h.join("current/file"), host.as_bytes()).unwrap();
        for s in *snaps {
            if btrfs {
                run(Command::new("btrfs")
                    .args(["subvolume", "snapshot", "-r"])
                    .arg(h.join("current"))
                    .arg(h.join(s)));
            } else {
                fs::create_dir(h.join(s)).unwrap();
            }
        }
    }
    let sim = Clocked {
        wrapper: PathBuf::new(),
        store: store.to_path_buf(),
    };
    let now = parse_name("2014-07-01T10:00+0100").unwrap();
    let out = sim.prune(now, &["--list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(
        lines,
        [
            // today and yesterday (hosts in name order); then db1 has nothing
            // older near the daily targets until 06-15, while each daily target
            // takes web1's nearest older snapshot, however far (as 1.x)
            "db1/2014-07-01T04:00+0100.1",
            "web1.example.com/2014-07-01T02:00+0100",
            "db1/2014-06-30T04:00+0100",
            "web1.example.com/2014-06-30T02:00+0100",
            "web1.example.com/2014-06-29T02:01+0100",
            "web1.example.com/2014-06-28T02:00+0100",
            "web1.example.com/2014-06-01T02:00+0100",
            "web1.example.com/2014-03-02T02:00+0000",
            "web1.example.com/2014-01-05T02:00+0000",
            "db1/2014-06-15T04:00+0100",
            "web1.example.com/2013-12-08T02:00+0000",
            // the rest, newest first
            "db1/2014-07-01T04:00+0100",
        ],
        "{list}"
    );
    let age = text(&sim.prune(now, &["--list", "--order", "age"]).stdout);
    assert_eq!(
        age.lines().last(),
        Some("web1.example.com/2013-12-08T02:00+0000")
    );
    // Pruning by hand takes the last line; the next run the new last line.
    let out = sim.prune(now, &["--prune-force", "--verbose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(deletions(&text(&out.stderr)), ["db1/2014-07-01T04:00+0100"]);
    assert!(!store.join("db1/2014-07-01T04:00+0100").exists());
    let out = sim.prune(now, &["--prune-force"]);
    assert_eq!(
        deletions(&text(&out.stderr)),
        ["web1.example.com/2013-12-08T02:00+0000"]
    );
    // Plenty of space: a plain --prune does nothing.
    let out = sim.prune(now, &["--prune"]);
    assert!(out.status.success());
    assert!(deletions(&text(&out.stderr)).is_empty());
}

#[test]
fn a_1x_store_is_listed_and_pruned_plain() {
    let d = scratch();
    one_x_store(&d.path().join("store"), false);
}

#[test]
fn a_1x_store_is_listed_and_pruned_btrfs() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(256);
    one_x_store(&fs_.mount.join("store"), true);
}

/// As 1.x, a directory is a host only if it holds `current` (or, here, a
/// snapshot): an admin's `bin/` in the store account's home is not one, so
/// status does not call it CRITICAL ("no snapshot") and prune never looks
/// in it; status names it, as no host. One holding only snapshots (a
/// retired host whose `current` went) is still pruned.
#[test]
fn only_directories_with_current_or_snapshots_are_hosts() {
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"f").unwrap();
    local_backup(&store, &src, "web1");
    fs::create_dir_all(store.join("bin")).unwrap();
    fs::write(store.join("bin/tool"), b"#!/bin/sh\n").unwrap();
    fs::create_dir_all(store.join("old-web2/2026-01-01T03:00+0000")).unwrap();
    let server = |args: &[&str]| {
        let o = run_status(
            Command::new(bin("byteback-server"))
                .args(args)
                .arg("--store")
                .arg(&store),
        );
        (o.status.code(), output_text(&o))
    };
    // CRITICAL for old-web2's old snapshot only.
    let (code, out) = server(&["status", "--warn", "1d", "--crit", "2d"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("CRITICAL - old-web2 last backup"), "{out}");
    assert!(!out.contains("bin has no snapshot"), "{out}");
    assert!(!out.contains("bin  "), "{out}");
    assert!(out.contains("old-web2"), "{out}");
    assert!(
        out.contains("not hosts (no current, no snapshot; never pruned or verified): bin"),
        "{out}"
    );
    let (_, out) = server(&["status", "--json"]);
    assert!(out.contains("\"not_hosts\":[\"bin\"]"), "{out}");
    let (code, out) = server(&["prune", "--list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("old-web2/2026-01-01T03:00+0000"), "{out}");
    assert!(!out.contains("bin/"), "{out}");
}

/// The prune after a backup's snapshot (minutes on a large store, each
/// deletion waiting for btrfs) runs without the host's lock, so a restore
/// of the host's current, its verify or its next backup need not wait for
/// it (it held the lock to the end: restores of current were refused as
/// if a backup ran, and the next backup after 15 s).
#[test]
fn the_prune_after_a_snapshot_lets_the_host_go() {
    let work = scratch();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    let store = work.path().join("store");
    store_without_interval(&store);
    let mut cmd = local_backup_cmd(&store, &src, "h");
    cmd.env("BYTEBACK_TEST_PRUNE_SLOW", "4")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let start = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut locked_at = None;
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the backup did not end"
        );
        if locked_at.is_none() && !snapshots(&store, "h").is_empty() {
            let lock = fs::File::open(store.join("h/.lock")).unwrap();
            if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_ok()
            {
                locked_at = Some(std::time::Instant::now());
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::Unlock).unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ended = std::time::Instant::now();
    assert!(child.wait().unwrap().success());
    let locked_at = locked_at.expect("the host's lock was held until the backup ended");
    assert!(
        ended - locked_at > Duration::from_secs(2),
        "the host's lock was let go only {:?} before the end, not before the prune",
        ended - locked_at
    );
}

/// A prune judges the hosts' growth again before each deletion after its
/// first: a host whose backup grows while the prune deletes (its notes in
/// the usage log, here written by `BYTEBACK_TEST_AFTER_DELETION` after
/// the first deletion) stops it there, so another host's history does not
/// go, deletion after deletion, for an upload that keeps pace with them.
#[test]
fn a_prune_stops_when_a_host_grows_while_it_deletes() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let fs_ = BtrfsLoop::new(256);
    let d = scratch();
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let sim = Clocked {
        wrapper: server_wrapper(d.path()),
        store: store.clone(),
    };
    let start = days_from_civil(2026, 3, 1) * DAY + 3 * 3600;
    let mut rng = Rng::new(11);
    for host in ["a", "b"] {
        let src = d.path().join(host);
        fs::create_dir_all(&src).unwrap();
        for day in 0..8 {
            write_random(&src.join(format!("f{day}")), 2 << 20, &mut rng);
            let _ = fs::remove_file(src.join(format!("f{}", day.max(1) - 1)));
            let out = sim.backup(&src, host, start + day * DAY + 60);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
    }
    let before = sim.snapshots();
    assert_eq!(before.len(), 16);
    let now = start + 8 * DAY;
    let grow = format!(
        "printf '{} 400000000 -\\n' >> {}",
        now - 60,
        store.join("b/.byteback-usage").display()
    );
    let p = run_status(
        Command::new(bin("byteback-prune"))
            .env("TZ", "UTC")
            .env("BYTEBACK_TEST_AFTER_DELETION", &grow)
            .arg("--store")
            .arg(&store)
            .args(["--now", &rfc3339(now)])
            .args(["--prune", "--minpercent", "95", "--maxpercent", "98"]),
    );
    let err = text(&p.stderr);
    assert_eq!(p.status.code(), Some(3), "{err}");
    assert_eq!(deletions(&err).len(), 1, "{err}");
    assert!(
        err.contains("byteback-prune: stopping: not pruning: b/"),
        "{err}"
    );
    assert_eq!(sim.snapshots().len(), 15, "{err}");
    // A usage log that is there but cannot be read (a directory in its
    // place) is no empty one: that host's growth cannot be judged, and
    // nothing is deleted.
    let log = store.join("a/.byteback-usage");
    fs::remove_file(&log).unwrap();
    fs::create_dir(&log).unwrap();
    let p = sim.prune(
        now,
        &["--prune", "--minpercent", "95", "--maxpercent", "98"],
    );
    let err = text(&p.stderr);
    assert_eq!(p.status.code(), Some(1), "{err}");
    assert!(err.contains(".byteback-usage"), "{err}");
    assert_eq!(deletions(&err).len(), 0, "{err}");
    assert_eq!(sim.snapshots().len(), 15, "{err}");
}

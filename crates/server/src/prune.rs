//! Which snapshot goes first when the disc fills: pure functions of (snapshots, now).
//!
//! The order is byteback 1.x's "importance" (or plain age); the growth guard
//! spots a host whose backup suddenly wrote far more than usual. Nothing here
//! touches the disc, so every rule is tested against hand-made histories.

use std::collections::BTreeMap;

const DAY: i64 = 86_400;
const MIDDAY: i64 = 12 * 3600;

/// One snapshot of one host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Snapshot {
    /// Host name.
    pub host: String,
    /// Snapshot name (`YYYY-MM-DDTHH:MM+ZZZZ[.N]`).
    pub name: String,
    /// Unix seconds parsed from the name.
    pub time: i64,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.name)
    }
}

/// How to order snapshots for deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// byteback 1.x importance (see [`importance_targets`]).
    Importance,
    /// Newest first: the oldest goes first.
    Age,
}

/// Day number (since 1970-01-01) of local time `t`.
fn local_day(t: i64, offset: i64) -> i64 {
    (t + offset).div_euclid(DAY)
}

/// Whether day number `d` is a Sunday (1970-01-04 was one).
fn weekday_from_sunday(d: i64) -> i64 {
    (d - 3).rem_euclid(7)
}

/// The times byteback 1.x wants a snapshot near, most important first: midday
/// (local time, `offset` seconds east of UTC) today and on each of the 6 days
/// before, on the 4 Sundays before those, then on every 4th Sunday counted from
/// the Unix epoch (1970-01-04 and every 28 days after it) back until one lies
/// at or before `oldest`.
///
/// One deviation from 1.x: its first 4-weekly target could coincide with the
/// 4th Sunday; here it is the 4-weekly Sunday strictly before it, so no target
/// is counted twice.
pub fn importance_targets(now: i64, offset: i64, oldest: i64) -> Vec<i64> {
    let midday = |day: i64| day * DAY + MIDDAY - offset;
    let today = local_day(now, offset);
    let mut targets: Vec<i64> = (0..7).map(|d| midday(today - d)).collect();
    let last = today - 6;
    let back = match weekday_from_sunday(last) {
        0 => 7,
        n => n,
    };
    let first_sunday = last - back;
    for w in 0..4 {
        targets.push(midday(first_sunday - 7 * w));
    }
    let fourth = first_sunday - 21;
    // The latest day that is 3 (mod 28), i.e. an epoch-4th Sunday, before `fourth`.
    let mut day = fourth - 1 - (fourth - 1 - 3).rem_euclid(28);
    // Bounded: names cannot go back past year 0, about 26,000 four-week periods.
    for _ in 0..40_000 {
        targets.push(midday(day));
        if midday(day) <= oldest {
            break;
        }
        day -= 28;
    }
    targets
}

/// Snapshots in pruning order, most important first: the last is the next to delete.
///
/// Importance: for each target of [`importance_targets`] in turn, each host in
/// name order takes its snapshot nearest the target (the newer one on a tie),
/// provided it is older than the one it took for the previous target (so a
/// host that runs out of history does not bounce back to newer snapshots).
/// Every snapshot not taken follows, newest first. Each host's newest snapshot
/// is therefore among the first. Age: newest first.
pub fn prune_order(snapshots: &[Snapshot], now: i64, offset: i64, order: Order) -> Vec<Snapshot> {
    let mut rest: Vec<Snapshot> = snapshots.to_vec();
    rest.sort_by(|a, b| {
        b.time
            .cmp(&a.time)
            .then_with(|| a.host.cmp(&b.host))
            .then_with(|| crate::time::cmp_names(&b.name, &a.name))
    });
    if order == Order::Age || rest.is_empty() {
        return rest;
    }
    let oldest = rest.iter().map(|s| s.time).min().unwrap_or(now);
    // Per host, newest first, so a strict `<` keeps the newer on a tie.
    let mut by_host: BTreeMap<&str, Vec<&Snapshot>> = BTreeMap::new();
    for s in &rest {
        by_host.entry(s.host.as_str()).or_default().push(s);
    }
    let mut last_taken: BTreeMap<&str, i64> = BTreeMap::new();
    let mut out: Vec<Snapshot> = vec![];
    for target in importance_targets(now, offset, oldest) {
        for (host, snaps) in by_host.iter_mut() {
            let mut best: Option<(usize, i64)> = None;
            for (i, s) in snaps.iter().enumerate() {
                let d = (s.time - target).abs();
                if best.is_none_or(|(_, bd)| d < bd) {
                    best = Some((i, d));
                }
            }
            let Some((i, _)) = best else { continue };
            let t = snaps[i].time;
            if last_taken.get(host).is_none_or(|&prev| t < prev) {
                last_taken.insert(host, t);
                out.push(snaps.remove(i).clone());
            }
        }
    }
    let taken: std::collections::HashSet<&Snapshot> = out.iter().collect();
    let rest: Vec<Snapshot> = rest
        .iter()
        .filter(|s| !taken.contains(s))
        .cloned()
        .collect();
    out.extend(rest);
    out
}

/// What one snapshot's backup added: bytes of file data written (not cloned)
/// by the backups since the host's previous snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Snapshot name.
    pub snapshot: String,
    /// Unix seconds of the snapshot.
    pub time: i64,
    /// New bytes written.
    pub new_bytes: u64,
}

/// The growth guard's rule: a snapshot is a *spike* when its backup wrote more
/// than [`SPIKE_FACTOR`] times the median of the host's previous
/// [`SPIKE_WINDOW`] backups (at least 2 of them) and more than
/// [`SPIKE_MIN_PERCENT`] % of the store's capacity.
pub const SPIKE_FACTOR: u64 = 4;
/// How many previous backups make a host's usual size.
pub const SPIKE_WINDOW: usize = 14;
/// Below this share of the disc a jump never counts as a spike.
pub const SPIKE_MIN_PERCENT: u64 = 2;

/// A backup far larger than its host's previous ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spike {
    /// Host name.
    pub host: String,
    /// The snapshot the large backup made.
    pub snapshot: String,
    /// Bytes it wrote.
    pub new_bytes: u64,
    /// The host's usual bytes per backup (median of the window).
    pub usual: u64,
}

impl std::fmt::Display for Spike {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} wrote {} MiB, its usual backup writes {} MiB",
            self.host,
            self.snapshot,
            self.new_bytes >> 20,
            self.usual >> 20
        )
    }
}

/// Spikes among one host's usage history (oldest first) for a store of
/// `capacity` bytes.
pub fn spikes(host: &str, history: &[Usage], capacity: u64) -> Vec<Spike> {
    let floor = capacity / 100 * SPIKE_MIN_PERCENT;
    let mut out = vec![];
    for (i, u) in history.iter().enumerate() {
        if i < 2 {
            continue;
        }
        let mut window: Vec<u64> = history[i.saturating_sub(SPIKE_WINDOW)..i]
            .iter()
            .map(|u| u.new_bytes)
            .collect();
        window.sort_unstable();
        let usual = window[window.len() / 2];
        if u.new_bytes > floor && u.new_bytes > usual.saturating_mul(SPIKE_FACTOR) {
            out.push(Spike {
                host: host.to_string(),
                snapshot: u.snapshot.clone(),
                new_bytes: u.new_bytes,
                usual,
            });
        }
    }
    out
}

/// How far past `now` a snapshot's name may be dated before it counts as
/// dated in the future (a clock that was set wrong when it was taken).
pub const FUTURE_SLACK: i64 = 3600;

/// The snapshot to delete next: the last in `order` that is not its host's
/// newest, is not dated in the future (see [`FUTURE_SLACK`]) and that
/// `allowed` accepts. A host's newest is its newest dated up to `now`: a
/// snapshot a wrong clock dated later would otherwise pass for it, and the
/// real newest could go.
pub fn next_to_delete(
    order: &[Snapshot],
    now: i64,
    allowed: impl Fn(&Snapshot) -> bool,
) -> Option<&Snapshot> {
    let future = |s: &Snapshot| s.time > now.saturating_add(FUTURE_SLACK);
    let mut newest: BTreeMap<&str, &Snapshot> = BTreeMap::new();
    for s in order {
        let e = newest.entry(s.host.as_str()).or_insert(s);
        // A snapshot not in the future beats one that is; else the later
        // (names of one minute by their suffix as a number: `.10` after `.9`).
        let later = (!future(s), s.time)
            .cmp(&(!future(e), e.time))
            .then_with(|| crate::time::cmp_names(&s.name, &e.name))
            .is_gt();
        if later {
            *e = s;
        }
    }
    order
        .iter()
        .rev()
        .find(|s| newest.get(s.host.as_str()) != Some(s) && !future(s) && allowed(s))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::time::{days_from_civil, format_name, parse_name};
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, m: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, m, d) * DAY + h * 3600 + mi * 60
    }

    fn snap(host: &str, t: i64) -> Snapshot {
        Snapshot {
            host: host.into(),
            name: format_name(t, 0),
            time: t,
        }
    }

    /// A snapshot a wrong clock dated in the future is neither its host's
    /// newest (the real newest stays) nor ever deleted.
    #[test]
    fn a_snapshot_dated_in_the_future_is_not_the_newest_and_not_deleted() {
        let now = at(2026, 12, 4, 12, 0);
        let (old, real, ahead) = (
            snap("h", now - 2 * DAY),
            snap("h", now - DAY),
            snap("h", now + 30 * DAY),
        );
        let order = vec![ahead.clone(), real.clone(), old.clone()];
        assert_eq!(next_to_delete(&order, now, |_| true), Some(&old));
        let left = vec![ahead.clone(), real.clone()];
        assert_eq!(next_to_delete(&left, now, |_| true), None);
        // Without a clock to judge by, the later one is the newest.
        assert_eq!(next_to_delete(&left, i64::MAX, |_| true), Some(&real));
    }

    /// Of snapshots made within one minute (`.1` ... `.10` after the
    /// first, with a minimum interval under a minute), the newest is the
    /// one of the highest suffix as a number, `.10`, not `.9` as text.
    #[test]
    fn of_one_minutes_snapshots_the_highest_suffix_is_the_newest() {
        let now = at(2026, 12, 4, 12, 0);
        let t = now - DAY;
        let mut order: Vec<Snapshot> = (0..=10)
            .map(|i| Snapshot {
                host: "h".into(),
                name: match i {
                    0 => format_name(t, 0),
                    i => format!("{}.{i}", format_name(t, 0)),
                },
                time: t,
            })
            .collect();
        let mut deleted = vec![];
        while let Some(v) = next_to_delete(&order, now, |_| true).cloned() {
            order.retain(|s| *s != v);
            deleted.push(v.name);
        }
        assert_eq!(order.len(), 1);
        assert!(
            order[0].name.ends_with(".10"),
            "{order:?} kept, {deleted:?} deleted"
        );
    }

    /// Daily snapshots of `host` at `hour` UTC for `days` days ending on `end`'s day.
    fn daily(host: &str, end: i64, days: i64, hour: i64) -> Vec<Snapshot> {
        let d0 = end.div_euclid(DAY);
        (0..days)
            .map(|i| snap(host, (d0 - i) * DAY + hour * 3600))
            .collect()
    }

    fn ages(order: &[Snapshot], now: i64, keep: usize) -> Vec<i64> {
        let mut a: Vec<i64> = order[..keep]
            .iter()
            .map(|s| (now - s.time).div_euclid(DAY))
            .collect();
        a.sort();
        a
    }

    #[test]
    fn targets_follow_the_1x_calendar() {
        // Wednesday 2026-11-18 10:00 UTC.
        let now = at(2026, 11, 18, 10, 0);
        let t = importance_targets(now, 0, at(2026, 1, 1, 0, 0));
        let name = |x: i64| format_name(x, 0);
        assert_eq!(name(t[0]), "2026-11-18T12:00+0000");
        assert_eq!(name(t[6]), "2026-11-12T12:00+0000"); // Thursday
        assert_eq!(name(t[7]), "2026-11-08T12:00+0000"); // the Sunday before
        assert_eq!(name(t[10]), "2026-10-18T12:00+0000");
        // Every later target is a Sunday 0 mod 28 days from 1970-01-04.
        for &x in &t[11..] {
            let day = x.div_euclid(DAY);
            assert_eq!((day - 3).rem_euclid(28), 0, "{}", name(x));
        }
        assert!(t[11] < t[10] && t[10] - t[11] <= 28 * DAY);
        assert!(*t.last().unwrap() <= at(2026, 1, 1, 0, 0));
        assert!(t[t.len() - 2] > at(2026, 1, 1, 0, 0));
        // Strictly decreasing.
        assert!(t.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn when_the_last_daily_target_is_a_sunday_the_weeks_start_7_days_earlier() {
        // Saturday 2026-11-21: six days before is Sunday 2026-11-15.
        let now = at(2026, 11, 21, 3, 0);
        let t = importance_targets(now, 0, now);
        assert_eq!(format_name(t[6], 0), "2026-11-15T12:00+0000");
        assert_eq!(format_name(t[7], 0), "2026-11-08T12:00+0000");
    }

    #[test]
    fn local_midday_uses_the_offset() {
        let now = at(2026, 11, 18, 23, 30); // 2026-11-19 00:30 at +0100
        let t = importance_targets(now, 3600, now);
        assert_eq!(format_name(t[0], 3600), "2026-11-19T12:00+0100");
    }

    #[test]
    fn a_year_of_daily_backups_keeps_days_weeks_and_four_weeks() {
        let now = at(2026, 11, 18, 3, 5);
        let snaps = daily("a", now, 365, 3);
        let order = prune_order(&snaps, now, 0, Order::Importance);
        assert_eq!(order.len(), 365);
        assert_eq!(order.iter().collect::<HashSet<_>>().len(), 365);
        assert_eq!(order[0].time, snaps[0].time, "newest first");
        // Targets: 7 days, 4 Sundays, then the 4-weekly Sundays within the year (+1 past it).
        let targets = importance_targets(now, 0, snaps.last().unwrap().time);
        // The last target lies at or before the oldest snapshot.
        let a = ages(&order, now, targets.len() - 1);
        assert_eq!(&a[..7], &[0, 1, 2, 3, 4, 5, 6]);
        // Then weekly-spaced, then 28-day spaced.
        for w in a[7..11].windows(2) {
            assert_eq!(w[1] - w[0], 7, "{a:?}");
        }
        for w in a[12..].windows(2) {
            assert_eq!(w[1] - w[0], 28, "{a:?}");
        }
        assert!(*a.last().unwrap() >= 330, "{a:?}");
        // The rest follows newest first.
        let rest = &order[targets.len()..];
        assert!(rest.windows(2).all(|w| w[0].time > w[1].time));
    }

    #[test]
    fn gaps_from_failed_days_take_the_nearest_neighbour() {
        let now = at(2026, 11, 18, 3, 0);
        let mut snaps = daily("a", now, 60, 3);
        // Days 1..=4 failed.
        snaps.retain(|s| !(1..=4).contains(&((now - s.time) / DAY)));
        let order = prune_order(&snaps, now, 0, Order::Importance);
        let first: Vec<i64> = order[..3].iter().map(|s| (now - s.time) / DAY).collect();
        // today, then for target day 1 (midday 2 days... ) the nearest older is day 5.
        assert_eq!(first[0], 0);
        assert_eq!(first[1], 5);
        // Day 5 taken for "yesterday"; later daily targets may not bounce back.
        assert!(order.windows(2).take(3).all(|w| w[0].time > w[1].time));
    }

    #[test]
    fn several_backups_a_day_keep_the_one_nearest_midday() {
        let now = at(2026, 11, 18, 23, 0);
        let mut snaps = vec![];
        for d in 0..20 {
            for h in [1, 7, 13, 19] {
                snaps.push(snap("a", at(2026, 11, 18, h, 0) - d * DAY));
            }
        }
        let order = prune_order(&snaps, now, 0, Order::Importance);
        // today's target (midday) takes 13:00, each earlier day's too; the
        // newest (19:00) comes later but is never deleted.
        for (i, s) in order[..7].iter().enumerate() {
            assert_eq!(s.time, at(2026, 11, 18, 13, 0) - i as i64 * DAY);
        }
        let newest = order
            .iter()
            .position(|s| s.time == at(2026, 11, 18, 19, 0))
            .unwrap();
        assert!(newest > 7);
        // The newest is never deleted.
        let next = next_to_delete(&order, i64::MAX, |_| true).unwrap();
        assert_ne!(next.time, at(2026, 11, 18, 19, 0));
    }

    #[test]
    fn hosts_take_turns() {
        let now = at(2026, 11, 18, 4, 0);
        let mut snaps = daily("b", now, 40, 2);
        snaps.extend(daily("a", now, 40, 3));
        snaps.extend(daily("c", now, 3, 1));
        let order = prune_order(&snaps, now, 0, Order::Importance);
        let hosts: Vec<&str> = order[..9].iter().map(|s| s.host.as_str()).collect();
        assert_eq!(hosts, ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);
        // c has only three; a and b carry on alternating.
        let hosts: Vec<&str> = order[9..15].iter().map(|s| s.host.as_str()).collect();
        assert_eq!(hosts, ["a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn a_1x_named_store_sorts_by_parsed_time_across_offsets() {
        // 1.x names carry the server's offset at the time (summer time here).
        let names = [
            "2014-07-01T02:00+0100",
            "2014-06-30T02:00+0100",
            "2014-06-29T02:00+0100",
            "2014-01-05T02:00+0000",
            "2014-07-01T02:00+0100.1",
        ];
        let snaps: Vec<Snapshot> = names
            .iter()
            .map(|n| Snapshot {
                host: "old".into(),
                name: n.to_string(),
                time: parse_name(n).unwrap(),
            })
            .collect();
        let now = parse_name("2014-07-01T09:00+0100").unwrap();
        let order = prune_order(&snaps, now, 3600, Order::Importance);
        let names: Vec<&str> = order.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "2014-07-01T02:00+0100.1",
                "2014-06-30T02:00+0100",
                "2014-06-29T02:00+0100",
                "2014-01-05T02:00+0000",
                "2014-07-01T02:00+0100",
            ]
        );
        let age = prune_order(&snaps, now, 3600, Order::Age);
        assert_eq!(age.last().unwrap().name, "2014-01-05T02:00+0000");
    }

    #[test]
    fn spikes_need_a_history_a_factor_and_a_floor() {
        let cap = 1000 << 20;
        let u = |n: u64| Usage {
            snapshot: format!("s{n}"),
            time: 0,
            new_bytes: n << 20,
        };
        // First (full) backups never count.
        assert!(spikes("h", &[u(500), u(3)], cap).is_empty());
        let h = [u(300), u(3), u(4), u(2), u(3), u(60)];
        let s = spikes("h", &h, cap);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].snapshot, "s60");
        assert_eq!(s[0].usual, 3 << 20);
        // Below 2% of the disc: not a spike, whatever the factor.
        assert!(spikes("h", &[u(300), u(1), u(1), u(19)], cap).is_empty());
        // Steady growth is not a spike.
        let h: Vec<Usage> = (1..40).map(|i| u(10 + i)).collect();
        assert!(spikes("h", &h, cap).is_empty());
    }

    fn arb_snapshots() -> impl Strategy<Value = (Vec<Snapshot>, i64)> {
        let now = at(2026, 6, 15, 0, 0);
        (
            prop::collection::vec((0usize..3, 0i64..(800 * DAY)), 0..120),
            0i64..DAY,
        )
            .prop_map(move |(v, shift)| {
                let now = now + shift;
                let mut seen = HashSet::new();
                let snaps = v
                    .into_iter()
                    .map(|(h, back)| {
                        let t = now - back;
                        snap(["a", "b", "c"][h], t - t.rem_euclid(60))
                    })
                    .filter(|s| seen.insert((s.host.clone(), s.name.clone())))
                    .collect();
                (snaps, now)
            })
    }

    proptest! {
        #[test]
        fn order_is_a_permutation_with_each_hosts_newest_kept((snaps, now) in arb_snapshots()) {
            for order in [Order::Importance, Order::Age] {
                let o = prune_order(&snaps, now, 0, order);
                prop_assert_eq!(o.len(), snaps.len());
                let a: HashSet<_> = o.iter().collect();
                let b: HashSet<_> = snaps.iter().collect();
                prop_assert_eq!(a, b);
                // Deleting in order never removes a host's newest snapshot, and
                // ends with exactly one snapshot per host.
                let mut left = o.clone();
                while let Some(victim) = next_to_delete(&left, i64::MAX, |_| true).cloned() {
                    let newest = left.iter().filter(|s| s.host == victim.host).map(|s| s.time).max();
                    prop_assert!(Some(victim.time) < newest);
                    left.retain(|s| *s != victim);
                }
                let hosts: HashSet<_> = snaps.iter().map(|s| &s.host).collect();
                prop_assert_eq!(left.len(), hosts.len());
            }
        }

        #[test]
        fn order_is_deterministic_and_input_order_free((snaps, now) in arb_snapshots()) {
            let mut rev = snaps.clone();
            rev.reverse();
            prop_assert_eq!(
                prune_order(&snaps, now, 0, Order::Importance),
                prune_order(&rev, now, 0, Order::Importance)
            );
        }
    }
}

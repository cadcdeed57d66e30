//! `byteback-server report --html DIR`: one static page (`DIR/index.html`,
//! inline CSS, SVG drawn here, no script) to look at a store: per host the
//! retention the pruning keeps (which days, weeks and 4-week periods hold a
//! snapshot), the last backup's age coloured by `status`'s thresholds, the
//! data each backup wrote; for the store its free space over time from the
//! usage logs. Hosts in trouble come first. Everything taken from the store
//! is HTML-escaped.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::error::{IoContext, Result};
use rustix::fs::{Mode, OFlags};

use crate::config::StoreConfig;
use crate::prune::importance_targets;
use crate::pruner::{self, UsageLine};
use crate::space::Space;
use crate::status::{self, HostStatus, STATE_WORDS};
use crate::store::Store;
use crate::time;

/// Options of `byteback-server report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Write the page to DIR/index.html (DIR is created if missing; the page
    /// replaces the previous one atomically).
    #[arg(long, value_name = "DIR")]
    pub html: PathBuf,
    /// Store root (default: the home directory of the user running it; as root,
    /// the account byteback's).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// A host's last backup older than this shows as WARNING (as `status --warn`).
    #[arg(long, value_parser = crate::admin::parse_age, default_value = "26h")]
    pub warn: i64,
    /// A host's last backup older than this shows as CRITICAL (as `status --crit`).
    #[arg(long, value_parser = crate::admin::parse_age, default_value = "3d")]
    pub crit: i64,
    /// A host last verified whole longer ago (or never, with snapshots
    /// older than this) shows as WARNING, named (as `status --verify-warn`).
    #[arg(long, value_parser = crate::admin::parse_age)]
    pub verify_warn: Option<i64>,
    /// Draw the page as of this time (RFC 3339).
    #[arg(long, value_parser = crate::admin::parse_now)]
    pub now: Option<(i64, i64)>,
}

/// At most this many 4-week periods are drawn (about two years).
const MAX_PERIODS: usize = 26;
/// At most this many backups in a host's data chart.
const MAX_BARS: usize = 60;
/// At most this many points in the free-space chart.
const MAX_POINTS: usize = 2000;

/// One host's part of the page.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// What `status` shows for it.
    pub status: HostStatus,
    /// 0 OK, 1 WARNING, 2 CRITICAL (age by the thresholds, damage).
    pub state: u8,
    /// Snapshots, oldest first, with their times.
    pub snapshots: Vec<(String, i64)>,
    /// Its usage log.
    pub usage: Vec<UsageLine>,
}

/// Everything the page shows.
#[derive(Debug, Clone)]
pub struct Report {
    /// Hosts, in trouble first.
    pub hosts: Vec<HostReport>,
    /// Free space now.
    pub space: Space,
    /// Why the last prune refused, if it did.
    pub prune_refused: Option<String>,
    /// The store's settings (the prune thresholds are drawn).
    pub config: StoreConfig,
    /// The store's path, as given.
    pub store: String,
    /// The clock and its UTC offset.
    pub now: i64,
    /// See `now`.
    pub offset: i64,
    /// Age thresholds.
    pub warn: i64,
    /// See `warn`.
    pub crit: i64,
    /// A whole verification due after this long (`--verify-warn`).
    pub verify_warn: Option<i64>,
}

/// Reads the store.
pub fn collect(
    store: &Store,
    root: &std::path::Path,
    (now, offset): (i64, i64),
    (warn, crit, verify_warn): (i64, i64, Option<i64>),
) -> Result<Report> {
    let st = status::collect(store, now)?;
    let mut hosts = vec![];
    for h in st.hosts {
        let hs = store.host(&h.host, false)?;
        hosts.push(HostReport {
            state: status::host_state(
                &h,
                &status::Limits {
                    warn: Some(warn),
                    crit: Some(crit),
                    verify: verify_warn,
                },
            ),
            snapshots: hs.snapshots()?,
            usage: pruner::read_usage_lines(&hs),
            status: h,
        });
    }
    // Trouble first: the worst state, then the oldest last backup, then by name.
    hosts.sort_by(|a, b| {
        b.state
            .cmp(&a.state)
            .then_with(|| {
                let age = |h: &HostReport| h.status.age.unwrap_or(i64::MAX);
                age(b).cmp(&age(a))
            })
            .then_with(|| a.status.host.cmp(&b.status.host))
    });
    Ok(Report {
        hosts,
        space: st.space,
        prune_refused: st.prune_refused,
        config: StoreConfig::load(root)?,
        store: root.display().to_string(),
        now,
        offset,
        warn,
        crit,
        verify_warn,
    })
}

/// `&`, `<`, `>`, `"` and `'` as entities: safe in text and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// Bytes for people: `512 B`, `3.4 MiB`.
pub fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `YYYY-MM-DD` of local time `t`.
fn date(t: i64, offset: i64) -> String {
    let (y, m, d) = time::civil_from_days((t + offset).div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `Mon 27` for day-of-week and day of month.
fn day_label(t: i64, offset: i64) -> String {
    let day = (t + offset).div_euclid(86_400);
    let (_, _, d) = time::civil_from_days(day);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][day.rem_euclid(7) as usize];
    format!("{wd} {d}")
}

const STATE_CLASSES: [&str; 3] = ["ok", "warning", "critical"];

/// One retention bucket: a day, a week or a 4-week period around a target
/// of the importance order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// `day`, `week` or `4 weeks`.
    pub kind: &'static str,
    /// The importance order's target (midday of the day, of the Sunday).
    pub target: i64,
    /// Start (inclusive) and end (exclusive), Unix seconds.
    pub from: i64,
    /// See `from`.
    pub to: i64,
}

/// The buckets of the importance order as of `now`, newest first: 7 days,
/// 4 weeks, then 4-week periods back to `oldest` (at most [`MAX_PERIODS`]).
/// Each reaches halfway to its neighbours' targets, so they tile the axis.
pub fn buckets(now: i64, offset: i64, oldest: i64) -> Vec<Bucket> {
    let targets = importance_targets(now, offset, oldest);
    let n = targets.len().min(11 + MAX_PERIODS);
    let mut out = vec![];
    for i in 0..n {
        let t = targets[i];
        let to = if i == 0 {
            t + 43_200
        } else {
            (targets[i - 1] + t) / 2
        };
        let from = match targets.get(i + 1) {
            Some(&next) => (t + next) / 2,
            None => t - (to - t),
        };
        let kind = match i {
            0..7 => "day",
            7..11 => "week",
            _ => "4 weeks",
        };
        out.push(Bucket {
            kind,
            target: t,
            from,
            to,
        });
    }
    out
}

/// The retention chart of one host: its snapshots per retention period.
/// Long (~90 lines) because it is one SVG written top to bottom; its
/// pieces only make sense in that order.
fn retention_svg(h: &HostReport, buckets: &[Bucket], offset: i64) -> String {
    const W: f64 = 960.0;
    const H: f64 = 30.0;
    const GAP: f64 = 12.0;
    let mut s = String::new();
    let n = buckets.len() as f64;
    let groups = buckets
        .iter()
        .map(|b| b.kind)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as f64;
    let bw = (W - GAP * (groups - 1.0).max(0.0)) / n.max(1.0);
    let _ = write!(
        s,
        "<svg class=\"retention\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\" role=\"img\" \
         aria-label=\"snapshots per retention period\">",
        H + 18.0,
        H + 18.0
    );
    let mut x = 0.0;
    let mut prev_kind = None;
    let mut group_start = 0.0;
    // Oldest on the left.
    for b in buckets.iter().rev() {
        if prev_kind.is_some_and(|k| k != b.kind) {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\">{}</text>",
                group_start,
                H + 14.0,
                group_label(prev_kind.unwrap_or_default())
            );
            x += GAP;
            group_start = x;
        }
        prev_kind = Some(b.kind);
        let inside: Vec<&(String, i64)> = h
            .snapshots
            .iter()
            .filter(|(_, t)| *t >= b.from && *t < b.to)
            .collect();
        let class = if inside.is_empty() { "gap" } else { "kept" };
        let period = match b.kind {
            "day" => date(b.target, offset),
            _ => format!("{} to {}", date(b.from, offset), date(b.to - 1, offset)),
        };
        let names: Vec<String> = inside.iter().map(|(n, _)| esc(n)).collect();
        let _ = write!(
            s,
            "<rect class=\"{class}\" x=\"{x:.1}\" y=\"0\" width=\"{:.1}\" height=\"{H}\" rx=\"2\">\
             <title>{} {}: {} snapshot(s) {}</title></rect>",
            (bw - 2.0).max(1.0),
            b.kind,
            esc(&period),
            inside.len(),
            names.join(", ")
        );
        for (_, t) in &inside {
            let fx = (*t - b.from) as f64 / (b.to - b.from).max(1) as f64;
            let tx = x + 1.0 + fx * (bw - 4.0).max(0.0);
            let _ = write!(
                s,
                "<line class=\"tick\" x1=\"{tx:.1}\" y1=\"6\" x2=\"{tx:.1}\" y2=\"{:.1}\"/>",
                H - 6.0
            );
        }
        if b.kind == "day" && bw >= 30.0 {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"in\">{}</text>",
                x + 4.0,
                H / 2.0 + 4.0,
                esc(&day_label(b.target, offset))
            );
        }
        x += bw;
    }
    if let Some(k) = prev_kind {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\">{}</text>",
            group_start,
            H + 14.0,
            group_label(k)
        );
    }
    s.push_str("</svg>");
    s
}

fn group_label(kind: &str) -> &'static str {
    match kind {
        "day" => "last 7 days",
        "week" => "4 weeks before",
        _ => "4-week periods",
    }
}

fn data_svg(h: &HostReport, offset: i64) -> String {
    const W: f64 = 460.0;
    const H: f64 = 110.0;
    let lines = &h.usage[h.usage.len().saturating_sub(MAX_BARS)..];
    if lines.is_empty() {
        return "<p class=\"none\">no backups in the usage log yet</p>".into();
    }
    let max = lines.iter().map(|u| u.new_bytes).max().unwrap_or(0).max(1);
    let bw = W / MAX_BARS as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"data\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\" role=\"img\" \
         aria-label=\"data written per backup\"><line class=\"base\" x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\"/>",
        H + 16.0,
        H + 16.0
    );
    for (i, u) in lines.iter().enumerate() {
        let bh = (u.new_bytes as f64 / max as f64 * (H - 4.0)).max(1.0);
        let class = if u.snapshot.is_some() {
            "bar"
        } else {
            "bar nosnap"
        };
        let _ = write!(
            s,
            "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\">\
             <title>{}: {} written{}</title></rect>",
            i as f64 * bw,
            H - bh,
            (bw - 1.0).max(1.0),
            esc(&time::format_name(u.time, offset)),
            human(u.new_bytes),
            u.snapshot
                .as_deref()
                .map(|n| format!(", snapshot {}", esc(n)))
                .unwrap_or_else(|| ", no snapshot".into())
        );
    }
    let _ = write!(
        s,
        "<text x=\"0\" y=\"{:.1}\" class=\"axis\">{} … {}; highest {}</text></svg>",
        H + 13.0,
        esc(&date(lines[0].time, offset)),
        esc(&date(lines[lines.len() - 1].time, offset)),
        human(max)
    );
    s
}

/// Every (time, free, size) the usage logs recorded, oldest first.
fn space_points(r: &Report) -> Vec<(i64, u64, u64)> {
    let pts: Vec<(i64, u64, u64)> = r
        .hosts
        .iter()
        .flat_map(|h| h.usage.iter())
        .filter_map(|u| u.space.map(|(free, size)| (u.time, free, size)))
        .filter(|&(_, _, size)| size > 0)
        .collect();
    thin_by_time(pts, MAX_POINTS)
}

/// At most `max` of `pts` (time, free, size), over the whole time they
/// span: one per slice of it, the one with the least free space (the one
/// that matters). Keeping the last `max` instead let one host's burst of
/// backups (each writes a point) push months of history out of the chart.
fn thin_by_time(mut pts: Vec<(i64, u64, u64)>, max: usize) -> Vec<(i64, u64, u64)> {
    pts.sort_unstable();
    let (Some(first), Some(last)) = (pts.first().copied(), pts.last().copied()) else {
        return pts;
    };
    if pts.len() <= max || max == 0 {
        return pts;
    }
    let span = i128::from(last.0) - i128::from(first.0) + 1;
    let slice = |t: i64| (i128::from(t) - i128::from(first.0)) * max as i128 / span;
    let mut out: Vec<(i64, u64, u64)> = Vec::with_capacity(max);
    for p in pts {
        match out.last_mut() {
            Some(kept) if slice(kept.0) == slice(p.0) => {
                if p.1 < kept.1 {
                    *kept = p;
                }
            }
            _ => out.push(p),
        }
    }
    out
}

fn space_svg(r: &Report) -> String {
    const W: f64 = 960.0;
    const H: f64 = 140.0;
    let pts = space_points(r);
    if pts.is_empty() {
        return "<p class=\"none\">no free-space figures in the usage logs yet (each backup \
                records one)</p>"
            .into();
    }
    let (t0, t1) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1));
    let pct = |free: u64, size: u64| free as f64 / size as f64 * 100.0;
    // The axis reaches a little above the highest value (and the prune
    // thresholds), in steps of 10 %.
    let highest = pts
        .iter()
        .map(|&(_, f, s)| pct(f, s))
        .fold(f64::from(r.config.maxpercent), f64::max);
    let top = ((highest * 1.15 / 10.0).ceil() * 10.0).clamp(10.0, 100.0);
    let x = |t: i64| (t - t0) as f64 / (t1 - t0) as f64 * (W - 50.0) + 40.0;
    let y = |p: f64| H - p.clamp(0.0, top) / top * (H - 10.0);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"space\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\" role=\"img\" \
         aria-label=\"free space over time\">",
        H + 18.0,
        H + 18.0
    );
    for p in [0.0, top / 2.0, top] {
        let _ = write!(
            s,
            "<line class=\"grid\" x1=\"40\" y1=\"{0:.1}\" x2=\"{W}\" y2=\"{0:.1}\"/>\
             <text x=\"0\" y=\"{1:.1}\" class=\"axis\">{p:.0}%</text>",
            y(p),
            y(p) + 4.0
        );
    }
    for (p, what) in [
        (r.config.minpercent, "minpercent"),
        (r.config.maxpercent, "maxpercent"),
    ] {
        let _ = write!(
            s,
            "<line class=\"limit\" x1=\"40\" y1=\"{0:.1}\" x2=\"{W}\" y2=\"{0:.1}\">\
             <title>{what} {p}%</title></line>",
            y(f64::from(p))
        );
    }
    let mut path = String::new();
    for (i, &(t, free, size)) in pts.iter().enumerate() {
        let _ = write!(
            path,
            "{}{:.1},{:.1}",
            if i == 0 { "M" } else { " L" },
            x(t),
            y(pct(free, size))
        );
    }
    let _ = write!(s, "<path class=\"free\" d=\"{path}\"/>");
    let last = pts[pts.len() - 1];
    let _ = write!(
        s,
        "<circle class=\"free-dot\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"><title>{}: {} free of {}</title></circle>",
        x(last.0),
        y(pct(last.1, last.2)),
        esc(&time::format_name(last.0, r.offset)),
        human(last.1),
        human(last.2)
    );
    let _ = write!(
        s,
        "<text x=\"40\" y=\"{0:.1}\" class=\"axis\">{1}</text>\
         <text x=\"{W}\" y=\"{0:.1}\" class=\"axis\" text-anchor=\"end\">{2}</text></svg>",
        H + 14.0,
        esc(&date(t0, r.offset)),
        esc(&date(t1, r.offset))
    );
    s
}

const CSS: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2329;background:#f7f8fa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0}
.sub{color:#5b6670;margin:0 0 18px}
section{background:#fff;border:1px solid #dde1e6;border-left:6px solid #8a949e;border-radius:6px;padding:12px 16px;margin:0 0 14px}
section.ok{border-left-color:#2e8b57}section.warning{border-left-color:#d89614}section.critical{border-left-color:#c62828}
.head{display:flex;gap:14px;align-items:baseline;flex-wrap:wrap;margin-bottom:8px}
.badge{font-weight:600;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}
.badge.ok{background:#2e8b57}.badge.warning{background:#d89614}.badge.critical{background:#c62828}
.age.ok{color:#2e8b57}.age.warning{color:#b57a00}.age.critical{color:#c62828}.age{font-weight:600}
.facts{color:#4a545e}.damaged{color:#c62828}
.charts{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.label{font-size:12px;color:#5b6670;margin:6px 0 2px}
svg text{font-size:11px;fill:#5b6670}svg text.in{fill:#fff;font-size:10px}
rect.kept{fill:#3a9d5d}rect.gap{fill:#e3e6ea}line.tick{stroke:#fff;stroke-width:1.5}
rect.bar{fill:#4a78b5}rect.bar.nosnap{fill:#9db5d6}line.base{stroke:#8a949e}
line.grid{stroke:#e3e6ea}line.limit{stroke:#c62828;stroke-dasharray:4 3}
path.free{fill:none;stroke:#4a78b5;stroke-width:2}circle.free-dot{fill:#4a78b5}
.none{color:#8a949e;font-style:italic;margin:4px 0}
";

/// The page. Long (~100 lines) because it is one HTML document written
/// top to bottom; the charts are their own functions.
pub fn render(r: &Report) -> String {
    let (code, line) = {
        let st = status::StoreStatus {
            hosts: r.hosts.iter().map(|h| h.status.clone()).collect(),
            space: r.space,
            prune_refused: r.prune_refused.clone(),
            not_hosts: vec![],
        };
        status::check(
            &st,
            &status::Limits {
                warn: Some(r.warn),
                crit: Some(r.crit),
                verify: r.verify_warn,
            },
        )
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>byteback: {}</title><style>{CSS}</style></head><body>\
         <h1>byteback store {}</h1><p class=\"sub\">as of {} · warning after {}, critical after {}{} · \
         <span class=\"state-{}\" id=\"summary\">{}</span></p>",
        esc(&r.store),
        esc(&r.store),
        esc(&time::format_name(r.now, r.offset)),
        status::format_age(r.warn),
        status::format_age(r.crit),
        r.verify_warn
            .map(|v| format!(", whole verification due after {}", status::format_age(v)))
            .unwrap_or_default(),
        STATE_WORDS[code as usize].to_ascii_lowercase(),
        esc(&line)
    );
    let _ = write!(
        s,
        "<section class=\"store\" id=\"store\"><div class=\"head\"><h2>Free space</h2>\
         <span class=\"facts\">{} free of {} ({:.1}%); pruning below {}% until above {}%</span></div>",
        human(r.space.free),
        human(r.space.size),
        r.space.percent_free(),
        r.config.minpercent,
        r.config.maxpercent
    );
    if let Some(why) = &r.prune_refused {
        let _ = write!(
            s,
            "<p class=\"damaged\">prune refused: {}</p>",
            esc(why.trim())
        );
    }
    s.push_str(&space_svg(r));
    s.push_str("</section>");
    let oldest = r
        .hosts
        .iter()
        .flat_map(|h| h.snapshots.iter().map(|(_, t)| *t))
        .min()
        .unwrap_or(r.now);
    let buckets = buckets(r.now, r.offset, oldest);
    if r.hosts.is_empty() {
        s.push_str("<p class=\"none\">no hosts in this store</p>");
    }
    for h in &r.hosts {
        let st = &h.status;
        let class = STATE_CLASSES[h.state as usize];
        let age_class =
            STATE_CLASSES[status::age_state(st.age, Some(r.warn), Some(r.crit)) as usize];
        let _ = write!(
            s,
            "<section class=\"host {class}\" id=\"host-{0}\" data-host=\"{0}\" data-state=\"{1}\">\
             <div class=\"head\"><h2>{0}</h2><span class=\"badge {class}\">{1}</span>\
             <span class=\"age {age_class}\">{2}</span><span class=\"facts\">{3} snapshot(s){4}{5}{6}</span></div>",
            esc(&st.host),
            STATE_WORDS[h.state as usize],
            match st.age {
                Some(a) => format!("last backup {} ago", status::format_age(a)),
                None => "no snapshot".into(),
            },
            st.snapshots,
            st.newest
                .as_deref()
                .map(|n| format!(", newest {}", esc(n)))
                .unwrap_or_default(),
            st.size
                .map(|b| format!(", {} in the newest", human(b)))
                .unwrap_or_default(),
            st.history
                .map(|b| format!(", {} of history", human(b)))
                .unwrap_or_default(),
        );
        if st.damaged_count() > 0 {
            let _ = write!(
                s,
                "<p class=\"damaged\">{} damaged file(s): {}</p>",
                st.damaged_count(),
                st.damaged
                    .iter()
                    .take(5)
                    .map(|d| esc(d))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        // What else makes the host a WARNING, as `status` names it.
        let list = |names: &[String]| {
            let mut l: Vec<String> = names.iter().take(5).map(|n| esc(n)).collect();
            if names.len() > 5 {
                l.push(format!("and {} more", names.len() - 5));
            }
            l.join("; ")
        };
        if !st.future.is_empty() {
            let _ = write!(
                s,
                "<p class=\"damaged\">snapshot(s) dated in the future (a clock set wrong? delete them once checked): {}</p>",
                list(&st.future)
            );
        }
        if !st.strays.is_empty() {
            let _ = write!(
                s,
                "<p class=\"damaged\">directories not named as snapshots, never pruned or restored: {}</p>",
                list(&st.strays)
            );
        }
        if let Some(why) = status::verify_overdue(st, r.verify_warn) {
            let _ = write!(s, "<p class=\"damaged\">{}</p>", esc(&why));
        }
        let _ = write!(
            s,
            "<div class=\"label\">retention: which periods hold a snapshot (green; each line a snapshot)</div>{}\
             <div class=\"charts\"><div><div class=\"label\">data written per backup (pale: no snapshot taken)</div>{}</div></div></section>",
            retention_svg(h, &buckets, r.offset),
            data_svg(h, r.offset)
        );
    }
    s.push_str("</body></html>\n");
    s
}

/// Removes the temporary pages of reports that were killed before they put
/// theirs in place (`.index.html.PID.tmp` whose process is gone), so none
/// stays in the web directory for good.
fn sweep_dead_temps(dir: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".index.html."))
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = rustix::process::Pid::from_raw(pid)
            .is_none_or(|p| rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH));
        if gone {
            let _ = rustix::fs::unlinkat(dir, &name, rustix::fs::AtFlags::empty());
        }
    }
}

/// Writes `DIR/index.html` (through a temporary name in DIR of this
/// process's own, then renamed: two reports at once each put a whole page
/// in place, the later one last).
pub fn write(dir: &std::path::Path, page: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).op("create", || dir.display().to_string())?;
    let dfd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .op("open", || dir.display().to_string())?;
    sweep_dead_temps(&dfd);
    let tmp = format!(".index.html.{}.tmp", std::process::id());
    let tmp = tmp.as_str();
    // One left by a process of the same id, killed.
    let _ = rustix::fs::unlinkat(&dfd, tmp, rustix::fs::AtFlags::empty());
    let fd = rustix::fs::openat(
        &dfd,
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .op("create", || dir.join(tmp).display().to_string())?;
    let mut f = std::fs::File::from(fd);
    let placed = f
        .write_all(page.as_bytes())
        .and_then(|()| f.sync_all())
        .op("write", || dir.join(tmp).display().to_string())
        .and_then(|()| {
            rustix::fs::renameat(&dfd, tmp, &dfd, "index.html")
                .op("write", || dir.join("index.html").display().to_string())
        });
    if placed.is_err() {
        let _ = rustix::fs::unlinkat(&dfd, tmp, rustix::fs::AtFlags::empty());
    }
    placed.map(|()| dir.join("index.html"))
}

fn report_inner(args: ReportArgs) -> Result<PathBuf> {
    let root = crate::admin::store_root(args.store)?;
    let store = Store::open(&root)?;
    let now = args.now.unwrap_or_else(|| {
        let t = time::now();
        (t, time::local_offset(t))
    });
    let limits = (args.warn, args.crit, args.verify_warn);
    let r = collect(&store, &root, now, limits)?;
    write(&args.html, &render(&r))
}

/// `byteback-server report`: 0 written, 1 error. Prints the page's path.
pub fn run_report(args: ReportArgs) -> ExitCode {
    match report_inner(args) {
        Ok(p) => {
            println!("{}", p.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("byteback-server: report: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The chart keeps the whole history however many points one host
    /// adds at its end: a burst of 2,100 backups in a day once pushed 90
    /// days of history out of it.
    #[test]
    fn a_burst_of_points_keeps_the_history_in_the_chart() {
        let day = 86_400;
        let mut pts: Vec<(i64, u64, u64)> =
            (0..90).map(|d| (d * day, 100 - d as u64, 1000)).collect();
        pts.extend((0..2100).map(|i| (90 * day + i, 5, 1000)));
        let got = thin_by_time(pts, MAX_POINTS);
        assert!(got.len() <= MAX_POINTS, "{}", got.len());
        assert_eq!(got.first().unwrap().0, 0);
        assert!(got.last().unwrap().0 >= 90 * day);
        // Least free space of each slice: the burst shows as 5.
        assert_eq!(got.last().unwrap().1, 5);
        let few = vec![(3, 1, 2), (1, 1, 2)];
        assert_eq!(thin_by_time(few, MAX_POINTS), vec![(1, 1, 2), (3, 1, 2)]);
    }

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            esc("<script>\"a\"&'b'</script>"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
        assert_eq!(esc("a\u{1b}[31m"), "a\u{fffd}[31m");
    }

    #[test]
    fn buckets_tile_the_axis_newest_first() {
        let now = time::parse_rfc3339("2026-11-27T15:00:00Z").unwrap().0;
        let b = buckets(now, 0, now - 1000 * 86_400);
        assert_eq!(b.iter().filter(|b| b.kind == "day").count(), 7);
        assert_eq!(b.iter().filter(|b| b.kind == "week").count(), 4);
        assert_eq!(
            b.iter().filter(|b| b.kind == "4 weeks").count(),
            MAX_PERIODS
        );
        for w in b.windows(2) {
            assert_eq!(w[0].from, w[1].to, "{w:?}");
        }
        // Today's bucket is today, midnight to midnight.
        let today = time::parse_rfc3339("2026-11-27T00:00:00Z").unwrap().0;
        assert_eq!((b[0].from, b[0].to), (today, today + 86_400));
        assert!(b[0].from <= now && now < b[0].to);
    }

    #[test]
    fn a_killed_reports_temporary_page_is_swept() {
        let d = tempfile::tempdir().unwrap();
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            c.wait().unwrap();
            c.id()
        };
        let alive = std::os::unix::process::parent_id();
        for pid in [dead, alive] {
            std::fs::write(d.path().join(format!(".index.html.{pid}.tmp")), b"half").unwrap();
        }
        write(d.path(), "<html></html>").unwrap();
        assert!(!d.path().join(format!(".index.html.{dead}.tmp")).exists());
        assert!(d.path().join(format!(".index.html.{alive}.tmp")).exists());
        assert_eq!(
            std::fs::read_to_string(d.path().join("index.html")).unwrap(),
            "<html></html>"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}

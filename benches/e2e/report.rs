//! The table, the goals and the JSON.

use std::fmt::Write as _;
use std::time::Duration;

use crate::tools::{Ceiling, Sample, Tool};

/// All runs of one workload.
pub struct Row {
    pub id: String,
    pub desc: String,
    /// Bytes of regular-file data in the source tree.
    pub bytes: u64,
    pub byteback: Vec<Sample>,
    pub rsync: Vec<Sample>,
    /// The machine's limits for this workload (first backups only).
    pub ceiling: Option<Ceiling>,
}

/// Median (of the middle pair's mean for an even count) of `v`.
fn median<T: Copy + Into<f64>>(v: impl Iterator<Item = T>) -> f64 {
    let mut xs: Vec<f64> = v.map(Into::into).collect();
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The figures of one tool on one workload.
pub struct Summary {
    pub runs: usize,
    pub wall: f64,
    pub wall_min: f64,
    pub wall_max: f64,
    pub cpu: f64,
    pub client_cpu: f64,
    pub server_cpu: Option<f64>,
    /// Busy time of all CPUs (see `Sample::machine_cpu`).
    pub machine_cpu: f64,
    pub wire: f64,
    pub space: f64,
    /// Worst (largest) peak RSS over the runs, KiB.
    pub client_rss: u64,
    pub server_rss: Option<u64>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Summary {
    fn of(s: &[Sample]) -> Summary {
        let walls = s.iter().map(|x| secs(x.wall));
        Summary {
            runs: s.len(),
            wall: median(walls.clone()),
            wall_min: walls.clone().fold(f64::INFINITY, f64::min),
            wall_max: walls.fold(0.0, f64::max),
            cpu: median(s.iter().map(|x| secs(x.cpu))),
            client_cpu: median(s.iter().map(|x| secs(x.client_cpu))),
            server_cpu: s
                .iter()
                .all(|x| x.server_cpu.is_some())
                .then(|| median(s.iter().filter_map(|x| x.server_cpu.map(secs)))),
            machine_cpu: median(s.iter().map(|x| secs(x.machine_cpu))),
            wire: median(s.iter().map(|x| x.wire_bytes as f64)),
            space: median(s.iter().map(|x| x.space_added as f64)),
            client_rss: s.iter().map(|x| x.client_rss_kib).max().unwrap_or(0),
            server_rss: s.iter().filter_map(|x| x.server_rss_kib).max(),
        }
    }

    fn max_rss(&self) -> u64 {
        self.client_rss.max(self.server_rss.unwrap_or(0))
    }
}

impl Row {
    pub fn new(id: &str, desc: &str, bytes: u64) -> Row {
        Row {
            id: id.into(),
            desc: desc.into(),
            bytes,
            byteback: vec![],
            rsync: vec![],
            ceiling: None,
        }
    }

    pub fn push(&mut self, tool: Tool, s: Sample) {
        match tool {
            Tool::Byteback => self.byteback.push(s),
            Tool::Rsync => self.rsync.push(s),
        }
    }

    pub fn bb(&self) -> Summary {
        Summary::of(&self.byteback)
    }

    pub fn rs(&self) -> Summary {
        Summary::of(&self.rsync)
    }
}

/// One goal of the issue, measured.
pub struct Goal {
    pub name: String,
    pub target: String,
    pub measured: String,
    /// None when the workload it needs was not run.
    pub met: Option<bool>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        if a == 0.0 {
            1.0
        } else {
            f64::INFINITY
        }
    } else {
        a / b
    }
}

pub fn goals(rows: &[Row]) -> Vec<Goal> {
    let find = |id: &str| rows.iter().find(|r| r.id == id);
    let mut g = vec![];
    let speed = |id: &str, want: f64, name: &str| -> Goal {
        match find(id) {
            Some(r) => {
                let x = ratio(r.rs().wall, r.bb().wall);
                Goal {
                    name: name.into(),
                    target: format!("{id}: byteback >= {want}x rsync's speed"),
                    measured: format!("{x:.2}x"),
                    met: Some(x >= want),
                }
            }
            None => Goal {
                name: name.into(),
                target: format!("{id}: byteback >= {want}x rsync's speed"),
                measured: "not run".into(),
                met: None,
            },
        }
    };
    g.push(speed("W2", 1.5, "first backup, large files"));
    g.push(speed("W1", 2.0, "first backup, many small files"));
    g.push(speed("W3", 5.0, "no-change re-run"));
    g.push(speed("W4", 2.0, "small edits in large files"));
    g.push(speed("W5", 2.0, "appends to large files"));
    g.push(speed("W6", 1.5, "first backup, /usr/share"));
    // CPU (client + server) at most rsync's, on every workload run.
    // The machine's CPU beside it, for where the two differ (see Sample::machine_cpu).
    let cpu: Vec<(String, f64, f64)> = rows
        .iter()
        .filter(|r| !r.byteback.is_empty() && !r.rsync.is_empty())
        .map(|r| {
            let (b, s) = (r.bb(), r.rs());
            (
                r.id.clone(),
                ratio(b.cpu, s.cpu),
                ratio(b.machine_cpu, s.machine_cpu),
            )
        })
        .collect();
    g.push(Goal {
        name: "CPU".into(),
        target: "byteback's CPU (client + server) <= rsync's, every workload".into(),
        measured: if cpu.is_empty() {
            "not run".into()
        } else {
            cpu.iter()
                .map(|(id, x, m)| format!("{id} {x:.2}x (machine {m:.2}x)"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        met: (!cpu.is_empty()).then(|| cpu.iter().all(|(_, x, _)| *x <= 1.0)),
    });
    for (id, what, pick) in [
        ("W4", "bytes on the wire", 0usize),
        ("W5", "bytes on the wire", 0),
        ("W9", "bytes on the wire", 0),
        ("W4", "snapshot space", 1),
    ] {
        let target = format!("{id}: byteback's {what} <= rsync's");
        g.push(match find(id) {
            Some(r) => {
                let (b, s) = if pick == 0 {
                    (r.bb().wire, r.rs().wire)
                } else {
                    (r.bb().space, r.rs().space)
                };
                Goal {
                    name: format!("{id} {what}"),
                    target,
                    measured: format!("{} vs {} ({:.2}x)", human(b), human(s), ratio(b, s)),
                    met: Some(b <= s),
                }
            }
            None => Goal {
                name: format!("{id} {what}"),
                target,
                measured: "not run".into(),
                met: None,
            },
        });
    }
    let target = "W8: byteback's bytes on the wire <= 1% of the file's size".to_string();
    g.push(match find("W8") {
        Some(r) => {
            let b = r.bb().wire;
            Goal {
                name: "W8 moved and copied file".into(),
                target,
                measured: format!(
                    "{} for {} ({:.3}%), rsync {}",
                    human(b),
                    human(r.bytes as f64),
                    100.0 * b / r.bytes.max(1) as f64,
                    human(r.rs().wire)
                ),
                met: Some(b * 100.0 <= r.bytes as f64),
            }
        }
        None => Goal {
            name: "W8 moved and copied file".into(),
            target,
            measured: "not run".into(),
            met: None,
        },
    });
    // The memory goal covers W1-W6 (W6, a real tree, has the
    // largest files and directories of them).
    let small: Vec<&Row> = rows
        .iter()
        .filter(|r| ["W1", "W2", "W3", "W4", "W5", "W6"].contains(&r.id.as_str()))
        .collect();
    let rss_goal = |rows: &[&Row], limit_mib: u64, name: &str, target: &str| -> Goal {
        if rows.is_empty() {
            return Goal {
                name: name.into(),
                target: target.into(),
                measured: "not run".into(),
                met: None,
            };
        }
        let c = rows.iter().map(|r| r.bb().client_rss).max().unwrap_or(0);
        let s = rows
            .iter()
            .filter_map(|r| r.bb().server_rss)
            .max()
            .unwrap_or(0);
        let rs = rows.iter().map(|r| r.rs().max_rss()).max().unwrap_or(0);
        Goal {
            name: name.into(),
            target: target.into(),
            measured: format!(
                "client {:.1} MiB, server {:.1} MiB (rsync {:.1} MiB)",
                c as f64 / 1024.0,
                s as f64 / 1024.0,
                rs as f64 / 1024.0
            ),
            met: Some(c < limit_mib * 1024 && s < limit_mib * 1024),
        }
    };
    g.push(rss_goal(
        &small,
        64,
        "peak RSS, W1-W6",
        "each side < 64 MiB",
    ));
    let million: Vec<&Row> = rows.iter().filter(|r| r.id == "W7").collect();
    g.push(rss_goal(
        &million,
        128,
        "peak RSS, million-file tree (W7)",
        "each side < 128 MiB",
    ));
    g
}

/// Bytes with a binary unit.
pub fn human(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn mibs(bytes: u64, wall: f64) -> f64 {
    if wall > 0.0 {
        bytes as f64 / (1 << 20) as f64 / wall
    } else {
        0.0
    }
}

fn rss(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The text table (markdown, so it pastes into the README as it is).
pub fn table(rows: &[Row], goals: &[Goal]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| workload | tool | wall s (median, min-max) | MiB/s | CPU s | peak RSS MiB (client / server) | wire | snapshot space |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (b, s) = (r.bb(), r.rs());
        for (name, x) in [("byteback", &b), ("rsync", &s)] {
            let label = if name == "byteback" {
                format!("{} {}", r.id, r.desc)
            } else {
                String::new()
            };
            let side = match x.server_rss {
                Some(sr) => format!("{} / {}", rss(x.client_rss), rss(sr)),
                None => format!("{} (largest process)", rss(x.client_rss)),
            };
            let cpu = match x.server_cpu {
                Some(sc) => format!("{:.2} ({:.2} + {:.2})", x.cpu, x.client_cpu, sc),
                None => format!("{:.2}", x.cpu),
            };
            let _ = writeln!(
                t,
                "| {label} | {name} | {:.2} ({:.2}-{:.2}, n={}) | {:.0} | {cpu} | {side} | {} | {} |",
                x.wall,
                x.wall_min,
                x.wall_max,
                x.runs,
                mibs(r.bytes, x.wall),
                human(x.wire),
                human(x.space)
            );
        }
        let _ = writeln!(
            t,
            "| | **byteback/rsync** | **{:.2}x time ({:.2}x speed)** | | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            ratio(b.wall, s.wall),
            ratio(s.wall, b.wall),
            ratio(b.cpu, s.cpu),
            ratio(b.max_rss() as f64, s.max_rss() as f64),
            ratio(b.wire, s.wire),
            ratio(b.space, s.space)
        );
    }
    let _ = writeln!(
        t,
        "\nMachine CPU (medians): the busy time of all cores during the run, from `/proc/stat`: \
         the tools' processes and the kernel threads' work they cause (the writeback a \
         backup's snapshot waits for, the loop device's copies), which the CPU column, the \
         tools' own processes, leaves out. A restore's writeback comes after it.\n"
    );
    let _ = writeln!(t, "| workload | byteback s | rsync s | byteback/rsync |");
    let _ = writeln!(t, "|---|---|---|---|");
    for r in rows {
        let (b, s) = (r.bb(), r.rs());
        let _ = writeln!(
            t,
            "| {} | {:.2} | {:.2} | {:.2}x |",
            r.id,
            b.machine_cpu,
            s.machine_cpu,
            ratio(b.machine_cpu, s.machine_cpu)
        );
    }
    let with_ceiling: Vec<&Row> = rows.iter().filter(|r| r.ceiling.is_some()).collect();
    if !with_ceiling.is_empty() {
        let _ = writeln!(
            t,
            "\nCeilings (one cold-cache run each): the filesystem's, `cp -a --reflink=never` of the \
             tree into the same filesystem plus `sync`; the channel's, the tree as a tar stream \
             through the transport into `cat >/dev/null`. \"of ceiling\" is the larger one's time \
             over the tool's (1.00 = as fast as the machine allows).\n"
        );
        let _ = writeln!(
            t,
            "| workload | cp -a + sync s | channel s | byteback s | byteback of ceiling | rsync s | rsync of ceiling |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|");
        for r in with_ceiling {
            let Some(c) = r.ceiling else { continue };
            let (b, s) = (r.bb(), r.rs());
            let top = secs(c.wall());
            let _ = writeln!(
                t,
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.id,
                secs(c.fs),
                secs(c.channel),
                b.wall,
                ratio(top, b.wall),
                s.wall,
                ratio(top, s.wall)
            );
        }
    }
    let _ = writeln!(t, "\n| goal | target | measured | met |");
    let _ = writeln!(t, "|---|---|---|---|");
    for g in goals {
        let met = match g.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(t, "| {} | {} | {} | {met} |", g.name, g.target, g.measured);
    }
    t
}

/// CPU model, cores, memory and kernel of this machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {:.0} GiB RAM, Linux {}",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn js(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn js_f(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn js_samples(s: &[Sample]) -> String {
    let items: Vec<String> = s
        .iter()
        .map(|x| {
            format!(
                "{{\"wall_s\":{},\"cpu_s\":{},\"machine_cpu_s\":{},\"client_cpu_s\":{},\"server_cpu_s\":{},\"client_rss_kib\":{},\"server_rss_kib\":{},\"wire_bytes\":{},\"space_added_bytes\":{}}}",
                js_f(secs(x.wall)),
                js_f(secs(x.cpu)),
                js_f(secs(x.machine_cpu)),
                js_f(secs(x.client_cpu)),
                x.server_cpu.map(|d| js_f(secs(d))).unwrap_or_else(|| "null".into()),
                x.client_rss_kib,
                x.server_rss_kib.map(|k| k.to_string()).unwrap_or_else(|| "null".into()),
                x.wire_bytes,
                x.space_added
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn js_summary(x: &Summary) -> String {
    format!(
        "{{\"wall_s_median\":{},\"cpu_s_median\":{},\"machine_cpu_s_median\":{},\"wire_bytes_median\":{},\"space_added_bytes_median\":{},\"client_rss_kib_max\":{},\"server_rss_kib_max\":{}}}",
        js_f(x.wall),
        js_f(x.cpu),
        js_f(x.machine_cpu),
        js_f(x.wire),
        js_f(x.space),
        x.client_rss,
        x.server_rss.map(|k| k.to_string()).unwrap_or_else(|| "null".into())
    )
}

pub fn json(
    rows: &[Row],
    goals: &[Goal],
    machine: &str,
    load: &str,
    command: &str,
    transport: &str,
    quick: bool,
) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "{{\n\"machine\":{},\n\"load_average_at_end\":{},\n\"command\":{},\n\"transport\":{},\n\"quick\":{quick},\n\"workloads\":[\n",
        js(machine),
        js(load),
        js(command),
        js(transport)
    );
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            let (b, s) = (r.bb(), r.rs());
            let ceiling = match r.ceiling {
                Some(c) => format!(
                    "{{\"cp_a_sync_s\":{},\"channel_s\":{},\"byteback_fraction\":{},\"rsync_fraction\":{}}}",
                    js_f(secs(c.fs)),
                    js_f(secs(c.channel)),
                    js_f(ratio(secs(c.wall()), b.wall)),
                    js_f(ratio(secs(c.wall()), s.wall))
                ),
                None => "null".into(),
            };
            format!(
                "{{\"id\":{},\"ceiling\":{ceiling},\"description\":{},\"source_bytes\":{},\"byteback\":{{\"summary\":{},\"runs\":{}}},\"rsync\":{{\"summary\":{},\"runs\":{}}},\"ratios_byteback_over_rsync\":{{\"wall\":{},\"cpu\":{},\"machine_cpu\":{},\"peak_rss\":{},\"wire\":{},\"space\":{}}}}}",
                js(&r.id),
                js(&r.desc),
                r.bytes,
                js_summary(&b),
                js_samples(&r.byteback),
                js_summary(&s),
                js_samples(&r.rsync),
                js_f(ratio(b.wall, s.wall)),
                js_f(ratio(b.cpu, s.cpu)),
                js_f(ratio(b.machine_cpu, s.machine_cpu)),
                js_f(ratio(b.max_rss() as f64, s.max_rss() as f64)),
                js_f(ratio(b.wire, s.wire)),
                js_f(ratio(b.space, s.space))
            )
        })
        .collect();
    o.push_str(&items.join(",\n"));
    o.push_str("\n],\n\"goals\":[\n");
    let gs: Vec<String> = goals
        .iter()
        .map(|g| {
            format!(
                "{{\"name\":{},\"target\":{},\"measured\":{},\"met\":{}}}",
                js(&g.name),
                js(&g.target),
                js(&g.measured),
                g.met
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "null".into())
            )
        })
        .collect();
    o.push_str(&gs.join(",\n"));
    o.push_str("\n]\n}\n");
    o
}

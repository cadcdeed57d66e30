//! The admin commands, `prune` and `status`: arguments shared by
//! `byteback-prune` (1.x's name and options) and `byteback-server prune|status`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use crate::config::StoreConfig;
use crate::error::{Error, IoContext, Result};
use crate::prune::{prune_order, Order, Snapshot};
use crate::pruner::{self, PruneOptions};
use crate::store::Store;
use crate::{space, status, time};

/// Deletion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrderArg {
    /// byteback 1.x importance: days, weeks, then every 4th Sunday.
    Importance,
    /// Oldest first.
    Age,
}

// `byteback-prune`'s whole command line, public so its man page and shell
// completions are generated from the definition the binary parses (the doc
// comment below is its --help text).
/// Prune old snapshots so the store keeps enough free space.
#[derive(Debug, clap::Parser)]
#[command(name = "byteback-prune", version)]
pub struct PruneCli {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub args: PruneArgs,
}

/// Options of `byteback-prune` (as byteback 1.x) and `byteback-server prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Start pruning when the store has less than this % free (default: byteback.toml, else 5).
    #[arg(short = 'm', long)]
    pub minpercent: Option<u32>,
    /// Stop pruning once more than this % is free (default: byteback.toml, else 10).
    #[arg(short = 'a', long)]
    pub maxpercent: Option<u32>,
    /// List snapshots as <host>/<snapshot>, most important first; the last goes first.
    #[arg(short = 'l', long)]
    pub list: bool,
    /// Prune if the store is short of space.
    #[arg(short = 'p', long)]
    pub prune: bool,
    /// Prune regardless: at least the next snapshot, even within 7 days, and accept growth spikes
    /// (with --accept, only those named).
    #[arg(short = 'r', long)]
    pub prune_force: bool,
    /// Accept this growth spike (HOST/SNAPSHOT, as the refusal names it; repeatable), then prune
    /// as --prune does (or --prune-force).
    #[arg(long, value_name = "HOST/SNAPSHOT")]
    pub accept: Vec<String>,
    /// Order snapshots by importance or age.
    #[arg(short = 'o', long, value_enum, default_value = "importance")]
    pub order: OrderArg,
    /// Report every step on stderr.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Show a spinner with the snapshots examined and deleted even when
    /// stderr is not a terminal.
    #[arg(long, conflicts_with = "no_progress")]
    pub progress: bool,
    /// Never show the spinner (by default it is shown when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// With --prune: only say what would be deleted next.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Store root (default: the home directory of the user running it; as root,
    /// the account byteback's).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Act as of this time (RFC 3339, e.g. 2026-11-27T12:00:00Z), for dry runs and tests.
    #[arg(long, value_parser = parse_now)]
    pub now: Option<(i64, i64)>,
    /// Print one JSON object on stdout at the end (what was deleted and kept;
    /// with --list, the order) instead of the list; messages still go to stderr.
    #[arg(long)]
    pub json: bool,
}

/// Options of `byteback-server status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Store root (default: the home directory of the user running it; as root,
    /// the account byteback's).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// WARNING (exit 1) when a host's newest snapshot is older (e.g. 26h, 2d).
    #[arg(long, value_parser = parse_age)]
    pub warn: Option<i64>,
    /// CRITICAL (exit 2) when a host's newest snapshot is older.
    #[arg(long, value_parser = parse_age)]
    pub crit: Option<i64>,
    /// WARNING (exit 1) when a host was last verified whole longer ago
    /// (byteback-server verify), or never while its oldest snapshot is
    /// older (e.g. 60d).
    #[arg(long, value_parser = parse_age)]
    pub verify_warn: Option<i64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Ages as of this time (RFC 3339).
    #[arg(long, value_parser = parse_now)]
    pub now: Option<(i64, i64)>,
}

/// Parses `--now`: Unix seconds and the UTC offset written in it.
pub fn parse_now(s: &str) -> Result<(i64, i64), String> {
    time::parse_rfc3339(s).ok_or_else(|| format!("{s:?} is not an RFC 3339 time"))
}

/// Parses an age flag (`--warn`, `--crit`): seconds, or with s, m, h, d, w.
pub fn parse_age(s: &str) -> Result<i64, String> {
    status::parse_age(s).ok_or_else(|| format!("{s:?} is not an age (e.g. 3600, 90m, 26h, 2d)"))
}

/// The store root: the flag, else `$HOME` (the byteback user's home, as 1.x).
/// Root's home is never taken for a store (an admin running a command as
/// root would see an empty store and exit 0): as root, the home of the
/// account `byteback` is, with a note, or it is a usage error.
pub fn store_root(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    if rustix::process::geteuid().is_root() {
        return match home_of(c"byteback") {
            Some(home) => {
                tracing::info!(
                    "store: {} (the home of the account byteback; --store names another)",
                    home.display()
                );
                Ok(home)
            }
            None => Err(Error::Usage(
                "run as root with no --store, and there is no account byteback: give --store \
                 DIR (the store account's home), or run as that account (runuser -u ACCOUNT \
                 -- ...)"
                    .into(),
            )),
        };
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| Error::Usage("no --store given and no home directory".into()))
}

/// Run as root on a store owned by another account (the byteback account's
/// home, as the set-up makes it), becomes that account before anything is
/// written: a lock, verify's state or an accepted growth created by root
/// (mode 0600) would make every later run by the account, the daily timer's,
/// fail on it. A store owned by root is worked on as root.
pub fn become_store_owner(root: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let m = std::fs::metadata(root).map_err(|e| Error::io("cannot look at", root.display(), e))?;
    if m.uid() == 0 {
        return Ok(());
    }
    // SAFETY: plain system calls on integers; the group list goes first,
    // then the group, then the user (after which the others are not ours
    // to change). Run before any thread of this process starts.
    let failed = unsafe {
        libc::setgroups(1, &m.gid()) != 0
            || libc::setgid(m.gid()) != 0
            || libc::setuid(m.uid()) != 0
    };
    if failed {
        return Err(Error::io(
            "cannot become the owner of",
            root.display(),
            std::io::Error::last_os_error(),
        ));
    }
    tracing::info!(
        "running as the store's owner (uid {}, gid {}), as the daily runs do",
        m.uid(),
        m.gid()
    );
    Ok(())
}

/// The home directory of account `name`, if it exists and has an absolute
/// one.
fn home_of(name: &std::ffi::CStr) -> Option<PathBuf> {
    // SAFETY: getpwnam_r writes only into the entry and buffer given (of
    // the length given) and sets `out` to the entry or null.
    home_from(|pw, buf, out| unsafe {
        libc::getpwnam_r(name.as_ptr(), pw, buf.as_mut_ptr().cast(), buf.len(), out)
    })
}

/// The home directory of the account of `uid`, if it exists and has an
/// absolute one.
pub fn home_of_uid(uid: u32) -> Option<PathBuf> {
    // SAFETY: as in `home_of`, with getpwuid_r.
    home_from(|pw, buf, out| unsafe {
        libc::getpwuid_r(uid, pw, buf.as_mut_ptr().cast(), buf.len(), out)
    })
}

/// The home directory of the passwd entry `lookup` fills in (a getpw*_r
/// call given the entry, its buffer and where to say it found one).
fn home_from(
    lookup: impl FnOnce(&mut libc::passwd, &mut [u8], &mut *mut libc::passwd) -> libc::c_int,
) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc = lookup(&mut pw, &mut buf, &mut out);
    if rc != 0 || out.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: `pw_dir` is a NUL-terminated string inside `buf`, which
    // outlives its use here.
    let dir = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) };
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    dir.is_absolute().then_some(dir)
}

fn clock(now: Option<(i64, i64)>) -> (i64, i64) {
    now.unwrap_or_else(|| {
        let t = time::now();
        (t, time::local_offset(t))
    })
}

/// A snapshot in a JSON report.
#[derive(Debug, serde::Serialize)]
pub struct SnapshotJson {
    /// Host name.
    pub host: String,
    /// Snapshot name.
    pub snapshot: String,
}

impl From<&Snapshot> for SnapshotJson {
    fn from(s: &Snapshot) -> Self {
        SnapshotJson {
            host: s.host.clone(),
            snapshot: s.name.clone(),
        }
    }
}

/// Free space in a JSON report.
#[derive(Debug, serde::Serialize)]
pub struct SpaceJson {
    /// Bytes that can still be written.
    pub free_bytes: u64,
    /// Data capacity.
    pub size_bytes: u64,
    /// Free percentage (the scarcer of data and metadata).
    pub free_percent: f64,
}

impl From<&space::Space> for SpaceJson {
    fn from(s: &space::Space) -> Self {
        SpaceJson {
            free_bytes: s.free,
            size_bytes: s.size,
            free_percent: (s.percent_free() * 100.0).round() / 100.0,
        }
    }
}

/// `byteback-prune --json`.
#[derive(Debug, Default, serde::Serialize)]
pub struct PruneJson {
    /// The process's exit code.
    pub exit_code: u8,
    /// `list`, `prune` or `prune-force`.
    pub mode: &'static str,
    /// Nothing was deleted, only named (`--dry-run`).
    pub dry_run: bool,
    /// Deleted (or, in a dry run, next to go), in order.
    pub deleted: Vec<SnapshotJson>,
    /// The snapshots left, most important first (with --list: all of them;
    /// the last goes first).
    pub kept: Vec<SnapshotJson>,
    /// Why pruning stopped short or did not start, if it did.
    pub refused: Option<String>,
    /// Free space before.
    pub before: Option<SpaceJson>,
    /// Free space after.
    pub after: Option<SpaceJson>,
    /// Wall time.
    pub duration_seconds: f64,
    /// The error that stopped the run, if one did.
    pub error: Option<String>,
}

/// One `byteback-prune` run. Long (~90 lines) because it is the command's
/// whole sequence — option checks, list or prune, the refusal and the
/// exit code — each step filling the JSON report; split, the order would
/// no longer read top to bottom.
fn prune_inner(args: PruneArgs, report: &mut PruneJson) -> Result<u8> {
    let do_prune = args.prune || args.prune_force || !args.accept.is_empty();
    if do_prune == args.list {
        return Err(Error::Usage(
            "give exactly one of --list or --prune/--prune-force/--accept".into(),
        ));
    }
    let root = store_root(args.store)?;
    if do_prune {
        become_store_owner(&root)?;
    }
    let cfg = StoreConfig::load(&root)?;
    let minpercent = args.minpercent.unwrap_or(cfg.minpercent);
    let maxpercent = args.maxpercent.unwrap_or(cfg.maxpercent);
    if minpercent > maxpercent || maxpercent > 100 {
        return Err(Error::Usage(
            "--minpercent must not exceed --maxpercent (at most 100)".into(),
        ));
    }
    let store = Store::open(&root)?;
    let (now, offset) = clock(args.now);
    let order = match args.order {
        OrderArg::Importance => Order::Importance,
        OrderArg::Age => Order::Age,
    };
    if args.list {
        report.mode = "list";
        let snaps = pruner::all_snapshots(&store)?;
        let space = space::measure(store.fd()).op("measure", || root.display().to_string())?;
        if args.verbose {
            let line = format!("byteback-prune: {space}\n");
            byteback_protocol::term::print_lines(tracing::Level::INFO, line.as_bytes());
        }
        let ordered = prune_order(&snaps, now, offset, order);
        if args.json {
            report.kept = ordered.iter().map(SnapshotJson::from).collect();
            report.before = Some((&space).into());
            report.after = Some((&space).into());
            return Ok(0);
        }
        let mut out = std::io::stdout().lock();
        for s in ordered {
            writeln!(out, "{s}").op("write", || STDOUT)?;
        }
        out.flush().op("write", || STDOUT)?;
        return Ok(0);
    }
    report.mode = if args.prune_force {
        "prune-force"
    } else {
        "prune"
    };
    report.dry_run = args.dry_run;
    let opts = PruneOptions {
        minpercent,
        maxpercent,
        force: args.prune_force,
        order,
        now,
        offset,
        verbose: args.verbose,
        dry_run: args.dry_run,
        target_free: None,
        max_deletions: None,
        only_host: None,
        accept: args.accept,
    };
    // Lines whole, above the spinner.
    let mut err = std::io::LineWriter::new(byteback_protocol::term::LinesAt(tracing::Level::INFO));
    if !opts.accept.is_empty() {
        pruner::accept(&store, &opts.accept, opts.dry_run, &mut err)?;
    }
    let spinner = byteback_protocol::term::progress_wanted(args.progress, args.no_progress)
        .then(prune_spinner);
    let o = pruner::prune(&store, &opts, &mut err);
    if spinner.is_some() {
        byteback_protocol::term::hide_bar();
    }
    let o = o?;
    report.deleted = o.deleted.iter().map(SnapshotJson::from).collect();
    report.before = Some((&o.before).into());
    report.after = Some((&o.after).into());
    report.refused.clone_from(&o.refused);
    let mut left = pruner::all_snapshots(&store)?;
    if args.dry_run {
        left.retain(|s| !o.deleted.contains(s));
    }
    report.kept = prune_order(&left, now, offset, order)
        .iter()
        .map(SnapshotJson::from)
        .collect();
    if let Some(why) = &o.refused {
        let line = format!("byteback-prune: {why} ({})\n", o.after);
        byteback_protocol::term::print_lines(tracing::Level::WARN, line.as_bytes());
        if why.starts_with("not pruning:") {
            return Ok(3);
        }
    } else if args.verbose || !o.deleted.is_empty() {
        writeln!(
            err,
            "byteback-prune: {} snapshot(s) {}, {}",
            o.deleted.len(),
            if args.dry_run {
                "would be deleted (dry run: nothing was)"
            } else {
                "deleted"
            },
            o.after
        )
        .op("write", || "standard error")?;
    }
    Ok(0)
}

/// A spinner showing [`pruner::EXAMINED`] and [`pruner::DELETED`], redrawn
/// by indicatif's ticker.
fn prune_spinner() -> indicatif::ProgressBar {
    use std::sync::atomic::Ordering;
    let style = indicatif::ProgressStyle::with_template("{spinner} {figures}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
        .with_key(
            "figures",
            |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(
                    w,
                    "pruning: {} snapshots examined, {} deleted",
                    pruner::EXAMINED.load(Ordering::Relaxed),
                    pruner::DELETED.load(Ordering::Relaxed)
                );
            },
        );
    byteback_protocol::term::new_bar(style)
}

/// `byteback-prune`: 0 done (or nothing to do), 1 error, 2 usage,
/// 3 refused by the growth guard (the admin decides).
pub fn run_prune(args: PruneArgs) -> ExitCode {
    let start = std::time::Instant::now();
    let json = args.json;
    let mut report = PruneJson::default();
    let code = match prune_inner(args, &mut report) {
        Ok(c) => c,
        Err(e) => {
            let line = format!("byteback-prune: {e}\n");
            byteback_protocol::term::print_lines(tracing::Level::ERROR, line.as_bytes());
            report.error = Some(format!("{e}"));
            // As the README says: 2 for a usage error.
            if matches!(e, Error::Usage(_)) {
                2
            } else {
                1
            }
        }
    };
    if json {
        report.exit_code = code;
        report.duration_seconds = start.elapsed().as_secs_f64();
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => tracing::error!("cannot write the JSON report: {e}"),
        }
    }
    ExitCode::from(code)
}

fn status_inner(args: StatusArgs) -> Result<ExitCode> {
    let root = store_root(args.store)?;
    let store = Store::open(&root)?;
    let (now, _) = clock(args.now);
    let st = status::collect(&store, now)?;
    let mut out = std::io::stdout().lock();
    let limits = status::Limits {
        warn: args.warn,
        crit: args.crit,
        verify: args.verify_warn,
    };
    let (code, line) = status::check(&st, &limits);
    if args.json {
        out.write_all(status::json(&st, &limits).as_bytes())
            .op("write", || STDOUT)?;
    } else {
        if limits.any() {
            writeln!(out, "{line}").op("write", || STDOUT)?;
        }
        out.write_all(status::table(&st).as_bytes())
            .op("write", || STDOUT)?;
    }
    out.flush().op("write", || STDOUT)?;
    Ok(ExitCode::from(code))
}

/// Where listings go, for messages.
const STDOUT: &str = "standard output";

/// `byteback-server status`: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (error).
pub fn run_status(args: StatusArgs) -> ExitCode {
    let json = args.json;
    match status_inner(args) {
        Ok(c) => c,
        Err(e) => {
            if json {
                let v = serde_json::json!({
                    "state": "UNKNOWN",
                    "summary": format!("BYTEBACK UNKNOWN - {e}"),
                    "exit_code": 3,
                    "error": format!("{e}"),
                });
                println!("{v}");
            } else {
                println!("BYTEBACK UNKNOWN - {e}");
            }
            ExitCode::from(3)
        }
    }
}

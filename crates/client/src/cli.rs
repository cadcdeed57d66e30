//! Command lines of `byteback-backup` and `byteback-restore`: parse, resolve
//! settings once (flag > /etc/byteback file > default), call the library, map
//! the outcome to an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use byteback_protocol::term;
use tracing::level_filters::LevelFilter;

use crate::backup::{run_backup, BackupOptions, Compress};
use crate::conn::{Connection, Destination};
use crate::error::{Error, IoContext, Result};
use crate::progress::{Bar, Kind};
use crate::restore::{self, Patterns};
use crate::ssh::{SshOptions, SshTarget, UnknownHost};
use crate::walk::DEFAULT_EXCLUDES;

/// Exit code when some files vanished or could not be read (as rsync's 24).
pub const EXIT_PARTIAL: u8 = 24;
/// Exit code for bad usage.
pub const EXIT_USAGE: u8 = 2;

/// The client's settings directory: `$BYTEBACK_CONFIG_DIR` or `/etc/byteback`.
pub fn config_dir() -> PathBuf {
    std::env::var_os("BYTEBACK_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/byteback"))
}

/// The login name used when a destination names none (as byteback 1.x).
pub const DEFAULT_SSH_USER: &str = "byteback";

/// OpenSSH's system-wide known_hosts file, which byteback 1.x's `ssh` read.
const GLOBAL_KNOWN_HOSTS: &str = "/etc/ssh/ssh_known_hosts";

/// known_hosts files checked for the server's key: ours, OpenSSH's
/// system-wide one (as 1.x's `ssh` read it) if root owns it, then the
/// user's, if this user owns it; neither if others may write it (as
/// OpenSSH wants; under `sudo -E`, `$HOME` is the invoking user's, whose
/// lines root must not trust).
pub fn known_hosts_files() -> Vec<PathBuf> {
    let mut v = vec![config_dir().join("known_hosts")];
    v.extend(trusted_known_hosts(
        Path::new(GLOBAL_KNOWN_HOSTS),
        0,
        "root's",
    ));
    if let Some(home) = std::env::var_os("HOME") {
        let users = PathBuf::from(home).join(".ssh/known_hosts");
        let me = rustix::process::geteuid().as_raw();
        v.extend(trusted_known_hosts(&users, me, "this user's"));
    }
    v
}

/// `path`, unless it is there and someone other than `owner` (`whose`)
/// owns it or may write it (then a warning says it is not read).
fn trusted_known_hosts(path: &Path, owner: u32, whose: &str) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) if m.uid() != owner || m.mode() & 0o022 != 0 => {
            tracing::warn!(
                "{} is not {whose} alone (owner {}, mode {:o}): not read (`chmod go-w`, \
                 and owned by {whose} account)",
                path.display(),
                m.uid(),
                m.mode() & 0o7777
            );
            None
        }
        _ => Some(path.to_path_buf()),
    }
}

/// A year in seconds: the bound of time options, so that none overflows a
/// clock.
const YEAR: u64 = 365 * 86_400;

/// Back up this machine to a byteback server or a local store.
#[derive(Debug, Parser)]
#[command(name = "byteback-backup", version)]
pub struct BackupArgs {
    /// Where to back up: user@host: (SSH) or a local store directory (an absolute path,
    /// or one starting with ./ or ../). Default: /etc/byteback/destination.
    #[arg(short, long)]
    destination: Option<String>,
    /// What to back up (several allowed, also as `-s /etc /home`). Default: /.
    #[arg(short, long, num_args = 1..)]
    source: Vec<PathBuf>,
    /// Leave out paths matching this rsync exclude pattern (several allowed, also
    /// as `-x a b`; /-anchored or by name; trailing / for directories). As in 1.x,
    /// excludes given here replace the default list.
    #[arg(short = 'x', long, num_args = 1..)]
    exclude: Vec<String>,
    /// Name this machine is filed under (local stores; over SSH the server's key decides). Default: hostname -f.
    #[arg(long)]
    hostname: Option<String>,
    /// How many times to retry a failed backup.
    #[arg(short, long, default_value_t = 5)]
    retry_number: u32,
    /// Seconds to wait between retries (at most a year).
    #[arg(short = 'e', long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(..=YEAR))]
    retry_delay: u64,
    /// Seconds the transfer may take in all, its attempts together (0: no
    /// limit); past it the attempt running fails and none follows (the next
    /// run resumes). However the server trickles its data, a run ends.
    #[arg(long, default_value_t = 172_800, value_parser = clap::value_parser!(u64).range(..=10 * YEAR))]
    max_time: u64,
    /// Seconds without any data moving before the connection counts as dead
    /// (SSH). Default: /etc/byteback/io_timeout, else 10800. A 0 (1.x's
    /// rsync's "no timeout"), here or there, is taken as 10800.
    #[arg(short, long)]
    io_timeout: Option<u64>,
    /// SSH private key. Default: /etc/byteback/key.
    #[arg(short = 'k', long)]
    ssh_key: Option<PathBuf>,
    /// Print every file sent, and each mounted filesystem left out (debug
    /// level); twice (-vv) for trace. Default level: $BYTEBACK_LOG, else info.
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Print nothing when all is well (warnings and errors still print);
    /// otherwise a backup ends with one summary line.
    #[arg(short, long)]
    quiet: bool,
    /// Show progress on stderr even when it is not a terminal (or with --quiet).
    #[arg(long, conflicts_with = "no_progress")]
    progress: bool,
    /// Never show progress (by default it is shown when stderr is a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Stay on each source's own filesystem. By default every mounted local
    /// filesystem below the sources is backed up too (as byteback 1.x did);
    /// btrfs subvolumes are always included.
    #[arg(long)]
    one_file_system: bool,
    /// Seconds each hook in /etc/byteback/pre-backup.d and post-backup.d may
    /// run; then it is killed and counts as failed.
    #[arg(long, default_value_t = crate::hooks::DEFAULT_TIMEOUT_SECS)]
    hook_timeout: u64,
    /// At the end, print one JSON object with the figures on stdout (see
    /// README, "JSON reports"); messages still go to stderr.
    #[arg(long)]
    json: bool,
    /// When to compress file data (zstd level -1): auto compresses over SSH,
    /// not for a local store.
    #[arg(long, value_enum, default_value_t = Compress::Auto)]
    compress: Compress,
    /// Compare every file by content (BLAKE3), not only by size and mtime:
    /// finds files changed with their mtime put back, at the cost of
    /// reading every file. Unchanged ones are kept as stored, not sent.
    #[arg(short = 'c', long)]
    checksum: bool,
}

/// `byteback-backup --json`: what the run did, one object on stdout at the end.
#[derive(Debug, Default, serde::Serialize)]
pub struct BackupJson {
    /// The process's exit code.
    pub exit_code: u8,
    /// `ok`, `partial` or `failed` (as `BYTEBACK_STATUS_TEXT`).
    pub status: &'static str,
    /// Host name the backup is filed under.
    pub host: Option<String>,
    /// Snapshot taken, if any.
    pub snapshot: Option<String>,
    /// The server's note (e.g. why no snapshot was taken).
    pub server_message: Option<String>,
    /// Entries (files, directories, links...) sent.
    pub entries: u64,
    /// Of those, entries equal to the record of the last backup, announced
    /// as runs of unchanged entries instead of one by one.
    pub entries_unchanged: u64,
    /// Files whose data was sent.
    pub files_sent: u64,
    /// New files the server cloned from a stored file with the same content
    /// (moved or copied files): their data was not sent.
    pub files_cloned: u64,
    /// Bytes of file content the server wrote from new data.
    pub bytes_new: u64,
    /// Bytes of file content reused from the previous version.
    pub bytes_reused: u64,
    /// Bytes of deltas put on the wire (compressed unless `--compress` says not to).
    pub bytes_wire: u64,
    /// Entries deleted from the server's copy.
    pub deleted: u64,
    /// Entries kept as the last backup has them because they (or their
    /// directory) could not be read here.
    pub kept_unread: u64,
    /// Entries the server left out, or kept at their last version (each
    /// named in a warning of its message): counted in `partial` too.
    pub left_out: u64,
    /// Files resent whole after failing their hash check.
    pub retried: u64,
    /// Files that vanished during the backup.
    pub vanished: u64,
    /// Files unreadable or changing while read.
    pub partial: u64,
    /// Attempts made (1 + retries).
    pub attempts: u32,
    /// SSH bytes sent and received, all attempts (SSH destinations only).
    pub ssh_bytes_sent: Option<u64>,
    /// See `ssh_bytes_sent`.
    pub ssh_bytes_received: Option<u64>,
    /// Wall time of the whole run, hooks and retries included.
    pub duration_seconds: f64,
    /// Every warning printed.
    pub warnings: Vec<String>,
    /// The errors that ended attempts or the run.
    pub errors: Vec<String>,
}

fn print_json(value: &impl serde::Serialize) {
    use std::io::Write;
    // A reader gone (a pipe closed) is no reason to panic: the run's exit
    // code still tells.
    match serde_json::to_string(value) {
        Ok(s) => {
            let _ = writeln!(std::io::stdout(), "{s}");
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cannot write the JSON report: {e}");
        }
    }
}

/// The first line of `/etc/byteback/NAME` that is not blank or a comment;
/// `None` when the file does not exist (see [`read_config_lines`]).
fn read_config_line(name: &str) -> Result<Option<String>> {
    Ok(read_config_lines(name)?.into_iter().next())
}

/// The lines of the settings file `/etc/byteback/NAME`, trimmed, without
/// blank lines and comments (`#`, `;`); none when
/// the file does not exist. A file that exists but cannot be read, or a
/// line that is not UTF-8, is an error naming it: its settings silently
/// missing (every exclude, say) would change what is backed up.
fn read_config_lines(name: &str) -> Result<Vec<String>> {
    let path = config_dir().join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::Usage(format!("cannot read {}: {e}", path.display()))),
    };
    let mut lines = vec![];
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(line).map_err(|_| {
            Error::Usage(format!(
                "{}:{}: not UTF-8 (byteback reads its settings and patterns as UTF-8 text)",
                path.display(),
                n + 1
            ))
        })?;
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') && !line.starts_with(';') {
            lines.push((n + 1, line.to_string()));
        }
    }
    Ok(lines.into_iter().map(|(_, l)| l).collect())
}

/// The patterns of `/etc/byteback/excludes` as 1.x's rsync read it with
/// `--exclude-from` (see [`crate::filter::exclude_file_lines`]: not
/// trimmed, `\r` ends a line too), each with where it came from
/// (`FILE:LINE`); none when the file does not exist. A file that exists but
/// cannot be read, or a line that is not UTF-8, is an error naming it.
fn read_exclude_file(path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::Usage(format!("cannot read {}: {e}", path.display()))),
    };
    crate::filter::exclude_file_lines(&bytes)
        .into_iter()
        .map(|(n, line)| {
            let from = format!("{}:{n}", path.display());
            match std::str::from_utf8(line) {
                Ok(l) => Ok((from, l.to_string())),
                Err(_) => Err(Error::Usage(format!(
                    "{from}: not UTF-8 (byteback reads its settings and patterns as UTF-8 text)"
                ))),
            }
        })
        .collect()
}

/// `p` with each run of `/` made one.
fn collapse_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// Warnings for the exclude patterns in `own` (where each came from, and
/// the pattern) that match no path, as with rsync (`/`, an unterminated
/// `[`): most likely a typo the user wants to hear of.
fn excludes_matching_nothing(own: &[(String, String)]) -> Vec<String> {
    own.iter()
        .filter(|(_, p)| p != "!" && !p.starts_with("+ "))
        .filter_map(|(from, p)| {
            let pat = p.strip_prefix("- ").unwrap_or(p);
            let why = crate::walk::Excludes::matches_nothing(pat)?;
            Some(format!(
                "{from}: exclude {pat:?}: {why}; it leaves nothing out, as with rsync"
            ))
        })
        .collect()
}

/// The exclude patterns of a backup, as 1.x gave them to rsync (each
/// `-x`, then each line of `/etc/byteback/excludes` as `--exclude-from`):
/// a pattern may start with rsync's old-style prefixes, `- ` (an exclude,
/// the default), `+ ` (an include: not supported here, an error naming it,
/// since leaving it out would change what is backed up) and `!` alone
/// (clears the list so far, defaults included). `from` names where each
/// pattern came from in errors.
pub fn exclude_rules(base: Vec<String>, more: &[(String, String)]) -> Result<Vec<String>> {
    let mut rules = base;
    for (from, p) in more {
        if p == "!" {
            rules.clear();
        } else if let Some(x) = p.strip_prefix("- ") {
            rules.push(x.to_string());
        } else if p.starts_with("+ ") {
            return Err(Error::Usage(format!(
                "{from}: {p:?} is an include rule, which excludes cannot hold here; \
                 put include and exclude rules in {}/rsync_filter",
                config_dir().display()
            )));
        } else {
            rules.push(p.clone());
        }
    }
    Ok(rules)
}

/// Warnings for the sources an exclude or a rule of `rsync_filter` leaves
/// out whole (as rsync `--relative` applied them to a source itself): the
/// user named them to be backed up, and nothing of them is.
/// With `-x` given, the network filesystems mounted below the sources that
/// no exclude or filter rule leaves out: never backed up, where byteback
/// 1.x, whose mount-based excludes went with its default list, backed them
/// up. Said, so that an NFS `/home` 1.x kept is not missed unseen.
fn network_mounts_left_out(
    sources: &[PathBuf],
    excludes: &crate::walk::Excludes,
    filter: Option<&crate::filter::Filter>,
) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    crate::mounts::network_mounts_below(sources)
        .into_iter()
        .filter(|(point, _)| {
            let src = sources
                .iter()
                .map(|s| s.as_os_str().as_bytes())
                .filter(|s| point.starts_with(s))
                .max_by_key(|s| s.len())
                .unwrap_or(b"/");
            !crate::walk::left_out_anywhere(excludes, filter, point, src)
        })
        .map(|(point, fstype)| {
            // Any user may mount FUSE there and name both.
            format!(
                "{}: a filesystem of type {}, not backed up (network, FUSE, ecryptfs and overlay \
                 filesystems never are; byteback 1.x backed them up when -x replaced its \
                 default excludes)",
                byteback_protocol::escape_bytes(&point),
                byteback_protocol::escape_text(&fstype)
            )
        })
        .collect()
}

fn sources_left_out(
    sources: &[PathBuf],
    nested: &[PathBuf],
    excludes: &crate::walk::Excludes,
    filter: Option<&crate::filter::Filter>,
) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let rules = crate::filter::DirRules::default();
    sources
        .iter()
        .filter_map(|s| {
            let rel = s.as_os_str().as_bytes();
            let rel = &rel[rel.iter().take_while(|b| **b == b'/').count()..];
            let is_dir = std::fs::metadata(s).is_ok_and(|m| m.is_dir());
            if rel.is_empty() {
                return None;
            }
            let by = if excludes.is_excluded(rel, is_dir) {
                "an exclude".to_string()
            } else if filter.is_some_and(|f| {
                f.check(&rules, rel, is_dir, 0) == Some(crate::filter::Action::Exclude)
            }) {
                format!("a rule of {}/rsync_filter", config_dir().display())
            } else {
                return None;
            };
            // The sources inside it are walked still, each on its own.
            if nested.iter().any(|o| o != s && o.starts_with(s)) {
                return Some(format!(
                    "source {} is left out by {by}, but for the sources inside it",
                    crate::walk::shown(s),
                ));
            }
            Some(format!(
                "source {} is left out whole by {by}: nothing of it is backed up",
                crate::walk::shown(s),
            ))
        })
        .collect()
}

/// What the server said at the end of a backup, for the JSON report: its
/// lines each escaped as stderr's are (the JSON encoder would pass C1
/// controls and bidi overrides), one to a line; `None` if it said nothing.
fn json_server_message(message: &str) -> Option<String> {
    let lines: Vec<String> = message
        .trim()
        .lines()
        .map(byteback_protocol::escape_text)
        .collect();
    Some(lines.join("\n")).filter(|m| !m.is_empty())
}

/// Database directories the default excludes leave out (their live files
/// are no database one can start again) when no pre-backup hook seems to
/// dump that database instead: each with the names a hook for it carries.
/// Also the file the shipped hook writes the dump to, in the dump directory.
const DATABASE_DIRS: &[(&str, &[&str], &str)] = &[
    ("/var/lib/mysql/", &["mysql", "mariadb"], "mysql.sql.gz"),
    (
        "/var/lib/postgresql/",
        &["postgres", "pg"],
        "postgresql.sql.gz",
    ),
];

/// What a backup's walk leaves out: below its sources (absolute,
/// normalised), what the excludes and the filter leave out, and with
/// `--one-file-system`, other filesystems.
struct Walked<'a> {
    sources: &'a [PathBuf],
    excludes: &'a crate::walk::Excludes,
    filter: Option<&'a crate::filter::Filter>,
    one_file_system: bool,
}

impl Walked<'_> {
    /// Why the walk would not store `abs`, if it would not (see
    /// [`crate::walk::why_left_out`]).
    fn why_left_out(&self, abs: &Path, is_dir: bool) -> Option<String> {
        crate::walk::why_left_out(
            self.sources,
            self.excludes,
            self.filter,
            self.one_file_system,
            abs,
            is_dir,
        )
    }
}

/// What of database directory `rel` (below `root`) the excludes would
/// leave out: the directory itself for MySQL; for PostgreSQL its first
/// version directory (`15/`, holding clusters; only those are excluded by
/// default), `None` when it has none.
fn database_files(root: &Path, rel: &str) -> Option<String> {
    if !root.join(rel).is_dir() {
        return None;
    }
    if rel != "var/lib/postgresql" {
        return Some(rel.to_string());
    }
    let mut versions: Vec<String> = std::fs::read_dir(root.join(rel))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_pg_version(n))
        .collect();
    versions.sort();
    versions.first().map(|v| format!("{rel}/{v}"))
}

/// Whether `name` is a PostgreSQL version's directory name, as the
/// default excludes take it: `9.6`, `15`.
fn is_pg_version(name: &str) -> bool {
    let b = name.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    match b.len() {
        1 | 2 => digits(b),
        3 => b[1] == b'.' && digits(&b[..1]) && digits(&b[2..]),
        _ => false,
    }
}

/// Whether `ex` leaves out directory `rel` or a directory above it.
fn excluded_here_or_above(ex: &crate::walk::Excludes, rel: &str) -> bool {
    let rel = rel.as_bytes();
    rel.iter()
        .enumerate()
        .filter(|&(_, &c)| c == b'/')
        .map(|(i, _)| &rel[..i])
        .chain([rel])
        .any(|p| ex.is_excluded(p, true))
}

/// Warnings for [`DATABASE_DIRS`] that exist beneath a source of `walked`,
/// are left out by its excludes but by no pattern of the user's (`own`),
/// and have no pre-backup hook that runs (run-parts' names, executable)
/// and whose name mentions their database in `hooks_dir`, or one whose
/// dump (in `dump_dir`) the backup leaves out: the backup would hold
/// neither the files nor a dump. `root` is where the directories are
/// looked for (`/`; a scratch tree in tests).
fn databases_left_out(
    root: &Path,
    walked: &Walked<'_>,
    own: &crate::walk::Excludes,
    hooks_dir: &Path,
    dump_dir: &Path,
) -> Vec<String> {
    let (sources, all) = (walked.sources, walked.excludes);
    let hooks: Vec<String> = crate::hooks::list(hooks_dir)
        .map(|l| l.run.into_iter().map(|(n, _)| n.to_lowercase()).collect())
        .unwrap_or_default();
    // A word of a hook's name names a database: `50-mysql`, `50-pg-dump`,
    // `pgdump`, not `10-upgrade` or `pgbouncer`.
    let names_it = |hook: &str, names: &[&str]| {
        hook.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| {
            names.iter().any(|&n| {
                if n == "pg" {
                    w == "pg" || w.starts_with("pgdump")
                } else {
                    w.contains(n)
                }
            })
        })
    };
    let mut out = vec![];
    for (dir, names, dump) in DATABASE_DIRS {
        let path = Path::new(dir.trim_end_matches('/'));
        let beneath = sources.iter().any(|s| path.starts_with(s));
        let rel = dir.trim_start_matches('/').trim_end_matches('/');
        let Some(files) = database_files(root, rel) else {
            continue;
        };
        let by_default =
            excluded_here_or_above(all, &files) && !excluded_here_or_above(own, &files);
        if !beneath || !by_default {
            continue;
        }
        let hooked = hooks.iter().find(|h| names_it(h, names));
        if let Some(h) = hooked {
            // The directory, or the dump in it (`-x '*.gz'`).
            let why = walked
                .why_left_out(dump_dir, true)
                .or_else(|| walked.why_left_out(&dump_dir.join(dump), false));
            if let Some(why) = why {
                out.push(format!(
                    "{dir} is left out (live database files, excluded by default) and the \
                     pre-backup hook {h} dumps it into {}, which this backup leaves out too \
                     ({why}): the backup holds neither. Set BYTEBACK_DUMP_DIR to a directory \
                     the backup keeps, or change what leaves it out",
                    crate::walk::shown(&dump_dir.join(dump))
                ));
            }
            continue;
        }
        out.push(format!(
            "{dir} is left out (live database files, excluded by default) and no pre-backup hook in {} \
             dumps that database: the backup holds neither. Install the shipped dump hook (README, \
             \"Hooks and databases\"), or exclude {dir} in {}/excludes yourself to say it is meant",
            hooks_dir.display(),
            config_dir().display()
        ));
    }
    out
}

/// `hostname -f`'s output, from the program at a fixed path (not through
/// `$PATH`, which `sudo -E` hands on from the user); `Ok(None)` if there is
/// none or it fails. One that takes more than [`HOSTNAME_WAIT`] (DNS not
/// answering) is an error: falling back to the node name then would file
/// the backup under another name on a slow day.
fn hostname_f() -> Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let exe = ["/usr/bin/hostname", "/bin/hostname"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(exe) = exe else {
        return Ok(None);
    };
    let child = std::process::Command::new(exe)
        .arg("-f")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Ok(None);
    };
    let start = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < HOSTNAME_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::msg(format!(
                    "{exe} -f gave no name within {} s (DNS not answering?); give --hostname",
                    HOSTNAME_WAIT.as_secs()
                )));
            }
            Err(_) => return Ok(None),
        }
    };
    let mut out = Vec::new();
    let read = child
        .stdout
        .take()
        .map(|o| o.take(4096).read_to_end(&mut out));
    Ok((status.success() && matches!(read, Some(Ok(_)))).then_some(out))
}

/// Longest `hostname -f` may take.
const HOSTNAME_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// This machine's fully qualified name (as `hostname -f`), or its node name
/// (said in a warning: a `hostname -f` that fails only some days, DNS being
/// down, would file those backups under another name).
pub fn default_hostname() -> Result<String> {
    let name = match hostname_f()? {
        Some(o) if !o.trim_ascii().is_empty() => {
            String::from_utf8_lossy(o.trim_ascii()).into_owned()
        }
        _ => {
            let node = rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned();
            tracing::warn!(
                "hostname -f gave no name; this machine goes by its node name {node:?} (give \
                 --hostname to be sure: a name that changes starts a tree of its own)"
            );
            node
        }
    };
    byteback_protocol::validate_host_name(&name).map_err(|_| {
        Error::Usage(format!(
            "this machine's name {name:?} cannot be a host name; give --hostname"
        ))
    })?;
    Ok(name)
}

/// Where to connect and as whom, resolved once from flags and /etc/byteback.
struct Target {
    /// The destination as written (names the client lock).
    text: String,
    dest: Destination,
    /// Host name for a local store; over SSH the server's forced command decides.
    host: String,
    ssh_key: PathBuf,
    io_timeout: Duration,
}

impl Target {
    fn resolve(
        destination: Option<&str>,
        hostname: Option<&str>,
        ssh_key: Option<&Path>,
        io_timeout: u64,
    ) -> Result<Self> {
        let text = destination
            .map(str::to_string)
            .map_or_else(|| read_config_line("destination"), |d| Ok(Some(d)))?
            .ok_or_else(|| {
                Error::Usage(format!(
                    "no --destination, and no destination in {}/destination (missing, or \
                     blank and comments only); write `user@server:` there, or run \
                     byteback-setup-client",
                    config_dir().display()
                ))
            })?;
        let dest = Destination::parse(&text).map_err(|e| Error::Usage(e.to_string()))?;
        let host = match (hostname, &dest) {
            (Some(h), _) => {
                byteback_protocol::validate_host_name(h)
                    .map_err(|e| Error::Usage(format!("--hostname: {e}")))?;
                h.to_string()
            }
            (None, Destination::Local(_)) => default_hostname()?,
            (None, Destination::Ssh { .. }) => String::new(),
        };
        if io_timeout == 0 {
            return Err(Error::Usage(
                "--io-timeout must be at least 1 second".into(),
            ));
        }
        Ok(Target {
            text,
            dest,
            host,
            ssh_key: ssh_key
                .map(Path::to_path_buf)
                .unwrap_or_else(|| config_dir().join("key")),
            io_timeout: Duration::from_secs(io_timeout),
        })
    }

    /// The warning for the path part of a 1.x-style `user@host:/path`
    /// destination, which is not used, if it has one.
    fn path_warning(&self) -> Option<String> {
        crate::conn::ignored_path(&self.text).map(|p| {
            format!(
                "the path {:?} in the destination {:?} is not used: the server's forced command \
                 names its store (byteback-server --store); write the destination as {:?} to \
                 silence this",
                p,
                self.text,
                &self.text[..self.text.len() - p.len()]
            )
        })
    }

    /// Opens a connection; `verb` tells an SSH server what this session is for.
    fn connect(&self, verb: &str) -> Result<Connection> {
        tracing::debug!("connecting to {} ({verb})", self.text);
        match &self.dest {
            Destination::Local(store) => Ok(Connection::open_local(
                store,
                &self.host,
                verb == "backup",
                self.io_timeout,
            )?),
            Destination::Ssh { user, host, port } => {
                let target = SshTarget::new(
                    user.clone().unwrap_or_else(|| DEFAULT_SSH_USER.into()),
                    host.clone(),
                    *port,
                )
                .with_ssh_config()?;
                let opts = SshOptions {
                    known_hosts: known_hosts_files(),
                    unknown_host: UnknownHost::Refuse,
                    io_timeout: self.io_timeout,
                    ..SshOptions::default()
                };
                let conn = Connection::open_ssh(&target, &self.ssh_key, &opts, verb)?;
                if !self.host.is_empty() && conn.host != self.host {
                    tracing::info!(
                        "note: the server files this machine as {:?} (its key decides), not {:?}",
                        conn.host,
                        self.host
                    );
                }
                Ok(conn)
            }
        }
    }
}

impl Target {
    /// What the client lock is keyed on: the destination as it resolves
    /// (a local store by its canonical path, an SSH server by user, host and
    /// port), plus the host name backed up. Two spellings of one store share
    /// a lock; two hosts backing up to one store from one machine do not.
    fn lock_key(&self) -> String {
        match &self.dest {
            Destination::Local(store) => {
                let canon = std::fs::canonicalize(store).unwrap_or_else(|_| {
                    std::path::absolute(store).unwrap_or_else(|_| store.clone())
                });
                format!("local:{}\0{}", canon.display(), self.host)
            }
            Destination::Ssh { user, host, port } => format!(
                "ssh:{}@{}:{port}\0{}",
                user.as_deref().unwrap_or(DEFAULT_SSH_USER),
                host.to_ascii_lowercase(),
                self.host
            ),
        }
    }
}

/// Takes the client lock for a destination and host (see [`Target::lock_key`]);
/// an flock, so a killed run never leaves it held.
fn lock(key: &str, dest: &str) -> Result<std::fs::File> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let dir = lock_dir();
    let name = format!("backup-{h:016x}.lock");
    let f = open_lock(&dir, &name)?;
    let path = dir.join(&name);
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(_) => Err(Error::msg(format!(
            "another byteback-backup to {dest} is running ({})",
            path.display()
        ))),
    }
}

/// With hooks to run, this machine's hooks lock, waited for: the hooks are
/// the machine's, not a destination's, so a backup that runs them waits
/// for another one's (to another destination) hooks and backup to end
/// (1.x ran one backup at a time): one run's post-backup hooks never tear
/// down what another's pre-backup hooks set up under it (an LVM snapshot,
/// a stopped service). `None` without hooks.
fn hooks_lock(config: &Path) -> Result<Option<std::fs::File>> {
    use crate::hooks::{list, POST_BACKUP_DIR, PRE_BACKUP_DIR};
    let any = |sub| list(&config.join(sub)).map(|l| !l.run.is_empty());
    if !any(PRE_BACKUP_DIR)? && !any(POST_BACKUP_DIR)? {
        return Ok(None);
    }
    let dir = lock_dir();
    let f = open_lock(&dir, "hooks.lock")?;
    use rustix::fs::{flock, FlockOperation};
    if flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        tracing::info!(
            "another byteback-backup (to another destination) runs its hooks: waiting for it to end ({})",
            dir.join("hooks.lock").display()
        );
        flock(&f, FlockOperation::LockExclusive).on("cannot lock", dir.join("hooks.lock"))?;
    }
    Ok(Some(f))
}

/// Where the client's locks are: `/var/lock/byteback` as root, else a
/// directory of this user's in the temporary directory.
fn lock_dir() -> PathBuf {
    if crate::meta::is_root() {
        PathBuf::from("/var/lock/byteback")
    } else {
        std::env::temp_dir().join(format!("byteback-{}", rustix::process::getuid().as_raw()))
    }
}

/// Opens (creating it) lock file `name` in `dir`, a directory private to
/// us: `/var/lock` is writable by every user, so the directory must be
/// ours and writable by nobody else (it is made, or made again, 0700), and
/// the lock is opened beneath it, never through a symlink, never blocking
/// (a FIFO), and must be a regular file of ours. A directory another user
/// made first is refused, naming it.
fn open_lock(dir: &Path, name: &str) -> Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let me = rustix::process::geteuid();
    match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e).on("cannot create", dir),
    }
    let dfd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .on("cannot open", dir)?;
    let st = rustix::fs::fstat(&dfd).on("cannot look at", dir)?;
    if st.st_uid != me.as_raw() {
        return Err(Error::msg(format!(
            "{} belongs to uid {}, not to this user: refusing to keep the lock there (remove it)",
            dir.display(),
            st.st_uid
        )));
    }
    if st.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(&dfd, Mode::from_raw_mode(0o700)).on("cannot chmod", dir)?;
    }
    let path = dir.join(name);
    let fd = rustix::fs::openat(
        &dfd,
        name,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .on("cannot open", &path)?;
    let st = rustix::fs::fstat(&fd).on("cannot look at", &path)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
        || st.st_uid != me.as_raw()
    {
        return Err(Error::msg(format!(
            "{} is not a regular file of this user: refusing to use it as the lock (remove it)",
            path.display()
        )));
    }
    Ok(std::fs::File::from(fd))
}

/// Whether retrying may help: not for usage, configuration, host-key or login errors.
pub fn is_transient(e: &Error) -> bool {
    !(e.is_usage() || e.is_permanent())
}

/// Whether `e` is a usage or configuration error anywhere in its chain.
/// The exit code for an error: 2 for an [`Error::Usage`] anywhere in its chain, else 1.
pub fn exit_code_of(e: &Error) -> ExitCode {
    if e.is_usage() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// Installs the log subscriber for `prog` at the level of `-v`/`-q` and
/// `BYTEBACK_LOG`; a `BYTEBACK_LOG` that is not a level is a usage error.
pub(crate) fn start_logging(
    prog: &'static str,
    verbose: u8,
    quiet: bool,
) -> Result<LevelFilter, ExitCode> {
    match term::log_level(verbose, quiet) {
        Ok(level) => {
            term::init_logging(prog, level, term::stderr_is_journal());
            Ok(level)
        }
        Err(e) => {
            eprintln!("{prog}: {e}");
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// `byteback-backup`.
pub fn backup_main() -> ExitCode {
    let args = BackupArgs::parse();
    // Before any thread starts (see the module).
    let watched = crate::stop::install();
    let level = match start_logging("byteback-backup", args.verbose, args.quiet) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Err(e) = watched {
        tracing::warn!("cannot watch for SIGINT and SIGTERM ({e}): a backup stopped by one does not run its post-backup hooks");
    }
    let start = std::time::Instant::now();
    let json = args.json;
    if json {
        // Stopped by a signal, it says so (what the run gathered is the
        // main thread's, which goes on meanwhile).
        crate::stop::set_report(move |code, msg, snapshot| {
            let said = vec![msg.to_string()];
            let (errors, warnings) = if code == 0 || code == EXIT_PARTIAL {
                (vec![], said)
            } else {
                (said, vec![])
            };
            print_json(&BackupJson {
                exit_code: code,
                status: crate::hooks::status_text(code),
                snapshot: snapshot.map(str::to_string),
                duration_seconds: start.elapsed().as_secs_f64(),
                errors,
                warnings,
                ..BackupJson::default()
            });
        });
    }
    let mut report = BackupJson::default();
    let code = match backup(args, level, &mut report) {
        Ok(code) => code,
        Err(e) => failed(&e, &mut report.errors),
    };
    if json {
        report.exit_code = code;
        report.status = crate::hooks::status_text(code);
        report.duration_seconds = start.elapsed().as_secs_f64();
        print_json(&report);
    }
    ExitCode::from(code)
}

/// Logs the error a run ended with, records it for `--json` and gives its
/// exit code (2 for a usage error).
fn failed(e: &Error, errors: &mut Vec<String>) -> u8 {
    tracing::error!("{e}");
    errors.push(e.to_string());
    if e.is_usage() {
        EXIT_USAGE
    } else {
        1
    }
}

/// `byteback-backup` after parsing: target, lock, pre-backup hooks, the
/// transfer with its retries, post-backup hooks, the report. Over 80 lines
/// because it is that one sequence, read top-down; each step is a call.
fn backup(args: BackupArgs, level: LevelFilter, report: &mut BackupJson) -> Result<u8> {
    let verbose = level >= LevelFilter::DEBUG;
    let target = Target::resolve(
        args.destination.as_deref(),
        args.hostname.as_deref(),
        args.ssh_key.as_deref(),
        backup_io_timeout(args.io_timeout, &mut report.warnings)?,
    )?;
    if let Some(w) = target.path_warning() {
        tracing::warn!("{w}");
        report.warnings.push(w);
    }
    let sources = if args.source.is_empty() {
        vec![PathBuf::from("/")]
    } else {
        args.source.clone()
    };
    // Checked now (a missing source is a usage error before any hook);
    // the warnings below name the sources as the walk takes them.
    let walked = crate::walk::normalise_sources(&sources)?;
    // As 1.x: excludes given on the command line replace the default list.
    let defaults: Vec<String> = if args.exclude.is_empty() {
        DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect()
    } else {
        vec![]
    };
    let flags = crate::rsync_flags::load(&config_dir(), "rsync_flags")?.unwrap_or_default();
    let own: Vec<(String, String)> = args
        .exclude
        .iter()
        // As 1.x (`gsub(/\/+/, '/')` on its -x patterns): `-x /var//cache`
        // (`-x $PREFIX/cache` with `PREFIX=/var/`) leaves out /var/cache.
        .map(|x| (format!("--exclude {x:?}"), collapse_slashes(x)))
        .chain(read_exclude_file(&config_dir().join("excludes"))?)
        .collect();
    for w in excludes_matching_nothing(&own) {
        tracing::warn!("{w}");
        report.warnings.push(w);
    }
    let filter = load_filter(&flags)?;
    let mut excludes = exclude_rules(defaults, &own)?;
    if filter.as_ref().is_some_and(|f| f.clears_excludes) {
        tracing::info!(
            "{}/rsync_filter clears the excludes with '!' (as with 1.x's rsync): none apply",
            config_dir().display()
        );
        excludes.clear();
    }
    let all = crate::walk::Excludes::new(&excludes)?;
    let crosses = !(args.one_file_system || flags.one_file_system);
    // 1.x's mount-based excludes went with its default list: replaced by
    // -x, or cleared with the rest by a '!'.
    let replaced = !args.exclude.is_empty() || filter.as_ref().is_some_and(|f| f.clears_excludes);
    if replaced && crosses {
        for w in network_mounts_left_out(&walked, &all, filter.as_deref()) {
            tracing::warn!("{w}");
            report.warnings.push(w);
        }
    }
    let nested = crate::walk::nested_sources(&sources)?;
    for w in sources_left_out(&walked, &nested, &all, filter.as_deref()) {
        tracing::warn!("{w}");
        report.warnings.push(w);
    }
    {
        // The user's own excludes: rsync_flags' count too.
        let mut own_too = exclude_rules(vec![], &own)?;
        own_too.extend(flags.excludes.iter().map(|(_, p)| p.clone()));
        let mine = crate::walk::Excludes::new(&own_too)?;
        let hooks_dir = config_dir().join(crate::hooks::PRE_BACKUP_DIR);
        // Where the shipped dump hooks write (they see this environment).
        let dump_dir = std::env::var_os("BYTEBACK_DUMP_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/var/backups/byteback"), PathBuf::from);
        // The sources as the walk takes them (absolute, normalised), and
        // the dump directory as it resolves.
        let dump_dir = std::fs::canonicalize(&dump_dir).unwrap_or(dump_dir);
        let rules = Walked {
            sources: &walked,
            excludes: &all,
            filter: filter.as_deref(),
            one_file_system: args.one_file_system || flags.one_file_system,
        };
        let found = databases_left_out(Path::new("/"), &rules, &mine, &hooks_dir, &dump_dir);
        for w in found {
            tracing::warn!("{w}");
            report.warnings.push(w);
        }
    }
    // The record of the last backup is written while the walk runs: it is
    // never backed up itself (a file changing while read).
    if let Some(x) = crate::backup::cache::cache_dir().and_then(|d| record_exclude(&d)) {
        excludes.push(x);
    }
    let (warning, note) = flags.messages(&config_dir().join("rsync_flags"));
    if let Some(w) = warning {
        tracing::warn!("{w}");
        report.warnings.push(w);
    }
    if let Some(n) = note {
        tracing::debug!("{n}");
    }
    if args.hook_timeout == 0 {
        return Err(Error::Usage(
            "--hook-timeout must be at least 1 second".into(),
        ));
    }
    let _lock = lock(&target.lock_key(), &target.text)?;
    let opts = BackupOptions {
        sources,
        excludes,
        filter,
        verbose,
        one_file_system: args.one_file_system || flags.one_file_system,
        compress: args.compress,
        record: None,
        checksum: args.checksum || flags.checksum,
        deadline: None,
    };
    let mut hooks = crate::hooks::Runner::new(
        Duration::from_secs(args.hook_timeout),
        verbose,
        "byteback-backup: ",
    );
    // -q: nothing printed when all is well, hooks' notes included.
    hooks.echo = !args.quiet;
    let dir = config_dir();
    // Hooks run once per run, around all attempts. A failing pre-backup
    // hook fails the backup before anything is sent; the post-backup hooks
    // run whatever happened (they may undo what a pre-backup hook set up),
    // a stop by a signal included (see `stop`).
    let pre = hooks.stoppable();
    let _hooks_lock = hooks_lock(&dir)?;
    {
        let dir = dir.clone();
        crate::stop::set_post(move |code, snapshot| run_post_hooks(&hooks, &dir, code, snapshot));
    }
    let outcome = run_pre_hooks(&pre, &dir).and_then(|()| transfer(&target, &opts, &args, report));
    let failed = outcome.is_err();
    let mut usage = false;
    let (mut code, snapshot) = match outcome {
        Ok(done) => done,
        Err(e) => {
            tracing::error!("{e}");
            report.errors.push(format!("{e}"));
            // A configuration found wanting on the way (a key that cannot
            // be loaded, no byteback-server) exits 2, as for the flags; the
            // hooks are told 1, failed, as the README says they are.
            usage = e.is_usage();
            (1, None)
        }
    };
    // Stopped by a signal (see `stop`) before the backup was committed: the
    // post-backup hooks and the exit code say so. (A backup committed
    // before the stop took effect, with or without a snapshot, is done,
    // and says that.)
    let stopped = crate::stop::stopped().filter(|_| failed);
    if let Some(sig) = stopped {
        code = u8::try_from(128 + sig).unwrap_or(u8::MAX);
        let msg = crate::stop::message(sig);
        if !report.errors.iter().any(|e| e.contains(&msg)) {
            report.errors.push(msg);
        }
    }
    let Some(post_hooks) = crate::stop::take_post() else {
        // The stop's fallback runs them and ends the run.
        crate::stop::wait_for_the_end();
    };
    let post = post_hooks(code, snapshot);
    if post.is_empty() || stopped.is_some() {
        for f in &post {
            tracing::error!("post-backup hook failed: {f}");
            report.errors.push(format!("post-backup hook failed: {f}"));
        }
        return Ok(if usage && code == 1 { 2 } else { code });
    }
    for f in &post {
        tracing::error!("post-backup hook failed: {f}");
        report.errors.push(format!("post-backup hook failed: {f}"));
    }
    if code == 0 || code == EXIT_PARTIAL {
        tracing::error!(
            "the backup itself {} (exit {code} without the hook)",
            if code == 0 {
                "succeeded"
            } else {
                "was partial"
            }
        );
    }
    Ok(1)
}

/// `/etc/byteback/rsync_filter`, when present: its rules (checked after the
/// excludes, as 1.x passed `--filter='merge ...'` after its `--exclude`s).
/// A rule that is not supported is a usage error naming its file and line;
/// rules that do not change what is sent are named in warnings.
fn load_filter(
    flags: &crate::rsync_flags::RsyncFlags,
) -> Result<Option<std::sync::Arc<crate::filter::Filter>>> {
    let path = config_dir().join("rsync_filter");
    let mut filter = match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some(crate::filter::Filter::load(&path).map_err(|e| {
            Error::Usage(format!(
                "unsupported or unreadable filter rule, nothing was backed up: {e}"
            ))
        })?),
    };
    // rsync_flags' excludes came after `--filter merge rsync_filter` on
    // 1.x's rsync command line: the filter's rules match first.
    if !flags.excludes.is_empty() {
        let patterns: Vec<String> = flags.excludes.iter().map(|(_, p)| p.clone()).collect();
        filter
            .get_or_insert_with(Default::default)
            .append_excludes(&patterns, &config_dir().join("rsync_flags"))
            .map_err(|e| Error::Usage(format!("an exclude in rsync_flags: {e}")))?;
    }
    let Some(filter) = filter else {
        return Ok(None);
    };
    for n in &filter.notes {
        tracing::warn!("{n}");
    }
    Ok(Some(std::sync::Arc::new(filter)))
}

/// Runs the pre-backup hooks; an error names every one that failed.
/// Runs the post-backup hooks, told the exit code and the snapshot taken;
/// what failed.
fn run_post_hooks(
    hooks: &crate::hooks::Runner,
    dir: &Path,
    code: u8,
    snapshot: Option<String>,
) -> Vec<String> {
    let status = code.to_string();
    let env = [
        (crate::hooks::ENV_STATUS, status.as_str()),
        (
            crate::hooks::ENV_STATUS_TEXT,
            crate::hooks::status_text(code),
        ),
        (
            crate::hooks::ENV_SNAPSHOT,
            snapshot.as_deref().unwrap_or(""),
        ),
    ];
    match hooks.run_dir(dir, crate::hooks::POST_BACKUP_DIR, &env, &[]) {
        Ok(failures) => failures.iter().map(|f| f.to_string()).collect(),
        Err(e) => vec![format!("{e}")],
    }
}

fn run_pre_hooks(hooks: &crate::hooks::Runner, dir: &Path) -> Result<()> {
    use crate::hooks::{ENV_SNAPSHOT, ENV_STATUS, ENV_STATUS_TEXT, PRE_BACKUP_DIR};
    let failures = hooks.run_dir(
        dir,
        PRE_BACKUP_DIR,
        &[],
        &[ENV_STATUS, ENV_STATUS_TEXT, ENV_SNAPSHOT],
    )?;
    if failures.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = failures.iter().map(|f| f.to_string()).collect();
    Err(Error::msg(format!(
        "pre-backup hook failed, nothing was backed up: {}",
        list.join("\n")
    )))
}

/// The backup with its retries: the exit code (0 or 24) and the snapshot
/// taken, if any (a name the server sent that is not a valid snapshot name
/// counts as none).
///
/// Over 80 lines: the retry loop, with what each attempt logs and records
/// for `--json`, is kept in one place so the retry policy reads as a whole.
fn transfer(
    target: &Target,
    opts: &BackupOptions,
    args: &BackupArgs,
    report: &mut BackupJson,
) -> Result<(u8, Option<String>)> {
    let mut attempt = 0;
    // -q means nothing on a terminal either, unless --progress asks.
    let progress = term::progress_wanted(args.progress, args.no_progress || args.quiet);
    let mut record = None;
    let mut record_reset = false;
    let deadline = (args.max_time > 0).then(|| crate::backup::Deadline {
        at: std::time::Instant::now() + Duration::from_secs(args.max_time),
        secs: args.max_time,
    });
    let opts = &BackupOptions {
        deadline,
        ..opts.clone()
    };
    loop {
        report.attempts = attempt + 1;
        crate::walk::new_attempt();
        let result = {
            let _bar = progress.then(|| Bar::start(Kind::Backup));
            target.connect("backup").and_then(|conn| {
                // The name the server files us under (checked in its hello).
                report.host = Some(conn.host.clone());
                // The record is named after the destination and the name
                // this client asked for (none over SSH, where the key
                // decides), not the server's: a server sending another
                // name at every run left a record of every entry behind
                // each time, filling the cache. One that changes the name
                // gets a full announce (the record's generation is not its
                // manifest's). A record named the old way goes.
                let path = crate::backup::cache::cache_dir().map(|d| {
                    let old = crate::backup::cache::record_path(&d, &target.text, &conn.host);
                    let path = crate::backup::cache::record_path(&d, &target.text, &target.host);
                    if old != path {
                        let _ = std::fs::remove_file(old);
                    }
                    path
                });
                record.clone_from(&path);
                let opts = BackupOptions {
                    record: path,
                    ..opts.clone()
                };
                run_backup(conn, &opts)
            })
        };
        match result {
            Ok(r) => {
                // One summary line (nothing with --quiet); what the server
                // said is printed escaped.
                let s = &r.stats;
                // Escaped, for the summary line and the JSON report (whose
                // encoder would pass C1 controls and bidi overrides).
                let message = byteback_protocol::escape_text(r.message.trim());
                let head = match &r.snapshot {
                    Some(n) => format!("snapshot {} taken", byteback_protocol::escape_text(n)),
                    None => message.clone(),
                };
                let mut line = format!(
                    "{head}; {} entries, {} files sent ({} bytes new, {} reused, {} on the wire), {} deleted",
                    r.entries, s.files_transferred, s.literal_bytes, s.matched_bytes, r.wire_bytes, s.deleted
                );
                if s.cloned > 0 {
                    line.push_str(&format!(
                        ", {} moved or copied files cloned on the server (not sent)",
                        s.cloned
                    ));
                }
                if s.kept_unread > 0 {
                    line.push_str(&format!(
                        ", {} entries kept as the last backup has them (unreadable here, see the warnings)",
                        s.kept_unread
                    ));
                }
                if s.left_out > 0 {
                    line.push_str(&format!(
                        ", {} entries left out or kept at their last version by the server (see its warnings)",
                        s.left_out
                    ));
                }
                if r.unchanged > 0 {
                    line.push_str(&format!(
                        ", {} entries unchanged since the last backup (not announced one by one)",
                        r.unchanged
                    ));
                }
                if r.vanished > 0 {
                    line.push_str(&format!(
                        ", {} vanished during the backup (normal on a live system)",
                        r.vanished
                    ));
                }
                if matches!(target.dest, Destination::Ssh { .. }) {
                    let (sent, received) = crate::ssh::bytes_moved();
                    line.push_str(&format!(
                        "; {sent} bytes sent and {received} received over SSH (all attempts)"
                    ));
                    report.ssh_bytes_sent = Some(sent);
                    report.ssh_bytes_received = Some(received);
                }
                // The same figures as the line, for --json.
                report.entries = r.entries;
                report.entries_unchanged = r.unchanged;
                report.files_sent = s.files_transferred;
                report.files_cloned = s.cloned;
                report.bytes_new = s.literal_bytes;
                report.bytes_reused = s.matched_bytes;
                report.bytes_wire = r.wire_bytes;
                report.deleted = s.deleted;
                report.kept_unread = s.kept_unread;
                report.left_out = s.left_out;
                report.retried = s.retried;
                report.vanished = r.vanished;
                // What the server left out makes the backup partial too.
                let partial = r.partial.saturating_add(s.left_out);
                report.partial = partial;
                report.warnings.extend(r.warnings.iter().cloned());
                report.server_message = json_server_message(&r.message);
                // A snapshot refused for the minimum interval is no
                // trouble (a newer one than it allows is there, and
                // `current` holds this backup): with -q nothing is said, as
                // 1.x said nothing. A snapshot that failed fails the run.
                tracing::info!("{line}");
                let snapshot = r
                    .snapshot
                    .filter(|n| byteback_protocol::validate_snapshot_name(n).is_ok());
                report.snapshot.clone_from(&snapshot);
                // As 1.x: files vanishing are normal on a live system (counted
                // above, exit 0); files that could not be read or kept changing: 24.
                if r.partial > 0 {
                    tracing::error!("partial backup: {} files unreadable or changing", r.partial);
                }
                if s.left_out > 0 {
                    tracing::error!(
                        "partial backup: {} entries left out or kept at their last version by the server",
                        s.left_out
                    );
                }
                return Ok((exit_for(r.vanished, partial), snapshot));
            }
            // The record of the last backup did not match the server's
            // manifest: forgotten, and the backup runs again at once,
            // announcing every entry (this does not count as an attempt).
            Err(e)
                if !record_reset
                    && crate::stop::stopped().is_none()
                    && format!("{e:#}").contains(&format!(
                        "server: {}",
                        byteback_protocol::UNCHANGED_MISMATCH
                    )) =>
            {
                record_reset = true;
                if let Some(path) = &record {
                    let _ = std::fs::remove_file(path);
                }
                let w = format!("{e:#}; the record of the last backup was removed and the backup runs again, sending every entry");
                tracing::warn!("{w}");
                report.warnings.push(w);
            }
            Err(e)
                if attempt < args.retry_number
                    && is_transient(&e)
                    && crate::stop::stopped().is_none()
                    && deadline.is_none_or(|d| {
                        std::time::Instant::now() + Duration::from_secs(args.retry_delay) < d.at
                    }) =>
            {
                forget_record(record.as_deref());
                report.errors.push(format!("attempt {}: {e}", attempt + 1));
                attempt += 1;
                tracing::error!(
                    "attempt {attempt} failed: {e}; retrying in {} s ({} left)",
                    args.retry_delay,
                    args.retry_number - attempt + 1
                );
                // A stop (see `stop`) ends the wait, and the retries.
                let until = std::time::Instant::now() + Duration::from_secs(args.retry_delay);
                while std::time::Instant::now() < until && crate::stop::stopped().is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Some(sig) = crate::stop::stopped() {
                    return Err(Error::msg(crate::stop::message(sig)));
                }
            }
            Err(e) => {
                forget_record(record.as_deref());
                return Err(e);
            }
        }
    }
}

/// Removes the record of the last backup after a failed attempt: should
/// the record be what the server refused (an entry it vouches for that
/// the server counts otherwise), the next attempt announces every entry
/// instead of failing the same way for ever. (After a failure the server's
/// manifest is rarely the record's anyway: a transfer cut short leaves its
/// backup to resume, which offers no generation.)
fn forget_record(record: Option<&std::path::Path>) {
    if let Some(path) = record {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::debug!(
                "{}: record of the last backup removed after a failed attempt",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// An exclude rule for the cache directory `dir` (absolute, UTF-8; else
/// none: the record's file is then backed up like any other).
fn record_exclude(dir: &Path) -> Option<String> {
    let rel = dir.to_str()?.strip_prefix('/')?.trim_end_matches('/');
    (!rel.is_empty()).then(|| format!("/{}/", crate::filter::Filter::escape(rel)))
}

/// The watch of a listing's or restore's `--max-time` over `conn` (none
/// for 0): past it, the connection is torn down.
fn max_time(conn: &Connection, secs: u64) -> Option<crate::conn::Deadline> {
    (secs > 0).then(|| crate::conn::Deadline::start(Duration::from_secs(secs), conn.breaker()))
}

/// `e`, saying it came of `--max-time` (`secs`) when `limit` ran out.
fn out_of_time(e: Error, limit: &Option<crate::conn::Deadline>, secs: u64) -> Error {
    match limit {
        Some(l) if l.passed() => e.context(format!("it ran for more than {secs} s (--max-time)")),
        _ => e,
    }
}

/// A finished backup's exit code, as 1.x: vanished files are normal on a
/// live system (0); files unreadable or changing while read make it partial (24).
fn exit_for(_vanished: u64, partial: u64) -> u8 {
    if partial > 0 {
        EXIT_PARTIAL
    } else {
        0
    }
}

/// `--io-timeout`, else `/etc/byteback/io_timeout` (as 1.x), else 10800 s.
/// A 0 in the file is taken as 10800 s, with a warning (kept in `warnings`).
fn backup_io_timeout(flag: Option<u64>, warnings: &mut Vec<String>) -> Result<u64> {
    if let Some(t) = flag {
        return Ok(no_endless_timeout(t, "--io-timeout", 10_800, warnings));
    }
    let file = config_dir().join("io_timeout");
    match read_config_line("io_timeout")? {
        None if file.exists() => {
            let w = format!(
                "{}: no number of seconds in it; 10800 is used",
                file.display()
            );
            tracing::warn!("{w}");
            warnings.push(w);
            Ok(10_800)
        }
        None => Ok(10_800),
        Some(line) => match line.parse() {
            Ok(t) => Ok(no_endless_timeout(
                t,
                &file.display().to_string(),
                10_800,
                warnings,
            )),
            Err(_) => Err(Error::Usage(format!(
                "{}/io_timeout: {line:?} is not a number of seconds",
                config_dir().display()
            ))),
        },
    }
}

/// `t`, or `default` for a 0 (1.x's rsync: no timeout), with a warning
/// naming `what` (kept in `warnings`): a connection that died without a
/// word would hang the run, and hold its lock, for ever.
fn no_endless_timeout(t: u64, what: &str, default: u64, warnings: &mut Vec<String>) -> u64 {
    if t > 0 {
        return t;
    }
    let w = format!(
        "{what}: 0 (1.x's rsync: no timeout) is taken as {default} seconds: byteback always \
         gives up on a connection silent that long, so a dead one cannot hang it"
    );
    tracing::warn!("{w}");
    warnings.push(w);
    default
}

/// Standard output for a listing, noting whether its reader went away
/// (`byteback-restore --list | head`), which ends the listing quietly.
#[derive(Default)]
struct PipeOut {
    closed: bool,
}

impl std::io::Write for PipeOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = std::io::stdout().lock().write(buf);
        self.closed |= matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe);
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = std::io::stdout().lock().flush();
        self.closed |= matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe);
        r
    }
}

/// List or restore backed-up files.
#[derive(Debug, Parser)]
#[command(name = "byteback-restore", version)]
pub struct RestoreArgs {
    /// List matching files (the default).
    #[arg(short, long, conflicts_with = "restore")]
    list: bool,
    /// Restore matching files: each path's latest version, from the newest
    /// snapshot holding it, into ./<snapshot>/<path> (see --all, --target).
    #[arg(short, long)]
    restore: bool,
    /// Use only this snapshot, or the snapshots a glob matches (as
    /// '2026-11-*'; each path's latest version among them, or every
    /// version with --all). Default: all of them, and 'current' when it
    /// holds a backup no snapshot has (one within the minimum interval
    /// between snapshots).
    #[arg(short, long)]
    snapshot: Option<String>,
    /// Restore into DIR/<snapshot>/<path> instead of ./<snapshot>/<path>;
    /// DIR must exist. Relative patterns are still taken from the current directory.
    #[arg(long, value_name = "DIR")]
    target: Option<PathBuf>,
    /// Where the backups are (as for byteback-backup).
    #[arg(short, long)]
    destination: Option<String>,
    /// Host whose backups to read (local stores). Default: hostname -f.
    #[arg(long)]
    hostname: Option<String>,
    /// Seconds without progress before the connection counts as dead (a 0,
    /// 1.x's rsync's "no timeout", is taken as 300).
    #[arg(short, long, default_value_t = 300)]
    io_timeout: u64,
    /// Seconds the listing or restore may take in all (0, the default: no
    /// limit; at most ten years): past it, it stops, however the server
    /// trickles its data.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=10 * YEAR))]
    max_time: u64,
    /// SSH private key. Default: /etc/byteback/key.
    #[arg(short = 'k', long)]
    ssh_key: Option<PathBuf>,
    /// List or restore every distinct version, not only the latest (a
    /// restore puts each into the directory of the oldest snapshot holding it).
    #[arg(short, long)]
    all: bool,
    /// List every copy in every snapshot; name each restored entry (as ./<snapshot>/<path>).
    #[arg(short, long)]
    verbose: bool,
    /// Do not recreate device nodes (for restoring data one does not trust).
    #[arg(long)]
    no_devices: bool,
    /// Restore without setuid and setgid bits and file capabilities (for
    /// restoring data one does not trust).
    #[arg(long)]
    no_setuid: bool,
    /// Write runs of zeros as data, not as holes (as byteback 1.x's rsync
    /// did): a preallocated image or database file comes back allocated.
    /// Swap files always do, whatever this says.
    #[arg(long)]
    no_sparse: bool,
    /// With --restore: at the end, print one JSON object with the figures on
    /// stdout (see README, "JSON reports"); messages still go to stderr.
    #[arg(long)]
    json: bool,
    /// Show progress on stderr even when it is not a terminal.
    #[arg(long, conflicts_with = "no_progress")]
    progress: bool,
    /// Never show progress (by default a restore shows it when stderr is a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Glob patterns (relative ones are taken from the current directory).
    /// Without any, --list lists the snapshots and what wrote each
    /// (`byteback`, or `1.x` for byteback 1.x's rsync snapshots).
    /// File names are bytes: a byte of a pattern that is not UTF-8 matches
    /// as `?` does (any one byte), with a note.
    patterns: Vec<std::ffi::OsString>,
}

/// `byteback-restore --restore --json`: what the restore did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreJson {
    /// The process's exit code.
    pub exit_code: u8,
    /// `ok`, `partial` (warnings) or `failed`.
    pub status: &'static str,
    /// Snapshots restored from, oldest first.
    pub snapshots: Vec<String>,
    /// The directories they were restored into.
    pub directories: Vec<String>,
    /// Entries restored.
    pub entries: u64,
    /// Files that failed verification and were removed (the first 1,000).
    pub damaged: Vec<String>,
    /// How many files failed verification.
    pub damaged_total: u64,
    /// SSH bytes sent and received (SSH destinations only).
    pub ssh_bytes_sent: Option<u64>,
    /// See `ssh_bytes_sent`.
    pub ssh_bytes_received: Option<u64>,
    /// Wall time.
    pub duration_seconds: f64,
    /// Problems that did not stop the restore (the first 1,000).
    pub warnings: Vec<String>,
    /// How many warnings there were.
    pub warnings_total: u64,
    /// The error that stopped it, if one did.
    pub errors: Vec<String>,
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `byteback-restore`.
pub fn restore_main() -> ExitCode {
    let args = RestoreArgs::parse();
    // Before any thread starts (see the module).
    let watched = args.restore.then(crate::restore::interrupt::install);
    if let Err(code) = start_logging("byteback-restore", 0, false) {
        return code;
    }
    if let Some(Err(e)) = watched {
        tracing::warn!("cannot watch for SIGINT and SIGTERM ({e}): an interrupted restore leaves the existing directories it works in as the restoring user's, 0700");
    }
    let start = std::time::Instant::now();
    let json = args.json && args.restore;
    if json {
        // Interrupted, it says what it knows: how far it got, and why it stopped.
        crate::restore::interrupt::on_interrupt(move |code, msg| {
            let report = RestoreJson {
                exit_code: code,
                status: crate::hooks::status_text(code),
                entries: crate::progress::RESTORE
                    .files_done
                    .load(std::sync::atomic::Ordering::Relaxed),
                duration_seconds: start.elapsed().as_secs_f64(),
                errors: vec![msg.to_string()],
                ..RestoreJson::default()
            };
            print_json(&report);
        });
    }
    let mut report = RestoreJson::default();
    let code = match restore_cmd(args, &mut report) {
        Ok(code) => code,
        Err(e) => {
            // What was restored before the failure, as an interrupted
            // restore's report says too (the full figures come only with
            // a finished run).
            if report.entries == 0 {
                report.entries = crate::progress::RESTORE
                    .files_done
                    .load(std::sync::atomic::Ordering::Relaxed);
            }
            failed(&e, &mut report.errors)
        }
    };
    if json {
        report.exit_code = code;
        report.status = crate::hooks::status_text(code);
        report.duration_seconds = start.elapsed().as_secs_f64();
        print_json(&report);
    }
    ExitCode::from(code)
}

/// `byteback-restore` after parsing: checks the option combinations, then
/// lists or restores. Over 80 lines because each mode's checks and its
/// `--json` fields sit together; the work itself is in [`crate::restore`].
fn restore_cmd(args: RestoreArgs, report: &mut RestoreJson) -> Result<u8> {
    if args.json && !args.restore {
        return Err(Error::Usage(
            "--json goes with --restore (a listing is already data on stdout)".into(),
        ));
    }
    // Settings warnings go to stderr only (see below).
    let io_timeout = no_endless_timeout(args.io_timeout, "--io-timeout", 300, &mut vec![]);
    let target = Target::resolve(
        args.destination.as_deref(),
        args.hostname.as_deref(),
        args.ssh_key.as_deref(),
        io_timeout,
    )?;
    // Settings warnings go to stderr only: the report's warnings are the
    // restore's own, which make it partial.
    if let Some(w) = target.path_warning() {
        tracing::warn!("{w}");
    }
    // 1.x's restore passed rsync_flags to its rsync too. Lists named by
    // --exclude-from are not read here: a restore does not apply them.
    if let Ok(Some(text)) = std::fs::read(config_dir().join("rsync_flags"))
        .map(|b| Some(String::from_utf8_lossy(&b).into_owned()))
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(None),
            _ => Err(e),
        })
    {
        match crate::rsync_flags::parse(&text, &|_| Ok(vec![])) {
            Ok(flags) => {
                if let Some(w) = flags.restore_warning(&config_dir().join("rsync_flags")) {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => tracing::warn!("{e}; not applied to a restore either"),
        }
    }
    if let Some(s) = &args.snapshot {
        if restore::is_snapshot_glob(s) {
            restore::snapshot_glob(s)
                .map_err(|e| Error::Usage(format!("--snapshot {s:?}: {e}")))?;
        } else {
            byteback_protocol::validate_snapshot_name(s)
                .map_err(|e| Error::Usage(format!("--snapshot: {e}")))?;
        }
    }
    if args.patterns.is_empty() && !args.restore && args.target.is_none() {
        if args.snapshot.is_some() || args.all {
            return Err(Error::Usage(
                "give a pattern (e.g. / for everything) with --snapshot or --all".into(),
            ));
        }
        // A plain listing: the host's snapshots and what wrote each.
        let mut conn = target.connect("list")?;
        let limit = max_time(&conn, args.max_time);
        let mut out = PipeOut::default();
        let n = match restore::list_snapshots(&mut conn, &mut out) {
            Err(_) if out.closed => return Ok(0),
            r => r.map_err(|e| out_of_time(e, &limit, args.max_time))?,
        };
        conn.close()?;
        return Ok(if n == 0 { 1 } else { 0 });
    }
    let cwd = std::env::current_dir()?;
    let pats = Patterns::new(&restore::utf8_patterns(&args.patterns, &cwd)?, "")?;
    let (into, shown_into) = match &args.target {
        Some(_) if !args.restore => {
            return Err(Error::Usage("--target goes with --restore".into()))
        }
        Some(t) => {
            // Checked before connecting; never created (a typo must not make directories).
            match std::fs::metadata(t) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Usage(format!(
                        "--target {}: not a directory",
                        t.display()
                    )))
                }
                Err(e) => return Err(Error::Usage(format!("--target {}: {e}", t.display()))),
            }
            // `/` is shown as the empty prefix of `/<snapshot>/...`.
            let shown = t.display().to_string().trim_end_matches('/').to_string();
            (t.clone(), shown)
        }
        None => (cwd.clone(), ".".to_string()),
    };
    // Opened once, now: the directory each snapshot's tree is made in,
    // whatever is renamed on its path while the restore runs (`.` is the
    // working directory itself, not its path looked up again).
    let into_fd = if args.restore {
        let at: &Path = if args.target.is_some() {
            &into
        } else {
            Path::new(".")
        };
        let fd = rustix::fs::open(
            at,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::Usage(format!("{}: {e}", into.display())))?;
        Some(fd)
    } else {
        None
    };
    let mut conn = target.connect(if args.restore { "restore" } else { "list" })?;
    let limit = max_time(&conn, args.max_time);
    if args.restore {
        let opts = restore::RestoreOptions {
            all: args.all,
            verbose: args.verbose,
            no_devices: args.no_devices,
            no_setuid: args.no_setuid,
            no_sparse: args.no_sparse,
        };
        let Some(fd) = into_fd.as_ref() else {
            return Err(Error::Usage("the restore's target was not opened".into()));
        };
        let dest = restore::RestoreInto {
            fd: std::os::fd::AsFd::as_fd(fd),
            dir: &into,
            shown: &shown_into,
        };
        let r = {
            let _bar = term::progress_wanted(args.progress, args.no_progress)
                .then(|| Bar::start(Kind::Restore));
            restore::restore(&mut conn, &pats, args.snapshot.as_deref(), dest, opts)
                .map_err(|e| out_of_time(e, &limit, args.max_time))?
        };
        conn.close()?;
        // Warnings and damaged files were printed as they came.
        if r.unverified > 0 {
            tracing::warn!(
                "{} files came from byteback 1.x snapshots, which keep no checksums: \
                 their sizes were checked, their content could not be verified",
                r.unverified
            );
        }
        let dirs: Vec<String> = r
            .snapshots
            .iter()
            .map(|s| format!("{shown_into}/{}/", byteback_protocol::escape_text(s)))
            .collect();
        let mut line = format!("restored {} entries into {}", r.restored, join_and(&dirs));
        if matches!(target.dest, Destination::Ssh { .. }) {
            let (sent, received) = crate::ssh::bytes_moved();
            line.push_str(&format!(
                "; {sent} bytes sent and {received} received over SSH"
            ));
            report.ssh_bytes_sent = Some(sent);
            report.ssh_bytes_received = Some(received);
        }
        tracing::info!("{line}");
        report.entries = r.restored;
        report.snapshots.clone_from(&r.snapshots);
        report.directories = r
            .snapshots
            .iter()
            .map(|s| into.join(s).display().to_string())
            .collect();
        report.warnings = r.warnings;
        report.warnings_total = r.warnings_total;
        report.damaged = r.damaged;
        report.damaged_total = r.damaged_total;
        if r.warnings_total > restore::KEPT_MESSAGES as u64 {
            tracing::warn!(
                "{} warnings in all (the first {} are in --json)",
                r.warnings_total,
                restore::KEPT_MESSAGES
            );
        }
        if r.damaged_total > 0 {
            tracing::error!(
                "{} files failed verification and were not restored",
                r.damaged_total
            );
            return Ok(1);
        }
        Ok(if r.warnings_total == 0 {
            0
        } else {
            EXIT_PARTIAL
        })
    } else {
        let mut out = PipeOut::default();
        let (n, warnings) = match restore::list(
            &mut conn,
            &pats,
            args.snapshot.as_deref(),
            args.all,
            args.verbose,
            &mut out,
        ) {
            // The reader had enough (`| head`): not an error.
            Err(_) if out.closed => return Ok(0),
            r => r.map_err(|e| out_of_time(e, &limit, args.max_time))?,
        };
        conn.close()?;
        if n == 0 {
            tracing::error!("nothing matches");
            return Ok(1);
        }
        let unmatched = pats.unmatched();
        for p in &unmatched {
            tracing::warn!("pattern {p:?} matches nothing");
        }
        Ok(if unmatched.is_empty() && warnings == 0 {
            0
        } else {
            EXIT_PARTIAL
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn own(pats: &[&str]) -> Vec<(String, String)> {
        pats.iter()
            .map(|p| ("excludes".to_string(), p.to_string()))
            .collect()
    }

    /// 1.x gave `-x` and the excludes file to rsync, which reads `- `, `+ `
    /// and `!` at their start: `- ` excludes, `!` clears the list so far
    /// (defaults too), and `+ ` (an include) is an error naming it rather
    /// than a pattern matching a file named "+ ...".
    #[test]
    fn excludes_take_rsyncs_old_prefixes() {
        let defaults = vec!["/tmp/".to_string()];
        let r = exclude_rules(defaults.clone(), &own(&["- *.iso", "#*#", "a b"])).unwrap();
        assert_eq!(r, ["/tmp/", "*.iso", "#*#", "a b"]);
        let r = exclude_rules(defaults.clone(), &own(&["*.o", "!", "*.iso"])).unwrap();
        assert_eq!(r, ["*.iso"]);
        let e = exclude_rules(defaults, &own(&["+ keep.log", "*.log"])).unwrap_err();
        assert!(
            e.to_string().contains("\"+ keep.log\" is an include rule"),
            "{e}"
        );
        // `-x '#*#'` (Emacs' autosave files) is a pattern, not a comment.
        let x = crate::walk::Excludes::new(&["#*#"]).unwrap();
        assert!(x.is_excluded(b"home/a/#notes#", false));
    }

    /// `/etc/byteback/excludes` is read as rsync's `--exclude-from` read
    /// it: lines not trimmed (` lead` and `trail ` are names with spaces),
    /// `\r` ends a line, comments only at the start; each pattern knows
    /// its file and line, for the messages about it.
    #[test]
    fn the_excludes_file_is_read_as_rsync_read_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("excludes");
        std::fs::write(&f, "# c\n lead\ntrail \nwin\r\n\n  # not a comment\n[abc\n").unwrap();
        let got = read_exclude_file(&f).unwrap();
        let at = |n: usize| format!("{}:{n}", f.display());
        let want = [
            (at(2), " lead"),
            (at(3), "trail "),
            (at(4), "win"),
            (at(6), "  # not a comment"),
            (at(7), "[abc"),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(a, b)| (a.clone(), b.to_string()))
            .collect();
        assert_eq!(got, want);
        assert!(read_exclude_file(&d.path().join("none"))
            .unwrap()
            .is_empty());
        // A pattern matching nothing (as in rsync) is named with its origin.
        let w = excludes_matching_nothing(&got);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(&format!("{}: exclude \"[abc\"", at(7))),
            "{w:?}"
        );
        let w = excludes_matching_nothing(&[("--exclude \"/\"".into(), "/".into())]);
        assert!(w[0].starts_with("--exclude \"/\": exclude \"/\""), "{w:?}");
    }

    /// A source an exclude leaves out whole is named, as one a filter rule
    /// leaves out.
    #[test]
    fn a_source_left_out_by_an_exclude_is_named() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("tree");
        std::fs::create_dir(&src).unwrap();
        let x = crate::walk::Excludes::new(&["tree/"]).unwrap();
        let w = sources_left_out(std::slice::from_ref(&src), &[], &x, None);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("left out whole by an exclude"), "{w:?}");
        let none = crate::walk::Excludes::new::<&str>(&[]).unwrap();
        assert!(sources_left_out(&[src], &[], &none, None).is_empty());
    }

    /// known_hosts files others may write are not read.
    #[test]
    fn known_hosts_files_others_may_write_are_not_read() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("known_hosts");
        let me = rustix::process::geteuid().as_raw();
        // Missing: listed (it is read if it appears).
        assert_eq!(trusted_known_hosts(&f, me, "mine"), Some(f.clone()));
        std::fs::write(&f, "").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(trusted_known_hosts(&f, me, "mine"), Some(f.clone()));
        assert_eq!(
            trusted_known_hosts(&f, me + 1, "theirs"),
            None,
            "another owner's"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert_eq!(trusted_known_hosts(&f, me, "mine"), None, "group-writable");
    }

    /// The database directories the defaults leave out are named in a
    /// warning while no pre-backup hook dumps that database and no pattern
    /// of the user's excludes them.
    #[test]
    fn database_directories_left_out_without_a_dump_hook_are_named() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("var/lib/mysql")).unwrap();
        let hooks = root.join("pre-backup.d");
        std::fs::create_dir_all(&hooks).unwrap();
        let defaults: Vec<String> = DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect();
        let all = crate::walk::Excludes::new(&defaults).unwrap();
        // PostgreSQL's clusters are left out, not the rest of the postgres
        // account's home (1.x backed all of it up).
        assert!(all.is_excluded(b"var/lib/postgresql/15", true));
        assert!(all.is_excluded(b"var/lib/postgresql/9.6", true));
        assert!(all.is_excluded(b"var/lib/postgresql/9", true));
        assert!(!all.is_excluded(b"var/lib/postgresql/2024-05-01", true));
        assert!(!all.is_excluded(b"var/lib/postgresql", true));
        assert!(!all.is_excluded(b"var/lib/postgresql/backups", true));
        assert!(!all.is_excluded(b"var/lib/postgresql/.pgpass", false));
        let none = crate::walk::Excludes::new::<&str>(&[]).unwrap();
        let slash = [PathBuf::from("/")];
        let dumps = Path::new("/var/backups/byteback");
        let left_out = |sources: &[PathBuf], excludes, own| {
            let walked = Walked {
                sources,
                excludes,
                filter: None,
                one_file_system: false,
            };
            databases_left_out(root, &walked, own, &hooks, dumps)
        };
        let w = left_out(&slash, &all, &none);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("/var/lib/mysql/ is left out"), "{w:?}");
        // Not beneath a source.
        let home = [PathBuf::from("/home")];
        assert!(left_out(&home, &all, &none).is_empty());
        // The user's own exclude says it is meant.
        let mine = crate::walk::Excludes::new(&["/var/lib/mysql/"]).unwrap();
        assert!(left_out(&slash, &all, &mine).is_empty());
        // Not excluded at all (the defaults replaced by -x).
        assert!(left_out(&slash, &none, &none).is_empty());
        // Hooks that do not run, or do not name the database, change nothing.
        let hook = |name: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let p = hooks.join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        hook("50-mysql.disabled", 0o755);
        hook("10-upgrade", 0o755);
        hook("20-pgbouncer", 0o755);
        hook("60-mysql", 0o644);
        assert_eq!(left_out(&slash, &all, &none).len(), 1);
        // The postgres account's home without clusters: nothing left out.
        std::fs::create_dir_all(root.join("var/lib/postgresql/backups")).unwrap();
        assert_eq!(left_out(&slash, &all, &none).len(), 1);
        std::fs::create_dir_all(root.join("var/lib/postgresql/15/main")).unwrap();
        assert_eq!(
            left_out(&slash, &all, &none).len(),
            2,
            "10-upgrade is no pg dump"
        );
        // The user's own exclude of the whole home says it is meant.
        let mine =
            crate::walk::Excludes::new(&["/var/lib/mysql/", "/var/lib/postgresql/"]).unwrap();
        assert!(left_out(&slash, &all, &mine).is_empty());
        // Dump hooks are there.
        hook("50-mysql", 0o755);
        hook("50-pgdump", 0o755);
        assert!(left_out(&slash, &all, &none).is_empty());
        // ... but the backup leaves out where they write.
        let mut more = defaults.clone();
        more.push("/var/backups/".into());
        let more = crate::walk::Excludes::new(&more).unwrap();
        let w = left_out(&slash, &more, &none);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("which this backup leaves out too (an exclude leaves out /var/backups)"),
            "{w:?}"
        );
        // ... or the dumps themselves (rotated logs left out as *.gz).
        let mut gz = defaults.clone();
        gz.push("*.gz".into());
        let gz = crate::walk::Excludes::new(&gz).unwrap();
        let w = left_out(&slash, &gz, &none);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains(
                "/var/backups/byteback/mysql.sql.gz, which this backup leaves out too \
                 (an exclude leaves out /var/backups/byteback/mysql.sql.gz)"
            ),
            "{w:?}"
        );
        assert!(w[1].contains("postgresql.sql.gz"), "{w:?}");
        // ... or a rule of rsync_filter does.
        let filter =
            crate::filter::Filter::parse(b"- /var/backups/byteback/\n", Path::new("rsync_filter"))
                .unwrap();
        let walked = Walked {
            sources: &slash,
            excludes: &all,
            filter: Some(&filter),
            one_file_system: false,
        };
        let w = databases_left_out(root, &walked, &none, &hooks, dumps);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("(a filter rule leaves out /var/backups/byteback)"),
            "{w:?}"
        );
        // ... or it is beneath no source (here /var/lib only).
        let lib = [PathBuf::from("/var/lib")];
        let w = left_out(&lib, &all, &none);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("(it is beneath no source)"), "{w:?}");
    }

    #[test]
    fn the_servers_message_goes_into_json_escaped_line_by_line() {
        assert_eq!(json_server_message(" \n "), None);
        assert_eq!(
            json_server_message("no snapshot\nleft out: a\u{9b}2J\u{202e}b\n").as_deref(),
            Some("no snapshot\nleft out: a\\x9b2J\\u{202e}b")
        );
    }

    fn target(dest: &str, host: &str) -> Target {
        Target::resolve(Some(dest), Some(host), None, 10).unwrap()
    }

    /// 1.x's `user@host:/path`: the path is not used, and a warning says
    /// so and how to write the destination instead.
    #[test]
    fn the_path_of_a_1x_destination_is_warned_about() {
        let w = target("byteback@server:/byteback/", "h")
            .path_warning()
            .unwrap();
        assert!(
            w.contains("\"/byteback/\"") && w.contains("as \"byteback@server:\""),
            "{w}"
        );
        assert_eq!(target("byteback@server:", "h").path_warning(), None);
        assert_eq!(target("/srv/store", "h").path_warning(), None);
    }

    /// The client lock lives in a directory of `/var/lock`, which every
    /// user can write: a directory of another user, a symlink or a FIFO
    /// planted at the lock's name are refused (never followed, never
    /// blocked on); the directory is made private, the lock 0600.
    #[test]
    fn the_lock_refuses_what_other_users_could_plant() {
        use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
        if !crate::meta::is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs root in CI"
            );
            eprintln!("SKIPPED: the_lock_refuses_what_other_users_could_plant needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("byteback");
        // Fresh: a private directory and a 0600 lock.
        let f = open_lock(&dir, "l").unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
        drop(f);
        // An older, world-readable directory of ours is made private again.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        open_lock(&dir, "l").unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // A symlink to a file elsewhere: refused, the file left alone.
        let victim = d.path().join("victim");
        symlink(&victim, dir.join("s")).unwrap();
        assert!(open_lock(&dir, "s").is_err());
        assert!(!victim.exists());
        // A FIFO: refused without blocking.
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            dir.join("p"),
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let e = open_lock(&dir, "p").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Another user's directory: refused, naming it.
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let e = open_lock(&theirs, "l").unwrap_err().to_string();
        assert!(e.contains("belongs to uid 65534"), "{e}");
        assert!(!theirs.join("l").exists());
    }

    #[test]
    fn vanished_files_do_not_make_a_backup_partial() {
        assert_eq!(exit_for(0, 0), 0);
        assert_eq!(exit_for(12, 0), 0);
        assert_eq!(exit_for(0, 1), EXIT_PARTIAL);
        assert_eq!(exit_for(3, 2), EXIT_PARTIAL);
    }

    #[test]
    fn only_transient_errors_are_retried() {
        assert!(is_transient(&Error::Closed));
        assert!(!is_transient(&Error::Usage("--x".into())));
        let e = Error::Permanent("HOST KEY CHANGED".into()).context("SSH to x");
        assert!(!is_transient(&e));
    }

    #[test]
    fn the_client_lock_follows_the_store_and_host_not_the_spelling() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let plain = store.display().to_string();
        let odd = format!("{}/./../store/", store.display());
        assert_eq!(target(&plain, "a").lock_key(), target(&odd, "a").lock_key());
        assert_ne!(
            target(&plain, "a").lock_key(),
            target(&plain, "b").lock_key()
        );
        assert_eq!(
            target("bb@Backup.Example:", "x").lock_key(),
            target("ssh://bb@backup.example:22/", "x").lock_key()
        );
        let held = lock(&target(&plain, "a").lock_key(), &plain).unwrap();
        let err = lock(&target(&odd, "a").lock_key(), &odd).unwrap_err();
        assert!(err.to_string().contains("is running"), "{err}");
        let other = lock(&target(&plain, "b").lock_key(), &plain).unwrap();
        drop((held, other));
        lock(&target(&odd, "a").lock_key(), &odd).unwrap();
    }
}

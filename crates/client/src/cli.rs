//! Command lines of `byteback-backup` and `byteback-restore`: parse, resolve
//! settings once (flag > /etc/byteback file > default), call the library, map
//! the outcome to an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use crate::backup::{run_backup, BackupOptions};
use crate::conn::{Connection, Destination};
use crate::restore::{self, Patterns};
use crate::walk::DEFAULT_EXCLUDES;

/// Exit code when some files vanished or could not be read (as rsync's 24).
pub const EXIT_PARTIAL: u8 = 24;
/// Exit code for bad usage.
pub const EXIT_USAGE: u8 = 2;

const CONFIG_DIR: &str = "/etc/byteback";

/// Back up this machine to a byteback server or a local store.
#[derive(Debug, Parser)]
#[command(name = "byteback-backup", version)]
pub struct BackupArgs {
    /// Where to back up: user@host: (SSH) or a local store directory. Default: /etc/byteback/destination.
    #[arg(short, long)]
    destination: Option<String>,
    /// What to back up (several allowed). Default: /.
    #[arg(short, long)]
    source: Vec<PathBuf>,
    /// Leave out paths matching this pattern (several allowed; /-anchored or by name; trailing / for directories).
    #[arg(short = 'x', long)]
    exclude: Vec<String>,
    /// Name this machine is filed under (local stores; over SSH the server's key decides). Default: hostname -f.
    #[arg(long)]
    hostname: Option<String>,
    /// How many times to retry a failed backup.
    #[arg(short, long, default_value_t = 5)]
    retry_number: u32,
    /// Seconds to wait between retries.
    #[arg(short = 'e', long, default_value_t = 600)]
    retry_delay: u64,
    /// Seconds without progress before the connection counts as dead.
    #[arg(short, long)]
    io_timeout: Option<u64>,
    /// SSH private key.
    #[arg(short = 'k', long, default_value = "/etc/byteback/key")]
    ssh_key: PathBuf,
    /// Print every file sent.
    #[arg(short, long)]
    verbose: bool,
}

fn read_config_line(name: &str) -> Option<String> {
    let s = std::fs::read_to_string(Path::new(CONFIG_DIR).join(name)).ok()?;
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
}

fn read_config_lines(name: &str) -> Vec<String> {
    std::fs::read_to_string(Path::new(CONFIG_DIR).join(name))
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// This machine's fully qualified name (as `hostname -f`), or its node name.
pub fn default_hostname() -> Result<String> {
    let out = std::process::Command::new("hostname").arg("-f").output();
    let name = match out {
        Ok(o) if o.status.success() && !o.stdout.trim_ascii().is_empty() => {
            String::from_utf8_lossy(o.stdout.trim_ascii()).into_owned()
        }
        _ => rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
    };
    byteback_protocol::validate_host_name(&name).map_err(|_| {
        anyhow!("this machine's name {name:?} cannot be a host name; give --hostname")
    })?;
    Ok(name)
}

fn connect(dest: &Destination, host: &str) -> Result<Connection> {
    match dest {
        Destination::Local(store) => Connection::open_local(store, host),
        Destination::Ssh { host: server, .. } => {
            bail!("SSH destinations ({server}) are not supported by this build yet; use a local store path")
        }
    }
}

/// Takes the client lock for a destination; an flock, so a killed run never leaves it held.
fn lock(dest: &str) -> Result<std::fs::File> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dest.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let dir = if crate::meta::is_root() {
        PathBuf::from("/var/lock/byteback")
    } else {
        std::env::temp_dir().join(format!("byteback-{}", rustix::process::getuid().as_raw()))
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("backup-{h:016x}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(_) => bail!(
            "another byteback-backup to {dest} is running ({})",
            path.display()
        ),
    }
}

/// `byteback-backup`.
pub fn backup_main() -> ExitCode {
    let args = BackupArgs::parse();
    match backup(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("byteback-backup: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn backup(args: BackupArgs) -> Result<u8> {
    let dest_s = args
        .destination
        .clone()
        .or_else(|| read_config_line("destination"))
        .ok_or_else(|| anyhow!("no --destination and no {CONFIG_DIR}/destination"))?;
    let dest = Destination::parse(&dest_s)?;
    let host = match &args.hostname {
        Some(h) => {
            byteback_protocol::validate_host_name(h).map_err(|e| anyhow!("--hostname: {e}"))?;
            h.clone()
        }
        None => default_hostname()?,
    };
    let sources = if args.source.is_empty() {
        vec![PathBuf::from("/")]
    } else {
        args.source.clone()
    };
    crate::walk::normalise_sources(&sources)?;
    let mut excludes: Vec<String> = DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect();
    excludes.extend(read_config_lines("excludes"));
    excludes.extend(args.exclude.iter().cloned());
    crate::walk::Excludes::new(&excludes)?;
    if Path::new(CONFIG_DIR).join("rsync_flags").exists() {
        eprintln!("byteback-backup: warning: ignoring {CONFIG_DIR}/rsync_flags (byteback 2 does not run rsync)");
    }
    let _lock = lock(&dest_s)?;
    let opts = BackupOptions {
        sources,
        excludes,
        verbose: args.verbose,
    };
    let mut attempt = 0;
    loop {
        let result = connect(&dest, &host).and_then(|conn| run_backup(conn, &opts));
        match result {
            Ok(r) => {
                let s = &r.stats;
                eprintln!(
                    "byteback-backup: {} entries, {} files sent ({} bytes new, {} reused, {} on the wire), {} deleted",
                    r.entries, s.files_transferred, s.literal_bytes, s.matched_bytes, r.wire_bytes, s.deleted
                );
                match &r.snapshot {
                    Some(n) => eprintln!("byteback-backup: snapshot {n} taken"),
                    None => eprintln!("byteback-backup: {}", r.message.trim()),
                }
                if r.vanished > 0 || r.partial > 0 {
                    eprintln!(
                        "byteback-backup: partial backup: {} vanished, {} unreadable or changing",
                        r.vanished, r.partial
                    );
                    return Ok(EXIT_PARTIAL);
                }
                return Ok(0);
            }
            Err(e) if attempt < args.retry_number => {
                attempt += 1;
                eprintln!(
                    "byteback-backup: attempt {attempt} failed: {e:#}; retrying in {} s ({} left)",
                    args.retry_delay,
                    args.retry_number - attempt + 1
                );
                std::thread::sleep(Duration::from_secs(args.retry_delay));
            }
            Err(e) => return Err(e),
        }
    }
}

/// List or restore backed-up files.
#[derive(Debug, Parser)]
#[command(name = "byteback-restore", version)]
pub struct RestoreArgs {
    /// List matching files (the default).
    #[arg(long, conflicts_with = "restore")]
    list: bool,
    /// Restore matching files into ./<snapshot>/<path>.
    #[arg(long)]
    restore: bool,
    /// Use only this snapshot (default: all for --list, the newest for --restore).
    #[arg(long)]
    snapshot: Option<String>,
    /// Where the backups are (as for byteback-backup).
    #[arg(short, long)]
    destination: Option<String>,
    /// Host whose backups to read (local stores). Default: hostname -f.
    #[arg(long)]
    hostname: Option<String>,
    /// Seconds without progress before the connection counts as dead.
    #[arg(short, long, default_value_t = 300)]
    io_timeout: u64,
    /// SSH private key.
    #[arg(short = 'k', long, default_value = "/etc/byteback/key")]
    ssh_key: PathBuf,
    /// List every distinct version, not only the latest.
    #[arg(long)]
    all: bool,
    /// List every copy in every snapshot; name each restored file.
    #[arg(short, long)]
    verbose: bool,
    /// Glob patterns (relative ones are taken from the current directory).
    patterns: Vec<String>,
}

/// `byteback-restore`.
pub fn restore_main() -> ExitCode {
    let args = RestoreArgs::parse();
    match restore_cmd(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("byteback-restore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn restore_cmd(args: RestoreArgs) -> Result<u8> {
    let dest_s = args
        .destination
        .clone()
        .or_else(|| read_config_line("destination"))
        .ok_or_else(|| anyhow!("no --destination and no {CONFIG_DIR}/destination"))?;
    let dest = Destination::parse(&dest_s)?;
    let host = match &args.hostname {
        Some(h) => h.clone(),
        None => default_hostname()?,
    };
    if let Some(s) = &args.snapshot {
        byteback_protocol::validate_snapshot_name(s).map_err(|e| anyhow!("--snapshot: {e}"))?;
    }
    let cwd = std::env::current_dir()?;
    let pats = Patterns::new(&args.patterns, &cwd)?;
    let mut conn = connect(&dest, &host)?;
    if args.restore {
        let r = restore::restore(
            &mut conn,
            &pats,
            args.snapshot.as_deref(),
            &cwd,
            args.verbose,
        )?;
        conn.close()?;
        for w in &r.warnings {
            eprintln!("byteback-restore: warning: {w}");
        }
        eprintln!(
            "byteback-restore: restored {} entries into ./{}/",
            r.restored, r.snapshot
        );
        Ok(if r.warnings.is_empty() {
            0
        } else {
            EXIT_PARTIAL
        })
    } else {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let n = restore::list(
            &mut conn,
            &pats,
            args.snapshot.as_deref(),
            args.all,
            args.verbose,
            &mut out,
        )?;
        conn.close()?;
        if n == 0 {
            eprintln!("byteback-restore: nothing matches");
            return Ok(1);
        }
        Ok(0)
    }
}

//! Command line of `byteback-server`: arguments in, a library call, an exit code out.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::enrol;
use crate::error::{Error, IoContext, Result};
use crate::serve::{serve, Access, ServeConfig};

/// byteback's server: launched by sshd for a client's key, or by the client for a local store.
#[derive(Debug, Parser)]
#[command(name = "byteback-server", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Speak the byteback protocol on stdin/stdout for one host.
    Serve {
        /// Host name to file this session under (one component of [A-Za-z0-9._-]).
        #[arg(long)]
        host: String,
        /// Store root (default: the home directory of the server user).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Allow only listing and restoring.
        #[arg(long)]
        read_only: bool,
        /// Send restored file data uncompressed (as zstd frames of stored
        /// blocks). A client restoring from a local store starts its server
        /// with it: compressing would cost CPU on both sides and save nothing.
        #[arg(long)]
        no_compress: bool,
        /// Server clock override (RFC 3339), for tests and simulations only:
        /// sshd's forced command never passes it, so a client cannot set it.
        #[arg(long, value_parser = crate::admin::parse_now)]
        now: Option<(i64, i64)>,
    },
    /// Let a client's key back up as one host (run by byteback-setup-client).
    Enrol {
        /// The client's host name.
        #[arg(long)]
        host: String,
        /// The client's public key, "TYPE BASE64".
        #[arg(long)]
        key: String,
        /// Address the key may log in from (default: the client of this SSH login).
        #[arg(long)]
        from: Option<String>,
        /// Store root (default: the home directory of the server user; run as root,
        /// the byteback account's home, or over SSH the login's).
        #[arg(long)]
        store: Option<PathBuf>,
        /// authorized_keys file (default: ~/.ssh/authorized_keys of the store's account).
        #[arg(long)]
        authorized_keys: Option<PathBuf>,
        /// A key this host used before, "TYPE BASE64": its lines for this host
        /// (byteback's or 1.x's forced command) are removed (byteback-setup-client --rotate-key).
        #[arg(long)]
        retire_key: Option<String>,
        /// Enrol the key even if the host already has another, which then
        /// stays (two keys of one machine; never two machines of one name).
        #[arg(long)]
        add_key: bool,
        /// The key may only list and restore this host's backups (`serve
        /// --read-only`): for restoring them on another machine. Never a
        /// second machine backing up into the tree, so no --add-key needed.
        #[arg(long)]
        read_only: bool,
    },
    /// Rewrite byteback 1.x's authorized_keys lines (command="byteback-receive",
    /// environment="BYTEBACK_HOST=NAME") into byteback forced commands, keeping
    /// from= restrictions; a copy of the original is kept as FILE.byteback-1x.
    MigrateKeys {
        /// authorized_keys file (default: ~/.ssh/authorized_keys of the store's account).
        #[arg(long)]
        authorized_keys: Option<PathBuf>,
        /// Store root (default: the home directory of the server user, as 1.x's /byteback;
        /// run as root, the byteback account's home).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete the least important snapshots while the store is short of space (as byteback-prune).
    Prune(crate::admin::PruneArgs),
    /// Per host: newest snapshot, its age, snapshot count and size; Nagios exit codes.
    Status(crate::admin::StatusArgs),
    /// Re-hash stored files against their manifests and report damage.
    Verify(crate::verify::VerifyArgs),
    /// Write a static HTML page about the store: retention, ages, data written, free space.
    Report(crate::report::ReportArgs),
}

/// Installs the log subscriber for `prog` at `BYTEBACK_LOG`'s level (info
/// by default); a `BYTEBACK_LOG` that is not a level is a usage error.
pub fn start_logging(prog: &'static str) -> Result<(), ExitCode> {
    use byteback_protocol::term;
    match term::log_level(0, false) {
        Ok(level) => {
            term::init_logging(prog, level, term::stderr_is_journal());
            Ok(())
        }
        Err(e) => {
            eprintln!("{prog}: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn default_store() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// Parses arguments and runs; the process's `main`.
/// Long (~100 lines) because it is one match over the subcommands, each
/// arm a few lines of its own.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(code) = start_logging("byteback-server") {
        return code;
    }
    // Every command may remove or walk a deep tree a client sent.
    raise_fd_limit();
    match cli.command {
        Command::Serve {
            host,
            store,
            read_only,
            no_compress,
            now,
        } => {
            if let Err(e) = byteback_protocol::validate_host_name(&host) {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
            // Under sshd's forced command the client's requested command is
            // only a verb that can narrow access; it is never executed.
            let original = std::env::var("SSH_ORIGINAL_COMMAND").ok();
            let verb_access = match enrol::access_for_original_command(original.as_deref()) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            };
            let Some(store) = store.or_else(default_store) else {
                tracing::error!("no --store given and no home directory");
                return ExitCode::from(2);
            };
            raise_fd_limit();
            let cfg = ServeConfig {
                store,
                host,
                access: if read_only {
                    Access::ReadOnly
                } else {
                    verb_access
                },
                now: now.map(|(t, _)| t),
                compress: !no_compress,
                clock: Default::default(),
            };
            // A store whose settings cannot be read still gets its session
            // (which reports that error to the client) with the default wait.
            let io_timeout = crate::config::StoreConfig::load(&cfg.store)
                .unwrap_or_default()
                .io_timeout;
            let wait = std::time::Duration::from_secs(io_timeout.unsigned_abs());
            widen_pipes();
            let streams = crate::timed::dup_stdio(std::io::stdin())
                .and_then(|i| Ok((i, crate::timed::dup_stdio(std::io::stdout())?)));
            let (stdin, stdout) = match streams {
                Ok((i, o)) => (
                    crate::timed::Timed::new(i, wait, cfg.clock.clone()),
                    crate::timed::Timed::new(o, wait, cfg.clock.clone()),
                ),
                Err(e) => {
                    eprintln!("byteback-server: cannot use standard input and output: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // A client that stops reading our stderr must not hold us
            // (or the locks we hold) in a write to it (see `relay`).
            let relay = match crate::relay::install() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(
                        "cannot relay stderr ({e}): writes to it may wait for the client"
                    );
                    None
                }
            };
            // What this process prints goes to this host's client.
            crate::pruner::set_viewer(&cfg.host);
            let code = match serve(&cfg, stdin, stdout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            };
            if let Some(r) = relay {
                r.finish(std::time::Duration::from_secs(5));
            }
            code
        }
        Command::Enrol {
            host,
            key,
            from,
            store,
            authorized_keys,
            retire_key,
            add_key,
            read_only,
        } => match run_enrol(
            host,
            &key,
            from,
            store,
            authorized_keys,
            retire_key,
            (add_key, read_only),
        ) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("enrol: {e}");
                ExitCode::FAILURE
            }
        },
        Command::MigrateKeys {
            authorized_keys,
            store,
            dry_run,
        } => match run_migrate(authorized_keys, store, dry_run) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("byteback-server: migrate-keys: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Prune(args) => crate::admin::run_prune(args),
        Command::Status(args) => crate::admin::run_status(args),
        Command::Verify(args) => crate::verify::run_verify(args),
        Command::Report(args) => crate::report::run_report(args),
    }
}

/// This program's path (for the forced command of a key).
fn this_program() -> Result<PathBuf> {
    std::env::current_exe().op("find the path of", || "this program")
}

fn run_enrol(
    host: String,
    key: &str,
    from: Option<String>,
    store: Option<PathBuf>,
    authorized_keys: Option<PathBuf>,
    retire_key: Option<String>,
    (add_key, read_only): (bool, bool),
) -> Result<String> {
    let key = enrol::parse_public_key(key)?;
    let retire = retire_key
        .map(|k| enrol::parse_public_key(&k).map_err(|e| e.context("--retire-key")))
        .transpose()?;
    let from = match from {
        Some(f) => f
            .parse()
            .map_err(|_| Error::Usage(format!("--from {f:?} is not an IP address")))?,
        None => enrol::client_address(
            &std::env::var("SSH_CONNECTION")
                .map_err(|_| Error::Usage("not run over SSH; give --from ADDRESS".into()))?,
        )?,
    };
    let store_explicit = store.is_some();
    // As prune, status and verify take it: run as root, the byteback
    // account's home (never root's `$HOME`, the invoking admin's under
    // `sudo -E`); but a set-up that logged in as root (`root@server:`)
    // enrols for the store its `serve` will use, the login's home.
    let over_ssh_as_root =
        rustix::process::geteuid().is_root() && std::env::var_os("SSH_CONNECTION").is_some();
    let store = match store {
        None if over_ssh_as_root => default_store()
            .ok_or_else(|| Error::Usage("no --store given and no home directory".into()))?,
        store => crate::admin::store_root(store)?,
    };
    let authorized_keys = enrol::as_keys_owner(&store, authorized_keys)?;
    let server_exe = this_program()?;
    let cfg = enrol::EnrolConfig {
        store,
        store_explicit,
        host,
        key,
        from,
        authorized_keys,
        server_exe,
        retire,
        add_key,
        read_only,
    };
    let (enrolled, retired) = enrol::enrol_and_retire(&cfg)?;
    if cfg.retire.is_some() {
        eprintln!(
            "byteback-server: enrol: {retired} line(s) of the retired key removed for {}",
            cfg.host
        );
    }
    Ok(match enrolled {
        enrol::Enrolled::Added => format!(
            "enrolled {} (key may log in from {}; store {})",
            cfg.host,
            cfg.from,
            cfg.store.display()
        ),
        enrol::Enrolled::Unchanged => format!("{} was already enrolled with this key", cfg.host),
        enrol::Enrolled::Moved(old) => format!(
            "{} was enrolled with this key from {old}; it may now log in from {} instead",
            cfg.host, cfg.from
        ),
    })
}

/// `migrate-keys`: 0 when every 1.x line was migrated (or there was none), 1
/// when some were left unchanged (each named in a warning).
fn run_migrate(
    authorized_keys: Option<PathBuf>,
    store: Option<PathBuf>,
    dry_run: bool,
) -> Result<u8> {
    let store_arg = store.clone();
    let store = crate::admin::store_root(store)?;
    let authorized_keys = enrol::as_keys_owner(&store, authorized_keys)?;
    let cfg = crate::migrate::MigrateConfig {
        server_exe: this_program()?,
        store_arg,
    };
    let r = crate::migrate::migrate_keys(&authorized_keys, &store, &cfg, dry_run)?;
    let shown = authorized_keys.display();
    for (n, old, new) in &r.migrated {
        if dry_run {
            println!("{shown}:{n}: would become:\n  - {old}\n  + {new}");
        } else {
            println!("{shown}:{n}: migrated: {new}");
        }
    }
    for (n, why) in &r.refused {
        eprintln!(
            "byteback-server: warning: {shown}:{n}: a byteback 1.x line left unchanged: {why}"
        );
    }
    match (&r.backup, r.migrated.len()) {
        (_, 0) => eprintln!("byteback-server: migrate-keys: no 1.x line to migrate in {shown}"),
        (Some(b), n) => eprintln!(
            "byteback-server: migrate-keys: {n} lines migrated; the original is kept as {}",
            b.display()
        ),
        (None, n) => {
            eprintln!("byteback-server: migrate-keys: {n} lines would be migrated (dry run)")
        }
    }
    Ok(if r.refused.is_empty() { 0 } else { 1 })
}

/// Deep trees hold one directory fd per level; lift the soft limit to the
/// hard one (a snapshot holding a client's tree 1,100 levels deep could
/// not be deleted by a prune with the usual 1,024).
pub fn raise_fd_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// Makes the pipes sshd hands a session (or the local client spawned the
/// server with) hold 1 MiB instead of 64 KiB, where the system allows
/// (`/proc/sys/fs/pipe-max-size`; 256 KiB is tried next). With 64 KiB sshd
/// wrote a data segment into the server's standard input 64 KiB at a time
/// and moved the rest of its 2 MiB channel buffer down after each write:
/// in a profile of W5 over SSH, sshd had 13 % of all samples (6 % after) while the
/// appended data went through. Standard input or output that is not a pipe
/// is left as it is (the call fails harmlessly).
fn widen_pipes() {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        for size in [1 << 20, 256 << 10] {
            // SAFETY: F_SETPIPE_SZ on our own standard descriptors takes an
            // int and changes nothing but the pipe's capacity.
            if unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size) } >= 0 {
                break;
            }
        }
    }
}

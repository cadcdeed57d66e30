//! Command line of `byteback-server`: arguments in, a library call, an exit code out.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::serve::{serve, Access, ServeConfig};

/// byteback's server: launched by sshd for a client's key, or by the client over pipes.
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
        /// Server clock override (RFC 3339), for tests and simulations only:
        /// sshd's forced command never passes it, so a client cannot set it.
        #[arg(long, value_parser = crate::admin::parse_now)]
        now: Option<(i64, i64)>,
    },
    /// Delete the least important snapshots while the store is short of space (as byteback-prune).
    Prune(crate::admin::PruneArgs),
    /// Per host: newest snapshot, its age, snapshot count and size; Nagios exit codes.
    Status(crate::admin::StatusArgs),
}

fn default_store() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// Parses arguments and runs; the process's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            host,
            store,
            read_only,
            now,
        } => {
            if let Err(e) = byteback_protocol::validate_host_name(&host) {
                eprintln!("byteback-server: {e}");
                return ExitCode::from(2);
            }
            let Some(store) = store.or_else(default_store) else {
                eprintln!("byteback-server: no --store given and no home directory");
                return ExitCode::from(2);
            };
            raise_fd_limit();
            let cfg = ServeConfig {
                store,
                host,
                access: if read_only {
                    Access::ReadOnly
                } else {
                    Access::Full
                },
                now: now.map(|(t, _)| t),
            };
            let stdin = std::io::stdin().lock();
            let stdout = std::io::stdout().lock();
            match serve(&cfg, stdin, stdout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("byteback-server: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Prune(args) => crate::admin::run_prune(args),
        Command::Status(args) => crate::admin::run_status(args),
    }
}

/// Deep trees hold one directory fd per level; lift the soft limit to the hard one.
fn raise_fd_limit() {
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

//! `byteback-prune`: byteback 1.x's pruner, same options; see [`byteback_server::admin`].
use clap::Parser;

/// Prune old snapshots so the store keeps enough free space.
#[derive(Debug, Parser)]
#[command(name = "byteback-prune", version)]
struct Cli {
    #[command(flatten)]
    args: byteback_server::admin::PruneArgs,
}

fn main() -> std::process::ExitCode {
    byteback_server::admin::run_prune(Cli::parse().args)
}

//! `byteback-prune`: byteback 1.x's pruner, same options; see [`byteback_server::admin`].
use byteback_server::admin::PruneCli;
use clap::Parser;

fn main() -> std::process::ExitCode {
    if let Err(code) = byteback_server::cli::start_logging("byteback-prune") {
        return code;
    }
    byteback_server::cli::raise_fd_limit();
    byteback_server::admin::run_prune(PruneCli::parse().args)
}

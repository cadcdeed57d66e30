//! `byteback-prune`: byteback 1.x's pruner, same options; see [`byteback_server::admin`].
use byteback_server::admin::PruneCli;
use clap::Parser;

fn main() -> std::process::ExitCode {
    byteback_server::admin::run_prune(PruneCli::parse().args)
}

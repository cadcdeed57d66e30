//! `byteback-server`: see [`byteback_server::cli`].
fn main() -> std::process::ExitCode {
    byteback_server::cli::main()
}

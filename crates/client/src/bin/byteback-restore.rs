//! `byteback-restore`: see [`byteback_client::cli`].
fn main() -> std::process::ExitCode {
    byteback_client::cli::restore_main()
}

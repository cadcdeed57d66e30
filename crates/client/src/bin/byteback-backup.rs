//! `byteback-backup`: see [`byteback_client::cli`].
fn main() -> std::process::ExitCode {
    byteback_client::cli::backup_main()
}

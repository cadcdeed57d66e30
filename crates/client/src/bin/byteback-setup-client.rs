//! `byteback-setup-client`: see [`byteback_client::setup`].
fn main() -> std::process::ExitCode {
    byteback_client::setup::setup_main()
}

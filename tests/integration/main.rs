//! byteback's integration tests, one binary (as ripgrep does): a module per
//! area, the shared helpers in [`util`] compiled once. Each area's tests run
//! with `cargo test --test integration AREA::`, one test with
//! `cargo test --test integration AREA::NAME`.
//!
//! The tests of all areas run concurrently in this one process, so none may
//! rely on process-wide state: no `std::env::set_var`, no umask or current
//! directory changes, no fixed ports, users, loop files or mount points, and
//! every scan of the process table is scoped to the test's own processes
//! (see `util::processes_naming`).

mod util;

mod backup;
mod databases;
mod deb;
mod discfull;
mod filesystems;
mod filter;
mod harness_selftest;
mod hooks;
mod hostile;
mod hostile_server;
mod json;
mod legacy;
mod moves;
mod ops;
mod progress;
mod prune;
mod report;
mod resume;
mod ssh;
mod torture;
mod verify;

//! byteback's client side: walking the sources, streaming deltas to a
//! server, listing and restoring.
//!
//! The binaries `byteback-backup` and `byteback-restore` are thin wrappers
//! around [`cli`]; everything else is a library so tests can drive it.
#![deny(missing_docs)]

pub mod apply;
pub mod backup;
pub mod cli;
pub mod conn;
pub mod error;
pub mod filter;
pub mod hooks;
pub mod known_hosts;
pub mod meta;
pub mod mounts;
pub mod prefetch;
pub mod progress;
pub mod restore;
pub mod rsync_flags;
pub mod setup;
pub mod ssh;
pub mod stop;
mod sync;

/// `default`; in a debug build, for the tests, `$VAR` seconds if set (a
/// time limit shortened or lengthened from outside, as the integration
/// tests do with the binaries they run).
pub(crate) fn test_knob(var: &str, default: std::time::Duration) -> std::time::Duration {
    #[cfg(debug_assertions)]
    if let Some(s) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        return std::time::Duration::from_secs(s);
    }
    let _ = var;
    default
}
pub mod walk;

pub use error::{Error, Result};

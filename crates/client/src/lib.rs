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
pub mod walk;

pub use error::{Error, Result};

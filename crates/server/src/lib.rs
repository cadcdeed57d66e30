//! byteback's server side: the store, receiving backups, snapshots, and
//! serving listings and restores.
//!
//! `byteback-server serve` runs [`serve::serve`] on stdin/stdout; the client
//! spawns the same binary for a local store, so both transports run
//! one code path.
#![deny(missing_docs)]

pub mod admin;
pub mod backup;
pub mod btrfs;
pub mod cli;
pub mod config;
pub mod enrol;
pub mod error;
pub mod fsops;
pub mod legacy;
pub mod manifest;
pub mod migrate;
pub mod prune;
pub mod pruner;
pub mod relay;
pub mod report;
pub mod serve;
pub mod space;
pub mod status;
pub mod store;
pub mod time;
pub mod timed;
pub mod twins;
pub mod verify;

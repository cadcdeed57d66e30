//! What the scripted fake server (`byteback-fake-server`) answers, shared by
//! the server binary and the tests that write its script.

use byteback_protocol::ManifestEntry;
use serde::{Deserialize, Serialize};

/// Environment variable naming the scenario file.
pub const SCENARIO_ENV: &str = "BYTEBACK_FAKE_SCENARIO";

/// A scripted server's answers; see `tests/support/fake_server.rs`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Scenario {
    /// Host name announced in `HelloOk`.
    pub host: String,
    /// Answer to `ListSnapshots`.
    pub snapshots: Vec<String>,
    /// Manifest parts sent for every `ReadManifest` of a snapshot not in `manifests`.
    pub parts: Vec<Vec<ManifestEntry>>,
    /// Manifest parts by snapshot name, sent instead of `parts` for that snapshot.
    pub manifests: Vec<(String, Vec<Vec<ManifestEntry>>)>,
    /// After `parts`: this many more parts of 1,000 generated regular files
    /// each, `flood/000000000000` upwards (valid and in order), before
    /// `ManifestEnd`. The files need `flood` as a directory entry in `parts`.
    pub flood_parts: u64,
    /// Length of a `user.flood` xattr on each flood entry (0: none).
    pub flood_xattr_len: usize,
    /// Flood entries carry the requested snapshot's position in `snapshots`
    /// as their mtime (seconds), so every snapshot holds its own version of each.
    pub flood_mtime_by_snapshot: bool,
    /// After the flood: this many empty files `flood/own-PPPP-NNNNNN` (PPPP
    /// the requested snapshot's position in `snapshots`) that only that
    /// snapshot holds. Need `flood` as a directory entry in the manifest.
    pub flood_own: u64,
    /// After the flood and its own entries: a directory `zlinks` and this
    /// many hard links `zlinks/NNNNNNNNNNNN` to `flood/NNNNNNNNNNNN`.
    pub flood_links: u64,
    /// Manifest parts sent last, after the flood and its links.
    pub tail: Vec<Vec<ManifestEntry>>,
    /// Content served for `ReadFile`, by path; other paths get an `Error`.
    pub files: Vec<(Vec<u8>, Vec<u8>)>,
    /// Content served for `ReadFile` by (snapshot, path), looked up before `files`.
    pub snapshot_files: Vec<(String, Vec<u8>, Vec<u8>)>,
    /// Milliseconds to wait before answering each `ReadFile` (for races).
    pub file_delay_ms: u64,
    /// Holds each file's answer back (unflushed: the client cannot have
    /// it) for up to this many milliseconds, until the client's next request
    /// comes; stderr then says how many came meanwhile, i.e. were asked
    /// for ahead (0: answers go at once).
    pub hold_answers_ms: u64,
    /// Empty `FilePartRaw`s sent before each file's data (a server keeping
    /// a restore busy without sending anything).
    pub empty_parts: u64,
    /// Empty `ManifestPart`s sent before a manifest's parts (which are sent
    /// only when not empty).
    pub empty_manifest_parts: u64,
    /// Every snapshot (and `current`) is announced as byteback 1.x's.
    pub legacy: bool,
    /// After `parts`: this many `ManifestNote`s on paths left out,
    /// `flood/skipped-NNNNNNNNNNNN/` and 15 components of 250 bytes (near
    /// 4 KiB in all), each with a message of `flood_note_len` bytes.
    pub flood_notes: u64,
    /// Length of each flood note's message (at most 4096).
    pub flood_note_len: usize,
}

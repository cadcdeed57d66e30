//! `byteback-fake-server`: a scripted, hostile stand-in for `byteback-server
//! serve`, for the tests of the client's restore and listing.
//!
//! It speaks the real protocol over stdin/stdout, but answers from the
//! scenario file named by `$BYTEBACK_FAKE_SCENARIO` (see
//! `tests/support/scenario.rs`) instead of a store: crafted snapshot names,
//! manifests and file data that a compromised server could send. It is a
//! test tool, built with the workspace so that tests find it next to the
//! real binaries; it never touches the filesystem beyond reading its script.
#![allow(clippy::unwrap_used)] // a test tool: a panic is how it fails

#[path = "scenario.rs"]
mod scenario;

use std::io::{BufReader, BufWriter, Write};
use std::time::Duration;

use byteback_protocol::{
    decode_client, read_frame, write_msg, ClientMsg, Compressed, Entry, Kind, ManifestEntry,
    ServerMsg, PROTOCOL_VERSION,
};
use scenario::{Scenario, SCENARIO_ENV};

/// An empty regular file with `xattr_len` bytes of `user.flood`.
fn flood_entry(path: String, mtime: i64, xattr_len: usize) -> ManifestEntry {
    let xattrs = if xattr_len > 0 {
        vec![(b"user.flood".to_vec(), vec![b'x'; xattr_len])]
    } else {
        vec![]
    };
    ManifestEntry {
        entry: Entry {
            path: path.into_bytes(),
            kind: Kind::File { size: 0 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: mtime,
            mtime_nsec: 0,
            xattrs,
        },
        hash: *blake3_empty(),
    }
}

fn flood_part(n: u64, mtime: i64, xattr_len: usize) -> Vec<ManifestEntry> {
    (0..1000)
        .map(|i| flood_entry(format!("flood/{:012}", n * 1000 + i), mtime, xattr_len))
        .collect()
}

/// The directory of the flood's hard links.
fn link_dir_entry() -> ManifestEntry {
    let mut e = flood_entry("zlinks".into(), 0, 0);
    e.entry.kind = Kind::Dir;
    e.entry.mode = 0o755;
    e.hash = [0; 32];
    e
}

/// Hard link `zlinks/N` to flood file `N`.
fn link_entry(n: u64) -> ManifestEntry {
    let mut e = flood_entry(format!("zlinks/{n:012}"), 0, 0);
    e.entry.kind = Kind::HardLink {
        target: format!("flood/{n:012}").into_bytes(),
    };
    e.hash = [0; 32];
    e
}

/// BLAKE3 of no bytes.
fn blake3_empty() -> &'static [u8; 32] {
    static H: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    H.get_or_init(|| byteback_delta::hash_bytes(b""))
}

/// Sends one message; a client that hung up (as it should after a refusal) ends the server quietly.
fn send(w: &mut impl Write, msg: &ServerMsg) {
    if let Err(e) = write_msg(w, msg) {
        eprintln!("fake server: client gone: {e}");
        std::process::exit(0);
    }
}

/// Whether more of the client's bytes are waiting to be read (buffered,
/// or in the pipe), or come within `ms` milliseconds.
fn more_waiting(r: &BufReader<std::io::StdinLock<'_>>, ms: u64) -> bool {
    if !r.buffer().is_empty() {
        return true;
    }
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, ms.min(60_000) as libc::c_int) > 0 }
}

/// `$BYTEBACK_FAKE_TRICKLE=SERVER`: runs the real server `SERVER` with
/// these arguments and hands on what it writes, its first frame (the
/// answer to the handshake) at once, then a byte every 200 ms (what it is
/// sent goes straight to it): a server that keeps every timeout based on
/// idleness from firing.
fn trickle(server: std::ffi::OsString) -> ! {
    use std::io::Read;
    let mut child = std::process::Command::new(server)
        .args(std::env::args_os().skip(1))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut from = child.stdout.take().unwrap();
    let mut out = std::io::stdout().lock();
    let mut prefix = [0u8; 4];
    from.read_exact(&mut prefix).unwrap();
    let mut first = vec![0u8; u32::from_le_bytes(prefix) as usize];
    from.read_exact(&mut first).unwrap();
    out.write_all(&prefix).unwrap();
    out.write_all(&first).unwrap();
    out.flush().unwrap();
    let mut byte = [0u8; 1];
    while from.read_exact(&mut byte).is_ok() {
        if out.write_all(&byte).and_then(|()| out.flush()).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    std::process::exit(0);
}

fn main() {
    if let Some(server) = std::env::var_os("BYTEBACK_FAKE_TRICKLE") {
        trickle(server);
    }
    let path = std::env::var_os(SCENARIO_ENV).expect("BYTEBACK_FAKE_SCENARIO not set");
    let bytes = std::fs::read(&path).unwrap();
    let (sc, _): (Scenario, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    let mut r = BufReader::new(std::io::stdin().lock());
    let mut w = BufWriter::new(std::io::stdout().lock());
    // Files answered, and of those how many had the next request come
    // before their answer left (a client asking ahead; see `hold_answers_ms`).
    let (mut reads, mut ahead) = (0u64, 0u64);
    while let Some(frame) = read_frame(&mut r).unwrap() {
        let msg = decode_client(&frame).unwrap();
        match msg {
            ClientMsg::Hello { .. } => send(
                &mut w,
                &ServerMsg::HelloOk {
                    version: PROTOCOL_VERSION,
                    host: sc.host.clone(),
                },
            ),
            ClientMsg::ListSnapshots => send(&mut w, &ServerMsg::Snapshots(sc.snapshots.clone())),
            ClientMsg::ListSnapshotKinds => {
                let kind = if sc.legacy {
                    byteback_protocol::SnapshotKind::Legacy1x
                } else {
                    byteback_protocol::SnapshotKind::Byteback
                };
                send(
                    &mut w,
                    &ServerMsg::SnapshotKinds {
                        snapshots: sc.snapshots.iter().map(|n| (n.clone(), kind)).collect(),
                        current: Some(kind),
                        current_news: byteback_protocol::CurrentNews::No,
                    },
                )
            }
            ClientMsg::ReadManifest { snapshot } => {
                let parts = sc
                    .manifests
                    .iter()
                    .find(|(s, _)| *s == snapshot)
                    .map_or(&sc.parts, |(_, p)| p);
                for _ in 0..sc.empty_manifest_parts {
                    send(&mut w, &ServerMsg::ManifestPart(vec![]))
                }
                for p in parts.iter().filter(|p| !p.is_empty()) {
                    send(&mut w, &ServerMsg::ManifestPart(p.clone()))
                }
                let deep = vec!["x".repeat(250); 15].join("/");
                for n in 0..sc.flood_notes {
                    send(
                        &mut w,
                        &ServerMsg::ManifestNote {
                            path: format!("flood/skipped-{n:012}/{deep}").into_bytes(),
                            skipped: true,
                            message: "m".repeat(sc.flood_note_len),
                        },
                    );
                }
                let pos = sc
                    .snapshots
                    .iter()
                    .position(|s| *s == snapshot)
                    .unwrap_or(0);
                let mtime = if sc.flood_mtime_by_snapshot {
                    pos as i64
                } else {
                    0
                };
                for n in 0..sc.flood_parts {
                    send(
                        &mut w,
                        &ServerMsg::ManifestPart(flood_part(n, mtime, sc.flood_xattr_len)),
                    );
                }
                if sc.flood_own > 0 {
                    let own = (0..sc.flood_own)
                        .map(|i| {
                            let path = format!("flood/own-{pos:04}-{i:06}");
                            flood_entry(path, mtime, sc.flood_xattr_len)
                        })
                        .collect();
                    send(&mut w, &ServerMsg::ManifestPart(own));
                }
                if sc.flood_links > 0 {
                    let mut part = vec![link_dir_entry()];
                    for i in 0..sc.flood_links {
                        part.push(link_entry(i));
                        if part.len() == 1000 {
                            send(&mut w, &ServerMsg::ManifestPart(std::mem::take(&mut part)));
                        }
                    }
                    if !part.is_empty() {
                        send(&mut w, &ServerMsg::ManifestPart(part));
                    }
                }
                for part in &sc.tail {
                    send(&mut w, &ServerMsg::ManifestPart(part.clone()));
                }
                send(&mut w, &ServerMsg::ManifestEnd);
            }
            ClientMsg::ReadFile { snapshot, path } => {
                std::thread::sleep(Duration::from_millis(sc.file_delay_ms));
                let data = sc
                    .snapshot_files
                    .iter()
                    .find(|(s, p, _)| *s == snapshot && *p == path)
                    .map(|(_, _, d)| d)
                    .or_else(|| sc.files.iter().find(|(p, _)| *p == path).map(|(_, d)| d));
                match data {
                    Some(data) => {
                        // Parts alternate between zstd frames and raw
                        // bytes, from file to file and part to part, so
                        // every scenario sends both kinds.
                        for _ in 0..sc.empty_parts {
                            send(&mut w, &ServerMsg::FilePartRaw(Vec::new().into()));
                        }
                        for (i, c) in data.chunks(1 << 20).enumerate() {
                            let part = match (reads + i as u64) % 2 {
                                0 => ServerMsg::FilePart(Compressed::compress(c, 1).unwrap()),
                                _ => ServerMsg::FilePartRaw(c.to_vec().into()),
                            };
                            send(&mut w, &part);
                        }
                        send(&mut w, &ServerMsg::FileDone);
                        reads += 1;
                        if sc.hold_answers_ms > 0 {
                            ahead += u64::from(more_waiting(&r, sc.hold_answers_ms));
                        }
                    }
                    None => send(
                        &mut w,
                        &ServerMsg::Error {
                            message: "no such file".into(),
                        },
                    ),
                }
            }
            ClientMsg::Bye => {
                eprintln!("fake server: {ahead} of {reads} files were asked for ahead");
                w.flush().unwrap();
                return;
            }
            other => panic!("fake server: unexpected {}", other.name()),
        }
        if w.flush().is_err() {
            return;
        }
    }
}

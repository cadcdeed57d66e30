//! The real session loop, in process, fed valid, truncated and mutated
#![allow(clippy::unwrap_used, clippy::useless_vec)] // a panic is how a test fails
//! backup sessions: it returns an error or commits correct content, never
//! panics, and never writes outside the host's directory.

use std::path::Path;

use byteback_delta::{hash_bytes, literal_delta};
use byteback_protocol::*;
use byteback_server::serve::{serve, Access, ServeConfig};
use proptest::prelude::*;

const CONTENT: &[u8] = b"hello, hostile world";

fn session() -> Vec<u8> {
    session_with(CONTENT)
}

/// A backup session of `d/f` holding `content` (and `d`, and a symlink `d/l`).
fn session_with(content: &[u8]) -> Vec<u8> {
    let entry = |p: &str, kind: Kind| Entry {
        path: p.as_bytes().to_vec(),
        kind,
        mode: 0o4755,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        xattrs: vec![],
    };
    let msgs = vec![
        ClientMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        },
        ClientMsg::BackupStart { checksum: false },
        ClientMsg::Entries(vec![
            entry("d", Kind::Dir),
            entry(
                "d/f",
                Kind::File {
                    size: content.len() as u64,
                },
            ),
            entry(
                "d/l",
                Kind::Symlink {
                    target: b"/etc".to_vec(),
                },
            ),
        ]),
        ClientMsg::FileData {
            id: 0,
            delta: Compressed::compress(&literal_delta(content), 1).unwrap(),
        },
        ClientMsg::FileEnd {
            id: 0,
            size: content.len() as u64,
            hash: hash_bytes(content),
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
        },
        ClientMsg::BackupEnd,
        ClientMsg::Bye,
    ];
    msgs.iter().flat_map(|m| encode(m).unwrap()).collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    store: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("byteback.toml"), "min_snapshot_interval = 0\n").unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("SENTINEL"), b"untouched").unwrap();
    Setup {
        _dir: dir,
        store,
        outside,
    }
}

fn run(s: &Setup, input: &[u8]) -> byteback_server::error::Result<()> {
    run_out(s, input, true).map(|_| ())
}

/// [`run`], with restored data compressed or not; gives back what the
/// server sent.
fn run_out(s: &Setup, input: &[u8], compress: bool) -> byteback_server::error::Result<Vec<u8>> {
    let cfg = ServeConfig {
        store: s.store.clone(),
        host: "h".into(),
        access: Access::Full,
        now: None,
        compress,
        clock: Default::default(),
    };
    let mut out = vec![];
    serve(&cfg, input, &mut out)?;
    Ok(out)
}

fn snapshots(store: &Path) -> Vec<String> {
    match std::fs::read_dir(store.join("h")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('2'))
            .collect(),
        Err(_) => vec![],
    }
}

fn check_invariants(s: &Setup) {
    let names: Vec<_> = std::fs::read_dir(&s.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "something appeared outside the store: {names:?}"
    );
    assert_eq!(
        std::fs::read(s.outside.join("SENTINEL")).unwrap(),
        b"untouched"
    );
    // Whatever got committed is exactly what was sent, and never setuid.
    for snap in snapshots(&s.store) {
        let f = s.store.join("h").join(&snap).join("d/f");
        if let Ok(data) = std::fs::read(&f) {
            assert_eq!(
                data, CONTENT,
                "snapshot {snap} holds content that was not verified"
            );
            let mode = std::fs::metadata(&f).unwrap().permissions();
            assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7000, 0);
        }
    }
}

#[test]
fn the_valid_session_commits_and_snapshots() {
    let s = setup();
    run(&s, &session()).unwrap();
    assert_eq!(snapshots(&s.store).len(), 1);
    let f = s.store.join("h/current/d/f");
    assert_eq!(std::fs::read(&f).unwrap(), CONTENT);
    assert_eq!(
        std::fs::read_link(s.store.join("h/current/d/l")).unwrap(),
        Path::new("/etc")
    );
    check_invariants(&s);
}

/// Restored data is compressed where it shrinks, and sent as it is
/// (`FilePartRaw`, no zstd frame) where it does not or when the server runs
/// with `--no-compress`, as a client restoring from a local store starts
/// it; every way, the parts come back as the file.
#[test]
fn restored_data_is_compressed_unless_told_not_to_or_it_does_not_shrink() {
    let text: Vec<u8> = b"a line of text that repeats itself\n".repeat(40_000);
    let mut x = 7u64;
    let random: Vec<u8> = (0..1_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let read: Vec<u8> = [
        ClientMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        },
        ClientMsg::ReadFile {
            snapshot: "current".into(),
            path: b"d/f".to_vec(),
        },
        ClientMsg::Bye,
    ]
    .iter()
    .flat_map(|m| encode(m).unwrap())
    .collect();
    for (data, compress, raw) in [
        (&text, true, false),
        (&text, false, true),
        (&random, true, true),
    ] {
        let s = setup();
        run(&s, &session_with(data)).unwrap();
        let out = run_out(&s, &read, compress).unwrap();
        let mut r = &out[..];
        let (mut got, mut wire, mut kinds) = (vec![], 0, vec![]);
        while let Some(frame) = read_frame(&mut r).unwrap() {
            let m = decode_server(&frame).unwrap();
            match &m {
                ServerMsg::FilePart(c) => {
                    wire += c.data.len();
                    got.extend_from_slice(&c.decompress().unwrap());
                }
                ServerMsg::FilePartRaw(b) => {
                    wire += b.len();
                    got.extend_from_slice(b.as_slice());
                }
                ServerMsg::HelloOk { .. } | ServerMsg::FileDone => continue,
                m => panic!("unexpected {}", m.name()),
            }
            kinds.push(m.name());
        }
        let case = format!("{} bytes, compress {compress}: {kinds:?}", data.len());
        assert!(got == *data, "{case}");
        assert!(kinds.len() > 1, "{case}: one part only");
        let want = if raw { "FilePartRaw" } else { "FilePart" };
        assert!(kinds.iter().all(|k| *k == want), "{case}");
        if raw {
            assert_eq!(wire, data.len(), "{case}");
        } else {
            assert!(wire * 10 < data.len(), "{case}: {wire} bytes");
        }
    }
}

#[test]
fn truncation_at_every_offset_is_an_error_without_snapshot() {
    let full = session();
    let bye = encode(&ClientMsg::Bye).unwrap().len();
    let hello = encode(&ClientMsg::Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
    })
    .unwrap()
    .len();
    let s = setup();
    for cut in 0..full.len() - bye {
        let r = run(&s, &full[..cut]);
        // Closing before any request is a clean end; anything later is an error.
        assert!(
            cut == 0 || cut == hello || r.is_err(),
            "cut at {cut} was accepted"
        );
        assert!(
            snapshots(&s.store).is_empty(),
            "cut at {cut} produced a snapshot"
        );
        check_invariants(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn mutated_sessions_never_panic_or_commit_bad_data(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut input = session();
        for (pos, val) in flips {
            let i = pos % input.len();
            input[i] = val;
        }
        let s = setup();
        let _ = run(&s, &input);
        check_invariants(&s);
    }

    #[test]
    fn random_input_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let s = setup();
        let r = run(&s, &bytes);
        prop_assert!(bytes.is_empty() || r.is_err());
        check_invariants(&s);
    }
}

//! Random and mutated bytes never panic the decoder or the session checks.
#![allow(clippy::unwrap_used, clippy::useless_vec)] // a panic is how a test fails

use byteback_protocol::*;
use proptest::prelude::*;

fn valid_session() -> Vec<u8> {
    let entry = |p: &str, kind: Kind| Entry {
        path: p.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 1,
        gid: 2,
        mtime_sec: 3,
        mtime_nsec: 4,
        xattrs: vec![(b"user.a".to_vec(), b"b".to_vec())],
    };
    let msgs = vec![
        ClientMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        },
        ClientMsg::BackupStart { checksum: false },
        ClientMsg::Entries(vec![
            entry("d", Kind::Dir),
            entry("d/f", Kind::File { size: 5 }),
        ]),
        ClientMsg::FileData {
            id: 0,
            delta: Compressed::compress(b"hello", 1).unwrap(),
        },
        ClientMsg::FileEnd {
            id: 0,
            size: 5,
            hash: [7; 32],
            mtime_sec: 3,
            mtime_nsec: 4,
        },
        ClientMsg::BackupEnd,
    ];
    msgs.iter().flat_map(|m| encode(m).unwrap()).collect()
}

/// Feeds bytes through the frame decoder, the message decoder and a server session.
fn feed(bytes: &[u8]) {
    let mut dec = FrameDecoder::new();
    let mut session = ServerSession::new();
    let mut next_id = 0u32;
    dec.push(bytes);
    loop {
        match dec.next_frame() {
            Ok(Some(frame)) => match decode_client(&frame) {
                Ok(msg) => {
                    if session.on_recv(&msg).is_err() {
                        return;
                    }
                    if let ClientMsg::Entries(e) = &msg {
                        next_id += 1;
                        let id = next_id;
                        let need = Need {
                            index: 0,
                            id,
                            basis: false,
                            twin: false,
                        };
                        let _ = session.on_send(&ServerMsg::Needs(if e.len() > 1 {
                            vec![need]
                        } else {
                            vec![]
                        }));
                    }
                    if let ClientMsg::Hello { .. } = msg {
                        let _ = session.on_send(&ServerMsg::HelloOk {
                            version: PROTOCOL_VERSION,
                            host: "h".into(),
                        });
                    }
                    if let ClientMsg::BackupStart { .. } = msg {
                        let _ = session.on_send(&ServerMsg::BackupReady { generation: None });
                    }
                }
                Err(_) => return,
            },
            Ok(None) | Err(_) => return,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        feed(&bytes);
        let _ = decode_server(&bytes);
    }

    #[test]
    fn mutated_sessions_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut s = valid_session();
        for (pos, val) in flips {
            let i = pos % s.len();
            s[i] = val;
        }
        feed(&s);
    }

    #[test]
    fn truncated_sessions_never_panic(cut in 0usize..10_000) {
        let s = valid_session();
        feed(&s[..cut % (s.len() + 1)]);
    }
}

#[test]
fn the_valid_session_is_accepted_whole() {
    // Guard for the properties above: unmutated input passes every check.
    let s = valid_session();
    let mut dec = FrameDecoder::new();
    dec.push(&s);
    let mut n = 0;
    while let Some(f) = dec.next_frame().unwrap() {
        decode_client(&f).unwrap();
        n += 1;
    }
    assert_eq!(n, 6);
}

/// A `BackupDone` names a snapshot the way the server names them and says
/// at most 64 KiB: a hostile server's escape sequences or megabytes of text
/// never reach the client's log or report.
#[test]
fn a_backup_done_is_checked() {
    let done = |snapshot: Option<&str>, message: String| ServerMsg::BackupDone {
        snapshot: snapshot.map(str::to_string),
        message,
        stats: BackupStats::default(),
        generation: None,
    };
    assert!(done(Some("2026-11-27T03:00+0000"), "fine".into())
        .validate()
        .is_ok());
    assert!(done(None, "x".repeat(limits::MAX_BACKUP_MESSAGE))
        .validate()
        .is_ok());
    for bad in ["../x", "a/b", "\x1b]0;owned\x07", ""] {
        assert!(
            done(Some(bad), String::new()).validate().is_err(),
            "{bad:?}"
        );
    }
    assert!(done(None, "x".repeat(limits::MAX_BACKUP_MESSAGE + 1))
        .validate()
        .is_err());
}

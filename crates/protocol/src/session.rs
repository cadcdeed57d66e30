//! Sans-IO session state: which message may come next.
//!
//! Both peers feed every message they send (`on_send`) and receive
//! (`on_recv`) through their session object. A message the protocol does not
//! allow at that point is an error, whatever its contents, so a hostile or
//! confused peer is stopped before its message is acted on.
//!
//! Both views share one state machine ([`Session`]): the client's `on_send`
//! and the server's `on_recv` check a [`ClientMsg`] with the same code, and
//! the other two a [`ServerMsg`]. The session is where message order, transfer
//! ids and the pending-entry cap ([`MAX_PENDING`]) are enforced; flow control
//! (how far ahead the client announces, how much the server buffers) stays
//! with each side, sized by the same constants in [`crate::limits`].

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};

use crate::error::ProtocolError;
use crate::limits::{MAX_PENDING, MAX_READS_AHEAD};
use crate::messages::{ClientMsg, Kind, ServerMsg};
use crate::path::compare_paths;
use crate::{MAGIC, PROTOCOL_VERSION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitHelloOk,
    Idle,
    AwaitBackupReady,
    Backup,
    Ending,
    Reading,
    Closed,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::AwaitHello => "waiting for hello",
            Phase::AwaitHelloOk => "waiting for the server's hello",
            Phase::Idle => "idle",
            Phase::AwaitBackupReady => "starting a backup",
            Phase::Backup => "receiving a backup",
            Phase::Ending => "committing a backup",
            Phase::Reading => "serving a read",
            Phase::Closed => "closed",
        }
    }
}

/// Where a transfer's block signature stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    /// The transfer has no basis: no signature can be asked for.
    NoBasis,
    /// A basis exists; the client has not asked for its signature.
    Available,
    /// Asked for; the server owes a [`ServerMsg::Signature`].
    Requested,
    /// Sent.
    Sent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    /// Announced; data may come. `twin`: nothing sent yet and the server
    /// would take a [`ClientMsg::FileClone`].
    Open { sig: Sig, twin: bool },
    /// FileClone seen; waiting for FileOk or SendData. `sig`: where the
    /// basis's signature stood (checksum mode offers files with a basis).
    Offered { sig: Sig },
    /// FileEnd or FileAbort seen; waiting for FileOk or FileRetry.
    Ended,
}

impl Transfer {
    /// A transfer whose data comes whole (a retry, or a declined clone offer).
    const WHOLE: Transfer = Transfer::Open {
        sig: Sig::NoBasis,
        twin: false,
    };
}

/// SendData for a transfer with no clone offer outstanding.
fn no_offer() -> ProtocolError {
    ProtocolError::Unexpected {
        got: "SendData",
        state: "no clone offered",
    }
}

/// The state of a backup: batches awaiting `Needs`, transfers in progress.
///
/// Bounded: entries may only be announced while fewer than [`MAX_PENDING`] are
/// unanswered or in transfer, so `transfers` and `batches_unanswered` never
/// hold more than that many, whatever the peer sends.
#[derive(Debug, Default)]
struct BackupState {
    last_path: Option<Vec<u8>>,
    batches_unanswered: VecDeque<u32>,
    /// Sum of `batches_unanswered`.
    unanswered: usize,
    transfers: HashMap<u32, Transfer>,
}

impl BackupState {
    fn check_entries(&mut self, entries: &[crate::Entry]) -> Result<(), ProtocolError> {
        for e in entries {
            if let Some(last) = &self.last_path {
                if compare_paths(last, &e.path) != Ordering::Less {
                    return Err(ProtocolError::Limit(format!(
                        "entries out of order: {:?} after {:?}",
                        String::from_utf8_lossy(&e.path),
                        String::from_utf8_lossy(last)
                    )));
                }
            }
            if let Kind::HardLink { target } = &e.kind {
                if compare_paths(target, &e.path) != Ordering::Less {
                    return Err(ProtocolError::Limit("hard link to a later entry".into()));
                }
            }
            self.last_path = Some(e.path.clone());
        }
        if self.transfers.len() + self.unanswered + entries.len() > MAX_PENDING {
            return Err(ProtocolError::Limit(format!(
                "more than {MAX_PENDING} files pending"
            )));
        }
        self.batches_unanswered.push_back(entries.len() as u32);
        self.unanswered += entries.len();
        Ok(())
    }

    /// A run of unchanged entries: a batch that needs nothing, for the
    /// pending cap and the answers. (Their order is the server's to check:
    /// only it knows their paths.)
    fn check_unchanged(&mut self, count: u32) -> Result<(), ProtocolError> {
        if self.transfers.len() + self.unanswered + count as usize > MAX_PENDING {
            return Err(ProtocolError::Limit(format!(
                "more than {MAX_PENDING} files pending"
            )));
        }
        self.batches_unanswered.push_back(count);
        self.unanswered += count as usize;
        Ok(())
    }

    /// A subtree the client could not read: in order (not before the last
    /// path sent; the directory just sent, or a path after it), and a
    /// batch that needs nothing for the answers.
    fn check_keep(&mut self, path: &[u8]) -> Result<(), ProtocolError> {
        if let Some(last) = &self.last_path {
            if compare_paths(last, path) == Ordering::Greater {
                return Err(ProtocolError::Limit(format!(
                    "KeepUnread out of order: {:?} after {:?}",
                    String::from_utf8_lossy(path),
                    String::from_utf8_lossy(last)
                )));
            }
        }
        self.last_path = Some(path.to_vec());
        self.batches_unanswered.push_back(0);
        Ok(())
    }

    fn answer_batch(&mut self, needs: &[crate::Need]) -> Result<(), ProtocolError> {
        let Some(size) = self.batches_unanswered.pop_front() else {
            return Err(ProtocolError::Unexpected {
                got: "Needs",
                state: "no batch is waiting",
            });
        };
        self.unanswered -= size as usize;
        let mut prev: Option<u32> = None;
        for n in needs {
            if n.index >= size || prev.is_some_and(|p| p >= n.index) {
                return Err(ProtocolError::Limit(
                    "need index out of range or order".into(),
                ));
            }
            prev = Some(n.index);
            if self.transfers.contains_key(&n.id) {
                return Err(ProtocolError::Limit(format!("transfer id {} reused", n.id)));
            }
            let sig = if n.basis {
                Sig::Available
            } else {
                Sig::NoBasis
            };
            self.transfers
                .insert(n.id, Transfer::Open { sig, twin: n.twin });
        }
        Ok(())
    }

    fn open(&mut self, id: u32, what: &'static str) -> Result<&mut Transfer, ProtocolError> {
        match self.transfers.get_mut(&id) {
            Some(t @ Transfer::Open { .. }) => Ok(t),
            _ => Err(ProtocolError::Unexpected {
                got: what,
                state: "no such open transfer",
            }),
        }
    }

    /// Moves an open transfer's signature from `from` to `to`.
    fn sig_step(
        &mut self,
        id: u32,
        what: &'static str,
        from: Sig,
        to: Sig,
        state: &'static str,
    ) -> Result<(), ProtocolError> {
        match self.open(id, what)? {
            Transfer::Open { sig, .. } if *sig == from => {
                *sig = to;
                Ok(())
            }
            _ => Err(ProtocolError::Unexpected { got: what, state }),
        }
    }

    /// FileData: after data, the transfer can no longer be offered for cloning.
    fn data(&mut self, id: u32) -> Result<(), ProtocolError> {
        if let Transfer::Open { twin, .. } = self.open(id, "FileData")? {
            *twin = false;
        }
        Ok(())
    }

    fn offer(&mut self, id: u32) -> Result<(), ProtocolError> {
        let t = self.open(id, "FileClone")?;
        match t {
            Transfer::Open { twin: true, sig } => {
                *t = Transfer::Offered { sig: *sig };
                Ok(())
            }
            _ => Err(ProtocolError::Unexpected {
                got: "FileClone",
                state: "transfer not offered for cloning, or data already sent",
            }),
        }
    }

    /// SendData: the offer was not taken; data follows, against the basis
    /// if there is one.
    fn offer_declined(&mut self, id: u32) -> Result<(), ProtocolError> {
        match self.transfers.get_mut(&id) {
            Some(t) => match *t {
                Transfer::Offered { sig } => {
                    *t = Transfer::Open { sig, twin: false };
                    Ok(())
                }
                _ => Err(no_offer()),
            },
            None => Err(no_offer()),
        }
    }

    fn end(&mut self, id: u32, what: &'static str) -> Result<(), ProtocolError> {
        let t = self.open(id, what)?;
        *t = Transfer::Ended;
        Ok(())
    }

    fn resolve(&mut self, id: u32, retry: bool) -> Result<(), ProtocolError> {
        match (self.transfers.get_mut(&id), retry) {
            (Some(Transfer::Offered { .. }), false) | (Some(Transfer::Ended), false) => {
                self.transfers.remove(&id);
                Ok(())
            }
            (Some(t @ Transfer::Ended), true) => {
                *t = Transfer::WHOLE;
                Ok(())
            }
            _ => Err(ProtocolError::Unexpected {
                got: "FileOk/FileRetry",
                state: "transfer not ended",
            }),
        }
    }

    fn idle(&self) -> bool {
        self.batches_unanswered.is_empty() && self.transfers.is_empty()
    }
}

fn unexpected(got: &'static str, phase: Phase) -> ProtocolError {
    ProtocolError::Unexpected {
        got,
        state: phase.describe(),
    }
}

/// One session's state, the same on both sides: each side feeds it every
/// message it sends and receives, the client's through [`Session::client_msg`]
/// and the server's through [`Session::server_msg`].
#[derive(Debug)]
struct Session {
    phase: Phase,
    backup: BackupState,
    /// While [`Phase::Reading`]: what is read (see [`Reads`]).
    reads: Reads,
}

/// What a [`Phase::Reading`] session is reading. A client may ask for the
/// next files before the current one has come ([`ClientMsg::ReadFile`] sent
/// ahead, at most [`MAX_READS_AHEAD`]); the server answers them in order,
/// reading the next request only once it has answered the last, so only the
/// client's view ever has any queued.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Reads {
    /// The read in progress is a file's (`FilePart`s, then `FileDone`), not
    /// a listing or a manifest.
    file: bool,
    /// Files asked for after the one in progress.
    queued: usize,
}

impl Session {
    fn new() -> Self {
        Session {
            phase: Phase::AwaitHello,
            backup: BackupState::default(),
            reads: Reads::default(),
        }
    }

    /// A message from the client to the server.
    fn client_msg(&mut self, msg: &ClientMsg) -> Result<(), ProtocolError> {
        let p = self.phase;
        match (p, msg) {
            (Phase::AwaitHello, ClientMsg::Hello { magic, version }) => {
                if *magic != MAGIC {
                    return Err(ProtocolError::BadMagic);
                }
                check_version(*version)?;
                self.phase = Phase::AwaitHelloOk;
            }
            (Phase::Idle, ClientMsg::BackupStart { .. }) => {
                self.backup = BackupState::default();
                self.phase = Phase::AwaitBackupReady;
            }
            (Phase::Backup, ClientMsg::Entries(e)) => self.backup.check_entries(e)?,
            (Phase::Backup, ClientMsg::Unchanged { count, .. }) => {
                self.backup.check_unchanged(*count)?
            }
            (Phase::Backup, ClientMsg::KeepUnread { path }) => self.backup.check_keep(path)?,
            (Phase::Backup, ClientMsg::SigRequest { id }) => self.backup.sig_step(
                *id,
                "SigRequest",
                Sig::Available,
                Sig::Requested,
                "transfer has no basis, or its signature was already asked for",
            )?,
            (Phase::Backup, ClientMsg::FileData { id, .. } | ClientMsg::FileRaw { id, .. }) => {
                self.backup.data(*id)?
            }
            (Phase::Backup, ClientMsg::FileClone { id, .. }) => self.backup.offer(*id)?,
            (Phase::Backup, ClientMsg::FileEnd { id, .. }) => self.backup.end(*id, "FileEnd")?,
            (Phase::Backup, ClientMsg::FileAbort { id }) => self.backup.end(*id, "FileAbort")?,
            (Phase::Backup, ClientMsg::BackupEnd) => {
                if !self.backup.idle() {
                    return Err(ProtocolError::Unexpected {
                        got: "BackupEnd",
                        state: "transfers still open",
                    });
                }
                self.phase = Phase::Ending;
            }
            (Phase::Idle, ClientMsg::ReadFile { .. }) => {
                self.phase = Phase::Reading;
                self.reads = Reads {
                    file: true,
                    queued: 0,
                };
            }
            (Phase::Reading, ClientMsg::ReadFile { .. }) if self.reads.file => {
                if self.reads.queued >= MAX_READS_AHEAD {
                    return Err(ProtocolError::Limit(format!(
                        "more than {MAX_READS_AHEAD} files asked for ahead"
                    )));
                }
                self.reads.queued += 1;
            }
            (
                Phase::Idle,
                ClientMsg::ListSnapshots
                | ClientMsg::ListSnapshotKinds
                | ClientMsg::ReadManifest { .. },
            ) => {
                self.phase = Phase::Reading;
                self.reads = Reads::default();
            }
            (Phase::Idle, ClientMsg::Bye) => self.phase = Phase::Closed,
            _ => return Err(unexpected(msg.name(), p)),
        }
        Ok(())
    }

    /// A message from the server to the client.
    fn server_msg(&mut self, msg: &ServerMsg) -> Result<(), ProtocolError> {
        let p = self.phase;
        match (p, msg) {
            (_, ServerMsg::Error { .. }) => self.phase = Phase::Closed,
            (Phase::AwaitHelloOk, ServerMsg::HelloOk { version, .. }) => {
                check_version(*version)?;
                self.phase = Phase::Idle;
            }
            (Phase::AwaitBackupReady, ServerMsg::BackupReady { .. }) => self.phase = Phase::Backup,
            (Phase::Backup, ServerMsg::Needs(n)) => self.backup.answer_batch(n)?,
            (Phase::Backup, ServerMsg::Signature { id, .. }) => self.backup.sig_step(
                *id,
                "Signature",
                Sig::Requested,
                Sig::Sent,
                "signature not requested",
            )?,
            (Phase::Backup, ServerMsg::FileOk { id }) => self.backup.resolve(*id, false)?,
            (Phase::Backup, ServerMsg::FileRetry { id }) => self.backup.resolve(*id, true)?,
            (Phase::Backup, ServerMsg::SendData { id }) => self.backup.offer_declined(*id)?,
            (Phase::Ending, ServerMsg::BackupDone { .. }) => self.phase = Phase::Idle,
            (Phase::Reading, ServerMsg::FileDone) if self.reads.file => {
                match self.reads.queued.checked_sub(1) {
                    Some(left) => self.reads.queued = left, // the next file's turn
                    None => self.phase = Phase::Idle,
                }
            }
            (Phase::Reading, ServerMsg::FilePart(_) | ServerMsg::FilePartRaw(_))
                if self.reads.file => {}
            (
                Phase::Reading,
                ServerMsg::Snapshots(_) | ServerMsg::SnapshotKinds { .. } | ServerMsg::ManifestEnd,
            ) if !self.reads.file => self.phase = Phase::Idle,
            (Phase::Reading, ServerMsg::ManifestPart(_) | ServerMsg::ManifestNote { .. })
                if !self.reads.file => {}
            _ => return Err(unexpected(msg.name(), p)),
        }
        Ok(())
    }
}

fn check_version(version: u32) -> Result<(), ProtocolError> {
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// The server's view of a session.
#[derive(Debug)]
pub struct ServerSession(Session);

impl Default for ServerSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerSession {
    /// A session waiting for the client's hello.
    pub fn new() -> Self {
        ServerSession(Session::new())
    }

    /// Checks a received message; an error means the session must end.
    pub fn on_recv(&mut self, msg: &ClientMsg) -> Result<(), ProtocolError> {
        self.0.client_msg(msg)
    }

    /// Records a message about to be sent; an error is a bug on our side.
    pub fn on_send(&mut self, msg: &ServerMsg) -> Result<(), ProtocolError> {
        self.0.server_msg(msg)
    }

    /// Whether the session has ended (Bye or Error).
    pub fn is_closed(&self) -> bool {
        self.0.phase == Phase::Closed
    }
}

/// The client's view of a session.
#[derive(Debug)]
pub struct ClientSession(Session);

impl Default for ClientSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientSession {
    /// A session about to send its hello.
    pub fn new() -> Self {
        ClientSession(Session::new())
    }

    /// Records a message about to be sent; an error is a bug on our side.
    pub fn on_send(&mut self, msg: &ClientMsg) -> Result<(), ProtocolError> {
        self.0.client_msg(msg)
    }

    /// Checks a received message; an error means the session must end.
    pub fn on_recv(&mut self, msg: &ServerMsg) -> Result<(), ProtocolError> {
        self.0.server_msg(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    fn entry(path: &str, size: u64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File { size },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    /// Plays a whole backup between a client and a server session with a toy store
    /// that needs every file, the second one with a basis.
    /// (Long: one whole backup, message by message.)
    #[test]
    fn another_protocol_version_is_refused_with_what_to_do() {
        let mut s = ServerSession::new();
        let e = s
            .on_recv(&ClientMsg::Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION - 1,
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("speaks protocol {}", PROTOCOL_VERSION - 1))
                && e.contains("must run the same byteback release"),
            "{e}"
        );
    }

    /// A client that has said hello and heard back.
    fn idle_client() -> ClientSession {
        let mut c = ClientSession::new();
        c.on_send(&ClientMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        c.on_recv(&ServerMsg::HelloOk {
            version: PROTOCOL_VERSION,
            host: "h".into(),
        })
        .unwrap();
        c
    }

    fn read_file(path: &str) -> ClientMsg {
        ClientMsg::ReadFile {
            snapshot: "s".into(),
            path: path.as_bytes().to_vec(),
        }
    }

    /// A restoring client asks for files ahead: each `FileDone` ends one
    /// of them, in order, and the session is idle after the last; it may
    /// not run more than the limit ahead, and a file's answer cannot end
    /// a listing, nor a listing's a file.
    #[test]
    fn files_may_be_asked_for_ahead_within_the_limit() {
        let part = || ServerMsg::FilePart(Compressed::compress(b"x", 1).unwrap());
        let mut c = idle_client();
        for p in ["a", "b", "c"] {
            c.on_send(&read_file(p)).unwrap();
        }
        for _ in 0..2 {
            c.on_recv(&part()).unwrap();
            c.on_recv(&ServerMsg::FilePartRaw(vec![1u8; 3].into()))
                .unwrap();
            c.on_recv(&ServerMsg::FileDone).unwrap();
            // Still reading: a listing may not start yet.
            assert!(c.on_send(&ClientMsg::ListSnapshots).is_err());
        }
        c.on_recv(&ServerMsg::FileDone).unwrap();
        // Idle again: a stray FileDone is refused, and anything may start.
        assert!(c.on_recv(&ServerMsg::FileDone).is_err());
        c.on_send(&ClientMsg::ListSnapshots).unwrap();
        let mut c = idle_client();
        c.on_send(&read_file("a")).unwrap();
        for i in 0..MAX_READS_AHEAD {
            c.on_send(&read_file(&format!("n{i}"))).unwrap();
        }
        let e = c.on_send(&read_file("over")).unwrap_err().to_string();
        assert!(e.contains("asked for ahead"), "{e}");
        // A listing's answers are not a file's, and the other way round.
        let mut c = idle_client();
        c.on_send(&read_file("a")).unwrap();
        assert!(c.on_recv(&ServerMsg::ManifestEnd).is_err());
        let mut c = idle_client();
        c.on_send(&ClientMsg::ReadManifest {
            snapshot: "s".into(),
        })
        .unwrap();
        assert!(c.on_send(&read_file("a")).is_err());
        assert!(c.on_recv(&ServerMsg::FileDone).is_err());
        assert!(c
            .on_recv(&ServerMsg::FilePartRaw(vec![1u8; 3].into()))
            .is_err());
    }

    #[test]
    fn client_and_server_sessions_agree_on_a_backup() {
        let mut c = ClientSession::new();
        let mut s = ServerSession::new();
        let exchange_c = |c: &mut ClientSession, s: &mut ServerSession, m: ClientMsg| {
            c.on_send(&m).unwrap();
            let bytes = crate::codec::encode(&m).unwrap();
            let m2 = crate::codec::decode_client(&bytes[4..]).unwrap();
            s.on_recv(&m2).unwrap();
        };
        let exchange_s = |c: &mut ClientSession, s: &mut ServerSession, m: ServerMsg| {
            s.on_send(&m).unwrap();
            let bytes = crate::codec::encode(&m).unwrap();
            c.on_recv(&crate::codec::decode_server(&bytes[4..]).unwrap())
                .unwrap();
        };
        exchange_c(
            &mut c,
            &mut s,
            ClientMsg::Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
            },
        );
        exchange_s(
            &mut c,
            &mut s,
            ServerMsg::HelloOk {
                version: PROTOCOL_VERSION,
                host: "h".into(),
            },
        );
        exchange_c(&mut c, &mut s, ClientMsg::BackupStart { checksum: false });
        exchange_s(&mut c, &mut s, ServerMsg::BackupReady { generation: None });
        exchange_c(
            &mut c,
            &mut s,
            ClientMsg::Entries(vec![entry("a", 1), entry("b", 2)]),
        );
        let (id0, id1) = (0, 1);
        exchange_s(
            &mut c,
            &mut s,
            ServerMsg::Needs(vec![
                Need {
                    index: 0,
                    id: id0,
                    basis: false,
                    twin: false,
                },
                Need {
                    index: 1,
                    id: id1,
                    basis: true,
                    twin: false,
                },
            ]),
        );
        exchange_c(&mut c, &mut s, ClientMsg::SigRequest { id: id1 });
        exchange_s(
            &mut c,
            &mut s,
            ServerMsg::Signature {
                id: id1,
                sig: vec![1],
            },
        );
        for id in [id0, id1] {
            let delta = Compressed::compress(b"x", 1).unwrap();
            exchange_c(&mut c, &mut s, ClientMsg::FileData { id, delta });
            let delta = crate::RawBytes::from(b"y".to_vec());
            exchange_c(&mut c, &mut s, ClientMsg::FileRaw { id, delta });
            exchange_c(
                &mut c,
                &mut s,
                ClientMsg::FileEnd {
                    id,
                    size: 1,
                    hash: [0; 32],
                    mtime_sec: 0,
                    mtime_nsec: 0,
                },
            );
        }
        exchange_s(&mut c, &mut s, ServerMsg::FileRetry { id: id1 });
        exchange_s(&mut c, &mut s, ServerMsg::FileOk { id: id0 });
        // BackupEnd is refused while a transfer is still open.
        assert!(s.on_recv(&ClientMsg::BackupEnd).is_err());
        let mut s = ServerSession(Session {
            phase: Phase::Backup,
            backup: std::mem::take(&mut s.0.backup),
            reads: Reads::default(),
        });
        exchange_c(
            &mut c,
            &mut s,
            ClientMsg::FileEnd {
                id: id1,
                size: 1,
                hash: [0; 32],
                mtime_sec: 0,
                mtime_nsec: 0,
            },
        );
        exchange_s(&mut c, &mut s, ServerMsg::FileOk { id: id1 });
        exchange_c(&mut c, &mut s, ClientMsg::BackupEnd);
        exchange_s(
            &mut c,
            &mut s,
            ServerMsg::BackupDone {
                snapshot: None,
                message: String::new(),
                stats: BackupStats::default(),
                generation: None,
            },
        );
        exchange_c(&mut c, &mut s, ClientMsg::Bye);
        assert!(s.is_closed());
    }

    #[test]
    fn out_of_order_messages_are_refused() {
        let mut s = ServerSession::new();
        assert!(s
            .on_recv(&ClientMsg::BackupStart { checksum: false })
            .is_err());
        let mut s = ServerSession::new();
        assert!(matches!(
            s.on_recv(&ClientMsg::Hello {
                magic: *b"SSH-2.0-",
                version: 1
            }),
            Err(ProtocolError::BadMagic)
        ));
        let mut s = ServerSession::new();
        s.on_recv(&ClientMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        s.on_send(&ServerMsg::HelloOk {
            version: PROTOCOL_VERSION,
            host: "h".into(),
        })
        .unwrap();
        s.on_recv(&ClientMsg::BackupStart { checksum: false })
            .unwrap();
        s.on_send(&ServerMsg::BackupReady { generation: None })
            .unwrap();
        // Data for a transfer that was never announced.
        let delta = Compressed::compress(b"x", 1).unwrap();
        assert!(s.on_recv(&ClientMsg::FileData { id: 7, delta }).is_err());
        let raw = crate::RawBytes::from(b"x".to_vec());
        assert!(s
            .on_recv(&ClientMsg::FileRaw { id: 7, delta: raw })
            .is_err());
        // Entries must be strictly increasing in walk order.
        s.on_recv(&ClientMsg::Entries(vec![entry("b", 1)])).unwrap();
        assert!(s.on_recv(&ClientMsg::Entries(vec![entry("a", 1)])).is_err());
        assert!(s.on_recv(&ClientMsg::Entries(vec![entry("b", 1)])).is_err());
    }

    fn clone_offer(id: u32) -> ClientMsg {
        ClientMsg::FileClone {
            id,
            size: 5 << 20,
            hash: [7; 32],
            mtime_sec: 0,
            mtime_nsec: 0,
        }
    }

    /// A server session in a backup that announced `needs` for a batch of three.
    fn backup_with(needs: Vec<Need>) -> ServerSession {
        let mut s = ServerSession(Session {
            phase: Phase::Backup,
            backup: BackupState::default(),
            reads: Reads::default(),
        });
        s.on_recv(&ClientMsg::Entries(vec![
            entry("a", 5 << 20),
            entry("b", 5 << 20),
            entry("c", 5 << 20),
        ]))
        .unwrap();
        s.on_send(&ServerMsg::Needs(needs)).unwrap();
        s
    }

    /// (Long: one fresh session per case, each a few messages.)
    #[test]
    fn a_clone_offer_is_taken_or_declined_once_and_only_when_invited() {
        let need = |index, basis, twin| Need {
            index,
            id: index,
            basis,
            twin,
        };
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, false, false),
        ]);
        // Not invited: refused.
        assert!(s.on_recv(&clone_offer(2)).is_err());
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, false, false),
        ]);
        // Taken: FileOk ends the transfer.
        s.on_recv(&clone_offer(0)).unwrap();
        assert!(s.on_recv(&clone_offer(0)).is_err());
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, true, true),
        ]);
        s.on_recv(&clone_offer(0)).unwrap();
        // No data while the offer is open, and FileRetry is no answer to it.
        let delta = Compressed::compress(b"x", 1).unwrap();
        assert!(s
            .on_recv(&ClientMsg::FileData {
                id: 0,
                delta: delta.clone()
            })
            .is_err());
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, true, true),
        ]);
        s.on_recv(&clone_offer(0)).unwrap();
        assert!(s.on_send(&ServerMsg::FileRetry { id: 0 }).is_err());
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, true, true),
        ]);
        s.on_recv(&clone_offer(0)).unwrap();
        s.on_send(&ServerMsg::FileOk { id: 0 }).unwrap();
        // Declined: data follows, and no second offer.
        s.on_recv(&clone_offer(1)).unwrap();
        assert!(s.on_send(&ServerMsg::SendData { id: 0 }).is_err());
        s.on_send(&ServerMsg::SendData { id: 1 }).unwrap();
        assert!(s.on_recv(&clone_offer(1)).is_err());
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, true, true),
        ]);
        s.on_recv(&clone_offer(1)).unwrap();
        s.on_send(&ServerMsg::SendData { id: 1 }).unwrap();
        s.on_recv(&ClientMsg::FileData {
            id: 1,
            delta: delta.clone(),
        })
        .unwrap();
        // A transfer with a basis (checksum mode) is offered too; declined,
        // it is sent against its basis, whose signature may be asked for once.
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, true, true),
        ]);
        s.on_recv(&clone_offer(2)).unwrap();
        assert!(s.on_recv(&ClientMsg::SigRequest { id: 2 }).is_err());
        s.on_send(&ServerMsg::SendData { id: 2 }).unwrap();
        assert!(s.on_recv(&clone_offer(2)).is_err());
        s.on_recv(&ClientMsg::SigRequest { id: 2 }).unwrap();
        assert!(s.on_recv(&ClientMsg::SigRequest { id: 2 }).is_err());
        // Data closes the invitation.
        let mut s = backup_with(vec![
            need(0, false, true),
            need(1, false, true),
            need(2, true, true),
        ]);
        s.on_recv(&ClientMsg::FileData { id: 0, delta }).unwrap();
        assert!(s.on_recv(&clone_offer(0)).is_err());
    }

    #[test]
    fn a_signature_is_asked_for_once_and_sent_once() {
        let need = |index, basis| Need {
            index,
            id: index,
            basis,
            twin: false,
        };
        let sig = |id| ServerMsg::Signature { id, sig: vec![1] };
        let mut s = backup_with(vec![need(0, true), need(1, false), need(2, true)]);
        // Not asked for: the server may not send it.
        assert!(s.on_send(&sig(0)).is_err());
        // No basis: nothing to ask for.
        assert!(s.on_recv(&ClientMsg::SigRequest { id: 1 }).is_err());
        s.on_recv(&ClientMsg::SigRequest { id: 0 }).unwrap();
        assert!(s.on_recv(&ClientMsg::SigRequest { id: 0 }).is_err());
        s.on_send(&sig(0)).unwrap();
        assert!(s.on_send(&sig(0)).is_err());
        // A retried transfer comes whole: no signature for it.
        s.on_recv(&ClientMsg::FileAbort { id: 2 }).unwrap();
        s.on_send(&ServerMsg::FileRetry { id: 2 }).unwrap();
        assert!(s.on_recv(&ClientMsg::SigRequest { id: 2 }).is_err());
    }
}

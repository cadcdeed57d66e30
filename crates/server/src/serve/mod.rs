//! One protocol session over any pair of byte streams.
//!
//! The same code serves a local client (over a socket pair) and a remote one under
//! sshd: it reads frames from `input`, checks each against the session state,
//! acts, and writes replies to `output`, which carries nothing but the protocol.
//! Requests are dispatched here: `backup.rs` serves a backup, `restore.rs`
//! listings and restores.

mod backup;
mod restore;

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use byteback_protocol::{
    codec::READ_BUFFER, decode_client_frame, read_frame_into, write_msg, ClientMsg, ProtocolError,
    ServerMsg, ServerSession, PROTOCOL_VERSION,
};

use crate::error::{Error, Result};
use crate::store::Store;

/// Which requests a session may make (from the forced command's verb).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Backups and reads.
    Full,
    /// Listing and restoring only.
    ReadOnly,
}

/// Everything a session needs, all from the server's own command line.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Store root.
    pub store: PathBuf,
    /// Host this session files under.
    pub host: String,
    /// Allowed requests.
    pub access: Access,
    /// Clock override for snapshots (tests and simulations).
    pub now: Option<i64>,
    /// Restored file data is compressed where it shrinks (`serve
    /// --no-compress` turns it off for a local client).
    pub compress: bool,
    /// The deadline of the whole session, which a backup starts (the
    /// store's `max_session`) and the connection's ends obey.
    pub clock: crate::timed::SessionClock,
}

struct Conn<R: Read, W: Write> {
    input: BufReader<R>,
    output: BufWriter<W>,
    session: ServerSession,
    /// The last frame read, kept for the next (see `read_frame_into`).
    frame: Vec<u8>,
}

impl<R: Read, W: Write> Conn<R, W> {
    fn recv(&mut self) -> Result<Option<ClientMsg>> {
        if self.input.buffer().is_empty() {
            self.output.flush().map_err(ProtocolError::Io)?;
        }
        let Some(n) = read_frame_into(&mut self.input, &mut self.frame)? else {
            return Ok(None);
        };
        let msg = decode_client_frame(&mut self.frame, n)?;
        self.session.on_recv(&msg)?;
        Ok(Some(msg))
    }

    /// A frame buffer a message took over (see `decode_client_frame`),
    /// back for the next frame, so a large one is not allocated anew.
    fn give_back_frame(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.frame.capacity() {
            self.frame = buf;
        }
    }

    fn send(&mut self, msg: &ServerMsg) -> Result<()> {
        self.session.on_send(msg)?;
        write_msg(&mut self.output, msg)?;
        Ok(())
    }
}

/// Serves one session. Errors are sent to the peer before being returned.
pub fn serve<R: Read, W: Write>(cfg: &ServeConfig, input: R, output: W) -> Result<()> {
    let mut conn = Conn {
        input: BufReader::with_capacity(READ_BUFFER, input),
        output: BufWriter::with_capacity(1 << 20, output),
        session: ServerSession::new(),
        frame: Vec::new(),
    };
    // A panic (a bug) still ends the session with an Error frame, so the
    // client hears why rather than only seeing the connection close.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cfg, &mut conn)))
        .unwrap_or(Err(Error::Internal(
            "a panic in byteback-server (see its log)",
        )));
    if let Err(e) = &result {
        let message: String = e
            .to_string()
            .chars()
            .take(byteback_protocol::limits::MAX_TEXT - 8)
            .collect();
        let _ = write_msg(&mut conn.output, &ServerMsg::Error { message });
        let _ = conn.output.flush();
    }
    conn.output.flush().ok();
    result
}

fn run<R: Read, W: Write>(cfg: &ServeConfig, conn: &mut Conn<R, W>) -> Result<()> {
    match conn.recv()? {
        Some(ClientMsg::Hello { .. }) => {}
        Some(m) => return Err(refused(format!("expected Hello, got {}", m.name()))),
        None => return Ok(()),
    }
    conn.send(&ServerMsg::HelloOk {
        version: PROTOCOL_VERSION,
        host: cfg.host.clone(),
    })?;
    let store = Store::open(&cfg.store)?;
    let mut streamer = None;
    // The host's lock, shared, while the restore reads `current` (see
    // `restore::hold_current`): no backup changes it under the restore.
    let mut holding_current = None;
    // The snapshot (not `current`) the restore reads, locked against prunes.
    let mut reading = None;
    loop {
        let Some(msg) = conn.recv()? else {
            // Closing between requests is fine; inside one, recv already failed.
            return Ok(());
        };
        match msg {
            ClientMsg::BackupStart { checksum } => {
                if cfg.access != Access::Full {
                    return Err(refused("this key may only list and restore"));
                }
                // Its own restore's hold would lock this backup out.
                holding_current = None;
                backup::backup(cfg, &store, conn, checksum)?;
            }
            ClientMsg::ListSnapshots => restore::list_snapshots(cfg, &store, conn)?,
            ClientMsg::ListSnapshotKinds => restore::list_snapshot_kinds(cfg, &store, conn)?,
            ClientMsg::ReadManifest { snapshot } => {
                restore::hold_current(cfg, &store, &snapshot, &mut holding_current)?;
                let snap = restore::reading(cfg, &store, &snapshot, &mut reading)?;
                restore::send_manifest(cfg, &store, conn, &snapshot, snap)?
            }
            ClientMsg::ReadFile { snapshot, path } => {
                restore::hold_current(cfg, &store, &snapshot, &mut holding_current)?;
                let snap = restore::reading(cfg, &store, &snapshot, &mut reading)?;
                let at = (snapshot.as_str(), snap);
                restore::send_stored_file(cfg, &store, conn, &mut streamer, at, &path)?
            }
            ClientMsg::Bye => return Ok(()),
            m => return Err(refused(format!("unexpected {}", m.name()))),
        }
    }
}

/// A request refused.
fn refused(why: impl Into<String>) -> Error {
    Error::Refused(why.into())
}

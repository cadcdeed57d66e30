//! One protocol session over any pair of byte streams.
//!
//! The same code serves a local client (over a socket pair) and a remote one under
//! sshd: it reads frames from `input`, checks each against the session state,
//! acts, and writes replies to `output`, which carries nothing but the protocol.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use byteback_protocol::limits::{MAX_BATCH, MAX_CHUNK};
use byteback_protocol::{
    decode_client, escape_bytes, read_frame, write_msg, ClientMsg, Compressed, ServerMsg,
    ServerSession, SnapshotKind, PROTOCOL_VERSION,
};

use crate::backup::{BackupReceiver, TransferResult};
use crate::config::StoreConfig;
use crate::legacy::{self, LegacyWalk};
use crate::manifest::ManifestReader;
use crate::store::{disk_path, Store, META_DIR, META_DIR_NAME};
use crate::{fsops, time};

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
}

struct Conn<R: Read, W: Write> {
    input: BufReader<R>,
    output: BufWriter<W>,
    session: ServerSession,
}

impl<R: Read, W: Write> Conn<R, W> {
    fn recv(&mut self) -> Result<Option<ClientMsg>> {
        if self.input.buffer().is_empty() {
            self.output.flush()?;
        }
        let Some(frame) = read_frame(&mut self.input)? else {
            return Ok(None);
        };
        let msg = decode_client(&frame)?;
        self.session.on_recv(&msg)?;
        Ok(Some(msg))
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
        input: BufReader::with_capacity(1 << 20, input),
        output: BufWriter::with_capacity(1 << 20, output),
        session: ServerSession::new(),
    };
    // A panic (a bug) still ends the session with an Error frame, so the
    // client hears why rather than only seeing the connection close.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cfg, &mut conn)))
        .unwrap_or_else(|_| Err(anyhow!("internal error in byteback-server (see its log)")));
    if let Err(e) = &result {
        let message: String = format!("{e:#}")
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
        Some(m) => bail!("expected Hello, got {}", m.name()),
        None => return Ok(()),
    }
    conn.send(&ServerMsg::HelloOk {
        version: PROTOCOL_VERSION,
        host: cfg.host.clone(),
    })?;
    let store = Store::open(&cfg.store)?;
    loop {
        let Some(msg) = conn.recv()? else {
            // Closing between requests is fine; inside one, recv already failed.
            return Ok(());
        };
        match msg {
            ClientMsg::BackupStart { checksum } => {
                if cfg.access != Access::Full {
                    bail!("this key may only list and restore");
                }
                if checksum {
                    bail!("checksum mode is not supported by this server");
                }
                backup(cfg, &store, conn)?;
            }
            ClientMsg::ListSnapshots => {
                let names = match store.host(&cfg.host, false) {
                    Ok(h) => h.snapshots()?.into_iter().map(|(n, _)| n).collect(),
                    Err(_) => vec![],
                };
                conn.send(&ServerMsg::Snapshots(names))?;
            }
            ClientMsg::ListSnapshotKinds => {
                let (snapshots, current) = match store.host(&cfg.host, false) {
                    Ok(h) => {
                        let mut out = vec![];
                        for (name, _) in h.snapshots()? {
                            let kind = snapshot_kind(&h.open_snapshot(&name)?)?;
                            out.push((name, kind));
                        }
                        let current = match h.open_snapshot("current") {
                            Ok(fd) => Some(snapshot_kind(&fd)?),
                            Err(_) => None,
                        };
                        (out, current)
                    }
                    Err(_) => (vec![], None),
                };
                conn.send(&ServerMsg::SnapshotKinds { snapshots, current })?;
            }
            ClientMsg::ReadManifest { snapshot } => {
                let host = store.host(&cfg.host, false)?;
                let snap = host.open_snapshot(&snapshot)?;
                if legacy::is_legacy(&snap)? {
                    send_legacy_manifest(conn, snap, &snapshot)?;
                    continue;
                }
                let meta = fsops::open_dir(&snap, META_DIR)?;
                let path = host
                    .path
                    .join(&snapshot)
                    .join(META_DIR_NAME)
                    .join("manifest");
                let mut reader = ManifestReader::new(
                    fsops::open_file(&meta, b"manifest")
                        .with_context(|| format!("cannot open {}", path.display()))?,
                    &path,
                )?;
                let mut part = vec![];
                while let Some(e) = reader.next_entry()? {
                    part.push(e);
                    if part.len() == MAX_BATCH {
                        conn.send(&ServerMsg::ManifestPart(std::mem::take(&mut part)))?;
                    }
                }
                if !part.is_empty() {
                    conn.send(&ServerMsg::ManifestPart(part))?;
                }
                conn.send(&ServerMsg::ManifestEnd)?;
            }
            ClientMsg::ReadFile { snapshot, path } => {
                let host = store.host(&cfg.host, false)?;
                let snap = host.open_snapshot(&snapshot)?;
                // A stored file that cannot be opened or read ends early:
                // the client finds it short, reports it damaged and goes on
                // with the rest of the restore.
                let shown = String::from_utf8_lossy(&path).into_owned();
                // 1.x stored client paths as they are; byteback escapes
                // top-level names starting with `.byteback`.
                let on_disk = if legacy::is_legacy(&snap)? {
                    path.clone()
                } else {
                    disk_path(&path)
                };
                match fsops::open_file(&snap, &on_disk) {
                    Ok(f) => {
                        if let Err(e) = send_file(conn, f) {
                            match e.downcast_ref::<std::io::Error>() {
                                Some(io) => tracing::error!(
                                    "cannot read {shown:?} in {snapshot}: {io}; sent what could be read"
                                ),
                                None => return Err(e),
                            }
                        }
                    }
                    // A path through a symlink or out of the tree is never
                    // a legitimate read: refused, as before.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV)) => {
                        return Err(e)
                            .with_context(|| format!("cannot open {shown:?} in {snapshot}"))
                    }
                    Err(e) => {
                        tracing::error!("cannot open {shown:?} in {snapshot}: {e}")
                    }
                }
                conn.send(&ServerMsg::FileDone)?;
            }
            ClientMsg::Bye => return Ok(()),
            m => bail!("unexpected {}", m.name()),
        }
    }
}

/// The kind of the snapshot (or `current`) open at `snap`.
fn snapshot_kind(snap: &std::os::fd::OwnedFd) -> Result<SnapshotKind> {
    Ok(if legacy::is_legacy(snap)? {
        SnapshotKind::Legacy1x
    } else {
        SnapshotKind::Byteback
    })
}

/// Streams the entries of a 1.x snapshot, derived from its tree (see
/// [`legacy`]), as a manifest; rsync ACL xattrs it cannot apply are named
/// in a warning.
fn send_legacy_manifest<R: Read, W: Write>(
    conn: &mut Conn<R, W>,
    snap: std::os::fd::OwnedFd,
    snapshot: &str,
) -> Result<()> {
    let mut walk = LegacyWalk::new(snap).with_context(|| format!("1.x snapshot {snapshot}"))?;
    let mut part = vec![];
    while let Some(e) = walk
        .next_entry()
        .with_context(|| format!("1.x snapshot {snapshot}"))?
    {
        part.push(e);
        if part.len() == MAX_BATCH {
            conn.send(&ServerMsg::ManifestPart(std::mem::take(&mut part)))?;
        }
    }
    if !part.is_empty() {
        conn.send(&ServerMsg::ManifestPart(part))?;
    }
    conn.send(&ServerMsg::ManifestEnd)?;
    if walk.unsupported_count > 0 {
        let named: Vec<String> = walk
            .unsupported
            .iter()
            .map(|(p, n)| format!("/{} ({})", escape_bytes(p), escape_bytes(n)))
            .collect();
        eprintln!(
            "byteback-server: warning: 1.x snapshot {snapshot}: {} entries carry rsync ACL xattrs that are NOT restored (rsync's own ACL format is not supported): {}{}",
            walk.unsupported_count,
            named.join(", "),
            if walk.unsupported_count as usize > named.len() { ", ..." } else { "" }
        );
    }
    Ok(())
}

/// Streams a stored file's content as `FilePart`s; a read error comes back
/// as an `io::Error` (what was read by then has been sent).
fn send_file<R: Read, W: Write>(conn: &mut Conn<R, W>, f: std::fs::File) -> Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = vec![0u8; (1 << 20).min(MAX_CHUNK)];
    loop {
        let n = read_full(&mut r, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.send(&ServerMsg::FilePart(Compressed::compress(&buf[..n], 1)?))?;
        if r.fill_buf()?.is_empty() {
            return Ok(());
        }
    }
}

/// Reads up to `buf.len()` bytes, fewer only at the end of `r`.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn backup<R: Read, W: Write>(
    cfg: &ServeConfig,
    store: &Store,
    conn: &mut Conn<R, W>,
) -> Result<()> {
    let config = StoreConfig::load(&cfg.store)?;
    let host = store.host(&cfg.host, true)?;
    let _lock = host.lock()?;
    let mut rx = BackupReceiver::new(&host)?;
    if let Some(note) = rx.clean_leftovers_if_short(config.minpercent)? {
        eprintln!("byteback-server: {note}");
    }
    conn.send(&ServerMsg::BackupReady)?;
    let received = receive(cfg, store, conn, &host, &config, &mut rx);
    if let Err(e) = received {
        if rx.manifest_damaged() {
            return Err(match rx.set_aside_manifest() {
                Ok(()) => e.context(
                    "the manifest of current was set aside; the next backup recovers one from the newest snapshot",
                ),
                Err(e2) => e.context(format!("and the damaged manifest could not be set aside: {e2:#}")),
            });
        }
        return Err(e);
    }
    Ok(())
}

/// The message loop of one backup, until the snapshot is taken.
fn receive<R: Read, W: Write>(
    cfg: &ServeConfig,
    store: &Store,
    conn: &mut Conn<R, W>,
    host: &crate::store::HostStore,
    config: &StoreConfig,
    rx: &mut BackupReceiver,
) -> Result<()> {
    loop {
        let msg = conn
            .recv()?
            .ok_or_else(|| anyhow!("client went away in the middle of a backup"))?;
        match msg {
            ClientMsg::Entries(entries) => {
                let needs = rx.entries(entries)?;
                conn.send(&ServerMsg::Needs(needs))?;
            }
            ClientMsg::SigRequest { id } => {
                let name = rx.transfer_name(id);
                let sig = rx
                    .signature(id)
                    .with_context(|| format!("reading the stored copy of {name}"))?;
                conn.send(&ServerMsg::Signature { id, sig })?;
            }
            ClientMsg::FileData { id, delta } => {
                let name = rx.transfer_name(id);
                rx.data(id, &delta)
                    .with_context(|| format!("writing {name}"))?;
            }
            ClientMsg::FileEnd {
                id,
                size,
                hash,
                mtime_sec,
                mtime_nsec,
            } => {
                let name = rx.transfer_name(id);
                let ended = rx
                    .end(id, size, hash, (mtime_sec, mtime_nsec))
                    .with_context(|| format!("finishing {name}"))?;
                match ended {
                    TransferResult::Done => conn.send(&ServerMsg::FileOk { id })?,
                    TransferResult::Retry => conn.send(&ServerMsg::FileRetry { id })?,
                    TransferResult::NoSpace { path, need } => {
                        rx.note_no_space()?;
                        // Rebuilds kept from interrupted runs go first.
                        let freed = rx.drop_idle_partials()?;
                        if freed > 0 {
                            eprintln!("byteback-server: no space left on device writing {path:?}: removed {freed} bytes of interrupted transfers' partial copies");
                        }
                        let now = cfg.now.unwrap_or_else(time::now);
                        crate::pruner::make_room(store, config, now, need, &path)?;
                        conn.send(&ServerMsg::FileRetry { id })?;
                    }
                }
            }
            ClientMsg::FileClone {
                id,
                size,
                hash,
                mtime_sec,
                mtime_nsec,
            } => {
                let name = rx.transfer_name(id);
                let cloned = rx
                    .offer(id, size, hash, (mtime_sec, mtime_nsec))
                    .with_context(|| format!("cloning a stored copy for {name}"))?;
                if cloned {
                    conn.send(&ServerMsg::FileOk { id })?;
                } else {
                    conn.send(&ServerMsg::SendData { id })?;
                }
            }
            ClientMsg::FileAbort { id } => {
                let name = rx.transfer_name(id);
                rx.abort(id)
                    .with_context(|| format!("giving up on {name}"))?;
                conn.send(&ServerMsg::FileOk { id })?;
            }
            ClientMsg::BackupEnd => {
                let warnings = std::mem::take(&mut rx.warnings);
                let stats = rx.commit()?;
                let now = cfg.now.unwrap_or_else(time::now);
                let (snapshot, mut message) =
                    match host.snapshot(now, config.min_snapshot_interval)? {
                        Ok(name) => (Some(name), String::new()),
                        Err(why) => (None, why),
                    };
                for w in warnings {
                    tracing::warn!("{w}");
                    if message.len() < 2048 {
                        message.push_str(&format!("\nwarning: {w}"));
                    }
                }
                let new_bytes = stats.literal_bytes;
                // The snapshot is taken: a client gone by now must not cost
                // the usage line and the prune, so a failed send only logs.
                let told = conn
                    .send(&ServerMsg::BackupDone {
                        snapshot: snapshot.clone(),
                        message,
                        stats,
                    })
                    .and_then(|()| conn.output.flush().map_err(Into::into));
                if let Err(e) = told {
                    tracing::error!("the client went away before hearing the result: {e:#}");
                }
                // Usage and pruning only log on failure.
                let space = crate::space::measure(store.fd()).ok();
                if let Err(e) = crate::pruner::record_backup(
                    host,
                    now,
                    new_bytes,
                    snapshot.as_deref(),
                    space.as_ref(),
                ) {
                    tracing::error!("cannot record usage: {e:#}");
                }
                if snapshot.is_some() {
                    crate::pruner::after_snapshot(store, config, now);
                }
                return Ok(());
            }
            m => bail!("unexpected {} during a backup", m.name()),
        }
    }
}

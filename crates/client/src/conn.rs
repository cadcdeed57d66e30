//! A protocol connection to a `byteback-server`, over whatever carries bytes.
//!
//! For a local store the server is spawned as a child over pipes; SSH gives
//! the same pair of streams. Every message goes through the client session
//! state, so a confused or hostile server is caught at the first odd message.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use byteback_protocol::{
    decode_server, escape_text, read_frame, validate_host_name, write_msg, ClientMsg,
    ClientSession, ServerMsg, MAGIC, PROTOCOL_VERSION,
};

use crate::ssh::{self, Auth, Request, SshOptions, SshSession, SshTarget};

/// Where backups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A store directory on this machine.
    Local(PathBuf),
    /// `user@host:` over SSH.
    Ssh {
        /// Login name.
        user: Option<String>,
        /// Server host.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Destination {
    /// Parses `user@host:`, `host:`, `ssh://user@host:port/` or a local path.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("ssh://") {
            let rest = rest.trim_end_matches('/');
            let (user, hostport) = match rest.rsplit_once('@') {
                Some((u, h)) => (Some(u.to_string()), h),
                None => (None, rest),
            };
            let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
                let (h, p) = h
                    .split_once(']')
                    .ok_or_else(|| anyhow!("bad IPv6 address in {s:?}"))?;
                (
                    h.to_string(),
                    p.strip_prefix(':')
                        .map(str::parse)
                        .transpose()?
                        .unwrap_or(22),
                )
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (
                        h.to_string(),
                        p.parse().with_context(|| format!("bad port in {s:?}"))?,
                    ),
                    None => (hostport.to_string(), 22),
                }
            };
            return Ok(Destination::Ssh { user, host, port });
        }
        // 1.x style: user@host:[path]; a path with a slash before any colon is local.
        match s.find(':') {
            Some(i) if !s[..i].contains('/') && i > 0 => {
                let hostpart = &s[..i];
                let (user, host) = match hostpart.rsplit_once('@') {
                    Some((u, h)) => (Some(u.to_string()), h.to_string()),
                    None => (None, hostpart.to_string()),
                };
                Ok(Destination::Ssh {
                    user,
                    host,
                    port: 22,
                })
            }
            _ => Ok(Destination::Local(PathBuf::from(s))),
        }
    }
}

/// Finds the `byteback-server` binary: `$BYTEBACK_SERVER`, beside this executable, or on `PATH`.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BYTEBACK_SERVER") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let p = dir.join("byteback-server");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("byteback-server")
}

/// Reading half of a connection.
pub struct ConnReader {
    r: BufReader<Box<dyn Read + Send>>,
    session: Arc<Mutex<ClientSession>>,
}

/// Writing half of a connection.
pub struct ConnWriter {
    w: BufWriter<Box<dyn Write + Send>>,
    session: Arc<Mutex<ClientSession>>,
}

impl ConnReader {
    /// Receives one message; a server `Error` becomes an error here.
    pub fn recv(&mut self) -> Result<ServerMsg> {
        let frame =
            read_frame(&mut self.r)?.ok_or_else(|| anyhow!("the server closed the connection"))?;
        let msg = decode_server(&frame)?;
        self.session
            .lock()
            .map_err(|_| anyhow!("session lock poisoned"))?
            .on_recv(&msg)?;
        if let ServerMsg::Error { message } = &msg {
            // The server chose these bytes: never let them reach a terminal raw.
            bail!("server: {}", escape_text(message));
        }
        Ok(msg)
    }
}

impl ConnWriter {
    /// Queues one message (buffered).
    pub fn send(&mut self, msg: &ClientMsg) -> Result<()> {
        self.session
            .lock()
            .map_err(|_| anyhow!("session lock poisoned"))?
            .on_send(msg)?;
        write_msg(&mut self.w, msg).context("cannot write to the server")?;
        Ok(())
    }

    /// Pushes buffered messages out.
    pub fn flush(&mut self) -> Result<()> {
        self.w.flush().context("cannot write to the server")
    }

    /// Shared session state (for flow control).
    pub fn session(&self) -> Arc<Mutex<ClientSession>> {
        self.session.clone()
    }
}

/// What carries a connection's bytes, kept so it can be waited for or torn down.
pub enum Transport {
    /// Nothing to wait for (tests over in-memory streams).
    None,
    /// A `byteback-server` child over pipes.
    Child(Child),
    /// An SSH session; the socket is a second handle on the one the streams use.
    Ssh(UnixStream, SshSession),
}

impl Transport {
    /// Tears the transport down after a failure, so blocked readers wake up.
    pub fn abort(self) {
        match self {
            Transport::None => {}
            Transport::Child(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Transport::Ssh(sock, _session) => {
                // Not joined: a server that is slow to notice would hold us
                // up, and the thread ends by itself when the channel closes.
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
    }

    /// Waits for the server side to finish after a clean goodbye.
    pub fn finish(self) -> Result<()> {
        match self {
            Transport::None => Ok(()),
            Transport::Child(mut c) => {
                let st = c.wait()?;
                if !st.success() {
                    bail!("byteback-server exited with {st}");
                }
                Ok(())
            }
            Transport::Ssh(sock, session) => {
                let _ = sock.shutdown(Shutdown::Write);
                match session.wait()? {
                    Some(0) | None => Ok(()),
                    Some(n) => bail!("byteback-server exited with status {n}"),
                }
            }
        }
    }
}

/// Writes to a socket and shuts its write side down when dropped, so the
/// peer sees end-of-file even while a cloned handle is still open for reading.
struct SocketWriter(UnixStream);

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for SocketWriter {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Write);
    }
}

/// A connection to a server, after the handshake.
pub struct Connection {
    /// Reading half.
    pub reader: ConnReader,
    /// Writing half.
    pub writer: ConnWriter,
    /// The host name the server files us under.
    pub host: String,
    transport: Transport,
}

impl Connection {
    /// Spawns `byteback-server serve` for a local store over pipes.
    pub fn open_local(store: &Path, host: &str) -> Result<Self> {
        std::fs::create_dir_all(store)
            .with_context(|| format!("cannot create store {}", store.display()))?;
        let bin = server_binary();
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--host")
            .arg(host)
            .arg("--store")
            .arg(store)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin pipe"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        Self::handshake(Box::new(stdout), Box::new(stdin), Transport::Child(child))
    }

    /// Logs in over SSH and runs the server's `verb` (the key's forced command
    /// decides the real command line; the verb only narrows what it allows).
    pub fn open_ssh(target: &SshTarget, key: &Path, opts: &SshOptions, verb: &str) -> Result<Self> {
        let stream = ssh::open(
            target,
            &Auth::Key(key.to_path_buf()),
            opts,
            Request::Exec(verb.to_string()),
        )?;
        let (socket, session) = stream.into_parts();
        let read = socket.try_clone()?;
        let write = socket.try_clone()?;
        Self::handshake(
            Box::new(read),
            Box::new(SocketWriter(write)),
            Transport::Ssh(socket, session),
        )
        .with_context(|| format!("byteback-server at {target}"))
    }

    /// Runs the handshake over any pair of streams.
    pub fn handshake(
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        transport: Transport,
    ) -> Result<Self> {
        let session = Arc::new(Mutex::new(ClientSession::new()));
        let mut reader = ConnReader {
            r: BufReader::with_capacity(1 << 20, r),
            session: session.clone(),
        };
        let mut writer = ConnWriter {
            w: BufWriter::with_capacity(1 << 20, w),
            session,
        };
        writer.send(&ClientMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        })?;
        writer.flush()?;
        match reader.recv()? {
            ServerMsg::HelloOk { host, .. } => {
                // The name is printed and used in paths: a server must not
                // be able to send anything but a valid host name.
                if validate_host_name(&host).is_err() {
                    bail!(
                        "the server sent an invalid host name {:?}; refusing the connection",
                        escape_text(&host.chars().take(300).collect::<String>())
                    );
                }
                Ok(Connection {
                    reader,
                    writer,
                    host,
                    transport,
                })
            }
            m => bail!("unexpected {} in handshake", m.name()),
        }
    }

    /// Sends and flushes.
    pub fn send(&mut self, msg: &ClientMsg) -> Result<()> {
        self.writer.send(msg)?;
        self.writer.flush()
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<ServerMsg> {
        self.reader.recv()
    }

    /// Says goodbye and waits for a spawned server.
    pub fn close(mut self) -> Result<()> {
        let _ = self.send(&ClientMsg::Bye);
        drop(self.writer);
        drop(self.reader);
        self.transport.finish()
    }

    /// Takes the transport (so the caller can wait for it after splitting).
    pub fn take_transport(&mut self) -> Transport {
        std::mem::replace(&mut self.transport, Transport::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the client's handshake against canned server messages.
    fn handshake_with(replies: &[ServerMsg]) -> Result<Connection> {
        let mut bytes = vec![];
        for m in replies {
            bytes.extend(byteback_protocol::encode(m).unwrap());
        }
        Connection::handshake(
            Box::new(std::io::Cursor::new(bytes)),
            Box::new(std::io::sink()),
            Transport::None,
        )
    }

    fn hello(host: &str) -> ServerMsg {
        ServerMsg::HelloOk {
            version: PROTOCOL_VERSION,
            host: host.into(),
        }
    }

    #[test]
    fn the_server_names_a_valid_host() {
        let conn = handshake_with(&[hello("web1.example.com")]).unwrap();
        assert_eq!(conn.host, "web1.example.com");
        for bad in [
            "../evil",
            "",
            ".ssh",
            "byteback.toml",
            "-rf",
            "a/b",
            "x\x1b[2Jy",
        ] {
            let Err(e) = handshake_with(&[hello(bad)]) else {
                panic!("{bad:?} was accepted");
            };
            let msg = format!("{e:#}");
            assert!(msg.contains("invalid host name"), "{bad:?}: {msg}");
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
        }
    }

    #[test]
    fn server_errors_are_escaped() {
        let Err(e) = handshake_with(&[ServerMsg::Error {
            message: "\x1b]0;owned\x07\x1b[2Jbad\nthing \u{9b}".into(),
        }]) else {
            panic!("an error was accepted");
        };
        let msg = format!("{e:#}");
        assert!(
            msg.contains("server: \\x1b]0;owned\\x07\\x1b[2Jbad\\x0athing \\x9b"),
            "{msg}"
        );
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
    }

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("byteback@backup.example.com:").unwrap(),
            Destination::Ssh {
                user: Some("byteback".into()),
                host: "backup.example.com".into(),
                port: 22
            }
        );
        assert_eq!(
            Destination::parse("ssh://bb@[::1]:2222/").unwrap(),
            Destination::Ssh {
                user: Some("bb".into()),
                host: "::1".into(),
                port: 2222
            }
        );
        assert_eq!(
            Destination::parse("/srv/store").unwrap(),
            Destination::Local("/srv/store".into())
        );
        assert_eq!(
            Destination::parse("./a:b").unwrap(),
            Destination::Local("./a:b".into())
        );
    }
}

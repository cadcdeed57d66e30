//! A protocol connection to a `byteback-server`, over whatever carries bytes.
//!
//! For a local store the server is spawned as a child whose stdin and stdout
//! are one end of a socket pair; SSH gives the same kind of stream. Every
//! message goes through the client session state, so a confused or hostile
//! server is caught at the first odd message. A [`Breaker`] shuts our end
//! down from any thread, so that a failed backup never leaves a read or a
//! write blocked.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{bail, err, Context, Error, IoContext, Result};
use byteback_protocol::{
    codec::READ_BUFFER, decode_server_frame, escape_text, read_frame_into, validate_host_name,
    write_client_msg, ClientMsg, ClientSession, ServerMsg, MAGIC, PROTOCOL_VERSION,
};

use crate::ssh::{self, Auth, Request, SshAbort, SshOptions, SshSession, SshTarget};
use crate::sync::lock;

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
                    .ok_or_else(|| err!("bad IPv6 address in {s:?}"))?;
                let port = match p {
                    "" => 22,
                    _ => p
                        .strip_prefix(':')
                        .ok_or_else(|| err!("{p:?} after the IPv6 address in {s:?}"))?
                        .parse::<u16>()
                        .map_err(|e| err!("bad port in {s:?}: {e}"))?,
                };
                (h.to_string(), port)
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (
                        h.to_string(),
                        p.parse().map_err(|e| err!("bad port in {s:?}: {e}"))?,
                    ),
                    None => (hostport.to_string(), 22),
                }
            };
            if host.is_empty() {
                return Err(err!("no host name in the destination {s:?}"));
            }
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
                if host.is_empty() {
                    return Err(err!("no host name in the destination {s:?}"));
                }
                Ok(Destination::Ssh {
                    user,
                    host,
                    port: 22,
                })
            }
            // A store on this machine is named by a path with a slash in
            // front: `backupserver` or `bb@backupserver` (a forgotten colon)
            // would otherwise be a directory in the current one (`/` under
            // the timer), filled every night while the server got nothing.
            _ if s == "." || s == ".." || ["/", "./", "../"].iter().any(|p| s.starts_with(p)) => {
                Ok(Destination::Local(PathBuf::from(s)))
            }
            _ => Err(err!(
                "destination {s:?} is neither a server (`user@host:`, with the colon, or \
                 `ssh://user@host:port/`) nor a local store (an absolute path, or a relative \
                 one starting with `./` or `../`)"
            )),
        }
    }
}

/// The path part of a 1.x-style `user@host:/path` destination, which
/// byteback does not use (the server's forced command names its store),
/// if there is one.
pub fn ignored_path(s: &str) -> Option<&str> {
    if s.starts_with("ssh://") {
        return None;
    }
    match s.find(':') {
        Some(i) if !s[..i].contains('/') && i > 0 => Some(&s[i + 1..]).filter(|p| !p.is_empty()),
        _ => None,
    }
}

/// Bytes one end of a socket pair (to a local store's server, or to the
/// SSH thread) may have sent and the other not yet read.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Lets `sock` hold [`SOCKET_BUFFER`] bytes unread by its peer, beyond
/// `net.core.wmem_max` where we may (`SO_SNDBUFFORCE`, root), else up to it.
/// With the default 208 KiB, a server streaming a restore stopped whenever
/// the client wrote a MiB to disc, and the client waited on the server's
/// next read: a quarter of the two cores stood idle in a restore of large
/// files.
pub(crate) fn widen_socket(sock: &UnixStream) {
    let fd = sock.as_raw_fd();
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on a socket we own, with an int of the size given.
        let ok = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        if ok {
            return;
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
    /// The last frame read, kept for the next (see `read_frame_into`).
    frame: Vec<u8>,
    /// Frame buffers given back while `frame` had one (see [`Self::give_back`]).
    spare: Vec<Vec<u8>>,
}

/// Frame buffers a [`ConnReader`] keeps beyond the one it reads into: as
/// many as a restore has in flight (parts queued for its writer thread)...
const SPARE_FRAMES: usize = 8;

/// ...each of the size of the server's data parts (a MiB and a header);
/// larger ones (a hostile server's) are not kept.
const SPARE_FRAME_MAX: usize = 2 << 20;

/// Writing half of a connection.
pub struct ConnWriter {
    w: BufWriter<Box<dyn Write + Send>>,
    session: Arc<Mutex<ClientSession>>,
}

impl ConnReader {
    /// Receives one message; a server `Error` becomes an error here.
    pub fn recv(&mut self) -> Result<ServerMsg> {
        let n = read_frame_into(&mut self.r, &mut self.frame)
            .map_err(|cause| Error::Connection {
                op: "cannot read from the server",
                cause,
            })?
            .ok_or(Error::Closed)?;
        let msg = decode_server_frame(&mut self.frame, n)?;
        if self.frame.capacity() == 0 {
            if let Some(buf) = self.spare.pop() {
                self.frame = buf; // the message took the last one over
            }
        }
        lock(&self.session).on_recv(&msg)?;
        if let ServerMsg::Error { message } = msg {
            // The server chose these bytes: never let them reach a terminal raw.
            return Err(Error::Server(escape_text(&message)));
        }
        Ok(msg)
    }

    /// A frame buffer a message took over (see `decode_server_frame`),
    /// back for a next frame, so a large one is not allocated (and zeroed)
    /// anew.
    pub fn give_back(&mut self, buf: Vec<u8>) {
        if self.frame.capacity() == 0 {
            self.frame = buf;
        } else if self.spare.len() < SPARE_FRAMES && buf.capacity() <= SPARE_FRAME_MAX {
            self.spare.push(buf);
        }
    }
}

impl ConnWriter {
    /// Queues one message (buffered).
    pub fn send(&mut self, msg: &ClientMsg) -> Result<()> {
        lock(&self.session).on_send(msg)?;
        write_client_msg(&mut self.w, msg).map_err(|cause| Error::Connection {
            op: "cannot write to the server",
            cause,
        })?;
        Ok(())
    }

    /// Pushes buffered messages out.
    pub fn flush(&mut self) -> Result<()> {
        self.w.flush().map_err(|e| Error::Connection {
            op: "cannot write to the server",
            cause: e.into(),
        })
    }
}

/// How long tearing a transport down waits for the server (or the SSH
/// session) to end before going on without it.
const ABORT_WAIT: Duration = Duration::from_secs(5);
/// How long a client waits over SSH for the server to end after a backup
/// it committed (see [`Transport::finish_after_commit`]), or after the
/// goodbye of a restore or a listing (see [`Transport::finish`]).
const POST_COMMIT_WAIT: Duration = Duration::from_secs(60);
/// [`POST_COMMIT_WAIT`]; in a debug build, for the tests,
/// `$BYTEBACK_TEST_POST_COMMIT_WAIT_SECS` if set.
fn post_commit_wait() -> std::time::Duration {
    crate::test_knob("BYTEBACK_TEST_POST_COMMIT_WAIT_SECS", POST_COMMIT_WAIT)
}

/// How long a server whose connection was torn down has to end by itself
/// before it is killed.
const GRACE: Duration = Duration::from_secs(2);

/// Tears a transport down from any thread: every read and write blocked on
/// it returns at once (reads see the end, writes fail). Cheap to clone;
/// tripping it again does nothing more.
#[derive(Clone, Default)]
pub struct Breaker {
    socket: Option<Arc<UnixStream>>,
    ssh: Option<SshAbort>,
}

impl Breaker {
    /// Shuts our end of the connection down both ways (and stops an SSH session).
    pub fn trip(&self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = &self.ssh {
            a.abort();
        }
    }
}

/// Longest a server may take to answer the handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(120);
/// [`HANDSHAKE_LIMIT`]; in a debug build, for the tests,
/// `$BYTEBACK_TEST_HANDSHAKE_LIMIT_SECS` if set.
pub(crate) fn handshake_limit() -> std::time::Duration {
    crate::test_knob("BYTEBACK_TEST_HANDSHAKE_LIMIT_SECS", HANDSHAKE_LIMIT)
}

/// Trips a [`Breaker`] once a time limit passes, unless dropped before.
pub(crate) struct Deadline {
    /// (done, tripped): done is set when dropped, tripped by the watcher.
    state: Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>,
}

impl Deadline {
    pub(crate) fn start(limit: Duration, breaker: Breaker) -> Deadline {
        let state = Arc::new((Mutex::new((false, false)), std::sync::Condvar::new()));
        let watch = state.clone();
        std::thread::spawn(move || {
            let (lock, cv) = &*watch;
            let guard = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (mut guard, _) = cv
                .wait_timeout_while(guard, limit, |(done, _)| !*done)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !guard.0 {
                guard.1 = true;
                breaker.trip();
            }
        });
        Deadline { state }
    }

    /// Whether the limit passed (and the breaker was tripped).
    pub(crate) fn passed(&self) -> bool {
        self.state
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0 = true;
        cv.notify_all();
    }
}

/// What carries a connection's bytes, kept so it can be waited for or torn down.
pub enum Transport {
    /// Nothing to wait for (tests over in-memory streams).
    None,
    /// A `byteback-server` child whose stdin and stdout are one end of a
    /// socket pair; the socket is a handle on our end.
    Child(Child, Arc<UnixStream>),
    /// An SSH session; the socket is a second handle on the one the streams use.
    Ssh(Arc<UnixStream>, SshSession),
}

impl Transport {
    /// A handle that tears this transport down from any thread.
    pub fn breaker(&self) -> Breaker {
        match self {
            Transport::None => Breaker::default(),
            Transport::Child(_, sock) => Breaker {
                socket: Some(sock.clone()),
                ssh: None,
            },
            Transport::Ssh(sock, session) => Breaker {
                socket: Some(sock.clone()),
                ssh: Some(session.aborter()),
            },
        }
    }

    /// Tears the transport down after a failure: blocked reads and writes
    /// return; a spawned server is given a moment to end by itself, then
    /// killed, and reaped; an SSH session is stopped. Waits at most a few
    /// seconds in all. Returns how the server ended if that is news (a local
    /// server was killed by a signal).
    pub fn abort(self) -> Option<String> {
        self.breaker().trip();
        match self {
            Transport::None => None,
            Transport::Child(mut c, _) => {
                // The server sees the connection end and stops by itself (it
                // cleans up and logs why); one that does not is killed.
                if wait_child(&mut c, GRACE) {
                    drain_relayed();
                    // Killed by a signal, and not by us: worth saying. (An
                    // exit status says less: it stopped after an error it
                    // reported, or because we went away.)
                    use std::os::unix::process::ExitStatusExt;
                    return match c.try_wait() {
                        Ok(Some(st)) if st.signal().is_some() => {
                            Some(format!("byteback-server {}", describe_exit(st)))
                        }
                        _ => None,
                    };
                }
                let _ = c.kill();
                // A server stuck in the kernel (a long sync) may take a moment to go.
                if !wait_child(&mut c, ABORT_WAIT) {
                    tracing::warn!(
                        "byteback-server (pid {}) has not ended {} s after being killed",
                        c.id(),
                        ABORT_WAIT.as_secs()
                    );
                } else {
                    drain_relayed();
                }
                None
            }
            Transport::Ssh(_, session) => {
                // The session ends within a fraction of a second of its abort
                // (it reports a killed server itself).
                match session.wait_for(ABORT_WAIT) {
                    None => {
                        tracing::warn!(
                            "the SSH session has not ended {} s after being stopped",
                            ABORT_WAIT.as_secs()
                        );
                        None
                    }
                    // The session ended on its own first (`--io-timeout`, a
                    // lost connection): that is why the stream ended.
                    Some(Err(e)) if !matches!(e.innermost(), Error::Aborted) => {
                        Some(format!("{e:#}"))
                    }
                    Some(_) => None,
                }
            }
        }
    }

    /// Waits for the server side to finish after a backup it committed
    /// (its snapshot is taken; it may still be pruning). A local server is
    /// waited for; over SSH at most [`POST_COMMIT_WAIT`], so a server that
    /// keeps the session open cannot hold the client (and its post-backup
    /// hooks) until `--io-timeout`. What goes wrong here is for a warning:
    /// the backup is done.
    pub fn finish_after_commit(self) -> Result<()> {
        match self {
            Transport::Ssh(sock, session) => {
                let _ = sock.shutdown(Shutdown::Write);
                let limit = post_commit_wait();
                match session.wait_for(limit) {
                    None => bail!(
                        "the server had not ended {} s after the backup (still pruning?); not waiting for it",
                        limit.as_secs()
                    ),
                    Some(r) => match r? {
                        Some(0) | None => Ok(()),
                        Some(n) => bail!("byteback-server exited with status {n}"),
                    },
                }
            }
            Transport::Child(mut c, _) => {
                let limit = post_commit_wait();
                if !wait_child_unless_stopped(&mut c, limit) {
                    bail!(
                        "the server (pid {}) had not ended {} s after the backup (still pruning?); not waiting for it",
                        c.id(),
                        limit.as_secs()
                    );
                }
                child_status(&mut c)
            }
            t => t.finish(),
        }
    }

    /// Waits for the server side to finish after a clean goodbye.
    pub fn finish(self) -> Result<()> {
        match self {
            Transport::None => Ok(()),
            Transport::Child(mut c, _) => {
                // Everything asked for has come: a server that does not
                // end must not hold us (it goes on by itself).
                let limit = post_commit_wait();
                if !wait_child_unless_stopped(&mut c, limit) {
                    tracing::warn!(
                        "the server (pid {}) had not ended {} s after the session; not waiting for it",
                        c.id(),
                        limit.as_secs()
                    );
                    return Ok(());
                }
                child_status(&mut c)
            }
            Transport::Ssh(sock, session) => {
                let _ = sock.shutdown(Shutdown::Write);
                // Everything asked for has come: a server that does not
                // end (or only writes to its stderr) must not hold us.
                let limit = post_commit_wait();
                match session.wait_for(limit) {
                    None => {
                        tracing::warn!(
                            "the server had not ended {} s after the session; not waiting for it",
                            limit.as_secs()
                        );
                        Ok(())
                    }
                    Some(r) => match r? {
                        Some(0) | None => Ok(()),
                        Some(n) => bail!("byteback-server exited with status {n}"),
                    },
                }
            }
        }
    }
}

/// The status of a server that has ended, with its last lines relayed.
fn child_status(c: &mut Child) -> Result<()> {
    let st = c
        .wait()
        .map_err(|e| err!("cannot wait for byteback-server: {e}"))?;
    drain_relayed();
    if !st.success() {
        bail!("byteback-server {}", describe_exit(st));
    }
    Ok(())
}

/// Waits at most `limit` for a child to end; true if it has (or cannot be waited for).
fn wait_child(c: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match c.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// [`wait_child`] for the end of a session, which a stop by a signal (see
/// `stop`) cuts short, as it does over SSH: false then too.
fn wait_child_unless_stopped(c: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if crate::stop::stopped().is_some() {
            return false;
        }
        if wait_child(c, Duration::from_millis(100).min(limit)) {
            return true;
        }
    }
    false
}

/// Adds how the server ended, when it had, to an error it caused.
pub fn with_exit(e: Error, how: Option<String>) -> Error {
    match how {
        Some(how) => e.context_after(how),
        None => e,
    }
}

/// "exited with status 1", "was killed by signal 9 (SIGKILL)".
pub(crate) fn describe_exit(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(n), _) => format!("exited with status {n}"),
        (None, Some(9)) => "was killed by signal 9 (SIGKILL)".to_string(),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("ended with {st}"),
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

/// One end of a local server's socket pair with `--io-timeout`: when no
/// data has moved either way for that long, a blocked read or write fails
/// with an error naming the cause, so a silent (stopped, stuck) server never
/// leaves the client waiting for good. Both halves share the clock of the
/// last progress (a server taking a long file without a word is fine).
struct Timed {
    s: UnixStream,
    timeout: Duration,
    /// (base, milliseconds after it of the last progress either way).
    last: Arc<(Instant, AtomicU64)>,
}

impl Timed {
    fn pair(s: &UnixStream, timeout: Duration) -> std::io::Result<(Timed, Timed)> {
        // Blocked calls wake this often to look at the shared clock.
        let tick = (timeout / 4).max(Duration::from_millis(250));
        let last = Arc::new((Instant::now(), AtomicU64::new(0)));
        let half = || -> std::io::Result<Timed> {
            let s = s.try_clone()?;
            s.set_read_timeout(Some(tick))?;
            s.set_write_timeout(Some(tick))?;
            Ok(Timed {
                s,
                timeout,
                last: last.clone(),
            })
        };
        Ok((half()?, half()?))
    }

    fn progress(&self) {
        let ms = self.last.0.elapsed().as_millis() as u64;
        self.last.1.store(ms, Ordering::Relaxed);
    }

    /// Retries a call that timed out while data moved recently; fails once
    /// nothing has moved for the whole timeout.
    fn io(
        &mut self,
        what: &str,
        mut call: impl FnMut(&mut UnixStream) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        loop {
            match call(&mut self.s) {
                Ok(n) => {
                    self.progress();
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    let idle =
                        self.last.0.elapsed().saturating_sub(Duration::from_millis(
                            self.last.1.load(Ordering::Relaxed),
                        ));
                    if idle >= self.timeout {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "byteback-server {what}: no data moved for {} s (--io-timeout); giving up",
                                self.timeout.as_secs()
                            ),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.io("went silent", |s| s.read(buf))
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.io("stopped taking data", |s| s.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The writing half: shuts the socket's write side down when dropped, so
/// the server sees the end even while the reading half is still open.
struct TimedWriter(Timed);

impl Write for TimedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TimedWriter {
    fn drop(&mut self) {
        let _ = self.0.s.shutdown(Shutdown::Write);
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
    /// Spawns `byteback-server serve` for a local store over a socket pair.
    ///
    /// Only a backup (`create`) makes a missing store; listing and restoring
    /// from a store that does not exist is an error, so a typo creates nothing.
    /// Reads and writes that make no progress for `io_timeout` fail.
    pub fn open_local(
        store: &Path,
        host: &str,
        create: bool,
        io_timeout: Duration,
    ) -> Result<Self> {
        if create {
            std::fs::create_dir_all(store).on("cannot create store", store)?;
        } else if !store.is_dir() {
            return Err(Error::Usage(format!(
                "no store at {} (is --destination right?)",
                store.display()
            )));
        }
        let bin = server_binary();
        // A socket pair rather than two pipes: shutting our end down wakes
        // every blocked read and write at once, whoever else holds the other
        // end (a wrapper script's children too), as over SSH.
        let (ours, theirs) = UnixStream::pair().context("cannot create a socket pair")?;
        widen_socket(&ours);
        widen_socket(&theirs);
        let theirs_out = theirs.try_clone().context("cannot create a socket pair")?;
        // With a progress bar on the terminal, the server's lines are
        // relayed above it; otherwise it writes to our stderr itself.
        let relay = byteback_protocol::term::bar_shown();
        // Restored data is not compressed for a local store (nor is a
        // backup's, see `--compress`): it would cost CPU on both sides.
        // In a group of its own: a Ctrl-C on the terminal is the client's
        // to act on (it stops the server in order), not the server's.
        let mut command = Command::new(&bin);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = crate::stop::unblocked(&mut command)
            .arg("serve")
            .arg("--host")
            .arg(host)
            .arg("--store")
            .arg(store)
            .arg("--no-compress")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs_out)))
            .stderr(if relay {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .map_err(|e| {
                // Not there, or not executable: installing it is the fix,
                // not retrying.
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) {
                    crate::error::Error::Usage(format!(
                        "cannot start {}: {e}; a local store needs byteback-server, installed \
                         beside byteback-backup or on PATH (or named by $BYTEBACK_SERVER)",
                        bin.display()
                    ))
                } else {
                    crate::error::Error::io("cannot start", &bin, e)
                }
            })?;
        // The Command holds the server's ends of the sockets: kept, a
        // server that died would never be seen to (no end of file).
        drop(command);
        if let Some(err) = child.stderr.take() {
            relay_lines(err);
        }
        let (read, write) = Timed::pair(&ours, io_timeout).context("cannot set up the socket")?;
        Self::handshake(
            Box::new(read),
            Box::new(TimedWriter(write)),
            Transport::Child(child, Arc::new(ours)),
        )
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
        let read = socket.try_clone().context("cannot set up the socket")?;
        let write = socket.try_clone().context("cannot set up the socket")?;
        Self::handshake(
            Box::new(read),
            Box::new(SocketWriter(write)),
            Transport::Ssh(Arc::new(socket), session),
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
            r: BufReader::with_capacity(READ_BUFFER, r),
            session: session.clone(),
            frame: Vec::new(),
            spare: Vec::new(),
        };
        let mut writer = ConnWriter {
            w: BufWriter::with_capacity(1 << 20, w),
            session,
        };
        // A stop by a signal (see `stop`) while the server has not
        // answered tears the connection down: the wait ends at once.
        let breaker = transport.breaker();
        let _abort = crate::stop::abort_while(move || breaker.trip());
        // The server answers at once; one that trickles its answer a byte
        // at a time (each byte resets --io-timeout) must not hold us.
        let limit = handshake_limit();
        let deadline = Deadline::start(limit, transport.breaker());
        let hello = writer
            .send(&ClientMsg::Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
            })
            .and_then(|()| writer.flush())
            .and_then(|()| match reader.recv()? {
                ServerMsg::HelloOk { host, .. } => {
                    // The name is printed and used in paths: a server must
                    // not be able to send anything but a valid host name.
                    if validate_host_name(&host).is_err() {
                        bail!(
                            "the server sent an invalid host name {:?}; refusing the connection",
                            escape_text(&host.chars().take(300).collect::<String>())
                        );
                    }
                    Ok(host)
                }
                m => bail!("unexpected {} in handshake", m.name()),
            });
        match hello {
            Ok(host) => Ok(Connection {
                reader,
                writer,
                host,
                transport,
            }),
            Err(e) => {
                drop((reader, writer));
                let how = transport.abort();
                let e = if deadline.passed() {
                    e.context(format!(
                        "the server did not complete the handshake within {} s",
                        limit.as_secs()
                    ))
                } else {
                    e
                };
                Err(with_exit(e, how))
            }
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

    /// See [`ConnReader::give_back`].
    pub fn give_back(&mut self, buf: Vec<u8>) {
        self.reader.give_back(buf)
    }

    /// Says goodbye and waits for a spawned server.
    pub fn close(mut self) -> Result<()> {
        let _ = self.send(&ClientMsg::Bye);
        drop(self.writer);
        drop(self.reader);
        self.transport.finish()
    }

    /// What tears this connection down from another thread.
    pub fn breaker(&self) -> Breaker {
        self.transport.breaker()
    }

    /// Takes the transport (so the caller can wait for it after splitting).
    pub fn take_transport(&mut self) -> Transport {
        std::mem::replace(&mut self.transport, Transport::None)
    }
}

/// Ends when the thread relaying the local server's stderr has (see [`relay_lines`]).
static RELAYED: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>> =
    std::sync::Mutex::new(None);

/// After the local server ended: waits (a little) until its last lines are
/// relayed, so they come out before ours.
fn drain_relayed() {
    let ended = lock(&RELAYED).take();
    if let Some(ended) = ended {
        // Disconnected when the thread ends; a grandchild holding the
        // server's stderr must not hold us up for long.
        let _ = ended.recv_timeout(Duration::from_secs(2));
    }
}

/// The longest line of the local server's stderr relayed in one piece.
const MAX_RELAYED_LINE: u64 = 64 << 10;

/// Copies the local server's stderr to ours line by line, above the
/// progress bar, until the server and everyone holding its stderr is gone.
fn relay_lines(err: std::process::ChildStderr) {
    let (done, ended) = std::sync::mpsc::channel::<()>();
    *lock(&RELAYED) = Some(ended);
    let spawned = std::thread::Builder::new()
        .name("byteback-server-stderr".into())
        .spawn(move || {
            // Dropped at the end: tells drain_relayed the last line is out.
            let _done = done;
            use std::io::{BufRead, Read};
            let mut r = std::io::BufReader::new(err);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r
                    .by_ref()
                    .take(MAX_RELAYED_LINE)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                byteback_protocol::term::write_stderr(&relayed(&line));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot relay the server's messages: {e}");
    }
}

/// A line of a local server's stderr as it is relayed: escaped (it may
/// quote what a client named), with one newline.
fn relayed(line: &[u8]) -> Vec<u8> {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    let mut out = byteback_protocol::escape_bytes(text).into_bytes();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_servers_lines_are_relayed_escaped() {
        assert_eq!(relayed(b"byteback-server: ok\n"), b"byteback-server: ok\n");
        assert_eq!(relayed(b"cut short"), b"cut short\n");
        assert_eq!(relayed(b"a\rb\x1b[2J\xff\n"), b"a\\x0db\\x1b[2J\\xff\n");
    }

    fn send_buffer(sock: &UnixStream) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into an int of the size given.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    /// A local store's socket holds 4 MiB unread as root (the kernel
    /// reports twice what was set), else as much as the system allows.
    #[test]
    fn a_local_socket_is_widened() {
        let (a, _b) = UnixStream::pair().unwrap();
        let before = send_buffer(&a);
        widen_socket(&a);
        let after = send_buffer(&a);
        let max: libc::c_int = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if rustix::process::geteuid().is_root() {
            assert_eq!(after, 2 * SOCKET_BUFFER, "from {before}");
        } else {
            assert_eq!(after, 2 * max.min(SOCKET_BUFFER), "from {before}");
        }
    }

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
        // Anything but a port after the address is refused, not ignored.
        assert!(Destination::parse("ssh://bb@[::1]x:2222/").is_err());
        assert_eq!(
            Destination::parse("ssh://bb@[::1]/").unwrap(),
            Destination::Ssh {
                user: Some("bb".into()),
                host: "::1".into(),
                port: 22
            }
        );
        assert_eq!(
            Destination::parse("/srv/store").unwrap(),
            Destination::Local("/srv/store".into())
        );
        assert_eq!(ignored_path("bb@server:/byteback/"), Some("/byteback/"));
        assert_eq!(ignored_path("bb@server:"), None);
        assert_eq!(ignored_path("ssh://bb@server:22/"), None);
        assert_eq!(ignored_path("/srv/a:b"), None);
        assert_eq!(
            Destination::parse("/srv/store").unwrap(),
            Destination::Local("/srv/store".into())
        );
        assert_eq!(
            Destination::parse("./a:b").unwrap(),
            Destination::Local("./a:b".into())
        );
        // A forgotten colon, a bare host or a plain relative name is
        // refused, never a directory in the current one.
        for bad in [
            "bb@server",
            "server.example.com",
            "store",
            "a/b",
            "",
            "@:",
            "ssh://bb@/",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad:?}");
        }
    }
}

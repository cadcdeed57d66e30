//! SSH transport (russh): one channel running one command on the server, its
//! stdin/stdout carried over a local socket pair so that the protocol code sees
//! exactly the byte stream it sees with a local server.
//!
//! A background thread runs a single-threaded tokio runtime that connects,
//! checks the server's host key against known_hosts files, authenticates, runs
//! the command and copies bytes both ways until the channel closes. The
//! server's stderr is copied to ours, by a thread of its own ([`StderrRelay`]).

use std::borrow::Cow;
use std::cell::Cell;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{bail, err, Context, Error, IoContext, Result};
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::known_hosts::{self, Verdict};

/// Bytes carried to and from servers over SSH by this process (protocol
/// bytes, before encryption), for the backup and restore summaries.
pub static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
/// See [`BYTES_SENT`].
pub static BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// [`BYTES_SENT`] and [`BYTES_RECEIVED`] so far.
pub fn bytes_moved() -> (u64, u64) {
    (
        BYTES_SENT.load(Ordering::Relaxed),
        BYTES_RECEIVED.load(Ordering::Relaxed),
    )
}

/// Where to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// Login name.
    pub user: String,
    /// Server host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The name its host key is recorded under, when not `host` (and the
    /// port): OpenSSH's `HostKeyAlias`.
    pub key_alias: Option<String>,
    /// The name the destination gave, when the SSH configuration made
    /// another of it: keys learnt under it before (by a byteback that did
    /// not read the configuration) are still found.
    pub written: Option<String>,
    /// The known_hosts files the SSH configuration names (its
    /// `UserKnownHostsFile` and `GlobalKnownHostsFile`): byteback reads its
    /// own list, and names these when they record a server it does not
    /// know (see [`unknown_host_notes`]).
    pub config_known_hosts: Vec<PathBuf>,
}

/// OpenSSH's client, asked for its configuration (never through `$PATH`:
/// under `sudo -E` that would be the invoking user's choice).
const OPENSSH: &str = "/usr/bin/ssh";

/// [`OPENSSH`]; in a debug build, for the tests, `$BYTEBACK_TEST_OPENSSH`
/// if set (a stand-in that fails or hangs, without touching the
/// machine's SSH configuration).
fn openssh() -> std::path::PathBuf {
    #[cfg(debug_assertions)]
    if let Some(p) = std::env::var_os("BYTEBACK_TEST_OPENSSH") {
        return p.into();
    }
    OPENSSH.into()
}
/// Longest wait for `ssh -G` (a `Match exec` or a slow DNS lookup).
const SSH_G_WAIT: Duration = Duration::from_secs(10);

impl SshTarget {
    /// `user@host:port`, as written (see [`Self::with_ssh_config`]).
    pub fn new(user: String, host: String, port: u16) -> Self {
        SshTarget {
            user,
            host,
            port,
            key_alias: None,
            written: None,
            config_known_hosts: vec![],
        }
    }

    /// The names its host key is looked up under, in order (see
    /// [`Self::written`]).
    pub fn known_names(&self) -> Vec<String> {
        let first = self.known_name();
        let mut v: Vec<String> = self
            .written
            .iter()
            .filter(|w| **w != first)
            .cloned()
            .collect();
        v.insert(0, first);
        v
    }

    /// The name its host key is looked up under in known_hosts files.
    pub fn known_name(&self) -> String {
        match &self.key_alias {
            Some(alias) => alias.to_ascii_lowercase(),
            None => known_hosts::lookup_name(&self.host, self.port),
        }
    }

    /// The target as OpenSSH's configuration (`/etc/ssh/ssh_config`,
    /// `~/.ssh/config`) makes it, as byteback 1.x, which ran `ssh`, got it:
    /// its `HostName`, `Port` and `HostKeyAlias`, from `ssh -G` (an alias,
    /// a port or an address in the configuration reach the same server
    /// as before). Unchanged where no `ssh` program is installed. A
    /// `ProxyJump` or `ProxyCommand` is an error naming it: byteback
    /// connects directly. So is a configuration `ssh -G` refuses (its
    /// message quoted), and one it does not answer for in time: never a
    /// connection to the name as written, which may be another machine.
    /// The login name stays the destination's (1.x passed `-l`).
    pub fn with_ssh_config(mut self) -> Result<Self> {
        let openssh = openssh();
        if self.host.starts_with('-') {
            return Ok(self);
        }
        if !openssh.exists() {
            // Without the program, nothing reads a configuration written
            // for it: said, not followed unseen.
            let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".ssh/config"));
            let written = [Some(Path::new("/etc/ssh/ssh_config").to_path_buf()), home]
                .into_iter()
                .flatten()
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>();
            if !written.is_empty() {
                tracing::warn!(
                    "{} is not installed: the SSH configuration in {} is not followed for {}",
                    openssh.display(),
                    written.join(" and "),
                    self.host
                );
            }
            return Ok(self);
        }
        let mut cmd = std::process::Command::new(&openssh);
        // The login name and port as 1.x's ssh had them (-l, -p), so
        // `Match user` blocks see what they saw.
        cmd.args(["-G", "-l", &self.user]);
        if self.port != 22 {
            cmd.arg("-p").arg(self.port.to_string());
        }
        // In a group of its own: a timeout ends what its `Match exec` ran too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.arg(&self.host)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let wait = crate::test_knob("BYTEBACK_TEST_SSH_G_WAIT_SECS", SSH_G_WAIT);
        let Some(out) = run_bounded(cmd, wait, &self.host)? else {
            return Ok(self);
        };
        let written = known_hosts::lookup_name(&self.host, self.port);
        let text = String::from_utf8_lossy(&out);
        let given = self.to_string();
        let asked = self.host.clone();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(' ') else {
                continue;
            };
            let value = value.trim();
            match key {
                "hostname" if !value.is_empty() => self.host = value.to_string(),
                "port" => {
                    if let Ok(p) = value.parse() {
                        self.port = p;
                    }
                }
                "hostkeyalias" if value != "none" => self.key_alias = Some(value.to_string()),
                "userknownhostsfile" | "globalknownhostsfile" => self.config_known_hosts.extend(
                    value
                        .split_whitespace()
                        .filter(|p| p.starts_with('/') && *p != "/dev/null")
                        .map(PathBuf::from),
                ),
                // Settings 1.x's `ssh` followed and byteback does not:
                // named, not silently dropped (a key enrolled `from=` one
                // address, reached from another, fails as a refused login).
                "bindaddress" | "bindinterface" => {
                    tracing::warn!(
                    "the SSH configuration (ssh -G {asked}) sets {} {value}, which byteback, its \
                     own SSH client, does not follow: it connects from the address the system \
                     routes by",
                    if key == "bindaddress" { "BindAddress" } else { "BindInterface" }
                )
                }
                "addressfamily" if value != "any" => tracing::warn!(
                    "the SSH configuration (ssh -G {asked}) sets AddressFamily {value}, which \
                     byteback, its own SSH client, does not follow: it tries every address the \
                     name has"
                ),
                "stricthostkeychecking" if !matches!(value, "ask" | "true" | "yes") => {
                    tracing::warn!(
                        "the SSH configuration (ssh -G {asked}) sets StrictHostKeyChecking \
                         {value}, which byteback does not follow: an unknown or changed host \
                         key is always refused (byteback-setup-client learns it)"
                    )
                }
                "proxyjump" | "proxycommand" if value != "none" => {
                    return Err(Error::Permanent(format!(
                        "the SSH configuration (ssh -G {}) reaches {given} through {} {value}, \
                         which byteback, its own SSH client, does not follow: it connects \
                         straight to the server (give it as ssh://user@host:port/, or forward \
                         a port to it)",
                        asked,
                        if key == "proxyjump" {
                            "ProxyJump"
                        } else {
                            "ProxyCommand"
                        }
                    )))
                }
                _ => {}
            }
        }
        if self.to_string() != given {
            tracing::debug!("{given} is {self} by the SSH configuration (ssh -G)");
            self.written = Some(written);
        }
        Ok(self)
    }
}

/// The standard output of `cmd` (`ssh -G host`) if it ends well within
/// `wait`. One that does not end in time is killed, an error (retried).
/// One that fails is an error quoting its words, not retried (a
/// configuration ssh refuses: a bad option, a config file others may
/// write), but for the failures that say nothing of the configuration (no
/// passwd entry for this uid, a name lookup `CanonicalizeHostname` needs,
/// an ssh without `-G`): those, and a `cmd` that cannot be run, are
/// `None`, the configuration not used, with a warning saying why. One
/// killed by a signal, or whose output does not end with it, is an error
/// (retried).
fn run_bounded(
    mut cmd: std::process::Command,
    wait: Duration,
    host: &str,
) -> Result<Option<Vec<u8>>> {
    let shown = cmd.get_program().to_string_lossy().into_owned();
    let not_used = |why: String| {
        tracing::warn!("{shown} -G {host}: {why}; the SSH configuration is not used for it");
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            not_used(e.to_string());
            return Ok(None);
        }
    };
    // Both read on threads of their own (neither may fill its pipe and
    // stall the other), into buffers taken as they are when needed: a
    // `Match exec` command that left a process behind may hold a pipe
    // open past ssh's end. What is kept of each is bounded.
    let stdout = drain(child.stdout.take(), MAX_SSH_G_OUTPUT);
    let stderr = drain(child.stderr.take(), 8192);
    let deadline = std::time::Instant::now() + wait;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => break None,
        }
    };
    let Some(status) = status else {
        if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::msg(format!(
            "{shown} -G {host} took over {} s to give the SSH configuration for it (a slow \
             `Match exec` or name lookup?); not connecting without it",
            wait.as_secs()
        )));
    };
    // Its output is read to its end (nothing it ran holds stdout: OpenSSH
    // points a `Match exec` command's at /dev/null), by the deadline; its
    // words on stderr, which such a command may hold open, are what came
    // within a moment of its end.
    let (err, _) = stderr.take(Instant::now() + Duration::from_secs(1));
    if std::os::unix::process::ExitStatusExt::signal(&status).is_some() {
        return Err(Error::msg(format!(
            "{shown} -G {host} {}; not connecting without the SSH configuration",
            crate::conn::describe_exit(status)
        )));
    }
    if !status.success() {
        let said = String::from_utf8_lossy(&err);
        let said = byteback_protocol::escape_text(said.trim());
        let exit = crate::conn::describe_exit(status);
        if says_nothing_of_the_configuration(&said) {
            not_used(format!("{exit}: {said}"));
            return Ok(None);
        }
        return Err(Error::Permanent(format!(
            "{shown} -G {host} refuses the SSH configuration ({exit}){}; byteback follows it \
             as 1.x's ssh did, and does not connect without it: fix the configuration",
            if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            }
        )));
    }
    let (out, ended) = stdout.take(deadline.max(Instant::now() + Duration::from_secs(1)));
    if !ended {
        return Err(Error::msg(format!(
            "{shown} -G {host} ended, but its output did not within {} s; not connecting \
             without the SSH configuration",
            wait.as_secs()
        )));
    }
    Ok(Some(out))
}

/// Whether `ssh -G` failed for a reason its words say is none of its
/// configuration's: this uid has no passwd entry (a container's, a
/// `DynamicUser`), or a name lookup `CanonicalizeHostname` makes failed.
/// Anything else, its silence too, counts as a configuration refused.
fn says_nothing_of_the_configuration(said: &str) -> bool {
    let lower = said.to_ascii_lowercase();
    [
        "no user exists for uid",
        "could not resolve host",
        "name or service not known",
        "temporary failure in name resolution",
        // An ssh before OpenSSH 6.8, without -G.
        "unknown option -- g",
        "illegal option -- g",
    ]
    .iter()
    .any(|p| lower.contains(p))
        && !lower.contains("bad configuration option")
        && !lower.contains("terminating,")
        && !lower.contains("bad owner or permissions")
}

/// How much of `ssh -G`'s output is read (it prints about 4 KiB).
const MAX_SSH_G_OUTPUT: u64 = 1 << 20;

/// What a thread reads of a pipe, kept as it comes, and whether it ended.
struct Drained(Arc<std::sync::Mutex<(Vec<u8>, bool)>>);

impl Drained {
    /// What came, once the pipe ended or `until` passed, whichever first,
    /// and whether it ended.
    fn take(&self, until: Instant) -> (Vec<u8>, bool) {
        loop {
            {
                let mut g = self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if g.1 || Instant::now() >= until {
                    return (std::mem::take(&mut g.0), g.1);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Reads `pipe` to its end on a thread, keeping its first `limit` bytes
/// as they come.
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>, limit: u64) -> Drained {
    let got = Arc::new(std::sync::Mutex::new((Vec::new(), false)));
    let kept = got.clone();
    std::thread::spawn(move || {
        if let Some(mut p) = pipe {
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut p, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut g = kept
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let room = usize::try_from(limit)
                            .unwrap_or(usize::MAX)
                            .saturating_sub(g.0.len());
                        g.0.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
        }
        kept.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1 = true;
    });
    Drained(got)
}

impl std::fmt::Display for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.port == 22 {
            write!(f, "{}@{}", self.user, self.host)
        } else if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// How to authenticate.
#[derive(Clone)]
pub enum Auth {
    /// A private key file (OpenSSH format, unencrypted).
    Key(PathBuf),
    /// A password.
    Password(String),
}

/// What to do with a host key no known_hosts file mentions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownHost {
    /// Refuse to connect (backups and restores).
    Refuse,
    /// Record it in the first known_hosts file and go on (setup-client),
    /// once `Trust` says it is the server's: before anything is sent.
    Learn(Trust),
}

/// How set-up decides that a host key it has no record of is the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// It has this fingerprint (`SHA256:...`, as `ssh-keygen -lf` prints
    /// it on the server): `--host-key`.
    Fingerprint(String),
    /// Whatever key the server presents, unchecked: `--accept-new-host-key`
    /// (OpenSSH's `StrictHostKeyChecking=accept-new`).
    Any,
    /// The admin says so on the terminal, after seeing its fingerprint;
    /// without a terminal, refused.
    Ask,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// known_hosts files to check, in order; a new key is learnt into the first.
    pub known_hosts: Vec<PathBuf>,
    /// Policy for a host key found in none of them.
    pub unknown_host: UnknownHost,
    /// Time allowed for TCP connect, key exchange and authentication.
    pub connect_timeout: Duration,
    /// The session fails when no byte moves either way for this long.
    pub io_timeout: Duration,
    /// Only learn the server's host key (into this) and hang up: see
    /// [`probe_host_key`].
    pub probe: Option<Arc<std::sync::Mutex<Option<PublicKey>>>>,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            known_hosts: vec![],
            unknown_host: UnknownHost::Refuse,
            connect_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(10800),
            probe: None,
        }
    }
}

/// How the command is started on the server.
#[derive(Debug, Clone)]
pub enum Request {
    /// `exec` with this command line (a forced command sees it as SSH_ORIGINAL_COMMAND).
    Exec(String),
    /// A named subsystem.
    Subsystem(String),
}

/// A running remote command: `socket` carries its stdin (writes) and stdout (reads).
pub struct SshStream {
    /// Our end of the socket pair.
    pub socket: UnixStream,
    thread: JoinHandle<Result<Option<u32>>>,
    abort: SshAbort,
}

/// Stops an SSH session from any thread: its thread disconnects and ends
/// within a fraction of a second, whatever the server is doing.
#[derive(Clone, Default)]
pub struct SshAbort(Arc<AtomicBool>);

impl SshAbort {
    /// Asks the session to stop.
    pub fn abort(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn aborted(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl SshStream {
    /// Stops the session (see [`SshAbort`]).
    pub fn abort(&self) {
        self.abort.abort();
    }

    /// Closes our side and waits for the SSH session to end; returns the command's exit status.
    pub fn finish(self) -> Result<Option<u32>> {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        drop(self.socket);
        self.thread
            .join()
            .map_err(|_| err!("the SSH thread panicked"))?
    }

    /// Splits into the socket and a handle that waits for the session.
    pub fn into_parts(self) -> (UnixStream, SshSession) {
        (
            self.socket,
            SshSession {
                thread: self.thread,
                abort: self.abort,
            },
        )
    }
}

/// The thread driving an SSH session.
pub struct SshSession {
    thread: JoinHandle<Result<Option<u32>>>,
    abort: SshAbort,
}

impl SshSession {
    /// Waits for the session to end; returns the remote exit status.
    pub fn wait(self) -> Result<Option<u32>> {
        self.thread
            .join()
            .map_err(|_| err!("the SSH thread panicked"))?
    }

    /// A handle that stops the session from any thread.
    pub fn aborter(&self) -> SshAbort {
        self.abort.clone()
    }

    /// Waits at most `limit` for the session to end (`None` if it has not:
    /// its thread is left to finish on its own).
    pub fn wait_for(self, limit: Duration) -> Option<Result<Option<u32>>> {
        let deadline = Instant::now() + limit;
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(self.wait())
    }
}

/// Loads a private key for authentication.
/// A key that cannot be loaded is a configuration error: retrying cannot
/// make it appear or lose its passphrase.
pub fn load_key(path: &Path) -> Result<PrivateKey> {
    read_key(path).map_err(|e| {
        let hint = match &e {
            russh::keys::Error::IO(io) if io.kind() == std::io::ErrorKind::NotFound => {
                "; byteback-setup-client makes one, or give the key with --ssh-key"
            }
            russh::keys::Error::IO(io) if io.kind() != std::io::ErrorKind::PermissionDenied => {
                // A read that failed (EIO, too many open files) may
                // succeed on the next attempt.
                return crate::error::Error::msg(format!(
                    "cannot load the SSH key {}: {e}",
                    path.display()
                ));
            }
            russh::keys::Error::KeyIsEncrypted => {
                " with a passphrase, which a backup run by a timer cannot give: use a key \
                 without one (byteback-setup-client makes one), or remove the passphrase \
                 with `ssh-keygen -p -N '' -f KEY`"
            }
            _ => "",
        };
        crate::error::Error::Usage(format!(
            "cannot load the SSH key {}: {e}{hint}",
            path.display()
        ))
    })
}

/// Most bytes read from a private key file (an RSA key of 16,384 bits
/// is about 13 KB).
const KEY_FILE_MAX: u64 = 1 << 20;

/// Reads and decodes the private key at `path`, refusing one of this user
/// that other users may read or change, as OpenSSH does ("UNPROTECTED
/// PRIVATE KEY FILE"): whoever can read it can list, restore or back up as
/// this host. A key of another owner is not judged by its mode (a group's
/// shared key, one on a filesystem without modes), as OpenSSH does, but
/// for root (backups, restores of the whole machine): one that other users
/// may read or change is refused whoever owns it, and one another user
/// owns is used with a warning.
fn read_key(path: &Path) -> std::result::Result<PrivateKey, russh::keys::Error> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let me = rustix::process::getuid().as_raw();
    if (meta.uid() == me || me == 0) && meta.mode() & 0o077 != 0 {
        return Err(russh::keys::Error::IO(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "other users may read or change it (mode {:o}); refusing to use it, as ssh \
                 does (`chmod 600 {}`, and give it to this user)",
                meta.mode() & 0o7777,
                path.display()
            ),
        )));
    }
    if me == 0 && meta.uid() != 0 {
        // Its owner may use it anyway; but may also put another key in its
        // place, one of a machine of theirs, and have this root's backup of
        // the whole machine go where they can restore it.
        tracing::warn!(
            "{} belongs to uid {}, who may replace it (and so choose where this machine's \
             backups go and who may restore them); a key root uses should be root's: \
             `chown root: {}`",
            path.display(),
            meta.uid(),
            path.display()
        );
    }
    let mut text = String::new();
    file.take(KEY_FILE_MAX).read_to_string(&mut text)?;
    russh::keys::decode_secret_key(&text, None)
}

/// Connects, authenticates and starts `request`; returns once the command runs.
pub fn open(
    target: &SshTarget,
    auth: &Auth,
    opts: &SshOptions,
    request: Request,
) -> Result<SshStream> {
    let key = match auth {
        Auth::Key(p) => Some(Arc::new(load_key(p)?)),
        Auth::Password(_) => None,
    };
    let (ours, theirs) = UnixStream::pair().context("cannot create a socket pair")?;
    crate::conn::widen_socket(&ours);
    crate::conn::widen_socket(&theirs);
    theirs
        .set_nonblocking(true)
        .context("cannot create a socket pair")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    let abort = SshAbort::default();
    let stop = abort.clone();
    let shown = target.to_string();
    let target = target.clone();
    let auth = auth.clone();
    let opts = opts.clone();
    let thread = std::thread::Builder::new()
        .name("byteback-ssh".into())
        .spawn(move || -> Result<Option<u32>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the SSH runtime")?;
            rt.block_on(async move {
                let started = start(&target, key, &auth, &opts, request).await;
                let (handle, channel) = match started {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        bail!("{msg}");
                    }
                };
                let sock = tokio::net::UnixStream::from_std(theirs)?;
                let status = pump(channel, sock, opts.io_timeout, &stop).await;
                // Bounded: a dead peer must not hold the thread.
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    handle.disconnect(Disconnect::ByApplication, "", "en"),
                )
                .await;
                status
            })
        })
        .context("cannot start the SSH thread")?;
    // A stop by a signal (see `stop`) ends the wait for the login at once;
    // the SSH thread is left to its connect timeout, and the process ends.
    let ready = loop {
        match ready_rx.recv_timeout(Duration::from_millis(100)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(sig) = crate::stop::stopped() {
                    abort.abort();
                    bail!("SSH to {shown}: {}", crate::stop::message(sig));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(std::sync::mpsc::RecvError)
            }
            Ok(r) => break Ok(r),
        }
    };
    match ready {
        Ok(Ok(())) => Ok(SshStream {
            socket: ours,
            thread,
            abort,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            _ => bail!("the SSH thread ended before connecting"),
        },
    }
}

/// Connects and logs in, returning the session handle (for setup's key-exchange-only uses too).
/// `offered` (russh's host key algorithms, in its order) with those of
/// the `recorded` key types first, in their order; an RSA key as OpenSSH
/// asks for it (`rsa-sha2-512`, then `-256`). Types russh does not offer
/// are passed over.
fn host_key_order(
    recorded: &[String],
    offered: &[russh::keys::Algorithm],
) -> Vec<russh::keys::Algorithm> {
    use russh::keys::Algorithm;
    let mut first: Vec<Algorithm> = vec![];
    for t in recorded {
        let Ok(a) = t.parse::<Algorithm>() else {
            continue;
        };
        let asked = match a {
            Algorithm::Rsa { .. } => vec![
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512),
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256),
                },
            ],
            a => vec![a],
        };
        for a in asked {
            if offered.contains(&a) && !first.contains(&a) {
                first.push(a);
            }
        }
    }
    // SHA-1 `ssh-rsa` after every recorded type, as OpenSSH orders it,
    // for an RSA key of a server before OpenSSH 7.2.
    let sha1 = Algorithm::Rsa { hash: None };
    let rsa = recorded
        .iter()
        .any(|t| matches!(t.parse::<Algorithm>(), Ok(Algorithm::Rsa { .. })));
    if rsa && offered.contains(&sha1) && !first.contains(&sha1) {
        first.push(sha1);
    }
    let rest: Vec<Algorithm> = offered
        .iter()
        .filter(|a| !first.contains(a))
        .cloned()
        .collect();
    first.extend(rest);
    first
}

async fn connect(
    target: &SshTarget,
    key: Option<Arc<PrivateKey>>,
    auth: &Auth,
    opts: &SshOptions,
) -> Result<Handle<HostKeyCheck>> {
    let mut config = client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(60)),
        keepalive_max: 5,
        nodelay: true,
        window_size: 16 << 20,
        ..Default::default()
    };
    config.preferred.cipher = Cow::Borrowed(&[
        russh::cipher::AES_128_GCM,
        russh::cipher::AES_256_GCM,
        russh::cipher::CHACHA20_POLY1305,
        russh::cipher::AES_256_CTR,
        russh::cipher::AES_128_CTR,
    ]);
    // The host key types recorded for the server first, as OpenSSH orders
    // them: a server with an Ed25519 key beside the ECDSA one a client
    // recorded (OpenSSH before 8.5 preferred ECDSA) shows the recorded
    // one, not a "changed" key. A file that cannot be read is the host
    // key check's to report.
    if let Ok(files) = known_hosts::load(&opts.known_hosts) {
        let recorded = known_hosts::recorded_types(&files, &target.known_names());
        config.preferred.key = Cow::Owned(host_key_order(&recorded, &config.preferred.key));
    }
    let handler = HostKeyCheck {
        names: target.known_names(),
        unread: target
            .config_known_hosts
            .iter()
            .filter(|p| !opts.known_hosts.contains(p))
            .cloned()
            .collect(),
        known_hosts: opts.known_hosts.clone(),
        unknown: opts.unknown_host.clone(),
        probe: opts.probe.clone(),
    };
    let addr = (target.host.as_str(), target.port);
    let login = async {
        let mut handle = client::connect(Arc::new(config), addr, handler).await?;
        let result = match (auth, key) {
            (Auth::Key(_), Some(k)) => {
                let hash = handle.best_supported_rsa_hash().await?.flatten();
                handle
                    .authenticate_publickey(&target.user, PrivateKeyWithHashAlg::new(k, hash))
                    .await?
            }
            (Auth::Password(p), _) => handle.authenticate_password(&target.user, p).await?,
            (Auth::Key(p), None) => bail!("key {} not loaded", p.display()),
        };
        if !result.success() {
            return Err(Error::Permanent(format!(
                "the server refused to let {} log in ({})",
                target,
                match auth {
                    Auth::Key(p) => format!(
                        "key {}; is it enrolled? byteback-setup-client on this machine enrols \
                         it; on the server, the account's ~/.ssh/authorized_keys must hold it, \
                         with a from= that allows this machine's address",
                        p.display()
                    ),
                    Auth::Password(_) => "password".to_string(),
                }
            )));
        }
        Ok::<_, Error>(handle)
    };
    match tokio::time::timeout(opts.connect_timeout, login).await {
        Ok(r) => r.with_context(|| match target.port {
            22 => format!("SSH to {target} (port 22)"),
            _ => format!("SSH to {target}"),
        }),
        Err(_) => bail!(
            "SSH to {target}: no connection within {} s",
            opts.connect_timeout.as_secs()
        ),
    }
}

async fn start(
    target: &SshTarget,
    key: Option<Arc<PrivateKey>>,
    auth: &Auth,
    opts: &SshOptions,
    request: Request,
) -> Result<(Handle<HostKeyCheck>, russh::Channel<client::Msg>)> {
    let handle = connect(target, key, auth, opts).await?;
    // Under the same limit as the login: until the session runs, nothing
    // else (the pump's --io-timeout) would end a server that never answers.
    let session = async {
        let channel = handle
            .channel_open_session()
            .await
            .with_context(|| format!("SSH to {target}: cannot open a session"))?;
        match &request {
            Request::Exec(cmd) => channel.exec(true, cmd.as_bytes()).await?,
            Request::Subsystem(name) => channel.request_subsystem(true, name).await?,
        }
        Ok::<_, Error>(channel)
    };
    match tokio::time::timeout(opts.connect_timeout, session).await {
        Ok(channel) => Ok((handle, channel?)),
        Err(_) => bail!(
            "SSH to {target}: logged in, but no session started within {} s",
            opts.connect_timeout.as_secs()
        ),
    }
}

/// The longest stderr line from the server relayed in one piece.
const MAX_STDERR_LINE: usize = 64 << 10;

/// One line of the server's stderr as we print it: `server: ` and the text
/// with every control character escaped (ESC as `\x1b`, so the server cannot
/// drive our terminal), then our own newline.
fn server_line(line: &[u8]) -> String {
    format!("server: {}\n", byteback_protocol::escape_bytes(line))
}

/// Lines of the server's stderr waiting for ours: at most this many (each at
/// most [`MAX_STDERR_LINE`] bytes before escaping); more are dropped, counted.
const STDERR_QUEUE: usize = 64;

/// The server's stderr lines on their way to ours, through a thread of
/// their own: a stalled stderr (journald behind, a terminal paused with
/// XOFF) must not stop the pump, and with it `--io-timeout`'s watchdog and
/// the protocol. Lines that find the queue full are dropped and counted; the
/// thread says how many as soon as it writes again, and when it ends.
struct StderrRelay {
    tx: Option<std::sync::mpsc::SyncSender<String>>,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// What the relay says of the lines it dropped.
fn dropped_note(n: u64) -> String {
    format!("server: ({n} lines not shown: our stderr was not taking them)\n")
}

impl StderrRelay {
    fn new() -> StderrRelay {
        // Above the progress bar, if one is shown.
        Self::with_writer(byteback_protocol::term::write_stderr)
    }

    /// A relay writing each line with `write` (ours: stderr; tests: a buffer).
    fn with_writer(write: fn(&[u8])) -> StderrRelay {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(STDERR_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        let thread = std::thread::Builder::new()
            .name("byteback-ssh-stderr".into())
            .spawn(move || {
                let note = || match counted.swap(0, Ordering::Relaxed) {
                    0 => {}
                    n => write(dropped_note(n).as_bytes()),
                };
                for line in rx {
                    write(line.as_bytes());
                    note();
                }
                note();
            });
        match thread {
            Ok(t) => StderrRelay {
                tx: Some(tx),
                dropped,
                thread: Some(t),
            },
            // No thread: the lines are written where they come, as before.
            Err(_) => StderrRelay {
                tx: None,
                dropped,
                thread: None,
            },
        }
    }

    /// Passes `line` (a whole line, newline included) on, or drops it.
    fn line(&mut self, line: String) {
        let Some(tx) = &self.tx else {
            byteback_protocol::term::write_stderr(line.as_bytes());
            return;
        };
        if let Err(std::sync::mpsc::TrySendError::Full(_)) = tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the relay: what is queued is written, waiting at most
    /// `wait` for a stalled stderr (the thread is then left to finish).
    fn finish(mut self, wait: Duration) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + wait;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Copies bytes between the channel and the local socket until both sides
/// are done, the session is aborted, or nothing moves for `io_timeout`.
async fn pump(
    channel: russh::Channel<client::Msg>,
    sock: tokio::net::UnixStream,
    io_timeout: Duration,
    abort: &SshAbort,
) -> Result<Option<u32>> {
    let (mut chan_rd, chan_wr) = channel.split();
    let (mut sock_rd, mut sock_wr) = sock.into_split();
    let last = Cell::new(Instant::now());
    let exit = Cell::new(None::<u32>);

    let from_server = async {
        let mut stderr_line = Vec::new();
        let mut relay = StderrRelay::new();
        while let Some(msg) = chan_rd.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    // Empty data is no progress.
                    if !data.is_empty() {
                        last.set(Instant::now());
                    }
                    BYTES_RECEIVED.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if sock_wr.write_all(&data).await.is_err() {
                        // Our side stopped reading: the client is finishing or failing.
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, .. } => {
                    // Not progress: a server that only writes to stderr
                    // must not keep --io-timeout from ending the session.
                    stderr_line.extend_from_slice(&data);
                    while let Some(i) = stderr_line.iter().position(|&b| b == b'\n') {
                        relay.line(server_line(&stderr_line[..i]));
                        stderr_line.drain(..=i);
                    }
                    // A server that never ends its line must not make us hold
                    // an unbounded buffer: pass long runs on in pieces.
                    while stderr_line.len() >= MAX_STDERR_LINE {
                        relay.line(server_line(&stderr_line[..MAX_STDERR_LINE]));
                        stderr_line.drain(..MAX_STDERR_LINE);
                    }
                }
                ChannelMsg::ExitStatus { exit_status } => exit.set(Some(exit_status)),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    relay.line(format!("server: killed by signal {signal_name:?}\n"));
                    exit.set(Some(128));
                }
                ChannelMsg::Eof => {
                    let _ = sock_wr.shutdown().await;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        if !stderr_line.is_empty() {
            relay.line(server_line(&stderr_line));
        }
        // The server's last words (its error, often) before the client's own.
        relay.finish(Duration::from_secs(2));
        let _ = sock_wr.shutdown().await;
    };
    let to_server = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut failed = None;
        loop {
            // A read error on our own socket means the client went away: end of input.
            let n: usize = sock_rd.read(&mut buf).await.unwrap_or_default();
            if n == 0 {
                if failed.is_none() {
                    let _ = chan_wr.eof().await;
                }
                break;
            }
            last.set(Instant::now());
            if failed.is_some() {
                // The channel is gone: drop what the client still writes
                // rather than leave it blocked; what the server said last
                // (its error, often) still reaches the client.
                continue;
            }
            BYTES_SENT.fetch_add(n as u64, Ordering::Relaxed);
            if let Err(e) = chan_wr.data(&buf[..n]).await {
                failed = Some(Error::from(e).context("cannot send to the server"));
            }
            last.set(Instant::now());
        }
        failed
    };
    let watchdog = async {
        loop {
            if abort.aborted() {
                return Error::Aborted;
            }
            let idle = last.get().elapsed();
            if idle >= io_timeout {
                return err!(
                    "no data moved for {} s (--io-timeout); giving up on the connection",
                    io_timeout.as_secs()
                );
            }
            // Short naps, so that an abort is seen at once.
            tokio::time::sleep((io_timeout - idle).min(Duration::from_millis(100))).await;
        }
    };
    // The server's side decides when the session is over: once the channel
    // closes, data still queued towards it has nowhere to go, so sending
    // stops too (a closed channel never opens its window again).
    tokio::pin!(from_server, to_server, watchdog);
    let mut sent_all = false;
    let mut send_failed = None;
    loop {
        tokio::select! {
            () = &mut from_server => {
                return match (exit.get(), send_failed) {
                    (None, Some(e)) => Err(e),
                    (status, _) => Ok(status),
                };
            }
            failed = &mut to_server, if !sent_all => {
                sent_all = true;
                send_failed = failed;
            }
            e = &mut watchdog => return Err(e),
        }
    }
}

/// Checks the server's host key against known_hosts files.
struct HostKeyCheck {
    /// The names the server's key may be recorded under, in order.
    names: Vec<String>,
    known_hosts: Vec<PathBuf>,
    /// Files the SSH configuration names that are not read (see
    /// [`SshTarget::config_known_hosts`]).
    unread: Vec<PathBuf>,
    unknown: UnknownHost,
    probe: Option<Arc<std::sync::Mutex<Option<PublicKey>>>>,
}

/// The host key `target` presents, learnt by a connection that hangs up
/// right after the key exchange (nothing is sent); `None` if none came.
/// Set-up asks the admin about a key this way, with no connection waiting
/// on the answer (sshd's `LoginGraceTime`, our own connect timeout).
pub fn probe_host_key(target: &SshTarget, opts: &SshOptions) -> Option<PublicKey> {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let probing = SshOptions {
        probe: Some(seen.clone()),
        ..opts.clone()
    };
    let _ = open(
        target,
        &Auth::Password(String::new()),
        &probing,
        Request::Exec(String::new()),
    );
    let key = seen.lock().ok()?.take();
    key
}

/// Whether no known_hosts file in `files` mentions `target` at all.
pub fn host_unknown(target: &SshTarget, files: &[PathBuf], key: &PublicKey) -> Result<bool> {
    let names = target.known_names();
    let blob = key
        .to_bytes()
        .context("cannot encode the server's host key")?;
    let files = known_hosts::load(files)?;
    Ok(matches!(
        first_verdict(&files, &names, &blob).1,
        Verdict::Unknown
    ))
}

/// The first name of `names` some known_hosts file mentions, and what it
/// says of `blob` (the first name, unknown, when none does).
fn first_verdict(
    files: &[(PathBuf, Vec<known_hosts::Entry>)],
    names: &[String],
    blob: &[u8],
) -> (String, Verdict) {
    for n in names {
        let v = known_hosts::check(files, n, blob);
        if !matches!(v, Verdict::Unknown) {
            return (n.clone(), v);
        }
    }
    (names.first().cloned().unwrap_or_default(), Verdict::Unknown)
}

/// Why a server byteback does not know may be known elsewhere: a
/// `@cert-authority` line of the files read that names it (byteback checks
/// plain host keys, not certificates), and files the SSH configuration
/// names, not read by byteback, that record it (`unread`; one that cannot
/// be read, or that root or this user does not own alone, is passed over).
fn unknown_host_notes(
    files: &[(PathBuf, Vec<known_hosts::Entry>)],
    unread: &[PathBuf],
    names: &[String],
    ours: Option<&PathBuf>,
) -> Vec<String> {
    let mut notes = vec![];
    let named =
        |e: &known_hosts::Entry| names.iter().any(|n| known_hosts::hosts_match(&e.hosts, n));
    for (path, entries) in files {
        for e in entries
            .iter()
            .filter(|e| e.marker == Some(known_hosts::Marker::CertAuthority))
        {
            if named(e) {
                notes.push(format!(
                    "{}:{} names it as a @cert-authority, which byteback does not use (it checks \
                     plain host keys, not certificates)",
                    path.display(),
                    e.line
                ));
            }
        }
    }
    for path in unread {
        let Ok(loaded) = known_hosts::load(std::slice::from_ref(path)) else {
            continue;
        };
        for (path, entries) in &loaded {
            if let Some(e) = entries.iter().find(|e| e.marker.is_none() && named(e)) {
                notes.push(format!(
                    "the SSH configuration's known_hosts file {}:{} records it, but byteback does \
                     not read that file (copy the line into {})",
                    path.display(),
                    e.line,
                    ours.map_or("byteback's".into(), |p| p.display().to_string())
                ));
            }
        }
    }
    notes
}

/// `SHA256:...` fingerprint and algorithm of a key, as OpenSSH prints them.
pub fn describe_key(key: &PublicKey) -> String {
    format!("{} {}", key.algorithm(), key.fingerprint(HashAlg::Sha256))
}

impl client::Handler for HostKeyCheck {
    type Error = Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            bail!("the server presented a host certificate; byteback checks plain host keys only");
        };
        if let Some(seen) = &self.probe {
            if let Ok(mut s) = seen.lock() {
                *s = Some(key.clone());
            }
            return Ok(false);
        }
        self.check_plain_key(key)
    }
}

impl HostKeyCheck {
    /// Accepts a key that a known_hosts entry for the host holds; refuses a
    /// revoked key, and a host whose entries (of any key type) all differ.
    /// A host no file mentions is learnt (setup-client) or refused.
    fn check_plain_key(&self, key: &PublicKey) -> Result<bool> {
        let blob = key
            .to_bytes()
            .context("cannot encode the server's host key")?;
        let files = known_hosts::load(&self.known_hosts)?;
        let (name, verdict) = first_verdict(&files, &self.names, &blob);
        match verdict {
            Verdict::Known { .. } => Ok(true),
            Verdict::Revoked { path, line } => Err(Error::Permanent(format!(
                "REVOKED HOST KEY: {name} presents {}, which is marked @revoked at {}:{line}. \
                 Refusing to connect.",
                describe_key(key),
                path.display()
            ))),
            Verdict::Changed { recorded } => {
                let at = recorded
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let kinds = if recorded.iter().all(|r| r.key_type != key.algorithm().as_str()) {
                    " (a key of another type)"
                } else {
                    ""
                };
                Err(Error::Permanent(format!(
                    "HOST KEY CHANGED: {name} now presents {}{kinds}, which differs from the key recorded at {at}. \
                     Someone may be intercepting the connection, or the server was reinstalled. \
                     Refusing to connect; if the change is expected, delete the recorded line(s) and run byteback-setup-client again.",
                    describe_key(key),
                )))
            }
            Verdict::Unknown => match (&self.unknown, self.known_hosts.first()) {
                (UnknownHost::Learn(trust), Some(path)) => {
                    for n in unknown_host_notes(&files, &self.unread, &self.names, self.known_hosts.first()) {
                        tracing::warn!("{name}: {n}");
                    }
                    confirm(trust, &name, key)?;
                    learn(&name, key, path).with_context(|| {
                        format!("cannot record the host key in {}", path.display())
                    })?;
                    eprintln!(
                        "byteback: the server {name} presents host key {}; recorded in {}",
                        describe_key(key),
                        path.display()
                    );
                    Ok(true)
                }
                _ => Err(Error::Permanent(format!(
                    "the host key of {name} ({}) is not in {}; refusing to connect. Run byteback-setup-client to record it.{}",
                    describe_key(key),
                    self.known_hosts
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or "),
                    unknown_host_notes(&files, &self.unread, &self.names, self.known_hosts.first())
                        .iter()
                        .map(|n| format!(" Note: {n}."))
                        .collect::<String>()
                ))),
            },
        }
    }
}

/// Decides, before anything is sent to it, whether the host key `key` of
/// `name`, which no known_hosts file mentions, is the server's (see
/// [`Trust`]). Without that a man in the middle on the first run would
/// get the admin password, and become this client's destination.
fn confirm(trust: &Trust, name: &str, key: &PublicKey) -> Result<()> {
    let fp = key.fingerprint(HashAlg::Sha256).to_string();
    match trust {
        Trust::Any => Ok(()),
        Trust::Fingerprint(want) if want.trim() == fp => Ok(()),
        Trust::Fingerprint(want) => Err(Error::Permanent(format!(
            "the server {name} presents host key {}, not {} (--host-key): refusing to connect, \
             nothing was sent; someone may be intercepting the connection",
            describe_key(key),
            want.trim().escape_default()
        ))),
        Trust::Ask => ask_host_key(name, key),
    }
}

/// Asks the admin on the terminal whether host key `key` of `name` is the
/// server's, showing its fingerprint; refused without a terminal this
/// process has in the foreground, or without an answer in
/// [`ASK_TIMEOUT`] (a pty nobody watches, under automation).
pub fn ask_host_key(name: &str, key: &PublicKey) -> Result<()> {
    let fp = key.fingerprint(HashAlg::Sha256).to_string();
    let compare = "compare it with the server's own (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there)";
    let no_answer = |why: &str| {
        Error::Permanent(format!(
            "the server {name} presents host key {}, which is not known here, and {why}: {compare}, \
             then run again with --host-key {fp} (or --accept-new-host-key to trust it unchecked); \
             nothing was sent",
            describe_key(key)
        ))
    };
    let no_terminal = || no_answer("there is no terminal to ask whether it is the server's");
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| no_terminal())?;
    // In the background a read would stop the process (SIGTTIN).
    let foreground =
        rustix::termios::tcgetpgrp(&tty).is_ok_and(|g| g == rustix::process::getpgrp());
    if !foreground {
        return Err(no_terminal());
    }
    write!(
        tty,
        "The server {name} presents host key {}, not known here.\n\
         Before the password or any key goes to it, {compare}.\n\
         Is it the server's key? Type yes or its fingerprint: ",
        describe_key(key)
    )
    .map_err(|_| no_terminal())?;
    let answer = read_tty_line(&mut tty, ASK_TIMEOUT)
        .map_err(|_| no_terminal())?
        .ok_or_else(|| no_answer("nobody answered on the terminal"))?;
    let answer = answer.trim();
    if answer == "yes" || answer == fp {
        Ok(())
    } else {
        Err(Error::Permanent(format!(
            "the host key of {name} was not confirmed; nothing was sent"
        )))
    }
}

/// How long [`ask_host_key`] waits for an answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(600);

/// A line typed on the terminal (at most 256 bytes are kept), or `None`
/// when nothing ends it within `limit`.
fn read_tty_line(tty: &mut std::fs::File, limit: Duration) -> std::io::Result<Option<String>> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + limit;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: tty.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(None);
        }
        match tty.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ if line.len() < 256 => line.push(byte[0]),
            _ => {}
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Appends `host key` to a known_hosts file (created 0644, never through
/// a symlink; its directory 0755 as needed).
fn learn(shown: &str, key: &PublicKey, path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .on("cannot create", dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        // Read too: the last byte says whether a newline must come first.
        .read(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .on("cannot open", path)?;
    let len = f.metadata().on("cannot stat", path)?.len();
    let mut line = String::new();
    if len > 0 {
        let mut last = [0u8; 1];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut last, len - 1)
            .on("cannot read", path)?;
        if last[0] != b'\n' {
            line.push('\n');
        }
    }
    let encoded = key.to_openssh()?;
    let mut words = encoded.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        bail!("cannot encode the host key");
    };
    line.push_str(&format!("{shown} {kind} {blob}\n"));
    f.write_all(line.as_bytes()).on("cannot write", path)?;
    f.sync_all().on("cannot write", path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ssh's words about its configuration are told from others: only
    /// failures known to say nothing of it leave it unused.
    #[test]
    fn a_refused_configuration_is_told_by_ssh_s_words() {
        for said in [
            "/etc/ssh/ssh_config.d/x.conf line 3: Bad configuration option: nosuchoption",
            "/root/.ssh/config line 12: keyword hostname extra arguments at end of line",
            "/etc/ssh/ssh_config: terminating, 1 bad configuration options",
            "Bad owner or permissions on /root/.ssh/config",
            "",
        ] {
            assert!(!says_nothing_of_the_configuration(said), "{said}");
        }
        for said in [
            "No user exists for uid 4242",
            "ssh: Could not resolve hostname backup: Name or service not known",
            "Could not resolve host \"backup\"",
            "ssh: unknown option -- G",
            "/root/.ssh/config line 5: Unsupported option \"rsaauthentication\"\nssh: Could not resolve hostname b: Temporary failure in name resolution",
        ] {
            assert!(says_nothing_of_the_configuration(said), "{said}");
        }
    }

    /// The recorded host key types are asked for first (RSA as OpenSSH
    /// asks for it); the rest keep russh's order; unknown types change
    /// nothing.
    #[test]
    fn recorded_host_key_types_are_asked_for_first() {
        use russh::keys::{Algorithm, EcdsaCurve};
        let offered = russh::Preferred::DEFAULT.key;
        let ec = Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        };
        let order = host_key_order(&["ecdsa-sha2-nistp256".into()], &offered);
        assert_eq!(order[0], ec);
        assert_eq!(order[1], Algorithm::Ed25519);
        assert_eq!(order.len(), offered.len());
        let order = host_key_order(&["ssh-rsa".into(), "ssh-ed25519".into()], &offered);
        assert_eq!(
            &order[..4],
            &[
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512)
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256)
                },
                Algorithm::Ed25519,
                Algorithm::Rsa { hash: None },
            ]
        );
        assert_eq!(order.len(), offered.len());
        let order = host_key_order(&["sk-ssh-ed25519@openssh.com".into(), "x".into()], &offered);
        assert_eq!(order, offered.to_vec());
    }

    /// As OpenSSH: a key of this user that others may read or change is
    /// refused; a key another user owns is not judged by its mode (a
    /// group's shared key, a key on a filesystem without modes), but for
    /// root, who refuses any key others may read.
    #[test]
    fn a_key_is_judged_by_its_mode_only_when_it_is_ours() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &[7; 32],
        ));
        let text = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap();
        std::fs::write(&path, text.as_bytes()).unwrap();
        let mode = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o600);
        assert!(read_key(&path).is_ok());
        for m in [0o640, 0o604, 0o660] {
            mode(m);
            let e = read_key(&path).unwrap_err().to_string();
            assert!(
                e.contains("other users may read or change it"),
                "{m:o}: {e}"
            );
        }
        if rustix::process::getuid().is_root() {
            // Root judges every key by its mode (whoever reads it restores
            // the machine), but not by its owner (a warning names it).
            let other = rustix::process::Uid::from_raw(54_321);
            rustix::fs::chown(&path, Some(other), None).unwrap();
            mode(0o600);
            assert!(read_key(&path).is_ok());
            mode(0o644);
            assert!(read_key(&path).is_err());
        } else if std::env::var_os("CI").is_some() {
            panic!("a key owned by another user needs root, and CI is set");
        } else {
            eprintln!("SKIPPED the part of a key owned by another user: not root");
        }
    }

    static RELAYED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
    static STALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A writer that waits while the test holds [`STALL`].
    fn stalling_writer(b: &[u8]) {
        let _wait = STALL.lock().unwrap();
        RELAYED.lock().unwrap().extend_from_slice(b);
    }

    /// While stderr does not move, lines beyond the queue are dropped (the
    /// caller never waits), and their number is said once it moves.
    #[test]
    fn a_stalled_stderr_drops_lines_and_says_how_many() {
        let stall = STALL.lock().unwrap();
        let mut relay = StderrRelay::with_writer(stalling_writer);
        let start = Instant::now();
        for i in 0..1000 {
            relay.line(format!("server: line {i}\n"));
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the caller waited"
        );
        drop(stall);
        relay.finish(Duration::from_secs(10));
        let out = String::from_utf8(std::mem::take(&mut *RELAYED.lock().unwrap())).unwrap();
        let shown = out
            .lines()
            .filter(|l| l.starts_with("server: line"))
            .count();
        assert!(
            (STDERR_QUEUE..=STDERR_QUEUE + 1).contains(&shown),
            "{shown}:\n{out}"
        );
        // Said once, as soon as the thread writes again.
        let note = dropped_note((1000 - shown) as u64);
        assert_eq!(out.matches("lines not shown").count(), 1, "{out}");
        assert!(out.contains(&note), "{out}");
        assert!(out.starts_with("server: line 0\n"), "{out}");
    }

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJmyA95lD7jhTsn8SCAkQ6CaHO8a12p0XCCLPZ1FnBps";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINEKmFNMDH76Bs7wO6tYEtK8pdeYwgGQkXJLc1A/AQ/B";
    const EC: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMKXc82NvOjuFGBhrJtCGHJwT+X/NuQYYJj7ARCRduMUV+n8XKIaZjArLRvTGtEhh5Z35a4JQURD7tlylgXpa7o=";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    /// A host key is looked up under `HostKeyAlias` when the SSH
    /// configuration gives one (as OpenSSH does: no port added).
    #[test]
    fn host_keys_are_looked_up_under_their_alias() {
        let mut t = SshTarget::new("b".into(), "10.0.0.5".into(), 2222);
        assert_eq!(t.known_name(), "[10.0.0.5]:2222");
        t.key_alias = Some("Backup-Server".into());
        assert_eq!(t.known_name(), "backup-server");
    }

    fn checker(files: &[PathBuf], unknown: UnknownHost) -> HostKeyCheck {
        HostKeyCheck {
            names: vec!["[127.0.0.1]:2222".into()],
            known_hosts: files.to_vec(),
            unread: vec![],
            unknown,
            probe: None,
        }
    }

    /// A key is learnt into a known_hosts file that has lines already,
    /// the last without its newline (before, the file was opened for
    /// appending only, and reading its last byte failed: a second server
    /// could not be set up).
    #[test]
    fn a_host_key_is_learnt_beside_others() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("known_hosts");
        std::fs::write(&ours, format!("other.example {ED2}")).unwrap();
        assert!(
            checker(std::slice::from_ref(&ours), UnknownHost::Learn(Trust::Any))
                .check_plain_key(&key(ED))
                .unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(&ours).unwrap(),
            format!("other.example {ED2}\n[127.0.0.1]:2222 {ED}\n")
        );
    }

    #[test]
    fn server_stderr_is_escaped() {
        assert_eq!(server_line(b"plain text"), "server: plain text\n");
        assert_eq!(
            server_line(b"\x1b]0;owned\x07\x1b[2J\rfake\tline"),
            "server: \\x1b]0;owned\\x07\\x1b[2J\\x0dfake\\x09line\n"
        );
        assert_eq!(server_line(b"\xff\xfe"), "server: \\xff\\xfe\n");
        assert_eq!(server_line("\u{9b}1m".as_bytes()), "server: \\x9b1m\n");
    }

    #[test]
    fn host_key_policy() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("etc/known_hosts");
        let users = dir.path().join("home/.ssh/known_hosts");
        let files = [ours.clone(), users.clone()];

        // Unknown: refused for backups, learnt (into the first file) by set-up.
        let e = checker(&files, UnknownHost::Refuse)
            .check_plain_key(&key(ED))
            .unwrap_err();
        assert!(format!("{e:#}").contains("is not in"), "{e:#}");
        assert!(!ours.exists());
        // With --host-key, only the key of that fingerprint.
        let e = checker(
            &files,
            UnknownHost::Learn(Trust::Fingerprint("SHA256:not-this-one".into())),
        )
        .check_plain_key(&key(ED))
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("not SHA256:not-this-one"),
            "{e:#}"
        );
        assert!(!ours.exists());
        let fp = key(ED).fingerprint(HashAlg::Sha256).to_string();
        assert!(checker(&files, UnknownHost::Learn(Trust::Fingerprint(fp)))
            .check_plain_key(&key(ED))
            .unwrap());
        let learnt = std::fs::read_to_string(&ours).unwrap();
        assert_eq!(learnt, format!("[127.0.0.1]:2222 {ED}\n"));
        assert!(checker(&files, UnknownHost::Refuse)
            .check_plain_key(&key(ED))
            .unwrap());

        // Another key, of the same type or of another: changed, for both
        // policies, naming the recorded line; nothing is learnt.
        for other in [EC, ED2] {
            for policy in [UnknownHost::Refuse, UnknownHost::Learn(Trust::Any)] {
                let e = checker(&files, policy)
                    .check_plain_key(&key(other))
                    .unwrap_err();
                let msg = format!("{e:#}");
                assert!(msg.contains("HOST KEY CHANGED"), "{msg}");
                assert!(
                    msg.contains(&format!("{}:1 (ssh-ed25519)", ours.display())),
                    "{msg}"
                );
                assert_eq!(std::fs::read_to_string(&ours).unwrap(), learnt);
            }
        }

        // Revoked in the user's file: refused although our file accepts it.
        std::fs::create_dir_all(users.parent().unwrap()).unwrap();
        std::fs::write(&users, format!("# revoked\n@revoked * {ED}\n")).unwrap();
        for policy in [UnknownHost::Refuse, UnknownHost::Learn(Trust::Any)] {
            let e = checker(&files, policy)
                .check_plain_key(&key(ED))
                .unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains("REVOKED"), "{msg}");
            assert!(msg.contains(&format!("{}:2", users.display())), "{msg}");
        }
        assert_eq!(std::fs::read_to_string(&ours).unwrap(), learnt);

        // A revoked key for a host with no entry is never learnt.
        std::fs::remove_file(&ours).unwrap();
        let e = checker(&files, UnknownHost::Learn(Trust::Any))
            .check_plain_key(&key(ED))
            .unwrap_err();
        assert!(format!("{e:#}").contains("REVOKED"), "{e:#}");
        assert!(!ours.exists());
    }
}

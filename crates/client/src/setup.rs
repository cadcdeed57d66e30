//! `byteback-setup-client`: one command that makes this machine a client of a
//! backup server.
//!
//! 1. Creates the client key (`/etc/byteback/key`, ed25519) if missing.
//! 2. Logs in to the server account once with an admin key or a password,
//!    recording the server's host key in `/etc/byteback/known_hosts` on first
//!    use (and refusing a changed one).
//! 3. Runs `byteback-server enrol` there, which validates the host name and
//!    key, creates the host's subvolume and appends one restricted
//!    authorized_keys line whose forced command is `byteback-server serve --host NAME`.
//! 4. Writes `/etc/byteback/destination` and checks that the new key logs in.
//!
//! Running it again changes nothing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::error::{Context, Error, IoContext, Result};
use clap::Parser;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey};

use crate::cli::{config_dir, default_hostname, known_hosts_files, DEFAULT_SSH_USER};
use crate::conn::{Connection, Destination};
use crate::ssh::{self, Auth, Request, SshOptions, SshTarget, Trust, UnknownHost};

/// Make this machine a client of a byteback server.
#[derive(Debug, Parser)]
#[command(name = "byteback-setup-client", version)]
pub struct SetupArgs {
    /// The server account: user@host: or ssh://user@host:port/ (with
    /// --rotate-key: default /etc/byteback/destination).
    #[arg(short, long, required_unless_present = "rotate_key")]
    destination: Option<String>,
    /// Name to file this machine under. Default: hostname -f.
    #[arg(long)]
    hostname: Option<String>,
    /// Log in with this key (an unrestricted key of the server account) instead of a password.
    #[arg(long)]
    admin_key: Option<PathBuf>,
    /// The server's host key, as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`
    /// prints it there (SHA256:...): a server not yet in known_hosts must
    /// present this key. Without it (or --accept-new-host-key) the key is
    /// shown and confirmed on the terminal before anything is sent.
    #[arg(long, value_name = "SHA256:...")]
    host_key: Option<String>,
    /// Trust the host key a server not yet in known_hosts presents, unchecked
    /// (automation on a network trusted not to be intercepted).
    #[arg(long, conflicts_with = "host_key")]
    accept_new_host_key: bool,
    /// This client's key, created if missing.
    #[arg(short = 'k', long)]
    ssh_key: Option<PathBuf>,
    /// The server program as the server account runs it.
    #[arg(long, default_value = "byteback-server")]
    server_command: String,
    /// Replace the existing client key (byteback 1.x's RSA key, say) with a new
    /// ed25519 key: enrol it (logging in as for set-up), check it, switch
    /// /etc/byteback/key over, then remove the old key's line on the server.
    #[arg(long)]
    rotate_key: bool,
    /// Enrol this machine's key to list and restore the host's backups only
    /// (never back up): for restoring a host's files on another machine.
    /// With --hostname naming that host.
    #[arg(long, conflicts_with = "rotate_key")]
    read_only: bool,
}

/// `byteback-setup-client`.
pub fn setup_main() -> ExitCode {
    let args = SetupArgs::parse();
    // The library's log lines (a server that would not stop, ...) print too.
    if let Err(code) = crate::cli::start_logging("byteback-setup-client", 0, false) {
        return code;
    }
    match setup(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("byteback-setup-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn setup(args: &SetupArgs) -> Result<()> {
    let dir = config_dir();
    let destination = match &args.destination {
        Some(d) => d.clone(),
        None => std::fs::read_to_string(dir.join("destination"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                Error::msg(format!(
                    "no --destination and no {}/destination",
                    dir.display()
                ))
            })?,
    };
    let Destination::Ssh { user, host, port } = Destination::parse(&destination)? else {
        return Err(Error::msg("--destination must be a server (user@host: or ssh://user@host:port/); a local store needs no set-up"));
    };
    // A 1.x-style `user@host:/path`: the path is not used (the key's forced
    // command names the store), so it is not written down for every backup
    // to warn about.
    let destination = match crate::conn::ignored_path(&destination) {
        Some(path) => {
            let plain = &destination[..destination.len() - path.len()];
            eprintln!(
                "byteback-setup-client: the path {path:?} in {destination:?} is not used (the \
                 server's account keeps its store in its home): writing {plain:?}"
            );
            plain.to_string()
        }
        None => destination,
    };
    let target = SshTarget::new(user.unwrap_or_else(|| DEFAULT_SSH_USER.into()), host, port)
        .with_ssh_config()?;
    let name = match &args.hostname {
        Some(h) => h.clone(),
        None => default_hostname()?,
    };
    byteback_protocol::validate_host_name(&name)
        .map_err(|e| Error::msg(format!("host name: {e}")))?;
    if !is_shell_word(&args.server_command) {
        return Err(Error::msg(
            "--server-command may contain only letters, digits and /._+-",
        ));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .on("cannot create", &dir)?;
    }
    // A read-only key is its own (the machine's backup key, if it has one,
    // stays as it is, here and on its server).
    let own_key = if args.read_only {
        // One per host: the server refuses one key with two hosts' lines.
        dir.join(format!("restore-key-{name}"))
    } else {
        dir.join("key")
    };
    let key_path = args.ssh_key.clone().unwrap_or_else(|| own_key.clone());
    if args.rotate_key {
        return rotate(args, &target, &name, &key_path);
    }
    let key = ensure_key(&key_path)?;
    let public = public_line(&key)?;

    let mut trust = match (&args.host_key, args.accept_new_host_key) {
        (Some(fp), _) if fp.starts_with("SHA256:") => Trust::Fingerprint(fp.clone()),
        (Some(fp), _) => {
            return Err(Error::msg(format!(
                "--host-key {}: give the SHA256:... fingerprint `ssh-keygen -lf` prints",
                fp.escape_default()
            )))
        }
        (None, true) => Trust::Any,
        (None, false) => Trust::Ask,
    };
    if trust == Trust::Ask {
        // Asked with no connection open, so the admin may take the time to
        // compare the key with the server's; then only that key is taken.
        let files = known_hosts_files();
        if let Some(key) = ssh::probe_host_key(&target, &checking()) {
            if ssh::host_unknown(&target, &files, &key)? {
                ssh::ask_host_key(&target.to_string(), &key)?;
                trust = Trust::Fingerprint(key.fingerprint(HashAlg::Sha256).to_string());
            }
        }
    }
    // The password is asked for after the host key (as ssh does), so
    // answers typed ahead land where they belong.
    let auth = match &args.admin_key {
        Some(p) => Auth::Key(p.clone()),
        None => Auth::Password(password(&target)?),
    };
    enrol_remote(
        &target,
        &auth,
        UnknownHost::Learn(trust),
        &args.server_command,
        &name,
        &public,
        if args.read_only {
            KeyChange::ReadOnly
        } else {
            KeyChange::Enrol
        },
    )?;

    // Prove the new key works through its forced command, before this
    // machine's backups are pointed at the server.
    let conn = Connection::open_ssh(&target, &key_path, &checking(), "ping")
        .context("the new key does not work yet")?;
    let filed_as = conn.host.clone();
    conn.close()?;
    if args.read_only {
        // The machine's own backups (if any) keep their destination.
        eprintln!(
            "byteback-setup-client: done: this machine may list and restore the backups of host {filed_as} at {destination}, never back up there: byteback-restore --destination {destination} -k {} ...",
            key_path.display()
        );
        return Ok(());
    }
    write_if_changed(&dir.join("destination"), &format!("{destination}\n"))?;
    eprintln!(
        "byteback-setup-client: done: this machine backs up to {destination} as host {filed_as}; run byteback-backup (daily from a timer)"
    );
    if key_path != dir.join("key") {
        eprintln!(
            "byteback-setup-client: warning: the key enrolled is {}, not {}: give byteback-backup and byteback-restore -k {} too",
            key_path.display(),
            dir.join("key").display(),
            key_path.display()
        );
    }
    Ok(())
}

/// Set-up's connections: a known host only, and given up on after
/// [`SETUP_IO_TIMEOUT`] without a byte (a backup's three hours would keep
/// an admin waiting on a server that never answers).
fn checking() -> SshOptions {
    SshOptions {
        known_hosts: known_hosts_files(),
        unknown_host: UnknownHost::Refuse,
        io_timeout: SETUP_IO_TIMEOUT,
        ..SshOptions::default()
    }
}

/// See [`checking`].
const SETUP_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// `TYPE BASE64` of a key.
fn public_line(key: &PrivateKey) -> Result<String> {
    let public = key
        .public_key()
        .to_openssh()
        .context("cannot encode the public key")?;
    Ok(public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// `<path>.pub`, as OpenSSH names a public key.
fn pub_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// `--rotate-key`: a new ed25519 key is made beside the old one
/// (`<key>.new`), enrolled through an admin login as set-up does, and
/// checked; then it replaces the old key (kept as `<key>.retired` until the
/// server has dropped its line), and a second enrolment call removes the
/// old key's line for this host. If that last step fails, the new key is in
/// use already and the warning says what to remove by hand.
fn rotate(args: &SetupArgs, target: &SshTarget, name: &str, key_path: &Path) -> Result<()> {
    if !key_path.exists() {
        return Err(Error::msg(format!(
            "no key {} to rotate; run byteback-setup-client without --rotate-key",
            key_path.display()
        )));
    }
    let old = ssh::load_key(key_path)?;
    let old_public = public_line(&old)?;
    let check = checking();
    // The name the key in use backs up as, from the server: the new key
    // must take its place there, not start a host of its own.
    let conn = Connection::open_ssh(target, key_path, &check, "ping").context(
        "the key in use does not log in; rotating needs it, to learn the name this machine backs up as",
    )?;
    let enrolled_as = conn.host.clone();
    conn.close()?;
    if args.hostname.as_deref().is_some_and(|h| h != enrolled_as) {
        return Err(Error::msg(format!(
            "the key in use backs up as {enrolled_as} on the server, not {name}; leave out --hostname to rotate it"
        )));
    }
    let name = enrolled_as.as_str();
    let new_path = PathBuf::from(format!("{}.new", key_path.display()));
    let new = ensure_key(&new_path)?;
    let new_public = public_line(&new)?;
    if new_public == old_public {
        return Err(Error::msg(format!(
            "{} is the key in use already",
            new_path.display()
        )));
    }
    let auth = match &args.admin_key {
        Some(p) => Auth::Key(p.clone()),
        None => Auth::Password(password(target)?),
    };
    // For a while both keys: this machine's own, on purpose.
    enrol_remote(
        target,
        &auth,
        UnknownHost::Refuse,
        &args.server_command,
        name,
        &new_public,
        KeyChange::Add,
    )?;
    let conn = Connection::open_ssh(target, &new_path, &check, "ping")
        .context("the new key does not work; the old one stays in use")?;
    conn.close()?;
    // Switch over: the old key kept aside (a second name), then the new
    // one renamed over it, so a backup starting meanwhile finds one of them.
    let retired = PathBuf::from(format!("{}.retired", key_path.display()));
    let rename = |from: &Path, to: &Path| -> Result<()> {
        std::fs::rename(from, to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
    };
    let keep_aside = |from: &Path, to: &Path| -> Result<()> {
        let _ = std::fs::remove_file(to);
        std::fs::hard_link(from, to)
            .with_context(|| format!("cannot link {} to {}", from.display(), to.display()))
    };
    keep_aside(key_path, &retired)?;
    if pub_path(key_path).exists() {
        keep_aside(&pub_path(key_path), &pub_path(&retired))?;
    }
    rename(&new_path, key_path)?;
    rename(&pub_path(&new_path), &pub_path(key_path))?;
    eprintln!(
        "byteback-setup-client: switched to the new key {} ({}); the old one ({}) is {}",
        key_path.display(),
        new.fingerprint(HashAlg::Sha256),
        old.fingerprint(HashAlg::Sha256),
        retired.display()
    );
    match enrol_remote(
        target,
        &auth,
        UnknownHost::Refuse,
        &args.server_command,
        name,
        &new_public,
        KeyChange::Retire(&old_public),
    ) {
        Ok(()) => {
            std::fs::remove_file(&retired).on("cannot remove", &retired)?;
            let _ = std::fs::remove_file(pub_path(&retired));
            eprintln!("byteback-setup-client: done: the old key's line is gone from the server and its file removed");
            Ok(())
        }
        Err(e) => {
            eprintln!(
                "byteback-setup-client: warning: the new key is in use, but the old key's line could not be removed from the server ({e:#}); remove the line with key {} from the server account's authorized_keys, then delete {}",
                old.fingerprint(HashAlg::Sha256),
                retired.display()
            );
            Ok(())
        }
    }
}

/// What `byteback-server enrol` is to do with a host's keys.
enum KeyChange<'a> {
    /// Enrol the key; refused if the host has another.
    Enrol,
    /// Enrol the key beside the host's other one (`--add-key`).
    Add,
    /// Enrol the key (already there) and remove this old one's lines.
    Retire(&'a str),
    /// Enrol the key to list and restore only (`--read-only`).
    ReadOnly,
}

/// Runs `byteback-server enrol` on the server through an admin login.
fn enrol_remote(
    target: &SshTarget,
    auth: &Auth,
    unknown_host: UnknownHost,
    server_command: &str,
    name: &str,
    public: &str,
    change: KeyChange<'_>,
) -> Result<()> {
    let opts = SshOptions {
        unknown_host,
        ..checking()
    };
    let mut command = format!("{server_command} enrol --host {name} --key '{public}'");
    match change {
        KeyChange::Enrol => {}
        KeyChange::Add => command.push_str(" --add-key"),
        KeyChange::ReadOnly => command.push_str(" --read-only"),
        KeyChange::Retire(old) => command.push_str(&format!(" --retire-key '{old}'")),
    }
    let stream = ssh::open(target, auth, &opts, Request::Exec(command))?;
    let mut sock = stream.socket.try_clone()?;
    sock.shutdown(std::net::Shutdown::Write)?;
    // The enrol command prints a line or two: more is the server's error
    // (it could otherwise grow this without bound).
    let mut out = Vec::new();
    let (start, limit) = (std::time::Instant::now(), enrol_limit());
    let mut buf = [0u8; 4096];
    loop {
        // Bounded as a whole: a server trickling a byte at a time (each
        // resets the idle timeout) must not hold set-up for days.
        let Some(left) = limit.checked_sub(start.elapsed()).filter(|d| !d.is_zero()) else {
            stream.abort();
            let _ = stream.finish();
            return Err(Error::msg(format!(
                "the server did not finish enrolling within {} s; giving up",
                limit.as_secs()
            )));
        };
        sock.set_read_timeout(Some(left))?;
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
        if out.len() as u64 > ENROL_OUTPUT_MAX {
            break;
        }
    }
    drop(sock);
    if out.len() as u64 > ENROL_OUTPUT_MAX {
        return Err(Error::msg(format!(
            "the server printed more than {ENROL_OUTPUT_MAX} bytes while enrolling; refusing"
        )));
    }
    let status = stream.finish()?;
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        eprintln!("server: {}", byteback_protocol::escape_bytes(line));
    }
    match status {
        Some(0) => Ok(()),
        Some(n) => Err(Error::msg(format!(
            "enrolment on the server failed (exit status {n})"
        ))),
        None => Err(Error::msg(
            "enrolment on the server ended without an exit status",
        )),
    }
}

/// Most output taken from the server's enrol command.
const ENROL_OUTPUT_MAX: u64 = 64 << 10;

/// Longest the server's enrol command may take, output and all.
const ENROL_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);
/// [`ENROL_LIMIT`]; in a debug build, for the tests,
/// `$BYTEBACK_TEST_ENROL_LIMIT_SECS` if set.
fn enrol_limit() -> std::time::Duration {
    crate::test_knob("BYTEBACK_TEST_ENROL_LIMIT_SECS", ENROL_LIMIT)
}

fn is_shell_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b))
}

/// Loads the client key, or creates an ed25519 key (mode 0600); its
/// `.pub` is written too where missing (a rotation cut short, say).
fn ensure_key(path: &Path) -> Result<PrivateKey> {
    if path.exists() {
        let key = ssh::load_key(path)?;
        if !pub_path(path).exists() {
            // Only a convenience: a read-only key directory is no error.
            if let Err(e) = write_public(&key, path) {
                eprintln!("byteback-setup-client: warning: {e:#}");
            }
        }
        eprintln!(
            "byteback-setup-client: using key {} ({})",
            path.display(),
            key.fingerprint(HashAlg::Sha256)
        );
        return Ok(key);
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    let comment = format!(
        "byteback@{}",
        rustix::system::uname().nodename().to_string_lossy()
    );
    key.set_comment(comment);
    let pem = key
        .to_openssh(LineEnding::LF)
        .context("cannot encode the key")?;
    byteback_protocol::os::write_atomic(path, pem.as_bytes(), 0o600).on("cannot write", path)?;
    write_public(&key, path)?;
    eprintln!(
        "byteback-setup-client: created key {} ({})",
        path.display(),
        key.fingerprint(HashAlg::Sha256)
    );
    Ok(key)
}

/// Writes `<path>.pub` for `key` (atomically, never through a symlink).
fn write_public(key: &PrivateKey, path: &Path) -> Result<()> {
    let public = key.public_key().to_openssh()?;
    let pub_file = pub_path(path);
    byteback_protocol::os::write_atomic(&pub_file, format!("{public}\n").as_bytes(), 0o644)
        .on("cannot write", &pub_file)?;
    Ok(())
}

/// The admin password: `$BYTEBACK_PASSWORD` (for automation) or asked on the terminal.
fn password(target: &SshTarget) -> Result<String> {
    if let Ok(p) = std::env::var("BYTEBACK_PASSWORD") {
        return Ok(p);
    }
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| {
            Error::msg(
                "no terminal to ask for the account's password on: give it in \
                 $BYTEBACK_PASSWORD, or log in with --admin-key KEY",
            )
        })?;
    write!(tty, "Password for {target}: ")?;
    tty.flush()?;
    let old = rustix::termios::tcgetattr(&tty).context("cannot read terminal settings")?;
    let mut quiet = old.clone();
    quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
    rustix::termios::tcsetattr(&tty, rustix::termios::OptionalActions::Now, &quiet)?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read = loop {
        match tty.read(&mut byte) {
            Ok(0) => break Ok(()),
            Ok(_) if byte[0] == b'\n' => break Ok(()),
            Ok(_) => line.push(byte[0]),
            Err(e) => break Err(e),
        }
    };
    let _ = rustix::termios::tcsetattr(&tty, rustix::termios::OptionalActions::Now, &old);
    let _ = writeln!(tty);
    read?;
    String::from_utf8(line).map_err(|_| Error::msg("the password is not UTF-8"))
}

/// Writes `path` atomically unless it already holds `content`.
fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    byteback_protocol::os::write_atomic(path, content.as_bytes(), 0o644)
        .on("cannot write", path)?;
    Ok(())
}

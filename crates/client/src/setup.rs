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
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey};

use crate::cli::{config_dir, default_hostname, known_hosts_files, DEFAULT_SSH_USER};
use crate::conn::{Connection, Destination};
use crate::ssh::{self, Auth, Request, SshOptions, SshTarget, UnknownHost};

/// Make this machine a client of a byteback server.
#[derive(Debug, Parser)]
#[command(name = "byteback-setup-client", version)]
pub struct SetupArgs {
    /// The server account: user@host: or ssh://user@host:port/.
    #[arg(short, long)]
    destination: String,
    /// Name to file this machine under. Default: hostname -f.
    #[arg(long)]
    hostname: Option<String>,
    /// Log in with this key (an unrestricted key of the server account) instead of a password.
    #[arg(long)]
    admin_key: Option<PathBuf>,
    /// This client's key, created if missing.
    #[arg(short = 'k', long)]
    ssh_key: Option<PathBuf>,
    /// The server program as the server account runs it.
    #[arg(long, default_value = "byteback-server")]
    server_command: String,
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
    let Destination::Ssh { user, host, port } = Destination::parse(&args.destination)? else {
        bail!("--destination must be a server (user@host: or ssh://user@host:port/); a local store needs no set-up");
    };
    let target = SshTarget {
        user: user.unwrap_or_else(|| DEFAULT_SSH_USER.into()),
        host,
        port,
    };
    let name = match &args.hostname {
        Some(h) => h.clone(),
        None => default_hostname()?,
    };
    byteback_protocol::validate_host_name(&name).map_err(|e| anyhow!("host name: {e}"))?;
    if !is_shell_word(&args.server_command) {
        bail!("--server-command may contain only letters, digits and /._+-");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key_path = args.ssh_key.clone().unwrap_or_else(|| dir.join("key"));
    let key = ensure_key(&key_path)?;
    let public = key
        .public_key()
        .to_openssh()
        .context("cannot encode the public key")?;
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");

    let auth = match &args.admin_key {
        Some(p) => Auth::Key(p.clone()),
        None => Auth::Password(password(&target)?),
    };
    let opts = SshOptions {
        known_hosts: known_hosts_files(),
        unknown_host: UnknownHost::Learn,
        ..SshOptions::default()
    };
    let command = format!(
        "{} enrol --host {} --key '{}'",
        args.server_command, name, public
    );
    let stream = ssh::open(&target, &auth, &opts, Request::Exec(command))?;
    let mut sock = stream.socket.try_clone()?;
    sock.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    sock.read_to_end(&mut out)?;
    drop(sock);
    let status = stream.finish()?;
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        eprintln!("server: {}", byteback_protocol::escape_bytes(line));
    }
    match status {
        Some(0) => {}
        Some(n) => bail!("enrolment on the server failed (exit status {n})"),
        None => bail!("enrolment on the server ended without an exit status"),
    }

    write_if_changed(&dir.join("destination"), &format!("{}\n", args.destination))?;

    // Prove the new key works through its forced command.
    let check = SshOptions {
        known_hosts: known_hosts_files(),
        unknown_host: UnknownHost::Refuse,
        ..SshOptions::default()
    };
    let conn = Connection::open_ssh(&target, &key_path, &check, "ping")
        .context("the new key does not work yet")?;
    let filed_as = conn.host.clone();
    conn.close()?;
    eprintln!(
        "byteback-setup-client: done: this machine backs up to {} as host {filed_as}; run byteback-backup (daily from a timer)",
        args.destination
    );
    Ok(())
}

fn is_shell_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b))
}

/// Loads the client key, or creates an ed25519 key (mode 0600) and its `.pub`.
fn ensure_key(path: &Path) -> Result<PrivateKey> {
    if path.exists() {
        let key = ssh::load_key(path)?;
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
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let public = key.public_key().to_openssh()?;
    std::fs::write(path.with_extension("pub"), format!("{public}\n"))?;
    eprintln!(
        "byteback-setup-client: created key {} ({})",
        path.display(),
        key.fingerprint(HashAlg::Sha256)
    );
    Ok(key)
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
        .context("no terminal to ask for a password on; give --admin-key")?;
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
    String::from_utf8(line).map_err(|_| anyhow!("the password is not UTF-8"))
}

/// Writes `path` atomically unless it already holds `content`.
fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

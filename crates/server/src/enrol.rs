//! Server side of client set-up, and the forced command's verb.
//!
//! `byteback-server enrol --host NAME --key 'TYPE BASE64'` runs once per client,
//! from an admin login to the server account. It validates the name and the
//! key, creates the host's directory (a btrfs subvolume where the store is
//! btrfs) and appends one line to the account's authorized_keys:
//!
//! ```text
//! restrict,from="CLIENT_IP",command="/path/byteback-server serve --host NAME" TYPE BASE64 byteback:NAME
//! ```
//!
//! Running it again with the same name and key changes nothing.

use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::serve::Access;
use crate::store::Store;

/// Key types accepted for clients.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Whether `s` is a key type byteback accepts for clients.
pub fn is_key_type(s: &str) -> bool {
    KEY_TYPES.contains(&s)
}

/// The longest public key line accepted (a 16384-bit RSA key is ~2.8 KB).
const MAX_KEY_LEN: usize = 4096;

/// What sshd may ask a forced `byteback-server serve` for, via SSH_ORIGINAL_COMMAND.
///
/// One word from a fixed set, never executed: `backup` (read-write),
/// `list`, `restore`, `ping` (read-only). A subsystem request configured as
/// `Subsystem byteback /path/to/byteback-server` arrives as that path and is
/// read-write. No value (a plain `ssh` login) is treated as `backup`, which only
/// speaks the protocol. Anything else is refused.
pub fn access_for_original_command(cmd: Option<&str>) -> Result<Access> {
    let Some(cmd) = cmd else {
        return Ok(Access::Full);
    };
    let word = cmd.trim();
    match word {
        "" | "backup" => Ok(Access::Full),
        "list" | "restore" | "ping" => Ok(Access::ReadOnly),
        w if !w.contains(char::is_whitespace)
            && (w == "byteback-server" || w.ends_with("/byteback-server")) =>
        {
            Ok(Access::Full)
        }
        _ => {
            let shown: String = word.chars().take(80).collect();
            Err(Error::Refused(format!(
                "refused: this key may only run byteback (backup, list, restore, ping), not {shown:?}"
            )))
        }
    }
}

/// A validated `TYPE BASE64` public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyLine {
    /// Key type, e.g. `ssh-ed25519`.
    pub kind: String,
    /// Base64 key blob.
    pub blob: String,
}

/// Checks a public key given as `TYPE BASE64 [COMMENT]`; the comment is dropped.
pub fn parse_public_key(s: &str) -> Result<PublicKeyLine> {
    if s.len() > MAX_KEY_LEN {
        return Err(Error::Usage(format!(
            "the key is longer than {MAX_KEY_LEN} bytes"
        )));
    }
    if s.bytes().any(|b| b.is_ascii_control()) {
        return Err(Error::Usage(
            "the key contains a control character (newline, NUL, ...)".into(),
        ));
    }
    let mut parts = s.split(' ').filter(|p| !p.is_empty());
    let kind = parts
        .next()
        .ok_or_else(|| Error::Usage("empty key".into()))?;
    let blob = parts
        .next()
        .ok_or_else(|| Error::Usage("the key has no base64 part".into()))?;
    if !KEY_TYPES.contains(&kind) {
        return Err(Error::Usage(format!("unsupported key type {kind:?}")));
    }
    let raw = base64_decode(blob)
        .ok_or_else(|| Error::Usage("the key's base64 part is malformed".into()))?;
    // The blob starts with the key type as an SSH string.
    if raw.len() < 4 {
        return Err(Error::Usage("the key blob is too short".into()));
    }
    let n = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    if raw.get(4..4 + n) != Some(kind.as_bytes()) {
        return Err(Error::Usage(format!(
            "the key blob does not match its type {kind:?}"
        )));
    }
    Ok(PublicKeyLine {
        kind: kind.to_string(),
        blob: blob.to_string(),
    })
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.is_empty() || !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let chunks = s.len() / 4;
    for (i, q) in s.chunks(4).enumerate() {
        let last = i + 1 == chunks;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut acc = 0u32;
        for &c in &q[..4 - pad] {
            acc = (acc << 6) | val(c)?;
        }
        acc <<= 6 * pad as u32;
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

/// Everything enrolment needs.
#[derive(Debug, Clone)]
pub struct EnrolConfig {
    /// Store root.
    pub store: PathBuf,
    /// Whether `--store` was given (then the forced command names it too).
    pub store_explicit: bool,
    /// The new host's name.
    pub host: String,
    /// The client's key.
    pub key: PublicKeyLine,
    /// Address the key may log in from.
    pub from: IpAddr,
    /// The authorized_keys file to extend.
    pub authorized_keys: PathBuf,
    /// This program, as sshd should start it.
    pub server_exe: PathBuf,
    /// A key this host used before (`--retire-key`): its lines that let it
    /// back up as this host (byteback's forced command, or 1.x's
    /// `byteback-receive` with `BYTEBACK_HOST=NAME`) are removed.
    pub retire: Option<PublicKeyLine>,
    /// Another key may back up as this host too (`--add-key`): without
    /// it, enrolling a new key for a host that has one is refused, since
    /// two machines of one name would back up into one tree.
    pub add_key: bool,
    /// The key may only list and restore (`serve --read-only`).
    pub read_only: bool,
}

/// Whether an authorized_keys line lets `blob` back up as `host` and nothing
/// else: byteback's forced command for `host`, or 1.x's receiver for it.
fn is_host_line(line: &str, blob: &str, host: &str) -> bool {
    host_line_key(line, host).as_deref() == Some(blob)
}

/// The key (its base64 blob) of an authorized_keys line that lets it back
/// up as `host` (see [`is_host_line`]), if the line is one.
fn host_line_key(line: &str, host: &str) -> Option<String> {
    let (opts, key) = crate::migrate::split_options(line.trim())?;
    let blob = key.split_whitespace().nth(1)?.to_string();
    let Some((_, Some(cmd))) = opts.iter().find(|(n, _)| n == "command") else {
        return None;
    };
    // Written by hand too: the options of `serve` in any order, and
    // `--host=NAME` as clap takes it.
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let byteback = match words.split_first() {
        Some((exe, args)) => {
            (*exe == "byteback-server" || exe.ends_with("/byteback-server"))
                && args.first() == Some(&"serve")
                && !args.contains(&"--read-only")
                && (args.windows(2).any(|w| w == ["--host", host])
                    || args.iter().any(|a| a.strip_prefix("--host=") == Some(host)))
        }
        None => false,
    };
    let receive = crate::migrate::is_receive(cmd)
        && opts.iter().any(|(n, v)| {
            n == "environment" && v.as_deref() == Some(&format!("BYTEBACK_HOST={host}"))
        });
    (byteback || receive).then_some(blob)
}

/// Refuses a new key for a host that already has another (not the one
/// being retired), unless [`EnrolConfig::add_key`].
fn check_host_keys(cfg: &EnrolConfig, existing: &str) -> Result<()> {
    // A key that cannot back up is never a second machine in the tree.
    if cfg.add_key || cfg.read_only {
        return Ok(());
    }
    let retired = cfg.retire.as_ref().map(|r| r.blob.as_str());
    let other = existing
        .lines()
        .filter_map(|l| host_line_key(l, &cfg.host))
        .find(|b| *b != cfg.key.blob && Some(b.as_str()) != retired);
    match other {
        None => Ok(()),
        Some(b) => Err(Error::Usage(format!(
            "host {} already has a key (…{}): a second machine of that name would back up into the same tree, each backup deleting the other's files. Give this machine its own --hostname; if it is the same machine with a new key, retire the old one: on the client, byteback-setup-client --rotate-key (which still holds the old key); on the server, as the store's account, byteback-server enrol --retire-key OLDKEY, or --add-key to keep both",
            cfg.host,
            &b[b.len().saturating_sub(16)..]
        ))),
    }
}

/// What enrolment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// A line was added.
    Added,
    /// The same key was already enrolled for the same host.
    Unchanged,
    /// The same key's line for the same host allowed another address
    /// (`from=`, the client's address changed): replaced.
    Moved(String),
}

/// The client address from sshd's `SSH_CONNECTION` ("client-ip client-port server-ip server-port").
pub fn client_address(ssh_connection: &str) -> Result<IpAddr> {
    let first = ssh_connection
        .split_whitespace()
        .next()
        .ok_or_else(|| Error::Usage("SSH_CONNECTION is empty".into()))?;
    first
        .parse()
        .map_err(|_| Error::Usage(format!("SSH_CONNECTION names no client address: {first:?}")))
}

/// Whether `s` can go into a forced command unquoted: letters, digits and `/._+-`.
fn is_plain_word(s: &&str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b))
}

/// The authorized_keys line for a host.
pub fn key_line(cfg: &EnrolConfig) -> Result<String> {
    let exe = cfg
        .server_exe
        .to_str()
        .filter(is_plain_word)
        .ok_or_else(|| {
            Error::Usage(format!(
                "the server program's path {} has characters unsafe in a forced command",
                cfg.server_exe.display()
            ))
        })?;
    let mut command = format!("{exe} serve --host {}", cfg.host);
    if cfg.read_only {
        command.push_str(" --read-only");
    }
    if cfg.store_explicit {
        let store = cfg.store.to_str().filter(is_plain_word).ok_or_else(|| {
            Error::Usage("the store path has characters unsafe in a forced command".into())
        })?;
        command.push_str(&format!(" --store {store}"));
    }
    Ok(format!(
        "restrict,from=\"{}\",command=\"{command}\" {} {} byteback:{}\n",
        cfg.from, cfg.key.kind, cfg.key.blob, cfg.host
    ))
}

/// Run as root, becomes the store's account before `authorized_keys` is
/// edited (as prune, status and verify do): sshd reads the file as that
/// account, which must own it. `keys` is the file given, if one was; the
/// one to edit is returned (by default the account's own, in the home
/// directory its passwd entry names, not root's `$HOME`). Refuses what
/// the account could not then edit (the file, its directory or the
/// enrolment lock another account owns: left by an enrol run as root
/// before?), naming the fix; refuses what would still be written as root
/// for another account (a store root owns, keys another account's); and
/// warns when the store's account is root itself: every client's key
/// would then run the server as root, where the set-up makes an account of
/// its own. Not run as root, changes nothing.
pub fn as_keys_owner(store: &Path, keys: Option<PathBuf>) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let default = || {
        let me = rustix::process::geteuid().as_raw();
        default_authorized_keys()
            .or_else(|| crate::admin::home_of_uid(me).map(|h| h.join(".ssh/authorized_keys")))
            .ok_or_else(|| Error::Usage("no --authorized-keys given and no home directory".into()))
    };
    if !rustix::process::geteuid().is_root() {
        return keys.map_or_else(default, Ok);
    }
    let owner = std::fs::metadata(store)
        .map_err(|e| Error::io("cannot look at", store.display(), e))?
        .uid();
    if owner != 0 {
        let home = crate::admin::home_of_uid(owner);
        let keys = match keys {
            Some(k) => k,
            None => home
                .as_ref()
                .map(|h| h.join(".ssh").join("authorized_keys"))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "the store's owner (uid {owner}) has no home directory: give \
                         --authorized-keys"
                    ))
                })?,
        };
        let dir = keys.parent().unwrap_or(Path::new("/"));
        // Each as it is, a symlink not followed: the account's own symlink
        // passes (what it leads to is then written as the account, which
        // can do no more than it could anyway).
        for p in [
            keys.clone(),
            dir.to_path_buf(),
            dir.join(".byteback-enrol.lock"),
        ] {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.uid() == owner {
                continue;
            }
            // A chown is advice only for a file or directory (never a
            // symlink, which chown follows) within the account's own home,
            // as it resolves: keys elsewhere (root's) must never be handed
            // to it.
            let within = |p: &Path| {
                let real = |q: &Path| std::fs::canonicalize(q).ok();
                match (real(p), home.as_deref().and_then(real)) {
                    (Some(p), Some(h)) => p.starts_with(h),
                    _ => false,
                }
            };
            let theirs = !m.file_type().is_symlink() && within(&p);
            return Err(Error::Usage(if theirs {
                format!(
                    "{} belongs to uid {}, not to the store's account (uid {owner}), which \
                     edits the keys (left by an enrol run as root?): `chown {owner}: {}`",
                    p.display(),
                    m.uid(),
                    p.display()
                )
            } else {
                format!(
                    "{} belongs to uid {}, not to the store's account (uid {owner}), which \
                     edits the keys: give the account's own with --authorized-keys (default {})",
                    p.display(),
                    m.uid(),
                    home.as_ref()
                        .map_or("its home's .ssh/authorized_keys".into(), |h| h
                            .join(".ssh/authorized_keys")
                            .display()
                            .to_string())
                )
            }));
        }
        crate::admin::become_store_owner(store)?;
        // The store as it was when looked at, not one swapped since.
        if rustix::process::geteuid().as_raw() != owner {
            return Err(Error::Usage(format!(
                "the owner of the store {} changed while enrol looked at it",
                store.display()
            )));
        }
        return Ok(keys);
    }
    let keys = keys.map_or_else(default, Ok)?;
    // The file, or else the nearest directory of its path there is.
    let found = keys
        .ancestors()
        .find_map(|p| std::fs::symlink_metadata(p).ok().map(|m| (p, m.uid())));
    if let Some((p, uid)) = found.filter(|&(_, uid)| uid != 0) {
        return Err(Error::Usage(format!(
            "the store {} is root's, but {} is uid {uid}'s: the keys must be edited as the \
             store's account, which owns both (give the account's store with --store, chown \
             the store to it, or give the --authorized-keys of root)",
            store.display(),
            p.display()
        )));
    }
    tracing::warn!(
        "the store {} and {} are root's: clients' keys will run byteback-server as root; the \
         set-up makes an account of its own for the store (byteback), which keeps a client \
         that breaks into the server away from root",
        store.display(),
        keys.display()
    );
    Ok(keys)
}

/// Enrols one client; idempotent.
pub fn enrol(cfg: &EnrolConfig) -> Result<Enrolled> {
    enrol_and_retire(cfg).map(|(e, _)| e)
}

/// Enrols one client and removes the lines of the key it retires (see
/// [`EnrolConfig::retire`]); returns how many lines were removed. One atomic
/// rewrite of the file; idempotent.
/// Long (~90 lines) because everything from the read to the atomic
/// replace happens under the enrolment lock, in one scope.
pub fn enrol_and_retire(cfg: &EnrolConfig) -> Result<(Enrolled, usize)> {
    if cfg.retire.as_ref().is_some_and(|r| r.blob == cfg.key.blob) {
        return Err(Error::Usage(
            "--retire-key is the key being enrolled".into(),
        ));
    }
    byteback_protocol::validate_host_name(&cfg.host)
        .map_err(|e| Error::Usage(format!("host name: {e}")))?;
    let line = key_line(cfg)?;
    let store = Store::open(&cfg.store)?;

    let ssh_dir = cfg
        .authorized_keys
        .parent()
        .ok_or_else(|| Error::Usage("authorized_keys has no directory".into()))?;
    if !ssh_dir.exists() {
        let at = || ssh_dir.display().to_string();
        std::fs::create_dir_all(ssh_dir).op("create", at)?;
        std::fs::set_permissions(ssh_dir, std::fs::Permissions::from_mode(0o700))
            .op("set the mode of", at)?;
    }
    // One enrolment at a time edits the file.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(ssh_dir.join(".byteback-enrol.lock"))
        .op("lock", || ssh_dir.display().to_string())?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .op("lock", || ssh_dir.display().to_string())?;
    let keys = || cfg.authorized_keys.display().to_string();

    // Replaced by a regular file below: a symlink (or anything else) in
    // its place is the admin's to sort out, not to be overwritten.
    match std::fs::symlink_metadata(&cfg.authorized_keys) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(Error::Usage(format!(
                "{} is not a regular file (a symlink?): not rewritten",
                keys()
            )))
        }
        _ => {}
    }
    let mut existing = String::new();
    match std::fs::File::open(&cfg.authorized_keys) {
        Ok(mut f) => {
            f.read_to_string(&mut existing).op("read", keys)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("read", keys(), e)),
    }
    let mut enrolled = Enrolled::Added;
    let mut moved = None;
    for l in existing.lines() {
        if l.split_whitespace().any(|w| w == cfg.key.blob) {
            if l.trim_end() == line.trim_end() {
                enrolled = Enrolled::Unchanged;
                break;
            }
            if let Some(old) = moved_from(cfg, l) {
                enrolled = Enrolled::Moved(old);
                moved = Some(l.to_string());
                break;
            }
            return Err(Error::Usage(format!(
                "this key is already in {} with other options; remove that line first: {l}",
                cfg.authorized_keys.display()
            )));
        }
    }
    if enrolled == Enrolled::Added {
        check_host_keys(cfg, &existing)?;
    }
    // A moved client's line gives way to the new one, in its place.
    let original = existing.clone();
    let existing = match &moved {
        Some(old) => existing.replacen(old.as_str(), line.trim_end(), 1),
        None => existing,
    };
    // The host's tree first: a key must never point at a missing host.
    store.host(&cfg.host, true)?;

    let mut content = String::with_capacity(existing.len() + line.len());
    let mut retired = 0;
    for l in existing.split_inclusive('\n') {
        match &cfg.retire {
            Some(old) if is_host_line(l, &old.blob, &cfg.host) => retired += 1,
            _ => content.push_str(l),
        }
    }
    if enrolled == Enrolled::Added {
        if !content.is_empty() && !content.ends_with('\n') {
            content.push('\n');
        }
        content.push_str(&line);
    }
    if cfg.retire.is_some() && retired == 0 {
        return Err(Error::Usage(format!(
            "the key to retire has no line for host {} in {}: nothing changed (is this machine enrolled under another name? give that name with --hostname)",
            cfg.host,
            cfg.authorized_keys.display()
        )));
    }
    if content == original {
        return Ok((enrolled, 0));
    }
    // Temporary file beside it, fsync, rename, fsync of the directory.
    byteback_protocol::os::write_atomic(&cfg.authorized_keys, content.as_bytes(), 0o600)
        .op("replace", keys)?;
    Ok((enrolled, retired))
}

/// The address an authorized_keys line `l` allowed, if it is exactly the
/// line [`key_line`] writes for `cfg` but for its `from=`: the same key,
/// host, store and access, enrolled from another address (a client whose
/// address changed, running set-up again).
fn moved_from(cfg: &EnrolConfig, l: &str) -> Option<String> {
    let (opts, _) = crate::migrate::split_options(l.trim())?;
    let old: IpAddr = opts
        .iter()
        .find(|(n, _)| n == "from")?
        .1
        .as_deref()?
        .parse()
        .ok()?;
    let as_before = EnrolConfig {
        from: old,
        ..cfg.clone()
    };
    (key_line(&as_before).ok()?.trim_end() == l.trim_end()).then(|| old.to_string())
}

/// The default authorized_keys file of the running account.
pub fn default_authorized_keys() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .map(|h| h.join(".ssh").join("authorized_keys"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    /// An enrolment of `ED` for `host` from 192.0.2.7, its store and
    /// authorized_keys in `dir`.
    fn test_config(dir: &std::path::Path, host: &str) -> EnrolConfig {
        EnrolConfig {
            store: dir.join("store"),
            store_explicit: false,
            host: host.into(),
            key: parse_public_key(ED).unwrap(),
            from: "192.0.2.7".parse().unwrap(),
            authorized_keys: dir.join(".ssh/authorized_keys"),
            server_exe: "/usr/local/bin/byteback-server".into(),
            retire: None,
            add_key: false,
            read_only: false,
        }
    }

    #[test]
    fn verbs() {
        assert_eq!(access_for_original_command(None).unwrap(), Access::Full);
        assert_eq!(
            access_for_original_command(Some("backup")).unwrap(),
            Access::Full
        );
        for v in ["list", "restore", "ping", " ping "] {
            assert_eq!(
                access_for_original_command(Some(v)).unwrap(),
                Access::ReadOnly
            );
        }
        assert_eq!(
            access_for_original_command(Some("/usr/local/bin/byteback-server")).unwrap(),
            Access::Full
        );
        for bad in [
            "sh",
            "backup; sh",
            "serve --host other",
            "byteback-server serve --host other",
            "/usr/lib/openssh/sftp-server",
            "internal-sftp",
            "rsync --server -a . /",
            "backup\nsh",
        ] {
            assert!(access_for_original_command(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys() {
        let k = parse_public_key(&format!("{ED} root@x")).unwrap();
        assert_eq!(k.kind, "ssh-ed25519");
        assert!(parse_public_key(ED).is_ok());
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            &format!("{ED}\nssh-ed25519 AAAA"),
            &format!("{ED}\"command=\"sh"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJ!",
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        ] {
            assert!(parse_public_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbA==").unwrap(), b"hell");
        assert_eq!(base64_decode("aGVs").unwrap(), b"hel");
        assert!(base64_decode("aGV").is_none());
        assert!(base64_decode("a=Vs").is_none());
    }

    #[test]
    fn enrol_twice_changes_nothing_and_lines_are_safe() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path(), "web1.example.com");
        std::fs::create_dir_all(&cfg.store).unwrap();
        assert_eq!(enrol(&cfg).unwrap(), Enrolled::Added);
        let first = std::fs::read(&cfg.authorized_keys).unwrap();
        assert_eq!(enrol(&cfg).unwrap(), Enrolled::Unchanged);
        assert_eq!(std::fs::read(&cfg.authorized_keys).unwrap(), first);
        let text = String::from_utf8(first).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.starts_with(
            "restrict,from=\"192.0.2.7\",command=\"/usr/local/bin/byteback-server serve --host web1.example.com\" ssh-ed25519 "
        ));
        assert!(cfg.store.join("web1.example.com/current").is_dir());
        // The same key for another host is refused.
        let mut other = cfg.clone();
        other.host = "db1".into();
        assert!(enrol(&other).is_err());
        // Bad names never reach the file.
        for bad in [
            "../x",
            "a\",command=\"sh",
            "",
            "a b",
            "x/y",
            "byteback.toml",
            ".ssh",
            "-x",
        ] {
            let mut c = cfg.clone();
            c.host = bad.into();
            assert!(enrol(&c).is_err(), "{bad:?}");
        }
        assert_eq!(
            std::fs::read_to_string(&cfg.authorized_keys)
                .unwrap()
                .lines()
                .count(),
            1
        );
    }

    #[test]
    fn a_retired_key_loses_only_its_lines_for_this_host() {
        const ED2: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIXg4VM4UPiEfw9Djn2zEX8BuIdk7aLdj3ut+AdW0w5J";
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let ak = dir.path().join(".ssh/authorized_keys");
        std::fs::create_dir_all(ak.parent().unwrap()).unwrap();
        let old_blob = ED.split(' ').nth(1).unwrap();
        let before = format!(
            "{ED} admin\ncommand=\"byteback-receive\",from=\"192.0.2.7\",environment=\"BYTEBACK_HOST=web1\" {ED} root@web1\ncommand=\"byteback-receive\",environment=\"BYTEBACK_HOST=other\" {ED}\n"
        );
        std::fs::write(&ak, &before).unwrap();
        let cfg = EnrolConfig {
            store,
            store_explicit: false,
            host: "web1".into(),
            key: parse_public_key(ED2).unwrap(),
            from: "192.0.2.7".parse().unwrap(),
            authorized_keys: ak.clone(),
            server_exe: "/usr/local/bin/byteback-server".into(),
            retire: Some(parse_public_key(ED).unwrap()),
            add_key: false,
            read_only: false,
        };
        // The old key is on other lines too: enrolling the new one is fine.
        assert_eq!(enrol_and_retire(&cfg).unwrap(), (Enrolled::Added, 1));
        let after = std::fs::read_to_string(&ak).unwrap();
        let lines: Vec<&str> = after.lines().collect();
        assert_eq!(lines.len(), 3, "{after}");
        assert!(lines[0].ends_with(" admin"), "the unrestricted line stays");
        assert!(
            lines[1].contains("BYTEBACK_HOST=other"),
            "another host's line stays"
        );
        assert!(lines[2].contains("serve --host web1") && lines[2].contains(ED2));
        assert!(!lines[2].contains(old_blob));
        // Again: nothing left to retire, which is said (a rotation that
        // removed nothing must not pass for one that did).
        let e = enrol_and_retire(&cfg).unwrap_err().to_string();
        assert!(e.contains("no line for host web1"), "{e}");
        assert_eq!(std::fs::read_to_string(&ak).unwrap(), after);
        let mut same = cfg.clone();
        same.retire = Some(parse_public_key(ED2).unwrap());
        assert!(enrol_and_retire(&same).is_err());
    }

    /// A client whose address changed runs set-up again: its line (the
    /// same key, host, store and access) moves to the new address, in its
    /// place. Before, set-up failed ("already ... with other options") and
    /// the admin had to edit the file. A line that differs otherwise is
    /// still refused.
    #[test]
    fn a_client_whose_address_changed_is_enrolled_from_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path(), "laptop");
        std::fs::create_dir_all(&cfg.store).unwrap();
        std::fs::create_dir_all(dir.path().join(".ssh")).unwrap();
        std::fs::write(
            &cfg.authorized_keys,
            "# admin\nssh-ed25519 AAAAadmin admin\n",
        )
        .unwrap();
        assert_eq!(enrol(&cfg).unwrap(), Enrolled::Added);
        let moved = EnrolConfig {
            from: "192.0.2.8".parse().unwrap(),
            ..cfg.clone()
        };
        assert_eq!(enrol(&moved).unwrap(), Enrolled::Moved("192.0.2.7".into()));
        let text = std::fs::read_to_string(&cfg.authorized_keys).unwrap();
        assert_eq!(
            text,
            format!(
                "# admin\nssh-ed25519 AAAAadmin admin\n{}",
                key_line(&moved).unwrap()
            )
        );
        assert_eq!(enrol(&moved).unwrap(), Enrolled::Unchanged);
        // Another host's name, or read-only access: not a move.
        for other in [
            EnrolConfig {
                host: "other".into(),
                ..moved.clone()
            },
            EnrolConfig {
                read_only: true,
                from: "192.0.2.9".parse().unwrap(),
                ..moved.clone()
            },
        ] {
            let e = enrol(&other).unwrap_err().to_string();
            assert!(e.contains("with other options"), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&cfg.authorized_keys).unwrap(), text);
    }

    /// A line written by hand with `serve`'s options in another order, or
    /// `--host=NAME`, is that host's as much as one `enrol` wrote: before,
    /// it was not seen, and a second key was enrolled without `--add-key`
    /// (two machines in one tree) or a retired one kept.
    #[test]
    fn a_host_line_written_by_hand_is_the_hosts() {
        let blob = ED.split_whitespace().nth(1).unwrap();
        for cmd in [
            "/usr/bin/byteback-server serve --host web9b",
            "/usr/bin/byteback-server serve --store /srv/b --host web9b",
            "byteback-server serve --host=web9b --store /srv/b",
        ] {
            let line = format!("restrict,command=\"{cmd}\" {ED} x");
            assert_eq!(
                host_line_key(&line, "web9b").as_deref(),
                Some(blob),
                "{cmd}"
            );
            assert_eq!(host_line_key(&line, "web9"), None, "{cmd}");
        }
        for cmd in [
            "/usr/bin/byteback-server enrol --host web9b",
            "/usr/bin/byteback-server serve --store web9b",
            "/usr/bin/other serve --host web9b",
        ] {
            let line = format!("restrict,command=\"{cmd}\" {ED} x");
            assert_eq!(host_line_key(&line, "web9b"), None, "{cmd}");
        }
    }

    /// A new key for a host that has one is a second machine of the same
    /// name (a cloned image, a default host name) unless said otherwise:
    /// refused, naming the way out; `--add-key` keeps both. Retiring a key
    /// that has no line for the host changes nothing and says so.
    #[test]
    fn a_second_key_for_a_host_is_refused_unless_added_on_purpose() {
        const ED2: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIXg4VM4UPiEfw9Djn2zEX8BuIdk7aLdj3ut+AdW0w5J";
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path(), "debian");
        std::fs::create_dir_all(&cfg.store).unwrap();
        assert_eq!(enrol(&cfg).unwrap(), Enrolled::Added);
        let one = std::fs::read_to_string(&cfg.authorized_keys).unwrap();
        let mut second = cfg.clone();
        second.key = parse_public_key(ED2).unwrap();
        let e = enrol(&second).unwrap_err().to_string();
        assert!(e.contains("host debian already has a key"), "{e}");
        assert!(e.contains("--rotate-key") && e.contains("--add-key"), "{e}");
        assert_eq!(std::fs::read_to_string(&cfg.authorized_keys).unwrap(), one);
        // Retiring a key this host never had: nothing changes.
        let mut wrong = second.clone();
        wrong.host = "debian2".into();
        wrong.retire = Some(parse_public_key(ED).unwrap());
        let e = enrol_and_retire(&wrong).unwrap_err().to_string();
        assert!(e.contains("no line for host debian2"), "{e}");
        assert_eq!(std::fs::read_to_string(&cfg.authorized_keys).unwrap(), one);
        // On purpose: both keys stay.
        second.add_key = true;
        assert_eq!(enrol(&second).unwrap(), Enrolled::Added);
        let two = std::fs::read_to_string(&cfg.authorized_keys).unwrap();
        assert_eq!(two.lines().count(), 2, "{two}");
    }
}

//! `byteback-server migrate-keys`: byteback 1.x's authorized_keys lines
//! become byteback forced commands, so 1.x clients need not re-enrol.
//!
//! 1.x's `byteback-setup-client-receive` appended, per client:
//!
//! ```text
//! command="byteback-receive",from="CLIENT_IP",environment="BYTEBACK_HOST=NAME" TYPE BASE64 [COMMENT]
//! ```
//!
//! Such a line becomes what `enrol` writes:
//!
//! ```text
//! restrict,from="CLIENT_IP",command="/path/byteback-server serve --host NAME" TYPE BASE64 byteback:NAME
//! ```
//!
//! `from=` and `expiry-time=` are kept (they only narrow what the key may
//! do); `no-pty`, `no-port-forwarding`, `no-agent-forwarding`,
//! `no-X11-forwarding`, `no-user-rc` and `restrict` are what `restrict`
//! already says. A `byteback-receive` line with anything else (another
//! option, an `environment=` other than `BYTEBACK_HOST`, a host name byteback
//! refuses or that has no directory in the store, a malformed key) is left
//! as it was, with a warning naming its line number and why. Lines that are
//! not 1.x lines are kept byte for byte. The file is rewritten atomically
//! (a temporary file renamed over it) after a copy of the original is kept
//! beside it; running it again finds nothing to do.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::enrol::parse_public_key;
use crate::error::{Error, IoContext, Result};
use crate::store::Store;

/// Most bytes of authorized_keys read.
const MAX_FILE: u64 = 16 << 20;

/// One option of an authorized_keys line: name and, for `name="value"`, the value (unescaped).
type Opt = (String, Option<String>);

/// Splits an authorized_keys line into its options and the rest (`TYPE BASE64 [COMMENT]`).
/// `None` when the options do not parse.
pub fn split_options(line: &str) -> Option<(Vec<Opt>, &str)> {
    let first = line.split([' ', '\t']).next().unwrap_or("");
    if crate::enrol::is_key_type(first) {
        return Some((vec![], line));
    }
    let b = line.as_bytes();
    let mut opts = vec![];
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b'_') {
            i += 1;
        }
        if i == start {
            return None;
        }
        let name = line[start..i].to_ascii_lowercase();
        let mut value = None;
        if i < b.len() && b[i] == b'=' {
            i += 1;
            if b.get(i) != Some(&b'"') {
                return None;
            }
            i += 1;
            let mut v = String::new();
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if b.get(i + 1) == Some(&b'"') => {
                        v.push('"');
                        i += 2;
                    }
                    Some(_) => {
                        let c = line[i..].chars().next()?;
                        v.push(c);
                        i += c.len_utf8();
                    }
                }
            }
            value = Some(v);
        }
        opts.push((name, value));
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b' ') | Some(b'\t') => return Some((opts, line[i..].trim_start())),
            _ => return None,
        }
    }
}

/// Whether a forced command is 1.x's receiver.
pub fn is_receive(cmd: &str) -> bool {
    let cmd = cmd.trim();
    !cmd.contains(char::is_whitespace)
        && (cmd == "byteback-receive" || cmd.ends_with("/byteback-receive"))
}

/// What became of one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineFate {
    /// Not a 1.x line: kept as it is.
    Kept,
    /// A 1.x line rewritten to this (without newline).
    Migrated(String),
    /// A 1.x line left unchanged, and why.
    Refused(String),
}

/// How `migrate-keys` writes the forced command.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    /// This program, as sshd should start it.
    pub server_exe: PathBuf,
    /// Store named in the forced command (when given explicitly).
    pub store_arg: Option<PathBuf>,
}

fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b))
}

/// Decides what to do with one line. `host_exists` says whether the store has a host.
/// Long (~90 lines) because it is one strict pass over the options of
/// the line, each refused by name; a pure function with its own tests.
pub fn migrate_line(
    line: &str,
    cfg: &MigrateConfig,
    host_exists: &dyn Fn(&str) -> bool,
) -> LineFate {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') || !t.contains("byteback-receive") {
        return LineFate::Kept;
    }
    let Some((opts, key)) = split_options(t) else {
        return LineFate::Refused("its options do not parse".into());
    };
    let Some((_, Some(cmd))) = opts.iter().find(|(n, _)| n == "command") else {
        return LineFate::Kept; // mentions byteback-receive elsewhere (a comment)
    };
    if !is_receive(cmd) {
        return LineFate::Kept;
    }
    let mut host = None;
    let mut keep = vec![];
    for (name, value) in &opts {
        match (name.as_str(), value) {
            ("command", _) => {}
            ("environment", Some(v)) if v.starts_with("BYTEBACK_HOST=") && host.is_none() => {
                host = Some(v["BYTEBACK_HOST=".len()..].to_string());
            }
            ("from" | "expiry-time", Some(v)) => {
                if v.contains(['"', '\\']) || v.chars().any(|c| c.is_control()) {
                    return LineFate::Refused(format!("its {name}= value is unsafe to copy"));
                }
                keep.push(format!("{name}=\"{v}\""));
            }
            (
                "no-pty"
                | "no-port-forwarding"
                | "no-agent-forwarding"
                | "no-x11-forwarding"
                | "no-user-rc"
                | "restrict",
                None,
            ) => {}
            (other, _) => {
                return LineFate::Refused(format!(
                    "option {other:?} is not one migrate-keys knows to be safe"
                ))
            }
        }
    }
    let Some(host) = host else {
        return LineFate::Refused("it has no environment=\"BYTEBACK_HOST=...\"".into());
    };
    if let Err(e) = byteback_protocol::validate_host_name(&host) {
        return LineFate::Refused(format!("host name {host:?}: {e}"));
    }
    if !host_exists(&host) {
        return LineFate::Refused(format!("host {host:?} has no directory in the store"));
    }
    let key = match parse_public_key(key) {
        Ok(k) => k,
        Err(e) => return LineFate::Refused(format!("its key: {e}")),
    };
    let Some(exe) = cfg.server_exe.to_str().filter(|s| plain(s)) else {
        return LineFate::Refused(
            "the server program's path has characters unsafe in a forced command".into(),
        );
    };
    let mut command = format!("{exe} serve --host {host}");
    if let Some(s) = &cfg.store_arg {
        match s.to_str().filter(|s| plain(s)) {
            Some(s) => command.push_str(&format!(" --store {s}")),
            None => {
                return LineFate::Refused(
                    "the store path has characters unsafe in a forced command".into(),
                )
            }
        }
    }
    let mut options = vec!["restrict".to_string()];
    options.extend(keep);
    options.push(format!("command=\"{command}\""));
    LineFate::Migrated(format!(
        "{} {} {} byteback:{host}",
        options.join(","),
        key.kind,
        key.blob
    ))
}

/// What a run did.
#[derive(Debug, Default)]
pub struct MigrateReport {
    /// (line number, old, new) of each migrated line.
    pub migrated: Vec<(usize, String, String)>,
    /// (line number, why) of each 1.x line left unchanged.
    pub refused: Vec<(usize, String)>,
    /// Where the original was copied (when the file was rewritten).
    pub backup: Option<PathBuf>,
}

/// Migrates `authorized_keys` (in place unless `dry_run`).
/// Long (~90 lines) because the lock, the checks of the file, the
/// rewrite and the atomic replace belong to one scope (the lock's).
pub fn migrate_keys(
    authorized_keys: &Path,
    store: &Path,
    cfg: &MigrateConfig,
    dry_run: bool,
) -> Result<MigrateReport> {
    let store = Store::open(store)?;
    let dir = authorized_keys
        .parent()
        .ok_or_else(|| Error::Usage(format!("{} has no directory", authorized_keys.display())))?;
    // The same lock as enrolment: one editor of the file at a time.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(".byteback-enrol.lock"))
        .op("lock", || dir.display().to_string())?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .op("lock", || dir.display().to_string())?;
    let shown = || authorized_keys.display().to_string();
    let meta = std::fs::symlink_metadata(authorized_keys).op("read", shown)?;
    if !meta.file_type().is_file() {
        return Err(Error::Usage(format!("{} is not a regular file", shown())));
    }
    if meta.len() > MAX_FILE {
        return Err(Error::Usage(format!(
            "{} is larger than {} MiB",
            shown(),
            MAX_FILE >> 20
        )));
    }
    let content = std::fs::read_to_string(authorized_keys).op("read as text", shown)?;
    let exists = |h: &str| store.host(h, false).is_ok();
    let mut report = MigrateReport::default();
    let mut out = String::with_capacity(content.len() + 256);
    for (i, line) in content.split_inclusive('\n').enumerate() {
        let body = line.strip_suffix('\n').unwrap_or(line);
        match migrate_line(body, cfg, &exists) {
            LineFate::Kept => out.push_str(line),
            LineFate::Refused(why) => {
                report.refused.push((i + 1, why));
                out.push_str(line);
            }
            LineFate::Migrated(new) => {
                report.migrated.push((i + 1, body.to_string(), new.clone()));
                out.push_str(&new);
                out.push('\n');
            }
        }
    }
    if dry_run || report.migrated.is_empty() {
        return Ok(report);
    }
    let name = authorized_keys
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{} has no file name", shown())))?
        .to_string_lossy()
        .into_owned();
    let backup = dir.join(format!("{name}.byteback-1x"));
    let tmp = dir.join(format!(".{name}.byteback-tmp"));
    let write = |path: &Path, data: &str| -> Result<()> {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .op("create", || path.display().to_string())?;
        f.write_all(data.as_bytes())
            .and_then(|()| f.sync_all())
            .op("write", || path.display().to_string())?;
        Ok(())
    };
    // The first run's copy is the 1.x original: never overwritten.
    if std::fs::symlink_metadata(&backup).is_err() {
        write(&backup, &content)?;
    }
    write(&tmp, &out)?;
    std::fs::set_permissions(
        &tmp,
        std::fs::Permissions::from_mode(meta.permissions().mode() & 0o644),
    )
    .op("set the mode of", || tmp.display().to_string())?;
    std::fs::rename(&tmp, authorized_keys).op("replace", shown)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    report.backup = Some(backup);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn cfg() -> MigrateConfig {
        MigrateConfig {
            server_exe: "/usr/local/bin/byteback-server".into(),
            store_arg: None,
        }
    }

    fn fate(line: &str) -> LineFate {
        migrate_line(line, &cfg(), &|h| h != "missing")
    }

    #[test]
    fn lines() {
        assert_eq!(
            fate(&format!(
                "command=\"byteback-receive\",from=\"192.0.2.7\",environment=\"BYTEBACK_HOST=web1\" {ED} root@web1"
            )),
            LineFate::Migrated(format!(
                "restrict,from=\"192.0.2.7\",command=\"/usr/local/bin/byteback-server serve --host web1\" {ED} byteback:web1"
            ))
        );
        assert_eq!(
            fate(&format!(
                "no-pty,environment=\"BYTEBACK_HOST=db.example.com\",command=\"/usr/bin/byteback-receive\",from=\"10.0.0.*,!10.0.0.9\",no-port-forwarding {ED}"
            )),
            LineFate::Migrated(format!(
                "restrict,from=\"10.0.0.*,!10.0.0.9\",command=\"/usr/local/bin/byteback-server serve --host db.example.com\" {ED} byteback:db.example.com"
            ))
        );
        for kept in [
            "",
            "# byteback-receive keys below",
            ED,
            &format!("command=\"rsync --server\" {ED}"),
            &format!("restrict,command=\"/usr/local/bin/byteback-server serve --host web1\" {ED} byteback:web1"),
        ] {
            assert_eq!(fate(kept), LineFate::Kept, "{kept:?}");
        }
        for (bad, why) in [
            (format!("command=\"byteback-receive\",from=\"1.2.3.4\" {ED}"), "BYTEBACK_HOST"),
            (format!("command=\"byteback-receive\",permitopen=\"h:1\",environment=\"BYTEBACK_HOST=a\" {ED}"), "permitopen"),
            (format!("command=\"byteback-receive\",environment=\"BYTEBACK_HOST=../x\" {ED}"), "host name"),
            (format!("command=\"byteback-receive\",environment=\"BYTEBACK_HOST=missing\" {ED}"), "no directory"),
            (format!("command=\"byteback-receive\",environment=\"BYTEBACK_HOST=a\",environment=\"LD_PRELOAD=x\" {ED}"), "environment"),
            ("command=\"byteback-receive\",environment=\"BYTEBACK_HOST=a\" ssh-ed25519 AAAA!".to_string(), "key"),
            (format!("command=\"byteback-receive,environment=\"BYTEBACK_HOST=a\" {ED}"), "parse"),
            (format!("command=\"byteback-receive\",from=\"1.2.3.4\\\"\",environment=\"BYTEBACK_HOST=a\" {ED}"), "unsafe"),
        ] {
            match fate(&bad) {
                LineFate::Refused(w) => assert!(w.contains(why), "{bad}: {w}"),
                f => panic!("{bad}: {f:?}"),
            }
        }
    }

    #[test]
    fn file_is_rewritten_once_with_a_copy() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("store");
        std::fs::create_dir_all(store.join("web1")).unwrap();
        let ak = d.path().join("authorized_keys");
        let original = format!(
            "# admin\n{ED} admin@x\ncommand=\"byteback-receive\",from=\"192.0.2.7\",environment=\"BYTEBACK_HOST=web1\" {ED} root@web1\ncommand=\"byteback-receive\",environment=\"BYTEBACK_HOST=gone\" {ED}\n"
        );
        std::fs::write(&ak, &original).unwrap();
        let dry = migrate_keys(&ak, &store, &cfg(), true).unwrap();
        assert_eq!(dry.migrated.len(), 1);
        assert_eq!(std::fs::read_to_string(&ak).unwrap(), original);
        let r = migrate_keys(&ak, &store, &cfg(), false).unwrap();
        assert_eq!(r.migrated.len(), 1);
        assert_eq!(r.migrated[0].0, 3);
        assert_eq!(r.refused.len(), 1);
        assert_eq!(r.refused[0].0, 4);
        let after = std::fs::read_to_string(&ak).unwrap();
        let lines: Vec<&str> = after.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "# admin");
        assert!(
            lines[2].starts_with("restrict,from=\"192.0.2.7\",command="),
            "{after}"
        );
        assert!(lines[3].contains("BYTEBACK_HOST=gone"));
        assert_eq!(
            std::fs::read_to_string(d.path().join("authorized_keys.byteback-1x")).unwrap(),
            original
        );
        let again = migrate_keys(&ak, &store, &cfg(), false).unwrap();
        assert!(again.migrated.is_empty());
        assert_eq!(std::fs::read_to_string(&ak).unwrap(), after);
    }
}

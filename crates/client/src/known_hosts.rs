//! known_hosts files, read as OpenSSH reads them, to check a server's host key.
//!
//! russh's own check (`check_known_hosts_path`) only compares entries of the
//! presented key's algorithm: a known server that suddenly offers a key of
//! another type (say ECDSA where an Ed25519 key is recorded) looks unknown
//! rather than changed, and set-up would learn it. It also knows no
//! wildcards, negations or markers. Here a host with *any* entry, of any key
//! type, is known, and a key that matches none of its entries is a changed
//! key.
//!
//! The format (sshd(8), "SSH_KNOWN_HOSTS FILE FORMAT"), one entry per line:
//!
//! ```text
//! [@revoked|@cert-authority] PATTERNS KEYTYPE BASE64 [COMMENT]
//! ```
//!
//! - blank lines and lines whose first non-blank character is `#` are skipped;
//!   fields are separated by spaces or tabs;
//! - PATTERNS is a comma-separated list of host names or addresses with `*`
//!   and `?` wildcards, `!` negating (a line whose negated pattern matches
//!   does not apply, whatever else matches), compared without regard to ASCII
//!   case; a server on a port other than 22 is named `[host]:port`;
//! - or PATTERNS is one hashed name `|1|BASE64(salt)|BASE64(HMAC-SHA1(salt, name))`;
//! - `@revoked` lists a key that must never be accepted (for the hosts its
//!   patterns match; `*` for every host), even if another line accepts it;
//! - `@cert-authority` lines name certificate authorities; byteback checks
//!   plain host keys only, so they are ignored (they neither accept a key nor
//!   make a host known);
//! - a line with another `@` marker is ignored, as OpenSSH does.
//!
//! A line whose patterns match the host but whose key cannot be decoded still
//! makes the host known (and matches no key): a damaged entry fails closed.

use std::io;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use russh::keys::ssh_encoding::base64::{Base64, Encoding};
use sha1::Sha1;

/// The marker in front of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// `@revoked`: the key must never be accepted.
    Revoked,
    /// `@cert-authority`: a CA for host certificates (not used by byteback).
    CertAuthority,
}

/// One entry of a known_hosts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Line number, from 1.
    pub line: usize,
    /// `@revoked` or `@cert-authority`, if given.
    pub marker: Option<Marker>,
    /// The host patterns field, as written.
    pub hosts: String,
    /// The key type field, as written (empty if missing).
    pub key_type: String,
    /// The decoded key blob, or `None` if the key is missing or unreadable
    /// (bad base64, a blob whose type differs from the type field).
    pub key: Option<Vec<u8>>,
}

/// The name a server is recorded under: `host`, or `[host]:port` for ports
/// other than 22; lower case, as OpenSSH records and compares names.
pub fn lookup_name(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Parses one line; `None` for blank lines, comments and lines to ignore.
fn parse_line(line_no: usize, line: &str) -> Option<Entry> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut fields = line.split(is_blank).filter(|f| !f.is_empty());
    let mut first = fields.next()?;
    if first.starts_with('#') {
        return None;
    }
    let marker = if first.starts_with('@') {
        let m = match first {
            "@revoked" => Marker::Revoked,
            "@cert-authority" => Marker::CertAuthority,
            _ => return None,
        };
        first = fields.next()?;
        Some(m)
    } else {
        None
    };
    let key_type = fields.next().unwrap_or("");
    let key = fields.next().and_then(|b| decode_key(key_type, b));
    Some(Entry {
        line: line_no,
        marker,
        hosts: first.to_string(),
        key_type: key_type.to_string(),
        key,
    })
}

/// Decodes a key blob and checks that it starts with its own type name.
fn decode_key(key_type: &str, base64: &str) -> Option<Vec<u8>> {
    let blob = Base64::decode_vec(base64).ok()?;
    let n = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4usize.checked_add(n)?)?;
    (name == key_type.as_bytes()).then_some(blob)
}

/// Parses a known_hosts file's text.
pub fn parse(text: &str) -> Vec<Entry> {
    text.split('\n')
        .enumerate()
        .filter_map(|(i, l)| parse_line(i + 1, l))
        .collect()
}

/// OpenSSH's `match_pattern`: `*` matches any run of bytes, `?` one byte.
fn wildcard_match(s: &[u8], p: &[u8]) -> bool {
    let (mut si, mut pi) = (0, 0);
    // Where the last `*` was, and the position in `s` it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            si += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            // Let the last `*` swallow one more byte and try again.
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether a hashed name `|1|salt|hash` is `name`.
fn hashed_match(field: &str, name: &str) -> bool {
    let Some(rest) = field.strip_prefix("|1|") else {
        return false;
    };
    let Some((salt, hash)) = rest.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (Base64::decode_vec(salt), Base64::decode_vec(hash)) else {
        return false;
    };
    if hash.len() != 20 {
        return false;
    }
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// Whether an entry's host field applies to `name` (as from [`lookup_name`]).
pub fn hosts_match(field: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if field.starts_with('|') {
        return hashed_match(field, &name);
    }
    let mut matched = false;
    for pattern in field.split(',') {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern),
        };
        if pattern.is_empty() {
            continue;
        }
        if wildcard_match(name.as_bytes(), pattern.to_ascii_lowercase().as_bytes()) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// A recorded key for the host that is not the one presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The known_hosts file.
    pub path: PathBuf,
    /// Its line, from 1.
    pub line: usize,
    /// The recorded key's type field.
    pub key_type: String,
}

impl std::fmt::Display for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.key_type.is_empty() {
            "unreadable"
        } else {
            &self.key_type
        };
        write!(f, "{}:{} ({kind})", self.path.display(), self.line)
    }
}

/// What the known_hosts files say about a presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An entry for the host holds this key.
    Known {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
    },
    /// A `@revoked` line for the host (or `*`) lists this key.
    Revoked {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
    },
    /// The host has entries, and none holds this key (whatever their types).
    Changed {
        /// Every entry for the host, in file order.
        recorded: Vec<Recorded>,
    },
    /// No entry names the host.
    Unknown,
}

/// Reads known_hosts files; a missing file counts as empty, any other read
/// error is an error (an unreadable file must not make a host look unknown).
/// A file that root or this user does not own, or that others may write,
/// is passed over with a warning, judged by the file opened and read (the
/// callers' look by name before, which warns once, could be raced: under
/// `sudo -E`, a user could make their `~/.ssh/known_hosts` appear after it).
pub fn load(paths: &[PathBuf]) -> io::Result<Vec<(PathBuf, Vec<Entry>)>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut out = vec![];
    let me = rustix::process::geteuid().as_raw();
    for path in paths {
        let failed =
            |e: io::Error| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()));
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(failed(e)),
        };
        let m = f.metadata().map_err(failed)?;
        if (m.uid() != 0 && m.uid() != me) || m.mode() & 0o022 != 0 {
            // Said once a run (a connection loads the files more than once).
            static SAID: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
            let mut said = SAID
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !said.contains(path) {
                said.push(path.clone());
                tracing::warn!(
                    "{} is not root's or this user's alone (owner {}, mode {:o}): not read \
                     (`chmod go-w {}`, owned by root or this user)",
                    path.display(),
                    m.uid(),
                    m.mode() & 0o7777,
                    path.display()
                );
            }
            continue;
        }
        let mut bytes = vec![];
        f.read_to_end(&mut bytes).map_err(failed)?;
        out.push((path.clone(), parse(&String::from_utf8_lossy(&bytes))));
    }
    Ok(out)
}

/// Checks the key blob `key` (SSH wire encoding) presented by the server
/// known as `name` (see [`lookup_name`]) against parsed files.
pub fn check<P: AsRef<Path>>(files: &[(P, Vec<Entry>)], name: &str, key: &[u8]) -> Verdict {
    let entries = || {
        files
            .iter()
            .flat_map(|(p, es)| es.iter().map(move |e| (p.as_ref(), e)))
            .filter(|(_, e)| hosts_match(&e.hosts, name))
    };
    for (path, e) in entries() {
        if e.marker == Some(Marker::Revoked) && e.key.as_deref() == Some(key) {
            return Verdict::Revoked {
                path: path.to_path_buf(),
                line: e.line,
            };
        }
    }
    let mut recorded = vec![];
    for (path, e) in entries().filter(|(_, e)| e.marker.is_none()) {
        if e.key.as_deref() == Some(key) {
            return Verdict::Known {
                path: path.to_path_buf(),
                line: e.line,
            };
        }
        recorded.push(Recorded {
            path: path.to_path_buf(),
            line: e.line,
            key_type: e.key_type.clone(),
        });
    }
    if recorded.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::Changed { recorded }
    }
}

/// The key types recorded for the server known as any of `names` (not
/// `@revoked` or `@cert-authority` lines), in file order, each once: what
/// the key exchange should ask for first, as OpenSSH does, so that a
/// server with several host keys shows the one recorded.
pub fn recorded_types<P: AsRef<Path>>(files: &[(P, Vec<Entry>)], names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for (_, es) in files {
        for e in es {
            let named = names.iter().any(|n| hosts_match(&e.hosts, n));
            if named && e.marker.is_none() && e.key.is_some() && !out.contains(&e.key_type) {
                out.push(e.key_type.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with ssh-keygen; the hashed names with `ssh-keygen -H`.
    const ED: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJmyA95lD7jhTsn8SCAkQ6CaHO8a12p0XCCLPZ1FnBps";
    const ED2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAINEKmFNMDH76Bs7wO6tYEtK8pdeYwgGQkXJLc1A/AQ/B";
    const EC: &str = "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMKXc82NvOjuFGBhrJtCGHJwT+X/NuQYYJj7ARCRduMUV+n8XKIaZjArLRvTGtEhh5Z35a4JQURD7tlylgXpa7o=";
    /// `example.com`
    const H_EXAMPLE: &str = "|1|yxSJriUFHGIaVoySxwCyOxde+Nw=|Gp63DjqcSIuTUj90/Dd9qaETstc=";
    /// `[127.0.0.1]:2222`
    const H_LOOPBACK_2222: &str = "|1|LzYXNnRuhqOY7Wkn/fhA/w5Y/V8=|Z6gMci07ixjFfOQgw59t+d3jlSM=";
    /// `backup.example.com`
    const H_BACKUP: &str = "|1|VoCYP8C2V+wI9XvnWoguhgBMd5c=|oOqG7xJBJSHFSD5P9N1g8Mudn8g=";
    /// `[::1]:2222`
    const H_V6: &str = "|1|84hA88SHKmW9l6bB0n/iyAp5/3I=|eXf1rWWce7KIN2DTBBX9WX8eIF0=";

    fn blob(b64: &str) -> Vec<u8> {
        Base64::decode_vec(b64).unwrap()
    }

    /// A file others may write, or (as root) another user owns, is not
    /// read, judged by the file opened: what the look by name before saw
    /// does not count.
    #[test]
    fn a_file_others_may_write_or_own_is_not_read() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("known_hosts");
        std::fs::write(&f, format!("example.com ssh-ed25519 {ED}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let files = [f.clone(), d.path().join("missing")];
        assert_eq!(load(&files).unwrap().len(), 1);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(load(&files).unwrap().is_empty());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
            assert!(load(&files).unwrap().is_empty());
        } else {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("NOT CHECKED: a file another user owns (needs root)");
        }
    }

    fn verdict(text: &str, name: &str, key: &str) -> Verdict {
        check(&[("kh", parse(text))], name, &blob(key))
    }

    fn changed_lines(v: &Verdict) -> Vec<(String, usize, String)> {
        match v {
            Verdict::Changed { recorded } => recorded
                .iter()
                .map(|r| (r.path.display().to_string(), r.line, r.key_type.clone()))
                .collect(),
            v => panic!("expected a changed key, got {v:?}"),
        }
    }

    #[test]
    fn lookup_names() {
        assert_eq!(lookup_name("backup.example.com", 22), "backup.example.com");
        assert_eq!(lookup_name("Backup.Example.COM", 22), "backup.example.com");
        assert_eq!(lookup_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
        assert_eq!(lookup_name("::1", 2222), "[::1]:2222");
        assert_eq!(lookup_name("::1", 22), "::1");
    }

    #[test]
    fn wildcards() {
        for (s, p) in [
            ("a", "a"),
            ("abc", "*"),
            ("", "*"),
            ("", "**"),
            ("abc", "a*"),
            ("abc", "*c"),
            ("abc", "a?c"),
            ("abc", "???"),
            ("abc", "*b*"),
            ("web1.example.com", "*.example.com"),
            ("aaab", "*a*ab"),
            ("mississippi", "m*iss*ppi"),
            ("[127.0.0.1]:2222", "[127.0.0.?]:*"),
        ] {
            assert!(wildcard_match(s.as_bytes(), p.as_bytes()), "{s} ~ {p}");
        }
        for (s, p) in [
            ("a", "b"),
            ("", "?"),
            ("ab", "a"),
            ("a", "ab"),
            ("abc", "??"),
            ("abc", "*d"),
            ("example.com", "*.example.com"),
            ("[web1.example.com]:2222", "*.example.com"),
            ("mississippi", "m*iss*ppx"),
        ] {
            assert!(!wildcard_match(s.as_bytes(), p.as_bytes()), "{s} !~ {p}");
        }
    }

    #[test]
    fn host_patterns() {
        assert!(hosts_match("backup.example.com", "backup.example.com"));
        assert!(hosts_match("BACKUP.example.com", "backup.example.com"));
        assert!(hosts_match("backup.example.com", "Backup.Example.Com"));
        assert!(hosts_match("a,b,backup.example.com", "backup.example.com"));
        assert!(hosts_match("*.example.com", "backup.example.com"));
        assert!(hosts_match("backup.example.???", "backup.example.com"));
        assert!(!hosts_match("backup.example.???", "backup.example.co"));
        assert!(hosts_match("*", "[127.0.0.1]:2222"));
        assert!(hosts_match("[127.0.0.1]:2222", "[127.0.0.1]:2222"));
        assert!(!hosts_match("[127.0.0.1]:2222", "127.0.0.1"));
        assert!(!hosts_match("127.0.0.1", "[127.0.0.1]:2222"));
        assert!(!hosts_match("[127.0.0.1]:2223", "[127.0.0.1]:2222"));
        assert!(hosts_match("[127.0.0.1]:*", "[127.0.0.1]:2222"));
        assert!(hosts_match("[::1]:2222", "[::1]:2222"));
        // Negation wins over any positive match, in any order.
        assert!(!hosts_match(
            "*.example.com,!backup.example.com",
            "backup.example.com"
        ));
        assert!(!hosts_match(
            "!backup.example.com,*.example.com",
            "backup.example.com"
        ));
        assert!(hosts_match(
            "*.example.com,!web.example.com",
            "backup.example.com"
        ));
        // A negation alone never matches.
        assert!(!hosts_match("!web.example.com", "backup.example.com"));
        assert!(!hosts_match("", "backup.example.com"));
        assert!(!hosts_match(",,", "backup.example.com"));
        assert!(!hosts_match("backup", "backup.example.com"));
        assert!(!hosts_match("other.example.com", "backup.example.com"));
    }

    #[test]
    fn hashed_names_as_ssh_keygen_writes_them() {
        assert!(hosts_match(H_EXAMPLE, "example.com"));
        assert!(hosts_match(H_EXAMPLE, "EXAMPLE.com"));
        assert!(!hosts_match(H_EXAMPLE, "example.org"));
        assert!(!hosts_match(H_EXAMPLE, "[example.com]:2222"));
        assert!(hosts_match(H_LOOPBACK_2222, "[127.0.0.1]:2222"));
        assert!(hosts_match(
            H_LOOPBACK_2222,
            &lookup_name("127.0.0.1", 2222)
        ));
        assert!(!hosts_match(H_LOOPBACK_2222, "127.0.0.1"));
        assert!(hosts_match(H_BACKUP, "backup.example.com"));
        assert!(hosts_match(H_V6, &lookup_name("::1", 2222)));
        // The vector russh's own tests use.
        assert!(hosts_match(
            "|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak=",
            "example.com"
        ));
        // Malformed hashes never match (and never panic).
        for bad in [
            "|1|",
            "|1|abc",
            "|1|yxSJriUFHGIaVoySxwCyOxde+Nw=|",
            "|1|yxSJriUFHGIaVoySxwCyOxde+Nw=|Gp63DjqcSIuTUj90/Dd9qaETst==",
            "|1|!!!!|Gp63DjqcSIuTUj90/Dd9qaETstc=",
            "|1|yxSJriUFHGIaVoySxwCyOxde+Nw=|Z3A=",
            "|2|yxSJriUFHGIaVoySxwCyOxde+Nw=|Gp63DjqcSIuTUj90/Dd9qaETstc=",
            "|",
        ] {
            assert!(!hosts_match(bad, "example.com"), "{bad}");
        }
    }

    #[test]
    fn parses_lines_markers_and_numbers() {
        let text = format!(
            "# a comment\n\
             \n\
             \x20  \t\n\
             \t# indented comment\n\
             backup.example.com ssh-ed25519 {ED}\n\
             @revoked * ssh-ed25519 {ED2} old key\n\
             @cert-authority *.example.com ssh-ed25519 {ED}\n\
             @bogus backup.example.com ssh-ed25519 {ED}\n\
             a,b\tecdsa-sha2-nistp256  {EC}   comment with # hash\r\n\
             broken.example.com ssh-ed25519 AAAA!!!\n\
             mismatch.example.com ecdsa-sha2-nistp256 {ED}\n\
             nokey.example.com\n\
             @revoked\n\
             {H_EXAMPLE} ssh-ed25519 {ED}"
        );
        let es = parse(&text);
        let lines: Vec<usize> = es.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![5, 6, 7, 9, 10, 11, 12, 14]);
        assert_eq!(es[0].marker, None);
        assert_eq!(es[0].hosts, "backup.example.com");
        assert_eq!(es[0].key_type, "ssh-ed25519");
        assert_eq!(es[0].key, Some(blob(ED)));
        assert_eq!(es[1].marker, Some(Marker::Revoked));
        assert_eq!(es[1].hosts, "*");
        assert_eq!(es[1].key, Some(blob(ED2)));
        assert_eq!(es[2].marker, Some(Marker::CertAuthority));
        assert_eq!(es[3].hosts, "a,b");
        assert_eq!(es[3].key_type, "ecdsa-sha2-nistp256");
        assert_eq!(es[3].key, Some(blob(EC)));
        assert_eq!(es[4].key, None, "bad base64");
        assert_eq!(es[5].key, None, "blob of another type than its field");
        assert_eq!(es[6].key_type, "");
        assert_eq!(es[6].key, None);
        assert_eq!(es[7].hosts, H_EXAMPLE);
        assert_eq!(es[7].key, Some(blob(ED)));
    }

    #[test]
    fn same_key_is_known() {
        let text = format!("other ssh-ed25519 {ED2}\nbackup.example.com ssh-ed25519 {ED}\n");
        assert_eq!(
            verdict(&text, "backup.example.com", ED),
            Verdict::Known {
                path: "kh".into(),
                line: 2
            }
        );
        let text = format!("{H_LOOPBACK_2222} ssh-ed25519 {ED}\n");
        assert!(matches!(
            verdict(&text, "[127.0.0.1]:2222", ED),
            Verdict::Known { line: 1, .. }
        ));
        // A host with keys of several types accepts each of them.
        let text = format!(
            "backup.example.com ssh-ed25519 {ED}\nbackup.example.com ecdsa-sha2-nistp256 {EC}\n"
        );
        assert!(matches!(
            verdict(&text, "backup.example.com", EC),
            Verdict::Known { line: 2, .. }
        ));
    }

    #[test]
    fn no_entry_is_unknown() {
        let text = format!(
            "other.example.com ssh-ed25519 {ED}\n\
             [backup.example.com]:2222 ssh-ed25519 {ED}\n\
             *.example.com,!backup.example.com ssh-ed25519 {ED}\n\
             @cert-authority backup.example.com ssh-ed25519 {ED}\n\
             @revoked backup.example.com ssh-ed25519 {ED2}\n\
             {H_EXAMPLE} ssh-ed25519 {ED}\n"
        );
        assert_eq!(verdict(&text, "backup.example.com", ED), Verdict::Unknown);
        assert_eq!(verdict("", "backup.example.com", ED), Verdict::Unknown);
        assert_eq!(
            check::<&str>(&[], "backup.example.com", &blob(ED)),
            Verdict::Unknown
        );
    }

    #[test]
    fn a_key_of_another_type_is_a_changed_key() {
        // The case russh's check calls unknown: Ed25519 recorded, ECDSA shown.
        let text = format!("# c\nbackup.example.com ssh-ed25519 {ED}\n");
        assert_eq!(
            changed_lines(&verdict(&text, "backup.example.com", EC)),
            vec![("kh".into(), 2, "ssh-ed25519".into())]
        );
        // Same type, other key.
        assert_eq!(
            changed_lines(&verdict(&text, "backup.example.com", ED2)),
            vec![("kh".into(), 2, "ssh-ed25519".into())]
        );
        // Through a wildcard, a port form, a hashed name.
        for (hosts, name) in [
            ("*.example.com", "backup.example.com"),
            ("[127.0.0.1]:2222", "[127.0.0.1]:2222"),
            (H_LOOPBACK_2222, "[127.0.0.1]:2222"),
            (H_BACKUP, "backup.example.com"),
            (H_V6, "[::1]:2222"),
        ] {
            let text = format!("{hosts} ssh-ed25519 {ED}\n");
            let v = verdict(&text, name, EC);
            assert_eq!(changed_lines(&v).len(), 1, "{hosts} {name}");
        }
        // A hashed ECDSA entry and an Ed25519 key shown.
        let text = format!("{H_BACKUP} ecdsa-sha2-nistp256 {EC}\n");
        assert_eq!(
            changed_lines(&verdict(&text, "backup.example.com", ED)),
            vec![("kh".into(), 1, "ecdsa-sha2-nistp256".into())]
        );
        // An entry whose key cannot be read still makes the host known.
        for line in [
            "backup.example.com ssh-ed25519 AAAA!!!",
            "backup.example.com ssh-dss AAAAB3NzaC1kc3MAAACBAP8=",
            "backup.example.com",
            "backup.example.com 2048 35 2578903475",
        ] {
            assert!(
                matches!(
                    verdict(line, "backup.example.com", ED),
                    Verdict::Changed { .. }
                ),
                "{line}"
            );
        }
    }

    #[test]
    fn changed_names_every_recorded_entry_across_files() {
        let a = parse(&format!("backup.example.com ssh-ed25519 {ED2}\n"));
        let b = parse(&format!(
            "x ssh-ed25519 {ED}\n*.example.com ecdsa-sha2-nistp256 {EC}\n"
        ));
        let v = check(
            &[
                ("/etc/byteback/known_hosts", a),
                ("/root/.ssh/known_hosts", b),
            ],
            "backup.example.com",
            &blob(ED),
        );
        assert_eq!(
            changed_lines(&v),
            vec![
                ("/etc/byteback/known_hosts".into(), 1, "ssh-ed25519".into()),
                (
                    "/root/.ssh/known_hosts".into(),
                    2,
                    "ecdsa-sha2-nistp256".into()
                ),
            ]
        );
        let Verdict::Changed { recorded } = v else {
            unreachable!()
        };
        assert_eq!(
            recorded[1].to_string(),
            "/root/.ssh/known_hosts:2 (ecdsa-sha2-nistp256)"
        );
        // A match in the second file accepts it, whatever the first says.
        let a = parse(&format!("backup.example.com ssh-ed25519 {ED2}\n"));
        let b = parse(&format!("backup.example.com ssh-ed25519 {ED}\n"));
        assert_eq!(
            check(&[("a", a), ("b", b)], "backup.example.com", &blob(ED)),
            Verdict::Known {
                path: "b".into(),
                line: 1
            }
        );
    }

    #[test]
    fn revoked_keys_are_refused_even_when_accepted_elsewhere() {
        let accept = parse(&format!("backup.example.com ssh-ed25519 {ED}\n"));
        for revoke in [
            format!("@revoked * ssh-ed25519 {ED}"),
            format!("@revoked backup.example.com ssh-ed25519 {ED} gone"),
            format!("@revoked\t*.example.com,x\tssh-ed25519\t{ED}"),
            format!("@revoked {H_BACKUP} ssh-ed25519 {ED}"),
        ] {
            let revoked = parse(&format!("# first\n{revoke}\n"));
            // Whichever file comes first.
            let v = check(
                &[("accept", accept.clone()), ("revoke", revoked.clone())],
                "backup.example.com",
                &blob(ED),
            );
            assert_eq!(
                v,
                Verdict::Revoked {
                    path: "revoke".into(),
                    line: 2
                },
                "{revoke}"
            );
            let v = check(
                &[("revoke", revoked), ("accept", accept.clone())],
                "backup.example.com",
                &blob(ED),
            );
            assert!(matches!(v, Verdict::Revoked { line: 2, .. }), "{revoke}");
        }
        // A revocation for another host, or of another key, does not apply.
        for revoke in [
            format!("@revoked other.example.com ssh-ed25519 {ED}"),
            format!("@revoked *,!backup.example.com ssh-ed25519 {ED}"),
            format!("@revoked [backup.example.com]:2222 ssh-ed25519 {ED}"),
            format!("@revoked * ssh-ed25519 {ED2}"),
            format!("@revoked * ecdsa-sha2-nistp256 {EC}"),
        ] {
            let v = check(
                &[("accept", accept.clone()), ("revoke", parse(&revoke))],
                "backup.example.com",
                &blob(ED),
            );
            assert!(matches!(v, Verdict::Known { .. }), "{revoke}: {v:?}");
        }
        // A revoked key with no other entry is still refused (not learnt).
        assert!(matches!(
            verdict(
                &format!("@revoked * ssh-ed25519 {ED}"),
                "new.example.com",
                ED
            ),
            Verdict::Revoked { .. }
        ));
    }

    #[test]
    fn cert_authority_lines_are_ignored() {
        let text = format!("@cert-authority * ssh-ed25519 {ED}\n");
        assert_eq!(verdict(&text, "backup.example.com", ED), Verdict::Unknown);
        assert_eq!(verdict(&text, "backup.example.com", EC), Verdict::Unknown);
        let text = format!("{text}backup.example.com ecdsa-sha2-nistp256 {EC}\n");
        assert_eq!(
            changed_lines(&verdict(&text, "backup.example.com", ED)),
            vec![("kh".into(), 2, "ecdsa-sha2-nistp256".into())]
        );
    }

    #[test]
    fn load_skips_missing_files_and_fails_on_unreadable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let text = format!("backup.example.com ssh-ed25519 {ED}\n");
        std::fs::write(&a, [text.as_bytes(), b"\xff junk\n"].concat()).unwrap();
        let files = load(&[dir.path().join("missing"), a.clone()]).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, a);
        assert_eq!(files[0].1.len(), 2);
        // A directory where a file should be is an error, not an empty file.
        let e = load(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}

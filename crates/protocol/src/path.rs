//! Validation and ordering of the names that cross the wire.
//!
//! A path from the peer is relative, made of non-empty components other than
//! `.` and `..`, without NUL, within the length caps. Walk order compares
//! paths component by component, which is the order a sorted depth-first walk
//! produces, so parents always precede their children.

use std::cmp::Ordering;

use crate::error::ProtocolError;
use crate::limits::{MAX_NAME, MAX_PATH};

fn bad(path: &[u8], reason: &'static str) -> ProtocolError {
    ProtocolError::BadPath {
        path: String::from_utf8_lossy(&path[..path.len().min(200)]).into_owned(),
        reason,
    }
}

/// Checks that `path` is a safe relative path.
pub fn validate_path(path: &[u8]) -> Result<(), ProtocolError> {
    if path.is_empty() {
        return Err(bad(path, "empty"));
    }
    if path.len() > MAX_PATH {
        return Err(bad(path, "too long"));
    }
    if path[0] == b'/' {
        return Err(bad(path, "absolute"));
    }
    if path.contains(&0) {
        return Err(bad(path, "contains NUL"));
    }
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" => return Err(bad(path, "empty component")),
            b"." | b".." => return Err(bad(path, "dot component")),
            c if c.len() > MAX_NAME => return Err(bad(path, "component too long")),
            _ => {}
        }
    }
    Ok(())
}

/// Orders two paths as a depth-first walk with sorted siblings visits them.
pub fn compare_paths(a: &[u8], b: &[u8]) -> Ordering {
    let mut ai = a.split(|&c| c == b'/');
    let mut bi = b.split(|&c| c == b'/');
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match x.cmp(y) {
                Ordering::Equal => continue,
                o => return o,
            },
        }
    }
}

/// Names in a store's root directory that no host may take: the admin's
/// settings file. (Everything else byteback keeps there starts with `.`.)
pub const RESERVED_HOST_NAMES: &[&str] = &["byteback.toml"];

/// Checks a host name: one component of `[A-Za-z0-9._-]`, at most 253 bytes,
/// starting with an ASCII letter or digit (so never `.`, `..`, a dot file
/// such as `.ssh` or `.byteback-usage`, nor something that reads as an
/// option), and not a name the store itself uses ([`RESERVED_HOST_NAMES`]).
pub fn validate_host_name(name: &str) -> Result<(), ProtocolError> {
    let bad = |reason| ProtocolError::BadPath {
        path: name.chars().take(200).collect(),
        reason,
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("not a valid host name (1 to 253 bytes)"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(bad(
            "not a valid host name (letters, digits, '.', '_' and '-' only)",
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad(
            "not a valid host name (must start with a letter or digit)",
        ));
    }
    if RESERVED_HOST_NAMES
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(bad("not a valid host name (reserved: the store uses it)"));
    }
    Ok(())
}

/// Checks a snapshot name: `current` or one component of `[A-Za-z0-9:+._-]`, not starting with `.`.
pub fn validate_snapshot_name(name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":+._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::BadPath {
            path: name.chars().take(200).collect(),
            reason: "not a valid snapshot name",
        })
    }
}

/// Whether `name` has the shape of the snapshot names a store holds:
/// `YYYY-MM-DDTHH:MM+ZZZZ` (or `-ZZZZ`), optionally with `.N` after it.
/// A restore writes into `./<snapshot>`, so a name the server chooses must
/// not be one of the directories a restore may be run among (`etc`).
pub fn has_snapshot_shape(name: &str) -> bool {
    let (base, suffix) = name.split_once('.').unwrap_or((name, ""));
    if name.contains('.') && (suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let b = base.as_bytes();
    b.len() == 21
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 => c == b':',
            16 => c == b'+' || c == b'-',
            _ => c.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_shape() {
        for ok in [
            "2026-11-27T03:00+0000",
            "2026-11-27T03:00-0130.2",
            "1999-01-01T00:00+0100.17",
        ] {
            assert!(has_snapshot_shape(ok), "{ok}");
        }
        for bad in [
            "etc",
            "current",
            "2026-11-27T03:00+0000.",
            "2026-11-27T03:00+0000.x",
            "2026-11-27T03:00+0000.2.3",
            "2026-11-27 03:00+0000",
            "2026-11-27T03:00Z",
            "2026-11-27T03:00+00000",
            "",
        ] {
            assert!(!has_snapshot_shape(bad), "{bad}");
        }
    }

    #[test]
    fn rejects_unsafe_paths() {
        for p in [
            &b""[..],
            b"/etc",
            b"a/../b",
            b"..",
            b".",
            b"a//b",
            b"a/",
            b"a\0b",
            b"./a",
        ] {
            assert!(validate_path(p).is_err(), "{p:?}");
        }
        assert!(validate_path(&vec![b'a'; 256]).is_err());
        assert!(validate_path(&[b"a/".repeat(2048), b"b".to_vec()].concat()).is_err());
    }

    #[test]
    fn accepts_odd_names() {
        for p in [
            &b"a"[..],
            b"a b/c\nd",
            b"\xff\xfe/x",
            b"...",
            b".hidden/..x",
        ] {
            validate_path(p).unwrap();
        }
        validate_path(&vec![b'a'; 255]).unwrap();
        // MAX_PATH bytes exactly (Linux's PATH_MAX less the NUL).
        let longest = [b"a/".repeat(2047), b"bb".to_vec()].concat();
        assert_eq!(longest.len(), MAX_PATH);
        validate_path(&longest).unwrap();
    }

    #[test]
    fn walk_order_puts_children_after_parent() {
        assert_eq!(compare_paths(b"a", b"a/b"), Ordering::Less);
        assert_eq!(compare_paths(b"a/b", b"a.b"), Ordering::Less);
        assert_eq!(compare_paths(b"a/z", b"b"), Ordering::Less);
        assert_eq!(compare_paths(b"a", b"a"), Ordering::Equal);
    }

    #[test]
    fn host_names() {
        for h in [
            "web1",
            "web1.example.com",
            "a_b-c",
            "1host",
            "9",
            "a",
            "Web1.Example.COM",
            "byteback.toml.d",
            "mybyteback.toml",
            "a.",
            "a-",
            "a..b",
        ] {
            validate_host_name(h).unwrap_or_else(|e| panic!("{h:?}: {e}"));
        }
        validate_host_name(&"a".repeat(253)).unwrap();
        for h in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\",command=\"sh",
            "a b",
            "a\0b",
            "a\nb",
            "h\u{e9}",
        ] {
            assert!(validate_host_name(h).is_err(), "{h:?}");
        }
        assert!(validate_host_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn host_names_never_collide_with_store_files() {
        // Names the store or the server account keep in the store root.
        for h in [
            "byteback.toml",
            "BYTEBACK.TOML",
            "Byteback.Toml",
            ".byteback",
            ".byteback-usage",
            ".byteback-prune-refused",
            ".byteback-accepted-growth",
            ".byteback-prune.lock",
            ".ssh",
            ".profile",
            ".hidden",
            "...",
        ] {
            let e = validate_host_name(h).expect_err(h).to_string();
            assert!(e.contains("host name"), "{h:?}: {e}");
        }
        // Names that read as options, or begin with punctuation.
        for h in ["-rf", "--host", "-", "_x", "_", "-x.example.com"] {
            assert!(validate_host_name(h).is_err(), "{h:?}");
        }
        let e = validate_host_name("-x").unwrap_err().to_string();
        assert!(e.contains("start with a letter or digit"), "{e}");
        let e = validate_host_name("byteback.toml").unwrap_err().to_string();
        assert!(e.contains("reserved"), "{e}");
    }

    #[test]
    fn snapshot_names() {
        validate_snapshot_name("2026-11-27T03:00+0000").unwrap();
        validate_snapshot_name("current").unwrap();
        for s in ["", "..", ".x", "a/b", "x y"] {
            assert!(validate_snapshot_name(s).is_err(), "{s}");
        }
    }
}

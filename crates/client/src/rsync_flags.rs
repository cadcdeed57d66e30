//! `/etc/byteback/rsync_flags`: the extra rsync flags byteback 1.x put on
//! its rsync command line (words separated by white space). byteback 2 runs
//! no rsync, so each flag is sorted: the few with a byteback equivalent are
//! applied (`--exclude`, `--exclude-from`, `-x`, `-c`), those naming what
//! byteback always does are dropped, and the rest are named in a warning,
//! never dropped without a word.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a backup makes of the file's flags.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RsyncFlags {
    /// Exclude patterns (`--exclude`, and the lines of `--exclude-from`
    /// files), in order, each with the flag it came from.
    pub excludes: Vec<(String, String)>,
    /// `-x`, `--one-file-system`.
    pub one_file_system: bool,
    /// `-c`, `--checksum`.
    pub checksum: bool,
    /// Flags for what byteback always does (archive mode, hard links,
    /// ACLs, xattrs, numeric ids, deletions, compression, ...).
    pub built_in: Vec<String>,
    /// Flags byteback has no equivalent for, as written.
    pub unsupported: Vec<String>,
}

/// Short flags whose meaning byteback always has: archive (`a` = `rlptgoD`),
/// hard links, ACLs, xattrs, sparse files, compression, partial transfers,
/// and output levels.
const BUILT_IN_SHORT: &str = "arlptgoDHAXSzvqhP";

/// Long flags for what byteback always does.
const BUILT_IN_LONG: &[&str] = &[
    "archive",
    "recursive",
    "links",
    "perms",
    "times",
    "group",
    "owner",
    "devices",
    "specials",
    "hard-links",
    "acls",
    "xattrs",
    "sparse",
    "numeric-ids",
    "compress",
    "delete",
    "delete-before",
    "delete-during",
    "delete-delay",
    "delete-after",
    "inplace",
    "partial",
    "verbose",
    "quiet",
    "stats",
    "progress",
    "human-readable",
    "fake-super",
];

/// Reads `name` in `dir` (none: nothing to do). Not UTF-8, or an
/// `--exclude-from` file that cannot be read, is a usage error.
pub fn load(dir: &Path, name: &str) -> Result<Option<RsyncFlags>> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Usage(format!("cannot read {}: {e}", path.display()))),
    };
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::Usage(format!(
            "{}: not UTF-8 (byteback reads its settings and patterns as UTF-8 text)",
            path.display()
        ))
    })?;
    parse(&text, &|file| read_exclude_from(file, &path)).map(Some)
}

/// The patterns of an `--exclude-from` file, as rsync reads them: one a
/// line, blank lines and those starting with `#` or `;` skipped.
fn read_exclude_from(file: &str, flags_path: &Path) -> Result<Vec<String>> {
    let path = PathBuf::from(file);
    let text = std::fs::read(&path)
        .map_err(|e| {
            Error::Usage(format!(
                "{}: --exclude-from={file}: cannot read it: {e}",
                flags_path.display()
            ))
        })
        .and_then(|b| {
            String::from_utf8(b).map_err(|_| {
                Error::Usage(format!(
                    "{}: --exclude-from={file}: not UTF-8",
                    flags_path.display()
                ))
            })
        })?;
    Ok(text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(str::to_string)
        .collect())
}

/// Sorts the flags of `text`; `exclude_from` reads an `--exclude-from`
/// file's patterns.
pub fn parse(text: &str, exclude_from: &dyn Fn(&str) -> Result<Vec<String>>) -> Result<RsyncFlags> {
    let mut out = RsyncFlags::default();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if let Some(long) = w.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            match name {
                "exclude" => match value.clone().or_else(|| words.next().map(str::to_string)) {
                    Some(p) => out.excludes.push((format!("--exclude={p}"), p)),
                    None => out.unsupported.push(w.to_string()),
                },
                "exclude-from" => {
                    match value.clone().or_else(|| words.next().map(str::to_string)) {
                        Some(f) => {
                            for p in exclude_from(&f)? {
                                out.excludes.push((format!("--exclude-from={f}"), p));
                            }
                        }
                        None => out.unsupported.push(w.to_string()),
                    }
                }
                "one-file-system" => out.one_file_system = true,
                "checksum" => out.checksum = true,
                n if BUILT_IN_LONG.contains(&n) && value.is_none() => {
                    out.built_in.push(w.to_string())
                }
                // Flags rsync gives a separate value: the value goes with
                // the flag into the warning.
                "bwlimit" | "timeout" | "contimeout" | "rsh" | "filter" | "include"
                | "include-from" | "max-size" | "min-size" | "backup-dir" | "suffix" | "chmod"
                | "log-file" | "temp-dir" | "compress-level" | "block-size" | "rsync-path"
                | "files-from" | "link-dest" | "compare-dest" | "copy-dest" | "partial-dir"
                | "skip-compress" | "max-delete" | "usermap" | "groupmap" | "chown" | "iconv"
                | "protocol" | "checksum-choice" | "compress-choice" | "out-format"
                | "log-file-format" | "modify-window" | "password-file" | "port" | "sockopts" => {
                    let shown = match value {
                        Some(_) => w.to_string(),
                        None => words.next().map_or(w.to_string(), |v| format!("{w} {v}")),
                    };
                    out.unsupported.push(shown);
                }
                _ => out.unsupported.push(w.to_string()),
            }
        } else if let Some(short) = w.strip_prefix('-').filter(|s| !s.is_empty()) {
            // A bundle of short flags: known ones each, or the whole word
            // into the warning if any is not (it may take a value).
            if short
                .chars()
                .all(|c| BUILT_IN_SHORT.contains(c) || c == 'x' || c == 'c')
            {
                for c in short.chars() {
                    match c {
                        'x' => out.one_file_system = true,
                        'c' => out.checksum = true,
                        c => out.built_in.push(format!("-{c}")),
                    }
                }
            } else {
                out.unsupported.push(w.to_string());
            }
        } else {
            out.unsupported.push(w.to_string());
        }
    }
    Ok(out)
}

impl RsyncFlags {
    /// The warning naming the flags not applied, if any (`path` is the
    /// file's), and a note of those applied for `--verbose`.
    pub fn messages(&self, path: &Path) -> (Option<String>, Option<String>) {
        let warning = (!self.unsupported.is_empty()).then(|| {
            format!(
                "{}: byteback 2 runs no rsync and has no equivalent for: {}; these flags are ignored \
                 (--exclude, --exclude-from, -x and -c are applied; the rest of the file names what \
                 byteback always does)",
                path.display(),
                self.unsupported.join(" ")
            )
        });
        let mut applied = vec![];
        if !self.excludes.is_empty() {
            applied.push(format!("{} exclude patterns", self.excludes.len()));
        }
        if self.one_file_system {
            applied.push("--one-file-system".to_string());
        }
        if self.checksum {
            applied.push("--checksum".to_string());
        }
        let note = (!applied.is_empty() || !self.built_in.is_empty()).then(|| {
            format!(
                "{}: applied: {}; what byteback always does: {}",
                path.display(),
                if applied.is_empty() {
                    "nothing".to_string()
                } else {
                    applied.join(", ")
                },
                if self.built_in.is_empty() {
                    "-".to_string()
                } else {
                    self.built_in.join(" ")
                }
            )
        });
        (warning, note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_file(_: &str) -> Result<Vec<String>> {
        panic!("no --exclude-from here")
    }

    #[test]
    fn flags_are_applied_dropped_as_built_in_or_named() {
        let f = parse(
            "-aHAXx --numeric-ids --delete\n--exclude=/srv/big --exclude /var/cache/*\n\
             --bwlimit=1000 --timeout 60 -e ssh --checksum --whatever -W",
            &no_file,
        )
        .unwrap();
        assert_eq!(
            f.excludes,
            vec![
                ("--exclude=/srv/big".to_string(), "/srv/big".to_string()),
                (
                    "--exclude=/var/cache/*".to_string(),
                    "/var/cache/*".to_string()
                ),
            ]
        );
        assert!(f.one_file_system && f.checksum);
        assert_eq!(
            f.built_in,
            ["-a", "-H", "-A", "-X", "--numeric-ids", "--delete"]
        );
        assert_eq!(
            f.unsupported,
            [
                "--bwlimit=1000",
                "--timeout 60",
                "-e",
                "ssh",
                "--whatever",
                "-W"
            ]
        );
        let (warning, note) = f.messages(Path::new("/etc/byteback/rsync_flags"));
        let warning = warning.unwrap();
        assert!(
            warning.contains("--bwlimit=1000 --timeout 60 -e ssh --whatever -W"),
            "{warning}"
        );
        let note = note.unwrap();
        assert!(
            note.contains("2 exclude patterns, --one-file-system, --checksum"),
            "{note}"
        );
    }

    #[test]
    fn exclude_from_files_are_read_and_a_file_of_built_ins_warns_of_nothing() {
        let f = parse("-a --exclude-from=/x\n", &|file| {
            assert_eq!(file, "/x");
            Ok(vec!["/a".into(), "/b".into()])
        })
        .unwrap();
        assert_eq!(f.excludes.len(), 2);
        assert_eq!(f.messages(Path::new("f")).0, None);
        assert_eq!(parse("", &no_file).unwrap(), RsyncFlags::default());
        // A file that cannot be read stops the backup.
        assert!(parse("--exclude-from /nope", &|_| Err(Error::Usage(
            "gone".into()
        )))
        .is_err());
    }

    #[test]
    fn exclude_from_reads_lines_as_rsync_does() {
        let d = tempfile::tempdir().unwrap();
        let list = d.path().join("list");
        std::fs::write(&list, "# comment\n; also\n\n/srv/a\n/srv/b  \n").unwrap();
        let got = read_exclude_from(list.to_str().unwrap(), Path::new("flags")).unwrap();
        assert_eq!(got, ["/srv/a", "/srv/b"]);
        let e = read_exclude_from("/no/such/file", Path::new("flags")).unwrap_err();
        assert!(e.to_string().contains("/no/such/file"), "{e}");
    }
}

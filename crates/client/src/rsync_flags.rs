//! `/etc/byteback/rsync_flags`: the extra rsync arguments byteback 1.x put
//! at the end of its rsync command line, one a line (1.x read the file with
//! `readlines`). byteback 2 runs no rsync, so each flag is sorted: the few
//! with a byteback equivalent are applied (`--exclude`, `--exclude-from`,
//! `-x`, `-c`; the excludes after the `rsync_filter` rules, where 1.x's
//! rsync had them), those naming what byteback always does are dropped,
//! include and filter flags are an error (they cannot be ordered here), and
//! the rest are named in a warning, never dropped without a word.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a backup makes of the file's flags.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RsyncFlags {
    /// Exclude patterns (`--exclude`, and the lines of `--exclude-from`
    /// files), in order, each with the flag it came from.
    pub excludes: Vec<(String, String)>,
    /// The exclude flags as written (`--exclude=PAT`, `--exclude-from=FILE`).
    pub exclude_flags: Vec<String>,
    /// `-x`, `--one-file-system`.
    pub one_file_system: bool,
    /// `-c`, `--checksum`.
    pub checksum: bool,
    /// Flags for what byteback always does (archive mode, hard links,
    /// ACLs, xattrs, numeric ids, deletions, compression, ...).
    pub built_in: Vec<String>,
    /// Flags byteback has no equivalent for, as written.
    pub unsupported: Vec<String>,
    /// Warnings about lines that are taken as written but look like a
    /// mistake.
    pub notes: Vec<String>,
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
    "delete-excluded",
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
    let text = std::fs::read(&path).map_err(|e| {
        Error::Usage(format!(
            "{}: --exclude-from={file}: cannot read it: {e}",
            flags_path.display()
        ))
    })?;
    // As rsync reads it (and the excludes file): lines not trimmed, `- `
    // stripped; `+ ` and `!` would reorder rules, an error naming the line.
    let mut out = vec![];
    for (n, line) in crate::filter::exclude_file_lines(&text) {
        let line = std::str::from_utf8(line).map_err(|_| {
            Error::Usage(format!(
                "{}: --exclude-from={file}:{n}: not UTF-8",
                flags_path.display()
            ))
        })?;
        if line == "!" || line.starts_with("+ ") {
            return Err(Error::Usage(format!(
                "{}: --exclude-from={file}:{n}: {line:?} is not an exclude; put include rules in \
                 rsync_filter",
                flags_path.display(),
            )));
        }
        out.push(line.strip_prefix("- ").unwrap_or(line).to_string());
    }
    Ok(out)
}

/// Short rsync flags that take a value (the rest of their word, or the
/// next argument).
const SHORT_WITH_VALUE: &str = "BefTM@";

/// Long rsync flags that take a value (after `=`, or the next argument).
const LONG_WITH_VALUE: &[&str] = &[
    "bwlimit",
    "timeout",
    "contimeout",
    "rsh",
    "max-size",
    "min-size",
    "backup-dir",
    "suffix",
    "chmod",
    "log-file",
    "temp-dir",
    "compress-level",
    "block-size",
    "rsync-path",
    "files-from",
    "link-dest",
    "compare-dest",
    "copy-dest",
    "partial-dir",
    "skip-compress",
    "max-delete",
    "usermap",
    "groupmap",
    "chown",
    "iconv",
    "protocol",
    "checksum-choice",
    "compress-choice",
    "out-format",
    "log-file-format",
    "modify-window",
    "password-file",
    "port",
    "sockopts",
    "remote-option",
    "outbuf",
    "max-alloc",
    "stop-after",
    "stop-at",
    "info",
    "debug",
];

/// Flags that add include or filter rules: where they would stand among
/// the excludes cannot be kept here, so they are an error naming them.
const RULE_FLAGS: &[&str] = &["include", "include-from", "filter", "cvs-exclude"];

/// Sorts the flags of `text`: one argument a line, as 1.x passed each line
/// to rsync (blank lines skipped); `exclude_from` reads an `--exclude-from`
/// file's patterns. An include or filter flag is a usage error.
pub fn parse(text: &str, exclude_from: &dyn Fn(&str) -> Result<Vec<String>>) -> Result<RsyncFlags> {
    let mut out = RsyncFlags::default();
    let mut args = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty());
    let rule_flag = |arg: &str| {
        Error::Usage(format!(
            "rsync_flags: {arg:?} adds include or filter rules, which cannot be ordered with the \
             excludes here; put them in rsync_filter"
        ))
    };
    while let Some(arg) = args.next() {
        if let Some(long) = arg.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                // Blanks after a lone flag are taken as a slip.
                None => (long.trim_end(), None),
            };
            // 1.x gave rsync each line as one argument: `--exclude *.o`
            // on one line was an option rsync did not know, and the
            // backup failed. Said so, rather than the exclude dropped.
            if name.contains(char::is_whitespace) {
                return Err(Error::Usage(format!(
                    "rsync_flags: {arg:?} is one argument (each line is one, as 1.x gave them to \
                     rsync, which refused this one): write the flag as --NAME=VALUE, or the \
                     flag and its value on lines of their own"
                )));
            }
            let mut value_or_next = || value.clone().or_else(|| args.next().map(str::to_string));
            match name {
                "exclude" => match value_or_next() {
                    // rsync reads --exclude with its old prefixes: `- `
                    // an exclude, `+ ` an include, `!` a clear.
                    Some(p) if p == "!" || p.starts_with("+ ") => return Err(rule_flag(arg)),
                    Some(p) => {
                        if p.contains(" --") || p.contains(" -x") {
                            out.notes.push(format!(
                                "rsync_flags: the exclude pattern {p:?} looks like several \
                                 flags on one line; each line is one argument (as 1.x gave \
                                 them to rsync), so it is one pattern: put one flag a line"
                            ));
                        }
                        let flag = format!("--exclude={p}");
                        let p = p.strip_prefix("- ").map_or(p.clone(), str::to_string);
                        out.exclude_flags.push(flag.clone());
                        out.excludes.push((flag, p));
                    }
                    None => out.unsupported.push(arg.to_string()),
                },
                "exclude-from" => match value_or_next() {
                    Some(f) => {
                        let flag = format!("--exclude-from={f}");
                        out.exclude_flags.push(flag.clone());
                        for p in exclude_from(&f)? {
                            out.excludes.push((flag.clone(), p));
                        }
                    }
                    None => out.unsupported.push(arg.to_string()),
                },
                n if RULE_FLAGS.contains(&n) => return Err(rule_flag(arg)),
                "one-file-system" if value.is_none() => out.one_file_system = true,
                "checksum" if value.is_none() => out.checksum = true,
                n if BUILT_IN_LONG.contains(&n) && value.is_none() => {
                    out.built_in.push(arg.to_string())
                }
                n if LONG_WITH_VALUE.contains(&n) => {
                    let shown = match value {
                        Some(_) => arg.to_string(),
                        None => args
                            .next()
                            .map_or(arg.to_string(), |v| format!("{arg} {v}")),
                    };
                    out.unsupported.push(shown);
                }
                _ => out.unsupported.push(arg.to_string()),
            }
        } else if let Some(bundle) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
            // Letter by letter, as rsync reads a bundle; a letter that
            // takes a value takes the rest of the word, or the next argument.
            for (i, c) in bundle.char_indices() {
                match c {
                    'x' => out.one_file_system = true,
                    'c' => out.checksum = true,
                    'f' | 'F' | 'C' => return Err(rule_flag(arg)),
                    c if SHORT_WITH_VALUE.contains(c) => {
                        let rest = &bundle[i + c.len_utf8()..];
                        let value = if rest.is_empty() {
                            args.next().unwrap_or("")
                        } else {
                            rest
                        };
                        out.unsupported
                            .push(format!("-{c} {value}").trim_end().to_string());
                        break;
                    }
                    c if BUILT_IN_SHORT.contains(c) => out.built_in.push(format!("-{c}")),
                    c => out.unsupported.push(format!("-{c}")),
                }
            }
        } else {
            out.unsupported.push(arg.to_string());
        }
    }
    Ok(out)
}

impl RsyncFlags {
    /// For `byteback-restore`, whose 1.x rsync took the file's flags too:
    /// the warning naming those it does not apply (all but what byteback
    /// always does), if any. A restore takes what its patterns select.
    pub fn restore_warning(&self, path: &Path) -> Option<String> {
        let mut named = self.exclude_flags.clone();
        if self.one_file_system {
            named.push("--one-file-system".into());
        }
        if self.checksum {
            named.push("--checksum".into());
        }
        named.extend(self.unsupported.iter().cloned());
        (!named.is_empty()).then(|| {
            format!(
                "{}: not applied to a restore (1.x's rsync took them here too): {}; the restore \
                 takes what its patterns select",
                path.display(),
                named.join(" ")
            )
        })
    }

    /// The warning naming the flags not applied, if any (`path` is the
    /// file's), and a note of those applied for `--verbose`.
    pub fn messages(&self, path: &Path) -> (Option<String>, Option<String>) {
        let timeout = if self.unsupported.iter().any(|f| f.starts_with("--timeout")) {
            " (for --timeout: /etc/byteback/io_timeout or --io-timeout)"
        } else {
            ""
        };
        let mut warning = (!self.unsupported.is_empty()).then(|| {
            format!(
                "{}: byteback 2 runs no rsync and has no equivalent for: {}; these flags are ignored \
                 (--exclude, --exclude-from, -x and -c are applied; the rest of the file names what \
                 byteback always does){timeout}",
                path.display(),
                self.unsupported.join(" ")
            )
        });
        for n in &self.notes {
            let w = warning.get_or_insert_with(String::new);
            if !w.is_empty() {
                w.push_str("; ");
            }
            w.push_str(n);
        }
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
            "-aHAXx\n--numeric-ids\n--delete\n--exclude=/srv/data old\n--exclude\n/var/cache/*\n\n\
             --bwlimit=1000\n--timeout\n60\n-ce\nssh -p 2\n--checksum\n--whatever\n-W\n-zT/tmp\n",
            &no_file,
        )
        .unwrap();
        // One argument a line: a pattern with a space is one pattern.
        assert_eq!(
            f.excludes,
            vec![
                (
                    "--exclude=/srv/data old".to_string(),
                    "/srv/data old".to_string()
                ),
                (
                    "--exclude=/var/cache/*".to_string(),
                    "/var/cache/*".to_string()
                ),
            ]
        );
        assert!(f.one_file_system && f.checksum);
        assert_eq!(
            f.built_in,
            ["-a", "-H", "-A", "-X", "--numeric-ids", "--delete", "-z"]
        );
        assert_eq!(
            f.unsupported,
            [
                "--bwlimit=1000",
                "--timeout 60",
                "-e ssh -p 2",
                "--whatever",
                "-W",
                "-T /tmp"
            ]
        );
        let (warning, note) = f.messages(Path::new("/etc/byteback/rsync_flags"));
        let warning = warning.unwrap();
        assert!(
            warning.contains("--bwlimit=1000 --timeout 60 -e ssh -p 2 --whatever -W -T /tmp"),
            "{warning}"
        );
        let note = note.unwrap();
        assert!(
            note.contains("2 exclude patterns, --one-file-system, --checksum"),
            "{note}"
        );
        // rsync's old prefix: `- ` is an exclude.
        let f = parse("--exclude=- /srv\n", &no_file).unwrap();
        assert_eq!(f.excludes[0].1, "/srv");
    }

    #[test]
    fn a_restore_names_the_flags_it_does_not_apply() {
        let f = parse(
            "-a\n--exclude=*.iso\n--exclude-from=/l\n-x\n--bwlimit=9\n",
            &|_| Ok(vec![]),
        )
        .unwrap();
        let w = f.restore_warning(Path::new("rf")).unwrap();
        assert!(
            w.contains("--exclude=*.iso --exclude-from=/l --one-file-system --bwlimit=9"),
            "{w}"
        );
        assert_eq!(
            parse("-aH\n", &no_file)
                .unwrap()
                .restore_warning(Path::new("rf")),
            None
        );
    }

    #[test]
    fn include_and_filter_flags_are_refused() {
        for bad in [
            "--exclude=+ *.c",
            "--exclude\n!",
            "--include=*.c",
            "--filter=- x",
            "-f\n- x",
            "-aF",
            "--include-from=/x",
        ] {
            let e = parse(bad, &no_file).unwrap_err();
            assert!(
                e.to_string().contains("put them in rsync_filter"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn exclude_from_files_are_read_and_a_file_of_built_ins_warns_of_nothing() {
        let f = parse("-a\n--exclude-from=/x\n", &|file| {
            assert_eq!(file, "/x");
            Ok(vec!["/a".into(), "/b".into()])
        })
        .unwrap();
        assert_eq!(f.excludes.len(), 2);
        assert_eq!(f.messages(Path::new("f")).0, None);
        assert_eq!(parse("", &no_file).unwrap(), RsyncFlags::default());
        // A file that cannot be read stops the backup.
        assert!(parse("--exclude-from\n/nope", &|_| Err(Error::Usage(
            "gone".into()
        )))
        .is_err());
    }

    #[test]
    fn exclude_from_reads_lines_as_the_excludes_file() {
        let d = tempfile::tempdir().unwrap();
        let list = d.path().join("list");
        std::fs::write(
            &list,
            "# comment\n; also\n\n/srv/a\r\n- /srv/b \n  - /srv/c\n",
        )
        .unwrap();
        let got = read_exclude_from(list.to_str().unwrap(), Path::new("flags")).unwrap();
        // Not trimmed, as rsync reads it; `\r` ends a line.
        assert_eq!(got, ["/srv/a", "/srv/b ", "  - /srv/c"]);
        std::fs::write(&list, "/srv/a\n+ /srv/c\n").unwrap();
        let e = read_exclude_from(list.to_str().unwrap(), Path::new("flags")).unwrap_err();
        assert!(e.to_string().contains(":2:"), "{e}");
        let e = read_exclude_from("/no/such/file", Path::new("flags")).unwrap_err();
        assert!(e.to_string().contains("/no/such/file"), "{e}");
    }

    #[test]
    fn lines_holding_several_flags_are_said_never_silently_dropped() {
        // A flag and its value on one line: 1.x's rsync refused it.
        let e = parse("--exclude *.txt\n", &no_file).unwrap_err();
        assert!(
            e.is_usage() && e.to_string().contains("--NAME=VALUE"),
            "{e}"
        );
        // Two excludes on one line stay one pattern, as in 1.x, with a warning.
        let f = parse("--exclude=*.txt --exclude=*.conf\n", &no_file).unwrap();
        assert_eq!(f.excludes.len(), 1);
        let w = f.messages(Path::new("f")).0.unwrap();
        assert!(w.contains("one flag a line"), "{w}");
        // 1.x passed --delete-excluded itself: what byteback always does.
        let f = parse("--delete-excluded\n--timeout=60\n", &no_file).unwrap();
        assert_eq!(f.built_in, ["--delete-excluded"]);
        let w = f.messages(Path::new("f")).0.unwrap();
        assert!(w.contains("io_timeout"), "{w}");
    }
}

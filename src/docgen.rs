//! Man pages and shell completions for byteback's binaries (`byteback-gen`).
//!
//! The options, their help texts and the synopses come from the binaries' own
//! clap definitions ([`commands`]), rendered by `clap_mangen` and
//! `clap_complete`, so they cannot drift from what the programs accept. The
//! written sections appended to each page (FILES, EXIT STATUS, EXAMPLES, the
//! trust model, SEE ALSO) and `byteback.toml(5)` are kept here; they restate
//! README.md.

use std::io;
use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

use byteback_server::config::StoreConfig;

/// Section of every program's page (system administration).
pub const SECTION: &str = "8";
/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Every binary's command line, exactly as the binary parses it.
pub fn commands() -> Vec<Command> {
    vec![
        byteback_client::cli::BackupArgs::command(),
        byteback_client::cli::RestoreArgs::command(),
        byteback_client::setup::SetupArgs::command(),
        byteback_server::cli::Cli::command(),
        byteback_server::admin::PruneCli::command(),
    ]
}

/// One generated man page.
pub struct Page {
    /// File name, e.g. `byteback-backup.8`.
    pub file: String,
    /// Section, `8` or `5`.
    pub section: &'static str,
    /// The roff source.
    pub roff: String,
}

/// Every man page: one per binary, one per `byteback-server` subcommand
/// (`byteback-server-serve(8)`, ...), and `byteback.toml(5)`.
pub fn man_pages() -> io::Result<Vec<Page>> {
    let mut pages = vec![];
    for cmd in commands() {
        // The `help` subcommand is clap's; man pages need none (as clap_mangen::generate_to).
        let mut cmd = cmd.disable_help_subcommand(true);
        cmd.build();
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages.push(render_command(sub.clone())?);
        }
        pages.push(render_command(cmd)?);
    }
    pages.push(Page {
        file: "byteback.toml.5".into(),
        section: "5",
        roff: byteback_toml_page(),
    });
    Ok(pages)
}

/// Writes every page to `dir/man8/` and `dir/man5/`; returns their paths.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = vec![];
    for p in man_pages()? {
        let sub = dir.join(format!("man{}", p.section));
        std::fs::create_dir_all(&sub)?;
        let path = sub.join(&p.file);
        std::fs::write(&path, p.roff)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes bash, zsh and fish completions for every binary to `dir/bash/NAME`,
/// `dir/zsh/_NAME` and `dir/fish/NAME.fish` (the names each shell's
/// completion directory expects); returns their paths.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = vec![];
    for shell in SHELLS {
        let sub = dir.join(shell.to_string());
        std::fs::create_dir_all(&sub)?;
        for mut cmd in commands() {
            let name = cmd.get_name().to_string();
            let file = match shell {
                Shell::Zsh => format!("_{name}"),
                Shell::Fish => format!("{name}.fish"),
                _ => name.clone(),
            };
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut buf);
            let mut text = String::from_utf8(buf).map_err(io::Error::other)?;
            if shell == Shell::Bash {
                text = fix_bash_subcommand_states(&text, &name);
            }
            let path = sub.join(file);
            std::fs::write(&path, text)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Works around clap_complete's bash generator for a hyphenated binary name
/// with subcommands (clap-rs/clap issue 6421, open for clap_complete 4.6):
/// the loop that finds the subcommand spells its state
/// `byteback__server__subcmd__verify`, the `case` arms that complete its
/// options `byteback__subcmd__server__subcmd__verify`, so nothing after
/// `byteback-server verify` completed. Rewrites the arms to the loop's
/// spelling; a no-op once clap_complete agrees with itself.
fn fix_bash_subcommand_states(script: &str, bin_name: &str) -> String {
    const SEP: &str = "__subcmd__";
    let wrong = format!("{}{SEP}", bin_name.replace('-', SEP));
    let right = format!("{}{SEP}", bin_name.replace('-', "__"));
    script.replace(&wrong, &right)
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// A piece of a written section.
#[derive(Clone, Copy)]
enum Block {
    /// A paragraph.
    P(&'static str),
    /// A tagged paragraph: the tag in bold, then the text indented.
    Tag(&'static str, &'static str),
    /// Lines shown as typed, indented, no filling.
    Ex(&'static [&'static str]),
}
use Block::{Ex, Tag, P};

/// A written section: heading and blocks.
type Section = (&'static str, Vec<Block>);

fn render_blocks(roff: &mut Roff, sections: &[Section]) {
    for (title, blocks) in sections {
        roff.control("SH", [*title]);
        let mut first = true;
        for b in blocks {
            match b {
                P(text) => {
                    if !first {
                        roff.control("PP", []);
                    }
                    roff.text([roman(*text)]);
                }
                Tag(tag, text) => {
                    roff.control("TP", []);
                    roff.text([bold(*tag)]);
                    roff.text([roman(*text)]);
                }
                Ex(lines) => {
                    roff.control("PP", []);
                    roff.control("RS", ["4"]);
                    roff.control("nf", []);
                    for l in *lines {
                        roff.text([roman(*l)]);
                    }
                    roff.control("fi", []);
                    roff.control("RE", []);
                }
            }
            first = false;
        }
    }
}

fn see_also(roff: &mut Roff, refs: &[&str]) {
    roff.control("SH", ["SEE ALSO"]);
    let mut line: Vec<Inline> = vec![];
    for (i, r) in refs.iter().enumerate() {
        let (name, sec) = r.split_once('(').unwrap_or((r, ")"));
        if i > 0 {
            line.push(roman(", "));
        }
        line.push(bold(name));
        line.push(roman(format!("({sec}")));
    }
    roff.text(line);
}

fn render_command(cmd: Command) -> io::Result<Page> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let written = written_sections(&name);
    let cmd = match written.description {
        Some(d) => {
            let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
            cmd.long_about(format!("{about}\n\n{d}"))
        }
        None => cmd,
    };
    let has_subcommands = cmd.get_subcommands().next().is_some();
    let has_version = cmd.get_version().is_some();
    let man = Man::new(cmd)
        .section(SECTION)
        .manual("byteback")
        .source(format!("byteback {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    // No hyphenation: option names and paths must read as they are typed.
    out.extend_from_slice(b".nh\n");
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if has_subcommands {
        man.render_subcommands_section(&mut out)?;
    }
    let mut roff = Roff::new();
    render_blocks(&mut roff, &written.sections);
    see_also(&mut roff, &written.see_also);
    out.extend_from_slice(roff.render().as_bytes());
    if has_version {
        man.render_version_section(&mut out)?;
    }
    let text = String::from_utf8(out).map_err(io::Error::other)?;
    Ok(Page {
        file: format!("{name}.{SECTION}"),
        section: SECTION,
        roff: once_preamble(&text),
    })
}

/// Each piece rendered by `roff` starts with the same two lines defining the
/// apostrophe string; the page needs them once, at the top.
fn once_preamble(text: &str) -> String {
    let mut seen = false;
    let mut out = String::with_capacity(text.len());
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if l.starts_with(".ie \\n(.g .ds Aq")
            && lines.peek().is_some_and(|n| n.starts_with(".el .ds Aq"))
        {
            let el = lines.next().unwrap_or_default();
            if !seen {
                out.push_str(l);
                out.push('\n');
                out.push_str(el);
                out.push('\n');
                seen = true;
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// The written sections (from README.md)
// ---------------------------------------------------------------------------

struct Written {
    /// Appended to the DESCRIPTION after the command's own about text.
    description: Option<&'static str>,
    sections: Vec<Section>,
    see_also: Vec<&'static str>,
}

const CLIENT_FILES: [Block; 3] = [
    Tag(
        "/etc/byteback/destination",
        "Where to back up to and restore from when --destination is not given: the first line \
         that is not empty or a # comment, user@host: (SSH), ssh://user@host:port/ or a local \
         store directory. Written by byteback-setup-client.",
    ),
    Tag(
        "/etc/byteback/key",
        "The client's SSH private key (ed25519) when --ssh-key is not given; created by \
         byteback-setup-client.",
    ),
    Tag(
        "/etc/byteback/known_hosts",
        "The server's host key, recorded by byteback-setup-client; checked first, then \
         ~/.ssh/known_hosts. An unknown or changed key is refused with its fingerprint, never \
         accepted silently.",
    ),
];

const CLIENT_ENV: Block = Tag(
    "BYTEBACK_CONFIG_DIR",
    "Replaces /etc/byteback in every path above (tests, unusual set-ups).",
);

const SERVER_FILES: [Block; 8] = [
    Tag(
        "<store>",
        "The store root: --store, else the home directory of the server user ($HOME; for \
         byteback-prune, status, report and verify run as root, the home of the account \
         byteback, never root's), e.g. /srv/byteback on a btrfs filesystem mounted with \
         user_subvol_rm_allowed. Run as root on a store another account owns, byteback-prune \
         --prune and verify work as that account, so what they create there stays its.",
    ),
    Tag(
        "<store>/byteback.toml",
        "Store-wide settings (min_snapshot_interval, minpercent, maxpercent, io_timeout); see \
         byteback.toml(5).",
    ),
    Tag(
        "<store>/<host>/current",
        "The btrfs subvolume (or directory) each backup of <host> writes into.",
    ),
    Tag(
        "<store>/<host>/<snapshot>",
        "Read-only snapshots named by the server's clock, e.g. 2026-11-27T03:00+0000 (a second \
         one within the same minute gets a .1 suffix). Each carries its manifest, \
         .byteback/manifest: every entry's metadata and BLAKE3.",
    ),
    Tag(
        "<store>/<host>/.byteback-usage",
        "One line per backup (time, bytes written, snapshot, the store's free and total \
         bytes), read by the growth guard and drawn by report.",
    ),
    Tag(
        "<store>/.byteback-prune-refused, <store>/.byteback-accepted-growth",
        "A pruning refused by the growth guard (reported by status as a WARNING), and the \
         spikes an admin accepted with byteback-prune --prune-force.",
    ),
    Tag(
        "<store>/<host>/.byteback-verify",
        "Where the last budgeted verify run stopped, when a whole pass last ended and the \
         damage it found.",
    ),
    Tag(
        "~/.ssh/authorized_keys",
        "One restricted line per client key, written by enrol, whose forced command is \
         byteback-server serve --host NAME.",
    ),
];

const PRUNE_EXIT: [Block; 4] = [
    Tag(
        "0",
        "Done, or nothing to do (the store has enough free space).",
    ),
    Tag("1", "Error."),
    Tag(
        "2",
        "Usage: the command line could not be parsed, or a bad combination of options \
         (neither or both of --list and --prune).",
    ),
    Tag(
        "3",
        "Refused by the growth guard: a snapshot whose backups wrote far more than usual \
         exists and nobody accepted it. The admin decides: --prune-force accepts the spike \
         and prunes, or delete the spike snapshot.",
    ),
];

const STATUS_EXIT: [Block; 4] = [
    Tag("0", "OK."),
    Tag(
        "1",
        "WARNING: a host's newest snapshot is older than --warn (a host without snapshots \
         counts as infinitely old), or the last prune was refused by the growth guard (also \
         without --warn).",
    ),
    Tag(
        "2",
        "CRITICAL: a host's newest snapshot is older than --crit, or the host has none.",
    ),
    Tag("3", "UNKNOWN: the store could not be read."),
];

const VERIFY_EXIT: [Block; 4] = [
    Tag("0", "Nothing damaged in what was checked."),
    Tag(
        "1",
        "Damage found: lines starting DAMAGED name host, snapshot and path.",
    ),
    Tag("2", "Usage: the command line could not be parsed."),
    Tag(
        "3",
        "Could not check everything (a snapshot or file could not be read, or the store could \
         not be opened).",
    ),
];

const SERVER_TRUST: &str =
    "The server trusts nothing of the client. The store root and the host name come only from \
     its own command line, fixed by sshd's forced command; SSH_ORIGINAL_COMMAND is read only as \
     one verb (backup, list, restore, ping) and never executed. Every path from the wire is \
     validated and resolved beneath the host's directory with openat2(RESOLVE_BENEATH | \
     RESOLVE_NO_SYMLINKS); every length and count is capped before allocation; messages out of \
     protocol order end the session. One backup per host runs at a time. The server never \
     writes setuid files or device nodes: those exist only as manifest metadata.";

/// The hand-written sections of each man page: one function per page.
fn written_sections(page: &str) -> Written {
    match page {
        "byteback-backup" => backup_page(),
        "byteback-restore" => restore_page(),
        "byteback-setup-client" => setup_client_page(),
        "byteback-server" => server_page(),
        "byteback-server-serve" => server_serve_page(),
        "byteback-server-enrol" => server_enrol_page(),
        "byteback-server-migrate-keys" => server_migrate_keys_page(),
        "byteback-server-prune" | "byteback-prune" => server_prune_page(),
        "byteback-server-status" => server_status_page(),
        "byteback-server-verify" => server_verify_page(),
        "byteback-server-report" => server_report_page(),
        _ => Written {
            description: None,
            sections: vec![],
            see_also: vec!["byteback-server(8)"],
        },
    }
}

/// byteback-backup: what its man page says beyond the options.
/// (Long: it is the page's text, one section after another.)
fn backup_page() -> Written {
    Written {
        description: Some(
            "Walks each source, crossing into the filesystems mounted below it that are of a \
             local type (btrfs, ext2/3/4, xfs, ... as byteback 1.x; network and virtual ones \
             such as NFS, tmpfs and /proc are left out; --one-file-system stays on the \
             source's own), and streams changed files as rsync-style deltas to byteback-server, over SSH or over pipes for a \
             local store. The server commits the backup into <store>/<host>/current and \
             takes a read-only, timestamped snapshot. Regular files (holes stay holes), \
             directories, symlinks, hard links, FIFOs, sockets, device nodes, modes, \
             numeric owners, mtimes with nanoseconds, xattrs and POSIX ACLs are kept.\n\n\
             Default excludes (as byteback 1.x): /swap.file, /tmp/, /var/backups/localhost/, \
             /var/cache/apt/archives/, /var/lib/php5/, /var/tmp/, /var/lib/mysql/, and \
             PostgreSQL's clusters, /var/lib/postgresql/VERSION/ (databases are backed up as \
             dumps, see HOOKS). A failed \
             run is retried --retry-number times; a broken run commits nothing. Only one \
             backup to the same destination runs at a time.",
        ),
        sections: vec![
            (
                "HOOKS",
                vec![
                    P(
                        "As byteback 1.x with run-parts: before the backup the executables \
                       in /etc/byteback/pre-backup.d/ run, after it those in \
                       /etc/byteback/post-backup.d/. Regular executable files whose names \
                       are made of A-Z, a-z, 0-9, _ and - run, in byte order of their \
                       names; others (x.sh, README.md, *.dpkg-old, files without an \
                       execute bit) are skipped, named with --verbose. Each runs with \
                       standard input from /dev/null, its output copied to standard error \
                       with its name in front, in its own process group, for at most \
                       --hook-timeout seconds (then SIGTERM, and SIGKILL 5 seconds later, \
                       to the group; it counts as failed). They run once per invocation, \
                       not per retry, and not when the settings are wrong or another \
                       backup to the same destination is running.",
                    ),
                    P(
                        "A pre-backup hook that fails (exits non-zero, is killed, times \
                       out) fails the backup before anything is sent: exit status 1, with \
                       the hook's name and the last lines of its output. The other \
                       pre-backup hooks still run, as with run-parts.",
                    ),
                    P(
                        "The post-backup hooks run after every backup that got as far as \
                       the pre-backup hooks, whether it succeeded or not (a post-backup \
                       hook may have to undo what a pre-backup hook set up), with \
                       BYTEBACK_STATUS (the exit status: 0, 24 or 1), \
                       BYTEBACK_STATUS_TEXT (ok, partial or failed) and \
                       BYTEBACK_SNAPSHOT (the snapshot taken, empty if none) in their \
                       environment. A failing post-backup hook makes the exit status 1; \
                       the backup stays committed. byteback 1.x ran post-backup hooks \
                       only after a successful backup: test BYTEBACK_STATUS for that.",
                    ),
                    P(
                        "Shipped hooks: 50-mysql (mariadb-dump --single-transaction of all \
                       databases) and 50-postgresql (pg_dumpall as the postgres user) \
                       write /var/backups/byteback/mysql.sql.gz and postgresql.sql.gz, \
                       replaced atomically, and do nothing when that server is not \
                       installed or not running. Their settings are environment \
                       variables, described at the top of each script.",
                    ),
                ],
            ),
            (
                "ENVIRONMENT",
                vec![
                    CLIENT_ENV,
                    Tag("HOME", "~/.ssh/known_hosts is read from here."),
                ],
            ),
            (
                "FILES",
                vec![
                    CLIENT_FILES[0],
                    CLIENT_FILES[1],
                    CLIENT_FILES[2],
                    Tag(
                        "/etc/byteback/excludes",
                        "More exclude patterns, one per line (# comments), after those \
                         of --exclude (which replace the defaults), or after the defaults.",
                    ),
                    Tag(
                        "/etc/byteback/pre-backup.d/, /etc/byteback/post-backup.d/",
                        "Hooks run before and after the backup (see HOOKS).",
                    ),
                    Tag(
                        "/var/backups/byteback/",
                        "Where the shipped database hooks write their dumps.",
                    ),
                    Tag(
                        "/etc/byteback/rsync_filter",
                        "rsync filter rules, applied as byteback 1.x's rsync \
                         --relative --filter='merge FILE' did, after the excludes: + - \
                         include exclude (modifiers / ! s), hide H, show S, clear !, merge \
                         ., dir-merge : of a file name or /NAME (modifiers - + n e), with \
                         *, **, ?, \
                         [...], a leading / anchoring at / (or at the directory of a \
                         per-directory file), a trailing / for directories only; first \
                         match wins. protect P and risk R (receiver-side) are named in a \
                         warning and have no effect. Any other rule or modifier is an \
                         error naming the file and line: the backup does not start (exit \
                         status 2), or, in a per-directory file, fails (1).",
                    ),
                    Tag(
                        "/etc/byteback/rsync_flags",
                        "byteback 1.x's extra rsync arguments, one a line. There is no \
                         rsync underneath: --exclude=PAT and the lines of --exclude-from=FILE \
                         are excludes checked after the rsync_filter rules (as 1.x's rsync \
                         had them), -x (--one-file-system) and -c (--checksum) are applied; \
                         include and filter flags are a usage error; flags for what byteback \
                         always does (-a and its parts, -H, -A, -X, -S, -z, --numeric-ids, \
                         --delete, ...) are dropped, named at --verbose; every other flag is \
                         named in a warning on every run and not applied.",
                    ),
                    Tag(
                        "/var/lock/byteback/backup-*.lock",
                        "One lock per destination (an flock, so a killed run never leaves \
                         it held); for other users than root under $TMPDIR/byteback-UID/.",
                    ),
                ],
            ),
            (
                "EXIT STATUS",
                vec![
                    Tag(
                        "0",
                        "Success: the backup is committed (files that vanished while it \
                         ran are normal on a live system: counted, not an error).",
                    ),
                    Tag(
                        "24",
                        "Partial: files changed while read or were unreadable, or the \
                         server left entries out; they are reported and counted, the rest \
                         is committed.",
                    ),
                    Tag(
                        "1",
                        "Failure: nothing was committed (after the retries), or a \
                         pre-backup hook failed (nothing was sent); or a post-backup hook \
                         failed (the backup is committed).",
                    ),
                    Tag(
                        "2",
                        "Usage or configuration, never retried: the command line, a \
                         setting (destination, io_timeout, rsync_filter, rsync_flags), a \
                         key that cannot be loaded, a source that does not exist. byteback \
                         1.x exited 0 or 1 only (rsync's 24 counted as 0).",
                    ),
                ],
            ),
            (
                "EXAMPLES",
                vec![
                    P(
                        "Back up to the server in /etc/byteback/destination (as the daily \
                       byteback-backup.timer does):",
                    ),
                    Ex(&["byteback-backup"]),
                    P("Back up two directories into a local store:"),
                    Ex(&[
                        "byteback-backup --destination /srv/backups --source /etc \\",
                        "    --source /home --hostname web1",
                    ]),
                    P("Leave out a scratch directory and every file named core:"),
                    Ex(&["byteback-backup -x /srv/scratch/ -x core"]),
                ],
            ),
        ],
        see_also: vec![
            "byteback-restore(8)",
            "byteback-setup-client(8)",
            "byteback-server(8)",
            "systemd.timer(5)",
        ],
    }
}

/// byteback-restore: what its man page says beyond the options.
/// (Long: it is the page's text, one section after another.)
fn restore_page() -> Written {
    Written {
        description: Some(
            "Patterns are made absolute against the current directory, then globbed (*, **, \
             ?, [set], {a,b}, \\ escapes); a pattern matching a directory takes everything \
             beneath it. --list (the default) shows snapshot, mode, size, uid, gid, mtime \
             and path: the latest version of each path, every distinct version with --all, \
             every copy with --verbose.\n\n\
             --restore restores what the listing shows, as byteback 1.x did: each path's \
             latest version from the newest snapshot holding it, into \
             ./<that snapshot>/<absolute path> (a file deleted before the last backup comes \
             back from an older snapshot, into that snapshot's directory); with --all every \
             distinct version, each into the directory of the oldest snapshot holding it; \
             with --snapshot that snapshot only. --target DIR puts the snapshot directories \
             in DIR (which must exist) instead of the current directory. Files come with \
             full metadata; devices and ownership need root. Every restored file is checked \
             against its BLAKE3: one that fails is removed and listed as DAMAGED, the rest \
             is restored.",
        ),
        sections: vec![
            ("ENVIRONMENT", vec![CLIENT_ENV]),
            ("FILES", CLIENT_FILES.to_vec()),
            (
                "EXIT STATUS",
                vec![
                    Tag("0", "Done."),
                    Tag(
                        "24",
                        "Done with warnings: metadata that could not be applied, devices \
                         skipped.",
                    ),
                    Tag(
                        "1",
                        "A file failed verification (it was not restored), the restore \
                         stopped on an error (see TRUST MODEL), or nothing matches a \
                         --list.",
                    ),
                    Tag(
                        "2",
                        "Usage: the command line could not be parsed, or the --target \
                         directory does not exist (nothing is created).",
                    ),
                ],
            ),
            (
                "EXAMPLES",
                vec![
                    P("List the configuration files backed up under /etc:"),
                    Ex(&["byteback-restore --list '/etc/**.conf'"]),
                    P("Every distinct version of one file:"),
                    Ex(&["byteback-restore --list --all /etc/fstab"]),
                    P("Restore /etc/ssh from the newest snapshot into \
                       /tmp/<snapshot>/etc/ssh:"),
                    Ex(&["cd /tmp && byteback-restore --restore /etc/ssh"]),
                    P("Restore every version of a home directory kept in any snapshot \
                       into /mnt/r/<snapshot>/home/alice:"),
                    Ex(&["byteback-restore --restore --all --target /mnt/r /home/alice"]),
                    P("Restore data one does not trust from a given snapshot:"),
                    Ex(&[
                        "byteback-restore --restore --snapshot 2026-11-27T03:00+0000 \\",
                        "    --no-setuid --no-devices /home/alice",
                    ]),
                ],
            ),
            (
                "TRUST MODEL",
                vec![
                    P("byteback-restore runs as root to restore whole machines, so it trusts \
                       nothing of the server it can check. Snapshot and host names are \
                       validated; every manifest entry is validated like a client's and must \
                       come in strict walk order, each parent directory first, no path \
                       twice; a hard link must point to a regular file this restore wrote. \
                       A violation ends the restore with exit status 1."),
                    P("File data is never written beyond the manifest's size and every file \
                       is checked against its BLAKE3. Everything is written beneath held \
                       directory fds: each <snapshot> directory is opened without following a symlink, \
                       each directory below is opened with openat2(RESOLVE_BENEATH | \
                       RESOLVE_NO_SYMLINKS), files are created O_EXCL | O_NOFOLLOW, and \
                       owner, xattrs, ACLs, mode and mtime are applied to the open object, \
                       the mode last, so nothing is setuid before it is final."),
                    P("Root restores are exact by default (setuid and setgid bits and \
                       device nodes come back, as with tar -p). For data one does not \
                       trust, --no-setuid drops those bits and --no-devices makes no device \
                       nodes."),
                ],
            ),
        ],
        see_also: vec!["byteback-backup(8)", "byteback-server(8)"],
    }
}

/// byteback-setup-client: what its man page says beyond the options.
fn setup_client_page() -> Written {
    Written {
        description: Some(
            "Creates this client's key if missing; logs in to the server account once with \
             its password (asked on the terminal, or $BYTEBACK_PASSWORD) or --admin-key, \
             after making sure a host key not yet recorded is the server's: it must have the \
             fingerprint --host-key gives, or the admin confirms it on the terminal (without \
             one it refuses and names the fingerprint to check; --accept-new-host-key trusts \
             it unchecked); records it; runs \
             byteback-server enrol there, which creates the host's store and appends one \
             restricted authorized_keys line whose forced command is byteback-server serve \
             --host NAME; then writes the destination and checks that the new key logs in. \
             Running it again changes nothing.",
        ),
        sections: vec![
            (
                "ENVIRONMENT",
                vec![
                    Tag(
                        "BYTEBACK_PASSWORD",
                        "The server account's password, instead of asking on the terminal.",
                    ),
                    CLIENT_ENV,
                ],
            ),
            (
                "FILES",
                vec![
                    Tag(
                        "/etc/byteback/key",
                        "The client's key (ed25519), created if missing (--ssh-key picks \
                         another).",
                    ),
                    Tag(
                        "/etc/byteback/known_hosts",
                        "The server's host key is recorded here on first use; a changed key \
                         is refused.",
                    ),
                    Tag(
                        "/etc/byteback/destination",
                        "Written with --destination once enrolment succeeded.",
                    ),
                ],
            ),
            (
                "EXIT STATUS",
                vec![
                    Tag("0", "This machine is a client of the server."),
                    Tag(
                        "1",
                        "Failure: login refused, enrolment refused by the server, bad host \
                         name, or the new key does not work.",
                    ),
                    Tag("2", "Usage: the command line could not be parsed."),
                ],
            ),
            (
                "EXAMPLES",
                vec![
                    Ex(&["byteback-setup-client --destination byteback@backup.example.com:"]),
                    P("With another port, name and an admin key instead of a password:"),
                    Ex(&[
                        "byteback-setup-client \\",
                        "    --destination ssh://byteback@backup.example.com:2222/ \\",
                        "    --hostname web1 --admin-key /root/byteback-admin-key",
                    ]),
                    P("Then enable the daily backups:"),
                    Ex(&["systemctl enable --now byteback-backup.timer"]),
                ],
            ),
        ],
        see_also: vec!["byteback-backup(8)", "byteback-server-enrol(8)", "sshd(8)"],
    }
}

/// byteback-server: what its man page says beyond the options.
fn server_page() -> Written {
    Written {
        description: Some(
            "Runs on the backup server: sshd starts byteback-server serve for each client's \
             key (its forced command), and a client backing up to a local store starts it \
             over pipes. The other subcommands are for the admin: enrol (run by \
             byteback-setup-client), prune, status, verify and report. Each subcommand has \
             its own page.",
        ),
        sections: vec![
            ("FILES", SERVER_FILES.to_vec()),
            (
                "EXIT STATUS",
                vec![
                    Tag(
                        "serve",
                        "0 the session ended normally; 1 error; 2 usage, or a request \
                         refused before the session (bad host name, unknown verb).",
                    ),
                    Tag("enrol", "0 enrolled or already enrolled; 1 error; 2 usage."),
                    Tag(
                        "migrate-keys",
                        "0 every 1.x line migrated; 1 some left unchanged, or an error; 2 usage.",
                    ),
                    Tag(
                        "prune",
                        "0 done or nothing to do; 1 error; 2 usage; 3 refused by the growth \
                         guard.",
                    ),
                    Tag(
                        "status",
                        "0 OK; 1 WARNING; 2 CRITICAL; 3 UNKNOWN (the store could not be \
                         read).",
                    ),
                    Tag(
                        "verify",
                        "0 nothing damaged; 1 damage found; 2 usage; 3 could not check \
                         everything.",
                    ),
                    Tag("report", "0 page written; 1 error; 2 usage."),
                ],
            ),
            (
                "EXAMPLES",
                vec![
                    P("The authorized_keys line enrol writes for a client:"),
                    Ex(&[
                        "restrict,from=\"CLIENT_IP\",command=\"/usr/local/bin/byteback-server \
                          serve --host NAME\" ssh-ed25519 AAAA... byteback:NAME",
                    ]),
                    P("Monitoring (Nagios exit codes), as the byteback user:"),
                    Ex(&["byteback-server status --warn 26h --crit 3d"]),
                    P("Re-check at most 20 GiB of stored files, continuing next time:"),
                    Ex(&["byteback-server verify --budget 20G"]),
                ],
            ),
            ("TRUST MODEL", vec![P(SERVER_TRUST)]),
        ],
        see_also: vec![
            "byteback-server-serve(8)",
            "byteback-server-enrol(8)",
            "byteback-server-prune(8)",
            "byteback-server-status(8)",
            "byteback-server-verify(8)",
            "byteback-server-report(8)",
            "byteback-prune(8)",
            "byteback.toml(5)",
            "byteback-backup(8)",
        ],
    }
}

/// byteback-server-serve: what its man page says beyond the options.
fn server_serve_page() -> Written {
    Written {
        description: Some(
            "Speaks the byteback protocol on standard input and output for one host: \
             receives backups into <store>/<host>/current, commits, snapshots and prunes, \
             and serves listings and restores. Under sshd's forced command, \
             SSH_ORIGINAL_COMMAND may only narrow access: backup (read-write), list, \
             restore, ping (read-only); anything else is refused.",
        ),
        sections: vec![
            (
                "ENVIRONMENT",
                vec![
                    Tag(
                        "SSH_ORIGINAL_COMMAND",
                        "The client's requested command, read as one verb, never executed.",
                    ),
                    Tag(
                        "HOME",
                        "The store root when --store is not given (not as root: see FILES).",
                    ),
                ],
            ),
            ("FILES", SERVER_FILES[..5].to_vec()),
            (
                "EXIT STATUS",
                vec![
                    Tag("0", "The session ended normally."),
                    Tag("1", "Error during the session."),
                    Tag(
                        "2",
                        "Usage, or a request refused before the session (bad host name, \
                         unknown verb, no store).",
                    ),
                ],
            ),
            (
                "EXAMPLES",
                vec![Ex(&[
                    "command=\"/usr/local/bin/byteback-server serve --host web1\"",
                ])],
            ),
            ("TRUST MODEL", vec![P(SERVER_TRUST)]),
        ],
        see_also: vec!["byteback-server(8)", "sshd(8)"],
    }
}

/// byteback-server-enrol: what its man page says beyond the options.
fn server_enrol_page() -> Written {
    Written {
        description: Some(
            "Validates the host name and the key, creates <store>/<host>/current and \
             appends one line to authorized_keys: restrict, from the client's address, \
             forced command byteback-server serve --host NAME. Run over SSH by \
             byteback-setup-client; running it again with the same key changes nothing.",
        ),
        sections: vec![
            (
                "ENVIRONMENT",
                vec![
                    Tag(
                        "SSH_CONNECTION",
                        "The client's address when --from is not given.",
                    ),
                    Tag("HOME", "The store root and ~/.ssh when not given."),
                ],
            ),
            ("FILES", vec![SERVER_FILES[2], SERVER_FILES[7]]),
            (
                "EXIT STATUS",
                vec![
                    Tag("0", "Enrolled, or already enrolled with this key."),
                    Tag(
                        "1",
                        "Refused or failed (bad name or key, store not writable).",
                    ),
                    Tag("2", "Usage: the command line could not be parsed."),
                ],
            ),
            (
                "EXAMPLES",
                vec![Ex(&[
                    "byteback-server enrol --host web1 --key 'ssh-ed25519 AAAA...' \
                           --from 192.0.2.10",
                ])],
            ),
        ],
        see_also: vec!["byteback-setup-client(8)", "byteback-server(8)"],
    }
}

/// byteback-server-migrate-keys: what its man page says beyond the options.
fn server_migrate_keys_page() -> Written {
    Written {
        description: Some(
            "Rewrites byteback 1.x's authorized_keys lines (command=\"byteback-receive\", \
             environment=\"BYTEBACK_HOST=NAME\") into byteback's forced command for the same \
             host and key (restrict, forced command byteback-server serve --host NAME), so \
             1.x clients need not re-enrol. from= and expiry-time= are kept. A 1.x line with \
             any other option, a host name byteback refuses or without a directory in the \
             store, or a malformed key is left unchanged with a warning naming its line; \
             other lines are kept byte for byte. The file is replaced atomically after the \
             original is copied to FILE.byteback-1x; a second run finds nothing to do.",
        ),
        sections: vec![
            (
                "ENVIRONMENT",
                vec![Tag("HOME", "The store root and ~/.ssh when not given.")],
            ),
            (
                "FILES",
                vec![
                    SERVER_FILES[0],
                    SERVER_FILES[7],
                    Tag(
                        "~/.ssh/authorized_keys.byteback-1x",
                        "The file as it was before the first migration.",
                    ),
                ],
            ),
            (
                "EXIT STATUS",
                vec![
                    Tag("0", "Every 1.x line migrated (or there was none)."),
                    Tag(
                        "1",
                        "Some 1.x lines were left unchanged (each named in a warning), \
                         or an error.",
                    ),
                    Tag("2", "Usage: the command line could not be parsed."),
                ],
            ),
            (
                "EXAMPLES",
                vec![Ex(&[
                    "byteback-server migrate-keys --dry-run",
                    "byteback-server migrate-keys",
                ])],
            ),
        ],
        see_also: vec!["byteback-server-enrol(8)", "byteback-server(8)"],
    }
}

/// byteback-server-prune: what its man page says beyond the options.
fn server_prune_page() -> Written {
    Written {
        description: Some(
            "Prunes only when free space is below minpercent, then deletes snapshots from \
             the end of the importance (or age) order until it is above maxpercent. Never a \
             host's newest snapshot; not while no snapshot is older than 7 days (unless \
             --prune-force). Free space is measured as btrfs counts it (data and metadata, \
             the scarcer of the two). Flags override byteback.toml, which overrides the \
             defaults. The growth guard refuses to prune while a snapshot whose backups \
             wrote more than 4 times the host's median (and more than 2% of the disc) is \
             not accepted by the admin. byteback-prune and byteback-server prune are the \
             same command.",
        ),
        sections: vec![
            (
                "ENVIRONMENT",
                vec![Tag(
                    "HOME",
                    "The store root when --store is not given (not as root: see FILES).",
                )],
            ),
            (
                "FILES",
                vec![
                    SERVER_FILES[0],
                    SERVER_FILES[1],
                    SERVER_FILES[4],
                    SERVER_FILES[5],
                ],
            ),
            ("EXIT STATUS", PRUNE_EXIT.to_vec()),
            (
                "EXAMPLES",
                vec![
                    P("Snapshots in deletion order, the last one goes first, as \
                       HOST/SNAPSHOT lines (byteback 1.x printed a heading and N: PATH \
                       lines):"),
                    Ex(&["byteback-prune --list"]),
                    P("What would be deleted next:"),
                    Ex(&["byteback-prune --prune --dry-run --verbose"]),
                    P("Accept a growth spike and delete at least the next snapshot:"),
                    Ex(&["byteback-prune --prune-force"]),
                    P("Daily, as byteback-prune.timer does:"),
                    Ex(&["systemctl enable --now byteback-prune.timer"]),
                ],
            ),
        ],
        see_also: vec![
            "byteback.toml(5)",
            "byteback-server(8)",
            "byteback-server-status(8)",
        ],
    }
}

/// byteback-server-status: what its man page says beyond the options.
fn server_status_page() -> Written {
    Written {
        description: Some(
            "Prints per host the newest snapshot, its age, the number of snapshots, the \
             size of the newest and the history held, then the store's free space. With \
             --warn or --crit the first line is BYTEBACK OK, WARNING or CRITICAL and the \
             exit status follows Nagios' conventions.",
        ),
        sections: vec![
            ("FILES", vec![SERVER_FILES[0], SERVER_FILES[5]]),
            ("EXIT STATUS", STATUS_EXIT.to_vec()),
            (
                "EXAMPLES",
                vec![
                    Ex(&["byteback-server status --warn 26h --crit 3d"]),
                    Ex(&["byteback-server status --json"]),
                ],
            ),
        ],
        see_also: vec!["byteback-server(8)", "byteback-prune(8)"],
    }
}

/// byteback-server-verify: what its man page says beyond the options.
fn server_verify_page() -> Written {
    Written {
        description: Some(
            "Re-hashes every regular file each manifest names and compares its size and \
             BLAKE3 with the manifest's; reports damage per snapshot. A damaged file in \
             current is marked so the next backup sends it again; snapshots are read-only \
             and keep their damage, so the report names them. A run with --budget or \
             --max-time continues where the previous one stopped, within a file if it \
             stopped in one (files over 64 MiB are hashed 64 MiB at a time).",
        ),
        sections: vec![
            ("FILES", vec![SERVER_FILES[0], SERVER_FILES[6]]),
            ("EXIT STATUS", VERIFY_EXIT.to_vec()),
            (
                "EXAMPLES",
                vec![
                    P("Check everything:"),
                    Ex(&["byteback-server verify"]),
                    P("In the background, a slice a day (as byteback-prune.service does):"),
                    Ex(&["byteback-server verify --budget 20G --max-time 3600"]),
                ],
            ),
        ],
        see_also: vec!["byteback-server(8)", "byteback-restore(8)"],
    }
}

/// byteback-server-report: what its man page says beyond the options.
fn server_report_page() -> Written {
    Written {
        description: Some(
            "Writes one static HTML page, DIR/index.html, about the store: per host the \
             last backup's age coloured by --warn and --crit (as status), which days, weeks \
             and 4-week periods of the pruning's importance order hold a snapshot, and the \
             data each backup wrote; for the store its free space over time, from the \
             usage logs. Hosts in trouble come first. Inline CSS and SVG, no script; every \
             name from the store is HTML-escaped. The page replaces the previous one \
             atomically, so a web server can serve DIR while a timer rewrites it.",
        ),
        sections: vec![
            ("FILES", vec![SERVER_FILES[0], SERVER_FILES[4]]),
            (
                "EXIT STATUS",
                vec![
                    Tag("0", "The page was written (its path is printed)."),
                    Tag("1", "Error: the store or DIR could not be read or written."),
                    Tag("2", "Usage: the command line could not be parsed."),
                ],
            ),
            (
                "EXAMPLES",
                vec![Ex(&[
                    "byteback-server report --html /var/www/html/byteback --warn 26h --crit 3d",
                ])],
            ),
        ],
        see_also: vec!["byteback-server(8)", "byteback-server-status(8)"],
    }
}

// ---------------------------------------------------------------------------
// byteback.toml(5)
// ---------------------------------------------------------------------------

/// The example in byteback.toml(5); checked against the parser when the page is made.
const TOML_EXAMPLE: &[&str] = &[
    "# /srv/byteback/byteback.toml",
    "min_snapshot_interval = 43200   # at most two snapshots a day",
    "minpercent = 10",
    "maxpercent = 20",
];

// Long: it is the page's text, one section after another.
fn byteback_toml_page() -> String {
    let d = StoreConfig::default();
    let example = TOML_EXAMPLE.join("\n");
    if let Err(e) = StoreConfig::parse(&example) {
        panic!("the example in byteback.toml(5) does not parse: {e}");
    }
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            "byteback.toml",
            "5",
            "",
            concat!("byteback ", env!("CARGO_PKG_VERSION")),
            "byteback",
        ],
    );
    r.control("nh", []);
    r.control("SH", ["NAME"]);
    r.text([roman("byteback.toml - settings of a byteback store")]);
    r.control("SH", ["SYNOPSIS"]);
    r.text([italic("<store>"), bold("/byteback.toml")]);
    r.control("SH", ["DESCRIPTION"]);
    r.text([roman(
        "Store-wide settings of a byteback server, read by byteback-server serve (after each \
         backup, to decide whether to snapshot and to prune) and by byteback-prune. The admin \
         writes it in the store root, the byteback user's home; it lies outside every host's \
         tree, so no client can write it. A missing file means the defaults.",
    )]);
    r.control("PP", []);
    r.text([roman(
        "Only key = integer lines are accepted, one per line; # starts a comment, blank lines \
         are ignored. An unknown key, a value out of range, or maxpercent below minpercent is \
         an error naming the file and line: backups to the store fail before they start and \
         byteback-prune exits with status 1.",
    )]);
    r.control("SH", ["KEYS"]);
    r.control("TP", []);
    r.text([
        bold("min_snapshot_interval"),
        roman(" = "),
        italic("seconds"),
    ]);
    r.text([roman(format!(
        "A backup takes no snapshot while the host's newest snapshot is younger than this; \
         the backup in current still counts as done and the client is told. At least 0. \
         Default {} ({} hours, as byteback 1.x).",
        d.min_snapshot_interval,
        d.min_snapshot_interval / 3600
    ))]);
    r.control("TP", []);
    r.text([bold("minpercent"), roman(" = "), italic("percent")]);
    r.text([roman(format!(
        "Start pruning when the store has less than this percentage free (0 to 100). \
         Default {}. byteback-prune --minpercent overrides it.",
        d.minpercent
    ))]);
    r.control("TP", []);
    r.text([bold("maxpercent"), roman(" = "), italic("percent")]);
    r.text([roman(format!(
        "Once pruning, delete snapshots until more than this percentage is free (minpercent \
         to 100). Default {}. byteback-prune --maxpercent overrides it.",
        d.maxpercent
    ))]);
    r.control("TP", []);
    r.text([bold("io_timeout"), roman(" = "), italic("seconds")]);
    r.text([roman(format!(
        "A session that waits this long for its client to send or take a single byte gives          up, keeps what it received for the next run, and releases the host's lock, so a          connection that went silent (a lost route, a stopped peer) never blocks the next          backup. 1 to 2592000. Default {} (3 hours, as the client's --io-timeout).",
        d.io_timeout
    ))]);
    r.control("TP", []);
    r.text([bold("max_session"), roman(" = "), italic("seconds")]);
    r.text([roman(format!(
        "A backup session that has run this long in all gives up, keeps what it received \
         for the next run, and releases the host's lock, so a client that trickles its data \
         cannot hold the host for ever. 0 (no limit) to 31622400. Default {} (a day).",
        d.max_session
    ))]);
    r.control("TP", []);
    r.text([roman(
        "Each time may also be a quoted age: \"6h\", \"3h\", \"2d\" (a number with s, m, h, \
         d or w). A bare number below 60 for a time is taken as seconds and named in a \
         warning (hours would be \"6h\").",
    )]);
    r.control("SH", ["EXAMPLES"]);
    r.control("RS", ["4"]);
    r.control("nf", []);
    for l in TOML_EXAMPLE {
        r.text([roman(*l)]);
    }
    r.control("fi", []);
    r.control("RE", []);
    r.control("SH", ["FILES"]);
    r.control("TP", []);
    r.text([italic("<store>"), bold("/byteback.toml")]);
    r.text([roman(
        "The store root is byteback-server's and byteback-prune's --store, else the home \
         directory of the server user.",
    )]);
    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("byteback-prune"),
        roman("(8), "),
        bold("byteback-server"),
        roman("(8), "),
        bold("byteback-server-status"),
        roman("(8)"),
    ]);
    r.render()
}

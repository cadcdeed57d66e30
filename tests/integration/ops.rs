//! Operations: the man pages and shell completions `byteback-gen` writes from
//! the binaries' clap definitions, and the systemd units in
//! `packaging/systemd/`.
//!
//! Each check runs the real tool (`man`, `groff`, `bash`, `zsh`, `fish`,
//! `systemd-analyze`): pages must render without a single warning and name
//! every long option of their command, completions must parse and complete
//! every long option, and the units must pass `systemd-analyze verify` with
//! nothing printed. A missing tool fails the test when `CI` is set
//! (scripts/test.sh installs them) and is reported loudly otherwise.

use crate::util;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use byteback::docgen;
use byteback_server::config::StoreConfig;
use util::*;

const GEN: &str = env!("CARGO_BIN_EXE_byteback-gen");
const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/systemd");

/// Runs `byteback-gen WHAT DIR`; returns the paths it wrote.
fn generate(what: &str, dir: &Path) -> BTreeSet<PathBuf> {
    let o = run(Command::new(GEN).arg(what).arg(dir));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// One command line to document: `byteback-server verify` is words
/// `["byteback-server", "verify"]`, page `byteback-server-verify`.
struct Cli {
    words: Vec<String>,
    longs: Vec<String>,
}

impl Cli {
    fn page(&self) -> String {
        self.words.join("-")
    }
}

/// Every binary and every subcommand, with their visible long options, as
/// the binaries themselves define them.
fn clis() -> Vec<Cli> {
    fn walk(c: &clap::Command, words: Vec<String>, out: &mut Vec<Cli>) {
        let longs = c
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        for s in c.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut w = words.clone();
            w.push(s.get_name().to_string());
            walk(s, w, out);
        }
        out.push(Cli { words, longs });
    }
    let mut out = vec![];
    for c in docgen::commands() {
        let mut c = c.disable_help_subcommand(true);
        c.build();
        walk(&c, vec![c.get_name().to_string()], &mut out);
    }
    out
}

/// `man -l PAGE` as a reader sees it (80 columns, ASCII); panics on any
/// warning from man or groff.
fn render_man(page: &Path) -> String {
    let o = run_status(
        Command::new("man")
            .args(["--warnings", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C")
            .env_remove("MANPAGER")
            .env_remove("PAGER"),
    );
    assert!(
        o.status.success() && o.stderr.is_empty() && !o.stdout.is_empty(),
        "man --warnings -l {}: {}",
        page.display(),
        output_text(&o)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `groff -man -ww -z`: every warning category on; output must be empty.
fn groff_warnings(page: &Path) -> String {
    let o = run_status(Command::new("groff").args(["-man", "-ww", "-z"]).arg(page));
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The lines of section `name` of a rendered page (up to the next heading).
fn section<'a>(page: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = page.lines().skip_while(|l| *l != name);
    assert!(lines.next().is_some(), "no {name} section in:\n{page}");
    lines
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .collect()
}

#[test]
fn man_pages_render_cleanly_and_document_every_option() {
    if !have_tool("man") || !have_tool("groff") {
        return;
    }
    let tmp = scratch();
    let dir = tmp.path().join("man");
    let written = generate("man", &dir);
    let clis = clis();
    assert_one_page_per_program(&written, &dir, &clis);
    for cli in &clis {
        assert_page_documents_every_option(&dir, cli);
    }
    assert_written_sections(&dir);
    assert_toml_page_gives_real_defaults(&dir.join("man5/byteback.toml.5"));
}

/// byteback-gen wrote one man8 page per program and subcommand (`clis`)
/// and byteback.toml(5), nothing else.
fn assert_one_page_per_program(written: &BTreeSet<PathBuf>, dir: &Path, clis: &[Cli]) {
    let mut expected: BTreeSet<PathBuf> = clis
        .iter()
        .map(|c| dir.join("man8").join(format!("{}.8", c.page())))
        .collect();
    expected.insert(dir.join("man5/byteback.toml.5"));
    assert_eq!(written, &expected, "pages written");
    for name in [
        "byteback-backup",
        "byteback-restore",
        "byteback-setup-client",
        "byteback-server",
        "byteback-prune",
        "byteback-server-verify",
    ] {
        assert!(
            expected.contains(&dir.join(format!("man8/{name}.8"))),
            "{name}(8) expected"
        );
    }
}

/// `cli`'s page renders without a groff warning, has the usual sections,
/// and its OPTIONS name every long option.
fn assert_page_documents_every_option(dir: &Path, cli: &Cli) {
    let path = dir.join("man8").join(format!("{}.8", cli.page()));
    let page = render_man(&path);
    let warnings = groff_warnings(&path);
    assert!(
        warnings.is_empty(),
        "{}: groff -ww:\n{warnings}",
        cli.page()
    );
    let options: String = section(&page, "OPTIONS").join("\n");
    for long in &cli.longs {
        assert!(
            options.contains(&format!("--{long}")),
            "{}(8) does not document --{long}:\n{page}",
            cli.page()
        );
    }
    for s in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SEE ALSO"] {
        section(&page, s);
    }
}

/// The hand-written sections: EXIT STATUS codes, FILES, EXAMPLES, the
/// server's SUBCOMMANDS, TRUST MODEL, byteback-backup's settings files.
fn assert_written_sections(dir: &Path) {
    // The written sections, rendered.
    let render = |name: &str| render_man(&dir.join("man8").join(format!("{name}.8")));
    // The tags of EXIT STATUS: the codes at the section's first indent.
    let exit_codes = |page: &str| -> Vec<String> {
        section(page, "EXIT STATUS")
            .iter()
            .filter_map(|l| {
                let t = l.trim_start();
                let code: String = t.chars().take_while(char::is_ascii_digit).collect();
                (!code.is_empty() && l.len() - t.len() == 7).then_some(code)
            })
            .collect()
    };
    for (name, codes) in [
        ("byteback-backup", &["0", "24", "1", "2"][..]),
        ("byteback-restore", &["0", "24", "1", "2"]),
        ("byteback-prune", &["0", "1", "2", "3"]),
        ("byteback-server-prune", &["0", "1", "2", "3"]),
        ("byteback-server-status", &["0", "1", "2", "3"]),
        ("byteback-server-verify", &["0", "1", "2", "3"]),
        ("byteback-server-serve", &["0", "1", "2"]),
        ("byteback-server-enrol", &["0", "1", "2"]),
        ("byteback-server-report", &["0", "1", "2"]),
        ("byteback-setup-client", &["0", "1", "2"]),
    ] {
        let page = render(name);
        assert_eq!(exit_codes(&page), codes, "{name}(8) EXIT STATUS");
        section(&page, "FILES");
        section(&page, "EXAMPLES");
    }
    let server = render("byteback-server");
    let status = section(&server, "EXIT STATUS").join("\n");
    for sub in ["serve", "enrol", "prune", "status", "verify", "report"] {
        assert!(
            status.contains(&format!("       {sub}")),
            "{sub} in:\n{status}"
        );
        assert!(
            section(&server, "SUBCOMMANDS")
                .iter()
                .any(|l| l.trim() == format!("byteback-server-{sub}(8)")),
            "byteback-server(8) lists {sub}"
        );
    }
    for name in [
        "byteback-restore",
        "byteback-server",
        "byteback-server-serve",
    ] {
        assert!(
            section(&render(name), "TRUST MODEL").len() > 3,
            "{name}(8) TRUST MODEL"
        );
    }
    let backup_files = section(&render("byteback-backup"), "FILES").join("\n");
    for f in [
        "/etc/byteback/destination",
        "/etc/byteback/key",
        "/etc/byteback/known_hosts",
        "/etc/byteback/excludes",
        "/etc/byteback/rsync_flags",
        "/etc/byteback/rsync_filter",
    ] {
        assert!(backup_files.contains(f), "byteback-backup(8) FILES: {f}");
    }
}

/// byteback.toml(5): no groff warning, every key with its real default,
/// and an example the server's parser accepts.
fn assert_toml_page_gives_real_defaults(toml: &Path) {
    let page = render_man(toml);
    let warnings = groff_warnings(toml);
    assert!(
        warnings.is_empty(),
        "byteback.toml(5): groff -ww:\n{warnings}"
    );
    let keys = section(&page, "KEYS").join("\n");
    let d = StoreConfig::default();
    for (key, default) in [
        ("min_snapshot_interval", d.min_snapshot_interval),
        ("minpercent", i64::from(d.minpercent)),
        ("maxpercent", i64::from(d.maxpercent)),
    ] {
        let at = keys
            .find(&format!("{key} = "))
            .unwrap_or_else(|| panic!("{key} in KEYS:\n{keys}"));
        let entry: String = keys[at..]
            .lines()
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let entry = entry.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            entry.contains(&format!("Default {default}")),
            "{key}: default {default} in: {entry}"
        );
    }
    // The example in the page is accepted by the server's parser.
    let example = section(&page, "EXAMPLES")
        .iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join("\n");
    let parsed = StoreConfig::parse(&example).unwrap_or_else(|e| panic!("{e}:\n{example}"));
    assert_ne!(parsed, d, "the example sets something");
}

/// The checks above must be able to fail: a page with an undefined macro and
/// a missing font is caught by both.
#[test]
fn man_warning_check_catches_a_broken_page() {
    if !have_tool("man") || !have_tool("groff") {
        return;
    }
    let tmp = scratch();
    let bad = tmp.path().join("bad.8");
    fs::write(
        &bad,
        ".TH BAD 8\n.SH NAME\nbad \\- a page\n.NOSUCHMACRO\n\\fQword\n",
    )
    .unwrap();
    let o = run_status(
        Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&bad)
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C"),
    );
    assert!(
        !o.stderr.is_empty(),
        "man --warnings stayed quiet: {}",
        output_text(&o)
    );
    assert!(groff_warnings(&bad).contains("NOSUCHMACRO"));
}

#[test]
fn completions_parse_and_complete_every_option() {
    let tmp = scratch();
    let dir = tmp.path().join("completions");
    let written = generate("completions", &dir);
    let names: Vec<String> = docgen::commands()
        .iter()
        .map(|c| c.get_name().to_string())
        .collect();
    let mut expected = BTreeSet::new();
    for n in &names {
        expected.insert(dir.join("bash").join(n));
        expected.insert(dir.join("zsh").join(format!("_{n}")));
        expected.insert(dir.join("fish").join(format!("{n}.fish")));
    }
    assert_eq!(written, expected, "completion files written");
    let clis = clis();

    // bash: parses, and completing `CMD [SUB] --` offers every long option.
    if have_tool("bash") {
        for n in &names {
            let file = dir.join("bash").join(n);
            run(Command::new("bash").arg("-n").arg(&file));
        }
        for cli in &clis {
            let file = dir.join("bash").join(&cli.words[0]);
            let words: Vec<String> = cli.words.iter().map(|w| format!("'{w}'")).collect();
            let script = format!(
                "source '{file}'\n\
                 f=$(complete -p {cmd} | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')\n\
                 COMP_WORDS=({words} --)\n\
                 COMP_CWORD={cword}\n\
                 COMP_LINE=\"${{COMP_WORDS[*]}}\"\n\
                 COMP_POINT=${{#COMP_LINE}}\n\
                 \"$f\" {cmd} -- '{prev}'\n\
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
                file = file.display(),
                cmd = cli.words[0],
                words = words.join(" "),
                cword = cli.words.len(),
                prev = cli.words.last().unwrap(),
            );
            let o = run(Command::new("bash").arg("-c").arg(&script));
            let offered: BTreeSet<&str> = std::str::from_utf8(&o.stdout).unwrap().lines().collect();
            for long in &cli.longs {
                assert!(
                    offered.contains(format!("--{long}").as_str()),
                    "bash: `{} --<TAB>` does not offer --{long}: {offered:?}",
                    cli.words.join(" ")
                );
            }
        }
        // And the server's subcommands at the first word.
        let file = dir.join("bash/byteback-server");
        let o = run(Command::new("bash").arg("-c").arg(format!(
            "source '{}'\n\
             COMP_WORDS=(byteback-server '')\nCOMP_CWORD=1\n\
             _byteback__server byteback-server '' byteback-server\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            file.display()
        )));
        let offered = String::from_utf8(o.stdout).unwrap();
        for sub in ["serve", "enrol", "prune", "status", "verify", "report"] {
            assert!(
                offered.lines().any(|l| l == sub),
                "bash offers {sub}: {offered}"
            );
        }
    }

    // zsh: parses and names every long option (no interactive completion here).
    if have_tool("zsh") {
        for n in &names {
            let file = dir.join("zsh").join(format!("_{n}"));
            run(Command::new("zsh").arg("-n").arg(&file));
        }
        for cli in &clis {
            let script =
                fs::read_to_string(dir.join("zsh").join(format!("_{}", cli.words[0]))).unwrap();
            for long in &cli.longs {
                assert!(
                    script.contains(&format!("--{long}["))
                        || script.contains(&format!("--{long}=[")),
                    "zsh completion of {} lacks --{long}",
                    cli.page()
                );
            }
        }
    }

    // fish: parses, and `complete -C 'CMD [SUB] --'` offers every long option.
    if have_tool("fish") {
        for n in &names {
            let file = dir.join("fish").join(format!("{n}.fish"));
            run(Command::new("fish").arg("-n").arg(&file));
        }
        for cli in &clis {
            let file = dir.join("fish").join(format!("{}.fish", cli.words[0]));
            let o = run(Command::new("fish")
                .args(["--no-config", "-c"])
                .arg(format!(
                    "source '{}'; complete -C '{} --'",
                    file.display(),
                    cli.words.join(" ")
                )));
            let offered: BTreeSet<String> = String::from_utf8(o.stdout)
                .unwrap()
                .lines()
                .map(|l| l.split('\t').next().unwrap_or_default().to_string())
                .collect();
            for long in &cli.longs {
                assert!(
                    offered.contains(&format!("--{long}")),
                    "fish: `{} --<TAB>` does not offer --{long}: {offered:?}",
                    cli.words.join(" ")
                );
            }
        }
    }
}

/// The units as shipped, except that `/usr/local/bin/` (where the README
/// installs the binaries) is replaced by the directory of the binaries just
/// built, so systemd-analyze finds every ExecStart executable.
fn units_for_test(dir: &Path) -> Vec<PathBuf> {
    let built = bin("byteback-server");
    let built_dir = built.parent().unwrap().to_str().unwrap().to_string();
    let mut out = vec![];
    for name in [
        "byteback-backup.service",
        "byteback-backup.timer",
        "byteback-prune.service",
        "byteback-prune.timer",
    ] {
        let unit = fs::read_to_string(Path::new(UNITS).join(name))
            .unwrap_or_else(|e| panic!("packaging/systemd/{name}: {e}"));
        for l in unit.lines().filter(|l| l.starts_with("ExecStart")) {
            assert!(
                l.starts_with("ExecStart=/usr/local/bin/byteback-"),
                "{name}: {l}"
            );
        }
        let path = dir.join(name);
        fs::write(
            &path,
            unit.replace("/usr/local/bin/", &format!("{built_dir}/")),
        )
        .unwrap();
        out.push(path);
    }
    out
}

fn unit_lines(name: &str) -> Vec<String> {
    fs::read_to_string(Path::new(UNITS).join(name))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    // What the units promise.
    let backup = unit_lines("byteback-backup.service");
    let prune = unit_lines("byteback-prune.service");
    for want in [
        "Type=oneshot",
        "ExecStart=/usr/local/bin/byteback-backup",
        "IOSchedulingClass=idle",
    ] {
        assert!(backup.iter().any(|l| l == want), "backup service: {want}");
    }
    assert!(backup.iter().any(|l| l.starts_with("Nice=")));
    // A run without a destination fails the unit, seen; never a skip.
    assert!(
        !backup.iter().any(|l| l.starts_with("Condition")),
        "backup service: {backup:?}"
    );
    for want in [
        "Type=oneshot",
        "User=byteback",
        "ExecStart=/usr/local/bin/byteback-prune --prune",
    ] {
        assert!(prune.iter().any(|l| l == want), "prune service: {want}");
    }
    let execs: Vec<&String> = prune
        .iter()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(execs.len(), 2, "prune, then verify: {execs:?}");
    assert!(
        execs[1].starts_with("ExecStart=/usr/local/bin/byteback-server verify --budget "),
        "{}",
        execs[1]
    );
    for timer in ["byteback-backup.timer", "byteback-prune.timer"] {
        let t = unit_lines(timer);
        for want in ["Persistent=true", "WantedBy=timers.target"] {
            assert!(t.iter().any(|l| l == want), "{timer}: {want}");
        }
        assert!(t.iter().any(|l| l.starts_with("OnCalendar=")), "{timer}");
        assert!(
            t.iter().any(|l| l.starts_with("RandomizedDelaySec=")),
            "{timer}"
        );
    }
    assert!(unit_lines("byteback-backup.timer")
        .iter()
        .any(|l| l == "OnCalendar=daily"));

    // Every ExecStart command line is accepted by the binary it runs: with
    // --help appended, clap parses (and checks) the options first.
    let built = bin("byteback-server");
    let built_dir = built.parent().unwrap();
    for l in backup
        .iter()
        .chain(&prune)
        .filter(|l| l.starts_with("ExecStart="))
    {
        let mut words = l["ExecStart=/usr/local/bin/".len()..].split_whitespace();
        let prog = words.next().unwrap();
        let o = run_status(Command::new(built_dir.join(prog)).args(words).arg("--help"));
        assert!(o.status.success(), "{l}: {}", output_text(&o));
    }

    if !have_tool("systemd-analyze") || !have_tool("man") {
        return;
    }
    let tmp = scratch();
    let units = units_for_test(tmp.path());
    // The units' Documentation=man:... pages are the generated ones:
    // systemd-analyze runs `man` for each, which finds them through MANPATH.
    let man = tmp.path().join("man");
    generate("man", &man);
    let verify = |units: &[PathBuf]| {
        run_status(
            Command::new("systemd-analyze")
                .arg("verify")
                .args(units)
                .env("MANPATH", &man)
                .env("SYSTEMD_PAGER", "cat")
                .current_dir(tmp.path()),
        )
    };
    let o = verify(&units);
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "systemd-analyze verify: {}",
        output_text(&o)
    );

    // And it can fail: a unit with a bad value and a missing executable.
    let bad = tmp.path().join("byteback-bad.service");
    fs::write(
        &bad,
        "[Service]\nType=oneshot\nNice=very\nExecStart=/nonexistent/byteback-backup\n",
    )
    .unwrap();
    let o = verify(&[bad]);
    let all = output_text(&o);
    assert!(
        all.contains("nice priority") && all.contains("/nonexistent"),
        "{all}"
    );
}

/// Usage and configuration errors exit 2 (as the README and man pages say),
/// whether clap or byteback finds them; they are not retried.
#[test]
fn usage_errors_exit_2() {
    let d = scratch();
    let store = d.path().join("store");
    let locked = d.path().join("locked").to_str().unwrap().to_string();
    run(Command::new("ssh-keygen").args([
        "-q",
        "-t",
        "ed25519",
        "-N",
        "a passphrase",
        "-C",
        "",
        "-f",
        &locked,
    ]));
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("byteback-backup", vec!["--no-such-flag"]),
        ("byteback-backup", vec!["--retry-number", "many"]),
        // A forgotten colon: never a store in the current directory.
        ("byteback-backup", vec!["-d", "bb@server", "-e", "1"]),
        (
            "byteback-backup",
            vec!["-d", "server.example.com", "-e", "1"],
        ),
        ("byteback-restore", vec!["-d", "bb@server", "/"]),
        // Keys that cannot be loaded fail at once, not after 5 retries.
        (
            "byteback-backup",
            vec!["-d", "bb@127.0.0.1:", "-k", "/nonexistent-key", "-e", "1"],
        ),
        (
            "byteback-backup",
            vec!["-d", "bb@127.0.0.1:", "-k", &locked, "-e", "1"],
        ),
        (
            "byteback-backup",
            vec!["--hostname", "../x", "-d", "/nonexistent-store"],
        ),
        (
            "byteback-restore",
            vec!["--snapshot", "..", "-d", "/nonexistent-store", "/"],
        ),
        (
            "byteback-restore",
            vec!["--hostname", "h", "-d", "/nonexistent-store"],
        ),
        (
            "byteback-restore",
            vec!["--hostname", "h", "-d", "/nonexistent-store", "../../x"],
        ),
        (
            "byteback-restore",
            vec![
                "--restore",
                "--target",
                "/nonexistent-target/x",
                "--hostname",
                "h",
                "-d",
                "/nonexistent-store",
                "/",
            ],
        ),
        (
            "byteback-restore",
            vec![
                "--list",
                "--target",
                "/tmp",
                "--hostname",
                "h",
                "-d",
                "/nonexistent-store",
                "/",
            ],
        ),
    ];
    for (prog, args) in cases {
        let o = run_status(
            Command::new(bin(prog))
                .args(&args)
                .env("BYTEBACK_CONFIG_DIR", d.path())
                .current_dir(d.path()),
        );
        assert_eq!(
            o.status.code(),
            Some(2),
            "{prog} {args:?}: {}",
            output_text(&o)
        );
    }
    assert!(!store.exists());
    assert!(!d.path().join("bb@server").exists());
    assert!(!d.path().join("server.example.com").exists());
    assert!(!Path::new("/nonexistent-store").exists());
    assert!(!Path::new("/nonexistent-target").exists());
}

/// As root, the admin commands never take root's home for the store (an
/// empty store, exit 0, would hide every host): the account byteback's
/// home, said on stderr, or a usage error saying what to give.
#[test]
fn admin_commands_as_root_never_take_roots_home_for_the_store() {
    if !require_root("running as root") {
        return;
    }
    let d = scratch();
    let account = run_status(Command::new("getent").args(["passwd", "byteback"]));
    for args in [
        &["byteback-prune", "--list"][..],
        &["byteback-server", "status"][..],
        &["byteback-server", "verify", "--budget", "1M"][..],
    ] {
        let o = run_status(
            Command::new(bin(args[0]))
                .args(&args[1..])
                .env("HOME", d.path())
                .current_dir(d.path()),
        );
        let all = output_text(&o);
        assert!(!all.contains(d.path().to_str().unwrap()), "{args:?}: {all}");
        if account.status.success() {
            assert!(
                all.contains("the home of the account byteback"),
                "{args:?}: {all}"
            );
        } else {
            assert!(all.contains("no account byteback"), "{args:?}: {all}");
            assert_ne!(o.status.code(), Some(0), "{args:?}: {all}");
        }
    }
    // Root working on an account's store does so as the account: what it
    // creates there (the prune lock, verify's state) stays the account's,
    // or the account's own daily runs would fail on root's 0600 files.
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    let store = d.path().join("store");
    fs::create_dir(&store).unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    chown(&store, Some(65534), Some(65534)).unwrap();
    let mut dir = d.path().to_path_buf();
    while dir.pop() && dir != Path::new("/") {
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by others",
            dir.display()
        );
    }
    let s = store.to_str().unwrap();
    run(Command::new(bin("byteback-prune")).args(["--store", s, "--prune", "--dry-run"]));
    run(Command::new(bin("byteback-server")).args(["verify", "--store", s]));
    for e in fs::read_dir(&store).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.metadata().unwrap().uid(), 65534, "{:?}", e.path());
    }
    assert!(store.join(".byteback-prune.lock").exists());
}

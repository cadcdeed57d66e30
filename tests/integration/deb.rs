//! The Debian package: `scripts/deb.sh dev` builds it (cargo-deb, from the
//! debug binaries the tests use, stripped, fast compression), `dpkg-deb` shows what it holds,
//! `dpkg -i` installs it into /usr, the installed binaries back up and
//! restore a tree (rsync finds no difference), `man -w` finds the pages,
//! systemd-analyze accepts the installed units, and `dpkg --purge` takes
//! everything away again, the client's records in /var/cache/byteback too.
//!
//! Needs root (it installs into /usr: acceptable in CI, and removed after).
//! cargo-deb, dpkg, man and systemd-analyze missing: the test fails when `CI`
//! is set (scripts/test.sh installs them) and says so loudly otherwise.

use crate::util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PACKAGE: &str = "byteback";
/// Where a root client keeps its records of the last backups.
const CACHE: &str = "/var/cache/byteback";

/// Purges the package on drop, so a failing test leaves nothing in /usr.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        match Command::new("dpkg").args(["--purge", PACKAGE]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("dpkg --purge {PACKAGE}: {}", output_text(&o)),
            Err(e) => eprintln!("dpkg --purge {PACKAGE}: {e}"),
        }
    }
}

fn installed_files() -> Vec<String> {
    let o = run(Command::new("dpkg").args(["-L", PACKAGE]));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_debian_package_installs_works_and_goes_away() {
    if !require_root("installing the Debian package") {
        return;
    }
    if !have(
        "cargo-deb",
        Command::new("cargo").args(["deb", "--version"]),
    ) || !have("dpkg", Command::new("dpkg").arg("--version"))
        || !have("man", Command::new("man").arg("--version"))
        || !have(
            "systemd-analyze",
            Command::new("systemd-analyze").arg("--version"),
        )
    {
        return;
    }
    let status = run_status(Command::new("dpkg").args(["-s", PACKAGE]));
    assert!(
        !status.status.success(),
        "{PACKAGE} is already installed on this machine; this test installs and purges it"
    );

    let d = scratch();
    let deb = build_package(d.path());
    let want = expected_paths();
    check_contents(&deb, &want);
    check_control_and_binaries(&deb, d.path());
    let installed = install(&deb);
    backup_and_restore_with_installed_programs(d.path());
    drop(installed);
    assert_purged(&want);
}

/// Builds the package from the debug binaries (already built for the
/// tests), stripped, into `d/deb`; returns the one `.deb`.
fn build_package(d: &Path) -> PathBuf {
    let out_dir = d.join("deb");
    fs::create_dir_all(&out_dir).unwrap();
    let o = run(Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/deb.sh"))
        .arg("dev")
        .arg("--output")
        .arg(&out_dir)
        .arg("--fast")
        .env("BYTEBACK_DEB_PREBUILT", "1")
        .current_dir(ROOT));
    let debs: Vec<_> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb: {debs:?}\n{}", output_text(&o));
    debs[0].clone()
}

/// Every path the package must hold (as `dpkg-deb -c` names them).
fn expected_paths() -> Vec<String> {
    let mut want: Vec<String> = vec![];
    for b in [
        "byteback-backup",
        "byteback-restore",
        "byteback-setup-client",
        "byteback-server",
        "byteback-prune",
    ] {
        want.push(format!("./usr/bin/{b}"));
        want.push(format!("./usr/share/man/man8/{b}.8.gz"));
        want.push(format!("./usr/share/bash-completion/completions/{b}"));
        want.push(format!("./usr/share/zsh/vendor-completions/_{b}"));
        want.push(format!("./usr/share/fish/vendor_completions.d/{b}.fish"));
    }
    for sub in ["serve", "enrol", "prune", "status", "verify"] {
        want.push(format!("./usr/share/man/man8/byteback-server-{sub}.8.gz"));
    }
    for unit in [
        "byteback-backup.service",
        "byteback-backup.timer",
        "byteback-prune.service",
        "byteback-prune.timer",
    ] {
        want.push(format!("./usr/lib/systemd/system/{unit}"));
    }
    want.push("./usr/share/man/man5/byteback.toml.5.gz".into());
    want.push("./etc/byteback/excludes".into());
    want.push("./usr/share/byteback/hooks/pre-backup.d/50-mysql".into());
    want.push("./usr/share/byteback/hooks/pre-backup.d/50-postgresql".into());
    want
}

/// `dpkg-deb -c` lists every path of `want`; executables are 0755, the rest
/// 0644 (hooks are executables too).
fn check_contents(deb: &Path, want: &[String]) {
    let contents =
        String::from_utf8(run(Command::new("dpkg-deb").arg("-c").arg(deb)).stdout).unwrap();
    let names: Vec<&str> = contents
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for w in want {
        assert!(
            names.contains(&w.as_str()),
            "{w} not in the package:\n{contents}"
        );
    }
    for l in contents.lines() {
        let mut f = l.split_whitespace();
        let (mode, name) = (f.next().unwrap(), f.nth(4).unwrap());
        if mode.starts_with('d') {
            continue;
        }
        let exec = name.starts_with("./usr/bin/") || name.contains("/hooks/");
        assert_eq!(mode, if exec { "-rwxr-xr-x" } else { "-rw-r--r--" }, "{l}");
    }
}

/// The control files (conffiles, package and version), stripped binaries,
/// and units that name /usr/bin.
fn check_control_and_binaries(deb: &Path, d: &Path) {
    let ctl = d.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&ctl));
    let conffiles = fs::read_to_string(ctl.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/byteback/excludes");
    let control = fs::read_to_string(ctl.join("control")).unwrap();
    assert!(control.contains("Package: byteback\n"), "{control}");
    assert!(control.contains("Version: 2.0.0"), "{control}");
    // Stripped: no debug sections in the shipped binaries (and so small).
    let x = d.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x));
    let size = fs::metadata(x.join("usr/bin/byteback-backup"))
        .unwrap()
        .len();
    assert!(
        size < 40 << 20,
        "byteback-backup is {size} bytes: not stripped?"
    );
    let units =
        fs::read_to_string(x.join("usr/lib/systemd/system/byteback-backup.service")).unwrap();
    assert!(
        units.contains("ExecStart=/usr/bin/byteback-backup\n"),
        "{units}"
    );
    assert!(!units.contains("/usr/local"), "{units}");
}

/// `dpkg -i`: the binaries, man pages and units are where they belong and
/// systemd-analyze accepts the installed units. Purges on drop.
fn install(deb: &Path) -> Installed {
    let guard = Installed;
    let o = run(Command::new("dpkg").arg("-i").arg(deb));
    let files = installed_files();
    assert!(
        files.iter().any(|f| f == "/usr/bin/byteback-backup"),
        "{files:?}\n{}",
        output_text(&o)
    );
    let o = run(Command::new("/usr/bin/byteback-backup").arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "byteback-backup 2.0.0"
    );
    let o = run(Command::new("man").args(["-w", "byteback-backup"]));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "/usr/share/man/man8/byteback-backup.8.gz"
    );
    let o = run(Command::new("man").args(["-w", "5", "byteback.toml"]));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "/usr/share/man/man5/byteback.toml.5.gz"
    );
    // The installed units: systemd-analyze finds their executables and pages.
    let unit_paths: Vec<String> = [
        "byteback-backup.service",
        "byteback-backup.timer",
        "byteback-prune.service",
        "byteback-prune.timer",
    ]
    .iter()
    .map(|u| format!("/usr/lib/systemd/system/{u}"))
    .collect();
    let o = run_status(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&unit_paths)
            .env("SYSTEMD_PAGER", "cat"),
    );
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "systemd-analyze verify: {}",
        output_text(&o)
    );
    guard
}

/// A local backup and restore with the installed programs only (the client
/// starts the byteback-server beside it, /usr/bin's): rsync finds no
/// difference.
fn backup_and_restore_with_installed_programs(d: &Path) {
    let src = d.join("src");
    fs::create_dir_all(&src).unwrap();
    make_rich_tree(&src, &mut Rng::new(42));
    let store = d.join("store");
    let conf = d.join("conf");
    fs::create_dir_all(&conf).unwrap();
    // As a user's: its record of the last backup goes to /var/cache/byteback.
    let o = run(Command::new("/usr/bin/byteback-backup")
        .env_remove("BYTEBACK_SERVER")
        .env_remove("BYTEBACK_CACHE_DIR")
        .env("BYTEBACK_CONFIG_DIR", &conf)
        .arg("--destination")
        .arg(&store)
        .arg("--source")
        .arg(&src)
        .args(["--hostname", "debtest", "--retry-number", "0", "--json"]));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["exit_code"], 0, "{j}");
    let snapshot = j["snapshot"].as_str().unwrap().to_string();
    // Named after the destination as given and the host name (other
    // tests' backups keep theirs in $BYTEBACK_CACHE_DIR).
    let mut name = blake3::Hasher::new();
    name.update(store.as_os_str().as_encoded_bytes());
    name.update(&[0]);
    name.update(b"debtest");
    let record = Path::new(CACHE).join(format!("{}.entries", &name.finalize().to_hex()[..32]));
    assert!(
        record.is_file(),
        "no record of the last backup at {}",
        record.display()
    );
    let into = d.join("restored");
    fs::create_dir_all(&into).unwrap();
    run(Command::new("/usr/bin/byteback-restore")
        .env_remove("BYTEBACK_SERVER")
        .current_dir(&into)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "debtest", "--restore"])
        .arg(&src));
    assert_same_tree(
        &src,
        &into.join(&snapshot).join(src.strip_prefix("/").unwrap()),
    );
}

/// After `dpkg --purge`, nothing of the package is left, nor the client's
/// records of its last backups.
fn assert_purged(want: &[String]) {
    assert!(
        !Path::new(CACHE).exists(),
        "{CACHE} is still there after dpkg --purge"
    );
    assert!(!run_status(Command::new("dpkg").args(["-s", PACKAGE]))
        .status
        .success());
    for f in want {
        let p = Path::new(&f[1..]);
        assert!(
            !p.exists(),
            "{} is still there after dpkg --purge",
            p.display()
        );
    }
}

//! `byteback-server report --html DIR` on a real store (btrfs loop, backups
//! by the real binaries with the server's clock moved), rendered by headless
//! Chromium: the DOM has every host, in trouble first, with the state the
//! thresholds give, the retention strip marks the periods that hold a
//! snapshot, hostile text from the store stays text, and the screenshot is a
//! real PNG of the asked size.
//!
//! Needs root (btrfs) and Chromium (Debian's `chromium`, installed by
//! scripts/test.sh): missing, it fails when `CI` is set and says so loudly
//! otherwise.

use crate::util;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use util::*;

const DAY: i64 = 86_400;

/// Headless Chromium with its own profile directory (tests run in parallel).
fn chromium(profile: &Path, args: &[&str], page: &Path) -> Output {
    let o = run_status(
        Command::new("timeout")
            .arg("300")
            .arg("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(format!("file://{}", page.display())),
    );
    assert!(o.status.success(), "chromium: {}", output_text(&o));
    o
}

#[test]
fn the_html_report_shows_every_host_trouble_first_and_escapes_the_store() {
    if !require_root("the HTML report test (btrfs store)")
        || !have("chromium", Command::new("chromium").arg("--version"))
    {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    let d = scratch();
    let store = fs_.mount.join("store");
    store_without_interval(&store);
    let wrapper = server_wrapper(d.path());
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = Rng::new(99);
    // 2026-11-27T12:00Z, a Friday.
    let now = 1_795_780_800;
    let backup = |host: &str, t: i64| {
        run(Command::new(bin("byteback-backup"))
            .env("BYTEBACK_SERVER", &wrapper)
            .env("BYTEBACK_TEST_NOW", rfc3339(t))
            .env("TZ", "UTC")
            .arg("--destination")
            .arg(&store)
            .arg("--source")
            .arg(&src)
            .args(["--hostname", host, "--retry-number", "0", "-q"]));
    };
    // alpha: every day for 10 days, the last 2 h ago (OK); beta: up to 2
    // days ago (WARNING); gamma: up to 5 days ago (CRITICAL).
    for (host, last_day) in [("alpha", 0), ("beta", 2), ("gamma", 5)] {
        for day in (last_day..10).rev() {
            fs::write(src.join("data"), rng.bytes(50_000 + 10_000 * day as usize)).unwrap();
            backup(host, now - day * DAY - 2 * 3600);
        }
    }
    // Hostile text where the store holds free text: a usage-log line's
    // snapshot field, and a directory beside the snapshots.
    let hostile = "<script>alert(1)</script><img/src=x/onerror=alert(2)>";
    let mut log = fs::read_to_string(store.join("gamma/.byteback-usage")).unwrap();
    log.push_str(&format!("{} 4096 {hostile}\n", now - 6 * DAY));
    fs::write(store.join("gamma/.byteback-usage"), log).unwrap();
    fs::create_dir_all(store.join("gamma/\"><svg onload=alert(3)>")).unwrap();
    // And a damaged file's path, as verify records it (hex).
    let damaged: String = b"x\"><iframe src=javascript:alert(4)>"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fs::write(
        store.join("gamma/.byteback-verify"),
        format!("damage current {damaged} content does not match its BLAKE3\n"),
    )
    .unwrap();
    let usage = fs::read_to_string(store.join("alpha/.byteback-usage")).unwrap();
    assert!(
        usage.lines().all(|l| l.split_whitespace().count() == 5),
        "every usage line records the free space: {usage}"
    );

    let out = d.path().join("html");
    let o = run(Command::new(bin("byteback-server"))
        .env("TZ", "UTC")
        .args(["report", "--store"])
        .arg(&store)
        .arg("--html")
        .arg(&out)
        .args(["--now", &rfc3339(now), "--warn", "26h", "--crit", "3d"]));
    let page = out.join("index.html");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        page.display().to_string()
    );
    let html = fs::read_to_string(&page).unwrap();
    assert!(!html.contains("<script"), "the page has a script element");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&lt;img/src=x/onerror=alert(2)&gt;")
    );

    // The DOM as Chromium built it.
    let profile = d.path().join("chromium-profile");
    let dom = String::from_utf8(chromium(&profile, &["--dump-dom"], &page).stdout).unwrap();
    let lower = dom.to_ascii_lowercase();
    // The hostile text is there, but only as text (entities), never markup:
    // no script or img element, no svg with an onload attribute.
    for bad in ["<script", "<img", "<svg onload", "<iframe"] {
        assert!(!lower.contains(bad), "{bad} as markup in the DOM:\n{dom}");
    }
    // Each reached the page, as text.
    for text in [
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "&lt;svg onload=alert(3)&gt;",
        "&lt;iframe src=javascript:alert(4)&gt;",
    ] {
        assert!(dom.contains(text), "{text} not in the DOM:\n{dom}");
    }
    let section = |host: &str| -> (usize, &str) {
        let key = format!("data-host=\"{host}\"");
        let at = dom
            .find(&key)
            .unwrap_or_else(|| panic!("{host} is not in the DOM:\n{dom}"));
        let end = dom[at..].find("</section>").unwrap() + at;
        (at, &dom[at..end])
    };
    let (a, alpha) = section("alpha");
    let (b, beta) = section("beta");
    let (g, gamma) = section("gamma");
    assert!(
        g < b && b < a,
        "trouble first: gamma {g}, beta {b}, alpha {a}"
    );
    assert!(alpha.contains("data-state=\"OK\""), "{alpha}");
    assert!(beta.contains("data-state=\"WARNING\""), "{beta}");
    assert!(gamma.contains("data-state=\"CRITICAL\""), "{gamma}");
    assert!(alpha.contains("last backup 2h00m ago"), "{alpha}");
    assert!(gamma.contains("last backup 5d02h ago"), "{gamma}");
    // Retention: alpha holds a snapshot on each of the last 7 days, beta on
    // 5 of them, gamma on 2; the two weeks before hold some for everyone.
    let days = |s: &str| -> (usize, usize) {
        let rects: Vec<&str> = s.split("<rect").skip(1).collect();
        let day_rects: Vec<&&str> = rects.iter().filter(|r| r.contains("<title>day ")).collect();
        (
            day_rects
                .iter()
                .filter(|r| r.contains("class=\"kept\""))
                .count(),
            day_rects.len(),
        )
    };
    assert_eq!(days(alpha), (7, 7), "{alpha}");
    assert_eq!(days(beta), (5, 7), "{beta}");
    assert_eq!(days(gamma), (2, 7), "{gamma}");
    // Data written per backup: one bar per usage line (gamma: 5 + the planted one).
    let bars = |s: &str| s.matches("<rect class=\"bar").count();
    assert_eq!(bars(alpha), 10);
    assert_eq!(bars(beta), 8);
    assert_eq!(bars(gamma), 6);
    // The store's free space over time, from the usage logs.
    assert!(dom.contains("class=\"free\""), "no free-space line:\n{dom}");

    // The screenshot: a PNG of the asked size, not an empty page.
    let png = d.path().join("report.png");
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1100,900",
        ],
        &page,
    );
    let bytes = fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1100, 900));
    // A blank 1100x900 page compresses to a few KiB; this one has charts.
    assert!(bytes.len() > 30_000, "screenshot of {} bytes", bytes.len());
}

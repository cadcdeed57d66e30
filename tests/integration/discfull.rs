//! A full disc resolves itself: a backup that runs out of space makes the
//! server prune by importance (never a host's newest snapshot) and carries
//! on; when nothing may be deleted it fails saying so, and a later, smaller
//! backup succeeds. Real btrfs on a loop device, days simulated with `--now`.

use crate::util;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use util::*;

const DAY: i64 = 86_400;
const T0: i64 = 1_780_000_000;

struct Rig {
    wrapper: PathBuf,
    store: PathBuf,
    src: PathBuf,
    /// Scratch space: the source and the server wrapper are in it.
    dir: tempfile::TempDir,
    _fs: BtrfsLoop,
}

impl Rig {
    /// A store on a fresh btrfs filesystem of `mib` MiB and an empty
    /// source in a scratch directory; `None` (said loudly) when not root.
    fn start(mib: u64) -> Option<Rig> {
        if !require_root("btrfs loop filesystem") {
            return None;
        }
        let fs_ = BtrfsLoop::new(mib);
        let dir = scratch();
        let store = fs_.mount.join("store");
        store_without_interval(&store);
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        Some(Rig {
            wrapper: server_wrapper(dir.path()),
            store,
            src,
            dir,
            _fs: fs_,
        })
    }

    /// A backup that must succeed.
    fn backup_ok(&self, src: &Path, host: &str, now: i64) {
        let o = self.backup(src, host, now);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }

    fn backup(&self, src: &Path, host: &str, now: i64) -> Output {
        run_status(&mut backup_at(&self.store, &self.wrapper, src, host, now))
    }

    fn snapshots(&self, host: &str) -> Vec<String> {
        snapshots(&self.store, host)
    }

    /// `days` daily backups of `host` from the source `dir` (made in the
    /// scratch directory when it is not the rig's source), each of one new
    /// `mib` MiB file (seeds from `seed`), `offset` seconds into the day.
    fn history(&self, dir: &Path, host: &str, days: u64, mib: usize, seed: u64, offset: i64) {
        fs::create_dir_all(dir).unwrap();
        for i in 0..days {
            fill(dir, &format!("f{i}"), mib, seed + i);
            self.backup_ok(dir, host, T0 + i as i64 * DAY + offset);
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Replaces the source's content with one incompressible file of `mib` MiB.
fn fill(src: &Path, name: &str, mib: usize, seed: u64) {
    for e in fs::read_dir(src).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    fs::write(src.join(name), Rng::new(seed).bytes(mib << 20)).unwrap();
}

/// Also with the growth noted in the usage log every MiB while the file is
/// sent: the bytes noted and then thrown away (the attempt that ran out of
/// space) are not taken off what must be freed to write them again. They
/// were, and the prune made room for almost nothing, three times over.
#[test]
fn a_backup_that_does_not_fit_prunes_old_snapshots_and_succeeds() {
    for note in [None, Some("1048576")] {
        does_not_fit(note);
    }
}

fn does_not_fit(note: Option<&str>) {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    let src = rig.src.clone();
    three_days_of_70_mib(&rig, &src);
    let before = rig.snapshots("h");
    assert_eq!(before.len(), 3);
    // A 150 MiB file does not fit beside them until older snapshots go.
    fill(&src, "big", 150, 9);
    let mut cmd = backup_at(&rig.store, &rig.wrapper, &src, "h", T0 + 3 * DAY);
    if let Some(n) = note {
        cmd.env("BYTEBACK_TEST_GROWTH_NOTE_BYTES", n);
    }
    let o = run_status(&mut cmd);
    let out = text(&o);
    // Room for what the attempt sent, at least, however much was noted.
    let need = need_said(&out);
    assert!(need >= 100 << 20, "{out}");
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("no space left on device"), "{out}");
    assert!(out.contains("made room"), "{out}");
    let after = rig.snapshots("h");
    assert!(
        after.contains(&before[2]),
        "the newest snapshot was deleted: {after:?}"
    );
    assert!(after.len() < 4, "nothing was pruned: {after:?}");
    assert_newest_holds(&rig, &src, "big");
}

/// Three daily snapshots of host `h`, each holding its own 70 MiB file.
fn three_days_of_70_mib(rig: &Rig, src: &Path) {
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        fill(src, name, 70, i as u64);
        rig.backup_ok(src, "h", T0 + i as i64 * DAY);
    }
}

/// The room a backup said it prunes for (`(N bytes); pruning to make room`).
fn need_said(out: &str) -> u64 {
    out.split(" bytes); pruning to make room")
        .next()
        .and_then(|a| a.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no need said: {out}"))
}

/// Host `h`'s newest snapshot holds `name` of `src` as the source has it.
fn assert_newest_holds(rig: &Rig, src: &Path, name: &str) {
    let newest = rig.snapshots("h").pop().unwrap();
    let stored = rig
        .store
        .join("h")
        .join(newest)
        .join(src.strip_prefix("/").unwrap())
        .join(name);
    assert_eq!(
        fs::read(&stored).unwrap(),
        fs::read(src.join(name)).unwrap()
    );
}

/// Room is asked for what took space, not for the holes before it: a
/// sparse file of 1 GiB whose last 150 MiB are data asks for about that
/// much (it asked for its whole length: a client declaring a huge file of
/// zeros could make every host's snapshots go for one real block).
#[test]
fn a_sparse_file_that_does_not_fit_asks_room_for_its_data_only() {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    let src = rig.src.clone();
    three_days_of_70_mib(&rig, &src);
    fill(&src, "sparse", 0, 9);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(src.join("sparse"))
            .unwrap();
        f.write_all_at(&Rng::new(10).bytes(150 << 20), 874 << 20)
            .unwrap();
    }
    let o = run_status(&mut backup_at(
        &rig.store,
        &rig.wrapper,
        &src,
        "h",
        T0 + 3 * DAY,
    ));
    let out = text(&o);
    let need = need_said(&out);
    assert!((1..=150 << 20).contains(&need), "{need}: {out}");
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_newest_holds(&rig, &src, "sparse");
}

#[test]
fn with_nothing_to_delete_it_fails_clearly_and_a_smaller_backup_then_succeeds() {
    let Some(rig) = Rig::start(300) else {
        return;
    };
    let src = rig.src.clone();
    fill(&src, "a", 100, 1);
    rig.backup_ok(&src, "h", T0);
    // Only the newest snapshot exists: nothing may be deleted for this.
    // (Its growth noted in the usage log every MiB as it is sent.)
    fill(&src, "huge", 200, 2);
    let mut cmd = backup_at(&rig.store, &rig.wrapper, &src, "h", T0 + DAY);
    let o = run_status(cmd.env("BYTEBACK_TEST_GROWTH_NOTE_BYTES", "1048576"));
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("no space left on device"), "{out}");
    assert!(
        out.contains("byteback-prune --prune-force would delete"),
        "{out}"
    );
    assert_eq!(rig.snapshots("h").len(), 1);
    // What was noted and thrown away is taken off again: the next backup
    // is not judged as if it had written the huge file too.
    let log = fs::read_to_string(rig.store.join("h/.byteback-usage")).unwrap();
    let (mut noted, mut since) = (0u64, 0i128);
    let lines: Vec<Vec<&str>> = log
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let snapshot = lines.iter().rposition(|f| f[2] != "-").unwrap();
    for f in &lines[snapshot + 1..] {
        if f.get(3) == Some(&"credit") {
            since -= f[4].parse::<i128>().unwrap();
        } else {
            noted += f[1].parse::<u64>().unwrap();
            since += f[1].parse::<i128>().unwrap();
        }
    }
    assert!(noted > 100 << 20, "{log}");
    assert!(since < 10 << 20, "{log}");
    // A smaller source fits again.
    fill(&src, "small", 20, 3);
    rig.backup_ok(&src, "h", T0 + 2 * DAY);
    assert_eq!(rig.snapshots("h").len(), 2);
}

/// A run that fails for want of space leaves what it wrote in `current`
/// (here a whole new 150 MiB file, verified but never committed). The next
/// run, for a source that no longer has it, removes that leftover at its
/// start instead of at its commit, so its own 200 MiB file fits; without
/// that it would run out of space too (only the newest snapshot exists).
#[test]
fn a_failed_runs_leftovers_are_removed_at_the_next_start_when_space_is_short() {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    let src = rig.src.clone();
    fill(&src, "a", 10, 1);
    rig.backup_ok(&src, "h", T0);
    // x and z do not fit together: the run fails, and what was stored of
    // one of them stays behind in current. Which one depends on how the
    // client interleaved them when the disc filled (the file being written
    // then is emptied and removed; the other is kept for the next run).
    fs::write(src.join("x"), Rng::new(2).bytes(150 << 20)).unwrap();
    fs::write(src.join("z"), Rng::new(3).bytes(200 << 20)).unwrap();
    let o = rig.backup(&src, "h", T0 + DAY);
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("no space left on device"), "{out}");
    let stored = rig
        .store
        .join("h/current")
        .join(src.strip_prefix("/").unwrap());
    let (x, z) = (stored.join("x"), stored.join("z"));
    let left = |p: &std::path::Path| fs::metadata(p).map_or(0, |m| m.blocks() * 512);
    assert!(
        left(&x) + left(&z) >= 100 << 20,
        "the failed run left less than 100 MiB of x and z in current \
         ({} and {} bytes): {out}",
        left(&x),
        left(&z)
    );
    // The source now holds a (unchanged) and y only.
    fs::remove_file(src.join("x")).unwrap();
    fs::remove_file(src.join("z")).unwrap();
    fs::write(src.join("y"), Rng::new(4).bytes(200 << 20)).unwrap();
    let o = rig.backup(&src, "h", T0 + 2 * DAY);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("short of space: removed"),
        "the leftovers were not removed at the start: {out}"
    );
    assert!(!x.exists() && !z.exists());
    let snaps = rig.snapshots("h");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let into = rig.dir.path().join("restore");
    fs::create_dir_all(&into).unwrap();
    run(Command::new(bin("byteback-restore"))
        .current_dir(&into)
        .arg("--destination")
        .arg(&rig.store)
        .args(["--hostname", "h", "--restore", "--snapshot", &snaps[1], "/"]));
    assert_same_tree(
        &src,
        &into.join(&snaps[1]).join(src.strip_prefix("/").unwrap()),
    );
}

/// btrfs needs metadata space for a rename, so a verified file can fail to
/// go into place when the disc is full although its data was written. The
/// server then commits the filesystem and renames it again, then deletes
/// one snapshot at a time (importance order) before each further try,
/// without the client sending it again; after six rounds the backup fails
/// and the stored copy stays. The kernel gives that `ENOSPC` only by
/// chance, so the (debug) server injects it:
/// `BYTEBACK_TEST_NO_SPACE_RENAME=N` fails the first N renames.
#[test]
fn a_rename_that_runs_out_of_space_makes_room_and_is_not_sent_again() {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    let src = rig.src.clone();
    let write = |seed: u64| {
        for (i, name) in ["a.bin", "b.bin"].iter().enumerate() {
            fs::write(src.join(name), Rng::new(seed + i as u64).bytes(3 << 20)).unwrap();
        }
    };
    for day in 0..4 {
        write(1 + day);
        rig.backup_ok(&src, "h", T0 + day as i64 * DAY);
    }
    assert_eq!(rig.snapshots("h").len(), 4);
    let stored = |name: &str| {
        rig.store
            .join("h/current")
            .join(src.strip_prefix("/").unwrap())
            .join(name)
    };
    let old_a = fs::read(stored("a.bin")).unwrap();

    // Both files change; the first three renames into place fail: a
    // commit, then one deletion per round, whatever the free space (the
    // disc is mostly empty, and free data space says nothing of metadata).
    write(10);
    let mut cmd = backup_at(&rig.store, &rig.wrapper, &src, "h", T0 + 4 * DAY);
    let o = run_status(cmd.env("BYTEBACK_TEST_NO_SPACE_RENAME", "3"));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(
        out.matches("committing the filesystem and trying again")
            .count(),
        1,
        "{out}"
    );
    assert_eq!(
        out.matches("deleting one snapshot and trying again")
            .count(),
        2,
        "{out}"
    );
    assert_eq!(
        out.matches("byteback-prune: deleted h/").count(),
        2,
        "{out}"
    );
    assert!(out.contains(" 2 files sent"), "{out}");
    assert!(
        !out.contains("retried") && !out.contains("sent again"),
        "{out}"
    );
    for name in ["a.bin", "b.bin"] {
        assert_eq!(
            fs::read(stored(name)).unwrap(),
            fs::read(src.join(name)).unwrap(),
            "{name}"
        );
    }
    let kept = rig.snapshots("h");
    assert_eq!(kept.len(), 3, "two of five snapshots deleted: {kept:?}");

    // Seven failures in a row for one file: two snapshots can still go, one
    // a round (a host's newest stays), then there is nothing left to delete; the
    // backup fails, takes no snapshot, and the next one puts everything right.
    write(20);
    let mut cmd = backup_at(&rig.store, &rig.wrapper, &src, "h", T0 + 5 * DAY);
    let o = run_status(cmd.env("BYTEBACK_TEST_NO_SPACE_RENAME", "7"));
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("even after committing the filesystem and deleting up to 5 snapshots"),
        "{out}"
    );
    assert_eq!(
        out.matches("byteback-prune: deleted h/").count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("no snapshot deleted: nothing left to delete"),
        "{out}"
    );
    let after = rig.snapshots("h");
    assert_eq!(after, kept[2..].to_vec(), "a failed backup took a snapshot");
    let newest = after.last().unwrap();
    let in_snapshot = rig
        .store
        .join("h")
        .join(newest)
        .join(src.strip_prefix("/").unwrap())
        .join("a.bin");
    assert_ne!(fs::read(in_snapshot).unwrap(), old_a);
    rig.backup_ok(&src, "h", T0 + 6 * DAY);
    for name in ["a.bin", "b.bin"] {
        assert_eq!(
            fs::read(stored(name)).unwrap(),
            fs::read(src.join(name)).unwrap(),
            "{name}"
        );
    }
}

/// Files of up to 2 KiB are stored inline, in btrfs's metadata, so a disc
/// of small files fills its metadata first: creating a file or a directory
/// (and renaming one) then fails with "no space left on device" while the
/// data space is nearly empty and the free-space figure says little. Each
/// day brings 4,000 new small files under new paths; once the metadata is
/// full, the creation that fails makes room (a commit, then one snapshot
/// deleted a round) and is tried again, and every backup succeeds. Before,
/// the first backup to hit it failed at that file, and every later one at
/// creating its new manifest, deleting nothing: the store stayed full for
/// good.
#[test]
fn small_files_that_fill_the_metadata_make_room_and_every_backup_succeeds() {
    let Some(rig) = Rig::start(128) else {
        return;
    };
    let src = rig.src.clone();
    let mut all = String::new();
    for day in 0..5u64 {
        fs::remove_dir_all(&src).unwrap();
        let mut rng = Rng::new(day + 1);
        for d in 0..8 {
            let dir = src.join(format!("day{day}-{d}"));
            fs::create_dir_all(&dir).unwrap();
            for i in 0..500 {
                fs::write(dir.join(format!("f{i}")), rng.bytes(1500)).unwrap();
            }
        }
        let o = rig.backup(&src, "h", T0 + day as i64 * DAY);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(0), "day {day}: {out}");
        // The snapshot holds the source's files (content and names; the
        // rest of the metadata is in the manifest, checked by the restore
        // below).
        let newest = rig.snapshots("h").pop().unwrap();
        let stored = rig.store.join("h").join(&newest);
        let diff = run(Command::new("rsync")
            .args([
                "-r",
                "--checksum",
                "--dry-run",
                "--itemize-changes",
                "--delete",
            ])
            .arg(format!("{}/", src.display()))
            .arg(format!(
                "{}/",
                stored.join(src.strip_prefix("/").unwrap()).display()
            )));
        assert!(
            diff.stdout.is_empty(),
            "day {day}: {}",
            String::from_utf8_lossy(&diff.stdout)
        );
        all.push_str(&out);
    }
    let snaps = rig.snapshots("h");
    let newest = snaps.last().unwrap();
    let into = rig.dir.path().join("restore");
    fs::create_dir_all(&into).unwrap();
    run(Command::new(bin("byteback-restore"))
        .current_dir(&into)
        .arg("--destination")
        .arg(&rig.store)
        .args(["--hostname", "h", "--restore", "--snapshot", newest, "/"]));
    assert_same_tree(
        &src,
        &into.join(newest).join(src.strip_prefix("/").unwrap()),
    );
    // Printed only by the rounds for metadata (a creation or a rename,
    // whichever btrfs refuses first varies from run to run); the ordinary
    // prune after each snapshot deletes nothing here (no snapshot is older
    // than 7 days).
    assert!(
        all.contains("btrfs needs metadata space for it); deleting one snapshot"),
        "the metadata never ran out: {all}"
    );
    assert!(rig.snapshots("h").len() < 5, "{all}");
}

/// The same rounds for whatever a backup creates (files, directories,
/// symlinks, its new manifest) as for renames, injected here
/// (`BYTEBACK_TEST_NO_SPACE_CREATE`, see `test_fault` in the server): a
/// commit, then one snapshot deleted a round, and the backup goes on; at
/// most five deletions per backup, whichever operations need them. When
/// room cannot be made, the backup fails saying why and takes no snapshot.
/// A backup failing for want of space where nothing is retried (its
/// manifest's last write: `BYTEBACK_TEST_NO_SPACE_MANIFEST`) deletes one
/// snapshot on its way out and marks the store, and the next one succeeds.
#[test]
fn a_creation_that_runs_out_of_space_makes_room_and_the_backup_goes_on() {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    let src = rig.src.clone();
    for day in 0..7u64 {
        fs::write(src.join(format!("day{day}")), Rng::new(day).bytes(1 << 20)).unwrap();
        rig.backup_ok(&src, "h", T0 + day as i64 * DAY);
    }
    assert_eq!(rig.snapshots("h").len(), 7);
    let new_tree = |tag: &str| {
        let d = src.join(tag).join("sub");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("file"), tag).unwrap();
        std::os::unix::fs::symlink("file", d.join("link")).unwrap();
    };
    let restore = |snap: &str| {
        let into = rig.dir.path().join(format!("restore-{snap}"));
        fs::create_dir_all(&into).unwrap();
        run(Command::new(bin("byteback-restore"))
            .current_dir(&into)
            .arg("--destination")
            .arg(&rig.store)
            .args(["--hostname", "h", "--restore", "--snapshot", snap, "/"]));
        into.join(snap).join(src.strip_prefix("/").unwrap())
    };
    let day = std::cell::Cell::new(7);
    let backup = |var: &str, faults: &str| {
        let mut cmd = backup_at(&rig.store, &rig.wrapper, &src, "h", T0 + day.get() * DAY);
        day.set(day.get() + 1);
        let o = run_status(cmd.env(var, faults));
        (o.status.code(), text(&o))
    };
    let count = |out: &str, what: &str| out.matches(what).count();
    const COMMIT: &str = "committing the filesystem and trying again";
    const DELETE: &str = "deleting one snapshot and trying again";
    const DELETED: &str = "byteback-prune: deleted h/";

    // Each creation fails once: the new manifest, two directories, a file
    // and a symlink each cost a commit, and nothing is deleted.
    new_tree("a");
    let (code, out) = backup("BYTEBACK_TEST_NO_SPACE_CREATE", "5,alternate");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(count(&out, COMMIT), 5, "{out}");
    assert_eq!(count(&out, DELETE), 0, "{out}");
    for what in ["manifest.new", "directory", "symlink", "sub/file\""] {
        assert!(
            out.lines()
                .any(|l| l.contains("no space left on device creating") && l.contains(what)),
            "{what}: {out}"
        );
    }
    assert_eq!(rig.snapshots("h").len(), 8);
    assert_same_tree(&src, &restore(rig.snapshots("h").last().unwrap()));

    // Three failures in a row for one: a commit, then two deletions.
    new_tree("b");
    let (code, out) = backup("BYTEBACK_TEST_NO_SPACE_CREATE", "3");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!((count(&out, COMMIT), count(&out, DELETE)), (1, 2), "{out}");
    assert_eq!(count(&out, DELETED), 2, "{out}");
    assert_eq!(rig.snapshots("h").len(), 7);

    // Two operations fail four times each: the first costs three
    // deletions, the second two more, then the backup's five are spent
    // (six could go), and its fourth try succeeds all the same.
    new_tree("c");
    let (code, out) = backup("BYTEBACK_TEST_NO_SPACE_CREATE", "8,runs=4");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(count(&out, DELETED), 5, "{out}");
    assert_eq!(count(&out, "this backup deleted 5 already"), 1, "{out}");
    let kept = rig.snapshots("h");
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert_same_tree(&src, &restore(kept.last().unwrap()));

    // Creations fail for good: the two older snapshots go, one a round,
    // then nothing can; the backup fails, takes no snapshot and says why.
    new_tree("d");
    let (code, out) = backup("BYTEBACK_TEST_NO_SPACE_CREATE", "1000");
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("even after committing the filesystem and deleting up to 5 snapshots"),
        "{out}"
    );
    assert_eq!(count(&out, DELETED), 2, "{out}");
    assert!(
        out.contains("no snapshot deleted: nothing left to delete"),
        "{out}"
    );
    assert_eq!(
        rig.snapshots("h"),
        kept[2..].to_vec(),
        "a failed backup took a snapshot"
    );
    rig.backup_ok(&src, "h", T0 + day.get() * DAY);
    day.set(day.get() + 1);
    let newest = rig.snapshots("h").pop().unwrap();
    assert_same_tree(&src, &restore(&newest));
    assert_eq!(rig.snapshots("h").len(), 2);

    // Out of space writing the manifest, where nothing is retried: the
    // older snapshot goes on the way out, and the store is marked, so the
    // next backup first removes what this one left in current.
    new_tree("e");
    let (code, out) = backup("BYTEBACK_TEST_NO_SPACE_MANIFEST", "1");
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("deleted 1 snapshot to make room for the next backup"),
        "{out}"
    );
    assert_eq!(rig.snapshots("h"), vec![newest.clone()]);
    // Its new manifest, of no use to the next run, went at once (it
    // stayed, holding space and counted as growth, until the next run).
    assert!(
        !rig.store.join("h/current/.byteback/manifest.new").exists(),
        "{out}"
    );
    let marker = rig.store.join("h/current/.byteback/nospace");
    assert!(marker.exists(), "the store was not marked short of space");
    let o = rig.backup(&src, "h", T0 + day.get() * DAY);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("short of space: removed"), "{out}");
    assert!(!marker.exists());
    assert_same_tree(&src, &restore(&rig.snapshots("h").pop().unwrap()));
}

/// Room is made for what the client sent, and never by deleting other
/// hosts' history for a file larger than the whole store: before, such a
/// file (or a client declaring one) pruned every host down to its newest
/// snapshot and then failed anyway.
#[test]
fn a_file_larger_than_the_store_deletes_no_snapshot() {
    let Some(rig) = Rig::start(300) else {
        return;
    };
    rig.history(&rig.dir.path().join("other"), "victim", 4, 10, 40, 0);
    let kept = rig.snapshots("victim");
    assert_eq!(kept.len(), 4);
    let src = rig.src.clone();
    fill(&src, "huge", 350, 5);
    let o = rig.backup(&src, "h", T0 + 4 * DAY);
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("more than the whole store holds"), "{out}");
    assert!(out.contains("no snapshot deleted"), "{out}");
    assert_eq!(rig.snapshots("victim"), kept, "{out}");
}

/// The growth guard judges a backup that runs out of space as it would
/// judge its snapshot: one that writes far more than its host usually does
/// (4 x the median and over 2 % of the disc) may delete only its own host's
/// older snapshots to make room, never another host's.
#[test]
fn a_backup_far_above_its_usual_size_makes_room_only_from_its_own_host() {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    rig.history(&rig.dir.path().join("other"), "victim", 3, 70, 50, 0);
    let kept = rig.snapshots("victim");
    let src = rig.src.clone();
    rig.history(&src, "h", 3, 2, 60, 600);
    assert_eq!(rig.snapshots("h").len(), 3);
    fill(&src, "big", 160, 7);
    let o = rig.backup(&src, "h", T0 + 3 * DAY);
    let out = text(&o);
    assert!(out.contains("no space left on device"), "{out}");
    assert!(out.contains("(the growth guard)"), "{out}");
    assert!(
        out.contains("only snapshots of h may be deleted for it"),
        "{out}"
    );
    assert_eq!(rig.snapshots("victim"), kept, "{out}");
    // Its own older snapshots were fair game; its newest stays.
    let h = rig.snapshots("h");
    assert!(!h.is_empty() && h.len() <= 3, "{h:?}\n{out}");
}

/// The same rule when btrfs runs out of metadata space, injected here:
/// a rename into place that fails (a commit, then one snapshot deleted a
/// round, during the backup), or the new manifest's last write (where a
/// backup fails and deletes one snapshot on its way out). A backup far
/// above its host's usual size deletes its own host's older snapshots,
/// never the next of another host. Before, the rounds during a backup went
/// by importance over every host, so a client writing until the metadata
/// ran out could delete other hosts' history, ten snapshots a day; and a
/// failed backup's last deletion was refused even from its own host. (Each
/// on a store of its own: an open spike stops every other deletion.)
#[test]
fn a_backup_far_above_its_usual_size_deletes_only_its_own_for_metadata() {
    for (var, n, ok) in [
        ("BYTEBACK_TEST_NO_SPACE_RENAME", "3", true),
        ("BYTEBACK_TEST_NO_SPACE_MANIFEST", "1", false),
    ] {
        let Some(rig) = Rig::start(400) else {
            return;
        };
        rig.history(&rig.dir.path().join("other"), "victim", 3, 2, 50, 0);
        let kept = rig.snapshots("victim");
        let src = rig.src.clone();
        rig.history(&src, "h", 3, 2, 60, 600);
        let own = rig.snapshots("h");
        // `f2`, stored by the last backup, rewritten: 60 MiB against 2.
        fill(&src, "f2", 60, 7);
        let mut cmd = backup_at(&rig.store, &rig.wrapper, &src, "h", T0 + 3 * DAY);
        let o = run_status(cmd.env(var, n));
        let out = text(&o);
        assert_eq!(o.status.code() == Some(0), ok, "{out}");
        assert!(out.contains("(the growth guard)"), "{out}");
        assert_eq!(rig.snapshots("victim"), kept, "{out}");
        let now = rig.snapshots("h");
        if ok {
            // Two rounds deleted h's two older snapshots.
            assert_eq!(
                out.matches("only snapshots of h may be deleted for it")
                    .count(),
                2,
                "{out}"
            );
            assert_eq!((now.len(), &now[0]), (2, &own[2]), "{out}");
        } else {
            assert!(
                out.contains("deleted 1 snapshot to make room for the next backup"),
                "{out}"
            );
            assert_eq!(now, own[1..].to_vec(), "{out}");
        }
    }
}

/// Backups that run out of space for good, again and again on one day,
/// delete at most ten snapshots together for metadata (counted in the
/// host's `.byteback-room`), however often the client reconnects; the next
/// day allows more. Before, each connection could delete five.
#[test]
fn reconnecting_does_not_delete_more_than_a_days_budget() {
    let Some(rig) = Rig::start(300) else {
        return;
    };
    let src = rig.src.clone();
    for day in 0..14u64 {
        fs::write(src.join(format!("day{day}")), Rng::new(day).bytes(64 << 10)).unwrap();
        rig.backup_ok(&src, "h", T0 + day as i64 * DAY);
    }
    let deleted = |out: &str| out.matches("byteback-prune: deleted h/").count();
    let failing = |now: i64, faults: &str| {
        let mut cmd = backup_at(&rig.store, &rig.wrapper, &src, "h", now);
        let o = run_status(cmd.env("BYTEBACK_TEST_NO_SPACE_CREATE", faults));
        (o.status.code(), text(&o))
    };
    let today = T0 + 14 * DAY;
    let mut total = 0;
    for (k, at) in [today, today + 600, today + 1200].into_iter().enumerate() {
        fs::write(src.join(format!("try{k}")), b"x").unwrap();
        let (code, out) = failing(at, "1000");
        assert_ne!(code, Some(0), "{out}");
        total += deleted(&out);
        if k == 2 {
            assert_eq!(deleted(&out), 0, "{out}");
            assert!(
                out.contains("no snapshot deleted: backups of h deleted 10 already today"),
                "{out}"
            );
        }
    }
    assert_eq!(total, 10);
    assert_eq!(rig.snapshots("h").len(), 4);
    // The next day allows more.
    let (code, out) = failing(today + DAY, "3");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(deleted(&out), 2, "{out}");
    // A count that cannot be made out (a crash while it was written) is a
    // spent budget for the day it was written, never a fresh one.
    fs::write(rig.store.join("h/.byteback-room"), b"12").unwrap();
    fs::write(src.join("later"), b"y").unwrap();
    let (code, out) = failing(today + 2 * DAY, "1000");
    assert_ne!(code, Some(0), "{out}");
    assert_eq!(deleted(&out), 0, "{out}");
    assert!(out.contains("cannot make out the count"), "{out}");
}

/// A btrfs quota on a host's `current` confines that host: a backup over
/// it fails saying so, deleting nothing of any host (before, it pruned by
/// the filesystem's free space, which says nothing of a quota, then sent
/// the file three more times).
#[test]
fn a_quota_exceeded_fails_the_backup_and_deletes_nothing() {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    rig.history(&rig.dir.path().join("other"), "victim", 3, 10, 70, 0);
    let src = rig.src.clone();
    rig.history(&src, "h", 3, 5, 80, 600);
    let (victim, own) = (rig.snapshots("victim"), rig.snapshots("h"));
    let mount = rig.store.parent().unwrap();
    run(Command::new("btrfs").args(["quota", "enable"]).arg(mount));
    run(Command::new("btrfs")
        .args(["quota", "rescan", "-w"])
        .arg(mount));
    run(Command::new("btrfs")
        .args(["qgroup", "limit", "40M"])
        .arg(rig.store.join("h/current")));
    fill(&src, "big", 60, 9);
    let o = rig.backup(&src, "h", T0 + 3 * DAY);
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("disk quota exceeded writing"), "{out}");
    assert!(out.contains("no snapshot deleted"), "{out}");
    assert!(!out.contains("byteback-prune: deleted"), "{out}");
    assert_eq!((rig.snapshots("victim"), rig.snapshots("h")), (victim, own));
    // Within the quota, the next backup succeeds.
    fill(&src, "small", 5, 10);
    rig.backup_ok(&src, "h", T0 + 4 * DAY);
}

/// A backup whose growth no usage log could take (the log cannot be
/// written) is judged by no growth guard, so the prune after its snapshot
/// deletes only its own host's older snapshots, however short of space the
/// store is: another host's history does not pay for growth nobody can see.
#[test]
fn growth_no_log_holds_prunes_only_its_own_host() {
    let Some(rig) = Rig::start(400) else {
        return;
    };
    rig.history(&rig.dir.path().join("other"), "victim", 3, 40, 90, 0);
    let src = rig.src.clone();
    rig.history(&src, "h", 2, 20, 95, 600);
    let (victim, own) = (rig.snapshots("victim"), rig.snapshots("h"));
    assert_eq!((victim.len(), own.len()), (3, 2));
    // The log cannot be opened for appending: a directory in its place.
    let log = rig.store.join("h/.byteback-usage");
    fs::remove_file(&log).unwrap();
    fs::create_dir(&log).unwrap();
    // Short of space after the next backup, whatever is deleted.
    fs::write(
        rig.store.join("byteback.toml"),
        b"min_snapshot_interval = 0\nminpercent = 90\nmaxpercent = 95\n",
    )
    .unwrap();
    fill(&src, "f2", 30, 97);
    let o = rig.backup(&src, "h", T0 + 20 * DAY + 600);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("cannot record usage"), "{out}");
    assert!(
        out.contains("are in no usage log: the prune after it deletes only snapshots of h"),
        "{out}"
    );
    assert!(
        out.contains("nothing of h left to delete but its newest snapshot"),
        "{out}"
    );
    assert_eq!(rig.snapshots("victim"), victim, "{out}");
    let now = rig.snapshots("h");
    assert_eq!(now.len(), 1, "{out}");
    assert!(!own.contains(&now[0]), "{now:?}\n{out}");
}

/// "No space left on device" that is not a full disc (ext4 says it when a
/// directory's index is full, here ext4 with 1 KiB blocks and about
/// 20,000 names of 255 bytes in one directory, the disc mostly free)
/// deletes no snapshot of any host: deleting frees nothing the creation
/// needs. The backup fails saying why.
#[test]
fn no_space_on_a_store_with_room_deletes_no_snapshot() {
    if !require_root("an ext4 loop filesystem") {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("ext4.img");
    let mount = dir.path().join("mnt");
    fs::create_dir_all(&mount).unwrap();
    run(Command::new("truncate").args(["-s", "256M"]).arg(&img));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "1024", "-N", "100000"])
        .arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mount));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let store = mount.join("store");
    store_without_interval(&store);
    let wrapper = server_wrapper(dir.path());
    let backup = |src: &Path, host: &str, now: i64| {
        run_status(&mut backup_at(&store, &wrapper, src, host, now))
    };
    let other = dir.path().join("other");
    fs::create_dir_all(&other).unwrap();
    for i in 0..3 {
        fill(&other, &format!("f{i}"), 1, 200 + i);
        let o = backup(&other, "victim", T0 + i as i64 * DAY);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    let victim = snapshots(&store, "victim");
    assert_eq!(victim.len(), 3);
    let src = dir.path().join("src");
    let names = src.join("names");
    fs::create_dir_all(&names).unwrap();
    for i in 0..25_000 {
        let name = format!("{i:06}{}", "n".repeat(249));
        fs::File::create(names.join(name)).unwrap();
    }
    let o = backup(&src, "h", T0 + 3 * DAY);
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("no snapshot deleted: the store is not short of space"),
        "{out}"
    );
    assert!(!out.contains("byteback-prune: deleted"), "{out}");
    assert_eq!(snapshots(&store, "victim"), victim);
}

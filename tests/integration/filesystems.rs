//! Whole-host backups as byteback 1.x made them: every mounted local
//! filesystem below the sources, each once; non-local ones (tmpfs) left out;
//! bind mounts and second mounts never walked twice; btrfs subvolumes always
//! included; `--one-file-system` for those who want less.

use crate::util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use util::*;

/// Mounts made by a test, unmounted (innermost first) however the test ends.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], target: &Path) {
        fs::create_dir_all(target).unwrap();
        run(Command::new("mount").args(args).arg(target));
        self.0.push(target.to_path_buf());
    }
}

impl Mounts {
    /// Makes a fresh ext4 filesystem of 64 MiB in an image in `dir` and
    /// mounts it at `point`.
    fn ext4(&mut self, dir: &Path, point: &Path) {
        let img = dir.join(format!("ext-{}.img", self.0.len()));
        run(Command::new("truncate").args(["-s", "64M"]).arg(&img));
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        self.mount(&["-o", "loop", img.to_str().unwrap()], point);
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn backup(store: &Path, src: &Path, host: &str, extra: &[&str]) -> Output {
    run(Command::new(bin("byteback-backup"))
        .arg("--destination")
        .arg(store)
        .arg("--source")
        .arg(src)
        .args(["--hostname", host, "--retry-number", "0", "--verbose"])
        .args(extra))
}

/// Restores everything of `host`'s newest snapshot into `into`; returns the restored `src`.
fn restore(store: &Path, host: &str, into: &Path, src: &Path) -> PathBuf {
    fs::create_dir_all(into).unwrap();
    run(Command::new(bin("byteback-restore"))
        .current_dir(into)
        .arg("--destination")
        .arg(store)
        .args(["--hostname", host, "--restore", "/"]));
    let snap = fs::read_dir(into).unwrap().next().unwrap().unwrap().path();
    snap.join(src.strip_prefix("/").unwrap())
}

/// `byteback-backup` of `src` as host `h` into `store`, its record of the
/// last backup in `cache`; whatever its exit code.
fn backup_with_record(store: &Path, src: &Path, cache: &Path) -> Output {
    run_status(
        Command::new(bin("byteback-backup"))
            .env("BYTEBACK_CACHE_DIR", cache)
            .arg("--destination")
            .arg(store)
            .arg("--source")
            .arg(src)
            .args(["--hostname", "h", "--retry-number", "0"]),
    )
}

/// The command restoring everything of host `h` from `store` into `into`.
fn restore_all_cmd(store: &Path, into: &Path) -> Command {
    let mut c = Command::new(bin("byteback-restore"));
    c.current_dir(into)
        .arg("--destination")
        .arg(store)
        .args(["--hostname", "h", "--restore", "/"]);
    c
}

/// `byteback-restore` of everything of host `h`'s newest snapshot into
/// `into` (a filesystem's root: its `lost+found` is passed over), whatever
/// its exit code; its output and the restored `src`.
fn restore_status(store: &Path, into: &Path, src: &Path) -> (Output, PathBuf) {
    let o = run_status(&mut restore_all_cmd(store, into));
    let snap = fs::read_dir(into)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.ends_with("lost+found"))
        .unwrap_or_else(|| panic!("nothing restored: {}", String::from_utf8_lossy(&o.stderr)));
    (o, snap.join(src.strip_prefix("/").unwrap()))
}

fn is_empty_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).unwrap().is_dir() && fs::read_dir(p).unwrap().next().is_none()
}

fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

#[test]
fn every_local_filesystem_once_and_no_tmpfs() {
    if !require_root("mounting filesystems") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    write(&src.join("top"), b"on the source's own filesystem");
    let mut mounts = Mounts::default();

    // An ext4 filesystem inside the source.
    mounts.ext4(d.path(), &src.join("ext"));
    let mut rng = Rng::new(5);
    write(&src.join("ext/a/b"), &rng.bytes(50_000));
    write(&src.join("ext/a/c"), b"c");
    write(&src.join("ext/d"), &rng.bytes(3000));

    // A btrfs filesystem mounted inside the source, with a subvolume.
    let bt = BtrfsLoop::new(200);
    mounts.mount(&["--bind", bt.mount.to_str().unwrap()], &src.join("bt"));
    run(Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(src.join("bt/sub")));
    write(&src.join("bt/plain"), b"btrfs top level");
    write(&src.join("bt/sub/inner/f"), &rng.bytes(20_000));

    // A tmpfs: not local, left out.
    mounts.mount(&["-t", "tmpfs", "tmpfs"], &src.join("tmp"));
    write(&src.join("tmp/scratch"), b"not backed up");

    // A bind mount of a subtree, and the ext4 filesystem mounted again.
    mounts.mount(
        &["--bind", src.join("ext/a").to_str().unwrap()],
        &src.join("bind"),
    );
    mounts.mount(
        &["--bind", src.join("ext").to_str().unwrap()],
        &src.join("zz-again"),
    );

    let store = d.path().join("store");
    store_without_interval(&store);
    let out = backup(&store, &src, "all", &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("tmpfs is not a local filesystem type"),
        "{err}"
    );
    assert!(err.contains("bind mount"), "{err}");
    assert!(err.contains("mounted more than once"), "{err}");

    let r = restore(&store, "all", &d.path().join("r"), &src);
    assert_eq!(
        fs::read(r.join("top")).unwrap(),
        fs::read(src.join("top")).unwrap()
    );
    // ext4 exactly (lost+found included), the btrfs top level and its subvolume.
    assert_same_tree(&src.join("ext"), &r.join("ext"));
    assert_same_tree(&src.join("bt"), &r.join("bt"));
    assert_eq!(
        fs::read(r.join("bt/sub/inner/f")).unwrap(),
        fs::read(src.join("bt/sub/inner/f")).unwrap()
    );
    // tmpfs, the bind mount and the second mount: mount points only.
    for p in ["tmp", "bind", "zz-again"] {
        assert!(is_empty_dir(&r.join(p)), "{p} was entered");
    }

    // --one-file-system: only the source's own filesystem.
    let out = backup(&store, &src, "one", &["--one-file-system"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("--one-file-system"), "{err}");
    let r = restore(&store, "one", &d.path().join("r1"), &src);
    assert!(r.join("top").is_file());
    for p in ["ext", "bt", "tmp", "bind", "zz-again"] {
        assert!(is_empty_dir(&r.join(p)), "{p} was entered");
    }
}

#[test]
fn btrfs_subvolumes_are_included_even_on_one_file_system() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let bt = BtrfsLoop::new(200);
    let src = bt.mount.join("src");
    fs::create_dir_all(&src).unwrap();
    write(&src.join("a"), b"a");
    run(Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(src.join("vol")));
    write(&src.join("vol/deep/x"), b"in a subvolume");
    let d = scratch();
    let store = d.path().join("store");
    for (host, extra) in [("plain", &[][..]), ("onefs", &["--one-file-system"][..])] {
        backup(&store, &src, host, extra);
        let r = restore(&store, host, &d.path().join(host), &src);
        assert_same_tree(&src, &r);
    }
}

/// A FUSE mount whose daemon never answers (as a hung daemon, or a hard
/// NFS mount whose server is down): anything that asks it blocks until
/// the daemon goes. The walk takes its mount point from cached attributes
/// and without xattrs, leaves it out with a note, and the backup ends.
#[test]
fn a_mount_whose_server_never_answers_does_not_hold_the_walk() {
    if !require_root("mounting a FUSE filesystem") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("sub/f"), b"kept");
    let point = src.join("hung");
    fs::create_dir_all(&point).unwrap();
    // The daemon's end of the connection: held, never read.
    let daemon = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap_or_else(|e| panic!("/dev/fuse: {e} (the fuse module must be loaded)"));
    let mut mounts = Mounts::default();
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = daemon.as_raw_fd();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "fuse.hang", "-o"])
            .arg(format!("fd={fd},rootmode=40000,user_id=0,group_id=0"))
            .arg("hang")
            .arg(&point);
        // SAFETY: only fcntl, async-signal-safe, between fork and exec: the
        // descriptor (opened close-on-exec) goes to mount.
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
                    .map_err(std::io::Error::from)
            });
        }
        run(&mut cmd);
        mounts.0.push(point.clone());
    }
    let store = d.path().join("store");
    let mut child = Command::new(bin("byteback-backup"))
        .arg("--destination")
        .arg(&store)
        .arg("--source")
        .arg(&src)
        .args(["--hostname", "h", "--retry-number", "0", "--verbose"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // With -x (which in 1.x replaced its mount-based excludes too), the
    // network filesystem left out is said, unless an exclude names it.
    let with_x = |x: &std::path::Path| {
        let o = run_bounded(
            Command::new(bin("byteback-backup"))
                .arg("--destination")
                .arg(d.path().join("store-x"))
                .arg("--source")
                .arg(&src)
                .args(["--hostname", "h", "--retry-number", "0", "-x"])
                .arg(x),
            std::time::Duration::from_secs(60),
            src.to_str().unwrap(),
        )
        .0;
        (o.status.code(), output_text(&o))
    };
    let said = format!(
        "{}: a filesystem of type fuse.hang, not backed up (network, FUSE, ecryptfs and overlay \
         filesystems never are; byteback 1.x backed them up when -x replaced its default \
         excludes)",
        point.display()
    );
    let (x_code, x_out) = with_x(std::path::Path::new("/no/such/path"));
    let (named_code, named_out) = with_x(&point.join(""));
    // The daemon goes: whatever waits on the mount ends, and it unmounts.
    drop(daemon);
    assert_eq!(x_code, Some(0), "{x_out}");
    assert!(x_out.contains(&said), "{x_out}");
    assert_eq!(named_code, Some(0), "{named_out}");
    assert!(!named_out.contains("not backed up (network"), "{named_out}");
    let status = status.map(|s| s.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let _ = child.wait();
    assert_eq!(
        status,
        Some(true),
        "held by the hung mount (or failed):\n{err}"
    );
    assert!(
        err.contains("fuse.hang is not a local filesystem type; not backed up"),
        "{err}"
    );
    drop(mounts);
    let got = restore(&store, "h", &d.path().join("r"), &src);
    assert_eq!(fs::read(got.join("sub/f")).unwrap(), b"kept");
    assert!(is_empty_dir(&got.join("hung")));
}

/// A bind mount of a subtree of a filesystem mounted nowhere under the
/// sources is walked where it is (its files would be in no backup
/// otherwise); once the whole filesystem is under the sources too, the
/// bind mount is left out and the files come from there, once.
#[test]
fn a_bind_mount_whose_filesystem_is_not_backed_up_elsewhere_is_walked() {
    if !require_root("mounting filesystems") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("top"), b"top");
    let mut mounts = Mounts::default();
    let outside = d.path().join("outside");
    mounts.ext4(d.path(), &outside);
    let mut rng = Rng::new(9);
    write(&outside.join("www/index.html"), b"<p>only here</p>");
    write(&outside.join("www/img/logo"), &rng.bytes(30_000));
    write(&outside.join("other"), b"not under the bind mount");
    mounts.mount(
        &["--bind", outside.join("www").to_str().unwrap()],
        &src.join("www"),
    );
    let store = d.path().join("store");
    store_without_interval(&store);
    backup(&store, &src, "bind", &[]);
    let r = restore(&store, "bind", &d.path().join("r"), &src);
    assert_same_tree(&outside.join("www"), &r.join("www"));
    assert!(r.join("top").is_file());

    // The whole filesystem is under the sources too: the bind mount is
    // left out, saying where its files are backed up.
    let out = run(Command::new(bin("byteback-backup"))
        .arg("--destination")
        .arg(&store)
        .arg("--source")
        .arg(&src)
        .arg("--source")
        .arg(&outside)
        .args(["--hostname", "both", "--retry-number", "0", "--verbose"]));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains(&format!(
            "whose files are backed up at {}",
            outside.join("www").display()
        )),
        "{err}"
    );
    let into = d.path().join("r2");
    let r = restore(&store, "both", &into, &src);
    assert!(
        is_empty_dir(&r.join("www")),
        "the bind mount was walked too"
    );
    let snap = r.ancestors().nth(src.components().count() - 1).unwrap();
    assert_same_tree(&outside, &snap.join(outside.strip_prefix("/").unwrap()));

    // Where they show there is excluded: the bind mount is walked, or
    // the files would be in neither place.
    let excluded = format!("{}/", outside.join("www").display());
    backup(
        &store,
        &src,
        "excl",
        &["--source", outside.to_str().unwrap(), "-x", &excluded],
    );
    let r = restore(&store, "excl", &d.path().join("r3"), &src);
    assert_same_tree(&outside.join("www"), &r.join("www"));
}

/// A filesystem without xattrs, as vfat (an EFI system partition, now
/// backed up where 1.x left it out) is: its files come back exactly, with
/// no warning for the xattrs it cannot have. This kernel has no vfat, so
/// ramfs, which keeps no xattrs either, stands in, as a source (the
/// crossing into vfat is `mounts::tests`).
#[test]
fn a_filesystem_without_xattrs_is_backed_up_without_warnings() {
    if !require_root("mounting filesystems") {
        return;
    }
    let d = scratch();
    let src = d.path().join("efi");
    let mut mounts = Mounts::default();
    mounts.mount(&["-t", "ramfs", "ramfs"], &src);
    let mut rng = Rng::new(3);
    write(&src.join("EFI/debian/grubx64.efi"), &rng.bytes(200_000));
    write(&src.join("EFI/BOOT/BOOTX64.EFI"), &rng.bytes(100_000));
    let set = Command::new("setfattr")
        .args(["-n", "user.x", "-v", "1"])
        .arg(src.join("EFI/BOOT/BOOTX64.EFI"))
        .output()
        .unwrap();
    assert!(
        !set.status.success(),
        "ramfs kept an xattr: no stand-in for vfat"
    );
    let store = d.path().join("store");
    store_without_interval(&store);
    let out = backup(&store, &src, "efi", &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("warning"), "{err}");
    let r = restore(&store, "efi", &d.path().join("r"), &src);
    assert_same_tree(&src, &r);
}

/// A source inside another is walked as a source, as rsync (1.x) walked
/// each one it was given: a tmpfs named as a source, or a filesystem that
/// `--one-file-system` would leave out, is backed up. Before, it was
/// dropped as covered by the outer source, whose walk then left it out,
/// with exit 0. One the walk cannot reach (below an excluded directory)
/// is a warning (exit 24).
#[test]
fn a_source_inside_another_is_walked_as_a_source() {
    if !require_root("tmpfs mounts") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("a"), b"a");
    let mut mounts = Mounts::default();
    mounts.mount(&["-t", "tmpfs", "tmpfs"], &src.join("t"));
    write(&src.join("t/in-tmpfs"), b"named as a source");
    mounts.mount(&["-t", "tmpfs", "tmpfs"], &src.join("other"));
    write(&src.join("other/x"), b"not named");
    let store = d.path().join("store");
    let inner = src.join("t");
    let inner_arg = ["--source", inner.to_str().unwrap()];
    for (host, extra) in [
        ("plain", inner_arg.to_vec()),
        ("onefs", [&inner_arg[..], &["--one-file-system"]].concat()),
    ] {
        backup(&store, &src, host, &extra);
        let r = restore(&store, host, &d.path().join(host), &src);
        assert_eq!(fs::read(r.join("a")).unwrap(), b"a");
        assert_eq!(
            fs::read(r.join("t/in-tmpfs")).unwrap(),
            b"named as a source",
            "{host}"
        );
        assert!(is_empty_dir(&r.join("other")), "{host}");
    }
    // Below a directory left out: that directory is entered only on the
    // way to it (as rsync sends the directories above a source it is
    // given), and nothing else of it is backed up.
    write(&src.join("skip/keep/f"), b"f");
    write(&src.join("skip/other"), b"left out");
    let excl = |host: &str, extra: &Path| {
        run_status(
            Command::new(bin("byteback-backup"))
                .arg("--destination")
                .arg(&store)
                .arg("--source")
                .arg(&src)
                .arg("--source")
                .arg(extra)
                .arg("--exclude")
                .arg(src.join("skip").to_str().unwrap().to_owned() + "/")
                .args(["--hostname", host, "--retry-number", "0"]),
        )
    };
    let o = excl("excl", &src.join("skip/keep"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let r = restore(&store, "excl", &d.path().join("excl"), &src);
    assert_eq!(fs::read(r.join("skip/keep/f")).unwrap(), b"f");
    assert!(!r.join("skip/other").exists());
    // A source inside another that is a symlink is sent as one (not
    // followed): said, not taken for backed up.
    std::os::unix::fs::symlink(src.join("skip/keep"), src.join("lnk")).unwrap();
    let o = excl("link", &src.join("lnk"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(err.contains("not reached by its walk"), "{err}");
}

/// A restore (as root, over an earlier restore) that puts a file where a
/// directory stands removes the directory's tree, but never a mounted
/// filesystem's content: with a mount point below, it stops with an error
/// naming it and removes nothing; unmounted, the file takes the place.
#[test]
fn a_restore_replacing_a_directory_never_empties_a_mount_below_it() {
    if !require_root("mounting filesystems") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("x"), b"x is a file in the backup");
    write(&src.join("y"), b"y");
    let store = d.path().join("store");
    store_without_interval(&store);
    backup(&store, &src, "h", &[]);
    let snap = snapshots(&store, "h").pop().unwrap();
    let into = d.path().join("into");
    let x = into
        .join(&snap)
        .join(src.strip_prefix("/").unwrap())
        .join("x");
    write(&x.join("plain"), b"plain");
    write(&x.join("sub/deeper/f"), b"f");
    let mut mounts = Mounts::default();
    mounts.mount(&["-t", "tmpfs", "tmpfs"], &x.join("sub/mnt"));
    let sentinel = x.join("sub/mnt/sentinel");
    fs::write(&sentinel, b"another filesystem's").unwrap();
    let restore = || run_status(&mut restore_all_cmd(&store, &into));
    let o = restore();
    let out = output_text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("sub/mnt is a mount point") && out.contains("nothing was removed"),
        "{out}"
    );
    assert_eq!(fs::read(&sentinel).unwrap(), b"another filesystem's");
    assert_eq!(fs::read(x.join("plain")).unwrap(), b"plain");
    assert_eq!(fs::read(x.join("sub/deeper/f")).unwrap(), b"f");
    drop(mounts);
    let o = restore();
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(fs::read(&x).unwrap(), b"x is a file in the backup");
    // Said, as what was in it is gone (rsync refuses without --force).
    assert!(
        out.contains("x: the directory here, and what was in it, replaced"),
        "{out}"
    );
}

/// A file with more extended attributes than one entry may carry (Linux
/// allows any number on btrfs): it is backed up with those that fit,
/// `trusted.` ones first, and the backup says which were left out (exit
/// 24), every time, instead of every backup of the host failing.
#[test]
fn xattrs_beyond_what_an_entry_carries_are_left_out_with_a_warning() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let bt = BtrfsLoop::new(256);
    // A directory above the source has too many as well: it is sent too.
    let src = bt.mount.join("above/src");
    write(&src.join("many"), b"many xattrs");
    write(&src.join("zz-after"), b"after it");
    for i in 0..300 {
        set_xattr(&src.join("many"), &format!("user.k{i:03}"), b"v");
        set_xattr(&bt.mount.join("above"), &format!("user.a{i:03}"), b"v");
    }
    set_xattr(&src.join("many"), "trusted.keep", b"t");
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    for run in 0..2 {
        let o = backup_with_record(&store, &src, &d.path().join("cache"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(24), "run {run}: {err}");
        assert!(
            err.contains("many: more extended attributes than one entry may carry")
                && err.contains("backed up without 45 of them: user.k255, user.k256"),
            "run {run}: {err}"
        );
        assert!(
            err.contains("above: more extended attributes than one entry may carry")
                && err.contains("backed up without 44 of them: user.a256"),
            "run {run}: {err}"
        );
    }
    let r = restore(&store, "h", &bt.mount.join("r"), &src);
    let got = xattrs(&r.join("many"));
    assert_eq!(got.len(), 256);
    assert!(got.contains(&(b"trusted.keep".to_vec(), b"t".to_vec())));
    assert!(got.contains(&(b"user.k254".to_vec(), b"v".to_vec())));
    assert!(!got.iter().any(|(n, _)| n == b"user.k255"));
    assert_eq!(fs::read(r.join("zz-after")).unwrap(), b"after it");
    assert_eq!(xattrs(r.parent().unwrap()).len(), 256);

    // Restored onto ext4 (one block of xattrs per inode): those that do
    // not fit are warnings, as rsync's, and the restore goes on to the end.
    let img = d.path().join("ext4.img");
    run(Command::new("truncate").args(["-s", "64M"]).arg(&img));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^ea_inode"])
        .arg(&img));
    let mut mounts = Mounts::default();
    let into = d.path().join("on-ext4");
    mounts.mount(&["-o", "loop", img.to_str().unwrap()], &into);
    let (o, r) = restore_status(&store, &into, &src);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("many: cannot set xattr user.k") && err.contains("No space left"),
        "{err}"
    );
    assert_eq!(fs::read(r.join("many")).unwrap(), b"many xattrs");
    assert_eq!(fs::read(r.join("zz-after")).unwrap(), b"after it");
}

/// Entries whose xattrs the record of the last backup vouches for (not
/// read again) still count them: a run of 1,100 such entries with 30 KB of
/// xattrs each goes in several messages within the server's caps, not in
/// one the server refuses (which failed every later backup of the host).
/// And the server lists them for a restore in messages cut by size too:
/// 1,024 entries a message, as it sent them, is 30 MB, over a frame's
/// limit, and no restore or listing of the snapshot could be made.
#[test]
fn entries_vouched_for_by_the_record_count_their_xattrs() {
    if !require_root("btrfs loop filesystem") {
        return;
    }
    let bt = BtrfsLoop::new(512);
    let src = bt.mount.join("src");
    for i in 0..1100 {
        let p = src.join(format!("d{}/f{i:04}", i / 100));
        write(&p, format!("file {i}").as_bytes());
        // (btrfs holds a value of up to about 16 KB.)
        for k in 0..3 {
            set_xattr(&p, &format!("user.big{k}"), &[b'x'; 10_000]);
        }
    }
    // Older than the first backup's start by more than the racy margin:
    // the next backup takes their xattrs from its record.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let d = scratch();
    let store = d.path().join("store");
    store_without_interval(&store);
    for run in 0..3 {
        let o = backup_with_record(&store, &src, &d.path().join("cache"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "run {run}: {err}");
        if run > 0 {
            assert!(
                err.contains("entries unchanged since the last backup"),
                "run {run} did not use the record: {err}"
            );
        }
    }
    let r = restore(&store, "h", &bt.mount.join("r"), &src);
    assert_same_tree(&src, &r);
    assert_eq!(
        xattrs(&r.join("d7/f0777")),
        (0..3)
            .map(|k| (format!("user.big{k}").into_bytes(), vec![b'x'; 10_000]))
            .collect::<Vec<_>>()
    );
}

/// A file whose access ACL cannot be restored (onto ramfs, which keeps no
/// xattrs, as onto an inode with no room left for it): with an ACL, the
/// mode's group bits are the ACL's mask, so applying them alone would
/// give the owning group what only a named user had. The group bits are
/// narrowed to the ACL's `group::` entry instead, with a warning.
#[test]
fn a_restore_without_the_acl_never_widens_the_groups_access() {
    use std::os::unix::fs::PermissionsExt;
    if !require_root("mounting filesystems") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("secret"), b"for one named user");
    write(&src.join("shared"), b"for the group too");
    for (f, acl) in [
        ("secret", "u::rw-,u:nobody:rw-,g::---,m::rw-,o::---"),
        ("shared", "u::rw-,u:nobody:rw-,g::r--,m::rw-,o::---"),
    ] {
        run(Command::new("setfacl")
            .args(["--set", acl])
            .arg(src.join(f)));
    }
    assert_eq!(
        fs::metadata(src.join("secret"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o660,
        "the mask is the mode's group bits"
    );
    let store = d.path().join("store");
    store_without_interval(&store);
    backup(&store, &src, "h", &[]);
    let mut mounts = Mounts::default();
    let into = d.path().join("ramfs");
    mounts.mount(&["-t", "ramfs", "ramfs"], &into);
    let (o, r) = restore_status(&store, &into, &src);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("secret: without its ACL, mode 0660 applied as 0600"),
        "{err}"
    );
    let mode = |f: &str| fs::metadata(r.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("secret"), 0o600);
    assert_eq!(mode("shared"), 0o640);
    assert_eq!(fs::read(r.join("secret")).unwrap(), b"for one named user");
}

/// A restore links a hard link's later names to the file it made for the
/// first name, and to nothing else: where that file was removed and a new
/// one made in its place meanwhile (as a local user could, in a tree they
/// may write into), the link is not made, with a warning (exit 24), even
/// when the new file got the old one's inode number (ext4 hands a freed
/// number out again).
#[test]
fn a_hard_link_is_never_made_to_a_file_put_in_its_first_names_place() {
    if !require_root("mounting an ext4 filesystem") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("a/x"), b"first name");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::hard_link(src.join("a/x"), src.join("d/l")).unwrap();
    write(&src.join("d/f"), b"a file");
    let store = d.path().join("store");
    store_without_interval(&store);
    backup(&store, &src, "h", &[]);

    let mut mounts = Mounts::default();
    let into = d.path().join("into");
    mounts.ext4(d.path(), &into);
    let o =
        run_status(restore_all_cmd(&store, &into).env("BYTEBACK_TEST_RECREATE_FIRST_NAME", "1"));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    // The fault gave the new file the old one's inode number: the case a
    // check of device and inode numbers alone would link to.
    let reused = err
        .lines()
        .find_map(|l| l.strip_prefix("test fault: first name recreated, inode "))
        .and_then(|l| l.split_once(" -> "))
        .is_some_and(|(a, b)| a == b && a != "0");
    assert!(reused, "the inode number was not handed out again: {err}");
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("d/l: not restored: its first name")
            && err.contains("was replaced by another file during the restore"),
        "{err}"
    );
    let snap = fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.ends_with("lost+found"))
        .unwrap();
    let r = snap.join(src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(r.join("a/x")).unwrap(), b"planted");
    assert!(
        fs::symlink_metadata(r.join("d/l")).is_err(),
        "linked to the planted file"
    );
    assert_eq!(fs::read(r.join("d/f")).unwrap(), b"a file");
}

/// What the walk says of a mount point (here a tmpfs, not backed up) names
/// it escaped: any user may name a directory and mount FUSE on it, and the
/// messages go to root's terminal, the journal and mail. Such a name (not
/// UTF-8) anywhere in the mount table costs nothing else: an ext4
/// filesystem below the source is backed up (the whole table once failed
/// to read, and every filesystem below the sources was passed over).
#[test]
fn messages_about_a_mount_point_name_it_escaped() {
    if !require_root("mounting a tmpfs") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("top"), b"top");
    let mut mounts = Mounts::default();
    mounts.ext4(d.path(), &src.join("ext"));
    write(&src.join("ext/data"), b"on its own filesystem");
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::OsStr::from_bytes(b"t\rbyteback-backup: fake\x1b]0;x\x07\xff");
    mounts.mount(&["-t", "tmpfs", "tmpfs"], &src.join(name));
    let store = d.path().join("store");
    store_without_interval(&store);
    let o = backup(&store, &src, "h", &["--verbose"]);
    let err = &o.stderr;
    assert!(
        !err.iter().any(|b| *b == b'\r' || *b == 0x1b || *b == 0x07),
        "{}",
        String::from_utf8_lossy(err)
    );
    let text = String::from_utf8_lossy(err);
    assert!(
        text.contains("t\\x0dbyteback-backup: fake\\x1b]0;x\\x07\\xff: tmpfs is not a local"),
        "{text}"
    );
    assert_eq!(o.status.code(), Some(0), "{text}");
    let stored = store
        .join("h/current")
        .join(src.strip_prefix("/").unwrap())
        .join("ext/data");
    assert_eq!(
        fs::read(stored).unwrap(),
        b"on its own filesystem",
        "{text}"
    );
}

/// With `-x` (which in 1.x replaced its mount-based excludes too) an
/// overlay below the source, whose merged tree 1.x backed up as files and
/// byteback never does, is named in a warning; without `-x` it is not.
#[test]
fn with_x_an_overlay_left_out_is_said() {
    if !require_root("mounting an overlay") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("top"), b"top");
    let (lower, upper, work) = (
        d.path().join("lo"),
        d.path().join("up"),
        d.path().join("wk"),
    );
    for p in [&lower, &upper, &work] {
        fs::create_dir_all(p).unwrap();
    }
    write(&lower.join("merged-only"), b"only in the merged view");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let mut mounts = Mounts::default();
    mounts.mount(&["-t", "overlay", "overlay", "-o", &opts], &src.join("ov"));
    let store = d.path().join("store");
    store_without_interval(&store);
    let said = format!(
        "{}: a filesystem of type overlay, not backed up",
        src.join("ov").display()
    );
    let o = backup(&store, &src, "h", &["-x", "/no/such/path"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains(&said), "{err}");
    let o = backup(&store, &src, "h", &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains(&said), "{err}");
    // The overlay as the source itself (a container's `/`) is walked,
    // whatever its type, and not said to be left out.
    let o = backup(&store, &src.join("ov"), "ov", &["-x", "/no/such/path"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("not backed up"), "{err}");
    let stored = store
        .join("ov/current")
        .join(src.strip_prefix("/").unwrap())
        .join("ov/merged-only");
    assert_eq!(
        fs::read(stored).unwrap(),
        b"only in the merged view",
        "{err}"
    );
}

/// The dump hooks write into a directory the backup must keep. With
/// `--one-file-system`, a dump directory on a filesystem of its own below
/// the source is not entered, and the backup says that it holds neither
/// MariaDB's live files (excluded by default) nor their dump; without it,
/// the directory is entered and nothing is said. The hook fails, so
/// nothing of `/var/lib` is walked.
#[test]
fn a_dump_directory_the_walk_does_not_enter_is_said() {
    if !require_root("mounting an ext4 image below /var/lib") {
        return;
    }
    if !Path::new("/var/lib/mysql").is_dir()
        && !skip_loudly("/var/lib/mysql is missing (mariadb-server is not installed)")
    {
        return;
    }
    let d = scratch();
    let conf = d.path().join("conf");
    let hook = conf.join("pre-backup.d/50-mysql");
    write(&hook, b"#!/bin/sh\nexit 3\n");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let dumps = PathBuf::from(format!("/var/lib/bbt-dumps-{}", std::process::id()));
    struct Gone<'a>(&'a Path);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            let _ = fs::remove_dir(self.0);
        }
    }
    let _gone = Gone(&dumps);
    let mut mounts = Mounts::default();
    mounts.ext4(d.path(), &dumps);
    let store = d.path().join("store");
    store_without_interval(&store);
    let try_backup = |extra: &[&str]| {
        let o = run_status(
            Command::new(bin("byteback-backup"))
                .env("BYTEBACK_CONFIG_DIR", &conf)
                .env("BYTEBACK_DUMP_DIR", &dumps)
                .arg("--destination")
                .arg(&store)
                .args([
                    "--source",
                    "/var/lib",
                    "--hostname",
                    "h",
                    "--retry-number",
                    "0",
                ])
                .args(extra),
        );
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            text.contains("pre-backup.d/50-mysql exited with status 3"),
            "{text}"
        );
        assert_ne!(o.status.code(), Some(0), "{text}");
        text
    };
    let text = try_backup(&["--one-file-system"]);
    let said = format!(
        "/var/lib/mysql/ is left out (live database files, excluded by default) and the \
         pre-backup hook 50-mysql dumps it into {0}/mysql.sql.gz, which this backup leaves out \
         too ({0}: another filesystem, not entered (--one-file-system))",
        dumps.display()
    );
    assert!(text.contains(&said), "{text}");
    let text = try_backup(&[]);
    assert!(!text.contains("leaves out too"), "{text}");
}

/// The directory a restore writes into is opened once, when it starts: a
/// user who may rename it (root restoring in a user's directory) and puts
/// a symlink to another place on its path between two snapshots' trees
/// (simulated in debug builds by `BYTEBACK_TEST_SWAP_TARGET`) gets nothing
/// written there; both snapshots' trees land in the directory opened.
#[test]
fn a_restore_target_renamed_between_snapshots_is_not_followed() {
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("kept"), b"in both");
    write(&src.join("gone"), b"only in the first");
    let store = d.path().join("store");
    store_without_interval(&store);
    backup(&store, &src, "h", &[]);
    fs::remove_file(src.join("gone")).unwrap();
    backup(&store, &src, "h", &[]);
    let work = d.path().join("work");
    let elsewhere = d.path().join("elsewhere");
    fs::create_dir_all(&work).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    let o = run(Command::new(bin("byteback-restore"))
        .current_dir(&work)
        .env("BYTEBACK_TEST_SWAP_TARGET", &elsewhere)
        .arg("--destination")
        .arg(&store)
        .args(["--hostname", "h", "--restore"])
        .arg(format!("{}/", src.display())));
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("test fault:"), "{text}");
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "written through the symlink: {text}"
    );
    let moved = d.path().join("work.moved");
    let rel = src.strip_prefix("/").unwrap();
    let mut found = vec![];
    for snap in fs::read_dir(&moved).unwrap() {
        let snap = snap.unwrap().path();
        for name in ["kept", "gone"] {
            if let Ok(b) = fs::read(snap.join(rel).join(name)) {
                found.push((name, b));
            }
        }
    }
    found.sort();
    assert_eq!(
        found,
        [
            ("gone", b"only in the first".to_vec()),
            ("kept", b"in both".to_vec())
        ],
        "{text}"
    );
}

/// A hard link is made to what stands at its own first name only if that
/// is the file this restore wrote there: another file the restore wrote
/// (itself a first name of links, so one a link may name), renamed over
/// it by a local user, is not linked to; the link is left out with a
/// warning (exit 24), and the rest of the restore goes on.
#[test]
fn a_hard_link_is_never_made_to_another_restored_file_renamed_over_its_first_name() {
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("a/x"), b"first name");
    write(&src.join("b/g1"), b"another linked file");
    fs::hard_link(src.join("b/g1"), src.join("b/g2")).unwrap();
    fs::create_dir_all(src.join("d")).unwrap();
    fs::hard_link(src.join("a/x"), src.join("d/l")).unwrap();
    write(&src.join("d/z"), b"after the link");
    let store = d.path().join("store");
    store_without_interval(&store);
    backup(&store, &src, "h", &[]);
    let into = d.path().join("into");
    fs::create_dir_all(&into).unwrap();
    let rel = src.strip_prefix("/").unwrap();
    let o = run_status(restore_all_cmd(&store, &into).env(
        "BYTEBACK_TEST_RECREATE_FIRST_NAME",
        format!("rename:{}/b/g1", rel.display()),
    ));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("renamed over the first name: Ok"), "{err}");
    assert_eq!(o.status.code(), Some(24), "{err}");
    assert!(
        err.contains("d/l: not restored: its first name")
            && err.contains("was replaced by another file during the restore"),
        "{err}"
    );
    let snap = fs::read_dir(&into).unwrap().next().unwrap().unwrap().path();
    let r = snap.join(rel);
    assert_eq!(fs::read(r.join("a/x")).unwrap(), b"another linked file");
    assert!(
        fs::symlink_metadata(r.join("d/l")).is_err(),
        "linked to the file renamed over its first name"
    );
    assert_eq!(fs::read(r.join("d/z")).unwrap(), b"after the link");
}

/// A restore into an earlier restore's tree does not write into a mount
/// point found there that another user owns (or a FUSE one): its owner
/// (or daemon) would receive what is restored, root's files too. One the
/// restoring user owns (a disc mounted to restore onto) is entered.
#[test]
fn a_restore_does_not_write_into_another_users_mount_in_its_tree() {
    if !require_root("mounting a tmpfs") {
        return;
    }
    let d = scratch();
    let src = d.path().join("src");
    write(&src.join("sub/secret"), b"root's own");
    write(&src.join("top"), b"top");
    let store = d.path().join("store");
    store_without_interval(&store);
    backup(&store, &src, "h", &[]);
    let into = d.path().join("into");
    let restored = restore(&store, "h", &into, &src);
    assert_eq!(
        fs::read(restored.join("sub/secret")).unwrap(),
        b"root's own"
    );
    let mut mounts = Mounts::default();
    mounts.mount(&["-t", "tmpfs", "tmpfs"], &restored.join("sub"));
    std::os::unix::fs::chown(restored.join("sub"), Some(1234), Some(1234)).unwrap();
    let again = || run_status(&mut restore_all_cmd(&store, &into));
    let o = again();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sub is a mount point (another filesystem, owned by uid 1234): refusing"),
        "{err}"
    );
    assert!(
        fs::symlink_metadata(restored.join("sub/secret")).is_err(),
        "written into the other user's mount: {err}"
    );
    // Root's own mount there: restored into.
    std::os::unix::fs::chown(restored.join("sub"), Some(0), Some(0)).unwrap();
    let o = again();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        fs::read(restored.join("sub/secret")).unwrap(),
        b"root's own"
    );
}

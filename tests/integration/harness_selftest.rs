//! Self-test of the shared test helpers in `tests/integration/util`: the oracles must
//! agree on identical trees and must be able to fail.

use crate::util;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;

use util::*;

/// Runs `f` and returns its panic message, or panics if it did not panic.
fn expect_panic(what: &str, f: impl FnOnce()) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => panic!("{what}: expected a panic, got none"),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    }
}

/// `cp -a SRC/. DST` (coreutils), deliberately not rsync, so that the rsync
/// oracle is checked against an independent copier.
fn cp_a(src: &Path, dst: &Path) {
    fs::create_dir(dst).expect("mkdir copy");
    let mut from = src.as_os_str().to_owned();
    from.push("/.");
    run(Command::new("cp").arg("-a").arg(from).arg(dst));
}

#[test]
fn rng_is_deterministic_and_bounded() {
    // Reference value of splitmix64 seeded with 0.
    assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    let mut a = Rng::new(42);
    let mut b = Rng(42);
    assert_eq!(a.bytes(1001), b.bytes(1001));
    for n in [1u64, 2, 3, 7, 1000, u64::MAX] {
        for _ in 0..1000 {
            assert!(a.below(n) < n);
        }
    }
    let mut seen = [false; 10];
    for _ in 0..1000 {
        seen[a.below(10) as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "below(10) misses values: {seen:?}");
    let mut buf = [0u8; 13];
    a.fill(&mut buf);
    assert_ne!(buf, [0u8; 13]);
}

#[test]
fn rich_tree_has_what_it_promises() {
    let t = scratch();
    let root = t.path().join("tree");
    fs::create_dir(&root).expect("mkdir");
    make_rich_tree(&root, &mut Rng::new(1));

    let m = |p: &str| fs::symlink_metadata(root.join(p)).expect(p);
    assert_eq!(m("files/empty").len(), 0);
    assert_eq!(m("files/size_4097").len(), 4097);
    assert_eq!(m("files/sparse").len(), 16 << 20);
    assert!(
        allocated_bytes(&root.join("files/sparse")) < (1 << 20),
        "sparse file is not sparse: {} bytes allocated",
        allocated_bytes(&root.join("files/sparse"))
    );
    assert_eq!(m("hard/b/third").ino(), m("hard/a/first").ino());
    assert_eq!(m("hard/a/first").nlink(), 3);
    assert_eq!(m("modes/setuid").mode() & 0o7777, 0o4755);
    assert_eq!(m("modes/setgid_dir").mode() & 0o7777, 0o2755);
    assert_eq!(m("modes/sticky_dir").mode() & 0o7777, 0o1777);
    assert_eq!(m("modes/readonly").mode() & 0o7777, 0o400);
    assert_eq!(m("modes/private_dir").mode() & 0o7777, 0o700);
    assert_eq!(
        (
            m("times/epoch_1970").mtime(),
            m("times/epoch_1970").mtime_nsec()
        ),
        MTIME_1970
    );
    assert_eq!(
        (
            m("times/year_2100").mtime(),
            m("times/year_2100").mtime_nsec()
        ),
        MTIME_2100
    );
    assert!(m("links/dangling").file_type().is_symlink());
    assert!(m("special/fifo").file_type().is_fifo());
    let long = fs::read_dir(root.join("names"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .find(|n| n.len() == 255);
    assert!(long.is_some(), "no 255-byte name");
    assert!(root
        .join("deep")
        .join(
            (0..40)
                .map(|i| format!("level_{i:02}"))
                .collect::<Vec<_>>()
                .join("/")
        )
        .join("bottom.txt")
        .is_file());
    let x = xattrs(&root.join("xattrs/big"));
    assert!(
        x.iter().any(|(n, v)| n == b"user.big" && v.len() == 4000),
        "{x:?}"
    );
    let acl = run(Command::new("getfacl")
        .arg("-cp")
        .arg(root.join("acl/default_dir/inherited")));
    assert!(
        String::from_utf8_lossy(&acl.stdout).contains("user:1234:"),
        "ACL not inherited"
    );
    if is_root() {
        assert_eq!(
            (m("owners/file").uid(), m("owners/file").gid()),
            (1234, 5678)
        );
        assert_eq!(m("owners/setuid_foreign").mode() & 0o7777, 0o4755);
        assert_eq!(m("special/char_null").rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(
            m("special/block_loop200").rdev(),
            rustix::fs::makedev(7, 200)
        );
    }
}

#[test]
fn rich_tree_is_reproducible_from_its_seed() {
    let t = scratch();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    fs::create_dir(&a).expect("mkdir a");
    fs::create_dir(&b).expect("mkdir b");
    make_rich_tree(&a, &mut Rng::new(7));
    make_rich_tree(&b, &mut Rng::new(7));
    let (da, db) = (tree_digest(&a), tree_digest(&b));
    assert!(
        da == db,
        "same seed, different trees:\n{}",
        digest_diff(&da, &db)
    );
    assert_same_tree(&a, &b);
}

/// One way to damage a copy; both rsync and the digest must notice it.
struct Mutation {
    name: &'static str,
    root_only: bool,
    apply: fn(&Path),
}

fn keep_mtime(p: &Path, f: impl FnOnce()) {
    let m = fs::symlink_metadata(p).expect("lstat");
    f();
    set_mtime(p, m.mtime(), m.mtime_nsec());
}

const MUTATIONS: &[Mutation] = &[
    Mutation {
        name: "mtime one second later",
        root_only: false,
        apply: |d| {
            let p = d.join("files/size_4096");
            let m = fs::symlink_metadata(&p).expect("lstat");
            set_mtime(&p, m.mtime() + 1, m.mtime_nsec());
        },
    },
    Mutation {
        name: "mtime one nanosecond later",
        root_only: false,
        apply: |d| {
            let p = d.join("files/size_4096");
            let m = fs::symlink_metadata(&p).expect("lstat");
            let ns = if m.mtime_nsec() == 999_999_999 {
                0
            } else {
                m.mtime_nsec() + 1
            };
            set_mtime(&p, m.mtime(), ns);
        },
    },
    Mutation {
        name: "one byte of content, same size and mtime",
        root_only: false,
        apply: |d| {
            let p = d.join("files/random_1MiB");
            keep_mtime(&p, || {
                let mut c = fs::read(&p).expect("read");
                c[500_000] ^= 1;
                fs::write(&p, c).expect("write");
            });
        },
    },
    Mutation {
        name: "user xattr value",
        root_only: false,
        apply: |d| {
            let p = d.join("xattrs/several");
            let c = Command::new("setfattr")
                .args(["-n", "user.a", "-v", "B"])
                .arg(&p)
                .output();
            assert!(c.expect("setfattr").status.success());
        },
    },
    Mutation {
        name: "ACL entry",
        root_only: false,
        apply: |d| {
            run(Command::new("setfacl")
                .args(["-m", "u:1234:r--"])
                .arg(d.join("acl/file_acl")));
        },
    },
    Mutation {
        name: "mode of a directory",
        root_only: false,
        apply: |d| {
            let p = d.join("modes/private_dir");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o750)).expect("chmod");
        },
    },
    Mutation {
        name: "symlink target",
        root_only: false,
        apply: |d| {
            let p = d.join("links/dangling");
            keep_mtime(&d.join("links"), || {
                fs::remove_file(&p).expect("rm");
                std::os::unix::fs::symlink("does/not/exist/either", &p).expect("symlink");
            });
        },
    },
    Mutation {
        name: "hard link broken into an identical copy",
        root_only: false,
        apply: |d| {
            let p = d.join("hard/b/third");
            keep_mtime(&d.join("hard/b"), || {
                let m = fs::symlink_metadata(&p).expect("lstat");
                let c = fs::read(&p).expect("read");
                fs::remove_file(&p).expect("rm");
                fs::write(&p, c).expect("write");
                fs::set_permissions(&p, m.permissions()).expect("chmod");
                set_mtime(&p, m.mtime(), m.mtime_nsec());
            });
        },
    },
    Mutation {
        name: "symlink mtime only",
        root_only: false,
        apply: |d| {
            let p = d.join("links/relative_file");
            let m = fs::symlink_metadata(&p).expect("lstat");
            set_mtime(&p, m.mtime() - 10, m.mtime_nsec());
        },
    },
    Mutation {
        name: "directory mtime nanoseconds only",
        root_only: false,
        apply: |d| {
            let p = d.join("deep/level_00/level_01");
            let m = fs::symlink_metadata(&p).expect("lstat");
            set_mtime(&p, m.mtime(), (m.mtime_nsec() + 500) % 1_000_000_000);
        },
    },
    Mutation {
        name: "default ACL of a directory",
        root_only: false,
        apply: |d| {
            let p = d.join("acl/default_dir");
            keep_mtime(&p, || {
                run(Command::new("setfacl")
                    .args(["-d", "-m", "u:4321:r-x"])
                    .arg(&p));
            });
        },
    },
    Mutation {
        name: "xattr removed from a directory",
        root_only: false,
        apply: |d| {
            run(Command::new("setfattr")
                .args(["-x", "user.on_dir"])
                .arg(d.join("xattrs/dir")));
        },
    },
    Mutation {
        name: "fifo replaced by an empty file",
        root_only: false,
        apply: |d| {
            let p = d.join("special/fifo");
            keep_mtime(&d.join("special"), || {
                let m = fs::symlink_metadata(&p).expect("lstat");
                fs::remove_file(&p).expect("rm");
                fs::write(&p, b"").expect("write");
                fs::set_permissions(&p, m.permissions()).expect("chmod");
                set_mtime(&p, m.mtime(), m.mtime_nsec());
            });
        },
    },
    Mutation {
        name: "group of a file",
        root_only: true,
        apply: |d| {
            let p = d.join("owners/file");
            std::os::unix::fs::lchown(&p, None, Some(5679)).expect("chown");
        },
    },
    Mutation {
        name: "owner of a symlink",
        root_only: true,
        apply: |d| {
            let p = d.join("links/foreign_owner");
            std::os::unix::fs::lchown(&p, Some(0), None).expect("lchown");
        },
    },
    Mutation {
        name: "minor number of a block device",
        root_only: true,
        apply: |d| {
            let p = d.join("special/block_loop200");
            keep_mtime(&d.join("special"), || {
                let m = fs::symlink_metadata(&p).expect("lstat");
                fs::remove_file(&p).expect("rm");
                run(Command::new("mknod")
                    .args(["-m", "660"])
                    .arg(&p)
                    .args(["b", "7", "201"]));
                set_mtime(&p, m.mtime(), m.mtime_nsec());
            });
        },
    },
    Mutation {
        name: "trusted xattr value",
        root_only: true,
        apply: |d| {
            let p = d.join("xattrs/trusted");
            run(Command::new("setfattr")
                .args(["-n", "trusted.byteback", "-v", "other"])
                .arg(&p));
        },
    },
    Mutation {
        name: "extra file in the copy",
        root_only: false,
        apply: |d| {
            keep_mtime(&d.join("empty_dir"), || {
                fs::write(d.join("empty_dir/extra"), b"x").expect("write");
            });
        },
    },
];

#[test]
fn copy_matches_and_oracles_detect_each_change() {
    let t = scratch();
    let src = t.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    make_rich_tree(&src, &mut Rng::new(3));
    let digest = tree_digest(&src);

    let copy = t.path().join("copy");
    cp_a(&src, &copy);
    assert_same_tree(&src, &copy);
    let dc = tree_digest(&copy);
    assert!(
        dc == digest,
        "cp -a copy differs:\n{}",
        digest_diff(&digest, &dc)
    );

    let mut failures = Vec::new();
    for (i, m) in MUTATIONS.iter().enumerate() {
        if m.root_only && !is_root() {
            continue;
        }
        let d = t.path().join(format!("mut{i}"));
        cp_a(&src, &d);
        (m.apply)(&d);
        let diff = rsync_diff(&src, &d);
        let dd = tree_digest(&d);
        eprintln!(
            "--- {}: rsync says:\n{diff}--- digest diff:\n{}",
            m.name,
            digest_diff(&digest, &dd)
        );
        if diff.is_empty() {
            failures.push(format!("{}: rsync diff {:?}", m.name, diff));
        }
        if dd == digest {
            failures.push(format!("{}: digest unchanged", m.name));
        }
        fs::remove_dir_all(&d).ok();
    }
    assert!(
        failures.is_empty(),
        "oracle failures:\n{}",
        failures.join("\n")
    );
    // The source itself was never touched by any of this.
    assert_eq!(tree_digest(&src), digest);
}

#[test]
fn sentinel_detects_tampering() {
    let t = scratch();
    let dir = t.path();
    fs::write(dir.join("existing"), b"existing").expect("write");

    let s = Sentinel::plant(dir);
    s.assert_untouched();
    // Reading is fine.
    let _ = fs::read(s.path()).expect("read");
    s.assert_untouched();

    // A new file anywhere below the directory.
    fs::create_dir(dir.join("sub")).expect("mkdir");
    let msg = expect_panic("new dir", || s.assert_untouched());
    assert!(msg.contains("appeared: sub"), "{msg}");
    fs::remove_dir(dir.join("sub")).expect("rmdir");
    // Gone again, but the directory's times moved (a tick of the coarse
    // clock later than the planting: kernels before 6.13 stamp with it).
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::create_dir(dir.join("sub")).expect("mkdir");
    fs::remove_dir(dir.join("sub")).expect("rmdir");
    let msg = expect_panic("dir ctime", || s.assert_untouched());
    assert!(msg.contains("metadata changed: ."), "{msg}");

    // A removed pre-existing file.
    let s = Sentinel::plant(dir);
    fs::remove_file(dir.join("existing")).expect("rm");
    let msg = expect_panic("vanished", || s.assert_untouched());
    assert!(msg.contains("vanished: existing"), "{msg}");
    fs::write(dir.join("existing"), b"existing").expect("write");

    // The directory itself chmod-ed, re-timed or given an xattr (as through
    // a planted symlink to it), or a file in it chmod-ed: nothing appears.
    type Touch = fn(&std::path::Path);
    let touches: [(&str, Touch, &str); 4] = [
        (
            "chmod dir",
            |d| fs::set_permissions(d, fs::Permissions::from_mode(0o700)).expect("chmod"),
            "metadata changed: .",
        ),
        (
            "utimes dir",
            |d| set_mtime(d, 1000, 0),
            "metadata changed: .",
        ),
        (
            "xattr on dir",
            |d| set_xattr(d, "user.planted", b"x"),
            "metadata changed: .",
        ),
        (
            "chmod file",
            |d| {
                fs::set_permissions(d.join("existing"), fs::Permissions::from_mode(0o600))
                    .expect("chmod")
            },
            "metadata changed: existing",
        ),
    ];
    for (what, touch, needle) in touches {
        let s = Sentinel::plant(dir);
        s.assert_untouched();
        touch(dir);
        let msg = expect_panic(what, || s.assert_untouched());
        assert!(msg.contains(needle), "{what}: {msg}");
    }

    // mtime only.
    set_mtime(s.path(), 1000, 0);
    let msg = expect_panic("mtime", || s.assert_untouched());
    assert!(msg.contains("mtime changed"), "{msg}");

    // Content rewritten in place, same length.
    let s = Sentinel::plant(dir);
    let mut c = fs::read(s.path()).expect("read");
    c[0] ^= 0xff;
    fs::write(s.path(), &c).expect("write");
    let msg = expect_panic("content", || s.assert_untouched());
    assert!(msg.contains("content changed"), "{msg}");

    // Replaced by a symlink.
    let s = Sentinel::plant(dir);
    fs::remove_file(s.path()).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", s.path()).expect("symlink");
    let msg = expect_panic("symlink", || s.assert_untouched());
    assert!(msg.contains("no longer a regular file"), "{msg}");
}

#[test]
fn run_reports_failures() {
    let out = run(Command::new("sh").args(["-c", "echo hello"]));
    assert_eq!(out.stdout, b"hello\n");
    let out = run_status(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]));
    assert_eq!(out.status.code(), Some(3));
    let msg = expect_panic("run false", || {
        run(Command::new("sh").args(["-c", "echo to-stdout; echo to-stderr >&2; exit 3"]));
    });
    for needle in ["exit status: 3", "to-stdout", "to-stderr", "\"sh\""] {
        assert!(msg.contains(needle), "missing {needle:?} in:\n{msg}");
    }
    let msg = expect_panic("missing tool", || {
        run_status(&mut Command::new("/nonexistent/tool"));
    });
    assert!(msg.contains("cannot start"), "{msg}");
}

#[test]
fn bin_names_the_build_command_when_missing() {
    let msg = expect_panic("bin", || {
        bin("byteback-no-such-binary");
    });
    assert!(msg.contains("cargo build --bins"), "{msg}");
    // When the workspace binaries are built, they are found in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let server = profile_dir.join("byteback-server");
    if server.is_file() {
        assert_eq!(bin("byteback-server"), server);
    }
}

#[test]
fn require_root_agrees_with_euid() {
    let euid = fs::metadata("/proc/self").expect("/proc/self").uid();
    assert_eq!(is_root(), euid == 0);
    if is_root() {
        assert!(require_root("nothing"));
    }
}

#[test]
fn plain_dir_read_only_by_mode_bits() {
    let t = scratch();
    let d = t.path().join("snap");
    fs::create_dir_all(d.join("sub")).expect("mkdir");
    fs::write(d.join("sub/file"), b"x").expect("write");
    std::os::unix::fs::symlink("sub/file", d.join("link")).expect("symlink");
    assert!(!is_read_only(&d));
    let chmod =
        |p: &Path, mode| fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    chmod(&d.join("sub/file"), 0o444);
    chmod(&d.join("sub"), 0o555);
    assert!(!is_read_only(&d), "top dir still writable");
    chmod(&d, 0o555);
    assert!(is_read_only(&d));
    assert!(is_read_only(&d.join("sub/file")));
    // One writable file deep inside makes the whole tree writable.
    chmod(&d.join("sub/file"), 0o644);
    assert!(!is_read_only(&d));
    assert!(!is_read_only(&d.join("sub")));
    chmod(&d.join("sub/file"), 0o444);
    assert!(is_read_only(&d));
    // Let TempDir clean up.
    chmod(&d, 0o755);
    chmod(&d.join("sub"), 0o755);
}

#[test]
fn btrfs_loop_snapshot_is_read_only_and_unchanged() {
    if !require_root("btrfs loop device test") {
        return;
    }
    let fs_ = BtrfsLoop::new(300);
    assert!(is_btrfs(&fs_.mount));
    let sv = fs_.mount.join("current");
    let snap = fs_.mount.join("2026-11-27T03:00+0000");
    run(Command::new("btrfs").args(["subvolume", "create"]).arg(&sv));
    make_rich_tree(&sv, &mut Rng::new(11));
    run(Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&sv)
        .arg(&snap));

    assert!(is_read_only(&snap), "snapshot not read-only");
    assert!(
        is_read_only(&snap.join("files")),
        "dir inside the snapshot not read-only"
    );
    assert!(!is_read_only(&sv), "subvolume is read-only");
    assert!(!is_read_only(&fs_.mount), "top level is read-only");

    // A snapshot is a faithful copy (the colon in its name must not confuse rsync).
    assert_same_tree(&sv, &snap);
    let before = tree_digest(&snap);
    assert!(
        before == tree_digest(&sv),
        "{}",
        digest_diff(&before, &tree_digest(&sv))
    );

    // The kernel refuses writes to it, even for root.
    assert!(fs::write(snap.join("new"), b"x").is_err());

    // Later changes to `current` leave the snapshot alone.
    let s = Sentinel::plant(&sv.join("empty_dir"));
    fs::write(sv.join("files/one_byte"), b"changed").expect("write");
    let msg = expect_panic("sentinel in subvolume", || {
        fs::write(sv.join("empty_dir/intruder"), b"x").expect("write");
        s.assert_untouched();
    });
    assert!(msg.contains("appeared: intruder"), "{msg}");
    assert!(!rsync_diff(&sv, &snap).is_empty());
    assert_eq!(tree_digest(&snap), before);
}

#[test]
fn btrfs_loops_in_parallel() {
    if !require_root("parallel btrfs loop devices") {
        return;
    }
    let handles: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                let f = BtrfsLoop::new(200);
                fs::write(f.mount.join("hello"), format!("{i}")).expect("write");
                (f.image().to_path_buf(), f.mount.clone())
            })
        })
        .collect();
    let mut images = Vec::new();
    for h in handles {
        let (image, mnt) = h.join().expect("thread panicked");
        assert!(!mnt.exists(), "mount dir left behind: {}", mnt.display());
        images.push(image);
    }
    // Each was cleaned up: no loop device still refers to its image.
    let out = run(Command::new("losetup").arg("-a"));
    let listing = String::from_utf8_lossy(&out.stdout);
    for image in &images {
        let name = image.to_string_lossy();
        assert!(
            !listing.lines().any(|l| l.contains(name.as_ref())),
            "{name} still attached:\n{listing}"
        );
    }
}

#[test]
fn btrfs_loop_drop_survives_a_busy_mount() {
    if !require_root("btrfs loop device busy unmount") {
        return;
    }
    let f = BtrfsLoop::new(200);
    let image = f.image().to_path_buf();
    let mount = f.mount.clone();
    let open = fs::File::create(mount.join("held-open")).expect("create");
    drop(f); // umount fails (busy) five times, then umount -l, then losetup -d (autoclear)
    assert!(
        !fs::read_to_string("/proc/self/mounts")
            .expect("mounts")
            .contains(&*mount.to_string_lossy()),
        "still mounted"
    );
    drop(open);
    // The kernel detaches the device once the lazily unmounted fs is released.
    let name = image.to_string_lossy().into_owned();
    for _ in 0..50 {
        let out = run(Command::new("losetup").arg("-a"));
        if !String::from_utf8_lossy(&out.stdout).contains(&name) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{name} still attached to a loop device 5 s after the last file was closed");
}

#[test]
fn immutable_file_counts_as_read_only() {
    if !require_root("chattr +i") {
        return;
    }
    let t = scratch();
    let p = t.path().join("file");
    fs::write(&p, b"x").expect("write");
    assert!(!is_read_only(&p));
    let chattr = run_status(Command::new("chattr").arg("+i").arg(&p));
    if !chattr.status.success() {
        // e.g. target/ on a filesystem without inode flags (tmpfs, overlayfs)
        skip_loudly(&format!(
            "chattr +i is unsupported here ({})",
            String::from_utf8_lossy(&chattr.stderr).trim()
        ));
        return;
    }
    let ro = is_read_only(&p);
    run(Command::new("chattr").arg("-i").arg(&p));
    assert!(ro, "immutable file not reported read-only");
}

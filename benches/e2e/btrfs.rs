//! The benchmark's btrfs filesystem: a loop device with quotas on, so both
//! tools write to the same kind of disc and the space each backup adds can be
//! read from qgroups.
//!
//! Space is measured per tool with a level-1 qgroup holding every subvolume
//! of that tool's store (`current`/the rsync target and all snapshots). Its
//! "referenced" bytes count each extent once however many snapshots share
//! it, so its growth across one run is what that run's new snapshot costs on
//! disc (equal to the snapshot's exclusive bytes once `current` moves on).

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::measure::run;

/// A mounted btrfs filesystem on a loop device; unmounted and detached on drop.
pub struct LoopFs {
    pub mount: PathBuf,
    /// Whether the loop device reads and writes its image with direct I/O
    /// (as it was asked to and the kernel agreed), not through the page cache.
    pub direct_io: bool,
    device: String,
    image: PathBuf,
}

impl LoopFs {
    /// A fresh filesystem in a sparse image of `size_gib` GiB under `dir`,
    /// mounted at `dir/mnt`, with quotas enabled.
    ///
    /// With `direct_io` the loop device bypasses the page cache of the file
    /// holding the image, as a real disc has no second cache below the
    /// filesystem. The default (buffered) copies every byte into and out of
    /// the image's page cache in the loop device's kernel threads: a quarter
    /// of all CPU samples of W2 over SSH on two cores, for whichever tool
    /// runs. `cp -a` plus `sync` of W2's 2 GiB took 5.3-5.8 s with direct
    /// I/O and 8.4-9.4 s buffered here; for many small files direct I/O is
    /// slower (W1: 15.4 against 11.5 s).
    pub fn new(dir: &Path, size_gib: u64, direct_io: bool) -> LoopFs {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let image = dir.join("btrfs.img");
        let mount = dir.join("mnt");
        // A previous run killed half-way may have left its mount behind.
        let _ = Command::new("umount").arg(&mount).output();
        let _ = fs::remove_file(&image);
        {
            let f =
                File::create(&image).unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
            f.set_len(size_gib << 30)
                .unwrap_or_else(|e| panic!("truncate {}: {e}", image.display()));
        }
        run(Command::new("mkfs.btrfs").arg("-q").arg("-f").arg(&image));
        let device = String::from_utf8_lossy(&run(Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(format!(
                "--direct-io={}",
                if direct_io { "on" } else { "off" }
            ))
            .arg(&image)))
        .trim()
        .to_string();
        let name = device.trim_start_matches("/dev/");
        let dio = fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap_or_default();
        let direct = dio.trim() == "1";
        if direct_io && !direct {
            eprintln!(
                "e2e: WARNING: {device} could not use direct I/O on {} (the filesystem holding \
                 it does not support it); it reads and writes through the page cache",
                image.display()
            );
        }
        let me = LoopFs {
            mount,
            direct_io: direct,
            device,
            image,
        };
        fs::create_dir_all(&me.mount).expect("mkdir mnt");
        run(Command::new("mount")
            .args(["-t", "btrfs", "-o", "user_subvol_rm_allowed"])
            .arg(&me.device)
            .arg(&me.mount));
        run(Command::new("btrfs")
            .args(["quota", "enable"])
            .arg(&me.mount));
        me
    }

    pub fn subvolume_create(&self, path: &Path) {
        run(Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(path));
    }

    /// Deletes every subvolume directly in `dir` (and `dir` itself if it is
    /// one), then the rest of `dir`, and waits until btrfs has freed the space.
    pub fn remove_tree(&self, dir: &Path) {
        if !dir.exists() {
            return;
        }
        let mut subvols = vec![];
        collect_subvolumes(dir, &mut subvols);
        // Deepest first: a subvolume holding others cannot go before them.
        subvols.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for s in &subvols {
            run(Command::new("btrfs")
                .args(["-q", "subvolume", "delete"])
                .arg(s));
        }
        if dir.exists() {
            fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("rm -r {}: {e}", dir.display()));
        }
        run(Command::new("btrfs")
            .args(["subvolume", "sync"])
            .arg(&self.mount));
    }

    /// The subvolume id of `path`.
    pub fn root_id(&self, path: &Path) -> u64 {
        let out = run(Command::new("btrfs")
            .args(["inspect-internal", "rootid"])
            .arg(path));
        String::from_utf8_lossy(&out)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("rootid of {}: {e}", path.display()))
    }

    pub fn qgroup_create(&self, group: &str) {
        run(Command::new("btrfs")
            .args(["qgroup", "create", group])
            .arg(&self.mount));
    }

    /// Puts every subvolume under `dir` not yet in `group` into it.
    pub fn qgroup_adopt(&self, dir: &Path, group: &str, known: &mut HashSet<u64>) {
        let mut subvols = vec![];
        collect_subvolumes(dir, &mut subvols);
        for s in subvols {
            let id = self.root_id(&s);
            if known.insert(id) {
                run(Command::new("btrfs")
                    .args(["qgroup", "assign", "--no-rescan"])
                    .arg(format!("0/{id}"))
                    .arg(group)
                    .arg(&self.mount));
            }
        }
    }

    /// Referenced bytes of `group` after a full rescan.
    pub fn qgroup_referenced(&self, group: &str) -> u64 {
        run(Command::new("btrfs")
            .args(["filesystem", "sync"])
            .arg(&self.mount));
        run(Command::new("btrfs")
            .args(["quota", "rescan", "-w"])
            .arg(&self.mount));
        let out = run(Command::new("btrfs")
            .args(["qgroup", "show", "--raw"])
            .arg(&self.mount));
        let text = String::from_utf8_lossy(&out);
        for line in text.lines() {
            let mut f = line.split_whitespace();
            if f.next() == Some(group) {
                if let Some(Ok(n)) = f.next().map(str::parse::<u64>) {
                    return n;
                }
            }
        }
        panic!("qgroup {group} not in `btrfs qgroup show` output:\n{text}");
    }
}

/// Subvolumes at or below `dir`, not descending into them (btrfs gives each
/// subvolume its own st_dev, and its root inode is 256).
fn collect_subvolumes(dir: &Path, out: &mut Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = fs::symlink_metadata(dir) else {
        return;
    };
    if !md.is_dir() {
        return;
    }
    if md.ino() == 256 {
        out.push(dir.to_path_buf());
    }
    // Nested subvolumes (byteback's snapshots sit in a plain directory next
    // to `current`), so keep looking one level down from every directory
    // that is not itself a subvolume, but never inside a subvolume's tree.
    if md.ino() == 256 {
        return;
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_subvolumes(&e.path(), out);
            }
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Processes that sshd started may take a moment to let go of it.
        let mut unmounted = false;
        for _ in 0..20 {
            match Command::new("umount").arg(&self.mount).output() {
                Ok(o) if o.status.success() => {
                    unmounted = true;
                    break;
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(500)),
            }
        }
        if !unmounted {
            eprintln!(
                "e2e: {} still busy after 10 s; detaching it lazily (umount -l)",
                self.mount.display()
            );
            let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
        let _ = fs::remove_file(&self.image);
    }
}

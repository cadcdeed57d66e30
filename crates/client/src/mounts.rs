//! Which mounted filesystems a backup walks into, as byteback 1.x decided.
//!
//! 1.x backed up every mounted filesystem of a local type under its sources
//! and left out the rest (`/proc`, `/sys`, `/dev`, `/run`, tmpfs, NFS, SMB,
//! FUSE, overlay, squashfs...). The walk asks [`Mounts::crossing`] at each
//! directory whose mount id (`statx` `STATX_MNT_ID`) differs from its
//! parent's. The mount table comes from `/proc/self/mountinfo` (read again
//! when a mount appears during the walk). Each filesystem is walked once: a
//! bind mount of a subtree whose filesystem is also mounted, at a root
//! holding that subtree, somewhere under the sources, or a second mount of
//! a filesystem already walked (same device and root inode), is sent as an
//! empty mount point, never entered, so nothing is backed up twice and
//! nothing loops. A bind mount whose files no such mount reaches is
//! walked where it is, as 1.x's rsync walked it, or they would be in no
//! backup. btrfs subvolumes
//! that are not mount points are ordinary directories to the walk (their
//! device differs, their mount does not), so they are always included.

use std::collections::{HashMap, HashSet};

/// Filesystem types backed up: those byteback 1.x counted as local (and
/// `ext`, `ext2`, `ext3`, `ext4` as they appear in mountinfo), and the
/// disc filesystems it left out without a word, which hold data no other
/// mount does: the EFI system partition (`vfat`), exFAT and NTFS
/// (kernel drivers) volumes, f2fs, bcachefs, HFS+. Read-only media and
/// images (iso9660, udf, squashfs, erofs), memory (tmpfs), kernel and
/// network filesystems are left out, noted at `--verbose`.
pub const LOCAL_TYPES: &[&str] = &[
    "btrfs", "ext2", "ext3", "ext4", "reiserfs", "xfs", "nilfs2", "jfs", "reiser4", "zfs",
    "rootfs", "vfat", "msdos", "exfat", "ntfs3", "ntfs", "f2fs", "bcachefs", "hfsplus",
];

/// Prefixes of filesystem types whose calls may wait on a server or a
/// daemon for ever (a hard NFS mount whose server is down, a hung FUSE
/// daemon): their mount points are `statx`ed from cached attributes only
/// and their xattrs are not read, so the walk never waits on them.
const MAY_HANG_TYPES: &[&str] = &[
    "nfs", "cifs", "smb", "fuse", "ceph", "9p", "afs", "gluster", "autofs", "davfs", "ncp", "coda",
    "lustre", "beegfs", "orangefs", "gpfs", "ocfs2", "gfs2", "sshfs", "virtiofs",
];

/// Whether `fstype` is one of [`MAY_HANG_TYPES`].
pub fn may_hang(fstype: &str) -> bool {
    MAY_HANG_TYPES.iter().any(|p| fstype.starts_with(p))
}

/// The mount points strictly below one of `sources` (absolute, normalised)
/// whose filesystem is of [`MAY_HANG_TYPES`] (NFS, SMB, FUSE...) or an
/// ecryptfs or overlay, with
/// their types, from `/proc/self/mountinfo` (none when it cannot be read).
pub fn network_mounts_below(sources: &[std::path::PathBuf]) -> Vec<(Vec<u8>, String)> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(text) = std::fs::read("/proc/self/mountinfo") else {
        return vec![];
    };
    let below = |point: &[u8]| {
        sources.iter().any(|s| {
            let s = s.as_os_str().as_bytes();
            let s = s.strip_suffix(b"/").unwrap_or(s);
            // Strictly below: a source's own filesystem is walked,
            // whatever its type (a container's `/` is an overlay).
            point
                .strip_prefix(s)
                .is_some_and(|r| r.len() > 1 && r[0] == b'/')
        })
    };
    // And the views 1.x's rsync backed up as files (an ecryptfs home's
    // plain text, an overlay's merged tree), which byteback never does.
    let views = |t: &str| t == "ecryptfs" || t == "overlay";
    let mut found: Vec<(Vec<u8>, String)> = parse_mountinfo(&text)
        .into_values()
        .filter(|m| may_hang(&m.fstype) || views(&m.fstype))
        .filter(|m| !m.fstype.starts_with("autofs") && below(&m.point))
        .map(|m| (m.point, m.fstype))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The btrfs inode number of a subvolume's root directory.
const BTRFS_SUBVOL_ROOT_INO: u64 = 256;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The id of the mount it is mounted on.
    pub parent: u64,
    /// The filesystem's device (`major:minor`), the same for every mount of it.
    pub dev: String,
    /// Root of the mount within its filesystem (`/` unless a bind mount or a btrfs `subvol=`).
    pub root: Vec<u8>,
    /// Mount point.
    pub point: Vec<u8>,
    /// Filesystem type.
    pub fstype: String,
}

/// Decodes mountinfo's octal escapes (`\040` for a space...).
fn unescape(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Parses mountinfo into mount id -> info; malformed lines are skipped.
/// Bytes, not text: a mount point may be named with any bytes (a user's
/// FUSE mount, a USB stick's label), and one that is not UTF-8 must not
/// lose the whole table (every other filesystem would then be left out).
pub fn parse_mountinfo(text: &[u8]) -> HashMap<u64, MountInfo> {
    let mut out = HashMap::new();
    let number = |f: Option<&&[u8]>| std::str::from_utf8(f?).ok()?.parse::<u64>().ok();
    for line in text.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        let (Some(id), Some(parent), Some(dev), Some(root), Some(point), Some(fstype)) = (
            number(fields.first()),
            number(fields.get(1)),
            fields.get(2),
            fields.get(3),
            fields.get(4),
            fields.get(sep + 1),
        ) else {
            continue;
        };
        out.insert(
            id,
            MountInfo {
                parent,
                dev: String::from_utf8_lossy(dev).into_owned(),
                root: unescape(root),
                point: unescape(point),
                fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
            },
        );
    }
    out
}

/// What the walk does at a mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crossing {
    /// Walk into it.
    Enter,
    /// Send the mount point only; the reason is shown with `--verbose`.
    Skip(String),
    /// As [`Crossing::Skip`], for a filesystem whose files the walk stores
    /// at another place (a bind mount, a second mount of one walked).
    Elsewhere(String),
    /// A mount the table does not name even when read again: what it is,
    /// and so whether it is to be backed up, is not known. Its content is
    /// kept as the last backup has it, with a warning. The mount's id.
    Unknown(u64),
}

/// The mount table and the filesystems already walked.
#[derive(Debug, Default)]
pub struct Mounts {
    table: HashMap<u64, MountInfo>,
    /// Mount points of [`MAY_HANG_TYPES`], with their types.
    may_hang: HashMap<Vec<u8>, String>,
    /// (device, inode) of the root of every filesystem the walk has entered.
    entered: HashSet<(u64, u64)>,
    /// Stay on the sources' own filesystems (`--one-file-system`).
    one_file_system: bool,
    /// The backup's sources (absolute paths).
    sources: Vec<Vec<u8>>,
}

/// The mount on top of mount `id`, at the same mount point (`id` itself
/// when nothing is mounted over it).
fn top_mount(table: &HashMap<u64, MountInfo>, mut id: u64) -> u64 {
    for _ in 0..table.len() {
        let point = &table[&id].point;
        match table
            .iter()
            .find(|(_, m)| m.parent == id && m.point == *point)
        {
            Some((&above, _)) => id = above,
            None => break,
        }
    }
    id
}

/// Whether `path` is `dir` or lies beneath it (whole components).
fn within(path: &[u8], dir: &[u8]) -> bool {
    let dir = if dir.len() > 1 {
        dir.strip_suffix(b"/").unwrap_or(dir)
    } else {
        dir
    };
    dir == b"/" || path == dir || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
}

impl Mounts {
    /// Reads the mount table, for a backup of `sources`.
    pub fn new(one_file_system: bool, sources: &[std::path::PathBuf]) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let mut m = Mounts {
            one_file_system,
            sources: sources
                .iter()
                .map(|s| s.as_os_str().as_bytes().to_vec())
                .collect(),
            ..Default::default()
        };
        m.reload();
        m
    }

    /// A table given as text, for a backup of `sources` (tests).
    pub fn from_text(text: &str, one_file_system: bool, sources: &[&str]) -> Self {
        Self::from_bytes(text.as_bytes(), one_file_system, sources)
    }

    /// [`Mounts::from_text`] of any bytes (tests).
    pub fn from_bytes(text: &[u8], one_file_system: bool, sources: &[&str]) -> Self {
        let mut m = Mounts {
            one_file_system,
            sources: sources.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..Default::default()
        };
        m.set_table(parse_mountinfo(text));
        m
    }

    fn set_table(&mut self, table: HashMap<u64, MountInfo>) {
        // What shows at a mount point is the mount on top of any others
        // there: a local filesystem an automount (autofs) has mounted, the
        // EFI partition at /boot/efi say, is walked, not the autofs below.
        self.may_hang = table
            .iter()
            .filter(|(_, i)| may_hang(&i.fstype))
            .map(|(&id, _)| &table[&top_mount(&table, id)])
            .filter(|i| may_hang(&i.fstype))
            .map(|i| (i.point.clone(), i.fstype.clone()))
            .collect();
        self.table = table;
    }

    /// The type of a filesystem that may hang (see [`MAY_HANG_TYPES`])
    /// mounted at `path` on top of any others there, if any.
    pub fn may_hang_at(&self, path: &[u8]) -> Option<&str> {
        self.may_hang.get(path).map(String::as_str)
    }

    /// The id of the mount on top at `path` (absolute), else of a mount of
    /// device `dev` (a path reached through a symlink is in no mount
    /// point's name), if any: for a kernel whose `statx` gives no mount
    /// ids (Linux before 5.8). None: a btrfs subvolume (a device of its
    /// own, not mounted).
    pub fn top_at(&mut self, path: &[u8], dev: u64) -> Option<u64> {
        let dev = format!(
            "{}:{}",
            rustix::fs::major(dev as rustix::fs::Dev),
            rustix::fs::minor(dev as rustix::fs::Dev)
        );
        let find = |t: &HashMap<u64, MountInfo>| {
            let by_path = t.iter().find(|(_, m)| m.point == path);
            let by_dev = || {
                let mut of_dev: Vec<_> = t.iter().filter(|(_, m)| m.dev == dev).collect();
                // The whole filesystem's mount first, then by id.
                of_dev.sort_by_key(|(&id, m)| (m.root != b"/", id));
                of_dev.first().copied()
            };
            let (&id, _) = by_path.or_else(by_dev)?;
            Some(top_mount(t, id))
        };
        find(&self.table).or_else(|| {
            self.reload();
            find(&self.table)
        })
    }

    fn reload(&mut self) {
        if let Ok(text) = std::fs::read("/proc/self/mountinfo") {
            self.set_table(parse_mountinfo(&text));
        }
    }

    /// Records the root of a source: walked, so a later mount of the same
    /// directory is not walked again.
    pub fn source_root(&mut self, dev_ino: (u64, u64)) {
        self.entered.insert(dev_ino);
    }

    /// Decides for directory `shown`, whose mount id `mnt_id` differs from
    /// its parent's, and whose root is `dev_ino`.
    pub fn crossing(&mut self, mnt_id: u64, dev_ino: (u64, u64), shown: &str) -> Crossing {
        self.crossing_unless(mnt_id, dev_ino, false, shown, &|_, _| false)
    }

    /// [`Mounts::crossing`], where `excluded(path, source)` says whether the
    /// walk of `source` leaves out the directory at `path` (absolute): a
    /// bind mount's files are reached elsewhere only where that place is
    /// not left out.
    ///
    /// `same_dev`: its device is its parent's (a bind mount of the same
    /// filesystem), which `--one-file-system` enters, as `rsync -x` does.
    pub fn crossing_unless(
        &mut self,
        mnt_id: u64,
        dev_ino: (u64, u64),
        same_dev: bool,
        shown: &str,
        excluded: &dyn Fn(&[u8], &[u8]) -> bool,
    ) -> Crossing {
        if self.one_file_system && !same_dev {
            return Crossing::Skip(format!(
                "{shown}: another filesystem, not entered (--one-file-system)"
            ));
        }
        if !self.table.contains_key(&mnt_id) {
            self.reload();
        }
        let Some(info) = self.table.get(&mnt_id) else {
            return Crossing::Unknown(mnt_id);
        };
        if !LOCAL_TYPES.contains(&info.fstype.as_str()) {
            return Crossing::Skip(format!(
                "{shown}: {} is not a local filesystem type; not backed up",
                byteback_protocol::escape_text(&info.fstype)
            ));
        }
        let subvol_root = info.fstype == "btrfs" && dev_ino.1 == BTRFS_SUBVOL_ROOT_INO;
        // A filesystem mounted beneath it and nowhere else the walk goes
        // would be in no backup if it were left out: it is walked (its
        // own files stored twice), as 1.x's rsync walked everything.
        let beneath = self.only_beneath(mnt_id, excluded);
        if info.root != b"/" && !subvol_root {
            if let Some(at) = self.covering(info, excluded).filter(|_| beneath.is_none()) {
                return Crossing::Elsewhere(format!(
                    "{shown}: a bind mount of {} of its filesystem, whose files are backed up at {}",
                    byteback_protocol::escape_bytes(&info.root),
                    byteback_protocol::escape_bytes(&at)
                ));
            }
            // Mounted nowhere else under the sources: backed up here, as
            // 1.x's rsync did, or it would be in no backup at all.
        }
        if !self.entered.insert(dev_ino) && beneath.is_none() {
            return Crossing::Elsewhere(format!(
                "{shown}: this filesystem is mounted more than once; backed up once"
            ));
        }
        Crossing::Enter
    }
}

impl Mounts {
    /// Where the walk reaches the files of the bind mount `bind` (of a
    /// subtree) through another mount of the same filesystem, if it does:
    /// a mount whose root strictly holds `bind`'s root (so two bind mounts
    /// of one subtree never leave each other out), through which that
    /// subtree shows at a path within a source, not hidden by a mount
    /// above it there (`bind` itself included), nor by one stacked on it.
    fn covering(
        &self,
        bind: &MountInfo,
        excluded: &dyn Fn(&[u8], &[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        self.shown_elsewhere(bind, &|_, m| m.root != bind.root, excluded)
    }

    /// Where the walk reaches the files of mount `bind` through another
    /// mount of its filesystem that holds them, one `other(id, mount)`
    /// allows: see [`Mounts::covering`].
    fn shown_elsewhere(
        &self,
        bind: &MountInfo,
        other: &dyn Fn(u64, &MountInfo) -> bool,
        excluded: &dyn Fn(&[u8], &[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        self.table
            .iter()
            .filter(|(&id, m)| m.dev == bind.dev && within(&bind.root, &m.root) && other(id, m))
            .filter(|(id, m)| {
                !self
                    .table
                    .values()
                    .any(|o| o.parent == **id && o.point == m.point)
            })
            .filter(|(id, _)| self.walked_down_to(**id))
            .map(|(_, m)| (m, shows_at(m, &bind.root)))
            .find(|(m, at)| {
                self.sources
                    .iter()
                    .find(|s| within(at, s))
                    .is_some_and(|s| !excluded(at, s))
                    && !self.table.values().any(|o| {
                        o.point != m.point && within(&o.point, &m.point) && within(at, &o.point)
                    })
            })
            .map(|(_, at)| at)
    }

    /// The mount point of a filesystem mounted beneath mount `id` (on a
    /// directory of it, or of a mount on it, every one on the way of a
    /// type the walk enters) whose files the walk reaches nowhere else
    /// (see [`Mounts::covering`]): such a mount is seen only through `id`.
    fn only_beneath(&self, id: u64, excluded: &dyn Fn(&[u8], &[u8]) -> bool) -> Option<Vec<u8>> {
        let id_dev = self.table.get(&id).map(|m| m.dev.as_str());
        let enters = |m: &MountInfo| {
            LOCAL_TYPES.contains(&m.fstype.as_str())
                && !may_hang(&m.fstype)
                && (!self.one_file_system || Some(m.dev.as_str()) == id_dev)
        };
        // Whether mount `at` is beneath `id` through mounts the walk enters.
        let reached = |mut at: u64| {
            for _ in 0..self.table.len() {
                let Some(m) = self.table.get(&at) else {
                    return false;
                };
                if !enters(m) || m.parent == at {
                    return false;
                }
                if m.parent == id {
                    return true;
                }
                at = m.parent;
            }
            false
        };
        let beneath = |mut at: u64| {
            for _ in 0..self.table.len() {
                match self.table.get(&at) {
                    Some(m) if m.parent == id => return true,
                    Some(m) if m.parent != at => at = m.parent,
                    _ => return false,
                }
            }
            false
        };
        // Walked where it is mounted: nothing on top of it, not left out
        // by the rules.
        let walked = |n: u64, m: &MountInfo| {
            top_mount(&self.table, n) == n
                && self
                    .sources
                    .iter()
                    .find(|s| within(&m.point, s))
                    .is_some_and(|s| !excluded(&m.point, s))
        };
        self.table
            .iter()
            .filter(|(&n, m)| n != id && reached(n) && walked(n, m))
            .find(|(&n, m)| {
                let other = |o: u64, _: &MountInfo| o != n && o != id && !beneath(o);
                self.shown_elsewhere(m, &other, excluded).is_none()
            })
            .map(|(_, m)| m.point.clone())
    }

    /// Whether the walk reaches mount `id` from the sources: every mount
    /// it is mounted on, within a source, is one the walk enters (a local
    /// type that cannot hang), and no mount outside that chain hides it
    /// (one mounted over a directory above it, after it).
    fn walked_down_to(&self, id: u64) -> bool {
        let mut chain = vec![id];
        let mut at = id;
        while let Some(m) = self.table.get(&at) {
            if m.parent == at
                || chain.len() > self.table.len()
                || !self.table.contains_key(&m.parent)
            {
                break;
            }
            at = m.parent;
            chain.push(at);
        }
        let Some(m) = self.table.get(&id) else {
            return false;
        };
        // Each one the walk crosses into must be of a type it enters. Those
        // it is mounted on must be entered too, whatever the order of the
        // walk: not a bind mount of a subtree (a btrfs subvolume's mount
        // has a root of its own), and the only mount of that filesystem
        // root (of two, the walk enters the one it meets first, and what is
        // mounted on the other is never walked). The mount itself may be
        // either of two: both show the same files.
        let entered = chain
            .iter()
            .filter_map(|i| self.table.get(i))
            .enumerate()
            .all(|(k, c)| {
                let crossed = self
                    .sources
                    .iter()
                    .any(|s| within(&c.point, s) && c.point != *s);
                let whole = c.root == b"/" || c.fstype == "btrfs";
                let once = self
                    .table
                    .values()
                    .filter(|o| o.dev == c.dev && o.root == c.root)
                    .count()
                    == 1;
                !crossed
                    || (LOCAL_TYPES.contains(&c.fstype.as_str())
                        && !may_hang(&c.fstype)
                        && (k == 0 || (whole && once)))
            });
        let hidden = self.table.iter().any(|(oid, o)| {
            !chain.contains(oid)
                && o.point != m.point
                && within(&m.point, &o.point)
                && chain.contains(&o.parent)
        });
        entered && !hidden
    }
}

/// The path at which `root` (a path within `m`'s filesystem, beneath
/// `m.root`) shows through mount `m`.
fn shows_at(m: &MountInfo, root: &[u8]) -> Vec<u8> {
    let rest = if m.root == b"/" {
        root
    } else {
        &root[m.root.len()..]
    };
    let mut at = m.point.clone();
    if at.last() == Some(&b'/') && rest.first() == Some(&b'/') {
        at.pop();
    }
    at.extend_from_slice(rest);
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw
24 22 8:2 / /home rw shared:2 - xfs /dev/sda2 rw
25 22 0:30 / /tmp rw shared:3 - tmpfs tmpfs rw
26 22 8:1 /srv/data /mnt/data rw shared:1 - ext4 /dev/sda1 rw
27 22 0:40 /@var /var rw shared:4 - btrfs /dev/sdb rw,subvol=/@var
28 22 0:41 / /mnt/my\\040disk rw - ext4 /dev/sdc rw
29 22 0:42 / /net rw - nfs4 server:/ rw
30 22 8:2 / /mnt/home-again rw shared:2 - xfs /dev/sda2 rw
";

    #[test]
    fn parses_mountinfo() {
        let t = parse_mountinfo(TABLE.as_bytes());
        assert_eq!(t.len(), 9);
        assert_eq!(t[&26].root, b"/srv/data");
        assert_eq!(t[&28].point, b"/mnt/my disk");
        assert_eq!(t[&27].fstype, "btrfs");
        // A mount point whose name is not UTF-8 (a user's FUSE mount, a
        // USB stick's label) is one line among the others: the whole
        // table once failed to read, and every mount below the sources
        // was then passed over.
        let mut odd = TABLE.as_bytes().to_vec();
        odd.extend_from_slice(b"60 22 0:70 / /media/ann/\xff\x1b\\040x rw - fuse.\xff u rw\n");
        let t = parse_mountinfo(&odd);
        assert_eq!(t.len(), 10);
        assert_eq!(t[&60].point, b"/media/ann/\xff\x1b x");
        assert_eq!(t[&60].fstype, "fuse.\u{fffd}");
        assert_eq!(t[&24].point, b"/home");
    }

    #[test]
    fn mount_points_that_may_hang_are_known_by_path() {
        let m = Mounts::from_text(TABLE, false, &["/"]);
        assert_eq!(m.may_hang_at(b"/net"), Some("nfs4"));
        assert_eq!(m.may_hang_at(b"/tmp"), None);
        assert_eq!(m.may_hang_at(b"/home"), None);
        assert!(may_hang("fuse.sshfs") && may_hang("cifs") && !may_hang("tmpfs"));
        // An automount: autofs alone is not entered; once it has mounted
        // a local filesystem on top, that filesystem is what shows there.
        let auto = format!("{TABLE}41 22 0:50 / /boot/efi rw - autofs systemd-1 rw\n");
        let m = Mounts::from_text(&auto, false, &["/"]);
        assert_eq!(m.may_hang_at(b"/boot/efi"), Some("autofs"));
        let mounted = format!("{auto}42 41 8:3 / /boot/efi rw - vfat /dev/sda3 rw\n");
        let m = Mounts::from_text(&mounted, false, &["/"]);
        assert_eq!(m.may_hang_at(b"/boot/efi"), None);
        // An NFS share an automount mounted may hang as any other.
        let nfs = format!("{auto}43 41 0:51 / /boot/efi rw - nfs4 srv:/x rw\n");
        let mut m = Mounts::from_text(&nfs, false, &["/"]);
        assert_eq!(m.may_hang_at(b"/boot/efi"), Some("nfs4"));
        // Without mount ids from statx, the mount is found by its point.
        assert_eq!(m.top_at(b"/boot/efi", 0), Some(43));
        let sda2 = rustix::fs::makedev(8, 2);
        assert_eq!(m.top_at(b"/home", sda2), Some(24));
        // Through a symlink: found by its device.
        assert_eq!(m.top_at(b"/data/home", sda2), Some(24));
        assert_eq!(m.top_at(b"/home/ann", rustix::fs::makedev(0, 99)), None);
    }

    /// Asserts `c` passes over the mount for a reason saying `needle`, as
    /// stored elsewhere where that is the reason (a bind or second mount).
    fn skipped(c: Crossing, needle: &str) {
        let elsewhere = ["bind mount", "more than once", "backed up at"]
            .iter()
            .any(|n| needle.starts_with(n));
        match c {
            Crossing::Skip(why) if !elsewhere => assert!(why.contains(needle), "{why}"),
            Crossing::Elsewhere(why) if elsewhere => assert!(why.contains(needle), "{why}"),
            c => panic!("{c:?}; expected {needle}"),
        }
    }

    #[test]
    fn crosses_into_local_filesystems_once() {
        let mut m = Mounts::from_text(TABLE, false, &["/"]);
        m.source_root((0x801, 2));
        assert_eq!(m.crossing(24, (0x802, 128), "/home"), Crossing::Enter);
        skipped(m.crossing(23, (3, 1), "/proc"), "not a local");
        skipped(m.crossing(25, (4, 1), "/tmp"), "not a local");
        skipped(m.crossing(29, (5, 1), "/net"), "not a local");
        skipped(m.crossing(26, (0x801, 77), "/mnt/data"), "bind mount");
        skipped(
            m.crossing(30, (0x802, 128), "/mnt/home-again"),
            "more than once",
        );
        // A btrfs subvol= mount has a root other than / but is no bind mount.
        assert_eq!(m.crossing(27, (44, 256), "/var"), Crossing::Enter);
        assert_eq!(m.crossing(28, (45, 2), "/mnt/my disk"), Crossing::Enter);
        // The EFI system partition, which 1.x left out.
        let efi = format!("{TABLE}40 22 8:3 / /boot/efi rw - vfat /dev/sda3 rw\n");
        let mut m3 = Mounts::from_text(&efi, false, &["/"]);
        assert_eq!(m3.crossing(40, (0x803, 1), "/boot/efi"), Crossing::Enter);
        // Unknown mounts are not entered (after a reload finds nothing).
        let mut m2 = Mounts::from_text(TABLE, false, &["/"]);
        m2.table.clear();
        assert_eq!(
            m2.crossing(999_999, (9, 9), "/x"),
            Crossing::Unknown(999_999)
        );
    }

    #[test]
    fn one_file_system_enters_nothing() {
        let mut m = Mounts::from_text(TABLE, true, &["/"]);
        assert!(matches!(
            m.crossing(24, (0x802, 128), "/home"),
            Crossing::Skip(_)
        ));
    }

    /// A bind mount of a subtree is left out only where a mount of its
    /// filesystem that holds the subtree is under the sources; otherwise
    /// its files would be in no backup, so it is walked.
    #[test]
    fn a_bind_mount_is_walked_where_nothing_else_reaches_its_files() {
        let table = format!(
            "{TABLE}31 22 8:5 /export/www /var/www rw - ext4 /dev/sda5 rw\n\
             32 22 8:6 / /mnt/six rw - ext4 /dev/sda6 rw\n\
             33 22 8:6 /a/b /srv/b rw - ext4 /dev/sda6 rw\n"
        );
        let mut m = Mounts::from_text(&table, false, &["/"]);
        // sda5 is mounted only as this bind mount.
        assert_eq!(m.crossing(31, (0x805, 9), "/var/www"), Crossing::Enter);
        // sda6's root is mounted at /mnt/six, under the source.
        skipped(
            m.crossing(33, (0x806, 7), "/srv/b"),
            "backed up at /mnt/six/a/b",
        );
        // With /srv as the only source, /mnt/six is not backed up: /srv/b is.
        let mut m = Mounts::from_text(&table, false, &["/srv"]);
        assert_eq!(m.crossing(33, (0x806, 7), "/srv/b"), Crossing::Enter);
        // The same for the bind mount of / 's filesystem at /mnt/data.
        let mut m = Mounts::from_text(&table, false, &["/mnt/", "/var/www"]);
        assert_eq!(m.crossing(26, (0x801, 77), "/mnt/data"), Crossing::Enter);
        assert!(within(b"/mnt/data", b"/mnt/") && !within(b"/mntx", b"/mnt"));
    }

    /// A bind mount's files are reached elsewhere only where they show
    /// within a source, through a mount nothing hides.
    #[test]
    fn a_bind_mount_is_left_out_only_where_its_files_show_within_a_source() {
        let table = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
50 22 8:1 /home/ann/data /home/bob/shared rw - ext4 /dev/sda1 rw
51 22 8:1 /home/ann/data /srv/again rw - ext4 /dev/sda1 rw
";
        // Sources /home: the files are walked at /home/ann/data, once.
        let mut m = Mounts::from_text(table, false, &["/home"]);
        skipped(
            m.crossing(50, (0x801, 9), "/home/bob/shared"),
            "backed up at /home/ann/data",
        );
        // Two bind mounts of one subtree, and the subtree itself outside
        // the sources: the first is walked, the second is the same inode.
        let mut m = Mounts::from_text(table, false, &["/home/bob", "/srv"]);
        assert_eq!(
            m.crossing(50, (0x801, 9), "/home/bob/shared"),
            Crossing::Enter
        );
        skipped(m.crossing(51, (0x801, 9), "/srv/again"), "more than once");
        // A filesystem mounted over /home hides the root's /home: the
        // bind mount is walked.
        let hidden = format!("{table}60 22 8:2 / /home rw - xfs /dev/sda2 rw\n");
        let mut m = Mounts::from_text(&hidden, false, &["/"]);
        assert_eq!(m.crossing(51, (0x801, 9), "/srv/again"), Crossing::Enter);
        // So does one stacked on the root mount's own point.
        let stacked = format!("{table}61 22 8:3 / / rw - ext4 /dev/sda3 rw\n");
        let mut m = Mounts::from_text(&stacked, false, &["/"]);
        assert_eq!(m.crossing(51, (0x801, 9), "/srv/again"), Crossing::Enter);
        assert_eq!(
            shows_at(&m.table[&22], b"/home/ann/data"),
            b"/home/ann/data"
        );
    }

    /// Where the other mount shows the files is left out by the excludes:
    /// the bind mount is walked, or they would be in neither place.
    #[test]
    fn a_bind_mount_is_walked_where_its_files_show_only_in_an_excluded_place() {
        let table = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
50 22 8:1 /srv/data /var/www rw - ext4 /dev/sda1 rw
";
        let mut m = Mounts::from_text(table, false, &["/"]);
        let excluded = |p: &[u8], _: &[u8]| p.starts_with(b"/srv");
        assert_eq!(
            m.crossing_unless(50, (0x801, 9), false, "/var/www", &excluded),
            Crossing::Enter
        );
        let mut m = Mounts::from_text(table, false, &["/"]);
        assert!(matches!(
            m.crossing_unless(50, (0x801, 9), false, "/var/www", &|_, _| false),
            Crossing::Elsewhere(_)
        ));
    }

    /// A filesystem mounted beneath a bind mount (private propagation: it
    /// shows nowhere else) or beneath a second mount of a filesystem is
    /// walked through it, or it would be in no backup; where it shows
    /// elsewhere too (shared propagation), the bind mount is left out.
    #[test]
    fn a_filesystem_mounted_only_beneath_a_mount_left_out_is_walked() {
        let table = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
50 22 8:1 /data/www /srv/www rw - ext4 /dev/sda1 rw
51 50 7:0 / /srv/www/uploads rw - ext4 /dev/loop0 rw
60 22 7:1 / /t/disk rw - ext4 /dev/loop1 rw
61 22 7:1 / /t/disk2 rw - ext4 /dev/loop1 rw
62 61 7:2 / /t/disk2/inner rw - ext4 /dev/loop2 rw
";
        let mut m = Mounts::from_text(table, false, &["/"]);
        m.source_root((0x801, 2));
        assert_eq!(m.crossing(50, (0x801, 9), "/srv/www"), Crossing::Enter);
        assert_eq!(m.crossing(60, (0x701, 2), "/t/disk"), Crossing::Enter);
        assert_eq!(m.crossing(61, (0x701, 2), "/t/disk2"), Crossing::Enter);
        // Shared: the same filesystem also shows at /data/www/uploads.
        let shared = format!("{table}52 22 7:0 / /data/www/uploads rw - ext4 /dev/loop0 rw\n");
        let mut m = Mounts::from_text(&shared, false, &["/"]);
        assert!(matches!(
            m.crossing(50, (0x801, 9), "/srv/www"),
            Crossing::Elsewhere(why) if why.contains("backed up at /data/www")
        ));
        // The other mount of the filesystem beneath is outside the
        // sources, or excluded: the bind mount is walked.
        let outside = format!("{table}52 22 7:0 / /mnt/x rw - ext4 /dev/loop0 rw\n");
        let mut m = Mounts::from_text(&outside, false, &["/srv", "/data"]);
        assert_eq!(m.crossing(50, (0x801, 9), "/srv/www"), Crossing::Enter);
        let mut m = Mounts::from_text(&outside, false, &["/"]);
        let excluded = |p: &[u8], _: &[u8]| p.starts_with(b"/mnt");
        assert_eq!(
            m.crossing_unless(50, (0x801, 9), false, "/srv/www", &excluded),
            Crossing::Enter
        );
        // A tmpfs between the bind mount and the filesystem: the walk does
        // not reach it through the bind mount, which is left out.
        let tmpfs = table.replace(
            "51 50 7:0 / /srv/www/uploads",
            "53 50 0:9 / /srv/www/t rw - tmpfs tmpfs rw\n51 53 7:0 / /srv/www/t/uploads",
        );
        let mut m = Mounts::from_text(&tmpfs, false, &["/"]);
        assert!(matches!(
            m.crossing(50, (0x801, 9), "/srv/www"),
            Crossing::Elsewhere(why) if why.contains("backed up at /data/www")
        ));
        // Nothing local beneath the second mount: it is left out.
        let plain = table.replace(
            "62 61 7:2 / /t/disk2/inner rw - ext4",
            "62 61 0:9 / /t/disk2/inner rw - tmpfs",
        );
        let mut m = Mounts::from_text(&plain, false, &["/"]);
        assert_eq!(m.crossing(60, (0x701, 2), "/t/disk"), Crossing::Enter);
        assert!(matches!(
            m.crossing(61, (0x701, 2), "/t/disk2"),
            Crossing::Elsewhere(why) if why.contains("more than once")
        ));
    }

    /// `--one-file-system` enters a bind mount of the filesystem it is on
    /// (the same device, as `rsync -x` compares), not another filesystem;
    /// a bind mount covered elsewhere stays left out for a filesystem
    /// beneath it that `-x`, the rules or a mount on top keep the walk from.
    #[test]
    fn one_file_system_enters_a_bind_mount_of_the_same_filesystem() {
        let beneath = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
50 22 8:1 /data/www /srv/www rw - ext4 /dev/sda1 rw
51 50 7:0 / /srv/www/uploads rw - ext4 /dev/loop0 rw
";
        let covered =
            |c: Crossing| matches!(c, Crossing::Elsewhere(why) if why.contains("backed up at"));
        let mut m = Mounts::from_text(beneath, true, &["/"]);
        assert!(covered(m.crossing_unless(
            50,
            (0x801, 9),
            true,
            "/srv/www",
            &|_, _| false
        )));
        let mut m = Mounts::from_text(beneath, false, &["/"]);
        let excluded = |p: &[u8], _: &[u8]| p == b"/srv/www/uploads";
        assert!(covered(m.crossing_unless(
            50,
            (0x801, 9),
            false,
            "/srv/www",
            &excluded
        )));
        let stacked = format!("{beneath}52 51 0:9 / /srv/www/uploads rw - tmpfs tmpfs rw\n");
        let mut m = Mounts::from_text(&stacked, false, &["/"]);
        assert!(covered(m.crossing(50, (0x801, 9), "/srv/www")));
        let table = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
50 22 8:1 /outside/www /srv/www rw - ext4 /dev/sda1 rw
";
        let mut m = Mounts::from_text(table, true, &["/srv"]);
        assert_eq!(
            m.crossing_unless(50, (0x801, 9), true, "/srv/www", &|_, _| false),
            Crossing::Enter
        );
        assert!(matches!(
            m.crossing_unless(50, (0x801, 9), false, "/srv/www", &|_, _| false),
            Crossing::Skip(why) if why.contains("--one-file-system")
        ));
    }

    /// A mount that would show a bind mount's files counts only if the
    /// walk reaches it: not below a mount it does not enter (a tmpfs),
    /// nor under one mounted over a directory above it.
    #[test]
    fn a_bind_mount_is_walked_where_the_other_mount_is_out_of_the_walks_reach() {
        let under_tmpfs = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
25 22 0:30 / /run rw - tmpfs tmpfs rw
70 25 8:9 / /run/media/ann/disk rw - ext4 /dev/sdb1 rw
71 22 8:9 /photos /home/ann/photos rw - ext4 /dev/sdb1 rw
";
        let mut m = Mounts::from_text(under_tmpfs, false, &["/"]);
        assert_eq!(
            m.crossing(71, (0x809, 12), "/home/ann/photos"),
            Crossing::Enter
        );
        let hidden = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
80 22 8:9 / /mnt/disk rw - ext4 /dev/sdb1 rw
81 22 0:50 / /mnt rw - ext4 /dev/sdc1 rw
82 22 8:9 /photos /home/photos rw - ext4 /dev/sdb1 rw
";
        let mut m = Mounts::from_text(hidden, false, &["/"]);
        assert_eq!(m.crossing(82, (0x809, 12), "/home/photos"), Crossing::Enter);
        // On a bind mount the walk leaves out, or on a second mount of one
        // filesystem (which of the two the walk enters depends on its
        // order): not reached for sure, so walked.
        let on_skipped = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
90 22 8:1 /data/www /srv/www rw - ext4 /dev/sda1 rw
91 90 8:9 / /srv/www/uploads rw - ext4 /dev/sdb1 rw
92 22 8:9 /pics /home/pics rw - ext4 /dev/sdb1 rw
";
        let mut m = Mounts::from_text(on_skipped, false, &["/"]);
        assert_eq!(m.crossing(92, (0x809, 12), "/home/pics"), Crossing::Enter);
        let twice = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
80 22 8:9 / /mnt/disk rw - ext4 /dev/sdb1 rw
83 22 8:9 / /mnt/again rw - ext4 /dev/sdb1 rw
84 80 8:10 / /mnt/disk/inner rw - ext4 /dev/sdc1 rw
85 22 8:10 /photos /home/photos rw - ext4 /dev/sdc1 rw
";
        let mut m = Mounts::from_text(twice, false, &["/"]);
        assert_eq!(m.crossing(85, (0x80a, 12), "/home/photos"), Crossing::Enter);
        // The covering mount itself mounted twice: either shows the files.
        let m_twice = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
80 22 8:9 / /mnt/disk rw - ext4 /dev/sdb1 rw
83 22 8:9 / /mnt/again rw - ext4 /dev/sdb1 rw
82 22 8:9 /photos /home/photos rw - ext4 /dev/sdb1 rw
";
        let mut m = Mounts::from_text(m_twice, false, &["/"]);
        assert!(matches!(
            m.crossing(82, (0x809, 12), "/home/photos"),
            Crossing::Elsewhere(_)
        ));
        // Reached: left out, named where.
        let reached = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
80 22 8:9 / /mnt/disk rw - ext4 /dev/sdb1 rw
82 22 8:9 /photos /home/photos rw - ext4 /dev/sdb1 rw
";
        let mut m = Mounts::from_text(reached, false, &["/"]);
        match m.crossing(82, (0x809, 12), "/home/photos") {
            Crossing::Elsewhere(why) => {
                assert!(why.contains("backed up at /mnt/disk/photos"), "{why}")
            }
            c => panic!("walked twice: {c:?}"),
        }
    }
}

//! Snapshots written by byteback 1.x: rsync `--fake-super` trees without a manifest.
//!
//! 1.x ran `rsync --archive --numeric-ids --relative ... --rsync-path 'rsync
//! --fake-super'` into `<host>/current`, so the store's own inodes are owned
//! by the backup user and what the client had is kept in xattrs:
//!
//! - `user.rsync.%stat` = `"<mode> <major>,<minor> <uid>:<gid>"` (mode in
//!   octal with its file type bits, the rest decimal), absent when the stored
//!   inode's own mode, owner and device number were already right;
//! - devices, FIFOs, sockets and symlinks are stored as regular files (a
//!   symlink's target is the file's content); directories stay directories;
//! - with `--xattrs`, a `user.*` xattr is stored as itself and any other
//!   (`security.*`, `trusted.*`, ...) as `user.rsync.<name>`;
//! - with `--hard-links`, hard links are hard links in the store too.
//!
//! [`LegacyWalk`] turns such a tree into the manifest entries byteback sends
//! for a snapshot of its own, in walk order (parents first, siblings sorted
//! bytewise), so the client's strict checks apply unchanged. The tree was
//! written by the client's rsync, so it is read as hostile: every directory
//! is opened beneath its parent's fd with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, files are opened `O_NOFOLLOW`, a symlink stored as
//! a symlink is read with `readlinkat` and never followed, and the xattrs
//! are parsed strictly with every length capped. An entry that cannot be
//! read as 1.x wrote it (a `user.rsync.%stat` that does not parse, or that
//! contradicts the stored inode, a device number Linux cannot make, an
//! unreadable object) is left out, with everything below it, and named in a
//! [`Note`] as the walk comes to it ([`Walked::Skipped`]); so is what an entry loses (xattrs beyond byteback's limits,
//! rsync's ACLs, which are not restored as ACLs, only read to narrow the mode). The client restoring such a path
//! warns and ends partial.
//! 1.x kept no checksums: entries carry a zero hash, and the client restores
//! their files unverified (and says so).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use byteback_protocol::limits::{
    MAX_PATH, MAX_TEXT, MAX_XATTRS, MAX_XATTR_NAME, MAX_XATTR_TOTAL, MAX_XATTR_VALUE,
};
use byteback_protocol::os::xattr::{xattr_names, xattr_value, XattrOf, XATTR_KERNEL_MAX};
use byteback_protocol::{escape_bytes, xattr_keep_order, Entry, Kind, ManifestEntry};
use rustix::fs::{FileType, Mode, OFlags};

use crate::error::{Error, IoContext, Result};
use crate::fsops;
use crate::store::META_DIR;

/// The xattr rsync `--fake-super` keeps the real mode, device and owner in.
pub const STAT_XATTR: &[u8] = b"user.rsync.%stat";
/// Prefix of the names rsync `--fake-super` gives xattrs outside `user.*`.
const RSYNC_PREFIX: &[u8] = b"user.rsync.";
/// rsync's access ACL (`-A` with `--fake-super`), in rsync's own format.
const AACL_XATTR: &[u8] = b"user.rsync.%aacl";
/// rsync's default ACL.
const DACL_XATTR: &[u8] = b"user.rsync.%dacl";
/// Largest device major number Linux makes (12 bits).
const MAX_MAJOR: u32 = (1 << 12) - 1;
/// Largest device minor number Linux makes (20 bits).
const MAX_MINOR: u32 = (1 << 20) - 1;
/// Longest `user.rsync.%stat` value accepted (rsync writes at most ~45 bytes).
const MAX_STAT_LEN: usize = 64;
/// Most entries of one directory held (sorted) while it is walked.
pub const MAX_DIR_ENTRIES: usize = 4 << 20;
/// Most bytes of names of one directory held while it is walked.
const MAX_DIR_NAME_BYTES: usize = 256 << 20;
/// Most multiply-linked files remembered (for hard links) in one snapshot.
pub const MAX_LINKED: usize = 4 << 20;

/// Whether the snapshot (or `current`) open at `snap` was written by 1.x:
/// it has no `.byteback` directory at its top.
pub fn is_legacy(snap: impl AsFd) -> io::Result<bool> {
    Ok(fsops::lstat_at(snap, META_DIR)?.is_none())
}

/// What `user.rsync.%stat` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeStat {
    /// Full mode, file type bits included.
    pub mode: u32,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Parses a `user.rsync.%stat` value strictly: `<octal mode> <major>,<minor>
/// <uid>:<gid>`, single spaces, digits only, every number within 32 bits,
/// the mode a known file type plus permission bits.
pub fn parse_fake_stat(v: &[u8]) -> std::result::Result<FakeStat, String> {
    if v.len() > MAX_STAT_LEN {
        return Err(format!("{} bytes long", v.len()));
    }
    let s = std::str::from_utf8(v).map_err(|_| "not ASCII".to_string())?;
    let num = |t: &str, radix: u32, what: &str| -> std::result::Result<u32, String> {
        if t.is_empty() || t.len() > 11 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("bad {what} {t:?}"));
        }
        u32::from_str_radix(t, radix).map_err(|_| format!("bad {what} {t:?}"))
    };
    let mut parts = s.split(' ');
    let (Some(mode), Some(dev), Some(owner), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not three space-separated fields".into());
    };
    let (Some((major, minor)), Some((uid, gid))) = (dev.split_once(','), owner.split_once(':'))
    else {
        return Err("not <mode> <major>,<minor> <uid>:<gid>".into());
    };
    let mode = num(mode, 8, "mode")?;
    if mode & !0o177777 != 0 {
        return Err(format!("mode {mode:o} has unknown bits"));
    }
    let t = mode & 0o170000;
    if ![
        0o100000, 0o040000, 0o120000, 0o010000, 0o140000, 0o020000, 0o060000,
    ]
    .contains(&t)
    {
        return Err(format!("mode {mode:o} is of no known file type"));
    }
    // (uid_t)-1 is no owner Linux gives a file (only a damaged store has
    // it): to `fchown` it means "leave as it is", so it could not be
    // restored as stored.
    let id = |t: &str, what: &str| match num(t, 10, what)? {
        u32::MAX => Err(format!("{what} {t} is no owner")),
        v => Ok(v),
    };
    Ok(FakeStat {
        mode,
        major: num(major, 10, "major")?,
        minor: num(minor, 10, "minor")?,
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
    })
}

/// Reads an fd's xattrs, every length capped; `(name, value)` sorted by
/// name, `user.rsync.%stat` and rsync's ACLs returned apart and the
/// `user.rsync.<name>` of a non-`user` xattr mapped back to `<name>`.
/// Xattrs outside `user.*` are the store's own (rsync `--fake-super`
/// keeps every one of the client's under `user.*`) and are not read.
/// What one entry cannot carry is left out, in the order the client trims
/// its own ([`byteback_protocol::fit_xattrs`]: ACLs, `security.*`,
/// `trusted.*`, then the rest, each by name), and named in `dropped`; a
/// value is read only while it can still be kept, so no more than
/// [`MAX_XATTR_TOTAL`] bytes (and one value) are held.
struct Xattrs {
    list: Vec<(Vec<u8>, Vec<u8>)>,
    stat: Option<Vec<u8>>,
    /// rsync's access ACL (empty when too large to read).
    aacl: Option<Vec<u8>>,
    /// rsync's default ACL is there.
    dacl: bool,
    /// Names of the xattrs left out (as restored), in keep order.
    dropped: Vec<Vec<u8>>,
    /// Names in `list` mapped back from `user.rsync.<name>` (see
    /// [`renamed_only_where_root_alone_could`]).
    mapped: Vec<Vec<u8>>,
}

fn read_xattrs(fd: impl AsFd) -> io::Result<Xattrs> {
    let fd = fd.as_fd();
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let names = match xattr_names(XattrOf::Fd(fd), XATTR_KERNEL_MAX) {
        Ok(names) => names,
        Err(rustix::io::Errno::RANGE) => return Err(bad("xattr names exceed 64 KiB".into())),
        Err(e) => return Err(e.into()),
    };
    let mut out = Xattrs {
        list: vec![],
        stat: None,
        aacl: None,
        dacl: false,
        dropped: vec![],
        mapped: vec![],
    };
    let value = |name: &[u8], max: usize| match xattr_value(XattrOf::Fd(fd), name, max) {
        Ok(v) => Ok(Some(v)),
        Err(rustix::io::Errno::RANGE) => Ok(None),
        Err(e) => Err(io::Error::from(e)),
    };
    // (name as restored, name as stored)
    let mut wanted: Vec<(Vec<u8>, Vec<u8>)> = vec![];
    for name in names {
        if !name.starts_with(b"user.") {
            continue; // the store's own
        }
        if name == STAT_XATTR {
            match value(&name, MAX_STAT_LEN + 1)? {
                Some(Some(v)) => out.stat = Some(v),
                Some(None) => {} // removed meanwhile
                None => return Err(bad("user.rsync.%stat is too large".into())),
            }
            continue;
        }
        if name == AACL_XATTR {
            // Too large to read: kept as undecodable (which narrows most).
            out.aacl = match value(&name, MAX_XATTR_VALUE)? {
                Some(v) => v,
                None => Some(vec![]),
            };
            continue;
        }
        if name == DACL_XATTR {
            out.dacl = true;
            continue;
        }
        let shown = match name.strip_prefix(RSYNC_PREFIX) {
            // rsync's own bookkeeping, not the client's.
            Some(rest) if rest.first() == Some(&b'%') => {
                out.dropped.push(name.to_vec());
                continue;
            }
            // A non-user xattr rsync renamed: its own name back (the
            // caller checks who could have set it). Not `system.*`, which
            // rsync does not send on Linux (ACLs go as `%aacl`): such a
            // name was set as it is stored.
            Some(rest)
                if [&b"security."[..], b"trusted."]
                    .iter()
                    .any(|p| rest.starts_with(p) && rest.len() > p.len()) =>
            {
                out.mapped.push(rest.to_vec());
                rest.to_vec()
            }
            _ => name.to_vec(),
        };
        wanted.push((shown, name));
    }
    wanted.sort_by(|a, b| xattr_keep_order(&a.0, &b.0));
    let mut total = 0usize;
    for (shown, name) in wanted {
        let room = MAX_XATTR_TOTAL.saturating_sub(total + shown.len());
        if out.list.len() >= MAX_XATTRS || shown.len() > MAX_XATTR_NAME || room == 0 {
            out.dropped.push(shown);
            continue;
        }
        match value(&name, room.min(MAX_XATTR_VALUE))? {
            Some(Some(v)) => {
                total += shown.len() + v.len();
                out.list.push((shown, v));
            }
            Some(None) => {} // removed meanwhile
            None => out.dropped.push(shown),
        }
    }
    out.list.sort();
    if out.list.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(bad("an xattr is stored under two names".into()));
    }
    Ok(out)
}

/// rsync `--fake-super` stores a client's `security.*` or `trusted.*`
/// xattr as `user.rsync.<name>`, which is also what any user who may write
/// to the file gets by setting `user.rsync.<name>` on it on the client (a
/// `user.*` xattr, which rsync sends as it is): a file capability or an
/// SELinux label of the user's choosing, which a restore as root would
/// set. Such names (`mapped`, as restored) are taken for their own only
/// where nobody but root could have set them: on an object of type
/// `ftype` that is no regular file or directory (Linux allows `user.*`
/// xattrs on those only), or on one root owns that no one else may write.
/// Elsewhere they go back to their stored names (restored as the `user.*`
/// xattrs they may have been), trimmed again to what one entry carries
/// (the stored names are longer), said in the note returned.
fn renamed_only_where_root_alone_could(
    entry: &mut Entry,
    ftype: u32,
    mapped: &[Vec<u8>],
) -> Option<String> {
    let user_xattrs = ftype == 0o100000 || ftype == 0o040000;
    let root_alone = entry.uid == 0 && entry.mode & 0o022 == 0;
    if !user_xattrs || root_alone || mapped.is_empty() {
        return None;
    }
    let mut back = vec![];
    for (name, _) in entry.xattrs.iter_mut() {
        if mapped.contains(name) {
            back.push(escape_bytes(name));
            *name = [RSYNC_PREFIX, &name[..]].concat();
        }
    }
    if back.is_empty() {
        return None;
    }
    entry.xattrs.sort();
    let dropped = byteback_protocol::fit_xattrs(&mut entry.xattrs);
    let mut note = format!(
        "{} stored by rsync as user.rsync.*, which the file's owner could have set so on the \
         client: restored under the stored names (taken for security or trusted xattrs only on \
         a file or directory root owns that no one else may write, or on an object of another \
         type)",
        back.join(", ")
    );
    if !dropped.is_empty() {
        let names: Vec<String> = dropped.iter().map(|n| escape_bytes(n)).collect();
        note.push_str(&format!(
            "; with them, more xattrs than one entry carries: left out {}",
            names.join(", ")
        ));
    }
    Some(note)
}

/// The permissions an rsync `--fake-super` access ACL
/// (`user.rsync.%aacl`) leaves a file of mode `mode` whose ACL is not
/// restored: never more, for anyone, than the ACL gave. rsync stores the
/// ACL as little-endian 32-bit words: `user::`, `group::`, `mask::` and
/// `other::` (each a permission, or 0x80 when it is the mode's: rsync
/// leaves out what the mode already says), then one (id, permission) pair
/// per named user or group (bit 31 of the permission marks a user).
/// Without the ACL, a named user falls back to the group bits (when a
/// member of the file's group) or to the other bits, and a named group's
/// members to the other bits. So the owner bits are narrowed to `user::`,
/// the group bits to `group::` and to every named user's entry, each
/// within the mask (the mode's group bits are the mask when there is
/// one), and the other bits to `other::` and to every named entry within
/// the mask. `None` when the value does not parse: the caller then keeps
/// no group or other permission.
fn narrowed_by_rsync_acl(acl: &[u8], mode: u32) -> Option<u32> {
    const NO_ENTRY: u32 = 0x80;
    const NAME_IS_USER: u32 = 1 << 31;
    if acl.len() < 16 || !(acl.len() - 16).is_multiple_of(8) {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([acl[i], acl[i + 1], acl[i + 2], acl[i + 3]]);
    let perm = |v: u32, default: u32| match v {
        NO_ENTRY => Some(default),
        v if v <= 7 => Some(v),
        _ => None,
    };
    let mode_user = (mode >> 6) & 7;
    let mode_group = (mode >> 3) & 7;
    let user = perm(word(0), mode_user)?;
    let mask = perm(word(8), mode_group)?;
    let mut group = perm(word(4), mode_group)? & mask & mode_group;
    let mut other = perm(word(12), mode & 7)? & mode & 7;
    for pair in (16..acl.len()).step_by(8) {
        let v = word(pair + 4);
        let p = v & !NAME_IS_USER;
        if p > 7 {
            return None;
        }
        if v & NAME_IS_USER != 0 {
            group &= p & mask;
        }
        other &= p & mask;
    }
    Some((mode & !0o777) | ((user & mode_user) << 6) | (group << 3) | other)
}

/// Text for a message, at most `max` bytes (cut at a character boundary).
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max.saturating_sub(3);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// What the walk could not send as it is stored: `path` left out (with
/// everything below it: `skipped`; for an entry whose own path is longer
/// than [`MAX_PATH`], `path` is the directory holding it), or sent with
/// less (its entry is the next one sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The path in the snapshot.
    pub path: Vec<u8>,
    /// Left out of the manifest.
    pub skipped: bool,
    /// What was lost and why.
    pub message: String,
}

/// One directory being walked: its fd, path and the names still to visit
/// (sorted, last first).
struct Level {
    fd: OwnedFd,
    path: Vec<u8>,
    rest: Vec<Vec<u8>>,
}

/// One step of a [`LegacyWalk`].
#[derive(Debug)]
pub enum Walked {
    /// The next entry, with the note on what it lost, if it lost anything
    /// (sent just before it).
    Entry(ManifestEntry, Option<Note>),
    /// An entry left out, with everything below it.
    Skipped(Note),
}

/// Streams the entries of a 1.x tree in walk order.
pub struct LegacyWalk {
    stack: Vec<Level>,
    /// (device, inode) of multiply-linked regular files -> first path
    /// sent: later names are sent as hard links to it.
    linked: HashMap<(u64, u64), Vec<u8>>,
    /// The (device, inode) of the entry being read when it is the first
    /// name of a multiply-linked file: registered in `linked` only once
    /// the entry passes its checks and is sent, so a name left out is
    /// never the target of a link (the next name becomes the file).
    first_link: Option<(u64, u64)>,
    /// What the entry being read loses.
    lost: Vec<String>,
}

fn names_of(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = vec![];
    let mut bytes = 0usize;
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        bytes += n.len();
        if names.len() >= MAX_DIR_ENTRIES || bytes > MAX_DIR_NAME_BYTES {
            return Err(io::Error::other(format!(
                "more than {MAX_DIR_ENTRIES} entries (or {} MiB of names) in one directory",
                MAX_DIR_NAME_BYTES >> 20
            )));
        }
        names.push(n.to_vec());
    }
    names.sort_unstable_by(|a, b| b.cmp(a)); // last first, for pop()
    Ok(names)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

impl LegacyWalk {
    /// Starts a walk of the tree at `root` (a snapshot's directory fd).
    pub fn new(root: OwnedFd) -> Result<Self> {
        let rest = names_of(&root).op("list", || "the snapshot's top directory")?;
        Ok(LegacyWalk {
            stack: vec![Level {
                fd: root,
                path: vec![],
                rest,
            }],
            linked: HashMap::new(),
            first_link: None,
            lost: vec![],
        })
    }

    /// The next step of the walk, `None` at the end: an entry (with a
    /// note on what it lost), or one that cannot be read as 1.x wrote it,
    /// left out with everything below it. Each comes as it is found, so
    /// nothing is held however many entries are left out in a row.
    pub fn next_step(&mut self) -> Result<Option<Walked>> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(name) = top.rest.pop() else {
                self.stack.pop();
                continue;
            };
            let path = join(&top.path, &name);
            if path.len() > MAX_PATH {
                // Not a path byteback can send, nor name: the note names
                // the directory holding it (sent, so its path is valid).
                let message = bounded(
                    format!(
                        "{} in it left out (with anything below it): its path is longer than {MAX_PATH} bytes",
                        escape_bytes(&name)
                    ),
                    MAX_TEXT,
                );
                if top.path.is_empty() {
                    // Cannot happen (a name is at most 255 bytes): said here only.
                    eprintln!("byteback-server: warning: 1.x snapshot: {message}");
                    continue;
                }
                return Ok(Some(Walked::Skipped(Note {
                    path: top.path.clone(),
                    skipped: true,
                    message,
                })));
            }
            let shown = format!("/{}", escape_bytes(&path));
            let depth = self.stack.len();
            self.lost.clear();
            self.first_link = None;
            let e = self
                .entry(&name, path.clone(), &shown)
                .and_then(|e| match e {
                    Some(e) => match e.entry.validate() {
                        Ok(()) => Ok(Some(e)),
                        Err(err) => {
                            // A directory's level was pushed: nothing below it goes.
                            self.stack.truncate(depth);
                            Err(Error::Store(err.to_string()))
                        }
                    },
                    None => Ok(None),
                });
            match e {
                Ok(Some(e)) => {
                    if let Some(key) = self.first_link.take() {
                        self.linked.insert(key, e.entry.path.clone());
                    }
                    let note = (!self.lost.is_empty()).then(|| Note {
                        path,
                        skipped: false,
                        message: bounded(self.lost.join("; "), MAX_TEXT),
                    });
                    return Ok(Some(Walked::Entry(e, note)));
                }
                Ok(None) => {}
                Err(err) => {
                    return Ok(Some(Walked::Skipped(Note {
                        path,
                        skipped: true,
                        message: bounded(
                            format!("left out (with anything below it): {err}"),
                            MAX_TEXT,
                        ),
                    })))
                }
            }
        }
    }

    /// The entry of `name` in the innermost directory (its path in the
    /// snapshot `path`, `shown` for messages); `None` when it is gone.
    /// Long (~150 lines) because it is one decision over the object's real
    /// type and what its `user.rsync.%stat` says it was, each case checked
    /// against the other with the object held open (no check-then-use).
    fn entry(&mut self, name: &[u8], path: Vec<u8>, shown: &str) -> Result<Option<ManifestEntry>> {
        let Some(top) = self.stack.last() else {
            return Ok(None);
        };
        let Some(st) = fsops::lstat_at(&top.fd, name).op("look at", || shown)? else {
            return Ok(None); // gone (only `current` changes)
        };
        let mtime_sec = st.st_mtime;
        let mtime_nsec = u32::try_from(st.st_mtime_nsec)
            .ok()
            .filter(|&n| n < 1_000_000_000)
            .unwrap_or(0);
        let real = fsops::file_type(&st);
        let mut entry = Entry {
            path,
            kind: Kind::Dir,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_sec,
            mtime_nsec,
            xattrs: vec![],
        };
        let fd: OwnedFd = match real {
            FileType::Directory => fsops::open_dir(&top.fd, name).op("open", || shown)?,
            FileType::RegularFile => rustix::fs::openat2(
                &top.fd,
                OsStr::from_bytes(name),
                OFlags::RDONLY
                    | OFlags::CLOEXEC
                    | OFlags::NOFOLLOW
                    | OFlags::NOCTTY
                    | OFlags::NONBLOCK,
                Mode::empty(),
                fsops::beneath(),
            )
            .op("open", || shown)?,
            FileType::Symlink => {
                // Stored as a symlink (not as 1.x's rsync stores one): kept as is, never followed.
                let target = fsops::read_link(&top.fd, name).op("read the symlink", || shown)?;
                entry.kind = Kind::Symlink { target };
                return Ok(Some(ManifestEntry {
                    entry,
                    hash: [0; 32],
                }));
            }
            other => {
                // A special file stored as itself: its own metadata.
                entry.kind = match other {
                    FileType::Fifo => Kind::Fifo,
                    FileType::Socket => Kind::Socket,
                    FileType::CharacterDevice => Kind::CharDev { rdev: st.st_rdev },
                    FileType::BlockDevice => Kind::BlockDev { rdev: st.st_rdev },
                    _ => return Err(bad("of unknown type")),
                };
                return Ok(Some(ManifestEntry {
                    entry,
                    hash: [0; 32],
                }));
            }
        };
        // The object opened must still be the one stat-ed.
        let fst = rustix::fs::fstat(&fd).op("look at", || shown)?;
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) {
            return Err(bad("changed while read"));
        }
        let x = read_xattrs(&fd).op("read the xattrs of", || shown)?;
        if !x.dropped.is_empty() {
            let mut names: Vec<String> =
                x.dropped.iter().take(8).map(|n| escape_bytes(n)).collect();
            if x.dropped.len() > names.len() {
                names.push(format!("and {} more", x.dropped.len() - names.len()));
            }
            self.lost.push(format!(
                "more xattrs than one entry carries ({MAX_XATTRS}, {} KiB in all, {} KiB each): left out {}",
                MAX_XATTR_TOTAL >> 10,
                MAX_XATTR_VALUE >> 10,
                names.join(", ")
            ));
        }
        entry.xattrs = x.list;
        let fake = match &x.stat {
            Some(v) => Some(parse_fake_stat(v).map_err(|why| {
                bad(format!(
                    "corrupt user.rsync.%stat {:?}: {why}",
                    escape_bytes(&v[..v.len().min(MAX_STAT_LEN)])
                ))
            })?),
            None => None,
        };
        let ftype = fake.map_or(st.st_mode & 0o170000, |f| f.mode & 0o170000);
        if let Some(f) = fake {
            entry.mode = f.mode & 0o7777;
            entry.uid = f.uid;
            entry.gid = f.gid;
        }
        if let Some(note) = renamed_only_where_root_alone_could(&mut entry, ftype, &x.mapped) {
            self.lost.push(note);
        }

        if let Some(acl) = &x.aacl {
            // The mode's group bits are the ACL's mask, not the group's own,
            // and the users and groups it names fall back to the group or
            // other bits: without the ACL, they must give no one more than
            // it did.
            let mode = entry.mode;
            let parsed = narrowed_by_rsync_acl(acl, mode);
            let narrowed = parsed.unwrap_or(mode & !0o077);
            entry.mode = narrowed;
            self.lost.push(format!(
                "its ACL (rsync's user.rsync.%aacl) is not restored as an ACL; mode {mode:04o} {}",
                match (parsed, narrowed == mode) {
                    (None, _) => format!(
                        "applied as {narrowed:04o} (the ACL does not parse: no group or other permission)"
                    ),
                    (Some(_), true) => {
                        "kept: without the ACL it gives no one more than the ACL did".to_string()
                    }
                    (Some(_), false) => format!(
                        "applied as {narrowed:04o}, so that without the ACL no one gets more than it gave (the group bits narrowed to group:: and every named user, the other bits to other:: and every named user and group, within the mask)"
                    ),
                }
            ));
        }
        if x.dacl {
            self.lost.push(
                "its default ACL (rsync's user.rsync.%dacl, whose format byteback does not decode) is not restored".into(),
            );
        }
        if let Some(f) = fake.filter(|f| matches!(f.mode & 0o170000, 0o020000 | 0o060000)) {
            if f.major > MAX_MAJOR || f.minor > MAX_MINOR {
                return Err(bad(format!(
                    "device number {},{} in user.rsync.%stat is not one Linux can make (major at most {MAX_MAJOR}, minor at most {MAX_MINOR})",
                    f.major, f.minor
                )));
            }
        }
        let rdev = fake.map_or(0, |f| libc::makedev(f.major, f.minor));
        if real == FileType::Directory {
            if ftype != 0o040000 {
                return Err(bad(
                    "a directory in the store whose user.rsync.%stat says it is not one",
                ));
            }
            let rest = names_of(&fd).op("list", || shown)?;
            let path = entry.path.clone();
            self.stack.push(Level { fd, path, rest });
            return Ok(Some(ManifestEntry {
                entry,
                hash: [0; 32],
            }));
        }
        entry.kind = match ftype {
            0o040000 => {
                return Err(bad(
                    "a file in the store whose user.rsync.%stat says it is a directory",
                ))
            }
            0o120000 => {
                let mut target = Vec::with_capacity(256);
                fd.try_clone()
                    .map(std::fs::File::from)
                    .and_then(|f| f.take(MAX_PATH as u64 + 1).read_to_end(&mut target))
                    .op("read the symlink target in", || shown)?;
                if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) {
                    return Err(bad(format!("a stored symlink whose target is empty, longer than {MAX_PATH} bytes or holds NUL")));
                }
                Kind::Symlink { target }
            }
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            0o020000 => Kind::CharDev { rdev },
            0o060000 => Kind::BlockDev { rdev },
            _ => Kind::File {
                size: st.st_size as u64,
            },
        };
        // rsync's -H stored every hard link as one (specials and symlinks,
        // kept as files by --fake-super, too): a later name of the inode is
        // a link to its first.
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.linked.get(&key) {
                entry.kind = Kind::HardLink {
                    target: first.clone(),
                };
            } else {
                if self.linked.len() >= MAX_LINKED {
                    return Err(bad(format!(
                        "more than {MAX_LINKED} hard-linked files in one snapshot"
                    )));
                }
                self.first_link = Some(key);
            }
        }
        Ok(Some(ManifestEntry {
            entry,
            hash: [0; 32],
        }))
    }
}

/// A stored object that 1.x could not have written.
fn bad(why: impl Into<String>) -> Error {
    Error::Store(why.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rsync's `--fake-super` access ACL: the four words, then (id, perm) pairs.
    fn rsync_acl(words: [u32; 4], named: &[(u32, u32)]) -> Vec<u8> {
        let mut v: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for (id, p) in named {
            v.extend(id.to_le_bytes());
            v.extend(p.to_le_bytes());
        }
        v
    }

    /// The bytes of `user.rsync.%aacl` as rsync wrote them for a file
    /// with `user:65534:---` (a user the ACL shuts out) and `mask::rw-`:
    /// user::, group:: and other:: the mode's (0x80), then (65534, user
    /// bit | ---). Without the ACL, that user, if a member of the file's
    /// group, would get the group bits: they are cleared, as the other bits.
    #[test]
    fn an_rsync_acl_that_shuts_out_a_named_user_clears_group_and_other() {
        let acl: [u8; 24] = [
            0x80, 0, 0, 0, 0x80, 0, 0, 0, 0x06, 0, 0, 0, 0x80, 0, 0,
            0, // user:: group:: mask:: other::
            0xfe, 0xff, 0, 0, 0, 0, 0, 0x80, // user:65534:---
        ];
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o664), Some(0o600));
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o2775), Some(0o2700));
    }

    #[test]
    fn an_rsync_acl_narrows_group_and_other_never_widens() {
        const NO: u32 = 0x80;
        const USER: u32 = 1 << 31;
        // group::r--, mask::rw- (the mode's group bits): 0664 -> 0644.
        let acl = rsync_acl([NO, 4, NO, NO], &[(1234, USER | 6)]);
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o664), Some(0o644));
        // group:: the mode's (0x80): unchanged.
        let acl = rsync_acl([NO, NO, NO, NO], &[(1234, USER | 6)]);
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o664), Some(0o664));
        // A named group with less than other: other narrowed to it.
        let acl = rsync_acl([NO, NO, NO, NO], &[(50, 0)]);
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o4755), Some(0o4750));
        // group::rwx under mask::r-x: r-x at most.
        let acl = rsync_acl([NO, 7, 5, NO], &[]);
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o755), Some(0o755));
        // A named user with r-- (who, in the group, got rw- without the
        // ACL): the group bits narrowed to it; a named group narrows only
        // the other bits (its members who are in the file's group get
        // group:: too under the ACL).
        let acl = rsync_acl([NO, 6, 6, NO], &[(1234, USER | 4), (50, 2)]);
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o666), Some(0o640));
        // user::, other:: stored apart from the mode: never more than they.
        let acl = rsync_acl([4, NO, NO, 0], &[]);
        assert_eq!(narrowed_by_rsync_acl(&acl, 0o755), Some(0o450));
        // A mode never gains a bit it did not have.
        for mode in [0o000, 0o111, 0o4640, 0o1707] {
            let acl = rsync_acl([7, 7, 7, 7], &[(1, USER | 7), (2, 7)]);
            assert_eq!(narrowed_by_rsync_acl(&acl, mode), Some(mode));
        }
        for bad in [
            vec![],
            rsync_acl([NO, 9, NO, NO], &[]),
            rsync_acl([NO, NO, NO, NO], &[(1, 8)]),
            rsync_acl([NO, NO, NO, NO], &[])[..15].to_vec(),
            [rsync_acl([NO, NO, NO, NO], &[]), vec![0; 4]].concat(),
        ] {
            assert_eq!(narrowed_by_rsync_acl(&bad, 0o664), None, "{bad:?}");
        }
    }

    #[test]
    fn fake_stat_parses_strictly() {
        assert_eq!(
            parse_fake_stat(b"104755 0,0 1234:4321").unwrap(),
            FakeStat {
                mode: 0o104755,
                major: 0,
                minor: 0,
                uid: 1234,
                gid: 4321
            }
        );
        assert_eq!(parse_fake_stat(b"20644 1,3 0:0").unwrap().minor, 3);
        assert_eq!(
            parse_fake_stat(b"60644 4294967295,7 0:0").unwrap().major,
            u32::MAX
        );
        for bad in [
            &b""[..],
            b"104755",
            b"104755 0,0",
            b"104755 0,0 1:2 x",
            b"104755  0,0 1:2",
            b"104755 0,0 1:2\n",
            b"1047558 0,0 1:2",
            b"777 0,0 1:2",
            b"100644 0;0 1:2",
            b"100644 0,0 1-2",
            b"100644 -1,0 1:2",
            b"100644 0,0 +1:2",
            b"100644 0,0 4294967296:2",
            b"109644 0,0 1:2",
            b"100644 0,0 1:2\0",
            b"\xff00644 0,0 1:2",
            &[b'1'; 100][..],
        ] {
            assert!(parse_fake_stat(bad).is_err(), "{:?}", escape_bytes(bad));
        }
    }
}

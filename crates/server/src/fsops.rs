//! Directory-fd based file operations that never follow a symlink.
//!
//! Every path the server touches on behalf of a client is resolved beneath a
//! held directory fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so
//! neither `..` nor a symlink planted in the tree can lead outside it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// Resolution flags for every client-derived path.
pub fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

fn os(p: &[u8]) -> &OsStr {
    OsStr::from_bytes(p)
}

/// Longest path handed to the kernel at once: a path it takes is shorter
/// than `PATH_MAX` (4096, with its NUL), which a client's path of
/// `MAX_PATH` bytes, escaped (see `disk_path`), may not be.
const PATH_STEP: usize = 4000;

/// Runs `open` on `path` beneath `dir`, first opening (beneath, one after
/// another) the directories of a path too long for the kernel at once.
fn beneath_in_steps<T>(
    dir: BorrowedFd<'_>,
    path: &[u8],
    open: impl FnOnce(BorrowedFd<'_>, &[u8]) -> io::Result<T>,
) -> io::Result<T> {
    if path.len() < PATH_STEP {
        return open(dir, path);
    }
    let cut = path[..PATH_STEP]
        .iter()
        .rposition(|&b| b == b'/')
        .filter(|&i| i > 0)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
    let step = open_dir(dir, &path[..cut])?;
    beneath_in_steps(step.as_fd(), &path[cut + 1..], open)
}

/// Opens a directory beneath `dir` (an empty path means `dir` itself).
pub fn open_dir(dir: impl AsFd, path: &[u8]) -> io::Result<OwnedFd> {
    let p: &[u8] = if path.is_empty() { b"." } else { path };
    beneath_in_steps(dir.as_fd(), p, |dir, p| {
        Ok(rustix::fs::openat2(
            dir,
            os(p),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            beneath(),
        )?)
    })
}

/// Opens a regular file beneath `dir` for reading; refuses anything else.
pub fn open_file(dir: impl AsFd, path: &[u8]) -> io::Result<File> {
    let fd = beneath_in_steps(dir.as_fd(), path, |dir, path| {
        Ok(rustix::fs::openat2(
            dir,
            os(path),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            beneath(),
        )?)
    })?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(File::from(fd))
}

/// Whether an error opening a file says the process (or the system) is out
/// of descriptors or memory, rather than anything about the file.
pub fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM)
    )
}

/// Splits a relative path into (parent, name).
pub fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    }
}

/// lstat of `name` directly inside `dir`; `None` when absent.
pub fn lstat_at(dir: impl AsFd, name: &[u8]) -> io::Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// File type of a stat.
pub fn file_type(st: &rustix::fs::Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Removes `name` inside `dir`, recursively if it is a directory, never following symlinks.
pub fn remove_any(dir: impl AsFd, name: &[u8]) -> io::Result<()> {
    let dir = dir.as_fd();
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if file_type(&st) == FileType::Directory => {
            let sub = open_dir(dir, name)?;
            // A read-only directory (fallback snapshots) must become writable to empty it.
            let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
            for_each_child(&sub, |child, _| remove_any(&sub, child))?;
            drop(sub);
            rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR)?;
            Ok(())
        }
        Some(_) => Ok(rustix::fs::unlinkat(dir, os(name), AtFlags::empty())?),
    }
}

/// Names in a directory, without `.` and `..`, sorted bytewise.
pub fn list_dir(dir: impl AsFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = vec![];
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// Calls `f` with each name in a directory (without `.` and `..`) and its
/// type from `d_type` (falling back to lstat; `Unknown` when it is gone),
/// as `getdents` gives them, unsorted: memory stays that of one reading
/// buffer whatever the directory's size (a client can make one of
/// millions). `f` may remove the name it is given.
pub fn for_each_child(
    dir: impl AsFd,
    mut f: impl FnMut(&[u8], FileType) -> io::Result<()>,
) -> io::Result<()> {
    let dir = dir.as_fd();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        let mut t = ent.file_type();
        if t == FileType::Unknown {
            if let Some(st) = lstat_at(dir, n)? {
                t = file_type(&st);
            }
        }
        f(n, t)?;
    }
    Ok(())
}

/// Like [`list_dir`], with each child's type from `d_type` (falls back to lstat).
pub fn list_dir_typed(dir: impl AsFd) -> io::Result<Vec<(Vec<u8>, FileType)>> {
    let mut out = vec![];
    for_each_child(dir, |n, t| {
        out.push((n.to_vec(), t));
        Ok(())
    })?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Creates a directory `name` in `dir` unless one exists; replaces a non-directory.
pub fn ensure_dir(dir: impl AsFd, name: &[u8], mode: u32) -> io::Result<()> {
    let dir = dir.as_fd();
    match lstat_at(dir, name)? {
        Some(st) if file_type(&st) == FileType::Directory => Ok(()),
        Some(_) => {
            remove_any(dir, name)?;
            Ok(rustix::fs::mkdirat(
                dir,
                os(name),
                Mode::from_raw_mode(mode),
            )?)
        }
        None => Ok(rustix::fs::mkdirat(
            dir,
            os(name),
            Mode::from_raw_mode(mode),
        )?),
    }
}

/// Renames `from` (in `from_dir`) over `to` (in `to_dir`), first removing a directory in the way.
pub fn replace(from_dir: impl AsFd, from: &[u8], to_dir: impl AsFd, to: &[u8]) -> io::Result<()> {
    let to_dir = to_dir.as_fd();
    if let Some(st) = lstat_at(to_dir, to)? {
        if file_type(&st) == FileType::Directory {
            remove_any(to_dir, to)?;
        }
    }
    Ok(rustix::fs::renameat(from_dir, os(from), to_dir, os(to))?)
}

/// Reads a symlink's target (raw bytes) inside `dir`.
pub fn read_link(dir: impl AsFd, name: &[u8]) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(dir, os(name), Vec::new())?.into_bytes())
}

/// Creates a symlink `name` -> `target` inside `dir`.
pub fn symlink(dir: impl AsFd, name: &[u8], target: &[u8]) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(os(target), dir, os(name))?)
}

/// Opens (creating if needed) a file directly inside `dir` for locking.
pub fn open_lock(dir: impl AsFd, name: &[u8]) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        os(name),
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// Writes `data` as the whole content of the small file `name` directly
/// inside `dir` (created 0600 if missing, never through a symlink), in
/// place: a reader may see it half written, so only for hints.
pub fn write_small(dir: impl AsFd, name: &[u8], data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let fd = rustix::fs::openat(
        dir,
        os(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )?;
    File::from(fd).write_all(data)
}

/// Creates a new file exclusively inside `dir` for writing.
pub fn create_new(dir: impl AsFd, name: &[u8]) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        os(name),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// The mtime of an open file.
pub fn mtime_of(f: impl AsFd) -> io::Result<(i64, u32)> {
    let st = rustix::fs::fstat(f)?;
    Ok((st.st_mtime, st.st_mtime_nsec as u32))
}

/// Sets mtime (and atime to the same) of an open file.
pub fn set_mtime(f: impl AsFd, sec: i64, nsec: u32) -> io::Result<()> {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    Ok(rustix::fs::futimens(
        f,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
    )?)
}

/// fsync a directory or file.
pub fn fsync(f: impl AsFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(f)?)
}

/// Whether the directory open at `dir` holds nothing (reads at most one name).
pub fn is_empty_dir(dir: impl AsFd) -> io::Result<bool> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        if !matches!(ent?.file_name().to_bytes(), b"." | b"..") {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Creates a directory unless it exists as a directory; fails if something else is there.
pub fn ensure_dir_only(dir: impl AsFd, name: &[u8], mode: u32) -> io::Result<()> {
    match rustix::fs::mkdirat(dir.as_fd(), os(name), Mode::from_raw_mode(mode)) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => match lstat_at(dir, name)? {
            Some(st) if file_type(&st) == FileType::Directory => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            )),
        },
        Err(e) => Err(e.into()),
    }
}

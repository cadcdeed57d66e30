//! Replacing a small file atomically: readers see the old content or the
//! new, never a mix, and after a crash one of them is on disc.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

/// Replaces `name` in the directory `dir` with `content` and mode `mode`
/// (exactly: the umask does not apply): writes a temporary file
/// `.<name>.byteback-tmp` beside it (created afresh, never through a
/// symlink), syncs it, renames it over `name` and syncs the directory.
/// `name` must be one path component. On error the temporary file is
/// removed and `name` is untouched.
pub fn write_atomic_at(dir: impl AsFd, name: &OsStr, content: &[u8], mode: u32) -> io::Result<()> {
    let dir = dir.as_fd();
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} is not a file name", name),
        ));
    }
    let mut tmp = b".".to_vec();
    tmp.extend_from_slice(bytes);
    tmp.extend_from_slice(b".byteback-tmp");
    let tmp = OsStr::from_bytes(&tmp);
    // A temporary file left by a crash is ours to replace.
    match rustix::fs::unlinkat(dir, tmp, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = rustix::fs::openat(
        dir,
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
    )?;
    let written = (|| {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))?;
        let mut f = File::from(fd);
        f.write_all(content)?;
        f.sync_all()?;
        drop(f);
        rustix::fs::renameat(dir, tmp, dir, name)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(dir, tmp, rustix::fs::AtFlags::empty());
        return Err(e);
    }
    rustix::fs::fsync(dir)?;
    Ok(())
}

/// [`write_atomic_at`] for a path: its directory is opened (following
/// symlinks, as any path given by an administrator) and `path`'s last
/// component replaced beneath it.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    write_atomic_at(&dir, name, content, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_no_temporary_left() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("authorized_keys");
        write_atomic(&p, b"first\n", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first\n");
        // A temporary file left by a crash does not get in the way.
        std::fs::write(d.path().join(".authorized_keys.byteback-tmp"), b"junk").unwrap();
        write_atomic(&p, b"second\n", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second\n");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsStr::new("authorized_keys")]);
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let sentinel = d.path().join("sentinel");
        std::fs::write(&sentinel, b"untouched").unwrap();
        std::os::unix::fs::symlink(&sentinel, d.path().join(".k.byteback-tmp")).unwrap();
        let dir = File::open(d.path()).unwrap();
        write_atomic_at(&dir, OsStr::new("k"), b"key", 0o600).unwrap();
        assert_eq!(std::fs::read(&sentinel).unwrap(), b"untouched");
        assert_eq!(std::fs::read(d.path().join("k")).unwrap(), b"key");
        assert!(!d.path().join(".k.byteback-tmp").exists());
    }

    #[test]
    fn names_with_a_slash_or_dots_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = File::open(d.path()).unwrap();
        for bad in ["", ".", "..", "a/b", "../x"] {
            let e = write_atomic_at(&dir, OsStr::new(bad), b"x", 0o600).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}

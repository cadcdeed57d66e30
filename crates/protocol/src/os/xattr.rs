//! Reading extended attributes of one object, by fd or by path, with the
//! kernel's variable-sized answers read in full and capped.

use std::ffi::CStr;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;

/// Linux's own cap on the list of names and on one value (`XATTR_LIST_MAX`,
/// `XATTR_SIZE_MAX`).
pub const XATTR_KERNEL_MAX: usize = 64 << 10;
/// First buffer size tried; most lists and values fit.
const FIRST_BUF: usize = 256;
/// How often an answer that keeps growing is re-read before giving up.
const RETRIES: usize = 8;

/// The object whose attributes are read.
#[derive(Debug, Clone, Copy)]
pub enum XattrOf<'a> {
    /// An open fd of the object (`flistxattr`, `fgetxattr`).
    Fd(BorrowedFd<'a>),
    /// A path whose last component is followed if it is a symlink.
    Path(&'a CStr),
    /// A path whose last component is not followed (`llistxattr`).
    Link(&'a CStr),
    /// The entry `name` (one component) of the directory open as `dir`,
    /// never followed (`listxattrat` with `AT_SYMLINK_NOFOLLOW`, Linux
    /// 6.13+). Older kernels give `ENOSYS`: see [`at_calls_available`].
    Child {
        /// The directory.
        dir: BorrowedFd<'a>,
        /// One component, without `/`.
        name: &'a CStr,
    },
}

/// `getxattrat` and `listxattrat`: the same number on every architecture
/// (they were added after the tables were unified).
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;

/// Set once a `*xattrat` call said `ENOSYS`.
static AT_CALLS_MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`XattrOf::Child`] may work: false once the kernel said it has
/// no `listxattrat` (before Linux 6.13); callers then reach the object
/// another way (through `/proc/self/fd`). It saves a path walk through
/// procfs per object, which was half the cost of reading an entry.
pub fn at_calls_available() -> bool {
    !AT_CALLS_MISSING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The kernel's `struct xattr_args` for `getxattrat`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// A `*xattrat` call's result as the wrappers give theirs; `ENOSYS` is remembered.
fn at_result(r: libc::c_long) -> Result<usize, Errno> {
    if r >= 0 {
        return Ok(r as usize);
    }
    let e = Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    if e == Errno::NOSYS {
        AT_CALLS_MISSING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Err(e)
}

fn listxattrat(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open, the name NUL-terminated and the buffer
    // writable for its length, all for the duration of the call.
    at_result(unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            buf.as_mut_ptr(),
            buf.len(),
        )
    })
}

fn getxattrat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    attr: &CStr,
    buf: &mut [u8],
) -> Result<usize, Errno> {
    use std::os::fd::AsRawFd;
    let mut args = XattrArgs {
        value: buf.as_mut_ptr() as u64,
        size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
        flags: 0,
    };
    // SAFETY: as in listxattrat; `args` points into `buf` for at most its
    // length, and lives across the call.
    at_result(unsafe {
        libc::syscall(
            SYS_GETXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            attr.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    })
}

/// The names of the object's extended attributes, in the kernel's order.
/// A filesystem without xattr support has none; a list longer than `max`
/// bytes gives `ERANGE`.
pub fn xattr_names(of: XattrOf<'_>, max: usize) -> Result<Vec<Vec<u8>>, Errno> {
    use rustix::fs::{flistxattr, listxattr, llistxattr};
    let listed = read_sized(max, |buf| match of {
        XattrOf::Fd(fd) => flistxattr(fd, buf),
        XattrOf::Path(p) => listxattr(p, buf),
        XattrOf::Link(p) => llistxattr(p, buf),
        XattrOf::Child { dir, name } => listxattrat(dir, name, buf),
    });
    match listed {
        Ok(list) => Ok(list
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect()),
        Err(Errno::NOTSUP) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The value of attribute `name`; `None` when it is gone (removed since it
/// was listed). A value longer than `max` bytes gives `ERANGE`.
pub fn xattr_value(of: XattrOf<'_>, name: &[u8], max: usize) -> Result<Option<Vec<u8>>, Errno> {
    use rustix::fs::{fgetxattr, getxattr, lgetxattr};
    let attr = std::ffi::CString::new(name).map_err(|_| Errno::INVAL)?;
    let name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
    let value = read_sized(max, |buf| match of {
        XattrOf::Fd(fd) => fgetxattr(fd, name, buf),
        XattrOf::Path(p) => getxattr(p, name, buf),
        XattrOf::Link(p) => lgetxattr(p, name, buf),
        XattrOf::Child { dir, name } => getxattrat(dir, name, &attr, buf),
    });
    match value {
        Ok(v) => Ok(Some(v)),
        Err(Errno::NODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a variable-sized kernel answer: a small buffer first, then, on
/// `ERANGE`, twice the size up to `max` (the size may change between calls,
/// hence the retries). `read` is never given an empty buffer, which would
/// turn the call into a size query.
fn read_sized(
    max: usize,
    mut read: impl FnMut(&mut [u8]) -> Result<usize, Errno>,
) -> Result<Vec<u8>, Errno> {
    let max = max.max(1);
    let mut buf = vec![0u8; FIRST_BUF.min(max)];
    for _ in 0..RETRIES {
        match read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < max => {
                let len = buf.len().saturating_mul(4).min(max);
                buf.resize(len, 0);
            }
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;

    fn c(p: &std::path::Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    /// Needs a filesystem with user xattrs (tmpfs since 6.6, ext4, btrfs);
    /// says so and passes where the temp directory has none, unless CI is set.
    fn with_user_xattrs() -> Option<tempfile::TempDir> {
        let d =
            tempfile::tempdir_in(std::env::var_os("TMPDIR").unwrap_or("/var/tmp".into())).ok()?;
        let probe = c(&d.path().join("probe"));
        std::fs::write(d.path().join("probe"), b"").ok()?;
        match rustix::fs::setxattr(
            probe.as_c_str(),
            "user.probe",
            b"",
            rustix::fs::XattrFlags::empty(),
        ) {
            Ok(()) => Some(d),
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "no user xattrs in {}: {e}",
                    d.path().display()
                );
                eprintln!("SKIPPED: no user xattrs in {}: {e}", d.path().display());
                None
            }
        }
    }

    #[test]
    fn names_and_values_read_alike_by_fd_path_and_link() {
        let Some(d) = with_user_xattrs() else { return };
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let fc = c(&f);
        let big = vec![7u8; 3000]; // over the first buffer: read again, larger
        for (name, value) in [("user.a", &b"1"[..]), ("user.big", &big[..])] {
            rustix::fs::setxattr(fc.as_c_str(), name, value, rustix::fs::XattrFlags::empty())
                .unwrap();
        }
        let file = std::fs::File::open(&f).unwrap();
        let dir = std::fs::File::open(d.path()).unwrap();
        let mut ways = vec![
            XattrOf::Fd(file.as_fd()),
            XattrOf::Path(&fc),
            XattrOf::Link(&fc),
        ];
        let child = XattrOf::Child {
            dir: dir.as_fd(),
            name: c"f",
        };
        match xattr_names(child, XATTR_KERNEL_MAX) {
            Err(Errno::NOSYS) => {
                assert!(!at_calls_available());
                eprintln!("NOTE: no listxattrat (Linux before 6.13): the /proc way is used");
            }
            _ => ways.push(child),
        }
        for of in ways {
            let mut names = xattr_names(of, XATTR_KERNEL_MAX).unwrap();
            names.retain(|n| n.starts_with(b"user."));
            names.sort();
            assert_eq!(names, vec![b"user.a".to_vec(), b"user.big".to_vec()]);
            assert_eq!(
                xattr_value(of, b"user.big", XATTR_KERNEL_MAX),
                Ok(Some(big.clone()))
            );
            assert_eq!(xattr_value(of, b"user.gone", XATTR_KERNEL_MAX), Ok(None));
            // Over the caller's cap: refused, not truncated.
            assert_eq!(xattr_value(of, b"user.big", 2999), Err(Errno::RANGE));
            assert_eq!(xattr_names(of, 8), Err(Errno::RANGE));
        }
        // A link's own attributes, not its target's.
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let lc = c(&l);
        let own = xattr_names(XattrOf::Link(&lc), XATTR_KERNEL_MAX).unwrap();
        assert!(!own.iter().any(|n| n == b"user.a"), "{own:?}");
        let target = xattr_names(XattrOf::Path(&lc), XATTR_KERNEL_MAX).unwrap();
        assert!(target.iter().any(|n| n == b"user.a"), "{target:?}");
        if at_calls_available() {
            let at = XattrOf::Child {
                dir: dir.as_fd(),
                name: c"l",
            };
            assert_eq!(xattr_names(at, XATTR_KERNEL_MAX).unwrap(), own);
            assert_eq!(xattr_value(at, b"user.a", XATTR_KERNEL_MAX), Ok(None));
        }
    }
}

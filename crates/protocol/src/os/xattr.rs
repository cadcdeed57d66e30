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
    let name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
    let value = read_sized(max, |buf| match of {
        XattrOf::Fd(fd) => fgetxattr(fd, name, buf),
        XattrOf::Path(p) => getxattr(p, name, buf),
        XattrOf::Link(p) => lgetxattr(p, name, buf),
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
        for of in [
            XattrOf::Fd(file.as_fd()),
            XattrOf::Path(&fc),
            XattrOf::Link(&fc),
        ] {
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
    }
}

//! Rebuilds of changed files in `.byteback/partial`, kept when a run is
//! interrupted so that the next one resumes from them: their names, taking
//! an earlier run's rebuild as the front of a basis, and dropping them when
//! the space is needed.

use std::fs::File;

use rustix::fs::FileType;

use super::sink::FS_BLOCK;
use super::{in_dir, BackupReceiver, PARTIAL};
use crate::error::{shown, IoContext, Result};
use crate::fsops;

/// Suffix of a partial rebuild from an earlier run, while it serves as a basis.
const PREV: &[u8] = b".prev";

/// Name in `.byteback/partial` of the rebuild of client path `path`.
pub(super) fn partial_name(path: &[u8]) -> Vec<u8> {
    crate::verify::hex(&byteback_delta::hash_bytes(path)[..16]).into_bytes()
}

pub(super) fn prev_name(name: &[u8]) -> Vec<u8> {
    [name, PREV].concat()
}

impl BackupReceiver {
    /// `name` in `.byteback/partial`, for messages.
    pub(super) fn partial_path(&self, name: &[u8]) -> String {
        format!("{}/{}", in_dir(&self.meta_path, PARTIAL), shown(name))
    }

    /// An earlier run's rebuild of the file whose partial name is `name`,
    /// kept as `<name>.prev` for use as the front of the basis. Of two (a
    /// rebuild from a rebuild, interrupted again) the longer is kept. Only
    /// whole file-system blocks of it are used, so the stored copy behind it
    /// stays block-aligned (for cloning): returns how many bytes. It is
    /// opened when the transfer starts (see [`Self::open_prev`]).
    pub(super) fn take_partial(&mut self, name: &[u8]) -> Result<Option<u64>> {
        let prev = prev_name(name);
        let size = |n: &[u8]| -> Result<Option<u64>> {
            Ok(
                match fsops::lstat_at(&self.partial, n).op("look at", || self.partial_path(n))? {
                    Some(s) if fsops::file_type(&s) == FileType::RegularFile => {
                        Some(s.st_size as u64)
                    }
                    Some(_) => {
                        fsops::remove_any(&self.partial, n)
                            .op("remove", || self.partial_path(n))?;
                        None
                    }
                    None => None,
                },
            )
        };
        let (cur_len, prev_len) = (size(name)?, size(&prev)?);
        let len = match (cur_len, prev_len) {
            (None, None) => return Ok(None),
            (Some(c), p) if c > p.unwrap_or(0) => {
                match fsops::replace(&self.partial, name, &self.partial, &prev) {
                    // Space is short (btrfs needs metadata space to
                    // rename): both go, and the file is sent whole.
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        for n in [name, &prev[..]] {
                            fsops::remove_any(&self.partial, n)
                                .op("remove", || self.partial_path(n))?;
                        }
                        return Ok(None);
                    }
                    r => r.op("rename", || self.partial_path(name))?,
                }
                c
            }
            (c, p) => {
                if c.is_some() {
                    fsops::remove_any(&self.partial, name)
                        .op("remove", || self.partial_path(name))?;
                }
                p.unwrap_or(0)
            }
        } / FS_BLOCK
            * FS_BLOCK;
        if len == 0 {
            fsops::remove_any(&self.partial, &prev).op("remove", || self.partial_path(&prev))?;
            return Ok(None);
        }
        Ok(Some(len))
    }

    /// Opens the earlier run's rebuild kept by [`Self::take_partial`] for
    /// the file whose partial name is `name`. One that cannot be opened or
    /// is shorter than `len` by now is removed, and `None` returned; but
    /// when the process is out of descriptors or memory that is the
    /// caller's error, and the rebuild stays for the next run.
    pub(super) fn open_prev(&mut self, name: &[u8], len: u64) -> Result<Option<File>> {
        let prev = prev_name(name);
        let usable = match fsops::open_file(&self.partial, &prev) {
            Ok(f) => {
                let m = f.metadata().op("look at", || self.partial_path(&prev))?;
                (m.len() >= len).then_some(f)
            }
            Err(e) if fsops::out_of_resources(&e) => {
                return Err(e).op("open", || self.partial_path(&prev))
            }
            Err(_) => None,
        };
        if usable.is_none() {
            fsops::remove_any(&self.partial, &prev).op("remove", || self.partial_path(&prev))?;
        }
        Ok(usable)
    }

    /// Drops transfer `id`'s earlier rebuild (its basis goes with it).
    pub(super) fn drop_prev(&mut self, id: u32) -> Result<()> {
        self.drop_basis(id)?;
        let t = self.transfer(id)?;
        if std::mem::take(&mut t.has_prev) {
            let prev = prev_name(&t.partial);
            fsops::remove_any(&self.partial, &prev).op("remove", || self.partial_path(&prev))?;
        }
        Ok(())
    }

    /// Removes what interrupted runs left in `.byteback/partial` that no
    /// transfer of this run uses (they are the first to go when the disc is
    /// full). Returns the bytes freed.
    pub fn drop_idle_partials(&mut self) -> Result<u64> {
        let mut busy = std::collections::HashSet::new();
        for t in self.transfers.values() {
            if !t.in_place {
                busy.insert(t.partial.clone());
            }
            if t.has_prev {
                busy.insert(prev_name(&t.partial));
            }
        }
        let mut freed = 0;
        // Removed as they are listed: the names are not held (a client can
        // leave thousands a run, and they pile up).
        let mut failed = None;
        let listed = fsops::for_each_child(&self.partial, |n, _| {
            if busy.contains(n) {
                return Ok(());
            }
            let gone = fsops::lstat_at(&self.partial, n)
                .op("look at", || self.partial_path(n))
                .and_then(|st| {
                    fsops::remove_any(&self.partial, n).op("remove", || self.partial_path(n))?;
                    Ok(st.map_or(0, |s| s.st_blocks as u64 * 512))
                });
            match gone {
                Ok(b) => {
                    freed += b;
                    Ok(())
                }
                Err(e) => {
                    failed = Some(e);
                    Err(std::io::Error::other("stopped"))
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        listed.op("list", || in_dir(&self.meta_path, PARTIAL))?;
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_are_fixed_hex_and_differ_by_path() {
        let a = partial_name(b"etc/passwd");
        assert_eq!(a.len(), 32);
        assert!(a.iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, partial_name(b"etc/passwd"));
        assert_ne!(a, partial_name(b"etc/passwd-"));
        assert_eq!(prev_name(&a), [&a[..], b".prev"].concat());
    }
}

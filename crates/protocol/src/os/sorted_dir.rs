//! A directory's names in byte order, read in windows of bounded size.
//!
//! Both sides go through directories in byte order of their names (the
//! walk, to announce entries in the manifest's order; the server's sweep, to
//! merge them with the manifest). Reading all names and sorting them costs
//! memory with the size of the directory: one of 300,000 entries with
//! 248-byte names took 163 MiB in the client and 185 MiB in the server. A
//! [`Window`] holds at most a given number of bytes of names, the smallest
//! ones after the last window's; a directory larger than that is read again
//! from its start for each further window (`getdents` of a directory whose
//! entries are cached costs about what sorting them does), so memory stays
//! bounded whatever the directory's size.
//!
//! A directory changing between two windows is like one changing during any
//! walk: a name added below the last window's end is not seen, one removed
//! after it is not either; no name is given twice, and the order holds.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;

use rustix::fs::{FileType, RawDir, SeekFrom};
use rustix::io::Errno;

/// Where one name sits in [`Window::names`]: start, length without the NUL,
/// type from `getdents`.
type Slot = (usize, usize, FileType);

/// Bytes one name costs in a window: itself, its NUL and its slot.
fn cost(len: usize) -> usize {
    len + 1 + std::mem::size_of::<Slot>()
}

/// Some names of a directory, sorted (see the module's text).
#[derive(Debug, Default)]
pub struct Window {
    /// The names, NUL-terminated, back to back.
    names: Vec<u8>,
    /// The names' slots in byte order of the names.
    order: Vec<Slot>,
    /// Whether names after the last one here were left for another window.
    more: bool,
    /// Where the next window starts when this one holds no names (see
    /// [`Window::after`]).
    resume: Option<Vec<u8>>,
}

impl Window {
    /// How many names this window holds.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The `i`th name and its type from `getdents` (maybe `Unknown`).
    pub fn get(&self, i: usize) -> Option<(&CStr, FileType)> {
        let &(start, len, t) = self.order.get(i)?;
        let name = CStr::from_bytes_with_nul(&self.names[start..=start + len]).ok()?;
        Some((name, t))
    }

    /// The names, NUL-terminated, back to back (not in order).
    pub fn raw_names(&self) -> &[u8] {
        &self.names
    }

    /// Whether the directory has names after this window's last one, which
    /// [`read_window`] reads given that name.
    pub fn more(&self) -> bool {
        self.more
    }

    /// The last name, after which the next window starts.
    pub fn last(&self) -> Option<&[u8]> {
        match self.order.last() {
            Some(&(start, len, _)) => Some(&self.names[start..start + len]),
            None => self.resume.as_deref(),
        }
    }

    /// Forgets every name (a listing cut short by an error).
    pub fn clear(&mut self) {
        *self = Window::default();
    }

    /// An empty window whose directory has more names after `name`: what
    /// a window becomes when its names are let go (memory is short) while
    /// `name` is being worked on; the next window is read after it.
    pub fn after(name: &[u8]) -> Window {
        Window {
            more: true,
            resume: Some(name.to_vec()),
            ..Window::default()
        }
    }

    /// Bytes held, as [`read_window`]'s `cap` counts them.
    pub fn held(&self) -> usize {
        self.names.len()
            + self.order.len() * std::mem::size_of::<Slot>()
            + self.resume.as_ref().map_or(0, Vec::len)
    }

    fn sort(&mut self) {
        let names = &self.names;
        self.order
            .sort_unstable_by(|a, b| names[a.0..a.0 + a.1].cmp(&names[b.0..b.0 + b.1]));
    }

    /// Sorts, and keeps the smallest names that fit in `target` bytes (one
    /// at least); returns the smallest name dropped, if any.
    fn keep_smallest(&mut self, target: usize) -> Option<Vec<u8>> {
        self.sort();
        let mut used = 0;
        let mut keep = 0;
        for &(_, len, _) in &self.order {
            if keep > 0 && used + cost(len) > target {
                break;
            }
            used += cost(len);
            keep += 1;
        }
        if keep == self.order.len() {
            return None;
        }
        let (start, len, _) = self.order[keep];
        let dropped = self.names[start..start + len].to_vec();
        let mut names = Vec::with_capacity(used);
        let order = self.order[..keep]
            .iter()
            .map(|&(start, len, t)| {
                let at = names.len();
                names.extend_from_slice(&self.names[start..=start + len]);
                (at, len, t)
            })
            .collect();
        self.names = names;
        self.order = order;
        Some(dropped)
    }
}

/// Over `budget` (`held` bytes of names in all), lets the largest of
/// `windows` go (each with the index of the next name it gives; the name
/// before it is the one being worked on), replacing it with
/// [`Window::after`] that name, until `held` is within `budget` or none is
/// left to let go. The one a caller reads last (its deepest) it leaves out.
pub fn let_go(windows: &mut [(&mut Window, &mut usize)], mut held: usize, budget: usize) {
    while held > budget {
        let Some((w, next)) = windows
            .iter_mut()
            .filter(|(w, _)| !w.is_empty())
            .max_by_key(|(w, _)| w.held())
        else {
            return;
        };
        let Some(name) = next
            .checked_sub(1)
            .and_then(|i| w.get(i))
            .map(|(n, _)| n.to_bytes().to_vec())
        else {
            return;
        };
        held -= w.held();
        **w = Window::after(&name);
        **next = 0;
        held += w.held();
    }
}

/// The cap of a window read below `held` bytes of names, within
/// `budget`: half of what is left (the rest for the directories below,
/// so that a directory's many subdirectories do not each make it let go
/// of its names and read it again), `min` at least.
pub fn level_cap(budget: usize, held: usize, min: usize) -> usize {
    window_cap((budget.saturating_sub(held) / 2).max(min))
}

/// `cap`, or in debug builds the test override `BYTEBACK_TEST_DIR_WINDOW`
/// (bytes), so that tests see directories read in many windows without
/// making hundreds of thousands of files.
pub fn window_cap(cap: usize) -> usize {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("BYTEBACK_TEST_DIR_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    cap
}

/// Reads directory `dir` from its start (it is seeked there) and returns
/// its names (without `.` and `..`) that sort after `after` (every name,
/// without one), the smallest of them that fit in `cap` bytes (at least
/// one), sorted; [`Window::more`] says whether there are more. `buf` is
/// for `getdents`.
pub fn read_window(
    dir: BorrowedFd<'_>,
    after: Option<&[u8]>,
    cap: usize,
    buf: &mut [MaybeUninit<u8>],
) -> Result<Window, Errno> {
    rustix::fs::seek(dir, SeekFrom::Start(0))?;
    let mut w = Window::default();
    // Every name dropped so far sorts at or after this one.
    let mut bound: Option<Vec<u8>> = None;
    let mut held = 0;
    let mut it = RawDir::new(dir, buf);
    while let Some(ent) = it.next() {
        let ent = ent?;
        let name = ent.file_name().to_bytes_with_nul();
        if name == b".\0" || name == b"..\0" {
            continue;
        }
        let bare = &name[..name.len() - 1];
        if after.is_some_and(|a| bare <= a) || bound.as_deref().is_some_and(|b| bare >= b) {
            continue;
        }
        w.order.push((w.names.len(), bare.len(), ent.file_type()));
        w.names.extend_from_slice(name);
        held += cost(bare.len());
        if held > cap {
            // Half the room, so that this happens once per half a window
            // of names that still fit, not at every one.
            if let Some(dropped) = w.keep_smallest(cap / 2) {
                bound = Some(dropped);
            }
            held = w.held();
        }
    }
    match w.keep_smallest(cap) {
        Some(dropped) => bound = Some(dropped),
        None => w.sort(),
    }
    w.more = bound.is_some();
    Ok(w)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;

    fn names_in_windows(dir: &std::path::Path, cap: usize) -> (Vec<Vec<u8>>, usize) {
        let fd = rustix::fs::open(
            dir,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let mut buf = vec![MaybeUninit::uninit(); 4096];
        let mut out = vec![];
        let mut windows = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let w = read_window(fd.as_fd(), after.as_deref(), cap, &mut buf).unwrap();
            windows += 1;
            assert!(w.held() <= cap.max(300), "{} > {cap}", w.held());
            for i in 0..w.len() {
                out.push(w.get(i).unwrap().0.to_bytes().to_vec());
            }
            if !w.more() {
                return (out, windows);
            }
            after = w.last().map(<[u8]>::to_vec);
        }
    }

    /// Whatever the window's size, the names come once each, in byte
    /// order, in as many windows as they need.
    #[test]
    fn windows_give_every_name_once_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut want: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| {
                // Names of many lengths, some not UTF-8.
                let mut n = format!("{:x}", i.wrapping_mul(2_654_435_761)).into_bytes();
                n.extend(std::iter::repeat_n(b'x', (i % 40) as usize));
                n.push(0xff);
                n
            })
            .collect();
        for n in &want {
            let p = d.path().join(std::ffi::OsStr::from_bytes(n));
            std::fs::write(p, b"").unwrap();
        }
        want.sort();
        for cap in [1, 100, 4 << 10, 64 << 10, 1 << 30] {
            let (got, windows) = names_in_windows(d.path(), cap);
            assert_eq!(got, want, "cap {cap}");
            if cap >= 1 << 30 {
                assert_eq!(windows, 1);
            } else if cap == 4 << 10 {
                assert!((10..=40).contains(&windows), "{windows} windows");
            }
        }
        let (got, windows) = names_in_windows(tempfile::tempdir().unwrap().path(), 64);
        assert!(got.is_empty() && windows == 1);
        // A window let go while its 500th name was worked on: the next
        // one starts after that name.
        let w = Window::after(&want[499]);
        assert!(w.is_empty() && w.more() && w.last() == Some(&want[499][..]));
        let fd = rustix::fs::open(
            d.path(),
            rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let mut buf = vec![MaybeUninit::uninit(); 4096];
        let next = read_window(fd.as_fd(), w.last(), 1 << 30, &mut buf).unwrap();
        assert_eq!(next.get(0).unwrap().0.to_bytes(), &want[500][..]);
        assert_eq!(next.len(), 500);
    }
}

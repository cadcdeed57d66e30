//! Warming the inode cache ahead of the ordered walk.
//!
//! The walk runs in one thread, in byte order, and on a cold cache most of
//! its time is spent waiting for the disc, one `statx` at a time. A few
//! prefetch threads take each directory the walk has just read and `statx`
//! its entries, and read and `statx` one level of its subdirectories, with
//! several requests in flight, so that the inodes are in memory when the
//! ordered walk reaches them.
//!
//! Nothing a prefetch thread learns is used: its results are thrown away,
//! so it cannot change what is backed up. It only reads metadata, beneath
//! the directory fds the walk opened, never following a symlink
//! (`AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`), never triggering an automount
//! (`AT_NO_AUTOMOUNT`) and never entering another filesystem than the
//! directory's own. Memory is bounded: at most [`MAX_JOBS`] chunks of at most
//! [`CHUNK`] names wait; when the queue is full a directory is simply not
//! prefetched.

use std::collections::{HashSet, VecDeque};
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, StatxFlags};

/// Names per job: a large directory is split so that several threads work on it.
const CHUNK: usize = 128;
/// Most jobs waiting.
const MAX_JOBS: usize = 256;
/// Most directories remembered as already prefetched (see [`Shared::expanded`]).
const MAX_EXPANDED: usize = 1 << 16;
/// Prefetch threads. They wait on the disc, not the CPU, so more than the
/// cores: enough requests in flight to keep a disc queue busy.
const THREADS: usize = 4;

/// Names of a directory to `statx`, `depth` levels below a directory the walk read.
struct Job {
    dir: Arc<OwnedFd>,
    /// The directory's mount id: subdirectories on another are not entered.
    mnt: u64,
    /// NUL-terminated names.
    names: Vec<u8>,
    depth: u8,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// (mount id, inode) of subdirectories whose names were queued at depth
    /// 1: when the walk reads one of them, its names are not queued again.
    expanded: Mutex<HashSet<(u64, u64)>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panicked prefetch thread leaves a queue that is still consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a directory's names in chunks; what does not fit is dropped.
    /// Returns whether all of them were queued. The names of a directory
    /// the walk has just read (depth 0) go first, in order: the walk needs
    /// them now, and the subdirectories queued earlier only later.
    fn push(&self, dir: Arc<OwnedFd>, mnt: u64, names: &[u8], depth: u8) -> bool {
        let mut q = self.lock();
        let mut urgent = Vec::new();
        let mut all = true;
        for chunk in chunks(names) {
            if q.closed || q.jobs.len() + urgent.len() >= MAX_JOBS {
                all = false;
                break;
            }
            let job = Job {
                dir: dir.clone(),
                mnt,
                names: chunk.to_vec(),
                depth,
            };
            if depth == 0 {
                urgent.push(job);
            } else {
                q.jobs.push_back(job);
            }
            self.ready.notify_one();
        }
        for job in urgent.into_iter().rev() {
            q.jobs.push_front(job);
        }
        all
    }

    fn expanded(&self) -> MutexGuard<'_, HashSet<(u64, u64)>> {
        self.expanded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if let Some(job) = q.jobs.pop_front() {
                return Some(job);
            }
            q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Splits NUL-terminated names into runs of at most [`CHUNK`] names.
fn chunks(names: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = names;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = 0;
        for _ in 0..CHUNK {
            match rest[end..].iter().position(|&b| b == 0) {
                Some(i) => end += i + 1,
                None => {
                    end = rest.len();
                    break;
                }
            }
            if end == rest.len() {
                break;
            }
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

/// The prefetch threads of one walk; stopped when dropped.
pub struct Prefetch {
    shared: Arc<Shared>,
    /// Whether any thread started.
    running: bool,
}

impl Prefetch {
    /// Starts the threads. If none can be started the walk simply runs
    /// without prefetching.
    pub fn start() -> Prefetch {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            expanded: Mutex::new(HashSet::new()),
        });
        let started = (0..THREADS)
            .filter(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("prefetch-{i}"))
                    .spawn(move || {
                        let mut buf = vec![MaybeUninit::uninit(); 32 << 10];
                        while let Some(job) = shared.next() {
                            run(&shared, &job, &mut buf);
                        }
                    })
                    .is_ok()
            })
            .count();
        Prefetch {
            shared,
            running: started > 0,
        }
    }

    /// A directory the walk has just read: `names` are its NUL-terminated
    /// entry names, `mnt` its mount id, `ino` its inode number.
    pub fn level(&self, dir: &OwnedFd, mnt: Option<u64>, ino: u64, names: &[u8]) {
        let (Some(mnt), true) = (mnt, self.running) else {
            return;
        };
        if self.shared.expanded().remove(&(mnt, ino)) {
            return;
        }
        if self.shared.lock().jobs.len() >= MAX_JOBS {
            return;
        }
        if let Ok(dup) = rustix::io::fcntl_dupfd_cloexec(dir, 0) {
            self.shared.push(Arc::new(dup), mnt, names, 0);
        }
    }
}

impl Drop for Prefetch {
    /// Stops the threads without waiting for them: one may be inside a
    /// `statx` on a slow disc, and the backup must not wait for a result
    /// nobody will read. They exit after their current chunk.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

/// `statx`es a job's names; at depth 0 a subdirectory on the same mount is
/// read and its names queued at depth 1. Errors are ignored: the ordered walk
/// meets and reports them itself.
fn run(shared: &Shared, job: &Job, buf: &mut [MaybeUninit<u8>]) {
    let names = job.names.split_inclusive(|&b| b == 0);
    for name in names.filter_map(|n| CStr::from_bytes_with_nul(n).ok()) {
        let Ok(st) = rustix::fs::statx(
            job.dir.as_fd(),
            name,
            // Cached attributes: a network filesystem's mount point must
            // not hold a prefetch thread on its server.
            AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT | AtFlags::STATX_DONT_SYNC,
            StatxFlags::TYPE | StatxFlags::INO | StatxFlags::MNT_ID,
        ) else {
            continue;
        };
        let is_dir = FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory;
        let same_mount = st.stx_mask & StatxFlags::MNT_ID.bits() != 0 && st.stx_mnt_id == job.mnt;
        if job.depth > 0 || !is_dir || !same_mount {
            continue;
        }
        let Ok(sub) = rustix::fs::openat(
            job.dir.as_fd(),
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        // No more than the queue can take (a huge directory's names are
        // not all held for nothing).
        let mut sub_names = Vec::new();
        let mut count = 0;
        let mut it = RawDir::new(sub.as_fd(), &mut *buf);
        while let Some(Ok(ent)) = it.next() {
            let n = ent.file_name().to_bytes_with_nul();
            if n != b".\0" && n != b"..\0" {
                sub_names.extend_from_slice(n);
                count += 1;
                if count == MAX_JOBS * CHUNK {
                    break;
                }
            }
        }
        // Remembered only when all its names were queued: a directory whose
        // names did not fit is queued again when the walk reads it.
        let whole = count < MAX_JOBS * CHUNK;
        if shared.push(Arc::new(sub), job.mnt, &sub_names, 1) && whole {
            let mut expanded = shared.expanded();
            if expanded.len() < MAX_EXPANDED {
                expanded.insert((job.mnt, st.stx_ino));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_split_in_chunks_of_whole_names() {
        let mut names = Vec::new();
        for i in 0..300 {
            names.extend_from_slice(format!("n{i}\0").as_bytes());
        }
        let parts: Vec<&[u8]> = chunks(&names).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.concat(), names);
        for c in &parts {
            assert!(c.ends_with(b"\0"));
        }
        assert_eq!(parts[0].iter().filter(|&&b| b == 0).count(), CHUNK);
        assert_eq!(chunks(b"").count(), 0);
    }

    /// The walk's own directory goes before the subdirectories queued
    /// ahead, in order; a directory whose names did not all fit says so (it
    /// is then not remembered as expanded, and queued again when read).
    #[test]
    fn the_walks_directory_goes_first_and_a_full_queue_is_reported() {
        let shared = Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            expanded: Mutex::new(HashSet::new()),
        };
        let dir = Arc::new(rustix::fs::open(".", OFlags::PATH, Mode::empty()).unwrap());
        let names = |tag: &str, n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| format!("{tag}{i}\0").into_bytes())
                .collect()
        };
        assert!(shared.push(dir.clone(), 1, &names("ahead", CHUNK * 2), 1));
        assert!(shared.push(dir.clone(), 1, &names("now", CHUNK * 2), 0));
        let order: Vec<(u8, Vec<u8>)> = shared
            .lock()
            .jobs
            .iter()
            .map(|j| {
                (
                    j.depth,
                    j.names[..j.names.iter().position(|&b| b == 0).unwrap()].to_vec(),
                )
            })
            .collect();
        let want: Vec<(u8, Vec<u8>)> = [(0, "now0"), (0, &format!("now{CHUNK}")), (1, "ahead0")]
            .into_iter()
            .map(|(d, n)| (d, n.as_bytes().to_vec()))
            .chain([(1, format!("ahead{CHUNK}").into_bytes())])
            .collect();
        assert_eq!(order, want);
        let fill = names("x", CHUNK * MAX_JOBS);
        assert!(!shared.push(dir, 1, &fill, 1));
        assert_eq!(shared.lock().jobs.len(), MAX_JOBS);
    }

    #[test]
    fn prefetching_a_tree_changes_nothing_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..3 {
            let sub = dir.path().join(format!("d{d}"));
            std::fs::create_dir(&sub).unwrap();
            for f in 0..200 {
                std::fs::write(sub.join(format!("f{f}")), b"x").unwrap();
            }
        }
        std::os::unix::fs::symlink("/", dir.path().join("root")).unwrap();
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let st = rustix::fs::statx(&fd, c"", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID).unwrap();
        let p = Prefetch::start();
        p.level(&fd, Some(st.stx_mnt_id), 1, b"d0\0d1\0d2\0root\0gone\0");
        drop(p);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    }
}

//! Existing directories a restore works in are locked down (the restoring
//! user's, 0700) until it leaves them (see `tree`). A restore that fails
//! gives them back on the way out; one interrupted by SIGINT, SIGTERM or
//! SIGHUP does too: [`install`] blocks those signals in every thread and
//! waits for them on a thread of its own, which puts every directory still
//! locked down back as it was and exits (128 + the signal's number). Lock
//! down and put back run under the same lock as that thread, so it never
//! sees a directory half done. SIGKILL cannot be caught: after one, the
//! directories stay locked down.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use rustix::fs::{Gid, Mode, Uid};

/// A directory locked down, and what to put back.
struct Locked {
    id: u64,
    fd: OwnedFd,
    uid: u32,
    gid: u32,
    mode: u32,
    /// The owner goes back too (a root restore changed it).
    owner: bool,
}

/// The directories locked down now, and the next id.
static LOCKED: Mutex<(Vec<Locked>, u64)> = Mutex::new((Vec::new(), 0));

/// Files being restored under a temporary name now: their directory and
/// that name, removed on a signal.
static TEMPS: Mutex<Vec<(u64, OwnedFd, std::ffi::CString)>> = Mutex::new(Vec::new());

fn temps() -> MutexGuard<'static, Vec<(u64, OwnedFd, std::ffi::CString)>> {
    TEMPS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `create` (which makes a temporary file in `dir` and gives its
/// name) with the file registered, as `id`, for removal on a signal
/// (none if `dir` cannot be duplicated); [`forget_temp`] ends that.
pub fn temp_file<T>(
    dir: std::os::fd::BorrowedFd<'_>,
    id: u64,
    create: impl FnOnce() -> rustix::io::Result<(std::ffi::CString, T)>,
) -> rustix::io::Result<(std::ffi::CString, T)> {
    let mut guard = temps();
    let made = create()?;
    if let Ok(fd) = dir.try_clone_to_owned() {
        guard.push((id, fd, made.0.clone()));
    }
    Ok(made)
}

/// The temporary file registered as `id` is renamed or removed.
pub fn forget_temp(id: u64) {
    temps().retain(|t| t.0 != id);
}

fn locked() -> MutexGuard<'static, (Vec<Locked>, u64)> {
    LOCKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Called with the exit code and what happened, last before the exit (the
/// `--json` report).
type OnInterrupt = Box<dyn Fn(u8, &str) + Send + Sync>;
static ON_INTERRUPT: OnceLock<OnInterrupt> = OnceLock::new();

/// Has `f` called with the exit code and the message when a signal ends
/// the restore (once; a second call is ignored).
pub fn on_interrupt(f: impl Fn(u8, &str) + Send + Sync + 'static) {
    let _ = ON_INTERRUPT.set(Box::new(f));
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// starts from now on) and starts the thread that waits for them. Call
/// before any other thread starts.
pub fn install() -> std::io::Result<()> {
    crate::stop::watch(|sig| interrupted(sig))
}

/// Puts every locked-down directory back, says so, and exits.
fn interrupted(sig: libc::c_int) -> ! {
    // Held until the exit: no directory is locked down or put back, and no
    // temporary file made or placed, meanwhile.
    let guard = locked();
    let files = temps();
    for (_, dir, name) in files.iter() {
        let _ = rustix::fs::unlinkat(dir, name.as_c_str(), rustix::fs::AtFlags::empty());
    }
    let mut failed = 0;
    for l in guard.0.iter().rev() {
        if put(l.fd.as_fd(), l.uid, l.gid, l.mode, l.owner).is_err() {
            failed += 1;
        }
    }
    let name = crate::stop::name(sig);
    let msg = if failed > 0 {
        format!("interrupted ({name}); {failed} directories could not be given back their owner and mode")
    } else {
        format!("interrupted ({name}); the restore is incomplete, existing directories have their owner and mode back (those it made stay 0700)")
    };
    // A closed stderr must not stop the exit below.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("byteback-restore: {msg}\n").as_bytes(),
    );
    let code = 128 + sig;
    if let Some(f) = ON_INTERRUPT.get() {
        f(u8::try_from(code).unwrap_or(u8::MAX), &msg);
    }
    std::process::exit(code);
}

fn put(
    fd: std::os::fd::BorrowedFd<'_>,
    uid: u32,
    gid: u32,
    mode: u32,
    owner: bool,
) -> rustix::io::Result<()> {
    if owner {
        rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
}

/// Runs `lock` (which locks `fd` down) with `fd`'s owner `uid`:`gid` and
/// `mode` registered to be put back on a signal (the owner only if
/// `owner`); returns its id for [`put_back`]. Nothing is registered if
/// `lock` fails or `fd` cannot be duplicated.
pub fn lock_down<E>(
    fd: &OwnedFd,
    (uid, gid, mode): (u32, u32, u32),
    owner: bool,
    lock: impl FnOnce() -> Result<(), E>,
) -> Result<Option<u64>, E> {
    let mut guard = locked();
    let id = guard.1;
    guard.1 += 1;
    let kept = fd.try_clone().ok().map(|fd| Locked {
        id,
        fd,
        uid,
        gid,
        mode,
        owner,
    });
    // Registered first: a signal can only come before or after both.
    let registered = kept.is_some();
    if let Some(l) = kept {
        guard.0.push(l);
    }
    match lock() {
        Ok(()) => Ok(registered.then_some(id)),
        Err(e) => {
            guard.0.retain(|l| l.id != id);
            Err(e)
        }
    }
}

/// Runs `put` (which puts the directory registered as `id` back) and
/// forgets it.
pub fn put_back<T>(id: Option<u64>, put: impl FnOnce() -> T) -> T {
    let mut guard = locked();
    let r = put();
    if let Some(id) = id {
        guard.0.retain(|l| l.id != id);
    }
    r
}

//! A backup stopped by SIGINT, SIGTERM or SIGHUP (Ctrl-C, `systemctl
//! stop`, the unit's timeout, a shutdown) still runs its post-backup
//! hooks, which may undo what a pre-backup hook set up (an LVM snapshot
//! removed, a stopped service started again).
//!
//! [`install`] blocks those signals in every thread and waits for them on
//! a thread of its own. On the first one, a pre-backup hook still running
//! is stopped (its process group, see `hooks`), the post-backup hooks run
//! told of the stop (`BYTEBACK_STATUS` 128 + the signal's number), the
//! `--json` report is printed, and the process exits with that code. The
//! server side of an interrupted backup is left as after a lost
//! connection: the next backup resumes it. A signal that comes while the
//! post-backup hooks already run (the backup itself ended) lets them
//! finish; a second signal stops at once. Before the post-backup hooks
//! are registered (no pre-backup hook has run yet), a signal stops at
//! once.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The post-backup hooks, to run once with the exit code and the snapshot
/// taken; they give what failed.
type Post = Box<dyn FnOnce(u8, Option<String>) -> Vec<String> + Send>;
/// Prints the `--json` report of a stopped backup (exit code, message).
type Report = Box<dyn Fn(u8, &str) + Send>;

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The process group of the pre-backup hook running now (0: none).
static HOOK_GROUP: AtomicI32 = AtomicI32::new(0);
/// Where the post-backup hooks stand.
enum PostState {
    /// Not registered yet: nothing to undo.
    Empty,
    Registered(Post),
    /// The main thread runs them (the backup ended).
    Main,
    /// The signal thread runs them.
    Signal,
}

static POST: Mutex<PostState> = Mutex::new(PostState::Empty);
static REPORT: Mutex<Option<Report>> = Mutex::new(None);

/// The signals a backup stops for.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// How long a stopped pre-backup hook may take to end before the post
/// hooks run anyway (it is killed in `hooks` well within this).
const HOOK_END_WAIT: Duration = Duration::from_secs(20);

/// The signal this backup is being stopped for, if it is.
pub fn stopped() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Registers (or, with 0, forgets) the process group of the pre-backup
/// hook running now.
pub fn hook_group(group: i32) {
    HOOK_GROUP.store(group, Ordering::SeqCst);
}

/// Has `post` run with the exit code by whichever comes first: the main
/// thread ([`take_post`]) or a signal.
pub fn set_post(post: impl FnOnce(u8, Option<String>) -> Vec<String> + Send + 'static) {
    *POST.lock().unwrap_or_else(PoisonError::into_inner) = PostState::Registered(Box::new(post));
}

/// Has `report` print the `--json` report of a stopped backup.
pub fn set_report(report: impl Fn(u8, &str) + Send + 'static) {
    *REPORT.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(report));
}

/// The post-backup hooks, for the main thread to run. `None` when a signal
/// took them: that thread runs them and ends the process, and the caller
/// must not go on (see [`wait_for_the_end`]).
pub fn take_post() -> Option<Post> {
    let mut state = POST.lock().unwrap_or_else(PoisonError::into_inner);
    match std::mem::replace(&mut *state, PostState::Main) {
        PostState::Registered(post) => Some(post),
        PostState::Signal => {
            *state = PostState::Signal;
            None
        }
        PostState::Empty | PostState::Main => Some(Box::new(|_, _| Vec::new())),
    }
}

/// Waits for the signal thread to end the process.
pub fn wait_for_the_end() -> ! {
    loop {
        std::thread::park();
    }
}

/// Blocks [`SIGNALS`] in this thread (and the threads it starts from now
/// on; children get the default mask back) and starts the thread that
/// waits for them. Call before any other thread starts.
pub fn install() -> std::io::Result<()> {
    watch(on_signal)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// starts from now on; children get the default mask back) and starts a
/// thread that calls `on` with each one received. Call before any other
/// thread starts.
pub(crate) fn watch(on: fn(libc::c_int)) -> std::io::Result<()> {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which
    // initialises it; the calls only read and write `set`.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    };
    // SAFETY: `set` is initialised above; the old mask is not asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    std::thread::Builder::new()
        .name("byteback-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                on(sig);
            }
        })?;
    Ok(())
}

/// The signal's name.
pub(crate) fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    }
}

fn on_signal(sig: i32) {
    let code = 128 + sig;
    if SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        eprintln!("byteback-backup: {} again: stopping now", name(sig));
        std::process::exit(code);
    }
    let msg = format!(
        "interrupted ({}): the backup is incomplete (the next one resumes it)",
        name(sig)
    );
    let taken = {
        let mut state = POST.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, PostState::Signal) {
            PostState::Registered(post) => Some(post),
            PostState::Empty => None,
            other => {
                *state = other;
                eprintln!(
                    "byteback-backup: {}: the backup has ended; the post-backup hooks finish \
                     first (signal again to stop at once)",
                    name(sig)
                );
                return;
            }
        }
    };
    let code = u8::try_from(code).unwrap_or(u8::MAX);
    let Some(post) = taken else {
        // Nothing set up yet that the post-backup hooks would undo.
        eprintln!("byteback-backup: {msg}");
        report(code, &msg);
        std::process::exit(code.into());
    };
    eprintln!("byteback-backup: {msg}; running the post-backup hooks");
    // A pre-backup hook running now sees the signal and is stopped by the
    // thread that runs it; the post hooks wait for it to end.
    let deadline = Instant::now() + HOOK_END_WAIT;
    while HOOK_GROUP.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for f in post(code, None) {
        eprintln!("byteback-backup: post-backup hook failed: {f}");
    }
    report(code, &msg);
    std::process::exit(code.into());
}

/// Prints the `--json` report of a stopped backup, if one is wanted.
fn report(code: u8, msg: &str) {
    if let Some(report) = REPORT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        report(code, msg);
    }
}

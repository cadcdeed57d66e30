//! A backup stopped by SIGINT, SIGTERM or SIGHUP (Ctrl-C, `systemctl
//! stop`, the unit's timeout, a shutdown) still runs its post-backup
//! hooks, which may undo what a pre-backup hook set up (an LVM snapshot
//! removed, a stopped service started again), once nothing of the backup
//! uses it any more.
//!
//! [`install`] blocks those signals in every thread (but those ignored when
//! the program started, as under `nohup`) and waits for them on a thread
//! of its own. On the first one:
//! - before the post-backup hooks are registered (no pre-backup hook has
//!   run), the run ends at once;
//! - once they are, the backup is stopped: a pre-backup hook running is
//!   stopped (its process group, see `hooks`) and no other starts; the
//!   transfer is torn down ([`set_abort`]), and its threads end. The main
//!   thread then runs the post-backup hooks, told of the stop
//!   (`BYTEBACK_STATUS` 128 + the signal's number), prints the `--json`
//!   report and exits with that code. Should it not get there within
//!   [`MAIN_WAIT`] (a read stuck on a hung filesystem), a thread of this
//!   module runs them and ends the process;
//! - while the post-backup hooks run after the backup ended, they finish.
//!
//! A second signal ends the process at once. The server side of a stopped
//! backup is left as after a lost connection: the next backup resumes it.
//! Nothing here panics on a closed stderr or stdout: the process always
//! ends.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The post-backup hooks, to run once with the exit code and the snapshot
/// taken; they give what failed.
type Post = Box<dyn FnOnce(u8, Option<String>) -> Vec<String> + Send>;
/// Prints the `--json` report of a stopped backup (exit code, message).
type Report = Box<dyn Fn(u8, &str, Option<&str>) + Send>;
/// Tears the running transfer down.
type Abort = Box<dyn Fn() + Send>;

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Where the post-backup hooks stand.
enum PostState {
    /// Not registered yet: nothing to undo.
    Empty,
    Registered(Post),
    /// The main thread runs them.
    Main,
    /// This module's fallback runs them.
    Fallback,
}

static POST: Mutex<PostState> = Mutex::new(PostState::Empty);
static REPORT: Mutex<Option<Report>> = Mutex::new(None);
static ABORT: Mutex<Option<Abort>> = Mutex::new(None);

/// The signals a backup stops for.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// How long the main thread has, after a stop, to get to the post-backup
/// hooks itself (a pre-backup hook is killed within 15 s, a transfer
/// torn down at once) before they are run without it.
pub const MAIN_WAIT: Duration = Duration::from_secs(60);

/// [`MAIN_WAIT`]; in a debug build, for the tests,
/// `$BYTEBACK_TEST_MAIN_WAIT_SECS` if set.
fn main_wait() -> std::time::Duration {
    crate::test_knob("BYTEBACK_TEST_MAIN_WAIT_SECS", MAIN_WAIT)
}

/// The signal this backup is being stopped for, if it is.
pub fn stopped() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Has `post` run with the exit code by whichever comes first: the main
/// thread ([`take_post`]) or, after a stop, the fallback.
pub fn set_post(post: impl FnOnce(u8, Option<String>) -> Vec<String> + Send + 'static) {
    *lock(&POST) = PostState::Registered(Box::new(post));
}

/// Has `report` print the `--json` report of a backup ended by a signal
/// before the main thread could.
pub fn set_report(report: impl Fn(u8, &str, Option<&str>) + Send + 'static) {
    *lock(&REPORT) = Some(Box::new(report));
}

/// Has `abort` called on a stop (with `None`, nothing): it tears down the
/// running transfer, whose threads then end and whose error returns.
pub fn set_abort(abort: Option<Box<dyn Fn() + Send>>) {
    *lock(&ABORT) = abort;
    // A stop that came just before: torn down now.
    if stopped().is_some() {
        if let Some(a) = lock(&ABORT).as_ref() {
            a();
        }
    }
}

/// Has `abort` called on a stop until the guard returned is dropped (then
/// nothing is): it tears down a connection being set up, whose wait for
/// the server then fails at once.
#[must_use = "the abort is unset when the guard is dropped"]
pub fn abort_while(abort: impl Fn() + Send + 'static) -> AbortWhile {
    set_abort(Some(Box::new(abort)));
    AbortWhile(())
}

/// Unsets the abort of [`abort_while`] when dropped.
pub struct AbortWhile(());

impl Drop for AbortWhile {
    fn drop(&mut self) {
        set_abort(None);
    }
}

/// The post-backup hooks, for the main thread to run. `None` when the
/// fallback took them: it runs them and ends the process, and the caller
/// must not go on (see [`wait_for_the_end`]).
pub fn take_post() -> Option<Post> {
    let mut state = lock(&POST);
    match std::mem::replace(&mut *state, PostState::Main) {
        PostState::Registered(post) => Some(post),
        PostState::Fallback => {
            *state = PostState::Fallback;
            None
        }
        PostState::Empty | PostState::Main => Some(Box::new(|_, _| Vec::new())),
    }
}

/// Waits for the fallback to end the process.
pub fn wait_for_the_end() -> ! {
    loop {
        std::thread::park();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A line on stderr, written by a thread of its own: a stderr that takes
/// nothing (a paused pager, journald behind) must not hold the signal
/// thread, which must go on to receive a second signal; a closed one is
/// not an error here.
fn say(line: &str) {
    let line = format!("byteback-backup: {line}\n");
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("byteback-say".into())
        .spawn(move || {
            let _ = std::io::stderr().write_all(line.as_bytes());
            let _ = tx.send(());
        });
    // A moment for it to get out, before the process may end.
    if spawned.is_ok() {
        let _ = rx.recv_timeout(Duration::from_millis(200));
    }
}

/// Blocks [`SIGNALS`] in this thread (and the threads it starts from now
/// on; children started through [`unblocked`] get an empty mask back) and starts the thread that
/// waits for them. Call before any other thread starts.
pub fn install() -> std::io::Result<()> {
    watch(on_signal)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// starts from now on; children started through [`unblocked`] get an empty
/// mask back) and starts a
/// thread that calls `on` with each one received. A signal ignored when
/// the program started (`nohup` ignores SIGHUP) is left as it is: blocked,
/// it would be queued and received. Call before any other thread starts.
pub(crate) fn watch(on: fn(libc::c_int)) -> std::io::Result<()> {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which
    // initialises it; sigaction with a null new action only reads the
    // current one into `old`, a valid out pointer.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            let mut old: libc::sigaction = std::mem::zeroed();
            let ignored = libc::sigaction(s, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN;
            if !ignored {
                libc::sigaddset(&mut set, s);
            }
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

/// Starts `cmd`'s program with no signal blocked: the mask [`watch`] set
/// is inherited through fork and exec (Rust's `Command` leaves it), and a
/// local store's server started with SIGTERM and SIGHUP blocked could not
/// be stopped by an admin's `kill` or a shutdown.
pub(crate) fn unblocked(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only sigemptyset, pthread_sigmask and
    // signal run, all async-signal-safe, on a set on the child's stack.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) {
                0 => {}
                e => return Err(std::io::Error::from_raw_os_error(e)),
            }
            // A child in a process group of its own writing to the
            // terminal (`stty tostop`) would be stopped, not heard.
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            Ok(())
        })
    }
}

/// [`unblocked`] for a program run with no arguments, executed with
/// `execve` from the child itself: Rust's `execvp` would have a file that
/// is not a program (no `#!`, a broken binary) run by sh, where run-parts
/// and 1.x refuse it (ENOEXEC, "could not be started"). Call last, once
/// `cmd`'s environment is set: it is taken from there.
pub(crate) fn unblocked_program(
    cmd: &mut std::process::Command,
    path: &std::path::Path,
) -> std::io::Result<()> {
    use std::ffi::{CString, OsString};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::os::unix::process::CommandExt;
    let c =
        |b: Vec<u8>| CString::new(b).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL));
    let prog = c(path.as_os_str().as_bytes().to_vec())?;
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_owned(), v.to_owned()),
            None => env.remove(k),
        };
    }
    let env = env
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            c(kv)
        })
        .collect::<std::io::Result<Vec<CString>>>()?;
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // The pointers in `envp` point into `env`, moved with it.
    let held = (prog, env, SendPtrs(envp));
    // SAFETY: between fork and exec only sigemptyset, pthread_sigmask and
    // execve run, all async-signal-safe, on data made before the fork
    // (execve returns only on failure).
    unsafe {
        cmd.pre_exec(move || {
            let (prog, _env, envp) = &held;
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) {
                0 => {}
                e => return Err(std::io::Error::from_raw_os_error(e)),
            }
            let argv = [prog.as_ptr(), std::ptr::null()];
            libc::execve(prog.as_ptr(), argv.as_ptr(), envp.0.as_ptr());
            Err(std::io::Error::last_os_error())
        });
    }
    Ok(())
}

/// Pointers into strings owned beside them, moved with them into a child's
/// `pre_exec` (which must be `Send + Sync`).
struct SendPtrs(Vec<*const libc::c_char>);
// SAFETY: the pointers are only read, in the child, while the strings they
// point into (held in the same tuple) live.
unsafe impl Send for SendPtrs {}
// SAFETY: as above.
unsafe impl Sync for SendPtrs {}

/// The signal's name.
pub(crate) fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    }
}

/// What a stop by `sig` says.
pub fn message(sig: i32) -> String {
    format!(
        "interrupted ({}): the backup is incomplete (the next one resumes it)",
        name(sig)
    )
}

/// Ends the process with `code`, the `--json` report printed first (a
/// report that cannot be written is no reason not to end).
fn end(code: u8, msg: &str, snapshot: Option<&str>) -> ! {
    let _ = std::panic::catch_unwind(|| {
        if let Some(report) = lock(&REPORT).as_ref() {
            report(code, msg, snapshot);
        }
    });
    std::process::exit(code.into());
}

fn on_signal(sig: i32) {
    let code = u8::try_from(128 + sig).unwrap_or(u8::MAX);
    if SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        say(&format!("{} again: stopping now", name(sig)));
        crate::hooks::kill_running();
        std::process::exit(code.into());
    }
    let msg = message(sig);
    match &*lock(&POST) {
        PostState::Empty => {
            // Nothing set up yet that the post-backup hooks would undo.
            say(&msg);
            end(code, &msg, None);
        }
        PostState::Main | PostState::Fallback => {
            say(&format!(
                "{}: the backup has ended; the post-backup hooks finish first (signal again to \
                 stop at once)",
                name(sig)
            ));
            return;
        }
        PostState::Registered(_) => {}
    }
    let _ = std::panic::catch_unwind(|| {
        if let Some(abort) = lock(&ABORT).as_ref() {
            abort();
        }
    });
    if lock(&COMMITTED).is_some() {
        say(&format!(
            "{}: the backup was committed; no longer waiting for the server to end, then running \
             the post-backup hooks (signal again to stop at once)",
            name(sig)
        ));
    } else {
        say(&format!(
            "{msg}; stopping it, then running the post-backup hooks (signal again to stop at once)"
        ));
    }
    // Should the main thread not get to the post-backup hooks in time,
    // they run without it (on a thread of their own: a second signal still
    // ends the process).
    let _ = std::thread::Builder::new()
        .name("byteback-stop".into())
        .spawn(move || {
            let deadline = Instant::now() + main_wait();
            while Instant::now() < deadline {
                if !matches!(&*lock(&POST), PostState::Registered(_)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            give_up(
                code,
                &msg,
                "the backup did not stop in time; running the post-backup hooks now",
            );
        });
}

/// The outcome of a backup the server committed: its exit code (0, or 24
/// partial) and snapshot. Set before the wait for the server to end, so
/// that a run ended without its main thread after it (see [`give_up`])
/// says what happened and tells the post-backup hooks so.
static COMMITTED: Mutex<Option<(u8, Option<String>)>> = Mutex::new(None);

/// Records that the backup was committed (see [`COMMITTED`]).
pub fn committed(code: u8, snapshot: Option<String>) {
    *lock(&COMMITTED) = Some((code, snapshot));
}

/// Ends the run without the main thread, stuck where it cannot be woken
/// (a read on a filesystem that does not answer): says `why`, runs the
/// post-backup hooks (told `code`), prints the `--json` report and exits
/// with `code`; but for a backup already committed (see [`committed`]),
/// its own code and snapshot. Returns only if the main thread got to the
/// hooks first.
pub fn give_up(code: u8, msg: &str, why: &str) {
    let post = {
        let mut state = lock(&POST);
        match std::mem::replace(&mut *state, PostState::Fallback) {
            PostState::Registered(post) => post,
            other => {
                *state = other;
                return;
            }
        }
    };
    say(why);
    let (code, snapshot, msg) = match lock(&COMMITTED).clone() {
        Some((done, snapshot)) => {
            let msg = format!(
                "the backup was committed ({}); the wait for the server to end was cut short",
                snapshot
                    .as_deref()
                    .map_or("no snapshot taken".to_string(), |s| format!("snapshot {s}"))
            );
            (done, snapshot, msg)
        }
        None => (code, None, msg.to_string()),
    };
    say(&msg);
    let failures = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        post(code, snapshot.clone())
    }));
    for f in failures.unwrap_or_default() {
        say(&format!("post-backup hook failed: {f}"));
    }
    end(code, &msg, snapshot.as_deref());
}

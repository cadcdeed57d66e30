//! A session's stderr, relayed by threads of their own.
//!
//! Under sshd, the server's stderr is a pipe into the client's SSH channel:
//! a client that stops taking that channel's data (hostile, or stopped)
//! fills it, and a plain write to stderr then blocks for as long as the
//! connection stays up, whatever `io_timeout` and `max_session` say (they
//! watch stdin and stdout only), and with whatever lock the writer holds:
//! the host's, or the store-wide prune lock, which every other host's
//! backups then wait on. [`install`] puts a pipe in place of fd 2. One
//! thread reads it, always, into memory, up to [`CAP`] bytes (beyond that
//! it drops, and a line says how much once there is room); another writes
//! what waits to the real stderr, and only it ever waits for the client.
//! The real stderr's flags are left as they are: for a local store it is
//! the user's own terminal or pipe (shared with the shell), which must not
//! become non-blocking. Writers to fd 2 never wait for the client.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most bytes of messages held for a stderr that takes nothing.
pub const CAP: usize = 1 << 20;

/// What waits for the real stderr.
#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    dropped: u64,
    /// The pipe has ended: nothing more comes.
    ended: bool,
    /// The writer is done (all written, or stderr is gone).
    done: bool,
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

/// The relay's threads, to wait for at the end ([`Relay::finish`]).
pub struct Relay {
    shared: Shared,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Puts the relay in place of fd 2 (see the module).
pub fn install() -> io::Result<Relay> {
    // SAFETY: plain syscalls on descriptors this process holds; each new
    // descriptor is owned by exactly one OwnedFd.
    let (real, r) = unsafe {
        let real = OwnedFd::from_raw_fd(cvt(libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3))?);
        let mut fds = [0; 2];
        cvt(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
        let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        cvt(libc::dup2(w.as_raw_fd(), 2))?;
        (real, r)
    };
    let shared = start(File::from(r), File::from(real))?;
    Ok(Relay { shared })
}

/// Starts the reader of `from` and the writer to `to`.
fn start(from: File, to: File) -> io::Result<Shared> {
    let shared: Shared = Arc::default();
    let s = shared.clone();
    std::thread::Builder::new()
        .name("byteback-stderr-in".into())
        .spawn(move || read_side(from, &s))?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("byteback-stderr-out".into())
        .spawn(move || write_side(to, &s))?;
    Ok(shared)
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Queue> {
    s.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the pipe into the queue until it ends, never waiting for the writer.
fn read_side(mut from: File, s: &Shared) {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let mut q = lock(s);
        if n == 0 {
            q.ended = true;
            s.1.notify_all();
            return;
        }
        if q.bytes.len() + n <= CAP {
            q.bytes.extend_from_slice(&chunk[..n]);
        } else {
            q.dropped += n as u64;
        }
        s.1.notify_all();
    }
}

/// Writes what waits to the real stderr (blocking: only this thread
/// waits), until the pipe has ended and all is out, or stderr is gone.
fn write_side(mut to: File, s: &Shared) {
    loop {
        let out = {
            let mut q = lock(s);
            while q.bytes.is_empty() && q.dropped == 0 && !q.ended {
                q = s.1.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            if q.dropped > 0 && q.bytes.len() < CAP / 2 {
                let note = format!(
                    "byteback-server: {} bytes of messages dropped (stderr was not read)\n",
                    q.dropped
                );
                q.bytes.extend_from_slice(note.as_bytes());
                q.dropped = 0;
            }
            if q.bytes.is_empty() && q.ended {
                q.done = true;
                s.1.notify_all();
                return;
            }
            std::mem::take(&mut q.bytes)
        };
        if to.write_all(&out).is_err() {
            // Gone: what comes is read and dropped, nothing waits for it.
            let mut q = lock(s);
            q.done = true;
            s.1.notify_all();
            drop(q);
            return;
        }
    }
}

impl Relay {
    /// Closes fd 2 on this side (it becomes `/dev/null`) and lets what
    /// waits go out, for at most `wait`.
    pub fn finish(self, wait: Duration) {
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            // SAFETY: dup2 onto fd 2 of a descriptor we hold.
            unsafe {
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
        let deadline = Instant::now() + wait;
        let mut q = lock(&self.shared);
        while !q.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            q = self
                .shared
                .1
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array for pipe2 to fill; each end is owned once.
        unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        }
    }

    /// A relay between two pipes: the end to write to, the end to read
    /// what it relays from, and a thread that ends when the relay is done.
    fn relayed() -> (File, File, std::thread::JoinHandle<()>) {
        let (relay_in, writer) = pipe();
        let (reader, real) = pipe();
        let shared = start(relay_in, real).unwrap();
        let t = std::thread::spawn(move || {
            let mut q = lock(&shared);
            while !q.done {
                q = shared.1.wait(q).unwrap();
            }
        });
        (writer, reader, t)
    }

    /// Writers never wait for a stderr nobody reads: 20 MiB go through the
    /// relay at once, at most CAP of it is held, the rest dropped and said
    /// once the reader comes back.
    #[test]
    fn writers_never_wait_for_a_stderr_nobody_reads() {
        let (mut writer, mut reader, t) = relayed();
        let start = Instant::now();
        let line = vec![b'x'; 1023];
        for _ in 0..20 << 10 {
            writer.write_all(&line).unwrap();
            writer.write_all(b"\n").unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the writer waited"
        );
        drop(writer);
        let mut out = vec![];
        reader.read_to_end(&mut out).unwrap();
        t.join().unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(out.len() < 4 * CAP, "{} bytes", out.len());
        assert!(
            text.contains("bytes of messages dropped"),
            "nothing said of the drop"
        );
    }

    /// What the reader takes in time comes through whole and in order.
    #[test]
    fn what_is_read_comes_through_whole() {
        let (mut writer, mut reader, t) = relayed();
        let r = std::thread::spawn(move || {
            let mut out = vec![];
            reader.read_to_end(&mut out).unwrap();
            out
        });
        let mut want = vec![];
        for i in 0..10_000 {
            let l = format!("line {i}\n");
            writer.write_all(l.as_bytes()).unwrap();
            want.extend_from_slice(l.as_bytes());
        }
        drop(writer);
        t.join().unwrap();
        assert_eq!(r.join().unwrap(), want);
    }
}

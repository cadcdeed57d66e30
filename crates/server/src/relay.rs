//! A session's stderr, relayed by a thread of its own.
//!
//! Under sshd, the server's stderr is a pipe into the client's SSH channel:
//! a client that stops taking that channel's data (hostile, or stopped)
//! fills it, and a plain write to stderr then blocks for as long as the
//! connection stays up, whatever `io_timeout` and `max_session` say (they
//! watch stdin and stdout only), and with whatever lock the writer holds:
//! the host's, or the store-wide prune lock, which every other host's
//! backups then wait on. [`install`] puts a pipe in place of fd 2, read by
//! a thread that never blocks on it: what the real stderr does not take
//! waits in memory, up to [`CAP`] bytes; beyond that it is dropped, and a
//! line says how much once stderr moves again. Writers to fd 2 never wait
//! for the client.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

/// Most bytes of messages held for a stderr that takes nothing.
pub const CAP: usize = 1 << 20;

/// The relay's thread, to wait for at the end ([`Relay::finish`]).
pub struct Relay {
    done: mpsc::Receiver<()>,
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
        let flags = cvt(libc::fcntl(real.as_raw_fd(), libc::F_GETFL))?;
        cvt(libc::fcntl(
            real.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        ))?;
        let mut fds = [0; 2];
        cvt(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
        let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        cvt(libc::dup2(w.as_raw_fd(), 2))?;
        (real, r)
    };
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("byteback-stderr".into())
        .spawn(move || {
            relay(File::from(r), File::from(real));
            let _ = tx.send(());
        })?;
    Ok(Relay { done: rx })
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
        let _ = self.done.recv_timeout(wait);
    }
}

/// Copies `from` (the pipe) to `to` (the real stderr, non-blocking) until
/// `from` ends and what waits is out (or `to` is gone).
fn relay(mut from: File, mut to: File) {
    let mut waiting: Vec<u8> = Vec::new();
    let mut dropped: u64 = 0;
    let (mut eof, mut broken) = (false, false);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        if eof && (waiting.is_empty() || broken) {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: if eof { -1 } else { from.as_raw_fd() },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if waiting.is_empty() || broken {
                    -1
                } else {
                    to.as_raw_fd()
                },
                events: libc::POLLOUT,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            match from.read(&mut chunk) {
                Ok(0) => eof = true,
                Ok(_) if broken => {}
                Ok(n) if waiting.len() + n <= CAP => waiting.extend_from_slice(&chunk[..n]),
                Ok(n) => dropped += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => eof = true,
            }
        }
        if fds[1].revents != 0 {
            match to.write(&waiting) {
                Ok(n) => {
                    waiting.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    broken = true;
                    waiting.clear();
                }
            }
        }
        if dropped > 0 && waiting.len() < CAP / 2 {
            let note = format!(
                "byteback-server: {dropped} bytes of messages dropped (stderr was not read)\n"
            );
            waiting.extend_from_slice(note.as_bytes());
            dropped = 0;
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

    /// Writers never wait for a stderr nobody reads: 20 MiB go through the
    /// relay at once, at most CAP of it is held, the rest dropped and said
    /// once the reader comes back.
    #[test]
    fn writers_never_wait_for_a_stderr_nobody_reads() {
        let (relay_in, mut writer) = pipe();
        let (mut reader, real) = pipe();
        // SAFETY: F_SETFL on a descriptor the test owns.
        unsafe {
            let flags = libc::fcntl(real.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(real.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let t = std::thread::spawn(move || relay(relay_in, real));
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
        let (relay_in, mut writer) = pipe();
        let (mut reader, real) = pipe();
        // SAFETY: F_SETFL on a descriptor the test owns.
        unsafe {
            let flags = libc::fcntl(real.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(real.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let t = std::thread::spawn(move || relay(relay_in, real));
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

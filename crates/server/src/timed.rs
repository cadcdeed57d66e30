//! The server's ends of its connection, with a deadline on every wait.
//!
//! A session blocks only in reading from or writing to its client. When the
//! network goes silent (a dropped route, a stopped peer) nothing ever closes
//! the pipe from sshd, and a session waiting there would hold its host's lock
//! until TCP keepalive, if any, ended sshd. So every read and write first
//! polls the descriptor for at most `io_timeout` seconds, and ends the
//! session with an error saying so when nothing moved. The descriptor is
//! non-blocking: a write larger than the room in the pipe or socket takes
//! what fits and polls again, rather than blocking in the kernel where no
//! deadline reaches it.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

/// A descriptor whose reads and writes wait at most `timeout`.
pub struct Timed {
    fd: std::fs::File,
    timeout: Duration,
    /// The descriptor's flags before it was made non-blocking, put back
    /// when done (a terminal's description is shared with the shell).
    flags: Option<rustix::fs::OFlags>,
}

impl Timed {
    /// Wraps `fd` (a pipe or socket from sshd or the local client), made
    /// non-blocking (its open file description, which only this process
    /// uses: our end of the pipe or socket).
    pub fn new(fd: OwnedFd, timeout: Duration) -> Timed {
        let flags = match set_nonblocking(&fd) {
            Ok(f) => Some(f),
            Err(e) => {
                // Then a write into a full pipe may block: said, not fatal.
                tracing::warn!("cannot make the connection non-blocking ({e}): io_timeout may not end a stalled write");
                None
            }
        };
        Timed {
            fd: std::fs::File::from(fd),
            timeout,
            flags,
        }
    }

    /// Waits until `fd` is ready for `flags`, or fails after the timeout.
    fn wait(&self, events: libc::c_short, what: &str) -> io::Result<()> {
        let ms = i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events,
            revents: 0,
        }];
        loop {
            // SAFETY: `fds` is one valid pollfd for an fd we own, and its
            // length is passed with it.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            match n {
                // Ready, or hung up / in error: the read or write says which.
                n if n > 0 => return Ok(()),
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the client {what} for {} s (io_timeout in byteback.toml); giving up",
                            self.timeout.as_secs()
                        ),
                    ))
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// Makes `fd` non-blocking; returns its flags before.
fn set_nonblocking(fd: &OwnedFd) -> io::Result<rustix::fs::OFlags> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(flags)
}

impl Drop for Timed {
    fn drop(&mut self) {
        if let Some(flags) = self.flags {
            let _ = rustix::fs::fcntl_setfl(&self.fd, flags);
        }
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.wait(libc::POLLIN, "sent nothing")?;
            match self.fd.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.wait(libc::POLLOUT, "took nothing")?;
            match self.fd.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.fd.flush()
    }
}

/// Our own descriptor for the standard stream `fd`: reads and writes then
/// go straight to it, with no buffer of std's in between that a poll could
/// not see.
pub fn dup_stdio(fd: impl AsFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_silent_peer_ends_a_read_and_a_full_pipe_ends_a_write() {
        let (r, w) = std::io::pipe().unwrap();
        let mut reader = Timed::new(r.into(), Duration::from_millis(200));
        let t = Instant::now();
        let e = reader.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("sent nothing"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(200));
        let mut writer = Timed::new(w.into(), Duration::from_millis(200));
        // Fill the pipe: nobody reads it.
        let chunk = [0u8; 4096];
        let e = loop {
            if let Err(e) = writer.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("took nothing"), "{e}");
        // One write larger than the whole pipe, which a blocking
        // descriptor would make wait in the kernel for ever.
        let (_r, w) = std::io::pipe().unwrap();
        let mut writer = Timed::new(w.into(), Duration::from_millis(200));
        let t = Instant::now();
        let e = writer.write_all(&vec![0u8; 4 << 20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Data that is there is read at once.
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(b"hi").unwrap();
        let mut reader = Timed::new(r.into(), Duration::from_secs(5));
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).unwrap(), 2);
        drop(w);
        assert_eq!(
            reader.read(&mut buf).unwrap(),
            0,
            "end of stream is not a timeout"
        );
    }
}

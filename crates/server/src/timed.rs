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
//!
//! A client that sends a byte now and then is never silent for
//! `io_timeout`, so a backup also has a deadline for the whole session
//! ([`SessionClock`], the store's `max_session`): past it, every read and
//! write fails, the session ends as an interrupted one (what it received
//! stays for the next run to resume) and the host's lock is released.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The deadline of a whole session, shared by its two ends; none until
/// [`SessionClock::start`] (a backup starting, or a restore reading
/// `current` under the host's lock).
#[derive(Debug, Clone, Default)]
pub struct SessionClock(Arc<OnceLock<(Instant, Duration)>>);

impl SessionClock {
    /// From now, the session may run `limit` more; a second call keeps the
    /// first deadline.
    pub fn start(&self, limit: Duration) {
        let _ = self.0.set((Instant::now() + limit, limit));
    }

    /// Time left before the deadline: `None` when there is none,
    /// `Some(ZERO)` once past it.
    fn left(&self) -> Option<Duration> {
        self.0
            .get()
            .map(|(end, _)| end.saturating_duration_since(Instant::now()))
    }

    fn expired(&self) -> io::Error {
        let secs = self.0.get().map_or(0, |(_, limit)| limit.as_secs());
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the session has run for {secs} s (max_session in byteback.toml); giving up (a backup keeps what was received for the next run)"
            ),
        )
    }
}

/// The deadline of the backup session this process serves (one a
/// process), for work that reads no connection for long: hashing a
/// stored file a client named as a twin (up to 16 TiB, from a message of
/// a hundred bytes).
static BACKUP_DEADLINE: OnceLock<(Instant, Duration)> = OnceLock::new();

/// Sets [`BACKUP_DEADLINE`] to `limit` from now (a second call keeps the
/// first).
pub fn start_backup_deadline(limit: Duration) {
    let _ = BACKUP_DEADLINE.set((Instant::now() + limit, limit));
}

/// An error once the backup session's deadline has passed.
pub fn within_backup_deadline() -> io::Result<()> {
    match BACKUP_DEADLINE.get() {
        Some((end, limit)) if Instant::now() >= *end => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the session has run for {} s (max_session in byteback.toml); giving up (a backup keeps what was received for the next run)",
                limit.as_secs()
            ),
        )),
        _ => Ok(()),
    }
}

/// A descriptor whose reads and writes wait at most `timeout`.
pub struct Timed {
    fd: std::fs::File,
    timeout: Duration,
    /// The whole session's deadline, if one has started.
    clock: SessionClock,
    /// The descriptor's flags before it was made non-blocking, put back
    /// when done (a terminal's description is shared with the shell).
    flags: Option<rustix::fs::OFlags>,
}

impl Timed {
    /// Wraps `fd` (a pipe or socket from sshd or the local client), made
    /// non-blocking (its open file description, which only this process
    /// uses: our end of the pipe or socket). Past `clock`'s deadline, once
    /// started, every read and write fails.
    pub fn new(fd: OwnedFd, timeout: Duration, clock: SessionClock) -> Timed {
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
            clock,
            flags,
        }
    }

    /// Waits until `fd` is ready for `flags`, or fails after the timeout.
    fn wait(&self, events: libc::c_short, what: &str) -> io::Result<()> {
        // Checked before the poll too: a peer that always has a byte ready
        // would otherwise never meet the deadline.
        let left = self.clock.left();
        if left == Some(Duration::ZERO) {
            return Err(self.clock.expired());
        }
        let wait = left.map_or(self.timeout, |l| l.min(self.timeout));
        // Rounded up, so a poll that ends for the deadline ends past it.
        let ms = i32::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
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
                0 if self.clock.left() == Some(Duration::ZERO) => return Err(self.clock.expired()),
                // Not silent for io_timeout yet: the deadline's share.
                0 if wait < self.timeout => {}
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

    #[test]
    fn a_silent_peer_ends_a_read_and_a_full_pipe_ends_a_write() {
        let (r, w) = std::io::pipe().unwrap();
        let mut reader = Timed::new(
            r.into(),
            Duration::from_millis(200),
            SessionClock::default(),
        );
        let t = Instant::now();
        let e = reader.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("sent nothing"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(200));
        let mut writer = Timed::new(
            w.into(),
            Duration::from_millis(200),
            SessionClock::default(),
        );
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
        let mut writer = Timed::new(
            w.into(),
            Duration::from_millis(200),
            SessionClock::default(),
        );
        let t = Instant::now();
        let e = writer.write_all(&vec![0u8; 4 << 20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Data that is there is read at once.
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(b"hi").unwrap();
        let mut reader = Timed::new(r.into(), Duration::from_secs(5), SessionClock::default());
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).unwrap(), 2);
        drop(w);
        assert_eq!(
            reader.read(&mut buf).unwrap(),
            0,
            "end of stream is not a timeout"
        );
    }

    #[test]
    fn a_peer_that_always_has_a_byte_ready_meets_the_session_deadline() {
        let (r, mut w) = std::io::pipe().unwrap();
        let clock = SessionClock::default();
        let mut reader = Timed::new(r.into(), Duration::from_secs(60), clock.clone());
        // No deadline before a backup starts it.
        w.write_all(b"ab").unwrap();
        assert_eq!(reader.read(&mut [0u8; 1]).unwrap(), 1);
        clock.start(Duration::from_millis(300));
        let t = Instant::now();
        let e = loop {
            // A byte is always there: only the deadline ends this.
            w.write_all(b"x").unwrap();
            match reader.read(&mut [0u8; 1]) {
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => break e,
            }
            assert!(t.elapsed() < Duration::from_secs(10), "never ended");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("max_session"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        // A silent peer meets it too, long before io_timeout.
        let (r, _w) = std::io::pipe().unwrap();
        let mut reader = Timed::new(r.into(), Duration::from_secs(60), clock);
        let e = reader.read(&mut [0u8; 1]).unwrap_err();
        assert!(e.to_string().contains("max_session"), "{e}");
    }
}

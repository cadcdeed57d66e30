//! The client library's error: what was being done, to which file, and why.
//!
//! Every variant's message is complete on its own (it carries its cause's
//! text, causes included), because a backup's failure travels between
//! threads as text and is shown as `{e}` or `{e:#}` alike; so no variant
//! also exposes its cause as `source()`, which would print it twice. The
//! kinds the CLI acts on ([`Error::is_usage`], [`Error::is_permanent`]) are
//! kept through [`Error::Context`].

use std::fmt::Display;
use std::io;
use std::path::{Path, PathBuf};

use byteback_protocol::ProtocolError;

/// Result of the client library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Anything the client library reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operation on a local file failed.
    #[error("{op} {}: {}", path.display(), chain(cause))]
    Io {
        /// What was being done ("cannot open", "reading").
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        cause: io::Error,
    },
    /// Reading from or writing to the server failed.
    #[error("{op}: {}", chain(cause))]
    Connection {
        /// "cannot read from the server", "cannot write to the server".
        op: &'static str,
        /// Why it failed.
        cause: ProtocolError,
    },
    /// The server ended the connection without a word.
    #[error("the server closed the connection")]
    Closed,
    /// The server's own account of why it stopped (an `Error` frame),
    /// escaped for a terminal.
    #[error("server: {0}")]
    Server(String),
    /// The server broke the protocol (a bad or unexpected message).
    #[error("{}", chain(.0))]
    Protocol(ProtocolError),
    /// A usage or configuration error: exit code 2, never retried.
    #[error("{0}")]
    Usage(String),
    /// An error that retrying cannot fix (a changed or unknown host key, a
    /// refused login).
    #[error("{0}")]
    Permanent(String),
    /// How an SSH session ends when it was stopped after a failure: that
    /// failure is the news, not this.
    #[error("the SSH session was stopped after a failure")]
    Aborted,
    /// Any other problem, described.
    #[error("{0}")]
    Msg(String),
    /// `inner`, with a note after it (how the server ended).
    #[error("{inner} ({note})")]
    Noted {
        /// What went wrong.
        inner: Box<Error>,
        /// The note.
        note: String,
    },
    /// What was being done when `inner` happened.
    #[error("{context}: {inner}")]
    Context {
        /// What was being done.
        context: String,
        /// What went wrong.
        inner: Box<Error>,
    },
}

impl Error {
    /// An error described by `msg`.
    pub fn msg(msg: impl Display) -> Self {
        Error::Msg(msg.to_string())
    }

    /// An I/O error on `path` while doing `op`.
    pub fn io(op: &'static str, path: impl AsRef<Path>, cause: io::Error) -> Self {
        Error::Io {
            op,
            path: path.as_ref().to_path_buf(),
            cause,
        }
    }

    /// `self`, saying what was being done.
    pub fn context(self, context: impl Display) -> Self {
        Error::Context {
            context: context.to_string(),
            inner: Box::new(self),
        }
    }

    /// `self`, followed by a note in parentheses ("(byteback-server was
    /// killed by signal 9)").
    pub fn context_after(self, note: impl Display) -> Self {
        Error::Noted {
            inner: Box::new(self),
            note: note.to_string(),
        }
    }

    /// The error beneath any [`Error::Context`] or [`Error::Noted`].
    pub fn innermost(&self) -> &Error {
        match self {
            Error::Context { inner, .. } | Error::Noted { inner, .. } => inner.innermost(),
            e => e,
        }
    }

    /// A usage or configuration error (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self.innermost(), Error::Usage(_))
    }

    /// An error that retrying cannot fix: also a server of another
    /// release (its protocol version or ours refused), which the retries
    /// of the next hour would not change.
    pub fn is_permanent(&self) -> bool {
        match self.innermost() {
            Error::Permanent(_)
            | Error::Protocol(ProtocolError::Version { .. })
            | Error::Connection {
                cause: ProtocolError::Version { .. },
                ..
            } => true,
            Error::Server(m) => m.contains(VERSION_REFUSED) || m.contains(READ_ONLY_REFUSED),
            _ => false,
        }
    }

    /// The server's own account (an `Error` frame), worth more than the
    /// broken pipe or closed connection it causes here.
    pub fn is_from_server(&self) -> bool {
        matches!(self.innermost(), Error::Server(_))
    }
}

/// `e` and its sources, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Adds what was being done to an error.
pub trait Context<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl Display) -> Result<T>;
    /// Wraps the error with the context `f` gives (built only on error).
    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

/// Names the file and the operation of an I/O error.
pub trait IoContext<T> {
    /// An [`Error::Io`] for `path` and `op` ("cannot open").
    fn on(self, op: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T, E: Into<io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn on(self, op: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e.into()))
    }
}

impl From<io::Error> for Error {
    /// An I/O error with no file to name (a pipe, a thread): prefer
    /// [`IoContext::on`] wherever there is one.
    fn from(e: io::Error) -> Self {
        Error::Msg(chain(&e))
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

impl From<rustix::io::Errno> for Error {
    /// Prefer [`Context`] naming the file wherever there is one.
    fn from(e: rustix::io::Errno) -> Self {
        Error::Msg(io::Error::from(e).to_string())
    }
}

impl From<russh::Error> for Error {
    fn from(e: russh::Error) -> Self {
        Error::Msg(chain(&e))
    }
}

impl From<russh::keys::Error> for Error {
    fn from(e: russh::keys::Error) -> Self {
        Error::Msg(chain(&e))
    }
}

impl From<russh::keys::ssh_key::Error> for Error {
    fn from(e: russh::keys::ssh_key::Error) -> Self {
        Error::Msg(chain(&e))
    }
}

impl From<globset::Error> for Error {
    fn from(e: globset::Error) -> Self {
        Error::Msg(e.to_string())
    }
}

impl From<std::ffi::NulError> for Error {
    fn from(e: std::ffi::NulError) -> Self {
        Error::Msg(e.to_string())
    }
}

impl From<byteback_delta::DeltaError> for Error {
    fn from(e: byteback_delta::DeltaError) -> Self {
        Error::Msg(chain(&e))
    }
}

/// Returns early with an [`Error::Msg`] formatted like `format!`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Msg(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// An [`Error::Msg`] formatted like `format!`.
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::error::Error::Msg(format!($($arg)*))
    };
}
pub(crate) use err;

/// What a server's refusal of our protocol version says (see
/// [`ProtocolError::Version`]).
const VERSION_REFUSED: &str = "must run the same byteback release";

/// What a server's refusal of a backup with a read-only key says: no
/// retry changes the key.
const READ_ONLY_REFUSED: &str = "this key may only list and restore";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_names_the_operation_the_file_and_the_cause() {
        let e = std::fs::File::open("/nonexistent/x")
            .on("cannot open", "/nonexistent/x")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot open /nonexistent/x: No such file or directory (os error 2)"
        );
        // The cause is in the message, so not a source as well: shown once.
        assert!(std::error::Error::source(&e).is_none());
        let e = e.context("restoring /x");
        assert!(e
            .to_string()
            .starts_with("restoring /x: cannot open /nonexistent/x: "));
    }

    #[test]
    fn usage_and_permanent_errors_are_recognised_beneath_context() {
        let e = Error::Usage("--x".into()).context("a").context("b");
        assert!(e.is_usage() && !e.is_permanent());
        assert_eq!(e.to_string(), "b: a: --x");
        assert!(Error::Permanent("HOST KEY CHANGED".into())
            .context("SSH to x")
            .is_permanent());
        assert!(Error::Server("full".into())
            .context("sending")
            .is_from_server());
        // Another release on the other side: not retried.
        let refused = ProtocolError::Version { peer: 9, ours: 10 };
        assert!(refused.to_string().contains(VERSION_REFUSED));
        assert!(Error::Server(format!("protocol error: {refused}")).is_permanent());
        assert!(Error::Protocol(refused).context("hello").is_permanent());
        assert!(!Error::Server("no space left".into()).is_permanent());
    }
}

//! The server library's error: what was being done, to which path, and why.
//!
//! I/O errors carry the operation and the path ([`Error::Io`]); an error
//! while storing one entry or handling one transfer names it
//! ([`Error::Context`]). Every message is whole in its `Display` (the cause
//! included, after a colon), so it reads the same wherever it is printed:
//! the server's log, the Error frame the client shows, a `--json` report.
//! Hence no variant exposes its cause as a `source()` as well, which would
//! print it twice in a reporter that follows the chain.

use std::fmt::Display;
use std::io;

use byteback_protocol::ProtocolError;

/// Result of the server library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the server library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation on a path failed (`op` is a verb phrase:
    /// "open", "create directory", ...).
    #[error("cannot {op} {path}: {cause}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to: a store path, a client path in
        /// `current`, or what it names ("standard output").
        path: String,
        /// Why it failed.
        cause: io::Error,
    },
    /// The wire: a frame that does not decode, a message out of order, the
    /// connection failing.
    #[error("{}", with_causes(.0))]
    Protocol(ProtocolError),
    /// Reading a manifest failed; the message names it.
    #[error("{0}")]
    Manifest(io::Error),
    /// The client asked for something it may not, or sent something
    /// invalid (its fault, not the store's).
    #[error("{0}")]
    Refused(String),
    /// The store is not as it must be (a lock held, a damaged manifest, a
    /// bad configuration, no such snapshot).
    #[error("{0}")]
    Store(String),
    /// A command line that cannot be carried out (options that contradict
    /// each other, no such host or snapshot).
    #[error("{0}")]
    Usage(String),
    /// A broken invariant of the server itself (a bug).
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// An error and what was being done when it happened ("storing PATH",
    /// "writing PATH", ...).
    #[error("{context}: {cause}")]
    Context {
        /// What was being done.
        context: String,
        /// The error.
        cause: Box<Error>,
    },
}

impl Error {
    /// An I/O error while doing `op` to `path`.
    pub fn io(op: &'static str, path: impl Display, cause: io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_string(),
            cause,
        }
    }

    /// Wraps this error with what was being done.
    pub fn context(self, context: impl Display) -> Self {
        Error::Context {
            context: context.to_string(),
            cause: Box::new(self),
        }
    }

    /// The I/O error at the root of this one, if it is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { cause, .. } => Some(cause),
            Error::Protocol(ProtocolError::Io(e)) | Error::Manifest(e) => Some(e),
            Error::Context { cause, .. } => cause.io_error(),
            _ => None,
        }
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

/// `e` and its causes, joined by colons.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Naming the operation and the path of a failed I/O call.
pub trait IoContext<T> {
    /// On error: "cannot `op` `path`: cause". `path` is only formatted then.
    fn op<P: Display>(self, op: &'static str, path: impl FnOnce() -> P) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn op<P: Display>(self, op: &'static str, path: impl FnOnce() -> P) -> Result<T> {
        self.map_err(|e| Error::io(op, path(), e))
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn op<P: Display>(self, op: &'static str, path: impl FnOnce() -> P) -> Result<T> {
        self.map_err(|e| Error::io(op, path(), e.into()))
    }
}

/// Adding what was being done to any error of this crate.
pub trait Context<T> {
    /// On error: "`context`: error". `context` is only built then.
    fn context_with<C: Display>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context_with<C: Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(context()))
    }
}

/// A client path (bytes) for messages: escaped as on the wire.
pub fn shown(path: &[u8]) -> String {
    byteback_protocol::escape_bytes(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_operation_the_path_and_the_cause() {
        let e: Result<()> =
            Err(io::Error::from_raw_os_error(libc::EPERM)).op("create", || shown(b"dir/new\xff"));
        let e = e.context_with(|| "storing dir/new").expect_err("an error");
        let text = e.to_string();
        assert!(
            text.starts_with("storing dir/new: cannot create dir/new"),
            "{text}"
        );
        assert!(text.contains("Operation not permitted"), "{text}");
        assert_eq!(
            e.io_error().and_then(io::Error::raw_os_error),
            Some(libc::EPERM)
        );
        // Printed with its sources (as an error reporter does), the cause is there once.
        let mut chained = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            chained.push_str(&format!(": {c}"));
            cur = c.source();
        }
        assert_eq!(chained.matches("Operation not permitted").count(), 1);
    }
}

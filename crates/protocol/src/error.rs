//! Errors raised while decoding or checking protocol input.

use thiserror::Error;

/// Anything that can be wrong with bytes or messages received from a peer.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The frame length prefix exceeds the cap.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Declared length.
        len: u64,
        /// Allowed maximum.
        max: u64,
    },
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The payload could not be decoded as a message.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// A message could not be encoded (too large).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A value from the peer exceeds a protocol limit.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// A path from the peer is not acceptable.
    #[error("invalid path {path:?}: {reason}")]
    BadPath {
        /// The path, lossily printed.
        path: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A message arrived that the protocol does not allow at this point.
    #[error("unexpected message {got} while {state}")]
    Unexpected {
        /// Name of the message received.
        got: &'static str,
        /// What the session was doing.
        state: &'static str,
    },
    /// The peer speaks another protocol or version.
    #[error(
        "version mismatch: the peer speaks protocol {peer}, we speak {ours} (client and server must run the same byteback release)"
    )]
    Version {
        /// Peer's version.
        peer: u32,
        /// Our version.
        ours: u32,
    },
    /// The peer did not start with the protocol magic.
    #[error("peer is not a byteback endpoint (bad magic; is something printing to stdout?)")]
    BadMagic,
    /// Compressed data did not decompress within its declared size.
    #[error("bad compressed data: {0}")]
    Compression(String),
    /// I/O error on the underlying stream.
    #[error("i/o error on the protocol stream")]
    Io(#[from] std::io::Error),
}

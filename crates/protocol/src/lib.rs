//! The byteback wire protocol: messages, framing, limits and session state.
//!
//! This crate does no I/O of its own beyond optional blocking helpers over
//! `Read`/`Write`: the codec is handed bytes, and the session types check that
//! messages arrive in an order the protocol allows, so a client and a server
//! session can be played against each other in a unit test.
#![deny(missing_docs)]

pub mod codec;
pub mod error;
pub mod limits;
pub mod messages;
pub mod os;
pub mod path;
pub mod session;
pub mod term;
pub mod text;
pub mod unchanged;

pub use codec::{
    decode_client, decode_client_frame, decode_server, decode_server_frame, encode, read_frame,
    read_frame_into, write_client_msg, write_msg, FrameDecoder,
};
pub use error::ProtocolError;
pub use messages::*;
pub use path::{
    compare_paths, has_snapshot_shape, validate_host_name, validate_path, validate_snapshot_name,
};
pub use session::{ClientSession, ServerSession};
pub use text::{escape_bytes, escape_text};

/// Protocol version spoken by this build; both peers must agree exactly.
/// 2: new files cloned from stored ones with the same content ([`Need::twin`],
/// [`ClientMsg::FileClone`], [`ServerMsg::SendData`], [`BackupStats::cloned`]).
/// 3: batches of entries may go zstd-compressed ([`ClientMsg::EntriesZ`]).
/// 4: runs of unchanged entries ([`ClientMsg::Unchanged`]), the manifest's
/// generation in [`ServerMsg::BackupReady`] and [`ServerMsg::BackupDone`].
/// 5: data segments may go as they are ([`ClientMsg::FileRaw`]).
/// 6: restored data may go as it is ([`ServerMsg::FilePartRaw`]).
/// 7: subtrees the client could not read are kept ([`ClientMsg::KeepUnread`],
/// [`BackupStats::kept_unread`]).
/// 8: whether `current` holds a backup no snapshot has
/// ([`ServerMsg::SnapshotKinds`]'s `current_news`).
/// 9: entries the server left out ([`BackupStats::left_out`]).
/// 10: notes on a manifest's entries ([`ServerMsg::ManifestNote`]); device
/// numbers Linux cannot make are refused.
/// 11: hard links between symlinks, FIFOs, sockets and device nodes
/// ([`Kind::HardLink`] names any object but a directory).
pub const PROTOCOL_VERSION: u32 = 11;
/// First bytes of every session, so a stray shell banner is recognised at once.
pub const MAGIC: [u8; 8] = *b"BYTEBAK\x01";

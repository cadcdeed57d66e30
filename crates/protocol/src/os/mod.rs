//! Small OS helpers both sides use: the hole-keeping writer, local time,
//! reading extended attributes and replacing a file atomically.
//!
//! They live here, in the one crate client and server share, so that each
//! exists once. Nothing here resolves a path a local user could change
//! except where a caller hands one in on purpose.

pub mod atomic;
pub mod sparse;
pub mod time;
pub mod xattr;

pub use atomic::{write_atomic, write_atomic_at};
pub use sparse::{is_zero, write_sparse_at, SparseWriter, SPARSE_BLOCK};
pub use time::{localtime, LocalTime};
pub use xattr::{xattr_names, xattr_value, XattrOf};

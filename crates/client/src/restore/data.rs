//! Receiving a restored file's content: parts from the server, checked
//! against the manifest's size, hashed and written with holes kept; a large
//! file is written by a thread of its own while its next parts arrive.

use std::cell::RefCell;
use std::fs::File;
use std::sync::mpsc::{channel, sync_channel};

use crate::conn::Connection;
use crate::error::{bail, IoContext, Result};
use byteback_delta::FileHasher;
use byteback_protocol::codec::ChunkDecompressor;
use byteback_protocol::os::SparseWriter;
use byteback_protocol::{RawBytes, ServerMsg};

/// Files of at least this many bytes are written by a thread of their own
/// while the next parts are received and hashed: in a restore of large
/// files from a local store, the client's one thread spent more than half
/// its time in `pwrite` while the server waited for it.
const WRITE_BESIDE_FROM: u64 = 4 << 20;

/// Parts handed to that thread and not yet written back, at most...
const WRITES_QUEUED: usize = 4;

/// ...and at most this many bytes of them beyond the part in hand: four of
/// the server's parts of a MiB, and no more than one of [`MAX_CHUNK`] (a
/// hostile server's largest), whatever their size.
///
/// [`MAX_CHUNK`]: byteback_protocol::limits::MAX_CHUNK
const WRITES_QUEUED_BYTES: usize = 4 << 20;

/// Unpacked buffers kept for the next parts (see [`UNPACK`]).
const SPARE_BUFFERS: usize = WRITES_QUEUED + 2;

thread_local! {
    /// The zstd context file parts are unpacked with and the buffers they
    /// are unpacked into, kept from part to part and file to file (a fresh
    /// megabyte per part cost page faults for every one of them).
    static UNPACK: RefCell<Option<(ChunkDecompressor, Vec<Vec<u8>>)>> =
        const { RefCell::new(None) };
}

/// One part's bytes, and where their buffer goes back to once written.
struct Part {
    bytes: RawBytes,
    /// Read as a frame (`FilePartRaw`): back to the connection; else unpacked.
    frame: bool,
}

impl Part {
    fn recycle(self, conn: &mut Connection) {
        let buf = self.bytes.into_buf();
        match self.frame {
            true => conn.give_back(buf),
            false => UNPACK.with(|u| {
                if let Some((_, spare)) = &mut *u.borrow_mut() {
                    if spare.len() < SPARE_BUFFERS {
                        spare.push(buf);
                    }
                }
            }),
        }
    }
}

/// Streams the content of the file asked for (see `ReadAhead::take`) from
/// the server into `file`, keeping holes.
///
/// More data than the manifest's `size` ends the restore (the server broke
/// the protocol); a short file or a BLAKE3 mismatch is returned as the
/// problem. Without a `hash` (a 1.x snapshot) only the size is checked.
pub(super) fn fetch(
    conn: &mut Connection,
    size: u64,
    hash: Option<&[u8; 32]>,
    file: File,
    shown: &str,
) -> Result<(File, Option<String>)> {
    let mut h = FileHasher::new();
    let (file, got) = if size >= WRITE_BESIDE_FROM {
        write_beside(conn, size, &mut h, file, shown)?
    } else {
        let mut w = SparseWriter::new(file);
        let got = receive(conn, size, shown, |conn, part| {
            h.update(part.bytes.as_slice());
            let written = w.write_all(part.bytes.as_slice());
            part.recycle(conn);
            written.on("cannot write", shown)
        })?;
        (w.finish().on("cannot write", shown)?, got)
    };
    let problem = if got != size {
        Some(format!("the server sent {got} of its {size} bytes"))
    } else if hash.is_some_and(|hash| &h.finish() != hash) {
        Some("its content does not match its BLAKE3 in the manifest".to_string())
    } else {
        None
    };
    Ok((file, problem))
}

/// Receives the parts of one file up to its `FileDone`, handing each to
/// `put`; returns the number of bytes received.
fn receive(
    conn: &mut Connection,
    size: u64,
    shown: &str,
    mut put: impl FnMut(&mut Connection, Part) -> Result<()>,
) -> Result<u64> {
    let mut got = 0u64;
    loop {
        let part = match conn.recv()? {
            ServerMsg::FilePart(c) => {
                got = take_part(got, c.raw_len.into(), size, shown)?;
                let out = UNPACK.with(|u| -> Result<Vec<u8>> {
                    let mut u = u.borrow_mut();
                    let (d, spare) = match &mut *u {
                        Some(u) => u,
                        None => u.insert((ChunkDecompressor::new()?, Vec::new())),
                    };
                    let mut out = spare.pop().unwrap_or_default();
                    d.decompress_into(&c, &mut out)?;
                    Ok(out)
                })?;
                Part {
                    bytes: out.into(),
                    frame: false,
                }
            }
            ServerMsg::FilePartRaw(bytes) => {
                got = take_part(got, bytes.len() as u64, size, shown)?;
                Part { bytes, frame: true }
            }
            ServerMsg::FileDone => return Ok(got),
            m => bail!(
                "unexpected {} from the server while receiving {shown}",
                m.name()
            ),
        };
        put(conn, part)?;
    }
}

/// `got` plus a part of `n` bytes, unless that is more than the manifest's
/// `size` (the server broke the protocol: the restore ends).
fn take_part(got: u64, n: u64, size: u64, shown: &str) -> Result<u64> {
    if n == 0 {
        // The server never sends one; a stream of them would keep a
        // restore waiting forever without tripping the I/O timeout.
        bail!("the server sent an empty part of {shown}; refusing");
    }
    match got.checked_add(n) {
        Some(total) if total <= size => Ok(total),
        _ => bail!(
            "the server sent more than the {size} bytes the manifest gives for {shown}; refusing"
        ),
    }
}

/// [`receive`] into `file` written by a thread of its own: this one
/// receives and hashes, the other writes, at most [`WRITES_QUEUED`] parts
/// and [`WRITES_QUEUED_BYTES`] behind. A write that fails stops the writer, and the restore with its
/// error, at the next part.
fn write_beside(
    conn: &mut Connection,
    size: u64,
    h: &mut FileHasher,
    file: File,
    shown: &str,
) -> Result<(File, u64)> {
    let (queue, parts) = sync_channel::<Part>(WRITES_QUEUED);
    let (give_back, written) = channel::<Part>();
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> std::io::Result<File> {
            let mut w = SparseWriter::new(file);
            for part in parts {
                let r = w.write_all(part.bytes.as_slice());
                let _ = give_back.send(part);
                r?; // ends the loop: the receiver sees the queue closed
            }
            w.finish()
        });
        let mut queued = 0usize; // bytes handed over and not yet back
        let back = |conn: &mut Connection, done: Part, queued: &mut usize| {
            *queued -= done.bytes.len();
            done.recycle(conn);
        };
        let received = receive(conn, size, shown, |conn, part| {
            h.update(part.bytes.as_slice());
            for done in written.try_iter() {
                back(conn, done, &mut queued);
            }
            while queued > WRITES_QUEUED_BYTES.saturating_sub(part.bytes.len()) {
                match written.recv() {
                    Ok(done) => back(conn, done, &mut queued),
                    Err(_) => break, // the writer has stopped
                }
            }
            queued += part.bytes.len();
            // A closed queue means the writer failed: its error is below.
            queue.send(part).map_err(|_| crate::error::Error::Closed)
        });
        drop(queue);
        let file = writer.join();
        for done in written.try_iter() {
            back(conn, done, &mut queued);
        }
        let file = match file {
            Ok(file) => file.on("cannot write", shown)?,
            Err(_) => bail!("the thread writing {shown} panicked"),
        };
        Ok((file, received?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Transport;
    use byteback_delta::hash_bytes;
    use byteback_protocol::limits::MAX_CHUNK;
    use byteback_protocol::{encode, ClientMsg, Compressed, PROTOCOL_VERSION};

    /// A connection whose server answers one `ReadFile` with `parts` and
    /// `FileDone`.
    fn conn_with(parts: &[ServerMsg]) -> Connection {
        let hello = ServerMsg::HelloOk {
            version: PROTOCOL_VERSION,
            host: "h".into(),
        };
        let mut bytes = encode(&hello).unwrap();
        for m in parts.iter().chain([&ServerMsg::FileDone]) {
            bytes.extend(encode(m).unwrap());
        }
        let mut conn = Connection::handshake(
            Box::new(std::io::Cursor::new(bytes)),
            Box::new(std::io::sink()),
            Transport::None,
        )
        .unwrap();
        conn.send(&ClientMsg::ReadFile {
            snapshot: "s".into(),
            path: b"f".to_vec(),
        })
        .unwrap();
        conn
    }

    /// `len` bytes of noise with a MiB of zeros (a hole) in the middle.
    fn content(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut v: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mid = len / 2;
        v[mid - mid.min(1 << 19)..(mid + (1 << 19)).min(len)].fill(0);
        v
    }

    /// `data` in parts of a MiB, zstd frames and raw bytes by turns.
    fn parts_of(data: &[u8]) -> Vec<ServerMsg> {
        parts_sized(data, 1 << 20)
    }

    fn parts_sized(data: &[u8], len: usize) -> Vec<ServerMsg> {
        let part = |(i, c): (usize, &[u8])| match i % 2 {
            0 => ServerMsg::FilePart(Compressed::compress(c, 1).unwrap()),
            _ => ServerMsg::FilePartRaw(c.to_vec().into()),
        };
        data.chunks(len).enumerate().map(part).collect()
    }

    /// Parts as large as the protocol allows (a hostile server's, beyond
    /// the writer's byte budget) are written all the same.
    #[test]
    fn parts_of_the_largest_size_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = content(3 * MAX_CHUNK + 5);
        let mut conn = conn_with(&parts_sized(&data, MAX_CHUNK));
        let file = File::create(&path).unwrap();
        let hash = hash_bytes(&data);
        let (_, problem) = fetch(&mut conn, data.len() as u64, Some(&hash), file, "f").unwrap();
        assert_eq!(problem, None);
        assert!(std::fs::read(&path).unwrap() == data, "bytes differ");
    }

    const SIZES: [usize; 5] = [0, 5, (1 << 20) + 3, WRITE_BESIDE_FROM as usize, 9 << 20];

    #[test]
    fn files_of_every_size_are_written_hashed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for len in SIZES {
            let data = content(len);
            let size = len as u64;
            let fetched = |parts: &[ServerMsg], size: u64, hash: [u8; 32]| {
                let file = File::create(&path).unwrap();
                fetch(&mut conn_with(parts), size, Some(&hash), file, "f")
            };
            let parts = parts_of(&data);
            let (_, problem) = fetched(&parts, size, hash_bytes(&data)).unwrap();
            assert_eq!(problem, None, "{len}");
            assert!(std::fs::read(&path).unwrap() == data, "{len} bytes differ");
            let (_, problem) = fetched(&parts, size, [7; 32]).unwrap();
            assert!(
                problem.unwrap().contains("does not match its BLAKE3"),
                "{len}"
            );
            if len > 0 {
                // One byte short, one byte more than the manifest says.
                let (_, problem) = fetched(&parts, size + 1, hash_bytes(&data)).unwrap();
                assert!(problem.unwrap().contains("sent"), "{len}");
                let e = fetched(&parts, size - 1, hash_bytes(&data)).unwrap_err();
                assert!(format!("{e:#}").contains("more than the"), "{len}: {e:#}");
            }
        }
    }

    /// A file that cannot be written (here: opened read-only) ends the
    /// restore with the write's error, whichever thread writes it.
    #[test]
    fn a_write_that_fails_ends_the_restore_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        for len in SIZES.into_iter().filter(|&l| l > 5) {
            let data = content(len);
            let file = File::open(&path).unwrap();
            let mut conn = conn_with(&parts_of(&data));
            let e = fetch(&mut conn, len as u64, Some(&hash_bytes(&data)), file, "f").unwrap_err();
            assert!(format!("{e:#}").contains("cannot write"), "{len}: {e:#}");
        }
    }
}

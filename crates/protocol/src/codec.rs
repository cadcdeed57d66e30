//! Framing: a 4-byte little-endian length, then a bincode-encoded message.
//!
//! The length is checked against [`MAX_FRAME`] before anything is allocated,
//! and bincode decodes under the same limit, so no frame can make us reserve
//! more memory than the cap. A partial frame is "need more bytes", not an error.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ProtocolError;
use crate::limits::MAX_FRAME;
use crate::messages::{ClientMsg, Compressed, ServerMsg};

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes one message as a complete frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = vec![0u8; 4];
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(ProtocolError::Encode(format!(
            "message of {len} bytes exceeds frame limit"
        )));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtocolError> {
    let (msg, used): (T, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(ProtocolError::Decode(format!(
            "{} trailing bytes in frame",
            payload.len() - used
        )));
    }
    Ok(msg)
}

/// Decodes and validates a client message from a frame payload. A
/// compressed batch of entries ([`ClientMsg::EntriesZ`]) comes back as the
/// [`ClientMsg::Entries`] it holds (at most [`crate::limits::MAX_CHUNK`] bytes
/// once decompressed; anything else inside is refused).
pub fn decode_client(payload: &[u8]) -> Result<ClientMsg, ProtocolError> {
    let msg: ClientMsg = match decode(payload)? {
        ClientMsg::EntriesZ(z) => match decode(&z.decompress()?)? {
            m @ ClientMsg::Entries(_) => m,
            other => {
                return Err(ProtocolError::Decode(format!(
                    "a compressed batch holds {}, not Entries",
                    other.name()
                )))
            }
        },
        m => m,
    };
    msg.validate()?;
    Ok(msg)
}

/// [`decode_client`] of the frame payload `frame[..n]`, except that a
/// [`ClientMsg::FileRaw`] takes `frame` over instead of copying its bytes
/// out of it (`frame` is left empty; the receiver may give the buffer back
/// when done, see [`RawBytes::into_buf`](crate::RawBytes::into_buf)).
pub fn decode_client_frame(frame: &mut Vec<u8>, n: usize) -> Result<ClientMsg, ProtocolError> {
    let payload = frame_payload(frame, n)?;
    let Some((Some(id), start)) = raw_header(payload, FILE_RAW, true) else {
        return decode_client(payload);
    };
    let msg = ClientMsg::FileRaw {
        id,
        delta: take_raw(frame, n, start),
    };
    msg.validate()?;
    Ok(msg)
}

/// [`decode_server`] of the frame payload `frame[..n]`, except that a
/// [`ServerMsg::FilePartRaw`] takes `frame` over, as
/// [`decode_client_frame`] does for [`ClientMsg::FileRaw`].
pub fn decode_server_frame(frame: &mut Vec<u8>, n: usize) -> Result<ServerMsg, ProtocolError> {
    let payload = frame_payload(frame, n)?;
    let Some((None, start)) = raw_header(payload, FILE_PART_RAW, false) else {
        return decode_server(payload);
    };
    let msg = ServerMsg::FilePartRaw(take_raw(frame, n, start));
    msg.validate()?;
    Ok(msg)
}

fn frame_payload(frame: &[u8], n: usize) -> Result<&[u8], ProtocolError> {
    frame.get(..n).ok_or_else(|| {
        ProtocolError::Decode(format!("frame of {n} bytes in a buffer of {}", frame.len()))
    })
}

/// `frame[start..n]`, taking the buffer over (whole, to be given back).
fn take_raw(frame: &mut Vec<u8>, n: usize, start: usize) -> crate::RawBytes {
    crate::RawBytes::part(std::mem::take(frame), start, n)
}

/// Index of [`ClientMsg::FileRaw`] among the variants (bincode encodes it first).
const FILE_RAW: u32 = 16;
/// Index of [`ServerMsg::FilePartRaw`] among the variants.
const FILE_PART_RAW: u32 = 15;

/// For a payload that is exactly one well-formed message of enum variant
/// `variant` holding (an id if `with_id`, then) a byte string: the id and
/// where the bytes start. Anything else (another message, or a malformed
/// one, left to the full decoder to refuse) gives `None`.
fn raw_header(payload: &[u8], variant: u32, with_id: bool) -> Option<(Option<u32>, usize)> {
    let mut at = 0usize;
    let next = |at: &mut usize| -> Option<u64> {
        let (v, used): (u64, usize) =
            bincode::decode_from_slice(payload.get(*at..)?, config()).ok()?;
        *at += used;
        Some(v)
    };
    if next(&mut at)? != u64::from(variant) {
        return None;
    }
    let id = match with_id {
        true => Some(u32::try_from(next(&mut at)?).ok()?),
        false => None,
    };
    let len = next(&mut at)?;
    (len == (payload.len() - at) as u64).then_some((id, at))
}

/// Batches of entries whose encoding is at least this long go compressed.
const COMPRESS_ENTRIES_FROM: usize = 1024;

/// Writes a client message as one frame: [`write_msg`], except that a batch
/// of entries of at least [`COMPRESS_ENTRIES_FROM`] bytes goes as a
/// [`ClientMsg::EntriesZ`] when that is smaller.
pub fn write_client_msg<W: Write>(w: &mut W, msg: &ClientMsg) -> Result<(), ProtocolError> {
    if let ClientMsg::Entries(_) = msg {
        let plain = encode(msg)?;
        let body = &plain[4..];
        if body.len() >= COMPRESS_ENTRIES_FROM && body.len() <= crate::limits::MAX_CHUNK {
            let z = ClientMsg::EntriesZ(Compressed::compress(body, 3)?);
            let packed = encode(&z)?;
            if packed.len() < plain.len() {
                w.write_all(&packed)?;
                return Ok(());
            }
        }
        w.write_all(&plain)?;
        return Ok(());
    }
    write_msg(w, msg)
}

/// Decodes and validates a server message from a frame payload.
pub fn decode_server(payload: &[u8]) -> Result<ServerMsg, ProtocolError> {
    let msg: ServerMsg = decode(payload)?;
    msg.validate()?;
    Ok(msg)
}

fn check_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME as u64,
        });
    }
    Ok(len)
}

/// Sans-IO frame splitter: push bytes in, take whole frame payloads out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole frame's payload; `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = check_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let payload = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(payload))
    }

    /// Whether bytes of an incomplete frame are buffered (matters at end of stream).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// Reads one frame payload; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut buf = Vec::new();
    Ok(read_frame_into(r, &mut buf)?.map(|n| {
        buf.truncate(n);
        buf
    }))
}

/// Capacity of the `BufReader` both peers read frames from. Far below a
/// data frame's size: a `BufReader` hands a read at least as large as its
/// capacity straight to the stream once its buffer is empty, so
/// [`read_frame_into`] receives all but the first few KiB of a data frame
/// directly into the frame buffer; with a buffer of a MiB, every byte of a
/// restore went through it first (a copy of everything received).
pub const READ_BUFFER: usize = 64 << 10;

/// Bytes a frame buffer grows by at a time, as the payload arrives.
const FRAME_GROW_STEP: usize = 1 << 20;

/// Reads one frame payload into `buf[..n]` and returns `n`; `Ok(None)` on a
/// clean end of stream between frames. `buf` is meant to be kept from frame
/// to frame: it only grows (zeroed as it grows, at most a MiB ahead of the
/// payload received, so a peer announcing a large frame gets no memory for
/// bytes it has not sent), so once it is as large as the frames, reading one
/// costs no zeroing. (`read_to_end` into spare capacity zeroed every frame
/// first: 4 % of the server's time receiving a large file.)
pub fn read_frame_into<R: Read>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, ProtocolError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_len(prefix)?;
    let mut got = 0;
    while got < len {
        let ahead = len.min(got + FRAME_GROW_STEP);
        if buf.len() < ahead {
            buf.resize(ahead, 0);
        }
        match r.read(&mut buf[got..ahead]) {
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(len))
}

/// The zstd level file data is compressed at (backups over SSH, restores).
///
/// Level -1, not 1: it leaves literals uncompressed (no Huffman stage),
/// which costs ratio on text and little on mixed data, and halves the CPU
/// spent on files with incompressible parts. Compressing every file of a
/// tree on its own, as backups do (`ChunkCompressor`, one core): W1's mix of
/// random bytes and words 400 against 241-255 MB/s, decompressed 1,290-1,340
/// against 600 MB/s, ratio 1.28 against 1.33; `/usr/share` 370 against 274
/// MB/s, decompressed 1,350 against 1,090 MB/s, ratio 1.87 against 2.03.
pub const DATA_LEVEL: i32 = -1;

/// Raw chunks at least this long are checked for compressibility first.
const SAMPLE_FROM: usize = 256 << 10;
/// Bytes compressed to decide whether a chunk is worth compressing.
const SAMPLE_LEN: usize = 64 << 10;
/// Largest block of a zstd frame (the format's `Block_Maximum_Size`).
const ZSTD_BLOCK_MAX: usize = 128 << 10;

/// Compresses data chunks with one reusable zstd context.
///
/// A chunk whose first 64 KiB do not shrink by at least 2% is stored: sent
/// as a zstd frame of raw blocks, written at memcpy speed. zstd would do
/// the same after spending most of its time looking for matches in
/// incompressible data (already compressed or encrypted files, media).
pub struct ChunkCompressor {
    cctx: zstd::bulk::Compressor<'static>,
    sample: Vec<u8>,
}

impl ChunkCompressor {
    /// A compressor at zstd `level`.
    pub fn new(level: i32) -> Result<Self, ProtocolError> {
        Ok(ChunkCompressor {
            cctx: zstd::bulk::Compressor::new(level)
                .map_err(|e| ProtocolError::Encode(e.to_string()))?,
            sample: Vec::with_capacity(zstd::zstd_safe::compress_bound(SAMPLE_LEN)),
        })
    }

    /// Compresses (or stores) `raw`, at most [`MAX_CHUNK`](crate::limits::MAX_CHUNK) bytes.
    pub fn compress(&mut self, raw: &[u8]) -> Result<Compressed, ProtocolError> {
        self.compress_into(raw, Vec::new())
    }

    /// Like [`compress`](Self::compress), but into `out` (cleared first,
    /// grown only if its capacity is below [`compress_bound`]`(raw.len())`),
    /// so the caller can recycle the buffers of sent chunks.
    pub fn compress_into(&mut self, raw: &[u8], out: Vec<u8>) -> Result<Compressed, ProtocolError> {
        match self.compress_if_worth_it(raw, out)? {
            Ok(c) => Ok(c),
            Err(out) => Self::store_into(raw, out),
        }
    }

    /// Compresses `raw` into `out` like [`compress_into`](Self::compress_into)
    /// unless its first 64 KiB say compressing is not worth it: then gives
    /// `out` back (`Ok(Err(out))`) for the caller to send `raw` as it is.
    pub fn compress_if_worth_it(
        &mut self,
        raw: &[u8],
        mut out: Vec<u8>,
    ) -> Result<Result<Compressed, Vec<u8>>, ProtocolError> {
        check_chunk_len(raw)?;
        if raw.len() >= SAMPLE_FROM && !self.worth_compressing(&raw[..SAMPLE_LEN])? {
            return Ok(Err(out));
        }
        out.clear();
        out.reserve(compress_bound(raw.len()));
        self.cctx
            .compress_to_buffer(raw, &mut out)
            .map_err(|e| ProtocolError::Encode(e.to_string()))?;
        Ok(Ok(Compressed {
            raw_len: raw.len() as u32,
            data: out,
        }))
    }

    /// Stores `raw` (at most [`MAX_CHUNK`](crate::limits::MAX_CHUNK) bytes)
    /// without compressing it: a zstd frame of raw blocks, which every
    /// decompressor reads, built at memcpy speed into `out` (cleared first).
    pub fn store_into(raw: &[u8], mut out: Vec<u8>) -> Result<Compressed, ProtocolError> {
        check_chunk_len(raw)?;
        out.clear();
        out.reserve(compress_bound(raw.len()));
        stored_frame_into(raw, &mut out);
        Ok(Compressed {
            raw_len: raw.len() as u32,
            data: out,
        })
    }

    fn worth_compressing(&mut self, sample: &[u8]) -> Result<bool, ProtocolError> {
        self.sample.clear();
        self.cctx
            .compress_to_buffer(sample, &mut self.sample)
            .map_err(|e| ProtocolError::Encode(e.to_string()))?;
        Ok(self.sample.len() * 50 < sample.len() * 49)
    }
}

/// Capacity [`ChunkCompressor::compress_into`] needs for `raw_len` bytes: enough
/// for zstd's worst case and for a stored frame.
pub fn compress_bound(raw_len: usize) -> usize {
    let blocks = raw_len.div_ceil(ZSTD_BLOCK_MAX).max(1);
    zstd::zstd_safe::compress_bound(raw_len).max(raw_len + 9 + 3 * blocks)
}

/// Appends `raw` to `out` as a zstd frame of raw (stored) blocks: magic, a
/// single-segment header with a 4-byte content size, then blocks of at most 128 KiB.
fn stored_frame_into(raw: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    // Frame_Content_Size_flag = 2 (4 bytes), Single_Segment_flag, no checksum, no dictionary.
    out.push(0b1010_0000);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    let mut chunks = raw.chunks(ZSTD_BLOCK_MAX).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]); // one empty, last, raw block
    }
    while let Some(c) = chunks.next() {
        let last = u32::from(chunks.peek().is_none());
        // Block_Header: Last_Block bit, Block_Type 0 (raw), Block_Size.
        let header = last | (c.len() as u32) << 3;
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(c);
    }
}

/// A chunk to be sent is at most [`MAX_CHUNK`](crate::limits::MAX_CHUNK) bytes.
fn check_chunk_len(raw: &[u8]) -> Result<(), ProtocolError> {
    if raw.len() > crate::limits::MAX_CHUNK {
        return Err(ProtocolError::Encode(format!(
            "chunk of {} bytes too large",
            raw.len()
        )));
    }
    Ok(())
}

/// Decompresses data chunks with one reusable zstd context into one
/// reusable buffer, under the same caps as [`Compressed::decompress`].
pub struct ChunkDecompressor {
    dctx: zstd::bulk::Decompressor<'static>,
}

impl ChunkDecompressor {
    /// A decompressor.
    pub fn new() -> Result<Self, ProtocolError> {
        Ok(ChunkDecompressor {
            dctx: zstd::bulk::Decompressor::new()
                .map_err(|e| ProtocolError::Compression(e.to_string()))?,
        })
    }

    /// Decompresses `c` into `out` (replacing its contents), refusing
    /// anything larger than declared or than [`MAX_CHUNK`](crate::limits::MAX_CHUNK).
    pub fn decompress_into(
        &mut self,
        c: &Compressed,
        out: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        let raw_len = c.raw_len as usize;
        if raw_len > crate::limits::MAX_CHUNK {
            return Err(ProtocolError::Limit(format!(
                "declared chunk of {raw_len} bytes"
            )));
        }
        out.clear();
        // zstd writes into the spare capacity and never beyond it, and every
        // reservation here is at most MAX_CHUNK, so no frame can make it grow.
        out.reserve_exact(raw_len);
        let n = self
            .dctx
            .decompress_to_buffer(&c.data, out)
            .map_err(|e| ProtocolError::Compression(e.to_string()))?;
        if n != raw_len || out.len() != raw_len {
            return Err(ProtocolError::Compression(format!(
                "chunk decompressed to {n} bytes, {raw_len} declared"
            )));
        }
        Ok(())
    }
}

/// Encodes and writes one message (does not flush).
///
/// The message is encoded straight into `w` after its measured length, not
/// into a frame buffer first: a data message is megabytes, and the extra
/// buffer and copy cost both memory and time on every segment.
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    let enc_err = |e: bincode::error::EncodeError| ProtocolError::Encode(e.to_string());
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, config()).map_err(enc_err)?;
    let len = size.bytes_written;
    if len > MAX_FRAME {
        return Err(ProtocolError::Encode(format!(
            "message of {len} bytes exceeds frame limit"
        )));
    }
    w.write_all(&(len as u32).to_le_bytes())?;
    let written = bincode::serde::encode_into_std_write(msg, w, config()).map_err(|e| match e {
        bincode::error::EncodeError::Io { inner, .. } => ProtocolError::Io(inner),
        e => enc_err(e),
    })?;
    if written != len {
        return Err(ProtocolError::Encode(format!(
            "message encoded to {written} bytes, {len} measured"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    fn batch(n: usize) -> ClientMsg {
        ClientMsg::Entries(
            (0..n)
                .map(|i| Entry {
                    path: format!("srv/www/site/htdocs/images/{i:06}.png").into_bytes(),
                    kind: Kind::File { size: i as u64 },
                    mode: 0o644,
                    uid: 33,
                    gid: 33,
                    mtime_sec: 1_700_000_000 + i as i64,
                    mtime_nsec: 0,
                    xattrs: vec![],
                })
                .collect(),
        )
    }

    #[test]
    fn a_large_batch_goes_compressed_and_comes_back_as_entries() {
        let msg = batch(1000);
        let plain = encode(&msg).unwrap();
        let mut wire = Vec::new();
        write_client_msg(&mut wire, &msg).unwrap();
        assert!(
            wire.len() * 3 < plain.len(),
            "{} vs {}",
            wire.len(),
            plain.len()
        );
        assert_eq!(decode_client(&wire[4..]).unwrap(), msg);
        // A small batch and other messages go as they are.
        let small = batch(2);
        let mut wire = Vec::new();
        write_client_msg(&mut wire, &small).unwrap();
        assert_eq!(wire, encode(&small).unwrap());
        let mut wire = Vec::new();
        write_client_msg(&mut wire, &ClientMsg::Bye).unwrap();
        assert_eq!(wire, encode(&ClientMsg::Bye).unwrap());
    }

    #[test]
    fn a_compressed_batch_must_hold_valid_entries_within_the_caps() {
        let wrap = |inner: &ClientMsg| {
            let body = encode(inner).unwrap();
            ClientMsg::EntriesZ(Compressed::compress(&body[4..], 3).unwrap())
        };
        // Anything but Entries inside is refused, a nested EntriesZ too.
        let bye = wrap(&ClientMsg::Bye);
        assert!(decode_client(&encode(&bye).unwrap()[4..]).is_err());
        let nested = wrap(&wrap(&batch(3)));
        assert!(decode_client(&encode(&nested).unwrap()[4..]).is_err());
        // The entries inside are validated as any batch.
        let ClientMsg::Entries(mut entries) = batch(3) else {
            unreachable!()
        };
        entries[1].path = b"../escape".to_vec();
        let bad = wrap(&ClientMsg::Entries(entries));
        assert!(decode_client(&encode(&bad).unwrap()[4..]).is_err());
        // A declared size over the cap is refused before decompressing.
        let bomb = ClientMsg::EntriesZ(Compressed {
            raw_len: (crate::limits::MAX_CHUNK + 1) as u32,
            data: vec![0; 16],
        });
        assert!(decode_client(&encode(&bomb).unwrap()[4..]).is_err());
    }

    /// A sequence longer than the protocol allows is refused on its
    /// length, before any element is decoded: an element may take many
    /// times its bytes on the wire in memory (an empty xattr pair, 2 bytes
    /// sent, 48 held), so 20 MiB of them would have been about a GB.
    #[test]
    fn a_sequence_over_its_cap_is_refused_before_its_elements_are_decoded() {
        let ClientMsg::Entries(mut entries) = batch(1) else {
            unreachable!()
        };
        entries[0].xattrs = (0..=crate::limits::MAX_XATTRS)
            .map(|i| (format!("user.{i}").into_bytes(), vec![]))
            .collect();
        let err = decode_client(&encode(&ClientMsg::Entries(entries)).unwrap()[4..]).unwrap_err();
        assert!(err.to_string().contains("more than 256 xattrs"), "{err}");
        // The length alone says so: a frame claiming 2^40 elements and
        // holding none is refused for the count, not for ending early.
        let huge = |variant: u8| {
            let mut p = vec![variant, 0xfd];
            p.extend_from_slice(&(1u64 << 40).to_le_bytes());
            p
        };
        let entries_variant = encode(&batch(0)).unwrap()[4];
        let err = decode_client(&huge(entries_variant)).unwrap_err();
        assert!(err.to_string().contains("more than 1024 entries"), "{err}");
        let needs_variant = encode(&ServerMsg::Needs(vec![])).unwrap()[4];
        let err = decode_server(&huge(needs_variant)).unwrap_err();
        assert!(err.to_string().contains("more than 1024 entries"), "{err}");
        let kinds = ServerMsg::SnapshotKinds {
            snapshots: vec![],
            current: None,
            current_news: CurrentNews::No,
        };
        let mut p = encode(&kinds).unwrap()[4..].to_vec();
        p.splice(1..2, [0xfd].into_iter().chain((1u64 << 40).to_le_bytes()));
        let err = decode_server(&p).unwrap_err();
        assert!(
            err.to_string().contains("more than 100000 snapshots"),
            "{err}"
        );
        // Within the caps, nothing changes.
        let msg = ServerMsg::Needs(vec![]);
        assert_eq!(decode_server(&encode(&msg).unwrap()[4..]).unwrap(), msg);
    }

    #[test]
    fn round_trip_through_decoder() {
        let msgs = vec![
            ClientMsg::Hello {
                magic: crate::MAGIC,
                version: 1,
            },
            ClientMsg::Entries(vec![Entry {
                path: b"a\xff/b\nc".to_vec(),
                kind: Kind::Symlink {
                    target: b"/abs".to_vec(),
                },
                mode: 0o4755,
                uid: 1,
                gid: 2,
                mtime_sec: -5,
                mtime_nsec: 999_999_999,
                xattrs: vec![(b"user.x".to_vec(), vec![0, 1, 2])],
            }]),
            ClientMsg::BackupEnd,
        ];
        let mut dec = FrameDecoder::new();
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        // Feed byte by byte: partial frames must give Ok(None).
        let mut out = vec![];
        for b in bytes {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(decode_client(&f).unwrap());
            }
        }
        assert_eq!(out, msgs);
        assert!(!dec.has_partial());
    }

    /// The edges of reading frames: a length of exactly MAX_FRAME passes
    /// and one more does not; a frame that ends the stream is read and the
    /// end is clean, one cut short is Truncated; bytes of a frame not
    /// complete yet are partial; an interrupted read is tried again, any
    /// other error ends the read (never a loop).
    #[test]
    fn frame_reading_edges() {
        assert_eq!(
            check_len((MAX_FRAME as u32).to_le_bytes()).unwrap(),
            MAX_FRAME
        );
        assert!(matches!(
            check_len((MAX_FRAME as u32 + 1).to_le_bytes()),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let mut dec = FrameDecoder::new();
        dec.push(&[1, 0, 0]);
        assert!(dec.has_partial());
        assert!(dec.next_frame().unwrap().is_none());
        let bytes = encode(&ClientMsg::BackupEnd).unwrap();
        let mut buf = vec![];
        let mut r = &bytes[..];
        assert_eq!(
            read_frame_into(&mut r, &mut buf).unwrap(),
            Some(bytes.len() - 4)
        );
        assert_eq!(read_frame_into(&mut r, &mut buf).unwrap(), None);
        let mut cut = &bytes[..bytes.len() - 1];
        assert!(matches!(
            read_frame_into(&mut cut, &mut buf),
            Err(ProtocolError::Truncated)
        ));
        let mut cut = &bytes[..2];
        assert!(matches!(
            read_frame_into(&mut cut, &mut buf),
            Err(ProtocolError::Truncated)
        ));
        /// Every other read fails with `kind` while the bytes read so far
        /// are within `fail`; the others give a byte.
        struct Flaky<'a> {
            data: &'a [u8],
            read: usize,
            fail: std::ops::Range<usize>,
            calls: u32,
            kind: std::io::ErrorKind,
        }
        impl std::io::Read for Flaky<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.calls += 1;
                assert!(self.calls < 1000, "read again after an error");
                if self.calls % 2 == 1 && self.fail.contains(&self.read) {
                    return Err(std::io::Error::from(self.kind));
                }
                self.read += 1;
                let n = self.data.len().min(b.len()).min(1);
                b[..n].copy_from_slice(&self.data[..n]);
                self.data = &self.data[n..];
                Ok(n)
            }
        }
        let flaky = |fail, kind| Flaky {
            data: &bytes,
            read: 0,
            fail,
            calls: 0,
            kind,
        };
        let mut r = flaky(0..usize::MAX, std::io::ErrorKind::Interrupted);
        assert_eq!(
            read_frame_into(&mut r, &mut buf).unwrap(),
            Some(bytes.len() - 4)
        );
        // In the length prefix, and in the payload.
        for fail in [0..4, 4..usize::MAX] {
            let mut r = flaky(fail, std::io::ErrorKind::ConnectionReset);
            assert!(matches!(
                read_frame_into(&mut r, &mut buf),
                Err(ProtocolError::Io(_))
            ));
        }
    }

    /// A chunk declared larger than MAX_CHUNK is refused before any
    /// memory is reserved for it; one of exactly MAX_CHUNK is read.
    #[test]
    fn a_chunk_declared_too_large_is_refused() {
        let mut d = ChunkDecompressor::new().unwrap();
        let mut out = vec![];
        let c = Compressed {
            raw_len: crate::limits::MAX_CHUNK as u32 + 1,
            data: vec![0; 16],
        };
        assert!(matches!(
            d.decompress_into(&c, &mut out),
            Err(ProtocolError::Limit(_))
        ));
        assert!(out.capacity() < 1 << 20);
        let raw = vec![9u8; crate::limits::MAX_CHUNK];
        let c = ChunkCompressor::store_into(&raw, vec![]).unwrap();
        d.decompress_into(&c, &mut out).unwrap();
        assert_eq!(out, raw);
        // Declared shorter than it is: refused.
        let c = Compressed {
            raw_len: 10,
            data: ChunkCompressor::store_into(&[1u8; 11], vec![])
                .unwrap()
                .data,
        };
        assert!(d.decompress_into(&c, &mut out).is_err());
    }

    #[test]
    fn oversized_frame_refused_before_allocation() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_le_bytes());
        assert!(matches!(
            dec.next_frame(),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let mut r = &u32::MAX.to_le_bytes()[..];
        assert!(matches!(
            read_frame(&mut r),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn a_kept_frame_buffer_reads_frames_of_any_size() {
        let msgs = [
            ClientMsg::FileData {
                id: 1,
                delta: Compressed::compress(&[5u8; 3 << 20], 1).unwrap(),
            },
            ClientMsg::BackupEnd,
            ClientMsg::FileData {
                id: 2,
                delta: ChunkCompressor::store_into(&[7u8; 2_500_000], vec![]).unwrap(),
            },
            ClientMsg::SigRequest { id: 3 },
        ];
        let mut stream = vec![];
        for m in &msgs {
            write_msg(&mut stream, m).unwrap();
        }
        // One byte at a time, as a slow peer sends it.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(b.len()).min(1);
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for dribble in [false, true] {
            let mut buf = vec![];
            let mut r: Box<dyn Read> = if dribble {
                Box::new(Dribble(&stream))
            } else {
                Box::new(&stream[..])
            };
            for m in &msgs {
                let n = read_frame_into(&mut r, &mut buf).unwrap().unwrap();
                assert_eq!(&decode_client(&buf[..n]).unwrap(), m);
            }
            assert!(read_frame_into(&mut r, &mut buf).unwrap().is_none());
        }
        // A frame announced large but cut short: an error, and the buffer
        // grew at most a MiB past what arrived.
        let mut cut = ((MAX_FRAME - 1) as u32).to_le_bytes().to_vec();
        cut.extend_from_slice(&[1u8; 1000]);
        let mut buf = vec![];
        assert!(read_frame_into(&mut &cut[..], &mut buf).is_err());
        assert!(buf.len() <= 1000 + FRAME_GROW_STEP, "{}", buf.len());
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let frame = encode(&ClientMsg::BackupEnd).unwrap();
        for cut in 1..frame.len() {
            let mut r = &frame[..cut];
            assert!(read_frame(&mut r).is_err(), "cut at {cut}");
        }
        let mut r = &frame[..0];
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn huge_vec_length_inside_frame_is_refused() {
        // A frame claiming a 2^60-element vector must fail, not allocate.
        let mut payload = vec![2u8]; // Entries variant index
        payload.push(255);
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_client(&payload).is_err());
    }

    #[test]
    fn chunk_codec_round_trips_stored_and_compressed() {
        let mut rng = 1u64;
        let random: Vec<u8> = (0..(1 << 20) + 12_345)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (rng >> 56) as u8
            })
            .collect();
        let text = b"backup snapshot delta ".repeat(50_000);
        // Half random, half words: the literals zstd -1 leaves uncompressed.
        let mixed: Vec<u8> = random[..6_000]
            .iter()
            .copied()
            .chain(text[..6_000].iter().copied())
            .collect();
        for level in [1, DATA_LEVEL] {
            chunk_codec_round_trips_at(level, &random, &text, &mixed);
        }
    }

    fn chunk_codec_round_trips_at(level: i32, random: &[u8], text: &[u8], mixed: &[u8]) {
        let mut c = ChunkCompressor::new(level).unwrap();
        let mut d = ChunkDecompressor::new().unwrap();
        let mut out = vec![];
        for raw in [
            mixed,
            random,
            text,
            &random[..300_000],
            &[][..],
            &random[..5],
        ] {
            let z = c.compress(raw).unwrap();
            // Any zstd decoder reads it, stored or not.
            assert_eq!(z.decompress().unwrap(), raw);
            d.decompress_into(&z, &mut out).unwrap();
            assert_eq!(out, raw);
            // Stored on request, whatever it holds, into a dirty buffer.
            let s = ChunkCompressor::store_into(raw, vec![9; 77]).unwrap();
            assert_eq!(s.raw_len as usize, raw.len());
            assert!(s.data.len() <= raw.len() + 9 + 3 * raw.len().div_ceil(128 << 10).max(1));
            assert_eq!(s.decompress().unwrap(), raw);
            d.decompress_into(&s, &mut out).unwrap();
            assert_eq!(out, raw);
        }
        let too_big = vec![0u8; crate::limits::MAX_CHUNK + 1];
        assert!(ChunkCompressor::store_into(&too_big, vec![]).is_err());
        // Incompressible data is stored, so it grows by a few bytes per 128 KiB only.
        let z = c.compress(random).unwrap();
        assert!(z.data.len() <= random.len() + 9 + 3 * 9, "{}", z.data.len());
        assert!(c.compress(text).unwrap().data.len() < text.len() / 10);
        // The words half of a mixed file still shrinks.
        let m = c.compress(mixed).unwrap().data.len();
        assert!(
            m < mixed.len() * 3 / 4,
            "level {level}: {m} of {}",
            mixed.len()
        );
    }

    #[test]
    fn write_msg_writes_what_encode_frames() {
        let msgs = vec![
            ClientMsg::BackupEnd,
            ClientMsg::FileData {
                id: 7,
                delta: Compressed::compress(&[5u8; 300_000], 1).unwrap(),
            },
            ClientMsg::SigRequest { id: 3 },
        ];
        for m in msgs {
            let mut out = vec![];
            write_msg(&mut out, &m).unwrap();
            assert_eq!(out, encode(&m).unwrap());
            let mut r = &out[..];
            let frame = read_frame(&mut r).unwrap().unwrap();
            assert_eq!(decode_client(&frame).unwrap(), m);
        }
    }

    #[test]
    fn a_raw_data_frame_is_taken_over_and_equals_the_full_decoding() {
        // Ids and lengths across the varint widths (1, 3 and 5 bytes).
        for (id, len) in [
            (0u32, 0usize),
            (7, 1),
            (250, 250),
            (251, 70_000),
            (1 << 20, 1 << 17),
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            // Sent from behind 13 bytes of room, as the client does.
            let mut buf = vec![9u8; 13];
            buf.extend_from_slice(&bytes);
            let m = ClientMsg::FileRaw {
                id,
                delta: crate::RawBytes::new(buf, 13),
            };
            let mut wire = vec![];
            write_msg(&mut wire, &m).unwrap();
            assert_eq!(wire, encode(&m).unwrap());
            let mut frame = wire[4..].to_vec();
            let n = frame.len();
            let full = decode_client(&frame).unwrap();
            let fast = decode_client_frame(&mut frame, n).unwrap();
            assert_eq!(fast, full);
            assert_eq!(fast, m);
            assert!(frame.is_empty(), "the frame buffer was taken over");
            let ClientMsg::FileRaw { delta, .. } = fast else {
                panic!("{fast:?}")
            };
            assert_eq!(delta.as_slice(), &bytes[..]);
        }
        // Other messages go through the full decoder and keep the buffer.
        let other = encode(&ClientMsg::SigRequest { id: 16 }).unwrap();
        let mut frame = other[4..].to_vec();
        let n = frame.len();
        assert_eq!(
            decode_client_frame(&mut frame, n).unwrap(),
            ClientMsg::SigRequest { id: 16 }
        );
        assert_eq!(frame.len(), n);
    }

    #[test]
    fn a_malformed_or_oversized_raw_data_frame_is_refused() {
        let m = ClientMsg::FileRaw {
            id: 3,
            delta: vec![1u8; 1000].into(),
        };
        let big = ClientMsg::FileRaw {
            id: 3,
            delta: vec![0u8; crate::limits::MAX_CHUNK + 1].into(),
        };
        refuses_bad_raw_frames(
            &encode(&m).unwrap(),
            &encode(&big).unwrap(),
            decode_client_frame,
        );
    }

    /// `wire` (a raw data message of 1000 bytes, length prefix included)
    /// cut or lengthened, `big` (one beyond the chunk limit) and a frame
    /// length beyond its buffer: all refused by `decode`, none a panic.
    fn refuses_bad_raw_frames<M>(
        wire: &[u8],
        big: &[u8],
        decode: impl Fn(&mut Vec<u8>, usize) -> Result<M, ProtocolError>,
    ) {
        // A length that claims more or fewer bytes than the frame holds.
        for cut in [1usize, 10, 999] {
            let mut frame = wire[4..wire.len() - cut].to_vec();
            let n = frame.len();
            assert!(decode(&mut frame, n).is_err(), "cut {cut}");
        }
        let mut longer = wire[4..].to_vec();
        longer.push(0);
        let n = longer.len();
        assert!(decode(&mut longer, n).is_err());
        // Beyond the chunk limit: refused by the fast path's validation too.
        let mut frame = big[4..].to_vec();
        let n = frame.len();
        let Err(e) = decode(&mut frame, n) else {
            panic!("a chunk beyond the limit was accepted")
        };
        assert!(e.to_string().contains("too large"), "{e}");
        let mut short = vec![0u8; 3];
        assert!(decode(&mut short, 4).is_err());
    }

    #[test]
    fn a_raw_file_part_is_taken_over_and_equals_the_full_decoding() {
        for len in [0usize, 1, 127, 128, 70_000, crate::limits::MAX_CHUNK] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let m = ServerMsg::FilePartRaw(bytes.clone().into());
            let wire = encode(&m).unwrap();
            let mut frame = wire[4..].to_vec();
            let n = frame.len();
            let full = decode_server(&frame).unwrap();
            let fast = decode_server_frame(&mut frame, n).unwrap();
            assert_eq!(fast, full);
            assert!(frame.is_empty(), "the frame buffer was taken over");
            let ServerMsg::FilePartRaw(b) = fast else {
                panic!("{fast:?}")
            };
            assert_eq!(b.as_slice(), &bytes[..]);
        }
        // Other messages go through the full decoder and keep the buffer.
        let other = encode(&ServerMsg::FileOk { id: 15 }).unwrap();
        let mut frame = other[4..].to_vec();
        let n = frame.len();
        assert_eq!(
            decode_server_frame(&mut frame, n).unwrap(),
            ServerMsg::FileOk { id: 15 }
        );
        assert_eq!(frame.len(), n);
        // Cut, lengthened or oversized: refused.
        let big = ServerMsg::FilePartRaw(vec![0u8; crate::limits::MAX_CHUNK + 1].into());
        refuses_bad_raw_frames(
            &encode(&ServerMsg::FilePartRaw(vec![1u8; 1000].into())).unwrap(),
            &encode(&big).unwrap(),
            decode_server_frame,
        );
    }

    #[test]
    fn compress_into_reuses_a_dirty_buffer() {
        let mut c = ChunkCompressor::new(1).unwrap();
        let mut rng = 7u64;
        let random: Vec<u8> = (0..700_000)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (rng >> 56) as u8
            })
            .collect();
        let text = b"reuse me ".repeat(70_000);
        let mut buf = vec![0xAAu8; 17];
        buf.reserve(compress_bound(random.len()));
        for raw in [&random[..], &text[..], &random[..10], &[][..], &random[..]] {
            let cap = buf.capacity();
            let z = c.compress_into(raw, std::mem::take(&mut buf)).unwrap();
            assert_eq!(z.decompress().unwrap(), raw);
            assert_eq!(z.data.capacity(), cap, "no reallocation");
            buf = z.data;
        }
    }

    #[test]
    fn chunk_decompressor_keeps_the_caps() {
        let mut d = ChunkDecompressor::new().unwrap();
        let mut out = vec![];
        let raw = vec![0u8; 1 << 20];
        let mut c = Compressed::compress(&raw, 3).unwrap();
        d.decompress_into(&c, &mut out).unwrap();
        c.raw_len = 1024; // lies about its size, with a large buffer left over
        assert!(d.decompress_into(&c, &mut out).is_err());
        c.raw_len = u32::MAX;
        assert!(d.decompress_into(&c, &mut out).is_err());
        c.raw_len = (2 << 20) as u32; // claims more than it holds
        assert!(d.decompress_into(&c, &mut out).is_err());
    }

    #[test]
    fn zstd_bomb_is_refused() {
        let raw = vec![0u8; crate::limits::MAX_CHUNK];
        let mut c = Compressed::compress(&raw, 3).unwrap();
        c.raw_len = 1024; // lies about its size
        assert!(c.decompress().is_err());
        c.raw_len = u32::MAX;
        assert!(c.decompress().is_err());
        let big = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        let bomb = Compressed {
            raw_len: crate::limits::MAX_CHUNK as u32,
            data: big,
        };
        assert!(bomb.decompress().is_err());
    }
}

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
use crate::messages::{ClientMsg, ServerMsg};

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

/// Decodes and validates a client message from a frame payload.
pub fn decode_client(payload: &[u8]) -> Result<ClientMsg, ProtocolError> {
    let msg: ClientMsg = decode(payload)?;
    msg.validate()?;
    Ok(msg)
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
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated
        } else {
            e.into()
        }
    })?;
    Ok(Some(payload))
}

/// Encodes and writes one message (does not flush).
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    let frame = encode(msg)?;
    w.write_all(&frame)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

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

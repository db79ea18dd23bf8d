//! gRPC message framing (the 5-byte length prefix) and a tonic codec that moves raw bytes.
//!
//! The proxy reads whole unary bodies and needs to find the one message inside; clients that call
//! methods by name (tests, benchmarks, the CLI's passthrough checks) use [`RawCodec`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Largest message dockhand accepts or sends: kubelet's limit.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Length of a gRPC frame header: one compression flag byte and a big-endian u32 length.
pub const FRAME_HEADER_BYTES: usize = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("grpc body holds {0} bytes, not one whole frame")]
    Truncated(usize),
    #[error("grpc body holds more than one message")]
    Trailing,
    #[error("grpc message is compressed")]
    Compressed,
    #[error("grpc message of {0} bytes exceeds the {MAX_MESSAGE_BYTES} byte limit")]
    TooLarge(usize),
}

/// Wraps one message in a gRPC frame (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_BYTES + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Returns the single uncompressed message of a unary gRPC body.
pub fn unframe(body: &Bytes) -> Result<Bytes, FrameError> {
    if body.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated(body.len()));
    }
    if body[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let end = FRAME_HEADER_BYTES + len;
    match body.len().cmp(&end) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated(body.len())),
        std::cmp::Ordering::Greater => Err(FrameError::Trailing),
        std::cmp::Ordering::Equal => Ok(body.slice(FRAME_HEADER_BYTES..end)),
    }
}

/// A tonic codec whose messages are the encoded protobuf bytes themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips() {
        let body = frame(b"hello");
        assert_eq!(&body[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(unframe(&body).unwrap(), Bytes::from_static(b"hello"));
    }

    #[test]
    fn empty_message_is_a_valid_frame() {
        assert_eq!(unframe(&frame(b"")).unwrap(), Bytes::new());
    }

    #[test]
    fn malformed_bodies_are_reported() {
        assert_eq!(
            unframe(&Bytes::from_static(&[0, 0])),
            Err(FrameError::Truncated(2))
        );
        assert_eq!(
            unframe(&Bytes::from_static(&[0, 0, 0, 0, 3, 1])),
            Err(FrameError::Truncated(6))
        );
        assert_eq!(
            unframe(&Bytes::from_static(&[0, 0, 0, 0, 1, 1, 2])),
            Err(FrameError::Trailing)
        );
        assert_eq!(
            unframe(&Bytes::from_static(&[1, 0, 0, 0, 1, 1])),
            Err(FrameError::Compressed)
        );
        assert_eq!(
            unframe(&Bytes::from_static(&[0, 255, 255, 255, 255])),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
    }
}

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

    /// Polls `future` to completion on this thread: everything below is in memory and always
    /// ready, so no runtime is needed (a future that stays pending fails the test).
    fn ready<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..1000 {
            if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
        }
        panic!("an in-memory future never became ready");
    }

    /// `message` encoded by tonic with RawCodec, as a client sends it: the whole body.
    fn tonic_encoded(message: Bytes) -> Bytes {
        use tonic::codegen::Body;
        let mut body = std::pin::pin!(tonic::codec::EncodeBody::new_client(
            RawCodec,
            tonic::codegen::tokio_stream::iter([Ok::<_, Status>(message)]),
            None,
            Some(MAX_MESSAGE_BYTES),
        ));
        let mut out = BytesMut::new();
        while let Some(frame) = ready(std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))) {
            if let Ok(data) = frame.expect("encodes").into_data() {
                out.put(data);
            }
        }
        out.freeze()
    }

    /// Every message tonic decodes with RawCodec from a request body that tonic encoded.
    fn tonic_round_trip(message: Bytes) -> Vec<Bytes> {
        let body = tonic::codec::EncodeBody::new_client(
            RawCodec,
            tonic::codegen::tokio_stream::iter([Ok::<_, Status>(message)]),
            None,
            Some(MAX_MESSAGE_BYTES),
        );
        let mut stream =
            tonic::codec::Streaming::new_request(RawCodec, body, None, Some(MAX_MESSAGE_BYTES));
        let mut messages = Vec::new();
        while let Some(message) = ready(stream.message()).expect("decodes") {
            messages.push(message);
        }
        messages
    }

    #[test]
    fn raw_codec_moves_the_exact_bytes_through_tonic() {
        // A CreateContainerRequest-like message with a zero byte and a field no proto knows.
        let message = Bytes::from_static(b"\x0a\x03pod\x12\x00\xc8\x30\x01\xff");
        assert_eq!(tonic_round_trip(message.clone()), vec![message.clone()]);
        // What tonic puts on the wire is what `frame` makes and `unframe` reads, so the proxy
        // finds the caller's message and callers read the proxy's frames.
        let wire = tonic_encoded(message.clone());
        assert_eq!(wire, frame(&message));
        assert_eq!(unframe(&wire), Ok(message));
        assert_eq!(tonic_round_trip(Bytes::new()), vec![Bytes::new()]);
    }

    #[test]
    fn the_limit_is_exactly_sixteen_mib() {
        assert_eq!(MAX_MESSAGE_BYTES, 16 << 20);
        let largest = vec![7u8; MAX_MESSAGE_BYTES];
        let unframed = unframe(&frame(&largest)).expect("a 16 MiB message is accepted");
        assert_eq!(unframed.len(), MAX_MESSAGE_BYTES);
        assert!(unframed.iter().all(|b| *b == 7));

        let over = vec![7u8; MAX_MESSAGE_BYTES + 1];
        let error = unframe(&frame(&over)).unwrap_err();
        assert_eq!(error, FrameError::TooLarge(MAX_MESSAGE_BYTES + 1));
        assert_eq!(
            error.to_string(),
            "grpc message of 16777217 bytes exceeds the 16777216 byte limit"
        );
    }
}

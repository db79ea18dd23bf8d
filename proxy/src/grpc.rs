//! One unary gRPC exchange as the proxy sees it: the caller's call ([`UnaryCall`]: request head
//! and its single message), a whole response ([`Reply`]: head, body, trailers, or containerd's
//! reset of the stream) that a handler can read, replace, or hand back byte for byte, and the
//! [`Interceptor`] trait every handler of the intercept table implements.
//!
//! Framing is the caller's contract, not only the status: a reply goes back framed as containerd
//! framed it (a trailers-only error stays one HEADERS frame with END_STREAM; grpc-go clients read
//! anything else as `Internal`), and a reset goes back as a reset with containerd's reason.

use bytes::Bytes;
use dockhand_protos::codec;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use tonic::body::Body;
use tonic::{Code, Status};

use crate::upstream::Upstream;

/// The handler of one intercepted method. It gets the whole unary request: it may read a decoded
/// copy, forward the original or edited bytes (through `protos::wire`, never by re-encoding), and
/// read or replace the reply.
pub trait Interceptor: Send + Sync {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply>;
}

/// Forwards the call as it came: the handler of a method whose feature is switched off.
pub struct Forward;

impl Interceptor for Forward {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(async move { call.forward_unchanged().await })
    }
}

/// containerd reset the caller's stream: the caller gets the same reset (same reason), which its
/// gRPC library turns into the code a direct caller would have seen.
#[derive(Debug, thiserror::Error)]
#[error("containerd reset the stream")]
pub struct Reset(#[source] h2::Error);

impl Reset {
    pub fn new(reason: h2::Reason) -> Reset {
        Reset(h2::Error::from(reason))
    }

    pub fn reason(&self) -> h2::Reason {
        self.0.reason().unwrap_or(h2::Reason::INTERNAL_ERROR)
    }

    /// The reset a remote peer sent, found anywhere in `error`'s source chain (hyper and tonic
    /// wrap h2's error); `None` for every other failure (connection lost, local errors).
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<Reset> {
        let mut source = Some(error);
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return match h2.reason() {
                    Some(reason) if h2.is_reset() && h2.is_remote() => Some(Reset::new(reason)),
                    _ => None,
                };
            }
            source = e.source();
        }
        None
    }

    /// The code a gRPC client reports for this reset (the table grpc-go and tonic share, from
    /// gRPC's PROTOCOL-HTTP2.md).
    pub fn code(&self) -> Code {
        match self.reason() {
            h2::Reason::REFUSED_STREAM => Code::Unavailable,
            h2::Reason::CANCEL => Code::Cancelled,
            h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
            h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
            _ => Code::Internal,
        }
    }
}

/// One intercepted unary call: the caller's request head and its single message.
pub struct UnaryCall {
    head: http::request::Parts,
    pub message: Bytes,
    upstream: Upstream,
}

impl UnaryCall {
    pub fn new(head: http::request::Parts, message: Bytes, upstream: Upstream) -> UnaryCall {
        UnaryCall {
            head,
            message,
            upstream,
        }
    }

    /// A decoded copy of the request, for reading only.
    pub fn decode<T: prost::Message + Default>(&self) -> Result<T, prost::DecodeError> {
        T::decode(self.message.clone())
    }

    /// Forwards `message` (the original or an edited copy) with the caller's headers.
    pub async fn forward(&self, message: &[u8]) -> Reply {
        let body = Body::new(Full::new(codec::frame(message)));
        let response = self
            .upstream
            .send(request_with_body(&self.head, body))
            .await;
        Reply::collect(response).await
    }

    /// Forwards the request exactly as it came.
    pub async fn forward_unchanged(&self) -> Reply {
        let message = self.message.clone();
        self.forward(&message).await
    }
}

/// A new request with the same method, URI, version and headers as `head`.
pub fn request_with_body(head: &http::request::Parts, body: Body) -> http::Request<Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request.headers_mut().remove(http::header::CONTENT_LENGTH);
    request
}

/// A complete unary response, or containerd's reset of the stream.
#[derive(Debug)]
pub struct Reply {
    head: http::response::Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
    reset: Option<h2::Reason>,
}

impl Reply {
    /// Collects a response from upstream. A body over the 16 MiB message limit becomes
    /// RESOURCE_EXHAUSTED (what the caller's own gRPC library would say), a reset stays a reset,
    /// and a body cut off any other way becomes UNAVAILABLE.
    pub async fn collect(response: Result<http::Response<Body>, Reset>) -> Reply {
        let (head, body) = match response {
            Ok(response) => response.into_parts(),
            Err(reset) => return Reply::reset(reset.reason()),
        };
        let limit = codec::MAX_MESSAGE_BYTES + codec::FRAME_HEADER_BYTES;
        match Limited::new(body, limit).collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned();
                Reply {
                    head,
                    body: collected.to_bytes(),
                    trailers,
                    reset: None,
                }
            }
            Err(e) => {
                if let Some(reset) = Reset::find(&*e) {
                    return Reply::reset(reset.reason());
                }
                if e.is::<http_body_util::LengthLimitError>() {
                    return Reply::error(Status::resource_exhausted(format!(
                        "dockhand: containerd's response is larger than the {} byte message limit",
                        codec::MAX_MESSAGE_BYTES
                    )));
                }
                Reply::error(Status::unavailable(format!(
                    "dockhand: containerd's response was cut off: {e}"
                )))
            }
        }
    }

    /// A trailers-only error response, as a gRPC server sends it.
    pub fn error(status: Status) -> Reply {
        let (head, ()) = status.into_http::<()>().into_parts();
        Reply {
            head,
            body: Bytes::new(),
            trailers: None,
            reset: None,
        }
    }

    /// The stream reset with `reason`.
    pub fn reset(reason: h2::Reason) -> Reply {
        let (head, ()) = http::Response::new(()).into_parts();
        Reply {
            head,
            body: Bytes::new(),
            trailers: None,
            reset: Some(reason),
        }
    }

    /// A successful response carrying one encoded message.
    pub fn ok(message: &[u8]) -> Reply {
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Reply {
            head,
            body: codec::frame(message),
            trailers: Some(trailers),
            reset: None,
        }
    }

    /// The gRPC status: from the trailers, or from the head of a trailers-only response; for a
    /// reset, the code the caller's gRPC library reports.
    pub fn status(&self) -> Status {
        if let Some(reason) = self.reset {
            return Status::new(
                Reset::new(reason).code(),
                format!("stream reset by containerd: {reason:?}"),
            );
        }
        self.trailers
            .as_ref()
            .and_then(Status::from_header_map)
            .or_else(|| Status::from_header_map(&self.head.headers))
            .unwrap_or_else(|| Status::unknown("dockhand: response carried no grpc-status"))
    }

    pub fn code(&self) -> Code {
        self.status().code()
    }

    /// Whether containerd reset the stream (no gRPC status came).
    pub fn is_reset(&self) -> bool {
        self.reset.is_some()
    }

    /// The response message of a successful call.
    pub fn message(&self) -> Option<Bytes> {
        if self.code() != Code::Ok {
            return None;
        }
        codec::unframe(&self.body).ok()
    }

    /// The same response with its message replaced (head and trailers kept).
    pub fn with_message(mut self, message: &[u8]) -> Reply {
        self.body = codec::frame(message);
        self.head.headers.remove(http::header::CONTENT_LENGTH);
        self
    }

    /// The response to send back, framed as it came: no body and no trailers is a trailers-only
    /// response (HEADERS with END_STREAM), not headers followed by an empty DATA frame.
    pub fn into_response(self) -> Result<http::Response<Body>, Reset> {
        if let Some(reason) = self.reset {
            return Err(Reset::new(reason));
        }
        let mut frames = Vec::with_capacity(2);
        if !self.body.is_empty() {
            frames.push(Ok::<_, Status>(http_body::Frame::data(self.body)));
        }
        if let Some(trailers) = self.trailers {
            frames.push(Ok(http_body::Frame::trailers(trailers)));
        }
        let body = if frames.is_empty() {
            Body::empty()
        } else {
            Body::new(StreamBody::new(futures::stream::iter(frames)))
        };
        Ok(http::Response::from_parts(self.head, body))
    }
}

/// The gRPC code of a response head, when it is a trailers-only response.
pub fn head_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from)
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[tokio::test]
    async fn ok_reply_round_trips_through_http() {
        let reply = Reply::collect(Reply::ok(b"abc").into_response()).await;
        assert_eq!(reply.code(), Code::Ok);
        assert_eq!(reply.message().unwrap(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn error_reply_keeps_code_and_message() {
        let reply =
            Reply::collect(Reply::error(Status::not_found("no such thing")).into_response()).await;
        let status = reply.status();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such thing");
        assert!(reply.message().is_none());
    }

    #[test]
    fn an_error_stays_trailers_only() {
        // hyper ends the HEADERS frame with END_STREAM only when the body says it is over.
        let response = Reply::error(Status::not_found("gone"))
            .into_response()
            .unwrap();
        assert!(response.body().is_end_stream());
        assert_eq!(head_code(response.headers()), Some(Code::NotFound));
    }

    #[test]
    fn a_reset_stays_a_reset() {
        let reply = Reply::reset(h2::Reason::REFUSED_STREAM);
        assert_eq!(reply.code(), Code::Unavailable);
        let reset = reply.into_response().unwrap_err();
        assert_eq!(reset.reason(), h2::Reason::REFUSED_STREAM);
        // hyper looks for h2's error in the source chain to pick the reason it sends.
        let source = std::error::Error::source(&reset).unwrap();
        assert!(source.downcast_ref::<h2::Error>().is_some());
    }

    #[tokio::test]
    async fn an_oversized_response_is_resource_exhausted() {
        let big = Bytes::from(vec![
            0u8;
            codec::MAX_MESSAGE_BYTES + codec::FRAME_HEADER_BYTES + 1
        ]);
        let response = http::Response::new(Body::new(Full::new(big)));
        let reply = Reply::collect(Ok(response)).await;
        assert_eq!(reply.code(), Code::ResourceExhausted);
    }
}

//! One unary gRPC exchange as the proxy sees it: the caller's call ([`UnaryCall`]: request head
//! and its single message), a whole response ([`Reply`]: head, body, trailers) that a handler can
//! read, replace, or hand back byte for byte, and the [`Interceptor`] trait every handler of the
//! intercept table implements.

use bytes::Bytes;
use dockhand_protos::codec;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full, StreamBody};
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

/// A complete unary response.
#[derive(Debug)]
pub struct Reply {
    head: http::response::Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Reply {
    /// Collects a response from upstream; a broken body becomes UNAVAILABLE.
    pub async fn collect(response: http::Response<Body>) -> Reply {
        let (head, body) = response.into_parts();
        match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned();
                Reply {
                    head,
                    body: collected.to_bytes(),
                    trailers,
                }
            }
            Err(e) => Reply::error(Status::unavailable(format!(
                "dockhand: containerd's response was cut off: {e}"
            ))),
        }
    }

    /// A trailers-only error response, as a gRPC server sends it.
    pub fn error(status: Status) -> Reply {
        let (head, ()) = status.into_http::<()>().into_parts();
        Reply {
            head,
            body: Bytes::new(),
            trailers: None,
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
        }
    }

    /// The gRPC status: from the trailers, or from the head of a trailers-only response.
    pub fn status(&self) -> Status {
        self.trailers
            .as_ref()
            .and_then(Status::from_header_map)
            .or_else(|| Status::from_header_map(&self.head.headers))
            .unwrap_or_else(|| Status::unknown("dockhand: response carried no grpc-status"))
    }

    pub fn code(&self) -> Code {
        self.status().code()
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

    pub fn into_response(self) -> http::Response<Body> {
        let mut frames = Vec::with_capacity(2);
        if !self.body.is_empty() {
            frames.push(Ok::<_, Status>(http_body::Frame::data(self.body)));
        }
        if let Some(trailers) = self.trailers {
            frames.push(Ok(http_body::Frame::trailers(trailers)));
        }
        let body = Body::new(StreamBody::new(futures::stream::iter(frames)));
        http::Response::from_parts(self.head, body)
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
}

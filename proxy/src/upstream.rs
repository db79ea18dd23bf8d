//! Connections to containerd over its unix socket. Each caller's connection to dockhand gets an
//! HTTP/2 connection to containerd of its own ([`Upstream::for_caller`]), as a pass-through proxy
//! naturally has: HTTP/2 flow control is per connection, so bytes one caller does not read hold
//! back only that caller, as they would against containerd directly. dockhand's own calls (the
//! archive's) share one more. A connection is made by the first call that needs it and again
//! after it breaks; a containerd that is down answers UNAVAILABLE at once, never a hang.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dockhand_protos::codec;
use http::{HeaderValue, Method, Uri};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tonic::body::Body;
use tonic::Status;

use crate::grpc::{Reply, Reset};

/// The largest header list dockhand accepts from containerd: grpc-go's default (16 MiB), not
/// hyper's 16 KiB. containerd echoes ids into `grpc-message`, so a 17 KB id makes a 17 KB header.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("http/2 handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("request failed")]
    Send(#[source] hyper::Error),
}

#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    connect_timeout: Duration,
    /// The live connection's handle; replaced when it closes.
    sender: Mutex<Option<SendRequest<Body>>>,
}

impl Upstream {
    /// Does not connect: the first call does.
    pub fn new(socket: &Path, connect_timeout: Duration) -> Upstream {
        Upstream {
            inner: Arc::new(Inner {
                socket: socket.to_path_buf(),
                connect_timeout,
                sender: Mutex::new(None),
            }),
        }
    }

    /// The same containerd, on a connection of its own (made by its first call, closed when the
    /// last clone is dropped): one per caller's connection.
    pub fn for_caller(&self) -> Upstream {
        Upstream::new(&self.inner.socket, self.inner.connect_timeout)
    }

    async fn sender(&self) -> Result<SendRequest<Body>, UpstreamError> {
        if let Some(sender) = self
            .inner
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        // Several calls may reconnect at once after a break; the last connection made wins and
        // the others serve the calls that made them, then close.
        let timeout = self.inner.connect_timeout;
        let stream = tokio::time::timeout(timeout, UnixStream::connect(&self.inner.socket))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
            .map_err(UpstreamError::Connect)?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_frame_size(1 << 20)
            .max_send_buf_size(codec::MAX_MESSAGE_BYTES)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        let socket = self.inner.socket.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(socket = %socket.display(), error = %e, "connection to containerd broke");
            }
        });
        tracing::debug!(socket = %self.inner.socket.display(), "connected to containerd");
        *self.inner.sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    async fn try_send(
        &self,
        mut request: http::Request<Body>,
    ) -> Result<http::Response<Body>, UpstreamError> {
        let mut sender = self.sender().await?;
        // HTTP/2 wants :scheme and :authority; the path is the caller's.
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(http::uri::Authority::from_static("localhost"));
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        sender.ready().await.map_err(UpstreamError::Send)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Send)?;
        Ok(response.map(Body::new))
    }

    /// Sends a request as it is and returns containerd's response unread (streams stay streams),
    /// or containerd's reset of the stream. A containerd that cannot be reached answers
    /// UNAVAILABLE.
    pub async fn send(&self, request: http::Request<Body>) -> Result<http::Response<Body>, Reset> {
        match self.try_send(request).await {
            Ok(response) => Ok(response),
            Err(e) => {
                if let Some(reset) = Reset::find(&e) {
                    tracing::debug!(reason = ?reset.reason(), "containerd reset a stream");
                    return Err(reset);
                }
                let cause = error_chain(&e);
                tracing::warn!(socket = %self.inner.socket.display(), error = %cause, "containerd unavailable");
                Ok(Status::unavailable(format!(
                    "dockhand: containerd at {} is unavailable: {cause}",
                    self.inner.socket.display()
                ))
                .into_http())
            }
        }
    }

    /// Makes a unary call of dockhand's own (not on behalf of a caller).
    pub async fn unary(&self, path: &'static str, message: &[u8]) -> Reply {
        let mut request =
            http::Request::new(Body::new(http_body_util::Full::new(codec::frame(message))));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(path);
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        Reply::collect(self.send(request).await).await
    }

    /// Calls a unary method with a prost message and decodes the answer.
    pub async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        path: &'static str,
        request: &Req,
    ) -> Result<Resp, Status> {
        let reply = self.unary(path, &request.encode_to_vec()).await;
        let status = reply.status();
        match reply.message() {
            Some(message) => Resp::decode(message).map_err(|e| {
                Status::internal(format!("dockhand: cannot decode {path} response: {e}"))
            }),
            None => Err(status),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

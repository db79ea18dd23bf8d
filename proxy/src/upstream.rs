//! The connection to containerd: one lazily connected HTTP/2 channel over its unix socket that
//! reconnects by itself. A containerd that is down answers UNAVAILABLE at once, never a hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dockhand_protos::codec;
use http::{HeaderValue, Method, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tower::ServiceExt;

use crate::grpc::Reply;

#[derive(Clone)]
pub struct Upstream {
    channel: Channel,
    socket: PathBuf,
}

impl Upstream {
    pub fn new(socket: &Path, connect_timeout: Duration) -> Upstream {
        let path = socket.to_path_buf();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        });
        // The URI only names the :authority; the connector decides where bytes go.
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(connect_timeout)
            .connect_with_connector_lazy(connector);
        Upstream {
            channel,
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends a request as it is and returns containerd's response unread (streams stay streams).
    pub async fn send(&self, request: http::Request<Body>) -> http::Response<Body> {
        match self.channel.clone().oneshot(request).await {
            Ok(response) => response,
            Err(e) => {
                let cause = error_chain(&e);
                tracing::warn!(socket = %self.socket.display(), error = %cause, "containerd unavailable");
                Status::unavailable(format!(
                    "dockhand: containerd at {} is unavailable: {cause}",
                    self.socket.display()
                ))
                .into_http()
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

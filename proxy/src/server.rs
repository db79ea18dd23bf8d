//! The proxy server: binds kubelet's socket safely, serves HTTP/2 on it with gRPC's limits (not a
//! library's defaults), routes each call either to its intercept handler or straight through to
//! containerd on the caller's own upstream connection, and drains on shutdown.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dockhand_protos::codec;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::Status;

use crate::config::Config;
use crate::grpc::{self, Reset, UnaryCall};
use crate::intercept::Table;
use crate::metrics::{CriMetrics, MetricsLayer};
use crate::upstream::{Upstream, MAX_HEADER_LIST_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path} is in use by a running server")]
    InUse { path: PathBuf },
    #[error("cannot replace stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container log archive: {0}")]
    Archive(crate::archive::ArchiveError),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds a unix socket at `path` with mode 0660. A leftover socket nobody answers on is
/// replaced; anything else at that path (a file, a directory, a symlink) is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::SocketDir {
            path: dir.into(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse { path: path.into() });
            }
            std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.into(),
                source,
            })?;
            tracing::info!(socket = %path.display(), "replaced stale socket");
        }
        Ok(_) => return Err(ServerError::NotASocket { path: path.into() }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        ServerError::Bind {
            path: path.into(),
            source,
        }
    })?;
    Ok(listener)
}

/// Every intercepted request body dockhand may hold at once, in bytes: four bodies of the largest
/// size kubelet may send (16 MiB). Real ones are a few KiB (a CreateContainer is the largest).
pub const HELD_REQUEST_BYTES: usize = 64 << 20;

/// Everything a call needs: where containerd is, the intercept table and the limits.
pub struct Proxy {
    upstream: Upstream,
    table: Table,
    metrics: Arc<CriMetrics>,
    drain_timeout: Duration,
    handshake_timeout: Duration,
    body_timeout: Duration,
    /// Bytes of intercepted request bodies held now, as permits of [`HELD_REQUEST_BYTES`].
    held: Arc<Semaphore>,
}

impl Proxy {
    /// The proxy. Fails when the container log archive cannot open (e.g. staging is not on the
    /// pod logs' filesystem): better a clear error at start-up than logs silently not kept.
    pub fn new(config: &Config, registry: &mut Registry) -> Result<Proxy, ServerError> {
        let upstream = Upstream::new(
            &config.containerd,
            Duration::from_secs(config.connect_timeout_seconds),
        );
        let table = Table::new(config, &upstream, registry).map_err(ServerError::Archive)?;
        Ok(Proxy {
            upstream,
            table,
            metrics: Arc::new(CriMetrics::register(registry)),
            drain_timeout: Duration::from_secs(config.drain_timeout_seconds),
            handshake_timeout: Duration::from_secs(config.handshake_timeout_seconds),
            body_timeout: Duration::from_secs(config.request_body_timeout_seconds),
            held: Arc::new(Semaphore::new(HELD_REQUEST_BYTES)),
        })
    }

    /// One call of a caller whose connection to containerd is `upstream`.
    async fn route(
        &self,
        request: http::Request<Incoming>,
        upstream: &Upstream,
    ) -> Result<http::Response<Body>, Reset> {
        let Some(handler) = self.table.lookup(request.uri().path()) else {
            return upstream.send(request.map(Body::new)).await;
        };
        let (head, body) = request.into_parts();
        let (bytes, _held) = match self.read_body(body).await {
            Ok(read) => read,
            Err(status) => return Ok(status.into_http()),
        };
        match codec::unframe(&bytes) {
            Ok(message) => {
                let call = UnaryCall::new(head, message, upstream.clone());
                handler.handle(call).await.into_response()
            }
            Err(e) => {
                tracing::debug!(method = %head.uri.path(), error = %e, "not one plain message; forwarding as is");
                let request = grpc::request_with_body(&head, Body::new(Full::new(bytes)));
                upstream.send(request).await
            }
        }
    }

    /// Reads an intercepted call's whole body: at most one 16 MiB message, within the body
    /// timeout, and only while every body held stays under [`HELD_REQUEST_BYTES`]. The permits
    /// returned hold the body's share until the call is answered.
    async fn read_body(&self, mut body: Incoming) -> Result<(Bytes, OwnedSemaphorePermit), Status> {
        let limit = codec::MAX_MESSAGE_BYTES + codec::FRAME_HEADER_BYTES;
        let mut held = self
            .held
            .clone()
            .try_acquire_many_owned(0)
            .expect("the semaphore is never closed");
        let mut bytes = BytesMut::new();
        let deadline = tokio::time::Instant::now() + self.body_timeout;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "dockhand: the request body did not arrive within {} s",
                        self.body_timeout.as_secs()
                    )))
                }
                Ok(None) => return Ok((bytes.freeze(), held)),
                Ok(Some(Err(e))) => {
                    return Err(Status::cancelled(format!(
                        "dockhand: cannot read request body: {e}"
                    )))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if bytes.len() + data.len() > limit {
                return Err(Status::resource_exhausted(format!(
                    "dockhand: request body larger than the {} byte message limit",
                    codec::MAX_MESSAGE_BYTES
                )));
            }
            let more = u32::try_from(data.len())
                .ok()
                .and_then(|n| self.held.clone().try_acquire_many_owned(n).ok());
            let Some(more) = more else {
                return Err(Status::resource_exhausted(format!(
                    "dockhand: more than {HELD_REQUEST_BYTES} bytes of request bodies are held; try again"
                )));
            };
            held.merge(more);
            bytes.extend_from_slice(&data);
        }
    }
}

/// The innermost service: one caller's connection, each of its calls routed.
#[derive(Clone)]
struct Route {
    proxy: Arc<Proxy>,
    upstream: Upstream,
}

impl tower::Service<http::Request<Incoming>> for Route {
    type Response = http::Response<Body>;
    type Error = Reset;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Body>, Reset>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Reset>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let route = self.clone();
        Box::pin(async move { route.proxy.route(request, &route.upstream).await })
    }
}

/// The HTTP/2 preface every client sends first (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits for a new connection's HTTP/2 preface for at most `timeout`, then hands hyper the
/// connection with the preface put back. hyper has no handshake timeout of its own, and a peer
/// that connects and never speaks would hold a file descriptor for ever.
async fn preface(
    stream: UnixStream,
    timeout: Duration,
) -> std::io::Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> {
    let (mut read, write) = stream.into_split();
    let mut first = [0u8; PREFACE.len()];
    match tokio::time::timeout(timeout, read.read_exact(&mut first)).await {
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no HTTP/2 preface within {} s", timeout.as_secs()),
        )),
        Ok(Err(e)) => Err(e),
        // Not HTTP/2: hyper answers it with the protocol error a gRPC server would.
        Ok(Ok(_)) => Ok(tokio::io::join(
            std::io::Cursor::new(first).chain(read),
            write,
        )),
    }
}

/// Serves CRI on `listener` until `shutdown` completes, then lets in-flight calls finish (up to
/// the drain timeout) and returns.
pub async fn serve(
    listener: UnixListener,
    proxy: Proxy,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let drain_timeout = proxy.drain_timeout;
    let handshake_timeout = proxy.handshake_timeout;
    let proxy = Arc::new(proxy);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_send_buf_size(codec::MAX_MESSAGE_BYTES)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        // grpc-go's server defaults, which containerd keeps: a header list of 16 MiB, no limit on
        // concurrent streams (a caller's streams queue at containerd, as they would directly).
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_concurrent_streams(None)
        // A caller that stops answering pings is gone: its connection (and containerd's) closes.
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let local = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(source) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %source, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Layers, outermost first: metrics and the per-call span see every call, intercepted or
        // not. Each caller's connection gets its own connection to containerd.
        let service = tower::ServiceBuilder::new()
            .layer(MetricsLayer::new(proxy.metrics.clone()))
            .service(Route {
                proxy: proxy.clone(),
                upstream: proxy.upstream.for_caller(),
            });
        let http2 = http2.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let io = match preface(stream, handshake_timeout).await {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(error = %e, "dropped a connection before its handshake");
                    return;
                }
            };
            let connection =
                http2.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if !local.as_os_str().is_empty() {
        let _ = std::fs::remove_file(&local);
    }
    tracing::info!("draining in-flight calls");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all calls drained"),
        () = tokio::time::sleep(drain_timeout) => {
            tracing::warn!(timeout_s = drain_timeout.as_secs(), "drain timeout; closing open streams");
        }
    }
    Ok(())
}

/// How often an idle caller's connection is pinged, and how long a ping may go unanswered.
/// grpc-go clients answer pings at any rate; kubelet's connection stays open for days.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/dockhand.sock");
        drop(bind(&path).unwrap());
        // The listener is gone but its file stays: nobody answers there.
        assert!(path.exists());
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }

    #[tokio::test]
    async fn a_live_socket_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dockhand.sock");
        let _first = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ServerError::InUse { .. })));
    }

    #[tokio::test]
    async fn files_and_symlinks_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.sock");
        std::fs::write(&file, "precious").unwrap();
        assert!(matches!(bind(&file), Err(ServerError::NotASocket { .. })));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(bind(&link), Err(ServerError::NotASocket { .. })));
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }
}

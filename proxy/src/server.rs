//! The proxy server: binds kubelet's socket safely, serves HTTP/2 on it, routes each call either
//! to its intercept handler or straight through to containerd, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dockhand_protos::codec;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::net::UnixListener;
use tonic::body::Body;
use tonic::Status;

use crate::config::Config;
use crate::grpc::{self, UnaryCall};
use crate::intercept::Table;
use crate::metrics::{CriMetrics, MetricsLayer};
use crate::upstream::Upstream;

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

/// Everything a call needs: where containerd is and the intercept table.
pub struct Proxy {
    upstream: Upstream,
    table: Table,
    metrics: Arc<CriMetrics>,
    drain_timeout: Duration,
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
        })
    }

    async fn route(&self, request: http::Request<Incoming>) -> http::Response<Body> {
        let Some(handler) = self.table.lookup(request.uri().path()) else {
            return self.upstream.send(request.map(Body::new)).await;
        };
        let (head, body) = request.into_parts();
        let limit = codec::MAX_MESSAGE_BYTES + codec::FRAME_HEADER_BYTES;
        let bytes = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return Status::resource_exhausted(format!(
                    "dockhand: cannot read request body: {e}"
                ))
                .into_http()
            }
        };
        match codec::unframe(&bytes) {
            Ok(message) => {
                let call = UnaryCall::new(head, message, self.upstream.clone());
                handler.handle(call).await.into_response()
            }
            Err(e) => {
                tracing::debug!(method = %head.uri.path(), error = %e, "not one plain message; forwarding as is");
                let request = grpc::request_with_body(&head, Body::new(Full::new(bytes)));
                self.upstream.send(request).await
            }
        }
    }
}

/// The innermost service: one call, routed.
#[derive(Clone)]
struct Route(Arc<Proxy>);

impl tower::Service<http::Request<Incoming>> for Route {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let proxy = self.0.clone();
        Box::pin(async move { Ok(proxy.route(request).await) })
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
    let proxy = Arc::new(proxy);
    // Layers, outermost first: metrics and the per-call span see every call, intercepted or not.
    let service = tower::ServiceBuilder::new()
        .layer(MetricsLayer::new(proxy.metrics.clone()))
        .service(Route(proxy.clone()));
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .max_send_buf_size(codec::MAX_MESSAGE_BYTES)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
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
        let connection = http2.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
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

//! The long-running shim: serves containerd on its own socket, forwards to the delegate, and
//! exits when the delegate exits (after a `Shutdown` that left no containers, or when it dies), so
//! containerd sees this shim go exactly when it would have seen the stock shim go.
//!
//! The delegate is not this process's child (both daemons are orphaned by their `start`
//! processes, as the runc shim's always is), so the shim watches it through a connection of its
//! own to the delegate's socket that carries no requests: the kernel closes it when the delegate
//! process ends, whatever the cause.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::transport::{Listener, Socket};
use containerd_shim_protos::ttrpc::r#async::{Client, Server};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::forward::{self, Observer, Shared};

/// Errors running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("delegate address {address:?} is not a unix socket")]
    NotUnix { address: String },
    #[error("connect to the delegate at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serve: {0}")]
    Serve(#[source] ttrpc::Error),
}

/// Why the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The delegate process ended (its socket connection closed).
    DelegateExited,
    /// A forwarded call found the delegate connection closed.
    DelegateLost,
    /// The `shutdown` future completed (SIGTERM).
    Shutdown,
}

/// The path of a `unix://` address (or a bare absolute path).
pub fn socket_path(address: &str) -> Option<PathBuf> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// Serves `listener` until the delegate at `delegate_address` exits or `shutdown` completes.
pub async fn run(
    listener: UnixListener,
    delegate_address: &str,
    observer: Arc<dyn Observer>,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, DaemonError> {
    let path = socket_path(delegate_address).ok_or_else(|| DaemonError::NotUnix {
        address: delegate_address.to_string(),
    })?;
    let connect = |path: PathBuf| async move {
        UnixStream::connect(&path)
            .await
            .map_err(|source| DaemonError::Connect { path, source })
    };
    let watch = connect(path.clone()).await?;
    let client = Client::new(Socket::from(connect(path.clone()).await?));
    let shared = Shared::new(client, observer);
    let mut server = Server::new()
        .add_listener(Listener::from(listener))
        .register_service(forward::services(&shared));
    server.start().await.map_err(DaemonError::Serve)?;
    info!(delegate = %delegate_address, "serving");

    let stopped = tokio::select! {
        () = closed(watch) => Stopped::DelegateExited,
        () = shared.lost.notified() => Stopped::DelegateLost,
        () = shutdown => Stopped::Shutdown,
    };
    // Calls the delegate already answered (the last Shutdown) still reach containerd.
    let deadline = Instant::now() + Duration::from_secs(1);
    while shared.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    info!(?stopped, "stopping");
    Ok(stopped)
}

/// Completes when the peer closes `stream` (EOF or error); the delegate never writes to it.
async fn closed(mut stream: UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Removes this shim's socket, and the delegate's once nothing listens on it any more.
///
/// The runc shim removes the socket named in the bundle's `address` file when it shuts down, and
/// that file names this shim (see `actions`), so the delegate's own socket is left for us; a
/// SIGKILLed delegate cannot remove it either. The delegate closes its connections a moment
/// before its listener goes, so wait (bounded) until connecting is refused. Only sockets are
/// removed, never through symlinks.
pub fn cleanup(own: &Path, delegate: &Path) {
    remove_socket(own);
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::os::unix::net::UnixStream::connect(delegate).is_ok() {
        if Instant::now() > deadline {
            warn!(path = %delegate.display(), "delegate socket still served; left in place");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_socket(delegate);
}

fn remove_socket(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "cannot remove socket");
            }
        }
        Ok(_) => warn!(path = %path.display(), "not a socket; left in place"),
        Err(_) => {}
    }
}

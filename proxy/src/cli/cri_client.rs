//! A CRI client over a unix socket, for the command line's own calls.

use std::path::{Path, PathBuf};

use dockhand_protos::codec::MAX_MESSAGE_BYTES;
use dockhand_protos::cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the CRI socket {socket}: {source}")]
pub struct ConnectError {
    socket: PathBuf,
    source: tonic::transport::Error,
}

/// Connects to the CRI runtime service at `socket` (16 MiB messages, as kubelet).
pub async fn connect(socket: &Path) -> Result<RuntimeServiceClient<Channel>, ConnectError> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError {
            socket: socket.into(),
            source,
        })?;
    Ok(RuntimeServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

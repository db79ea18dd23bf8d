//! A CRI client over a unix socket, for the command line's own calls, and the running
//! containers `audit` and `check` look at.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dockhand_protos::codec::MAX_MESSAGE_BYTES;
use dockhand_protos::cri::runtime_service_client::RuntimeServiceClient;
use dockhand_protos::cri::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatus, ContainerStatusRequest,
    ListContainersRequest,
};
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

/// A running container's status with its labels, mounts and (verbose) pid.
pub struct Running {
    pub status: ContainerStatus,
    pub pid: Option<u32>,
}

impl Running {
    /// `namespace/pod/container`.
    pub fn name(&self) -> String {
        let label = |key: &str| {
            self.status
                .labels
                .get(key)
                .map(String::as_str)
                .unwrap_or("?")
                .to_string()
        };
        format!(
            "{}/{}/{}",
            label("io.kubernetes.pod.namespace"),
            label("io.kubernetes.pod.name"),
            label("io.kubernetes.container.name")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{call} at {socket}: {code}: {message}")]
    Call {
        call: &'static str,
        socket: PathBuf,
        code: tonic::Code,
        message: String,
    },
}

impl CriError {
    pub fn call(call: &'static str, socket: &Path, status: tonic::Status) -> CriError {
        CriError::Call {
            call,
            socket: socket.to_path_buf(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Every running container, with its status (verbose, for the pid, when `verbose`).
pub async fn running_containers(socket: &Path, verbose: bool) -> Result<Vec<Running>, CriError> {
    let mut client: RuntimeServiceClient<Channel> = connect(socket).await?;
    let containers = client
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .map_err(|s| CriError::call("ListContainers", socket, s))?
        .into_inner()
        .containers;
    let mut running = Vec::new();
    for container in containers {
        let response = match client
            .container_status(ContainerStatusRequest {
                container_id: container.id.clone(),
                verbose,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            // Gone between the list and the status.
            Err(status) if status.code() == tonic::Code::NotFound => continue,
            Err(status) => return Err(CriError::call("ContainerStatus", socket, status)),
        };
        let Some(status) = response.status else {
            continue;
        };
        let pid = verbose_pid(&response.info);
        running.push(Running { status, pid });
    }
    Ok(running)
}

/// The pid in verbose ContainerStatus' `info["info"]` JSON.
fn verbose_pid(info: &HashMap<String, String>) -> Option<u32> {
    let info: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    info.get("pid")?
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_pid_is_read_from_info() {
        let info = HashMap::from([("info".to_string(), r#"{"pid":4242,"sandboxID":"x"}"#.into())]);
        assert_eq!(verbose_pid(&info), Some(4242));
        assert_eq!(verbose_pid(&HashMap::new()), None);
    }
}

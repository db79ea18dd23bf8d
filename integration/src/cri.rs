//! A CRI client over a unix socket, with 16 MiB messages like kubelet: one helper per call, plus
//! raw calls by method path for anything the helpers do not cover. The kubelet-shaped configs
//! these helpers send are built in `kubelet`.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use dockhand_protos::codec::{RawCodec, MAX_MESSAGE_BYTES};
use dockhand_protos::cri;
use dockhand_protos::cri::image_service_client::ImageServiceClient;
use dockhand_protos::cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

pub use crate::kubelet::{files_with_prefix, ContainerSpec, Pod, PodSpec};
use crate::node::NodeInfo;

/// Upper bound of one call, so a hung server fails the test instead of stalling the suite.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The kubelet-like client. Cheap to clone (one HTTP/2 connection).
#[derive(Clone)]
pub struct Cri {
    channel: Channel,
    node: NodeInfo,
}

impl Cri {
    /// Connects to the CRI server at `socket` (containerd's or the proxy's) for `node`.
    pub async fn connect(socket: &Path, node: NodeInfo) -> Result<Cri> {
        let path = socket.to_path_buf();
        let channel =
            Endpoint::try_from("http://[::]:50051")?
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .with_context(|| format!("connect to {}", socket.display()))?;
        Ok(Cri { channel, node })
    }

    /// The generated RuntimeService client (16 MiB messages, like kubelet).
    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The generated ImageService client (16 MiB messages, like kubelet).
    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Calls `path` (e.g. `/runtime.v1.RuntimeService/Version`) with an encoded request and
    /// returns the encoded response.
    pub async fn raw(&self, path: &str, request: Bytes) -> Result<Bytes, Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let path = PathAndQuery::from_str(path)
            .map_err(|e| Status::invalid_argument(format!("bad method path {path}: {e}")))?;
        let response = grpc
            .unary(tonic::Request::new(request), path, RawCodec)
            .await?;
        Ok(response.into_inner())
    }

    pub async fn version(&self) -> Result<cri::VersionResponse, Status> {
        let request = cri::VersionRequest {
            version: "0.1.0".into(),
        };
        Ok(self.runtime().version(request).await?.into_inner())
    }

    /// Creates the pod's log directory (kubelet does) and runs its sandbox.
    pub async fn run_pod(&self, spec: &PodSpec) -> Result<Pod, Status> {
        let config = self.pod_config(spec);
        std::fs::create_dir_all(&config.log_directory)
            .map_err(|e| Status::internal(format!("create pod log directory: {e}")))?;
        self.run_pod_config(spec, config).await
    }

    /// Runs a sandbox from a config the test edited.
    pub async fn run_pod_config(
        &self,
        spec: &PodSpec,
        config: cri::PodSandboxConfig,
    ) -> Result<Pod, Status> {
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .runtime()
            .run_pod_sandbox(request)
            .await?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod {
            id,
            spec: spec.clone(),
            config,
        })
    }

    pub async fn pod_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::PodSandboxStatusResponse, Status> {
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        };
        Ok(self
            .runtime()
            .pod_sandbox_status(request)
            .await?
            .into_inner())
    }

    pub async fn stop_pod(&self, id: &str) -> Result<(), Status> {
        let request = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.runtime().stop_pod_sandbox(request).await?;
        Ok(())
    }

    pub async fn remove_pod(&self, id: &str) -> Result<(), Status> {
        let request = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.runtime().remove_pod_sandbox(request).await?;
        Ok(())
    }

    pub async fn list_pods(&self) -> Result<Vec<cri::PodSandbox>, Status> {
        let request = cri::ListPodSandboxRequest { filter: None };
        Ok(self
            .runtime()
            .list_pod_sandbox(request)
            .await?
            .into_inner()
            .items)
    }

    /// Creates a container like kubelet does; returns its id.
    pub async fn create_container(
        &self,
        pod: &Pod,
        spec: &ContainerSpec,
    ) -> Result<String, Status> {
        let config = self.container_config(&pod.spec, spec).await?;
        self.create_container_config(pod, config).await
    }

    /// Creates a container from a config the test edited; returns its id.
    pub async fn create_container_config(
        &self,
        pod: &Pod,
        config: cri::ContainerConfig,
    ) -> Result<String, Status> {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        Ok(self
            .runtime()
            .create_container(request)
            .await?
            .into_inner()
            .container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), Status> {
        let request = cri::StartContainerRequest {
            container_id: id.into(),
        };
        self.runtime().start_container(request).await?;
        Ok(())
    }

    /// Creates and starts a container; returns its id.
    pub async fn run_container(&self, pod: &Pod, spec: &ContainerSpec) -> Result<String, Status> {
        let id = self.create_container(pod, spec).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    pub async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<(), Status> {
        let request = cri::StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_seconds,
        };
        self.runtime().stop_container(request).await?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        let request = cri::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.runtime().remove_container(request).await?;
        Ok(())
    }

    pub async fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::ContainerStatusResponse, Status> {
        let request = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose,
        };
        Ok(self.runtime().container_status(request).await?.into_inner())
    }

    /// Containers of one pod, or all when `pod_id` is `None`.
    pub async fn list_containers(
        &self,
        pod_id: Option<&str>,
    ) -> Result<Vec<cri::Container>, Status> {
        let filter = pod_id.map(|id| cri::ContainerFilter {
            pod_sandbox_id: id.into(),
            ..Default::default()
        });
        let request = cri::ListContainersRequest { filter };
        Ok(self
            .runtime()
            .list_containers(request)
            .await?
            .into_inner()
            .containers)
    }

    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_seconds: i64,
    ) -> Result<cri::ExecSyncResponse, Status> {
        let request = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_seconds,
        };
        Ok(self.runtime().exec_sync(request).await?.into_inner())
    }

    /// `sh -c script` in the container (20 s); its stdout, or an error with its stderr when it
    /// exits non-zero.
    pub async fn sh(&self, id: &str, script: &str) -> Result<String> {
        let out = self.exec_sync(id, &["sh", "-c", script], 20).await?;
        anyhow::ensure!(
            out.exit_code == 0,
            "`{script}` exited {}: {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The optional fields (`shared:N`, `master:N`) of `mount_point`'s line in the container's
    /// `/proc/self/mountinfo`: empty for a private mount.
    pub async fn propagation_fields(&self, id: &str, mount_point: &str) -> Result<String> {
        let table = self.sh(id, "cat /proc/self/mountinfo").await?;
        let line = table
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(mount_point))
            .with_context(|| format!("no {mount_point} in the container's mountinfo:\n{table}"))?;
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields
            .iter()
            .position(|f| *f == "-")
            .context("no separator")?;
        Ok(fields[6..dash].join(" "))
    }

    /// Polls `ContainerStatus` until the container has exited; returns its final status.
    pub async fn wait_exited(&self, id: &str, timeout: Duration) -> Result<cri::ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(id, false).await?.status;
            let status = status.context("ContainerStatus without status")?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "container {id} still in state {} after {timeout:?}",
                    status.state
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn list_images(&self) -> Result<Vec<cri::Image>, Status> {
        let request = cri::ListImagesRequest { filter: None };
        Ok(self
            .images()
            .list_images(request)
            .await?
            .into_inner()
            .images)
    }

    pub async fn image_status(&self, image: &str) -> Result<cri::ImageStatusResponse, Status> {
        let request = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        Ok(self.images().image_status(request).await?.into_inner())
    }
}

/// A gRPC request for a plain HTTP/2 client (no gRPC library in between), for tests that look at
/// frames, windows or unfinished bodies: POST `path` with gRPC's headers and `body` (already
/// framed, or streamed by the test).
pub fn grpc_request<B>(path: &str, body: B) -> http::Request<B> {
    http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("a valid gRPC request")
}

/// A gRPC status field (`grpc-status`, `grpc-message`) of a reply: from its head (a
/// trailers-only reply) or from its trailers.
pub fn grpc_field(
    head: &http::HeaderMap,
    trailers: Option<&http::HeaderMap>,
    name: &str,
) -> Option<String> {
    head.get(name)
        .or_else(|| trailers.and_then(|t| t.get(name)))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

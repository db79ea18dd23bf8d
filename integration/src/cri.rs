//! A small kubelet: a CRI client over a unix socket whose helpers send what kubelet sends
//! (metadata, labels, annotations, log paths, host-network sandboxes), plus raw calls by method
//! path for anything the helpers do not cover.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use dockhand_protos::codec::{RawCodec, MAX_MESSAGE_BYTES};
use dockhand_protos::cri;
use dockhand_protos::cri::image_service_client::ImageServiceClient;
use dockhand_protos::cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::UnixStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use crate::images::{hex, BUSYBOX_IMAGE};
use crate::node::NodeInfo;

/// Upper bound of one call, so a hung server fails the test instead of stalling the suite.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The paths kubelet masks for a container with the default `procMount`.
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// The paths kubelet makes read-only for a container with the default `procMount`.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A pod as kubelet would describe it. `PodSpec::new` gives a fresh uid.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    /// Extra labels (kubelet's `io.kubernetes.pod.*` are always added).
    pub labels: HashMap<String, String>,
    /// Extra annotations (kubelet's `kubernetes.io/config.*` are always added).
    pub annotations: HashMap<String, String>,
    /// Cgroup parent; `None` means `<node cgroup root>/besteffort/pod<uid>`.
    pub cgroup_parent: Option<String>,
}

impl PodSpec {
    pub fn new(name: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            uid: new_uid(),
            attempt: 0,
            labels: HashMap::new(),
            annotations: HashMap::new(),
            cgroup_parent: None,
        }
    }

    /// kubelet's `/var/log/pods/<ns>_<name>_<uid>` under the node's logs root.
    pub fn log_directory(&self, logs_root: &Path) -> PathBuf {
        logs_root.join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
    }
}

/// A container as kubelet would describe it (busybox by default).
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub mounts: Vec<cri::Mount>,
    /// Restart count: the log file is `<name>/<attempt>.log`.
    pub attempt: u32,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
}

impl ContainerSpec {
    /// A busybox container running `command`.
    pub fn new(name: &str, command: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: BUSYBOX_IMAGE.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: Vec::new(),
            env: Vec::new(),
            working_dir: String::new(),
            mounts: Vec::new(),
            attempt: 0,
            labels: HashMap::new(),
            annotations: HashMap::new(),
        }
    }

    /// A busybox container that sleeps until stopped.
    pub fn sleeper(name: &str) -> ContainerSpec {
        ContainerSpec::new(name, &["sleep", "3600"])
    }
}

/// A running pod sandbox and the config it was created with (needed by `CreateContainer`).
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub spec: PodSpec,
    pub config: cri::PodSandboxConfig,
}

/// The kubelet-like client.
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

    /// The sandbox config kubelet would send for `spec`: host network, no hostname.
    pub fn pod_config(&self, spec: &PodSpec) -> cri::PodSandboxConfig {
        let mut labels = spec.labels.clone();
        labels.insert("io.kubernetes.pod.name".into(), spec.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), spec.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), spec.uid.clone());
        let mut annotations = spec.annotations.clone();
        annotations.insert("kubernetes.io/config.seen".into(), rfc3339_now());
        annotations.insert("kubernetes.io/config.source".into(), "api".into());
        let cgroup_parent = spec
            .cgroup_parent
            .clone()
            .unwrap_or_else(|| format!("{}/besteffort/pod{}", self.node.cgroup_root, spec.uid));
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: spec.attempt,
            }),
            log_directory: spec
                .log_directory(&self.node.logs_root)
                .to_string_lossy()
                .into_owned(),
            labels,
            annotations,
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent,
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
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

    /// The container config kubelet would send for `spec` in `pod`.
    pub async fn container_config(
        &self,
        pod: &PodSpec,
        spec: &ContainerSpec,
    ) -> Result<cri::ContainerConfig, Status> {
        // kubelet sends the image id it resolved, and the name the user wrote.
        let image_id = match self.image_status(&spec.image).await?.image {
            Some(image) => image.id,
            None => spec.image.clone(),
        };
        let mut labels = spec.labels.clone();
        labels.insert("io.kubernetes.container.name".into(), spec.name.clone());
        labels.insert("io.kubernetes.pod.name".into(), pod.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), pod.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), pod.uid.clone());
        let mut annotations = spec.annotations.clone();
        let hash = hex(&Sha256::digest(format!("{spec:?}")))[..8].to_string();
        for (key, value) in [
            ("io.kubernetes.container.hash", hash.as_str()),
            (
                "io.kubernetes.container.restartCount",
                &spec.attempt.to_string(),
            ),
            (
                "io.kubernetes.container.terminationMessagePath",
                "/dev/termination-log",
            ),
            ("io.kubernetes.container.terminationMessagePolicy", "File"),
            ("io.kubernetes.pod.terminationGracePeriod", "30"),
        ] {
            annotations.insert(key.into(), value.into());
        }
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: spec.name.clone(),
                attempt: spec.attempt,
            }),
            image: Some(cri::ImageSpec {
                image: image_id,
                user_specified_image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            working_dir: spec.working_dir.clone(),
            envs: spec
                .env
                .iter()
                .map(|(key, value)| cri::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts: spec.mounts.clone(),
            labels,
            annotations,
            log_path: format!("{}/{}.log", spec.name, spec.attempt),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    masked_paths: MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
                    readonly_paths: READONLY_PATHS.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
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

    /// kubelet's `removeContainer` for a dead container, call for call: `ContainerStatus`, delete
    /// every file matching `<log_path>*`, `ContainerStatus`, `RemoveContainer`.
    pub async fn remove_container_like_kubelet(&self, id: &str) -> Result<()> {
        let status = self.container_status(id, false).await?.status;
        let log_path = status.context("ContainerStatus without status")?.log_path;
        if !log_path.is_empty() {
            for file in files_with_prefix(Path::new(&log_path))? {
                std::fs::remove_file(&file)
                    .with_context(|| format!("remove {}", file.display()))?;
            }
        }
        self.container_status(id, false).await?;
        self.remove_container(id).await?;
        Ok(())
    }
}

/// The files whose path starts with `prefix` (kubelet's `filepath.Glob(prefix + "*")`).
pub fn files_with_prefix(prefix: &Path) -> Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (prefix.parent(), prefix.file_name()) else {
        return Ok(Vec::new());
    };
    let name = name.to_string_lossy();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(name.as_ref()))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// A unique pod uid in UUID form.
fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seed = format!(
        "{}-{}-{}",
        std::process::id(),
        nanos.as_nanos(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let h = hex(&Sha256::digest(seed));
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Now as RFC 3339 (UTC, nanoseconds), like kubelet's `config.seen`.
fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    crate::logs::format_rfc3339(now.as_secs() as i64, now.subsec_nanos())
}

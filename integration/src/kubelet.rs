//! What kubelet sends: pods and containers described the way kubelet describes them (metadata,
//! labels, annotations, log paths, host-network sandboxes), and kubelet's call sequences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use dockhand_protos::cri;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::cri::Cri;
use crate::images::{hex, BUSYBOX_IMAGE};
use crate::node::Network;

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

impl Cri {
    /// The sandbox config kubelet would send for `spec`: host network and no hostname, or on a CNI
    /// node the pod's own network with the pod's name as hostname.
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
            .unwrap_or_else(|| format!("{}/besteffort/pod{}", self.node().cgroup_root, spec.uid));
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: spec.attempt,
            }),
            hostname: match self.node().network {
                Network::Host => String::new(),
                Network::Cni => spec.name.clone(),
            },
            log_directory: spec
                .log_directory(&self.node().logs_root)
                .to_string_lossy()
                .into_owned(),
            labels,
            annotations,
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent,
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(self.node().network)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
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
                    namespace_options: Some(namespaces(self.node().network)),
                    masked_paths: MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
                    readonly_paths: READONLY_PATHS.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        })
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

/// The namespaces kubelet asks for, for the sandbox and each container alike: the node's network
/// (host-network pods) or the pod's (CNI), a pid namespace per container, the pod's IPC.
fn namespaces(network: Network) -> cri::NamespaceOption {
    let network = match network {
        Network::Host => cri::NamespaceMode::Node,
        Network::Cni => cri::NamespaceMode::Pod,
    };
    cri::NamespaceOption {
        network: network as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::node::{Node, NodeOptions};

    /// The kubelet removal helper deletes the log files before `RemoveContainer`, and
    /// `wait_exited` sees a finished container's exit code.
    #[tokio::test(flavor = "multi_thread")]
    async fn dead_container_is_removed_like_kubelet_does() {
        let node = Node::start(NodeOptions::default()).await.unwrap();
        let cri = node.cri().await.unwrap();
        let pod = cri.run_pod(&PodSpec::new("job")).await.unwrap();
        let spec = ContainerSpec::new("hello", &["sh", "-c", "echo Hello, Kubernetes!; exit 7"]);
        let id = cri.run_container(&pod, &spec).await.unwrap();
        let status = cri.wait_exited(&id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(status.exit_code, 7);
        let log_path = PathBuf::from(&status.log_path);
        assert_eq!(
            log_path,
            pod.spec.log_directory(node.logs_root()).join("hello/0.log")
        );
        let messages = crate::logs::read_messages(&log_path, "stdout").unwrap();
        assert_eq!(messages, vec!["Hello, Kubernetes!".to_string()]);
        // A rotated file is matched by the `<log_path>*` glob too.
        let rotated = PathBuf::from(format!("{}.20260101-000000", status.log_path));
        std::fs::write(&rotated, "old\n").unwrap();

        cri.remove_container_like_kubelet(&id).await.unwrap();
        assert!(!log_path.exists() && !rotated.exists());
        let gone = cri.container_status(&id, false).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound);
    }

    #[test]
    fn files_with_prefix_is_a_glob_star() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["0.log", "0.log.1", "0.log.2.gz", "1.log"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let found = files_with_prefix(&dir.path().join("0.log")).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["0.log", "0.log.1", "0.log.2.gz"]);
        assert!(files_with_prefix(&dir.path().join("missing/0.log"))
            .unwrap()
            .is_empty());
    }
}

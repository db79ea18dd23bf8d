//! What the archive keeps about a container, mapped from containerd's answers.

use dockhand_host::ContainerId;
use dockhand_protos::cri::{ContainerState, ContainerStatus};

use super::store::now_nanos;
use super::store::ContainerMeta;
use crate::lifecycle::{Created, PodRef};

/// A non-empty string at `path` in containerd's verbose `info` JSON.
pub(super) fn info_field(info: &serde_json::Value, path: &[&str]) -> Option<String> {
    let mut value = info;
    for key in path {
        value = value.get(key)?;
    }
    value.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// The archive's record of a container, from containerd's status.
pub fn meta_from_status(id: &ContainerId, status: &ContainerStatus) -> ContainerMeta {
    let label = |key: &str| status.labels.get(key).cloned().unwrap_or_default();
    let exited = status.state == ContainerState::ContainerExited as i32;
    ContainerMeta {
        id: id.clone(),
        namespace: label("io.kubernetes.pod.namespace"),
        pod: label("io.kubernetes.pod.name"),
        pod_uid: label("io.kubernetes.pod.uid"),
        container: status
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| label("io.kubernetes.container.name")),
        attempt: status.metadata.as_ref().map_or(0, |m| m.attempt),
        image: status
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default(),
        image_ref: status.image_ref.clone(),
        exit_code: exited.then_some(status.exit_code),
        reason: status.reason.clone(),
        message: status.message.clone(),
        created_at: status.created_at,
        started_at: status.started_at,
        finished_at: status.finished_at,
        labels: status.labels.clone().into_iter().collect(),
        annotations: status.annotations.clone().into_iter().collect(),
        log_path: status.log_path.clone(),
        cgroup: None,
    }
}

/// The archive's record of a container just started, from what CreateContainer said about it
/// (`lifecycle.rs`). containerd's own times and image digest come with the status kubelet asks
/// for before the removal (`ContainerMeta::updated_with`); until then the times are when
/// dockhand saw containerd answer.
pub fn meta_from_created(id: &ContainerId, created: &Created) -> ContainerMeta {
    let label = |key: &str| created.labels.get(key).cloned().unwrap_or_default();
    let mut meta = ContainerMeta {
        id: id.clone(),
        namespace: label("io.kubernetes.pod.namespace"),
        pod: label("io.kubernetes.pod.name"),
        pod_uid: label("io.kubernetes.pod.uid"),
        container: Some(created.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| label("io.kubernetes.container.name")),
        attempt: created.attempt,
        image: created.image.clone(),
        image_ref: String::new(),
        exit_code: None,
        reason: String::new(),
        message: String::new(),
        created_at: created.created_at,
        started_at: now_nanos(),
        finished_at: 0,
        labels: created.labels.clone().into_iter().collect(),
        annotations: created.annotations.clone().into_iter().collect(),
        log_path: created.log_path.clone(),
        cgroup: None,
    };
    meta.name_pod_when_unlabelled(&created.pod);
    meta
}

impl ContainerMeta {
    /// The pod's namespace, name and uid from its sandbox's metadata where the container has
    /// no `io.kubernetes.pod.*` labels (containers created by CRI clients other than kubelet),
    /// so that the archive never lists them as `pod=/`.
    pub fn name_pod_when_unlabelled(&mut self, pod: &PodRef) {
        for (field, from_sandbox) in [
            (&mut self.namespace, &pod.namespace),
            (&mut self.pod, &pod.name),
            (&mut self.pod_uid, &pod.uid),
        ] {
            if field.is_empty() {
                field.clone_from(from_sandbox);
            }
        }
    }
}

//! What the archive keeps about a container, mapped from containerd's answers.

use dockhand_host::ContainerId;
use dockhand_protos::cri::{ContainerState, ContainerStatus};

use super::store::ContainerMeta;

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

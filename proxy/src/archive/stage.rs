//! Staging a started container's log: where it is (CreateContainer's record, or containerd when
//! there is none), then the hard link, on the blocking pool.

use std::path::Path;

use dockhand_host::ContainerId;
use dockhand_protos::cri::{
    self, ContainerStatusRequest, ContainerStatusResponse, PodSandboxStatusRequest,
    PodSandboxStatusResponse,
};

use super::meta::{info_field, meta_from_created, meta_from_status};
use super::staging::{self, StagingError};
use super::store::ContainerMeta;
use super::{Archive, ArchiveError, Job, Staged, CONTAINER_STATUS, POD_SANDBOX_STATUS};
use crate::lifecycle::PodRef;

/// Where a container's log is, and what is kept about it.
struct Found {
    meta: ContainerMeta,
    sandbox_id: String,
    log_directory: String,
}

/// Stages the log of container `id`. `report_missing`: a missing live log is an error (at
/// StartContainer) rather than a sign the container ended with earlier generations staged (at
/// reconciliation).
pub(super) async fn stage(
    archive: &Archive,
    id: &str,
    report_missing: bool,
) -> Result<(), ArchiveError> {
    let id = ContainerId::parse(id)?;
    if archive.state().refused.contains(&id) {
        archive.lifecycle.forget(&id);
        return Ok(());
    }
    let found = match archive.lifecycle.take(&id) {
        Some(created) if !created.log_directory.is_empty() => Found {
            meta: meta_from_created(&id, &created),
            sandbox_id: created.sandbox_id,
            log_directory: created.log_directory,
        },
        _ => ask_containerd(archive, &id).await?,
    };
    let Found {
        mut meta,
        sandbox_id,
        log_directory,
    } = found;
    if meta.log_path.is_empty() {
        tracing::debug!(container_id = %id, "container has no log file");
        return Ok(());
    }
    let location = match staging::locate(
        &id,
        archive.staging.pod_logs(),
        &log_directory,
        &meta.log_path,
    ) {
        Ok(location) => location,
        Err(e) => {
            archive.state().refused.insert(id);
            return Err(e.into());
        }
    };
    let at_least = archive
        .state()
        .archived
        .get(&id)
        .and_then(|e| e.generations.iter().max().map(|g| g + 1))
        .unwrap_or(1);
    // Every filesystem step (the shim's record, the link, listing what is staged, cleaning up)
    // on the blocking pool, in one task: never on the runtime's thread.
    let staging = archive.staging.clone();
    let records = archive.cgroup_records.clone();
    let (meta, linked, generations) = {
        let location = location.clone();
        tokio::task::spawn_blocking(move || {
            meta.cgroup = cgroup_record(&records, &meta.id);
            let linked = staging
                .write_record(&meta)
                .and_then(|()| staging.link(&meta.id, &location, at_least));
            let generations = staging.generations(&meta.id).unwrap_or_default();
            if linked.is_err() && generations.is_empty() {
                let _ = staging.remove(&meta.id);
            }
            (meta, linked, generations)
        })
        .await?
    };
    let result = match linked {
        Ok(linked) => {
            tracing::info!(container_id = %id, log_path = %meta.log_path, ?linked, "log staged");
            Ok(())
        }
        // The live file is gone but earlier generations are staged: keep those.
        Err(e) if !report_missing && !generations.is_empty() => {
            tracing::debug!(container_id = %id, error = %e, "live log gone; keeping staged generations");
            Ok(())
        }
        Err(e) => {
            if matches!(&e, StagingError::Unsafe { .. }) && e.reason() == "unsafe_path" {
                archive.state().refused.insert(id.clone());
            }
            Err(e)
        }
    };
    if !generations.is_empty() {
        archive.state().staged.insert(
            id.clone(),
            Staged {
                location: Some(location),
                meta,
                sandbox: sandbox_id,
            },
        );
    }
    archive.update_gauges();
    if generations.len() > 1 {
        if let Some(&live) = generations.last() {
            archive.queue(Job::Rotated { id, below: live });
        }
    }
    result.map_err(ArchiveError::from)
}

/// A container CreateContainer's record does not cover (created before the proxy started):
/// containerd's verbose ContainerStatus, then its sandbox's verbose PodSandboxStatus.
async fn ask_containerd(archive: &Archive, id: &ContainerId) -> Result<Found, ArchiveError> {
    let (status, info) = container_status(archive, id).await?;
    let mut meta = meta_from_status(id, &status);
    if meta.log_path.is_empty() {
        return Ok(Found {
            meta,
            sandbox_id: String::new(),
            log_directory: String::new(),
        });
    }
    let sandbox_id = info_field(&info, &["sandboxID"]).ok_or_else(|| ArchiveError::Info {
        what: "container",
        id: id.to_string(),
        field: "sandboxID",
    })?;
    let (log_directory, pod) = sandbox_log_directory(archive, &sandbox_id).await?;
    meta.name_pod_when_unlabelled(&pod);
    Ok(Found {
        meta,
        sandbox_id,
        log_directory,
    })
}

/// containerd's verbose ContainerStatus: the status and its `info` JSON.
pub(super) async fn container_status(
    archive: &Archive,
    id: &ContainerId,
) -> Result<(cri::ContainerStatus, serde_json::Value), ArchiveError> {
    let response: ContainerStatusResponse = archive
        .upstream
        .call(
            CONTAINER_STATUS,
            &ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            },
        )
        .await
        .map_err(upstream_error("container", id.as_str()))?;
    let info = info_json(&response.info);
    let status = response.status.ok_or_else(|| ArchiveError::Info {
        what: "container",
        id: id.to_string(),
        field: "status",
    })?;
    Ok((status, info))
}

/// The sandbox's `log_directory` and the pod its metadata names, from containerd's verbose
/// PodSandboxStatus.
async fn sandbox_log_directory(
    archive: &Archive,
    sandbox_id: &str,
) -> Result<(String, PodRef), ArchiveError> {
    let response: PodSandboxStatusResponse = archive
        .upstream
        .call(
            POD_SANDBOX_STATUS,
            &PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                verbose: true,
            },
        )
        .await
        .map_err(upstream_error("sandbox", sandbox_id))?;
    let info = info_json(&response.info);
    let log_directory = info_field(&info, &["config", "log_directory"])
        .or_else(|| info_field(&info, &["config", "logDirectory"]))
        .ok_or_else(|| ArchiveError::Info {
            what: "sandbox",
            id: sandbox_id.to_string(),
            field: "config.log_directory",
        })?;
    let pod = response
        .status
        .and_then(|s| s.metadata)
        .map(|m| PodRef {
            namespace: m.namespace,
            name: m.name,
            uid: m.uid,
        })
        .unwrap_or_default();
    Ok((log_directory, pod))
}

fn upstream_error<'a>(
    what: &'static str,
    id: &'a str,
) -> impl FnOnce(tonic::Status) -> ArchiveError + 'a {
    move |status| ArchiveError::Upstream {
        what,
        id: id.to_string(),
        status: Box::new(status),
    }
}

/// containerd's verbose `info["info"]` JSON (unversioned: read with care), Null when absent.
fn info_json(info: &std::collections::HashMap<String, String>) -> serde_json::Value {
    info.get("info")
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The shim's cgroup record for `id` in `records`, when the shim runs and wrote one (reads a file:
/// call it on the blocking pool).
fn cgroup_record(records: &Path, id: &ContainerId) -> Option<dockhand_host::record::Record> {
    match dockhand_host::record::read(records, id.as_str()) {
        Ok(record) => record,
        Err(e) => {
            tracing::debug!(container_id = %id, error = %e, "no cgroup record");
            None
        }
    }
}

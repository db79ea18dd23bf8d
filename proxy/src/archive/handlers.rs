//! The archive's CRI handlers: one [`Interceptor`] per method the intercept table gives it.

use std::collections::HashMap;
use std::sync::Arc;

use dockhand_host::ContainerId;
use dockhand_protos::cri::{
    ContainerState, ContainerStatusRequest, ContainerStatusResponse, RemoveContainerRequest,
    RemovePodSandboxRequest, ReopenContainerLogRequest, StartContainerRequest,
};
use futures::future::BoxFuture;
use prost::Message;
use tonic::Code;
use tracing::Instrument;

use super::meta::meta_from_status;
use super::staging::Linked;
use super::store::ContainerMeta;
use super::{restore, stage, Archive, Job, FINALIZE_WAIT};
use crate::grpc::{Interceptor, Reply, UnaryCall};

/// StartContainer: stage the log file.
pub struct StartContainer(pub Arc<Archive>);
/// ReopenContainerLog: stage the new file, archive the rotated one.
pub struct ReopenContainerLog(pub Arc<Archive>);
/// RemoveContainer: finalize (queued; never deletes the archive).
pub struct RemoveContainer(pub Arc<Archive>);
/// RemovePodSandbox: finalize the pod's staged containers (containerd removes them with it).
pub struct RemovePodSandbox(pub Arc<Archive>);
/// ContainerStatus: answer for archived containers containerd no longer knows.
pub struct ContainerStatus(pub Arc<Archive>);

impl Interceptor for StartContainer {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(start_container(&self.0, call))
    }
}

impl Interceptor for ReopenContainerLog {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(reopen_container_log(&self.0, call))
    }
}

impl Interceptor for RemoveContainer {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(remove_container(&self.0, call))
    }
}

impl Interceptor for RemovePodSandbox {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(remove_pod_sandbox(&self.0, call))
    }
}

impl Interceptor for ContainerStatus {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(container_status(&self.0, call))
    }
}

/// StartContainer: forwarded; once started, its log file is staged.
async fn start_container(archive: &Archive, call: UnaryCall) -> Reply {
    let reply = call.forward_unchanged().await;
    if reply.code() != Code::Ok {
        return reply;
    }
    let Some(id) = call
        .decode::<StartContainerRequest>()
        .ok()
        .map(|r| r.container_id)
    else {
        return reply;
    };
    let span = tracing::info_span!("archive_stage", container_id = %id);
    if let Err(e) = stage::stage(archive, &id, true).instrument(span).await {
        tracing::warn!(container_id = %id, error = %e, "container log will not be archived");
        archive.metrics.lost(e.reason());
    }
    reply
}

/// ReopenContainerLog: forwarded; on success the new file is staged as the next generation
/// and the previous one is queued for the archive.
async fn reopen_container_log(archive: &Archive, call: UnaryCall) -> Reply {
    let request = call.decode::<ReopenContainerLogRequest>().ok();
    let reply = call.forward_unchanged().await;
    let Some(id) = request.and_then(|r| ContainerId::parse(&r.container_id).ok()) else {
        return reply;
    };
    if reply.code() != Code::Ok {
        return reply;
    }
    let location = archive
        .state()
        .staged
        .get(&id)
        .and_then(|s| s.location.clone());
    let Some(location) = location else {
        return reply;
    };
    let staging = archive.staging.clone();
    let linked = {
        let id = id.clone();
        tokio::task::spawn_blocking(move || staging.link(&id, &location, 0)).await
    };
    match linked {
        Ok(Ok(Linked::New(generation))) => {
            tracing::info!(container_id = %id, generation, "log rotated; previous generation queued");
            archive.queue(Job::Rotated {
                id,
                below: generation,
            });
        }
        Ok(Ok(Linked::Already(_))) => {}
        Ok(Err(e)) => {
            tracing::warn!(container_id = %id, error = %e, "cannot stage the reopened log");
            archive.metrics.lost(e.reason());
        }
        Err(e) => tracing::warn!(container_id = %id, error = %e, "staging task failed"),
    }
    reply
}

/// RemoveContainer: forwarded at once (the archive is never deleted by it); a staged
/// container's finalization is queued. For an archived container (kubelet repeating a removal)
/// the restored copy is removed once containerd has answered: kubelet is done with it.
async fn remove_container(archive: &Archive, call: UnaryCall) -> Reply {
    let id = call
        .decode::<RemoveContainerRequest>()
        .ok()
        .and_then(|r| ContainerId::parse(&r.container_id).ok());
    let Some(id) = id else {
        return call.forward_unchanged().await;
    };
    // Removed before it started (or its start failed): CreateContainer's record is not needed.
    archive.lifecycle.forget(&id);
    let staged = archive.state().staged.get(&id).map(|s| s.meta.clone());
    let Some(meta) = staged else {
        let reply = call.forward_unchanged().await;
        if archive.contains(id.as_str()) {
            archive.remove_restored(&id).await;
        }
        return reply;
    };
    let meta = ended(archive, &id, meta).await;
    // How it ended is durable before containerd forgets it: a proxy killed after this point
    // finalizes from the staging record with the exit code, reason and times.
    archive.keep_record(&meta).await;
    let reply = call.forward_unchanged().await;
    if matches!(reply.code(), Code::Ok | Code::NotFound) {
        archive.removed(id, meta);
    }
    reply
}

/// How a staged container ended: kubelet asked ContainerStatus right before removing it (kept
/// by `remember_status`); for other callers containerd is asked now.
async fn ended(archive: &Archive, id: &ContainerId, meta: ContainerMeta) -> ContainerMeta {
    if meta.exit_code.is_some() {
        return meta;
    }
    match stage::container_status(archive, id).await {
        Ok((status, _)) => meta.updated_with(&meta_from_status(id, &status)),
        Err(_) => meta,
    }
}

/// RemovePodSandbox: containerd removes the pod's containers with it (critest and other CRI
/// clients remove pods this way, with no RemoveContainer). The pod's staged containers get
/// their exit status recorded before it is forwarded and are finalized when it succeeds; when
/// it fails, those containerd no longer has are.
async fn remove_pod_sandbox(archive: &Archive, call: UnaryCall) -> Reply {
    let pod = call
        .decode::<RemovePodSandboxRequest>()
        .ok()
        .map(|r| r.pod_sandbox_id)
        .filter(|id| !id.is_empty());
    let Some(pod) = pod else {
        return call.forward_unchanged().await;
    };
    archive.lifecycle.forget_pod(&pod);
    // containerd also takes a unique prefix of a sandbox id: the staged containers of every
    // sandbox the given id could name are candidates, and only those of a sandbox with exactly
    // that id count as removed by an OK answer; for the others containerd is asked.
    let members: Vec<(ContainerId, ContainerMeta, bool)> = {
        let state = archive.state();
        state
            .staged
            .iter()
            .filter(|(id, s)| s.sandbox.starts_with(&pod) && !state.pending.contains(*id))
            .map(|(id, s)| (id.clone(), s.meta.clone(), s.sandbox == pod))
            .collect()
    };
    if members.is_empty() {
        return call.forward_unchanged().await;
    }
    let mut ended_members = Vec::with_capacity(members.len());
    for (id, meta, exact) in members {
        let meta = ended(archive, &id, meta).await;
        archive.keep_record(&meta).await;
        ended_members.push((id, meta, exact));
    }
    let reply = call.forward_unchanged().await;
    let pod_gone = matches!(reply.code(), Code::Ok | Code::NotFound);
    for (id, meta, exact) in ended_members {
        let gone = (pod_gone && exact)
            || matches!(
                stage::container_status(archive, &id).await,
                Err(super::ArchiveError::Upstream { ref status, .. }) if status.code() == Code::NotFound
            );
        if gone {
            tracing::info!(container_id = %id, pod_sandbox_id = %pod, "container removed with its pod; archiving");
            archive.removed(id, meta);
        }
    }
    reply
}

/// ContainerStatus: for a container dockhand saw removed, answered from the archive without
/// asking containerd (which would log an error for every such call); otherwise forwarded, and
/// when containerd answers NotFound for an archived container, answered with its exited status
/// and a restored copy of its log. A staged container containerd no longer knows was removed
/// behind dockhand's back: it is finalized now.
async fn container_status(archive: &Archive, call: UnaryCall) -> Reply {
    let request = call.decode::<ContainerStatusRequest>().ok();
    let request = request.as_ref();
    let id = request.and_then(|r| ContainerId::parse(&r.container_id).ok());
    let Some(id) = id else {
        return call.forward_unchanged().await;
    };
    if archive.config.serve_kubelet && archive.seen_removed(&id) {
        return match archived_status(archive, &id).await {
            Some(message) => Reply::ok(&message),
            // Not archived after all (its log was lost): containerd's own answer.
            None => call.forward_unchanged().await,
        };
    }
    let reply = call.forward_unchanged().await;
    match reply.code() {
        Code::Ok => {
            remember_status(archive, &id, &reply);
            reply
        }
        Code::NotFound => {
            let staged = archive.state().staged.get(&id).map(|s| s.meta.clone());
            if let Some(meta) = staged {
                tracing::info!(container_id = %id, "staged container is gone from containerd; archiving");
                archive.removed(id.clone(), meta);
            }
            if !archive.config.serve_kubelet {
                return reply;
            }
            match archived_status(archive, &id).await {
                Some(message) => Reply::ok(&message),
                None => reply,
            }
        }
        _ => reply,
    }
}

/// Keeps the exited status of a staged container (kubelet asks just before removing it).
fn remember_status(archive: &Archive, id: &ContainerId, reply: &Reply) {
    if !archive.state().staged.contains_key(id) {
        return;
    }
    let Some(status) = reply
        .message()
        .and_then(|m| ContainerStatusResponse::decode(m).ok())
        .and_then(|r| r.status)
    else {
        return;
    };
    if status.state != ContainerState::ContainerExited as i32 {
        return;
    }
    let meta = meta_from_status(id, &status);
    if let Some(staged) = archive.state().staged.get_mut(id) {
        staged.meta = staged.meta.updated_with(&meta);
    }
}

/// The encoded ContainerStatusResponse for an archived container, if there is one.
async fn archived_status(archive: &Archive, id: &ContainerId) -> Option<Vec<u8>> {
    let mut progress = archive.progress.subscribe();
    let waited = tokio::time::timeout(FINALIZE_WAIT, async {
        while archive.state().pending.contains(id) {
            if progress.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!(container_id = %id, "archive of a removed container is not complete yet");
    }
    let entry = archive.state().archived.get(id).cloned()?;
    if !entry.complete {
        return None;
    }
    let store = archive.store.clone();
    let restored = archive.restored.clone();
    let archived = archive.complete_ids();
    let restored = {
        let id = id.clone();
        tokio::task::spawn_blocking(move || restored.serve(&store, &id, &archived)).await
    };
    let path = match restored {
        Ok(Ok(path)) => path,
        Ok(Err(e)) => {
            tracing::warn!(container_id = %id, error = %e, "cannot restore an archived log");
            return None;
        }
        Err(e) => {
            tracing::warn!(container_id = %id, error = %e, "restore task failed");
            return None;
        }
    };
    tracing::debug!(container_id = %id, log_path = %path.display(), "serving an archived container");
    let response = ContainerStatusResponse {
        status: Some(restore::exited_status(&entry, &path)),
        info: HashMap::new(),
    };
    Some(response.encode_to_vec())
}

//! Reconciliation: staging against what containerd still has, at start-up and periodically.
//! A staged container containerd no longer knows is finalized (its RemoveContainer was lost in
//! a crash or bypassed the proxy); a container containerd has that is not staged (started while
//! dockhand was down) is staged now.

use std::sync::Weak;

use dockhand_protos::cri::{ListContainersRequest, ListContainersResponse};
use tonic::Code;

use super::stage;
use super::staging::StagingError;
use super::{Archive, ArchiveError, Job, LIST_CONTAINERS, RECONCILE_INTERVAL};
use dockhand_host::ContainerId;

/// Staging against containerd: a staged container containerd no longer knows is finalized;
/// a container containerd has that is not staged (started while dockhand was down) is.
async fn reconcile(archive: &Archive) {
    // Listing and cleaning staging reads the filesystem: on the blocking pool.
    let staging = archive.staging.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let ids = staging.ids()?;
        for id in &ids {
            staging.remove_leftovers(id);
        }
        Ok::<_, StagingError>(ids)
    })
    .await;
    let staged = match listed {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read staging");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(error = %e, "staging task failed");
            Vec::new()
        }
    };
    for id in staged {
        if archive.state().pending.contains(&id) {
            continue;
        }
        match stage::container_status(archive, &id).await {
            Ok(_) => {
                if !archive.state().staged.contains_key(&id) {
                    if let Err(e) = stage::stage(archive, id.as_str(), false).await {
                        tracing::debug!(container_id = %id, error = %e, "cannot re-stage");
                    }
                }
            }
            Err(ArchiveError::Upstream { status, .. }) if status.code() == Code::NotFound => {
                tracing::info!(container_id = %id, "staged container is gone from containerd; archiving");
                archive.state().pending.insert(id.clone());
                archive.queue(Job::Finalize { id, meta: None });
            }
            Err(e) => {
                tracing::warn!(container_id = %id, error = %e, "cannot reconcile a staged container")
            }
        }
    }
    let listed: Result<ListContainersResponse, _> = archive
        .upstream
        .call(LIST_CONTAINERS, &ListContainersRequest { filter: None })
        .await;
    let containers = match listed {
        Ok(response) => response.containers,
        Err(status) => {
            tracing::warn!(error = %status, "cannot list containers to reconcile staging");
            return;
        }
    };
    for container in containers {
        let Ok(id) = ContainerId::parse(&container.id) else {
            continue;
        };
        let known = {
            let state = archive.state();
            state.staged.contains_key(&id)
                || state.pending.contains(&id)
                || state.refused.contains(&id)
                || state.archived.get(&id).is_some_and(|e| e.complete)
        };
        if !known {
            if let Err(e) = stage::stage(archive, id.as_str(), false).await {
                tracing::debug!(container_id = %id, error = %e, "not staged");
            }
        }
    }
}

pub(super) async fn reconciler(archive: Weak<Archive>) {
    loop {
        let Some(strong) = archive.upgrade() else {
            return;
        };
        reconcile(&strong).await;
        strong.progress.send_modify(|n| *n += 1);
        drop(strong);
        tokio::time::sleep(RECONCILE_INTERVAL).await;
    }
}

//! The container log archive: keeps containers' logs after kubelet's garbage collection.
//!
//! kubelet deletes a dead container's log files *before* it calls RemoveContainer, and deletes
//! whole pod log directories with no CRI call at all, so the data is secured early:
//!
//! - StartContainer: the log file is hard-linked into staging (`staging.rs`).
//! - ReopenContainerLog (rotation): the new file is linked as the next generation and the
//!   previous one is queued for compression.
//! - RemoveContainer: the exit status is made durable in staging, the call forwarded, and the
//!   remaining generations are queued for compression into the archive (`store.rs`) with the
//!   container's metadata, then staging is cleaned. RemovePodSandbox does the same for the
//!   pod's staged containers.
//! - ContainerStatus: for an id dockhand saw removed, or when containerd answers NotFound for
//!   an archived id, the proxy answers with an exited status and a restored copy of the log
//!   (`restore.rs`), so `kubectl logs` keeps working.
//!
//! Space is checked before it is used (`worker.rs`): a generation that cannot fit above the
//! free-space floor fails alone, is undone at once, and releases its staged link.
//!
//! One worker thread runs the queue in order (compression, cleanup, retention); every step is
//! idempotent, and start-up reconciles staging and the archive with what containerd still has.
//!
//! Files: `stage.rs` (where a started container's log is: CreateContainer's record in
//! `lifecycle.rs`, else containerd), `staging.rs` (hard links), `store.rs` (zstd frames +
//! `meta.json`), `worker.rs` (the queue and retention, on its own thread), `reconcile.rs`
//! (staging against containerd), `retention.rs` (what to drop), `restore.rs` (what kubelet sees),
//! `handlers.rs` (the CRI handlers), `meta.rs` (what is kept about a container), `metrics.rs`.
//! The `Archive` itself (this file) is the state they share; only this file has `impl Archive`.
//! `dockhand logs` (`cli/logs.rs`) reads the store.

mod handlers;
mod meta;
mod metrics;
mod reconcile;
pub mod restore;
pub mod retention;
mod stage;
pub mod staging;
pub mod store;
mod worker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::config::ArchiveConfig;
use crate::lifecycle::Lifecycle;
use crate::upstream::Upstream;

use dockhand_host::id::IdError;
use dockhand_host::ContainerId;
pub use handlers::{
    ContainerStatus, RemoveContainer, RemovePodSandbox, ReopenContainerLog, StartContainer,
};
use metrics::Metrics;
use restore::{RestoreError, Restored};
use staging::{LogLocation, Staging, StagingError};
use store::{ContainerMeta, Entry, Store, StoreError};

const CONTAINER_STATUS: &str = "/runtime.v1.RuntimeService/ContainerStatus";
const POD_SANDBOX_STATUS: &str = "/runtime.v1.RuntimeService/PodSandboxStatus";
const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";

/// Test hook, only in builds with the `test-hooks` feature (the integration tests'; never
/// `make install`'s): `before_compress` or `before_cleanup` makes the worker stop there forever,
/// so a test can kill the proxy between two steps.
#[cfg(feature = "test-hooks")]
pub const PAUSE_ENV: &str = "DOCKHAND_ARCHIVE_PAUSE_AT";
/// How often staging is reconciled with containerd, and retention runs without new work.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(300);
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// How long ContainerStatus waits for a removed container's archive to become complete.
const FINALIZE_WAIT: Duration = Duration::from_secs(10);
/// Restored copies not re-created for this long are removed (kubelet gets a new one on demand).
const RESTORED_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("containerd cannot tell about {what} {id}: {status}")]
    Upstream {
        what: &'static str,
        id: String,
        status: Box<tonic::Status>,
    },
    #[error("containerd's verbose status of {what} {id} has no {field}")]
    Info {
        what: &'static str,
        id: String,
        field: &'static str,
    },
    #[error(transparent)]
    Name(#[from] IdError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("archive task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ArchiveError {
    /// The metric label when this error loses a container's log.
    fn reason(&self) -> &'static str {
        match self {
            ArchiveError::Staging(e) => e.reason(),
            ArchiveError::Upstream { .. } | ArchiveError::Info { .. } => "containerd",
            ArchiveError::Name(_) => "invalid_id",
            _ => "io_error",
        }
    }
}

/// A container whose live log is staged.
#[derive(Debug, Clone)]
struct Staged {
    /// Where its log file is (None when it could not be found again after a restart).
    location: Option<LogLocation>,
    /// Its metadata: as of staging, then from the last ContainerStatus that saw it exited.
    meta: ContainerMeta,
    /// Its pod sandbox (RemovePodSandbox removes it with the pod).
    sandbox: String,
}

#[derive(Default)]
struct State {
    archived: HashMap<ContainerId, Entry>,
    staged: HashMap<ContainerId, Staged>,
    /// Removed containers whose finalization is queued.
    pending: HashSet<ContainerId>,
    /// Containers whose log was refused (no retry, no second warning).
    refused: HashSet<ContainerId>,
    /// Generations lost for lack of room, until their container's entry is completed.
    lost: HashMap<ContainerId, Vec<u32>>,
    /// Failed finalizations in this run, by container (bounded retries).
    failures: HashMap<ContainerId, u32>,
}

enum Job {
    /// Archive every staged generation below `below` (rotated out).
    Rotated { id: ContainerId, below: u32 },
    /// The container is gone: archive the rest and complete its entry.
    Finalize {
        id: ContainerId,
        meta: Option<Box<ContainerMeta>>,
    },
}

/// The archive: state shared by the handlers, the worker thread and the reconciler.
pub struct Archive {
    config: ArchiveConfig,
    upstream: Upstream,
    store: Store,
    staging: Staging,
    state: Mutex<State>,
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Bumped after every job, for ContainerStatus waiting on a finalization.
    progress: tokio::sync::watch::Sender<u64>,
    metrics: Metrics,
    /// Where the shim writes cgroup placement records (kept in the metadata).
    cgroup_records: PathBuf,
    /// What CreateContainer said about containers not started yet.
    lifecycle: Arc<Lifecycle>,
    /// The decompressed copies served to kubelet: their one owner.
    restored: Arc<Restored>,
}

impl Archive {
    /// Opens the archive: proves that staging can hard-link pod logs (one link made and removed;
    /// this creates the staging directory, and the pod log root if missing), repairs what a crash
    /// left, cleans restored copies, starts the worker thread and (inside a tokio runtime) the
    /// reconciler. The archive directory is created with its first entry.
    pub fn open(
        config: &ArchiveConfig,
        cgroup_records: &Path,
        upstream: Upstream,
        lifecycle: Arc<Lifecycle>,
        registry: &mut Registry,
    ) -> Result<Arc<Archive>, ArchiveError> {
        let staging = Staging::new(&config.staging_dir, &config.pod_logs_dir);
        staging.check_links()?;
        let store = Store::new(&config.dir, config.compression_level);
        let entries = store.recover()?;
        let (sender, receiver) = mpsc::channel();
        let metrics = Metrics::register(registry);
        let restored = Arc::new(Restored::new(
            &config.restored_dir,
            config.restored_max_bytes,
            Duration::from_secs(config.restored_lease_seconds),
            metrics.restored.clone(),
        ));
        let archive = Arc::new(Archive {
            config: config.clone(),
            upstream,
            store,
            staging,
            state: Mutex::new(State {
                archived: entries
                    .into_iter()
                    .map(|e| (e.container.id.clone(), e))
                    .collect(),
                ..State::default()
            }),
            jobs: Mutex::new(sender),
            progress: tokio::sync::watch::channel(0).0,
            metrics,
            cgroup_records: cgroup_records.to_path_buf(),
            lifecycle,
            restored,
        });
        archive.update_gauges();
        // Copies a previous run left: of containers no longer archived, half-written, or
        // beyond the bound.
        archive.restored.bound(&archive.complete_ids());
        let weak = Arc::downgrade(&archive);
        worker::spawn(weak, receiver).map_err(|source| StoreError::Root {
            path: config.dir.clone(),
            source,
        })?;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let weak = Arc::downgrade(&archive);
                runtime.spawn(reconcile::reconciler(weak));
            }
            Err(_) => tracing::warn!("no async runtime: staging is not reconciled with containerd"),
        }
        tracing::info!(
            dir = %config.dir.display(),
            staging = %config.staging_dir.display(),
            restored = %config.restored_dir.display(),
            "container log archive open"
        );
        Ok(archive)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(&self, job: Job) {
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job);
        if sent.is_err() {
            tracing::error!("archive worker is gone; staged logs wait for the next start");
        }
    }

    /// Whether the archive holds this container's log.
    pub fn contains(&self, id: &str) -> bool {
        ContainerId::parse(id).is_ok_and(|id| self.state().archived.contains_key(&id))
    }

    /// The ids of complete entries (whose restored copies may exist).
    fn complete_ids(&self) -> HashSet<ContainerId> {
        self.state()
            .archived
            .values()
            .filter(|e| e.complete)
            .map(|e| e.container.id.clone())
            .collect()
    }

    /// Removes a container's restored copy, on the blocking pool: now, or when the lease of a
    /// copy in use ends (a task looks again then).
    async fn remove_restored(&self, id: &ContainerId) {
        let release = |restored: Arc<Restored>, id: ContainerId, again: bool| {
            tokio::task::spawn_blocking(move || match again {
                false => restored.release(&id),
                true => restored.release_again(&id),
            })
        };
        let Ok(Some(mut when)) = release(self.restored.clone(), id.clone(), false).await else {
            return;
        };
        let restored = self.restored.clone();
        let id = id.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep_until(when.into()).await;
                match release(restored.clone(), id.clone(), true).await {
                    Ok(Some(next)) => when = next,
                    _ => return,
                }
            }
        });
    }

    /// Whether dockhand saw containerd remove this container: its removal was forwarded and
    /// succeeded (finalization queued), or its entry is complete (only a removal completes one).
    /// Container ids are never reused, so containerd need not be asked about it again.
    fn seen_removed(&self, id: &ContainerId) -> bool {
        let state = self.state();
        state.pending.contains(id) || state.archived.get(id).is_some_and(|e| e.complete)
    }

    /// Writes a staged container's metadata to its staging record (atomic rename, no fsync: it
    /// survives a proxy crash; an fsync would wait for the whole dirty log), on the blocking
    /// pool, and keeps it in memory. A failure is logged: a removal is never held up by it.
    async fn keep_record(&self, meta: &ContainerMeta) {
        if let Some(staged) = self.state().staged.get_mut(&meta.id) {
            staged.meta = meta.clone();
        }
        let staging = self.staging.clone();
        let record = meta.clone();
        let written =
            tokio::task::spawn_blocking(move || staging.write_record_unsynced(&record)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(container_id = %meta.id, error = %e, "cannot record how the container ended")
            }
            Err(e) => tracing::warn!(container_id = %meta.id, error = %e, "staging task failed"),
        }
    }

    /// The archive's gauges, from its state.
    pub(super) fn update_gauges(&self) {
        let state = self.state();
        let bytes: u64 = state.archived.values().map(worker::disk_bytes).sum();
        self.metrics.bytes.set(bytes as i64);
        self.metrics.containers.set(state.archived.len() as i64);
        self.metrics.staged.set(state.staged.len() as i64);
    }

    /// dockhand saw containerd remove a staged container: its finalization is queued.
    fn removed(&self, id: ContainerId, meta: ContainerMeta) {
        if !self.state().pending.insert(id.clone()) {
            return;
        }
        self.queue(Job::Finalize {
            id,
            meta: Some(Box::new(meta)),
        });
    }
}

#[cfg(test)]
mod tests;

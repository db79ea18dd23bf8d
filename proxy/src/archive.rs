//! The container log archive: keeps containers' logs after kubelet's garbage collection.
//!
//! kubelet deletes a dead container's log files *before* it calls RemoveContainer, and deletes
//! whole pod log directories with no CRI call at all, so the data is secured early:
//!
//! - StartContainer: the log file is hard-linked into staging (`staging.rs`).
//! - ReopenContainerLog (rotation): the new file is linked as the next generation and the
//!   previous one is queued for compression.
//! - RemoveContainer: forwarded at once; the remaining generations are queued for compression
//!   into the archive (`store.rs`) with the container's metadata, then staging is cleaned.
//! - ContainerStatus: when containerd answers NotFound for an archived id, the proxy answers
//!   with an exited status and a restored copy of the log (`restore.rs`), so `kubectl logs`
//!   keeps working.
//!
//! One worker thread runs the queue in order (compression, cleanup, retention); every step is
//! idempotent, and start-up reconciles staging and the archive with what containerd still has.
//!
//! Files: `staging.rs` (hard links), `store.rs` (zstd frames + `meta.json`), `worker.rs` (the
//! queue and retention), `reconcile.rs` (staging against containerd), `retention.rs` (what to
//! drop), `restore.rs` (what kubelet sees), `cri_log.rs` and `logs_cmd.rs` (`dockhand logs`).

pub mod cri_log;
pub mod logs_cmd;
mod reconcile;
pub mod restore;
pub mod retention;
pub mod staging;
pub mod store;
mod worker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dockhand_protos::cri::{
    ContainerState, ContainerStatus, ContainerStatusRequest, ContainerStatusResponse,
    PodSandboxStatusRequest, PodSandboxStatusResponse, RemoveContainerRequest,
    ReopenContainerLogRequest, StartContainerRequest,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use tonic::Code;
use tracing::Instrument;

use crate::config::ArchiveConfig;
use crate::grpc::Reply;
use crate::intercept::UnaryCall;
use crate::upstream::Upstream;

use dockhand_host::id::IdError;
use dockhand_host::ContainerId;
use restore::RestoreError;
use staging::{Linked, LogLocation, Staging, StagingError};
use store::{ContainerMeta, Entry, Store, StoreError};

const CONTAINER_STATUS: &str = "/runtime.v1.RuntimeService/ContainerStatus";
const POD_SANDBOX_STATUS: &str = "/runtime.v1.RuntimeService/PodSandboxStatus";
const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";

/// Test hook: `before_compress` or `before_cleanup` makes the worker stop there forever, so a
/// test can kill the proxy between two steps.
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

/// Why a container's log could not be kept (`dockhand_archive_lost_logs_total{reason}`).
const LOST_REASONS: [&str; 7] = [
    "outside_log_directory",
    "log_missing",
    "unsafe_path",
    "cross_device",
    "io_error",
    "containerd",
    "invalid_id",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

struct Metrics {
    bytes: Gauge,
    containers: Gauge,
    staged: Gauge,
    input_bytes: Counter,
    dropped: Family<ReasonLabels, Counter>,
    lost: Family<ReasonLabels, Counter>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            bytes: Gauge::default(),
            containers: Gauge::default(),
            staged: Gauge::default(),
            input_bytes: Counter::default(),
            dropped: Family::default(),
            lost: Family::default(),
        };
        registry.register(
            "dockhand_archive_bytes",
            "Size of the log archive on disk (compressed logs and metadata)",
            metrics.bytes.clone(),
        );
        registry.register(
            "dockhand_archive_containers",
            "Containers in the log archive",
            metrics.containers.clone(),
        );
        registry.register(
            "dockhand_archive_staged_containers",
            "Containers whose live log is hard-linked into staging",
            metrics.staged.clone(),
        );
        registry.register(
            "dockhand_archive_input_bytes",
            "Uncompressed log bytes archived",
            metrics.input_bytes.clone(),
        );
        registry.register(
            "dockhand_archive_dropped_containers",
            "Archived containers dropped by retention, by reason",
            metrics.dropped.clone(),
        );
        registry.register(
            "dockhand_archive_lost_logs",
            "Container logs that could not be staged or archived, by reason",
            metrics.lost.clone(),
        );
        // Every reason at 0 from the start, so alerts see the series before the first event.
        for reason in ["max_age", "max_bytes", "min_free"] {
            let _ = metrics.dropped.get_or_create(&ReasonLabels { reason });
        }
        for reason in LOST_REASONS {
            let _ = metrics.lost.get_or_create(&ReasonLabels { reason });
        }
        metrics
    }

    fn lost(&self, reason: &'static str) {
        self.lost.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// A container whose live log is staged.
#[derive(Debug, Clone)]
struct Staged {
    /// Where its log file is (None when it could not be found again after a restart).
    location: Option<LogLocation>,
    /// Its metadata: as of staging, then from the last ContainerStatus that saw it exited.
    meta: ContainerMeta,
}

#[derive(Default)]
struct State {
    archived: HashMap<ContainerId, Entry>,
    staged: HashMap<ContainerId, Staged>,
    /// Removed containers whose finalization is queued.
    pending: HashSet<ContainerId>,
    /// Containers whose log was refused (no retry, no second warning).
    refused: HashSet<ContainerId>,
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
    pause_at: Option<String>,
    /// Where the shim writes cgroup placement records (kept in the metadata).
    cgroup_records: PathBuf,
}

impl Archive {
    /// Opens the archive: checks that staging can hard-link pod logs, repairs what a crash left,
    /// starts the worker thread and (inside a tokio runtime) the reconciler. Nothing is created
    /// on disk until the first container is staged.
    pub fn open(
        config: &ArchiveConfig,
        cgroup_records: &Path,
        upstream: Upstream,
        registry: &mut Registry,
    ) -> Result<Arc<Archive>, ArchiveError> {
        let staging = Staging::new(&config.staging_dir, &config.pod_logs_dir);
        staging.check_same_filesystem()?;
        let store = Store::new(&config.dir, config.compression_level);
        let entries = store.recover()?;
        let (sender, receiver) = mpsc::channel();
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
            metrics: Metrics::register(registry),
            pause_at: std::env::var(PAUSE_ENV).ok().filter(|s| !s.is_empty()),
            cgroup_records: cgroup_records.to_path_buf(),
        });
        archive.update_gauges();
        let weak = Arc::downgrade(&archive);
        std::thread::Builder::new()
            .name("dockhand-archive".into())
            .spawn(move || worker::worker(weak, receiver))
            .map_err(|source| StoreError::Root {
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

    // ---- CRI handlers -------------------------------------------------------------------

    /// StartContainer: forwarded; once started, its log file is staged.
    pub async fn start_container(&self, call: UnaryCall) -> Reply {
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
        if let Err(e) = self.stage(&id, true).instrument(span).await {
            tracing::warn!(container_id = %id, error = %e, "container log will not be archived");
            self.metrics.lost(e.reason());
        }
        reply
    }

    /// The shim's cgroup record for `id`, when the shim runs and wrote one.
    fn cgroup_record(&self, id: &ContainerId) -> Option<dockhand_host::record::Record> {
        match dockhand_host::record::read(&self.cgroup_records, id.as_str()) {
            Ok(record) => record,
            Err(e) => {
                tracing::debug!(container_id = %id, error = %e, "no cgroup record");
                None
            }
        }
    }

    /// ReopenContainerLog: forwarded; on success the new file is staged as the next generation
    /// and the previous one is queued for the archive.
    pub async fn reopen_container_log(&self, call: UnaryCall) -> Reply {
        let request = call.decode::<ReopenContainerLogRequest>().ok();
        let reply = call.forward_unchanged().await;
        let Some(id) = request.and_then(|r| ContainerId::parse(&r.container_id).ok()) else {
            return reply;
        };
        if reply.code() != Code::Ok {
            return reply;
        }
        let location = self
            .state()
            .staged
            .get(&id)
            .and_then(|s| s.location.clone());
        let Some(location) = location else {
            return reply;
        };
        let staging = self.staging.clone();
        let linked = {
            let id = id.clone();
            tokio::task::spawn_blocking(move || staging.link(&id, &location, 0)).await
        };
        match linked {
            Ok(Ok(Linked::New(generation))) => {
                tracing::info!(container_id = %id, generation, "log rotated; previous generation queued");
                self.queue(Job::Rotated {
                    id,
                    below: generation,
                });
            }
            Ok(Ok(Linked::Already(_))) => {}
            Ok(Err(e)) => {
                tracing::warn!(container_id = %id, error = %e, "cannot stage the reopened log");
                self.metrics.lost(e.reason());
            }
            Err(e) => tracing::warn!(container_id = %id, error = %e, "staging task failed"),
        }
        reply
    }

    /// RemoveContainer: forwarded at once (the archive is never deleted by it); a staged
    /// container's finalization is queued.
    pub async fn remove_container(&self, call: UnaryCall) -> Reply {
        let id = call
            .decode::<RemoveContainerRequest>()
            .ok()
            .and_then(|r| ContainerId::parse(&r.container_id).ok());
        let Some(id) = id else {
            return call.forward_unchanged().await;
        };
        let staged = self.state().staged.get(&id).map(|s| s.meta.clone());
        let Some(meta) = staged else {
            return call.forward_unchanged().await;
        };
        // kubelet asked ContainerStatus right before; only other callers cost a round trip.
        let meta = if meta.exit_code.is_some() {
            meta
        } else {
            match self.container_meta(&id).await {
                Ok((status, _)) => meta.updated_with(&meta_from_status(&id, &status)),
                Err(_) => meta,
            }
        };
        let reply = call.forward_unchanged().await;
        if matches!(reply.code(), Code::Ok | Code::NotFound) {
            self.state().pending.insert(id.clone());
            self.queue(Job::Finalize {
                id,
                meta: Some(Box::new(meta)),
            });
        }
        reply
    }

    /// ContainerStatus: forwarded; when containerd answers NotFound for an archived container,
    /// answered with its exited status and a restored copy of its log.
    /// `request` is the caller's, decoded once by the intercept table (None when it does not
    /// decode).
    pub async fn container_status(
        &self,
        call: UnaryCall,
        request: Option<&ContainerStatusRequest>,
    ) -> Reply {
        let id = request.and_then(|r| ContainerId::parse(&r.container_id).ok());
        let reply = call.forward_unchanged().await;
        let Some(id) = id else {
            return reply;
        };
        match reply.code() {
            Code::Ok => {
                self.remember_status(&id, &reply);
                reply
            }
            Code::NotFound if self.config.serve_kubelet => match self.archived_status(&id).await {
                Some(message) => Reply::ok(&message),
                None => reply,
            },
            _ => reply,
        }
    }

    /// Keeps the exited status of a staged container (kubelet asks just before removing it).
    fn remember_status(&self, id: &ContainerId, reply: &Reply) {
        if !self.state().staged.contains_key(id) {
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
        if let Some(staged) = self.state().staged.get_mut(id) {
            staged.meta = staged.meta.updated_with(&meta);
        }
    }

    /// The encoded ContainerStatusResponse for an archived container, if there is one.
    async fn archived_status(&self, id: &ContainerId) -> Option<Vec<u8>> {
        let mut progress = self.progress.subscribe();
        let waited = tokio::time::timeout(FINALIZE_WAIT, async {
            while self.state().pending.contains(id) {
                if progress.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(container_id = %id, "archive of a removed container is not complete yet");
        }
        let entry = self.state().archived.get(id).cloned()?;
        if !entry.complete {
            return None;
        }
        let store = self.store.clone();
        let root = self.config.restored_dir.clone();
        let restored = {
            let id = id.clone();
            tokio::task::spawn_blocking(move || restore::ensure(&store, &root, &id)).await
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

    // ---- staging ------------------------------------------------------------------------

    /// Asks containerd where the container's log is and stages it.
    async fn stage(&self, id: &str, report_missing: bool) -> Result<(), ArchiveError> {
        let id = ContainerId::parse(id)?;
        if self.state().refused.contains(&id) {
            return Ok(());
        }
        let (status, info) = self.container_meta(&id).await?;
        if status.log_path.is_empty() {
            tracing::debug!(container_id = %id, "container has no log file");
            return Ok(());
        }
        let sandbox_id = info_field(&info, &["sandboxID"]).ok_or_else(|| ArchiveError::Info {
            what: "container",
            id: id.to_string(),
            field: "sandboxID",
        })?;
        let log_directory = self.sandbox_log_directory(&sandbox_id).await?;
        let location = match staging::locate(
            &id,
            self.staging.pod_logs(),
            &log_directory,
            &status.log_path,
        ) {
            Ok(location) => location,
            Err(e) => {
                self.state().refused.insert(id);
                return Err(e.into());
            }
        };
        let mut meta = meta_from_status(&id, &status);
        meta.cgroup = self.cgroup_record(&id);
        let at_least = self
            .state()
            .archived
            .get(&id)
            .and_then(|e| e.generations.iter().max().map(|g| g + 1))
            .unwrap_or(1);
        let staging = self.staging.clone();
        let linked = {
            let (location, meta) = (location.clone(), meta.clone());
            tokio::task::spawn_blocking(move || {
                staging.write_record(&meta)?;
                staging.link(&meta.id, &location, at_least)
            })
            .await?
        };
        let generations = self.staging.generations(&id).unwrap_or_default();
        let result = match linked {
            Ok(linked) => {
                tracing::info!(container_id = %id, log_path = %status.log_path, ?linked, "log staged");
                Ok(())
            }
            // The live file is gone but earlier generations are staged: keep those.
            Err(e) if !report_missing && !generations.is_empty() => {
                tracing::debug!(container_id = %id, error = %e, "live log gone; keeping staged generations");
                Ok(())
            }
            Err(e) => {
                if matches!(&e, StagingError::Unsafe { .. }) && e.reason() == "unsafe_path" {
                    self.state().refused.insert(id.clone());
                }
                if generations.is_empty() {
                    let _ = self.staging.remove(&id);
                }
                Err(e)
            }
        };
        if !generations.is_empty() {
            let mut state = self.state();
            state.staged.insert(
                id.clone(),
                Staged {
                    location: Some(location),
                    meta,
                },
            );
        }
        self.update_gauges();
        if generations.len() > 1 {
            if let Some(&live) = generations.last() {
                self.queue(Job::Rotated { id, below: live });
            }
        }
        result.map_err(ArchiveError::from)
    }

    /// containerd's verbose ContainerStatus: the status and its `info` JSON.
    async fn container_meta(
        &self,
        id: &ContainerId,
    ) -> Result<(ContainerStatus, serde_json::Value), ArchiveError> {
        let response: ContainerStatusResponse = self
            .upstream
            .call(
                CONTAINER_STATUS,
                &ContainerStatusRequest {
                    container_id: id.to_string(),
                    verbose: true,
                },
            )
            .await
            .map_err(|status| ArchiveError::Upstream {
                what: "container",
                id: id.to_string(),
                status: Box::new(status),
            })?;
        let info = response
            .info
            .get("info")
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or(serde_json::Value::Null);
        let status = response.status.ok_or_else(|| ArchiveError::Info {
            what: "container",
            id: id.to_string(),
            field: "status",
        })?;
        Ok((status, info))
    }

    /// The sandbox's `log_directory`, from containerd's verbose PodSandboxStatus.
    async fn sandbox_log_directory(&self, sandbox_id: &str) -> Result<String, ArchiveError> {
        let response: PodSandboxStatusResponse = self
            .upstream
            .call(
                POD_SANDBOX_STATUS,
                &PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox_id.to_string(),
                    verbose: true,
                },
            )
            .await
            .map_err(|status| ArchiveError::Upstream {
                what: "sandbox",
                id: sandbox_id.to_string(),
                status: Box::new(status),
            })?;
        let info: serde_json::Value = response
            .info
            .get("info")
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or(serde_json::Value::Null);
        info_field(&info, &["config", "log_directory"])
            .or_else(|| info_field(&info, &["config", "logDirectory"]))
            .ok_or_else(|| ArchiveError::Info {
                what: "sandbox",
                id: sandbox_id.to_string(),
                field: "config.log_directory",
            })
    }
}

fn info_field(info: &serde_json::Value, path: &[&str]) -> Option<String> {
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

#[cfg(test)]
mod tests;

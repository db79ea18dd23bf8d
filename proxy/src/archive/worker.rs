//! The archive's worker thread: runs the queue in order (compress a generation, commit it,
//! drop its staged link; complete a removed container's entry) and keeps the archive within its
//! bounds after every write.

use std::sync::mpsc;
use std::sync::Weak;

use super::metrics::ReasonLabels;
use super::retention::{self, Candidate, Policy};
use super::store::{self, Appended, ContainerMeta, Entry};
use super::{Archive, ArchiveError, Job, RETENTION_INTERVAL};
use dockhand_host::fs as nofollow;
use dockhand_host::ContainerId;

impl Worker<'_> {
    fn run(&self, job: Job) {
        match job {
            Job::Rotated { id, below } => {
                let meta = self.current_meta(&id);
                for generation in self.archive.staging.generations(&id).unwrap_or_default() {
                    if generation < below {
                        if let Err(e) = self.archive_generation(&meta, generation) {
                            tracing::error!(container_id = %id, generation, error = %e, "cannot archive a rotated log; it stays staged");
                        }
                    }
                }
            }
            Job::Finalize { id, meta } => {
                let recorded = self.current_meta(&id);
                let meta = match meta {
                    Some(meta) => recorded.updated_with(&meta),
                    None => recorded,
                };
                if let Err(e) = self.finalize(&meta) {
                    self.finalize_failed(&id, &e);
                }
                let mut state = self.archive.state();
                state.pending.remove(&id);
                state.staged.remove(&id);
            }
        }
        self.archive.update_gauges();
    }

    /// What is known about a staged container: in memory, else its staging record.
    fn current_meta(&self, id: &ContainerId) -> ContainerMeta {
        if let Some(staged) = self.archive.state().staged.get(id) {
            return staged.meta.clone();
        }
        match self.archive.staging.read_record(id) {
            Ok(Some(meta)) => meta,
            Ok(None) => ContainerMeta::unknown(id.clone()),
            Err(e) => {
                tracing::warn!(container_id = %id, error = %e, "staged metadata unreadable");
                ContainerMeta::unknown(id.clone())
            }
        }
    }

    /// Compresses one staged generation into the archive, within the room there is for it
    /// (see [`Worker::make_room`]). A generation that does not fit is lost alone: the partial
    /// write is undone, the loss counted, and the staged link released so the space on the pod
    /// logs' filesystem comes back and nothing retries it.
    fn archive_generation(
        &self,
        meta: &ContainerMeta,
        generation: u32,
    ) -> Result<(), ArchiveError> {
        let id = &meta.id;
        let mut file = self.archive.staging.open_generation(id, generation)?;
        let staged = file.metadata().map_or(0, |m| m.len());
        self.pause("before_compress");
        let appended = match self.make_room(id, staged) {
            Ok(limit) => self
                .archive
                .store
                .append_generation_within(meta, generation, &mut file, limit),
            Err(room) => Err(store::StoreError::NoSpace {
                id: id.clone(),
                path: self.archive.store.root().join(id.as_str()),
                limit: room,
            }),
        };
        drop(file);
        let appended = match appended {
            Ok(appended) => appended,
            Err(e) if e.is_no_space() => {
                self.lose_generation(meta, generation, staged, &e);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if let Appended::Added {
            raw, compressed, ..
        } = &appended
        {
            self.archive.metrics.input_bytes.inc_by(*raw);
            tracing::info!(container_id = %id, generation, raw_bytes = raw, compressed_bytes = compressed, "log generation archived");
        }
        self.archive
            .state()
            .archived
            .insert(id.clone(), appended.entry().clone());
        // Right away, not after the job: the bound must hold whenever an entry is visible.
        self.enforce_retention();
        self.pause("before_cleanup");
        self.archive.staging.remove_generation(id, generation)?;
        Ok(())
    }

    /// A generation with no room in the archive: counted, its staged link released.
    fn lose_generation(
        &self,
        meta: &ContainerMeta,
        generation: u32,
        staged: u64,
        error: &store::StoreError,
    ) {
        let id = &meta.id;
        tracing::warn!(container_id = %id, pod = %format!("{}/{}", meta.namespace, meta.pod), container = %meta.container, generation, staged_bytes = staged, error = %error, "container log generation lost: no room in the archive");
        self.archive.metrics.lost("no_space");
        self.archive
            .state()
            .lost
            .entry(id.clone())
            .or_default()
            .push(generation);
        if let Err(e) = self.archive.staging.remove_generation(id, generation) {
            tracing::warn!(container_id = %id, generation, error = %e, "cannot release a staged log");
        }
    }

    /// Checks the space a generation of `staged` bytes needs before any is used, and returns
    /// how many compressed bytes it may write. The estimate is the staged size over the
    /// archive's running compression ratio (1 until 1 MiB has been archived). It fails, with
    /// the room there could be, when the estimate exceeds what the filesystem has above the
    /// free-space floor plus everything retention could drop, or `max_bytes` less this entry's
    /// own size: then nothing is dropped. Otherwise the oldest other entries are dropped
    /// (`min_free`) until the estimate fits above the floor, and the write may use what is
    /// above the floor (and within `max_bytes`), no more.
    fn make_room(&self, id: &ContainerId, staged: u64) -> Result<u64, u64> {
        let estimate = {
            let state = self.archive.state();
            let (raw, compressed) = state
                .archived
                .values()
                .fold((0u64, 0u64), |(r, c), e| (r + e.raw_bytes, c + e.log_bytes));
            let ratio = if raw >= RATIO_MIN_INPUT && compressed > 0 {
                (raw as f64 / compressed as f64).max(1.0)
            } else {
                1.0
            };
            (staged as f64 / ratio) as u64 + ESTIMATE_OVERHEAD
        };
        loop {
            let above_floor = self.room_above_floor();
            let (own, others) = {
                let state = self.archive.state();
                let own = state.archived.get(id).map_or(0, disk_bytes);
                let others: u64 = state
                    .archived
                    .iter()
                    .filter(|(other, _)| *other != id)
                    .map(|(_, e)| disk_bytes(e))
                    .sum();
                (own, others)
            };
            let within_max = self
                .archive
                .config
                .max_bytes
                .saturating_sub(own + COMPLETION_SLACK_BYTES);
            let capacity = above_floor.saturating_add(others).min(within_max);
            if estimate > capacity {
                return Err(capacity);
            }
            if estimate <= above_floor {
                return Ok(above_floor.min(within_max));
            }
            let oldest = self
                .archive
                .state()
                .archived
                .values()
                .filter(|e| e.container.id != *id)
                .min_by(|a, b| {
                    (a.archived_at, &a.container.id).cmp(&(b.archived_at, &b.container.id))
                })
                .map(|e| e.container.id.clone());
            if self.evict_restored_for_space() {
                continue;
            }
            match oldest {
                Some(oldest) if self.drop_entry(&oldest, retention::Reason::MinFree) => {}
                _ => return Ok(above_floor.min(within_max)),
            }
        }
    }

    /// Bytes the archive's filesystem has above the free-space floor (unbounded when unknown).
    fn room_above_floor(&self) -> u64 {
        let space = nofollow::create_dir(&self.archive.config.dir)
            .and_then(|fd| nofollow::space(std::os::fd::AsFd::as_fd(&fd)));
        match space {
            Ok((available, total)) => {
                let floor = (total as u128 * u128::from(self.archive.config.min_free_percent))
                    .div_ceil(100);
                available.saturating_sub(floor as u64)
            }
            Err(e) => {
                tracing::debug!(error = %e, "free space unknown; the floor is not enforced");
                u64::MAX
            }
        }
    }

    fn finalize(&self, meta: &ContainerMeta) -> Result<(), ArchiveError> {
        let id = &meta.id;
        let generations = self.archive.staging.generations(id)?;
        let had_data = !generations.is_empty() || self.archive.state().archived.contains_key(id);
        for generation in generations {
            self.archive_generation(meta, generation)?;
        }
        let lost = self.archive.state().lost.remove(id).unwrap_or_default();
        if had_data && !self.archive.state().archived.contains_key(id) {
            if lost.is_empty() {
                tracing::info!(container_id = %id, "container log dropped by retention before completion");
            } else {
                tracing::warn!(container_id = %id, pod = %format!("{}/{}", meta.namespace, meta.pod), container = %meta.container, exit_code = ?meta.exit_code, "container log not archived: no room for it");
            }
            self.archive.staging.remove(id)?;
            return Ok(());
        }
        let entry = match self.archive.store.complete_with_lost(meta, &lost) {
            Ok(entry) => entry,
            Err(e) if e.is_no_space() => {
                tracing::warn!(container_id = %id, error = %e, "container log not archived: no room for its metadata");
                self.archive.metrics.lost("no_space");
                if let Some(entry) = self.archive.state().archived.remove(id) {
                    let _ = self.archive.store.remove(&entry.container.id);
                }
                self.archive.staging.remove(id)?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(container_id = %id, pod = %format!("{}/{}", meta.namespace, meta.pod), container = %meta.container, raw_bytes = entry.raw_bytes, log_bytes = entry.log_bytes, lost_generations = ?entry.lost_generations, "container log archived");
        self.archive.state().archived.insert(id.clone(), entry);
        self.archive.state().failures.remove(id);
        self.archive.staging.remove(id)?;
        Ok(())
    }

    /// A finalization that failed for another reason than space: its staged data is kept for
    /// the next try (the next start or reconciliation), at most [`MAX_FINALIZE_ATTEMPTS`] times
    /// per run; then it is released and counted as lost.
    fn finalize_failed(&self, id: &ContainerId, error: &ArchiveError) {
        let attempts = {
            let mut state = self.archive.state();
            let attempts = state.failures.entry(id.clone()).or_insert(0);
            *attempts += 1;
            *attempts
        };
        if attempts < MAX_FINALIZE_ATTEMPTS {
            tracing::error!(container_id = %id, attempts, error = %error, "cannot finalize the archive; staged data kept for another try");
            return;
        }
        tracing::error!(container_id = %id, attempts, error = %error, "cannot finalize the archive; giving up and releasing the staged log");
        self.archive.metrics.lost(error.reason());
        self.archive.state().failures.remove(id);
        if let Err(e) = self.archive.staging.remove(id) {
            tracing::warn!(container_id = %id, error = %e, "cannot release a staged log");
        }
    }

    /// The `test-hooks` pause point `stage` (nothing in other builds).
    fn pause(&self, stage: &str) {
        #[cfg(feature = "test-hooks")]
        if self.pause_at.as_deref() == Some(stage) {
            tracing::warn!(stage, "archive worker paused by {}", super::PAUSE_ENV);
            loop {
                std::thread::park();
            }
        }
        #[cfg(not(feature = "test-hooks"))]
        let _ = stage;
    }

    /// Drops the oldest entries until the archive is within its bounds.
    pub(super) fn enforce_retention(&self) {
        let policy = Policy {
            max_bytes: self.archive.config.max_bytes,
            max_age_seconds: self.archive.config.max_age_seconds,
            min_free_percent: f64::from(self.archive.config.min_free_percent),
        };
        loop {
            let candidates: Vec<Candidate> = self
                .archive
                .state()
                .archived
                .values()
                .map(|e| Candidate {
                    id: e.container.id.clone(),
                    bytes: disk_bytes(e),
                    archived_at: e.archived_at,
                })
                .collect();
            let free = nofollow::open_dir(&self.archive.config.dir)
                .and_then(|fd| nofollow::free_percent(std::os::fd::AsFd::as_fd(&fd)))
                .ok();
            let Some((id, reason)) =
                retention::next_drop(&candidates, store::now_nanos(), &policy, free)
            else {
                break;
            };
            if reason == retention::Reason::MinFree && self.evict_restored_for_space() {
                continue;
            }
            if !self.drop_entry(&id, reason) {
                break;
            }
        }
        self.archive.restored.bound(&self.archive.complete_ids());
        self.archive.update_gauges();
    }

    /// Short of space: restored copies go before any archived container (kubelet gets a new
    /// one on demand). False when there were none.
    fn evict_restored_for_space(&self) -> bool {
        let removed = self.archive.restored.evict_all();
        if removed > 0 {
            tracing::info!(dir = %self.archive.restored.root().display(), removed, "short of space: restored copies removed first");
        }
        removed > 0
    }

    /// Drops one archived container (and its restored copy); false when it cannot.
    fn drop_entry(&self, id: &ContainerId, reason: retention::Reason) -> bool {
        if let Err(e) = self.archive.store.remove(id) {
            tracing::error!(container_id = %id, error = %e, "retention cannot drop an archived container");
            return false;
        }
        self.archive.state().archived.remove(id);
        // A copy in use stays until its lease ends; the next cleanup removes it then.
        self.archive.restored.release(id);
        self.archive
            .metrics
            .dropped
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
        tracing::info!(container_id = %id, reason = reason.label(), "archived container dropped");
        true
    }
}

/// Starts the worker thread on `jobs`; it ends when the archive is dropped.
pub(super) fn spawn(archive: Weak<Archive>, jobs: mpsc::Receiver<Job>) -> std::io::Result<()> {
    #[cfg(feature = "test-hooks")]
    let pause_at = std::env::var(super::PAUSE_ENV)
        .ok()
        .filter(|s| !s.is_empty());
    std::thread::Builder::new()
        .name("dockhand-archive".into())
        .spawn(move || {
            run_queue(&archive, &jobs, |archive| Worker {
                archive,
                #[cfg(feature = "test-hooks")]
                pause_at: pause_at.clone(),
            })
        })
        .map(drop)
}

/// The worker's view of the archive: what only the worker thread does (compression, completion,
/// retention).
struct Worker<'a> {
    archive: &'a Archive,
    /// The `test-hooks` pause point.
    #[cfg(feature = "test-hooks")]
    pause_at: Option<String>,
}

/// Retention, run at once (a test's way to see its effect without the thread).
#[cfg(test)]
pub(super) fn enforce_retention(archive: &Archive) {
    Worker {
        archive,
        #[cfg(feature = "test-hooks")]
        pause_at: None,
    }
    .enforce_retention();
}

fn run_queue(
    archive: &Weak<Archive>,
    jobs: &mpsc::Receiver<Job>,
    worker: impl Fn(&Archive) -> Worker<'_>,
) {
    loop {
        let job = match jobs.recv_timeout(RETENTION_INTERVAL) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(archive) = archive.upgrade() else {
            return;
        };
        let worker = worker(&archive);
        if let Some(job) = job {
            worker.run(job);
        }
        worker.enforce_retention();
        archive.progress.send_modify(|n| *n += 1);
    }
}

/// Below this much archived input the running compression ratio is not trusted (logs are then
/// assumed not to compress).
const RATIO_MIN_INPUT: u64 = 1 << 20;
/// Added to a generation's estimate: its frame header and the entry's `meta.json`.
const ESTIMATE_OVERHEAD: u64 = 8192;
/// How often one run tries to finalize a container before it releases the staged log.
const MAX_FINALIZE_ATTEMPTS: u32 = 3;

/// Room kept for the final metadata of an entry still being written (exit code, reason, times).
const COMPLETION_SLACK_BYTES: u64 = 512;

/// Size on disk of one entry: its compressed log and its metadata (as it will be once complete).
pub(super) fn disk_bytes(entry: &Entry) -> u64 {
    let meta = serde_json::to_vec_pretty(entry).map_or(0, |v| v.len() as u64);
    let slack = if entry.complete {
        0
    } else {
        COMPLETION_SLACK_BYTES
    };
    entry.log_bytes + meta + slack
}

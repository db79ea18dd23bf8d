//! The archive's worker thread: runs the queue in order (compress a generation, commit it,
//! drop its staged link; complete a removed container's entry) and keeps the archive within its
//! bounds after every write.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Weak;

use super::metrics::ReasonLabels;
use super::retention::{self, Candidate, Policy};
use super::store::{self, Appended, ContainerMeta, Entry};
use super::{restore, Archive, ArchiveError, Job, RESTORED_TTL, RETENTION_INTERVAL};
use dockhand_host::fs as nofollow;
use dockhand_host::ContainerId;

impl Archive {
    // ---- the worker's jobs --------------------------------------------------------------

    pub(super) fn run(&self, job: Job) {
        match job {
            Job::Rotated { id, below } => {
                let meta = self.current_meta(&id);
                for generation in self.staging.generations(&id).unwrap_or_default() {
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
                    tracing::error!(container_id = %id, error = %e, "cannot finalize the archive; staged data kept for the next start");
                }
                let mut state = self.state();
                state.pending.remove(&id);
                state.staged.remove(&id);
            }
        }
        self.update_gauges();
    }

    /// What is known about a staged container: in memory, else its staging record.
    pub(super) fn current_meta(&self, id: &ContainerId) -> ContainerMeta {
        if let Some(staged) = self.state().staged.get(id) {
            return staged.meta.clone();
        }
        match self.staging.read_record(id) {
            Ok(Some(meta)) => meta,
            Ok(None) => ContainerMeta::unknown(id.clone()),
            Err(e) => {
                tracing::warn!(container_id = %id, error = %e, "staged metadata unreadable");
                ContainerMeta::unknown(id.clone())
            }
        }
    }

    pub(super) fn archive_generation(
        &self,
        meta: &ContainerMeta,
        generation: u32,
    ) -> Result<(), ArchiveError> {
        let id = &meta.id;
        let mut file = self.staging.open_generation(id, generation)?;
        self.pause("before_compress");
        let appended = self.store.append_generation(meta, generation, &mut file)?;
        drop(file);
        if let Appended::Added {
            raw, compressed, ..
        } = &appended
        {
            self.metrics.input_bytes.inc_by(*raw);
            tracing::info!(container_id = %id, generation, raw_bytes = raw, compressed_bytes = compressed, "log generation archived");
        }
        self.state()
            .archived
            .insert(id.clone(), appended.entry().clone());
        // Right away, not after the job: the bound must hold whenever an entry is visible.
        self.enforce_retention();
        self.pause("before_cleanup");
        self.staging.remove_generation(id, generation)?;
        Ok(())
    }

    pub(super) fn finalize(&self, meta: &ContainerMeta) -> Result<(), ArchiveError> {
        let id = &meta.id;
        let generations = self.staging.generations(id)?;
        let had_data = !generations.is_empty() || self.state().archived.contains_key(id);
        for generation in generations {
            self.archive_generation(meta, generation)?;
        }
        if had_data && !self.state().archived.contains_key(id) {
            tracing::info!(container_id = %id, "container log dropped by retention before completion");
            self.staging.remove(id)?;
            return Ok(());
        }
        let entry = self.store.complete(meta)?;
        tracing::info!(container_id = %id, pod = %format!("{}/{}", meta.namespace, meta.pod), container = %meta.container, raw_bytes = entry.raw_bytes, log_bytes = entry.log_bytes, "container log archived");
        self.state().archived.insert(id.clone(), entry);
        self.staging.remove(id)?;
        Ok(())
    }

    /// The `test-hooks` pause point `stage` (nothing in other builds).
    pub(super) fn pause(&self, stage: &str) {
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
            max_bytes: self.config.max_bytes,
            max_age_seconds: self.config.max_age_seconds,
            min_free_percent: f64::from(self.config.min_free_percent),
        };
        loop {
            let candidates: Vec<Candidate> = self
                .state()
                .archived
                .values()
                .map(|e| Candidate {
                    id: e.container.id.clone(),
                    bytes: disk_bytes(e),
                    archived_at: e.archived_at,
                })
                .collect();
            let free = nofollow::open_dir(&self.config.dir)
                .and_then(|fd| nofollow::free_percent(std::os::fd::AsFd::as_fd(&fd)))
                .ok();
            let Some((id, reason)) =
                retention::next_drop(&candidates, store::now_nanos(), &policy, free)
            else {
                break;
            };
            if let Err(e) = self.store.remove(&id) {
                tracing::error!(container_id = %id, error = %e, "retention cannot drop an archived container");
                break;
            }
            restore::remove(&self.config.restored_dir, &id);
            self.state().archived.remove(&id);
            self.metrics
                .dropped
                .get_or_create(&ReasonLabels {
                    reason: reason.label(),
                })
                .inc();
            tracing::info!(container_id = %id, reason = reason.label(), "archived container dropped");
        }
        remove_stale_restored(&self.config.restored_dir);
        self.update_gauges();
    }

    pub(super) fn update_gauges(&self) {
        let state = self.state();
        let bytes: u64 = state.archived.values().map(disk_bytes).sum();
        self.metrics.bytes.set(bytes as i64);
        self.metrics.containers.set(state.archived.len() as i64);
        self.metrics.staged.set(state.staged.len() as i64);
    }
}

pub(super) fn worker(archive: Weak<Archive>, jobs: mpsc::Receiver<Job>) {
    loop {
        let job = match jobs.recv_timeout(RETENTION_INTERVAL) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(archive) = archive.upgrade() else {
            return;
        };
        if let Some(job) = job {
            archive.run(job);
        }
        archive.enforce_retention();
        archive.progress.send_modify(|n| *n += 1);
    }
}

/// Room kept for the final metadata of an entry still being written (exit code, reason, times).
const COMPLETION_SLACK_BYTES: u64 = 512;

/// Size on disk of one entry: its compressed log and its metadata (as it will be once complete).
fn disk_bytes(entry: &Entry) -> u64 {
    let meta = serde_json::to_vec_pretty(entry).map_or(0, |v| v.len() as u64);
    let slack = if entry.complete {
        0
    } else {
        COMPLETION_SLACK_BYTES
    };
    entry.log_bytes + meta + slack
}

fn remove_stale_restored(root: &Path) {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return;
    };
    for dir in dirs.flatten() {
        let file = dir.path().join(restore::RESTORED_FILE);
        let stale = std::fs::symlink_metadata(&file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > RESTORED_TTL);
        if stale {
            let _ = std::fs::remove_file(&file);
        }
    }
}

//! What kubelet sees of an archived container: a CONTAINER_EXITED status built from the
//! archived metadata, and a decompressed copy of its log for kubelet to read.
//!
//! kubelet globs `<log_path>*` and deletes every match when it repeats a removal, so the copy
//! lives alone in a directory of its own, `<restored>/<id>/restored.log`, where the id is a
//! validated name (no glob characters) and the directory is not a kubelet log directory. The
//! copy is re-created whenever it is missing; temporary files never start with `restored.log`.
//!
//! [`Restored`] is the one owner of that directory: every request that serves a copy, the
//! worker's bound and cleanup, and removals go through it, so they never interleave on one id.
//! A copy is *busy* while a request restores or serves it (the cleanup does not touch its
//! directory, temporary file included), then *leased* for `restored_lease_seconds`: the path
//! handed out stays readable until the caller could have opened it, whatever else is archived,
//! served or evicted meanwhile. The bound may be exceeded while leases hold
//! (`dockhand_archive_restored_over_bound_bytes` says by how much).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dockhand_protos::cri::{ContainerMetadata, ContainerState, ContainerStatus, ImageSpec};
use prometheus_client::metrics::gauge::Gauge;

use super::store::{Entry, Store, StoreError};
use dockhand_host::fs as nofollow;
use dockhand_host::ContainerId;

pub const RESTORED_FILE: &str = "restored.log";
/// kubelet's container annotation for a preStop hook; an exited container has no use for it.
pub const PRE_STOP_ANNOTATION: &str = "io.kubernetes.container.preStopHandler";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot write the restored log of container {id} under {path}: {source}")]
    Write {
        id: ContainerId,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where the restored copy of a container's log goes.
pub fn restored_path(root: &Path, id: &ContainerId) -> PathBuf {
    root.join(id.as_str()).join(RESTORED_FILE)
}

/// The restored copies in `restored_dir`, and who is using them.
pub struct Restored {
    root: PathBuf,
    max_bytes: u64,
    lease: Duration,
    /// Copies in use (busy or leased). Held while the directory is walked or a copy removed, so
    /// a request cannot start on an id the cleanup has decided to remove, and the reverse.
    slots: Mutex<HashMap<ContainerId, Slot>>,
    metrics: RestoredMetrics,
}

/// The gauges [`Restored`] keeps, registered with the archive's metrics.
#[derive(Clone, Default)]
pub struct RestoredMetrics {
    /// Size of the restored copies after the last cleanup.
    pub bytes: Gauge,
    /// Bytes over `restored_max_bytes` that leases kept after the last cleanup.
    pub over_bound: Gauge,
    /// Copies leased to callers now.
    pub leased: Gauge,
}

#[derive(Default)]
struct Slot {
    /// Requests restoring or serving this copy now: nothing else touches its directory.
    busy: usize,
    /// The path handed out last stays readable until then.
    leased_until: Option<Instant>,
    /// Removal was asked for while the copy was in use: it goes when its lease ends.
    release: bool,
    /// Serializes the writing of this one copy (parallel first reads write it once).
    write: Arc<Mutex<()>>,
}

impl Slot {
    fn leased(&self, now: Instant) -> bool {
        self.leased_until.is_some_and(|until| until > now)
    }

    fn in_use(&self, now: Instant) -> bool {
        self.busy > 0 || self.leased(now)
    }

    /// When a release waiting on this copy looks again: its lease's end, or soon when it is
    /// busy (its lease starts when its request ends).
    fn retry_at(&self, now: Instant) -> Instant {
        self.leased_until
            .filter(|until| *until > now)
            .unwrap_or(now + RETRY)
    }
}

/// One request's hold on a copy: released when the request is done with it, even on a panic.
struct Busy<'a> {
    restored: &'a Restored,
    id: &'a ContainerId,
    lease: bool,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut slots = self.restored.slots();
        let Some(slot) = slots.get_mut(self.id) else {
            return;
        };
        slot.busy -= 1;
        if self.lease {
            slot.leased_until = Some(now + self.restored.lease);
        }
        if !slot.in_use(now) && !slot.release {
            slots.remove(self.id);
        }
        self.restored.count_leases(&slots, now);
    }
}

impl Restored {
    pub fn new(root: &Path, max_bytes: u64, lease: Duration, metrics: RestoredMetrics) -> Restored {
        Restored {
            root: root.to_path_buf(),
            max_bytes,
            lease,
            slots: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<ContainerId, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_leases(&self, slots: &HashMap<ContainerId, Slot>, now: Instant) {
        let leased = slots.values().filter(|s| s.leased(now)).count();
        self.metrics.leased.set(leased as i64);
    }

    /// Makes sure the copy of `id` exists (decompressing the archive when it does not), leases
    /// its path to the caller and returns it. A new copy may push older ones out of the bound
    /// (never one in use); `archived` are the containers whose copies may stay. Reads and
    /// writes files: call it on a blocking thread.
    pub fn serve(
        &self,
        store: &Store,
        id: &ContainerId,
        archived: &HashSet<ContainerId>,
    ) -> Result<PathBuf, RestoreError> {
        let write = {
            let mut slots = self.slots();
            let slot = slots.entry(id.clone()).or_default();
            slot.busy += 1;
            // Asked for again: wanted again.
            slot.release = false;
            slot.write.clone()
        };
        let mut busy = Busy {
            restored: self,
            id,
            lease: false,
        };
        let made = {
            let _writing = write.lock().unwrap_or_else(|e| e.into_inner());
            ensure(store, &self.root, id)
        };
        busy.lease = made.is_ok();
        drop(busy);
        let (path, created) = made?;
        // Only a new copy can take the copies over their bound: kubelet asks for an archived
        // container again and again, and the walk of every copy is not needed then.
        if created {
            self.bound(archived);
        }
        Ok(path)
    }

    /// Removes the copy of `id` (kubelet removed the container again, or retention dropped it).
    /// A copy in use goes when its lease ends: returns when to call [`Restored::release_again`],
    /// `None` when it is gone.
    pub fn release(&self, id: &ContainerId) -> Option<Instant> {
        let now = Instant::now();
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(id) {
            if slot.in_use(now) {
                slot.release = true;
                return Some(slot.retry_at(now));
            }
            slots.remove(id);
        }
        remove_dir(&self.root, id);
        None
    }

    /// A release that had to wait: the copy goes now unless it is still in use, or was served
    /// again since (wanted again: the release is dropped), or is gone already.
    pub fn release_again(&self, id: &ContainerId) -> Option<Instant> {
        let now = Instant::now();
        let mut slots = self.slots();
        let slot = slots.get_mut(id)?;
        if !slot.release {
            return None;
        }
        if slot.in_use(now) {
            return Some(slot.retry_at(now));
        }
        slots.remove(id);
        remove_dir(&self.root, id);
        None
    }

    /// Keeps the copies within `restored_max_bytes` and removes leftovers (see [`bound_to`]).
    /// Returns how many directories it removed.
    pub fn bound(&self, archived: &HashSet<ContainerId>) -> usize {
        self.bound_to(self.max_bytes, archived)
    }

    /// Short of space: every copy not in use goes.
    pub fn evict_all(&self) -> usize {
        self.bound_to(0, &HashSet::new())
    }

    /// Removes leftovers: directories of containers not in `archived` (dropped, or never
    /// completed) or released, temporary files a crash left, directories whose copy kubelet
    /// deleted, and copies not used for [`RESTORED_TTL`](super::RESTORED_TTL). Then the least
    /// recently used copies go until the total fits `max_bytes`. A copy in use is never
    /// touched: a busy one not at all (its temporary file is being written; its size still
    /// counts toward the total and the gauges), a leased one only for its leftovers. Names that
    /// are not container ids are left alone. Reads and removes files: call it on a blocking
    /// thread.
    fn bound_to(&self, max_bytes: u64, archived: &HashSet<ContainerId>) -> usize {
        let now = Instant::now();
        let mut slots = self.slots();
        let Ok(root_fd) = nofollow::open_dir(&self.root) else {
            slots.retain(|_, slot| slot.in_use(now));
            self.count_leases(&slots, now);
            return 0;
        };
        let mut removed = 0;
        let mut copies = Vec::new();
        for name in nofollow::list(root_fd.as_fd()).unwrap_or_default() {
            let Some(text) = name.to_str() else { continue };
            if text.starts_with(nofollow::TMP_PREFIX) {
                let _ = nofollow::remove_file(root_fd.as_fd(), text);
                continue;
            }
            let Ok(id) = ContainerId::parse(text) else {
                continue;
            };
            let slot = slots.get(&id);
            // A busy copy is only looked at (its size counts), never touched: its temporary
            // file is being written. A leased one is kept, but for its leftovers.
            let busy = slot.is_some_and(|s| s.busy > 0);
            let leased = slot.is_some_and(|s| s.leased(now));
            let Ok(dir) = nofollow::open_subdir(root_fd.as_fd(), &name) else {
                continue;
            };
            for inner in nofollow::list(dir.as_fd()).unwrap_or_default() {
                if let Some(inner) = inner
                    .to_str()
                    .filter(|n| !busy && n.starts_with(nofollow::TMP_PREFIX))
                {
                    let _ = nofollow::remove_file(dir.as_fd(), inner);
                }
            }
            let copy = nofollow::stat(dir.as_fd(), OsStr::new(RESTORED_FILE))
                .ok()
                .filter(nofollow::is_regular);
            drop(dir);
            let Some(copy) = copy else {
                // Nothing left to read (kubelet deleted the copy) or never finished.
                if !busy {
                    remove_dir(&self.root, &id);
                    removed += 1;
                }
                continue;
            };
            let used = std::time::UNIX_EPOCH
                + Duration::new(copy.st_mtime as u64, copy.st_mtime_nsec as u32);
            let stale = used.elapsed().is_ok_and(|age| age > super::RESTORED_TTL);
            let unwanted = !archived.contains(&id) || slot.is_some_and(|s| s.release) || stale;
            let in_use = busy || leased;
            if unwanted && !in_use {
                remove_dir(&self.root, &id);
                removed += 1;
                continue;
            }
            copies.push((used, copy.st_size as u64, id, in_use));
        }
        let mut total: u64 = copies.iter().map(|(_, size, _, _)| size).sum();
        copies.sort();
        for (_, size, id, in_use) in copies {
            if total <= max_bytes {
                break;
            }
            if in_use {
                continue;
            }
            tracing::info!(container_id = %id, bytes = size, "restored copy evicted (archive.restored_max_bytes)");
            remove_dir(&self.root, &id);
            removed += 1;
            total -= size;
        }
        self.metrics.bytes.set(total as i64);
        let over = total.saturating_sub(max_bytes);
        self.metrics.over_bound.set(over as i64);
        if over > 0 && max_bytes == self.max_bytes {
            tracing::debug!(
                bytes = total,
                bound = max_bytes,
                "restored copies over their bound while leased"
            );
        }
        // Released copies whose lease ended were removed above; what is not in use is forgotten.
        slots.retain(|_, slot| slot.in_use(now));
        self.count_leases(&slots, now);
        removed
    }
}

/// How long a release waits at most before it looks again at a copy in use.
const RETRY: Duration = Duration::from_secs(5);

/// Makes sure the restored copy exists (decompressing the archive when it does not) and returns
/// its path, and whether it was written now. Only [`Restored`] calls it, one call per id at a
/// time.
pub(super) fn ensure(
    store: &Store,
    root: &Path,
    id: &ContainerId,
) -> Result<(PathBuf, bool), RestoreError> {
    let path = restored_path(root, id);
    let write_err = |source| RestoreError::Write {
        id: id.clone(),
        path: path.clone(),
        source,
    };
    let root_fd = nofollow::create_dir(root).map_err(write_err)?;
    let dir = nofollow::create_subdir(root_fd.as_fd(), id.as_str()).map_err(write_err)?;
    match nofollow::stat(dir.as_fd(), OsStr::new(RESTORED_FILE)) {
        Ok(stat) if nofollow::is_regular(&stat) => {
            // Used now: the last to be evicted (the bound is least recently used first).
            if let Ok(file) = nofollow::open_file(dir.as_fd(), OsStr::new(RESTORED_FILE)) {
                let _ = file.set_modified(std::time::SystemTime::now());
            }
            return Ok((path, false));
        }
        Ok(_) => {
            // Something else took the name: not ours to follow, but ours to replace.
            nofollow::remove_file(dir.as_fd(), RESTORED_FILE).map_err(write_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let tmp = nofollow::temp_name("copy");
    let mut file = nofollow::open_write(dir.as_fd(), &tmp).map_err(write_err)?;
    let written = (|| {
        let mut out = io::BufWriter::new(&mut file);
        store.read_log(id, &mut out)?;
        out.flush().map_err(|source| StoreError::Write {
            id: id.clone(),
            path: path.clone(),
            source,
        })?;
        Ok::<(), StoreError>(())
    })();
    drop(file);
    if let Err(e) = written {
        let _ = nofollow::remove_file(dir.as_fd(), &tmp);
        return Err(e.into());
    }
    nofollow::rename(dir.as_fd(), &tmp, RESTORED_FILE).map_err(write_err)?;
    Ok((path, true))
}

/// Removes a container's restored copy directory; only [`Restored`] calls it, with its slots
/// held.
fn remove_dir(root: &Path, id: &ContainerId) {
    let dir = root.join(id.as_str());
    // std's remove_dir_all does not follow symlinks inside the tree (it opens each level with
    // O_NOFOLLOW), and `dir` is a validated id under the configured root.
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove a restored log");
        }
    }
}

/// The status kubelet gets for an archived container: what its CRI client requires (id,
/// metadata name, created_at, image, image_ref) plus how it ended.
pub fn exited_status(entry: &Entry, log_path: &Path) -> ContainerStatus {
    let meta = &entry.container;
    let mut annotations: HashMap<String, String> = meta
        .annotations
        .iter()
        .filter(|(k, _)| k.as_str() != PRE_STOP_ANNOTATION)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.shrink_to_fit();
    let or = |value: &str, fallback: &str| {
        if value.is_empty() {
            fallback.to_string()
        } else {
            value.to_string()
        }
    };
    let finished_at = if meta.finished_at != 0 {
        meta.finished_at
    } else {
        entry.archived_at
    };
    ContainerStatus {
        id: meta.id.to_string(),
        metadata: Some(ContainerMetadata {
            name: or(&meta.container, "unknown"),
            attempt: meta.attempt,
        }),
        state: ContainerState::ContainerExited as i32,
        created_at: if meta.created_at != 0 {
            meta.created_at
        } else {
            finished_at
        },
        started_at: meta.started_at,
        finished_at,
        exit_code: meta.exit_code.unwrap_or(0),
        image: Some(ImageSpec {
            image: or(&meta.image, "unknown"),
            ..Default::default()
        }),
        image_ref: or(&meta.image_ref, &or(&meta.image, "unknown")),
        reason: or(
            &meta.reason,
            if meta.exit_code.is_some() {
                ""
            } else {
                "Unknown"
            },
        ),
        message: meta.message.clone(),
        labels: meta
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        annotations,
        mounts: Vec::new(),
        log_path: log_path.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

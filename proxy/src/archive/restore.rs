//! What kubelet sees of an archived container: a CONTAINER_EXITED status built from the
//! archived metadata, and a decompressed copy of its log for kubelet to read.
//!
//! kubelet globs `<log_path>*` and deletes every match when it repeats a removal, so the copy
//! lives alone in a directory of its own, `<restored>/<id>/restored.log`, where the id is a
//! validated name (no glob characters) and the directory is not a kubelet log directory. The
//! copy is re-created whenever it is missing; temporary files never start with `restored.log`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use dockhand_protos::cri::{ContainerMetadata, ContainerState, ContainerStatus, ImageSpec};

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

/// Makes sure the restored copy exists (decompressing the archive when it does not) and returns
/// its path.
pub fn ensure(store: &Store, root: &Path, id: &ContainerId) -> Result<PathBuf, RestoreError> {
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
            return Ok(path);
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
    Ok(path)
}

/// Removes a container's restored copy (when retention drops it from the archive).
pub fn remove(root: &Path, id: &ContainerId) {
    let dir = root.join(id.as_str());
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove a restored log");
        }
    }
}

/// Keeps the restored copies within `max_bytes` and removes leftovers: directories of
/// containers not in `archived` (dropped, or never completed), temporary files a crash left,
/// directories whose copy kubelet deleted, and copies not used for [`RESTORED_TTL`]. Then the
/// least recently used copies go until the total fits, except `keep` (the copy being served;
/// one copy larger than the bound is kept while it is the one in use). Names that are not
/// container ids are left alone. Returns how many directories it removed. Reads and removes
/// files: call it on a blocking thread.
pub fn bound(
    root: &Path,
    max_bytes: u64,
    keep: Option<&ContainerId>,
    archived: &std::collections::HashSet<ContainerId>,
) -> usize {
    let Ok(root_fd) = nofollow::open_dir(root) else {
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
        let Ok(dir) = nofollow::open_subdir(root_fd.as_fd(), &name) else {
            continue;
        };
        for inner in nofollow::list(dir.as_fd()).unwrap_or_default() {
            if let Some(inner) = inner
                .to_str()
                .filter(|n| n.starts_with(nofollow::TMP_PREFIX))
            {
                let _ = nofollow::remove_file(dir.as_fd(), inner);
            }
        }
        let copy = nofollow::stat(dir.as_fd(), OsStr::new(RESTORED_FILE))
            .ok()
            .filter(nofollow::is_regular);
        let in_use = keep == Some(&id);
        let Some(copy) = copy.filter(|_| archived.contains(&id) || in_use) else {
            drop(dir);
            remove(root, &id);
            removed += 1;
            continue;
        };
        let used = std::time::UNIX_EPOCH
            + std::time::Duration::new(copy.st_mtime as u64, copy.st_mtime_nsec as u32);
        let stale = used.elapsed().is_ok_and(|age| age > super::RESTORED_TTL);
        if stale && !in_use {
            drop(dir);
            remove(root, &id);
            removed += 1;
            continue;
        }
        copies.push((used, copy.st_size as u64, id));
    }
    let mut total: u64 = copies.iter().map(|(_, size, _)| size).sum();
    copies.sort();
    for (_, size, id) in copies {
        if total <= max_bytes {
            break;
        }
        if keep == Some(&id) {
            continue;
        }
        tracing::info!(container_id = %id, bytes = size, "restored copy evicted (archive.restored_max_bytes)");
        remove(root, &id);
        removed += 1;
        total -= size;
    }
    removed
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

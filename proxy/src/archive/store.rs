//! The archive proper: one directory per container holding `log.zst` (one zstd frame per log
//! generation, appended in order) and `meta.json` (who the container was, how it ended, which
//! generations are in, and how many bytes of `log.zst` are committed).
//!
//! Appending is crash-safe without a journal: `log.zst` is first cut back to the committed
//! length (dropping a frame a crash left half-written), the frame is appended and fsynced, and
//! only then is the new `meta.json` renamed into place. A generation listed in `meta.json` is
//! never appended again, so replaying a staged generation after a crash cannot duplicate lines.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use dockhand_host::fs::{self as nofollow, TMP_PREFIX};
use dockhand_host::ContainerId;

pub const LOG_FILE: &str = "log.zst";
pub const META_FILE: &str = "meta.json";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open archive directory {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
    #[error("cannot write the archive of container {id} under {path}: {source}")]
    Write {
        id: ContainerId,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot read the archive of container {id} under {path}: {source}")]
    Read {
        id: ContainerId,
        path: PathBuf,
        source: io::Error,
    },
    #[error("archived metadata of container {id} under {path} is invalid: {source}")]
    Meta {
        id: ContainerId,
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("container {id} is not in the archive {path}")]
    NotFound { id: ContainerId, path: PathBuf },
    #[error("no room for the log of container {id} under {path}: {limit} bytes left above the free-space floor and max_bytes")]
    NoSpace {
        id: ContainerId,
        path: PathBuf,
        limit: u64,
    },
}

impl StoreError {
    /// Whether the filesystem (or the archive's own budget) had no room: the write failed
    /// alone, and retrying it cannot succeed.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Write { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

/// ENOSPC, EDQUOT, or a [`Budget`] exhausted.
pub fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

/// What is known about a container, from containerd's ContainerStatus. Times are Unix
/// nanoseconds as CRI gives them; 0 is unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerMeta {
    pub id: ContainerId,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub pod_uid: String,
    #[serde(default)]
    pub container: String,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub image_ref: String,
    /// None until the container's end was seen.
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub started_at: i64,
    #[serde(default)]
    pub finished_at: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The log path containerd reported (kubelet's file, gone by now).
    #[serde(default)]
    pub log_path: String,
    /// containerd-shim-dockhand-v2's cgroup placement record, read when the log was staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<dockhand_host::record::Record>,
}

impl ContainerMeta {
    /// A record with nothing but the id (a container containerd no longer knows).
    pub fn unknown(id: ContainerId) -> ContainerMeta {
        ContainerMeta {
            id,
            namespace: String::new(),
            pod: String::new(),
            pod_uid: String::new(),
            container: String::new(),
            attempt: 0,
            image: String::new(),
            image_ref: String::new(),
            exit_code: None,
            reason: String::new(),
            message: String::new(),
            created_at: 0,
            started_at: 0,
            finished_at: 0,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            log_path: String::new(),
            cgroup: None,
        }
    }
}

/// One archived container: `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub format: u32,
    pub container: ContainerMeta,
    /// Generations in `log.zst`, in order (1 is the first log file, then one per rotation).
    pub generations: Vec<u32>,
    /// Committed length of `log.zst`; anything after it is a crash's leftover.
    pub log_bytes: u64,
    /// Uncompressed size of the committed log.
    pub raw_bytes: u64,
    /// The container is removed and every generation is in.
    pub complete: bool,
    /// Unix nanoseconds of the last write; retention drops the oldest first.
    pub archived_at: i64,
    /// Generations that could not be kept (no room for them): the log has a gap there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_generations: Vec<u32>,
}

/// The result of appending one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The generation was compressed and committed: `raw` bytes in, `compressed` bytes out.
    Added {
        entry: Entry,
        raw: u64,
        compressed: u64,
    },
    /// The generation was already in (a replay after a crash); nothing was written.
    AlreadyThere(Entry),
}

impl Appended {
    pub fn entry(&self) -> &Entry {
        match self {
            Appended::Added { entry, .. } | Appended::AlreadyThere(entry) => entry,
        }
    }
}

/// The archive directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    level: i32,
}

impl Store {
    /// `level` is zstd's compression level (3 is zstd's default).
    pub fn new(root: &Path, level: i32) -> Store {
        Store {
            root: root.to_path_buf(),
            level,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn open_root(&self) -> Result<Option<OwnedFd>, StoreError> {
        match nofollow::open_dir(&self.root) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Root {
                path: self.root.clone(),
                source,
            }),
        }
    }

    fn create_root(&self) -> Result<OwnedFd, StoreError> {
        nofollow::create_dir(&self.root).map_err(|source| StoreError::Root {
            path: self.root.clone(),
            source,
        })
    }

    fn read_err(&self, id: &ContainerId) -> impl FnOnce(io::Error) -> StoreError + '_ {
        let id = id.clone();
        move |source| StoreError::Read {
            path: self.root.join(id.as_str()),
            id,
            source,
        }
    }

    fn write_err(&self, id: &ContainerId) -> impl FnOnce(io::Error) -> StoreError + '_ {
        let id = id.clone();
        move |source| StoreError::Write {
            path: self.root.join(id.as_str()),
            id,
            source,
        }
    }

    fn read_meta(&self, dir: &OwnedFd, id: &ContainerId) -> Result<Option<Entry>, StoreError> {
        let mut file = match nofollow::open_file(dir.as_fd(), OsStr::new(META_FILE)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.read_err(id)(e)),
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(self.read_err(id))?;
        let entry: Entry = serde_json::from_slice(&text).map_err(|source| StoreError::Meta {
            id: id.clone(),
            path: self.root.join(id.as_str()),
            source,
        })?;
        Ok(Some(entry))
    }

    fn write_meta(&self, dir: &OwnedFd, entry: &Entry) -> Result<(), StoreError> {
        let id = &entry.container.id;
        let text = serde_json::to_vec_pretty(entry).map_err(|source| StoreError::Meta {
            id: id.clone(),
            path: self.root.join(id.as_str()),
            source,
        })?;
        nofollow::write_atomic(dir.as_fd(), META_FILE, &text).map_err(self.write_err(id))
    }

    /// The entry of one container, if archived.
    pub fn entry(&self, id: &ContainerId) -> Result<Option<Entry>, StoreError> {
        let Some(root) = self.open_root()? else {
            return Ok(None);
        };
        let dir = match nofollow::open_subdir(root.as_fd(), OsStr::new(id.as_str())) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.read_err(id)(e)),
        };
        self.read_meta(&dir, id)
    }

    /// Every archived container (read-only: for the command line).
    pub fn list(&self) -> Result<Vec<Entry>, StoreError> {
        let Some(root) = self.open_root()? else {
            return Ok(Vec::new());
        };
        let names = nofollow::list(root.as_fd()).map_err(|source| StoreError::Root {
            path: self.root.clone(),
            source,
        })?;
        let mut entries = Vec::new();
        for name in names {
            let Some(id) = name.to_str().and_then(|n| ContainerId::parse(n).ok()) else {
                continue;
            };
            match self.entry(&id) {
                Ok(Some(entry)) if entry.container.id == id => entries.push(entry),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(container_id = %id, error = %e, "skipping unreadable archive entry")
                }
            }
        }
        entries.sort_by(|a, b| {
            (a.archived_at, &a.container.id).cmp(&(b.archived_at, &b.container.id))
        });
        Ok(entries)
    }

    /// Start-up repair after a crash: removes temporary files and half-removed or half-created
    /// entries, cuts every `log.zst` back to its committed length, and returns the entries.
    pub fn recover(&self) -> Result<Vec<Entry>, StoreError> {
        let Some(root) = self.open_root()? else {
            return Ok(Vec::new());
        };
        let names = nofollow::list(root.as_fd()).map_err(|source| StoreError::Root {
            path: self.root.clone(),
            source,
        })?;
        for name in &names {
            let Some(text) = name.to_str() else { continue };
            if text.starts_with(TMP_PREFIX) {
                remove_any(&self.root.join(text));
                continue;
            }
            let Ok(id) = ContainerId::parse(text) else {
                tracing::warn!(path = %self.root.join(name).display(), "ignoring a foreign file in the archive");
                continue;
            };
            let Ok(dir) = nofollow::open_subdir(root.as_fd(), name) else {
                tracing::warn!(path = %self.root.join(name).display(), "ignoring a non-directory in the archive");
                continue;
            };
            for inner in nofollow::list(dir.as_fd()).unwrap_or_default() {
                if inner.to_str().is_some_and(|n| n.starts_with(TMP_PREFIX)) {
                    let _ = nofollow::remove_file(dir.as_fd(), inner.to_str().unwrap_or_default());
                }
            }
            match self.read_meta(&dir, &id) {
                Ok(Some(entry)) => {
                    if let Ok(file) = nofollow::open_write(dir.as_fd(), LOG_FILE) {
                        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                        if len > entry.log_bytes {
                            tracing::info!(container_id = %id, committed = entry.log_bytes, found = len, "cutting an uncommitted frame left by a crash");
                            let _ = file.set_len(entry.log_bytes).and_then(|()| file.sync_all());
                        }
                    }
                }
                Ok(None) => {
                    // Created but nothing committed: the data is still staged and will be redone.
                    drop(dir);
                    self.remove(&id)?;
                }
                Err(e) => {
                    tracing::warn!(container_id = %id, error = %e, "keeping an unreadable archive entry")
                }
            }
        }
        self.list()
    }

    /// Compresses `source` as generation `generation` of `meta.id` and commits it. Idempotent:
    /// a generation already committed is not appended again. This is the archive's hot path
    /// (the benchmark calls it directly; the worker uses [`Store::append_generation_within`]).
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn append_generation(
        &self,
        meta: &ContainerMeta,
        generation: u32,
        source: &mut dyn Read,
    ) -> Result<Appended, StoreError> {
        self.append_generation_within(meta, generation, source, u64::MAX)
    }

    /// [`Store::append_generation`] writing at most `limit` compressed bytes. A write that does
    /// not fit (or meets ENOSPC) is undone at once: `log.zst` is cut back to its committed
    /// length, and an entry that had nothing committed is removed, so a failed write never
    /// holds space.
    pub fn append_generation_within(
        &self,
        meta: &ContainerMeta,
        generation: u32,
        source: &mut dyn Read,
        limit: u64,
    ) -> Result<Appended, StoreError> {
        let id = &meta.id;
        let root = self.create_root()?;
        let dir = nofollow::create_subdir(root.as_fd(), id.as_str()).map_err(self.write_err(id))?;
        let existing = self.read_meta(&dir, id)?;
        if let Some(entry) = &existing {
            if entry.generations.contains(&generation) {
                return Ok(Appended::AlreadyThere(entry.clone()));
            }
        }
        let committed = existing.as_ref().map_or(0, |e| e.log_bytes);
        let mut file = nofollow::open_write(dir.as_fd(), LOG_FILE).map_err(self.write_err(id))?;
        let raw = (|| -> io::Result<u64> {
            file.set_len(committed)?;
            file.seek(SeekFrom::Start(committed))?;
            let mut budget = Budget {
                file: &mut file,
                left: limit,
            };
            let mut encoder = zstd::stream::Encoder::new(&mut budget, self.level)?;
            encoder.include_checksum(true)?;
            let raw = io::copy(source, &mut encoder)?;
            encoder.finish()?.flush()?;
            file.sync_all()?;
            Ok(raw)
        })();
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                // Give the space back now, not at the next start.
                self.undo_append(file, committed, existing.is_none(), id);
                if e.kind() == io::ErrorKind::StorageFull && e.raw_os_error().is_none() {
                    return Err(StoreError::NoSpace {
                        id: id.clone(),
                        path: self.root.join(id.as_str()),
                        limit,
                    });
                }
                return Err(self.write_err(id)(e));
            }
        };
        let log_bytes = file.metadata().map_err(self.write_err(id))?.len();
        let created = existing.is_none();
        let mut entry = existing.unwrap_or_else(|| Entry {
            format: FORMAT,
            container: meta.clone(),
            generations: Vec::new(),
            log_bytes: 0,
            raw_bytes: 0,
            complete: false,
            archived_at: 0,
            lost_generations: Vec::new(),
        });
        entry.container = entry.container.updated_with(meta);
        entry.generations.push(generation);
        entry.log_bytes = log_bytes;
        entry.raw_bytes += raw;
        entry.archived_at = now_nanos();
        if let Err(e) = self.write_meta(&dir, &entry) {
            // The frame is not committed: give its space back now.
            self.undo_append(file, committed, created, id);
            return Err(e);
        }
        Ok(Appended::Added {
            entry,
            raw,
            compressed: log_bytes - committed,
        })
    }

    /// Cuts `log.zst` back to its `committed` length and, for an entry this append `created`,
    /// removes it: a failed append never holds space.
    fn undo_append(&self, file: File, committed: u64, created: bool, id: &ContainerId) {
        let _ = file.set_len(committed).and_then(|()| file.sync_all());
        drop(file);
        if created {
            let _ = self.remove(id);
        }
    }

    /// Marks a container's entry complete with its final metadata (creating an empty entry
    /// when none of its generations could be archived); `lost` are generations that could not
    /// be kept.
    #[cfg(test)]
    pub fn complete(&self, meta: &ContainerMeta) -> Result<Entry, StoreError> {
        self.complete_with_lost(meta, &[])
    }

    pub fn complete_with_lost(
        &self,
        meta: &ContainerMeta,
        lost: &[u32],
    ) -> Result<Entry, StoreError> {
        let id = &meta.id;
        let root = self.create_root()?;
        let dir = nofollow::create_subdir(root.as_fd(), id.as_str()).map_err(self.write_err(id))?;
        let mut entry = match self.read_meta(&dir, id)? {
            Some(entry) => entry,
            None => Entry {
                format: FORMAT,
                container: meta.clone(),
                generations: Vec::new(),
                log_bytes: 0,
                raw_bytes: 0,
                complete: false,
                archived_at: 0,
                lost_generations: Vec::new(),
            },
        };
        entry.container = entry.container.updated_with(meta);
        for generation in lost {
            if !entry.lost_generations.contains(generation) {
                entry.lost_generations.push(*generation);
            }
        }
        entry.complete = true;
        entry.archived_at = now_nanos();
        self.write_meta(&dir, &entry)?;
        Ok(entry)
    }

    /// Decompresses a container's whole log (all generations, oldest first) into `out`.
    pub fn read_log(&self, id: &ContainerId, out: &mut dyn Write) -> Result<u64, StoreError> {
        let not_found = || StoreError::NotFound {
            id: id.clone(),
            path: self.root.clone(),
        };
        let root = self.open_root()?.ok_or_else(not_found)?;
        let dir = match nofollow::open_subdir(root.as_fd(), OsStr::new(id.as_str())) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(self.read_err(id)(e)),
        };
        let entry = self.read_meta(&dir, id)?.ok_or_else(not_found)?;
        if entry.log_bytes == 0 {
            return Ok(0);
        }
        let file =
            nofollow::open_file(dir.as_fd(), OsStr::new(LOG_FILE)).map_err(self.read_err(id))?;
        let mut decoder =
            zstd::stream::Decoder::new(file.take(entry.log_bytes)).map_err(self.read_err(id))?;
        io::copy(&mut decoder, out).map_err(self.read_err(id))
    }

    /// Drops a container from the archive: renamed away first, so a crash never leaves half.
    pub fn remove(&self, id: &ContainerId) -> Result<(), StoreError> {
        let Some(root) = self.open_root()? else {
            return Ok(());
        };
        let trash = nofollow::temp_name(id.as_str());
        match nofollow::rename(root.as_fd(), id.as_str(), &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.write_err(id)(e)),
        }
        nofollow::sync_dir(root.as_fd()).map_err(self.write_err(id))?;
        std::fs::remove_dir_all(self.root.join(&trash)).map_err(self.write_err(id))
    }
}

impl ContainerMeta {
    /// `newer` with the fields it does not know taken from `self` (a later status may come from
    /// a container containerd has already forgotten).
    pub fn updated_with(&self, newer: &ContainerMeta) -> ContainerMeta {
        let older = self;
        let pick = |new: &String, old: &String| {
            if new.is_empty() {
                old.clone()
            } else {
                new.clone()
            }
        };
        let time = |new: i64, old: i64| if new == 0 { old } else { new };
        ContainerMeta {
            id: newer.id.clone(),
            namespace: pick(&newer.namespace, &older.namespace),
            pod: pick(&newer.pod, &older.pod),
            pod_uid: pick(&newer.pod_uid, &older.pod_uid),
            container: pick(&newer.container, &older.container),
            attempt: if newer.container.is_empty() {
                older.attempt
            } else {
                newer.attempt
            },
            image: pick(&newer.image, &older.image),
            image_ref: pick(&newer.image_ref, &older.image_ref),
            exit_code: newer.exit_code.or(older.exit_code),
            reason: pick(&newer.reason, &older.reason),
            message: pick(&newer.message, &older.message),
            created_at: time(newer.created_at, older.created_at),
            started_at: time(newer.started_at, older.started_at),
            finished_at: time(newer.finished_at, older.finished_at),
            labels: if newer.labels.is_empty() {
                older.labels.clone()
            } else {
                newer.labels.clone()
            },
            annotations: if newer.annotations.is_empty() {
                older.annotations.clone()
            } else {
                newer.annotations.clone()
            },
            log_path: pick(&newer.log_path, &older.log_path),
            cgroup: newer.cgroup.clone().or_else(|| older.cgroup.clone()),
        }
    }
}

/// The archive file behind a byte budget: a write past it fails as `StorageFull` (with no OS
/// error code, which is how it is told apart from a real ENOSPC).
struct Budget<'a> {
    file: &'a mut std::fs::File,
    left: u64,
}

impl Write for Budget<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the archive's space budget is used up",
            ));
        }
        let n = self.file.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn remove_any(path: &Path) {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    if let Err(e) = removed {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover temporary file");
    }
}

/// Now, in nanoseconds since the epoch (CRI's and the archive's timestamps).
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

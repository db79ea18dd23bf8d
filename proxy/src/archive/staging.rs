//! Staging: hard links to containers' live log files, in a directory kubelet never touches, so
//! the data outlives kubelet's delete-before-remove. While kubelet still has the file a link
//! costs no space; after kubelet unlinks or gzips it, the link still holds the original inode.
//!
//! Layout: `<staging>/<id>/NNNNNN.log` (one link per log generation, 1 first, a new one per
//! rotation) and `<staging>/<id>/record.json` (the container's metadata as of its start). The
//! directory listing is the state: every generation but the highest is rotated out and waits for
//! compression; the highest is live until the container is removed.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use super::store::ContainerMeta;
use dockhand_host::fs::{self as nofollow, TMP_PREFIX};
use dockhand_host::ContainerId;

pub const RECORD_FILE: &str = "record.json";

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("log path {log_path:?} of container {id} is not inside its pod's log directory {log_directory:?}")]
    OutsideLogDirectory {
        id: ContainerId,
        log_path: String,
        log_directory: String,
    },
    #[error(
        "log directory {log_directory:?} of container {id} is not inside the pod log root {root}"
    )]
    OutsidePodLogs {
        id: ContainerId,
        log_directory: String,
        root: PathBuf,
    },
    #[error("log path {log_path:?} of container {id} is not a regular file reached without symlinks: {source}")]
    Unsafe {
        id: ContainerId,
        log_path: PathBuf,
        source: io::Error,
    },
    #[error("the staging directory {staging} (mount {staging_mount}) cannot hard-link files of {pod_logs} (mount {pod_logs_mount}): hard links cannot cross mounts, even two mounts of one filesystem; put archive.staging_dir on the mount of archive.pod_logs_dir")]
    CrossDevice {
        staging: PathBuf,
        staging_mount: String,
        pod_logs: PathBuf,
        pod_logs_mount: String,
    },
    #[error("cannot check that {path} can hold hard links of pod logs: {source}")]
    LinkProbe { path: PathBuf, source: io::Error },
    #[error("cannot list the staging directory {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("cannot stage the log of container {id} under {path}: {source}")]
    Io {
        id: ContainerId,
        path: PathBuf,
        source: io::Error,
    },
    #[error("staged metadata of container {id} under {path} is invalid: {source}")]
    Record {
        id: ContainerId,
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl StagingError {
    /// The metric label for a log that could not be staged.
    pub fn reason(&self) -> &'static str {
        match self {
            StagingError::OutsideLogDirectory { .. } | StagingError::OutsidePodLogs { .. } => {
                "outside_log_directory"
            }
            StagingError::Unsafe { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                "log_missing"
            }
            StagingError::Unsafe { .. } => "unsafe_path",
            StagingError::CrossDevice { .. } | StagingError::LinkProbe { .. } => "cross_device",
            StagingError::Io { .. } | StagingError::Record { .. } | StagingError::List { .. } => {
                "io_error"
            }
        }
    }
}

/// A container's log file, validated: its components below the pod log root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLocation {
    components: Vec<OsString>,
    path: PathBuf,
}

/// Checks that `log_path` is a file strictly inside `log_directory`, itself inside `root`, with
/// only normal components (no `.`, `..`): nothing is resolved, the check is on the text.
pub fn locate(
    id: &ContainerId,
    root: &Path,
    log_directory: &str,
    log_path: &str,
) -> Result<LogLocation, StagingError> {
    let outside = || StagingError::OutsideLogDirectory {
        id: id.clone(),
        log_path: log_path.into(),
        log_directory: log_directory.into(),
    };
    let directory = normal_components(Path::new(log_directory)).ok_or_else(outside)?;
    let file = normal_components(Path::new(log_path)).ok_or_else(outside)?;
    let root_parts = normal_components(root).ok_or_else(|| StagingError::OutsidePodLogs {
        id: id.clone(),
        log_directory: log_directory.into(),
        root: root.into(),
    })?;
    if file.len() <= directory.len() || !file.starts_with(&directory) {
        return Err(outside());
    }
    if directory.len() <= root_parts.len() || !directory.starts_with(&root_parts) {
        return Err(StagingError::OutsidePodLogs {
            id: id.clone(),
            log_directory: log_directory.into(),
            root: root.into(),
        });
    }
    Ok(LogLocation {
        components: file[root_parts.len()..].to_vec(),
        path: PathBuf::from(log_path),
    })
}

/// The components of an absolute path made only of normal components.
fn normal_components(path: &Path) -> Option<Vec<OsString>> {
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return None;
    }
    components
        .map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            _ => None,
        })
        .collect()
}

/// What linking did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linked {
    /// A new generation was linked.
    New(u32),
    /// The live file is already staged as this generation.
    Already(u32),
}

#[derive(Debug, Clone)]
pub struct Staging {
    root: PathBuf,
    pod_logs: PathBuf,
}

impl Staging {
    pub fn new(root: &Path, pod_logs: &Path) -> Staging {
        Staging {
            root: root.to_path_buf(),
            pod_logs: pod_logs.to_path_buf(),
        }
    }

    pub fn pod_logs(&self) -> &Path {
        &self.pod_logs
    }

    /// Proves that a hard link from the pod log root into staging works: creates a file in
    /// the pod log root, links it into staging and removes both. Equal `st_dev` proves nothing:
    /// two mounts of one filesystem refuse links between them (EXDEV). Creates both directories
    /// when missing (the pod log root with kubelet's mode, 0755).
    pub fn check_links(&self) -> Result<(), StagingError> {
        let setup = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StagingError::LinkProbe { path, source }
        };
        let pod_logs =
            nofollow::create_dir_mode(&self.pod_logs, 0o755).map_err(setup(&self.pod_logs))?;
        let staging = nofollow::create_dir(&self.root).map_err(setup(&self.root))?;
        let probe = nofollow::temp_name("link-probe");
        drop(nofollow::open_write(pod_logs.as_fd(), &probe).map_err(setup(&self.pod_logs))?);
        let linked = nofollow::link(
            pod_logs.as_fd(),
            OsStr::new(&probe),
            staging.as_fd(),
            &probe,
        );
        let _ = nofollow::remove_file(staging.as_fd(), &probe);
        let _ = nofollow::remove_file(pod_logs.as_fd(), &probe);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                Err(StagingError::CrossDevice {
                    staging: self.root.clone(),
                    staging_mount: mount_of(&self.root),
                    pod_logs: self.pod_logs.clone(),
                    pod_logs_mount: mount_of(&self.pod_logs),
                })
            }
            Err(source) => Err(StagingError::LinkProbe {
                path: self.root.clone(),
                source,
            }),
        }
    }

    fn io_err(&self, id: &ContainerId) -> impl FnOnce(io::Error) -> StagingError + '_ {
        let id = id.clone();
        move |source| StagingError::Io {
            path: self.root.join(id.as_str()),
            id,
            source,
        }
    }

    fn open_root(&self) -> io::Result<Option<OwnedFd>> {
        match nofollow::open_dir(&self.root) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open_container(&self, id: &ContainerId) -> io::Result<Option<OwnedFd>> {
        let Some(root) = self.open_root()? else {
            return Ok(None);
        };
        match nofollow::open_subdir(root.as_fd(), OsStr::new(id.as_str())) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create_container(&self, id: &ContainerId) -> io::Result<OwnedFd> {
        let root = nofollow::create_dir(&self.root)?;
        nofollow::create_subdir(root.as_fd(), id.as_str())
    }

    /// Opens the directory holding the log file and checks the file, never following a symlink.
    /// Returns the directory, the file name, and the file's (device, inode).
    fn open_log(
        &self,
        id: &ContainerId,
        location: &LogLocation,
    ) -> Result<(OwnedFd, OsString, (u64, u64)), StagingError> {
        let unsafe_path = |source| StagingError::Unsafe {
            id: id.clone(),
            log_path: location.path.clone(),
            source,
        };
        let (file, dirs) = location
            .components
            .split_last()
            .ok_or_else(|| unsafe_path(io::ErrorKind::InvalidInput.into()))?;
        let mut dir = nofollow::open_dir(&self.pod_logs).map_err(unsafe_path)?;
        for name in dirs {
            dir = nofollow::open_subdir(dir.as_fd(), name).map_err(unsafe_path)?;
        }
        let stat = nofollow::stat(dir.as_fd(), file).map_err(unsafe_path)?;
        if !nofollow::is_regular(&stat) {
            return Err(unsafe_path(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        Ok((dir, file.clone(), (stat.st_dev, stat.st_ino)))
    }

    /// Links the container's live log file as the next generation after the highest staged one
    /// (and after `at_least - 1`), unless the highest already is that file.
    pub fn link(
        &self,
        id: &ContainerId,
        location: &LogLocation,
        at_least: u32,
    ) -> Result<Linked, StagingError> {
        let (log_dir, log_name, inode) = self.open_log(id, location)?;
        let dir = self.create_container(id).map_err(self.io_err(id))?;
        let highest = self.generations(id)?.last().copied();
        if let Some(generation) = highest {
            if let Ok(stat) = nofollow::stat(dir.as_fd(), OsStr::new(&generation_file(generation)))
            {
                if (stat.st_dev, stat.st_ino) == inode {
                    return Ok(Linked::Already(generation));
                }
            }
        }
        let generation = highest.map_or(1, |g| g + 1).max(at_least);
        let tmp = nofollow::temp_name(&generation_file(generation));
        nofollow::link(log_dir.as_fd(), &log_name, dir.as_fd(), &tmp).map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) {
                StagingError::CrossDevice {
                    staging: self.root.clone(),
                    staging_mount: mount_of(&self.root),
                    pod_logs: location.path.clone(),
                    pod_logs_mount: mount_of(&location.path),
                }
            } else {
                self.io_err(id)(e)
            }
        })?;
        // The file may have been swapped between the check and the link: check what we linked.
        let linked = nofollow::stat(dir.as_fd(), OsStr::new(&tmp)).map_err(self.io_err(id))?;
        if !nofollow::is_regular(&linked) || (linked.st_dev, linked.st_ino) != inode {
            let _ = nofollow::remove_file(dir.as_fd(), &tmp);
            return Err(StagingError::Unsafe {
                id: id.clone(),
                log_path: location.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "file changed while linking"),
            });
        }
        nofollow::rename(dir.as_fd(), &tmp, &generation_file(generation))
            .and_then(|()| nofollow::sync_dir(dir.as_fd()))
            .map_err(self.io_err(id))?;
        Ok(Linked::New(generation))
    }

    /// The staged generations of a container, in order.
    pub fn generations(&self, id: &ContainerId) -> Result<Vec<u32>, StagingError> {
        let Some(dir) = self.open_container(id).map_err(self.io_err(id))? else {
            return Ok(Vec::new());
        };
        let mut generations: Vec<u32> = nofollow::list(dir.as_fd())
            .map_err(self.io_err(id))?
            .iter()
            .filter_map(|n| n.to_str().and_then(parse_generation_file))
            .collect();
        generations.sort_unstable();
        Ok(generations)
    }

    /// Opens a staged generation for reading.
    pub fn open_generation(
        &self,
        id: &ContainerId,
        generation: u32,
    ) -> Result<std::fs::File, StagingError> {
        let dir = self
            .open_container(id)
            .map_err(self.io_err(id))?
            .ok_or_else(|| self.io_err(id)(io::ErrorKind::NotFound.into()))?;
        nofollow::open_file(dir.as_fd(), OsStr::new(&generation_file(generation)))
            .map_err(self.io_err(id))
    }

    /// Drops a generation once it is durable in the archive.
    pub fn remove_generation(&self, id: &ContainerId, generation: u32) -> Result<(), StagingError> {
        let Some(dir) = self.open_container(id).map_err(self.io_err(id))? else {
            return Ok(());
        };
        nofollow::remove_file(dir.as_fd(), &generation_file(generation))
            .and_then(|()| nofollow::sync_dir(dir.as_fd()))
            .map_err(self.io_err(id))
    }

    /// [`Staging::write_record`] without fsync: survives a crash of the proxy, not of the node
    /// (the worker's `meta.json` is fsynced). RemoveContainer's path uses it: an fsync there
    /// would wait for the container's whole dirty log to reach the disk.
    pub fn write_record_unsynced(&self, meta: &ContainerMeta) -> Result<(), StagingError> {
        self.put_record(meta, nofollow::write_replace)
    }

    pub fn write_record(&self, meta: &ContainerMeta) -> Result<(), StagingError> {
        self.put_record(meta, nofollow::write_atomic)
    }

    fn put_record(
        &self,
        meta: &ContainerMeta,
        write: fn(BorrowedFd<'_>, &str, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), StagingError> {
        let id = &meta.id;
        let dir = self.create_container(id).map_err(self.io_err(id))?;
        let text = serde_json::to_vec_pretty(meta).map_err(|source| StagingError::Record {
            id: id.clone(),
            path: self.root.join(id.as_str()),
            source,
        })?;
        write(dir.as_fd(), RECORD_FILE, &text).map_err(self.io_err(id))
    }

    pub fn read_record(&self, id: &ContainerId) -> Result<Option<ContainerMeta>, StagingError> {
        use std::io::Read;
        let Some(dir) = self.open_container(id).map_err(self.io_err(id))? else {
            return Ok(None);
        };
        let mut file = match nofollow::open_file(dir.as_fd(), OsStr::new(RECORD_FILE)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err(id)(e)),
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(self.io_err(id))?;
        let meta: ContainerMeta =
            serde_json::from_slice(&text).map_err(|source| StagingError::Record {
                id: id.clone(),
                path: self.root.join(id.as_str()),
                source,
            })?;
        Ok((meta.id == *id).then_some(meta))
    }

    /// Removes a container's staging directory (its generations must be archived already).
    pub fn remove(&self, id: &ContainerId) -> Result<(), StagingError> {
        let Some(root) = self.open_root().map_err(self.io_err(id))? else {
            return Ok(());
        };
        if let Some(dir) = self.open_container(id).map_err(self.io_err(id))? {
            for name in nofollow::list(dir.as_fd()).map_err(self.io_err(id))? {
                if let Some(name) = name.to_str() {
                    nofollow::remove_file(dir.as_fd(), name).map_err(self.io_err(id))?;
                }
            }
        }
        nofollow::remove_dir(root.as_fd(), id.as_str())
            .and_then(|()| nofollow::sync_dir(root.as_fd()))
            .map_err(self.io_err(id))
    }

    /// Removes the temporary files a crash left in `id`'s staging directory (a link made but
    /// not yet renamed into place).
    pub fn remove_leftovers(&self, id: &ContainerId) {
        if let Ok(Some(dir)) = self.open_container(id) {
            for inner in nofollow::list(dir.as_fd()).unwrap_or_default() {
                if let Some(inner) = inner.to_str().filter(|n| n.starts_with(TMP_PREFIX)) {
                    let _ = nofollow::remove_file(dir.as_fd(), inner);
                }
            }
        }
    }

    /// The containers with a staging directory; foreign names are skipped with a warning.
    pub fn ids(&self) -> Result<Vec<ContainerId>, StagingError> {
        let unreadable = |source| StagingError::List {
            path: self.root.clone(),
            source,
        };
        let Some(root) = self.open_root().map_err(unreadable)? else {
            return Ok(Vec::new());
        };
        let mut ids = Vec::new();
        for name in nofollow::list(root.as_fd()).map_err(unreadable)? {
            match name.to_str().map(ContainerId::parse) {
                Some(Ok(id)) => {
                    if let Ok(Some(_)) = self.open_container(&id) {
                        ids.push(id);
                    }
                }
                _ => {
                    tracing::warn!(path = %self.root.join(&name).display(), "ignoring a foreign name in the staging directory")
                }
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// The mount holding `path`, as `/proc/self/mountinfo` shows it: mount point, its root in the
/// filesystem, source and type (for error messages).
fn mount_of(path: &Path) -> String {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    match dockhand_host::mountinfo::MountTable::read() {
        Ok(table) => match table.containing(&resolved) {
            Some(m) => format!(
                "{} (root {} of {} {}, device {}:{})",
                m.mount_point.display(),
                m.root.display(),
                m.fs_type,
                m.source,
                m.device.0,
                m.device.1
            ),
            None => "unknown".into(),
        },
        Err(e) => format!("unknown: {e}"),
    }
}

/// The staging file name of a log generation: `000001.log`.
pub fn generation_file(generation: u32) -> String {
    format!("{generation:06}.log")
}

/// The generation a staging file name stands for, if it is one.
pub fn parse_generation_file(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

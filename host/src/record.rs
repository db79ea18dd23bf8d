//! The cgroup placement record: where a container sits in the cgroup tree, as one JSON file.
//!
//! dockhand's shim writes one record per container to `<dir>/<container id>.json`
//! (default [`DEFAULT_DIR`]) when the task is created, completes it when the task starts and
//! removes it when the task is deleted. The proxy and the `dockhand cgroups` command read the same
//! type. For containers created before the shim was installed, [`crate::cgroup::observe`] builds
//! the same placement from a pid's `/proc/<pid>/cgroup` (such records say [`Source::Proc`]).
//! Files are named by [`ContainerId`] only, opened without following symlinks and written with
//! [`crate::fs::write_atomic`].

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs;
use crate::id::{ContainerId, IdError};

/// The record format version this code writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// Where the shim writes records unless configured otherwise.
pub const DEFAULT_DIR: &str = "/run/dockhand/cgroups";

/// Errors reading or writing records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("{path} is a symlink or not a regular file; refusing to use it")]
    NotRegular { path: PathBuf },
    #[error("{path} is a symlink or not a directory; refusing to use it")]
    NotDirectory { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("decode record {path}: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encode record of {id}: {source}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("record {path} has version {found}, this dockhand reads version {RECORD_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecordError {
    let path = path.to_path_buf();
    move |source| RecordError::Io { op, path, source }
}

/// Who produced a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Written by dockhand's shim at Create/Start.
    Shim,
    /// Derived after the fact from the CRI status pid and `/proc/<pid>/cgroup` (container created
    /// before the shim was installed).
    Proc,
}

/// How far the task has come when the record was last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Created,
    Started,
}

/// The cgroup driver a `cgroupsPath` implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// The Kubernetes QoS class a kubelet cgroup path implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The pod a container belongs to, from the CRI annotations of its bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The resolved absolute cgroup directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "version", rename_all = "lowercase")]
pub enum Placement {
    /// cgroup v1 (and hybrid): one directory per controller hierarchy, keyed by the hierarchy's
    /// controllers as `/proc/<pid>/cgroup` lists them (`memory`, `cpu,cpuacct`, ...).
    V1 {
        controllers: BTreeMap<String, PathBuf>,
    },
    /// cgroup v2: the single directory.
    V2 { path: PathBuf },
}

impl Placement {
    /// Every directory of the placement, keyed as in the record (`""` for v2).
    pub fn dirs(&self) -> Vec<(&str, &Path)> {
        match self {
            Placement::V1 { controllers } => controllers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_path()))
                .collect(),
            Placement::V2 { path } => vec![("", path.as_path())],
        }
    }
}

/// One hierarchy where the process is not where its `cgroupsPath` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mismatch {
    /// Controller list (`""` for v2).
    pub controllers: String,
    /// Path inside the hierarchy that `cgroupsPath` implies (`None`: the hierarchy is unknown).
    pub expected: Option<String>,
    /// Path `/proc/<pid>/cgroup` shows (`None`: the process is not in that hierarchy).
    pub actual: Option<String>,
}

/// The result of checking the expected placement against `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// The pid whose `/proc/<pid>/cgroup` was read.
    pub pid: u32,
    /// True when every hierarchy matches and every directory exists.
    pub matches: bool,
    /// True when the process was gone before it could be checked (a container that exits at
    /// once): neither a match nor a mismatch. `matches` is false and `error` or the fields
    /// below say what was seen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<Mismatch>,
    /// Resolved directories that do not exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<PathBuf>,
    /// Set when `/proc/<pid>/cgroup` could not be read (process gone, permissions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A container's cgroup placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: u32,
    pub source: Source,
    pub state: State,
    pub container_id: String,
    /// `io.kubernetes.cri.sandbox-id` (the pod sandbox's id; equal to `container_id` for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// `io.kubernetes.cri.container-type`: `sandbox` or `container`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// `linux.cgroupsPath` of the runtime spec, as given.
    pub cgroups_path: String,
    pub driver: Driver,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<QosClass>,
    /// The task's init pid (host pid namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Absolute directories the `cgroupsPath` resolves to on this host.
    pub placement: Placement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

// ---------------------------------------------------------------------------------------------
// Files

fn file_name(id: &ContainerId) -> String {
    format!("{id}.json")
}

/// Whether an error from a no-follow open means "a symlink or the wrong kind of file here".
fn is_refusal(e: &std::io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)
    ) || e.kind() == std::io::ErrorKind::InvalidInput
}

/// Opens the records directory; `Ok(None)` when it does not exist.
fn open_dir(dir: &Path) -> Result<Option<std::os::fd::OwnedFd>, RecordError> {
    match fs::open_dir(dir) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if is_refusal(&e) => Err(RecordError::NotDirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(io_err("open", dir)(e)),
    }
}

/// Reads the record of container `id` from `dir`. `Ok(None)` when there is none. Refuses ids that
/// are not container ids and records that are symlinks or not regular files.
pub fn read(dir: &Path, id: &str) -> Result<Option<Record>, RecordError> {
    let id = ContainerId::parse(id)?;
    let Some(dir_fd) = open_dir(dir)? else {
        return Ok(None);
    };
    let name = file_name(&id);
    let path = dir.join(&name);
    let mut file = match fs::open_file(dir_fd.as_fd(), OsStr::new(&name)) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_refusal(&e) => return Err(RecordError::NotRegular { path }),
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(io_err("read", &path))?;
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let decode = |source| RecordError::Decode {
        path: path.clone(),
        source,
    };
    let v: Versioned = serde_json::from_slice(&text).map_err(decode)?;
    if v.version != RECORD_VERSION {
        return Err(RecordError::Version {
            path: path.clone(),
            found: v.version,
        });
    }
    serde_json::from_slice(&text).map(Some).map_err(decode)
}

/// Every record in `dir` (files named `<container id>.json`); unreadable ones are returned as
/// errors next to the good ones.
pub fn list(dir: &Path) -> Result<Vec<Result<Record, RecordError>>, RecordError> {
    let Some(dir_fd) = open_dir(dir)? else {
        return Ok(Vec::new());
    };
    let names = fs::list(dir_fd.as_fd()).map_err(io_err("list", dir))?;
    let mut out = Vec::new();
    for name in names {
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !crate::id::is_container_id(id) {
            continue;
        }
        match read(dir, id) {
            Ok(Some(record)) => out.push(Ok(record)),
            Ok(None) => {}
            Err(e) => out.push(Err(e)),
        }
    }
    Ok(out)
}

/// Writes `record` to `<dir>/<id>.json` atomically ([`fs::write_atomic`], mode 0644), creating
/// `dir` (mode 0755) when missing; refuses a `dir` that is a symlink.
pub fn write(dir: &Path, record: &Record) -> Result<PathBuf, RecordError> {
    let id = ContainerId::parse(&record.container_id)?;
    let dir_fd = match fs::create_dir_mode(dir, 0o755) {
        Ok(fd) => fd,
        Err(e) if is_refusal(&e) || e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(RecordError::NotDirectory {
                path: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("create", dir)(e)),
    };
    let body = serde_json::to_vec_pretty(record).map_err(|source| RecordError::Encode {
        id: id.to_string(),
        source,
    })?;
    let name = file_name(&id);
    let path = dir.join(&name);
    fs::write_atomic_mode(dir_fd.as_fd(), &name, &body, 0o644).map_err(io_err("write", &path))?;
    Ok(path)
}

/// Removes the record of container `id`; a missing record is not an error.
pub fn remove(dir: &Path, id: &str) -> Result<(), RecordError> {
    let id = ContainerId::parse(id)?;
    let Some(dir_fd) = open_dir(dir)? else {
        return Ok(());
    };
    let name = file_name(&id);
    fs::remove_file(dir_fd.as_fd(), &name).map_err(io_err("remove", &dir.join(&name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn sample(id: &str) -> Record {
        Record {
            version: RECORD_VERSION,
            source: Source::Shim,
            state: State::Created,
            container_id: id.to_string(),
            sandbox_id: Some(id.to_string()),
            container_type: Some("sandbox".into()),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "web".into(),
                uid: "u".into(),
            }),
            container_name: None,
            cgroups_path: format!("/kubepods/podu/{id}"),
            driver: Driver::Cgroupfs,
            qos_class: Some(QosClass::Guaranteed),
            pid: Some(1),
            placement: Placement::V2 {
                path: PathBuf::from("/sys/fs/cgroup/kubepods/podu"),
            },
            check: None,
        }
    }

    #[test]
    fn records_round_trip_atomically_and_refuse_bad_ids_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("records");
        let record = sample(ID);
        let path = write(&dir, &record).unwrap();
        assert_eq!(path, dir.join(format!("{ID}.json")));
        assert_eq!(read(&dir, ID).unwrap(), Some(record.clone()));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["placement"]["version"], "v2");
        assert_eq!(json["cgroupsPath"], format!("/kubepods/podu/{ID}"));

        for bad in ["../x", "ABC", &ID[..63], &format!("{}G", &ID[..63])] {
            assert!(matches!(
                read(&dir, bad),
                Err(RecordError::InvalidId { .. })
            ));
            assert!(matches!(
                remove(&dir, bad),
                Err(RecordError::InvalidId { .. })
            ));
        }

        let other = ID.replace('0', "f");
        assert_eq!(read(&dir, &other).unwrap(), None);
        std::os::unix::fs::symlink(&path, dir.join(format!("{other}.json"))).unwrap();
        assert!(matches!(
            read(&dir, &other),
            Err(RecordError::NotRegular { .. })
        ));
        assert_eq!(
            list(&dir).unwrap().len(),
            2,
            "one record, one refused symlink"
        );

        remove(&dir, ID).unwrap();
        remove(&dir, ID).unwrap();
        assert_eq!(read(&dir, ID).unwrap(), None);

        let link_dir = dir.parent().unwrap().join("link");
        std::os::unix::fs::symlink(&dir, &link_dir).unwrap();
        assert!(matches!(
            write(&link_dir, &record),
            Err(RecordError::NotDirectory { .. })
        ));

        fs::write(dir.join(format!("{ID}.json")), br#"{"version": 9}"#).unwrap();
        assert!(matches!(
            read(&dir, ID),
            Err(RecordError::Version { found: 9, .. })
        ));
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }
}

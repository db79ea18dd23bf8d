//! The cgroup placement record: where a container sits in the cgroup tree.
//!
//! dockhand's shim writes one record per container to `<dir>/<container id>.json`
//! (default [`DEFAULT_DIR`]) when the task is created, completes it when the task starts and
//! removes it when the task is deleted. The proxy and the `dockhand cgroups` command read the same
//! type. For containers created before the shim was installed, [`observe`] builds the same
//! placement from a pid's `/proc/<pid>/cgroup` (such records say [`Source::Proc`]).
//!
//! The path rules are containerd's and runc's: a `cgroupsPath` of the form
//! `<slice>:<prefix>:<name>` is the systemd driver (expanded to
//! `/<a>.slice/<a-b>.slice/.../<prefix>-<name>.scope`), anything else is a cgroupfs path taken
//! as-is. On cgroup v1 (hybrid included, as containerd does) the path lies under every controller
//! mount; on v2 under the single `cgroup2` mount.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record format version this code writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// Where the shim writes records unless configured otherwise.
pub const DEFAULT_DIR: &str = "/run/dockhand/cgroups";

/// Errors reading, writing or deriving records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("invalid container id {id:?}: expected 64 lowercase hex digits")]
    InvalidId { id: String },
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
    #[error("record {path} has version {found}, this dockhand reads version {RECORD_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("invalid cgroupsPath {path:?}: {reason}")]
    CgroupsPath { path: String, reason: &'static str },
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
// Path rules

/// The cgroup driver and the path inside each hierarchy that a `cgroupsPath` means.
///
/// systemd (`slice:prefix:name`): runc's expansion, `a-b-c.slice` → `/a.slice/a-b.slice/a-b-c.slice`,
/// the unit `<prefix>-<name>.scope` (or `<name>` itself when it ends in `.slice`); an empty slice
/// is `system.slice`. cgroupfs: the path as given (containerd and kubelet pass absolute paths).
pub fn cgroup_rel_path(cgroups_path: &str) -> Result<(Driver, String), RecordError> {
    let bad = |reason| RecordError::CgroupsPath {
        path: cgroups_path.to_string(),
        reason,
    };
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    match parts.as_slice() {
        [slice, prefix, name] => {
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let mut path = expand_slice(slice).ok_or_else(|| bad("malformed systemd slice"))?;
            if name.is_empty() {
                return Err(bad("empty systemd unit name"));
            }
            let unit = if name.ends_with(".slice") {
                (*name).to_string()
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            if !path.ends_with('/') {
                path.push('/');
            }
            path.push_str(&unit);
            Ok((Driver::Systemd, path))
        }
        [path] => {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            if path.split('/').any(|c| c == "..") {
                return Err(bad("path contains .."));
            }
            let path = if path.starts_with('/') {
                (*path).to_string()
            } else {
                format!("/{path}")
            };
            Ok((Driver::Cgroupfs, path))
        }
        _ => Err(bad("neither a cgroupfs path nor slice:prefix:name")),
    }
}

/// systemd's slice expansion (`ExpandSlice` in runc's systemd driver).
fn expand_slice(slice: &str) -> Option<String> {
    let stem = slice.strip_suffix(".slice")?;
    if stem.contains('/') {
        return None;
    }
    if stem == "-" {
        return Some("/".to_string());
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for component in stem.split('-') {
        if component.is_empty() {
            return None;
        }
        path.push('/');
        path.push_str(&prefix);
        path.push_str(component);
        path.push_str(".slice");
        prefix.push_str(component);
        prefix.push('-');
    }
    Some(path)
}

/// The QoS class kubelet's cgroup layout implies (`kubepods/burstable/pod<uid>`,
/// `kubepods.slice/kubepods-besteffort.slice/...`, guaranteed pods directly under kubepods).
pub fn qos_class(rel_path: &str) -> Option<QosClass> {
    let mut parts = rel_path.split('/').filter(|p| !p.is_empty());
    parts.find(|p| *p == "kubepods" || *p == "kubepods.slice")?;
    let next = parts.next()?;
    match next {
        "burstable" | "kubepods-burstable.slice" => Some(QosClass::Burstable),
        "besteffort" | "kubepods-besteffort.slice" => Some(QosClass::BestEffort),
        p if p.starts_with("pod") || p.starts_with("kubepods-pod") => Some(QosClass::Guaranteed),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The host's cgroup mounts and a process's membership

/// One cgroup v1 hierarchy mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Mount {
    /// Controllers of the hierarchy (`name=systemd` for named hierarchies).
    pub controllers: Vec<String>,
    /// The cgroup mounted (mountinfo's root field; `/` unless a sub-tree is mounted).
    pub root: String,
    pub mount_point: PathBuf,
}

/// The host's cgroup mounts, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    pub v1: Vec<V1Mount>,
    /// The `cgroup2` mount: (root, mount point).
    pub v2: Option<(String, PathBuf)>,
}

impl CgroupMounts {
    /// Parses mountinfo text (`/proc/self/mountinfo`).
    pub fn parse(mountinfo: &str) -> CgroupMounts {
        let mut mounts = CgroupMounts::default();
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 3 {
                continue;
            }
            let root = unescape(pre[3]);
            let mount_point = PathBuf::from(unescape(pre[4]));
            match post[0] {
                "cgroup" => {
                    let controllers = post[2]
                        .split(',')
                        .filter(|o| is_controller_option(o))
                        .map(str::to_string)
                        .collect::<Vec<_>>();
                    if !controllers.is_empty() {
                        mounts.v1.push(V1Mount {
                            controllers,
                            root,
                            mount_point,
                        });
                    }
                }
                "cgroup2" if mounts.v2.is_none() => mounts.v2 = Some((root, mount_point)),
                _ => {}
            }
        }
        mounts
    }

    /// Reads `/proc/self/mountinfo`.
    pub fn read() -> Result<CgroupMounts, RecordError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(io_err("read", path))?;
        Ok(CgroupMounts::parse(&text))
    }

    /// True when containerd would treat the host as cgroup v1 (any v1 controller mounted; hybrid
    /// hosts count as v1).
    pub fn is_v1(&self) -> bool {
        self.v1.iter().any(|m| m.is_resource())
    }

    /// The absolute directories `rel_path` (a path inside each hierarchy) resolves to.
    pub fn expected_placement(&self, rel_path: &str) -> Placement {
        if self.is_v1() {
            let controllers = self
                .v1
                .iter()
                .filter(|m| m.is_resource())
                .map(|m| (m.controllers.join(","), m.dir_of(rel_path)))
                .collect();
            Placement::V1 { controllers }
        } else {
            let path = match &self.v2 {
                Some((root, mount_point)) => join_under(mount_point, root, rel_path),
                None => join_under(Path::new("/sys/fs/cgroup"), "/", rel_path),
            };
            Placement::V2 { path }
        }
    }
}

impl V1Mount {
    /// Resource controllers only; named hierarchies (`name=systemd`) are not managed by runc's
    /// cgroupfs driver.
    fn is_resource(&self) -> bool {
        !self.controllers.iter().any(|c| c.starts_with("name="))
    }

    fn dir_of(&self, rel_path: &str) -> PathBuf {
        join_under(&self.mount_point, &self.root, rel_path)
    }
}

fn is_controller_option(option: &str) -> bool {
    const NOT_CONTROLLERS: &[&str] = &["rw", "ro", "relatime", "noexec", "nosuid", "nodev"];
    if option.starts_with("name=") {
        return true;
    }
    !option.contains('=') && !NOT_CONTROLLERS.contains(&option) && option != "xattr"
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// `mount_point` + (`path` relative to the mounted `root`).
fn join_under(mount_point: &Path, root: &str, path: &str) -> PathBuf {
    let inside = if root == "/" {
        path
    } else {
        path.strip_prefix(root).unwrap_or(path)
    };
    let mut out = mount_point.to_path_buf();
    for component in inside.split('/').filter(|c| !c.is_empty() && *c != ".") {
        out.push(component);
    }
    out
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEntry {
    pub hierarchy: u32,
    /// Empty for the v2 (unified) line.
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parses `/proc/<pid>/cgroup`.
pub fn parse_proc_cgroup(text: &str) -> Vec<ProcEntry> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let hierarchy = it.next()?.parse().ok()?;
            let controllers = it.next()?;
            let path = it.next()?.to_string();
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some(ProcEntry {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// The placement `/proc/<pid>/cgroup` shows, resolved against the mounts.
pub fn actual_placement(mounts: &CgroupMounts, entries: &[ProcEntry]) -> Placement {
    if mounts.is_v1() {
        let controllers = mounts
            .v1
            .iter()
            .filter(|m| m.is_resource())
            .filter_map(|m| {
                let entry = entries
                    .iter()
                    .find(|e| same_set(&e.controllers, &m.controllers))?;
                Some((m.controllers.join(","), m.dir_of(&entry.path)))
            })
            .collect();
        Placement::V1 { controllers }
    } else {
        let path = entries
            .iter()
            .find(|e| e.hierarchy == 0 && e.controllers.is_empty())
            .map(|e| e.path.as_str())
            .unwrap_or("/");
        let path = match &mounts.v2 {
            Some((root, mount_point)) => join_under(mount_point, root, path),
            None => join_under(Path::new("/sys/fs/cgroup"), "/", path),
        };
        Placement::V2 { path }
    }
}

fn same_set(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

/// Compares `expected` with what `/proc/<pid>/cgroup` (already parsed) shows, and checks that every
/// expected directory exists.
pub fn check(
    pid: u32,
    mounts: &CgroupMounts,
    expected: &Placement,
    entries: &[ProcEntry],
) -> Check {
    let actual = actual_placement(mounts, entries);
    let mut mismatches = Vec::new();
    match (expected, &actual) {
        (Placement::V1 { controllers: exp }, Placement::V1 { controllers: act }) => {
            for (key, dir) in exp {
                let got = act.get(key);
                if got != Some(dir) {
                    mismatches.push(Mismatch {
                        controllers: key.clone(),
                        expected: Some(dir.display().to_string()),
                        actual: got.map(|p| p.display().to_string()),
                    });
                }
            }
        }
        (Placement::V2 { path: exp }, Placement::V2 { path: act }) if exp == act => {}
        (exp, act) => mismatches.push(Mismatch {
            controllers: String::new(),
            expected: exp.dirs().first().map(|d| d.1.display().to_string()),
            actual: act.dirs().first().map(|d| d.1.display().to_string()),
        }),
    }
    let missing: Vec<PathBuf> = expected
        .dirs()
        .into_iter()
        .filter(|(_, d)| !d.is_dir())
        .map(|(_, d)| d.to_path_buf())
        .collect();
    Check {
        pid,
        matches: mismatches.is_empty() && missing.is_empty(),
        mismatches,
        missing,
        error: None,
    }
}

/// Reads `<proc_root>/<pid>/cgroup` and checks `expected` against it; a read failure is recorded
/// in the check rather than returned.
pub fn check_pid(proc_root: &Path, pid: u32, mounts: &CgroupMounts, expected: &Placement) -> Check {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    match fs::read_to_string(&path) {
        Ok(text) => check(pid, mounts, expected, &parse_proc_cgroup(&text)),
        Err(e) => Check {
            pid,
            matches: false,
            mismatches: Vec::new(),
            missing: Vec::new(),
            error: Some(format!("read {}: {e}", path.display())),
        },
    }
}

/// The fallback for containers without a shim record: the placement a running pid is in, read
/// from `<proc_root>/<pid>/cgroup`, as a [`Source::Proc`] record. `cgroups_path` (from the CRI
/// verbose status's runtime spec) is recorded and checked when known.
pub fn observe(
    proc_root: &Path,
    mounts: &CgroupMounts,
    container_id: &str,
    pid: u32,
    cgroups_path: Option<&str>,
) -> Result<Record, RecordError> {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
    let entries = parse_proc_cgroup(&text);
    let actual = actual_placement(mounts, &entries);
    let (driver, rel, given) = match cgroups_path.map(cgroup_rel_path) {
        Some(Ok((driver, rel))) => (driver, Some(rel), cgroups_path.unwrap_or_default()),
        _ => (Driver::Cgroupfs, None, ""),
    };
    let check = rel
        .as_deref()
        .map(|rel| check(pid, mounts, &mounts.expected_placement(rel), &entries));
    let qos = rel
        .as_deref()
        .and_then(qos_class)
        .or_else(|| entries.iter().find_map(|e| qos_class(&e.path)));
    Ok(Record {
        version: RECORD_VERSION,
        source: Source::Proc,
        state: State::Started,
        container_id: container_id.to_string(),
        sandbox_id: None,
        container_type: None,
        pod: None,
        container_name: None,
        cgroups_path: given.to_string(),
        driver,
        qos_class: qos,
        pid: Some(pid),
        placement: actual,
        check,
    })
}

// ---------------------------------------------------------------------------------------------
// Files

/// True for what containerd uses as container ids everywhere in CRI: 64 lowercase hex digits.
pub fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn record_path(dir: &Path, id: &str) -> Result<PathBuf, RecordError> {
    if !is_container_id(id) {
        return Err(RecordError::InvalidId { id: id.to_string() });
    }
    Ok(dir.join(format!("{id}.json")))
}

/// Reads the record of container `id` from `dir`. `Ok(None)` when there is none. Refuses ids that
/// are not 64 hex digits and records that are symlinks or not regular files.
pub fn read(dir: &Path, id: &str) -> Result<Option<Record>, RecordError> {
    let path = record_path(dir, id)?;
    read_path(&path)
}

fn read_path(path: &Path) -> Result<Option<Record>, RecordError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    if !meta.file_type().is_file() {
        return Err(RecordError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    // The path may have been swapped for a symlink between the stat and the open: the file we
    // opened must be the one we looked at.
    let opened = file.metadata().map_err(io_err("stat", path))?;
    if opened.dev() != meta.dev() || opened.ino() != meta.ino() || !opened.is_file() {
        return Err(RecordError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(io_err("read", path))?;
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(&text).map_err(|source| RecordError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    if v.version != RECORD_VERSION {
        return Err(RecordError::Version {
            path: path.to_path_buf(),
            found: v.version,
        });
    }
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| RecordError::Decode {
            path: path.to_path_buf(),
            source,
        })
}

/// Every record in `dir` (files named `<64 hex>.json`); unreadable ones are returned as errors
/// next to the good ones.
pub fn list(dir: &Path) -> Result<Vec<Result<Record, RecordError>>, RecordError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !is_container_id(id) {
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

/// Creates `dir` (and parents) if missing; refuses a `dir` that is a symlink.
fn ensure_dir(dir: &Path) -> Result<(), RecordError> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_dir() => Ok(()),
        Ok(_) => Err(RecordError::NotDirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_err("create", dir))
        }
        Err(e) => Err(io_err("stat", dir)(e)),
    }
}

/// Writes `record` to `<dir>/<id>.json` atomically: a temp file in `dir` (created exclusively,
/// never through a symlink), fsync, rename over the old record, fsync the directory.
pub fn write(dir: &Path, record: &Record) -> Result<PathBuf, RecordError> {
    let path = record_path(dir, &record.container_id)?;
    ensure_dir(dir)?;
    let tmp = dir.join(format!(
        ".{}.json.tmp-{}",
        record.container_id,
        std::process::id()
    ));
    let body = serde_json::to_vec_pretty(record).map_err(|source| RecordError::Decode {
        path: path.clone(),
        source,
    })?;
    let result = (|| {
        // create_new: O_CREAT|O_EXCL, which never follows a symlink at the last component.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(&body).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// Removes the record of container `id`; a missing record is not an error.
pub fn remove(dir: &Path, id: &str) -> Result<(), RecordError> {
    let path = record_path(dir, id)?;
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A fresh fixture directory under the system temp dir.
    fn fixture_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dockhand-record-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// mountinfo for a hybrid host (this project's machines) with every hierarchy under `root`.
    fn hybrid_mountinfo(root: &Path) -> String {
        let r = root.display();
        format!(
            "31 23 0:28 / {r} rw,relatime - tmpfs tmpfs rw,mode=755\n\
             32 31 0:29 / {r}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
             35 31 0:32 / {r}/memory rw,relatime - cgroup cgroup rw,memory\n\
             39 31 0:36 / {r}/pids rw,relatime - cgroup cgroup rw,pids\n\
             40 31 0:37 / {r}/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n\
             41 31 0:38 / {r}/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
        )
    }

    #[test]
    fn systemd_paths_expand_like_runc() {
        let uid = "1b4e28ba_2fa1_11d2_883f_0016d3cca427";
        let cases = [
            (
                format!("kubepods-besteffort-pod{uid}.slice:cri-containerd:{ID}"),
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{ID}.scope"),
                Some(QosClass::BestEffort),
            ),
            (
                format!("kubepods-burstable-pod{uid}.slice:cri-containerd:{ID}"),
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{ID}.scope"),
                Some(QosClass::Burstable),
            ),
            (
                format!("kubepods-pod{uid}.slice:cri-containerd:{ID}"),
                format!("/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{ID}.scope"),
                Some(QosClass::Guaranteed),
            ),
            (
                format!(":cri-containerd:{ID}"),
                format!("/system.slice/cri-containerd-{ID}.scope"),
                None,
            ),
            (
                "-.slice::machine.slice".to_string(),
                "/machine.slice".to_string(),
                None,
            ),
        ];
        for (given, want, qos) in cases {
            let (driver, rel) = cgroup_rel_path(&given).unwrap();
            assert_eq!(driver, Driver::Systemd, "{given}");
            assert_eq!(rel, want, "{given}");
            assert_eq!(qos_class(&rel), qos, "{given}");
        }
    }

    #[test]
    fn cgroupfs_paths_are_taken_as_given() {
        let cases = [
            (
                format!("/kubepods/burstable/podabc/{ID}"),
                Some(QosClass::Burstable),
            ),
            (
                format!("/kubepods/besteffort/podabc/{ID}"),
                Some(QosClass::BestEffort),
            ),
            (format!("/kubepods/podabc/{ID}"), Some(QosClass::Guaranteed)),
            (format!("/dockhand-test/{ID}"), None),
        ];
        for (given, qos) in cases {
            let (driver, rel) = cgroup_rel_path(&given).unwrap();
            assert_eq!(driver, Driver::Cgroupfs);
            assert_eq!(rel, given);
            assert_eq!(qos_class(&rel), qos, "{given}");
        }
        assert_eq!(cgroup_rel_path("relative/x").unwrap().1, "/relative/x");
    }

    #[test]
    fn malformed_cgroups_paths_are_refused() {
        for bad in [
            "",
            "a:b",
            "a:b:c:d",
            "kubepods:cri:x",
            "/kubepods/../etc",
            "x.slice:p:",
        ] {
            assert!(cgroup_rel_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn v1_hybrid_fixture_resolves_every_controller_and_checks_proc() {
        let root = fixture_dir("v1");
        let mounts = CgroupMounts::parse(&hybrid_mountinfo(&root));
        assert!(mounts.is_v1());
        let rel = format!("/kubepods/besteffort/podabc/{ID}");
        let expected = mounts.expected_placement(&rel);
        let Placement::V1 { controllers } = &expected else {
            panic!("hybrid host must resolve as v1: {expected:?}");
        };
        let keys: Vec<&str> = controllers.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["cpu,cpuacct", "memory", "pids"],
            "named hierarchies are skipped"
        );
        assert_eq!(controllers["memory"], root.join("memory").join(&rel[1..]));
        for (_, dir) in expected.dirs() {
            fs::create_dir_all(dir).unwrap();
        }
        let proc_text = format!(
            "12:pids:{rel}\n11:name=systemd:/\n10:memory:{rel}\n2:cpuacct,cpu:{rel}\n0::/\n"
        );
        let entries = parse_proc_cgroup(&proc_text);
        let ok = check(7, &mounts, &expected, &entries);
        assert!(ok.matches, "{ok:?}");
        assert_eq!(actual_placement(&mounts, &entries), expected);

        // A process elsewhere in one hierarchy is a recorded mismatch, not hidden.
        let moved = proc_text.replace(&format!("10:memory:{rel}"), "10:memory:/elsewhere");
        let bad = check(7, &mounts, &expected, &parse_proc_cgroup(&moved));
        assert!(!bad.matches);
        assert_eq!(
            bad.mismatches,
            vec![Mismatch {
                controllers: "memory".into(),
                expected: Some(root.join("memory").join(&rel[1..]).display().to_string()),
                actual: Some(root.join("memory/elsewhere").display().to_string()),
            }]
        );

        // A resolved directory that does not exist is reported.
        fs::remove_dir(root.join("pids").join(&rel[1..])).unwrap();
        let gone = check(7, &mounts, &expected, &entries);
        assert!(!gone.matches);
        assert_eq!(gone.missing, vec![root.join("pids").join(&rel[1..])]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_mount_of_a_subtree_is_resolved_relative_to_its_root() {
        let mounts = CgroupMounts::parse(
            "35 31 0:32 /process_api /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        );
        let entries = parse_proc_cgroup("4:memory:/process_api/abc\n");
        assert_eq!(
            actual_placement(&mounts, &entries),
            Placement::V1 {
                controllers: [(
                    "memory".to_string(),
                    PathBuf::from("/sys/fs/cgroup/memory/abc")
                )]
                .into_iter()
                .collect()
            }
        );
    }

    #[test]
    fn v2_fixture_resolves_the_single_directory() {
        let root = fixture_dir("v2");
        let mountinfo = format!(
            "30 23 0:27 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
            root.display()
        );
        let mounts = CgroupMounts::parse(&mountinfo);
        assert!(!mounts.is_v1());
        let (_, rel) = cgroup_rel_path(&format!(
            "kubepods-burstable-podu.slice:cri-containerd:{ID}"
        ))
        .unwrap();
        let expected = mounts.expected_placement(&rel);
        let dir = root.join(&rel[1..]);
        assert_eq!(expected, Placement::V2 { path: dir.clone() });
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(root.join("proc/42")).unwrap();
        fs::write(root.join("proc/42/cgroup"), format!("0::{rel}\n")).unwrap();
        let ok = check_pid(&root.join("proc"), 42, &mounts, &expected);
        assert!(ok.matches, "{ok:?}");
        let gone = check_pid(&root.join("proc"), 43, &mounts, &expected);
        assert!(!gone.matches && gone.error.is_some());

        let observed = observe(&root.join("proc"), &mounts, ID, 42, None).unwrap();
        assert_eq!(observed.source, Source::Proc);
        assert_eq!(observed.placement, expected);
        assert_eq!(observed.qos_class, Some(QosClass::Burstable));
        fs::remove_dir_all(&root).unwrap();
    }

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
        let dir = fixture_dir("files").join("records");
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

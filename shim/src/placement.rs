//! The record's lifecycle, driven by what the forwarder observes:
//!
//! - **Create** (answered OK): read the bundle's `config.json` (CRI annotations,
//!   `linux.cgroupsPath`), resolve the cgroup directories, check them against
//!   `/proc/<pid>/cgroup` of the init pid the delegate returned, write the record (`created`).
//! - **Start** of the init process (answered OK): re-check with the started pid, mark `started`.
//! - **Delete** of the init process (answered OK or NotFound): remove the record.
//! - **Connect**: logged (the delegate's pid), nothing recorded.
//!
//! Recording never changes an answer: failures are logged and the call passes through.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::{
    ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest, StartRequest,
    StartResponse,
};
use containerd_shim_protos::protobuf::rt::WireType;
use containerd_shim_protos::protobuf::{CodedInputStream, Message};
use containerd_shim_protos::ttrpc::{Code, Response};
use dockhand_host::cgroup::{self, CgroupError, CgroupMounts};
use dockhand_host::id::is_container_id;
use dockhand_host::record::{self, PodRef, Record, RecordError, Source, State, RECORD_VERSION};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::forward::Observer;

const ANN_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const ANN_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const ANN_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const ANN_POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const ANN_POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
const ANN_POD_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// Errors recording a placement.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("decode {message} of {method}: {source}")]
    Decode {
        method: &'static str,
        message: &'static str,
        #[source]
        source: containerd_shim_protos::protobuf::Error,
    },
    #[error("{path} is a symlink or not a regular file")]
    NotRegular { path: PathBuf },
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Spec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// The parts of an OCI runtime spec the record needs.
#[derive(Debug, Default, Deserialize)]
struct Spec {
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    linux: Option<SpecLinux>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecLinux {
    #[serde(default)]
    cgroups_path: Option<String>,
}

/// Writes and removes records as the forwarder observes Create, Start and Delete.
pub struct Recorder {
    dir: PathBuf,
    proc_root: PathBuf,
    mounts: CgroupMounts,
}

impl Recorder {
    /// A recorder writing to `dir`, resolving against `mounts` and reading `<proc_root>/<pid>`.
    pub fn new(dir: PathBuf, proc_root: PathBuf, mounts: CgroupMounts) -> Recorder {
        Recorder {
            dir,
            proc_root,
            mounts,
        }
    }

    fn created(&self, request: &[u8], response: &Response) -> Result<(), PlacementError> {
        let req = CreateTaskRequest::parse_from_bytes(request).map_err(|source| {
            PlacementError::Decode {
                method: "Create",
                message: "request",
                source,
            }
        })?;
        let res = CreateTaskResponse::parse_from_bytes(&response.payload).map_err(|source| {
            PlacementError::Decode {
                method: "Create",
                message: "response",
                source,
            }
        })?;
        if !is_container_id(&req.id) {
            debug!(container = %req.id, "not a CRI container id; no record");
            return Ok(());
        }
        let spec_path = Path::new(&req.bundle).join("config.json");
        let spec = read_spec(&spec_path)?;
        let Some(cgroups_path) = spec.linux.and_then(|l| l.cgroups_path) else {
            debug!(container = %req.id, "no linux.cgroupsPath; no record");
            return Ok(());
        };
        let pid = (res.pid != 0).then_some(res.pid);
        let (driver, placement) = match runc_systemd_cgroup(&req) {
            // runc's driver is known: read cgroupsPath as runc will.
            Some(systemd) => {
                let runc_cgroup = pid
                    .and_then(|pid| parent_cgroup(&self.proc_root, pid))
                    .or_else(|| own_cgroup(&self.proc_root))
                    .unwrap_or_default();
                cgroup::placement_for(&cgroups_path, systemd, &self.mounts, &runc_cgroup)?
            }
            // No runc options (another runtime type): the driver is guessed from the path.
            None => {
                let (driver, rel) = cgroup::cgroup_rel_path(&cgroups_path)?;
                (driver, self.mounts.expected_placement(&rel))
            }
        };
        let check =
            pid.map(|pid| cgroup::check_pid(&self.proc_root, pid, &self.mounts, &placement));
        // kubelet's QoS parents read the same under either driver's spelling.
        let qos_class = cgroup::cgroup_rel_path(&cgroups_path)
            .ok()
            .and_then(|(_, rel)| cgroup::qos_class(&rel));
        let a = &spec.annotations;
        let pod = a.get(ANN_POD_NAME).map(|name| PodRef {
            namespace: a.get(ANN_POD_NAMESPACE).cloned().unwrap_or_default(),
            name: name.clone(),
            uid: a.get(ANN_POD_UID).cloned().unwrap_or_default(),
        });
        let record = Record {
            version: RECORD_VERSION,
            source: Source::Shim,
            state: State::Created,
            container_id: req.id.clone(),
            sandbox_id: a.get(ANN_SANDBOX_ID).cloned(),
            container_type: a.get(ANN_CONTAINER_TYPE).cloned(),
            pod,
            container_name: a.get(ANN_CONTAINER_NAME).cloned(),
            cgroups_path,
            driver,
            qos_class,
            pid,
            placement,
            check,
        };
        warn_mismatch(&record);
        let path = record::write(&self.dir, &record)?;
        info!(container = %req.id, path = %path.display(), "record written");
        Ok(())
    }

    fn started(&self, request: &[u8], response: &Response) -> Result<(), PlacementError> {
        let req =
            StartRequest::parse_from_bytes(request).map_err(|source| PlacementError::Decode {
                method: "Start",
                message: "request",
                source,
            })?;
        if !req.exec_id.is_empty() || !is_container_id(&req.id) {
            return Ok(());
        }
        let res = StartResponse::parse_from_bytes(&response.payload).map_err(|source| {
            PlacementError::Decode {
                method: "Start",
                message: "response",
                source,
            }
        })?;
        let Some(mut record) = record::read(&self.dir, &req.id)? else {
            debug!(container = %req.id, "no record to complete");
            return Ok(());
        };
        record.state = State::Started;
        if res.pid != 0 {
            record.pid = Some(res.pid);
        }
        if let Some(pid) = record.pid {
            record.check = Some(cgroup::check_pid(
                &self.proc_root,
                pid,
                &self.mounts,
                &record.placement,
            ));
        }
        warn_mismatch(&record);
        record::write(&self.dir, &record)?;
        info!(container = %req.id, pid = ?record.pid, "record completed");
        Ok(())
    }

    fn deleted(&self, request: &[u8]) -> Result<(), PlacementError> {
        let req =
            DeleteRequest::parse_from_bytes(request).map_err(|source| PlacementError::Decode {
                method: "Delete",
                message: "request",
                source,
            })?;
        if !req.exec_id.is_empty() || !is_container_id(&req.id) {
            return Ok(());
        }
        record::remove(&self.dir, &req.id)?;
        info!(container = %req.id, "record removed");
        Ok(())
    }

    /// Removes the record of `id` (the `delete` action, after a shim died).
    pub fn remove(&self, id: &str) -> Result<(), PlacementError> {
        if is_container_id(id) {
            record::remove(&self.dir, id)?;
        }
        Ok(())
    }
}

fn warn_mismatch(record: &Record) {
    if let Some(check) = record.check.as_ref().filter(|c| c.unverified) {
        info!(
            container = %record.container_id,
            pid = check.pid,
            "the container's process exited before its cgroup placement could be checked; recorded as unverified"
        );
        return;
    }
    if let Some(check) = record.check.as_ref().filter(|c| !c.matches) {
        warn!(
            container = %record.container_id,
            mismatches = ?check.mismatches,
            missing = ?check.missing,
            error = ?check.error,
            "cgroup placement does not match /proc/<pid>/cgroup; recorded"
        );
    }
}

/// runc's `SystemdCgroup` option from the task's options (`containerd.runc.v1.Options`, field 9
/// `systemd_cgroup`; absent means false), or `None` when the options are not runc's. Decoded by
/// field number: the message is not among containerd-shim-protos' types.
fn runc_systemd_cgroup(req: &CreateTaskRequest) -> Option<bool> {
    const SYSTEMD_CGROUP: u32 = 9;
    let options = req.options.as_ref()?;
    if !options.type_url.ends_with("containerd.runc.v1.Options") {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&options.value);
    let mut systemd = false;
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire_type) = (tag >> 3, WireType::new(tag & 7)?);
        if field == SYSTEMD_CGROUP && wire_type == WireType::Varint {
            systemd = input.read_bool().ok()?;
        } else if input.skip_field(wire_type).is_err() {
            return None;
        }
    }
    Some(systemd)
}

/// `/proc/<ppid>/cgroup` of the container's init: at Create its parent is the stock shim (runc
/// has exited and the shim, a subreaper, adopted it), whose cgroup is the one runc ran in.
fn parent_cgroup(proc_root: &Path, pid: u32) -> Option<Vec<cgroup::ProcEntry>> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|&ppid| ppid > 1)?;
    let text = std::fs::read_to_string(proc_root.join(ppid.to_string()).join("cgroup")).ok()?;
    Some(cgroup::parse_proc_cgroup(&text))
}

/// This shim's own cgroup (the stock shim's too, unless runc's `ShimCgroup` moved it).
fn own_cgroup(proc_root: &Path) -> Option<Vec<cgroup::ProcEntry>> {
    let text = std::fs::read_to_string(proc_root.join("self/cgroup")).ok()?;
    Some(cgroup::parse_proc_cgroup(&text))
}

/// Reads the bundle's `config.json`, refusing a symlink.
fn read_spec(path: &Path) -> Result<Spec, PlacementError> {
    let read_err = |source| PlacementError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(PlacementError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mut text = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut text))
        .map_err(read_err)?;
    serde_json::from_slice(&text).map_err(|source| PlacementError::Spec {
        path: path.to_path_buf(),
        source,
    })
}

impl Observer for Recorder {
    fn observe(&self, method: &str, request: &[u8], response: &Response) {
        let code = response
            .status
            .as_ref()
            .map(|s| s.code())
            .unwrap_or(Code::OK);
        let result = match (method, code) {
            ("Create", Code::OK) => self.created(request, response),
            ("Start", Code::OK) => self.started(request, response),
            ("Delete", Code::OK | Code::NOT_FOUND) => self.deleted(request),
            ("Connect", Code::OK) => {
                if let Ok(res) = ConnectResponse::parse_from_bytes(&response.payload) {
                    debug!(
                        delegate_pid = res.shim_pid,
                        task_pid = res.task_pid,
                        "connect"
                    );
                }
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!(method, error = %e, "cannot record cgroup placement");
        }
    }
}

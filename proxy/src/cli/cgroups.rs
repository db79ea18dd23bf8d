//! `dockhand cgroups`: pod → container → cgroup directories, the answer Docker users got from
//! `docker inspect` (`HostConfig.CgroupParent`).
//!
//! For each container CRI lists, the record dockhand's shim wrote (`/run/dockhand/cgroups/<id>.json`)
//! is shown as is. A running container without one (created before the shim was installed) is
//! placed from CRI's verbose status (init pid, `linux.cgroupsPath`) and `/proc/<pid>/cgroup`, and
//! marked `proc`. With `--usage`, the memory in use and the number of pids come from the cgroup
//! files themselves (v1: `memory.usage_in_bytes`, `pids.current`; v2: `memory.current`,
//! `pids.current`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dockhand_host::cgroup::{self, CgroupError, CgroupMounts};
use dockhand_host::record::{self, Placement, Record, RecordError, Source};
use dockhand_protos::cri::{
    ContainerState, ContainerStatusRequest, ListContainersRequest, ListPodSandboxRequest,
};
use serde::Serialize;

/// Arguments of `dockhand cgroups`.
#[derive(Debug, Clone, clap::Args)]
pub struct CgroupsArgs {
    /// CRI socket to ask: dockhand's or containerd's.
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    pub socket: PathBuf,
    /// Where dockhand's shim writes its records.
    #[arg(long, default_value = record::DEFAULT_DIR)]
    pub records: PathBuf,
    /// Only pods in this Kubernetes namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only this pod (name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Add current memory usage and pid count, read from the cgroup files.
    #[arg(long)]
    pub usage: bool,
    /// procfs mount (for tests).
    #[arg(long, default_value = "/proc", hide = true)]
    pub proc_root: PathBuf,
}

/// Errors of `dockhand cgroups`.
#[derive(Debug, thiserror::Error)]
pub enum CgroupsError {
    #[error(transparent)]
    Connect(#[from] super::cri_client::ConnectError),
    #[error("CRI {call}: {status}")]
    Cri {
        call: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Current usage read from the cgroup files; `None` where a file is missing or unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// One line of the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub container_id: String,
    /// CRI state: `running`, `exited`, `created`, `unknown`.
    pub state: String,
    /// The shim's record, or one derived from `/proc` (`record.source == "proc"`); `None` when
    /// neither exists (a stopped container created before the shim).
    pub record: Option<Record>,
    /// Why there is no record, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Runs the command: collects the entries and prints them.
pub async fn run(args: CgroupsArgs) -> anyhow::Result<()> {
    let entries = collect(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        print!("{}", render(&entries, args.usage));
    }
    Ok(())
}

/// Asks CRI for the containers and places each one (record, else `/proc`).
pub async fn collect(args: &CgroupsArgs) -> Result<Vec<Entry>, CgroupsError> {
    let mut cri = super::cri_client::connect(&args.socket).await?;
    let pods = cri
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .map_err(|status| CgroupsError::Cri {
            call: "ListPodSandbox",
            status,
        })?
        .into_inner()
        .items;
    let pods: HashMap<String, (String, String)> = pods
        .into_iter()
        .filter_map(|p| {
            let m = p.metadata?;
            Some((p.id, (m.namespace, m.name)))
        })
        .collect();
    let containers = cri
        .list_containers(ListContainersRequest { filter: None })
        .await
        .map_err(|status| CgroupsError::Cri {
            call: "ListContainers",
            status,
        })?
        .into_inner()
        .containers;
    let mounts = CgroupMounts::read()?;
    let mut entries = Vec::new();
    for c in containers {
        let (namespace, pod) = pods.get(&c.pod_sandbox_id).cloned().unwrap_or_default();
        if args.namespace.as_ref().is_some_and(|n| *n != namespace)
            || args.pod.as_ref().is_some_and(|p| *p != pod)
        {
            continue;
        }
        let running = c.state == ContainerState::ContainerRunning as i32;
        let (record, problem) = match record::read(&args.records, &c.id) {
            Ok(Some(record)) => (Some(record), None),
            Ok(None) if running => {
                let status = cri
                    .container_status(ContainerStatusRequest {
                        container_id: c.id.clone(),
                        verbose: true,
                    })
                    .await
                    .map(|r| r.into_inner().info);
                match status {
                    Ok(info) => from_proc(&args.proc_root, &mounts, &c.id, &info),
                    Err(status) => (None, Some(format!("ContainerStatus: {}", status.message()))),
                }
            }
            Ok(None) => (None, Some("no record, and not running".into())),
            Err(e) => (None, Some(e.to_string())),
        };
        let usage = args
            .usage
            .then(|| record.as_ref().map(|r| usage(&r.placement)))
            .flatten();
        entries.push(Entry {
            namespace,
            pod,
            container: c.metadata.map(|m| m.name).unwrap_or_default(),
            container_id: c.id,
            state: state_name(c.state).into(),
            record,
            problem,
            usage,
        });
    }
    entries.sort_by(|a, b| {
        (&a.namespace, &a.pod, &a.container).cmp(&(&b.namespace, &b.pod, &b.container))
    });
    Ok(entries)
}

/// The fallback: a [`Source::Proc`] record from CRI's verbose info (`info["info"]`: `pid`,
/// `runtimeSpec.linux.cgroupsPath`) and `/proc/<pid>/cgroup`.
pub fn from_proc(
    proc_root: &Path,
    mounts: &CgroupMounts,
    id: &str,
    info: &HashMap<String, String>,
) -> (Option<Record>, Option<String>) {
    let Some(info) = info.get("info") else {
        return (None, Some("no verbose info from CRI".into()));
    };
    let Ok(info) = serde_json::from_str::<serde_json::Value>(info) else {
        return (None, Some("verbose info is not JSON".into()));
    };
    let Some(pid) = info["pid"].as_u64().filter(|&p| p > 0) else {
        return (None, Some("no pid in verbose info".into()));
    };
    let cgroups_path = info["runtimeSpec"]["linux"]["cgroupsPath"].as_str();
    match cgroup::observe(proc_root, mounts, id, pid as u32, cgroups_path) {
        Ok(record) => (Some(record), None),
        Err(e) => (None, Some(e.to_string())),
    }
}

fn state_name(state: i32) -> &'static str {
    match ContainerState::try_from(state) {
        Ok(ContainerState::ContainerCreated) => "created",
        Ok(ContainerState::ContainerRunning) => "running",
        Ok(ContainerState::ContainerExited) => "exited",
        _ => "unknown",
    }
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Memory in use and pid count from the placement's cgroup files.
pub fn usage(placement: &Placement) -> Usage {
    match placement {
        Placement::V1 { controllers } => {
            let dir = |name: &str| {
                controllers
                    .iter()
                    .find(|(k, _)| k.split(',').any(|c| c == name))
                    .map(|(_, d)| d.clone())
            };
            Usage {
                memory_bytes: dir("memory")
                    .and_then(|d| read_number(&d.join("memory.usage_in_bytes"))),
                pids: dir("pids").and_then(|d| read_number(&d.join("pids.current"))),
            }
        }
        Placement::V2 { path } => Usage {
            memory_bytes: read_number(&path.join("memory.current")),
            pids: read_number(&path.join("pids.current")),
        },
    }
}

/// The directory shown in the table: v2's only one, or v1's memory hierarchy (the others differ
/// only in the controller's mount point).
fn shown_dir(placement: &Placement) -> String {
    match placement {
        Placement::V2 { path } => path.display().to_string(),
        Placement::V1 { controllers } => controllers
            .iter()
            .find(|(k, _)| k.split(',').any(|c| c == "memory"))
            .or_else(|| controllers.iter().next())
            .map(|(_, d)| d.display().to_string())
            .unwrap_or_default(),
    }
}

/// The table: one row per container.
pub fn render(entries: &[Entry], with_usage: bool) -> String {
    let mut rows = vec![[
        "NAMESPACE",
        "POD",
        "CONTAINER",
        "ID",
        "STATE",
        "SOURCE",
        "CGROUP",
        "MEMORY",
        "PIDS",
    ]
    .map(String::from)];
    for e in entries {
        let (source, cgroup) = match &e.record {
            Some(r) => {
                let source = match r.source {
                    Source::Shim => "shim",
                    Source::Proc => "proc",
                };
                let mut cgroup = shown_dir(&r.placement);
                match &r.check {
                    Some(c) if c.unverified => cgroup.push_str(" (unverified: exited)"),
                    Some(c) if !c.matches => cgroup.push_str(" (MISMATCH)"),
                    _ => {}
                }
                (source.to_string(), cgroup)
            }
            None => ("-".into(), e.problem.clone().unwrap_or_default()),
        };
        let number = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        let (memory, pids) = match &e.usage {
            Some(u) => (number(u.memory_bytes), number(u.pids)),
            None => ("-".into(), "-".into()),
        };
        rows.push([
            e.namespace.clone(),
            e.pod.clone(),
            e.container.clone(),
            e.container_id.chars().take(13).collect(),
            e.state.clone(),
            source,
            cgroup,
            memory,
            pids,
        ]);
    }
    if !with_usage {
        let trimmed: Vec<[String; 7]> = rows
            .into_iter()
            .map(|r| {
                let [a, b, c, d, e, f, g, _, _] = r;
                [a, b, c, d, e, f, g]
            })
            .collect();
        return super::table::render(&trimmed);
    }
    super::table::render(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dockhand_host::record::{Driver, State, RECORD_VERSION};

    const ID: &str = "aa34567890abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn usage_reads_v1_and_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("memory/kubepods/x");
        let pids = dir.path().join("pids/kubepods/x");
        write(&memory.join("memory.usage_in_bytes"), "4096\n");
        write(&pids.join("pids.current"), "3\n");
        let v1 = Placement::V1 {
            controllers: [("memory".to_string(), memory), ("pids".to_string(), pids)]
                .into_iter()
                .collect(),
        };
        assert_eq!(
            usage(&v1),
            Usage {
                memory_bytes: Some(4096),
                pids: Some(3)
            }
        );

        let v2dir = dir.path().join("unified/kubepods/x");
        write(&v2dir.join("memory.current"), "8192\n");
        let v2 = Placement::V2 { path: v2dir };
        assert_eq!(
            usage(&v2),
            Usage {
                memory_bytes: Some(8192),
                pids: None
            }
        );
    }

    #[test]
    fn proc_fallback_is_marked_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cg");
        let mounts = CgroupMounts::parse(&format!(
            "30 23 0:27 / {} rw - cgroup2 cgroup2 rw\n",
            root.display()
        ));
        let rel = format!("/kubepods/burstable/podu/{ID}");
        write(&dir.path().join("proc/99/cgroup"), &format!("0::{rel}\n"));
        std::fs::create_dir_all(root.join(&rel[1..])).unwrap();
        let info = serde_json::json!({"pid": 99, "runtimeSpec": {"linux": {"cgroupsPath": rel}}});
        let info = HashMap::from([("info".to_string(), info.to_string())]);
        let (record, problem) = from_proc(&dir.path().join("proc"), &mounts, ID, &info);
        assert_eq!(problem, None);
        let record = record.unwrap();
        assert_eq!(record.source, Source::Proc);
        assert_eq!(record.pid, Some(99));
        assert_eq!(
            record.placement,
            Placement::V2 {
                path: root.join(&rel[1..])
            }
        );
        assert!(record.check.unwrap().matches);

        let (none, problem) = from_proc(&dir.path().join("proc"), &mounts, ID, &HashMap::new());
        assert!(none.is_none() && problem.is_some());
    }

    #[test]
    fn table_marks_source_and_mismatch() {
        let record = Record {
            version: RECORD_VERSION,
            source: Source::Proc,
            state: State::Started,
            container_id: ID.into(),
            sandbox_id: None,
            container_type: None,
            pod: None,
            container_name: None,
            cgroups_path: String::new(),
            driver: Driver::Cgroupfs,
            qos_class: None,
            pid: Some(1),
            placement: Placement::V2 {
                path: "/sys/fs/cgroup/kubepods/x".into(),
            },
            check: Some(record::Check {
                pid: 1,
                matches: false,
                unverified: false,
                mismatches: Vec::new(),
                missing: vec!["/sys/fs/cgroup/kubepods/x".into()],
                error: None,
            }),
        };
        let entry = Entry {
            namespace: "shop".into(),
            pod: "web".into(),
            container: "app".into(),
            container_id: ID.into(),
            state: "running".into(),
            record: Some(record),
            problem: None,
            usage: Some(Usage {
                memory_bytes: Some(10),
                pids: Some(2),
            }),
        };
        let table = render(std::slice::from_ref(&entry), true);
        let row = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "shop",
                "web",
                "app",
                "aa34567890abc",
                "running",
                "proc",
                "/sys/fs/cgroup/kubepods/x",
                "(MISMATCH)",
                "10",
                "2"
            ]
        );
        let narrow = render(&[entry], false);
        assert!(!narrow.contains("MEMORY"));
    }
}

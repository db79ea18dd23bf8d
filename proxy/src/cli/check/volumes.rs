//! `dockhand check volumes`: is every volume a running pod uses still there, answering, writable
//! and not full?
//!
//! - **Bind mounts of running containers.** A container's bind mount is fixed when it starts; if
//!   the host later unmounts the source (or the disk goes), the container keeps the old
//!   filesystem while the host path shows another one. For each CRI mount, the container's entry
//!   in `/proc/<pid>/mountinfo` (device, root) must still be what the host's table gives for the
//!   resolved host path: the containing mount's device, and its root joined with the rest of the
//!   path. A root ending in `//deleted` (the source directory was removed) or a host mount point
//!   ending in ` (deleted)` (`\040(deleted)` in the file) is a removed mount.
//! - **kubelet's volume directories.** `<kubelet_dir>/pods/<uid>/volumes/<plugin>/<name>` (CSI:
//!   `.../<name>/mount`) of pods with a ready sandbox must be mount points for the plugins that
//!   mount (CSI, NFS, secret, projected, iSCSI, ...); emptyDir, configMap and downwardAPI
//!   directories need not be. Directories are listed without following symlinks or `stat`ing
//!   a volume.
//! - **statfs of each volume**, in the `probe` child: ENOTCONN, ESTALE, EIO, EACCES,
//!   EHOSTDOWN, ENODEV, EROFS and ENOENT are problems, no answer by the deadline is unknown;
//!   used space above `usage_percent` is a problem, and so is a read-only filesystem under a
//!   mount the pod asked to be writable.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use dockhand_protos::cri::{ListPodSandboxRequest, PodSandboxState};
use serde::Serialize;
use tokio::time::Instant;

use super::probe::{self, Answer};
use super::{running_containers, Finding, Report, Running, Settings, What};
use dockhand_host::mountinfo::{MountEntry, MountTable};

/// kubelet plugin directories whose volumes are mount points while the pod runs.
const MOUNTED_PLUGINS: [&str; 17] = [
    "kubernetes.io~csi",
    "kubernetes.io~nfs",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~iscsi",
    "kubernetes.io~fc",
    "kubernetes.io~rbd",
    "kubernetes.io~cephfs",
    "kubernetes.io~glusterfs",
    "kubernetes.io~local-volume",
    "kubernetes.io~azure-file",
    "kubernetes.io~azure-disk",
    "kubernetes.io~aws-ebs",
    "kubernetes.io~gce-pd",
    "kubernetes.io~vsphere-volume",
    "kubernetes.io~cinder",
    "kubernetes.io~portworx-volume",
];

/// errnos that mean the volume is broken (rather than that the check could not tell).
const PROBLEM_ERRNOS: [(i32, &str); 8] = [
    (libc::ENOTCONN, "ENOTCONN"),
    (libc::ESTALE, "ESTALE"),
    (libc::EIO, "EIO"),
    (libc::EACCES, "EACCES"),
    (libc::EHOSTDOWN, "EHOSTDOWN"),
    (libc::ENODEV, "ENODEV"),
    (libc::EROFS, "EROFS"),
    (libc::ENOENT, "ENOENT"),
];

/// A kubelet volume directory of a pod with a ready sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletVolume {
    /// `namespace/pod`, or the uid when no sandbox names it.
    pub pod: String,
    /// `csi/pvc-1234` (the plugin directory without `kubernetes.io~`).
    pub volume: String,
    /// The directory that should be a mount point.
    pub path: PathBuf,
}

/// The volume directories under `<kubelet_dir>/pods/<uid>/volumes` of the pods in `pods`
/// (uid → `namespace/pod`), for plugins that mount. Nothing is `stat`ed and no symlink followed:
/// only directories are listed, with the entry types `readdir` gives.
pub fn kubelet_volumes(kubelet_dir: &Path, pods: &HashMap<String, String>) -> Vec<KubeletVolume> {
    let mut found = Vec::new();
    for (uid, pod) in pods {
        // A uid names a directory: it must be one plain component.
        if !is_plain_name(uid) {
            continue;
        }
        let volumes = kubelet_dir.join("pods").join(uid).join("volumes");
        for plugin in subdirectories(&volumes) {
            let Some(plugin_name) = plugin.to_str() else {
                continue;
            };
            if !MOUNTED_PLUGINS.contains(&plugin_name) {
                continue;
            }
            for name in subdirectories(&volumes.join(&plugin)) {
                let mut path = volumes.join(&plugin).join(&name);
                if plugin_name == "kubernetes.io~csi" {
                    // CSI's mount point is `mount` inside; `vol_data.json` sits next to it.
                    if !subdirectories(&path).iter().any(|n| n == "mount") {
                        continue;
                    }
                    path.push("mount");
                }
                found.push(KubeletVolume {
                    pod: pod.clone(),
                    volume: format!(
                        "{}/{}",
                        plugin_name.trim_start_matches("kubernetes.io~"),
                        name.to_string_lossy()
                    ),
                    path,
                });
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && matches!(
            Path::new(name).components().collect::<Vec<_>>().as_slice(),
            [Component::Normal(_)]
        )
}

/// Names of the directories in `dir`; symlinks and anything `readdir` does not type as a
/// directory are skipped (no `stat`: an entry may be the mount point of a dead filesystem).
fn subdirectories(dir: &Path) -> Vec<OsString> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect()
}

/// The entry mounted at `path` (the top of a stack), and whether its mount point was removed.
fn mounted_at<'t>(table: &'t MountTable, path: &Path) -> Option<(&'t MountEntry, bool)> {
    let deleted = {
        let mut bytes = path.as_os_str().to_os_string().into_vec();
        bytes.extend_from_slice(b" (deleted)");
        PathBuf::from(OsString::from_vec(bytes))
    };
    table.entries().iter().rev().find_map(|e| {
        if e.mount_point == path {
            Some((e, false))
        } else if e.mount_point == deleted {
            Some((e, true))
        } else {
            None
        }
    })
}

/// What the host's table says `resolved` is: the device and the root a bind mount of it has.
fn host_identity(table: &MountTable, resolved: &Path) -> Option<((u32, u32), PathBuf)> {
    let entry = table.containing(resolved)?;
    let rest = resolved.strip_prefix(&entry.mount_point).ok()?;
    let root = if rest.as_os_str().is_empty() {
        entry.root.clone()
    } else {
        entry.root.join(rest)
    };
    Some((entry.device, root))
}

fn errno_name(errno: i32) -> Option<&'static str> {
    PROBLEM_ERRNOS
        .iter()
        .find(|(e, _)| *e == errno)
        .map(|(_, name)| *name)
}

/// Who uses a host path, for messages.
#[derive(Debug, Clone)]
struct User {
    /// `default/web/app /data` or `default/web volume csi/pvc-1`.
    label: String,
    /// The pod asked for a writable mount.
    writable: bool,
}

#[derive(Debug, Serialize)]
struct VolumeFact {
    path: PathBuf,
    users: Vec<String>,
    used_percent: Option<u64>,
    read_only: Option<bool>,
    error: Option<String>,
}

pub async fn check(settings: &Settings, deadline: Instant) -> Report {
    // Reported in this order, most specific first: container mounts, statfs, kubelet's dirs.
    let (mut binds_found, mut statfs_found, mut kubelet_found) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut findings = Vec::new();
    let host = match MountTable::read_from(&settings.config.check.host_mountinfo) {
        Ok(table) => table,
        Err(e) => {
            let e = anyhow::Error::from(e);
            return Report::new(
                What::Volumes,
                vec![Finding::unknown(format!("{e:#}"))],
                "",
                serde_json::Value::Null,
            );
        }
    };
    for skipped in host.skipped() {
        findings.push(Finding::note(format!("host {skipped}")));
    }
    let containerd = &settings.config.containerd;
    let containers = match running_containers(containerd, true).await {
        Ok(containers) => containers,
        Err(e) => {
            return Report::new(
                What::Volumes,
                vec![Finding::unknown(format!(
                    "cannot list containers: {}",
                    super::with_cause(&e)
                ))],
                "",
                serde_json::Value::Null,
            )
        }
    };
    let pods = match ready_pods(containerd).await {
        Ok(pods) => pods,
        Err(e) => {
            findings.push(Finding::unknown(format!(
                "cannot list pods: {}",
                super::with_cause(&e)
            )));
            HashMap::new()
        }
    };

    // Every host path to probe, with who uses it.
    let mut users: BTreeMap<PathBuf, Vec<User>> = BTreeMap::new();
    // Container mounts to compare once their host path is resolved.
    // (container path, container, host path, index of the container's table).
    let mut binds: Vec<(String, &Running, PathBuf, usize)> = Vec::new();
    let mut tables: Vec<MountTable> = Vec::new();
    for running in &containers {
        let name = running.name();
        let Some(pid) = running.pid else {
            findings.push(Finding::unknown(format!(
                "{name}: no pid in ContainerStatus"
            )));
            continue;
        };
        let table = match MountTable::read_from(Path::new(&format!("/proc/{pid}/mountinfo"))) {
            Ok(table) => table,
            // Exited since the list: nothing to check.
            Err(_) => continue,
        };
        tables.push(table);
        for mount in &running.status.mounts {
            let host_path = PathBuf::from(&mount.host_path);
            if !host_path.is_absolute() {
                continue;
            }
            users.entry(host_path.clone()).or_default().push(User {
                label: format!("{name} {}", mount.container_path),
                writable: !mount.readonly,
            });
            binds.push((
                mount.container_path.clone(),
                running,
                host_path,
                tables.len() - 1,
            ));
        }
    }
    let volumes = kubelet_volumes(&settings.config.check.kubelet_dir, &pods);
    for volume in &volumes {
        match mounted_at(&host, &volume.path) {
            None => kubelet_found.push(Finding::problem(format!(
                "{} volume {}: not mounted: {}",
                volume.pod,
                volume.volume,
                volume.path.display()
            ))),
            Some((_, true)) => kubelet_found.push(Finding::problem(format!(
                "{} volume {}: mount point removed: {}",
                volume.pod,
                volume.volume,
                volume.path.display()
            ))),
            Some((entry, false)) => {
                if entry.options.split(',').any(|o| o == "rw")
                    && entry.super_options.split(',').any(|o| o == "ro")
                {
                    kubelet_found.push(Finding::problem(format!(
                        "{} volume {}: filesystem went read-only (EROFS): {}",
                        volume.pod,
                        volume.volume,
                        volume.path.display()
                    )));
                }
                users.entry(volume.path.clone()).or_default().push(User {
                    label: format!("{} volume {}", volume.pod, volume.volume),
                    writable: false,
                });
            }
        }
    }

    let paths: Vec<PathBuf> = users.keys().cloned().collect();
    let probed = match probe::probe(&paths, deadline).await {
        Ok(probed) => probed,
        Err(e) => {
            findings.push(Finding::unknown(e.to_string()));
            probe::Probed {
                answers: vec![None; paths.len()],
                killed: false,
            }
        }
    };
    let answers: HashMap<&PathBuf, &Option<Answer>> = paths.iter().zip(&probed.answers).collect();

    let mut facts = Vec::new();
    let threshold = u64::from(settings.config.check.usage_percent);
    for (path, who) in &users {
        let label = match who.as_slice() {
            [one] => one.label.clone(),
            [first, rest @ ..] => format!("{} (+{} users)", first.label, rest.len()),
            [] => continue,
        };
        let mut fact = VolumeFact {
            path: path.clone(),
            users: who.iter().map(|u| u.label.clone()).collect(),
            used_percent: None,
            read_only: None,
            error: None,
        };
        match answers.get(path).copied().cloned().flatten() {
            None => {
                fact.error = Some("no answer".into());
                statfs_found.push(Finding::unknown(format!(
                    "{label}: statfs timed out: {}",
                    path.display()
                )));
            }
            Some(Answer::Failed {
                call,
                errno,
                message,
            }) => {
                fact.error = Some(format!("{call}: {message}"));
                match errno_name(errno) {
                    Some(name) => statfs_found.push(Finding::problem(format!(
                        "{label}: {name} ({message}): {}",
                        path.display()
                    ))),
                    None => statfs_found.push(Finding::unknown(format!(
                        "{label}: {call} failed ({message}): {}",
                        path.display()
                    ))),
                }
            }
            Some(Answer::Stats { stats, .. }) => {
                fact.used_percent = stats.used_percent();
                fact.read_only = Some(stats.read_only);
                if let Some(used) = stats.used_percent().filter(|u| *u > threshold) {
                    statfs_found.push(Finding::problem(format!(
                        "{label}: {used}% full (over {threshold}%): {}",
                        path.display()
                    )));
                }
                if stats.read_only && who.iter().any(|u| u.writable) {
                    statfs_found.push(Finding::problem(format!(
                        "{label}: read-only (EROFS): {}",
                        path.display()
                    )));
                }
            }
        }
        facts.push(fact);
    }

    for (container_path, running, host_path, table) in &binds {
        let table = &tables[*table];
        let Some(Some(Answer::Stats { resolved, .. })) = answers.get(host_path).copied() else {
            // Already reported as unknown or a problem above.
            continue;
        };
        let label = format!("{} {container_path}", running.name());
        let Some((entry, deleted)) = mounted_at(table, Path::new(container_path)) else {
            binds_found.push(Finding::unknown(format!(
                "{label}: no mount there in the container"
            )));
            continue;
        };
        if deleted
            || entry
                .root
                .as_os_str()
                .as_encoded_bytes()
                .ends_with(b"//deleted")
        {
            binds_found.push(Finding::problem(format!(
                "{label}: mount lost: host source {} was removed",
                host_path.display()
            )));
            continue;
        }
        let Some((device, root)) = host_identity(&host, resolved) else {
            binds_found.push(Finding::unknown(format!(
                "{label}: in no host mount: {}",
                resolved.display()
            )));
            continue;
        };
        if device != entry.device || root != entry.root {
            binds_found.push(Finding::problem(format!(
                "{label}: mount lost: host {} is now {}:{} {}, container has {}:{} {}",
                host_path.display(),
                device.0,
                device.1,
                root.display(),
                entry.device.0,
                entry.device.1,
                entry.root.display()
            )));
        }
    }

    findings.extend(binds_found);
    findings.extend(statfs_found);
    findings.extend(kubelet_found);
    let ok = format!(
        "{} volumes of {} containers and {} pods answer",
        users.len(),
        containers.len(),
        pods.len()
    );
    let facts = serde_json::json!({
        "volumes": facts,
        "kubelet_volumes": volumes.len(),
        "containers": containers.len(),
        "statfs_child_killed": probed.killed,
    });
    Report::new(What::Volumes, findings, ok, facts)
}

/// uid → `namespace/pod` of every pod with a ready sandbox.
async fn ready_pods(socket: &Path) -> Result<HashMap<String, String>, super::CriError> {
    let mut client = crate::cli::cri_client::connect(socket).await?;
    let items = client
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .map_err(|s| super::CriError::call("ListPodSandbox", socket, s))?
        .into_inner()
        .items;
    Ok(items
        .into_iter()
        .filter(|p| p.state == PodSandboxState::SandboxReady as i32)
        .filter_map(|p| p.metadata)
        .map(|m| (m.uid, format!("{}/{}", m.namespace, m.name)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = r"22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:50 / /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc/mount rw shared:9 - tmpfs tmpfs rw
31 22 253:1 /srv/data /data rw shared:1 - ext4 /dev/vda1 rw
32 22 0:51 / /gone\040(deleted) rw - tmpfs tmpfs rw
";

    #[test]
    fn host_identity_joins_the_mount_root() {
        let table = MountTable::parse(HOST);
        assert_eq!(
            host_identity(&table, Path::new("/data/a/b")),
            Some(((253, 1), PathBuf::from("/srv/data/a/b")))
        );
        assert_eq!(
            host_identity(
                &table,
                Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc/mount")
            ),
            Some(((0, 50), PathBuf::from("/")))
        );
        assert_eq!(
            host_identity(&table, Path::new("/tmp/x")),
            Some(((253, 1), PathBuf::from("/tmp/x")))
        );
    }

    #[test]
    fn a_removed_mount_point_is_seen() {
        let table = MountTable::parse(HOST);
        assert!(matches!(
            mounted_at(&table, Path::new("/gone")),
            Some((_, true))
        ));
        assert!(matches!(
            mounted_at(&table, Path::new("/data")),
            Some((_, false))
        ));
        assert!(mounted_at(&table, Path::new("/nothing")).is_none());
    }

    #[test]
    fn kubelet_volumes_are_listed_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods");
        let csi = pods.join("u1/volumes/kubernetes.io~csi/pvc");
        std::fs::create_dir_all(csi.join("mount")).unwrap();
        std::fs::create_dir_all(pods.join("u1/volumes/kubernetes.io~empty-dir/cache")).unwrap();
        std::fs::create_dir_all(pods.join("u1/volumes/kubernetes.io~nfs")).unwrap();
        std::os::unix::fs::symlink("/etc", pods.join("u1/volumes/kubernetes.io~nfs/evil")).unwrap();
        std::fs::create_dir_all(pods.join("u1/volumes/kubernetes.io~nfs/share")).unwrap();
        // A pod without a ready sandbox is not looked at.
        std::fs::create_dir_all(pods.join("u2/volumes/kubernetes.io~nfs/old")).unwrap();
        let ready = HashMap::from([
            ("u1".to_string(), "default/web".to_string()),
            ("../u1".to_string(), "default/evil".to_string()),
        ]);
        let found = kubelet_volumes(dir.path(), &ready);
        let volumes: Vec<&str> = found.iter().map(|v| v.volume.as_str()).collect();
        assert_eq!(volumes, ["csi/pvc", "nfs/share"]);
        assert_eq!(found[0].path, csi.join("mount"));
        assert_eq!(found[0].pod, "default/web");
    }

    #[test]
    fn problem_errnos_are_named() {
        assert_eq!(errno_name(libc::ENOTCONN), Some("ENOTCONN"));
        assert_eq!(errno_name(libc::EINVAL), None);
    }
}

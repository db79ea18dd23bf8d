//! Where a container sits in the cgroup tree.
//!
//! The path rules are containerd's and runc's: a `cgroupsPath` of the form
//! `<slice>:<prefix>:<name>` is the systemd driver (expanded to
//! `/<a>.slice/<a-b>.slice/.../<prefix>-<name>.scope`), anything else is a cgroupfs path taken
//! as-is. On cgroup v1 (hybrid included, as containerd does) the path lies under every controller
//! mount; on v2 under the single `cgroup2` mount. The mounts come from the one mount table parser
//! ([`crate::mountinfo`]); a process's membership from `/proc/<pid>/cgroup`.
//!
//! Why not `cgroups-rs`: it manages cgroups (creates them, sets limits) through its own view of
//! the hierarchy; dockhand only reads where a process is and compares that with containerd's
//! rules, which is these few functions, and the crate brings no parser for runc's systemd
//! expansion.

use std::fs;
use std::path::{Path, PathBuf};

use crate::mountinfo::{MountInfoError, MountTable};
use crate::record::{
    Check, Driver, Mismatch, Placement, QosClass, Record, Source, State, RECORD_VERSION,
};

/// Errors deriving a placement.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroupsPath {path:?}: {reason}")]
    CgroupsPath { path: String, reason: &'static str },
    #[error(transparent)]
    MountTable(#[from] MountInfoError),
    #[error("read {path}: {source}")]
    ReadProc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cgroup v1 controllers the kernel has (`include/linux/cgroup_subsys.h`; `blkio` is v1's
/// name of `io`). A v1 mount's super options name its controllers among ordinary options
/// (`rw`, `xattr`, `clone_children`, `noprefix`, `release_agent=`, `favordynmods`...), so only
/// these, and named hierarchies (`name=systemd`), count as the hierarchy's controllers.
pub const V1_CONTROLLERS: &[&str] = &[
    "cpuset",
    "cpu",
    "cpuacct",
    "blkio",
    "io",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
    "debug",
];

/// The cgroup driver and the path inside each hierarchy that a `cgroupsPath` means.
///
/// systemd (`slice:prefix:name`): runc's expansion, `a-b-c.slice` → `/a.slice/a-b.slice/a-b-c.slice`,
/// the unit `<prefix>-<name>.scope` (or `<name>` itself when it ends in `.slice`); an empty slice
/// is `system.slice`. cgroupfs: the path as given (containerd and kubelet pass absolute paths).
pub fn cgroup_rel_path(cgroups_path: &str) -> Result<(Driver, String), CgroupError> {
    let bad = |reason| CgroupError::CgroupsPath {
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

/// Where runc puts a container whose driver is known (runc's `SystemdCgroup` option, which the
/// shim receives with the task): the placement and the record's driver.
///
/// systemd: `slice:prefix:name` as [`cgroup_rel_path`] expands it. cgroupfs: the path as given,
/// even when it looks like systemd's (containerd writes `test.slice:cri-containerd:<id>` for a
/// parent ending in `.slice`, whatever the driver); an absolute path is inside every hierarchy's
/// root, a relative one is under runc's own cgroup (runc's `fs` driver joins it to the cgroup of
/// the process that runs it, `GetOwnCgroupPath`), which `runc_cgroup` gives (`/proc/<pid>/cgroup`
/// of runc's parent, the stock shim).
pub fn placement_for(
    cgroups_path: &str,
    systemd: bool,
    mounts: &CgroupMounts,
    runc_cgroup: &[ProcEntry],
) -> Result<(Driver, Placement), CgroupError> {
    if systemd {
        if cgroups_path.split(':').count() != 3 {
            return Err(CgroupError::CgroupsPath {
                path: cgroups_path.to_string(),
                reason: "the systemd driver wants slice:prefix:name",
            });
        }
        let (_, rel) = cgroup_rel_path(cgroups_path)?;
        return Ok((Driver::Systemd, mounts.expected_placement(&rel)));
    }
    if cgroups_path.is_empty() || cgroups_path.split('/').any(|c| c == "..") {
        return Err(CgroupError::CgroupsPath {
            path: cgroups_path.to_string(),
            reason: "empty, or contains ..",
        });
    }
    if cgroups_path.starts_with('/') {
        return Ok((Driver::Cgroupfs, mounts.expected_placement(cgroups_path)));
    }
    let under = |own: &str| format!("{}/{cgroups_path}", own.trim_end_matches('/'));
    let placement = if mounts.is_v1() {
        let controllers = mounts
            .v1
            .iter()
            .filter(|m| m.is_resource())
            .map(|m| {
                let own = runc_cgroup
                    .iter()
                    .find(|e| same_set(&e.controllers, &m.controllers))
                    .map_or("/", |e| e.path.as_str());
                (m.controllers.join(","), m.dir_of(&under(own)))
            })
            .collect();
        Placement::V1 { controllers }
    } else {
        let own = runc_cgroup
            .iter()
            .find(|e| e.hierarchy == 0 && e.controllers.is_empty())
            .map_or("/", |e| e.path.as_str());
        mounts.expected_placement(&under(own))
    };
    Ok((Driver::Cgroupfs, placement))
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
    /// The cgroup mounts of a mount table.
    pub fn from_table(table: &MountTable) -> CgroupMounts {
        let mut mounts = CgroupMounts::default();
        for entry in table.entries() {
            let root = entry.root.to_string_lossy().into_owned();
            let mount_point = entry.mount_point.clone();
            match entry.fs_type.as_str() {
                "cgroup" => {
                    let controllers = entry
                        .super_options
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

    /// Parses mountinfo text (`/proc/self/mountinfo`).
    pub fn parse(mountinfo: &str) -> CgroupMounts {
        CgroupMounts::from_table(&MountTable::parse(mountinfo))
    }

    /// Reads `/proc/self/mountinfo`.
    pub fn read() -> Result<CgroupMounts, CgroupError> {
        Ok(CgroupMounts::from_table(&MountTable::read()?))
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
    option.starts_with("name=") || V1_CONTROLLERS.contains(&option)
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
        unverified: false,
        mismatches,
        missing,
        error: None,
    }
}

/// Reads `<proc_root>/<pid>/cgroup` and checks `expected` against it; a read failure is recorded
/// in the check rather than returned.
///
/// A process that is exiting says nothing about where it was placed: the kernel moves it to each
/// hierarchy's root before it becomes a zombie, so a container that exits at once reads as being
/// in `/`. A check that does not match is unverified, not a mismatch, when the process is gone, a
/// zombie or exiting (`PF_EXITING`). Nothing here waits: the shim checks on the path of
/// containerd's Create and Start, which must not be slowed down (containerd orders a task's OOM
/// and exit events around them).
pub fn check_pid(proc_root: &Path, pid: u32, mounts: &CgroupMounts, expected: &Placement) -> Check {
    let mut check = read_and_check(proc_root, pid, mounts, expected);
    if !check.matches && !alive(proc_root, pid) {
        check.unverified = true;
    }
    check
}

fn read_and_check(
    proc_root: &Path,
    pid: u32,
    mounts: &CgroupMounts,
    expected: &Placement,
) -> Check {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    match fs::read_to_string(&path) {
        Ok(text) => check(pid, mounts, expected, &parse_proc_cgroup(&text)),
        Err(e) => Check {
            pid,
            matches: false,
            unverified: false,
            mismatches: Vec::new(),
            missing: Vec::new(),
            error: Some(format!("read {}: {e}", path.display())),
        },
    }
}

/// Whether `<proc_root>/<pid>` is a process that is not exiting: its `stat` state is not `Z` or
/// `X`, and its flags lack `PF_EXITING` (set before the kernel moves an exiting task to each
/// hierarchy's root, long before it is a zombie on a busy machine).
fn alive(proc_root: &Path, pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) else {
        return false;
    };
    // `pid (comm) state ppid pgrp session tty_nr tpgid flags ...`; comm may hold spaces and
    // parentheses: the fields follow the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state_alive = fields.first().is_some_and(|s| *s != "Z" && *s != "X");
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    state_alive && flags & PF_EXITING == 0
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
) -> Result<Record, CgroupError> {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    let text =
        fs::read_to_string(&path).map_err(|source| CgroupError::ReadProc { path, source })?;
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
    fn the_driver_decides_how_a_systemd_looking_path_is_read() {
        let table = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory\n\
                     31 25 0:27 / /sys/fs/cgroup/pids rw,nosuid shared:10 - cgroup cgroup rw,pids\n";
        let mounts = CgroupMounts::parse(table);
        let own = parse_proc_cgroup("4:memory:/system.slice/containerd.service\n3:pids:/shims\n");
        let given = "test.slice:cri-containerd:abc";
        // systemd: a scope under the expanded slice.
        let (driver, placement) = placement_for(given, true, &mounts, &own).unwrap();
        assert_eq!(driver, Driver::Systemd);
        assert_eq!(
            placement.dirs()[0].1,
            Path::new("/sys/fs/cgroup/memory/test.slice/cri-containerd-abc.scope")
        );
        // cgroupfs: the same text is a relative directory name under runc's own cgroup.
        let (driver, placement) = placement_for(given, false, &mounts, &own).unwrap();
        assert_eq!(driver, Driver::Cgroupfs);
        let Placement::V1 { controllers } = placement else {
            panic!("v1 mounts give a v1 placement")
        };
        assert_eq!(
            controllers["memory"],
            Path::new("/sys/fs/cgroup/memory/system.slice/containerd.service/test.slice:cri-containerd:abc")
        );
        assert_eq!(
            controllers["pids"],
            Path::new("/sys/fs/cgroup/pids/shims/test.slice:cri-containerd:abc")
        );
        // cgroupfs with an absolute path: inside each hierarchy's root, as before.
        let (_, placement) = placement_for("/kubepods/x", false, &mounts, &own).unwrap();
        assert_eq!(
            placement.dirs()[0].1,
            Path::new("/sys/fs/cgroup/memory/kubepods/x")
        );
        assert!(placement_for("a/../b", false, &mounts, &own).is_err());
        assert!(placement_for("/kubepods/x", true, &mounts, &own).is_err());
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
        // No stat file in the fixture: a pid whose /proc entry is there counts as alive only
        // when its stat says so.
        fs::write(
            root.join("proc/42/stat"),
            "42 (sleep) S 1 42 42 0 -1 4194560\n",
        )
        .unwrap();
        let ok = check_pid(&root.join("proc"), 42, &mounts, &expected);
        assert!(ok.matches && !ok.unverified, "{ok:?}");
        // A process gone before the check: unverified, not a mismatch.
        let gone = check_pid(&root.join("proc"), 43, &mounts, &expected);
        assert!(!gone.matches && gone.unverified && gone.error.is_some());
        // A zombie elsewhere (its cgroups torn down): unverified too.
        fs::create_dir_all(root.join("proc/44")).unwrap();
        fs::write(root.join("proc/44/cgroup"), "0::/\n").unwrap();
        fs::write(
            root.join("proc/44/stat"),
            "44 (a (b) c) Z 1 44 44 0 -1 4194560\n",
        )
        .unwrap();
        let zombie = check_pid(&root.join("proc"), 44, &mounts, &expected);
        assert!(!zombie.matches && zombie.unverified, "{zombie:?}");
        // An exiting one (PF_EXITING, 0x4, in its flags) already sits in the root: unverified.
        fs::write(
            root.join("proc/44/stat"),
            "44 (a (b) c) R 1 44 44 0 -1 4194564\n",
        )
        .unwrap();
        let exiting = check_pid(&root.join("proc"), 44, &mounts, &expected);
        assert!(!exiting.matches && exiting.unverified, "{exiting:?}");
        // A live process elsewhere is a mismatch.
        fs::write(
            root.join("proc/44/stat"),
            "44 (a (b) c) S 1 44 44 0 -1 4194560\n",
        )
        .unwrap();
        let elsewhere = check_pid(&root.join("proc"), 44, &mounts, &expected);
        assert!(!elsewhere.matches && !elsewhere.unverified, "{elsewhere:?}");

        let observed = observe(&root.join("proc"), &mounts, ID, 42, None).unwrap();
        assert_eq!(observed.source, Source::Proc);
        assert_eq!(observed.placement, expected);
        assert_eq!(observed.qos_class, Some(QosClass::Burstable));
        fs::remove_dir_all(&root).unwrap();
    }
}

//! A sandboxed containerd: its own temp directory (root, state, sockets, config, pod logs), its
//! own mount namespace, its own cgroup subtree, the test images imported. Dropping a [`Node`]
//! removes every pod, process, cgroup, mount and file it made.

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::cleanup;
use crate::containerd::{self, ConfigParams, Containerd};
use crate::cri::Cri;
use crate::fixtures::fixtures;
use crate::images::{hex, BUSYBOX_IMAGE, PAUSE_IMAGE};

/// Node directories are `/tmp/<DIR_PREFIX>XXXXXX` (short: unix socket paths are limited).
const DIR_PREFIX: &str = "dockhand-node-";
/// How long containerd gets to start serving CRI.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Propagation of "/" inside containerd's mount namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootPropagation {
    /// `mount --make-rshared /`: like a systemd host.
    #[default]
    Shared,
    /// `mount --make-rprivate /`: like this machine's own "/".
    Private,
}

/// The network a node's pods get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// Host-network pods; containerd in the host's network namespace (no CNI at all).
    #[default]
    Host,
    /// Pods with a network of their own through CNI (Debian's `containernetworking-plugins`:
    /// bridge, host-local, loopback), containerd in a network namespace of the test's own so the
    /// bridge never touches the host's network. containerd binds each pod's namespace at
    /// `/run/netns/cni-<id>` (nsfs mounts, as on any node with such pods); `/run/netns` is a
    /// tmpfs of the node's own mount namespace.
    Cni,
}

/// Where Debian's `containernetworking-plugins` puts the plugins.
const CNI_PLUGINS: &str = "/usr/lib/cni";

/// How to start a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub root_propagation: RootPropagation,
    /// `runtime_type` of the default (`runc`) runtime.
    pub runtime_type: String,
    /// A shim binary used instead of the one `runtime_type` names, keeping the runc options.
    /// containerd 1.6.20's CRI parses `runtime_path` but never passes it on (measured), so the
    /// harness also puts a `containerd-shim-<name>-v2` script in a directory that comes first in
    /// containerd's `PATH` (containerd looks shims up in `PATH` first). The script restores the
    /// original `PATH` and execs this binary, so the shim itself still finds the real
    /// `containerd-shim-runc-v2` by name.
    pub runtime_path: Option<PathBuf>,
    /// TOML appended to the generated containerd config (extra tables only).
    pub extra_config: String,
    pub network: Network,
    /// containerd's registry `config_path` (a `hosts.toml` tree, e.g. a loopback mirror).
    pub registry_config_path: Option<PathBuf>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            root_propagation: RootPropagation::Shared,
            runtime_type: "io.containerd.runc.v2".into(),
            runtime_path: None,
            extra_config: String::new(),
            network: Network::Host,
            registry_config_path: None,
        }
    }
}

/// What a client of a node needs to know to act like its kubelet. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// containerd's CRI socket.
    pub containerd_socket: PathBuf,
    /// The node's `/var/log/pods`.
    pub logs_root: PathBuf,
    /// Cgroup (cgroupfs path) under which all pods of this node live, e.g. `/dockhand-ab12/kubepods`.
    pub cgroup_root: String,
    /// The node's temp directory.
    pub temp_dir: PathBuf,
    /// The network the node's pods get.
    pub network: Network,
    /// The containerd the node runs.
    pub containerd: &'static Containerd,
    pid: Arc<AtomicU32>,
}

impl NodeInfo {
    /// containerd's current pid (0 while it is stopped).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// A command that runs `program` inside containerd's mount namespace.
    pub fn ns_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.pid().to_string())
            .arg("-m")
            .arg("--")
            .arg(program);
        command
    }

    /// A command that runs `program` inside containerd's mount and network namespaces (for
    /// clients of a CNI node's pods and of its loopback).
    pub fn net_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.pid().to_string())
            .args(["-m", "-n", "--"])
            .arg(program);
        command
    }
}

/// A containerd started by the test, see the module documentation.
pub struct Node {
    options: NodeOptions,
    info: NodeInfo,
    /// `Some` until drop; removed last.
    dir: Option<tempfile::TempDir>,
    containerd: Option<Child>,
}

impl Node {
    /// Starts containerd, waits for CRI to answer and imports the test images.
    pub async fn start(options: NodeOptions) -> Result<Node> {
        let fixtures = fixtures()?;
        let containerd = Containerd::selected()?;
        reap_abandoned_nodes();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in("/tmp")?;
        let path = dir.path().to_path_buf();
        for sub in [
            "root", "state", "pods", "cni/bin", "cni/conf", "runc", "opt", "shim-bin",
        ] {
            std::fs::create_dir_all(path.join(sub))?;
        }
        let shim_in_path = options
            .runtime_path
            .as_ref()
            .filter(|_| !containerd.version.honours_runtime_path());
        if let Some(shim) = shim_in_path {
            let script = path
                .join("shim-bin")
                .join(shim_binary_name(&options.runtime_type)?);
            let text = format!(
                "#!/bin/sh\nPATH='{}'\nexport PATH\nexec '{}' \"$@\"\n",
                host_path(),
                shim.display()
            );
            std::fs::write(&script, text)?;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        let owner = owner_id(std::process::id()).context("read /proc/self/stat")?;
        std::fs::write(path.join("owner"), owner)?;
        // The cgroup tree is named after the directory, so teardown finds it from the path.
        let cgroup_top = path.file_name().unwrap().to_string_lossy().into_owned();
        let info = NodeInfo {
            containerd_socket: path.join("containerd.sock"),
            logs_root: path.join("pods"),
            cgroup_root: format!("/{cgroup_top}/kubepods"),
            temp_dir: path.clone(),
            network: options.network,
            containerd,
            pid: Arc::new(AtomicU32::new(0)),
        };
        if options.network == Network::Cni {
            install_cni(&path)?;
        }
        let params = ConfigParams {
            runtime_type: &options.runtime_type,
            runtime_path: options.runtime_path.as_deref(),
            registry_config_path: options.registry_config_path.as_deref(),
            runc: containerd.runc.as_deref(),
            extra: &options.extra_config,
        };
        let config = containerd::config(containerd.version, &path, &params);
        std::fs::write(path.join("config.toml"), config)?;
        let mut node = Node {
            options,
            info,
            dir: Some(dir),
            containerd: None,
        };
        node.start_containerd().await?;
        node.import(&fixtures.images).await?;
        Ok(node)
    }

    /// Starts containerd again after [`Node::stop_containerd`] (in a new mount namespace).
    pub async fn start_containerd(&mut self) -> Result<()> {
        if self.containerd.is_some() {
            bail!("containerd is already running");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let make = match self.options.root_propagation {
            RootPropagation::Shared => "--make-rshared",
            RootPropagation::Private => "--make-rprivate",
        };
        let containerd = self.info.containerd;
        let mut script = format!("mount {make} /");
        let mut unshare = vec!["-m"];
        if self.options.network == Network::Cni {
            // The pod namespaces' bind mounts go to a /run/netns of this mount namespace only
            // (the empty directory is all the host sees, as on any node that ever ran `ip netns`).
            script.push_str(
                " && ip link set lo up && mkdir -p /run/netns \
                 && mount -t tmpfs -o mode=0755 dockhand-netns /run/netns",
            );
            unshare.push("-n");
        }
        script.push_str(&format!(
            " && exec '{}' --config '{}'",
            containerd.binary("containerd").display(),
            self.temp_dir().join("config.toml").display()
        ));
        // The version's own shims come first; on 1.6 dockhand's shim wrapper before them.
        let mut path = format!("{}:{}", containerd.bin_dir.display(), host_path());
        if !containerd.version.honours_runtime_path() {
            path = format!("{}:{path}", self.temp_dir().join("shim-bin").display());
        }
        // unshare and sh exec without forking: the child's pid is containerd's.
        let child = Command::new("unshare")
            .args(unshare)
            .args(["--propagation", "unchanged", "sh", "-c", &script])
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn unshare/containerd")?;
        self.info.pid.store(child.id(), Ordering::SeqCst);
        self.containerd = Some(child);
        if let Err(e) = self.wait_ready().await {
            let tail = self.containerd_log_tail(40);
            return Err(e.context(format!("containerd did not start; log tail:\n{tail}")));
        }
        Ok(())
    }

    /// SIGTERMs containerd and waits for it to exit (SIGKILL after 10 s). Pods keep running.
    pub async fn stop_containerd(&mut self) -> Result<()> {
        let Some(mut child) = self.containerd.take() else {
            return Ok(());
        };
        self.info.pid.store(0, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || terminate(&mut child, Duration::from_secs(10))).await?;
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = anyhow!("socket never appeared");
        loop {
            if let Some(status) = self.containerd.as_mut().unwrap().try_wait()? {
                self.containerd = None;
                self.info.pid.store(0, Ordering::SeqCst);
                bail!("containerd exited with {status}");
            }
            if self.info.containerd_socket.exists() {
                match self.cri().await {
                    Ok(cri) => match cri.version().await {
                        Ok(_) => return Ok(()),
                        Err(e) => last_error = e.into(),
                    },
                    Err(e) => last_error = e,
                }
            }
            if Instant::now() > deadline {
                return Err(last_error.context("containerd CRI not ready"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn import(&self, archive: &Path) -> Result<()> {
        let output = tokio::process::Command::new(self.info.containerd.binary("ctr"))
            .arg("-a")
            .arg(&self.info.containerd_socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive)
            .output()
            .await
            .context("run ctr images import")?;
        if !output.status.success() {
            bail!(
                "ctr images import {} failed: {}{}\ncontainerd log tail:\n{}",
                archive.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.containerd_log_tail(20)
            );
        }
        // CRI learns about imported images from events: wait until it sees both.
        let cri = self.cri().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        for image in [BUSYBOX_IMAGE, PAUSE_IMAGE] {
            while cri.image_status(image).await?.image.is_none() {
                if Instant::now() > deadline {
                    bail!("CRI does not list {image} after import");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// A kubelet-like CRI client connected straight to containerd.
    pub async fn cri(&self) -> Result<Cri> {
        Cri::connect(&self.info.containerd_socket, self.info.clone()).await
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The containerd this node runs.
    pub fn containerd(&self) -> &'static Containerd {
        self.info.containerd
    }

    pub fn containerd_socket(&self) -> &Path {
        &self.info.containerd_socket
    }

    /// containerd's pid (for `nsenter`); 0 while stopped.
    pub fn pid(&self) -> u32 {
        self.info.pid()
    }

    /// The node's `/var/log/pods`.
    pub fn logs_root(&self) -> &Path {
        &self.info.logs_root
    }

    pub fn temp_dir(&self) -> &Path {
        &self.info.temp_dir
    }

    /// Cgroup parent of this node's pods' QoS levels, e.g. `/dockhand-ab12/kubepods`.
    pub fn cgroup_root(&self) -> &str {
        &self.info.cgroup_root
    }

    /// A command that runs `program` inside containerd's mount namespace.
    pub fn ns_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.info.ns_command(program)
    }

    /// Everything containerd printed so far.
    pub fn containerd_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines containerd printed.
    pub fn containerd_log_tail(&self, lines: usize) -> String {
        let log = self.containerd_log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.temp_dir().join("containerd.log")
    }

    /// Stops and removes every pod sandbox through CRI (best effort, bounded time).
    fn remove_pods(&self) {
        let info = self.info.clone();
        let socket = info.containerd_socket.clone();
        let worker = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let work = async {
                    let cri = Cri::connect(&socket, info).await.ok()?;
                    for pod in cri.list_pods().await.ok()? {
                        let _ = cri.stop_pod(&pod.id).await;
                        let _ = cri.remove_pod(&pod.id).await;
                    }
                    Some(())
                };
                tokio::time::timeout(Duration::from_secs(20), work)
                    .await
                    .ok()
                    .flatten()
            })
        });
        let _ = worker.join();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.containerd.is_some() {
            self.remove_pods();
        }
        if let Some(mut child) = self.containerd.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
        teardown(self.temp_dir());
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// Removes what a node left outside its directory, then the directory's mounts: processes that
/// mention it (containerd, shims with `-address <dir>/containerd.sock`, proxies with
/// `--config <dir>/...`), its cgroup tree (named after the directory) and its shim sockets.
fn teardown(dir: &Path) {
    cleanup::kill_processes_mentioning(&format!("{}/", dir.display()));
    if let Some(name) = dir.file_name() {
        cleanup::remove_cgroup_tree(&name.to_string_lossy());
    }
    for socket in shim_sockets(dir) {
        let _ = std::fs::remove_file(socket);
    }
    cleanup::unmount_under(dir);
}

/// Shim socket paths containerd 1.6 derives for the task directories of the node in `dir`:
/// `/run/containerd/s/<sha256(<containerd address>/<namespace>/<id>)>`.
fn shim_sockets(dir: &Path) -> Vec<PathBuf> {
    let tasks = dir.join("state/io.containerd.runtime.v2.task/k8s.io");
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| {
            let id = e.file_name().to_string_lossy().into_owned();
            let key = format!("{}/k8s.io/{id}", dir.join("containerd.sock").display());
            PathBuf::from(format!("/run/containerd/s/{}", hex(&Sha256::digest(key))))
        })
        .collect()
}

/// The CNI plugins and a bridge network of the node's own: `<dir>/cni/bin` links to Debian's
/// plugins, `<dir>/cni/conf/10-dockhand.conflist`, IP leases under `<dir>/cni/ipam`.
fn install_cni(dir: &Path) -> Result<()> {
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        let source = Path::new(CNI_PLUGINS).join(plugin);
        if !source.is_file() {
            bail!(
                "{} missing: apt-get install containernetworking-plugins",
                source.display()
            );
        }
        std::os::unix::fs::symlink(&source, dir.join("cni/bin").join(plugin))?;
    }
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "dockhand-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "dockhand0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": "10.88.0.0/16" }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": dir.join("cni/ipam"),
                },
            },
        ],
    });
    std::fs::write(
        dir.join("cni/conf/10-dockhand.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )?;
    Ok(())
}

/// `<pid> <start time>` of a live process: who owns a node directory (pids get reused).
fn owner_id(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (start time), counted after the parenthesised command name (field 2).
    let start = stat.rsplit(')').next()?.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Tears down nodes whose test process died without dropping them (SIGKILL, abort).
fn reap_abandoned_nodes() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = std::fs::read_to_string(dir.join("owner")) else {
            continue;
        };
        let pid = owner.split(' ').next().and_then(|p| p.parse::<u32>().ok());
        if pid.and_then(owner_id).as_deref() != Some(owner.trim()) {
            teardown(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// This process's `PATH`.
fn host_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())
}

/// `io.containerd.<name>.v2` → `containerd-shim-<name>-v2`, as containerd names shim binaries.
fn shim_binary_name(runtime_type: &str) -> Result<String> {
    let parts: Vec<&str> = runtime_type.split('.').collect();
    match parts.as_slice() {
        ["io", "containerd", name, version] => Ok(format!("containerd-shim-{name}-{version}")),
        _ => bail!("runtime_type {runtime_type:?} is not io.containerd.<name>.<version>"),
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL and reap.
pub(crate) fn terminate(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    cleanup::signal(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::{ContainerSpec, PodSpec};

    /// The harness itself: a pod with a container runs, and dropping the node leaves no
    /// process, cgroup, mount, shim socket or file behind.
    #[tokio::test(flavor = "multi_thread")]
    async fn node_runs_a_pod_and_drop_leaves_nothing_behind() {
        let node = Node::start(NodeOptions::default()).await.unwrap();
        let cri = node.cri().await.unwrap();
        let pod = cri.run_pod(&PodSpec::new("harness")).await.unwrap();
        let id = cri
            .run_container(&pod, &ContainerSpec::sleeper("sleeper"))
            .await
            .unwrap();
        let out = cri
            .exec_sync(&id, &["cat", "/proc/self/cgroup"], 10)
            .await
            .unwrap();
        let cgroups = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            cgroups.contains(&format!(
                "{}/besteffort/pod{}/{id}",
                node.cgroup_root(),
                pod.spec.uid
            )),
            "container cgroups: {cgroups}"
        );
        // "/" inside containerd's namespace is rshared.
        let mountinfo = node
            .ns_command("cat")
            .arg("/proc/self/mountinfo")
            .output()
            .unwrap();
        let root_line = String::from_utf8_lossy(&mountinfo.stdout)
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .map(str::to_string)
            .unwrap();
        assert!(root_line.contains("shared:"), "{root_line}");

        let dir = node.temp_dir().to_path_buf();
        let sockets = shim_sockets(node.temp_dir());
        let name = node.temp_dir().file_name().unwrap().to_string_lossy();
        let cgroup_dirs = cleanup::cgroup_dirs(&name);
        assert!(!sockets.is_empty() && sockets.iter().any(|s| s.exists()));
        assert!(!cgroup_dirs.is_empty());
        drop(cri);
        drop(node);
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert_eq!(
            cleanup::processes_mentioning(&format!("{}/", dir.display())),
            Vec::<u32>::new()
        );
        for path in cgroup_dirs.iter().chain(&sockets) {
            assert!(!path.exists(), "{} left behind", path.display());
        }
    }

    /// `runtime_path` (containerd 1.6+) replaces the shim binary: what the shim engineer plugs in.
    /// Also checks `RootPropagation::Private`.
    #[tokio::test(flavor = "multi_thread")]
    async fn runtime_path_shim_is_used_and_root_can_be_private() {
        let scripts = tempfile::tempdir().unwrap();
        let calls = scripts.path().join("calls");
        let shim = scripts.path().join("containerd-shim-wrapper");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\ncase \"$PATH\" in *shim-bin*) echo PATH leaked >> {0}; exit 1;; esac\n\
                 echo \"$@\" >> {0}\nexec '{1}' \"$@\"\n",
                calls.display(),
                Containerd::selected().unwrap().stock_shim().display()
            ),
        )
        .unwrap();
        Command::new("chmod").arg("+x").arg(&shim).status().unwrap();
        let node = Node::start(NodeOptions {
            runtime_path: Some(shim),
            root_propagation: RootPropagation::Private,
            ..NodeOptions::default()
        })
        .await
        .unwrap();
        let cri = node.cri().await.unwrap();
        let pod = cri.run_pod(&PodSpec::new("shim")).await.unwrap();
        let calls = std::fs::read_to_string(&calls).unwrap_or_default();
        assert!(
            calls.contains(&pod.id) && !calls.contains("PATH leaked"),
            "shim calls: {calls:?}; containerd log:\n{}",
            node.containerd_log_tail(30)
        );
        let mountinfo = node
            .ns_command("cat")
            .arg("/proc/self/mountinfo")
            .output()
            .unwrap();
        let root_line = String::from_utf8_lossy(&mountinfo.stdout)
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .map(str::to_string)
            .unwrap();
        assert!(!root_line.contains("shared:"), "{root_line}");
    }

    /// The node runs the containerd `DOCKHAND_CONTAINERD` names, and CRI says so; on 2.x its
    /// containers run with runc 1.5 (the runc options' `BinaryName`, as containerd reports them),
    /// on 1.x with the runc in `PATH`.
    #[tokio::test(flavor = "multi_thread")]
    async fn node_runs_the_selected_containerd_and_runc() {
        let node = Node::start(NodeOptions::default()).await.unwrap();
        let cri = node.cri().await.unwrap();
        let version = cri.version().await.unwrap();
        let selected = Containerd::selected().unwrap();
        assert_eq!(version.runtime_name, "containerd");
        assert!(
            version
                .runtime_version
                .trim_start_matches('v')
                .starts_with(&format!("{}.", selected.version)),
            "CRI says {version:?}, the harness asked for {}",
            selected.version
        );
        let pod = cri.run_pod(&PodSpec::new("runc")).await.unwrap();
        let id = cri
            .run_container(&pod, &ContainerSpec::sleeper("sleeper"))
            .await
            .unwrap();
        let status = cri.container_status(&id, true).await.unwrap();
        let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
        let binary_name = info["runtimeOptions"]["binary_name"].as_str();
        let runc = selected.runc.as_ref().map(|p| p.to_string_lossy());
        assert_eq!(binary_name, runc.as_deref(), "{}", status.info["info"]);
        assert_eq!(selected.version.is_v2(), runc.is_some());
        // That runc knows the container as running (its state root is the options' Root).
        let state = Command::new(selected.runc.as_deref().unwrap_or(Path::new("runc")))
            .arg("--root")
            .arg(node.temp_dir().join("runc/k8s.io"))
            .args(["state", &id])
            .output()
            .unwrap();
        let state: serde_json::Value = serde_json::from_slice(&state.stdout)
            .unwrap_or_else(|e| panic!("runc state: {e}: {state:?}"));
        assert_eq!(state["status"], "running", "{state}");
    }

    /// A CNI node: the pod has an address of its own on the node's bridge, containerd bound its
    /// network namespace under `/run/netns` (an nsfs line in the node's mount table), and the
    /// host's network and mount table see none of it.
    #[tokio::test(flavor = "multi_thread")]
    async fn cni_pods_get_their_own_network_inside_the_node_only() {
        let node = Node::start(NodeOptions {
            network: Network::Cni,
            ..NodeOptions::default()
        })
        .await
        .unwrap();
        let cri = node.cri().await.unwrap();
        let pod = cri.run_pod(&PodSpec::new("cni")).await.unwrap();
        let id = cri
            .run_container(&pod, &ContainerSpec::sleeper("sleeper"))
            .await
            .unwrap();
        let out = cri
            .exec_sync(&id, &["sh", "-c", "ip -4 addr show eth0; hostname"], 10)
            .await
            .unwrap();
        let inside = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(inside.contains("inet 10.88."), "{inside}");
        assert!(inside.ends_with("cni\n"), "hostname is the pod's: {inside}");
        let status = cri
            .pod_status(&pod.id, false)
            .await
            .unwrap()
            .status
            .unwrap();
        let ip = status.network.unwrap().ip;
        assert!(ip.starts_with("10.88."), "{ip}");
        // The pod answers on its address from containerd's network namespace.
        let ping = node
            .info()
            .net_command("busybox")
            .args(["ping", "-c", "1", "-W", "5", &ip])
            .output()
            .unwrap();
        assert!(ping.status.success(), "{ping:?}");

        let mountinfo = node
            .ns_command("cat")
            .arg("/proc/self/mountinfo")
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&mountinfo.stdout).into_owned();
        let nsfs = table
            .lines()
            .find(|l| l.contains(" /run/netns/cni-") && l.contains(" - nsfs "))
            .unwrap_or_else(|| panic!("no /run/netns/cni-* nsfs mount:\n{table}"));
        assert!(
            nsfs.split(' ').nth(3).unwrap().starts_with("net:["),
            "{nsfs}"
        );
        let host_table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!host_table.contains("/run/netns/cni-"), "{host_table}");
        let host_links = Command::new("ip").args(["link", "show"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&host_links.stdout).contains("dockhand0"));
    }

    /// A node whose test process died without dropping it is torn down by the next start.
    #[tokio::test(flavor = "multi_thread")]
    async fn abandoned_nodes_are_reaped() {
        let node = Node::start(NodeOptions::default()).await.unwrap();
        let cri = node.cri().await.unwrap();
        let pod = cri.run_pod(&PodSpec::new("abandoned")).await.unwrap();
        cri.run_container(&pod, &ContainerSpec::sleeper("sleeper"))
            .await
            .unwrap();
        drop(cri);
        let dir = node.temp_dir().to_path_buf();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let sockets = shim_sockets(&dir);
        // As if the owner had been SIGKILLed: no Drop, and its pid is gone.
        std::fs::write(dir.join("owner"), "4194304 1").unwrap();
        std::mem::forget(node);

        reap_abandoned_nodes();
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert_eq!(
            cleanup::processes_mentioning(&format!("{}/", dir.display())),
            Vec::<u32>::new()
        );
        assert_eq!(cleanup::cgroup_dirs(&name), Vec::<PathBuf>::new());
        assert!(sockets.iter().all(|s| !s.exists()));
    }
}

//! A real kubelet (built from `k8s.io/kubernetes` by `make kubelet`, `tools/kubelet/go.mod`) run
//! standalone inside a [`Node`]'s mount namespace, as a node without an API server runs it: static
//! pods from a manifest directory, its API (`/containerLogs`) on loopback with anonymous access.
//!
//! Everything it writes stays in the node's temp directory (`kubelet/`: root dir, certificates,
//! manifests, volume plugins), except `/var/log/containers`, a path kubelet hard-codes for its
//! legacy symlinks: the harness mounts a tmpfs of the node's own mount namespace there. Pods go
//! under the node's cgroup root (`cgroupsPerQOS: false`, `cgroupRoot`), so the node's teardown
//! finds them. What kubelet changes on the host as any kubelet does: kernel tunables it sets at
//! start-up (`vm.overcommit_memory`, `kernel.panic*`; `protectKernelDefaults` is false).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::fixtures::target_dir;
use crate::images::BUSYBOX_IMAGE;
use crate::node::{terminate, Node, NodeInfo};

/// The kubelet release `make kubelet` builds.
pub const KUBELET_VERSION: &str = "v1.37.2";
/// The node name every lab kubelet registers its static pods under (`<pod>-<NODE_NAME>`).
pub const NODE_NAME: &str = "dockhand-lab";
/// How long kubelet gets to answer on its port.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A running (or stopped) kubelet. Drop kills it (before the node's own teardown, which removes
/// the pods: declare it after the [`Node`]).
pub struct KubeletProcess {
    node: NodeInfo,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl KubeletProcess {
    /// Writes a KubeletConfiguration into a fresh `kubelet-<n>/` of the node's temp dir, with the
    /// CRI endpoint `runtime_socket` (containerd's or dockhand's), and starts kubelet with `flags`
    /// added to its command line; waits until its API answers `/healthz`.
    pub async fn start(node: &Node, runtime_socket: &Path, flags: &[&str]) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = kubelet_binary()?;
        let dir = node
            .temp_dir()
            .join(format!("kubelet-{}", NEXT.fetch_add(1, Ordering::SeqCst)));
        for sub in ["root", "pki", "manifests", "volume-plugins"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "staticPodPath": dir.join("manifests"),
            "fileCheckFrequency": "1s",
            "syncFrequency": "5s",
            "containerRuntimeEndpoint": format!("unix://{}", runtime_socket.display()),
            "podLogsDir": node.logs_root(),
            "volumePluginDir": dir.join("volume-plugins"),
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": node.cgroup_root(),
            "cgroupsPerQOS": false,
            "enforceNodeAllocatable": [],
            "failCgroupV1": false,
            "failSwapOn": false,
            "address": "127.0.0.1",
            "port": port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": { "enabled": true },
                "webhook": { "enabled": false },
            },
            "authorization": { "mode": "AlwaysAllow" },
            // This machine's disk may be fuller than the default thresholds: no disk pressure,
            // no image garbage collection (the test images are imported, never pulled).
            "evictionHard": { "memory.available": "1Mi" },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        });
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        let mut args: Vec<String> = vec![
            format!("--config={}", dir.join("config.json").display()),
            format!("--root-dir={}", dir.join("root").display()),
            format!("--cert-dir={}", dir.join("pki").display()),
            format!("--hostname-override={NODE_NAME}"),
            "--v=2".into(),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        let info = node.info().clone();
        legacy_log_dir(&info)?;
        let mut kubelet = KubeletProcess {
            node: info,
            bin,
            dir,
            port,
            args,
            child: None,
        };
        kubelet.spawn().await?;
        Ok(kubelet)
    }

    async fn spawn(&mut self) -> Result<()> {
        ensure!(self.node.pid() != 0, "the node's containerd is stopped");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // nsenter -m execs without forking: the child's pid is kubelet's.
        let child = self
            .node
            .ns_command(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                bail!(
                    "kubelet exited with {status}; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            if matches!(self.get("/healthz"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kubelet did not answer /healthz within {START_TIMEOUT:?}; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGTERMs kubelet (SIGKILL after 10 s) and starts it again with the same configuration and
    /// root directory, as a node's service manager restarts it. Pods keep running meanwhile.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            tokio::task::spawn_blocking(move || terminate(&mut child, Duration::from_secs(10)))
                .await?;
        }
        self.spawn().await
    }

    /// Writes (or replaces) the static pod manifest `<name>.json`.
    pub fn add_pod(&self, pod: &Value) -> Result<()> {
        let name = pod["metadata"]["name"]
            .as_str()
            .context("a static pod needs metadata.name")?;
        // Written aside and renamed: kubelet must never read half a manifest.
        let tmp = self.dir.join(format!("{name}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(pod)?)?;
        std::fs::rename(&tmp, self.manifest(name))?;
        Ok(())
    }

    /// Removes the static pod manifest `<name>.json`: kubelet stops and forgets the pod.
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        Ok(std::fs::remove_file(self.manifest(name))?)
    }

    fn manifest(&self, name: &str) -> PathBuf {
        self.dir.join("manifests").join(format!("{name}.json"))
    }

    /// `GET /containerLogs/<namespace>/<pod>-<node>/<container><query>` from kubelet's API, as
    /// `kubectl logs` reaches it through the API server: (HTTP status, body).
    pub fn container_logs(&self, pod: &str, container: &str, query: &str) -> Result<(u16, String)> {
        self.get(&format!(
            "/containerLogs/default/{pod}-{NODE_NAME}/{container}{query}"
        ))
    }

    /// `GET path` from kubelet's HTTPS API with curl (kubelet's certificate is self-signed).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let output = Command::new("curl")
            .args(["-sk", "--max-time", "20", "-w", "\n%{http_code}"])
            .arg(format!("https://127.0.0.1:{}{path}", self.port))
            .output()
            .context("run curl (apt-get install curl)")?;
        ensure!(
            output.status.success(),
            "curl {path}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("no status line")?;
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// Everything kubelet printed (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines kubelet printed.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("kubelet.log")
    }
}

impl Drop for KubeletProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A static pod manifest: one busybox container running `sh -c script` on the host network (the
/// lab has no CNI), `imagePullPolicy: Never` (the image is imported), 1 s grace period.
pub fn static_pod(name: &str, container: &str, script: &str, restart_policy: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "hostNetwork": true,
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": container,
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
            }],
        },
    })
}

/// `$DOCKHAND_KUBELET`, else `<target>/kubelet/<KUBELET_VERSION>/kubelet` (`make kubelet`).
pub fn kubelet_binary() -> Result<PathBuf> {
    let bin = std::env::var_os("DOCKHAND_KUBELET")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            target_dir()
                .join("kubelet")
                .join(KUBELET_VERSION)
                .join("kubelet")
        });
    if !bin.is_file() {
        bail!(
            "kubelet not found at {}: build it with `make kubelet` (or set DOCKHAND_KUBELET)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A tmpfs at `/var/log/containers` in the node's mount namespace (once per node), so kubelet's
/// legacy symlinks never land in the host's `/var/log`.
fn legacy_log_dir(node: &NodeInfo) -> Result<()> {
    const DIR: &str = "/var/log/containers";
    let marker = node.temp_dir.join("var-log-containers");
    if marker.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(DIR)?;
    let status = node
        .ns_command("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=16m",
            "dockhand-kubelet-logs",
            DIR,
        ])
        .status()?;
    ensure!(
        status.success(),
        "mount a tmpfs at {DIR} in the node: {status}"
    );
    std::fs::write(marker, "")?;
    Ok(())
}

//! The `dockhand proxy` binary under test, run inside a [`Node`]'s mount namespace with a config
//! file written by the harness.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cri::Cri;
use crate::fixtures::target_dir;
use crate::node::{terminate, Node, NodeInfo};

/// How long the proxy gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) `dockhand proxy`. Drop kills it.
pub struct ProxyProcess {
    node: NodeInfo,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    /// Extra environment of the proxy process (e.g. a `test-hooks` hook).
    env: Vec<(String, String)>,
}

impl ProxyProcess {
    /// Writes `<dir>/dockhand.toml` (`listen`, `containerd`, then `extra_toml`) in a fresh
    /// directory of the node's temp dir, starts the proxy and waits until its socket accepts.
    pub async fn start(node: &Node, extra_toml: &str) -> Result<ProxyProcess> {
        ProxyProcess::start_with_env(node, extra_toml, &[]).await
    }

    /// [`ProxyProcess::start`], the proxy's environment extended with `env`.
    pub async fn start_with_env(
        node: &Node,
        extra_toml: &str,
        env: &[(&str, &str)],
    ) -> Result<ProxyProcess> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = proxy_binary()?;
        let dir = node
            .temp_dir()
            .join(format!("proxy-{}", NEXT.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&dir)?;
        let mut config = format!(
            "listen = \"{}\"\ncontainerd = \"{}\"\n{extra_toml}\n",
            dir.join("dockhand.sock").display(),
            node.containerd_socket().display()
        );
        if !extra_toml.contains("[archive]") {
            config.push_str(&archive_toml(&dir.join("archive"), node.logs_root()));
        }
        std::fs::write(dir.join("dockhand.toml"), config)?;
        let mut proxy = ProxyProcess {
            node: node.info().clone(),
            bin,
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        proxy.spawn().await?;
        Ok(proxy)
    }

    async fn spawn(&mut self) -> Result<()> {
        if self.node.pid() == 0 {
            bail!("cannot start the proxy: the node's containerd is stopped");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // nsenter -m execs without forking: the child's pid is the proxy's.
        let child = self
            .node
            .ns_command(&self.bin)
            .arg("proxy")
            .arg("--config")
            .arg(self.config_path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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
                    "dockhand proxy exited with {status} before accepting; log:\n{}",
                    self.log()
                );
            }
            if tokio::net::UnixStream::connect(self.socket()).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "dockhand proxy did not accept on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.socket().display(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The socket the proxy listens on.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("dockhand.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("dockhand.toml")
    }

    /// The proxy's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A kubelet-like CRI client connected to the proxy.
    pub async fn cri(&self) -> Result<Cri> {
        Cri::connect(&self.socket(), self.node.clone()).await
    }

    /// Everything the proxy printed (stdout and stderr, across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("dockhand.log")
    }

    /// SIGKILLs the proxy and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the proxy and waits (up to 30 s) for it to exit; returns its exit status.
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the proxy is not running")?;
        crate::cleanup::signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "dockhand proxy ignored SIGTERM for 30 s; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the proxy if it runs (SIGTERM) and starts it again with the same config.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            tokio::task::spawn_blocking(move || terminate(&mut child, Duration::from_secs(10)))
                .await?;
        }
        self.spawn().await
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `$DOCKHAND_BIN`, else `<target>/debug/dockhand`.
pub fn proxy_binary() -> Result<PathBuf> {
    let bin = std::env::var_os("DOCKHAND_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug/dockhand"));
    if !Path::new(&bin).is_file() {
        bail!(
            "dockhand binary not found at {}: build it with `cargo build --bins` (or set DOCKHAND_BIN)",
            bin.display()
        );
    }
    if std::env::var_os("DOCKHAND_BIN").is_none() && older_than_sources(&bin) {
        // Shown with the test's output when it fails: the likely reason.
        eprintln!(
            "warning: {} is older than proxy/src: rebuild it with `cargo build --bins`",
            bin.display()
        );
    }
    Ok(bin)
}

/// Whether some file under `<workspace>/proxy/src` changed after `bin` was built.
fn older_than_sources(bin: &Path) -> bool {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        let mut latest = None;
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let modified = if entry.file_type().ok()?.is_dir() {
                newest(&entry.path())
            } else {
                entry.metadata().ok()?.modified().ok()
            };
            latest = latest.max(modified);
        }
        latest
    }
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let sources = newest(&crate::fixtures::workspace_dir().join("proxy/src"));
    matches!((built, sources), (Some(built), Some(sources)) if sources > built)
}

/// GETs `path` from the proxy's loopback metrics endpoint on `port`; the whole HTTP response.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// The `[archive]` table for a proxy under test: the store, staging and restored copies under
/// `dir` (`store/`, `staging/`, `restored/`), never in the host's /var/lib/dockhand, archiving
/// the pod logs under `pod_logs`. Tests that configure the archive themselves write their own.
///
/// No free-space floor: these archives live in /tmp on the machine's root filesystem, and
/// whether a test passes must not depend on how full the machine's disk is (with the default
/// 15%, a build machine at 86% used drops every archived log). The floor is tested on a
/// filesystem of its own (`archive.rs`).
pub fn archive_toml(dir: &Path, pod_logs: &Path) -> String {
    format!(
        "[archive]\ndir = \"{}\"\nstaging_dir = \"{}\"\nrestored_dir = \"{}\"\npod_logs_dir = \"{}\"\nmin_free_percent = 0\n",
        dir.join("store").display(),
        dir.join("staging").display(),
        dir.join("restored").display(),
        pod_logs.display(),
    )
}

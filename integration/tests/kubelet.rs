//! The kubelet lane: a real kubelet (v1.37, `make kubelet`) run standalone with static pods, on a
//! real containerd (`DOCKHAND_CONTAINERD`), once straight against containerd and once through
//! `dockhand proxy`. Each scenario asserts what a user sees (a pod's own output, kubelet's
//! `/containerLogs`, which is what `kubectl logs` reads), and each one that exists because of
//! Docker's behaviour is asserted to fail straight against containerd, so a lab that stops
//! reproducing the problem is noticed. Run by `make test-kubelet` (this file needs the
//! `kubelet-lane` feature, so `make test` does not need a kubelet build).
//!
//! Not here: `recursiveReadOnly: Enabled`. A standalone kubelet refuses every such mount on both
//! sides ("not supported by the runtime": `runtimeClassSupportsRecursiveReadOnlyMounts` returns
//! false without a RuntimeClass manager, i.e. without an API server), so that mount is covered at
//! the CRI level instead, with the request kubelet sends for it (issue 18's tests).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use dockhand_integration::kubelet_process::{static_pod, KubeletProcess, NODE_NAME};
use dockhand_integration::node::{Node, NodeOptions};
use dockhand_integration::proxy::{proxy_binary, ProxyProcess};
use dockhand_protos::cri;
use serde_json::json;

/// kubelet's container garbage collection as `--maximum-dead-containers=0` sets it: every dead
/// container (and its log files) is removed at the next collection, at most a minute later.
const GC_EVERYTHING: &[&str] = &["--maximum-dead-containers=0"];
/// kubelet collects every minute; a collection, the sync that follows and this busy machine.
const GC_WAIT: Duration = Duration::from_secs(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// kubelet's runtime endpoint is containerd's socket.
    Direct,
    /// kubelet's runtime endpoint is `dockhand proxy`'s socket, in front of containerd.
    Dockhand,
}

/// A node of one side: containerd, the proxy on the dockhand side, kubelet. Fields drop in order:
/// kubelet first (it would recreate what the node's teardown removes), the node last.
struct Lab {
    kubelet: KubeletProcess,
    proxy: Option<ProxyProcess>,
    node: Node,
}

impl Lab {
    async fn start(side: Side, flags: &[&str]) -> Result<Lab> {
        let node = Node::start(NodeOptions::default()).await?;
        let proxy = match side {
            Side::Direct => None,
            Side::Dockhand => Some(ProxyProcess::start(&node, "").await?),
        };
        let socket = match &proxy {
            Some(proxy) => proxy.socket(),
            None => node.containerd_socket().to_path_buf(),
        };
        let kubelet = KubeletProcess::start(&node, &socket, flags).await?;
        Ok(Lab {
            kubelet,
            proxy,
            node,
        })
    }

    /// The containers of static pod `pod`'s container `name` that containerd itself lists.
    async fn containers(&self, pod: &str, name: &str) -> Result<Vec<cri::Container>> {
        let pod_name = format!("{pod}-{NODE_NAME}");
        let all = self.node.cri().await?.list_containers(None).await?;
        Ok(all
            .into_iter()
            .filter(|c| {
                c.labels.get("io.kubernetes.pod.name") == Some(&pod_name)
                    && c.labels
                        .get("io.kubernetes.container.name")
                        .map(String::as_str)
                        == Some(name)
            })
            .collect())
    }

    /// Waits until `check` holds for the containers of `pod`/`name`; returns them.
    async fn wait_containers(
        &self,
        pod: &str,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[cri::Container]) -> bool,
    ) -> Result<Vec<cri::Container>> {
        let deadline = Instant::now() + timeout;
        loop {
            let containers = self.containers(pod, name).await?;
            if check(&containers) {
                return Ok(containers);
            }
            if Instant::now() > deadline {
                bail!(
                    "{pod}/{name}: not {what} after {timeout:?}; containerd lists {containers:#?}\n{}",
                    self.logs_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until kubelet serves `pod`/`name`'s log (200) and `check` holds for it.
    async fn wait_log(
        &self,
        pod: &str,
        name: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, body) = self.kubelet.container_logs(pod, name, "")?;
            if code == 200 && check(&body) {
                return Ok(body);
            }
            if Instant::now() > deadline {
                bail!(
                    "{pod}/{name}: kubelet's log not as expected after {timeout:?}: {code} {body:?}\n{}",
                    self.logs_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// kubelet's and the proxy's last lines, for failure messages.
    fn logs_tail(&self) -> String {
        let proxy = self
            .proxy
            .as_ref()
            .map(|p| {
                p.log()
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        format!(
            "kubelet log tail:\n{}\nproxy log (newest first):\n{proxy}",
            self.kubelet.log_tail(25)
        )
    }
}

/// What kubelet answers (with HTTP 200, the text `kubectl logs` prints) when containerd no longer
/// knows the container: `unable to retrieve container logs for containerd://<id>`, and nothing else.
fn is_kubelet_log_error((code, body): &(u16, String)) -> bool {
    *code == 200
        && body.starts_with("unable to retrieve container logs for containerd://")
        && body.lines().count() == 1
}

fn exited(c: &cri::Container) -> bool {
    c.state == cri::ContainerState::ContainerExited as i32
}

fn running(c: &cri::Container) -> bool {
    c.state == cri::ContainerState::ContainerRunning as i32
}

/// node-exporter's shape: host `/` at `/rootfs`, read-only, no `mountPropagation` (kubelet sends
/// private propagation). A tmpfs the host mounts after the pod started shows its own size in the
/// pod through dockhand (Docker's rslave `/`), the root disk's size straight on containerd.
#[tokio::test(flavor = "multi_thread")]
async fn node_exporter_sees_a_later_host_mount_through_dockhand_only() -> Result<()> {
    let (direct, dockhand) = tokio::join!(
        later_mount_size_in_pod(Side::Direct),
        later_mount_size_in_pod(Side::Dockhand)
    );
    let (direct, dockhand) = (direct?, dockhand?);
    eprintln!(
        "node-exporter: /rootfs<tmpfs> in the pod: {} KiB through dockhand, {} KiB direct (root disk {} KiB)",
        dockhand.in_pod, direct.in_pod, direct.root_disk
    );
    const TMPFS_KIB: u64 = 8192;
    assert_eq!(
        dockhand.in_pod, TMPFS_KIB,
        "through dockhand the pod must see the tmpfs"
    );
    assert_eq!(
        direct.in_pod, direct.root_disk,
        "straight on containerd the pod sees the root disk, not the tmpfs (if this fails, the \
         lab no longer reproduces Docker's difference)"
    );
    assert_ne!(direct.in_pod, TMPFS_KIB);
    Ok(())
}

/// What a node-exporter-like pod printed: the size (KiB) of `/rootfs<dir>` after the host
/// mounted a tmpfs at `<dir>`, and the size of the host's filesystem under `<dir>` before that.
struct LaterMount {
    in_pod: u64,
    root_disk: u64,
}

async fn later_mount_size_in_pod(side: Side) -> Result<LaterMount> {
    let lab = Lab::start(side, &[]).await?;
    let later = lab.node.temp_dir().join("later");
    std::fs::create_dir_all(&later)?;
    let root_disk = df_kib(&later)?;
    let script = format!(
        "while true; do echo \"size $(df -Pk /rootfs{0} | awk 'NR==2{{print $2}}')\"; sleep 1; done",
        later.display()
    );
    let mut pod = static_pod("node-exporter", "exporter", &script, "Always");
    pod["spec"]["containers"][0]["volumeMounts"] =
        json!([{ "name": "root", "mountPath": "/rootfs", "readOnly": true }]);
    pod["spec"]["volumes"] = json!([{ "name": "root", "hostPath": { "path": "/" } }]);
    lab.kubelet.add_pod(&pod)?;
    let before = lab
        .wait_log(
            "node-exporter",
            "exporter",
            Duration::from_secs(90),
            |log| log.lines().any(|l| l.starts_with("size ")),
        )
        .await?;
    // The host mounts a filesystem once the pod runs (in the node's mount namespace, which is
    // the host's for everything on this node).
    let status = lab
        .node
        .ns_command("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "dockhand-later"])
        .arg(&later)
        .status()?;
    ensure!(status.success(), "mount tmpfs at {}", later.display());
    let seen = before.lines().count();
    let log = lab
        .wait_log(
            "node-exporter",
            "exporter",
            Duration::from_secs(60),
            |log| log.lines().count() >= seen + 3,
        )
        .await?;
    let last = log.lines().last().context("no line")?;
    let in_pod = last
        .strip_prefix("size ")
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("the pod printed {last:?}"))?;
    Ok(LaterMount { in_pod, root_disk })
}

/// `df -Pk <path>` on the host: the filesystem's size in KiB.
fn df_kib(path: &std::path::Path) -> Result<u64> {
    let output = Command::new("df").arg("-Pk").arg(path).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("df -Pk {}: {text}", path.display()))
}

/// A Job-like pod (restartPolicy Never) whose container kubelet garbage-collects: kubelet's
/// `/containerLogs` (`kubectl logs`) still serves its lines through dockhand, as with Docker's
/// json-file logs kept until the pod goes; straight on containerd it fails.
#[tokio::test(flavor = "multi_thread")]
async fn job_logs_after_kubelet_gc_through_dockhand_only() -> Result<()> {
    let (direct, dockhand) = tokio::join!(job_logs(Side::Direct), job_logs(Side::Dockhand));
    let (direct, dockhand) = (direct?, dockhand?);
    eprintln!(
        "job after GC: through dockhand {:?}, direct {:?}",
        dockhand.after_gc, direct.after_gc
    );
    const LINES: &str = "job line 1\njob line 2\njob line 3\n";
    assert_eq!(direct.before_gc, LINES, "kubelet serves the log before GC");
    assert_eq!(
        dockhand.before_gc, LINES,
        "kubelet serves the log before GC"
    );
    assert_eq!(dockhand.after_gc, (200, LINES.to_string()));
    assert!(
        is_kubelet_log_error(&direct.after_gc),
        "straight on containerd the log must be gone after GC (if this fails, the lab no longer \
         reproduces the problem): {:?}",
        direct.after_gc
    );
    Ok(())
}

#[derive(Debug)]
struct JobLogs {
    before_gc: String,
    after_gc: (u16, String),
}

async fn job_logs(side: Side) -> Result<JobLogs> {
    let lab = Lab::start(side, GC_EVERYTHING).await?;
    let script = "for i in 1 2 3; do echo \"job line $i\"; done";
    lab.kubelet
        .add_pod(&static_pod("job", "hello", script, "Never"))?;
    lab.wait_containers("job", "hello", "exited", Duration::from_secs(90), |c| {
        c.len() == 1 && exited(&c[0])
    })
    .await?;
    let before_gc = lab
        .wait_log("job", "hello", Duration::from_secs(30), |log| {
            log.lines().count() == 3
        })
        .await?;
    lab.wait_containers("job", "hello", "removed by kubelet", GC_WAIT, |c| {
        c.is_empty()
    })
    .await?;
    let after_gc = lab.kubelet.container_logs("job", "hello", "")?;
    Ok(JobLogs {
        before_gc,
        after_gc,
    })
}

/// A crash loop: `kubectl logs --previous` while kubelet waits out the back-off, after its GC
/// removed the earlier attempts. Through dockhand kubelet serves the previous attempt's lines;
/// straight on containerd it fails.
#[tokio::test(flavor = "multi_thread")]
async fn crash_loop_previous_after_kubelet_gc_through_dockhand_only() -> Result<()> {
    let (direct, dockhand) =
        tokio::join!(previous_logs(Side::Direct), previous_logs(Side::Dockhand));
    let (direct, dockhand) = (direct?, dockhand?);
    eprintln!("--previous after GC: through dockhand {dockhand:?}, direct {direct:?}");
    let (code, body) = &dockhand;
    assert_eq!(*code, 200, "{body}");
    let attempt: Vec<&str> = body.lines().collect();
    assert!(
        attempt.len() == 2 && attempt[0].starts_with("attempt ") && attempt[1] == "crashing",
        "one attempt's output: {body:?}"
    );
    assert!(
        is_kubelet_log_error(&direct),
        "straight on containerd --previous must fail once GC removed it (if this fails, the \
         lab no longer reproduces the problem): {direct:?}"
    );
    Ok(())
}

/// `?previous=true` at a moment when containerd lists no container of the crash loop, before and
/// after the request (kubelet in back-off, every earlier attempt removed): a sample that cannot
/// have been read from a container containerd still had.
async fn previous_logs(side: Side) -> Result<(u16, String)> {
    let lab = Lab::start(side, GC_EVERYTHING).await?;
    let script = "n=$(cat /state/n 2>/dev/null || echo 0); echo $((n+1)) > /state/n; \
                  echo \"attempt $n\"; echo crashing; exit 1";
    let mut pod = static_pod("crasher", "crash", script, "Always");
    pod["spec"]["containers"][0]["volumeMounts"] =
        json!([{ "name": "state", "mountPath": "/state" }]);
    pod["spec"]["volumes"] = json!([{ "name": "state", "emptyDir": {} }]);
    lab.kubelet.add_pod(&pod)?;
    lab.wait_containers(
        "crasher",
        "crash",
        "exited once",
        Duration::from_secs(90),
        |c| c.iter().any(exited),
    )
    .await?;
    // kubelet restarts the first crash at once, then backs off 10, 20, 40, 80 s; it collects
    // every minute, so within the first three minutes a collection lands in a back-off (in the
    // runs so far, the first one: attempt 3's 40 s).
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if lab.containers("crasher", "crash").await?.is_empty() {
            let answer = lab
                .kubelet
                .container_logs("crasher", "crash", "?previous=true")?;
            if lab.containers("crasher", "crash").await?.is_empty() {
                return Ok(answer);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{side:?}: never saw the crash loop in a back-off with its attempts removed\n{}",
                lab.logs_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// kubelet restarted while pods run: the pod keeps its container (same id, still running, not
/// restarted) and kubelet keeps serving its log, on both sides; through dockhand the log is still
/// archived when the pod is later deleted, with the lines written before and after the restart.
#[tokio::test(flavor = "multi_thread")]
async fn kubelet_restart_keeps_pods_and_archiving() -> Result<()> {
    let (direct, dockhand) = tokio::join!(
        restart_while_running(Side::Direct),
        restart_while_running(Side::Dockhand)
    );
    direct?;
    dockhand?;
    Ok(())
}

async fn restart_while_running(side: Side) -> Result<()> {
    let mut lab = Lab::start(side, GC_EVERYTHING).await?;
    let script = "i=0; while true; do echo \"tick $i\"; i=$((i+1)); sleep 1; done";
    lab.kubelet
        .add_pod(&static_pod("ticker", "tick", script, "Always"))?;
    let before = lab
        .wait_containers("ticker", "tick", "running", Duration::from_secs(90), |c| {
            c.len() == 1 && running(&c[0])
        })
        .await?;
    let id = before[0].id.clone();
    let ticks_before = lab
        .wait_log("ticker", "tick", Duration::from_secs(30), |log| {
            log.lines().count() >= 2
        })
        .await?
        .lines()
        .count();

    lab.kubelet.restart().await?;
    // Long enough for the new kubelet's first syncs (a wrongly restarted pod shows up here).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = lab.containers("ticker", "tick").await?;
    ensure!(
        after.len() == 1 && after[0].id == id && running(&after[0]),
        "{side:?}: the pod's container must be the same running one after kubelet's restart: \
         before {id}, after {after:#?}\n{}",
        lab.logs_tail()
    );
    // The same container's output, every tick once and in order, going on after the restart.
    let log = lab
        .wait_log("ticker", "tick", Duration::from_secs(30), |log| {
            log.lines().count() > ticks_before + 10
        })
        .await?;
    let expected: String = (0..log.lines().count())
        .map(|i| format!("tick {i}\n"))
        .collect();
    ensure!(
        log == expected,
        "{side:?}: ticker's log after the restart: {log:?}"
    );
    let last_tick = log.lines().last().unwrap_or_default().to_string();

    if side == Side::Direct {
        return Ok(());
    }
    // Deleting the pod: kubelet stops it and removes its container and log directory.
    lab.kubelet.remove_pod("ticker")?;
    lab.wait_containers("ticker", "tick", "removed by kubelet", GC_WAIT, |c| {
        c.is_empty()
    })
    .await?;
    let proxy = lab.proxy.as_ref().context("dockhand side")?;
    let archived = dockhand_logs(&proxy.config_path(), &id).await?;
    ensure!(
        archived.starts_with("tick 0\n") && archived.contains(&format!("{last_tick}\n")),
        "the archive must hold the ticks from before and after kubelet's restart (up to \
         {last_tick:?}): {archived:?}"
    );
    Ok(())
}

/// `dockhand logs --config <config> <id>` (waiting up to 30 s for the entry to be archived).
async fn dockhand_logs(config: &PathBuf, id: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new(proxy_binary()?)
            .arg("logs")
            .arg("--config")
            .arg(config)
            .arg(id)
            .output()?;
        if output.status.success() {
            return Ok(String::from_utf8(output.stdout)?);
        }
        if Instant::now() > deadline {
            bail!(
                "dockhand logs {id}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

//! The container log archive against the real containerd (issue 5): logs survive kubelet's
//! garbage collection, `dockhand logs` and `kubectl logs` (through ContainerStatus) read them
//! back, rotation, crashes, retention and hostile log trees.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use dockhand_integration::cri::{files_with_prefix, ContainerSpec, Cri, PodSpec};
use dockhand_integration::node::{Network, Node, NodeOptions};
use dockhand_integration::proxy::{proxy_binary, ProxyProcess};
use dockhand_integration::{read_messages, Version};
use dockhand_protos::cri;
use tonic::Code;

#[path = "archive/restored.rs"]
mod restored;

/// Where one test's archive lives (all inside the node's temp dir, on the pod logs' filesystem).
struct Dirs {
    archive: PathBuf,
    staging: PathBuf,
    restored: PathBuf,
}

fn archive_config(node: &Node, extra: &str) -> (String, Dirs) {
    archive_config_in(node, &node.temp_dir().join("archive"), 0, extra)
}

/// The archive in `archive` (staging and restored copies in the node's temp dir) with a
/// free-space floor of `min_free_percent`.
fn archive_config_in(
    node: &Node,
    archive: &Path,
    min_free_percent: u8,
    extra: &str,
) -> (String, Dirs) {
    let dirs = Dirs {
        archive: archive.to_path_buf(),
        staging: node.temp_dir().join("staging"),
        restored: node.temp_dir().join("restored"),
    };
    let toml = format!(
        "[archive]\ndir = \"{}\"\nstaging_dir = \"{}\"\nrestored_dir = \"{}\"\npod_logs_dir = \"{}\"\nmin_free_percent = {min_free_percent}\n{extra}\n",
        dirs.archive.display(),
        dirs.staging.display(),
        dirs.restored.display(),
        node.logs_root().display()
    );
    (toml, dirs)
}

/// `dockhand logs --dir <archive> <args>`; its stdout.
fn dockhand_logs(dirs: &Dirs, args: &[&str]) -> Result<String> {
    let output = Command::new(proxy_binary()?)
        .arg("logs")
        .arg("--dir")
        .arg(&dirs.archive)
        .args(args)
        .output()?;
    ensure!(
        output.status.success(),
        "dockhand logs {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `dockhand logs --json <args>`, parsed.
fn listed(dirs: &Dirs, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = dockhand_logs(dirs, &all)?;
    Ok(serde_json::from_str::<Vec<serde_json::Value>>(&text)?)
}

/// Waits until every id in `ids` is in the archive and complete.
async fn wait_archived(dirs: &Dirs, ids: &[String]) -> Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = listed(dirs, &[])?;
        let complete = ids.iter().all(|id| {
            entries
                .iter()
                .any(|e| e["id"] == id.as_str() && e["complete"] == true)
        });
        if complete {
            return Ok(entries);
        }
        if Instant::now() > deadline {
            bail!("not all of {ids:?} archived after 30 s; archive lists {entries:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every regular file under `dir` with its content.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    files
}

fn dir_bytes(dir: &Path) -> u64 {
    snapshot(dir).values().map(|v| v.len() as u64).sum()
}

/// A busybox container that prints `line 0` .. `line <n-1>`, pausing a second every `batch`.
fn counter(name: &str, n: u32, batch: u32) -> ContainerSpec {
    ContainerSpec::new(
        name,
        &[
            "sh",
            "-c",
            &format!(
                "i=0; while [ $i -lt {n} ]; do echo \"line $i\"; i=$((i+1)); \
                 if [ $((i % {batch})) -eq 0 ]; then sleep 1; fi; done"
            ),
        ],
    )
}

fn counter_lines(n: u32) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

const WAIT: Duration = Duration::from_secs(60);

/// The seed case: a Job's 20 containers print and exit, kubelet garbage-collects them all (its
/// exact removal sequence, then the pod log directory), and the logs are still there, for
/// `dockhand logs` and for kubelet through ContainerStatus, even after a repeated removal.
#[tokio::test(flavor = "multi_thread")]
async fn job_logs_survive_kubelet_garbage_collection() -> Result<()> {
    job_logs_survive_garbage_collection(Network::Host).await
}

#[tokio::test(flavor = "multi_thread")]
async fn job_logs_survive_kubelet_garbage_collection_in_cni_pods() -> Result<()> {
    job_logs_survive_garbage_collection(Network::Cni).await
}

async fn job_logs_survive_garbage_collection(network: Network) -> Result<()> {
    let node = Node::start(NodeOptions {
        network,
        ..NodeOptions::default()
    })
    .await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;

    // A bystander whose log must not be touched by any of this.
    let bystander_spec = PodSpec::new("bystander");
    let bystander = cri.run_pod(&bystander_spec).await?;
    cri.run_container(
        &bystander,
        &ContainerSpec::new("web", &["sh", "-c", "echo still here; sleep 3600"]),
    )
    .await?;
    let bystander_logs = bystander_spec.log_directory(node.logs_root());

    let mut job = PodSpec::new("hello-job");
    job.namespace = "batch".into();
    let pod = cri.run_pod(&job).await?;
    let mut ids = Vec::new();
    for attempt in 0..20 {
        let mut spec = ContainerSpec::new("hello", &["echo", "Hello, Kubernetes!"]);
        spec.attempt = attempt;
        ids.push(cri.run_container(&pod, &spec).await?);
    }
    for id in &ids {
        cri.wait_exited(id, WAIT).await?;
    }
    for id in &ids {
        cri.remove_container_like_kubelet(id).await?;
    }
    std::fs::remove_dir_all(job.log_directory(node.logs_root()))?;

    wait_archived(&dirs, &ids).await?;
    let entries = listed(&dirs, &["-n", "batch", "--pod", "hello-job"])?;
    assert_eq!(entries.len(), 20, "{entries:#?}");
    let mut attempts: Vec<u64> = entries
        .iter()
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    attempts.sort_unstable();
    assert_eq!(attempts, (0..20).collect::<Vec<u64>>());
    for entry in &entries {
        assert_eq!(entry["container"], "hello");
        assert_eq!(entry["exit_code"], 0);
        assert!(!entry["pod_uid"].as_str().unwrap().is_empty());
    }
    let table = dockhand_logs(&dirs, &["--namespace", "batch"])?;
    assert_eq!(table.lines().count(), 21, "{table}");
    for id in &ids {
        assert_eq!(dockhand_logs(&dirs, &[id])?, "Hello, Kubernetes!\n");
    }
    let stamped = dockhand_logs(&dirs, &["--timestamps", "--tail", "1", &ids[0]])?;
    let (time, message) = stamped.split_once(' ').context("no timestamp")?;
    assert!(time.starts_with("20") && time.ends_with('Z'), "{stamped}");
    assert_eq!(message, "Hello, Kubernetes!\n");

    // `kubectl logs` after GC: kubelet asks ContainerStatus and reads log_path itself.
    for id in &ids {
        let status = cri
            .container_status(id, false)
            .await?
            .status
            .context("no status")?;
        assert_eq!(status.id, *id);
        assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!(status.exit_code, 0);
        assert_eq!(status.metadata.as_ref().unwrap().name, "hello");
        assert!(status.created_at > 0 && status.finished_at > 0);
        assert!(!status.image_ref.is_empty());
        assert!(!status.image.as_ref().unwrap().image.is_empty());
        let path = PathBuf::from(&status.log_path);
        assert_eq!(path, dirs.restored.join(id).join("restored.log"));
        assert_eq!(read_messages(&path, "stdout")?, vec!["Hello, Kubernetes!"]);
        assert_eq!(files_with_prefix(&path)?, vec![path.clone()]);
    }
    // Archived ids stay invisible everywhere else.
    let live = cri.list_containers(None).await?;
    assert!(live.iter().all(|c| !ids.contains(&c.id)), "{live:?}");
    // StopContainer gets containerd's own answer for an id it does not know: NotFound on 1.6,
    // OK on 1.7 and 2.x (StopContainer became idempotent there).
    let unknown = node.cri().await?.stop_container(&"0".repeat(64), 1).await;
    let stop = cri.stop_container(&ids[0], 1).await;
    assert_eq!(
        stop.as_ref().map_err(|e| e.code()),
        unknown.as_ref().map_err(|e| e.code()),
        "{stop:?} vs containerd's {unknown:?}"
    );
    if node.containerd().version == Version::V1_6 {
        assert_eq!(stop.unwrap_err().code(), Code::NotFound);
    }
    let reopen = cri
        .runtime()
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reopen.code(), Code::NotFound, "{reopen:?}");

    // kubelet repeats the removal: its glob matches only the restored copy.
    let archive_before = snapshot(&dirs.archive);
    let bystander_before = snapshot(&bystander_logs);
    assert!(!bystander_before.is_empty());
    for id in &ids {
        let status = cri
            .container_status(id, false)
            .await?
            .status
            .context("no status")?;
        let matched = files_with_prefix(Path::new(&status.log_path))?;
        assert_eq!(matched, vec![dirs.restored.join(id).join("restored.log")]);
        for file in matched {
            std::fs::remove_file(file)?;
        }
        cri.container_status(id, false).await?;
        cri.remove_container(id).await?;
    }
    assert_eq!(
        snapshot(&dirs.archive),
        archive_before,
        "the archive changed"
    );
    assert_eq!(
        snapshot(&bystander_logs),
        bystander_before,
        "a bystander's log changed"
    );
    assert_eq!(listed(&dirs, &[])?.len(), 20);
    for id in &ids {
        let status = cri
            .container_status(id, false)
            .await?
            .status
            .context("no status")?;
        assert_eq!(
            read_messages(Path::new(&status.log_path), "stdout")?,
            vec!["Hello, Kubernetes!"]
        );
    }
    Ok(())
}

/// kubelet-style rotations of a running container: every line is archived once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn rotated_logs_are_archived_once_in_order() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let spec = PodSpec::new("rotating");
    let pod = cri.run_pod(&spec).await?;
    let id = cri
        .run_container(&pod, &counter("counter", 1200, 200))
        .await?;
    let log = spec.log_directory(node.logs_root()).join("counter/0.log");
    let mut rotated: Vec<PathBuf> = Vec::new();
    for n in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // kubelet: gzip older rotated files, rename 0.log aside, ReopenContainerLog.
        if let Some(previous) = rotated.last() {
            let gzip = Command::new("gzip").arg(previous).status()?;
            ensure!(gzip.success(), "gzip failed");
        }
        let aside = log.with_file_name(format!("0.log.20240101-00000{n}"));
        std::fs::rename(&log, &aside)?;
        cri.runtime()
            .reopen_container_log(cri::ReopenContainerLogRequest {
                container_id: id.clone(),
            })
            .await?;
        rotated.push(aside);
    }
    cri.wait_exited(&id, WAIT).await?;
    cri.remove_container_like_kubelet(&id).await?;
    std::fs::remove_dir_all(spec.log_directory(node.logs_root()))?;
    let entries = wait_archived(&dirs, std::slice::from_ref(&id)).await?;
    let entry = entries.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(entry["generations"], serde_json::json!([1, 2, 3, 4]));
    assert_eq!(dockhand_logs(&dirs, &[&id])?, counter_lines(1200));
    // Nothing is left in staging once archived.
    assert!(!dirs.staging.join(&id).exists());
    Ok(())
}

/// The proxy started by hand so that the archive worker stops at `stage` (test hook).
struct PausedProxy {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl PausedProxy {
    async fn start(node: &Node, toml: &str, stage: &str) -> Result<PausedProxy> {
        let dir = node.temp_dir().join("paused-proxy");
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("dockhand.sock");
        let config = dir.join("dockhand.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{}\"\ncontainerd = \"{}\"\n{toml}",
                socket.display(),
                node.containerd_socket().display()
            ),
        )?;
        let log = dir.join("dockhand.log");
        let out = OpenOptions::new().create(true).append(true).open(&log)?;
        let child = node
            .ns_command(proxy_binary()?)
            .arg("proxy")
            .arg("--config")
            .arg(&config)
            .env(dockhand::testing::PAUSE_ENV, stage)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            ensure!(Instant::now() < deadline, "paused proxy did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(PausedProxy { child, socket, log })
    }

    async fn wait_paused(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains("archive worker paused") {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the worker never paused; log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// kill -9 at `stage`, restart, and check the archive is complete with every line once.
async fn crash_at(stage: &str) -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let paused = PausedProxy::start(&node, &toml, stage).await?;
    let cri = Cri::connect(&paused.socket, node.info().clone()).await?;
    let spec = PodSpec::new("crashing");
    let pod = cri.run_pod(&spec).await?;
    let id = cri
        .run_container(&pod, &counter("counter", 500, 1000))
        .await?;
    cri.wait_exited(&id, WAIT).await?;
    cri.remove_container_like_kubelet(&id).await?;
    std::fs::remove_dir_all(spec.log_directory(node.logs_root()))?;
    paused.wait_paused().await?;
    paused.kill9();

    // The crash left the data staged (and, after compression, also committed).
    assert!(dirs.staging.join(&id).join("000001.log").is_file());
    let committed = listed(&dirs, &[])?;
    match stage {
        "before_compress" => assert!(committed.is_empty(), "{committed:#?}"),
        _ => {
            assert_eq!(committed.len(), 1);
            assert_eq!(committed[0]["complete"], false);
        }
    }

    let proxy = ProxyProcess::start(&node, &toml).await?;
    wait_archived(&dirs, std::slice::from_ref(&id)).await?;
    assert_eq!(dockhand_logs(&dirs, &[&id])?, counter_lines(500));
    let deadline = Instant::now() + Duration::from_secs(10);
    while dirs.staging.join(&id).exists() {
        ensure!(
            Instant::now() < deadline,
            "staging not cleaned after restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(proxy);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_between_staging_and_compression_loses_nothing() -> Result<()> {
    crash_at("before_compress").await
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_between_compression_and_cleanup_duplicates_nothing() -> Result<()> {
    crash_at("before_cleanup").await
}

/// A small `max_bytes`: the oldest containers are dropped first and the bound holds.
#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_the_oldest_and_keeps_the_bound() -> Result<()> {
    const MAX: u64 = 40_000;
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, &format!("max_bytes = {MAX}"));
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let spec = PodSpec::new("noisy");
    let pod = cri.run_pod(&spec).await?;
    let mut ids = Vec::new();
    for attempt in 0..6 {
        // About 16 KB of base64 noise: compresses to about 12 KB.
        let mut container = ContainerSpec::new(
            "noise",
            &["sh", "-c", "head -c 12000 /dev/urandom | base64"],
        );
        container.attempt = attempt;
        let id = cri.run_container(&pod, &container).await?;
        cri.wait_exited(&id, WAIT).await?;
        cri.remove_container_like_kubelet(&id).await?;
        ids.push(id);
        wait_archived(&dirs, &ids[ids.len() - 1..]).await?;
        let size = dir_bytes(&dirs.archive);
        assert!(
            size <= MAX,
            "archive is {size} bytes after {} containers",
            ids.len()
        );
    }
    let kept: Vec<String> = listed(&dirs, &[])?
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!kept.is_empty() && kept.len() < ids.len(), "kept {kept:?}");
    // The newest ones, in order.
    assert_eq!(kept, ids[ids.len() - kept.len()..].to_vec());
    let text = dockhand_logs(&dirs, &[ids.last().unwrap()])?;
    assert!(text.lines().count() > 100);
    Ok(())
}

/// Log paths that leave the pod's log directory, symlinks in the log tree and hostile ids are
/// refused, and nothing is written outside the archive's own directories.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_log_trees_are_refused() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let spec = PodSpec::new("hostile");
    let pod = cri.run_pod(&spec).await?;
    let log_directory = spec.log_directory(node.logs_root());

    // 1. A log path that climbs out of the pod's log directory.
    let mut config = cri
        .container_config(&spec, &ContainerSpec::new("escape", &["echo", "escaped"]))
        .await?;
    config.log_path = "../../escape.log".into();
    let escape = cri.create_container_config(&pod, config).await?;
    cri.start_container(&escape).await?;

    // 2. The container's log directory is a symlink to a directory outside.
    let outside = node.temp_dir().join("outside");
    std::fs::create_dir_all(&outside)?;
    std::os::unix::fs::symlink(&outside, log_directory.join("linked"))?;
    let linked = cri
        .run_container(&pod, &ContainerSpec::new("linked", &["echo", "linked"]))
        .await?;

    // 3. A normal container next to them is archived as usual.
    let normal = cri
        .run_container(&pod, &ContainerSpec::new("normal", &["echo", "normal"]))
        .await?;

    for id in [&escape, &linked, &normal] {
        cri.wait_exited(id, WAIT).await?;
    }
    for id in [&escape, &linked] {
        assert!(!dirs.staging.join(id).exists(), "{id} was staged");
    }
    let log = proxy.log();
    assert!(log.contains("not inside its pod's log directory"), "{log}");
    assert!(log.contains("without symlinks"), "{log}");
    // Only containerd's own file is outside; dockhand wrote nothing there.
    let outside_files: Vec<PathBuf> = snapshot(&outside).into_keys().collect();
    assert_eq!(outside_files, vec![outside.join("0.log")]);

    for id in [&escape, &linked, &normal] {
        cri.remove_container_like_kubelet(id).await?;
    }
    wait_archived(&dirs, std::slice::from_ref(&normal)).await?;
    assert_eq!(dockhand_logs(&dirs, &[&normal])?, "normal\n");
    let ids: Vec<String> = listed(&dirs, &[])?
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![normal.clone()]);

    // 4. Hostile ids through the proxy: containerd's NotFound, and nothing created anywhere.
    let before = (
        snapshot(&dirs.archive),
        snapshot(&dirs.staging),
        snapshot(&dirs.restored),
    );
    for hostile in ["../../../etc/passwd", "*", "..", "a/b", &"a".repeat(300)] {
        let status = cri.container_status(hostile, false).await.unwrap_err();
        assert_ne!(status.code(), Code::Ok);
        let _ = cri.remove_container(hostile).await;
    }
    let after = (
        snapshot(&dirs.archive),
        snapshot(&dirs.staging),
        snapshot(&dirs.restored),
    );
    assert_eq!(before, after);
    assert!(!node.temp_dir().join("etc").exists());
    Ok(())
}

/// Free space (available, total) in bytes of the filesystem at `path`, as seen in the node's
/// mount namespace (where the proxy runs).
fn free_space(node: &Node, path: &Path) -> Result<(u64, u64)> {
    let out = node
        .ns_command("stat")
        .args(["-f", "-c", "%a %b %S"])
        .arg(path)
        .output()?;
    ensure!(out.status.success(), "stat -f failed");
    let text = String::from_utf8(out.stdout)?;
    let n: Vec<u64> = text
        .split_whitespace()
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?;
    ensure!(n.len() == 3, "stat -f said {text:?}");
    Ok((n[0] * n[2], n[1] * n[2]))
}

/// `dockhand logs --json` run inside the node's mount namespace (where a filesystem mounted
/// there, and the proxy, live).
fn listed_in_node(node: &Node, dirs: &Dirs) -> Result<Vec<serde_json::Value>> {
    let out = node
        .ns_command(proxy_binary()?)
        .args(["logs", "--json", "--dir"])
        .arg(&dirs.archive)
        .output()?;
    ensure!(
        out.status.success(),
        "dockhand logs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The archive on a small filesystem of its own: the free-space floor drops the oldest
/// containers, keeps the newest, and the floor holds once retention has run.
#[tokio::test(flavor = "multi_thread")]
async fn free_space_floor_drops_the_oldest() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let small = node.temp_dir().join("small");
    std::fs::create_dir(&small)?;
    let mounted = node
        .ns_command("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "archive-fs"])
        .arg(&small)
        .status()?
        .success();
    ensure!(mounted, "mount tmpfs");
    let (toml, dirs) = archive_config_in(&node, &small.join("archive"), 50, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("big-jobs")).await?;
    let mut ids = Vec::new();
    for attempt in 0..6 {
        // About 200 KB of base64 noise each: about 150 KB compressed, 15% of the filesystem.
        let mut container = ContainerSpec::new(
            "noise",
            &["sh", "-c", "head -c 150000 /dev/urandom | base64"],
        );
        container.attempt = attempt;
        let id = cri.run_container(&pod, &container).await?;
        cri.wait_exited(&id, WAIT).await?;
        cri.remove_container_like_kubelet(&id).await?;
        ids.push(id);
    }
    // The last one is archived and retention has made room again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (free, total) = loop {
        let entries = listed_in_node(&node, &dirs)?;
        let last_in = entries
            .iter()
            .any(|e| e["id"] == ids[ids.len() - 1].as_str() && e["complete"] == true);
        let (free, total) = free_space(&node, &small)?;
        if last_in && free * 2 >= total {
            break (free, total);
        }
        ensure!(
            Instant::now() < deadline,
            "after 30 s: {free} of {total} bytes free, archive lists {entries:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(free * 2 >= total, "{free} of {total} bytes free");
    let kept: Vec<String> = listed_in_node(&node, &dirs)?
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !kept.is_empty() && kept.len() < ids.len(),
        "kept {kept:?} of {ids:?}"
    );
    assert_eq!(
        kept,
        ids[ids.len() - kept.len()..].to_vec(),
        "the newest are kept, in order"
    );
    let _ = node.ns_command("umount").arg(&small).status();
    Ok(())
}

// ---- issue 11: a log archive that cannot destroy itself ---------------------------------------

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The value of one sample on the proxy's `/metrics` (0 when absent).
fn metric(port: u16, sample: &str) -> Result<f64> {
    let text = dockhand_integration::proxy::http_get(port, "/metrics")?;
    Ok(text
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0))
}

/// `dockhand logs --dir <archive> <args>` inside the node's mount namespace; its stdout.
fn logs_in_node(node: &Node, dirs: &Dirs, args: &[&str]) -> Result<String> {
    let out = node
        .ns_command(proxy_binary()?)
        .args(["logs", "--dir"])
        .arg(&dirs.archive)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "dockhand logs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Mounts a tmpfs of `size` at `dir` (created) inside the node's mount namespace: it vanishes
/// with the node.
fn mount_tmpfs(node: &Node, dir: &Path, size: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mounted = node
        .ns_command("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "archive-fs"])
        .arg(dir)
        .status()?
        .success();
    ensure!(mounted, "mount tmpfs at {}", dir.display());
    Ok(())
}

/// `bytes` of CRI log lines that do not compress (base64 of a xorshift stream).
fn incompressible_lines(bytes: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(bytes + 200);
    while out.len() < bytes {
        out.extend_from_slice(b"2026-12-01T00:00:00.000000000Z stdout F ");
        for _ in 0..120 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(ALPHABET[(x >> 58) as usize]);
        }
        out.push(b'\n');
    }
    out
}

/// Issue 11.1: the archive on a 16 MiB filesystem, three small containers archived, then one
/// with a 50 MB log. The big one fails alone: the small ones stay, nothing partial is left,
/// the loss is counted, its staged link is released, later containers are archived, and a
/// restart does not try again.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_that_cannot_fit_fails_alone_and_the_archive_stays() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let small = node.temp_dir().join("small");
    mount_tmpfs(&node, &small, "16m")?;
    let port = free_port()?;
    let (toml, dirs) = archive_config_in(&node, &small.join("archive"), 15, "");
    let toml = format!("metrics_address = \"127.0.0.1:{port}\"\n{toml}");
    let mut proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let spec = PodSpec::new("filler");
    let pod = cri.run_pod(&spec).await?;
    let archived = |ids: &[String]| -> Result<Vec<serde_json::Value>> {
        let entries: Vec<serde_json::Value> = listed_in_node(&node, &dirs)?;
        Ok(entries
            .into_iter()
            .filter(|e| e["complete"] == true && ids.iter().any(|id| e["id"] == id.as_str()))
            .collect())
    };
    let wait_in_node = |ids: Vec<String>| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while archived(&ids)?.len() < ids.len() {
            ensure!(Instant::now() < deadline, "{ids:?} not archived after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, anyhow::Error>(())
    };
    let mut small_ids = Vec::new();
    for attempt in 0..3 {
        let mut container =
            ContainerSpec::new("small", &["sh", "-c", &format!("echo small {attempt}")]);
        container.attempt = attempt;
        let id = cri.run_container(&pod, &container).await?;
        cri.wait_exited(&id, WAIT).await?;
        cri.remove_container_like_kubelet(&id).await?;
        small_ids.push(id);
    }
    wait_in_node(small_ids.clone()).await?;

    // The big one "wrote" 50 MB that does not compress, appended as the runtime would.
    let big = cri
        .run_container(&pod, &ContainerSpec::new("big", &["echo", "big"]))
        .await?;
    let status = cri.wait_exited(&big, WAIT).await?;
    let mut file = OpenOptions::new().append(true).open(&status.log_path)?;
    std::io::Write::write_all(&mut file, &incompressible_lines(50_000_000))?;
    drop(file);
    cri.remove_container_like_kubelet(&big).await?;

    // The staged 50 MB link is released from the pod logs' filesystem.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dirs.staging.join(&big).exists() {
        ensure!(
            Instant::now() < deadline,
            "the big log is still staged after 30 s; proxy log:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(
            port,
            "dockhand_archive_lost_logs_total{reason=\"no_space\"}"
        )?,
        1.0
    );
    assert_eq!(
        metric(
            port,
            "dockhand_archive_dropped_containers_total{reason=\"min_free\"}"
        )?,
        0.0
    );
    // The three small ones are all still there, whole; nothing of the big one is.
    assert_eq!(
        archived(&small_ids)?.len(),
        3,
        "{:#?}",
        listed_in_node(&node, &dirs)?
    );
    for (n, id) in small_ids.iter().enumerate() {
        assert_eq!(logs_in_node(&node, &dirs, &[id])?, format!("small {n}\n"));
    }
    assert!(
        listed_in_node(&node, &dirs)?
            .iter()
            .all(|e| e["id"] != big.as_str()),
        "the big one is listed"
    );
    let (free, total) = free_space(&node, &small)?;
    assert!(
        free * 10 >= total * 9,
        "{free} of {total} bytes free: a partial file is left"
    );

    // Later containers are archived as usual.
    let later = cri
        .run_container(&pod, &ContainerSpec::new("later", &["echo", "later"]))
        .await?;
    cri.wait_exited(&later, WAIT).await?;
    cri.remove_container_like_kubelet(&later).await?;
    wait_in_node(vec![later.clone()]).await?;
    assert_eq!(logs_in_node(&node, &dirs, &[&later])?, "later\n");

    // A restart finds nothing to retry and drops nothing.
    let before = listed_in_node(&node, &dirs)?;
    proxy.restart().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(listed_in_node(&node, &dirs)?, before);
    assert!(!dirs.staging.join(&big).exists());
    let log = proxy.log();
    assert_eq!(
        log.matches("no room in the archive").count(),
        1,
        "the big log was tried again:\n{log}"
    );
    assert!(!log.contains("reason=\"min_free\""), "{log}");
    let _ = node.ns_command("umount").arg(&small).status();
    Ok(())
}

/// Issue 11.2: the proxy killed between RemoveContainer and finalisation; the archived entry
/// and kubelet's answer keep the exit code, reason and finish time containerd reported.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_remove_keeps_the_exit_status() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let paused = PausedProxy::start(&node, &toml, "before_compress").await?;
    let cri = Cri::connect(&paused.socket, node.info().clone()).await?;
    let spec = PodSpec::new("failing");
    let pod = cri.run_pod(&spec).await?;
    let id = cri
        .run_container(
            &pod,
            &ContainerSpec::new("failing", &["sh", "-c", "echo about to fail; exit 5"]),
        )
        .await?;
    let exited = cri.wait_exited(&id, WAIT).await?;
    assert_eq!(exited.exit_code, 5);
    cri.remove_container_like_kubelet(&id).await?;
    std::fs::remove_dir_all(spec.log_directory(node.logs_root()))?;
    paused.wait_paused().await?;
    paused.kill9();

    let proxy = ProxyProcess::start(&node, &toml).await?;
    let entries = wait_archived(&dirs, std::slice::from_ref(&id)).await?;
    let entry = entries.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(entry["exit_code"], 5, "{entry:#}");
    assert_eq!(dockhand_logs(&dirs, &[&id])?, "about to fail\n");
    let status = proxy
        .cri()
        .await?
        .container_status(&id, false)
        .await?
        .status
        .context("no status")?;
    assert_eq!(status.exit_code, 5);
    assert_eq!(status.reason, exited.reason);
    assert_eq!(status.finished_at, exited.finished_at);
    Ok(())
}

/// Issue 11.3: staging on a bind mount of the pod logs' own filesystem (equal `st_dev`, but
/// hard links fail across mounts): the proxy refuses to start and names both paths and mounts.
#[tokio::test(flavor = "multi_thread")]
async fn staging_on_another_mount_of_the_same_filesystem_is_refused() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let source = node.temp_dir().join("bind-source");
    let bound = node.temp_dir().join("bind");
    std::fs::create_dir_all(&source)?;
    std::fs::create_dir_all(&bound)?;
    let mounted = node
        .ns_command("mount")
        .arg("--bind")
        .arg(&source)
        .arg(&bound)
        .status()?
        .success();
    ensure!(mounted, "bind mount");
    let staging = bound.join("staging");
    let toml = format!(
        "[archive]\ndir = \"{}\"\nstaging_dir = \"{}\"\nrestored_dir = \"{}\"\npod_logs_dir = \"{}\"\nmin_free_percent = 0\n",
        node.temp_dir().join("archive").display(),
        staging.display(),
        node.temp_dir().join("restored").display(),
        node.logs_root().display()
    );
    let started = ProxyProcess::start(&node, &toml).await;
    let Err(error) = started else {
        bail!("the proxy started with staging on another mount");
    };
    let text = format!("{error:#}");
    assert!(text.contains("cannot hard-link"), "{text}");
    assert!(text.contains(&staging.display().to_string()), "{text}");
    assert!(
        text.contains(&node.logs_root().display().to_string()),
        "{text}"
    );
    assert!(
        text.contains(&format!("mount {}", bound.display())),
        "{text}"
    );
    assert!(
        text.contains("exited with exit status: 64") || text.contains("exited with"),
        "{text}"
    );
    let _ = node.ns_command("umount").arg(&bound).status();
    Ok(())
}

/// Issue 11.4: a pod removed with RemovePodSandbox only (as critest does): its containers are
/// archived at once, with their exit codes, not by the 5-minute reconciliation.
#[tokio::test(flavor = "multi_thread")]
async fn removing_a_pod_archives_its_containers_at_once() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let spec = PodSpec::new("removed-whole");
    let pod = cri.run_pod(&spec).await?;
    let one = cri
        .run_container(&pod, &ContainerSpec::new("one", &["sh", "-c", "echo one"]))
        .await?;
    let two = cri
        .run_container(
            &pod,
            &ContainerSpec::new("two", &["sh", "-c", "echo two; exit 3"]),
        )
        .await?;
    for id in [&one, &two] {
        cri.wait_exited(id, WAIT).await?;
    }
    cri.stop_pod(&pod.id).await?;
    cri.remove_pod(&pod.id).await?;
    std::fs::remove_dir_all(spec.log_directory(node.logs_root()))?;
    let entries = wait_archived(&dirs, &[one.clone(), two.clone()]).await?;
    let exit = |id: &str| entries.iter().find(|e| e["id"] == id).unwrap()["exit_code"].clone();
    assert_eq!(exit(&one), 0);
    assert_eq!(exit(&two), 3);
    assert_eq!(dockhand_logs(&dirs, &[&one])?, "one\n");
    assert_eq!(dockhand_logs(&dirs, &[&two])?, "two\n");
    let status = cri
        .container_status(&two, false)
        .await?
        .status
        .context("no status")?;
    assert_eq!(status.exit_code, 3);
    assert_eq!(
        read_messages(Path::new(&status.log_path), "stdout")?,
        vec!["two"]
    );
    Ok(())
}

/// Issue 11.6: ContainerStatus for a container dockhand saw removed is answered from the archive
/// without asking containerd (which logs an error for each); ids it did not see removed are
/// still asked.
#[tokio::test(flavor = "multi_thread")]
async fn statuses_of_removed_containers_do_not_ask_containerd() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let spec = PodSpec::new("asked-often");
    let pod = cri.run_pod(&spec).await?;
    let id = cri
        .run_container(&pod, &ContainerSpec::new("done", &["echo", "done"]))
        .await?;
    cri.wait_exited(&id, WAIT).await?;
    cri.remove_container_like_kubelet(&id).await?;
    wait_archived(&dirs, std::slice::from_ref(&id)).await?;
    let mentions = |id: &str| node.containerd_log().matches(id).count();
    let before = mentions(&id);
    for _ in 0..50 {
        let status = cri
            .container_status(&id, false)
            .await?
            .status
            .context("no status")?;
        assert_eq!(status.id, id);
        assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mentions(&id),
        before,
        "containerd was asked about a removed container:\n{}",
        node.containerd_log_tail(10)
    );
    // An id dockhand never saw is containerd's to answer.
    let unknown = "e".repeat(64);
    let error = cri.container_status(&unknown, false).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    Ok(())
}

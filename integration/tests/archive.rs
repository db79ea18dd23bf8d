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
            .env(dockhand::archive::PAUSE_ENV, stage)
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

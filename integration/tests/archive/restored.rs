//! The restored copies handed to kubelet (issues 11.5, 23 and 24): bounded and cleaned, and a
//! path handed out stays readable until it is read, whatever is archived, served or evicted
//! beside it.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use dockhand_integration::cri::{files_with_prefix, ContainerSpec, Cri, Pod, PodSpec};
use dockhand_integration::node::{Node, NodeOptions};
use dockhand_integration::proxy::ProxyProcess;
use dockhand_integration::read_messages;

use super::{
    archive_config, counter, counter_lines, dir_bytes, free_port, metric, wait_archived, WAIT,
};

/// Runs a container that prints `lines` numbered lines, waits for it to exit and removes it the
/// way kubelet does; returns its id (not waiting for the archive).
async fn finished_and_removed(cri: &Cri, pod: &Pod, attempt: u32, lines: u32) -> Result<String> {
    let mut spec = counter("job", lines, lines);
    spec.attempt = attempt;
    let id = cri.run_container(pod, &spec).await?;
    cri.wait_exited(&id, WAIT).await?;
    cri.remove_container_like_kubelet(&id).await?;
    Ok(id)
}

/// ContainerStatus of an archived container, then its log read at once at the returned path, as
/// kubelet's `GetContainerLogs` does: the lines, or what went wrong.
async fn read_as_kubelet(cri: &Cri, id: &str) -> Result<Vec<String>> {
    let status = cri
        .container_status(id, false)
        .await
        .with_context(|| format!("ContainerStatus {id}"))?
        .status
        .context("ContainerStatus without status")?;
    read_messages(Path::new(&status.log_path), "stdout")
        .with_context(|| format!("read {} (container {id})", status.log_path))
}

fn lines_of(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

/// kubelet's removal glob over the copies it was handed: the next status must write them anew.
async fn delete_copies(cri: &Cri, ids: &[String]) -> Result<()> {
    for id in ids {
        let status = cri
            .container_status(id, false)
            .await?
            .status
            .context("no status")?;
        for file in files_with_prefix(Path::new(&status.log_path))? {
            std::fs::remove_file(file)?;
        }
    }
    Ok(())
}

/// Issue 23 (`make demo` failed 4 runs in 10): archived logs are served while other containers
/// finish and are archived. Every archive ran the worker's cleanup of restored copies, which
/// removed a copy being written (its directory had no `restored.log` yet) and the caller got
/// containerd's NotFound. Each copy is written anew for every read (kubelet deletes what it was
/// handed), so copies are being written whenever the cleanup runs.
#[tokio::test(flavor = "multi_thread")]
async fn archived_logs_are_served_while_other_containers_are_archived() -> Result<()> {
    const ROUNDS: u32 = 3;
    const FINISHING: u32 = 8;
    const LINES: u32 = 20_000;
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("many-jobs")).await?;
    let mut archived = Vec::new();
    for attempt in 0..3 {
        archived.push(finished_and_removed(&cri, &pod, attempt, LINES).await?);
    }
    let archived = archived;
    wait_archived(&dirs, &archived).await?;
    let expected = lines_of(&counter_lines(LINES));
    let mut attempt = 100;
    let mut reads = 0;
    for round in 0..ROUNDS {
        // Containers that finish while the archived ones are read: each archive runs a cleanup.
        let mut finishing = Vec::new();
        for _ in 0..FINISHING {
            let mut spec = counter("job", 50, 50);
            spec.attempt = attempt;
            attempt += 1;
            let id = cri.run_container(&pod, &spec).await?;
            finishing.push(id);
        }
        for id in &finishing {
            cri.wait_exited(id, WAIT).await?;
        }
        let remover = {
            let cri = cri.clone();
            let finishing = finishing.clone();
            tokio::spawn(async move {
                for id in &finishing {
                    cri.remove_container_like_kubelet(id).await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                anyhow::Ok(())
            })
        };
        let mut readers = Vec::new();
        for id in archived.clone() {
            let (cri, expected) = (cri.clone(), expected.clone());
            let remover_done = remover.abort_handle();
            readers.push(tokio::spawn(async move {
                let mut reads = 0;
                while !remover_done.is_finished() || reads == 0 {
                    let lines = read_as_kubelet(&cri, &id)
                        .await
                        .with_context(|| format!("round {round}, read {reads}"))?;
                    ensure!(
                        lines == expected,
                        "round {round}: {id} served {} lines",
                        lines.len()
                    );
                    delete_copies(&cri, std::slice::from_ref(&id)).await?;
                    reads += 1;
                }
                anyhow::Ok(reads)
            }));
        }
        remover.await??;
        for reader in readers {
            reads += reader.await??;
        }
        wait_archived(&dirs, &finishing).await?;
    }
    eprintln!(
        "{reads} reads of archived logs beside {} archived containers",
        ROUNDS * FINISHING
    );
    ensure!(reads >= (ROUNDS * 3) as usize);
    Ok(())
}

/// Issue 24.1: parallel first reads at the default config, nothing else running: each request
/// writes a copy the others' cleanups must not remove.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_first_reads_each_get_their_log() -> Result<()> {
    const CONTAINERS: u32 = 6;
    const BURSTS: u32 = 8;
    const LINES: u32 = 5_000;
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("parallel-reads")).await?;
    let mut ids = Vec::new();
    for attempt in 0..CONTAINERS {
        ids.push(finished_and_removed(&cri, &pod, attempt, LINES).await?);
    }
    wait_archived(&dirs, &ids).await?;
    let expected = lines_of(&counter_lines(LINES));
    // The worker is idle: only the readers touch the restored copies.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for burst in 0..BURSTS {
        let reads: Vec<_> = ids
            .iter()
            .map(|id| {
                let (cri, id) = (cri.clone(), id.clone());
                tokio::spawn(async move { read_as_kubelet(&cri, &id).await })
            })
            .collect();
        for (read, id) in reads.into_iter().zip(&ids) {
            let lines = read.await?.with_context(|| format!("burst {burst}"))?;
            ensure!(
                lines == expected,
                "burst {burst}: {id} served {} lines",
                lines.len()
            );
        }
        // kubelet deleted what it was handed: the next burst's reads are first reads again.
        delete_copies(&cri, &ids).await?;
    }
    Ok(())
}

/// Issue 24.2: with a bound smaller than one copy, every path handed out is still there when the
/// caller reads it, parallel readers and the worker's cleanup after a new archive included; the
/// bound is exceeded while leases hold, and the metrics say so.
#[tokio::test(flavor = "multi_thread")]
async fn a_path_handed_out_stays_readable_under_a_tiny_bound() -> Result<()> {
    const CONTAINERS: u32 = 4;
    const READERS: usize = 8;
    const ROUNDS: usize = 15;
    const LINES: u32 = 1_200;
    let port = free_port()?;
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "restored_max_bytes = 1024");
    let toml = format!("metrics_address = \"127.0.0.1:{port}\"\n{toml}");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("tiny-bound")).await?;
    let mut ids = Vec::new();
    for attempt in 0..CONTAINERS {
        ids.push(finished_and_removed(&cri, &pod, attempt, LINES).await?);
    }
    wait_archived(&dirs, &ids).await?;
    let expected = lines_of(&counter_lines(LINES));
    for round in 0..ROUNDS {
        let reads: Vec<_> = (0..READERS)
            .map(|n| {
                let (cri, id) = (cri.clone(), ids[n % ids.len()].clone());
                tokio::spawn(async move { read_as_kubelet(&cri, &id).await })
            })
            .collect();
        for (n, read) in reads.into_iter().enumerate() {
            let lines = read
                .await?
                .with_context(|| format!("round {round}, reader {n}"))?;
            ensure!(
                lines == expected,
                "round {round}, reader {n}: {} lines",
                lines.len()
            );
        }
    }
    let copies = dir_bytes(&dirs.restored);
    ensure!(copies > 1024, "the leased copies take {copies} bytes");
    assert_eq!(
        metric(port, "dockhand_archive_restored_leased")?,
        CONTAINERS as f64
    );
    let over = metric(port, "dockhand_archive_restored_over_bound_bytes")?;
    ensure!(
        over > 0.0,
        "over_bound_bytes is {over} with {copies} bytes of leased copies"
    );
    // A copy served alone, then another container archived: the worker's cleanup spares it.
    let served = cri
        .container_status(&ids[0], false)
        .await?
        .status
        .context("no status")?;
    let newer = finished_and_removed(&cri, &pod, 50, 10).await?;
    wait_archived(&dirs, std::slice::from_ref(&newer)).await?;
    let lines = read_messages(Path::new(&served.log_path), "stdout")
        .context("a leased copy was removed by the worker's cleanup")?;
    assert_eq!(lines, expected);
    Ok(())
}

/// Issue 11.5: restored copies stay within `restored_max_bytes` once their leases end (least
/// recently used go first), a repeated removal leaves no copy behind, and a restart removes what
/// an earlier run left.
#[tokio::test(flavor = "multi_thread")]
async fn restored_copies_are_bounded_and_cleaned() -> Result<()> {
    const BOUND: u64 = 100_000;
    const LEASE: Duration = Duration::from_secs(1);
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(
        &node,
        &format!(
            "restored_max_bytes = {BOUND}\nrestored_lease_seconds = {}",
            LEASE.as_secs()
        ),
    );
    let mut proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("restored")).await?;
    let mut ids = Vec::new();
    for attempt in 0..5 {
        // About 40 KB of log each (30 KB of base64 plus the CRI prefixes).
        let mut container = ContainerSpec::new(
            "noise",
            &["sh", "-c", "head -c 22000 /dev/urandom | base64"],
        );
        container.attempt = attempt;
        let id = cri.run_container(&pod, &container).await?;
        cri.wait_exited(&id, WAIT).await?;
        cri.remove_container_like_kubelet(&id).await?;
        ids.push(id);
    }
    wait_archived(&dirs, &ids).await?;
    for id in &ids {
        // The copies served before are no longer leased.
        tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
        let status = cri
            .container_status(id, false)
            .await?
            .status
            .context("no status")?;
        // The copy being served is always there, whole.
        let lines = read_messages(Path::new(&status.log_path), "stdout")?;
        assert!(lines.len() > 300, "{} lines", lines.len());
        let size = dir_bytes(&dirs.restored);
        assert!(
            size <= BOUND,
            "restored copies take {size} bytes (bound {BOUND})"
        );
    }
    // The most recently served is kept; the first ones were evicted.
    assert!(dirs
        .restored
        .join(ids.last().unwrap())
        .join("restored.log")
        .is_file());
    assert!(!dirs.restored.join(&ids[0]).exists());
    // kubelet repeats a removal: nothing of the copy is left once its lease has ended.
    let last = ids.last().unwrap();
    let status = cri
        .container_status(last, false)
        .await?
        .status
        .context("no status")?;
    for file in files_with_prefix(Path::new(&status.log_path))? {
        std::fs::remove_file(file)?;
    }
    cri.container_status(last, false).await?;
    let _ = cri.remove_container(last).await;
    let deadline = std::time::Instant::now() + LEASE + Duration::from_secs(5);
    while dirs.restored.join(last).exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !dirs.restored.join(last).exists(),
        "a restored copy is left behind after its lease ended"
    );
    // Leftovers of an earlier run: a copy of a container not archived, a half-written copy.
    let stray = dirs.restored.join("f".repeat(64));
    std::fs::create_dir_all(&stray)?;
    std::fs::write(stray.join("restored.log"), "stray\n")?;
    std::fs::create_dir_all(dirs.restored.join(&ids[2]))?;
    std::fs::write(dirs.restored.join(&ids[2]).join(".tmp.copy.1.1"), "half")?;
    proxy.restart().await?;
    assert!(!stray.exists(), "a stray copy survived the restart");
    assert!(
        !dirs.restored.join(&ids[2]).exists(),
        "a half-written copy survived"
    );
    Ok(())
}

/// Issue 24 (seen beside): a container another CRI client created, without kubelet's
/// `io.kubernetes.pod.*` labels, is archived under the pod its sandbox's metadata names, not as
/// `pod=/`.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_without_kubelet_labels_is_archived_under_its_pod() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (toml, dirs) = archive_config(&node, "");
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let cri = proxy.cri().await?;
    let mut spec = PodSpec::new("unlabelled");
    spec.namespace = "tools".into();
    let pod = cri.run_pod(&spec).await?;
    let mut config = cri
        .container_config(&pod.spec, &counter("probe", 3, 3))
        .await?;
    config
        .labels
        .retain(|key, _| !key.starts_with("io.kubernetes."));
    let id = cri.create_container_config(&pod, config).await?;
    cri.start_container(&id).await?;
    cri.wait_exited(&id, WAIT).await?;
    cri.remove_container_like_kubelet(&id).await?;
    let entries = wait_archived(&dirs, std::slice::from_ref(&id)).await?;
    let entry = entries
        .iter()
        .find(|e| e["id"] == id.as_str())
        .context("not listed")?;
    assert_eq!(entry["namespace"], "tools", "{entry:#}");
    assert_eq!(entry["pod"], "unlabelled", "{entry:#}");
    assert_eq!(entry["pod_uid"], spec.uid.as_str(), "{entry:#}");
    Ok(())
}

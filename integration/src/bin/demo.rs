//! `make demo`: a sandboxed containerd with dockhand in front of it, doing its job on one node.
//! Everything it starts is stopped and removed when it ends.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use dockhand_integration::cri::{ContainerSpec, Cri, PodSpec};
use dockhand_integration::node::{Node, NodeOptions};
use dockhand_integration::proxy::{http_get, ProxyProcess};
use dockhand_protos::cri;

fn step(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

async fn sh(cri: &Cri, id: &str, script: &str) -> Result<String> {
    let out = cri.exec_sync(id, &["sh", "-c", script], 20).await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Runs the `dockhand` command line and shows what it printed.
fn dockhand(bin: &Path, args: &[&OsStr]) -> Result<()> {
    let out = Command::new(bin).args(args).output()?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::main]
async fn main() -> Result<()> {
    // dockhand's shim, installed in a directory of its own with its records kept there too.
    let shim_dir = tempfile::Builder::new()
        .prefix("dockhand-shim-")
        .tempdir_in("/tmp")?;
    let shim = shim_dir.path().join("containerd-shim-dockhand-v2");
    std::fs::copy(
        dockhand_integration::fixtures::target_dir().join("debug/containerd-shim-dockhand-v2"),
        &shim,
    )
    .context("the shim binary (make build builds it)")?;
    let records = shim_dir.path().join("records");
    std::fs::write(
        shim_dir.path().join("containerd-shim-dockhand-v2.json"),
        format!("{{\"recordDir\": \"{}\"}}", records.display()),
    )?;

    step("starting a sandboxed containerd (its own mount namespace, \"/\" rshared as on a systemd node, dockhand's shim as the runc runtime)");
    let node = Node::start(NodeOptions {
        runtime_path: Some(shim.clone()),
        ..NodeOptions::default()
    })
    .await?;
    println!("containerd socket: {}", node.containerd_socket().display());

    step("starting dockhand proxy in front of it");
    let port = free_port()?;
    let proxy = ProxyProcess::start(
        &node,
        &format!(
            "metrics_address = \"127.0.0.1:{port}\"\ncgroup_records = \"{}\"",
            records.display()
        ),
    )
    .await?;
    println!(
        "kubelet would use --container-runtime-endpoint=unix://{}",
        proxy.socket().display()
    );
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;

    step("node-exporter style pods: hostPath / at /rootfs, mountPropagation None");
    let mount = cri::Mount {
        host_path: "/".into(),
        container_path: "/rootfs".into(),
        readonly: true,
        propagation: cri::MountPropagation::PropagationPrivate as i32,
        ..Default::default()
    };
    let mut spec = ContainerSpec::sleeper("node-exporter");
    spec.mounts = vec![mount];
    let pod_a = via_proxy
        .run_pod(&PodSpec::new("exporter-through-dockhand"))
        .await?;
    let through = via_proxy.run_container(&pod_a, &spec).await?;
    let pod_b = direct.run_pod(&PodSpec::new("exporter-direct")).await?;
    let plain = direct.run_container(&pod_b, &spec).await?;
    let status = via_proxy
        .container_status(&through, false)
        .await?
        .status
        .context("status")?;
    println!(
        "through dockhand, the container carries  dockhand.io/mount-propagation: {:?}",
        status.annotations.get("dockhand.io/mount-propagation")
    );

    step("the host mounts a 50 MiB volume after both pods started");
    let late = node.temp_dir().join("pv-volume");
    std::fs::create_dir(&late)?;
    let ok = node
        .ns_command("mount")
        .args(["-t", "tmpfs", "-o", "size=50m", "pv-volume"])
        .arg(&late)
        .status()?
        .success();
    anyhow::ensure!(ok, "mount failed");
    let inside = format!("/rootfs{}", late.display());
    println!(
        "through dockhand:\n{}",
        sh(&via_proxy, &through, &format!("df -h {inside}")).await?
    );
    println!(
        "directly on containerd:\n{}",
        sh(&direct, &plain, &format!("df -h {inside}")).await?
    );
    let _ = node.ns_command("umount").arg(&late).status();

    step("dockhand audit propagation (what would break without dockhand)");
    let bin = dockhand_integration::proxy::proxy_binary()?;
    dockhand(
        &bin,
        &[
            "audit".as_ref(),
            "propagation".as_ref(),
            "--socket".as_ref(),
            proxy.socket().as_os_str(),
        ],
    )?;

    step("where each container sits in the cgroup tree (what docker inspect told)");
    println!("$ dockhand cgroups");
    dockhand(
        &bin,
        &[
            "cgroups".as_ref(),
            "--records".as_ref(),
            records.as_os_str(),
            "--socket".as_ref(),
            proxy.socket().as_os_str(),
        ],
    )?;
    let verbose = via_proxy.container_status(&through, true).await?;
    println!(
        "crictl inspect {} through dockhand: info[\"dockhand.cgroup\"] = {}",
        &through[..12],
        verbose
            .info
            .get("dockhand.cgroup")
            .map(String::as_str)
            .unwrap_or("(none)")
    );

    step("a finished Job's logs survive kubelet's garbage collection");
    let job = via_proxy.run_pod(&PodSpec::new("hello-job")).await?;
    let mut ids = Vec::new();
    for attempt in 0..3 {
        let mut spec = ContainerSpec::new("hello", &["echo", "Hello, Kubernetes!"]);
        spec.attempt = attempt;
        let id = via_proxy.run_container(&job, &spec).await?;
        via_proxy
            .wait_exited(&id, std::time::Duration::from_secs(20))
            .await?;
        ids.push(id);
    }
    // Disk pressure: kubelet deletes each dead container's log files, then removes it; then
    // the pod's whole log directory goes.
    for id in &ids {
        via_proxy.remove_container_like_kubelet(id).await?;
    }
    std::fs::remove_dir_all(job.spec.log_directory(node.logs_root()))?;
    println!(
        "containerd no longer knows them: {:?}",
        direct
            .container_status(&ids[0], false)
            .await
            .map(|_| ())
            .unwrap_err()
            .message()
    );
    let archived = via_proxy
        .container_status(&ids[0], false)
        .await?
        .status
        .context("status")?;
    println!(
        "through dockhand, kubelet still gets a status with log_path {}:",
        archived.log_path
    );
    print!("{}", std::fs::read_to_string(&archived.log_path)?);
    let archive_dir = proxy
        .config_path()
        .parent()
        .context("proxy dir")?
        .join("archive/store");
    println!("$ dockhand logs --pod hello-job");
    dockhand(
        &bin,
        &[
            "logs".as_ref(),
            "--dir".as_ref(),
            archive_dir.as_os_str(),
            "--pod".as_ref(),
            "hello-job".as_ref(),
        ],
    )?;
    println!("$ dockhand logs {}", &ids[0][..12]);
    dockhand(
        &bin,
        &[
            "logs".as_ref(),
            "--dir".as_ref(),
            archive_dir.as_os_str(),
            ids[0][..12].as_ref(),
        ],
    )?;

    step("what passed through (dockhand_cri_requests_total from /metrics)");
    let metrics = http_get(port, "/metrics")?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("dockhand_cri_requests_total")
            || l.starts_with("dockhand_propagation_rewrites_total")
    }) {
        println!("{line}");
    }

    step("the proxy's log");
    for line in proxy
        .log()
        .lines()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("{line}");
    }

    step("cleaning up: pods, containerd, mounts, temp files");
    drop(via_proxy);
    drop(proxy);
    drop(node);
    println!("done");
    Ok(())
}

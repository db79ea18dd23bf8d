//! Docker-parity mount propagation against the real containerd (issue: node-exporter mounting host
//! "/" at /rootfs must keep seeing filesystems the host mounts later).

use std::time::Duration;

use anyhow::{Context, Result};
use dockhand_integration::cri::{ContainerSpec, Cri, Pod, PodSpec};
use dockhand_integration::node::{Network, Node, NodeOptions, RootPropagation};
use dockhand_integration::proxy::{http_get, proxy_binary, ProxyProcess};
use dockhand_protos::cri::{self, MountPropagation};

const DECISION: &str = "dockhand.io/mount-propagation";

fn host_mount(host: &str, container: &str, propagation: MountPropagation) -> cri::Mount {
    cri::Mount {
        host_path: host.into(),
        container_path: container.into(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

/// Runs a sleeping busybox with `mounts` in a fresh pod; returns (pod, container id).
async fn run_with_mounts(
    cri: &Cri,
    pod: PodSpec,
    name: &str,
    mounts: Vec<cri::Mount>,
) -> Result<(Pod, String)> {
    let pod = cri.run_pod(&pod).await?;
    let mut spec = ContainerSpec::sleeper(name);
    spec.mounts = mounts;
    let id = cri.run_container(&pod, &spec).await?;
    Ok((pod, id))
}

/// Total size in bytes of the filesystem at `path` inside the container (`stat -f`).
async fn fs_size(cri: &Cri, id: &str, path: &str) -> Result<u64> {
    let out = cri.sh(id, &format!("stat -f -c '%b %S' {path}")).await?;
    let mut parts = out.split_whitespace().map(|p| p.parse::<u64>());
    let blocks = parts.next().context("blocks")??;
    let size = parts.next().context("block size")??;
    Ok(blocks * size)
}

async fn decision(cri: &Cri, id: &str) -> Result<Option<String>> {
    let status = cri
        .container_status(id, false)
        .await?
        .status
        .context("status")?;
    Ok(status.annotations.get(DECISION).cloned())
}

#[tokio::test]
async fn rootfs_sees_later_host_mounts_through_the_proxy_only() -> Result<()> {
    rootfs_sees_later_host_mounts(Network::Host).await
}

/// The same with CNI pods: the node's mount table then has `/run/netns/cni-*` nsfs lines, whose
/// root field (`net:[4026532184]`) is not a path; the rule must still apply.
#[tokio::test]
async fn rootfs_sees_later_host_mounts_through_the_proxy_only_in_cni_pods() -> Result<()> {
    rootfs_sees_later_host_mounts(Network::Cni).await
}

async fn rootfs_sees_later_host_mounts(network: Network) -> Result<()> {
    let node = Node::start(NodeOptions {
        network,
        ..NodeOptions::default()
    })
    .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let proxy =
        ProxyProcess::start(&node, &format!("metrics_address = \"127.0.0.1:{port}\"")).await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;
    let mounts = || {
        vec![host_mount(
            "/",
            "/rootfs",
            MountPropagation::PropagationPrivate,
        )]
    };
    let (_, proxied) = run_with_mounts(
        &via_proxy,
        PodSpec::new("node-exporter-a"),
        "exporter",
        mounts(),
    )
    .await?;
    let (_, plain) = run_with_mounts(
        &direct,
        PodSpec::new("node-exporter-b"),
        "exporter",
        mounts(),
    )
    .await?;

    // The host mounts a 50 MiB volume after both containers started.
    let late = node.temp_dir().join("late-volume");
    std::fs::create_dir(&late)?;
    let status = node
        .ns_command("mount")
        .args(["-t", "tmpfs", "-o", "size=50m", "dockhand-test"])
        .arg(&late)
        .status()?;
    anyhow::ensure!(status.success(), "mount tmpfs failed");
    let inside = format!("/rootfs{}", late.display());

    let proxied_size = fs_size(&via_proxy, &proxied, &inside).await?;
    let plain_size = fs_size(&direct, &plain, &inside).await?;
    assert_eq!(
        proxied_size,
        50 << 20,
        "through dockhand the volume's own size shows"
    );
    assert_ne!(
        plain_size,
        50 << 20,
        "directly, containerd's rprivate hides the volume"
    );
    assert!(
        via_proxy
            .propagation_fields(&proxied, "/rootfs")
            .await?
            .contains("master:"),
        "/rootfs is a slave mount through dockhand"
    );
    assert!(
        !direct
            .propagation_fields(&plain, "/rootfs")
            .await?
            .contains("master:"),
        "/rootfs is private directly"
    );
    assert_eq!(
        decision(&via_proxy, &proxied).await?.as_deref(),
        Some("/rootfs=rslave")
    );
    assert_eq!(decision(&direct, &plain).await?, None);

    // The operator's view: the audit names the container that would break, and the metric counts.
    let audit = std::process::Command::new(proxy_binary()?)
        .args(["audit", "propagation", "--json", "--socket"])
        .arg(proxy.socket())
        .output()?;
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let findings: serde_json::Value = serde_json::from_slice(&audit.stdout)?;
    let status_of = |id: &str| {
        findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["container_id"] == id && f["container_path"] == "/rootfs")
            .map(|f| (f["status"].clone(), f["propagation"].clone()))
    };
    assert_eq!(
        status_of(&proxied),
        Some(("rewritten".into(), "rslave".into()))
    );
    assert_eq!(
        status_of(&plain),
        Some(("at-risk".into(), "rprivate".into()))
    );
    let metrics = http_get(port, "/metrics")?;
    assert!(
        metrics.contains("dockhand_propagation_rewrites_total{result=\"rslave\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dockhand_cri_requests_total{method=\"CreateContainer\",code=\"OK\"} 1"),
        "{metrics}"
    );

    let _ = node.ns_command("umount").arg(&late).status();
    Ok(())
}

#[tokio::test]
async fn private_host_root_falls_back_instead_of_failing() -> Result<()> {
    let node = Node::start(NodeOptions {
        root_propagation: RootPropagation::Private,
        ..NodeOptions::default()
    })
    .await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;

    // What the upstream fix (asking for HostToContainer) does on such a host: an error.
    let pod = direct.run_pod(&PodSpec::new("explicit")).await?;
    let mut spec = ContainerSpec::sleeper("exporter");
    spec.mounts = vec![host_mount(
        "/",
        "/rootfs",
        MountPropagation::PropagationHostToContainer,
    )];
    let err = direct.create_container(&pod, &spec).await.unwrap_err();
    assert!(
        err.message().contains("not a shared or slave mount"),
        "{err:?}"
    );

    // Through dockhand the same pod with no propagation runs, private, and says why.
    let (_, id) = run_with_mounts(
        &via_proxy,
        PodSpec::new("node-exporter"),
        "exporter",
        vec![host_mount(
            "/",
            "/rootfs",
            MountPropagation::PropagationPrivate,
        )],
    )
    .await?;
    let state = via_proxy
        .container_status(&id, false)
        .await?
        .status
        .context("status")?
        .state;
    assert_eq!(state, cri::ContainerState::ContainerRunning as i32);
    assert!(!via_proxy
        .propagation_fields(&id, "/rootfs")
        .await?
        .contains("master:"));
    assert_eq!(
        decision(&via_proxy, &id).await?.as_deref(),
        Some("/rootfs=private(host mount private)")
    );
    assert!(proxy.log().contains("keeping rprivate"), "{}", proxy.log());
    Ok(())
}

#[tokio::test]
async fn rule_boundaries_opt_out_and_explicit_modes() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let tmp = node.temp_dir().to_path_buf();
    let docker_root = tmp.join("var/lib/docker");
    let extra = tmp.join("extra");
    std::fs::create_dir_all(docker_root.join("containers"))?;
    std::fs::create_dir_all(tmp.join("var/lib/doc"))?;
    std::fs::create_dir_all(extra.join("sub"))?;
    std::fs::create_dir_all(tmp.join("elsewhere"))?;
    std::os::unix::fs::symlink(docker_root.join("containers"), tmp.join("link"))?;
    let proxy = ProxyProcess::start(
        &node,
        &format!(
            "[propagation]\ndocker_root = \"{}\"\nextra_paths = [\"{}\"]\n",
            docker_root.display(),
            extra.display()
        ),
    )
    .await?;
    let cri = proxy.cri().await?;
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let private = MountPropagation::PropagationPrivate;
    let (_, id) = run_with_mounts(
        &cri,
        PodSpec::new("rules"),
        "c",
        vec![
            host_mount(&path(&tmp.join("var/lib/doc")), "/doc", private),
            host_mount(&path(&tmp.join("link")), "/linked", private),
            host_mount(&path(&extra.join("sub")), "/extra", private),
            host_mount(&path(&tmp.join("elsewhere")), "/elsewhere", private),
            host_mount(
                "/",
                "/explicit-slave",
                MountPropagation::PropagationHostToContainer,
            ),
            host_mount(
                "/",
                "/explicit-shared",
                MountPropagation::PropagationBidirectional,
            ),
            host_mount(&path(&tmp.join("var")), "/var-ancestor", private),
        ],
    )
    .await?;
    assert_eq!(
        decision(&cri, &id).await?.as_deref(),
        Some("/linked=rslave, /extra=rslave, /var-ancestor=rslave")
    );
    assert!(!cri
        .propagation_fields(&id, "/doc")
        .await?
        .contains("master:"));
    assert!(!cri
        .propagation_fields(&id, "/elsewhere")
        .await?
        .contains("master:"));
    for slave in ["/linked", "/extra", "/var-ancestor", "/explicit-slave"] {
        assert!(
            cri.propagation_fields(&id, slave)
                .await?
                .contains("master:"),
            "{slave}"
        );
    }
    assert!(cri
        .propagation_fields(&id, "/explicit-shared")
        .await?
        .contains("shared:"));

    // A pod that opts out keeps what it asked for.
    let mut opted = PodSpec::new("opted-out");
    opted
        .annotations
        .insert("dockhand.io/mount-propagation".into(), "keep".into());
    let (_, kept) =
        run_with_mounts(&cri, opted, "c", vec![host_mount("/", "/rootfs", private)]).await?;
    assert_eq!(decision(&cri, &kept).await?, None);
    assert!(!cri
        .propagation_fields(&kept, "/rootfs")
        .await?
        .contains("master:"));
    Ok(())
}

#[tokio::test]
async fn dry_run_changes_nothing_but_says_what_it_would_do() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "[propagation]\nmode = \"dry-run\"\n").await?;
    let cri = proxy.cri().await?;
    let (_, id) = run_with_mounts(
        &cri,
        PodSpec::new("dry"),
        "c",
        vec![host_mount(
            "/",
            "/rootfs",
            MountPropagation::PropagationPrivate,
        )],
    )
    .await?;
    assert_eq!(decision(&cri, &id).await?, None);
    assert!(!cri
        .propagation_fields(&id, "/rootfs")
        .await?
        .contains("master:"));
    let log = proxy.log();
    assert!(
        log.contains("bind mount gets rslave") && log.contains("dry_run=true"),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn hostile_requests_get_containerds_own_answer() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;
    let path = "/runtime.v1.RuntimeService/CreateContainer";
    // Bytes that do not decode: forwarded unchanged, containerd's error comes back.
    let garbage = bytes::Bytes::from_static(&[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    let a = via_proxy.raw(path, garbage.clone()).await.unwrap_err();
    let b = direct.raw(path, garbage).await.unwrap_err();
    assert_eq!((a.code(), a.message()), (b.code(), b.message()));

    // Relative and empty host paths are left to containerd.
    for host in ["relative/path", ""] {
        let pod = via_proxy.run_pod(&PodSpec::new("hostile")).await?;
        let mut spec = ContainerSpec::sleeper("c");
        spec.mounts = vec![host_mount(host, "/x", MountPropagation::PropagationPrivate)];
        let through = via_proxy.create_container(&pod, &spec).await;
        let mut spec_direct = spec.clone();
        spec_direct.name = "d".into();
        let plain = direct.create_container(&pod, &spec_direct).await;
        assert_eq!(
            through.is_ok(),
            plain.is_ok(),
            "{host:?}: {through:?} vs {plain:?}"
        );
        if let Ok(id) = through {
            assert_eq!(decision(&via_proxy, &id).await?, None);
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

/// The proxy keeps the host's mount table between creates; a mount made afterwards must be seen,
/// or dockhand would ask rslave of a private mount and containerd would refuse the create.
#[tokio::test]
async fn a_private_mount_made_after_the_last_create_is_seen() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let data = node.temp_dir().join("data");
    std::fs::create_dir_all(data.join("volume"))?;
    let proxy = ProxyProcess::start(
        &node,
        &format!("[propagation]\nextra_paths = [\"{}\"]\n", data.display()),
    )
    .await?;
    let cri = proxy.cri().await?;
    let volume = data.join("volume");
    let mount = || {
        vec![host_mount(
            volume.to_str().unwrap(),
            "/volume",
            MountPropagation::PropagationPrivate,
        )]
    };
    let (_, first) = run_with_mounts(&cri, PodSpec::new("before"), "c", mount()).await?;
    assert_eq!(
        decision(&cri, &first).await?.as_deref(),
        Some("/volume=rslave")
    );

    // The host now mounts a private filesystem there.
    for args in [
        vec!["mount", "-t", "tmpfs", "-o", "size=1m", "private-volume"],
        vec!["mount", "--make-private"],
    ] {
        let ok = node
            .ns_command(args[0])
            .args(&args[1..])
            .arg(&volume)
            .status()?
            .success();
        anyhow::ensure!(ok, "{args:?} failed");
    }
    let (_, second) = run_with_mounts(&cri, PodSpec::new("after"), "c", mount()).await?;
    assert_eq!(
        decision(&cri, &second).await?.as_deref(),
        Some("/volume=private(host mount private)")
    );
    let _ = node.ns_command("umount").arg(&volume).status();
    Ok(())
}

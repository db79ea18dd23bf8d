//! Docker-parity propagation against today's CRI, on the real containerd: what a pod that works
//! directly on containerd gets through dockhand. Each test runs the same request both ways and
//! compares what a user checks: the create's answer, the container running, its propagation, the
//! decision annotation and dockhand's count.
//!
//! The requests kubelet 1.37 (cri-api v0.37) sends that dockhand's CRI types do not know are
//! built as bytes: an env value that is not UTF-8 (`KeyValue.value` is `bytes` there) and a
//! mount's `mount_options` (field 11).

use anyhow::{Context, Result};
use bytes::Bytes;
use dockhand_integration::cri::{ContainerSpec, Cri, Pod, PodSpec};
use dockhand_integration::node::{Node, NodeOptions};
use dockhand_integration::proxy::{http_get, ProxyProcess};
use dockhand_protos::cri::{self, MountPropagation};
use dockhand_protos::wire;
use prost::Message;

const CREATE: &str = "/runtime.v1.RuntimeService/CreateContainer";
const DECISION: &str = "dockhand.io/mount-propagation";

fn root_mount() -> cri::Mount {
    cri::Mount {
        host_path: "/".into(),
        container_path: "/rootfs".into(),
        propagation: MountPropagation::PropagationPrivate as i32,
        ..Default::default()
    }
}

/// A proxy with its metrics on a free port; returns it and the port.
async fn proxy_with_metrics(
    node: &Node,
    toml: &str,
    env: &[(&str, &str)],
) -> Result<(ProxyProcess, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let proxy = ProxyProcess::start_with_env(
        node,
        &format!("metrics_address = \"127.0.0.1:{port}\"\n{toml}"),
        env,
    )
    .await?;
    Ok((proxy, port))
}

/// `dockhand_propagation_rewrites_total{result="<result>"}` on `/metrics`, 0 when absent.
fn rewrites(port: u16, result: &str) -> Result<u64> {
    let metrics = http_get(port, "/metrics")?;
    let series = format!("dockhand_propagation_rewrites_total{{result=\"{result}\"}} ");
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(Ok(0), str::parse)?)
}

async fn decision(cri: &Cri, id: &str) -> Result<Option<String>> {
    let status = cri
        .container_status(id, false)
        .await?
        .status
        .context("status")?;
    Ok(status.annotations.get(DECISION).cloned())
}

async fn running(cri: &Cri, id: &str) -> Result<bool> {
    let status = cri
        .container_status(id, false)
        .await?
        .status
        .context("status")?;
    Ok(status.state == cri::ContainerState::ContainerRunning as i32)
}

/// The CreateContainer kubelet would send for `spec` in `pod`, encoded, then changed by `edit`.
async fn encoded_create(
    cri: &Cri,
    pod: &Pod,
    spec: &ContainerSpec,
    edit: impl Fn(Vec<u8>) -> Vec<u8>,
) -> Result<Vec<u8>> {
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: pod.id.clone(),
        config: Some(cri.container_config(&pod.spec, spec).await?),
        sandbox_config: Some(pod.config.clone()),
    };
    Ok(edit(request.encode_to_vec()))
}

/// CreateContainer with raw bytes; the new container's id.
async fn create_raw(cri: &Cri, request: Vec<u8>) -> Result<String, tonic::Status> {
    let answer = cri.raw(CREATE, Bytes::from(request)).await?;
    cri::CreateContainerResponse::decode(answer)
        .map(|r| r.container_id)
        .map_err(|e| tonic::Status::internal(e.to_string()))
}

/// Through dockhand and directly, in a pod each (`<name>-a`, `<name>-b`): the CreateContainer
/// kubelet would send for `spec`, changed by `edit`, created and started; the two ids.
async fn run_edited_both_ways(
    via_proxy: &Cri,
    direct: &Cri,
    name: &str,
    spec: &ContainerSpec,
    edit: impl Fn(Vec<u8>) -> Vec<u8>,
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for (cri, side) in [(via_proxy, "a"), (direct, "b")] {
        let pod = cri
            .run_pod(&PodSpec::new(&format!("{name}-{side}")))
            .await?;
        let request = encoded_create(cri, &pod, spec, &edit).await?;
        let id = create_raw(cri, request).await?;
        cri.start_container(&id).await?;
        assert!(running(cri, &id).await?);
        ids.push(id);
    }
    Ok(ids)
}

/// The `/rootfs` mount of `id` is rslave inside the container, the decision annotation says so
/// and the proxy counted exactly one rslave rewrite.
async fn assert_rslave_through_dockhand(via_proxy: &Cri, id: &str, port: u16) -> Result<()> {
    assert!(
        via_proxy
            .propagation_fields(id, "/rootfs")
            .await?
            .contains("master:"),
        "rslave through dockhand"
    );
    assert_eq!(
        decision(via_proxy, id).await?.as_deref(),
        Some("/rootfs=rslave")
    );
    assert_eq!(rewrites(port, "rslave")?, 1);
    Ok(())
}

/// The env value `placeholder`, made invalid UTF-8 in place (what cri-api v0.37 allows).
const PLACEHOLDER: &[u8] = b"placeholder";

fn non_utf8_env(mut bytes: Vec<u8>) -> Vec<u8> {
    let at = bytes
        .windows(PLACEHOLDER.len())
        .position(|w| w == PLACEHOLDER)
        .expect("the env value");
    bytes[at..at + PLACEHOLDER.len()].copy_from_slice(b"\xff\xfebinary!!\x01");
    assert!(cri::CreateContainerRequest::decode(bytes.as_slice()).is_err());
    bytes
}

/// `mount_options` (field 11): `nosuid` on the first mount, `rprivate` on the second.
fn with_mount_options(bytes: Vec<u8>) -> Vec<u8> {
    let option = |index: usize, option: &[u8]| wire::Edit {
        path: vec![wire::Step::Field(2), wire::Step::Item(7, index)],
        op: wire::Op::Append {
            field: 11,
            value: option.to_vec(),
        },
    };
    wire::apply(&bytes, &[option(0, b"nosuid"), option(1, b"rprivate")])
        .expect("mount_options added")
}

/// (a) `recursiveReadOnly: Enabled` on a `/` mount: containerd (2.x, with a runc that can do
/// it) needs private propagation for it. Both ways the pod runs and `/rootfs` is private;
/// through dockhand the decision says why.
#[tokio::test]
async fn a_recursive_read_only_root_mount_runs_both_ways() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (proxy, port) = proxy_with_metrics(&node, "", &[]).await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;
    let mut spec = ContainerSpec::sleeper("ro");
    spec.mounts = vec![cri::Mount {
        readonly: true,
        recursive_read_only: true,
        ..root_mount()
    }];
    let mut ids = Vec::new();
    for (cri, pod) in [(&via_proxy, "rro-a"), (&direct, "rro-b")] {
        let pod = cri.run_pod(&PodSpec::new(pod)).await?;
        let id = cri.run_container(&pod, &spec).await?;
        assert!(running(cri, &id).await?);
        assert_eq!(
            cri.propagation_fields(&id, "/rootfs").await?,
            "",
            "/rootfs is private"
        );
        ids.push(id);
    }
    assert_eq!(
        decision(&via_proxy, &ids[0]).await?.as_deref(),
        Some("/rootfs=private(recursive read-only)")
    );
    assert_eq!(decision(&direct, &ids[1]).await?, None);
    assert_eq!(rewrites(port, "recursive_read_only")?, 1);
    assert_eq!(rewrites(port, "rslave")?, 0);
    Ok(())
}

/// (b) A create containerd refuses only because dockhand asked for rslave: the host mount is
/// shared when dockhand decides and made private (by the `test-hooks` hook) before containerd
/// checks it, so containerd says "not a shared or slave mount". Directly the same pod runs
/// (rprivate); through dockhand it runs too, the original having been sent.
#[tokio::test]
async fn a_create_refused_only_when_rewritten_runs_through_dockhand() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let volume = node.temp_dir().join("volume");
    std::fs::create_dir_all(&volume)?;
    for args in [
        vec!["mount", "-t", "tmpfs", "-o", "size=1m", "refused-volume"],
        vec!["mount", "--make-shared"],
    ] {
        let ok = node
            .ns_command(args[0])
            .args(&args[1..])
            .arg(&volume)
            .status()?
            .success();
        anyhow::ensure!(ok, "{args:?} failed");
    }
    let hook = format!("mount --make-private {}", volume.display());
    let (proxy, port) = proxy_with_metrics(
        &node,
        &format!("[propagation]\nextra_paths = [\"{}\"]\n", volume.display()),
        &[(dockhand::testing::AFTER_DECIDE_ENV, &hook)],
    )
    .await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;
    let mut spec = ContainerSpec::sleeper("c");
    spec.mounts = vec![cri::Mount {
        host_path: volume.to_str().unwrap().into(),
        container_path: "/volume".into(),
        ..Default::default()
    }];

    let pod = via_proxy.run_pod(&PodSpec::new("refused")).await?;
    let id = via_proxy.run_container(&pod, &spec).await?;
    assert!(running(&via_proxy, &id).await?);
    assert_eq!(via_proxy.propagation_fields(&id, "/volume").await?, "");
    let annotated = decision(&via_proxy, &id).await?.unwrap_or_default();
    assert!(
        annotated.starts_with("/volume=private(refused: ")
            && annotated.contains("not a shared or slave mount"),
        "{annotated}"
    );
    assert_eq!(rewrites(port, "refused_original_sent")?, 1);
    assert_eq!(rewrites(port, "rslave")?, 0);
    assert!(
        proxy.log().contains("containerd refused CreateContainer"),
        "{}",
        proxy.log()
    );

    // Directly (the mount is private now): the same pod runs, as it did through dockhand.
    let pod = direct.run_pod(&PodSpec::new("refused-direct")).await?;
    let plain = direct.run_container(&pod, &spec).await?;
    assert!(running(&direct, &plain).await?);
    assert_eq!(direct.propagation_fields(&plain, "/volume").await?, "");
    let _ = node.ns_command("umount").arg(&volume).status();
    Ok(())
}

/// (c) cri-api v0.37's kubelet with an env value that is not UTF-8 and a `/` mount: containerd
/// takes it directly; through dockhand the mount gets rslave as for any other request.
#[tokio::test]
async fn a_non_utf8_env_value_still_gets_rslave() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (proxy, port) = proxy_with_metrics(&node, "", &[]).await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;
    let mut spec = ContainerSpec::sleeper("env");
    spec.mounts = vec![root_mount()];
    spec.env = vec![(
        "FROM_A_BINARY_SECRET".into(),
        String::from_utf8(PLACEHOLDER.to_vec())?,
    )];
    let ids = run_edited_both_ways(&via_proxy, &direct, "env", &spec, non_utf8_env).await?;
    assert_rslave_through_dockhand(&via_proxy, &ids[0], port).await?;
    assert_eq!(direct.propagation_fields(&ids[1], "/rootfs").await?, "");
    Ok(())
}

/// (d) Mounts with `mount_options` (field 11, which dockhand's CRI types do not know): the
/// bytes reach containerd as sent but for the propagation (checked byte for byte against a fake
/// in `propagation_alone.rs`); the real containerd takes them both ways. `nosuid` changes
/// nothing; a propagation among the options (`rprivate`) is the pod's choice, left alone.
#[tokio::test]
async fn mounts_with_mount_options() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (proxy, port) = proxy_with_metrics(&node, "", &[]).await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;
    let mut spec = ContainerSpec::sleeper("opts");
    spec.mounts = vec![
        root_mount(),
        cri::Mount {
            container_path: "/explicit".into(),
            ..root_mount()
        },
    ];
    let ids = run_edited_both_ways(&via_proxy, &direct, "opts", &spec, with_mount_options).await?;
    assert_rslave_through_dockhand(&via_proxy, &ids[0], port).await?;
    assert_eq!(
        via_proxy.propagation_fields(&ids[0], "/explicit").await?,
        ""
    );
    Ok(())
}

/// (e) Creates that fail whatever the propagation (a missing image, an unknown sandbox), with a
/// mount dockhand rewrites: containerd refuses the rewrite, dockhand sends the original, and the
/// caller gets the answer a direct caller gets. Nothing is left behind: the same container
/// (same name, same attempt) is then created through dockhand.
#[tokio::test]
async fn a_create_that_fails_either_way_answers_as_direct_and_leaves_nothing() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let (proxy, port) = proxy_with_metrics(&node, "", &[]).await?;
    let via_proxy = proxy.cri().await?;
    let direct = node.cri().await?;
    let pod = via_proxy.run_pod(&PodSpec::new("failing")).await?;
    let mut spec = ContainerSpec::sleeper("c");
    spec.mounts = vec![root_mount()];

    let mut missing_image = spec.clone();
    missing_image.image = "registry.invalid/none:1".into();
    let missing_image = encoded_create(&via_proxy, &pod, &missing_image, |b| b).await?;
    let mut bad_sandbox = cri::CreateContainerRequest::decode(
        encoded_create(&via_proxy, &pod, &spec, |b| b)
            .await?
            .as_slice(),
    )?;
    bad_sandbox.pod_sandbox_id = "0123456789abcdef".repeat(4);
    let bad_sandbox = bad_sandbox.encode_to_vec();

    for (what, request) in [
        ("missing image", missing_image),
        ("bad sandbox", bad_sandbox),
    ] {
        let through = create_raw(&via_proxy, request.clone()).await.unwrap_err();
        let plain = create_raw(&direct, request).await.unwrap_err();
        assert_eq!(
            (through.code(), through.message()),
            (plain.code(), plain.message()),
            "{what}"
        );
    }
    assert_eq!(rewrites(port, "refused_original_sent")?, 2);

    // The same name and attempt: nothing reserved, nothing half-created.
    let id = via_proxy.run_container(&pod, &spec).await?;
    assert!(running(&via_proxy, &id).await?);
    assert_eq!(
        decision(&via_proxy, &id).await?.as_deref(),
        Some("/rootfs=rslave")
    );
    Ok(())
}

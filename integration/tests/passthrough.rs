//! The proxy must be invisible: every scenario runs once straight against containerd and once
//! through `dockhand proxy`, and the two transcripts (ids and times normalised) must be equal.
//! Then what only a proxy can get wrong: big messages, SIGTERM, containerd going away and back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use dockhand_integration::api;
use dockhand_integration::transcript::{assert_same, Transcript};
use dockhand_integration::{
    read_log, ContainerSpec, Cri, Node, NodeOptions, PodSpec, ProxyProcess, BUSYBOX_IMAGE,
    PAUSE_IMAGE,
};
use prost::Message;
use tonic::{Code, Status};

/// A node with the proxy in front of it, and a client for each way in.
struct Setup {
    // Dropped in this order: clients, proxy, then the node.
    direct: Cri,
    via_proxy: Cri,
    proxy: ProxyProcess,
    node: Node,
}

async fn setup() -> Result<Setup> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let direct = node.cri().await?;
    let via_proxy = proxy.cri().await?;
    Ok(Setup {
        node,
        proxy,
        direct,
        via_proxy,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn version_is_containerds() -> Result<()> {
    let s = setup().await?;
    let direct = s.direct.version().await?;
    let via_proxy = s.via_proxy.version().await?;
    assert_eq!(direct, via_proxy);
    assert_eq!(via_proxy.runtime_name, "containerd");
    assert_eq!(via_proxy.runtime_api_version, "v1");
    Ok(())
}

async fn pod_lifecycle(cri: &Cri, t: &mut Transcript) -> Result<()> {
    let spec = PodSpec::new("lifecycle");
    t.alias(&spec.uid, "<uid>");
    let pod = cri.run_pod(&spec).await?;
    t.record("status", &cri.pod_status(&pod.id, false).await);
    let listed = cri.list_pods().await.map(|pods| {
        pods.into_iter()
            .filter(|p| p.id == pod.id)
            .collect::<Vec<_>>()
    });
    t.record("list", &listed);
    t.record("stop", &cri.stop_pod(&pod.id).await);
    t.record("status after stop", &cri.pod_status(&pod.id, false).await);
    t.record("stop again", &cri.stop_pod(&pod.id).await);
    t.record("remove", &cri.remove_pod(&pod.id).await);
    t.record("status after remove", &cri.pod_status(&pod.id, false).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_lifecycle_looks_the_same_through_the_proxy() -> Result<()> {
    let s = setup().await?;
    let (mut direct, mut via_proxy) = (Transcript::default(), Transcript::default());
    pod_lifecycle(&s.direct, &mut direct).await?;
    pod_lifecycle(&s.via_proxy, &mut via_proxy).await?;
    assert_same(&direct, &via_proxy);
    // The scenario is not vacuous: the pod ran, then was gone.
    let steps = via_proxy.normalised();
    assert!(steps[0].1.contains("SandboxReady"), "{}", steps[0].1);
    assert!(
        steps.last().unwrap().1.starts_with("Err(NotFound"),
        "{}",
        steps.last().unwrap().1
    );
    Ok(())
}

/// A container that logs to both streams, answers exec, and exits 0 on SIGTERM.
const SCRIPT: &str = "trap 'echo bye; exit 0' TERM; echo hello; echo oops >&2; \
                      while true; do sleep 0.1; done";

async fn container_lifecycle(
    cri: &Cri,
    t: &mut Transcript,
) -> Result<Result<api::ContainerStatusResponse, Status>> {
    let spec = PodSpec::new("containers");
    t.alias(&spec.uid, "<uid>");
    t.alias(&cri.node().logs_root.to_string_lossy(), "<logs>");
    let pod = cri.run_pod(&spec).await?;
    let mut container = ContainerSpec::new("app", &["sh", "-c", SCRIPT]);
    container.env.push(("GREETING".into(), "hi".into()));
    let created = cri.create_container(&pod, &container).await;
    t.record(
        "create",
        &created.as_ref().map(|_| ()).map_err(Status::clone),
    );
    let id = created?;
    t.record("status created", &cri.container_status(&id, false).await);
    t.record("start", &cri.start_container(&id).await);
    t.record("status running", &cri.container_status(&id, false).await);
    t.record("list", &cri.list_containers(Some(&pod.id)).await);

    let exec = cri
        .exec_sync(
            &id,
            &["sh", "-c", "echo out $GREETING; echo err >&2; exit 3"],
            10,
        )
        .await;
    t.record_text("exec", exec.map(readable));
    // Streaming exec: the URL of containerd's own streaming server, passed through unchanged
    // (the token at its end is new every call).
    let request = api::ExecRequest {
        container_id: id.clone(),
        cmd: vec!["true".into()],
        stdout: true,
        ..Default::default()
    };
    let url = cri.runtime().exec(request).await.map(|r| {
        let url = r.into_inner().url;
        url[..url.rfind('/').unwrap_or(0)].to_string()
    });
    t.record_text("exec url", url);
    let missing = cri.exec_sync(&id, &["/no/such"], 10).await;
    t.record_text("exec unknown binary", missing.map(readable));

    let log_path = cri
        .container_status(&id, false)
        .await?
        .status
        .context("status")?
        .log_path;
    wait_for_log(&log_path, "oops").await?;
    t.record("stop", &cri.stop_container(&id, 10).await);
    t.record("status exited", &cri.container_status(&id, false).await);
    let mut lines: Vec<String> = read_log(log_path.as_ref())?
        .iter()
        .map(|l| {
            format!(
                "{} {} {}",
                l.stream,
                if l.partial { "P" } else { "F" },
                l.message
            )
        })
        .collect();
    // Lines of one stream keep their order; the two streams interleave by chance.
    lines.sort_by_key(|l| l.starts_with("stderr"));
    t.note("log", format!("{lines:#?}"));
    t.record("remove", &cri.remove_container(&id).await);
    // The one intended difference: dockhand's log archive answers for a removed container
    // (kubectl logs after GC); the caller compares this step itself.
    let removed = cri.container_status(&id, false).await;
    t.record("remove pod", &cri.remove_pod(&pod.id).await);
    Ok(removed)
}

/// ExecSync output as text.
fn readable(response: api::ExecSyncResponse) -> String {
    format!(
        "exit_code: {}, stdout: {:?}, stderr: {:?}",
        response.exit_code,
        String::from_utf8_lossy(&response.stdout),
        String::from_utf8_lossy(&response.stderr)
    )
}

async fn wait_for_log(path: &str, text: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(text)
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{path} never contained {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn container_lifecycle_looks_the_same_through_the_proxy() -> Result<()> {
    let s = setup().await?;
    let (mut direct, mut via_proxy) = (Transcript::default(), Transcript::default());
    let removed_direct = container_lifecycle(&s.direct, &mut direct).await?;
    let removed_proxied = container_lifecycle(&s.via_proxy, &mut via_proxy).await?;
    assert_same(&direct, &via_proxy);

    // Removed: containerd forgets the container; through dockhand the archive still answers,
    // with an exited status whose log_path holds the container's lines.
    let err = removed_direct.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let status = removed_proxied?.status.expect("archived status");
    assert_eq!(status.state, api::ContainerState::ContainerExited as i32);
    let restored = std::fs::read_to_string(&status.log_path)?;
    assert!(restored.contains("stdout F bye"), "{restored}");

    // And what a user checks by hand, through the proxy.
    let steps: HashMap<String, String> = via_proxy.normalised().into_iter().collect();
    assert!(steps["exec"].contains("exit_code: 3"), "{}", steps["exec"]);
    assert!(
        steps["exec"].contains(r#"stdout: "out hi\n""#),
        "{}",
        steps["exec"]
    );
    assert!(
        steps["exec"].contains(r#"stderr: "err\n""#),
        "{}",
        steps["exec"]
    );
    assert!(
        steps["status exited"].contains("ContainerExited"),
        "{}",
        steps["status exited"]
    );
    assert!(
        steps["status exited"].contains("exit_code: 0"),
        "{}",
        steps["status exited"]
    );
    for line in ["stdout F hello", "stderr F oops", "stdout F bye"] {
        assert!(
            steps["log"].contains(line),
            "no {line:?} in {}",
            steps["log"]
        );
    }
    assert!(
        steps["exec url"].starts_with("http://127.0.0.1:"),
        "{}",
        steps["exec url"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn images_look_the_same_through_the_proxy() -> Result<()> {
    let s = setup().await?;
    let sorted = |mut images: Vec<api::Image>| {
        images.sort_by(|a, b| a.id.cmp(&b.id));
        images
    };
    let direct = sorted(s.direct.list_images().await?);
    let via_proxy = sorted(s.via_proxy.list_images().await?);
    assert_eq!(direct, via_proxy);
    let tags: Vec<&String> = via_proxy.iter().flat_map(|i| &i.repo_tags).collect();
    assert!(tags.contains(&&BUSYBOX_IMAGE.to_string()), "{tags:?}");
    assert!(tags.contains(&&PAUSE_IMAGE.to_string()), "{tags:?}");
    for image in [BUSYBOX_IMAGE, "docker.io/dockhand/none:test"] {
        let direct = s.direct.image_status(image).await?;
        let via_proxy = s.via_proxy.image_status(image).await?;
        assert_eq!(direct, via_proxy, "ImageStatus({image})");
    }
    Ok(())
}

/// Calls that name things that do not exist: the error must be containerd's, code and message.
async fn unknown_ids(cri: &Cri, t: &mut Transcript) {
    t.record(
        "ContainerStatus",
        &cri.container_status("nope", false).await,
    );
    t.record("PodSandboxStatus", &cri.pod_status("nope", true).await);
    t.record("StartContainer", &cri.start_container("nope").await);
    t.record("StopContainer", &cri.stop_container("nope", 1).await);
    t.record("RemoveContainer", &cri.remove_container("nope").await);
    t.record("StopPodSandbox", &cri.stop_pod("nope").await);
    t.record("ExecSync", &cri.exec_sync("nope", &["true"], 1).await);
    let empty = api::ContainerStatusRequest::default().encode_to_vec();
    let raw = cri
        .raw("/runtime.v1.RuntimeService/ContainerStatus", empty.into())
        .await;
    t.record("ContainerStatus empty id", &raw);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_for_unknown_ids_are_containerds_exactly() -> Result<()> {
    let s = setup().await?;
    let (mut direct, mut via_proxy) = (Transcript::default(), Transcript::default());
    unknown_ids(&s.direct, &mut direct).await;
    unknown_ids(&s.via_proxy, &mut via_proxy).await;
    // Compared raw: no normalisation may hide a difference in an error.
    assert_eq!(direct.steps, via_proxy.steps);
    let first = &via_proxy.steps[0].1;
    assert!(first.starts_with("Err(NotFound"), "{first}");
    assert!(first.contains("nope"), "{first}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_methods_reach_containerd() -> Result<()> {
    let s = setup().await?;
    for path in [
        "/runtime.v1.RuntimeService/NoSuchMethod",
        "/runtime.v1.NoSuchService/Version",
    ] {
        let request = Bytes::from_static(b"\x0a\x03abc");
        let direct = s.direct.raw(path, request.clone()).await.unwrap_err();
        let via_proxy = s.via_proxy.raw(path, request).await.unwrap_err();
        assert_eq!(direct.code(), Code::Unimplemented, "{direct:?}");
        assert_eq!(
            (via_proxy.code(), via_proxy.message()),
            (direct.code(), direct.message()),
            "{path}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_over_ten_mebibytes_pass_both_ways() -> Result<()> {
    let s = setup().await?;
    const BIG: usize = 10 * 1024 * 1024 + 4096;
    let mut spec = PodSpec::new("big");
    let value: String = (0..BIG).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    spec.annotations
        .insert("example.com/big".into(), value.clone());
    let config = s.via_proxy.pod_config(&spec);
    assert!(config.encoded_len() > BIG);
    let pod = s.via_proxy.run_pod_config(&spec, config).await?;

    // The response is as big as the request: the annotation comes back.
    let status = s.via_proxy.pod_status(&pod.id, false).await?;
    assert!(status.encoded_len() > BIG);
    let annotations = &status.status.as_ref().context("status")?.annotations;
    assert!(
        annotations.get("example.com/big") == Some(&value),
        "annotation lost or changed"
    );
    let listed = s.via_proxy.list_pods().await?;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].annotations.get("example.com/big") == Some(&value));
    // containerd saw the same request.
    assert_eq!(s.direct.pod_status(&pod.id, false).await?, status);
    s.via_proxy.stop_pod(&pod.id).await?;
    s.via_proxy.remove_pod(&pod.id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly_and_removes_the_socket() -> Result<()> {
    let mut s = setup().await?;
    s.via_proxy.version().await?;
    let socket = s.proxy.socket();
    assert!(socket.exists());
    let started = Instant::now();
    let status = s.proxy.terminate().await?;
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        s.proxy.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(!socket.exists(), "{} left behind", socket.display());
    // containerd itself is untouched.
    s.direct.version().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_down_is_unavailable_then_recovers_without_restart() -> Result<()> {
    let mut s = setup().await?;
    s.via_proxy.version().await?;
    let proxy_pid = s.proxy.pid();

    s.node.stop_containerd().await?;
    let started = Instant::now();
    let error = s.via_proxy.version().await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    assert!(
        elapsed < Duration::from_secs(5),
        "UNAVAILABLE took {elapsed:?}"
    );
    // The proxy keeps serving (errors) and stays up.
    let again = s.via_proxy.list_pods().await.unwrap_err();
    assert_eq!(again.code(), Code::Unavailable, "{again:?}");

    s.node.start_containerd().await?;
    // kubelet retries; a proxy that reconnects answers within a few of its retries.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut failures = Vec::new();
    let version = loop {
        match s.via_proxy.version().await {
            Ok(version) => break version,
            Err(e) if Instant::now() < deadline => {
                failures.push(format!("{:?}: {}", e.code(), e.message()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!(
                "no recovery: {e:?}; earlier: {failures:?}; log:\n{}",
                s.proxy.log()
            ),
        }
    };
    assert_eq!(version.runtime_name, "containerd");
    assert!(
        failures.len() <= 1,
        "calls failed after containerd was back: {failures:?}"
    );
    let pod = s.via_proxy.run_pod(&PodSpec::new("after-restart")).await?;
    s.via_proxy.stop_pod(&pod.id).await?;
    s.via_proxy.remove_pod(&pod.id).await?;
    assert_eq!(s.proxy.pid(), proxy_pid, "the proxy was restarted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_after_sigkill_on_the_stale_socket() -> Result<()> {
    let mut s = setup().await?;
    s.proxy.kill9();
    // What a crash leaves: the socket file, with nobody listening.
    assert!(s.proxy.socket().exists());
    assert!(s.via_proxy.version().await.is_err());
    s.proxy.restart().await?;
    let cri = s.proxy.cri().await?;
    assert_eq!(cri.version().await?, s.direct.version().await?);
    Ok(())
}

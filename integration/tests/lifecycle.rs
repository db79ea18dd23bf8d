//! The archive finds a started container's log from what CreateContainer said (the lifecycle
//! record), and from containerd only for a container created before dockhand: in process, in
//! front of a fake containerd that counts what it is asked.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dockhand_integration::fake::{Answer, FakeUpstream, InProcessProxy};
use dockhand_integration::proxy::archive_toml;
use dockhand_protos::codec::RawCodec;
use dockhand_protos::cri::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    ContainerStatusResponse, CreateContainerRequest, CreateContainerResponse, ImageSpec,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusResponse, RemoveContainerRequest,
    StartContainerRequest,
};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

const CREATE: &str = "/runtime.v1.RuntimeService/CreateContainer";
const START: &str = "/runtime.v1.RuntimeService/StartContainer";
const REMOVE: &str = "/runtime.v1.RuntimeService/RemoveContainer";
const STATUS: &str = "/runtime.v1.RuntimeService/ContainerStatus";
const SANDBOX_STATUS: &str = "/runtime.v1.RuntimeService/PodSandboxStatus";

const ID: &str = "1c0ffee000000000000000000000000000000000000000000000000000000001";
const SANDBOX: &str = "5a0dbox000000000000000000000000000000000000000000000000000000001";
const LINE: &str = "2026-12-02T10:00:00.000000000Z stdout F hello from app\n";

async fn unary(
    socket: &Path,
    path: &'static str,
    message: Vec<u8>,
) -> Result<Bytes, tonic::Status> {
    let path_buf = socket.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path_buf.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(Bytes::from(message)),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A pod log directory under `pods` with the container's live log written, as containerd and
/// kubelet leave it at StartContainer.
fn pod_logs(pods: &Path) -> (String, String) {
    let directory = pods.join("team_web-1_uid-1");
    std::fs::create_dir_all(directory.join("app")).unwrap();
    std::fs::write(directory.join("app/0.log"), LINE).unwrap();
    let log_path = directory.join("app/0.log");
    (
        directory.to_string_lossy().into_owned(),
        log_path.to_string_lossy().into_owned(),
    )
}

fn labels() -> std::collections::HashMap<String, String> {
    [
        ("io.kubernetes.pod.namespace", "team"),
        ("io.kubernetes.pod.name", "web-1"),
        ("io.kubernetes.pod.uid", "uid-1"),
        ("io.kubernetes.container.name", "app"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A fake containerd: it created `ID`, starts and removes it, and knows it (verbose, with the
/// `info` JSON containerd gives) until it is removed.
async fn containerd(log_directory: String, log_path: String) -> FakeUpstream {
    let removed = Arc::new(AtomicBool::new(false));
    FakeUpstream::start(move |path, _| match path {
        CREATE => Answer::Message(
            CreateContainerResponse {
                container_id: ID.into(),
            }
            .encode_to_vec()
            .into(),
        ),
        START => Answer::Message(Bytes::new()),
        REMOVE => {
            removed.store(true, Ordering::SeqCst);
            Answer::Message(Bytes::new())
        }
        STATUS if removed.load(Ordering::SeqCst) => {
            Answer::Status(tonic::Code::NotFound, format!("container {ID} not found"))
        }
        STATUS => Answer::Message(
            ContainerStatusResponse {
                status: Some(ContainerStatus {
                    id: ID.into(),
                    metadata: Some(ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    state: ContainerState::ContainerRunning as i32,
                    log_path: log_path.clone(),
                    labels: labels(),
                    ..ContainerStatus::default()
                }),
                info: [(
                    "info".to_string(),
                    format!(r#"{{"sandboxID":"{SANDBOX}"}}"#),
                )]
                .into(),
            }
            .encode_to_vec()
            .into(),
        ),
        SANDBOX_STATUS => Answer::Message(
            PodSandboxStatusResponse {
                status: None,
                info: [(
                    "info".to_string(),
                    format!(r#"{{"config":{{"log_directory":"{log_directory}"}}}}"#),
                )]
                .into(),
                ..PodSandboxStatusResponse::default()
            }
            .encode_to_vec()
            .into(),
        ),
        _ => Answer::Status(tonic::Code::Unimplemented, "not in this fake".into()),
    })
    .await
}

fn create_request(log_directory: &str) -> Vec<u8> {
    CreateContainerRequest {
        pod_sandbox_id: SANDBOX.into(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: "registry.example/app:1".into(),
                ..ImageSpec::default()
            }),
            log_path: "app/0.log".into(),
            labels: labels(),
            ..ContainerConfig::default()
        }),
        sandbox_config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-1".into(),
                uid: "uid-1".into(),
                namespace: "team".into(),
                attempt: 0,
            }),
            log_directory: log_directory.into(),
            ..PodSandboxConfig::default()
        }),
    }
    .encode_to_vec()
}

/// kubelet's garbage collection: the log files go, then RemoveContainer; then `kubectl logs`
/// asks ContainerStatus for the log path and reads it.
async fn removed_then_read(proxy: &InProcessProxy, log_path: &str) -> ContainerStatus {
    std::fs::remove_file(log_path).unwrap();
    let remove = RemoveContainerRequest {
        container_id: ID.into(),
    };
    unary(proxy.socket(), REMOVE, remove.encode_to_vec())
        .await
        .expect("remove");
    let status = ContainerStatusRequest {
        container_id: ID.into(),
        verbose: false,
    };
    let answer = unary(proxy.socket(), STATUS, status.encode_to_vec())
        .await
        .expect("an archived container's status");
    ContainerStatusResponse::decode(answer)
        .unwrap()
        .status
        .expect("a status")
}

/// A pod's log directory with its container's live log, the fake containerd and the proxy with
/// its archive in front of it.
struct Node {
    _dir: tempfile::TempDir,
    log_directory: String,
    log_path: String,
    fake: FakeUpstream,
    proxy: InProcessProxy,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods");
        let (log_directory, log_path) = pod_logs(&pods);
        let fake = containerd(log_directory.clone(), log_path.clone()).await;
        let proxy = InProcessProxy::start(
            fake.socket(),
            &archive_toml(&dir.path().join("archive"), &pods),
        )
        .await;
        Node {
            _dir: dir,
            log_directory,
            log_path,
            fake,
            proxy,
        }
    }
}

fn start_request() -> Vec<u8> {
    StartContainerRequest {
        container_id: ID.into(),
    }
    .encode_to_vec()
}

/// Creates the container (through dockhand, or straight on containerd as before dockhand ran)
/// and starts it through dockhand; how often containerd was then asked ContainerStatus and
/// PodSandboxStatus.
async fn create_and_start(node: &Node, through_dockhand: bool) -> (usize, usize) {
    let creator = if through_dockhand {
        node.proxy.socket()
    } else {
        node.fake.socket()
    };
    unary(creator, CREATE, create_request(&node.log_directory))
        .await
        .expect("create");
    unary(node.proxy.socket(), START, start_request())
        .await
        .expect("start");
    (
        node.fake.seen_for(STATUS).len(),
        node.fake.seen_for(SANDBOX_STATUS).len(),
    )
}

/// After the removal, ContainerStatus through dockhand serves the archived log.
async fn assert_archived(node: Node) {
    let status = removed_then_read(&node.proxy, &node.log_path).await;
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    assert_eq!(status.metadata.unwrap().name, "app");
    assert_eq!(status.labels["io.kubernetes.pod.name"], "web-1");
    assert_ne!(
        status.log_path, node.log_path,
        "a restored copy, not kubelet's file"
    );
    assert_eq!(std::fs::read_to_string(&status.log_path).unwrap(), LINE);
    node.proxy.shutdown().await;
}

#[tokio::test]
async fn a_container_created_through_dockhand_is_staged_without_asking_containerd() {
    let node = Node::start().await;
    // CreateContainer said where the log is: containerd was not asked again.
    assert_eq!(create_and_start(&node, true).await, (0, 0));
    assert_archived(node).await;
}

/// cri-api v0.37's kubelet: an env value from a binary Secret is not UTF-8 (`KeyValue.value` is
/// `bytes`), which dockhand's CRI types cannot decode. The record is still kept.
#[tokio::test]
async fn a_container_with_a_non_utf8_env_value_is_recorded_too() {
    let node = Node::start().await;
    let mut request =
        CreateContainerRequest::decode(create_request(&node.log_directory).as_slice()).unwrap();
    request.config.as_mut().unwrap().envs = vec![dockhand_protos::cri::KeyValue {
        key: "FROM_A_BINARY_SECRET".into(),
        value: "placeholder".into(),
    }];
    let mut bytes = request.encode_to_vec();
    let at = bytes.windows(11).position(|w| w == b"placeholder").unwrap();
    bytes[at..at + 11].copy_from_slice(b"\xff\xfe\x00binary!!");
    assert!(CreateContainerRequest::decode(bytes.as_slice()).is_err());
    unary(node.proxy.socket(), CREATE, bytes)
        .await
        .expect("create");
    unary(node.proxy.socket(), START, start_request())
        .await
        .expect("start");
    assert_eq!(
        (
            node.fake.seen_for(STATUS).len(),
            node.fake.seen_for(SANDBOX_STATUS).len()
        ),
        (0, 0),
        "the record said where the log is"
    );
    assert_archived(node).await;
}

#[tokio::test]
async fn a_container_created_before_dockhand_is_looked_up_in_containerd() {
    let node = Node::start().await;
    // No record: one verbose ContainerStatus, one PodSandboxStatus.
    assert_eq!(create_and_start(&node, false).await, (1, 1));
    assert_archived(node).await;
}

//! The forwarder against an in-process fake delegate: calls under both Task service names
//! (`containerd.task.v2.Task` from containerd 1.x, `containerd.task.v3.Task` from 2.x) reach the
//! delegate byte for byte (unknown fields and metadata included), answers and error statuses come
//! back unchanged, the record follows Create/Start/Delete, and the shim stops when the delegate
//! goes away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, DeleteResponse, StartRequest,
    StartResponse,
};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::ttrpc::proto::KeyValue;
use containerd_shim_protos::ttrpc::r#async::Client;
use containerd_shim_protos::ttrpc::{self, Code, Request};
use dockhand_host::cgroup::CgroupMounts;
use dockhand_host::record::{self, State};
use dockhand_shim::daemon::{self, Stopped};
use dockhand_shim::placement::Recorder;
use tokio::net::UnixListener;
use tokio::sync::oneshot;

mod common;

use common::{fake_delegate, Seen, ID};

fn bundle(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let spec = serde_json::json!({
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.sandbox-id": ID,
            "io.kubernetes.cri.sandbox-name": "web",
            "io.kubernetes.cri.sandbox-namespace": "shop",
            "io.kubernetes.cri.sandbox-uid": "u-1",
        },
        "linux": { "cgroupsPath": format!("kubepods-burstable-podu_1.slice:cri-containerd:{ID}") },
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    bundle
}

fn request(service: &str, method: &str, payload: Vec<u8>) -> Request {
    let mut req = Request::new();
    req.service = service.into();
    req.method = method.into();
    req.payload = payload;
    let mut kv = KeyValue::new();
    kv.key = "containerd-namespace-ttrpc".into();
    kv.value = "k8s.io".into();
    req.metadata.push(kv);
    req
}

/// Runs the whole Create → Start → State (error) → Delete sequence under `service` and checks
/// that the delegate saw it under the same name, byte for byte.
async fn forwards_under(service: &str) {
    let dir = tempfile::tempdir().unwrap();
    let delegate_path = dir.path().join("delegate.sock");
    let own_path = dir.path().join("own.sock");
    let records = dir.path().join("records");
    let seen = Seen::default();
    let mut delegate = fake_delegate(&delegate_path, service, &seen).await;

    let recorder = Arc::new(Recorder::new(
        records.clone(),
        PathBuf::from("/proc"),
        CgroupMounts::read().unwrap(),
    ));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let listener = UnixListener::bind(&own_path).unwrap();
    let address = format!("unix://{}", delegate_path.display());
    let shim = tokio::spawn(async move {
        daemon::run(listener, &address, recorder, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let client = Client::connect(&format!("unix://{}", own_path.display()))
        .await
        .unwrap();

    // Create, with an unknown field appended: the delegate gets exactly these bytes.
    let mut create = CreateTaskRequest::new();
    create.id = ID.into();
    create.bundle = bundle(dir.path()).display().to_string();
    let mut payload = create.write_to_bytes().unwrap();
    payload.extend_from_slice(&[0xa0, 0x06, 0x07]); // unknown field 100 = 7
    let res = client
        .request(request(service, "Create", payload.clone()))
        .await
        .unwrap();
    let created = CreateTaskResponse::parse_from_bytes(&res.payload).unwrap();
    assert_eq!(created.pid, std::process::id());
    assert!(
        res.payload.ends_with(&[0xf8, 0x06, 0x2a]),
        "response bytes changed"
    );
    {
        let seen = seen.lock().unwrap();
        let (svc, method, bytes, metadata) = &seen[0];
        assert_eq!((svc.as_str(), method.as_str()), (service, "Create"));
        assert_eq!(bytes, &payload);
        assert_eq!(
            metadata,
            &vec![(
                "containerd-namespace-ttrpc".to_string(),
                "k8s.io".to_string()
            )]
        );
    }
    let rec = record::read(&records, ID)
        .unwrap()
        .expect("record written at Create");
    assert_eq!(rec.state, State::Created);
    assert_eq!(rec.pid, Some(std::process::id()));
    assert_eq!(rec.container_name.as_deref(), Some("app"));
    assert_eq!(rec.pod.as_ref().unwrap().namespace, "shop");
    assert_eq!(rec.driver, record::Driver::Systemd);
    assert_eq!(rec.qos_class, Some(record::QosClass::Burstable));
    // The test process is not in that cgroup: the mismatch is recorded, not hidden.
    assert!(!rec.check.as_ref().unwrap().matches);

    let mut start = StartRequest::new();
    start.id = ID.into();
    let res = client
        .request(request(service, "Start", start.write_to_bytes().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        StartResponse::parse_from_bytes(&res.payload).unwrap().pid,
        std::process::id()
    );
    assert_eq!(
        record::read(&records, ID).unwrap().unwrap().state,
        State::Started
    );

    // Errors pass through with their code and message.
    let err = client
        .request(request(service, "State", b"\x0a\x03abc".to_vec()))
        .await
        .unwrap_err();
    match err {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), Code::NOT_FOUND);
            assert_eq!(status.message, format!("State: container {ID} not found"));
        }
        other => panic!("expected a status, got {other:?}"),
    }
    // A service name nobody serves is not forwarded.
    let err = client
        .request(request("containerd.task.v9.Task", "State", Vec::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, ttrpc::Error::RpcStatus(_)));

    let mut delete = DeleteRequest::new();
    delete.id = ID.into();
    let res = client
        .request(request(service, "Delete", delete.write_to_bytes().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        DeleteResponse::parse_from_bytes(&res.payload)
            .unwrap()
            .exit_status,
        137
    );
    assert_eq!(
        record::read(&records, ID).unwrap(),
        None,
        "record removed at Delete"
    );
    let methods: Vec<String> = seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
    assert_eq!(methods, ["Create", "Start", "State", "Delete"]);

    // The delegate goes away: the shim stops by itself.
    delegate.shutdown().await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), shim)
        .await
        .expect("shim did not stop after the delegate went away")
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Stopped::DelegateExited);
    drop(stop_tx);
}

#[tokio::test]
async fn v3_calls_are_forwarded_under_v3() {
    forwards_under("containerd.task.v3.Task").await;
}

#[tokio::test]
async fn v2_calls_are_forwarded_under_v2() {
    forwards_under("containerd.task.v2.Task").await;
}

//! The proxy alone, in front of a fake containerd that records the exact bytes it receives:
//! what passes through must arrive unchanged, what dockhand edits must change only what it says.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dockhand_integration::fake::{Answer, FakeUpstream, InProcessProxy};
use dockhand_protos::codec::RawCodec;
use dockhand_protos::cri::{
    ContainerConfig, ContainerMetadata, Mount, PodSandboxConfig, PodSandboxMetadata,
    VersionResponse,
};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

async fn channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect")
}

async fn unary(socket: &Path, path: &'static str, message: Bytes) -> Result<Bytes, tonic::Status> {
    unary_request(socket, path, tonic::Request::new(message)).await
}

async fn unary_request(
    socket: &Path,
    path: &'static str,
    request: tonic::Request<Bytes>,
) -> Result<Bytes, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel(socket).await)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    grpc.ready().await.expect("ready");
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A length-delimited field, encoded by hand so tests control every byte.
fn field(number: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}

fn varint_field(number: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::Varint, &mut out);
    prost::encoding::encode_varint(value, &mut out);
    out
}

#[tokio::test]
async fn create_container_edit_keeps_every_other_byte() {
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::new())).await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;

    // A mount of host "/" with no propagation, carrying a field this proto does not know.
    let mut mount = Mount {
        container_path: "/rootfs".into(),
        host_path: "/".into(),
        readonly: true,
        ..Default::default()
    }
    .encode_to_vec();
    mount.extend(varint_field(99, 7));
    let mut config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "node-exporter".into(),
            attempt: 0,
        }),
        log_path: "node-exporter/0.log".into(),
        ..Default::default()
    }
    .encode_to_vec();
    config.extend(field(7, &mount));
    config.extend(field(500, b"a field from a newer kubelet"));
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "node-exporter-x".into(),
            namespace: "monitoring".into(),
            uid: "u1".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let top_unknown = varint_field(777, 1);
    let request = [
        field(1, b"sandbox-id"),
        field(2, &config),
        field(3, &sandbox),
        top_unknown.clone(),
    ]
    .concat();

    unary(
        proxy.socket(),
        "/runtime.v1.RuntimeService/CreateContainer",
        Bytes::from(request.clone()),
    )
    .await
    .expect("create goes through");

    let seen = fake.seen_for("/runtime.v1.RuntimeService/CreateContainer");
    assert_eq!(seen.len(), 1);
    let received = seen[0].message();
    // This machine's "/" is private (a measured fact, REFERENCE.md section 6), so the only
    // edit is the decision annotation appended to the config; everything else is byte-equal.
    let annotation = [
        field(1, b"dockhand.io/mount-propagation"),
        field(2, b"/rootfs=private(host mount private)"),
    ]
    .concat();
    let expected_config = [config.clone(), field(10, &annotation)].concat();
    let expected = [
        field(1, b"sandbox-id"),
        field(2, &expected_config),
        field(3, &sandbox),
        top_unknown,
    ]
    .concat();
    assert!(
        received.as_ref() == expected.as_slice(),
        "received {received:02x?}\nexpected {expected:02x?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn undecodable_create_container_is_forwarded_unchanged() {
    let fake = FakeUpstream::start(|_, _| {
        Answer::Status(tonic::Code::InvalidArgument, "bad request".into())
    })
    .await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    let garbage = Bytes::from_static(&[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    let status = unary(
        proxy.socket(),
        "/runtime.v1.RuntimeService/CreateContainer",
        garbage.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "bad request");
    let seen = fake.seen_for("/runtime.v1.RuntimeService/CreateContainer");
    assert!(seen[0].message() == garbage, "the bytes were changed");
}

#[tokio::test]
async fn errors_metadata_and_unknown_methods_pass_through() {
    let fake = FakeUpstream::start(|path, _| match path {
        "/runtime.v1.RuntimeService/Version" => Answer::Message(
            VersionResponse {
                version: "0.1.0".into(),
                runtime_name: "fake".into(),
                runtime_version: "1".into(),
                runtime_api_version: "v1".into(),
            }
            .encode_to_vec()
            .into(),
        ),
        _ => Answer::Status(tonic::Code::NotFound, format!("{path}: not here")),
    })
    .await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;

    let mut request = tonic::Request::new(Bytes::new());
    request
        .metadata_mut()
        .insert("x-dockhand-test", "kept".parse().unwrap());
    let version = unary_request(
        proxy.socket(),
        "/runtime.v1.RuntimeService/Version",
        request,
    )
    .await
    .unwrap();
    assert_eq!(
        VersionResponse::decode(version).unwrap().runtime_name,
        "fake"
    );
    assert_eq!(
        fake.seen_for("/runtime.v1.RuntimeService/Version")[0].headers["x-dockhand-test"],
        "kept"
    );

    let status = unary(
        proxy.socket(),
        "/some.future.Service/Method",
        Bytes::from_static(b"\x08\x01"),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), "/some.future.Service/Method: not here");
    assert_eq!(
        fake.seen_for("/some.future.Service/Method")[0].message(),
        Bytes::from_static(b"\x08\x01")
    );
}

#[tokio::test]
async fn server_streams_pass_through_in_order() {
    let events: Vec<Bytes> = (0..50u8).map(|i| Bytes::from(vec![0x0a, 1, i])).collect();
    let answer = events.clone();
    let fake = FakeUpstream::start(move |_, _| Answer::Stream(answer.clone())).await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    let mut grpc = tonic::client::Grpc::new(channel(proxy.socket()).await);
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(Bytes::new()),
            http::uri::PathAndQuery::from_static("/runtime.v1.RuntimeService/GetContainerEvents"),
            RawCodec,
        )
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        received.push(event);
    }
    assert_eq!(received, events);
}

#[tokio::test]
async fn sixteen_mib_messages_pass_both_ways() {
    let big = Bytes::from(vec![b'x'; 12 << 20]);
    let reply = big.clone();
    let fake = FakeUpstream::start(move |_, _| Answer::Message(reply.clone())).await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    // A bytes field 1 of 12 MiB: bigger than tonic's 4 MiB default on both sides.
    let request = Bytes::from(field(1, &big));
    let answer = unary(
        proxy.socket(),
        "/runtime.v1.RuntimeService/ExecSync",
        request.clone(),
    )
    .await
    .unwrap();
    assert_eq!(answer.len(), big.len());
    let seen = fake.seen_for("/runtime.v1.RuntimeService/ExecSync");
    assert!(
        seen[0].message() == request,
        "the 12 MiB request was changed"
    );
    // The intercepted path reads whole bodies: the same size must pass there too.
    unary(
        proxy.socket(),
        "/runtime.v1.RuntimeService/CreateContainer",
        request,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn containerd_down_is_unavailable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("containerd.sock");
    let proxy = InProcessProxy::start(&missing, "").await;
    let started = Instant::now();
    let status = unary(
        proxy.socket(),
        "/runtime.v1.RuntimeService/Version",
        Bytes::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("containerd"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let status = unary(
        proxy.socket(),
        "/runtime.v1.RuntimeService/CreateContainer",
        Bytes::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn a_fake_that_comes_back_is_reached_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("containerd.sock");
    let proxy = InProcessProxy::start(&socket, "").await;
    let status = unary(
        proxy.socket(),
        "/runtime.v1.RuntimeService/Version",
        Bytes::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);

    // containerd comes up at the configured socket.
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::from_static(b"\x0a\x01v"))).await;
    std::os::unix::fs::symlink(fake.socket(), &socket).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match unary(
            proxy.socket(),
            "/runtime.v1.RuntimeService/Version",
            Bytes::new(),
        )
        .await
        {
            Ok(reply) => {
                assert_eq!(reply, Bytes::from_static(b"\x0a\x01v"));
                break;
            }
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("proxy never reconnected: {status:?}"),
        }
    }
}

#[test]
fn a_bad_config_is_a_clear_error_and_exit_code_64() {
    let bin = dockhand_integration::proxy::proxy_binary().expect("dockhand binary");
    let dir = tempfile::tempdir().unwrap();
    for (text, says) in [
        ("lisen = \"/run/x.sock\"\n", "unknown field `lisen`"),
        (
            "[propagation]\nmode = \"sometimes\"\n",
            "unknown variant `sometimes`",
        ),
        (
            "listen = \"relative.sock\"\n",
            "listen: relative.sock is not an absolute path",
        ),
        (
            "metrics_address = \"0.0.0.0:9\"\n",
            "is not a loopback address",
        ),
    ] {
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["proxy", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {stderr}");
        assert!(stderr.contains(says), "{text}: {stderr}");
    }
    let out = std::process::Command::new(&bin)
        .args(["proxy", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_an_in_flight_call_finish_and_stops_accepting() {
    // containerd takes 700 ms to answer this call.
    let fake = FakeUpstream::start(|_, _| {
        Answer::Delayed(
            Duration::from_millis(700),
            Box::new(Answer::Message(Bytes::from_static(b"\x0a\x01v"))),
        )
    })
    .await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    let socket = proxy.socket().to_path_buf();
    let client = channel(&socket).await;
    let call = tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(client);
        grpc.ready().await.unwrap();
        grpc.unary(
            tonic::Request::new(Bytes::new()),
            http::uri::PathAndQuery::from_static("/runtime.v1.RuntimeService/Version"),
            RawCodec,
        )
        .await
    });
    // Shut down only once the call is in flight: containerd (the fake) has received it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake
        .seen_for("/runtime.v1.RuntimeService/Version")
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the call never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    proxy.shutdown().await;
    // The server returned only after the call it was serving had its answer.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let answer = call.await.unwrap().expect("the in-flight call completes");
    assert_eq!(answer.into_inner(), Bytes::from_static(b"\x0a\x01v"));
    assert!(!socket.exists(), "the socket is removed");
    assert!(UnixStream::connect(&socket).await.is_err());
}

//! The proxy alone, in front of a fake containerd that records the exact bytes it receives:
//! what passes through must arrive unchanged, what dockhand edits must change only what it says.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dockhand_integration::cri::{grpc_field, grpc_request};
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

/// What a caller's HTTP/2 stack sees of one call: the response head, whether that HEADERS frame
/// ended the stream (a trailers-only reply), and the trailers after the body, if any.
struct Framed {
    head: http::response::Parts,
    trailers_only: bool,
    trailers: Option<http::HeaderMap>,
}

/// One gRPC call on a plain HTTP/2 connection (no gRPC library in between), with grpc-go's
/// header-list limit (16 MiB) instead of hyper's 16 KiB.
async fn framed_call(socket: &Path, path: &str, message: &[u8]) -> Result<Framed, hyper::Error> {
    use http_body_util::BodyExt;
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_header_list_size(16 << 20)
            .handshake(TokioIo::new(stream))
            .await?;
    tokio::spawn(connection);
    let request = grpc_request(
        path,
        http_body_util::Full::new(dockhand_protos::codec::frame(message)),
    );
    let response = sender.send_request(request).await?;
    let (head, body) = response.into_parts();
    let trailers_only = hyper::body::Body::is_end_stream(&body);
    let trailers = body.collect().await?.trailers().cloned();
    Ok(Framed {
        head,
        trailers_only,
        trailers,
    })
}

fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    grpc_field(headers, None, "grpc-status")
}

const INTERCEPTED: [&str; 6] = [
    "/runtime.v1.RuntimeService/CreateContainer",
    "/runtime.v1.RuntimeService/StartContainer",
    "/runtime.v1.RuntimeService/ReopenContainerLog",
    "/runtime.v1.RuntimeService/RemoveContainer",
    "/runtime.v1.RuntimeService/RemovePodSandbox",
    "/runtime.v1.RuntimeService/ContainerStatus",
];

#[tokio::test]
async fn errors_stay_trailers_only() {
    // grpc-go clients (kubelet, crictl) read headers + an empty DATA frame as "Internal: server
    // closed the stream without sending trailers": the framing is part of the answer.
    let fake = FakeUpstream::start(|path, _| {
        Answer::Status(tonic::Code::NotFound, format!("{path}: not found"))
    })
    .await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    for path in INTERCEPTED
        .iter()
        .chain(&["/runtime.v1.RuntimeService/Version"])
    {
        let direct = framed_call(fake.socket(), path, b"").await.unwrap();
        let proxied = framed_call(proxy.socket(), path, b"").await.unwrap();
        assert!(
            direct.trailers_only,
            "{path}: the fake itself is trailers-only"
        );
        assert!(
            proxied.trailers_only,
            "{path}: through dockhand the error is not one HEADERS frame with END_STREAM"
        );
        assert_eq!(
            grpc_status(&proxied.head.headers),
            Some("5".into()),
            "{path}"
        );
        assert_eq!(
            proxied.head.headers.get("grpc-message"),
            direct.head.headers.get("grpc-message"),
            "{path}"
        );
        assert!(proxied.trailers.is_none(), "{path}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn successes_keep_headers_data_trailers() {
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::from_static(b"\x0a\x01x"))).await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    for path in [
        "/runtime.v1.RuntimeService/ContainerStatus",
        "/runtime.v1.RuntimeService/Version",
    ] {
        let proxied = framed_call(proxy.socket(), path, b"").await.unwrap();
        assert!(!proxied.trailers_only, "{path}");
        assert_eq!(grpc_status(&proxied.head.headers), None, "{path}");
        let trailers = proxied.trailers.expect("trailers after the message");
        assert_eq!(grpc_status(&trailers), Some("0".into()), "{path}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn resets_reach_the_caller_with_their_reason() {
    // containerd (grpc-go) resets streams it refuses; a caller must see the same reset, which its
    // library maps to a code (REFUSED_STREAM: Unavailable, CANCEL: Cancelled, ...), not a status
    // dockhand made up.
    let fake = FakeUpstream::start(|path, _| {
        if path.ends_with("/Version") {
            Answer::Reset(h2::Reason::REFUSED_STREAM)
        } else {
            Answer::Reset(h2::Reason::ENHANCE_YOUR_CALM)
        }
    })
    .await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    for (path, reason, code) in [
        (
            "/runtime.v1.RuntimeService/Version",
            h2::Reason::REFUSED_STREAM,
            tonic::Code::Unavailable,
        ),
        (
            "/runtime.v1.RuntimeService/ContainerStatus",
            h2::Reason::ENHANCE_YOUR_CALM,
            tonic::Code::ResourceExhausted,
        ),
    ] {
        let error = match framed_call(proxy.socket(), path, b"").await {
            Ok(framed) => panic!("{path}: answered {:?} instead of a reset", framed.head),
            Err(e) => e,
        };
        let h2 = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<h2::Error>())
            .unwrap_or_else(|| panic!("{path}: not a stream reset: {error}"));
        assert_eq!(h2.reason(), Some(reason), "{path}");
        let status = unary(proxy.socket(), path, Bytes::new()).await.unwrap_err();
        assert_eq!(status.code(), code, "{path}: {status:?}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_17_kb_error_message_passes() {
    // containerd echoes the id it was given into grpc-message: a 17,000-byte id makes a header
    // list larger than hyper's 16 KiB default, well under grpc-go's 16 MiB.
    let fake = FakeUpstream::start(|_, _| {
        Answer::Status(
            tonic::Code::NotFound,
            format!("container {} not found", "a".repeat(17_000)),
        )
    })
    .await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    for path in [
        "/runtime.v1.RuntimeService/ContainerStatus",
        "/runtime.v1.RuntimeService/StopContainer",
    ] {
        let proxied = framed_call(proxy.socket(), path, b"").await.unwrap();
        assert_eq!(
            grpc_status(&proxied.head.headers),
            Some("5".into()),
            "{path}"
        );
        let message = proxied.head.headers["grpc-message"].len();
        assert!(message > 17_000, "{path}: grpc-message of {message} bytes");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_bodies_are_bounded() {
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::new())).await;
    let proxy = InProcessProxy::start(fake.socket(), "").await;
    let path = "/runtime.v1.RuntimeService/CreateContainer";
    // One byte over kubelet's 16 MiB message limit: refused without reaching containerd.
    let big = vec![0u8; (16 << 20) + 1];
    let proxied = framed_call(proxy.socket(), path, &big).await.unwrap();
    assert_eq!(grpc_status(&proxied.head.headers), Some("8".into()));
    assert!(fake.seen_for(path).is_empty());
    // Exactly 16 MiB is a message kubelet may send: it reaches containerd.
    let limit = vec![0u8; 16 << 20];
    let proxied = framed_call(proxy.socket(), path, &limit).await.unwrap();
    let trailers = proxied.trailers.expect("a whole answer");
    assert_eq!(grpc_status(&trailers), Some("0".into()));
    assert_eq!(fake.seen_for(path).len(), 1);
    proxy.shutdown().await;
}

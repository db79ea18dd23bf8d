//! gRPC framing at the HTTP/2 frame level, through dockhand exactly as straight from containerd.
//!
//! A grpc-go server answers an error *trailers-only*: one HEADERS frame with `grpc-status`,
//! `grpc-message` and END_STREAM. Headers without END_STREAM followed by an empty DATA frame
//! with END_STREAM is what grpc-go reports as `Internal: server closed the stream without
//! sending trailers`. A success is HEADERS, DATA, then trailing HEADERS with END_STREAM.
//!
//! A relay between a plain HTTP/2 client (hyper) and the server records the frames the server
//! sends (type and flags; the headers themselves are read back by the client).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::BytesMut;
use dockhand_integration::api;
use dockhand_integration::cri::{grpc_field, grpc_request};
use dockhand_integration::{ContainerSpec, Node, NodeOptions, PodSpec, ProxyProcess};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const UNKNOWN_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// One frame the server sent on a stream: `HEADERS`, `DATA`, `RST_STREAM`..., `+END_STREAM`
/// when it ends the stream. Consecutive DATA frames without END_STREAM are one entry.
type Shape = Vec<String>;

/// What one call looked like: the frames, and the status the client read.
#[derive(Debug, PartialEq)]
struct Reply {
    frames: Shape,
    /// `grpc-status` and `grpc-message`, from the headers (trailers-only) or the trailers.
    status: Option<String>,
    message: Option<String>,
}

/// A relay on a socket of its own in front of `target`, recording each server frame as
/// (stream id, type, flags).
struct Relay {
    socket: PathBuf,
    frames: Arc<Mutex<Vec<(u32, u8, u8)>>>,
    _dir: tempfile::TempDir,
}

impl Relay {
    async fn start(target: &Path) -> Result<Relay> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("relay.sock");
        let listener = UnixListener::bind(&socket)?;
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (target, recorded) = (target.to_path_buf(), frames.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = UnixStream::connect(&target).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut pending = BytesMut::new();
                    let mut chunk = vec![0u8; 64 << 10];
                    loop {
                        let n = match server_read.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&chunk[..n]);
                        // Frame header: 24-bit length, type, flags, 31-bit stream id.
                        while pending.len() >= 9 {
                            let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]])
                                as usize;
                            if pending.len() < 9 + len {
                                break;
                            }
                            let id = u32::from_be_bytes([
                                pending[5], pending[6], pending[7], pending[8],
                            ]) & 0x7fff_ffff;
                            recorded.lock().unwrap().push((id, pending[3], pending[4]));
                            let _ = pending.split_to(9 + len);
                        }
                        if client_write.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Relay {
            socket,
            frames,
            _dir: dir,
        })
    }

    /// The frames the server sent on `stream`, as a [`Shape`].
    fn shape(&self, stream: u32) -> Shape {
        let mut shape: Shape = Vec::new();
        for &(id, kind, flags) in self.frames.lock().unwrap().iter() {
            if id != stream {
                continue;
            }
            let name = match kind {
                0 => "DATA",
                1 => "HEADERS",
                3 => "RST_STREAM",
                8 => "WINDOW_UPDATE",
                9 => "CONTINUATION",
                _ => "OTHER",
            };
            // END_STREAM is flag 0x1 on DATA and HEADERS only.
            let end = (kind == 0 || kind == 1) && flags & 0x1 != 0;
            let entry = format!("{name}{}", if end { "+END_STREAM" } else { "" });
            if entry == "DATA" && shape.last().map(String::as_str) == Some("DATA") {
                continue;
            }
            if entry == "WINDOW_UPDATE" {
                continue;
            }
            shape.push(entry);
        }
        shape
    }
}

/// One unary call of `method` with the encoded `message`, over a fresh HTTP/2 connection through a relay in
/// front of `socket`.
async fn call(socket: &Path, method: &str, message: &[u8]) -> Result<Reply> {
    let relay = Relay::start(socket).await?;
    let stream = UnixStream::connect(&relay.socket).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = grpc_request(
        &format!("/runtime.v1.RuntimeService/{method}"),
        Full::new(dockhand_protos::codec::frame(message)),
    );
    let response = sender.send_request(request).await.context("send")?;
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.context("body")?;
    let field = |name: &str| grpc_field(&headers, collected.trailers(), name);
    // The client's first stream is 1.
    Ok(Reply {
        frames: relay.shape(1),
        status: field("grpc-status"),
        message: field("grpc-message"),
    })
}

fn trailers_only() -> Shape {
    vec!["HEADERS+END_STREAM".to_string()]
}

fn success() -> Shape {
    ["HEADERS", "DATA", "HEADERS+END_STREAM"]
        .map(String::from)
        .to_vec()
}

/// Errors of the intercepted methods are trailers-only through dockhand, as from containerd,
/// with the same status and message.
#[tokio::test(flavor = "multi_thread")]
async fn intercepted_errors_are_trailers_only_like_containerds() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let cri = node.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("framing")).await?;
    let config = cri
        .container_config(&pod.spec, &ContainerSpec::sleeper("app"))
        .await?;
    let unknown = UNKNOWN_ID.to_string();
    let calls = [
        (
            "CreateContainer",
            api::CreateContainerRequest {
                pod_sandbox_id: unknown.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }
            .encode_to_vec(),
        ),
        (
            "StartContainer",
            api::StartContainerRequest {
                container_id: unknown.clone(),
            }
            .encode_to_vec(),
        ),
        (
            "ReopenContainerLog",
            api::ReopenContainerLogRequest {
                container_id: unknown.clone(),
            }
            .encode_to_vec(),
        ),
        (
            "ContainerStatus",
            api::ContainerStatusRequest {
                container_id: unknown,
                verbose: false,
            }
            .encode_to_vec(),
        ),
        // containerd answers an empty id with an error (an unknown one is removed: OK).
        (
            "RemoveContainer",
            api::RemoveContainerRequest::default().encode_to_vec(),
        ),
    ];
    let mut failures = Vec::new();
    for (method, request) in &calls {
        let direct = call(node.containerd_socket(), method, request).await?;
        let via_proxy = call(&proxy.socket(), method, request).await?;
        assert_eq!(
            direct.frames,
            trailers_only(),
            "{method}: containerd's error reply: {direct:?}"
        );
        assert_ne!(direct.status.as_deref(), Some("0"), "{method}: {direct:?}");
        if direct != via_proxy {
            failures.push(format!(
                "{method}:\n  direct:        {direct:?}\n  through proxy: {via_proxy:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "error replies differ through dockhand:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Successes keep their shape too: HEADERS, DATA, trailing HEADERS, for an intercepted method
/// (ContainerStatus of a live container) and a passthrough one (Version).
#[tokio::test(flavor = "multi_thread")]
async fn successes_are_headers_data_trailers_like_containerds() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let cri = node.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("framing")).await?;
    let container = cri
        .run_container(&pod, &ContainerSpec::sleeper("app"))
        .await?;
    let calls = [
        (
            "ContainerStatus",
            api::ContainerStatusRequest {
                container_id: container,
                verbose: false,
            }
            .encode_to_vec(),
        ),
        (
            "Version",
            api::VersionRequest {
                version: "v1".into(),
            }
            .encode_to_vec(),
        ),
    ];
    for (method, request) in &calls {
        let direct = call(node.containerd_socket(), method, request).await?;
        let via_proxy = call(&proxy.socket(), method, request).await?;
        assert_eq!(direct.frames, success(), "{method} direct: {direct:?}");
        assert_eq!(direct.status.as_deref(), Some("0"), "{method}: {direct:?}");
        assert_eq!(via_proxy, direct, "{method} through dockhand");
    }
    Ok(())
}

//! One misbehaving client must not hurt the others, and nothing a client half-sends may be held
//! forever: a reader that never reads (small flow-control window, big answers), connections that
//! never send the HTTP/2 preface, a request body that never ends, a body over the 16 MiB limit.

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use dockhand_integration::api;
use dockhand_integration::clients::{Client, Driver};
use dockhand_integration::cri::{grpc_field, grpc_request};
use dockhand_integration::{ContainerSpec, Cri, Node, NodeOptions, PodSpec, ProxyProcess};
use futures::channel::mpsc;
use futures::SinkExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// The slow reader: 5 ListContainers of at least 2.5 MB each, on one connection with a 64 KiB
/// window, never read.
const STALLED_CALLS: usize = 5;
const STALLED_WINDOW: u32 = 64 << 10;
const LIST_BYTES: usize = 2_500_000;
/// The other caller: 50 Versions on a connection of its own, each within 2 s, the slowest under 1 s.
const VERSION_CALLS: usize = 50;
const VERSION_DEADLINE: Duration = Duration::from_secs(2);
const VERSION_BOUND: Duration = Duration::from_secs(1);

/// `VERSION_CALLS` Versions on a new connection to `socket`: each call's latency, or the error
/// (DEADLINE_EXCEEDED after `VERSION_DEADLINE`). Stops after 3 failures.
async fn version_latencies(cri: &Cri) -> Vec<Result<Duration, tonic::Status>> {
    let mut latencies = Vec::new();
    for _ in 0..VERSION_CALLS {
        let start = Instant::now();
        let outcome = match tokio::time::timeout(VERSION_DEADLINE, cri.version()).await {
            Ok(Ok(_)) => Ok(start.elapsed()),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "test: Version took over 2 s",
            )),
        };
        latencies.push(outcome);
        if latencies.iter().filter(|l| l.is_err()).count() >= 3 {
            break;
        }
    }
    latencies
}

/// Stalls a grpc-go reader on `socket`, then measures another caller's Versions.
async fn with_a_stalled_reader(
    socket: &Path,
    other: &Cri,
) -> Result<Vec<Result<Duration, tonic::Status>>> {
    let mut reader = Driver::start(Client::GrpcGo, socket).await?;
    let started = reader
        .stall(
            "ListContainers",
            &api::ListContainersRequest { filter: None },
            STALLED_CALLS,
            STALLED_WINDOW,
        )
        .await?;
    anyhow::ensure!(
        started.code == tonic::Code::Ok,
        "stall: {:?}",
        started.status()
    );
    // Let the answers fill every window on the way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let latencies = version_latencies(other).await;
    drop(reader);
    Ok(latencies)
}

fn summary(latencies: &[Result<Duration, tonic::Status>]) -> String {
    let mut ok: Vec<Duration> = latencies.iter().filter_map(|l| l.clone().ok()).collect();
    ok.sort();
    let errors: Vec<String> = latencies
        .iter()
        .filter_map(|l| l.as_ref().err())
        .map(|s| format!("{:?}: {}", s.code(), s.message()))
        .collect();
    format!(
        "{} calls, {} failed {errors:?}, median {:?}, slowest {:?}",
        latencies.len(),
        errors.len(),
        ok.get(ok.len() / 2),
        ok.last()
    )
}

/// A client that stops reading big answers does not stall other callers: their Version latency
/// through dockhand stays within the bound, as it does straight from containerd.
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_never_reads_does_not_stall_other_callers() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let cri = node.cri().await?;
    // Real containers whose ListContainers answer is over 2.5 MB: kubelet-shaped, each with a
    // 256 KiB annotation (annotations are returned by ListContainers).
    let pod = cri.run_pod(&PodSpec::new("big-list")).await?;
    let mut spec = ContainerSpec::sleeper("padded");
    spec.annotations
        .insert("dockhand.test/padding".into(), "p".repeat(256 << 10));
    for n in 0..10 {
        spec.name = format!("padded-{n}");
        cri.create_container(&pod, &spec).await?;
    }
    let listed = api::ListContainersResponse {
        containers: cri.list_containers(None).await?,
    };
    assert!(
        listed.encoded_len() >= LIST_BYTES,
        "ListContainers is only {} bytes",
        listed.encoded_len()
    );

    let direct = with_a_stalled_reader(node.containerd_socket(), &node.cri().await?).await?;
    let via_proxy = with_a_stalled_reader(&proxy.socket(), &proxy.cri().await?).await?;
    let report = format!(
        "direct: {}\nthrough dockhand: {}",
        summary(&direct),
        summary(&via_proxy)
    );
    eprintln!("{report}");
    // Straight from containerd the other caller is unaffected (the comparison's baseline).
    assert!(direct.iter().all(|l| l.is_ok()), "{report}");
    for latency in &via_proxy {
        match latency {
            Ok(latency) => assert!(*latency < VERSION_BOUND, "{report}"),
            Err(status) => panic!("Version through dockhand failed: {status:?}\n{report}"),
        }
    }
    assert_eq!(via_proxy.len(), VERSION_CALLS, "{report}");
    Ok(())
}

/// Connections that never send the HTTP/2 preface are closed after the handshake timeout, and
/// do not lock new clients out, even when the proxy has only 1,024 file descriptors (a proxy run
/// by hand, or a unit without LimitNOFILE).
#[tokio::test(flavor = "multi_thread")]
async fn silent_peers_do_not_lock_out_new_clients() -> Result<()> {
    const SILENT: usize = 1_100;
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "handshake_timeout_seconds = 2").await?;
    let pid = proxy.pid().context("proxy pid")?;
    let limited = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--nofile=1024:1024")
        .status()?;
    anyhow::ensure!(limited.success(), "prlimit: {limited}");

    let mut silent = Vec::new();
    for _ in 0..SILENT {
        match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(proxy.socket()))
            .await
        {
            Ok(Ok(stream)) => silent.push(stream),
            Ok(Err(e)) => bail!("silent connection {}: {e}", silent.len()),
            Err(_) => bail!("silent connection {}: connect hung", silent.len()),
        }
    }
    // A new client, while all of them are still open.
    let start = Instant::now();
    let bound = HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    let version = tokio::time::timeout(bound, async {
        let cri = proxy.cri().await?;
        anyhow::Ok(cri.version().await?)
    })
    .await;
    match version {
        Ok(Ok(version)) => assert_eq!(version.runtime_name, "containerd"),
        Ok(Err(e)) => panic!("Version with {SILENT} silent peers: {e:#}"),
        Err(_) => panic!(
            "no Version within {bound:?} with {SILENT} silent peers open; proxy log:\n{}",
            tail(&proxy.log())
        ),
    }
    eprintln!("Version with {SILENT} silent peers: {:?}", start.elapsed());

    // And the proxy closed every silent connection (read to EOF), within two timeouts and a margin.
    let deadline = Instant::now() + 2 * HANDSHAKE_TIMEOUT + Duration::from_secs(8);
    let closed = futures::future::join_all(silent.into_iter().map(|mut stream| async move {
        let mut buf = [0u8; 1024];
        let read_to_end = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout_at(deadline.into(), read_to_end)
            .await
            .is_ok()
    }))
    .await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} of {SILENT} silent connections still open");
    Ok(())
}

fn tail(log: &str) -> &str {
    &log[log.len().saturating_sub(3000)..]
}

type BodySender = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// Starts a call of `method` on a new HTTP/2 connection to `socket` whose request body the test
/// writes through the returned sender; the future resolves to (grpc-status, grpc-message).
async fn open_call(
    socket: &Path,
    method: &str,
) -> Result<(
    BodySender,
    tokio::task::JoinHandle<Result<(Option<String>, Option<String>)>>,
)> {
    let stream = UnixStream::connect(socket).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (body, frames) = mpsc::channel(4);
    let request = grpc_request(
        &format!("/runtime.v1.RuntimeService/{method}"),
        StreamBody::new(frames),
    );
    let reply = tokio::spawn(async move {
        let response = sender
            .send_request(request)
            .await
            .context("no response (stream reset?)")?;
        let headers = response.headers().clone();
        let collected = response.into_body().collect().await.context("body")?;
        let field = |name: &str| grpc_field(&headers, collected.trailers(), name);
        Ok((field("grpc-status"), field("grpc-message")))
    });
    Ok((body, reply))
}

/// A CreateContainer whose body never finishes is answered with an error status once
/// `request_body_timeout_seconds` pass, and the proxy keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn an_unfinished_request_body_is_answered_after_the_body_timeout() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "request_body_timeout_seconds = 2").await?;
    let (mut body, reply) = open_call(&proxy.socket(), "CreateContainer").await?;
    // A gRPC frame announcing 1,000 bytes, and only 100 of them.
    let mut part = vec![0u8];
    part.extend_from_slice(&1000u32.to_be_bytes());
    part.extend_from_slice(&[0x0a; 100]);
    let start = Instant::now();
    body.send(Ok(Frame::data(Bytes::from(part)))).await?;
    let bound = Duration::from_secs(2 + 5);
    let answer = tokio::time::timeout(bound, reply).await;
    let elapsed = start.elapsed();
    drop(body);
    let (status, message) = match answer {
        Ok(joined) => joined??,
        Err(_) => panic!("no answer to an unfinished body within {bound:?}"),
    };
    eprintln!("unfinished body: grpc-status {status:?}, {message:?} after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(1500),
        "answered before the timeout: {elapsed:?}"
    );
    let code = status.context("no grpc-status")?;
    assert_ne!(code, "0", "an unfinished body answered OK");
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "no grpc-message with status {code}"
    );
    // The proxy still serves.
    proxy.cri().await?.version().await?;
    Ok(())
}

/// A request body over 16 MiB + 5 bytes is refused with RESOURCE_EXHAUSTED, as containerd does.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_message_limit_is_resource_exhausted_like_containerds() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let mut codes = Vec::new();
    for socket in [node.containerd_socket().to_path_buf(), proxy.socket()] {
        let (mut body, reply) = open_call(&socket, "CreateContainer").await?;
        let length = (16 << 20) + 1;
        let writer = tokio::spawn(async move {
            let mut first = vec![0u8];
            first.extend_from_slice(&(length as u32).to_be_bytes());
            body.send(Ok(Frame::data(Bytes::from(first)))).await?;
            let chunk = Bytes::from(vec![0x0a; 1 << 20]);
            let mut sent = 0;
            while sent < length {
                let n = chunk.len().min(length - sent);
                body.send(Ok(Frame::data(chunk.slice(..n)))).await?;
                sent += n;
            }
            anyhow::Ok(())
        });
        let answer = tokio::time::timeout(Duration::from_secs(60), reply)
            .await
            .context("no answer to a body over 16 MiB")???;
        writer.abort();
        codes.push(answer);
    }
    eprintln!("direct: {:?}\nthrough dockhand: {:?}", codes[0], codes[1]);
    let resource_exhausted = Some((tonic::Code::ResourceExhausted as i32).to_string());
    assert_eq!(codes[0].0, resource_exhausted, "containerd: {:?}", codes[0]);
    assert_eq!(codes[1].0, resource_exhausted, "dockhand: {:?}", codes[1]);
    Ok(())
}

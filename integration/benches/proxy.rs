//! `make bench`: the proxy's cost, measured against calling the same upstream directly in the
//! same run. Prints figures and ratios; asserts nothing (timings are noisy on shared machines).
//!
//! Sections:
//! 1. A fake containerd in this process, the real `dockhand` binary in front of it: Version,
//!    ContainerStatus and ListContainers(1,000) p50/p99, throughput with 16 concurrent callers,
//!    and the proxy's RSS under that load.
//! 2. CreateContainer (~10 KB, 20 mounts, 50 annotations) through the intercepted path (decision
//!    plus byte edit) against the same bytes on a path the proxy passes through untouched, and the
//!    decision plus edit alone, in process.
//!    Then callers beside each other: a Version call's p99 while 500 ListContainers(4,000) stream
//!    on another connection, and while one caller has 5 of them stalled (never read, 64 KiB
//!    windows), each as a ratio to the same figure without them.
//! 3. The real containerd (sandboxed by the harness): Version, ContainerStatus, ListContainers,
//!    and throughput with 16 concurrent callers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dockhand_integration::cri::{ContainerSpec, PodSpec};
use dockhand_integration::fake::{Answer, FakeUpstream};
use dockhand_integration::node::{Node, NodeOptions};
use dockhand_integration::proxy::ProxyProcess;
use dockhand_protos::codec::RawCodec;
use dockhand_protos::cri;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

const VERSION: &str = "/runtime.v1.RuntimeService/Version";
const STATUS: &str = "/runtime.v1.RuntimeService/ContainerStatus";
const LIST: &str = "/runtime.v1.RuntimeService/ListContainers";
const CREATE: &str = "/runtime.v1.RuntimeService/CreateContainer";
/// The same message type on the older API version, which the proxy never intercepts.
const CREATE_PASSTHROUGH: &str = "/runtime.v1alpha2.RuntimeService/CreateContainer";

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

#[derive(Clone)]
struct Client(tonic::client::Grpc<Channel>);

impl Client {
    async fn new(socket: &Path) -> Client {
        Client(
            tonic::client::Grpc::new(channel(socket).await)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        )
    }

    async fn call(&mut self, path: &'static str, message: &Bytes) -> Bytes {
        self.0.ready().await.expect("ready");
        self.0
            .unary(
                tonic::Request::new(message.clone()),
                http::uri::PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
            .unwrap_or_else(|s| panic!("{path}: {s:?}"))
            .into_inner()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

async fn latency(client: &mut Client, path: &'static str, message: &Bytes, n: usize) -> Latency {
    for _ in 0..n / 10 {
        client.call(path, message).await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        client.call(path, message).await;
        samples.push(started.elapsed());
    }
    samples.sort();
    Latency {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(name: &str, direct: &Latency, proxy: &Latency) {
    println!(
        "{name:<34} {:>9.1} {:>9.1} | {:>9.1} {:>9.1} | {:>6.3} {:>8.1}",
        us(direct.p50),
        us(direct.p99),
        us(proxy.p50),
        us(proxy.p99),
        us(proxy.p99) / us(direct.p99),
        us(proxy.p99) - us(direct.p99),
    );
}

fn header(title: &str) {
    println!("\n== {title}");
    println!(
        "{:<34} {:>9} {:>9} | {:>9} {:>9} | {:>6} {:>8}",
        "call", "direct50", "direct99", "proxy50", "proxy99", "p99 x", "added99"
    );
    println!(
        "{:<34} {:>9} {:>9} | {:>9} {:>9} | {:>6} {:>8}",
        "", "µs", "µs", "µs", "µs", "", "µs"
    );
}

async fn throughput(
    socket: &Path,
    path: &'static str,
    message: &Bytes,
    callers: usize,
    each: usize,
) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut client = Client::new(socket).await;
        let message = message.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..each {
                client.call(path, &message).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    (callers * each) as f64 / started.elapsed().as_secs_f64()
}

/// A Version call's p50/p99 on a connection of its own while `streams` ListContainers
/// calls stream on another connection (none: alone).
async fn version_beside_lists(socket: &Path, streams: usize) -> Latency {
    let busy = Client::new(socket).await;
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut client = busy.clone();
        tasks.push(tokio::spawn(async move {
            client.call(LIST, &Bytes::new()).await;
        }));
    }
    let mut probe = Client::new(socket).await;
    let sampled = latency(&mut probe, VERSION, &Bytes::new(), 300).await;
    for task in tasks {
        task.await.unwrap();
    }
    sampled
}

/// A caller that asked for 5 ListContainers and reads none of them: 64 KiB windows, the
/// responses held unread while it lives.
struct StalledReader {
    _sender: hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    _responses: Vec<http::Response<hyper::body::Incoming>>,
}

impl StalledReader {
    async fn start(socket: &Path) -> StalledReader {
        let stream = UnixStream::connect(socket).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(65_535)
                .adaptive_window(false)
                .handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let mut responses = Vec::new();
        for _ in 0..5 {
            let request = http::Request::post(format!("http://localhost{LIST}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(http_body_util::Full::new(dockhand_protos::codec::frame(
                    b"",
                )))
                .unwrap();
            responses.push(sender.send_request(request).await.expect("list"));
        }
        StalledReader {
            _sender: sender,
            _responses: responses,
        }
    }
}

/// A Version call's p50/p99 on a connection of its own while a [`StalledReader`] is stuck;
/// `None` when 2,000 calls did not finish within 30 s (the other caller is stalled too).
async fn version_beside_stalled(socket: &Path) -> Option<Latency> {
    let _stalled = StalledReader::start(socket).await;
    // Let the stalled streams fill every window and buffer they can.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut probe = Client::new(socket).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        latency(&mut probe, VERSION, &Bytes::new(), 2000),
    )
    .await
    .ok()
}

fn beside_row(name: &str, alone: &Latency, beside: &Latency) {
    println!(
        "{name:<52} p99 alone {:>8.1} µs, beside {:>9.1} µs, ratio {:>6.2}",
        us(alone.p99),
        us(beside.p99),
        us(beside.p99) / us(alone.p99),
    );
}

/// Callers beside each other, on a fake of their own whose ListContainers answer is 2.5 MB (4,000
/// containers), as on a busy node: big enough that 5 unread answers exceed every window.
async fn callers_beside_each_other() {
    let list = Bytes::from(
        cri::ListContainersResponse {
            containers: (0..4000).map(container).collect(),
        }
        .encode_to_vec(),
    );
    println!(
        "\n== callers beside each other (Version on its own connection; ListContainers(4,000), {} bytes)",
        list.len()
    );
    let fake = FakeUpstream::start(move |path, _| match path {
        LIST => Answer::Message(list.clone()),
        _ => Answer::Message(Bytes::from_static(b"\x0a\x050.1.0")),
    })
    .await;
    let proxy = BinaryProxy::start(fake.socket()).await;
    let (direct, proxy) = (fake.socket(), proxy.socket.as_path());
    for (name, socket) in [("direct", direct), ("dockhand", proxy)] {
        let alone = version_beside_lists(socket, 0).await;
        let beside = version_beside_lists(socket, 500).await;
        beside_row(
            &format!("{name}: while 500 ListContainers(4,000) stream"),
            &alone,
            &beside,
        );
    }
    for (name, socket) in [("direct", direct), ("dockhand", proxy)] {
        let alone = version_beside_lists(socket, 0).await;
        let row_name = format!("{name}: while one caller stalls 5 lists");
        match version_beside_stalled(socket).await {
            Some(beside) => beside_row(&row_name, &alone, &beside),
            None => println!("{row_name:<52} STALLED: 2,000 Version calls did not finish in 30 s"),
        }
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn dockhand_bin() -> PathBuf {
    std::env::var_os("DOCKHAND_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| dockhand_integration::fixtures::target_dir().join("release/dockhand"))
}

/// The real binary in front of the fake, outside any namespace games.
struct BinaryProxy {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl BinaryProxy {
    async fn start(upstream: &Path) -> BinaryProxy {
        Self::start_with(upstream, &[]).await
    }

    async fn start_with(upstream: &Path, env: &[(&str, &str)]) -> BinaryProxy {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dockhand.sock");
        let config = dir.path().join("dockhand.toml");
        let archive = dockhand_integration::proxy::archive_toml(
            &dir.path().join("archive"),
            &dir.path().join("pods"),
        );
        // DOCKHAND_BENCH_TOML: top-level config keys to try (e.g. `worker_threads = 1`).
        let extra = std::env::var("DOCKHAND_BENCH_TOML").unwrap_or_default();
        std::fs::write(&config, format!("{extra}\n{archive}")).unwrap();
        // Its log (a warning per fallback decision) goes to a file, as under systemd.
        let log = std::fs::File::create(dir.path().join("dockhand.log")).unwrap();
        let child = Command::new(dockhand_bin())
            .args(["proxy", "--config"])
            .arg(&config)
            .arg("--listen")
            .arg(&socket)
            .arg("--containerd")
            .arg(upstream)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dockhand (build it: cargo build --release --bins)");
        while UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        BinaryProxy {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for BinaryProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn container(i: usize) -> cri::Container {
    let id = format!("{i:064x}");
    cri::Container {
        id: id.clone(),
        pod_sandbox_id: format!("{:064x}", i / 3),
        metadata: Some(cri::ContainerMetadata {
            name: format!("container-{i}"),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "sha256:".to_string() + &"ab".repeat(32),
            ..Default::default()
        }),
        image_ref: "sha256:".to_string() + &"cd".repeat(32),
        state: cri::ContainerState::ContainerRunning as i32,
        created_at: 1_700_000_000_000_000_000 + i as i64,
        labels: [
            ("io.kubernetes.container.name", format!("container-{i}")),
            ("io.kubernetes.pod.name", format!("pod-{}", i / 3)),
            ("io.kubernetes.pod.namespace", "default".to_string()),
            (
                "io.kubernetes.pod.uid",
                format!("{:08x}-0000-0000-0000-000000000000", i / 3),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        annotations: [
            ("io.kubernetes.container.hash", "1a2b3c4d".to_string()),
            ("io.kubernetes.container.restartCount", "0".to_string()),
            (
                "io.kubernetes.container.terminationMessagePath",
                "/dev/termination-log".to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        ..Default::default()
    }
}

/// A CreateContainerRequest as kubelet sends for a busy pod: 20 mounts, 50 annotations, ~10 KB.
/// The 18 volume directories exist under `kubelet_root`, as they do on a node.
fn realistic_create(kubelet_root: &Path) -> Bytes {
    let mut mounts: Vec<cri::Mount> = (0..18)
        .map(|i| {
            let host = kubelet_root.join(format!(
                "pods/0f6c0a47-5f4b-4a83-9c1f-1d9c2f0e0000/volumes/kubernetes.io~projected/kube-api-access-{i}"
            ));
            std::fs::create_dir_all(&host).unwrap();
            cri::Mount {
                container_path: format!("/var/run/secrets/volume-{i}"),
                host_path: host.to_str().unwrap().to_string(),
                readonly: true,
                ..Default::default()
            }
        })
        .collect();
    mounts.push(cri::Mount {
        container_path: "/rootfs".into(),
        host_path: "/".into(),
        readonly: true,
        ..Default::default()
    });
    mounts.push(cri::Mount {
        container_path: "/docker".into(),
        host_path: "/var/lib/docker/containers".into(),
        readonly: true,
        ..Default::default()
    });
    let annotations = (0..50)
        .map(|i| {
            (
                format!("example.com/annotation-{i}"),
                format!("value-{i}-{}", "x".repeat(60)),
            )
        })
        .collect();
    cri::CreateContainerRequest {
        pod_sandbox_id: "f".repeat(64),
        config: Some(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "node-exporter".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "quay.io/prometheus/node-exporter:v1.8.2".into(),
                ..Default::default()
            }),
            args: vec!["--path.rootfs=/rootfs".into()],
            mounts,
            annotations,
            log_path: "node-exporter/0.log".into(),
            ..Default::default()
        }),
        sandbox_config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "node-exporter-abcde".into(),
                namespace: "monitoring".into(),
                uid: "0f6c0a47-5f4b-4a83-9c1f-1d9c2f0e0000".into(),
                attempt: 0,
            }),
            log_directory: "/var/log/pods/monitoring_node-exporter-abcde_0f6c0a47".into(),
            ..Default::default()
        }),
    }
    .encode_to_vec()
    .into()
}

async fn fake_section() {
    let status = cri::ContainerStatusResponse {
        status: Some(cri::ContainerStatus {
            id: "a".repeat(64),
            metadata: container(1).metadata,
            state: cri::ContainerState::ContainerRunning as i32,
            labels: container(1).labels,
            annotations: container(1).annotations,
            log_path: "/var/log/pods/default_pod_uid/container-1/0.log".into(),
            ..Default::default()
        }),
        info: Default::default(),
    }
    .encode_to_vec();
    let list = cri::ListContainersResponse {
        containers: (0..1000).map(container).collect(),
    }
    .encode_to_vec();
    println!("ListContainers(1,000) response: {} bytes", list.len());
    let (status, list) = (Bytes::from(status), Bytes::from(list));
    let fake = FakeUpstream::start(move |path, _| match path {
        STATUS => Answer::Message(status.clone()),
        LIST => Answer::Message(list.clone()),
        _ => Answer::Message(Bytes::from_static(b"\x0a\x050.1.0")),
    })
    .await;
    let proxy = BinaryProxy::start(fake.socket()).await;
    let mut direct = Client::new(fake.socket()).await;
    let mut proxied = Client::new(&proxy.socket).await;

    header("fake containerd (in process) vs dockhand in front of it");
    let status_request = Bytes::from(
        cri::ContainerStatusRequest {
            container_id: "a".repeat(64),
            verbose: false,
        }
        .encode_to_vec(),
    );
    let empty = Bytes::new();
    for (name, path, message, n) in [
        ("Version", VERSION, &empty, 5000),
        ("ContainerStatus", STATUS, &status_request, 5000),
        ("ListContainers(1,000)", LIST, &empty, 300),
    ] {
        let d = latency(&mut direct, path, message, n).await;
        let p = latency(&mut proxied, path, message, n).await;
        row(name, &d, &p);
    }
    let kubelet = tempfile::tempdir().unwrap();
    let create = realistic_create(kubelet.path());
    println!("CreateContainer request: {} bytes", create.len());
    let d = latency(&mut proxied, CREATE_PASSTHROUGH, &create, 3000).await;
    let p = latency(&mut proxied, CREATE, &create, 3000).await;
    println!("(both through dockhand: 'direct' = same bytes on a passthrough path, 'proxy' = intercepted, decided and edited)");
    row("CreateContainer 20 mounts", &d, &p);

    let d = throughput(fake.socket(), VERSION, &empty, 16, 2000).await;
    let p = throughput(&proxy.socket, VERSION, &empty, 16, 2000).await;
    println!(
        "throughput, 16 callers, Version: direct {d:.0}/s, proxy {p:.0}/s, ratio {:.3}",
        p / d
    );
    let d = throughput(fake.socket(), LIST, &empty, 16, 30).await;
    let p = throughput(&proxy.socket, LIST, &empty, 16, 30).await;
    println!(
        "throughput, 16 callers, ListContainers(1,000): direct {d:.0}/s, proxy {p:.0}/s, ratio {:.3}",
        p / d
    );
    let (rss, hwm) = rss_kib(proxy.child.id());
    println!(
        "proxy memory after the load: RSS {:.1} MiB, peak RSS {:.1} MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(proxy);
    callers_beside_each_other().await;
}

fn edit_section() {
    use dockhand::config::PropagationConfig;
    use dockhand::testing::{decide, edits, Rule};
    // Read as the proxy reads it: the view (protos::view).
    use dockhand_protos::view;
    let kubelet = tempfile::tempdir().unwrap();
    let create = realistic_create(kubelet.path());
    let request = view::CreateContainerRequest::decode(create.clone()).unwrap();
    let rule = Rule::new(&PropagationConfig::default());
    let table_text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let n = 20_000;
    let started = Instant::now();
    for _ in 0..n {
        let request = view::CreateContainerRequest::decode(create.clone()).unwrap();
        let decisions = decide(&rule, &request.config.as_ref().unwrap().mounts, || {
            Ok::<_, std::convert::Infallible>(dockhand_host::mountinfo::MountTable::parse(
                &table_text,
            ))
        });
        let edited = dockhand_protos::wire::apply(&create, &edits(&decisions)).unwrap();
        std::hint::black_box(edited);
    }
    let per = started.elapsed() / n;
    let decisions = decide(&rule, &request.config.as_ref().unwrap().mounts, || {
        Ok::<_, std::convert::Infallible>(dockhand_host::mountinfo::MountTable::parse(&table_text))
    });
    let time = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..n {
            f();
        }
        us(started.elapsed() / n)
    };
    let decode = time(&mut || {
        std::hint::black_box(view::CreateContainerRequest::decode(create.clone()).unwrap());
    });
    let decide_only = time(&mut || {
        std::hint::black_box(decide(
            &rule,
            &request.config.as_ref().unwrap().mounts,
            || {
                Ok::<_, std::convert::Infallible>(dockhand_host::mountinfo::MountTable::parse(
                    &table_text,
                ))
            },
        ));
    });
    let read_table = time(&mut || {
        std::hint::black_box(dockhand_host::mountinfo::MountTable::read().unwrap());
    });
    let edit_list = edits(&decisions);
    let edit = time(&mut || {
        std::hint::black_box(dockhand_protos::wire::apply(&create, &edit_list).unwrap());
    });
    println!(
        "  of which: prost decode {decode:.1} µs, decide (resolve 20 paths, parse table) {decide_only:.1} µs, byte edit {edit:.1} µs; reading /proc/self/mountinfo ({} lines) {read_table:.1} µs",
        table_text.lines().count()
    );
    println!(
        "\ndecode + decide + byte edit of a {}-byte CreateContainer ({} of 20 mounts matched), in process: {:.1} µs",
        create.len(),
        decisions.len(),
        us(per)
    );
}

async fn containerd_section() {
    let node = match Node::start(NodeOptions::default()).await {
        Ok(node) => node,
        Err(e) => {
            println!("\n== real containerd: could not start ({e:#}); section skipped");
            return;
        }
    };
    let proxy = ProxyProcess::start(&node, "").await.expect("proxy");
    let cri = node.cri().await.expect("cri");
    let pod = cri.run_pod(&PodSpec::new("bench")).await.expect("pod");
    let id = cri
        .run_container(&pod, &ContainerSpec::sleeper("sleeper"))
        .await
        .expect("container");
    let mut direct = Client::new(node.containerd_socket()).await;
    let mut proxied = Client::new(&proxy.socket()).await;
    header("real containerd 1.6 (sandboxed) vs dockhand in front of it");
    let status_request = Bytes::from(
        cri::ContainerStatusRequest {
            container_id: id,
            verbose: false,
        }
        .encode_to_vec(),
    );
    let empty = Bytes::new();
    for (name, path, message, n) in [
        ("Version", VERSION, &empty, 2000),
        ("ContainerStatus", STATUS, &status_request, 2000),
        ("ListContainers", LIST, &empty, 2000),
    ] {
        let d = latency(&mut direct, path, message, n).await;
        let p = latency(&mut proxied, path, message, n).await;
        row(name, &d, &p);
    }
    for (name, path, message, each) in [
        ("Version", VERSION, &empty, 500),
        ("ContainerStatus", STATUS, &status_request, 500),
    ] {
        let d = throughput(node.containerd_socket(), path, message, 16, each).await;
        let p = throughput(&proxy.socket(), path, message, 16, each).await;
        println!(
            "throughput, 16 callers, {name}: direct {d:.0}/s, proxy {p:.0}/s, ratio {:.3}",
            p / d
        );
    }
}

/// Realistic CRI log lines: an access log and application messages, varied but repetitive.
fn log_lines(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 256);
    let paths = [
        "/api/v1/orders",
        "/healthz",
        "/api/v1/users/42",
        "/metrics",
        "/static/app.js",
    ];
    let mut i: u64 = 0;
    while out.len() < bytes {
        let nanos = 100_000_000 + (i * 7919) % 899_999_999;
        let line = if i.is_multiple_of(5) {
            format!(
                "2026-11-25T10:{:02}:{:02}.{nanos:09}Z stderr F level=info msg=\"processed batch\" batch={} items={} duration_ms={}\n",
                (i / 60) % 60, i % 60, i, i % 97, i % 13
            )
        } else {
            format!(
                "2026-11-25T10:{:02}:{:02}.{nanos:09}Z stdout F 10.0.{}.{} - - \"GET {} HTTP/1.1\" {} {} \"-\" \"kube-probe/1.29\"\n",
                (i / 60) % 60, i % 60, i % 250, (i * 7) % 250, paths[(i % 5) as usize],
                if i.is_multiple_of(17) { 404 } else { 200 }, 512 + i % 4096
            )
        };
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out
}

fn archive_throughput_section() {
    use dockhand::testing::{Appended, ContainerMeta, Store};
    use dockhand_host::ContainerId;
    let data = log_lines(100 << 20);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), 3);
    let id = ContainerId::parse(&"c".repeat(64)).unwrap();
    let meta = ContainerMeta::unknown(id);
    let started = Instant::now();
    let appended = store
        .append_generation(&meta, 0, &mut data.as_slice())
        .expect("archive");
    let elapsed = started.elapsed();
    let Appended::Added {
        raw, compressed, ..
    } = appended
    else {
        panic!("nothing archived")
    };
    println!(
        "\n== log archive: 100 MiB of CRI lines into zstd level 3 (one core)\nthroughput {:.0} MB/s, ratio {:.1}x ({} -> {} bytes)",
        raw as f64 / 1e6 / elapsed.as_secs_f64(),
        raw as f64 / compressed as f64,
        raw,
        compressed
    );
}

async fn archive_remove_section() {
    let node = match Node::start(NodeOptions::default()).await {
        Ok(node) => node,
        Err(e) => {
            println!("\n== RemoveContainer with a 100 MiB log: could not start containerd ({e:#})");
            return;
        }
    };
    let proxy = ProxyProcess::start(&node, "").await.expect("proxy");
    let direct = node.cri().await.expect("cri");
    let via_proxy = proxy.cri().await.expect("cri");
    let big = log_lines(100 << 20);
    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut peak_rss = 0;
    for round in 0..5 {
        for (side, cri) in [&direct, &via_proxy].into_iter().enumerate() {
            let pod = cri
                .run_pod(&PodSpec::new(&format!("job-{round}-{side}")))
                .await
                .unwrap();
            let id = cri
                .run_container(&pod, &ContainerSpec::new("job", &["echo", "done"]))
                .await
                .unwrap();
            let status = cri.wait_exited(&id, Duration::from_secs(20)).await.unwrap();
            // The job "wrote" 100 MiB: appended to its log file as the runtime would have.
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&status.log_path)
                .unwrap();
            std::io::Write::write_all(&mut file, &big).unwrap();
            drop(file);
            cri.container_status(&id, false).await.unwrap();
            for f in
                dockhand_integration::cri::files_with_prefix(Path::new(&status.log_path)).unwrap()
            {
                std::fs::remove_file(f).unwrap();
            }
            cri.container_status(&id, false).await.unwrap();
            let started = Instant::now();
            cri.remove_container(&id).await.unwrap();
            samples[side].push(started.elapsed());
            if side == 1 {
                // Let the queued compression finish before the next round, and watch its memory.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !via_proxy
                    .container_status(&id, false)
                    .await
                    .map(|s| s.status.is_some())
                    .unwrap_or(false)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if let Some(pid) = proxy.pid() {
                    peak_rss = peak_rss.max(rss_kib(pid).1);
                }
            }
            cri.remove_pod(&pod.id).await.unwrap();
        }
    }
    for s in &mut samples {
        s.sort();
    }
    let stats = |s: &[Duration]| Latency {
        p50: percentile(s, 0.5),
        p99: percentile(s, 0.99),
    };
    header("RemoveContainer (kubelet's sequence) of a container with a 100 MiB log, 5 rounds");
    row("RemoveContainer", &stats(&samples[0]), &stats(&samples[1]));
    println!(
        "proxy peak RSS while archiving: {:.1} MiB",
        peak_rss as f64 / 1024.0
    );
}

/// PSS of a process in KiB (`smaps_rollup`): its fair share of shared pages.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// Creates and starts 20 containers in one pod; returns the time taken and the pod's shim pids
/// (dockhand's daemon started from `shim`, the stock shim).
async fn start_20(node: &Node, shim: &Path) -> (Duration, Option<u32>, Option<u32>) {
    let cri = node.cri().await.expect("cri");
    let pod = cri.run_pod(&PodSpec::new("bench")).await.expect("pod");
    let started = Instant::now();
    for i in 0..20 {
        cri.run_container(&pod, &ContainerSpec::sleeper(&format!("c{i}")))
            .await
            .expect("container");
    }
    let elapsed = started.elapsed();
    use dockhand_integration::cleanup::processes_mentioning;
    let ours = processes_mentioning(&format!("{} ", shim.display()))
        .into_iter()
        .find(|&p| cmdline(p).contains("dockhand-serve"));
    let stock = processes_mentioning(&format!("{}/containerd.sock", node.temp_dir().display()))
        .into_iter()
        .find(|&p| cmdline(p).contains("containerd-shim-runc-v2 "));
    (elapsed, ours, stock)
}

async fn shim_section() {
    let shim_bin = std::env::var_os("DOCKHAND_SHIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            dockhand_integration::fixtures::target_dir().join("shim/containerd-shim-dockhand-v2")
        });
    if !shim_bin.is_file() {
        println!(
            "\n== shim: {} not built (make bench builds it)",
            shim_bin.display()
        );
        return;
    }
    let install = tempfile::Builder::new()
        .prefix("dockhand-shim-")
        .tempdir_in("/tmp")
        .unwrap();
    let bin = install.path().join("containerd-shim-dockhand-v2");
    std::fs::copy(&shim_bin, &bin).unwrap();
    // Records on tmpfs, as /run/dockhand/cgroups is on a node (fsync there costs nothing).
    let records_dir = tempfile::Builder::new()
        .prefix("dockhand-records-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let records = records_dir.path().to_path_buf();
    std::fs::write(
        install.path().join("containerd-shim-dockhand-v2.json"),
        format!("{{\"recordDir\": \"{}\"}}", records.display()),
    )
    .unwrap();
    let mut stock_times = Vec::new();
    let mut ours_times = Vec::new();
    let mut memory = Vec::new();
    for _ in 0..3 {
        for with_shim in [false, true] {
            let node = Node::start(NodeOptions {
                runtime_path: with_shim.then(|| bin.clone()),
                ..NodeOptions::default()
            })
            .await
            .expect("node");
            let (elapsed, ours, stock) = start_20(&node, &bin).await;
            if with_shim {
                ours_times.push(elapsed);
                if let (Some(ours), Some(stock)) = (ours, stock) {
                    memory.push((pss_kib(ours), pss_kib(stock)));
                }
            } else {
                stock_times.push(elapsed);
            }
        }
    }
    let total = |t: &[Duration]| t.iter().sum::<Duration>().as_secs_f64();
    println!("\n== containerd-shim-dockhand-v2 vs the stock runc shim (create+start of 20 containers in one pod, 3 alternating rounds)");
    println!(
        "stock {:.2} s, dockhand {:.2} s per 20 containers (mean); ratio {:.3}",
        total(&stock_times) / 3.0,
        total(&ours_times) / 3.0,
        total(&ours_times) / total(&stock_times)
    );
    for (ours, stock) in memory {
        println!(
            "PSS: dockhand's shim {ours} KiB next to the stock shim's {stock} KiB: {:.1}% added per pod",
            100.0 * ours as f64 / stock as f64
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // DOCKHAND_BENCH=fake,edit,containerd,archive,shim picks sections (all by default).
    let sections = std::env::var("DOCKHAND_BENCH")
        .unwrap_or_else(|_| "fake,edit,containerd,archive,shim".into());
    runtime.block_on(async {
        if sections.contains("fake") {
            fake_section().await;
        }
        if sections.contains("edit") {
            edit_section();
        }
        if sections.contains("containerd") {
            containerd_section().await;
        }
        if sections.contains("archive") {
            archive_throughput_section();
            archive_remove_section().await;
        }
        if sections.contains("shim") {
            shim_section().await;
        }
    });
}

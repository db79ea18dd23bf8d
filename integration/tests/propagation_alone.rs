//! The CreateContainer propagation rule in the proxy alone, in front of a fake containerd that
//! records the exact bytes it receives: what each `[propagation] mode`, the pod's opt-out and a
//! hung host path make of a mount that the rule covers, and what the proxy counts on `/metrics`.
//!
//! The proxy runs in this process, so the host mounts the rule looks at are mounts in this
//! process's namespace: a shared tmpfs (a mount that takes rslave) and a FUSE filesystem that
//! never answers, each unmounted when its guard drops, also when a test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dockhand_integration::fake::{Answer, FakeUpstream};
use dockhand_protos::codec::{RawCodec, MAX_MESSAGE_BYTES};
use dockhand_protos::cri::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, KeyValue, Mount, MountPropagation,
    PodSandboxConfig, PodSandboxMetadata,
};
use dockhand_protos::wire;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tonic::transport::{Endpoint, Uri};

const CREATE: &str = "/runtime.v1.RuntimeService/CreateContainer";

/// The proxy in this process, as `fake::InProcessProxy` runs it, keeping the registry it
/// registered its metrics into (`InProcessProxy` drops it) so a test can read the counters.
struct Proxy {
    socket: PathBuf,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    async fn start(containerd: &Path, toml: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("dockhand.sock");
        let text = format!(
            "{toml}\n{}",
            dockhand_integration::proxy::archive_toml(
                &dir.path().join("archive"),
                &dir.path().join("pods")
            )
        );
        let mut config: dockhand::config::Config = toml::from_str(&text).expect("valid config");
        config.listen = socket.clone();
        config.containerd = containerd.to_path_buf();
        config.validate().expect("valid config");
        let mut registry = Registry::default();
        let proxy = dockhand::server::Proxy::new(&config, &mut registry).expect("proxy starts");
        let listener = dockhand::server::bind(&socket).expect("bind proxy socket");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = dockhand::server::serve(listener, proxy, async {
                let _ = stopped.await;
            })
            .await;
        });
        Proxy {
            socket,
            registry,
            stop: Some(stop),
            _dir: dir,
        }
    }

    /// `dockhand_propagation_rewrites_total{result="<result>"}`, 0 when never counted.
    fn rewrites(&self, result: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        let series = format!("dockhand_propagation_rewrites_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(0, |value| value.parse().expect("a counter value"))
    }

    /// Every `dockhand_propagation_rewrites_total` series, as `/metrics` shows them.
    fn all_rewrites(&self) -> Vec<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text.lines()
            .filter(|line| line.starts_with("dockhand_propagation_rewrites_total"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One CreateContainer call with an encoded request, as kubelet makes it (16 MiB messages).
async fn create(socket: &Path, request: &[u8]) -> Result<Bytes, tonic::Status> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(Bytes::copy_from_slice(request)),
        http::uri::PathAndQuery::from_static(CREATE),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A CreateContainer whose one mount, of `host_path` at `/data`, asks for no propagation (what
/// kubelet sends for `mountPropagation: None`), from a pod with `pod_annotations`, followed by a
/// field from a newer kubelet that prost would drop if the request were re-encoded.
fn create_request(host_path: &Path, pod_annotations: &[(&str, &str)]) -> Vec<u8> {
    let request = CreateContainerRequest {
        pod_sandbox_id: "sandbox-id".into(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            mounts: vec![Mount {
                container_path: "/data".into(),
                host_path: host_path.to_str().expect("a UTF-8 path").into(),
                propagation: MountPropagation::PropagationPrivate as i32,
                ..Default::default()
            }],
            ..Default::default()
        }),
        sandbox_config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-1".into(),
                namespace: "default".into(),
                uid: "u1".into(),
                attempt: 0,
            }),
            annotations: pod_annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    };
    let mut bytes = request.encode_to_vec();
    prost::encoding::encode_key(777, prost::encoding::WireType::Varint, &mut bytes);
    prost::encoding::encode_varint(1, &mut bytes);
    bytes
}

/// The one CreateContainer the fake received (panics on none or several).
fn received(fake: &FakeUpstream) -> Bytes {
    let seen = fake.seen_for(CREATE);
    assert_eq!(
        seen.len(),
        1,
        "CreateContainer calls that reached containerd"
    );
    seen[0].message()
}

/// Asserts `received` is `sent` byte for byte.
fn assert_unchanged(received: &[u8], sent: &[u8]) {
    assert!(
        received == sent,
        "containerd received {received:02x?}\ninstead of the original {sent:02x?}"
    );
}

/// Asserts `received` is `sent` with the `/data` mount asking HOST_TO_CONTAINER and the decision
/// annotation `/data=rslave`, and nothing else changed (the unknown field 777 included).
fn assert_rslave(received: &[u8], sent: &[u8]) {
    let got = CreateContainerRequest::decode(received).expect("decodes");
    let mut expected = CreateContainerRequest::decode(sent).expect("decodes");
    let config = expected.config.as_mut().expect("a config");
    config.mounts[0].propagation = MountPropagation::PropagationHostToContainer as i32;
    config.annotations.insert(
        "dockhand.io/mount-propagation".into(),
        "/data=rslave".into(),
    );
    assert_eq!(got, expected);
    assert!(
        received.ends_with(&[0xc8, 0x30, 0x01]),
        "the unknown field 777 is gone: {received:02x?}"
    );
}

/// A tmpfs mounted at `path` and made shared (`shared:N` in mountinfo): a host mount on which
/// containerd accepts rslave. Lazily unmounted on drop.
struct SharedTmpfs {
    path: PathBuf,
}

impl SharedTmpfs {
    fn mount(path: &Path) -> SharedTmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "dockhand-test-shared"])
            .arg(path));
        let mounted = SharedTmpfs {
            path: path.to_path_buf(),
        };
        run(Command::new("mount").arg("--make-shared").arg(path));
        mounted
    }
}

impl Drop for SharedTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A FUSE filesystem mounted at `path` whose daemon never answers, not even the kernel's INIT:
/// `lstat` of the mount point or anything under it blocks until the connection closes. On drop
/// the connection is closed first (blocked calls fail with ENOTCONN, so the proxy's stuck
/// blocking thread returns and the test's runtime can stop), then the mount is lazily unmounted.
struct HungFuse {
    path: PathBuf,
    connection: Option<File>,
}

impl HungFuse {
    fn mount(path: &Path) -> HungFuse {
        std::fs::create_dir_all(path).expect("mount point");
        if !Path::new("/dev/fuse").exists() {
            let _ = Command::new("modprobe").arg("fuse").status();
        }
        let connection = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("open /dev/fuse");
        run(Command::new("mount")
            .args(["-i", "-t", "fuse", "-o"])
            .arg("fd=0,rootmode=40000,user_id=0,group_id=0")
            .arg("dockhand-test-hung")
            .arg(path)
            .stdin(connection.try_clone().expect("dup /dev/fuse")));
        HungFuse {
            path: path.to_path_buf(),
            connection: Some(connection),
        }
    }
}

impl Drop for HungFuse {
    fn drop(&mut self) {
        drop(self.connection.take());
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn run(command: &mut Command) {
    let out = command.output().expect("run");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temp directory, with symlinks resolved (the rule compares resolved paths).
fn temp_root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().canonicalize().expect("canonical temp dir");
    (dir, root)
}

fn config(mode: &str, extra: &Path) -> String {
    format!(
        "[propagation]\nmode = \"{mode}\"\nextra_paths = [\"{}\"]\n",
        extra.display()
    )
}

/// One CreateContainer through a proxy in `mode`, for a mount of a shared tmpfs that the rule
/// covers (through `extra_paths`), the pod annotated with `pod_annotations`.
struct OneCreate {
    request: Vec<u8>,
    /// What containerd received.
    received: Bytes,
    proxy: Proxy,
    _fake: FakeUpstream,
    _shared: SharedTmpfs,
    _dir: tempfile::TempDir,
}

async fn one_create(mode: &str, pod_annotations: &[(&str, &str)]) -> OneCreate {
    let (dir, root) = temp_root();
    let shared = SharedTmpfs::mount(&root.join("shared"));
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::new())).await;
    let proxy = Proxy::start(fake.socket(), &config(mode, &shared.path)).await;
    let request = create_request(&shared.path.join("data"), pod_annotations);
    create(&proxy.socket, &request)
        .await
        .expect("create goes through");
    OneCreate {
        request,
        received: received(&fake),
        proxy,
        _fake: fake,
        _shared: shared,
        _dir: dir,
    }
}

#[tokio::test]
async fn enforce_asks_containerd_for_host_to_container_on_a_shared_host_mount() {
    let done = one_create("enforce", &[]).await;
    assert_rslave(&done.received, &done.request);
    assert_eq!(done.proxy.rewrites("rslave"), 1);
}

#[tokio::test]
async fn mode_off_forwards_the_exact_bytes_and_counts_nothing() {
    let done = one_create("off", &[]).await;
    assert_unchanged(&done.received, &done.request);
    assert_eq!(done.proxy.all_rewrites(), Vec::<String>::new());
}

#[tokio::test]
async fn dry_run_forwards_the_exact_bytes_and_counts_what_it_would_do() {
    let done = one_create("dry-run", &[]).await;
    assert_unchanged(&done.received, &done.request);
    assert_eq!(done.proxy.rewrites("dry_run"), 1);
    assert_eq!(done.proxy.rewrites("rslave"), 0);
}

#[tokio::test]
async fn a_pod_that_opts_out_gets_the_exact_bytes_forwarded() {
    let done = one_create(
        "enforce",
        &[("dockhand.io/mount-propagation", "keep"), ("team", "web")],
    )
    .await;
    assert_unchanged(&done.received, &done.request);
    assert_eq!(done.proxy.rewrites("opted_out"), 1);
    assert_eq!(done.proxy.rewrites("rslave"), 0);
}

#[tokio::test]
async fn another_value_of_the_opt_out_annotation_does_not_opt_out() {
    let done = one_create("enforce", &[("dockhand.io/mount-propagation", "rslave")]).await;
    assert_rslave(&done.received, &done.request);
    assert_eq!(done.proxy.rewrites("opted_out"), 0);
}

#[tokio::test]
async fn a_host_path_that_never_answers_is_forwarded_unchanged_after_the_deadline() {
    let (_dir, root) = temp_root();
    // Both mounts are under the one extra path: the rule covers them, so it must resolve the
    // hung one (lstat of `hung`, which never returns) before it can decide.
    let shared = SharedTmpfs::mount(&root.join("shared"));
    let hung = HungFuse::mount(&root.join("hung"));
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::new())).await;
    let proxy = Proxy::start(fake.socket(), &config("enforce", &root)).await;
    let stuck = create_request(&hung.path.join("volume"), &[]);

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), create(&proxy.socket, &stuck))
        .await
        .expect("CreateContainer answered within 10 s")
        .expect("create goes through");
    let elapsed = started.elapsed();

    assert_unchanged(&received(&fake), &stuck);
    assert_eq!(proxy.rewrites("timeout"), 1);
    // The answer came at the 2 s deadline, not because the path failed fast.
    assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");

    // The lstat is still stuck on its blocking thread; the next create is decided as usual.
    let next = create_request(&shared.path.join("data"), &[]);
    tokio::time::timeout(Duration::from_secs(10), create(&proxy.socket, &next))
        .await
        .expect("the next CreateContainer answered within 10 s")
        .expect("the next create goes through");
    let seen = fake.seen_for(CREATE);
    assert_eq!(seen.len(), 2);
    assert_rslave(&seen[1].message(), &next);
    assert_eq!(proxy.rewrites("rslave"), 1);
    assert_eq!(proxy.rewrites("timeout"), 1);
}

/// The proxy as systemd runs it (its own process) stops on SIGTERM although a decision is still
/// stuck on a hung host path: the stuck thread must not keep the process alive.
#[tokio::test]
async fn a_proxy_with_a_decision_stuck_on_a_hung_path_exits_on_sigterm() {
    let (_dir, root) = temp_root();
    let hung = HungFuse::mount(&root.join("hung"));
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::new())).await;
    let socket = root.join("dockhand.sock");
    let config = root.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{}\"\ncontainerd = \"{}\"\n[archive]\nenabled = false\n{}",
            socket.display(),
            fake.socket().display(),
            self::config("enforce", &root)
        ),
    )
    .unwrap();
    let bin = dockhand_integration::proxy::proxy_binary().expect("dockhand binary");
    let mut child = tokio::process::Command::new(bin)
        .args(["proxy", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start dockhand proxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the proxy never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stuck = create_request(&hung.path.join("volume"), &[]);
    tokio::time::timeout(Duration::from_secs(10), create(&socket, &stuck))
        .await
        .expect("CreateContainer answered within 10 s")
        .expect("create goes through");
    assert_unchanged(&received(&fake), &stuck);

    let pid = child.id().expect("running") as i32;
    run(Command::new("kill").args(["-TERM", &pid.to_string()]));
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the proxy exited within 15 s of SIGTERM, the hung path still hung")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    // The filesystem was still hung all along (it is released only when `hung` drops).
    assert!(hung.connection.is_some());
}

/// A mount the rule covers, as cri-api v0.37's kubelet sends it: `mount_options` (field 11,
/// unknown to dockhand's CRI types) on the mount, and an env value that is not UTF-8 (v0.37's
/// `KeyValue.value` is `bytes`), which dockhand's CRI types cannot decode.
fn v037_request(host_path: &Path) -> Vec<u8> {
    let mut request =
        CreateContainerRequest::decode(create_request(host_path, &[]).as_slice()).expect("decodes");
    let config = request.config.as_mut().expect("config");
    config.envs = vec![KeyValue {
        key: "FROM_A_BINARY_SECRET".into(),
        value: "placeholder".into(),
    }];
    let mut bytes = request.encode_to_vec();
    let at = bytes
        .windows(11)
        .position(|w| w == b"placeholder")
        .expect("the env value");
    bytes[at..at + 11].copy_from_slice(b"\xff\xfe\x00binary!!");
    assert!(CreateContainerRequest::decode(bytes.as_slice()).is_err());
    wire::apply(
        &bytes,
        &[wire::Edit {
            path: vec![wire::Step::Field(2), wire::Step::Item(7, 0)],
            op: wire::Op::Append {
                field: 11,
                value: b"nodev".to_vec(),
            },
        }],
    )
    .expect("mount_options added")
}

/// The one byte edit dockhand makes: the mount's propagation (field 5) set to HOST_TO_CONTAINER
/// and the decision annotation appended, by the wire editor, to `sent`.
fn expected_rslave(sent: &[u8]) -> Vec<u8> {
    let mount = vec![wire::Step::Field(2), wire::Step::Item(7, 0)];
    wire::apply(
        sent,
        &[
            wire::Edit {
                path: mount,
                op: wire::Op::SetVarint {
                    field: 5,
                    value: MountPropagation::PropagationHostToContainer as u64,
                },
            },
            wire::Edit {
                path: vec![wire::Step::Field(2)],
                op: wire::Op::Append {
                    field: 10,
                    value: wire::map_entry("dockhand.io/mount-propagation", "/data=rslave"),
                },
            },
        ],
    )
    .expect("edit")
}

#[tokio::test]
async fn a_v037_request_is_decided_and_reaches_containerd_unchanged_but_for_propagation() {
    let (_dir, root) = temp_root();
    let shared = SharedTmpfs::mount(&root.join("shared"));
    let fake = FakeUpstream::start(|_, _| Answer::Message(Bytes::new())).await;
    let proxy = Proxy::start(fake.socket(), &config("enforce", &shared.path)).await;
    let request = v037_request(&shared.path.join("data"));
    create(&proxy.socket, &request)
        .await
        .expect("create goes through");
    let received = received(&fake);
    assert_eq!(
        received.as_ref(),
        expected_rslave(&request).as_slice(),
        "every byte but the propagation and the annotation as sent"
    );
    assert_eq!(proxy.rewrites("rslave"), 1);
}
/// A refusal code the fallback acts on, the message containerd gives for rslave on a private
/// host mount.
const REFUSED: &str = "failed to generate container \"x\" spec: failed to generate spec: path \
    \"/data\" is mounted on \"/data\" but it is not a shared or slave mount";

/// Whether `message` asks containerd for HOST_TO_CONTAINER on its first mount.
fn asks_rslave(message: &[u8]) -> bool {
    CreateContainerRequest::decode(message)
        .ok()
        .and_then(|r| r.config)
        .is_some_and(|c| {
            c.mounts[0].propagation == MountPropagation::PropagationHostToContainer as i32
        })
}

#[tokio::test]
async fn a_refused_rewrite_sends_the_original_once_and_returns_its_answer() {
    let (_dir, root) = temp_root();
    let shared = SharedTmpfs::mount(&root.join("shared"));
    let fake = FakeUpstream::start(|_, message| {
        if asks_rslave(message) {
            Answer::Status(tonic::Code::Unknown, REFUSED.into())
        } else {
            Answer::Message(Bytes::from_static(b"\x0a\x02id"))
        }
    })
    .await;
    let proxy = Proxy::start(fake.socket(), &config("enforce", &shared.path)).await;
    let request = create_request(&shared.path.join("data"), &[]);
    let answer = create(&proxy.socket, &request)
        .await
        .expect("the original's answer");
    assert_eq!(answer.as_ref(), b"\x0a\x02id");
    let seen = fake.seen_for(CREATE);
    assert_eq!(seen.len(), 2, "the edited request, then the original");
    assert_rslave(&seen[0].message(), &request);
    // The original, with only the decision annotation appended, saying why.
    let mut expected = request.clone();
    let annotation = "/data=private(refused: ...c: failed to generate spec: path \"/data\" is \
        mounted on \"/data\" but it is not a shared or slave mount)";
    expected = wire::apply(
        &expected,
        &[wire::Edit {
            path: vec![wire::Step::Field(2)],
            op: wire::Op::Append {
                field: 10,
                value: wire::map_entry("dockhand.io/mount-propagation", annotation),
            },
        }],
    )
    .expect("edit");
    assert_unchanged(&seen[1].message(), &expected);
    assert_eq!(proxy.rewrites("refused_original_sent"), 1);
    assert_eq!(proxy.rewrites("rslave"), 0);
}

/// CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE and a reset may leave the first create running in
/// containerd: the caller gets that answer and nothing is sent again.
#[tokio::test]
async fn no_second_create_when_the_first_may_still_be_running() {
    let (_dir, root) = temp_root();
    let shared = SharedTmpfs::mount(&root.join("shared"));
    for answer in [
        Answer::Status(tonic::Code::Unavailable, "connection lost".into()),
        Answer::Status(tonic::Code::DeadlineExceeded, "too slow".into()),
        Answer::Status(tonic::Code::Cancelled, "cancelled".into()),
        Answer::Reset(h2::Reason::CANCEL),
    ] {
        let expected = match &answer {
            Answer::Status(code, _) => *code,
            _ => tonic::Code::Cancelled,
        };
        let answer = std::sync::Mutex::new(Some(answer));
        let fake = FakeUpstream::start(move |path, _| {
            let first = (path == CREATE).then(|| answer.lock().unwrap().take());
            first.flatten().unwrap_or(Answer::Message(Bytes::new()))
        })
        .await;
        let proxy = Proxy::start(fake.socket(), &config("enforce", &shared.path)).await;
        let request = create_request(&shared.path.join("data"), &[]);
        let err = create(&proxy.socket, &request).await.unwrap_err();
        assert_eq!(err.code(), expected, "{err:?}");
        assert_eq!(fake.seen_for(CREATE).len(), 1, "{expected:?}");
        assert_eq!(proxy.rewrites("refused_original_sent"), 0);
    }
}

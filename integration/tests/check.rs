//! `dockhand check` as node-problem-detector runs it, against the real containerd: exit code,
//! the one line NPD keeps, and the deadline.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use dockhand_integration::cleanup;
use dockhand_integration::cri::{ContainerSpec, Cri, Pod, PodSpec};
use dockhand_integration::fixtures::workspace_dir;
use dockhand_integration::node::{Node, NodeOptions};
use dockhand_integration::proxy::{archive_toml, http_get, proxy_binary, ProxyProcess};
use dockhand_protos::cri;

/// node-problem-detector's defaults: `max_output_length` and the rule timeout.
const NPD_MAX_OUTPUT: usize = 80;
const NPD_TIMEOUT: Duration = Duration::from_secs(5);

/// One run of `dockhand check`.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn line(&self) -> &str {
        self.stdout.lines().next().unwrap_or_default()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?} after {:?}\nstdout:\n{}stderr:\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// What NPD makes of a plugin's stdout (`pkg/custompluginmonitor/plugin/plugin.go`: read up to
/// 4 KiB, `strings.TrimSpace`, cut at `max_output_length` bytes).
fn npd_message(stdout: &str) -> &str {
    let bytes = &stdout.as_bytes()[..stdout.len().min(4096)];
    let text = std::str::from_utf8(bytes).unwrap_or_default().trim();
    &text[..text.len().min(NPD_MAX_OUTPUT)]
}

/// The plugin contract: exit 0, 1 or 2; NPD's message is exactly the first line, which is
/// printable ASCII of at most 80 bytes; done before NPD would kill it.
fn assert_npd_contract(run: &Run) {
    assert!(matches!(run.code, Some(0..=2)), "{run}");
    assert!(!run.line().is_empty(), "{run}");
    assert!(run.line().len() <= NPD_MAX_OUTPUT, "{run}");
    assert!(
        run.line()
            .bytes()
            .all(|b| b == b' ' || b.is_ascii_graphic()),
        "{run}"
    );
    assert_eq!(npd_message(&run.stdout), run.line().trim(), "{run}");
    assert!(run.elapsed < NPD_TIMEOUT, "{run}");
}

/// Runs `dockhand check ARGS` with `command` (already pointing at the binary).
fn run(mut command: Command, args: &[&OsStr]) -> Result<Run> {
    command
        .arg("check")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let started = Instant::now();
    let out = command.output().context("run dockhand check")?;
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    };
    // Shown with --nocapture: what each check printed.
    eprintln!("$ dockhand check {args:?}\n{run}");
    assert_npd_contract(&run);
    Ok(run)
}

/// `dockhand check` in containerd's mount namespace (the node's "host"), with `config`.
fn check_on_node(node: &Node, config: &Path, args: &[&str]) -> Result<Run> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("--config"), config.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    run(node.ns_command(proxy_binary()?), &all)
}

/// A config for the check on `node`: its sockets, an archive, kubelet's directory and the
/// state file in the node's temp dir.
fn check_config(node: &Node, socket: &Path, extra: &str) -> Result<PathBuf> {
    let dir = node.temp_dir();
    let path = dir.join("check.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"{}\"\ncontainerd = \"{}\"\n{extra}\n[archive]\ndir = \"{}\"\n\
             staging_dir = \"{}\"\nrestored_dir = \"{}\"\npod_logs_dir = \"{}\"\n\
             [check]\nkubelet_dir = \"{}\"\nstate_file = \"{}\"\n",
            socket.display(),
            node.containerd_socket().display(),
            dir.join("check-archive/store").display(),
            dir.join("check-archive/staging").display(),
            dir.join("check-archive/restored").display(),
            node.logs_root().display(),
            kubelet_dir(node).display(),
            dir.join("check-state").display(),
        ),
    )?;
    Ok(path)
}

/// The proxy's `metrics_address` and `[check]` table for tests: the background checker every
/// `interval` seconds, kubelet's directory and the state file in the node's temp dir.
fn proxy_check_toml(node: &Node, port: u16, interval: u64) -> String {
    format!(
        "metrics_address = \"127.0.0.1:{port}\"\n[check]\ninterval_seconds = {interval}\n\
         kubelet_dir = \"{}\"\nstate_file = \"{}\"\n",
        kubelet_dir(node).display(),
        node.temp_dir().join("check-state").display()
    )
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn kubelet_dir(node: &Node) -> PathBuf {
    node.temp_dir().join("kubelet")
}

/// Runs `program ARGS` in containerd's mount namespace and fails on a non-zero exit.
fn in_ns(node: &Node, program: &str, args: &[&OsStr]) -> Result<()> {
    let out = node.ns_command(program).args(args).output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// kubelet's CSI mount point for `volume` of `pod`, created, with a 1 MiB tmpfs mounted on it
/// in containerd's namespace.
fn tmpfs_volume(node: &Node, pod: &PodSpec, volume: &str) -> Result<PathBuf> {
    let path = kubelet_dir(node)
        .join("pods")
        .join(&pod.uid)
        .join("volumes/kubernetes.io~csi")
        .join(volume)
        .join("mount");
    std::fs::create_dir_all(&path)?;
    in_ns(
        node,
        "mount",
        &[
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            "size=1m".as_ref(),
            "dockhand-check".as_ref(),
            path.as_os_str(),
        ],
    )?;
    Ok(path)
}

/// A running pod whose sleeper `app` has `volume` at `/scratch`.
async fn pod_using(cri: &Cri, pod: &PodSpec, volume: &Path) -> Result<(Pod, String)> {
    let pod = cri.run_pod(pod).await?;
    let mut spec = ContainerSpec::sleeper("app");
    spec.mounts = vec![cri::Mount {
        container_path: "/scratch".into(),
        host_path: volume.to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let id = cri.run_container(&pod, &spec).await?;
    Ok((pod, id))
}

#[tokio::test]
async fn runtime_reports_ok_then_each_failure_within_the_deadline() -> Result<()> {
    let mut node = Node::start(NodeOptions::default()).await?;
    let mut proxy = ProxyProcess::start(&node, "").await?;
    let config = check_config(&node, &proxy.socket(), "")?;
    let runtime = |timeout: &str| -> Result<Run> {
        run(
            Command::new(proxy_binary()?),
            &[
                "runtime".as_ref(),
                "--timeout".as_ref(),
                timeout.as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
        )
    };

    let ok = runtime("2")?;
    assert_eq!(ok.code, Some(0), "{ok}");
    assert!(ok.line().starts_with("runtime: containerd "), "{ok}");
    assert!(ok.line().contains(" ready; dockhand "), "{ok}");
    // This node has no CNI config: a note, or a problem when the operator requires a network.
    assert!(ok.stderr.contains("ok: NetworkReady false"), "{ok}");
    let strict = run(
        Command::new(proxy_binary()?),
        &[
            "runtime".as_ref(),
            "--require-network".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    )?;
    assert_eq!(strict.code, Some(1), "{strict}");
    assert!(
        strict.line().starts_with("runtime: NetworkReady false"),
        "{strict}"
    );

    node.stop_containerd().await?;
    let down = runtime("2")?;
    assert_eq!(down.code, Some(1), "{down}");
    assert!(
        down.line()
            .starts_with("runtime: containerd does not answer: connect: "),
        "{down}"
    );
    assert!(down.elapsed < Duration::from_millis(2500), "{down}");

    node.start_containerd().await?;
    proxy.kill9();
    let proxy_down = runtime("2")?;
    assert_eq!(proxy_down.code, Some(1), "{proxy_down}");
    assert!(
        proxy_down
            .line()
            .starts_with("runtime: dockhand does not answer"),
        "{proxy_down}"
    );

    // A containerd that accepts and never answers: one deadline for both calls and both
    // endpoints, not one per call.
    let hung_socket = node.temp_dir().join("hung.sock");
    let listener = std::os::unix::net::UnixListener::bind(&hung_socket)?;
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept() {
            held.push(stream);
            if held.len() >= 4 {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let hung = run(
        Command::new(proxy_binary()?),
        &[
            "runtime".as_ref(),
            "--timeout".as_ref(),
            "2".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--containerd".as_ref(),
            hung_socket.as_os_str(),
        ],
    )?;
    assert_eq!(hung.code, Some(1), "{hung}");
    assert!(hung.line().contains("no answer within"), "{hung}");
    assert!(
        hung.elapsed >= Duration::from_millis(1800) && hung.elapsed < Duration::from_millis(2500),
        "{hung}"
    );
    drop(holder);
    Ok(())
}

#[tokio::test]
async fn volume_unmounted_under_a_running_container_is_a_problem_naming_it() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let proxy = ProxyProcess::start(&node, "").await?;
    let cri = proxy.cri().await?;
    let config = check_config(&node, &proxy.socket(), "")?;
    let spec = PodSpec::new("lost");
    let volume = tmpfs_volume(&node, &spec, "scratch")?;
    let (_pod, id) = pod_using(&cri, &spec, &volume).await?;
    cri.exec_sync(&id, &["sh", "-c", "echo data > /scratch/file"], 10)
        .await?;

    let healthy = check_on_node(&node, &config, &["volumes"])?;
    assert_eq!(healthy.code, Some(0), "{healthy}");
    assert!(healthy.line().starts_with("volumes: "), "{healthy}");
    assert!(healthy.line().contains("answer"), "{healthy}");

    in_ns(&node, "umount", &[volume.as_os_str()])?;
    let lost = check_on_node(&node, &config, &["volumes"])?;
    assert_eq!(lost.code, Some(1), "{lost}");
    assert!(
        lost.line()
            .starts_with("volumes: default/lost/app /scratch: mount lost"),
        "{lost}"
    );
    // The detail names the host path and kubelet's directory that is no longer a mount point.
    assert!(
        lost.stderr.contains(&volume.display().to_string()),
        "{lost}"
    );
    assert!(
        lost.stderr
            .contains("default/lost volume csi/scratch: not mounted"),
        "{lost}"
    );

    // `all` names the worst check; no argument means `all`.
    for args in [&["all"][..], &[][..]] {
        let all = check_on_node(&node, &config, args)?;
        assert_eq!(all.code, Some(1), "{all}");
        assert!(all.line().starts_with("volumes: default/lost/app"), "{all}");
    }
    let json = check_on_node(&node, &config, &["volumes", "--json"])?;
    let body: serde_json::Value = serde_json::from_str(json.stdout.split_once('\n').unwrap().1)?;
    assert_eq!(body["exit_code"], 1, "{json}");
    assert_eq!(body["reports"][0]["verdict"], "problem", "{json}");
    Ok(())
}

#[tokio::test]
async fn volume_filled_past_the_threshold_is_a_problem() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let cri = node.cri().await?;
    let config = check_config(&node, &node.temp_dir().join("no-proxy.sock"), "")?;
    let spec = PodSpec::new("full");
    let volume = tmpfs_volume(&node, &spec, "data")?;
    let (_pod, id) = pod_using(&cri, &spec, &volume).await?;
    let ok = check_on_node(&node, &config, &["volumes"])?;
    assert_eq!(ok.code, Some(0), "{ok}");

    let out = cri
        .exec_sync(
            &id,
            &[
                "dd",
                "if=/dev/zero",
                "of=/scratch/fill",
                "bs=1024",
                "count=960",
            ],
            20,
        )
        .await?;
    ensure!(
        out.exit_code == 0,
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = check_on_node(&node, &config, &["volumes"])?;
    assert_eq!(full.code, Some(1), "{full}");
    assert!(
        full.line()
            .starts_with("volumes: default/full/app /scratch"),
        "{full}"
    );
    assert!(full.line().contains("% full (over 90%)"), "{full}");
    // The threshold is the operator's.
    let lenient = check_on_node(&node, &config, &["volumes", "--usage-percent", "99"])?;
    assert_eq!(lenient.code, Some(0), "{lenient}");
    Ok(())
}

#[tokio::test]
async fn mount_that_never_answers_is_unknown_within_the_deadline_and_leaves_no_process(
) -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let cri = node.cri().await?;
    let config = check_config(&node, &node.temp_dir().join("no-proxy.sock"), "")?;
    let spec = PodSpec::new("stuck");
    cri.run_pod(&spec).await?;
    let mount_point = kubelet_dir(&node)
        .join("pods")
        .join(&spec.uid)
        .join("volumes/kubernetes.io~csi/dead/mount");
    std::fs::create_dir_all(&mount_point)?;
    // A FUSE filesystem of our own that never answers, not even the kernel's INIT: every
    // statfs on it blocks until the connection is closed.
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("open /dev/fuse")?;
    let mounted = node
        .ns_command("mount")
        .args(["-i", "-t", "fuse", "-o"])
        .arg("fd=0,rootmode=40000,user_id=0,group_id=0")
        .arg("dockhand-dead")
        .arg(&mount_point)
        .stdin(fuse.try_clone()?)
        .output()?;
    ensure!(
        mounted.status.success(),
        "mount fuse: {}",
        String::from_utf8_lossy(&mounted.stderr)
    );

    let stuck = check_on_node(&node, &config, &["volumes", "--timeout", "2"])?;
    assert_eq!(stuck.code, Some(2), "{stuck}");
    assert!(
        stuck
            .line()
            .starts_with("volumes: default/stuck volume csi/dead: statfs timed out"),
        "{stuck}"
    );
    assert!(stuck.elapsed < Duration::from_millis(2700), "{stuck}");
    // The statfs child was killed and reaped: nothing mentions the mount any more.
    let mount_text = mount_point.display().to_string();
    assert_eq!(
        cleanup::processes_mentioning(&mount_text),
        Vec::<u32>::new(),
        "{stuck}"
    );

    // The daemon goes away: the connection is aborted and statfs fails with ENOTCONN.
    drop(fuse);
    let dead = check_on_node(&node, &config, &["volumes", "--timeout", "2"])?;
    assert_eq!(dead.code, Some(1), "{dead}");
    assert!(dead.line().contains("ENOTCONN"), "{dead}");
    let _ = node
        .ns_command("umount")
        .arg("-l")
        .arg(&mount_point)
        .status();
    Ok(())
}

#[tokio::test]
async fn every_check_keeps_the_npd_contract_and_the_proxy_serves_the_results() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let port = free_port()?;
    let proxy = ProxyProcess::start(&node, &proxy_check_toml(&node, port, 1)).await?;
    // The proxy's own config: its sockets, its archive, its metrics endpoint.
    let config = proxy.config_path();
    let cri = proxy.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("fine")).await?;
    cri.run_container(&pod, &ContainerSpec::sleeper("app"))
        .await?;

    for (what, start) in [
        ("runtime", "runtime: containerd "),
        ("volumes", "volumes: "),
        ("propagation", "propagation: no at-risk mounts"),
        ("archive", "archive: "),
        ("all", "ok: runtime, volumes, propagation, archive"),
    ] {
        let ok = check_on_node(&node, &config, &[what])?;
        assert_eq!(ok.code, Some(0), "{what}: {ok}");
        assert!(ok.line().starts_with(start), "{what}: {ok}");
    }
    let archive = check_on_node(&node, &config, &["archive"])?;
    assert!(archive.line().contains("no logs lost"), "{archive}");

    // The shipped NPD rules: arguments dockhand accepts, a deadline under the rule's timeout,
    // and OK on a healthy node.
    let mut rules = 0;
    for entry in std::fs::read_dir(workspace_dir().join("deploy/npd"))? {
        let path = entry?.path();
        if path.extension() != Some(OsStr::new("json")) {
            continue;
        }
        let monitor: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        assert_eq!(monitor["plugin"], "custom", "{}", path.display());
        assert_eq!(monitor["pluginConfig"]["max_output_length"], 80);
        for rule in monitor["rules"].as_array().context("rules")? {
            let args: Vec<&str> = rule["args"]
                .as_array()
                .context("args")?
                .iter()
                .filter_map(|a| a.as_str())
                .collect();
            assert_eq!(args[0], "check", "{rule}");
            let timeout = args
                .iter()
                .position(|a| *a == "--timeout")
                .and_then(|i| args[i + 1].parse::<f64>().ok())
                .context("--timeout")?;
            let rule_timeout: f64 = rule["timeout"]
                .as_str()
                .and_then(|t| t.strip_suffix('s'))
                .and_then(|t| t.parse().ok())
                .context("rule timeout")?;
            assert!(timeout < rule_timeout, "{rule}");
            assert!(
                ["permanent", "temporary"].contains(&rule["type"].as_str().unwrap_or_default()),
                "{rule}"
            );
            let ok = check_on_node(&node, &config, &args[1..])?;
            assert_eq!(ok.code, Some(0), "{}: {rule}: {ok}", path.display());
            rules += 1;
        }
    }
    assert!(rules >= 5, "only {rules} NPD rules");

    // The background checker's results, on the proxy's /metrics.
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let text = http_get(port, "/metrics")?;
        let runs = text
            .lines()
            .find_map(|l| l.strip_prefix("dockhand_check_runs_total "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        if runs.is_some_and(|runs| runs >= 2) {
            break text;
        }
        ensure!(
            Instant::now() < deadline,
            "no check run on /metrics:\n{text}\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for check in ["runtime", "volumes", "propagation", "archive"] {
        assert!(
            metrics.contains(&format!("dockhand_check_status{{check=\"{check}\"}} 0")),
            "{check}:\n{metrics}\n{}",
            proxy.log()
        );
    }
    assert!(
        metrics.contains(
            "dockhand_check_runtime_call_duration_seconds{endpoint=\"dockhand\",call=\"version\"}"
        ),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn archive_reports_logs_lost_since_the_last_check_once() -> Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let port = free_port()?;
    // kubelet's logs are not where the proxy is told they are: every container's log is lost
    // (`dockhand_archive_lost_logs_total{reason="outside_log_directory"}`).
    let elsewhere = node.temp_dir().join("other-pod-logs");
    std::fs::create_dir_all(&elsewhere)?;
    let toml = format!(
        "{}{}",
        proxy_check_toml(&node, port, 0),
        archive_toml(&node.temp_dir().join("lossy-archive"), &elsewhere)
    );
    let proxy = ProxyProcess::start(&node, &toml).await?;
    let config = proxy.config_path();
    let first = check_on_node(&node, &config, &["archive"])?;
    assert_eq!(first.code, Some(0), "{first}");
    assert!(first.line().contains("no logs lost"), "{first}");

    let cri = proxy.cri().await?;
    let pod = cri.run_pod(&PodSpec::new("lossy")).await?;
    cri.run_container(&pod, &ContainerSpec::sleeper("app"))
        .await?;
    let lost = check_on_node(&node, &config, &["archive"])?;
    assert_eq!(lost.code, Some(1), "{lost}\n{}", proxy.log());
    assert_eq!(
        lost.line(),
        "archive: 1 container logs lost since the last check",
        "{lost}"
    );
    // Reported once: the next check compares with the count this one saw.
    let again = check_on_node(&node, &config, &["archive"])?;
    assert_eq!(again.code, Some(0), "{again}");
    Ok(())
}

//! The binary's `start` and `delete` actions with a fake delegate (a script) in place of
//! `containerd-shim-runc-v2`: the delegate runs with the same arguments, working directory, stdin
//! and environment; the reply keeps the delegate's format (here containerd 2.x's JSON with task
//! API version 3) with the shim's own address; that address serves Task v3 calls to the delegate;
//! the bundle's `address` file names the shim; and the shim exits, removing both sockets, when
//! the delegate goes away. `delete` relays the delegate's stdout and exit status.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::ConnectRequest;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::ttrpc::r#async::Client;
use containerd_shim_protos::ttrpc::Request;
use dockhand_shim::reply::own_address;

mod common;

use common::{fake_delegate, Seen, ID};

const BIN: &str = env!("CARGO_BIN_EXE_containerd-shim-dockhand-v2");

/// A delegate that logs what it was given and answers `$FAKE_REPLY` (start) or `deleted` with
/// exit status `$FAKE_DELETE_STATUS` (delete; 3 when no start reply is given, else 0).
fn fake_script(dir: &Path) -> PathBuf {
    let script = dir.join("fake-runc-shim");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
log={log}
for a in "$@"; do printf '%s\n' "$a"; done > "$log/args-$$"
pwd > "$log/cwd-$$"
cat > "$log/stdin-$$"
eval last=\${{$#}}
mv "$log/args-$$" "$log/args-$last"; mv "$log/cwd-$$" "$log/cwd-$last"; mv "$log/stdin-$$" "$log/stdin-$last"
case "$last" in
  start) printf '%s' "$FAKE_REPLY" ;;
  delete) printf 'deleted'; exit $FAKE_DELETE_STATUS ;;
esac
"#,
            log = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn run_action(
    dir: &Path,
    bundle: &Path,
    args: &[&str],
    stdin: &[u8],
    reply: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(bundle)
        .env("DOCKHAND_DELEGATE", fake_script(dir))
        .env("DOCKHAND_RECORD_DIR", dir.join("records"))
        .env("FAKE_REPLY", reply)
        .env(
            "FAKE_DELETE_STATUS",
            if reply.is_empty() { "3" } else { "0" },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn start_answers_in_the_delegates_format_and_serves_task_v3() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let delegate_path = dir.path().join("delegate.sock");
    let delegate_address = format!("unix://{}", delegate_path.display());
    let seen = Seen::default();
    let mut delegate = fake_delegate(&delegate_path, "containerd.task.v3.Task", &seen).await;

    let args = [
        "-namespace",
        "k8s.io",
        "-address",
        "/run/containerd/containerd.sock",
        "-publish-binary",
        "/usr/bin/containerd",
        "-id",
        ID,
        "start",
    ];
    let reply = format!(r#"{{"version":3,"address":"{delegate_address}","protocol":"ttrpc"}}"#);
    let (dir_path, bundle2, reply2) = (dir.path().to_path_buf(), bundle.clone(), reply.clone());
    let out = tokio::task::spawn_blocking(move || {
        run_action(&dir_path, &bundle2, &args, b"runc-options", &reply2)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "start must print nothing but its reply"
    );

    // The delegate ran with the same arguments, working directory and stdin.
    let logged =
        |what: &str| std::fs::read_to_string(dir.path().join(format!("{what}-start"))).unwrap();
    assert_eq!(
        logged("args"),
        args.iter().map(|a| format!("{a}\n")).collect::<String>()
    );
    assert_eq!(
        logged("cwd").trim(),
        bundle.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(logged("stdin"), "runc-options");

    // The reply keeps the delegate's format, with the shim's own address.
    let own = own_address(&delegate_address).unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"version": 3, "address": own, "protocol": "ttrpc"})
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("address")).unwrap(),
        own
    );

    // The shim serves Task v3 and forwards to the delegate.
    let client = Client::connect(&own).await.unwrap();
    let mut connect = ConnectRequest::new();
    connect.id = ID.into();
    let mut req = Request::new();
    req.service = "containerd.task.v3.Task".into();
    req.method = "Connect".into();
    req.payload = connect.write_to_bytes().unwrap();
    let err = client.request(req).await.unwrap_err();
    assert!(format!("{err:?}").contains("Connect: container"), "{err:?}");
    assert_eq!(seen.lock().unwrap()[0].0, "containerd.task.v3.Task");

    // A second container of the same pod: the delegate answers the same address, so does the shim.
    let (dir_path, bundle2) = (dir.path().to_path_buf(), bundle.clone());
    let again =
        tokio::task::spawn_blocking(move || run_action(&dir_path, &bundle2, &args, b"", &reply))
            .await
            .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(answer["address"], own.as_str());

    // The delegate goes away: the shim exits and removes both sockets.
    drop(client);
    delegate.shutdown().await.unwrap();
    let own_path = PathBuf::from(own.trim_start_matches("unix://"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while (own_path.exists() || delegate_path.exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!own_path.exists(), "shim socket left");
    assert!(!delegate_path.exists(), "delegate socket left");
}

#[test]
fn delete_relays_the_delegates_answer_and_removes_the_record_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let records = dir.path().join("records");
    let observed = dockhand_host::cgroup::observe(
        Path::new("/proc"),
        &dockhand_host::cgroup::CgroupMounts::read().unwrap(),
        ID,
        std::process::id(),
        None,
    )
    .unwrap();
    dockhand_host::record::write(&records, &observed).unwrap();
    let args = ["-namespace", "k8s.io", "-id", ID, "-bundle", "/b", "delete"];

    // A failing delete (status 3) is relayed and keeps the record.
    let out = run_action(dir.path(), &bundle, &args, b"", "");
    assert_eq!(out.stdout, b"deleted");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("args-delete")).unwrap(),
        args.iter().map(|a| format!("{a}\n")).collect::<String>()
    );
    assert!(dockhand_host::record::read(&records, ID).unwrap().is_some());

    // A successful one is relayed and removes it.
    let out = run_action(dir.path(), &bundle, &args, b"", "ok");
    assert_eq!(out.stdout, b"deleted");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(dockhand_host::record::read(&records, ID).unwrap(), None);
}

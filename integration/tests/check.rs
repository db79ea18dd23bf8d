//! `dockhand check` as node-problem-detector runs it: exit code and first line of stdout.

use anyhow::Result;
use dockhand_integration::node::{Node, NodeOptions};
use dockhand_integration::proxy::{proxy_binary, ProxyProcess};

fn check(node: &Node, proxy: &ProxyProcess) -> Result<(Option<i32>, String)> {
    let out = std::process::Command::new(proxy_binary()?)
        .args(["check", "--timeout", "3", "--socket"])
        .arg(proxy.socket())
        .arg("--containerd")
        .arg(node.containerd_socket())
        .output()?;
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((out.status.code(), first))
}

#[tokio::test]
async fn check_reports_ok_then_each_failure() -> Result<()> {
    let mut node = Node::start(NodeOptions::default()).await?;
    let mut proxy = ProxyProcess::start(&node, "").await?;
    let (code, message) = check(&node, &proxy)?;
    assert_eq!(code, Some(0), "{message}");
    assert!(message.contains("containerd"), "{message}");

    node.stop_containerd().await?;
    let (code, message) = check(&node, &proxy)?;
    assert_eq!(code, Some(1), "{message}");
    assert!(
        message.starts_with("neither dockhand nor containerd answers"),
        "{message}"
    );

    node.start_containerd().await?;
    proxy.kill9();
    let (code, message) = check(&node, &proxy)?;
    assert_eq!(code, Some(1), "{message}");
    assert!(message.starts_with("dockhand proxy at"), "{message}");
    Ok(())
}

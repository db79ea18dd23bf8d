//! `dockhand check`: a node-problem-detector custom plugin. It follows NPD's contract: exit 0 OK,
//! 1 problem, 2 unknown, and the first line of stdout is the message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dockhand_protos::cri::VersionRequest;

use crate::config::{DEFAULT_CONTAINERD, DEFAULT_LISTEN};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// dockhand's socket.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    socket: PathBuf,
    /// containerd's socket.
    #[arg(long, default_value = DEFAULT_CONTAINERD)]
    containerd: PathBuf,
    /// Seconds each call may take.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

/// NPD's plugin exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok = 0,
    Problem = 1,
    Unknown = 2,
}

async fn version(socket: &Path, timeout: Duration) -> Result<String, String> {
    let call = async {
        let mut client = super::cri_client::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        let version = client
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(|s| format!("Version: {}: {}", s.code(), s.message()))?
            .into_inner();
        Ok(format!(
            "{} {}",
            version.runtime_name, version.runtime_version
        ))
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Runs the check; returns the verdict and its one-line message.
pub async fn check(args: &CheckArgs) -> (Verdict, String) {
    let timeout = Duration::from_secs(args.timeout);
    let direct = version(&args.containerd, timeout).await;
    let proxied = version(&args.socket, timeout).await;
    match (direct, proxied) {
        (Ok(runtime), Ok(_)) => (
            Verdict::Ok,
            format!("dockhand proxy and containerd answer ({runtime})"),
        ),
        (Ok(_), Err(e)) => (
            Verdict::Problem,
            format!(
                "dockhand proxy at {} does not answer: {e}",
                args.socket.display()
            ),
        ),
        (Err(e), Ok(_)) => (
            Verdict::Unknown,
            format!(
                "dockhand answers but containerd at {} cannot be reached from here: {e}",
                args.containerd.display()
            ),
        ),
        (Err(e), Err(_)) => (
            Verdict::Problem,
            format!(
                "neither dockhand nor containerd answers: containerd at {}: {e}",
                args.containerd.display()
            ),
        ),
    }
}

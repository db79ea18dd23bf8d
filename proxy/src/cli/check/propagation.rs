//! `dockhand check propagation`: the audit (`dockhand audit propagation`) as a check. A running
//! container whose bind mount of Docker's root, an ancestor or a path inside it is `rprivate`
//! with nobody having decided so (`at-risk`) no longer sees what the host mounts later, which is
//! what Docker's rslave gave it: a problem. Fallbacks (the host mount is private, so Docker would
//! have been private too), rewrites and explicit modes are fine.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{running_containers, Finding, Report, Settings, What};
use crate::cli::audit::findings_for;
use crate::propagation::Rule;

/// Set while an audit runs on a blocking thread. One stuck on a dead mount is never started
/// again, so the proxy's background checker cannot fill tokio's blocking pool with them.
static AUDITING: AtomicBool = AtomicBool::new(false);

/// Clears [`AUDITING`] when the audit ends, however it ends.
struct Audit;

impl Drop for Audit {
    fn drop(&mut self) {
        AUDITING.store(false, Ordering::SeqCst);
    }
}

pub async fn check(settings: &Settings) -> Report {
    if AUDITING.swap(true, Ordering::SeqCst) {
        return Report::new(
            What::Propagation,
            vec![Finding::unknown(
                "the previous audit is still resolving host paths (a hung mount?)",
            )],
            "",
            serde_json::Value::Null,
        );
    }
    let audit = Audit;
    let containerd = &settings.config.containerd;
    let containers = match running_containers(containerd, false).await {
        Ok(containers) => containers,
        Err(e) => {
            return Report::new(
                What::Propagation,
                vec![Finding::unknown(format!(
                    "cannot list containers: {}",
                    super::with_cause(&e)
                ))],
                "",
                serde_json::Value::Null,
            );
        }
    };
    let rule = Rule::new(&settings.config.propagation);
    let count = containers.len();
    // The rule resolves host paths (lstat, readlink), which can block on a dead mount: off the
    // async thread, and the caller's deadline bounds the wait.
    let audited = tokio::task::spawn_blocking(move || {
        let _audit = audit;
        containers
            .iter()
            .flat_map(|c| {
                findings_for(
                    &rule,
                    &c.status.labels,
                    &c.status.annotations,
                    &c.status.id,
                    &c.status.mounts,
                )
            })
            .collect::<Vec<_>>()
    })
    .await;
    let audited = match audited {
        Ok(audited) => audited,
        Err(e) => {
            return Report::new(
                What::Propagation,
                vec![Finding::unknown(format!("audit failed: {e}"))],
                "",
                serde_json::Value::Null,
            )
        }
    };
    let findings = audited
        .iter()
        .map(|f| {
            let message = format!(
                "{}/{}/{} {}: host {} {} ({})",
                f.namespace,
                f.pod,
                f.container,
                f.container_path,
                f.host_path,
                f.propagation,
                f.status
            );
            if f.status == crate::cli::audit::Status::AtRisk {
                Finding::problem(message)
            } else {
                Finding::note(message)
            }
        })
        .collect();
    let ok = format!(
        "no at-risk mounts ({} covered in {count} containers)",
        audited.len()
    );
    let facts = serde_json::json!({ "mounts": audited, "containers": count });
    Report::new(What::Propagation, findings, ok, facts)
}

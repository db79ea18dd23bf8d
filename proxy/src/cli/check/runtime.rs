//! `dockhand check runtime`: CRI Version and Status, through dockhand and straight to
//! containerd, at the same time, with the latency of each call.
//!
//! kubelet only sees "the runtime": when it stops answering, this tells whether dockhand or
//! containerd is the one down. RuntimeReady false is a problem; NetworkReady false is shown but
//! is a problem only with `require_network` (kubelet's own Ready condition already reports a
//! network plugin that is not ready, and a node without CNI yet is not a runtime failure).

use std::path::Path;
use std::time::Duration;

use dockhand_protos::cri::{StatusRequest, VersionRequest};
use serde::Serialize;
use tokio::time::Instant;

use super::{Finding, Report, Settings, What};

/// What one endpoint answered.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// `containerd 1.6.20`.
    pub runtime: String,
    pub version_seconds: f64,
    pub status_seconds: f64,
    pub runtime_ready: Condition,
    pub network_ready: Condition,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Condition {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// Version then Status on one connection to `socket`.
async fn ask(socket: &Path) -> Result<Answer, String> {
    let mut client = crate::cli::cri_client::connect(socket)
        .await
        .map_err(|e| format!("connect: {}", super::root_cause(&e)))?;
    let started = Instant::now();
    let version = client
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .map_err(|s| format!("Version: {}: {}", s.code(), s.message()))?
        .into_inner();
    let version_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let status = client
        .status(StatusRequest { verbose: false })
        .await
        .map_err(|s| format!("Status: {}: {}", s.code(), s.message()))?
        .into_inner();
    let status_seconds = started.elapsed().as_secs_f64();
    let condition = |kind: &str| {
        status
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.r#type == kind)
            .map(|c| Condition {
                status: c.status,
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
            .unwrap_or(Condition {
                status: false,
                reason: "missing".into(),
                message: format!("Status has no {kind} condition"),
            })
    };
    Ok(Answer {
        runtime: format!("{} {}", version.runtime_name, version.runtime_version),
        version_seconds,
        status_seconds,
        runtime_ready: condition("RuntimeReady"),
        network_ready: condition("NetworkReady"),
    })
}

async fn ask_by(socket: &Path, deadline: Instant) -> Result<Answer, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout_at(deadline, ask(socket))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:.1}s", left.as_secs_f64())))
}

fn millis(seconds: f64) -> String {
    format!("{:.1}", seconds * 1000.0)
}

pub async fn check(settings: &Settings, deadline: Instant) -> Report {
    // Answer a little before the deadline so the report itself is on time.
    let by = deadline
        .checked_sub(Duration::from_millis(50))
        .unwrap_or(deadline);
    let dockhand = &settings.config.listen;
    let containerd = &settings.config.containerd;
    let (through, direct) = tokio::join!(ask_by(dockhand, by), ask_by(containerd, by));
    let facts = serde_json::json!({
        "dockhand": {"socket": dockhand, "answer": through.as_ref().ok(), "error": through.as_ref().err()},
        "containerd": {"socket": containerd, "answer": direct.as_ref().ok(), "error": direct.as_ref().err()},
    });
    let mut findings = Vec::new();
    match (&through, &direct) {
        (Err(e), Ok(_)) => findings.push(Finding::problem(format!(
            "dockhand does not answer: {e} (socket {})",
            dockhand.display()
        ))),
        (Ok(_), Err(e)) => findings.push(Finding::unknown(format!(
            "dockhand answers, containerd cannot be reached from here: {e} (socket {})",
            containerd.display()
        ))),
        (Err(_), Err(e)) => findings.push(Finding::problem(format!(
            "containerd does not answer: {e} (socket {})",
            containerd.display()
        ))),
        (Ok(_), Ok(_)) => {}
    }
    // Conditions as containerd states them; through dockhand they are the same answer.
    if let Some(answer) = direct.as_ref().ok().or(through.as_ref().ok()) {
        let ready = &answer.runtime_ready;
        if !ready.status {
            findings.push(Finding::problem(format!(
                "RuntimeReady false: {} {}",
                ready.reason, ready.message
            )));
        }
        let network = &answer.network_ready;
        if !network.status {
            let message = format!("NetworkReady false: {} {}", network.reason, network.message);
            findings.push(if settings.config.check.require_network {
                Finding::problem(message)
            } else {
                Finding::note(message)
            });
        }
    }
    let ok = match (&through, &direct) {
        (Ok(t), Ok(d)) => format!(
            "{} ready; dockhand {}+{}ms, direct {}+{}ms",
            d.runtime,
            millis(t.version_seconds),
            millis(t.status_seconds),
            millis(d.version_seconds),
            millis(d.status_seconds)
        ),
        _ => String::new(),
    };
    Report::new(What::Runtime, findings, ok, facts)
}

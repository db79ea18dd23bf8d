//! `dockhand audit propagation`: which running containers bind-mount Docker's root, its
//! ancestors or paths inside it with no propagation, i.e. what loses sight of later host mounts
//! on containerd without dockhand, and what dockhand did about each.

use std::path::PathBuf;

use anyhow::Context;
use dockhand_protos::cri::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatusRequest,
    ListContainersRequest, Mount, MountPropagation,
};
use serde::Serialize;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::propagation::{recorded_decision, Resolver, Rule, DECISION_ANNOTATION};

#[derive(clap::Args)]
pub struct PropagationArgs {
    /// CRI socket to ask: dockhand's (shows its rewrites) or containerd's.
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    socket: PathBuf,
    /// dockhand's config file, for `docker_root` and `extra_paths` [default: /etc/dockhand/config.toml
    /// when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One bind mount the rule covers.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub container_id: String,
    pub container_path: String,
    pub host_path: String,
    /// What the container got: `rprivate` or `rslave`.
    pub propagation: &'static str,
    /// `at-risk` (rprivate, nobody decided), `rewritten` (dockhand made it rslave), `fallback`
    /// (dockhand kept it private because the host mount is private), `explicit` (the pod asked).
    pub status: &'static str,
}

/// Classifies the mounts of one container.
pub fn findings_for(
    rule: &Rule,
    labels: &std::collections::HashMap<String, String>,
    annotations: &std::collections::HashMap<String, String>,
    id: &str,
    mounts: &[Mount],
) -> Vec<Finding> {
    let decided = |path: &str, what: &str| {
        annotations
            .get(DECISION_ANNOTATION)
            .and_then(|text| recorded_decision(text, path))
            .is_some_and(|decision| decision.starts_with(what))
    };
    let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
    let mut resolver = Resolver::default();
    mounts
        .iter()
        .filter_map(|m| {
            let (propagation, status) = if rule.matches(m, &mut resolver).is_some() {
                if decided(&m.container_path, "private") {
                    ("rprivate", "fallback")
                } else {
                    ("rprivate", "at-risk")
                }
            } else if m.propagation == MountPropagation::PropagationHostToContainer as i32 {
                let as_private = Mount {
                    propagation: MountPropagation::PropagationPrivate as i32,
                    ..m.clone()
                };
                rule.matches(&as_private, &mut resolver)?;
                if decided(&m.container_path, "rslave") {
                    ("rslave", "rewritten")
                } else {
                    ("rslave", "explicit")
                }
            } else {
                return None;
            };
            Some(Finding {
                namespace: label("io.kubernetes.pod.namespace"),
                pod: label("io.kubernetes.pod.name"),
                container: label("io.kubernetes.container.name"),
                container_id: id.to_string(),
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                propagation,
                status,
            })
        })
        .collect()
}

pub async fn propagation(args: PropagationArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(std::path::Path::new(DEFAULT_CONFIG_PATH), false)?,
    };
    let rule = Rule::new(&config.propagation);
    let mut client = crate::cri_client::connect(&args.socket).await?;
    let containers = client
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers;
    let mut findings = Vec::new();
    for container in containers {
        let status = match client
            .container_status(ContainerStatusRequest {
                container_id: container.id.clone(),
                verbose: false,
            })
            .await
        {
            Ok(response) => response.into_inner().status,
            // Gone between the list and the status: nothing to audit.
            Err(status) if status.code() == tonic::Code::NotFound => continue,
            Err(status) => return Err(status).context(format!("ContainerStatus {}", container.id)),
        };
        let Some(status) = status else { continue };
        findings.extend(findings_for(
            &rule,
            &status.labels,
            &status.annotations,
            &status.id,
            &status.mounts,
        ));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
        return Ok(());
    }
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "POD".into(),
        "CONTAINER".into(),
        "CONTAINER PATH".into(),
        "HOST PATH".into(),
        "PROPAGATION".into(),
        "STATUS".into(),
    ]];
    rows.extend(findings.iter().map(|f| {
        [
            f.namespace.clone(),
            f.pod.clone(),
            f.container.clone(),
            f.container_path.clone(),
            f.host_path.clone(),
            f.propagation.to_string(),
            f.status.to_string(),
        ]
    }));
    print!("{}", crate::table::render(&rows));
    Ok(())
}

//! `dockhand audit propagation`: which running containers bind-mount Docker's root, its
//! ancestors or paths inside it with no propagation, i.e. what loses sight of later host mounts
//! on containerd without dockhand, and what dockhand did about each.

use std::path::PathBuf;

use dockhand_protos::cri::{Mount, MountPropagation};
use dockhand_protos::view;
use serde::Serialize;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::propagation::{recorded_decision, Recorded, Resolver, Rule, DECISION_ANNOTATION};

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

/// The propagation a container's mount got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Got {
    Rprivate,
    Rslave,
}

/// What the audit makes of one mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// rprivate and nobody decided: what breaks after a migration without dockhand.
    AtRisk,
    /// dockhand made it rslave.
    Rewritten,
    /// dockhand kept it private because the host mount is private.
    Fallback,
    /// The pod asked for HostToContainer itself.
    Explicit,
}

impl Got {
    pub fn as_str(self) -> &'static str {
        match self {
            Got::Rprivate => "rprivate",
            Got::Rslave => "rslave",
        }
    }
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::AtRisk => "at-risk",
            Status::Rewritten => "rewritten",
            Status::Fallback => "fallback",
            Status::Explicit => "explicit",
        }
    }
}

impl std::fmt::Display for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// What the container got.
    pub propagation: Got,
    pub status: Status,
}

/// Classifies the mounts of one container.
pub fn findings_for(
    rule: &Rule,
    labels: &std::collections::HashMap<String, String>,
    annotations: &std::collections::HashMap<String, String>,
    id: &str,
    mounts: &[Mount],
) -> Vec<Finding> {
    let decided = |path: &str| {
        annotations
            .get(DECISION_ANNOTATION)
            .and_then(|text| recorded_decision(text, path))
    };
    let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
    let mut resolver = Resolver::default();
    mounts
        .iter()
        .filter_map(|status_mount| {
            // Read as the rule reads a CreateContainer's mount.
            let m = &view::Mount::of(status_mount);
            let (propagation, status) = if rule.matches(m, &mut resolver).is_some() {
                match decided(&m.container_path) {
                    Some(Recorded::Private { .. }) => (Got::Rprivate, Status::Fallback),
                    // Private on Docker too, and containerd refuses anything else for it.
                    _ if m.recursive_read_only => (Got::Rprivate, Status::Fallback),
                    _ => (Got::Rprivate, Status::AtRisk),
                }
            } else if m.propagation == MountPropagation::PropagationHostToContainer as i32 {
                let as_private = view::Mount {
                    propagation: MountPropagation::PropagationPrivate as i32,
                    ..m.clone()
                };
                rule.matches(&as_private, &mut resolver)?;
                match decided(&m.container_path) {
                    Some(Recorded::Rslave) => (Got::Rslave, Status::Rewritten),
                    _ => (Got::Rslave, Status::Explicit),
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
    let containers = super::cri_client::running_containers(&args.socket, false).await?;
    let mut findings = Vec::new();
    for super::cri_client::Running { status, .. } in containers {
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
            f.propagation.as_str().to_string(),
            f.status.as_str().to_string(),
        ]
    }));
    print!("{}", super::table::render(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn mount(host: &str, container: &str, propagation: MountPropagation) -> Mount {
        Mount {
            host_path: host.into(),
            container_path: container.into(),
            propagation: propagation as i32,
            ..Mount::default()
        }
    }

    #[test]
    fn findings_say_what_each_covered_mount_got() {
        let rule = Rule::new(&Config::default().propagation);
        let labels = HashMap::from([
            (
                "io.kubernetes.pod.namespace".to_string(),
                "monitoring".to_string(),
            ),
            (
                "io.kubernetes.pod.name".to_string(),
                "node-exporter".to_string(),
            ),
            (
                "io.kubernetes.container.name".to_string(),
                "exporter".to_string(),
            ),
        ]);
        let annotations = HashMap::from([(
            DECISION_ANNOTATION.to_string(),
            "/rootfs=rslave, /var=private(host mount private)".to_string(),
        )]);
        let mounts = [
            mount("/", "/rootfs", MountPropagation::PropagationHostToContainer),
            mount("/var", "/var", MountPropagation::PropagationPrivate),
            mount("/var/lib", "/lib", MountPropagation::PropagationPrivate),
            mount("/", "/host", MountPropagation::PropagationHostToContainer),
            mount("/etc", "/etc", MountPropagation::PropagationPrivate),
            mount("/", "/shared", MountPropagation::PropagationBidirectional),
        ];
        let found = findings_for(&rule, &labels, &annotations, "c1", &mounts);
        let got: Vec<_> = found
            .iter()
            .map(|f| (f.container_path.as_str(), f.propagation, f.status))
            .collect();
        assert_eq!(
            got,
            [
                ("/rootfs", Got::Rslave, Status::Rewritten),
                ("/var", Got::Rprivate, Status::Fallback),
                ("/lib", Got::Rprivate, Status::AtRisk),
                ("/host", Got::Rslave, Status::Explicit),
            ]
        );
        assert_eq!(found[0].pod, "node-exporter");
        assert_eq!(found[0].namespace, "monitoring");
        assert_eq!(found[0].container_id, "c1");
        let json = serde_json::to_value(&found[2]).unwrap();
        assert_eq!(json["status"], "at-risk");
        assert_eq!(json["propagation"], "rprivate");
    }

    /// A recursive read-only mount is private on Docker too (and containerd refuses anything
    /// else): not at risk, with or without dockhand's decision.
    #[test]
    fn a_recursive_read_only_mount_is_not_at_risk() {
        let rule = Rule::new(&Config::default().propagation);
        let mounts = [Mount {
            readonly: true,
            recursive_read_only: true,
            ..mount("/", "/rootfs", MountPropagation::PropagationPrivate)
        }];
        let found = findings_for(&rule, &HashMap::new(), &HashMap::new(), "c1", &mounts);
        assert_eq!(
            found
                .iter()
                .map(|f| (f.propagation, f.status))
                .collect::<Vec<_>>(),
            [(Got::Rprivate, Status::Fallback)]
        );
    }
}

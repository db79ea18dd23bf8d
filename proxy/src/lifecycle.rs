//! What CreateContainer says about a container, kept for the calls that follow it.
//!
//! kubelet's CreateContainer carries what the archive needs at StartContainer: the pod sandbox,
//! the pod's log directory, the container's log path, its names, labels and annotations. Its
//! reply carries the id. So the CreateContainer handler records them here (the annotations as
//! forwarded, with the propagation decision dockhand added), and the archive takes the record at
//! StartContainer instead of asking containerd twice more (a verbose ContainerStatus and a
//! verbose PodSandboxStatus, and reading containerd's unversioned `info` JSON).
//!
//! The record is a shortcut, never the only source: a container created before the proxy
//! started, or whose record was dropped for the bound, is looked up in containerd as before.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use dockhand_host::ContainerId;
use dockhand_protos::cri::CreateContainerResponse;
use dockhand_protos::view::{ContainerConfig, CreateContainerRequest};
use futures::future::BoxFuture;
use prost::Message;

use crate::archive::store::now_nanos;
use crate::grpc::{Interceptor, Reply, UnaryCall};
use crate::propagation::{lexically_clean, Propagation, DECISION_ANNOTATION};

/// Records kept at most: created and not yet started or removed. A node runs about a hundred
/// pods; past this the oldest record is dropped (its container is looked up in containerd).
const MAX_RECORDS: usize = 4096;

/// One container, as CreateContainer asked for it and containerd created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub sandbox_id: String,
    /// The pod's log directory (`PodSandboxConfig.log_directory`).
    pub log_directory: String,
    /// The log file, as containerd makes it: the log directory joined with the container's
    /// relative `log_path`; empty when the container has no log file.
    pub log_path: String,
    pub name: String,
    pub attempt: u32,
    /// The image as asked for (containerd's status names it by its tag instead).
    pub image: String,
    pub labels: HashMap<String, String>,
    /// The annotations containerd received: the decision annotation included.
    pub annotations: HashMap<String, String>,
    /// When containerd answered CreateContainer (nanoseconds since the epoch).
    pub created_at: i64,
    /// The pod's namespace, name and uid from the sandbox config's metadata: what the archive
    /// keeps when the `io.kubernetes.pod.*` labels are missing (CRI clients other than kubelet).
    pub pod: PodRef,
}

/// A pod as its sandbox's metadata names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Created {
    /// The record of a CreateContainer `request`, read through its view (`protos::view`), which
    /// names only what is kept and what propagation reads: a request whose environment or
    /// devices do not decode with dockhand's CRI types is still recorded. The decision
    /// annotation, when dockhand adds one, is added after.
    pub fn new(request: &CreateContainerRequest) -> Created {
        let default = ContainerConfig::default();
        let config = request.config.as_ref().unwrap_or(&default);
        let log_directory = request
            .sandbox_config
            .as_ref()
            .map(|s| s.log_directory.clone())
            .unwrap_or_default();
        // containerd: `filepath.Join(sandboxConfig.LogDirectory, config.LogPath)` when the
        // container has a log path: joined with one `/` (an absolute log path stays below the
        // directory, unlike `Path::join`) and cleaned.
        let log_path = if config.log_path.is_empty() {
            String::new()
        } else {
            let joined = format!("{log_directory}/{}", config.log_path);
            lexically_clean(Path::new(&joined))
                .to_string_lossy()
                .into_owned()
        };
        let metadata = config.metadata.as_ref();
        Created {
            sandbox_id: request.pod_sandbox_id.clone(),
            log_directory,
            log_path,
            name: metadata.map(|m| m.name.clone()).unwrap_or_default(),
            attempt: metadata.map_or(0, |m| m.attempt),
            image: config
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            created_at: now_nanos(),
            pod: request
                .sandbox_config
                .as_ref()
                .and_then(|s| s.metadata.as_ref())
                .map(|m| PodRef {
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                    uid: m.uid.clone(),
                })
                .unwrap_or_default(),
        }
    }

    /// Adds the decision annotation dockhand put in what it forwarded, if it edited it: the
    /// annotations are then what containerd received.
    pub fn decided(&mut self, decision: Option<String>) {
        if let Some(decision) = decision {
            self.annotations
                .insert(DECISION_ANNOTATION.to_string(), decision);
        }
    }
}

/// The records, by container id, bounded.
#[derive(Default)]
pub struct Lifecycle {
    inner: Mutex<Records>,
}

#[derive(Default)]
struct Records {
    by_id: HashMap<ContainerId, Created>,
    /// Insertion order, for the bound (ids already taken are skipped when met).
    order: VecDeque<ContainerId>,
}

impl Lifecycle {
    fn records(&self) -> MutexGuard<'_, Records> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `created` for `id`, dropping the oldest record past the bound.
    pub fn record(&self, id: ContainerId, created: Created) {
        let mut records = self.records();
        if records.by_id.insert(id.clone(), created).is_none() {
            records.order.push_back(id);
        }
        while records.by_id.len() > MAX_RECORDS {
            let Some(oldest) = records.order.pop_front() else {
                break;
            };
            records.by_id.remove(&oldest);
        }
        // Taken ids leave stale entries in `order`; keep it from growing past twice the bound.
        if records.order.len() > 2 * MAX_RECORDS {
            let Records { by_id, order } = &mut *records;
            order.retain(|id| by_id.contains_key(id));
        }
    }

    /// The record of `id`, removed: the caller is the last to need it.
    pub fn take(&self, id: &ContainerId) -> Option<Created> {
        self.records().by_id.remove(id)
    }

    /// Drops the records of `id` (removed before it started).
    pub fn forget(&self, id: &ContainerId) {
        self.records().by_id.remove(id);
    }

    /// Drops the records of the containers of sandboxes whose id starts with `pod` (containerd
    /// takes a unique prefix of a sandbox id).
    pub fn forget_pod(&self, pod: &str) {
        self.records()
            .by_id
            .retain(|_, created| !created.sandbox_id.starts_with(pod));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.records().by_id.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// CreateContainer with the archive on: propagation decides and forwards, then a created
/// container is recorded.
pub struct CreateContainer {
    propagation: Arc<Propagation>,
    lifecycle: Arc<Lifecycle>,
}

impl CreateContainer {
    pub fn new(propagation: Arc<Propagation>, lifecycle: Arc<Lifecycle>) -> CreateContainer {
        CreateContainer {
            propagation,
            lifecycle,
        }
    }
}

impl Interceptor for CreateContainer {
    fn handle(&self, call: UnaryCall) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            // Decoded once, as a view (only the fields read): the record keeps what it needs,
            // propagation takes the rest.
            let request = call.decode::<CreateContainerRequest>().ok();
            let created = request.as_ref().map(Created::new);
            let forwarded = self.propagation.forward(&call, request).await;
            let (Some(mut created), Some(message)) = (created, forwarded.reply.message()) else {
                return forwarded.reply;
            };
            let id = CreateContainerResponse::decode(message)
                .ok()
                .and_then(|r| ContainerId::parse(&r.container_id).ok());
            if let Some(id) = id {
                created.decided(forwarded.decision);
                self.lifecycle.record(id, created);
            }
            forwarded.reply
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dockhand_protos::cri::{
        self, ContainerMetadata, ImageSpec, KeyValue, PodSandboxConfig, PodSandboxMetadata,
    };

    /// The request as kubelet encodes it, read as the handler reads it.
    fn request(log_path: &str) -> CreateContainerRequest {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: "sandbox".into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 2,
                }),
                image: Some(ImageSpec {
                    image: "busybox".into(),
                    ..ImageSpec::default()
                }),
                log_path: log_path.into(),
                labels: [("io.kubernetes.pod.name".to_string(), "web".to_string())].into(),
                annotations: [("a".to_string(), "b".to_string())].into(),
                envs: vec![KeyValue {
                    key: "K".into(),
                    value: "not-utf8".into(),
                }],
                ..cri::ContainerConfig::default()
            }),
            sandbox_config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata::default()),
                log_directory: "/var/log/pods/ns_web_uid".into(),
                ..PodSandboxConfig::default()
            }),
        };
        let mut bytes = request.encode_to_vec();
        // cri-api v0.37's env values are bytes: one that is not UTF-8 is still recorded.
        let at = bytes.windows(8).position(|w| w == b"not-utf8").unwrap();
        bytes[at] = 0xff;
        assert!(cri::CreateContainerRequest::decode(bytes.as_slice()).is_err());
        CreateContainerRequest::decode(bytes.as_slice()).unwrap()
    }

    fn id(n: usize) -> ContainerId {
        ContainerId::parse(&format!("{n:064x}")).unwrap()
    }

    #[test]
    fn the_log_path_is_joined_as_containerd_joins_it() {
        let created = Created::new(&request("app/2.log"));
        assert_eq!(created.log_path, "/var/log/pods/ns_web_uid/app/2.log");
        assert_eq!(created.log_directory, "/var/log/pods/ns_web_uid");
        assert_eq!(created.sandbox_id, "sandbox");
        assert_eq!((created.name.as_str(), created.attempt), ("app", 2));
        assert_eq!(created.image, "busybox");
        // Joined and cleaned as Go's filepath.Join does.
        assert_eq!(
            Created::new(&request("/app//./x/../2.log")).log_path,
            "/var/log/pods/ns_web_uid/app/2.log"
        );
        // No log path: no log file (containerd makes none).
        assert_eq!(Created::new(&request("")).log_path, "");
    }

    #[test]
    fn the_decision_is_among_the_annotations() {
        let mut created = Created::new(&request("app/0.log"));
        created.decided(Some("/data=rslave".into()));
        assert_eq!(created.annotations["a"], "b");
        assert_eq!(
            created.annotations["dockhand.io/mount-propagation"],
            "/data=rslave"
        );
    }

    #[test]
    fn records_are_taken_once_and_bounded() {
        let lifecycle = Lifecycle::default();
        let created = Created::new(&request("app/0.log"));
        lifecycle.record(id(0), created.clone());
        assert_eq!(lifecycle.take(&id(0)), Some(created.clone()));
        assert_eq!(lifecycle.take(&id(0)), None);
        for n in 0..MAX_RECORDS + 10 {
            lifecycle.record(id(n), created.clone());
        }
        assert_eq!(lifecycle.len(), MAX_RECORDS);
        // The oldest went first.
        assert!(lifecycle.take(&id(9)).is_none());
        assert!(lifecycle.take(&id(10)).is_some());
        lifecycle.forget_pod("sand");
        assert!(lifecycle.is_empty());
    }
}

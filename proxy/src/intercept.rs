//! The one table of CRI methods dockhand acts on, each with its one handler. Every other method
//! (and every method of another API version) is passed through untouched by the server.
//!
//! This module depends on the handlers (it builds them) and no handler depends on it: a handler
//! is a [`crate::grpc::Interceptor`], and the table is the one place that says which method gets
//! which. A feature that is switched off registers no handler, so its methods pass through.

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::archive::{self, Archive, ArchiveError};
use crate::config::Config;
use crate::grpc::{Forward, Interceptor};
use crate::lifecycle::{CreateContainer, Lifecycle};
use crate::placement::WithRecord;
use crate::propagation::Propagation;
use crate::upstream::Upstream;

const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";
const START_CONTAINER: &str = "/runtime.v1.RuntimeService/StartContainer";
const REOPEN_CONTAINER_LOG: &str = "/runtime.v1.RuntimeService/ReopenContainerLog";
const REMOVE_CONTAINER: &str = "/runtime.v1.RuntimeService/RemoveContainer";
const REMOVE_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/RemovePodSandbox";
const CONTAINER_STATUS: &str = "/runtime.v1.RuntimeService/ContainerStatus";

/// The intercepted methods, by full gRPC path.
pub struct Table {
    routes: Vec<(&'static str, Arc<dyn Interceptor>)>,
}

impl Table {
    /// Builds every handler the configuration asks for. Fails when the container log archive
    /// cannot open (e.g. staging cannot hard-link pod logs): better a clear error at start-up
    /// than logs silently not kept.
    pub fn new(
        config: &Config,
        upstream: &Upstream,
        registry: &mut Registry,
    ) -> Result<Table, ArchiveError> {
        let mut routes: Vec<(&'static str, Arc<dyn Interceptor>)> = Vec::new();
        // Docker-parity mount propagation (propagation.rs).
        let propagation = Arc::new(Propagation::new(config.propagation.clone(), registry));
        // The container log archive (archive.rs): record at creation (lifecycle.rs), stage at
        // start and at rotation, finalize at removal (of the container or of its pod), answer
        // for archived containers.
        let status: Arc<dyn Interceptor> = if config.archive.enabled {
            let lifecycle = Arc::new(Lifecycle::default());
            let archive = Archive::open(
                &config.archive,
                &config.cgroup_records,
                upstream.clone(),
                lifecycle.clone(),
                registry,
            )?;
            routes.push((
                CREATE_CONTAINER,
                Arc::new(CreateContainer::new(propagation, lifecycle)),
            ));
            routes.push((
                START_CONTAINER,
                Arc::new(archive::StartContainer(archive.clone())),
            ));
            routes.push((
                REOPEN_CONTAINER_LOG,
                Arc::new(archive::ReopenContainerLog(archive.clone())),
            ));
            routes.push((
                REMOVE_CONTAINER,
                Arc::new(archive::RemoveContainer(archive.clone())),
            ));
            routes.push((
                REMOVE_POD_SANDBOX,
                Arc::new(archive::RemovePodSandbox(archive.clone())),
            ));
            Arc::new(archive::ContainerStatus(archive))
        } else {
            routes.push((CREATE_CONTAINER, propagation));
            Arc::new(Forward)
        };
        // Verbose answers get the shim's cgroup record (placement.rs), archived ones included.
        routes.push((
            CONTAINER_STATUS,
            Arc::new(WithRecord::new(status, config.cgroup_records.clone())),
        ));
        Ok(Table { routes })
    }

    /// The handler of `path`, when dockhand intercepts it.
    pub fn lookup(&self, path: &str) -> Option<&Arc<dyn Interceptor>> {
        self.routes
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, handler)| handler)
    }

    /// The intercepted paths, in the table's order.
    #[cfg(test)]
    pub fn paths(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.routes.iter().map(|(path, _)| *path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_v1_paths_in_the_table_are_intercepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.archive.enabled = false;
        config.cgroup_records = dir.path().join("records");
        let upstream = Upstream::new(
            &dir.path().join("none.sock"),
            std::time::Duration::from_secs(1),
        );
        let table = Table::new(&config, &upstream, &mut Registry::default()).unwrap();
        assert!(table
            .lookup("/runtime.v1.RuntimeService/CreateContainer")
            .is_some());
        assert!(table
            .lookup("/runtime.v1alpha2.RuntimeService/CreateContainer")
            .is_none());
        assert!(table.lookup("/runtime.v1.RuntimeService/Version").is_none());
        // cri-api v0.37's newer methods pass through untouched.
        for method in [
            "StreamPodSandboxes",
            "StreamContainers",
            "StreamContainerStats",
            "StreamPodSandboxStats",
            "StreamPodSandboxMetrics",
            "CheckpointPod",
            "RestorePod",
        ] {
            let path = format!("/runtime.v1.RuntimeService/{method}");
            assert!(table.lookup(&path).is_none(), "{path}");
        }
        assert!(table
            .lookup("/runtime.v1.ImageService/StreamImages")
            .is_none());
        assert!(table
            .lookup("/runtime.v1.RuntimeService/createcontainer")
            .is_none());
        // The archive switched off: its methods pass through; ContainerStatus keeps the record.
        assert_eq!(
            table.paths().collect::<Vec<_>>(),
            [CREATE_CONTAINER, CONTAINER_STATUS]
        );
    }
}

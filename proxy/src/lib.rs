//! dockhand's CRI proxy and the `dockhand` command line's library.
//!
//! kubelet talks to the proxy as if it were containerd. Every call passes through untouched at
//! the HTTP/2 level, except the few methods in `intercept`'s table, where dockhand has a reason to
//! act: Docker-parity mount propagation, the container log archive, the shim's cgroup record.
//!
//! Layout:
//! - `config`: the TOML configuration and its defaults.
//! - `grpc`: the unary call, the whole reply and the `Interceptor` trait handlers implement.
//! - `server`: the socket, the HTTP/2 server, routing and graceful shutdown.
//! - `upstream`: the connection to containerd.
//! - `intercept`: the one table of intercepted methods and their handlers.
//! - `lifecycle`: what CreateContainer said about a container, for the archive at its start.
//! - `metrics`: the Prometheus registry, per-call metrics and the `/metrics` endpoint.
//! - `propagation`: Docker-parity mount propagation (CreateContainer).
//! - `placement`: the shim's cgroup record in verbose ContainerStatus.
//! - `archive`: the container log archive (StartContainer to RemoveContainer).
//! - `cli`: the command line's subcommands (`audit`, `cgroups`, `check`, `logs`).
#![forbid(unsafe_code)]

mod archive;
pub mod cli;
pub mod config;
mod grpc;
mod intercept;
mod lifecycle;
pub mod metrics;
mod placement;
mod propagation;
pub mod server;
mod upstream;

/// What the integration tests and benchmarks reach inside the proxy, only in builds with the
/// `test-hooks` feature (never `make install`'s).
#[cfg(feature = "test-hooks")]
pub mod testing {
    pub use crate::archive::store::{Appended, ContainerMeta, Store};
    pub use crate::archive::PAUSE_ENV;
    pub use crate::propagation::{decide, edits, Rule, AFTER_DECIDE_ENV};
}

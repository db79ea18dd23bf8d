//! dockhand's CRI proxy and the `dockhand` command line's library.
//!
//! kubelet talks to the proxy as if it were containerd. Every call passes through untouched at
//! the HTTP/2 level, except the few methods in `intercept`'s table, where dockhand has a reason to
//! act: Docker-parity mount propagation, the container log archive, the shim's cgroup record.
//!
//! Layout:
//! - `config`: the TOML configuration and its defaults.
//! - `server`: the socket, the HTTP/2 server, routing and graceful shutdown.
//! - `upstream`: the connection to containerd.
//! - `intercept`: the table of intercepted methods and the unary call a handler works on.
//! - `grpc`: a whole unary reply that handlers read or replace.
//! - `metrics`: the Prometheus registry, per-call metrics and the `/metrics` endpoint.
//! - `propagation`: Docker-parity mount propagation (CreateContainer).
//! - `placement`: the shim's cgroup record in verbose ContainerStatus.
//! - `cgroups`: `dockhand cgroups`, where each container sits in the cgroup tree.
//! - `audit`: `dockhand audit propagation`.
//! - `cli`: command-line subcommands (`cli::check`: `dockhand check`, node-problem-detector
//!   plugins and the proxy's background checker).
//! - `archive`: the container log archive (StartContainer to RemoveContainer, `dockhand logs`).
//! - `cri_client`: a CRI client over a unix socket for the command line.
//! - `table`: aligned text tables for the command line.
#![forbid(unsafe_code)]

pub mod archive;
pub mod audit;
pub mod cgroups;
pub mod cli;
pub mod config;
pub mod cri_client;
pub mod grpc;
pub mod intercept;
pub mod metrics;
pub mod placement;
pub mod propagation;
pub mod server;
pub mod table;
pub mod upstream;

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
//! - `metrics`: the Prometheus registry, per-call metrics and the `/metrics` endpoint.
//! - `propagation`: Docker-parity mount propagation (CreateContainer).
//! - `placement`: the shim's cgroup record in verbose ContainerStatus.
//! - `archive`: the container log archive (StartContainer to RemoveContainer).
//! - `cli`: the command line's subcommands (`audit`, `cgroups`, `check`, `logs`).
#![forbid(unsafe_code)]

pub mod archive;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod intercept;
pub mod metrics;
pub mod placement;
pub mod propagation;
pub mod server;
pub mod upstream;

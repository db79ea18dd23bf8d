//! The integration harness: dockhand against a real containerd. A test starts a [`Node`] (a
//! containerd of its own, in its own temp directory and mount namespace, with locally built
//! images), optionally a [`ProxyProcess`] in front of it, and talks CRI like kubelet through
//! [`Cri`]. Dropping a `Node` removes every pod, process, cgroup, mount and file it made.
//!
//! Layout:
//! - `fixtures`: the pause binary and the image tarball, built from the repo and cached under
//!   `<target>/dockhand-fixtures/`.
//! - `images`: the OCI image layout of the busybox and pause test images.
//! - `containerd`: which containerd version a node runs ([`Containerd`], `DOCKHAND_CONTAINERD`)
//!   and the config dialect of each version.
//! - `critest`: cri-tools' critest against a node: its images, a loopback registry, reports.
//! - `node`: [`Node`], the sandboxed containerd, and its [`NodeOptions`] (host network or CNI).
//! - `proxy`: [`ProxyProcess`], the `dockhand proxy` binary run inside a node.
//! - `cri`: [`Cri`], the CRI client: one helper per call, and raw calls by method path.
//! - `clients`: real gRPC clients (kubelet's cri-client, grpc-go, grpcio) as driver processes.
//! - `kubelet`: [`PodSpec`] and [`ContainerSpec`], the configs kubelet would send for them, and
//!   kubelet's call sequences (removing a dead container).
//! - `kubelet_process`: [`KubeletProcess`], a real kubelet (`make kubelet`) run standalone with
//!   static pods inside a node, for the kubelet lane (`tests/kubelet.rs`).
//! - `logs`: reading CRI log files.
//! - `transcript`: comparing a scenario's outcomes straight from containerd and through the proxy.
//! - `fake`: a fake containerd that records request bytes, and the proxy run in-process.
//! - `cleanup`: killing processes, removing cgroups and mounts (used by the drops).
#![forbid(unsafe_code)]

pub mod cleanup;
pub mod clients;
pub mod containerd;
pub mod cri;
pub mod critest;
pub mod fake;
pub mod fixtures;
pub mod images;
pub mod kubelet;
pub mod kubelet_process;
pub mod logs;
pub mod node;
pub mod proxy;
pub mod transcript;

pub use containerd::{Containerd, Version};
pub use cri::{ContainerSpec, Cri, Pod, PodSpec};
pub use dockhand_protos::cri as api;
pub use fixtures::{fixtures, target_dir, workspace_dir, Fixtures};
pub use images::{BUSYBOX_IMAGE, PAUSE_IMAGE};
pub use kubelet_process::KubeletProcess;
pub use logs::{read_log, read_messages, LogLine};
pub use node::{Network, Node, NodeInfo, NodeOptions, RootPropagation};
pub use proxy::{proxy_binary, ProxyProcess};

//! dockhand's view of the host it runs on, shared by the proxy, the shim and the command line.
//!
//! Everything here reads or writes the node's own state (the mount table, the cgroup tree,
//! files under directories dockhand was configured with), never bytes on the wire: that is
//! `dockhand-protos`. dockhand runs as root on every node, so each operation here is written
//! not to follow a symlink it did not expect and never to build a path from an unchecked name.
//!
//! Layout:
//! - `mountinfo`: the one parser of `/proc/<pid>/mountinfo`, each mount's propagation, the
//!   lookup rules (containerd's and the kernel's), a cache that re-reads only after a change.
//! - `cgroup`: where a container sits in the cgroup tree: containerd's and runc's path rules,
//!   the host's cgroup mounts, `/proc/<pid>/cgroup` and the check of one against the other.
//! - `record`: the placement record the shim writes and the proxy and command line read.
//! - `fs`: file operations that never follow a symlink, and the one atomic write.
//! - `id`: [`ContainerId`], the one rule for a container id used in a path.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod fs;
pub mod id;
pub mod mountinfo;
pub mod record;

pub use id::ContainerId;
